//! Protecting backends (HAProxy's `maxconn`/`timeout queue`/`slowstart`, Envoy's outlier
//! detection): taking a slot on a backend below `max_connections` or waiting for one in the
//! pool's bounded queue, the slow-start ramp, and response-based ejection. HTTP and TCP
//! proxies call [`acquire`] instead of picking and counting themselves.
//!
//! This module owns the protection state ([`BackendState`] per backend, [`PoolLimits`] per
//! pool) and sees routing's pools and backends only through the [`Pool`], [`Backend`] and
//! [`Tables`] traits, which routing implements: routing depends on this module and not the
//! other way round, and the logic here is tested with small fakes. Everything is generic, so
//! the per-request path has no dynamic dispatch.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use prometheus::IntGauge;
use shoal_proto::OutlierSpec;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::maglev;
use crate::health::Reporter;
use crate::metrics::PoolMetrics;

/// Picks lost to a racing task before the pool counts as busy.
const RACES: usize = 4;
/// Outlier ejections stop growing after this many in a row (Envoy caps at its max ejection time).
const MAX_MULTIPLIER: u32 = 10;

/// A pool as this module sees it (routing's `PoolRt`).
pub trait Pool {
    type Backend: Backend;
    fn name(&self) -> &str;
    fn limits(&self) -> &PoolLimits;
    fn metrics(&self) -> &PoolMetrics;
    /// The balancer's choice for `client` (slow start applied), skipping `tried` backends and
    /// those at `max_connections`.
    fn pick(&self, client: IpAddr, tried: &[SocketAddr]) -> Option<&Arc<Self::Backend>>;
    /// The routable backend in `slot`, full or not.
    fn by_slot(&self, slot: u32) -> Option<&Arc<Self::Backend>>;
    /// Whether a backend the request could use (not `tried`, in `slot` if given) is only held
    /// back by `max_connections`.
    fn busy(&self, tried: &[SocketAddr], slot: Option<u32>) -> bool;
    /// The state of every known backend of the pool, routable or not.
    fn states(&self) -> impl ExactSizeIterator<Item = &BackendState>;
}

/// A routable backend as this module sees it (routing's `BackendRt`).
pub trait Backend {
    /// What an [`ActiveGuard`] keeps alive: the backend's state that outlives routing tables.
    type Shared: Tracked;
    fn addr(&self) -> SocketAddr;
    fn shared(&self) -> &Arc<Self::Shared>;
}

/// Runtime state of a backend that holds its [`BackendState`] (routing's `BackendShared`).
pub trait Tracked {
    fn state(&self) -> &BackendState;
}

/// Where a waiter finds the newest version of its pool (routing's shared table).
pub trait Tables<P> {
    /// `f` of the newest version of the pool named `name`; `None` when it is gone.
    fn with_pool<R>(&self, name: &str, f: impl FnOnce(&P) -> R) -> Option<R>;
}

/// A pool's protection settings, and its queue (carried across routing-table rebuilds).
#[derive(Debug, Default)]
pub struct PoolLimits {
    /// Most work in flight per backend; 0: no limit.
    pub max_connections: u32,
    /// Waiters for a backend below `max_connections`.
    pub queue: Arc<Queue>,
    pub queue_max: u32,
    pub queue_timeout: Duration,
    /// Ramp time of a backend that turned healthy; zero: off.
    pub slow_start: Duration,
    pub outlier: Option<OutlierSpec>,
}

/// A backend's protection state: its in-flight count, slow start and outlier history. Kept
/// across routing tables, so a rebuild resets none of it.
#[derive(Debug, Default)]
pub struct BackendState {
    active: AtomicU64,
    /// Woken when work on this backend ends (the pool's queue).
    queue: Arc<Queue>,
    /// Healthy in the last routing table built.
    healthy: AtomicBool,
    /// When it last turned healthy ([`now_ms`]), for slow start; 0: long ago.
    up_since: AtomicU64,
    /// Outlier detection: 5xx answers in a row.
    consecutive_5xx: AtomicU32,
    /// Outlier detection: the ejection history.
    outlier: Mutex<OutlierState>,
}

