//! Durable history: topics' broadcasts kept in SQLite or PostgreSQL ([`SqlHistory`]), so a
//! client recovers what it missed across a restart of the server, and, on one PostgreSQL, through
//! any node of a cluster.
//!
//! Two tables, created on start: `fawkes_history_topics` holds per topic its epoch (random when
//! the row is created) and the last position given; `fawkes_history` holds the broadcasts by
//! topic, epoch and position. Wiping a topic ([`SqlHistory::wipe`], or deleting its row) makes
//! the next append or join create the row again with a new epoch, so every earlier position is
//! "not recovered", never misread.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use fawkes_channel::{Broadcast, Entry, HistoryError, HistoryOptions, HistoryStore, Payload, Position, ReadAfter};
use parking_lot::Mutex;
use sqlx::Connection as _;

use crate::Error;
use crate::db::{Db, TxConn, on_pool};

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// An append whose position is a multiple of this also deletes what the topic no longer keeps
/// (reads enforce `max_len` and `max_age` exactly; the deletes only bound the table).
const TRIM_EVERY: i64 = 32;

/// Topics whose last position is remembered between appends; beyond it the memory is cleared
/// (it is only a hint: a wrong one costs a retry).
const HEADS_LIMIT: usize = 65_536;

/// A [`HistoryStore`] in SQLite or PostgreSQL: durable across restarts (a restart keeps each
/// topic's epoch, so positions clients hold stay valid), trimmed to each topic's
/// [`HistoryOptions`].
///
/// **Order.** Appends to one topic on one node are serialised by the
/// [`History`](fawkes_channel::History) layer's lock, so positions increase in the order that
/// node delivers. Several nodes sharing one PostgreSQL each take the row lock of the topic's
/// counter to append, so positions are unique and increase in commit order; each node delivers
/// its own broadcasts in position order, but a subscriber of one node may receive two other
/// nodes' broadcasts in the order the cluster's PubSub carried them, which is not always their
/// position order. Recovery stays exact for a subscriber that received broadcasts in position
/// order.
///
/// **Cost.** On PostgreSQL an append is one statement (the counter moved from the position this
/// node gave last, and the broadcast inserted, together); only when another node appended in
/// between, or the topic is new, does it take the counter's row lock in a transaction. On SQLite
/// an append is one short transaction. A join that asks to recover reads two indexed ranges.
///
/// ```no_run
/// use std::sync::Arc;
/// use fawkes_channel::{Endpoint, HistoryOptions};
/// use fawkes_transport_db::SqlHistory;
///
/// # async fn run(router: fawkes_channel::Router) -> Result<(), fawkes_transport_db::Error> {
/// let store = SqlHistory::connect("postgres://postgres@127.0.0.1/app").await?;
/// let endpoint = Endpoint::builder().router(router).history("feed:*", HistoryOptions::default()).build();
/// endpoint.history().set_store(Arc::new(store));
/// # Ok(()) }
/// ```
pub struct SqlHistory {
    db: Db,
    /// Set once the tables exist (created by the first operation of a lazily connected store).
    schema: tokio::sync::OnceCell<()>,
    /// Per topic, the epoch and last position this node wrote: the optimistic append's guess.
    heads: Mutex<HashMap<Box<str>, Head>>,
}

#[derive(Debug, Clone, Copy)]
struct Head {
    epoch: i64,
    last: i64,
}

impl fmt::Debug for SqlHistory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqlHistory").field("db", &self.db).finish_non_exhaustive()
    }
}

impl SqlHistory {
    /// Connects to `url` (`sqlite://...` or `postgres://...`) and creates the history tables if
    /// missing (and nothing else).
    pub async fn connect(url: &str) -> Result<SqlHistory, Error> {
        SqlHistory::new(Db::open(url).await?).await
    }

    /// A store on `db`; creates the history tables if missing. Several nodes may start at once.
    pub async fn new(db: Db) -> Result<SqlHistory, Error> {
        let store = SqlHistory::unready(db);
        store.ready().await?;
        Ok(store)
    }

