//! The server the phoenix.js suite drives: the demo app plus the `test:*` channel.
//!
//! `fawkes-test-server [--bind ADDR] [--heartbeat-timeout-ms N] [--poll-window-ms N]
//! [--session-idle-ms N] [--no-websocket] [--database URL] [--history URL]` prints
//! `listening on http://ADDR` once ready and exits cleanly on SIGTERM or Ctrl-C.

use std::io::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use fawkes::Config;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:0")]
    bind: SocketAddr,
    #[arg(long, default_value_t = 60_000)]
    heartbeat_timeout_ms: u64,
    /// How long a long-poll GET waits for messages.
    #[arg(long, default_value_t = 10_000)]
    poll_window_ms: u64,
    /// How long a long-poll session lives without a GET.
    #[arg(long, default_value_t = 20_000)]
    session_idle_ms: u64,
    /// Serve long-poll only: the WebSocket route answers 404, as behind a proxy that blocks
    /// upgrades (for the fallback tests).
    #[arg(long)]
    no_websocket: bool,
    /// Serve database clients and the `fawkes_events` stream from this database too.
    #[arg(long)]
    database: Option<String>,
    /// Keep `feed:*` history in this SQLite or PostgreSQL database rather than in memory.
    #[arg(long)]
    history: Option<String>,
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let config = Config::default().heartbeat_timeout(Duration::from_millis(args.heartbeat_timeout_ms));
    let mut _db_clients = None;
    let endpoint = match &args.database {
        None => fawkes_tests::endpoint(config),
        Some(url) => {
            use fawkes::db::{Db, DbClients, DbClientsOptions, StreamOptions, TableStream};
            let db = Db::connect(url).await.map_err(std::io::Error::other)?;
            db.notify_on("fawkes_events").await.map_err(std::io::Error::other)?;
            let options = StreamOptions::table("fawkes_events").poll_interval(Duration::from_millis(20));
            let events = TableStream::start(db.clone(), options).await.map_err(std::io::Error::other)?;
            let router =
                fawkes_server::demo::router_with_events(events).channel("test:*", fawkes_tests::TestChannel::default);
            let endpoint = fawkes_tests::endpoint_with(router, config);
            let options = DbClientsOptions::default().poll_interval(Duration::from_millis(20));
            _db_clients = Some(DbClients::start(db, endpoint.clone(), options).await.map_err(std::io::Error::other)?);
            endpoint
        }
    };
    if let Some(url) = &args.history {
        let store = fawkes::db::SqlHistory::connect(url).await.map_err(std::io::Error::other)?;
        endpoint.history().set_store(std::sync::Arc::new(store));
    }
    let listener = tokio::net::TcpListener::bind(args.bind).await?;
    let mut out = std::io::stdout();
    writeln!(out, "listening on http://{}", listener.local_addr()?)?;
    out.flush()?;
    let longpoll = fawkes::longpoll::LongPollOptions::default()
        .poll_window(Duration::from_millis(args.poll_window_ms))
        .session_idle(Duration::from_millis(args.session_idle_ms));
    let mut app = fawkes_server::app_with(endpoint.clone(), longpoll);
    if args.no_websocket {
        app = app.layer(axum::middleware::from_fn(block_websocket));
    }
    fawkes_server::serve(listener, app, endpoint, fawkes_server::shutdown_signal()).await
}

async fn block_websocket(req: axum::extract::Request, next: axum::middleware::Next) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    if req.uri().path().ends_with("/websocket") {
        return (axum::http::StatusCode::NOT_FOUND, "websocket blocked").into_response();
    }
    next.run(req).await
}
