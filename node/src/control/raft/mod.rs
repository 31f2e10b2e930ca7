//! Raft (openraft 0.9) holds desired state: every admin write is a `Command` proposed here,
//! forwarded to the leader when this node does not lead, and applied by the same pure `apply`
//! on every node. The log, vote and snapshots live in redb under `--data-dir/raft`.

pub mod channel;
pub mod ident;
pub mod network;
pub mod quorum;
pub mod rt;
pub mod server;
pub mod state_machine;
pub mod store;

use std::collections::BTreeMap;
use std::io::Cursor;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use openraft::error::{CheckIsLeaderError, ClientWriteError, Fatal, RaftError};
use openraft::{Config, RaftMetrics, ServerState, SnapshotPolicy};
use serde::{Deserialize, Serialize};
use shoal_proto::{Applied, ApplyError, Command, Proposal, State};
use tokio::sync::watch;
use tokio::time::Instant;

use self::ident::Identity;
use self::network::{CallError, Conn, LinkFilter, Network, Reply, Request, Wire};
use self::state_machine::StateMachine;
use self::store::{Db, LogStore};
use super::ProposeError;
use channel::RaftTls;

pub type NodeId = u64;

/// The result every applied command yields.
pub type CommandResult = Result<Applied, ApplyError>;

/// What Raft membership knows about a node: enough to reach and to name it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShoalNode {
    pub name: String,
    /// TCP address of the node's Raft RPC server (its `--cluster` address).
    pub raft_addr: String,
    pub admin: String,
}

impl std::fmt::Display for ShoalNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.name, self.raft_addr)
    }
}

openraft::declare_raft_types!(
    pub TypeConfig:
        D = Proposal,
        R = CommandResult,
        NodeId = NodeId,
        Node = ShoalNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        // tokio; a seam lets the simulation seed the election-timeout draw.
        AsyncRuntime = rt::ShoalRt,
);

pub type Raft = openraft::Raft<TypeConfig>;

/// Raft timing; tests shorten it.
#[derive(Clone, Debug)]
pub struct RaftTiming {
    pub heartbeat: Duration,
    pub election_min: Duration,
    pub election_max: Duration,
}

impl RaftTiming {
    /// Timing from a heartbeat and a minimum election timeout. openraft's leader lease is the
    /// maximum election timeout: a voter refuses every candidate until that long after the
    /// leader's last heartbeat. With a wide range (max = 2 × min) the first candidate usually
    /// asks too early, is refused, and waits a second timeout, so a failover took 2.3–3.1 s.
    /// Since the first attempt is refused anyway, a new leader comes with the second, after
    /// two timeouts: a range of min to 1.5 × min keeps them short and spread enough that the
    /// two survivors of three rarely ask at once (a split vote costs one more timeout).
    pub fn new(heartbeat: Duration, election_min: Duration) -> RaftTiming {
        let election_min = election_min.max(heartbeat + Duration::from_millis(1));
        RaftTiming { heartbeat, election_min, election_max: election_min * 3 / 2 }
    }
}

impl Default for RaftTiming {
    /// Four missed heartbeats before a candidate asks: a new leader about 0.8–1.2 s after the
    /// leader dies (1.2–1.8 s after a split vote).
    fn default() -> Self {
        RaftTiming::new(Duration::from_millis(100), Duration::from_millis(400))
    }
}

/// Who a node talks Raft with: the cluster's name, this node's certificate, and the test seam.
#[derive(Clone, Default)]
pub struct RaftNet {
    pub cluster: String,
    /// `None` for a node alone (it never talks to peers).
    pub tls: Option<Arc<RaftTls>>,
    pub filter: Option<LinkFilter>,
    /// Where cluster identity mismatches are counted (`shoal_cluster_id_mismatch_total`).
    pub mismatches: Option<prometheus::IntCounterVec>,
}

