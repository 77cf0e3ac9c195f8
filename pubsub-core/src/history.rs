//! Topics' histories, the part a store needs: [`Position`], [`HistoryOptions`], [`Entry`],
//! [`ReadAfter`], [`HistoryError`] and the [`HistoryStore`] trait (with [`HistorySink`] for
//! stores shared by several nodes). The layer that uses them (`History`, the in-memory store)
//! lives in `fawkes-channel`, which re-exports these items.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use fawkes_serializer::Broadcast;
use futures_util::future::BoxFuture;

use crate::envelope::{self, Body, EnvelopeError};
use crate::node::NodeId;

/// Where a broadcast sits in its topic's history: an epoch (which changes whenever the history
/// was lost or reset, and differs between topics) and an offset that increases by one per
/// broadcast. Clients see it as an opaque string, `"<epoch in hex>:<offset>"`.
///
/// ```
/// use fawkes_pubsub_core::Position;
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
/// use fawkes_pubsub_core::HistoryOptions;
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
    /// `SocketRef::recover` (in `fawkes-channel`) was called after `join` returned.
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
/// store only has to order appends from several nodes. A store shared by several nodes (Redis
/// Streams) also delivers: see [`HistoryStore::deliver_to`].
///
/// ```
/// use std::sync::Arc;
/// use fawkes_pubsub_core::{Entry, HistoryError, HistoryOptions, HistoryStore, Position, ReadAfter};
/// use fawkes_serializer::Broadcast;
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
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let store = Forever::default();
/// let options = HistoryOptions::default();
/// let mut make = |pos: Position| Broadcast { topic: "feed:a".into(), event: "msg".into(), payload: serde_json::json!({"pos": pos.to_string()}).into() };
/// let first = store.append("feed:a", &options, &mut make).await.unwrap();
/// let read = store.read_after("feed:a", &options, Some(Position::new(1, 0))).await.unwrap();
/// assert!(read.recovered);
/// assert_eq!(read.entries[0].position, first.position);
/// // `fawkes_channel::EndpointBuilder::history_store(Forever::default())` puts it to work.
/// # });
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

    /// Asks the store to deliver the broadcasts of every topic itself, to `sink`; returns whether
    /// it does. The default, for a store that one node owns (in memory, a node's own database),
    /// is no: the caller delivers each broadcast `append` returns, under its per-topic lock.
    ///
    /// A store shared by several nodes cannot order their appends with a per-node lock, so it
    /// says yes and then keeps this contract:
    /// - every entry appended by any node (this one included) is handed to
    ///   [`HistorySink::deliver`], per topic in position order, the same order on every node;
    ///   the node that appended delivers nothing itself;
    /// - when the connection carrying the entries is (re)established, [`HistorySink::resync`] is
    ///   called, since entries may have been missed meanwhile (the sink reads them back);
    /// - `read_after` returns only once every entry up to the `current` it reports has been
    ///   handed to the sink (a barrier), so a recovering join can tell replayed entries from
    ///   live ones by position alone.
    fn deliver_to(&self, sink: Arc<dyn HistorySink>) -> bool {
        let _ = sink;
        false
    }

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

/// Where a store that delivers the broadcasts it keeps ([`HistoryStore::deliver_to`]) hands them.
///
/// ```
/// use std::sync::Arc;
/// use fawkes_pubsub_core::{Entry, HistorySink};
/// use parking_lot::Mutex;
///
/// /// Collects what a store delivers (a test double).
/// #[derive(Default)]
/// struct Collect(Mutex<Vec<Entry>>);
///
/// impl HistorySink for Collect {
///     fn deliver(&self, entry: Entry) {
///         self.0.lock().push(entry);
///     }
///     fn resync(&self) {}
///     fn is_closed(&self) -> bool {
///         false
///     }
/// }
/// let sink: Arc<dyn HistorySink> = Arc::new(Collect::default());
/// # let _ = sink;
/// ```
pub trait HistorySink: Send + Sync + 'static {
    /// An entry appended by some node: per topic in position order. After a lost connection an
    /// entry may be missing (the offsets show a gap) or, rarely, repeated; the sink deals with both.
    fn deliver(&self, entry: Entry);
    /// The connection carrying entries was (re)established: entries published meanwhile may
    /// have been missed.
    fn resync(&self);
    /// True once whoever reads the sink is gone: the store may stop delivering.
    fn is_closed(&self) -> bool;
}

impl Entry {
    /// The entry as bytes a shared store keeps and sends between nodes:
    /// `epoch (8) | offset (8) | broadcast` (the broadcast as an [envelope](crate::envelope)).
    pub fn encode(&self) -> Bytes {
        let body =
            envelope::encode(store_node(), None, self.position.offset, &Body::Broadcast((*self.broadcast).clone()));
        let mut out = BytesMut::with_capacity(16 + body.len());
        out.put_u64(self.position.epoch);
        out.put_u64(self.position.offset);
        out.put_slice(&body);
        out.freeze()
    }

    /// Reads what [`Entry::encode`] made; garbage is an error, never a panic.
    pub fn decode(mut bytes: Bytes) -> Result<Entry, EnvelopeError> {
        if bytes.len() < 16 {
            return Err(EnvelopeError::Truncated);
        }
        let position = Position::new(bytes.get_u64(), bytes.get_u64());
        match envelope::decode(bytes)?.body {
            Body::Broadcast(b) => Ok(Entry { position, broadcast: Arc::new(b) }),
            _ => Err(EnvelopeError::Body("a history entry that is not a broadcast".into())),
        }
    }
}

/// The origin written into an entry's envelope: entries belong to no node.
fn store_node() -> NodeId {
    NodeId::from_u64(u64::MAX).unwrap_or_else(NodeId::random)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_garbage_is_an_error() {
        let broadcast =
            Broadcast { topic: "feed:a".into(), event: "new_msg".into(), payload: serde_json::json!({"n": 1}).into() };
        let entry = Entry { position: Position::new(0xabc, 7), broadcast: Arc::new(broadcast) };
        let back = Entry::decode(entry.encode()).expect("decodes");
        assert_eq!(back.position, entry.position);
        assert_eq!(back.broadcast, entry.broadcast);
        assert!(Entry::decode(Bytes::from_static(b"short")).is_err());
        let bytes = entry.encode();
        for cut in 0..bytes.len() {
            let _ = Entry::decode(bytes.slice(..cut));
        }
    }
}