impl BackendState {
    /// The state of a new backend of the pool waited on through `queue`.
    pub fn new(queue: Arc<Queue>) -> BackendState {
        BackendState { queue, ..BackendState::default() }
    }

    /// Records the backend's health in a new table; a turn to healthy starts its slow start.
    pub fn set_healthy(&self, healthy: bool) {
        if healthy && !self.healthy.swap(true, Ordering::Relaxed) {
            self.up_since.store(now_ms(), Ordering::Relaxed);
        } else if !healthy {
            self.healthy.store(false, Ordering::Relaxed);
        }
    }

    /// Milliseconds since the backend turned healthy (`u64::MAX`: never tracked).
    pub fn up_for(&self, now_ms: u64) -> u64 {
        match self.up_since.load(Ordering::Relaxed) {
            0 => u64::MAX,
            t => now_ms.saturating_sub(t),
        }
    }

    /// Whether `max` (0: none) units of work are in flight already.
    pub fn full(&self, max: u32) -> bool {
        max > 0 && self.active() >= u64::from(max)
    }

    /// Connections or requests in flight on this node.
    pub fn active(&self) -> u64 {
        self.active.load(Ordering::Relaxed)
    }

    fn outlier(&self) -> MutexGuard<'_, OutlierState> {
        self.outlier.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Work in flight on a backend: counted until dropped, which wakes the pool's waiters.
#[derive(Debug)]
pub struct ActiveGuard<S: Tracked>(Arc<S>);

impl<S: Tracked> ActiveGuard<S> {
    /// Counts one unit of work on `shared`, whatever its limit.
    pub fn track(shared: &Arc<S>) -> ActiveGuard<S> {
        shared.state().active.fetch_add(1, Ordering::Relaxed);
        ActiveGuard(shared.clone())
    }

    /// Counts one unit of work if fewer than `max` (0: no limit) are in flight: checked and
    /// counted in one step, so racing picks never exceed the limit.
    pub fn try_track(shared: &Arc<S>, max: u32) -> Option<ActiveGuard<S>> {
        if max == 0 {
            return Some(Self::track(shared));
        }
        shared
            .state()
            .active
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| (n < u64::from(max)).then_some(n + 1))
            .ok()
            .map(|_| ActiveGuard(shared.clone()))
    }
}

impl<S: Tracked> Drop for ActiveGuard<S> {
    fn drop(&mut self) {
        let state = self.0.state();
        state.active.fetch_sub(1, Ordering::AcqRel);
        state.queue.slot_freed();
    }
}

/// A pool's waiters for a free slot. One per pool, carried across routing-table rebuilds.
#[derive(Debug, Default)]
pub struct Queue {
    waiting: AtomicUsize,
    notify: Notify,
}

impl Queue {
    /// Work on one of the pool's backends ended: waiters race for the slot. Every waiter is
    /// woken because each may want a different backend (pins, backends it tried already).
    pub fn slot_freed(&self) {
        if self.waiting.load(Ordering::Acquire) > 0 {
            self.notify.notify_waiters();
        }
    }

    /// The routing table changed: waiters pick again from the new one.
    pub fn rebuilt(&self) {
        self.notify.notify_waiters();
    }

    pub fn depth(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }
}

/// A place in the queue, given back when dropped.
struct Ticket<'a> {
    queue: &'a Queue,
    depth: &'a IntGauge,
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        self.queue.waiting.fetch_sub(1, Ordering::AcqRel);
        self.depth.dec();
    }
}

/// What a request or connection wants from its pool.
#[derive(Clone, Copy, Debug)]
pub enum Want<'a> {
    /// The balancer's choice for this client, except backends already tried.
    Pick(IpAddr, &'a [SocketAddr]),
    /// The backend pinned to this slot.
    Slot(u32),
}

/// Why no slot was given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// Every candidate was at its limit and the queue held `queue_max` waiters already.
    QueueFull,
    /// Waited `queue_timeout_ms` without a slot freeing.
    Timeout,
}

