//! The HTTP app of `fawkes serve`: the demo page, its assets and the socket at `/socket`.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::{ConnectInfo, Request};
use axum::http::header;
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
         # TYPE fawkes_pubsub_disconnects_total counter\nfawkes_pubsub_disconnects_total {}\n\
         # TYPE fawkes_pubsub_sent_total counter\nfawkes_pubsub_sent_total {}\n\
         # TYPE fawkes_pubsub_received_total counter\nfawkes_pubsub_received_total {}\n\
         # TYPE fawkes_pubsub_dropped_total counter\nfawkes_pubsub_dropped_total {}\n\
         # TYPE fawkes_pubsub_malformed_total counter\nfawkes_pubsub_malformed_total {}\n",
        endpoint.connected(),
        u8::from(c.connected),
        c.disconnects,
        c.sent,
        c.received,
        c.dropped,
        c.malformed,
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body)
}

async fn peer_addr(mut req: Request) -> Request {
    if let Some(ConnectInfo(addr)) = req.extensions().get::<ConnectInfo<SocketAddr>>().copied() {
        req.extensions_mut().insert(PeerAddr(addr));
    }
    req
}

/// Serves `app` (built around `endpoint`, e.g. by [`app`]) on `listener` until `shutdown`
/// completes, then stops accepting, closes every socket (telling each client: WebSocket 1001),
/// waits up to five seconds for them to finish, and leaves the cluster (if any).
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    endpoint: Endpoint,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = app.into_make_service_with_connect_info::<SocketAddr>();
    let closing = endpoint.clone();
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            let n = closing.shutdown();
            tracing::info!(sockets = n, "shutting down");
        })
        .await?;
    if tokio::time::timeout(Duration::from_secs(5), endpoint.drained()).await.is_err() {
        tracing::warn!(open = endpoint.connected(), "sockets still open after the shutdown grace period");
    }
    // The other nodes of a cluster drop this node's presences now rather than after a timeout.
    endpoint.pubsub().leave(Duration::from_secs(2)).await;
    Ok(())
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
