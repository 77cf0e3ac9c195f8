//! The configuration of `fawkes serve`: one set of settings read from a TOML file, the
//! environment (`FAWKES_…`) and flags, in that order of precedence from lowest to highest, over
//! defaults that give the zero-config demo on SQLite.
//!
//! ```
//! use fawkes_server::config::{FileConfig, ServeArgs, ServeConfig};
//!
//! let file: FileConfig = "bind = \"127.0.0.1:4100\"\n[limits]\nmax_frame_size = 65536\n".parse().unwrap();
//! let config = ServeConfig::resolve(file, &ServeArgs::default()).unwrap();
//! assert_eq!(config.bind, "127.0.0.1:4100");
//! assert_eq!(config.channel.max_frame_size, 65536);
//! ```

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use clap::{Args, ValueEnum};
use serde::Deserialize;

use fawkes::{Config, HistoryOptions, OriginCheck, PresenceOptions, SlowConsumerPolicy};

pub use crate::namespace::JoinPolicy;
use crate::namespace::Rules;
use crate::server::ServeOptions;

/// The file form of the settings; every key is optional. Unknown keys are refused.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// `bind`: the address to listen on.
    pub bind: Option<String>,
    /// `allowed_origins`: browser origins that may connect.
    pub allowed_origins: Option<Vec<String>>,
    /// `database`: the demo app's database.
    pub database: Option<String>,
    /// `pubsub`: the cluster backend.
    pub pubsub: Option<String>,
    /// `cluster`: the cluster's name on the backend.
    pub cluster: Option<String>,
    /// `secret`: signs long-poll and SSE sessions.
    pub secret: Option<String>,
    /// `tls_ca`: PEM root certificates for TLS to the backends.
    pub tls_ca: Option<PathBuf>,
    /// `presence_timeout`: seconds without a word from a node before its presences go.
    pub presence_timeout: Option<f64>,
    /// `log_format`: `text` or `json`.
    pub log_format: Option<LogFormat>,
    /// `[auth]`.
    #[serde(default)]
    pub auth: AuthFile,
    /// `[api]`.
    #[serde(default)]
    pub api: ApiFile,
    /// `[[namespace]]` entries.
    #[serde(default, rename = "namespace")]
    pub namespaces: Vec<Namespace>,
    /// `[proxy]`: the connect and join hooks.
    #[serde(default)]
    pub proxy: ProxyFile,
    /// `[limits]`.
    #[serde(default)]
    pub limits: LimitsFile,
    /// `[presence]`.
    #[serde(default)]
    pub presence: PresenceFile,
    /// `[drain]`.
    #[serde(default)]
    pub drain: DrainFile,
    /// `[health]`.
    #[serde(default)]
    pub health: HealthFile,
    /// `[http]`: connection timeouts.
    #[serde(default)]
    pub http: HttpFile,
}

impl FromStr for FileConfig {
    type Err = toml::de::Error;

    fn from_str(s: &str) -> Result<FileConfig, toml::de::Error> {
        toml::from_str(s)
    }
}

impl FileConfig {
    /// Reads and parses a file.
    pub fn read(path: &Path) -> Result<FileConfig, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        text.parse().map_err(|source| ConfigError::Parse { path: path.to_owned(), source: Box::new(source) })
    }
}

/// `[auth]`: token authentication (see [`crate::auth`]).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthFile {
    /// HS256 shared secret.
    pub jwt_secret: Option<String>,
    /// A PEM file with the RS256/ES256 public key.
    pub jwt_public_key: Option<PathBuf>,
    /// Whether clients without a token may connect.
    pub anonymous: Option<bool>,
}

/// `[api]`: the HTTP API (see [`crate::api`]).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiFile {
    /// The Bearer key for `/api/*`.
    pub key: Option<String>,
    /// Largest `POST /api/broadcast` body, in bytes.
    pub max_body_size: Option<usize>,
}

/// `[proxy]`: the connect and join hooks (see [`crate::proxy`]).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyFile {
    /// `http://...` asked at every connect.
    pub connect_url: Option<String>,
    /// `http://...` asked at every join of a namespace's topic.
    pub join_url: Option<String>,
    /// Seconds a hook may take before the request is refused.
    pub timeout: Option<f64>,
}

/// A `[[namespace]]` entry (see [`crate::namespace`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Namespace {
    /// A topic pattern; `*` at the end matches the rest of the topic.
    pub pattern: String,
    /// Who may join.
    #[serde(default)]
    pub join: JoinPolicy,
    /// Whether clients may push any event to the topic.
    #[serde(default)]
    pub publish: bool,
    /// Whether joins are tracked in Presence.
    #[serde(default)]
    pub presence: bool,
    /// Broadcasts kept per topic for joins that recover with `since`.
    pub history_size: Option<usize>,
    /// Seconds a broadcast stays in history.
    pub history_age: Option<f64>,
    /// Largest client push payload, in bytes of JSON.
    pub max_message_size: Option<usize>,
    /// Client pushes per second regained, per socket on a topic.
    pub message_rate: Option<u32>,
    /// Client pushes a socket may make at once on a topic (default: `message_rate`).
    pub message_burst: Option<u32>,
}

/// `[limits]`: the channel layer's limits ([`fawkes::Config`]).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsFile {
    /// Seconds of silence before a socket is closed.
    pub heartbeat_timeout: Option<f64>,
    /// Largest inbound frame, in bytes.
    pub max_frame_size: Option<usize>,
    /// Frames queued for one socket before `slow_consumer` applies.
    pub outbound_queue_limit: Option<usize>,
    /// Bytes queued for one socket or long-poll/SSE session before `slow_consumer` applies.
    pub outbound_byte_limit: Option<usize>,
    /// `disconnect` or `drop_oldest`.
    pub slow_consumer: Option<SlowConsumer>,
    /// Channels one socket may have joined at once.
    pub max_channels_per_socket: Option<usize>,
    /// Joins per second regained by a socket.
    pub join_rate: Option<u32>,
    /// Joins a socket may make at once.
    pub join_burst: Option<u32>,
    /// Longest topic, in bytes.
    pub max_topic_len: Option<usize>,
    /// Sockets one IP address may hold at once.
    pub max_connections_per_ip: Option<usize>,
    /// Sockets (WebSocket upgrades, long-poll and SSE sessions) one IP address may open per
    /// second; 0: no limit.
    pub connect_rate: Option<u32>,
    /// Sockets one IP address may open at once.
    pub connect_burst: Option<u32>,
}

