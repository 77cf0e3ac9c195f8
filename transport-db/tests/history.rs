//! The SQL history store against a real SQLite file and the machine's PostgreSQL: append and
//! read, trimming by length and age, a wiped topic's new epoch, forged positions, a restart of
//! the store, several nodes appending to one topic, and a join recovering through an endpoint.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{TestDb, exec, postgres, sqlite};
use fawkes_channel::{
    Broadcast, Channel, ConnectInfo, Endpoint, HandleIn, HistoryOptions, HistoryStore, Payload, Position, Router,
    SocketRef, reason,
};
use fawkes_serializer::{Frame, Serializer, ServerMessage};
use fawkes_transport_db::{Db, SqlHistory};
use serde_json::{Value, json};

fn kept() -> HistoryOptions {
    HistoryOptions::default().max_len(1000).max_age(Duration::from_secs(3600))
}

/// Appends `n` broadcasts `{"n": i, "pos": POS}` to `topic`; returns their positions.
async fn append(store: &SqlHistory, topic: &str, options: &HistoryOptions, n: usize) -> Vec<Position> {
    let mut positions = Vec::new();
    for i in 0..n {
        let mut make = |pos: Position| Broadcast {
            topic: topic.to_owned(),
            event: "msg".into(),
            payload: json!({"n": i, "pos": pos.to_string()}).into(),
        };
        positions.push(store.append(topic, options, &mut make).await.expect("append").position);
    }
    positions
}

fn numbers(entries: &[fawkes_channel::Entry]) -> Vec<u64> {
    entries.iter().map(|e| e.broadcast.payload.as_json().expect("JSON")["n"].as_u64().expect("n")).collect()
}

async fn appends_and_reads_back_exactly(t: TestDb) {
    let store = SqlHistory::new(t.db.clone()).await.expect("store");
    let options = kept();
    let pos = append(&store, "feed:a", &options, 5).await;
    append(&store, "feed:b", &options, 2).await;
    assert_eq!(pos.iter().map(Position::offset).collect::<Vec<_>>(), [1, 2, 3, 4, 5]);
    assert!(pos.iter().all(|p| p.epoch() == pos[0].epoch() && p.epoch() != 0));

    let read = store.read_after("feed:a", &options, Some(pos[1])).await.expect("read");
    assert!(read.recovered);
    assert_eq!(read.current, pos[4]);
    assert_eq!(numbers(&read.entries), [2, 3, 4]);
    assert_eq!(read.entries.iter().map(|e| e.position).collect::<Vec<_>>(), pos[2..]);
    let first = &read.entries[0].broadcast;
    assert_eq!((first.topic.as_str(), first.event.as_str()), ("feed:a", "msg"));
    assert_eq!(first.payload.as_json(), Some(&json!({"n": 2, "pos": pos[2].to_string()})));

    let at_end = store.read_after("feed:a", &options, Some(pos[4])).await.expect("read");
    assert!(at_end.recovered && at_end.entries.is_empty());
    let without = store.read_after("feed:a", &options, None).await.expect("read");
    assert!(!without.recovered && without.entries.is_empty());
    assert_eq!(without.current, pos[4]);

    // Binary payloads come back as they went in.
    let mut make = |_: Position| Broadcast {
        topic: "feed:a".into(),
        event: "bin".into(),
        payload: Payload::Binary(bytes::Bytes::from_static(&[0, 159, 255])),
    };
    store.append("feed:a", &options, &mut make).await.expect("append");
    let read = store.read_after("feed:a", &options, Some(pos[4])).await.expect("read");
    assert!(matches!(&read.entries[0].broadcast.payload, Payload::Binary(b) if b[..] == [0, 159, 255]));
}

#[tokio::test]
async fn sqlite_appends_and_reads_back_exactly() {
    appends_and_reads_back_exactly(sqlite().await).await;
}

