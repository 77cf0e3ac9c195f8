//! What an endpoint counts about its sockets, for logs and metrics: joins and refusals by reason,
//! messages in and out by transport, frames dropped for slow consumers and sockets closed as
//! slow consumers.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

/// Distinct refusal reasons counted on their own; later ones are counted as `"other"`, so that
/// an application answering free-form reasons cannot grow the table without bound.
const MAX_REASONS: usize = 32;

/// Messages in and out of the sockets of one transport.
#[derive(Debug, Default)]
pub(crate) struct Flow {
    pub(crate) messages_in: AtomicU64,
    pub(crate) messages_out: AtomicU64,
}

/// An endpoint's counters, shared with its sockets.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    joins: AtomicU64,
    refusals: Mutex<Vec<(String, u64)>>,
    transports: Mutex<Vec<(&'static str, Arc<Flow>)>>,
    pub(crate) outbound_dropped: AtomicU64,
    pub(crate) slow_consumer_closes: AtomicU64,
}

impl Counters {
    /// The counters of `transport`'s sockets (transport names are few and fixed in code).
    pub(crate) fn flow(&self, transport: &'static str) -> Arc<Flow> {
        let mut transports = self.transports.lock();
        if let Some((_, flow)) = transports.iter().find(|(name, _)| *name == transport) {
            return flow.clone();
        }
        let flow = Arc::new(Flow::default());
        transports.push((transport, flow.clone()));
        flow
    }

    pub(crate) fn joined(&self) {
        self.joins.fetch_add(1, Ordering::Relaxed);
    }

    /// A join refused with `reason` (the reply's `reason` field, or `"error"` without one).
    pub(crate) fn refused(&self, reason: &str) {
        let mut refusals = self.refusals.lock();
        if let Some((_, n)) = refusals.iter_mut().find(|(r, _)| r == reason) {
            *n += 1;
            return;
        }
        let reason = if refusals.len() < MAX_REASONS - 1 { reason } else { "other" };
        match refusals.iter_mut().find(|(r, _)| r == reason) {
            Some((_, n)) => *n += 1,
            None => refusals.push((reason.to_owned(), 1)),
        }
    }

    pub(crate) fn snapshot(&self) -> EndpointStats {
        let transports = self.transports.lock();
        EndpointStats {
            joins: self.joins.load(Ordering::Relaxed),
            join_refusals: self.refusals.lock().clone(),
            messages_in: transports.iter().map(|(t, f)| (*t, f.messages_in.load(Ordering::Relaxed))).collect(),
            messages_out: transports.iter().map(|(t, f)| (*t, f.messages_out.load(Ordering::Relaxed))).collect(),
            outbound_dropped: self.outbound_dropped.load(Ordering::Relaxed),
            slow_consumer_closes: self.slow_consumer_closes.load(Ordering::Relaxed),
        }
    }
}

/// What an endpoint has counted since it was built ([`Endpoint::stats`](crate::Endpoint::stats)).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct EndpointStats {
    /// Joins answered ok.
    pub joins: u64,
    /// Joins answered with an error, by the reply's `reason` (`"unmatched topic"`,
    /// `"unauthorized"`, `"join rate exceeded"`, ...; `"error"` for a reply without one). At
    /// most 32 reasons are told apart; the rest are counted as `"other"`.
    pub join_refusals: Vec<(String, u64)>,
    /// Messages received from clients, by transport (`"websocket"`, `"longpoll"`, ...).
    pub messages_in: Vec<(&'static str, u64)>,
    /// Messages queued for clients (replies, pushes, broadcasts), by transport.
    pub messages_out: Vec<(&'static str, u64)>,
    /// Frames dropped from full outbound queues (`SlowConsumerPolicy::DropOldest`).
    pub outbound_dropped: u64,
    /// Sockets closed because their outbound queue was full (`SlowConsumerPolicy::Disconnect`).
    pub slow_consumer_closes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_reasons_are_bounded() {
        let c = Counters::default();
        for i in 0..100 {
            c.refused(&format!("reason {i}"));
        }
        c.refused("reason 0");
        let s = c.snapshot();
        assert_eq!(s.join_refusals.len(), MAX_REASONS);
        assert_eq!(s.join_refusals[0], ("reason 0".to_owned(), 2));
        assert_eq!(s.join_refusals.last(), Some(&("other".to_owned(), 100 - (MAX_REASONS as u64 - 1))));
    }
}
