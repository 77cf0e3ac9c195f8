//! Detached sessions: the registry, their tokens, the reaper and the one pending read.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use fawkes_channel::{
    CloseReason, CloseSignal, ConnectInfo, Endpoint, Frame, NodeId, Outbound, PeerAddr, ServiceGuard, Session,
};
use http::Response;
use http::request::Parts;
use parking_lot::Mutex;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::answer::{Answer, HttpBody, HttpError};
use crate::cut::ConnectionCut;
use crate::ingest::{BodyKind, RecentLines, line_frame, lines};
use crate::token::{SessionSigner, random_session_id};

/// A session's id: 128 random bits, never reused.
type SessionId = [u8; 16];
const SHARDS: usize = 32;

/// Settings of the session layer, shared by every transport built on it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SessionOptions {
    /// A session with no read for this long ends, and its channels leave.
    pub session_idle: Duration,
    /// Largest `POST` body, in bytes.
    pub max_body_size: usize,
    /// The key tokens are signed with. Nodes of one cluster must share it, so any node can read a
    /// token and forward the request to the session's node; by default each process makes a
    /// random one (a restarted server then answers old tokens `410`, and clients reconnect).
    pub secret: Option<Vec<u8>>,
}

impl Default for SessionOptions {
    fn default() -> SessionOptions {
        SessionOptions { session_idle: Duration::from_secs(20), max_body_size: 8 * 1024 * 1024, secret: None }
    }
}

impl SessionOptions {
    /// Sets [`SessionOptions::session_idle`].
    pub fn session_idle(mut self, d: Duration) -> Self {
        self.session_idle = d;
        self
    }
    /// Sets [`SessionOptions::max_body_size`].
    pub fn max_body_size(mut self, bytes: usize) -> Self {
        self.max_body_size = bytes;
        self
    }
    /// Sets [`SessionOptions::secret`].
    pub fn secret(mut self, secret: impl Into<Vec<u8>>) -> Self {
        self.secret = Some(secret.into());
        self
    }
}

/// What a token names: the node that owns the session, the service instance on it, the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Address {
    pub(crate) node: u64,
    pub(crate) instance: u32,
    pub(crate) id: SessionId,
}

impl Address {
    fn to_bytes(self) -> [u8; 28] {
        let mut out = [0u8; 28];
        out[..8].copy_from_slice(&self.node.to_be_bytes());
        out[8..12].copy_from_slice(&self.instance.to_be_bytes());
        out[12..].copy_from_slice(&self.id);
        out
    }

    fn from_bytes(raw: &[u8]) -> Option<Address> {
        let raw: &[u8; 28] = raw.try_into().ok()?;
        Some(Address {
            node: u64::from_be_bytes(raw[..8].try_into().ok()?),
            instance: u32::from_be_bytes(raw[8..12].try_into().ok()?),
            id: raw[12..].try_into().ok()?,
        })
    }
}

/// One client's session, kept between its requests.
pub(crate) struct Entry<S> {
    pub(crate) token: String,
    id: SessionId,
    pub(crate) session: tokio::sync::Mutex<(Session, RecentLines)>,
    outbound: tokio::sync::Mutex<Outbound>,
    /// Fires when the socket closes, for those who do not hold `outbound` (a stream nobody reads).
    closing: CloseSignal,
    /// The generation of the newest read; each read holds a receiver, so the receiver count is
    /// the number of reads in flight.
    reads: watch::Sender<u64>,
    /// Milliseconds since the registry's epoch when the last read started or ended.
    last_read_ms: AtomicU64,
    state: S,
}

/// A session kept between requests, as a transport sees it. Cheap to clone.
pub struct DetachedSession<S>(pub(crate) Arc<Entry<S>>, Instant);

impl<S> Clone for DetachedSession<S> {
    fn clone(&self) -> Self {
        DetachedSession(self.0.clone(), self.1)
    }
}

impl<S> fmt::Debug for DetachedSession<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DetachedSession").finish_non_exhaustive()
    }
}

