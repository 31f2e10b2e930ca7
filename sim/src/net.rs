//! The simulated network: every Raft RPC between nodes passes through here, in memory. Per
//! message, a pure function of `(seed, from, to, per-link sequence)` decides loss, delay,
//! duplication (a delayed second copy, which also reorders) and reply loss; partitions are a set
//! of cut directed links, so symmetric, one-way and bridge partitions are all just link sets.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::AnyError;
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use shoal_node::control::raft::{NodeId, Raft, ShoalNode, TypeConfig};

use crate::trace::{Trace, mix};

/// Knobs of the lossy network, fixed per seed; zeroed when the world heals.
#[derive(Clone, Copy, Debug, Default)]
pub struct Faults {
    /// Per mille of requests (and, separately, replies) lost.
    pub loss: u64,
    /// Per mille of requests delivered twice.
    pub dup: u64,
    /// One-way delay is 1..=max_delay ms ...
    pub max_delay: u64,
    /// ... except for this per mille, delayed 200–1000 ms (beyond a heartbeat).
    pub spike: u64,
}

#[derive(Default)]
struct State {
    seed: u64,
    /// Running nodes; a crashed node is absent (connection refused).
    up: BTreeMap<NodeId, Raft>,
    /// Directed links that deliver nothing.
    cut: BTreeSet<(NodeId, NodeId)>,
    faults: Faults,
    seq: BTreeMap<(NodeId, NodeId), u64>,
}

/// The network, shared by every node's factory and the world.
#[derive(Clone)]
pub struct SimNet {
    state: Arc<Mutex<State>>,
    trace: Trace,
}

/// What happens to one message.
struct Fate {
    seq: u64,
    lost: bool,
    reply_lost: bool,
    dup: Option<Duration>,
    there: Duration,
    back: Duration,
}

