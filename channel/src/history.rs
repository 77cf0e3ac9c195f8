//! History: topics that keep their recent broadcasts, so a client that rejoins with the last
//! position it saw gets everything it missed, in order, exactly once.
//!
//! Layered on [`PubSub`] (its state is a PubSub layer) and below the channel API. A broadcast on
//! a topic with history is appended to the [`HistoryStore`] first and delivered after, under a
//! per-topic lock, so positions increase in the order subscribers receive broadcasts and a client
//! can never have seen a broadcast that history lacks.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::hash::{BuildHasher, Hash, Hasher};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use fawkes_serializer::{Broadcast, Payload};
use futures_util::future::BoxFuture;
use parking_lot::{Mutex, RwLock};
use tokio::time::Instant;

use crate::pubsub::PubSub;

/// Where a broadcast sits in its topic's history: an epoch (which changes whenever the history
/// was lost or reset, and differs between topics) and an offset that increases by one per
/// broadcast. Clients see it as an opaque string, `"<epoch in hex>:<offset>"`.
///
/// ```
/// use fawkes_channel::Position;
///
/// let p: Position = "9f3a:42".parse().unwrap();
/// assert_eq!((p.epoch(), p.offset()), (0x9f3a, 42));
/// assert_eq!(p.to_string(), "9f3a:42");
/// assert!("42".parse::<Position>().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Position {
    epoch: u64,
    offset: u64,
}

impl Position {
    /// A position; `offset` 0 is "before the first broadcast".
    pub fn new(epoch: u64, offset: u64) -> Position {
        Position { epoch, offset }
    }
    /// The epoch of the history this position belongs to.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }
    /// The number of broadcasts in this epoch up to and including this one.
    pub fn offset(&self) -> u64 {
        self.offset
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:x}:{}", self.epoch, self.offset)
    }
}

/// A string that is not a [`Position`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed position")]
pub struct MalformedPosition;

impl FromStr for Position {
    type Err = MalformedPosition;
    fn from_str(s: &str) -> Result<Position, MalformedPosition> {
        let (epoch, offset) = s.split_once(':').ok_or(MalformedPosition)?;
        let digits = |s: &str, hex: bool| {
            !s.is_empty()
                && s.len() <= 20
                && s.bytes().all(|b| if hex { b.is_ascii_hexdigit() } else { b.is_ascii_digit() })
        };
        if !digits(epoch, true) || !digits(offset, false) {
            return Err(MalformedPosition);
        }
        let epoch = u64::from_str_radix(epoch, 16).map_err(|_| MalformedPosition)?;
        let offset = offset.parse().map_err(|_| MalformedPosition)?;
        Ok(Position { epoch, offset })
    }
}

/// How much history a topic keeps: at most `max_len` broadcasts, none older than `max_age`.
///
/// ```
/// use std::time::Duration;
/// use fawkes_channel::HistoryOptions;
///
/// let options = HistoryOptions::default().max_len(10_000).max_age(Duration::from_secs(3600));
/// assert_eq!(options.max_len, 10_000);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct HistoryOptions {
    /// Broadcasts kept per topic (default 1,000).
    pub max_len: usize,
    /// Age after which a broadcast is dropped from history (default 5 minutes).
    pub max_age: Duration,
}

impl Default for HistoryOptions {
    fn default() -> HistoryOptions {
        HistoryOptions { max_len: 1000, max_age: Duration::from_secs(300) }
    }
}

impl HistoryOptions {
    /// Sets [`HistoryOptions::max_len`] (at least 1).
    pub fn max_len(mut self, n: usize) -> Self {
        self.max_len = n.max(1);
        self
    }
    /// Sets [`HistoryOptions::max_age`].
    pub fn max_age(mut self, age: Duration) -> Self {
        self.max_age = age;
        self
    }
}

/// One broadcast kept in history, at its position.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Its position.
    pub position: Position,
    /// The broadcast, exactly as delivered.
    pub broadcast: Arc<Broadcast>,
}

