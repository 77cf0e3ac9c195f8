//! A lean reference server for the fan-out and echo workloads, built directly on tokio and
//! tokio-tungstenite, to measure Fawkes against what the same socket library does with nothing
//! on top: no sessions, channels, serializers, outbox bounds or heartbeat timeouts. It speaks
//! just enough of Phoenix's V2 JSON protocol for `fawkes-bench ws` (`phx_join`, `heartbeat`,
//! `ping`, `new_msg`), every socket joins one room, and a `new_msg` is encoded once and its
//! frame queued to every member, as Fawkes does. Not shipped; a ceiling for the benchmarks.
//!
//! ```sh
//! taskset -c 1 target/release/fawkes-bench-reference 127.0.0.1:4000 &
//! taskset -c 0 target/release/fawkes-bench --url http://127.0.0.1:4000 ws --clients 19800 \
//!     --mode broadcast --window 16 --count 200 --seconds 120
//! ```

use std::sync::{Arc, Mutex};

use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

/// Frames written per flush, as Fawkes's WebSocket transport.
const BATCH: usize = 256;

type Room = Arc<Mutex<Vec<mpsc::UnboundedSender<Utf8Bytes>>>>;

fn main() -> std::io::Result<()> {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:4000".to_owned());
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        let listener = TcpListener::bind(&addr).await?;
        eprintln!("reference server listening on {}", listener.local_addr()?);
        let room: Room = Arc::default();
        loop {
            let (stream, _) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            tokio::spawn(connection(stream, room.clone()));
        }
    })
}

async fn connection(stream: TcpStream, room: Room) {
    let config = WebSocketConfig::default().read_buffer_size(1024).write_buffer_size(16 * 1024);
    let Ok(ws) = tokio_tungstenite::accept_async_with_config(stream, Some(config)).await else { return };
    let (mut sink, mut stream) = ws.split();
    let (tx, mut rx) = mpsc::unbounded_channel::<Utf8Bytes>();
    let mut batch = Vec::new();
    loop {
        tokio::select! {
            n = rx.recv_many(&mut batch, BATCH) => {
                if n == 0 {
                    return;
                }
                for frame in batch.drain(..) {
                    if sink.feed(Message::Text(frame)).await.is_err() {
                        return;
                    }
                }
                if sink.flush().await.is_err() {
                    return;
                }
            }
            msg = stream.next() => match msg {
                Some(Ok(Message::Text(text))) => handle(&text, &tx, &room),
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            },
        }
    }
}

/// Answers one client message: `[join_ref, ref, topic, event, payload]`.
fn handle(text: &str, tx: &mpsc::UnboundedSender<Utf8Bytes>, room: &Room) {
    let Ok(Value::Array(mut msg)) = serde_json::from_str::<Value>(text) else { return };
    if msg.len() != 5 {
        return;
    }
    let payload = msg.pop().unwrap_or(Value::Null);
    let event = msg.pop().unwrap_or(Value::Null);
    let topic = msg.pop().unwrap_or(Value::Null);
    let msg_ref = msg.pop().unwrap_or(Value::Null);
    let join_ref = msg.pop().unwrap_or(Value::Null);
    let reply = |response: Value| {
        let frame = json!([join_ref, msg_ref, topic, "phx_reply", {"status": "ok", "response": response}]);
        let _ = tx.send(Utf8Bytes::from(frame.to_string()));
    };
    match event.as_str() {
        Some("phx_join") => {
            // Subscribed before the reply, so every broadcast after the client sees "ok" reaches it.
            room.lock().map(|mut members| members.push(tx.clone())).ok();
            reply(json!({}));
        }
        Some("new_msg") => {
            let body = payload.get("body").cloned().unwrap_or(Value::Null);
            let frame = json!([null, null, topic, "new_msg", {"body": body, "user": "anonymous"}]);
            let frame = Utf8Bytes::from(frame.to_string());
            if let Ok(mut members) = room.lock() {
                members.retain(|member| member.send(frame.clone()).is_ok());
            }
            reply(json!({}));
        }
        Some("ping") => reply(payload),
        _ => reply(json!({})),
    }
}
