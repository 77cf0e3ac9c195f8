//! Server-Sent Events down, POST up: a Phoenix Channels transport for Fawkes.
//!
//! [`SseService`] is a tower `Service` for `{path}/sse`. It only shapes event streams: sessions
//! between requests, `POST`s, tokens, forwarding between nodes, error answers and CORS are
//! `fawkes-http`'s, shared with long-poll. Its browser client is `clients/js/sse-transport.js`,
//! given to phoenix.js's `Socket` as its `transport`.
//!
//! ```no_run
//! use fawkes_channel::{Endpoint, Router};
//! use fawkes_transport_sse::SseService;
//!
//! let endpoint = Endpoint::new(Router::new());
//! let sse = SseService::new(endpoint);
//! // Mount `sse` at `/socket/sse` in any tower-compatible router, e.g.
//! // `axum::Router::new().route_service("/socket/sse", sse)`.
//! # drop(sse);
//! ```
//!
//! The protocol:
//! - `GET {path}/sse?vsn=2.0.0&params…` opens a session (the connect callback runs; HTTP `403` if
//!   it refuses or the origin check fails, `500` while shutting down; the body is long-poll's
//!   JSON answer) and answers a
//!   `text/event-stream`. The first event is `event: phx_session` whose data is the session's
//!   signed token. Then every outbound frame is one event, `id: N` and `data: <V2 JSON>`.
//!   A comment (`: keep-alive`) goes out after [`SseOptions::keep_alive`] of silence. When the
//!   socket closes (shutdown, heartbeat timeout, slow consumer, a malformed push), a last event
//!   `event: phx_socket_close` carries the reason and the stream ends. The connect callback's
//!   `auth_token` is the `auth_token` query parameter (EventSource cannot send headers).
//! - `GET …&token=T` with `Last-Event-ID: N` (or `&last_event_id=N`, for clients that cannot
//!   set headers) resumes the session: events after `N` still in the replay window
//!   ([`SseOptions::replay_window`] events, [`SseOptions::replay_window_bytes`] bytes) are sent
//!   again, then live ones. A newer `GET` of the
//!   same session ends the older stream. A token that is forged, expired, or whose events after
//!   `N` are no longer all in the window opens a fresh session instead (its `phx_session` token
//!   differs, so the client knows to rejoin): never `403` for a token.
//! - `POST {path}/sse?token=T` carries pushes as long-poll does: `application/x-ndjson`, one
//!   message per line (any number), or one message; lines that are not JSON are base64 binary
//!   pushes. It is answered as long-poll answers: HTTP `200` with the JSON envelope
//!   `{"status": N, "token": null, "messages": []}`, where `N` is `200` once all are handled,
//!   `410` for a forged or ended session, `400` (and the session ends) for a malformed message;
//!   a body over [`SseOptions::max_body_size`] gets HTTP `413` and `{"status": 413}`. A line the
//!   session already took (a `POST` retried after its answer was lost) is not handled twice.
//! - Across nodes (the endpoint's PubSub clustered, every node with the same
//!   [`SseOptions::secret`]): a `POST` reaches its session from any node, forwarded to the node
//!   that holds it, so the stream and the `POST`s need no sticky sessions. A stream itself cannot
//!   be forwarded: a `GET` with a token that reaches another node opens a new session there.
//! - A session with no stream attached for [`SseOptions::session_idle`] ends. A stream's reader
//!   that stops reading stops the session's outbound queue from draining, so the endpoint's
//!   `outbound_queue_limit` and `outbound_byte_limit` close it as a slow consumer. Such a stream
//!   is never polled again (the HTTP server polls a body only when it can write), so it cannot
//!   end by itself: its response carries a [`ConnectionCut`], cut when the stream's session ends
//!   or a newer stream replaces it, and a server that honours it closes the connection
//!   (`fawkes serve` does; through plain `axum::serve` the connection stays open until the peer's
//!   TCP connection fails). Until then a stalled reader holds at most its queue
//!   (`outbound_byte_limit`), the replay window ([`SseOptions::replay_window_bytes`]) and what
//!   the HTTP server buffered: a chunk of at most 32 KiB of events (or one larger event) and the
//!   server's write buffer (hyper's `max_buf_size`; `fawkes serve` sets 32 KiB).
//! - Binary payloads reach SSE clients as `{"binary": "<base64>"}`, as over long-poll.
//! - Every answer carries `access-control-allow-origin: *`; `OPTIONS` preflights are answered.

mod service;

use std::time::Duration;

pub use fawkes_http::ConnectionCut;
pub use service::{SseBody, SseService};

/// SSE settings.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SseOptions {
    /// A session with no stream attached for this long ends, and its channels leave.
    pub session_idle: Duration,
    /// How long a stream stays silent before a `: keep-alive` comment (proxies close silent streams).
    pub keep_alive: Duration,
    /// Events a session keeps to resend after a reconnect with `Last-Event-ID`.
    pub replay_window: usize,
    /// Bytes of those events (counted as the messages' length) a session keeps at most: the
    /// window holds what was already sent, outside the endpoint's `outbound_byte_limit`, so a
    /// stalled reader's session holds at most this much besides its queue.
    pub replay_window_bytes: usize,
    /// Largest `POST` body, in bytes.
    pub max_body_size: usize,
    /// The key tokens are signed with (by default a random one per process).
    pub secret: Option<Vec<u8>>,
}

impl Default for SseOptions {
    fn default() -> SseOptions {
        SseOptions {
            session_idle: Duration::from_secs(20),
            keep_alive: Duration::from_secs(15),
            replay_window: 256,
            replay_window_bytes: 64 * 1024,
            max_body_size: 8 * 1024 * 1024,
            secret: None,
        }
    }
}

/// Builder-style setters, `SseOptions::default().replay_window(16)`.
macro_rules! setters {
    ($($field:ident: $ty:ty),*) => {$(
        #[doc = concat!("Sets [`SseOptions::", stringify!($field), "`].")]
        pub fn $field(mut self, $field: $ty) -> Self {
            self.$field = $field;
            self
        }
    )*};
}

impl SseOptions {
    setters!(
        session_idle: Duration,
        keep_alive: Duration,
        replay_window: usize,
        replay_window_bytes: usize,
        max_body_size: usize
    );

    /// Sets [`SseOptions::secret`].
    pub fn secret(mut self, secret: impl Into<Vec<u8>>) -> Self {
        self.secret = Some(secret.into());
        self
    }

    fn session_options(&self) -> fawkes_http::SessionOptions {
        let shared = fawkes_http::SessionOptions::default().session_idle(self.session_idle);
        let shared = shared.max_body_size(self.max_body_size);
        match &self.secret {
            Some(secret) => shared.secret(secret.clone()),
            None => shared,
        }
    }
}
