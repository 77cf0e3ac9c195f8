//! `fawkes serve` against peers that lie or flood: what the real binary answers.

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::SocketAddr;
use std::time::Duration;

mod support;

/// The status of a WebSocket upgrade sent with these `Host` and `Origin` headers.
fn upgrade(addr: SocketAddr, host: &str, origin: Option<&str>) -> u16 {
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let origin = origin.map_or(String::new(), |o| format!("Origin: {o}\r\n"));
    let req = format!(
        "GET /socket/websocket?vsn=2.0.0 HTTP/1.1\r\nHost: {host}\r\n{origin}Upgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    stream.write_all(req.as_bytes()).expect("write");
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).expect("status line");
    line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// Without `allowed_origins`, only the server's own origins may connect: a page on any other
/// origin is refused even when the request's `Host` names that origin (DNS rebinding).
#[test]
fn without_allowed_origins_only_the_servers_own_origins_connect() {
    let server = support::Server::start("", &[]);
    let addr = server.addr;
    let port = addr.port();
    assert_eq!(upgrade(addr, "evil.example", Some("http://evil.example")), 403, "DNS rebinding");
    assert_eq!(upgrade(addr, &format!("evil.example:{port}"), Some(&format!("http://evil.example:{port}"))), 403);
    assert_eq!(upgrade(addr, "localhost", Some("http://localhost:1")), 403, "another port");
    // The demo page, opened by either loopback name, and clients sending no Origin (node, CLIs).
    for own in [format!("http://127.0.0.1:{port}"), format!("http://localhost:{port}"), format!("http://[::1]:{port}")]
    {
        assert_eq!(upgrade(addr, &addr.to_string(), Some(&own)), 101, "{own}");
    }
    assert_eq!(upgrade(addr, "evil.example", None), 101, "no Origin");
}

/// 10,000 long-poll session opens pipelined on one connection: the first `connect_burst` open
/// a session, the rest are answered 429 with `Retry-After` and create nothing.
#[test]
fn session_opens_from_one_address_are_rate_limited() {
    use std::io::Read as _;
    let server = support::Server::start("[limits]\nconnect_rate = 10\nconnect_burst = 50\n", &[]);
    let addr = server.addr;
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    const OPENS: usize = 10_000;
    let one = format!("GET /socket/longpoll?vsn=2.0.0 HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    let last = format!("GET /socket/longpoll?vsn=2.0.0 HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    let mut requests = one.repeat(OPENS - 1);
    requests.push_str(&last);
    let started = std::time::Instant::now();
    let mut writer = stream.try_clone().expect("clone");
    let writing = std::thread::spawn(move || writer.write_all(requests.as_bytes()));
    let mut answers = String::new();
    stream.read_to_string(&mut answers).expect("every answer");
    let regained = (started.elapsed().as_secs_f64() * 10.0).ceil() as usize;
    writing.join().expect("no panic").expect("written");
    let opened = answers.matches("\"status\":410").count();
    let limited = answers.matches("HTTP/1.1 429").count();
    assert_eq!(opened + limited, OPENS, "every open is answered");
    assert!(
        (50..=50 + regained).contains(&opened),
        "{opened} sessions opened in {:?}; the burst is 50, regained at 10 a second",
        started.elapsed()
    );
    assert!(answers.contains("retry-after: 1\r\n"), "429s say when to retry");
}

#[test]
fn websocket_upgrades_from_one_address_are_rate_limited() {
    let server = support::Server::start("[limits]\nconnect_rate = 1\nconnect_burst = 3\n", &[]);
    let host = server.addr.to_string();
    let statuses: Vec<u16> = (0..5).map(|_| upgrade(server.addr, &host, None)).collect();
    assert_eq!(&statuses[..3], [101, 101, 101]);
    assert!(statuses[3..].iter().all(|s| *s == 429), "{statuses:?}");
}
