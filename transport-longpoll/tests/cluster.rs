//! Long-poll across nodes through the real backends: each request of one client may reach any
//! node (a round-robin load balancer, no sticky sessions).
//!
//! Each test makes two nodes in this process, each with its own PubSub, adapter and endpoint (see
//! `fawkes_testkit::cluster`: unreachable backends fail under `CI=true`, else a loud SKIP).

mod common;

use std::time::Duration;

use fawkes_channel::{Config, PubSub};
use fawkes_testkit::cluster::{Backend, endpoint_on};
use fawkes_transport_longpoll::{LongPollOptions, LongPollService};
use serde_json::{Value, json};

/// One node's long-poll service; the nodes of a cluster share the secret tokens are signed with.
fn node(pubsub: PubSub) -> LongPollService {
    let options = LongPollOptions::default().secret("shared by the cluster").poll_window(Duration::from_secs(5));
    LongPollService::with_options(endpoint_on(pubsub, Config::default()), options)
}

async fn get(svc: &LongPollService, query: &str) -> Value {
    common::envelope(svc, common::get(query)).await
}

async fn post(svc: &LongPollService, token: &str, line: &str) -> Value {
    common::envelope(svc, common::post(&format!("token={token}"), &[line])).await
}

async fn requests_reach_the_session_from_any_node(backend: Backend) {
    let Some((a, b)) = backend.two_nodes().await else { return };
    let (node_a, node_b) = (node(a), node(b));

    let opened = get(&node_a, "vsn=2.0.0").await;
    assert_eq!(opened["status"], 410);
    let token = opened["token"].as_str().expect("a token").to_owned();
    let join = json!(["1", "1", "test:cross", "phx_join", {}]).to_string();
    assert_eq!(post(&node_b, &token, &join).await["status"], 200, "node B hands the join to node A");
    let polled = get(&node_b, &format!("token={token}")).await;
    assert_eq!((&polled["status"], polled["token"].as_str()), (&json!(200), Some(token.as_str())), "{polled}");
    let reply: Value = serde_json::from_str(polled["messages"][0].as_str().expect("a message")).expect("V2 JSON");
    assert_eq!((&reply[1], &reply[4]["status"]), (&json!("1"), &json!("ok")));
    assert_eq!((node_a.sessions(), node_b.sessions()), (1, 0), "node B opened no session");

    // The session ends on node A through node B; node B then answers the token as gone and
    // opens a session of its own.
    assert_eq!(post(&node_b, &token, "[not json").await["status"], 400);
    let reopened = get(&node_b, &format!("vsn=2.0.0&token={token}")).await;
    assert_eq!(reopened["status"], 410);
    assert_ne!(reopened["token"].as_str(), Some(token.as_str()));
    assert_eq!((node_a.sessions(), node_b.sessions()), (0, 1));
}

#[tokio::test]
async fn redis_longpoll_requests_reach_the_session_from_any_node() {
    requests_reach_the_session_from_any_node(Backend::Redis).await;
}

#[tokio::test]
async fn postgres_longpoll_requests_reach_the_session_from_any_node() {
    requests_reach_the_session_from_any_node(Backend::Postgres).await;
}
