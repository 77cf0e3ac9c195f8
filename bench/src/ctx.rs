//! What every client task shares: the phase of the run, counters, the latency histogram, the
//! first failure, and the wire helpers both transports use.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fawkes_serializer::{Frame, Message, Payload, Ref, Reply, ReplyStatus, Serializer, ServerMessage};
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio::sync::{Notify, Semaphore, watch};

use crate::net::Target;

/// Results are `Ok` or a sentence saying what was expected and what came instead.
pub type Res<T> = Result<T, String>;

/// The topic every client joins.
pub const TOPIC: &str = "room:bench";
/// How long a client waits for any reply (phoenix.js's push timeout).
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// Clients connecting and joining at once by default; the rest queue, so the listen backlog never
/// overflows. The `storm` mode lets them all go at once.
pub const CONNECTING_AT_ONCE: usize = 128;
/// Broadcasts whose delivery to every subscriber is tracked one by one (for the time until the
/// last subscriber has each); later ones are still counted and checked.
pub const TRACKED_BROADCASTS: usize = 1 << 20;
/// Padding in each broadcast body, so a broadcast frame is about 100 bytes on the wire.
const BROADCAST_PAD: &str = "0123456789abcdef01234567";

/// Where the run is. Clients connect and join in `Ramp`, push or publish only in `Measure`,
/// finish what is in flight in `Drain`; `Stop` ends the run (normally or on the first failure).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Ramp,
    Measure,
    Drain,
    Stop,
}

#[derive(Debug)]
pub struct Ctx {
    pub target: Target,
    /// The clock every embedded send time (`"t"`, in µs) is measured from.
    epoch: Instant,
    phase: watch::Sender<Phase>,
    /// Limits clients connecting and joining at once.
    pub gate: Semaphore,
    /// Clients (the publisher included) whose join was answered ok.
    pub joined: AtomicUsize,
    /// Echo pushes sent and not yet answered.
    pub in_flight: AtomicUsize,
    /// Replies (echo) or deliveries (broadcast) received while measuring.
    pub counted: AtomicU64,
    /// Broadcasts received by subscribers, in any phase.
    pub delivered: AtomicU64,
    /// Broadcasts the publisher sent.
    pub published: AtomicU64,
    /// Echo replies counted per client, to show how evenly the server serves them.
    per_client: Box<[AtomicU64]>,
    /// Per broadcast `seq`: subscribers that have it, and the latest latency among them (µs).
    seq_count: Box<[AtomicU32]>,
    seq_last_us: Box<[AtomicU64]>,
    /// When the first broadcast was stamped and the last delivery arrived (µs since the start).
    first_publish_us: AtomicU64,
    last_delivery_us: AtomicU64,
    /// Clients whose connect or join failed while failures are only counted (`storm`).
    pub failed: AtomicUsize,
    /// Count connect and join failures instead of failing the run.
    pub count_failures: bool,
    /// Woken each time a broadcast has reached every subscriber (the paced publisher waits on it).
    pub broadcast_done: Notify,
    /// Presence: how many keys each client's list holds (`u32::MAX` until it joined).
    presence_keys: Box<[AtomicU32]>,
    latency: Mutex<Histogram<u64>>,
    failure: Mutex<Option<String>>,
}

