//! Channels, topic routing, the socket [`Session`] state machine, and [`PubSub`].
//!
//! This crate is everything above the transport. A transport turns a connection into a
//! [`Session`] with [`Endpoint::connect`], feeds it every inbound [`Frame`] with
//! [`Session::handle_frame`], and sends every frame that [`Session::outbound`] yields, until that
//! yields a [`CloseReason`]. Serialization, heartbeats, joins, replies, broadcasts and limits all
//! live here, so a transport is only glue between its I/O and those three calls.
//!
//! A complete transport over an in-memory pipe:
//!
//! ```
//! use fawkes_channel::{Channel, ConnectInfo, Endpoint, HandleIn, Payload, Router, SocketRef};
//! use fawkes_serializer::Frame;
//! use serde_json::{json, Value};
//!
//! struct Echo;
//! impl Channel for Echo {
//!     async fn join(&mut self, _: Payload, _: &mut SocketRef) -> Result<Value, Value> {
//!         Ok(json!({"welcome": true}))
//!     }
//!     async fn handle_in(&mut self, _: &str, payload: Payload, _: &mut SocketRef) -> HandleIn {
//!         HandleIn::ok(payload)
//!     }
//! }
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let endpoint = Endpoint::new(Router::new().channel("echo:*", || Echo));
//!
//! // The transport: connect with the query string's params, then move frames both ways.
//! let info = ConnectInfo::new("memory", true).with_query(Some("vsn=2.0.0"));
//! let mut session = endpoint.connect(info).await?;
//! let mut outbound = session.outbound();
//!
//! session.handle_frame(Frame::text(r#"["1","1","echo:a","phx_join",{}]"#)).await?;
//! session.handle_frame(Frame::text(r#"["1","2","echo:a","say",{"hi":1}]"#)).await?;
//!
//! let reply = outbound.recv().await?;
//! assert_eq!(reply, Frame::text(r#"["1","1","echo:a","phx_reply",{"response":{"welcome":true},"status":"ok"}]"#));
//! let echo = outbound.recv().await?;
//! assert_eq!(echo, Frame::text(r#"["1","2","echo:a","phx_reply",{"response":{"hi":1},"status":"ok"}]"#));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```
#![forbid(unsafe_code)]

mod channel;
mod config;
mod endpoint;
mod origin;
mod outbox;
mod pubsub;
mod router;
mod session;
mod socket;
mod task;

pub use channel::{Channel, HandleIn, Pusher, SocketRef, StopReason, Terminate, reason};
pub use config::{Config, JoinRate, SlowConsumerPolicy};
pub use endpoint::{Endpoint, EndpointBuilder};
pub use fawkes_serializer::{Broadcast, Frame, Payload, Ref, ReplyStatus, Serializer};
pub use origin::OriginCheck;
pub use outbox::{CloseReason, Outbound};
pub use pubsub::{Adapter, BroadcastFrames, LocalAdapter, PubSub, RemoteInbound, SubscriberId, Subscription};
pub use router::Router;
pub use session::Session;
pub use socket::{Accept, ConnectError, ConnectFn, ConnectInfo, SocketHandler, parse_query};
