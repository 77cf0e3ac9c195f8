//! SSE across nodes through the real backends: a client's stream on one node, its POSTs on
//! another (a round-robin load balancer, no sticky sessions).
//!
//! Each test makes two nodes in this process, each with its own PubSub, adapter and endpoint (see
//! `fawkes_testkit::cluster`: unreachable backends fail under `CI=true`, else a loud SKIP).

mod common;

use common::{Stream, open, post};
use fawkes_channel::Config;
use fawkes_testkit::cluster::{Backend, WAIT, endpoint_on};
use fawkes_transport_sse::{SseOptions, SseService};
use serde_json::{Value, json};

/// One node's SSE service; the nodes of a cluster share the secret tokens are signed with.
fn sse_node(pubsub: fawkes_channel::PubSub) -> SseService {
    let options = SseOptions::default().secret("shared by the cluster");
    SseService::with_options(endpoint_on(pubsub, Config::default()), options)
}

async fn event(stream: &mut Stream, what: &str) -> (Option<String>, Value) {
    match tokio::time::timeout(WAIT, stream.event()).await {
        Ok(Some(e)) => (e.name.clone(), serde_json::from_str(&e.data).unwrap_or(Value::String(e.data))),
        Ok(None) => panic!("{what}: the stream ended"),
        Err(_) => panic!("{what}: nothing within {WAIT:?}"),
    }
}

async fn stream_on_one_node_posts_on_another(backend: Backend) {
    let Some((a, b)) = backend.two_nodes().await else { return };
    let (node_a, node_b) = (sse_node(a), sse_node(b));

    let mut stream = open(&node_a, "vsn=2.0.0").await.expect("the stream opens on node A");
    let token = stream.token.clone();
    let join = json!(["1", "1", "test:cross", "phx_join", {}]).to_string();
    assert_eq!(post(&node_b, &token, &[join]).await, 200, "node B hands the join to node A");
    let (_, reply) = event(&mut stream, "the join reply").await;
    assert_eq!((&reply[1], &reply[3], &reply[4]["status"]), (&json!("1"), &json!("phx_reply"), &json!("ok")));

    let push = json!(["1", "2", "test:cross", "broadcast", {"event": "hello", "payload": {"n": 1}}]).to_string();
    assert_eq!(post(&node_b, &token, std::slice::from_ref(&push)).await, 200);
    let mut seen = [event(&mut stream, "the broadcast").await.1, event(&mut stream, "its reply").await.1];
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
