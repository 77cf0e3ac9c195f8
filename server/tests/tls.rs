//! `fawkes serve` reaching its backends over TLS: two nodes over a `rediss://` server started by
//! the test carry a chat message from one node's client to the other's; a PostgreSQL with
//! `ssl = on` serves as database and backend with `sslmode=verify-full`; a server certificate
//! that `tls_ca` does not vouch for stops the start with the reason.

use std::io::Read as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fawkes_testkit::tls::{Pki, TlsPostgres, TlsRedis};
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

mod support;

const WAIT: Duration = Duration::from_secs(15);

use support::scratch;

fn cluster() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    format!("t_tls_{}_{nanos}", std::process::id())
}

fn spawn(config: &str) -> (Child, PathBuf) {
    let dir = scratch();
    std::fs::write(dir.join("fawkes.toml"), config).expect("write config");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fawkes"));
    cmd.current_dir(&dir).env_remove("RUST_LOG");
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("FAWKES_") {
            cmd.env_remove(key);
        }
    }
    let child = cmd
        .args(["serve", "--config", "fawkes.toml"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn fawkes");
    (child, dir)
}

/// A running `fawkes serve`.
struct Node {
    /// Kept for its lifetime: dropping it stops the server.
    _process: support::Server,
    addr: SocketAddr,
}

impl Node {
    fn start(config: &str) -> Node {
        let process = support::Server::start(config, &[]);
        Node { addr: process.addr, _process: process }
    }

    async fn join(&self, topic: &str) -> Client {
        let url = format!("ws://{}/socket/websocket?vsn=2.0.0", self.addr);
        let (ws, _) = tokio_tungstenite::connect_async(url).await.expect("connect");
        let mut client = Client { ws, next: 1 };
        client.send(topic, "phx_join", json!({})).await;
        let reply = client.next_event("phx_reply").await;
        assert_eq!(reply[4]["status"], "ok", "{reply}");
        client
    }

    fn metric(&self, name: &str) -> Option<f64> {
        let mut stream = std::net::TcpStream::connect(self.addr).expect("connect");
        stream.set_read_timeout(Some(WAIT)).expect("timeout");
        let req = format!("GET /metrics HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n", self.addr);
        std::io::Write::write_all(&mut stream, req.as_bytes()).expect("write");
        let mut body = String::new();
        let _ = stream.read_to_string(&mut body);
        body.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
    }
}

struct Client {
    ws: tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    next: u64,
}

impl Client {
    async fn send(&mut self, topic: &str, event: &str, payload: Value) {
        let r = self.next.to_string();
        self.next += 1;
        let frame = json!(["1", r, topic, event, payload]).to_string();
        self.ws.send(Message::text(frame)).await.expect("send");
    }

    /// The next frame of `event`, within `within`.
    async fn event_within(&mut self, event: &str, within: Duration) -> Option<Value> {
        tokio::time::timeout(within, async {
            loop {
                match self.ws.next().await {
                    Some(Ok(Message::Text(text))) => {
                        let frame: Value = serde_json::from_str(&text).expect("JSON frame");
                        if frame[3] == event {
                            return frame;
                        }
                    }
                    Some(Ok(_)) => {}
                    other => panic!("socket ended: {other:?}"),
                }
            }
        })
        .await
        .ok()
    }

    async fn next_event(&mut self, event: &str) -> Value {
        self.event_within(event, WAIT).await.unwrap_or_else(|| panic!("no {event} within {WAIT:?}"))
    }
}

#[tokio::test]
async fn two_nodes_over_rediss_carry_a_message_between_their_clients() {
    let pki = Pki::new();
    let Some(redis) = TlsRedis::start(&pki) else { return };
    let config = format!(
        "bind = \"127.0.0.1:0\"\npubsub = \"{}\"\nsecret = \"s\"\ncluster = \"{}\"\ntls_ca = \"{}\"\n",
        redis.url("localhost"),
        cluster(),
        pki.ca.display()
    );
    let (a, b) = (Node::start(&config), Node::start(&config));
    let mut on_a = a.join("room:tls").await;
    let mut on_b = b.join("room:tls").await;
    let deadline = Instant::now() + WAIT;
    let got = loop {
        on_a.send("room:tls", "new_msg", json!({"body": "over TLS"})).await;
        if let Some(got) = on_b.event_within("new_msg", Duration::from_millis(300)).await {
            break got;
        }
        assert!(Instant::now() < deadline, "no message crossed the rediss:// backend within {WAIT:?}");
    };
    assert_eq!(got[4]["body"], "over TLS", "{got}");
    assert_eq!(a.metric("fawkes_pubsub_connected"), Some(1.0));
    assert_eq!(b.metric("fawkes_pubsub_connected"), Some(1.0));
    // The broadcasts A sent went through the backend, and their latency was measured.
    assert!(a.metric("fawkes_pubsub_publish_seconds_count").is_some_and(|n| n >= 1.0));
}

#[tokio::test]
async fn postgres_with_verify_full_serves_as_database_and_backend() {
    let pki = Pki::new();
    let Some(pg) = TlsPostgres::start(&pki) else { return };
    let url = pg.url("localhost", "sslmode=verify-full");
    let config = format!(
        "bind = \"127.0.0.1:0\"\ndatabase = \"{url}\"\npubsub = \"{url}\"\nsecret = \"s\"\ncluster = \"{}\"\ntls_ca = \"{}\"\n",
        cluster(),
        pki.ca.display()
    );
    let node = Node::start(&config);
    let mut client = node.join("room:pg").await;
    client.send("room:pg", "new_msg", json!({"body": "hi"})).await;
    assert_eq!(client.next_event("new_msg").await[4]["body"], "hi");
    assert_eq!(node.metric("fawkes_pubsub_connected"), Some(1.0));
}

/// Runs `fawkes serve` that is expected to stop by itself; its exit status and stderr.
fn refused(config: &str) -> (std::process::ExitStatus, String) {
    let (mut child, dir) = spawn(config);
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if start.elapsed() > WAIT {
            let _ = child.kill();
            panic!("fawkes still running {WAIT:?} after a refused TLS handshake");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    let _ = child.stderr.take().expect("stderr").read_to_string(&mut err);
    let _ = std::fs::remove_dir_all(dir);
    (status, err)
}

#[tokio::test]
async fn a_certificate_tls_ca_does_not_vouch_for_stops_the_start_with_the_reason() {
    let pki = Pki::new();
    let Some(redis) = TlsRedis::start(&pki) else { return };
    let base = format!("bind = \"127.0.0.1:0\"\nsecret = \"s\"\ncluster = \"{}\"\n", cluster());
    let wrong_ca = format!("{base}pubsub = \"{}\"\ntls_ca = \"{}\"\n", redis.url("localhost"), pki.other_ca.display());
    let (status, err) = refused(&wrong_ca);
    assert!(!status.success());
    assert!(err.contains("TLS refused") && err.contains("UnknownIssuer") && err.contains("tls_ca"), "{err}");

    let wrong_host = format!("{base}pubsub = \"{}\"\ntls_ca = \"{}\"\n", redis.url("127.0.0.2"), pki.ca.display());
    let (status, err) = refused(&wrong_host);
    assert!(!status.success());
    assert!(err.contains("TLS refused") && err.contains("not valid for name \"127.0.0.2\""), "{err}");
}
