//! The [`Adapter`] contract: what carries envelopes between nodes, and [`RemoteInbound`], where
//! it hands over what arrives.

use std::fmt;
use std::sync::Weak;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use futures_util::future::BoxFuture;

use crate::node::NodeId;
use crate::stats::Counters;

/// Moves messages between the nodes of a cluster: a Redis or PostgreSQL connection, a message
/// bus, a test double. The node decides what the bytes say (broadcasts, presence, requests to
/// one node: see [`envelope`](crate::envelope)); an adapter only carries them.
///
/// Contract:
/// - `broadcast` and `send` must not block: queue the bytes and send them from a task
///   ([`OutgoingQueue`](crate::OutgoingQueue) does the queueing). When the backend is away, keep
///   a bounded queue; drop what does not fit and report it with [`RemoteInbound::dropped`].
/// - Everything another node sends reaches [`RemoteInbound::deliver`] once. Delivering this
///   node's own messages back to it, or messages addressed to other nodes, is harmless: they are
///   recognised and ignored.
/// - Report the backend's state with [`RemoteInbound::connected`], so it shows in logs and in
///   [`Cluster::stats`](crate::Cluster::stats).
/// - Stop the adapter's tasks once [`RemoteInbound::is_closed`]: the node is gone.
///
/// Local delivery never waits for the adapter: a broadcast reaches this node's subscribers first
/// and is handed to the adapter afterwards.
///
/// Nodes in one process, wired together (a stand-in for a real network):
///
/// ```
/// use std::sync::{Arc, Mutex};
/// use bytes::Bytes;
/// use fawkes_pubsub_core::{Adapter, RemoteInbound};
///
/// #[derive(Clone, Default)]
/// struct Wire(Arc<Mutex<Vec<RemoteInbound>>>);
///
/// impl Adapter for Wire {
///     fn start(&self, inbound: RemoteInbound) {
///         inbound.connected(true);
///         self.0.lock().unwrap().push(inbound);
///     }
///     fn broadcast(&self, message: Bytes) {
///         // Every node gets it, the sender too: it recognises and ignores its own.
///         for node in self.0.lock().unwrap().iter() {
///             node.deliver(message.clone());
///         }
///     }
/// }
/// ```
///
/// The [crate documentation](crate) runs two nodes over this adapter.
pub trait Adapter: Send + Sync + 'static {
    /// Starts carrying messages; those from other nodes go to `inbound`, whose
    /// [`node`](RemoteInbound::node) is this node's id (the address [`Adapter::send`] uses).
    fn start(&self, inbound: RemoteInbound);
    /// Sends `message` to every other node.
    fn broadcast(&self, message: Bytes);
    /// Sends `message` to `node` alone. By default it goes to every node, and the others ignore
    /// it; adapters with per-node addresses do better.
    fn send(&self, node: NodeId, message: Bytes) {
        let _ = node;
        self.broadcast(message);
    }
    /// Completes once everything handed to the adapter so far has been sent (or given up on). A
    /// node leaving the cluster waits for it, so its last words reach the others. By default
    /// there is nothing to wait for.
    fn flush(&self) -> BoxFuture<'_, ()> {
        Box::pin(std::future::ready(()))
    }
}

/// The node side of a [`RemoteInbound`]: reads what arrives and keeps the counters.
pub(crate) trait Inbox: Send + Sync {
    fn receive(self: std::sync::Arc<Self>, message: Bytes);
    fn counters(&self) -> &Counters;
}

/// Where an [`Adapter`] hands what other nodes sent. Cheap to clone; it does not keep the node
/// alive.
#[derive(Clone)]
pub struct RemoteInbound {
    inbox: Weak<dyn Inbox>,
    node: NodeId,
}

impl fmt::Debug for RemoteInbound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteInbound").field("node", &self.node).finish()
    }
}

impl RemoteInbound {
    pub(crate) fn new(inbox: Weak<dyn Inbox>, node: NodeId) -> RemoteInbound {
        RemoteInbound { inbox, node }
    }

    /// This node's id.
    pub fn node(&self) -> NodeId {
        self.node
    }

    /// Handles a message from another node. Messages this node sent, messages addressed to
    /// another node, and unreadable ones (logged and counted) are ignored.
    pub fn deliver(&self, message: Bytes) {
        if let Some(inbox) = self.inbox.upgrade() {
            inbox.receive(message);
        }
    }

    /// Reports whether the backend is reachable. A change is logged and counted in
    /// [`ClusterStats`](crate::ClusterStats).
    pub fn connected(&self, up: bool) {
        let Some(inbox) = self.inbox.upgrade() else { return };
        let counters = inbox.counters();
        let was = counters.connected.swap(up, Ordering::Relaxed);
        match (was, up) {
            (false, true) => tracing::info!(node = %self.node, "pubsub backend connected"),
            (true, false) => {
                counters.disconnects.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(node = %self.node, "pubsub backend lost; local subscribers are still served, reconnecting");
            }
            _ => {}
        }
    }

    /// Reports `n` messages the adapter had to drop.
    pub fn dropped(&self, n: u64) {
        if let Some(inbox) = self.inbox.upgrade() {
            inbox.counters().dropped.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Reports `n` messages sent to other nodes that the backend accepted `took` after the
    /// adapter took them off its queue (one round trip, for most adapters).
    pub fn published(&self, n: u64, took: std::time::Duration) {
        if let Some(inbox) = self.inbox.upgrade() {
            inbox.counters().published(n, took);
        }
    }

    /// True once the node is gone: the adapter's tasks may stop.
    pub fn is_closed(&self) -> bool {
        self.inbox.strong_count() == 0
    }
}
