//! Long-poll clients that speak Phoenix's protocol as phoenix.js's `LongPoll` transport does:
//! `GET ?vsn=2.0.0` opens a session (status 410 and a token), `GET ...&token=T` polls in a loop,
//! and `POST ...&token=T` sends `application/x-ndjson` batches.
//!
//! Each session owns its HTTP/1.1 keep-alive connections, bound to its own source address: one
//! for polls and, where it pushes while a poll is waiting (echo, publisher), one for posts, as a
//! browser has. A broadcast subscriber posts only its join, before its first poll, so it sends
//! that on the poll connection and holds one socket.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use bytes::Bytes;
use fawkes_serializer::{Reply, ServerMessage};
use http_body_util::{BodyExt as _, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{ACCEPT, CONTENT_TYPE, HOST};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::ctx::{
    Ctx, Deliveries, Phase, REPLY_TIMEOUT, Res, TOPIC, decode, due, encode, expect_echo, expect_ok, join_frame,
};
use crate::net::query_escape;

/// One HTTP/1.1 connection to the server.
struct Http {
    sender: SendRequest<Full<Bytes>>,
    authority: String,
}

/// A long-poll answer: `{"status", "token", "messages"}`.
struct Envelope {
    status: u64,
    token: Option<String>,
    messages: Vec<String>,
}

impl Http {
    async fn connect(ctx: &Ctx, source: Option<IpAddr>) -> Res<Http> {
        let stream = ctx.target.connect(source).await?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("HTTP/1.1 handshake with {}: {e}", ctx.target.addr))?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(Http { sender, authority: ctx.target.authority.clone() })
    }

    /// Sends one request and reads its envelope. Every long-poll answer is HTTP 200 with JSON.
    async fn send(&mut self, method: Method, uri: &str, ndjson: Option<String>) -> Res<Envelope> {
        self.sender
            .ready()
            .await
            .map_err(|e| format!("{method} {uri}: the connection closed before the request: {e}"))?;
        let mut request = Request::builder()
            .method(method.clone())
            .uri(uri)
            .header(HOST, self.authority.as_str())
            .header(ACCEPT, "application/json");
        let body = match ndjson {
            Some(lines) => {
                request = request.header(CONTENT_TYPE, "application/x-ndjson");
                Full::new(Bytes::from(lines))
            }
            None => Full::new(Bytes::new()),
        };
        let request = request.body(body).map_err(|e| format!("{method} {uri}: cannot build the request: {e}"))?;
        let response =
            self.sender.send_request(request).await.map_err(|e| format!("{method} {uri}: no answer: {e}"))?;
        let http_status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("{method} {uri}: the answer's body broke off: {e}"))?
            .to_bytes();
        if http_status != hyper::StatusCode::OK {
            return Err(format!(
                "{method} {uri}: expected HTTP 200 with a JSON envelope, got HTTP {http_status} {:?}",
                String::from_utf8_lossy(&body)
            ));
        }
        parse_envelope(&body).map_err(|e| format!("{method} {uri}: {e}"))
    }
}

fn parse_envelope(body: &[u8]) -> Res<Envelope> {
    let shape =
        || format!("expected {{\"status\":N,\"token\":T,\"messages\":[..]}}, got {:?}", String::from_utf8_lossy(body));
    let value: Value = serde_json::from_slice(body).map_err(|_| shape())?;
    let status = value.get("status").and_then(Value::as_u64).ok_or_else(shape)?;
    let token = value.get("token").and_then(Value::as_str).map(str::to_owned);
    let messages = match value.get("messages") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => {
            items.iter().map(|m| m.as_str().map(str::to_owned).ok_or_else(shape)).collect::<Res<Vec<_>>>()?
        }
        Some(_) => return Err(shape()),
    };
    Ok(Envelope { status, token, messages })
}

/// An open long-poll session and its poll connection.
struct Session {
    ctx: Arc<Ctx>,
    poll: Http,
    poll_uri: String,
    post_uri: String,
}