/// `[presence]`: how presence batches its changes and how much one topic may hold
/// ([`fawkes::PresenceOptions`]).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PresenceFile {
    /// Milliseconds changes wait to go out together as one `presence_diff` per topic.
    pub window_ms: Option<u64>,
    /// Microseconds a topic's window grows by per local subscriber, when longer than `window_ms`.
    pub window_per_subscriber_us: Option<u64>,
    /// Largest presence entry (key and meta as JSON), in bytes.
    pub max_meta_bytes: Option<usize>,
    /// Entries one topic may hold.
    pub max_entries_per_topic: Option<usize>,
    /// Bytes of entries one topic may hold.
    pub max_bytes_per_topic: Option<usize>,
}

/// `[drain]`: what SIGTERM does.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrainFile {
    /// Seconds over which sockets are closed.
    pub duration: Option<f64>,
    /// Batches the sockets are closed in.
    pub batches: Option<u32>,
    /// Seconds after SIGTERM when the process exits whatever the peers do.
    pub deadline: Option<f64>,
}

/// `[health]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthFile {
    /// Seconds the cluster backend may be unreachable before `/health` answers 503.
    pub pubsub_outage: Option<f64>,
}

/// `[http]`: how long a connection may take.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpFile {
    /// Seconds a connection has to send a request's headers in full.
    pub header_read_timeout: Option<f64>,
    /// Seconds a connection may go without beginning a response (a body that never ends).
    pub idle_timeout: Option<f64>,
}

/// Log line format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines (coloured only on a terminal).
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `slow_consumer` policy names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum SlowConsumer {
    /// Close the socket.
    Disconnect,
    /// Drop the oldest queued frames.
    DropOldest,
}

