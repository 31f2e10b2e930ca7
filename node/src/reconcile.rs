//! Pure translation of desired state plus observations into a routing [`Table`] and into the
//! health answers of the admin API. No I/O: the same inputs give the same table on every node.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use shoal_proto::admin::{BackendHealth, BackendStatus, Coverage, PoolHealth, PoolStatus};
use std::sync::atomic::AtomicUsize;

use shoal_proto::proxy::Cidr;
use shoal_proto::{Algorithm, CheckKind, Pool, State};

use crate::dataplane::balancer::Balancer;
use crate::dataplane::limits::PoolLimits;
use crate::dataplane::mux::Mux;
use crate::health::{BackendId, HealthView, Verdict};
use crate::metrics::Metrics;
use crate::routing::{BackendRt, BackendShared, Counts, PoolRt, Table, Tier};

/// Node-local facts that shape routing.
#[derive(Clone, Debug, Default)]
pub struct NodeCtx {
    /// Data-plane worker threads (one idle-connection list each).
    pub workers: usize,
    pub zone: String,
}

/// A backend as reconcile sees it: configured or self-registered.
struct Candidate {
    addr: SocketAddr,
    url_path: String,
    weight: u32,
    zone: String,
    slot: Option<u32>,
    status: BackendStatus,
}

/// Builds the next table. `prev` lends its per-backend runtime state to surviving backends.
pub fn build(state: &State, health: &HealthView, ctx: &NodeCtx, prev: &Table, metrics: &Metrics) -> Table {
    let mut table = Table { version: state.version, generation: prev.generation + 1, ..Table::default() };
    for pool in state.pools.values() {
        let prev_pool = prev.pool(&pool.name);
        let idx = table.pools.len();
        if let Some(port) = pool.spec.listen {
            table.tcp.insert(port, idx);
        }
        table.pools.push(build_pool(pool, health, ctx, prev_pool, metrics));
    }
    table.mux = Mux::new(state.pools.values().enumerate().filter_map(|(i, p)| Some((p.spec.pattern.as_deref()?, i))));
    table
}

fn build_pool(pool: &Pool, health: &HealthView, ctx: &NodeCtx, prev: Option<&PoolRt>, metrics: &Metrics) -> PoolRt {
    let candidates = candidates(pool, health);
    let healthy: Vec<&Candidate> = candidates.iter().filter(|c| c.status == BackendStatus::Healthy).collect();
    let eligible: Vec<&Candidate> = candidates.iter().filter(|c| c.status != BackendStatus::Draining).collect();
    let fail_open =
        !healthy.is_empty() && healthy.len() * 100 < usize::from(pool.spec.panic_threshold) * eligible.len();
    let chosen = if fail_open { eligible } else { healthy };
    let queue = prev.map(|p| p.limits.queue.clone()).unwrap_or_default();
    let mut shared: HashMap<SocketAddr, Arc<BackendShared>> = HashMap::new();
    for c in &candidates {
        let s = prev
            .and_then(|p| p.shared.get(&c.addr).cloned())
            .unwrap_or_else(|| Arc::new(BackendShared::new(ctx.workers.max(1), queue.clone())));
        // The health view's turn to healthy, as this table applies it, starts slow start.
        s.limits.set_healthy(c.status == BackendStatus::Healthy);
        shared.insert(c.addr, s);
    }
    let routable: Vec<Arc<BackendRt>> = chosen
        .iter()
        .map(|c| {
            Arc::new(BackendRt {
                key: c.addr.to_string(),
                addr: c.addr,
                url_path: c.url_path.clone(),
                weight: c.weight,
                zone: c.zone.clone(),
                slot: c.slot,
                shared: shared[&c.addr].clone(),
            })
        })
        .collect();
    let rotation = prev.map(|p| p.rotation.clone()).unwrap_or_default();
    let mut slots: Vec<u32> = candidates.iter().filter_map(|c| c.slot).collect();
    slots.sort_unstable();
    slots.dedup();
    let spec = &pool.spec;
    PoolRt {
        name: pool.name.clone(),
        protocol: spec.protocol,
        tiers: tiers(routable, &ctx.zone, spec.algorithm, &rotation),
        shared,
        fail_open,
        connect_timeout: Duration::from_millis(spec.connect_timeout_ms),
        response_timeout: Duration::from_millis(spec.response_timeout_ms),
        idle_timeout: (spec.idle_timeout_ms > 0).then(|| Duration::from_millis(spec.idle_timeout_ms)),
        backend_tls: spec.backend_tls,
        backend_tls_name: spec.backend_tls_name.clone(),
        accept_proxy_from: proxy_sources(&pool.name, &spec.accept_proxy_from),
        send_proxy: spec.send_proxy,
        pinning: spec.pinning,
        slots,
        rotation,
        metrics: prev.map(|p| p.metrics.clone()).unwrap_or_else(|| Arc::new(metrics.pool(&pool.name))),
        limits: PoolLimits {
            max_connections: spec.max_connections,
            queue,
            queue_max: spec.queue_max,
            queue_timeout: Duration::from_millis(spec.queue_timeout_ms),
            slow_start: Duration::from_secs(u64::from(spec.slow_start_s)),
            outlier: spec.outlier.clone(),
        },
    }
}

