//! Nodes of a cluster in one process, on the machine's Redis or PostgreSQL (feature `cluster`).
//!
//! Each node is a [`PubSub`] with its own adapter and so its own backend connections, exactly as
//! separate servers would have. The backends are `FAWKES_TEST_REDIS` (default
//! `redis://127.0.0.1:6379`) and `FAWKES_TEST_POSTGRES` (default
//! `postgres://postgres@127.0.0.1:5432/test`). Unreachable, they fail the tests under `CI=true`
//! and print a loud SKIP otherwise.

use std::time::Duration;

use fawkes_channel::{Config, Endpoint, PubSub, Router};
use fawkes_pubsub_postgres::{PostgresAdapter, PostgresOptions};
use fawkes_pubsub_redis::{RedisAdapter, RedisOptions};
use serde_json::json;

use crate::TestChannel;

/// How long a cluster test waits for anything to cross between nodes.
pub const WAIT: Duration = Duration::from_secs(10);

/// A PubSub backend.
#[derive(Clone, Copy, Debug)]
pub enum Backend {
    /// Redis pub/sub.
    Redis,
    /// PostgreSQL LISTEN/NOTIFY.
    Postgres,
}

impl Backend {
    fn url(self) -> String {
        let (var, default) = match self {
            Backend::Redis => ("FAWKES_TEST_REDIS", "redis://127.0.0.1:6379"),
            Backend::Postgres => ("FAWKES_TEST_POSTGRES", "postgres://postgres@127.0.0.1:5432/test"),
        };
        std::env::var(var).unwrap_or_else(|_| default.into())
    }

    /// Two nodes of a new cluster whose backend links are up both ways, or `None` (after a loud
    /// SKIP) when the backend is unreachable.
    ///
    /// # Panics
    /// Under `CI=true` when the backend is unreachable; when no message crosses within [`WAIT`].
    pub async fn two_nodes(self) -> Option<(PubSub, PubSub)> {
        let url = self.url();
        let hostport = url.split("://").nth(1).and_then(|rest| rest.split(['/', '?']).next()).unwrap_or_default();
        let hostport = hostport.rsplit('@').next().unwrap_or(hostport).to_owned();
        if let Err(e) = tokio::net::TcpStream::connect(&hostport).await {
            assert!(std::env::var("CI").as_deref() != Ok("true"), "{self:?} unreachable at {url}: {e}");
            eprintln!("\n*** SKIP: {self:?} unreachable at {url}: {e} ***\n");
            return None;
        }
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let cluster = format!("t_kit_{}_{nanos}", std::process::id());
        let (a, b) = (self.node(&url, &cluster), self.node(&url, &cluster));
        linked(&a, &b).await;
        linked(&b, &a).await;
        Some((a, b))
    }

    fn node(self, url: &str, cluster: &str) -> PubSub {
        match self {
            Backend::Redis => PubSub::with_adapter(
                RedisAdapter::with_options(url, RedisOptions::default().cluster(cluster)).expect("a redis URL"),
            ),
            Backend::Postgres => PubSub::with_adapter(
                PostgresAdapter::with_options(url, PostgresOptions::default().cluster(cluster))
                    .expect("a postgres URL"),
            ),
        }
    }
}

/// Broadcasts probes from `from` until `to` hears one: the backend link is then up that way.
async fn linked(from: &PubSub, to: &PubSub) {
    let topic = format!("sync:{}", to.node());
    let mut sub = to.subscribe(&topic, 64);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        from.broadcast(&topic, "probe", json!({}));
        if let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(200), sub.recv()).await {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "no probe crossed between the nodes within {WAIT:?}");
    }
}

/// An endpoint with the `test:*` channel and the kit's connect callback, on node `pubsub`.
pub fn endpoint_on(pubsub: PubSub, config: Config) -> Endpoint {
    Endpoint::builder()
        .router(Router::new().channel("test:*", TestChannel::default))
        .config(config)
        .pubsub(pubsub)
        .on_connect(crate::connect)
        .build()
}
