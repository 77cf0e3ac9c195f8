//! The test router, and a client that drives a [`Session`] in memory as a transport does.

use std::time::Duration;

use fawkes_channel::{
    Accept, Channel, CloseReason, Config, ConnectError, ConnectInfo, Endpoint, Frame, HandleIn, HistoryOptions,
    Outbound, Payload, ReplyStatus, Router, Serializer, Session, SocketRef, StopReason, Terminate, reason,
};
use fawkes_serializer::{Reply, ServerMessage};
use futures_util::FutureExt as _;
use serde_json::{Value, json};
use tokio::sync::mpsc;

/// Bytes of the `binary` event.
pub const BINARY: [u8; 4] = [1, 2, 3, 255];

/// How long a client waits for a frame it expects. On the paused clock this costs nothing: the
/// clock jumps ahead only once nothing else can run, i.e. when the frame is never coming.
const WAIT: Duration = Duration::from_secs(5);

/// How a channel instance ended: its topic, its join ref and what `terminate` was told.
#[derive(Debug, Clone, PartialEq)]
pub struct Ended {
    pub topic: String,
    pub join_ref: Option<String>,
    pub why: Terminate,
}

/// The channel behind `room:*` and `test:*`.
///
/// - join params `{"refuse": R}` answer error `{"reason": R}`; `{"crash": true}` panics in join;
///   `{"user": U}` names the user (default `anonymous`); with `{"track": true}` as well, U is
///   tracked in Presence (meta `{"device": "memory"}`) and `presence_state` is pushed after the
///   join reply; `{"welcome": true}` pushes `welcome` `{"topic": T}` after it; otherwise ok `{}`.
/// - events: `new_msg` `{"body"}` broadcasts `new_msg` `{"body", "user"}` and replies ok `{}`;
///   `ping`/`echo` reply ok with the payload; `crash` panics; `stop` replies ok then stops;
///   `push`/`broadcast`/`broadcast_from` `{"event", "payload"}` do that and reply ok;
///   `binary_push`/`binary_broadcast` send event `binary` with [`BINARY`]; `deferred_push` replies
///   ok, then another task pushes `deferred` with the payload; `push_when_gate_opens` replies ok,
///   and once something is broadcast on topic `gate` another task pushes `late` and broadcasts
///   `result` `{"delivered": bool}` on topic `pushed`; `noreply` answers nothing;
///   `error_reply` replies error `{"reason": "requested"}`; `fail` stops with an error and no
///   reply; `wait` pushes `waiting`, then replies ok once something is broadcast on topic `gate`
///   (the channel is busy until then); anything else replies error `{"reason": "unknown event"}`.
struct Probe {
    user: String,
    track: bool,
    welcome: bool,
    ended: mpsc::UnboundedSender<Ended>,
}

fn field<'a>(payload: &'a Payload, key: &str) -> Option<&'a Value> {
    payload.as_json().and_then(|p| p.get(key))
}

impl Channel for Probe {
    async fn join(&mut self, params: Payload, _: &mut SocketRef) -> Result<Value, Value> {
        if let Some(why) = field(&params, "refuse") {
            return Err(json!({ "reason": why }));
        }
        if field(&params, "crash") == Some(&Value::Bool(true)) {
            panic!("join crash requested");
        }
        self.user = field(&params, "user").and_then(Value::as_str).unwrap_or("anonymous").to_owned();
        self.track = field(&params, "track") == Some(&Value::Bool(true));
        self.welcome = field(&params, "welcome") == Some(&Value::Bool(true));
        Ok(json!({}))
    }

    async fn after_join(&mut self, socket: &mut SocketRef) {
        if self.track {
            socket.track(self.user.clone(), json!({ "device": "memory" })).expect("first track of this key");
            socket.push_presence_state();
        }
        if self.welcome {
            socket.push("welcome", json!({ "topic": socket.topic() }));
        }
    }

