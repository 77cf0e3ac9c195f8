//! Connecting a socket: what the transport tells, what the application decides.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;

use fawkes_serializer::{Serializer, UnsupportedVsn};

/// The peer's address, carried in an HTTP request's extensions: the server that accepts the
/// connection inserts it (`fawkes_server::serve` does), and HTTP
/// transports read it into [`ConnectInfo::peer_addr`], which
/// [`Config::max_connections_per_ip`](crate::Config) counts by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerAddr(pub SocketAddr);

/// What a transport knows about a connecting client, handed to the connect callback.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct ConnectInfo {
    /// The transport's name: `"websocket"`, `"longpoll"`, ...
    pub transport: &'static str,
    /// The connect params (the query string, without `vsn`).
    pub params: HashMap<String, String>,
    /// The requested serializer version (`vsn`), if any.
    pub vsn: Option<String>,
    /// The bearer token the client offered (phoenix.js `authToken`), decoded.
    pub auth_token: Option<String>,
    /// The HTTP request headers, where the transport has them.
    pub headers: http::HeaderMap,
    /// The peer's address, where known.
    pub peer_addr: Option<SocketAddr>,
    /// Whether the transport can carry binary frames (else binary payloads go as base64 text).
    pub binary_frames: bool,
}

impl ConnectInfo {
    /// Connect info for `transport`, which carries binary frames when `binary_frames` is set.
    pub fn new(transport: &'static str, binary_frames: bool) -> ConnectInfo {
        ConnectInfo { transport, binary_frames, ..ConnectInfo::default() }
    }

    /// Fills `params` and `vsn` from a URL query string.
    pub fn with_query(mut self, query: Option<&str>) -> ConnectInfo {
        for (k, v) in parse_query(query.unwrap_or("")) {
            if k == "vsn" {
                self.vsn = Some(v);
            } else {
                self.params.insert(k, v);
            }
        }
        self
    }
}

/// Parses `a=1&b=x%20y` into pairs, decoding `%XX` and `+`. Invalid escapes are kept as text.
pub fn parse_query(query: &str) -> impl Iterator<Item = (String, String)> + '_ {
    query.split('&').filter(|p| !p.is_empty()).map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(k), percent_decode(v))
    })
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The connect callback's yes: what to attach to the socket.
#[derive(Debug, Default)]
pub struct Accept {
    pub(crate) assigns: http::Extensions,
    pub(crate) id: Option<String>,
}

impl Accept {
    /// Accept with nothing assigned.
    pub fn new() -> Accept {
        Accept::default()
    }

    /// Assigns a value, readable by type from every channel of the socket
    /// ([`SocketRef::assign`](crate::SocketRef::assign)).
    pub fn assign<T: Clone + Send + Sync + 'static>(mut self, value: T) -> Accept {
        self.assigns.insert(value);
        self
    }

    /// Names the socket (e.g. `"user_socket:42"`), so the application can
    /// [`disconnect`](crate::Endpoint::disconnect) every socket of that id.
    pub fn id(mut self, id: impl Into<String>) -> Accept {
        self.id = Some(id.into());
        self
    }
}

/// Why a socket could not connect. Transports answer all of these as a refusal (HTTP 403 for
/// WebSocket and long-poll), except `ShuttingDown`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The application's connect callback refused the socket.
    #[error("connection refused: {0}")]
    Refused(String),
    /// The client asked for a serializer version this server does not speak.
    #[error(transparent)]
    UnsupportedVsn(#[from] UnsupportedVsn),
    /// The request's `Origin` is not allowed by [`Config::check_origin`](crate::Config).
    #[error("origin not allowed: {0}")]
    Origin(String),
    /// The endpoint is shutting down.
    #[error("endpoint is shutting down")]
    ShuttingDown,
    /// The peer's IP address already holds [`Config::max_connections_per_ip`](crate::Config) sockets.
    #[error("too many connections from {0}")]
    TooManyConnections(std::net::IpAddr),
    /// The peer's IP address opened sockets faster than [`Config::connect_rate`](crate::Config)
    /// allows. Transports answer `429` with `Retry-After`.
    #[error("too many connects from {ip}; retry after {retry_after:?}")]
    RateLimited {
        /// The peer's address.
        ip: std::net::IpAddr,
        /// When the next connect would be allowed.
        retry_after: std::time::Duration,
    },
}

impl ConnectError {
    /// A refusal with a reason for the logs (the client only sees 403).
    pub fn refused(reason: impl Into<String>) -> ConnectError {
        ConnectError::Refused(reason.into())
    }
}

/// Decides whether a socket may connect, from its params, headers and token.
///
/// ```
/// use fawkes_channel::{Accept, ConnectError, ConnectInfo, SocketHandler};
///
/// #[derive(Clone)]
/// struct UserId(String);
///
/// struct TokenAuth;
/// impl SocketHandler for TokenAuth {
///     async fn connect(&self, info: &ConnectInfo) -> Result<Accept, ConnectError> {
///         match info.auth_token.as_deref() {
///             Some(token) if token.starts_with("user:") => {
///                 Ok(Accept::new().assign(UserId(token[5..].to_owned())).id(token))
///             }
///             _ => Err(ConnectError::refused("no valid token")),
///         }
///     }
/// }
/// ```
pub trait SocketHandler: Send + Sync + 'static {
    /// Accepts or refuses a connecting socket.
    fn connect(&self, info: &ConnectInfo) -> impl Future<Output = Result<Accept, ConnectError>> + Send;
}

/// A [`SocketHandler`] from a plain function.
pub struct ConnectFn<F>(pub F);

impl<F> fmt::Debug for ConnectFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ConnectFn")
    }
}

impl<F> SocketHandler for ConnectFn<F>
where
    F: Fn(&ConnectInfo) -> Result<Accept, ConnectError> + Send + Sync + 'static,
{
    async fn connect(&self, info: &ConnectInfo) -> Result<Accept, ConnectError> {
        (self.0)(info)
    }
}

pub(crate) type ConnectFuture<'a> = Pin<Box<dyn Future<Output = Result<Accept, ConnectError>> + Send + 'a>>;

pub(crate) trait DynSocketHandler: Send + Sync {
    fn connect<'a>(&'a self, info: &'a ConnectInfo) -> ConnectFuture<'a>;
}

impl<H: SocketHandler> DynSocketHandler for H {
    fn connect<'a>(&'a self, info: &'a ConnectInfo) -> ConnectFuture<'a> {
        Box::pin(SocketHandler::connect(self, info))
    }
}

/// Per-socket facts shared by the session and its channels.
#[derive(Debug)]
pub(crate) struct SocketInfo {
    pub(crate) serializer: Serializer,
    pub(crate) transport: &'static str,
    pub(crate) assigns: http::Extensions,
    pub(crate) id: Option<String>,
}
