//! The conformance kit over WebSocket, on a real TCP port.

mod common;

use common::TestServer;
use fawkes_channel::{Endpoint, Frame};
use fawkes_testkit::{Capabilities, Connection, Received, Refused, Transport};
use futures_util::{SinkExt as _, StreamExt as _};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// A WebSocket server for one endpoint; stops when dropped.
struct Ws(TestServer);

async fn serve(endpoint: Endpoint) -> Ws {
    Ws(TestServer::serve(endpoint).await)
}

struct WsConn(WebSocketStream<MaybeTlsStream<TcpStream>>);

impl Transport for Ws {
    type Connection = WsConn;

    async fn connect(&self, params: &[(&str, &str)]) -> Result<WsConn, Refused> {
        let query: Vec<String> = params.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let url = self.0.url(&query.join("&"));
        match tokio_tungstenite::connect_async(url).await {
            Ok((ws, _)) => Ok(WsConn(ws)),
            Err(tungstenite::Error::Http(res)) => {
                assert_eq!(res.status(), 403, "a refused WebSocket connect answers the upgrade with 403");
                Err(Refused("HTTP 403".into()))
            }
            Err(e) => panic!("WebSocket connect failed: {e}"),
        }
    }
}

impl Connection for WsConn {
    async fn send(&mut self, frames: Vec<Frame>) {
        for frame in frames {
            let msg = match frame {
                Frame::Text(t) => Message::Text(String::from_utf8_lossy(&t).into_owned().into()),
                Frame::Binary(b) => Message::Binary(b),
            };
            if self.0.feed(msg).await.is_err() {
                return;
            }
        }
        let _ = self.0.flush().await;
    }

    async fn recv(&mut self) -> Received {
        loop {
            return match self.0.next().await {
                Some(Ok(Message::Text(t))) => Received::Frame(Frame::text(t.as_str())),
                Some(Ok(Message::Binary(b))) => Received::Frame(Frame::Binary(b)),
                Some(Ok(Message::Close(frame))) => Received::Closed(format!("close {:?}", frame.map(|f| f.code))),
                Some(Ok(_)) => continue,
                Some(Err(e)) => Received::Closed(format!("error: {e}")),
                None => Received::Closed("the connection ended".into()),
            };
        }
    }

    async fn close(&mut self) {
        let _ = self.0.close(None).await;
    }
}

#[tokio::test]
async fn websocket_passes_the_conformance_kit() {
    let report = fawkes_testkit::run("websocket", Capabilities::all(), serve).await;
    eprintln!("{report}");
    let skipped: Vec<&str> = report.skipped.iter().map(|(name, _)| *name).collect();
    assert_eq!(skipped, ["binary_as_text"], "WebSocket carries everything");
}
