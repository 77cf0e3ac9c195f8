//! Database clients: the transport whose peer is a database. Inbox rows in, outbox rows out,
//! each inbox row answered exactly once, across crashes.
//!
//! One coordinator task owns every client's [`Session`]. It reads inbox rows, hands each to its
//! client's session, and drains every session's [`Outbound`] into a [`Unit`] while it watches
//! for the answer to each row it handed over (the `phx_reply` with the row's topic and ref; a
//! `phx_close`/`phx_error` of the topic; or, for a message the channel does not answer,
//! [`DbClientsOptions::reply_timeout`]). Only when every handed row is answered does it close
//! the unit: the unit then holds every effect of rows up to its cursor (replies, broadcasts to
//! every client, joins and leaves) and nothing of a later row, and the writer commits outbox
//! rows, topic changes, dead letters and the cursor in one transaction. A crash before the
//! commit loses the whole unit, and its rows are read again after the restart; a crash after it
//! loses nothing. Either way each committed inbox row is answered once.

use std::collections::{HashMap, VecDeque};
use std::future::poll_fn;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use fawkes_channel::{CloseReason, ConnectError, ConnectInfo, Endpoint, Frame, Outbound, Session};
use serde::de::IgnoredAny;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::Error;
use crate::db::{Db, on_pool};
use crate::feed::{Feed, FeedRow};
use crate::outbox::{CURSOR, OutRow, TopicChange, Unit};
use crate::wake::Wakeup;

/// How the inbox is read and the outbox written.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct DbClientsOptions {
    /// Inbox rows read per query, and at most handed to sessions before they are committed.
    /// Keep it below half of [`Config::outbound_queue_limit`](fawkes_channel::Config) when each
    /// row broadcasts to the other clients: a client's queue holds at most that many frames
    /// before they are drained.
    pub batch_size: i64,
    /// How often to look for new rows (on PostgreSQL, NOTIFY wakes the reader sooner).
    pub poll_interval: Duration,
    /// While nothing arrives, the interval doubles up to this.
    pub max_idle_interval: Duration,
    /// Outbox rows per `INSERT` statement (a transaction holds as many as its rows produced).
    pub write_batch_size: usize,
    /// How long frames that no inbox row caused (broadcasts from other transports, pushes from
    /// timers) wait for company before they are written.
    pub flush_interval: Duration,
    /// How long a row whose message gets no reply (`HandleIn::NoReply`) holds the cursor,
    /// unless a later message of the same client on the same topic is answered first.
    pub reply_timeout: Duration,
    /// Outbox rows held in memory while the writer is behind before sessions are left to fill
    /// their own bounded queues.
    pub max_pending_rows: usize,
}

impl Default for DbClientsOptions {
    fn default() -> DbClientsOptions {
        DbClientsOptions {
            batch_size: 500,
            poll_interval: Duration::from_millis(50),
            max_idle_interval: Duration::from_millis(500),
            write_batch_size: 1000,
            flush_interval: Duration::from_millis(5),
            reply_timeout: Duration::from_secs(1),
            max_pending_rows: 200_000,
        }
    }
}

impl DbClientsOptions {
    /// Sets [`DbClientsOptions::poll_interval`].
    pub fn poll_interval(mut self, d: Duration) -> Self {
        self.poll_interval = d;
        self
    }

    /// Sets [`DbClientsOptions::batch_size`].
    pub fn batch_size(mut self, rows: i64) -> Self {
        self.batch_size = rows.max(1);
        self
    }

    /// Sets [`DbClientsOptions::write_batch_size`].
    pub fn write_batch_size(mut self, rows: usize) -> Self {
        self.write_batch_size = rows.max(1);
        self
    }

    /// Sets [`DbClientsOptions::flush_interval`].
    pub fn flush_interval(mut self, d: Duration) -> Self {
        self.flush_interval = d;
        self
    }

    /// Sets [`DbClientsOptions::reply_timeout`].
    pub fn reply_timeout(mut self, d: Duration) -> Self {
        self.reply_timeout = d;
        self
    }
}