impl<S> DetachedSession<S> {
    /// Hands a body's messages to the session, in order, each line once. `Err` means the session
    /// has ended (the caller forgets it): [`HttpError::SessionGone`] if it had ended before,
    /// [`HttpError::Closed`] if a message closed it.
    pub(crate) async fn ingest(&self, kind: BodyKind, body: bytes::Bytes) -> Result<(), HttpError> {
        let mut guard = self.0.session.lock().await;
        let (session, recent) = &mut *guard;
        for line in lines(kind, &body) {
            if !recent.first_time(&line) {
                tracing::debug!("dropping a line already taken (a retried POST)");
                continue;
            }
            if let Err(reason) = session.handle_frame(line_frame(line)).await {
                if reason == CloseReason::TransportClosed {
                    return Err(HttpError::SessionGone);
                }
                tracing::info!(%reason, "session closed by a POST");
                return Err(HttpError::Closed(reason));
            }
        }
        Ok(())
    }

    /// The signed token that names this session.
    pub fn token(&self) -> &str {
        &self.0.token
    }

    /// What the transport keeps for this session ([`HttpTransport::State`]).
    pub fn state(&self) -> &S {
        &self.0.state
    }

    /// Starts a read: it releases the read in flight, if any (one pending read at a time), and
    /// keeps the session from idling out until dropped.
    pub fn read(&self) -> Read<S> {
        let entry = &self.0;
        let mut generation = 0;
        entry.reads.send_modify(|g| {
            *g += 1;
            generation = *g;
        });
        let released = entry.reads.subscribe();
        let read = Read { session: self.clone(), generation, released, keep_alive: false };
        read.stamp();
        read
    }
}

/// Ends the watch of [`Read::cut_when_ended`] when dropped.
#[derive(Debug)]
pub struct CutWatch {
    _watching: tokio::sync::oneshot::Sender<std::convert::Infallible>,
}

/// What [`Read::next`] saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadEvent {
    /// Frames were taken from the session's outbound queue.
    Frames,
    /// Nothing within the wait.
    Idle,
    /// A newer read of the same session started: answer this one as empty and stop.
    Released,
    /// The session closed, for this reason; everything queued before was taken.
    Closed(CloseReason),
}

/// One read of a session's outbound queue (a long-poll `GET`, an SSE stream). See
/// [`DetachedSession::read`].
pub struct Read<S> {
    session: DetachedSession<S>,
    generation: u64,
    released: watch::Receiver<u64>,
    keep_alive: bool,
}

impl<S> fmt::Debug for Read<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Read").field("generation", &self.generation).finish_non_exhaustive()
    }
}

impl<S> Read<S> {
    /// Counts this read as the client's heartbeat (phoenix.js sends none over long-poll).
    pub fn keep_alive(&mut self) {
        self.keep_alive = true;
    }

    /// The session this read is of.
    pub fn session(&self) -> &DetachedSession<S> {
        &self.session
    }

    fn stamp(&self) {
        let now = self.session.1.elapsed().as_millis() as u64;
        self.session.0.last_read_ms.store(now, Ordering::Release);
    }

