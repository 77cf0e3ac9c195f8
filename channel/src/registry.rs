//! The state an [`Endpoint`](crate::Endpoint) shares with its sessions: router, config, PubSub,
//! connect callback, and the registry of live sockets a session leaves when it is dropped.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::config::Config;
use crate::metrics::Counters;
use crate::outbox::Outbox;
use crate::pubsub::PubSub;
use crate::router::Router;
use crate::socket::{DynSocketHandler, SocketInfo};

pub(crate) const REGISTRY_SHARDS: usize = 32;

pub(crate) struct Live {
    pub(crate) outbox: Outbox,
    pub(crate) info: Arc<SocketInfo>,
    /// The peer address this socket counts against, when `max_connections_per_ip` is set.
    pub(crate) ip: Option<IpAddr>,
}

pub(crate) struct Shared {
    pub(crate) router: Router,
    pub(crate) config: Config,
    pub(crate) pubsub: PubSub,
    pub(crate) handler: Box<dyn DynSocketHandler>,
    pub(crate) live: Box<[Mutex<HashMap<u64, Live>>]>,
    pub(crate) next_id: AtomicU64,
    pub(crate) shutting_down: AtomicBool,
    pub(crate) live_count: AtomicUsize,
    pub(crate) drained: Notify,
    /// Sockets per peer address, kept only when `max_connections_per_ip` is set.
    pub(crate) per_ip: Mutex<HashMap<IpAddr, usize>>,
    /// Connect tokens per peer address, kept only when `connect_rate` is set.
    pub(crate) connects: Mutex<HashMap<IpAddr, (f64, tokio::time::Instant)>>,
    /// Joins, refusals, messages and slow consumers, shared with the sockets.
    pub(crate) counters: Arc<Counters>,
}

impl Shared {
    pub(crate) fn shard(&self, id: u64) -> &Mutex<HashMap<u64, Live>> {
        &self.live[id as usize % REGISTRY_SHARDS]
    }

    pub(crate) fn forget(&self, id: u64) {
        let Some(live) = self.shard(id).lock().remove(&id) else { return };
        if let Some(ip) = live.ip {
            self.release_ip(ip);
        }
        if self.live_count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.drained.notify_waiters();
        }
    }

    pub(crate) fn release_ip(&self, ip: IpAddr) {
        let mut per_ip = self.per_ip.lock();
        if let Some(n) = per_ip.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                per_ip.remove(&ip);
            }
        }
    }
}
