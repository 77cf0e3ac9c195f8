//! Limits and timeouts, with safe defaults.

use std::time::Duration;

use crate::origin::OriginCheck;

/// What happens when a socket's outbound queue is full because its peer reads too slowly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SlowConsumerPolicy {
    /// Close the socket (close reason [`CloseReason::SlowConsumer`](crate::CloseReason)); the
    /// client reconnects and rejoins. Nothing is silently lost.
    #[default]
    Disconnect,
    /// Drop the oldest queued frames to make room. For feeds where only recent messages matter.
    DropOldest,
}

/// How many joins a socket may make: a token bucket of `burst` joins refilled at `per_second`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JoinRate {
    /// Joins regained per second.
    pub per_second: u32,
    /// Joins that may be made at once.
    pub burst: u32,
}

/// How many sockets one peer address may open: a token bucket of `burst` connects refilled at
/// `per_second` ([`Config::connect_rate`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectRate {
    /// Connects regained per second.
    pub per_second: u32,
    /// Connects that may be made at once.
    pub burst: u32,
}

/// Endpoint configuration. Every limit a peer could push against is here, with a safe default.
///
/// ```
/// use std::time::Duration;
/// use fawkes_channel::{Config, SlowConsumerPolicy};
///
/// let config = Config::default()
///     .heartbeat_timeout(Duration::from_secs(30))
///     .outbound_queue_limit(4096)
///     .slow_consumer(SlowConsumerPolicy::DropOldest);
/// assert_eq!(config.max_frame_size, 1024 * 1024);
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Config {
    /// A socket that sends nothing for this long is closed (Phoenix: 60 s).
    pub heartbeat_timeout: Duration,
    /// Largest inbound frame, in bytes. Transports refuse larger frames before reading them.
    pub max_frame_size: usize,
    /// Frames queued for one socket before the [`SlowConsumerPolicy`] applies.
    pub outbound_queue_limit: usize,
    /// Bytes queued for one socket (replies included) before the [`SlowConsumerPolicy`] applies.
    /// A single frame larger than this still goes to a peer whose queue is empty.
    pub outbound_byte_limit: usize,
    /// What to do when the outbound queue is full.
    pub slow_consumer: SlowConsumerPolicy,
    /// Channels one socket may have joined at once.
    pub max_channels_per_socket: usize,
    /// Join rate per socket.
    pub join_rate: JoinRate,
    /// Pushes queued for one channel before reading from the socket waits for the channel.
    pub channel_mailbox: usize,
    /// Longest topic accepted, in bytes (binary frames cannot carry more than 255).
    pub max_topic_len: usize,
    /// Which browser origins may connect.
    pub check_origin: OriginCheck,
    /// Sockets one peer IP address may hold at once (`None`: no limit). Counted where the
    /// transport knows the peer's address ([`ConnectInfo::peer_addr`](crate::ConnectInfo)); a
    /// connect past the limit is refused with [`ConnectError::TooManyConnections`](crate::ConnectError).
    pub max_connections_per_ip: Option<usize>,
    /// Sockets one peer IP address may open per second (a WebSocket upgrade, a long-poll or SSE
    /// session), `None`: no limit. A connect past it is refused with
    /// [`ConnectError::RateLimited`](crate::ConnectError), which transports answer `429` with
    /// `Retry-After`.
    pub connect_rate: Option<ConnectRate>,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            heartbeat_timeout: Duration::from_secs(60),
            max_frame_size: 1024 * 1024,
            outbound_queue_limit: 1024,
            outbound_byte_limit: 1024 * 1024,
            slow_consumer: SlowConsumerPolicy::Disconnect,
            max_channels_per_socket: 100,
            join_rate: JoinRate { per_second: 50, burst: 200 },
            channel_mailbox: 64,
            max_topic_len: 255,
            check_origin: OriginCheck::SameHost,
            max_connections_per_ip: None,
            connect_rate: None,
        }
    }
}

impl Config {
    /// Sets [`Config::heartbeat_timeout`].
    pub fn heartbeat_timeout(mut self, d: Duration) -> Self {
        self.heartbeat_timeout = d;
        self
    }
    /// Sets [`Config::max_frame_size`].
    pub fn max_frame_size(mut self, bytes: usize) -> Self {
        self.max_frame_size = bytes;
        self
    }
    /// Sets [`Config::outbound_queue_limit`] (at least 1).
    pub fn outbound_queue_limit(mut self, frames: usize) -> Self {
        self.outbound_queue_limit = frames.max(1);
        self
    }
    /// Sets [`Config::outbound_byte_limit`] (at least 1).
    pub fn outbound_byte_limit(mut self, bytes: usize) -> Self {
        self.outbound_byte_limit = bytes.max(1);
        self
    }
    /// Sets [`Config::slow_consumer`].
    pub fn slow_consumer(mut self, policy: SlowConsumerPolicy) -> Self {
        self.slow_consumer = policy;
        self
    }
    /// Sets [`Config::max_channels_per_socket`].
    pub fn max_channels_per_socket(mut self, n: usize) -> Self {
        self.max_channels_per_socket = n;
        self
    }
    /// Sets [`Config::join_rate`].
    pub fn join_rate(mut self, per_second: u32, burst: u32) -> Self {
        self.join_rate = JoinRate { per_second, burst: burst.max(1) };
        self
    }
    /// Sets [`Config::check_origin`].
    pub fn check_origin(mut self, check: OriginCheck) -> Self {
        self.check_origin = check;
        self
    }
    /// Sets [`Config::max_connections_per_ip`].
    pub fn max_connections_per_ip(mut self, limit: Option<usize>) -> Self {
        self.max_connections_per_ip = limit;
        self
    }
    /// Sets [`Config::connect_rate`]: `per_second` connects per peer address, `burst` at once.
    pub fn connect_rate(mut self, rate: Option<(u32, u32)>) -> Self {
        self.connect_rate =
            rate.map(|(per_second, burst)| ConnectRate { per_second: per_second.max(1), burst: burst.max(1) });
        self
    }
    /// Sets [`Config::channel_mailbox`] (at least 1).
    pub fn channel_mailbox(mut self, n: usize) -> Self {
        self.channel_mailbox = n.max(1);
        self
    }
}