impl Refused {
    pub fn reason(self) -> &'static str {
        match self {
            Refused::QueueFull => "every backend is at max_connections and the queue is full",
            Refused::Timeout => "timed out waiting for a backend below max_connections",
        }
    }
}

/// The outcome of [`acquire`].
pub enum Acquired<B: Backend> {
    /// A backend and its in-flight count.
    Got(Arc<B>, ActiveGuard<B::Shared>),
    /// No backend can take it, busy or not.
    NoBackend,
    Refused(Refused),
}

/// A backend below its limit for `want`, waiting in the pool's queue while every candidate is
/// at `max_connections`. A waiter picks from the newest table each time it wakes.
pub async fn acquire<P: Pool>(table: &impl Tables<P>, pool: &P, want: Want<'_>) -> Acquired<P::Backend> {
    match try_take(pool, want) {
        Take::Got(b, g) => return Acquired::Got(b, g),
        Take::None => return Acquired::NoBackend,
        Take::Busy => {}
    }
    let Some(_ticket) = enter(pool) else {
        pool.metrics().queue_full.inc();
        return Acquired::Refused(Refused::QueueFull);
    };
    let limits = pool.limits();
    let deadline = Instant::now() + limits.queue_timeout;
    loop {
        // Registered before looking, so a slot freed in between still wakes this waiter.
        let notified = limits.queue.notify.notified();
        let mut notified = std::pin::pin!(notified);
        notified.as_mut().enable();
        match table.with_pool(pool.name(), |now| try_take(now, want)) {
            Some(Take::Got(b, g)) => return Acquired::Got(b, g),
            None | Some(Take::None) => return Acquired::NoBackend,
            Some(Take::Busy) => {}
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            pool.metrics().queue_timeouts.inc();
            return Acquired::Refused(Refused::Timeout);
        }
    }
}

enum Take<B: Backend> {
    Got(Arc<B>, ActiveGuard<B::Shared>),
    Busy,
    None,
}

fn try_take<P: Pool>(pool: &P, want: Want<'_>) -> Take<P::Backend> {
    let (tried, slot) = match want {
        Want::Pick(_, tried) => (tried, None),
        Want::Slot(s) => (&[][..], Some(s)),
    };
    let max = pool.limits().max_connections;
    for _ in 0..RACES {
        let chosen = match want {
            Want::Pick(client, tried) => pool.pick(client, tried),
            Want::Slot(s) => pool.by_slot(s).filter(|b| !b.shared().state().full(max)),
        };
        let Some(backend) = chosen else { break };
        if let Some(guard) = ActiveGuard::try_track(backend.shared(), max) {
            return Take::Got(backend.clone(), guard);
        }
    }
    if pool.busy(tried, slot) { Take::Busy } else { Take::None }
}

fn enter<P: Pool>(pool: &P) -> Option<Ticket<'_>> {
    let queue = &*pool.limits().queue;
    let max = pool.limits().queue_max as usize;
    queue.waiting.fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| (n < max).then_some(n + 1)).ok()?;
    let depth = &pool.metrics().queue_depth;
    depth.inc();
    Some(Ticket { queue, depth })
}

/// Milliseconds on a process-wide monotonic clock (never 0, so 0 can mean "unset").
pub fn now_ms() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    let base = *BASE.get_or_init(|| Instant::now() - Duration::from_secs(1));
    base.elapsed().as_millis() as u64
}

/// Share of its weight, in per mille, a backend up for `up_ms` gets during a `window` slow
/// start: 10% at once (never 0, so a lone backend still serves), rising linearly to 100%.
pub fn ramp_permille(up_ms: u64, window: Duration) -> u32 {
    let window_ms = window.as_millis() as u64;
    if window_ms == 0 || up_ms >= window_ms {
        return 1000;
    }
    100 + (900 * up_ms / window_ms) as u32
}

