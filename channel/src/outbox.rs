//! A socket's outbound queue: bounded, filled by channels and PubSub, drained by the transport.

use std::collections::VecDeque;
use std::fmt;
use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use fawkes_serializer::Frame;
use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::time::{Instant, Sleep};

use crate::config::SlowConsumerPolicy;
use crate::metrics::{Counters, Flow};

/// Why a socket was closed by the server side. Transports map it to their own signal (a
/// WebSocket close code, a long-poll status).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CloseReason {
    /// The endpoint is shutting down.
    Shutdown,
    /// Nothing was received for the heartbeat timeout.
    HeartbeatTimeout,
    /// The peer did not read fast enough and its outbound queue overflowed.
    SlowConsumer,
    /// The peer sent a frame that could not be decoded.
    Malformed(String),
    /// The peer sent a frame larger than `max_frame_size`.
    FrameTooLarge {
        /// The frame's size.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The application disconnected the socket (see [`Endpoint::disconnect`](crate::Endpoint)).
    Disconnected,
    /// The transport closed (the peer went away); nothing more will be sent.
    TransportClosed,
}

impl std::error::Error for CloseReason {}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CloseReason::Shutdown => f.write_str("server shutting down"),
            CloseReason::HeartbeatTimeout => f.write_str("heartbeat timeout"),
            CloseReason::SlowConsumer => f.write_str("slow consumer"),
            CloseReason::Malformed(why) => write!(f, "malformed frame: {why}"),
            CloseReason::FrameTooLarge { len, max } => {
                write!(f, "frame of {len} bytes exceeds {max}")
            }
            CloseReason::Disconnected => f.write_str("disconnected"),
            CloseReason::TransportClosed => f.write_str("transport closed"),
        }
    }
}

struct State {
    queue: VecDeque<Frame>,
    /// Bytes of the frames in `queue`.
    bytes: usize,
    closed: Option<CloseReason>,
    waker: Option<Waker>,
    /// Tasks waiting for the queue to drain (a recovering join streaming its replay).
    room: Vec<Waker>,
    /// Frames ever taken from the queue (or dropped from it): the sequence number of its front.
    head: u64,
    /// Queued frames the limits do not count (a presence state), while any are queued.
    exempt: Option<Box<Exempt>>,
}

/// Frames queued outside the limits: a presence state, which the joiners of a window share (its
/// size is bounded by the topic's presence limits, not by the socket's). A room whose state is
/// larger than the outbound byte limit can then still be joined; what is queued after the state
/// is counted as usual, so a peer that stops reading is still closed as a slow consumer.
#[derive(Debug, Default)]
struct Exempt {
    /// Sequence numbers `[start, end)` of exempt frames, oldest first.
    ranges: VecDeque<(u64, u64)>,
    frames: usize,
    bytes: usize,
}

impl State {
    /// Frames and bytes queued that count against the limits.
    fn counted(&self) -> (usize, usize) {
        match &self.exempt {
            Some(e) => (self.queue.len() - e.frames, self.bytes - e.bytes),
            None => (self.queue.len(), self.bytes),
        }
    }

    /// Takes the front frame's sequence number and size out of the accounts.
    fn dequeued(&mut self, len: usize) {
        let seq = self.head;
        self.head += 1;
        self.bytes -= len;
        if let Some(e) = &mut self.exempt
            && let Some(&(start, end)) = e.ranges.front()
            && (start..end).contains(&seq)
        {
            e.frames -= 1;
            e.bytes -= len;
            if seq + 1 == end {
                e.ranges.pop_front();
                if e.ranges.is_empty() {
                    self.exempt = None;
                }
            }
        }
    }
}

/// Frames an empty queue makes room for at its first push.
const BURST: usize = 16;

