//! Stopping a node: the staged shutdown, the handover's release of the control plane (the
//! Raft store and the cluster ports freed, the data plane kept), and a released node's drain.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;

use super::NodeHandle;
use crate::admin::NodeApi;
use crate::control::gossip::Gossip;
use crate::control::raft::RaftNode;
use crate::dataplane::DataPlane;
use crate::shutdown::{Phase, Trigger};

impl NodeHandle {
    /// Staged shutdown: un-ready, stop accepting, let connections finish (bounded), stop.
    pub async fn shutdown(self) {
        tracing::info!(node = %self.shared.id, "shutting down: draining connections");
        if let Some(g) = &self.gossip {
            g.set("ready", Some("0".into())).await;
        }
        self.trigger.advance(Phase::Draining);
        self.dp_trigger.advance(Phase::Draining);
        let _ = tokio::time::timeout(self.drain_timeout, self.dataplane.drained()).await;
        self.trigger.advance(Phase::Stopped);
        self.dp_trigger.advance(Phase::Stopped);
        stop_control(self.tasks, self.admin, &self.shared.raft).await;
        if let Some(dp) = Arc::into_inner(self.dataplane) {
            let _ = tokio::task::spawn_blocking(move || dp.join()).await;
        }
        if let Some(g) = self.gossip.as_ref() {
            let _ = g.set("raft_addr", None).await;
        }
        tracing::info!(node = %self.shared.id, "stopped");
    }

    /// Hands over (see `upgrade`): stops the control plane and frees the data directory and
    /// the cluster ports, keeping the data plane serving on its last routing table.
    pub async fn release(self) -> Released {
        let id = self.shared.id.clone();
        tracing::info!(node = %id, "handing over: stopping the control plane; connections go on");
        self.trigger.advance(Phase::Draining);
        self.trigger.advance(Phase::Stopped);
        stop_control(self.tasks, self.admin, &self.shared.raft).await;
        release_shared(self.shared, self.gossip).await;
        Released {
            id,
            dataplane: self.dataplane,
            dp_trigger: self.dp_trigger,
            admin_socket: self.admin_socket.socket,
            admin_requested: self.admin_socket.requested,
        }
    }
}

/// Ends the control plane's tasks and the admin server (its connections hold the node, and
/// so the store, until it has closed them), then stops Raft. The `Stopped` phase must be set.
async fn stop_control(tasks: Vec<JoinHandle<()>>, mut admin: JoinHandle<()>, raft: &RaftNode) {
    for t in &tasks {
        t.abort();
    }
    for t in tasks {
        let _ = t.await;
    }
    if tokio::time::timeout(Duration::from_secs(2), &mut admin).await.is_err() {
        admin.abort();
    }
    raft.shutdown().await;
}

/// Drops the control plane's shared state, which closes the Raft store (redb allows one
/// process) and gossip's socket, once the tasks that held it are gone.
async fn release_shared(shared: Arc<NodeApi>, gossip: Option<Arc<Gossip>>) {
    let held = |shared: &Arc<NodeApi>, gossip: &Option<Arc<Gossip>>| {
        Arc::strong_count(shared) + gossip.as_ref().map_or(1, Arc::strong_count) - 2
    };
    for _ in 0..100 {
        if held(&shared, &gossip) == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let refs = held(&shared, &gossip);
    if refs > 0 {
        return tracing::error!(refs, "the control plane is still referenced after its stop");
    }
    drop(shared);
    if let Some(g) = gossip.and_then(Arc::into_inner) {
        g.shutdown().await;
    }
}

/// A node that handed its control plane over: its data plane serves until drained.
pub struct Released {
    id: String,
    dataplane: Arc<DataPlane>,
    dp_trigger: Trigger,
    admin_socket: std::net::TcpListener,
    admin_requested: std::net::SocketAddr,
}

impl Released {
    /// Calls `f` with every listening socket, to send them.
    pub fn with_sockets<R>(&self, f: impl FnOnce(&[crate::upgrade::Outgoing<'_>]) -> R) -> R {
        use std::os::fd::AsFd;
        self.dataplane.export(|listeners| {
            let mut out = crate::upgrade::Outgoing::from_dataplane(listeners);
            out.push(crate::upgrade::Outgoing {
                role: crate::upgrade::Role::Admin,
                addr: self.admin_requested,
                sockets: vec![self.admin_socket.as_fd()],
            });
            f(&out)
        })
    }

    /// Stops accepting and serves the connections open until they end or `deadline` passes
    /// (then upgraded ones get their close frames), then stops. Once `shorten` resolves (a
    /// SIGTERM) they get only `rest` more.
    pub async fn drain(self, deadline: Duration, shorten: impl Future<Output = ()>, rest: Duration) {
        let open = self.dataplane.open_connections();
        tracing::info!(node = %self.id, open, tunnels = self.dataplane.tunnels(), deadline_s = deadline.as_secs(), "no longer accepting; serving the connections open");
        self.dp_trigger.advance(Phase::Draining);
        let cut = async {
            shorten.await;
            tracing::info!(node = %self.id, rest_s = rest.as_secs(), "asked to stop: the open connections get the drain timeout");
            tokio::time::sleep(rest).await;
        };
        tokio::select! {
            _ = tokio::time::timeout(deadline, self.dataplane.drained()) => {}
            _ = cut => {}
        }
        self.dp_trigger.advance(Phase::Stopped);
        if let Some(dp) = Arc::into_inner(self.dataplane) {
            let _ = tokio::task::spawn_blocking(move || dp.join()).await;
        }
        tracing::info!(node = %self.id, "stopped after the handover");
    }
}
