//! The HTTP app of `fawkes serve`: the demo page, its assets and the socket at `/socket`.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse};
use axum::routing::get;

use fawkes::Endpoint;
use fawkes::longpoll::{LongPollOptions, LongPollService};
use fawkes::sse::{SseOptions, SseService};
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
    let socket_routes = sockets(SOCKET_PATH, endpoint.clone(), longpoll);
    axum::Router::new()
        .route("/", get(|| async { Html(INDEX_HTML) }))
        .route("/metrics", get(move || std::future::ready(metrics(&endpoint))))
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

/// Prometheus text: open sockets and the cluster link.
fn metrics(endpoint: &Endpoint) -> impl IntoResponse + use<> {
    let c = endpoint.pubsub().stats();
    let body = format!(
        "# HELP fawkes_sockets Open sockets.\n# TYPE fawkes_sockets gauge\nfawkes_sockets {}\n\
         # HELP fawkes_pubsub_connected Whether the PubSub backend is reachable (1 on a single node).\n\
         # TYPE fawkes_pubsub_connected gauge\nfawkes_pubsub_connected {}\n\
         # HELP fawkes_pubsub_disconnects_total Times the PubSub backend was lost.\n\
         # TYPE fawkes_pubsub_disconnects_total counter\nfawkes_pubsub_disconnects_total {}\n\
         # HELP fawkes_pubsub_sent_total Messages handed to the PubSub backend for other nodes.\n\
         # TYPE fawkes_pubsub_sent_total counter\nfawkes_pubsub_sent_total {}\n\
         # HELP fawkes_pubsub_received_total Messages from other nodes delivered here.\n\
         # TYPE fawkes_pubsub_received_total counter\nfawkes_pubsub_received_total {}\n\
         # HELP fawkes_pubsub_dropped_total Messages not sent because the backend was away and the queue was full.\n\
         # TYPE fawkes_pubsub_dropped_total counter\nfawkes_pubsub_dropped_total {}\n\
         # HELP fawkes_pubsub_malformed_total Messages from the backend that could not be read.\n\
         # TYPE fawkes_pubsub_malformed_total counter\nfawkes_pubsub_malformed_total {}\n\
         # HELP fawkes_draining Whether the server is draining (1 from the first moment of SIGTERM).\n\
         # TYPE fawkes_draining gauge\nfawkes_draining {}\n",
        endpoint.connected(),
        u8::from(c.connected),
        c.disconnects,
        c.sent,
        c.received,
        c.dropped,
        c.malformed,
        u8::from(endpoint.is_shutting_down()),
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body)
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
}

impl Default for ServeOptions {
    fn default() -> ServeOptions {
        ServeOptions {
            drain_duration: Duration::ZERO,
            drain_batches: 10,
            drain_deadline: Duration::from_secs(30),
            pubsub_outage: Duration::from_secs(10),
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
    let app = app
        .route("/health", get(move || std::future::ready(health.answer())))
        .into_make_service_with_connect_info::<SocketAddr>();
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
        // Frames go out as they are written: with Nagle's algorithm a frame queued on a socket
        // whose previous write is not yet acknowledged waits for the peer's (delayed) ACK.
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp: &mut tokio::net::TcpStream| {
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(error = %e, "cannot set TCP_NODELAY");
            }
        });
        axum::serve(listener, app).with_graceful_shutdown(drain).await?;
        endpoint.drained().await;
        Ok::<_, std::io::Error>(())
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
        served = serving => { served?; None }
        started = deadline => {
            tracing::warn!(open = endpoint.connected(), deadline = ?options.drain_deadline, "drain deadline passed with sockets still open; exiting");
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
