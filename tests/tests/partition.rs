//! A minority partition cannot commit: three in-process nodes whose Raft links pass through a
//! shared filter (the transport seam), the leader cut off from both followers. Two clusters
//! formed apart (gossip cut at first boot through the gossip seam) never merge once they meet.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use shoal_node::control::gossip_auth::GossipFilter;
use shoal_node::control::raft::RaftTiming;
use shoal_node::control::raft::network::LinkFilter;
use shoal_node::node::ClusterOptions;
use shoal_proto::{Command, PoolSpec};
use shoal_tests::{TestNode, eventually};

type Blocked = Arc<Mutex<HashSet<(u64, u64)>>>;

/// `count` clustered nodes named `{prefix}1..`, node `i` at 127.N.`subnet`.`i` (N from the
/// process id, so parallel runs keep apart) on `port`, with fast gossip and elections; `seam`
/// sets a node's link or gossip filter.
async fn start_cluster(
    prefix: &str,
    subnet: u8,
    port: u16,
    count: u8,
    expect: usize,
    mut seam: impl FnMut(u8, &mut ClusterOptions),
) -> Vec<TestNode> {
    let net = 200 + (std::process::id() % 50) as u8;
    let ip = |i: u8| IpAddr::V4(Ipv4Addr::new(127, net, subnet, i));
    let seeds: Vec<String> = (1..=count).map(|i| SocketAddr::new(ip(i), port).to_string()).collect();
    let ca = shoal_node::control::raft::channel::testing::TestCa::new("shoal");
    let mut nodes = Vec::new();
    for i in 1..=count {
        let creds = ca.creds(&format!("{prefix}{i}"));
        let mut c = ClusterOptions::new(SocketAddr::new(ip(i), port), seeds.clone(), expect, creds);
        c.gossip_interval = Duration::from_millis(200);
        c.raft = RaftTiming {
            heartbeat: Duration::from_millis(150),
            election_min: Duration::from_millis(800),
            election_max: Duration::from_millis(1600),
        };
        seam(i, &mut c);
        let dir = tempfile::tempdir().expect("dir");
        nodes.push(
            TestNode::start_in(&format!("{prefix}{i}"), dir, |o| {
                o.cluster = Some(c);
                o.listen_ip = Some(ip(i));
                o.admin = SocketAddr::new(ip(i), 0);
            })
            .await,
        );
    }
    nodes
}

async fn start_three(blocked: &Blocked) -> Vec<TestNode> {
    start_cluster("p", 77, 19947, 3, 3, |_, c| {
        let b = blocked.clone();
        let filter: LinkFilter =
            Arc::new(move |from, to| !b.lock().unwrap_or_else(|e| e.into_inner()).contains(&(from, to)));
        c.link_filter = Some(filter);
    })
    .await
}

async fn leader_of(nodes: &[TestNode], among: &[usize]) -> Option<usize> {
    let mut seen = None;
    for &i in among {
        let st = nodes[i].handle.shared.raft.status().await;
        let leader = st.leader?;
        if seen.is_some_and(|s| s != leader) {
            return None;
        }
        seen = Some(leader);
    }
    let id = seen?;
    among.iter().copied().find(|i| nodes[*i].handle.shared.raft.id == id)
}

