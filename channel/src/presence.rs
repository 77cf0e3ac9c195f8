//! Presence: who is on which topic, on every node, in the shape Phoenix's `Presence` reports it
//! (`presence_state` on join, `presence_diff` afterwards).
//!
//! Replication is a CRDT with one writer per entry: only the node that tracked an entry adds,
//! updates or removes it, so each node's entries form a register versioned by that node's clock,
//! and merging keeps the newest version of each node's register. There is no central node. A
//! node sends its changes as deltas (`from` clock `to` clock); a receiver that finds a gap, or
//! hears from a heartbeat that it is behind, asks that node for its full state. A node not heard
//! from within [`ClusterOptions::node_timeout`](ClusterOptions) is taken for dead and its
//! entries are removed; if it was only cut off, its next heartbeat brings them back. Every node
//! works out `presence_diff` for its own subscribers from what it merges, so diffs never cross
//! the network twice.
//!
//! Large rooms: changes, local and remote, wait for the end of a short window
//! ([`PresenceOptions::window`]) and go out as one `presence_diff` per topic (and one delta to
//! the other nodes), so N joins cost N / window diffs instead of N. A diff costs one write per
//! subscriber, so a large room's window grows with its subscribers
//! ([`PresenceOptions::window_per_subscriber`]); the delta to the other nodes still goes out
//! after the base window. What a topic's subscribers
//! see is the published list: the list as of the last diff. A joiner's `presence_state`
//! ([`SocketRef::push_presence_state`](crate::SocketRef::push_presence_state)) is that list,
//! encoded once per window and serializer and shared by every joiner of the window; when a diff
//! reached the joiner between its subscription and its state, it gets the list as it was before
//! that diff instead, so that phoenix.js, which applies diffs that came before the state after
//! it, ends with every change applied exactly once. A state larger than
//! [`PresenceOptions::state_part_bytes`] goes out as a `presence_state` with the first part and
//! `presence_diff`s that join the rest; a larger diff goes out as several, queued to each
//! subscriber together (it gets all of them or none).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use fawkes_pubsub_core::{Body, NodeId};
use fawkes_serializer::{Broadcast, Frame, Payload, Serializer};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::outbox::Outbox;
use crate::pubsub::{PubSub, SubscriberId, WeakPubSub};

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

/// How presence batches its changes and how much of it one topic may hold. Set with
/// [`Presence::set_options`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct PresenceOptions {
    /// Changes wait this long after the first of them, then go out together: one
    /// `presence_diff` per topic and one delta to the other nodes. Zero sends each round of
    /// changes at once. Default 50 ms.
    pub window: Duration,
    /// A topic's window grows by this much per local subscriber, when that makes it longer than
    /// [`PresenceOptions::window`]: a diff costs a write to every subscriber, so in a large room
    /// diffs go out less often and carry more changes, and their writes stay a bounded share of
    /// the server's time whatever the room's size (a diff's write costs about 15 µs of a core on
    /// loopback). Default 100 µs: a room of 500 subscribers keeps the 50 ms window, one of 2,000
    /// waits 200 ms, one of 20,000 waits 2 s, one of 100,000 waits 10 s. The delta
    /// to the other nodes goes out after `window` whatever the room's size. Zero turns it off;
    /// a zero `window` sends every round of changes at once in any room.
    pub window_per_subscriber: Duration,
    /// The largest entry one `track` or `update` may add: its key and its meta, as JSON.
    /// Default 4 KiB.
    pub max_meta_bytes: usize,
    /// Entries (metas, on every node) one topic may hold; a `track` past it is refused.
    /// Default 100,000.
    pub max_entries_per_topic: usize,
    /// Bytes of entries (keys and metas as JSON, on every node) one topic may hold; a `track`
    /// past it is refused. Default 16 MiB.
    pub max_bytes_per_topic: usize,
    /// A `presence_state` larger than this is sent in parts: the state with the first part, then
    /// `presence_diff`s joining the rest; a `presence_diff` larger than this is sent as several,
    /// each key's joins and leaves in one of them, all queued at once to each subscriber. So no
    /// frame outgrows what clients accept (keep it at or below the endpoint's
    /// `max_frame_size`), and no socket's write buffer, which keeps the size of the largest frame
    /// it wrote, grows with the room. Default 8 KiB.
    pub state_part_bytes: usize,
}

impl Default for PresenceOptions {
    fn default() -> PresenceOptions {
        PresenceOptions {
            window: Duration::from_millis(50),
            window_per_subscriber: Duration::from_micros(100),
            max_meta_bytes: 4096,
            max_entries_per_topic: 100_000,
            max_bytes_per_topic: 16 << 20,
            state_part_bytes: 8 << 10,
        }
    }
}

impl PresenceOptions {
    /// Sets [`PresenceOptions::window`].
    pub fn window(mut self, d: Duration) -> Self {
        self.window = d;
        self
    }
    /// Sets [`PresenceOptions::window_per_subscriber`].
    pub fn window_per_subscriber(mut self, d: Duration) -> Self {
        self.window_per_subscriber = d;
        self
    }
    /// Sets [`PresenceOptions::max_meta_bytes`].
    pub fn max_meta_bytes(mut self, n: usize) -> Self {
        self.max_meta_bytes = n;
        self
    }
    /// Sets [`PresenceOptions::max_entries_per_topic`].
    pub fn max_entries_per_topic(mut self, n: usize) -> Self {
        self.max_entries_per_topic = n;
        self
    }
    /// Sets [`PresenceOptions::max_bytes_per_topic`].
    pub fn max_bytes_per_topic(mut self, n: usize) -> Self {
        self.max_bytes_per_topic = n;
        self
    }
    /// Sets [`PresenceOptions::state_part_bytes`].
    pub fn state_part_bytes(mut self, n: usize) -> Self {
        self.state_part_bytes = n.max(1);
        self
    }
}

/// Why a presence could not be tracked or changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PresenceError {
    /// This channel already tracks the key on its topic (use `update`).
    #[error("already tracked: {0:?}")]
    AlreadyTracked(String),
    /// This channel does not track the key on its topic.
    #[error("not tracked: {0:?}")]
    NotTracked(String),
    /// Metadata must be a JSON object, as it is merged with `phx_ref`.
    #[error("presence metadata must be a JSON object")]
    MetaNotObject,
    /// The entry (key and meta as JSON) is larger than [`PresenceOptions::max_meta_bytes`].
    #[error("presence entry of {bytes} bytes exceeds the limit of {max}")]
    TooLarge {
        /// The entry's size.
        bytes: usize,
        /// The limit.
        max: usize,
    },
    /// The topic holds as many entries or bytes as [`PresenceOptions`] allows.
    #[error("presence on this topic is full ({entries} entries, {bytes} bytes)")]
    TopicFull {
        /// Entries the topic holds.
        entries: usize,
        /// Bytes the topic holds.
        bytes: usize,
    },
}

/// Presence on every topic of the cluster, as this node knows it. Channels track themselves
/// with [`SocketRef::track`](crate::SocketRef::track) and send a joiner the list with
/// [`SocketRef::push_presence_state`](crate::SocketRef::push_presence_state).
///
/// ```
/// use fawkes_channel::{Channel, HandleIn, Payload, SocketRef};
/// use serde_json::{Value, json};
///
/// struct Room { user: String }
///
/// impl Channel for Room {
///     async fn join(&mut self, params: Payload, _: &mut SocketRef) -> Result<Value, Value> {
///         self.user = params.as_json().and_then(|p| p["user"].as_str()).unwrap_or("anon").to_owned();
///         Ok(json!({}))
///     }
///     async fn after_join(&mut self, socket: &mut SocketRef) {
///         // Untracked by itself when the channel ends (leave, crash, socket closed).
///         let _ = socket.track(self.user.clone(), json!({"online_at": 0}));
///         socket.push_presence_state();
///     }
///     async fn handle_in(&mut self, _: &str, _: Payload, _: &mut SocketRef) -> HandleIn {
///         HandleIn::NoReply
///     }
/// }
/// ```
#[derive(Clone)]
pub struct Presence(Arc<Tracker>);

impl fmt::Debug for Presence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Presence").field("node", &self.0.node).finish()
    }
}

impl PubSub {
    /// Presence: who is on which topic, across every node.
    pub fn presence(&self) -> Presence {
        Presence(tracker(self))
    }
}

impl Presence {
    /// Everyone on `topic` as of the last `presence_diff`: `{key: {"metas": [{"phx_ref": ...,
    /// ...meta}, ...]}, ...}`, the payload of `presence_state`.
    pub fn list(&self, topic: &str) -> Value {
        let state = self.0.state.lock();
        let mut out = Map::new();
        if let Some(t) = state.topics.get(topic) {
            for (key, metas) in &t.keys {
                let metas: Vec<Value> = metas.iter().filter_map(|m| serde_json::from_str(&m.meta).ok()).collect();
                out.insert(key.clone(), json!({ "metas": metas }));
            }
        }
        Value::Object(out)
    }

