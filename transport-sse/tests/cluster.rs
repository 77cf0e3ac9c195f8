//! SSE across nodes through the real backends: a client's stream on one node, its POSTs on
//! another (a round-robin load balancer, no sticky sessions).
//!
//! Each test makes two nodes in this process, each with its own PubSub, adapter and endpoint, as
//! separate servers would have. The backends are the machine's: `FAWKES_TEST_REDIS` (default
//! `redis://127.0.0.1:6379`) and `FAWKES_TEST_POSTGRES` (default
//! `postgres://postgres@127.0.0.1:5432/test`). Unreachable, they fail the tests under `CI=true`
//! and print a loud SKIP otherwise.

mod common;

use std::time::Duration;

use common::{Stream, open, post};
use fawkes_channel::{Endpoint, PubSub, Router, Subscription};
use fawkes_pubsub_postgres::{PostgresAdapter, PostgresOptions};
use fawkes_pubsub_redis::{RedisAdapter, RedisOptions};
use fawkes_testkit::TestChannel;
use fawkes_transport_sse::{SseOptions, SseService};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug)]
enum Backend {
    Redis,
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

    /// The backend's URL if it accepts connections; `None` (after a loud SKIP) otherwise.
    async fn available(self) -> Option<String> {
        let url = self.url();
        let hostport = url.split("://").nth(1).and_then(|rest| rest.split(['/', '?']).next()).unwrap_or_default();
        let hostport = hostport.rsplit('@').next().unwrap_or(hostport).to_owned();
        match tokio::net::TcpStream::connect(&hostport).await {
            Ok(_) => Some(url),
            Err(e) if std::env::var("CI").as_deref() == Ok("true") => panic!("{self:?} unreachable at {url}: {e}"),
            Err(e) => {
                eprintln!("\n*** SKIP: {self:?} unreachable at {url}: {e} ***\n");
                None
            }
        }
    }

    fn node(self, url: &str, cluster: &str) -> PubSub {
        match self {
            Backend::Redis => PubSub::with_adapter(
                RedisAdapter::with_options(url, RedisOptions::default().cluster(cluster)).expect("redis url"),
            ),
            Backend::Postgres => PubSub::with_adapter(
                PostgresAdapter::with_options(url, PostgresOptions::default().cluster(cluster)).expect("postgres url"),
            ),
        }
    }
}

/// One node: its endpoint on `pubsub`, serving SSE with the cluster's shared secret.
fn sse_node(pubsub: PubSub) -> SseService {
    let endpoint = Endpoint::builder()
        .router(Router::new().channel("test:*", TestChannel::default))
        .pubsub(pubsub)
        .on_connect(fawkes_testkit::connect)
        .build();
    SseService::with_options(endpoint, SseOptions::default().secret("shared by the cluster"))
}

/// Broadcasts probes from `from` until `to` hears one, so the backend link is up that way.
async fn linked(from: &PubSub, to: &PubSub, topic: &str) {
    let mut sub: Subscription = to.subscribe(topic, 64);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        from.broadcast(topic, "probe", json!({}));
        if let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(200), sub.recv()).await {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "no probe crossed between the nodes within {WAIT:?}");
    }
}

async fn event(stream: &mut Stream, what: &str) -> (Option<String>, Value) {
    match tokio::time::timeout(WAIT, stream.event()).await {
        Ok(Some(e)) => (e.name.clone(), serde_json::from_str(&e.data).unwrap_or(Value::String(e.data))),
        Ok(None) => panic!("{what}: the stream ended"),
        Err(_) => panic!("{what}: nothing within {WAIT:?}"),
    }
}

async fn stream_on_one_node_posts_on_another(backend: Backend) {
    let Some(url) = backend.available().await else { return };
    let cluster = format!("t_sse_{}_{:?}", std::process::id(), std::time::SystemTime::now());
    let cluster: String = cluster.chars().filter(char::is_ascii_alphanumeric).collect();
    let (a, b) = (backend.node(&url, &cluster), backend.node(&url, &cluster));
    linked(&a, &b, "sync:ab").await;
    linked(&b, &a, "sync:ba").await;
    let (node_a, node_b) = (sse_node(a), sse_node(b));

    let mut stream = open(&node_a, "vsn=2.0.0").await.expect("the stream opens on node A");
    let token = stream.token.clone();
    let join = json!(["1", "1", "test:cross", "phx_join", {}]).to_string();
    assert_eq!(post(&node_b, &token, &[join]).await, 200, "node B hands the join to node A");
    let (_, reply) = event(&mut stream, "the join reply").await;
    assert_eq!((&reply[1], &reply[3], &reply[4]["status"]), (&json!("1"), &json!("phx_reply"), &json!("ok")));

    let push = json!(["1", "2", "test:cross", "broadcast", {"event": "hello", "payload": {"n": 1}}]).to_string();
    assert_eq!(post(&node_b, &token, &[push.clone()]).await, 200);
    let mut seen = vec![event(&mut stream, "the broadcast").await.1, event(&mut stream, "its reply").await.1];
    seen.sort_by_key(|m| m[3].as_str().map(str::to_owned));
    assert_eq!(seen[0], json!([null, null, "test:cross", "hello", {"n": 1}]));
    assert_eq!((&seen[1][1], &seen[1][3]), (&json!("2"), &json!("phx_reply")));
    assert_eq!(post(&node_b, &token, &[push]).await, 200, "a retried POST through node B");
    assert_eq!((node_a.sessions(), node_b.sessions()), (1, 0), "node B opened no session");

    // Errors come back from the owner as they would locally.
    assert_eq!(post(&node_b, "forged.token", &["[]".into()]).await, 410);
    assert_eq!(post(&node_b, &token, &["[not json".into()]).await, 400, "node A's answer to a malformed line");
    let (name, why) = event(&mut stream, "the close event").await;
    assert_eq!(name.as_deref(), Some("phx_socket_close"));
    assert!(why.as_str().is_some_and(|why| why.starts_with("malformed frame")), "{why}");
    let heartbeat = json!([null, "3", "phoenix", "heartbeat", {}]).to_string();
    assert_eq!(post(&node_b, &token, &[heartbeat]).await, 410, "the session ended on node A");
}

#[tokio::test]
async fn redis_sse_stream_on_one_node_posts_on_another() {
    stream_on_one_node_posts_on_another(Backend::Redis).await;
}

#[tokio::test]
async fn postgres_sse_stream_on_one_node_posts_on_another() {
    stream_on_one_node_posts_on_another(Backend::Postgres).await;
}