    /// A store on PostgreSQL at `url` that connects (and creates its tables) when first used,
    /// so a server starts while the database is away: until it answers, appends fail (the
    /// broadcast is not sent) and joins are answered "not recovered", each logged by the
    /// [`History`](fawkes_channel::History) layer. SQLite URLs connect at once.
    pub async fn connect_lazy(url: &str) -> Result<SqlHistory, Error> {
        Ok(SqlHistory::unready(Db::open_lazy(url).await?))
    }

    fn unready(db: Db) -> SqlHistory {
        SqlHistory { db, schema: tokio::sync::OnceCell::new(), heads: Mutex::new(HashMap::new()) }
    }

    /// Creates the tables once (retried by the next operation if it fails).
    async fn ready(&self) -> Result<(), Error> {
        self.schema
            .get_or_try_init(|| async {
                match &self.db {
                    // raw_sql: several statements; the advisory lock keeps nodes starting
                    // together from racing on CREATE, and "already exists, skipping" notices
                    // are not sent.
                    Db::Postgres(pool) => sqlx::raw_sql(POSTGRES_SCHEMA).execute(pool).await.map(drop),
                    Db::Sqlite(pool) => sqlx::raw_sql(SQLITE_SCHEMA).execute(pool).await.map(drop),
                }
            })
            .await?;
        Ok(())
    }

    /// Forgets `topic`'s history: its broadcasts are deleted and its next epoch is new, so no
    /// position given before is recovered.
    pub async fn wipe(&self, topic: &str) -> Result<(), Error> {
        self.ready().await?;
        on_pool!(&self.db, p => {
            let mut conn = TxConn::acquire(p).await?;
            let mut tx = conn.begin().await?;
            sqlx::query("DELETE FROM fawkes_history_topics WHERE topic = $1").bind(topic).execute(&mut *tx).await?;
            sqlx::query("DELETE FROM fawkes_history WHERE topic = $1").bind(topic).execute(&mut *tx).await?;
            tx.commit().await?;
            conn.finish();
        });
        self.heads.lock().remove(topic);
        Ok(())
    }

    fn remember(&self, topic: &str, head: Head) {
        let mut heads = self.heads.lock();
        if heads.len() >= HEADS_LIMIT && !heads.contains_key(topic) {
            heads.clear();
        }
        heads.insert(topic.into(), head);
    }

    async fn append_now(
        &self,
        topic: &str,
        options: &HistoryOptions,
        make: &mut (dyn FnMut(Position) -> Broadcast + Send),
    ) -> Result<Entry, Error> {
        self.ready().await?;
        let guess = self.heads.lock().get(topic).copied();
        if let (Db::Postgres(pool), Some(head)) = (&self.db, guess) {
            let pos = head.last + 1;
            let entry = entry(head.epoch, pos, make);
            let (event, payload, binary) = encode(&entry.broadcast);
            let done = sqlx::query(APPEND_AFTER_HEAD)
                .bind(topic)
                .bind(head.epoch)
                .bind(pos)
                .bind(event)
                .bind(payload)
                .bind(binary)
                .bind(now_ms())
                .execute(pool)
                .await?;
            if done.rows_affected() == 1 {
                self.appended(topic, options, Head { epoch: head.epoch, last: pos }).await;
                return Ok(entry);
            }
            // Another node appended meanwhile, or the topic was wiped: take the lock.
        }
        let (entry, head) = on_pool!(&self.db, p => {
            let mut conn = TxConn::acquire(p).await?;
            let mut tx = conn.begin().await?;
            // The UPDATE takes the counter's row lock (on SQLite, the write lock) until commit.
            let mut bumped: Option<(i64, i64)> = sqlx::query_as(BUMP).bind(topic).fetch_optional(&mut *tx).await?;
            if bumped.is_none() {
                sqlx::query(CREATE_TOPIC).bind(topic).bind(new_epoch()).execute(&mut *tx).await?;
                bumped = sqlx::query_as(BUMP).bind(topic).fetch_optional(&mut *tx).await?;
            }
            let Some((epoch, pos)) = bumped else {
                return Err(Error::Database(sqlx::Error::RowNotFound));
            };
            let entry = entry(epoch, pos, make);
            let (event, payload, binary) = encode(&entry.broadcast);
            sqlx::query(INSERT)
                .bind(topic)
                .bind(epoch)
                .bind(pos)
                .bind(event)
                .bind(payload)
                .bind(binary)
                .bind(now_ms())
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            conn.finish();
            (entry, Head { epoch, last: pos })
        });
        self.appended(topic, options, head).await;
        Ok(entry)
    }

