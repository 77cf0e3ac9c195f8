//! Topic subscriptions and broadcast fan-out, with an [`Adapter`] to carry broadcasts, presence
//! and requests between nodes.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use bytes::Bytes;
use fawkes_serializer::{Broadcast, Frame, Payload, Serializer};
use futures_util::future::BoxFuture;
use parking_lot::{Mutex, RwLock};
use tokio::sync::{mpsc, oneshot};

use crate::cluster::{self, Body, ClusterOptions, ClusterStats, Counters, NodeId, RequestError};
use crate::outbox::Outbox;
use crate::presence::{self, Presence, Tracker};

/// Identifies one subscription, so a broadcast can skip its sender (`broadcast_from`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SubscriberId(u64);

/// Moves messages between the nodes of a cluster: a Redis or PostgreSQL connection, a message
/// bus, a test double. The PubSub decides what the bytes say (broadcasts, presence, requests to
/// one node); an adapter only carries them.
///
/// Contract:
/// - `broadcast` and `send` must not block: queue the bytes and send them from a task. When the
///   backend is away, keep a bounded queue; drop what does not fit and report it with
///   [`RemoteInbound::dropped`].
/// - Everything another node sends reaches [`RemoteInbound::deliver`] once. Delivering this
///   node's own messages back to it, or messages addressed to other nodes, is harmless: they are
///   recognised and ignored.
/// - Report the backend's state with [`RemoteInbound::connected`], so it shows in logs and in
///   [`PubSub::stats`].
///
/// Local delivery never waits for the adapter: a broadcast reaches this node's subscribers first
/// and is handed to the adapter afterwards.
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

/// Where an [`Adapter`] hands what other nodes sent.
#[derive(Clone)]
pub struct RemoteInbound {
    inner: Weak<Inner>,
    node: NodeId,
}

impl fmt::Debug for RemoteInbound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteInbound").field("node", &self.node).finish()
    }
}

impl RemoteInbound {
    /// This node's id.
    pub fn node(&self) -> NodeId {
        self.node
    }

    /// Handles a message from another node. Messages this node sent, messages addressed to
    /// another node, and unreadable ones (logged and counted) are ignored.
    pub fn deliver(&self, message: Bytes) {
        if let Some(inner) = self.inner.upgrade() {
            inner.receive(message);
        }
    }

    /// Reports whether the backend is reachable. A change is logged and counted in
    /// [`PubSub::stats`].
    pub fn connected(&self, up: bool) {
        let Some(inner) = self.inner.upgrade() else { return };
        let was = inner.counters.connected.swap(up, Ordering::Relaxed);
        match (was, up) {
            (false, true) => tracing::info!(node = %self.node, "pubsub backend connected"),
            (true, false) => {
                inner.counters.disconnects.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(node = %self.node, "pubsub backend lost; local subscribers are still served, reconnecting");
            }
            _ => {}
        }
    }

    /// Reports `n` messages the adapter had to drop.
    pub fn dropped(&self, n: u64) {
        if let Some(inner) = self.inner.upgrade() {
            inner.counters.dropped.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// True once the PubSub is gone: the adapter's tasks may stop.
    pub fn is_closed(&self) -> bool {
        self.inner.strong_count() == 0
    }
}

/// Events a channel routes through its `handle_out` instead of straight to the socket.
pub(crate) struct Intercept {
    pub(crate) events: &'static [&'static str],
    pub(crate) tx: mpsc::Sender<Arc<Broadcast>>,
}

pub(crate) enum Subscriber {
    Socket { outbox: Outbox, serializer: Serializer, intercept: Option<Intercept> },
    Stream(mpsc::Sender<Arc<Broadcast>>),
}

type Topics = HashMap<Box<str>, HashMap<u64, Subscriber>>;

type Handler = Arc<dyn Fn(NodeId, Bytes) -> BoxFuture<'static, Bytes> + Send + Sync>;

pub(crate) struct Inner {
    shards: Box<[RwLock<Topics>]>,
    hasher: std::collections::hash_map::RandomState,
    pub(crate) node: NodeId,
    adapter: Option<Box<dyn Adapter>>,
    pub(crate) options: ClusterOptions,
    pub(crate) counters: Counters,
    next_id: AtomicU64,
    services: RwLock<HashMap<String, Handler>>,
    pending: Mutex<HashMap<u64, oneshot::Sender<Result<Bytes, bool>>>>,
    pub(crate) presence: Tracker,
}

/// Topic subscriptions on this node and broadcast fan-out, Presence, and the [`Adapter`] to
/// other nodes.
///
/// Topics are spread over shards by hash, so subscribing and broadcasting on different topics
/// never contend. A broadcast is encoded once per serializer in use and the same bytes are queued
/// to every subscriber. Cheap to clone.
#[derive(Clone)]
pub struct PubSub(pub(crate) Arc<Inner>);

impl fmt::Debug for PubSub {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PubSub")
            .field("node", &self.0.node)
            .field("shards", &self.0.shards.len())
            .field("clustered", &self.0.adapter.is_some())
            .finish_non_exhaustive()
    }
}

