//! [`RedisHistory`]: topics' histories in Redis Streams, one position space for a whole cluster.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use fawkes_pubsub_core::{
    Backoff, Entry, HistoryError, HistoryOptions, HistorySink, HistoryStore, Position, ReadAfter,
};
use fawkes_serializer::Broadcast;
use futures_util::StreamExt as _;
use futures_util::future::BoxFuture;
use parking_lot::Mutex;
use tokio::sync::{oneshot, watch};

use crate::{RedisAdapterError, RedisOptions};

/// How long a Redis call (connecting included) may take before the store counts as unreachable.
const TIMEOUT: Duration = Duration::from_secs(2);
/// Appends that find another node's append in the way retry this often at most.
const ATTEMPTS: usize = 32;
/// Topics whose latest position is remembered (a guess that saves a round trip per append).
const KNOWN: usize = 10_000;

/// What the scripts publish on `{cluster}:history`: an entry, or a read's barrier.
const KIND_ENTRY: u8 = 1;
const KIND_MARKER: u8 = 2;

/// The start of both scripts: `epoch` and `last` of the topic (`KEYS[1]` its stream, `KEYS[2]`
/// its head); a topic whose head or stream is gone starts again at the new epoch `ARGV[3]`, its
/// head expiring after `ARGV[8]` ms.
macro_rules! topic_head {
    () => {
        r#"
local epoch = redis.call('HGET', KEYS[2], 'e')
local last = tonumber(redis.call('HGET', KEYS[2], 'l') or '0')
if (not epoch) or (last > 0 and redis.call('EXISTS', KEYS[1]) == 0) then
  redis.call('DEL', KEYS[1])
  epoch = ARGV[3]
  last = 0
  redis.call('HSET', KEYS[2], 'e', epoch, 'l', 0)
  redis.call('PEXPIRE', KEYS[2], ARGV[8])
end
"#
    };
}

/// Appends the entry `ARGV[7]` at `ARGV[1]:ARGV[2]` (epoch in hex, offset) if that is the
/// topic's next position, trims by length and age, publishes it; otherwise answers the topic's
/// latest position. A topic whose stream or epoch is gone gets the new epoch `ARGV[3]`.
const APPEND: &str = concat!(
    topic_head!(),
    r#"
local offset = tonumber(ARGV[2])
-- A store that lost several times in a row holds the turn until its append lands (or the turn
-- expires): the others' appends are refused meanwhile, so no node starves.
local turn = redis.call('GET', KEYS[3])
if turn and turn ~= ARGV[9] then
  return {0, epoch, last}
end
if epoch ~= ARGV[1] or last + 1 ~= offset then
  if ARGV[10] == '1' and not turn then
    redis.call('SET', KEYS[3], ARGV[9], 'PX', 500)
  end
  return {0, epoch, last}
end
if turn then
  redis.call('DEL', KEYS[3])
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[4], ARGV[2] .. '-0', 't', now, 'm', ARGV[7])
local cutoff = now - tonumber(ARGV[5])
local start = '-'
for _ = 1, 8 do
  local batch = redis.call('XRANGE', KEYS[1], start, '+', 'COUNT', 128)
  local keep = nil
  for _, e in ipairs(batch) do
    if tonumber(e[2][2]) >= cutoff then
      keep = e[1]
      break
    end
    start = '(' .. e[1]
  end
  if keep then
    redis.call('XTRIM', KEYS[1], 'MINID', keep)
    break
  end
  if #batch < 128 then
    redis.call('XTRIM', KEYS[1], 'MINID', (offset + 1) .. '-0')
    break
  end
end
redis.call('HSET', KEYS[2], 'l', offset)
redis.call('PEXPIRE', KEYS[1], ARGV[8])
redis.call('PEXPIRE', KEYS[2], ARGV[8])
redis.call('PUBLISH', ARGV[6], ARGV[7])
return {1, epoch, offset}
"#
);

