//! History and recovery on join, on `feed:*` (5 broadcasts kept for a minute): a client that
//! rejoins with the last position it saw gets what it missed, byte for byte, in order, exactly
//! once; a position that cannot be honoured answers `recovered: false` and replays nothing.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fawkes_channel::{
    Broadcast, Config, Endpoint, Entry, HistoryError, HistoryOptions, HistorySink, HistoryStore, MemoryHistory,
    Position, ReadAfter, ReplyStatus,
};
use fawkes_serializer::ServerMessage;
use futures_util::future::BoxFuture;
use serde_json::{Value, json};

use crate::support::{Client, connect, endpoint};

fn feed_endpoint() -> Endpoint {
    endpoint(Config::default()).0
}

/// Joins `topic` with `params` on ref `join_ref`; returns the ok reply's response.
async fn join(c: &mut Client, join_ref: u32, topic: &str, params: Value) -> Value {
    c.send(&json!([join_ref.to_string(), join_ref.to_string(), topic, "phx_join", params]).to_string()).await;
    let r = c.reply().await;
    assert_eq!(r.status, ReplyStatus::Ok, "{r:?}");
    r.response.as_json().cloned().expect("json reply")
}

/// Sends `new_msg` bodies `from..to` through `c` (joined on `topic` with ref "1"); returns the
/// frames `c` got for them (the broadcasts, as every live subscriber gets them).
async fn publish(c: &mut Client, topic: &str, bodies: std::ops::Range<u32>) -> Vec<String> {
    let mut frames = Vec::new();
    for n in bodies {
        c.send(&json!(["1", format!("m{n}"), topic, "new_msg", {"body": n}]).to_string()).await;
        frames.push(c.next_text().await);
        let r = c.reply().await;
        assert_eq!(r.status, ReplyStatus::Ok);
    }
    frames
}

fn pos_of(frame: &str) -> String {
    let v: Value = serde_json::from_str(frame).expect("json frame");
    v[4]["pos"].as_str().expect("a position in the payload").to_owned()
}

#[tokio::test(start_paused = true)]
async fn a_rejoin_gets_exactly_what_it_missed_as_live_subscribers_got_it() {
    let ep = feed_endpoint();
    let mut publisher = connect(&ep, "vsn=2.0.0").await;
    let first = join(&mut publisher, 1, "feed:a", json!({"user": "pub"})).await;
    assert_eq!(first["recovered"], false, "no `since`: not recovered");
    let mut reader = connect(&ep, "vsn=2.0.0").await;
    join(&mut reader, 1, "feed:a", json!({})).await;

    let live = publish(&mut publisher, "feed:a", 0..2).await;
    assert_eq!(reader.next_text().await, live[0]);
    assert_eq!(reader.next_text().await, live[1]);
    assert_ne!(pos_of(&live[0]), pos_of(&live[1]));
    let seen = pos_of(&live[1]);

    // The reader goes away; three more broadcasts happen meanwhile.
    drop(reader);
    let missed = publish(&mut publisher, "feed:a", 2..5).await;

    let mut back = connect(&ep, "vsn=2.0.0").await;
    let reply = join(&mut back, 1, "feed:a", json!({"since": seen})).await;
    assert_eq!(reply["recovered"], true);
    assert_eq!(reply["pos"].as_str(), Some(pos_of(&missed[2]).as_str()));
    for frame in &missed {
        assert_eq!(&back.next_text().await, frame, "replayed byte for byte, in order");
    }
    assert!(back.is_quiet(), "nothing replayed twice");
    let after = publish(&mut publisher, "feed:a", 5..6).await;
    assert_eq!(back.next_text().await, after[0]);

    // Up to date: recovered, nothing to replay.
    let mut again = connect(&ep, "vsn=2.0.0").await;
    let reply = join(&mut again, 1, "feed:a", json!({"since": pos_of(&after[0])})).await;
    assert_eq!(reply["recovered"], true);
    assert!(again.is_quiet());
}

