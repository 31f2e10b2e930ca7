//! The simulated network: every Raft RPC between nodes passes through here, in memory. Per
//! message, a pure function of `(seed, from, to, per-link sequence)` decides loss, delay,
//! duplication (a delayed second copy, which also reorders) and reply loss; partitions are a set
//! of cut directed links, so symmetric, one-way and bridge partitions are all just link sets.
//! Every request carries its sender's cluster identity and passes the receiver's real
//! `Identity::check` first, as shoal's RPC envelope does; gossip datagrams and the reconciler's
//! ping take the same links, with their own sequence streams.

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
use shoal_node::control::raft::ident::{AT_RPC, ClusterId, Identity};
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

/// A running node as the network reaches it.
#[derive(Clone)]
pub struct Peer {
    pub raft: Raft,
    pub ident: Identity,
}

/// Which sequence stream a message draws its fate from.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Stream {
    Raft,
    Gossip,
    Ping,
}

#[derive(Default)]
struct State {
    seed: u64,
    /// Running nodes; a crashed node is absent (connection refused).
    up: BTreeMap<NodeId, Peer>,
    /// Directed links that deliver nothing.
    cut: BTreeSet<(NodeId, NodeId)>,
    faults: Faults,
    seq: BTreeMap<(Stream, NodeId, NodeId), u64>,
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

    pub fn set_up(&self, id: NodeId, peer: Option<Peer>) {
        let mut s = self.lock();
        match peer {
            Some(p) => s.up.insert(id, p),
            None => s.up.remove(&id),
        };
    }

    pub fn raft(&self, id: NodeId) -> Option<Raft> {
        self.lock().up.get(&id).map(|p| p.raft.clone())
    }

    pub fn ident(&self, id: NodeId) -> Option<Identity> {
        self.lock().up.get(&id).map(|p| p.ident.clone())
    }

    pub fn is_up(&self, id: NodeId) -> bool {
        self.lock().up.contains_key(&id)
    }

    pub fn up(&self) -> Vec<(NodeId, Raft)> {
        self.lock().up.iter().map(|(id, p)| (*id, p.raft.clone())).collect()
    }

    pub fn set_cut(&self, cut: BTreeSet<(NodeId, NodeId)>) {
        self.lock().cut = cut;
    }

    pub fn set_faults(&self, faults: Faults) {
        self.lock().faults = faults;
    }

    pub fn is_cut(&self, from: NodeId, to: NodeId) -> bool {
        self.lock().cut.contains(&(from, to))
    }

    /// One gossip datagram from `from` to `to`: its one-way delay, or `None` when it is lost
    /// (per the seed's loss rate, or a cut link).
    pub fn datagram(&self, from: NodeId, to: NodeId) -> Option<Duration> {
        let fate = self.fate(Stream::Gossip, from, to);
        (!fate.lost && !self.is_cut(from, to)).then_some(fate.there)
    }

    /// The reconciler's admission ping (shoal's `verified`): the peer's answer, its identity,
    /// or why there was none. Waits out `ttl` when nothing comes back, as a real timeout would.
    pub async fn ping(&self, from: NodeId, to: NodeId, ttl: Duration) -> Result<Option<ClusterId>, String> {
        let fate = self.fate(Stream::Ping, from, to);
        if !self.is_up(to) {
            return Err("refused (down)".into());
        }
        if fate.lost || fate.reply_lost || self.is_cut(from, to) || self.is_cut(to, from) {
            tokio::time::sleep(ttl).await;
            return Err("timed out".into());
        }
        tokio::time::sleep(fate.there).await;
        // Read the answer now, holding nothing of the node across a wait (its store must
        // reopen when it restarts).
        let Some(theirs) = self.ident(to).map(|i| i.get()) else {
            tokio::time::sleep(ttl.saturating_sub(fate.there)).await;
            return Err("timed out".into());
        };
        tokio::time::sleep(fate.back).await;
        Ok(theirs)
    }

    fn fate(&self, stream: Stream, from: NodeId, to: NodeId) -> Fate {
        let mut s = self.lock();
        let seq = s.seq.entry((stream, from, to)).or_default();
        *seq += 1;
        let seq = *seq;
        let f = s.faults;
        let salt = match stream {
            Stream::Raft => 0,
            Stream::Gossip => 0x6055_1900,
            Stream::Ping => 0x9196_0000,
        };
        let roll = |k: u64| mix(s.seed ^ mix(from ^ mix(to.rotate_left(17) ^ mix(seq ^ salt ^ mix(k)))));
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
        let fate = self.fate(Stream::Raft, from, to);
        let tag = format!("{kind} {from}->{to}#{}", fate.seq);
        // The envelope carries the sender's identity as it is when the request leaves.
        let ours = self.ident(from).and_then(|i| i.get());
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
                if let Some(target) = net.admit(to, ours).filter(|_| !net.is_cut(from, to)) {
                    let _ = call(target, copy).await;
                }
            });
        }
        tokio::time::sleep(fate.there).await;
        if self.raft(to).is_none() || self.is_cut(from, to) {
            self.trace.event(format!("{tag} lost in flight"));
            tokio::time::sleep(ttl.saturating_sub(fate.there)).await;
            return Err(lost("request lost in flight"));
        }
        let Some(target) = self.admit(to, ours) else {
            // Shoal answers `Refused`; the caller sees a failed call, like any other.
            self.trace.event(format!("{tag} refused: another cluster"));
            tokio::time::sleep(fate.back).await;
            return Err(lost("peer refused: another cluster"));
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

impl SimNet {
    /// The receiver's side of shoal's `dispatch`: a node of another cluster is refused, a node
    /// without an identity adopts the sender's (durably, before Raft sees the request).
    fn admit(&self, to: NodeId, theirs: Option<ClusterId>) -> Option<Raft> {
        let peer = self.lock().up.get(&to).cloned()?;
        peer.ident.check(theirs, true, AT_RPC).ok().map(|()| peer.raft)
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