impl Session {
    /// `GET {path}/longpoll?vsn=2.0.0`: the server opens a session and answers 410 with its token.
    async fn open(ctx: &Arc<Ctx>, source: Option<IpAddr>) -> Res<Session> {
        let mut poll = Http::connect(ctx, source).await?;
        let open_uri = format!("{}/longpoll?vsn=2.0.0", ctx.target.path);
        let envelope = poll.send(Method::GET, &open_uri, None).await?;
        let token = match (envelope.status, envelope.token) {
            (410, Some(token)) => token,
            (status, token) => {
                return Err(format!(
                    "GET {open_uri}: expected status 410 with a token (a new session), got status {status}, token {token:?}"
                ));
            }
        };
        let session_uri = format!("{}/longpoll?vsn=2.0.0&token={}", ctx.target.path, query_escape(&token));
        Ok(Session { ctx: ctx.clone(), poll, poll_uri: session_uri.clone(), post_uri: session_uri })
    }

    /// One poll: the messages of a 200, none for a 204.
    async fn poll(&mut self) -> Res<Vec<ServerMessage>> {
        let envelope = self.poll.send(Method::GET, &self.poll_uri, None).await?;
        match envelope.status {
            200 => envelope.messages.into_iter().map(decode).collect(),
            204 => Ok(Vec::new()),
            status => Err(format!(
                "GET {}: expected status 200 (messages) or 204 (none yet), got status {status}{}",
                self.poll_uri,
                if status == 410 {
                    " (session gone: the server ended it, e.g. for a heartbeat timeout or as a slow consumer)"
                } else {
                    ""
                }
            )),
        }
    }

    /// Polls until the reply to the join arrives; nothing else may come before it.
    async fn await_join_reply(&mut self) -> Res<()> {
        let waiting = async {
            loop {
                match self.poll().await?.into_iter().next() {
                    Some(ServerMessage::Reply(reply)) => return expect_ok(&reply, "1", "phx_join"),
                    Some(other) => return Err(format!("expected the reply to phx_join, got {other:?}")),
                    None => {}
                }
            }
        };
        tokio::time::timeout(REPLY_TIMEOUT, waiting)
            .await
            .map_err(|_| format!("expected the reply to phx_join within {REPLY_TIMEOUT:?}"))?
    }

    /// Polls forever, handing each message to `on_message`.
    async fn poll_loop(mut self, mut on_message: impl FnMut(&Ctx, ServerMessage) -> Res<()>) -> Res<()> {
        loop {
            for message in self.poll().await? {
                on_message(&self.ctx, message)?;
            }
        }
    }
}

/// `POST` a batch of lines; the server answers status 200 once it has taken them all.
async fn post(http: &mut Http, uri: &str, lines: String) -> Res<()> {
    let count = lines.lines().count();
    let envelope = http.send(Method::POST, uri, Some(lines)).await?;
    if envelope.status != 200 {
        return Err(format!("POST {uri} ({count} lines): expected status 200, got status {}", envelope.status));
    }
    Ok(())
}

async fn next_reply(replies: &mut mpsc::UnboundedReceiver<Reply>, what: &str) -> Res<Reply> {
    match tokio::time::timeout(REPLY_TIMEOUT, replies.recv()).await {
        Ok(Some(reply)) => Ok(reply),
        Ok(None) => Err(format!("expected the reply to {what}, but the session's poll loop ended")),
        Err(_) => Err(format!("expected the reply to {what} within {REPLY_TIMEOUT:?}")),
    }
}

/// Spawns the poll loop of a session that pushes: replies go to the returned receiver;
/// `new_msg` broadcasts are ignored when `ignore_broadcasts` (the publisher hears its own).
fn spawn_reply_poller(session: Session, id: usize, ignore_broadcasts: bool) -> mpsc::UnboundedReceiver<Reply> {
    let (tx, rx) = mpsc::unbounded_channel();
    let ctx = session.ctx.clone();
    tokio::spawn(async move {
        let polled = session
            .poll_loop(|_, message| match message {
                ServerMessage::Reply(reply) => {
                    let _ = tx.send(reply);
                    Ok(())
                }
                ServerMessage::Broadcast(b) if ignore_broadcasts && b.event == "new_msg" => Ok(()),
                other => Err(format!("expected only phx_reply messages, got {other:?}")),
            })
            .await;
        if let Err(e) = polled {
            ctx.fail(format!("long-poll session {id}: {e}"));
        }
    });
    rx
}