/// The flags of `fawkes serve`; each also read from its environment variable.
#[derive(Debug, Clone, Default, Args)]
pub struct ServeArgs {
    /// A TOML configuration file (see fawkes.example.toml). Flags and FAWKES_* variables override it.
    #[arg(long, env = "FAWKES_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address to listen on: HOST:PORT, a host name (localhost:4001), or a bare PORT (on 127.0.0.1).
    /// [default: 127.0.0.1:4000]
    #[arg(long, env = "FAWKES_BIND", value_name = "ADDR")]
    pub bind: Option<String>,
    /// A browser origin allowed to connect (repeatable; comma-separated in the variable):
    /// https://app.example.com, http://localhost:*, https://*.example.com, or * for any.
    /// [default: the server's own origins only: its bind host and address at its port, and
    /// localhost forms when bound to a loopback or unspecified address]
    #[arg(long = "allowed-origin", env = "FAWKES_ALLOWED_ORIGINS", value_name = "ORIGIN", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,
    /// The demo app's database: a SQLite file (fawkes.db or sqlite://fawkes.db, created if
    /// missing) or postgres://USER@HOST/DB. [default: sqlite://fawkes.db]
    #[arg(long, env = "FAWKES_DATABASE", value_name = "URL")]
    pub database: Option<String>,
    /// Join a cluster through this backend: redis://HOST:PORT or postgres://... Nodes sharing it
    /// (and --cluster) share broadcasts, Presence and long-poll sessions. Needs --secret.
    #[arg(long, env = "FAWKES_PUBSUB", value_name = "URL")]
    pub pubsub: Option<String>,
    /// The cluster's name on the backend. [default: fawkes]
    #[arg(long, env = "FAWKES_CLUSTER", value_name = "NAME")]
    pub cluster: Option<String>,
    /// Key that signs long-poll and SSE sessions; the same on every node of a cluster.
    #[arg(long, env = "FAWKES_SECRET", hide_env_values = true, value_name = "KEY")]
    pub secret: Option<String>,
    /// PEM file of the CA certificates that TLS backends' certificates must chain to (rediss://,
    /// postgres://...?sslmode=verify-full), instead of the system's roots. [default: system roots]
    #[arg(long, env = "FAWKES_TLS_CA", value_name = "PEM")]
    pub tls_ca: Option<PathBuf>,
    /// Seconds without a word from a node before its presences are removed. [default: 30]
    #[arg(long, env = "FAWKES_PRESENCE_TIMEOUT", value_name = "SECS")]
    pub presence_timeout: Option<f64>,
    /// Log format on stderr. [default: text]
    #[arg(long, env = "FAWKES_LOG_FORMAT", value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,
    /// [auth] HS256 secret: clients connect with a JWT (connect param `token` or phoenix.js
    /// `authToken`) whose `sub` is the user id.
    #[arg(long, env = "FAWKES_JWT_SECRET", hide_env_values = true, value_name = "KEY", help_heading = "Auth and API")]
    pub jwt_secret: Option<String>,
    /// [auth] A PEM file with the RS256 or ES256 public key tokens are checked with (instead of
    /// --jwt-secret).
    #[arg(long, env = "FAWKES_JWT_PUBLIC_KEY", value_name = "PEM", help_heading = "Auth and API")]
    pub jwt_public_key: Option<PathBuf>,
    /// [auth] Let clients without a token connect, with no user. [default: false]
    #[arg(long, env = "FAWKES_ANONYMOUS", value_name = "BOOL", help_heading = "Auth and API")]
    pub anonymous: Option<bool>,
    /// [api] Bearer key for POST /api/broadcast and GET /api/presence (no key: no API).
    #[arg(long, env = "FAWKES_API_KEY", hide_env_values = true, value_name = "KEY", help_heading = "Auth and API")]
    pub api_key: Option<String>,
    /// [api] Largest POST /api/broadcast body in bytes. [default: 65536]
    #[arg(long, env = "FAWKES_API_MAX_BODY_SIZE", value_name = "BYTES", help_heading = "Auth and API")]
    pub api_max_body_size: Option<usize>,
    /// [proxy] http:// URL the server POSTs every connect to, for allow/deny.
    #[arg(long, env = "FAWKES_PROXY_CONNECT_URL", value_name = "URL", help_heading = "Auth and API")]
    pub proxy_connect_url: Option<String>,
    /// [proxy] http:// URL the server POSTs every namespace join to, for allow/deny.
    #[arg(long, env = "FAWKES_PROXY_JOIN_URL", value_name = "URL", help_heading = "Auth and API")]
    pub proxy_join_url: Option<String>,
    /// [proxy] Seconds a hook may take before the connect or join is refused. [default: 5]
    #[arg(long, env = "FAWKES_PROXY_TIMEOUT", value_name = "SECS", help_heading = "Auth and API")]
    pub proxy_timeout: Option<f64>,
    /// [limits] Seconds of silence before a socket is closed. [default: 60]
    #[arg(long, env = "FAWKES_HEARTBEAT_TIMEOUT", value_name = "SECS", help_heading = "Limits")]
    pub heartbeat_timeout: Option<f64>,
    /// [limits] Largest inbound frame in bytes. [default: 1048576]
    #[arg(long, env = "FAWKES_MAX_FRAME_SIZE", value_name = "BYTES", help_heading = "Limits")]
    pub max_frame_size: Option<usize>,
    /// [limits] Frames queued for one socket before --slow-consumer applies. [default: 1024]
    #[arg(long, env = "FAWKES_OUTBOUND_QUEUE_LIMIT", value_name = "FRAMES", help_heading = "Limits")]
    pub outbound_queue_limit: Option<usize>,
    /// [limits] Bytes queued for one socket or long-poll/SSE session (replies included) before
    /// --slow-consumer applies. [default: 1048576]
    #[arg(long, env = "FAWKES_OUTBOUND_BYTE_LIMIT", value_name = "BYTES", help_heading = "Limits")]
    pub outbound_byte_limit: Option<usize>,
    /// [limits] What a full outbound queue does. [default: disconnect]
    #[arg(long, env = "FAWKES_SLOW_CONSUMER", value_name = "POLICY", help_heading = "Limits")]
    pub slow_consumer: Option<SlowConsumer>,
    /// [limits] Channels one socket may have joined at once. [default: 100]
    #[arg(long, env = "FAWKES_MAX_CHANNELS_PER_SOCKET", value_name = "N", help_heading = "Limits")]
    pub max_channels_per_socket: Option<usize>,
    /// [limits] Joins per second regained by a socket. [default: 50]
    #[arg(long, env = "FAWKES_JOIN_RATE", value_name = "N", help_heading = "Limits")]
    pub join_rate: Option<u32>,
    /// [limits] Joins a socket may make at once. [default: 200]
    #[arg(long, env = "FAWKES_JOIN_BURST", value_name = "N", help_heading = "Limits")]
    pub join_burst: Option<u32>,
    /// [limits] Longest topic in bytes (at most 255). [default: 255]
    #[arg(long, env = "FAWKES_MAX_TOPIC_LEN", value_name = "BYTES", help_heading = "Limits")]
    pub max_topic_len: Option<usize>,
    /// [limits] Sockets one IP address may hold at once. [default: no limit]
    #[arg(long, env = "FAWKES_MAX_CONNECTIONS_PER_IP", value_name = "N", help_heading = "Limits")]
    pub max_connections_per_ip: Option<usize>,
    /// [limits] Sockets (WebSocket upgrades, long-poll and SSE sessions) one IP address may open
    /// per second; past it, 429 with Retry-After. 0: no limit. [default: 100]
    #[arg(long, env = "FAWKES_CONNECT_RATE", value_name = "N", help_heading = "Limits")]
    pub connect_rate: Option<u32>,
    /// [limits] Sockets one IP address may open at once. [default: 1000]
    #[arg(long, env = "FAWKES_CONNECT_BURST", value_name = "N", help_heading = "Limits")]
    pub connect_burst: Option<u32>,
    /// [drain] Seconds over which SIGTERM closes the sockets, in batches. [default: 0, all at once]
    #[arg(long, env = "FAWKES_DRAIN_DURATION", value_name = "SECS", help_heading = "Shutdown and health")]
    pub drain_duration: Option<f64>,
    /// [drain] Batches the sockets are closed in. [default: 10]
    #[arg(long, env = "FAWKES_DRAIN_BATCHES", value_name = "N", help_heading = "Shutdown and health")]
    pub drain_batches: Option<u32>,
    /// [drain] Seconds after SIGTERM when the process exits whatever the peers do. [default: 30]
    #[arg(long, env = "FAWKES_DRAIN_DEADLINE", value_name = "SECS", help_heading = "Shutdown and health")]
    pub drain_deadline: Option<f64>,
    /// [health] Seconds the cluster backend may be unreachable before /health answers 503.
    /// [default: 10]
    #[arg(long, env = "FAWKES_HEALTH_PUBSUB_OUTAGE", value_name = "SECS", help_heading = "Shutdown and health")]
    pub health_pubsub_outage: Option<f64>,
    /// [presence] Milliseconds presence changes wait to go out as one `presence_diff` per topic.
    /// [default: 50]
    #[arg(long, env = "FAWKES_PRESENCE_WINDOW_MS", value_name = "MS", help_heading = "Presence")]
    pub presence_window_ms: Option<u64>,
    /// [presence] Microseconds a topic's presence window grows by per local subscriber, when
    /// that is longer than the window (a room of 2,000 waits 200 ms, one of 20,000 waits 2 s). 0
    /// turns it off. [default: 100]
    #[arg(long, env = "FAWKES_PRESENCE_WINDOW_PER_SUBSCRIBER_US", value_name = "US", help_heading = "Presence")]
    pub presence_window_per_subscriber_us: Option<u64>,
    /// [presence] Largest presence entry (key and meta as JSON), in bytes. [default: 4096]
    #[arg(long, env = "FAWKES_PRESENCE_MAX_META_BYTES", value_name = "BYTES", help_heading = "Presence")]
    pub presence_max_meta_bytes: Option<usize>,
    /// [presence] Entries one topic's presence may hold. [default: 100000]
    #[arg(long, env = "FAWKES_PRESENCE_MAX_ENTRIES_PER_TOPIC", value_name = "N", help_heading = "Presence")]
    pub presence_max_entries_per_topic: Option<usize>,
    /// [presence] Bytes of entries one topic's presence may hold. [default: 16777216]
    #[arg(long, env = "FAWKES_PRESENCE_MAX_BYTES_PER_TOPIC", value_name = "BYTES", help_heading = "Presence")]
    pub presence_max_bytes_per_topic: Option<usize>,
    /// [http] Seconds a connection has to send a request's headers in full. [default: 10]
    #[arg(long, env = "FAWKES_HEADER_READ_TIMEOUT", value_name = "SECS", help_heading = "Connections")]
    pub header_read_timeout: Option<f64>,
    /// [http] Seconds a connection may go without beginning a response (a request body that
    /// never ends, a peer that sends nothing) before it is closed. [default: 30]
    #[arg(long, env = "FAWKES_IDLE_TIMEOUT", value_name = "SECS", help_heading = "Connections")]
    pub idle_timeout: Option<f64>,
}