/// A client's fixed draw in 0..1000, for ramping sticky (Maglev) pools.
pub fn client_draw(client: IpAddr) -> u32 {
    (maglev::ip_hash(client, 7) % 1000) as u32
}

/// A backend's outlier ejection history.
#[derive(Debug, Default)]
pub struct OutlierState {
    /// Ejections counted toward the next one's length (decays while healthy).
    pub multiplier: u32,
    /// When the last ejection ends ([`now_ms`]).
    pub until_ms: u64,
}

/// The multiplier of the next ejection: one more than the last, less one for every `base`
/// the backend stayed in rotation since its last ejection ended (Envoy's decay).
pub fn next_multiplier(prev: u32, healthy_for: Duration, base: Duration) -> u32 {
    let decay = (healthy_for.as_millis() / base.as_millis().max(1)).min(u128::from(u32::MAX)) as u32;
    (prev.saturating_sub(decay) + 1).min(MAX_MULTIPLIER)
}

/// Feeds one answer of `backend` to outlier detection: `status` is the status sent to the
/// client (gateway errors included), 0 when the client went away before any.
pub fn observe<P: Pool>(reporter: &Reporter, pool: &P, backend: &P::Backend, status: u16) {
    let Some(spec) = &pool.limits().outlier else { return };
    let state = backend.shared().state();
    if status == 0 {
        return;
    }
    if status < 500 {
        state.consecutive_5xx.store(0, Ordering::Relaxed);
        return;
    }
    if state.consecutive_5xx.fetch_add(1, Ordering::AcqRel) + 1 < spec.consecutive_5xx {
        return;
    }
    state.consecutive_5xx.store(0, Ordering::Relaxed);
    if let Some(duration) = eject(pool, state, spec) {
        pool.metrics().ejections.inc();
        let reason = format!("{} consecutive 5xx answers (outlier)", spec.consecutive_5xx);
        reporter.outlier(pool.name(), backend.addr(), reason, duration);
    }
}

