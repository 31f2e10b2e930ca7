//! When a node reports ready. The decision is pure ([`decide`] over observed [`Facts`]); the
//! driver [`update`], run by the reconciler until the node is ready, gathers the facts (it
//! awaits Raft's status), sets the flag and announces it in gossip.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use shoal_proto::State;
use tokio::time::Instant;

use crate::control::gossip::Gossip;
use crate::control::raft::RaftNode;
use crate::health::{BackendId, HealthView, Verdict};
use crate::shutdown::{Phase, Shutdown};

/// After this long a node reports ready whatever it still waits for.
const GRACE: Duration = Duration::from_secs(10);

/// Whether the node is ready, and what it still waits for that others report (config sources).
pub struct Readiness {
    ready: AtomicBool,
    /// Config sources (file, EC environment) not yet applied; the node is not ready before.
    sources_pending: Arc<AtomicUsize>,
    shutdown: Shutdown,
}

impl Readiness {
    pub fn new(shutdown: Shutdown) -> Readiness {
        Readiness { ready: AtomicBool::new(false), sources_pending: Arc::default(), shutdown }
    }

    /// Ready, and not shutting down.
    pub fn is_ready(&self) -> bool {
        self.reached() && self.shutdown.phase() == Phase::Running
    }

    /// Whether the node has become ready (it stays so until it stops).
    pub fn reached(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// The count of config sources not yet applied; each source's keeper takes one off.
    pub fn sources_pending(&self) -> Arc<AtomicUsize> {
        self.sources_pending.clone()
    }
}

/// What the readiness decision looks at.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Facts {
    /// Actively checked backends with no verdict yet (neither this node's nor a peer's).
    unknown: usize,
    /// Config sources not yet applied.
    pending: usize,
    /// A leader is known and this node has applied the log up to the commit index.
    caught_up: bool,
    /// How long the node has been starting.
    waited: Duration,
}

/// Ready or not, and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Decision {
    ready: bool,
    reason: &'static str,
}

/// A node is ready once it follows a leader with the log applied, its config sources are in,
/// and every actively checked backend has a verdict (its own or a peer's), or after a grace
/// period; until then routing has nothing "assumed up" to offer anyway.
fn decide(f: &Facts) -> Decision {
    let (ready, reason) = if f.unknown == 0 && f.pending == 0 && f.caught_up {
        (true, "caught up, config applied, every checked backend has a verdict")
    } else if f.waited > GRACE {
        (true, "grace period over")
    } else if !f.caught_up {
        // Before a leader is known and its log applied, the state may lack pools it is about to get.
        (false, "waiting for a leader and the log applied")
    } else if f.pending > 0 {
        (false, "waiting for config sources")
    } else {
        (false, "waiting for health verdicts")
    };
    Decision { ready, reason }
}

/// Actively checked backends of `state` that `view` has no verdict for.
fn unknown_backends(state: &State, view: &HealthView) -> usize {
    state
        .pools
        .values()
        .filter(|p| p.spec.check().is_active())
        .flat_map(|p| p.backends.values().map(move |b| (p.name.clone(), b.addr)))
        .filter(|id: &BackendId| view.verdicts.get(id).copied().unwrap_or_default() == Verdict::Unknown)
        .count()
}

/// Gathers the facts and, once [`decide`] says so, marks the node ready (in gossip too).
pub(super) async fn update(
    r: &Readiness,
    raft: &RaftNode,
    gossip: Option<&Gossip>,
    id: &str,
    (state, view, started): (&State, &HealthView, Instant),
) {
    if r.reached() {
        return;
    }
    let status = raft.status().await;
    let facts = Facts {
        unknown: unknown_backends(state, view),
        pending: r.sources_pending.load(Ordering::Relaxed),
        caught_up: status.leader.is_some() && status.applied >= status.committed,
        waited: started.elapsed(),
    };
    let decision = decide(&facts);
    if decision.ready {
        r.ready.store(true, Ordering::Relaxed);
        if let Some(g) = gossip {
            g.set("ready", Some("1".into())).await;
        }
        tracing::info!(node = %id, unknown = facts.unknown, pending = facts.pending, reason = decision.reason, "node ready");
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use shoal_proto::{BackendSpec, CheckKind, Command, PoolSpec, apply};

    use super::*;

    fn all_in() -> Facts {
        Facts { unknown: 0, pending: 0, caught_up: true, waited: Duration::from_secs(1) }
    }

    #[test]
    fn ready_once_caught_up_with_sources_applied_and_verdicts_known() {
        assert!(decide(&all_in()).ready);
    }

    #[test]
    fn each_missing_fact_holds_readiness_back_with_its_reason() {
        let cases = [
            (Facts { caught_up: false, ..all_in() }, "waiting for a leader and the log applied"),
            (Facts { pending: 1, ..all_in() }, "waiting for config sources"),
            (Facts { unknown: 2, ..all_in() }, "waiting for health verdicts"),
        ];
        for (facts, reason) in cases {
            assert_eq!(decide(&facts), Decision { ready: false, reason }, "{facts:?}");
        }
    }

    #[test]
    fn the_grace_period_ends_any_wait() {
        let stuck = Facts { unknown: 3, pending: 1, caught_up: false, waited: GRACE };
        assert!(!decide(&stuck).ready, "not before the grace period is over");
        let over = Facts { waited: GRACE + Duration::from_millis(1), ..stuck };
        assert_eq!(decide(&over), Decision { ready: true, reason: "grace period over" });
    }

    fn backend(i: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, i], 80))
    }

    #[test]
    fn only_actively_checked_backends_without_a_verdict_count_as_unknown() {
        let mut st = State::default();
        for (name, check) in [("probed", CheckKind::Http), ("passive", CheckKind::None)] {
            let mut spec = PoolSpec { pattern: Some(format!("/{name}/")), ..PoolSpec::default() };
            spec.health.check = Some(check);
            apply(&mut st, &Command::PutPool { name: name.into(), spec }).expect("pool");
            for i in [1, 2] {
                let put = Command::PutBackend { pool: name.into(), addr: backend(i), spec: BackendSpec::default() };
                apply(&mut st, &put).expect("backend");
            }
        }
        let mut view = HealthView::default();
        assert_eq!(unknown_backends(&st, &view), 2, "both probed backends, not the passive pool's");
        view.verdicts.insert(("probed".into(), backend(1)), Verdict::Up);
        assert_eq!(unknown_backends(&st, &view), 1);
    }
}
