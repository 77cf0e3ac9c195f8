//! `fawkes serve`: the demo app over WebSocket, with its chat page at `/`.

use std::net::SocketAddr;

use clap::{Parser, Subcommand};
use fawkes::db::{Db, DbClients, DbClientsOptions, StreamOptions, TableStream};
use fawkes::{Config, Endpoint};
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
    },
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .init();
    let Command::Serve { bind, database } = Cli::parse().command;
    match serve(bind, database).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "fawkes serve failed");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn serve(bind: SocketAddr, database: String) -> Result<(), Box<dyn std::error::Error>> {
    let db = Db::connect(&database).await?;
    db.notify_on("fawkes_events").await?;
    let events = TableStream::start(db.clone(), StreamOptions::table("fawkes_events")).await?;
    let endpoint =
        Endpoint::builder().router(fawkes::demo::router_with_events(events)).config(Config::default()).build();
    let _db_clients = DbClients::start(db, endpoint.clone(), DbClientsOptions::default()).await?;
    let listener = tokio::net::TcpListener::bind(bind).await?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, database = %redact(&database), "listening on http://{addr}");
    fawkes::server::serve(listener, endpoint, fawkes::server::shutdown_signal()).await?;
    Ok(())
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