/// Serves database clients of an endpoint: reads `fawkes_inbox`, writes `fawkes_outbox`. Stops
/// when dropped (what was not committed yet is read again by the next start).
#[derive(Debug)]
pub struct DbClients {
    coordinator: tokio::task::JoinHandle<()>,
    writer: tokio::task::JoinHandle<()>,
}

impl Drop for DbClients {
    fn drop(&mut self) {
        self.coordinator.abort();
        self.writer.abort();
    }
}

impl DbClients {
    /// Starts serving. Resumes after the last inbox row committed before (a first start begins
    /// at the inbox's current end), with every client's joined topics joined again.
    pub async fn start(db: Db, endpoint: Endpoint, options: DbClientsOptions) -> Result<DbClients, Error> {
        let position = db.start_cursor(CURSOR, "fawkes_inbox", "id").await?;
        let sql = "SELECT client_id, topic, join_ref, params FROM fawkes_client_topics ORDER BY client_id, topic";
        let joined: Vec<(String, String, String, String)> = on_pool!(&db, p => sqlx::query_as(sql).fetch_all(p).await?);
        let (units, rx) = mpsc::channel(1);
        let writer = tokio::spawn(crate::outbox::write(db.clone(), rx, options.write_batch_size));
        let wakeup = Wakeup::new(&db, options.poll_interval, options.max_idle_interval).await;
        let coordinator = Coordinator {
            feed: Feed::new("fawkes_inbox", "id", "client_id", "frame", "NULL"),
            db,
            endpoint,
            options,
            clients: HashMap::new(),
            unit: Unit::default(),
            in_flight: 0,
            unit_since: None,
            units,
        };
        Ok(DbClients { coordinator: tokio::spawn(coordinator.run(position, joined, wakeup)), writer })
    }
}

/// What answering a handed-over message means for the durable record of topics.
#[derive(Debug)]
enum Kind {
    Push,
    Join {
        join_ref: String,
        params: String,
    },
    Leave,
    /// A join replayed from `fawkes_client_topics` after a restart: its ok reply is not the
    /// client's business; a refusal is.
    Restore,
}

#[derive(Debug)]
struct Pending {
    /// The inbox row (none for a restored join).
    row: Option<i64>,
    topic: String,
    /// The message's ref as text (`"7"` and `7` name the same message).
    msg_ref: String,
    kind: Kind,
    since: Instant,
}

struct Client {
    id: Arc<str>,
    session: Session,
    outbound: Outbound,
    pending: VecDeque<Pending>,
    drained: Vec<Frame>,
    closed: Option<CloseReason>,
}

struct Coordinator {
    db: Db,
    endpoint: Endpoint,
    options: DbClientsOptions,
    feed: Feed,
    clients: HashMap<Arc<str>, Client>,
    /// What the next transaction writes.
    unit: Unit,
    /// Rows (and restored joins) handed over and not answered yet.
    in_flight: usize,
    /// When the unit got its first outbox row (for the flush interval).
    unit_since: Option<Instant>,
    units: mpsc::Sender<Unit>,
}

impl Coordinator {
    async fn run(mut self, mut position: i64, joined: Vec<(String, String, String, String)>, mut wakeup: Wakeup) {
        for (client, topic, join_ref, params) in joined {
            self.restore(client, topic, join_ref, params).await;
        }
        let mut read_due = true;
        loop {
            self.drain_now();
            self.expire();
            if self.in_flight == 0 && self.unit_due() {
                self.submit().await;
            }
            let may_read = !self.endpoint.is_shutting_down()
                && (self.in_flight == 0 || (self.in_flight < self.options.batch_size as usize && self.stuck()));
            if may_read && read_due {
                let limit = self.options.batch_size - self.in_flight as i64;
                let rows = self.feed.next_batch(&self.db, position, limit, CURSOR).await;
                wakeup.read(!rows.is_empty());
                if let Some(last) = rows.last().map(|r| r.id) {
                    for (i, row) in rows.into_iter().enumerate() {
                        self.hand(row).await;
                        if i % 128 == 127 {
                            self.drain_now();
                        }
                    }
                    position = last;
                    self.unit.cursor = Some(last);
                    continue;
                }
                read_due = false;
            }
            let next = self.next_deadline();
            let clients = &mut self.clients;
            tokio::select! {
                () = poll_fn(|cx| poll_outbounds(clients, cx)) => {}
                () = wakeup.wait(), if may_read && !read_due => read_due = true,
                () = tokio::time::sleep_until(next) => {}
            }
        }
    }

