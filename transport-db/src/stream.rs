//! Rows of an application table streamed into topics, with replay from a client's last id.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use fawkes_channel::{Broadcast, BroadcastFrames, Payload, Pusher, SocketRef};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};

use crate::db::{Db, quote_ident};
use crate::feed::{Feed, FeedRow};

/// A replayed row: id, topic, event, payload.
type ReplayRow = (i64, Option<String>, Option<String>, Option<String>);
use crate::{Error, backoff, idle_wait};

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

struct Attach {
    pusher: Pusher,
    after: Option<i64>,
    done: oneshot::Sender<()>,
}

struct Shared {
    position: AtomicI64,
    attach: mpsc::Sender<Attach>,
}

/// A running table stream. Cheap to clone; the reader stops when every clone is dropped.
///
/// ```no_run
/// use fawkes_channel::{Channel, HandleIn, Payload, SocketRef};
/// use fawkes_transport_db::{Db, StreamOptions, TableStream};
/// use serde_json::{json, Value};
///
/// struct Feed { stream: TableStream, last_event_id: Option<i64> }
///
/// impl Channel for Feed {
///     async fn join(&mut self, params: Payload, _: &mut SocketRef) -> Result<Value, Value> {
///         self.last_event_id = params.as_json().and_then(|p| p["last_event_id"].as_i64());
///         Ok(json!({}))
///     }
///     async fn after_join(&mut self, socket: &mut SocketRef) {
///         self.stream.attach(socket, self.last_event_id).await;
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
        f.debug_struct("TableStream").field("position", &self.position()).finish()
    }
}

impl TableStream {
    /// Starts reading. Resumes from the saved cursor; a stream never started before begins at
    /// the table's current end (earlier rows are still replayed to joins that ask).
    pub async fn start(db: Db, options: StreamOptions) -> Result<TableStream, Error> {
        let position = match db.load_cursor(&options.name).await? {
            Some(saved) => saved,
            None => {
                let sql =
                    format!("SELECT CAST(COALESCE(MAX({}), 0) AS BIGINT) FROM {}", options.id_column, options.source);
                let end: i64 = match &db {
                    Db::Sqlite(p) => sqlx::query_scalar(&sql).fetch_one(p).await?,
                    Db::Postgres(p) => sqlx::query_scalar(&sql).fetch_one(p).await?,
                };
                db.save_cursor(&options.name, end).await?;
                end
            }
        };
        let (tx, rx) = mpsc::channel(1024);
        let shared = Arc::new(Shared { position: AtomicI64::new(position), attach: tx });
        let reader =
            Reader { db, feed: options.feed(), options, shared: Arc::downgrade(&shared), attached: HashMap::new() };
        tokio::spawn(reader.run(position, rx));
        Ok(TableStream(shared))
    }

    /// The id of the last row delivered.
    pub fn position(&self) -> i64 {
        self.0.position.load(Ordering::Acquire)
    }

    /// Delivers this stream's rows for the socket's topic to it from now on, first replaying every
    /// row with id > `last_event_id` (when given). Returns once the replay is queued.
    pub async fn attach(&self, socket: &SocketRef, last_event_id: Option<i64>) {
        let (done, served) = oneshot::channel();
        let request = Attach { pusher: socket.pusher(), after: last_event_id, done };
        if self.0.attach.send(request).await.is_ok() {
            let _ = served.await;
        }
    }
}

struct Reader {
    db: Db,
    options: StreamOptions,
    feed: Feed,
    shared: std::sync::Weak<Shared>,
    attached: HashMap<String, Vec<Pusher>>,
}