    /// Remembers the head, and now and then deletes what `topic` no longer keeps.
    async fn appended(&self, topic: &str, options: &HistoryOptions, head: Head) {
        self.remember(topic, head);
        if head.last % TRIM_EVERY != 0 {
            return;
        }
        let max_len = i64::try_from(options.max_len).unwrap_or(i64::MAX);
        let oldest = now_ms().saturating_sub(millis(options.max_age));
        let trimmed = on_pool!(&self.db, p => sqlx::query(TRIM)
            .bind(topic)
            .bind(head.epoch)
            .bind(head.last.saturating_sub(max_len))
            .bind(oldest)
            .execute(p)
            .await
            .map(drop));
        if let Err(e) = trimmed {
            tracing::warn!(topic, error = %e, "history trim failed; retried after later appends");
        }
    }

    async fn read_now(
        &self,
        topic: &str,
        options: &HistoryOptions,
        since: Option<Position>,
    ) -> Result<ReadAfter, Error> {
        self.ready().await?;
        let head: Option<(i64, i64)> =
            on_pool!(&self.db, p => sqlx::query_as(HEAD).bind(topic).fetch_optional(p).await?);
        let (epoch, last) = match head {
            Some(head) => head,
            None => {
                // A topic never written (or wiped): give it its epoch now, so the position a join
                // answers stays valid for the broadcasts that follow.
                on_pool!(&self.db, p => {
                    sqlx::query(CREATE_TOPIC).bind(topic).bind(new_epoch()).execute(p).await?;
                    sqlx::query_as(HEAD).bind(topic).fetch_one(p).await?
                })
            }
        };
        let current = Position::new(epoch as u64, last as u64);
        let lost = ReadAfter { current, recovered: false, entries: Vec::new() };
        let Some(since) = since else { return Ok(lost) };
        if since.epoch() != current.epoch() || since.offset() > current.offset() {
            return Ok(lost);
        }
        let missed = current.offset() - since.offset();
        if missed == 0 {
            return Ok(ReadAfter { current, recovered: true, entries: Vec::new() });
        }
        if missed > options.max_len as u64 {
            return Ok(lost);
        }
        let rows: Vec<Row> = on_pool!(&self.db, p => sqlx::query_as(READ)
            .bind(topic)
            .bind(epoch)
            .bind(since.offset() as i64)
            .bind(last)
            .fetch_all(p)
            .await?);
        // Each kept broadcast is younger than max_age; a position is missing if trimmed.
        let oldest = now_ms().saturating_sub(millis(options.max_age));
        if rows.len() as u64 != missed || rows.iter().any(|r| r.4 <= oldest) {
            return Ok(lost);
        }
        let mut entries = Vec::with_capacity(rows.len());
        for (pos, event, payload, binary, _) in rows {
            let payload = if binary {
                Payload::Binary(Bytes::from(payload))
            } else {
                Payload::Json(serde_json::from_slice(&payload).map_err(|e| Error::Corrupt(e.to_string()))?)
            };
            let broadcast = Broadcast { topic: topic.to_owned(), event, payload };
            entries.push(Entry { position: Position::new(epoch as u64, pos as u64), broadcast: Arc::new(broadcast) });
        }
        Ok(ReadAfter { current, recovered: true, entries })
    }
}

impl HistoryStore for SqlHistory {
    fn append<'a>(
        &'a self,
        topic: &'a str,
        options: &'a HistoryOptions,
        make: &'a mut (dyn FnMut(Position) -> Broadcast + Send),
    ) -> BoxFuture<'a, Result<Entry, HistoryError>> {
        Box::pin(async move { self.append_now(topic, options, make).await.map_err(|e| HistoryError::Store(e.into())) })
    }

    fn read_after<'a>(
        &'a self,
        topic: &'a str,
        options: &'a HistoryOptions,
        since: Option<Position>,
    ) -> BoxFuture<'a, Result<ReadAfter, HistoryError>> {
        Box::pin(async move { self.read_now(topic, options, since).await.map_err(|e| HistoryError::Store(e.into())) })
    }
}

