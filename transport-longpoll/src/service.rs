//! The long-poll service: sessions addressed by signed tokens, polls and posts.

use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use fawkes_channel::{
    ConnectError, ConnectInfo, Endpoint, Frame, NodeId, Outbound, PeerAddr, ServiceGuard, Session, SessionSigner,
    random_session_id,
};
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body::Body;
use http_body_util::{BodyExt as _, Full, Limited};
use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::time::Instant;

/// A session's id: 128 random bits, never reused.
type SessionId = [u8; 16];

/// What a token names: the node that owns the session, the service instance on it, the session.
struct Address {
    node: u64,
    instance: u32,
    id: SessionId,
}

impl Address {
    fn to_bytes(&self) -> [u8; 28] {
        let mut out = [0u8; 28];
        out[..8].copy_from_slice(&self.node.to_be_bytes());
        out[8..12].copy_from_slice(&self.instance.to_be_bytes());
        out[12..].copy_from_slice(&self.id);
        out
    }

    fn from_bytes(raw: &[u8]) -> Option<Address> {
        let raw: &[u8; 28] = raw.try_into().ok()?;
        let (node, rest) = raw.split_at(8);
        let (instance, id) = rest.split_at(4);
        Some(Address {
            node: u64::from_be_bytes(node.try_into().ok()?),
            instance: u32::from_be_bytes(instance.try_into().ok()?),
            id: id.try_into().ok()?,
        })
    }
}

