//! Topic subscriptions on this node and encode-once broadcast fan-out, over the [`Cluster`]
//! link that carries broadcasts and requests between nodes. Layers above (presence) keep their
//! state here through [`PubSub::layer`] without this module knowing them.

use std::any::Any;
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use bytes::Bytes;
use fawkes_pubsub_core::{Body, Cluster, ClusterStats, NodeId, RequestError, ServiceGuard};
use fawkes_serializer::{Broadcast, Frame, Payload, Serializer};
use parking_lot::{Mutex, RwLock};
use tokio::sync::mpsc;

use crate::outbox::Outbox;
use fawkes_pubsub_core::Position;

/// Identifies one subscription, so a broadcast can skip its sender (`broadcast_from`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SubscriberId(u64);

impl SubscriberId {
    /// The number behind the id; ids grow with every subscription.
    pub(crate) fn get(self) -> u64 {
        self.0
    }
}

/// Events a channel routes through its `handle_out` instead of straight to the socket.
pub(crate) struct Intercept {
    pub(crate) events: &'static [&'static str],
    pub(crate) tx: mpsc::Sender<Arc<Broadcast>>,
}

pub(crate) enum Subscriber {
    Socket {
        outbox: Outbox,
        serializer: Serializer,
        intercept: Option<Intercept>,
    },
    Stream(mpsc::Sender<Arc<Broadcast>>),
    /// A socket whose join is recovering history: live broadcasts wait here until the replay
    /// is delivered (see [`PubSub::release`]), at most [`Held::limit`] of them.
    Held(Mutex<Held>),
}

pub(crate) struct Held {
    pub(crate) outbox: Outbox,
    pub(crate) limit: usize,
    /// Broadcasts that arrived meanwhile, with their position when a shared history store
    /// delivered them (see [`PubSub::release`]).
    pub(crate) waiting: Vec<(Option<Position>, Arc<Broadcast>)>,
}

type Topics = HashMap<Box<str>, HashMap<u64, Subscriber>>;

/// What plain broadcasts ask of the history layer ([`History`](crate::History)), which is built
/// on this module and keeps its state in [`Inner::history`].
pub(crate) trait KeepsHistory: Any + Send + Sync {
    /// Whether broadcasts on `topic` are written to a history (and so must carry a position).
    fn keeps(&self, topic: &str) -> bool;
}

pub(crate) struct Inner {
    shards: Box<[RwLock<Topics>]>,
    hasher: std::collections::hash_map::RandomState,
    next_id: AtomicU64,
    cluster: Cluster,
    /// The state of the layers built on this PubSub (presence), one per type, made on first use.
    layers: Mutex<Vec<Arc<dyn Any + Send + Sync>>>,
    /// The history layer, resolved once (plain broadcasts check it, see [`PubSub::publish`]):
    /// it is used on every broadcast with a position, where [`PubSub::layer`]'s lock would be one
    /// more lock shared by every topic.
    pub(crate) history: OnceLock<Arc<dyn KeepsHistory>>,
}

/// Topic subscriptions on this node and broadcast fan-out, Presence, and the
/// [`Adapter`](crate::Adapter) to other nodes.
///
/// Topics are spread over shards by hash, so subscribing and broadcasting on different topics
/// never contend. A broadcast is encoded once per serializer in use and the same bytes are queued
/// to every subscriber. Cheap to clone.
#[derive(Clone)]
pub struct PubSub(pub(crate) Arc<Inner>);

impl fmt::Debug for PubSub {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PubSub")
            .field("node", &self.node())
            .field("shards", &self.0.shards.len())
            .field("clustered", &self.is_clustered())
            .finish_non_exhaustive()
    }
}

impl Default for PubSub {
    fn default() -> PubSub {
        PubSub::build(Cluster::single())
    }
}

impl PubSub {
    /// A single-node PubSub.
    pub fn new() -> PubSub {
        PubSub::default()
    }

    /// A PubSub over `cluster`, which it registers with for broadcasts from other nodes. The
    /// caller starts the cluster once every layer above has registered too.
    pub(crate) fn build(cluster: Cluster) -> PubSub {
        let shards = std::thread::available_parallelism().map_or(4, |n| n.get()).next_power_of_two() * 4;
        let inner = Arc::new(Inner {
            shards: (0..shards).map(|_| RwLock::new(HashMap::new())).collect(),
            hasher: Default::default(),
            next_id: AtomicU64::new(1),
            cluster,
            layers: Mutex::new(Vec::new()),
            history: OnceLock::new(),
        });
        let weak = Arc::downgrade(&inner);
        inner.cluster.on_broadcast(move |_origin, broadcast| {
            if let Some(inner) = weak.upgrade() {
                inner.dispatch(&Arc::new(broadcast), None);
            }
        });
        PubSub(inner)
    }

    /// The link to the other nodes.
    pub(crate) fn cluster(&self) -> &Cluster {
        &self.0.cluster
    }