    async fn handle_in(&mut self, event: &str, payload: Payload, socket: &mut SocketRef) -> HandleIn {
        let target = || {
            let event = field(&payload, "event").and_then(Value::as_str).unwrap_or("event").to_owned();
            (event, field(&payload, "payload").cloned().unwrap_or(json!({})))
        };
        match event {
            "new_msg" => {
                let body = field(&payload, "body").cloned().unwrap_or(Value::Null);
                socket.broadcast("new_msg", json!({ "body": body, "user": self.user }));
                HandleIn::ok(json!({}))
            }
            "ping" | "echo" => HandleIn::ok(payload),
            "crash" => panic!("crash requested"),
            "stop" => HandleIn::Stop { reason: StopReason::Normal, reply: Some((ReplyStatus::Ok, Payload::empty())) },
            "fail" => HandleIn::Stop { reason: StopReason::Error("requested".into()), reply: None },
            "wait" => {
                let mut gate = socket.pubsub().subscribe("gate", 1);
                socket.push("waiting", json!({}));
                let _ = gate.recv().await;
                HandleIn::ok(json!({}))
            }
            "push" => {
                let (event, body) = target();
                socket.push(&event, body);
                HandleIn::ok(json!({}))
            }
            "broadcast" => {
                let (event, body) = target();
                socket.broadcast(&event, body);
                HandleIn::ok(json!({}))
            }
            "broadcast_from" => {
                let (event, body) = target();
                socket.broadcast_from(&event, body);
                HandleIn::ok(json!({}))
            }
            "binary_push" => {
                socket.push("binary", Payload::Binary(BINARY.to_vec().into()));
                HandleIn::ok(json!({}))
            }
            "binary_broadcast" => {
                socket.broadcast("binary", Payload::Binary(BINARY.to_vec().into()));
                HandleIn::ok(json!({}))
            }
            "deferred_push" => {
                let pusher = socket.pusher();
                tokio::spawn(async move { pusher.push("deferred", payload) });
                HandleIn::ok(json!({}))
            }
            "push_when_gate_opens" => {
                let pusher = socket.pusher();
                let pubsub = socket.pubsub().clone();
                let mut gate = pubsub.subscribe("gate", 1);
                tokio::spawn(async move {
                    let _ = gate.recv().await;
                    let delivered = pusher.push("late", json!({}));
                    pubsub.broadcast("pushed", "result", json!({ "delivered": delivered }));
                });
                HandleIn::ok(json!({}))
            }
            "noreply" => HandleIn::NoReply,
            "error_reply" => HandleIn::error(reason("requested")),
            _ => HandleIn::error(reason("unknown event")),
        }
    }

    async fn terminate(&mut self, why: &Terminate, socket: &mut SocketRef) {
        let join_ref = socket.join_ref().map(|r| r.as_str().to_owned());
        let _ = self.ended.send(Ended { topic: socket.topic().to_owned(), join_ref, why: why.clone() });
    }
}

/// The channel behind `feed:*`, whose topics keep a history of 5 broadcasts for a minute.
///
/// - join params `{"user": U, "since": POS}` recover from POS; the reply is ok
///   `{"pos": POS_NOW, "recovered": bool}`. With `{"hold": true}` the join waits, after
///   subscribing and reading history, pushes `holding` and waits until something is broadcast on topic `gate`.
/// - `new_msg` `{"body"}` broadcasts `new_msg` `{"body", "user", "pos"}` and replies ok `{"pos"}`.
/// - `recover` calls `SocketRef::recover` outside `join` and replies with the outcome.
struct Feed {
    user: String,
}

impl Channel for Feed {
    async fn join(&mut self, params: Payload, socket: &mut SocketRef) -> Result<Value, Value> {
        self.user = field(&params, "user").and_then(Value::as_str).unwrap_or("anonymous").to_owned();
        let since = field(&params, "since").and_then(Value::as_str);
        let mut gate =
            (field(&params, "hold") == Some(&Value::Bool(true))).then(|| socket.pubsub().subscribe("gate", 1));
        let recovery = socket.recover(since).await.map_err(|e| reason(&e.to_string()))?;
        if let Some(gate) = &mut gate {
            socket.push("holding", json!({}));
            let _ = gate.recv().await;
        }
        let pos = recovery.position.map(|p| p.to_string());
        Ok(json!({ "pos": pos, "recovered": recovery.recovered }))
    }

    async fn handle_in(&mut self, event: &str, payload: Payload, socket: &mut SocketRef) -> HandleIn {
        if event == "recover" {
            return match socket.recover(None).await {
                Ok(_) => HandleIn::ok(json!({})),
                Err(e) => HandleIn::error(reason(&e.to_string())),
            };
        }
        if event != "new_msg" {
            return HandleIn::error(reason("unknown event"));
        }
        let body = field(&payload, "body").cloned().unwrap_or(Value::Null);
        let user = self.user.clone();
        let sent = socket
            .broadcast_with_position("new_msg", |pos| {
                json!({ "body": body, "user": user, "pos": pos.to_string() }).into()
            })
            .await;
        match sent {
            Ok(pos) => HandleIn::ok(json!({ "pos": pos.to_string() })),
            Err(e) => HandleIn::error(reason(&e.to_string())),
        }
    }
}

