//! Hostile input on the data plane. Every test also checks that the node keeps serving a
//! well-behaved client while (or after) it is abused.

use std::net::SocketAddr;
use std::time::Duration;

use http::StatusCode;
use serde_json::json;
use shoal_tests::{HttpBackend, TestNode, eventually, get_text};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

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

/// Sends raw bytes and returns what the node answers until it closes (bounded).
async fn exchange(addr: SocketAddr, bytes: &[u8]) -> (String, bool) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(bytes).await.expect("write");
    let mut out = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await.is_ok();
    (String::from_utf8_lossy(&out).into_owned(), closed)
}

async fn still_serves(node: &TestNode) {
    let (status, body) = get_text(node.http(), "/ok").await.expect("a normal client is served");
    assert_eq!(status, StatusCode::OK, "{body}");
}

fn status_of(answer: &str) -> u16 {
    answer.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_smuggling_shapes_get_400_and_a_closed_connection() {
    let (node, _b) = node_with_backend("hostile-smuggle", |_| {}).await;
    let cases: &[(&str, &[u8])] = &[
        ("CL + TE", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"),
        ("TE + CL", b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n"),
        ("conflicting CL", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"),
        ("obs-fold", b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n"),
        ("bad chunk size", b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"),
        ("chunk without CRLF", b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n"),
        ("TE not chunked", b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n"),
    ];
    for (name, bytes) in cases {
        let (answer, closed) = exchange(node.http(), bytes).await;
        assert_eq!(status_of(&answer), 400, "{name}: {answer}");
        assert!(closed, "{name}: connection closed");
        assert!(!answer.contains("smuggled"), "{name}: nothing behind the first request is served");
        still_serves(&node).await;
    }
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_overcrowded_heads_get_431() {
    let (node, _b) = node_with_backend("hostile-big", |o| o.limits.max_header_bytes = 16 * 1024).await;
    let mut big_header = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
    big_header.extend(std::iter::repeat_n(b'a', 100_000));
    big_header.extend_from_slice(b"\r\n\r\n");
    let mut long_line = b"GET /".to_vec();
    long_line.extend(std::iter::repeat_n(b'a', 100_000));
    long_line.extend_from_slice(b" HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut many = b"GET / HTTP/1.1\r\nHost: x\r\n".to_vec();
    (0..200).for_each(|i| many.extend_from_slice(format!("X-{i}: 1\r\n").as_bytes()));
    many.extend_from_slice(b"\r\n");
    for (name, bytes) in [("big header", big_header), ("long request line", long_line), ("too many headers", many)] {
        let (answer, closed) = exchange(node.http(), &bytes).await;
        assert!(matches!(status_of(&answer), 431 | 414), "{name}: {answer}");
        assert!(closed, "{name}");
        still_serves(&node).await;
    }
    node.stop().await;
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
async fn invalid_websocket_upgrades_fail_cleanly() {
    let (node, _b) = node_with_backend("hostile-ws", |_| {}).await;
    let no_key = b"GET /agent HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n";
    let (answer, _) = exchange(node.http(), no_key).await;
    assert_eq!(status_of(&answer), 400, "the backend refused the handshake and that answer passes: {answer}");
    let junk = b"GET /agent HTTP/1.1\r\nHost: x\r\nUpgrade: \x01\x02\r\nConnection: upgrade\r\n\r\n";
    let (answer, _) = exchange(node.http(), junk).await;
    assert!(status_of(&answer) >= 400, "{answer}");
    still_serves(&node).await;
    node.stop().await;
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_held_by_bounded_buffers() {
    let (node, _b) = node_with_backend("hostile-stall", |_| {}).await;
    let pid = std::process::id();
    let before = rss_kib(pid);
    let mut stalled = Vec::new();
    for _ in 0..4 {
        let mut s = TcpStream::connect(node.http()).await.expect("connect");
        s.write_all(b"GET /bytes/67108864 HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("write");
        stalled.push(s);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    still_serves(&node).await;
    let grown = rss_kib(pid).saturating_sub(before);
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