/// The settings `fawkes serve` runs with, checked.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// The listen address as given (resolved at start; see [`parse_bind`]).
    pub bind: String,
    /// The demo app's database URL (a bare path became `sqlite://PATH`).
    pub database: String,
    /// The cluster backend.
    pub pubsub: Option<String>,
    /// The cluster's name.
    pub cluster: String,
    /// The session-signing key.
    pub secret: Option<String>,
    /// PEM root certificates for TLS to the backends (checked to exist).
    pub tls_ca: Option<PathBuf>,
    /// A node not heard from this long has its presences removed.
    pub presence_timeout: Duration,
    /// Log format.
    pub log_format: LogFormat,
    /// The channel layer's configuration: limits and the origin check.
    pub channel: Config,
    /// Presence batching and limits; a state is cut into parts that fit `max_frame_size` too.
    pub presence: PresenceOptions,
    /// Drain and health settings.
    pub serve: ServeOptions,
    /// Settings given that this version parses but does not enforce yet.
    pub not_yet_active: Vec<&'static str>,
    /// No `allowed_origins` was given: [`ServeConfig::bound`] allows the server's own origins.
    pub own_origins_only: bool,
    /// Token auth: the verifier (none: tokens are not read) and whether sockets without a user
    /// may connect.
    pub auth: AuthConfig,
    /// The HTTP API, when a key is set.
    pub api: Option<ApiConfig>,
    /// The connect and join hooks, when a URL is set.
    pub proxy: Option<crate::proxy::Proxy>,
    /// The namespaces; none: the demo app's topics.
    pub namespaces: Vec<Rules>,
}

/// `[auth]`, checked.
#[derive(Debug, Clone, Default)]
pub struct AuthConfig {
    /// How tokens are checked.
    pub jwt: Option<crate::auth::JwtVerifier>,
    /// Whether sockets without a token (or a user from the connect hook) may connect.
    pub anonymous: bool,
}

/// `[api]`, checked.
#[derive(Clone)]
pub struct ApiConfig {
    /// The Bearer key.
    pub key: String,
    /// Largest broadcast body, in bytes.
    pub max_body_size: usize,
}

impl std::fmt::Debug for ApiConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiConfig").field("key", &"***").field("max_body_size", &self.max_body_size).finish()
    }
}

/// Why the configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has an unknown key or a value of the wrong type.
    #[error("{}: {source}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message: the line, the key and what is allowed.
        source: Box<toml::de::Error>,
    },
    /// A value of the right type but not allowed.
    #[error("invalid {key}: {message}")]
    Invalid {
        /// The key, as written in the file, with its flag.
        key: &'static str,
        /// What is wrong and what is allowed.
        message: String,
    },
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key, message: message.into() }
}

fn seconds(key: &'static str, value: f64, allow_zero: bool) -> Result<Duration, ConfigError> {
    match Duration::try_from_secs_f64(value) {
        Ok(d) if allow_zero || !d.is_zero() => Ok(d),
        _ => Err(invalid(
            key,
            format!("{value}: expected a number of seconds{}", if allow_zero { "" } else { " greater than 0" }),
        )),
    }
}

fn positive(key: &'static str, value: usize) -> Result<usize, ConfigError> {
    if value == 0 { Err(invalid(key, "0: expected a number greater than 0")) } else { Ok(value) }
}

impl ServeConfig {
    /// Settles every setting: a flag or variable in `args` wins over `file`, which wins over the
    /// default. Values are checked here, so that `fawkes serve` refuses them before it starts.
    pub fn resolve(file: FileConfig, args: &ServeArgs) -> Result<ServeConfig, ConfigError> {
        let bind = args.bind.clone().or(file.bind).unwrap_or_else(|| "127.0.0.1:4000".into());
        parse_bind(&bind).map_err(|e| invalid("bind (--bind, FAWKES_BIND)", e))?;

        let origins =
            if args.allowed_origins.is_empty() { file.allowed_origins } else { Some(args.allowed_origins.clone()) };
        let own_origins_only = origins.as_ref().is_none_or(Vec::is_empty);
        let check_origin = match origins {
            // Replaced by the server's own origins once the listener is bound.
            None => OriginCheck::SameHost,
            Some(list) if list.is_empty() => OriginCheck::SameHost,
            Some(list) => OriginCheck::allow_list(list)
                .map_err(|e| invalid("allowed_origins (--allowed-origin, FAWKES_ALLOWED_ORIGINS)", e.to_string()))?,
        };

        let database = args.database.clone().or(file.database).unwrap_or_else(|| "sqlite://fawkes.db".into());
        let database = database_url(&database).map_err(|e| invalid("database (--database, FAWKES_DATABASE)", e))?;

        let pubsub = args.pubsub.clone().or(file.pubsub);
        let secret = args.secret.clone().or(file.secret);
        if let Some(url) = &pubsub {
            let known = ["redis://", "rediss://", "postgres://", "postgresql://"];
            if !known.iter().any(|s| url.starts_with(s)) {
                return Err(invalid(
                    "pubsub (--pubsub, FAWKES_PUBSUB)",
                    format!("{}: expected redis://HOST:PORT, rediss://... or postgres://...", redact(url)),
                ));
            }
            if secret.is_none() {
                return Err(invalid(
                    "secret (--secret, FAWKES_SECRET)",
                    "required with pubsub, the same on every node, so that any node can read a long-poll \
                     token and forward the request to the node holding its session",
                ));
            }
        }
        if secret.as_deref() == Some("") {
            return Err(invalid("secret (--secret, FAWKES_SECRET)", "empty"));
        }
        let tls_ca = args.tls_ca.clone().or(file.tls_ca);
        if let Some(path) = &tls_ca
            && !path.is_file()
        {
            return Err(invalid(
                "tls_ca (--tls-ca, FAWKES_TLS_CA)",
                format!("{}: no such file; expected a PEM file of CA certificates", path.display()),
            ));
        }
        let cluster = args.cluster.clone().or(file.cluster).unwrap_or_else(|| "fawkes".into());
        if cluster.is_empty() {
            return Err(invalid("cluster (--cluster, FAWKES_CLUSTER)", "empty"));
        }
        let presence_timeout = seconds(
            "presence_timeout (--presence-timeout, FAWKES_PRESENCE_TIMEOUT)",
            args.presence_timeout.or(file.presence_timeout).unwrap_or(30.0),
            false,
        )?;
        let log_format = args.log_format.or(file.log_format).unwrap_or_default();

        let channel = limits(args, &file.limits)?.check_origin(check_origin);
        let presence = presence(args, &file.presence, channel.max_frame_size)?;
        let mut serve = serve_options(args, &file.drain, &file.health)?;
        http_timeouts(args, &file.http, &mut serve)?;

        let not_yet_active = Vec::new();
        let auth = auth_config(args, &file.auth)?;
        let api = api_config(args, &file.api)?;
        let proxy = proxy_config(args, &file.proxy)?;
        let who = auth.jwt.is_some() || proxy.as_ref().is_some_and(crate::proxy::Proxy::has_connect);
        let namespaces = namespaces(&file.namespaces, who)?;

        Ok(ServeConfig {
            bind,
            database,
            pubsub,
            cluster,
            secret,
            tls_ca,
            presence_timeout,
            log_format,
            channel,
            presence,
            serve,
            not_yet_active,
            auth,
            api,
            proxy,
            namespaces,
            own_origins_only,
        })
    }

