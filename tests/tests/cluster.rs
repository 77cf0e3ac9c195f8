//! PubSub across nodes through the real backends: Redis pub/sub and PostgreSQL LISTEN/NOTIFY.
//!
//! Each test makes several PubSubs in this process, each with its own adapter and so its own
//! backend connections, exactly as separate nodes would have. The backends are the machine's:
//! `FAWKES_TEST_REDIS` (default `redis://127.0.0.1:6379`) and `FAWKES_TEST_POSTGRES` (default
//! `postgres://postgres@127.0.0.1:5432/test`). Unreachable, they fail the tests under `CI=true`
//! and print a loud SKIP otherwise. The restart tests run a private `redis-server` and cut
//! PostgreSQL connections by application name, so they never disturb anything else.

use std::time::Duration;

use bytes::Bytes;
use fawkes::pubsub_postgres::{PostgresAdapter, PostgresOptions};
use fawkes::pubsub_redis::{RedisAdapter, RedisOptions};
use fawkes::{Payload, PubSub, RequestError, Subscription};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug)]
enum Backend {
    Redis,
    Postgres,
}

impl Backend {
    fn url(self) -> String {
        match self {
            Backend::Redis => std::env::var("FAWKES_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into()),
            Backend::Postgres => std::env::var("FAWKES_TEST_POSTGRES")
                .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into()),
        }
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

fn cluster_name(test: &str) -> String {
    format!("t_{test}_{}_{}", std::process::id(), fawkes_rand())
}

fn fawkes_rand() -> u32 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos())
}

async fn next(sub: &mut Subscription, what: &str) -> (String, Payload) {
    match tokio::time::timeout(WAIT, sub.recv()).await {
        Ok(Some(b)) => (b.event.clone(), b.payload.clone()),
        Ok(None) => panic!("{what}: subscription ended"),
        Err(_) => panic!("{what}: nothing within {WAIT:?}"),
    }
}

/// Broadcasts probes from `from` until `to` hears one: both nodes' backend links are then up
/// (subscriptions are made in the background after start). Drains the probes.
async fn linked(from: &PubSub, to: &mut Subscription, topic: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut n = 0;
    loop {
        n += 1;
        from.broadcast(topic, "probe", json!({ "n": n }));
        if let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(200), to.recv()).await {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no probe crossed between the nodes within {WAIT:?}");
    }
    // Probes still in flight are followed by a marker; drop everything up to it.
    from.broadcast(topic, "probes_done", json!({}));
    loop {
        let (event, _) = next(to, "the end of the probes").await;
        if event == "probes_done" {
            return;
        }
    }
}

async fn broadcasts_reach_every_node_once_in_order(backend: Backend) {
    let Some(url) = backend.available().await else { return };
    let cluster = cluster_name("once");
    let nodes: Vec<PubSub> = (0..3).map(|_| backend.node(&url, &cluster)).collect();
    for (i, node) in nodes.iter().enumerate().skip(1) {
        let topic = format!("sync:{i}");
        linked(&nodes[0], &mut node.subscribe(&topic, 64), &topic).await;
    }
    let mut subs: Vec<Subscription> = nodes.iter().map(|n| n.subscribe("room:1", 4096)).collect();

    const N: u64 = 1000;
    for seq in 0..N {
        nodes[0].broadcast("room:1", "msg", json!({ "seq": seq }));
    }
    // A big payload (over PostgreSQL's 8000-byte NOTIFY limit), a binary one, then a barrier.
    let big = "x".repeat(100_000);
    nodes[0].broadcast("room:1", "big", json!({ "text": big }));
    nodes[0].broadcast("room:1", "bin", Payload::Binary(Bytes::from_static(&[0, 1, 2, 255])));
    nodes[0].broadcast("room:1", "end", json!({}));
    for (i, sub) in subs.iter_mut().enumerate() {
        for seq in 0..N {
            let (event, payload) = next(sub, &format!("node {i}, seq {seq}")).await;
            assert_eq!(event, "msg", "node {i}");
            assert_eq!(payload.as_json().and_then(|p| p.get("seq")).and_then(Value::as_u64), Some(seq), "node {i}");
        }
        let (event, payload) = next(sub, "the big payload").await;
        assert_eq!(event, "big");
        assert_eq!(payload.as_json().and_then(|p| p["text"].as_str()).map(str::len), Some(100_000));
        let (event, payload) = next(sub, "the binary payload").await;
        assert_eq!((event.as_str(), payload), ("bin", Payload::Binary(Bytes::from_static(&[0, 1, 2, 255]))));
        // Nothing twice: the barrier comes right after.
        assert_eq!(next(sub, "the barrier").await.0, "end", "node {i}");
    }
    let stats = nodes[1].stats();
    assert!(stats.connected && stats.received >= N + 3, "{stats:?}");
    assert_eq!((stats.dropped, stats.malformed), (0, 0), "{stats:?}");
}

#[tokio::test]
async fn redis_broadcasts_reach_every_node_once_in_order() {
    broadcasts_reach_every_node_once_in_order(Backend::Redis).await;
}

