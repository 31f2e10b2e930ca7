//! JSON types of the admin API, shared by the node (server) and the `shoal` CLI (client).

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// Body of every error answer: `{"error": "..."}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

/// Answer to a successful write.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteResult {
    /// Config version after the write was applied.
    pub version: u64,
}

/// Seed 003's pool statuses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PoolStatus {
    /// Every backend is healthy.
    #[serde(rename = "PS_FULL")]
    Full,
    /// Some backends are healthy.
    #[serde(rename = "PS_DEGRADED")]
    Degraded,
    /// No backend can take traffic.
    #[serde(rename = "PS_EMPTY")]
    Empty,
}

/// Seed 003's backend statuses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BackendStatus {
    #[serde(rename = "BS_HEALTHY")]
    Healthy,
    #[serde(rename = "BS_SICK")]
    Sick,
    #[serde(rename = "BS_DRAINING")]
    Draining,
    #[serde(rename = "BS_UNKNOWN")]
    Unknown,
}

impl PoolStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            PoolStatus::Full => "PS_FULL",
            PoolStatus::Degraded => "PS_DEGRADED",
            PoolStatus::Empty => "PS_EMPTY",
        }
    }
}

impl BackendStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendStatus::Healthy => "BS_HEALTHY",
            BackendStatus::Sick => "BS_SICK",
            BackendStatus::Draining => "BS_DRAINING",
            BackendStatus::Unknown => "BS_UNKNOWN",
        }
    }
}

/// `GET /v1/pools/{pool}/health`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolHealth {
    pub pool: String,
    pub status: PoolStatus,
    /// More than half the backends are sick, so the pool routes to all of them (panic mode).
    #[serde(default)]
    pub fail_open: bool,
    pub backends: Vec<BackendHealth>,
    /// Pinning pools: how many backends hold at least one pinned upgraded connection
    /// (an EC server agent's "super connection"), across the cluster.
    #[serde(default)]
    pub pinned_coverage: Option<Coverage>,
}

/// `covered` of `total` backends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Coverage {
    pub covered: u32,
    pub total: u32,
}

/// One backend's line in [`PoolHealth`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendHealth {
    pub addr: SocketAddr,
    pub status: BackendStatus,
    #[serde(default)]
    pub weight: u32,
    #[serde(default)]
    pub zone: String,
    /// Registered itself by heartbeat rather than by an operator.
    #[serde(default)]
    pub dynamic: bool,
    /// Connections and requests in flight, across the cluster.
    #[serde(default)]
    pub active: u64,
    /// Upgraded (WebSocket) connections open, across the cluster.
    #[serde(default)]
    pub upgraded: u64,
    /// Of those, pinned to this backend by the client (server agents' super connections).
    #[serde(default)]
    pub pinned: u64,
    #[serde(default)]
    pub slot: Option<u32>,
    /// Why the backend is sick, when known.
    #[serde(default)]
    pub reason: Option<String>,
}

/// `GET /v1/cluster`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ClusterView {
    /// The node that answered.
    pub node: String,
    pub leader: Option<String>,
    pub term: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    pub config_version: u64,
    pub nodes: Vec<NodeView>,
}

/// Answer to `DELETE /v1/cluster/nodes/{id}`: who left the Raft membership, and the
/// membership once the change was committed. Also a Raft RPC reply (bincode): no skipped fields.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemovedNode {
    /// The node's name.
    pub node: String,
    pub raft_id: u64,
    /// It was a voter (else a learner).
    pub voter: bool,
    /// Voters and learners after the change, by name.
    pub voters: Vec<String>,
    pub learners: Vec<String>,
}

/// One member of the cluster.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeView {
    pub id: String,
    /// Raft node id (stable per data directory).
    #[serde(default)]
    pub raft_id: u64,
    pub admin: String,
    pub cluster: Option<String>,
    pub http: Option<String>,
    pub zone: String,
    /// Alive according to gossip.
    pub live: bool,
    /// Has the cluster's verdicts and serves traffic.
    pub ready: bool,
    /// "leader", "follower", "candidate", "learner", "joining" (live in gossip, not yet a
    /// member) or "gone" (neither live nor a member: stopped, or removed).
    pub role: String,
    pub voter: bool,
}