    /// How many keys are present on `topic` (as of the last `presence_diff`).
    pub fn count(&self, topic: &str) -> usize {
        self.0.state.lock().topics.get(topic).map_or(0, |t| t.keys.len())
    }

    /// Replaces the options; changes already waiting keep their window.
    pub fn set_options(&self, options: PresenceOptions) {
        *self.0.presence_options.lock() = options;
    }

    /// The options in force.
    pub fn options(&self) -> PresenceOptions {
        self.0.presence_options.lock().clone()
    }

    /// Sends every change waiting for its window now (tests, shutdown).
    pub fn flush(&self) {
        if let Some(pubsub) = self.0.pubsub.lock().as_ref().and_then(WeakPubSub::upgrade) {
            flush(&pubsub, true);
        }
    }

    /// How many topics have anyone present, across every node (for metrics).
    pub fn topic_count(&self) -> usize {
        self.0.state.lock().topics.len()
    }

    /// How many entries (one per key per tracking socket, every node's included) this node
    /// holds, across every topic (for metrics).
    pub fn entry_count(&self) -> usize {
        self.0.state.lock().topics.values().map(|t| t.entries).sum()
    }
}

/// What nodes tell each other about presence.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
enum Msg {
    Heartbeat {
        clock: u64,
    },
    Delta {
        from: u64,
        to: u64,
        ops: Vec<Op>,
    },
    StateRequest,
    State {
        clock: u64,
        entries: Vec<Op>,
    },
    /// The sender is leaving the cluster: drop its entries now.
    Goodbye,
}

/// A join or leave of one entry; `meta` carries its `phx_ref`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Op {
    join: bool,
    topic: Arc<str>,
    key: String,
    meta: Value,
}

impl Op {
    fn phx_ref(&self) -> Option<Arc<str>> {
        self.meta.get("phx_ref").and_then(Value::as_str).map(Arc::from)
    }
}

/// One meta of a key: who owns it, its ref, and the meta as JSON (`phx_ref` included), kept
/// encoded since it is only ever sent.
#[derive(Clone)]
struct Entry {
    node: NodeId,
    phx_ref: Arc<str>,
    meta: Box<str>,
}

/// A change waiting for the end of its window.
struct Pending {
    join: bool,
    topic: Arc<str>,
    key: String,
    entry: Entry,
}

struct Local {
    topic: Arc<str>,
    key: String,
    phx_ref: Arc<str>,
}

/// A topic and a key.
type Place = (Arc<str>, String);

struct Replica {
    clock: u64,
    last_seen: Instant,
    /// phx_ref → where the entry is
    entries: HashMap<Arc<str>, Place>,
    asked: Option<Instant>,
}

/// Windows kept per topic to give a late joiner the list as it was before a diff it got.
const KEPT_WINDOWS: usize = 32;

/// The changes of one published diff, and its mark (see `PubSub::dispatch_marked`).
struct Window {
    mark: u64,
    changes: Vec<(bool, String, Entry)>,
}

/// One topic's published list and what it took to get there.
#[derive(Default)]
struct Topic {
    keys: BTreeMap<String, Vec<Entry>>,
    /// Entries and bytes in `keys`.
    entries: usize,
    bytes: usize,
    /// Entries and bytes of local joins waiting for their window.
    pending_entries: usize,
    pending_bytes: usize,
    /// Changes sent to the other nodes, waiting for the end of this topic's window to be
    /// published here (see [`PresenceOptions::window_per_subscriber`]).
    waiting: Vec<Pending>,
    windows: VecDeque<Window>,
    /// Whether a diff was dropped from `windows` that a joiner might have needed.
    windows_lost: bool,
    /// The encoded state of `keys`, per serializer, until the next diff.
    cache: [Option<Arc<[Frame]>>; 3],
}

/// The size an entry counts for in the limits: its key and meta as JSON, with the framing.
fn entry_bytes(key: &str, meta: &str) -> usize {
    key.len() + meta.len() + 16
}

#[derive(Default)]
struct State {
    /// This node's clock: bumped by every local change.
    clock: u64,
    /// The clock of the last delta sent.
    flushed: u64,
    /// Changes waiting for the end of the window, and when the first of them came.
    pending: Vec<Pending>,
    pending_since: Option<Instant>,
    /// When each topic with changes waiting (in [`Topic::waiting`]) publishes them.
    due: HashMap<Arc<str>, Instant>,
    topics: HashMap<Arc<str>, Topic>,
    owners: HashMap<u64, Vec<Local>>,
    replicas: HashMap<NodeId, Replica>,
}

/// This node's presence replica, kept in the PubSub as one of its layers.
pub(crate) struct Tracker {
    node: NodeId,
    options: ClusterOptions,
    presence_options: Mutex<PresenceOptions>,
    /// The PubSub this tracker belongs to, for [`Presence::flush`].
    pubsub: Mutex<Option<WeakPubSub>>,
    state: Mutex<State>,
    wake: Arc<Notify>,
    started: AtomicBool,
    next_owner: AtomicU64,
    next_ref: AtomicU64,
}

impl Tracker {
    fn new(pubsub: &PubSub, options: ClusterOptions) -> Tracker {
        Tracker {
            node: pubsub.node(),
            options,
            presence_options: Mutex::new(PresenceOptions::default()),
            pubsub: Mutex::new(Some(pubsub.downgrade())),
            state: Mutex::new(State::default()),
            wake: Arc::new(Notify::new()),
            started: AtomicBool::new(false),
            next_owner: AtomicU64::new(1),
            next_ref: AtomicU64::new(1),
        }
    }

    fn new_ref(&self) -> Arc<str> {
        use base64::Engine as _;
        let mut raw = [0u8; 12];
        raw[..8].copy_from_slice(&self.node.get().to_be_bytes());
        raw[8..].copy_from_slice(&(self.next_ref.fetch_add(1, Ordering::Relaxed) as u32).to_be_bytes());
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw).into()
    }
}

/// This node's presence replica; a single node's until [`replicate`] makes it a cluster's.
fn tracker(pubsub: &PubSub) -> Arc<Tracker> {
    pubsub.layer(|| Tracker::new(pubsub, ClusterOptions::default()))
}

/// Replicates presence through the PubSub's cluster, with `options`' timing. Call it before the
/// cluster starts, so no presence message arrives before it is listened for.
pub(crate) fn replicate(pubsub: &PubSub, options: ClusterOptions) {
    let _ = pubsub.layer(|| Tracker::new(pubsub, options));
    let weak = pubsub.downgrade();
    pubsub.cluster().on_presence(move |origin, json| {
        if let Some(pubsub) = weak.upgrade() {
            receive(&pubsub, origin, &json);
        }
    });
    start(pubsub);
}

/// The entries one channel instance tracks; untracked when it is dropped with the channel.
pub(crate) struct Owner {
    pubsub: WeakPubSub,
    id: u64,
}

impl Owner {
    pub(crate) fn new(pubsub: &PubSub) -> Owner {
        Owner { pubsub: pubsub.downgrade(), id: tracker(pubsub).next_owner.fetch_add(1, Ordering::Relaxed) }
    }

    /// The meta with its `phx_ref`, encoded, and checked against the size limit.
    fn encode_meta(
        tracker: &Tracker,
        key: &str,
        mut meta: Map<String, Value>,
        phx_ref: &str,
        prev: Option<&str>,
    ) -> Result<Box<str>, PresenceError> {
        meta.insert("phx_ref".into(), Value::String(phx_ref.to_owned()));
        if let Some(prev) = prev {
            meta.insert("phx_ref_prev".into(), Value::String(prev.to_owned()));
        }
        let meta = Value::Object(meta).to_string();
        let max = tracker.presence_options.lock().max_meta_bytes;
        let bytes = entry_bytes(key, &meta);
        if bytes > max {
            return Err(PresenceError::TooLarge { bytes, max });
        }
        Ok(meta.into())
    }

