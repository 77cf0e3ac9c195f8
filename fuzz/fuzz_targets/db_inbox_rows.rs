//! Database client rows: each `fawkes_inbox` row is one V2 JSON text frame of a logical client,
//! handed to that client's session as `transport-db` does (`ConnectInfo` "db", text only). The
//! input is split on newlines into consecutive rows of one client. Decoding and handling never
//! panic, and a malformed row closes only that client's session.
#![no_main]

use std::sync::OnceLock;

use bytes::Bytes;
use fawkes_channel::{Channel, ConnectInfo, Endpoint, Frame, HandleIn, Payload, Router, SocketRef};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

#[derive(Default)]
struct Room;

impl Channel for Room {
    async fn join(&mut self, params: Payload, _: &mut SocketRef) -> Result<Value, Value> {
        match params.as_json().and_then(|p| p.get("refuse")) {
            Some(_) => Err(Value::String("refused".into())),
            None => Ok(Value::Null),
        }
    }

    async fn handle_in(&mut self, event: &str, payload: Payload, socket: &mut SocketRef) -> HandleIn {
        match event {
            "new_msg" => {
                socket.broadcast("new_msg", payload.as_json().cloned().unwrap_or(Value::Null));
                HandleIn::ok(Value::Null)
            }
            _ => HandleIn::ok(payload),
        }
    }
}

fn runtime_and_endpoint() -> &'static (tokio::runtime::Runtime, Endpoint) {
    static ONCE: OnceLock<(tokio::runtime::Runtime, Endpoint)> = OnceLock::new();
    ONCE.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let endpoint = Endpoint::new(Router::new().channel("room:*", Room::default));
        (runtime, endpoint)
    })
}

fuzz_target!(|data: &[u8]| {
    let (runtime, endpoint) = runtime_and_endpoint();
    runtime.block_on(async {
        let mut info = ConnectInfo::new("db", false).with_query(Some("vsn=2.0.0"));
        info.params.insert("client_id".into(), "fuzz".into());
        let mut session = endpoint.connect(info).await.expect("the db client connects");
        let mut outbound = session.outbound();
        for row in data.split(|&b| b == b'\n') {
            if session.handle_frame(Frame::Text(Bytes::copy_from_slice(row))).await.is_err() {
                break;
            }
            tokio::task::yield_now().await;
        }
        let mut frames = Vec::new();
        let _ = outbound.try_recv_many(&mut frames, usize::MAX);
        drop(session);
        // Let the channel tasks see their sockets close.
        for _ in 0..4 {
            tokio::task::yield_now().await;
        }
        assert_eq!(endpoint.connected(), 0, "every db client session ended");
    });
});