fn pool(pattern: &str) -> PoolSpec {
    PoolSpec { pattern: Some(pattern.into()), ..PoolSpec::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minority_cannot_commit_and_majority_goes_on() {
    let blocked: Blocked = Arc::default();
    let nodes = start_three(&blocked).await;
    let all = [0, 1, 2];
    let leader = eventually(Duration::from_secs(30), "a leader", || leader_of(&nodes, &all)).await;
    nodes[leader].put("/v1/pools/before", json!({"pattern": "/before/"})).await;
    let others: Vec<usize> = all.iter().copied().filter(|i| *i != leader).collect();

    // Cut the leader off in both directions.
    let lid = nodes[leader].handle.shared.raft.id;
    for &o in &others {
        let oid = nodes[o].handle.shared.raft.id;
        let mut b = blocked.lock().expect("lock");
        b.insert((lid, oid));
        b.insert((oid, lid));
    }
    let minority =
        nodes[leader].handle.shared.raft.propose(Command::PutPool { name: "minority".into(), spec: pool("/m/") });
    let outcome = tokio::time::timeout(Duration::from_secs(4), minority).await;
    assert!(!matches!(outcome, Ok(Ok(_))), "the isolated leader committed a write: {outcome:?}");

    // The majority elects a leader of its own and commits.
    let new_leader = eventually(Duration::from_secs(20), "majority leader", || leader_of(&nodes, &others)).await;
    assert_ne!(new_leader, leader);
    let v = nodes[others[0]].put("/v1/pools/majority", json!({"pattern": "/maj/"})).await;
    let version = v["version"].as_u64().expect("version");

    // Heal: the old leader catches up; the minority write never existed.
    blocked.lock().expect("lock").clear();
    eventually(Duration::from_secs(20), "old leader catches up", || async {
        (nodes[leader].handle.shared.state().version >= version).then_some(())
    })
    .await;
    for n in &nodes {
        let st = n.handle.shared.state();
        assert!(st.pools.contains_key("majority") && st.pools.contains_key("before"));
        assert!(!st.pools.contains_key("minority"), "uncommitted minority write leaked");
    }
    for n in nodes {
        n.stop().await;
    }
}

/// Four nodes, `--expect 2`, gossip cut {1,2} | {3,4} while `cut` holds.
async fn start_four_apart(cut: &Arc<AtomicBool>) -> Vec<TestNode> {
    let side = |addr: SocketAddr| match addr.ip() {
        IpAddr::V4(v4) => v4.octets()[3] <= 2,
        IpAddr::V6(_) => false,
    };
    start_cluster("m", 78, 19948, 4, 2, |i, c| {
        let cut = cut.clone();
        let mine = i <= 2;
        let filter: GossipFilter = Arc::new(move |peer| !cut.load(Ordering::Relaxed) || side(peer) == mine);
        c.gossip_filter = Some(filter);
    })
    .await
}

/// The Raft ids node `i` has in its membership (voters and learners).
async fn membership(nodes: &[TestNode], i: usize) -> HashSet<u64> {
    nodes[i].handle.shared.raft.status().await.nodes.keys().copied().collect()
}

/// Issue 14, finding 2: with `--expect` below a majority of the eventual size, two clusters
/// form while gossip is cut. Once they meet, neither adds the other's nodes, and each keeps
/// every write it acknowledged, before and after the heal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clusters_formed_apart_never_merge() {
    let cut = Arc::new(AtomicBool::new(true));
    let nodes = start_four_apart(&cut).await;
    let ids: Vec<u64> = nodes.iter().map(|n| n.handle.shared.raft.id).collect();
    let sides = [[0usize, 1], [2, 3]];
    let mut writes: Vec<Vec<&str>> = vec![vec![], vec![]];
    for (s, side) in sides.iter().enumerate() {
        eventually(Duration::from_secs(40), "a leader on each side", || leader_of(&nodes, side)).await;
        let want: HashSet<u64> = side.iter().map(|i| ids[*i]).collect();
        for &i in side {
            eventually(Duration::from_secs(20), "both nodes are members", || async {
                (membership(&nodes, i).await == want).then_some(())
            })
            .await;
        }
        for (k, name) in [["a1", "a2"], ["b1", "b2"]][s].iter().enumerate() {
            nodes[side[k]].put(&format!("/v1/pools/{name}"), json!({"pattern": format!("/{name}/")})).await;
            writes[s].push(name);
        }
    }

    // Heal gossip: everyone sees everyone, and the leaders get many reconcile rounds.
    cut.store(false, Ordering::Relaxed);
    for n in &nodes {
        eventually(Duration::from_secs(30), "all four live in gossip", || async {
            (n.handle.shared.members().live().count() == 4).then_some(())
        })
        .await;
    }
    tokio::time::sleep(Duration::from_secs(8)).await;
    for (s, side) in sides.iter().enumerate() {
        let name = ["a3", "b3"][s];
        let node = &nodes[side[1]];
        let v = eventually(Duration::from_secs(30), "a write after the heal", || async {
            node.admin
                .call::<serde_json::Value>(
                    http::Method::PUT,
                    &format!("/v1/pools/{name}"),
                    Some(json!({"pattern": format!("/{name}/")})),
                )
                .await
                .ok()
        })
        .await;
        assert!(v["version"].as_u64().is_some(), "{v}");
        writes[s].push(name);
    }
    tokio::time::sleep(Duration::from_secs(3)).await;

    for (s, side) in sides.iter().enumerate() {
        let want: HashSet<u64> = side.iter().map(|i| ids[*i]).collect();
        let last = writes[s].last().copied().unwrap_or_default();
        for &i in side {
            assert_eq!(membership(&nodes, i).await, want, "node {i} merged with the other cluster");
            eventually(Duration::from_secs(20), "the last write applied", || async {
                nodes[i].handle.shared.state().pools.contains_key(last).then_some(())
            })
            .await;
            let st = nodes[i].handle.shared.state();
            for name in &writes[s] {
                assert!(st.pools.contains_key(*name), "node {i} lost acknowledged write {name}");
            }
            for name in &writes[1 - s] {
                assert!(!st.pools.contains_key(*name), "node {i} holds the other cluster's {name}");
            }
        }
        let ids: HashSet<_> = side.iter().map(|i| nodes[*i].handle.shared.raft.ident.get()).collect();
        assert_eq!(ids.len(), 1, "one identity per cluster: {ids:?}");
    }
    let refused: u64 =
        nodes.iter().map(|n| n.handle.shared.metrics.cluster_id_mismatch.with_label_values(&["gossip"]).get()).sum();
    assert!(refused >= 2, "each leader counted the other cluster's nodes: {refused}");
    for n in nodes {
        n.stop().await;
    }
}
