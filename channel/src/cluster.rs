//! What nodes say to each other through an [`Adapter`](crate::Adapter): broadcasts, presence
//! replication and requests to one node. The adapter only moves the bytes made here.
//!
//! An envelope is `version (1) | kind (1) | origin node (8) | target node (8, 0 = every node) |
//! sequence (8) | body`, integers big-endian. The sequence number is the origin's own counter, so
//! no two envelopes are ever byte-identical (PostgreSQL folds identical notifications sent in
//! one transaction into one).

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use fawkes_serializer::{Broadcast, Payload};

const VERSION: u8 = 1;
const HEADER: usize = 2 + 8 + 8 + 8;

/// One node of a cluster: a random 64-bit id drawn when its [`PubSub`](crate::PubSub) is made, so
/// a restarted process is a new node and never inherits the state of the one it replaced.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(u64);

impl NodeId {
    pub(crate) fn random() -> NodeId {
        loop {
            let id = crate::random_u64();
            if id != 0 {
                return NodeId(id);
            }
        }
    }

    /// The id as a number (never 0).
    pub fn get(self) -> u64 {
        self.0
    }

    /// The node with this id; `None` for 0, which is no node.
    pub fn from_u64(id: u64) -> Option<NodeId> {
        (id != 0).then_some(NodeId(id))
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({:016x})", self.0)
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// Timing of the cluster's own traffic: presence heartbeats and how long a silent node is
/// trusted.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ClusterOptions {
    /// How often a node tells the others it is alive and how far its presence state has got.
    pub heartbeat_interval: Duration,
    /// A node not heard from for this long is taken for dead: its presences are removed from
    /// this node's lists (and come back if it does). Phoenix's default is 30 s.
    pub node_timeout: Duration,
}

impl Default for ClusterOptions {
    fn default() -> ClusterOptions {
        ClusterOptions { heartbeat_interval: Duration::from_secs(1), node_timeout: Duration::from_secs(30) }
    }
}

impl ClusterOptions {
    /// Sets [`ClusterOptions::heartbeat_interval`].
    pub fn heartbeat_interval(mut self, d: Duration) -> Self {
        self.heartbeat_interval = d;
        self
    }
    /// Sets [`ClusterOptions::node_timeout`].
    pub fn node_timeout(mut self, d: Duration) -> Self {
        self.node_timeout = d;
        self
    }
}

/// A node's view of its link to the others, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClusterStats {
    /// This node.
    pub node: NodeId,
    /// Whether the adapter says its backend is reachable (always true for a single node).
    pub connected: bool,
    /// Times the adapter lost its backend.
    pub disconnects: u64,
    /// Envelopes handed to the adapter.
    pub sent: u64,
    /// Envelopes from other nodes delivered here.
    pub received: u64,
    /// Envelopes the adapter could not send (its queue was full while the backend was away).
    pub dropped: u64,
    /// Envelopes that arrived unreadable and were ignored.
    pub malformed: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) connected: AtomicBool,
    pub(crate) disconnects: AtomicU64,
    pub(crate) sent: AtomicU64,
    pub(crate) received: AtomicU64,
    pub(crate) dropped: AtomicU64,
    pub(crate) malformed: AtomicU64,
    pub(crate) seq: AtomicU64,
}

/// Why a request to another node got no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// The PubSub has no adapter, so there are no other nodes.
    #[error("no other nodes: this PubSub has no adapter")]
    NotClustered,
    /// No answer came in time (the node may be gone).
    #[error("node {0} did not answer in time")]
    Timeout(NodeId),
    /// The node answered that it serves no such service.
    #[error("node {node} has no service {service:?}")]
    NoService {
        /// The node asked.
        node: NodeId,
        /// The service named.
        service: String,
    },
}

