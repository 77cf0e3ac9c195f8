//! A database as a Fawkes peer (sqlx: SQLite by default, PostgreSQL for production).
//!
//! Two things ride on it, both through the same serializer, sessions and channels as every other
//! transport:
//!
//! - **Database clients** ([`DbClients`]): each row of `fawkes_inbox` (`id`, `client_id`,
//!   `frame`) is one inbound V2 JSON frame of the logical client `client_id`; every frame the
//!   server sends that client (join replies, pushes, broadcasts, `phx_close`) becomes a row of
//!   `fawkes_outbox` (`id`, `client_id`, `frame`, `inserted_at`). When a client's session ends, a
//!   last row carries the reason in `closed`. A client that sends nothing for the endpoint's
//!   heartbeat timeout is closed like any other, so long-lived database clients insert heartbeats.
//! - **Table streams** ([`TableStream`]): rows of an application table (or query) are read in the
//!   order of an increasing id column and delivered as `event` on `topic` with payload
//!   `{"id": <row id>, "data": <payload>}` to every channel that [attached](TableStream::attach)
//!   (a channel attaches in [`Channel::after_join`](fawkes_channel::Channel::after_join)). A join
//!   with `{"last_event_id": N}` first receives every row of its topic with id > N, then live
//!   rows, with no gap and no duplicate at the seam: the database is the replay log, so this
//!   survives restarts.
//!
//! Delivery is at-least-once: a reader's cursor (`fawkes_cursors`) is saved only after its rows
//! were delivered, so a crash between the two delivers those rows again; clients dedupe by row id.
//! On PostgreSQL no row is skipped when transactions commit out of id order (see the `feed`
//! module), inserts wake readers at once through LISTEN/NOTIFY, and polling remains the safety
//! net; SQLite is polled. A row that cannot be used (a malformed frame, a payload that is not JSON)
//! is recorded in `fawkes_dead_letters` and never stalls the stream. When the database goes away,
//! readers retry with backoff and resume from their cursors.
#![forbid(unsafe_code)]

mod clients;
mod db;
mod feed;
mod stream;

pub use clients::{DbClients, DbClientsOptions};
pub use db::Db;
pub use stream::{StreamOptions, TableStream};

/// What can go wrong talking to the database.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The URL names no supported database.
    #[error("unsupported database URL {0:?} (expected sqlite:// or postgres://)")]
    UnsupportedUrl(String),
    /// The database refused or failed a query, or could not be reached.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// A migration failed.
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

/// Wait before retry `n` (1-based): 100 ms doubling to 5 s.
pub(crate) fn backoff(n: u32) -> std::time::Duration {
    std::time::Duration::from_millis(100u64.saturating_mul(1 << n.saturating_sub(1).min(6)).min(5_000))
}

/// How long an idle reader sleeps after `empty` reads in a row found nothing: `base` doubling up
/// to `max` (a notification or a request still wakes it at once).
pub(crate) fn idle_wait(base: std::time::Duration, max: std::time::Duration, empty: u32) -> std::time::Duration {
    base.saturating_mul(1 << empty.min(16)).min(max.max(base))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[test]
    fn idle_readers_back_off_to_the_cap_and_retries_grow_to_five_seconds() {
        let ms = Duration::from_millis;
        let waits: Vec<_> = (0..6).map(|n| super::idle_wait(ms(50), ms(500), n)).collect();
        assert_eq!(waits, [ms(50), ms(100), ms(200), ms(400), ms(500), ms(500)]);
        assert_eq!(super::idle_wait(ms(800), ms(500), 3), ms(800), "never below the base interval");
        assert_eq!((super::backoff(1), super::backoff(2), super::backoff(30)), (ms(100), ms(200), ms(5000)));
    }
}