/// A pool's trusted PROXY sources. Validation let the list in, so it parses; were it not to,
/// nobody is trusted rather than everybody.
fn proxy_sources(pool: &str, list: &[String]) -> Option<Arc<[Cidr]>> {
    if list.is_empty() {
        return None;
    }
    match shoal_proto::proxy::parse_cidrs(list) {
        Ok(cidrs) => Some(cidrs.into()),
        Err(e) => {
            tracing::error!(pool, error = %e, "accept_proxy_from unusable; refusing every connection");
            Some(Arc::from([]))
        }
    }
}

/// Zone-aware tiers: this node's zone first while it has routable backends, then everyone.
fn tiers(routable: Vec<Arc<BackendRt>>, zone: &str, algorithm: Algorithm, rotation: &Arc<AtomicUsize>) -> Vec<Tier> {
    let local: Vec<Arc<BackendRt>> = routable.iter().filter(|b| !zone.is_empty() && b.zone == zone).cloned().collect();
    let mut out = Vec::new();
    if !local.is_empty() && local.len() < routable.len() {
        out.push(Tier { balancer: Balancer::new(algorithm, &local, rotation.clone()), backends: local });
    }
    out.push(Tier { balancer: Balancer::new(algorithm, &routable, rotation.clone()), backends: routable });
    out
}

/// Configured backends in scope plus self-registered ones, sorted by address.
fn candidates(pool: &Pool, health: &HealthView) -> Vec<Candidate> {
    let check = pool.spec.check();
    let mut out: Vec<Candidate> = pool
        .backends
        .values()
        .filter(|b| pool.spec.scope.admits(&b.spec.zone))
        .map(|b| Candidate {
            addr: b.addr,
            url_path: b.spec.url_path.clone(),
            weight: b.spec.weight,
            zone: b.spec.zone.clone(),
            slot: b.spec.slot,
            status: status_of(check, b.spec.drain, health, &pool.name, b.addr),
        })
        .collect();
    if pool.spec.self_register {
        let dynamic = health.dynamic.get(&pool.name).into_iter().flat_map(|d| d.keys());
        for addr in dynamic.filter(|a| !pool.backends.contains_key(&a.to_string())) {
            out.push(Candidate {
                addr: *addr,
                url_path: "/".into(),
                weight: 1,
                zone: String::new(),
                slot: None,
                status: status_of(check, false, health, &pool.name, *addr),
            });
        }
    }
    out.sort_by_key(|c| c.addr);
    out
}

fn status_of(check: CheckKind, drain: bool, health: &HealthView, pool: &str, addr: SocketAddr) -> BackendStatus {
    let id = (pool.to_string(), addr);
    let verdict =
        if check == CheckKind::None { Verdict::Up } else { health.verdicts.get(&id).copied().unwrap_or_default() };
    backend_status(drain, verdict, health.ejected.contains(&id))
}

/// One backend's seed-003 status.
pub fn backend_status(drain: bool, verdict: Verdict, ejected: bool) -> BackendStatus {
    match (drain, verdict, ejected) {
        (true, _, _) => BackendStatus::Draining,
        (false, _, true) | (false, Verdict::Down, _) => BackendStatus::Sick,
        (false, Verdict::Up, false) => BackendStatus::Healthy,
        (false, Verdict::Unknown, false) => BackendStatus::Unknown,
    }
}

