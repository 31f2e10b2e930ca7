//! The reconciler loop: the combined health view, the routing table and the listener set are
//! rebuilt whenever intent (Raft), this node's observations or its peers' (gossip) change; it
//! also drives the readiness check until the node is ready.

use std::sync::Arc;
use std::time::Duration;

use shoal_proto::State;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::listeners::{self, Bound, Fixed};
use super::readiness::{self, Readiness};
use crate::control::gossip::{Gossip, Members};
use crate::control::raft::RaftNode;
use crate::dataplane::DataPlane;
use crate::health::HealthView;
use crate::health::combine::{self, PeerObs};
use crate::metrics::Metrics;
use crate::reconcile::{self, NodeCtx};
use crate::routing::{SharedTable, Table};
use crate::shutdown::Shutdown;

/// What the reconciler reads and writes.
pub(super) struct Reconciler {
    pub id: String,
    pub raft: Arc<RaftNode>,
    pub gossip: Option<Arc<Gossip>>,
    pub readiness: Arc<Readiness>,
    pub table: SharedTable,
    pub metrics: Arc<Metrics>,
    pub shutdown: Shutdown,
    pub dp: Arc<DataPlane>,
    pub fixed: Fixed,
    pub bound: Arc<Bound>,
    pub ctx: NodeCtx,
    /// This node's own observations.
    pub local: watch::Receiver<Arc<HealthView>>,
    /// Where the combined view goes (what routing and the admin API use).
    pub combined: watch::Sender<Arc<HealthView>>,
}

impl Reconciler {
    /// Runs the loop until the node shuts down.
    pub fn spawn(self) -> JoinHandle<()> {
        tokio::spawn(self.run())
    }

    async fn run(mut self) {
        let mut state_rx = self.raft.subscribe();
        let mut members_rx = self
            .gossip
            .as_ref()
            .map(|g| g.members.clone())
            .unwrap_or_else(|| watch::channel(Arc::new(Members::default())).1);
        let mut shutdown = self.shutdown.clone();
        let started = Instant::now();
        let mut members_open = self.gossip.is_some();
        let mut raft_rx = self.raft.metrics();
        let mut raft_open = true;
        loop {
            let state = state_rx.borrow_and_update().clone();
            let local = self.local.borrow_and_update().clone();
            let members = members_rx.borrow_and_update().clone();
            let peers: Vec<PeerObs> = members.live().filter(|m| m.name != self.id).map(|m| m.obs.clone()).collect();
            let prev = self.combined.borrow().clone();
            let combined = Arc::new(combine::combine(&state, &local, &peers, &prev));
            let gossip = self.gossip.as_deref();
            readiness::update(&self.readiness, &self.raft, gossip, &self.id, (&state, &combined, started)).await;
            self.combined.send_replace(combined.clone());
            self.rebuild(&state, &combined);
            let waiting = !self.readiness.reached();
            tokio::select! {
                _ = shutdown.wait() => return,
                r = state_rx.changed() => if r.is_err() { return },
                r = self.local.changed() => if r.is_err() { return },
                r = members_rx.changed(), if members_open => members_open = r.is_ok(),
                // Readiness waits on Raft (a leader, the log applied) and on time.
                r = raft_rx.changed(), if raft_open && waiting => raft_open = r.is_ok(),
                _ = tokio::time::sleep(Duration::from_secs(1)), if waiting => {}
            }
        }
    }

    fn rebuild(&self, state: &State, health: &HealthView) {
        let prev = self.table.load_full();
        let mut next = reconcile::build(state, health, &self.ctx, &prev, &self.metrics);
        next.starting = !self.readiness.reached();
        for gone in prev.pools.iter().filter(|p| next.pool(&p.name).is_none()) {
            gone.shared.values().for_each(|s| s.pool.clear());
            self.metrics.forget_pool(&gone.name);
        }
        for pool in &next.pools {
            let was = prev.pool(&pool.name).is_some_and(|p| p.fail_open);
            match (was, pool.fail_open) {
                (false, true) => {
                    tracing::warn!(pool = %pool.name, routable = pool.routable().len(), "pool fails open: too few healthy backends, routing to all of them")
                }
                (true, false) => tracing::info!(pool = %pool.name, "pool no longer fails open"),
                _ => {}
            }
        }
        publish_backend_gauges(&self.metrics, &next);
        self.metrics.table_rebuilds.inc();
        self.metrics.config_version.set(state.version as i64);
        let tcp_ports: Vec<u16> = next.tcp.keys().copied().collect();
        self.table.store(Arc::new(next));
        // Queued requests pick again from the new table (backends may have come or gone).
        self.table.load().pools.iter().for_each(|p| p.limits.queue.rebuilt());
        listeners::apply(&self.dp, &self.fixed, &self.bound, &tcp_ports);
    }
}

fn publish_backend_gauges(metrics: &Metrics, table: &Table) {
    metrics.backend_up.reset();
    for pool in &table.pools {
        for addr in pool.shared.keys() {
            let up = pool.routable().iter().any(|b| b.addr == *addr);
            metrics.backend_up.with_label_values(&[pool.name.as_str(), &addr.to_string()]).set(i64::from(up));
        }
        metrics.pool_fail_open.with_label_values(&[pool.name.as_str()]).set(i64::from(pool.fail_open));
    }
}

/// Waits (2 s at most) for the first routing table and the HTTP listener bound after it.
pub(super) async fn wait_first_table(table: &SharedTable, bound: &Bound) {
    for _ in 0..200 {
        // The listeners are bound right after the table is stored.
        if table.load().generation > 0 && bound.http().is_some() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
