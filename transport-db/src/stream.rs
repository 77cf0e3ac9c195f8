//! Table streams: rows of an application table (or query), in id order, published as broadcasts
//! through the endpoint's [`PubSub`], with replay from a client's last id.
//!
//! A stream is a *source*: it reads the table and publishes each row on its topic like any other
//! broadcast, so every subscriber of the topic receives it through the ordinary fan-out (encoded
//! once). The table is also the stream's history: a join that asks for rows after
//! `last_event_id` gets them from the table. The seam between that replay and live rows is held
//! by the reader: [`TableStream::replay`] (in `join`) pauses publishing at a row boundary `S`,
//! the channel's subscription and [`Replay::deliver`] (rows `(last_event_id, S]`, in
//! `after_join`) happen inside the pause, and rows after `S` are published once the replay is
//! queued: no gap, no duplicate, in order.

use std::fmt;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use fawkes_channel::{Backoff, Broadcast, BroadcastFrames, Payload, PubSub, SocketRef};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};

use crate::Error;
use crate::db::{Db, on_pool, quote_ident};
use crate::feed::{Feed, FeedRow};
use crate::wake::Wakeup;

/// How long the reader waits for a joining channel to deliver its replay before it publishes
/// again regardless (a channel stuck in `join` must not stop the stream for everyone).
const HOLD_LIMIT: Duration = Duration::from_secs(10);

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

    /// Sets [`StreamOptions::batch_size`].
    pub fn batch_size(mut self, n: i64) -> Self {
        self.batch_size = n.max(1);
        self
    }

    fn feed(&self) -> Feed {
        Feed::new(&self.source, &self.id_column, &self.topic_column, &self.event_column, &self.payload_column)
    }

    fn replay_sql(&self) -> String {
        let o = self;
        format!(
            "SELECT {id}, CAST({t} AS TEXT), CAST({e} AS TEXT), CAST({p} AS TEXT) FROM {src} \
             WHERE {t} = $1 AND {id} > $2 AND {id} <= $3 ORDER BY {id} LIMIT $4",
            id = o.id_column,
            t = o.topic_column,
            e = o.event_column,
            p = o.payload_column,
            src = o.source
        )
    }
}

/// A joining channel's request: hold publishing at a row boundary until it has subscribed and
/// queued its replay.
struct Hold {
    at: oneshot::Sender<i64>,
    release: oneshot::Receiver<()>,
}

struct Shared {
    db: Db,
    options: StreamOptions,
    position: AtomicI64,
    holds: mpsc::Sender<Hold>,
    /// Where rows are published: given at start, or the PubSub of the first channel to join.
    pubsub: OnceLock<PubSub>,
}

/// A running table stream. Cheap to clone; the reader stops when every clone is dropped.
///
/// A channel asks for the replay in `join` and delivers it in `after_join`:
///
/// ```no_run
/// use fawkes_channel::{Channel, HandleIn, Payload, SocketRef};
/// use fawkes_transport_db::{Db, Replay, StreamOptions, TableStream};
/// use serde_json::{json, Value};
///
/// struct Feed { stream: TableStream, replay: Option<Replay> }
///
/// impl Channel for Feed {
///     async fn join(&mut self, params: Payload, socket: &mut SocketRef) -> Result<Value, Value> {
///         let last_event_id = params.as_json().and_then(|p| p["last_event_id"].as_i64());
///         self.replay = Some(self.stream.replay(socket, last_event_id).await);
///         Ok(json!({}))
///     }
///     async fn after_join(&mut self, socket: &mut SocketRef) {
///         if let Some(replay) = self.replay.take() {
///             replay.deliver(socket).await;
///         }
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
        f.debug_struct("TableStream").field("name", &self.0.options.name).field("position", &self.position()).finish()
    }
}

impl TableStream {
    /// Starts reading. Resumes from the saved cursor; a stream never started before begins at
    /// the table's current end (earlier rows are still replayed to joins that ask). Rows are
    /// published through the PubSub of the endpoint whose channel first calls
    /// [`TableStream::replay`] (until then no socket of this node can be subscribed to them);
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
        let (holds, rx) = mpsc::channel(1024);
        let shared = Arc::new(Shared {
            db: db.clone(),
            options: options.clone(),
            position: AtomicI64::new(position),
            holds,
            pubsub: OnceLock::new(),
        });
        if let Some(pubsub) = pubsub {
            let _ = shared.pubsub.set(pubsub);
        }
        let wakeup = Wakeup::new(&db, options.poll_interval, options.max_idle_interval).await;
        let reader = Reader { feed: options.feed(), db, options, shared: Arc::downgrade(&shared), wakeup };
        tokio::spawn(reader.run(position, rx));
        Ok(TableStream(shared))
    }

    /// The id of the last row published.
    pub fn position(&self) -> i64 {
        self.0.position.load(Ordering::Acquire)
    }

    /// Call in [`Channel::join`](fawkes_channel::Channel::join): holds the stream at a row
    /// boundary `S` and returns the replay of the socket's topic, rows with id in
    /// `(last_event_id, S]` (none without a `last_event_id`: rows from the moment of the join
    /// on). Pass the result to [`Replay::deliver`] in `after_join`; until then, or until it is
    /// dropped, nothing more is published.
    ///
    /// Without a `last_event_id` there is nothing to replay and the stream is not held: the
    /// socket is subscribed before its join reply goes out, so every row written after the
    /// client sees the reply reaches it. Joins then never wait on the reader (a database round
    /// trip per batch of joins), which would make a stream of joins as slow as the database.
    pub async fn replay(&self, socket: &SocketRef, last_event_id: Option<i64>) -> Replay {
        let _ = self.0.pubsub.get_or_init(|| socket.pubsub().clone());
        let (release, held) = oneshot::channel();
        let until = match last_event_id {
            None => self.position(),
            Some(_) => {
                let (at, reached) = oneshot::channel();
                match self.0.holds.send(Hold { at, release: held }).await {
                    Ok(()) => reached.await.unwrap_or_else(|_| self.position()),
                    Err(_) => self.position(),
                }
            }
        };
        Replay {
            stream: self.clone(),
            topic: socket.topic().to_owned(),
            after: last_event_id,
            until,
            _release: release,
        }
    }
}

