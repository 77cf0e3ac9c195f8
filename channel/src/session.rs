//! The socket state machine every transport drives.

use std::fmt;
use std::sync::Arc;

use fawkes_serializer::{Frame, Message, Payload, Ref, ReplyStatus, Serializer};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::Instrument as _;

use crate::channel::reason;
use crate::outbox::{CloseReason, CloseSignal, Outbound, Outbox};
use crate::registry::Shared;
use crate::socket::SocketInfo;
use crate::task::{ChannelMsg, JoinRequest, send_reply};

struct Joined {
    join_ref: Option<Ref>,
    mailbox: mpsc::Sender<ChannelMsg>,
}

impl Joined {
    fn is_alive(&self) -> bool {
        !self.mailbox.is_closed()
    }
}

/// The channels a socket has joined, by topic. A short list rather than a hash map: a socket
/// joins few topics (at most `max_channels_per_socket`), and an idle socket's memory is what
/// a server with many of them runs out of first.
#[derive(Default)]
struct Channels(Vec<(Arc<str>, Joined)>);

impl Channels {
    fn position(&self, topic: &str) -> Option<usize> {
        self.0.iter().position(|(t, _)| &**t == topic)
    }

    fn get(&self, topic: &str) -> Option<&Joined> {
        self.position(topic).map(|i| &self.0[i].1)
    }

    fn remove(&mut self, topic: &str) -> Option<Joined> {
        self.position(topic).map(|i| self.0.swap_remove(i).1)
    }

    fn insert(&mut self, topic: Arc<str>, joined: Joined) {
        if let Some(i) = self.position(&topic) {
            self.0[i].1 = joined;
            return;
        }
        if self.0.len() == self.0.capacity() {
            self.0.reserve_exact((self.0.len() / 2).max(1));
        }
        self.0.push((topic, joined));
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn retain_alive(&mut self) {
        self.0.retain(|(_, joined)| joined.is_alive());
    }

    fn topics(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|(t, _)| &**t)
    }
}

