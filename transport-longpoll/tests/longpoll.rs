//! The long-poll protocol, request by request, against the service itself. The channel
//! scenarios every transport shares run in the conformance kit (kit.rs); requests across the
//! nodes of a cluster in cluster.rs.

mod common;

use std::time::Duration;

use bytes::Bytes;
use fawkes_channel::{Config, Endpoint, PeerAddr};
use fawkes_transport_longpoll::{LongPollOptions, LongPollService};
use http_body_util::Full;
use serde_json::{Value, json};

struct Lp {
    svc: LongPollService,
    endpoint: Endpoint,
}

fn lp(options: LongPollOptions) -> Lp {
    let endpoint = fawkes_testkit::endpoint(Config::default());
    Lp { svc: LongPollService::with_options(endpoint.clone(), options), endpoint }
}

impl Lp {
    async fn request(&self, req: http::Request<Full<Bytes>>) -> (u16, http::HeaderMap, Value) {
        common::request(&self.svc, req).await
    }

    async fn get(&self, query: &str) -> Value {
        let (status, headers, body) = self.request(common::get(query)).await;
        assert_eq!(status, 200);
        assert_eq!(headers["access-control-allow-origin"], "*");
        body
    }

    async fn open(&self) -> String {
        let body = self.get("vsn=2.0.0").await;
        assert_eq!(body["status"], 410);
        body["token"].as_str().expect("token").to_owned()
    }

    async fn post(&self, token: &str, lines: &[&str]) -> Value {
        let (status, _, body) = self.request(common::post(&format!("vsn=2.0.0&token={token}"), lines)).await;
        assert_eq!(status, 200);
        body
    }

    /// Polls until `n` messages have arrived.
    async fn messages(&self, token: &str, n: usize) -> Vec<Value> {
        let mut out = Vec::new();
        while out.len() < n {
            let body = self.get(&format!("vsn=2.0.0&token={token}")).await;
            assert_eq!(body["status"], 200, "expected messages, got {body}");
            for m in body["messages"].as_array().expect("messages") {
                out.push(serde_json::from_str(m.as_str().expect("string")).expect("V2 JSON"));
            }
        }
        assert_eq!(out.len(), n, "{out:?}");
        out
    }
}

