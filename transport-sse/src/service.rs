//! The SSE service: sessions addressed by signed tokens, an event stream down, POSTs up.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::{convert::Infallible, fmt, pin::Pin, task::Context, task::Poll, time::Duration};

use base64::Engine as _;
use bytes::Bytes;
use fawkes_channel::{CloseReason, ConnectError, ConnectInfo, Endpoint, Frame, Outbound, Session, SessionSigner};
use futures_util::{StreamExt as _, stream};
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body::Body;
use http_body_util::{BodyExt as _, Full, LengthLimitError, Limited, StreamBody, combinators::UnsyncBoxBody};
use tokio::{sync::watch, time::Instant};

use crate::SseOptions;

type Id = [u8; 16];
type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Frames one stream takes from the outbound queue at a time.
const BATCH: usize = 256;

/// A response body: a short JSON answer, or a session's event stream.
pub type SseBody = UnsyncBoxBody<Bytes, Infallible>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

struct Entry {
    session: tokio::sync::Mutex<Session>,
    outbound: tokio::sync::Mutex<Outbound>,
    /// Signalled by every `GET`, which ends the stream attached before. The attached stream holds
    /// the only receiver.
    attached: watch::Sender<()>,
    replay: Mutex<Replay>,
    /// Since when no stream is attached, as the reaper saw it.
    detached_since: Mutex<Option<Instant>>,
}

/// The events recently sent.
struct Replay {
    events: VecDeque<(u64, Bytes)>,
    last_id: u64,
}

struct Inner {
    endpoint: Endpoint,
    options: SseOptions,
    signer: SessionSigner,
    sessions: Mutex<HashMap<Id, Arc<Entry>>>,
    reaper: OnceLock<()>,
}

impl Inner {
    fn find(&self, token: &str) -> Option<(Id, Arc<Entry>)> {
        let id: Id = self.signer.verify(token)?.try_into().ok()?;
        Some((id, lock(&self.sessions).get(&id)?.clone()))
    }

    fn remove(&self, id: &Id) {
        lock(&self.sessions).remove(id);
    }

    /// Ends, from time to time, the sessions that closed or had no stream for the idle window.
    fn start_reaper(self: &Arc<Self>) {
        self.reaper.get_or_init(|| {
            let weak = Arc::downgrade(self);
            let every = (self.options.session_idle / 4).clamp(Duration::from_millis(50), Duration::from_secs(5));
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                loop {
                    tick.tick().await;
                    let Some(inner) = weak.upgrade() else { return };
                    lock(&inner.sessions).retain(|_, e| {
                        let mut since = lock(&e.detached_since);
                        *since = (e.attached.receiver_count() == 0).then(|| since.unwrap_or_else(Instant::now));
                        let closed = e.session.try_lock().is_ok_and(|s| s.is_closed());
                        !closed && since.is_none_or(|at| at.elapsed() < inner.options.session_idle)
                    });
                }
            });
        });
    }
}

/// Server-Sent Events for an [`Endpoint`]. Mount it at `{path}/sse`. Cheap to clone; clones
/// share sessions.
#[derive(Clone)]
pub struct SseService(Arc<Inner>);

impl fmt::Debug for SseService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SseService").field("sessions", &self.sessions()).finish_non_exhaustive()
    }
}

impl SseService {
    /// A service for `endpoint` with default options.
    pub fn new(endpoint: Endpoint) -> SseService {
        SseService::with_options(endpoint, SseOptions::default())
    }

    /// A service for `endpoint` with `options`.
    pub fn with_options(endpoint: Endpoint, options: SseOptions) -> SseService {
        let signer = SessionSigner::new(options.secret.as_deref());
        let inner = Inner { endpoint, options, signer, sessions: Mutex::default(), reaper: OnceLock::new() };
        SseService(Arc::new(inner))
    }

    /// Number of live SSE sessions.
    pub fn sessions(&self) -> usize {
        lock(&self.0.sessions).len()
    }

