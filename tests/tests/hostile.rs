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
        ("TE chunked twice", b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n"),
        ("duplicate equal CL", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello"),
        ("signed CL", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\nhello"),
        ("no Host", b"GET / HTTP/1.1\r\n\r\n"),
        ("two Hosts", b"GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n"),
        ("absolute-form host mismatch", b"GET http://other.example/ HTTP/1.1\r\nHost: x\r\n\r\n"),
        ("space in header name", b"GET / HTTP/1.1\r\nHost: x\r\nX A: b\r\n\r\n"),
        ("bare LF", b"GET / HTTP/1.1\nHost: x\n\n"),
        ("chunk extension with LF", b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5;a\nb\r\nhello\r\n0\r\n\r\n"),
        ("empty chunk size", b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\r\n"),
        ("WebSocket without key", b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"),
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

/// Sends one datagram and returns the node's answer, if any within 800 ms.
async fn ask(sock: &tokio::net::UdpSocket, to: SocketAddr, bytes: &[u8]) -> Option<String> {
    sock.send_to(bytes, to).await.expect("send");
    let mut buf = [0u8; 128];
    let got = tokio::time::timeout(Duration::from_millis(800), sock.recv_from(&mut buf)).await.ok()?.ok()?;
    Some(String::from_utf8_lossy(&buf[..got.0]).into_owned())
}

fn refused(metrics: &str, reason: &str) -> u64 {
    let label = format!("reason=\"{reason}\"");
    metrics
        .lines()
        .find(|l| l.starts_with("shoal_heartbeats_refused_total{") && l.contains("pool=\"hb\"") && l.contains(&label))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}

/// Issue 14, finding 1: a captured identification replayed from elsewhere or twice, keepalives
/// from another source, bare, replayed or forged keepalives, and registrations past the cap are
/// all refused, each counted by reason; the real backend alone is routed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_replays_spoofs_and_extra_registrations_are_refused_and_counted() {
    use shoal_node::health::heartbeat::{answer_nonce, ok_mac};
    use shoal_proto::heartbeat::encode_ok;
    use tokio::net::UdpSocket;

    let node = TestNode::start("hostile-hb").await;
    let (listen, hb, secret) = (shoal_tests::free_port(), shoal_tests::free_udp_port(), "hostile-s3cret");
    let health = json!({"heartbeat_port": hb, "heartbeat_secret": secret, "heartbeat_timeout_ms": 1000});
    let spec =
        json!({"protocol": "tcp", "listen": listen, "self_register": true, "max_self_registered": 1, "health": health});
    node.put("/v1/pools/hb", spec).await;
    let lb: SocketAddr = ([127, 0, 0, 1], hb).into();
    let backend = UdpSocket::bind("127.0.0.1:0").await.expect("udp");
    let attacker = UdpSocket::bind("127.0.0.2:0").await.expect("udp on 127.0.0.2");
    let (tcp, udp): (SocketAddr, SocketAddr) = ("0.0.0.0:9000".parse().unwrap(), backend.local_addr().unwrap());
    let id = format!("{tcp} {udp}");

    let challenge = eventually(Duration::from_secs(15), "a nonce for the identification", || async {
        ask(&backend, lb, id.as_bytes()).await.filter(|r| r.starts_with("NONCE "))
    })
    .await;
    let nonce = challenge.trim_start_matches("NONCE ").to_string();
    let answer = format!("{id} {}", answer_nonce(secret, &nonce, tcp, udp));
    assert_eq!(ask(&attacker, lb, answer.as_bytes()).await, None, "captured answer replayed from elsewhere");
    assert_eq!(ask(&backend, lb, answer.as_bytes()).await.as_deref(), Some("OK"), "the real answer");
    assert_eq!(ask(&backend, lb, answer.as_bytes()).await, None, "the same answer twice");
    assert_eq!(ask(&attacker, lb, b"OK").await.as_deref(), Some("AUTH"), "keepalive from another source");
    let signed = encode_ok(1, &ok_mac(secret, &nonce, 1));
    assert_eq!(ask(&attacker, lb, &signed).await.as_deref(), Some("AUTH"), "signed keepalive from elsewhere");
    let other = format!("0.0.0.0:9100 {}", attacker.local_addr().unwrap());
    assert_eq!(ask(&attacker, lb, other.as_bytes()).await, None, "a second registration is over the cap");
    assert_eq!(ask(&backend, lb, &signed).await, None, "a valid keepalive is silent");

    // From the backend's own address (what a spoofer would forge): bare, replayed and forged
    // keepalives do not keep it up once real ones stop.
    const SPOOFS: u64 = 12;
    let forged = encode_ok(99, &ok_mac("guessed", &nonce, 99));
    for _ in 0..SPOOFS {
        for bytes in [&b"OK"[..], &signed, &forged] {
            backend.send_to(bytes, lb).await.expect("send");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let h = node.get("/v1/pools/hb/health").await;
    let list: Vec<(String, String)> = h["backends"]
        .as_array()
        .expect("backends")
        .iter()
        .map(|b| (b["addr"].as_str().unwrap_or("").to_string(), b["status"].as_str().unwrap_or("").to_string()))
        .collect();
    assert_eq!(list, vec![("127.0.0.1:9000".to_string(), "BS_SICK".to_string())], "{h}");

    let expected = [
        ("stale_nonce", 2),
        ("unknown_source", 2),
        ("cap", 1),
        ("unauthenticated", SPOOFS),
        ("replay", SPOOFS),
        ("bad_mac", SPOOFS),
    ];
    let metrics = eventually(Duration::from_secs(10), "every refusal counted", || async {
        let m = node.admin.raw(http::Method::GET, "/metrics", None).await.ok()?;
        let text = String::from_utf8_lossy(&m.1).into_owned();
        expected.iter().all(|(r, n)| refused(&text, r) == *n).then_some(text)
    })
    .await;
    for (reason, n) in expected {
        assert_eq!(refused(&metrics, reason), n, "{reason}");
    }
    node.stop().await;
}