/// Answers `{epoch, last, recovered, entries...}` for a read after `ARGV[1]:ARGV[2]`: the
/// entries are every one after it when all of them are kept and none is older than `ARGV[4]`
/// ms. Then publishes the barrier `ARGV[7]` (if any), after everything already published.
const READ: &str = concat!(
    topic_head!(),
    r#"
local out = {epoch, last, 0}
local since = tonumber(ARGV[2])
if ARGV[1] == epoch and since ~= nil and since <= last then
  if since == last then
    out[3] = 1
  elseif last - since <= tonumber(ARGV[5]) then
    local t = redis.call('TIME')
    local cutoff = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - tonumber(ARGV[4])
    local entries = redis.call('XRANGE', KEYS[1], (since + 1) .. '-0', '+')
    local first = entries[1]
    if #entries == last - since and first and first[1] == (since + 1) .. '-0' and tonumber(first[2][2]) >= cutoff then
      out[3] = 1
      for _, e in ipairs(entries) do
        out[#out + 1] = e[2][4]
      end
    end
  end
end
if ARGV[7] ~= '' then
  redis.call('PUBLISH', ARGV[6], ARGV[7])
end
return out
"#
);

/// Why the Redis history store failed (inside [`HistoryError::Store`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RedisHistoryError {
    /// Redis answered with an error, or the connection failed.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// Redis did not answer in time.
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    /// This node's subscription to the cluster's history channel is down, so what it delivers
    /// cannot be put in order with a replay.
    #[error("the history channel subscription is down")]
    NotSubscribed,
    /// Other nodes' appends to the topic won every attempt.
    #[error("gave up after {ATTEMPTS} conflicting appends")]
    Contention,
    /// A script answered something this version does not understand.
    #[error("unexpected answer from redis: {0}")]
    Answer(String),
}

impl From<RedisHistoryError> for HistoryError {
    fn from(e: RedisHistoryError) -> HistoryError {
        HistoryError::Store(Box::new(e))
    }
}

/// Topics' histories in Redis Streams, shared by every node of a cluster, so any node recovers a
/// client for a topic whose broadcasts were published on another node.
///
/// One position space for the cluster: a topic's stream (`{cluster}:history:{topic}`) holds its
/// entries under ids `<offset>-0`; beside it, `{cluster}:history-meta:{topic}` holds the epoch
/// and the last offset. Whenever the stream is lost (deleted, flushed, a Redis restart without
/// persistence) or its epoch is, the next use starts a new random epoch, so a position from
/// before is answered "not recovered", never misread. Both keys expire after twice the topic's
/// `max_age` (at least a minute) without a broadcast, so idle topics do not stay forever.
/// Trimming: `MAXLEN` to [`HistoryOptions::max_len`] and `MINID` past entries older than
/// [`HistoryOptions::max_age`] (Redis's clock) on each append; a read also checks the age.
///
/// Order: an append is one Lua script that checks the position, `XADD`s and `PUBLISH`es the
/// entry on `{cluster}:history`. Every node, the publisher's included, delivers entries as they
/// arrive on that channel (the store says so with [`HistoryStore::deliver_to`]), so subscribers
/// on every node receive a topic's broadcasts in position order. A node whose subscription
/// dropped reads the gap back from the stream. A read publishes a barrier on the same channel
/// and returns once this node received it, so a recovering join knows which live broadcasts its
/// replay already holds.
///
/// Unreachable Redis: appends and reads fail after a short timeout with
/// [`HistoryError::Store`]; the history layer logs and counts them (`History::stats`), refuses
/// the broadcast, and answers joins `recovered: false`.
///
/// ```no_run
/// use std::sync::Arc;
/// use fawkes_channel::{HistoryOptions, PubSub};
/// use fawkes_pubsub_redis::{RedisAdapter, RedisHistory, RedisOptions};
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let options = RedisOptions::default().cluster("chat");
/// let pubsub = PubSub::with_adapter(RedisAdapter::with_options("redis://127.0.0.1:6379", options.clone())?);
/// let history = pubsub.history();
/// history.set_store(Arc::new(RedisHistory::with_options("redis://127.0.0.1:6379", options)?));
/// history.keep("feed:*", HistoryOptions::default());
/// let pos = history.broadcast("feed:news", "new_msg", |pos| serde_json::json!({"pos": pos.to_string()}).into()).await?;
/// # let _ = pos; Ok(()) }
/// ```
pub struct RedisHistory {
    shared: Arc<Shared>,
}

struct Shared {
    client: redis::Client,
    prefix: String,
    channel: String,
    timeout: Duration,
    conn: tokio::sync::Mutex<Option<redis::aio::MultiplexedConnection>>,
    known: Mutex<HashMap<String, Position>>,
    markers: Mutex<HashMap<u64, oneshot::Sender<()>>>,
    sink: OnceLock<Arc<dyn HistorySink>>,
    subscribed: watch::Sender<bool>,
    /// This store's name in a topic's turn (see `APPEND`).
    id: String,
}

