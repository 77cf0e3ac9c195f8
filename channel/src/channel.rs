//! The user's side: the [`Channel`] trait and the [`SocketRef`] a channel acts through.

use std::fmt;
use std::future::Future;
use std::sync::Arc;

use fawkes_serializer::{Broadcast, Payload, Push, Ref, ReplyStatus};

use serde_json::Value;

use crate::history::{HistoryError, Position, Recovery};
use crate::outbox::Outbox;
use crate::presence::PresenceError;
use crate::pubsub::{Held, PubSub, Subscriber, SubscriberId};
use crate::socket::SocketInfo;

/// One joined topic on one socket: the server half of a client's `channel(topic)`.
///
/// A new value is made for every join (see [`Router::channel`](crate::Router::channel)) and runs
/// as its own task, so a slow or failing channel never holds up the socket's other topics. A
/// panic in any of these methods becomes `phx_error` for this topic alone (in `join`, an error
/// reply `{"reason": "join crashed"}`).
///
/// ```
/// use fawkes_channel::{Channel, HandleIn, Payload, SocketRef};
/// use serde_json::{json, Value};
///
/// #[derive(Default)]
/// struct Room { user: String }
///
/// impl Channel for Room {
///     async fn join(&mut self, params: Payload, socket: &mut SocketRef) -> Result<Value, Value> {
///         if socket.topic() == "room:secret" {
///             return Err(json!({"reason": "unauthorized"}));
///         }
///         let user = params.as_json().and_then(|p| p["user"].as_str()).unwrap_or("anonymous");
///         self.user = user.to_owned();
///         Ok(json!({}))
///     }
///
///     async fn handle_in(&mut self, event: &str, payload: Payload, socket: &mut SocketRef) -> HandleIn {
///         match event {
///             "shout" => {
///                 socket.broadcast("shout", json!({"user": self.user, "said": payload.as_json()}));
///                 HandleIn::ok(json!({}))
///             }
///             _ => HandleIn::error(json!({"reason": "unknown event"})),
///         }
///     }
/// }
/// ```
pub trait Channel: Send + 'static {
    /// Broadcast events routed through [`Channel::handle_out`] instead of straight to the client.
    const INTERCEPT: &'static [&'static str] = &[];

    /// The client joins the topic with `params`. `Ok(response)` answers
    /// `{"status": "ok", "response": response}` and subscribes the socket to the topic;
    /// `Err(response)` answers `{"status": "error", "response": response}`.
    fn join(&mut self, params: Payload, socket: &mut SocketRef) -> impl Future<Output = Result<Value, Value>> + Send;

    /// Runs once the join's ok reply is queued and the socket is subscribed: the place to push
    /// state the client should see right after joining (Phoenix's `send(self(), :after_join)`).
    fn after_join(&mut self, socket: &mut SocketRef) -> impl Future<Output = ()> + Send {
        let _ = socket;
        async {}
    }

    /// An event pushed by the client.
    fn handle_in(
        &mut self,
        event: &str,
        payload: Payload,
        socket: &mut SocketRef,
    ) -> impl Future<Output = HandleIn> + Send;

    /// A broadcast of an event listed in [`Channel::INTERCEPT`]. The default sends it on.
    fn handle_out(&mut self, event: &str, payload: Payload, socket: &mut SocketRef) -> impl Future<Output = ()> + Send {
        socket.push(event, payload);
        async {}
    }

    /// The channel is ending (not called after a panic).
    fn terminate(&mut self, reason: &Terminate, socket: &mut SocketRef) -> impl Future<Output = ()> + Send {
        let _ = (reason, socket);
        async {}
    }
}

/// What [`Channel::handle_in`] decided.
#[derive(Debug, Clone, PartialEq)]
pub enum HandleIn {
    /// Send nothing back.
    NoReply,
    /// Reply to the push.
    Reply(ReplyStatus, Payload),
    /// Stop the channel, replying first if asked.
    Stop {
        /// Why; `Normal` sends `phx_close`, an error `phx_error`.
        reason: StopReason,
        /// A reply to send before stopping.
        reply: Option<(ReplyStatus, Payload)>,
    },
}