/// What a store knows after a position (see [`HistoryStore::read_after`]).
#[derive(Debug, Clone)]
pub struct ReadAfter {
    /// The topic's latest position (offset 0 before any broadcast).
    pub current: Position,
    /// True when `entries` are every broadcast after the position asked for.
    pub recovered: bool,
    /// The broadcasts after the position, oldest first; empty unless `recovered`.
    pub entries: Vec<Entry>,
}

/// Why history could not be written or read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HistoryError {
    /// The topic matches no pattern given a history.
    #[error("topic {0:?} keeps no history")]
    NoHistory(String),
    /// [`SocketRef::recover`](crate::SocketRef::recover) was called after `join` returned.
    #[error("recovery is only possible in Channel::join")]
    AfterJoin,
    /// The store failed (unreachable, say).
    #[error("history store failed: {0}")]
    Store(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// Where topics' histories are kept. [`MemoryHistory`] is the default; a durable or shared store
/// (SQL, Redis Streams) implements the same three steps: append returning a position, read after a
/// position, and an epoch per topic that changes whenever the history was lost.
///
/// Appends to one topic are never concurrent on one node (the caller holds a per-topic lock), so a
/// store only has to order appends from several nodes.
///
/// ```
/// use std::sync::Arc;
/// use fawkes_channel::{Broadcast, Entry, HistoryError, HistoryOptions, HistoryStore, Position, ReadAfter};
/// use futures_util::future::BoxFuture;
/// use parking_lot::Mutex;
///
/// /// Keeps every broadcast of every topic forever, in one list per topic, epoch 1.
/// #[derive(Default)]
/// struct Forever(Mutex<std::collections::HashMap<String, Vec<Arc<Broadcast>>>>);
///
/// impl HistoryStore for Forever {
///     fn append<'a>(
///         &'a self,
///         topic: &'a str,
///         _: &'a HistoryOptions,
///         make: &'a mut (dyn FnMut(Position) -> Broadcast + Send),
///     ) -> BoxFuture<'a, Result<Entry, HistoryError>> {
///         let mut topics = self.0.lock();
///         let list = topics.entry(topic.to_owned()).or_default();
///         let position = Position::new(1, list.len() as u64 + 1);
///         let broadcast = Arc::new(make(position));
///         list.push(broadcast.clone());
///         Box::pin(std::future::ready(Ok(Entry { position, broadcast })))
///     }
///
///     fn read_after<'a>(
///         &'a self,
///         topic: &'a str,
///         _: &'a HistoryOptions,
///         since: Option<Position>,
///     ) -> BoxFuture<'a, Result<ReadAfter, HistoryError>> {
///         let topics = self.0.lock();
///         let list = topics.get(topic).map_or(&[][..], Vec::as_slice);
///         let current = Position::new(1, list.len() as u64);
///         let read = match since {
///             Some(p) if p.epoch() == 1 && p.offset() <= current.offset() => {
///                 let entries = (p.offset()..current.offset())
///                     .map(|i| Entry { position: Position::new(1, i + 1), broadcast: list[i as usize].clone() })
///                     .collect();
///                 ReadAfter { current, recovered: true, entries }
///             }
///             _ => ReadAfter { current, recovered: false, entries: Vec::new() },
///         };
///         Box::pin(std::future::ready(Ok(read)))
///     }
/// }
///
/// let endpoint = fawkes_channel::Endpoint::builder()
///     .history_store(Forever::default())
///     .history("feed:*", HistoryOptions::default())
///     .build();
/// # let _ = endpoint;
/// ```
pub trait HistoryStore: Send + Sync + 'static {
    /// Appends the broadcast `make` builds from its position, and returns it at that position.
    /// A store may call `make` more than once (retrying a conflicting append); only the
    /// broadcast it returns is delivered.
    fn append<'a>(
        &'a self,
        topic: &'a str,
        options: &'a HistoryOptions,
        make: &'a mut (dyn FnMut(Position) -> Broadcast + Send),
    ) -> BoxFuture<'a, Result<Entry, HistoryError>>;

    /// The broadcasts after `since`. `recovered` is false (and nothing is returned) when any of
    /// them may be missing: `since` is absent, from another epoch or topic, past the latest
    /// position, or older than what is kept.
    fn read_after<'a>(
        &'a self,
        topic: &'a str,
        options: &'a HistoryOptions,
        since: Option<Position>,
    ) -> BoxFuture<'a, Result<ReadAfter, HistoryError>>;

    /// How many topics and entries the store holds, for metrics; `None` (the default) when it
    /// cannot tell cheaply.
    fn size(&self) -> Option<HistorySize> {
        None
    }
}

