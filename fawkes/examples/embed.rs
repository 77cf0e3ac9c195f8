//! A custom channel mounted in an existing axum app, next to the app's own routes, over WebSocket
//! and with a long-poll fallback.
//!
//! `cargo run -p fawkes --example embed`, then connect a phoenix client to
//! `ws://127.0.0.1:4001/live` (params `{user: "ann"}`) and join `counter:anything`. Clients behind
//! networks that block WebSocket fall back to long-poll with `longPollFallbackMs`.

use fawkes::longpoll::LongPollService;
use fawkes::ws::WebSocketService;
use fawkes::{Accept, Channel, ConnectError, ConnectInfo, Endpoint, HandleIn, Payload, Router, SocketRef, reason};
use serde_json::{Value, json};

/// Everyone on `counter:{name}` sees the count go up.
#[derive(Default)]
struct Counter {
    clicks: u64,
}

impl Channel for Counter {
    async fn join(&mut self, _params: Payload, socket: &mut SocketRef) -> Result<Value, Value> {
        let user = socket.assign::<User>().map(|u| u.0.clone());
        Ok(json!({ "hello": user }))
    }

    async fn handle_in(&mut self, event: &str, _payload: Payload, socket: &mut SocketRef) -> HandleIn {
        match event {
            "click" => {
                self.clicks += 1;
                socket.broadcast("clicked", json!({ "by_this_socket": self.clicks }));
                HandleIn::ok(json!({}))
            }
            _ => HandleIn::error(reason("unknown event")),
        }
    }
}

#[derive(Clone)]
struct User(String);

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let endpoint = Endpoint::builder()
        .router(Router::new().channel("counter:*", Counter::default))
        .on_connect(|info: &ConnectInfo| match info.params.get("user") {
            Some(user) => Ok(Accept::new().assign(User(user.clone()))),
            None => Err(ConnectError::refused("a user param is required")),
        })
        .build();

    let app = axum::Router::new()
        .route("/health", axum::routing::get(|| async { "ok" }))
        .route_service("/live/websocket", WebSocketService::new(endpoint.clone()))
        .route_service("/live/longpoll", LongPollService::new(endpoint));

    let listener = tokio::net::TcpListener::bind("127.0.0.1:4001").await?;
    let addr = listener.local_addr()?;
    println!(
        "embed: serving http://{addr}/health; phoenix socket at ws://{addr}/live (params {{user: \"ann\"}}), join counter:*"
    );
    axum::serve(listener, app).await
}
