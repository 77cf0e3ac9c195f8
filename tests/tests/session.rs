//! The session state machine, driven in memory as a transport would drive it.

use std::time::Duration;

use fawkes::{CloseReason, Config, ConnectInfo, Endpoint, Outbound, Session, SlowConsumerPolicy};
use fawkes_serializer::{Frame, Payload, Ref, ReplyStatus, Serializer, ServerMessage};
use fawkes_tests::BINARY;
use serde_json::json;

struct Client {
    session: Session,
    out: Outbound,
    serializer: Serializer,
}

async fn connect(endpoint: &Endpoint, vsn: &str) -> Client {
    let info = ConnectInfo::new("memory", true).with_query(Some(&format!("vsn={vsn}")));
    let session = endpoint.connect(info).await.expect("connect accepted");
    let out = session.outbound();
    let serializer = session.serializer();
    Client { session, out, serializer }
}

impl Client {
    async fn send(&mut self, text: &str) {
        self.session.handle_frame(Frame::text(text)).await.expect("session open");
    }
    async fn next(&mut self) -> ServerMessage {
        let frame = tokio::time::timeout(Duration::from_secs(5), self.out.recv())
            .await
            .expect("a frame within 5 s")
            .expect("session open");
        self.serializer.decode_server(&frame).expect("server frames decode")
    }
    async fn next_text(&mut self) -> String {
        let frame = tokio::time::timeout(Duration::from_secs(5), self.out.recv()).await.expect("frame").expect("open");
        String::from_utf8(frame.as_bytes().to_vec()).expect("text frame")
    }
    /// The next frame that is not Presence (`presence_state`, `presence_diff`), which the demo
    /// sends to joins that name a user, in an order of its own.
    async fn next_chat_text(&mut self) -> String {
        loop {
            let text = self.next_text().await;
            if !text.contains(r#""presence_state""#) && !text.contains(r#""presence_diff""#) {
                return text;
            }
        }
    }
    /// The next Presence event's (event, payload), skipping anything else.
    async fn next_presence(&mut self) -> (String, serde_json::Value) {
        loop {
            let (event, payload) = match self.next().await {
                ServerMessage::Push(p) => (p.event, p.payload),
                ServerMessage::Broadcast(b) => (b.event, b.payload),
                ServerMessage::Reply(_) => continue,
            };
            if event.starts_with("presence_") {
                return (event, payload.as_json().cloned().unwrap_or_default());
            }
        }
    }
    async fn closed(&mut self) -> CloseReason {
        loop {
            match tokio::time::timeout(Duration::from_secs(5), self.out.recv()).await.expect("closes within 5 s") {
                Ok(_) => continue,
                Err(reason) => return reason,
            }
        }
    }
}

fn reply(m: ServerMessage) -> fawkes_serializer::Reply {
    match m {
        ServerMessage::Reply(r) => r,
        other => panic!("expected a reply, got {other:?}"),
    }
}

fn endpoint() -> Endpoint {
    fawkes_tests::endpoint(Config::default())
}

