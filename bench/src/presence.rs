//! The presence storm: every client joins [`TOPIC`] as its own user (`{"user": "u<id>"}`), which
//! the demo app tracks in Presence, and keeps its own presence list as phoenix.js's `Presence`
//! helper does: `presence_state` sets the list, `presence_diff` adds its joins and removes its
//! leaves, and diffs that come before the first state wait for it.
//!
//! At tens of thousands of members every client receives every other member's key, so the lists
//! are kept small and read fast: a key is `u<i>` for a client `i` of the run (anything else is an
//! error), a list is a bit per client, and frames are read with borrowed keys and metas skipped.
//! Each user joins once, from one socket, so a key has one meta: a join makes it present, a leave
//! makes it absent (phoenix.js removes the leaving metas, and a key with none left).

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use fawkes_serializer::ServerMessage;
use futures_util::StreamExt as _;
use serde::Deserialize;
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message as WsMessage;

use crate::ctx::{Ctx, Phase, REPLY_TIMEOUT, Res, TOPIC, decode, encode, expect_ok};
use crate::ws::{self, Ws};

/// A presence message on [`TOPIC`], read from a V2 text frame.
#[derive(Debug, PartialEq, Eq)]
pub enum PresenceMsg<'a> {
    /// `presence_state`: every key, with how many metas each has.
    State(Vec<(Cow<'a, str>, usize)>),
    /// `presence_diff`: keys joining and keys leaving, with their metas counts.
    Diff { joins: Vec<(Cow<'a, str>, usize)>, leaves: Vec<(Cow<'a, str>, usize)> },
}

/// Reads `text` as a V2 frame: `Ok(Some(..))` for a presence message on [`TOPIC`], `Ok(None)`
/// for any other message (to be decoded in full), an error if it is not a V2 frame or its
/// presence payload is malformed.
pub fn parse(text: &str) -> Res<Option<PresenceMsg<'_>>> {
    if let Some(msg) = fast::parse(text) {
        return Ok(Some(msg));
    }
    let mut de = serde_json::Deserializer::from_str(text);
    let msg = de
        .deserialize_seq(FrameVisitor)
        .map_err(|e| format!("expected a V2 message [join_ref, ref, topic, event, payload], got {text:?} ({e})"))?;
    Ok(msg)
}

/// A reader for the presence frames as the server writes them (compact JSON, keys without
/// escapes, `{"metas":[...]}` entries, `joins` before `leaves`), which the storm gets by the
/// gigabyte: metas are skipped by their brackets and strings, not parsed. Anything else, a
/// malformed frame included, gets `None`, and the serde reader reads it (and reports what is
/// wrong).
mod fast {
    use super::{Cow, PresenceMsg, TOPIC};

    /// The bytes that matter when skipping a container: strings and brackets.
    static STRUCTURAL: [bool; 256] = {
        let mut t = [false; 256];
        t[b'"' as usize] = true;
        t[b'{' as usize] = true;
        t[b'}' as usize] = true;
        t[b'[' as usize] = true;
        t[b']' as usize] = true;
        t
    };