    /// Settles what depends on the address the listener is bound to: without `allowed_origins`,
    /// the origins allowed are the server's own ([`own_origins`]), never what a request's `Host`
    /// header claims (a DNS-rebinding page controls that).
    pub fn bound(&mut self, addr: SocketAddr) {
        if self.own_origins_only {
            let host = parse_bind(&self.bind).map_or_else(|_| addr.ip().to_string(), |(host, _)| host);
            self.channel.check_origin = own_origins(&host, addr);
        }
    }
}

/// The origins of a server bound to `host` (as configured) at `addr`: `http` and `https` with
/// the host and the bound address, and when the host is a loopback or unspecified address (or
/// `localhost`), the loopback forms `localhost`, `127.0.0.1` and `[::1]`; always the bound port.
///
/// ```
/// use fawkes_server::config::own_origins;
/// use http::HeaderMap;
///
/// let check = own_origins("127.0.0.1", "127.0.0.1:4000".parse().unwrap());
/// let from = |origin: &str, host: &str| {
///     let mut h = HeaderMap::new();
///     h.insert("origin", origin.parse().unwrap());
///     h.insert("host", host.parse().unwrap());
///     check.allows(&h)
/// };
/// assert!(from("http://localhost:4000", "localhost:4000"));
/// assert!(!from("http://evil.example", "evil.example"));
/// ```
pub fn own_origins(host: &str, addr: SocketAddr) -> OriginCheck {
    let port = addr.port();
    let bracket = |h: &str| if h.contains(':') && !h.starts_with('[') { format!("[{h}]") } else { h.to_owned() };
    let mut hosts = vec![bracket(host), bracket(&addr.ip().to_string())];
    let ip: Option<IpAddr> = host.trim_start_matches('[').trim_end_matches(']').parse().ok();
    let local = host.eq_ignore_ascii_case("localhost")
        || ip.is_some_and(|ip| ip.is_loopback() || ip.is_unspecified())
        || addr.ip().is_loopback();
    if local {
        hosts.extend(["localhost".to_owned(), "127.0.0.1".to_owned(), "[::1]".to_owned()]);
    }
    hosts.sort();
    hosts.dedup();
    let mut patterns = Vec::new();
    for h in &hosts {
        for scheme in ["http", "https"] {
            patterns.push(format!("{scheme}://{h}:{port}"));
        }
        match port {
            80 => patterns.push(format!("http://{h}")),
            443 => patterns.push(format!("https://{h}")),
            _ => {}
        }
    }
    OriginCheck::allow_list(patterns).unwrap_or(OriginCheck::Allow(Vec::new()))
}

fn auth_config(args: &ServeArgs, file: &AuthFile) -> Result<AuthConfig, ConfigError> {
    let secret = args.jwt_secret.as_ref().or(file.jwt_secret.as_ref());
    let public_key = args.jwt_public_key.as_ref().or(file.jwt_public_key.as_ref());
    let jwt = match (secret, public_key) {
        (Some(_), Some(_)) => return Err(invalid("[auth] jwt_secret, jwt_public_key", "give one of them, not both")),
        (Some(secret), None) if secret.is_empty() => {
            return Err(invalid("[auth] jwt_secret (--jwt-secret, FAWKES_JWT_SECRET)", "empty"));
        }
        (Some(secret), None) => Some(crate::auth::JwtVerifier::hs256(secret.as_bytes())),
        (None, Some(path)) => {
            const KEY: &str = "[auth] jwt_public_key (--jwt-public-key, FAWKES_JWT_PUBLIC_KEY)";
            let pem = std::fs::read(path).map_err(|e| {
                invalid(KEY, format!("{}: {e}; expected a PEM file with an RS256 or ES256 public key", path.display()))
            })?;
            Some(
                crate::auth::JwtVerifier::from_pem(&pem)
                    .map_err(|e| invalid(KEY, format!("{}: {e}", path.display())))?,
            )
        }
        (None, None) => None,
    };
    Ok(AuthConfig { jwt, anonymous: args.anonymous.or(file.anonymous).unwrap_or(false) })
}

fn api_config(args: &ServeArgs, file: &ApiFile) -> Result<Option<ApiConfig>, ConfigError> {
    let max = args.api_max_body_size.or(file.max_body_size).unwrap_or(crate::api::DEFAULT_MAX_BODY);
    let max_body_size = positive("[api] max_body_size (--api-max-body-size)", max)?;
    match args.api_key.as_ref().or(file.key.as_ref()) {
        Some(key) if key.trim().is_empty() => Err(invalid("[api] key (--api-key, FAWKES_API_KEY)", "empty")),
        Some(key) => Ok(Some(ApiConfig { key: key.clone(), max_body_size })),
        None => Ok(None),
    }
}