/// State shared by a socket's session, its channels, its PubSub subscriptions and its transport.
pub(crate) struct SocketShared {
    pub(crate) id: u64,
    state: Mutex<State>,
    limit: usize,
    byte_limit: usize,
    policy: SlowConsumerPolicy,
    /// Milliseconds since `epoch` at which the peer last sent anything.
    last_seen_ms: AtomicU64,
    epoch: Instant,
    dropped: AtomicU64,
    /// Told when the socket closes ([`CloseSignal`]).
    closing: Notify,
    /// The endpoint's counters and those of this socket's transport.
    pub(crate) counters: Arc<Counters>,
    pub(crate) flow: Arc<Flow>,
}

/// The bounds of one socket's outbound queue.
pub(crate) struct OutboxLimits {
    /// Frames queued before the policy applies.
    pub(crate) frames: usize,
    /// Bytes queued before the policy applies.
    pub(crate) bytes: usize,
    pub(crate) policy: SlowConsumerPolicy,
}

/// A handle to a socket's outbound queue. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Outbox(pub(crate) Arc<SocketShared>);

impl fmt::Debug for Outbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Outbox").field("socket", &self.0.id).finish_non_exhaustive()
    }
}

impl Outbox {
    pub(crate) fn new(id: u64, limits: OutboxLimits, counters: Arc<Counters>, flow: Arc<Flow>) -> Outbox {
        Outbox(Arc::new(SocketShared {
            id,
            state: Mutex::new(State {
                queue: VecDeque::new(),
                bytes: 0,
                closed: None,
                waker: None,
                room: Vec::new(),
                head: 0,
                exempt: None,
            }),
            limit: limits.frames.max(1),
            byte_limit: limits.bytes.max(1),
            policy: limits.policy,
            last_seen_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            dropped: AtomicU64::new(0),
            closing: Notify::new(),
            counters,
            flow,
        }))
    }

    /// Queues a frame. Never waits: a queue at its frame or byte limit applies the slow-consumer
    /// policy. A frame larger than the byte limit still goes into an empty queue, so that one
    /// large reply is delivered to a peer that reads.
    pub(crate) fn push(&self, frame: Frame) {
        self.push_all(std::iter::once(frame));
    }

    /// Queues `frames` in order, as [`Outbox::push`] queues each, under one lock and with one
    /// wake of the transport: the parts of one message that must arrive together (a
    /// `presence_diff` cut in parts) and that each subscriber should get at once.
    pub(crate) fn push_all(&self, frames: impl IntoIterator<Item = Frame>) {
        let (waker, closed_now) = {
            let mut st = self.0.state.lock();
            let open = st.closed.is_none();
            for frame in frames {
                if !self.queue(&mut st, frame) {
                    break;
                }
            }
            (st.waker.take(), open && st.closed.is_some())
        };
        if closed_now {
            self.0.closing.notify_waiters();
        }
        wake(waker);
    }

    /// Queues one frame under the lock, applying the slow-consumer policy; `false` once the
    /// socket is closed (the frame is not queued).
    fn queue(&self, st: &mut State, frame: Frame) -> bool {
        if st.closed.is_some() {
            return false;
        }
        let len = frame.len();
        let full = |st: &State| {
            let (frames, bytes) = st.counted();
            frames > 0 && (frames >= self.0.limit || bytes + len > self.0.byte_limit)
        };
        if full(st) {
            match self.0.policy {
                SlowConsumerPolicy::Disconnect => {
                    tracing::warn!(
                        socket = self.0.id,
                        queued = st.queue.len(),
                        bytes = st.bytes,
                        "slow consumer: closing socket"
                    );
                    st.queue = VecDeque::new();
                    st.bytes = 0;
                    st.exempt = None;
                    st.closed = Some(CloseReason::SlowConsumer);
                    wake_all(std::mem::take(&mut st.room));
                    self.0.counters.slow_consumer_closes.fetch_add(1, Ordering::Relaxed);
                    // The caller wakes the transport and the close signal's waiters once the
                    // lock is released.
                    return false;
                }
                SlowConsumerPolicy::DropOldest => {
                    while full(st) {
                        let Some(old) = st.queue.pop_front() else { break };
                        st.dequeued(old.len());
                        self.0.counters.outbound_dropped.fetch_add(1, Ordering::Relaxed);
                        if self.0.dropped.fetch_add(1, Ordering::Relaxed) % 1024 == 0 {
                            tracing::warn!(socket = self.0.id, "slow consumer: dropping oldest frames");
                        }
                    }
                }
            }
        }
        st.bytes += len;
        if st.queue.capacity() == 0 {
            // The queue gave its memory back when it last emptied; a burst of broadcasts
            // fills it with one allocation rather than growing it 4, 8, 16.
            st.queue.reserve(BURST);
        }
        st.queue.push_back(frame);
        true
    }

