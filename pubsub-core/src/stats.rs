//! What a node counts about its link to the others.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::node::NodeId;

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
    /// The sequence number of the next envelope sent.
    pub(crate) seq: AtomicU64,
}

impl Counters {
    pub(crate) fn snapshot(&self, node: NodeId) -> ClusterStats {
        ClusterStats {
            node,
            connected: self.connected.load(Ordering::Relaxed),
            disconnects: self.disconnects.load(Ordering::Relaxed),
            sent: self.sent.load(Ordering::Relaxed),
            received: self.received.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            malformed: self.malformed.load(Ordering::Relaxed),
        }
    }
}
