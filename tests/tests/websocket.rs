//! The WebSocket transport over real TCP: handshake answers, close codes, hostile input. The
//! channel scenarios every transport shares run in the conformance kit (kit_ws.rs).

use fawkes::Config;
use fawkes_serializer::{ReplyStatus, Serializer, ServerMessage};
use fawkes_tests::{RawClient, Received, TestServer};
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{self, Message};

fn status_of(err: tungstenite::Error) -> u16 {
    match err {
        tungstenite::Error::Http(res) => res.status().as_u16(),
        other => panic!("expected an HTTP refusal, got {other:?}"),
    }
}

async fn healthy(server: &TestServer) {
    let mut c = RawClient::connect(server).await;
    let (_, reply) = c.join("room:health", json!({})).await;
    assert_eq!(reply.status, ReplyStatus::Ok, "server still serves new sockets");
}

#[tokio::test]
async fn a_foreign_origin_gets_403() {
    // Refusals by the connect callback and for the vsn are in the conformance kit (kit_ws.rs).
    let server = TestServer::start(Config::default()).await;
    let mut req = server.url("vsn=2.0.0").into_client_request().expect("request");
    req.headers_mut().insert("origin", HeaderValue::from_static("https://evil.example"));
    let err = tokio_tungstenite::connect_async(req).await.err().expect("refused");
    assert_eq!(status_of(err), 403, "foreign origin");
    let mut req = server.url("vsn=2.0.0").into_client_request().expect("request");
    let own = format!("http://{}", server.addr);
    req.headers_mut().insert("origin", HeaderValue::from_str(&own).expect("header"));
    assert!(tokio_tungstenite::connect_async(req).await.is_ok(), "same-host origin is allowed");
}

#[tokio::test]
async fn a_plain_get_is_not_an_upgrade() {
    let server = TestServer::start(Config::default()).await;
    let mut tcp = tokio::net::TcpStream::connect(server.addr).await.expect("connect");
    tcp.write_all(b"GET /socket/websocket HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.expect("write");
    let mut response = String::new();
    tcp.read_to_string(&mut response).await.expect("read");
    assert!(response.starts_with("HTTP/1.1 400"), "{response}");
}

#[tokio::test]
async fn the_phoenix_subprotocol_is_echoed_and_the_token_reaches_connect() {
    let server = TestServer::start(Config::default()).await;
    let mut req = server.url("vsn=2.0.0&room=1").into_client_request().expect("request");
    // "s3cr3t token" in base64url without padding.
    req.headers_mut()
        .insert("sec-websocket-protocol", HeaderValue::from_static("phoenix, base64url.bearer.phx.czNjcjN0IHRva2Vu"));
    let (mut ws, res) = tokio_tungstenite::connect_async(req).await.expect("accepted");
    assert_eq!(res.headers().get("sec-websocket-protocol").map(|v| v.as_bytes()), Some(&b"phoenix"[..]));
    ws.send(Message::text(r#"["1","1","test:whoami","phx_join",{}]"#)).await.expect("send");
    let Some(Ok(Message::Text(reply))) = ws.next().await else { panic!("no reply") };
    let reply: serde_json::Value = serde_json::from_str(&reply).expect("json");
    assert_eq!(reply[4]["response"]["token"], "s3cr3t token");
    assert_eq!(reply[4]["response"]["params"], json!({"room": "1"}));
}

#[tokio::test]
async fn malformed_frames_close_with_1011() {
    // That other sockets are spared is the conformance kit's `malformed` scenario (kit_ws.rs).
    let server = TestServer::start(Config::default()).await;
    for bad in ["not json", r#"["1","2","room:x"]"#, r#"{"topic":"room:x"}"#] {
        let mut victim = RawClient::connect(&server).await;
        victim.send_text(bad).await;
        assert_eq!(victim.closed().await, Some(1011), "{bad}");
    }
    let mut victim = RawClient::connect(&server).await;
    victim.send_raw(Message::Binary(vec![7u8, 1, 2].into())).await;
    assert_eq!(victim.closed().await, Some(1011), "bad binary kind");
}

#[tokio::test]
async fn a_100_mb_frame_is_refused_without_being_read() {
    let server = TestServer::start(Config::default()).await;
    let c = RawClient::connect(&server).await;
    let huge = vec![b'x'; 100 * 1024 * 1024];
    // The server closes after reading the frame header, so the client's write may fail midway.
    let sent = tokio::time::timeout(fawkes_tests::WAIT, async {
        let mut ws = c;
        let _ = ws.send_raw_checked(Message::Binary(huge.into())).await;
        ws
    })
    .await;
    if let Ok(mut c) = sent {
        match c.recv().await {
            Some(Received::Closed(code)) => {
                assert!(code.is_none() || code == Some(1009), "close code {code:?}")
            }
            other => panic!("expected the socket to close, got {other:?}"),
        }
    }
    healthy(&server).await;
    assert!(server.endpoint.connected() <= 1);
}

#[tokio::test]
async fn a_flood_of_joins_gets_errors_not_a_dead_server() {
    let server = TestServer::start(Config::default()).await;
    let mut c = RawClient::connect(&server).await;
    for i in 0..2000 {
        c.push(Some(&i.to_string()), &format!("room:{i}"), "phx_join", json!({})).await;
    }
    let (mut ok, mut limited) = (0, 0);
    for _ in 0..2000 {
        match c.message().await {
            ServerMessage::Reply(r) if r.status == ReplyStatus::Ok => ok += 1,
            ServerMessage::Reply(r) => {
                let why = r.response.as_json().and_then(|v| v["reason"].as_str()).unwrap_or_default().to_owned();
                assert!(why == "join rate exceeded" || why == "too many channels", "{why}");
                limited += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(ok, Config::default().max_channels_per_socket);
    assert_eq!(ok + limited, 2000);
    let r = c.push(Some("0"), "room:0", "ping", json!({})).await;
    assert_eq!(c.reply_to(&r).await.status, ReplyStatus::Ok, "the flooding socket itself still works");
    healthy(&server).await;
}

#[tokio::test]
async fn shutdown_tells_every_client_with_1001() {
    let server = TestServer::start(Config::default()).await;
    let mut a = RawClient::connect(&server).await;
    a.join("room:bye", json!({})).await;
    let mut b = RawClient::connect_url(&server.url("vsn=1.0.0"), Serializer::V1).await.expect("v1");
    let shutdown = tokio::spawn(server.shutdown());
    assert_eq!(a.closed().await, Some(1001));
    assert_eq!(b.closed().await, Some(1001));
    tokio::time::timeout(fawkes_tests::WAIT, shutdown).await.expect("shutdown finishes").expect("no panic");
}