impl Ctx {
    pub fn new(
        target: Target,
        clients: usize,
        broadcasts: usize,
        connecting_at_once: usize,
        count_failures: bool,
    ) -> Ctx {
        let tracked = broadcasts.min(TRACKED_BROADCASTS);
        let histogram = Histogram::new_with_bounds(1, 120_000_000, 3).expect("1 µs to 120 s at 3 significant figures");
        Ctx {
            target,
            epoch: Instant::now(),
            phase: watch::Sender::new(Phase::Ramp),
            gate: Semaphore::new(connecting_at_once.clamp(1, Semaphore::MAX_PERMITS)),
            joined: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            counted: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            published: AtomicU64::new(0),
            per_client: (0..clients).map(|_| AtomicU64::new(0)).collect(),
            seq_count: (0..tracked).map(|_| AtomicU32::new(0)).collect(),
            seq_last_us: (0..tracked).map(|_| AtomicU64::new(0)).collect(),
            first_publish_us: AtomicU64::new(u64::MAX),
            last_delivery_us: AtomicU64::new(0),
            failed: AtomicUsize::new(0),
            count_failures,
            broadcast_done: Notify::new(),
            presence_keys: (0..clients).map(|_| AtomicU32::new(u32::MAX)).collect(),
            latency: Mutex::new(histogram),
            failure: Mutex::new(None),
        }
    }

    pub fn phase(&self) -> Phase {
        *self.phase.borrow()
    }

    pub fn watch_phase(&self) -> watch::Receiver<Phase> {
        self.phase.subscribe()
    }

    pub fn set_phase(&self, phase: Phase) {
        self.phase.send_replace(phase);
    }

