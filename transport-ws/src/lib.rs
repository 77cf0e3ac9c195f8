//! WebSocket transport for Fawkes channels, on hyper and tokio-tungstenite.
//!
//! [`WebSocketService`] is a tower `Service` that answers the WebSocket upgrade of a Phoenix
//! client (`{path}/websocket?vsn=2.0.0&...`) and then moves frames between the socket and a
//! [`Session`](fawkes_channel::Session). Mount it in any hyper or axum app. Graceful shutdown
//! (close every socket with 1001, wait for them) is `Endpoint::shutdown` and
//! `Endpoint::drained`; `fawkes_server::serve` does both for the `fawkes` binary.
//!
//! ```no_run
//! use std::net::SocketAddr;
//!
//! use axum::extract::{ConnectInfo, Request};
//! use fawkes_channel::{Endpoint, Router};
//! use fawkes_transport_ws::{PeerAddr, WebSocketService};
//!
//! # async fn run() -> std::io::Result<()> {
//! let endpoint = Endpoint::new(Router::new());
//! let app = axum::Router::new()
//!     .route_service("/socket/websocket", WebSocketService::new(endpoint.clone()))
//!     // Optional: the peer's address, for `Config::max_connections_per_ip`.
//!     .layer(axum::middleware::map_request(|mut req: Request| async move {
//!         if let Some(ConnectInfo(addr)) = req.extensions().get::<ConnectInfo<SocketAddr>>().copied() {
//!             req.extensions_mut().insert(PeerAddr(addr));
//!         }
//!         req
//!     }));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:4000").await?;
//! axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>()).await
//! # }
//! ```
//!
//! What the peer sees:
//! - the upgrade is refused with 403 when the connect callback refuses, the origin check fails or
//!   `vsn` is unsupported; 400 for a request that is not a WebSocket upgrade;
//! - the `phoenix` subprotocol is echoed, and the token in `base64url.bearer.phx.<token>` goes to
//!   the connect callback as [`ConnectInfo::auth_token`](fawkes_channel::ConnectInfo);
//! - close codes: 1000 heartbeat timeout or application disconnect, 1001 server shutdown, 1008
//!   slow consumer, 1009 frame larger than `max_frame_size`, 1011 malformed frame;
//! - the close handshake (RFC 6455 §5.5.1): a client's close frame is answered with a close
//!   frame echoing its code, then the server ends the TCP connection. A close the server starts
//!   is written and flushed first; the server then waits briefly (2 s) for the client's answer
//!   and ends the connection;
//! - a client that stops reading: its queue reaches the endpoint's `outbound_byte_limit` and it is
//!   closed as a slow consumer (1008). A write already waiting on it has 10 s to finish; then the
//!   connection is dropped without a close frame (none could be written). Until then it holds its
//!   queue, at most 64 KiB of frames taken to write, at most 64 KiB of them gathered for one
//!   system call, and the write buffer ([`WsOptions::write_buffer_size`] plus one frame);
//! - writes: the frames of one batch go out in one system call, up to 64 KiB (a larger frame
//!   alone), and nothing is kept between batches.
#![forbid(unsafe_code)]

mod coalesce;
mod connection;
mod service;

pub use fawkes_channel::PeerAddr;
pub use service::{WebSocketService, WsOptions};
