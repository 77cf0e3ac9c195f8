//! `fawkes serve`: the demo app over WebSocket and long-poll, with its chat page at `/`; with
//! `--pubsub`, one node of a cluster.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use fawkes::db::{Db, DbClients, DbClientsOptions, StreamOptions, TableStream};
use fawkes::longpoll::LongPollOptions;
use fawkes::pubsub_postgres::{PostgresAdapter, PostgresOptions};
use fawkes::pubsub_redis::{RedisAdapter, RedisOptions};
use fawkes::{ClusterOptions, Config, Endpoint, PubSub};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(name = "fawkes", version, about = "Phoenix Channels server")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the demo app: chat rooms at /socket, a chat page at /.
    Serve {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:4000")]
        bind: SocketAddr,
        /// Database for database clients (fawkes_inbox/fawkes_outbox) and the fawkes_events stream:
        /// a SQLite file (created if missing) or postgres://...
        #[arg(long, default_value = "sqlite://fawkes.db")]
        database: String,
        #[command(flatten)]
        cluster: ClusterArgs,
    },
}

#[derive(Args)]
struct ClusterArgs {
    /// Join a cluster through this PubSub backend: redis://HOST:PORT or postgres://... Nodes
    /// sharing it (and --cluster) share broadcasts, Presence and long-poll sessions.
    #[arg(long, env = "FAWKES_PUBSUB")]
    pubsub: Option<String>,
    /// The cluster's name on the backend (nodes with the same name form one cluster).
    #[arg(long, env = "FAWKES_CLUSTER", default_value = "fawkes")]
    cluster: String,
    /// Key that signs long-poll tokens; every node of a cluster needs the same one. Required
    /// with --pubsub.
    #[arg(long, env = "FAWKES_SECRET", hide_env_values = true)]
    secret: Option<String>,
    /// Seconds without a word from a node before its presences are removed.
    #[arg(long, default_value_t = 30.0)]
    presence_timeout: f64,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .init();
    let Command::Serve { bind, database, cluster } = Cli::parse().command;
    match serve(bind, database, cluster).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "fawkes serve failed");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn serve(bind: SocketAddr, database: String, cluster: ClusterArgs) -> Result<(), Box<dyn std::error::Error>> {
    let pubsub = pubsub(&cluster)?;
    let db = Db::connect(&database).await?;
    db.notify_on("fawkes_events").await?;
    let events = TableStream::start(db.clone(), StreamOptions::table("fawkes_events")).await?;
    let endpoint = Endpoint::builder()
        .router(fawkes_server::demo::router_with_events(events))
        .config(Config::default())
        .pubsub(pubsub)
        .build();
    let _db_clients = DbClients::start(db, endpoint.clone(), DbClientsOptions::default()).await?;
    let mut longpoll = LongPollOptions::default();
    if let Some(secret) = &cluster.secret {
        longpoll = longpoll.secret(secret.as_bytes());
    }
    let listener = tokio::net::TcpListener::bind(bind).await?;
    let addr = listener.local_addr()?;
    tracing::info!(
        %addr,
        database = %redact(&database),
        pubsub = %cluster.pubsub.as_deref().map_or("none".into(), redact),
        node = %endpoint.pubsub().node(),
        "listening on http://{addr}"
    );
    let app = fawkes_server::app_with(endpoint.clone(), longpoll);
    fawkes_server::serve(listener, app, endpoint, fawkes_server::shutdown_signal()).await?;
    Ok(())
}

/// The PubSub `--pubsub` asks for: alone, or a node of a Redis or PostgreSQL cluster.
fn pubsub(args: &ClusterArgs) -> Result<PubSub, Box<dyn std::error::Error>> {
    let Some(url) = &args.pubsub else { return Ok(PubSub::new()) };
    if args.secret.is_none() {
        return Err("--pubsub needs --secret (or FAWKES_SECRET), the same on every node, so that any node \
                    can read a long-poll token and forward the request to the node holding its session"
            .into());
    }
    let timeout = Duration::try_from_secs_f64(args.presence_timeout)
        .map_err(|_| format!("--presence-timeout {}: not a number of seconds", args.presence_timeout))?;
    let options = ClusterOptions::default().node_timeout(timeout);
    if url.starts_with("redis://") || url.starts_with("rediss://") {
        let adapter = RedisAdapter::with_options(url, RedisOptions::default().cluster(&args.cluster))?;
        Ok(PubSub::with_options(adapter, options))
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let adapter = PostgresAdapter::with_options(url, PostgresOptions::default().cluster(&args.cluster))?;
        Ok(PubSub::with_options(adapter, options))
    } else {
        Err(format!("--pubsub {}: expected redis://... or postgres://...", redact(url)).into())
    }
}

/// The URL without its password, for logs.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => match url[scheme + 3..at].split_once(':') {
            Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
            None => url.to_owned(),
        },
        _ => url.to_owned(),
    }
}
