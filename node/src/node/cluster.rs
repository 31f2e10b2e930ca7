//! The cluster side of a start: the node certificate checked against the node's name, then
//! gossip, the Raft RPC server, bootstrap, CheckQuorum, the membership loops and the node
//! certificate's watcher.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use anyhow::Context;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{ClusterOptions, NodeOptions, certs};
use crate::control::gossip::{Gossip, GossipOptions};
use crate::control::membership;
use crate::control::raft::{RaftNode, quorum, server};
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;

/// A started cluster side: gossip, and the tasks that serve and watch it.
pub(super) struct Started {
    pub gossip: Arc<Gossip>,
    pub tasks: Vec<JoinHandle<()>>,
}

/// The node certificate must name this node and its cluster: peers bind the name to the
/// node's Raft id, and gossip announces it.
pub(super) fn check_identity(id: &str, c: &ClusterOptions) -> anyhow::Result<()> {
    let me = c.creds.tls.me();
    if me.node != id || me.cluster != c.name {
        anyhow::bail!(
            "the node certificate is for node {:?} of cluster {:?}, but this node is {id:?} of cluster {:?} \
             (make one with `shoal cert node --id {id}`, or leave --id and --cluster-name out to take them from it)",
            me.node,
            me.cluster,
            c.name
        );
    }
    Ok(())
}

/// Starts gossip, the Raft RPC server, bootstrap and the membership loop.
pub(super) async fn start(
    c: &ClusterOptions,
    opts: &NodeOptions,
    raft: &Arc<RaftNode>,
    (admin, listen_ip): (SocketAddr, IpAddr),
    metrics: &Arc<Metrics>,
    shutdown: &Shutdown,
) -> anyhow::Result<Started> {
    let mut tasks = Vec::new();
    let rpc = tokio::net::TcpListener::bind(c.addr)
        .await
        .with_context(|| format!("cannot bind the cluster address {} (TCP)", c.addr))?;
    let keys = vec![
        ("raft_id".to_string(), raft.id.to_string()),
        ("raft_addr".to_string(), c.addr.to_string()),
        ("admin".to_string(), admin.to_string()),
        ("http".to_string(), SocketAddr::new(listen_ip, opts.http_port).to_string()),
        ("zone".to_string(), opts.zone.clone()),
        ("ready".to_string(), "0".to_string()),
        ("raft_init".to_string(), if raft.is_initialized().await { "1" } else { "0" }.to_string()),
    ];
    let keys = keys.into_iter().chain(raft.ident.get().map(|id| ("cluster_id".to_string(), id.to_string()))).collect();
    let gopts = GossipOptions {
        name: opts.id.clone(),
        cluster_id: c.name.clone(),
        addr: c.addr,
        seeds: c.join.clone(),
        interval: c.gossip_interval,
        key: c.creds.key.clone(),
        filter: c.gossip_filter.clone(),
        state_file: Some(opts.data_dir.join(crate::control::incarnation::FILE)),
    };
    let gossip = Arc::new(Gossip::start(&gopts, keys, metrics.clone()).await?);
    // Peers' connections wait in the backlog until gossip, which forwarded removals need, runs.
    tasks.push(tokio::spawn(server::serve(rpc, raft.clone(), metrics.clone(), gossip.members.clone())));
    let expect = if c.expect == 0 && c.join.is_empty() { 1 } else { c.expect };
    tasks.push(tokio::spawn(membership::bootstrap(raft.clone(), gossip.clone(), expect, shutdown.clone())));
    tasks.push(tokio::spawn(membership::publish_identity(raft.clone(), gossip.clone(), shutdown.clone())));
    tasks.push(tokio::spawn(certs::watch_cluster_certificate(c.creds.tls.clone(), metrics.clone())));
    let limit = quorum::QuorumWatch::limit_for(c.raft.election_max);
    tasks.push(tokio::spawn(quorum::run(raft.clone(), limit, shutdown.clone())));
    tasks.push(tokio::spawn(membership::reconcile(
        raft.clone(),
        gossip.members.clone(),
        c.policy.clone(),
        shutdown.clone(),
    )));
    Ok(Started { gossip, tasks })
}

/// Live node names for probe sharding (empty for a node without gossip).
pub(super) fn live_names(gossip: Option<&Gossip>) -> (watch::Receiver<Arc<Vec<String>>>, Option<JoinHandle<()>>) {
    let (tx, rx) = watch::channel(Arc::new(Vec::new()));
    let task = gossip.map(|g| {
        let mut members = g.members.clone();
        tokio::spawn(async move {
            loop {
                let names = members.borrow_and_update().live_names();
                tx.send_if_modified(|n| (**n != names).then(|| *n = Arc::new(names)).is_some());
                if members.changed().await.is_err() {
                    return;
                }
            }
        })
    });
    (rx, task)
}
