//! The database: SQLite or PostgreSQL, with the crate's migrations applied, and every query the
//! crate runs.
//!
//! Each query is written once. [`on_pool!`] expands one query expression for whichever pool the
//! [`Db`] holds, so sqlx compiles it natively for both backends. sqlx's `Any` driver would also
//! write it once, but loses what PostgreSQL is chosen for (LISTEN, arrays for bulk inserts,
//! snapshot functions) and native types; a function generic over `sqlx::Database` needs a screen
//! of trait bounds per query. Where the backends truly differ (LISTEN/NOTIFY, the bulk insert,
//! the visibility of uncommitted ids), the code says so with a plain `match`.

use std::str::FromStr as _;
use std::time::Duration;

use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};

use crate::Error;

/// A connection pool to the database a transport reads and writes. Cheap to clone.
#[derive(Debug, Clone)]
pub enum Db {
    /// SQLite (a file, created if missing).
    Sqlite(SqlitePool),
    /// PostgreSQL.
    Postgres(PgPool),
}

/// Evaluates `$body` with `$pool` bound to the pool of `$db`, whichever backend it is.
macro_rules! on_pool {
    ($db:expr, $pool:ident => $body:expr) => {
        match $db {
            $crate::db::Db::Sqlite($pool) => $body,
            $crate::db::Db::Postgres($pool) => $body,
        }
    };
}
pub(crate) use on_pool;

/// A pooled connection for one transaction: dropped before [`TxConn::finish`], it is closed
/// rather than given back to the pool.
///
/// sqlx's `Pool::begin` on PostgreSQL, when its future is dropped while the `BEGIN` is in flight
/// (a task aborted, as a stopping [`DbClients`](crate::DbClients) aborts its reader and writer;
/// a `select!` or a timeout), hands the connection back to the pool still inside the
/// transaction: the next borrower's statements run in it, unseen by others, and are lost with
/// it (sqlx issue #4393). Every transaction of this crate begins on one of these instead.
pub(crate) struct TxConn<DB: sqlx::Database> {
    conn: sqlx::pool::PoolConnection<DB>,
    finished: bool,
}

impl<DB: sqlx::Database> TxConn<DB> {
    pub(crate) async fn acquire(pool: &sqlx::Pool<DB>) -> Result<TxConn<DB>, sqlx::Error> {
        Ok(TxConn { conn: pool.acquire().await?, finished: false })
    }

    /// The transaction ended (committed or rolled back): the connection may go back to the pool.
    pub(crate) fn finish(mut self) {
        self.finished = true;
    }
}

impl<DB: sqlx::Database> std::ops::Deref for TxConn<DB> {
    type Target = DB::Connection;

    fn deref(&self) -> &DB::Connection {
        &self.conn
    }
}

impl<DB: sqlx::Database> std::ops::DerefMut for TxConn<DB> {
    fn deref_mut(&mut self) -> &mut DB::Connection {
        &mut self.conn
    }
}

impl<DB: sqlx::Database> Drop for TxConn<DB> {
    fn drop(&mut self) {
        if !self.finished {
            self.conn.close_on_drop();
        }
    }
}

impl Db {
    /// Connects to `url` (`sqlite://path.db`, `sqlite::memory:`, `postgres://...`) and applies
    /// the crate's migrations (tables `fawkes_inbox`, `fawkes_outbox`, `fawkes_cursors`,
    /// `fawkes_dead_letters`, `fawkes_client_topics`, `fawkes_events`).
    pub async fn connect(url: &str) -> Result<Db, Error> {
        let db = Db::open(url).await?;
        db.migrate().await?;
        Ok(db)
    }

