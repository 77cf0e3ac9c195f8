//! Protocol errors over real TCP (RFC 6455 §7.4.1): the server sends the close code the error
//! calls for (1002 protocol violation, 1007 invalid UTF-8, 1009 too big) and it reaches the
//! client before the connection ends, as raw frames show.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use fawkes_channel::{Config, Endpoint, Router};
use fawkes_testkit::TestChannel;
use fawkes_transport_ws::WebSocketService;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

const TEXT: u8 = 0x1;
const CLOSE: u8 = 0x8;
const WAIT: Duration = Duration::from_secs(10);
const LIMIT: usize = 1024;

/// A server on an ephemeral port; each connection served by hyper with upgrades.
async fn serve(endpoint: Endpoint) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let service = WebSocketService::new(endpoint);
    tokio::spawn(async move {
        while let Ok((io, _)) = listener.accept().await {
            let service = service.clone();
            tokio::spawn(async move {
                let handler = hyper::service::service_fn(move |req| {
                    let service = service.clone();
                    async move { Ok::<_, Infallible>(service.handle(req).await) }
                });
                let conn = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(io), handler);
                let _ = conn.with_upgrades().await;
            });
        }
    });
    addr
}

async fn connect(addr: SocketAddr) -> TcpStream {
    let mut io = TcpStream::connect(addr).await.expect("connect");
    io.write_all(
        b"GET /socket/websocket?vsn=2.0.0 HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n\
          Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await
    .expect("write the upgrade request");
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(io.read_u8().await.expect("read the upgrade response"));
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "upgraded: {}", String::from_utf8_lossy(&head));
    io
}

/// A frame header: FIN, `opcode`, masked or not, with the length `len`.
fn header(opcode: u8, masked: bool, len: u64) -> Vec<u8> {
    let mask_bit = if masked { 0x80 } else { 0 };
    let mut frame = vec![0x80 | opcode];
    match len {
        0..=125 => frame.push(mask_bit | len as u8),
        126..=0xffff => {
            frame.push(mask_bit | 126);
            frame.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            frame.push(mask_bit | 127);
            frame.extend_from_slice(&len.to_be_bytes());
        }
    }
    frame
}

const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

fn masked(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut frame = header(opcode, true, payload.len() as u64);
    frame.extend_from_slice(&MASK);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
    frame
}

/// Reads what the server sends until the connection ends; returns the code of the close frame
/// it sent (the first frame it sends here), and whether the end was clean (no reset).
async fn close_code(io: &mut TcpStream) -> (Option<u16>, bool) {
    let mut wire = Vec::new();
    let read = tokio::time::timeout(WAIT, async {
        let mut buf = [0u8; 4096];
        loop {
            match io.read(&mut buf).await {
                Ok(0) => return true,
                Ok(n) => wire.extend_from_slice(&buf[..n]),
                Err(_) => return false,
            }
        }
    });
    let clean = read.await.expect("the server ends the connection in time");
    let code = (wire.len() >= 4 && wire[0] == 0x80 | CLOSE).then(|| u16::from_be_bytes([wire[2], wire[3]]));
    (code, clean)
}

async fn endpoint_addr() -> SocketAddr {
    let endpoint = Endpoint::builder()
        .router(Router::new().channel("test:*", TestChannel::default))
        .config(Config::default().max_frame_size(LIMIT))
        .build();
    serve(endpoint).await
}

#[tokio::test]
async fn protocol_violations_get_1002() {
    let addr = endpoint_addr().await;
    let mut unmasked = header(TEXT, false, 2);
    unmasked.extend_from_slice(b"[]");
    let cases: [(&str, Vec<u8>); 4] = [
        ("an unmasked frame", unmasked),
        ("a reserved data opcode", masked(0x3, b"x")),
        ("a reserved control opcode", masked(0xb, b"")),
        ("close code 999", masked(CLOSE, &999u16.to_be_bytes())),
    ];
    for (what, frame) in cases {
        let mut io = connect(addr).await;
        io.write_all(&frame).await.expect("send");
        assert_eq!(close_code(&mut io).await, (Some(1002), true), "{what}: 1002, then a clean end");
    }
}

#[tokio::test]
async fn invalid_utf8_text_gets_1007() {
    let addr = endpoint_addr().await;
    let mut io = connect(addr).await;
    io.write_all(&masked(TEXT, b"[\"1\",\"1\",\"\xff\xfe\"]")).await.expect("send");
    assert_eq!(close_code(&mut io).await, (Some(1007), true));
}

#[tokio::test]
async fn frames_over_the_limit_by_one_byte_or_by_50_mb_get_1009() {
    let addr = endpoint_addr().await;
    let mut io = connect(addr).await;
    io.write_all(&masked(TEXT, &vec![b'x'; LIMIT + 1])).await.expect("send");
    assert_eq!(close_code(&mut io).await, (Some(1009), true), "one byte over");

    // A 50 MB frame: the header and the first megabyte of it, then the client waits.
    let mut io = connect(addr).await;
    let mut frame = header(TEXT, true, 50 * 1024 * 1024);
    frame.extend_from_slice(&MASK);
    frame.extend(std::iter::repeat_n(b'x', 1024 * 1024));
    let _ = io.write_all(&frame).await;
    assert_eq!(close_code(&mut io).await.0, Some(1009), "50 MB over");
}