impl fmt::Debug for RedisHistory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisHistory").field("prefix", &self.shared.prefix).finish_non_exhaustive()
    }
}

impl RedisHistory {
    /// A store on the Redis server at `url`, cluster `"fawkes"`.
    pub fn new(url: &str) -> Result<RedisHistory, RedisAdapterError> {
        RedisHistory::with_options(url, RedisOptions::default())
    }

    /// A store for the cluster [`RedisOptions::cluster`] names (the same as its adapter's),
    /// over TLS with [`RedisOptions::tls_ca`] as the adapter.
    pub fn with_options(url: &str, options: RedisOptions) -> Result<RedisHistory, RedisAdapterError> {
        let client = crate::client(url, &options)?;
        Ok(RedisHistory {
            shared: Arc::new(Shared {
                client,
                prefix: format!("{}:history", options.cluster),
                channel: format!("{}:history", options.cluster),
                timeout: TIMEOUT,
                conn: tokio::sync::Mutex::new(None),
                known: Mutex::new(HashMap::new()),
                markers: Mutex::new(HashMap::new()),
                sink: OnceLock::new(),
                subscribed: watch::Sender::new(false),
                id: random_epoch(),
            }),
        })
    }
}

fn random_epoch() -> String {
    loop {
        let n = getrandom::u64().unwrap_or_else(|_| {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            now.as_nanos() as u64 ^ u64::from(std::process::id())
        });
        if n != 0 {
            return format!("{n:x}");
        }
    }
}

fn parse_epoch(hex: &str) -> Result<u64, RedisHistoryError> {
    u64::from_str_radix(hex, 16).map_err(|_| RedisHistoryError::Answer(format!("epoch {hex:?}")))
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX / 2)
}

impl Shared {
    fn keys(&self, topic: &str) -> (String, String) {
        (format!("{}:{topic}", self.prefix), format!("{}-meta:{topic}", self.prefix))
    }

    /// The key of `topic`'s turn: held by a store whose appends keep losing (see `APPEND`).
    fn turn_key(&self, topic: &str) -> String {
        format!("{}-turn:{topic}", self.prefix)
    }

