//! Operator actions on clusters of real processes: removing a stopped node from the Raft
//! membership at once (`shoal cluster remove`), and a node whose Raft storage fails (writes past
//! a file-size limit set with `prlimit`, standing in for a full disk) exiting instead of
//! lingering with a dead control plane, then failing to start with a clear error.

use std::time::Duration;

use http::{Method, StatusCode};
use serde_json::{Value, json};
use shoal_node::cli::client::ApiFailure;
use shoal_tests::cluster::ProcCluster;
use shoal_tests::eventually;

const BIN: &str = env!("CARGO_BIN_EXE_shoal-under-test");

/// What node `via` answers to `DELETE /v1/cluster/nodes/{target}`: the body, or the status
/// and error message.
async fn remove(c: &ProcCluster, via: usize, target: &str) -> Result<Value, (StatusCode, String)> {
    let path = format!("/v1/cluster/nodes/{target}");
    c.nodes[via].admin().call::<Value>(Method::DELETE, &path, None).await.map_err(|e| {
        match e.downcast_ref::<ApiFailure>() {
            Some(f) => (f.status, f.message.clone()),
            None => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
        }
    })
}

/// Node `name` as node `via` shows it in `/v1/cluster`.
async fn node_view(c: &ProcCluster, via: usize, name: &str) -> Option<Value> {
    let v = c.view(via).await?;
    v["nodes"].as_array()?.iter().find(|n| n["id"] == name).cloned()
}

/// `shoal cluster remove` run as an operator would, against node `via`.
async fn cli_remove(c: &ProcCluster, via: usize, target: &str) -> std::process::Output {
    let admin = format!("http://{}", c.nodes[via].admin_addr());
    let token = c.nodes[via].token_file.to_string_lossy().into_owned();
    let target = target.to_string();
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(BIN)
            .args(["--admin", &admin, "--token-file", &token, "cluster", "remove", &target])
            .env_remove("SHOAL_ADMIN")
            .env_remove("SHOAL_TOKEN")
            .output()
            .expect("run shoal")
    })
    .await
    .expect("cli")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_node_is_removed_at_once_and_rejoins_when_started_again() {
    // The default --dead-voter-grace (120 s) is far longer than this test: only the operator removes.
    let mut c = ProcCluster::start(BIN, 3, &[]).await;
    c.add_node("n4", 4, vec![]);
    eventually(Duration::from_secs(30), "n4 joins as a learner", || async {
        let n = node_view(&c, 0, "n4").await?;
        (n["role"] == "learner").then_some(())
    })
    .await;
    let leader = c.wait_leader(Duration::from_secs(20)).await;
    let victim = (0..3).find(|i| *i != leader).expect("a follower");
    let via = (0..3).find(|i| *i != leader && *i != victim).expect("another follower");
    let name = c.nodes[victim].name.clone();

    let (status, error) = remove(&c, via, &name).await.expect_err("a live node is refused");
    assert_eq!(status, StatusCode::CONFLICT, "{error}");
    assert!(error.contains("live in gossip") && error.contains("stop it first"), "{error}");
    let (status, error) = remove(&c, via, "nobody").await.expect_err("not a member");
    assert_eq!(status, StatusCode::NOT_FOUND, "{error}");

    let stopped = c.stop(victim).expect("stopped by SIGTERM");
    assert!(stopped.success(), "a SIGTERM shutdown is no failure: {stopped:?}");
    eventually(Duration::from_secs(30), "the leader sees the stopped node dead", || async {
        let n = node_view(&c, leader, &name).await?;
        (n["live"] == false).then_some(())
    })
    .await;
    // Through a follower: the leader decides and commits, the CLI returns once it has. Right
    // after a node dies chitchat may see it live once more (a late heartbeat relayed by a
    // peer): the operator is then told to stop it first, and tries again.
    let stdout = eventually(Duration::from_secs(30), "shoal cluster remove succeeds", || async {
        let out = cli_remove(&c, via, &name).await;
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success() || stderr.contains("live in gossip"), "shoal cluster remove: {stderr}{stdout}");
        out.status.success().then(|| stdout.into_owned())
    })
    .await;
    assert!(stdout.contains(&format!("{name} (Raft id")) && stdout.contains("voter) removed"), "{stdout}");
    for i in [leader, via] {
        let n = node_view(&c, i, &name).await.expect("gossip still remembers it");
        assert!(
            n["voter"] == false && matches!(n["role"].as_str(), Some("gone" | "joining")),
            "{}: {n}",
            c.nodes[i].name
        );
        eventually(Duration::from_secs(20), "the removed node shows as gone", || async {
            (node_view(&c, i, &name).await?["role"] == "gone").then_some(())
        })
        .await;
    }
    let (status, _) = remove(&c, via, &name).await.expect_err("removed already");
    assert_eq!(status, StatusCode::NOT_FOUND);

    // The cluster still commits, and the reconciler does not bring the dead node back.
    let v = c.put(leader, "/v1/pools/after", json!({"pattern": "/after/"})).await;
    assert!(v["version"].as_u64().is_some(), "{v}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let n = node_view(&c, leader, &name).await.expect("view");
    assert!(n["voter"] == false && n["role"] != "learner", "{n}");

    // Started again, it is live: the leader adds it back as a learner, like any new node.
    c.restart(victim);
    eventually(Duration::from_secs(40), "the restarted node rejoins", || async {
        let n = node_view(&c, leader, &name).await?;
        matches!(n["role"].as_str(), Some("learner" | "follower")).then_some(())
    })
    .await;
    c.put(via, "/v1/pools/rejoined", json!({"pattern": "/rejoined/"})).await;
}

