//! Table streams: rows of an application table (or query), in id order, published as broadcasts
//! through the endpoint's [`PubSub`], with replay from a client's last id.
//!
//! A stream is a *source*: it reads the table and publishes each row on its topic like any other
//! broadcast, so every subscriber of the topic receives it through the ordinary fan-out (encoded
//! once). The table is also the history of the stream's topics: one [`HistoryStore`] among
//! others, whose position after row `id` is `"<epoch>:<id>"`. A join that asks for rows after
//! `last_event_id` recovers like any join on a topic with history ([`SocketRef::recover`]): the
//! reader publishes each row under its topic's history lock, and the recovering join subscribes
//! and reads the table up to the last row published under the same lock, so the rows read are
//! exactly the ones the subscription missed: no gap, no duplicate, in order.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use fawkes_channel::{
    Broadcast, Entry, HistoryError, HistoryOptions, HistoryStore, Payload, Position, PubSub, ReadAfter, Recovery,
    SocketRef,
};
use parking_lot::RwLock;
use serde_json::{Value, json};

use crate::Error;
use crate::db::{Db, on_pool, quote_ident};
use crate::feed::{Feed, FeedRow};
use crate::wake::Wakeup;

/// Which table (or query) to stream, and how a row maps to topic, event and payload.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct StreamOptions {
    /// The name its cursor is saved under in `fawkes_cursors`.
    pub name: String,
    /// A table name, or a parenthesised query with an alias: `(SELECT ...) AS s`.
    pub source: String,
    /// An increasing integer column: the cursor and the row id clients see.
    pub id_column: String,
    /// The expression giving the topic.
    pub topic_column: String,
    /// The expression giving the event.
    pub event_column: String,
    /// The expression giving the payload, JSON (text or a JSON type).
    pub payload_column: String,
    /// Rows read per query.
    pub batch_size: i64,
    /// How often to look for new rows (on PostgreSQL, NOTIFY wakes the reader sooner).
    pub poll_interval: Duration,
    /// While nothing arrives, the interval doubles up to this.
    pub max_idle_interval: Duration,
    /// The topics whose history the table is: an exact topic or a prefix followed by `*`
    /// (default `"*"`, every topic not given a history before the stream attached).
    pub topics: String,
    /// At most this many rows are replayed to a join; further behind, it is not recovered
    /// (default 10,000).
    pub max_replay: usize,
}

impl StreamOptions {
    /// Streams `table` with columns `id`, `topic`, `event`, `payload` (as `fawkes_events` has).
    pub fn table(table: &str) -> StreamOptions {
        StreamOptions {
            name: format!("stream:{table}"),
            source: quote_ident(table),
            id_column: "id".into(),
            topic_column: "topic".into(),
            event_column: "event".into(),
            payload_column: "payload".into(),
            batch_size: 500,
            poll_interval: Duration::from_millis(50),
            max_idle_interval: Duration::from_millis(500),
            topics: "*".into(),
            max_replay: 10_000,
        }
    }

    /// Streams the rows of a query, e.g. `(SELECT id, 'orders:' || customer AS topic, ...) AS s`.
    pub fn query(name: &str, query: &str) -> StreamOptions {
        StreamOptions { name: name.into(), source: query.into(), ..StreamOptions::table("x") }
    }

    /// Sets the column expressions.
    pub fn columns(mut self, id: &str, topic: &str, event: &str, payload: &str) -> Self {
        (self.id_column, self.topic_column, self.event_column, self.payload_column) =
            (id.into(), topic.into(), event.into(), payload.into());
        self
    }

    /// Sets [`StreamOptions::poll_interval`].
    pub fn poll_interval(mut self, d: Duration) -> Self {
        self.poll_interval = d;
        self
    }

    /// Sets [`StreamOptions::max_idle_interval`].
    pub fn max_idle_interval(mut self, d: Duration) -> Self {
        self.max_idle_interval = d;
        self
    }

    /// Sets [`StreamOptions::topics`].
    pub fn topics(mut self, pattern: &str) -> Self {
        self.topics = pattern.into();
        self
    }

    /// Sets [`StreamOptions::max_replay`] (at least 1).
    pub fn max_replay(mut self, rows: usize) -> Self {
        self.max_replay = rows.max(1);
        self
    }