/// One connected socket: its serializer, joined topics and join refs, heartbeat deadline and
/// outbound queue. It does no I/O: a transport feeds it frames with [`Session::handle_frame`]
/// and sends what [`Session::outbound`] yields.
///
/// Dropping the session ends its channels (their `terminate` runs) and unsubscribes them.
pub struct Session {
    endpoint: Arc<Shared>,
    outbox: Outbox,
    info: Arc<SocketInfo>,
    channels: Channels,
    join_tokens: f64,
    join_tokens_at: Instant,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("id", &self.id())
            .field("serializer", &self.info.serializer)
            .field("topics", &self.channels.topics().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Session {
    pub(crate) fn new(endpoint: Arc<Shared>, outbox: Outbox, info: Arc<SocketInfo>) -> Session {
        let burst = endpoint.config.join_rate.burst as f64;
        Session {
            endpoint,
            outbox,
            info,
            channels: Channels::default(),
            join_tokens: burst,
            join_tokens_at: Instant::now(),
        }
    }

    /// The socket's id within this endpoint (for logs).
    pub fn id(&self) -> u64 {
        self.outbox.0.id
    }

    /// The serializer chosen from the client's `vsn`.
    pub fn serializer(&self) -> Serializer {
        self.info.serializer
    }

    /// The stream of frames to send to the peer. Call once: every `Outbound` of a session drains
    /// the same queue.
    pub fn outbound(&self) -> Outbound {
        Outbound::new(self.outbox.clone(), self.endpoint.config.heartbeat_timeout)
    }

    /// True once the socket is closed (by the peer's bad input, a limit, shutdown or the
    /// application); the transport should deliver what is left and drop the session.
    pub fn is_closed(&self) -> bool {
        self.outbox.is_closed()
    }

    /// A signal of this socket's close that takes nothing from the queue (see [`CloseSignal`]).
    pub fn close_signal(&self) -> CloseSignal {
        CloseSignal(self.outbox.clone())
    }

    /// Closes the socket: what is queued is still delivered, then the reason.
    pub fn close(&self, reason: CloseReason) {
        self.outbox.close(reason);
    }

    /// Handles one frame from the peer. Control events (`heartbeat`, `phx_join`, `phx_leave`) are
    /// answered here; other events go to the topic's channel, in order. Waits only while that
    /// channel's mailbox is full.
    ///
    /// `Err` means the socket is closed (a malformed or oversized frame closes it, as Phoenix
    /// does): stop reading, deliver what [`Session::outbound`] still yields, then close.
    pub async fn handle_frame(&mut self, frame: Frame) -> Result<(), CloseReason> {
        if self.outbox.is_closed() {
            return Err(CloseReason::TransportClosed);
        }
        self.outbox.touch();
        let max = self.endpoint.config.max_frame_size;
        if frame.len() > max {
            return Err(self.fail(CloseReason::FrameTooLarge { len: frame.len(), max }));
        }
        match self.info.serializer.decode(&frame) {
            Ok(message) => {
                self.handle_message(message).await;
                Ok(())
            }
            Err(e) => Err(self.fail(CloseReason::Malformed(e.to_string()))),
        }
    }

    fn fail(&self, reason: CloseReason) -> CloseReason {
        tracing::info!(socket = self.id(), %reason, "closing socket");
        self.outbox.close(reason.clone());
        reason
    }

    /// Handles one decoded message (for transports that decode themselves).
    pub async fn handle_message(&mut self, msg: Message) {
        self.outbox.0.flow.messages_in.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        match (msg.topic.as_str(), msg.event.as_str()) {
            ("phoenix", "heartbeat") => self.reply(None, msg.msg_ref, &msg.topic, ReplyStatus::Ok, Payload::empty()),
            (_, "phx_join") => self.join(msg),
            (_, "phx_leave") => self.leave(msg).await,
            _ => self.push(msg).await,
        }
    }

    fn join(&mut self, msg: Message) {
        let endpoint = self.endpoint.clone();
        let config = &endpoint.config;
        // V1 clients send no join_ref: the join's own ref serves, as in Phoenix.
        let join_ref = msg.join_ref.clone().or_else(|| msg.msg_ref.clone());
        let refuse = |this: &Self, join_ref: Option<Ref>, why: &str| {
            this.outbox.0.counters.refused(why);
            this.reply(join_ref, msg.msg_ref.clone(), &msg.topic, ReplyStatus::Error, Payload::Json(reason(why)));
        };
        if msg.topic.len() > config.max_topic_len {
            return refuse(self, None, "topic too long");
        }
        let Some(starter) = self.endpoint.router.route(&msg.topic) else {
            return refuse(self, None, "unmatched topic");
        };
        if !self.take_join_token() {
            tracing::info!(socket = self.id(), topic = %msg.topic, "join rate exceeded");
            return refuse(self, join_ref, "join rate exceeded");
        }
        let replaces = match self.channels.remove(msg.topic.as_str()) {
            Some(old) if old.is_alive() => {
                // If the old mailbox is full, dropping its sender still ends it after what is queued.
                let _ = old.mailbox.try_send(ChannelMsg::Replaced);
                old.join_ref
            }
            _ => None,
        };
        if self.channels.len() >= config.max_channels_per_socket {
            self.channels.retain_alive();
            if self.channels.len() >= config.max_channels_per_socket {
                return refuse(self, join_ref, "too many channels");
            }
        }
        let topic: Arc<str> = msg.topic.into();
        let (tx, rx) = mpsc::channel(config.channel_mailbox);
        let request = JoinRequest {
            topic: topic.clone(),
            join_ref: join_ref.clone(),
            msg_ref: msg.msg_ref,
            params: msg.payload,
            replaces,
            outbox: self.outbox.clone(),
            info: self.info.clone(),
            pubsub: endpoint.pubsub.clone(),
            mailbox: rx,
            mailbox_capacity: config.channel_mailbox,
        };
        let span = tracing::debug_span!("channel", socket = self.id(), topic = %topic, join_ref = ?join_ref);
        tokio::spawn(starter.start(request).instrument(span));
        self.channels.insert(topic, Joined { join_ref, mailbox: tx });
    }

    async fn leave(&mut self, msg: Message) {
        let current = self
            .channels
            .get(msg.topic.as_str())
            .is_some_and(|j| j.is_alive() && same_join(msg.join_ref.as_ref(), j.join_ref.as_ref()));
        if current {
            if let Some(joined) = self.channels.remove(msg.topic.as_str()) {
                if joined.mailbox.send(ChannelMsg::Leave(msg.msg_ref.clone())).await.is_ok() {
                    return;
                }
            }
        }
        self.reply(msg.join_ref, msg.msg_ref, &msg.topic, ReplyStatus::Ok, Payload::empty());
    }

    async fn push(&mut self, msg: Message) {
        let mailbox = match self.channels.get(msg.topic.as_str()) {
            Some(joined) if joined.is_alive() => {
                if !same_join(msg.join_ref.as_ref(), joined.join_ref.as_ref()) {
                    tracing::debug!(socket = self.id(), topic = %msg.topic, "ignoring push of a stale join");
                    return;
                }
                joined.mailbox.clone()
            }
            _ => return self.unmatched(msg),
        };
        if let Err(mpsc::error::SendError(ChannelMsg::In(msg))) = mailbox.send(ChannelMsg::In(Box::new(msg))).await {
            self.unmatched(*msg);
        }
    }

    fn unmatched(&self, msg: Message) {
        let response = Payload::Json(reason("unmatched topic"));
        self.reply(None, msg.msg_ref, &msg.topic, ReplyStatus::Error, response);
    }

    fn reply(&self, join_ref: Option<Ref>, msg_ref: Option<Ref>, topic: &str, status: ReplyStatus, response: Payload) {
        send_reply(&self.outbox, &self.info, join_ref, msg_ref, topic, status, response);
    }

    fn take_join_token(&mut self) -> bool {
        let rate = self.endpoint.config.join_rate;
        let now = Instant::now();
        let refill = now.duration_since(self.join_tokens_at).as_secs_f64() * rate.per_second as f64;
        self.join_tokens = (self.join_tokens + refill).min(rate.burst as f64);
        self.join_tokens_at = now;
        if self.join_tokens >= 1.0 {
            self.join_tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// A message belongs to the current join unless it names a different join ref.
fn same_join(msg: Option<&Ref>, current: Option<&Ref>) -> bool {
    match (msg, current) {
        (Some(m), Some(c)) => m == c,
        _ => true,
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.outbox.close(CloseReason::TransportClosed);
        self.endpoint.forget(self.id());
        tracing::debug!(socket = self.id(), "socket closed");
    }
}
