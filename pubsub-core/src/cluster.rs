//! [`Cluster`]: one node's link to the others. It owns the [`Adapter`], stamps and reads
//! envelopes, answers node-to-node requests, and hands broadcasts and presence messages to the
//! layers above (which register for them; this crate knows nothing of topics or presence).

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use bytes::Bytes;
use fawkes_serializer::Broadcast;
use futures_util::future::BoxFuture;
use parking_lot::{Mutex, RwLock};
use tokio::sync::oneshot;

use crate::adapter::{Adapter, Inbox, RemoteInbound};
use crate::envelope::{self, Body};
use crate::node::NodeId;
use crate::stats::{ClusterStats, Counters};

/// Why a request to another node got no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// The node has no adapter, so there are no other nodes.
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

type Service = Arc<dyn Fn(NodeId, Bytes) -> BoxFuture<'static, Bytes> + Send + Sync>;
type OnBroadcast = Box<dyn Fn(NodeId, Broadcast) + Send + Sync>;
type OnPresence = Box<dyn Fn(NodeId, Bytes) + Send + Sync>;

struct Shared {
    node: NodeId,
    adapter: Option<Box<dyn Adapter>>,
    started: AtomicBool,
    counters: Counters,
    next_request: AtomicU64,
    services: RwLock<HashMap<String, Service>>,
    pending: Mutex<HashMap<u64, oneshot::Sender<Option<Bytes>>>>,
    on_broadcast: OnceLock<OnBroadcast>,
    on_presence: OnceLock<OnPresence>,
}

/// One node's link to the other nodes of a cluster, through an [`Adapter`]; without one, a
/// single node. Cheap to clone. The adapter's [`RemoteInbound`] does not keep it alive: once
/// every clone is dropped, the adapter is told it [is closed](RemoteInbound::is_closed).
///
/// See the [crate documentation](crate) for two nodes linked by an in-memory adapter.
#[derive(Clone)]
pub struct Cluster(Arc<Shared>);

impl fmt::Debug for Cluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cluster")
            .field("node", &self.0.node)
            .field("clustered", &self.0.adapter.is_some())
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// A node on its own: nothing is sent, requests fail with [`RequestError::NotClustered`].
    pub fn single() -> Cluster {
        Cluster::build(None)
    }

    /// A node that reaches the others through `adapter`. The adapter starts with
    /// [`Cluster::start`], once the layers above have registered for what arrives.
    pub fn with_adapter(adapter: impl Adapter) -> Cluster {
        Cluster::build(Some(Box::new(adapter)))
    }

    fn build(adapter: Option<Box<dyn Adapter>>) -> Cluster {
        let counters = Counters::default();
        counters.connected.store(adapter.is_none(), Ordering::Relaxed);
        Cluster(Arc::new(Shared {
            node: NodeId::random(),
            adapter,
            started: AtomicBool::new(false),
            counters,
            next_request: AtomicU64::new(1),
            services: RwLock::new(HashMap::new()),
            pending: Mutex::new(HashMap::new()),
            on_broadcast: OnceLock::new(),
            on_presence: OnceLock::new(),
        }))
    }

    /// Starts the adapter (once; later calls do nothing).
    pub fn start(&self) {
        let Some(adapter) = &self.0.adapter else { return };
        if self.0.started.swap(true, Ordering::AcqRel) {
            return;
        }
        let inbox: Weak<dyn Inbox> = Arc::downgrade(&self.0) as Weak<dyn Inbox>;
        adapter.start(RemoteInbound::new(inbox, self.0.node));
    }

    /// This node's id.
    pub fn node(&self) -> NodeId {
        self.0.node
    }

    /// Whether there is an adapter (other nodes may exist).
    pub fn is_clustered(&self) -> bool {
        self.0.adapter.is_some()
    }

    /// The link to other nodes, for logs and metrics.
    pub fn stats(&self) -> ClusterStats {
        self.0.counters.snapshot(self.0.node)
    }

    /// Where broadcasts from other nodes go. The first handler set stays; returns false if one
    /// was set already.
    pub fn on_broadcast(&self, handler: impl Fn(NodeId, Broadcast) + Send + Sync + 'static) -> bool {
        self.0.on_broadcast.set(Box::new(handler)).is_ok()
    }

    /// Where presence messages from other nodes go. The first handler set stays; returns false
    /// if one was set already.
    pub fn on_presence(&self, handler: impl Fn(NodeId, Bytes) + Send + Sync + 'static) -> bool {
        self.0.on_presence.set(Box::new(handler)).is_ok()
    }

    /// Counts a message that arrived but could not be read by the layer it was for.
    pub fn count_malformed(&self) {
        self.0.counters.malformed.fetch_add(1, Ordering::Relaxed);
    }

    /// Hands an envelope to the adapter (if any), for one node or for all.
    pub fn send(&self, target: Option<NodeId>, body: &Body) {
        self.0.send(target, body);
    }

    /// Answers requests other nodes make to `service` on this node (see [`Cluster::request`]),
    /// until the returned guard is dropped.
    pub fn serve<F, Fut>(&self, service: &str, handler: F) -> ServiceGuard
    where
        F: Fn(NodeId, Bytes) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Bytes> + Send + 'static,
    {
        let handler: Service = Arc::new(move |from, body| Box::pin(handler(from, body)));
        self.0.services.write().insert(service.to_owned(), handler);
        ServiceGuard { cluster: Arc::downgrade(&self.0), service: service.to_owned() }
    }

    /// Asks `service` on `node` and waits up to `timeout` for its answer.
    pub async fn request(
        &self,
        node: NodeId,
        service: &str,
        body: Bytes,
        timeout: Duration,
    ) -> Result<Bytes, RequestError> {
        if self.0.adapter.is_none() {
            return Err(RequestError::NotClustered);
        }
        let id = self.0.next_request.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.0.pending.lock().insert(id, tx);
        let _cleanup = PendingGuard(&self.0, id);
        self.0.send(Some(node), &Body::Request { id, service: service.to_owned(), body });
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(Some(answer))) => Ok(answer),
            Ok(Ok(None)) => Err(RequestError::NoService { node, service: service.to_owned() }),
            Ok(Err(_)) | Err(_) => Err(RequestError::Timeout(node)),
        }
    }

    /// Waits, up to `timeout`, until the adapter has sent everything handed to it so far.
    /// Returns false if it did not in time.
    pub async fn flush(&self, timeout: Duration) -> bool {
        let Some(adapter) = &self.0.adapter else { return true };
        tokio::time::timeout(timeout, adapter.flush()).await.is_ok()
    }
}

