//! Wall-clock jumps of one node, through the `--fault-injection` seam (`PUT /v1/debug/clock`):
//! its peers refuse its gossip as stale (counted, skew published) and see it dead while Raft
//! goes on (writes through it and through the others commit, it stays a voter); with its clock
//! back, every node sees every node live again. A node restarted with its clock behind its
//! previous incarnation is heard as soon as its clock is right (not refused as a replay).

use std::time::Duration;

use http::{Method, StatusCode};
use serde_json::{Value, json};
use shoal_tests::cluster::{CLUSTER_PORT, ProcCluster};
use shoal_tests::{TestNode, eventually};
use tokio::time::Instant;

const BIN: &str = env!("CARGO_BIN_EXE_shoal-under-test");
/// Gossip liveness changes within seconds; this is for a loaded 2-core machine.
const PATIENCE: Duration = Duration::from_secs(45);

async fn metrics(c: &ProcCluster, idx: usize) -> Option<String> {
    let (_, bytes) = c.nodes[idx].admin().raw(Method::GET, "/metrics", None).await.ok()?;
    Some(String::from_utf8_lossy(&bytes).into_owned())
}

/// The sum of a metric family's samples whose line contains `filter`.
fn sample(text: &str, family: &str, filter: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(family) && l.contains(filter))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn stale_refused(c: &ProcCluster, idx: usize) -> f64 {
    let text = metrics(c, idx).await.unwrap_or_default();
    sample(&text, "shoal_gossip_datagrams_dropped_total", "reason=\"stale\"")
}

