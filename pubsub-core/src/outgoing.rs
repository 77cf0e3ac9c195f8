//! What every [`Adapter`](crate::Adapter) to a network backend needs: a bounded queue between
//! the node's non-blocking calls and the task that sends, and a reconnect backoff.

use std::fmt;
use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};

use crate::adapter::RemoteInbound;
use crate::node::NodeId;

/// A message for an adapter's sending task.
#[derive(Debug)]
pub enum Outgoing {
    /// To every other node.
    All(Bytes),
    /// To one node.
    To(NodeId, Bytes),
    /// Answer once everything queued before it has been sent or given up on.
    Flush(oneshot::Sender<()>),
}

/// The bounded queue between an adapter's `broadcast`/`send`/`flush` (which must not block) and
/// the task that sends. While the backend is away messages wait here; what does not fit is
/// dropped, logged and counted in [`ClusterStats::dropped`](crate::ClusterStats::dropped).
///
/// ```
/// use bytes::Bytes;
/// use fawkes_pubsub_core::{Adapter, NodeId, Outgoing, OutgoingQueue, RemoteInbound};
/// use futures_util::future::BoxFuture;
///
/// struct MyAdapter { queue: OutgoingQueue }
///
/// impl Adapter for MyAdapter {
///     fn start(&self, inbound: RemoteInbound) {
///         if let Some(mut rx) = self.queue.start(&inbound) {
///             tokio::spawn(async move {
///                 while let Some(out) = rx.recv().await {
///                     match out {
///                         Outgoing::All(bytes) | Outgoing::To(_, bytes) => { /* send it */ let _ = bytes; }
///                         Outgoing::Flush(done) => { let _ = done.send(()); }
///                     }
///                 }
///             });
///         }
///     }
///     fn broadcast(&self, message: Bytes) { self.queue.push(Outgoing::All(message)) }
///     fn send(&self, node: NodeId, message: Bytes) { self.queue.push(Outgoing::To(node, message)) }
///     fn flush(&self) -> BoxFuture<'_, ()> { self.queue.flush() }
/// }
/// ```
pub struct OutgoingQueue {
    tx: mpsc::Sender<Outgoing>,
    rx: Mutex<Option<mpsc::Receiver<Outgoing>>>,
    inbound: OnceLock<RemoteInbound>,
}

impl fmt::Debug for OutgoingQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OutgoingQueue").field("free", &self.tx.capacity()).finish_non_exhaustive()
    }
}

impl OutgoingQueue {
    /// A queue that holds up to `capacity` messages.
    pub fn new(capacity: usize) -> OutgoingQueue {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        OutgoingQueue { tx, rx: Mutex::new(Some(rx)), inbound: OnceLock::new() }
    }

    /// Links the queue to its node (drops are reported there) and hands out the receiving end
    /// for the sending task: the first call gets it, later ones `None`.
    pub fn start(&self, inbound: &RemoteInbound) -> Option<mpsc::Receiver<Outgoing>> {
        let _ = self.inbound.set(inbound.clone());
        self.rx.lock().take()
    }

    /// Queues a message without waiting; a full queue drops it (logged and counted).
    pub fn push(&self, out: Outgoing) {
        if self.tx.try_send(out).is_err()
            && let Some(inbound) = self.inbound.get()
        {
            inbound.dropped(1);
            tracing::warn!(node = %inbound.node(), "pubsub send queue full; message dropped");
        }
    }

    /// Completes once the sending task has answered a [`Outgoing::Flush`] queued now (at once
    /// if the queue is full or closed).
    pub fn flush(&self) -> BoxFuture<'_, ()> {
        let (done, answered) = oneshot::channel();
        let queued = self.tx.try_send(Outgoing::Flush(done)).is_ok();
        Box::pin(async move {
            if queued {
                let _ = answered.await;
            }
        })
    }
}

/// Waits between reconnection attempts: 100 ms, doubling up to 5 s, back to 100 ms after a
/// success.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff { next: Backoff::MIN }
    }
}

impl Backoff {
    const MIN: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(5);

    /// A backoff at its shortest.
    pub fn new() -> Backoff {
        Backoff::default()
    }

    /// Sleeps for the current delay, then doubles it (up to 5 s).
    pub async fn wait(&mut self) {
        tokio::time::sleep(self.next).await;
        self.next = (self.next * 2).min(Backoff::MAX);
    }

    /// Back to the shortest delay (after a success).
    pub fn reset(&mut self) {
        self.next = Backoff::MIN;
    }
}