/// How long a write may take before the client gets a 503.
const WRITE_DEADLINE: Duration = Duration::from_secs(10);
/// Per-RPC timeout of forwarded writes and read-index requests.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a follower waits to apply what the leader committed for it.
const CATCH_UP: Duration = Duration::from_secs(5);

/// A running Raft member.
pub struct RaftNode {
    pub id: NodeId,
    pub me: ShoalNode,
    pub raft: Raft,
    pub sm: StateMachine,
    pub wire: Wire,
    /// This cluster's identity (created at initialization or adopted from the leader).
    pub ident: Identity,
    /// Held while a leader decides and makes a membership change (the reconciler's or an
    /// operator's), so each is decided on the membership the previous one left.
    pub membership_change: tokio::sync::Mutex<()>,
    /// Set by [`RaftNode::shutdown`]: the core's stop was asked for, not a failure.
    stop_requested: Arc<AtomicBool>,
}

const STEPPING_DOWN: &str = "the leader has lost contact with a quorum and is stepping down";

/// Why a write or a read index could not be had from the leader. A forwarded request's
/// error crosses the wire as its text (`Reply::Write`, `Reply::ReadIndex`).
#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("{STEPPING_DOWN}")]
    SteppingDown,
    #[error(transparent)]
    Write(Box<RaftError<NodeId, ClientWriteError<NodeId, ShoalNode>>>),
    #[error(transparent)]
    Read(Box<RaftError<NodeId, CheckIsLeaderError<NodeId, ShoalNode>>>),
    #[error("no leader known")]
    NoLeader,
    /// The leader's own error, as its text arrived.
    #[error("{0}")]
    Remote(String),
    #[error("unexpected reply")]
    UnexpectedReply,
    #[error(transparent)]
    Call(#[from] CallError),
}

/// Reads the node's stable Raft id, creating a random one on first boot.
pub fn load_or_create_id(dir: &Path) -> anyhow::Result<NodeId> {
    let path = dir.join("node_id");
    if let Ok(text) = std::fs::read_to_string(&path) {
        return text.trim().parse().map_err(|_| anyhow::anyhow!("{} is corrupt", path.display()));
    }
    // Never 0: openraft treats 0 as "no node" in some displays, and metrics use 0 for "none".
    let id = rand::random::<u64>() >> 1 | 1;
    // Atomic: a crash mid-write must not leave an empty or torn id (a corrupt data dir).
    crate::files::write_atomic(&path, id.to_string().as_bytes(), 0o644)?;
    Ok(id)
}

/// openraft's configuration for a shoal node (the simulation uses the same).
pub fn raft_config(cluster: &str, timing: &RaftTiming) -> anyhow::Result<Config> {
    let config = Config {
        cluster_name: cluster.to_string(),
        heartbeat_interval: timing.heartbeat.as_millis() as u64,
        election_timeout_min: timing.election_min.as_millis() as u64,
        election_timeout_max: timing.election_max.as_millis() as u64,
        install_snapshot_timeout: 10_000,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(500),
        max_in_snapshot_log_to_keep: 500,
        snapshot_max_chunk_size: 1024 * 1024,
        ..Config::default()
    };
    Ok(config.validate()?)
}