#[tokio::test]
async fn postgres_appends_and_reads_back_exactly() {
    if let Some(t) = postgres().await {
        appends_and_reads_back_exactly(t).await;
    }
}

async fn keeps_max_len_broadcasts(t: TestDb) {
    let store = SqlHistory::new(t.db.clone()).await.expect("store");
    let options = kept().max_len(10);
    let pos = append(&store, "feed:len", &options, 100).await;
    let ten_back = store.read_after("feed:len", &options, Some(pos[89])).await.expect("read");
    assert!(ten_back.recovered);
    assert_eq!(numbers(&ten_back.entries), (90..100).collect::<Vec<_>>());
    let eleven_back = store.read_after("feed:len", &options, Some(pos[88])).await.expect("read");
    assert!(!eleven_back.recovered && eleven_back.entries.is_empty(), "older than what is kept");
    // The table is trimmed as appends go: never far beyond max_len.
    let rows = count(&t.db, "SELECT COUNT(*) FROM fawkes_history WHERE topic = 'feed:len'").await;
    assert!(rows <= 10 + 32, "{rows} rows kept for max_len 10");
}

#[tokio::test]
async fn sqlite_keeps_max_len_broadcasts() {
    keeps_max_len_broadcasts(sqlite().await).await;
}

#[tokio::test]
async fn postgres_keeps_max_len_broadcasts() {
    if let Some(t) = postgres().await {
        keeps_max_len_broadcasts(t).await;
    }
}

async fn keeps_nothing_older_than_max_age(t: TestDb) {
    let store = SqlHistory::new(t.db.clone()).await.expect("store");
    let options = kept().max_age(Duration::from_secs(60));
    let pos = append(&store, "feed:age", &options, 5).await;
    // The first two were written two hours ago.
    exec(&t.db, "UPDATE fawkes_history SET at_ms = at_ms - 7200000 WHERE topic = 'feed:age' AND pos <= 2").await;
    let fresh = store.read_after("feed:age", &options, Some(pos[1])).await.expect("read");
    assert!(fresh.recovered);
    assert_eq!(numbers(&fresh.entries), [2, 3, 4]);
    let stale = store.read_after("feed:age", &options, Some(pos[0])).await.expect("read");
    assert!(!stale.recovered && stale.entries.is_empty(), "broadcast 2 is too old");
    let none_kept = kept().max_age(Duration::ZERO);
    let read = store.read_after("feed:age", &none_kept, Some(pos[3])).await.expect("read");
    assert!(!read.recovered, "max_age 0 keeps nothing");
}

#[tokio::test]
async fn sqlite_keeps_nothing_older_than_max_age() {
    keeps_nothing_older_than_max_age(sqlite().await).await;
}

#[tokio::test]
async fn postgres_keeps_nothing_older_than_max_age() {
    if let Some(t) = postgres().await {
        keeps_nothing_older_than_max_age(t).await;
    }
}

async fn a_wiped_topic_has_a_new_epoch(t: TestDb) {
    let store = SqlHistory::new(t.db.clone()).await.expect("store");
    let options = kept();
    let before = append(&store, "feed:wipe", &options, 3).await;
    store.wipe("feed:wipe").await.expect("wipe");
    let read = store.read_after("feed:wipe", &options, Some(before[0])).await.expect("read");
    assert!(!read.recovered && read.entries.is_empty());
    assert_ne!(read.current.epoch(), before[0].epoch(), "a new epoch");
    assert_eq!(read.current.offset(), 0);
    let after = append(&store, "feed:wipe", &options, 1).await;
    assert_eq!(after[0], Position::new(read.current.epoch(), 1), "the epoch a join was told");

    // Deleting the topic's row by hand is a wipe too, even for a store that appended before.
    exec(&t.db, "DELETE FROM fawkes_history_topics WHERE topic = 'feed:wipe'").await;
    let again = append(&store, "feed:wipe", &options, 1).await;
    assert_ne!(again[0].epoch(), after[0].epoch());
    assert_eq!(again[0].offset(), 1);
    let read = store.read_after("feed:wipe", &options, Some(after[0])).await.expect("read");
    assert!(!read.recovered);
}

