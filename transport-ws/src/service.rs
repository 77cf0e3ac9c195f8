//! The upgrade: a tower `Service` answering `GET …/websocket`.

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use base64::Engine as _;
use bytes::Bytes;
use fawkes_channel::{ConnectError, ConnectInfo, Endpoint, PeerAddr};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

use crate::coalesce::Coalesce;
use crate::connection;

const BEARER_PREFIX: &str = "base64url.bearer.phx.";

/// WebSocket buffer sizes. Limits on what a peer may send live in the endpoint's
/// [`Config`](fawkes_channel::Config) (`max_frame_size`).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct WsOptions {
    /// Read buffer per connection, in bytes: also the most read from the socket at once. Every
    /// connection holds it for its whole life, so small keeps idle sockets cheap; a larger frame
    /// grows it as needed.
    pub read_buffer_size: usize,
    /// Bytes tungstenite buffers before it hands them on (frames of one batch are written
    /// together and flushed once). Its buffer keeps, for the connection's life, the capacity it
    /// reached (up to this plus the largest frame written, rounded up by doubling), so a small
    /// value keeps cheap the sockets that once got a burst of large frames (a presence state's
    /// parts). What it hands on during a batch is gathered, up to 64 KiB, into one system call,
    /// in memory freed once written; a burst of small broadcasts goes out in one write as is.
    pub write_buffer_size: usize,
    /// A ceiling on the write buffer, not reached in practice: after a write the socket would not
    /// take, the connection waits for the peer to read before it buffers another frame, so the
    /// buffer holds at most `write_buffer_size` plus one frame (and a connection whose peer stopped
    /// reading holds, besides its queue, that and at most 64 KiB of frames it took to write). A
    /// single frame larger than this cannot be written: the connection ends.
    pub max_write_buffer_size: usize,
}

impl Default for WsOptions {
    fn default() -> WsOptions {
        WsOptions { read_buffer_size: 1024, write_buffer_size: 4 * 1024, max_write_buffer_size: 4 * 1024 * 1024 }
    }
}

impl WsOptions {
    fn tungstenite(&self, max_frame_size: usize) -> WebSocketConfig {
        WebSocketConfig::default()
            .read_buffer_size(self.read_buffer_size)
            .write_buffer_size(self.write_buffer_size)
            .max_write_buffer_size(self.max_write_buffer_size.max(self.write_buffer_size + 1))
            .max_message_size(Some(max_frame_size))
            .max_frame_size(Some(max_frame_size))
    }
}

/// Answers WebSocket upgrades for an [`Endpoint`]. Mount it at `{path}/websocket`.
#[derive(Clone)]
pub struct WebSocketService {
    endpoint: Endpoint,
    options: Arc<WsOptions>,
}

impl fmt::Debug for WebSocketService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebSocketService").field("options", &self.options).finish_non_exhaustive()
    }
}

impl WebSocketService {
    /// A service for `endpoint` with default options.
    pub fn new(endpoint: Endpoint) -> WebSocketService {
        WebSocketService::with_options(endpoint, WsOptions::default())
    }

    /// A service for `endpoint` with `options`.
    pub fn with_options(endpoint: Endpoint, options: WsOptions) -> WebSocketService {
        WebSocketService { endpoint, options: Arc::new(options) }
    }

    /// Handles one request.
    pub async fn handle<B>(&self, mut req: Request<B>) -> Response<Full<Bytes>> {
        let Some(key) = upgrade_key(&req) else {
            return plain(StatusCode::BAD_REQUEST, "expected a WebSocket upgrade (GET with Upgrade: websocket)");
        };
        if req.headers().get(header::SEC_WEBSOCKET_VERSION).is_none_or(|v| v != "13") {
            let mut res = plain(StatusCode::UPGRADE_REQUIRED, "unsupported WebSocket version");
            res.headers_mut().insert(header::SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
            return res;
        }
        let (offers_phoenix, auth_token) = subprotocols(req.headers());
        let mut info = ConnectInfo::new("websocket", true).with_query(req.uri().query());
        info.auth_token = auth_token;
        info.peer_addr = req.extensions().get::<PeerAddr>().map(|p| p.0);
        info.headers = std::mem::take(req.headers_mut());

        let session = match self.endpoint.connect(info).await {
            Ok(session) => session,
            Err(ConnectError::ShuttingDown) => {
                return plain(StatusCode::SERVICE_UNAVAILABLE, "shutting down");
            }
            Err(ConnectError::RateLimited { retry_after, .. }) => {
                let mut res = plain(StatusCode::TOO_MANY_REQUESTS, "too many connects from this address");
                res.headers_mut().insert(header::RETRY_AFTER, retry_after_secs(retry_after));
                return res;
            }
            Err(e) => {
                tracing::info!(error = %e, "websocket connect refused");
                return plain(StatusCode::FORBIDDEN, "forbidden");
            }
        };

        let on_upgrade = hyper::upgrade::on(&mut req);
        let config = self.options.tungstenite(self.endpoint.config().max_frame_size);
        let write_buffer_size = self.options.write_buffer_size;
        tokio::spawn(async move {
            match on_upgrade.await {
                Ok(upgraded) => {
                    // A batch's frames go out in one system call (up to the batch's size).
                    let io = Coalesce::new(TokioIo::new(upgraded), connection::BATCH_BYTES, write_buffer_size);
                    let ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await;
                    // A task of its own: what this one held while upgrading is freed, and a
                    // connection's task holds only what the connection needs.
                    tokio::spawn(connection::run(ws, session));
                }
                Err(e) => tracing::debug!(error = %e, "websocket upgrade failed"),
            }
        });

        let mut res = Response::new(Full::new(Bytes::new()));
        *res.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let h = res.headers_mut();
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        if let Ok(accept) = HeaderValue::from_str(&derive_accept_key(key.as_bytes())) {
            h.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
        }
        if offers_phoenix {
            h.insert(header::SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static("phoenix"));
        }
        res
    }
}

impl<B: Send + 'static> tower_service::Service<Request<B>> for WebSocketService {
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

/// The `Sec-WebSocket-Key` of a valid upgrade request.
fn upgrade_key<B>(req: &Request<B>) -> Option<String> {
    let h = req.headers();
    let has_token = |name, token: &str| {
        h.get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    (req.method() == Method::GET && has_token(header::CONNECTION, "upgrade") && has_token(header::UPGRADE, "websocket"))
        .then(|| h.get(header::SEC_WEBSOCKET_KEY)?.to_str().ok().map(str::to_owned))
        .flatten()
}

/// Whether the client offered the `phoenix` subprotocol, and the bearer token it carried.
fn subprotocols(h: &HeaderMap) -> (bool, Option<String>) {
    let mut phoenix = false;
    let mut token = None;
    for offer in
        h.get_all(header::SEC_WEBSOCKET_PROTOCOL).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(','))
    {
        let offer = offer.trim();
        if offer == "phoenix" {
            phoenix = true;
        } else if let Some(encoded) = offer.strip_prefix(BEARER_PREFIX) {
            token = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(encoded.trim_end_matches('='))
                .ok()
                .and_then(|bytes| String::from_utf8(bytes).ok());
        }
    }
    (phoenix, token)
}

/// `Retry-After` in whole seconds, rounded up.
fn retry_after_secs(d: std::time::Duration) -> HeaderValue {
    HeaderValue::from(d.as_secs() + u64::from(d.subsec_nanos() > 0))
}

fn plain(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut res = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *res.status_mut() = status;
    res.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    res
}
