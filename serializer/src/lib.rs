//! The Phoenix Channels wire messages and their three encodings.
//!
//! A client sends [`Message`]s; the server answers with [`Reply`]s, [`Push`]es to one socket and
//! [`Broadcast`]s to every subscriber of a topic. A [`Serializer`] turns them into [`Frame`]s and
//! back, in one of the forms the `phoenix` client speaks:
//!
//! - **V2 JSON** (`vsn=2.0.0`): `[join_ref, ref, topic, event, payload]` in text frames;
//! - **V2 binary**: binary frames for binary payloads (a kind byte, one length byte per string
//!   field, the fields, then the raw payload);
//! - **V1 JSON** (`vsn=1.0.0`): `{"topic", "event", "payload", "ref", "join_ref"}` objects.
//!
//! Decoding returns a typed [`DecodeError`] for any bad input and never panics.
//!
//! On a serializer with no binary form (V1, or V2 over a text-only transport such as long-poll), a
//! binary payload is sent as the JSON object `{"binary": "<standard base64 of the bytes>"}`.
//!
//! ```
//! use fawkes_serializer::{Frame, Payload, Reply, ReplyStatus, Serializer};
//!
//! let serializer = Serializer::from_vsn(Some("2.0.0"))?;
//! let push = serializer.decode(&Frame::text(r#"["1","2","room:lobby","ping",{"n":1}]"#))?;
//! assert_eq!(push.topic, "room:lobby");
//!
//! let reply = Reply {
//!     join_ref: push.join_ref,
//!     msg_ref: push.msg_ref,
//!     topic: push.topic,
//!     status: ReplyStatus::Ok,
//!     response: push.payload,
//! };
//! assert_eq!(
//!     serializer.encode_reply(&reply)?,
//!     Frame::text(r#"["1","2","room:lobby","phx_reply",{"response":{"n":1},"status":"ok"}]"#),
//! );
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![forbid(unsafe_code)]

mod binary;
mod error;
mod json;
mod message;

use bytes::Bytes;
use serde_json::Value;

pub use error::{DecodeError, EncodeError};
pub use message::{Broadcast, Frame, Message, Payload, Push, Ref, Reply, ReplyStatus, ServerMessage};

use json::JsonBuf;

/// The `vsn` a client asked for is not one this server speaks.
#[derive(Debug, Clone, thiserror::Error)]
#[error("unsupported serializer version {0:?} (expected 1.x or 2.x)")]
pub struct UnsupportedVsn(pub String);

/// One of the wire encodings. Chosen per socket from the client's `vsn`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Serializer {
    /// V1 JSON objects (`vsn=1.0.0` or no `vsn`).
    V1,
    /// V2 JSON arrays, and binary frames for binary payloads (`vsn=2.0.0`).
    V2,
    /// V2 JSON arrays on a transport that carries text only: binary payloads are sent as
    /// `{"binary": "<base64>"}`, and binary pushes arrive base64-encoded.
    V2Text,
}

impl Serializer {
    /// Every serializer, in [`Serializer::index`] order.
    pub const ALL: [Serializer; 3] = [Serializer::V1, Serializer::V2, Serializer::V2Text];

    /// Picks the serializer for a client's `vsn` query parameter, as Phoenix does: no `vsn` or
    /// `1.x.y` is V1, `2.x.y` is V2, anything else is refused.
    pub fn from_vsn(vsn: Option<&str>) -> Result<Serializer, UnsupportedVsn> {
        let Some(vsn) = vsn else {
            return Ok(Serializer::V1);
        };
        let mut parts = vsn.split('.');
        let major = parts.next().and_then(|p| p.parse::<u32>().ok());
        let rest_numeric = parts.all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
        match (major, rest_numeric) {
            (Some(1), true) => Ok(Serializer::V1),
            (Some(2), true) => Ok(Serializer::V2),
            _ => Err(UnsupportedVsn(vsn.to_owned())),
        }
    }

