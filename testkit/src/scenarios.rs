//! The scenarios, each as a user of the transport would see it on the wire.

use std::fmt;

use fawkes_channel::{Endpoint, Frame};
use serde_json::{Value, json};

use crate::{BINARY, Capabilities, Connection, Received, Transport};

pub(crate) struct Ctx<'a> {
    pub(crate) scenario: &'static str,
    pub(crate) transport: &'a str,
    pub(crate) caps: &'a Capabilities,
    pub(crate) endpoint: &'a Endpoint,
}

impl Ctx<'_> {
    fn fail(&self, what: impl fmt::Display) -> ! {
        panic!("scenario `{}` ({}): {what}", self.scenario, self.transport)
    }

    async fn connect<T: Transport>(&self, transport: &T, params: &[(&str, &str)]) -> Peer<'_, T::Connection> {
        let mut all = vec![("vsn", "2.0.0")];
        all.extend_from_slice(params);
        match tokio::time::timeout(self.caps.wait, transport.connect(&all)).await {
            Ok(Ok(conn)) => Peer { conn, ctx: self, next_ref: 0 },
            Ok(Err(refused)) => {
                self.fail(format_args!("expected the connection with {all:?} to open, got {refused:?}"))
            }
            Err(_) => self.fail(format_args!("expected the connection to open within {:?}", self.caps.wait)),
        }
    }
}

/// What a peer read, for comparing and for failure messages.
enum Got {
    Text(Value),
    Binary(Vec<u8>),
    Closed(String),
}

impl fmt::Display for Got {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Got::Text(v) => write!(f, "{v}"),
            Got::Binary(b) => write!(f, "binary {b:?}"),
            Got::Closed(how) => write!(f, "the connection closed ({how})"),
        }
    }
}

struct Peer<'a, C> {
    conn: C,
    ctx: &'a Ctx<'a>,
    next_ref: u64,
}

fn reply(join_ref: Option<&str>, msg_ref: &str, topic: &str, status: &str, response: Value) -> Value {
    json!([join_ref, msg_ref, topic, "phx_reply", {"status": status, "response": response}])
}

fn unmatched(msg_ref: &str, topic: &str) -> Value {
    reply(None, msg_ref, topic, "error", json!({"reason": "unmatched topic"}))
}

impl<C: Connection> Peer<'_, C> {
    fn fresh_ref(&mut self) -> String {
        self.next_ref += 1;
        self.next_ref.to_string()
    }

    async fn send_text(&mut self, texts: Vec<String>) {
        self.conn.send(texts.into_iter().map(Frame::text).collect()).await;
    }

    /// Sends a message with a fresh ref; returns the ref.
    async fn push(&mut self, join_ref: Option<&str>, topic: &str, event: &str, payload: Value) -> String {
        let msg_ref = self.fresh_ref();
        self.send_text(vec![json!([join_ref, msg_ref, topic, event, payload]).to_string()]).await;
        msg_ref
    }

    async fn next(&mut self, expecting: &str) -> Got {
        let wait = self.ctx.caps.wait;
        match tokio::time::timeout(wait, self.conn.recv()).await {
            Ok(Received::Frame(Frame::Text(t))) => match serde_json::from_slice(&t) {
                Ok(v) => Got::Text(v),
                Err(_) => self.ctx.fail(format_args!(
                    "expected {expecting}, got a text frame that is not JSON: {:?}",
                    String::from_utf8_lossy(&t)
                )),
            },
            Ok(Received::Frame(Frame::Binary(b))) => Got::Binary(b.to_vec()),
            Ok(Received::Closed(how)) => Got::Closed(how),
            Err(_) => self.ctx.fail(format_args!("expected {expecting}, got nothing within {wait:?}")),
        }
    }

    /// The next message must be `want`.
    async fn expect(&mut self, what: &str, want: Value) {
        let expecting = format_args!("{what} {want}").to_string();
        match self.next(&expecting).await {
            Got::Text(v) if v == want => {}
            got => self.ctx.fail(format_args!("expected {expecting}, got {got}")),
        }
    }

    async fn expect_binary(&mut self, what: &str, want: Vec<u8>) {
        let expecting = format!("{what}: binary {want:?}");
        match self.next(&expecting).await {
            Got::Binary(b) if b == want => {}
            got => self.ctx.fail(format_args!("expected {expecting}, got {got}")),
        }
    }

    async fn expect_closed(&mut self, why: &str) {
        let expecting = format!("the server to close the connection ({why})");
        match self.next(&expecting).await {
            Got::Closed(_) => {}
            got => self.ctx.fail(format_args!("expected {expecting}, got {got}")),
        }
    }

    /// Joins `topic`, the join's ref serving as its join ref; the reply must be ok. Returns the
    /// join ref and the reply's response.
    async fn join(&mut self, topic: &str, params: Value) -> (String, Value) {
        let join_ref = (self.next_ref + 1).to_string();
        let r = self.push(Some(&join_ref), topic, "phx_join", params).await;
        let expecting = format!("an ok reply to the join of {topic} (join_ref {join_ref:?})");
        match self.next(&expecting).await {
            Got::Text(v)
                if v[0] == json!(join_ref)
                    && v[1] == json!(r)
                    && v[2] == json!(topic)
                    && v[3] == "phx_reply"
                    && v[4]["status"] == "ok" =>
            {
                (join_ref, v[4]["response"].clone())
            }
            got => self.ctx.fail(format_args!("expected {expecting}, got {got}")),
        }
    }

    /// A heartbeat whose reply must come next: proves nothing else was queued before it.
    async fn nothing_else(&mut self, what: &str) {
        let r = self.push(None, "phoenix", "heartbeat", json!({})).await;
        self.expect(&format!("no {what}, so the heartbeat reply next"), reply(None, &r, "phoenix", "ok", json!({})))
            .await;
    }
}