fn proxy_config(args: &ServeArgs, file: &ProxyFile) -> Result<Option<crate::proxy::Proxy>, ConfigError> {
    let url = |key: &'static str, value: Option<&String>| {
        value.map(|u| crate::proxy::parse_url(u).map_err(|e| invalid(key, e))).transpose()
    };
    let connect = url(
        "[proxy] connect_url (--proxy-connect-url)",
        args.proxy_connect_url.as_ref().or(file.connect_url.as_ref()),
    )?;
    let join = url("[proxy] join_url (--proxy-join-url)", args.proxy_join_url.as_ref().or(file.join_url.as_ref()))?;
    let timeout =
        seconds("[proxy] timeout (--proxy-timeout)", args.proxy_timeout.or(file.timeout).unwrap_or(5.0), false)?;
    if connect.is_none() && join.is_none() {
        return Ok(None);
    }
    Ok(Some(crate::proxy::Proxy::new(connect, join, timeout)))
}

/// The rules a `[[namespace]]` entry gives (checked by the configuration).
fn rules_of(ns: &Namespace) -> Rules {
    let history = (ns.history_size.is_some() || ns.history_age.is_some()).then(|| {
        let mut options = HistoryOptions::default();
        if let Some(n) = ns.history_size {
            options = options.max_len(n);
        }
        if let Some(age) = ns.history_age {
            options = options.max_age(Duration::from_secs_f64(age));
        }
        options
    });
    Rules {
        pattern: ns.pattern.clone(),
        join: ns.join,
        publish: ns.publish,
        presence: ns.presence,
        history,
        max_message_size: ns.max_message_size,
        message_rate: ns.message_rate.map(|rate| (rate, ns.message_burst.unwrap_or(rate))),
    }
}

fn namespaces(entries: &[Namespace], who: bool) -> Result<Vec<Rules>, ConfigError> {
    let mut rules = Vec::new();
    for ns in entries {
        check_topic_pattern(&ns.pattern).map_err(|e| invalid("[[namespace]] pattern", e))?;
        if ns.join != JoinPolicy::Anyone && !who {
            return Err(invalid(
                "[[namespace]] join",
                format!(
                    "{:?} for {:?}: no socket has a user without [auth] jwt_secret or jwt_public_key, or [proxy] \
                     connect_url; expected join = \"anyone\", or one of those",
                    match ns.join {
                        JoinPolicy::Claim => "claim",
                        _ => "authenticated",
                    },
                    ns.pattern
                ),
            ));
        }
        if let Some(n) = ns.history_size {
            positive("[[namespace]] history_size", n)?;
        }
        if let Some(age) = ns.history_age {
            seconds("[[namespace]] history_age", age, false)?;
        }
        if let Some(n) = ns.max_message_size {
            positive("[[namespace]] max_message_size", n)?;
        }
        if let Some(n) = ns.message_rate {
            positive("[[namespace]] message_rate", n as usize)?;
        }
        if let Some(n) = ns.message_burst {
            positive("[[namespace]] message_burst", n as usize)?;
            if ns.message_rate.is_none() {
                return Err(invalid("[[namespace]] message_burst", "given without message_rate"));
            }
        }
        rules.push(rules_of(ns));
    }
    Ok(rules)
}

fn presence(args: &ServeArgs, file: &PresenceFile, max_frame_size: usize) -> Result<PresenceOptions, ConfigError> {
    let d = PresenceOptions::default();
    let part = d.state_part_bytes.min(max_frame_size.saturating_sub(1024)).max(1024);
    let mut options = d.clone().state_part_bytes(part);
    if let Some(ms) = args.presence_window_ms.or(file.window_ms) {
        options = options.window(Duration::from_millis(ms));
    }
    if let Some(us) = args.presence_window_per_subscriber_us.or(file.window_per_subscriber_us) {
        options = options.window_per_subscriber(Duration::from_micros(us));
    }
    let meta = args.presence_max_meta_bytes.or(file.max_meta_bytes).unwrap_or(d.max_meta_bytes);
    options = options.max_meta_bytes(positive("[presence] max_meta_bytes (--presence-max-meta-bytes)", meta)?);
    let entries = args.presence_max_entries_per_topic.or(file.max_entries_per_topic).unwrap_or(d.max_entries_per_topic);
    options = options.max_entries_per_topic(positive(
        "[presence] max_entries_per_topic (--presence-max-entries-per-topic)",
        entries,
    )?);
    let bytes = args.presence_max_bytes_per_topic.or(file.max_bytes_per_topic).unwrap_or(d.max_bytes_per_topic);
    Ok(options.max_bytes_per_topic(positive("[presence] max_bytes_per_topic (--presence-max-bytes-per-topic)", bytes)?))
}

