//! Channels, topic routing, the socket [`Session`] state machine, and [`PubSub`].
//!
//! This crate is everything above the transport. A transport turns a connection into a
//! [`Session`] with [`Endpoint::connect`], feeds it every inbound [`Frame`] with
//! [`Session::handle_frame`], and sends every frame that [`Session::outbound`] yields, until that
//! yields a [`CloseReason`]. Serialization, heartbeats, joins, replies, broadcasts and limits all
//! live here, so a transport is only glue between its I/O and those three calls.
//!
//! Inside, the layers depend one way, bottom up: [`PubSub`] (topic subscriptions, encode-once
//! fan-out) on the node-to-node contract of `fawkes-pubsub-core` (re-exported here: [`NodeId`],
//! [`Adapter`], [`RemoteInbound`], ...); [`Presence`] on [`PubSub`]; channels, [`Session`] and
//! [`Endpoint`] on top. An adapter author needs `fawkes-pubsub-core` alone.
//!
//! # Writing a transport
//!
//! The WebSocket, long-poll, SSE and database transports use nothing but the items below; a new
//! transport needs nothing else (if it does, that is a defect of this contract). The
//! `fawkes-testkit` crate checks a transport against the protocol with one function call.
//!
//! | item | the transport's side of the contract |
//! | --- | --- |
//! | [`ConnectInfo`] | What is known about the connecting peer: `ConnectInfo::new(name, binary_frames)` then [`with_query`](ConnectInfo::with_query) (fills `vsn` and the connect params), plus `auth_token`, `headers`, `peer_addr` where the transport has them (HTTP transports read [`PeerAddr`] from the request's extensions). Remove the transport's own query params (e.g. a session token) from `params`. A transport that cannot carry binary frames says so: binary payloads then reach it as text (`{"binary": "<base64>"}`). |
//! | [`Endpoint::connect`] | Runs the origin check and the application's connect callback. [`ConnectError`] is a refusal: answer it as one (HTTP 403), except [`ConnectError::ShuttingDown`] (the HTTP transports answer status 500, which phoenix.js retries; WebSocket closes). Never connect before the peer is known to be there. |
//! | [`Session::handle_frame`] | Every inbound frame, in order, one at a time (it takes `&mut self`). It waits while the target channel's mailbox is full: that is backpressure, so read nothing more from the peer meanwhile. `Err(reason)` means the socket is closed (malformed or oversized frame, or closed already): stop reading, deliver what [`Outbound`] still yields, then close. |
//! | [`Session::outbound`] → [`Outbound`] | Call once. [`recv`](Outbound::recv) / [`recv_many`](Outbound::recv_many) yield frames in order, then `Err(CloseReason)` once the socket is closed and everything queued before was taken. Cancel-safe. Only take frames you can send: a peer that stops reading must leave frames in the queue, where [`Config::outbound_queue_limit`] and [`SlowConsumerPolicy`] bound them. Never buffer without a bound in the transport: [`recv_many_within`](Outbound::recv_many_within) takes a batch within a byte budget. |
//! | [`CloseSignal`] | A writer waiting on a peer that stopped reading never sees the close through [`Outbound`]: wait on [`Session::close_signal`] beside the write, and once the socket is closed give the write a short grace, then drop the connection. A slow consumer is that peer. |
//! | [`CloseReason`] | Map it to the transport's own signal (WebSocket: 1000 heartbeat timeout or disconnect, 1001 shutdown, 1008 slow consumer, 1009 frame too large, 1011 malformed; [`CloseReason::TransportClosed`] means the peer went away, so there is no one to tell). |
//! | dropping the [`Session`] | When the peer is gone, drop the session: its channels terminate, the endpoint forgets the socket ([`Endpoint::connected`], [`Endpoint::drained`]). |
//! | heartbeats | [`Outbound`] closes a socket that sent nothing for [`Config::heartbeat_timeout`]. A transport whose clients show they are alive other than by frames (a long-poll `GET`) calls [`Outbound::keep_alive`]. |
//! | limits | [`Endpoint::config`]: refuse a frame over [`Config::max_frame_size`] before reading all of it ([`Session::close`] with [`CloseReason::FrameTooLarge`], or an HTTP 413 where the request is not the socket). |
//! | sessions between requests | For transports whose peer comes back with a token, build on `fawkes-http`: it signs session tokens, keeps sessions between requests and forwards requests to the owning node. A token that does not verify means "session gone" (410), never a refusal. |
//! | several nodes | A session lives on the node that opened it. Put [`PubSub::node`] in the token, and when a request reaches another node, forward it with [`PubSub::request`] to the owner, which answers through [`PubSub::serve`] (`fawkes-http` does so for long-poll and SSE; no sticky sessions needed). |
//! | shutdown | [`Endpoint::shutdown`] closes every socket with [`CloseReason::Shutdown`]; the transport tells its peers and [`Endpoint::drained`] completes when all are dropped. [`Endpoint::is_shutting_down`] lets a transport refuse new work. |
//!
//! A complete toy transport: newline-delimited text frames over any byte stream (here
//! `tokio::io::duplex`), a reader loop feeding the session and a writer loop draining it, which
//! tells the peer why the socket closed.
//!
//! ```
//! use fawkes_channel::{Channel, CloseReason, ConnectError, ConnectInfo, Endpoint, HandleIn, Payload, Router, SocketRef};
//! use fawkes_serializer::Frame;
//! use serde_json::{json, Value};
//! use tokio::io::{AsyncBufReadExt as _, AsyncRead, AsyncWrite, AsyncWriteExt as _, BufReader};
//!
//! /// Serves one connection: one text frame per line each way; a last line `closed: <reason>`.
//! async fn serve_lines<S>(endpoint: Endpoint, io: S, query: &str) -> Result<(), ConnectError>
//! where
//!     S: AsyncRead + AsyncWrite + Send + 'static,
//! {
//!     let info = ConnectInfo::new("lines", false).with_query(Some(query));
//!     let mut session = endpoint.connect(info).await?;
//!     let mut outbound = session.outbound();
//!     let (read, mut write) = tokio::io::split(io);
//!     let mut writer = tokio::spawn(async move {
//!         let reason = loop {
//!             match outbound.recv().await {
//!                 Ok(frame) => {
//!                     write.write_all(frame.as_bytes()).await?;
//!                     write.write_all(b"\n").await?;
//!                 }
//!                 Err(reason) => break reason,
//!             }
//!         };
//!         if reason != CloseReason::TransportClosed {
//!             write.write_all(format!("closed: {reason}\n").as_bytes()).await?;
//!         }
//!         write.shutdown().await
//!     });
//!     // A real transport bounds the line length by `endpoint.config().max_frame_size`.
//!     let mut lines = BufReader::new(read).lines();
//!     loop {
//!         tokio::select! {
//!             line = lines.next_line() => match line {
//!                 Ok(Some(line)) => {
//!                     if session.handle_frame(Frame::text(line)).await.is_err() {
//!                         break; // closed (e.g. a malformed frame): the writer says why
//!                     }
//!                 }
//!                 Ok(None) | Err(_) => break, // the peer went away
//!             },
//!             _ = &mut writer => return Ok(()), // the server closed the socket
//!         }
//!     }
//!     drop(session); // channels terminate; the writer delivers what is left, then ends
//!     let _ = writer.await;
//!     Ok(())
//! }
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
//! let (client, server) = tokio::io::duplex(64 * 1024);
//! let served = tokio::spawn(serve_lines(endpoint.clone(), server, "vsn=2.0.0"));
//!
//! // The peer: writes frames, reads frames.
//! let (read, mut write) = tokio::io::split(client);
//! let mut lines = BufReader::new(read).lines();
//! write.write_all(b"[\"1\",\"1\",\"echo:a\",\"phx_join\",{}]\n").await?;
//! write.write_all(b"[\"1\",\"2\",\"echo:a\",\"say\",{\"hi\":1}]\n").await?;
//! assert_eq!(
//!     lines.next_line().await?.as_deref(),
//!     Some(r#"["1","1","echo:a","phx_reply",{"response":{"welcome":true},"status":"ok"}]"#)
//! );
//! assert_eq!(
//!     lines.next_line().await?.as_deref(),
//!     Some(r#"["1","2","echo:a","phx_reply",{"response":{"hi":1},"status":"ok"}]"#)
//! );
//!
//! // The server side closes: the peer is told why, then the stream ends.
//! endpoint.shutdown();
//! assert_eq!(lines.next_line().await?.as_deref(), Some("closed: server shutting down"));
//! assert_eq!(lines.next_line().await?, None);
//! served.await??;
//! endpoint.drained().await;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```
//!
//! A malformed line closes only that socket, as Phoenix does; the toy transport then tells
//! `closed: malformed frame: ...` and ends the stream.
#![forbid(unsafe_code)]