    /// Microseconds since the run began: the send time clients embed in payloads.
    pub fn micros(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    /// Records the first failure and stops the run. Failures after a normal stop (sockets torn
    /// down on the way out) are not failures of the server. While `count_failures` is set, a
    /// client failing during the ramp is only counted.
    pub fn fail(&self, what: String) {
        if self.count_failures && self.phase() == Phase::Ramp {
            if self.failed.fetch_add(1, Ordering::Relaxed) == 0 {
                eprintln!("fawkes-bench: first failed client (counted, the run goes on): {what}");
            }
            return;
        }
        let mut failure = self.failure.lock().unwrap_or_else(|e| e.into_inner());
        if self.phase() == Phase::Stop {
            return;
        }
        let at = self.epoch.elapsed().as_secs_f64();
        failure.get_or_insert_with(|| format!("{what} [{at:.2} s after the start, during {:?}]", self.phase()));
        self.set_phase(Phase::Stop);
    }

    /// Ends the run: the first failure, if any.
    pub fn finish(&self) -> Option<String> {
        let failure = self.failure.lock().unwrap_or_else(|e| e.into_inner());
        self.set_phase(Phase::Stop);
        failure.clone()
    }

    pub fn failure(&self) -> Option<String> {
        self.failure.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn record_latency(&self, latency: Duration) {
        let us = latency.as_micros().max(1) as u64;
        self.latency.lock().unwrap_or_else(|e| e.into_inner()).saturating_record(us);
    }

    /// Client `id`'s echo reply arrived `latency` after its push.
    pub fn answered(&self, id: usize, latency: Duration) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        if self.phase() == Phase::Measure {
            self.counted.fetch_add(1, Ordering::Relaxed);
            if let Some(n) = self.per_client.get(id) {
                n.fetch_add(1, Ordering::Relaxed);
            }
            self.record_latency(latency);
        }
    }

    /// Echo replies per client while measuring: (fewest, median, most).
    pub fn per_client_spread(&self) -> (u64, u64, u64) {
        let mut counts: Vec<u64> = self.per_client.iter().map(|n| n.load(Ordering::Relaxed)).collect();
        counts.sort_unstable();
        let at = |q: f64| counts.get(((counts.len() as f64 - 1.0) * q) as usize).copied().unwrap_or(0);
        (at(0.0), at(0.5), at(1.0))
    }

    /// A subscriber received broadcast `seq`, stamped `t` (µs since the start).
    fn delivered_seq(&self, seq: u64, t: u64) {
        let now = self.micros();
        self.delivered.fetch_add(1, Ordering::Relaxed);
        self.last_delivery_us.fetch_max(now, Ordering::Relaxed);
        self.first_publish_us.fetch_min(t, Ordering::Relaxed);
        let phase = self.phase();
        if phase == Phase::Measure {
            self.counted.fetch_add(1, Ordering::Relaxed);
        }
        let latency = now.saturating_sub(t);
        if matches!(phase, Phase::Measure | Phase::Drain) {
            self.record_latency(Duration::from_micros(latency));
        }
        if let (Some(count), Some(last)) = (self.seq_count.get(seq as usize), self.seq_last_us.get(seq as usize)) {
            // The latency first, so whoever sees the count complete sees the latest latency.
            last.fetch_max(latency, Ordering::Relaxed);
            if count.fetch_add(1, Ordering::AcqRel) as usize + 1 == self.per_client.len() {
                self.broadcast_done.notify_one();
            }
        }
    }

    /// Paced fan-out: how many more broadcasts the publisher may send now, having sent
    /// `published`, so that at most `window` are in flight end to end. `oldest` is the first
    /// broadcast not yet known to have reached every subscriber; it moves on as they complete.
    pub fn window_room(&self, oldest: &mut u64, published: u64, window: u64) -> u64 {
        let subscribers = self.per_client.len();
        while *oldest < published {
            let Some(count) = self.seq_count.get(*oldest as usize) else {
                // Past the tracked broadcasts nothing can be waited on: the window stays shut.
                return 0;
            };
            if (count.load(Ordering::Acquire) as usize) < subscribers {
                break;
            }
            *oldest += 1;
        }
        window.saturating_sub(published - *oldest)
    }

    /// Presence: client `id`'s list now holds `keys` keys.
    pub fn presence_keys(&self, id: usize, keys: usize) {
        if let Some(n) = self.presence_keys.get(id) {
            n.store(keys.min(u32::MAX as usize - 1) as u32, Ordering::Relaxed);
        }
    }

    /// Presence: the clients that joined but do not hold exactly `expected` keys, with the keys
    /// each holds (at most `limit` of them).
    pub fn presence_incomplete(&self, expected: usize, limit: usize) -> Vec<(usize, usize)> {
        self.presence_keys
            .iter()
            .enumerate()
            .map(|(id, n)| (id, n.load(Ordering::Relaxed)))
            .filter(|&(_, n)| n != u32::MAX && n as usize != expected)
            .map(|(id, n)| (id, n as usize))
            .take(limit)
            .collect()
    }

    /// Presence: of the clients that joined, how many hold exactly `expected` keys, and how many
    /// joined.
    pub fn presence_complete(&self, expected: usize) -> (usize, usize) {
        let mut complete = 0;
        let mut joined = 0;
        for n in &self.presence_keys {
            let n = n.load(Ordering::Relaxed);
            if n != u32::MAX {
                joined += 1;
                complete += usize::from(n as usize == expected);
            }
        }
        (complete, joined)
    }

    /// Deliveries per second from the first broadcast's stamp to the last delivery.
    pub fn fanout_rate(&self) -> Option<f64> {
        let first = self.first_publish_us.load(Ordering::Relaxed);
        let last = self.last_delivery_us.load(Ordering::Relaxed);
        (first < last).then(|| self.delivered.load(Ordering::Relaxed) as f64 / ((last - first) as f64 / 1e6))
    }

    /// For the broadcasts every one of `subscribers` received: the time until the last of them
    /// had it, in µs (p50, p99, max, broadcasts).
    pub fn last_subscriber(&self, subscribers: usize) -> (u64, u64, u64, usize) {
        let mut lasts: Vec<u64> = self
            .seq_count
            .iter()
            .zip(self.seq_last_us.iter())
            .filter(|(count, _)| count.load(Ordering::Relaxed) as usize >= subscribers)
            .map(|(_, last)| last.load(Ordering::Relaxed))
            .collect();
        lasts.sort_unstable();
        let at = |q: f64| lasts.get(((lasts.len() as f64 - 1.0) * q).ceil() as usize).copied().unwrap_or(0);
        (at(0.5), at(0.99), lasts.last().copied().unwrap_or(0), lasts.len())
    }

    /// Latency percentiles in µs: (p50, p99, max, samples).
    pub fn percentiles(&self) -> (u64, u64, u64, u64) {
        let h = self.latency.lock().unwrap_or_else(|e| e.into_inner());
        (h.value_at_quantile(0.50), h.value_at_quantile(0.99), h.max(), h.len())
    }
}

/// A V2 text frame, as phoenix.js encodes it.
pub fn encode(join_ref: Option<&str>, msg_ref: &str, topic: &str, event: &str, payload: Value) -> String {
    let message = Message {
        join_ref: join_ref.map(Ref::new),
        msg_ref: Some(Ref::new(msg_ref)),
        topic: topic.to_owned(),
        event: event.to_owned(),
        payload: Payload::Json(payload),
    };
    match Serializer::V2.encode_message(&message) {
        Ok(Frame::Text(text)) => String::from_utf8_lossy(&text).into_owned(),
        // A JSON payload always encodes as text.
        Ok(Frame::Binary(_)) | Err(_) => unreachable!("a JSON message encodes as V2 text"),
    }
}

/// The join every client sends first.
pub fn join_frame() -> String {
    encode(Some("1"), "1", TOPIC, "phx_join", json!({}))
}

/// Decodes a V2 text frame from the server.
pub fn decode(text: impl Into<Bytes>) -> Res<ServerMessage> {
    let text = text.into();
    Serializer::V2
        .decode_server(&Frame::Text(text.clone()))
        .map_err(|e| format!("expected a V2 message from the server, got {:?} ({e})", String::from_utf8_lossy(&text)))
}

/// Checks that `reply` answers `msg_ref` with status ok.
pub fn expect_ok(reply: &Reply, msg_ref: &str, what: &str) -> Res<()> {
    if reply.msg_ref.as_ref().map(Ref::as_str) != Some(msg_ref) {
        return Err(format!("expected the reply to {what} (ref {msg_ref:?}), got a reply to {:?}", reply.msg_ref));
    }
    if reply.status != ReplyStatus::Ok {
        return Err(format!(
            "expected {what} (ref {msg_ref:?}) to be answered ok, got status error {:?}",
            reply.response
        ));
    }
    Ok(())
}

/// Checks an echo reply: ok, to `msg_ref`, with the payload `{"t": t}` sent.
pub fn expect_echo(reply: &Reply, msg_ref: &str, t: u64) -> Res<()> {
    expect_ok(reply, msg_ref, "ping")?;
    if reply.response.as_json() != Some(&json!({ "t": t })) {
        return Err(format!("expected the ping reply to carry {{\"t\":{t}}}, got {:?}", reply.response));
    }
    Ok(())
}

/// The payload of the `n`th published message, stamped now.
pub fn publish_payload(ctx: &Ctx, seq: u64) -> Value {
    json!({ "body": broadcast_body(ctx, seq) })
}

/// The body every broadcast carries: its send time, its sequence number and padding.
pub fn broadcast_body(ctx: &Ctx, seq: u64) -> Value {
    json!({ "t": ctx.micros(), "seq": seq, "pad": BROADCAST_PAD })
}

/// One subscriber's view of the broadcast stream: every `new_msg` must arrive, once, in order.
#[derive(Debug, Default)]
pub struct Deliveries {
    next_seq: u64,
}

impl Deliveries {
    pub fn deliver(&mut self, ctx: &Ctx, message: &ServerMessage) -> Res<()> {
        let ServerMessage::Broadcast(b) = message else {
            return Err(format!("expected a new_msg broadcast, got {message:?}"));
        };
        if b.event != "new_msg" {
            return Err(format!("expected a new_msg broadcast, got {message:?}"));
        }
        self.deliver_payload(ctx, b.payload.as_json())
    }