    /// Handles one request.
    pub async fn handle<B: Body<Data = Bytes, Error: Into<BoxError>>>(&self, req: Request<B>) -> Response<SseBody> {
        self.0.start_reaper();
        let mut res = match *req.method() {
            Method::GET => self.get(req).await,
            Method::POST => self.post(req).await,
            // A CORS preflight, or any other method, learns what is allowed.
            ref method => {
                let code = if method == Method::OPTIONS { StatusCode::OK } else { StatusCode::METHOD_NOT_ALLOWED };
                let mut res = status(code);
                let h = res.headers_mut();
                if let Some(requested) = req.headers().get(header::ACCESS_CONTROL_REQUEST_HEADERS) {
                    h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, requested.clone());
                }
                h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static("GET, POST, OPTIONS"));
                h.insert(header::ALLOW, HeaderValue::from_static("GET, POST, OPTIONS"));
                h.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("3600"));
                res
            }
        };
        res.headers_mut().insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
        res
    }

    async fn get<B>(&self, mut req: Request<B>) -> Response<SseBody> {
        let query = req.uri().query().unwrap_or_default().to_owned();
        let token = param(&query, "token");
        let header = req.headers().get("last-event-id").and_then(|v| v.to_str().ok()).map(str::to_owned);
        let last = header.or_else(|| param(&query, "last_event_id")).and_then(|v| v.trim().parse::<u64>().ok());
        if let Some((id, entry)) = token.as_deref().and_then(|t| self.0.find(t)) {
            if let Some(replay) = replay_after(&entry, last) {
                return self.attach(id, token.unwrap_or_default(), entry, replay);
            }
            self.0.remove(&id); // events after `last` left the window: a new session starts
        }
        let mut info = ConnectInfo::new("sse", false).with_query(Some(&query));
        // EventSource cannot send headers: the client's bearer token may come as `auth_token`.
        info.auth_token = info.params.remove("auth_token");
        info.peer_addr = req.extensions().get::<fawkes_channel::PeerAddr>().map(|p| p.0);
        info.params.retain(|k, _| k != "token" && k != "last_event_id");
        info.headers = std::mem::take(req.headers_mut());
        let session = match self.0.endpoint.connect(info).await {
            Ok(session) => session,
            Err(ConnectError::ShuttingDown) => return status(StatusCode::SERVICE_UNAVAILABLE),
            Err(e) => {
                tracing::info!(error = %e, "SSE connect refused");
                return status(StatusCode::FORBIDDEN);
            }
        };
        let id = fawkes_channel::random_session_id();
        let entry = Arc::new(Entry {
            outbound: tokio::sync::Mutex::new(session.outbound()),
            session: tokio::sync::Mutex::new(session),
            attached: watch::Sender::new(()),
            replay: Mutex::new(Replay { events: VecDeque::new(), last_id: 0 }),
            detached_since: Mutex::default(),
        });
        lock(&self.0.sessions).insert(id, entry.clone());
        self.attach(id, self.0.signer.sign(&id), entry, Vec::new())
    }

    /// Streams `entry`'s events after `replay`, ending the stream attached before.
    fn attach(&self, id: Id, token: String, entry: Arc<Entry>, replay: Vec<u8>) -> Response<SseBody> {
        entry.attached.send_replace(());
        let replaced = entry.attached.subscribe();
        let first = [event("event: phx_session", &token), replay.into()].concat();
        let events = Events { inner: self.0.clone(), id, entry: Some(entry), replaced };
        let events = stream::unfold(events, |mut events| async move { Some((events.next().await?, events)) });
        let chunks = stream::iter([Bytes::from(first)]).chain(events);
        let mut res = Response::new(StreamBody::new(chunks.map(|c| Ok(http_body::Frame::data(c)))).boxed_unsync());
        let h = res.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        h.insert("x-accel-buffering", HeaderValue::from_static("no"));
        res
    }

    /// Hands a POST's messages to the session, answering as long-poll does.
    async fn post<B: Body<Data = Bytes, Error: Into<BoxError>>>(&self, req: Request<B>) -> Response<SseBody> {
        let token = param(req.uri().query().unwrap_or_default(), "token");
        let Some((id, entry)) = token.and_then(|t| self.0.find(&t)) else { return envelope(410) };
        let content_type = req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok());
        let ndjson = content_type.is_some_and(|ct| ct.starts_with("application/x-ndjson"));
        let body = match Limited::new(req.into_body(), self.0.options.max_body_size).collect().await {
            Ok(body) => body.to_bytes(),
            Err(e) if e.is::<LengthLimitError>() => return status(StatusCode::PAYLOAD_TOO_LARGE),
            Err(_) => return envelope(400),
        };
        let lines: Vec<Bytes> = if ndjson {
            let trimmed = body.split(|&b| b == b'\n').map(|line| line.strip_suffix(b"\r").unwrap_or(line));
            trimmed.filter(|line| !line.is_empty()).map(|line| body.slice_ref(line)).collect()
        } else {
            vec![body]
        };
        let mut session = entry.session.lock().await;
        for line in lines {
            if let Err(reason) = session.handle_frame(line_frame(line)).await {
                self.0.remove(&id);
                // A session that had already ended is gone (410); one this POST broke is a bad request.
                return envelope(if reason == CloseReason::TransportClosed { 410 } else { 400 });
            }
        }
        envelope(200)
    }
}