    /// Queues `frames` outside the frame and byte limits (see [`Exempt`]): a presence state,
    /// shared by the joiners of a window and bounded by the topic's presence limits. Frames queued
    /// after them count as usual.
    pub(crate) fn push_exempt(&self, frames: &[Frame]) {
        if frames.is_empty() {
            return;
        }
        let waker = {
            let mut st = self.0.state.lock();
            if st.closed.is_some() {
                return;
            }
            let start = st.head + st.queue.len() as u64;
            let bytes: usize = frames.iter().map(Frame::len).sum();
            let exempt = st.exempt.get_or_insert_with(Box::default);
            exempt.ranges.push_back((start, start + frames.len() as u64));
            exempt.frames += frames.len();
            exempt.bytes += bytes;
            st.bytes += bytes;
            st.queue.extend(frames.iter().cloned());
            st.waker.take()
        };
        wake(waker);
    }

    /// Closes the socket: frames already queued are still delivered, then the reason.
    /// The first reason wins.
    pub(crate) fn close(&self, reason: CloseReason) {
        let waker = {
            let mut st = self.0.state.lock();
            if st.closed.is_some() {
                return;
            }
            st.closed = Some(reason);
            wake_all(std::mem::take(&mut st.room));
            st.waker.take()
        };
        self.0.closing.notify_waiters();
        wake(waker);
    }

    /// Why the socket closed, once it has.
    fn close_reason(&self) -> Option<CloseReason> {
        self.0.state.lock().closed.clone()
    }

    /// Waits until at most `at_most` frames are queued, or the socket is closed; returns how
    /// many are queued. Several tasks may wait at once.
    pub(crate) async fn drained(&self, at_most: usize) -> usize {
        poll_fn(|cx| {
            let mut st = self.0.state.lock();
            if st.closed.is_some() || st.queue.len() <= at_most {
                return Poll::Ready(st.queue.len());
            }
            if !st.room.iter().any(|w| w.will_wake(cx.waker())) {
                st.room.push(cx.waker().clone());
            }
            Poll::Pending
        })
        .await
    }

    /// Frames queued before the slow-consumer policy applies.
    pub(crate) fn limit(&self) -> usize {
        self.0.limit
    }

    /// Frames queued right now.
    pub(crate) fn queued(&self) -> usize {
        self.0.state.lock().queue.len()
    }

    /// Bytes of the frames queued right now.
    #[cfg(test)]
    pub(crate) fn queued_bytes(&self) -> usize {
        self.0.state.lock().bytes
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.0.state.lock().closed.is_some()
    }

    pub(crate) fn touch(&self) {
        let ms = self.0.epoch.elapsed().as_millis() as u64;
        self.0.last_seen_ms.store(ms, Ordering::Relaxed);
    }

    fn last_seen(&self) -> Instant {
        self.0.epoch + Duration::from_millis(self.0.last_seen_ms.load(Ordering::Relaxed))
    }
}

fn wake(w: Option<Waker>) {
    if let Some(w) = w {
        w.wake();
    }
}

fn wake_all(wakers: Vec<Waker>) {
    wakers.into_iter().for_each(Waker::wake);
}