    /// A handle that does not keep the PubSub alive (for tasks that should end with it).
    pub(crate) fn downgrade(&self) -> WeakPubSub {
        WeakPubSub(Arc::downgrade(&self.0))
    }

    /// The state of a layer built on this PubSub, made by `init` on first use.
    pub(crate) fn layer<T: Any + Send + Sync>(&self, init: impl FnOnce() -> T) -> Arc<T> {
        let mut layers = self.0.layers.lock();
        if let Some(layer) = layers.iter().find_map(|l| l.clone().downcast::<T>().ok()) {
            return layer;
        }
        let layer = Arc::new(init());
        layers.push(layer.clone());
        layer
    }

    /// This node's id.
    pub fn node(&self) -> NodeId {
        self.0.cluster.node()
    }

    /// Whether broadcasts travel to other nodes (an adapter is set).
    pub fn is_clustered(&self) -> bool {
        self.0.cluster.is_clustered()
    }

    /// The link to other nodes, for logs and metrics.
    pub fn stats(&self) -> ClusterStats {
        self.0.cluster.stats()
    }

    /// Broadcasts to every subscriber of `topic`, on every node. Returns the number of local
    /// subscribers reached.
    ///
    /// A topic that keeps a history (see [`History`](crate::History)) refuses plain broadcasts:
    /// one would reach subscribers without a position and be missing from every replay, so it is
    /// logged as an error and sent nowhere (0 is returned). Use
    /// [`History::broadcast`](crate::History::broadcast) or
    /// [`SocketRef::broadcast_with_position`](crate::SocketRef::broadcast_with_position) there.
    pub fn broadcast(&self, topic: &str, event: &str, payload: impl Into<Payload>) -> usize {
        self.publish(Broadcast { topic: topic.into(), event: event.into(), payload: payload.into() }, None)
    }

    /// Broadcasts a prepared message to every node, skipping the local subscriber `from` (if any).
    /// Refused on a topic that keeps a history, as [`PubSub::broadcast`] is.
    pub fn publish(&self, broadcast: Broadcast, from: Option<SubscriberId>) -> usize {
        if self.0.history.get().is_some_and(|h| h.keeps(&broadcast.topic)) {
            tracing::error!(
                topic = %broadcast.topic,
                event = %broadcast.event,
                "plain broadcast refused: the topic keeps a history, broadcast through History::broadcast"
            );
            return 0;
        }
        let broadcast = Arc::new(broadcast);
        let n = self.0.dispatch(&broadcast, from);
        if self.is_clustered() {
            self.0.cluster.send(None, &Body::Broadcast(Arc::unwrap_or_clone(broadcast)));
        }
        n
    }

    /// [`PubSub::publish`] of a broadcast already shared (kept in history, say).
    pub(crate) fn publish_shared(&self, broadcast: Arc<Broadcast>, from: Option<SubscriberId>) -> usize {
        let n = self.0.dispatch(&broadcast, from);
        if self.is_clustered() {
            self.0.cluster.send(None, &Body::Broadcast(Arc::unwrap_or_clone(broadcast)));
        }
        n
    }

    /// Moves the broadcasts that waited on the held subscription `id` to `sub`, at most `room`
    /// of them; waiting broadcasts at or before `after` (of its epoch) are dropped first: the
    /// replay had them. When no more than `room` waited, all go and `sub` takes the held one's
    /// place with no broadcast in between (fan-out to the topic waits), and `None` is returned,
    /// as it is when the subscription is gone; otherwise `sub` comes back, to call again once the
    /// socket has drained.
    pub(crate) fn release(
        &self,
        topic: &str,
        id: SubscriberId,
        room: usize,
        after: Option<Position>,
        sub: Subscriber,
    ) -> Option<Subscriber> {
        let mut shard = self.0.shard(topic).write();
        let slot = shard.get_mut(topic).and_then(|subs| subs.get_mut(&id.0))?;
        let waiting = match slot {
            Subscriber::Held(held) => &mut held.get_mut().waiting,
            _ => return None,
        };
        let replayed = |p: &Option<Position>| match (p, after) {
            (Some(p), Some(after)) => p.epoch() == after.epoch() && p.offset() <= after.offset(),
            _ => false,
        };
        waiting.retain(|(p, _)| !replayed(p));
        let n = waiting.len().min(room);
        for (at, b) in waiting.drain(..n) {
            deliver(&sub, &b, at, &BroadcastFrames::new(&b));
        }
        if !waiting.is_empty() {
            return Some(sub);
        }
        *slot = sub;
        None
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
        self.0.cluster.serve(service, handler)
    }

    /// Asks `service` on `node` and waits up to `timeout` for its answer.
    pub async fn request(
        &self,
        node: NodeId,
        service: &str,
        body: Bytes,
        timeout: Duration,
    ) -> Result<Bytes, RequestError> {
        self.0.cluster.request(node, service, body, timeout).await
    }

