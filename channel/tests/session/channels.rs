//! Joins, pushes and replies, leaves, duplicate joins, crashes, broadcasts, Presence and binary
//! payloads, as the peer sees them on the wire.

use std::time::Duration;

use fawkes_channel::{Config, ConnectInfo, Endpoint, Frame, Payload, Ref, ReplyStatus, StopReason, Terminate};
use fawkes_serializer::ServerMessage;
use futures_util::FutureExt as _;
use serde_json::json;
use tokio::time::timeout;

use crate::support::{BINARY, Ended, connect, connect_with, endpoint, next_end, reason_of};

fn default_endpoint() -> Endpoint {
    endpoint(Config::default()).0
}

#[tokio::test(start_paused = true)]
async fn join_push_reply_and_broadcast_in_order() {
    let ep = default_endpoint();
    let mut c = connect(&ep, "vsn=2.0.0").await;
    c.send(r#"["1","1","room:lobby","phx_join",{"user":"ann"}]"#).await;
    assert_eq!(c.next_text().await, r#"["1","1","room:lobby","phx_reply",{"response":{},"status":"ok"}]"#);
    c.send(r#"["1","2","room:lobby","new_msg",{"body":"hi"}]"#).await;
    // The broadcast is queued by the channel before its reply.
    assert_eq!(c.next_text().await, r#"[null,null,"room:lobby","new_msg",{"body":"hi","user":"ann"}]"#);
    assert_eq!(c.next_text().await, r#"["1","2","room:lobby","phx_reply",{"response":{},"status":"ok"}]"#);
    c.send(r#"["1","3","room:lobby","dance",{}]"#).await;
    let r = c.reply().await;
    assert_eq!((r.status, r.response), (ReplyStatus::Error, Payload::Json(json!({"reason": "unknown event"}))));
}

#[tokio::test(start_paused = true)]
async fn a_push_is_answered_ok_with_an_error_or_not_at_all_as_the_channel_decides() {
    let ep = default_endpoint();
    let mut c = connect(&ep, "vsn=2.0.0").await;
    c.send(r#"["1","1","test:r","phx_join",{}]"#).await;
    c.reply().await;
    c.send(r#"["1","2","test:r","echo",{"a":1}]"#).await;
    assert_eq!(c.next_text().await, r#"["1","2","test:r","phx_reply",{"response":{"a":1},"status":"ok"}]"#);
    c.send(r#"["1","3","test:r","error_reply",{}]"#).await;
    assert_eq!(
        c.next_text().await,
        r#"["1","3","test:r","phx_reply",{"response":{"reason":"requested"},"status":"error"}]"#
    );
    c.send(r#"["1","4","test:r","noreply",{}]"#).await;
    c.send(r#"[null,"5","phoenix","heartbeat",{}]"#).await;
    assert_eq!(c.reply().await.msg_ref, Some(Ref::new("5")), "the noreply push got no answer");
    assert!(c.is_quiet());
}

#[tokio::test(start_paused = true)]
async fn unmatched_and_refused_joins() {
    let ep = default_endpoint();
    let mut c = connect(&ep, "vsn=2.0.0").await;
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
    let r = c.reply().await;
    assert_eq!(r.response, Payload::Json(json!({"reason": "unmatched topic"})));
}

#[tokio::test(start_paused = true)]
async fn pushes_sent_before_a_refusal_arrived_are_unmatched() {
    let ep = default_endpoint();
    let mut c = connect(&ep, "vsn=2.0.0").await;
    // The client does not wait for the join's reply before pushing.
    c.send(r#"["1","1","test:no","phx_join",{"refuse":"closed"}]"#).await;
    c.send(r#"["1","2","test:no","echo",{}]"#).await;
    assert_eq!(
        c.next_text().await,
        r#"["1","1","test:no","phx_reply",{"response":{"reason":"closed"},"status":"error"}]"#
    );
    assert_eq!(
        c.next_text().await,
        r#"[null,"2","test:no","phx_reply",{"response":{"reason":"unmatched topic"},"status":"error"}]"#
    );
    assert!(c.is_quiet());
}

#[tokio::test(start_paused = true)]
async fn a_topic_longer_than_the_limit_is_refused() {
    let ep = default_endpoint();
    let mut c = connect(&ep, "vsn=2.0.0").await;
    let topic = format!("room:{}", "x".repeat(251));
    assert_eq!(topic.len(), 256);
    c.send(&format!(r#"["1","1","{topic}","phx_join",{{}}]"#)).await;
    let r = c.reply().await;
    assert_eq!((r.status, r.join_ref.as_ref(), reason_of(&r)), (ReplyStatus::Error, None, Some("topic too long")));
    c.send(&format!(r#"["2","2","{}","phx_join",{{}}]"#, &topic[..255])).await;
    assert_eq!(c.reply().await.status, ReplyStatus::Ok, "255 bytes is within the limit");
}

#[tokio::test(start_paused = true)]
async fn heartbeat_is_answered_with_a_null_join_ref() {
    let ep = default_endpoint();
    let mut c = connect(&ep, "vsn=2.0.0").await;
    c.send(r#"[null,"9","phoenix","heartbeat",{}]"#).await;
    assert_eq!(c.next_text().await, r#"[null,"9","phoenix","phx_reply",{"response":{},"status":"ok"}]"#);
}

#[tokio::test(start_paused = true)]
async fn a_numeric_ref_is_echoed_as_given_and_a_sixth_element_is_ignored() {
    let ep = default_endpoint();
    let mut c = connect(&ep, "vsn=2.0.0").await;
    c.send(r#"[null,7,"phoenix","heartbeat",{},"extra"]"#).await;
    assert_eq!(c.next_text().await, r#"[null,7,"phoenix","phx_reply",{"response":{},"status":"ok"}]"#);
}

#[tokio::test(start_paused = true)]
async fn leave_replies_then_closes_and_later_pushes_are_unmatched() {
    let (ep, mut ended) = endpoint(Config::default());
    let mut c = connect(&ep, "vsn=2.0.0").await;
    c.send(r#"["1","1","room:a","phx_join",{}]"#).await;
    c.reply().await;
    c.send(r#"["1","2","room:a","phx_leave",{}]"#).await;
    assert_eq!(c.next_text().await, r#"["1","2","room:a","phx_reply",{"response":{},"status":"ok"}]"#);
    assert_eq!(c.next_text().await, r#"["1","1","room:a","phx_close",{}]"#);
    let left = Ended { topic: "room:a".into(), join_ref: Some("1".into()), why: Terminate::Leave };
    assert_eq!(next_end(&mut ended).await, left);
    c.send(r#"["1","3","room:a","ping",{}]"#).await;
    assert_eq!(c.reply().await.response, Payload::Json(json!({"reason": "unmatched topic"})));
    c.send(r#"["5","4","room:never","phx_leave",{}]"#).await;
    assert_eq!(c.reply().await.status, ReplyStatus::Ok);
    assert_eq!(ep.pubsub().subscriber_count("room:a"), 0);
}

#[tokio::test(start_paused = true)]
async fn a_v1_leave_closes_with_the_join_ref_in_ref() {
    let ep = default_endpoint();
    let mut c = connect(&ep, "vsn=1.0.0").await;
    c.send(r#"{"topic":"room:v1","event":"phx_join","payload":{},"ref":"1"}"#).await;
    assert_eq!(
        c.next_text().await,
        r#"{"event":"phx_reply","payload":{"response":{},"status":"ok"},"ref":"1","topic":"room:v1"}"#
    );
    c.send(r#"{"topic":"room:v1","event":"phx_leave","payload":{},"ref":"2"}"#).await;
    assert_eq!(
        c.next_text().await,
        r#"{"event":"phx_reply","payload":{"response":{},"status":"ok"},"ref":"2","topic":"room:v1"}"#
    );
    assert_eq!(c.next_text().await, r#"{"event":"phx_close","payload":{},"ref":"1","topic":"room:v1"}"#);
}

#[tokio::test(start_paused = true)]
async fn duplicate_join_replies_then_closes_the_old_instance_and_ignores_its_ref() {
    let (ep, mut ended) = endpoint(Config::default());
    let mut c = connect(&ep, "vsn=2.0.0").await;
    c.send(r#"["1","1","room:a","phx_join",{}]"#).await;
    c.reply().await;
    c.send(r#"["2","2","room:a","phx_join",{}]"#).await;
    assert_eq!(c.next_text().await, r#"["2","2","room:a","phx_reply",{"response":{},"status":"ok"}]"#);
    assert_eq!(c.next_text().await, r#"["1","1","room:a","phx_close",{}]"#);
    let replaced = Ended { topic: "room:a".into(), join_ref: Some("1".into()), why: Terminate::Replaced };
    assert_eq!(next_end(&mut ended).await, replaced);
    c.send(r#"["1","3","room:a","ping",{"stale":true}]"#).await;
    c.send(r#"["2","4","room:a","ping",{"fresh":true}]"#).await;
    let r = c.reply().await;
    assert_eq!(r.msg_ref, Some(Ref::new("4")), "the stale push got no answer");
    // Only one subscription remains: a broadcast arrives once.
    ep.pubsub().broadcast("room:a", "news", json!({}));
    c.send(r#"[null,"5","phoenix","heartbeat",{}]"#).await;
    assert!(matches!(c.next().await, ServerMessage::Broadcast(_)));
    assert_eq!(c.reply().await.msg_ref, Some(Ref::new("5")));
    assert_eq!(ep.pubsub().subscriber_count("room:a"), 1);
}

#[tokio::test(start_paused = true)]
async fn a_leave_carrying_a_stale_join_ref_does_not_end_the_current_instance() {
    let (ep, mut ended) = endpoint(Config::default());
    let mut c = connect(&ep, "vsn=2.0.0").await;
    c.send(r#"["1","1","room:a","phx_join",{}]"#).await;
    c.reply().await;
    c.send(r#"["2","2","room:a","phx_join",{}]"#).await;
    c.reply().await;
    assert_eq!(c.next_text().await, r#"["1","1","room:a","phx_close",{}]"#);
    assert_eq!(next_end(&mut ended).await.why, Terminate::Replaced);
    c.send(r#"["1","3","room:a","phx_leave",{}]"#).await;
    // The stale leave is acknowledged (its own instance is gone already) and nothing is closed.
    assert_eq!(c.next_text().await, r#"["1","3","room:a","phx_reply",{"response":{},"status":"ok"}]"#);
    c.send(r#"["2","4","room:a","ping",{"n":1}]"#).await;
    assert_eq!(c.next_text().await, r#"["2","4","room:a","phx_reply",{"response":{"n":1},"status":"ok"}]"#);
    assert!(c.is_quiet(), "no phx_close for the current join");
    assert!(ended.try_recv().is_err(), "the current instance is still running");
}

#[tokio::test(start_paused = true)]
async fn a_crashing_channel_errors_alone_and_can_be_rejoined() {
    let ep = default_endpoint();
    let mut c = connect(&ep, "vsn=2.0.0").await;
    c.send(r#"["1","1","test:crashy","phx_join",{}]"#).await;
    c.reply().await;
    c.send(r#"["2","2","room:calm","phx_join",{}]"#).await;
    c.reply().await;
    c.send(r#"["1","3","test:crashy","crash",{}]"#).await;
    assert_eq!(c.next_text().await, r#"["1","1","test:crashy","phx_error",{}]"#);
    c.send(r#"["2","4","room:calm","ping",{"still":"here"}]"#).await;
    assert_eq!(c.reply().await.response, Payload::Json(json!({"still": "here"})));
    c.send(r#"["1","5","test:crashy","ping",{}]"#).await;
    assert_eq!(reason_of(&c.reply().await), Some("unmatched topic"), "the crashed instance is gone");
    c.send(r#"["6","6","test:crashy","phx_join",{}]"#).await;
    let r = c.reply().await;
    assert_eq!((r.status, r.join_ref), (ReplyStatus::Ok, Some(Ref::new("6"))));
    assert_eq!(ep.connected(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_crash_in_join_is_an_error_reply() {
    let ep = default_endpoint();
    let mut c = connect(&ep, "vsn=2.0.0").await;
    c.send(r#"["1","1","test:x","phx_join",{"crash":true}]"#).await;
    let r = c.reply().await;
    assert_eq!((r.status, r.response), (ReplyStatus::Error, Payload::Json(json!({"reason": "join crashed"}))));
    assert_eq!(r.join_ref, Some(Ref::new("1")));
    assert_eq!(ep.pubsub().subscriber_count("test:x"), 0);
}

#[tokio::test(start_paused = true)]
async fn stop_closes_the_channel_after_its_reply() {
    let (ep, mut ended) = endpoint(Config::default());
    let mut c = connect(&ep, "vsn=2.0.0").await;
    c.send(r#"["1","1","test:s","phx_join",{}]"#).await;
    c.reply().await;
    c.send(r#"["1","2","test:s","stop",{}]"#).await;
    assert_eq!(c.reply().await.status, ReplyStatus::Ok);
    assert_eq!(c.next_text().await, r#"["1","1","test:s","phx_close",{}]"#);
    assert_eq!(next_end(&mut ended).await.why, Terminate::Stop(StopReason::Normal));
}

#[tokio::test(start_paused = true)]
async fn a_channel_stopping_with_an_error_yields_phx_error() {
    let (ep, mut ended) = endpoint(Config::default());
    let mut c = connect(&ep, "vsn=2.0.0").await;
    c.send(r#"["1","1","test:f","phx_join",{}]"#).await;
    c.reply().await;
    c.send(r#"["1","2","test:f","fail",{}]"#).await;
    assert_eq!(c.next_text().await, r#"["1","1","test:f","phx_error",{}]"#);
    assert_eq!(next_end(&mut ended).await.why, Terminate::Stop(StopReason::Error("requested".into())));
    c.send(r#"["1","3","test:f","ping",{}]"#).await;
    assert_eq!(reason_of(&c.reply().await), Some("unmatched topic"));
}

#[tokio::test(start_paused = true)]
async fn a_busy_channel_holds_up_its_socket_once_its_mailbox_is_full() {
    let (ep, _) = endpoint(Config::default().channel_mailbox(1));
    let mut c = connect(&ep, "vsn=2.0.0").await;
    c.send(r#"["1","1","test:busy","phx_join",{}]"#).await;
    c.reply().await;
    c.send(r#"["1","2","test:busy","wait",{}]"#).await;
    assert_eq!(c.next_text().await, r#"["1",null,"test:busy","waiting",{}]"#);
    // The channel is busy with `wait`; this push fills its one-slot mailbox.
    c.send(r#"["1","3","test:busy","ping",{"n":3}]"#).await;
    let mut held = Box::pin(c.session.handle_frame(Frame::text(r#"["1","4","test:busy","ping",{"n":4}]"#)));
    assert!((&mut held).now_or_never().is_none(), "the frame waits for room in the mailbox");
    assert!(c.out.recv().now_or_never().is_none(), "nothing answered yet");
    ep.pubsub().broadcast("gate", "open", json!({}));
    held.await.expect("taken once the channel catches up");
    for (msg_ref, response) in [("2", json!({})), ("3", json!({"n": 3})), ("4", json!({"n": 4}))] {
        let r = c.reply().await;
        assert_eq!((r.msg_ref, r.response), (Some(Ref::new(msg_ref)), Payload::Json(response)));
    }
}

#[tokio::test(start_paused = true)]
async fn broadcast_from_skips_the_sender_and_push_reaches_only_one_socket() {
    let ep = default_endpoint();
    let mut a = connect(&ep, "vsn=2.0.0").await;
    let mut b = connect(&ep, "vsn=2.0.0").await;
    for c in [&mut a, &mut b] {
        c.send(r#"["1","1","test:room","phx_join",{}]"#).await;
        c.reply().await;
    }
    a.send(r#"["1","2","test:room","broadcast_from",{"event":"hey","payload":{"n":1}}]"#).await;
    assert_eq!(a.reply().await.msg_ref, Some(Ref::new("2")), "sender gets only its reply");
    assert_eq!(b.next_text().await, r#"[null,null,"test:room","hey",{"n":1}]"#);
    a.send(r#"["1","3","test:room","push",{"event":"private","payload":{}}]"#).await;
    assert_eq!(a.next_text().await, r#"["1",null,"test:room","private",{}]"#);
    a.reply().await;
    b.send(r#"[null,"9","phoenix","heartbeat",{}]"#).await;
    assert_eq!(b.reply().await.msg_ref, Some(Ref::new("9")), "b did not get a's push");
    a.send(r#"["1","4","test:room","broadcast",{"event":"all","payload":{}}]"#).await;
    assert_eq!(a.next_text().await, r#"[null,null,"test:room","all",{}]"#, "the sender is included");
    assert_eq!(b.next_text().await, r#"[null,null,"test:room","all",{}]"#);
}

#[tokio::test(start_paused = true)]
async fn v1_and_v2_sockets_share_a_broadcast_each_in_its_own_form() {
    let ep = default_endpoint();
    let mut v1 = connect(&ep, "vsn=1.0.0").await;
    let mut v2 = connect(&ep, "vsn=2.0.0").await;
    v1.send(r#"{"topic":"room:mix","event":"phx_join","payload":{"user":"old"},"ref":"1"}"#).await;
    assert_eq!(
        v1.next_text().await,
        r#"{"event":"phx_reply","payload":{"response":{},"status":"ok"},"ref":"1","topic":"room:mix"}"#
    );
    v2.send(r#"["1","1","room:mix","phx_join",{}]"#).await;
    assert!(v2.next_text().await.contains("phx_reply"));
    v1.send(r#"{"topic":"room:mix","event":"new_msg","payload":{"body":"yo"},"ref":"2"}"#).await;
    assert_eq!(
        v1.next_text().await,
        r#"{"event":"new_msg","payload":{"body":"yo","user":"old"},"ref":null,"topic":"room:mix"}"#
    );
    assert_eq!(v2.next_text().await, r#"[null,null,"room:mix","new_msg",{"body":"yo","user":"old"}]"#);
}

#[tokio::test(start_paused = true)]
async fn presence_state_on_join_then_diffs_as_users_come_and_go() {
    let ep = default_endpoint();
    let mut a = connect(&ep, "vsn=2.0.0").await;
    a.send(r#"["1","1","room:here","phx_join",{"user":"ann","track":true}]"#).await;
    // presence_state first; ann is in it, or in the diff of her own join's window after it.
    let (event, state) = a.next_presence().await;
    assert_eq!(event, "presence_state");
    let ann = match state.get("ann") {
        Some(ann) => ann.clone(),
        None => {
            let (event, diff) = a.next_presence().await;
            assert_eq!(event, "presence_diff");
            diff["joins"]["ann"].clone()
        }
    };
    let metas = ann["metas"].as_array().expect("ann is listed");
    assert_eq!(metas.len(), 1, "{ann}");
    assert!(metas[0]["phx_ref"].is_string() && metas[0]["device"] == "memory", "{ann}");

    let mut b = connect(&ep, "vsn=2.0.0").await;
    b.send(r#"["2","1","room:here","phx_join",{"user":"bob","track":true}]"#).await;
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

#[tokio::test(start_paused = true)]
async fn binary_payloads_use_the_binary_layout() {
    let ep = default_endpoint();
    let mut c = connect(&ep, "vsn=2.0.0").await;
    c.send(r#"["1","1","test:bin","phx_join",{}]"#).await;
    c.reply().await;
    let push = [&[0u8, 1, 1, 8, 4][..], b"1", b"2", b"test:bin", b"echo", &[0, 1, 2, 0xfa]].concat();
    c.session.handle_frame(Frame::Binary(push.into())).await.expect("open");
    assert_eq!(
        c.frame().await,
        Frame::Binary([&[1u8, 1, 1, 8, 2][..], b"1", b"2", b"test:bin", b"ok", &[0, 1, 2, 0xfa]].concat().into())
    );
    c.send(r#"["1","3","test:bin","binary_broadcast",{}]"#).await;
    assert_eq!(c.frame().await, Frame::Binary([&[2u8, 8, 6][..], b"test:bin", b"binary", &BINARY].concat().into()));
    c.reply().await;
    // A push to one socket: kind 0, and no ref byte.
    c.send(r#"["1","4","test:bin","binary_push",{}]"#).await;
    assert_eq!(
        c.frame().await,
        Frame::Binary([&[0u8, 1, 8, 6][..], b"1", b"test:bin", b"binary", &BINARY].concat().into())
    );
}

#[tokio::test(start_paused = true)]
async fn a_text_only_transport_gets_binary_payloads_as_base64_text() {
    let ep = default_endpoint();
    let mut c = connect_with(&ep, ConnectInfo::new("memory", false).with_query(Some("vsn=2.0.0"))).await;
    c.send(r#"["1","1","test:txt","phx_join",{}]"#).await;
    c.reply().await;
    c.send(r#"["1","2","test:txt","binary_push",{}]"#).await;
    assert_eq!(c.next_text().await, r#"["1",null,"test:txt","binary",{"binary":"AQID/w=="}]"#);
}

#[tokio::test(start_paused = true)]
async fn a_burst_of_a_thousand_pushes_is_answered_in_order() {
    let ep = default_endpoint();
    let mut c = connect(&ep, "vsn=2.0.0").await;
    c.send(r#"["1","0","room:burst","phx_join",{}]"#).await;
    c.reply().await;
    for i in 1..=1000 {
        c.send(&format!(r#"["1","{i}","room:burst","ping",{{"i":{i}}}]"#)).await;
    }
    for i in 1..=1000 {
        let r = c.reply().await;
        assert_eq!(r.msg_ref, Some(Ref::new(i.to_string())));
        assert_eq!(r.response, Payload::Json(json!({ "i": i })));
    }
}

#[tokio::test(start_paused = true)]
async fn after_join_pushes_follow_the_join_reply() {
    let ep = default_endpoint();
    let mut c = connect(&ep, "vsn=2.0.0").await;
    c.send(r#"["1","1","test:hi","phx_join",{"welcome":true}]"#).await;
    assert_eq!(c.reply().await.status, ReplyStatus::Ok);
    assert_eq!(c.next_text().await, r#"["1",null,"test:hi","welcome",{"topic":"test:hi"}]"#);
}

#[tokio::test(start_paused = true)]
async fn a_pusher_pushes_from_another_task_until_its_channel_ends() {
    let ep = default_endpoint();
    let mut results = ep.pubsub().subscribe("pushed", 4);
    let mut delivered = async || {
        let result = timeout(Duration::from_secs(5), results.recv()).await.expect("a result").expect("subscribed");
        result.payload.as_json().and_then(|p| p["delivered"].as_bool()).expect("delivered")
    };
    let mut c = connect(&ep, "vsn=2.0.0").await;
    c.send(r#"["1","1","test:p","phx_join",{}]"#).await;
    c.reply().await;
    c.send(r#"["1","2","test:p","deferred_push",{"n":7}]"#).await;
    assert_eq!(c.reply().await.msg_ref, Some(Ref::new("2")));
    assert_eq!(c.next_text().await, r#"["1",null,"test:p","deferred",{"n":7}]"#);

    c.send(r#"["1","3","test:p","push_when_gate_opens",{}]"#).await;
    c.reply().await;
    ep.pubsub().broadcast("gate", "open", json!({}));
    assert!(delivered().await);
    assert_eq!(c.next_text().await, r#"["1",null,"test:p","late",{}]"#);

    c.send(r#"["1","4","test:p","push_when_gate_opens",{}]"#).await;
    c.reply().await;
    c.send(r#"["1","5","test:p","phx_leave",{}]"#).await;
    c.reply().await;
    assert_eq!(c.next_text().await, r#"["1","1","test:p","phx_close",{}]"#);
    ep.pubsub().broadcast("gate", "open", json!({}));
    assert!(!delivered().await, "the channel has ended");
    assert!(c.is_quiet());
}