impl HandleIn {
    /// Reply `ok` with `response`.
    pub fn ok(response: impl Into<Payload>) -> HandleIn {
        HandleIn::Reply(ReplyStatus::Ok, response.into())
    }
    /// Reply `error` with `response`.
    pub fn error(response: impl Into<Payload>) -> HandleIn {
        HandleIn::Reply(ReplyStatus::Error, response.into())
    }
}

/// Why a channel stops itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// A normal end: the client gets `phx_close`.
    Normal,
    /// A failure: the client gets `phx_error` and rejoins.
    Error(String),
}

/// Why a channel is terminating.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Terminate {
    /// The client left (`phx_leave`).
    Leave,
    /// The channel stopped itself.
    Stop(StopReason),
    /// A new join of the same topic on the same socket replaced it.
    Replaced,
    /// The socket closed.
    SocketClosed,
}

fn push_to(outbox: &Outbox, info: &SocketInfo, topic: &str, join_ref: Option<&Ref>, event: &str, payload: Payload) {
    let push =
        Push { join_ref: join_ref.cloned(), msg_ref: None, topic: topic.to_owned(), event: event.to_owned(), payload };
    match info.serializer.encode_push(&push) {
        Ok(frame) => outbox.push(frame),
        Err(e) => tracing::warn!(topic, event, error = %e, "push not encodable"),
    }
}

/// Pushes to one client on one topic from outside its channel task. Cheap to clone. Once the
/// channel instance ends (leave, stop, crash, socket closed), pushes are dropped and
/// [`Pusher::is_closed`] is true.
#[derive(Clone)]
pub struct Pusher {
    topic: Arc<str>,
    join_ref: Option<Ref>,
    outbox: Outbox,
    info: Arc<SocketInfo>,
    alive: std::sync::Weak<()>,
}

impl fmt::Debug for Pusher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pusher").field("topic", &self.topic).field("closed", &self.is_closed()).finish()
    }
}

impl Pusher {
    /// Sends `event` to the client, in order with everything else queued for it. Returns false
    /// (and sends nothing) once the channel instance has ended.
    pub fn push(&self, event: &str, payload: impl Into<Payload>) -> bool {
        if self.is_closed() {
            return false;
        }
        push_to(&self.outbox, &self.info, &self.topic, self.join_ref.as_ref(), event, payload.into());
        true
    }

    /// Sends a broadcast to this client, using the frame already encoded for its serializer (see
    /// [`BroadcastFrames`](crate::BroadcastFrames)). Returns false once the channel instance has
    /// ended.
    pub fn broadcast(&self, frames: &crate::pubsub::BroadcastFrames<'_>) -> bool {
        if self.is_closed() {
            return false;
        }
        if let Some(frame) = frames.frame(self.info.serializer) {
            self.outbox.push(frame.clone());
        }
        true
    }

    /// True once the channel instance has ended or its socket has closed.
    pub fn is_closed(&self) -> bool {
        self.alive.strong_count() == 0 || self.outbox.is_closed()
    }

    /// The topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }
}

/// Builds an error response `{"reason": reason}`.
pub fn reason(reason: &str) -> Value {
    serde_json::json!({ "reason": reason })
}