    pub(crate) fn insert(&self, topic: &str, sub: Subscriber) -> SubscriberId {
        // The id is taken under the shard's lock, so that ids on a topic grow in the order
        // subscriptions and broadcasts take the lock (see `Inner::dispatch_marked`).
        let mut shard = self.0.shard(topic).write();
        let id = self.0.next_id.fetch_add(1, Ordering::Relaxed);
        shard.entry(topic.into()).or_default().insert(id, sub);
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

/// A [`PubSub`] that may be gone.
#[derive(Clone)]
pub(crate) struct WeakPubSub(Weak<Inner>);

impl WeakPubSub {
    pub(crate) fn upgrade(&self) -> Option<PubSub> {
        self.0.upgrade().map(PubSub)
    }
}

impl Inner {
    fn shard(&self, topic: &str) -> &RwLock<Topics> {
        &self.shards[self.hasher.hash_one(topic) as usize & (self.shards.len() - 1)]
    }

    pub(crate) fn dispatch(&self, b: &Arc<Broadcast>, from: Option<SubscriberId>) -> usize {
        self.dispatch_marked(b, from, None).0
    }

    /// [`Inner::dispatch`] of a broadcast at a position in its topic's history.
    pub(crate) fn dispatch_at(&self, b: &Arc<Broadcast>, from: Option<SubscriberId>, at: Option<Position>) -> usize {
        self.dispatch_marked(b, from, at).0
    }

    /// [`Inner::dispatch_at`], and a mark: every subscriber of the topic with an id below it got
    /// the broadcast, every later one did not (presence uses it to give a joiner the state that
    /// fits the diffs it got).
    pub(crate) fn dispatch_marked(
        &self,
        b: &Arc<Broadcast>,
        from: Option<SubscriberId>,
        at: Option<Position>,
    ) -> (usize, u64) {
        self.dispatch_parts(std::slice::from_ref(b), from, at)
    }

    /// [`Inner::dispatch_marked`] of the parts of one message, all on the same topic: each
    /// subscriber gets every part or none, in order, with one wake of its socket.
    pub(crate) fn dispatch_parts(
        &self,
        parts: &[Arc<Broadcast>],
        from: Option<SubscriberId>,
        at: Option<Position>,
    ) -> (usize, u64) {
        let Some(first) = parts.first() else {
            return (0, self.next_id.load(Ordering::Relaxed));
        };
        let frames: Vec<BroadcastFrames<'_>> = parts.iter().map(|b| BroadcastFrames::new(b)).collect();
        let shard = self.shard(&first.topic).read();
        let mark = self.next_id.load(Ordering::Relaxed);
        let Some(subs) = shard.get(&*first.topic) else {
            return (0, mark);
        };
        let mut reached = 0;
        for (&id, sub) in subs {
            if from.is_some_and(|f| f.0 == id) {
                continue;
            }
            reached += 1;
            match (parts, &frames[..]) {
                ([b], [f]) => deliver(sub, b, at, f),
                _ => deliver_all(sub, parts, at, &frames),
            }
        }
        (reached, mark)
    }
}

/// [`deliver`] of several broadcasts: a socket that intercepts none of them gets them under one
/// lock of its queue.
fn deliver_all(sub: &Subscriber, parts: &[Arc<Broadcast>], at: Option<Position>, frames: &[BroadcastFrames<'_>]) {
    match sub {
        Subscriber::Socket { outbox, serializer, intercept }
            if intercept.as_ref().is_none_or(|i| parts.iter().all(|b| !i.events.contains(&&*b.event))) =>
        {
            outbox.push_all(frames.iter().filter_map(|f| f.frame(*serializer).cloned()));
        }
        _ => {
            for (b, f) in parts.iter().zip(frames) {
                deliver(sub, b, at, f);
            }
        }
    }
}

#[inline]
pub(crate) fn deliver(sub: &Subscriber, b: &Arc<Broadcast>, at: Option<Position>, frames: &BroadcastFrames<'_>) {
    match sub {
        Subscriber::Socket { outbox, serializer, intercept } => {
            if let Some(i) = intercept.as_ref().filter(|i| i.events.contains(&&*b.event)) {
                if i.tx.try_send(b.clone()).is_err() {
                    tracing::warn!(topic = %b.topic, event = %b.event, "intercepted broadcast dropped: channel busy");
                }
                return;
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
        Subscriber::Held(held) => {
            let mut held = held.lock();
            if held.waiting.len() >= held.limit {
                // Delivering the rest would leave a gap: the client must rejoin.
                tracing::warn!(topic = %b.topic, "recovering socket fell behind its outbound limit; closing it");
                held.outbox.close(crate::outbox::CloseReason::SlowConsumer);
                return;
            }
            held.waiting.push((at, b.clone()));
        }
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