#[tokio::test]
async fn an_empty_poll_answers_204_and_loses_nothing() {
    let lp = lp(LongPollOptions::default().poll_window(Duration::from_millis(50)));
    let token = lp.open().await;
    lp.post(&token, &[r#"["1","1","test:q","phx_join",{}]"#]).await;
    lp.messages(&token, 1).await;
    let body = lp.get(&format!("vsn=2.0.0&token={token}")).await;
    assert_eq!((body["status"].clone(), body["token"].as_str()), (json!(204), Some(token.as_str())));
    lp.endpoint.pubsub().broadcast("test:q", "later", json!({"n": 1}));
    assert_eq!(lp.messages(&token, 1).await[0], json!([null, null, "test:q", "later", {"n": 1}]));
}

#[tokio::test]
async fn a_poll_answers_at_most_64_kib_of_messages_and_the_next_poll_the_rest() {
    let lp = lp(LongPollOptions::default());
    let token = lp.open().await;
    lp.post(&token, &[r#"["1","1","test:big","phx_join",{}]"#]).await;
    lp.messages(&token, 1).await;
    // 40 broadcasts of about 4 KiB: 160 KiB queued.
    let pad = "x".repeat(4096);
    for n in 0..40 {
        lp.endpoint.pubsub().broadcast("test:big", "n", json!({"n": n, "pad": pad}));
    }
    let mut sizes = Vec::new();
    let mut next = 0;
    while next < 40 {
        let body = lp.get(&format!("vsn=2.0.0&token={token}")).await;
        let messages = body["messages"].as_array().expect("messages");
        sizes.push(messages.iter().map(|m| m.as_str().map_or(0, str::len)).sum::<usize>());
        for m in messages {
            let m: Value = serde_json::from_str(m.as_str().expect("string")).expect("V2 JSON");
            assert_eq!(m[4]["n"], next, "in order, none lost");
            next += 1;
        }
    }
    assert!(sizes.len() >= 3 && sizes.iter().all(|s| *s <= 64 * 1024), "bytes per poll: {sizes:?}");
    // A message larger than that still goes, alone.
    lp.endpoint.pubsub().broadcast("test:big", "n", json!({"pad": "y".repeat(100_000)}));
    lp.endpoint.pubsub().broadcast("test:big", "n", json!({"n": 41}));
    assert_eq!(lp.get(&format!("vsn=2.0.0&token={token}")).await["messages"].as_array().map(Vec::len), Some(1));
    assert_eq!(lp.messages(&token, 1).await[0][4]["n"], 41);
}

#[tokio::test]
async fn bad_tokens_get_410_never_403() {
    let lp = lp(LongPollOptions::default());
    let token = lp.open().await;
    let mut altered = token.clone().into_bytes();
    altered[0] = if altered[0] == b'A' { b'B' } else { b'A' };
    let altered = String::from_utf8(altered).expect("ascii");
    for bad in [altered.as_str(), "forged.token", "", "%%%"] {
        let body = lp.get(&format!("vsn=2.0.0&token={bad}")).await;
        assert_eq!(body["status"], 410, "GET {bad:?}");
        assert_ne!(body["token"].as_str(), Some(token.as_str()), "a fresh session, not the real one");
        let req = http::Request::post(format!("/socket/longpoll?token={bad}"))
            .body(Full::new(Bytes::from_static(br#"[null,"1","phoenix","heartbeat",{}]"#)))
            .expect("request");
        assert_eq!(lp.request(req).await.2["status"], 410, "POST {bad:?}");
    }
}

#[tokio::test]
async fn a_foreign_origin_gets_403() {
    // Refusals by the connect callback and for the vsn are in the conformance kit (kit.rs).
    let lp = lp(LongPollOptions::default());
    let req = http::Request::get("/socket/longpoll?vsn=2.0.0")
        .header("origin", "https://evil.example")
        .header("host", "localhost:4000")
        .body(Full::default())
        .expect("request");
    assert_eq!(lp.request(req).await.2["status"], 403);
    assert_eq!(lp.endpoint.connected(), 0);
}

#[tokio::test]
async fn a_malformed_line_is_answered_at_once_and_ends_the_session() {
    let lp = lp(LongPollOptions::default());
    let token = lp.open().await;
    let req = http::Request::post(format!("/socket/longpoll?token={token}"))
        .header("content-type", "application/x-ndjson")
        .body(Full::new(Bytes::from_static(b"[\"1\",\"1\",\"test:x\",\"phx_join\",{}]\n[not json")))
        .expect("request");
    let (status, _, body) = lp.request(req).await;
    assert_eq!((status, body["status"].clone()), (200, json!(400)));
    assert_eq!(lp.get(&format!("vsn=2.0.0&token={token}")).await["status"], 410, "the session is gone");
}

#[tokio::test]
async fn a_huge_post_is_refused_and_the_session_survives() {
    let lp = lp(LongPollOptions::default().max_body_size(64 * 1024));
    let token = lp.open().await;
    let req = http::Request::post(format!("/socket/longpoll?token={token}"))
        .body(Full::new(Bytes::from(vec![b'['; 1024 * 1024])))
        .expect("request");
    assert_eq!(lp.request(req).await.0, 413);
    lp.post(&token, &[r#"[null,"1","phoenix","heartbeat",{}]"#]).await;
    assert_eq!(lp.messages(&token, 1).await[0][1], "1");
}

#[tokio::test]
async fn wrong_methods_and_preflight() {
    let lp = lp(LongPollOptions::default());
    let req = http::Request::delete("/socket/longpoll").body(Full::default()).expect("request");
    let (status, headers, _) = lp.request(req).await;
    assert_eq!((status, headers["allow"].to_str().ok()), (405, Some("GET, POST, OPTIONS")));
    let req = http::Request::options("/socket/longpoll")
        .header("access-control-request-headers", "content-type,x-phoenix-authtoken")
        .body(Full::default())
        .expect("request");
    let (status, headers, _) = lp.request(req).await;
    assert_eq!(status, 200);
    assert_eq!(headers["access-control-allow-headers"], "content-type,x-phoenix-authtoken");
    assert_eq!(headers["access-control-allow-methods"], "get, post, options");
    assert_eq!(headers["access-control-max-age"], "3600");
    assert_eq!(headers["access-control-allow-origin"], "*");
}

#[tokio::test]
async fn a_newer_poll_releases_the_older_without_losing_messages() {
    let lp = lp(LongPollOptions::default().poll_window(Duration::from_secs(30)));
    let token = lp.open().await;
    lp.post(&token, &[r#"["1","1","test:two","phx_join",{}]"#]).await;
    lp.messages(&token, 1).await;
    let query = format!("vsn=2.0.0&token={token}");
    let first = lp.get(&query);
    let second = async {
        tokio::task::yield_now().await;
        lp.get(&query).await
    };
    let broadcast = async {
        // Lets both polls start waiting before the message is sent.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        lp.endpoint.pubsub().broadcast("test:two", "hello", json!({}));
    };
    let (first, second, ()) = tokio::join!(first, second, broadcast);
    let statuses = [first["status"].as_u64(), second["status"].as_u64()];
    assert!(statuses.contains(&Some(204)) && statuses.contains(&Some(200)), "{first} {second}");
    let delivered: usize = [first, second].iter().map(|b| b["messages"].as_array().map_or(0, Vec::len)).sum();
    assert_eq!(delivered, 1, "the message went out exactly once");
}

#[tokio::test]
async fn binary_pushes_arrive_as_base64_lines_and_go_back_as_base64_json() {
    let lp = lp(LongPollOptions::default());
    let token = lp.open().await;
    lp.post(&token, &[r#"["1","1","test:bin","phx_join",{}]"#]).await;
    lp.messages(&token, 1).await;
    // Kind 0 push: join_ref "1", ref "2", topic "test:bin", event "echo", payload [1,2,3,255].
    let frame = [&[0u8, 1, 1, 8, 4][..], b"1", b"2", b"test:bin", b"echo", &[1, 2, 3, 255]].concat();
    use base64::Engine as _;
    let line = base64::engine::general_purpose::STANDARD.encode(frame);
    lp.post(&token, &[&line]).await;
    let reply = &lp.messages(&token, 1).await[0];
    assert_eq!(
        reply,
        &json!(["1", "2", "test:bin", "phx_reply", {"response": {"binary": "AQID/w=="}, "status": "ok"}])
    );
}

#[tokio::test(start_paused = true)]
async fn abandoned_sessions_expire_and_free_everything() {
    let idle = Duration::from_secs(20);
    let lp = lp(LongPollOptions::default().session_idle(idle));
    for _ in 0..2000 {
        let token = lp.open().await;
        lp.post(&token, &[r#"["1","1","test:abandoned","phx_join",{}]"#]).await;
    }
    // Let every join finish before measuring.
    while lp.endpoint.pubsub().subscriber_count("test:abandoned") < 2000 {
        tokio::task::yield_now().await;
    }
    assert_eq!((lp.svc.sessions(), lp.endpoint.connected()), (2000, 2000));
    tokio::time::sleep(idle / 2).await;
    assert_eq!(lp.svc.sessions(), 2000, "not before the idle window");
    tokio::time::sleep(idle).await;
    assert_eq!((lp.svc.sessions(), lp.endpoint.connected()), (0, 0));
    while lp.endpoint.pubsub().subscriber_count("test:abandoned") > 0 {
        tokio::task::yield_now().await;
    }
    let expired = lp.get("vsn=2.0.0&token=whatever").await;
    assert_eq!(expired["status"], 410);
}

#[tokio::test]
async fn a_retried_post_is_not_handled_twice() {
    let lp = lp(LongPollOptions::default().poll_window(Duration::from_millis(100)));
    let token = lp.open().await;
    let batch = [
        r#"["1","1","test:retry","phx_join",{}]"#,
        r#"["1","2","test:retry","broadcast",{"event":"new_msg","payload":{"body":"once"}}]"#,
    ];
    lp.post(&token, &batch).await;
    // The answer was lost; the client sends the same batch again, plus a new push.
    lp.post(&token, &[batch[0], batch[1], r#"["1","3","test:retry","echo",{}]"#]).await;
    let msgs = lp.messages(&token, 4).await;
    let refs: Vec<&Value> = msgs.iter().map(|m| &m[1]).collect();
    assert_eq!(refs, [&json!("1"), &Value::Null, &json!("2"), &json!("3")], "join, broadcast, reply, echo: once each");
    let next = lp.get(&format!("vsn=2.0.0&token={token}")).await;
    assert_eq!(next["status"], 204, "nothing else was queued: {next}");
}

/// phoenix.js sends no heartbeats over long-poll: polling alone must keep a session alive.
#[tokio::test(start_paused = true)]
async fn polling_alone_keeps_a_session_past_the_heartbeat_timeout() {
    let endpoint = fawkes_testkit::endpoint(Config::default().heartbeat_timeout(Duration::from_secs(60)));
    let lp = Lp {
        svc: LongPollService::with_options(
            endpoint.clone(),
            LongPollOptions::default().poll_window(Duration::from_secs(10)),
        ),
        endpoint,
    };
    let token = lp.open().await;
    lp.post(&token, &[r#"["1","1","test:listen","phx_join",{}]"#]).await;
    lp.messages(&token, 1).await;
    // Three minutes of empty polls, each up to the poll window.
    for _ in 0..18 {
        let body = lp.get(&format!("vsn=2.0.0&token={token}")).await;
        assert_eq!(body["status"], 204, "{body}");
    }
    lp.endpoint.pubsub().broadcast("test:listen", "still", json!({}));
    assert_eq!(lp.messages(&token, 1).await[0][3], "still");
}

#[tokio::test]
async fn sessions_past_the_per_ip_limit_are_refused_with_403() {
    let endpoint = fawkes_testkit::endpoint(Config::default().max_connections_per_ip(Some(2)));
    let lp = Lp { svc: LongPollService::new(endpoint.clone()), endpoint };
    let open_from = |ip: [u8; 4]| {
        let mut req = http::Request::get("/socket/longpoll?vsn=2.0.0").body(Full::default()).expect("request");
        req.extensions_mut().insert(PeerAddr(std::net::SocketAddr::from((ip, 40000))));
        lp.request(req)
    };
    for _ in 0..2 {
        assert_eq!(open_from([127, 0, 0, 1]).await.2["status"], 410, "a session opens (410 with its token)");
    }
    assert_eq!(open_from([127, 0, 0, 1]).await.2["status"], 403, "the third from the same address is refused");
    assert_eq!(open_from([127, 0, 0, 2]).await.2["status"], 410, "another address has its own count");
    assert_eq!(lp.endpoint.connected(), 3);
}
