//! Broadcast fan-out to many in-process subscribers: one broadcast to a topic with N joined
//! sockets, until every socket's outbound queue holds the frame. `cargo bench -p fawkes-channel`
//! prints deliveries per second (criterion's "thrpt", one element per subscriber reached).

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use fawkes_channel::{Channel, Config, ConnectInfo, Endpoint, Frame, HandleIn, Outbound, Payload, Router, SocketRef};
use serde_json::{Value, json};

struct Room;
impl Channel for Room {
    async fn join(&mut self, _: Payload, _: &mut SocketRef) -> Result<Value, Value> {
        Ok(json!({}))
    }
    async fn handle_in(&mut self, _: &str, _: Payload, _: &mut SocketRef) -> HandleIn {
        HandleIn::NoReply
    }
}

fn fanout(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let mut g = c.benchmark_group("fanout");
    g.sample_size(20);
    for n in [1_000usize, 20_000] {
        let endpoint = Endpoint::builder()
            .router(Router::new().channel("room:*", || Room))
            .config(Config::default().outbound_queue_limit(4096))
            .build();
        // Hold the sessions: dropping one leaves its channels.
        let (_sessions, mut outbounds): (Vec<_>, Vec<Outbound>) = rt.block_on(async {
            let mut sessions = Vec::with_capacity(n);
            let mut outbounds = Vec::with_capacity(n);
            for i in 0..n {
                let vsn = if i % 10 == 0 { "vsn=1.0.0" } else { "vsn=2.0.0" };
                let mut s =
                    endpoint.connect(ConnectInfo::new("bench", true).with_query(Some(vsn))).await.expect("connect");
                let mut out = s.outbound();
                let join = if i % 10 == 0 {
                    r#"{"topic":"room:bench","event":"phx_join","payload":{},"ref":"1"}"#
                } else {
                    r#"["1","1","room:bench","phx_join",{}]"#
                };
                s.handle_frame(Frame::text(join)).await.expect("join");
                out.recv().await.expect("join reply");
                sessions.push(s);
                outbounds.push(out);
            }
            (sessions, outbounds)
        });
        let payload = json!({"body": "x".repeat(60), "user": "bench"});
        let mut buf = Vec::with_capacity(4);
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::new("broadcast_100B", n), &n, |b, &n| {
            b.iter(|| {
                let reached = endpoint.pubsub().broadcast("room:bench", "new_msg", payload.clone());
                assert_eq!(reached, n);
                for out in &mut outbounds {
                    buf.clear();
                    out.try_recv_many(&mut buf, 4);
                }
            })
        });
    }
    g.finish();
}

criterion_group!(benches, fanout);
criterion_main!(benches);