struct PendingGuard<'a>(&'a Shared, u64);

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.0.pending.lock().remove(&self.1);
    }
}

/// Stops serving a service (see [`Cluster::serve`]) when dropped.
#[derive(Debug)]
pub struct ServiceGuard {
    cluster: Weak<Shared>,
    service: String,
}

impl Drop for ServiceGuard {
    fn drop(&mut self) {
        if let Some(shared) = self.cluster.upgrade() {
            shared.services.write().remove(&self.service);
        }
    }
}

impl Shared {
    fn send(&self, target: Option<NodeId>, body: &Body) {
        let Some(adapter) = &self.adapter else { return };
        let seq = self.counters.seq.fetch_add(1, Ordering::Relaxed);
        let bytes = envelope::encode(self.node, target, seq, body);
        self.counters.sent.fetch_add(1, Ordering::Relaxed);
        match target {
            Some(node) => adapter.send(node, bytes),
            None => adapter.broadcast(bytes),
        }
    }

    fn answer(self: &Arc<Shared>, origin: NodeId, id: u64, service: String, body: Bytes) {
        let handler = self.services.read().get(&service).cloned();
        let shared = Arc::downgrade(self);
        let answer = async move {
            let (found, body) = match handler {
                Some(handler) => (true, handler(origin, body).await),
                None => (false, Bytes::new()),
            };
            if let Some(shared) = shared.upgrade() {
                shared.send(Some(origin), &Body::Response { id, found, body });
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(answer);
            }
            Err(_) => tracing::warn!(service, "request from {origin} dropped: no tokio runtime"),
        }
    }
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared").field("node", &self.node).finish_non_exhaustive()
    }
}

