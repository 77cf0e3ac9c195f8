//! `GET /metrics` after traffic: joins and refusals by reason, messages in and out by transport,
//! presence sizes and the backend latency histogram, each with its `# HELP` line, scraped over
//! HTTP as Prometheus does.

use std::time::Duration;

use fawkes::Endpoint;
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_tungstenite::tungstenite::Message;

const WAIT: Duration = Duration::from_secs(10);

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn start() -> std::net::SocketAddr {
    let endpoint = Endpoint::new(fawkes_server::demo::router());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let app = fawkes_server::app(endpoint.clone());
    tokio::spawn(fawkes_server::serve(listener, app, endpoint, std::future::pending()));
    addr
}

async fn scrape(addr: std::net::SocketAddr) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let req = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(req.as_bytes()).await.expect("write");
    let mut response = String::new();
    tokio::time::timeout(WAIT, stream.read_to_string(&mut response)).await.expect("in time").expect("read");
    response.split_once("\r\n\r\n").map(|(_, body)| body.to_owned()).expect("a body")
}

fn value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

async fn send(ws: &mut Ws, frame: Value) {
    ws.send(Message::text(frame.to_string())).await.expect("send");
}

async fn recv(ws: &mut Ws) -> Value {
    loop {
        let msg = tokio::time::timeout(WAIT, ws.next()).await.expect("a frame in time");
        if let Some(Ok(Message::Text(text))) = msg {
            return serde_json::from_str(&text).expect("JSON");
        }
    }
}

#[tokio::test]
async fn metrics_count_what_clients_did() {
    let addr = start().await;
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{addr}/socket/websocket?vsn=2.0.0")).await.expect("connect");
    send(&mut ws, json!(["1", "1", "room:a", "phx_join", {}])).await;
    assert_eq!(recv(&mut ws).await[4]["status"], "ok");
    send(&mut ws, json!(["2", "2", "nowhere:x", "phx_join", {}])).await;
    assert_eq!(recv(&mut ws).await[4]["response"]["reason"], "unmatched topic");
    send(&mut ws, json!(["3", "3", "admin:x", "phx_join", {}])).await;
    assert_eq!(recv(&mut ws).await[4]["response"]["reason"], "unauthorized");
    send(&mut ws, json!(["1", "4", "room:a", "new_msg", {"body": "hi"}])).await;
    // The broadcast and the reply, in either order.
    let events: Vec<Value> = vec![recv(&mut ws).await[3].clone(), recv(&mut ws).await[3].clone()];
    assert!(events.contains(&json!("new_msg")) && events.contains(&json!("phx_reply")), "{events:?}");

    let text = scrape(addr).await;
    assert_eq!(value(&text, "fawkes_sockets"), Some(1.0), "{text}");
    assert_eq!(value(&text, "fawkes_joins_total"), Some(1.0), "{text}");
    assert_eq!(value(&text, r#"fawkes_join_refusals_total{reason="unmatched topic"}"#), Some(1.0), "{text}");
    assert_eq!(value(&text, r#"fawkes_join_refusals_total{reason="unauthorized"}"#), Some(1.0), "{text}");
    assert_eq!(value(&text, r#"fawkes_messages_in_total{transport="websocket"}"#), Some(4.0), "{text}");
    assert_eq!(value(&text, r#"fawkes_messages_out_total{transport="websocket"}"#), Some(5.0), "{text}");
    assert_eq!(value(&text, "fawkes_outbound_dropped_total"), Some(0.0), "{text}");
    assert_eq!(value(&text, "fawkes_slow_consumer_closes_total"), Some(0.0), "{text}");
    assert_eq!(value(&text, "fawkes_presence_entries"), Some(0.0), "{text}");
    // A single node sends nothing to a backend: the histogram is there, empty.
    assert_eq!(value(&text, r#"fawkes_pubsub_publish_seconds_bucket{le="+Inf"}"#), Some(0.0), "{text}");
    assert_eq!(value(&text, "fawkes_pubsub_publish_seconds_count"), Some(0.0), "{text}");

    // A join that names its user is tracked in Presence.
    let (mut ann, _) =
        tokio_tungstenite::connect_async(format!("ws://{addr}/socket/websocket?vsn=2.0.0")).await.expect("connect");
    send(&mut ann, json!(["1", "1", "room:b", "phx_join", {"user": "ann"}])).await;
    assert_eq!(recv(&mut ann).await[4]["status"], "ok");
    let state = recv(&mut ann).await;
    assert_eq!(state[3], "presence_state");
    // Changes go out once per presence window: ann's own entry is in the state or the next diff.
    if state[4].get("ann").is_none() {
        let diff = recv(&mut ann).await;
        assert_eq!((&diff[3], diff[4]["joins"].get("ann").is_some()), (&json!("presence_diff"), true), "{diff}");
    }
    let text = scrape(addr).await;
    assert_eq!(value(&text, "fawkes_presence_entries"), Some(1.0), "{text}");
    assert_eq!(value(&text, "fawkes_presence_topics"), Some(1.0), "{text}");
    assert_eq!(value(&text, "fawkes_joins_total"), Some(2.0), "{text}");

    // Every metric has its HELP and TYPE lines.
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let name = line.split(['{', ' ']).next().expect("a name");
        let base = ["_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(name);
        let base = if text.contains(&format!("# TYPE {base} histogram")) { base } else { name };
        assert!(text.contains(&format!("# HELP {base} ")), "no HELP for {name}:\n{text}");
        assert!(text.contains(&format!("# TYPE {base} ")), "no TYPE for {name}:\n{text}");
    }
}
