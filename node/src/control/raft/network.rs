//! Raft RPC over mutual TLS (`channel.rs`): length-prefixed `proto::codec` frames, one request
//! in flight per connection, each connection owned by a task of its own (see [`Conn`]). Every request names the cluster (its configured name and its
//! identity, see `ident.rs`) and the target's Raft id, so a node reached at a stale address, or
//! a node of another cluster, refuses instead of answering. The peer's certificate must name
//! the node dialled, and a certificate the replicated deny list holds ends the connection.
//! Forwarded client writes, read-index requests and operators' removals travel the same way.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use serde::{Deserialize, Serialize};
use shoal_proto::admin::RemovedNode;
use shoal_proto::{Proposal, State};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_rustls::client::TlsStream;

use super::channel::{Channel, OtherCluster, RaftTls};
use super::ident::{AT_HANDSHAKE, ClusterId, Identity};
use super::{CommandResult, NodeId, ShoalNode, TypeConfig};
use crate::control::membership::RemoveError;

/// Frame kinds on the Raft port.
pub const KIND_REQUEST: u8 = 1;
pub const KIND_REPLY: u8 = 2;

/// How long connecting to a peer may take.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(1000);

/// Decides whether `from` may talk to `to` (a test seam for partitions; `None` allows all).
pub type LinkFilter = Arc<dyn Fn(NodeId, NodeId) -> bool + Send + Sync>;

/// Who is talking to whom, and about what.
#[derive(Debug, Serialize, Deserialize)]
pub struct Envelope {
    pub cluster: String,
    /// The sender's cluster identity (`None`: it has none yet).
    pub cluster_id: Option<ClusterId>,
    pub from: NodeId,
    pub to: NodeId,
    pub body: Request,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum Request {
    Append(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<NodeId>),
    Snapshot(InstallSnapshotRequest<TypeConfig>),
    /// A client write forwarded to the leader.
    Write(Proposal),
    /// "Confirm you lead and tell me the index a linearizable read must wait for."
    ReadIndex,
    /// "Who are you?" (the leader asks before admitting a node gossip announced).
    Ping,
    /// An operator's removal of a member (its name or Raft id), forwarded to the leader.
    Remove(String),
}

#[derive(Debug, Serialize, Deserialize)]
pub enum Reply {
    Append(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    Snapshot(Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>),
    /// The command's result and its log index; `Err` when the receiver is not the leader.
    Write(Result<(CommandResult, u64), String>),
    ReadIndex(Result<u64, String>),
    /// The answering node's Raft id and cluster identity.
    Pong(NodeId, Option<ClusterId>),
    /// The committed removal, or why the leader did not make it.
    Remove(Result<RemovedNode, RemoveError>),
    /// Wrong cluster, wrong node, or an undecodable request.
    Refused(String),
}

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("unreachable: {0}")]
    Unreachable(io::Error),
    #[error("network: {0}")]
    Network(io::Error),
}

/// Who this node is on the wire.
#[derive(Clone)]
pub struct Wire {
    pub cluster: String,
    pub me: NodeId,
    pub filter: Option<LinkFilter>,
    /// This node's certificate and the cluster CA (`None`: a lone node, it never dials).
    pub tls: Option<Arc<RaftTls>>,
    /// The cluster identity every handshake and request carries.
    pub ident: Identity,
    /// The replicated state, for its certificate deny list.
    pub state: watch::Receiver<Arc<State>>,
    /// The certificate serial each peer last presented (the leader removes revoked members).
    pub seen: Arc<std::sync::Mutex<std::collections::HashMap<NodeId, String>>>,
    /// Set while this node leads without a quorum ([`super::quorum`]): it sends no appends or
    /// snapshots, so the followers' election timers run out, and refuses proposals.
    pub stepping_down: super::quorum::SteppingDown,
}

impl Wire {
    fn allowed(&self, to: NodeId) -> bool {
        self.filter.as_ref().is_none_or(|f| f(self.me, to))
    }

    /// Whether the replicated deny list holds this certificate serial.
    pub fn revoked(&self, serial: &str) -> bool {
        self.state.borrow().revoked_certs.contains_key(serial)
    }

    /// The serials peers presented, by Raft id.
    pub fn seen_serials(&self) -> std::collections::HashMap<NodeId, String> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn envelope(&self, to: NodeId, body: Request) -> Envelope {
        Envelope { cluster: self.cluster.clone(), cluster_id: self.ident.get(), from: self.me, to, body }
    }
}

