//! The Raft RPC server on the cluster TCP port. Each connection serves requests one at a time;
//! connection tasks live in a `JoinSet` owned by the accept loop, so stopping the server also
//! stops them (a stopped node must not keep answering on old connections).
//!
//! Before a connection finishes mutual TLS it is a stranger's: at most [`MAX_PENDING`] such
//! connections are open at once, at most [`MAX_PENDING_PER_IP`] from one address (so one host's
//! flood leaves room for the others), each for at most [`HANDSHAKE_TIMEOUT`]; beyond that new
//! ones are closed at once. Refusals are counted and logged at most once per 10 s.
//!
//! After the handshake the peer is the node its certificate names: a request whose sender
//! Raft id belongs to another member's name is refused, and a certificate the replicated deny
//! list holds is refused at once and dropped later, when the list grows.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shoal_proto::State;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::channel::{Channel, OtherCluster};
use super::ident::{AT_HANDSHAKE, AT_RPC};
use super::network::{Envelope, KIND_REPLY, KIND_REQUEST, Reply, Request};
use super::{NodeId, RaftNode};
use crate::control::gossip::Members;
use crate::control::membership;
use crate::control::pki::NodeIdentity;
use crate::control::ratelog::LogLimiter;
use crate::metrics::Metrics;

/// Most connections that have not finished the handshake, in all.
pub const MAX_PENDING: usize = 128;
/// Most such connections from one IP address.
pub const MAX_PENDING_PER_IP: usize = 16;
/// A connection must finish the TLS handshake within this time (a peer needs milliseconds).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);

/// Failed handshakes and refused connections: one WARN per 10 s each, with a count.
static HANDSHAKE_LOG: LogLimiter = LogLimiter::new(Duration::from_secs(10));
static LIMIT_LOG: LogLimiter = LogLimiter::new(Duration::from_secs(10));

/// Counts unauthenticated connections, in all and per source address.
pub struct Gate {
    pending: Mutex<HashMap<IpAddr, usize>>,
    max: usize,
    max_per_ip: usize,
}

/// A place in the [`Gate`]; freed when dropped (the handshake finished, failed or timed out).
pub struct Pass {
    gate: Arc<Gate>,
    ip: IpAddr,
}

impl Gate {
    pub fn new(max: usize, max_per_ip: usize) -> Gate {
        Gate { pending: Mutex::new(HashMap::new()), max, max_per_ip }
    }

    /// A place for a new connection from `ip`, or `None` when the bounds are reached.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<Pass> {
        let ip = ip.to_canonical();
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let total: usize = pending.values().sum();
        let mine = pending.get(&ip).copied().unwrap_or(0);
        if total >= self.max || mine >= self.max_per_ip {
            return None;
        }
        pending.insert(ip, mine + 1);
        Some(Pass { gate: self.clone(), ip })
    }

    pub fn pending(&self) -> usize {
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).values().sum()
    }
}

impl Drop for Pass {
    fn drop(&mut self) {
        let mut pending = self.gate.pending.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = pending.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                pending.remove(&self.ip);
            }
        }
    }
}

/// Accepts Raft RPC connections until the task is aborted. `members` is this node's gossip
/// view (the leader decides forwarded removals on it).
pub async fn serve(
    listener: TcpListener,
    node: Arc<RaftNode>,
    metrics: Arc<Metrics>,
    members: watch::Receiver<Arc<Members>>,
) {
    let gate = Arc::new(Gate::new(MAX_PENDING, MAX_PENDING_PER_IP));
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, peer)) = accepted else { continue };
                let Some(pass) = gate.admit(peer.ip()) else {
                    // Closed at once: a stranger's flood must not hold our sockets or memory.
                    metrics.rejected_inputs.with_label_values(&["raft_preauth_limit"]).inc();
                    if let Some(suppressed) = LIMIT_LOG.allow() {
                        tracing::warn!(%peer, suppressed, "Raft connection refused: too many unauthenticated connections");
                    }
                    continue;
                };
                let _ = stream.set_nodelay(true);
                conns.spawn(serve_conn(stream, node.clone(), metrics.clone(), members.clone(), pass));
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

/// Logs a failed handshake, at most once per 10 s.
fn handshake_failed(peer: Option<std::net::SocketAddr>, error: &dyn std::fmt::Display) {
    if let Some(suppressed) = HANDSHAKE_LOG.allow() {
        tracing::warn!(?peer, error = %error, suppressed, "Raft connection refused: no valid node certificate");
    }
}

