//! The endpoint: router, config, PubSub and connect callback, and every live socket.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use fawkes_serializer::Serializer;
use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::config::Config;
use crate::history::{History, HistoryOptions, HistoryStore};
use crate::metrics::EndpointStats;
use crate::outbox::{CloseReason, Outbox, OutboxLimits};
use crate::pubsub::PubSub;
use crate::registry::{Live, REGISTRY_SHARDS, Shared};
use crate::router::Router;
use crate::session::Session;
use crate::socket::{Accept, ConnectError, ConnectFn, ConnectInfo, DynSocketHandler, SocketHandler, SocketInfo};

/// Everything a transport needs to turn a connection into a [`Session`]. Cheap to clone.
///
/// ```
/// use fawkes_channel::{Accept, ConnectError, ConnectInfo, Endpoint, Router};
///
/// let endpoint = Endpoint::builder()
///     .router(Router::new())
///     .on_connect(|info: &ConnectInfo| {
///         if info.params.get("token").map(String::as_str) == Some("secret") {
///             Ok(Accept::new())
///         } else {
///             Err(ConnectError::refused("bad token"))
///         }
///     })
///     .build();
/// assert_eq!(endpoint.connected(), 0);
/// ```
#[derive(Clone)]
pub struct Endpoint(pub(crate) Arc<Shared>);

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Endpoint")
            .field("router", &self.0.router)
            .field("connected", &self.connected())
            .finish_non_exhaustive()
    }
}

/// Builds an [`Endpoint`].
#[must_use]
pub struct EndpointBuilder {
    router: Router,
    config: Config,
    pubsub: Option<PubSub>,
    handler: Box<dyn DynSocketHandler>,
    histories: Vec<(String, HistoryOptions)>,
    history_store: Option<Arc<dyn HistoryStore>>,
}

impl fmt::Debug for EndpointBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EndpointBuilder").field("router", &self.router).finish_non_exhaustive()
    }
}

impl EndpointBuilder {
    /// The channels to route joins to.
    pub fn router(mut self, router: Router) -> Self {
        self.router = router;
        self
    }
    /// Limits and timeouts.
    pub fn config(mut self, config: Config) -> Self {
        self.config = config;
        self
    }
    /// The PubSub (default: a single-node one).
    pub fn pubsub(mut self, pubsub: PubSub) -> Self {
        self.pubsub = Some(pubsub);
        self
    }
    /// Topics matching `pattern` (an exact topic or a prefix followed by `*`) keep a history of
    /// their broadcasts, so joins can recover what a client missed (see [`History`]).
    pub fn history(mut self, pattern: &str, options: HistoryOptions) -> Self {
        self.histories.push((pattern.to_owned(), options));
        self
    }
    /// Where histories are kept (default: a [`MemoryHistory`](crate::MemoryHistory)).
    pub fn history_store(mut self, store: impl HistoryStore) -> Self {
        self.history_store = Some(Arc::new(store));
        self
    }
    /// The connect callback (default: accept everyone).
    pub fn socket_handler(mut self, handler: impl SocketHandler) -> Self {
        self.handler = Box::new(handler);
        self
    }
    /// A synchronous connect callback.
    pub fn on_connect<F>(self, f: F) -> Self
    where
        F: Fn(&ConnectInfo) -> Result<Accept, ConnectError> + Send + Sync + 'static,
    {
        self.socket_handler(ConnectFn(f))
    }
    /// The endpoint.
    pub fn build(self) -> Endpoint {
        let pubsub = self.pubsub.unwrap_or_default();
        let histories =
            self.histories.iter().map(|(p, o)| (&**p, o)).chain(self.router.histories.iter().map(|(p, o)| (&**p, o)));
        if histories.clone().next().is_some() || self.history_store.is_some() {
            let history = pubsub.history();
            if let Some(store) = self.history_store {
                history.set_store(store);
            }
            for (pattern, options) in histories {
                history.keep(pattern, *options);
            }
        }
        Endpoint(Arc::new(Shared {
            router: self.router,
            config: self.config,
            pubsub,
            handler: self.handler,
            live: (0..REGISTRY_SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            next_id: AtomicU64::new(1),
            shutting_down: AtomicBool::new(false),
            live_count: AtomicUsize::new(0),
            drained: Notify::new(),
            per_ip: Mutex::new(HashMap::new()),
            connects: Mutex::new(HashMap::new()),
            counters: Arc::default(),
        }))
    }
}

impl Endpoint {
    /// Starts building an endpoint.
    pub fn builder() -> EndpointBuilder {
        EndpointBuilder {
            router: Router::new(),
            config: Config::default(),
            pubsub: None,
            handler: Box::new(ConnectFn(|_: &ConnectInfo| Ok(Accept::new()))),
            histories: Vec::new(),
            history_store: None,
        }
    }

