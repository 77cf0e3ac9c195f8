//! Forwarding a request to the node that owns its session, through the PubSub's node-to-node
//! requests ([`PubSub::request`](fawkes_channel::PubSub::request) and `serve`).
//!
//! A forwarded request is `kind (1 read, 2 ndjson POST, 3 single-message POST) | token length
//! (u16) | token | body`; its answer is `HTTP status (u16; 0: no such session here) | body`.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;

use crate::ingest::BodyKind;
use crate::{Answer, HttpError, HttpTransport, Lookup, Remote, Sessions};

/// How long the owner may take on top of what the request itself waits.
const MARGIN: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Read,
    Post(BodyKind),
}

fn service_name(transport: &str, instance: u32) -> String {
    format!("fawkes.{transport}.{instance:08x}")
}

fn encode_request(kind: Kind, token: &str, body: &[u8]) -> Option<Bytes> {
    let len = u16::try_from(token.len()).ok()?;
    let mut out = Vec::with_capacity(3 + token.len() + body.len());
    out.push(match kind {
        Kind::Read => 1,
        Kind::Post(BodyKind::Ndjson) => 2,
        Kind::Post(BodyKind::Single) => 3,
    });
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(token.as_bytes());
    out.extend_from_slice(body);
    Some(out.into())
}

fn decode_request(raw: &Bytes) -> Option<(Kind, String, Bytes)> {
    let kind = match raw.first()? {
        1 => Kind::Read,
        2 => Kind::Post(BodyKind::Ndjson),
        3 => Kind::Post(BodyKind::Single),
        _ => return None,
    };
    let len = u16::from_be_bytes(raw.get(1..3)?.try_into().ok()?) as usize;
    let token = std::str::from_utf8(raw.get(3..3 + len)?).ok()?.to_owned();
    Some((kind, token, raw.slice(3 + len..)))
}

fn encode_answer(answer: Option<&Answer>) -> Bytes {
    let mut out = Vec::with_capacity(2 + answer.map_or(0, |a| a.body.len()));
    out.extend_from_slice(&answer.map_or(0, |a| a.status.as_u16()).to_be_bytes());
    if let Some(a) = answer {
        out.extend_from_slice(&a.body);
    }
    out.into()
}

fn decode_answer(raw: &Bytes) -> Option<Answer> {
    let status = StatusCode::from_u16(u16::from_be_bytes(raw.get(..2)?.try_into().ok()?)).ok()?;
    Some(Answer::json(status, raw.slice(2..)))
}

/// Registers `sessions` to answer the requests other nodes forward to them (when clustered).
pub(crate) fn serve<T: HttpTransport>(sessions: &Sessions<T>) {
    let pubsub = sessions.endpoint().pubsub().clone();
    if !pubsub.is_clustered() {
        return;
    }
    let weak = Arc::downgrade(&sessions.0);
    let guard = pubsub.serve(&service_name(T::NAME, sessions.0.instance), move |from, request| {
        let sessions = Sessions::from_weak(&weak);
        async move {
            let answer = match sessions {
                Some(sessions) => forwarded(&sessions, from, request).await,
                None => None,
            };
            encode_answer(answer.as_ref())
        }
    });
    let _ = sessions.0.service.set(guard);
}

/// Answers a request another node forwarded here; `None` when its session is not here.
async fn forwarded<T: HttpTransport>(
    sessions: &Sessions<T>,
    from: fawkes_channel::NodeId,
    request: Bytes,
) -> Option<Answer> {
    let Some((kind, token, body)) = decode_request(&request) else {
        tracing::warn!(%from, "unreadable forwarded request");
        return None;
    };
    let Lookup::Here(session) = sessions.lookup(Some(&token)) else { return None };
    match kind {
        Kind::Read => sessions.transport().forwarded_read(sessions, session).await,
        Kind::Post(body_kind) => Some(sessions.post_here(&session, body_kind, body).await),
    }
}

impl<T: HttpTransport> Sessions<T> {
    /// Sends a request to the node that owns its session and returns that node's answer; `None`
    /// when the session is gone there or the node did not answer (it may be dead).
    async fn forward(&self, remote: &Remote, kind: Kind, body: &[u8], waits: Duration) -> Option<Answer> {
        let request = encode_request(kind, &remote.token, body)?;
        let name = service_name(T::NAME, remote.instance);
        let node = remote.node;
        match self.endpoint().pubsub().request(node, &name, request, waits + MARGIN).await {
            Ok(raw) => {
                let answer = decode_answer(&raw);
                if answer.is_none() {
                    tracing::debug!(%node, "session not found on its node");
                }
                answer
            }
            Err(e) => {
                tracing::info!(%node, error = %e, "request could not be forwarded; the session is gone");
                None
            }
        }
    }

    /// Forwards a read (a `GET` with a token) to the node that owns the session, which answers it
    /// with [`HttpTransport::forwarded_read`]; it may wait there for `waits`. `None` when the
    /// session is gone.
    pub async fn forward_read(&self, remote: &Remote, waits: Duration) -> Option<Answer> {
        self.forward(remote, Kind::Read, &[], waits).await
    }

    /// Forwards a `POST` body to the node that owns the session.
    pub(crate) async fn forward_post(&self, remote: &Remote, kind: BodyKind, body: &[u8]) -> Answer {
        let answer = self.forward(remote, Kind::Post(kind), body, Duration::ZERO).await;
        answer.unwrap_or_else(|| HttpError::SessionGone.answer())
    }

    /// Hands a `POST` body to a session on this node and answers it.
    pub(crate) async fn post_here(
        &self,
        session: &crate::DetachedSession<T::State>,
        kind: BodyKind,
        body: Bytes,
    ) -> Answer {
        match session.ingest(kind, body).await {
            Ok(()) => Answer::envelope(200, None, &[]),
            Err(e) => {
                self.end(session);
                e.answer()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_answers_survive_the_codec_and_garbage_is_refused() {
        let raw = encode_request(Kind::Post(BodyKind::Ndjson), "tok.en", b"[1]\n[2]").expect("short token");
        assert_eq!(
            decode_request(&raw),
            Some((Kind::Post(BodyKind::Ndjson), "tok.en".into(), Bytes::from_static(b"[1]\n[2]")))
        );
        for garbage in [&b""[..], &[9, 0, 0], &[1, 0, 9, b'x']] {
            assert_eq!(decode_request(&Bytes::copy_from_slice(garbage)), None, "{garbage:?}");
        }
        let answer = Answer::envelope(204, Some("t"), &[]);
        assert_eq!(decode_answer(&encode_answer(Some(&answer))), Some(answer));
        assert_eq!(decode_answer(&encode_answer(None)), None, "no such session");
        assert_eq!(encode_request(Kind::Read, &"x".repeat(70_000), b""), None);
    }
}
