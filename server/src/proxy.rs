//! The connect and join hooks: `fawkes serve` asks the application's backend over HTTP whether
//! a socket may connect (`proxy.connect_url`) and whether it may join a topic
//! (`proxy.join_url`), as Centrifugo's proxy and AnyCable's RPC do.
//!
//! Each hook is a `POST` with `Content-Type: application/json`. The connect hook's body:
//!
//! ```json
//! {"transport": "websocket", "params": {"room": "1"}, "headers": {"cookie": "..."}, "user": "ann"}
//! ```
//!
//! `params` are the connect params (without `token` and `vsn`), `headers` the request's
//! [`FORWARDED_HEADERS`] that were sent, `user` the token's `sub` (`null` without a token or
//! without JWT). The join hook's body adds the topic, the join params and what the connect hook
//! assigned:
//!
//! ```json
//! {"topic": "chat:lobby", "params": {"since": null}, "headers": {...}, "user": "ann", "data": {...}}
//! ```
//!
//! The backend answers `200` with a JSON object:
//!
//! - allow: `{"result": {}}`, optionally with fields. Connect: `user` (the user id, used when no
//!   token named one), `channels` (patterns, as the token's claim), `data` (any JSON, handed to
//!   the join hook and put in the user's Presence metas as `data`). Join: `data` (the join
//!   reply's response; default `{}`).
//! - deny: `{"error": {"message": "..."}}`. A denied connect is answered 403; a denied join the
//!   error `{"reason": "unauthorized"}`.
//!
//! Any other answer (another status, a body that is neither), a backend that cannot be reached,
//! or no answer within `proxy.timeout` (default 5 s) refuses safely, the same way, and is logged
//! and counted (`fawkes_hook_requests_total{hook, outcome}`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::http::{HeaderMap, Method, Request, StatusCode, Uri, header};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Request headers passed to the hooks, when the client sent them. Others (the WebSocket
/// handshake's, `authorization`) are not.
pub const FORWARDED_HEADERS: &[&str] =
    &["cookie", "origin", "user-agent", "accept-language", "referer", "x-forwarded-for", "x-real-ip"];

/// Largest hook answer read.
const MAX_ANSWER: usize = 64 * 1024;

/// The forwarded subset of `headers`, as a JSON object of strings.
pub fn forwarded_headers(headers: &HeaderMap) -> Map<String, Value> {
    FORWARDED_HEADERS
        .iter()
        .filter_map(|name| {
            let value = headers.get(*name)?.to_str().ok()?;
            Some(((*name).to_owned(), Value::String(value.to_owned())))
        })
        .collect()
}

/// Why a hook did not allow.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The backend answered deny.
    #[error("denied by the hook: {0}")]
    Denied(String),
    /// No answer in time.
    #[error("the hook did not answer within {0:?}")]
    Timeout(Duration),
    /// The backend could not be reached, or answered something else than allow or deny.
    #[error("the hook failed: {0}")]
    Failed(String),
}

/// The connect hook's request body.
#[derive(Debug, Serialize)]
pub struct ConnectRequest<'a> {
    /// `websocket`, `longpoll`, `sse`, ...
    pub transport: &'a str,
    /// Connect params.
    pub params: &'a Map<String, Value>,
    /// Forwarded headers.
    pub headers: &'a Map<String, Value>,
    /// The token's user, if any.
    pub user: Option<&'a str>,
}

/// The join hook's request body.
#[derive(Debug, Serialize)]
pub struct JoinRequest<'a> {
    /// The topic.
    pub topic: &'a str,
    /// Join params.
    pub params: &'a Value,
    /// Forwarded headers of the connect request.
    pub headers: &'a Map<String, Value>,
    /// The socket's user, if any.
    pub user: Option<&'a str>,
    /// What the connect hook assigned.
    pub data: Option<&'a Value>,
}

/// What an allowing connect hook assigned.
#[derive(Debug, Default, Deserialize)]
pub struct ConnectResult {
    /// The user id.
    #[serde(default)]
    pub user: Option<String>,
    /// Topic patterns, as the token's `channels` claim.
    #[serde(default)]
    pub channels: Option<Vec<String>>,
    /// Data to assign.
    #[serde(default)]
    pub data: Option<Value>,
}

/// What an allowing join hook answered.
#[derive(Debug, Default, Deserialize)]
pub struct JoinResult {
    /// The join reply's response.
    #[serde(default)]
    pub data: Option<Value>,
}

#[derive(Deserialize)]
struct Answer<T> {
    #[serde(default)]
    result: Option<T>,
    #[serde(default)]
    error: Option<Value>,
}

#[derive(Debug, Default)]
struct HookStats {
    allowed: AtomicU64,
    denied: AtomicU64,
    timeout: AtomicU64,
    failed: AtomicU64,
}

/// The hooks' addresses and timeout. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Proxy(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    connect: Option<Uri>,
    join: Option<Uri>,
    timeout: Duration,
    connect_stats: HookStats,
    join_stats: HookStats,
}

/// Checks a hook URL: `http://HOST[:PORT]/PATH`.
pub fn parse_url(url: &str) -> Result<Uri, String> {
    let uri: Uri = url.parse().map_err(|e| format!("{url:?}: {e}; expected http://HOST[:PORT]/PATH"))?;
    if uri.scheme_str() != Some("http") || uri.host().is_none() {
        return Err(format!("{url:?}: expected http://HOST[:PORT]/PATH (the hook is a backend next to the server)"));
    }
    Ok(uri)
}

