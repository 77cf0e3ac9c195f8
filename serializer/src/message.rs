//! The values that travel between a client and the channel layer.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use serde_json::Value;

/// A unit a transport moves: one WebSocket message, one long-poll line, one database row.
///
/// A transport never looks inside a frame; the [`Serializer`](crate::Serializer) does.
#[derive(Clone, PartialEq, Eq)]
pub enum Frame {
    /// UTF-8 text (JSON for both serializers). An outbound text frame must be UTF-8: transports
    /// send it as it is, without checking it again for every socket.
    Text(Bytes),
    /// Binary bytes (the V2 binary layout).
    Binary(Bytes),
}

impl Frame {
    /// The frame's bytes, whatever its kind.
    pub fn as_bytes(&self) -> &Bytes {
        match self {
            Frame::Text(b) | Frame::Binary(b) => b,
        }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.as_bytes().len()
    }

    /// True for a zero-length frame.
    pub fn is_empty(&self) -> bool {
        self.as_bytes().is_empty()
    }

    /// A text frame from a string.
    pub fn text(s: impl Into<String>) -> Frame {
        Frame::Text(Bytes::from(s.into()))
    }
}

impl fmt::Debug for Frame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Frame::Text(b) => write!(f, "Text({:?})", String::from_utf8_lossy(b)),
            Frame::Binary(b) => write!(f, "Binary({b:?})"),
        }
    }
}

/// A message reference (`ref` or `join_ref`): a string, or a number that is echoed back verbatim.
///
/// Cloning is cheap: the text is shared.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Ref {
    text: Arc<str>,
    numeric: bool,
}

impl Ref {
    /// A string reference, as the phoenix client sends them.
    pub fn new(text: impl AsRef<str>) -> Ref {
        Ref { text: Arc::from(text.as_ref()), numeric: false }
    }

    /// A numeric reference; `text` must be the number as JSON wrote it.
    pub(crate) fn numeric(text: &str) -> Ref {
        Ref { text: Arc::from(text), numeric: true }
    }

    /// The reference's text (a number's JSON text for numeric references).
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// True when the client sent this reference as a JSON number.
    pub fn is_numeric(&self) -> bool {
        self.numeric
    }

    /// The reference as a JSON value, exactly as the client sent it.
    pub fn to_json(&self) -> Value {
        if self.numeric {
            serde_json::from_str(&self.text).unwrap_or_else(|_| Value::String(self.text.to_string()))
        } else {
            Value::String(self.text.to_string())
        }
    }
}

impl fmt::Debug for Ref {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.numeric { write!(f, "{}", self.text) } else { write!(f, "{:?}", &*self.text) }
    }
}

impl fmt::Display for Ref {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl From<&str> for Ref {
    fn from(s: &str) -> Ref {
        Ref::new(s)
    }
}

impl From<String> for Ref {
    fn from(s: String) -> Ref {
        Ref { text: Arc::from(s), numeric: false }
    }
}

/// A message payload: JSON, or raw bytes (sent in the V2 binary layout).
#[derive(Clone, Debug, PartialEq)]
pub enum Payload {
    /// Any JSON value; an object in practice.
    Json(Value),
    /// Raw bytes.
    Binary(Bytes),
}

impl Payload {
    /// The empty object `{}`, the payload of `phx_close`, `phx_error` and most ok replies.
    pub fn empty() -> Payload {
        Payload::Json(Value::Object(serde_json::Map::new()))
    }

    /// The JSON value, if this is a JSON payload.
    pub fn as_json(&self) -> Option<&Value> {
        match self {
            Payload::Json(v) => Some(v),
            Payload::Binary(_) => None,
        }
    }

    /// The bytes, if this is a binary payload.
    pub fn as_binary(&self) -> Option<&Bytes> {
        match self {
            Payload::Binary(b) => Some(b),
            Payload::Json(_) => None,
        }
    }

    /// True for a binary payload.
    pub fn is_binary(&self) -> bool {
        matches!(self, Payload::Binary(_))
    }
}

impl Default for Payload {
    fn default() -> Payload {
        Payload::empty()
    }
}

impl From<Value> for Payload {
    fn from(v: Value) -> Payload {
        Payload::Json(v)
    }
}

impl From<Bytes> for Payload {
    fn from(b: Bytes) -> Payload {
        Payload::Binary(b)
    }
}

impl From<Vec<u8>> for Payload {
    fn from(b: Vec<u8>) -> Payload {
        Payload::Binary(Bytes::from(b))
    }
}

/// A message from a client: a push to a topic, or a control event (`phx_join`, `phx_leave`,
/// `heartbeat`).
#[derive(Clone, Debug, PartialEq)]
pub struct Message {
    /// The ref of the join that opened the channel instance this message belongs to.
    pub join_ref: Option<Ref>,
    /// Unique per push; echoed in the reply.
    pub msg_ref: Option<Ref>,
    /// The topic, e.g. `room:lobby`. Empty when the client sent `null`.
    pub topic: String,
    /// The event, e.g. `phx_join` or `new_msg`. Empty when the client sent `null`.
    pub event: String,
    /// The payload.
    pub payload: Payload,
}

/// The status of a reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReplyStatus {
    /// `"ok"`
    Ok,
    /// `"error"`
    Error,
}

impl ReplyStatus {
    /// The status as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ReplyStatus::Ok => "ok",
            ReplyStatus::Error => "error",
        }
    }
}

/// A `phx_reply` to one client push, carrying the push's refs.
#[derive(Clone, Debug, PartialEq)]
pub struct Reply {
    /// The join ref of the channel instance (null for "unmatched topic" and heartbeats).
    pub join_ref: Option<Ref>,
    /// The ref of the push being answered.
    pub msg_ref: Option<Ref>,
    /// The topic of the push.
    pub topic: String,
    /// `ok` or `error`.
    pub status: ReplyStatus,
    /// The response body.
    pub response: Payload,
}

/// A message the server sends to one socket on one topic (including `phx_close` and
/// `phx_error`). It carries the channel's join ref and no ref of its own.
#[derive(Clone, Debug, PartialEq)]
pub struct Push {
    /// The join ref of the channel instance.
    pub join_ref: Option<Ref>,
    /// The topic.
    pub topic: String,
    /// The event.
    pub event: String,
    /// The payload.
    pub payload: Payload,
    /// Set only for `phx_close` and `phx_error`, which carry the join ref as their ref too.
    pub msg_ref: Option<Ref>,
}

/// A message to every subscriber of a topic. Encoded once per serializer and shared.
#[derive(Clone, Debug, PartialEq)]
pub struct Broadcast {
    /// The topic.
    pub topic: String,
    /// The event.
    pub event: String,
    /// The payload.
    pub payload: Payload,
}

/// Anything the server sends, as a client decodes it.
#[derive(Clone, Debug, PartialEq)]
pub enum ServerMessage {
    /// A `phx_reply`.
    Reply(Reply),
    /// A message to this socket (has a join ref), including `phx_close` and `phx_error`.
    Push(Push),
    /// A message to every subscriber (no join ref).
    Broadcast(Broadcast),
}
