//! A Fawkes [`Adapter`] over PostgreSQL `LISTEN`/`NOTIFY`, so several Fawkes nodes share
//! broadcasts, Presence and long-poll sessions through the database they already use.
//!
//! Every node listens on the cluster's channel (`fawkes_<cluster>`) and on its own
//! (`fawkes_<cluster>_<node id>`). A message travels base64-encoded as the notification's payload.
//! PostgreSQL refuses payloads of 8000 bytes or more, so a bigger message is written to the table
//! `fawkes_pubsub_spill` and the notification carries `@<row id>`; receivers read the row. Rows
//! older than five minutes are deleted. Messages queued together go out in one statement (one
//! round trip), in order.
//!
//! Both the listener and the publisher reconnect with backoff (100 ms doubling to 5 s), and the
//! PubSub logs and counts the backend going away and coming back
//! (`PubSub::stats`, [`ClusterStats`](fawkes_pubsub_core::ClusterStats)). What is notified while a node's listener
//! is disconnected is lost for that node (PostgreSQL keeps nothing for a listener that is not
//! connected); Presence repairs itself from heartbeats afterwards.
//!
//! TLS: the URL's `sslmode` says whether to use it, as with libpq: `require` encrypts without
//! checking the certificate, `verify-ca` checks that a trusted root signed it, `verify-full` also
//! checks that it names the host connected to (rustls; no OpenSSL). The roots are Mozilla's, or
//! those in the PEM file `sslrootcert` names (a managed database's CA):
//! `postgres://app@db.example.com/app?sslmode=verify-full&sslrootcert=ca.pem`.
//! [`PostgresAdapter::check`] connects once and tells a refused certificate
//! ([`PostgresAdapterError::Tls`]) from an unreachable server.
//!
//! ```no_run
//! use fawkes_channel::PubSub;
//! use fawkes_pubsub_postgres::PostgresAdapter;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let pubsub = PubSub::with_adapter(PostgresAdapter::new("postgres://postgres@127.0.0.1/app")?);
//! pubsub.broadcast("room:lobby", "new_msg", serde_json::json!({"body": "hi from every node"}));
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

use std::fmt;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use fawkes_pubsub_core::{Adapter, Backoff, NodeId, Outgoing, OutgoingQueue, RemoteInbound};
use futures_util::future::BoxFuture;
use sqlx::PgPool;
use sqlx::postgres::{PgListener, PgPoolOptions};
use tokio::sync::mpsc;

/// Most messages sent in one statement.
const BATCH: usize = 256;
/// PostgreSQL's limit is 8000 bytes; anything at or above it goes through the spill table.
const MAX_NOTIFY: usize = 7999;
/// How long spilled messages are kept for receivers to read.
const SPILL_KEEP_SECS: i64 = 300;

/// Settings of a [`PostgresAdapter`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct PostgresOptions {
    /// The cluster's name: nodes with the same name on the same database form one cluster. Only
    /// ASCII letters, digits and `_` are kept, and it is cut to 24 characters (channel names are
    /// at most 63 bytes).
    pub cluster: String,
    /// Messages kept while PostgreSQL is unreachable; more are dropped (and counted).
    pub queue: usize,
}

impl Default for PostgresOptions {
    fn default() -> PostgresOptions {
        PostgresOptions { cluster: "fawkes".into(), queue: 65_536 }
    }
}

impl PostgresOptions {
    /// Sets [`PostgresOptions::cluster`].
    pub fn cluster(mut self, name: impl Into<String>) -> Self {
        self.cluster = name.into();
        self
    }
    /// Sets [`PostgresOptions::queue`].
    pub fn queue(mut self, messages: usize) -> Self {
        self.queue = messages.max(1);
        self
    }
}

/// Why a [`PostgresAdapter`] could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PostgresAdapterError {
    /// The URL is not a PostgreSQL URL.
    #[error("invalid PostgreSQL URL: {0}")]
    Url(#[from] sqlx::Error),
    /// The TLS handshake failed: the server's certificate is not signed by a trusted root, does
    /// not name the host connected to, or the server does not speak TLS while `sslmode` asks for it.
    #[error("TLS refused: {0}")]
    Tls(String),
    /// The server could not be reached or refused the connection.
    #[error("unreachable: {0}")]
    Unreachable(sqlx::Error),
}

/// Carries a PubSub's messages through PostgreSQL. Create it, give it to
/// `fawkes_channel::PubSub::with_adapter` inside a tokio runtime; it
/// connects in the background.
pub struct PostgresAdapter {
    url: String,
    pool: PgPool,
    channel: String,
    queue: OutgoingQueue,
}

impl fmt::Debug for PostgresAdapter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresAdapter").field("channel", &self.channel).finish_non_exhaustive()
    }
}

