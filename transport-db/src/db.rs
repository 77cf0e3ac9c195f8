//! The database: SQLite or PostgreSQL, with the crate's migrations applied.

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

impl Db {
    /// Connects to `url` (`sqlite://path.db`, `sqlite::memory:`, `postgres://...`) and applies
    /// the crate's migrations (tables `fawkes_inbox`, `fawkes_outbox`, `fawkes_cursors`,
    /// `fawkes_dead_letters`, `fawkes_events`).
    pub async fn connect(url: &str) -> Result<Db, Error> {
        let db = if url.starts_with("sqlite:") {
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
        };
        db.migrate().await?;
        Ok(db)
    }

    /// Applies the crate's migrations (idempotent).
    pub async fn migrate(&self) -> Result<(), Error> {
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

    pub(crate) async fn load_cursor(&self, name: &str) -> Result<Option<i64>, Error> {
        let sql = "SELECT position FROM fawkes_cursors WHERE name = $1";
        Ok(match self {
            Db::Sqlite(p) => sqlx::query_scalar(sql).bind(name).fetch_optional(p).await?,
            Db::Postgres(p) => sqlx::query_scalar(sql).bind(name).fetch_optional(p).await?,
        })
    }

    pub(crate) async fn save_cursor(&self, name: &str, position: i64) -> Result<(), Error> {
        let sql = "INSERT INTO fawkes_cursors (name, position) VALUES ($1, $2) \
                   ON CONFLICT (name) DO UPDATE SET position = excluded.position";
        match self {
            Db::Sqlite(p) => sqlx::query(sql).bind(name).bind(position).execute(p).await.map(|_| ())?,
            Db::Postgres(p) => sqlx::query(sql).bind(name).bind(position).execute(p).await.map(|_| ())?,
        }
        Ok(())
    }

    pub(crate) async fn dead_letter(&self, source: &str, row_id: i64, error: &str) {
        let sql = "INSERT INTO fawkes_dead_letters (source, row_id, error) VALUES ($1, $2, $3)";
        let result = match self {
            Db::Sqlite(p) => sqlx::query(sql).bind(source).bind(row_id).bind(error).execute(p).await.map(drop),
            Db::Postgres(p) => sqlx::query(sql).bind(source).bind(row_id).bind(error).execute(p).await.map(drop),
        };
        tracing::warn!(source, row_id, error, "row dead-lettered");
        if let Err(e) = result {
            tracing::error!(source, row_id, error = %e, "could not record a dead letter");
        }
    }
}

/// Quotes an SQL identifier (`schema.table` keeps its dot).
pub(crate) fn quote_ident(name: &str) -> String {
    name.split('.').map(|part| format!("\"{}\"", part.replace('"', "\"\""))).collect::<Vec<_>>().join(".")
}

/// A LISTEN on `fawkes_changes` (PostgreSQL), or `None` where there is none (SQLite, or the
/// listener could not connect: polling still finds every row).
pub(crate) async fn listener(db: &Db) -> Option<sqlx::postgres::PgListener> {
    let Db::Postgres(pool) = db else { return None };
    let mut listener = match sqlx::postgres::PgListener::connect_with(pool).await {
        Ok(listener) => listener,
        Err(e) => {
            tracing::warn!(error = %e, "LISTEN unavailable; polling only");
            return None;
        }
    };
    match listener.listen("fawkes_changes").await {
        Ok(()) => Some(listener),
        Err(e) => {
            tracing::warn!(error = %e, "LISTEN failed; polling only");
            None
        }
    }
}

/// Completes on the next notification. A broken listener reconnects on its next `recv`; until
/// then this waits a little, so a database that is down is not spun on.
pub(crate) async fn notified(listener: &mut Option<sqlx::postgres::PgListener>) {
    match listener {
        Some(l) => {
            if let Err(e) = l.recv().await {
                tracing::debug!(error = %e, "LISTEN connection lost");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        None => std::future::pending().await,
    }
}