/// The rows a joining channel replays; see [`TableStream::replay`]. Dropping it releases the
/// stream without replaying.
pub struct Replay {
    stream: TableStream,
    topic: String,
    after: Option<i64>,
    until: i64,
    /// Dropped when the replay is queued (or abandoned): the reader publishes again.
    _release: oneshot::Sender<()>,
}

impl fmt::Debug for Replay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Replay")
            .field("topic", &self.topic)
            .field("after", &self.after)
            .field("until", &self.until)
            .finish()
    }
}

impl Replay {
    /// Queues the replayed rows to the socket (call in `after_join`, when it is subscribed),
    /// then lets the stream publish again.
    pub async fn deliver(self, socket: &SocketRef) {
        let Some(mut after) = self.after else { return };
        let shared = &self.stream.0;
        let sql = shared.options.replay_sql();
        let limit = shared.options.batch_size;
        let pusher = socket.pusher();
        let mut backoff = Backoff::new();
        while after < self.until {
            let read: Result<Vec<ReplayRow>, sqlx::Error> = on_pool!(&shared.db, p => {
                sqlx::query_as(&sql).bind(&self.topic).bind(after).bind(self.until).bind(limit).fetch_all(p).await
            });
            let rows = match read {
                Ok(rows) => rows,
                Err(e) => {
                    tracing::warn!(stream = %shared.options.name, error = %e, "replay read failed; retrying");
                    backoff.wait().await;
                    continue;
                }
            };
            for (id, _, event, payload) in &rows {
                if let Some(broadcast) = broadcast(&self.topic, *id, event.as_deref(), payload.as_deref()) {
                    pusher.broadcast(&BroadcastFrames::new(&broadcast));
                }
            }
            match rows.last() {
                Some((id, ..)) if rows.len() as i64 == limit => after = *id,
                _ => break,
            }
        }
    }
}

/// A replayed row: id, topic, event, payload.
type ReplayRow = (i64, Option<String>, Option<String>, Option<String>);

struct Reader {
    db: Db,
    options: StreamOptions,
    feed: Feed,
    shared: std::sync::Weak<Shared>,
    wakeup: Wakeup,
}

impl Reader {
    async fn run(mut self, mut position: i64, mut holds: mpsc::Receiver<Hold>) {
        loop {
            let mut held = Vec::new();
            while let Ok(hold) = holds.try_recv() {
                held.push(hold);
            }
            self.hold(held, position).await;
            let rows = self.feed.next_batch(&self.db, position, self.options.batch_size, &self.options.name).await;
            let full = rows.len() as i64 == self.options.batch_size;
            self.wakeup.read(!rows.is_empty());
            if let Some(last) = rows.last().map(|r| r.id) {
                let Some(shared) = self.shared.upgrade() else { return };
                for row in rows {
                    self.publish(shared.pubsub.get(), row).await;
                }
                position = last;
                shared.position.store(position, Ordering::Release);
                drop(shared);
                if let Err(e) = self.db.save_cursor(&self.options.name, position).await {
                    tracing::warn!(stream = %self.options.name, error = %e, "could not save the stream cursor");
                }
            }
            if full {
                continue;
            }
            tokio::select! {
                hold = holds.recv() => match hold {
                    Some(hold) => self.hold(vec![hold], position).await,
                    None => return,
                },
                () = self.wakeup.wait() => {}
            }
        }
    }

    /// Tells each joining channel the boundary, then publishes nothing until each has queued
    /// its replay (or gave up, or [`HOLD_LIMIT`] passed).
    async fn hold(&mut self, held: Vec<Hold>, position: i64) {
        if held.is_empty() {
            return;
        }
        let mut releases = Vec::with_capacity(held.len());
        for hold in held {
            if hold.at.send(position).is_ok() {
                releases.push(hold.release);
            }
        }
        let all = async {
            for release in releases {
                let _ = release.await;
            }
        };
        if tokio::time::timeout(HOLD_LIMIT, all).await.is_err() {
            tracing::warn!(stream = %self.options.name, "a joining channel held the stream too long; publishing again");
        }
    }

    async fn publish(&mut self, pubsub: Option<&PubSub>, row: FeedRow) {
        let Some(topic) = row.a.as_deref() else {
            return self.db.dead_letter(&self.options.name, row.id, "topic is NULL").await;
        };
        let Some(broadcast) = broadcast(topic, row.id, row.b.as_deref(), row.c.as_deref()) else {
            return self.db.dead_letter(&self.options.name, row.id, "event is NULL or payload is not JSON").await;
        };
        // Local: every node runs its own reader of the same table.
        if let Some(pubsub) = pubsub {
            pubsub.local_broadcast(broadcast);
        }
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
