//! Raft membership driven by gossip. Two loops:
//!
//! - **bootstrap** (Consul's `bootstrap_expect`): a node whose Raft is not initialized waits
//!   until `expect` nodes see each other, none of them reports an initialized cluster or a
//!   cluster identity, and it has the lowest Raft id among them; only then does it create the
//!   cluster identity and initialize, with those nodes as voters. A restarted node is already
//!   initialized and never does it again; a node that sees a cluster waits to be added to it.
//! - **reconcile** (leader only, one change per tick): live unknown nodes join as learners,
//!   unless they gossip another cluster's identity (refused and counted; a learner that turns
//!   out to belong elsewhere is removed);
//!   caught-up learners that stayed live for a while become voters up to `max_voters` (an odd
//!   number); a voter dead for `dead_grace` is removed only while the remaining live voters keep
//!   a majority; dead learners are removed after the same grace.
//!
//! An operator can remove a member at once (`shoal cluster remove`, [`remove`]): the leader
//! refuses while the node is live in gossip (the reconciler would add it back as a learner),
//! and when the voters left would lack a live majority. The reconciler adds only live nodes,
//! so a removed node stays out until it comes back live, which is how it rejoins.
//!
//! The decisions are pure functions ([`plan`], [`removal`], [`should_bootstrap`]); the loops
//! only do I/O. Membership changes on a leader are serialized (`RaftNode::membership_change`),
//! so an operator's removal and the reconciler never decide on the same stale view.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{ChangeMembershipError, ClientWriteError, RaftError};
use openraft::{ChangeMembers, RaftMetrics};
use serde::{Deserialize, Serialize};
use shoal_proto::admin::RemovedNode;
use tokio::sync::watch;
use tokio::time::Instant;

use super::gossip::{Gossip, Members};
use super::raft::ident::{AT_GOSSIP, AT_PING, ClusterId, compatible};
use super::raft::network::{Conn, Reply, Request};
use super::raft::{NodeId, RaftNode, ShoalNode};
use crate::shutdown::Shutdown;

/// Membership policy.
#[derive(Clone, Debug)]
pub struct Policy {
    pub max_voters: usize,
    /// A voter or learner not live for this long may be removed.
    pub dead_grace: Duration,
    /// A learner must be live and caught up this long before promotion.
    pub promote_after: Duration,
    /// A learner within this many entries of the leader's log counts as caught up.
    pub max_lag: u64,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            max_voters: 5,
            dead_grace: Duration::from_secs(120),
            promote_after: Duration::from_secs(3),
            max_lag: 100,
        }
    }
}

/// One membership change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    AddLearner(NodeId, ShoalNode),
    Promote(NodeId),
    RemoveVoter(NodeId),
    RemoveLearner(NodeId),
    /// Leave a joint configuration that a change begun earlier (often by a previous leader)
    /// left behind: openraft does not finish it on its own, and nothing else is planned in it.
    FinishJoint(BTreeSet<NodeId>),
}

/// What the leader knows when it plans.
#[derive(Clone, Debug, Default)]
pub struct View {
    pub me: NodeId,
    pub voters: BTreeSet<NodeId>,
    pub learners: BTreeSet<NodeId>,
    /// Live nodes according to gossip, with how long each has been live.
    pub live: BTreeMap<NodeId, (ShoalNode, Duration)>,
    /// How long each member has not been live (absent: live now).
    pub absent: HashMap<NodeId, Duration>,
    /// Matched log index per member (leader's replication progress).
    pub matched: HashMap<NodeId, u64>,
    pub last_log_index: u64,
    /// Live nodes that gossip another cluster's identity: never added, removed if learners.
    pub foreign: BTreeSet<NodeId>,
    /// Nodes whose certificate (as last presented to this leader) is revoked: never added,
    /// removed at once while the remaining voters keep a live majority.
    pub revoked: BTreeSet<NodeId>,
    /// The voters to settle on when the membership is a joint configuration (its last config).
    pub joint: Option<BTreeSet<NodeId>>,
}

/// The next change to make, if any.
pub fn plan(v: &View, p: &Policy) -> Option<Action> {
    if let Some(goal) = &v.joint {
        return Some(Action::FinishJoint(goal.clone()));
    }
    let refused = |id: &NodeId| v.foreign.contains(id) || v.revoked.contains(id);
    let unknown = |id: &NodeId| !v.voters.contains(id) && !v.learners.contains(id) && !refused(id);
    if let Some((id, (node, _))) = v.live.iter().find(|(id, _)| unknown(id)) {
        return Some(Action::AddLearner(*id, node.clone()));
    }
    if let Some(id) = v.learners.iter().find(|id| refused(id)) {
        return Some(Action::RemoveLearner(*id));
    }
    if let Some(victim) = v.voters.iter().find(|id| **id != v.me && v.revoked.contains(id))
        && keeps_majority(v, *victim)
    {
        return Some(Action::RemoveVoter(*victim));
    }
    let dead_for = |id: &NodeId| v.absent.get(id).copied().unwrap_or_default();
    let live_members = v.voters.iter().chain(&v.learners).filter(|id| v.live.contains_key(id)).count();
    let mut target = p.max_voters.min(live_members).max(1);
    if target.is_multiple_of(2) {
        target -= 1;
    }
    if v.voters.len() < target.max(1)
        && let Some(id) = v.learners.iter().find(|id| promotable(v, p, id))
    {
        return Some(Action::Promote(*id));
    }
    if let Some(victim) = v.voters.iter().find(|id| **id != v.me && dead_for(id) >= p.dead_grace)
        && keeps_majority(v, *victim)
    {
        return Some(Action::RemoveVoter(*victim));
    }
    v.learners.iter().find(|id| dead_for(id) >= p.dead_grace).map(|id| Action::RemoveLearner(*id))
}

