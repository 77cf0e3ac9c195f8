//! SSE clients that speak Fawkes's Server-Sent Events transport as `clients/js/sse-transport.js`
//! does: `GET ?vsn=2.0.0` opens a session and streams events (the first, `phx_session`, carries
//! the token), and `POST ...?token=T` sends `application/x-ndjson` batches.
//!
//! Each client holds one HTTP/1.1 connection for its stream and, where it pushes (echo,
//! publisher, and every client's join), one for posts, as a browser has.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use bytes::Bytes;
use fawkes_serializer::{Reply, ServerMessage};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::header::{ACCEPT, CONTENT_TYPE, HOST};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde_json::json;
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

    async fn request(&mut self, method: Method, uri: &str, ndjson: Option<String>) -> Res<hyper::Response<Incoming>> {
        self.sender.ready().await.map_err(|e| format!("{method} {uri}: the connection closed: {e}"))?;
        let mut request = Request::builder().method(method.clone()).uri(uri).header(HOST, self.authority.as_str());
        let body = match ndjson {
            Some(lines) => {
                request = request.header(CONTENT_TYPE, "application/x-ndjson");
                Full::new(Bytes::from(lines))
            }
            None => {
                request = request.header(ACCEPT, "text/event-stream");
                Full::new(Bytes::new())
            }
        };
        let request = request.body(body).map_err(|e| format!("{method} {uri}: cannot build the request: {e}"))?;
        self.sender.send_request(request).await.map_err(|e| format!("{method} {uri}: no answer: {e}"))
    }

    /// `POST` a batch of lines; the server answers HTTP 200 with `{"status":200,...}` once it has
    /// taken them all (as long-poll does: a gone session is `{"status":410}` in an HTTP 200).
    async fn post(&mut self, uri: &str, lines: String) -> Res<()> {
        let count = lines.lines().count();
        let response = self.request(Method::POST, uri, Some(lines)).await?;
        let status = response.status();
        let body = response.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        let answered = serde_json::from_slice::<serde_json::Value>(&body).ok().and_then(|v| v["status"].as_u64());
        if status != hyper::StatusCode::OK || answered != Some(200) {
            return Err(format!(
                "POST {uri} ({count} lines): expected HTTP 200 with status 200, got {status} {:?}",
                String::from_utf8_lossy(&body)
            ));
        }
        Ok(())
    }
}

/// An open event stream.
struct Stream {
    body: Incoming,
    buf: Vec<u8>,
    uri: String,
}

/// One parsed event: its name (`None` for a message) and data.
struct Event {
    name: Option<String>,
    data: String,
}

impl Stream {
    /// `GET {path}/sse?vsn=2.0.0`: a stream whose first event is the session's token. Returns the
    /// stream and the URI to post to.
    async fn open(ctx: &Ctx, http: &mut Http) -> Res<(Stream, String)> {
        let uri = format!("{}/sse?vsn=2.0.0", ctx.target.path);
        let response = http.request(Method::GET, &uri, None).await?;
        if response.status() != hyper::StatusCode::OK {
            return Err(format!("GET {uri}: expected HTTP 200 and an event stream, got {}", response.status()));
        }
        let mut stream = Stream { body: response.into_body(), buf: Vec::new(), uri };
        let first = stream.next().await?;
        if first.name.as_deref() != Some("phx_session") {
            return Err(format!("GET {}: expected a phx_session event first, got {:?}", stream.uri, first.name));
        }
        let post_uri = format!("{}/sse?token={}", ctx.target.path, query_escape(&first.data));
        Ok((stream, post_uri))
    }

    /// The next event (comments skipped).
    async fn next(&mut self) -> Res<Event> {
        loop {
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = self.buf.drain(..end + 2).collect();
                let block = String::from_utf8_lossy(&block);
                let mut event = Event { name: None, data: String::new() };
                let mut data = Vec::new();
                for line in block.lines() {
                    if let Some(name) = line.strip_prefix("event: ") {
                        event.name = Some(name.to_owned());
                    } else if let Some(line) = line.strip_prefix("data: ") {
                        data.push(line);
                    }
                }
                if data.is_empty() && event.name.is_none() {
                    continue;
                }
                event.data = data.join("\n");
                return Ok(event);
            }
            match self.body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
                Some(Err(e)) => return Err(format!("GET {}: the stream broke off: {e}", self.uri)),
                None => return Err(format!("GET {}: the stream ended", self.uri)),
            }
        }
    }

    /// The next message; a `phx_socket_close` event is an error naming the server's reason.
    async fn message(&mut self) -> Res<ServerMessage> {
        let event = self.next().await?;
        match event.name.as_deref() {
            None => decode(event.data),
            Some("phx_socket_close") => Err(format!("the server closed the socket: {}", event.data)),
            Some(other) => Err(format!("unexpected event {other:?}")),
        }
    }
}

/// Reads the stream forever, handing replies to the returned receiver; `new_msg` broadcasts are
/// ignored when `ignore_broadcasts` (the publisher hears its own).
fn spawn_reply_reader(ctx: Arc<Ctx>, mut stream: Stream, id: usize, ignore: bool) -> mpsc::UnboundedReceiver<Reply> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let read = async {
            loop {
                match stream.message().await? {
                    ServerMessage::Reply(reply) => {
                        let _ = tx.send(reply);
                    }
                    ServerMessage::Broadcast(b) if ignore && b.event == "new_msg" => {}
                    other => return Err(format!("expected only phx_reply messages, got {other:?}")),
                }
            }
        };
        let result: Res<()> = read.await;
        if let Err(e) = result {
            ctx.fail(format!("SSE client {id}: {e}"));
        }
    });
    rx
}