/// A kept broadcast: position, event, payload bytes, binary?, when (unix ms).
type Row = (i64, String, Vec<u8>, bool, i64);

fn entry(epoch: i64, pos: i64, make: &mut (dyn FnMut(Position) -> Broadcast + Send)) -> Entry {
    let position = Position::new(epoch as u64, pos as u64);
    Entry { position, broadcast: Arc::new(make(position)) }
}

/// Event, payload bytes (JSON text or the binary payload) and whether it is binary.
fn encode(b: &Broadcast) -> (&str, Vec<u8>, bool) {
    match &b.payload {
        Payload::Json(v) => (&b.event, serde_json::to_vec(v).unwrap_or_default(), false),
        Payload::Binary(bytes) => (&b.event, bytes.to_vec(), true),
    }
}

/// A random epoch in `1..=i64::MAX` (a positive BIGINT; 0 is never an epoch).
fn new_epoch() -> i64 {
    let random = getrandom::u64().unwrap_or_else(|_| {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        now.as_nanos() as u64 ^ (u64::from(std::process::id()) << 32)
    });
    ((random >> 1) as i64).max(1)
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, millis)
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

const POSTGRES_SCHEMA: &str = "
BEGIN;
SET LOCAL client_min_messages = warning;
SELECT pg_advisory_xact_lock(7314558310112935001);
CREATE TABLE IF NOT EXISTS fawkes_history_topics (
    topic    TEXT PRIMARY KEY,
    epoch    BIGINT NOT NULL,
    last_pos BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS fawkes_history (
    topic     TEXT NOT NULL,
    epoch     BIGINT NOT NULL,
    pos       BIGINT NOT NULL,
    event     TEXT NOT NULL,
    payload   BYTEA NOT NULL,
    is_binary BOOLEAN NOT NULL,
    at_ms     BIGINT NOT NULL,
    PRIMARY KEY (topic, epoch, pos)
);
COMMIT;
";

const SQLITE_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS fawkes_history_topics (
    topic    TEXT PRIMARY KEY,
    epoch    INTEGER NOT NULL,
    last_pos INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS fawkes_history (
    topic     TEXT NOT NULL,
    epoch     INTEGER NOT NULL,
    pos       INTEGER NOT NULL,
    event     TEXT NOT NULL,
    payload   BLOB NOT NULL,
    is_binary BOOLEAN NOT NULL,
    at_ms     INTEGER NOT NULL,
    PRIMARY KEY (topic, epoch, pos)
);
";

const HEAD: &str = "SELECT epoch, last_pos FROM fawkes_history_topics WHERE topic = $1";

const CREATE_TOPIC: &str =
    "INSERT INTO fawkes_history_topics (topic, epoch, last_pos) VALUES ($1, $2, 0) ON CONFLICT (topic) DO NOTHING";

const BUMP: &str =
    "UPDATE fawkes_history_topics SET last_pos = last_pos + 1 WHERE topic = $1 RETURNING epoch, last_pos";

const INSERT: &str = "INSERT INTO fawkes_history (topic, epoch, pos, event, payload, is_binary, at_ms) \
                      VALUES ($1, $2, $3, $4, $5, $6, $7)";

/// PostgreSQL: moves the counter from `$3 - 1` to `$3` and inserts, or does nothing at all.
const APPEND_AFTER_HEAD: &str = "WITH head AS (\
        UPDATE fawkes_history_topics SET last_pos = $3 \
        WHERE topic = $1 AND epoch = $2 AND last_pos = $3 - 1 RETURNING epoch) \
    INSERT INTO fawkes_history (topic, epoch, pos, event, payload, is_binary, at_ms) \
    SELECT $1, epoch, $3, $4, $5, $6, $7 FROM head";

const TRIM: &str = "DELETE FROM fawkes_history WHERE topic = $1 AND (epoch <> $2 OR pos <= $3 OR at_ms <= $4)";

const READ: &str = "SELECT pos, event, payload, is_binary, at_ms FROM fawkes_history \
                    WHERE topic = $1 AND epoch = $2 AND pos > $3 AND pos <= $4 ORDER BY pos";