#[tokio::test]
async fn sqlite_a_wiped_topic_has_a_new_epoch() {
    a_wiped_topic_has_a_new_epoch(sqlite().await).await;
}

#[tokio::test]
async fn postgres_a_wiped_topic_has_a_new_epoch() {
    if let Some(t) = postgres().await {
        a_wiped_topic_has_a_new_epoch(t).await;
    }
}

async fn forged_positions_are_not_recovered(t: TestDb) {
    let store = SqlHistory::new(t.db.clone()).await.expect("store");
    let options = kept();
    let a = append(&store, "feed:a", &options, 3).await;
    let b = append(&store, "feed:b", &options, 3).await;
    assert_ne!(a[0].epoch(), b[0].epoch(), "topics have their own epochs");
    let forged = [
        b[0],                               // another topic's
        Position::new(a[0].epoch(), 4),     // past the end
        Position::new(a[0].epoch() ^ 1, 1), // another epoch
        Position::new(u64::MAX, u64::MAX),  // out of any column's range
        Position::new(0, 0),
    ];
    for p in forged {
        let read = store.read_after("feed:a", &options, Some(p)).await.expect("read");
        assert!(!read.recovered && read.entries.is_empty(), "{p} is not recovered");
        assert_eq!(read.current, a[2]);
    }
}

#[tokio::test]
async fn sqlite_forged_positions_are_not_recovered() {
    forged_positions_are_not_recovered(sqlite().await).await;
}

#[tokio::test]
async fn postgres_forged_positions_are_not_recovered() {
    if let Some(t) = postgres().await {
        forged_positions_are_not_recovered(t).await;
    }
}

async fn a_restarted_store_keeps_positions_valid(t: TestDb) {
    let options = kept();
    let before = {
        let store = SqlHistory::connect(&t.url).await.expect("store");
        append(&store, "feed:restart", &options, 3).await
    };
    let store = SqlHistory::connect(&t.url).await.expect("the store again");
    let read = store.read_after("feed:restart", &options, Some(before[0])).await.expect("read");
    assert!(read.recovered);
    assert_eq!(numbers(&read.entries), [1, 2]);
    let next = append(&store, "feed:restart", &options, 1).await;
    assert_eq!(next[0], Position::new(before[0].epoch(), 4), "same epoch, next offset");
}

#[tokio::test]
async fn sqlite_a_restarted_store_keeps_positions_valid() {
    a_restarted_store_keeps_positions_valid(sqlite().await).await;
}

#[tokio::test]
async fn postgres_a_restarted_store_keeps_positions_valid() {
    if let Some(t) = postgres().await {
        a_restarted_store_keeps_positions_valid(t).await;
    }
}

/// Two stores on one PostgreSQL (two nodes) appending to one topic at once: every offset once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_nodes_sharing_a_database_get_unique_ordered_offsets() {
    let Some(t) = postgres().await else { return };
    let options = kept();
    let nodes = [
        Arc::new(SqlHistory::connect(&t.url).await.expect("node 1")),
        Arc::new(SqlHistory::connect(&t.url).await.expect("node 2")),
    ];
    let tasks: Vec<_> = nodes
        .iter()
        .map(|store| {
            let store = store.clone();
            tokio::spawn(async move { append(&store, "feed:shared", &kept(), 100).await })
        })
        .collect();
    let mut offsets = Vec::new();
    for task in tasks {
        let positions = task.await.expect("appends");
        assert!(positions.windows(2).all(|w| w[0].offset() < w[1].offset()), "increasing on each node");
        offsets.extend(positions.iter().map(Position::offset));
    }
    offsets.sort_unstable();
    assert_eq!(offsets, (1..=200).collect::<Vec<_>>());
    let read = nodes[0].read_after("feed:shared", &options, Some(Position::new(0, 0))).await.expect("read");
    assert!(!read.recovered);
    let all =
        nodes[1].read_after("feed:shared", &options, Some(Position::new(read.current.epoch(), 0))).await.expect("read");
    assert!(all.recovered);
    assert_eq!(all.entries.len(), 200);
}