    /// Sets [`StreamOptions::batch_size`].
    pub fn batch_size(mut self, n: i64) -> Self {
        self.batch_size = n.max(1);
        self
    }

    fn feed(&self) -> Feed {
        Feed::new(&self.source, &self.id_column, &self.topic_column, &self.event_column, &self.payload_column)
    }

    fn read_sql(&self) -> String {
        let o = self;
        format!(
            "SELECT {id}, CAST({e} AS TEXT), CAST({p} AS TEXT) FROM {src} \
             WHERE {t} = $1 AND {id} > $2 AND {id} <= $3 ORDER BY {id} LIMIT $4",
            id = o.id_column,
            t = o.topic_column,
            e = o.event_column,
            p = o.payload_column,
            src = o.source
        )
    }
}

struct Shared {
    source: Arc<Source>,
    /// Where rows are published: given at start, or the PubSub of the first channel to join.
    /// Set under the write lock, so a row the reader passes over for want of it is already
    /// counted in `source.published` when the first join reads the table.
    pubsub: RwLock<Option<PubSub>>,
}

/// What the stream's history ([`TableHistory`]) shares with the reader.
struct Source {
    db: Db,
    options: StreamOptions,
    /// The id of the last row published (moved under the row's topic lock).
    published: AtomicI64,
    /// The epoch of the stream's positions, from its name: the same across restarts.
    epoch: u64,
    /// `SELECT id, event, payload FROM source WHERE topic = $1 AND id > $2 AND id <= $3 ...`
    read_sql: String,
}

/// A running table stream. Cheap to clone; the reader stops when every clone is dropped.
///
/// The table is the history of the stream's topics ([`StreamOptions::topics`]): a channel's
/// `join` calls [`TableStream::recover`] with the client's `last_event_id`, and the
/// [`History`](fawkes_channel::History) layer delivers the rows after it right after the join
/// reply, then the live ones, as for any topic with history:
///
/// ```no_run
/// use fawkes_channel::{Channel, HandleIn, Payload, SocketRef};
/// use fawkes_transport_db::{Db, StreamOptions, TableStream};
/// use serde_json::{json, Value};
///
/// struct Feed { stream: TableStream }
///
/// impl Channel for Feed {
///     async fn join(&mut self, params: Payload, socket: &mut SocketRef) -> Result<Value, Value> {
///         let last_event_id = params.as_json().and_then(|p| p["last_event_id"].as_i64());
///         let recovery = self.stream.recover(socket, last_event_id).await;
///         Ok(json!({"recovered": recovery.is_ok_and(|r| r.recovered)}))
///     }
///     async fn handle_in(&mut self, _: &str, _: Payload, _: &mut SocketRef) -> HandleIn {
///         HandleIn::NoReply
///     }
/// }
///
/// # async fn run() -> Result<(), fawkes_transport_db::Error> {
/// let db = Db::connect("sqlite://app.db").await?;
/// let stream = TableStream::start(db, StreamOptions::table("fawkes_events")).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct TableStream(Arc<Shared>);

impl fmt::Debug for TableStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TableStream")
            .field("name", &self.0.source.options.name)
            .field("position", &self.position())
            .finish()
    }
}

impl TableStream {
    /// Starts reading. Resumes from the saved cursor; a stream never started before begins at
    /// the table's current end (earlier rows are still replayed to joins that ask). Rows are
    /// published through the PubSub of the endpoint whose channel first calls
    /// [`TableStream::recover`] (until then no socket of this node can be subscribed to them);
    /// [`TableStream::start_on`] names it up front.
    pub async fn start(db: Db, options: StreamOptions) -> Result<TableStream, Error> {
        TableStream::spawn(db, options, None).await
    }

    /// Starts reading, publishing through `pubsub`.
    pub async fn start_on(db: Db, pubsub: PubSub, options: StreamOptions) -> Result<TableStream, Error> {
        TableStream::spawn(db, options, Some(pubsub)).await
    }

