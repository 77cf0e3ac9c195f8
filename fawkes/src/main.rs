//! `fawkes serve`: the demo app over WebSocket, with its chat page at `/`.

use std::net::SocketAddr;

use clap::{Parser, Subcommand};
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
        /// Database for the database transport and table streams (SQLite file created if missing,
        /// or postgres://...).
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

async fn serve(bind: SocketAddr, database: String) -> std::io::Result<()> {
    let endpoint = Endpoint::builder().router(fawkes::demo::router()).config(Config::default()).build();
    let listener = tokio::net::TcpListener::bind(bind).await?;
    tracing::info!(addr = %listener.local_addr()?, database, "listening on http://{}", listener.local_addr()?);
    fawkes::server::serve(listener, endpoint, fawkes::server::shutdown_signal()).await
}
