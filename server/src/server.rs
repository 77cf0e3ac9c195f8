//! The HTTP app of `fawkes serve`: the demo page, its assets and the socket at `/socket`.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse};
use axum::routing::get;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::task::JoinSet;

use fawkes::Endpoint;
use fawkes::longpoll::{LongPollOptions, LongPollService};
use fawkes::sse::{ConnectionCut, SseOptions, SseService};
use fawkes::ws::{PeerAddr, WebSocketService};

const INDEX_HTML: &str = include_str!("../assets/index.html");
const PHOENIX_JS: &str = include_str!("../assets/phoenix.min.js");

/// The conventional socket path the phoenix client is given.
pub const SOCKET_PATH: &str = "/socket";

/// An axum router serving the demo page at `/`, the phoenix client at `/assets/phoenix.min.js`,
/// `endpoint` at `/socket/websocket` and `/socket/longpoll`, and Prometheus metrics at `/metrics`.
pub fn app(endpoint: Endpoint) -> axum::Router {
    app_with(endpoint, LongPollOptions::default())
}

/// [`app`] with long-poll options.
pub fn app_with(endpoint: Endpoint, longpoll: LongPollOptions) -> axum::Router {
    app_with_metrics(endpoint, longpoll, String::new)
}

/// [`app_with`], with `more` appended to `/metrics` (Prometheus text with `# HELP` lines).
pub fn app_with_metrics(
    endpoint: Endpoint,
    longpoll: LongPollOptions,
    more: impl Fn() -> String + Clone + Send + Sync + 'static,
) -> axum::Router {
    let socket_routes = sockets(SOCKET_PATH, endpoint.clone(), longpoll);
    axum::Router::new()
        .route("/", get(|| async { Html(INDEX_HTML) }))
        .route("/metrics", get(move || std::future::ready(crate::metrics::metrics(&endpoint, more()))))
        .route(
            "/assets/phoenix.min.js",
            get(|| async { ([(header::CONTENT_TYPE, "text/javascript; charset=utf-8")], PHOENIX_JS).into_response() }),
        )
        .merge(socket_routes)
}

/// Mounts the transports for `endpoint` under `path`: `{path}/websocket`, `{path}/longpoll` and
/// `{path}/sse`.
pub fn sockets(path: &str, endpoint: Endpoint, longpoll: LongPollOptions) -> axum::Router {
    let path = path.trim_end_matches('/');
    // SSE shares long-poll's token secret, so that its POSTs reach their session from any node.
    let sse = match &longpoll.secret {
        Some(secret) => SseOptions::default().secret(secret.clone()),
        None => SseOptions::default(),
    };
    axum::Router::new()
        .route_service(&format!("{path}/sse"), SseService::with_options(endpoint.clone(), sse))
        .route_service(&format!("{path}/websocket"), WebSocketService::new(endpoint.clone()))
        .route_service(&format!("{path}/longpoll"), LongPollService::with_options(endpoint, longpoll))
        .layer(axum::middleware::map_request(peer_addr))
}

async fn peer_addr(mut req: Request) -> Request {
    if let Some(ConnectInfo(addr)) = req.extensions().get::<ConnectInfo<SocketAddr>>().copied() {
        req.extensions_mut().insert(PeerAddr(addr));
    }
    req
}

/// What [`serve_with`] does at shutdown, and when `/health` says the node is unwell.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct ServeOptions {
    /// Sockets are closed in [`ServeOptions::drain_batches`] batches spread over this time, as
    /// Phoenix's drainer does, so that reconnecting clients do not all arrive at the other nodes
    /// at once. Zero closes them all at once.
    pub drain_duration: Duration,
    /// How many batches.
    pub drain_batches: u32,
    /// After this long from the shutdown signal, `serve` returns whatever the peers do.
    pub drain_deadline: Duration,
    /// `/health` answers 503 once the PubSub backend has been unreachable this long.
    pub pubsub_outage: Duration,
    /// A connection's request headers must arrive in full within this long (from the accept,
    /// or from the end of the previous request): a slowloris peer is cut here.
    pub header_read_timeout: Duration,
    /// A connection that begins no response for this long (a request body that never ends, a
    /// peer that sends nothing) is closed. A response being streamed (SSE) keeps it open.
    pub idle_timeout: Duration,
}

