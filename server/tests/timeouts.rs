//! Connection timeouts: a peer that never finishes its headers, one that sends nothing, and one
//! whose body never ends are cut; a WebSocket client chatting alongside is not.

use std::io::{Read as _, Write as _};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use fawkes::Endpoint;
use fawkes_server::ServeOptions;
use futures_util::{SinkExt as _, StreamExt as _};
use tokio_tungstenite::tungstenite::Message;

async fn server(options: ServeOptions) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let endpoint = Endpoint::new(fawkes_server::demo::router());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let app = fawkes_server::app(endpoint.clone());
    tokio::spawn(fawkes_server::serve_with(
        listener,
        app,
        endpoint,
        async {
            let _ = stopped.await;
        },
        options,
    ));
    (addr, stop)
}

/// Reads until the server ends the connection; how long that took from `since`. Panics if it
/// is still open after `within`.
fn ended(mut stream: std::net::TcpStream, since: Instant, within: Duration) -> (Duration, Vec<u8>) {
    stream.set_read_timeout(Some(within)).expect("timeout");
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return (since.elapsed(), got),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return (since.elapsed(), got),
            Err(e) => panic!("the connection is still open after {within:?}: {e}"),
        }
    }
}

/// Opens a long-poll session with a plain GET; returns its token.
fn longpoll_token(addr: std::net::SocketAddr) -> String {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let req = format!("GET /socket/longpoll?vsn=2.0.0 HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(req.as_bytes()).expect("write");
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let json: serde_json::Value = serde_json::from_str(body).expect("a long-poll envelope");
    json["token"].as_str().expect("a token").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_read_and_idle_timeouts_cut_slow_peers_but_not_a_chatting_client() {
    let mut options = ServeOptions::default();
    options.header_read_timeout = Duration::from_millis(600);
    options.idle_timeout = Duration::from_millis(1500);
    let (addr, _stop) = server(options).await;

    let url = format!("ws://{addr}/socket/websocket?vsn=2.0.0");
    let (mut chat, _) = tokio_tungstenite::connect_async(url).await.expect("connect");
    chat.send(Message::text(r#"["1","1","room:lobby","phx_join",{}]"#)).await.expect("join");

    let peers = tokio::task::spawn_blocking(move || {
        let start = Instant::now();
        // Headers one byte at a time, never the blank line.
        let mut slowloris = std::net::TcpStream::connect(addr).expect("connect");
        slowloris.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").expect("write");
        let drip = slowloris.try_clone().expect("clone");
        std::thread::spawn(move || {
            let mut drip = drip;
            while drip.write_all(b"a").is_ok() {
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        // Nothing at all.
        let silent = std::net::TcpStream::connect(addr).expect("connect");
        // A body that never ends.
        let mut slow_body = std::net::TcpStream::connect(addr).expect("connect");
        let token = longpoll_token(addr);
        let head = format!(
            "POST /socket/longpoll?vsn=2.0.0&token={token} HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n"
        );
        slow_body.write_all(head.as_bytes()).expect("write");
        let drip = slow_body.try_clone().expect("clone");
        std::thread::spawn(move || {
            let mut drip = drip;
            while drip.write_all(b"a").is_ok() {
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let within = Duration::from_secs(10);
        let (slowloris, _) = ended(slowloris, start, within);
        let (silent, _) = ended(silent, start, within);
        let (slow_body, _) = ended(slow_body, start, within);
        (slowloris, silent, slow_body)
    });

    // The chatting client keeps talking throughout and every reply comes.
    let mut sent = 0u32;
    let mut replies = 0u32;
    let chatting = async {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tick.tick().await;
            sent += 1;
            let msg = format!(r#"["1","{}","room:lobby","ping",{{}}]"#, sent + 1);
            chat.send(Message::text(msg)).await.expect("the chatting client stays connected");
            while let Ok(Some(Ok(_))) = tokio::time::timeout(Duration::from_millis(1), chat.next()).await {
                replies += 1;
            }
        }
    };
    let (slowloris, silent, slow_body) = tokio::select! {
        done = peers => done.expect("no panic"),
        () = chatting => unreachable!(),
    };
    assert!(
        slowloris >= Duration::from_millis(500) && slowloris < Duration::from_secs(3),
        "slowloris cut after {slowloris:?}"
    );
    assert!(
        silent >= Duration::from_millis(500) && silent < Duration::from_secs(3),
        "silent peer cut after {silent:?}"
    );
    assert!(
        slow_body >= Duration::from_millis(1400) && slow_body < Duration::from_secs(5),
        "slow body cut after {slow_body:?}"
    );
    assert!(sent > 10, "{sent}");
    // Every push is answered (a reply to the unknown event, or the join's): none lost.
    let deadline = Instant::now() + Duration::from_secs(5);
    while replies < sent + 1 && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(5), chat.next()).await {
            Ok(Some(Ok(Message::Text(_)))) => replies += 1,
            Ok(Some(Ok(_))) => {}
            other => panic!("the chatting client lost its connection: {other:?}"),
        }
    }
    assert_eq!(replies, sent + 1, "replies to the join and every push");
}

/// A long-poll client whose answer is never read: the answer is finite (at most 64 KiB of
/// messages), so the poll's read ends and the session ends after its idle window; the connection
/// holding the unread answer is closed by the idle timeout (within two of them), while the peer
/// still reads nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_poll_answer_never_read_is_dropped_with_its_connection_and_session() {
    let endpoint = Endpoint::new(fawkes_server::demo::router());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    let longpoll = fawkes::longpoll::LongPollOptions::default().session_idle(Duration::from_secs(1));
    let app = fawkes_server::app_with(endpoint.clone(), longpoll);
    let mut options = ServeOptions::default();
    options.idle_timeout = Duration::from_millis(1500);
    let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(fawkes_server::serve_with(
        listener,
        app,
        endpoint.clone(),
        async {
            let _ = stopped.await;
        },
        options,
    ));

    let token = tokio::task::spawn_blocking(move || longpoll_token(addr)).await.expect("a session");
    let join = r#"["1","1","room:hung","phx_join",{}]"#;
    let post = format!(
        "POST /socket/longpoll?vsn=2.0.0&token={token} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{join}",
        join.len()
    );
    tokio::task::spawn_blocking(move || {
        let mut stream = std::net::TcpStream::connect(addr).expect("connect");
        stream.write_all(post.as_bytes()).expect("post");
        let _ = stream.read_to_end(&mut Vec::new());
    })
    .await
    .expect("joined");
    let pad = "x".repeat(4096);
    for n in 0..100 {
        endpoint.pubsub().broadcast("room:hung", "news", serde_json::json!({ "n": n, "pad": pad }));
    }
    // The poll, on a connection that holds little, never read.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("receive buffer");
    let io = socket.connect(addr).await.expect("connect");
    let stream = io.into_std().expect("std");
    stream.set_nonblocking(false).expect("blocking");
    let mut writer = stream.try_clone().expect("clone");
    let poll = format!("GET /socket/longpoll?vsn=2.0.0&token={token} HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    writer.write_all(poll.as_bytes()).expect("poll");

    // Two idle timeouts and the session's idle window pass with the answer unread.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let since = Instant::now();
    let (after, answer) =
        tokio::task::spawn_blocking(move || ended(stream, since, Duration::from_secs(1))).await.expect("read");
    assert!(after < Duration::from_secs(1), "the connection was closed before it was read");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{}", &answer[..answer.len().min(200)]);
    assert!(answer.len() < 80 * 1024, "one answer of at most 64 KiB of messages: {} bytes", answer.len());
    assert_eq!(endpoint.connected(), 0, "the session ended");
}
