//! History: topics that keep their recent broadcasts, so a client that rejoins with the last
//! position it saw gets everything it missed, in order, exactly once.
//!
//! Layered on [`PubSub`] (its state is a PubSub layer) and below the channel API. A broadcast on
//! a topic with history is appended to the [`HistoryStore`] first and delivered after, under a
//! per-topic lock, so positions increase in the order subscribers receive broadcasts and a client
//! can never have seen a broadcast that history lacks.
//!
//! A store shared by several nodes (Redis Streams) cannot be ordered by a node's locks: it
//! delivers instead ([`HistoryStore::deliver_to`]). Every node then delivers entries as the store
//! hands them over, per topic in position order, dropping repeats and reading gaps back from the
//! store; a recovering join drops live broadcasts its replay already holds, by position.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::Arc;

pub use fawkes_pubsub_core::{
    Entry, HistoryError, HistoryOptions, HistorySink, HistorySize, HistoryStore, MalformedPosition, Position, ReadAfter,
};
use fawkes_serializer::{Broadcast, Payload};
use futures_util::future::BoxFuture;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use tokio::time::Instant;

use crate::pubsub::PubSub;

/// The in-memory [`HistoryStore`]: per topic, the last broadcasts within the topic's
/// [`HistoryOptions`]. Its epochs are random per store and per topic, so a restart (a new store)
/// makes every earlier position "not recovered".
pub struct MemoryHistory {
    seed: u64,
    shards: Box<[Mutex<Streams>]>,
    hasher: std::collections::hash_map::RandomState,
}

impl fmt::Debug for MemoryHistory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryHistory").finish_non_exhaustive()
    }
}

type Streams = HashMap<Box<str>, Stream>;

struct Stream {
    last: u64,
    entries: VecDeque<(Instant, Entry)>,
}

impl Stream {
    fn trim(&mut self, options: &HistoryOptions, now: Instant) {
        while self.entries.len() > options.max_len {
            self.entries.pop_front();
        }
        while self.entries.front().is_some_and(|(at, _)| now.saturating_duration_since(*at) >= options.max_age) {
            self.entries.pop_front();
        }
    }
}

impl Default for MemoryHistory {
    fn default() -> MemoryHistory {
        MemoryHistory::new()
    }
}

impl MemoryHistory {
    /// An empty store with a fresh random epoch.
    pub fn new() -> MemoryHistory {
        let seed = getrandom::u64().unwrap_or_else(|_| {
            // No OS randomness: the time still makes a restart's epochs differ.
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            now.as_nanos() as u64 ^ u64::from(std::process::id())
        });
        MemoryHistory {
            seed,
            shards: (0..32).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: Default::default(),
        }
    }

    /// The epoch of `topic` in this store: random per store, different per topic, so a position
    /// from another topic or an earlier store is never taken for one of this topic's.
    fn epoch(&self, topic: &str) -> u64 {
        let mut h = std::hash::DefaultHasher::new();
        self.seed.hash(&mut h);
        topic.hash(&mut h);
        // Never 0, so "0:0" is never valid.
        h.finish().max(1)
    }

    fn shard(&self, topic: &str) -> &Mutex<Streams> {
        &self.shards[self.hasher.hash_one(topic) as usize % self.shards.len()]
    }

    fn append_now(
        &self,
        topic: &str,
        options: &HistoryOptions,
        make: &mut (dyn FnMut(Position) -> Broadcast + Send),
    ) -> Entry {
        let now = Instant::now();
        let mut shard = self.shard(topic).lock();
        let stream = shard.entry(topic.into()).or_insert_with(|| Stream { last: 0, entries: VecDeque::new() });
        stream.last += 1;
        let position = Position::new(self.epoch(topic), stream.last);
        let entry = Entry { position, broadcast: Arc::new(make(position)) };
        stream.entries.push_back((now, entry.clone()));
        stream.trim(options, now);
        entry
    }

    fn read_now(&self, topic: &str, options: &HistoryOptions, since: Option<Position>) -> ReadAfter {
        let epoch = self.epoch(topic);
        let mut shard = self.shard(topic).lock();
        let Some(stream) = shard.get_mut(topic) else {
            let current = Position::new(epoch, 0);
            return ReadAfter { current, recovered: since == Some(current), entries: Vec::new() };
        };
        stream.trim(options, Instant::now());
        let current = Position::new(epoch, stream.last);
        let first_kept = stream.entries.front().map_or(stream.last + 1, |(_, e)| e.position.offset());
        match since {
            Some(p) if p.epoch() == epoch && p.offset() <= stream.last && p.offset() + 1 >= first_kept => {
                let skip = (p.offset() + 1 - first_kept) as usize;
                let entries = stream.entries.iter().skip(skip).map(|(_, e)| e.clone()).collect();
                ReadAfter { current, recovered: true, entries }
            }
            _ => ReadAfter { current, recovered: false, entries: Vec::new() },
        }
    }
}

