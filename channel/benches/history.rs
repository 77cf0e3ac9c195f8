//! What history costs: the same workloads with history off and on each store in [`stores`].
//! `cargo bench -p fawkes-channel --bench history` prints one line per case and store:
//!
//! - `publish`: broadcasts per second on a topic with one subscriber (the per-broadcast cost).
//! - `fanout`: one broadcast to 1,000 subscribers, a tenth of them V1; deliveries per second.
//! - `recover`: a client that missed 1,000 broadcasts rejoins with its last position; the time
//!   from its join until the reply and all 1,000 frames are out of its outbound queue.
//! - `memory`: resident memory per retained broadcast, 100 B bodies, 100,000 kept.
//!
//! Every broadcast is `new_msg` `{"body": <100 B>, "user": "bench", "pos": POS}`; with history
//! off `pos` is a fixed string of the same length, so both sides encode the same bytes.
//!
//! `history CASE STORE [ITERATIONS]` (`all` for every case or store) runs one case on one store, for instruction counts that a
//! loaded machine does not disturb: the measured loop is the function `measured`, so
//!
//! ```text
//! valgrind --tool=callgrind --collect-atstart=no --toggle-collect='*measured*' \
//!     target/release/deps/history-HASH fanout memory 20
//! ```
//!
//! counts just the 22 broadcasts' instructions (20, and 2 to warm up); `recover memory 10` counts
//! ten recoveries (`measured_recover`).

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fawkes_channel::{
    Channel, ConnectInfo, Endpoint, Frame, HandleIn, HistoryOptions, HistoryStore, MemoryHistory, Outbound, Payload,
    Router, Session, SocketRef,
};
use serde_json::{Value, json};

/// The stores measured beside history off; another store (Redis, PostgreSQL) is one more line.
fn stores() -> Vec<(&'static str, Option<Arc<dyn HistoryStore>>)> {
    vec![("off", None), ("memory", Some(Arc::new(MemoryHistory::new())))]
}

const TOPIC: &str = "feed:bench";

/// Joins, recovering from `since` when the topic keeps history.
struct Feed;
impl Channel for Feed {
    async fn join(&mut self, params: Payload, socket: &mut SocketRef) -> Result<Value, Value> {
        let since = params.as_json().and_then(|p| p.get("since")).and_then(Value::as_str).map(str::to_owned);
        match socket.recover(since.as_deref()).await {
            Ok(r) => Ok(json!({"recovered": r.recovered})),
            Err(_) => Ok(json!({})),
        }
    }
    async fn handle_in(&mut self, _: &str, _: Payload, _: &mut SocketRef) -> HandleIn {
        HandleIn::NoReply
    }
}

struct Bench {
    rt: tokio::runtime::Runtime,
    endpoint: Endpoint,
    history: bool,
    body: String,
}

impl Bench {
    fn new(store: Option<Arc<dyn HistoryStore>>, options: HistoryOptions) -> Bench {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let mut builder = Endpoint::builder().router(Router::new().channel("feed:*", || Feed));
        if store.is_some() {
            builder = builder.history("feed:*", options);
        }
        let endpoint = builder.build();
        let history = store.is_some();
        if let Some(store) = store {
            endpoint.history().set_store(store);
        }
        Bench { rt, endpoint, history, body: "x".repeat(100) }
    }

    /// `n` sockets joined on the topic, a tenth of them V1.
    fn subscribers(&self, n: usize) -> Vec<(Session, Outbound)> {
        self.rt.block_on(async {
            let mut subs = Vec::with_capacity(n);
            for i in 0..n {
                subs.push(self.join(i % 10 == 0, None).await);
            }
            subs
        })
    }

    /// One `new_msg` through history; its position.
    async fn with_position(&self) -> String {
        let sent = self
            .endpoint
            .history()
            .broadcast(TOPIC, "new_msg", |pos| {
                json!({"body": self.body, "user": "bench", "pos": pos.to_string()}).into()
            })
            .await;
        sent.expect("feed:* keeps history").to_string()
    }

    async fn join(&self, v1: bool, since: Option<&str>) -> (Session, Outbound) {
        let vsn = if v1 { "vsn=1.0.0" } else { "vsn=2.0.0" };
        let mut s =
            self.endpoint.connect(ConnectInfo::new("bench", true).with_query(Some(vsn))).await.expect("connect");
        let mut out = s.outbound();
        let params = match since {
            Some(p) => json!({"since": p}),
            None => json!({}),
        };
        let join = if v1 {
            json!({"topic": TOPIC, "event": "phx_join", "payload": params, "ref": "1"})
        } else {
            json!(["1", "1", TOPIC, "phx_join", params])
        };
        s.handle_frame(Frame::text(join.to_string())).await.expect("join");
        out.recv().await.expect("join reply");
        (s, out)
    }

    /// One `new_msg`, through history when it is on.
    fn broadcast(&self) {
        if self.history {
            self.rt.block_on(self.with_position());
        } else {
            let payload = json!({"body": self.body, "user": "bench", "pos": "00000000000000a1:1000"});
            self.endpoint.pubsub().broadcast(TOPIC, "new_msg", payload);
        }
    }
}

