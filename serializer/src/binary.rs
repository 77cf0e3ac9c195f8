//! The V2 binary layout: a kind byte, one length byte per string field, the fields, then the raw
//! payload to the end of the frame.

use bytes::{BufMut, Bytes, BytesMut};

use crate::{Broadcast, DecodeError, EncodeError, Message, Payload, Push, Ref, Reply, ReplyStatus};

pub(crate) const PUSH: u8 = 0;
pub(crate) const REPLY: u8 = 1;
pub(crate) const BROADCAST: u8 = 2;

const NAMES_PUSH_IN: [&str; 4] = ["join_ref", "ref", "topic", "event"];
const NAMES_PUSH_OUT: [&str; 3] = ["join_ref", "topic", "event"];
const NAMES_REPLY: [&str; 4] = ["join_ref", "ref", "topic", "status"];
const NAMES_BROADCAST: [&str; 2] = ["topic", "event"];

/// Splits a frame into its `N` string fields and the payload, checking lengths and UTF-8.
fn split<'a, const N: usize>(frame: &'a Bytes, names: [&'static str; N]) -> Result<([&'a str; N], Bytes), DecodeError> {
    let header = 1 + N;
    if frame.len() < header {
        return Err(DecodeError::BinaryTooShort { len: frame.len(), needed: header });
    }
    let needed = header + frame[1..header].iter().map(|&n| n as usize).sum::<usize>();
    if frame.len() < needed {
        return Err(DecodeError::BinaryTooShort { len: frame.len(), needed });
    }
    let mut fields = [""; N];
    let mut at = header;
    for (i, name) in names.iter().enumerate() {
        let len = frame[1 + i] as usize;
        fields[i] = std::str::from_utf8(&frame[at..at + len]).map_err(|_| DecodeError::BinaryFieldNotUtf8(name))?;
        at += len;
    }
    Ok((fields, frame.slice(needed..)))
}

fn opt_ref(s: &str) -> Option<Ref> {
    (!s.is_empty()).then(|| Ref::new(s))
}

/// Decodes a client push (kind 0 with a ref).
pub(crate) fn decode_push(frame: &Bytes) -> Result<Message, DecodeError> {
    match frame.first() {
        Some(&PUSH) => {}
        Some(&kind) => return Err(DecodeError::UnexpectedBinaryKind(kind)),
        None => return Err(DecodeError::BinaryTooShort { len: 0, needed: 1 }),
    }
    let ([join_ref, msg_ref, topic, event], payload) = split(frame, NAMES_PUSH_IN)?;
    Ok(Message {
        join_ref: opt_ref(join_ref),
        msg_ref: opt_ref(msg_ref),
        topic: topic.to_owned(),
        event: event.to_owned(),
        payload: Payload::Binary(payload),
    })
}

/// Decodes what a server sends (kinds 0 without a ref, 1 and 2), as a client does.
pub(crate) fn decode_server(frame: &Bytes) -> Result<crate::ServerMessage, DecodeError> {
    use crate::ServerMessage;
    match frame.first().copied() {
        Some(PUSH) => {
            let ([join_ref, topic, event], payload) = split(frame, NAMES_PUSH_OUT)?;
            Ok(ServerMessage::Push(Push {
                join_ref: opt_ref(join_ref),
                msg_ref: None,
                topic: topic.to_owned(),
                event: event.to_owned(),
                payload: Payload::Binary(payload),
            }))
        }
        Some(REPLY) => {
            let ([join_ref, msg_ref, topic, status], payload) = split(frame, NAMES_REPLY)?;
            Ok(ServerMessage::Reply(Reply {
                join_ref: opt_ref(join_ref),
                msg_ref: opt_ref(msg_ref),
                topic: topic.to_owned(),
                status: if status == "ok" { ReplyStatus::Ok } else { ReplyStatus::Error },
                response: Payload::Binary(payload),
            }))
        }
        Some(BROADCAST) => {
            let ([topic, event], payload) = split(frame, NAMES_BROADCAST)?;
            Ok(ServerMessage::Broadcast(Broadcast {
                topic: topic.to_owned(),
                event: event.to_owned(),
                payload: Payload::Binary(payload),
            }))
        }
        Some(kind) => Err(DecodeError::UnexpectedBinaryKind(kind)),
        None => Err(DecodeError::BinaryTooShort { len: 0, needed: 1 }),
    }
}

/// Writes `kind`, the length bytes, the fields and the payload.
fn encode<const N: usize>(kind: u8, fields: [(&'static str, &str); N], payload: &[u8]) -> Result<Bytes, EncodeError> {
    let mut len = 1 + N + payload.len();
    for (field, value) in fields {
        if value.len() > 255 {
            return Err(EncodeError::FieldTooLong { field, len: value.len() });
        }
        len += value.len();
    }
    let mut buf = BytesMut::with_capacity(len);
    buf.put_u8(kind);
    for (_, value) in fields {
        buf.put_u8(value.len() as u8);
    }
    for (_, value) in fields {
        buf.put_slice(value.as_bytes());
    }
    buf.put_slice(payload);
    Ok(buf.freeze())
}

fn ref_str(r: Option<&Ref>) -> &str {
    r.map_or("", Ref::as_str)
}

pub(crate) fn encode_reply(r: &Reply, payload: &[u8]) -> Result<Bytes, EncodeError> {
    encode(
        REPLY,
        [
            ("join_ref", ref_str(r.join_ref.as_ref())),
            ("ref", ref_str(r.msg_ref.as_ref())),
            ("topic", &r.topic),
            ("status", r.status.as_str()),
        ],
        payload,
    )
}

pub(crate) fn encode_push(p: &Push, payload: &[u8]) -> Result<Bytes, EncodeError> {
    encode(PUSH, [("join_ref", ref_str(p.join_ref.as_ref())), ("topic", &p.topic), ("event", &p.event)], payload)
}

pub(crate) fn encode_broadcast(b: &Broadcast, payload: &[u8]) -> Result<Bytes, EncodeError> {
    encode(BROADCAST, [("topic", &b.topic), ("event", &b.event)], payload)
}

/// A client push with a binary payload (kind 0, with a ref), as phoenix.js encodes it.
pub(crate) fn encode_client_push(m: &Message, payload: &[u8]) -> Result<Bytes, EncodeError> {
    encode(
        PUSH,
        [
            ("join_ref", ref_str(m.join_ref.as_ref())),
            ("ref", ref_str(m.msg_ref.as_ref())),
            ("topic", &m.topic),
            ("event", &m.event),
        ],
        payload,
    )
}