    /// An endpoint with default config and an accept-all connect callback.
    pub fn new(router: Router) -> Endpoint {
        Endpoint::builder().router(router).build()
    }

    /// Connects a socket: picks the serializer from `vsn`, runs the connect callback, and returns
    /// the session the transport drives.
    pub async fn connect(&self, info: ConnectInfo) -> Result<Session, ConnectError> {
        if self.0.shutting_down.load(Ordering::Acquire) {
            return Err(ConnectError::ShuttingDown);
        }
        if !self.0.config.check_origin.allows(&info.headers) {
            let origin = info.headers.get(http::header::ORIGIN).and_then(|o| o.to_str().ok()).unwrap_or("?");
            return Err(ConnectError::Origin(origin.to_owned()));
        }
        let mut serializer = Serializer::from_vsn(info.vsn.as_deref())?;
        if !info.binary_frames {
            serializer = serializer.text_only();
        }
        // Counted before the connect callback runs, so a peer past its limit costs no callback.
        self.connect_token(info.peer_addr.map(|a| a.ip()))?;
        let slot = IpSlot::take(self, info.peer_addr.map(|a| a.ip()))?;
        let accept = self.0.handler.connect(&info).await?;
        let id = self.0.next_id.fetch_add(1, Ordering::Relaxed);
        let config = &self.0.config;
        let flow = self.0.counters.flow(info.transport);
        let limits = OutboxLimits {
            frames: config.outbound_queue_limit,
            bytes: config.outbound_byte_limit,
            policy: config.slow_consumer,
        };
        let outbox = Outbox::new(id, limits, self.0.counters.clone(), flow);
        outbox.touch();
        let socket =
            Arc::new(SocketInfo { serializer, transport: info.transport, assigns: accept.assigns, id: accept.id });
        let ip = slot.keep();
        self.0.shard(id).lock().insert(id, Live { outbox: outbox.clone(), info: socket.clone(), ip });
        self.0.live_count.fetch_add(1, Ordering::AcqRel);
        tracing::debug!(socket = id, transport = info.transport, serializer = serializer.name(), "socket connected");
        Ok(Session::new(self.0.clone(), outbox, socket))
    }

    /// The endpoint's PubSub, to broadcast from outside any channel.
    pub fn pubsub(&self) -> &PubSub {
        &self.0.pubsub
    }

    /// Topics' histories: broadcast from server code with a position.
    pub fn history(&self) -> History {
        self.0.pubsub.history()
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.0.config
    }

    /// What the endpoint has counted since it was built: joins and refusals by reason, messages
    /// in and out by transport, slow consumers.
    pub fn stats(&self) -> EndpointStats {
        self.0.counters.snapshot()
    }

    /// Number of connected sockets.
    pub fn connected(&self) -> usize {
        self.0.live_count.load(Ordering::Acquire)
    }

