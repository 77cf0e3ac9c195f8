//! The WebSocket transport over real TCP: handshake answers, close codes, hostile input. The
//! channel scenarios every transport shares run in the conformance kit (kit.rs); the close
//! handshake byte by byte is in close_handshake.rs.

mod common;

use common::{RawClient, Received, TestServer, WAIT};
use fawkes_channel::Config;
use fawkes_serializer::{ReplyStatus, ServerMessage};
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};

fn status_of(err: tungstenite::Error) -> u16 {
    match err {
        tungstenite::Error::Http(res) => res.status().as_u16(),
        other => panic!("expected an HTTP refusal, got {other:?}"),
    }
}

async fn healthy(server: &TestServer) {
    let mut c = RawClient::connect(server).await;
    let (_, reply) = c.join("test:health", json!({})).await;
    assert_eq!(reply.status, ReplyStatus::Ok, "server still serves new sockets");
}

#[tokio::test]
async fn a_foreign_origin_gets_403() {
    // Refusals by the connect callback and for the vsn are in the conformance kit (kit.rs).
    let server = TestServer::start(Config::default()).await;
    let mut req = server.url("vsn=2.0.0").into_client_request().expect("request");
    req.headers_mut().insert("origin", HeaderValue::from_static("https://evil.example"));
    let err = tokio_tungstenite::connect_async(req).await.expect_err("refused");
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
    // That other sockets are spared is the conformance kit's `malformed` scenario (kit.rs).
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
    let sent = tokio::time::timeout(WAIT, async {
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
        c.push(Some(&i.to_string()), &format!("test:{i}"), "phx_join", json!({})).await;
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
    let r = c.push(Some("0"), "test:0", "echo", json!({})).await;
    assert_eq!(c.reply_to(&r).await.status, ReplyStatus::Ok, "the flooding socket itself still works");
    healthy(&server).await;
}

#[tokio::test]
async fn a_client_that_stops_reading_is_closed_with_1008_while_the_storm_goes_on() {
    const LIMIT: usize = 16;
    const BROADCASTS: u64 = 1_000;
    const BATCH: u64 = 4;
    let server = TestServer::start(Config::default().outbound_queue_limit(LIMIT)).await;
    // A small receive buffer, so the socket holds little of what the server sends.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let stream = socket.connect(server.addr).await.expect("tcp connect");
    let (mut slow, _) = tokio_tungstenite::client_async(server.url("vsn=2.0.0"), stream).await.expect("upgrade");
    slow.send(Message::text(r#"["1","1","test:slow","phx_join",{}]"#)).await.expect("send");
    let Some(Ok(Message::Text(reply))) = slow.next().await else { panic!("no join reply") };
    assert!(reply.contains(r#""status":"ok""#), "{reply}");
    // From here on, `slow` reads nothing until the storm is over.

    // 1,000 broadcasts of 32 KiB: far more than the socket buffers between the server and `slow`
    // hold, so the server must either queue them without bound or apply its policy.
    let mut storm = RawClient::connect(&server).await;
    let (join_ref, _) = storm.join("test:slow", json!({})).await;
    let pad = "x".repeat(32 * 1024);
    for batch in 0..BROADCASTS / BATCH {
        let mut refs = Vec::new();
        for i in 0..BATCH {
            let body = json!({"seq": batch * BATCH + i, "pad": pad});
            let broadcast = json!({ "event": "new_msg", "payload": { "body": body } });
            refs.push(storm.push(Some(join_ref.as_str()), "test:slow", "broadcast", broadcast).await);
        }
        for r in &refs {
            assert_eq!(storm.reply_to(r).await.status, ReplyStatus::Ok, "the storming client is served throughout");
        }
    }

    // `slow` now gets what was in flight when the server gave up on it, in order with no gap,
    // then the close: far fewer than were broadcast, so the server did not queue the rest.
    let mut received = 0u64;
    loop {
        let next = tokio::time::timeout(WAIT, slow.next()).await.expect("a frame or the close");
        match next {
            Some(Ok(Message::Text(text))) => {
                let frame: serde_json::Value = serde_json::from_str(&text).expect("JSON");
                assert_eq!(frame[3], "new_msg", "{}", &text[..text.len().min(200)]);
                assert_eq!(frame[4]["body"]["seq"].as_u64(), Some(received), "in order, none skipped");
                received += 1;
            }
            Some(Ok(Message::Close(frame))) => {
                let code = frame.map(|f| u16::from(f.code));
                assert_eq!(code, Some(1008), "closed as a slow consumer (policy violation)");
                break;
            }
            other => panic!("expected broadcasts then a close, got {other:?}"),
        }
    }
    assert!(
        received < BROADCASTS / 2,
        "the slow client got {received} of {BROADCASTS}: the server queued without bound"
    );
    healthy(&server).await;
}

/// A WebSocket client connecting from `ip` (a loopback address).
async fn connect_from(
    server: &TestServer,
    ip: [u8; 4],
) -> Result<tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>, tungstenite::Error> {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.bind((std::net::Ipv4Addr::from(ip), 0).into()).expect("bind a loopback source address");
    let stream = socket.connect(server.addr).await.expect("tcp connect");
    tokio_tungstenite::client_async(server.url("vsn=2.0.0"), stream).await.map(|(ws, _)| ws)
}

#[tokio::test]
async fn connections_past_the_per_ip_limit_get_403() {
    let server = TestServer::start(Config::default().max_connections_per_ip(Some(2))).await;
    let mut first = connect_from(&server, [127, 0, 0, 1]).await.expect("first from 127.0.0.1");
    let second = connect_from(&server, [127, 0, 0, 1]).await.expect("second from 127.0.0.1");
    let refused = connect_from(&server, [127, 0, 0, 1]).await.expect_err("third from 127.0.0.1 refused");
    assert_eq!(status_of(refused), 403);
    let other = connect_from(&server, [127, 0, 0, 2]).await.expect("another address has its own count");
    assert_eq!(server.endpoint.connected(), 3);

    // A socket that closes gives its place back.
    first.close(None).await.expect("close");
    while let Some(Ok(_)) = first.next().await {}
    drop((second, other));
    tokio::time::timeout(WAIT, server.endpoint.drained()).await.expect("every socket ends");
    connect_from(&server, [127, 0, 0, 1]).await.expect("room again after the others left");
}

#[tokio::test]
async fn a_client_close_gets_the_close_handshake_and_a_clean_end() {
    let server = TestServer::start(Config::default()).await;
    let (mut ws, _) = tokio_tungstenite::connect_async(server.url("vsn=2.0.0")).await.expect("connect");
    let bye = CloseFrame { code: CloseCode::Normal, reason: "bye".into() };
    ws.close(Some(bye.clone())).await.expect("send the close frame");
    let answer = tokio::time::timeout(WAIT, ws.next()).await.expect("an answer");
    assert!(matches!(answer, Some(Ok(Message::Close(Some(ref frame)))) if *frame == bye), "{answer:?}");
    // Then the server ends the TCP connection: the stream ends without an error (not 1006).
    let end = tokio::time::timeout(WAIT, ws.next()).await.expect("the connection ends");
    assert!(end.is_none(), "{end:?}");
    tokio::time::timeout(WAIT, server.endpoint.drained()).await.expect("the socket ends");
}