/// Whether the voters left after removing `victim` still have a live (and unrevoked) majority.
fn keeps_majority(v: &View, victim: NodeId) -> bool {
    let (live, remaining) = voters_after(v, victim);
    live * 2 > remaining
}

/// The voters left after removing `victim`: how many are live (and unrevoked), how many in all.
fn voters_after(v: &View, victim: NodeId) -> (usize, usize) {
    let remaining: Vec<&NodeId> = v.voters.iter().filter(|id| **id != victim).collect();
    let live = remaining.iter().filter(|id| v.live.contains_key(id) && !v.revoked.contains(id)).count();
    (live, remaining.len())
}

/// Why a member cannot be removed now (`shoal cluster remove`). Also a Raft RPC reply.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum RemoveError {
    #[error("no member of the Raft cluster is {0:?} (give a node name or Raft id from `shoal status`)")]
    NotMember(String),
    #[error("{target:?} names more than one member (Raft ids {ids:?}): give the Raft id")]
    Ambiguous { target: String, ids: Vec<NodeId> },
    #[error(
        "node {name} (Raft id {id}) is live in gossip: stop it first (the leader adds a live node back as a learner)"
    )]
    Live { name: String, id: NodeId },
    #[error("removing node {name} (Raft id {id}) would leave {live} live of {remaining} voters: no majority")]
    NoMajority { name: String, id: NodeId, live: usize, remaining: usize },
    /// Retried until the deadline: a change (often the reconciler's) is being committed.
    #[error("a membership change is in progress")]
    InProgress,
    /// Retried until the deadline: no leader known, or the leader changed under the request.
    #[error("no leader: {0}")]
    NoLeader(String),
    #[error("not committed: {0}")]
    Unavailable(String),
}

impl RemoveError {
    /// The admin API's status for this refusal.
    pub fn status(&self) -> u16 {
        match self {
            RemoveError::NotMember(_) => 404,
            RemoveError::Ambiguous { .. } | RemoveError::Live { .. } | RemoveError::NoMajority { .. } => 409,
            RemoveError::InProgress | RemoveError::NoLeader(_) | RemoveError::Unavailable(_) => 503,
        }
    }

    fn transient(&self) -> bool {
        matches!(self, RemoveError::InProgress | RemoveError::NoLeader(_))
    }
}

/// A member the leader may remove now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Removal {
    pub id: NodeId,
    pub name: String,
    pub voter: bool,
}

/// Whether `target` (a member's name or Raft id; `names` maps members to names) may leave the
/// membership now: it must be a member, not live (else the reconciler adds it back), and the
/// voters left must keep a live majority. A leftover joint configuration is finished first.
pub fn removal(target: &str, names: &BTreeMap<NodeId, String>, v: &View) -> Result<Removal, RemoveError> {
    if v.joint.is_some() {
        return Err(RemoveError::InProgress);
    }
    let id = resolve(target, names)?;
    let name = names.get(&id).cloned().unwrap_or_default();
    if id == v.me || v.live.contains_key(&id) {
        return Err(RemoveError::Live { name, id });
    }
    let (live, remaining) = voters_after(v, id);
    if live * 2 <= remaining {
        return Err(RemoveError::NoMajority { name, id, live, remaining });
    }
    Ok(Removal { id, name, voter: v.voters.contains(&id) })
}

/// The member `target` names: its Raft id, else its name (a wiped node that came back has the
/// old name under a new id, so a name can name two members).
fn resolve(target: &str, names: &BTreeMap<NodeId, String>) -> Result<NodeId, RemoveError> {
    if let Ok(id) = target.parse::<NodeId>()
        && names.contains_key(&id)
    {
        return Ok(id);
    }
    let ids: Vec<NodeId> = names.iter().filter(|(_, n)| n.as_str() == target).map(|(id, _)| *id).collect();
    match ids.as_slice() {
        [] => Err(RemoveError::NotMember(target.to_string())),
        [id] => Ok(*id),
        _ => Err(RemoveError::Ambiguous { target: target.to_string(), ids }),
    }
}

fn promotable(v: &View, p: &Policy, id: &NodeId) -> bool {
    let Some((_, live_for)) = v.live.get(id) else { return false };
    let matched = v.matched.get(id).copied().unwrap_or(0);
    *live_for >= p.promote_after && matched + p.max_lag >= v.last_log_index
}