impl Default for PubSub {
    fn default() -> PubSub {
        PubSub::build(None, ClusterOptions::default())
    }
}

impl PubSub {
    /// A single-node PubSub.
    pub fn new() -> PubSub {
        PubSub::default()
    }

    /// A PubSub that reaches other nodes through `adapter`.
    pub fn with_adapter(adapter: impl Adapter) -> PubSub {
        PubSub::with_options(adapter, ClusterOptions::default())
    }

    /// A PubSub that reaches other nodes through `adapter`, with its own heartbeat and node
    /// timeout.
    pub fn with_options(adapter: impl Adapter, options: ClusterOptions) -> PubSub {
        PubSub::build(Some(Box::new(adapter)), options)
    }

    fn build(adapter: Option<Box<dyn Adapter>>, options: ClusterOptions) -> PubSub {
        let shards = std::thread::available_parallelism().map_or(4, |n| n.get()).next_power_of_two() * 4;
        let node = NodeId::random();
        let inner = Arc::new(Inner {
            shards: (0..shards).map(|_| RwLock::new(HashMap::new())).collect(),
            hasher: Default::default(),
            node,
            adapter,
            options,
            counters: Counters::default(),
            next_id: AtomicU64::new(1),
            services: RwLock::new(HashMap::new()),
            pending: Mutex::new(HashMap::new()),
            presence: Tracker::new(node),
        });
        inner.counters.connected.store(inner.adapter.is_none(), Ordering::Relaxed);
        if let Some(adapter) = &inner.adapter {
            adapter.start(RemoteInbound { inner: Arc::downgrade(&inner), node });
            if tokio::runtime::Handle::try_current().is_ok() {
                presence::start(&inner);
            }
        }
        PubSub(inner)
    }

    /// This node's id.
    pub fn node(&self) -> NodeId {
        self.0.node
    }

    /// Whether broadcasts travel to other nodes (an adapter is set).
    pub fn is_clustered(&self) -> bool {
        self.0.adapter.is_some()
    }

    /// The link to other nodes, for logs and metrics.
    pub fn stats(&self) -> ClusterStats {
        let c = &self.0.counters;
        ClusterStats {
            node: self.0.node,
            connected: c.connected.load(Ordering::Relaxed),
            disconnects: c.disconnects.load(Ordering::Relaxed),
            sent: c.sent.load(Ordering::Relaxed),
            received: c.received.load(Ordering::Relaxed),
            dropped: c.dropped.load(Ordering::Relaxed),
            malformed: c.malformed.load(Ordering::Relaxed),
        }
    }

    /// Presence: who is on which topic, across every node.
    pub fn presence(&self) -> Presence {
        Presence(self.clone())
    }

    /// Broadcasts to every subscriber of `topic`, on every node. Returns the number of local
    /// subscribers reached.
    pub fn broadcast(&self, topic: &str, event: &str, payload: impl Into<Payload>) -> usize {
        self.publish(Broadcast { topic: topic.into(), event: event.into(), payload: payload.into() }, None)
    }

    /// Broadcasts a prepared message to every node, skipping the local subscriber `from` (if any).
    pub fn publish(&self, broadcast: Broadcast, from: Option<SubscriberId>) -> usize {
        let broadcast = Arc::new(broadcast);
        let n = self.0.dispatch(&broadcast, from);
        if self.0.adapter.is_some() {
            let body = Body::Broadcast(Arc::unwrap_or_clone(broadcast));
            self.0.send(None, &body);
        }
        n
    }

    /// Broadcasts to this node's subscribers only.
    pub fn local_broadcast(&self, broadcast: Broadcast) -> usize {
        self.0.dispatch(&Arc::new(broadcast), None)
    }

