//! Heartbeats and the idle timeout, malformed and oversized frames, join limits, the outbound
//! queue's limit and slow-consumer policies, connect refusals, shutdown, disconnects and the end
//! of a session. Time moves only when a test says so.

use std::time::Duration;

use fawkes_channel::{
    CloseReason, Config, ConnectError, ConnectInfo, Endpoint, Frame, ReplyStatus, SlowConsumerPolicy, Terminate,
};
use fawkes_serializer::ServerMessage;
use serde_json::json;
use tokio::time::{Instant, advance, timeout};

use crate::support::{Client, connect, endpoint, next_end, reason_of};

const MS: Duration = Duration::from_millis(1);

fn default_endpoint() -> Endpoint {
    endpoint(Config::default()).0
}

/// Asserts the socket stays open and silent for `d` (the paused clock runs through it at once).
async fn stays_open_for(c: &mut Client, d: Duration) {
    if let Ok(next) = timeout(d, c.out.recv()).await {
        panic!("expected nothing for {d:?}, got {next:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn an_idle_socket_is_closed_after_exactly_the_heartbeat_timeout() {
    let (ep, _) = endpoint(Config::default().heartbeat_timeout(Duration::from_secs(45)));
    let mut c = connect(&ep, "vsn=2.0.0").await;
    let connected = Instant::now();
    stays_open_for(&mut c, Duration::from_secs(45) - MS).await;
    assert_eq!(c.closed().await, CloseReason::HeartbeatTimeout);
    assert_eq!(connected.elapsed(), Duration::from_secs(45));
    assert!(c.session.is_closed());
}

#[tokio::test(start_paused = true)]
async fn a_heartbeat_restarts_the_default_sixty_seconds() {
    let ep = default_endpoint();
    let mut c = connect(&ep, "vsn=2.0.0").await;
    advance(Duration::from_secs(59)).await;
    c.send(r#"[null,"1","phoenix","heartbeat",{}]"#).await;
    c.reply().await;
    let heartbeat = Instant::now();
    stays_open_for(&mut c, Duration::from_secs(60) - MS).await;
    assert_eq!(c.closed().await, CloseReason::HeartbeatTimeout);
    assert_eq!(heartbeat.elapsed(), Duration::from_secs(60));
}

#[tokio::test(start_paused = true)]
async fn any_frame_and_a_transport_keep_alive_count_as_activity() {
    let (ep, _) = endpoint(Config::default().heartbeat_timeout(Duration::from_secs(10)));
    let mut c = connect(&ep, "vsn=2.0.0").await;
    c.send(r#"["1","1","room:a","phx_join",{}]"#).await;
    c.reply().await;
    stays_open_for(&mut c, Duration::from_secs(8)).await;
    // A push is as good as a heartbeat.
    c.send(r#"["1","2","room:a","ping",{}]"#).await;
    c.reply().await;
    stays_open_for(&mut c, Duration::from_secs(8)).await;
    // A long-poll GET, say: the transport vouches for the peer.
    c.out.keep_alive();
    let kept = Instant::now();
    stays_open_for(&mut c, Duration::from_secs(10) - MS).await;
    assert_eq!(c.closed().await, CloseReason::HeartbeatTimeout);
    assert_eq!(kept.elapsed(), Duration::from_secs(10));
}

#[tokio::test(start_paused = true)]
async fn malformed_frames_close_that_socket_only() {
    let join_on_v2 = r#"{"topic":"room:a","event":"phx_join","payload":{},"ref":"1"}"#;
    let bad_frames = [
        Frame::text("{oops"),
        Frame::text(r#"["1","2","t"]"#),
        Frame::text(r#"{"a":1}"#),
        Frame::text("42"),
        Frame::text(join_on_v2),
        // A reply (kind 1) is not something a client sends.
        Frame::Binary([&[1u8, 1, 1, 1, 2][..], b"1", b"2", b"t", b"ok"].concat().into()),
        // Cut short: the header announces more than the frame holds.
        Frame::Binary(vec![0u8, 1, 1, 8, 4, b'1'].into()),
    ];
    for bad in bad_frames {
        let ep = default_endpoint();
        let mut victim = connect(&ep, "vsn=2.0.0").await;
        let mut bystander = connect(&ep, "vsn=2.0.0").await;
        victim.send(r#"[null,"1","phoenix","heartbeat",{}]"#).await;
        let err = victim.session.handle_frame(bad.clone()).await.expect_err("a malformed frame closes");
        assert!(matches!(err, CloseReason::Malformed(_)), "{bad:?}: {err:?}");
        assert!(victim.session.handle_frame(Frame::text(r#"[null,"2","phoenix","heartbeat",{}]"#)).await.is_err());
        // What was queued before the bad frame is still delivered, then the reason; no reply to it.
        assert_eq!(victim.next_text().await, r#"[null,"1","phoenix","phx_reply",{"response":{},"status":"ok"}]"#);
        assert!(matches!(victim.out.recv().await, Err(CloseReason::Malformed(_))), "{bad:?}");
        bystander.send(r#"[null,"1","phoenix","heartbeat",{}]"#).await;
        assert_eq!(bystander.reply().await.status, ReplyStatus::Ok);
    }
}

#[tokio::test(start_paused = true)]
async fn a_v1_socket_refuses_v2_arrays_and_binary_frames() {
    let ep = default_endpoint();
    for bad in [Frame::text(r#"["1","1","room:a","phx_join",{}]"#), Frame::Binary(vec![0u8; 8].into())] {
        let mut v1 = connect(&ep, "vsn=1.0.0").await;
        let err = v1.session.handle_frame(bad.clone()).await.expect_err("wrong format for V1");
        assert!(matches!(err, CloseReason::Malformed(_)), "{bad:?}: {err:?}");
        assert!(matches!(v1.closed().await, CloseReason::Malformed(_)));
    }
}

#[tokio::test(start_paused = true)]
async fn frames_over_the_size_limit_close_the_socket() {
    let (ep, _) = endpoint(Config::default().max_frame_size(64));
    let mut c = connect(&ep, "vsn=2.0.0").await;
    let base = r#"[null,"1","phoenix","heartbeat",{"pad":""}]"#;
    let at_limit = base.replace(r#""pad":"""#, &format!(r#""pad":"{}""#, "x".repeat(64 - base.len())));
    assert_eq!(at_limit.len(), 64);
    c.send(&at_limit).await;
    assert_eq!(c.reply().await.status, ReplyStatus::Ok, "a frame of exactly the limit is fine");
    let big = format!(r#"["1","1","room:a","ping",{{"pad":"{}"}}]"#, "x".repeat(100));
    let err = c.session.handle_frame(Frame::text(big)).await.expect_err("too large");
    assert!(matches!(err, CloseReason::FrameTooLarge { max: 64, .. }), "{err:?}");
    assert!(matches!(c.closed().await, CloseReason::FrameTooLarge { max: 64, .. }));
}

async fn join_reason(c: &mut Client, i: u32) -> String {
    c.send(&format!(r#"["{i}","{i}","room:{i}","phx_join",{{}}]"#)).await;
    let r = c.reply().await;
    match r.status {
        ReplyStatus::Ok => "ok".to_owned(),
        ReplyStatus::Error => reason_of(&r).unwrap_or("?").to_owned(),
    }
}

#[tokio::test(start_paused = true)]
async fn a_flood_of_joins_is_rate_limited_and_capped() {
    let (ep, _) = endpoint(Config::default().join_rate(1, 5).max_channels_per_socket(3));
    let mut c = connect(&ep, "vsn=2.0.0").await;
    let mut reasons = Vec::new();
    for i in 0..8 {
        reasons.push(join_reason(&mut c, i).await);
    }
    assert_eq!(
        reasons,
        [
            "ok",
            "ok",
            "ok",
            "too many channels",
            "too many channels",
            "join rate exceeded",
            "join rate exceeded",
            "join rate exceeded"
        ]
    );
    c.send(r#"["0","99","room:0","ping",{}]"#).await;
    assert_eq!(c.reply().await.status, ReplyStatus::Ok, "the socket still works");

    // A leave makes room, but the bucket is empty until a second has passed.
    c.send(r#"["0","100","room:0","phx_leave",{}]"#).await;
    c.reply().await;
    assert_eq!(c.next_text().await, r#"["0","0","room:0","phx_close",{}]"#);
    assert_eq!(join_reason(&mut c, 8).await, "join rate exceeded");
    advance(Duration::from_secs(1) - MS).await;
    assert_eq!(join_reason(&mut c, 8).await, "join rate exceeded");
    advance(MS).await;
    assert_eq!(join_reason(&mut c, 8).await, "ok");
}

#[tokio::test(start_paused = true)]
async fn a_slow_consumer_is_disconnected_and_memory_stays_bounded() {
    let (ep, _) = endpoint(Config::default().outbound_queue_limit(100));
    let mut slow = connect(&ep, "vsn=2.0.0").await;
    slow.send(r#"["1","1","room:storm","phx_join",{}]"#).await;
    slow.reply().await;
    for i in 0..1000 {
        ep.pubsub().broadcast("room:storm", "tick", json!({ "i": i }));
    }
    let mut delivered = 0;
    let reason = loop {
        match slow.out.recv().await {
            Ok(_) => delivered += 1,
            Err(reason) => break reason,
        }
    };
    assert_eq!(reason, CloseReason::SlowConsumer);
    assert_eq!(delivered, 0, "the queue is dropped, not delivered, once the peer is declared slow");
}

#[tokio::test(start_paused = true)]
async fn the_queue_holds_exactly_its_limit() {
    let (ep, _) = endpoint(Config::default().outbound_queue_limit(10));
    let mut c = connect(&ep, "vsn=2.0.0").await;
    c.send(r#"["1","1","room:q","phx_join",{}]"#).await;
    c.reply().await;
    for i in 0..10 {
        ep.pubsub().broadcast("room:q", "tick", json!({ "i": i }));
    }
    assert!(!c.session.is_closed(), "ten frames fit");
    ep.pubsub().broadcast("room:q", "tick", json!({ "i": 10 }));
    assert!(c.session.is_closed(), "the eleventh does not");
    assert_eq!(c.out.recv().await, Err(CloseReason::SlowConsumer));
}

#[tokio::test(start_paused = true)]
async fn drop_oldest_keeps_the_newest_frames() {
    let (ep, _) = endpoint(Config::default().outbound_queue_limit(10).slow_consumer(SlowConsumerPolicy::DropOldest));
    let mut c = connect(&ep, "vsn=2.0.0").await;
    c.send(r#"["1","1","room:feed","phx_join",{}]"#).await;
    c.reply().await;
    for i in 0..100 {
        ep.pubsub().broadcast("room:feed", "tick", json!({ "i": i }));
    }
    let mut seen = Vec::new();
    let mut buf = Vec::new();
    c.out.try_recv_many(&mut buf, 1000);
    for frame in buf {
        if let ServerMessage::Broadcast(b) = c.serializer.decode_server(&frame).expect("decodes") {
            seen.push(b.payload.as_json().and_then(|v| v["i"].as_i64()).expect("i"));
        }
    }
    assert_eq!(seen, (90..100).collect::<Vec<_>>());
    assert!(c.is_quiet(), "the socket stays open");
}

#[tokio::test(start_paused = true)]
async fn connect_refusals_and_unsupported_versions() {
    let ep = default_endpoint();
    let refused = ConnectInfo::new("memory", true).with_query(Some("vsn=2.0.0&reject=true"));
    assert!(matches!(ep.connect(refused).await, Err(ConnectError::Refused(_))));
    let bad_vsn = ConnectInfo::new("memory", true).with_query(Some("vsn=3.0.0"));
    assert!(matches!(ep.connect(bad_vsn).await, Err(ConnectError::UnsupportedVsn(_))));
    assert_eq!(ep.connected(), 0);
}

#[tokio::test(start_paused = true)]
async fn shutdown_closes_every_socket_and_refuses_new_ones() {
    let ep = default_endpoint();
    let mut a = connect(&ep, "vsn=2.0.0").await;
    let mut b = connect(&ep, "vsn=1.0.0").await;
    a.send(r#"[null,"1","phoenix","heartbeat",{}]"#).await;
    assert_eq!(ep.shutdown(), 2);
    assert_eq!(a.reply().await.status, ReplyStatus::Ok, "what was queued is still delivered");
    assert_eq!(a.closed().await, CloseReason::Shutdown);
    assert_eq!(b.closed().await, CloseReason::Shutdown);
    let late = ConnectInfo::new("memory", true).with_query(Some("vsn=2.0.0"));
    assert!(matches!(ep.connect(late).await, Err(ConnectError::ShuttingDown)));
    drop((a, b));
    timeout(Duration::from_secs(1), ep.drained()).await.expect("drained");
}

#[tokio::test(start_paused = true)]
async fn disconnect_closes_the_sockets_of_one_id_only() {
    let ep = default_endpoint();
    let mut first = connect(&ep, "vsn=2.0.0&id=user:1").await;
    let mut second = connect(&ep, "vsn=2.0.0&id=user:1").await;
    let mut other = connect(&ep, "vsn=2.0.0&id=user:2").await;
    assert_eq!(ep.disconnect("user:1"), 2);
    assert_eq!(first.closed().await, CloseReason::Disconnected);
    assert_eq!(second.closed().await, CloseReason::Disconnected);
    other.send(r#"[null,"1","phoenix","heartbeat",{}]"#).await;
    assert_eq!(other.reply().await.status, ReplyStatus::Ok);
}

#[tokio::test(start_paused = true)]
async fn dropping_the_session_ends_its_channels_and_subscriptions() {
    let (ep, mut ended) = endpoint(Config::default());
    let mut c = connect(&ep, "vsn=2.0.0").await;
    c.send(r#"["1","1","room:gone","phx_join",{}]"#).await;
    c.reply().await;
    assert_eq!(ep.pubsub().subscriber_count("room:gone"), 1);
    drop(c);
    assert_eq!(ep.connected(), 0);
    let end = next_end(&mut ended).await;
    assert_eq!((end.topic.as_str(), end.why), ("room:gone", Terminate::SocketClosed));
    // One thread: the channel task ran to its end (terminate, then unsubscribe) before this one
    // was woken.
    assert_eq!(ep.pubsub().subscriber_count("room:gone"), 0);
}