    pub(crate) fn track(&self, topic: &Arc<str>, key: String, meta: Value) -> Result<String, PresenceError> {
        let Value::Object(meta) = meta else { return Err(PresenceError::MetaNotObject) };
        let Some(pubsub) = self.pubsub.upgrade() else { return Err(PresenceError::NotTracked(key)) };
        let tracker = tracker(&pubsub);
        let phx_ref = tracker.new_ref();
        let meta = Owner::encode_meta(&tracker, &key, meta, &phx_ref, None)?;
        let (max_entries, max_bytes) = {
            let o = tracker.presence_options.lock();
            (o.max_entries_per_topic, o.max_bytes_per_topic)
        };
        {
            let mut guard = tracker.state.lock();
            let state = &mut *guard;
            let locals = state.owners.entry(self.id).or_default();
            if locals.iter().any(|l| l.topic == *topic && l.key == key) {
                return Err(PresenceError::AlreadyTracked(key));
            }
            let bytes = entry_bytes(&key, &meta);
            let t = state.topics.entry(topic.clone()).or_default();
            let (held_entries, held_bytes) = (t.entries + t.pending_entries, t.bytes + t.pending_bytes);
            if held_entries + 1 > max_entries || held_bytes + bytes > max_bytes {
                if locals.is_empty() {
                    state.owners.remove(&self.id);
                }
                return Err(PresenceError::TopicFull { entries: held_entries, bytes: held_bytes });
            }
            t.pending_entries += 1;
            t.pending_bytes += bytes;
            locals.push(Local { topic: topic.clone(), key: key.clone(), phx_ref: phx_ref.clone() });
            let entry = Entry { node: tracker.node, phx_ref: phx_ref.clone(), meta };
            state.local_op(Pending { join: true, topic: topic.clone(), key, entry });
        }
        start(&pubsub);
        tracker.wake.notify_one();
        Ok(phx_ref.to_string())
    }

    pub(crate) fn update(&self, topic: &Arc<str>, key: &str, meta: Value) -> Result<String, PresenceError> {
        let Value::Object(meta) = meta else { return Err(PresenceError::MetaNotObject) };
        let Some(pubsub) = self.pubsub.upgrade() else { return Err(PresenceError::NotTracked(key.into())) };
        let tracker = tracker(&pubsub);
        let phx_ref = tracker.new_ref();
        {
            let mut guard = tracker.state.lock();
            let state = &mut *guard;
            let old = state
                .owners
                .get(&self.id)
                .and_then(|locals| locals.iter().find(|l| l.topic == *topic && l.key == key))
                .map(|l| l.phx_ref.clone())
                .ok_or_else(|| PresenceError::NotTracked(key.into()))?;
            let meta = Owner::encode_meta(&tracker, key, meta, &phx_ref, Some(&old))?;
            if let Some(l) = state
                .owners
                .get_mut(&self.id)
                .and_then(|locals| locals.iter_mut().find(|l| l.topic == *topic && l.key == key))
            {
                l.phx_ref = phx_ref.clone();
            }
            let t = state.topics.entry(topic.clone()).or_default();
            t.pending_entries += 1;
            t.pending_bytes += entry_bytes(key, &meta);
            let gone = Entry { node: tracker.node, phx_ref: old, meta: "{}".into() };
            state.local_op(Pending { join: false, topic: topic.clone(), key: key.into(), entry: gone });
            let entry = Entry { node: tracker.node, phx_ref: phx_ref.clone(), meta };
            state.local_op(Pending { join: true, topic: topic.clone(), key: key.into(), entry });
        }
        tracker.wake.notify_one();
        Ok(phx_ref.to_string())
    }

    pub(crate) fn untrack(&self, topic: &Arc<str>, key: &str) -> bool {
        self.untrack_where(|l| l.topic == *topic && l.key == key) > 0
    }

    fn untrack_where(&self, matches: impl Fn(&Local) -> bool) -> usize {
        let Some(pubsub) = self.pubsub.upgrade() else { return 0 };
        let tracker = tracker(&pubsub);
        let removed = {
            let mut state = tracker.state.lock();
            let Some(locals) = state.owners.get_mut(&self.id) else { return 0 };
            let (gone, kept): (Vec<Local>, Vec<Local>) = locals.drain(..).partition(|l| matches(l));
            if kept.is_empty() {
                state.owners.remove(&self.id);
            } else {
                *locals = kept;
            }
            for l in &gone {
                let entry = Entry { node: tracker.node, phx_ref: l.phx_ref.clone(), meta: "{}".into() };
                state.local_op(Pending { join: false, topic: l.topic.clone(), key: l.key.clone(), entry });
            }
            gone.len()
        };
        if removed > 0 {
            tracker.wake.notify_one();
        }
        removed
    }
}

impl Drop for Owner {
    fn drop(&mut self) {
        self.untrack_where(|_| true);
    }
}

impl State {
    /// Queues a change made on this node for the next window.
    fn local_op(&mut self, op: Pending) {
        self.clock += 1;
        self.queue(op);
    }

    /// Queues a change, local or remote, for the next window.
    fn queue(&mut self, op: Pending) {
        self.pending_since.get_or_insert_with(Instant::now);
        self.pending.push(op);
    }

    /// Queues another node's op for the next window, keeping that node's register up to date.
    fn remote_op(&mut self, node: NodeId, op: Op) {
        let Some(phx_ref) = op.phx_ref() else { return };
        let Some(replica) = self.replicas.get_mut(&node) else { return };
        if op.join {
            replica.entries.insert(phx_ref.clone(), (op.topic.clone(), op.key.clone()));
        } else if replica.entries.remove(&phx_ref).is_none() {
            return;
        }
        let meta = if op.join { op.meta.to_string().into() } else { "{}".into() };
        let entry = Entry { node, phx_ref, meta };
        self.queue(Pending { join: op.join, topic: op.topic, key: op.key, entry });
    }

    /// Queues the removal of every entry of `node`.
    fn drop_replica(&mut self, node: NodeId) -> usize {
        let Some(replica) = self.replicas.remove(&node) else { return 0 };
        let n = replica.entries.len();
        for (phx_ref, (topic, key)) in replica.entries {
            let entry = Entry { node, phx_ref, meta: "{}".into() };
            self.queue(Pending { join: false, topic, key, entry });
        }
        n
    }

    /// Every entry this node owns as of the last delta, as joins: the published list, and the
    /// changes that went out in deltas but wait for their topic's window here.
    fn local_entries(&self, node: NodeId) -> Vec<Op> {
        let mut out = Vec::new();
        for (topic, t) in &self.topics {
            let mut mine: BTreeMap<(&str, &str), &Entry> = BTreeMap::new();
            for (key, metas) in &t.keys {
                for e in metas.iter().filter(|e| e.node == node) {
                    mine.insert((key, &e.phx_ref), e);
                }
            }
            for p in t.waiting.iter().filter(|p| p.entry.node == node) {
                if p.join {
                    mine.insert((&p.key, &p.entry.phx_ref), &p.entry);
                } else {
                    mine.remove(&(p.key.as_str(), &*p.entry.phx_ref));
                }
            }
            for ((key, _), e) in mine {
                let meta = serde_json::from_str(&e.meta).unwrap_or(Value::Null);
                out.push(Op { join: true, topic: topic.clone(), key: key.to_owned(), meta });
            }
        }
        out
    }
}

impl Topic {
    /// Adds an entry to the published list.
    fn insert(&mut self, key: &str, entry: Entry) {
        let metas = self.keys.entry(key.to_owned()).or_default();
        if let Some(at) = metas.iter().position(|e| e.phx_ref == entry.phx_ref) {
            let old = metas.remove(at);
            self.entries -= 1;
            self.bytes -= entry_bytes(key, &old.meta);
        }
        self.entries += 1;
        self.bytes += entry_bytes(key, &entry.meta);
        metas.push(entry);
    }

    /// Removes an entry from the published list; the entry, if it was there.
    fn remove(&mut self, key: &str, phx_ref: &str) -> Option<Entry> {
        let metas = self.keys.get_mut(key)?;
        let at = metas.iter().position(|e| &*e.phx_ref == phx_ref)?;
        let entry = metas.remove(at);
        if metas.is_empty() {
            self.keys.remove(key);
        }
        self.entries -= 1;
        self.bytes -= entry_bytes(key, &entry.meta);
        Some(entry)
    }

