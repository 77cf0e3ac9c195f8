//! A database as a Fawkes peer (sqlx: SQLite by default, PostgreSQL for production).
//!
//! Two things ride on it, both through the same serializer, sessions and channels as every other
//! transport:
//!
//! - **Database clients** ([`DbClients`], the transport): each row of `fawkes_inbox` (`id`,
//!   `client_id`, `frame`) is one inbound V2 JSON frame of the logical client `client_id`; every
//!   frame the server sends that client (join replies, pushes, broadcasts, `phx_close`) becomes a
//!   row of `fawkes_outbox` (`id`, `client_id`, `frame`, `inserted_at`), in order per client.
//!   When a client's session ends, a last row carries the reason in `closed`. A client that sends
//!   nothing for the endpoint's heartbeat timeout is closed like any other, so long-lived
//!   database clients insert heartbeats.
//!
//!   **Guarantee: each committed inbox row is answered exactly once, across crashes.** The inbox
//!   cursor moves only in the transaction that writes the outbox rows of every row up to it
//!   (replies, and broadcasts to every database client), so after a crash and restart no
//!   committed row is unanswered and none is answered twice. A row no session can take (a NULL
//!   column, a malformed frame, a refused connection) is recorded in `fawkes_dead_letters`
//!   instead, once; so are rows of a client closed before it answered them. The topics each
//!   client joined are kept in `fawkes_client_topics` (same transaction), and a restart joins
//!   them again: the client's next rows are handled as before the crash, and a join the
//!   application now refuses is answered with its refusal (a second reply to the join's ref).
//!   "Answered" means the row's `phx_reply`, its topic's `phx_close`/`phx_error`, or, for a
//!   message the channel does not reply to, [`DbClientsOptions::reply_timeout`]. Frames no row
//!   is waiting for (what such a handler sends later, timers, other transports' broadcasts) are
//!   written with the next transaction, without that guarantee: a crash can lose the ones not
//!   committed yet, as a dropped connection would. Outbox rows are
//!   written in batches (one transaction per unit of work, multi-row inserts); when the writer
//!   is behind, the reader stops reading inbox rows instead of closing database clients.
//! - **Table streams** ([`TableStream`]): a source. Rows of an application table (or query) are
//!   read in the order of an increasing id column and published through the endpoint's
//!   [`PubSub`](fawkes_channel::PubSub) as `event` on `topic` with payload
//!   `{"id": <row id>, "data": <payload>}`, to every subscriber of the topic. A join with
//!   `{"last_event_id": N}` first receives every row of its topic with id > N, then live rows,
//!   with no gap and no duplicate at the seam ([`TableStream::recover`]): the table is the
//!   history of the stream's topics, recovered through the same path as any topic with history
//!   (`SocketRef::recover`), so this survives restarts.
//! - **Durable history** ([`SqlHistory`]): a [`HistoryStore`](fawkes_channel::HistoryStore) in
//!   SQLite or PostgreSQL for topics whose broadcasts come from the application, so a client
//!   recovers what it missed across a server restart, and on a shared PostgreSQL through any
//!   node.
//!
//! Every query is written once for both backends (see the `db` module). A table stream's cursor
//! (`fawkes_cursors`) is saved after its rows were published, so a crash between the two
//! publishes those rows again (clients dedupe by row id). On PostgreSQL no row is skipped when
//! transactions commit out of id order (see the `feed` module), inserts wake readers at once
//! through LISTEN/NOTIFY (one loop, the `wake` module), and polling remains the safety net;
//! SQLite is polled. A row that cannot be used (a malformed frame, a payload that is not JSON) is
//! recorded in `fawkes_dead_letters` and never stalls the stream. When the database goes away,
//! readers retry with [`Backoff`](fawkes_channel::Backoff) and resume from their cursors.
#![forbid(unsafe_code)]

mod clients;
mod db;
mod feed;
mod history;
mod outbox;
mod stream;
mod wake;

pub use clients::{DbClients, DbClientsOptions};
pub use db::Db;
pub use history::SqlHistory;
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
    /// A row read back is not what was written (a history payload that is not JSON, say).
    #[error("corrupt row: {0}")]
    Corrupt(String),
}
