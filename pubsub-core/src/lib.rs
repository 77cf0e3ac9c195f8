//! The contract between Fawkes nodes, for PubSub adapter authors.
//!
//! A Fawkes cluster is nodes that share broadcasts, presence and requests to one node through a
//! backend (Redis, PostgreSQL, a message bus). This crate is the bottom of that stack and all an
//! adapter depends on:
//!
//! | item | job |
//! | --- | --- |
//! | [`NodeId`] | a node's identity, drawn at random when it starts |
//! | [`Adapter`] | what an adapter implements: carry opaque bytes to every node or to one |
//! | [`RemoteInbound`] | where an adapter hands what arrives, and reports its backend's state |
//! | [`OutgoingQueue`], [`Outgoing`], [`Backoff`] | the bounded send queue and reconnect delay a network adapter needs |
//! | [`envelope`] | the bytes nodes exchange: [`Envelope`], [`Body`], their codec, [`EnvelopeError`] |
//! | [`HistoryStore`], [`HistorySink`], [`Position`], [`Entry`] | topics' histories as a store sees them (the history layer is in `fawkes-channel`) |
//! | [`Cluster`] | a node's link through its adapter: sends envelopes, answers requests ([`RequestError`], [`ServiceGuard`]), counts ([`ClusterStats`]) |
//!
//! Topic subscriptions, fan-out to sockets and presence live above, in `fawkes-channel`, whose
//! `PubSub` holds a [`Cluster`] and re-exports these items; an adapter never needs that crate.
//! `docs/writing-an-adapter.md` walks through writing one.
//!
//! # Example: two nodes linked in memory
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use std::time::Duration;
//!
//! use bytes::Bytes;
//! use fawkes_pubsub_core::{Adapter, Body, Cluster, RemoteInbound};
//! use fawkes_serializer::Broadcast;
//!
//! /// Nodes in one process, wired together (a stand-in for a real network).
//! #[derive(Clone, Default)]
//! struct Wire(Arc<Mutex<Vec<RemoteInbound>>>);
//!
//! impl Adapter for Wire {
//!     fn start(&self, inbound: RemoteInbound) {
//!         inbound.connected(true);
//!         self.0.lock().unwrap().push(inbound);
//!     }
//!     fn broadcast(&self, message: Bytes) {
//!         // Each node ignores its own messages and those addressed to another node.
//!         let nodes = self.0.lock().unwrap().clone();
//!         for node in nodes {
//!             node.deliver(message.clone());
//!         }
//!     }
//! }
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let wire = Wire::default();
//! let a = Cluster::with_adapter(wire.clone());
//! let b = Cluster::with_adapter(wire);
//!
//! // The layer above registers for what arrives, then starts the adapter.
//! let (tx, mut heard) = tokio::sync::mpsc::unbounded_channel();
//! b.on_broadcast(move |from, broadcast| {
//!     let _ = tx.send((from, broadcast));
//! });
//! let _echo = b.serve("echo", |_from, body: Bytes| async move { body });
//! a.start();
//! b.start();
//!
//! let news = Broadcast { topic: "news".into(), event: "headline".into(), payload: serde_json::json!({"title": "hi"}).into() };
//! a.send(None, &Body::Broadcast(news));
//! let (from, broadcast) = heard.recv().await.unwrap();
//! assert_eq!((from, broadcast.event.as_str()), (a.node(), "headline"));
//!
//! // A request to one node, answered by the service it serves.
//! let answer = a.request(b.node(), "echo", Bytes::from_static(b"ping"), Duration::from_secs(1)).await;
//! assert_eq!(answer.unwrap(), "ping");
//! assert_eq!((a.stats().sent, b.stats().received), (2, 2));
//! # });
//! ```
#![forbid(unsafe_code)]

mod adapter;
mod cluster;
pub mod envelope;
mod history;
mod node;
mod outgoing;
mod stats;

pub use adapter::{Adapter, RemoteInbound};
pub use cluster::{Cluster, RequestError, ServiceGuard};
pub use envelope::{Body, Envelope, EnvelopeError};
pub use history::{
    Entry, HistoryError, HistoryOptions, HistorySink, HistorySize, HistoryStore, MalformedPosition, Position, ReadAfter,
};
pub use node::NodeId;
pub use outgoing::{Backoff, Outgoing, OutgoingQueue};
pub use stats::{ClusterStats, LATENCY_BOUNDS, LatencyHistogram};

/// `docs/writing-an-adapter.md`, whose code is compiled with the doc tests.
#[cfg(doctest)]
#[doc = include_str!("../../docs/writing-an-adapter.md")]
struct WritingAnAdapter;