/// Everything the server has to send on one socket, for its transport to deliver.
///
/// Frames come out in the order they were queued; once the socket is closed and the queue is
/// drained, the [`CloseReason`] comes out. It also enforces the heartbeat timeout: when the peer
/// has sent nothing for that long, the socket closes with [`CloseReason::HeartbeatTimeout`].
pub struct Outbound {
    outbox: Outbox,
    heartbeat_timeout: Duration,
    deadline: Pin<Box<Sleep>>,
}

impl fmt::Debug for Outbound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Outbound").field("socket", &self.outbox.0.id).finish_non_exhaustive()
    }
}

impl Outbound {
    pub(crate) fn new(outbox: Outbox, heartbeat_timeout: Duration) -> Outbound {
        let deadline = Box::pin(tokio::time::sleep_until(outbox.last_seen() + heartbeat_timeout));
        Outbound { outbox, heartbeat_timeout, deadline }
    }

    /// Waits for the next frame. `Err` carries the close reason once everything queued before
    /// the close has been returned. Cancel-safe.
    pub async fn recv(&mut self) -> Result<Frame, CloseReason> {
        let mut one = Vec::with_capacity(1);
        loop {
            self.recv_many(&mut one, 1).await?;
            if let Some(frame) = one.pop() {
                return Ok(frame);
            }
        }
    }

    /// Waits until frames are queued, then moves up to `limit` of them into `buf` and returns
    /// how many. `Err` carries the close reason once the queue is drained. Cancel-safe: nothing
    /// is taken from the queue unless it is returned.
    pub async fn recv_many(&mut self, buf: &mut Vec<Frame>, limit: usize) -> Result<usize, CloseReason> {
        poll_fn(|cx| self.poll_recv_within(cx, buf, limit, usize::MAX)).await
    }

    /// [`Outbound::recv_many`] within a byte budget as well: stops before the frame that would
    /// take the frames moved past `max_bytes` (the first is always moved, however large). A
    /// transport that holds what it took until the peer reads it (a write in progress) holds at
    /// most this much besides the queue, which [`Config::outbound_byte_limit`] bounds.
    ///
    /// [`Config::outbound_byte_limit`]: crate::Config::outbound_byte_limit
    pub async fn recv_many_within(
        &mut self,
        buf: &mut Vec<Frame>,
        limit: usize,
        max_bytes: usize,
    ) -> Result<usize, CloseReason> {
        poll_fn(|cx| self.poll_recv_within(cx, buf, limit, max_bytes)).await
    }

    /// Moves every frame queued right now into `buf`, without waiting.
    pub fn try_recv_many(&mut self, buf: &mut Vec<Frame>, limit: usize) -> usize {
        let (n, room) = take(&mut self.outbox.0.state.lock(), buf, limit, usize::MAX);
        self.taken(n);
        wake_all(room);
        n
    }

    /// Counts `n` frames out: once per batch the transport takes, not once per frame queued,
    /// as the counter is shared by every socket of the transport.
    fn taken(&self, n: usize) {
        if n > 0 {
            self.outbox.0.flow.messages_out.fetch_add(n as u64, Ordering::Relaxed);
        }
    }

    /// The poll form of [`Outbound::recv_many`].
    pub fn poll_recv_many(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut Vec<Frame>,
        limit: usize,
    ) -> Poll<Result<usize, CloseReason>> {
        self.poll_recv_within(cx, buf, limit, usize::MAX)
    }

    /// The poll form of [`Outbound::recv_many_within`].
    pub fn poll_recv_within(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut Vec<Frame>,
        limit: usize,
        max_bytes: usize,
    ) -> Poll<Result<usize, CloseReason>> {
        loop {
            {
                let mut st = self.outbox.0.state.lock();
                let (n, room) = take(&mut st, buf, limit, max_bytes);
                if n > 0 {
                    drop(st);
                    self.taken(n);
                    wake_all(room);
                    return Poll::Ready(Ok(n));
                }
                if let Some(reason) = &st.closed {
                    return Poll::Ready(Err(reason.clone()));
                }
                match &st.waker {
                    Some(w) if w.will_wake(cx.waker()) => {}
                    _ => st.waker = Some(cx.waker().clone()),
                }
            }
            if self.deadline.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let due = self.outbox.last_seen() + self.heartbeat_timeout;
            if due <= Instant::now() {
                self.outbox.close(CloseReason::HeartbeatTimeout);
            } else {
                self.deadline.as_mut().reset(due);
            }
        }
    }

