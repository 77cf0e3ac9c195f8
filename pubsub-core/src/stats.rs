//! What a node counts about its link to the others.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::node::NodeId;

/// A node's view of its link to the others, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClusterStats {
    /// This node.
    pub node: NodeId,
    /// Whether the adapter says its backend is reachable (always true for a single node).
    pub connected: bool,
    /// Times the adapter lost its backend.
    pub disconnects: u64,
    /// Envelopes handed to the adapter.
    pub sent: u64,
    /// Envelopes from other nodes delivered here.
    pub received: u64,
    /// Envelopes the adapter could not send (its queue was full while the backend was away).
    pub dropped: u64,
    /// Envelopes that arrived unreadable and were ignored.
    pub malformed: u64,
    /// How long the backend took to accept the messages sent to other nodes.
    pub publish_latency: LatencyHistogram,
}

/// Upper bounds, in seconds, of the buckets of a [`LatencyHistogram`] (the last bucket, past
/// them, is unbounded).
pub const LATENCY_BOUNDS: [f64; 12] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];

/// Latencies counted in buckets, as a Prometheus histogram shows them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct LatencyHistogram {
    /// Observations per bucket (not cumulative): `buckets[i]` counts those at most
    /// `LATENCY_BOUNDS[i]` and above the bound before; the last counts those above every bound.
    pub buckets: [u64; LATENCY_BOUNDS.len() + 1],
    /// Observations.
    pub count: u64,
    /// Their sum, in microseconds.
    pub sum_micros: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) connected: AtomicBool,
    pub(crate) disconnects: AtomicU64,
    pub(crate) sent: AtomicU64,
    pub(crate) received: AtomicU64,
    pub(crate) dropped: AtomicU64,
    pub(crate) malformed: AtomicU64,
    /// The sequence number of the next envelope sent.
    pub(crate) seq: AtomicU64,
    pub(crate) publish_buckets: [AtomicU64; LATENCY_BOUNDS.len() + 1],
    pub(crate) publish_sum_micros: AtomicU64,
}

impl Counters {
    /// `n` messages that the backend accepted `took` after they were taken off the queue.
    pub(crate) fn published(&self, n: u64, took: std::time::Duration) {
        let secs = took.as_secs_f64();
        let bucket = LATENCY_BOUNDS.iter().position(|b| secs <= *b).unwrap_or(LATENCY_BOUNDS.len());
        self.publish_buckets[bucket].fetch_add(n, Ordering::Relaxed);
        self.publish_sum_micros.fetch_add(n.saturating_mul(took.as_micros() as u64), Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self, node: NodeId) -> ClusterStats {
        ClusterStats {
            node,
            connected: self.connected.load(Ordering::Relaxed),
            disconnects: self.disconnects.load(Ordering::Relaxed),
            sent: self.sent.load(Ordering::Relaxed),
            received: self.received.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            malformed: self.malformed.load(Ordering::Relaxed),
            publish_latency: {
                let buckets = std::array::from_fn(|i| self.publish_buckets[i].load(Ordering::Relaxed));
                LatencyHistogram {
                    buckets,
                    count: buckets.iter().sum(),
                    sum_micros: self.publish_sum_micros.load(Ordering::Relaxed),
                }
            },
        }
    }
}
