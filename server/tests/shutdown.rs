//! The server's one shutdown path, as clients see it: every socket is told, then `serve` returns.

use std::time::Duration;

use fawkes::Endpoint;
use futures_util::{SinkExt as _, StreamExt as _};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

const WAIT: Duration = Duration::from_secs(5);

/// Reads until the server's close frame; returns its code.
async fn closed(ws: &mut Ws) -> Option<u16> {
    let close = tokio::time::timeout(WAIT, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return None,
            }
        }
    });
    close.await.expect("the server closes within the wait")
}

#[tokio::test]
async fn shutdown_tells_every_client_with_1001() {
    let endpoint = Endpoint::new(fawkes_server::demo::router());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let app = fawkes_server::app(endpoint.clone());
    let served = tokio::spawn(fawkes_server::serve(listener, app, endpoint, async {
        let _ = stopped.await;
    }));

    let url = |vsn: &str| format!("ws://{addr}/socket/websocket?vsn={vsn}");
    let (mut a, _) = tokio_tungstenite::connect_async(url("2.0.0")).await.expect("connect V2");
    a.send(Message::text(r#"["1","1","room:bye","phx_join",{}]"#)).await.expect("send");
    let Some(Ok(Message::Text(reply))) = a.next().await else { panic!("no join reply") };
    assert!(reply.contains(r#""status":"ok""#), "{reply}");
    let (mut b, _) = tokio_tungstenite::connect_async(url("1.0.0")).await.expect("connect V1");

    let _ = stop.send(());
    assert_eq!(closed(&mut a).await, Some(1001));
    assert_eq!(closed(&mut b).await, Some(1001));
    tokio::time::timeout(WAIT, served).await.expect("shutdown finishes").expect("no panic").expect("served");
}

mod support;

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

/// A peer sending its request headers one byte at a time, and one sending a POST body one byte
/// at a time, never finishing: SIGTERM still ends the process by the drain deadline.
#[test]
fn slow_peers_do_not_hold_the_process_past_the_drain_deadline() {
    use std::io::Write as _;
    // Timeouts far beyond the test, so that only the deadline can cut the peers.
    let mut server =
        support::Server::start("[drain]\ndeadline = 1.5\n[http]\nheader_read_timeout = 120\nidle_timeout = 120\n", &[]);
    let addr = server.addr;
    let mut slow_headers = std::net::TcpStream::connect(addr).expect("connect");
    slow_headers.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ").expect("write");
    let mut slow_body = std::net::TcpStream::connect(addr).expect("connect");
    let token = longpoll_token(addr);
    let head =
        format!("POST /socket/longpoll?vsn=2.0.0&token={token} HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n");
    slow_body.write_all(head.as_bytes()).expect("write");
    let drip = std::thread::spawn(move || {
        for _ in 0..200 {
            if slow_headers.write_all(b"a").is_err() || slow_body.write_all(b"a").is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    server.sigterm();
    let took = server.exited(Duration::from_secs(6)).expect("fawkes exits after SIGTERM with slow peers open");
    assert!(took < Duration::from_millis(3500), "exited {took:?} after SIGTERM; the deadline is 1.5 s");
    let _ = drip.join();
}
