//! `Endpoint::stats`: joins and refusals by reason, messages in and out by transport, frames
//! dropped for slow consumers and sockets closed as slow consumers, counted as a peer sees them.

use fawkes_channel::{CloseReason, Config, ConnectInfo, SlowConsumerPolicy};
use serde_json::json;

use crate::support::{connect, connect_with, endpoint};

fn count<T: PartialEq + ?Sized>(list: &[(impl AsRef<T>, u64)], key: &T) -> u64 {
    list.iter().find(|(k, _)| k.as_ref() == key).map_or(0, |(_, n)| *n)
}

#[tokio::test(start_paused = true)]
async fn joins_refusals_and_messages_are_counted() {
    let (ep, _) = endpoint(Config::default());
    let mut c = connect(&ep, "vsn=2.0.0").await;
    c.send(r#"["1","1","room:a","phx_join",{}]"#).await;
    c.reply().await;
    c.send(r#"["2","2","nowhere:x","phx_join",{}]"#).await;
    c.reply().await;
    c.send(r#"["3","3","admin:x","phx_join",{}]"#).await;
    c.reply().await;
    c.send(r#"["4","4","room:b","phx_join",{"refuse":"full"}]"#).await;
    c.reply().await;
    c.send(r#"[null,"5","phoenix","heartbeat",{}]"#).await;
    c.reply().await;
    let mut other = connect_with(&ep, ConnectInfo::new("other", true).with_query(Some("vsn=2.0.0"))).await;
    other.send(r#"["1","1","room:c","phx_join",{}]"#).await;
    other.reply().await;

    let s = ep.stats();
    assert_eq!(s.joins, 2);
    assert_eq!(count::<str>(&s.join_refusals, "unmatched topic"), 1);
    assert_eq!(count::<str>(&s.join_refusals, "unauthorized"), 1);
    assert_eq!(count::<str>(&s.join_refusals, "full"), 1);
    assert_eq!(count::<str>(&s.messages_in, "memory"), 5);
    assert_eq!(count::<str>(&s.messages_out, "memory"), 5, "five replies");
    assert_eq!(count::<str>(&s.messages_in, "other"), 1);
    assert_eq!(count::<str>(&s.messages_out, "other"), 1);

    // A broadcast is one message out per subscriber.
    ep.pubsub().broadcast("room:a", "tick", json!({}));
    c.next().await;
    assert_eq!(count::<str>(&ep.stats().messages_out, "memory"), 6);
}

#[tokio::test(start_paused = true)]
async fn slow_consumer_closes_and_dropped_frames_are_counted() {
    let (ep, _) = endpoint(Config::default().outbound_queue_limit(10));
    let mut slow = connect(&ep, "vsn=2.0.0").await;
    slow.send(r#"["1","1","room:storm","phx_join",{}]"#).await;
    slow.reply().await;
    for i in 0..20 {
        ep.pubsub().broadcast("room:storm", "tick", json!({ "i": i }));
    }
    assert_eq!(slow.out.recv().await, Err(CloseReason::SlowConsumer));
    assert_eq!(ep.stats().slow_consumer_closes, 1);
    assert_eq!(ep.stats().outbound_dropped, 0);

    let (ep, _) = endpoint(Config::default().outbound_queue_limit(10).slow_consumer(SlowConsumerPolicy::DropOldest));
    let mut c = connect(&ep, "vsn=2.0.0").await;
    c.send(r#"["1","1","room:feed","phx_join",{}]"#).await;
    c.reply().await;
    for i in 0..100 {
        ep.pubsub().broadcast("room:feed", "tick", json!({ "i": i }));
    }
    assert_eq!(ep.stats().outbound_dropped, 90);
    assert_eq!(ep.stats().slow_consumer_closes, 0);
}
