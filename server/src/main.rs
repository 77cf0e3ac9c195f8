//! `fawkes serve`: the demo app over WebSocket, long-poll and SSE, with its chat page at `/`;
//! with `--pubsub`, one node of a cluster. `fawkes config check FILE` validates a config file.

use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use fawkes::db::{Db, DbClients, DbClientsOptions, SqlHistory, StreamOptions, TableStream};
use fawkes::longpoll::LongPollOptions;
use fawkes::pubsub_postgres::{PostgresAdapter, PostgresAdapterError, PostgresOptions};
use fawkes::pubsub_redis::{RedisAdapter, RedisAdapterError, RedisHistory, RedisOptions};
use fawkes::{ClusterOptions, Endpoint, HistoryStore, PubSub};
use fawkes_server::auth::Auth;
use fawkes_server::config::{ConfigError, FileConfig, LogFormat, ServeArgs, ServeConfig, parse_bind, redact};
use fawkes_server::namespace::NamespaceStats;
use tracing_subscriber::EnvFilter;

/// jemalloc rather than the system allocator: glibc's malloc keeps what a burst of large
/// buffers (long-poll answers, big replies) used long after they are freed (freeing one raises
/// its mmap threshold, and later large buffers come from arenas it rarely trims). jemalloc, with
/// its background thread on (see `main`), gives freed pages back within seconds.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

