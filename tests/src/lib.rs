#![allow(missing_debug_implementations)]
//! Shared pieces of the cross-crate tests: the `test:*` channel, a server to run them against,
//! and a raw Phoenix client over WebSocket.
//!
//! The `test:*` contract (also driven by the phoenix.js suite in `tests/js`):
//! - join params `{"refuse": R}` answer error `{"reason": R}`; `{"crash": true}` panics in join
//!   (error `{"reason": "join crashed"}`); `{"welcome": true}` pushes `welcome` right after the
//!   join reply; otherwise ok
//!   `{"topic": T, "token": <auth token or null>, "params": <connect params>}`.
//! - events: `crash` panics; `stop` replies ok then stops normally; `push`/`broadcast`/
//!   `broadcast_from` `{"event", "payload"}` do that and reply ok; `binary_push`/`binary_broadcast`
//!   send event `binary` with bytes `[1, 2, 3, 255]`; `noreply` answers nothing; `error_reply`
//!   replies error `{"reason": "requested"}`; `echo` replies ok with the payload; `deferred_push`
//!   replies ok, then another task pushes `deferred` with the payload; anything else
//!   replies error `{"reason": "unknown event"}`.
//! - connect is refused when the params contain `reject=true`.
//!
//! (The channel and the connect callback are `fawkes_testkit`'s.)

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use fawkes::{Config, Endpoint, Payload, Router};
use fawkes_serializer::{Frame, Message, Ref, Serializer, ServerMessage};
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::{self, Message as WsMessage};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// The `test:*` channel, its `binary` bytes and its connect callback live in the conformance kit.
pub use fawkes_testkit::{BINARY, TestChannel};

/// The demo routes plus `test:*`.
pub fn router() -> Router {
    fawkes_server::demo::router().channel("test:*", TestChannel::default)
}

/// An endpoint with the test routes and connect callback.
pub fn endpoint(config: Config) -> Endpoint {
    endpoint_with(router(), config)
}

/// An endpoint with `router` and the test connect callback.
pub fn endpoint_with(router: Router, config: Config) -> Endpoint {
    Endpoint::builder().router(router).config(config).on_connect(fawkes_testkit::connect).build()
}

/// A server on an ephemeral loopback port, shut down when dropped.
pub struct TestServer {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its endpoint.
    pub endpoint: Endpoint,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl TestServer {
    /// Starts the test app with `config`.
    pub async fn start(config: Config) -> TestServer {
        let endpoint = endpoint(config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let app = fawkes_server::app(endpoint.clone());
        let task = tokio::spawn(fawkes_server::serve(listener, app, endpoint.clone(), async {
            let _ = stopped.await;
        }));
        TestServer { addr, endpoint, stop: Some(stop), task: Some(task) }
    }

    /// The socket URL for `query` (e.g. `vsn=2.0.0`).
    pub fn url(&self, query: &str) -> String {
        format!("ws://{}/socket/websocket?{query}", self.addr)
    }

    /// Shuts down gracefully and waits for it.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
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
