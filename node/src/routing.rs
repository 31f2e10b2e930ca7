//! The routing snapshot the data plane reads: one immutable [`Table`] behind an `ArcSwap`,
//! rebuilt by `reconcile` whenever intent or observations change. Per-backend runtime state
//! (in-flight counters, idle HTTP connections) lives in [`BackendShared`], which rebuilds carry
//! over, so a swap never resets counters or drops pooled connections of surviving backends.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use shoal_proto::Protocol;
use shoal_proto::proxy::{Cidr, Version as ProxyVersion};

use crate::dataplane::balancer::Balancer;
use crate::dataplane::mux::Mux;
use crate::dataplane::pool::ConnPool;
use crate::metrics::PoolMetrics;

/// The shared handle the control plane writes and the data plane reads.
pub type SharedTable = Arc<ArcSwap<Table>>;

/// One routing snapshot.
#[derive(Debug, Default)]
pub struct Table {
    /// Version of the desired state this table was built from.
    pub version: u64,
    /// Counts rebuilds; changes on observation changes too.
    pub generation: u64,
    pub mux: Mux,
    /// TCP listen port → index into `pools`.
    pub tcp: HashMap<u16, usize>,
    pub pools: Vec<PoolRt>,
    /// The node is not ready yet: its state may still lack pools it will have in a moment.
    pub starting: bool,
}

impl Table {
    pub fn pool(&self, name: &str) -> Option<&PoolRt> {
        self.pools.iter().find(|p| p.name == name)
    }
}

/// A pool as the data plane sees it.
#[derive(Debug)]
pub struct PoolRt {
    pub name: String,
    pub protocol: Protocol,
    /// Backends that may receive new work, preferred tier first: this node's zone, then all
    /// (the last tier always holds every routable backend).
    pub tiers: Vec<Tier>,
    /// Runtime state of every known backend of the pool, routable or not.
    pub shared: HashMap<SocketAddr, Arc<BackendShared>>,
    /// Fewer than the panic threshold are healthy: routing to every backend.
    pub fail_open: bool,
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
    /// `None`: connections may idle forever.
    pub idle_timeout: Option<Duration>,
    pub backend_tls: bool,
    pub backend_tls_name: Option<String>,
    /// TCP pools: connections must come from these sources with a PROXY header (`None`: no
    /// header expected; an empty list trusts nobody).
    pub accept_proxy_from: Option<Arc<[Cidr]>>,
    /// The PROXY protocol version sent ahead of every backend connection.
    pub send_proxy: Option<ProxyVersion>,
    /// Requests may pin a backend by slot.
    pub pinning: bool,
    /// Slots of every backend in scope, routable or not, sorted: a pin to one of them is kept
    /// (and fails when that backend is down), a pin to any other slot names no gateway.
    pub slots: Vec<u32>,
    /// Carried across rebuilds so the rotation continues where it was.
    pub rotation: Arc<AtomicUsize>,
    pub metrics: Arc<PoolMetrics>,
}

/// Backends of one preference tier and their balancer.
#[derive(Debug)]
pub struct Tier {
    pub backends: Vec<Arc<BackendRt>>,
    pub balancer: Balancer,
}

impl PoolRt {
    /// Every routable backend.
    pub fn routable(&self) -> &[Arc<BackendRt>] {
        self.tiers.last().map(|t| t.backends.as_slice()).unwrap_or(&[])
    }

    /// The balancer's choice for `client`, preferring earlier tiers, skipping `tried` backends.
    pub fn pick(&self, client: IpAddr, tried: &[SocketAddr]) -> Option<&Arc<BackendRt>> {
        self.tiers.iter().find_map(|t| {
            let skip = |i: usize| tried.contains(&t.backends[i].addr);
            t.balancer.pick(&t.backends, client, &skip).map(|i| &t.backends[i])
        })
    }

    /// Whether some backend of the pool, healthy or not, holds `slot`.
    pub fn has_slot(&self, slot: u32) -> bool {
        self.slots.binary_search(&slot).is_ok()
    }

    /// The routable backend in `slot`, for pinned requests.
    pub fn by_slot(&self, slot: u32) -> Option<&Arc<BackendRt>> {
        self.routable().iter().find(|b| b.slot == Some(slot))
    }
}

/// A routable backend.
#[derive(Debug)]
pub struct BackendRt {
    /// `ip:port`, the backend's name in state, logs and metrics.
    pub key: String,
    pub addr: SocketAddr,
    pub url_path: String,
    pub weight: u32,
    pub zone: String,
    pub slot: Option<u32>,
    pub shared: Arc<BackendShared>,
}

impl BackendRt {
    #[cfg(test)]
    pub fn for_test(addr: SocketAddr, weight: u32, shared: Arc<BackendShared>) -> BackendRt {
        BackendRt { key: addr.to_string(), addr, url_path: "/".into(), weight, zone: String::new(), slot: None, shared }
    }
}

/// Runtime state of a backend that outlives routing snapshots.
#[derive(Debug, Default)]
pub struct BackendShared {
    active: AtomicU64,
    /// Upgraded (WebSocket) connections open on this node.
    pub upgraded: AtomicU64,
    /// Of those, pinned by the client to this backend.
    pub pinned: AtomicU64,
    /// Idle keep-alive connections, one list per data-plane worker.
    pub pool: ConnPool,
}

impl BackendShared {
    pub fn new(workers: usize) -> BackendShared {
        BackendShared { pool: ConnPool::new(workers), ..BackendShared::default() }
    }

    /// Connections or requests in flight on this node.
    pub fn active(&self) -> u64 {
        self.active.load(Ordering::Relaxed)
    }

    /// This node's counts for gossip and the health API.
    pub fn counts(&self) -> Counts {
        Counts {
            active: self.active(),
            upgraded: self.upgraded.load(Ordering::Relaxed),
            pinned: self.pinned.load(Ordering::Relaxed),
        }
    }

    /// Counts one unit of work until the guard drops.
    pub fn track(self: &Arc<Self>) -> ActiveGuard {
        self.active.fetch_add(1, Ordering::Relaxed);
        ActiveGuard(self.clone())
    }
}

/// Work in flight on a backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub active: u64,
    pub upgraded: u64,
    pub pinned: u64,
}

impl std::ops::AddAssign for Counts {
    fn add_assign(&mut self, o: Counts) {
        self.active += o.active;
        self.upgraded += o.upgraded;
        self.pinned += o.pinned;
    }
}

/// Decrements a backend's in-flight count when dropped.
#[derive(Debug)]
pub struct ActiveGuard(Arc<BackendShared>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}