/// Creates pool `name` through `leader` and waits until node `f` has applied it.
async fn write_and_catch_up(c: &ProcCluster, leader: usize, f: usize, name: &str) {
    let v = c.put(leader, &format!("/v1/pools/{name}"), json!({"pattern": format!("/{name}/")})).await;
    let version = v["version"].as_u64().expect("version");
    eventually(Duration::from_secs(30), &format!("node {f} caught up with {name}"), || async {
        let st = c.nodes[f].admin().get::<Value>("/v1/state").await.ok()?;
        (st["version"].as_u64()? >= version).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_raft_storage_fails_exits_and_does_not_start_on_a_full_disk() {
    let mut c = ProcCluster::start(BIN, 3, &[]).await;
    let leader = c.wait_leader(Duration::from_secs(20)).await;
    let f = (0..3).find(|i| *i != leader).expect("a follower");
    // Its logs through a pipe: once it may not write files, its log file could not take them.
    c.stop(f);
    c.nodes[f].pipe_logs = true;
    c.restart(f);
    write_and_catch_up(&c, leader, f, "before").await;

    // Every file write of the follower now fails (EFBIG), as on a full disk (ENOSPC).
    let pid = c.nodes[f].pid().expect("pid").to_string();
    let limited = std::process::Command::new("prlimit").args(["--pid", &pid, "--fsize=0"]).status().expect("prlimit");
    assert!(limited.success(), "prlimit failed");
    c.put(leader, "/v1/pools/during", json!({"pattern": "/during/"})).await;
    let status = c.nodes[f].wait_exit(Duration::from_secs(30)).await.expect("the node exits");
    let log = c.nodes[f].log_text();
    assert_eq!(status.code(), Some(i32::from(shoal_node::cli::EXIT_STORAGE_FAILED)), "{status:?}\n{log}");
    let line =
        log.lines().find(|l| l.contains("raft storage failed")).unwrap_or_else(|| panic!("no error line:\n{log}"));
    eprintln!("the failed node logged: {line}");
    assert!(line.contains("ERROR") && line.contains("File too large"), "{line}");
    assert!(line.contains("exiting so the supervisor restarts the node from its data directory"), "{line}");
    assert!(!log.contains("panicked"), "{log}");
    // The two others go on.
    c.put(leader, "/v1/pools/after", json!({"pattern": "/after/"})).await;

    // Restarted while the disk is still full: a clear error naming the data directory.
    c.nodes[f].wrapper = ["prlimit", "--fsize=0", "--"].map(String::from).to_vec();
    c.restart(f);
    let status = c.nodes[f].wait_exit(Duration::from_secs(30)).await.expect("the node gives up at start");
    let log = c.nodes[f].log_text();
    let start = log.rfind("cannot open the Raft store").map(|i| &log[i..]).unwrap_or_else(|| panic!("{log}"));
    eprintln!("restarted on a full disk: {}", start.lines().next().unwrap_or_default());
    assert_eq!(status.code(), Some(1), "{status:?}\n{log}");
    let data = c.nodes[f].data.to_string_lossy().into_owned();
    assert!(start.contains(&data) && start.contains("File too large"), "{start}");
    assert!(!log.contains("panicked"), "{log}");

    // With room again it starts from its data directory and catches up.
    c.nodes[f].wrapper.clear();
    c.restart(f);
    write_and_catch_up(&c, leader, f, "back").await;
}