/// Whether this uninitialized node should bootstrap the cluster now, and with whom.
pub fn should_bootstrap(me: NodeId, expect: usize, members: &Members) -> Option<Vec<(NodeId, ShoalNode)>> {
    let live: Vec<_> = members.live().filter(|m| m.raft_id != 0 && !m.raft_addr.is_empty()).collect();
    // Anyone already in a cluster (initialized, or holding an identity) means: join, not found.
    if expect == 0 || live.len() < expect || live.iter().any(|m| m.raft_init || m.cluster_id.is_some()) {
        return None;
    }
    let lowest = live.iter().map(|m| m.raft_id).min()?;
    if lowest != me {
        return None;
    }
    let mut nodes: Vec<(NodeId, ShoalNode)> = live
        .iter()
        .map(|m| {
            (m.raft_id, ShoalNode { name: m.name.clone(), raft_addr: m.raft_addr.clone(), admin: m.admin.clone() })
        })
        .collect();
    nodes.sort_by_key(|(id, _)| *id);
    nodes.truncate(5);
    Some(nodes)
}

/// How often the bootstrap loop looks at gossip.
pub const BOOTSTRAP_TICK: Duration = Duration::from_millis(500);

/// The bootstrap decision over time: [`should_bootstrap`] must name the same voters on two
/// ticks in a row, so views still converging do not make two nodes initialize.
#[derive(Debug, Default)]
pub struct BootstrapGate {
    agreed: Option<Vec<NodeId>>,
}

impl BootstrapGate {
    /// One tick: the voters to initialize with, once agreed (and on every tick after that).
    pub fn tick(&mut self, me: NodeId, expect: usize, members: &Members) -> Option<Vec<(NodeId, ShoalNode)>> {
        let Some(nodes) = should_bootstrap(me, expect, members) else {
            self.agreed = None;
            return None;
        };
        let ids: Vec<NodeId> = nodes.iter().map(|(id, _)| *id).collect();
        if self.agreed.as_ref() != Some(&ids) {
            self.agreed = Some(ids);
            return None;
        }
        Some(nodes)
    }
}

/// Initializes the cluster when the [`BootstrapGate`] opens, then publishes `raft_init=1`.
pub async fn bootstrap(raft: Arc<RaftNode>, gossip: Arc<Gossip>, expect: usize, mut shutdown: Shutdown) {
    let mut tick = tokio::time::interval(BOOTSTRAP_TICK);
    let mut gate = BootstrapGate::default();
    loop {
        tokio::select! {
            _ = shutdown.wait() => return,
            _ = tick.tick() => {}
        }
        if raft.is_initialized().await {
            gossip.set("raft_init", Some("1".into())).await;
            return;
        }
        let members = gossip.members.borrow().clone();
        let Some(nodes) = gate.tick(raft.id, expect, &members) else { continue };
        let names: Vec<&str> = nodes.iter().map(|(_, n)| n.name.as_str()).collect();
        // The identity exists before the first request leaves, so every member adopts it.
        let ident = match raft.ident.get_or_create() {
            Ok(id) => id,
            Err(e) => {
                tracing::warn!(error = %e, "cannot store the cluster identity; not bootstrapping");
                continue;
            }
        };
        tracing::info!(voters = ?names, cluster_id = %ident, "bootstrapping the cluster");
        let map: BTreeMap<NodeId, ShoalNode> = nodes.into_iter().collect();
        if let Err(e) = raft.raft.initialize(map).await {
            tracing::warn!(error = %e, "bootstrap did not happen");
        }
    }
}

/// The leader-only membership loop.
pub async fn reconcile(
    raft: Arc<RaftNode>,
    members: watch::Receiver<Arc<Members>>,
    policy: Policy,
    mut shutdown: Shutdown,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut seen = Seen::default();
    loop {
        tokio::select! {
            _ = shutdown.wait() => return,
            _ = tick.tick() => {}
        }
        adopt_legacy_identity(&raft).await;
        // One change at a time with an operator's removal, each decided on a fresh view.
        let _one_change = raft.membership_change.lock().await;
        let now = Instant::now();
        let view = seen.view(&raft, &members.borrow(), now);
        let Some(view) = view else { continue };
        if let Some(action) = plan(&view, &policy) {
            execute(&raft, action).await;
        }
    }
}

/// A cluster initialized before identities existed has none: its leader creates it, and the
/// followers adopt it from the leader's next append.
async fn adopt_legacy_identity(raft: &RaftNode) {
    if raft.ident.get().is_some() || raft.role() != "leader" || !raft.is_initialized().await {
        return;
    }
    if let Err(e) = raft.ident.get_or_create() {
        tracing::warn!(error = %e, "cannot store the cluster identity");
    }
}

/// Publishes this node's cluster identity in gossip whenever it is created or adopted.
pub async fn publish_identity(raft: Arc<RaftNode>, gossip: Arc<Gossip>, mut shutdown: Shutdown) {
    let mut ident = raft.ident.subscribe();
    loop {
        let current = *ident.borrow_and_update();
        if let Some(id) = current {
            gossip.set("cluster_id", Some(id.to_string())).await;
        }
        tokio::select! {
            _ = shutdown.wait() => return,
            changed = ident.changed() => if changed.is_err() { return },
        }
    }
}

