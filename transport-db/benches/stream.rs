//! Table-stream throughput and latency, SQLite (polling) and PostgreSQL (LISTEN/NOTIFY).
//!
//! `cargo bench -p fawkes-transport-db` prints, per backend:
//! - `rows/s`: rows inserted in batches of 100 and delivered to every subscriber, and
//!   `deliveries/s` (rows × subscribers), from the first insert to the last delivery;
//! - insert-to-client latency p50/p99: single-row inserts, each stamped with its insert time, timed
//!   when the subscriber's outbound queue yields it.
//!
//! PostgreSQL is `FAWKES_BENCH_POSTGRES` (default `postgres://postgres@127.0.0.1:5432/test`); the
//! bench creates and drops a database of its own, and skips PostgreSQL loudly when unreachable.

use std::time::{Duration, Instant};

use fawkes_channel::{Channel, ConnectInfo, Endpoint, Frame, HandleIn, Outbound, Payload, Router, Session, SocketRef};
use fawkes_transport_db::{Db, StreamOptions, TableStream};
use serde_json::{Value, json};

const SUBSCRIBERS: usize = 100;
const ROWS: usize = 5_000;
const LATENCY_SAMPLES: usize = 300;

struct Feed(TableStream);

impl Channel for Feed {
    async fn join(&mut self, _: Payload, socket: &mut SocketRef) -> Result<Value, Value> {
        self.0.recover(socket, None).await.map_err(|e| json!({"reason": e.to_string()}))?;
        Ok(json!({}))
    }
    async fn handle_in(&mut self, _: &str, _: Payload, _: &mut SocketRef) -> HandleIn {
        HandleIn::NoReply
    }
}

async fn insert_batch(db: &Db, from: usize, n: usize, stamp: u128) {
    let values: Vec<String> =
        (from..from + n).map(|i| format!("('bench:1', 'tick', '{{\"i\":{i},\"t\":{stamp}}}')")).collect();
    let sql = format!("INSERT INTO fawkes_events (topic, event, payload) VALUES {}", values.join(","));
    match db {
        Db::Sqlite(p) => drop(sqlx::query(&sql).execute(p).await.expect("insert")),
        Db::Postgres(p) => drop(sqlx::query(&sql).execute(p).await.expect("insert")),
    }
}

async fn subscribers(endpoint: &Endpoint, n: usize) -> Vec<(Session, Outbound)> {
    let mut subs = Vec::with_capacity(n);
    for _ in 0..n {
        let info = ConnectInfo::new("bench", true).with_query(Some("vsn=2.0.0"));
        let mut session = endpoint.connect(info).await.expect("connect");
        let mut out = session.outbound();
        session.handle_frame(Frame::text(r#"["1","1","bench:1","phx_join",{}]"#)).await.expect("join");
        out.recv().await.expect("join reply");
        subs.push((session, out));
    }
    subs
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn run(name: &str, db: Db, poll: Duration) {
    let stream =
        TableStream::start(db.clone(), StreamOptions::table("fawkes_events").poll_interval(poll).batch_size(1000))
            .await
            .expect("stream");
    let config = fawkes_channel::Config::default().outbound_queue_limit(ROWS * 2);
    let endpoint = Endpoint::builder()
        .router(Router::new().channel("bench:*", move || Feed(stream.clone())))
        .config(config)
        .build();
    let mut subs = subscribers(&endpoint, SUBSCRIBERS).await;
    let epoch = Instant::now();

    // Throughput.
    let started = Instant::now();
    for batch in 0..ROWS / 100 {
        insert_batch(&db, batch * 100, 100, 0).await;
    }
    let mut buf = Vec::new();
    for (_, out) in &mut subs {
        let mut got = 0;
        while got < ROWS {
            buf.clear();
            got += out.recv_many(&mut buf, 4096).await.expect("open");
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "db-stream {name:<10} subscribers={SUBSCRIBERS} rows={ROWS}  rows/s={:.0}  deliveries/s={:.0}",
        ROWS as f64 / elapsed,
        (ROWS * SUBSCRIBERS) as f64 / elapsed
    );

    // Latency: one row at a time; the first subscriber times it.
    let mut samples = Vec::with_capacity(LATENCY_SAMPLES);
    for i in 0..LATENCY_SAMPLES {
        let sent = epoch.elapsed().as_micros();
        insert_batch(&db, i, 1, sent).await;
        let frame = subs[0].1.recv().await.expect("open");
        samples.push(epoch.elapsed() - Duration::from_micros(sent as u64));
        for (_, out) in subs.iter_mut().skip(1) {
            out.recv().await.expect("open");
        }
        let _ = frame;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    samples.sort_unstable();
    println!(
        "db-stream {name:<10} insert-to-client latency  p50={:.2}ms  p99={:.2}ms  (poll interval {:?})",
        percentile(&samples, 0.50).as_secs_f64() * 1e3,
        percentile(&samples, 0.99).as_secs_f64() * 1e3,
        poll
    );
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(async {
        let dir = std::env::temp_dir().join(format!("fawkes-db-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let sqlite = Db::connect(&format!("sqlite://{}", dir.join("bench.db").display())).await.expect("sqlite");
        run("sqlite", sqlite, Duration::from_millis(10)).await;
        let _ = std::fs::remove_dir_all(&dir);

        let admin_url =
            std::env::var("FAWKES_BENCH_POSTGRES").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
        let Ok(admin) = sqlx::PgPool::connect(&admin_url).await else {
            println!("*** SKIP PostgreSQL: unreachable at {admin_url} ***");
            return;
        };
        let name = format!("fawkes_bench_{}", std::process::id());
        sqlx::query(&format!("CREATE DATABASE {name}")).execute(&admin).await.expect("create database");
        let url = format!("{}/{name}", admin_url.rsplit_once('/').map_or(admin_url.as_str(), |(base, _)| base));
        let pg = Db::connect(&url).await.expect("postgres");
        run("postgres", pg, Duration::from_secs(1)).await;
        let _ = sqlx::query(&format!("DROP DATABASE {name} WITH (FORCE)")).execute(&admin).await;
    });
}
