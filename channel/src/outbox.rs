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
    closed: Option<CloseReason>,
    waker: Option<Waker>,
}

/// State shared by a socket's session, its channels, its PubSub subscriptions and its transport.
pub(crate) struct SocketShared {
    pub(crate) id: u64,
    state: Mutex<State>,
    limit: usize,
    policy: SlowConsumerPolicy,
    /// Milliseconds since `epoch` at which the peer last sent anything.
    last_seen_ms: AtomicU64,
    epoch: Instant,
    dropped: AtomicU64,
    /// The endpoint's counters and those of this socket's transport.
    pub(crate) counters: Arc<Counters>,
    pub(crate) flow: Arc<Flow>,
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
    pub(crate) fn new(
        id: u64,
        limit: usize,
        policy: SlowConsumerPolicy,
        counters: Arc<Counters>,
        flow: Arc<Flow>,
    ) -> Outbox {
        Outbox(Arc::new(SocketShared {
            id,
            state: Mutex::new(State { queue: VecDeque::new(), closed: None, waker: None }),
            limit: limit.max(1),
            policy,
            last_seen_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            dropped: AtomicU64::new(0),
            counters,
            flow,
        }))
    }

    /// Queues a frame. Never waits: a full queue applies the slow-consumer policy.
    pub(crate) fn push(&self, frame: Frame) {
        let waker = {
            let mut st = self.0.state.lock();
            if st.closed.is_some() {
                return;
            }
            if st.queue.len() >= self.0.limit {
                match self.0.policy {
                    SlowConsumerPolicy::Disconnect => {
                        tracing::warn!(socket = self.0.id, queued = st.queue.len(), "slow consumer: closing socket");
                        st.queue = VecDeque::new();
                        st.closed = Some(CloseReason::SlowConsumer);
                        self.0.counters.slow_consumer_closes.fetch_add(1, Ordering::Relaxed);
                        return wake(st.waker.take());
                    }
                    SlowConsumerPolicy::DropOldest => {
                        st.queue.pop_front();
                        self.0.counters.outbound_dropped.fetch_add(1, Ordering::Relaxed);
                        if self.0.dropped.fetch_add(1, Ordering::Relaxed) % 1024 == 0 {
                            tracing::warn!(socket = self.0.id, "slow consumer: dropping oldest frames");
                        }
                    }
                }
            }
            st.queue.push_back(frame);
            self.0.flow.messages_out.fetch_add(1, Ordering::Relaxed);
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
            st.waker.take()
        };
        wake(waker);
    }

    /// Frames queued before the slow-consumer policy applies.
    pub(crate) fn limit(&self) -> usize {
        self.0.limit
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
        poll_fn(|cx| self.poll_recv_many(cx, buf, limit)).await
    }

    /// Moves every frame queued right now into `buf`, without waiting.
    pub fn try_recv_many(&mut self, buf: &mut Vec<Frame>, limit: usize) -> usize {
        let mut st = self.outbox.0.state.lock();
        take(&mut st, buf, limit)
    }

    /// The poll form of [`Outbound::recv_many`].
    pub fn poll_recv_many(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut Vec<Frame>,
        limit: usize,
    ) -> Poll<Result<usize, CloseReason>> {
        loop {
            {
                let mut st = self.outbox.0.state.lock();
                let n = take(&mut st, buf, limit);
                if n > 0 {
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
}

fn take(st: &mut State, buf: &mut Vec<Frame>, limit: usize) -> usize {
    let n = st.queue.len().min(limit);
    buf.extend(st.queue.drain(..n));
    // An empty queue gives its memory back: most sockets are idle most of the time.
    if st.queue.is_empty() && st.queue.capacity() > 0 {
        st.queue = VecDeque::new();
    }
    n
}
