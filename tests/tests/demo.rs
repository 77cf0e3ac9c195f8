//! The demo app's own contract (`fawkes_server::demo`, served by `fawkes serve`), driven in memory. The
//! socket state machine itself is tested in `fawkes-channel`, against a router of its own.

use std::time::Duration;

use fawkes::{ConnectInfo, Endpoint, Outbound, Session};
use fawkes_serializer::{Serializer, ServerMessage};
use serde_json::{Value, json};

struct Client {
    session: Session,
    out: Outbound,
    serializer: Serializer,
}

async fn connect(endpoint: &Endpoint) -> Client {
    let info = ConnectInfo::new("memory", true).with_query(Some("vsn=2.0.0"));
    let session = endpoint.connect(info).await.expect("connect accepted");
    let out = session.outbound();
    let serializer = session.serializer();
    Client { session, out, serializer }
}

impl Client {
    async fn send(&mut self, text: &str) {
        self.session.handle_frame(fawkes::Frame::text(text)).await.expect("session open");
    }

    async fn next_text(&mut self) -> String {
        let frame = tokio::time::timeout(Duration::from_secs(5), self.out.recv())
            .await
            .expect("a frame within 5 s")
            .expect("session open");
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
    async fn next_presence(&mut self) -> (String, Value) {
        loop {
            let text = self.next_text().await;
            let (event, payload) = match self.serializer.decode_server(&fawkes::Frame::text(text)).expect("decodes") {
                ServerMessage::Push(p) => (p.event, p.payload),
                ServerMessage::Broadcast(b) => (b.event, b.payload),
                ServerMessage::Reply(_) => continue,
            };
            if event.starts_with("presence_") {
                return (event, payload.as_json().cloned().unwrap_or_default());
            }
        }
    }
}

fn endpoint() -> Endpoint {
    Endpoint::new(fawkes_server::demo::router())
}

#[tokio::test(start_paused = true)]
async fn a_room_relays_messages_with_the_sender_name() {
    let ep = endpoint();
    let mut c = connect(&ep).await;
    c.send(r#"["1","1","room:lobby","phx_join",{"user":"ann"}]"#).await;
    assert_eq!(c.next_chat_text().await, r#"["1","1","room:lobby","phx_reply",{"response":{},"status":"ok"}]"#);
    c.send(r#"["1","2","room:lobby","new_msg",{"body":"hi"}]"#).await;
    // The broadcast is queued by the channel before its reply.
    assert_eq!(c.next_chat_text().await, r#"[null,null,"room:lobby","new_msg",{"body":"hi","user":"ann"}]"#);
    assert_eq!(c.next_chat_text().await, r#"["1","2","room:lobby","phx_reply",{"response":{},"status":"ok"}]"#);
    c.send(r#"["1","3","room:lobby","ping",{"n":1}]"#).await;
    assert_eq!(c.next_chat_text().await, r#"["1","3","room:lobby","phx_reply",{"response":{"n":1},"status":"ok"}]"#);
    c.send(r#"["1","4","room:lobby","dance",{}]"#).await;
    assert_eq!(
        c.next_chat_text().await,
        r#"["1","4","room:lobby","phx_reply",{"response":{"reason":"unknown event"},"status":"error"}]"#
    );
}

#[tokio::test(start_paused = true)]
async fn admin_topics_refuse_everyone_and_other_topics_are_unmatched() {
    let ep = endpoint();
    let mut c = connect(&ep).await;
    c.send(r#"["2","2","admin:x","phx_join",{}]"#).await;
    assert_eq!(
        c.next_text().await,
        r#"["2","2","admin:x","phx_reply",{"response":{"reason":"unauthorized"},"status":"error"}]"#
    );
    c.send(r#"["1","1","nope:1","phx_join",{}]"#).await;
    assert_eq!(
        c.next_text().await,
        r#"[null,"1","nope:1","phx_reply",{"response":{"reason":"unmatched topic"},"status":"error"}]"#
    );
}

#[tokio::test(start_paused = true)]
async fn named_users_are_tracked_in_presence_with_their_online_time() {
    let ep = endpoint();
    let mut a = connect(&ep).await;
    a.send(r#"["1","1","room:here","phx_join",{"user":"ann"}]"#).await;
    // ann is listed: in presence_state, or in the diff of her own join's window after it.
    let mut list = PresenceList::default();
    while !list.0.contains_key("ann") {
        let (event, payload) = a.next_presence().await;
        list.apply(&event, &payload);
    }
    let metas = list.0["ann"].as_array().expect("ann is listed");
    assert_eq!(metas.len(), 1, "{metas:?}");
    assert!(metas[0]["phx_ref"].is_string() && metas[0]["online_at"].is_u64(), "{metas:?}");

    let mut b = connect(&ep).await;
    b.send(r#"["2","1","room:here","phx_join",{"user":"bob"}]"#).await;
    loop {
        let (event, diff) = a.next_presence().await;
        if event == "presence_diff" && diff["joins"].get("bob").is_some() {
            assert!(diff["joins"]["bob"]["metas"][0]["online_at"].is_u64(), "{diff}");
            assert_eq!(diff["leaves"], json!({}), "{diff}");
            break;
        }
    }
    // A join without a user is not tracked.
    let mut anon = connect(&ep).await;
    anon.send(r#"["3","1","room:here","phx_join",{}]"#).await;
    assert_eq!(anon.next_text().await, r#"["3","1","room:here","phx_reply",{"response":{},"status":"ok"}]"#);
    assert_eq!(ep.pubsub().presence().list("room:here").as_object().map(|o| o.len()), Some(2));
}

/// A presence list kept as phoenix.js's `Presence` keeps it: key → metas. Diffs before the first
/// state wait for it; a join of a meta already listed or a leave of one not listed is recorded
/// in `twice` (a change applied twice).
#[derive(Default)]
struct PresenceList(std::collections::BTreeMap<String, Value>, Option<Vec<Value>>, bool, Vec<String>);

impl PresenceList {
    fn apply(&mut self, event: &str, payload: &Value) {
        if event == "presence_state" {
            self.0 = payload.as_object().expect("state").iter().map(|(k, v)| (k.clone(), v["metas"].clone())).collect();
            self.2 = true;
            for diff in self.1.take().unwrap_or_default() {
                self.diff(&diff);
            }
        } else if self.2 {
            self.diff(payload);
        } else {
            self.1.get_or_insert_with(Vec::new).push(payload.clone());
        }
    }

    fn diff(&mut self, diff: &Value) {
        let refs = |v: &Value| -> Vec<Value> { v["metas"].as_array().cloned().unwrap_or_default() };
        for (key, v) in diff["joins"].as_object().expect("joins") {
            let metas = self.0.entry(key.clone()).or_insert_with(|| json!([]));
            for m in refs(v) {
                let list = metas.as_array_mut().expect("metas");
                if list.iter().any(|x| x["phx_ref"] == m["phx_ref"]) {
                    self.3.push(format!("join {key}"));
                } else {
                    list.push(m);
                }
            }
        }
        for (key, v) in diff["leaves"].as_object().expect("leaves") {
            for m in refs(v) {
                let Some(list) = self.0.get_mut(key).and_then(Value::as_array_mut) else {
                    self.3.push(format!("leave {key}"));
                    continue;
                };
                let before = list.len();
                list.retain(|x| x["phx_ref"] != m["phx_ref"]);
                if list.len() == before {
                    self.3.push(format!("leave {key}"));
                }
                if list.is_empty() {
                    self.0.remove(key);
                }
            }
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_huge_user_is_refused_and_ordinary_users_keep_a_correct_state() {
    // The attack: 20 sockets join a room with a 1 MB user, then 50 ordinary users join it.
    let ep = endpoint();
    let huge = "x".repeat(1_000_000);
    let mut attackers = Vec::new();
    for i in 0..20 {
        let mut c = connect(&ep).await;
        let join = json!(["1", "1", "room:target", "phx_join", {"user": format!("{i}{huge}")}]).to_string();
        c.send(&join).await;
        assert_eq!(
            c.next_text().await,
            r#"["1","1","room:target","phx_reply",{"response":{"reason":"user too long"},"status":"error"}]"#
        );
        attackers.push(c);
    }
    let mut users = Vec::new();
    for i in 0..50 {
        let mut c = connect(&ep).await;
        c.send(&json!(["1", "1", "room:target", "phx_join", {"user": format!("user{i}")}]).to_string()).await;
        assert_eq!(c.next_chat_text().await, r#"["1","1","room:target","phx_reply",{"response":{},"status":"ok"}]"#);
        users.push((c, PresenceList::default()));
    }
    // Every ordinary user ends with the 50 of them, each change applied once, and the socket open.
    let expected: Vec<String> =
        (0..50).map(|i| format!("user{i}")).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
    for (c, list) in &mut users {
        while list.0.keys().cloned().collect::<Vec<_>>() != expected {
            let (event, payload) = c.next_presence().await;
            list.apply(&event, &payload);
        }
        assert!(list.3.is_empty(), "applied twice: {:?}", list.3);
        c.send(r#"["1","2","room:target","ping",{}]"#).await;
        assert_eq!(c.next_chat_text().await, r#"["1","2","room:target","phx_reply",{"response":{},"status":"ok"}]"#);
    }
    assert_eq!(ep.pubsub().presence().count("room:target"), 50);
}