impl Reader {
    async fn run(mut self, mut position: i64, mut requests: mpsc::Receiver<Attach>) {
        let mut listener = crate::db::listener(&self.db).await;
        let mut empty = 0u32;
        loop {
            while let Ok(request) = requests.try_recv() {
                self.serve(request, position).await;
            }
            let rows = self.feed.next_batch(&self.db, position, self.options.batch_size, &self.options.name).await;
            let full = rows.len() as i64 == self.options.batch_size;
            empty = if rows.is_empty() { empty.saturating_add(1) } else { 0 };
            if let Some(last) = rows.last().map(|r| r.id) {
                for row in rows {
                    self.deliver(row).await;
                }
                position = last;
                match self.shared.upgrade() {
                    Some(shared) => shared.position.store(position, Ordering::Release),
                    None => return,
                }
                if let Err(e) = self.db.save_cursor(&self.options.name, position).await {
                    tracing::warn!(stream = %self.options.name, error = %e, "could not save the stream cursor");
                }
            }
            if full {
                continue;
            }
            tokio::select! {
                request = requests.recv() => match request {
                    Some(request) => self.serve(request, position).await,
                    None => return,
                },
                () = crate::db::notified(&mut listener) => empty = 0,
                () = tokio::time::sleep(idle_wait(self.options.poll_interval, self.options.max_idle_interval, empty)) => {}
            }
        }
    }

    /// Replays, then attaches. Runs between batches, so nothing is delivered twice or missed.
    async fn serve(&mut self, request: Attach, position: i64) {
        if let Some(mut after) = request.after {
            let sql = self.options.replay_sql();
            let topic = request.pusher.topic().to_owned();
            let limit = self.options.batch_size;
            let mut failures = 0u32;
            while after < position {
                let rows: Result<Vec<ReplayRow>, _> = match &self.db {
                    Db::Sqlite(p) => {
                        sqlx::query_as(&sql).bind(&topic).bind(after).bind(position).bind(limit).fetch_all(p).await
                    }
                    Db::Postgres(p) => {
                        sqlx::query_as(&sql).bind(&topic).bind(after).bind(position).bind(limit).fetch_all(p).await
                    }
                };
                let rows = match rows {
                    Ok(rows) => rows,
                    Err(e) => {
                        failures += 1;
                        tracing::warn!(stream = %self.options.name, error = %e, "replay read failed; retrying");
                        tokio::time::sleep(backoff(failures)).await;
                        continue;
                    }
                };
                for (id, _, event, payload) in &rows {
                    if let Some((event, payload)) = message(*id, event.as_deref(), payload.as_deref()) {
                        let broadcast = Broadcast {
                            topic: topic.clone(),
                            event: event.to_owned(),
                            payload: Payload::Json(payload),
                        };
                        request.pusher.broadcast(&BroadcastFrames::new(&broadcast));
                    }
                }
                match rows.last() {
                    Some((id, ..)) if rows.len() as i64 == limit => after = *id,
                    _ => break,
                }
            }
        }
        let topic = request.pusher.topic().to_owned();
        self.attached.entry(topic).or_default().push(request.pusher);
        let _ = request.done.send(());
    }

    async fn deliver(&mut self, row: FeedRow) {
        let Some(topic) = row.a.as_deref() else {
            return self.db.dead_letter(&self.options.name, row.id, "topic is NULL").await;
        };
        let Some((event, payload)) = message(row.id, row.b.as_deref(), row.c.as_deref()) else {
            return self.db.dead_letter(&self.options.name, row.id, "event is NULL or payload is not JSON").await;
        };
        if let Some(pushers) = self.attached.get_mut(topic) {
            let broadcast =
                Broadcast { topic: topic.to_owned(), event: event.to_owned(), payload: Payload::Json(payload) };
            let frames = BroadcastFrames::new(&broadcast);
            pushers.retain(|p| p.broadcast(&frames));
            if pushers.is_empty() {
                self.attached.remove(topic);
            }
        }
    }
}

/// `(event, {"id": id, "data": payload})`, or `None` for a row that cannot be delivered.
fn message<'a>(id: i64, event: Option<&'a str>, payload: Option<&str>) -> Option<(&'a str, Value)> {
    let data: Value = serde_json::from_str(payload?).ok()?;
    Some((event?, json!({ "id": id, "data": data })))
}
