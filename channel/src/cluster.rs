//! A PubSub joined to other nodes: the [`Adapter`] below it, presence replication above it.

use std::time::Duration;

use fawkes_pubsub_core::{Adapter, Cluster};

use crate::presence::{self, ClusterOptions};
use crate::pubsub::PubSub;

impl PubSub {
    /// A PubSub that reaches other nodes through `adapter`.
    ///
    /// ```
    /// use std::sync::{Arc, Mutex};
    /// use bytes::Bytes;
    /// use fawkes_channel::{Adapter, PubSub, RemoteInbound};
    ///
    /// /// Nodes in one process, wired together (a stand-in for a real network).
    /// #[derive(Clone, Default)]
    /// struct Wire(Arc<Mutex<Vec<RemoteInbound>>>);
    ///
    /// impl Adapter for Wire {
    ///     fn start(&self, inbound: RemoteInbound) {
    ///         inbound.connected(true);
    ///         self.0.lock().unwrap().push(inbound);
    ///     }
    ///     fn broadcast(&self, message: Bytes) {
    ///         for node in self.0.lock().unwrap().iter() {
    ///             node.deliver(message.clone());
    ///         }
    ///     }
    /// }
    ///
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// let wire = Wire::default();
    /// let a = PubSub::with_adapter(wire.clone());
    /// let b = PubSub::with_adapter(wire);
    /// let mut sub = b.subscribe("news", 8);
    /// a.broadcast("news", "headline", serde_json::json!({"title": "hello"}));
    /// assert_eq!(sub.recv().await.unwrap().event, "headline");
    /// # });
    /// ```
    pub fn with_adapter(adapter: impl Adapter) -> PubSub {
        PubSub::with_options(adapter, ClusterOptions::default())
    }

    /// A PubSub that reaches other nodes through `adapter`, with its own heartbeat and node
    /// timeout.
    pub fn with_options(adapter: impl Adapter, options: ClusterOptions) -> PubSub {
        let pubsub = PubSub::build(Cluster::with_adapter(adapter));
        presence::replicate(&pubsub, options);
        pubsub.cluster().start();
        pubsub
    }

    /// Leaves the cluster cleanly: tells the other nodes this node is gone (they drop its
    /// presences at once instead of after [`ClusterOptions::node_timeout`]) and waits, up to
    /// `timeout`, until the adapter has sent everything queued. Call it when shutting down, after
    /// the sockets have closed.
    pub async fn leave(&self, timeout: Duration) {
        if !self.is_clustered() {
            return;
        }
        presence::goodbye(self).await;
        if !self.cluster().flush(timeout).await {
            tracing::warn!(node = %self.node(), "pubsub backend did not take the last messages in time");
        }
    }
}