impl RaftNode {
    /// Opens storage under `dir` and starts the Raft core.
    pub async fn start(dir: &Path, me: ShoalNode, net: RaftNet, timing: &RaftTiming) -> anyhow::Result<RaftNode> {
        let RaftNet { cluster, tls, filter, mismatches } = net;
        let cluster = cluster.as_str();
        let storage = || format!("Raft storage in {}", dir.display());
        std::fs::create_dir_all(dir).with_context(storage)?;
        let id = load_or_create_id(dir).with_context(storage)?;
        let db = Db::open_waiting(&dir.join("raft.redb"), std::time::Duration::from_secs(10)).await?;
        let sm = StateMachine::open(db.clone()).with_context(storage)?;
        let ident = Identity::open(db.clone(), mismatches).with_context(storage)?;
        let config = raft_config(cluster, timing)?;
        let wire = Wire {
            cluster: cluster.to_string(),
            me: id,
            filter,
            tls,
            ident: ident.clone(),
            state: sm.subscribe(),
            seen: Arc::default(),
            stepping_down: quorum::SteppingDown::default(),
        };
        let network = Network { wire: wire.clone() };
        let raft =
            Raft::new(id, Arc::new(config), network, LogStore::new(db), sm.clone()).await.with_context(storage)?;
        Ok(RaftNode {
            id,
            me,
            raft,
            sm,
            wire,
            ident,
            membership_change: tokio::sync::Mutex::new(()),
            stop_requested: Arc::default(),
        })
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<State>> {
        self.sm.subscribe()
    }

    pub fn current(&self) -> Arc<State> {
        self.sm.current()
    }

    pub async fn is_initialized(&self) -> bool {
        self.raft.is_initialized().await.unwrap_or(false)
    }

    /// Makes this node a one-member cluster (bootstrap). Already initialized is fine.
    pub async fn initialize_alone(&self) -> anyhow::Result<()> {
        self.ident.get_or_create().map_err(|e| anyhow::anyhow!("cannot store the cluster identity: {e}"))?;
        if self.is_initialized().await {
            return Ok(());
        }
        match self.raft.initialize(BTreeMap::from([(self.id, self.me.clone())])).await {
            Ok(()) => Ok(()),
            Err(RaftError::APIError(openraft::error::InitializeError::NotAllowed(_))) => Ok(()),
            Err(e) => Err(anyhow::anyhow!("cannot initialize the cluster: {e}")),
        }
    }

    /// Proposes `cmd` wherever the leader is; returns once this node has applied it.
    /// Every retry carries the same proposal id, so the write applies at most once.
    pub async fn propose(&self, cmd: Command) -> Result<Applied, ProposeError> {
        let deadline = Instant::now() + WRITE_DEADLINE;
        let cmd = Proposal { id: rand::random::<u64>() | 1, cmd };
        loop {
            // A leader that lost its quorum waits for a higher term inside `client_write`;
            // the deadline bounds every attempt, not only the pauses between them.
            let attempt = tokio::time::timeout_at(deadline, self.try_propose(&cmd)).await;
            let Ok(attempt) = attempt else {
                return Err(ProposeError::Unavailable(format!(
                    "not committed within {WRITE_DEADLINE:?}; the write may still take effect if this node regains a quorum"
                )));
            };
            match attempt {
                Attempt::Done(result) => return result.map_err(ProposeError::Refused),
                Attempt::Fatal(why) => return Err(ProposeError::Unavailable(why)),
                Attempt::Retry(why) if Instant::now() >= deadline => {
                    return Err(ProposeError::Unavailable(format!(
                        "no leader accepted the write within {WRITE_DEADLINE:?}: {why}"
                    )));
                }
                Attempt::Retry(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    async fn try_propose(&self, cmd: &Proposal) -> Attempt {
        if self.wire.stepping_down.get() {
            return Attempt::Retry(STEPPING_DOWN.into());
        }
        match self.raft.client_write(cmd.clone()).await {
            Ok(resp) => Attempt::Done(resp.data),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => match (f.leader_id, f.leader_node) {
                (Some(leader), Some(node)) if leader != self.id => self.forward_write(leader, node, cmd).await,
                _ => Attempt::Retry("no leader known (election in progress)".into()),
            },
            Err(RaftError::APIError(e)) => Attempt::Fatal(e.to_string()),
            Err(RaftError::Fatal(e)) => Attempt::Fatal(format!("raft stopped: {e}")),
        }
    }

    async fn forward_write(&self, leader: NodeId, node: ShoalNode, cmd: &Proposal) -> Attempt {
        let mut conn = Conn::new(self.wire.clone(), leader, node.clone());
        match conn.call(Request::Write(cmd.clone()), FORWARD_TIMEOUT).await {
            Ok(Reply::Write(Ok((result, index)))) => {
                // Read-your-writes: answer once this node has applied the entry too.
                if self.wait_applied(index).await.is_err() {
                    tracing::warn!(index, "write committed by the leader but not yet applied here");
                }
                Attempt::Done(result)
            }
            Ok(Reply::Write(Err(why))) => Attempt::Retry(why),
            Ok(other) => Attempt::Retry(format!("unexpected reply {other:?}")),
            Err(e) => Attempt::Retry(format!("forwarding to {node}: {e}")),
        }
    }

    /// Runs a forwarded write on this node, which must be the leader.
    pub async fn write_as_leader(&self, cmd: Proposal) -> Result<(CommandResult, u64), LeaderError> {
        if self.wire.stepping_down.get() {
            return Err(LeaderError::SteppingDown);
        }
        match self.raft.client_write(cmd).await {
            Ok(resp) => Ok((resp.data, resp.log_id.index)),
            Err(e) => Err(LeaderError::Write(Box::new(e))),
        }
    }

    /// Confirms leadership with a quorum; returns the index a linearizable read waits for.
    pub async fn read_index_as_leader(&self) -> Result<u64, LeaderError> {
        match self.raft.ensure_linearizable().await {
            Ok(log_id) => Ok(log_id.map(|l| l.index).unwrap_or(0)),
            Err(e) => Err(LeaderError::Read(Box::new(e))),
        }
    }

    /// Waits until this node has applied everything committed before the call (`?consistent=true`).
    pub async fn linearize(&self) -> Result<(), ProposeError> {
        let deadline = Instant::now() + WRITE_DEADLINE;
        loop {
            let index = match self.raft.ensure_linearizable().await {
                Ok(log_id) => Ok(log_id.map(|l| l.index).unwrap_or(0)),
                Err(e) => match e.forward_to_leader::<ShoalNode>() {
                    Some(f) => match (f.leader_id, &f.leader_node) {
                        (Some(id), Some(node)) if id != self.id => self.remote_read_index(id, node).await,
                        _ => Err(LeaderError::NoLeader),
                    },
                    None => Err(LeaderError::Read(Box::new(e))),
                },
            };
            match index {
                Ok(i) => return self.wait_applied(i).await,
                Err(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(100)).await,
                Err(why) => return Err(ProposeError::Unavailable(format!("no linearizable read possible: {why}"))),
            }
        }
    }

    async fn remote_read_index(&self, leader: NodeId, node: &ShoalNode) -> Result<u64, LeaderError> {
        let mut conn = Conn::new(self.wire.clone(), leader, node.clone());
        match conn.call(Request::ReadIndex, FORWARD_TIMEOUT).await {
            Ok(Reply::ReadIndex(r)) => r.map_err(LeaderError::Remote),
            Ok(_) => Err(LeaderError::UnexpectedReply),
            Err(e) => Err(e.into()),
        }
    }

    /// Waits (bounded) until the local state machine has applied `index`.
    async fn wait_applied(&self, index: u64) -> Result<(), ProposeError> {
        let mut applied = self.sm.applied();
        let reached = tokio::time::timeout(CATCH_UP, applied.wait_for(|a| *a >= index)).await;
        match reached {
            Ok(Ok(_)) => Ok(()),
            _ => Err(ProposeError::Unavailable(format!("this node has not applied index {index} yet"))),
        }
    }

    /// This node's role as shown to operators.
    pub fn role(&self) -> &'static str {
        let m = self.raft.metrics();
        let m = m.borrow();
        match m.state {
            ServerState::Leader => "leader",
            ServerState::Candidate => "candidate",
            ServerState::Follower => "follower",
            ServerState::Learner => "learner",
            ServerState::Shutdown => "shutdown",
        }
    }

    /// Wakes on every change of Raft's metrics (leader, commit, apply).
    pub fn metrics(&self) -> watch::Receiver<openraft::RaftMetrics<NodeId, ShoalNode>> {
        self.raft.metrics()
    }

    /// Raft facts for operators and metrics.
    pub async fn status(&self) -> RaftStatus {
        let m = self.raft.metrics().borrow().clone();
        let committed = self.raft.with_raft_state(|st| st.committed.map(|l| l.index)).await.ok().flatten();
        let membership = m.membership_config.membership();
        RaftStatus {
            term: m.current_term,
            leader: m.current_leader,
            committed: committed.unwrap_or(0),
            applied: m.last_applied.map(|l| l.index).unwrap_or(0),
            voters: membership.voter_ids().collect(),
            learners: membership.learner_ids().collect(),
            nodes: membership.nodes().map(|(id, n)| (*id, n.clone())).collect(),
        }
    }

    pub async fn shutdown(&self) {
        self.stop_requested.store(true, Ordering::SeqCst);
        let _ = self.raft.shutdown().await;
    }

    /// Resolves if the Raft core stops without [`RaftNode::shutdown`] having asked: a storage
    /// error (openraft stops at the first one) or a panic. The node must not go on without its
    /// control plane; `cli` exits the process.
    pub fn failure(&self) -> impl Future<Output = CoreFailure> + Send + 'static {
        let requested = self.stop_requested.clone();
        watch_core(self.raft.metrics(), move || requested.load(Ordering::SeqCst))
    }
}

/// Why the Raft core stopped when nobody asked it to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CoreFailure {
    /// Storage failed (a full disk, an I/O error): after a failed write or fsync, what the
    /// node holds in memory may not be what it stored.
    Storage(String),
    /// The core panicked or ended for another reason.
    Stopped(String),
}

impl std::fmt::Display for CoreFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CoreFailure::Storage(e) => write!(f, "raft storage failed: {e}"),
            CoreFailure::Stopped(e) => write!(f, "raft stopped: {e}"),
        }
    }
}