impl HistoryStore for MemoryHistory {
    fn append<'a>(
        &'a self,
        topic: &'a str,
        options: &'a HistoryOptions,
        make: &'a mut (dyn FnMut(Position) -> Broadcast + Send),
    ) -> BoxFuture<'a, Result<Entry, HistoryError>> {
        Box::pin(std::future::ready(Ok(self.append_now(topic, options, make))))
    }

    fn read_after<'a>(
        &'a self,
        topic: &'a str,
        options: &'a HistoryOptions,
        since: Option<Position>,
    ) -> BoxFuture<'a, Result<ReadAfter, HistoryError>> {
        Box::pin(std::future::ready(Ok(self.read_now(topic, options, since))))
    }

    /// Entries past their age stay counted until the topic's next append or read trims them.
    fn size(&self) -> Option<HistorySize> {
        let mut size = HistorySize::default();
        for shard in self.shards.iter() {
            let shard = shard.lock();
            size.topics += shard.len();
            size.entries += shard.values().map(|s| s.entries.len()).sum::<usize>();
        }
        Some(size)
    }
}

/// The history layer's state on a [`PubSub`].
pub(crate) struct Layer {
    store: RwLock<Arc<dyn HistoryStore>>,
    patterns: RwLock<Vec<(Box<str>, HistoryOptions, PatternStore)>>,
    /// Held across append and delivery, so positions increase in delivery order, and across a
    /// recovering join's subscribe and read, so the seam has no gap and no duplicate.
    locks: Box<[tokio::sync::Mutex<()>]>,
    /// True when the store delivers broadcasts itself ([`HistoryStore::deliver_to`]).
    delivers: AtomicBool,
    /// With a delivering store: per topic with local subscribers, the last position delivered.
    delivered: Mutex<HashMap<Box<str>, Delivered>>,
    append_errors: AtomicU64,
    read_errors: AtomicU64,
}

/// What a delivering store last delivered on one topic, here.
struct Delivered {
    last: Position,
    /// While a gap is read back from the store: what arrived meanwhile, in order.
    filling: Option<Vec<Entry>>,
    /// Recovering joins waiting for the gap to be filled.
    waiters: Vec<tokio::sync::oneshot::Sender<()>>,
}

/// Most entries kept while a gap is read back. What does not fit is dropped here, which shows as
/// the next gap when the following entry arrives, and is read back then.
const FILL_BUFFER: usize = 100_000;
/// How long a recovering join waits for a gap being filled before it goes ahead.
const FILL_WAIT: Duration = Duration::from_secs(5);

impl Layer {
    fn new() -> Layer {
        Layer {
            store: RwLock::new(Arc::new(MemoryHistory::new())),
            patterns: RwLock::new(Vec::new()),
            locks: (0..64).map(|_| tokio::sync::Mutex::new(())).collect(),
            delivers: AtomicBool::new(false),
            delivered: Mutex::new(HashMap::new()),
            append_errors: AtomicU64::new(0),
            read_errors: AtomicU64::new(0),
        }
    }

    /// Whether `topic` keeps a history that broadcasts are written to (not one a source such as
    /// a table stream writes itself: see [`History::keep_source`]).
    pub(crate) fn keeps(&self, topic: &str) -> bool {
        let patterns = self.patterns.read();
        !patterns.is_empty() && patterns.iter().find(|(p, ..)| matches(p, topic)).is_some_and(|(.., s)| !s.source)
    }

    /// An entry the store delivered: to this node's subscribers, once, in position order.
    fn on_delivered(self: &Arc<Layer>, pubsub: &PubSub, entry: Entry) {
        let broadcast = entry.broadcast.clone();
        let topic = broadcast.topic.as_str();
        let mut delivered = self.delivered.lock();
        if pubsub.subscriber_count(topic) == 0 {
            // Nobody here to keep in order; a later subscriber starts from its own read.
            delivered.remove(topic);
            return;
        }
        let Some(state) = delivered.get_mut(topic) else {
            pubsub.0.dispatch_at(&entry.broadcast, None, Some(entry.position));
            delivered.insert(topic.into(), Delivered { last: entry.position, filling: None, waiters: Vec::new() });
            return;
        };
        if let Some(buffer) = &mut state.filling {
            if buffer.len() < FILL_BUFFER {
                buffer.push(entry);
            }
            return;
        }
        let (last, at) = (state.last, entry.position);
        if at.epoch() != last.epoch() {
            tracing::warn!(topic, from = %last, to = %at, "history reset (new epoch): delivering from its start");
        } else if at.offset() <= last.offset() {
            return;
        } else if at.offset() > last.offset() + 1 {
            tracing::warn!(topic, after = %last, next = %at, "broadcasts missed here; reading them back from history");
            state.filling = Some(vec![entry]);
            drop(delivered);
            self.fill(pubsub, topic.to_owned(), last);
            return;
        }
        pubsub.0.dispatch_at(&entry.broadcast, None, Some(at));
        state.last = at;
    }