    async fn spawn(db: Db, options: StreamOptions, pubsub: Option<PubSub>) -> Result<TableStream, Error> {
        let position = db.start_cursor(&options.name, &options.source, &options.id_column).await?;
        let source = Arc::new(Source {
            db: db.clone(),
            epoch: epoch_of(&options.name),
            read_sql: options.read_sql(),
            options: options.clone(),
            published: AtomicI64::new(position),
        });
        let stream = TableStream(Arc::new(Shared { source, pubsub: RwLock::new(None) }));
        if let Some(pubsub) = pubsub {
            stream.attach(&pubsub);
        }
        let wakeup = Wakeup::new(&db, options.poll_interval, options.max_idle_interval).await;
        let reader = Reader { feed: options.feed(), db, options, shared: Arc::downgrade(&stream.0), wakeup };
        tokio::spawn(reader.run(position));
        Ok(stream)
    }

    /// Publishes through `pubsub` from now on, and makes the table the history of the stream's
    /// topics there. The first PubSub wins.
    fn attach(&self, pubsub: &PubSub) {
        let mut slot = self.0.pubsub.write();
        if slot.is_some() {
            return;
        }
        let options = &self.0.source.options;
        let kept = HistoryOptions::default().max_len(options.max_replay).max_age(Duration::MAX);
        pubsub.history().keep_source(&options.topics, kept, Arc::new(TableHistory(self.0.source.clone())));
        *slot = Some(pubsub.clone());
    }

    /// The id of the last row published.
    pub fn position(&self) -> i64 {
        self.0.source.published.load(Ordering::Acquire)
    }

    /// The stream's position of row `id`, as [`SocketRef::recover`] takes it:
    /// `"<epoch>:<id>"`, the epoch fixed by the stream's name.
    pub fn position_of(&self, id: i64) -> Position {
        Position::new(self.0.source.epoch, u64::try_from(id).unwrap_or(0))
    }

    /// Call in [`Channel::join`](fawkes_channel::Channel::join): subscribes the socket to its
    /// topic with every row of the topic with id > `last_event_id` delivered first, right after
    /// the join reply, then live rows, with no gap and no duplicate (none replayed without a
    /// `last_event_id`: rows from the moment of the join on). It is
    /// [`SocketRef::recover`] with the position of `last_event_id`. `recovered` is false, and
    /// nothing replayed, past [`StreamOptions::max_replay`] rows (or the socket's outbound queue
    /// limit), or when the table cannot be read; an error when the topic keeps no history (a
    /// topic outside [`StreamOptions::topics`] or given another history first).
    pub async fn recover(&self, socket: &mut SocketRef, last_event_id: Option<i64>) -> Result<Recovery, HistoryError> {
        self.attach(socket.pubsub());
        let since = last_event_id.map(|id| self.position_of(id).to_string());
        socket.recover(since.as_deref()).await
    }
}

/// The table as the history of a stream's topics: a position is `"<epoch>:<row id>"`; what
/// follows one is the topic's rows after that id, up to the last row published. Appends are
/// refused: rows are written by inserting them into the table.
struct TableHistory(Arc<Source>);

impl TableHistory {
    async fn read(
        &self,
        topic: &str,
        options: &HistoryOptions,
        since: Option<Position>,
    ) -> Result<ReadAfter, sqlx::Error> {
        let source = &self.0;
        // Read under the topic's lock: rows up to here have reached subscribers, rows after
        // it will reach the new one.
        let published = source.published.load(Ordering::Acquire);
        let current = Position::new(source.epoch, u64::try_from(published).unwrap_or(0));
        let lost = ReadAfter { current, recovered: false, entries: Vec::new() };
        let Some(since) = since else { return Ok(lost) };
        if since.epoch() != source.epoch || since.offset() > current.offset() {
            return Ok(lost);
        }
        if since.offset() == current.offset() {
            return Ok(ReadAfter { current, recovered: true, entries: Vec::new() });
        }
        let limit = i64::try_from(options.max_len).unwrap_or(i64::MAX - 1) + 1;
        let rows: Vec<ReplayRow> = on_pool!(&source.db, p => {
            sqlx::query_as(&source.read_sql)
                .bind(topic)
                .bind(since.offset() as i64)
                .bind(published)
                .bind(limit)
                .fetch_all(p)
                .await?
        });
        if rows.len() > options.max_len {
            tracing::info!(stream = %source.options.name, topic, "more rows to replay than max_replay: not recovered");
            return Ok(lost);
        }
        let entries = rows
            .into_iter()
            .filter_map(|(id, event, payload)| {
                let broadcast = broadcast(topic, id, event.as_deref(), payload.as_deref())?;
                let position = Position::new(source.epoch, u64::try_from(id).unwrap_or(0));
                Some(Entry { position, broadcast: Arc::new(broadcast) })
            })
            .collect();
        Ok(ReadAfter { current, recovered: true, entries })
    }
}

