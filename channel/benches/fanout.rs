//! Broadcast fan-out to many in-process subscribers: one broadcast to a topic with N joined
//! sockets, until every socket's outbound queue holds the frame. `cargo bench -p fawkes-channel`
//! prints deliveries per second (criterion's "thrpt", one element per subscriber reached).
//! `broadcast_100B` is a topic without history; `history_100B` the same broadcast on a topic that
//! keeps a history in memory (written before delivery, with its position in the payload).

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use fawkes_channel::{
    Channel, Config, ConnectInfo, Endpoint, Frame, HandleIn, HistoryOptions, Outbound, Payload, Router, SocketRef,
};
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
    for (name, n) in
        [("broadcast_100B", 1_000usize), ("history_100B", 1_000), ("broadcast_100B", 20_000), ("history_100B", 20_000)]
    {
        let history = name.starts_with("history");
        let endpoint = Endpoint::builder()
            .router(Router::new().channel("room:*", || Room))
            .config(Config::default().outbound_queue_limit(4096))
            .history("room:*", HistoryOptions::default())
            .build();
        let topic = if history { "room:bench" } else { "lobby:bench" };
        let endpoint = if history {
            endpoint
        } else {
            Endpoint::builder()
                .router(Router::new().channel("lobby:*", || Room))
                .config(Config::default().outbound_queue_limit(4096))
                .build()
        };
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
                    format!(r#"{{"topic":"{topic}","event":"phx_join","payload":{{}},"ref":"1"}}"#)
                } else {
                    format!(r#"["1","1","{topic}","phx_join",{{}}]"#)
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
        let history_handle = endpoint.history();
        g.bench_with_input(BenchmarkId::new(name, n), &n, |b, &n| {
            b.iter(|| {
                if history {
                    let sent = rt.block_on(history_handle.broadcast(topic, "new_msg", |pos| {
                        let mut p = payload.clone();
                        p["pos"] = pos.to_string().into();
                        p.into()
                    }));
                    sent.expect("room:* keeps history");
                } else {
                    let reached = endpoint.pubsub().broadcast(topic, "new_msg", payload.clone());
                    assert_eq!(reached, n);
                }
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
