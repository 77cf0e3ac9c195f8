//! WebSocket transport for Fawkes channels, on hyper and tokio-tungstenite.
//!
//! [`WebSocketService`] is a tower `Service` that answers the WebSocket upgrade of a Phoenix
//! client (`{path}/websocket?vsn=2.0.0&...`) and then moves frames between the socket and a
//! [`Session`](fawkes_channel::Session). Mount it in any hyper or axum app, or call [`serve`].
//!
//! ```no_run
//! use fawkes_channel::{Endpoint, Router};
//! use fawkes_transport_ws::{serve, WebSocketService};
//!
//! # async fn run() -> std::io::Result<()> {
//! let endpoint = Endpoint::new(Router::new());
//!
//! // In an axum app:
//! let app: axum::Router = axum::Router::new()
//!     .route_service("/socket/websocket", WebSocketService::new(endpoint.clone()));
//!
//! // Or on its own, at /socket/websocket, until Ctrl-C:
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:4000").await?;
//! serve(listener, "/socket", endpoint, async { let _ = tokio::signal::ctrl_c().await; }).await
//! # }
//! ```
//!
//! What the peer sees:
//! - the upgrade is refused with 403 when the connect callback refuses, the origin check fails or
//!   `vsn` is unsupported; 400 for a request that is not a WebSocket upgrade;
//! - the `phoenix` subprotocol is echoed, and the token in `base64url.bearer.phx.<token>` goes to
//!   the connect callback as [`ConnectInfo::auth_token`](fawkes_channel::ConnectInfo);
//! - close codes: 1000 heartbeat timeout or application disconnect, 1001 server shutdown, 1008
//!   slow consumer, 1009 frame larger than `max_frame_size`, 1011 malformed frame.
#![forbid(unsafe_code)]

mod connection;
mod serve;
mod service;

pub use fawkes_channel::PeerAddr;
pub use serve::serve;
pub use service::{WebSocketService, WsOptions};