const SHARDS: usize = 32;
/// Messages answered by one poll at most; the rest wait for the next poll.
const MAX_MESSAGES_PER_POLL: usize = 1024;

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
        LongPollOptions {
            poll_window: Duration::from_secs(10),
            session_idle: Duration::from_secs(20),
            max_body_size: 8 * 1024 * 1024,
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

/// Lines a session remembers, to drop a retried POST's lines that were already taken.
const RECENT_LINES: usize = 512;

/// Hashes of the lines a session took most recently. Every Phoenix push carries a fresh ref, so
/// a line seen again is a retry of a POST whose answer was lost, never a new message.
struct RecentLines {
    hashes: std::collections::VecDeque<u64>,
    keys: std::collections::hash_map::RandomState,
}

impl RecentLines {
    fn new() -> RecentLines {
        RecentLines { hashes: std::collections::VecDeque::new(), keys: Default::default() }
    }

    /// True (and remembered) for a line not seen recently.
    fn first_time(&mut self, line: &[u8]) -> bool {
        use std::hash::BuildHasher as _;
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

/// One long-poll client's session, kept between requests.
struct LongPollSession {
    session: tokio::sync::Mutex<(Session, RecentLines)>,
    outbound: tokio::sync::Mutex<Outbound>,
    /// Bumped by every `GET`; a waiting `GET` that sees a newer one answers `204` and steps aside.
    poll_generation: AtomicU64,
    newer_poll: Notify,
    /// Milliseconds since the registry's epoch of the last `GET`, and how many are in flight.
    last_get_ms: AtomicU64,
    polling: AtomicUsize,
}

struct Registry {
    endpoint: Endpoint,
    options: LongPollOptions,
    signer: SessionSigner,
    /// This node, and this service among the node's long-poll services.
    node: NodeId,
    instance: u32,
    sessions: Box<[Shard]>,
    epoch: Instant,
    reaper: OnceLock<()>,
    /// Answers requests other nodes forward here (set when the endpoint's PubSub is clustered).
    service: OnceLock<ServiceGuard>,
}

type Shard = Mutex<HashMap<SessionId, Arc<LongPollSession>>>;

/// Where a token's session lives.
enum Lookup {
    Here(SessionId, Arc<LongPollSession>),
    /// On another node.
    Elsewhere(NodeId, u32),
    /// No token, a token that does not verify, or a session that ended.
    Gone,
}

/// The name other nodes send requests for this service's sessions to.
fn service_name(instance: u32) -> String {
    format!("fawkes.longpoll.{instance:08x}")
}

impl Registry {
    fn shard(&self, id: &SessionId) -> &Shard {
        &self.sessions[id[0] as usize % SHARDS]
    }

    fn lookup(&self, token: Option<&str>) -> Lookup {
        let Some(addr) = token.and_then(|t| self.signer.verify(t)).and_then(|raw| Address::from_bytes(&raw)) else {
            return Lookup::Gone;
        };
        if addr.node != self.node.get() {
            return match NodeId::from_u64(addr.node) {
                Some(node) => Lookup::Elsewhere(node, addr.instance),
                None => Lookup::Gone,
            };
        }
        if addr.instance != self.instance {
            return Lookup::Gone;
        }
        match self.shard(&addr.id).lock().get(&addr.id).cloned() {
            Some(session) => Lookup::Here(addr.id, session),
            None => Lookup::Gone,
        }
    }

    fn sign(&self, id: SessionId) -> String {
        self.signer.sign(&Address { node: self.node.get(), instance: self.instance, id }.to_bytes())
    }

    fn remove(&self, id: &SessionId) {
        self.shard(id).lock().remove(id);
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn len(&self) -> usize {
        self.sessions.iter().map(|s| s.lock().len()).sum()
    }

    /// Ends sessions nobody polls any more, and sessions that closed.
    fn reap(&self) {
        let now = self.now_ms();
        let idle = self.options.session_idle.as_millis() as u64;
        for shard in self.sessions.iter() {
            shard.lock().retain(|_, s| {
                let polling = s.polling.load(Ordering::Acquire) > 0;
                let idle_for = now.saturating_sub(s.last_get_ms.load(Ordering::Acquire));
                let closed = s.session.try_lock().is_ok_and(|session| session.0.is_closed());
                polling || (idle_for < idle && !closed)
            });
        }
    }

    fn start_reaper(self: &Arc<Self>) {
        self.reaper.get_or_init(|| {
            let weak: Weak<Registry> = Arc::downgrade(self);
            let every = (self.options.session_idle / 4).clamp(Duration::from_millis(50), Duration::from_secs(5));
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let Some(registry) = weak.upgrade() else {
                        return;
                    };
                    registry.reap();
                }
            });
        });
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
pub struct LongPollService {
    registry: Arc<Registry>,
}

impl fmt::Debug for LongPollService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LongPollService").field("sessions", &self.sessions()).finish_non_exhaustive()
    }
}

/// A long-poll answer before it becomes an HTTP response: a status and a JSON body.
struct Answer {
    status: StatusCode,
    body: Bytes,
}

impl Answer {
    fn into_response(self) -> Response<Full<Bytes>> {
        let mut res = Response::new(Full::new(self.body));
        *res.status_mut() = self.status;
        res.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        res
    }
}

/// A request forwarded to the session's node: `kind (1: GET, 2: POST) | ndjson (0/1) | token
/// length (u16) | token | body`. The answer: `HTTP status (u16, 0 = no such session) | body`.
fn encode_forward(post: bool, ndjson: bool, token: &str, body: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(4 + token.len() + body.len());
    out.push(if post { 2 } else { 1 });
    out.push(u8::from(ndjson));
    out.extend_from_slice(&(token.len() as u16).to_be_bytes());
    out.extend_from_slice(token.as_bytes());
    out.extend_from_slice(body);
    out.into()
}

fn decode_forward(raw: &Bytes) -> Option<(bool, bool, String, Bytes)> {
    let (&kind, rest) = raw.split_first()?;
    let (&ndjson, rest) = rest.split_first()?;
    let len = u16::from_be_bytes(rest.get(..2)?.try_into().ok()?) as usize;
    let token = std::str::from_utf8(rest.get(2..2 + len)?).ok()?.to_owned();
    Some((kind == 2, ndjson == 1, token, raw.slice(4 + len..)))
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
    let status = u16::from_be_bytes(raw.get(..2)?.try_into().ok()?);
    let status = StatusCode::from_u16(status).ok()?;
    Some(Answer { status, body: raw.slice(2..) })
}

impl LongPollService {
    /// A service for `endpoint` with default options.
    pub fn new(endpoint: Endpoint) -> LongPollService {
        LongPollService::with_options(endpoint, LongPollOptions::default())
    }

    /// A service for `endpoint` with `options`.
    pub fn with_options(endpoint: Endpoint, options: LongPollOptions) -> LongPollService {
        let signer = SessionSigner::new(options.secret.as_deref());
        let pubsub = endpoint.pubsub().clone();
        let instance = u32::from_be_bytes(random_session_id()[..4].try_into().unwrap_or_default());
        let registry = Arc::new(Registry {
            endpoint,
            options,
            signer,
            node: pubsub.node(),
            instance,
            sessions: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            epoch: Instant::now(),
            reaper: OnceLock::new(),
            service: OnceLock::new(),
        });
        if pubsub.is_clustered() {
            let weak = Arc::downgrade(&registry);
            let guard = pubsub.serve(&service_name(instance), move |from, request| {
                let registry = weak.upgrade();
                async move {
                    let answer = match registry {
                        Some(registry) => registry.forwarded(from, request).await,
                        None => None,
                    };
                    encode_answer(answer.as_ref())
                }
            });
            let _ = registry.service.set(guard);
        }
        LongPollService { registry }
    }

    /// Number of live long-poll sessions on this node.
    pub fn sessions(&self) -> usize {
        self.registry.len()
    }

    /// Handles one request.
    pub async fn handle<B>(&self, req: Request<B>) -> Response<Full<Bytes>>
    where
        B: Body<Data = Bytes>,
        B::Error: std::error::Error + Send + Sync + 'static,
    {
        self.registry.start_reaper();
        let mut res = match *req.method() {
            Method::GET => self.get(req).await.into_response(),
            Method::POST => self.post(req).await.into_response(),
            Method::OPTIONS => preflight(&req),
            _ => {
                let mut res =
                    json(StatusCode::METHOD_NOT_ALLOWED, r#"{"error":"method not allowed"}"#.into()).into_response();
                res.headers_mut().insert(header::ALLOW, HeaderValue::from_static("GET, POST, OPTIONS"));
                res
            }
        };
        res.headers_mut().insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
        res
    }

    async fn get<B>(&self, mut req: Request<B>) -> Answer {
        let query = req.uri().query().map(str::to_owned);
        let token = token_param(query.as_deref());
        let registry = &self.registry;
        let answer = match registry.lookup(token.as_deref()) {
            Lookup::Here(id, session) => return registry.poll(id, token.unwrap_or_default(), session).await,
            Lookup::Elsewhere(node, instance) => {
                let request = encode_forward(false, false, token.as_deref().unwrap_or_default(), &[]);
                registry.forward(node, instance, request, registry.options.poll_window).await
            }
            Lookup::Gone => None,
        };
        match answer {
            Some(answer) => answer,
            None => {
                if token.is_some() {
                    tracing::debug!("long-poll GET with an unknown or invalid token: opening a new session");
                }
                let peer = req.extensions().get::<PeerAddr>().map(|p| p.0);
                registry.open(query.as_deref(), std::mem::take(req.headers_mut()), peer).await
            }
        }
    }

    async fn post<B>(&self, req: Request<B>) -> Answer
    where
        B: Body<Data = Bytes>,
        B::Error: std::error::Error + Send + Sync + 'static,
    {
        let registry = &self.registry;
        let token = token_param(req.uri().query());
        let lookup = registry.lookup(token.as_deref());
        if let Lookup::Gone = lookup {
            return envelope(410, None, &[]);
        }
        let ndjson = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.starts_with("application/x-ndjson"));
        let body = match Limited::new(req.into_body(), registry.options.max_body_size).collect().await {
            Ok(body) => body.to_bytes(),
            Err(e) => {
                let too_large = e.downcast_ref::<http_body_util::LengthLimitError>().is_some();
                return if too_large {
                    tracing::info!(limit = registry.options.max_body_size, "long-poll POST body too large");
                    json(StatusCode::PAYLOAD_TOO_LARGE, r#"{"status":413}"#.into())
                } else {
                    envelope(400, None, &[])
                };
            }
        };
        match lookup {
            Lookup::Here(id, session) => registry.publish(id, session, ndjson, body).await,
            Lookup::Elsewhere(node, instance) => {
                let request = encode_forward(true, ndjson, token.as_deref().unwrap_or_default(), &body);
                let answer = registry.forward(node, instance, request, Duration::ZERO).await;
                answer.unwrap_or_else(|| envelope(410, None, &[]))
            }
            Lookup::Gone => envelope(410, None, &[]),
        }
    }
}

impl Registry {
    async fn open(&self, query: Option<&str>, headers: http::HeaderMap, peer: Option<SocketAddr>) -> Answer {
        let mut info = ConnectInfo::new("longpoll", false).with_query(query);
        info.peer_addr = peer;
        info.params.remove("token");
        info.auth_token = headers.get("x-phoenix-authtoken").and_then(|v| v.to_str().ok()).map(str::to_owned);
        info.headers = headers;
        let session = match self.endpoint.connect(info).await {
            Ok(session) => session,
            Err(ConnectError::ShuttingDown) => return envelope(500, None, &[]),
            Err(e) => {
                tracing::info!(error = %e, "long-poll connect refused");
                return envelope(403, None, &[]);
            }
        };
        let id = random_session_id();
        let outbound = session.outbound();
        let entry = Arc::new(LongPollSession {
            session: tokio::sync::Mutex::new((session, RecentLines::new())),
            outbound: tokio::sync::Mutex::new(outbound),
            poll_generation: AtomicU64::new(0),
            newer_poll: Notify::new(),
            last_get_ms: AtomicU64::new(self.now_ms()),
            polling: AtomicUsize::new(0),
        });
        self.shard(&id).lock().insert(id, entry);
        envelope(410, Some(&self.sign(id)), &[])
    }

    async fn poll(&self, id: SessionId, token: String, s: Arc<LongPollSession>) -> Answer {
        let _polling = PollGuard::new(self, &s);
        let generation = s.poll_generation.fetch_add(1, Ordering::AcqRel) + 1;
        s.newer_poll.notify_waiters();

        let mut outbound = s.outbound.lock().await;
        // Polling is this client's heartbeat: phoenix.js sends none over long-poll.
        outbound.keep_alive();
        let mut newer = pin!(s.newer_poll.notified());
        newer.as_mut().enable();
        if s.poll_generation.load(Ordering::Acquire) != generation {
            return envelope(204, Some(&token), &[]);
        }
        let mut frames = Vec::new();
        let result = tokio::select! {
            received = outbound.recv_many(&mut frames, MAX_MESSAGES_PER_POLL) => Some(received),
            () = newer => None,
            () = tokio::time::sleep(self.options.poll_window) => None,
        };
        match result {
            None => envelope(204, Some(&token), &[]),
            Some(Ok(_)) => {
                let messages: Vec<&[u8]> = frames.iter().map(|f| f.as_bytes().as_ref()).collect();
                envelope(200, Some(&token), &messages)
            }
            Some(Err(reason)) => {
                tracing::debug!(%reason, "long-poll session closed");
                self.remove(&id);
                envelope(410, Some(&token), &[])
            }
        }
    }

    /// Hands a POST's messages to the session.
    async fn publish(&self, id: SessionId, s: Arc<LongPollSession>, ndjson: bool, body: Bytes) -> Answer {
        let lines: Vec<Bytes> = if ndjson {
            body.split(|&b| b == b'\n')
                .map(|line| line.strip_suffix(b"\r").unwrap_or(line))
                .filter(|line| !line.is_empty())
                .map(|line| body.slice_ref(line))
                .collect()
        } else {
            vec![body]
        };
        let mut guard = s.session.lock().await;
        let (session, recent) = &mut *guard;
        for line in lines {
            if !recent.first_time(&line) {
                tracing::debug!("dropping a line already taken (a retried POST)");
                continue;
            }
            if let Err(reason) = session.handle_frame(line_frame(line)).await {
                drop(guard);
                self.remove(&id);
                // A session that had already ended is gone (410); one this POST broke is a bad request.
                if reason == fawkes_channel::CloseReason::TransportClosed {
                    return envelope(410, None, &[]);
                }
                tracing::info!(%reason, "long-poll session closed by a POST");
                return envelope(400, None, &[]);
            }
        }
        envelope(200, None, &[])
    }

    /// Sends a request to the node that owns its session and returns that node's answer; `None`
    /// when the session is gone there or the node did not answer (it may be dead). A poll may
    /// wait there for `waits` before answering.
    async fn forward(&self, node: NodeId, instance: u32, request: Bytes, waits: Duration) -> Option<Answer> {
        let pubsub = self.endpoint.pubsub();
        let timeout = waits + Duration::from_secs(5);
        match pubsub.request(node, &service_name(instance), request, timeout).await {
            Ok(raw) => {
                let answer = decode_answer(&raw);
                if answer.is_none() {
                    tracing::debug!(%node, "long-poll session not found on its node");
                }
                answer
            }
            Err(e) => {
                tracing::info!(%node, error = %e, "long-poll request could not be forwarded; the session is gone");
                None
            }
        }
    }

    /// Answers a request another node forwarded here; `None` when its session is not here.
    async fn forwarded(&self, from: NodeId, request: Bytes) -> Option<Answer> {
        let Some((post, ndjson, token, body)) = decode_forward(&request) else {
            tracing::warn!(%from, "unreadable forwarded long-poll request");
            return None;
        };
        let Lookup::Here(id, session) = self.lookup(Some(&token)) else { return None };
        Some(if post { self.publish(id, session, ndjson, body).await } else { self.poll(id, token, session).await })
    }
}

impl<B> tower_service::Service<Request<B>> for LongPollService
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    type Response = Response<Full<Bytes>>;
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

/// Counts a `GET` in flight and stamps the session's last `GET` when it ends.
struct PollGuard<'a> {
    registry: &'a Registry,
    session: &'a LongPollSession,
}

impl<'a> PollGuard<'a> {
    fn new(registry: &'a Registry, session: &'a LongPollSession) -> PollGuard<'a> {
        session.polling.fetch_add(1, Ordering::AcqRel);
        session.last_get_ms.store(registry.now_ms(), Ordering::Release);
        PollGuard { registry, session }
    }
}

