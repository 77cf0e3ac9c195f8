//! Phoenix's long-poll response shapes on the session layer of `fawkes-http`.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use fawkes_channel::Endpoint;
use fawkes_http::{
    Answer, DetachedSession, HttpBody, HttpService, HttpTransport, Lookup, ReadEvent, SessionOptions, Sessions,
};
use http::request::Parts;
use http::{Request, Response};
use http_body::Body;

/// Messages answered by one poll at most; the rest wait for the next poll.
const MAX_MESSAGES_PER_POLL: usize = 1024;
/// Bytes of messages answered by one poll at most (a larger message goes alone); the rest wait
/// for the next poll. An answer its client never reads stays in the HTTP server's buffer until
/// the connection closes, besides the session's queue: small, so that a stalled client holds
/// little more than `outbound_byte_limit`.
const MAX_BYTES_PER_POLL: usize = 64 * 1024;

/// Long-poll settings.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct LongPollOptions {
    /// How long a `GET` waits for messages before answering `204` (Phoenix: 10 s; phoenix.js gives
    /// up on a poll after 20 s).
    pub poll_window: Duration,
    /// A session with no `GET` for this long ends, and its channels leave.
    pub session_idle: Duration,
    /// Largest `POST` body, in bytes.
    pub max_body_size: usize,
    /// The key tokens are signed with. Nodes of one cluster must share it, so any node can read a
    /// token and forward the request to the session's node; by default each process makes a
    /// random one (a restarted server then answers old tokens `410`, and clients reconnect).
    pub secret: Option<Vec<u8>>,
}

impl Default for LongPollOptions {
    fn default() -> LongPollOptions {
        let shared = SessionOptions::default();
        LongPollOptions {
            poll_window: Duration::from_secs(10),
            session_idle: shared.session_idle,
            max_body_size: shared.max_body_size,
            secret: None,
        }
    }
}

impl LongPollOptions {
    /// Sets [`LongPollOptions::poll_window`].
    pub fn poll_window(mut self, d: Duration) -> Self {
        self.poll_window = d;
        self
    }
    /// Sets [`LongPollOptions::session_idle`].
    pub fn session_idle(mut self, d: Duration) -> Self {
        self.session_idle = d;
        self
    }
    /// Sets [`LongPollOptions::max_body_size`].
    pub fn max_body_size(mut self, bytes: usize) -> Self {
        self.max_body_size = bytes;
        self
    }
    /// Sets [`LongPollOptions::secret`].
    pub fn secret(mut self, secret: impl Into<Vec<u8>>) -> Self {
        self.secret = Some(secret.into());
        self
    }
}

/// The long-poll shapes: a `GET` is one poll, answered with one JSON envelope.
struct LongPoll {
    poll_window: Duration,
}

impl HttpTransport for LongPoll {
    type State = ();
    const NAME: &'static str = "longpoll";

    fn new_state(&self) {}

    async fn get(&self, sessions: &Sessions<Self>, mut parts: Parts) -> Response<HttpBody> {
        let token = fawkes_http::query_param(parts.uri.query(), "token");
        let answer = match sessions.lookup(token.as_deref()) {
            Lookup::Here(session) => Some(self.poll(sessions, session).await),
            Lookup::Elsewhere(remote) => sessions.forward_read(&remote, self.poll_window).await,
            Lookup::Gone => None,
        };
        let answer = match answer {
            Some(answer) => answer,
            None => {
                if token.is_some() {
                    tracing::debug!("long-poll GET with an unknown or invalid token: opening a new session");
                }
                // A new session's token comes with status 410, as Phoenix answers.
                match sessions.open(&mut parts).await {
                    Ok(session) => Answer::envelope(410, Some(session.token()), &[]),
                    Err(e) => e.answer(),
                }
            }
        };
        answer.into_response()
    }

    async fn forwarded_read(&self, sessions: &Sessions<Self>, session: DetachedSession<()>) -> Option<Answer> {
        Some(self.poll(sessions, session).await)
    }
}

impl LongPoll {
    /// One poll: the queued messages, up to 1,024 and 64 KiB of them (`200`), or none within the
    /// poll window (`204`). A newer poll of the same session releases this one with `204`.
    async fn poll(&self, sessions: &Sessions<Self>, session: DetachedSession<()>) -> Answer {
        let token = Some(session.token());
        let mut read = session.read();
        // Polling is this client's heartbeat: phoenix.js sends none over long-poll.
        read.keep_alive();
        let mut frames = Vec::new();
        match read.next(&mut frames, MAX_MESSAGES_PER_POLL, MAX_BYTES_PER_POLL, self.poll_window).await {
            ReadEvent::Frames => {
                let messages: Vec<&[u8]> = frames.iter().map(|f| f.as_bytes().as_ref()).collect();
                Answer::envelope(200, token, &messages)
            }
            ReadEvent::Idle | ReadEvent::Released => Answer::envelope(204, token, &[]),
            ReadEvent::Closed(reason) => {
                tracing::debug!(%reason, "long-poll session closed");
                sessions.end(&session);
                Answer::envelope(410, token, &[])
            }
        }
    }
}

/// Phoenix long-poll for an [`Endpoint`]. Mount it at `{path}/longpoll`. Cheap to clone; clones
/// share sessions.
///
/// When the endpoint's [`PubSub`](fawkes_channel::PubSub) is clustered, a request whose token
/// names a session on another node is forwarded to that node through the PubSub and answered
/// with what the owner answers, so consecutive requests of one client may reach any node (no
/// sticky sessions). Every node must then share [`LongPollOptions::secret`].
#[derive(Clone)]
pub struct LongPollService(HttpService<LongPoll>);

impl fmt::Debug for LongPollService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LongPollService").field("sessions", &self.sessions()).finish_non_exhaustive()
    }
}

impl LongPollService {
    /// A service for `endpoint` with default options.
    pub fn new(endpoint: Endpoint) -> LongPollService {
        LongPollService::with_options(endpoint, LongPollOptions::default())
    }

    /// A service for `endpoint` with `options`.
    pub fn with_options(endpoint: Endpoint, options: LongPollOptions) -> LongPollService {
        let mut shared =
            SessionOptions::default().session_idle(options.session_idle).max_body_size(options.max_body_size);
        shared.secret = options.secret;
        LongPollService(HttpService::new(LongPoll { poll_window: options.poll_window }, endpoint, shared))
    }

    /// Number of live long-poll sessions on this node.
    pub fn sessions(&self) -> usize {
        self.0.sessions().len()
    }

    /// Handles one request.
    pub async fn handle<B>(&self, req: Request<B>) -> Response<HttpBody>
    where
        B: Body<Data = Bytes, Error: Into<Box<dyn std::error::Error + Send + Sync>>> + Send + 'static,
    {
        self.0.handle(req).await
    }
}

impl<B> tower_service::Service<Request<B>> for LongPollService
where
    B: Body<Data = Bytes, Error: Into<Box<dyn std::error::Error + Send + Sync>>> + Send + 'static,
{
    type Response = Response<HttpBody>;
    type Error = std::convert::Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { Ok(this.handle(req).await) })
    }
}