    /// Hands one inbox row to its client's session.
    async fn hand(&mut self, row: FeedRow) {
        // A row no session takes is dead-lettered at once (idempotently: if the unit is lost in
        // a crash, the row is read and dead-lettered again, once).
        let (Some(client), Some(frame)) = (row.a, row.b) else {
            return self.db.dead_letter(CURSOR, row.id, "client_id or frame is NULL").await;
        };
        let client: Arc<str> = client.into();
        if let Err(e) = self.connected(&client).await {
            return self.db.dead_letter(CURSOR, row.id, &format!("connect refused: {e}")).await;
        }
        let head = serde_json::from_str::<(Value, Value, String, String, Value)>(&frame).ok();
        let Some(c) = self.clients.get_mut(&client) else { return };
        let pending = head.and_then(|(join_ref, msg_ref, topic, event, payload)| {
            let kind = match event.as_str() {
                "phx_join" => Kind::Join { join_ref: join_ref.to_string(), params: payload.to_string() },
                "phx_leave" => Kind::Leave,
                _ => Kind::Push,
            };
            (!msg_ref.is_null()).then(|| Pending {
                row: Some(row.id),
                topic,
                msg_ref: ref_text(&msg_ref),
                kind,
                since: Instant::now(),
            })
        });
        match c.session.handle_frame(Frame::text(frame)).await {
            Ok(()) => {
                if let Some(pending) = pending {
                    c.pending.push_back(pending);
                    self.in_flight += 1;
                }
            }
            Err(reason) => self.db.dead_letter(CURSOR, row.id, &reason.to_string()).await,
        }
    }

    /// Makes sure `client` has an open session (a closed one is finished first).
    async fn connected(&mut self, client: &Arc<str>) -> Result<(), ConnectError> {
        if let Some(c) = self.clients.get_mut(client) {
            if !c.session.is_closed() {
                return Ok(());
            }
            // Closed: whatever it still yields, then its reason, before a new session starts.
            let noop = std::task::Waker::noop();
            let mut cx = Context::from_waker(noop);
            while let Poll::Ready(Ok(_)) = c.outbound.poll_recv_many(&mut cx, &mut c.drained, usize::MAX) {}
            if let Poll::Ready(Err(reason)) = c.outbound.poll_recv_many(&mut cx, &mut c.drained, usize::MAX) {
                c.closed = Some(reason);
            }
            self.settle_client(client.clone());
        }
        let mut info = ConnectInfo::new("db", false).with_query(Some("vsn=2.0.0"));
        info.params.insert("client_id".into(), client.to_string());
        match self.endpoint.connect(info).await {
            Ok(session) => {
                let outbound = session.outbound();
                let c = Client {
                    id: client.clone(),
                    session,
                    outbound,
                    pending: VecDeque::new(),
                    drained: Vec::new(),
                    closed: None,
                };
                self.clients.insert(client.clone(), c);
                Ok(())
            }
            Err(e) => {
                tracing::warn!(client = %client, error = %e, "database client refused");
                Err(e)
            }
        }
    }