    struct Cursor<'a> {
        text: &'a str,
        at: usize,
        /// The frame has no `\` at all, so no string in it has an escape.
        plain: bool,
    }

    impl<'a> Cursor<'a> {
        fn peek(&self) -> Option<u8> {
            self.text.as_bytes().get(self.at).copied()
        }

        fn eat(&mut self, c: u8) -> Option<()> {
            (self.peek()? == c).then(|| self.at += 1)
        }

        fn literal(&mut self, s: &str) -> Option<()> {
            self.text[self.at..].starts_with(s).then(|| self.at += s.len())
        }

        /// A string without escapes, borrowed.
        fn string(&mut self) -> Option<&'a str> {
            self.eat(b'"')?;
            let start = self.at;
            let n = self.string_body()?;
            (self.peek()? == b'"').then_some(())?;
            self.at += 1;
            self.text.get(start..start + n)
        }

        /// Moves to the `"` or `\` that ends a string's first run of plain bytes; how many bytes
        /// it passed. Strings here are short (keys, refs), too short for `memchr` to pay off.
        fn string_body(&mut self) -> Option<usize> {
            let bytes = &self.text.as_bytes()[self.at..];
            let n = bytes.iter().position(|&c| c == b'"' || c == b'\\')?;
            self.at += n;
            Some(n)
        }

        fn skip_string(&mut self) -> Option<()> {
            self.eat(b'"')?;
            loop {
                self.string_body()?;
                if self.peek()? == b'"' {
                    self.at += 1;
                    return Some(());
                }
                self.at += 2;
            }
        }

        /// Skips one value: a string, a scalar, or an object or array by its brackets.
        fn skip_value(&mut self) -> Option<()> {
            match self.peek()? {
                b'"' => self.skip_string(),
                b'{' | b'[' => {
                    let mut depth = 0usize;
                    loop {
                        // Only strings and brackets matter; everything else is stepped over.
                        let bytes = &self.text.as_bytes()[self.at..];
                        self.at += bytes.iter().position(|&c| STRUCTURAL[usize::from(c)])?;
                        match self.peek()? {
                            b'"' => {
                                self.skip_string()?;
                                continue;
                            }
                            b'{' | b'[' => depth += 1,
                            _ => {
                                depth -= 1;
                                if depth == 0 {
                                    self.at += 1;
                                    return Some(());
                                }
                            }
                        }
                        self.at += 1;
                    }
                }
                _ => {
                    let rest = &self.text.as_bytes()[self.at..];
                    let n = rest.iter().position(|c| matches!(c, b',' | b'}' | b']')).filter(|&n| n > 0)?;
                    self.at += n;
                    Some(())
                }
            }
        }

        /// Skips an object with no object or array inside (a meta as the server writes it) in a
        /// frame without escapes, with two passes over its bytes rather than a step per byte;
        /// `None`, having moved nothing, for anything else. Without escapes the quotes pair up
        /// into strings, so with an even number of them before it the first `}` is outside every
        /// string: the object's end.
        fn skip_flat_object(&mut self) -> Option<()> {
            if !self.plain {
                return None;
            }
            let rest = self.text.as_bytes().get(self.at..)?;
            (rest.first() == Some(&b'{')).then_some(())?;
            let end = memchr::memchr(b'}', rest)?;
            let (mut quotes, mut opens) = (0u32, 0u32);
            for &c in &rest[1..end] {
                quotes += u32::from(c == b'"');
                opens += u32::from(c == b'{' || c == b'[');
            }
            if quotes % 2 != 0 || opens != 0 {
                return None;
            }
            self.at += end + 1;
            Some(())
        }

        /// `{key: {"metas": [...]}, ...}`: each key with its number of metas.
        fn entries(&mut self) -> Option<Vec<(Cow<'a, str>, usize)>> {
            self.eat(b'{')?;
            // About one entry per 64 bytes in the server's form.
            let mut out = Vec::with_capacity((self.text.len() - self.at) / 64);
            if self.eat(b'}').is_some() {
                return Some(out);
            }
            loop {
                let key = self.string()?;
                self.literal(":{\"metas\":[")?;
                let mut metas = 0;
                if self.eat(b']').is_none() {
                    loop {
                        if self.skip_flat_object().is_none() {
                            self.skip_value()?;
                        }
                        metas += 1;
                        if self.eat(b',').is_none() {
                            self.eat(b']')?;
                            break;
                        }
                    }
                }
                self.eat(b'}')?;
                out.push((Cow::Borrowed(key), metas));
                if self.eat(b',').is_none() {
                    self.eat(b'}')?;
                    return Some(out);
                }
            }
        }
    }

    /// A presence message on [`TOPIC`] in the server's own form, or `None`.
    pub(super) fn parse(text: &str) -> Option<PresenceMsg<'_>> {
        let plain = memchr::memchr(b'\\', text.as_bytes()).is_none();
        let mut c = Cursor { text, at: 0, plain };
        c.eat(b'[')?;
        for _ in 0..2 {
            c.skip_value()?;
            c.eat(b',')?;
        }
        let topic = c.string()?;
        c.eat(b',')?;
        let event = c.string()?;
        c.eat(b',')?;
        if topic != TOPIC {
            return None;
        }
        let msg = match event {
            "presence_state" => PresenceMsg::State(c.entries()?),
            "presence_diff" => {
                c.literal("{\"joins\":")?;
                let joins = c.entries()?;
                c.literal(",\"leaves\":")?;
                let leaves = c.entries()?;
                c.eat(b'}')?;
                PresenceMsg::Diff { joins, leaves }
            }
            _ => return None,
        };
        c.eat(b']')?;
        (c.at == text.len()).then_some(msg)
    }
}