/// Calls to one peer. A task of its own owns the TLS connection and runs the calls one after
/// the other, each to the end: a caller that stops waiting (openraft gives an AppendEntries
/// only the heartbeat interval) abandons the reply, not the connection, so the stream never
/// desynchronizes and a slow link is not torn down and re-handshaken on every timeout. A
/// request whose caller gave up before it was sent is not sent at all. Connecting has its own
/// deadline, independent of the callers', so a link whose round trip exceeds an RPC deadline
/// still gets connected and still delivers requests (a follower behind it keeps hearing its
/// leader).
pub struct Conn {
    wire: Wire,
    target: NodeId,
    node: ShoalNode,
    pipe: Option<mpsc::Sender<Call>>,
}

/// One request for the connection task and where its reply goes.
struct Call {
    envelope: Envelope,
    patience: Duration,
    reply: oneshot::Sender<Result<Reply, CallError>>,
}

/// Calls waiting for a busy connection; beyond this a call fails at once.
const QUEUE: usize = 8;
/// How long the TCP connect, TLS handshake and hello may take together.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long one exchange may take at least before the connection is given up as hung.
const STREAM_PATIENCE: Duration = Duration::from_secs(5);

fn unreachable(kind: io::ErrorKind, msg: &str) -> CallError {
    CallError::Unreachable(io::Error::new(kind, msg.to_string()))
}

impl Conn {
    pub fn new(wire: Wire, target: NodeId, node: ShoalNode) -> Conn {
        Conn { wire, target, node, pipe: None }
    }

    /// Sends one request and waits for its reply within `timeout`.
    pub async fn call(&mut self, body: Request, timeout: Duration) -> Result<Reply, CallError> {
        if !self.wire.allowed(self.target) {
            return Err(CallError::Unreachable(io::Error::new(io::ErrorKind::ConnectionRefused, "link blocked")));
        }
        let (tx, rx) = oneshot::channel();
        let call =
            Call { envelope: self.wire.envelope(self.target, body), patience: timeout.max(STREAM_PATIENCE), reply: tx };
        if self.pipe().try_send(call).is_err() {
            return Err(unreachable(io::ErrorKind::WouldBlock, "too many calls queued for this peer"));
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(CallError::Network(io::Error::other("the connection task ended"))),
            Err(_) => Err(CallError::Network(io::Error::new(io::ErrorKind::TimedOut, "rpc timeout"))),
        }
    }

    /// The connection task's queue, started on first use (and again if it ended).
    fn pipe(&mut self) -> &mpsc::Sender<Call> {
        if self.pipe.as_ref().is_none_or(|p| p.is_closed()) {
            let (tx, rx) = mpsc::channel(QUEUE);
            let peer = Peer { wire: self.wire.clone(), target: self.target, node: self.node.clone() };
            tokio::spawn(peer.serve(rx));
            self.pipe = Some(tx);
        }
        self.pipe.as_ref().expect("set above")
    }
}

/// The connection task's side: one peer, one stream at a time.
struct Peer {
    wire: Wire,
    target: NodeId,
    node: ShoalNode,
}

type Stream = (Channel<TlsStream<TcpStream>>, String);

impl Peer {
    /// Runs calls until every `Conn` handle is gone.
    async fn serve(self, mut calls: mpsc::Receiver<Call>) {
        let mut stream: Option<Stream> = None;
        while let Some(call) = calls.recv().await {
            if call.reply.is_closed() {
                continue; // its caller gave up before it could be sent
            }
            let result = match tokio::time::timeout(call.patience, self.exchange(&mut stream, &call.envelope)).await {
                Ok(r) => r,
                Err(_) => Err(CallError::Network(io::Error::new(io::ErrorKind::TimedOut, "no reply: connection hung"))),
            };
            if result.is_err() {
                stream = None; // an unfinished exchange leaves the stream unusable
            }
            let _ = call.reply.send(result);
        }
    }

    async fn exchange(&self, stream: &mut Option<Stream>, envelope: &Envelope) -> Result<Reply, CallError> {
        if stream.as_ref().is_some_and(|(_, serial)| self.wire.revoked(serial)) {
            *stream = None;
            return Err(unreachable(io::ErrorKind::PermissionDenied, "the peer's certificate is revoked"));
        }
        if stream.is_none() {
            let connecting = tokio::time::timeout(HANDSHAKE_TIMEOUT, self.connect()).await;
            *stream = Some(connecting.map_err(|_| unreachable(io::ErrorKind::TimedOut, "handshake timeout"))??);
        }
        let Some((channel, _)) = stream.as_mut() else {
            return Err(unreachable(io::ErrorKind::NotConnected, "no stream"));
        };
        channel.send(KIND_REQUEST, envelope).await.map_err(CallError::Network)?;
        let (kind, reply): (u8, Reply) = channel.recv().await.map_err(CallError::Network)?;
        if kind != KIND_REPLY {
            return Err(CallError::Network(io::Error::other("unexpected frame kind")));
        }
        Ok(reply)
    }