    /// The shared connection, made (within the timeout) if there is none.
    async fn conn(&self) -> Result<redis::aio::MultiplexedConnection, RedisHistoryError> {
        let mut slot = self.conn.lock().await;
        if let Some(conn) = &*slot {
            return Ok(conn.clone());
        }
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout));
        let conn =
            tokio::time::timeout(self.timeout, self.client.get_multiplexed_async_connection_with_config(&config))
                .await
                .map_err(|_| RedisHistoryError::Timeout(self.timeout))??;
        *slot = Some(conn.clone());
        Ok(conn)
    }

    /// Runs the script `cmd` (an `EVAL`); a failure drops the connection, so the next call
    /// makes a new one.
    async fn invoke<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, RedisHistoryError> {
        let mut conn = self.conn().await?;
        let result = tokio::time::timeout(self.timeout, cmd.query_async(&mut conn)).await;
        match result {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                if e.is_io_error() || e.is_connection_dropped() || e.is_timeout() {
                    *self.conn.lock().await = None;
                }
                Err(e.into())
            }
            Err(_) => {
                *self.conn.lock().await = None;
                Err(RedisHistoryError::Timeout(self.timeout))
            }
        }
    }

    fn remember(&self, topic: &str, position: Position) {
        let mut known = self.known.lock();
        if known.len() >= KNOWN && !known.contains_key(topic) {
            known.clear();
        }
        known.insert(topic.to_owned(), position);
    }

    async fn append(
        &self,
        topic: &str,
        options: &HistoryOptions,
        make: &mut (dyn FnMut(Position) -> Broadcast + Send),
    ) -> Result<Entry, RedisHistoryError> {
        let (stream, meta) = self.keys(topic);
        let expire = millis(options.max_age).saturating_mul(2).max(60_000);
        let mut guess = self
            .known
            .lock()
            .get(topic)
            .copied()
            .map_or((String::new(), 0), |p| (format!("{:x}", p.epoch()), p.offset()));
        let turn = self.turn_key(topic);
        for attempt in 0..ATTEMPTS {
            let next = match parse_epoch(&guess.0) {
                Ok(epoch) => Some(Position::new(epoch, guess.1 + 1)),
                Err(_) => None,
            };
            // Without a guess, ask with an impossible position: the answer is the real one.
            let (entry, message) = match next {
                Some(position) => {
                    let entry = Entry { position, broadcast: Arc::new(make(position)) };
                    let mut message = BytesMut::new();
                    message.put_u8(KIND_ENTRY);
                    message.put_slice(&entry.encode());
                    (Some(entry), message.freeze())
                }
                None => (None, Bytes::new()),
            };
            let mut invocation = redis::cmd("EVAL");
            invocation
                .arg(APPEND)
                .arg(3)
                .arg(&stream)
                .arg(&meta)
                .arg(&turn)
                .arg(&guess.0)
                .arg(guess.1 + 1)
                .arg(random_epoch())
                .arg(options.max_len)
                .arg(millis(options.max_age))
                .arg(&self.channel)
                .arg(message.as_ref())
                .arg(expire)
                .arg(&self.id)
                .arg(if attempt >= 2 { "1" } else { "0" });
            let (done, epoch, last): (i64, String, u64) = self.invoke(&invocation).await?;
            let position = Position::new(parse_epoch(&epoch)?, last);
            self.remember(topic, position);
            match entry {
                Some(entry) if done == 1 => return Ok(entry),
                _ => guess = (epoch, last),
            }
        }
        Err(RedisHistoryError::Contention)
    }

    async fn read_after(
        &self,
        topic: &str,
        options: &HistoryOptions,
        since: Option<Position>,
    ) -> Result<ReadAfter, RedisHistoryError> {
        let (stream, meta) = self.keys(topic);
        // A store that delivers answers only once this node has received everything up to
        // what it read: a barrier published after the read, on the delivery channel.
        let barrier = match self.sink.get() {
            Some(_) => {
                let mut up = self.subscribed.subscribe();
                tokio::time::timeout(self.timeout, up.wait_for(|up| *up))
                    .await
                    .map_err(|_| RedisHistoryError::NotSubscribed)?
                    .map_err(|_| RedisHistoryError::NotSubscribed)?;
                let token = getrandom::u64().unwrap_or_else(|_| rand_fallback());
                let (tx, rx) = oneshot::channel();
                self.markers.lock().insert(token, tx);
                let mut marker = BytesMut::with_capacity(9);
                marker.put_u8(KIND_MARKER);
                marker.put_u64(token);
                Some((token, rx, marker.freeze()))
            }
            None => None,
        };
        let marker = barrier.as_ref().map_or(Bytes::new(), |b| b.2.clone());
        let (since_epoch, since_offset) =
            since.map_or((String::new(), 0), |p| (format!("{:x}", p.epoch()), p.offset()));
        let expire = millis(options.max_age).saturating_mul(2).max(60_000);
        let mut invocation = redis::cmd("EVAL");
        invocation
            .arg(READ)
            .arg(2)
            .arg(&stream)
            .arg(&meta)
            .arg(&since_epoch)
            .arg(since_offset)
            .arg(random_epoch())
            .arg(millis(options.max_age))
            .arg(options.max_len)
            .arg(&self.channel)
            .arg(marker.as_ref())
            .arg(expire);
        let answer: Result<Vec<redis::Value>, _> = self.invoke(&invocation).await;
        let answer = match answer {
            Ok(answer) => answer,
            Err(e) => {
                if let Some((token, ..)) = &barrier {
                    self.markers.lock().remove(token);
                }
                return Err(e);
            }
        };
        let read = parse_read(answer)?;
        self.remember(topic, read.current);
        if let Some((token, rx, _)) = barrier
            && tokio::time::timeout(self.timeout, rx).await.is_err()
        {
            self.markers.lock().remove(&token);
            return Err(RedisHistoryError::NotSubscribed);
        }
        Ok(read)
    }
}

fn rand_fallback() -> u64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    now.as_nanos() as u64
}