impl PostgresAdapter {
    /// An adapter for the database at `url`, cluster `"fawkes"`.
    pub fn new(url: &str) -> Result<PostgresAdapter, PostgresAdapterError> {
        PostgresAdapter::with_options(url, PostgresOptions::default())
    }

    /// An adapter with its own cluster name and queue size.
    pub fn with_options(url: &str, options: PostgresOptions) -> Result<PostgresAdapter, PostgresAdapterError> {
        let pool = PgPoolOptions::new().max_connections(2).acquire_timeout(Duration::from_secs(2)).connect_lazy(url)?;
        let cluster: String =
            options.cluster.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '_').take(24).collect();
        Ok(PostgresAdapter {
            url: url.to_owned(),
            pool,
            channel: format!("fawkes_{}", cluster.to_ascii_lowercase()),
            queue: OutgoingQueue::new(options.queue),
        })
    }
}

impl PostgresAdapter {
    /// Connects once and runs `SELECT 1`: `Ok` when the server answers,
    /// [`PostgresAdapterError::Tls`] when TLS is refused (a setting to fix rather than an outage
    /// to wait out), [`PostgresAdapterError::Unreachable`] otherwise. The adapter itself needs no
    /// such call: it connects and reconnects in the background.
    pub async fn check(&self) -> Result<(), PostgresAdapterError> {
        match sqlx::query("SELECT 1").execute(&self.pool).await {
            Ok(_) => Ok(()),
            Err(sqlx::Error::Tls(e)) => Err(PostgresAdapterError::Tls(e.to_string())),
            // rustls's refusals arrive as I/O errors of the handshake.
            Err(sqlx::Error::Io(e)) if e.get_ref().is_some_and(|inner| inner.is::<rustls::Error>()) => {
                Err(PostgresAdapterError::Tls(e.to_string()))
            }
            Err(e) => Err(PostgresAdapterError::Unreachable(e)),
        }
    }
}

impl Adapter for PostgresAdapter {
    fn start(&self, inbound: RemoteInbound) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            tracing::error!("PostgresAdapter started outside a tokio runtime: it stays disconnected");
            return;
        };
        let direct = format!("{}_{}", self.channel, inbound.node());
        rt.spawn(listener(self.url.clone(), self.pool.clone(), [self.channel.clone(), direct], inbound.clone()));
        if let Some(rx) = self.queue.start(&inbound) {
            rt.spawn(publisher(self.pool.clone(), self.channel.clone(), rx, inbound));
        }
    }

    fn broadcast(&self, message: Bytes) {
        self.queue.push(Outgoing::All(message));
    }

    fn send(&self, node: NodeId, message: Bytes) {
        self.queue.push(Outgoing::To(node, message));
    }

    fn flush(&self) -> BoxFuture<'_, ()> {
        self.queue.flush()
    }
}

/// Listens and hands every notification to the PubSub, reconnecting until the PubSub is gone.
async fn listener(url: String, pool: PgPool, channels: [String; 2], inbound: RemoteInbound) {
    let mut backoff = Backoff::new();
    let mut failures = 0u32;
    while !inbound.is_closed() {
        let listening = async {
            let mut listener = PgListener::connect(&url).await?;
            listener.listen_all(channels.iter().map(String::as_str)).await?;
            Ok::<_, sqlx::Error>(listener)
        };
        match listening.await {
            Ok(mut listener) => {
                inbound.connected(true);
                backoff.reset();
                failures = 0;
                let mut check = tokio::time::interval(Duration::from_secs(5));
                loop {
                    tokio::select! {
                        next = listener.try_recv() => match next {
                            Ok(Some(n)) => match read(&pool, n.payload()).await {
                                Ok(message) => inbound.deliver(message),
                                Err(e) => tracing::warn!(error = %e, "postgres notification unreadable; ignored"),
                            },
                            Ok(None) => break,
                            Err(e) => {
                                tracing::debug!(error = %e, "postgres listener failed");
                                break;
                            }
                        },
                        _ = check.tick() => if inbound.is_closed() { return },
                    }
                }
                inbound.connected(false);
            }
            Err(e) => {
                failures += 1;
                if failures == 1 {
                    tracing::warn!(error = %e, "postgres LISTEN failed; retrying with backoff");
                } else {
                    tracing::debug!(error = %e, failures, "postgres LISTEN failed again");
                }
            }
        }
        backoff.wait().await;
    }
}

/// A notification's message: inline base64, or `@id` of a spilled row.
async fn read(pool: &PgPool, payload: &str) -> Result<Bytes, String> {
    match payload.strip_prefix('@') {
        Some(id) => {
            let id: i64 = id.parse().map_err(|_| format!("bad spill id {id:?}"))?;
            let body: Vec<u8> = sqlx::query_scalar("SELECT body FROM fawkes_pubsub_spill WHERE id = $1")
                .bind(id)
                .fetch_one(pool)
                .await
                .map_err(|e| format!("spilled message {id}: {e}"))?;
            Ok(body.into())
        }
        None => STANDARD.decode(payload).map(Bytes::from).map_err(|e| e.to_string()),
    }
}

