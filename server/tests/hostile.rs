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
