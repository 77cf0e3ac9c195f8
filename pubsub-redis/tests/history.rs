//! `RedisHistory` on the machine's Redis (`FAWKES_TEST_REDIS`, default `redis://127.0.0.1:6379`;
//! unreachable, the tests fail under `CI=true` and print a loud SKIP otherwise): two nodes, each a
//! PubSub with its own adapter and store on one cluster name (random per test), and sockets
//! driven in memory. Publish on A, recover on B; two publishers, one order on every node; a
//! wiped stream is not recovered; an unreachable Redis answers "not recovered" and is counted.

use std::time::Duration;

use fawkes_channel::{
    Channel, ConnectInfo, Endpoint, Frame, HandleIn, HistoryOptions, Outbound, Payload, Position, PubSub, Router,
    Session, SocketRef,
};
use fawkes_pubsub_redis::{RedisAdapter, RedisHistory, RedisOptions};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(10);

/// The Redis URL, or `None` (after a loud SKIP) when nothing answers there.
async fn redis_url() -> Option<String> {
    let url = std::env::var("FAWKES_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let client = redis::Client::open(url.as_str()).expect("a Redis URL");
    match tokio::time::timeout(Duration::from_secs(3), client.get_multiplexed_async_connection()).await {
        Ok(Ok(_)) => Some(url),
        outcome => {
            let why = match outcome {
                Ok(Err(e)) => e.to_string(),
                _ => "no answer within 3 s".into(),
            };
            assert!(std::env::var("CI").as_deref() != Ok("true"), "Redis unreachable at {url}: {why}");
            eprintln!("\n*** SKIP: Redis unreachable at {url}: {why}; the Redis history tests did not run ***\n");
            None
        }
    }
}

fn unique_cluster() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_nanos();
    format!("hist_{}_{nanos:x}", std::process::id())
}

/// `feed:*`: join params `{"since": POS}` recover; the reply is `{"pos", "recovered"}`.
/// `new_msg` `{"body"}` broadcasts `new_msg` `{"body", "pos"}` with history and replies
/// `{"pos"}`, or error `{"reason"}` when the store fails.
struct Feed;

impl Channel for Feed {
    async fn join(&mut self, params: Payload, socket: &mut SocketRef) -> Result<Value, Value> {
        let since = params.as_json().and_then(|p| p.get("since")).and_then(Value::as_str).map(str::to_owned);
        let recovery = socket.recover(since.as_deref()).await.map_err(|e| json!({"reason": e.to_string()}))?;
        Ok(json!({"pos": recovery.position.map(|p| p.to_string()), "recovered": recovery.recovered}))
    }

    async fn handle_in(&mut self, _: &str, payload: Payload, socket: &mut SocketRef) -> HandleIn {
        let body = payload.as_json().and_then(|p| p.get("body")).cloned().unwrap_or(Value::Null);
        let sent =
            socket.broadcast_with_position("new_msg", |pos| json!({"body": body, "pos": pos.to_string()}).into()).await;
        match sent {
            Ok(pos) => HandleIn::ok(json!({"pos": pos.to_string()})),
            Err(e) => HandleIn::error(json!({"reason": e.to_string()})),
        }
    }
}

/// A node of cluster `cluster`: its PubSub over Redis, its store, `feed:*` keeping history.
fn node(url: &str, cluster: &str) -> Endpoint {
    let options = RedisOptions::default().cluster(cluster);
    let pubsub = PubSub::with_adapter(RedisAdapter::with_options(url, options.clone()).expect("adapter"));
    let store = RedisHistory::with_options(url, options).expect("store");
    Endpoint::builder()
        .router(Router::new().channel("feed:*", || Feed).history("feed:*", HistoryOptions::default()))
        .pubsub(pubsub)
        .history_store(store)
        .build()
}

/// A socket driven in memory, speaking the V2 JSON serializer.
struct Client {
    session: Session,
    out: Outbound,
    next_ref: u64,
}

/// A frame: `[join_ref, ref, topic, event, payload]`.
type Msg = (Value, Value, String, String, Value);

