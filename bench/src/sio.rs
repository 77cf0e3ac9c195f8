//! Socket.IO clients (Engine.IO v4 over WebSocket, `GET /socket.io/?EIO=4&transport=websocket`)
//! for the same workloads as the Phoenix clients, so a Socket.IO server doing the same job can
//! be measured side by side: the server's `join` event joins a room, `ping` acks its data and
//! `new_msg` emits `new_msg` `{body, user}` to the room (see `bench/peers/`).
//!
//! The wire, as far as these clients use it: the server opens with `0{"sid":..}`, the client
//! connects to the main namespace with `40` and gets `40{"sid":..}`; events are
//! `42["event",data]`, with an ack id `42<id>["event",data]`, answered by `43<id>[data]`. The
//! server sends `2` (ping) every `pingInterval` and the client must answer `3` (pong).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::ctx::{Ctx, Deliveries, Phase, REPLY_TIMEOUT, Res, TOPIC, broadcast_body, due};
use crate::ws::Role;

type Ws = WebSocketStream<TcpStream>;

/// One Socket.IO packet from the server, as far as these clients care.
#[derive(Debug)]
enum Packet {
    /// Engine.IO ping: answer with a pong.
    Ping,
    /// An event: its name and first argument.
    Event(String, Value),
    /// An ack: its id and first argument.
    Ack(u64, Value),
    /// A `new_msg` event, left as text.
    Broadcast(tokio_tungstenite::tungstenite::Utf8Bytes),
    /// Anything else (the namespace connect answer, pongs, noops).
    Other(String),
}

fn parse(text: &str) -> Res<Packet> {
    let bad = |why: &str| format!("expected a Socket.IO packet, got {text:?} ({why})");
    let Some(rest) = text.strip_prefix('4') else {
        return Ok(if text == "2" { Packet::Ping } else { Packet::Other(text.to_owned()) });
    };
    let (kind, rest) = match rest.as_bytes().first() {
        Some(b'2') => ('e', &rest[1..]),
        Some(b'3') => ('a', &rest[1..]),
        Some(b'4') => return Err(bad("connect_error")),
        _ => return Ok(Packet::Other(text.to_owned())),
    };
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    let id = rest[..digits].parse::<u64>().ok();
    let args: Value = serde_json::from_str(&rest[digits..]).map_err(|e| bad(&e.to_string()))?;
    let Value::Array(mut args) = args else {
        return Err(bad("the arguments are not an array"));
    };
    match kind {
        'e' => {
            if args.is_empty() {
                return Err(bad("an event without a name"));
            }
            let name = match args.remove(0) {
                Value::String(name) => name,
                other => return Err(bad(&format!("the event name {other} is not a string"))),
            };
            Ok(Packet::Event(name, args.into_iter().next().unwrap_or(Value::Null)))
        }
        _ => {
            let id = id.ok_or_else(|| bad("an ack without an id"))?;
            Ok(Packet::Ack(id, args.into_iter().next().unwrap_or(Value::Null)))
        }
    }
}

async fn send(ws: &mut Ws, text: String) -> Res<()> {
    ws.send(WsMessage::text(text)).await.map_err(|e| format!("cannot send a frame: {e}"))
}

/// How every `new_msg` event begins.
const BROADCAST_PREFIX: &str = "42[\"new_msg\",";

