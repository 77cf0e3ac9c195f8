//! What only SSE has: resuming with Last-Event-ID, and the answers to bad input and slow readers.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{Next, open, open_with, post, post_body, request};
use fawkes_channel::{Config, Endpoint};
use fawkes_transport_sse::{SseOptions, SseService};
use http_body_util::Full;
use serde_json::{Value, json};

fn service(config: Config, options: SseOptions) -> (SseService, Endpoint) {
    let endpoint = fawkes_testkit::endpoint(config);
    (SseService::with_options(endpoint.clone(), options), endpoint)
}

fn join(topic: &str) -> String {
    json!(["1", "1", topic, "phx_join", {}]).to_string()
}

fn data(e: &common::Event) -> Value {
    serde_json::from_str(&e.data).expect("V2 JSON")
}

#[tokio::test]
async fn forged_expired_and_altered_tokens_get_a_new_session_or_410_never_403() {
    let (svc, _) = service(Config::default(), SseOptions::default());
    let real = open(&svc, "vsn=2.0.0").await.expect("opens");
    let mut altered = real.token.clone().into_bytes();
    altered[0] = if altered[0] == b'A' { b'B' } else { b'A' };
    let altered = String::from_utf8(altered).expect("ascii");
    for bad in [altered.as_str(), "forged.token", "", "%%%"] {
        let fresh = open(&svc, &format!("vsn=2.0.0&token={bad}")).await.expect("GET opens a fresh session");
        assert_ne!(fresh.token, real.token, "GET {bad:?}: a fresh session, not the real one");
        assert_eq!(post(&svc, bad, &[r#"[null,"1","phoenix","heartbeat",{}]"#.into()]).await, 410, "POST {bad:?}");
    }
}

#[tokio::test]
async fn refused_connects_get_403() {
    let (svc, endpoint) = service(Config::default(), SseOptions::default());
    assert_eq!(open(&svc, "vsn=2.0.0&reject=true").await.err(), Some(403));
    assert_eq!(open(&svc, "vsn=3.0.0").await.err(), Some(403));
    let origin = [("origin", "https://evil.example"), ("host", "localhost:4000")];
    assert_eq!(open_with(&svc, "vsn=2.0.0", &origin).await.err(), Some(403));
    assert_eq!((svc.sessions(), endpoint.connected()), (0, 0));
}

#[tokio::test]
async fn a_huge_post_gets_413_and_the_session_survives() {
    let (svc, _) = service(Config::default(), SseOptions::default().max_body_size(64 * 1024));
    let mut s = open(&svc, "vsn=2.0.0").await.expect("opens");
    assert_eq!(post_body(&svc, &s.token, Bytes::from(vec![b'['; 1024 * 1024])).await, 413);
    assert_eq!(post(&svc, &s.token, &[r#"[null,"1","phoenix","heartbeat",{}]"#.into()]).await, 200);
    let reply = s.event().await.expect("the heartbeat reply");
    assert_eq!(data(&reply)[1], "1");
}

#[tokio::test]
async fn a_malformed_post_gets_400_and_the_stream_says_why() {
    let (svc, _) = service(Config::default(), SseOptions::default());
    let mut s = open(&svc, "vsn=2.0.0").await.expect("opens");
    assert_eq!(post(&svc, &s.token, &["[not json".into()]).await, 400);
    let close = s.event().await.expect("a close event");
    assert_eq!(close.name.as_deref(), Some("phx_socket_close"));
    assert!(close.data.starts_with("malformed frame"), "{close:?}");
    assert_eq!(s.next().await, Next::End);
    assert_eq!(post(&svc, &s.token, &[join("test:a")]).await, 410, "the session is gone");
}

#[tokio::test]
async fn last_event_id_resumes_within_the_window_and_a_fresh_session_starts_beyond_it() {
    let (svc, endpoint) = service(Config::default(), SseOptions::default().replay_window(4));
    let mut s = open(&svc, "vsn=2.0.0").await.expect("opens");
    assert_eq!(post(&svc, &s.token, &[join("test:resume")]).await, 200);
    assert_eq!(s.event().await.expect("join reply").id, Some(1));
    for n in 2..=6 {
        endpoint.pubsub().broadcast("test:resume", "n", json!({"n": n}));
        let e = s.event().await.expect("a broadcast");
        assert_eq!((e.id, data(&e)[4]["n"].clone()), (Some(n), json!(n)));
    }
    let token = s.token.clone();
    drop(s);
    endpoint.pubsub().broadcast("test:resume", "n", json!({"n": 7}));

    // Events 3..=6 are in the window: resuming after 4 resends 5 and 6, then the live 7.
    let mut resumed = open_with(&svc, &format!("token={token}"), &[("last-event-id", "4")]).await.expect("resumes");
    assert_eq!(resumed.token, token, "the same session");
    let ids: Vec<Option<u64>> = [resumed.event().await, resumed.event().await, resumed.event().await]
        .into_iter()
        .map(|e| e.expect("an event").id)
        .collect();
    assert_eq!(ids, [Some(5), Some(6), Some(7)]);

    // The query param serves EventSource reconnects, which cannot set headers.
    drop(resumed);
    let mut again = open(&svc, &format!("token={token}&last_event_id=6")).await.expect("resumes");
    assert_eq!(again.token, token);
    assert_eq!(again.event().await.expect("event 7").id, Some(7));

    // Event 2 has left the window: the client gets a new session and must rejoin.
    drop(again);
    let fresh = open(&svc, &format!("vsn=2.0.0&token={token}&last_event_id=1")).await.expect("opens");
    assert_ne!(fresh.token, token);
    assert_eq!(post(&svc, &token, &[join("test:x")]).await, 410, "the old session ended");
}

#[tokio::test]
async fn the_replay_window_keeps_at_most_its_bytes_and_a_resume_past_them_gets_a_new_session() {
    // Broadcasts of about 1,040 bytes; the window keeps 3,300 bytes of them: three.
    let options = SseOptions::default().replay_window(256).replay_window_bytes(3300);
    let (svc, endpoint) = service(Config::default(), options);
    let mut s = open(&svc, "vsn=2.0.0").await.expect("opens");
    assert_eq!(post(&svc, &s.token, &[join("test:bytes")]).await, 200);
    assert_eq!(s.event().await.expect("join reply").id, Some(1));
    let pad = "x".repeat(1000);
    for n in 2..=10 {
        endpoint.pubsub().broadcast("test:bytes", "n", json!({"n": n, "pad": pad}));
        assert_eq!(s.event().await.expect("a broadcast").id, Some(n));
    }
    let token = s.token.clone();
    drop(s);

    // 8, 9 and 10 are kept: resuming after 7 resends them.
    let mut resumed = open(&svc, &format!("token={token}&last_event_id=7")).await.expect("resumes");
    assert_eq!(resumed.token, token, "the same session");
    for n in 8..=10 {
        let e = resumed.event().await.expect("a replayed event");
        assert_eq!((e.id, data(&e)[4]["n"].clone()), (Some(n), json!(n)));
    }

    // 7 is not, though far fewer than `replay_window` events were sent: the session cannot be
    // resumed, and the client is told with a new session (another token), for it to rejoin.
    drop(resumed);
    let fresh = open(&svc, &format!("vsn=2.0.0&token={token}&last_event_id=6")).await.expect("opens");
    assert_ne!(fresh.token, token);
    assert_eq!(post(&svc, &token, &[join("test:x")]).await, 410, "the old session ended");
}

#[tokio::test]
async fn a_newer_stream_ends_the_older_one() {
    let (svc, _) = service(Config::default(), SseOptions::default());
    let mut first = open(&svc, "vsn=2.0.0").await.expect("opens");
    let mut second = open(&svc, &format!("token={}", first.token)).await.expect("reattaches");
    // The older stream's connection is cut whether or not its reader reads on.
    tokio::time::timeout(Duration::from_secs(5), first.cut.wait()).await.expect("the older connection is cut");
    assert!(!second.cut.is_cut());
    assert_eq!(first.next().await, Next::End);
    assert_eq!(post(&svc, &second.token, &[r#"[null,"1","phoenix","heartbeat",{}]"#.into()]).await, 200);
    assert_eq!(data(&second.event().await.expect("reply"))[1], "1");
}

#[tokio::test]
async fn a_reader_that_stops_reading_is_closed_as_a_slow_consumer() {
    let (svc, endpoint) = service(Config::default().outbound_queue_limit(64), SseOptions::default().replay_window(16));
    let mut s = open(&svc, "vsn=2.0.0").await.expect("opens");
    assert_eq!(post(&svc, &s.token, &[join("test:flood")]).await, 200);
    assert_eq!(s.event().await.expect("join reply").id, Some(1));
    // The reader stops: nothing polls the stream while 10,000 broadcasts are sent.
    for n in 0..10_000 {
        endpoint.pubsub().broadcast("test:flood", "n", json!({"n": n}));
    }
    // A stream nobody polls never sees its session close: its connection is cut instead.
    let cut = tokio::time::timeout(Duration::from_secs(5), s.cut.wait()).await;
    assert!(cut.is_ok(), "the connection of a stream nobody reads is cut when its session closes");
    let mut delivered = 0;
    let close = loop {
        let e = s.event().await.expect("events, then a close event");
        if e.name.is_some() {
            break e;
        }
        delivered += 1;
    };
    assert_eq!((close.name.as_deref(), close.data.as_str()), (Some("phx_socket_close"), "slow consumer"));
    assert!(delivered <= 64, "at most the queue limit was kept: {delivered}");
    assert_eq!(s.next().await, Next::End);
    assert_eq!(svc.sessions(), 0);
    drop(s);
    tokio::time::timeout(Duration::from_secs(5), endpoint.drained()).await.expect("the session is dropped");
}

#[tokio::test(start_paused = true)]
async fn sessions_without_a_stream_end_after_the_idle_window_and_streams_get_keep_alives() {
    let idle = Duration::from_secs(20);
    let (svc, endpoint) =
        service(Config::default(), SseOptions::default().session_idle(idle).keep_alive(Duration::from_secs(15)));
    let mut kept = open(&svc, "vsn=2.0.0").await.expect("opens");
    let abandoned = open(&svc, "vsn=2.0.0").await.expect("opens");
    assert_eq!(post(&svc, &abandoned.token, &[join("test:gone")]).await, 200);
    drop(abandoned);
    assert_eq!(kept.next().await, Next::Comment("keep-alive".into()), "after 15 s of silence");
    // Heartbeats keep the attached session within the endpoint's heartbeat timeout.
    assert_eq!(post(&svc, &kept.token, &[r#"[null,"1","phoenix","heartbeat",{}]"#.into()]).await, 200);
    assert!(kept.event().await.is_some());
    tokio::time::sleep(idle).await;
    assert_eq!((svc.sessions(), endpoint.connected()), (1, 1), "only the attached session is left");
    let req = http::Request::delete("/socket/sse").body(Full::default()).expect("request");
    assert_eq!(request(&svc, req).await.0, 405);
}

#[tokio::test]
async fn a_retried_post_is_handled_once() {
    let (svc, _) = service(Config::default(), SseOptions::default());
    let mut s = open(&svc, "vsn=2.0.0").await.expect("opens");
    let batch = [join("test:retry"), json!(["1", "2", "test:retry", "echo", {"body": "once"}]).to_string()];
    assert_eq!(post(&svc, &s.token, &batch).await, 200);
    // The answer was lost; the client sends the same batch again, plus a new push.
    let retry = [batch[0].clone(), batch[1].clone(), json!(["1", "3", "test:retry", "echo", {}]).to_string()];
    assert_eq!(post(&svc, &s.token, &retry).await, 200);
    // A last push on the same topic: its reply comes after every earlier one.
    assert_eq!(post(&svc, &s.token, &[json!(["1", "4", "test:retry", "echo", {}]).to_string()]).await, 200);
    let mut refs = Vec::new();
    while refs.last() != Some(&json!("4")) {
        refs.push(data(&s.event().await.expect("a reply"))[1].clone());
    }
    assert_eq!(refs, [json!("1"), json!("2"), json!("3"), json!("4")], "join, echo, echo, echo: once each");
}