    /// Reads back what `topic`'s subscribers missed after `last`, then delivers it and what
    /// arrived meanwhile.
    fn fill(self: &Arc<Layer>, pubsub: &PubSub, topic: String, last: Position) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            tracing::error!(topic, "no tokio runtime: missed broadcasts not read back");
            return;
        };
        let (layer, pubsub) = (self.clone(), pubsub.downgrade());
        rt.spawn(async move {
            let store = layer.store.read().clone();
            let read = match layer.options(&topic) {
                Some(options) => store.read_after(&topic, &options, Some(last)).await,
                None => Err(HistoryError::NoHistory(topic.clone())),
            };
            let Some(pubsub) = pubsub.upgrade() else { return };
            let mut delivered = layer.delivered.lock();
            let Some(state) = delivered.get_mut(topic.as_str()) else { return };
            let missed = match read {
                Ok(read) if read.recovered => read.entries,
                Ok(_) => {
                    layer.read_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(topic, after = %last, "missed broadcasts are no longer in history: subscribers here lost them");
                    Vec::new()
                }
                Err(e) => {
                    layer.read_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(topic, after = %last, error = %e, "missed broadcasts could not be read back: subscribers here lost them");
                    Vec::new()
                }
            };
            let buffered = state.filling.take().unwrap_or_default();
            for entry in missed.into_iter().chain(buffered) {
                let at = entry.position;
                if at.epoch() == state.last.epoch() && at.offset() <= state.last.offset() {
                    continue;
                }
                pubsub.0.dispatch_at(&entry.broadcast, None, Some(at));
                state.last = at;
            }
            for waiter in state.waiters.drain(..) {
                let _ = waiter.send(());
            }
        });
    }

    /// The store's delivery connection is back: read back what every topic here may have missed.
    fn resync(self: &Arc<Layer>, pubsub: &PubSub) {
        let mut delivered = self.delivered.lock();
        let mut fills = Vec::new();
        for (topic, state) in delivered.iter_mut() {
            if state.filling.is_none() {
                state.filling = Some(Vec::new());
                fills.push((topic.to_string(), state.last));
            }
        }
        drop(delivered);
        for (topic, last) in fills {
            self.fill(pubsub, topic, last);
        }
    }

    /// Waits (a while at most) until no gap of `topic` is being read back.
    async fn filled(&self, topic: &str) {
        let wait = {
            let mut delivered = self.delivered.lock();
            delivered.get_mut(topic).filter(|s| s.filling.is_some()).map(|state| {
                let (tx, rx) = tokio::sync::oneshot::channel();
                state.waiters.push(tx);
                rx
            })
        };
        if let Some(rx) = wait
            && tokio::time::timeout(FILL_WAIT, rx).await.is_err()
        {
            tracing::warn!(topic, "missed broadcasts still being read back; recovering join goes ahead");
        }
    }

    fn lock(&self, topic: &str) -> &tokio::sync::Mutex<()> {
        let mut h = std::hash::DefaultHasher::new();
        topic.hash(&mut h);
        &self.locks[h.finish() as usize % self.locks.len()]
    }

    fn options(&self, topic: &str) -> Option<HistoryOptions> {
        self.patterns.read().iter().find(|(p, ..)| matches(p, topic)).map(|(_, o, _)| *o)
    }

    /// The store of `topic`'s history (its pattern's own, or the default) and whether it
    /// delivers (only the default store can: [`History::set_store`]).
    fn store_for(&self, topic: &str) -> (Arc<dyn HistoryStore>, bool) {
        let own = self.patterns.read().iter().find(|(p, ..)| matches(p, topic)).and_then(|(.., s)| s.store.clone());
        match own {
            Some(store) => (store, false),
            None => (self.store.read().clone(), self.delivers.load(Ordering::Acquire)),
        }
    }
}

fn matches(pattern: &str, topic: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => topic.starts_with(prefix),
        None => pattern == topic,
    }
}