pub(crate) async fn play<T: Transport>(ctx: &Ctx<'_>, t: &T) {
    match ctx.scenario {
        "join" => join(ctx, t).await,
        "refused_connect" => refused_connect(ctx, t).await,
        "join_refused" => join_refused(ctx, t).await,
        "replies" => replies(ctx, t).await,
        "unmatched_topic" => unmatched_topic(ctx, t).await,
        "broadcast" => broadcast(ctx, t).await,
        "server_push" => server_push(ctx, t).await,
        "leave" => leave(ctx, t).await,
        "duplicate_join" => duplicate_join(ctx, t).await,
        "heartbeat" => heartbeat(ctx, t).await,
        "idle_close" => idle_close(ctx, t).await,
        "crash" => crash(ctx, t).await,
        "binary" => binary(ctx, t).await,
        "binary_as_text" => binary_as_text(ctx, t).await,
        "burst" => burst(ctx, t).await,
        "malformed" => malformed(ctx, t).await,
        "server_close" => server_close(ctx, t).await,
        other => ctx.fail(format_args!("no such scenario {other:?}")),
    }
}

async fn join<T: Transport>(ctx: &Ctx<'_>, t: &T) {
    let mut c = ctx.connect(t, &[("user", "ann")]).await;
    let (_, response) = c.join("test:join", json!({})).await;
    if response["topic"] != "test:join" || response["token"] != Value::Null {
        ctx.fail(format_args!("expected the join's response to name topic test:join and no token, got {response}"));
    }
    if ctx.caps.connect_params && response["params"] != json!({"user": "ann"}) {
        ctx.fail(format_args!(
            "expected the connect callback to see exactly the connect params {{\"user\":\"ann\"}} \
             (a transport's own params removed), got {}",
            response["params"]
        ));
    }
    c.conn.close().await;
}

async fn refused_connect<T: Transport>(ctx: &Ctx<'_>, t: &T) {
    for params in [&[("vsn", "2.0.0"), ("reject", "true")][..], &[("vsn", "3.0.0")]] {
        match tokio::time::timeout(ctx.caps.wait, t.connect(params)).await {
            Ok(Err(_)) => {}
            Ok(Ok(_)) => ctx.fail(format_args!("expected the connection with {params:?} to be refused, it opened")),
            Err(_) => ctx.fail(format_args!("expected the connection with {params:?} to be refused at once")),
        }
    }
    // A refusal leaves nothing behind, and the next client still connects.
    let mut c = ctx.connect(t, &[]).await;
    c.join("test:after_refusal", json!({})).await;
}

async fn join_refused<T: Transport>(ctx: &Ctx<'_>, t: &T) {
    let mut c = ctx.connect(t, &[]).await;
    let r = c.push(Some("1"), "test:locked", "phx_join", json!({"refuse": "unauthorized"})).await;
    let want = reply(Some("1"), &r, "test:locked", "error", json!({"reason": "unauthorized"}));
    c.expect("the refusal, keeping its join_ref", want).await;
    let r = c.push(Some("2"), "nope:1", "phx_join", json!({})).await;
    c.expect("an unmatched topic error with a null join_ref", unmatched(&r, "nope:1")).await;
    let r = c.push(Some("3"), "test:crashy_join", "phx_join", json!({"crash": true})).await;
    let want = reply(Some("3"), &r, "test:crashy_join", "error", json!({"reason": "join crashed"}));
    c.expect("a crash in join as an error reply", want).await;
    c.join("test:fine", json!({})).await;
}