/// The ejection's length, or `None` when `max_ejection_percent` of the pool is out already.
fn eject<P: Pool>(pool: &P, state: &BackendState, spec: &OutlierSpec) -> Option<Duration> {
    let now = now_ms();
    let states = pool.states();
    let known = states.len();
    let ejected = states.filter(|s| s.outlier().until_ms > now).count();
    // As Envoy: ejects while fewer than the percentage are out (so at least one in a small pool).
    if ejected * 100 >= usize::from(spec.max_ejection_percent) * known {
        return None;
    }
    let base = Duration::from_millis(spec.base_ejection_ms);
    let mut st = state.outlier();
    let healthy_for = Duration::from_millis(now.saturating_sub(st.until_ms));
    st.multiplier = next_multiplier(st.multiplier, healthy_for, base);
    let duration = base * st.multiplier;
    st.until_ms = now + duration.as_millis() as u64;
    Some(duration)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    impl Tracked for BackendState {
        fn state(&self) -> &BackendState {
            self
        }
    }

    struct FakeBackend {
        addr: SocketAddr,
        slot: u32,
        shared: Arc<BackendState>,
    }

    impl Backend for FakeBackend {
        type Shared = BackendState;

        fn addr(&self) -> SocketAddr {
            self.addr
        }

        fn shared(&self) -> &Arc<BackendState> {
            &self.shared
        }
    }

    /// A pool whose balancer takes the first backend it may.
    struct FakePool {
        limits: PoolLimits,
        metrics: PoolMetrics,
        backends: Vec<Arc<FakeBackend>>,
    }

    impl FakePool {
        fn open(&self, b: &FakeBackend, tried: &[SocketAddr]) -> bool {
            !tried.contains(&b.addr) && !b.shared.full(self.limits.max_connections)
        }
    }

    impl Pool for FakePool {
        type Backend = FakeBackend;

        fn name(&self) -> &str {
            "p"
        }

        fn limits(&self) -> &PoolLimits {
            &self.limits
        }

        fn metrics(&self) -> &PoolMetrics {
            &self.metrics
        }

        fn pick(&self, _: IpAddr, tried: &[SocketAddr]) -> Option<&Arc<FakeBackend>> {
            self.backends.iter().find(|b| self.open(b, tried))
        }

        fn by_slot(&self, slot: u32) -> Option<&Arc<FakeBackend>> {
            self.backends.iter().find(|b| b.slot == slot)
        }

        fn busy(&self, tried: &[SocketAddr], slot: Option<u32>) -> bool {
            self.backends.iter().any(|b| {
                !tried.contains(&b.addr)
                    && slot.is_none_or(|s| b.slot == s)
                    && b.shared.full(self.limits.max_connections)
            })
        }

        fn states(&self) -> impl ExactSizeIterator<Item = &BackendState> {
            self.backends.iter().map(|b| &*b.shared)
        }
    }

    impl Tables<FakePool> for FakePool {
        fn with_pool<R>(&self, _: &str, f: impl FnOnce(&FakePool) -> R) -> Option<R> {
            Some(f(self))
        }
    }

    fn pool(backends: u8, limits: PoolLimits) -> FakePool {
        let backends = (0..backends)
            .map(|i| {
                let addr = SocketAddr::from(([10, 0, 0, i], 80));
                Arc::new(FakeBackend {
                    addr,
                    slot: u32::from(i),
                    shared: Arc::new(BackendState::new(limits.queue.clone())),
                })
            })
            .collect();
        FakePool { limits, metrics: Metrics::new("t").pool("p"), backends }
    }

    fn capped(max_connections: u32, queue_max: u32, queue_timeout: Duration) -> PoolLimits {
        PoolLimits { max_connections, queue_max, queue_timeout, ..PoolLimits::default() }
    }

    const CLIENT: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    fn got<B: Backend>(a: Acquired<B>) -> (Arc<B>, ActiveGuard<B::Shared>) {
        match a {
            Acquired::Got(b, g) => (b, g),
            Acquired::NoBackend => panic!("no backend"),
            Acquired::Refused(r) => panic!("refused: {}", r.reason()),
        }
    }

    #[test]
    fn tracking_never_exceeds_the_limit() {
        let s = Arc::new(BackendState::default());
        let a = ActiveGuard::try_track(&s, 2).expect("first");
        let _b = ActiveGuard::try_track(&s, 2).expect("second");
        assert!(ActiveGuard::try_track(&s, 2).is_none(), "at the limit");
        assert!(s.full(2) && !s.full(0) && !s.full(3));
        drop(a);
        assert_eq!(s.active(), 1, "a dropped guard gives its slot back");
        let _c = ActiveGuard::try_track(&s, 2).expect("freed");
        let _d = ActiveGuard::try_track(&s, 0).expect("0: no limit");
        assert_eq!(s.active(), 3);
    }

    #[tokio::test]
    async fn a_waiter_takes_the_slot_a_finished_request_frees() {
        let p = pool(1, capped(1, 5, Duration::from_secs(60)));
        let (_, first) = got(acquire(&p, &p, Want::Pick(CLIENT, &[])).await);
        let release = async {
            tokio::task::yield_now().await;
            assert_eq!(p.limits.queue.depth(), 1, "the second request waits");
            drop(first);
        };
        let (second, ()) = tokio::join!(acquire(&p, &p, Want::Pick(CLIENT, &[])), release);
        let (b, _guard) = got(second);
        assert_eq!(b.addr, p.backends[0].addr);
        assert_eq!((b.shared.active(), p.limits.queue.depth()), (1, 0));
        assert_eq!(p.metrics.queue_depth.get(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_queue_refuses_at_once_and_a_waiter_times_out() {
        let p = pool(1, capped(1, 1, Duration::from_millis(1500)));
        let _busy = got(acquire(&p, &p, Want::Slot(0)).await);
        let started = Instant::now();
        let later = async {
            tokio::task::yield_now().await;
            acquire(&p, &p, Want::Slot(0)).await
        };
        let (first, second) = tokio::join!(acquire(&p, &p, Want::Slot(0)), later);
        assert!(matches!(first, Acquired::Refused(Refused::Timeout)));
        assert!(matches!(second, Acquired::Refused(Refused::QueueFull)));
        assert_eq!(started.elapsed(), Duration::from_millis(1500));
        assert_eq!((p.metrics.queue_timeouts.get(), p.metrics.queue_full.get()), (1, 1));
        assert_eq!((p.limits.queue.depth(), p.metrics.queue_depth.get()), (0, 0));
    }

    #[tokio::test]
    async fn no_backend_when_none_could_take_it_busy_or_not() {
        let p = pool(2, capped(1, 5, Duration::from_secs(60)));
        let all = [p.backends[0].addr, p.backends[1].addr];
        assert!(matches!(acquire(&p, &p, Want::Pick(CLIENT, &all)).await, Acquired::NoBackend), "all tried");
        assert!(matches!(acquire(&p, &p, Want::Slot(7)).await, Acquired::NoBackend), "no such pin");
        let (b, _g) = got(acquire(&p, &p, Want::Slot(1)).await);
        assert_eq!(b.addr, all[1], "the pinned backend");
        let (b, _g) = got(acquire(&p, &p, Want::Pick(CLIENT, &[])).await);
        assert_eq!(b.addr, all[0], "the other one, below its limit");
        let busy = acquire(&p, &p, Want::Pick(CLIENT, &all)).await;
        assert!(matches!(busy, Acquired::NoBackend), "both full but tried: nothing to wait for");
        assert_eq!(p.metrics.queue_depth.get(), 0);
    }

    #[test]
    fn consecutive_5xx_eject_while_few_enough_are_out() {
        let spec = OutlierSpec { consecutive_5xx: 2, base_ejection_ms: 1000, max_ejection_percent: 50 };
        let p = pool(4, PoolLimits { outlier: Some(spec), ..PoolLimits::default() });
        let r = Reporter::detached();
        let out = |i: usize| p.backends[i].shared.outlier().until_ms > now_ms();
        for status in [500, 200, 503, 0] {
            observe(&r, &p, &p.backends[0], status);
        }
        assert!(!out(0), "a success resets the run; a client gone counts nothing");
        observe(&r, &p, &p.backends[0], 502);
        assert!(out(0), "two in a row");
        for i in 1..3 {
            observe(&r, &p, &p.backends[i], 500);
            observe(&r, &p, &p.backends[i], 500);
        }
        assert!(out(1) && !out(2), "half the pool is out already: the third stays");
        assert_eq!(p.metrics.ejections.get(), 2);
        assert_eq!(p.backends[0].shared.outlier().multiplier, 1);
    }

    #[test]
    fn ramp_starts_at_a_tenth_and_reaches_full_weight() {
        let w = Duration::from_secs(10);
        assert_eq!(ramp_permille(0, w), 100);
        assert_eq!(ramp_permille(5_000, w), 550);
        assert_eq!(ramp_permille(10_000, w), 1000);
        assert_eq!(ramp_permille(u64::MAX, w), 1000, "never tracked: full weight");
        assert_eq!(ramp_permille(0, Duration::ZERO), 1000, "slow start off");
        let mut last = 0;
        for ms in (0..=10_000).step_by(250) {
            let r = ramp_permille(ms, w);
            assert!(r >= last && r >= 100, "monotonic and never below 10%");
            last = r;
        }
    }

    #[test]
    fn ejections_grow_and_decay_while_healthy() {
        let base = Duration::from_secs(30);
        assert_eq!(next_multiplier(0, Duration::ZERO, base), 1);
        assert_eq!(next_multiplier(1, Duration::from_secs(1), base), 2, "ejected again soon: longer");
        assert_eq!(next_multiplier(3, Duration::from_secs(65), base), 2, "two bases healthy: two fewer");
        assert_eq!(next_multiplier(3, Duration::from_secs(3600), base), 1, "long healthy: back to base");
        assert_eq!(next_multiplier(MAX_MULTIPLIER, Duration::ZERO, base), MAX_MULTIPLIER, "capped");
    }
}