/// The channel behind `admin:*`: refuses every join.
struct Admin;

impl Channel for Admin {
    async fn join(&mut self, _: Payload, _: &mut SocketRef) -> Result<Value, Value> {
        Err(reason("unauthorized"))
    }

    async fn handle_in(&mut self, _: &str, _: Payload, _: &mut SocketRef) -> HandleIn {
        HandleIn::error(reason("unauthorized"))
    }
}

/// An endpoint with the test router and connect callback, and the stream of channel instances'
/// ends (which a test may ignore).
///
/// The connect callback refuses params with `reject=true` and gives the socket the id in `id`.
pub fn endpoint(config: Config) -> (Endpoint, mpsc::UnboundedReceiver<Ended>) {
    let (ended, ends) = mpsc::unbounded_channel();
    let probe = move || Probe { user: String::new(), track: false, welcome: false, ended: ended.clone() };
    let router = Router::new()
        .channel("room:*", probe.clone())
        .channel("test:*", probe)
        .channel("admin:*", || Admin)
        .channel("feed:*", || Feed { user: String::new() });
    let endpoint = Endpoint::builder()
        .router(router)
        .history("feed:*", HistoryOptions::default().max_len(5).max_age(Duration::from_secs(60)))
        .config(config)
        .on_connect(|info: &ConnectInfo| {
            if info.params.get("reject").map(String::as_str) == Some("true") {
                return Err(ConnectError::refused("reject=true"));
            }
            Ok(match info.params.get("id") {
                Some(id) => Accept::new().id(id.clone()),
                None => Accept::new(),
            })
        })
        .build();
    (endpoint, ends)
}

/// A peer, and its transport reduced to the three calls: connect, `handle_frame`, `outbound`.
pub struct Client {
    pub session: Session,
    pub out: Outbound,
    pub serializer: Serializer,
}

/// Connects over a transport that carries binary frames; `query` as in a socket URL.
pub async fn connect(endpoint: &Endpoint, query: &str) -> Client {
    connect_with(endpoint, ConnectInfo::new("memory", true).with_query(Some(query))).await
}

/// Connects with `info`.
pub async fn connect_with(endpoint: &Endpoint, info: ConnectInfo) -> Client {
    let session = endpoint.connect(info).await.expect("connect accepted");
    let out = session.outbound();
    let serializer = session.serializer();
    Client { session, out, serializer }
}

impl Client {
    /// Sends a text frame; the socket must stay open.
    pub async fn send(&mut self, text: &str) {
        self.session.handle_frame(Frame::text(text)).await.expect("session open");
    }

    /// The next frame.
    pub async fn frame(&mut self) -> Frame {
        tokio::time::timeout(WAIT, self.out.recv()).await.expect("a frame within 5 s").expect("session open")
    }

    /// The next frame, decoded as a client decodes it.
    pub async fn next(&mut self) -> ServerMessage {
        let frame = self.frame().await;
        self.serializer.decode_server(&frame).expect("server frames decode")
    }

    /// The next frame as text.
    pub async fn next_text(&mut self) -> String {
        String::from_utf8(self.frame().await.as_bytes().to_vec()).expect("text frame")
    }

    /// The next frame, which must be a reply.
    pub async fn reply(&mut self) -> Reply {
        match self.next().await {
            ServerMessage::Reply(r) => r,
            other => panic!("expected a reply, got {other:?}"),
        }
    }

    /// The next Presence event's (event, payload), skipping anything else.
    pub async fn next_presence(&mut self) -> (String, Value) {
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

    /// True when nothing is queued for the peer and the socket is open, right now.
    pub fn is_quiet(&mut self) -> bool {
        self.out.recv().now_or_never().is_none()
    }

    /// Skips frames until the socket closes; returns why.
    pub async fn closed(&mut self) -> CloseReason {
        loop {
            match tokio::time::timeout(WAIT, self.out.recv()).await.expect("closes within 5 s") {
                Ok(_) => continue,
                Err(reason) => return reason,
            }
        }
    }
}

/// The `reason` of an error reply.
pub fn reason_of(reply: &Reply) -> Option<&str> {
    reply.response.as_json().and_then(|v| v["reason"].as_str())
}

/// The next channel instance to end.
pub async fn next_end(ends: &mut mpsc::UnboundedReceiver<Ended>) -> Ended {
    tokio::time::timeout(WAIT, ends.recv()).await.expect("a channel ends within 5 s").expect("the endpoint is alive")
}