    /// Completes once this read can yield nothing more: the session's socket closed, or a newer
    /// read released this one. It takes nothing from the queue and holds no lock, so it fires for
    /// a read that nobody polls (a stream whose peer stopped reading; see
    /// [`ConnectionCut`](crate::ConnectionCut)). While pending it counts as a read, so keep it no
    /// longer than the read.
    pub fn ended(&self) -> impl Future<Output = ()> + Send + 'static {
        let closing = self.session.0.closing.clone();
        let mut released = self.released.clone();
        let generation = self.generation;
        async move {
            tokio::select! {
                _ = closing.closed() => {}
                _ = released.wait_for(|g| *g != generation) => {}
            }
        }
    }

    /// A [`ConnectionCut`] for the response that streams this read, cut once the read ends
    /// ([`Read::ended`]). A task watches for it until the returned [`CutWatch`] is dropped: keep
    /// that with the stream, so that a stream that ends by itself stops the watch.
    pub fn cut_when_ended(&self) -> (ConnectionCut, CutWatch) {
        let cut = ConnectionCut::new();
        let (watch, stream_gone) = tokio::sync::oneshot::channel();
        let ended = self.ended();
        let cutting = cut.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = ended => cutting.cut(),
                _ = stream_gone => {}
            }
        });
        (cut, CutWatch { _watching: watch })
    }

    /// Waits up to `wait` for frames and takes at most `limit` of them, and no more than
    /// `max_bytes` past the first, into `frames`. Cancel-safe: nothing is taken from the queue
    /// unless it is returned.
    pub async fn next(&mut self, frames: &mut Vec<Frame>, limit: usize, max_bytes: usize, wait: Duration) -> ReadEvent {
        let entry = &self.session.0;
        let generation = self.generation;
        let keep_alive = std::mem::take(&mut self.keep_alive);
        let released = self.released.wait_for(|g| *g != generation);
        let received = async {
            let mut outbound = entry.outbound.lock().await;
            if keep_alive {
                outbound.keep_alive();
            }
            outbound.recv_many_within(frames, limit, max_bytes).await
        };
        tokio::select! {
            biased;
            _ = released => ReadEvent::Released,
            received = received => match received {
                Ok(_) => ReadEvent::Frames,
                Err(reason) => ReadEvent::Closed(reason),
            },
            () = tokio::time::sleep(wait) => ReadEvent::Idle,
        }
    }
}

impl<S> Drop for Read<S> {
    fn drop(&mut self) {
        self.stamp();
    }
}

/// Where a token's session lives.
#[derive(Debug)]
pub enum Lookup<S> {
    /// On this node.
    Here(DetachedSession<S>),
    /// On another node: forward the request there.
    Elsewhere(Remote),
    /// No token, a token that does not verify, or a session that ended.
    Gone,
}

/// A session on another node.
#[derive(Debug, Clone)]
pub struct Remote {
    pub(crate) node: NodeId,
    pub(crate) instance: u32,
    pub(crate) token: String,
}

type Shard<S> = Mutex<HashMap<SessionId, Arc<Entry<S>>>>;

/// A request/response transport on the session layer: what it keeps per session, and how it
/// answers a `GET` (the read side). `POST`s, CORS, tokens, the registry, the reaper and
/// forwarding are the layer's.
///
/// A transport that answers each `GET` with one batch of frames (as long-poll does) can answer
/// reads forwarded from other nodes too ([`HttpTransport::forwarded_read`]); one that streams
/// (SSE) cannot, and opens a new session where its stream lands, while its `POST`s still reach
/// the session from any node.
///
/// ```
/// use fawkes_http::{HttpBody, HttpTransport, Lookup, ReadEvent, Sessions, Answer};
/// use http::{Response, request::Parts};
/// use std::time::Duration;
///
/// /// Answers a `GET` with what is queued (`200`) or nothing within a second (`204`).
/// struct Batches;
///
/// impl HttpTransport for Batches {
///     type State = ();
///     const NAME: &'static str = "batches";
///
///     fn new_state(&self) {}
///
///     async fn get(&self, sessions: &Sessions<Self>, mut parts: Parts) -> Response<HttpBody> {
///         let token = fawkes_http::query_param(parts.uri.query(), "token");
///         let session = match sessions.lookup(token.as_deref()) {
///             Lookup::Here(session) => session,
///             _ => match sessions.open(&mut parts).await {
///                 Ok(session) => return Answer::envelope(410, Some(session.token()), &[]).into_response(),
///                 Err(e) => return e.answer().into_response(),
///             },
///         };
///         let mut read = session.read();
///         let mut frames = Vec::new();
///         let answer = match read.next(&mut frames, 100, usize::MAX, Duration::from_secs(1)).await {
///             ReadEvent::Frames => {
///                 let messages: Vec<&[u8]> = frames.iter().map(|f| f.as_bytes().as_ref()).collect();
///                 Answer::envelope(200, Some(session.token()), &messages)
///             }
///             _ => Answer::envelope(204, Some(session.token()), &[]),
///         };
///         answer.into_response()
///     }
/// }
/// ```
pub trait HttpTransport: Send + Sync + Sized + 'static {
    /// What the transport keeps per session beside the session itself (SSE: its replay window).
    type State: Send + Sync + 'static;
    /// The transport's name, for [`ConnectInfo`](fawkes_channel::ConnectInfo) and logs.
    const NAME: &'static str;
    /// Query params that are the transport's own, not connect params (`token` always is).
    const OWN_PARAMS: &'static [&'static str] = &["token"];

    /// The state of a new session.
    fn new_state(&self) -> Self::State;

    /// Answers a `GET`: opens a session ([`Sessions::open`]) or reads one ([`Sessions::lookup`],
    /// [`DetachedSession::read`]).
    fn get(&self, sessions: &Sessions<Self>, parts: Parts) -> impl Future<Output = Response<HttpBody>> + Send;

    /// Answers a read that another node forwarded here ([`Sessions::forward_read`]) for a session
    /// of this node; `None` if this transport's reads are never forwarded.
    fn forwarded_read(
        &self,
        sessions: &Sessions<Self>,
        session: DetachedSession<Self::State>,
    ) -> impl Future<Output = Option<Answer>> + Send {
        let _ = (sessions, session);
        async { None }
    }
}

