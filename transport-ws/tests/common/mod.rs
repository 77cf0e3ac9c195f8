//! What the WebSocket scenario tests share: a server on a real TCP port and a raw Phoenix client.
#![allow(dead_code, missing_debug_implementations)]

use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::{ConnectInfo, Request};
use bytes::Bytes;
use fawkes_channel::{Config, Endpoint, Payload, PeerAddr, Router};
use fawkes_serializer::{Frame, Message, Ref, Serializer, ServerMessage};
use fawkes_testkit::TestChannel;
use fawkes_transport_ws::WebSocketService;
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::{self, Message as WsMessage};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// An endpoint with the conformance kit's `test:*` channel and connect callback.
pub fn endpoint(config: Config) -> Endpoint {
    Endpoint::builder()
        .router(Router::new().channel("test:*", TestChannel::default))
        .config(config)
        .on_connect(fawkes_testkit::connect)
        .build()
}

/// A WebSocket server on an ephemeral loopback port at `/socket/websocket`, with the peer's
/// address passed on to the endpoint; stops when dropped.
pub struct TestServer {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its endpoint.
    pub endpoint: Endpoint,
    task: tokio::task::JoinHandle<()>,
}

impl TestServer {
    /// Serves [`endpoint`] with `config`.
    pub async fn start(config: Config) -> TestServer {
        TestServer::serve(endpoint(config)).await
    }

    /// Serves `endpoint`.
    pub async fn serve(endpoint: Endpoint) -> TestServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        let app = axum::Router::new()
            .route_service("/socket/websocket", WebSocketService::new(endpoint.clone()))
            .layer(axum::middleware::map_request(peer_addr));
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>()).await;
        });
        TestServer { addr, endpoint, task }
    }

    /// The socket URL for `query` (e.g. `vsn=2.0.0`).
    pub fn url(&self, query: &str) -> String {
        format!("ws://{}/socket/websocket?{query}", self.addr)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn peer_addr(mut req: Request) -> Request {
    if let Some(ConnectInfo(addr)) = req.extensions().get::<ConnectInfo<SocketAddr>>().copied() {
        req.extensions_mut().insert(PeerAddr(addr));
    }
    req
}

/// How long a test waits for an expected frame before failing.
pub const WAIT: Duration = Duration::from_secs(5);

/// What a raw client read.
#[derive(Debug)]
pub enum Received {
    /// A decoded server message.
    Message(ServerMessage),
    /// The server closed with this code.
    Closed(Option<u16>),
}

/// A Phoenix client speaking raw frames, for checks below what phoenix.js exposes.
pub struct RawClient {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    serializer: Serializer,
    next_ref: u64,
}

impl RawClient {
    /// Connects with V2.
    pub async fn connect(server: &TestServer) -> RawClient {
        RawClient::connect_url(&server.url("vsn=2.0.0"), Serializer::V2).await.expect("connect")
    }

    /// Connects to `url` speaking `serializer`.
    pub async fn connect_url(url: &str, serializer: Serializer) -> Result<RawClient, tungstenite::Error> {
        let (ws, _) = tokio_tungstenite::connect_async(url).await?;
        Ok(RawClient { ws, serializer, next_ref: 0 })
    }

    /// Sends a raw WebSocket message.
    pub async fn send_raw(&mut self, msg: WsMessage) {
        self.ws.send(msg).await.expect("send");
    }

    /// Sends a raw WebSocket message, returning the error instead of panicking.
    pub async fn send_raw_checked(&mut self, msg: WsMessage) -> Result<(), tungstenite::Error> {
        self.ws.send(msg).await
    }

    /// Sends a raw text frame.
    pub async fn send_text(&mut self, text: &str) {
        self.send_raw(WsMessage::text(text)).await;
    }

    /// Sends a message with a fresh ref; returns the ref.
    pub async fn push(&mut self, join_ref: Option<&str>, topic: &str, event: &str, payload: impl Into<Payload>) -> Ref {
        self.next_ref += 1;
        let msg_ref = Ref::new(self.next_ref.to_string());
        let msg = Message {
            join_ref: join_ref.map(Ref::new),
            msg_ref: Some(msg_ref.clone()),
            topic: topic.into(),
            event: event.into(),
            payload: payload.into(),
        };
        let frame = self.serializer.encode_message(&msg).expect("encodable");
        self.send_raw(match frame {
            Frame::Text(t) => WsMessage::Text(String::from_utf8(t.to_vec()).expect("utf-8").into()),
            Frame::Binary(b) => WsMessage::Binary(b),
        })
        .await;
        msg_ref
    }

    /// Joins `topic` with `params`, using the join's ref as its join ref; returns the reply.
    pub async fn join(&mut self, topic: &str, params: Value) -> (Ref, fawkes_serializer::Reply) {
        let join_ref = (self.next_ref + 1).to_string();
        let r = self.push(Some(&join_ref), topic, "phx_join", params).await;
        let reply = self.reply_to(&r).await;
        (r, reply)
    }

    /// The next thing received, or `None` after [`WAIT`].
    pub async fn recv(&mut self) -> Option<Received> {
        let next = tokio::time::timeout(WAIT, async {
            loop {
                match self.ws.next().await {
                    Some(Ok(WsMessage::Text(t))) => {
                        return Received::Message(
                            self.serializer.decode_server(&Frame::Text(Bytes::from(t))).expect("server frame decodes"),
                        );
                    }
                    Some(Ok(WsMessage::Binary(b))) => {
                        return Received::Message(
                            self.serializer.decode_server(&Frame::Binary(b)).expect("server frame decodes"),
                        );
                    }
                    Some(Ok(WsMessage::Close(frame))) => {
                        return Received::Closed(frame.map(|f| u16::from(f.code)));
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(_)) | None => return Received::Closed(None),
                }
            }
        });
        next.await.ok()
    }

    /// The next server message; panics on close or timeout.
    pub async fn message(&mut self) -> ServerMessage {
        match self.recv().await {
            Some(Received::Message(m)) => m,
            other => panic!("expected a message, got {other:?}"),
        }
    }

    /// Skips messages until the reply to `msg_ref`.
    pub async fn reply_to(&mut self, msg_ref: &Ref) -> fawkes_serializer::Reply {
        loop {
            if let ServerMessage::Reply(r) = self.message().await
                && r.msg_ref.as_ref() == Some(msg_ref)
            {
                return r;
            }
        }
    }

    /// Waits for the server to close; returns the close code.
    pub async fn closed(&mut self) -> Option<u16> {
        loop {
            match self.recv().await {
                Some(Received::Closed(code)) => return code,
                Some(Received::Message(_)) => continue,
                None => panic!("server did not close within {WAIT:?}"),
            }
        }
    }
}
