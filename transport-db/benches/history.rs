//! The SQL history store, SQLite and PostgreSQL.
//!
//! `cargo bench -p fawkes-transport-db --bench history` prints, per backend:
//! - appends/s through the History layer (`History::broadcast`, no subscriber): one topic (its
//!   appends serialised by the topic's lock, as in production), 8 topics at once, and on
//!   PostgreSQL two stores (two nodes) appending to one topic at once;
//! - for comparison, plain single-row autocommit inserts, one after the other;
//! - the time to read back what a client missed, 1,000 broadcasts (`read_after`, median of 20).
//!
//! PostgreSQL is `FAWKES_BENCH_POSTGRES` (default `postgres://postgres@127.0.0.1:5432/test`); the
//! bench creates and drops a database of its own, and skips PostgreSQL loudly when unreachable.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fawkes_channel::{HistoryOptions, HistoryStore, Position, PubSub};
use fawkes_transport_db::SqlHistory;
use serde_json::json;

const APPENDS: usize = 2_000;
const TOPICS: usize = 8;

fn options() -> HistoryOptions {
    HistoryOptions::default().max_len(10_000).max_age(Duration::from_secs(3600))
}

fn history(store: Arc<SqlHistory>) -> fawkes_channel::History {
    let history = PubSub::new().history();
    history.keep_in("bench:*", options(), store);
    history
}

async fn appends(history: &fawkes_channel::History, topic: &str, n: usize) {
    for i in 0..n {
        history
            .broadcast(topic, "msg", |pos| {
                json!({"body": "a chat message of typical length", "n": i, "pos": pos.to_string()}).into()
            })
            .await
            .expect("append");
    }
}

async fn run(name: &str, url: &str) {
    let store = Arc::new(SqlHistory::connect(url).await.expect("store"));
    floor(name, url).await;
    let one = history(store.clone());
    appends(&one, "bench:warm", 100).await;

    let started = Instant::now();
    appends(&one, "bench:one", APPENDS).await;
    let rate = APPENDS as f64 / started.elapsed().as_secs_f64();
    println!("{name}: {rate:>8.0} appends/s, one topic");

    let started = Instant::now();
    let tasks: Vec<_> = (0..TOPICS)
        .map(|t| {
            let h = one.clone();
            tokio::spawn(async move { appends(&h, &format!("bench:many{t}"), APPENDS / TOPICS).await })
        })
        .collect();
    for task in tasks {
        task.await.expect("appends");
    }
    let rate = APPENDS as f64 / started.elapsed().as_secs_f64();
    println!("{name}: {rate:>8.0} appends/s, {TOPICS} topics at once");

    if url.starts_with("postgres") {
        let other = history(Arc::new(SqlHistory::connect(url).await.expect("second store")));
        let started = Instant::now();
        let (a, b) = (one.clone(), other.clone());
        let first = tokio::spawn(async move { appends(&a, "bench:shared", APPENDS / 2).await });
        let second = tokio::spawn(async move { appends(&b, "bench:shared", APPENDS / 2).await });
        first.await.expect("node 1");
        second.await.expect("node 2");
        let rate = APPENDS as f64 / started.elapsed().as_secs_f64();
        println!("{name}: {rate:>8.0} appends/s, one topic from two nodes at once");
    }

    // A client that missed 1,000 broadcasts.
    let from: Position = one.broadcast("bench:recover", "msg", |_| json!({}).into()).await.expect("append");
    appends(&one, "bench:recover", 1_000).await;
    let mut times = Vec::new();
    for _ in 0..20 {
        let started = Instant::now();
        let read = store.read_after("bench:recover", &options(), Some(from)).await.expect("read");
        times.push(started.elapsed());
        assert!(read.recovered && read.entries.len() == 1_000);
    }
    times.sort();
    println!(
        "{name}: {:>8.2} ms to read the 1,000 broadcasts a client missed (median of 20)",
        times[10].as_secs_f64() * 1e3
    );
}

/// The database's own floor for comparison: single-row autocommit inserts of the same size, one
/// after the other (each waits for its commit, as an append must before its broadcast goes out).
async fn floor(name: &str, url: &str) {
    let db = fawkes_transport_db::Db::open(url).await.expect("db");
    let payload = json!({"body": "a chat message of typical length", "n": 0, "pos": "1f2e3d4c5b6a:123"}).to_string();
    let started = Instant::now();
    macro_rules! run {
        ($p:expr) => {{
            sqlx::query("CREATE TABLE IF NOT EXISTS bench_floor (id BIGINT PRIMARY KEY, payload TEXT NOT NULL)")
                .execute($p)
                .await
                .expect("create");
            for i in 0..APPENDS as i64 {
                sqlx::query("INSERT INTO bench_floor (id, payload) VALUES ($1, $2)")
                    .bind(i)
                    .bind(&payload)
                    .execute($p)
                    .await
                    .expect("insert");
            }
        }};
    }
    match &db {
        fawkes_transport_db::Db::Sqlite(p) => run!(p),
        fawkes_transport_db::Db::Postgres(p) => run!(p),
    }
    let rate = APPENDS as f64 / started.elapsed().as_secs_f64();
    println!("{name}: {rate:>8.0} inserts/s, plain single-row autocommit inserts (the database's floor)");
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(async {
        let dir = std::env::temp_dir().join(format!("fawkes-history-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        run("sqlite", &format!("sqlite://{}", dir.join("bench.db").display())).await;
        let _ = std::fs::remove_dir_all(&dir);

        let admin_url =
            std::env::var("FAWKES_BENCH_POSTGRES").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
        let Ok(admin) = sqlx::PgPool::connect(&admin_url).await else {
            println!("*** SKIP PostgreSQL: unreachable at {admin_url} ***");
            return;
        };
        let name = format!("fawkes_history_bench_{}", std::process::id());
        sqlx::query(&format!("CREATE DATABASE {name}")).execute(&admin).await.expect("create database");
        let url = format!("{}/{name}", admin_url.rsplit_once('/').map_or(admin_url.as_str(), |(base, _)| base));
        run("postgres", &url).await;
        let _ = sqlx::query(&format!("DROP DATABASE {name} WITH (FORCE)")).execute(&admin).await;
    });
}
