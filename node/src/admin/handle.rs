//! What the admin API needs of a node, as a narrow handle the node builds: Raft, the health
//! views, the routing table, metrics, tokens and certificates, and a [`NodeStatus`] for what
//! only the node knows as it runs (readiness, bound listeners). The admin API never reaches
//! into the node module itself.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;

use shoal_proto::State;
use tokio::sync::watch;

use super::tokens::Tokens;
use crate::control::gossip::Members;
use crate::control::raft::RaftNode;
use crate::dataplane::accesslog::AccessLog;
use crate::dataplane::tls::TlsStore;
use crate::health::{BackendId, HealthView};
use crate::metrics::Metrics;
use crate::routing::{Counts, SharedTable};
use crate::shutdown::Shutdown;

/// What the node reports about itself while it runs.
pub trait NodeStatus: Send + Sync {
    /// Ready to take traffic (and not shutting down).
    fn is_ready(&self) -> bool;
    /// The node's own HTTP listener, once bound.
    fn http_addr(&self) -> Option<SocketAddr>;
    /// The node's own HTTPS listener, once bound.
    fn https_addr(&self) -> Option<SocketAddr>;
}

/// The node as the admin API sees it.
pub struct NodeApi {
    pub id: String,
    pub zone: String,
    pub admin_addr: SocketAddr,
    pub raft: Arc<RaftNode>,
    /// The cluster's members as gossip sees them (never changes for a node alone).
    pub gossip_members: watch::Receiver<Arc<Members>>,
    /// The cluster's combined health view (what routing uses).
    pub health: watch::Receiver<Arc<HealthView>>,
    /// This node's own observations.
    pub local_health: watch::Receiver<Arc<HealthView>>,
    pub table: SharedTable,
    pub metrics: Arc<Metrics>,
    pub shutdown: Shutdown,
    pub status: Arc<dyn NodeStatus>,
    /// Server certificates of the HTTPS listener (reloadable).
    pub tls: Option<Arc<TlsStore>>,
    /// Client TLS for `backend_tls` pools.
    pub backend_tls: Option<Arc<rustls::ClientConfig>>,
    /// The scoped tokens in service.
    pub tokens: Tokens,
    /// The admin listener's certificate (`None`: plain HTTP).
    pub admin_tls: Option<Arc<TlsStore>>,
    pub public_metrics: bool,
    pub grpc_allow_unauthenticated: bool,
    /// `PUT /v1/debug/clock` is served (`--fault-injection`).
    pub fault_injection: bool,
    /// The access log, reopened by `POST /v1/access-log/reopen`.
    pub access_log: Option<Arc<AccessLog>>,
}

impl NodeApi {
    pub fn state(&self) -> Arc<State> {
        self.raft.current()
    }

    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.status.http_addr()
    }

    pub fn https_addr(&self) -> Option<SocketAddr> {
        self.status.https_addr()
    }

    pub fn is_ready(&self) -> bool {
        self.status.is_ready()
    }

    pub fn members(&self) -> Arc<Members> {
        self.gossip_members.borrow().clone()
    }

    /// Work in flight on live peers, per backend (from their gossip).
    pub fn remote_counts(&self) -> HashMap<BackendId, Counts> {
        let mut out: HashMap<BackendId, Counts> = HashMap::new();
        for m in self.members().live().filter(|m| m.name != self.id) {
            for (id, c) in &m.active {
                *out.entry(id.clone()).or_default() += *c;
            }
        }
        out
    }

    /// Updates gauges that are cheaper to compute on scrape than on every change.
    pub async fn refresh_gauges(&self) {
        let st = self.raft.status().await;
        let m = &self.metrics;
        m.config_version.set(self.state().version as i64);
        m.raft_term.set(st.term as i64);
        m.raft_leader_id.set(st.leader.map(|l| l as i64).unwrap_or(0));
        m.raft_is_leader.set(i64::from(st.leader == Some(self.raft.id)));
        m.raft_commit_index.set(st.committed as i64);
        m.raft_applied_index.set(st.applied as i64);
        m.raft_voters.set(st.voters.len() as i64);
        m.raft_voters_live.set(live_voters(&st.voters, &self.members(), self.raft.id) as i64);
        m.raft_learners.set(st.learners.len() as i64);
        m.gossip_live_nodes.set(self.members().live().count().max(1) as i64);
        m.node_ready.set(i64::from(self.is_ready()));
        for (cert, store) in [("https", &self.tls), ("admin", &self.admin_tls)] {
            for (file, not_after) in store.iter().flat_map(|s| s.expiries()) {
                m.certificate(cert, &file, not_after);
            }
        }
    }
}

/// Voters alive in gossip (by the Raft id they gossip); this node counts as alive itself, so
/// a node without gossip (alone) sees its one voter.
fn live_voters(voters: &BTreeSet<u64>, members: &Members, me: u64) -> usize {
    let live: HashSet<u64> = members.live().map(|m| m.raft_id).chain([me]).collect();
    voters.iter().filter(|v| live.contains(v)).count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::gossip::Member;

    fn member(name: &str, raft_id: u64, live: bool) -> (String, Member) {
        (name.to_string(), Member { name: name.into(), raft_id, live, ..Member::default() })
    }

    #[test]
    fn live_voters_counts_voters_gossip_sees_alive_and_this_node() {
        let members = Members { nodes: [member("a", 1, true), member("b", 2, false), member("c", 3, true)].into() };
        let voters = [1, 2, 3].into();
        assert_eq!(live_voters(&voters, &members, 1), 2, "b is dead");
        assert_eq!(live_voters(&voters, &Members::default(), 2), 1, "alone: itself");
        assert_eq!(live_voters(&[1, 3].into(), &members, 4), 2, "a learner that sees both voters");
    }
}