#[tokio::test(start_paused = true)]
async fn a_v1_client_recovers_the_frames_v1_clients_got() {
    let ep = feed_endpoint();
    let mut publisher = connect(&ep, "vsn=2.0.0").await;
    join(&mut publisher, 1, "feed:v1", json!({})).await;
    let mut live = connect(&ep, "vsn=1.0.0").await;
    live.send(r#"{"topic":"feed:v1","event":"phx_join","payload":{},"ref":"1"}"#).await;
    let joined = live.reply().await;
    let since = joined.response.as_json().expect("json")["pos"].as_str().expect("pos").to_owned();
    publish(&mut publisher, "feed:v1", 0..2).await;
    let got = [live.next_text().await, live.next_text().await];

    let mut back = connect(&ep, "vsn=1.0.0").await;
    back.send(&json!({"topic": "feed:v1", "event": "phx_join", "payload": {"since": since}, "ref": "1"}).to_string())
        .await;
    assert_eq!(back.reply().await.response.as_json().expect("json")["recovered"], true);
    assert_eq!(back.next_text().await, got[0]);
    assert_eq!(back.next_text().await, got[1]);
}

#[tokio::test(start_paused = true)]
async fn a_position_that_cannot_be_honoured_is_not_recovered_and_replays_nothing() {
    let ep = feed_endpoint();
    let mut publisher = connect(&ep, "vsn=2.0.0").await;
    join(&mut publisher, 1, "feed:a", json!({})).await;
    join(&mut publisher, 2, "feed:b", json!({})).await;
    let a = publish(&mut publisher, "feed:a", 0..3).await;
    let a1 = pos_of(&a[0]);
    let (epoch, _) = a1.split_once(':').expect("epoch:offset");
    // feed:b's first broadcast, so feed:b has a position of its own to steal.
    publisher.send(r#"["2","b1","feed:b","new_msg",{"body":"b"}]"#).await;
    let b1 = pos_of(&publisher.next_text().await);
    publisher.reply().await;

    let other_epoch = format!("{:x}:1", u64::from_str_radix(epoch, 16).expect("hex epoch") ^ 1);
    let cases = [
        json!("garbage"),
        json!(""),
        json!(":1"),
        json!(format!("{epoch}:")),
        json!(format!("{epoch}:-1")),
        json!(format!("{epoch}:99999999999999999999999")),
        json!(format!("{epoch}:1:2")),
        json!(format!("{epoch}:4")), // forged: past the latest position
        json!(other_epoch),          // another epoch (a restarted store)
        json!(b1),                   // another topic's position
        json!(42),                   // not a string
        json!({"epoch": epoch}),
    ];
    let mut clients = Vec::new();
    for since in &cases {
        let mut c = connect(&ep, "vsn=2.0.0").await;
        let reply = join(&mut c, 1, "feed:a", json!({"since": since})).await;
        assert_eq!(reply["recovered"], false, "since {since}");
        assert_eq!(reply["pos"].as_str(), Some(pos_of(&a[2]).as_str()), "since {since}");
        assert!(c.is_quiet(), "nothing replayed for since {since}");
        clients.push(c);
    }
    // Still subscribed: live broadcasts arrive.
    let live = publish(&mut publisher, "feed:a", 100..101).await;
    for c in &mut clients {
        assert_eq!(c.next_text().await, live[0]);
    }
}

#[tokio::test(start_paused = true)]
async fn a_position_older_than_the_history_keeps_is_not_recovered() {
    let ep = feed_endpoint();
    let mut publisher = connect(&ep, "vsn=2.0.0").await;
    join(&mut publisher, 1, "feed:a", json!({})).await;
    let sent = publish(&mut publisher, "feed:a", 0..7).await;
    // Five kept: positions 3..=7. From 2 on is recoverable, from 1 is not.
    let mut c = connect(&ep, "vsn=2.0.0").await;
    assert_eq!(join(&mut c, 1, "feed:a", json!({"since": pos_of(&sent[1])})).await["recovered"], true);
    for frame in &sent[2..] {
        assert_eq!(&c.next_text().await, frame);
    }
    let mut c = connect(&ep, "vsn=2.0.0").await;
    assert_eq!(join(&mut c, 1, "feed:a", json!({"since": pos_of(&sent[0])})).await["recovered"], false);
    assert!(c.is_quiet());

    // A minute later everything has expired: only an up-to-date position is recovered.
    tokio::time::advance(Duration::from_secs(61)).await;
    let mut c = connect(&ep, "vsn=2.0.0").await;
    assert_eq!(join(&mut c, 1, "feed:a", json!({"since": pos_of(&sent[5])})).await["recovered"], false);
    assert!(c.is_quiet());
    let mut c = connect(&ep, "vsn=2.0.0").await;
    assert_eq!(join(&mut c, 1, "feed:a", json!({"since": pos_of(&sent[6])})).await["recovered"], true);
    assert!(c.is_quiet());
}

#[tokio::test(start_paused = true)]
async fn broadcasts_during_a_recovering_join_arrive_after_the_replay_without_gap_or_duplicate() {
    let ep = feed_endpoint();
    let mut publisher = connect(&ep, "vsn=2.0.0").await;
    join(&mut publisher, 1, "feed:a", json!({})).await;
    let before = publish(&mut publisher, "feed:a", 0..3).await;

    // The join subscribes and reads history, then waits at the gate; meanwhile the server
    // broadcasts twice more.
    let mut c = connect(&ep, "vsn=2.0.0").await;
    c.send(&json!(["1", "1", "feed:a", "phx_join", {"since": pos_of(&before[0]), "hold": true}]).to_string()).await;
    match c.next().await {
        ServerMessage::Push(p) => assert_eq!(p.event, "holding"),
        other => panic!("expected the join to hold, got {other:?}"),
    }
    let history = ep.history();
    let mut during = Vec::new();
    for n in 0..2 {
        let pos = history
            .broadcast("feed:a", "new_msg", |pos| json!({"body": format!("server {n}"), "pos": pos.to_string()}).into())
            .await
            .expect("feed:a keeps history");
        during.push(pos.to_string());
        let frame = publisher.next_text().await;
        assert_eq!(pos_of(&frame), pos.to_string());
    }
    ep.pubsub().broadcast("gate", "open", json!({}));

    let reply = c.reply().await;
    assert_eq!(reply.response.as_json().expect("json")["recovered"], true);
    let mut got = Vec::new();
    for _ in 0..4 {
        match c.next().await {
            ServerMessage::Broadcast(b) => {
                got.push(b.payload.as_json().expect("json")["pos"].as_str().expect("pos").to_owned())
            }
            other => panic!("expected a broadcast, got {other:?}"),
        }
    }
    let expected = [pos_of(&before[1]), pos_of(&before[2]), during[0].clone(), during[1].clone()];
    assert_eq!(got, expected);
    assert!(c.is_quiet(), "no duplicate at the seam");
}

#[tokio::test(start_paused = true)]
async fn positions_are_refused_on_topics_without_history() {
    let ep = feed_endpoint();
    let err = ep.history().broadcast("room:a", "x", |_| json!({}).into()).await.expect_err("room:* keeps no history");
    assert!(err.to_string().contains("room:a"), "{err}");
}

#[tokio::test(start_paused = true)]
async fn a_new_store_has_a_new_epoch_and_does_not_recover_old_positions() {
    let (ep, _) = endpoint(Config::default());
    let mut c = connect(&ep, "vsn=2.0.0").await;
    join(&mut c, 1, "feed:a", json!({})).await;
    let sent = publish(&mut c, "feed:a", 0..1).await;
    // A restart: a new endpoint with a new memory store.
    let (restarted, _) = endpoint(Config::default());
    let mut back = connect(&restarted, "vsn=2.0.0").await;
    let reply = join(&mut back, 1, "feed:a", json!({"since": pos_of(&sent[0])})).await;
    assert_eq!(reply["recovered"], false);
    assert_ne!(
        reply["pos"].as_str().and_then(|p| p.split_once(':')).map(|p| p.0),
        pos_of(&sent[0]).split_once(':').map(|p| p.0.to_owned()).as_deref()
    );
    assert!(back.is_quiet());
}

#[tokio::test(start_paused = true)]
async fn recovery_outside_join_is_refused_and_leaves_the_subscription_alone() {
    let ep = feed_endpoint();
    let mut c = connect(&ep, "vsn=2.0.0").await;
    join(&mut c, 1, "feed:a", json!({})).await;
    c.send(r#"["1","2","feed:a","recover",{}]"#).await;
    let r = c.reply().await;
    assert_eq!(r.status, ReplyStatus::Error);
    assert_eq!(r.response.as_json().expect("json")["reason"], "recovery is only possible in Channel::join");
    let live = publish(&mut c, "feed:a", 0..1).await;
    assert_eq!(pos_of(&live[0]).split_once(':').map(|p| p.1), Some("1"));
}

#[tokio::test(start_paused = true)]
async fn a_plain_broadcast_on_a_topic_with_history_is_refused_and_reaches_no_one() {
    let ep = feed_endpoint();
    let mut c = connect(&ep, "vsn=2.0.0").await;
    join(&mut c, 1, "feed:a", json!({})).await;
    // It would carry no position and be missing from every replay: refused, sent nowhere.
    assert_eq!(ep.pubsub().broadcast("feed:a", "new_msg", json!({"body": "no position"})), 0);
    // Topics without history are untouched.
    assert_eq!(ep.pubsub().broadcast("room:a", "new_msg", json!({})), 0);
    let live = publish(&mut c, "feed:a", 0..1).await;
    assert_eq!(pos_of(&live[0]).split_once(':').map(|p| p.1), Some("1"), "only the positioned broadcast arrived");
    assert!(c.is_quiet());
    assert_eq!(ep.history().stats(), Default::default(), "the memory store never fails");
}

/// A store shared by nodes, simulated: entries are kept in a [`MemoryHistory`] and handed to the
/// sink only when the test says so (or dropped, or handed twice), as a lossy link would.
#[derive(Default)]
struct Wired {
    memory: MemoryHistory,
    sink: Mutex<Option<Arc<dyn HistorySink>>>,
    wire: Mutex<VecDeque<Entry>>,
}

impl Wired {
    fn sink(&self) -> Arc<dyn HistorySink> {
        self.sink.lock().expect("sink").clone().expect("delivering")
    }
    /// Hands the next entry on the wire to the sink; returns it.
    fn deliver(&self) -> Entry {
        let entry = self.wire.lock().expect("wire").pop_front().expect("an entry on the wire");
        self.sink().deliver(entry.clone());
        entry
    }
    /// Loses the next entry on the wire.
    fn lose(&self) {
        self.wire.lock().expect("wire").pop_front().expect("an entry on the wire");
    }
}

impl HistoryStore for Wired {
    fn append<'a>(
        &'a self,
        topic: &'a str,
        options: &'a HistoryOptions,
        make: &'a mut (dyn FnMut(Position) -> Broadcast + Send),
    ) -> BoxFuture<'a, Result<Entry, HistoryError>> {
        Box::pin(async move {
            let entry = self.memory.append(topic, options, make).await?;
            self.wire.lock().expect("wire").push_back(entry.clone());
            Ok(entry)
        })
    }

    fn read_after<'a>(
        &'a self,
        topic: &'a str,
        options: &'a HistoryOptions,
        since: Option<Position>,
    ) -> BoxFuture<'a, Result<ReadAfter, HistoryError>> {
        Box::pin(async move {
            let read = self.memory.read_after(topic, options, since).await?;
            // The barrier: everything up to what was read reaches the sink first.
            while !self.wire.lock().expect("wire").is_empty() {
                self.deliver();
            }
            Ok(read)
        })
    }

    fn deliver_to(&self, sink: Arc<dyn HistorySink>) -> bool {
        *self.sink.lock().expect("sink") = Some(sink);
        true
    }
}

