//! The demo app served by `fawkes serve`: chat rooms, and a topic that refuses everyone.
//!
//! - `room:{name}`: join params may carry `{"user": string}` (default `"anonymous"`); the join
//!   replies ok `{}`. A join that names its user is tracked in Presence under that user, with
//!   meta `{"online_at": <unix ms>}`: the client gets `presence_state` right after the join
//!   reply (after the rows a `last_event_id` asks for), and every subscriber gets
//!   `presence_diff` as users come and go, on every node (changes batched per presence window).
//!   A user too long for `[presence] max_meta_bytes` is refused with `{"reason": "user too long"}`,
//!   and a join past the room's presence limits (`max_entries_per_topic`, `max_bytes_per_topic`)
//!   with `{"reason": "room full"}`.
//! - With a database, rows of `fawkes_events` for the topic arrive as `event` with
//!   `{"id": <row id>, "data": <payload>}`: every row written from the moment of the join on, or,
//!   with `{"last_event_id": N}` in the join params, every row with id > N first (the table is
//!   the rooms' history: [`TableStream::recover`]).
//! - `new_msg` `{"body": ...}` broadcasts `new_msg` `{"body": ..., "user": ...}` to every
//!   subscriber, the sender included, and replies ok `{}`. `ping` replies ok with the payload
//!   unchanged, JSON or binary. Any other event replies error `{"reason": "unknown event"}`.
//! - `admin:{anything}`: every join is refused with `{"reason": "unauthorized"}`.
//! - any other topic: the join is refused with `{"reason": "unmatched topic"}`.

use serde_json::{Value, json};

use fawkes::db::TableStream;
use fawkes::{Channel, HandleIn, Payload, PresenceError, Router, SocketRef, reason};

/// A chat room.
#[derive(Debug, Default)]
pub struct Room {
    user: String,
    tracked: bool,
    events: Option<TableStream>,
}

impl Channel for Room {
    async fn join(&mut self, params: Payload, socket: &mut SocketRef) -> Result<Value, Value> {
        let params = params.as_json();
        let user = params.and_then(|p| p.get("user")).and_then(Value::as_str);
        self.user = user.unwrap_or("anonymous").to_owned();
        if user.is_some() {
            // Tracked here rather than after the join, so a user presence refuses is refused the join.
            let online_at =
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
            match socket.track(self.user.clone(), json!({ "online_at": online_at })) {
                Ok(_) => self.tracked = true,
                Err(PresenceError::TooLarge { .. }) => return Err(reason("user too long")),
                Err(PresenceError::TopicFull { .. }) => return Err(reason("room full")),
                Err(e) => tracing::warn!(error = %e, "presence not tracked"),
            }
        }
        if let Some(events) = &self.events {
            // Without a last_event_id, rows from the moment of the join on.
            let last_event_id = params.and_then(|p| p.get("last_event_id")).and_then(Value::as_i64);
            // The rows after it are delivered right after the reply, before presence_state.
            if let Err(e) = events.recover(socket, last_event_id).await {
                tracing::warn!(topic = socket.topic(), error = %e, "room without its table history");
            }
        }
        Ok(json!({}))
    }

    async fn after_join(&mut self, socket: &mut SocketRef) {
        if self.tracked {
            socket.push_presence_state();
        }
    }

    async fn handle_in(&mut self, event: &str, payload: Payload, socket: &mut SocketRef) -> HandleIn {
        match event {
            "new_msg" => {
                let body = payload.as_json().and_then(|p| p.get("body")).cloned().unwrap_or(Value::Null);
                socket.broadcast("new_msg", json!({"body": body, "user": self.user}));
                HandleIn::ok(json!({}))
            }
            "ping" => HandleIn::ok(payload),
            _ => HandleIn::error(reason("unknown event")),
        }
    }
}

/// A topic nobody may join.
#[derive(Debug, Default)]
pub struct Admin;

impl Channel for Admin {
    async fn join(&mut self, _: Payload, _: &mut SocketRef) -> Result<Value, Value> {
        Err(reason("unauthorized"))
    }

    async fn handle_in(&mut self, _: &str, _: Payload, _: &mut SocketRef) -> HandleIn {
        HandleIn::error(reason("unauthorized"))
    }
}

/// The demo's routes.
pub fn router() -> Router {
    Router::new()
        .channel("room:*", Room::default)
        .channel("feed:*", crate::feed::Feed::default)
        .history("feed:*", crate::feed::history_options())
        .channel("admin:*", || Admin)
}

/// The demo's routes, with rooms fed by the `fawkes_events` table stream.
pub fn router_with_events(events: TableStream) -> Router {
    Router::new()
        .channel("room:*", move || Room { events: Some(events.clone()), ..Room::default() })
        .channel("feed:*", crate::feed::Feed::default)
        .history("feed:*", crate::feed::history_options())
        .channel("admin:*", || Admin)
}