/// Live nodes that gossip an identity other than `ours`.
pub fn foreign(ours: Option<ClusterId>, members: &Members) -> BTreeMap<NodeId, ClusterId> {
    members
        .live()
        .filter(|m| m.raft_id != 0 && !compatible(ours, m.cluster_id))
        .filter_map(|m| Some((m.raft_id, m.cluster_id?)))
        .collect()
}

/// Liveness history the plan needs (since when live, since when absent). Every node keeps
/// one, leader or not, so a new leader already knows how long members have been away.
#[derive(Debug, Default)]
pub struct Seen {
    live_since: HashMap<NodeId, Instant>,
    absent_since: HashMap<NodeId, Instant>,
    /// Foreign nodes already counted (each is counted once, not once per tick).
    foreign_counted: BTreeSet<NodeId>,
}

impl Seen {
    /// The leader's view, or `None` when this node does not lead or a change is in flight.
    fn view(&mut self, raft: &RaftNode, members: &Members, now: Instant) -> Option<View> {
        let metrics = raft.raft.metrics().borrow().clone();
        let ours = raft.ident.get();
        let mut view = self.observe(raft.id, &metrics, members, ours, now)?;
        let foreign = foreign(ours, members);
        self.foreign_counted.retain(|id| foreign.contains_key(id));
        for (id, theirs) in &foreign {
            if let (true, Some(ours)) = (self.foreign_counted.insert(*id), ours) {
                raft.ident.refused(AT_GOSSIP, ours, *theirs);
            }
        }
        view.revoked = revoked_members(raft, &view.voters.union(&view.learners).copied().collect());
        Some(view)
    }

    /// The pure part of [`Seen::view`]: records who gossip shows live now, then, on the leader
    /// only, the view to plan from (without revocations, which need the wire's certificates).
    pub fn observe(
        &mut self,
        me: NodeId,
        metrics: &RaftMetrics<NodeId, ShoalNode>,
        members: &Members,
        ours: Option<ClusterId>,
        now: Instant,
    ) -> Option<View> {
        let live = live_nodes(members);
        self.live_since.retain(|id, _| live.contains_key(id));
        for id in live.keys() {
            self.live_since.entry(*id).or_insert(now);
            self.absent_since.remove(id);
        }
        let membership = metrics.membership_config.membership();
        // Only members are counted absent: a removed node is forgotten until it comes back.
        self.absent_since.retain(|id, _| membership.get_node(id).is_some());
        for id in membership.nodes().map(|(id, _)| *id).filter(|id| !live.contains_key(id)) {
            self.absent_since.entry(id).or_insert(now);
        }
        if metrics.state != openraft::ServerState::Leader {
            return None;
        }
        // Our own changes are awaited before the next plan, so a joint config seen here is a
        // leftover (found by the simulation, seed 3: a leader change mid-change left it forever).
        let configs = membership.get_joint_config();
        let joint = (configs.len() > 1).then(|| configs.last().cloned().unwrap_or_default());
        let matched = metrics
            .replication
            .as_ref()
            .map(|r| r.iter().map(|(id, l)| (*id, l.map(|l| l.index).unwrap_or(0))).collect())
            .unwrap_or_default();
        Some(View {
            me,
            voters: membership.voter_ids().collect(),
            learners: membership.learner_ids().collect(),
            live: live.into_iter().map(|(id, n)| (id, (n, now.duration_since(self.live_since[&id])))).collect(),
            absent: self.absent_since.iter().map(|(id, t)| (*id, now.duration_since(*t))).collect(),
            matched,
            last_log_index: metrics.last_log_index.unwrap_or(0),
            foreign: foreign(ours, members).into_keys().collect(),
            revoked: BTreeSet::new(),
            joint,
        })
    }
}

/// Live nodes that gossip a Raft id and address (the ones the reconciler would add).
fn live_nodes(members: &Members) -> BTreeMap<NodeId, ShoalNode> {
    members
        .live()
        .filter(|m| m.raft_id != 0 && !m.raft_addr.is_empty())
        .map(|m| {
            (m.raft_id, ShoalNode { name: m.name.clone(), raft_addr: m.raft_addr.clone(), admin: m.admin.clone() })
        })
        .collect()
}