/// A string borrowed from the frame when it has no escapes.
struct Str<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Str<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Str<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Str<'de>, E> {
                Ok(Str(Cow::Borrowed(s)))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Str<'de>, E> {
                Ok(Str(Cow::Owned(s.to_owned())))
            }
        }
        d.deserialize_str(V)
    }
}

/// `{"metas": [...]}`: only the number of metas is kept.
struct Metas(usize);

impl<'de> Deserialize<'de> for Metas {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Raw {
            metas: Vec<IgnoredAny>,
        }
        Raw::deserialize(d).map(|raw| Metas(raw.metas.len()))
    }
}

/// `{key: {"metas": [...]}, ...}` as a list of keys and metas counts.
struct Entries<'a>(Vec<(Cow<'a, str>, usize)>);

impl<'de: 'a, 'a> Deserialize<'de> for Entries<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Entries<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object of presence entries {key: {\"metas\": [..]}}")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Entries<'de>, A::Error> {
                let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(0));
                while let Some((Str(key), Metas(n))) = map.next_entry::<Str<'de>, Metas>()? {
                    entries.push((key, n));
                }
                Ok(Entries(entries))
            }
        }
        d.deserialize_map(V)
    }
}

#[derive(Deserialize)]
struct Diff<'a> {
    #[serde(borrow)]
    joins: Entries<'a>,
    #[serde(borrow)]
    leaves: Entries<'a>,
}

struct FrameVisitor;

impl<'de> Visitor<'de> for FrameVisitor {
    type Value = Option<PresenceMsg<'de>>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a V2 message array")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let missing = || de::Error::custom("expected 5 elements");
        seq.next_element::<IgnoredAny>()?.ok_or_else(missing)?;
        seq.next_element::<IgnoredAny>()?.ok_or_else(missing)?;
        let Str(topic) = seq.next_element::<Str<'de>>()?.ok_or_else(missing)?;
        let Str(event) = seq.next_element::<Str<'de>>()?.ok_or_else(missing)?;
        let presence = topic == TOPIC && matches!(&*event, "presence_state" | "presence_diff");
        let msg = seq.next_element_seed(Payload { event: presence.then_some(&*event) })?.ok_or_else(missing)?;
        if seq.next_element::<IgnoredAny>()?.is_some() {
            return Err(de::Error::custom("expected 5 elements, got more"));
        }
        Ok(msg)
    }
}

/// The payload of a presence event (anything else is skipped).
struct Payload<'e> {
    event: Option<&'e str>,
}

impl<'de> DeserializeSeed<'de> for Payload<'_> {
    type Value = Option<PresenceMsg<'de>>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        match self.event {
            Some("presence_state") => Entries::deserialize(d).map(|e| Some(PresenceMsg::State(e.0))),
            Some(_) => {
                Diff::deserialize(d).map(|diff| Some(PresenceMsg::Diff { joins: diff.joins.0, leaves: diff.leaves.0 }))
            }
            None => IgnoredAny::deserialize(d).map(|_| None),
        }
    }
}

/// One client's presence list, for the users `u0` .. `u<n-1>`.
#[derive(Debug)]
pub struct PresenceList {
    present: Vec<u64>,
    users: usize,
    keys: usize,
    /// Until the first `presence_state`, diffs wait here (as phoenix.js's pending diffs do).
    pending: Option<Vec<(Vec<usize>, Vec<usize>)>>,
}

impl PresenceList {
    pub fn new(users: usize) -> PresenceList {
        PresenceList { present: vec![0; users.div_ceil(64)], users, keys: 0, pending: Some(Vec::new()) }
    }

    /// Keys in the list.
    pub fn len(&self) -> usize {
        self.keys
    }