impl Inbox for Shared {
    fn receive(self: Arc<Shared>, message: Bytes) {
        let envelope = match envelope::decode(message) {
            Ok(envelope) => envelope,
            Err(e) => {
                self.counters.malformed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(node = %self.node, error = %e, "unreadable message from the pubsub backend ignored");
                return;
            }
        };
        if envelope.origin == self.node || envelope.target.is_some_and(|t| t != self.node) {
            return;
        }
        self.counters.received.fetch_add(1, Ordering::Relaxed);
        let origin = envelope.origin;
        match envelope.body {
            Body::Broadcast(b) => {
                if let Some(handler) = self.on_broadcast.get() {
                    handler(origin, b);
                }
            }
            Body::Presence(bytes) => {
                if let Some(handler) = self.on_presence.get() {
                    handler(origin, bytes);
                }
            }
            Body::Request { id, service, body } => self.answer(origin, id, service, body),
            Body::Response { id, found, body } => {
                if let Some(tx) = self.pending.lock().remove(&id) {
                    let _ = tx.send(found.then_some(body));
                }
            }
        }
    }
    fn counters(&self) -> &Counters {
        &self.counters
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// Nodes in one process; every message reaches every node, the sender too.
    #[derive(Clone, Default)]
    struct Wire(Arc<Mutex<Vec<RemoteInbound>>>);

    impl Adapter for Wire {
        fn start(&self, inbound: RemoteInbound) {
            inbound.connected(true);
            self.0.lock().expect("wire").push(inbound);
        }
        fn broadcast(&self, message: Bytes) {
            let nodes = self.0.lock().expect("wire").clone();
            for node in nodes {
                node.deliver(message.clone());
            }
        }
    }

    /// A backend that takes everything and delivers nothing.
    struct Void;

    impl Adapter for Void {
        fn start(&self, _: RemoteInbound) {}
        fn broadcast(&self, _: Bytes) {}
    }

    fn listen(cluster: &Cluster) -> tokio::sync::mpsc::UnboundedReceiver<(NodeId, String)> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        cluster.on_broadcast(move |from, b| {
            let _ = tx.send((from, b.event));
        });
        rx
    }

    fn broadcast(event: &str) -> Body {
        Body::Broadcast(Broadcast { topic: "t".into(), event: event.into(), payload: serde_json::json!({}).into() })
    }

    #[tokio::test]
    async fn a_node_hears_others_once_and_ignores_its_own_and_others_mail() {
        let wire = Wire::default();
        let nodes: Vec<Cluster> = (0..3).map(|_| Cluster::with_adapter(wire.clone())).collect();
        let mut heard: Vec<_> = nodes.iter().map(listen).collect();
        nodes.iter().for_each(Cluster::start);

        nodes[0].send(None, &broadcast("to all"));
        nodes[0].send(Some(nodes[2].node()), &broadcast("to node 2"));
        wire.broadcast(Bytes::from_static(b"garbage"));

        assert!(heard[0].try_recv().is_err(), "a node does not hear itself");
        assert_eq!(heard[1].try_recv().ok(), Some((nodes[0].node(), "to all".into())));
        assert!(heard[1].try_recv().is_err(), "node 1 ignores what is addressed to node 2");
        assert_eq!(heard[2].try_recv().ok(), Some((nodes[0].node(), "to all".into())));
        assert_eq!(heard[2].try_recv().ok(), Some((nodes[0].node(), "to node 2".into())));
        let (sender, receiver) = (nodes[0].stats(), nodes[2].stats());
        assert_eq!((sender.sent, sender.received, sender.malformed), (2, 0, 1));
        assert_eq!((receiver.received, receiver.malformed, receiver.connected), (2, 1, true));
    }

    #[tokio::test(start_paused = true)]
    async fn requests_fail_plainly_without_a_cluster_a_service_or_an_answer() {
        let single = Cluster::single();
        let someone = NodeId::random();
        let body = Bytes::from_static(b"?");
        let second = Duration::from_secs(1);
        assert_eq!(single.request(someone, "svc", body.clone(), second).await, Err(RequestError::NotClustered));

        let wire = Wire::default();
        let (a, b) = (Cluster::with_adapter(wire.clone()), Cluster::with_adapter(wire));
        a.start();
        b.start();
        let served = b.serve("svc", |from, body: Bytes| async move { Bytes::from(format!("{from}:{}", body.len())) });
        let answer = a.request(b.node(), "svc", body.clone(), second).await;
        assert_eq!(answer, Ok(Bytes::from(format!("{}:1", a.node()))));
        drop(served);
        let none = a.request(b.node(), "svc", body.clone(), second).await;
        assert_eq!(none, Err(RequestError::NoService { node: b.node(), service: "svc".into() }));

        let lost = Cluster::with_adapter(Void);
        lost.start();
        assert_eq!(lost.request(someone, "svc", body, second).await, Err(RequestError::Timeout(someone)));
    }

    #[test]
    fn the_adapter_learns_when_the_node_is_gone() {
        let wire = Wire::default();
        let cluster = Cluster::with_adapter(wire.clone());
        cluster.start();
        let inbound = wire.0.lock().expect("wire")[0].clone();
        assert_eq!(inbound.node(), cluster.node());
        inbound.connected(false);
        inbound.dropped(3);
        let stats = cluster.stats();
        assert_eq!((stats.connected, stats.disconnects, stats.dropped), (false, 1, 3));
        assert!(!inbound.is_closed());
        drop(cluster);
        assert!(inbound.is_closed());
    }
}