/// What a [`HistoryStore`] holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct HistorySize {
    /// Topics with a history.
    pub topics: usize,
    /// Broadcasts kept, over every topic.
    pub entries: usize,
}

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
        let position = Position { epoch: self.epoch(topic), offset: stream.last };
        let entry = Entry { position, broadcast: Arc::new(make(position)) };
        stream.entries.push_back((now, entry.clone()));
        stream.trim(options, now);
        entry
    }

    fn read_now(&self, topic: &str, options: &HistoryOptions, since: Option<Position>) -> ReadAfter {
        let epoch = self.epoch(topic);
        let mut shard = self.shard(topic).lock();
        let Some(stream) = shard.get_mut(topic) else {
            let current = Position { epoch, offset: 0 };
            return ReadAfter { current, recovered: since == Some(current), entries: Vec::new() };
        };
        stream.trim(options, Instant::now());
        let current = Position { epoch, offset: stream.last };
        let first_kept = stream.entries.front().map_or(stream.last + 1, |(_, e)| e.position.offset);
        match since {
            Some(p) if p.epoch == epoch && p.offset <= stream.last && p.offset + 1 >= first_kept => {
                let skip = (p.offset + 1 - first_kept) as usize;
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
    patterns: RwLock<Vec<(Box<str>, HistoryOptions)>>,
    /// Held across append and delivery, so positions increase in delivery order, and across a
    /// recovering join's subscribe and read, so the seam has no gap and no duplicate.
    locks: Box<[tokio::sync::Mutex<()>]>,
}

impl Layer {
    fn new() -> Layer {
        Layer {
            store: RwLock::new(Arc::new(MemoryHistory::new())),
            patterns: RwLock::new(Vec::new()),
            locks: (0..64).map(|_| tokio::sync::Mutex::new(())).collect(),
        }
    }

    fn lock(&self, topic: &str) -> &tokio::sync::Mutex<()> {
        let mut h = std::hash::DefaultHasher::new();
        topic.hash(&mut h);
        &self.locks[h.finish() as usize % self.locks.len()]
    }

    fn options(&self, topic: &str) -> Option<HistoryOptions> {
        self.patterns.read().iter().find(|(p, _)| matches(p, topic)).map(|(_, o)| *o)
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
        History { pubsub: self.clone(), layer: self.layer(Layer::new) }
    }
}

impl History {
    /// Topics matching `pattern` (an exact topic or a prefix followed by `*`) keep a history.
    /// The first matching pattern wins.
    pub fn keep(&self, pattern: &str, options: HistoryOptions) {
        self.layer.patterns.write().push((pattern.into(), options));
    }

    /// Keeps histories in `store` from now on (the default is a [`MemoryHistory`]).
    pub fn set_store(&self, store: Arc<dyn HistoryStore>) {
        *self.layer.store.write() = store;
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
        let store = self.layer.store.read().clone();
        let _order = self.layer.lock(topic).lock().await;
        let mut build =
            |pos: Position| Broadcast { topic: topic.to_owned(), event: event.to_owned(), payload: make(&pos) };
        let entry = store.append(topic, &options, &mut build).await.inspect_err(|e| {
            tracing::error!(topic, error = %e, "history append failed: broadcast not sent");
        })?;
        self.pubsub.publish_shared(entry.broadcast, from);
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
        let store = self.layer.store.read().clone();
        let Some(options) = self.layer.options(topic) else {
            return Err((subscribe(), HistoryError::NoHistory(topic.to_owned())));
        };
        let _order = self.layer.lock(topic).lock().await;
        let subscribed = subscribe();
        match store.read_after(topic, &options, since).await {
            Ok(read) => Ok((subscribed, read)),
            Err(e) => Err((subscribed, e)),
        }
    }
}