/// A feed as an application writes one: `since` in the join params, `{"recovered": bool}` in
/// the reply; `new_msg` broadcasts with its position.
struct Feed;

impl Channel for Feed {
    async fn join(&mut self, params: Payload, socket: &mut SocketRef) -> Result<Value, Value> {
        let since = params.as_json().and_then(|p| p.get("since")).and_then(Value::as_str).map(str::to_owned);
        let recovery = socket.recover(since.as_deref()).await.map_err(|e| reason(&e.to_string()))?;
        Ok(json!({"recovered": recovery.recovered, "pos": recovery.position.map(|p| p.to_string())}))
    }

    async fn handle_in(&mut self, _: &str, payload: Payload, socket: &mut SocketRef) -> HandleIn {
        let body = payload.as_json().and_then(|p| p.get("body")).cloned().unwrap_or(Value::Null);
        match socket
            .broadcast_with_position("new_msg", |pos| json!({"body": body, "pos": pos.to_string()}).into())
            .await
        {
            Ok(pos) => HandleIn::ok(json!({"pos": pos.to_string()})),
            Err(e) => HandleIn::error(reason(&e.to_string())),
        }
    }
}

/// An endpoint whose `feed:*` topics keep their history in `store` (`keep_in`), the rest of
/// the history topics in memory.
fn endpoint(store: SqlHistory) -> Endpoint {
    let router = Router::new().channel("feed:*", || Feed).channel("mem:*", || Feed);
    let endpoint = Endpoint::builder().router(router).history("mem:*", kept()).build();
    endpoint.history().keep_in("feed:*", kept(), Arc::new(store));
    endpoint
}

