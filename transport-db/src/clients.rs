//! Database clients: inbox rows in, outbox rows out.

use std::collections::HashMap;
use std::time::Duration;

use fawkes_channel::{CloseReason, ConnectInfo, Endpoint, Frame, Outbound, Session};

use fawkes_channel::Backoff;

use crate::Error;
use crate::db::{Db, on_pool};
use crate::feed::Feed;
use crate::wake::Wakeup;

const CURSOR: &str = "fawkes_inbox";

/// How the inbox is read.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct DbClientsOptions {
    /// Inbox rows read per query.
    pub batch_size: i64,
    /// How often to look for new rows (on PostgreSQL, NOTIFY wakes the reader sooner).
    pub poll_interval: Duration,
    /// While nothing arrives, the interval doubles up to this.
    pub max_idle_interval: Duration,
}

impl Default for DbClientsOptions {
    fn default() -> DbClientsOptions {
        DbClientsOptions {
            batch_size: 500,
            poll_interval: Duration::from_millis(50),
            max_idle_interval: Duration::from_millis(500),
        }
    }
}

impl DbClientsOptions {
    /// Sets [`DbClientsOptions::poll_interval`].
    pub fn poll_interval(mut self, d: Duration) -> Self {
        self.poll_interval = d;
        self
    }
}

/// Serves database clients of an endpoint: reads `fawkes_inbox`, writes `fawkes_outbox`. Stops
/// when dropped.
#[derive(Debug)]
pub struct DbClients {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for DbClients {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl DbClients {
    /// Starts serving. Resumes after the last inbox row handled before (a first start begins at
    /// the inbox's current end).
    pub async fn start(db: Db, endpoint: Endpoint, options: DbClientsOptions) -> Result<DbClients, Error> {
        let position = db.start_cursor(CURSOR, "fawkes_inbox", "id").await?;
        let inbox = Inbox {
            db,
            endpoint,
            feed: Feed::new("fawkes_inbox", "id", "client_id", "frame", "NULL"),
            options,
            sessions: HashMap::new(),
        };
        Ok(DbClients { task: tokio::spawn(inbox.run(position)) })
    }
}

struct Inbox {
    db: Db,
    endpoint: Endpoint,
    feed: Feed,
    options: DbClientsOptions,
    sessions: HashMap<String, Session>,
}

impl Inbox {
    async fn run(mut self, mut position: i64) {
        let mut wakeup = Wakeup::new(&self.db, self.options.poll_interval, self.options.max_idle_interval).await;
        loop {
            let rows = self.feed.next_batch(&self.db, position, self.options.batch_size, CURSOR).await;
            let full = rows.len() as i64 == self.options.batch_size;
            wakeup.read(!rows.is_empty());
            if let Some(last) = rows.last().map(|r| r.id) {
                for row in rows {
                    match (row.a, row.b) {
                        (Some(client), Some(frame)) => self.handle(row.id, client, frame).await,
                        _ => self.db.dead_letter(CURSOR, row.id, "client_id or frame is NULL").await,
                    }
                }
                position = last;
                if let Err(e) = self.db.save_cursor(CURSOR, position).await {
                    tracing::warn!(error = %e, "could not save the inbox cursor");
                }
            }
            self.sessions.retain(|_, s| !s.is_closed());
            if !full {
                wakeup.wait().await;
            }
        }
    }

    async fn handle(&mut self, row_id: i64, client: String, frame: String) {
        if self.sessions.get(&client).is_none_or(Session::is_closed) {
            let mut info = ConnectInfo::new("db", false).with_query(Some("vsn=2.0.0"));
            info.params.insert("client_id".into(), client.clone());
            match self.endpoint.connect(info).await {
                Ok(session) => {
                    tokio::spawn(write_outbox(self.db.clone(), client.clone(), session.outbound()));
                    self.sessions.insert(client.clone(), session);
                }
                Err(e) => return self.db.dead_letter(CURSOR, row_id, &format!("connect refused: {e}")).await,
            }
        }
        let Some(session) = self.sessions.get_mut(&client) else { return };
        if let Err(reason) = session.handle_frame(Frame::Text(frame.into())).await {
            self.db.dead_letter(CURSOR, row_id, &reason.to_string()).await;
            self.sessions.remove(&client);
        }
    }
}

/// Writes a client's outbound frames as outbox rows, in order; a row is retried until written.
async fn write_outbox(db: Db, client: String, mut outbound: Outbound) {
    let mut frames = Vec::new();
    let closed = loop {
        match outbound.recv_many(&mut frames, 256).await {
            Ok(_) => {
                let texts: Vec<String> =
                    frames.drain(..).map(|f| String::from_utf8_lossy(f.as_bytes()).into_owned()).collect();
                insert_until_written(&db, &client, Rows::Frames(&texts)).await;
            }
            Err(reason) => break reason,
        }
    };
    if closed != CloseReason::TransportClosed {
        insert_until_written(&db, &client, Rows::Closed(&closed.to_string())).await;
    }
}

enum Rows<'a> {
    Frames(&'a [String]),
    Closed(&'a str),
}

async fn insert_until_written(db: &Db, client: &str, rows: Rows<'_>) {
    let mut backoff = Backoff::new();
    while let Err(e) = insert(db, client, &rows).await {
        tracing::warn!(client, error = %e, "outbox write failed; retrying");
        backoff.wait().await;
    }
}

async fn insert(db: &Db, client: &str, rows: &Rows<'_>) -> Result<(), sqlx::Error> {
    on_pool!(db, pool => {
        let mut tx = pool.begin().await?;
        match rows {
            Rows::Frames(frames) => {
                for frame in frames.iter() {
                    sqlx::query("INSERT INTO fawkes_outbox (client_id, frame) VALUES ($1, $2)")
                        .bind(client)
                        .bind(frame)
                        .execute(&mut *tx)
                        .await?;
                }
            }
            Rows::Closed(reason) => {
                sqlx::query("INSERT INTO fawkes_outbox (client_id, closed) VALUES ($1, $2)")
                    .bind(client)
                    .bind(reason)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        tx.commit().await
    })
}