/// The next packet; a close or a broken socket is an error. `new_msg` events come back
/// unparsed (for [`Deliveries::deliver_text`]), as the Phoenix clients leave broadcasts.
async fn recv(ws: &mut Ws) -> Res<Packet> {
    loop {
        match ws.next().await {
            Some(Ok(WsMessage::Text(text))) if text.starts_with(BROADCAST_PREFIX) => {
                return Ok(Packet::Broadcast(text));
            }
            Some(Ok(WsMessage::Text(text))) => return parse(text.as_str()),
            Some(Ok(WsMessage::Binary(b))) => return Err(format!("expected text frames, got a binary frame {b:?}")),
            Some(Ok(WsMessage::Close(frame))) => {
                let why = frame.map(|f| format!("{} {:?}", u16::from(f.code), f.reason.as_str())).unwrap_or_default();
                return Err(format!("expected packets, but the server closed the socket ({why})"));
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(format!("expected packets, but the socket broke: {e}")),
            None => return Err("expected packets, but the socket closed without a close frame".to_owned()),
        }
    }
}

/// The next packet that is not a ping (pings are answered on the way).
async fn recv_answering_pings(ws: &mut Ws) -> Res<Packet> {
    loop {
        match recv(ws).await? {
            Packet::Ping => send(ws, "3".to_owned()).await?,
            other => return Ok(other),
        }
    }
}

fn event(ack: u64, name: &str, data: &Value) -> String {
    format!("42{ack}{}", json!([name, data]))
}

/// Connects, opens the main namespace and joins [`TOPIC`].
async fn connect_and_join(ctx: &Ctx, id: usize) -> Res<Ws> {
    let stream = ctx.target.connect(ctx.target.source_addr(id)).await?;
    let url = format!("ws://{}/socket.io/?EIO=4&transport=websocket", ctx.target.authority);
    let config = WebSocketConfig::default().read_buffer_size(4096);
    let (mut ws, _) = tokio_tungstenite::client_async_with_config(url.as_str(), stream, Some(config))
        .await
        .map_err(|e| format!("expected the WebSocket upgrade of {url} to succeed, got: {e}"))?;
    match recv(&mut ws).await? {
        Packet::Other(open) if open.starts_with('0') => {}
        other => return Err(format!("expected the Engine.IO open packet 0{{..}}, got {other:?}")),
    }
    send(&mut ws, "40".to_owned()).await?;
    match recv_answering_pings(&mut ws).await? {
        Packet::Other(connected) if connected.starts_with("40") => {}
        other => return Err(format!("expected the namespace connect answer 40{{..}}, got {other:?}")),
    }
    send(&mut ws, event(0, "join", &json!(TOPIC))).await?;
    match recv_answering_pings(&mut ws).await? {
        Packet::Ack(0, _) => Ok(ws),
        other => Err(format!("expected the ack of join (43 0[..]), got {other:?}")),
    }
}

pub async fn client(ctx: Arc<Ctx>, id: usize, clients: usize, role: Role) -> Res<()> {
    let permit = ctx.gate.acquire().await.map_err(|e| e.to_string())?;
    let mut ws = tokio::time::timeout(REPLY_TIMEOUT, connect_and_join(&ctx, id))
        .await
        .map_err(|_| format!("expected to connect and join within {REPLY_TIMEOUT:?}"))??;
    drop(permit);
    ctx.joined.fetch_add(1, Ordering::Relaxed);

    let mut phase = ctx.watch_phase();
    let mut next_ack = 0u64;
    // The outstanding ping: its ack id, embedded time, and when it was sent.
    let mut pending: Option<(u64, u64, Instant)> = None;
    let mut deliveries = Deliveries::default();
    let mut publish_tick = tokio::time::interval(Duration::from_millis(5));
    publish_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut publishing_since: Option<Instant> = None;
    let mut published = 0u64;
    let mut publish_answered = 0u64;
    // Windowed publisher: the oldest broadcast not yet known to have reached every subscriber.
    let mut oldest_in_flight = 0u64;
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
            next_ack += 1;
            let t = ctx.micros();
            ctx.in_flight.fetch_add(1, Ordering::Relaxed);
            let sent = Instant::now();
            send(&mut ws, event(next_ack, "ping", &json!({ "t": t }))).await?;
            pending = Some((next_ack, t, sent));
        }
        if let (Role::Publisher { .. }, true, None) = (role, measuring, publishing_since) {
            publishing_since = Some(Instant::now());
        }
        let publishing = matches!(role, Role::Publisher { window: None, .. }) && measuring;
        let windowed = matches!(role, Role::Publisher { window: Some(_), .. }) && measuring;
        if let (true, Role::Publisher { count, window: Some(window), .. }) = (windowed, role) {
            let room = ctx.window_room(&mut oldest_in_flight, published, window);
            let due = room.min(count.unwrap_or(u64::MAX).saturating_sub(published));
            publish(&ctx, &mut ws, published, due).await?;
            published += due;
            ctx.published.store(published, Ordering::Relaxed);
        }
        let reply_deadline = pending.as_ref().map(|(_, _, sent)| *sent + REPLY_TIMEOUT);
        let ping_wake = if measuring && pending.is_none() { next_ping.map(Instant::from) } else { None };

        tokio::select! {
            changed = phase.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
            }
            () = sleep_until_opt(ping_wake) => {}
            () = ctx.broadcast_done.notified(), if windowed => {}
            _ = publish_tick.tick(), if publishing => {
                if let (Role::Publisher { rate, count, .. }, Some(since)) = (role, publishing_since) {
                    let due = due(since, rate).min(count.unwrap_or(u64::MAX)).saturating_sub(published);
                    publish(&ctx, &mut ws, published, due).await?;
                    published += due;
                    ctx.published.store(published, Ordering::Relaxed);
                }
            }
            () = sleep_until_opt(reply_deadline) => {
                let what = pending.as_ref().map(|(a, _, _)| *a).unwrap_or_default();
                return Err(format!("expected the ack of ping (id {what}) within {REPLY_TIMEOUT:?}"));
            }
            packet = recv(&mut ws) => {
                match (packet?, role) {
                    (Packet::Ping, _) => send(&mut ws, "3".to_owned()).await?,
                    (Packet::Ack(ack, data), Role::Echo { .. }) => {
                        let Some((expected, t, sent)) = pending.take() else {
                            return Err(format!("expected no ack (no ping outstanding), got ack {ack}"));
                        };
                        if ack != expected || data != json!({ "t": t }) {
                            return Err(format!("expected ack {expected} carrying {{\"t\":{t}}}, got ack {ack} {data}"));
                        }
                        ctx.answered(id, sent.elapsed());
                    }
                    (Packet::Ack(ack, _), Role::Publisher { .. }) => {
                        if ack != publish_answered + 1 {
                            return Err(format!("expected the ack of new_msg {}, got ack {ack}", publish_answered + 1));
                        }
                        publish_answered += 1;
                    }
                    (Packet::Broadcast(_), Role::Publisher { .. }) => {}
                    (Packet::Broadcast(text), Role::Subscriber) => {
                        deliveries.deliver_text(&ctx, &text, BROADCAST_PREFIX)?;
                    }
                    (Packet::Other(_), _) => {}
                    (Packet::Event(name, data), _) => {
                        return Err(format!("expected no {name} event ({data}) for a {role:?} client"));
                    }
                    (other, _) => return Err(format!("expected no {other:?} for a {role:?} client")),
                }
            }
        }
    }
}

