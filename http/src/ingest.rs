//! `POST` ingest: the body, its lines, retry dedupe, and handing them to the session.

use std::collections::VecDeque;
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher as _;

use base64::Engine as _;
use bytes::Bytes;
use fawkes_channel::Frame;
use http_body::Body;
use http_body_util::{BodyExt as _, LengthLimitError, Limited};

use crate::answer::HttpError;

/// Lines a session remembers, to drop a retried POST's lines that were already taken.
const RECENT_LINES: usize = 512;

/// Hashes of the lines a session took most recently. Every Phoenix push carries a fresh ref, so
/// a line seen again is a retry of a POST whose answer was lost, never a new message.
pub(crate) struct RecentLines {
    hashes: VecDeque<u64>,
    keys: RandomState,
}

impl RecentLines {
    pub(crate) fn new() -> RecentLines {
        RecentLines { hashes: VecDeque::new(), keys: RandomState::new() }
    }

    /// True (and remembered) for a line not seen recently.
    pub(crate) fn first_time(&mut self, line: &[u8]) -> bool {
        let hash = self.keys.hash_one(line);
        if self.hashes.contains(&hash) {
            return false;
        }
        if self.hashes.len() == RECENT_LINES {
            self.hashes.pop_front();
        }
        self.hashes.push_back(hash);
        true
    }
}

/// How a `POST` body carries messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyKind {
    /// `application/x-ndjson`: one message per line, any number of lines.
    Ndjson,
    /// Anything else (`application/json`): the body is one message.
    Single,
}

impl BodyKind {
    pub(crate) fn of(headers: &http::HeaderMap) -> BodyKind {
        let ct = headers.get(http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok());
        if ct.is_some_and(|ct| ct.starts_with("application/x-ndjson")) { BodyKind::Ndjson } else { BodyKind::Single }
    }
}

/// Reads a body of at most `limit` bytes.
pub(crate) async fn read_body<B>(body: B, limit: usize) -> Result<Bytes, HttpError>
where
    B: Body<Data = Bytes, Error: Into<Box<dyn std::error::Error + Send + Sync>>>,
{
    match Limited::new(body, limit).collect().await {
        Ok(body) => Ok(body.to_bytes()),
        Err(e) if e.is::<LengthLimitError>() => {
            tracing::info!(limit, "POST body too large");
            Err(HttpError::BodyTooLarge { limit })
        }
        Err(e) => Err(HttpError::UnreadableBody(e)),
    }
}

/// The messages of a body: its non-empty lines (ndjson), or the whole body.
pub(crate) fn lines(kind: BodyKind, body: &Bytes) -> Vec<Bytes> {
    match kind {
        BodyKind::Single => vec![body.clone()],
        BodyKind::Ndjson => body
            .split(|&b| b == b'\n')
            .map(|line| line.strip_suffix(b"\r").unwrap_or(line))
            .filter(|line| !line.is_empty())
            .map(|line| body.slice_ref(line))
            .collect(),
    }
}

/// A JSON line is a text message; anything else is a base64 binary push.
pub(crate) fn line_frame(line: Bytes) -> Frame {
    match line.first() {
        Some(b'[' | b'{') | None => Frame::Text(line),
        Some(_) => match base64::engine::general_purpose::STANDARD.decode(&line) {
            Ok(bytes) => Frame::Binary(bytes.into()),
            Err(_) => Frame::Text(line),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_is_taken_once_among_the_recent_ones() {
        let mut recent = RecentLines::new();
        assert!(recent.first_time(b"a"));
        assert!(!recent.first_time(b"a"));
        for n in 0..RECENT_LINES {
            assert!(recent.first_time(n.to_string().as_bytes()));
        }
        assert!(recent.first_time(b"a"), "forgotten after {RECENT_LINES} newer lines");
    }

    #[test]
    fn ndjson_lines_json_text_and_base64_binary() {
        let body = Bytes::from_static(b"[1]\r\n\nAQID/w==\n{\"a\":1}");
        let frames: Vec<Frame> = lines(BodyKind::Ndjson, &body).into_iter().map(line_frame).collect();
        assert_eq!(
            frames,
            [Frame::text("[1]"), Frame::Binary(Bytes::from_static(&[1, 2, 3, 255])), Frame::text("{\"a\":1}")]
        );
        assert_eq!(lines(BodyKind::Single, &body), std::slice::from_ref(&body));
        assert_eq!(line_frame(Bytes::from_static(b"not base64!")), Frame::text("not base64!"));
    }
}
