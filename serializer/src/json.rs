//! The JSON forms: V2 arrays `[join_ref, ref, topic, event, payload]` and V1 objects.

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, IgnoredAny, SeqAccess, Visitor};
use serde_json::Value;

use crate::{DecodeError, Message, Payload, Ref};

/// A ref as it may appear on the wire: string, number or null.
struct WireRef(Option<Ref>);

impl<'de> Deserialize<'de> for WireRef {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = WireRef;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string, a number or null")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<WireRef, E> {
                Ok(WireRef(Some(Ref::new(s))))
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<WireRef, E> {
                Ok(WireRef(Some(Ref::numeric(&n.to_string()))))
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<WireRef, E> {
                Ok(WireRef(Some(Ref::numeric(&n.to_string()))))
            }
            fn visit_f64<E: de::Error>(self, n: f64) -> Result<WireRef, E> {
                match serde_json::Number::from_f64(n) {
                    Some(num) => Ok(WireRef(Some(Ref::numeric(&num.to_string())))),
                    None => Err(E::custom("a ref must be a finite number")),
                }
            }
            fn visit_unit<E: de::Error>(self) -> Result<WireRef, E> {
                Ok(WireRef(None))
            }
            fn visit_none<E: de::Error>(self) -> Result<WireRef, E> {
                Ok(WireRef(None))
            }
        }
        d.deserialize_any(V)
    }
}

/// A topic or event: a string, or null (read as empty).
struct WireName(String);

impl<'de> Deserialize<'de> for WireName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(WireName(Option::<String>::deserialize(d)?.unwrap_or_default()))
    }
}

/// The V2 array form. Extra elements after the fifth are ignored, as Phoenix does.
struct V2Message(Message);

impl<'de> Deserialize<'de> for V2Message {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = V2Message;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an array [join_ref, ref, topic, event, payload]")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<V2Message, A::Error> {
                let missing = |n| de::Error::invalid_length(n, &self);
                let join_ref: WireRef = seq.next_element()?.ok_or_else(|| missing(0))?;
                let msg_ref: WireRef = seq.next_element()?.ok_or_else(|| missing(1))?;
                let topic: WireName = seq.next_element()?.ok_or_else(|| missing(2))?;
                let event: WireName = seq.next_element()?.ok_or_else(|| missing(3))?;
                let payload: Value = seq.next_element()?.ok_or_else(|| missing(4))?;
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(V2Message(Message {
                    join_ref: join_ref.0,
                    msg_ref: msg_ref.0,
                    topic: topic.0,
                    event: event.0,
                    payload: Payload::Json(payload),
                }))
            }
        }
        d.deserialize_seq(V)
    }
}

#[derive(serde::Deserialize)]
struct V1Message {
    topic: WireName,
    event: WireName,
    payload: Value,
    #[serde(default, rename = "ref")]
    msg_ref: Option<WireRef>,
    #[serde(default)]
    join_ref: Option<WireRef>,
}

pub(crate) fn decode_v2(text: &[u8]) -> Result<Message, DecodeError> {
    serde_json::from_slice::<V2Message>(text).map(|m| m.0).map_err(DecodeError::from_json)
}

pub(crate) fn decode_v1(text: &[u8]) -> Result<Message, DecodeError> {
    let m: V1Message = serde_json::from_slice(text).map_err(DecodeError::from_json)?;
    Ok(Message {
        join_ref: m.join_ref.and_then(|r| r.0),
        msg_ref: m.msg_ref.and_then(|r| r.0),
        topic: m.topic.0,
        event: m.event.0,
        payload: Payload::Json(m.payload),
    })
}

/// Appends JSON to a buffer. Writing JSON into a `Vec` cannot fail for these types, so the
/// writer's `Result` is dropped deliberately.
pub(crate) struct JsonBuf(pub(crate) Vec<u8>);

impl JsonBuf {
    pub(crate) fn with_capacity(n: usize) -> JsonBuf {
        JsonBuf(Vec::with_capacity(n))
    }

    pub(crate) fn raw(&mut self, s: &str) -> &mut Self {
        self.0.extend_from_slice(s.as_bytes());
        self
    }

    pub(crate) fn string(&mut self, s: &str) -> &mut Self {
        let _ = serde_json::to_writer(&mut self.0, s);
        self
    }

    pub(crate) fn opt_ref(&mut self, r: Option<&Ref>) -> &mut Self {
        match r {
            None => self.raw("null"),
            Some(r) if r.is_numeric() => self.raw(r.as_str()),
            Some(r) => self.string(r.as_str()),
        }
    }

    pub(crate) fn value(&mut self, v: &Value) -> &mut Self {
        let _ = serde_json::to_writer(&mut self.0, v);
        self
    }

    /// A payload in JSON. Binary payloads become `{"binary": "<base64>"}` (see the crate docs).
    pub(crate) fn payload(&mut self, p: &Payload) -> &mut Self {
        match p {
            Payload::Json(v) => self.value(v),
            Payload::Binary(b) => {
                use base64::Engine as _;
                self.raw("{\"binary\":\"");
                let start = self.0.len();
                let encoded_len = base64::encoded_len(b.len(), true).unwrap_or(0);
                self.0.resize(start + encoded_len, 0);
                let written =
                    base64::engine::general_purpose::STANDARD.encode_slice(b, &mut self.0[start..]).unwrap_or(0);
                self.0.truncate(start + written);
                self.raw("\"}")
            }
        }
    }
}
