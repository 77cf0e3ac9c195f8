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

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use fawkes_pubsub_core::{Body, NodeId};
use fawkes_serializer::Broadcast;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::pubsub::{PubSub, WeakPubSub};

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
}

/// Presence on every topic of the cluster, as this node knows it. Channels track themselves
/// with [`SocketRef::track`](crate::SocketRef::track); a list is what `presence_state` carries.
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
///         socket.push("presence_state", socket.presence_list());
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
    /// Everyone on `topic`: `{key: {"metas": [{"phx_ref": ..., ...meta}, ...]}, ...}`, the payload
    /// of `presence_state`.
    pub fn list(&self, topic: &str) -> Value {
        let state = self.0.state.lock();
        let mut out = Map::new();
        if let Some(keys) = state.topics.get(topic) {
            for (key, metas) in keys {
                let metas: Vec<Value> = metas.iter().map(|m| m.meta.clone()).collect();
                out.insert(key.clone(), json!({ "metas": metas }));
            }
        }
        Value::Object(out)
    }

    /// How many keys are present on `topic`.
    pub fn count(&self, topic: &str) -> usize {
        self.0.state.lock().topics.get(topic).map_or(0, BTreeMap::len)
    }

    /// How many topics have anyone present, across every node (for metrics).
    pub fn topic_count(&self) -> usize {
        self.0.state.lock().topics.len()
    }

    /// How many entries (one per key per tracking socket, every node's included) this node
    /// holds, across every topic (for metrics).
    pub fn entry_count(&self) -> usize {
        self.0.state.lock().topics.values().flat_map(BTreeMap::values).map(Vec::len).sum()
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

struct Entry {
    node: NodeId,
    phx_ref: Arc<str>,
    meta: Value,
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

#[derive(Default)]
struct State {
    /// This node's clock: bumped by every local change.
    clock: u64,
    /// The clock of the last delta sent.
    flushed: u64,
    pending: Vec<Op>,
    topics: HashMap<Arc<str>, BTreeMap<String, Vec<Entry>>>,
    owners: HashMap<u64, Vec<Local>>,
    replicas: HashMap<NodeId, Replica>,
}

/// This node's presence replica, kept in the PubSub as one of its layers.
pub(crate) struct Tracker {
    node: NodeId,
    options: ClusterOptions,
    state: Mutex<State>,
    wake: Arc<Notify>,
    started: AtomicBool,
    next_owner: AtomicU64,
    next_ref: AtomicU64,
}

impl Tracker {
    fn new(node: NodeId, options: ClusterOptions) -> Tracker {
        Tracker {
            node,
            options,
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
    pubsub.layer(|| Tracker::new(pubsub.node(), ClusterOptions::default()))
}

/// Replicates presence through the PubSub's cluster, with `options`' timing. Call it before the
/// cluster starts, so no presence message arrives before it is listened for.
pub(crate) fn replicate(pubsub: &PubSub, options: ClusterOptions) {
    let _ = pubsub.layer(|| Tracker::new(pubsub.node(), options));
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

    pub(crate) fn track(&self, topic: &Arc<str>, key: String, meta: Value) -> Result<String, PresenceError> {
        let Value::Object(mut meta) = meta else { return Err(PresenceError::MetaNotObject) };
        let Some(pubsub) = self.pubsub.upgrade() else { return Err(PresenceError::NotTracked(key)) };
        let tracker = tracker(&pubsub);
        let phx_ref = tracker.new_ref();
        meta.insert("phx_ref".into(), Value::String(phx_ref.to_string()));
        {
            let mut state = tracker.state.lock();
            let locals = state.owners.entry(self.id).or_default();
            if locals.iter().any(|l| l.topic == *topic && l.key == key) {
                return Err(PresenceError::AlreadyTracked(key));
            }
            locals.push(Local { topic: topic.clone(), key: key.clone(), phx_ref: phx_ref.clone() });
            state.local_op(tracker.node, Op { join: true, topic: topic.clone(), key, meta: Value::Object(meta) });
        }
        start(&pubsub);
        tracker.wake.notify_one();
        Ok(phx_ref.to_string())
    }

    pub(crate) fn update(&self, topic: &Arc<str>, key: &str, meta: Value) -> Result<String, PresenceError> {
        let Value::Object(mut meta) = meta else { return Err(PresenceError::MetaNotObject) };
        let Some(pubsub) = self.pubsub.upgrade() else { return Err(PresenceError::NotTracked(key.into())) };
        let tracker = tracker(&pubsub);
        let phx_ref = tracker.new_ref();
        {
            let mut state = tracker.state.lock();
            let old = state
                .owners
                .get_mut(&self.id)
                .and_then(|locals| locals.iter_mut().find(|l| l.topic == *topic && l.key == key))
                .map(|l| std::mem::replace(&mut l.phx_ref, phx_ref.clone()))
                .ok_or_else(|| PresenceError::NotTracked(key.into()))?;
            meta.insert("phx_ref".into(), Value::String(phx_ref.to_string()));
            meta.insert("phx_ref_prev".into(), Value::String(old.to_string()));
            if let Some(old_meta) = state.remove_entry(topic, key, &old) {
                state.local_op(tracker.node, Op { join: false, topic: topic.clone(), key: key.into(), meta: old_meta });
            }
            state.local_op(
                tracker.node,
                Op { join: true, topic: topic.clone(), key: key.into(), meta: Value::Object(meta) },
            );
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
                if let Some(meta) = state.remove_entry(&l.topic, &l.key, &l.phx_ref) {
                    state.local_op(tracker.node, Op { join: false, topic: l.topic.clone(), key: l.key.clone(), meta });
                }
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
    /// Applies a change made on this node and queues it for the next delta.
    fn local_op(&mut self, node: NodeId, op: Op) {
        if op.join
            && let Some(phx_ref) = op.phx_ref()
        {
            self.insert_entry(node, &op.topic, &op.key, phx_ref, op.meta.clone());
        }
        self.clock += 1;
        self.pending.push(op);
    }

    fn insert_entry(&mut self, node: NodeId, topic: &Arc<str>, key: &str, phx_ref: Arc<str>, meta: Value) {
        let keys = self.topics.entry(topic.clone()).or_default();
        let metas = keys.entry(key.to_owned()).or_default();
        metas.retain(|e| e.phx_ref != phx_ref);
        metas.push(Entry { node, phx_ref, meta });
    }

    /// Removes one entry; its meta, if it was there.
    fn remove_entry(&mut self, topic: &str, key: &str, phx_ref: &str) -> Option<Value> {
        let keys = self.topics.get_mut(topic)?;
        let metas = keys.get_mut(key)?;
        let at = metas.iter().position(|e| &*e.phx_ref == phx_ref)?;
        let entry = metas.remove(at);
        if metas.is_empty() {
            keys.remove(key);
            if keys.is_empty() {
                self.topics.remove(topic);
            }
        }
        Some(entry.meta)
    }

    /// Applies another node's op; records it in `diffs`.
    fn apply_remote(&mut self, node: NodeId, op: Op, diffs: &mut Diffs) {
        let Some(phx_ref) = op.phx_ref() else { return };
        let Some(replica) = self.replicas.get_mut(&node) else { return };
        if op.join {
            replica.entries.insert(phx_ref.clone(), (op.topic.clone(), op.key.clone()));
            self.insert_entry(node, &op.topic, &op.key, phx_ref, op.meta.clone());
            diffs.add(op);
        } else {
            replica.entries.remove(&phx_ref);
            if let Some(meta) = self.remove_entry(&op.topic, &op.key, &phx_ref) {
                diffs.add(Op { meta, ..op });
            }
        }
    }

    /// Removes every entry of `node`; records the leaves in `diffs`.
    fn drop_replica(&mut self, node: NodeId, diffs: &mut Diffs) -> usize {
        let Some(replica) = self.replicas.remove(&node) else { return 0 };
        let n = replica.entries.len();
        for (phx_ref, (topic, key)) in replica.entries {
            if let Some(meta) = self.remove_entry(&topic, &key, &phx_ref) {
                diffs.add(Op { join: false, topic, key, meta });
            }
        }
        n
    }

    /// Every entry this node owns, as joins.
    fn local_entries(&self, node: NodeId) -> Vec<Op> {
        let mut out = Vec::new();
        for (topic, keys) in &self.topics {
            for (key, metas) in keys {
                for e in metas.iter().filter(|e| e.node == node) {
                    out.push(Op { join: true, topic: topic.clone(), key: key.clone(), meta: e.meta.clone() });
                }
            }
        }
        out
    }
}

/// `presence_diff` payloads by topic, in the order the changes happened.
#[derive(Default)]
struct Diffs(HashMap<Arc<str>, (Joins, Leaves)>);

type Joins = Map<String, Value>;
type Leaves = Map<String, Value>;

impl Diffs {
    fn add(&mut self, op: Op) {
        let (joins, leaves) = self.0.entry(op.topic).or_default();
        let side = if op.join { joins } else { leaves };
        let slot = side.entry(op.key).or_insert_with(|| json!({ "metas": [] }));
        if let Some(Value::Array(metas)) = slot.get_mut("metas") {
            metas.push(op.meta);
        }
    }

    /// Sends each topic's diff to this node's subscribers (every node works out its own).
    fn publish(self, pubsub: &PubSub) {
        for (topic, (joins, leaves)) in self.0 {
            let payload = json!({ "joins": joins, "leaves": leaves });
            pubsub.local_broadcast(Broadcast {
                topic: topic.to_string(),
                event: "presence_diff".into(),
                payload: payload.into(),
            });
        }
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

/// Sends local changes: `presence_diff` to this node's subscribers and a delta to the others.
/// Changes made while a round is under way go out together in the next one.
async fn flusher(pubsub: WeakPubSub) {
    let Some(wake) = pubsub.upgrade().map(|p| tracker(&p).wake.clone()) else { return };
    loop {
        // `notify_one` leaves a permit when nobody waits, so no change is missed between a round
        // and the wait below.
        let Some(strong) = pubsub.upgrade() else { return };
        let tracker = tracker(&strong);
        let (from, to, ops) = {
            let mut state = tracker.state.lock();
            let from = state.flushed;
            state.flushed = state.clock;
            (from, state.clock, std::mem::take(&mut state.pending))
        };
        if !ops.is_empty() {
            let mut diffs = Diffs::default();
            for op in &ops {
                diffs.add(op.clone());
            }
            diffs.publish(&strong);
            if strong.is_clustered() {
                send(&strong, None, &Msg::Delta { from, to, ops });
            }
        }
        drop(strong);
        wake.notified().await;
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
        let mut diffs = Diffs::default();
        let tracker = tracker(&inner);
        let clock = {
            let mut state = tracker.state.lock();
            let dead: Vec<NodeId> =
                state.replicas.iter().filter(|(_, r)| r.last_seen.elapsed() > timeout).map(|(n, _)| *n).collect();
            for node in dead {
                let n = state.drop_replica(node, &mut diffs);
                tracing::warn!(node = %inner.node(), peer = %node, presences = n, ?timeout, "node silent; its presences removed");
            }
            state.flushed
        };
        diffs.publish(&inner);
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
    let tracker = tracker(pubsub);
    // Wait for the flusher to take the last local changes (the ends of the channels that just
    // closed), so they go out before the goodbye.
    for _ in 0..100 {
        if tracker.state.lock().pending.is_empty() {
            break;
        }
        tracker.wake.notify_one();
        tokio::task::yield_now().await;
    }
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
    let mut diffs = Diffs::default();
    let mut reply = None;
    if let Msg::Goodbye = msg {
        let n = tracker.state.lock().drop_replica(origin, &mut diffs);
        tracing::info!(node = %inner.node(), peer = %origin, presences = n, "node left");
        diffs.publish(inner);
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
                        state.apply_remote(origin, op, &mut diffs);
                    }
                } else if replica.clock < to {
                    behind = true;
                }
            }
            Msg::Goodbye => {}
            Msg::StateRequest => {
                reply = Some(Msg::State { clock: state.clock, entries: state.local_entries(tracker.node) });
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
                            state.apply_remote(origin, Op { join: false, topic, key, meta }, &mut diffs);
                        }
                    }
                    for (_, op) in keep {
                        state.apply_remote(origin, op, &mut diffs);
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
    diffs.publish(inner);
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

    #[tokio::test(start_paused = true)]
    async fn nodes_converge_after_a_partition_and_drop_a_silent_node() {
        let net = Net::default();
        let opts = ClusterOptions::default()
            .heartbeat_interval(Duration::from_millis(100))
            .node_timeout(Duration::from_secs(1));
        let nodes: Vec<PubSub> = (0..3).map(|_| net.node(opts.clone())).collect();
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
            until("convergence after healing", || keys(node, "room:1") == ["user1", "user2"]).await;
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

    #[tokio::test]
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
}
