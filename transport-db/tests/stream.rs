//! The database transport against a real SQLite file and the machine's PostgreSQL.
//!
//! PostgreSQL is read from `FAWKES_TEST_POSTGRES` (default `postgres://postgres@127.0.0.1:5432/test`);
//! each test makes a database of its own and drops it. When PostgreSQL is unreachable the
//! PostgreSQL tests fail under `CI=true` and print a loud SKIP otherwise.

use std::time::Duration;

use fawkes::db::{Db, DbClients, DbClientsOptions, StreamOptions, TableStream};
use fawkes::{Config, ConnectInfo, Endpoint, Outbound, Router, Session};
use fawkes_serializer::{Frame, Serializer, ServerMessage};
use serde_json::{Value, json};

/// A database for one test; dropped (PostgreSQL) or deleted (SQLite) afterwards.
struct TestDb {
    db: Db,
    url: String,
    cleanup: Option<(String, String)>,
    _dir: Option<TempDir>,
}

struct TempDir(std::path::PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn sqlite() -> TestDb {
    let dir = std::env::temp_dir().join(format!("fawkes-db-test-{}", rand::random::<u64>()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let url = format!("sqlite://{}", dir.join("test.db").display());
    TestDb { db: Db::connect(&url).await.expect("sqlite"), url, cleanup: None, _dir: Some(TempDir(dir)) }
}

async fn postgres() -> Option<TestDb> {
    let admin_url =
        std::env::var("FAWKES_TEST_POSTGRES").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let admin = match sqlx::PgPool::connect(&admin_url).await {
        Ok(pool) => pool,
        Err(e) if std::env::var("CI").as_deref() == Ok("true") => panic!("PostgreSQL unreachable at {admin_url}: {e}"),
        Err(e) => {
            eprintln!("\n*** SKIP: PostgreSQL unreachable at {admin_url}: {e} ***\n");
            return None;
        }
    };
    let name = format!("fawkes_test_{}", rand::random::<u32>());
    sqlx::query(&format!("CREATE DATABASE {name}")).execute(&admin).await.expect("create database");
    let url = match admin_url.rsplit_once('/') {
        Some((base, _)) => format!("{base}/{name}"),
        None => panic!("bad URL {admin_url}"),
    };
    let db = Db::connect(&url).await.expect("connect to the test database");
    Some(TestDb { db, url, cleanup: Some((admin_url, name)), _dir: None })
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some((admin_url, name)) = self.cleanup.take()
            && let Db::Postgres(_) = &self.db
        {
            // FORCE ends the test's own connections (a stream's LISTEN among them). It runs on
            // a thread with its own runtime, since Drop cannot await.
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
                rt.block_on(async {
                    if let Ok(admin) = sqlx::PgPool::connect(&admin_url).await {
                        let _ =
                            sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).execute(&admin).await;
                    }
                });
            })
            .join();
        }
    }
}

async fn exec(db: &Db, sql: &str) {
    match db {
        Db::Sqlite(p) => drop(sqlx::query(sql).execute(p).await.expect(sql)),
        Db::Postgres(p) => drop(sqlx::query(sql).execute(p).await.expect(sql)),
    }
}

async fn insert_event(db: &Db, topic: &str, event: &str, payload: &str) -> i64 {
    let sql = "INSERT INTO fawkes_events (topic, event, payload) VALUES ($1, $2, $3) RETURNING id";
    match db {
        Db::Sqlite(p) => sqlx::query_scalar(sql).bind(topic).bind(event).bind(payload).fetch_one(p).await,
        Db::Postgres(p) => {
            let sql = "INSERT INTO fawkes_events (topic, event, payload) VALUES ($1, $2, $3::jsonb) RETURNING id";
            sqlx::query_scalar(sql).bind(topic).bind(event).bind(payload).fetch_one(p).await
        }
    }
    .expect("insert event")
}

/// An in-memory V2 client of the demo app.
struct Client {
    session: Session,
    out: Outbound,
}