async fn replies<T: Transport>(ctx: &Ctx<'_>, t: &T) {
    let mut c = ctx.connect(t, &[]).await;
    let (j, _) = c.join("test:replies", json!({})).await;
    let j = Some(j.as_str());
    let r = c.push(j, "test:replies", "echo", json!({"a": [1, "two"]})).await;
    c.expect("an ok reply with the pushed payload", reply(j, &r, "test:replies", "ok", json!({"a": [1, "two"]}))).await;
    let r = c.push(j, "test:replies", "error_reply", json!({})).await;
    c.expect("an error reply", reply(j, &r, "test:replies", "error", json!({"reason": "requested"}))).await;
    c.push(j, "test:replies", "noreply", json!({})).await;
    let r = c.push(j, "test:replies", "echo", json!({"after": "noreply"})).await;
    let want = reply(j, &r, "test:replies", "ok", json!({"after": "noreply"}));
    c.expect("no reply to `noreply`, then the next push's reply", want).await;
    let r = c.push(j, "test:replies", "dance", json!({})).await;
    c.expect(
        "an error for an unknown event",
        reply(j, &r, "test:replies", "error", json!({"reason": "unknown event"})),
    )
    .await;
}

async fn unmatched_topic<T: Transport>(ctx: &Ctx<'_>, t: &T) {
    let mut c = ctx.connect(t, &[]).await;
    let r = c.push(Some("7"), "test:never_joined", "echo", json!({})).await;
    c.expect("an unmatched topic error with a null join_ref", unmatched(&r, "test:never_joined")).await;
    c.nothing_else("other message").await;
}

async fn broadcast<T: Transport>(ctx: &Ctx<'_>, t: &T) {
    let mut a = ctx.connect(t, &[]).await;
    let mut b = ctx.connect(t, &[]).await;
    let (ja, _) = a.join("test:room", json!({})).await;
    b.join("test:room", json!({})).await;
    let ja = Some(ja.as_str());
    let r = a.push(ja, "test:room", "broadcast", json!({"event": "shout", "payload": {"n": 1}})).await;
    let shout = json!([null, null, "test:room", "shout", {"n": 1}]);
    a.expect("the broadcast, the sender included, before its reply", shout.clone()).await;
    a.expect("the broadcast's reply", reply(ja, &r, "test:room", "ok", json!({}))).await;
    b.expect("the other client's broadcast", shout).await;

    let r = a.push(ja, "test:room", "broadcast_from", json!({"event": "hey", "payload": {"n": 2}})).await;
    a.expect("only the reply to broadcast_from (it skips the sender)", reply(ja, &r, "test:room", "ok", json!({})))
        .await;
    b.expect("the broadcast_from", json!([null, null, "test:room", "hey", {"n": 2}])).await;
    a.nothing_else("broadcast_from to its sender").await;

    ctx.endpoint.pubsub().broadcast("test:room", "news", json!({"from": "server"}));
    let news = json!([null, null, "test:room", "news", {"from": "server"}]);
    a.expect("the server's broadcast", news.clone()).await;
    b.expect("the server's broadcast", news).await;
}

async fn server_push<T: Transport>(ctx: &Ctx<'_>, t: &T) {
    let mut a = ctx.connect(t, &[]).await;
    let mut b = ctx.connect(t, &[]).await;
    let (ja, _) = a.join("test:push", json!({})).await;
    b.join("test:push", json!({})).await;
    let ja = Some(ja.as_str());
    let r = a.push(ja, "test:push", "push", json!({"event": "private", "payload": {"x": 1}})).await;
    a.expect("the push to this socket alone, with its join_ref", json!([ja, null, "test:push", "private", {"x": 1}]))
        .await;
    a.expect("the push's reply", reply(ja, &r, "test:push", "ok", json!({}))).await;
    b.nothing_else("push meant for the other socket").await;

    let r = a.push(ja, "test:push", "deferred_push", json!({"later": true})).await;
    a.expect("the reply", reply(ja, &r, "test:push", "ok", json!({}))).await;
    a.expect("a push from another task", json!([ja, null, "test:push", "deferred", {"later": true}])).await;

    let join_ref = (b.next_ref + 1).to_string();
    let r = b.push(Some(&join_ref), "test:welcome", "phx_join", json!({"welcome": true})).await;
    let expecting = format!("the join reply to ref {r:?}");
    match b.next(&expecting).await {
        Got::Text(v) if v[1] == json!(r) && v[4]["status"] == "ok" => {}
        got => ctx.fail(format_args!("expected {expecting}, got {got}")),
    }
    let want = json!([join_ref, null, "test:welcome", "welcome", {"topic": "test:welcome"}]);
    b.expect("the push made right after the join", want).await;
}

