//! The task of one joined channel: runs the user's [`Channel`] and turns its outcomes into
//! replies, `phx_close` and `phx_error`.

use std::any::Any;
use std::future::pending;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use fawkes_serializer::{Broadcast, Message, Payload, Push, Ref, Reply, ReplyStatus};
use futures_util::FutureExt as _;
use serde_json::Value;
use tokio::sync::mpsc;

use crate::channel::{Channel, HandleIn, SocketRef, StopReason, Terminate, reason};
use crate::outbox::Outbox;
use crate::pubsub::{BroadcastFrames, Intercept, PubSub, Subscriber, SubscriberId, SubscriptionGuard, deliver};
use crate::socket::SocketInfo;

/// What the session sends a running channel.
pub(crate) enum ChannelMsg {
    /// A client push.
    In(Box<Message>),
    /// `phx_leave`, with its ref.
    Leave(Option<Ref>),
    /// A newer join of the same topic took over; end quietly (the new one sends `phx_close`).
    Replaced,
}

pub(crate) struct JoinRequest {
    pub(crate) topic: Arc<str>,
    pub(crate) join_ref: Option<Ref>,
    pub(crate) msg_ref: Option<Ref>,
    pub(crate) params: Payload,
    pub(crate) replaces: Option<Ref>,
    pub(crate) outbox: Outbox,
    pub(crate) info: Arc<SocketInfo>,
    pub(crate) pubsub: PubSub,
    pub(crate) mailbox: mpsc::Receiver<ChannelMsg>,
    pub(crate) mailbox_capacity: usize,
}

