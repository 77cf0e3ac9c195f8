//! What every client task shares: the phase of the run, counters, the latency histogram, the
//! first failure, and the wire helpers both transports use.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fawkes_serializer::{Frame, Message, Payload, Ref, Reply, ReplyStatus, Serializer, ServerMessage};
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio::sync::{Semaphore, watch};

use crate::net::Target;

/// Results are `Ok` or a sentence saying what was expected and what came instead.
pub type Res<T> = Result<T, String>;

/// The topic every client joins.
pub const TOPIC: &str = "room:bench";
/// How long a client waits for any reply (phoenix.js's push timeout).
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// Clients connecting and joining at once; the rest queue, so the listen backlog never overflows.
const CONNECTING_AT_ONCE: usize = 128;

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
    latency: Mutex<Histogram<u64>>,
    failure: Mutex<Option<String>>,
}

impl Ctx {
    pub fn new(target: Target, clients: usize) -> Ctx {
        let histogram = Histogram::new_with_bounds(1, 120_000_000, 3).expect("1 µs to 120 s at 3 significant figures");
        Ctx {
            target,
            epoch: Instant::now(),
            phase: watch::Sender::new(Phase::Ramp),
            gate: Semaphore::new(CONNECTING_AT_ONCE),
            joined: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            counted: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            published: AtomicU64::new(0),
            per_client: (0..clients).map(|_| AtomicU64::new(0)).collect(),
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
    /// down on the way out) are not failures of the server.
    pub fn fail(&self, what: String) {
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
    json!({ "body": { "t": ctx.micros(), "seq": seq } })
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
        let body = b.payload.as_json().and_then(|p| p.get("body"));
        let t = body.and_then(|b| b.get("t")).and_then(Value::as_u64);
        let seq = body.and_then(|b| b.get("seq")).and_then(Value::as_u64);
        let (Some(t), Some(seq), "new_msg") = (t, seq, b.event.as_str()) else {
            return Err(format!("expected new_msg {{\"body\":{{\"t\":..,\"seq\":..}},\"user\":..}}, got {message:?}"));
        };
        if seq != self.next_seq {
            return Err(format!(
                "expected new_msg seq {} (every message once, in order), got seq {seq}",
                self.next_seq
            ));
        }
        self.next_seq += 1;
        ctx.delivered.fetch_add(1, Ordering::Relaxed);
        let phase = ctx.phase();
        if phase == Phase::Measure {
            ctx.counted.fetch_add(1, Ordering::Relaxed);
        }
        if matches!(phase, Phase::Measure | Phase::Drain) {
            ctx.record_latency(Duration::from_micros(ctx.micros().saturating_sub(t)));
        }
        Ok(())
    }
}

/// How many messages a publisher sending `rate` per second since `start` should have sent by now.
pub fn due(start: Instant, rate: u32) -> u64 {
    (start.elapsed().as_secs_f64() * f64::from(rate)) as u64
}