    /// Counts as activity of the peer for the heartbeat timeout, for transports where the peer
    /// shows it is alive other than by sending frames (a long-poll client polling; phoenix.js
    /// sends no heartbeats over long-poll).
    pub fn keep_alive(&self) {
        self.outbox.touch();
    }

    /// Closes the socket from the transport's side (e.g. the peer went away). Channels are told
    /// when the [`Session`](crate::Session) is dropped.
    pub fn close(&self, reason: CloseReason) {
        self.outbox.close(reason);
    }

    /// A signal of this socket's close, for a task that does not read the queue.
    pub fn close_signal(&self) -> CloseSignal {
        CloseSignal(self.outbox.clone())
    }
}

/// Tells when a socket closes, without taking anything from its queue: for a transport whose
/// writer may be stuck on a peer that stopped reading, and so never sees the close through
/// [`Outbound`] (a slow consumer, closed because its queue overflowed, is exactly that peer).
/// Cheap to clone; got from [`Session::close_signal`](crate::Session::close_signal) or
/// [`Outbound::close_signal`].
///
/// It fires when the socket is closed: by a limit, the application, shutdown, the peer's bad
/// input, or the session being dropped. A heartbeat timeout is noticed by the transport's
/// [`Outbound`] reads, and fires it then.
#[derive(Clone)]
pub struct CloseSignal(pub(crate) Outbox);

impl fmt::Debug for CloseSignal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CloseSignal").field("socket", &self.0.0.id).finish_non_exhaustive()
    }
}

impl CloseSignal {
    /// Why the socket closed, once it has.
    pub fn reason(&self) -> Option<CloseReason> {
        self.0.close_reason()
    }

    /// Waits until the socket is closed; returns why. Cancel-safe.
    pub async fn closed(&self) -> CloseReason {
        loop {
            let notified = self.0.0.closing.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            if let Some(reason) = self.reason() {
                return reason;
            }
            notified.await;
        }
    }
}