/// The answer of `GET /v1/pools/{pool}/health`: statuses as this node routes, work in flight
/// across the cluster (this node's counters plus `remote`, what live peers gossip).
pub fn pool_health(pool: &Pool, health: &HealthView, table: &Table, remote: &HashMap<BackendId, Counts>) -> PoolHealth {
    let rt = table.pool(&pool.name);
    let backends: Vec<BackendHealth> = candidates(pool, health)
        .into_iter()
        .map(|c| {
            let id = (pool.name.clone(), c.addr);
            let mut counts = rt.and_then(|p| p.shared.get(&c.addr)).map(|s| s.counts()).unwrap_or_default();
            counts += remote.get(&id).copied().unwrap_or_default();
            BackendHealth {
                addr: c.addr,
                status: c.status,
                weight: c.weight,
                zone: c.zone,
                dynamic: !pool.backends.contains_key(&c.addr.to_string()),
                active: counts.active,
                upgraded: counts.upgraded,
                pinned: counts.pinned,
                slot: c.slot,
                reason: (c.status == BackendStatus::Sick).then(|| health.reasons.get(&id).cloned()).flatten(),
            }
        })
        .collect();
    let coverage = pool.spec.pinning.then(|| Coverage {
        covered: backends.iter().filter(|b| b.pinned > 0).count() as u32,
        total: backends.iter().filter(|b| b.status != BackendStatus::Draining).count() as u32,
    });
    PoolHealth {
        pool: pool.name.clone(),
        status: pool_status(&backends),
        fail_open: rt.is_some_and(|p| p.fail_open),
        backends,
        pinned_coverage: coverage,
    }
}