/// Broadcasts `body` on `topic` with history; the position.
async fn positioned(ep: &Endpoint, topic: &str, body: &str) -> String {
    ep.history()
        .broadcast(topic, "new_msg", |pos| json!({"body": body, "pos": pos.to_string()}).into())
        .await
        .expect("written")
        .to_string()
}

#[tokio::test(start_paused = true)]
async fn a_delivering_store_orders_delivery_reads_gaps_back_and_drops_repeats() {
    let ep = feed_endpoint();
    let wired = Arc::new(Wired::default());
    ep.history().set_store(wired.clone());
    let mut c = connect(&ep, "vsn=2.0.0").await;
    join(&mut c, 1, "feed:a", json!({})).await;

    let sent = [positioned(&ep, "feed:a", "1").await, positioned(&ep, "feed:a", "2").await];
    assert!(c.is_quiet(), "the store delivers, not the publisher");
    wired.deliver();
    assert_eq!(pos_of(&c.next_text().await), sent[0]);
    // The second is lost on the way; the third shows the gap, which is read back.
    wired.lose();
    let third = positioned(&ep, "feed:a", "3").await;
    let repeated = wired.deliver();
    assert_eq!([pos_of(&c.next_text().await), pos_of(&c.next_text().await)], [sent[1].clone(), third.clone()]);
    // A repeat is dropped.
    wired.sink().deliver(repeated);
    // Lost while the link was down: the resync reads it back.
    let fourth = positioned(&ep, "feed:a", "4").await;
    wired.lose();
    wired.sink().resync();
    assert_eq!(pos_of(&c.next_text().await), fourth);
    assert!(c.is_quiet(), "each once");

    // A recovering join gets the replay, then live broadcasts after it, none twice.
    let fifth = positioned(&ep, "feed:a", "5").await;
    let mut back = connect(&ep, "vsn=2.0.0").await;
    let reply = join(&mut back, 1, "feed:a", json!({"since": sent[1]})).await;
    assert_eq!(reply["recovered"], true);
    let replayed = [back.next_text().await, back.next_text().await, back.next_text().await];
    assert_eq!(replayed.iter().map(|f| pos_of(f)).collect::<Vec<_>>(), [third, fourth, fifth.clone()]);
    assert_eq!(pos_of(&c.next_text().await), fifth, "the barrier delivered it live to the others");
    let sixth = positioned(&ep, "feed:a", "6").await;
    wired.deliver();
    assert_eq!(pos_of(&back.next_text().await), sixth);
    assert_eq!(pos_of(&c.next_text().await), sixth);
    assert!(back.is_quiet() && c.is_quiet());
    assert_eq!(ep.history().stats(), Default::default());
}