    /// TCP, then TLS naming the target node, then the cluster identity exchange.
    async fn connect(&self) -> Result<Stream, CallError> {
        let tls = self.wire.tls.as_ref().ok_or_else(|| unreachable(io::ErrorKind::NotConnected, "no cluster TLS"))?;
        // A dead peer's address often answers nothing: give up on connecting early, so a
        // forwarded write retries towards the new leader instead of waiting out the RPC.
        let connecting = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&self.node.raft_addr)).await;
        let tcp = connecting
            .map_err(|_| unreachable(io::ErrorKind::TimedOut, "connect timeout"))?
            .map_err(CallError::Unreachable)?;
        let _ = tcp.set_nodelay(true);
        let (mut channel, peer) = tls.connect(tcp, &self.node.name).await.map_err(CallError::Unreachable)?;
        self.wire.seen.lock().unwrap_or_else(|e| e.into_inner()).insert(self.target, peer.serial.clone());
        if self.wire.revoked(&peer.serial) {
            return Err(unreachable(io::ErrorKind::PermissionDenied, "the peer's certificate is revoked"));
        }
        let ours = self.wire.ident.get();
        channel.hello(ours).await.map_err(|e| {
            if let Some(o) = OtherCluster::of(&e) {
                self.wire.ident.refused(AT_HANDSHAKE, o.ours, o.theirs);
            }
            CallError::Unreachable(e)
        })?;
        Ok((channel, peer.serial))
    }
}

/// Creates connections for openraft.
#[derive(Clone)]
pub struct Network {
    pub wire: Wire,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Conn;

    async fn new_client(&mut self, target: NodeId, node: &ShoalNode) -> Conn {
        Conn::new(self.wire.clone(), target, node.clone())
    }
}

type RpcErr<E = openraft::error::Infallible> = RPCError<NodeId, ShoalNode, RaftError<NodeId, E>>;

fn rpc_error<E: std::error::Error>(e: CallError) -> RpcErr<E> {
    match e {
        CallError::Unreachable(io) => RPCError::Unreachable(Unreachable::new(&io)),
        CallError::Network(io) => RPCError::Network(NetworkError::new(&io)),
    }
}

fn unexpected<E: std::error::Error>(reply: Reply) -> RpcErr<E> {
    let msg = match reply {
        Reply::Refused(why) => format!("peer refused: {why}"),
        _ => "unexpected reply".to_string(),
    };
    RPCError::Network(NetworkError::new(&io::Error::other(msg)))
}

const STEPPING_DOWN: &str = "stepping down: no appends until another node leads";

impl RaftNetwork<TypeConfig> for Conn {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RpcErr> {
        if self.wire.stepping_down.get() {
            return Err(RPCError::Unreachable(Unreachable::new(&io::Error::other(STEPPING_DOWN))));
        }
        match self.call(Request::Append(rpc), option.hard_ttl()).await {
            Ok(Reply::Append(Ok(r))) => Ok(r),
            Ok(Reply::Append(Err(e))) => Err(RPCError::RemoteError(RemoteError::new(self.target, e))),
            Ok(other) => Err(unexpected(other)),
            Err(e) => Err(rpc_error(e)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RpcErr<InstallSnapshotError>> {
        if self.wire.stepping_down.get() {
            return Err(RPCError::Unreachable(Unreachable::new(&io::Error::other(STEPPING_DOWN))));
        }
        match self.call(Request::Snapshot(rpc), option.hard_ttl()).await {
            Ok(Reply::Snapshot(Ok(r))) => Ok(r),
            Ok(Reply::Snapshot(Err(e))) => Err(RPCError::RemoteError(RemoteError::new(self.target, e))),
            Ok(other) => Err(unexpected(other)),
            Err(e) => Err(rpc_error(e)),
        }
    }

    async fn vote(&mut self, rpc: VoteRequest<NodeId>, option: RPCOption) -> Result<VoteResponse<NodeId>, RpcErr> {
        match self.call(Request::Vote(rpc), option.hard_ttl()).await {
            Ok(Reply::Vote(Ok(r))) => Ok(r),
            Ok(Reply::Vote(Err(e))) => Err(RPCError::RemoteError(RemoteError::new(self.target, e))),
            Ok(other) => Err(unexpected(other)),
            Err(e) => Err(rpc_error(e)),
        }
    }
}