/// What the leader knows, with how long nodes have been live (`live`) or absent (`absent`);
/// `None` when this node does not lead.
fn leader_view(
    raft: &RaftNode,
    members: &Members,
    live: BTreeMap<NodeId, (ShoalNode, Duration)>,
    absent: HashMap<NodeId, Duration>,
) -> Option<View> {
    let metrics = raft.raft.metrics().borrow().clone();
    if metrics.state != openraft::ServerState::Leader {
        return None;
    }
    let membership = metrics.membership_config.membership();
    // Our own changes are awaited before the next plan, so a joint config seen here is a
    // leftover (found by the simulation, seed 3: a leader change mid-change left it forever).
    let configs = membership.get_joint_config();
    let joint = (configs.len() > 1).then(|| configs.last().cloned().unwrap_or_default());
    let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
    let learners: BTreeSet<NodeId> = membership.learner_ids().collect();
    let matched = metrics
        .replication
        .as_ref()
        .map(|r| r.iter().map(|(id, l)| (*id, l.map(|l| l.index).unwrap_or(0))).collect())
        .unwrap_or_default();
    let revoked = revoked_members(raft, &voters.union(&learners).copied().collect());
    Some(View {
        me: raft.id,
        voters,
        learners,
        live,
        absent,
        matched,
        last_log_index: metrics.last_log_index.unwrap_or(0),
        foreign: foreign(raft.ident.get(), members).into_keys().collect(),
        revoked,
        joint,
    })
}

/// How long an operator's removal may take, retries included, before it answers 503.
const REMOVE_DEADLINE: Duration = Duration::from_secs(15);
/// How long the leader waits for a removal to commit.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(10);

/// Removes the member `target` names (name or Raft id) through the leader, wherever it is;
/// returns once the change is committed (and this node has seen it). `members` is this node's
/// gossip view, used when this node leads.
pub async fn remove(
    raft: &RaftNode,
    members: impl Fn() -> Arc<Members>,
    target: &str,
) -> Result<RemovedNode, RemoveError> {
    let deadline = Instant::now() + REMOVE_DEADLINE;
    loop {
        let leader = {
            let m = raft.raft.metrics();
            let m = m.borrow();
            m.current_leader.map(|id| (id, m.membership_config.membership().get_node(&id).cloned()))
        };
        let attempt = match leader {
            Some((id, _)) if id == raft.id => remove_as_leader(raft, &members(), target).await,
            Some((id, Some(node))) => forward_remove(raft, id, node, target).await,
            _ => Err(RemoveError::NoLeader("election in progress".into())),
        };
        match attempt {
            Ok(removed) => {
                wait_gone(raft, removed.raft_id).await;
                return Ok(removed);
            }
            Err(e) if e.transient() && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(e) if e.transient() => {
                return Err(RemoveError::Unavailable(format!("not done within {REMOVE_DEADLINE:?}: {e}")));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Decides and commits a removal on this node, which must lead.
pub async fn remove_as_leader(raft: &RaftNode, members: &Members, target: &str) -> Result<RemovedNode, RemoveError> {
    let _one_change = raft.membership_change.lock().await;
    let live = live_nodes(members).into_iter().map(|(id, n)| (id, (n, Duration::ZERO))).collect();
    let view = leader_view(raft, members, live, HashMap::new())
        .ok_or_else(|| RemoveError::NoLeader("this node no longer leads".into()))?;
    let names: BTreeMap<NodeId, String> = {
        let m = raft.raft.metrics();
        let m = m.borrow();
        m.membership_config.membership().nodes().map(|(id, n)| (*id, n.name.clone())).collect()
    };
    let r = removal(target, &names, &view)?;
    tracing::info!(node = %r.name, raft_id = r.id, voter = r.voter, "removing a member at an operator's request");
    let change =
        if r.voter { ChangeMembers::RemoveVoters([r.id].into()) } else { ChangeMembers::RemoveNodes([r.id].into()) };
    let resp = match tokio::time::timeout(CHANGE_TIMEOUT, raft.raft.change_membership(change, false)).await {
        Ok(Ok(resp)) => resp,
        Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_)))) => {
            return Err(RemoveError::NoLeader("leadership moved during the change".into()));
        }
        Ok(Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(ChangeMembershipError::InProgress(_))))) => {
            return Err(RemoveError::InProgress);
        }
        Ok(Err(e)) => return Err(RemoveError::Unavailable(e.to_string())),
        Err(_) => {
            return Err(RemoveError::Unavailable(format!(
                "not committed within {CHANGE_TIMEOUT:?}; the removal may still take effect"
            )));
        }
    };
    let after = resp.membership.unwrap_or_default();
    let name_of = |id: NodeId| after.get_node(&id).map(|n| n.name.clone()).unwrap_or_else(|| id.to_string());
    Ok(RemovedNode {
        node: r.name,
        raft_id: r.id,
        voter: r.voter,
        voters: after.voter_ids().map(name_of).collect(),
        learners: after.learner_ids().map(name_of).collect(),
    })
}

/// Asks the leader to remove `target` (the Raft port, as forwarded writes).
async fn forward_remove(
    raft: &RaftNode,
    leader: NodeId,
    node: ShoalNode,
    target: &str,
) -> Result<RemovedNode, RemoveError> {
    let mut conn = Conn::new(raft.wire.clone(), leader, node.clone());
    match conn.call(Request::Remove(target.to_string()), CHANGE_TIMEOUT + Duration::from_secs(2)).await {
        Ok(Reply::Remove(result)) => result,
        Ok(Reply::Refused(why)) => Err(RemoveError::NoLeader(format!("{node} refused: {why}"))),
        Ok(_) => Err(RemoveError::Unavailable(format!("{node} answered something else (an older version?)"))),
        // Retried: when a reply was lost after the leader committed, the retry answers 404.
        Err(e) => Err(RemoveError::NoLeader(format!("forwarding to {node}: {e}"))),
    }
}