/// What a stopped core means: `running` is its metrics' `running_state`, `gone` says its task
/// ended (the metrics sender was dropped, as on a panic), `requested` that a shutdown asked for
/// it. `None` while the core runs, and for a stop that was asked for.
pub fn unexpected_stop(running: &Result<(), Fatal<NodeId>>, gone: bool, requested: bool) -> Option<CoreFailure> {
    if requested {
        return None;
    }
    match running {
        Err(Fatal::StorageError(e)) => Some(CoreFailure::Storage(e.to_string())),
        Err(Fatal::Panicked) => Some(CoreFailure::Stopped("the Raft core panicked".into())),
        Err(Fatal::Stopped) => Some(CoreFailure::Stopped("the Raft core stopped unasked".into())),
        Ok(()) if gone => Some(CoreFailure::Stopped("the Raft core ended".into())),
        Ok(()) => None,
    }
}

/// Watches the core's metrics until [`unexpected_stop`] finds a failure; a requested stop
/// leaves it pending forever.
async fn watch_core(
    mut metrics: watch::Receiver<RaftMetrics<NodeId, ShoalNode>>,
    requested: impl Fn() -> bool,
) -> CoreFailure {
    loop {
        let running = metrics.borrow_and_update().running_state.clone();
        if let Some(failure) = unexpected_stop(&running, false, requested()) {
            return failure;
        }
        if metrics.changed().await.is_err() {
            let running = metrics.borrow().running_state.clone();
            return match unexpected_stop(&running, true, requested()) {
                Some(failure) => failure,
                None => std::future::pending().await,
            };
        }
    }
}