    /// Joins a recorded topic again after a restart.
    async fn restore(&mut self, client: String, topic: String, join_ref: String, params: String) {
        let client: Arc<str> = client.into();
        if self.connected(&client).await.is_err() {
            self.unit.topics.push(TopicChange::Left { client, topic });
            return;
        }
        let Ok(msg_ref) = serde_json::from_str::<Value>(&join_ref).map(|r| ref_text(&r)) else { return };
        let topic_json = Value::String(topic.clone());
        let frame = format!("[{join_ref},{join_ref},{topic_json},\"phx_join\",{params}]");
        let Some(c) = self.clients.get_mut(&client) else { return };
        if c.session.handle_frame(Frame::text(frame)).await.is_ok() {
            c.pending.push_back(Pending { row: None, topic, msg_ref, kind: Kind::Restore, since: Instant::now() });
            self.in_flight += 1;
        }
    }

    /// Takes what every session has queued right now.
    fn drain_now(&mut self) {
        let noop = std::task::Waker::noop();
        let mut cx = Context::from_waker(noop);
        poll_outbounds(&mut self.clients, &mut cx).map(drop).is_ready();
        let ids: Vec<Arc<str>> = self
            .clients
            .values()
            .filter(|c| !c.drained.is_empty() || c.closed.is_some())
            .map(|c| c.id.clone())
            .collect();
        for id in ids {
            self.settle_client(id);
        }
    }

    /// Moves a client's drained frames into the unit, answering what they answer; finishes a
    /// closed client.
    fn settle_client(&mut self, id: Arc<str>) {
        let Some(c) = self.clients.get_mut(&id) else { return };
        let mut drained = std::mem::take(&mut c.drained);
        for frame in drained.drain(..) {
            // Broadcasts (`[null,null,...`) answer nothing: not parsed, and their bytes are
            // shared with every other subscriber, not copied.
            let frame = match std::str::from_utf8(frame.as_bytes()) {
                Ok(_) => frame,
                Err(_) => Frame::text(String::from_utf8_lossy(frame.as_bytes()).into_owned()),
            };
            let broadcast = frame.as_bytes().starts_with(b"[null,null,");
            let keep = broadcast
                || std::str::from_utf8(frame.as_bytes())
                    .is_ok_and(|text| answer(&c.id, &mut c.pending, text, &mut self.unit.topics, &mut self.in_flight));
            if keep {
                self.unit.rows.push(OutRow { client: id.clone(), frame: Some(frame), closed: None });
            }
        }
        c.drained = drained;
        if self.unit_since.is_none() && !self.unit.rows.is_empty() {
            self.unit_since = Some(Instant::now());
        }
        let Some(reason) = c.closed.take() else { return };
        if reason != CloseReason::TransportClosed {
            self.unit.rows.push(OutRow { client: id.clone(), frame: None, closed: Some(reason.to_string()) });
            self.unit_since.get_or_insert_with(Instant::now);
        }
        // Rows it took and never answered are dead-lettered, not dropped.
        for p in c.pending.drain(..) {
            self.in_flight -= 1;
            if let Some(row) = p.row {
                self.unit.dead.push((row, format!("client closed before answering: {reason}")));
            }
        }
        // A restart resumes sessions the server closed by shutting down; other closes are final.
        if reason != CloseReason::Shutdown {
            self.unit.topics.push(TopicChange::Gone { client: id.clone() });
        }
        self.clients.remove(&id);
    }

    /// Counts as answered what waited longer than the reply timeout.
    fn expire(&mut self) {
        let timeout = self.options.reply_timeout;
        let now = Instant::now();
        for c in self.clients.values_mut() {
            while c.pending.front().is_some_and(|p| now.duration_since(p.since) >= timeout) {
                if let Some(p) = c.pending.pop_front() {
                    tracing::debug!(client = %c.id, topic = %p.topic, msg_ref = %p.msg_ref, "no reply: counted as answered");
                    self.in_flight -= 1;
                }
            }
        }
    }

    /// Every unanswered row has waited a little: let more rows in, whose replies may answer them.
    fn stuck(&self) -> bool {
        let grace = self.options.poll_interval.min(self.options.reply_timeout / 4);
        self.clients.values().flat_map(|c| c.pending.iter()).all(|p| p.since.elapsed() >= grace)
    }