/// Sends `new_msg` for broadcasts `first..first + n`, flushed together.
async fn publish(ctx: &Ctx, ws: &mut Ws, first: u64, n: u64) -> Res<()> {
    if n == 0 {
        return Ok(());
    }
    for seq in first..first + n {
        let data = json!({ "room": TOPIC, "body": broadcast_body(ctx, seq) });
        ws.feed(WsMessage::text(event(seq + 1, "new_msg", &data)))
            .await
            .map_err(|e| format!("cannot send a frame: {e}"))?;
    }
    ws.flush().await.map_err(|e| format!("cannot send a frame: {e}"))
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packets_parse() {
        assert!(matches!(parse("2"), Ok(Packet::Ping)));
        assert!(matches!(parse("40{\"sid\":\"x\"}"), Ok(Packet::Other(_))));
        let Ok(Packet::Event(name, data)) = parse("42[\"new_msg\",{\"body\":1}]") else { panic!("event") };
        assert_eq!((name.as_str(), data), ("new_msg", json!({"body": 1})));
        let Ok(Packet::Ack(7, data)) = parse("437[{\"t\":5}]") else { panic!("ack") };
        assert_eq!(data, json!({"t": 5}));
        assert!(parse("42{").is_err());
        assert!(parse("44{\"message\":\"no\"}").is_err());
    }
}