mod channel;
mod cluster;
mod config;
mod endpoint;
mod history;
mod metrics;
mod origin;
mod outbox;
mod presence;
mod pubsub;
mod registry;
mod router;
mod session;
mod socket;
mod task;

pub use channel::{Channel, HandleIn, Pusher, SocketRef, StopReason, Terminate, reason};
pub use config::{Config, ConnectRate, JoinRate, SlowConsumerPolicy};
pub use endpoint::{Endpoint, EndpointBuilder};
pub use fawkes_pubsub_core::{
    Adapter, Backoff, ClusterStats, EnvelopeError, LATENCY_BOUNDS, LatencyHistogram, NodeId, Outgoing, OutgoingQueue,
    RemoteInbound, RequestError, ServiceGuard,
};
pub use fawkes_serializer::{Broadcast, Frame, Payload, Ref, ReplyStatus, Serializer};
pub use history::{
    Entry, History, HistoryError, HistoryOptions, HistorySink, HistorySize, HistoryStats, HistoryStore,
    MalformedPosition, MemoryHistory, Position, ReadAfter, Recovery,
};
pub use metrics::EndpointStats;
pub use origin::{OriginCheck, OriginPatternError};
pub use outbox::{CloseReason, CloseSignal, Outbound};
pub use presence::{ClusterOptions, Presence, PresenceError, PresenceOptions};
pub use pubsub::{BroadcastFrames, PubSub, SubscriberId, Subscription};
pub use router::Router;
pub use session::Session;
pub use socket::{Accept, ConnectError, ConnectFn, ConnectInfo, PeerAddr, SocketHandler, parse_query};
