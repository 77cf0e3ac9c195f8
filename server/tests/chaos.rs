//! The chaos suite: hostile and slow peers against the `fawkes serve` app on a real socket, each
//! with a healthy client chatting alongside that must lose nothing.
//!
//! Each row is one attack. The healthy client joins `room:chaos`, pushes a `ping` every 20 ms and
//! reads everything; at the end every ping has its reply and every broadcast it was sent arrived.
//! The rows that need the real binary (SIGTERM, exit times) live in `shutdown.rs`; the slowloris
//! and idle rows in `timeouts.rs`; origins and connect floods in `hostile.rs`; protocol errors in
//! `fawkes-transport-ws`'s `protocol_errors.rs`. The long runs (memory after load, thousands of
//! stalled streams) are the documented command in `docs/operations.md`.

use std::io::{Read as _, Write as _};
use std::net::SocketAddr;
use std::time::Duration;

use fawkes::{Config, Endpoint};
use fawkes_server::ServeOptions;
use futures_util::{SinkExt as _, StreamExt as _};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_tungstenite::tungstenite::Message;

const WAIT: Duration = Duration::from_secs(20);

struct Harness {
    addr: SocketAddr,
    endpoint: Endpoint,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn start(config: Config) -> Harness {
    let endpoint = Endpoint::builder().router(fawkes_server::demo::router()).config(config).build();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let app = fawkes_server::app(endpoint.clone());
    let serving = endpoint.clone();
    tokio::spawn(async move {
        let stopped = async {
            let _ = stopped.await;
        };
        fawkes_server::serve_with(listener, app, serving, stopped, ServeOptions::default()).await
    });
    Harness { addr, endpoint, _stop: stop }
}

/// What the healthy client saw.
#[derive(Debug)]
struct Seen {
    pings: u64,
    replies: u64,
    news: u64,
}

/// A client chatting alongside an attack: joins `room:chaos`, pings every 20 ms until `stop`,
/// then reads until every ping is answered (and `news` broadcasts, if the caller expects them).
struct Healthy {
    stop: tokio::sync::oneshot::Sender<u64>,
    task: tokio::task::JoinHandle<Seen>,
}

impl Healthy {
    async fn join(addr: SocketAddr) -> Healthy {
        let url = format!("ws://{addr}/socket/websocket?vsn=2.0.0");
        let (mut ws, _) = tokio_tungstenite::connect_async(url).await.expect("the healthy client connects");
        ws.send(Message::text(r#"["1","1","room:chaos","phx_join",{}]"#)).await.expect("join");
        loop {
            let Some(Ok(Message::Text(t))) = ws.next().await else { panic!("no join reply") };
            if t.contains(r#""phx_reply""#) {
                assert!(t.contains(r#""status":"ok""#), "{t}");
                break;
            }
        }
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<u64>();
        let task = tokio::spawn(async move {
            let mut seen = Seen { pings: 0, replies: 0, news: 0 };
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            let mut expected_news = None;
            loop {
                if let Some(news) = expected_news
                    && seen.replies == seen.pings
                    && seen.news >= news
                {
                    return seen;
                }
                tokio::select! {
                    _ = tick.tick(), if expected_news.is_none() => {
                        seen.pings += 1;
                        let ping = format!(r#"["1","p{}","room:chaos","ping",{{"n":{}}}]"#, seen.pings, seen.pings);
                        ws.send(Message::text(ping)).await.expect("the healthy client can always send");
                    }
                    news = &mut stopped, if expected_news.is_none() => expected_news = Some(news.unwrap_or(0)),
                    msg = tokio::time::timeout(WAIT, ws.next()) => match msg {
                        Ok(Some(Ok(Message::Text(t)))) if t.contains(r#""phx_reply""#) => {
                            assert!(t.contains(r#""status":"ok""#), "{t}");
                            seen.replies += 1;
                        }
                        Ok(Some(Ok(Message::Text(t)))) if t.contains(r#""news""#) => seen.news += 1,
                        Ok(Some(Ok(_))) => {}
                        other => panic!("the healthy client lost its connection: {other:?} after {seen:?}"),
                    },
                }
            }
        });
        Healthy { stop, task }
    }

    /// Stops pinging; waits for every reply and for `news` broadcasts.
    async fn finish(self, news: u64) -> Seen {
        let _ = self.stop.send(news);
        let seen = tokio::time::timeout(WAIT, self.task).await.expect("the healthy client finishes").expect("no panic");
        assert!(seen.pings > 0);
        assert_eq!(seen.replies, seen.pings, "every ping answered");
        assert_eq!(seen.news, news, "every broadcast delivered");
        seen
    }
}

/// A connection whose receive buffer is small, so that a client that stops reading stops the
/// server's writes soon rather than after megabytes of kernel buffers.
async fn small_window(addr: SocketAddr) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("receive buffer");
    socket.connect(addr).await.expect("connect")
}

/// A raw WebSocket on TCP, upgraded.
async fn raw_ws(addr: SocketAddr) -> tokio::net::TcpStream {
    let mut io = small_window(addr).await;
    let req = format!(
        "GET /socket/websocket?vsn=2.0.0 HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    io.write_all(req.as_bytes()).await.expect("upgrade request");
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(io.read_u8().await.expect("upgrade response"));
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
    io
}

fn masked(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [1u8, 2, 3, 4];
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
    frame
}

/// The close code the server sends before ending the connection.
async fn close_code(io: &mut tokio::net::TcpStream) -> Option<u16> {
    let mut wire = Vec::new();
    let _ = tokio::time::timeout(WAIT, io.read_to_end(&mut wire)).await.expect("the server ends the connection");
    let close = wire.windows(2).position(|w| w[0] == 0x88 && w[1] >= 2)?;
    Some(u16::from_be_bytes([wire[close + 2], wire[close + 3]]))
}

/// A plain HTTP request on a fresh connection: the status and the body.
fn http(addr: SocketAddr, request: &[u8]) -> (u16, String) {
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(WAIT)).expect("timeout");
    let _ = stream.write_all(request);
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let response = String::from_utf8_lossy(&response).into_owned();
    let status = response.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_owned();
    (status, body)
}

/// Reads until `what` has arrived (the join reply), and no further.
async fn read_until(io: &mut tokio::net::TcpStream, what: &str) {
    let mut seen = Vec::new();
    let read = async {
        while !String::from_utf8_lossy(&seen).contains(what) {
            seen.push(io.read_u8().await.expect("read"));
        }
    };
    tokio::time::timeout(WAIT, read).await.expect("the join reply");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_deep_json_close_only_their_own_socket() {
    let h = start(Config::default()).await;
    let healthy = Healthy::join(h.addr).await;
    for garbage in [&b"not json"[..], b"\x00\x01\x02", b"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["] {
        let mut io = raw_ws(h.addr).await;
        io.write_all(&masked(0x1, garbage)).await.expect("send");
        assert_eq!(close_code(&mut io).await, Some(1011), "{:?}", String::from_utf8_lossy(garbage));
    }
    let deep = "[".repeat(100_000);
    let mut io = raw_ws(h.addr).await;
    io.write_all(&masked(0x1, deep.as_bytes())).await.expect("send");
    assert_eq!(close_code(&mut io).await, Some(1011), "100,000 nested arrays");
    let mut io = raw_ws(h.addr).await;
    io.write_all(&masked(0x2, &[0xff; 64])).await.expect("send");
    assert_eq!(close_code(&mut io).await, Some(1011), "a binary frame that is no V2 message");
    healthy.finish(0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_frames_headers_and_bodies_get_clear_answers() {
    let h = start(Config::default()).await;
    let healthy = Healthy::join(h.addr).await;
    let addr = h.addr;
    // A 50 MB frame's head and its first megabyte.
    let mut io = raw_ws(addr).await;
    let mut frame = vec![0x81, 0x80 | 127];
    frame.extend_from_slice(&(50u64 * 1024 * 1024).to_be_bytes());
    frame.extend_from_slice(&[1, 2, 3, 4]);
    frame.extend(std::iter::repeat_n(b'x', 1024 * 1024));
    let _ = io.write_all(&frame).await;
    assert_eq!(close_code(&mut io).await, Some(1009));
    let answers = tokio::task::spawn_blocking(move || {
        // 10,000 headers.
        let mut req = format!("GET / HTTP/1.1\r\nHost: {addr}\r\n");
        for i in 0..10_000 {
            req.push_str(&format!("x-h{i}: v\r\n"));
        }
        req.push_str("\r\n");
        let headers = http(addr, req.as_bytes()).0;
        // A 100 MB long-poll body, announced; the server answers before reading it.
        let head = format!(
            "POST /socket/longpoll?vsn=2.0.0&token=x HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 104857600\r\n\r\n"
        );
        let forged = http(addr, head.as_bytes());
        (headers, forged)
    });
    let (headers, (forged_status, forged_body)) = answers.await.expect("no panic");
    assert_eq!(headers, 431, "too many headers");
    assert_eq!(forged_status, 200);
    assert!(forged_body.contains(r#""status":410"#), "a forged token is a gone session: {forged_body}");
    healthy.finish(0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_flood_is_rate_limited_on_its_own_socket() {
    let h = start(Config::default()).await;
    let healthy = Healthy::join(h.addr).await;
    let url = format!("ws://{}/socket/websocket?vsn=2.0.0", h.addr);
    let (mut flood, _) = tokio_tungstenite::connect_async(url).await.expect("connect");
    for i in 0..1000 {
        let join = format!(r#"["{i}","{i}","room:flood{i}","phx_join",{{}}]"#);
        flood.send(Message::text(join)).await.expect("send");
    }
    let (mut ok, mut refused) = (0, 0);
    while ok + refused < 1000 {
        match tokio::time::timeout(WAIT, flood.next()).await.expect("every join answered") {
            Some(Ok(Message::Text(t))) if t.contains(r#""phx_reply""#) => {
                if t.contains(r#""status":"ok""#) {
                    ok += 1
                } else {
                    refused += 1
                }
            }
            Some(Ok(_)) => {}
            other => panic!("the flooding socket was dropped: {other:?}"),
        }
    }
    assert!(ok <= 200 + 50, "{ok} joins accepted");
    assert!(refused >= 700, "{refused} joins refused");
    healthy.finish(0).await;
}

/// A stream whose session ends is finished, its last event included, and then its connection
/// is closed rather than kept for another request: a reading peer loses nothing to the cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_gets_the_last_event_of_a_stream_whose_session_ends_then_the_end_of_the_connection() {
    let h = start(Config::default()).await;
    let addr = h.addr;
    let mut io = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let req = format!("GET /socket/sse?vsn=2.0.0 HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n");
    io.write_all(req.as_bytes()).await.expect("open");
    let mut head = Vec::new();
    while !String::from_utf8_lossy(&head).contains("phx_session\ndata: ") || !head.ends_with(b"\n\n") {
        head.push(io.read_u8().await.expect("the session event"));
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let token = text.lines().find_map(|l| l.strip_prefix("data: ")).expect("a token").trim().to_owned();
    let post = format!(
        "POST /socket/sse?token={token} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: 9\r\nConnection: close\r\n\r\n[not json"
    );
    let (status, body) = tokio::task::spawn_blocking(move || http(addr, post.as_bytes())).await.expect("post");
    assert!(status == 200 && body.contains(r#""status":400"#), "{status} {body}");
    let mut rest = Vec::new();
    let read = tokio::time::timeout(WAIT, io.read_to_end(&mut rest)).await;
    assert!(matches!(read, Ok(Ok(_))), "the connection ends: {read:?}");
    let rest = String::from_utf8_lossy(&rest);
    assert!(rest.contains("event: phx_socket_close\ndata: malformed frame"), "the last event: {rest}");
    assert!(rest.ends_with("0\r\n\r\n"), "the response was finished before the close: {rest}");
}

/// A WebSocket reader and SSE streams that stop reading while 4 KiB broadcasts keep coming: each
/// is closed as a slow consumer once its queue holds a mebibyte, counted in `/metrics`, and its
/// TCP connection is closed though it never reads again (hyper polls a stream only when it can
/// write, so the stream cannot end by itself). The healthy client, on the same topic, gets every
/// broadcast.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_readers_are_closed_at_the_byte_bound_and_a_reader_alongside_gets_everything() {
    let h = start(Config::default()).await;
    let healthy = Healthy::join(h.addr).await;
    let addr = h.addr;

    // A WebSocket that joins and never reads again.
    let mut stalled_ws = raw_ws(addr).await;
    stalled_ws.write_all(&masked(0x1, br#"["1","1","room:chaos","phx_join",{}]"#)).await.expect("join");
    read_until(&mut stalled_ws, "phx_reply").await;
    // SSE streams that join and never read again.
    let mut stalled_sse = Vec::new();
    for _ in 0..4 {
        let mut io = small_window(addr).await;
        let req = format!("GET /socket/sse?vsn=2.0.0 HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n");
        io.write_all(req.as_bytes()).await.expect("open");
        let mut head = Vec::new();
        while !head.windows(2).any(|w| w == b"\n\n") || !String::from_utf8_lossy(&head).contains("phx_session") {
            head.push(io.read_u8().await.expect("the session event"));
        }
        let text = String::from_utf8_lossy(&head).into_owned();
        let token = text.lines().find_map(|l| l.strip_prefix("data: ")).expect("a token").trim().to_owned();
        let join = r#"["1","1","room:chaos","phx_join",{}]"#;
        let post = format!(
            "POST /socket/sse?token={token} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{join}",
            join.len()
        );
        let (status, body) = tokio::task::spawn_blocking(move || http(addr, post.as_bytes())).await.expect("post");
        assert!(status == 200 && body.contains(r#""status":200"#), "{status} {body}");
        read_until(&mut io, "phx_reply").await;
        stalled_sse.push(io);
    }

    // The issue's row: 3,000 broadcasts of 4 KiB.
    const BROADCASTS: u64 = 3000;
    let pad = "x".repeat(4096);
    for n in 0..BROADCASTS {
        h.endpoint.pubsub().broadcast("room:chaos", "news", serde_json::json!({ "n": n, "pad": pad }));
        if n % 100 == 0 {
            tokio::task::yield_now().await;
        }
    }
    healthy.finish(BROADCASTS).await;
    // The stalled WebSocket and the 4 stalled SSE sessions were closed as slow consumers.
    let closed = async {
        while h.endpoint.slow_consumers() < 5 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(WAIT, closed)
        .await
        .unwrap_or_else(|_| panic!("{} slow consumers", h.endpoint.slow_consumers()));
    let (status, metrics) = tokio::task::spawn_blocking(move || {
        http(addr, format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())
    })
    .await
    .expect("metrics");
    assert_eq!(status, 200);
    assert!(metrics.lines().any(|l| l == "fawkes_slow_consumer_closes_total 5"), "{metrics}");

    // Every stalled connection is dropped by the server while its peer still reads nothing (the
    // SSE streams' after their cut's grace of 2 s, the WebSocket's once its stuck write has had
    // 10 s), and its session with it: only the healthy client's socket may be left.
    let dropped = async {
        while h.endpoint.connected() > 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    if tokio::time::timeout(WAIT, dropped).await.is_err() {
        panic!("{} sockets still open: the stalled ones were not dropped", h.endpoint.connected());
    }
    // Reading now gives what the kernel still held for each, then the end.
    let quick = Duration::from_secs(5);
    for (n, mut io) in stalled_sse.into_iter().enumerate() {
        let read = tokio::time::timeout(quick, io.read_to_end(&mut Vec::new())).await;
        assert!(matches!(read, Ok(Ok(_))), "stalled SSE stream {n} was closed by the server: {read:?}");
    }
    let read = tokio::time::timeout(quick, stalled_ws.read_to_end(&mut Vec::new())).await;
    assert!(matches!(read, Ok(Ok(_))), "the stalled WebSocket was closed by the server: {read:?}");
}