/// A channel's handle on its socket and topic: push to this client, broadcast to the topic, read
/// what the socket's connect callback assigned.
pub struct SocketRef {
    pub(crate) topic: Arc<str>,
    pub(crate) join_ref: Option<Ref>,
    pub(crate) outbox: Outbox,
    pub(crate) info: Arc<SocketInfo>,
    pub(crate) pubsub: PubSub,
    pub(crate) subscriber: Option<SubscriberId>,
    /// Dropped with the channel, which ends every [`Pusher`] of it.
    pub(crate) alive: Arc<()>,
    /// The presences this channel tracks; untracked when the channel ends.
    pub(crate) presence: Option<crate::presence::Owner>,
    /// Set by [`SocketRef::recover`] in `join`: the history to deliver after the join reply.
    pub(crate) replay: Option<Vec<Arc<Broadcast>>>,
    /// The position the replay reaches: live broadcasts at or before it are dropped.
    pub(crate) replay_after: Option<Position>,
    /// True once `join` has returned: [`SocketRef::recover`] belongs in `join` only.
    pub(crate) joined: bool,
}

impl fmt::Debug for SocketRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SocketRef")
            .field("topic", &self.topic)
            .field("join_ref", &self.join_ref)
            .field("socket", &self.outbox.0.id)
            .finish_non_exhaustive()
    }
}

impl SocketRef {
    /// The joined topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The ref of the join that opened this channel instance.
    pub fn join_ref(&self) -> Option<&Ref> {
        self.join_ref.as_ref()
    }