/// A snapshot of Raft facts.
#[derive(Clone, Debug, Default)]
pub struct RaftStatus {
    pub term: u64,
    pub leader: Option<NodeId>,
    pub committed: u64,
    pub applied: u64,
    pub voters: std::collections::BTreeSet<NodeId>,
    pub learners: std::collections::BTreeSet<NodeId>,
    pub nodes: BTreeMap<NodeId, ShoalNode>,
}

/// One try at committing a write.
enum Attempt {
    Done(CommandResult),
    Retry(String),
    Fatal(String),
}

#[cfg(test)]
mod tests {
    use openraft::{AnyError, StorageError, StorageIOError};

    use super::*;

    type Metrics = RaftMetrics<NodeId, ShoalNode>;

    fn storage_error(msg: &str) -> Fatal<NodeId> {
        Fatal::StorageError(StorageError::from(StorageIOError::write_logs(AnyError::error(msg))))
    }

    #[test]
    fn only_a_stop_nobody_asked_for_is_a_failure() {
        let full = storage_error("No space left on device (os error 28)");
        match unexpected_stop(&Err(full.clone()), false, false) {
            Some(CoreFailure::Storage(e)) => assert!(e.contains("No space left on device"), "{e}"),
            other => panic!("a storage error: {other:?}"),
        }
        assert_eq!(unexpected_stop(&Err(full), true, true), None, "asked for: a shutdown");
        assert_eq!(unexpected_stop(&Ok(()), false, false), None, "running");
        assert!(matches!(unexpected_stop(&Err(Fatal::Panicked), true, false), Some(CoreFailure::Stopped(_))));
        assert!(matches!(unexpected_stop(&Err(Fatal::Stopped), false, false), Some(CoreFailure::Stopped(_))));
        assert!(matches!(unexpected_stop(&Ok(()), true, false), Some(CoreFailure::Stopped(_))), "the task died");
        assert_eq!(unexpected_stop(&Err(Fatal::Stopped), true, true), None);
    }