pub(crate) struct Inner<T: HttpTransport> {
    pub(crate) transport: T,
    pub(crate) endpoint: Endpoint,
    pub(crate) options: SessionOptions,
    signer: SessionSigner,
    pub(crate) node: NodeId,
    pub(crate) instance: u32,
    shards: Box<[Shard<T::State>]>,
    epoch: Instant,
    reaper: OnceLock<()>,
    /// Answers requests other nodes forward here (set when the endpoint's PubSub is clustered).
    pub(crate) service: OnceLock<ServiceGuard>,
}

/// The sessions of one transport on this node: the registry every request reaches them through.
/// Cheap to clone; clones share sessions.
pub struct Sessions<T: HttpTransport>(pub(crate) Arc<Inner<T>>);

impl<T: HttpTransport> Clone for Sessions<T> {
    fn clone(&self) -> Self {
        Sessions(self.0.clone())
    }
}

impl<T: HttpTransport> fmt::Debug for Sessions<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sessions").field("transport", &T::NAME).field("len", &self.len()).finish_non_exhaustive()
    }
}

impl<T: HttpTransport> Sessions<T> {
    /// The sessions of `transport` for `endpoint`. [`HttpService::new`](crate::HttpService::new)
    /// also makes this node answer the requests other nodes forward to them.
    pub(crate) fn new(transport: T, endpoint: Endpoint, options: SessionOptions) -> Sessions<T> {
        let signer = SessionSigner::new(options.secret.as_deref());
        let instance = u32::from_be_bytes(random_session_id()[..4].try_into().unwrap_or_default());
        let node = endpoint.pubsub().node();
        let inner = Inner {
            transport,
            endpoint,
            options,
            signer,
            node,
            instance,
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            epoch: Instant::now(),
            reaper: OnceLock::new(),
            service: OnceLock::new(),
        };
        Sessions(Arc::new(inner))
    }

    pub(crate) fn from_weak(weak: &Weak<Inner<T>>) -> Option<Sessions<T>> {
        weak.upgrade().map(Sessions)
    }

    /// The transport.
    pub fn transport(&self) -> &T {
        &self.0.transport
    }

    /// The endpoint sessions connect to.
    pub fn endpoint(&self) -> &Endpoint {
        &self.0.endpoint
    }

    /// The options.
    pub fn options(&self) -> &SessionOptions {
        &self.0.options
    }

    /// Number of live sessions on this node.
    pub fn len(&self) -> usize {
        self.0.shards.iter().map(|s| s.lock().len()).sum()
    }

