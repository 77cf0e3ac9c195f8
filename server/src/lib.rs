//! The `fawkes` server: the demo app, its page and metrics, every transport mounted under one
//! path, and the one graceful shutdown path (stop accepting, close every socket, wait, leave the
//! cluster).
//!
//! The binary `fawkes serve` is built from these pieces; so are the test server and the load
//! generator's in-process server. A library user who wants only channels and transports depends
//! on the `fawkes` facade instead.
//!
//! ```no_run
//! use fawkes::Endpoint;
//!
//! # async fn run() -> std::io::Result<()> {
//! let endpoint = Endpoint::new(fawkes_server::demo::router());
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:4000").await?;
//! let app = fawkes_server::app(endpoint.clone());
//! fawkes_server::serve(listener, app, endpoint, fawkes_server::shutdown_signal()).await
//! # }
//! ```
#![forbid(unsafe_code)]

pub mod api;
pub mod auth;
pub mod config;
pub mod demo;
pub mod feed;
pub mod metrics;
pub mod namespace;
pub mod proxy;
mod server;

pub use server::{
    SOCKET_PATH, ServeOptions, app, app_with, app_with_metrics, serve, serve_with, shutdown_signal, sockets,
};
