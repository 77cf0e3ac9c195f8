//! Phoenix Channels for Rust: channels, PubSub and pluggable transports.
//!
//! This facade only re-exports: [`fawkes_channel`] (channels, routing, sessions, PubSub) at its
//! root, [`serializer`], and one module per crate behind a feature of the same purpose, all on by
//! default: the transports `ws`, `longpoll`, `sse` and `db`, and the PubSub adapters that make
//! several nodes one cluster, `redis` and `postgres`. It pulls in no command-line or logging
//! setup: the `fawkes` binary, its demo app, metrics and graceful shutdown live in the
//! `fawkes-server` crate.
//!
//! ```no_run
//! use fawkes::{Channel, Endpoint, HandleIn, Payload, Router, SocketRef};
//! use serde_json::{json, Value};
//!
//! struct Counter(u64);
//! impl Channel for Counter {
//!     async fn join(&mut self, _: Payload, _: &mut SocketRef) -> Result<Value, Value> {
//!         Ok(json!({}))
//!     }
//!     async fn handle_in(&mut self, _: &str, _: Payload, socket: &mut SocketRef) -> HandleIn {
//!         self.0 += 1;
//!         socket.broadcast("count", json!({"n": self.0}));
//!         HandleIn::NoReply
//!     }
//! }
//!
//! # async fn run() -> std::io::Result<()> {
//! let endpoint = Endpoint::new(Router::new().channel("counter:*", || Counter(0)));
//! let app = axum::Router::new()
//!     .route_service("/socket/websocket", fawkes::ws::WebSocketService::new(endpoint));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:4000").await?;
//! axum::serve(listener, app).await
//! # }
//! ```
#![forbid(unsafe_code)]

pub use fawkes_channel::*;
#[cfg(feature = "postgres")]
pub use fawkes_pubsub_postgres as pubsub_postgres;
#[cfg(feature = "redis")]
pub use fawkes_pubsub_redis as pubsub_redis;
pub use fawkes_serializer as serializer;
#[cfg(feature = "db")]
pub use fawkes_transport_db as db;
#[cfg(feature = "longpoll")]
pub use fawkes_transport_longpoll as longpoll;
#[cfg(feature = "sse")]
pub use fawkes_transport_sse as sse;
#[cfg(feature = "ws")]
pub use fawkes_transport_ws as ws;
