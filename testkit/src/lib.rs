//! The Phoenix Channels conformance scenarios any Fawkes transport runs in its tests.
//!
//! A transport author writes a small client-side adapter, [`Transport`] (open a connection with
//! connect params) and [`Connection`] (send frames, receive frames, close), and calls [`run`]
//! with a function that serves a given [`Endpoint`] over the transport. The kit then plays the
//! scenarios of the protocol's conformance checklist against it, each on a fresh endpoint whose
//! router has the `test:*` channel ([`TestChannel`]): joins and refusals, replies, broadcasts
//! between two clients, server pushes, leave and `phx_close`, duplicate joins, heartbeats and the
//! idle close, crashes and `phx_error`, binary frames, a burst of 1,000 pushes in order, malformed
//! input and a server-initiated close.
//!
//! A failure panics with the scenario's name and what was expected on the wire, e.g.
//! ``scenario `leave` (lines): expected phx_close of join_ref "3" ["3","3","test:leave","phx_close",{}], got ...``.
//! Scenarios a transport cannot carry are skipped because its [`Capabilities`] say so, and
//! listed in the returned [`Report`] (and on stderr), never silently.
//!
//! ```
//! use fawkes_channel::{CloseReason, ConnectInfo, Endpoint, Frame, Outbound, Session};
//! use fawkes_testkit::{Capabilities, Connection, Received, Refused, Transport};
//!
//! /// An in-memory "transport": the peer drives a session directly.
//! struct Memory(Endpoint);
//! /// The session is dropped once closed, as a transport drops it when its peer is gone.
//! struct MemoryConn(Option<Session>, Outbound);
//!
//! impl Transport for Memory {
//!     type Connection = MemoryConn;
//!     async fn connect(&self, params: &[(&str, &str)]) -> Result<MemoryConn, Refused> {
//!         let query: Vec<String> = params.iter().map(|(k, v)| format!("{k}={v}")).collect();
//!         let info = ConnectInfo::new("memory", true).with_query(Some(&query.join("&")));
//!         let session = self.0.connect(info).await.map_err(|e| Refused(e.to_string()))?;
//!         let outbound = session.outbound();
//!         Ok(MemoryConn(Some(session), outbound))
//!     }
//! }
//!
//! impl Connection for MemoryConn {
//!     async fn send(&mut self, frames: Vec<Frame>) {
//!         for frame in frames {
//!             let Some(session) = &mut self.0 else { return };
//!             if session.handle_frame(frame).await.is_err() {
//!                 return;
//!             }
//!         }
//!     }
//!     async fn recv(&mut self) -> Received {
//!         match self.1.recv().await {
//!             Ok(frame) => Received::Frame(frame),
//!             Err(reason) => {
//!                 self.0 = None;
//!                 Received::Closed(reason.to_string())
//!             }
//!         }
//!     }
//!     async fn close(&mut self) {
//!         self.1.close(CloseReason::TransportClosed);
//!         self.0 = None;
//!     }
//! }
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let report = fawkes_testkit::run("memory", Capabilities::all(), |endpoint| async move { Memory(endpoint) }).await;
//! assert!(report.skipped.iter().all(|(name, _)| *name == "binary_as_text"));
//! # });
//! ```
#![forbid(unsafe_code)]

mod channel;
#[cfg(feature = "cluster")]
pub mod cluster;
mod scenarios;
#[cfg(feature = "tls")]
pub mod tls;

use std::fmt;
use std::future::Future;
use std::time::Duration;

use fawkes_channel::{Config, Endpoint, Frame, Router};

pub use channel::{BINARY, TestChannel, connect};

/// The client side of a transport under test: opens connections to the server it was made for.
///
/// See the [crate example](crate) for a complete adapter.
pub trait Transport: Send + Sync {
    /// One open connection.
    type Connection: Connection;

    /// Opens a connection with these connect params (the first is always `vsn`, `2.0.0`: the
    /// kit speaks V2 JSON and, where the transport carries them, V2 binary frames). A transport
    /// that sends params to the server passes them all (e.g. as the URL's query string); one
    /// that cannot declares so in [`Capabilities::connect_params`].
    ///
    /// `Err` when the server refused the connection (HTTP 403, a 403 status in a long-poll
    /// envelope, ...), with what the server answered.
    fn connect(&self, params: &[(&str, &str)]) -> impl Future<Output = Result<Self::Connection, Refused>> + Send;
}

/// One open connection of a [`Transport`] under test.
///
/// ```
/// use fawkes_channel::Frame;
/// use fawkes_testkit::{Connection, Received};
/// use tokio::sync::mpsc;
///
/// /// A connection over two in-process queues.
/// struct Queues(mpsc::Sender<Frame>, mpsc::Receiver<Frame>);
///
/// impl Connection for Queues {
///     async fn send(&mut self, frames: Vec<Frame>) {
///         for frame in frames {
///             let _ = self.0.send(frame).await;
///         }
///     }
///     async fn recv(&mut self) -> Received {
///         match self.1.recv().await {
///             Some(frame) => Received::Frame(frame),
///             None => Received::Closed("queue closed".into()),
///         }
///     }
///     async fn close(&mut self) {
///         self.1.close();
///     }
/// }
/// ```
pub trait Connection: Send {
    /// Sends frames, in order (as one batch where the transport batches, e.g. one ndjson POST).
    /// A connection that is closed drops them: [`Connection::recv`] tells.
    fn send(&mut self, frames: Vec<Frame>) -> impl Future<Output = ()> + Send;