impl<B: Body<Data = Bytes, Error: Into<BoxError>> + Send + 'static> tower_service::Service<Request<B>> for SseService {
    type Response = Response<SseBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { Ok(this.handle(req).await) })
    }
}

/// The events after `last` from the replay window; `None` when some of them are no longer in it.
fn replay_after(entry: &Entry, last: Option<u64>) -> Option<Vec<u8>> {
    let Some(last) = last else { return Some(Vec::new()) };
    let replay = lock(&entry.replay);
    let oldest = replay.events.front().map_or(replay.last_id + 1, |(id, _)| *id);
    (last + 1 >= oldest)
        .then(|| replay.events.iter().filter(|(id, _)| *id > last).flat_map(|(_, e)| e.to_vec()).collect())
}

/// One attached stream. It takes frames from the outbound queue only when polled, so a reader
/// that stops reading leaves them queued, where the endpoint's limit applies.
struct Events {
    inner: Arc<Inner>,
    id: Id,
    /// Taken when the socket closes, so an ended stream holds no session.
    entry: Option<Arc<Entry>>,
    /// Changes when a newer `GET` attaches to the session.
    replaced: watch::Receiver<()>,
}

impl Events {
    /// The next chunk of the stream: events, a keep-alive comment, or the close event; `None` once
    /// it ended. Events are numbered, and the last `replay_window` of them kept.
    async fn next(&mut self) -> Option<Bytes> {
        let entry = self.entry.clone()?;
        let mut frames = Vec::new();
        let received = async { entry.outbound.lock().await.recv_many(&mut frames, BATCH).await };
        let received = tokio::select! {
            biased;
            _ = self.replaced.changed() => return None,
            received = received => received,
            () = tokio::time::sleep(self.inner.options.keep_alive) => return Some(": keep-alive\n\n".into()),
        };
        if let Err(reason) = received {
            self.entry = None;
            self.inner.remove(&self.id);
            return Some(event("event: phx_socket_close", &reason.to_string()));
        }
        let replay = &mut *lock(&entry.replay);
        let mut out = Vec::new();
        for frame in frames {
            replay.last_id += 1;
            let event = event(&format!("id: {}", replay.last_id), &String::from_utf8_lossy(frame.as_bytes()));
            out.extend_from_slice(&event);
            replay.events.push_back((replay.last_id, event));
            if replay.events.len() > self.inner.options.replay_window {
                replay.events.pop_front();
            }
        }
        Some(out.into())
    }
}

/// One SSE event: `head` (its `event:` or `id:` line), then `data`, one `data:` line per line.
fn event(head: &str, data: &str) -> Bytes {
    format!("{head}\ndata: {}\n\n", data.replace('\n', "\ndata: ")).into()
}

/// A JSON line is a text message; anything else is a base64 binary push.
fn line_frame(line: Bytes) -> Frame {
    match line.first() {
        Some(b'[' | b'{') | None => Frame::Text(line),
        Some(_) => base64::engine::general_purpose::STANDARD
            .decode(&line)
            .map_or(Frame::Text(line), |bytes| Frame::Binary(bytes.into())),
    }
}

fn param(query: &str, name: &str) -> Option<String> {
    fawkes_channel::parse_query(query).find(|(k, _)| k == name).map(|(_, v)| v)
}

/// A POST's answer, as long-poll gives it: HTTP 200, the status in a JSON envelope.
fn envelope(status: u16) -> Response<SseBody> {
    json(StatusCode::OK, format!(r#"{{"status":{status},"token":null,"messages":[]}}"#))
}

/// An answer with `code` as its HTTP status and in its JSON body.
fn status(code: StatusCode) -> Response<SseBody> {
    json(code, format!(r#"{{"status":{}}}"#, code.as_u16()))
}

fn json(code: StatusCode, body: String) -> Response<SseBody> {
    let mut res = Response::new(Full::from(body).boxed_unsync());
    *res.status_mut() = code;
    res.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    res
}
