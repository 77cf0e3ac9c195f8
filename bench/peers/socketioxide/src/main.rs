//! The socketioxide peer of the Fawkes benchmarks: the same job as the Fawkes demo room.
//!
//! - `join` (room, ack): joins the room, acks `{}`.
//! - `ping` (data, ack): acks the data unchanged.
//! - `new_msg` (data, ack): emits `new_msg` `{body, user}` to everyone in `data.room`, the sender
//!   included (as a Phoenix broadcast), and acks `{}`.
//!
//! Usage: `socketioxide-peer [port]` (default 4002; listens on 127.0.0.1).

use serde_json::{Value, json};
use socketioxide::SocketIo;
use socketioxide::extract::{AckSender, Data, SocketRef};

async fn on_connect(socket: SocketRef) {
    socket.on("join", async |socket: SocketRef, Data::<Value>(room), ack: AckSender| {
        if let Some(room) = room.as_str() {
            socket.join(room.to_owned());
        }
        let _ = ack.send(&json!({}));
    });
    socket.on("ping", async |Data::<Value>(data), ack: AckSender| {
        let _ = ack.send(&data);
    });
    socket.on("new_msg", async |socket: SocketRef, Data::<Value>(data), ack: AckSender| {
        if let Some(room) = data.get("room").and_then(Value::as_str) {
            let body = data.get("body").cloned().unwrap_or(Value::Null);
            let _ = socket.within(room.to_owned()).emit("new_msg", &json!({"body": body, "user": "anonymous"})).await;
        }
        let _ = ack.send(&json!({}));
    });
}

// One thread, as the server gets one core in the comparison. On the multi-thread runtime the
// events of one socket can be handled out of order: socketioxide spawns a task per event, and
// tokio runs the most recently spawned task first, so a burst of broadcasts would be delivered
// out of order.
#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let port: u16 = std::env::args().nth(1).map(|p| p.parse()).transpose()?.unwrap_or(4002);
    // The same per-socket bound on queued outbound packets as Fawkes's outbound_queue_limit.
    let (layer, io) = SocketIo::builder().max_buffer_size(1024).build_layer();
    io.ns("/", on_connect);
    let app = axum::Router::new().layer(layer);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    eprintln!("socketioxide 0.18.9 listening on http://127.0.0.1:{port}");
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