    fn unit_due(&self) -> bool {
        self.unit.cursor.is_some()
            || !self.unit.topics.is_empty()
            || !self.unit.dead.is_empty()
            || self.unit.rows.len() >= self.options.write_batch_size
            || self.unit_since.is_some_and(|t| t.elapsed() >= self.options.flush_interval)
    }

    fn next_deadline(&self) -> Instant {
        let now = Instant::now();
        let mut next = now + self.options.reply_timeout;
        if let Some(t) = self.unit_since {
            next = next.min(t + self.options.flush_interval);
        }
        if let Some(oldest) = self.clients.values().filter_map(|c| c.pending.front()).map(|p| p.since).min() {
            let grace = self.options.poll_interval.min(self.options.reply_timeout / 4);
            next = next.min(oldest + grace).min(oldest + self.options.reply_timeout);
        }
        next.max(now + Duration::from_millis(1))
    }

    /// Hands the unit to the writer. While the writer is behind this waits, reading no inbox
    /// rows; sessions are still drained (into the next unit) up to `max_pending_rows`.
    async fn submit(&mut self) {
        let unit = std::mem::take(&mut self.unit);
        self.unit_since = None;
        if unit.is_empty() {
            return;
        }
        let units = self.units.clone();
        let mut send = std::pin::pin!(units.reserve());
        loop {
            let draining = self.unit.rows.len() < self.options.max_pending_rows;
            let clients = &mut self.clients;
            tokio::select! {
                permit = &mut send => {
                    if let Ok(permit) = permit {
                        permit.send(unit);
                    }
                    return;
                }
                () = poll_fn(|cx| poll_outbounds(clients, cx)), if draining => self.drain_now(),
            }
        }
    }
}

/// Polls every session's outbound queue: ready when any yielded frames or closed.
fn poll_outbounds(clients: &mut HashMap<Arc<str>, Client>, cx: &mut Context<'_>) -> Poll<()> {
    let mut ready = false;
    for c in clients.values_mut() {
        if c.closed.is_some() {
            ready = true;
            continue;
        }
        match c.outbound.poll_recv_many(cx, &mut c.drained, usize::MAX) {
            Poll::Ready(Ok(_)) => ready = true,
            Poll::Ready(Err(reason)) => {
                c.closed = Some(reason);
                ready = true;
            }
            Poll::Pending => {}
        }
    }
    if ready { Poll::Ready(()) } else { Poll::Pending }
}

/// Settles the handed-over messages `text` answers. False for a frame not to write (the ok
/// reply to a restored join).
fn answer(
    client: &Arc<str>,
    pending: &mut VecDeque<Pending>,
    text: &str,
    topics: &mut Vec<TopicChange>,
    in_flight: &mut usize,
) -> bool {
    let Ok((_, msg_ref, topic, event, _)) =
        serde_json::from_str::<(IgnoredAny, Value, String, String, IgnoredAny)>(text)
    else {
        return true;
    };
    match event.as_str() {
        "phx_reply" => {
            let msg_ref = ref_text(&msg_ref);
            let Some(i) = pending.iter().position(|p| p.topic == topic && p.msg_ref == msg_ref) else { return true };
            // A topic's messages are handled in order: earlier ones of it were handled too.
            let mut answered = None;
            for (j, p) in std::mem::take(pending).into_iter().enumerate() {
                if j <= i && p.topic == topic {
                    *in_flight -= 1;
                    if j == i {
                        answered = Some(p);
                    }
                } else {
                    pending.push_back(p);
                }
            }
            answered.is_none_or(|p| record(client, p, text, topics))
        }
        "phx_close" | "phx_error" => {
            // The channel ended: nothing more of it will be answered.
            let before = pending.len();
            pending.retain(|p| p.topic != topic);
            *in_flight -= before - pending.len();
            topics.push(TopicChange::Left { client: client.clone(), topic });
            true
        }
        _ => true,
    }
}

