//! Topic subscriptions and broadcast fan-out, with an [`Adapter`] to carry broadcasts between
//! nodes.

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};

use fawkes_serializer::{Broadcast, Frame, Payload, Serializer};
use parking_lot::RwLock;
use tokio::sync::mpsc;

use crate::outbox::Outbox;

/// Identifies one subscription, so a broadcast can skip its sender (`broadcast_from`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SubscriberId(u64);

/// Carries broadcasts between nodes. The default, [`LocalAdapter`], carries nothing.
///
/// `publish` is called after local delivery for every broadcast that originates on this node;
/// it must not block (queue the work and send it from a task). Broadcasts from other nodes are
/// handed to the [`RemoteInbound`] given to `start`, which delivers them to local subscribers
/// only.
///
/// ```
/// use std::sync::{Arc, Mutex};
/// use fawkes_channel::{Adapter, PubSub, RemoteInbound};
/// use fawkes_serializer::Broadcast;
///
/// /// Two PubSubs in one process, wired together (a test double for a real network).
/// #[derive(Default)]
/// struct Loopback { peer: Mutex<Option<RemoteInbound>> }
///
/// struct Side(Arc<Loopback>, bool);
/// impl Adapter for Side {
///     fn start(&self, inbound: RemoteInbound) {
///         if self.1 { *self.0.peer.lock().unwrap() = Some(inbound); }
///     }
///     fn publish(&self, broadcast: &Arc<Broadcast>) {
///         if !self.1 {
///             if let Some(peer) = &*self.0.peer.lock().unwrap() {
///                 peer.deliver(broadcast);
///             }
///         }
///     }
/// }
///
/// # tokio_test_block_on(async {
/// let wire = Arc::new(Loopback::default());
/// let a = PubSub::with_adapter(Side(wire.clone(), false));
/// let b = PubSub::with_adapter(Side(wire, true));
/// let mut sub = b.subscribe("news", 8);
/// a.broadcast("news", "headline", serde_json::json!({"title": "hello"}));
/// assert_eq!(sub.recv().await.unwrap().event, "headline");
/// # });
/// # fn tokio_test_block_on<F: std::future::Future>(f: F) -> F::Output {
/// #     tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
/// # }
/// ```
pub trait Adapter: Send + Sync + 'static {
    /// Starts carrying broadcasts; remote ones go to `inbound`.
    fn start(&self, inbound: RemoteInbound) {
        let _ = inbound;
    }
    /// Sends a broadcast that originated on this node to the other nodes.
    fn publish(&self, broadcast: &Arc<Broadcast>);
}

/// The single-node adapter: broadcasts stay on this node.
#[derive(Debug, Default, Clone, Copy)]
pub struct LocalAdapter;

impl Adapter for LocalAdapter {
    fn publish(&self, _: &Arc<Broadcast>) {}
}

/// Where an [`Adapter`] delivers broadcasts from other nodes.
#[derive(Clone)]
pub struct RemoteInbound(Weak<Inner>);

impl fmt::Debug for RemoteInbound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RemoteInbound")
    }
}

impl RemoteInbound {
    /// Delivers a broadcast from another node to this node's subscribers. Returns how many
    /// subscribers it reached (0 once the PubSub is gone).
    pub fn deliver(&self, broadcast: &Arc<Broadcast>) -> usize {
        self.0.upgrade().map_or(0, |inner| inner.dispatch(broadcast, None))
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

struct Inner {
    shards: Box<[RwLock<Topics>]>,
    hasher: std::collections::hash_map::RandomState,
    adapter: Box<dyn Adapter>,
    next_id: AtomicU64,
}

/// Topic subscriptions on this node and broadcast fan-out, plus the [`Adapter`] to other nodes.
///
/// Topics are spread over shards by hash, so subscribing and broadcasting on different topics
/// never contend. A broadcast is encoded once per serializer in use and the same bytes are queued
/// to every subscriber. Cheap to clone.
#[derive(Clone)]
pub struct PubSub(Arc<Inner>);

impl fmt::Debug for PubSub {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PubSub").field("shards", &self.0.shards.len()).finish_non_exhaustive()
    }
}

impl Default for PubSub {
    fn default() -> PubSub {
        PubSub::with_adapter(LocalAdapter)
    }
}

impl PubSub {
    /// A single-node PubSub.
    pub fn new() -> PubSub {
        PubSub::default()
    }

    /// A PubSub that carries broadcasts to other nodes through `adapter`.
    pub fn with_adapter(adapter: impl Adapter) -> PubSub {
        let shards = std::thread::available_parallelism().map_or(4, |n| n.get()).next_power_of_two() * 4;
        let inner = Arc::new(Inner {
            shards: (0..shards).map(|_| RwLock::new(HashMap::new())).collect(),
            hasher: Default::default(),
            adapter: Box::new(adapter),
            next_id: AtomicU64::new(1),
        });
        inner.adapter.start(RemoteInbound(Arc::downgrade(&inner)));
        PubSub(inner)
    }

    /// Broadcasts to every subscriber of `topic`, on every node. Returns the number of local
    /// subscribers reached.
    pub fn broadcast(&self, topic: &str, event: &str, payload: impl Into<Payload>) -> usize {
        self.publish(Broadcast { topic: topic.into(), event: event.into(), payload: payload.into() }, None)
    }

    /// Broadcasts a prepared message, skipping the subscriber `from` (if any).
    pub fn publish(&self, broadcast: Broadcast, from: Option<SubscriberId>) -> usize {
        let broadcast = Arc::new(broadcast);
        let n = self.0.dispatch(&broadcast, from);
        self.0.adapter.publish(&broadcast);
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

impl Inner {
    fn shard(&self, topic: &str) -> &RwLock<Topics> {
        let mut h = self.hasher.build_hasher();
        topic.hash(&mut h);
        &self.shards[h.finish() as usize & (self.shards.len() - 1)]
    }

    fn dispatch(&self, b: &Arc<Broadcast>, from: Option<SubscriberId>) -> usize {
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