impl Client {
    async fn join(endpoint: &Endpoint, topic: &str, params: Value) -> Client {
        let info = ConnectInfo::new("memory", true).with_query(Some("vsn=2.0.0"));
        let mut session = endpoint.connect(info).await.expect("connect");
        let out = session.outbound();
        let join = format!(r#"["1","1",{},"phx_join",{params}]"#, json!(topic));
        session.handle_frame(Frame::text(join)).await.expect("join");
        let mut client = Client { session, out };
        assert!(matches!(client.next().await, ServerMessage::Reply(r) if r.status == fawkes::ReplyStatus::Ok));
        client
    }

    async fn next(&mut self) -> ServerMessage {
        let frame = tokio::time::timeout(Duration::from_secs(10), self.out.recv())
            .await
            .expect("a frame in 10 s")
            .expect("open");
        Serializer::V2.decode_server(&frame).expect("decodes")
    }

    /// The next message that is not Presence (`presence_state`, `presence_diff`), which the demo
    /// sends to joins that name a user, in an order of its own.
    async fn next_chat(&mut self) -> ServerMessage {
        loop {
            match self.next().await {
                ServerMessage::Push(p) if p.event.starts_with("presence_") => continue,
                ServerMessage::Broadcast(b) if b.event.starts_with("presence_") => continue,
                other => return other,
            }
        }
    }

    /// The next stream message: (event, id, data).
    async fn event(&mut self) -> (String, i64, Value) {
        match self.next().await {
            ServerMessage::Broadcast(b) => {
                let body = b.payload.as_json().cloned().expect("JSON");
                (b.event, body["id"].as_i64().expect("id"), body["data"].clone())
            }
            other => panic!("expected a stream broadcast, got {other:?}"),
        }
    }
}

async fn demo(db: &Db) -> (Endpoint, TableStream) {
    let events =
        TableStream::start(db.clone(), StreamOptions::table("fawkes_events").poll_interval(Duration::from_millis(20)))
            .await
            .expect("stream");
    let endpoint = Endpoint::builder()
        .router(fawkes_server::demo::router_with_events(events.clone()))
        .config(Config::default())
        .build();
    (endpoint, events)
}

async fn streams_rows_in_order(t: TestDb) {
    let (endpoint, _events) = demo(&t.db).await;
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
    let (endpoint, events) = demo(&t.db).await;
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
    let (endpoint, _events) = demo(&t.db).await;
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
        let (endpoint, events) = demo(&t.db).await;
        let mut c = Client::join(&endpoint, "room:restart", json!({})).await;
        let live = insert_event(&t.db, "room:restart", "e", "{}").await;
        assert_eq!(c.event().await.1, live);
        assert!(events.position() >= live);
        assert!(before < live);
    }
    // Rows written while the server is down are read when it comes back, and replayable.
    let down1 = insert_event(&t.db, "room:restart", "e", r#"{"while":"down"}"#).await;
    let down2 = insert_event(&t.db, "room:restart", "e", r#"{"while":"down"}"#).await;
    let (endpoint, _events) = demo(&t.db).await;
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

/// Many writers, each committing after a random delay, so ids commit out of order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_concurrent_writers_never_lose_or_repeat_a_row() {
    let Some(t) = postgres().await else { return };
    let (endpoint, _events) = demo(&t.db).await;
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

async fn a_db_client_chats_with_a_socket_client(t: TestDb) {
    let (endpoint, _events) = demo(&t.db).await;
    let _clients = DbClients::start(
        t.db.clone(),
        endpoint.clone(),
        DbClientsOptions::default().poll_interval(Duration::from_millis(20)),
    )
    .await
    .expect("db clients");
    let mut ws = Client::join(&endpoint, "room:lobby", json!({"user": "web"})).await;
    let inbox = |frame: &str| format!("INSERT INTO fawkes_inbox (client_id, frame) VALUES ('db-7', '{frame}')");
    exec(&t.db, &inbox(r#"["1","1","room:lobby","phx_join",{"user":"sql"}]"#)).await;
    exec(&t.db, &inbox(r#"["1","2","room:lobby","new_msg",{"body":"hello from a row"}]"#)).await;
    match ws.next_chat().await {
        ServerMessage::Broadcast(b) => {
            assert_eq!(b.payload.as_json(), Some(&json!({"body": "hello from a row", "user": "sql"})))
        }
        other => panic!("expected the DB client's message, got {other:?}"),
    }
    // And back: the socket client's message becomes an outbox row of the DB client.
    ws.session.handle_frame(Frame::text(r#"["1","9","room:lobby","new_msg",{"body":"hi row"}]"#)).await.expect("push");
    assert!(matches!(ws.next_chat().await, ServerMessage::Broadcast(_)), "its own broadcast");
    assert!(matches!(ws.next_chat().await, ServerMessage::Reply(_)), "its reply");
    let want = r#"[null,null,"room:lobby","new_msg",{"body":"hi row","user":"web"}]"#;
    let sql = "SELECT COUNT(*) FROM fawkes_outbox WHERE client_id = 'db-7' AND frame = $1";
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let n: i64 = match &t.db {
                Db::Sqlite(p) => sqlx::query_scalar(sql).bind(want).fetch_one(p).await.expect("count"),
                Db::Postgres(p) => sqlx::query_scalar(sql).bind(want).fetch_one(p).await.expect("count"),
            };
            if n == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the broadcast reaches the outbox");
    // A malformed row is dead-lettered; the client's next rows still work (a new session).
    exec(&t.db, &inbox("[not json")).await;
    exec(&t.db, &inbox(r#"["1","1","room:lobby","phx_join",{"user":"sql"}]"#)).await;
    exec(&t.db, &inbox(r#"["1","3","room:lobby","new_msg",{"body":"back"}]"#)).await;
    match ws.next_chat().await {
        ServerMessage::Broadcast(b) => assert_eq!(b.payload.as_json(), Some(&json!({"body": "back", "user": "sql"}))),
        other => panic!("expected the DB client's message, got {other:?}"),
    }
    let sql = "SELECT COUNT(*) FROM fawkes_dead_letters WHERE source = 'fawkes_inbox'";
    let dead: i64 = match &t.db {
        Db::Sqlite(p) => sqlx::query_scalar(sql).fetch_one(p).await.expect("count"),
        Db::Postgres(p) => sqlx::query_scalar(sql).fetch_one(p).await.expect("count"),
    };
    assert_eq!(dead, 1, "the malformed row is recorded");
}

#[tokio::test]
async fn sqlite_a_db_client_chats_with_a_socket_client() {
    a_db_client_chats_with_a_socket_client(sqlite().await).await;
}

#[tokio::test]
async fn postgres_a_db_client_chats_with_a_socket_client() {
    if let Some(t) = postgres().await {
        a_db_client_chats_with_a_socket_client(t).await;
    }
}

/// The outbox rows of `client` after row `after`: (id, frame).
async fn outbox_after(db: &Db, client: &str, after: i64) -> Vec<(i64, String)> {
    let sql = "SELECT id, frame FROM fawkes_outbox WHERE client_id = $1 AND id > $2 AND frame IS NOT NULL ORDER BY id";
    match db {
        Db::Sqlite(p) => sqlx::query_as(sql).bind(client).bind(after).fetch_all(p).await,
        Db::Postgres(p) => sqlx::query_as(sql).bind(client).bind(after).fetch_all(p).await,
    }
    .expect("read the outbox")
}

/// Waits until `client`'s outbox after `after` holds `n` frames; returns them.
async fn outbox_frames(db: &Db, client: &str, after: i64, n: usize) -> Vec<(i64, String)> {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let rows = outbox_after(db, client, after).await;
            if rows.len() >= n {
                return rows;
            }
            // The outbox is a table: reading it is polling.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the outbox rows within 10 s")
}

async fn a_restart_resumes_joined_topics_and_answers_a_refused_join(t: TestDb) {
    let options = || DbClientsOptions::default().poll_interval(Duration::from_millis(10));
    let inbox = |frame: &str| format!("INSERT INTO fawkes_inbox (client_id, frame) VALUES ('d1', '{frame}')");
    let before = {
        let endpoint = Endpoint::builder().router(fawkes_server::demo::router()).build();
        let _clients = DbClients::start(t.db.clone(), endpoint, options()).await.expect("db clients");
        exec(&t.db, &inbox(r#"["1","1","room:kept","phx_join",{}]"#)).await;
        exec(&t.db, &inbox(r#"["2","2","room:barred","phx_join",{}]"#)).await;
        let joined = outbox_frames(&t.db, "d1", 0, 2).await;
        assert!(joined.iter().all(|(_, f)| f.contains(r#""status":"ok""#)), "both joins accepted: {joined:?}");
        joined[1].0
        // Dropped: the server stops without a goodbye, as in a crash.
    };
    // The application now refuses `room:barred`.
    let router =
        Router::new().channel("room:kept", fawkes_server::demo::Room::default).channel("room:barred", || fawkes_server::demo::Admin);
    let endpoint = Endpoint::builder().router(router).build();
    let _clients = DbClients::start(t.db.clone(), endpoint, options()).await.expect("db clients");
    exec(&t.db, &inbox(r#"["1","3","room:kept","new_msg",{"body":"still here"}]"#)).await;
    exec(&t.db, &inbox(r#"["2","4","room:barred","new_msg",{"body":"barred"}]"#)).await;
    let frames: Vec<String> = outbox_frames(&t.db, "d1", before, 4).await.into_iter().map(|(_, f)| f).collect();
    let want = [
        r#"["2","2","room:barred","phx_reply",{"response":{"reason":"unauthorized"},"status":"error"}]"#,
        r#"[null,null,"room:kept","new_msg",{"body":"still here","user":"anonymous"}]"#,
        r#"["1","3","room:kept","phx_reply",{"response":{},"status":"ok"}]"#,
        r#"[null,"4","room:barred","phx_reply",{"response":{"reason":"unmatched topic"},"status":"error"}]"#,
    ];
    for want in want {
        assert_eq!(frames.iter().filter(|f| *f == want).count(), 1, "{want} once in {frames:#?}");
    }
    assert_eq!(frames.len(), 4, "nothing else: {frames:#?}");
}

#[tokio::test]
async fn sqlite_a_restart_resumes_joined_topics_and_answers_a_refused_join() {
    a_restart_resumes_joined_topics_and_answers_a_refused_join(sqlite().await).await;
}

#[tokio::test]
async fn postgres_a_restart_resumes_joined_topics_and_answers_a_refused_join() {
    if let Some(t) = postgres().await {
        a_restart_resumes_joined_topics_and_answers_a_refused_join(t).await;
    }
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
    let (endpoint, _events) = demo(&served).await;
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

/// The database transport's client side for the conformance kit: a client id, inbox rows in,
/// outbox rows out.
mod kit {
    use std::collections::VecDeque;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    use fawkes::db::{Db, DbClients, DbClientsOptions};
    use fawkes::{Endpoint, Frame};
    use fawkes_testkit::{Capabilities, Connection, Received, Refused, Transport};

    static NEXT_CLIENT: AtomicU64 = AtomicU64::new(1);

    pub struct DbTransport {
        db: Db,
        _clients: DbClients,
    }

    pub struct DbConn {
        db: Db,
        client: String,
        seen: i64,
        received: VecDeque<Received>,
    }

    pub async fn serve(db: Db, endpoint: Endpoint) -> DbTransport {
        let options = DbClientsOptions::default().poll_interval(Duration::from_millis(10));
        let clients = DbClients::start(db.clone(), endpoint, options).await.expect("db clients");
        DbTransport { db, _clients: clients }
    }

    impl Transport for DbTransport {
        type Connection = DbConn;

        async fn connect(&self, _params: &[(&str, &str)]) -> Result<DbConn, Refused> {
            let client = format!("kit-{}", NEXT_CLIENT.fetch_add(1, Ordering::Relaxed));
            Ok(DbConn { db: self.db.clone(), client, seen: 0, received: VecDeque::new() })
        }
    }

    type Row = (i64, Option<String>, Option<String>);

    impl Connection for DbConn {
        async fn send(&mut self, frames: Vec<Frame>) {
            let sql = "INSERT INTO fawkes_inbox (client_id, frame) VALUES ($1, $2)";
            macro_rules! insert {
                ($pool:expr) => {{
                    let mut tx = $pool.begin().await.expect("begin");
                    for frame in &frames {
                        let text = String::from_utf8_lossy(frame.as_bytes()).into_owned();
                        sqlx::query(sql).bind(&self.client).bind(text).execute(&mut *tx).await.expect("insert");
                    }
                    tx.commit().await.expect("commit");
                }};
            }
            match &self.db {
                Db::Sqlite(p) => insert!(p),
                Db::Postgres(p) => insert!(p),
            }
        }

        async fn recv(&mut self) -> Received {
            let sql = "SELECT id, frame, closed FROM fawkes_outbox WHERE client_id = $1 AND id > $2 ORDER BY id";
            loop {
                if let Some(received) = self.received.pop_front() {
                    return received;
                }
                let rows: Vec<Row> = match &self.db {
                    Db::Sqlite(p) => sqlx::query_as(sql).bind(&self.client).bind(self.seen).fetch_all(p).await,
                    Db::Postgres(p) => sqlx::query_as(sql).bind(&self.client).bind(self.seen).fetch_all(p).await,
                }
                .expect("read the outbox");
                if rows.is_empty() {
                    // The outbox is a table: reading it is polling.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                for (id, frame, closed) in rows {
                    self.seen = id;
                    self.received.push_back(match (frame, closed) {
                        (_, Some(why)) => Received::Closed(why),
                        (Some(frame), None) => Received::Frame(Frame::text(frame)),
                        (None, None) => panic!("outbox row {id} has neither frame nor closed"),
                    });
                }
            }
        }

        async fn close(&mut self) {}
    }

    pub fn capabilities() -> Capabilities {
        Capabilities::all().without_binary_frames().without_connect_params().wait(Duration::from_secs(10))
    }

    pub fn check(report: &fawkes_testkit::Report) {
        eprintln!("{report}");
        let skipped: Vec<&str> = report.skipped.iter().map(|(name, _)| *name).collect();
        assert_eq!(skipped, ["refused_connect", "binary"], "rows carry a client id and text frames only");
    }
}

#[tokio::test]
async fn sqlite_passes_the_conformance_kit() {
    let t = sqlite().await;
    let report =
        fawkes_testkit::run("db-sqlite", kit::capabilities(), |endpoint| kit::serve(t.db.clone(), endpoint)).await;
    kit::check(&report);
}

#[tokio::test]
async fn postgres_passes_the_conformance_kit() {
    if let Some(t) = postgres().await {
        let report =
            fawkes_testkit::run("db-postgres", kit::capabilities(), |endpoint| kit::serve(t.db.clone(), endpoint))
                .await;
        kit::check(&report);
    }
}
