//! A minority partition cannot commit: three in-process nodes whose Raft links pass through a
//! shared filter (the transport seam), the leader cut off from both followers.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use shoal_node::control::raft::RaftTiming;
use shoal_node::control::raft::network::LinkFilter;
use shoal_node::node::ClusterOptions;
use shoal_proto::{Command, PoolSpec};
use shoal_tests::{TestNode, eventually};

type Blocked = Arc<Mutex<HashSet<(u64, u64)>>>;

async fn start_three(blocked: &Blocked) -> Vec<TestNode> {
    let net = 200 + (std::process::id() % 50) as u8;
    let ip = |i: u8| IpAddr::V4(Ipv4Addr::new(127, net, 77, i));
    let port = 19947;
    let seeds: Vec<String> = (1..=3).map(|i| SocketAddr::new(ip(i), port).to_string()).collect();
    let key = shoal_node::control::secure::ClusterKey::generate();
    let mut nodes = Vec::new();
    for i in 1..=3u8 {
        let b = blocked.clone();
        let filter: LinkFilter =
            Arc::new(move |from, to| !b.lock().unwrap_or_else(|e| e.into_inner()).contains(&(from, to)));
        let mut c = ClusterOptions::new(SocketAddr::new(ip(i), port), seeds.clone(), 3, key.clone());
        c.gossip_interval = Duration::from_millis(200);
        c.raft = RaftTiming {
            heartbeat: Duration::from_millis(150),
            election_min: Duration::from_millis(800),
            election_max: Duration::from_millis(1600),
        };
        c.link_filter = Some(filter);
        let dir = tempfile::tempdir().expect("dir");
        nodes.push(
            TestNode::start_in(&format!("p{i}"), dir, |o| {
                o.cluster = Some(c);
                o.listen_ip = Some(ip(i));
                o.admin = SocketAddr::new(ip(i), 0);
            })
            .await,
        );
    }
    nodes
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
