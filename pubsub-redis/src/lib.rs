//! A Fawkes [`Adapter`] over Redis pub/sub, so several Fawkes nodes share broadcasts, Presence
//! and long-poll sessions through a Redis server they all reach.
//!
//! Every node subscribes to the cluster's channel (`{cluster}`) and to its own
//! (`{cluster}:{node id}`); broadcasts go to the first, requests to one node to the second. Two
//! tasks do the work: a subscriber that hands what arrives to the PubSub, and a publisher that
//! sends what the PubSub queued, many messages per round trip (a pipeline). Both reconnect with
//! backoff (100 ms doubling to 5 s) and the PubSub logs and counts the backend going away and
//! coming back (`PubSub::stats`, [`ClusterStats`](fawkes_pubsub_core::ClusterStats)).
//!
//! Delivery: in steady state every node gets every broadcast once. Redis pub/sub keeps nothing
//! for a subscriber that is disconnected, so what is published while a node's subscription is
//! down is lost for that node; Presence repairs itself from heartbeats afterwards. Messages
//! queued while the publisher is disconnected (up to [`RedisOptions::queue`]) are sent once it
//! is back; past that they are dropped and counted.
//!
//! History: [`RedisHistory`] keeps topics' histories in Redis Streams for the whole cluster (one
//! position space, any node recovers any client), and puts every node's subscribers in the
//! stream's order.
//!
//! TLS: a `rediss://` URL connects over TLS (rustls; no OpenSSL), verifying the server's
//! certificate and host name against the system's root certificates, or against the PEM roots
//! given with [`RedisOptions::tls_ca`] (a private CA, as managed Redis services use).
//! [`RedisAdapter::check`] connects once and tells a refused certificate
//! ([`RedisAdapterError::Tls`]) from an unreachable server.
//!
//! ```no_run
//! use fawkes_channel::PubSub;
//! use fawkes_pubsub_redis::RedisAdapter;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let pubsub = PubSub::with_adapter(RedisAdapter::new("redis://127.0.0.1:6379")?);
//! pubsub.broadcast("room:lobby", "new_msg", serde_json::json!({"body": "hi from every node"}));
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

mod history;

pub use history::{RedisHistory, RedisHistoryError};

use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use fawkes_pubsub_core::{Adapter, Backoff, NodeId, Outgoing, OutgoingQueue, RemoteInbound};
use futures_util::StreamExt as _;
use futures_util::future::BoxFuture;
use tokio::sync::mpsc;

/// Most messages sent in one pipeline.
const BATCH: usize = 256;

/// Settings of a [`RedisAdapter`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RedisOptions {
    /// The cluster's name: nodes with the same name (on the same Redis server) form one cluster.
    /// It prefixes every Redis channel used.
    pub cluster: String,
    /// Messages kept while Redis is unreachable; more are dropped (and counted).
    pub queue: usize,
    /// PEM root certificates that a `rediss://` server's certificate must chain to, instead of
    /// the system's.
    pub tls_ca: Option<Vec<u8>>,
}

impl Default for RedisOptions {
    fn default() -> RedisOptions {
        RedisOptions { cluster: "fawkes".into(), queue: 65_536, tls_ca: None }
    }
}

impl RedisOptions {
    /// Sets [`RedisOptions::cluster`].
    pub fn cluster(mut self, name: impl Into<String>) -> Self {
        self.cluster = name.into();
        self
    }
    /// Sets [`RedisOptions::queue`].
    pub fn queue(mut self, messages: usize) -> Self {
        self.queue = messages.max(1);
        self
    }
    /// Sets [`RedisOptions::tls_ca`]: the PEM text of one or more CA certificates.
    pub fn tls_ca(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.tls_ca = Some(pem.into());
        self
    }
}

/// Why a [`RedisAdapter`] could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RedisAdapterError {
    /// The URL is not a Redis URL, or the TLS settings cannot be used with it.
    #[error("invalid Redis URL: {0}")]
    Url(#[from] redis::RedisError),
    /// [`RedisOptions::tls_ca`] was given for a `redis://` URL, which does not use TLS.
    #[error("a TLS CA was given but the URL is redis://, without TLS; use rediss://")]
    CaWithoutTls,
    /// The TLS handshake failed: the server's certificate is not signed by a trusted root, does
    /// not name the host connected to, or has expired.
    #[error("TLS refused: {0}")]
    Tls(String),
    /// The server could not be reached or did not answer.
    #[error("unreachable: {0}")]
    Unreachable(redis::RedisError),
}

/// Carries a PubSub's messages through Redis. Create it, give it to
/// `fawkes_channel::PubSub::with_adapter` inside a tokio runtime; it
/// connects in the background.
pub struct RedisAdapter {
    client: redis::Client,
    options: RedisOptions,
    queue: OutgoingQueue,
}

impl fmt::Debug for RedisAdapter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisAdapter").field("cluster", &self.options.cluster).finish_non_exhaustive()
    }
}

/// A client for `url` with the options' TLS roots: what the adapter and [`RedisHistory`] connect with.
pub(crate) fn client(url: &str, options: &RedisOptions) -> Result<redis::Client, RedisAdapterError> {
    // The one rustls crypto provider of this process, unless the application chose one.
    let _ = rustls::crypto::ring::default_provider().install_default();
    Ok(match &options.tls_ca {
        None => redis::Client::open(url)?,
        Some(_) if !url.starts_with("rediss://") => return Err(RedisAdapterError::CaWithoutTls),
        Some(pem) => redis::Client::build_with_tls(
            url,
            redis::TlsCertificates { client_tls: None, root_cert: Some(pem.clone()) },
        )?,
    })
}