async fn leave<T: Transport>(ctx: &Ctx<'_>, t: &T) {
    let mut c = ctx.connect(t, &[]).await;
    let (j, _) = c.join("test:leave", json!({})).await;
    let r = c.push(Some(&j), "test:leave", "phx_leave", json!({})).await;
    c.expect("an ok reply to phx_leave", reply(Some(&j), &r, "test:leave", "ok", json!({}))).await;
    let close = json!([j, j, "test:leave", "phx_close", {}]);
    c.expect(&format!("phx_close of join_ref {j:?}"), close).await;
    let r = c.push(Some(&j), "test:leave", "echo", json!({})).await;
    c.expect("an unmatched topic error for a push after leaving", unmatched(&r, "test:leave")).await;
    let r = c.push(Some("99"), "test:never", "phx_leave", json!({})).await;
    c.expect("an ok reply to leaving a topic never joined", reply(Some("99"), &r, "test:never", "ok", json!({}))).await;

    let (j, _) = c.join("test:stop", json!({})).await;
    let r = c.push(Some(&j), "test:stop", "stop", json!({})).await;
    c.expect("the reply of a channel that stops itself", reply(Some(&j), &r, "test:stop", "ok", json!({}))).await;
    c.expect(&format!("phx_close of join_ref {j:?}"), json!([j, j, "test:stop", "phx_close", {}])).await;
}

async fn duplicate_join<T: Transport>(ctx: &Ctx<'_>, t: &T) {
    let mut c = ctx.connect(t, &[]).await;
    let (old, _) = c.join("test:dup", json!({})).await;
    let (new, _) = c.join("test:dup", json!({})).await;
    c.expect(&format!("phx_close of the replaced join_ref {old:?}"), json!([old, old, "test:dup", "phx_close", {}]))
        .await;
    c.push(Some(&old), "test:dup", "echo", json!({"stale": true})).await;
    let r = c.push(Some(&new), "test:dup", "echo", json!({"fresh": true})).await;
    let want = reply(Some(&new), &r, "test:dup", "ok", json!({"fresh": true}));
    c.expect("no answer to the stale join_ref's push, then the fresh one's reply", want).await;
    ctx.endpoint.pubsub().broadcast("test:dup", "news", json!({}));
    c.expect("the broadcast, once", json!([null, null, "test:dup", "news", {}])).await;
    c.nothing_else("second copy of the broadcast").await;
}

async fn heartbeat<T: Transport>(ctx: &Ctx<'_>, t: &T) {
    let mut c = ctx.connect(t, &[]).await;
    for _ in 0..3 {
        let r = c.push(None, "phoenix", "heartbeat", json!({})).await;
        let want = json!([null, r, "phoenix", "phx_reply", {"status": "ok", "response": {}}]);
        c.expect("the heartbeat reply", want).await;
    }
}

async fn idle_close<T: Transport>(ctx: &Ctx<'_>, t: &T) {
    let mut c = ctx.connect(t, &[]).await;
    c.join("test:idle", json!({})).await;
    c.expect_closed(&format!("nothing sent for the heartbeat timeout of {:?}", crate::IDLE_TIMEOUT)).await;
}

async fn crash<T: Transport>(ctx: &Ctx<'_>, t: &T) {
    let mut c = ctx.connect(t, &[]).await;
    let (crashy, _) = c.join("test:crashy", json!({})).await;
    let (calm, _) = c.join("test:calm", json!({})).await;
    c.push(Some(&crashy), "test:crashy", "crash", json!({})).await;
    c.expect(&format!("phx_error of join_ref {crashy:?}"), json!([crashy, crashy, "test:crashy", "phx_error", {}]))
        .await;
    let r = c.push(Some(&calm), "test:calm", "echo", json!({"still": "here"})).await;
    c.expect("the other topic still answering", reply(Some(&calm), &r, "test:calm", "ok", json!({"still": "here"})))
        .await;
    c.join("test:crashy", json!({})).await;
}

fn binary_frame(kind: u8, strings: &[&str], payload: &[u8]) -> Vec<u8> {
    let mut out = vec![kind];
    out.extend(strings.iter().map(|s| s.len() as u8));
    for s in strings {
        out.extend_from_slice(s.as_bytes());
    }
    out.extend_from_slice(payload);
    out
}