/// A request/response client: one `ping` outstanding at a time, answered through its poll.
pub async fn echo_session(ctx: Arc<Ctx>, id: usize) -> Res<()> {
    let permit = ctx.gate.acquire().await.map_err(|e| e.to_string())?;
    let source = ctx.target.source_addr(id);
    let session = Session::open(&ctx, source).await?;
    let post_uri = session.post_uri.clone();
    let mut posts = Http::connect(&ctx, source).await?;
    let mut replies = spawn_reply_poller(session, id, false);
    post(&mut posts, &post_uri, join_frame()).await?;
    expect_ok(&next_reply(&mut replies, "phx_join").await?, "1", "phx_join")?;
    drop(permit);
    ctx.joined.fetch_add(1, Ordering::Relaxed);

    let _ = ctx.watch_phase().wait_for(|p| *p >= Phase::Measure).await;
    let mut n = 1u64;
    while ctx.phase() == Phase::Measure {
        n += 1;
        let msg_ref = n.to_string();
        let t = ctx.micros();
        let line = encode(Some("1"), &msg_ref, TOPIC, "ping", json!({ "t": t }));
        ctx.in_flight.fetch_add(1, Ordering::Relaxed);
        let sent = Instant::now();
        post(&mut posts, &post_uri, line).await?;
        let reply = next_reply(&mut replies, "ping").await?;
        expect_echo(&reply, &msg_ref, t)?;
        ctx.answered(id, sent.elapsed());
    }
    Ok(())
}

/// A listener: joins, then polls; every `new_msg` must arrive once and in order.
pub async fn subscriber_session(ctx: Arc<Ctx>, id: usize) -> Res<()> {
    let permit = ctx.gate.acquire().await.map_err(|e| e.to_string())?;
    let mut session = Session::open(&ctx, ctx.target.source_addr(id)).await?;
    let post_uri = session.post_uri.clone();
    post(&mut session.poll, &post_uri, join_frame()).await?;
    session.await_join_reply().await?;
    drop(permit);
    ctx.joined.fetch_add(1, Ordering::Relaxed);

    let mut deliveries = Deliveries::default();
    session.poll_loop(|ctx, message| deliveries.deliver(ctx, &message)).await
}

/// The broadcast publisher: `rate` `new_msg` per second while measuring, batched per POST as
/// phoenix.js batches pushes made while a POST is outstanding.
pub async fn publisher_session(ctx: Arc<Ctx>, id: usize, rate: u32, count: Option<u64>) -> Res<()> {
    let source = ctx.target.source_addr(id);
    let session = Session::open(&ctx, source).await?;
    let post_uri = session.post_uri.clone();
    let mut posts = Http::connect(&ctx, source).await?;
    let mut replies = spawn_reply_poller(session, id, true);
    post(&mut posts, &post_uri, join_frame()).await?;
    expect_ok(&next_reply(&mut replies, "phx_join").await?, "1", "phx_join")?;
    ctx.joined.fetch_add(1, Ordering::Relaxed);

    let _ = ctx.watch_phase().wait_for(|p| *p >= Phase::Measure).await;
    let start = Instant::now();
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(5));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut sent = 0u64;
    let mut answered = 0u64;
    while ctx.phase() == Phase::Measure {
        tick.tick().await;
        let due = due(start, rate).min(count.unwrap_or(u64::MAX)).saturating_sub(sent);
        if due == 0 {
            continue;
        }
        let mut lines = Vec::with_capacity(due as usize);
        for seq in sent..sent + due {
            let msg_ref = (seq + 2).to_string();
            lines.push(encode(Some("1"), &msg_ref, TOPIC, "new_msg", crate::ctx::publish_payload(&ctx, seq)));
        }
        post(&mut posts, &post_uri, lines.join("\n")).await?;
        sent += due;
        ctx.published.store(sent, Ordering::Relaxed);
        while let Ok(reply) = replies.try_recv() {
            expect_ok(&reply, &(answered + 2).to_string(), "new_msg")?;
            answered += 1;
        }
    }
    Ok(())
}
