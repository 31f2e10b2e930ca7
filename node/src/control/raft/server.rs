//! The Raft RPC server on the cluster TCP port. Each connection serves requests one at a time;
//! connection tasks live in a `JoinSet` owned by the accept loop, so stopping the server also
//! stops them (a stopped node must not keep answering on old connections).

use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use super::RaftNode;
use super::ident::{AT_HANDSHAKE, AT_RPC};
use super::network::{Envelope, KIND_REPLY, KIND_REQUEST, Reply, Request};
use crate::control::secure::{OtherCluster, SecureStream};
use crate::metrics::Metrics;

/// Accepts Raft RPC connections until the task is aborted.
pub async fn serve(listener: TcpListener, node: Arc<RaftNode>, metrics: Arc<Metrics>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let _ = stream.set_nodelay(true);
                conns.spawn(serve_conn(stream, node.clone(), metrics.clone()));
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

/// A connection must finish the key handshake within this time.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

async fn serve_conn(stream: TcpStream, node: Arc<RaftNode>, metrics: Arc<Metrics>) {
    let peer = stream.peer_addr().ok();
    let Some(key) = node.wire.key.as_ref() else { return };
    let handshake = SecureStream::accept(stream, key, &node.wire.cluster, node.ident.get());
    let accepted = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await;
    let mut stream = match accepted {
        Ok(Ok(s)) => s,
        Ok(Err(e)) if OtherCluster::of(&e).is_some() => {
            if let Some(o) = OtherCluster::of(&e) {
                node.ident.refused(AT_HANDSHAKE, o.ours, o.theirs);
            }
            return;
        }
        Ok(Err(e)) => {
            metrics.rejected_inputs.with_label_values(&["raft_auth"]).inc();
            tracing::warn!(?peer, error = %e, "Raft connection refused: no valid cluster key");
            return;
        }
        Err(_) => {
            metrics.rejected_inputs.with_label_values(&["raft_auth"]).inc();
            return;
        }
    };
    loop {
        let (kind, env): (u8, Envelope) = match stream.recv().await {
            Ok(frame) => frame,
            Err(e) => {
                if matches!(e.kind(), std::io::ErrorKind::InvalidData | std::io::ErrorKind::PermissionDenied) {
                    metrics.rejected_inputs.with_label_values(&["raft_frame"]).inc();
                    tracing::debug!(?peer, error = %e, "dropping a connection that sent an invalid Raft frame");
                }
                return;
            }
        };
        let reply = if kind != KIND_REQUEST {
            Reply::Refused("expected a request frame".into())
        } else {
            dispatch(&node, env).await
        };
        if stream.send(KIND_REPLY, &reply).await.is_err() {
            return;
        }
    }
}

async fn dispatch(node: &RaftNode, env: Envelope) -> Reply {
    if env.cluster != node.wire.cluster {
        return Reply::Refused(format!("this node belongs to cluster {:?}", node.wire.cluster));
    }
    if env.to != node.id {
        return Reply::Refused(format!("this is node {}, not {}", node.id, env.to));
    }
    if !node.wire.filter.as_ref().is_none_or(|f| f(env.from, node.id)) {
        return Reply::Refused("link blocked".into());
    }
    // Only Raft's own requests come from a member of the sender's cluster: a node without an
    // identity takes it from them (durably, before Raft sees the request).
    let may_adopt = matches!(env.body, Request::Append(_) | Request::Vote(_) | Request::Snapshot(_));
    if let Err(why) = node.ident.check(env.cluster_id, may_adopt, AT_RPC) {
        return Reply::Refused(why);
    }
    match env.body {
        Request::Append(rpc) => Reply::Append(node.raft.append_entries(rpc).await),
        Request::Vote(rpc) => Reply::Vote(node.raft.vote(rpc).await),
        Request::Snapshot(rpc) => Reply::Snapshot(node.raft.install_snapshot(rpc).await),
        Request::Write(cmd) => Reply::Write(node.write_as_leader(cmd).await),
        Request::ReadIndex => Reply::ReadIndex(node.read_index_as_leader().await),
        Request::Ping => Reply::Pong(node.id, node.ident.get()),
    }
}
