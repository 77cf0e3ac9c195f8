//! The server's one shutdown path, as clients see it: every socket is told, then `serve` returns.

use std::time::Duration;

use fawkes::Endpoint;
use futures_util::{SinkExt as _, StreamExt as _};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

const WAIT: Duration = Duration::from_secs(5);

/// Reads until the server's close frame; returns its code.
async fn closed(ws: &mut Ws) -> Option<u16> {
    let close = tokio::time::timeout(WAIT, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return None,
            }
        }
    });
    close.await.expect("the server closes within the wait")
}

#[tokio::test]
async fn shutdown_tells_every_client_with_1001() {
    let endpoint = Endpoint::new(fawkes_server::demo::router());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let app = fawkes_server::app(endpoint.clone());
    let served = tokio::spawn(fawkes_server::serve(listener, app, endpoint, async {
        let _ = stopped.await;
    }));

    let url = |vsn: &str| format!("ws://{addr}/socket/websocket?vsn={vsn}");
    let (mut a, _) = tokio_tungstenite::connect_async(url("2.0.0")).await.expect("connect V2");
    a.send(Message::text(r#"["1","1","room:bye","phx_join",{}]"#)).await.expect("send");
    let Some(Ok(Message::Text(reply))) = a.next().await else { panic!("no join reply") };
    assert!(reply.contains(r#""status":"ok""#), "{reply}");
    let (mut b, _) = tokio_tungstenite::connect_async(url("1.0.0")).await.expect("connect V1");

    let _ = stop.send(());
    assert_eq!(closed(&mut a).await, Some(1001));
    assert_eq!(closed(&mut b).await, Some(1001));
    tokio::time::timeout(WAIT, served).await.expect("shutdown finishes").expect("no panic").expect("served");
}
