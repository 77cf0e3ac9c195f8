//! Database clients against a real SQLite file and the machine's PostgreSQL: a client chatting
//! with a socket client through inbox and outbox rows, and a restart that joins its topics again.

mod common;

use std::time::Duration;

use common::{Admin, Client, Room, TestDb, chat, exec, postgres, router, sqlite};
use fawkes_channel::{Endpoint, Router};
use fawkes_serializer::{Frame, ServerMessage};
use fawkes_transport_db::{Db, DbClients, DbClientsOptions};
use serde_json::json;

async fn a_db_client_chats_with_a_socket_client(t: TestDb) {
    let (endpoint, _events) = chat(&t.db).await;
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
        let endpoint = Endpoint::builder().router(router()).build();
        let _clients = DbClients::start(t.db.clone(), endpoint, options()).await.expect("db clients");
        exec(&t.db, &inbox(r#"["1","1","room:kept","phx_join",{}]"#)).await;
        exec(&t.db, &inbox(r#"["2","2","room:barred","phx_join",{}]"#)).await;
        let joined = outbox_frames(&t.db, "d1", 0, 2).await;
        assert!(joined.iter().all(|(_, f)| f.contains(r#""status":"ok""#)), "both joins accepted: {joined:?}");
        joined[1].0
        // Dropped: the server stops without a goodbye, as in a crash.
    };
    // The application now refuses `room:barred`.
    let router = Router::new().channel("room:kept", Room::default).channel("room:barred", || Admin);
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