    /// The state's frames for `serializer`, as the list was before every diff marked above
    /// `since` (a joiner's subscription id), so that those diffs, which the joiner got before
    /// its state, apply after it exactly once.
    fn state_frames(&mut self, topic: &str, serializer: Serializer, since: Option<u64>, part: usize) -> Arc<[Frame]> {
        // Marks grow window after window: the windows the joiner got are the last ones.
        let first = since.and_then(|id| self.windows.iter().position(|w| w.mark > id)).unwrap_or(self.windows.len());
        if first == self.windows.len() {
            if let Some(frames) = &self.cache[serializer.index()] {
                return frames.clone();
            }
            let frames: Arc<[Frame]> = encode_state(topic, serializer, self.keys.iter(), part).into();
            self.cache[serializer.index()] = Some(frames.clone());
            return frames;
        }
        let later: Vec<&Window> = self.windows.range(first..).collect();
        if self.windows_lost && first == 0 {
            tracing::debug!(topic, "joiner older than the diffs kept: state as of now");
        }
        // Undo the later windows, newest first, on a copy of the keys they touched.
        let mut touched: BTreeMap<&str, Vec<Entry>> = BTreeMap::new();
        for w in &later {
            for (_, key, _) in &w.changes {
                touched.entry(key).or_insert_with(|| self.keys.get(key.as_str()).cloned().unwrap_or_default());
            }
        }
        for w in later.iter().rev() {
            for (join, key, entry) in w.changes.iter().rev() {
                let metas = touched.entry(key).or_default();
                if *join {
                    metas.retain(|e| e.phx_ref != entry.phx_ref);
                } else {
                    metas.push(entry.clone());
                }
            }
        }
        let untouched: Vec<(&String, &Vec<Entry>)> =
            self.keys.iter().filter(|(k, _)| !touched.contains_key(k.as_str())).collect();
        let touched: Vec<(String, Vec<Entry>)> =
            touched.into_iter().filter(|(_, m)| !m.is_empty()).map(|(k, m)| (k.to_owned(), m)).collect();
        // phoenix.js applies the diffs the joiner already got right after the `presence_state`,
        // that is after the first part: every entry they touch goes in that part, whatever its
        // size, or a later part's join would undo a leave applied before it.
        let mut all: Vec<(&String, &Vec<Entry>)> = touched.iter().map(|(k, m)| (k, m)).collect();
        let first = all.len();
        all.extend(untouched);
        encode_state_from(topic, serializer, all.into_iter(), part, first).into()
    }
}

/// `{key: {"metas": [...]}, ...}` for `entries`, cut into payloads of at most about `part`
/// bytes (an entry is never cut), except that the `first` entries all go in the first payload.
fn state_payloads<'a>(
    entries: impl Iterator<Item = (&'a String, &'a Vec<Entry>)>,
    part: usize,
    first: usize,
) -> Vec<String> {
    let mut parts = Vec::new();
    let mut out = String::from("{");
    for (n, (key, metas)) in entries.enumerate() {
        if metas.is_empty() {
            continue;
        }
        let mut one = serde_json::to_string(key).unwrap_or_else(|_| "\"\"".into());
        one.push_str(":{\"metas\":[");
        for (i, m) in metas.iter().enumerate() {
            if i > 0 {
                one.push(',');
            }
            one.push_str(&m.meta);
        }
        one.push_str("]}");
        if n >= first && out.len() > 1 && out.len() + one.len() + 2 > part {
            out.push('}');
            parts.push(std::mem::replace(&mut out, String::from("{")));
        }
        if out.len() > 1 {
            out.push(',');
        }
        out.push_str(&one);
    }
    out.push('}');
    parts.push(out);
    parts
}

/// The frames of a `presence_state`: the state with the first part, then a `presence_diff`
/// joining each further part.
fn encode_state<'a>(
    topic: &str,
    serializer: Serializer,
    entries: impl Iterator<Item = (&'a String, &'a Vec<Entry>)>,
    part: usize,
) -> Vec<Frame> {
    encode_state_from(topic, serializer, entries, part, 0)
}

/// [`encode_state`] with the `first` entries all in the first part, however large it gets.
fn encode_state_from<'a>(
    topic: &str,
    serializer: Serializer,
    entries: impl Iterator<Item = (&'a String, &'a Vec<Entry>)>,
    part: usize,
    first: usize,
) -> Vec<Frame> {
    let mut frames = Vec::new();
    for (i, payload) in state_payloads(entries, part, first).into_iter().enumerate() {
        let (event, payload) = if i == 0 {
            ("presence_state", payload)
        } else {
            ("presence_diff", format!("{{\"joins\":{payload},\"leaves\":{{}}}}"))
        };
        match frame_with_payload(serializer, topic, event, &payload) {
            Some(frame) => frames.push(frame),
            None => tracing::warn!(topic, "presence state not encodable"),
        }
    }
    frames
}

/// A broadcast frame (no join_ref, no ref) whose payload is `json`, already encoded: the
/// serializer encodes the frame around a `null` payload and `json` takes its place.
fn frame_with_payload(serializer: Serializer, topic: &str, event: &str, json: &str) -> Option<Frame> {
    let b = Broadcast { topic: topic.to_owned(), event: event.to_owned(), payload: Payload::Json(Value::Null) };
    let Ok(Frame::Text(text)) = serializer.encode_broadcast(&b) else { return None };
    let at = if serializer == Serializer::V1 {
        let needle = b"\"payload\":null";
        text.windows(needle.len()).position(|w| w == needle)? + needle.len() - 4
    } else {
        text.len().checked_sub(5).filter(|&at| &text[at..] == b"null]")?
    };
    let mut out = BytesMut::with_capacity(text.len() + json.len());
    out.extend_from_slice(&text[..at]);
    out.extend_from_slice(json.as_bytes());
    out.extend_from_slice(&text[at + 4..]);
    Some(Frame::Text(out.freeze()))
}

/// Sends a joiner its `presence_state` (see the module's documentation).
pub(crate) fn push_state(
    pubsub: &PubSub,
    topic: &str,
    outbox: &Outbox,
    serializer: Serializer,
    subscriber: Option<SubscriberId>,
) {
    let tracker = tracker(pubsub);
    let part = tracker.presence_options.lock().state_part_bytes;
    let mut state = tracker.state.lock();
    let frames: Arc<[Frame]> = match state.topics.get_mut(topic) {
        Some(t) => t.state_frames(topic, serializer, subscriber.map(SubscriberId::get), part),
        None => encode_state(topic, serializer, std::iter::empty::<(&String, &Vec<Entry>)>(), part).into(),
    };
    // Under the lock, so no diff goes out between the state and the joiner's queue. Outside
    // the outbound limits: a big room's state is larger than a socket's byte limit, and it is
    // shared by the window's joiners (bounded by the topic's presence limits).
    outbox.push_exempt(&frames);
}

/// One topic's `presence_diff` in the making: joins and leaves by key, with a meta that joins
/// and leaves within the window cancelled out.
#[derive(Default)]
struct Diff {
    joins: BTreeMap<String, Vec<Entry>>,
    leaves: BTreeMap<String, Vec<Entry>>,
    changes: Vec<(bool, String, Entry)>,
}

impl Diff {
    fn join(&mut self, key: &str, entry: Entry) {
        self.changes.push((true, key.to_owned(), entry.clone()));
        self.joins.entry(key.to_owned()).or_default().push(entry);
    }

    fn leave(&mut self, key: &str, entry: Entry) {
        self.changes.push((false, key.to_owned(), entry.clone()));
        if let Some(metas) = self.joins.get_mut(key)
            && let Some(at) = metas.iter().position(|e| e.phx_ref == entry.phx_ref)
        {
            metas.remove(at);
            if metas.is_empty() {
                self.joins.remove(key);
            }
            return;
        }
        self.leaves.entry(key.to_owned()).or_default().push(entry);
    }

    /// The `presence_diff` payloads: one, or several of at most about `part` bytes when it is
    /// larger, each key's joins and leaves in the same one (phoenix.js applies a diff's joins
    /// before its leaves, as the one diff would).
    fn payloads(&self, part: usize) -> Vec<Value> {
        let metas = |m: &[Entry]| -> Value {
            let metas: Vec<Value> = m.iter().filter_map(|e| serde_json::from_str(&e.meta).ok()).collect();
            json!({ "metas": metas })
        };
        let size = |key: &str, m: Option<&Vec<Entry>>| {
            m.map_or(0, |m| key.len() + 16 + m.iter().map(|e| e.meta.len() + 1).sum::<usize>())
        };
        let mut keys: Vec<&String> = self.joins.keys().chain(self.leaves.keys()).collect();
        keys.sort_unstable();
        keys.dedup();
        let mut out = Vec::new();
        let (mut joins, mut leaves, mut bytes) = (Map::new(), Map::new(), 0);
        for key in keys {
            let (j, l) = (self.joins.get(key), self.leaves.get(key));
            let one = size(key, j) + size(key, l);
            if bytes > 0 && bytes + one > part {
                let (joins, leaves) = (std::mem::take(&mut joins), std::mem::take(&mut leaves));
                out.push(json!({ "joins": joins, "leaves": leaves }));
                bytes = 0;
            }
            if let Some(j) = j {
                joins.insert(key.clone(), metas(j));
            }
            if let Some(l) = l {
                leaves.insert(key.clone(), metas(l));
            }
            bytes += one;
        }
        out.push(json!({ "joins": joins, "leaves": leaves }));
        out
    }
}

/// Starts the tasks that send this node's deltas and heartbeats and notice silent nodes.
fn start(pubsub: &PubSub) {
    let tracker = tracker(pubsub);
    if tracker.started.swap(true, Ordering::AcqRel) {
        return;
    }
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        tracker.started.store(false, Ordering::Release);
        return;
    };
    rt.spawn(flusher(pubsub.downgrade()));
    if pubsub.is_clustered() {
        rt.spawn(ticker(pubsub.downgrade()));
    }
}