#[tokio::test]
async fn postgres_broadcasts_reach_every_node_once_in_order() {
    broadcasts_reach_every_node_once_in_order(Backend::Postgres).await;
}

async fn requests_reach_one_node(backend: Backend) {
    let Some(url) = backend.available().await else { return };
    let cluster = cluster_name("rpc");
    let (a, b, c) = (backend.node(&url, &cluster), backend.node(&url, &cluster), backend.node(&url, &cluster));
    let served = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let _guards: Vec<_> = [&b, &c]
        .into_iter()
        .map(|node| {
            let served = served.clone();
            let me = node.node();
            node.serve("echo", move |from, body: Bytes| {
                served.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                async move { Bytes::from(format!("{me} answers {from}: {}", String::from_utf8_lossy(&body))) }
            })
        })
        .collect();
    let mut sub = b.subscribe("sync", 16);
    linked(&a, &mut sub, "sync").await;
    let big = "y".repeat(50_000);
    let answer = a.request(b.node(), "echo", Bytes::from(big.clone()), WAIT).await.expect("answered");
    assert_eq!(answer, Bytes::from(format!("{} answers {}: {big}", b.node(), a.node())));
    assert_eq!(served.load(std::sync::atomic::Ordering::SeqCst), 1, "only the addressed node answers");

    let missing = a.request(b.node(), "nothing here", Bytes::new(), WAIT).await;
    assert_eq!(missing, Err(RequestError::NoService { node: b.node(), service: "nothing here".into() }));
    let gone = fawkes::NodeId::from_u64(42).expect("nonzero");
    let timeout = a.request(gone, "echo", Bytes::new(), Duration::from_millis(300)).await;
    assert_eq!(timeout, Err(RequestError::Timeout(gone)));
}

#[tokio::test]
async fn redis_requests_reach_one_node() {
    requests_reach_one_node(Backend::Redis).await;
}

#[tokio::test]
async fn postgres_requests_reach_one_node() {
    requests_reach_one_node(Backend::Postgres).await;
}

/// A private redis-server on a free port, killed when dropped.
struct PrivateRedis {
    child: std::process::Child,
    port: u16,
}

impl PrivateRedis {
    async fn start(port: u16) -> PrivateRedis {
        let child = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server runs (it is installed with Redis)");
        let deadline = tokio::time::Instant::now() + WAIT;
        // A port has no event to await: poll until it accepts.
        while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            assert!(tokio::time::Instant::now() < deadline, "redis-server did not start on {port}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        PrivateRedis { child, port }
    }

    fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// While the backend is away, local subscribers are served at once; the link comes back by
/// itself and says so in its stats.
async fn survives_backend_loss(backend: Backend, url: &str, cut: impl AsyncFnOnce(), restore: impl AsyncFnOnce()) {
    let cluster = cluster_name("loss");
    let (a, b) = (backend.node(url, &cluster), backend.node(url, &cluster));
    let mut remote = b.subscribe("sync", 64);
    linked(&a, &mut remote, "sync").await;
    let mut local = a.subscribe("room:1", 64);

    cut().await;
    assert_eq!(a.broadcast("room:1", "during", json!({})), 1, "the local subscriber is reached");
    assert_eq!(next(&mut local, "a local broadcast while the backend is away").await.0, "during");
    restore().await;

    linked(&a, &mut remote, "sync").await;
    let (sa, sb) = (a.stats(), b.stats());
    assert!(sa.disconnects >= 1 && sb.disconnects >= 1, "{sa:?} {sb:?}");
    assert!(sa.connected && sb.connected, "{sa:?} {sb:?}");
}

#[tokio::test]
async fn redis_restart_is_survived() {
    if Backend::Redis.available().await.is_none() {
        return;
    }
    let port = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind").local_addr().expect("addr").port();
    let redis = std::sync::Arc::new(std::sync::Mutex::new(Some(PrivateRedis::start(port).await)));
    let url = format!("redis://127.0.0.1:{port}");
    let (r1, r2) = (redis.clone(), redis.clone());
    survives_backend_loss(
        Backend::Redis,
        &url,
        async move || {
            if let Some(r) = r1.lock().expect("lock").take() {
                r.kill();
            }
        },
        async move || {
            let restarted = PrivateRedis::start(port).await;
            assert_eq!(restarted.port, port);
            *r2.lock().expect("lock") = Some(restarted);
        },
    )
    .await;
}

#[tokio::test]
async fn postgres_connection_loss_is_survived() {
    let Some(url) = Backend::Postgres.available().await else { return };
    let app = cluster_name("loss_app");
    let node_url = format!("{url}{}application_name={app}", if url.contains('?') { '&' } else { '?' });
    let admin = sqlx::PgPool::connect(&url).await.expect("admin connection");
    survives_backend_loss(
        Backend::Postgres,
        &node_url,
        async || {
            let cut: i64 = sqlx::query_scalar(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1",
            )
            .bind(&app)
            .fetch_one(&admin)
            .await
            .expect("terminate");
            assert!(cut >= 2, "cut {cut} connections");
        },
        async || {},
    )
    .await;
}
