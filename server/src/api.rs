//! The HTTP API for the application's backend: publish to topics and read Presence, with
//! `Authorization: Bearer <api.key>`.
//!
//! - `POST /api/broadcast` with `{"topic": T, "event": E, "payload": P}` or a list of such
//!   objects broadcasts each, in order, through the cluster (on topics with history, through
//!   the history, and an object payload gains `"pos"` as client publishes do). `payload` is any
//!   JSON value and defaults to `{}`. Answers 200 `{"ok": true}`; 401 for a missing or wrong
//!   key; 400 `{"error": "..."}` for a malformed body (nothing of it is broadcast); 413 past
//!   `api.max_body_size` bytes (default 64 KiB).
//! - `GET /api/presence?topic=T` answers 200 with `T`'s presence on every node, in the
//!   `presence_state` shape: `{"ann": {"metas": [{"phx_ref": ..., "online_at": ...}]}}`.
//!
//! ```
//! use fawkes::Endpoint;
//!
//! let endpoint = Endpoint::new(fawkes::Router::new());
//! let routes: axum::Router = fawkes_server::api::router(endpoint, "key".into(), 64 * 1024);
//! # drop(routes);
//! ```

use std::sync::Arc;

use axum::body::{Body, to_bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

use fawkes::Endpoint;

/// The default largest body of `POST /api/broadcast`.
pub const DEFAULT_MAX_BODY: usize = 64 * 1024;

struct Api {
    endpoint: Endpoint,
    key: String,
    max_body: usize,
}

/// The API's routes for `endpoint`, guarded by `key`; broadcast bodies of at most `max_body` bytes.
pub fn router(endpoint: Endpoint, key: String, max_body: usize) -> axum::Router {
    let api = Arc::new(Api { endpoint, key, max_body });
    axum::Router::new().route("/api/broadcast", post(broadcast)).route("/api/presence", get(presence)).with_state(api)
}

fn answer(status: StatusCode, body: Value) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    answer(status, json!({ "error": message.into() }))
}

/// Compares in time independent of where the strings differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for (i, x) in a.iter().enumerate() {
        diff |= usize::from(x ^ b.get(i % b.len().max(1)).copied().unwrap_or(0));
    }
    diff == 0
}

impl Api {
    /// The 401 for a request without the key.
    fn refused(&self, headers: &HeaderMap) -> Option<Response> {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .map(str::trim);
        match given {
            Some(key) if same(key.as_bytes(), self.key.as_bytes()) => None,
            Some(_) => Some(error(StatusCode::UNAUTHORIZED, "wrong API key")),
            None => Some(error(StatusCode::UNAUTHORIZED, "expected Authorization: Bearer <api.key>")),
        }
    }
}

struct Message {
    topic: String,
    event: String,
    payload: Value,
}

fn message(v: &Value, at: Option<usize>) -> Result<Message, String> {
    let whose = |field: &str| match at {
        Some(i) => format!("[{i}].{field}"),
        None => field.to_owned(),
    };
    let Value::Object(m) = v else {
        return Err(match at {
            Some(i) => format!("[{i}]: expected an object {{\"topic\", \"event\", \"payload\"}}"),
            None => "expected an object {\"topic\", \"event\", \"payload\"} or a list of them".into(),
        });
    };
    if let Some(k) = m.keys().find(|k| !["topic", "event", "payload"].contains(&k.as_str())) {
        return Err(format!("{}: unknown field; expected topic, event and payload", whose(k)));
    }
    let text = |field: &str| match m.get(field) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        Some(_) => Err(format!("{}: expected a non-empty string", whose(field))),
        None => Err(format!("{}: missing", whose(field))),
    };
    let topic = text("topic")?;
    let event = text("event")?;
    if event.starts_with("phx_") || event == "presence_state" || event == "presence_diff" {
        return Err(format!("{}: {event:?} is reserved by the protocol", whose("event")));
    }
    if topic.len() > 255 || event.len() > 255 {
        return Err(format!("{}: longer than 255 bytes", whose(if topic.len() > 255 { "topic" } else { "event" })));
    }
    let payload = m.get("payload").cloned().unwrap_or_else(|| json!({}));
    Ok(Message { topic, event, payload })
}

async fn broadcast(State(api): State<Arc<Api>>, headers: HeaderMap, body: Body) -> Response {
    if let Some(refused) = api.refused(&headers) {
        return refused;
    }
    let Ok(bytes) = to_bytes(body, api.max_body).await else {
        return error(StatusCode::PAYLOAD_TOO_LARGE, format!("body larger than {} bytes", api.max_body));
    };
    let value: Value = match serde_json::from_slice(&bytes) {
        Ok(v) => v,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("invalid JSON: {e}")),
    };
    let messages = match &value {
        Value::Array(list) if list.is_empty() => Err("empty list".to_owned()),
        Value::Array(list) => list.iter().enumerate().map(|(i, v)| message(v, Some(i))).collect(),
        v => message(v, None).map(|m| vec![m]),
    };
    let messages = match messages {
        Ok(m) => m,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let history = api.endpoint.history();
    for m in messages {
        if history.options(&m.topic).is_some() {
            let sent = history
                .broadcast(&m.topic, &m.event, |pos| match &m.payload {
                    Value::Object(o) => {
                        let mut o = o.clone();
                        o.insert("pos".into(), Value::String(pos.to_string()));
                        Value::Object(o).into()
                    }
                    other => other.clone().into(),
                })
                .await;
            if let Err(e) = sent {
                tracing::error!(topic = m.topic, error = %e, "API broadcast to history failed");
                return error(StatusCode::SERVICE_UNAVAILABLE, format!("{}: history unavailable", m.topic));
            }
        } else {
            api.endpoint.pubsub().broadcast(&m.topic, &m.event, m.payload);
        }
    }
    answer(StatusCode::OK, json!({"ok": true}))
}

async fn presence(State(api): State<Arc<Api>>, headers: HeaderMap, uri: Uri) -> Response {
    if let Some(refused) = api.refused(&headers) {
        return refused;
    }
    let topic = fawkes::parse_query(uri.query().unwrap_or("")).find(|(k, _)| k == "topic").map(|(_, v)| v);
    match topic.filter(|t| !t.is_empty()) {
        Some(topic) => answer(StatusCode::OK, api.endpoint.pubsub().presence().list(&topic)),
        None => error(StatusCode::BAD_REQUEST, "expected ?topic=TOPIC"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_compare_whole() {
        assert!(same(b"secret", b"secret"));
        assert!(!same(b"secret", b"secreT"));
        assert!(!same(b"secret", b"secret1"));
        assert!(!same(b"", b"x"));
        assert!(!same(b"x", b""));
    }

    #[test]
    fn malformed_messages_say_what_is_wrong() {
        let e = |v: Value| message(&v, Some(2)).err().unwrap_or_default();
        assert_eq!(e(json!({"event": "e"})), "[2].topic: missing");
        assert_eq!(e(json!({"topic": 1, "event": "e"})), "[2].topic: expected a non-empty string");
        assert_eq!(
            e(json!({"topic": "t", "event": "phx_reply"})),
            "[2].event: \"phx_reply\" is reserved by the protocol"
        );
        assert!(e(json!({"topic": "t", "event": "e", "extra": 1})).contains("unknown field"));
        assert!(message(&json!({"topic": "t", "event": "e"}), None).is_ok());
    }
}