impl Client {
    async fn connect(endpoint: &Endpoint) -> Client {
        let info = ConnectInfo::new("memory", true).with_query(Some("vsn=2.0.0"));
        let session = endpoint.connect(info).await.expect("connect accepted");
        let out = session.outbound();
        Client { session, out, next_ref: 1 }
    }

    async fn send(&mut self, topic: &str, event: &str, payload: Value) -> String {
        let r = self.next_ref.to_string();
        self.next_ref += 1;
        let frame = json!(["1", r, topic, event, payload]).to_string();
        self.session.handle_frame(Frame::text(frame)).await.expect("session open");
        r
    }

    async fn text(&mut self) -> String {
        let frame = tokio::time::timeout(WAIT, self.out.recv()).await.expect("a frame in time").expect("open");
        String::from_utf8(frame.as_bytes().to_vec()).expect("text")
    }

    async fn next(&mut self) -> (String, Msg) {
        let text = self.text().await;
        let msg: Msg = serde_json::from_str(&text).expect("a V2 frame");
        (text, msg)
    }

    /// Joins `topic` with `params`; the ok reply's response.
    async fn join(&mut self, topic: &str, params: Value) -> Value {
        let r = self.send(topic, "phx_join", params).await;
        let (_, (_, got, _, event, payload)) = self.next().await;
        assert_eq!((got.as_str(), event.as_str()), (Some(r.as_str()), "phx_reply"));
        assert_eq!(payload["status"], "ok", "{payload}");
        payload["response"].clone()
    }

    /// Publishes `body`; returns the reply (status, response). The broadcast this client gets
    /// back may come before or after the reply: with a shared store, delivery goes through
    /// Redis. Broadcasts seen while waiting are kept in `seen`.
    async fn publish(&mut self, topic: &str, body: Value, seen: &mut Vec<String>) -> (String, Value) {
        let r = self.send(topic, "new_msg", json!({"body": body})).await;
        loop {
            let (text, (_, got, _, event, payload)) = self.next().await;
            if event == "phx_reply" && got.as_str() == Some(r.as_str()) {
                return (payload["status"].as_str().expect("a status").to_owned(), payload["response"].clone());
            }
            seen.push(text);
        }
    }

    /// The next `n` broadcasts (as text frames), after `seen`.
    async fn broadcasts(&mut self, n: usize, seen: &mut Vec<String>) -> Vec<String> {
        while seen.len() < n {
            let (text, (_, _, _, event, _)) = self.next().await;
            if event == "new_msg" {
                seen.push(text);
            }
        }
        seen.drain(..n).collect()
    }

    /// True when no frame arrives within a short while. Only ever used after a barrier that
    /// would have let any stray frame through first.
    async fn is_quiet(&mut self) -> bool {
        tokio::time::timeout(Duration::from_millis(200), self.out.recv()).await.is_err()
    }
}

