//! Three-node clusters of real processes: writes anywhere, leader loss, restarts, joining and
//! leaving nodes, cluster-wide heartbeats, sharded probes and identical Maglev tables.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::{Value, json};
use shoal_tests::cluster::ProcCluster;
use shoal_tests::{HeartbeatBackend, HttpBackend, eventually, get_text};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

const BIN: &str = env!("CARGO_BIN_EXE_shoal-under-test");

async fn wait_state_everywhere(c: &ProcCluster, nodes: &[usize], version: u64) {
    for &i in nodes {
        eventually(Duration::from_secs(20), &format!("{} reaches version {version}", c.nodes[i].name), || async move {
            let st = c.nodes[i].admin().get::<Value>("/v1/state").await.ok()?;
            (st["version"].as_u64()? >= version).then_some(())
        })
        .await;
    }
}

async fn wait_routable(c: &ProcCluster, idx: usize, pool: &str, n: usize) {
    let path = format!("/v1/pools/{pool}/health");
    eventually(Duration::from_secs(20), &format!("{n} healthy in {pool} on {}", c.nodes[idx].name), || {
        let path = path.clone();
        async move {
            let h: Value = c.nodes[idx].admin().get(&path).await.ok()?;
            let healthy = h["backends"].as_array()?.iter().filter(|b| b["status"] == "BS_HEALTHY").count();
            (healthy >= n).then_some(())
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_anywhere_and_traffic_survives_leader_loss() {
    let mut c = ProcCluster::start(BIN, 3, &[]).await;
    let backend = HttpBackend::start("b1").await;
    let leader = c.wait_leader(Duration::from_secs(20)).await;
    let follower = (leader + 1) % 3;
    let other = (leader + 2) % 3;
    c.put(follower, "/v1/pools/web", json!({"pattern": "/", "health": {"interval_ms": 300}})).await;
    let v = c.put(other, &format!("/v1/pools/web/backends/{}", backend.addr), json!({})).await;
    let version = v["version"].as_u64().expect("version");
    wait_state_everywhere(&c, &[0, 1, 2], version).await;
    let consistent: Value = c.nodes[follower].admin().get("/v1/pools?consistent=true").await.expect("consistent read");
    assert_eq!(consistent[0]["name"], "web");
    for i in 0..3 {
        wait_routable(&c, i, "web", 1).await;
        let (status, body) = get_text(c.nodes[i].http(), "/").await.expect("get");
        assert!(status.is_success() && body.contains("hello from b1"), "{}: {status} {body}", c.nodes[i].name);
    }
    // A WebSocket through a follower stays open across the leader's death.
    let tcp = TcpStream::connect(c.nodes[follower].http()).await.expect("connect");
    let (mut ws, _) = shoal_tests::ws_over(tcp, &format!("ws://{}/agent", c.nodes[follower].http()), &[]).await;
    shoal_tests::ws_echo(&mut ws, "before the leader dies").await;

    // kill -9 the leader while clients keep using the two survivors.
    let survivors = [follower, other];
    let killed_at = Instant::now();
    c.kill(leader);
    let (mut sent, mut failed) = (0, 0);
    let mut new_leader = None;
    let mut election = Duration::ZERO;
    while killed_at.elapsed() < Duration::from_secs(15) && (new_leader.is_none() || sent < 200) {
        for &i in &survivors {
            sent += 1;
            match get_text(c.nodes[i].http(), "/").await {
                Ok((s, _)) if s.is_success() => {}
                _ => failed += 1,
            }
        }
        if new_leader.is_none()
            && let Some(l) = c.leader().await
        {
            new_leader = Some(l);
            election = killed_at.elapsed();
        }
    }
    eprintln!("leader killed: {sent} requests to survivors, {failed} failed, new leader after {election:?}");
    assert_eq!(failed, 0, "requests through surviving nodes failed");
    let new_leader = new_leader.expect("a new leader was elected");
    assert!(survivors.contains(&new_leader));
    assert!(election < Duration::from_secs(10), "election took {election:?}");
    shoal_tests::ws_echo(&mut ws, "after the leader died").await;
    let write_started = Instant::now();
    let v = c.put(survivors[0], "/v1/pools/api", json!({"pattern": "/api/"})).await;
    eprintln!("first write after the kill took {:?}", write_started.elapsed());

    // The killed node comes back and catches up.
    c.restart(leader);
    wait_state_everywhere(&c, &[0, 1, 2], v["version"].as_u64().expect("version")).await;
    let states: Vec<Value> = futures_util::future::join_all((0..3).map(|i| c.state(i))).await;
    assert!(states.windows(2).all(|w| w[0] == w[1]), "all nodes hold the same state");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_cluster_kill_and_restart_loses_nothing() {
    let mut c = ProcCluster::start(BIN, 3, &[]).await;
    let mut last = 0;
    for i in 0..10 {
        let body = json!({"pattern": format!("/p{i}/"), "algorithm": "least_conn"});
        last = c.put(i % 3, &format!("/v1/pools/p{i}"), body).await["version"].as_u64().expect("version");
    }
    c.put(1, "/v1/pools/p3/backends/10.9.9.9:80", json!({"force": true, "weight": 9})).await;
    last += 1;
    wait_state_everywhere(&c, &[0, 1, 2], last).await;
    let before = c.state(0).await;
    for i in 0..3 {
        c.kill(i);
    }
    for i in 0..3 {
        c.restart(i);
    }
    c.wait_leader(Duration::from_secs(30)).await;
    wait_state_everywhere(&c, &[0, 1, 2], last).await;
    for i in 0..3 {
        assert_eq!(c.state(i).await, before, "{} lost committed state", c.nodes[i].name);
    }
    // The restarted cluster still takes writes.
    c.put(2, "/v1/pools/after", json!({"pattern": "/after/"})).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_join_by_gossip_and_dead_voters_are_replaced() {
    let mut c = ProcCluster::start(BIN, 3, &["--dead-voter-grace", "4"]).await;
    let n4 = c.add_node("n4", 4, vec![]);
    let learner = eventually(Duration::from_secs(30), "n4 joins as a learner", || async {
        let v = c.view(0).await?;
        let n = v["nodes"].as_array()?.iter().find(|n| n["id"] == "n4")?.clone();
        (n["role"] == "learner" && n["voter"] == false).then_some(n)
    })
    .await;
    assert_eq!(learner["live"], true);
    let leader = c.wait_leader(Duration::from_secs(20)).await;
    let victim = (0..3).find(|i| *i != leader).expect("a follower");
    let victim_name = c.nodes[victim].name.clone();
    c.kill(victim);
    let voters = eventually(Duration::from_secs(40), "dead voter removed and n4 promoted", || {
        let victim_name = victim_name.clone();
        let c = &c;
        async move {
            let v = c.view(leader).await?;
            let voters: Vec<String> = v["nodes"]
                .as_array()?
                .iter()
                .filter(|n| n["voter"] == true)
                .map(|n| n["id"].as_str().unwrap_or("").to_string())
                .collect();
            (voters.len() == 3 && !voters.contains(&victim_name) && voters.contains(&"n4".to_string()))
                .then_some(voters)
        }
    })
    .await;
    eprintln!("voters after replacing {victim_name}: {voters:?}");
    let _ = n4;
    c.put(leader, "/v1/pools/still", json!({"pattern": "/still/"})).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_to_one_node_is_routable_from_all() {
    let c = ProcCluster::start(BIN, 3, &[]).await;
    let listen = 19301;
    let hb_port = 19500;
    let backend = HeartbeatBackend::start(vec![(c.nodes[0].ip, hb_port).into()], None).await;
    c.put(1, "/v1/pools/logic", json!({"protocol": "tcp", "listen": listen, "health": {"heartbeat_port": hb_port}}))
        .await;
    let path = format!("/v1/pools/logic/backends/{}", backend.tcp);
    c.put(2, &path, json!({"heartbeat_addr": backend.udp.to_string()})).await;
    for i in 0..3 {
        wait_routable(&c, i, "logic", 1).await;
        let mut s = TcpStream::connect((c.nodes[i].ip, listen)).await.expect("connect");
        s.write_all(b"via any node").await.expect("write");
        let mut buf = [0u8; 12];
        s.read_exact(&mut buf).await.expect("echo");
        assert_eq!(&buf, b"via any node", "through {}", c.nodes[i].name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_are_sharded_two_per_backend_and_maglev_agrees() {
    let c = ProcCluster::start(BIN, 3, &["--probe-replicas", "2"]).await;
    let mut backends = Vec::new();
    for i in 0..5 {
        backends.push(HttpBackend::start(&format!("m{i}")).await);
    }
    c.put(0, "/v1/pools/hash", json!({"pattern": "/", "algorithm": "maglev", "health": {"interval_ms": 300}})).await;
    for b in &backends {
        c.put(1, &format!("/v1/pools/hash/backends/{}", b.addr), json!({})).await;
    }
    for i in 0..3 {
        wait_routable(&c, i, "hash", 5).await;
    }
    let probes: HashMap<String, Vec<String>> =
        eventually(Duration::from_secs(20), "every backend has 2 probers", || async {
            let p: HashMap<String, Vec<String>> = c.nodes[0].admin().get("/v1/cluster/probes").await.ok()?;
            let mut count: HashMap<&String, usize> = HashMap::new();
            p.values().flatten().for_each(|b| *count.entry(b).or_default() += 1);
            (count.len() == 5 && count.values().all(|n| *n == 2)).then_some(p.clone())
        })
        .await;
    eprintln!("probe assignment: {probes:?}");
    // Nodes agree once their health views do: a probe timing out on a loaded machine can make
    // one node's table differ for a moment, so each client gets a few seconds to converge.
    for k in 0..40u8 {
        let client = format!("10.{k}.{}.7", k.wrapping_mul(7));
        let c = &c;
        let client = &client;
        eventually(
            Duration::from_secs(10),
            &format!("every node picks the same backend for {client}"),
            || async move {
                let mut picks = Vec::new();
                for i in 0..3 {
                    let v: Value =
                        c.nodes[i].admin().get(&format!("/v1/pools/hash/pick?client={client}")).await.ok()?;
                    picks.push(v["backend"].as_str()?.to_string());
                }
                picks.windows(2).all(|w| w[0] == w[1]).then_some(())
            },
        )
        .await;
    }
}