pub(crate) async fn run<C: Channel>(mut channel: C, req: JoinRequest) {
    let JoinRequest { topic, join_ref, msg_ref, params, replaces, outbox, info, pubsub, mut mailbox, mailbox_capacity } =
        req;
    let mut socket = SocketRef {
        topic,
        join_ref,
        outbox,
        info,
        pubsub,
        subscriber: None,
        alive: Arc::new(()),
        presence: None,
        replay: None,
        replay_after: None,
        joined: false,
    };

    // Boxed: a channel's join future can be large (it may read history, or a database), and
    // inline it would size this task, which lives as long as the channel, for its whole life.
    let joined = AssertUnwindSafe(Box::pin(channel.join(params, &mut socket))).catch_unwind().await;
    socket.joined = true;
    let (status, response) = match joined {
        Ok(Ok(response)) => (ReplyStatus::Ok, response),
        Ok(Err(response)) => (ReplyStatus::Error, response),
        Err(panic) => {
            tracing::error!(topic = %socket.topic, panic = panic_message(&*panic), "channel join panicked");
            (ReplyStatus::Error, reason("join crashed"))
        }
    };
    match status {
        ReplyStatus::Ok => socket.outbox.0.counters.joined(),
        ReplyStatus::Error => {
            socket.outbox.0.counters.refused(response.get("reason").and_then(Value::as_str).unwrap_or("error"))
        }
    }

    // Subscribe before the reply goes out, so every broadcast after the client sees "ok" reaches it.
    // A recovering join (`SocketRef::recover`) subscribed already, holding live broadcasts back
    // until its replay, streamed after the reply as the socket drains, is delivered.
    let mut intercepted = None;
    let held = socket.subscriber.filter(|_| socket.replay.is_some());
    let mut make_sub = || {
        let intercept = (!C::INTERCEPT.is_empty()).then(|| {
            let (tx, rx) = mpsc::channel(mailbox_capacity);
            intercepted = Some(rx);
            Intercept { events: C::INTERCEPT, tx }
        });
        Subscriber::Socket { outbox: socket.outbox.clone(), serializer: socket.info.serializer, intercept }
    };
    let mut release = None;
    let _subscription = match (status == ReplyStatus::Ok, held) {
        (true, Some(id)) => {
            release = Some(make_sub());
            Some(SubscriptionGuard { pubsub: socket.pubsub.clone(), topic: (*socket.topic).into(), id })
        }
        (true, None) => {
            let id = socket.pubsub.insert(&socket.topic, make_sub());
            socket.subscriber = Some(id);
            Some(SubscriptionGuard { pubsub: socket.pubsub.clone(), topic: (*socket.topic).into(), id })
        }
        (false, held) => {
            if let Some(id) = held {
                socket.pubsub.remove(&socket.topic, id);
            }
            None
        }
    };

    reply(&socket, msg_ref, status, Payload::Json(response));
    if let Some(old) = replaces {
        control(&socket, Some(old), "phx_close");
    }
    let mut replay = match (release, held) {
        (Some(sub), Some(id)) => {
            let entries = socket.replay.take().unwrap_or_default().into_iter().peekable();
            // What fits goes now, before `after_join` pushes anything: most replays are short.
            Box::new(Replay { entries, id, sub }).step(&socket, socket.outbox.queued())
        }
        _ => None,
    };
    if status != ReplyStatus::Ok {
        // Pushes the client sent before it saw the refusal get what a push to an unjoined topic gets.
        mailbox.close();
        while let Ok(msg) = mailbox.try_recv() {
            if let ChannelMsg::In(m) = msg {
                unmatched(&socket, m.msg_ref);
            }
        }
        return;
    }
    if AssertUnwindSafe(channel.after_join(&mut socket)).catch_unwind().await.is_err() {
        tracing::error!(topic = %socket.topic, "channel panicked in after_join");
        return control(&socket, socket.join_ref.clone(), "phx_error");
    }

    loop {
        let next = tokio::select! {
            biased;
            msg = mailbox.recv() => Next::Msg(msg),
            Some(b) = async { match &mut intercepted { Some(rx) => rx.recv().await, None => pending().await } } => Next::Out(b),
            queued = async {
                match &replay { Some(_) => socket.outbox.drained(Replay::low_water(&socket.outbox)).await, None => pending().await }
            } => Next::Drained(queued),
        };
        match next {
            Next::Drained(queued) => {
                replay = replay.and_then(|r| r.step(&socket, queued));
            }
            Next::Msg(None) => {
                return terminate(&mut channel, Terminate::SocketClosed, &mut socket).await;
            }
            Next::Msg(Some(ChannelMsg::Replaced)) => {
                return terminate(&mut channel, Terminate::Replaced, &mut socket).await;
            }
            Next::Msg(Some(ChannelMsg::Leave(leave_ref))) => {
                reply(&socket, leave_ref, ReplyStatus::Ok, Payload::empty());
                terminate(&mut channel, Terminate::Leave, &mut socket).await;
                return control(&socket, socket.join_ref.clone(), "phx_close");
            }
            Next::Msg(Some(ChannelMsg::In(m))) => {
                let Message { msg_ref, event, payload, .. } = *m;
                let outcome = AssertUnwindSafe(channel.handle_in(&event, payload, &mut socket)).catch_unwind().await;
                match outcome {
                    Ok(HandleIn::NoReply) => {}
                    Ok(HandleIn::Reply(status, response)) => reply(&socket, msg_ref, status, response),
                    Ok(HandleIn::Stop { reason, reply: answer }) => {
                        if let Some((status, response)) = answer {
                            reply(&socket, msg_ref, status, response);
                        }
                        let event = match &reason {
                            StopReason::Normal => "phx_close",
                            StopReason::Error(why) => {
                                tracing::warn!(topic = %socket.topic, reason = %why, "channel stopped with an error");
                                "phx_error"
                            }
                        };
                        terminate(&mut channel, Terminate::Stop(reason), &mut socket).await;
                        return control(&socket, socket.join_ref.clone(), event);
                    }
                    Err(panic) => {
                        tracing::error!(topic = %socket.topic, event, panic = panic_message(&*panic), "channel panicked");
                        return control(&socket, socket.join_ref.clone(), "phx_error");
                    }
                }
            }
            Next::Out(b) => {
                let outcome =
                    AssertUnwindSafe(channel.handle_out(&b.event, b.payload.clone(), &mut socket)).catch_unwind().await;
                if let Err(panic) = outcome {
                    tracing::error!(topic = %socket.topic, event = %b.event, panic = panic_message(&*panic), "channel panicked in handle_out");
                    return control(&socket, socket.join_ref.clone(), "phx_error");
                }
            }
        }
    }
}

enum Next {
    Msg(Option<ChannelMsg>),
    Out(Arc<Broadcast>),
    /// The outbound queue drained below the replay's low-water mark.
    Drained(usize),
}

/// A recovering join's replay, longer than the outbound queue may be: streamed into it as the
/// socket drains, half a queue at a time, then the live broadcasts held back meanwhile (at most
/// a queue's worth: a socket that falls further behind is closed as a slow consumer and rejoins
/// from its last position), then the subscription goes live. Ends with the channel instance, so
/// nothing of it reaches a later join of the topic. Boxed in the task, which it would otherwise
/// grow for every channel, recovering or not.
struct Replay {
    entries: std::iter::Peekable<std::vec::IntoIter<Arc<Broadcast>>>,
    id: SubscriberId,
    sub: Subscriber,
}

impl Replay {
    /// Frames queued at or below which the next part is queued.
    fn low_water(outbox: &Outbox) -> usize {
        outbox.limit() / 4
    }