/// Full when every serving backend is healthy, empty when none is.
pub fn pool_status(backends: &[BackendHealth]) -> PoolStatus {
    let serving = backends.iter().filter(|b| b.status != BackendStatus::Draining);
    let (n, healthy) = serving.fold((0, 0), |(n, h), b| (n + 1, h + usize::from(b.status == BackendStatus::Healthy)));
    match healthy {
        0 => PoolStatus::Empty,
        h if h == n => PoolStatus::Full,
        _ => PoolStatus::Degraded,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_proto::{BackendSpec, Command, PoolSpec, Protocol, apply};

    fn state(n: u8) -> State {
        let mut st = State::default();
        let spec = PoolSpec { pattern: Some("/".into()), ..PoolSpec::default() };
        apply(&mut st, &Command::PutPool { name: "web".into(), spec }).expect("pool");
        for i in 0..n {
            let addr = SocketAddr::from(([10, 0, 0, i], 80));
            apply(&mut st, &Command::PutBackend { pool: "web".into(), addr, spec: BackendSpec::default() })
                .expect("backend");
        }
        st
    }

    fn up(view: &mut HealthView, i: u8, v: Verdict) {
        view.verdicts.insert(("web".into(), SocketAddr::from(([10, 0, 0, i], 80))), v);
    }

    fn ctx() -> NodeCtx {
        NodeCtx { workers: 1, zone: String::new() }
    }

    #[test]
    fn unknown_and_sick_backends_are_not_routed() {
        let st = state(3);
        let mut view = HealthView::default();
        up(&mut view, 0, Verdict::Up);
        up(&mut view, 1, Verdict::Up);
        up(&mut view, 2, Verdict::Down);
        let m = Metrics::new("t");
        let t = build(&st, &view, &ctx(), &Table::default(), &m);
        assert_eq!(t.pools[0].routable().len(), 2);
        assert!(!t.pools[0].fail_open);
        let h = pool_health(&st.pools["web"], &view, &t, &HashMap::new());
        assert_eq!(h.status, PoolStatus::Degraded);
        let t = build(&st, &HealthView::default(), &ctx(), &t, &m);
        assert!(t.pools[0].routable().is_empty(), "no verdict yet: nothing routed");
        assert_eq!(
            pool_health(&st.pools["web"], &HealthView::default(), &t, &HashMap::new()).status,
            PoolStatus::Empty
        );
    }

    #[test]
    fn panic_threshold_fails_open() {
        let st = state(3);
        let mut view = HealthView::default();
        up(&mut view, 0, Verdict::Up);
        up(&mut view, 1, Verdict::Down);
        up(&mut view, 2, Verdict::Down);
        let t = build(&st, &view, &ctx(), &Table::default(), &Metrics::new("t"));
        assert!(t.pools[0].fail_open);
        assert_eq!(t.pools[0].routable().len(), 3);
    }

    #[test]
    fn shared_state_survives_rebuilds() {
        let st = state(2);
        let mut view = HealthView::default();
        up(&mut view, 0, Verdict::Up);
        up(&mut view, 1, Verdict::Up);
        let m = Metrics::new("t");
        let t1 = build(&st, &view, &ctx(), &Table::default(), &m);
        let _guard = crate::routing::ActiveGuard::track(&t1.pools[0].routable()[0].shared);
        up(&mut view, 0, Verdict::Down);
        let t2 = build(&st, &view, &ctx(), &t1, &m);
        up(&mut view, 0, Verdict::Up);
        let t3 = build(&st, &view, &ctx(), &t2, &m);
        assert_eq!(t3.pools[0].routable()[0].shared.limits.active(), 1, "in-flight count carried over");
        assert_eq!(t3.generation, 3);
    }

    #[test]
    fn slow_start_restarts_when_a_backend_turns_healthy_again() {
        use crate::dataplane::limits::now_ms;
        let st = state(1);
        let mut view = HealthView::default();
        up(&mut view, 0, Verdict::Up);
        let m = Metrics::new("t");
        let t1 = build(&st, &view, &ctx(), &Table::default(), &m);
        let shared = t1.pools[0].shared.values().next().expect("backend").clone();
        std::thread::sleep(Duration::from_millis(50));
        let t2 = build(&st, &view, &ctx(), &t1, &m);
        assert!(shared.limits.up_for(now_ms()) >= 50, "still healthy: its ramp goes on");
        up(&mut view, 0, Verdict::Down);
        let t3 = build(&st, &view, &ctx(), &t2, &m);
        up(&mut view, 0, Verdict::Up);
        build(&st, &view, &ctx(), &t3, &m);
        assert!(shared.limits.up_for(now_ms()) < 50, "healthy again: the ramp starts over");
    }

    #[test]
    fn drained_backends_leave_rotation_but_not_status() {
        let mut st = state(2);
        let addr = SocketAddr::from(([10, 0, 0, 1], 80));
        apply(&mut st, &Command::SetDrain { pool: "web".into(), addr, drain: true }).expect("drain");
        let mut view = HealthView::default();
        up(&mut view, 0, Verdict::Up);
        up(&mut view, 1, Verdict::Up);
        let t = build(&st, &view, &ctx(), &Table::default(), &Metrics::new("t"));
        assert_eq!(t.pools[0].routable().len(), 1);
        let h = pool_health(&st.pools["web"], &view, &t, &HashMap::new());
        assert_eq!(h.status, PoolStatus::Full);
        assert_eq!(h.backends[1].status, BackendStatus::Draining);
    }

    #[test]
    fn slots_of_unhealthy_backends_still_exist() {
        let mut st = State::default();
        let spec = PoolSpec { pattern: Some("/".into()), pinning: true, ..PoolSpec::default() };
        apply(&mut st, &Command::PutPool { name: "web".into(), spec }).expect("pool");
        for i in 0..3u8 {
            let addr = SocketAddr::from(([10, 0, 0, i], 80));
            let spec = BackendSpec { slot: Some(u32::from(i) + 1), ..BackendSpec::default() };
            apply(&mut st, &Command::PutBackend { pool: "web".into(), addr, spec }).expect("backend");
        }
        let mut view = HealthView::default();
        up(&mut view, 0, Verdict::Up);
        up(&mut view, 1, Verdict::Down);
        up(&mut view, 2, Verdict::Up);
        let t = build(&st, &view, &ctx(), &Table::default(), &Metrics::new("t"));
        let pool = &t.pools[0];
        assert_eq!(pool.slots, vec![1, 2, 3]);
        assert!(pool.has_slot(2) && pool.by_slot(2).is_none(), "gw2 exists but is down");
        assert!(!pool.has_slot(9) && !pool.has_slot(0), "no gateway holds slot 9");
        assert_eq!(pool.by_slot(3).map(|b| b.addr), Some(SocketAddr::from(([10, 0, 0, 2], 80))));
    }

    #[test]
    fn tcp_pools_are_indexed_by_port() {
        let mut st = State::default();
        let spec = PoolSpec { protocol: Protocol::Tcp, listen: Some(3001), ..PoolSpec::default() };
        apply(&mut st, &Command::PutPool { name: "t".into(), spec }).expect("pool");
        let t = build(&st, &HealthView::default(), &ctx(), &Table::default(), &Metrics::new("t"));
        assert_eq!(t.tcp.get(&3001), Some(&0));
    }
}