/// The skew node `idx` last saw in node `peer`'s gossip stamps, in seconds.
async fn skew_of(c: &ProcCluster, idx: usize, peer: usize) -> Option<f64> {
    let text = metrics(c, idx).await?;
    let label = format!("peer=\"{}:{CLUSTER_PORT}\"", c.nodes[peer].ip);
    text.lines()
        .find(|l| l.starts_with("shoal_gossip_clock_skew_seconds") && l.contains(&label))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// Node `peer` as node `idx` sees it: (live, voter).
async fn seen(c: &ProcCluster, idx: usize, peer: usize) -> Option<(bool, bool)> {
    let view = c.view(idx).await?;
    let n = view["nodes"].as_array()?.iter().find(|n| n["id"] == c.nodes[peer].name.as_str())?;
    Some((n["live"].as_bool()?, n["voter"].as_bool()?))
}

async fn everyone_live(c: &ProcCluster) -> Option<()> {
    for i in 0..c.nodes.len() {
        for p in 0..c.nodes.len() {
            if seen(c, i, p).await? != (true, true) {
                return None;
            }
        }
    }
    Some(())
}

async fn set_clock(c: &ProcCluster, idx: usize, offset_ms: i64) {
    let body = json!({ "offset_ms": offset_ms });
    let answer: Value =
        c.nodes[idx].admin().call(Method::PUT, "/v1/debug/clock", Some(body)).await.expect("clock moved");
    assert_eq!(answer, json!({ "offset_ms": offset_ms }));
}

async fn term(c: &ProcCluster, idx: usize) -> u64 {
    c.view(idx).await.and_then(|v| v["term"].as_u64()).unwrap_or(0)
}

async fn ready(c: &ProcCluster, idx: usize) -> bool {
    c.nodes[idx].admin().raw(Method::GET, "/readyz", None).await.is_ok_and(|(s, _)| s == StatusCode::OK)
}

/// Node 3 jumps +90 s, then a node of the other Raft role (the leader, or a follower when node 3
/// leads) jumps -90 s; each is set back after its peers saw it dead and writes went through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_clock_jumps_is_refused_in_gossip_and_heard_again_when_it_is_back() {
    let mut c = ProcCluster::start(BIN, 3, &["--fault-injection"]).await;
    eventually(PATIENCE, "every node sees every node live", || everyone_live(&c)).await;
    assert!(c.nodes[0].log_text().contains("--fault-injection"), "the flag is announced at startup");
    let leader = c.wait_leader(PATIENCE).await;
    let term_before = term(&c, leader).await;
    let other_role = if leader == 2 { 0 } else { leader };
    let mut version = 0;
    for (offset_ms, skewed) in [(90_000i64, 2), (-90_000, other_role)] {
        let name = c.nodes[skewed].name.clone();
        let observers: Vec<usize> = (0..3).filter(|i| *i != skewed).collect();
        let mut before = [0.0; 3];
        for &i in &observers {
            before[i] = stale_refused(&c, i).await;
        }
        let jumped = Instant::now();
        set_clock(&c, skewed, offset_ms).await;
        eventually(PATIENCE, &format!("{offset_ms} ms: the others refuse {name}'s gossip and see it dead"), || async {
            for &i in &observers {
                let skew = skew_of(&c, i, skewed).await?;
                let refused = stale_refused(&c, i).await > before[i];
                // Dead in gossip, still a voter in Raft; and the skewed node refuses theirs.
                let dead = seen(&c, i, skewed).await? == (false, true) && seen(&c, skewed, i).await? == (false, true);
                ((skew * 1000.0 - offset_ms as f64).abs() < 5_000.0 && refused && dead).then_some(())?;
            }
            Some(())
        })
        .await;
        eprintln!(
            "offset {offset_ms} ms on {name} ({}): seen dead by the others after {:?}",
            if skewed == leader { "leader" } else { "follower" },
            jumped.elapsed()
        );
        let log = c.nodes[observers[0]].log_text();
        let peer = format!("{}:{CLUSTER_PORT}", c.nodes[skewed].ip);
        assert!(log.contains("gossip peer's clock is off") && log.contains(&peer), "the refusal is logged with {peer}");

        // Raft does not care about wall clocks: writes through every node commit, and every
        // node stays ready.
        for via in [skewed, observers[0], observers[1]] {
            let pool = format!("skew-{via}-{}", offset_ms.signum());
            let v = c.put(via, &format!("/v1/pools/{pool}"), json!({ "pattern": format!("/{pool}/") })).await;
            let now = v["version"].as_u64().expect("version");
            assert!(now > version, "the write through {} committed", c.nodes[via].name);
            version = now;
        }
        for i in 0..3 {
            eventually(PATIENCE, "the writes are applied everywhere", || async {
                (c.nodes[i].admin().get::<Value>("/v1/state").await.ok()?["version"].as_u64()? >= version).then_some(())
            })
            .await;
            assert!(ready(&c, i).await, "{} stays ready", c.nodes[i].name);
        }

        let back = Instant::now();
        set_clock(&c, skewed, 0).await;
        eventually(PATIENCE, &format!("after {offset_ms} ms: every node sees every node live again"), || {
            everyone_live(&c)
        })
        .await;
        eprintln!(
            "offset {offset_ms} ms on {name}: every node live again {:?} after the clock was set back",
            back.elapsed()
        );
    }
    let term_after = term(&c, leader).await;
    eprintln!("Raft term before {term_before}, after {term_after} (the leader was {})", c.nodes[leader].name);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarted_with_its_clock_behind_is_heard_once_its_clock_is_right() {
    let mut c = ProcCluster::start(BIN, 3, &["--fault-injection"]).await;
    eventually(PATIENCE, "every node sees every node live", || everyone_live(&c)).await;
    let skewed = 2;
    // Its previous incarnation started seconds ago, so its clock now reads 90 s before that: a
    // generation and a sequence taken from the clock alone would be below the old ones.
    c.stop(skewed);
    let before = stale_refused(&c, 0).await;
    c.restart_with(skewed, &["--fault-clock-offset-ms=-90000"]);
    eventually(PATIENCE, "the restarted node's stamps are refused as stale: dead in gossip, still a voter", || async {
        let refused = stale_refused(&c, 0).await > before && skew_of(&c, 0, skewed).await? < -80.0;
        (refused && seen(&c, 0, skewed).await? == (false, true)).then_some(())
    })
    .await;
    let back = Instant::now();
    set_clock(&c, skewed, 0).await;
    eventually(PATIENCE, "the restarted node is heard again", || everyone_live(&c)).await;
    eprintln!("restarted 90 s behind: every node live {:?} after its clock was set right", back.elapsed());
    let replays = sample(&metrics(&c, 0).await.unwrap_or_default(), "shoal_gossip_datagrams_dropped_total", "replay");
    assert_eq!(replays, 0.0, "none of its datagrams was taken for a replay");
    c.put(skewed, "/v1/pools/after-restart", json!({"pattern": "/r/"})).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_clock_route_is_a_404_without_fault_injection_and_checks_its_body_with_it() {
    let off = TestNode::start("clock-off").await;
    for method in [Method::PUT, Method::GET] {
        let (status, body) = off.call(method.clone(), "/v1/debug/clock", Some(r#"{"offset_ms": 1000}"#)).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{method}: {body}");
        assert!(body["error"].as_str().is_some_and(|e| e.contains("--fault-injection")), "{body}");
    }
    off.stop().await;
    // With the flag: bad bodies are 400 JSON errors (none of them moves this process's clock).
    let on = TestNode::start_in("clock-on", tempfile::tempdir().expect("dir"), |o| o.fault_injection = true).await;
    let bad = [
        "",
        "{}",
        "not json",
        r#"{"offset_ms": "soon"}"#,
        r#"{"offset_ms": 1, "x": 2}"#,
        r#"{"offset_ms": 9223372036854775807}"#,
    ];
    for bad in bad {
        let (status, body) = on.call(Method::PUT, "/v1/debug/clock", Some(bad)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
        assert!(body["error"].is_string(), "{bad}: {body}");
    }
    let (status, _) = on.call(Method::GET, "/v1/debug/clock", None).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(shoal_node::clock::offset_ms(), 0);
    on.stop().await;
}