/// The outcome of a recovering join (see [`SocketRef::recover`](crate::SocketRef::recover)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recovery {
    /// True when every broadcast after the client's position is going to be delivered.
    pub recovered: bool,
    /// The topic's latest position when the client subscribed (`None` if the store failed).
    pub position: Option<Position>,
}

/// Topics' histories on a [`PubSub`]: which topic patterns keep one, the store, and broadcasting
/// with a position. Get it with [`PubSub::history`] or [`Endpoint::history`](crate::Endpoint::history).
///
/// ```
/// use fawkes_channel::{HistoryOptions, PubSub};
/// use serde_json::json;
///
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let pubsub = PubSub::new();
/// let history = pubsub.history();
/// history.keep("feed:*", HistoryOptions::default());
/// let pos = history.broadcast("feed:news", "new_msg", |pos| json!({"pos": pos.to_string()}).into()).await.unwrap();
/// assert_eq!(pos.offset(), 1);
/// # });
/// ```
#[derive(Clone)]
pub struct History {
    pubsub: PubSub,
    layer: Arc<Layer>,
}

impl fmt::Debug for History {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("History").field("patterns", &*self.layer.patterns.read()).finish_non_exhaustive()
    }
}

impl PubSub {
    /// Topics' histories on this PubSub.
    pub fn history(&self) -> History {
        let layer: Arc<dyn std::any::Any + Send + Sync> = self.0.history.get_or_init(|| Arc::new(Layer::new())).clone();
        let layer =
            layer.downcast::<Layer>().unwrap_or_else(|_| unreachable!("the history slot holds the history layer"));
        History { pubsub: self.clone(), layer }
    }
}

/// What a [`History`] counts (see [`History::stats`]): store failures, each also logged.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct HistoryStats {
    /// Broadcasts not sent because the store could not write them.
    pub append_errors: u64,
    /// Reads that failed: joins answered `recovered: false`, and broadcasts this node missed
    /// that could not be read back.
    pub read_errors: u64,
}

impl crate::pubsub::KeepsHistory for Layer {
    fn keeps(&self, topic: &str) -> bool {
        Layer::keeps(self, topic)
    }
}

/// Hands what a delivering store delivers to a PubSub's history layer.
struct Sink {
    pubsub: crate::pubsub::WeakPubSub,
    layer: std::sync::Weak<Layer>,
}

impl HistorySink for Sink {
    fn deliver(&self, entry: Entry) {
        if let (Some(pubsub), Some(layer)) = (self.pubsub.upgrade(), self.layer.upgrade()) {
            layer.on_delivered(&pubsub, entry);
        }
    }
    fn resync(&self) {
        if let (Some(pubsub), Some(layer)) = (self.pubsub.upgrade(), self.layer.upgrade()) {
            layer.resync(&pubsub);
        }
    }
    fn is_closed(&self) -> bool {
        self.pubsub.upgrade().is_none() || self.layer.strong_count() == 0
    }
}

impl History {
    /// Topics matching `pattern` (an exact topic or a prefix followed by `*`) keep a history.
    /// The first matching pattern wins.
    pub fn keep(&self, pattern: &str, options: HistoryOptions) {
        self.layer.patterns.write().push((pattern.into(), options, PatternStore { store: None, source: false }));
    }

    /// Keeps histories in `store` from now on (the default is a [`MemoryHistory`]). A store
    /// shared by several nodes (Redis Streams) delivers the broadcasts itself, to every node in
    /// one order (see [`HistoryStore::deliver_to`]).
    pub fn set_store(&self, store: Arc<dyn HistoryStore>) {
        let sink = Arc::new(Sink { pubsub: self.pubsub.downgrade(), layer: Arc::downgrade(&self.layer) });
        let delivers = store.deliver_to(sink);
        *self.layer.store.write() = store;
        self.layer.delivers.store(delivers, Ordering::Release);
    }

    /// Store failures so far (also logged).
    pub fn stats(&self) -> HistoryStats {
        HistoryStats {
            append_errors: self.layer.append_errors.load(Ordering::Relaxed),
            read_errors: self.layer.read_errors.load(Ordering::Relaxed),
        }
    }

    /// What the store holds, when it can tell ([`HistoryStore::size`]).
    pub fn size(&self) -> Option<HistorySize> {
        self.layer.store.read().size()
    }

    /// The options of `topic`'s history, if it keeps one.
    pub fn options(&self, topic: &str) -> Option<HistoryOptions> {
        self.layer.options(topic)
    }