fn limits(args: &ServeArgs, file: &LimitsFile) -> Result<Config, ConfigError> {
    let d = Config::default();
    let mut config = Config::default();
    if let Some(s) = args.heartbeat_timeout.or(file.heartbeat_timeout) {
        config = config.heartbeat_timeout(seconds("[limits] heartbeat_timeout (--heartbeat-timeout)", s, false)?);
    }
    let size = args.max_frame_size.or(file.max_frame_size).unwrap_or(d.max_frame_size);
    config = config.max_frame_size(positive("[limits] max_frame_size (--max-frame-size)", size)?);
    let queue = args.outbound_queue_limit.or(file.outbound_queue_limit).unwrap_or(d.outbound_queue_limit);
    config = config.outbound_queue_limit(positive("[limits] outbound_queue_limit (--outbound-queue-limit)", queue)?);
    let bytes = args.outbound_byte_limit.or(file.outbound_byte_limit).unwrap_or(d.outbound_byte_limit);
    config = config.outbound_byte_limit(positive("[limits] outbound_byte_limit (--outbound-byte-limit)", bytes)?);
    if let Some(policy) = args.slow_consumer.or(file.slow_consumer) {
        config = config.slow_consumer(match policy {
            SlowConsumer::Disconnect => SlowConsumerPolicy::Disconnect,
            SlowConsumer::DropOldest => SlowConsumerPolicy::DropOldest,
        });
    }
    let channels = args.max_channels_per_socket.or(file.max_channels_per_socket).unwrap_or(d.max_channels_per_socket);
    config = config
        .max_channels_per_socket(positive("[limits] max_channels_per_socket (--max-channels-per-socket)", channels)?);
    let rate = args.join_rate.or(file.join_rate).unwrap_or(d.join_rate.per_second);
    let burst = args.join_burst.or(file.join_burst).unwrap_or(d.join_rate.burst);
    positive("[limits] join_rate (--join-rate)", rate as usize)?;
    positive("[limits] join_burst (--join-burst)", burst as usize)?;
    config = config.join_rate(rate, burst);
    let topic = args.max_topic_len.or(file.max_topic_len).unwrap_or(d.max_topic_len);
    if topic == 0 || topic > 255 {
        return Err(invalid(
            "[limits] max_topic_len (--max-topic-len)",
            format!("{topic}: expected 1 to 255 bytes (binary frames carry at most 255)"),
        ));
    }
    config.max_topic_len = topic;
    let rate = args.connect_rate.or(file.connect_rate).unwrap_or(DEFAULT_CONNECT_RATE);
    let burst = args.connect_burst.or(file.connect_burst).unwrap_or(DEFAULT_CONNECT_BURST);
    positive("[limits] connect_burst (--connect-burst)", burst as usize)?;
    config = config.connect_rate((rate > 0).then_some((rate, burst)));
    if let Some(n) = args.max_connections_per_ip.or(file.max_connections_per_ip) {
        config = config.max_connections_per_ip(Some(positive("[limits] max_connections_per_ip", n)?));
    }
    Ok(config)
}

/// `fawkes serve`'s connect rate per peer address: a page reconnecting, a tab per user behind
/// one NAT, are far below it; 10,000 session opens in a tenth of a second are not.
const DEFAULT_CONNECT_RATE: u32 = 100;
const DEFAULT_CONNECT_BURST: u32 = 1000;

fn serve_options(args: &ServeArgs, drain: &DrainFile, health: &HealthFile) -> Result<ServeOptions, ConfigError> {
    let d = ServeOptions::default();
    let mut options = ServeOptions::default();
    if let Some(s) = args.drain_duration.or(drain.duration) {
        options.drain_duration = seconds("[drain] duration (--drain-duration)", s, true)?;
    }
    let batches = args.drain_batches.or(drain.batches).unwrap_or(d.drain_batches);
    options.drain_batches = positive("[drain] batches (--drain-batches)", batches as usize)? as u32;
    if let Some(s) = args.drain_deadline.or(drain.deadline) {
        options.drain_deadline = seconds("[drain] deadline (--drain-deadline)", s, false)?;
    }
    if options.drain_deadline < options.drain_duration {
        return Err(invalid(
            "[drain] deadline (--drain-deadline)",
            format!(
                "{:?} is shorter than [drain] duration {:?}; expected at least the duration",
                options.drain_deadline, options.drain_duration
            ),
        ));
    }
    if let Some(s) = args.health_pubsub_outage.or(health.pubsub_outage) {
        options.pubsub_outage = seconds("[health] pubsub_outage (--health-pubsub-outage)", s, true)?;
    }
    Ok(options)
}

fn http_timeouts(args: &ServeArgs, http: &HttpFile, options: &mut ServeOptions) -> Result<(), ConfigError> {
    if let Some(s) = args.header_read_timeout.or(http.header_read_timeout) {
        options.header_read_timeout = seconds("[http] header_read_timeout (--header-read-timeout)", s, false)?;
    }
    if let Some(s) = args.idle_timeout.or(http.idle_timeout) {
        options.idle_timeout = seconds("[http] idle_timeout (--idle-timeout)", s, false)?;
    }
    Ok(())
}

