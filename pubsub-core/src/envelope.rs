//! What nodes say to each other through an [`Adapter`](crate::Adapter): broadcasts, presence
//! replication and requests to one node. The adapter only moves the bytes made here.
//!
//! An envelope is `version (1) | kind (1) | origin node (8) | target node (8, 0 = every node) |
//! sequence (8) | body`, integers big-endian. The sequence number is the origin's own counter, so
//! no two envelopes are ever byte-identical (PostgreSQL folds identical notifications sent in
//! one transaction into one).

use bytes::{Buf, BufMut, Bytes, BytesMut};
use fawkes_serializer::{Broadcast, Payload};

use crate::node::NodeId;

const VERSION: u8 = 1;
const HEADER: usize = 2 + 8 + 8 + 8;

/// Why an envelope could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EnvelopeError {
    /// Shorter than its header or one of its fields.
    #[error("envelope truncated")]
    Truncated,
    /// Made by another version of this protocol.
    #[error("unknown envelope version {0}")]
    Version(u8),
    /// A kind this node does not know.
    #[error("unknown envelope kind {0}")]
    Kind(u8),
    /// Text that is not UTF-8, or a presence message that is not valid JSON.
    #[error("malformed envelope body: {0}")]
    Body(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Kind {
    Broadcast = 1,
    Presence = 2,
    Request = 3,
    Response = 4,
}

/// A decoded envelope.
#[derive(Debug)]
#[non_exhaustive]
pub struct Envelope {
    /// The node that sent it.
    pub origin: NodeId,
    /// The node it is for; `None` for every node.
    pub target: Option<NodeId>,
    /// What it says.
    pub body: Body,
}

/// What an envelope says.
#[derive(Debug)]
#[non_exhaustive]
pub enum Body {
    /// A broadcast for the subscribers of its topic on every node.
    Broadcast(Broadcast),
    /// Presence replication; the bytes are the presence layer's own (JSON).
    Presence(Bytes),
    /// A request to a service on the target node (see [`Cluster::request`](crate::Cluster::request)).
    Request {
        /// Matches the response to the request, on the asking node.
        id: u64,
        /// The service asked.
        service: String,
        /// The request.
        body: Bytes,
    },
    /// The answer to a [`Body::Request`].
    Response {
        /// The request's id.
        id: u64,
        /// False when the node serves no such service.
        found: bool,
        /// The answer.
        body: Bytes,
    },
}

/// Encodes an envelope from `origin` to `target` (`None`: every node). `seq` is the origin's own
/// counter, which keeps envelopes distinct.
pub fn encode(origin: NodeId, target: Option<NodeId>, seq: u64, body: &Body) -> Bytes {
    let (kind, size) = match body {
        Body::Broadcast(b) => (Kind::Broadcast, 9 + b.topic.len() + b.event.len() + payload_len(&b.payload)),
        Body::Presence(json) => (Kind::Presence, json.len()),
        Body::Request { service, body, .. } => (Kind::Request, 12 + service.len() + body.len()),
        Body::Response { body, .. } => (Kind::Response, 9 + body.len()),
    };
    let mut out = BytesMut::with_capacity(HEADER + size);
    out.put_u8(VERSION);
    out.put_u8(kind as u8);
    out.put_u64(origin.get());
    out.put_u64(target.map_or(0, NodeId::get));
    out.put_u64(seq);
    match body {
        Body::Broadcast(b) => {
            put_str(&mut out, &b.topic);
            put_str(&mut out, &b.event);
            match &b.payload {
                Payload::Json(v) => {
                    out.put_u8(0);
                    // Writing JSON into a growable buffer cannot fail.
                    let _ = serde_json::to_writer((&mut out).writer(), v);
                }
                Payload::Binary(bytes) => {
                    out.put_u8(1);
                    out.put_slice(bytes);
                }
            }
        }
        Body::Presence(json) => out.put_slice(json),
        Body::Request { id, service, body } => {
            out.put_u64(*id);
            put_str(&mut out, service);
            out.put_slice(body);
        }
        Body::Response { id, found, body } => {
            out.put_u64(*id);
            out.put_u8(u8::from(*found));
            out.put_slice(body);
        }
    }
    out.freeze()
}

fn payload_len(p: &Payload) -> usize {
    match p {
        Payload::Json(_) => 64,
        Payload::Binary(b) => b.len(),
    }
}

fn put_str(out: &mut BytesMut, s: &str) {
    out.put_u32(s.len() as u32);
    out.put_slice(s.as_bytes());
}

fn get_str(buf: &mut Bytes) -> Result<String, EnvelopeError> {
    let bytes = get_bytes(buf)?;
    String::from_utf8(bytes.to_vec()).map_err(|e| EnvelopeError::Body(e.to_string()))
}

fn get_bytes(buf: &mut Bytes) -> Result<Bytes, EnvelopeError> {
    if buf.remaining() < 4 {
        return Err(EnvelopeError::Truncated);
    }
    let len = buf.get_u32() as usize;
    if buf.remaining() < len {
        return Err(EnvelopeError::Truncated);
    }
    Ok(buf.split_to(len))
}

fn get_u64(buf: &mut Bytes) -> Result<u64, EnvelopeError> {
    if buf.remaining() < 8 {
        return Err(EnvelopeError::Truncated);
    }
    Ok(buf.get_u64())
}

/// Reads an envelope; garbage is an error, never a panic.
pub fn decode(mut buf: Bytes) -> Result<Envelope, EnvelopeError> {
    if buf.len() < HEADER {
        return Err(EnvelopeError::Truncated);
    }
    let version = buf.get_u8();
    if version != VERSION {
        return Err(EnvelopeError::Version(version));
    }
    let kind = buf.get_u8();
    let origin = NodeId::from_u64(buf.get_u64()).ok_or(EnvelopeError::Body("origin node 0".into()))?;
    let target = NodeId::from_u64(buf.get_u64());
    let _seq = buf.get_u64();
    let body = match kind {
        1 => {
            let topic = get_str(&mut buf)?;
            let event = get_str(&mut buf)?;
            if !buf.has_remaining() {
                return Err(EnvelopeError::Truncated);
            }
            let payload = match buf.get_u8() {
                0 => Payload::Json(serde_json::from_slice(&buf).map_err(|e| EnvelopeError::Body(e.to_string()))?),
                1 => Payload::Binary(buf),
                other => return Err(EnvelopeError::Body(format!("payload kind {other}"))),
            };
            Body::Broadcast(Broadcast { topic, event, payload })
        }
        2 => Body::Presence(buf),
        3 => {
            let id = get_u64(&mut buf)?;
            let service = get_str(&mut buf)?;
            Body::Request { id, service, body: buf }
        }
        4 => {
            let id = get_u64(&mut buf)?;
            if !buf.has_remaining() {
                return Err(EnvelopeError::Truncated);
            }
            let found = buf.get_u8() == 1;
            Body::Response { id, found, body: buf }
        }
        other => return Err(EnvelopeError::Kind(other)),
    };
    Ok(Envelope { origin, target, body })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn envelopes_round_trip_and_garbage_is_an_error() {
        let node = NodeId::from_u64(7).expect("not 0");
        let other = NodeId::from_u64(8).expect("not 0");
        let bodies = [
            Body::Broadcast(Broadcast {
                topic: "room:1".into(),
                event: "msg".into(),
                payload: json!({"a": [1]}).into(),
            }),
            Body::Broadcast(Broadcast {
                topic: "t".into(),
                event: "bin".into(),
                payload: Payload::Binary(Bytes::from_static(&[0, 1, 255])),
            }),
            Body::Presence(Bytes::from_static(b"{}")),
            Body::Request { id: 9, service: "svc".into(), body: Bytes::from_static(b"req") },
            Body::Response { id: 9, found: true, body: Bytes::from_static(b"res") },
        ];
        for body in &bodies {
            let bytes = encode(node, Some(other), 1, body);
            let env = decode(bytes.clone()).expect("decodes");
            assert_eq!((env.origin, env.target), (node, Some(other)));
            assert_eq!(format!("{:?}", env.body), format!("{body:?}"));
            for cut in 0..bytes.len() {
                // Every prefix is either an error or (for bodies that end in free bytes) a shorter body.
                let _ = decode(bytes.slice(..cut));
            }
        }
        assert!(matches!(decode(Bytes::from_static(&[9; 40])), Err(EnvelopeError::Version(9))));
        assert!(matches!(decode(Bytes::from_static(&[1, 2])), Err(EnvelopeError::Truncated)));
    }
}
