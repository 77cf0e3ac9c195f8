//! Serving an endpoint on a listener without any other web framework.

use std::convert::Infallible;
use std::future::Future;

use bytes::Bytes;
use fawkes_channel::Endpoint;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::{PeerAddr, WebSocketService};

/// Serves `endpoint` over WebSocket at `{path}/websocket` on `listener` until `shutdown`
/// completes; other paths answer 404. On shutdown it stops accepting, closes every socket with
/// 1001 (going away) and waits for connections to finish.
pub async fn serve(
    listener: TcpListener,
    path: &str,
    endpoint: Endpoint,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let ws_path: std::sync::Arc<str> = format!("{}/websocket", path.trim_end_matches('/')).into();
    let service = WebSocketService::new(endpoint.clone());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Running out of file descriptors must not end the server.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let service = service.clone();
        let ws_path = ws_path.clone();
        let handler = service_fn(move |mut req: Request<Incoming>| {
            let service = service.clone();
            let ws_path = ws_path.clone();
            async move {
                req.extensions_mut().insert(PeerAddr(peer));
                if req.uri().path() == &*ws_path {
                    Ok::<_, Infallible>(service.handle(req).await)
                } else {
                    let mut res = Response::new(Full::new(Bytes::from_static(b"not found")));
                    *res.status_mut() = StatusCode::NOT_FOUND;
                    Ok(res)
                }
            }
        });
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), handler).with_upgrades();
            let mut conn = std::pin::pin!(conn);
            let result = tokio::select! {
                result = conn.as_mut() => result,
                _ = async { let _ = stop.wait_for(|stop| *stop).await; } => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    endpoint.shutdown();
    if tokio::time::timeout(std::time::Duration::from_secs(5), endpoint.drained()).await.is_err() {
        tracing::warn!(open = endpoint.connected(), "sockets still open after the shutdown grace period");
    }
    Ok(())
}