/// Moves the changes of a window that is over (all of them when `force`) to their topics, as one
/// delta to the other nodes, then publishes the topics whose window is over: their lists change,
/// and their subscribers get one `presence_diff` each (in parts when large). Returns when it is
/// next due, if anything waits.
fn flush(pubsub: &PubSub, force: bool) -> Option<Instant> {
    let tracker = tracker(pubsub);
    let (window, per_subscriber, part) = {
        let o = tracker.presence_options.lock();
        (o.window, o.window_per_subscriber, o.state_part_bytes)
    };
    let now = Instant::now();
    let mut guard = tracker.state.lock();
    let state = &mut *guard;
    let mut delta = None;
    if let Some(since) = state.pending_since.filter(|&since| force || since + window <= now) {
        state.pending_since = None;
        let (from, to) = (state.flushed, state.clock);
        state.flushed = to;
        let mut ops = Vec::new();
        for p in std::mem::take(&mut state.pending) {
            if p.entry.node == tracker.node {
                let meta = if p.join {
                    serde_json::from_str(&p.entry.meta).unwrap_or(Value::Null)
                } else {
                    json!({ "phx_ref": &*p.entry.phx_ref })
                };
                ops.push(Op { join: p.join, topic: p.topic.clone(), key: p.key.clone(), meta });
            }
            let t = state.topics.entry(p.topic.clone()).or_default();
            if t.waiting.is_empty() {
                let wait = if window.is_zero() {
                    window
                } else {
                    let subscribers = pubsub.subscriber_count(&p.topic).min(u32::MAX as usize) as u32;
                    window.max(per_subscriber.saturating_mul(subscribers))
                };
                state.due.insert(p.topic.clone(), since + wait);
            }
            t.waiting.push(p);
        }
        if from != to {
            delta = Some(Msg::Delta { from, to, ops });
        }
    }
    let ready: Vec<Arc<str>> =
        state.due.iter().filter(|&(_, &due)| force || due <= now).map(|(topic, _)| topic.clone()).collect();
    for topic in ready {
        state.due.remove(&topic);
        if let Some(t) = state.topics.get_mut(&topic) {
            t.publish(pubsub, &topic, tracker.node, part);
            if t.keys.is_empty() && t.pending_entries == 0 {
                state.topics.remove(&topic);
            }
        }
    }
    let next = state.pending_since.map(|since| since + window).into_iter().chain(state.due.values().copied()).min();
    drop(guard);
    if let Some(delta) = delta
        && pubsub.is_clustered()
    {
        send(pubsub, None, &delta);
    }
    next
}

impl Topic {
    /// Applies the changes waiting for this topic's window to its list, and sends its
    /// subscribers the `presence_diff`.
    fn publish(&mut self, pubsub: &PubSub, topic: &Arc<str>, node: NodeId, part: usize) {
        let mut diff = Diff::default();
        for p in std::mem::take(&mut self.waiting) {
            if p.join {
                if p.entry.node == node {
                    self.pending_entries = self.pending_entries.saturating_sub(1);
                    self.pending_bytes = self.pending_bytes.saturating_sub(entry_bytes(&p.key, &p.entry.meta));
                }
                self.insert(&p.key, p.entry.clone());
                diff.join(&p.key, p.entry);
            } else if let Some(entry) = self.remove(&p.key, &p.entry.phx_ref) {
                diff.leave(&p.key, entry);
            }
        }
        if diff.changes.is_empty() {
            return;
        }
        self.cache = Default::default();
        if diff.joins.is_empty() && diff.leaves.is_empty() {
            // Everything cancelled out: nobody is told, and the list is as it was.
            return;
        }
        let parts: Vec<Arc<Broadcast>> = diff
            .payloads(part)
            .into_iter()
            .map(|payload| {
                Arc::new(Broadcast { topic: topic.to_string(), event: "presence_diff".into(), payload: payload.into() })
            })
            .collect();
        // All parts under one mark: a joiner got all of them or none.
        let (_, mark) = pubsub.0.dispatch_parts(&parts, None, None);
        if self.windows.len() == KEPT_WINDOWS {
            self.windows.pop_front();
            self.windows_lost = true;
        }
        self.windows.push_back(Window { mark, changes: diff.changes });
    }
}

/// Sends waiting changes at the end of each window: wakes at the first change, and when the
/// next window is over.
async fn flusher(pubsub: WeakPubSub) {
    let Some(wake) = pubsub.upgrade().map(|p| tracker(&p).wake.clone()) else { return };
    let mut next = None;
    loop {
        // `notify_one` leaves a permit when nobody waits, so no change is missed between a round
        // and the wait below.
        match next {
            None => wake.notified().await,
            Some(at) => {
                tokio::select! {
                    _ = wake.notified() => {}
                    _ = tokio::time::sleep_until(at) => {}
                }
            }
        }
        let Some(strong) = pubsub.upgrade() else { return };
        next = flush(&strong, false);
    }
}

async fn ticker(pubsub: WeakPubSub) {
    let (period, timeout) = match pubsub.upgrade() {
        Some(pubsub) => {
            let options = &tracker(&pubsub).options;
            (options.heartbeat_interval, options.node_timeout)
        }
        None => return,
    };
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(inner) = pubsub.upgrade() else { return };
        let tracker = tracker(&inner);
        let (clock, dropped) = {
            let mut state = tracker.state.lock();
            let dead: Vec<NodeId> =
                state.replicas.iter().filter(|(_, r)| r.last_seen.elapsed() > timeout).map(|(n, _)| *n).collect();
            for &node in &dead {
                let n = state.drop_replica(node);
                tracing::warn!(node = %inner.node(), peer = %node, presences = n, ?timeout, "node silent; its presences removed");
            }
            (state.flushed, !dead.is_empty())
        };
        if dropped {
            tracker.wake.notify_one();
        }
        send(&inner, None, &Msg::Heartbeat { clock });
    }
}

fn send(pubsub: &PubSub, target: Option<NodeId>, msg: &Msg) {
    match serde_json::to_vec(msg) {
        Ok(json) => pubsub.cluster().send(target, &Body::Presence(json.into())),
        Err(e) => tracing::error!(error = %e, "presence message not encodable"),
    }
}

/// Sends what is left of local changes, then tells the other nodes this one is leaving.
pub(crate) async fn goodbye(pubsub: &PubSub) {
    // The ends of the channels that just closed go out before the goodbye.
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    flush(pubsub, true);
    send(pubsub, None, &Msg::Goodbye);
}