impl Default for ServeOptions {
    fn default() -> ServeOptions {
        ServeOptions {
            drain_duration: Duration::ZERO,
            drain_batches: 10,
            drain_deadline: Duration::from_secs(30),
            pubsub_outage: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
        }
    }
}

/// Serves `app` (built around `endpoint`, e.g. by [`app`]) on `listener` until `shutdown`
/// completes, then closes every socket (telling each client: WebSocket 1001), stops accepting,
/// and leaves the cluster (if any). [`serve_with`] with the default options: every socket closed
/// at once, at most 30 s in all.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    endpoint: Endpoint,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with(listener, app, endpoint, shutdown, ServeOptions::default()).await
}

/// [`serve`] with a staggered drain and a deadline. Adds `GET /health` to `app`: 200 while
/// serving, 503 from the first moment of `shutdown` (new sockets are refused from then on while
/// the listener stays open, so that load balancers see the 503) and while the PubSub backend
/// has been unreachable longer than [`ServeOptions::pubsub_outage`].
///
/// Every connection is bounded in time: its request headers must arrive within
/// [`ServeOptions::header_read_timeout`], and a connection that completes no request for
/// [`ServeOptions::idle_timeout`] (a body that never ends) is closed. After the drain, the
/// connections still open are asked to finish their request; at
/// [`ServeOptions::drain_deadline`] whatever is left (a slow body, a stalled stream, a peer that
/// does not read) is cut and `serve_with` returns.
///
/// A response may ask for its connection to be closed with a [`ConnectionCut`] extension: an SSE
/// stream does, cut when its session ends. hyper polls a stream only when it can write, so a
/// stream whose peer stopped reading (closed as a slow consumer) would never end by itself. Once
/// the cut is made, the connection reads no further request, the response has 2 s to finish (a
/// peer that reads gets the last event), then the connection is dropped with what hyper buffered
/// for it. An app served with plain `axum::serve` has no such cut: a stalled stream's connection
/// stays open until the peer's TCP connection fails or times out. hyper's buffer is 32 KiB per
/// connection here (its default is about 400 KB), which also bounds a request's head.
pub async fn serve_with(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    endpoint: Endpoint,
    shutdown: impl Future<Output = ()> + Send + 'static,
    options: ServeOptions,
) -> std::io::Result<()> {
    let health =
        Arc::new(Health { endpoint: endpoint.clone(), outage: options.pubsub_outage, down_since: Mutex::new(None) });
    let watcher = tokio::spawn(health.clone().watch());
    let app = app.route("/health", get(move || std::future::ready(health.answer())));
    let (signalled, mut signal) = tokio::sync::watch::channel(None::<Instant>);
    let closing = endpoint.clone();
    let drain_options = options.clone();
    let drain = async move {
        shutdown.await;
        let started = Instant::now();
        let _ = signalled.send(Some(started));
        drain(&closing, started, &drain_options).await;
    };
    let serving = async {
        let limits = ConnLimits { header_read: options.header_read_timeout, idle: options.idle_timeout };
        // The accept loop is a task of its own: on a runtime worker, accepting and starting a
        // connection's task wakes no other thread (the caller's future, `#[tokio::main]`'s
        // for one, runs on a thread outside the runtime's workers).
        let mut accepting = Abort(tokio::spawn(accept(listener, app, limits, drain)));
        let mut connections = match (&mut accepting.0).await {
            Ok(connections) => connections,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => return, // the runtime is shutting down
        };
        // The connections still open finish their request and close; the deadline cuts the rest
        // (dropping `connections` aborts every connection task).
        while connections.join_next().await.is_some() {}
        endpoint.drained().await;
    };
    let deadline = async {
        let started = loop {
            if let Some(t) = *signal.borrow_and_update() {
                break t;
            }
            if signal.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        tokio::time::sleep_until((started + options.drain_deadline).into()).await;
        started
    };
    let started = tokio::select! {
        () = serving => None,
        started = deadline => {
            tracing::warn!(open = endpoint.connected(), deadline = ?options.drain_deadline, "drain deadline passed with connections still open; cutting them and exiting");
            Some(started)
        }
    };
    watcher.abort();
    // The other nodes of a cluster drop this node's presences now rather than after a timeout;
    // within the deadline when there is one.
    let started = started.or(*signal.borrow());
    let leave = match started {
        Some(t) => (t + options.drain_deadline).saturating_duration_since(Instant::now()).min(Duration::from_secs(2)),
        None => Duration::from_secs(2),
    };
    endpoint.pubsub().leave(leave.max(Duration::from_millis(100))).await;
    Ok(())
}

/// Aborts its task when dropped (the deadline cut `serve_with`'s own future short).
struct Abort<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for Abort<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The time limits of one HTTP connection.
#[derive(Debug, Clone, Copy)]
struct ConnLimits {
    header_read: Duration,
    idle: Duration,
}

/// Accepts connections until `drain` completes, then closes the listener and asks every open
/// connection to finish (HTTP/1 graceful shutdown: the request in flight is answered, no new one
/// is read). Returns the connection tasks.
async fn accept(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    limits: ConnLimits,
    drain: impl Future<Output = ()>,
) -> JoinSet<()> {
    let mut connections = JoinSet::new();
    let (stop, stopping) = tokio::sync::watch::channel(false);
    let mut drain = std::pin::pin!(drain);
    loop {
        tokio::select! {
            () = &mut drain => break,
            accepted = listener.accept() => match accepted {
                Ok((io, remote)) => {
                    let _ = io.set_nodelay(true);
                    connections.spawn(connection(io, remote, app.clone(), limits, stopping.clone()));
                }
                Err(e) => {
                    // Out of file descriptors, most likely: wait a little rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    let _ = stop.send(true);
    connections
}

/// How long a connection whose response asked for it to be cut ([`ConnectionCut`]) may still
/// take to finish that response: a peer that reads gets the stream's last event, one that does not
/// is dropped with what hyper buffered for it.
const CUT_GRACE: Duration = Duration::from_secs(2);
/// hyper's buffer per connection (its default is about 400 KB): the most a response may queue for
/// a peer that stopped reading besides the chunk being written, and the largest request head.
const MAX_BUF_SIZE: usize = 32 * 1024;

/// What a connection's requests have done, for its idle timeout and its cut.
#[derive(Debug)]
struct Activity {
    /// Responses begun on this connection.
    responses: AtomicU64,
    /// Response bodies being sent (an SSE stream) right now.
    streaming: AtomicUsize,
    /// The cut of the last response, until the next request begins.
    cut: tokio::sync::watch::Sender<Option<ConnectionCut>>,
}

impl Default for Activity {
    fn default() -> Activity {
        Activity {
            responses: AtomicU64::new(0),
            streaming: AtomicUsize::new(0),
            cut: tokio::sync::watch::Sender::new(None),
        }
    }
}

/// Completes when the response being sent on the connection asks for it to be cut.
async fn cut_requested(cuts: &mut tokio::sync::watch::Receiver<Option<ConnectionCut>>) {
    loop {
        let current = cuts.borrow_and_update().clone();
        let changed = async {
            if cuts.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        match current {
            Some(cut) => tokio::select! {
                () = cut.wait() => return,
                () = changed => {}
            },
            None => changed.await,
        }
    }
}

/// Serves one connection until it ends, is idle too long, its response asks for a cut, or the
/// server stops.
async fn connection(
    io: tokio::net::TcpStream,
    remote: SocketAddr,
    app: axum::Router,
    limits: ConnLimits,
    mut stopping: tokio::sync::watch::Receiver<bool>,
) {
    let activity = Arc::new(Activity::default());
    let seen = activity.clone();
    let mut cuts = activity.cut.subscribe();
    let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let mut app = app.clone();
        let activity = activity.clone();
        // A cut asked for by an earlier response is done with: its response was sent. (Only a
        // change wakes the connection's loop: most requests had no cut to clear.)
        activity.cut.send_if_modified(|cut| cut.take().is_some());
        async move {
            let mut req = req.map(axum::body::Body::new);
            req.extensions_mut().insert(ConnectInfo(remote));
            let res = match tower_service::Service::call(&mut app, req).await {
                Ok(res) => res,
                Err(never) => match never {},
            };
            activity.responses.fetch_add(1, Ordering::Relaxed);
            if let Some(cut) = res.extensions().get::<ConnectionCut>() {
                activity.cut.send_replace(Some(cut.clone()));
            }
            Ok::<_, Infallible>(res.map(|body| axum::body::Body::new(Streaming::new(body, activity))))
        }
    });
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(limits.header_read).max_buf_size(MAX_BUF_SIZE);
    let conn = http.serve_connection(TokioIo::new(io), service).with_upgrades();
    let mut conn = std::pin::pin!(conn);
    let mut graceful = false;
    let mut responses = 0;
    let idle = tokio::time::sleep(limits.idle);
    let mut idle = std::pin::pin!(idle);
    let mut cut_at = None;
    loop {
        tokio::select! {
            done = conn.as_mut() => {
                if let Err(e) = done {
                    tracing::debug!(peer = %remote, error = %e, "connection ended");
                }
                return;
            }
            _ = stopping.changed(), if !graceful => {
                graceful = true;
                conn.as_mut().graceful_shutdown();
            }
            () = cut_requested(&mut cuts), if cut_at.is_none() => {
                // The stream ended (its session closed): finish the response, read no more.
                tracing::debug!(peer = %remote, "the response's stream ended; closing the connection");
                cut_at = Some(tokio::time::Instant::now() + CUT_GRACE);
                if !graceful {
                    graceful = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
            () = tokio::time::sleep_until(cut_at.unwrap_or_else(tokio::time::Instant::now)), if cut_at.is_some() => {
                tracing::debug!(peer = %remote, grace = ?CUT_GRACE, "cutting a connection whose peer does not read");
                return;
            }
            () = &mut idle => {
                let now = seen.responses.load(Ordering::Relaxed);
                if now == responses && seen.streaming.load(Ordering::Relaxed) == 0 {
                    tracing::debug!(peer = %remote, idle = ?limits.idle, "closing a connection that completed no request in time");
                    return;
                }
                responses = now;
                idle.as_mut().reset(tokio::time::Instant::now() + limits.idle);
            }
        }
    }
}

/// A response body that counts as activity while it is being sent.
struct Streaming {
    body: axum::body::Body,
    activity: Arc<Activity>,
}

impl Streaming {
    fn new(body: axum::body::Body, activity: Arc<Activity>) -> Streaming {
        activity.streaming.fetch_add(1, Ordering::Relaxed);
        Streaming { body, activity }
    }
}

impl Drop for Streaming {
    fn drop(&mut self) {
        self.activity.streaming.fetch_sub(1, Ordering::Relaxed);
    }
}

impl http_body::Body for Streaming {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// Closes the endpoint's sockets in batches spread over the drain duration.
async fn drain(endpoint: &Endpoint, started: Instant, options: &ServeOptions) {
    let open = endpoint.connected();
    let batches = if options.drain_duration.is_zero() { 1 } else { options.drain_batches.max(1) };
    let per_batch = open.div_ceil(batches as usize).max(1);
    tracing::info!(sockets = open, batches, over = ?options.drain_duration, "draining");
    endpoint.shutdown_batch(0);
    for k in 1..batches {
        let n = endpoint.shutdown_batch(per_batch);
        tracing::debug!(closed = n, batch = k, "drain batch");
        tokio::time::sleep_until((started + options.drain_duration * k / batches).into()).await;
    }
    let n = endpoint.shutdown();
    tracing::info!(closed = n, after = ?started.elapsed(), "last drain batch");
}

/// What `/health` answers.
struct Health {
    endpoint: Endpoint,
    outage: Duration,
    down_since: Mutex<Option<Instant>>,
}

impl Health {
    /// Notes when the PubSub backend became unreachable.
    async fn watch(self: Arc<Health>) {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tick.tick().await;
            self.observe();
        }
    }

    fn observe(&self) -> Option<Duration> {
        let connected = self.endpoint.pubsub().stats().connected;
        let mut down = self.down_since.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match (connected, *down) {
            (true, _) => *down = None,
            (false, None) => *down = Some(Instant::now()),
            (false, Some(_)) => {}
        }
        down.map(|t| t.elapsed())
    }

    fn answer(&self) -> axum::response::Response {
        let down_for = self.observe();
        let (status, body) = if self.endpoint.is_shutting_down() {
            (StatusCode::SERVICE_UNAVAILABLE, serde_json::json!({"status": "draining"}))
        } else if let Some(d) = down_for.filter(|d| *d > self.outage) {
            let body = serde_json::json!({"status": "pubsub unreachable", "seconds": d.as_secs()});
            (StatusCode::SERVICE_UNAVAILABLE, body)
        } else {
            (StatusCode::OK, serde_json::json!({"status": "ok", "sockets": self.endpoint.connected()}))
        };
        (status, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
    }
}

/// Completes on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { () = ctrl_c => {}, () = term => {} }
}
