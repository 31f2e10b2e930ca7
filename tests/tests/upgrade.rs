//! Seamless upgrade of a node process: a second `shoal node` started on the same data
//! directory takes over the listening sockets of the running one. Under steady load no request
//! fails, WebSockets opened before keep echoing through the old process until they close, and
//! the node is back in the cluster with its state.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use shoal_tests::cluster::ProcCluster;
use shoal_tests::{HttpBackend, eventually, get_text};
use tokio::net::TcpStream;

const BIN: &str = env!("CARGO_BIN_EXE_shoal-under-test");

/// Sequential GETs on new connections to `addr` until `stop`: (sent, failed).
async fn load(addr: std::net::SocketAddr, stop: Arc<AtomicBool>, sent: Arc<AtomicUsize>) -> Vec<String> {
    let mut failures = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        sent.fetch_add(1, Ordering::Relaxed);
        match tokio::time::timeout(Duration::from_secs(10), get_text(addr, "/")).await {
            Ok(Ok((s, body))) if s.is_success() && body.contains("hello from b1") => {}
            Ok(Ok((s, body))) => failures.push(format!("{s} {body}")),
            Ok(Err(e)) => failures.push(format!("{e:#}")),
            Err(_) => failures.push("no answer in 10 s".into()),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    failures
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_process_takes_over_the_leader_without_a_failed_request() {
    let mut c = ProcCluster::start(BIN, 3, &[]).await;
    let backend = HttpBackend::start("b1").await;
    c.put(0, "/v1/pools/web", json!({"pattern": "/", "health": {"interval_ms": 300}})).await;
    c.put(0, &format!("/v1/pools/web/backends/{}", backend.addr), json!({})).await;
    // The leader: the hardest case, its Raft role moves too.
    let target = c.wait_leader(Duration::from_secs(20)).await;
    let http = c.nodes[target].http();
    eventually(Duration::from_secs(30), "the pool answers through the target", || async {
        let (s, body) = get_text(http, "/").await.ok()?;
        (s.is_success() && body.contains("hello from b1")).then_some(())
    })
    .await;
    let mut sockets = Vec::new();
    for i in 0..3 {
        let tcp = TcpStream::connect(http).await.expect("connect");
        let (mut ws, _) = shoal_tests::ws_over(tcp, &format!("ws://{http}/agent"), &[]).await;
        shoal_tests::ws_echo(&mut ws, &format!("before the upgrade {i}")).await;
        sockets.push(ws);
    }
    let old_pid = c.nodes[target].pid().expect("pid");

    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..2).map(|_| tokio::spawn(load(http, stop.clone(), sent.clone()))).collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    c.take_over(target);
    eventually(Duration::from_secs(60), "the new process accepts", || async {
        c.nodes[target].log_text().contains("accepting; the old process drains its connections").then_some(())
    })
    .await;
    assert_ne!(c.nodes[target].pid(), Some(old_pid));
    // Traffic goes on through the new process for a while.
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    let mut failures = Vec::new();
    for client in clients {
        failures.extend(client.await.expect("client"));
    }
    let sent = sent.load(Ordering::Relaxed);
    assert!(sent > 50, "too little load to tell: {sent}");
    assert!(failures.is_empty(), "{} of {sent} requests failed: {failures:?}", failures.len());

    // The WebSockets opened before are still served by the old process, which waits for them.
    for (i, ws) in sockets.iter_mut().enumerate() {
        shoal_tests::ws_echo(ws, &format!("after the upgrade {i}")).await;
    }
    assert!(c.wait_previous_exit(target, Duration::from_millis(500)).await.is_none(), "the old process left early");
    drop(sockets);
    let status =
        c.wait_previous_exit(target, Duration::from_secs(30)).await.expect("the old process ends once drained");
    assert!(status.success(), "{status:?}");

    // The node is back in the cluster with its state: it sees a leader and three voters, a
    // write through it commits everywhere, and new WebSockets work.
    let mut view = Value::Null;
    for _ in 0..300 {
        view = c.view(target).await.unwrap_or_default();
        let live_voters = view["nodes"]
            .as_array()
            .map_or(0, |n| n.iter().filter(|n| n["voter"] == true && n["live"] == true).count());
        if view["leader"].is_string() && live_voters == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(view["leader"].is_string(), "no leader seen by the new process: {view}");
    let voters: Vec<&Value> = view["nodes"].as_array().into_iter().flatten().filter(|n| n["voter"] == true).collect();
    assert_eq!(voters.len(), 3, "{view}");
    assert!(voters.iter().all(|n| n["live"] == true), "{view}");
    let state = c.state(target).await;
    assert!(state["pools"]["web"].is_object(), "{state}");
    let written = c.put(target, "/v1/pools/after", json!({"pattern": "/after/"})).await;
    let version = written["version"].as_u64().expect("version");
    for i in 0..3 {
        eventually(Duration::from_secs(20), "the write reaches every node", || async {
            let s = c.nodes[i].admin().get::<Value>("/v1/state").await.ok()?;
            (s["version"].as_u64()? >= version).then_some(())
        })
        .await;
    }
    let tcp = TcpStream::connect(http).await.expect("connect");
    let (mut ws, _) = shoal_tests::ws_over(tcp, &format!("ws://{http}/agent"), &[]).await;
    shoal_tests::ws_echo(&mut ws, "through the new process").await;
}