    /// Checks and counts one `new_msg` frame given as text that starts with `prefix` (e.g.
    /// `[null,null,"room:bench","new_msg",`), reading only its `"seq"` and `"t"` numbers: at
    /// hundreds of thousands of deliveries a second, parsing every frame in full would make the
    /// load generator, not the server, the bound. Every server's frames are read the same way.
    pub fn deliver_text(&mut self, ctx: &Ctx, text: &str, prefix: &str) -> Res<()> {
        let number = |key: &str| {
            let at = text.find(key)? + key.len();
            let digits = text[at..].bytes().take_while(u8::is_ascii_digit).count();
            text[at..at + digits].parse::<u64>().ok()
        };
        let (true, Some(t), Some(seq)) = (text.starts_with(prefix), number("\"t\":"), number("\"seq\":")) else {
            return Err(format!(
                "expected a new_msg broadcast {prefix}..{{\"body\":{{\"t\":..,\"seq\":..}}}}, got {text:?}"
            ));
        };
        self.deliver_numbers(ctx, t, seq)
    }

    /// Checks and counts one `new_msg` payload `{"body": {"t": .., "seq": ..}, ..}`.
    pub fn deliver_payload(&mut self, ctx: &Ctx, payload: Option<&Value>) -> Res<()> {
        let body = payload.and_then(|p| p.get("body"));
        let t = body.and_then(|b| b.get("t")).and_then(Value::as_u64);
        let seq = body.and_then(|b| b.get("seq")).and_then(Value::as_u64);
        let (Some(t), Some(seq)) = (t, seq) else {
            return Err(format!("expected new_msg {{\"body\":{{\"t\":..,\"seq\":..}},\"user\":..}}, got {payload:?}"));
        };
        self.deliver_numbers(ctx, t, seq)
    }