impl Drop for PollGuard<'_> {
    fn drop(&mut self) {
        self.session.last_get_ms.store(self.registry.now_ms(), Ordering::Release);
        self.session.polling.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A JSON line is a text message; anything else is a base64 binary push.
fn line_frame(line: Bytes) -> Frame {
    match line.first() {
        Some(b'[' | b'{') | None => Frame::Text(line),
        Some(_) => match base64::engine::general_purpose::STANDARD.decode(&line) {
            Ok(bytes) => Frame::Binary(bytes.into()),
            Err(_) => Frame::Text(line),
        },
    }
}

fn token_param(query: Option<&str>) -> Option<String> {
    fawkes_channel::parse_query(query?).find(|(k, _)| k == "token").map(|(_, v)| v)
}

fn envelope(status: u16, token: Option<&str>, messages: &[&[u8]]) -> Answer {
    let mut out = Vec::with_capacity(48 + messages.iter().map(|m| m.len() + 8).sum::<usize>());
    out.extend_from_slice(format!(r#"{{"status":{status},"token":"#).as_bytes());
    let _ = serde_json::to_writer(&mut out, &token);
    out.extend_from_slice(br#","messages":["#);
    for (i, m) in messages.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        let _ = serde_json::to_writer(&mut out, &String::from_utf8_lossy(m));
    }
    out.extend_from_slice(b"]}");
    json(StatusCode::OK, out.into())
}

fn json(status: StatusCode, body: Bytes) -> Answer {
    Answer { status, body }
}

fn preflight<B>(req: &Request<B>) -> Response<Full<Bytes>> {
    let mut res = Response::new(Full::new(Bytes::new()));
    let h = res.headers_mut();
    if let Some(requested) = req.headers().get(header::ACCESS_CONTROL_REQUEST_HEADERS) {
        h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, requested.clone());
    }
    h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static("get, post, options"));
    h.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("3600"));
    res
}