impl Proxy {
    /// Hooks at `connect` and `join` (either may be absent), each answering within `timeout`.
    pub fn new(connect: Option<Uri>, join: Option<Uri>, timeout: Duration) -> Proxy {
        Proxy(Arc::new(Inner {
            connect,
            join,
            timeout,
            connect_stats: HookStats::default(),
            join_stats: HookStats::default(),
        }))
    }

    /// Whether a connect hook is set.
    pub fn has_connect(&self) -> bool {
        self.0.connect.is_some()
    }

    /// Whether a join hook is set.
    pub fn has_join(&self) -> bool {
        self.0.join.is_some()
    }

    /// Asks the connect hook.
    pub async fn connect(&self, request: &ConnectRequest<'_>) -> Result<ConnectResult, ProxyError> {
        let Some(url) = &self.0.connect else { return Ok(ConnectResult::default()) };
        self.ask(url, request, &self.0.connect_stats, "connect").await
    }

    /// Asks the join hook.
    pub async fn join(&self, request: &JoinRequest<'_>) -> Result<JoinResult, ProxyError> {
        let Some(url) = &self.0.join else { return Ok(JoinResult::default()) };
        self.ask(url, request, &self.0.join_stats, "join").await
    }

    async fn ask<T: serde::de::DeserializeOwned + Default>(
        &self,
        url: &Uri,
        request: &impl Serialize,
        stats: &HookStats,
        hook: &'static str,
    ) -> Result<T, ProxyError> {
        let body = serde_json::to_vec(request).map_err(|e| ProxyError::Failed(e.to_string()))?;
        let answer = match tokio::time::timeout(self.0.timeout, post(url, body)).await {
            Ok(Ok((StatusCode::OK, body))) => match serde_json::from_slice::<Answer<T>>(&body) {
                Ok(Answer { result: Some(result), error: None }) => Ok(result),
                Ok(Answer { result: None, error: Some(error) }) => {
                    let message = error.get("message").and_then(Value::as_str).unwrap_or("no message");
                    Err(ProxyError::Denied(message.to_owned()))
                }
                Ok(_) => Err(ProxyError::Failed("expected {\"result\": {...}} or {\"error\": {...}}".into())),
                Err(e) => Err(ProxyError::Failed(format!("unreadable answer: {e}"))),
            },
            Ok(Ok((status, _))) => Err(ProxyError::Failed(format!("status {status}"))),
            Ok(Err(e)) => Err(ProxyError::Failed(e)),
            Err(_) => Err(ProxyError::Timeout(self.0.timeout)),
        };
        let counter = match &answer {
            Ok(_) => &stats.allowed,
            Err(ProxyError::Denied(_)) => &stats.denied,
            Err(ProxyError::Timeout(_)) => &stats.timeout,
            Err(ProxyError::Failed(_)) => &stats.failed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if let Err(e @ (ProxyError::Timeout(_) | ProxyError::Failed(_))) = &answer {
            tracing::warn!(hook, url = %url, error = %e, "hook failed: refused");
        }
        answer
    }

    /// Prometheus text for the hooks' counters.
    pub fn prometheus(&self) -> String {
        let mut out = String::from(
            "# HELP fawkes_hook_requests_total Requests to the connect and join hooks, by outcome.\n\
             # TYPE fawkes_hook_requests_total counter\n",
        );
        for (hook, stats) in [("connect", &self.0.connect_stats), ("join", &self.0.join_stats)] {
            for (outcome, n) in [
                ("allowed", &stats.allowed),
                ("denied", &stats.denied),
                ("timeout", &stats.timeout),
                ("failed", &stats.failed),
            ] {
                out.push_str(&format!(
                    "fawkes_hook_requests_total{{hook=\"{hook}\",outcome=\"{outcome}\"}} {}\n",
                    n.load(Ordering::Relaxed)
                ));
            }
        }
        out
    }
}

/// One `POST` on a fresh HTTP/1.1 connection: the status and at most [`MAX_ANSWER`] bytes of body.
async fn post(url: &Uri, body: Vec<u8>) -> Result<(StatusCode, Bytes), String> {
    let host = url.host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']');
    let port = url.port_u16().unwrap_or(80);
    let stream = tokio::net::TcpStream::connect((host, port)).await.map_err(|e| format!("{host}:{port}: {e}"))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
    let conn = tokio::spawn(conn);
    let authority = url.authority().map_or(host.to_owned(), |a| a.to_string());
    let request = Request::builder()
        .method(Method::POST)
        .uri(url.path_and_query().map_or("/", |p| p.as_str()))
        .header(header::HOST, authority)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::ACCEPT, "application/json")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    let response = sender.send_request(request).await.map_err(|e| e.to_string());
    let result = match response {
        Ok(response) => {
            let status = response.status();
            match Limited::new(response.into_body(), MAX_ANSWER).collect().await {
                Ok(body) => Ok((status, body.to_bytes())),
                Err(e) => Err(format!("reading the answer: {e}")),
            }
        }
        Err(e) => Err(e),
    };
    conn.abort();
    result
}