fn drain(outs: &mut [(Session, Outbound)], buf: &mut Vec<Frame>) {
    for (_, out) in outs {
        buf.clear();
        out.try_recv_many(buf, 16);
        black_box(&buf);
    }
}

/// The measured loop: `iterations` broadcasts, each drained from every subscriber.
#[inline(never)]
fn measured(bench: &Bench, subs: &mut [(Session, Outbound)], iterations: usize) {
    let mut buf = Vec::with_capacity(16);
    for _ in 0..iterations {
        bench.broadcast();
        drain(subs, &mut buf);
    }
}

fn rate(count: usize, took: Duration) -> String {
    format!("{:.0}/s", count as f64 / took.as_secs_f64())
}

fn publish(store: Option<Arc<dyn HistoryStore>>, iterations: usize) -> String {
    let bench = Bench::new(store, HistoryOptions::default());
    let mut subs = bench.subscribers(1);
    measured(&bench, &mut subs, iterations / 10);
    let start = Instant::now();
    measured(&bench, &mut subs, iterations);
    format!("{} broadcasts", rate(iterations, start.elapsed()))
}

fn fanout(store: Option<Arc<dyn HistoryStore>>, iterations: usize) -> String {
    const SUBSCRIBERS: usize = 1_000;
    let bench = Bench::new(store, HistoryOptions::default());
    let mut subs = bench.subscribers(SUBSCRIBERS);
    measured(&bench, &mut subs, iterations / 10);
    let start = Instant::now();
    measured(&bench, &mut subs, iterations);
    let took = start.elapsed();
    format!(
        "{} deliveries, {:.1} µs per broadcast to {SUBSCRIBERS}",
        rate(iterations * SUBSCRIBERS, took),
        took.as_secs_f64() * 1e6 / iterations as f64
    )
}

fn recover(store: Option<Arc<dyn HistoryStore>>, iterations: usize) -> String {
    if store.is_none() {
        return "n/a".into();
    }
    let bench = Bench::new(store, HistoryOptions::default().max_len(10 * MISSED));
    let mut times = Vec::with_capacity(iterations);
    for _ in 0..iterations.max(1) {
        let since = bench.rt.block_on(async {
            let since = bench.with_position().await;
            for _ in 0..MISSED {
                bench.with_position().await;
            }
            since
        });
        let start = Instant::now();
        black_box(measured_recover(&bench, &since));
        times.push(start.elapsed());
    }
    times.sort();
    format!("{:.0} µs (median) to recover {MISSED} missed broadcasts", times[times.len() / 2].as_secs_f64() * 1e6)
}

const MISSED: usize = 1_000;

/// The measured recovery: a join from `since` until the reply and the `MISSED` broadcasts after
/// it are out of the socket's outbound queue (the channel's task runs inside this `block_on`).
#[inline(never)]
fn measured_recover(bench: &Bench, since: &str) -> usize {
    bench.rt.block_on(async {
        let (_session, mut back) = bench.join(false, Some(since)).await;
        let mut buf = Vec::new();
        let mut got = 0;
        while got < MISSED {
            buf.clear();
            got += back.recv_many(&mut buf, 4096).await.expect("socket open");
        }
        got
    })
}

fn memory(store: Option<Arc<dyn HistoryStore>>, _: usize) -> String {
    const KEPT: usize = 100_000;
    if store.is_none() {
        return "n/a".into();
    }
    let bench = Bench::new(store, HistoryOptions::default().max_len(KEPT).max_age(Duration::from_secs(3600)));
    // Every broadcast is retained (none expires or falls off), so the growth of the resident
    // set is what the store keeps: the broadcasts, their queue, the allocator's overhead.
    let before = resident_bytes();
    bench.rt.block_on(async {
        for _ in 0..KEPT {
            bench.with_position().await;
        }
    });
    let after = resident_bytes();
    match (before, after) {
        (Some(b), Some(a)) => {
            format!("{:.0} B resident per retained broadcast (100 B body)", (a - b) as f64 / KEPT as f64)
        }
        _ => "n/a (no /proc/self/statm)".into(),
    }
}

/// This process's resident set, from /proc.
fn resident_bytes() -> Option<i64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: i64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

type Case = fn(Option<Arc<dyn HistoryStore>>, usize) -> String;

fn main() {
    let cases: [(&str, Case, usize); 4] =
        [("publish", publish, 200_000), ("fanout", fanout, 2_000), ("recover", recover, 20), ("memory", memory, 1)];
    // `cargo bench` passes `--bench`; anything else picks a case, a store, an iteration count.
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let pick = |i: usize| args.get(i).map(String::as_str).filter(|a| *a != "all");
    let (only_case, only_store) = (pick(0), pick(1));
    let iterations: Option<usize> = args.get(2).and_then(|n| n.parse().ok());
    for (case, run, default_iterations) in cases {
        if only_case.is_some_and(|c| c != case) {
            continue;
        }
        for (store_name, store) in stores() {
            if only_store.is_some_and(|s| s != store_name) {
                continue;
            }
            let line = run(store, iterations.unwrap_or(default_iterations));
            println!("history/{case:<8} {store_name:<7} {line}");
        }
    }
}
