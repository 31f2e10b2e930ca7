//! When a node reports ready: the flag the admin API, gossip and a takeover read, and the
//! check the reconciler runs until it is set.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use shoal_proto::State;
use tokio::time::Instant;

use crate::control::gossip::Gossip;
use crate::control::raft::RaftNode;
use crate::health::{BackendId, HealthView, Verdict};
use crate::shutdown::{Phase, Shutdown};

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

/// A node is ready once it follows a leader with the log applied, its config sources are in,
/// and every actively checked backend has a verdict (its own or a peer's), or after a grace
/// period; until then routing has nothing "assumed up" to offer anyway.
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
    let unknown = state
        .pools
        .values()
        .filter(|p| matches!(p.spec.check(), shoal_proto::CheckKind::Http | shoal_proto::CheckKind::Tcp))
        .flat_map(|p| p.backends.values().map(move |b| (p.name.clone(), b.addr)))
        .filter(|id: &BackendId| view.verdicts.get(id).copied().unwrap_or_default() == Verdict::Unknown)
        .count();
    let pending = r.sources_pending.load(Ordering::Relaxed);
    // Before a leader is known and its log applied, the state may lack pools it is about to get.
    let raft = raft.status().await;
    let caught_up = raft.leader.is_some() && raft.applied >= raft.committed;
    if (unknown == 0 && pending == 0 && caught_up) || started.elapsed() > Duration::from_secs(10) {
        r.ready.store(true, Ordering::Relaxed);
        if let Some(g) = gossip {
            g.set("ready", Some("1".into())).await;
        }
        tracing::info!(node = %id, unknown, pending, "node ready");
    }
}
