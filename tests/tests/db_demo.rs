//! The demo app's rooms fed by the `fawkes_events` table stream (`fawkes_server::demo::router_with_events`),
//! on a temporary SQLite file. The table stream itself is tested in `fawkes-transport-db`.

use std::time::Duration;

use fawkes::db::{Db, StreamOptions, TableStream};
use fawkes::{ConnectInfo, Endpoint, Frame};
use fawkes_serializer::{Serializer, ServerMessage};
use serde_json::{Value, json};

struct TempDir(std::path::PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn insert_event(db: &Db, topic: &str, payload: &str) -> i64 {
    let Db::Sqlite(pool) = db else { unreachable!("a SQLite file") };
    sqlx::query_scalar("INSERT INTO fawkes_events (topic, event, payload) VALUES ($1, 'headline', $2) RETURNING id")
        .bind(topic)
        .bind(payload)
        .fetch_one(pool)
        .await
        .expect("insert event")
}

#[tokio::test]
async fn a_named_join_gets_the_rows_after_its_last_event_id_then_presence_then_live_rows() {
    let dir = TempDir(std::env::temp_dir().join(format!("fawkes-db-demo-{}", rand::random::<u64>())));
    std::fs::create_dir_all(&dir.0).expect("temp dir");
    let db = Db::connect(&format!("sqlite://{}", dir.0.join("demo.db").display())).await.expect("sqlite");
    let options = StreamOptions::table("fawkes_events").poll_interval(Duration::from_millis(20));
    let events = TableStream::start(db.clone(), options).await.expect("stream");
    let endpoint = Endpoint::builder().router(fawkes_server::demo::router_with_events(events.clone())).build();

    let seen = insert_event(&db, "room:news", r#"{"title":"seen"}"#).await;
    let missed = insert_event(&db, "room:news", r#"{"title":"missed"}"#).await;
    insert_event(&db, "room:other", "{}").await;
    while events.position() < missed {
        tokio::task::yield_now().await;
    }

    let info = ConnectInfo::new("memory", true).with_query(Some("vsn=2.0.0"));
    let mut session = endpoint.connect(info).await.expect("connect");
    let mut out = session.outbound();
    let join = format!(r#"["1","1","room:news","phx_join",{}]"#, json!({"user": "ann", "last_event_id": seen}));
    session.handle_frame(Frame::text(join)).await.expect("join");
    let mut next = async || {
        let frame =
            tokio::time::timeout(Duration::from_secs(10), out.recv()).await.expect("a frame in 10 s").expect("open");
        Serializer::V2.decode_server(&frame).expect("decodes")
    };
    assert!(matches!(next().await, ServerMessage::Reply(r) if r.status == fawkes::ReplyStatus::Ok));

    let live = insert_event(&db, "room:news", r#"{"title":"live"}"#).await;
    let (mut presence_state, mut ann_listed, mut rows) = (None, false, Vec::<(String, Value)>::new());
    while rows.len() < 2 || !ann_listed {
        match next().await {
            ServerMessage::Broadcast(b) if b.event == "presence_state" => {
                // The replay goes out right after the reply, before after_join pushes the state.
                assert_eq!(rows.len(), 1, "presence_state after the replayed row, before the live one");
                let state = b.payload.as_json().cloned().expect("JSON");
                ann_listed |= state.get("ann").is_some();
                presence_state = Some(state);
            }
            // ann is in the state, or in the diff of her own join's window after it.
            ServerMessage::Broadcast(b) if b.event == "presence_diff" => {
                ann_listed |= b.payload.as_json().is_some_and(|d| d["joins"].get("ann").is_some());
            }
            ServerMessage::Broadcast(b) => rows.push((b.event, b.payload.as_json().cloned().expect("JSON"))),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(presence_state.is_some(), "presence_state sent");
    assert_eq!(
        rows,
        [
            ("headline".to_owned(), json!({"id": missed, "data": {"title": "missed"}})),
            ("headline".to_owned(), json!({"id": live, "data": {"title": "live"}})),
        ],
        "the row after last_event_id, then the live row; nothing of other topics"
    );
}
