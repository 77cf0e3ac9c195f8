//! WebSocket clients (`/socket/websocket?vsn=2.0.0`) for the same workloads as long-poll: a
//! request/response `ping` client, a broadcast subscriber and the broadcast publisher. Each sends
//! a heartbeat every 25 s, as phoenix.js does (every 30 s by default).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use fawkes_serializer::{Ref, ServerMessage};
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::json;
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::ctx::{
    Ctx, Deliveries, Phase, REPLY_TIMEOUT, Res, TOPIC, decode, due, encode, expect_echo, expect_ok, join_frame,
    publish_payload,
};

pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(25);

/// What a client does once joined.
#[derive(Debug, Clone, Copy)]
pub enum Role {
    /// `ping` with `{"t": ..}`, one outstanding at a time: again as soon as the reply comes, or
    /// once every `every` (starting at a point in the first period that depends on the client).
    Echo { every: Option<Duration> },
    /// Receives `new_msg` broadcasts.
    Subscriber,
    /// Sends `rate` `new_msg` per second while measuring, `count` in all if given. With a
    /// `window`, it ignores the rate and keeps at most `window` broadcasts in flight end to end:
    /// the next goes only once the oldest in flight has reached every subscriber.
    Publisher { rate: u32, count: Option<u64>, window: Option<u64> },
    /// Joined and otherwise quiet (heartbeats only).
    Idle,
}

impl Role {
    /// When client `id` of `clients` sends its first paced ping after `start`.
    pub fn first_ping(every: Duration, id: usize, clients: usize) -> Duration {
        every.mul_f64((id % clients.max(1)) as f64 / clients.max(1) as f64)
    }
}

pub type Ws = WebSocketStream<TcpStream>;

pub async fn send(ws: &mut Ws, text: String) -> Res<()> {
    ws.send(WsMessage::text(text)).await.map_err(|e| format!("cannot send a frame: {e}"))
}

/// The next server message; control frames are skipped, a close or a broken socket is an error.
async fn recv(ws: &mut Ws) -> Res<ServerMessage> {
    loop {
        match ws.next().await {
            Some(Ok(WsMessage::Text(text))) => return decode(Bytes::from(text)),
            Some(Ok(WsMessage::Binary(b))) => {
                return Err(format!("expected text frames (JSON payloads only), got a binary frame {b:?}"));
            }
            Some(Ok(WsMessage::Close(frame))) => {
                let why = frame.map(|f| format!("{} {:?}", u16::from(f.code), f.reason.as_str())).unwrap_or_default();
                return Err(format!("expected messages, but the server closed the socket ({why})"));
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(format!("expected messages, but the socket broke: {e}")),
            None => return Err("expected messages, but the socket closed without a close frame".to_owned()),
        }
    }
}

/// How every `new_msg` broadcast on the bench topic begins.
const BROADCAST_PREFIX: &str = "[null,null,\"room:bench\",\"new_msg\",";

enum Incoming {
    Message(ServerMessage),
    /// A `new_msg` broadcast, left as text for [`Deliveries::deliver_text`].
    Broadcast(tokio_tungstenite::tungstenite::Utf8Bytes),
}

/// Like [`recv`], but a subscriber's broadcasts come back undecoded.
async fn recv_or_broadcast(ws: &mut Ws, subscriber: bool) -> Res<Incoming> {
    if !subscriber {
        return recv(ws).await.map(Incoming::Message);
    }
    loop {
        match ws.next().await {
            Some(Ok(WsMessage::Text(text))) if text.starts_with(BROADCAST_PREFIX) => {
                return Ok(Incoming::Broadcast(text));
            }
            Some(Ok(WsMessage::Text(text))) => return decode(Bytes::from(text)).map(Incoming::Message),
            Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_) | WsMessage::Frame(_))) => continue,
            Some(Ok(other)) => return Err(format!("expected text frames, got {other:?}")),
            Some(Err(e)) => return Err(format!("expected messages, but the socket broke: {e}")),
            None => return Err("expected messages, but the socket closed without a close frame".to_owned()),
        }
    }
}