/// Records what an answered join or leave changes; false to swallow a restored join's ok.
fn record(client: &Arc<str>, p: Pending, text: &str, topics: &mut Vec<TopicChange>) -> bool {
    let ok = || {
        serde_json::from_str::<(IgnoredAny, IgnoredAny, IgnoredAny, IgnoredAny, Value)>(text)
            .is_ok_and(|(.., payload)| payload["status"] == "ok")
    };
    let client = client.clone();
    match p.kind {
        Kind::Push => true,
        Kind::Join { join_ref, params } => {
            topics.push(if ok() {
                TopicChange::Joined { client, topic: p.topic, join_ref, params }
            } else {
                TopicChange::Left { client, topic: p.topic }
            });
            true
        }
        Kind::Leave => {
            topics.push(TopicChange::Left { client, topic: p.topic });
            true
        }
        Kind::Restore => {
            if ok() {
                return false;
            }
            tracing::info!(client = %client, topic = %p.topic, "a resumed join was refused");
            topics.push(TopicChange::Left { client, topic: p.topic });
            true
        }
    }
}

fn ref_text(r: &Value) -> String {
    match r {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(topic: &str, msg_ref: &str, kind: Kind) -> Pending {
        Pending { row: None, topic: topic.into(), msg_ref: msg_ref.into(), kind, since: Instant::now() }
    }

    #[test]
    fn a_reply_answers_its_row_and_the_earlier_rows_of_its_topic() {
        let id: Arc<str> = "c".into();
        let mut queue: VecDeque<Pending> =
            [pending("t", "1", Kind::Push), pending("u", "2", Kind::Push), pending("t", "3", Kind::Push)].into();
        let (mut topics, mut in_flight) = (Vec::new(), 3);
        let reply = r#"["1","3","t","phx_reply",{"response":{},"status":"ok"}]"#;
        assert!(answer(&id, &mut queue, reply, &mut topics, &mut in_flight));
        assert_eq!((in_flight, queue.len(), queue[0].msg_ref.as_str()), (1, 1, "2"), "1 (no reply) and 3 answered");
        // A reply nobody waits for is written and changes nothing.
        assert!(answer(&id, &mut queue, reply, &mut topics, &mut in_flight));
        assert_eq!(in_flight, 1);
        // The channel of `u` ended: its rows are answered, its topic left.
        assert!(answer(&id, &mut queue, r#"["1",null,"u","phx_close",{}]"#, &mut topics, &mut in_flight));
        assert_eq!((in_flight, queue.len()), (0, 0));
        assert!(matches!(&topics[..], [TopicChange::Left { topic, .. }] if topic == "u"));
    }

    #[test]
    fn joins_are_recorded_and_a_resumed_join_is_silent_unless_refused() {
        let id: Arc<str> = "c".into();
        let join = Kind::Join { join_ref: r#""1""#.into(), params: "{}".into() };
        let mut queue: VecDeque<Pending> =
            [pending("a", "1", join), pending("b", "5", Kind::Restore), pending("c", "6", Kind::Restore)].into();
        let (mut topics, mut in_flight) = (Vec::new(), 3);
        let ok =
            |topic: &str, r: &str| format!(r#"["{r}","{r}","{topic}","phx_reply",{{"response":{{}},"status":"ok"}}]"#);
        assert!(answer(&id, &mut queue, &ok("a", "1"), &mut topics, &mut in_flight), "a join's reply is written");
        assert!(!answer(&id, &mut queue, &ok("b", "5"), &mut topics, &mut in_flight), "a resumed join's ok is not");
        let refused = r#"["6","6","c","phx_reply",{"response":{"reason":"unauthorized"},"status":"error"}]"#;
        assert!(answer(&id, &mut queue, refused, &mut topics, &mut in_flight), "a resumed join's refusal is");
        assert_eq!(in_flight, 0);
        assert!(matches!(&topics[..], [
            TopicChange::Joined { topic: a, join_ref, .. },
            TopicChange::Left { topic: c, .. },
        ] if a == "a" && join_ref == r#""1""# && c == "c"));
    }
}