impl SimNet {
    pub fn new(seed: u64, faults: Faults, trace: Trace) -> SimNet {
        let state = State { seed, faults, ..State::default() };
        SimNet { state: Arc::new(Mutex::new(state)), trace }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_up(&self, id: NodeId, raft: Option<Raft>) {
        let mut s = self.lock();
        match raft {
            Some(r) => s.up.insert(id, r),
            None => s.up.remove(&id),
        };
    }

    pub fn raft(&self, id: NodeId) -> Option<Raft> {
        self.lock().up.get(&id).cloned()
    }

    pub fn up(&self) -> Vec<(NodeId, Raft)> {
        self.lock().up.iter().map(|(id, r)| (*id, r.clone())).collect()
    }

    pub fn set_cut(&self, cut: BTreeSet<(NodeId, NodeId)>) {
        self.lock().cut = cut;
    }

    pub fn set_faults(&self, faults: Faults) {
        self.lock().faults = faults;
    }

    fn is_cut(&self, from: NodeId, to: NodeId) -> bool {
        self.lock().cut.contains(&(from, to))
    }

    fn fate(&self, from: NodeId, to: NodeId) -> Fate {
        let mut s = self.lock();
        let seq = s.seq.entry((from, to)).or_default();
        *seq += 1;
        let seq = *seq;
        let f = s.faults;
        let roll = |k: u64| mix(s.seed ^ mix(from ^ mix(to.rotate_left(17) ^ mix(seq ^ mix(k)))));
        let delay = |k: u64| {
            if f.spike > 0 && roll(k) % 1000 < f.spike {
                Duration::from_millis(200 + roll(k + 1) % 800)
            } else {
                Duration::from_millis(1 + roll(k + 2) % f.max_delay.max(1))
            }
        };
        Fate {
            seq,
            lost: roll(1) % 1000 < f.loss,
            reply_lost: roll(2) % 1000 < f.loss,
            dup: (roll(3) % 1000 < f.dup).then(|| Duration::from_millis(1 + roll(4) % 300)),
            there: delay(10),
            back: delay(20),
        }
    }

    /// One RPC from `from` to `to`: the request and its reply each cross the network.
    async fn rpc<Req, Resp, E, F, Fut>(
        &self,
        from: NodeId,
        to: NodeId,
        kind: &str,
        req: Req,
        ttl: Duration,
        call: F,
    ) -> Result<Resp, RPCError<NodeId, ShoalNode, RaftError<NodeId, E>>>
    where
        Req: Clone + Send + 'static,
        Resp: Send + 'static,
        E: std::error::Error + Send + 'static,
        F: Fn(Raft, Req) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Resp, RaftError<NodeId, E>>> + Send,
    {
        let fate = self.fate(from, to);
        let tag = format!("{kind} {from}->{to}#{}", fate.seq);
        if self.raft(to).is_none() {
            self.trace.event(format!("{tag} refused (down)"));
            return Err(RPCError::Unreachable(Unreachable::new(&AnyError::error("node down"))));
        }
        if fate.lost || self.is_cut(from, to) {
            self.trace.event(format!("{tag} lost"));
            tokio::time::sleep(ttl).await;
            return Err(lost("request lost"));
        }
        let call = Arc::new(call);
        if let Some(extra) = fate.dup {
            self.trace.event(format!("{tag} duplicated +{}ms", extra.as_millis()));
            let (net, call, copy) = (self.clone(), call.clone(), req.clone());
            tokio::spawn(async move {
                tokio::time::sleep(fate.there + extra).await;
                if let Some(target) = net.raft(to).filter(|_| !net.is_cut(from, to)) {
                    let _ = call(target, copy).await;
                }
            });
        }
        tokio::time::sleep(fate.there).await;
        let Some(target) = self.raft(to).filter(|_| !self.is_cut(from, to)) else {
            self.trace.event(format!("{tag} lost in flight"));
            tokio::time::sleep(ttl.saturating_sub(fate.there)).await;
            return Err(lost("request lost in flight"));
        };
        let result = call(target, req).await;
        tokio::time::sleep(fate.back).await;
        if fate.reply_lost || self.is_cut(to, from) {
            self.trace.event(format!("{tag} delivered, reply lost"));
            tokio::time::sleep(ttl).await;
            return Err(lost("reply lost"));
        }
        self.trace.event(format!("{tag} delivered{}", if result.is_ok() { "" } else { ", remote error" }));
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(to, e)))
    }
}

fn lost<E: std::error::Error>(why: &str) -> RPCError<NodeId, ShoalNode, RaftError<NodeId, E>> {
    RPCError::Network(NetworkError::new(&AnyError::error(why)))
}

/// Hands each node its connections.
pub struct Factory {
    pub me: NodeId,
    pub net: SimNet,
}

impl RaftNetworkFactory<TypeConfig> for Factory {
    type Network = Link;

    async fn new_client(&mut self, target: NodeId, _node: &ShoalNode) -> Link {
        Link { from: self.me, to: target, net: self.net.clone() }
    }
}

/// One node's view of a peer.
pub struct Link {
    from: NodeId,
    to: NodeId,
    net: SimNet,
}

impl RaftNetwork<TypeConfig> for Link {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, ShoalNode, RaftError<NodeId>>> {
        let kind = if rpc.entries.is_empty() { "heartbeat" } else { "append" };
        let ttl = option.hard_ttl();
        self.net.rpc(self.from, self.to, kind, rpc, ttl, |r: Raft, q| async move { r.append_entries(q).await }).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RPCError<NodeId, ShoalNode, RaftError<NodeId, InstallSnapshotError>>>
    {
        let ttl = option.hard_ttl();
        self.net
            .rpc(self.from, self.to, "snapshot", rpc, ttl, |r: Raft, q| async move { r.install_snapshot(q).await })
            .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, ShoalNode, RaftError<NodeId>>> {
        let ttl = option.hard_ttl();
        self.net.rpc(self.from, self.to, "vote", rpc, ttl, |r: Raft, q| async move { r.vote(q).await }).await
    }
}