/// Sends queued messages, a batch per statement. Messages wait in the queue while PostgreSQL is
/// away; a statement that fails is not retried (it may have committed before the error came).
async fn publisher(pool: PgPool, channel: String, mut rx: mpsc::Receiver<Outgoing>, inbound: RemoteInbound) {
    let mut backoff = Backoff::new();
    while let Err(e) = prepare(&pool).await {
        if inbound.is_closed() {
            return;
        }
        tracing::debug!(error = %e, "postgres publisher cannot prepare its table; retrying");
        backoff.wait().await;
    }
    let mut batch = Vec::with_capacity(BATCH);
    let mut last_prune = tokio::time::Instant::now();
    let mut healthy = true;
    loop {
        if rx.recv_many(&mut batch, BATCH).await == 0 {
            return;
        }
        // After a failure, wait for the database before sending (what queues meanwhile waits).
        let mut backoff = Backoff::new();
        while !healthy {
            match sqlx::query("SELECT 1").execute(&pool).await {
                Ok(_) => healthy = true,
                Err(e) => {
                    tracing::debug!(error = %e, "postgres publisher waiting for the database");
                    backoff.wait().await;
                }
            }
        }
        let mut channels = Vec::with_capacity(batch.len());
        let mut payloads = Vec::with_capacity(batch.len());
        let mut spilled = 0;
        let mut flushes = Vec::new();
        for out in batch.drain(..) {
            let (to, bytes) = match out {
                Outgoing::All(bytes) => (channel.clone(), bytes),
                Outgoing::To(node, bytes) => (format!("{channel}_{node}"), bytes),
                Outgoing::Flush(done) => {
                    flushes.push(done);
                    continue;
                }
            };
            let text = STANDARD.encode(&bytes);
            if text.len() <= MAX_NOTIFY {
                channels.push(to);
                payloads.push(text);
            } else {
                // In order: what is queued before goes first.
                healthy &= send(&pool, &mut channels, &mut payloads, &inbound).await;
                spilled += 1;
                let spill = sqlx::query(
                    "WITH s AS (INSERT INTO fawkes_pubsub_spill (body) VALUES ($2) RETURNING id) \
                     SELECT pg_notify($1, '@' || id) FROM s",
                )
                .bind(&to)
                .bind(bytes.as_ref())
                .execute(&pool)
                .await;
                if let Err(e) = spill {
                    healthy = false;
                    inbound.dropped(1);
                    tracing::warn!(error = %e, bytes = bytes.len(), "postgres spill failed; message dropped");
                }
            }
        }
        healthy &= send(&pool, &mut channels, &mut payloads, &inbound).await;
        for done in flushes {
            let _ = done.send(());
        }
        if spilled > 0 && last_prune.elapsed() > Duration::from_secs(60) {
            last_prune = tokio::time::Instant::now();
            let prune =
                sqlx::query("DELETE FROM fawkes_pubsub_spill WHERE created_at < now() - make_interval(secs => $1)")
                    .bind(SPILL_KEEP_SECS as f64)
                    .execute(&pool)
                    .await;
            if let Err(e) = prune {
                tracing::debug!(error = %e, "postgres spill prune failed");
            }
        }
    }
}

/// Notifies every (channel, payload) pair in one statement, in order.
async fn send(pool: &PgPool, channels: &mut Vec<String>, payloads: &mut Vec<String>, inbound: &RemoteInbound) -> bool {
    if payloads.is_empty() {
        return true;
    }
    let started = tokio::time::Instant::now();
    let sent = sqlx::query("SELECT pg_notify(c, p) FROM unnest($1::text[], $2::text[]) AS m(c, p)")
        .bind(&*channels)
        .bind(&*payloads)
        .execute(pool)
        .await;
    let ok = match sent {
        Ok(_) => {
            inbound.published(payloads.len() as u64, started.elapsed());
            true
        }
        Err(e) => {
            inbound.dropped(payloads.len() as u64);
            tracing::warn!(error = %e, dropped = payloads.len(), "postgres notify failed");
            false
        }
    };
    channels.clear();
    payloads.clear();
    ok
}

/// Creates the spill table once per database; concurrent nodes serialise on an advisory lock.
async fn prepare(pool: &PgPool) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(7466417572)").execute(&mut *tx).await?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS fawkes_pubsub_spill (\
           id bigserial PRIMARY KEY, body bytea NOT NULL, created_at timestamptz NOT NULL DEFAULT now())",
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await
}