/// `{epoch, last, recovered, entry...}` as the read script answers it.
fn parse_read(answer: Vec<redis::Value>) -> Result<ReadAfter, RedisHistoryError> {
    let bad = |what: &str| RedisHistoryError::Answer(what.to_owned());
    let mut items = answer.into_iter();
    let mut next = |what: &str| items.next().ok_or_else(|| bad(what));
    let epoch: String = redis::from_redis_value(next("no epoch")?).map_err(|e| bad(&e.to_string()))?;
    let last: u64 = redis::from_redis_value(next("no offset")?).map_err(|e| bad(&e.to_string()))?;
    let recovered: i64 = redis::from_redis_value(next("no verdict")?).map_err(|e| bad(&e.to_string()))?;
    let current = Position::new(parse_epoch(&epoch)?, last);
    let mut entries = Vec::new();
    for item in items {
        let bytes: Vec<u8> = redis::from_redis_value(item).map_err(|e| bad(&e.to_string()))?;
        let mut bytes = Bytes::from(bytes);
        if bytes.first() != Some(&KIND_ENTRY) {
            return Err(bad("an entry of another kind"));
        }
        bytes.advance(1);
        let entry = Entry::decode(bytes).map_err(|e| bad(&format!("entry: {e}")))?;
        entries.push(entry);
    }
    Ok(ReadAfter { current, recovered: recovered == 1, entries })
}

impl HistoryStore for RedisHistory {
    fn append<'a>(
        &'a self,
        topic: &'a str,
        options: &'a HistoryOptions,
        make: &'a mut (dyn FnMut(Position) -> Broadcast + Send),
    ) -> BoxFuture<'a, Result<Entry, HistoryError>> {
        Box::pin(async move { Ok(self.shared.append(topic, options, make).await?) })
    }

    fn read_after<'a>(
        &'a self,
        topic: &'a str,
        options: &'a HistoryOptions,
        since: Option<Position>,
    ) -> BoxFuture<'a, Result<ReadAfter, HistoryError>> {
        Box::pin(async move { Ok(self.shared.read_after(topic, options, since).await?) })
    }

    fn deliver_to(&self, sink: Arc<dyn HistorySink>) -> bool {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            tracing::error!("RedisHistory given a sink outside a tokio runtime: the caller delivers");
            return false;
        };
        if self.shared.sink.set(sink).is_err() {
            tracing::error!("a RedisHistory delivers to one PubSub only; give each its own store");
            return false;
        }
        rt.spawn(subscriber(self.shared.clone()));
        true
    }
}

/// Receives `{cluster}:history` and hands entries to the sink, reconnecting with backoff until
/// the sink is closed.
async fn subscriber(shared: Arc<Shared>) {
    let Some(sink) = shared.sink.get().cloned() else { return };
    let mut backoff = Backoff::new();
    let mut failures = 0u32;
    while !sink.is_closed() {
        let subscribed = async {
            let mut pubsub = shared.client.get_async_pubsub().await?;
            pubsub.subscribe(&shared.channel).await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        match tokio::time::timeout(shared.timeout, subscribed).await {
            Ok(Ok(pubsub)) => {
                if failures > 0 {
                    tracing::info!(channel = %shared.channel, "history channel subscribed again");
                }
                backoff.reset();
                failures = 0;
                shared.subscribed.send_replace(true);
                // Entries published while this node was not listening are read back.
                sink.resync();
                let mut messages = pubsub.into_on_message();
                let mut check = tokio::time::interval(Duration::from_secs(5));
                loop {
                    tokio::select! {
                        msg = messages.next() => match msg {
                            Some(msg) => receive(&shared, &*sink, Bytes::copy_from_slice(msg.get_payload_bytes())),
                            None => break,
                        },
                        _ = check.tick() => if sink.is_closed() { return },
                    }
                }
                shared.subscribed.send_replace(false);
                tracing::warn!(channel = %shared.channel, "history channel subscription lost; resubscribing");
            }
            Ok(Err(e)) => {
                failures += 1;
                if failures == 1 {
                    tracing::warn!(error = %e, "history channel subscription failed; retrying with backoff");
                }
            }
            Err(_) => {
                failures += 1;
                if failures == 1 {
                    tracing::warn!("history channel subscription timed out; retrying with backoff");
                }
            }
        }
        backoff.wait().await;
    }
}

fn receive(shared: &Shared, sink: &dyn HistorySink, mut message: Bytes) {
    match message.first() {
        Some(&KIND_ENTRY) => {
            message.advance(1);
            match Entry::decode(message) {
                Ok(entry) => sink.deliver(entry),
                Err(e) => tracing::warn!(error = %e, "unreadable history entry ignored"),
            }
        }
        Some(&KIND_MARKER) if message.len() == 9 => {
            message.advance(1);
            let token = message.get_u64();
            if let Some(tx) = shared.markers.lock().remove(&token) {
                let _ = tx.send(());
            }
        }
        _ => tracing::warn!("unreadable message on the history channel ignored"),
    }
}