    /// Queues what fits while `queued` frames are queued; `None` once the subscription is live
    /// (or gone, or the socket closed).
    fn step(mut self: Box<Self>, socket: &SocketRef, queued: usize) -> Option<Box<Replay>> {
        if socket.outbox.is_closed() {
            return None;
        }
        let mut room = (socket.outbox.limit() / 2).max(1).saturating_sub(queued);
        while room > 0 {
            let Some(b) = self.entries.peek() else { break };
            if let Subscriber::Socket { intercept: Some(i), .. } = &self.sub
                && i.events.contains(&&*b.event)
                && i.tx.capacity() == 0
            {
                // `handle_out` is behind: the loop runs it (that branch goes first) before the
                // next part, so intercepted events are replayed without being dropped.
                return Some(self);
            }
            deliver(&self.sub, b, None, &BroadcastFrames::new(b));
            self.entries.next();
            room -= 1;
        }
        if self.entries.len() > 0 {
            return Some(self);
        }
        let Replay { entries, id, sub } = *self;
        let sub = socket.pubsub.release(&socket.topic, id, room, socket.replay_after, sub)?;
        Some(Box::new(Replay { entries, id, sub }))
    }
}

async fn terminate<C: Channel>(channel: &mut C, why: Terminate, socket: &mut SocketRef) {
    if AssertUnwindSafe(channel.terminate(&why, socket)).catch_unwind().await.is_err() {
        tracing::error!(topic = %socket.topic, "channel panicked in terminate");
    }
}

fn reply(socket: &SocketRef, msg_ref: Option<Ref>, status: ReplyStatus, response: Payload) {
    send_reply(&socket.outbox, &socket.info, socket.join_ref.clone(), msg_ref, &socket.topic, status, response);
}

fn unmatched(socket: &SocketRef, msg_ref: Option<Ref>) {
    let response = Payload::Json(reason("unmatched topic"));
    send_reply(&socket.outbox, &socket.info, None, msg_ref, &socket.topic, ReplyStatus::Error, response);
}

pub(crate) fn send_reply(
    outbox: &Outbox,
    info: &SocketInfo,
    join_ref: Option<Ref>,
    msg_ref: Option<Ref>,
    topic: &str,
    status: ReplyStatus,
    response: Payload,
) {
    let reply = Reply { join_ref, msg_ref, topic: topic.to_owned(), status, response };
    match info.serializer.encode_reply(&reply) {
        Ok(frame) => outbox.push(frame),
        Err(e) => {
            tracing::warn!(topic, error = %e, "reply not encodable; answering with an error");
            let fallback =
                Reply { response: Payload::Json(reason("reply not encodable")), status: ReplyStatus::Error, ..reply };
            if let Ok(frame) = info.serializer.encode_reply(&fallback) {
                outbox.push(frame);
            }
        }
    }
}

/// `phx_close` or `phx_error`: carries the join ref as both join_ref and ref, payload `{}`.
fn control(socket: &SocketRef, join_ref: Option<Ref>, event: &str) {
    let push = Push {
        join_ref: join_ref.clone(),
        msg_ref: join_ref,
        topic: socket.topic.to_string(),
        event: event.to_owned(),
        payload: Payload::Json(Value::Object(Default::default())),
    };
    if let Ok(frame) = socket.info.serializer.encode_push(&push) {
        socket.outbox.push(frame);
    }
}

fn panic_message(panic: &(dyn Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(non-string panic)")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A channel whose join holds 4 KiB across an await (a database read, say).
    struct Heavy;

    impl Channel for Heavy {
        async fn handle_in(&mut self, _: &str, _: Payload, _: &mut SocketRef) -> HandleIn {
            HandleIn::NoReply
        }

        async fn join(&mut self, _: Payload, _: &mut SocketRef) -> Result<Value, Value> {
            let buffer = [0u8; 4096];
            tokio::task::yield_now().await;
            Ok(Value::from(buffer.iter().map(|&b| u64::from(b)).sum::<u64>()))
        }
    }

    struct Light;

    impl Channel for Light {
        async fn handle_in(&mut self, _: &str, _: Payload, _: &mut SocketRef) -> HandleIn {
            HandleIn::NoReply
        }

        async fn join(&mut self, _: Payload, _: &mut SocketRef) -> Result<Value, Value> {
            Ok(Value::Null)
        }
    }

    fn future_size<A, B, F: Future>(_: impl Fn(A, B) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// A channel task lives as long as its channel, one per joined topic and socket: a large
    /// join future inlined in it would cost every idle channel its size for its whole life.
    #[test]
    fn a_large_join_future_does_not_grow_the_channel_task() {
        let heavy = future_size(run::<Heavy>);
        let light = future_size(run::<Light>);
        assert!(heavy < light + 256, "a channel task with a 4 KiB join future is {heavy} bytes, {light} without");
    }
}