#[tokio::test(start_paused = true)]
async fn a_replay_longer_than_the_outbound_queue_is_streamed_as_the_socket_drains() {
    // Two frames queued at most: five broadcasts to replay, and one live broadcast behind them.
    let (ep, _) = endpoint(Config::default().outbound_queue_limit(2));
    let mut publisher = connect(&ep, "vsn=2.0.0").await;
    let since = join(&mut publisher, 1, "feed:a", json!({})).await["pos"].as_str().expect("pos").to_owned();
    let missed = publish(&mut publisher, "feed:a", 0..5).await;

    let mut back = connect(&ep, "vsn=2.0.0").await;
    let reply = join(&mut back, 1, "feed:a", json!({"since": since})).await;
    assert_eq!(reply["recovered"], true, "a replay longer than the queue is still a recovery");
    assert_eq!(reply["pos"].as_str(), Some(pos_of(&missed[4]).as_str()));
    let live = publish(&mut publisher, "feed:a", 5..6).await;
    for frame in missed.iter().chain(&live) {
        assert_eq!(&back.next_text().await, frame, "replayed byte for byte, in order, then the live one");
    }
    assert!(back.is_quiet(), "nothing twice");
    let after = publish(&mut publisher, "feed:a", 6..7).await;
    assert_eq!(back.next_text().await, after[0], "live once the replay is through");
}