async fn next_reply(replies: &mut mpsc::UnboundedReceiver<Reply>, what: &str) -> Res<Reply> {
    match tokio::time::timeout(REPLY_TIMEOUT, replies.recv()).await {
        Ok(Some(reply)) => Ok(reply),
        Ok(None) => Err(format!("expected the reply to {what}, but the stream's reader ended")),
        Err(_) => Err(format!("expected the reply to {what} within {REPLY_TIMEOUT:?}")),
    }
}

/// Opens a stream and a post connection and joins; returns the post connection and URI and
/// the replies.
async fn joined(ctx: &Arc<Ctx>, id: usize, ignore: bool) -> Res<(Http, String, mpsc::UnboundedReceiver<Reply>)> {
    let source = ctx.target.source_addr(id);
    let mut streaming = Http::connect(ctx, source).await?;
    let (stream, post_uri) = Stream::open(ctx, &mut streaming).await?;
    let mut posts = Http::connect(ctx, source).await?;
    let mut replies = spawn_reply_reader(ctx.clone(), stream, id, ignore);
    posts.post(&post_uri, join_frame()).await?;
    expect_ok(&next_reply(&mut replies, "phx_join").await?, "1", "phx_join")?;
    Ok((posts, post_uri, replies))
}

/// A request/response client: one `ping` outstanding at a time, answered on its stream.
pub async fn echo_client(ctx: Arc<Ctx>, id: usize) -> Res<()> {
    let permit = ctx.gate.acquire().await.map_err(|e| e.to_string())?;
    let (mut posts, post_uri, mut replies) = joined(&ctx, id, false).await?;
    drop(permit);
    ctx.joined.fetch_add(1, Ordering::Relaxed);

    let _ = ctx.watch_phase().wait_for(|p| *p >= Phase::Measure).await;
    let mut n = 1u64;
    while ctx.phase() == Phase::Measure {
        n += 1;
        let msg_ref = n.to_string();
        let t = ctx.micros();
        ctx.in_flight.fetch_add(1, Ordering::Relaxed);
        let sent = Instant::now();
        posts.post(&post_uri, encode(Some("1"), &msg_ref, TOPIC, "ping", json!({ "t": t }))).await?;
        let reply = next_reply(&mut replies, "ping").await?;
        expect_echo(&reply, &msg_ref, t)?;
        ctx.answered(id, sent.elapsed());
    }
    Ok(())
}

/// A listener: joins, then reads its stream; every `new_msg` must arrive once and in order.
pub async fn subscriber_client(ctx: Arc<Ctx>, id: usize) -> Res<()> {
    let permit = ctx.gate.acquire().await.map_err(|e| e.to_string())?;
    let source = ctx.target.source_addr(id);
    let mut streaming = Http::connect(&ctx, source).await?;
    let (mut stream, post_uri) = Stream::open(&ctx, &mut streaming).await?;
    // The join goes on a short-lived connection; the stream's own connection is busy streaming.
    Http::connect(&ctx, source).await?.post(&post_uri, join_frame()).await?;
    match tokio::time::timeout(REPLY_TIMEOUT, stream.message()).await {
        Ok(Ok(ServerMessage::Reply(reply))) => expect_ok(&reply, "1", "phx_join")?,
        Ok(Ok(other)) => return Err(format!("expected the reply to phx_join, got {other:?}")),
        Ok(Err(e)) => return Err(e),
        Err(_) => return Err(format!("expected the reply to phx_join within {REPLY_TIMEOUT:?}")),
    }
    drop(permit);
    ctx.joined.fetch_add(1, Ordering::Relaxed);

    let mut deliveries = Deliveries::default();
    loop {
        let message = stream.message().await?;
        deliveries.deliver(&ctx, &message)?;
    }
}

/// The broadcast publisher: `rate` `new_msg` per second while measuring, batched per POST.
pub async fn publisher_client(ctx: Arc<Ctx>, id: usize, rate: u32, count: Option<u64>) -> Res<()> {
    let (mut posts, post_uri, mut replies) = joined(&ctx, id, true).await?;
    ctx.joined.fetch_add(1, Ordering::Relaxed);

    let _ = ctx.watch_phase().wait_for(|p| *p >= Phase::Measure).await;
    let start = Instant::now();
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(5));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let (mut sent, mut answered) = (0u64, 0u64);
    while ctx.phase() == Phase::Measure {
        tick.tick().await;
        let due = due(start, rate).min(count.unwrap_or(u64::MAX)).saturating_sub(sent);
        if due == 0 {
            continue;
        }
        let lines: Vec<String> = (sent..sent + due)
            .map(|seq| {
                let payload = crate::ctx::publish_payload(&ctx, seq);
                encode(Some("1"), &(seq + 2).to_string(), TOPIC, "new_msg", payload)
            })
            .collect();
        posts.post(&post_uri, lines.join("\n")).await?;
        sent += due;
        ctx.published.store(sent, Ordering::Relaxed);
        while let Ok(reply) = replies.try_recv() {
            expect_ok(&reply, &(answered + 2).to_string(), "new_msg")?;
            answered += 1;
        }
    }
    Ok(())
}