    fn deliver_numbers(&mut self, ctx: &Ctx, t: u64, seq: u64) -> Res<()> {
        if seq != self.next_seq {
            return Err(format!(
                "expected new_msg seq {} (every message once, in order), got seq {seq}",
                self.next_seq
            ));
        }
        self.next_seq += 1;
        ctx.delivered_seq(seq, t);
        Ok(())
    }
}

/// How many messages a publisher sending `rate` per second since `start` should have sent by now.
pub fn due(start: Instant, rate: u32) -> u64 {
    (start.elapsed().as_secs_f64() * f64::from(rate)) as u64
}

/// When a paced ping due at `at` is followed by the next one: a late reply skips the pings it
/// missed rather than bunching them up.
pub fn next_ping(at: tokio::time::Instant, every: Duration) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    let mut next = at + every;
    while next <= now {
        next += every;
    }
    next
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_opens_only_as_the_oldest_broadcast_reaches_every_subscriber() {
        let ctx = Ctx::new(Target::local(([127, 0, 0, 1], 1).into()), 2, 10, 1, false);
        let mut oldest = 0;
        assert_eq!(ctx.window_room(&mut oldest, 0, 4), 4);
        assert_eq!(ctx.window_room(&mut oldest, 4, 4), 0);
        ctx.delivered_seq(0, 0);
        assert_eq!(ctx.window_room(&mut oldest, 4, 4), 0, "one of two subscribers has broadcast 0");
        ctx.delivered_seq(0, 0);
        assert_eq!(ctx.window_room(&mut oldest, 4, 4), 1);
        assert_eq!(oldest, 1);
        // A later broadcast complete before the oldest does not open the window.
        ctx.delivered_seq(2, 0);
        ctx.delivered_seq(2, 0);
        assert_eq!(ctx.window_room(&mut oldest, 4, 4), 1);
        ctx.delivered_seq(1, 0);
        ctx.delivered_seq(1, 0);
        assert_eq!(ctx.window_room(&mut oldest, 4, 4), 3);
        assert_eq!(oldest, 3);
        // Past the tracked broadcasts the window stays shut.
        let mut oldest = 10;
        assert_eq!(ctx.window_room(&mut oldest, 11, 4), 0);
    }
}