    /// The next frame from the server, or [`Received::Closed`] once the server closed the
    /// connection (a close frame, a `410` long-poll answer, the end of a stream, ...). The kit
    /// bounds the wait itself; a recv is only cancelled when a scenario has failed.
    fn recv(&mut self) -> impl Future<Output = Received> + Send;

    /// Closes the connection from the client's side.
    fn close(&mut self) -> impl Future<Output = ()> + Send;
}

/// What a [`Connection`] received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Received {
    /// A frame from the server.
    Frame(Frame),
    /// The server closed the connection; how it said so (a close code, a status).
    Closed(String),
}

/// A connection the server refused, with what it answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused(pub String);

/// What a transport can carry. Scenarios that need what it lacks are skipped, and reported.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Capabilities {
    /// Binary frames (the V2 binary layout) both ways.
    pub binary_frames: bool,
    /// A socket that sends nothing for the heartbeat timeout is closed (transports whose
    /// clients show they are alive other than by frames, like long-poll, keep sockets open).
    pub idle_close: bool,
    /// Connect params reach the server's connect callback, so it can refuse a connection.
    pub connect_params: bool,
    /// How long to wait for each expected frame or close.
    pub wait: Duration,
}

impl Capabilities {
    /// Everything: binary frames, idle close, connect params; a 5 s wait.
    pub fn all() -> Capabilities {
        Capabilities { binary_frames: true, idle_close: true, connect_params: true, wait: Duration::from_secs(5) }
    }
    /// Binary payloads reach this transport's clients as text (`{"binary": "<base64>"}`).
    pub fn without_binary_frames(mut self) -> Self {
        self.binary_frames = false;
        self
    }
    /// Idle sockets are not closed by the heartbeat timeout.
    pub fn without_idle_close(mut self) -> Self {
        self.idle_close = false;
        self
    }
    /// The transport carries no connect params (so no refusal can be asked for).
    pub fn without_connect_params(mut self) -> Self {
        self.connect_params = false;
        self
    }
    /// Sets [`Capabilities::wait`].
    pub fn wait(mut self, wait: Duration) -> Self {
        self.wait = wait;
        self
    }
}

/// What a [`run`] did: scenarios passed, and scenarios skipped with the reason.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Scenarios that ran and passed.
    pub passed: Vec<&'static str>,
    /// Scenarios skipped, with the missing capability.
    pub skipped: Vec<(&'static str, &'static str)>,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} passed, {} skipped", self.passed.len(), self.skipped.len())?;
        for (name, why) in &self.skipped {
            write!(f, "; `{name}` skipped: {why}")?;
        }
        Ok(())
    }
}

/// Every scenario, in the order [`run`] plays them.
pub const SCENARIOS: &[&str] = &[
    "join",
    "refused_connect",
    "join_refused",
    "replies",
    "unmatched_topic",
    "broadcast",
    "server_push",
    "leave",
    "duplicate_join",
    "heartbeat",
    "idle_close",
    "crash",
    "binary",
    "binary_as_text",
    "burst",
    "malformed",
    "server_close",
];

/// The heartbeat timeout of the `idle_close` scenario's endpoint.
pub const IDLE_TIMEOUT: Duration = Duration::from_millis(400);

/// An endpoint with the `test:*` channel and the kit's connect callback ([`connect`]).
pub fn endpoint(config: Config) -> Endpoint {
    Endpoint::builder()
        .router(Router::new().channel("test:*", TestChannel::default))
        .config(config)
        .on_connect(connect)
        .build()
}

/// Plays every scenario against a transport. For each one, the kit builds a fresh endpoint,
/// calls `serve` with it (start a server for it and return the client side; drop the server
/// when the returned value is dropped), and drives clients from that [`Transport`].
///
/// Set `FAWKES_KIT_ONLY` to a scenario's name to play only that one.
///
/// # Panics
/// When a scenario fails, naming it and what was expected on the wire.
pub async fn run<F, Fut, T>(transport: &str, capabilities: Capabilities, mut serve: F) -> Report
where
    F: FnMut(Endpoint) -> Fut,
    Fut: Future<Output = T>,
    T: Transport,
{
    let only = std::env::var("FAWKES_KIT_ONLY").ok();
    let mut report = Report::default();
    for &name in SCENARIOS {
        if only.as_deref().is_some_and(|only| only != name) {
            continue;
        }
        if let Some(why) = skip_reason(name, &capabilities) {
            eprintln!("fawkes-testkit {transport}: scenario `{name}` skipped: {why}");
            report.skipped.push((name, why));
            continue;
        }
        let config =
            if name == "idle_close" { Config::default().heartbeat_timeout(IDLE_TIMEOUT) } else { Config::default() };
        let endpoint = endpoint(config);
        let server = serve(endpoint.clone()).await;
        let ctx = scenarios::Ctx { scenario: name, transport, caps: &capabilities, endpoint: &endpoint };
        scenarios::play(&ctx, &server).await;
        drop(server);
        eprintln!("fawkes-testkit {transport}: scenario `{name}` ok");
        report.passed.push(name);
    }
    report
}

fn skip_reason(name: &str, caps: &Capabilities) -> Option<&'static str> {
    match name {
        "refused_connect" if !caps.connect_params => Some("the transport carries no connect params"),
        "idle_close" if !caps.idle_close => {
            Some("the transport keeps idle sockets open (clients show they are alive without frames)")
        }
        "binary" if !caps.binary_frames => Some("the transport carries no binary frames"),
        "binary_as_text" if caps.binary_frames => Some("the transport carries binary frames (see `binary`)"),
        _ => None,
    }
}