#[tokio::test]
async fn join_push_reply_and_broadcast_in_order() {
    let ep = endpoint();
    let mut c = connect(&ep, "2.0.0").await;
    c.send(r#"["1","1","room:lobby","phx_join",{"user":"ann"}]"#).await;
    assert_eq!(c.next_text().await, r#"["1","1","room:lobby","phx_reply",{"response":{},"status":"ok"}]"#);
    c.send(r#"["1","2","room:lobby","new_msg",{"body":"hi"}]"#).await;
    // The broadcast is queued by the channel before its reply.
    assert_eq!(c.next_chat_text().await, r#"[null,null,"room:lobby","new_msg",{"body":"hi","user":"ann"}]"#);
    assert_eq!(c.next_chat_text().await, r#"["1","2","room:lobby","phx_reply",{"response":{},"status":"ok"}]"#);
    c.send(r#"["1","3","room:lobby","dance",{}]"#).await;
    let r = reply(c.next().await);
    assert_eq!((r.status, r.response), (ReplyStatus::Error, Payload::Json(json!({"reason": "unknown event"}))));
}

#[tokio::test]
async fn unmatched_and_refused_joins() {
    let ep = endpoint();
    let mut c = connect(&ep, "2.0.0").await;
    c.send(r#"["1","1","nope:1","phx_join",{}]"#).await;
    assert_eq!(
        c.next_text().await,
        r#"[null,"1","nope:1","phx_reply",{"response":{"reason":"unmatched topic"},"status":"error"}]"#
    );
    c.send(r#"["2","2","admin:x","phx_join",{}]"#).await;
    assert_eq!(
        c.next_text().await,
        r#"["2","2","admin:x","phx_reply",{"response":{"reason":"unauthorized"},"status":"error"}]"#
    );
    c.send(r#"["3","3","admin:x","anything",{}]"#).await;
    assert_eq!(
        c.next_text().await,
        r#"[null,"3","admin:x","phx_reply",{"response":{"reason":"unmatched topic"},"status":"error"}]"#
    );
    c.send("[null,null,null,null,null]").await;
    let r = reply(c.next().await);
    assert_eq!(r.response, Payload::Json(json!({"reason": "unmatched topic"})));
}

#[tokio::test]
async fn heartbeat_is_answered_with_a_null_join_ref() {
    let ep = endpoint();
    let mut c = connect(&ep, "2.0.0").await;
    c.send(r#"[null,"9","phoenix","heartbeat",{}]"#).await;
    assert_eq!(c.next_text().await, r#"[null,"9","phoenix","phx_reply",{"response":{},"status":"ok"}]"#);
}

#[tokio::test]
async fn leave_replies_then_closes_and_later_pushes_are_unmatched() {
    let ep = endpoint();
    let mut c = connect(&ep, "2.0.0").await;
    c.send(r#"["1","1","room:a","phx_join",{}]"#).await;
    reply(c.next().await);
    c.send(r#"["1","2","room:a","phx_leave",{}]"#).await;
    assert_eq!(c.next_text().await, r#"["1","2","room:a","phx_reply",{"response":{},"status":"ok"}]"#);
    assert_eq!(c.next_text().await, r#"["1","1","room:a","phx_close",{}]"#);
    c.send(r#"["1","3","room:a","ping",{}]"#).await;
    assert_eq!(reply(c.next().await).response, Payload::Json(json!({"reason": "unmatched topic"})));
    c.send(r#"["5","4","room:never","phx_leave",{}]"#).await;
    assert_eq!(reply(c.next().await).status, ReplyStatus::Ok);
}

#[tokio::test]
async fn duplicate_join_replies_then_closes_the_old_instance_and_ignores_its_ref() {
    let ep = endpoint();
    let mut c = connect(&ep, "2.0.0").await;
    c.send(r#"["1","1","room:a","phx_join",{}]"#).await;
    reply(c.next().await);
    c.send(r#"["2","2","room:a","phx_join",{}]"#).await;
    assert_eq!(c.next_text().await, r#"["2","2","room:a","phx_reply",{"response":{},"status":"ok"}]"#);
    assert_eq!(c.next_text().await, r#"["1","1","room:a","phx_close",{}]"#);
    c.send(r#"["1","3","room:a","ping",{"stale":true}]"#).await;
    c.send(r#"["2","4","room:a","ping",{"fresh":true}]"#).await;
    let r = reply(c.next().await);
    assert_eq!(r.msg_ref, Some(Ref::new("4")), "the stale push got no answer");
    // Only one subscription remains: a broadcast arrives once.
    ep.pubsub().broadcast("room:a", "news", json!({}));
    c.send(r#"[null,"5","phoenix","heartbeat",{}]"#).await;
    assert!(matches!(c.next().await, ServerMessage::Broadcast(_)));
    assert_eq!(reply(c.next().await).msg_ref, Some(Ref::new("5")));
}

#[tokio::test]
async fn a_crashing_channel_errors_alone_and_can_be_rejoined() {
    let ep = endpoint();
    let mut c = connect(&ep, "2.0.0").await;
    c.send(r#"["1","1","test:crashy","phx_join",{}]"#).await;
    reply(c.next().await);
    c.send(r#"["2","2","room:calm","phx_join",{}]"#).await;
    reply(c.next().await);
    c.send(r#"["1","3","test:crashy","crash",{}]"#).await;
    assert_eq!(c.next_text().await, r#"["1","1","test:crashy","phx_error",{}]"#);
    c.send(r#"["2","4","room:calm","ping",{"still":"here"}]"#).await;
    assert_eq!(reply(c.next().await).response, Payload::Json(json!({"still": "here"})));
    c.send(r#"["5","5","test:crashy","phx_join",{}]"#).await;
    let r = reply(c.next().await);
    assert_eq!((r.status, r.join_ref), (ReplyStatus::Ok, Some(Ref::new("5"))));
    assert!(ep.connected() == 1);
}

#[tokio::test]
async fn a_crash_in_join_is_an_error_reply() {
    let ep = endpoint();
    let mut c = connect(&ep, "2.0.0").await;
    c.send(r#"["1","1","test:x","phx_join",{"crash":true}]"#).await;
    let r = reply(c.next().await);
    assert_eq!((r.status, r.response), (ReplyStatus::Error, Payload::Json(json!({"reason": "join crashed"}))));
}

#[tokio::test]
async fn stop_closes_the_channel_after_its_reply() {
    let ep = endpoint();
    let mut c = connect(&ep, "2.0.0").await;
    c.send(r#"["1","1","test:s","phx_join",{}]"#).await;
    reply(c.next().await);
    c.send(r#"["1","2","test:s","stop",{}]"#).await;
    assert_eq!(reply(c.next().await).status, ReplyStatus::Ok);
    assert_eq!(c.next_text().await, r#"["1","1","test:s","phx_close",{}]"#);
}

#[tokio::test]
async fn broadcast_from_skips_the_sender_and_push_reaches_only_one_socket() {
    let ep = endpoint();
    let mut a = connect(&ep, "2.0.0").await;
    let mut b = connect(&ep, "2.0.0").await;
    for c in [&mut a, &mut b] {
        c.send(r#"["1","1","test:room","phx_join",{}]"#).await;
        reply(c.next().await);
    }
    a.send(r#"["1","2","test:room","broadcast_from",{"event":"hey","payload":{"n":1}}]"#).await;
    assert_eq!(reply(a.next().await).msg_ref, Some(Ref::new("2")), "sender gets only its reply");
    assert_eq!(b.next_text().await, r#"[null,null,"test:room","hey",{"n":1}]"#);
    a.send(r#"["1","3","test:room","push",{"event":"private","payload":{}}]"#).await;
    assert_eq!(a.next_text().await, r#"["1",null,"test:room","private",{}]"#);
    reply(a.next().await);
    b.send(r#"[null,"9","phoenix","heartbeat",{}]"#).await;
    assert_eq!(reply(b.next().await).msg_ref, Some(Ref::new("9")), "b did not get a's push");
}

#[tokio::test]
async fn v1_and_v2_sockets_share_a_broadcast_each_in_its_own_form() {
    let ep = endpoint();
    let mut v1 = connect(&ep, "1.0.0").await;
    let mut v2 = connect(&ep, "2.0.0").await;
    v1.send(r#"{"topic":"room:mix","event":"phx_join","payload":{"user":"old"},"ref":"1"}"#).await;
    assert_eq!(
        v1.next_text().await,
        r#"{"event":"phx_reply","payload":{"response":{},"status":"ok"},"ref":"1","topic":"room:mix"}"#
    );
    v2.send(r#"["1","1","room:mix","phx_join",{}]"#).await;
    assert!(v2.next_chat_text().await.contains("phx_reply"));
    v1.send(r#"{"topic":"room:mix","event":"new_msg","payload":{"body":"yo"},"ref":"2"}"#).await;
    assert_eq!(
        v1.next_chat_text().await,
        r#"{"event":"new_msg","payload":{"body":"yo","user":"old"},"ref":null,"topic":"room:mix"}"#
    );
    assert_eq!(v2.next_chat_text().await, r#"[null,null,"room:mix","new_msg",{"body":"yo","user":"old"}]"#);
}

#[tokio::test]
async fn presence_state_on_join_then_diffs_as_users_come_and_go() {
    let ep = endpoint();
    let mut a = connect(&ep, "2.0.0").await;
    a.send(r#"["1","1","room:here","phx_join",{"user":"ann"}]"#).await;
    // presence_state lists ann; the diff of her own join may come before or after it.
    let state = loop {
        let (event, payload) = a.next_presence().await;
        if event == "presence_state" {
            break payload;
        }
    };
    let metas = state["ann"]["metas"].as_array().expect("ann is listed");
    assert_eq!(metas.len(), 1, "{state}");
    assert!(metas[0]["phx_ref"].is_string() && metas[0]["online_at"].is_u64(), "{state}");

    let mut b = connect(&ep, "2.0.0").await;
    b.send(r#"["2","1","room:here","phx_join",{"user":"bob"}]"#).await;
    let bob_ref = loop {
        let (event, diff) = a.next_presence().await;
        if event == "presence_diff" && diff["joins"].get("bob").is_some() {
            assert_eq!(diff["leaves"], json!({}), "{diff}");
            break diff["joins"]["bob"]["metas"][0]["phx_ref"].clone();
        }
    };
    b.send(r#"["2","2","room:here","phx_leave",{}]"#).await;
    loop {
        let (event, diff) = a.next_presence().await;
        if event == "presence_diff" && diff["leaves"].get("bob").is_some() {
            assert_eq!(diff["leaves"]["bob"]["metas"][0]["phx_ref"], bob_ref, "{diff}");
            break;
        }
    }
    assert_eq!(ep.pubsub().presence().list("room:here").as_object().map(|o| o.len()), Some(1));
}

#[tokio::test]
async fn binary_payloads_use_the_binary_layout() {
    let ep = endpoint();
    let mut c = connect(&ep, "2.0.0").await;
    c.send(r#"["1","1","test:bin","phx_join",{}]"#).await;
    reply(c.next().await);
    let push = [&[0u8, 1, 1, 8, 4][..], b"1", b"2", b"test:bin", b"echo", &[0, 1, 2, 0xfa]].concat();
    c.session.handle_frame(Frame::Binary(push.into())).await.expect("open");
    let frame = c.out.recv().await.expect("reply");
    assert_eq!(
        frame,
        Frame::Binary([&[1u8, 1, 1, 8, 2][..], b"1", b"2", b"test:bin", b"ok", &[0, 1, 2, 0xfa]].concat().into())
    );
    c.send(r#"["1","3","test:bin","binary_broadcast",{}]"#).await;
    let frame = c.out.recv().await.expect("broadcast");
    assert_eq!(frame, Frame::Binary([&[2u8, 8, 6][..], b"test:bin", b"binary", &BINARY].concat().into()));
}

#[tokio::test]
async fn a_burst_of_a_thousand_pushes_is_answered_in_order() {
    let ep = endpoint();
    let mut c = connect(&ep, "2.0.0").await;
    c.send(r#"["1","0","room:burst","phx_join",{}]"#).await;
    reply(c.next().await);
    for i in 1..=1000 {
        c.send(&format!(r#"["1","{i}","room:burst","ping",{{"i":{i}}}]"#)).await;
    }
    for i in 1..=1000 {
        let r = reply(c.next().await);
        assert_eq!(r.msg_ref, Some(Ref::new(i.to_string())));
        assert_eq!(r.response, Payload::Json(json!({ "i": i })));
    }
}

#[tokio::test]
async fn malformed_frames_close_that_socket_only() {
    for bad in ["{oops", r#"["1","2","t"]"#, r#"{"a":1}"#, "42"] {
        let ep = endpoint();
        let mut victim = connect(&ep, "2.0.0").await;
        let mut bystander = connect(&ep, "2.0.0").await;
        let err = victim.session.handle_frame(Frame::text(bad)).await.expect_err(bad);
        assert!(matches!(err, CloseReason::Malformed(_)), "{bad}: {err:?}");
        assert!(matches!(victim.closed().await, CloseReason::Malformed(_)));
        bystander.send(r#"[null,"1","phoenix","heartbeat",{}]"#).await;
        assert_eq!(reply(bystander.next().await).status, ReplyStatus::Ok);
    }
}

#[tokio::test]
async fn v1_sockets_refuse_binary_frames_and_frames_over_the_limit_close() {
    let ep = endpoint();
    let mut v1 = connect(&ep, "1.0.0").await;
    let err = v1.session.handle_frame(Frame::Binary(vec![0u8; 8].into())).await.expect_err("binary on V1");
    assert!(matches!(err, CloseReason::Malformed(_)));

    let ep = fawkes_tests::endpoint(Config::default().max_frame_size(64));
    let mut c = connect(&ep, "2.0.0").await;
    let big = format!(r#"["1","1","room:a","ping",{{"pad":"{}"}}]"#, "x".repeat(100));
    let err = c.session.handle_frame(Frame::text(big)).await.expect_err("too large");
    assert!(matches!(err, CloseReason::FrameTooLarge { max: 64, .. }), "{err:?}");
}

#[tokio::test]
async fn a_flood_of_joins_is_rate_limited_and_capped() {
    let ep = fawkes_tests::endpoint(Config::default().join_rate(1, 5).max_channels_per_socket(3));
    let mut c = connect(&ep, "2.0.0").await;
    let mut reasons = Vec::new();
    for i in 0..8 {
        c.send(&format!(r#"["{i}","{i}","room:{i}","phx_join",{{}}]"#)).await;
        let r = reply(c.next().await);
        reasons.push(match r.status {
            ReplyStatus::Ok => "ok".to_owned(),
            ReplyStatus::Error => r.response.as_json().and_then(|v| v["reason"].as_str()).unwrap_or("?").to_owned(),
        });
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
    assert_eq!(reply(c.next().await).status, ReplyStatus::Ok, "the socket still works");
}

#[tokio::test]
async fn a_slow_consumer_is_disconnected_and_memory_stays_bounded() {
    let ep = fawkes_tests::endpoint(Config::default().outbound_queue_limit(100));
    let mut slow = connect(&ep, "2.0.0").await;
    slow.send(r#"["1","1","room:storm","phx_join",{}]"#).await;
    reply(slow.next().await);
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

#[tokio::test]
async fn drop_oldest_keeps_the_newest_frames() {
    let ep = fawkes_tests::endpoint(
        Config::default().outbound_queue_limit(10).slow_consumer(SlowConsumerPolicy::DropOldest),
    );
    let mut c = connect(&ep, "2.0.0").await;
    c.send(r#"["1","1","room:feed","phx_join",{}]"#).await;
    reply(c.next().await);
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
}

#[tokio::test(start_paused = true)]
async fn an_idle_socket_is_closed_after_the_heartbeat_timeout() {
    let ep = fawkes_tests::endpoint(Config::default().heartbeat_timeout(Duration::from_secs(60)));
    let mut c = connect(&ep, "2.0.0").await;
    tokio::time::advance(Duration::from_secs(59)).await;
    c.send(r#"[null,"1","phoenix","heartbeat",{}]"#).await;
    reply(c.next().await);
    let started = tokio::time::Instant::now();
    let closed = tokio::time::timeout(Duration::from_secs(120), c.out.recv()).await.expect("closes");
    assert_eq!(closed, Err(CloseReason::HeartbeatTimeout));
    let waited = started.elapsed();
    assert!(waited >= Duration::from_secs(59) && waited <= Duration::from_secs(61), "closed after {waited:?}");
}

#[tokio::test]
async fn connect_refusals_and_unsupported_versions() {
    let ep = endpoint();
    let refused = ConnectInfo::new("memory", true).with_query(Some("vsn=2.0.0&reject=true"));
    assert!(matches!(ep.connect(refused).await, Err(fawkes::ConnectError::Refused(_))));
    let bad_vsn = ConnectInfo::new("memory", true).with_query(Some("vsn=3.0.0"));
    assert!(matches!(ep.connect(bad_vsn).await, Err(fawkes::ConnectError::UnsupportedVsn(_))));
    assert_eq!(ep.connected(), 0);
}

#[tokio::test]
async fn shutdown_closes_every_socket_and_refuses_new_ones() {
    let ep = endpoint();
    let mut a = connect(&ep, "2.0.0").await;
    let mut b = connect(&ep, "1.0.0").await;
    assert_eq!(ep.shutdown(), 2);
    assert_eq!(a.closed().await, CloseReason::Shutdown);
    assert_eq!(b.closed().await, CloseReason::Shutdown);
    let late = ConnectInfo::new("memory", true).with_query(Some("vsn=2.0.0"));
    assert!(matches!(ep.connect(late).await, Err(fawkes::ConnectError::ShuttingDown)));
    drop((a, b));
    tokio::time::timeout(Duration::from_secs(1), ep.drained()).await.expect("drained");
}

#[tokio::test]
async fn dropping_the_session_ends_its_channels_and_subscriptions() {
    let ep = endpoint();
    let mut c = connect(&ep, "2.0.0").await;
    c.send(r#"["1","1","room:gone","phx_join",{}]"#).await;
    reply(c.next().await);
    assert_eq!(ep.pubsub().subscriber_count("room:gone"), 1);
    drop(c);
    tokio::time::timeout(Duration::from_secs(5), async {
        while ep.pubsub().subscriber_count("room:gone") > 0 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("unsubscribed");
    assert_eq!(ep.connected(), 0);
}

#[tokio::test]
async fn after_join_pushes_follow_the_join_reply() {
    let ep = endpoint();
    let mut c = connect(&ep, "2.0.0").await;
    c.send(r#"["1","1","test:hi","phx_join",{"welcome":true}]"#).await;
    assert_eq!(reply(c.next().await).status, ReplyStatus::Ok);
    assert_eq!(c.next_text().await, r#"["1",null,"test:hi","welcome",{"topic":"test:hi"}]"#);
}

#[tokio::test]
async fn a_pusher_pushes_from_another_task_until_its_channel_ends() {
    let ep = endpoint();
    let mut c = connect(&ep, "2.0.0").await;
    c.send(r#"["1","1","test:p","phx_join",{}]"#).await;
    reply(c.next().await);
    c.send(r#"["1","2","test:p","deferred_push",{"n":7}]"#).await;
    assert_eq!(reply(c.next().await).msg_ref, Some(Ref::new("2")));
    assert_eq!(c.next_text().await, r#"["1",null,"test:p","deferred",{"n":7}]"#);
}