/// `bind` as a host and a port: `HOST:PORT`, `[V6]:PORT`, a bare `PORT` (on 127.0.0.1) or a bare
/// `HOST` (port 4000). Host names are resolved when the server starts.
pub fn parse_bind(bind: &str) -> Result<(String, u16), String> {
    const FORMS: &str =
        "expected HOST:PORT (127.0.0.1:4000, localhost:4001, [::1]:4000, 0.0.0.0:80), a bare PORT, or a HOST";
    let bind = bind.trim();
    let port = |p: &str| p.parse::<u16>().map_err(|_| format!("{bind:?}: {p:?} is not a port number; {FORMS}"));
    if bind.is_empty() {
        return Err(format!("empty; {FORMS}"));
    }
    if bind.bytes().all(|b| b.is_ascii_digit()) {
        return Ok(("127.0.0.1".into(), port(bind)?));
    }
    if let Some(rest) = bind.strip_prefix('[') {
        let Some((host, after)) = rest.split_once(']') else { return Err(format!("{bind:?}: no closing ]; {FORMS}")) };
        if host.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(format!("{bind:?}: {host:?} is not an IPv6 address; {FORMS}"));
        }
        return match after.strip_prefix(':') {
            Some(p) => Ok((host.into(), port(p)?)),
            None if after.is_empty() => Ok((host.into(), 4000)),
            None => Err(format!("{bind:?}: {FORMS}")),
        };
    }
    if bind.parse::<std::net::Ipv6Addr>().is_ok() {
        return Ok((bind.into(), 4000));
    }
    let (host, p) = match bind.rsplit_once(':') {
        Some((host, p)) => (host, port(p)?),
        None => (bind, 4000),
    };
    let host_ok = !host.is_empty()
        && host.split('.').all(|label| {
            !label.is_empty() && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if !host_ok {
        return Err(format!("{bind:?}: {host:?} is not a host name or address; {FORMS}"));
    }
    Ok((host.into(), p))
}

/// The database setting as a URL: `sqlite:`/`postgres:` URLs as they are, a bare path as SQLite.
fn database_url(database: &str) -> Result<String, String> {
    const FORMS: &str =
        "expected a SQLite file (fawkes.db, sqlite://fawkes.db) or postgres://USER[:PASSWORD]@HOST[:PORT]/DB";
    if database.starts_with("sqlite:") || database.starts_with("postgres://") || database.starts_with("postgresql://") {
        Ok(database.to_owned())
    } else if database.is_empty() {
        Err(format!("empty; {FORMS}"))
    } else if database.contains("://") {
        Err(format!("{}: unsupported; {FORMS}", redact(database)))
    } else {
        Ok(format!("sqlite://{database}"))
    }
}

/// A topic pattern: a prefix, with `*` only at the end.
fn check_topic_pattern(pattern: &str) -> Result<(), String> {
    if pattern.is_empty() {
        return Err("empty; expected a topic (\"lobby\") or a prefix ending in * (\"chat:*\")".into());
    }
    if pattern.trim_end_matches('*').contains('*') || pattern.ends_with("**") {
        return Err(format!("{pattern:?}: * may only end the pattern, as in \"chat:*\""));
    }
    Ok(())
}

/// The URL without its password, for logs and errors.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => match url[scheme + 3..at].split_once(':') {
            Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
            None => url.to_owned(),
        },
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bind_takes_addresses_host_names_and_bare_ports() {
        assert_eq!(parse_bind("127.0.0.1:4000"), Ok(("127.0.0.1".into(), 4000)));
        assert_eq!(parse_bind("localhost:4001"), Ok(("localhost".into(), 4001)));
        assert_eq!(parse_bind("4001"), Ok(("127.0.0.1".into(), 4001)));
        assert_eq!(parse_bind("127.0.0.1"), Ok(("127.0.0.1".into(), 4000)));
        assert_eq!(parse_bind("[::1]:4002"), Ok(("::1".into(), 4002)));
        assert_eq!(parse_bind("::1"), Ok(("::1".into(), 4000)));
        for bad in ["", "localhost:http", "99999", "exa mple:4000", "http://localhost:4000"] {
            let e = parse_bind(bad).expect_err(bad);
            assert!(e.contains("expected HOST:PORT"), "{e}");
        }
    }

    #[test]
    fn database_takes_a_bare_sqlite_path() {
        assert_eq!(database_url("fawkes.db").as_deref(), Ok("sqlite://fawkes.db"));
        assert_eq!(database_url("sqlite::memory:").as_deref(), Ok("sqlite::memory:"));
        assert!(database_url("mysql://u:pw@h/db").expect_err("mysql").contains("u:***@h"));
    }

    #[test]
    fn flags_win_over_the_file_and_the_file_over_defaults() {
        let file: FileConfig =
            "bind = \"4100\"\ndatabase = \"a.db\"\n[limits]\nheartbeat_timeout = 5\n".parse().expect("valid");
        let args = ServeArgs { bind: Some("4200".into()), ..ServeArgs::default() };
        let config = ServeConfig::resolve(file, &args).expect("valid");
        assert_eq!(config.bind, "4200");
        assert_eq!(config.database, "sqlite://a.db");
        assert_eq!(config.channel.heartbeat_timeout, Duration::from_secs(5));
        assert_eq!(config.channel.max_frame_size, Config::default().max_frame_size);
    }

    #[test]
    fn presence_settings_take_flags_over_the_file() {
        let file: FileConfig = "[presence]\nwindow_ms = 200\nwindow_per_subscriber_us = 40\nmax_meta_bytes = 100\n"
            .parse()
            .expect("valid");
        let args = ServeArgs { presence_max_meta_bytes: Some(300), ..ServeArgs::default() };
        let config = ServeConfig::resolve(file, &args).expect("valid");
        assert_eq!(config.presence.window, Duration::from_millis(200));
        assert_eq!(config.presence.window_per_subscriber, Duration::from_micros(40));
        assert_eq!(config.presence.max_meta_bytes, 300);
        let zero = ServeArgs { presence_max_entries_per_topic: Some(0), ..ServeArgs::default() };
        let e = ServeConfig::resolve(FileConfig::default(), &zero).expect_err("0 entries").to_string();
        assert!(e.contains("--presence-max-entries-per-topic"), "{e}");
    }

    #[test]
    fn auth_api_proxy_and_namespaces_are_checked() {
        let resolve = |text: &str, args: &ServeArgs| {
            ServeConfig::resolve(text.parse().expect("valid TOML"), args).map_err(|e| e.to_string())
        };
        let flags = ServeArgs { jwt_secret: Some("k".into()), api_key: Some("a".into()), ..ServeArgs::default() };
        let config = resolve("[[namespace]]\npattern = \"chat:*\"\n", &flags).expect("valid");
        assert!(config.auth.jwt.is_some() && !config.auth.anonymous);
        assert_eq!(config.api.as_ref().map(|a| a.max_body_size), Some(crate::api::DEFAULT_MAX_BODY));
        assert_eq!(config.namespaces.len(), 1);
        assert!(!format!("{config:?}").contains("\"a\""), "the API key is not shown");

        let errors = [
            ("[auth]\njwt_secret = \"k\"\njwt_public_key = \"k.pem\"\n", "not both"),
            ("[auth]\njwt_public_key = \"/nonexistent/k.pem\"\n", "jwt_public_key"),
            ("[proxy]\nconnect_url = \"https://backend/connect\"\n", "[proxy] connect_url"),
            ("[proxy]\njoin_url = \"http://b/j\"\ntimeout = 0\n", "[proxy] timeout"),
            ("[api]\nkey = \"\"\n", "[api] key"),
            ("[[namespace]]\npattern = \"chat:*\"\n", "[[namespace]] join"),
            ("[[namespace]]\npattern = \"a*b\"\njoin = \"anyone\"\n", "[[namespace]] pattern"),
            ("[[namespace]]\npattern = \"a\"\njoin = \"anyone\"\nmessage_burst = 3\n", "without message_rate"),
            ("[[namespace]]\npattern = \"a\"\njoin = \"anyone\"\nhistory_size = 0\n", "history_size"),
        ];
        for (text, expected) in errors {
            let e = resolve(text, &ServeArgs::default()).expect_err(text);
            assert!(e.contains(expected), "{text}: {e}");
        }
        let bad_pem = std::env::temp_dir().join(format!("fawkes-bad-{}.pem", std::process::id()));
        std::fs::write(&bad_pem, "not a key").expect("write");
        let args = ServeArgs { jwt_public_key: Some(bad_pem.clone()), ..ServeArgs::default() };
        let e = resolve("", &args).expect_err("not a key");
        assert!(e.contains("not an RSA or EC"), "{e}");
        let _ = std::fs::remove_file(bad_pem);
    }
}