    /// Waits until no socket is connected (after [`Endpoint::shutdown`], until every transport
    /// has closed its sockets).
    pub async fn drained(&self) {
        loop {
            let notified = self.0.drained.notified();
            if self.connected() == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Closes every socket whose connect callback gave it `id`. Returns how many.
    pub fn disconnect(&self, id: &str) -> usize {
        self.close_where(|live| live.info.id.as_deref() == Some(id), CloseReason::Disconnected)
    }

    /// Refuses new sockets and closes every live one with [`CloseReason::Shutdown`]; transports
    /// tell their peers (WebSocket close 1001).
    pub fn shutdown(&self) -> usize {
        self.0.shutting_down.store(true, Ordering::Release);
        self.close_where(|_| true, CloseReason::Shutdown)
    }

    /// Refuses new sockets, as [`Endpoint::shutdown`] does, but closes only up to `max` of the
    /// live sockets not yet closing; returns how many it closed. A drain calls it in batches so
    /// that clients reconnecting elsewhere do not all arrive at once.
    pub fn shutdown_batch(&self, max: usize) -> usize {
        self.0.shutting_down.store(true, Ordering::Release);
        let mut n = 0;
        for shard in self.0.live.iter() {
            for live in shard.lock().values().filter(|l| !l.outbox.is_closed()) {
                if n == max {
                    return n;
                }
                live.outbox.close(CloseReason::Shutdown);
                n += 1;
            }
        }
        n
    }

    /// Sockets closed because their peer read too slowly (their outbound queue reached
    /// [`Config::outbound_queue_limit`](crate::Config) or
    /// [`Config::outbound_byte_limit`](crate::Config)), since the endpoint was built.
    pub fn slow_consumers(&self) -> u64 {
        self.0.counters.slow_consumer_closes.load(Ordering::Relaxed)
    }

    /// True once [`Endpoint::shutdown`] or [`Endpoint::shutdown_batch`] was called.
    pub fn is_shutting_down(&self) -> bool {
        self.0.shutting_down.load(Ordering::Acquire)
    }

    fn close_where(&self, pred: impl Fn(&Live) -> bool, reason: CloseReason) -> usize {
        let mut n = 0;
        for shard in self.0.live.iter() {
            for live in shard.lock().values().filter(|l| pred(l)) {
                live.outbox.close(reason.clone());
                n += 1;
            }
        }
        n
    }
}

/// A place among the sockets of one peer address, given back unless the socket connects.
/// Addresses tracked for the connect rate before full buckets are forgotten.
const CONNECT_BUCKETS: usize = 4096;

impl Endpoint {
    /// Takes one connect token of `ip`'s bucket, when `connect_rate` is set and the address known.
    fn connect_token(&self, ip: Option<IpAddr>) -> Result<(), ConnectError> {
        let (Some(rate), Some(ip)) = (self.0.config.connect_rate, ip) else { return Ok(()) };
        let (per_second, burst) = (f64::from(rate.per_second), f64::from(rate.burst));
        let now = tokio::time::Instant::now();
        let mut buckets = self.0.connects.lock();
        if buckets.len() >= CONNECT_BUCKETS && !buckets.contains_key(&ip) {
            // A bucket refilled to its burst says nothing more than a missing one.
            buckets.retain(|_, (tokens, at)| *tokens + now.duration_since(*at).as_secs_f64() * per_second < burst);
        }
        let (tokens, at) = buckets.entry(ip).or_insert((burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * per_second).min(burst);
        *at = now;
        if *tokens < 1.0 {
            let retry_after = std::time::Duration::from_secs_f64((1.0 - *tokens) / per_second);
            tracing::info!(%ip, per_second = rate.per_second, "connect refused: too many connects from this address");
            return Err(ConnectError::RateLimited { ip, retry_after });
        }
        *tokens -= 1.0;
        Ok(())
    }
}

struct IpSlot<'a> {
    endpoint: &'a Endpoint,
    ip: Option<IpAddr>,
}

impl<'a> IpSlot<'a> {
    /// Takes a place for `ip` if `max_connections_per_ip` is set and the address is known.
    fn take(endpoint: &'a Endpoint, ip: Option<IpAddr>) -> Result<IpSlot<'a>, ConnectError> {
        let (Some(limit), Some(ip)) = (endpoint.0.config.max_connections_per_ip, ip) else {
            return Ok(IpSlot { endpoint, ip: None });
        };
        let mut per_ip = endpoint.0.per_ip.lock();
        let n = per_ip.entry(ip).or_insert(0);
        if *n >= limit {
            if *n == 0 {
                per_ip.remove(&ip);
            }
            tracing::info!(%ip, limit, "connection refused: too many connections from this address");
            return Err(ConnectError::TooManyConnections(ip));
        }
        *n += 1;
        Ok(IpSlot { endpoint, ip: Some(ip) })
    }

    /// The socket connected: its place is now given back when it is forgotten.
    fn keep(mut self) -> Option<IpAddr> {
        self.ip.take()
    }
}

impl Drop for IpSlot<'_> {
    fn drop(&mut self) {
        if let Some(ip) = self.ip {
            self.endpoint.0.release_ip(ip);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::Duration;

    use super::*;

    fn from(addr: &str) -> ConnectInfo {
        let mut info = ConnectInfo::new("websocket", true).with_query(Some("vsn=2.0.0"));
        info.peer_addr = Some(addr.parse::<SocketAddr>().expect("address"));
        info
    }

    #[tokio::test]
    async fn connections_per_ip_are_limited_and_given_back() {
        let endpoint = Endpoint::builder().config(Config::default().max_connections_per_ip(Some(2))).build();
        let a = endpoint.connect(from("10.0.0.1:1000")).await.expect("first");
        let _b = endpoint.connect(from("10.0.0.1:1001")).await.expect("second");
        let refused = endpoint.connect(from("10.0.0.1:1002")).await.err();
        assert!(
            matches!(refused, Some(ConnectError::TooManyConnections(ip)) if ip.to_string() == "10.0.0.1"),
            "{refused:?}"
        );
        let _other = endpoint.connect(from("10.0.0.2:1000")).await.expect("another address");
        let mut unknown = ConnectInfo::new("db", false);
        unknown.vsn = Some("2.0.0".into());
        let _unknown = endpoint.connect(unknown).await.expect("no address, no count");
        drop(a);
        let _c = endpoint.connect(from("10.0.0.1:1003")).await.expect("a closed socket gives its place back");
        assert_eq!(endpoint.connected(), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn connects_per_ip_are_rate_limited_with_a_retry_time() {
        let endpoint = Endpoint::builder().config(Config::default().connect_rate(Some((2, 3)))).build();
        let mut sessions = Vec::new();
        for port in 0..3 {
            sessions.push(endpoint.connect(from(&format!("10.0.0.1:{port}"))).await.expect("within the burst"));
        }
        let refused = endpoint.connect(from("10.0.0.1:9")).await.err();
        let Some(ConnectError::RateLimited { ip, retry_after }) = refused else { panic!("{refused:?}") };
        assert_eq!(ip.to_string(), "10.0.0.1");
        assert_eq!(retry_after, Duration::from_millis(500), "one token at 2 per second");
        sessions.push(endpoint.connect(from("10.0.0.2:1")).await.expect("another address has its own bucket"));
        tokio::time::advance(retry_after).await;
        sessions.push(endpoint.connect(from("10.0.0.1:10")).await.expect("a token regained"));
        assert!(endpoint.connect(from("10.0.0.1:11")).await.is_err(), "and only one");
    }

    #[tokio::test]
    async fn a_shutdown_in_batches_closes_each_socket_once_and_refuses_new_ones() {
        let endpoint = Endpoint::new(Router::new());
        let mut sessions = Vec::new();
        for port in 0..5 {
            sessions.push(endpoint.connect(from(&format!("10.0.0.1:{port}"))).await.expect("connect"));
        }
        assert_eq!(endpoint.shutdown_batch(0), 0);
        assert!(matches!(endpoint.connect(from("10.0.0.1:9")).await, Err(ConnectError::ShuttingDown)));
        assert_eq!(endpoint.shutdown_batch(2), 2);
        assert_eq!(endpoint.shutdown_batch(2), 2);
        assert_eq!(endpoint.shutdown_batch(2), 1);
        assert_eq!(endpoint.shutdown_batch(2), 0);
        assert_eq!(endpoint.connected(), 5, "closing is the transports' job; the sockets are still registered");
        drop(sessions);
    }

    #[tokio::test]
    async fn a_refused_connect_callback_gives_the_place_back() {
        let endpoint = Endpoint::builder()
            .config(Config::default().max_connections_per_ip(Some(1)))
            .on_connect(|info: &ConnectInfo| match info.params.get("ok") {
                Some(_) => Ok(Accept::new()),
                None => Err(ConnectError::refused("no")),
            })
            .build();
        assert!(matches!(endpoint.connect(from("10.0.0.1:1")).await, Err(ConnectError::Refused(_))));
        let mut ok = from("10.0.0.1:2");
        ok.params.insert("ok".into(), "1".into());
        endpoint.connect(ok).await.expect("the refused connect did not keep its place");
    }
}