    /// Whether user `u<i>` is in the list.
    #[cfg(test)]
    pub fn contains(&self, i: usize) -> bool {
        self.present.get(i / 64).is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    fn user(&self, key: &str) -> Res<usize> {
        key.strip_prefix('u')
            .map(str::as_bytes)
            .filter(|d| (1..=9).contains(&d.len()) && d.iter().all(u8::is_ascii_digit))
            .map(|d| d.iter().fold(0, |n, &c| n * 10 + usize::from(c - b'0')))
            .filter(|&i| i < self.users)
            .ok_or_else(|| format!("expected presence keys u0 to u{}, got {key:?}", self.users - 1))
    }

    fn set(&mut self, i: usize, on: bool) {
        let (word, bit) = (i / 64, 1u64 << (i % 64));
        let was = self.present[word] & bit != 0;
        if on && !was {
            self.present[word] |= bit;
            self.keys += 1;
        } else if !on && was {
            self.present[word] &= !bit;
            self.keys -= 1;
        }
    }

    fn users_of(&self, entries: &[(Cow<'_, str>, usize)], what: &str) -> Res<Vec<usize>> {
        let mut users = Vec::with_capacity(entries.len());
        for (key, metas) in entries {
            if *metas == 0 {
                return Err(format!("expected {what} {key:?} to carry at least one meta, got none"));
            }
            users.push(self.user(key)?);
        }
        Ok(users)
    }

    /// Applies one presence message.
    pub fn apply(&mut self, msg: &PresenceMsg<'_>) -> Res<()> {
        match msg {
            PresenceMsg::State(entries) => {
                let users = self.users_of(entries, "presence_state key")?;
                self.present.iter_mut().for_each(|w| *w = 0);
                self.keys = 0;
                for i in users {
                    self.set(i, true);
                }
                for (joins, leaves) in self.pending.take().unwrap_or_default() {
                    self.apply_diff(&joins, &leaves);
                }
            }
            PresenceMsg::Diff { joins, leaves } => {
                let joins = self.users_of(joins, "presence_diff join")?;
                let leaves = self.users_of(leaves, "presence_diff leave")?;
                match &mut self.pending {
                    Some(pending) => pending.push((joins, leaves)),
                    None => self.apply_diff(&joins, &leaves),
                }
            }
        }
        Ok(())
    }

    /// Joins first, then leaves, as phoenix.js's `syncDiff`.
    fn apply_diff(&mut self, joins: &[usize], leaves: &[usize]) {
        for &i in joins {
            self.set(i, true);
        }
        for &i in leaves {
            self.set(i, false);
        }
    }
}

/// A client of the presence storm: joins as `u<id>`, keeps its list, and stays until the run
/// stops, with heartbeats.
pub async fn client(ctx: Arc<Ctx>, id: usize, clients: usize) -> Res<()> {
    let permit = ctx.gate.acquire().await.map_err(|e| e.to_string())?;
    // Every member receives every other member's entry: tens of kilobytes per window.
    let mut ws = ws::connect_reading(&ctx, id, 16 * 1024).await?;
    let join = encode(Some("1"), "1", TOPIC, "phx_join", json!({ "user": format!("u{id}") }));
    ws::send(&mut ws, join).await?;
    let mut list = PresenceList::new(clients);
    let joined = async {
        loop {
            if let Incoming::Other(message) = next(&mut ws, &mut list).await? {
                return match message {
                    ServerMessage::Reply(reply) => expect_ok(&reply, "1", "phx_join"),
                    other => Err(format!("expected the reply to phx_join, got {other:?}")),
                };
            }
        }
    };
    tokio::time::timeout(REPLY_TIMEOUT, joined)
        .await
        .map_err(|_| format!("expected the reply to phx_join within {REPLY_TIMEOUT:?}"))??;
    drop(permit);
    ctx.presence_keys(id, list.len());
    ctx.joined.fetch_add(1, Ordering::Relaxed);

    let mut phase = ctx.watch_phase();
    let every = ws::HEARTBEAT_EVERY;
    let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    let mut heartbeats = 0u64;
    loop {
        if *phase.borrow_and_update() == Phase::Stop {
            return Ok(());
        }
        tokio::select! {
            changed = phase.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
            }
            _ = heartbeat.tick() => {
                heartbeats += 1;
                ws::send(&mut ws, encode(None, &format!("hb{heartbeats}"), "phoenix", "heartbeat", json!({}))).await?;
            }
            incoming = next(&mut ws, &mut list) => match incoming? {
                Incoming::Presence => ctx.presence_keys(id, list.len()),
                Incoming::Other(ServerMessage::Reply(reply)) if reply.msg_ref.as_ref().is_some_and(|r| r.as_str().starts_with("hb")) => {
                    let hb = reply.msg_ref.as_ref().map(|r| r.as_str().to_owned()).unwrap_or_default();
                    expect_ok(&reply, &hb, "heartbeat")?;
                }
                Incoming::Other(other) => return Err(format!("expected presence messages and heartbeat replies, got {other:?}")),
            },
        }
    }
}

enum Incoming {
    /// A presence message, applied to the list.
    Presence,
    Other(ServerMessage),
}

/// The next message: presence messages are applied to `list` on the way.
async fn next(ws: &mut Ws, list: &mut PresenceList) -> Res<Incoming> {
    loop {
        match ws.next().await {
            Some(Ok(WsMessage::Text(text))) => {
                if let Some(msg) = parse(text.as_str())? {
                    list.apply(&msg)?;
                    return Ok(Incoming::Presence);
                }
                return decode(Bytes::from(text)).map(Incoming::Other);
            }
            Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_) | WsMessage::Frame(_))) => continue,
            Some(Ok(WsMessage::Close(frame))) => {
                let why = frame.map(|f| format!("{} {:?}", u16::from(f.code), f.reason.as_str())).unwrap_or_default();
                return Err(format!("expected messages, but the server closed the socket ({why})"));
            }
            Some(Ok(other)) => return Err(format!("expected text frames, got {other:?}")),
            Some(Err(e)) => return Err(format!("expected messages, but the socket broke: {e}")),
            None => return Err("expected messages, but the socket closed without a close frame".to_owned()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(keys: &[&str]) -> String {
        let entries: serde_json::Map<String, serde_json::Value> = keys
            .iter()
            .map(|k| ((*k).to_owned(), json!({"metas": [{"phx_ref": format!("r{k}"), "online_at": 1}]})))
            .collect();
        json!(["1", null, TOPIC, "presence_state", entries]).to_string()
    }

    fn diff(joins: &[&str], leaves: &[&str]) -> String {
        let entries = |keys: &[&str]| -> serde_json::Map<String, serde_json::Value> {
            keys.iter().map(|k| ((*k).to_owned(), json!({"metas": [{"phx_ref": format!("r{k}")}]}))).collect()
        };
        json!([null, null, TOPIC, "presence_diff", {"joins": entries(joins), "leaves": entries(leaves)}]).to_string()
    }

    fn apply(list: &mut PresenceList, text: &str) -> Res<()> {
        let msg = parse(text)?.ok_or("expected a presence message")?;
        list.apply(&msg)
    }

    #[test]
    fn frames_parse_with_metas_counted_and_other_messages_left_alone() {
        let text =
            r#"[null,null,"room:bench","presence_diff",{"joins":{"u1":{"metas":[{"a":1},{"b":[2]}]}},"leaves":{}}]"#;
        assert_eq!(parse(text), Ok(Some(PresenceMsg::Diff { joins: vec![(Cow::Borrowed("u1"), 2)], leaves: vec![] })));
        assert_eq!(parse(r#"[null,"1","room:bench","phx_reply",{"status":"ok","response":{}}]"#), Ok(None));
        assert_eq!(parse(r#"[null,null,"room:other","presence_diff",{"x":1}]"#), Ok(None));
        assert!(parse(r#"[null,null,"room:bench","presence_diff",{"joins":{}}]"#).is_err());
        assert!(parse(r#"[null,null,"room:bench","presence_state",{"u1":{}}]"#).is_err());
        assert!(parse(r#"{"event":"presence_state"}"#).is_err());
        assert!(parse(r#"[null,null,"room:bench","new_msg",{},1]"#).is_err());
    }

    #[test]
    fn the_fast_reader_reads_what_the_serde_reader_reads_or_leaves_the_frame_to_it() {
        fn serde(text: &str) -> Option<PresenceMsg<'_>> {
            let mut de = serde_json::Deserializer::from_str(text);
            de.deserialize_seq(FrameVisitor).ok().flatten()
        }
        let frames = [
            state(&["u0", "u1", "u22"]),
            state(&[]),
            diff(&["u3", "u70"], &["u1"]),
            diff(&[], &[]),
            r#"[null,null,"room:bench","presence_diff",{"joins":{"u1":{"metas":[{"a":"x\\\"]}","b":[2,{"c":null}]},{}]}},"leaves":{}}]"#.to_owned(),
            r#"["1",null,"room:bench","presence_state",{"u5":{"metas":[]}}]"#.to_owned(),
            // Metas the quick skip must leave to bracket counting: a brace in a string, nesting.
            r#"[null,null,"room:bench","presence_state",{"u1":{"metas":[{"a":"}{","b":"]"},{"c":{"d":[1]}},{"e":"{"}]}}]"#.to_owned(),
        ];
        for text in &frames {
            let fast = fast::parse(text);
            assert!(fast.is_some(), "read fast: {text}");
            assert_eq!(fast, serde(text), "{text}");
        }
        for text in [
            r#"[null,null,"room:bench","presence_state",{"u\u0031":{"metas":[]}}]"#,
            r#"[null,null,"room:bench","presence_state",{"u1": {"metas":[]}}]"#,
            r#"[null,null,"room:bench","presence_diff",{"leaves":{},"joins":{}}]"#,
            r#"[null,null,"room:bench","presence_diff",{"joins":{}}]"#,
            r#"[null,null,"room:bench","presence_state",{"u1":{"metas":[{"a":1}]}}"#,
            r#"[null,null,"room:bench","presence_state",{"u1":{"metas":[{"a":1}]}},1]"#,
            r#"[null,null,"room:other","presence_state",{}]"#,
            r#"[null,"1","room:bench","phx_reply",{"status":"ok","response":{}}]"#,
        ] {
            assert_eq!(fast::parse(text), None, "left to serde: {text}");
        }
    }

    #[test]
    fn state_then_diffs_keep_the_list_as_phoenix_js_does() -> Res<()> {
        let mut list = PresenceList::new(100);
        apply(&mut list, &state(&["u0", "u1", "u2"]))?;
        assert_eq!(list.len(), 3);
        apply(&mut list, &diff(&["u3", "u70"], &["u1"]))?;
        assert_eq!(list.len(), 4);
        assert!(list.contains(70) && !list.contains(1));
        // A key joining twice is one key; joins apply before leaves within a diff.
        apply(&mut list, &diff(&["u3", "u5"], &["u5"]))?;
        assert_eq!(list.len(), 4);
        assert!(list.contains(3) && !list.contains(5));
        // A later state replaces the list.
        apply(&mut list, &state(&["u9"]))?;
        assert_eq!(list.len(), 1);
        assert!(list.contains(9) && !list.contains(70));
        Ok(())
    }

    #[test]
    fn diffs_before_the_first_state_wait_for_it() -> Res<()> {
        let mut list = PresenceList::new(10);
        apply(&mut list, &diff(&["u4"], &[]))?;
        apply(&mut list, &diff(&[], &["u0"]))?;
        assert_eq!(list.len(), 0);
        apply(&mut list, &state(&["u0", "u1"]))?;
        assert_eq!(list.len(), 2);
        assert!(list.contains(1) && list.contains(4) && !list.contains(0));
        Ok(())
    }

    #[test]
    fn keys_outside_the_run_are_errors() -> Res<()> {
        let mut list = PresenceList::new(10);
        assert!(apply(&mut list, &state(&["u10"])).is_err());
        assert!(apply(&mut list, &state(&["alice"])).is_err());
        assert!(apply(&mut list, &diff(&["u+1"], &[])).is_err());
        apply(&mut list, &state(&["u9"]))?;
        assert_eq!(list.len(), 1);
        Ok(())
    }
}