fn pos_of(frame: &str) -> String {
    let v: Value = serde_json::from_str(frame).expect("json");
    v[4]["pos"].as_str().expect("a position").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broadcast_published_on_one_node_is_recovered_on_another() {
    let Some(url) = redis_url().await else { return };
    let cluster = unique_cluster();
    let (a, b) = (node(&url, &cluster), node(&url, &cluster));
    let topic = "feed:across";

    let mut publisher = Client::connect(&a).await;
    let joined = publisher.join(topic, json!({})).await;
    assert_eq!(joined["recovered"], false, "no since: not recovered");
    let mut live = Client::connect(&b).await;
    let at_join = live.join(topic, json!({"since": joined["pos"]})).await;
    assert_eq!(at_join["recovered"], true, "nothing happened since: recovered");

    let mut own = Vec::new();
    let mut replies = Vec::new();
    for n in 0..3 {
        let (status, response) = publisher.publish(topic, json!(n), &mut own).await;
        assert_eq!(status, "ok", "{response}");
        replies.push(response["pos"].as_str().expect("pos").to_owned());
    }
    let mut seen = Vec::new();
    let on_b = live.broadcasts(3, &mut seen).await;
    let on_a = publisher.broadcasts(3, &mut own).await;
    assert_eq!(on_a, on_b, "both nodes got the same frames");
    assert_eq!(on_b.iter().map(|f| pos_of(f)).collect::<Vec<_>>(), replies, "in position order");

    // A client that saw the first broadcast (on A, say) recovers the rest on B, byte for byte.
    let mut back = Client::connect(&b).await;
    let reply = back.join(topic, json!({"since": replies[0]})).await;
    assert_eq!(reply["recovered"], true);
    assert_eq!(reply["pos"].as_str(), Some(replies[2].as_str()));
    let mut none = Vec::new();
    assert_eq!(back.broadcasts(2, &mut none).await, on_b[1..]);
    // Then live, once.
    let (status, _) = publisher.publish(topic, json!(3), &mut own).await;
    assert_eq!(status, "ok");
    let next = back.broadcasts(1, &mut none).await;
    assert_eq!(live.broadcasts(1, &mut seen).await, next);
    assert!(back.is_quiet().await, "nothing twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_publishing_on_one_topic_deliver_one_order_everywhere() {
    let Some(url) = redis_url().await else { return };
    let cluster = unique_cluster();
    let (a, b) = (node(&url, &cluster), node(&url, &cluster));
    let topic = "feed:both";
    const EACH: usize = 60;

    // Two subscribers on each node.
    let mut subs = Vec::new();
    for ep in [&a, &b, &a, &b] {
        let mut c = Client::connect(ep).await;
        c.join(topic, json!({})).await;
        subs.push(c);
    }
    let publish = |ep: Endpoint, who: &'static str| async move {
        for n in 0..EACH {
            let body = format!("{who}{n}");
            ep.history()
                .broadcast(topic, "new_msg", |pos| json!({"body": body, "pos": pos.to_string()}).into())
                .await
                .expect("written");
        }
    };
    let (ra, rb) = tokio::join!(tokio::spawn(publish(a.clone(), "a")), tokio::spawn(publish(b.clone(), "b")));
    ra.expect("publisher a");
    rb.expect("publisher b");

    let mut orders = Vec::new();
    for c in &mut subs {
        let mut seen = Vec::new();
        orders.push(c.broadcasts(2 * EACH, &mut seen).await);
    }
    let offsets: Vec<u64> =
        orders[0].iter().map(|f| pos_of(f).parse::<Position>().expect("a position").offset()).collect();
    assert_eq!(offsets, (1..=2 * EACH as u64).collect::<Vec<_>>(), "positions increase by one in delivery order");
    for order in &orders[1..] {
        assert_eq!(order, &orders[0], "every subscriber on every node got one order");
    }
    let from_a = orders[0].iter().filter(|f| f.contains("\"body\":\"a")).count();
    assert_eq!(from_a, EACH, "both publishers are in it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_stream_is_not_recovered() {
    let Some(url) = redis_url().await else { return };
    let cluster = unique_cluster();
    let (a, b) = (node(&url, &cluster), node(&url, &cluster));
    let topic = "feed:wiped";
    let mut publisher = Client::connect(&a).await;
    publisher.join(topic, json!({})).await;
    let mut own = Vec::new();
    let (_, sent) = publisher.publish(topic, json!("before"), &mut own).await;
    let seen = sent["pos"].as_str().expect("pos").to_owned();

    // The stream is lost (its epoch record survives): the old position must not be honoured.
    let mut conn =
        redis::Client::open(url.as_str()).expect("url").get_multiplexed_async_connection().await.expect("redis");
    let deleted: i64 =
        redis::cmd("DEL").arg(format!("{cluster}:history:{topic}")).query_async(&mut conn).await.expect("DEL");
    assert_eq!(deleted, 1, "the stream was where the store documents it");

    let mut back = Client::connect(&b).await;
    let reply = back.join(topic, json!({"since": seen})).await;
    assert_eq!(reply["recovered"], false);
    let (old, new) =
        (seen.parse::<Position>().expect("pos"), reply["pos"].as_str().expect("pos").parse::<Position>().expect("pos"));
    assert_ne!(old.epoch(), new.epoch(), "a new epoch");
    assert_eq!(new.offset(), 0);

    // Both keys gone (FLUSHALL, say): the same.
    let _: i64 = redis::cmd("DEL")
        .arg(format!("{cluster}:history:{topic}"))
        .arg(format!("{cluster}:history-meta:{topic}"))
        .query_async(&mut conn)
        .await
        .expect("DEL");
    let mut again = Client::connect(&a).await;
    let reply = again.join(topic, json!({"since": reply["pos"]})).await;
    assert_eq!(reply["recovered"], false);
    assert!(back.is_quiet().await && again.is_quiet().await, "nothing replayed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_redis_answers_not_recovered_and_is_counted() {
    // Nothing listens on port 1: every call fails at once.
    let store = RedisHistory::new("redis://127.0.0.1:1").expect("store");
    let endpoint = Endpoint::builder()
        .router(Router::new().channel("feed:*", || Feed).history("feed:*", HistoryOptions::default()))
        .history_store(store)
        .build();
    let mut c = Client::connect(&endpoint).await;
    let reply = c.join("feed:down", json!({"since": "abc:1"})).await;
    assert_eq!(reply, json!({"pos": null, "recovered": false}));
    let mut seen = Vec::new();
    let (status, response) = c.publish("feed:down", json!("lost"), &mut seen).await;
    assert_eq!(status, "error", "a broadcast that could not be written is not sent");
    assert!(response["reason"].as_str().is_some_and(|r| r.contains("history store failed")), "{response}");
    assert!(seen.is_empty() && c.is_quiet().await, "and nobody got it");
    let stats = endpoint.history().stats();
    assert_eq!((stats.append_errors, stats.read_errors), (1, 1));
}

/// A private redis-server on a free port (its connections can be cut without touching other
/// tests), killed when dropped.
struct PrivateRedis(std::process::Child);

impl PrivateRedis {
    async fn start() -> (PrivateRedis, String) {
        let port = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind").local_addr().expect("addr").port();
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
        (PrivateRedis(child), format!("redis://127.0.0.1:{port}"))
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcasts_a_node_missed_while_its_subscription_was_down_are_read_back() {
    if redis_url().await.is_none() {
        return;
    }
    let (_redis, url) = PrivateRedis::start().await;
    let cluster = unique_cluster();
    let (a, b) = (node(&url, &cluster), node(&url, &cluster));
    let topic = "feed:gap";
    let mut publisher = Client::connect(&a).await;
    publisher.join(topic, json!({})).await;
    let mut on_b = Client::connect(&b).await;
    on_b.join(topic, json!({})).await;
    let (mut own, mut seen) = (Vec::new(), Vec::new());
    publisher.publish(topic, json!(0), &mut own).await;
    on_b.broadcasts(1, &mut seen).await;

    // Every node's subscriptions are cut; what is published before they are back (they wait
    // 100 ms first) reaches nobody through them, and is read back from the stream.
    let mut admin =
        redis::Client::open(url.as_str()).expect("url").get_multiplexed_async_connection().await.expect("redis");
    let killed: i64 =
        redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("pubsub").query_async(&mut admin).await.expect("kill");
    assert!(killed >= 2, "cut {killed} subscriptions");
    for n in 1..4 {
        let (status, _) = publisher.publish(topic, json!(n), &mut own).await;
        assert_eq!(status, "ok");
    }
    let got = on_b.broadcasts(3, &mut seen).await;
    let bodies: Vec<Value> =
        got.iter().map(|f| serde_json::from_str::<Value>(f).expect("json")[4]["body"].clone()).collect();
    assert_eq!(bodies, [json!(1), json!(2), json!(3)], "in order");
    assert_eq!(publisher.broadcasts(4, &mut own).await[1..], got[..], "the publisher's node too");
    // Then live again, each once.
    publisher.publish(topic, json!(4), &mut own).await;
    assert_eq!(on_b.broadcasts(1, &mut seen).await, publisher.broadcasts(1, &mut own).await);
    assert!(on_b.is_quiet().await);
}