    /// The same serializer for a transport that carries text only.
    pub fn text_only(self) -> Serializer {
        match self {
            Serializer::V2 => Serializer::V2Text,
            other => other,
        }
    }

    /// A dense index (0, 1, 2) for per-serializer caches.
    pub fn index(self) -> usize {
        self as usize
    }

    /// The serializer's name, for logs.
    pub fn name(self) -> &'static str {
        match self {
            Serializer::V1 => "V1",
            Serializer::V2 => "V2",
            Serializer::V2Text => "V2 text",
        }
    }

    fn binary_frames(self) -> bool {
        self == Serializer::V2
    }

    /// Decodes a frame a client sent.
    pub fn decode(self, frame: &Frame) -> Result<Message, DecodeError> {
        match (self, frame) {
            (Serializer::V1, Frame::Text(t)) => json::decode_v1(t),
            (Serializer::V1, Frame::Binary(_)) => Err(DecodeError::BinaryNotSupported("V1")),
            (_, Frame::Text(t)) => json::decode_v2(t),
            (_, Frame::Binary(b)) => binary::decode_push(b),
        }
    }

    /// Encodes the reply to a push.
    pub fn encode_reply(self, reply: &Reply) -> Result<Frame, EncodeError> {
        if let (true, Payload::Binary(b)) = (self.binary_frames(), &reply.response) {
            return Ok(Frame::Binary(binary::encode_reply(reply, b)?));
        }
        let mut out = JsonBuf::with_capacity(64 + reply.topic.len() + payload_hint(&reply.response));
        let status = reply.status.as_str();
        if self == Serializer::V1 {
            out.raw(r#"{"event":"phx_reply","payload":{"response":"#).payload(&reply.response);
            out.raw(r#","status":""#).raw(status).raw(r#""},"ref":"#);
            out.opt_ref(reply.msg_ref.as_ref()).raw(r#","topic":"#).string(&reply.topic).raw("}");
        } else {
            out.raw("[").opt_ref(reply.join_ref.as_ref()).raw(",").opt_ref(reply.msg_ref.as_ref());
            out.raw(",").string(&reply.topic).raw(r#","phx_reply",{"response":"#);
            out.payload(&reply.response).raw(r#","status":""#).raw(status).raw(r#""}]"#);
        }
        Ok(Frame::Text(Bytes::from(out.0)))
    }

    /// Encodes a message to one socket (including `phx_close` and `phx_error`).
    pub fn encode_push(self, push: &Push) -> Result<Frame, EncodeError> {
        if let (true, Payload::Binary(b)) = (self.binary_frames(), &push.payload) {
            return Ok(Frame::Binary(binary::encode_push(push, b)?));
        }
        let hint = 48 + push.topic.len() + push.event.len() + payload_hint(&push.payload);
        let mut out = JsonBuf::with_capacity(hint);
        if self == Serializer::V1 {
            out.raw(r#"{"event":"#).string(&push.event).raw(r#","payload":"#).payload(&push.payload);
            out.raw(r#","ref":"#).opt_ref(push.msg_ref.as_ref());
            out.raw(r#","topic":"#).string(&push.topic).raw("}");
        } else {
            out.raw("[").opt_ref(push.join_ref.as_ref()).raw(",").opt_ref(push.msg_ref.as_ref());
            out.raw(",").string(&push.topic).raw(",").string(&push.event).raw(",");
            out.payload(&push.payload).raw("]");
        }
        Ok(Frame::Text(Bytes::from(out.0)))
    }

    /// Encodes a broadcast. Encode it once per serializer in use and share the frame.
    pub fn encode_broadcast(self, b: &Broadcast) -> Result<Frame, EncodeError> {
        if let (true, Payload::Binary(bytes)) = (self.binary_frames(), &b.payload) {
            return Ok(Frame::Binary(binary::encode_broadcast(b, bytes)?));
        }
        let mut out = JsonBuf::with_capacity(48 + b.topic.len() + b.event.len() + payload_hint(&b.payload));
        if self == Serializer::V1 {
            out.raw(r#"{"event":"#).string(&b.event).raw(r#","payload":"#).payload(&b.payload);
            out.raw(r#","ref":null,"topic":"#).string(&b.topic).raw("}");
        } else {
            out.raw("[null,null,").string(&b.topic).raw(",").string(&b.event).raw(",");
            out.payload(&b.payload).raw("]");
        }
        Ok(Frame::Text(Bytes::from(out.0)))
    }

    /// Encodes a message as a client sends it (for clients, test drivers and bridges).
    pub fn encode_message(self, m: &Message) -> Result<Frame, EncodeError> {
        if let (true, Payload::Binary(b)) = (self.binary_frames(), &m.payload) {
            return Ok(Frame::Binary(binary::encode_client_push(m, b)?));
        }
        let mut out = JsonBuf::with_capacity(48 + m.topic.len() + m.event.len() + payload_hint(&m.payload));
        if self == Serializer::V1 {
            out.raw(r#"{"event":"#).string(&m.event).raw(r#","join_ref":"#);
            out.opt_ref(m.join_ref.as_ref()).raw(r#","payload":"#).payload(&m.payload);
            out.raw(r#","ref":"#).opt_ref(m.msg_ref.as_ref());
            out.raw(r#","topic":"#).string(&m.topic).raw("}");
        } else {
            out.raw("[").opt_ref(m.join_ref.as_ref()).raw(",").opt_ref(m.msg_ref.as_ref());
            out.raw(",").string(&m.topic).raw(",").string(&m.event).raw(",");
            out.payload(&m.payload).raw("]");
        }
        Ok(Frame::Text(Bytes::from(out.0)))
    }

    /// Decodes what a server sent, as a client does.
    pub fn decode_server(self, frame: &Frame) -> Result<ServerMessage, DecodeError> {
        let m = match (self, frame) {
            (Serializer::V1, Frame::Binary(_)) => {
                return Err(DecodeError::BinaryNotSupported("V1"));
            }
            (_, Frame::Binary(b)) => return binary::decode_server(b),
            (Serializer::V1, Frame::Text(t)) => json::decode_v1(t)?,
            (_, Frame::Text(t)) => json::decode_v2(t)?,
        };
        Ok(classify(m))
    }
}

/// Sorts a decoded server message into reply, push or broadcast.
fn classify(m: Message) -> ServerMessage {
    if m.event == "phx_reply" {
        if let Payload::Json(Value::Object(mut body)) = m.payload {
            let status = match body.get("status").and_then(Value::as_str) {
                Some("ok") => ReplyStatus::Ok,
                _ => ReplyStatus::Error,
            };
            let response = body.remove("response").unwrap_or(Value::Null);
            return ServerMessage::Reply(Reply {
                join_ref: m.join_ref,
                msg_ref: m.msg_ref,
                topic: m.topic,
                status,
                response: Payload::Json(response),
            });
        }
        return ServerMessage::Push(Push {
            join_ref: m.join_ref,
            msg_ref: m.msg_ref,
            topic: m.topic,
            event: m.event,
            payload: m.payload,
        });
    }
    if m.join_ref.is_some() || m.msg_ref.is_some() {
        ServerMessage::Push(Push {
            join_ref: m.join_ref,
            msg_ref: m.msg_ref,
            topic: m.topic,
            event: m.event,
            payload: m.payload,
        })
    } else {
        ServerMessage::Broadcast(Broadcast { topic: m.topic, event: m.event, payload: m.payload })
    }
}

/// A guess at a payload's encoded size, to size buffers once.
fn payload_hint(p: &Payload) -> usize {
    match p {
        Payload::Binary(b) => b.len() * 4 / 3 + 16,
        Payload::Json(Value::Object(m)) if m.is_empty() => 2,
        Payload::Json(_) => 64,
    }
}