const SERVE_HELP: &str = "\
Once started, the server prints the URL it serves. With the defaults:
  http://127.0.0.1:4000/          the demo chat page
  /socket/websocket, /socket/longpoll, /socket/sse   the Phoenix socket (phoenix.js: new Socket(\"/socket\"))
  /metrics                        Prometheus metrics
  /health                         200 while serving, 503 while draining or when --pubsub is unreachable

  /api/broadcast, /api/presence the HTTP API, with --api-key (Authorization: Bearer KEY)

Settings come from --config FILE, then FAWKES_* variables, then flags (flags win). With
[[namespace]] entries in the file, the topics are exactly those namespaces (the demo app's topics
are served only when none is declared); namespaces exist only in the file.

Logs go to stderr; RUST_LOG sets the level (RUST_LOG=debug for per-socket logs; sqlx's own query
logs stay at warn unless RUST_LOG names sqlx). SIGTERM or Ctrl-C drains: /health answers 503 at
once, new sockets are refused, open ones are closed in batches over --drain-duration.";

#[derive(Parser)]
#[command(name = "fawkes", version, about = "Phoenix Channels server")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the demo app (chat rooms at /socket, a chat page at /), or the [[namespace]] topics of
    /// --config.
    #[command(after_help = SERVE_HELP)]
    Serve(Box<ServeArgs>),
    /// Configuration files.
    #[command(subcommand)]
    Config(ConfigCommand),
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Checks a configuration file: unknown keys and bad values are named, with what is allowed.
    Check {
        /// The TOML file.
        file: PathBuf,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    // Purges freed pages on a timer, whether or not the server allocates again.
    if let Err(e) = tikv_jemalloc_ctl::background_thread::write(true) {
        eprintln!("fawkes: jemalloc background thread not started: {e}");
    }
    match Cli::parse().command {
        Command::Config(ConfigCommand::Check { file }) => check(&file),
        Command::Serve(args) => {
            let config = match load(&args) {
                Ok(config) => config,
                Err(e) => {
                    eprintln!("fawkes: {e}");
                    return ExitCode::from(2);
                }
            };
            if !config.not_yet_active.is_empty() {
                eprintln!(
                    "fawkes: not yet active in this version: {}. Remove them to serve without them \
                     (`fawkes config check` accepts them).",
                    config.not_yet_active.join(", ")
                );
                return ExitCode::from(2);
            }
            init_logging(config.log_format);
            match serve(config).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn load(args: &ServeArgs) -> Result<ServeConfig, ConfigError> {
    let file = match &args.config {
        Some(path) => FileConfig::read(path)?,
        None => FileConfig::default(),
    };
    ServeConfig::resolve(file, args)
}

fn check(file: &std::path::Path) -> ExitCode {
    match FileConfig::read(file).and_then(|f| ServeConfig::resolve(f, &ServeArgs::default())) {
        Ok(config) => {
            println!("{}: ok", file.display());
            if !config.not_yet_active.is_empty() {
                println!("not yet active in this version (serve refuses them): {}", config.not_yet_active.join(", "));
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("fawkes: {e}");
            ExitCode::from(2)
        }
    }
}

/// Logs on stderr; colour only on a terminal (and not with NO_COLOR); sqlx quiet unless asked.
fn init_logging(format: LogFormat) {
    let directives = match std::env::var("RUST_LOG") {
        Ok(s) if s.contains("sqlx") => s,
        Ok(s) if !s.trim().is_empty() => format!("{s},sqlx=warn,sqlx::postgres::notice=error"),
        _ => "info,sqlx=warn,sqlx::postgres::notice=error".to_owned(),
    };
    let filter = EnvFilter::builder().parse_lossy(directives);
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn serve(mut config: ServeConfig) -> Result<(), Box<dyn std::error::Error>> {
    // Listen first: a port in use is reported before anything is created.
    let listener = listen(&config.bind).await?;
    let addr = listener.local_addr()?;
    config.bound(addr);
    let pubsub = pubsub(&config).await?;
    pubsub.presence().set_options(config.presence.clone());
    let database = match &config.tls_ca {
        Some(ca) => with_root_cert(&config.database, ca),
        None => config.database.clone(),
    };
    let db = connect_database(&database).await?;
    db.notify_on("fawkes_events").await?;
    let events = TableStream::start(db.clone(), StreamOptions::table("fawkes_events")).await?;
    let auth = Auth::new(config.auth.jwt.clone(), config.auth.anonymous, config.proxy.clone());
    let namespace_stats = Arc::new(NamespaceStats::default());
    let router = if config.namespaces.is_empty() {
        fawkes_server::demo::router_with_events(events)
    } else {
        fawkes_server::namespace::router(&config.namespaces, config.proxy.clone(), namespace_stats.clone())
    };
    let endpoint = Endpoint::builder()
        .router(router)
        .config(config.channel.clone())
        .pubsub(pubsub)
        .socket_handler(auth.clone())
        .build();
    // Feed history lives in the cluster's backend when `--pubsub` names one: Redis Streams or
    // PostgreSQL; in memory otherwise.
    if let Some(store) = feed_history(&config).await? {
        endpoint.history().set_store(store);
    }
    let _db_clients = DbClients::start(db, endpoint.clone(), DbClientsOptions::default()).await?;
    let mut longpoll = LongPollOptions::default();
    if let Some(secret) = &config.secret {
        longpoll = longpoll.secret(secret.as_bytes());
    }
    let url = format!("http://{addr}");
    tracing::info!(
        %addr,
        database = %redact(&config.database),
        pubsub = %config.pubsub.as_deref().map_or("none".into(), redact),
        node = %endpoint.pubsub().node(),
        "listening on {url}"
    );
    // One stdout line saying where, whatever the log settings (scripts wait for it).
    println!(
        "fawkes: listening on {url} (page {url}/, socket {url}/socket, metrics {url}/metrics, health {url}/health)"
    );
    let (auth_stats, proxy) = (auth.stats(), config.proxy.clone());
    let more = move || {
        let mut text = auth_stats.prometheus() + &namespace_stats.prometheus();
        if let Some(proxy) = &proxy {
            text.push_str(&proxy.prometheus());
        }
        text
    };
    let mut app = fawkes_server::app_with_metrics(endpoint.clone(), longpoll, more);
    if let Some(api) = &config.api {
        app = app.merge(fawkes_server::api::router(endpoint.clone(), api.key.clone(), api.max_body_size));
    }
    fawkes_server::serve_with(listener, app, endpoint, fawkes_server::shutdown_signal(), config.serve.clone()).await?;
    Ok(())
}

/// Binds the first address `bind` resolves to; an error names the address and the way out.
async fn listen(bind: &str) -> Result<tokio::net::TcpListener, String> {
    let (host, port) = parse_bind(bind).map_err(|e| format!("--bind: {e}"))?;
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), port))
        .await
        .map_err(|e| format!("--bind {bind}: cannot resolve {host:?}: {e}"))?
        .collect();
    let mut last = None;
    for addr in addrs {
        match bind_listener(addr) {
            Ok(listener) => return Ok(listener),
            Err(e) => last = Some((addr, e)),
        }
    }
    Err(match last {
        Some((addr, e)) if e.kind() == std::io::ErrorKind::AddrInUse => {
            format!(
                "cannot listen on {addr}: the address is already in use (another fawkes?); choose another with --bind"
            )
        }
        Some((addr, e)) => format!("cannot listen on {addr}: {e}"),
        None => format!("--bind {bind}: {host:?} resolves to no address"),
    })
}

/// Connections the kernel may hold ready for `accept` (it caps this at `net.core.somaxconn`).
/// A storm of clients connecting at once overflows tokio's default of 1,024: the overflowing
/// handshakes are dropped and each client retries its SYN a second later.
const LISTEN_BACKLOG: u32 = 4096;

/// `TcpListener::bind` (with `SO_REUSEADDR`, as tokio sets it) and a [`LISTEN_BACKLOG`] deep queue.
fn bind_listener(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Connects the demo's database, first checking that a PostgreSQL server answers at all, so
/// that an unreachable one is named at once rather than after the pool's timeout.
async fn connect_database(url: &str) -> Result<Db, String> {
    let shown = redact(url);
    if let Some((host, port)) = postgres_host(url) {
        let reach = tokio::time::timeout(Duration::from_secs(3), tokio::net::TcpStream::connect((host.as_str(), port)));
        match reach.await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(format!("database {shown}: cannot reach {host}:{port}: {e}")),
            Err(_) => return Err(format!("database {shown}: no answer from {host}:{port} within 3 s")),
        }
    }
    Db::connect(url).await.map_err(|e| format!("database {shown}: {e}"))
}

/// Host and port of a `postgres://` URL (default 5432); `None` for other URLs and socket paths.
fn postgres_host(url: &str) -> Option<(String, u16)> {
    let rest = url.strip_prefix("postgres://").or_else(|| url.strip_prefix("postgresql://"))?;
    let authority = rest.split(['/', '?']).next()?;
    let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if hostport.is_empty() || hostport.contains(',') {
        return None;
    }
    if let Some(v6) = hostport.strip_prefix('[') {
        let (host, after) = v6.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None => 5432,
        };
        return Some((host.to_owned(), port));
    }
    match hostport.rsplit_once(':') {
        Some((host, port)) => Some((host.to_owned(), port.parse().ok()?)),
        None => Some((hostport.to_owned(), 5432)),
    }
}

/// Where `feed:*` (and namespaces with history) keep their history: in the cluster's backend when
/// `--pubsub` names one, so any node recovers a client — Redis Streams (same cluster name as the
/// adapter) or PostgreSQL (a restart loses nothing) — otherwise in memory (the default store).
/// Stores connect when first used, as the PubSub adapter does, over TLS as the adapter does.
async fn feed_history(config: &ServeConfig) -> Result<Option<std::sync::Arc<dyn HistoryStore>>, String> {
    let Some(url) = config.pubsub.as_deref() else { return Ok(None) };
    if url.starts_with("redis://") || url.starts_with("rediss://") {
        let mut redis = RedisOptions::default().cluster(&config.cluster);
        if let Some(ca) = &config.tls_ca {
            let pem = std::fs::read(ca).map_err(|e| format!("tls_ca {}: {e}", ca.display()))?;
            redis = redis.tls_ca(pem);
        }
        let store = RedisHistory::with_options(url, redis).map_err(|e| format!("feed history {}: {e}", redact(url)))?;
        return Ok(Some(std::sync::Arc::new(store)));
    }
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let url = match &config.tls_ca {
            Some(ca) => with_root_cert(url, ca),
            None => url.to_owned(),
        };
        let store = SqlHistory::connect_lazy(&url).await.map_err(|e| format!("feed history {}: {e}", redact(&url)))?;
        return Ok(Some(std::sync::Arc::new(store)));
    }
    Ok(None)
}

/// The PubSub `--pubsub` asks for: alone, or a node of a Redis or PostgreSQL cluster. The
/// backend is tried once first: a TLS refusal (wrong CA, wrong host name, no TLS) stops the
/// start with the reason, since waiting will not mend it; an unreachable backend is only
/// warned about (the node serves alone until it answers, and `/health` says so).
async fn pubsub(config: &ServeConfig) -> Result<PubSub, Box<dyn std::error::Error>> {
    let Some(url) = &config.pubsub else { return Ok(PubSub::new()) };
    let shown = redact(url);
    let options = ClusterOptions::default().node_timeout(config.presence_timeout);
    let probe = Duration::from_secs(3);
    let fix = "check tls_ca (--tls-ca) and that the URL's host is a name the server's certificate carries";
    if url.starts_with("redis://") || url.starts_with("rediss://") {
        let mut redis = RedisOptions::default().cluster(&config.cluster);
        if let Some(ca) = &config.tls_ca {
            let pem = std::fs::read(ca).map_err(|e| format!("tls_ca {}: {e}", ca.display()))?;
            redis = redis.tls_ca(pem);
        }
        let adapter = RedisAdapter::with_options(url, redis).map_err(|e| format!("pubsub {shown}: {e}"))?;
        match tokio::time::timeout(probe, adapter.check()).await {
            Ok(Ok(())) => {}
            Ok(Err(e @ RedisAdapterError::Tls(_))) => return Err(format!("pubsub {shown}: {e}; {fix}").into()),
            Ok(Err(e)) => tracing::warn!("pubsub {shown}: {e}; serving alone until it answers"),
            Err(_) => tracing::warn!("pubsub {shown}: no answer within {probe:?}; serving alone until it answers"),
        }
        Ok(PubSub::with_options(adapter, options))
    } else {
        let url = match &config.tls_ca {
            Some(ca) => with_root_cert(url, ca),
            None => url.clone(),
        };
        let adapter = PostgresAdapter::with_options(&url, PostgresOptions::default().cluster(&config.cluster))
            .map_err(|e| format!("pubsub {shown}: {e}"))?;
        match tokio::time::timeout(probe, adapter.check()).await {
            Ok(Ok(())) => {}
            Ok(Err(e @ PostgresAdapterError::Tls(_))) => return Err(format!("pubsub {shown}: {e}; {fix}").into()),
            Ok(Err(e)) => tracing::warn!("pubsub {shown}: {e}; serving alone until it answers"),
            Err(_) => tracing::warn!("pubsub {shown}: no answer within {probe:?}; serving alone until it answers"),
        }
        Ok(PubSub::with_options(adapter, options))
    }
}

/// A `postgres://` URL with `sslrootcert` set to `ca` unless it names one already; other URLs
/// as they are.
fn with_root_cert(url: &str, ca: &std::path::Path) -> String {
    if postgres_host(url).is_none() || url.contains("sslrootcert=") {
        return url.to_owned();
    }
    let ca: String = ca
        .to_string_lossy()
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'/' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}sslrootcert={ca}")
}