/// Serves one connection; `pass` is its place among unauthenticated ones, given up once the
/// handshake is over.
async fn serve_conn(
    stream: TcpStream,
    node: Arc<RaftNode>,
    metrics: Arc<Metrics>,
    members: watch::Receiver<Arc<Members>>,
    pass: Pass,
) {
    let peer = stream.peer_addr().ok();
    let Some(tls) = node.wire.tls.clone() else { return };
    let handshake = async {
        let (mut channel, who) = tls.accept(stream).await.map_err(|e| ("raft_auth", e))?;
        if node.wire.revoked(&who.serial) {
            return Err(("raft_revoked", std::io::Error::other(format!("node {}: certificate revoked", who.node))));
        }
        channel.answer_hello(node.ident.get()).await.map_err(|e| ("raft_auth", e))?;
        Ok((channel, who))
    };
    let accepted = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await;
    drop(pass);
    let (mut stream, who) = match accepted {
        Ok(Ok(s)) => s,
        Ok(Err((_, e))) if OtherCluster::of(&e).is_some() => {
            if let Some(o) = OtherCluster::of(&e) {
                node.ident.refused(AT_HANDSHAKE, o.ours, o.theirs);
            }
            return;
        }
        Ok(Err((reason, e))) => {
            metrics.rejected_inputs.with_label_values(&[reason]).inc();
            handshake_failed(peer, &e);
            return;
        }
        Err(_) => {
            metrics.rejected_inputs.with_label_values(&["raft_handshake_timeout"]).inc();
            handshake_failed(peer, &"handshake not finished in time");
            return;
        }
    };
    let mut deny = node.wire.state.clone();
    loop {
        let (kind, env) = match next_frame(&mut stream, &node, &who.serial, &mut deny).await {
            Next::Frame(kind, env) => (kind, *env),
            Next::Revoked => {
                // The deny list applies to live connections too, idle ones included.
                metrics.rejected_inputs.with_label_values(&["raft_revoked"]).inc();
                return;
            }
            Next::Invalid(e) => {
                metrics.rejected_inputs.with_label_values(&["raft_frame"]).inc();
                tracing::debug!(?peer, error = %e, "dropping a connection that sent an invalid Raft frame");
                return;
            }
            Next::Closed => return,
        };
        let reply = match admissible(&node, kind, &env, &who) {
            Err(why) => {
                metrics.rejected_inputs.with_label_values(&[why.counted_as()]).inc();
                Reply::Refused(why.to_string())
            }
            Ok(()) => dispatch(&node, env, &members).await,
        };
        if stream.send(KIND_REPLY, &reply).await.is_err() {
            return;
        }
    }
}

/// What an authenticated connection brought next.
enum Next {
    Frame(u8, Box<Envelope>),
    /// The deny list took the peer's certificate (counted as `raft_revoked`).
    Revoked,
    /// A frame that is not a Raft envelope (counted as `raft_frame`).
    Invalid(std::io::Error),
    /// The peer went away.
    Closed,
}

/// Waits for the next frame, ending early when the deny list takes `serial`: the read is
/// kept across state changes (a frame half read is not lost), and dropped only on revocation.
async fn next_frame<S>(
    stream: &mut Channel<S>,
    node: &RaftNode,
    serial: &str,
    deny: &mut watch::Receiver<Arc<State>>,
) -> Next
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    if node.wire.revoked(serial) {
        return Next::Revoked;
    }
    let recv = stream.recv::<Envelope>();
    tokio::pin!(recv);
    let frame = loop {
        tokio::select! {
            frame = &mut recv => break frame,
            changed = deny.changed() => match changed {
                Ok(()) if node.wire.revoked(serial) => return Next::Revoked,
                Ok(()) => {}
                // The node is stopping: no more deny-list changes to wait for.
                Err(_) => break (&mut recv).await,
            },
        }
    };
    match frame {
        // Revoked while the frame arrived: refused rather than served.
        Ok(_) if node.wire.revoked(serial) => Next::Revoked,
        Ok((kind, env)) => Next::Frame(kind, Box::new(env)),
        Err(e) if matches!(e.kind(), std::io::ErrorKind::InvalidData | std::io::ErrorKind::PermissionDenied) => {
            Next::Invalid(e)
        }
        Err(_) => Next::Closed,
    }
}

/// Refuses, with the `shoal_rejected_inputs_total` kind to count, a frame that is not a
/// request, a request claiming a member's Raft id the certificate does not name
/// (`raft_identity`), or one meant for another cluster or node (`raft_misdirected`: a peer
/// with a stale address book, or a probe).
fn admissible(node: &RaftNode, kind: u8, env: &Envelope, who: &NodeIdentity) -> Result<(), Inadmissible> {
    if kind != KIND_REQUEST {
        return Err(Inadmissible::NotRequest);
    }
    sender_is(node, env, who)?;
    if env.cluster != node.wire.cluster {
        return Err(Inadmissible::OtherClusterName(node.wire.cluster.clone()));
    }
    if env.to != node.id {
        return Err(Inadmissible::OtherNode { me: node.id, to: env.to });
    }
    Ok(())
}

