//! The outbox writer: what the database clients' coordinator hands over, committed in order, one
//! transaction per unit, outbox rows in multi-row inserts.

use std::sync::Arc;

use fawkes_channel::{Backoff, Frame};
use sqlx::Connection as _;
use tokio::sync::mpsc;

use crate::db::{DEAD_LETTER, Db, SAVE_CURSOR, TxConn, on_pool};

pub(crate) const CURSOR: &str = "fawkes_inbox";

/// One row of `fawkes_outbox`: a frame, or the reason the client's session closed.
#[derive(Debug)]
pub(crate) struct OutRow {
    pub(crate) client: Arc<str>,
    /// A text frame (the sessions are V2 JSON over a transport without binary frames).
    pub(crate) frame: Option<Frame>,
    pub(crate) closed: Option<String>,
}

impl OutRow {
    /// The frame as text (made valid UTF-8 when it was drained).
    fn frame_text(&self) -> Option<&str> {
        self.frame.as_ref().map(|f| std::str::from_utf8(f.as_bytes()).unwrap_or_default())
    }
}

/// A change to the durable record of a client's joined topics.
#[derive(Debug)]
pub(crate) enum TopicChange {
    Joined { client: Arc<str>, topic: String, join_ref: String, params: String },
    Left { client: Arc<str>, topic: String },
    Gone { client: Arc<str> },
}

/// Everything one transaction writes. The coordinator only hands over a unit whose inbox rows
/// (up to `cursor`) are all answered, so the unit holds their every effect and nothing of a later
/// row: committing it, or not, is all-or-nothing for each row.
#[derive(Debug, Default)]
pub(crate) struct Unit {
    pub(crate) rows: Vec<OutRow>,
    pub(crate) topics: Vec<TopicChange>,
    pub(crate) dead: Vec<(i64, String)>,
    pub(crate) cursor: Option<i64>,
}

impl Unit {
    pub(crate) fn is_empty(&self) -> bool {
        self.rows.is_empty() && self.topics.is_empty() && self.dead.is_empty() && self.cursor.is_none()
    }
}

/// Commits units in order, each retried (with backoff) until it is written. The channel is
/// bounded: while a commit runs, the coordinator can hand over one more, then it waits, and
/// while it waits it reads no inbox rows (backpressure).
pub(crate) async fn write(db: Db, mut units: mpsc::Receiver<Unit>, chunk: usize) {
    while let Some(unit) = units.recv().await {
        let mut backoff = Backoff::new();
        while let Err(e) = commit(&db, &unit, chunk).await {
            tracing::warn!(error = %e, rows = unit.rows.len(), "outbox commit failed; retrying");
            backoff.wait().await;
        }
    }
}

async fn commit(db: &Db, unit: &Unit, chunk: usize) -> Result<(), sqlx::Error> {
    on_pool!(db, pool => {
        let mut conn = TxConn::acquire(pool).await?;
        let mut tx = conn.begin().await?;
        for rows in unit.rows.chunks(chunk.max(1)) {
            InsertRows::insert_rows(&mut *tx, rows).await?;
        }
        for change in &unit.topics {
            let query = match change {
                TopicChange::Joined { client, topic, join_ref, params } => sqlx::query(
                    "INSERT INTO fawkes_client_topics (client_id, topic, join_ref, params) VALUES ($1, $2, $3, $4) \
                     ON CONFLICT (client_id, topic) DO UPDATE SET join_ref = excluded.join_ref, params = excluded.params",
                )
                .bind(&**client)
                .bind(topic)
                .bind(join_ref)
                .bind(params),
                TopicChange::Left { client, topic } => {
                    sqlx::query("DELETE FROM fawkes_client_topics WHERE client_id = $1 AND topic = $2")
                        .bind(&**client)
                        .bind(topic)
                }
                TopicChange::Gone { client } => {
                    sqlx::query("DELETE FROM fawkes_client_topics WHERE client_id = $1").bind(&**client)
                }
            };
            query.execute(&mut *tx).await?;
        }
        for (row, error) in &unit.dead {
            sqlx::query(DEAD_LETTER).bind(CURSOR).bind(row).bind(error).execute(&mut *tx).await?;
        }
        if let Some(cursor) = unit.cursor {
            sqlx::query(SAVE_CURSOR).bind(CURSOR).bind(cursor).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        conn.finish();
    });
    for (row, error) in &unit.dead {
        tracing::warn!(source = CURSOR, row, error, "row dead-lettered");
    }
    Ok(())
}

/// The one query the backends write differently: many outbox rows in one statement.
trait InsertRows {
    async fn insert_rows(&mut self, rows: &[OutRow]) -> Result<(), sqlx::Error>;
}

impl InsertRows for sqlx::SqliteConnection {
    /// A multi-row `VALUES` list (3 parameters a row, far below SQLite's limit of 32,766).
    async fn insert_rows(&mut self, rows: &[OutRow]) -> Result<(), sqlx::Error> {
        let mut sql = String::with_capacity(48 + rows.len() * 16);
        sql.push_str("INSERT INTO fawkes_outbox (client_id, frame, closed) VALUES ");
        for i in 0..rows.len() {
            let n = i * 3;
            if i > 0 {
                sql.push(',');
            }
            sql.push_str(&format!("(${},${},${})", n + 1, n + 2, n + 3));
        }
        let mut query = sqlx::query(&sql);
        for row in rows {
            query = query.bind(&*row.client).bind(row.frame_text()).bind(row.closed.as_deref());
        }
        query.execute(self).await.map(drop)
    }
}

impl InsertRows for sqlx::PgConnection {
    /// Three array parameters, unnested: one statement text whatever the row count.
    async fn insert_rows(&mut self, rows: &[OutRow]) -> Result<(), sqlx::Error> {
        let clients: Vec<&str> = rows.iter().map(|r| &*r.client).collect();
        let frames: Vec<Option<&str>> = rows.iter().map(OutRow::frame_text).collect();
        let closed: Vec<Option<&str>> = rows.iter().map(|r| r.closed.as_deref()).collect();
        sqlx::query(
            "INSERT INTO fawkes_outbox (client_id, frame, closed) \
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[])",
        )
        .bind(clients)
        .bind(frames)
        .bind(closed)
        .execute(self)
        .await
        .map(drop)
    }
}