#[tokio::test(start_paused = true)]
async fn a_recovering_socket_that_falls_behind_its_hold_is_closed_rather_than_given_a_gap() {
    let (ep, _) = endpoint(Config::default().outbound_queue_limit(2));
    let mut publisher = connect(&ep, "vsn=2.0.0").await;
    let since = join(&mut publisher, 1, "feed:a", json!({})).await["pos"].as_str().expect("pos").to_owned();
    publish(&mut publisher, "feed:a", 0..5).await;
    let mut back = connect(&ep, "vsn=2.0.0").await;
    assert_eq!(join(&mut back, 1, "feed:a", json!({"since": since})).await["recovered"], true);
    // The client reads nothing: its replay stalls, and live broadcasts pile up behind it until
    // more than a queue's worth wait.
    publish(&mut publisher, "feed:a", 5..8).await;
    assert_eq!(back.closed().await, fawkes_channel::CloseReason::SlowConsumer);
}

/// `feed:*` with every `new_msg` routed through `handle_out`, which pushes it as `seen`.
struct Intercepting;

impl fawkes_channel::Channel for Intercepting {
    const INTERCEPT: &'static [&'static str] = &["new_msg"];

    async fn join(
        &mut self,
        params: fawkes_channel::Payload,
        socket: &mut fawkes_channel::SocketRef,
    ) -> Result<Value, Value> {
        let since = params.as_json().and_then(|p| p["since"].as_str()).map(str::to_owned);
        let recovery = socket.recover(since.as_deref()).await.map_err(|e| fawkes_channel::reason(&e.to_string()))?;
        Ok(json!({"recovered": recovery.recovered}))
    }

    async fn handle_in(
        &mut self,
        _: &str,
        _: fawkes_channel::Payload,
        _: &mut fawkes_channel::SocketRef,
    ) -> fawkes_channel::HandleIn {
        fawkes_channel::HandleIn::NoReply
    }

    async fn handle_out(&mut self, _: &str, payload: fawkes_channel::Payload, socket: &mut fawkes_channel::SocketRef) {
        socket.push("seen", payload);
    }
}