impl HistoryStore for TableHistory {
    fn append<'a>(
        &'a self,
        topic: &'a str,
        _: &'a HistoryOptions,
        _: &'a mut (dyn FnMut(Position) -> Broadcast + Send),
    ) -> BoxFuture<'a, Result<Entry, HistoryError>> {
        let why = format!("{topic:?} is fed by table stream {:?}: insert a row instead", self.0.options.name);
        Box::pin(std::future::ready(Err(HistoryError::Store(why.into()))))
    }

    fn read_after<'a>(
        &'a self,
        topic: &'a str,
        options: &'a HistoryOptions,
        since: Option<Position>,
    ) -> BoxFuture<'a, Result<ReadAfter, HistoryError>> {
        Box::pin(async move { self.read(topic, options, since).await.map_err(|e| HistoryError::Store(e.into())) })
    }
}

/// A replayed row: id, event, payload.
type ReplayRow = (i64, Option<String>, Option<String>);

type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// A stable epoch for stream `name` (FNV-1a; never 0).
fn epoch_of(name: &str) -> u64 {
    let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    hash.max(1)
}

struct Reader {
    db: Db,
    options: StreamOptions,
    feed: Feed,
    shared: std::sync::Weak<Shared>,
    wakeup: Wakeup,
}

impl Reader {
    async fn run(mut self, mut position: i64) {
        loop {
            let rows = self.feed.next_batch(&self.db, position, self.options.batch_size, &self.options.name).await;
            let full = rows.len() as i64 == self.options.batch_size;
            self.wakeup.read(!rows.is_empty());
            if let Some(last) = rows.last().map(|r| r.id) {
                let Some(shared) = self.shared.upgrade() else { return };
                for row in rows {
                    self.publish(&shared, row).await;
                }
                position = last;
                drop(shared);
                if let Err(e) = self.db.save_cursor(&self.options.name, position).await {
                    tracing::warn!(stream = %self.options.name, error = %e, "could not save the stream cursor");
                }
            } else if self.shared.strong_count() == 0 {
                return;
            }
            if full {
                continue;
            }
            self.wakeup.wait().await;
        }
    }

    /// Publishes one row under its topic's history lock and moves the published position with
    /// it, so a recovering join reads the table up to exactly what its subscription missed.
    async fn publish(&mut self, shared: &Shared, row: FeedRow) {
        let id = row.id;
        let published = &shared.source.published;
        let built = match row.a.as_deref() {
            None => Err("topic is NULL"),
            Some(topic) => {
                broadcast(topic, id, row.b.as_deref(), row.c.as_deref()).ok_or("event is NULL or payload is not JSON")
            }
        };
        let broadcast = match built {
            Ok(broadcast) => broadcast,
            Err(why) => {
                self.db.dead_letter(&self.options.name, id, why).await;
                return published.store(id, Ordering::Release);
            }
        };
        let pubsub = {
            let slot = shared.pubsub.read();
            match &*slot {
                Some(pubsub) => pubsub.clone(),
                // Nobody of this node can be subscribed yet (moved while the slot is read-locked:
                // see `Shared::pubsub`).
                None => return published.store(id, Ordering::Release),
            }
        };
        // Local: every node runs its own reader of the same table.
        pubsub.history().deliver_stored(broadcast, || published.store(id, Ordering::Release)).await;
    }
}

/// `event` with `{"id": id, "data": payload}` on `topic`, or `None` for a row that cannot be
/// delivered.
fn broadcast(topic: &str, id: i64, event: Option<&str>, payload: Option<&str>) -> Option<Broadcast> {
    let data: Value = serde_json::from_str(payload?).ok()?;
    Some(Broadcast {
        topic: topic.to_owned(),
        event: event?.to_owned(),
        payload: Payload::Json(json!({ "id": id, "data": data })),
    })
}