/// Moves up to `limit` frames, and no more than `max_bytes` of them past the first, into `buf`;
/// returns how many, and the tasks waiting for room to wake once the lock is released.
fn take(st: &mut State, buf: &mut Vec<Frame>, limit: usize, max_bytes: usize) -> (usize, Vec<Waker>) {
    let mut n = st.queue.len().min(limit);
    let mut bytes = 0;
    if max_bytes < st.bytes {
        let within = st.queue.iter().take(n).position(|f| {
            bytes += f.len();
            bytes > max_bytes
        });
        if let Some(over) = within {
            n = over.max(1);
        }
    }
    let start = buf.len();
    buf.extend(st.queue.drain(..n));
    for frame in &buf[start..] {
        st.dequeued(frame.len());
    }
    // An empty queue gives its memory back: most sockets are idle most of the time.
    if st.queue.is_empty() && st.queue.capacity() > 0 {
        st.queue = VecDeque::new();
    }
    let room = if n > 0 && !st.room.is_empty() { std::mem::take(&mut st.room) } else { Vec::new() };
    (n, room)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An outbox and the count of sockets it closed as slow consumers.
    fn outbox(frames: usize, bytes: usize, policy: SlowConsumerPolicy) -> (Outbox, Slow) {
        let counters = Arc::new(Counters::default());
        let flow = counters.flow("test");
        let limits = OutboxLimits { frames, bytes, policy };
        (Outbox::new(1, limits, counters.clone(), flow), Slow(counters))
    }

    struct Slow(Arc<Counters>);

    impl Slow {
        fn load(&self, order: Ordering) -> u64 {
            self.0.slow_consumer_closes.load(order)
        }
    }

    fn frame(len: usize) -> Frame {
        Frame::Text(bytes::Bytes::from(vec![b'x'; len]))
    }

    #[test]
    fn bytes_past_the_byte_limit_close_a_slow_consumer_and_free_the_queue() {
        let (outbox, slow) = outbox(1024, 10_000, SlowConsumerPolicy::Disconnect);
        for _ in 0..2 {
            outbox.push(frame(4096));
        }
        assert_eq!(outbox.queued_bytes(), 8192);
        outbox.push(frame(4096));
        assert!(outbox.is_closed());
        assert_eq!(outbox.queued_bytes(), 0, "the queue is freed at once");
        assert_eq!(slow.load(Ordering::Relaxed), 1, "counted");
    }

    /// A waker that counts its wakes.
    struct Wakes(AtomicU64);

    impl std::task::Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn counting() -> (Arc<Wakes>, Waker) {
        let wakes = Arc::new(Wakes(AtomicU64::new(0)));
        (wakes.clone(), Waker::from(wakes))
    }

    #[tokio::test]
    async fn frames_queued_together_wake_the_transport_once_and_stop_at_the_limit() {
        let (outbox, slow) = outbox(4, 10_000, SlowConsumerPolicy::Disconnect);
        let mut out = Outbound::new(outbox.clone(), Duration::from_secs(60));
        let mut buf = Vec::new();
        let (wakes, waker) = counting();
        let mut cx = Context::from_waker(&waker);
        {
            let mut recv = std::pin::pin!(out.recv_many(&mut buf, 10));
            assert!(recv.as_mut().poll(&mut cx).is_pending());
            outbox.push_all([frame(1), frame(2), frame(3)]);
            assert_eq!(wakes.0.load(Ordering::Relaxed), 1, "one wake for the three");
            assert_eq!(recv.as_mut().poll(&mut cx), Poll::Ready(Ok(3)));
        }
        assert_eq!(buf.iter().map(Frame::len).collect::<Vec<_>>(), [1, 2, 3], "in order");
        // Past the frame limit the socket closes, the rest is not queued, and the close signal
        // fires.
        let closing = CloseSignal(outbox.clone());
        let (closes, waker) = counting();
        let mut closed = std::pin::pin!(closing.closed());
        assert!(closed.as_mut().poll(&mut Context::from_waker(&waker)).is_pending());
        outbox.push_all((0..6).map(|_| frame(10)));
        assert!(outbox.is_closed());
        assert_eq!(outbox.queued(), 0);
        assert_eq!(slow.load(Ordering::Relaxed), 1);
        assert_eq!(closes.0.load(Ordering::Relaxed), 1);
        assert_eq!(closed.as_mut().poll(&mut Context::from_waker(&waker)), Poll::Ready(CloseReason::SlowConsumer));
    }

    #[tokio::test]
    async fn a_presence_state_larger_than_the_limits_is_queued_and_what_follows_counts_as_usual() {
        let (outbox, slow) = outbox(4, 10_000, SlowConsumerPolicy::Disconnect);
        outbox.push(frame(6000));
        // A state of 8 parts, 64 KiB in all: over both limits, yet queued.
        outbox.push_exempt(&vec![frame(8192); 8]);
        assert!(!outbox.is_closed());
        assert_eq!(outbox.queued_bytes(), 6000 + 8 * 8192);
        // Diffs after it: the 6,000 bytes before the state and these count, the state does not.
        outbox.push(frame(2000));
        outbox.push(frame(1000));
        assert!(!outbox.is_closed());
        let mut out = Outbound::new(outbox.clone(), Duration::from_secs(60));
        let mut buf = Vec::new();
        assert_eq!(out.try_recv_many(&mut buf, 5), 5, "the frame before the state, and 4 parts");
        // 1 frame of 6,000 bytes is gone: 3,000 counted bytes are queued, after 4 exempt parts.
        outbox.push(frame(6000));
        assert!(!outbox.is_closed(), "9,000 counted bytes, under the limit");
        outbox.push(frame(2000));
        assert!(outbox.is_closed(), "a peer that stops reading is still a slow consumer");
        assert_eq!(slow.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn the_limits_apply_in_full_again_once_the_state_is_taken() {
        let (outbox, slow) = outbox(1024, 10_000, SlowConsumerPolicy::Disconnect);
        outbox.push_exempt(&[frame(30_000), frame(30_000)]);
        let mut out = Outbound::new(outbox.clone(), Duration::from_secs(60));
        let mut buf = Vec::new();
        assert_eq!(out.try_recv_many(&mut buf, 10), 2);
        for _ in 0..2 {
            outbox.push(frame(4096));
        }
        assert!(!outbox.is_closed());
        outbox.push(frame(4096));
        assert!(outbox.is_closed(), "12 KiB counted against a 10,000-byte limit");
        assert_eq!(slow.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn one_frame_larger_than_the_limit_still_goes_to_an_empty_queue() {
        let (outbox, slow) = outbox(1024, 1000, SlowConsumerPolicy::Disconnect);
        outbox.push(frame(5000));
        assert!(!outbox.is_closed());
        let mut out = Outbound::new(outbox.clone(), Duration::from_secs(60));
        let mut buf = Vec::new();
        assert_eq!(out.try_recv_many(&mut buf, 10), 1);
        assert_eq!(outbox.queued_bytes(), 0);
        outbox.push(frame(10));
        assert_eq!(outbox.queued_bytes(), 10);
        assert_eq!(slow.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn a_batch_within_a_byte_budget_stops_before_the_frame_that_would_pass_it() {
        let (outbox, _) = outbox(1024, 1 << 20, SlowConsumerPolicy::Disconnect);
        for len in [4000, 4000, 4000, 100] {
            outbox.push(frame(len));
        }
        let mut out = Outbound::new(outbox.clone(), Duration::from_secs(60));
        let mut buf = Vec::new();
        assert_eq!(out.recv_many_within(&mut buf, 100, 9000).await, Ok(2));
        assert_eq!(outbox.queued_bytes(), 4100);
        buf.clear();
        assert_eq!(out.recv_many_within(&mut buf, 100, 1000).await, Ok(1), "the first frame always goes");
        assert_eq!(out.recv_many_within(&mut buf, 100, 1000).await, Ok(1));
        assert_eq!(outbox.queued_bytes(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_close_signal_fires_for_a_slow_consumer_whose_queue_nobody_reads() {
        let (outbox, _) = outbox(1024, 10_000, SlowConsumerPolicy::Disconnect);
        let out = Outbound::new(outbox.clone(), Duration::from_secs(60));
        let signal = out.close_signal();
        let waiting = tokio::spawn({
            let signal = signal.clone();
            async move { signal.closed().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        assert_eq!(signal.reason(), None);
        for _ in 0..3 {
            outbox.push(frame(4096));
        }
        let fired = tokio::time::timeout(Duration::from_secs(1), waiting).await;
        assert_eq!(fired.ok().and_then(Result::ok), Some(CloseReason::SlowConsumer));
        assert_eq!(signal.closed().await, CloseReason::SlowConsumer, "a late waiter sees it at once");
        out.close(CloseReason::TransportClosed);
        assert_eq!(signal.reason(), Some(CloseReason::SlowConsumer), "the first reason wins");
    }

    #[test]
    fn drop_oldest_keeps_the_queue_within_the_byte_limit() {
        let (outbox, slow) = outbox(1024, 10_000, SlowConsumerPolicy::DropOldest);
        for _ in 0..100 {
            outbox.push(frame(3000));
            assert!(outbox.queued_bytes() <= 10_000, "{}", outbox.queued_bytes());
        }
        assert!(!outbox.is_closed());
        assert_eq!(outbox.queued_bytes(), 9000);
        assert_eq!(slow.load(Ordering::Relaxed), 0);
    }
}