    /// Whether there is no live session on this node.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn shard(&self, id: &SessionId) -> &Shard<T::State> {
        &self.0.shards[id[0] as usize % SHARDS]
    }

    /// Where the session `token` names lives.
    pub fn lookup(&self, token: Option<&str>) -> Lookup<T::State> {
        let Some(token) = token else { return Lookup::Gone };
        let Some(addr) = self.0.signer.verify(token).and_then(|raw| Address::from_bytes(&raw)) else {
            return Lookup::Gone;
        };
        if addr.node != self.0.node.get() {
            return match NodeId::from_u64(addr.node) {
                Some(node) => Lookup::Elsewhere(Remote { node, instance: addr.instance, token: token.to_owned() }),
                None => Lookup::Gone,
            };
        }
        if addr.instance != self.0.instance {
            return Lookup::Gone;
        }
        match self.shard(&addr.id).lock().get(&addr.id) {
            Some(entry) => Lookup::Here(DetachedSession(entry.clone(), self.0.epoch)),
            None => Lookup::Gone,
        }
    }

    /// Connects a new session for the request `parts` (see [`connect_info`]) and keeps it; its
    /// [`token`](DetachedSession::token) names it from now on.
    pub async fn open(&self, parts: &mut Parts) -> Result<DetachedSession<T::State>, HttpError> {
        self.start_reaper();
        let mut info = connect_info(T::NAME, parts, T::OWN_PARAMS);
        if let Some(token) = app_token(parts.uri.query(), |t| self.0.signer.verify(t).is_some()) {
            info.params.insert("token".into(), token);
        }
        let session = self.0.endpoint.connect(info).await.map_err(|e| {
            tracing::info!(transport = T::NAME, error = %e, "connect refused");
            HttpError::from(e)
        })?;
        let id = random_session_id();
        let token = self.0.signer.sign(&Address { node: self.0.node.get(), instance: self.0.instance, id }.to_bytes());
        let entry = Arc::new(Entry {
            token,
            id,
            outbound: tokio::sync::Mutex::new(session.outbound()),
            closing: session.close_signal(),
            session: tokio::sync::Mutex::new((session, RecentLines::new())),
            reads: watch::Sender::new(0),
            last_read_ms: AtomicU64::new(self.0.epoch.elapsed().as_millis() as u64),
            state: self.0.transport.new_state(),
        });
        self.shard(&id).lock().insert(id, entry.clone());
        Ok(DetachedSession(entry, self.0.epoch))
    }

    /// Forgets `session`: its channels leave once the last request holding it is answered.
    pub fn end(&self, session: &DetachedSession<T::State>) {
        self.shard(&session.0.id).lock().remove(&session.0.id);
    }

    /// Ends sessions nobody reads any more, and sessions that closed.
    fn reap(&self) {
        let now = self.0.epoch.elapsed().as_millis() as u64;
        let idle = self.0.options.session_idle.as_millis() as u64;
        for shard in self.0.shards.iter() {
            shard.lock().retain(|_, e| {
                let reading = e.reads.receiver_count() > 0;
                let idle_for = now.saturating_sub(e.last_read_ms.load(Ordering::Acquire));
                let closed = e.session.try_lock().is_ok_and(|s| s.0.is_closed());
                reading || (idle_for < idle && !closed)
            });
        }
    }

    pub(crate) fn start_reaper(&self) {
        self.0.reaper.get_or_init(|| {
            let weak = Arc::downgrade(&self.0);
            let every = (self.0.options.session_idle / 4).clamp(Duration::from_millis(50), Duration::from_secs(5));
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let Some(sessions) = Sessions::from_weak(&weak) else { return };
                    sessions.reap();
                }
            });
        });
    }
}

/// What is known about the peer of an HTTP request, for [`Endpoint::connect`]: the query's `vsn`
/// and connect params (without the transport's own, `own_params`), the bearer token (header
/// `X-Phoenix-AuthToken`, or the `auth_token` param for clients that cannot send headers), the
/// headers, and the [`PeerAddr`] the server put in the request's extensions.
pub fn connect_info(transport: &'static str, parts: &mut Parts, own_params: &[&str]) -> ConnectInfo {
    let mut info = ConnectInfo::new(transport, false).with_query(parts.uri.query());
    info.params.retain(|k, _| !own_params.contains(&k.as_str()));
    let param = info.params.remove("auth_token");
    let header = parts.headers.get("x-phoenix-authtoken").and_then(|v| v.to_str().ok()).map(str::to_owned);
    info.auth_token = header.or(param);
    info.peer_addr = parts.extensions.get::<PeerAddr>().map(|p| p.0);
    info.headers = std::mem::take(&mut parts.headers);
    info
}