    #[tokio::test]
    async fn the_watch_ends_on_a_storage_error_in_the_metrics() {
        let (tx, rx) = watch::channel(Metrics::new_initial(1));
        let watching = tokio::spawn(watch_core(rx, || false));
        tx.send_modify(|m| m.current_term = 3);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!watching.is_finished(), "a running core is no failure");
        tx.send_modify(|m| {
            m.state = ServerState::Shutdown;
            m.running_state = Err(storage_error("No space left on device (os error 28)"));
        });
        let failure = tokio::time::timeout(Duration::from_secs(5), watching).await.expect("in time").expect("join");
        assert!(matches!(&failure, CoreFailure::Storage(e) if e.contains("No space left")), "{failure:?}");
        assert!(failure.to_string().starts_with("raft storage failed: "), "{failure}");
    }

    #[tokio::test]
    async fn the_watch_ends_when_the_core_task_dies_and_never_after_a_shutdown() {
        let (tx, rx) = watch::channel(Metrics::new_initial(1));
        let watching = tokio::spawn(watch_core(rx, || false));
        drop(tx);
        let failure = tokio::time::timeout(Duration::from_secs(5), watching).await.expect("in time").expect("join");
        assert!(matches!(failure, CoreFailure::Stopped(_)), "{failure:?}");

        let requested = Arc::new(AtomicBool::new(false));
        let (tx, rx) = watch::channel(Metrics::new_initial(1));
        let asked = requested.clone();
        let watching = tokio::spawn(watch_core(rx, move || asked.load(Ordering::SeqCst)));
        requested.store(true, Ordering::SeqCst);
        tx.send_modify(|m| m.running_state = Err(Fatal::Stopped));
        drop(tx);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!watching.is_finished(), "a requested stop is no failure");
        watching.abort();
    }

    #[tokio::test]
    async fn a_node_shut_down_normally_reports_no_failure() {
        let dir = tempfile::tempdir().expect("dir");
        let node = RaftNode::start(dir.path(), ShoalNode::default(), RaftNet::default(), &RaftTiming::default())
            .await
            .expect("start");
        node.initialize_alone().await.expect("initialize");
        let failure = node.failure();
        node.shutdown().await;
        assert!(tokio::time::timeout(Duration::from_millis(500), failure).await.is_err());
    }
}
