//! Table streams against a real SQLite file and the machine's PostgreSQL: rows published in
//! order, replay from `last_event_id` without gap or duplicate, bad rows dead-lettered, the
//! saved cursor across restarts, concurrent writers, and the database going away and back.

mod common;

use std::time::Duration;

use common::{Client, TestDb, chat, insert_event, postgres, sqlite};
use fawkes_channel::{Channel, Config, Endpoint, HandleIn, Payload, Router, SocketRef};
use fawkes_transport_db::{Db, Replay, StreamOptions, TableStream};
use serde_json::{Value, json};

async fn streams_rows_in_order(t: TestDb) {
    let (endpoint, _events) = chat(&t.db).await;
    let mut c = Client::join(&endpoint, "room:news", json!({})).await;
    insert_event(&t.db, "room:other", "x", "{}").await;
    let a = insert_event(&t.db, "room:news", "headline", r#"{"title":"one"}"#).await;
    let b = insert_event(&t.db, "room:news", "headline", r#"{"title":"two"}"#).await;
    assert_eq!(c.event().await, ("headline".into(), a, json!({"title": "one"})));
    assert_eq!(c.event().await, ("headline".into(), b, json!({"title": "two"})));
}

#[tokio::test]
async fn sqlite_streams_rows_in_order() {
    streams_rows_in_order(sqlite().await).await;
}

#[tokio::test]
async fn postgres_streams_rows_in_order() {
    if let Some(t) = postgres().await {
        streams_rows_in_order(t).await;
    }
}

async fn replay_then_live_without_gap_or_duplicate(t: TestDb) {
    let (endpoint, events) = chat(&t.db).await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(insert_event(&t.db, "room:r", "msg", &format!(r#"{{"n":{i}}}"#)).await);
    }
    // Wait until the stream has read them, so the replay comes from the database.
    while events.position() < ids[4] {
        tokio::task::yield_now().await;
    }
    // Writers keep inserting while the client joins: the seam must hold.
    let writer_db = t.db.clone();
    let writer = tokio::spawn(async move {
        let mut more = Vec::new();
        for i in 5..40 {
            more.push(insert_event(&writer_db, "room:r", "msg", &format!(r#"{{"n":{i}}}"#)).await);
        }
        more
    });
    let mut c = Client::join(&endpoint, "room:r", json!({"last_event_id": ids[1]})).await;
    ids.extend(writer.await.expect("writer"));
    let mut seen = Vec::new();
    while seen.len() < ids.len() - 2 {
        seen.push(c.event().await.1);
    }
    assert_eq!(seen, ids[2..].to_vec(), "every row after last_event_id, once, in order");
}

#[tokio::test]
async fn sqlite_replay_then_live_without_gap_or_duplicate() {
    replay_then_live_without_gap_or_duplicate(sqlite().await).await;
}

#[tokio::test]
async fn postgres_replay_then_live_without_gap_or_duplicate() {
    if let Some(t) = postgres().await {
        replay_then_live_without_gap_or_duplicate(t).await;
    }
}

async fn bad_rows_are_dead_lettered_and_never_stall(t: TestDb) {
    let (endpoint, _events) = chat(&t.db).await;
    let mut c = Client::join(&endpoint, "room:bad", json!({})).await;
    if let Db::Sqlite(_) = t.db {
        insert_event(&t.db, "room:bad", "x", "not json").await;
    }
    let good = insert_event(&t.db, "room:bad", "ok", "{}").await;
    assert_eq!(c.event().await.1, good);
    if let Db::Sqlite(p) = &t.db {
        let dead: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM fawkes_dead_letters").fetch_one(p).await.expect("count");
        assert_eq!(dead, 1);
    }
}

#[tokio::test]
async fn sqlite_bad_rows_are_dead_lettered_and_never_stall() {
    bad_rows_are_dead_lettered_and_never_stall(sqlite().await).await;
}

async fn resumes_from_its_saved_cursor_after_a_restart(t: TestDb) {
    let before = insert_event(&t.db, "room:restart", "e", "{}").await;
    {
        let (endpoint, events) = chat(&t.db).await;
        let mut c = Client::join(&endpoint, "room:restart", json!({})).await;
        let live = insert_event(&t.db, "room:restart", "e", "{}").await;
        assert_eq!(c.event().await.1, live);
        assert!(events.position() >= live);
        assert!(before < live);
    }
    // Rows written while the server is down are read when it comes back, and replayable.
    let down1 = insert_event(&t.db, "room:restart", "e", r#"{"while":"down"}"#).await;
    let down2 = insert_event(&t.db, "room:restart", "e", r#"{"while":"down"}"#).await;
    let (endpoint, _events) = chat(&t.db).await;
    let mut c = Client::join(&endpoint, "room:restart", json!({"last_event_id": before})).await;
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(c.event().await.1);
    }
    assert_eq!(seen[1..], [down1, down2]);
}

#[tokio::test]
async fn sqlite_resumes_from_its_saved_cursor_after_a_restart() {
    resumes_from_its_saved_cursor_after_a_restart(sqlite().await).await;
}

#[tokio::test]
async fn postgres_resumes_from_its_saved_cursor_after_a_restart() {
    if let Some(t) = postgres().await {
        resumes_from_its_saved_cursor_after_a_restart(t).await;
    }
}

/// Joins a topic and asks for a replay it never delivers, so the stream stays held (publishes
/// nothing) until the socket leaves or the hold limit passes.
struct Stalled {
    events: TableStream,
    replay: Option<Replay>,
}

impl Channel for Stalled {
    async fn join(&mut self, _: Payload, socket: &mut SocketRef) -> Result<Value, Value> {
        self.replay = Some(self.events.replay(socket, Some(0)).await);
        Ok(json!({}))
    }

    async fn handle_in(&mut self, _: &str, _: Payload, _: &mut SocketRef) -> HandleIn {
        HandleIn::NoReply
    }
}

/// A join that asks for no replay never waits on the stream: not while another join holds it
/// (a stream of joins would otherwise go at the pace of the reader's database round trips). It
/// still gets every row written after its reply once the stream publishes again.
async fn joins_without_a_replay_never_wait_on_the_stream(t: TestDb) {
    let events = TableStream::start(t.db.clone(), StreamOptions::table("fawkes_events")).await.expect("stream");
    let (room, stalled) = (events.clone(), events.clone());
    let router = Router::new()
        .channel("room:*", move || common::Room::with_events(room.clone()))
        .channel("stalled:*", move || Stalled { events: stalled.clone(), replay: None });
    let endpoint = Endpoint::builder().router(router).config(Config::default()).build();
    let holder = Client::join(&endpoint, "stalled:x", json!({})).await;

    let joined = tokio::time::timeout(Duration::from_secs(3), async {
        let mut clients = Vec::new();
        for _ in 0..20 {
            clients.push(Client::join(&endpoint, "room:quick", json!({})).await);
        }
        clients
    });
    let mut clients = joined.await.expect("20 joins without a replay answered while the stream is held");

    let row = insert_event(&t.db, "room:quick", "e", "{}").await;
    drop(holder);
    for c in &mut clients {
        assert_eq!(c.event().await.1, row, "a row written after the join reply reaches the socket");
    }
}

#[tokio::test]
async fn sqlite_joins_without_a_replay_never_wait_on_the_stream() {
    joins_without_a_replay_never_wait_on_the_stream(sqlite().await).await;
}

#[tokio::test]
async fn postgres_joins_without_a_replay_never_wait_on_the_stream() {
    if let Some(t) = postgres().await {
        joins_without_a_replay_never_wait_on_the_stream(t).await;
    }
}

/// Many writers, each committing after a random delay, so ids commit out of order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_concurrent_writers_never_lose_or_repeat_a_row() {
    let Some(t) = postgres().await else { return };
    let (endpoint, _events) = chat(&t.db).await;
    let mut c = Client::join(&endpoint, "room:many", json!({})).await;
    let Db::Postgres(pool) = t.db.clone() else { unreachable!() };
    let writers = 16;
    let per_writer = 25;
    let mut tasks = Vec::new();
    for w in 0..writers {
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 0..per_writer {
                let mut tx = pool.begin().await.expect("begin");
                let id: i64 = sqlx::query_scalar(
                    "INSERT INTO fawkes_events (topic, event, payload) VALUES ('room:many', 'w', $1::jsonb) RETURNING id",
                )
                .bind(json!({"w": w, "i": i}).to_string())
                .fetch_one(&mut *tx)
                .await
                .expect("insert");
                let delay = rand::random::<u64>() % 30;
                tokio::time::sleep(Duration::from_millis(delay)).await;
                if rand::random::<u8>().is_multiple_of(10) {
                    tx.rollback().await.expect("rollback");
                } else {
                    tx.commit().await.expect("commit");
                    ids.push(id);
                }
            }
            ids
        }));
    }
    let mut committed = Vec::new();
    for task in tasks {
        committed.extend(task.await.expect("writer"));
    }
    committed.sort_unstable();
    let mut seen = Vec::new();
    while seen.len() < committed.len() {
        seen.push(c.event().await.1);
    }
    assert_eq!(seen, committed, "every committed row once, in id order; no rolled-back row");
}

/// A TCP proxy to PostgreSQL that can be cut (live connections dropped, new ones refused) and
/// restored, to make the database disappear and come back.
struct Proxy {
    addr: std::net::SocketAddr,
    cut: tokio::sync::watch::Sender<bool>,
    refused: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    refused_changed: std::sync::Arc<tokio::sync::Notify>,
}

impl Proxy {
    async fn start(upstream: std::net::SocketAddr) -> Proxy {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (cut, cut_rx) = tokio::sync::watch::channel(false);
        let refused = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let refused_changed = std::sync::Arc::new(tokio::sync::Notify::new());
        let (count, notify) = (refused.clone(), refused_changed.clone());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if *cut_rx.borrow() {
                    drop(inbound);
                    count.fetch_add(1, Ordering::SeqCst);
                    notify.notify_waiters();
                    continue;
                }
                let mut cut_rx = cut_rx.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(upstream).await else { return };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut_rx.wait_for(|cut| *cut) => {}
                    }
                });
            }
        });
        Proxy { addr, cut, refused, refused_changed }
    }

    /// Waits until `n` connection attempts have been refused since the cut.
    async fn refused_at_least(&self, n: usize) {
        loop {
            let changed = self.refused_changed.notified();
            if self.refused.load(std::sync::atomic::Ordering::SeqCst) >= n {
                return;
            }
            changed.await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_going_away_and_coming_back_loses_nothing() {
    let Some(t) = postgres().await else { return };
    let upstream: std::net::SocketAddr = "127.0.0.1:5432".parse().expect("addr");
    let proxy = Proxy::start(upstream).await;
    let via_proxy = t.url.replacen("127.0.0.1:5432", &proxy.addr.to_string(), 1);
    assert_ne!(via_proxy, t.url, "the test URL names 127.0.0.1:5432");
    let served = Db::connect(&via_proxy).await.expect("connect through the proxy");
    let (endpoint, _events) = chat(&served).await;
    let mut c = Client::join(&endpoint, "room:outage", json!({})).await;

    let before = insert_event(&t.db, "room:outage", "e", "{}").await;
    assert_eq!(c.event().await.1, before);

    proxy.cut.send_replace(true);
    let during = [
        insert_event(&t.db, "room:outage", "e", r#"{"during":1}"#).await,
        insert_event(&t.db, "room:outage", "e", r#"{"during":2}"#).await,
    ];
    // The reader notices, and keeps trying (with backoff) while the database is gone.
    tokio::time::timeout(Duration::from_secs(20), proxy.refused_at_least(2)).await.expect("the reader retries");
    proxy.cut.send_replace(false);
    let after = insert_event(&t.db, "room:outage", "e", "{}").await;
    let seen = [c.event().await.1, c.event().await.1, c.event().await.1];
    assert_eq!(seen, [during[0], during[1], after], "nothing lost, nothing repeated, in order");
}