/// Waits (bounded) until this node's membership no longer holds `id`, so a `shoal status`
/// asked here right after the removal shows it.
async fn wait_gone(raft: &RaftNode, id: NodeId) {
    let mut metrics = raft.raft.metrics();
    let gone = metrics.wait_for(|m| m.membership_config.membership().get_node(&id).is_none());
    let _ = tokio::time::timeout(Duration::from_secs(5), gone).await;
}

/// Members whose certificate, as they last presented it to this node, the deny list holds.
/// Others need no entry: admitting a node dials it first, and that refuses a revoked one (a
/// node back with a new certificate is admitted again).
fn revoked_members(raft: &RaftNode, members: &BTreeSet<NodeId>) -> BTreeSet<NodeId> {
    let state = raft.current();
    let seen = raft.wire.seen_serials();
    let revoked = |id: &NodeId| seen.get(id).is_some_and(|s| state.revoked_certs.contains_key(s));
    members.iter().copied().filter(revoked).collect()
}

/// Admits a node gossip announced only after it proved its certificate (naming the node
/// gossip announced) on a mutual-TLS Raft connection and answered with the id it announced
/// and no other cluster's identity.
async fn verified(raft: &RaftNode, id: NodeId, node: &ShoalNode) -> bool {
    let mut conn = Conn::new(raft.wire.clone(), id, node.clone());
    match conn.call(Request::Ping, Duration::from_secs(3)).await {
        Ok(Reply::Pong(answered, theirs)) if answered == id => match (raft.ident.get(), theirs) {
            (Some(ours), Some(theirs)) if ours != theirs => {
                raft.ident.refused(AT_PING, ours, theirs);
                false
            }
            _ => true,
        },
        other => {
            tracing::warn!(node = %node, ?other, "not admitting a gossiped node that failed Raft authentication");
            false
        }
    }
}

