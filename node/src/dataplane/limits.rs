//! Protecting backends (HAProxy's `maxconn`/`timeout queue`/`slowstart`, Envoy's outlier
//! detection): taking a slot on a backend below `max_connections` or waiting for one in the
//! pool's bounded queue, the slow-start ramp, and response-based ejection. HTTP and TCP
//! proxies call [`acquire`] instead of picking and counting themselves.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use shoal_proto::OutlierSpec;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::DpCtx;
use super::maglev;
use crate::routing::{ActiveGuard, BackendRt, PoolRt, SharedTable};

/// Picks lost to a racing task before the pool counts as busy.
const RACES: usize = 4;
/// Outlier ejections stop growing after this many in a row (Envoy caps at its max ejection time).
const MAX_MULTIPLIER: u32 = 10;

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
struct Ticket<'a>(&'a PoolRt);

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        self.0.queue.waiting.fetch_sub(1, Ordering::AcqRel);
        self.0.metrics.queue_depth.dec();
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
pub enum Acquired {
    /// A backend and its in-flight count.
    Got(Arc<BackendRt>, ActiveGuard),
    /// No backend can take it, busy or not.
    NoBackend,
    Refused(Refused),
}

/// A backend below its limit for `want`, waiting in the pool's queue while every candidate is
/// at `max_connections`. A waiter picks from the newest table each time it wakes.
pub async fn acquire(table: &SharedTable, pool: &PoolRt, want: Want<'_>) -> Acquired {
    match try_take(pool, want) {
        Take::Got(b, g) => return Acquired::Got(b, g),
        Take::None => return Acquired::NoBackend,
        Take::Busy => {}
    }
    let Some(_ticket) = enter(pool) else {
        pool.metrics.queue_full.inc();
        return Acquired::Refused(Refused::QueueFull);
    };
    let deadline = Instant::now() + pool.queue_timeout;
    loop {
        // Registered before looking, so a slot freed in between still wakes this waiter.
        let notified = pool.queue.notify.notified();
        let mut notified = std::pin::pin!(notified);
        notified.as_mut().enable();
        let current = table.load_full();
        let Some(now) = current.pool(&pool.name) else { return Acquired::NoBackend };
        match try_take(now, want) {
            Take::Got(b, g) => return Acquired::Got(b, g),
            Take::None => return Acquired::NoBackend,
            Take::Busy => {}
        }
        drop(current);
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            pool.metrics.queue_timeouts.inc();
            return Acquired::Refused(Refused::Timeout);
        }
    }
}

enum Take {
    Got(Arc<BackendRt>, ActiveGuard),
    Busy,
    None,
}

fn try_take(pool: &PoolRt, want: Want<'_>) -> Take {
    let (tried, slot) = match want {
        Want::Pick(_, tried) => (tried, None),
        Want::Slot(s) => (&[][..], Some(s)),
    };
    for _ in 0..RACES {
        let chosen = match want {
            Want::Pick(client, tried) => pool.pick(client, tried),
            Want::Slot(s) => pool.by_slot(s).filter(|b| !b.shared.full(pool.max_connections)),
        };
        let Some(backend) = chosen else { break };
        if let Some(guard) = backend.shared.try_track(pool.max_connections) {
            return Take::Got(backend.clone(), guard);
        }
    }
    if pool.busy(tried, slot) { Take::Busy } else { Take::None }
}

fn enter(pool: &PoolRt) -> Option<Ticket<'_>> {
    let max = pool.queue_max as usize;
    pool.queue.waiting.fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| (n < max).then_some(n + 1)).ok()?;
    pool.metrics.queue_depth.inc();
    Some(Ticket(pool))
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
pub fn observe(ctx: &DpCtx, pool: &PoolRt, backend: &BackendRt, status: u16) {
    let Some(spec) = &pool.outlier else { return };
    let shared = &backend.shared;
    if status == 0 {
        return;
    }
    if status < 500 {
        shared.consecutive_5xx.store(0, Ordering::Relaxed);
        return;
    }
    if shared.consecutive_5xx.fetch_add(1, Ordering::AcqRel) + 1 < spec.consecutive_5xx {
        return;
    }
    shared.consecutive_5xx.store(0, Ordering::Relaxed);
    if let Some(duration) = eject(pool, backend, spec) {
        pool.metrics.ejections.inc();
        let reason = format!("{} consecutive 5xx answers (outlier)", spec.consecutive_5xx);
        ctx.reporter.outlier(&pool.name, backend.addr, reason, duration);
    }
}

/// The ejection's length, or `None` when `max_ejection_percent` of the pool is out already.
fn eject(pool: &PoolRt, backend: &BackendRt, spec: &OutlierSpec) -> Option<Duration> {
    let now = now_ms();
    let ejected = pool.shared.values().filter(|s| lock(s).until_ms > now).count();
    // As Envoy: ejects while fewer than the percentage are out (so at least one in a small pool).
    if ejected * 100 >= usize::from(spec.max_ejection_percent) * pool.shared.len() {
        return None;
    }
    let base = Duration::from_millis(spec.base_ejection_ms);
    let mut st = lock(&backend.shared);
    let healthy_for = Duration::from_millis(now.saturating_sub(st.until_ms));
    st.multiplier = next_multiplier(st.multiplier, healthy_for, base);
    let duration = base * st.multiplier;
    st.until_ms = now + duration.as_millis() as u64;
    Some(duration)
}

fn lock(s: &crate::routing::BackendShared) -> std::sync::MutexGuard<'_, OutlierState> {
    s.outlier.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

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
