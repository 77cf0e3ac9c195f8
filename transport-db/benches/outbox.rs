//! Database clients under load: the outbox writer's rows/s and the time for a load to settle.
//!
//! `cargo bench -p fawkes-transport-db --bench outbox` runs, on SQLite and PostgreSQL, two loads
//! of `CLIENTS` database clients each inserting a join and `MESSAGES` `new_msg` rows (in
//! multi-row inserts of 100, clients interleaved):
//! - **one room**: every client in `room:all`, so each message is broadcast to every client:
//!   `CLIENTS * MESSAGES * (CLIENTS + 1) + CLIENTS` outbox rows;
//! - **room per client**: each in its own room: `CLIENTS * (2 * MESSAGES + 1)` outbox rows.
//!
//! It prints the time from the first inbox insert until every row is answered in the outbox
//! (settled), outbox rows/s over that time, and how many clients were closed. Variables:
//! `CLIENTS` (20), `MESSAGES` (500), `BATCH` (inbox rows per unit of work, 500), `WRITE_BATCH`
//! (outbox rows per INSERT, 1000), `FAWKES_BENCH_POSTGRES` (default
//! `postgres://postgres@127.0.0.1:5432/test`; the bench makes and drops a database of its own,
//! and skips PostgreSQL loudly when unreachable).

use std::time::{Duration, Instant};

use fawkes_channel::{Channel, Endpoint, HandleIn, Payload, Router, SocketRef};
use fawkes_transport_db::{Db, DbClients, DbClientsOptions};
use serde_json::{Value, json};

struct Room;

impl Channel for Room {
    async fn join(&mut self, _: Payload, _: &mut SocketRef) -> Result<Value, Value> {
        Ok(json!({}))
    }
    async fn handle_in(&mut self, _: &str, payload: Payload, socket: &mut SocketRef) -> HandleIn {
        socket.broadcast("new_msg", payload);
        HandleIn::ok(json!({}))
    }
}

fn var(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

async fn exec(db: &Db, sql: &str) {
    match db {
        Db::Sqlite(p) => drop(sqlx::query(sql).execute(p).await.expect(sql)),
        Db::Postgres(p) => drop(sqlx::query(sql).execute(p).await.expect(sql)),
    }
}

async fn count(db: &Db, sql: &str) -> i64 {
    match db {
        Db::Sqlite(p) => sqlx::query_scalar(sql).fetch_one(p).await.expect(sql),
        Db::Postgres(p) => sqlx::query_scalar(sql).fetch_one(p).await.expect(sql),
    }
}

async fn load(name: &str, db: &Db, one_room: bool) {
    let (clients, messages) = (var("CLIENTS", 20), var("MESSAGES", 500));
    exec(db, "DELETE FROM fawkes_outbox").await;
    let endpoint = Endpoint::new(Router::new().channel("room:*", || Room));
    let served = DbClients::start(
        db.clone(),
        endpoint,
        DbClientsOptions::default()
            .poll_interval(Duration::from_millis(10))
            .batch_size(var("BATCH", 500) as i64)
            .write_batch_size(var("WRITE_BATCH", 1000)),
    )
    .await
    .expect("db clients");
    let topic = |c: usize| if one_room { "room:all".to_owned() } else { format!("room:{c}") };
    let started = Instant::now();
    // Joins first, answered, so every client is in its room before anyone speaks.
    let joins: Vec<String> =
        (0..clients).map(|c| format!("('bench-{c}', '[\"1\",\"1\",\"{}\",\"phx_join\",{{}}]')", topic(c))).collect();
    exec(db, &format!("INSERT INTO fawkes_inbox (client_id, frame) VALUES {}", joins.join(","))).await;
    while count(db, "SELECT COUNT(*) FROM fawkes_outbox").await < clients as i64 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut rows = joins;
    let inserted = rows.len();
    for m in 0..messages {
        for c in 0..clients {
            rows.push(format!("('bench-{c}', '[\"1\",\"{}\",\"{}\",\"new_msg\",{{\"body\":{m}}}]')", m + 2, topic(c)));
        }
    }
    for chunk in rows[inserted..].chunks(100) {
        exec(db, &format!("INSERT INTO fawkes_inbox (client_id, frame) VALUES {}", chunk.join(","))).await;
    }
    let fanout = if one_room { clients + 1 } else { 2 };
    let want = (clients * messages * fanout + clients) as i64;
    let replies = (clients * (messages + 1)) as i64;
    // Settled: the inbox cursor past the last row (it moves only with the outbox rows of every
    // row before it) and every expected outbox row there. Cheap queries: the poll must not be
    // the load.
    let last = count(db, "SELECT MAX(id) FROM fawkes_inbox").await;
    let deadline = started + Duration::from_secs(60);
    loop {
        let cursor =
            count(db, "SELECT COALESCE(MAX(position), 0) FROM fawkes_cursors WHERE name = 'fawkes_inbox'").await;
        let out = count(db, "SELECT COALESCE(MAX(id), 0) FROM fawkes_outbox").await;
        if cursor >= last && out >= want || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let answered = count(db, "SELECT COUNT(*) FROM fawkes_outbox WHERE frame LIKE '%phx_reply%'").await;
    let written = count(db, "SELECT COUNT(*) FROM fawkes_outbox").await;
    let settled = started.elapsed().as_secs_f64();
    let closed = count(db, "SELECT COUNT(*) FROM fawkes_outbox WHERE closed IS NOT NULL").await;
    let shape = if one_room { "one-room" } else { "room-per-client" };
    let status =
        if answered >= replies { format!("settled={settled:.2}s") } else { format!("NOT SETTLED in {settled:.0}s") };
    println!(
        "db-clients {name:<8} {shape:<15} clients={clients} inbox={} outbox={written}/{want} replies={answered}/{replies} {status} outbox rows/s={:.0} closed={closed}",
        rows.len(),
        written as f64 / settled
    );
    drop(served);
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(async {
        let dir = std::env::temp_dir().join(format!("fawkes-outbox-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        for one_room in [true, false] {
            let sqlite = Db::connect(&format!("sqlite://{}", dir.join(format!("bench-{one_room}.db")).display()))
                .await
                .expect("sqlite");
            load("sqlite", &sqlite, one_room).await;
        }
        let _ = std::fs::remove_dir_all(&dir);

        let admin_url =
            std::env::var("FAWKES_BENCH_POSTGRES").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
        let Ok(admin) = sqlx::PgPool::connect(&admin_url).await else {
            println!("*** SKIP PostgreSQL: unreachable at {admin_url} ***");
            return;
        };
        for one_room in [true, false] {
            let name = format!("fawkes_outbox_bench_{}_{one_room}", std::process::id());
            sqlx::query(&format!("CREATE DATABASE {name}")).execute(&admin).await.expect("create database");
            let url = format!("{}/{name}", admin_url.rsplit_once('/').map_or(admin_url.as_str(), |(base, _)| base));
            let pg = Db::connect(&url).await.expect("postgres");
            load("postgres", &pg, one_room).await;
            pg_close(pg).await;
            let _ = sqlx::query(&format!("DROP DATABASE {name} WITH (FORCE)")).execute(&admin).await;
        }
    });
}

async fn pg_close(db: Db) {
    if let Db::Postgres(p) = db {
        p.close().await;
    }
}
