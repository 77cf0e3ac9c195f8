//! Phoenix's HTTP long-poll transport for Fawkes channels.
//!
//! [`LongPollService`] is a tower `Service` for `{path}/longpoll`: the phoenix client's `LongPoll`
//! transport, and its fallback from WebSocket (`longPollFallbackMs`), work against it unchanged.
//! Each long-poll session drives the same [`Session`](fawkes_channel::Session) a WebSocket does.
//! This crate only shapes polls into Phoenix's JSON envelope: sessions between requests, `POST`s,
//! tokens, forwarding between nodes, error answers and CORS are `fawkes-http`'s, shared with SSE.
//!
//! ```no_run
//! use fawkes_channel::{Endpoint, Router};
//! use fawkes_transport_longpoll::LongPollService;
//!
//! let endpoint = Endpoint::new(Router::new());
//! let app: axum::Router = axum::Router::new()
//!     .route_service("/socket/longpoll", LongPollService::new(endpoint));
//! ```
//!
//! The protocol, as the client sees it (every answer is HTTP 200 with a JSON envelope
//! `{"status", "token", "messages"}`, except where noted):
//! - `GET` without a token opens a session (the connect callback runs; `403` if it refuses or the
//!   origin check fails; `500` while shutting down) and answers `410` with the session's token.
//!   The bearer token is the `X-Phoenix-AuthToken` header (or an `auth_token` param).
//! - `GET` with a token waits up to [`LongPollOptions::poll_window`] for messages: `200` with the
//!   queued messages (up to 1,024 and 64 KiB of them, or one larger message; the client polls
//!   again at once for the rest), or `204`. A newer `GET` for the same session releases the older one with
//!   `204`; nothing is taken from the queue unless it is answered.
//! - A token that is forged, altered, or names a session that ended or expired is answered `410`
//!   (the client reconnects and rejoins); `GET` also opens a fresh session. Never `403`.
//! - `POST` with `Content-Type: application/x-ndjson` carries one message per line (all lines are
//!   taken, however many); any other type carries one message. Lines that are not JSON are base64
//!   binary pushes. Answer `200` once all are handled; `400` (and the session ends) for a malformed
//!   message; HTTP `413` for a body over [`LongPollOptions::max_body_size`]. A line the session
//!   already took (a POST retried after its answer was lost) is not handled twice: every Phoenix
//!   push carries a fresh ref, so an identical line can only be a retry.
//! - Sessions end [`LongPollOptions::session_idle`] after their last `GET`; their channels leave.
//! - Binary payloads sent to a long-poll client arrive as `{"binary": "<base64>"}` (the client
//!   cannot decode binary frames from long-poll strings).
//! - Every answer carries `access-control-allow-origin: *`; `OPTIONS` preflights are answered.
//! - Across nodes: a token names the node that holds its session. When the endpoint's PubSub has
//!   an adapter, a request that reaches another node is forwarded to the owner and answered with
//!   the owner's answer, so a load balancer needs no sticky sessions. Nodes must share
//!   [`LongPollOptions::secret`]. If the owner is gone, the token is answered as an ended
//!   session's (`410`, and `GET` opens a new session on the node it reached).
#![forbid(unsafe_code)]

mod service;

pub use service::{LongPollOptions, LongPollService};