/// Why a frame is refused before dispatch; the text is the `Refused` reply the peer gets.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
enum Inadmissible {
    #[error("expected a request frame")]
    NotRequest,
    /// A member's Raft id claimed by another certificate.
    #[error("Raft id {id} is node {member}, but the certificate names node {certificate}")]
    WrongSender { id: NodeId, member: String, certificate: String },
    /// The envelope names another cluster (this node's name is carried).
    #[error("this node belongs to cluster {0:?}")]
    OtherClusterName(String),
    #[error("this is node {me}, not {to}")]
    OtherNode { me: NodeId, to: NodeId },
}

impl Inadmissible {
    /// The `shoal_rejected_inputs_total` kind.
    fn counted_as(&self) -> &'static str {
        match self {
            Inadmissible::NotRequest => "raft_frame",
            Inadmissible::WrongSender { .. } => "raft_identity",
            Inadmissible::OtherClusterName(_) | Inadmissible::OtherNode { .. } => "raft_misdirected",
        }
    }
}

/// A member's Raft id may be claimed only by the node its certificate names; an id the
/// membership does not know yet (a new node before its first log) rests on the CA alone.
fn sender_is(node: &RaftNode, env: &Envelope, who: &NodeIdentity) -> Result<(), Inadmissible> {
    let membership = node.raft.metrics().borrow().membership_config.clone();
    match membership.membership().get_node(&env.from) {
        Some(member) if member.name != who.node => {
            Err(Inadmissible::WrongSender { id: env.from, member: member.name.clone(), certificate: who.node.clone() })
        }
        _ => Ok(()),
    }
}

/// Answers an admissible request.
async fn dispatch(node: &RaftNode, env: Envelope, members: &watch::Receiver<Arc<Members>>) -> Reply {
    if !node.wire.filter.as_ref().is_none_or(|f| f(env.from, node.id)) {
        return Reply::Refused("link blocked".into());
    }
    // Only Raft's own requests come from a member of the sender's cluster: a node without an
    // identity takes it from them (durably, before Raft sees the request).
    let may_adopt = matches!(env.body, Request::Append(_) | Request::Vote(_) | Request::Snapshot(_));
    if let Err(why) = node.ident.check(env.cluster_id, may_adopt, AT_RPC) {
        return Reply::Refused(why.to_string());
    }
    match env.body {
        Request::Append(rpc) => Reply::Append(node.raft.append_entries(rpc).await),
        Request::Vote(rpc) => Reply::Vote(node.raft.vote(rpc).await),
        Request::Snapshot(rpc) => Reply::Snapshot(node.raft.install_snapshot(rpc).await),
        // The wire carries the error's text.
        Request::Write(cmd) => Reply::Write(node.write_as_leader(cmd).await.map_err(|e| e.to_string())),
        Request::ReadIndex => Reply::ReadIndex(node.read_index_as_leader().await.map_err(|e| e.to_string())),
        Request::Ping => Reply::Pong(node.id, node.ident.get()),
        Request::Remove(target) => {
            let members = members.borrow().clone();
            Reply::Remove(membership::remove_as_leader(node, &members, &target).await)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gate_bounds_strangers_in_all_and_per_address() {
        let gate = Arc::new(Gate::new(4, 2));
        let (a, b, c) = ([10, 0, 0, 1].into(), [10, 0, 0, 2].into(), [10, 0, 0, 3].into());
        let a1 = gate.admit(a).expect("a 1");
        let _a2 = gate.admit(a).expect("a 2");
        assert!(gate.admit(a).is_none(), "one address holds at most its share");
        let _b1 = gate.admit(b).expect("another address still gets in");
        let _b2 = gate.admit(b).expect("b 2");
        assert!(gate.admit(c).is_none(), "the total is bounded too");
        drop(a1);
        assert_eq!(gate.pending(), 3);
        let _c1 = gate.admit(c).expect("a finished handshake frees its place");
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().expect("ip");
        assert!(gate.admit(mapped).is_none(), "an IPv4-mapped address is the same address");
    }

    #[test]
    fn refusals_keep_their_texts_and_metric_kinds() {
        let wrong = Inadmissible::WrongSender { id: 3, member: "n1".into(), certificate: "n2".into() };
        assert_eq!(wrong.to_string(), "Raft id 3 is node n1, but the certificate names node n2");
        assert_eq!(wrong.counted_as(), "raft_identity");
        let other = Inadmissible::OtherClusterName("prod".into());
        assert_eq!(other.to_string(), "this node belongs to cluster \"prod\"");
        assert_eq!(other.counted_as(), "raft_misdirected");
        assert_eq!(Inadmissible::OtherNode { me: 1, to: 2 }.to_string(), "this is node 1, not 2");
        assert_eq!(Inadmissible::NotRequest.counted_as(), "raft_frame");
    }
}
