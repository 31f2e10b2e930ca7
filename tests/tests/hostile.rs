//! Hostile input. Four tables give every case its exact bytes and exact outcome: HTTP on the
//! data plane (`hostile/http_cases.rs`), seed 004 heartbeats (`hostile/heartbeat.rs`),
//! authenticated gossip (`hostile/gossip.rs`) and the Raft port's TLS and frames
//! (`hostile/cluster_port.rs`), each run by one test on one node that must keep serving or
//! committing. The other tests here are the abuse a table cannot hold: clients that trickle,
//! stall or flood (the cluster port's handshake floods are in `security.rs`).

use std::time::Duration;

use http::StatusCode;
use serde_json::json;
use shoal_tests::{HttpBackend, TestNode, eventually, get_text};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

// A test crate's root takes modules from its own folder; these live in `hostile/`.
#[path = "hostile/cluster_port.rs"]
mod cluster_port;
#[path = "hostile/gossip.rs"]
mod gossip;
#[path = "hostile/heartbeat.rs"]
mod heartbeat;
#[path = "hostile/http_cases.rs"]
mod http_cases;

/// Issue 14 asks for at least 60 hostile cases with exact outcomes; these tables hold this many.
const AT_LEAST: usize = 189 + 39;

async fn node_with_backend(
    id: &str,
    adjust: impl FnOnce(&mut shoal_node::node::NodeOptions),
) -> (TestNode, HttpBackend) {
    let node = TestNode::start_in(id, tempfile::tempdir().expect("dir"), adjust).await;
    let b = HttpBackend::start("b").await;
    node.put("/v1/pools/web", json!({"pattern": "/", "health": {"interval_ms": 300}})).await;
    node.put(&format!("/v1/pools/web/backends/{}", b.addr), json!({})).await;
    eventually(Duration::from_secs(10), "serving", || async {
        get_text(node.http(), "/").await.ok().filter(|(s, _)| s.is_success())
    })
    .await;
    (node, b)
}

async fn still_serves(node: &TestNode) {
    let (status, body) = get_text(node.http(), "/ok").await.expect("a normal client is served");
    assert_eq!(status, StatusCode::OK, "{body}");
}

/// Shows bytes for a failure message or the case list: printable ASCII as it is, the rest
/// escaped, long inputs cut.
fn shown(bytes: &[u8]) -> String {
    if bytes.is_empty() {
        return "(nothing)".into();
    }
    let text: String = bytes.iter().take(120).flat_map(|b| std::ascii::escape_default(*b)).map(char::from).collect();
    if bytes.len() > 120 { format!("{text}… ({} bytes)", bytes.len()) } else { text }
}

/// A case-list cell for bytes written out in a table.
fn code(bytes: &[u8]) -> String {
    format!("`{}`", shown(bytes))
}

/// Counts the tables (`cargo nextest run --test hostile -- --nocapture` shows the numbers) and,
/// with `HOSTILE_CASES_MD=<file>`, writes every case and its outcome there as a Markdown table
/// (bytes sent as they are in code, bytes built at run time described).
#[test]
fn the_tables_hold_every_case_once() {
    let rows: Vec<[String; 4]> =
        [http_cases::rows(), heartbeat::rows(), gossip::rows(), cluster_port::rows()].into_iter().flatten().collect();
    let counts = [
        ("HTTP", http_cases::CASES.len()),
        ("heartbeat", heartbeat::CASES.len()),
        ("gossip", gossip::CASES.len()),
        ("cluster port", cluster_port::CASES.len()),
    ];
    let total: usize = counts.iter().map(|(_, n)| n).sum();
    eprintln!("hostile cases: {counts:?}, {total} in all");
    assert_eq!(rows.len(), total);
    let mut names: Vec<(&str, &str)> = rows.iter().map(|r| (r[0].as_str(), r[1].as_str())).collect();
    names.sort_unstable();
    let before = names.len();
    names.dedup();
    assert_eq!(names.len(), before, "case names are unique within a family");
    assert!(total >= AT_LEAST, "{total} hostile cases, fewer than the {AT_LEAST} the suite had");
    if let Some(path) = std::env::var_os("HOSTILE_CASES_MD") {
        let cell = |s: &str| s.replace('|', "\\|");
        let mut md =
            format!("{total} cases: {counts:?}\n\n| family | case | sent | outcome |\n| --- | --- | --- | --- |\n");
        for r in &rows {
            md.push_str(&format!("| {} | {} | {} | {} |\n", r[0], cell(&r[1]), cell(&r[2]), cell(&r[3])));
        }
        std::fs::write(path, md).expect("write the case list");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_is_cut_off_at_the_header_timeout() {
    let (node, _b) = node_with_backend("hostile-slow", |o| o.limits.header_timeout = Duration::from_secs(2)).await;
    let started = Instant::now();
    let mut slow = TcpStream::connect(node.http()).await.expect("connect");
    slow.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.expect("write");
    let mut idle = TcpStream::connect(node.http()).await.expect("connect silent");
    let dripping = async {
        for i in 0..20 {
            if slow.write_all(format!("X-{i}: 1\r\n").as_bytes()).await.is_err() {
                break;
            }
            still_serves(&node).await;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut rest)).await;
        started.elapsed()
    };
    let cut_after = dripping.await;
    assert!(cut_after < Duration::from_secs(8), "the trickling client was cut off after {cut_after:?}");
    let mut buf = [0u8; 16];
    let silent = tokio::time::timeout(Duration::from_secs(6), idle.read(&mut buf)).await;
    assert!(matches!(silent, Ok(Ok(0)) | Ok(Err(_))), "a client that sends nothing is closed too: {silent:?}");
    still_serves(&node).await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_held_by_bounded_buffers() {
    let (node, _b) = node_with_backend("hostile-stall", |_| {}).await;
    let pid = std::process::id();
    let before = shoal_tests::rss_kib(pid);
    let mut stalled = Vec::new();
    for _ in 0..4 {
        let mut s = TcpStream::connect(node.http()).await.expect("connect");
        s.write_all(b"GET /bytes/67108864 HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("write");
        stalled.push(s);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    still_serves(&node).await;
    let grown = shoal_tests::rss_kib(pid).saturating_sub(before);
    // 4 × 64 MiB were requested; the backend produces them (this process hosts it too), but
    // the proxy holds only socket and stream buffers per stalled client.
    assert!(grown < 600 * 1024, "process RSS grew by {grown} KiB for 4 stalled 64 MiB downloads");
    drop(stalled);
    still_serves(&node).await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_floods_wait_in_the_queue_and_the_admin_api_stays_up() {
    let (node, _b) = node_with_backend("hostile-flood", |o| o.limits.max_connections = 20).await;
    let mut flood = Vec::new();
    for _ in 0..300 {
        if let Ok(s) = TcpStream::connect(node.http()).await {
            flood.push(s);
        }
    }
    let (status, _) = node.call(http::Method::GET, "/v1/cluster", None).await;
    assert_eq!(status, StatusCode::OK, "the admin API has its own socket and limits");
    // The flood holds every slot; a new client waits in the queue rather than being served.
    let queued = tokio::time::timeout(Duration::from_millis(800), get_text(node.http(), "/")).await;
    assert!(queued.is_err(), "beyond max_connections new clients wait");
    drop(flood);
    let (status, _) = eventually(Duration::from_secs(15), "served after the flood", || async {
        get_text(node.http(), "/").await.ok().filter(|(s, _)| s.is_success())
    })
    .await;
    assert_eq!(status, StatusCode::OK);
    node.stop().await;
}