/// The app's own connect param `token`, which shares its name with the transport's session
/// token: phoenix.js sends `?token=APP&vsn=2.0.0&token=SESSION` (the session's last, `null` on
/// the first request). When `token` is given more than once, the first is the app's; given once,
/// it is the app's unless it is one of this transport's session tokens (`is_session`).
fn app_token(query: Option<&str>, is_session: impl Fn(&str) -> bool) -> Option<String> {
    let mut tokens = fawkes_channel::parse_query(query?).filter(|(k, _)| k == "token").map(|(_, v)| v);
    let first = tokens.next()?;
    if tokens.next().is_some() || !is_session(&first) { Some(first) } else { None }
}

/// The value of the query param `name`, decoded; the last one when it is given more than once
/// (phoenix.js appends the transport's session `token` after the app's connect params, which may
/// carry a `token` of their own).
pub fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    fawkes_channel::parse_query(query?).filter(|(k, _)| k == name).last().map(|(_, v)| v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::HttpBody;
    use fawkes_channel::Config;
    use http::Response;

    /// Reads are driven by the tests themselves.
    struct Manual;

    impl HttpTransport for Manual {
        type State = ();
        const NAME: &'static str = "manual";

        fn new_state(&self) {}

        async fn get(&self, _: &Sessions<Self>, _: Parts) -> Response<HttpBody> {
            crate::HttpError::MethodNotAllowed.answer().into_response()
        }
    }

    fn sessions(idle: Duration) -> Sessions<Manual> {
        let endpoint = fawkes_testkit::endpoint(Config::default());
        Sessions::new(Manual, endpoint, SessionOptions::default().session_idle(idle))
    }

    async fn open(sessions: &Sessions<Manual>, query: &str) -> Result<DetachedSession<()>, HttpError> {
        let (mut parts, ()) = http::Request::get(format!("/x?{query}")).body(()).expect("request").into_parts();
        sessions.open(&mut parts).await
    }

    #[tokio::test(start_paused = true)]
    async fn a_newer_read_releases_the_older_and_takes_what_is_queued() {
        let sessions = sessions(Duration::from_secs(20));
        let session = open(&sessions, "vsn=2.0.0").await.expect("opens");
        let mut older = session.read();
        let mut frames = Vec::new();
        assert_eq!(older.next(&mut frames, 10, usize::MAX, Duration::from_secs(1)).await, ReadEvent::Idle);
        let mut newer = session.read();
        assert_eq!(older.next(&mut frames, 10, usize::MAX, Duration::from_secs(1)).await, ReadEvent::Released);
        ingest_heartbeat(&session).await;
        assert_eq!(newer.next(&mut frames, 10, usize::MAX, Duration::from_secs(1)).await, ReadEvent::Frames);
        assert_eq!(frames.len(), 1, "the heartbeat reply, taken once");
    }

    #[tokio::test(start_paused = true)]
    async fn a_read_nobody_polls_ends_when_a_newer_read_starts_or_its_socket_closes() {
        let sessions = sessions(Duration::from_secs(20));
        let session = open(&sessions, "vsn=2.0.0").await.expect("opens");
        let older = session.read();
        let ended = tokio::spawn(older.ended());
        tokio::task::yield_now().await;
        assert!(!ended.is_finished(), "a read in flight has not ended");
        let newer = session.read();
        assert!(tokio::time::timeout(Duration::from_secs(1), ended).await.is_ok(), "released by the newer read");
        let ended = tokio::spawn(newer.ended());
        tokio::task::yield_now().await;
        assert!(!ended.is_finished());
        session.0.session.lock().await.0.close(CloseReason::SlowConsumer);
        assert!(tokio::time::timeout(Duration::from_secs(1), ended).await.is_ok(), "its socket closed");
    }

    async fn ingest_heartbeat(session: &DetachedSession<()>) {
        let line = bytes::Bytes::from_static(br#"[null,"1","phoenix","heartbeat",{}]"#);
        session.ingest(crate::ingest::BodyKind::Single, line).await.expect("taken");
    }

    #[tokio::test(start_paused = true)]
    async fn sessions_end_after_the_idle_window_without_a_read_and_not_while_read() {
        let idle = Duration::from_secs(20);
        let sessions = sessions(idle);
        let abandoned = open(&sessions, "vsn=2.0.0").await.expect("opens");
        let read = open(&sessions, "vsn=2.0.0").await.expect("opens");
        let token = abandoned.token().to_owned();
        drop(abandoned);
        let _reading = read.read();
        tokio::time::sleep(idle / 2).await;
        assert_eq!(sessions.len(), 2, "not before the idle window");
        tokio::time::sleep(idle).await;
        assert_eq!(sessions.len(), 1, "the session being read is kept");
        assert!(matches!(sessions.lookup(Some(&token)), Lookup::Gone));
        assert_eq!(sessions.endpoint().connected(), 1);
    }

    #[tokio::test]
    async fn tokens_name_their_session_and_nothing_else_and_refusals_are_errors() {
        let sessions = sessions(Duration::from_secs(20));
        let session = open(&sessions, "vsn=2.0.0&user=ann").await.expect("opens");
        assert!(matches!(sessions.lookup(Some(session.token())), Lookup::Here(_)));
        let other = super::Sessions::new(Manual, sessions.endpoint().clone(), SessionOptions::default());
        assert!(matches!(other.lookup(Some(session.token())), Lookup::Gone), "another service's token");
        for bad in [None, Some(""), Some("forged.token")] {
            assert!(matches!(sessions.lookup(bad), Lookup::Gone), "{bad:?}");
        }
        let refused = open(&sessions, "vsn=2.0.0&reject=true").await;
        assert!(matches!(refused, Err(HttpError::Refused(_))), "{refused:?}");
        sessions.endpoint().shutdown();
        assert!(matches!(open(&sessions, "vsn=2.0.0").await, Err(HttpError::ShuttingDown)));
    }

    #[test]
    fn the_apps_token_param_is_told_from_the_session_token() {
        let session = |t: &str| t.starts_with("S");
        assert_eq!(app_token(Some("token=jwt&vsn=2.0.0&token=null"), session).as_deref(), Some("jwt"));
        assert_eq!(app_token(Some("token=jwt&vsn=2.0.0&token=S1"), session).as_deref(), Some("jwt"));
        assert_eq!(app_token(Some("token=jwt&vsn=2.0.0"), session).as_deref(), Some("jwt"));
        assert_eq!(app_token(Some("vsn=2.0.0&token=S1"), session), None);
        assert_eq!(app_token(Some("vsn=2.0.0"), session), None);
        assert_eq!(crate::query_param(Some("token=jwt&vsn=2.0.0&token=S1"), "token").as_deref(), Some("S1"));
    }

    #[test]
    fn connect_info_takes_the_auth_token_from_the_header_first_and_drops_own_params() {
        let req = http::Request::get("/x?vsn=2.0.0&token=t&last_event_id=4&auth_token=param&user=ann")
            .header("x-phoenix-authtoken", "header")
            .body(())
            .expect("request");
        let (mut parts, ()) = req.into_parts();
        parts.extensions.insert(PeerAddr(std::net::SocketAddr::from(([10, 0, 0, 1], 4000))));
        let info = connect_info("sse", &mut parts, &["token", "last_event_id"]);
        assert_eq!(info.auth_token.as_deref(), Some("header"));
        assert_eq!(info.params.into_iter().collect::<Vec<_>>(), [("user".to_owned(), "ann".to_owned())]);
        assert_eq!((info.vsn.as_deref(), info.transport), (Some("2.0.0"), "sse"));
        assert_eq!(info.peer_addr, Some(std::net::SocketAddr::from(([10, 0, 0, 1], 4000))));
        assert!(info.headers.contains_key("x-phoenix-authtoken"));

        let (mut parts, ()) = http::Request::get("/x?auth_token=param").body(()).expect("request").into_parts();
        assert_eq!(connect_info("sse", &mut parts, &[]).auth_token.as_deref(), Some("param"));
    }
}