#[tokio::test(start_paused = true)]
async fn a_long_replay_of_intercepted_events_waits_for_handle_out_and_drops_nothing() {
    // handle_out's queue holds 2 and the outbound queue 8: twenty replayed events overflow both.
    let ep = Endpoint::builder()
        .router(fawkes_channel::Router::new().channel("feed:*", || Intercepting))
        .history("feed:*", fawkes_channel::HistoryOptions::default().max_len(50))
        .config(Config::default().outbound_queue_limit(8).channel_mailbox(2))
        .build();
    let history = ep.history();
    let since = history.broadcast("feed:a", "new_msg", |_| json!({"n": 0}).into()).await.expect("history");
    for n in 1..=20 {
        history.broadcast("feed:a", "new_msg", |_| json!({ "n": n }).into()).await.expect("history");
    }
    let mut c = connect(&ep, "vsn=2.0.0").await;
    assert_eq!(join(&mut c, 1, "feed:a", json!({"since": since.to_string()})).await["recovered"], true);
    for n in 1..=20 {
        match c.next().await {
            ServerMessage::Push(p) => {
                assert_eq!(p.event, "seen");
                assert_eq!(p.payload.as_json(), Some(&json!({ "n": n })), "every replayed event, in order");
            }
            other => panic!("expected a push, got {other:?}"),
        }
    }
    assert!(c.is_quiet());
}