/// Why an envelope could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EnvelopeError {
    /// Shorter than its header or one of its fields.
    #[error("envelope truncated")]
    Truncated,
    /// Made by another version of this protocol.
    #[error("unknown envelope version {0}")]
    Version(u8),
    /// A kind this node does not know.
    #[error("unknown envelope kind {0}")]
    Kind(u8),
    /// Text that is not UTF-8, or a presence message that is not valid JSON.
    #[error("malformed envelope body: {0}")]
    Body(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Kind {
    Broadcast = 1,
    Presence = 2,
    Request = 3,
    Response = 4,
}

/// A decoded envelope.
#[derive(Debug)]
pub(crate) struct Envelope {
    pub(crate) origin: NodeId,
    pub(crate) target: Option<NodeId>,
    pub(crate) body: Body,
}

#[derive(Debug)]
pub(crate) enum Body {
    Broadcast(Broadcast),
    Presence(Bytes),
    Request { id: u64, service: String, body: Bytes },
    Response { id: u64, found: bool, body: Bytes },
}

pub(crate) fn encode(origin: NodeId, target: Option<NodeId>, seq: u64, body: &Body) -> Bytes {
    let (kind, size) = match body {
        Body::Broadcast(b) => (Kind::Broadcast, 9 + b.topic.len() + b.event.len() + payload_len(&b.payload)),
        Body::Presence(json) => (Kind::Presence, json.len()),
        Body::Request { service, body, .. } => (Kind::Request, 12 + service.len() + body.len()),
        Body::Response { body, .. } => (Kind::Response, 9 + body.len()),
    };
    let mut out = BytesMut::with_capacity(HEADER + size);
    out.put_u8(VERSION);
    out.put_u8(kind as u8);
    out.put_u64(origin.0);
    out.put_u64(target.map_or(0, |t| t.0));
    out.put_u64(seq);
    match body {
        Body::Broadcast(b) => {
            put_str(&mut out, &b.topic);
            put_str(&mut out, &b.event);
            match &b.payload {
                Payload::Json(v) => {
                    out.put_u8(0);
                    // Writing JSON into a growable buffer cannot fail.
                    let _ = serde_json::to_writer((&mut out).writer(), v);
                }
                Payload::Binary(bytes) => {
                    out.put_u8(1);
                    out.put_slice(bytes);
                }
            }
        }
        Body::Presence(json) => out.put_slice(json),
        Body::Request { id, service, body } => {
            out.put_u64(*id);
            put_str(&mut out, service);
            out.put_slice(body);
        }
        Body::Response { id, found, body } => {
            out.put_u64(*id);
            out.put_u8(u8::from(*found));
            out.put_slice(body);
        }
    }
    out.freeze()
}

fn payload_len(p: &Payload) -> usize {
    match p {
        Payload::Json(_) => 64,
        Payload::Binary(b) => b.len(),
    }
}

fn put_str(out: &mut BytesMut, s: &str) {
    out.put_u32(s.len() as u32);
    out.put_slice(s.as_bytes());
}

fn get_str(buf: &mut Bytes) -> Result<String, EnvelopeError> {
    let bytes = get_bytes(buf)?;
    String::from_utf8(bytes.to_vec()).map_err(|e| EnvelopeError::Body(e.to_string()))
}

fn get_bytes(buf: &mut Bytes) -> Result<Bytes, EnvelopeError> {
    if buf.remaining() < 4 {
        return Err(EnvelopeError::Truncated);
    }
    let len = buf.get_u32() as usize;
    if buf.remaining() < len {
        return Err(EnvelopeError::Truncated);
    }
    Ok(buf.split_to(len))
}

fn get_u64(buf: &mut Bytes) -> Result<u64, EnvelopeError> {
    if buf.remaining() < 8 {
        return Err(EnvelopeError::Truncated);
    }
    Ok(buf.get_u64())
}

pub(crate) fn decode(mut buf: Bytes) -> Result<Envelope, EnvelopeError> {
    if buf.len() < HEADER {
        return Err(EnvelopeError::Truncated);
    }
    let version = buf.get_u8();
    if version != VERSION {
        return Err(EnvelopeError::Version(version));
    }
    let kind = buf.get_u8();
    let origin = NodeId::from_u64(buf.get_u64()).ok_or(EnvelopeError::Body("origin node 0".into()))?;
    let target = NodeId::from_u64(buf.get_u64());
    let _seq = buf.get_u64();
    let body = match kind {
        1 => {
            let topic = get_str(&mut buf)?;
            let event = get_str(&mut buf)?;
            if !buf.has_remaining() {
                return Err(EnvelopeError::Truncated);
            }
            let payload = match buf.get_u8() {
                0 => Payload::Json(serde_json::from_slice(&buf).map_err(|e| EnvelopeError::Body(e.to_string()))?),
                1 => Payload::Binary(buf),
                other => return Err(EnvelopeError::Body(format!("payload kind {other}"))),
            };
            Body::Broadcast(Broadcast { topic, event, payload })
        }
        2 => Body::Presence(buf),
        3 => {
            let id = get_u64(&mut buf)?;
            let service = get_str(&mut buf)?;
            Body::Request { id, service, body: buf }
        }
        4 => {
            let id = get_u64(&mut buf)?;
            if !buf.has_remaining() {
                return Err(EnvelopeError::Truncated);
            }
            let found = buf.get_u8() == 1;
            Body::Response { id, found, body: buf }
        }
        other => return Err(EnvelopeError::Kind(other)),
    };
    Ok(Envelope { origin, target, body })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn envelopes_round_trip_and_garbage_is_an_error() {
        let node = NodeId(7);
        let bodies = [
            Body::Broadcast(Broadcast {
                topic: "room:1".into(),
                event: "msg".into(),
                payload: json!({"a": [1]}).into(),
            }),
            Body::Broadcast(Broadcast {
                topic: "t".into(),
                event: "bin".into(),
                payload: Payload::Binary(Bytes::from_static(&[0, 1, 255])),
            }),
            Body::Presence(Bytes::from_static(b"{}")),
            Body::Request { id: 9, service: "svc".into(), body: Bytes::from_static(b"req") },
            Body::Response { id: 9, found: true, body: Bytes::from_static(b"res") },
        ];
        for body in &bodies {
            let bytes = encode(node, Some(NodeId(8)), 1, body);
            let env = decode(bytes.clone()).expect("decodes");
            assert_eq!((env.origin, env.target), (node, Some(NodeId(8))));
            assert_eq!(format!("{:?}", env.body), format!("{body:?}"));
            for cut in 0..bytes.len() {
                // Every prefix is either an error or (for bodies that end in free bytes) a shorter body.
                let _ = decode(bytes.slice(..cut));
            }
        }
        assert!(matches!(decode(Bytes::from_static(&[9; 40])), Err(EnvelopeError::Version(9))));
        assert!(matches!(decode(Bytes::from_static(&[1, 2])), Err(EnvelopeError::Truncated)));
    }
}
