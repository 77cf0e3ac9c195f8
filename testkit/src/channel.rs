//! The `test:*` channel and the connect callback the scenarios (and the phoenix.js suite) use.

use std::collections::HashMap;

use fawkes_channel::{
    Accept, Channel, ConnectError, ConnectInfo, HandleIn, Payload, ReplyStatus, SocketRef, StopReason, reason,
};
use serde_json::{Value, json};

/// Bytes of the `binary` event.
pub const BINARY: [u8; 4] = [1, 2, 3, 255];

#[derive(Clone)]
struct AuthToken(Option<String>);

#[derive(Clone)]
struct ConnectParams(HashMap<String, String>);

/// Accepts every socket but those whose params contain `reject=true`, and remembers the auth
/// token and connect params for [`TestChannel`]'s join reply.
pub fn connect(info: &ConnectInfo) -> Result<Accept, ConnectError> {
    if info.params.get("reject").map(String::as_str) == Some("true") {
        return Err(ConnectError::refused("reject=true"));
    }
    Ok(Accept::new().assign(AuthToken(info.auth_token.clone())).assign(ConnectParams(info.params.clone())))
}

/// The `test:*` channel.
///
/// - join params `{"refuse": R}` answer error `{"reason": R}`; `{"crash": true}` panics in join
///   (error `{"reason": "join crashed"}`); `{"welcome": true}` pushes `welcome` right after the
///   join reply; otherwise ok
///   `{"topic": T, "token": <auth token or null>, "params": <connect params>}`.
/// - events: `crash` panics; `stop` replies ok then stops normally; `push`/`broadcast`/
///   `broadcast_from` `{"event", "payload"}` do that and reply ok; `binary_push`/`binary_broadcast`
///   send event `binary` with bytes [`BINARY`]; `noreply` answers nothing; `error_reply`
///   replies error `{"reason": "requested"}`; `echo` replies ok with the payload; `deferred_push`
///   replies ok, then another task pushes `deferred` with the payload; anything else replies
///   error `{"reason": "unknown event"}`.
///
/// ```
/// use fawkes_channel::{Endpoint, Router};
/// use fawkes_testkit::TestChannel;
///
/// let endpoint = Endpoint::new(Router::new().channel("test:*", TestChannel::default));
/// # drop(endpoint);
/// ```
#[derive(Debug, Default)]
pub struct TestChannel {
    welcome: bool,
}

fn field<'a>(payload: &'a Payload, key: &str) -> Option<&'a Value> {
    payload.as_json().and_then(|p| p.get(key))
}

impl Channel for TestChannel {
    async fn join(&mut self, params: Payload, socket: &mut SocketRef) -> Result<Value, Value> {
        if let Some(why) = field(&params, "refuse") {
            return Err(json!({ "reason": why }));
        }
        if field(&params, "crash") == Some(&Value::Bool(true)) {
            panic!("join crash requested");
        }
        self.welcome = field(&params, "welcome") == Some(&Value::Bool(true));
        let token = socket.assign::<AuthToken>().and_then(|t| t.0.clone());
        let params = socket.assign::<ConnectParams>().map(|p| json!(p.0)).unwrap_or(Value::Null);
        Ok(json!({ "topic": socket.topic(), "token": token, "params": params }))
    }

    async fn after_join(&mut self, socket: &mut SocketRef) {
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
            "crash" => panic!("crash requested"),
            "stop" => HandleIn::Stop { reason: StopReason::Normal, reply: Some((ReplyStatus::Ok, Payload::empty())) },
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
                // Pushes from another task, after this reply.
                let pusher = socket.pusher();
                tokio::spawn(async move { pusher.push("deferred", payload) });
                HandleIn::ok(json!({}))
            }
            "noreply" => HandleIn::NoReply,
            "error_reply" => HandleIn::error(reason("requested")),
            "echo" => HandleIn::ok(payload),
            _ => HandleIn::error(reason("unknown event")),
        }
    }
}
