//! Reading rows in cursor order without ever skipping one.
//!
//! On PostgreSQL, ids come from a sequence when a row is inserted, but rows become visible when
//! their transaction commits: a reader can see id 6 while id 5 is still uncommitted. So the reader
//! delivers only the run of ids that has no hole. At a hole it notes the snapshot it read with,
//! and re-reads once every transaction that was running then has ended: the missing id has then
//! committed (and is delivered in order) or never will (rolled back, and is passed over). A long
//! transaction delays the stream; it never loses a row. SQLite serialises writers, so ids commit
//! in order and there is no hole to wait on.

use fawkes_channel::Backoff;
use sqlx::Connection as _;

use crate::Error;
use crate::db::{Db, TxConn, on_pool};

/// One row: its cursor value and three text columns (what they mean is the reader's business).
#[derive(Debug, Clone)]
pub(crate) struct FeedRow {
    pub(crate) id: i64,
    pub(crate) a: Option<String>,
    pub(crate) b: Option<String>,
    pub(crate) c: Option<String>,
}

/// A `SELECT` over a table or query by an increasing id column.
#[derive(Debug, Clone)]
pub(crate) struct Feed {
    /// `SELECT id, a, b, c FROM source WHERE id > $1 [AND extra] ORDER BY id LIMIT $2`
    select: String,
    /// A hole waiting for the transactions that were running when it was seen (PostgreSQL).
    hole: Option<Hole>,
}

#[derive(Debug, Clone, Copy)]
struct Hole {
    /// The first missing id.
    at: i64,
    /// `xmax` of the snapshot that saw it: every transaction that could own it is below this.
    xmax: i64,
}

impl Feed {
    /// `source` is a table name or a parenthesised query with an alias; the columns are SQL
    /// expressions (trusted configuration, never peer input).
    pub(crate) fn new(source: &str, id: &str, a: &str, b: &str, c: &str) -> Feed {
        Feed {
            select: format!(
                "SELECT {id} AS fawkes_id, CAST({a} AS TEXT), CAST({b} AS TEXT), CAST({c} AS TEXT) \
                 FROM {source} WHERE {id} > $1 ORDER BY {id} LIMIT $2"
            ),
            hole: None,
        }
    }

    /// [`Feed::read`], retried with backoff while the database fails: the reader resumes from
    /// the same position when it comes back, so nothing is lost.
    pub(crate) async fn next_batch(&mut self, db: &Db, position: i64, limit: i64, reader: &str) -> Vec<FeedRow> {
        let mut backoff = Backoff::new();
        let mut failures = 0u32;
        loop {
            match self.read(db, position, limit).await {
                Ok(rows) => return rows,
                Err(e) => {
                    failures += 1;
                    tracing::warn!(reader, error = %e, failures, "read failed; retrying");
                    backoff.wait().await;
                }
            }
        }
    }

    /// Rows after `position`, in order, that are safe to deliver now.
    pub(crate) async fn read(&mut self, db: &Db, position: i64, limit: i64) -> Result<Vec<FeedRow>, Error> {
        if let (Some(hole), Db::Postgres(pool)) = (self.hole, db) {
            // Still waiting for the transactions that might own the missing id?
            let xmin: i64 = sqlx::query_scalar("SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint")
                .fetch_one(pool)
                .await?;
            if xmin < hole.xmax {
                return Ok(Vec::new());
            }
        }
        let (rows, xmax): (Vec<Tuple>, Option<i64>) = on_pool!(db, pool => {
            let mut conn = TxConn::acquire(pool).await?;
            let mut tx = conn.begin().await?;
            // PostgreSQL: the snapshot's xmax tells which writers a hole could belong to.
            let xmax = if db.is_postgres() {
                sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY").execute(&mut *tx).await?;
                let sql = "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint";
                Some(sqlx::query_scalar(sql).fetch_one(&mut *tx).await?)
            } else {
                None
            };
            let rows = sqlx::query_as(&self.select).bind(position).bind(limit).fetch_all(&mut *tx).await?;
            tx.commit().await?;
            conn.finish();
            (rows, xmax)
        });
        let rows = rows.into_iter().map(FeedRow::from);
        Ok(match xmax {
            Some(xmax) => self.contiguous(rows, position, xmax),
            // SQLite serialises writers: ids commit in order, there is no hole to wait on.
            None => rows.collect(),
        })
    }

    /// The rows up to the first hole; remembers the hole to wait it out.
    fn contiguous(&mut self, rows: impl Iterator<Item = FeedRow>, position: i64, xmax: i64) -> Vec<FeedRow> {
        let waited_out = self.hole.take();
        let mut safe = Vec::new();
        let mut expected = position + 1;
        for row in rows {
            // The first hole of this read may be one already waited out: its writers have ended,
            // so what is still missing there was rolled back.
            let passable = safe.is_empty() && waited_out.is_some_and(|h| h.at == expected);
            if row.id != expected && !passable {
                tracing::debug!(missing = expected, next = row.id, "hole in the ids: waiting for its writers");
                self.hole = Some(Hole { at: expected, xmax });
                break;
            }
            expected = row.id + 1;
            safe.push(row);
        }
        safe
    }
}

type Tuple = (i64, Option<String>, Option<String>, Option<String>);

impl From<Tuple> for FeedRow {
    fn from((id, a, b, c): Tuple) -> FeedRow {
        FeedRow { id, a, b, c }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(ids: &[i64]) -> impl Iterator<Item = FeedRow> + '_ {
        ids.iter().map(|&id| FeedRow { id, a: None, b: None, c: None })
    }

    fn ids(rows: Vec<FeedRow>) -> Vec<i64> {
        rows.into_iter().map(|r| r.id).collect()
    }

    #[test]
    fn a_hole_holds_back_what_follows_until_waited_out() {
        let mut feed = Feed::new("t", "id", "a", "b", "c");
        assert_eq!(ids(feed.contiguous(rows(&[1, 2, 4, 5]), 0, 100)), [1, 2]);
        assert_eq!(feed.hole.map(|h| (h.at, h.xmax)), Some((3, 100)));
        // Waited out and 3 never appeared (rolled back): pass it, up to the next hole.
        assert_eq!(ids(feed.contiguous(rows(&[4, 5, 7]), 2, 120)), [4, 5]);
        assert_eq!(feed.hole.map(|h| h.at), Some(6));
        // 6 committed meanwhile: all in order.
        assert_eq!(ids(feed.contiguous(rows(&[6, 7]), 5, 130)), [6, 7]);
        assert!(feed.hole.is_none());
    }
}
