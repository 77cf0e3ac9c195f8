//! Sessions between HTTP requests, shared by the request/response transports (long-poll, SSE).
//!
//! The peer of an HTTP transport is not one connection but a series of requests. This crate
//! keeps each client's [`Session`](fawkes_channel::Session) between them and owns everything
//! such transports have in common, so a transport only turns frames into its response shape
//! (long-poll: a JSON envelope per poll; SSE: an event stream):
//!
//! - **Addressing**: a session is named by a token signed with [`SessionSigner`] (HMAC-SHA256)
//!   that carries the node, the service instance and 128 random bits. A forged, altered or
//!   expired token means "session gone" (`410`), never a refusal.
//! - **The registry and the reaper**: [`Sessions`], sharded; a session no request reads for
//!   [`SessionOptions::session_idle`], or whose socket closed, ends and its channels leave.
//! - **One pending read**: [`DetachedSession::read`] releases the read in flight (a newer poll
//!   answers the older one `204`; a newer stream ends the older one). Nothing is taken from the
//!   outbound queue unless it is answered.
//! - **Forwarding**: when the endpoint's PubSub is clustered, a request whose token names a
//!   session on another node goes to that node ([`PubSub::request`](fawkes_channel::PubSub::request))
//!   and is answered with the owner's answer, so no sticky sessions are needed. `POST`s are
//!   always forwarded; reads when the transport can answer them in one piece
//!   ([`HttpTransport::forwarded_read`]). Nodes share [`SessionOptions::secret`].
//! - **`POST` ingest**, the same for every transport: `application/x-ndjson` (one message per
//!   line, any number of lines; a line that is not JSON is a base64 binary push) or one message;
//!   HTTP `413` over [`SessionOptions::max_body_size`]; a line the session took recently is not
//!   handled again (every Phoenix push carries a fresh ref, so an identical line is a retried
//!   `POST` whose answer was lost).
//! - **[`ConnectInfo`](fawkes_channel::ConnectInfo) from a request** ([`connect_info`]): the
//!   connect params, the auth token (`X-Phoenix-AuthToken`, or `auth_token` for clients that
//!   cannot send headers), the headers and the [`PeerAddr`](fawkes_channel::PeerAddr).
//! - **One mapping from errors to answers** ([`HttpError`]), so every transport answers alike:
//!
//!   | error | status |
//!   | --- | --- |
//!   | forged token, ended or expired session | `410` |
//!   | refused connect (callback, origin, vsn, per-IP limit) | `403` |
//!   | endpoint shutting down | `500` (phoenix.js's LongPoll retries on it) |
//!   | connects from one address over the endpoint's `connect_rate` | HTTP `429` with `Retry-After`, `500` in the envelope |
//!   | a message that closes the session (malformed, too large) | `400`, the session ends |
//!   | body over the limit | HTTP `413` |
//!   | another method than `GET`, `POST`, `OPTIONS` | HTTP `405` |
//!
//!   The status travels in Phoenix's envelope `{"status", "token", "messages"}` with HTTP `200`;
//!   a transport whose client sees only the HTTP status (an `EventSource`) uses
//!   [`Answer::in_http_status`].
//! - **CORS** with tower-http's `CorsLayer`: every answer allows any origin (the endpoint checks
//!   `Origin` at connect), a preflight echoes the requested headers, allows `get, post, options`
//!   and is cached for an hour.
//! - **Cutting a stream nobody reads**: a streamed response is polled only while its connection
//!   can write, so a stream whose peer stopped reading never sees its session end. The
//!   transport attaches a [`ConnectionCut`] to the response, cut when the read ends
//!   ([`Read::cut_when_ended`]); a server that honours it (`fawkes serve` does) closes the
//!   connection.
//! - **The tower glue**: [`HttpService`] dispatches by method: `GET` to the transport, `POST`
//!   to the session, `OPTIONS` to CORS.
//!
//! # Example
//!
//! A complete transport: a `GET` without a token opens a session (`410` and its token, as
//! Phoenix's long-poll answers); with one, it answers what is queued (`200`) or nothing within a
//! second (`204`). `POST`s, tokens, CORS and the rest come with [`HttpService`].
//!
//! ```
//! use std::time::Duration;
//!
//! use bytes::Bytes;
//! use fawkes_channel::Config;
//! use fawkes_http::{Answer, HttpBody, HttpService, HttpTransport, Lookup, ReadEvent, SessionOptions, Sessions};
//! use http::{Request, Response, request::Parts};
//! use http_body_util::{BodyExt as _, Full};
//! use serde_json::{Value, json};
//!
//! struct Polls;
//!
//! impl HttpTransport for Polls {
//!     type State = ();
//!     const NAME: &'static str = "polls";
//!
//!     fn new_state(&self) {}
//!
//!     async fn get(&self, sessions: &Sessions<Self>, mut parts: Parts) -> Response<HttpBody> {
//!         let token = fawkes_http::query_param(parts.uri.query(), "token");
//!         let session = match sessions.lookup(token.as_deref()) {
//!             Lookup::Here(session) => session,
//!             // A session on another node, or none: this toy opens a new one.
//!             Lookup::Elsewhere(_) | Lookup::Gone => match sessions.open(&mut parts).await {
//!                 Ok(session) => return Answer::envelope(410, Some(session.token()), &[]).into_response(),
//!                 Err(e) => return e.answer().into_response(),
//!             },
//!         };
//!         let mut read = session.read();
//!         let mut frames = Vec::new();
//!         let answer = match read.next(&mut frames, 100, usize::MAX, Duration::from_secs(1)).await {
//!             ReadEvent::Frames => {
//!                 let messages: Vec<&[u8]> = frames.iter().map(|f| f.as_bytes().as_ref()).collect();
//!                 Answer::envelope(200, Some(session.token()), &messages)
//!             }
//!             ReadEvent::Closed(_) => {
//!                 sessions.end(&session);
//!                 Answer::envelope(410, None, &[])
//!             }
//!             ReadEvent::Idle | ReadEvent::Released => Answer::envelope(204, Some(session.token()), &[]),
//!         };
//!         answer.into_response()
//!     }
//! }
//!
//! async fn call(service: &HttpService<Polls>, req: Request<Full<Bytes>>) -> Value {
//!     let body = service.handle(req).await.into_body().collect().await.map(|b| b.to_bytes());
//!     serde_json::from_slice(&body.unwrap_or_default()).unwrap_or_default()
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), http::Error> {
//! // An endpoint with `test:*` channels; mount `service` at `/socket/polls` in any tower router.
//! let endpoint = fawkes_testkit::endpoint(Config::default());
//! let service = HttpService::new(Polls, endpoint, SessionOptions::default());
//!
//! let opened = call(&service, Request::get("/socket/polls?vsn=2.0.0").body(Full::default())?).await;
//! assert_eq!(opened["status"], 410);
//! let token = opened["token"].as_str().unwrap_or_default();
//!
//! let join = Full::from(r#"["1","1","test:lobby","phx_join",{}]"#);
//! let post = Request::post(format!("/socket/polls?token={token}")).header("content-type", "application/x-ndjson");
//! assert_eq!(call(&service, post.body(join)?).await["status"], 200);
//!
//! let polled = call(&service, Request::get(format!("/socket/polls?token={token}")).body(Full::default())?).await;
//! let reply: Value = serde_json::from_str(polled["messages"][0].as_str().unwrap_or_default()).unwrap_or_default();
//! assert_eq!(reply[4]["status"], json!("ok"), "the join reply");
//!
//! let forged = Request::post("/socket/polls?token=forged").body(Full::from("[]"))?;
//! assert_eq!(call(&service, forged).await["status"], 410);
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]

mod answer;
mod cut;
mod forward;
mod ingest;
mod service;
mod sessions;
mod token;

pub use answer::{Answer, HttpBody, HttpError};
pub use cut::ConnectionCut;
pub use service::HttpService;
pub use sessions::{
    CutWatch, DetachedSession, HttpTransport, Lookup, Read, ReadEvent, Remote, SessionOptions, Sessions, connect_info,
    query_param,
};
pub use token::{MAX_TOKEN_PAYLOAD, SessionSigner, random_session_id};