    /// A value the connect callback assigned, by type.
    pub fn assign<T: Send + Sync + 'static>(&self) -> Option<&T> {
        self.info.assigns.get::<T>()
    }

    /// The socket id the connect callback gave, if any.
    pub fn socket_id(&self) -> Option<&str> {
        self.info.id.as_deref()
    }

    /// The transport the socket came through (`"websocket"`, `"longpoll"`, ...).
    pub fn transport(&self) -> &'static str {
        self.info.transport
    }

    /// Sends `event` to this client only.
    pub fn push(&self, event: &str, payload: impl Into<Payload>) {
        push_to(&self.outbox, &self.info, &self.topic, self.join_ref.as_ref(), event, payload.into());
    }

    /// A handle that pushes to this client on this topic from anywhere (another task, a poller),
    /// for as long as this channel instance lives.
    pub fn pusher(&self) -> Pusher {
        Pusher {
            topic: self.topic.clone(),
            join_ref: self.join_ref.clone(),
            outbox: self.outbox.clone(),
            info: self.info.clone(),
            alive: Arc::downgrade(&self.alive),
        }
    }

    /// Broadcasts `event` to every subscriber of this topic, this client included.
    pub fn broadcast(&self, event: &str, payload: impl Into<Payload>) -> usize {
        self.pubsub.broadcast(&self.topic, event, payload)
    }

    /// Broadcasts `event` to every subscriber of this topic but this client.
    pub fn broadcast_from(&self, event: &str, payload: impl Into<Payload>) -> usize {
        let b = Broadcast { topic: self.topic.to_string(), event: event.to_owned(), payload: payload.into() };
        self.pubsub.publish(b, self.subscriber)
    }

    /// Broadcasts `event` to every subscriber of this topic, this client included, after writing
    /// it to the topic's history; `make` builds the payload from the broadcast's position (to put
    /// it in the payload). Fails when the topic keeps no history or the store fails.
    pub async fn broadcast_with_position(
        &self,
        event: &str,
        make: impl FnMut(&Position) -> Payload + Send,
    ) -> Result<Position, HistoryError> {
        self.pubsub.history().broadcast(&self.topic, event, make).await
    }

    /// In [`Channel::join`] on a topic with history: subscribes now, and arranges for every
    /// broadcast after `since` (the last position the client saw) to be delivered right after
    /// the join's ok reply, in order, before any live broadcast, with no gap and no duplicate.
    /// A replay longer than the outbound queue is streamed as the socket drains, live broadcasts
    /// held back behind it (a queue's worth at most: a socket that falls further behind is
    /// closed as a slow consumer, to rejoin from its last position).
    /// `since` absent, malformed, from another epoch or topic, or older than the history keeps:
    /// `recovered` is false and nothing is replayed. A failing store is logged and answers
    /// `recovered: false` (live broadcasts still arrive). Outside `join` it is an error.
    pub async fn recover(&mut self, since: Option<&str>) -> Result<Recovery, HistoryError> {
        if self.joined {
            return Err(HistoryError::AfterJoin);
        }
        let since = match since.map(str::parse::<Position>) {
            Some(Ok(p)) => Some(p),
            Some(Err(_)) => {
                tracing::debug!(topic = %self.topic, "join with a malformed position: not recovered");
                None
            }
            None => None,
        };
        if let Some(old) = self.subscriber.take() {
            self.pubsub.remove(&self.topic, old);
        }
        let history = self.pubsub.history();
        if history.options(&self.topic).is_none() {
            return Err(HistoryError::NoHistory(self.topic.to_string()));
        }
        let held = || {
            let held = Held { outbox: self.outbox.clone(), limit: self.outbox.limit(), waiting: Vec::new() };
            self.pubsub.insert(&self.topic, Subscriber::Held(parking_lot::Mutex::new(held)))
        };
        match history.subscribe_and_read(&self.topic, since, held).await {
            Ok((id, read)) => {
                self.subscriber = Some(id);
                self.replay = Some(read.entries.into_iter().map(|e| e.broadcast).collect());
                self.replay_after = Some(read.current);
                Ok(Recovery { recovered: read.recovered, position: Some(read.current) })
            }
            Err((id, e)) => {
                tracing::error!(topic = %self.topic, error = %e, "history unavailable: join not recovered");
                self.subscriber = Some(id);
                self.replay = Some(Vec::new());
                Ok(Recovery { recovered: false, position: None })
            }
        }
    }

    /// The endpoint's PubSub, to broadcast to other topics.
    pub fn pubsub(&self) -> &PubSub {
        &self.pubsub
    }

    /// Tracks `key` (a user id, say) as present on this topic with `meta` (a JSON object), on
    /// every node, until [`untrack`](SocketRef::untrack) or the end of this channel instance
    /// (leave, crash, closed socket). Subscribers of the topic get a `presence_diff`. Returns the
    /// entry's `phx_ref`. One channel tracks a key once; a second track is an error (use
    /// [`update`](SocketRef::update)).
    pub fn track(&mut self, key: impl Into<String>, meta: Value) -> Result<String, PresenceError> {
        let pubsub = &self.pubsub;
        let owner = self.presence.get_or_insert_with(|| crate::presence::Owner::new(pubsub));
        owner.track(&self.topic, key.into(), meta)
    }

    /// Replaces the meta of a key this channel tracks; the new entry gets a fresh `phx_ref` and
    /// `phx_ref_prev` names the old one. Returns the new `phx_ref`.
    pub fn update(&mut self, key: &str, meta: Value) -> Result<String, PresenceError> {
        match &self.presence {
            Some(owner) => owner.update(&self.topic, key, meta),
            None => Err(PresenceError::NotTracked(key.into())),
        }
    }

    /// Stops tracking `key` on this topic. Returns whether it was tracked.
    pub fn untrack(&mut self, key: &str) -> bool {
        self.presence.as_ref().is_some_and(|owner| owner.untrack(&self.topic, key))
    }

    /// Sends this client the topic's `presence_state`, in step with the `presence_diff`s it gets:
    /// every change reaches it once, in the state or in a diff after it. The state is encoded
    /// once per presence window and shared by every joiner of that window; a state larger than
    /// [`PresenceOptions::state_part_bytes`](crate::PresenceOptions) comes in parts (the state,
    /// then diffs joining the rest). Call it after the join (in `after_join`).
    pub fn push_presence_state(&self) {
        crate::presence::push_state(&self.pubsub, &self.topic, &self.outbox, self.info.serializer, self.subscriber);
    }

    /// Everyone present on this topic, on every node: the payload of `presence_state`.
    pub fn presence_list(&self) -> Value {
        self.pubsub.presence().list(&self.topic)
    }
}
