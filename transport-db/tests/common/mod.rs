//! What the database transport's tests share: a database per test (a temporary SQLite file, or a
//! fresh PostgreSQL database), an in-memory V2 client, and a small chat application.
//!
//! PostgreSQL is read from `FAWKES_TEST_POSTGRES` (default `postgres://postgres@127.0.0.1:5432/test`);
//! each test makes a database of its own and drops it. When PostgreSQL is unreachable the
//! PostgreSQL tests fail under `CI=true` and print a loud SKIP otherwise.
#![allow(dead_code)]

use std::time::Duration;

use fawkes_channel::{
    Channel, Config, ConnectInfo, Endpoint, HandleIn, Outbound, Payload, ReplyStatus, Router, Session, SocketRef,
    reason,
};
use fawkes_serializer::{Frame, Serializer, ServerMessage};
use fawkes_transport_db::{Db, StreamOptions, TableStream};
use serde_json::{Value, json};

/// A database for one test; dropped (PostgreSQL) or deleted (SQLite) afterwards.
pub struct TestDb {
    pub db: Db,
    pub url: String,
    cleanup: Option<(String, String)>,
    _dir: Option<TempDir>,
}

struct TempDir(std::path::PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub async fn sqlite() -> TestDb {
    let dir = std::env::temp_dir().join(format!("fawkes-db-test-{}", rand::random::<u64>()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let url = format!("sqlite://{}", dir.join("test.db").display());
    TestDb { db: Db::connect(&url).await.expect("sqlite"), url, cleanup: None, _dir: Some(TempDir(dir)) }
}

pub async fn postgres() -> Option<TestDb> {
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

pub async fn exec(db: &Db, sql: &str) {
    match db {
        Db::Sqlite(p) => drop(sqlx::query(sql).execute(p).await.expect(sql)),
        Db::Postgres(p) => drop(sqlx::query(sql).execute(p).await.expect(sql)),
    }
}

pub async fn insert_event(db: &Db, topic: &str, event: &str, payload: &str) -> i64 {
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

/// An in-memory V2 client of the chat application below.
pub struct Client {
    pub session: Session,
    out: Outbound,
}

impl Client {
    pub async fn join(endpoint: &Endpoint, topic: &str, params: Value) -> Client {
        let info = ConnectInfo::new("memory", true).with_query(Some("vsn=2.0.0"));
        let mut session = endpoint.connect(info).await.expect("connect");
        let out = session.outbound();
        let join = format!(r#"["1","1",{},"phx_join",{params}]"#, json!(topic));
        session.handle_frame(Frame::text(join)).await.expect("join");
        let mut client = Client { session, out };
        assert!(matches!(client.next().await, ServerMessage::Reply(r) if r.status == ReplyStatus::Ok));
        client
    }

    pub async fn next(&mut self) -> ServerMessage {
        let frame = tokio::time::timeout(Duration::from_secs(10), self.out.recv())
            .await
            .expect("a frame in 10 s")
            .expect("open");
        Serializer::V2.decode_server(&frame).expect("decodes")
    }

    /// The next message that is not Presence (`presence_state`, `presence_diff`), should the
    /// application send any.
    pub async fn next_chat(&mut self) -> ServerMessage {
        loop {
            match self.next().await {
                ServerMessage::Push(p) if p.event.starts_with("presence_") => continue,
                ServerMessage::Broadcast(b) if b.event.starts_with("presence_") => continue,
                other => return other,
            }
        }
    }

    /// The next stream message: (event, id, data).
    pub async fn event(&mut self) -> (String, i64, Value) {
        match self.next().await {
            ServerMessage::Broadcast(b) => {
                let body = b.payload.as_json().cloned().expect("JSON");
                (b.event, body["id"].as_i64().expect("id"), body["data"].clone())
            }
            other => panic!("expected a stream broadcast, got {other:?}"),
        }
    }
}

/// A chat room, as an application would write one over this crate.
///
/// Join params may carry `{"user": string}` (default `"anonymous"`) and, with a table stream,
/// `{"last_event_id": N}`: every row of the topic with id > N first, then live rows (without
/// it, rows from the moment of the join on). `new_msg` `{"body": ...}` broadcasts `new_msg`
/// `{"body": ..., "user": ...}` and replies ok `{}`; any other event replies an error.
#[derive(Debug, Default)]
pub struct Room {
    user: String,
    events: Option<TableStream>,
}

impl Room {
    /// A room fed by `events`.
    pub fn with_events(events: TableStream) -> Room {
        Room { events: Some(events), ..Room::default() }
    }
}

impl Channel for Room {
    async fn join(&mut self, params: Payload, socket: &mut SocketRef) -> Result<Value, Value> {
        let params = params.as_json();
        let user = params.and_then(|p| p.get("user")).and_then(Value::as_str);
        self.user = user.unwrap_or("anonymous").to_owned();
        if let Some(events) = &self.events {
            let last_event_id = params.and_then(|p| p.get("last_event_id")).and_then(Value::as_i64);
            events.recover(socket, last_event_id).await.map_err(|e| reason(&e.to_string()))?;
        }
        Ok(json!({}))
    }

    async fn handle_in(&mut self, event: &str, payload: Payload, socket: &mut SocketRef) -> HandleIn {
        match event {
            "new_msg" => {
                let body = payload.as_json().and_then(|p| p.get("body")).cloned().unwrap_or(Value::Null);
                socket.broadcast("new_msg", json!({"body": body, "user": self.user}));
                HandleIn::ok(json!({}))
            }
            _ => HandleIn::error(reason("unknown event")),
        }
    }
}

/// A topic nobody may join.
#[derive(Debug, Default)]
pub struct Admin;

impl Channel for Admin {
    async fn join(&mut self, _: Payload, _: &mut SocketRef) -> Result<Value, Value> {
        Err(reason("unauthorized"))
    }

    async fn handle_in(&mut self, _: &str, _: Payload, _: &mut SocketRef) -> HandleIn {
        HandleIn::error(reason("unauthorized"))
    }
}

/// `room:*` as [`Room`], `admin:*` as [`Admin`].
pub fn router() -> Router {
    Router::new().channel("room:*", Room::default).channel("admin:*", || Admin)
}

/// An endpoint whose rooms are fed by a stream of `fawkes_events`, and the stream.
pub async fn chat(db: &Db) -> (Endpoint, TableStream) {
    chat_with(db, StreamOptions::table("fawkes_events").poll_interval(Duration::from_millis(20))).await
}

/// [`chat`] with a stream of these options.
pub async fn chat_with(db: &Db, options: StreamOptions) -> (Endpoint, TableStream) {
    let events = TableStream::start(db.clone(), options).await.expect("stream");
    let stream = events.clone();
    let router = Router::new()
        .channel("room:*", move || Room { events: Some(stream.clone()), ..Room::default() })
        .channel("admin:*", || Admin);
    let endpoint = Endpoint::builder().router(router).config(Config::default()).build();
    (endpoint, events)
}