/// Joins `topic` with `params`; returns the session, its outbound queue and the reply.
async fn join(
    endpoint: &Endpoint,
    topic: &str,
    params: Value,
) -> (fawkes_channel::Session, fawkes_channel::Outbound, Value) {
    let info = ConnectInfo::new("memory", true).with_query(Some("vsn=2.0.0"));
    let mut session = endpoint.connect(info).await.expect("connect");
    let mut out = session.outbound();
    let frame = format!(r#"["1","1",{},"phx_join",{params}]"#, json!(topic));
    session.handle_frame(Frame::text(frame)).await.expect("join");
    let reply = match next(&mut out).await {
        ServerMessage::Reply(r) => r.response.as_json().cloned().expect("JSON"),
        other => panic!("expected the join reply, got {other:?}"),
    };
    (session, out, reply)
}

async fn next(out: &mut fawkes_channel::Outbound) -> ServerMessage {
    let frame = tokio::time::timeout(Duration::from_secs(10), out.recv()).await.expect("a frame").expect("open");
    Serializer::V2.decode_server(&frame).expect("decodes")
}

async fn joins_recover_through_the_store_across_a_restart(t: TestDb) {
    let topic = "feed:room";
    let seen = {
        let endpoint = endpoint(SqlHistory::connect(&t.url).await.expect("store"));
        let (mut session, mut out, reply) = join(&endpoint, topic, json!({})).await;
        assert_eq!(reply["recovered"], json!(false));
        let mut seen = Vec::new();
        for body in ["one", "two", "three"] {
            let push = format!(r#"["1","{body}",{},"new_msg",{}]"#, json!(topic), json!({"body": body}));
            session.handle_frame(Frame::text(push)).await.expect("push");
            loop {
                match next(&mut out).await {
                    ServerMessage::Reply(r) => {
                        seen.push(r.response.as_json().expect("JSON")["pos"].as_str().expect("pos").to_owned());
                        break;
                    }
                    ServerMessage::Broadcast(_) => {}
                    other => panic!("unexpected {other:?}"),
                }
            }
        }
        seen
    };
    // A new endpoint on the same database: the position of "one" recovers "two" and "three".
    let endpoint = endpoint(SqlHistory::connect(&t.url).await.expect("store again"));
    let (_session, mut out, reply) = join(&endpoint, topic, json!({"since": seen[0]})).await;
    assert_eq!(reply, json!({"recovered": true, "pos": seen[2]}));
    for (body, pos) in [("two", &seen[1]), ("three", &seen[2])] {
        match next(&mut out).await {
            ServerMessage::Broadcast(b) => {
                assert_eq!(b.payload.as_json(), Some(&json!({"body": body, "pos": pos})));
            }
            other => panic!("expected the replay, got {other:?}"),
        }
    }
    // Malformed and forged positions: not recovered, nothing replayed: the first broadcast
    // each of these joins gets is the next live one.
    let other_topic = format!("{}:{}", seen[0].split(':').next().expect("epoch"), 99);
    let mut forged = Vec::new();
    for since in [json!("garbage"), json!(""), json!("-1:2"), json!("ffffffffffffffffffff:1"), json!(other_topic)] {
        let (session, out, reply) = join(&endpoint, topic, json!({"since": since})).await;
        assert_eq!(reply, json!({"recovered": false, "pos": seen[2]}), "since {since}");
        forged.push((since, session, out));
    }
    let (mut publisher, mut publisher_out, _) = join(&endpoint, topic, json!({})).await;
    let push = format!(r#"["1","2",{},"new_msg",{}]"#, json!(topic), json!({"body": "four"}));
    publisher.handle_frame(Frame::text(push)).await.expect("push");
    let _ = next(&mut publisher_out).await;
    for (since, _session, mut out) in forged {
        match next(&mut out).await {
            ServerMessage::Broadcast(b) => {
                assert_eq!(b.payload.as_json().expect("JSON")["body"], json!("four"), "nothing replayed for {since}");
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    // A topic outside feed:* stays in memory: the SQL store never saw it.
    let (_s, _o, reply) = join(&endpoint, "mem:x", json!({})).await;
    assert_eq!(reply["recovered"], json!(false));
    let rows = count(&t.db, "SELECT COUNT(*) FROM fawkes_history_topics WHERE topic = 'mem:x'").await;
    assert_eq!(rows, 0);
}

#[tokio::test]
async fn sqlite_joins_recover_through_the_store_across_a_restart() {
    joins_recover_through_the_store_across_a_restart(sqlite().await).await;
}

#[tokio::test]
async fn postgres_joins_recover_through_the_store_across_a_restart() {
    if let Some(t) = postgres().await {
        joins_recover_through_the_store_across_a_restart(t).await;
    }
}

async fn count(db: &Db, sql: &str) -> i64 {
    match db {
        Db::Sqlite(p) => sqlx::query_scalar(sql).fetch_one(p).await.expect(sql),
        Db::Postgres(p) => sqlx::query_scalar(sql).fetch_one(p).await.expect(sql),
    }
}

/// A lazily connected store whose PostgreSQL is away: the server starts, and each operation
/// fails with an error (the History layer logs it, sends nothing, answers "not recovered").
#[tokio::test]
async fn a_lazy_store_without_its_database_fails_each_operation_with_an_error() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let store = SqlHistory::connect_lazy(&format!("postgres://postgres@127.0.0.1:{port}/none")).await.expect("lazy");
    let options = kept();
    let read = store.read_after("feed:x", &options, Some(Position::new(1, 1))).await;
    assert!(matches!(read, Err(fawkes_channel::HistoryError::Store(_))), "{read:?}");
    let mut make = |_: Position| Broadcast { topic: "feed:x".into(), event: "e".into(), payload: json!({}).into() };
    assert!(store.append("feed:x", &options, &mut make).await.is_err());
}