    /// Subscribes server-side code to a topic. Broadcasts that find the receiver full are
    /// dropped for it (with a warning) rather than slowing the publisher.
    pub fn subscribe(&self, topic: &str, capacity: usize) -> Subscription {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let id = self.insert(topic, Subscriber::Stream(tx));
        Subscription { rx, _guard: SubscriptionGuard { pubsub: self.clone(), topic: topic.into(), id } }
    }

    /// Number of local subscribers of `topic`.
    pub fn subscriber_count(&self, topic: &str) -> usize {
        self.0.shard(topic).read().get(topic).map_or(0, HashMap::len)
    }

    /// Answers requests other nodes make to `service` on this node (see [`PubSub::request`]),
    /// until the returned guard is dropped. A transport whose sessions outlive one connection
    /// uses this to serve requests that reached the wrong node (long-poll does).
    pub fn serve<F, Fut>(&self, service: &str, handler: F) -> ServiceGuard
    where
        F: Fn(NodeId, Bytes) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Bytes> + Send + 'static,
    {
        let handler: Handler = Arc::new(move |from, body| Box::pin(handler(from, body)));
        self.0.services.write().insert(service.to_owned(), handler);
        ServiceGuard { pubsub: Arc::downgrade(&self.0), service: service.to_owned() }
    }

    /// Leaves the cluster cleanly: tells the other nodes this node is gone (they drop its
    /// presences at once instead of after [`ClusterOptions::node_timeout`]) and waits, up to
    /// `timeout`, until the adapter has sent everything queued. Call it when shutting down, after
    /// the sockets have closed.
    pub async fn leave(&self, timeout: Duration) {
        let Some(adapter) = &self.0.adapter else { return };
        presence::goodbye(&self.0).await;
        if tokio::time::timeout(timeout, adapter.flush()).await.is_err() {
            tracing::warn!(node = %self.0.node, "pubsub backend did not take the last messages in time");
        }
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
        let id = self.0.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.0.pending.lock().insert(id, tx);
        let _cleanup = PendingGuard(&self.0, id);
        self.0.send(Some(node), &Body::Request { id, service: service.to_owned(), body });
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(Ok(answer))) => Ok(answer),
            Ok(Ok(Err(_))) => Err(RequestError::NoService { node, service: service.to_owned() }),
            Ok(Err(_)) | Err(_) => Err(RequestError::Timeout(node)),
        }
    }

    pub(crate) fn insert(&self, topic: &str, sub: Subscriber) -> SubscriberId {
        let id = self.0.next_id.fetch_add(1, Ordering::Relaxed);
        self.0.shard(topic).write().entry(topic.into()).or_default().insert(id, sub);
        SubscriberId(id)
    }

    pub(crate) fn remove(&self, topic: &str, id: SubscriberId) {
        let mut shard = self.0.shard(topic).write();
        if let Some(subs) = shard.get_mut(topic) {
            subs.remove(&id.0);
            if subs.is_empty() {
                shard.remove(topic);
            }
        }
    }
}

struct PendingGuard<'a>(&'a Inner, u64);

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.0.pending.lock().remove(&self.1);
    }
}

/// Stops serving a service (see [`PubSub::serve`]) when dropped.
#[derive(Debug)]
pub struct ServiceGuard {
    pubsub: Weak<Inner>,
    service: String,
}

impl Drop for ServiceGuard {
    fn drop(&mut self) {
        if let Some(inner) = self.pubsub.upgrade() {
            inner.services.write().remove(&self.service);
        }
    }
}

impl Inner {
    /// Hands an envelope to the adapter (if any), to one node or to all.
    pub(crate) fn send(&self, target: Option<NodeId>, body: &Body) {
        let Some(adapter) = &self.adapter else { return };
        let seq = self.counters.seq.fetch_add(1, Ordering::Relaxed);
        let bytes = cluster::encode(self.node, target, seq, body);
        self.counters.sent.fetch_add(1, Ordering::Relaxed);
        match target {
            Some(node) => adapter.send(node, bytes),
            None => adapter.broadcast(bytes),
        }
    }