/// Handles a presence message from `origin`.
fn receive(inner: &PubSub, origin: NodeId, json: &[u8]) {
    let msg: Msg = match serde_json::from_slice(json) {
        Ok(msg) => msg,
        Err(e) => {
            inner.cluster().count_malformed();
            tracing::warn!(peer = %origin, error = %e, "unreadable presence message ignored");
            return;
        }
    };
    start(inner);
    let tracker = tracker(inner);
    let ask_every = tracker.options.heartbeat_interval * 2;
    let mut reply = None;
    if let Msg::Goodbye = msg {
        let n = tracker.state.lock().drop_replica(origin);
        tracing::info!(node = %inner.node(), peer = %origin, presences = n, "node left");
        tracker.wake.notify_one();
        return;
    }
    {
        let mut guard = tracker.state.lock();
        let state = &mut *guard;
        let now = Instant::now();
        let replica = state.replicas.entry(origin).or_insert_with(|| {
            tracing::info!(node = %inner.node(), peer = %origin, "node joined");
            Replica { clock: 0, last_seen: now, entries: HashMap::new(), asked: None }
        });
        replica.last_seen = now;
        let mut behind = false;
        match msg {
            Msg::Heartbeat { clock } => behind = replica.clock < clock,
            Msg::Delta { from, to, ops } => {
                if replica.clock == from {
                    replica.clock = to;
                    for op in ops {
                        state.remote_op(origin, op);
                    }
                } else if replica.clock < to {
                    behind = true;
                }
            }
            Msg::Goodbye => {}
            Msg::StateRequest => {
                reply = Some(Msg::State { clock: state.flushed, entries: state.local_entries(tracker.node) });
            }
            Msg::State { clock, entries } => {
                if clock >= replica.clock {
                    // Replace that node's register by the newer one: leaves for what is gone,
                    // joins for what is new, nothing for what stayed.
                    let mut keep: HashMap<Arc<str>, Op> = HashMap::new();
                    for op in entries {
                        if let Some(r) = op.phx_ref() {
                            keep.insert(r, op);
                        }
                    }
                    let old: Vec<(Arc<str>, Place)> =
                        replica.entries.iter().map(|(r, tk)| (r.clone(), tk.clone())).collect();
                    replica.clock = clock;
                    replica.asked = None;
                    for (phx_ref, (topic, key)) in old {
                        if keep.remove(&phx_ref).is_none() {
                            let meta = json!({ "phx_ref": &*phx_ref });
                            state.remote_op(origin, Op { join: false, topic, key, meta });
                        }
                    }
                    for (_, op) in keep {
                        state.remote_op(origin, op);
                    }
                }
            }
        }
        if behind
            && let Some(replica) = state.replicas.get_mut(&origin)
            && replica.asked.is_none_or(|t| t.elapsed() > ask_every)
        {
            replica.asked = Some(now);
            reply = Some(Msg::StateRequest);
        }
    }
    tracker.wake.notify_one();
    if let Some(reply) = reply {
        send(inner, Some(origin), &reply);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use fawkes_pubsub_core::{Adapter, RemoteInbound};
    use std::time::Duration;

    /// Nodes in one process; a partition cuts a node off in both directions.
    #[derive(Clone, Default)]
    struct Net(Arc<Mutex<Vec<(RemoteInbound, bool)>>>);

    struct Port(Net, usize);

    impl Adapter for Port {
        fn start(&self, inbound: RemoteInbound) {
            let mut nodes = self.0.0.lock();
            assert_eq!(nodes.len(), self.1);
            nodes.push((inbound, true));
        }
        fn broadcast(&self, message: Bytes) {
            let nodes = self.0.0.lock().clone();
            if !nodes[self.1].1 {
                return;
            }
            for (node, up) in nodes {
                if up {
                    node.deliver(message.clone());
                }
            }
        }
    }

    impl Net {
        fn node(&self, options: ClusterOptions) -> PubSub {
            let n = self.0.lock().len();
            PubSub::with_options(Port(self.clone(), n), options)
        }
        fn set_up(&self, i: usize, up: bool) {
            self.0.lock()[i].1 = up;
        }
    }

    fn keys(p: &PubSub, topic: &str) -> Vec<String> {
        p.presence().list(topic).as_object().map(|o| o.keys().cloned().collect()).unwrap_or_default()
    }

    async fn until(what: &str, mut f: impl FnMut() -> bool) {
        for _ in 0..2000 {
            if f() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("timed out waiting for {what}");
    }

    /// `n` nodes on one net, with heartbeats every 100 ms and `node_timeout`.
    fn cluster(n: usize, node_timeout: Duration) -> (Net, Vec<PubSub>) {
        let net = Net::default();
        let opts = ClusterOptions::default().heartbeat_interval(Duration::from_millis(100)).node_timeout(node_timeout);
        let nodes = (0..n).map(|_| net.node(opts.clone())).collect();
        (net, nodes)
    }

    #[tokio::test(start_paused = true)]
    async fn nodes_converge_after_a_partition_and_drop_a_silent_node() {
        let (net, nodes) = cluster(3, Duration::from_secs(1));
        let topic: Arc<str> = "room:1".into();
        let owners: Vec<Owner> = nodes.iter().map(Owner::new).collect();
        for (i, owner) in owners.iter().enumerate() {
            owner.track(&topic, format!("user{i}"), json!({"n": i})).expect("tracked");
        }
        let all = vec!["user0".to_owned(), "user1".into(), "user2".into()];
        for node in &nodes {
            until("every node to list all three", || keys(node, "room:1") == all).await;
        }

        // Node 2 is cut off: the others drop it after the timeout, it drops them, and a change on
        // each side during the partition is merged when it heals.
        net.set_up(2, false);
        until("node 0 to drop node 2", || keys(&nodes[0], "room:1") == ["user0", "user1"]).await;
        until("node 2 to drop the others", || keys(&nodes[2], "room:1") == ["user2"]).await;
        owners[0].untrack(&topic, "user0");
        owners[2].update(&topic, "user2", json!({"n": 22})).expect("updated");
        net.set_up(2, true);
        for node in &nodes {
            until("convergence after healing", || {
                keys(node, "room:1") == ["user1", "user2"]
                    && node.presence().list("room:1")["user2"]["metas"][0]["n"] == 22
            })
            .await;
        }
        let list = nodes[1].presence().list("room:1");
        assert_eq!(list["user2"]["metas"][0]["n"], 22, "{list}");
        assert!(list["user2"]["metas"][0]["phx_ref_prev"].is_string(), "{list}");

        // Dropping an owner (its channel ended) untracks everywhere.
        drop(owners);
        for node in &nodes {
            until("empty lists", || keys(node, "room:1").is_empty()).await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn local_changes_reach_subscribers_as_presence_diff() {
        let pubsub = PubSub::new();
        let mut sub = pubsub.subscribe("room:1", 16);
        let topic: Arc<str> = "room:1".into();
        let owner = Owner::new(&pubsub);
        let phx_ref = owner.track(&topic, "alice".into(), json!({"device": "web"})).expect("tracked");
        assert_eq!(owner.track(&topic, "alice".into(), json!({})), Err(PresenceError::AlreadyTracked("alice".into())));
        assert_eq!(owner.track(&topic, "bob".into(), json!(1)), Err(PresenceError::MetaNotObject));
        let diff = sub.recv().await.expect("diff");
        assert_eq!(diff.event, "presence_diff");
        let payload = diff.payload.as_json().cloned().unwrap_or_default();
        assert_eq!(payload["joins"]["alice"]["metas"][0], json!({"device": "web", "phx_ref": phx_ref}));
        drop(owner);
        let diff = sub.recv().await.expect("diff");
        let payload = diff.payload.as_json().cloned().unwrap_or_default();
        assert_eq!(payload["leaves"]["alice"]["metas"][0]["phx_ref"], json!(phx_ref));
        assert_eq!(pubsub.presence().list("room:1"), json!({}));
    }

    /// A client keeping its list as phoenix.js's `Presence` does, that records every join of a
    /// ref it already had and every leave of a ref it did not have (a change applied twice).
    struct Client {
        out: crate::outbox::Outbound,
        list: Option<BTreeMap<String, Vec<String>>>,
        pending: Vec<Value>,
        twice: Vec<String>,
        frames: Vec<Frame>,
    }

    impl Client {
        /// Subscribes a V2 socket to `topic`.
        fn join(pubsub: &PubSub, topic: &str) -> (Client, crate::outbox::Outbox, SubscriberId) {
            Client::join_within(pubsub, topic, 10_000, usize::MAX)
        }

        /// [`Client::join`] with a socket whose outbound queue holds `frames` and `bytes`.
        fn join_within(
            pubsub: &PubSub,
            topic: &str,
            frames: usize,
            bytes: usize,
        ) -> (Client, crate::outbox::Outbox, SubscriberId) {
            use crate::pubsub::Subscriber;
            let limits =
                crate::outbox::OutboxLimits { frames, bytes, policy: crate::config::SlowConsumerPolicy::Disconnect };
            let counters = std::sync::Arc::new(crate::metrics::Counters::default());
            let outbox = Outbox::new(1, limits, counters.clone(), counters.flow("test"));
            let sub = Subscriber::Socket { outbox: outbox.clone(), serializer: Serializer::V2, intercept: None };
            let id = pubsub.insert(topic, sub);
            let out = crate::outbox::Outbound::new(outbox.clone(), Duration::from_secs(3600));
            (Client { out, list: None, pending: Vec::new(), twice: Vec::new(), frames: Vec::new() }, outbox, id)
        }

        fn read(&mut self) {
            let mut frames = Vec::new();
            self.out.try_recv_many(&mut frames, usize::MAX);
            for frame in frames {
                let msg: Value = serde_json::from_slice(frame.as_bytes()).expect("JSON frame");
                match msg[3].as_str() {
                    Some("presence_state") => {
                        let mut list = BTreeMap::new();
                        for (key, v) in msg[4].as_object().expect("state object") {
                            let refs = v["metas"].as_array().expect("metas").iter();
                            list.insert(
                                key.clone(),
                                refs.map(|m| m["phx_ref"].as_str().unwrap_or("").to_owned()).collect(),
                            );
                        }
                        self.list = Some(list);
                        for diff in std::mem::take(&mut self.pending) {
                            self.apply(&diff);
                        }
                    }
                    Some("presence_diff") if self.list.is_none() => self.pending.push(msg[4].clone()),
                    Some("presence_diff") => self.apply(&msg[4]),
                    other => panic!("unexpected event {other:?}"),
                }
                self.frames.push(frame);
            }
        }

        /// Joins, then leaves, as `syncDiff`.
        fn apply(&mut self, diff: &Value) {
            let list = self.list.as_mut().expect("a state first");
            for (key, v) in diff["joins"].as_object().expect("joins") {
                for m in v["metas"].as_array().expect("metas") {
                    let r = m["phx_ref"].as_str().unwrap_or("").to_owned();
                    let refs = list.entry(key.clone()).or_default();
                    if refs.contains(&r) {
                        self.twice.push(format!("join {key} {r}"));
                    } else {
                        refs.push(r);
                    }
                }
            }
            for (key, v) in diff["leaves"].as_object().expect("leaves") {
                for m in v["metas"].as_array().expect("metas") {
                    let r = m["phx_ref"].as_str().unwrap_or("");
                    match list.get_mut(key).and_then(|refs| refs.iter().position(|x| x == r).map(|at| (refs, at))) {
                        Some((refs, at)) => {
                            refs.remove(at);
                        }
                        None => self.twice.push(format!("leave {key} {r}")),
                    }
                    if list.get(key).is_some_and(Vec::is_empty) {
                        list.remove(key);
                    }
                }
            }
        }

        fn keys(&self) -> Vec<String> {
            self.list.as_ref().map(|l| l.keys().cloned().collect()).unwrap_or_default()
        }
    }

    fn topic(name: &str) -> Arc<str> {
        name.into()
    }

    #[tokio::test(start_paused = true)]
    async fn changes_within_a_window_go_out_as_one_diff() {
        let pubsub = PubSub::new();
        pubsub.presence().set_options(PresenceOptions::default().window(Duration::from_millis(50)));
        let mut sub = pubsub.subscribe("room:big", 16);
        let t = topic("room:big");
        let owners: Vec<Owner> = (0..100).map(|_| Owner::new(&pubsub)).collect();
        for (i, o) in owners.iter().enumerate() {
            o.track(&t, format!("u{i}"), json!({})).expect("tracked");
        }
        // One joins and leaves within the window: nobody hears of it.
        let brief = Owner::new(&pubsub);
        brief.track(&t, "brief".into(), json!({})).expect("tracked");
        drop(brief);
        // Nothing before the window ends; the published list is still empty.
        tokio::time::sleep(Duration::from_millis(49)).await;
        assert!(futures_util::FutureExt::now_or_never(sub.recv()).is_none(), "a diff before the window ended");
        assert_eq!(pubsub.presence().count("room:big"), 0);
        let diff = sub.recv().await.expect("diff");
        let payload = diff.payload.as_json().cloned().unwrap_or_default();
        assert_eq!(payload["joins"].as_object().map(Map::len), Some(100), "{payload}");
        assert_eq!(payload["leaves"], json!({}));
        assert_eq!(pubsub.presence().count("room:big"), 100);
        // Leaves batch the same way.
        drop(owners);
        let diff = sub.recv().await.expect("diff");
        let payload = diff.payload.as_json().cloned().unwrap_or_default();
        assert_eq!(payload["leaves"].as_object().map(Map::len), Some(100), "{payload}");
        assert!(futures_util::FutureExt::now_or_never(sub.recv()).is_none(), "one diff for the leaves");
        assert_eq!(pubsub.presence().list("room:big"), json!({}));
    }

    #[tokio::test(start_paused = true)]
    async fn a_large_room_s_window_grows_with_its_subscribers_and_a_small_room_keeps_its_own() {
        let pubsub = PubSub::new();
        pubsub.presence().set_options(
            PresenceOptions::default()
                .window(Duration::from_millis(50))
                .window_per_subscriber(Duration::from_millis(1)),
        );
        // 200 subscribers: a 200 ms window; 1 subscriber: the 50 ms one.
        let mut big: Vec<_> = (0..200).map(|_| pubsub.subscribe("room:big", 16)).collect();
        let mut small = pubsub.subscribe("room:small", 16);
        let start = Instant::now();
        let owner = Owner::new(&pubsub);
        owner.track(&topic("room:big"), "a".into(), json!({})).expect("tracked");
        owner.track(&topic("room:small"), "a".into(), json!({})).expect("tracked");
        small.recv().await.expect("the small room's diff");
        assert_eq!(start.elapsed(), Duration::from_millis(50));
        assert_eq!(pubsub.presence().count("room:big"), 0, "the large room still waits");
        // Changes in the large room's window join the same diff.
        owner.track(&topic("room:big"), "b".into(), json!({})).expect("tracked");
        let diff = big[0].recv().await.expect("the large room's diff");
        assert_eq!(start.elapsed(), Duration::from_millis(200));
        let payload = diff.payload.as_json().cloned().unwrap_or_default();
        assert_eq!(payload["joins"].as_object().map(|j| j.len()), Some(2), "{payload}");
        for sub in &mut big[1..] {
            assert!(sub.recv().await.is_some());
        }
        assert_eq!(pubsub.presence().count("room:big"), 2);
    }

    /// The other nodes hear of a change after the base window, whatever the room's size here:
    /// the delta goes out before the room publishes it, and a node that asks for the full state
    /// meanwhile gets it too.
    #[tokio::test(start_paused = true)]
    async fn the_other_nodes_hear_of_a_large_room_s_changes_after_the_base_window() {
        let (net, nodes) = cluster(2, Duration::from_secs(5));
        nodes[0].presence().set_options(PresenceOptions::default().window_per_subscriber(Duration::from_secs(60)));
        let _subs: Vec<_> = (0..10).map(|_| nodes[0].subscribe("room:big", 16)).collect();
        let owner = Owner::new(&nodes[0]);
        let t = topic("room:big");
        owner.track(&t, "a".into(), json!({})).expect("tracked");
        until("node 1 to list a", || keys(&nodes[1], "room:big") == ["a"]).await;
        // Node 1 misses the next delta and asks for node 0's state: it holds b, still waiting.
        net.set_up(1, false);
        owner.track(&t, "b".into(), json!({})).expect("tracked");
        tokio::time::sleep(Duration::from_millis(100)).await;
        net.set_up(1, true);
        until("node 1 to list a and b", || keys(&nodes[1], "room:big") == ["a", "b"]).await;
        assert_eq!(keys(&nodes[0], "room:big"), Vec::<String>::new(), "node 0's room waits its 10 minutes");
        nodes[0].presence().flush();
        assert_eq!(keys(&nodes[0], "room:big"), ["a", "b"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_large_diff_goes_in_parts_and_each_socket_gets_all_of_them_at_once() {
        let (pubsub, owners) = room_in_parts("room:diff-parts").await;
        let t = topic("room:diff-parts");
        // X has the list; J subscribes and gets its state only after the diff below went out.
        let (mut x, x_out, x_id) = Client::join(&pubsub, "room:diff-parts");
        push_state(&pubsub, "room:diff-parts", &x_out, Serializer::V2, Some(x_id));
        x.read();
        let state_frames = x.frames.len();
        let (mut j, j_out, j_id) = Client::join(&pubsub, "room:diff-parts");
        // Every user updates (a leave and a join of each key) and 100 more join, in one window.
        for (i, o) in owners.iter().enumerate() {
            o.update(&t, &format!("user{i:03}"), json!({"online_at": i, "v": 2})).expect("updated");
        }
        let more: Vec<Owner> = (0..100).map(|_| Owner::new(&pubsub)).collect();
        for (i, o) in more.iter().enumerate() {
            o.track(&t, format!("new{i:03}"), json!({})).expect("tracked");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        push_state(&pubsub, "room:diff-parts", &j_out, Serializer::V2, Some(j_id));
        x.read();
        j.read();
        let parts = &x.frames[state_frames..];
        assert!(parts.len() > 10, "{} parts", parts.len());
        for part in parts {
            assert!(part.len() <= 1000 + 300, "a part of {} bytes", part.len());
            let msg: Value = serde_json::from_slice(part.as_bytes()).expect("JSON");
            let (joins, leaves) = (&msg[4]["joins"], &msg[4]["leaves"]);
            for key in leaves.as_object().expect("leaves").keys() {
                assert!(joins.get(key).is_some(), "{key}'s leave and join are in one part");
            }
        }
        let listed: Vec<String> = pubsub
            .presence()
            .list("room:diff-parts")
            .as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default();
        assert_eq!(listed.len(), 300);
        for client in [&x, &j] {
            assert_eq!(client.keys(), listed);
            assert!(client.twice.is_empty(), "changes applied twice: {:?}", client.twice);
        }
        let metas = pubsub.presence().list("room:diff-parts");
        assert_eq!(metas["user007"]["metas"].as_array().map(Vec::len), Some(1), "{}", metas["user007"]);
        assert_eq!(metas["user007"]["metas"][0]["v"], 2);
    }

    /// A joiner that got diffs before its state, and whose state comes in parts: phoenix.js
    /// applies those diffs right after the `presence_state` (the first part), so every entry they
    /// touch must be in that part; later parts (`presence_diff` joins) hold only entries no earlier
    /// diff touched, or a leave applied before them would be undone by their join.
    #[tokio::test(start_paused = true)]
    async fn diffs_before_a_state_in_parts_touch_only_its_first_part() {
        let (pubsub, mut owners) = room_in_parts("room:seam-parts").await;
        let t = topic("room:seam-parts");
        let (mut j, j_out, j_id) = Client::join(&pubsub, "room:seam-parts");
        // Before J's state: users spread over every part leave, one joins.
        for i in (0..200).step_by(7).rev() {
            drop(owners.remove(i));
        }
        let late = Owner::new(&pubsub);
        late.track(&t, "late".into(), json!({})).expect("tracked");
        tokio::time::sleep(Duration::from_millis(20)).await;
        push_state(&pubsub, "room:seam-parts", &j_out, Serializer::V2, Some(j_id));
        j.read();
        assert!(j.frames.len() > 3, "a state in parts: {} frames", j.frames.len());
        let listed: Vec<String> = pubsub
            .presence()
            .list("room:seam-parts")
            .as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default();
        assert_eq!(listed.len(), 200 - 29 + 1);
        assert_eq!(j.keys(), listed);
        assert!(j.twice.is_empty(), "changes applied twice: {:?}", j.twice);
    }

    #[tokio::test(start_paused = true)]
    async fn a_joiner_gets_each_change_once_whether_in_its_state_or_a_diff() {
        let pubsub = PubSub::new();
        let window = Duration::from_millis(20);
        pubsub.presence().set_options(PresenceOptions::default().window(window));
        let t = topic("room:seam");
        let a = Owner::new(&pubsub);
        a.track(&t, "a".into(), json!({})).expect("tracked");
        tokio::time::sleep(window * 2).await;

        // J subscribes; before it asks for its state, b joins and a leaves, and that diff reaches
        // J first. Its state must be the list before that diff.
        let (mut j, j_out, j_id) = Client::join(&pubsub, "room:seam");
        let b = Owner::new(&pubsub);
        b.track(&t, "b".into(), json!({})).expect("tracked");
        drop(a);
        tokio::time::sleep(window * 2).await;
        push_state(&pubsub, "room:seam", &j_out, Serializer::V2, Some(j_id));
        // K and L subscribe now and get the same state, encoded once.
        let (mut k, k_out, k_id) = Client::join(&pubsub, "room:seam");
        let (mut l, l_out, l_id) = Client::join(&pubsub, "room:seam");
        push_state(&pubsub, "room:seam", &k_out, Serializer::V2, Some(k_id));
        push_state(&pubsub, "room:seam", &l_out, Serializer::V2, Some(l_id));
        let c = Owner::new(&pubsub);
        c.track(&t, "c".into(), json!({})).expect("tracked");
        tokio::time::sleep(window * 2).await;
        for client in [&mut j, &mut k, &mut l] {
            client.read();
            assert_eq!(client.keys(), ["b", "c"]);
            assert!(client.twice.is_empty(), "changes applied twice: {:?}", client.twice);
        }
        let state = |c: &Client| {
            c.frames
                .iter()
                .find(|f| f.as_bytes().windows(14).any(|w| w == b"presence_state"))
                .map(|f| f.as_bytes().as_ptr())
        };
        assert_eq!(state(&k), state(&l), "joiners of one window share the encoded state");
        assert_ne!(state(&j), state(&k));
        drop((b, c));
    }

    /// A node whose presence states go in parts of 1,000 bytes, with 200 users (`user000`…) on
    /// `name`, published.
    async fn room_in_parts(name: &str) -> (PubSub, Vec<Owner>) {
        let pubsub = PubSub::new();
        pubsub
            .presence()
            .set_options(PresenceOptions::default().window(Duration::from_millis(10)).state_part_bytes(1000));
        let t = topic(name);
        let owners: Vec<Owner> = (0..200).map(|_| Owner::new(&pubsub)).collect();
        for (i, o) in owners.iter().enumerate() {
            o.track(&t, format!("user{i:03}"), json!({"online_at": i})).expect("tracked");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        (pubsub, owners)
    }

    #[tokio::test(start_paused = true)]
    async fn a_state_larger_than_a_part_comes_as_a_state_and_diffs_joining_the_rest() {
        let (pubsub, _owners) = room_in_parts("room:parts").await;
        let (mut j, j_out, j_id) = Client::join(&pubsub, "room:parts");
        push_state(&pubsub, "room:parts", &j_out, Serializer::V2, Some(j_id));
        j.read();
        assert!(j.frames.len() > 10, "{} frames", j.frames.len());
        assert!(j.frames.iter().all(|f| f.as_bytes().len() <= 1000 + 100));
        assert_eq!(j.keys().len(), 200);
        assert!(j.twice.is_empty(), "{:?}", j.twice);
        let listed: Vec<String> =
            pubsub.presence().list("room:parts").as_object().map(|o| o.keys().cloned().collect()).unwrap_or_default();
        assert_eq!(j.keys(), listed);
    }

    /// A room whose state is larger than a socket's outbound limits can still be joined: the
    /// state is queued outside them (it is shared, and bounded by the topic's presence limits).
    #[tokio::test(start_paused = true)]
    async fn a_state_larger_than_the_outbound_limits_reaches_the_joiner() {
        let (pubsub, owners) = room_in_parts("room:big").await;
        let t = topic("room:big");
        // At most 4 frames and 4,000 bytes queued: the state is over 10 frames and 10 KB.
        let (mut j, j_out, j_id) = Client::join_within(&pubsub, "room:big", 4, 4000);
        push_state(&pubsub, "room:big", &j_out, Serializer::V2, Some(j_id));
        assert!(!j_out.is_closed(), "the joiner is not a slow consumer for its state");
        // Changes while the state is still queued are counted, and go out after it.
        let late = Owner::new(&pubsub);
        late.track(&t, "late".into(), json!({})).expect("tracked");
        owners[0].untrack(&t, "user000");
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!j_out.is_closed());
        j.read();
        assert!(j.frames.len() > 10, "{} frames", j.frames.len());
        assert!(j.twice.is_empty(), "{:?}", j.twice);
        let listed: Vec<String> =
            pubsub.presence().list("room:big").as_object().map(|o| o.keys().cloned().collect()).unwrap_or_default();
        assert_eq!(listed.len(), 200);
        assert_eq!(j.keys(), listed);
    }

    #[tokio::test(start_paused = true)]
    async fn oversized_entries_and_full_topics_are_refused() {
        let pubsub = PubSub::new();
        pubsub.presence().set_options(
            PresenceOptions::default().max_meta_bytes(200).max_entries_per_topic(3).max_bytes_per_topic(10_000),
        );
        let t = topic("room:limits");
        let big = "x".repeat(300);
        let o = Owner::new(&pubsub);
        assert!(matches!(o.track(&t, big.clone(), json!({})), Err(PresenceError::TooLarge { max: 200, .. })));
        assert!(matches!(o.track(&t, "k".into(), json!({"m": big})), Err(PresenceError::TooLarge { .. })));
        let owners: Vec<Owner> = (0..4).map(|_| Owner::new(&pubsub)).collect();
        for (i, o) in owners.iter().enumerate().take(3) {
            o.track(&t, format!("u{i}"), json!({})).expect("tracked");
        }
        assert!(matches!(
            owners[3].track(&t, "u3".into(), json!({})),
            Err(PresenceError::TopicFull { entries: 3, .. })
        ));
        // A leave makes room once it is published.
        owners[0].untrack(&t, "u0");
        tokio::time::sleep(Duration::from_millis(100)).await;
        owners[3].track(&t, "u3".into(), json!({})).expect("room after a leave");
        // The byte bound.
        pubsub.presence().set_options(PresenceOptions::default().max_bytes_per_topic(150));
        let e = Owner::new(&pubsub).track(&topic("room:bytes"), "a".repeat(100), json!({}));
        assert_eq!(e.map(|_| ()), Ok(()));
        let e = Owner::new(&pubsub).track(&topic("room:bytes"), "b".repeat(100), json!({}));
        assert!(matches!(e, Err(PresenceError::TopicFull { entries: 1, .. })), "{e:?}");
    }

    #[test]
    fn a_state_frame_is_the_serializer_s_own_encoding() {
        let payload = json!({"a\"b": {"metas": [{"phx_ref": "r1", "x": [1, 2]}]}});
        for serializer in Serializer::ALL {
            let b =
                Broadcast { topic: "room:é".into(), event: "presence_state".into(), payload: payload.clone().into() };
            let expected = serializer.encode_broadcast(&b).expect("encodes");
            let got =
                frame_with_payload(serializer, "room:é", "presence_state", &payload.to_string()).expect("encodes");
            assert_eq!(got, expected, "{serializer:?}");
        }
    }
}
