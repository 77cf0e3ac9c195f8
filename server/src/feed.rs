//! `feed:{name}`: chat feeds that keep their history, so a client that lost its connection gets
//! everything it missed when it rejoins (the last 10,000 broadcasts or one hour). The history is
//! in memory on a single node, and in the cluster's Redis (Redis Streams) with
//! `--pubsub redis://…`, so a client recovers on any node whatever node published
//! ([`history_store`]).
//!
//! - join params may carry `{"user": string, "since": POS}`; the reply is ok
//!   `{"pos": POS_NOW, "recovered": true|false}`. `recovered` is true only when every broadcast
//!   after `since` is going to be delivered (right after the reply, before any live broadcast);
//!   without `since` it is false. `POS` values are opaque strings.
//! - `new_msg` `{"body": ...}` broadcasts `new_msg` `{"body": ..., "user": ..., "pos": POS}` to
//!   every subscriber, the sender included, and replies ok `{"pos": POS}`.
//! - any other event replies error `{"reason": "unknown event"}`.
//!
//! With phoenix.js, give the channel its params as a function so every rejoin carries the last
//! position seen: `socket.channel("feed:x", () => ({since: last}))` (see `clients/js/history.js`).

use std::time::Duration;

use serde_json::{Value, json};

use fawkes::{Channel, HandleIn, HistoryOptions, Payload, SocketRef, reason};

/// The demo's feed history: the last 10,000 broadcasts, none older than an hour.
pub fn history_options() -> HistoryOptions {
    HistoryOptions::default().max_len(10_000).max_age(Duration::from_secs(3600))
}

/// A feed with history.
#[derive(Debug, Default)]
pub struct Feed {
    user: String,
}

impl Channel for Feed {
    async fn join(&mut self, params: Payload, socket: &mut SocketRef) -> Result<Value, Value> {
        let params = params.as_json();
        let field = |key: &str| params.and_then(|p| p.get(key));
        self.user = field("user").and_then(Value::as_str).unwrap_or("anonymous").to_owned();
        // A `since` that is not a string is as good as a malformed one: not recovered.
        let since = match field("since") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.as_str()),
            Some(_) => Some(""),
        };
        let recovery = socket.recover(since).await.map_err(|e| {
            tracing::error!(topic = socket.topic(), error = %e, "feed join without history");
            reason("history unavailable")
        })?;
        Ok(json!({
            "pos": recovery.position.map(|p| p.to_string()),
            "recovered": recovery.recovered,
        }))
    }

    async fn handle_in(&mut self, event: &str, payload: Payload, socket: &mut SocketRef) -> HandleIn {
        if event != "new_msg" {
            return HandleIn::error(reason("unknown event"));
        }
        let body = payload.as_json().and_then(|p| p.get("body")).cloned().unwrap_or(Value::Null);
        let user = &self.user;
        let sent = socket
            .broadcast_with_position("new_msg", |pos| {
                json!({"body": body, "user": user, "pos": pos.to_string()}).into()
            })
            .await;
        match sent {
            Ok(pos) => HandleIn::ok(json!({"pos": pos.to_string()})),
            Err(e) => {
                tracing::error!(topic = socket.topic(), error = %e, "feed broadcast failed");
                HandleIn::error(reason("history unavailable"))
            }
        }
    }
}