async fn execute(raft: &RaftNode, action: Action) {
    if let Action::AddLearner(id, node) = &action
        && !verified(raft, *id, node).await
    {
        return;
    }
    tracing::info!(?action, "membership change");
    let r = &raft.raft;
    let fut = async {
        match action.clone() {
            Action::AddLearner(id, node) => r.add_learner(id, node, false).await.map(|_| ()).map_err(|e| e.to_string()),
            Action::Promote(id) => r
                .change_membership(ChangeMembers::AddVoterIds([id].into()), false)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
            Action::RemoveVoter(id) => r
                .change_membership(ChangeMembers::RemoveVoters([id].into()), false)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
            Action::RemoveLearner(id) => r
                .change_membership(ChangeMembers::RemoveNodes([id].into()), false)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
            Action::FinishJoint(goal) => r
                .change_membership(ChangeMembers::ReplaceAllVoters(goal), false)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
        }
    };
    match tokio::time::timeout(Duration::from_secs(10), fut).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(?action, error = %e, "membership change failed"),
        Err(_) => tracing::warn!(?action, "membership change timed out"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::control::gossip::Member;

    fn node(id: u64) -> ShoalNode {
        ShoalNode { name: format!("n{id}"), raft_addr: format!("127.0.0.{id}:7946"), admin: String::new() }
    }

    fn view(voters: &[u64], learners: &[u64], live: &[u64]) -> View {
        View {
            me: 1,
            voters: voters.iter().copied().collect(),
            learners: learners.iter().copied().collect(),
            live: live.iter().map(|id| (*id, (node(*id), Duration::from_secs(60)))).collect(),
            absent: HashMap::new(),
            matched: live.iter().map(|id| (*id, 10)).collect(),
            last_log_index: 10,
            foreign: BTreeSet::new(),
            revoked: BTreeSet::new(),
            joint: None,
        }
    }

    #[test]
    fn new_nodes_join_as_learners_then_voters_up_to_an_odd_count() {
        let p = Policy::default();
        assert_eq!(plan(&view(&[1, 2, 3], &[], &[1, 2, 3, 4]), &p), Some(Action::AddLearner(4, node(4))));
        assert_eq!(plan(&view(&[1, 2, 3], &[4], &[1, 2, 3, 4]), &p), None, "4 live: 3 voters, 1 learner");
        assert_eq!(plan(&view(&[1, 2, 3], &[4, 5], &[1, 2, 3, 4, 5]), &p), Some(Action::Promote(4)));
        assert_eq!(plan(&view(&[1, 2, 3, 4, 5], &[6, 7], &[1, 2, 3, 4, 5, 6, 7]), &p), None, "at most 5 voters");
    }

    #[test]
    fn lagging_or_fresh_learners_wait() {
        let p = Policy::default();
        let mut v = view(&[1], &[2], &[1, 2]);
        v.learners.insert(3);
        v.live.insert(3, (node(3), Duration::from_secs(60)));
        v.matched.insert(2, 0);
        v.last_log_index = 1000;
        v.matched.insert(3, 1000);
        assert_eq!(plan(&v, &p), Some(Action::Promote(3)), "2 lags, 3 is caught up");
        v.live.insert(3, (node(3), Duration::from_millis(100)));
        assert_eq!(plan(&v, &p), None, "3 only just appeared");
    }

    #[test]
    fn dead_voters_go_only_while_a_live_majority_remains() {
        let p = Policy { dead_grace: Duration::from_secs(120), ..Policy::default() };
        let mut v = view(&[1, 2, 3], &[], &[1, 2]);
        v.absent.insert(3, Duration::from_secs(30));
        assert_eq!(plan(&v, &p), None, "grace not over");
        v.absent.insert(3, Duration::from_secs(121));
        assert_eq!(plan(&v, &p), Some(Action::RemoveVoter(3)));
        let mut v = view(&[1, 2, 3], &[], &[1]);
        v.absent.insert(2, Duration::from_secs(500));
        v.absent.insert(3, Duration::from_secs(500));
        assert_eq!(plan(&v, &p), None, "removing 2 would leave {{1, 3}} with one live voter");
        let mut v = view(&[1, 2, 3], &[4], &[1, 2, 3]);
        v.absent.insert(4, Duration::from_secs(500));
        assert_eq!(plan(&v, &p), Some(Action::RemoveLearner(4)));
    }

    fn member(id: u64, init: bool) -> Member {
        Member {
            name: format!("n{id}"),
            raft_id: id,
            raft_addr: format!("a{id}"),
            live: true,
            raft_init: init,
            ..Member::default()
        }
    }

    #[test]
    fn only_the_lowest_id_bootstraps_and_only_once() {
        let mut ms = Members::default();
        for id in [5, 3, 9] {
            ms.nodes.insert(format!("n{id}"), member(id, false));
        }
        assert_eq!(should_bootstrap(3, 3, &ms).map(|n| n.len()), Some(3));
        assert_eq!(should_bootstrap(5, 3, &ms), None);
        assert_eq!(should_bootstrap(3, 4, &ms), None, "not enough nodes yet");
        ms.nodes.insert("n9".into(), member(9, true));
        assert_eq!(should_bootstrap(3, 3, &ms), None, "a cluster already exists");
        let mut adopted = member(9, false);
        adopted.cluster_id = Some(ClusterId(5));
        ms.nodes.insert("n9".into(), adopted);
        assert_eq!(should_bootstrap(3, 3, &ms), None, "a node with an identity: join its cluster instead");
    }

    #[test]
    fn the_gate_opens_only_when_two_ticks_in_a_row_name_the_same_voters() {
        let mut ms = Members::default();
        for id in [1, 2, 3] {
            ms.nodes.insert(format!("n{id}"), member(id, false));
        }
        let mut gate = BootstrapGate::default();
        assert_eq!(gate.tick(1, 3, &ms), None, "first sighting");
        ms.nodes.insert("n4".into(), member(4, false));
        assert_eq!(gate.tick(1, 3, &ms), None, "the set changed: start over");
        assert_eq!(gate.tick(1, 3, &ms).map(|n| n.len()), Some(4));
        assert_eq!(gate.tick(1, 3, &ms).map(|n| n.len()), Some(4), "stays open, so a failed initialize is retried");
        ms.nodes.insert("n4".into(), member(4, true));
        assert_eq!(gate.tick(1, 3, &ms), None, "a cluster appeared");
        ms.nodes.insert("n4".into(), member(4, false));
        assert_eq!(gate.tick(1, 3, &ms), None, "and agreement starts over");
    }

    #[test]
    fn nodes_of_another_cluster_are_never_added_and_foreign_learners_leave() {
        let p = Policy::default();
        let mut v = view(&[1, 2, 3], &[], &[1, 2, 3, 4, 5]);
        v.foreign.insert(4);
        assert_eq!(plan(&v, &p), Some(Action::AddLearner(5, node(5))), "4 is skipped, 5 has no identity yet");
        v.foreign.insert(5);
        assert_eq!(plan(&v, &p), None);
        v.learners.insert(5);
        assert_eq!(plan(&v, &p), Some(Action::RemoveLearner(5)), "a learner that belongs elsewhere goes");
    }

    #[test]
    fn revoked_nodes_are_not_added_and_members_leave_while_a_majority_stays() {
        let p = Policy::default();
        let mut v = view(&[1, 2, 3], &[4], &[1, 2, 3, 4, 5]);
        v.revoked.extend([4, 5]);
        assert_eq!(plan(&v, &p), Some(Action::RemoveLearner(4)), "a revoked learner goes");
        v.learners.clear();
        assert_eq!(plan(&v, &p), None, "5 is never added");
        v.revoked.insert(3);
        assert_eq!(plan(&v, &p), Some(Action::RemoveVoter(3)), "a revoked voter goes without a grace period");
        v.revoked.insert(2);
        assert_eq!(plan(&v, &p), None, "not while removing it would leave no live majority");
    }

    #[test]
    fn foreign_means_another_identity_not_none() {
        let mut ms = Members::default();
        for (id, cid) in [(1, Some(7)), (2, Some(8)), (3, None)] {
            let mut m = member(id, true);
            m.cluster_id = cid.map(ClusterId);
            ms.nodes.insert(format!("n{id}"), m);
        }
        assert_eq!(foreign(Some(ClusterId(7)), &ms), BTreeMap::from([(2, ClusterId(8))]));
        assert!(foreign(None, &ms).is_empty(), "a node without identity refuses nobody");
    }

    fn names(ids: &[u64]) -> BTreeMap<NodeId, String> {
        ids.iter().map(|id| (*id, format!("n{id}"))).collect()
    }

    #[test]
    fn only_a_member_that_is_not_live_is_removed_and_by_name_or_id() {
        let v = view(&[1, 2, 3], &[4], &[1, 2, 4]);
        let all = names(&[1, 2, 3, 4]);
        let three = Removal { id: 3, name: "n3".into(), voter: true };
        assert_eq!(removal("n3", &all, &v), Ok(three.clone()));
        assert_eq!(removal("3", &all, &v), Ok(three), "by Raft id");
        assert_eq!(removal("n9", &all, &v), Err(RemoveError::NotMember("n9".into())));
        assert_eq!(removal("9", &all, &v), Err(RemoveError::NotMember("9".into())));
        assert_eq!(removal("n2", &all, &v), Err(RemoveError::Live { name: "n2".into(), id: 2 }), "stop it first");
        assert_eq!(removal("n4", &all, &v), Err(RemoveError::Live { name: "n4".into(), id: 4 }), "a live learner too");
        assert!(matches!(removal("n1", &all, &v), Err(RemoveError::Live { id: 1, .. })), "the leader itself");
        let v = view(&[1, 2, 3], &[4], &[1, 2]);
        assert_eq!(removal("n4", &all, &v), Ok(Removal { id: 4, name: "n4".into(), voter: false }), "a dead learner");
    }

    #[test]
    fn a_removal_keeps_a_live_majority_of_the_voters_left() {
        let all = names(&[1, 2, 3, 4, 5]);
        let v = view(&[1, 2, 3], &[], &[1]);
        assert_eq!(
            removal("n3", &all, &v),
            Err(RemoveError::NoMajority { name: "n3".into(), id: 3, live: 1, remaining: 2 }),
            "{{1, 2}} with only 1 live cannot commit"
        );
        let v = view(&[1, 2, 3, 4, 5], &[], &[1, 2, 3]);
        assert!(removal("n5", &all, &v).is_ok(), "5 voters, 3 live: 3 of 4 remain live");
        let v = view(&[1, 2, 3, 4, 5], &[], &[1, 2]);
        assert!(matches!(removal("n5", &all, &v), Err(RemoveError::NoMajority { live: 2, remaining: 4, .. })));
        let mut v = view(&[1, 2, 3], &[4], &[1]);
        v.voters.remove(&3);
        assert!(
            matches!(removal("n4", &all, &v), Err(RemoveError::NoMajority { .. })),
            "a learner needs a live quorum too"
        );
    }

    #[test]
    fn a_name_of_two_members_needs_the_raft_id_and_joint_configs_wait() {
        let mut all = names(&[1, 2, 3]);
        all.insert(7, "n3".into());
        let v = view(&[1, 2, 3, 7], &[], &[1, 2, 7]);
        assert_eq!(removal("n3", &all, &v), Err(RemoveError::Ambiguous { target: "n3".into(), ids: vec![3, 7] }));
        assert_eq!(removal("3", &all, &v).map(|r| r.id), Ok(3), "the wiped node's old id");
        let v = View { joint: Some([1, 2].into()), ..view(&[1, 2, 3], &[], &[1, 2]) };
        assert_eq!(removal("3", &names(&[1, 2, 3]), &v), Err(RemoveError::InProgress));
        assert!(RemoveError::InProgress.transient() && !RemoveError::NotMember(String::new()).transient());
        assert_eq!(RemoveError::Live { name: String::new(), id: 1 }.status(), 409);
        assert_eq!(RemoveError::NotMember(String::new()).status(), 404);
    }

    #[test]
    fn the_reconciler_leaves_a_removed_node_out_until_it_is_live_again() {
        let p = Policy::default();
        // n3 was removed while dead: nothing brings it back.
        let mut v = view(&[1, 2], &[], &[1, 2]);
        v.absent.insert(3, Duration::from_secs(5));
        assert_eq!(plan(&v, &p), None);
        // Started again, it is live: it joins as a learner, as a new node would.
        let v = view(&[1, 2], &[], &[1, 2, 3]);
        assert_eq!(plan(&v, &p), Some(Action::AddLearner(3, node(3))));
    }

    #[test]
    fn a_leftover_joint_config_is_finished_before_anything_else() {
        let goal: BTreeSet<NodeId> = [2, 3, 4, 5].into();
        let v = View { me: 2, voters: [1, 2, 3, 4, 5].into(), joint: Some(goal.clone()), ..View::default() };
        assert_eq!(plan(&v, &Policy::default()), Some(Action::FinishJoint(goal)));
    }
}