async fn binary<T: Transport>(ctx: &Ctx<'_>, t: &T) {
    let mut c = ctx.connect(t, &[]).await;
    let (j, _) = c.join("test:bin", json!({})).await;
    let r = c.fresh_ref();
    let payload = [0u8, 1, 2, 0xfa, b'\n', b'\r'];
    c.conn.send(vec![Frame::Binary(binary_frame(0, &[&j, &r, "test:bin", "echo"], &payload).into())]).await;
    c.expect_binary("the binary reply", binary_frame(1, &[&j, &r, "test:bin", "ok"], &payload)).await;
    let r = c.push(Some(&j), "test:bin", "binary_push", json!({})).await;
    c.expect_binary("the binary push (kind 0, no ref)", binary_frame(0, &[&j, "test:bin", "binary"], &BINARY)).await;
    c.expect("the reply", reply(Some(&j), &r, "test:bin", "ok", json!({}))).await;
    let r = c.push(Some(&j), "test:bin", "binary_broadcast", json!({})).await;
    c.expect_binary("the binary broadcast (kind 2)", binary_frame(2, &["test:bin", "binary"], &BINARY)).await;
    c.expect("the reply", reply(Some(&j), &r, "test:bin", "ok", json!({}))).await;
}

async fn binary_as_text<T: Transport>(ctx: &Ctx<'_>, t: &T) {
    let mut c = ctx.connect(t, &[]).await;
    let (j, _) = c.join("test:bin", json!({})).await;
    let r = c.push(Some(&j), "test:bin", "binary_push", json!({})).await;
    let want = json!([j, null, "test:bin", "binary", {"binary": "AQID/w=="}]);
    c.expect("the binary push as base64 text", want).await;
    c.expect("the reply", reply(Some(&j), &r, "test:bin", "ok", json!({}))).await;
}

async fn burst<T: Transport>(ctx: &Ctx<'_>, t: &T) {
    const PUSHES: usize = 1000;
    let mut c = ctx.connect(t, &[]).await;
    let (j, _) = c.join("test:burst", json!({})).await;
    let first = c.next_ref + 1;
    let texts =
        (0..PUSHES).map(|i| json!([j, (first + i as u64).to_string(), "test:burst", "echo", {"i": i}]).to_string());
    c.send_text(texts.collect()).await;
    c.next_ref += PUSHES as u64;
    for i in 0..PUSHES {
        let r = (first + i as u64).to_string();
        let want = reply(Some(&j), &r, "test:burst", "ok", json!({"i": i}));
        c.expect(&format!("reply {} of {PUSHES}, in order", i + 1), want).await;
    }
}

async fn malformed<T: Transport>(ctx: &Ctx<'_>, t: &T) {
    let mut bystander = ctx.connect(t, &[]).await;
    let (j, _) = bystander.join("test:calm", json!({})).await;
    let mut bad: Vec<Frame> =
        ["not json", r#"["1","2","test:x"]"#, r#"{"topic":"test:x"}"#, "42"].into_iter().map(Frame::text).collect();
    if ctx.caps.binary_frames {
        bad.push(Frame::Binary(vec![7u8, 1, 2].into()));
    }
    for frame in bad {
        let mut victim = ctx.connect(t, &[]).await;
        let shown = format!("{frame:?}");
        victim.conn.send(vec![frame]).await;
        victim.expect_closed(&format!("a malformed frame {shown}")).await;
        let r = bystander.push(Some(&j), "test:calm", "echo", json!({"ok": 1})).await;
        let want = reply(Some(&j), &r, "test:calm", "ok", json!({"ok": 1}));
        bystander.expect(&format!("the other socket unharmed by {shown}"), want).await;
    }
    let r = bystander.fresh_ref();
    bystander.send_text(vec![json!([null, r, null, null, null]).to_string()]).await;
    let expecting = "an unmatched topic error for [null,ref,null,null,null]";
    match bystander.next(expecting).await {
        Got::Text(v)
            if v[1] == json!(r) && v[4] == json!({"status": "error", "response": {"reason": "unmatched topic"}}) => {}
        got => ctx.fail(format_args!("expected {expecting}, got {got}")),
    }
}

async fn server_close<T: Transport>(ctx: &Ctx<'_>, t: &T) {
    let mut a = ctx.connect(t, &[]).await;
    let mut b = ctx.connect(t, &[]).await;
    a.join("test:bye", json!({})).await;
    b.nothing_else("message").await;
    ctx.endpoint.shutdown();
    a.expect_closed("the endpoint shut down").await;
    b.expect_closed("the endpoint shut down").await;
    tokio::time::timeout(ctx.caps.wait, ctx.endpoint.drained())
        .await
        .unwrap_or_else(|_| ctx.fail("expected every session to be dropped once its peer was told of the shutdown"));
}