    /// Broadcasts `event` to every subscriber of `topic` with the payload `make` builds from the
    /// broadcast's position, after writing it to history. Returns the position.
    pub async fn broadcast(
        &self,
        topic: &str,
        event: &str,
        make: impl FnMut(&Position) -> Payload + Send,
    ) -> Result<Position, HistoryError> {
        self.broadcast_from(topic, event, None, make).await
    }

    pub(crate) async fn broadcast_from(
        &self,
        topic: &str,
        event: &str,
        from: Option<crate::pubsub::SubscriberId>,
        mut make: impl FnMut(&Position) -> Payload + Send,
    ) -> Result<Position, HistoryError> {
        let options = self.layer.options(topic).ok_or_else(|| HistoryError::NoHistory(topic.to_owned()))?;
        let (store, delivers) = self.layer.store_for(topic);
        let _order = self.layer.lock(topic).lock().await;
        let mut build =
            |pos: Position| Broadcast { topic: topic.to_owned(), event: event.to_owned(), payload: make(&pos) };
        let entry = store.append(topic, &options, &mut build).await.inspect_err(|e| {
            self.layer.append_errors.fetch_add(1, Ordering::Relaxed);
            tracing::error!(topic, error = %e, "history append failed: broadcast not sent");
        })?;
        if !delivers {
            self.pubsub.publish_shared(entry.broadcast, from);
        }
        Ok(entry.position)
    }

    /// Subscribes with `subscribe` and reads history after `since` as one step with respect to
    /// broadcasts on `topic`: every broadcast is either in the returned entries or reaches the new
    /// subscriber, never both, never neither.
    pub(crate) async fn subscribe_and_read<T>(
        &self,
        topic: &str,
        since: Option<Position>,
        subscribe: impl FnOnce() -> T,
    ) -> Result<(T, ReadAfter), (T, HistoryError)> {
        let (store, delivers) = self.layer.store_for(topic);
        let Some(options) = self.layer.options(topic) else {
            return Err((subscribe(), HistoryError::NoHistory(topic.to_owned())));
        };
        let _order = self.layer.lock(topic).lock().await;
        let subscribed = subscribe();
        // A delivering store's read returns once everything up to `current` reached this node
        // (and a gap being read back is waited for): later arrivals are after `current`, and
        // those up to it that wait in the new subscription are dropped as replayed.
        let read = store.read_after(topic, &options, since).await;
        if read.is_ok() && delivers {
            self.layer.filled(topic).await;
        }
        match read {
            Ok(read) => Ok((subscribed, read)),
            Err(e) => {
                self.layer.read_errors.fetch_add(1, Ordering::Relaxed);
                Err((subscribed, e))
            }
        }
    }

    /// Topics matching `pattern` keep a history in `store` rather than the default store (a
    /// durable store for some topics, say, or a table stream's table for its topics). The first
    /// matching pattern wins, whichever method added it.
    pub fn keep_in(&self, pattern: &str, options: HistoryOptions, store: Arc<dyn HistoryStore>) {
        self.layer.patterns.write().push((pattern.into(), options, PatternStore { store: Some(store), source: false }));
    }

    /// Topics matching `pattern` take their history from a source that writes `store` itself (a
    /// table stream's table): recovering joins read it, and plain broadcasts on these topics
    /// (chat beside a table's rows, say) are delivered as usual, outside the history, so a rejoin
    /// recovers the source's broadcasts only. The source publishes with
    /// [`History::deliver_stored`].
    pub fn keep_source(&self, pattern: &str, options: HistoryOptions, store: Arc<dyn HistoryStore>) {
        self.layer.patterns.write().push((pattern.into(), options, PatternStore { store: Some(store), source: true }));
    }

    /// Delivers `broadcast` to this node's subscribers, in order with its topic's recovering
    /// joins (under the lock [`History::broadcast`] takes), without appending it anywhere: for a
    /// source whose store holds the broadcast already (a table stream's row is in its table),
    /// and that runs on every node. `before_release` runs once it is delivered, still under the
    /// lock (to move the source's published position, say).
    pub async fn deliver_stored(&self, broadcast: Broadcast, before_release: impl FnOnce()) -> usize {
        let _order = self.layer.lock(&broadcast.topic).lock().await;
        let n = self.pubsub.local_broadcast(broadcast);
        before_release();
        n
    }
}

/// A pattern's own store, if it has one ([`History::keep_in`]).
#[derive(Clone)]
struct PatternStore {
    store: Option<Arc<dyn HistoryStore>>,
    /// Written by a source, not by broadcasts ([`History::keep_source`]).
    source: bool,
}

impl fmt::Debug for PatternStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match (&self.store, self.source) {
            (_, true) => "source",
            (Some(_), false) => "own store",
            (None, false) => "default store",
        })
    }
}
