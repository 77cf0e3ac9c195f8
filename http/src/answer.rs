//! Every answer that is not an event stream, and the one mapping from errors to HTTP answers.

use std::convert::Infallible;

use bytes::Bytes;
use fawkes_channel::{CloseReason, ConnectError};
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full, combinators::UnsyncBoxBody};

/// The body of every response of the HTTP transports: a short JSON answer or an event stream.
pub type HttpBody = UnsyncBoxBody<Bytes, Infallible>;

/// Errors of the HTTP session layer, the peer's as much as the server's. Each maps to one status
/// ([`HttpError::status`]) and one answer ([`HttpError::answer`]), so every transport built on
/// this crate answers the same error the same way.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HttpError {
    /// The token is missing, forged, altered, signed with another secret, or names a session that
    /// ended. Not the client's fault: it reconnects (`410`, never `403`).
    #[error("the session is gone")]
    SessionGone,
    /// The endpoint refused the connect (callback, origin, vsn, per-IP limit): `403`.
    #[error(transparent)]
    Refused(ConnectError),
    /// The peer's address opened sessions faster than the endpoint's connect rate: HTTP `429`
    /// with `Retry-After`, and `500` in the envelope (phoenix.js's LongPoll retries on it, with
    /// backoff).
    #[error("too many connects; retry after {retry_after:?}")]
    RateLimited {
        /// When the next connect would be allowed.
        retry_after: std::time::Duration,
    },
    /// The endpoint is shutting down: `500`, the status phoenix.js's LongPoll retries on (it throws
    /// on statuses it does not know, such as `503`).
    #[error("the endpoint is shutting down")]
    ShuttingDown,
    /// A `POST` body over the limit: HTTP `413`.
    #[error("body over {limit} bytes")]
    BodyTooLarge {
        /// The limit, in bytes.
        limit: usize,
    },
    /// The body could not be read: `400`.
    #[error("unreadable body: {0}")]
    UnreadableBody(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A message closed the session (malformed, too large): `400`, and the session has ended.
    #[error("the session closed: {0}")]
    Closed(CloseReason),
    /// Not `GET`, `POST` or `OPTIONS`: HTTP `405`.
    #[error("method not allowed")]
    MethodNotAllowed,
}

impl From<ConnectError> for HttpError {
    fn from(e: ConnectError) -> HttpError {
        match e {
            ConnectError::ShuttingDown => HttpError::ShuttingDown,
            ConnectError::RateLimited { retry_after, .. } => HttpError::RateLimited { retry_after },
            e => HttpError::Refused(e),
        }
    }
}

impl HttpError {
    /// The status the client acts on (in the JSON envelope, or as the HTTP status).
    pub fn status(&self) -> StatusCode {
        match self {
            HttpError::SessionGone => StatusCode::GONE,
            HttpError::Refused(_) => StatusCode::FORBIDDEN,
            HttpError::ShuttingDown => StatusCode::INTERNAL_SERVER_ERROR,
            HttpError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            HttpError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            HttpError::UnreadableBody(_) | HttpError::Closed(_) => StatusCode::BAD_REQUEST,
            HttpError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
        }
    }

    /// The answer: HTTP `200` with the status in the JSON envelope (as phoenix.js's LongPoll
    /// reads it), except a body over the limit (HTTP `413`, `{"status":413}`) and a wrong method
    /// (HTTP `405`, with `allow`), which no Phoenix client sends.
    pub fn answer(&self) -> Answer {
        match self {
            HttpError::BodyTooLarge { .. } => Answer::json(StatusCode::PAYLOAD_TOO_LARGE, r#"{"status":413}"#),
            HttpError::MethodNotAllowed => Answer::json(StatusCode::METHOD_NOT_ALLOWED, r#"{"status":405}"#),
            HttpError::RateLimited { retry_after } => {
                let envelope = Answer::envelope(500, None, &[]);
                let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
                Answer::json(StatusCode::TOO_MANY_REQUESTS, envelope.body).retry_after(secs)
            }
            e => Answer::envelope(e.status().as_u16(), None, &[]),
        }
    }
}

/// A JSON answer before it becomes a response: an HTTP status and a body. It is what a request
/// forwarded to another node gets back, so it is plain data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The HTTP status.
    pub status: StatusCode,
    /// The JSON body.
    pub body: Bytes,
    /// Seconds for `Retry-After` (a `429`).
    pub retry_after: Option<u64>,
}

impl Answer {
    /// A JSON answer with `status` as its HTTP status.
    pub fn json(status: StatusCode, body: impl Into<Bytes>) -> Answer {
        Answer { status, body: body.into(), retry_after: None }
    }

    /// The same answer with `Retry-After: secs`.
    pub fn retry_after(mut self, secs: u64) -> Answer {
        self.retry_after = Some(secs);
        self
    }

    /// Phoenix's long-poll envelope, HTTP `200`: `{"status": N, "token": T, "messages": [...]}`,
    /// each message (an encoded text frame) as a JSON string.
    pub fn envelope(status: u16, token: Option<&str>, messages: &[&[u8]]) -> Answer {
        let mut out = Vec::with_capacity(48 + messages.iter().map(|m| m.len() + 8).sum::<usize>());
        out.extend_from_slice(format!(r#"{{"status":{status},"token":"#).as_bytes());
        // Writing to a Vec cannot fail.
        let _ = serde_json::to_writer(&mut out, &token);
        out.extend_from_slice(br#","messages":["#);
        for (i, m) in messages.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            let _ = serde_json::to_writer(&mut out, &String::from_utf8_lossy(m));
        }
        out.extend_from_slice(b"]}");
        Answer::json(StatusCode::OK, out)
    }

    /// The same answer with the envelope's status as the HTTP status too, for clients that see
    /// only that (an `EventSource` cannot read the body of a refused stream).
    pub fn in_http_status(mut self) -> Answer {
        if self.status != StatusCode::OK {
            return self;
        }
        let inner = serde_json::from_slice::<serde_json::Value>(&self.body).ok().and_then(|v| v["status"].as_u64());
        if let Some(status) = inner.and_then(|s| u16::try_from(s).ok()).and_then(|s| StatusCode::from_u16(s).ok()) {
            self.status = status;
        }
        self
    }

    /// The HTTP response.
    pub fn into_response(self) -> Response<HttpBody> {
        let mut res = Response::new(Full::new(self.body).boxed_unsync());
        *res.status_mut() = self.status;
        res.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(secs) = self.retry_after {
            res.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.status == StatusCode::METHOD_NOT_ALLOWED {
            res.headers_mut().insert(header::ALLOW, HeaderValue::from_static("GET, POST, OPTIONS"));
        }
        res
    }
}