    fn receive(self: &Arc<Inner>, message: Bytes) {
        let envelope = match cluster::decode(message) {
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
                self.dispatch(&Arc::new(b), None);
            }
            Body::Presence(json) => presence::receive(self, origin, &json),
            Body::Request { id, service, body } => {
                let handler = self.services.read().get(&service).cloned();
                let inner = Arc::downgrade(self);
                let answer = async move {
                    let (found, body) = match handler {
                        Some(handler) => (true, handler(origin, body).await),
                        None => (false, Bytes::new()),
                    };
                    if let Some(inner) = inner.upgrade() {
                        inner.send(Some(origin), &Body::Response { id, found, body });
                    }
                };
                match tokio::runtime::Handle::try_current() {
                    Ok(rt) => {
                        rt.spawn(answer);
                    }
                    Err(_) => tracing::warn!(service, "request from {origin} dropped: no tokio runtime"),
                }
            }
            Body::Response { id, found, body } => {
                if let Some(tx) = self.pending.lock().remove(&id) {
                    let _ = tx.send(if found { Ok(body) } else { Err(false) });
                }
            }
        }
    }

    fn shard(&self, topic: &str) -> &RwLock<Topics> {
        &self.shards[self.hasher.hash_one(topic) as usize & (self.shards.len() - 1)]
    }

    pub(crate) fn is_clustered(&self) -> bool {
        self.adapter.is_some()
    }

    pub(crate) fn dispatch(&self, b: &Arc<Broadcast>, from: Option<SubscriberId>) -> usize {
        let frames = BroadcastFrames::new(b);
        let shard = self.shard(&b.topic).read();
        let Some(subs) = shard.get(&*b.topic) else {
            return 0;
        };
        let mut reached = 0;
        for (&id, sub) in subs {
            if from.is_some_and(|f| f.0 == id) {
                continue;
            }
            reached += 1;
            match sub {
                Subscriber::Socket { outbox, serializer, intercept } => {
                    if let Some(i) = intercept.as_ref().filter(|i| i.events.contains(&&*b.event)) {
                        if i.tx.try_send(b.clone()).is_err() {
                            tracing::warn!(topic = %b.topic, event = %b.event, "intercepted broadcast dropped: channel busy");
                        }
                        continue;
                    }
                    if let Some(frame) = frames.frame(*serializer) {
                        outbox.push(frame.clone());
                    }
                }
                Subscriber::Stream(tx) => {
                    if tx.try_send(b.clone()).is_err() && !tx.is_closed() {
                        tracing::warn!(topic = %b.topic, "broadcast dropped: subscription receiver full");
                    }
                }
            }
        }
        reached
    }
}

/// A broadcast and its encodings: each serializer's frame is made on first use and shared by
/// every socket that speaks it ("fastlane"), so a broadcast is never encoded per subscriber.
pub struct BroadcastFrames<'a> {
    broadcast: &'a Broadcast,
    frames: [OnceLock<Option<Frame>>; 3],
}

impl fmt::Debug for BroadcastFrames<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BroadcastFrames").field("broadcast", self.broadcast).finish_non_exhaustive()
    }
}

impl<'a> BroadcastFrames<'a> {
    /// Nothing is encoded until a frame is asked for.
    pub fn new(broadcast: &'a Broadcast) -> BroadcastFrames<'a> {
        BroadcastFrames { broadcast, frames: Default::default() }
    }

    /// The frame for `serializer`, or `None` when the broadcast cannot be encoded in it (logged).
    pub fn frame(&self, serializer: Serializer) -> Option<&Frame> {
        self.frames[serializer.index()]
            .get_or_init(|| {
                let b = self.broadcast;
                serializer
                    .encode_broadcast(b)
                    .map_err(|e| tracing::warn!(topic = %b.topic, error = %e, "broadcast not encodable"))
                    .ok()
            })
            .as_ref()
    }
}

/// Removes a subscription when dropped.
pub(crate) struct SubscriptionGuard {
    pub(crate) pubsub: PubSub,
    pub(crate) topic: Box<str>,
    pub(crate) id: SubscriberId,
}

impl Drop for SubscriptionGuard {
    fn drop(&mut self) {
        self.pubsub.remove(&self.topic, self.id);
    }
}

/// A server-side subscription to a topic; unsubscribes when dropped.
pub struct Subscription {
    rx: mpsc::Receiver<Arc<Broadcast>>,
    _guard: SubscriptionGuard,
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription").field("topic", &self._guard.topic).finish()
    }
}

impl Subscription {
    /// The next broadcast on the topic.
    pub async fn recv(&mut self) -> Option<Arc<Broadcast>> {
        self.rx.recv().await
    }
}