    /// [`Db::open`], but a PostgreSQL pool connects when first used (SQLite opens at once).
    pub async fn open_lazy(url: &str) -> Result<Db, Error> {
        if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            let pool =
                PgPoolOptions::new().max_connections(8).acquire_timeout(Duration::from_secs(5)).connect_lazy(url)?;
            return Ok(Db::Postgres(pool));
        }
        Db::open(url).await
    }

    /// Connects to `url` without applying the migrations (for a store that creates only its
    /// own tables, such as [`SqlHistory`](crate::SqlHistory)).
    pub async fn open(url: &str) -> Result<Db, Error> {
        Ok(if url.starts_with("sqlite:") {
            let options = SqliteConnectOptions::from_str(url)?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .busy_timeout(Duration::from_secs(5));
            Db::Sqlite(SqlitePoolOptions::new().max_connections(4).connect_with(options).await?)
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            let pool =
                PgPoolOptions::new().max_connections(8).acquire_timeout(Duration::from_secs(5)).connect(url).await?;
            Db::Postgres(pool)
        } else {
            return Err(Error::UnsupportedUrl(url.to_owned()));
        })
    }

    /// Applies the crate's migrations (idempotent).
    pub async fn migrate(&self) -> Result<(), Error> {
        // Two directories: the DDL differs (AUTOINCREMENT / BIGSERIAL, triggers).
        match self {
            Db::Sqlite(pool) => sqlx::migrate!("./migrations/sqlite").run(pool).await?,
            Db::Postgres(pool) => sqlx::migrate!("./migrations/postgres").run(pool).await?,
        }
        Ok(())
    }

    /// On PostgreSQL, makes inserts into `table` wake stream pollers at once (LISTEN/NOTIFY);
    /// without it they are found by polling. A no-op on SQLite.
    pub async fn notify_on(&self, table: &str) -> Result<(), Error> {
        if let Db::Postgres(pool) = self {
            let ident = quote_ident(table);
            let trigger = quote_ident(&format!("{table}_fawkes_notify"));
            sqlx::query(&format!("DROP TRIGGER IF EXISTS {trigger} ON {ident}")).execute(pool).await?;
            sqlx::query(&format!(
                "CREATE TRIGGER {trigger} AFTER INSERT ON {ident} FOR EACH STATEMENT EXECUTE FUNCTION fawkes_notify()"
            ))
            .execute(pool)
            .await?;
        }
        Ok(())
    }

    pub(crate) fn is_postgres(&self) -> bool {
        matches!(self, Db::Postgres(_))
    }

    /// The saved position of reader `name`, or, for a reader never started, the current end of
    /// `source` (saved, so the reader begins there).
    pub(crate) async fn start_cursor(&self, name: &str, source: &str, id_column: &str) -> Result<i64, Error> {
        let sql = "SELECT position FROM fawkes_cursors WHERE name = $1";
        let saved: Option<i64> = on_pool!(self, p => sqlx::query_scalar(sql).bind(name).fetch_optional(p).await?);
        if let Some(saved) = saved {
            return Ok(saved);
        }
        let sql = format!("SELECT CAST(COALESCE(MAX({id_column}), 0) AS BIGINT) FROM {source}");
        let end: i64 = on_pool!(self, p => sqlx::query_scalar(&sql).fetch_one(p).await?);
        on_pool!(self, p => sqlx::query(SAVE_CURSOR).bind(name).bind(end).execute(p).await.map(drop))?;
        Ok(end)
    }

    pub(crate) async fn save_cursor(&self, name: &str, position: i64) -> Result<(), Error> {
        on_pool!(self, p => sqlx::query(SAVE_CURSOR).bind(name).bind(position).execute(p).await.map(drop))?;
        Ok(())
    }

    pub(crate) async fn dead_letter(&self, source: &str, row_id: i64, error: &str) {
        let result = on_pool!(self, p => sqlx::query(DEAD_LETTER).bind(source).bind(row_id).bind(error).execute(p).await.map(drop));
        tracing::warn!(source, row_id, error, "row dead-lettered");
        if let Err(e) = result {
            tracing::error!(source, row_id, error = %e, "could not record a dead letter");
        }
    }
}

pub(crate) const SAVE_CURSOR: &str = "INSERT INTO fawkes_cursors (name, position) VALUES ($1, $2) \
                                      ON CONFLICT (name) DO UPDATE SET position = excluded.position";

/// Records a row once: a row read again after a crash is not recorded twice.
pub(crate) const DEAD_LETTER: &str = "INSERT INTO fawkes_dead_letters (source, row_id, error) SELECT $1, $2, $3 \
                                      WHERE NOT EXISTS (SELECT 1 FROM fawkes_dead_letters WHERE source = $1 AND row_id = $2)";

/// Quotes an SQL identifier (`schema.table` keeps its dot).
pub(crate) fn quote_ident(name: &str) -> String {
    name.split('.').map(|part| format!("\"{}\"", part.replace('"', "\"\""))).collect::<Vec<_>>().join(".")
}

#[cfg(test)]
mod tests {
    use sqlx::Connection as _;
    use sqlx::postgres::PgConnection;

    use super::*;

    /// A transaction left open on a [`TxConn`] (as sqlx leaves one when `BEGIN` is cancelled in
    /// flight) ends with its connection: the pool's next borrower does not write into it.
    #[tokio::test]
    async fn a_connection_dropped_inside_its_transaction_does_not_go_back_to_the_pool() {
        let url =
            std::env::var("FAWKES_TEST_POSTGRES").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
        let pool = match PgPoolOptions::new().max_connections(1).connect(&url).await {
            Ok(pool) => pool,
            Err(e) if std::env::var("CI").as_deref() == Ok("true") => panic!("PostgreSQL unreachable at {url}: {e}"),
            Err(e) => return eprintln!("\n*** SKIP: PostgreSQL unreachable at {url}: {e} ***\n"),
        };
        let table = format!("fawkes_txconn_{}", rand::random::<u32>());
        sqlx::query(&format!("CREATE TABLE {table} (v int)")).execute(&pool).await.expect("create");
        {
            let mut conn = TxConn::acquire(&pool).await.expect("acquire");
            // Opened behind sqlx's back, as a cancelled `begin` leaves it.
            sqlx::query("BEGIN").execute(&mut *conn).await.expect("begin");
            sqlx::query(&format!("INSERT INTO {table} VALUES (1)")).execute(&mut *conn).await.expect("insert");
        }
        // The pool's one connection is the next borrower's: autocommit, seen by everyone at once.
        sqlx::query(&format!("INSERT INTO {table} VALUES (2)")).execute(&pool).await.expect("insert");
        let mut other = PgConnection::connect(&url).await.expect("connect");
        let seen: Vec<i32> =
            sqlx::query_scalar(&format!("SELECT v FROM {table} ORDER BY v")).fetch_all(&mut other).await.expect("read");
        // Closing the pool ends whatever transaction its connection is in, so the table can go.
        pool.close().await;
        sqlx::query(&format!("DROP TABLE {table}")).execute(&mut other).await.expect("drop");
        assert_eq!(seen, [2], "the next borrower's insert is committed, the abandoned one is not");
    }
}