/// Connects client `id` and upgrades to a WebSocket (`/websocket?vsn=2.0.0`).
pub async fn connect(ctx: &Ctx, id: usize) -> Res<Ws> {
    connect_reading(ctx, id, 4096).await
}

/// [`connect`], reading at most `read_buffer` bytes per read: small for clients that receive
/// small frames (a client's memory), large for those that receive megabytes (system calls).
pub async fn connect_reading(ctx: &Ctx, id: usize, read_buffer: usize) -> Res<Ws> {
    let stream = ctx.target.connect(ctx.target.source_addr(id)).await?;
    let url = format!("ws://{}{}/websocket?vsn=2.0.0", ctx.target.authority, ctx.target.path);
    let config = WebSocketConfig::default().read_buffer_size(read_buffer);
    let (ws, _) = tokio_tungstenite::client_async_with_config(url.as_str(), stream, Some(config))
        .await
        .map_err(|e| format!("expected the WebSocket upgrade of {url} to succeed, got: {e}"))?;
    Ok(ws)
}

pub async fn client(ctx: Arc<Ctx>, id: usize, clients: usize, role: Role) -> Res<()> {
    let permit = ctx.gate.acquire().await.map_err(|e| e.to_string())?;
    let mut ws = connect(&ctx, id).await?;
    send(&mut ws, join_frame()).await?;
    let joined = async {
        match recv(&mut ws).await? {
            ServerMessage::Reply(reply) => expect_ok(&reply, "1", "phx_join"),
            other => Err(format!("expected the reply to phx_join, got {other:?}")),
        }
    };
    tokio::time::timeout(REPLY_TIMEOUT, joined)
        .await
        .map_err(|_| format!("expected the reply to phx_join within {REPLY_TIMEOUT:?}"))??;
    drop(permit);
    ctx.joined.fetch_add(1, Ordering::Relaxed);

    let mut phase = ctx.watch_phase();
    let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + HEARTBEAT_EVERY, HEARTBEAT_EVERY);
    let mut heartbeats = 0u64;
    let mut next_ref = 1u64;
    // The outstanding ping: its ref, embedded time, and when it was sent.
    let mut pending: Option<(String, u64, Instant)> = None;
    let mut deliveries = Deliveries::default();
    let mut publish_tick = tokio::time::interval(Duration::from_millis(5));
    publish_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut publishing_since: Option<Instant> = None;
    let mut published = 0u64;
    let mut publish_answered = 0u64;
    // Windowed publisher: the oldest broadcast not yet known to have reached every subscriber.
    let mut oldest_in_flight = 0u64;
    // Paced echo: when the next ping is due.
    let mut next_ping: Option<tokio::time::Instant> = None;

    loop {
        let now_phase = *phase.borrow_and_update();
        if now_phase == Phase::Stop {
            return Ok(());
        }
        let measuring = now_phase == Phase::Measure;
        if let (Role::Echo { every: Some(every) }, true, None) = (role, measuring, next_ping) {
            next_ping = Some(tokio::time::Instant::now() + Role::first_ping(every, id, clients));
        }
        let ping_due = next_ping.is_none_or(|at| at <= tokio::time::Instant::now());
        if let (Role::Echo { every }, true, None, true) = (role, measuring, &pending, ping_due) {
            if let (Some(every), Some(at)) = (every, next_ping) {
                next_ping = Some(crate::ctx::next_ping(at, every));
            }
            next_ref += 1;
            let msg_ref = next_ref.to_string();
            let t = ctx.micros();
            ctx.in_flight.fetch_add(1, Ordering::Relaxed);
            let sent = Instant::now();
            send(&mut ws, encode(Some("1"), &msg_ref, TOPIC, "ping", json!({ "t": t }))).await?;
            pending = Some((msg_ref, t, sent));
        }
        if let (Role::Publisher { .. }, true, None) = (role, measuring, publishing_since) {
            publishing_since = Some(Instant::now());
        }
        let publishing = matches!(role, Role::Publisher { window: None, .. }) && measuring;
        let windowed = matches!(role, Role::Publisher { window: Some(_), .. }) && measuring;
        if let (true, Role::Publisher { count, window: Some(window), .. }) = (windowed, role) {
            let room = ctx.window_room(&mut oldest_in_flight, published, window);
            let due = room.min(count.unwrap_or(u64::MAX).saturating_sub(published));
            for seq in published..published + due {
                let frame = encode(Some("1"), &(seq + 2).to_string(), TOPIC, "new_msg", publish_payload(&ctx, seq));
                ws.feed(WsMessage::text(frame)).await.map_err(|e| format!("cannot send a frame: {e}"))?;
            }
            if due > 0 {
                ws.flush().await.map_err(|e| format!("cannot send a frame: {e}"))?;
                published += due;
                ctx.published.store(published, Ordering::Relaxed);
            }
        }
        let reply_deadline = pending.as_ref().map(|(_, _, sent)| *sent + REPLY_TIMEOUT);
        let ping_wake = if measuring && pending.is_none() { next_ping.map(Instant::from) } else { None };

        tokio::select! {
            changed = phase.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
            }
            _ = heartbeat.tick() => {
                heartbeats += 1;
                send(&mut ws, encode(None, &format!("hb{heartbeats}"), "phoenix", "heartbeat", json!({}))).await?;
            }
            () = sleep_until_opt(ping_wake) => {}
            () = ctx.broadcast_done.notified(), if windowed => {}
            _ = publish_tick.tick(), if publishing => {
                if let (Role::Publisher { rate, count, .. }, Some(since)) = (role, publishing_since) {
                    let due = due(since, rate).min(count.unwrap_or(u64::MAX)).saturating_sub(published);
                    for seq in published..published + due {
                        let frame = encode(Some("1"), &(seq + 2).to_string(), TOPIC, "new_msg", publish_payload(&ctx, seq));
                        ws.feed(WsMessage::text(frame)).await.map_err(|e| format!("cannot send a frame: {e}"))?;
                    }
                    if due > 0 {
                        ws.flush().await.map_err(|e| format!("cannot send a frame: {e}"))?;
                        published += due;
                        ctx.published.store(published, Ordering::Relaxed);
                    }
                }
            }
            () = sleep_until_opt(reply_deadline) => {
                let what = pending.as_ref().map(|(r, _, _)| r.clone()).unwrap_or_default();
                return Err(format!("expected the reply to ping (ref {what:?}) within {REPLY_TIMEOUT:?}"));
            }
            message = recv_or_broadcast(&mut ws, matches!(role, Role::Subscriber)) => {
                let message = match message? {
                    Incoming::Broadcast(text) => {
                        deliveries.deliver_text(&ctx, &text, BROADCAST_PREFIX)?;
                        continue;
                    }
                    Incoming::Message(message) => message,
                };
                match (&message, role) {
                    (ServerMessage::Reply(reply), _) if reply.msg_ref.as_ref().is_some_and(|r| r.as_str().starts_with("hb")) => {
                        let hb = reply.msg_ref.as_ref().map(Ref::as_str).unwrap_or_default().to_owned();
                        expect_ok(reply, &hb, "heartbeat")?;
                    }
                    (ServerMessage::Reply(reply), Role::Echo { .. }) => {
                        let Some((msg_ref, t, sent)) = pending.take() else {
                            return Err(format!("expected no reply (no ping outstanding), got {reply:?}"));
                        };
                        expect_echo(reply, &msg_ref, t)?;
                        ctx.answered(id, sent.elapsed());
                    }
                    (ServerMessage::Reply(reply), Role::Publisher { .. }) => {
                        expect_ok(reply, &(publish_answered + 2).to_string(), "new_msg")?;
                        publish_answered += 1;
                    }
                    (ServerMessage::Broadcast(b), Role::Publisher { .. }) if b.event == "new_msg" => {}
                    (_, Role::Subscriber) => deliveries.deliver(&ctx, &message)?,
                    (other, _) => return Err(format!("expected only phx_reply messages, got {other:?}")),
                }
            }
        }
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}
