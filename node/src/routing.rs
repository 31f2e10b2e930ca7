//! The routing snapshot the data plane reads: one immutable [`Table`] behind an `ArcSwap`,
//! rebuilt by `reconcile` whenever intent or observations change. Per-backend runtime state
//! (in-flight counters, idle HTTP connections) lives in [`BackendShared`], which rebuilds carry
//! over, so a swap never resets counters or drops pooled connections of surviving backends.
//!
//! Routing depends on `dataplane::balancer` and `dataplane::limits`, never the reverse: it
//! implements their traits (`Candidate`; `limits::Pool`, `Backend`, `Tracked`, `Tables`) for
//! its types and embeds the protection state `limits` owns.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use shoal_proto::Protocol;
use shoal_proto::proxy::{Cidr, Version as ProxyVersion};

use crate::dataplane::balancer::{self, Balancer, Candidate};
use crate::dataplane::limits::{self, BackendState, PoolLimits, Queue};
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
    /// `max_connections`, the queue (carried across rebuilds), slow start, outlier detection.
    pub limits: PoolLimits,
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

    /// The balancer's choice for `client`, preferring earlier tiers, skipping `tried` backends
    /// and those at `max_connections`.
    ///
    /// Slow start is applied here, for every algorithm alike, as a skip: a ramping backend is
    /// passed over with probability `1 - ramp`, so it takes about `ramp` of its normal share
    /// while the precomputed schedules and Maglev tables stay as built. Maglev draws from the
    /// client's hash instead of at random, so a client stays where it landed as the ramp grows.
    /// When every candidate is ramping and passed over, the pick is retried without the ramp.
    pub fn pick(&self, client: IpAddr, tried: &[SocketAddr]) -> Option<&Arc<BackendRt>> {
        let PoolLimits { max_connections, slow_start, .. } = self.limits;
        self.tiers.iter().find_map(|t| {
            let closed = |i: usize| {
                let b = &t.backends[i];
                tried.contains(&b.addr) || b.shared.limits.full(max_connections)
            };
            // No clock read or draw on the hot path unless slow start is on.
            if !slow_start.is_zero() {
                let now = limits::now_ms();
                let draw = match t.balancer {
                    Balancer::Maglev { .. } => limits::client_draw(client),
                    _ => balancer::fast_random(1000) as u32,
                };
                let held = |i: usize| {
                    closed(i) || draw >= limits::ramp_permille(t.backends[i].shared.limits.up_for(now), slow_start)
                };
                if let Some(i) = t.balancer.pick(&t.backends, client, &held) {
                    return Some(&t.backends[i]);
                }
            }
            t.balancer.pick(&t.backends, client, &closed).map(|i| &t.backends[i])
        })
    }

    /// Whether a backend `want` could use is only held back by `max_connections`.
    pub fn busy(&self, tried: &[SocketAddr], slot: Option<u32>) -> bool {
        let max = self.limits.max_connections;
        max > 0
            && self.routable().iter().any(|b| {
                !tried.contains(&b.addr) && slot.is_none_or(|s| b.slot == Some(s)) && b.shared.limits.full(max)
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

impl limits::Pool for PoolRt {
    type Backend = BackendRt;

    fn name(&self) -> &str {
        &self.name
    }

    fn limits(&self) -> &PoolLimits {
        &self.limits
    }

    fn metrics(&self) -> &PoolMetrics {
        &self.metrics
    }

    fn pick(&self, client: IpAddr, tried: &[SocketAddr]) -> Option<&Arc<BackendRt>> {
        PoolRt::pick(self, client, tried)
    }

    fn by_slot(&self, slot: u32) -> Option<&Arc<BackendRt>> {
        PoolRt::by_slot(self, slot)
    }

    fn busy(&self, tried: &[SocketAddr], slot: Option<u32>) -> bool {
        PoolRt::busy(self, tried, slot)
    }

    fn states(&self) -> impl ExactSizeIterator<Item = &BackendState> {
        self.shared.values().map(|s| &s.limits)
    }
}

impl limits::Tables<PoolRt> for SharedTable {
    fn with_pool<R>(&self, name: &str, f: impl FnOnce(&PoolRt) -> R) -> Option<R> {
        self.load_full().pool(name).map(f)
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

impl Candidate for BackendRt {
    fn key(&self) -> &str {
        &self.key
    }

    fn weight(&self) -> u32 {
        self.weight
    }

    fn load(&self) -> u64 {
        self.shared.limits.active()
    }
}

impl limits::Backend for BackendRt {
    type Shared = BackendShared;

    fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn shared(&self) -> &Arc<BackendShared> {
        &self.shared
    }
}

/// Runtime state of a backend that outlives routing snapshots.
#[derive(Debug, Default)]
pub struct BackendShared {
    /// In-flight count, slow start and outlier history.
    pub limits: BackendState,
    /// Upgraded (WebSocket) connections open on this node.
    pub upgraded: AtomicU64,
    /// Of those, pinned by the client to this backend.
    pub pinned: AtomicU64,
    /// Idle keep-alive connections, one list per data-plane worker.
    pub pool: ConnPool,
}

impl BackendShared {
    pub fn new(workers: usize, queue: Arc<Queue>) -> BackendShared {
        BackendShared { pool: ConnPool::new(workers), limits: BackendState::new(queue), ..BackendShared::default() }
    }

    /// This node's counts for gossip and the health API.
    pub fn counts(&self) -> Counts {
        Counts {
            active: self.limits.active(),
            upgraded: self.upgraded.load(Ordering::Relaxed),
            pinned: self.pinned.load(Ordering::Relaxed),
        }
    }
}

impl limits::Tracked for BackendShared {
    fn state(&self) -> &BackendState {
        &self.limits
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

/// Work in flight on a backend, counted until dropped.
pub type ActiveGuard = limits::ActiveGuard<BackendShared>;