impl RedisAdapter {
    /// An adapter for the Redis server at `url` (`redis://host:port`), cluster `"fawkes"`.
    pub fn new(url: &str) -> Result<RedisAdapter, RedisAdapterError> {
        RedisAdapter::with_options(url, RedisOptions::default())
    }

    /// An adapter with its own cluster name and queue size.
    pub fn with_options(url: &str, options: RedisOptions) -> Result<RedisAdapter, RedisAdapterError> {
        let client = client(url, &options)?;
        let queue = OutgoingQueue::new(options.queue);
        Ok(RedisAdapter { client, options, queue })
    }

    /// Connects once and sends `PING`: `Ok` when the server answers, [`RedisAdapterError::Tls`]
    /// when the TLS handshake is refused (a setting to fix rather than an outage to wait out),
    /// [`RedisAdapterError::Unreachable`] otherwise. The adapter itself needs no such call: it
    /// connects and reconnects in the background.
    pub async fn check(&self) -> Result<(), RedisAdapterError> {
        let ping = async {
            let mut conn = self.client.get_multiplexed_async_connection().await?;
            redis::cmd("PING").query_async::<()>(&mut conn).await
        };
        ping.await.map_err(|e| match tls_error(&e) {
            Some(tls) => RedisAdapterError::Tls(tls),
            None => RedisAdapterError::Unreachable(e),
        })
    }
}

/// The TLS failure behind a connection error, if it is one. The redis crate keeps the cause
/// behind an `Arc`, out of reach of a downcast, so its text is read: rustls's messages.
fn tls_error(e: &redis::RedisError) -> Option<String> {
    const TLS: [&str; 6] = [
        "invalid peer certificate",
        "received fatal alert",
        "peer is incompatible",
        "peer misbehaved",
        "peer sent no certificates",
        "invalid dns name",
    ];
    let text = e.to_string();
    TLS.iter().any(|t| text.contains(t)).then_some(text)
}

impl Adapter for RedisAdapter {
    fn start(&self, inbound: RemoteInbound) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            tracing::error!("RedisAdapter started outside a tokio runtime: it stays disconnected");
            return;
        };
        let broadcast = self.options.cluster.clone();
        let direct = format!("{}:{}", self.options.cluster, inbound.node());
        rt.spawn(subscriber(self.client.clone(), vec![broadcast.clone(), direct], inbound.clone()));
        if let Some(rx) = self.queue.start(&inbound) {
            rt.spawn(publisher(self.client.clone(), broadcast, rx, inbound));
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

/// Subscribes and hands every message to the PubSub, reconnecting until the PubSub is gone.
async fn subscriber(client: redis::Client, channels: Vec<String>, inbound: RemoteInbound) {
    let mut backoff = Backoff::new();
    let mut failures = 0u32;
    while !inbound.is_closed() {
        let subscribed = async {
            let mut pubsub = client.get_async_pubsub().await?;
            for channel in &channels {
                pubsub.subscribe(channel).await?;
            }
            Ok::<_, redis::RedisError>(pubsub)
        };
        match subscribed.await {
            Ok(pubsub) => {
                inbound.connected(true);
                backoff.reset();
                failures = 0;
                let mut messages = pubsub.into_on_message();
                let mut check = tokio::time::interval(Duration::from_secs(5));
                loop {
                    tokio::select! {
                        msg = messages.next() => match msg {
                            Some(msg) => inbound.deliver(Bytes::copy_from_slice(msg.get_payload_bytes())),
                            None => break,
                        },
                        _ = check.tick() => if inbound.is_closed() { return },
                    }
                }
                inbound.connected(false);
            }
            Err(e) => {
                failures += 1;
                if failures == 1 {
                    tracing::warn!(error = %e, "redis subscription failed; retrying with backoff");
                } else {
                    tracing::debug!(error = %e, failures, "redis subscription failed again");
                }
            }
        }
        backoff.wait().await;
    }
}

/// Sends queued messages in pipelines. Messages wait in the queue while Redis is away; a
/// pipeline that fails midway is not retried (some of it may have been published, and a retry
/// would deliver that part twice).
async fn publisher(client: redis::Client, broadcast: String, mut rx: mpsc::Receiver<Outgoing>, inbound: RemoteInbound) {
    let mut batch = Vec::with_capacity(BATCH);
    let mut backoff = Backoff::new();
    loop {
        let mut conn = match client.get_multiplexed_async_connection().await {
            Ok(conn) => {
                backoff.reset();
                conn
            }
            Err(e) => {
                if inbound.is_closed() {
                    return;
                }
                tracing::debug!(error = %e, "redis publisher cannot connect; retrying");
                backoff.wait().await;
                continue;
            }
        };
        loop {
            if rx.recv_many(&mut batch, BATCH).await == 0 {
                return;
            }
            let taken = tokio::time::Instant::now();
            let mut pipe = redis::pipe();
            let mut flushes = Vec::new();
            let mut sent = 0;
            for out in batch.drain(..) {
                match out {
                    Outgoing::All(bytes) => pipe.publish(&broadcast, bytes.as_ref()).ignore(),
                    Outgoing::To(node, bytes) => pipe.publish(format!("{broadcast}:{node}"), bytes.as_ref()).ignore(),
                    Outgoing::Flush(done) => {
                        flushes.push(done);
                        continue;
                    }
                };
                sent += 1;
            }
            let result = if sent > 0 { pipe.query_async::<()>(&mut conn).await } else { Ok(()) };
            for done in flushes {
                let _ = done.send(());
            }
            if result.is_ok() && sent > 0 {
                inbound.published(sent, taken.elapsed());
            }
            if let Err(e) = result {
                inbound.dropped(sent);
                tracing::warn!(error = %e, dropped = sent, "redis publish failed; reconnecting");
                break;
            }
        }
    }
}
