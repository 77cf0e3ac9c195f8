//! The WebSocket close handshake (RFC 6455 §5.5.1, §7.1), as a raw client sees it on the wire:
//! the exact close frame the server sends, and the end of the connection after it.
//!
//! Each connection runs over an in-memory pipe served by hyper, so tokio's paused clock drives
//! heartbeats and the close grace period without real waits.

use std::convert::Infallible;
use std::time::Duration;

use fawkes_channel::{Config, Endpoint, Router};
use fawkes_testkit::TestChannel;
use fawkes_transport_ws::WebSocketService;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, DuplexStream};

const TEXT: u8 = 0x1;
const CLOSE: u8 = 0x8;
/// Longer than anything the server waits for: a test that reaches it has failed.
const PATIENCE: Duration = Duration::from_secs(60);

fn endpoint(config: Config) -> Endpoint {
    Endpoint::builder().router(Router::new().channel("test:*", TestChannel::default)).config(config).build()
}

/// A raw WebSocket client on an in-memory connection to `endpoint`.
struct Client {
    io: DuplexStream,
}

impl Client {
    /// Upgrades a connection; `buffer` is how many bytes the pipe holds in each direction.
    async fn connect(endpoint: &Endpoint, buffer: usize) -> Client {
        let (mut io, server_io) = tokio::io::duplex(buffer);
        let service = WebSocketService::new(endpoint.clone());
        tokio::spawn(async move {
            let handler = hyper::service::service_fn(move |req| {
                let service = service.clone();
                async move { Ok::<_, Infallible>(service.handle(req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(server_io), handler);
            let _ = conn.with_upgrades().await;
        });
        io.write_all(
            b"GET /socket/websocket?vsn=2.0.0 HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n\
              Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )
        .await
        .expect("write the upgrade request");
        // Byte by byte, so that nothing after the response's head is consumed.
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            head.push(io.read_u8().await.expect("read the upgrade response"));
        }
        let head = String::from_utf8_lossy(&head);
        assert!(head.starts_with("HTTP/1.1 101"), "the upgrade is accepted: {head}");
        Client { io }
    }

    /// Sends one masked frame with FIN set.
    async fn send(&mut self, opcode: u8, payload: &[u8]) {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        let mut frame = vec![0x80 | opcode];
        match payload.len() {
            n @ 0..=125 => frame.push(0x80 | n as u8),
            n @ 126..=0xffff => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                frame.push(0x80 | 127);
                frame.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.io.write_all(&frame).await.expect("send a frame");
    }

    /// The next frame the server sends, as its bytes on the wire (header included).
    async fn frame(&mut self) -> Vec<u8> {
        let next = async {
            let mut wire = vec![0u8; 2];
            self.io.read_exact(&mut wire).await.expect("a frame header");
            assert_eq!(wire[1] & 0x80, 0, "server frames are not masked");
            let len = match wire[1] & 0x7f {
                126 => {
                    let n = self.io.read_u16().await.expect("a 16-bit length");
                    wire.extend_from_slice(&n.to_be_bytes());
                    usize::from(n)
                }
                127 => {
                    let n = self.io.read_u64().await.expect("a 64-bit length");
                    wire.extend_from_slice(&n.to_be_bytes());
                    usize::try_from(n).expect("a length that fits")
                }
                n => usize::from(n),
            };
            let start = wire.len();
            wire.resize(start + len, 0);
            self.io.read_exact(&mut wire[start..]).await.expect("a frame payload");
            wire
        };
        tokio::time::timeout(PATIENCE, next).await.expect("the server sends a frame")
    }

    /// Skips data frames until a close frame; returns its bytes.
    async fn close_frame(&mut self) -> Vec<u8> {
        loop {
            let frame = self.frame().await;
            if frame[0] & 0x0f == CLOSE {
                return frame;
            }
        }
    }

    /// Waits for the server to end the connection: true at the end of the stream, false when
    /// more bytes arrive.
    async fn ended(&mut self) -> bool {
        let mut byte = [0u8; 1];
        let read =
            tokio::time::timeout(PATIENCE, self.io.read(&mut byte)).await.expect("the server ends the connection");
        read.expect("a clean end, not an error") == 0
    }
}

/// A close frame as the server puts it on the wire: FIN + close, unmasked length, code, reason.
fn close_frame(code: u16, reason: &str) -> Vec<u8> {
    let mut frame = vec![0x80 | CLOSE, 2 + reason.len() as u8];
    frame.extend_from_slice(&code.to_be_bytes());
    frame.extend_from_slice(reason.as_bytes());
    frame
}

fn close_payload(code: u16, reason: &str) -> Vec<u8> {
    let mut payload = code.to_be_bytes().to_vec();
    payload.extend_from_slice(reason.as_bytes());
    payload
}

#[tokio::test(start_paused = true)]
async fn a_client_close_is_answered_with_its_code_then_the_connection_ends() {
    let endpoint = endpoint(Config::default());
    for (code, reason) in [(1000, "bye"), (1001, "page closed"), (4000, "")] {
        let mut client = Client::connect(&endpoint, 64 * 1024).await;
        client.send(CLOSE, &close_payload(code, reason)).await;
        assert_eq!(client.frame().await, close_frame(code, reason), "the close answer echoes {code}");
        assert!(client.ended().await, "after its close answer the server ends the connection ({code})");
    }

    // A close frame without a status code gets one without a status code.
    let mut client = Client::connect(&endpoint, 64 * 1024).await;
    client.send(CLOSE, &[]).await;
    assert_eq!(client.frame().await, [0x80 | CLOSE, 0]);
    assert!(client.ended().await);

    tokio::time::timeout(PATIENCE, endpoint.drained()).await.expect("every socket ends");
}

#[tokio::test(start_paused = true)]
async fn a_joined_client_close_is_answered_too() {
    let endpoint = endpoint(Config::default());
    let mut client = Client::connect(&endpoint, 64 * 1024).await;
    client.send(TEXT, br#"["1","1","test:room","phx_join",{}]"#).await;
    let reply = client.frame().await;
    assert!(String::from_utf8_lossy(&reply).contains(r#""status":"ok""#), "joined");
    client.send(CLOSE, &close_payload(1000, "")).await;
    assert_eq!(client.frame().await, close_frame(1000, ""));
    assert!(client.ended().await);
    tokio::time::timeout(PATIENCE, endpoint.drained()).await.expect("the socket ends");
}

/// After the server's close frame, the client answers and the server ends the connection.
async fn answer_and_expect_the_end(client: &mut Client, code: u16) {
    client.send(CLOSE, &close_payload(code, "")).await;
    assert!(client.ended().await, "after the close handshake the server ends the connection ({code})");
}

#[tokio::test(start_paused = true)]
async fn shutdown_sends_1001_then_ends_the_connection() {
    let endpoint = endpoint(Config::default());
    let mut client = Client::connect(&endpoint, 64 * 1024).await;
    endpoint.shutdown();
    assert_eq!(client.close_frame().await, close_frame(1001, "server shutting down"));
    answer_and_expect_the_end(&mut client, 1001).await;
}

#[tokio::test(start_paused = true)]
async fn a_heartbeat_timeout_sends_1000_then_ends_the_connection() {
    let endpoint = endpoint(Config::default().heartbeat_timeout(Duration::from_secs(30)));
    let mut client = Client::connect(&endpoint, 64 * 1024).await;
    let started = tokio::time::Instant::now();
    assert_eq!(client.close_frame().await, close_frame(1000, "heartbeat timeout"));
    assert!(started.elapsed() >= Duration::from_secs(30), "not before the heartbeat timeout");
    answer_and_expect_the_end(&mut client, 1000).await;
}

#[tokio::test(start_paused = true)]
async fn a_slow_consumer_gets_1008_after_what_was_in_flight() {
    let endpoint = endpoint(Config::default().outbound_queue_limit(4));
    // A pipe that holds little, so the server's writes wait on this client.
    let mut client = Client::connect(&endpoint, 1024).await;
    client.send(TEXT, br#"["1","1","test:slow","phx_join",{}]"#).await;
    let reply = client.frame().await;
    assert!(String::from_utf8_lossy(&reply).contains(r#""status":"ok""#), "joined");
    // The client reads nothing while the broadcasts pile up.
    let pad = "x".repeat(512);
    for seq in 0..100 {
        endpoint.pubsub().broadcast("test:slow", "news", serde_json::json!({ "seq": seq, "pad": pad }));
        tokio::task::yield_now().await;
    }
    let mut data_frames = 0;
    let close = loop {
        let frame = client.frame().await;
        match frame[0] & 0x0f {
            TEXT => data_frames += 1,
            CLOSE => break frame,
            other => panic!("unexpected opcode {other}"),
        }
    };
    assert_eq!(close, close_frame(1008, "slow consumer"));
    assert!(data_frames < 100, "the server gave up on the client ({data_frames} of 100 delivered)");
    answer_and_expect_the_end(&mut client, 1008).await;
}

#[tokio::test(start_paused = true)]
async fn a_slow_consumer_that_never_reads_again_is_dropped_after_the_write_grace() {
    let endpoint = endpoint(Config::default().outbound_queue_limit(4));
    let mut client = Client::connect(&endpoint, 1024).await;
    client.send(TEXT, br#"["1","1","test:slow","phx_join",{}]"#).await;
    let reply = client.frame().await;
    assert!(String::from_utf8_lossy(&reply).contains(r#""status":"ok""#), "joined");
    // The client stops reading for good: the server's write waits on it when the queue overflows.
    let pad = "x".repeat(512);
    for seq in 0..100 {
        endpoint.pubsub().broadcast("test:slow", "news", serde_json::json!({ "seq": seq, "pad": pad }));
        tokio::task::yield_now().await;
    }
    assert_eq!(endpoint.slow_consumers(), 1);
    let closed = tokio::time::Instant::now();
    // The waiting write never learns of the close by itself; it is given 10 s, then the
    // connection and the session are dropped.
    tokio::time::timeout(PATIENCE, endpoint.drained()).await.expect("the stalled socket is dropped");
    let after = closed.elapsed();
    assert!((Duration::from_secs(10)..Duration::from_secs(11)).contains(&after), "dropped after {after:?}");
    // What the pipe held is still there to read, then the end; no close frame could be written.
    let mut rest = Vec::new();
    tokio::time::timeout(PATIENCE, client.io.read_to_end(&mut rest)).await.expect("the end").expect("read");
    assert!(!rest.windows(2).any(|w| w == [0x80 | CLOSE, 15]), "no close frame");
}

#[tokio::test(start_paused = true)]
async fn a_frame_over_the_limit_gets_1009_then_the_connection_ends() {
    let endpoint = endpoint(Config::default().max_frame_size(1024));
    let mut client = Client::connect(&endpoint, 64 * 1024).await;
    client.send(TEXT, &[b'x'; 2000]).await;
    assert_eq!(client.close_frame().await, close_frame(1009, "frame of 2000 bytes exceeds 1024"));
    answer_and_expect_the_end(&mut client, 1009).await;
}

#[tokio::test(start_paused = true)]
async fn a_malformed_frame_gets_1011_then_the_connection_ends() {
    let endpoint = endpoint(Config::default());
    let mut client = Client::connect(&endpoint, 64 * 1024).await;
    client.send(TEXT, b"not json").await;
    assert_eq!(client.close_frame().await, close_frame(1011, "malformed frame"));
    answer_and_expect_the_end(&mut client, 1011).await;
}

#[tokio::test(start_paused = true)]
async fn a_client_that_never_answers_is_dropped_after_a_grace_period() {
    let endpoint = endpoint(Config::default());
    let mut client = Client::connect(&endpoint, 64 * 1024).await;
    endpoint.shutdown();
    assert_eq!(client.close_frame().await, close_frame(1001, "server shutting down"));
    let sent = tokio::time::Instant::now();
    // No answer: the server waits a little for one, then drops the connection.
    assert!(client.ended().await, "the connection ends without an answer");
    let waited = sent.elapsed();
    assert!(
        waited >= Duration::from_secs(1) && waited <= Duration::from_secs(10),
        "the server waited {waited:?} for the answer"
    );
    tokio::time::timeout(PATIENCE, endpoint.drained()).await.expect("the socket ends");
}
