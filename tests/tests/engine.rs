//! The HTTP/1 engine's exchange rules, black box: a backend connection is reused only when both
//! bodies are complete (and not once the backend closed it), pipelined requests are answered in
//! order, upgrades other than WebSocket never reach a backend, and an idle keep-alive connection
//! holds no buffer.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::json;
use shoal_tests::{HttpBackend, TestNode, eventually, get_text, rss_kib};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// A pool on `/` with no active check, so a raw mock backend is routable at once.
async fn node_with(id: &str, backend: SocketAddr, threads: usize) -> TestNode {
    let node = TestNode::start_in(id, tempfile::tempdir().expect("dir"), |o| o.threads = threads).await;
    node.put("/v1/pools/web", json!({"pattern": "/", "health": {"check": "none"}})).await;
    node.put(&format!("/v1/pools/web/backends/{backend}"), json!({})).await;
    node
}

/// Reads one request head (up to the blank line) from `s`.
async fn read_head(s: &mut TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte).await.ok()? == 0 {
            return None;
        }
        head.push(byte[0]);
    }
    Some(String::from_utf8_lossy(&head).into_owned())
}

/// A backend that answers every request head at once with `answer`, never reading bodies,
/// keeping connections open; it counts connections and reports each head.
async fn mock_backend(answer: &'static str) -> (SocketAddr, Arc<AtomicUsize>, mpsc::UnboundedReceiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let conns = Arc::new(AtomicUsize::new(0));
    let (tx, rx) = mpsc::unbounded_channel();
    let counted = conns.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            let tx = tx.clone();
            tokio::spawn(async move {
                while let Some(head) = read_head(&mut s).await {
                    let _ = tx.send(head);
                    if s.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, conns, rx)
}

/// Reads from `s` until `n` complete responses with Content-Length bodies arrived (bounded).
async fn read_responses(s: &mut TcpStream, n: usize) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while count_responses(&got) < n {
        let read = tokio::time::timeout_at(deadline, s.read(&mut buf)).await.expect("responses in time");
        let k = read.expect("read");
        assert!(k > 0, "connection closed after {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..k]);
    }
    String::from_utf8_lossy(&got).into_owned()
}

fn count_responses(raw: &[u8]) -> usize {
    let text = String::from_utf8_lossy(raw);
    let mut rest = &text[..];
    let mut n = 0;
    while let Some(end) = rest.find("\r\n\r\n") {
        let head = &rest[..end];
        let len: usize = head
            .lines()
            .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap_or(0)))
            .unwrap_or(0);
        if rest.len() < end + 4 + len {
            break;
        }
        rest = &rest[end + 4 + len..];
        n += 1;
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_answers_early_never_parks_the_next_client() {
    let (backend, conns, _heads) = mock_backend("HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n").await;
    let node = node_with("engine-early", backend, 1).await;
    eventually(Duration::from_secs(10), "routable", || async {
        get_text(node.http(), "/").await.ok().filter(|(s, _)| s.as_u16() == 401)
    })
    .await;
    // Client A starts a large upload and stalls after a few bytes; the backend answered early.
    let mut a = TcpStream::connect(node.http()).await.expect("connect A");
    a.write_all(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n0123456789").await.expect("A");
    let answer = read_responses(&mut a, 1).await;
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    assert!(answer.to_ascii_lowercase().contains("connection: close"), "A is told its connection ends: {answer}");
    // Client B on the same (only) worker gets its own backend connection, promptly.
    let before = conns.load(Ordering::SeqCst);
    let b = tokio::time::timeout(Duration::from_secs(2), get_text(node.http(), "/next")).await;
    let (status, _) = b.expect("B answered within 2 s").expect("B");
    assert_eq!(status.as_u16(), 401);
    assert!(conns.load(Ordering::SeqCst) > before, "B did not get A's half-used backend connection");
    drop(a);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_in_order() {
    let b = HttpBackend::start("p").await;
    let node = node_with("engine-pipeline", b.addr, 1).await;
    eventually(Duration::from_secs(10), "routable", || async {
        get_text(node.http(), "/").await.ok().filter(|(s, _)| s.is_success())
    })
    .await;
    let mut s = TcpStream::connect(node.http()).await.expect("connect");
    let three = "GET /first HTTP/1.1\r\nHost: x\r\n\r\nGET /second HTTP/1.1\r\nHost: x\r\n\r\nGET /third HTTP/1.1\r\nHost: x\r\n\r\n";
    s.write_all(three.as_bytes()).await.expect("write");
    let answers = read_responses(&mut s, 3).await;
    let at = |p: &str| answers.find(&format!("path={p} ")).unwrap_or_else(|| panic!("{p} answered: {answers}"));
    assert!(at("/first") < at("/second") && at("/second") < at("/third"), "{answers}");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrades_other_than_websocket_never_reach_the_backend() {
    let (backend, _conns, mut heads) =
        mock_backend("HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n").await;
    let node = node_with("engine-h2c", backend, 1).await;
    let mut answer = String::new();
    eventually(Duration::from_secs(10), "answered", || async {
        let mut s = TcpStream::connect(node.http()).await.ok()?;
        let req = "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n";
        s.write_all(req.as_bytes()).await.ok()?;
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await.ok()?.ok()?;
        let text = String::from_utf8_lossy(&out).into_owned();
        text.starts_with("HTTP/1.1 502").then_some(())
    })
    .await;
    while let Ok(head) = heads.try_recv() {
        let lower = head.to_ascii_lowercase();
        assert!(!lower.contains("upgrade:") && !lower.contains("http2-settings"), "reached the backend: {head}");
        answer = head;
    }
    assert!(!answer.is_empty(), "the request itself was forwarded");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_hold_no_buffers() {
    let b = HttpBackend::start("idle").await;
    let node = node_with("engine-idle", b.addr, 1).await;
    eventually(Duration::from_secs(10), "routable", || async {
        get_text(node.http(), "/").await.ok().filter(|(s, _)| s.is_success())
    })
    .await;
    const CONNS: usize = 1000;
    let before = rss_kib(std::process::id());
    let mut idle = Vec::with_capacity(CONNS);
    for _ in 0..CONNS {
        let mut s = TcpStream::connect(node.http()).await.expect("connect");
        s.write_all(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("write");
        read_responses(&mut s, 1).await;
        idle.push(s);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let per_conn = rss_kib(std::process::id()).saturating_sub(before) as f64 / CONNS as f64;
    // This process also holds the client sockets and the backend's side. hyper's engine held
    // 16 KiB of buffers per idle connection; the engine holds none.
    assert!(per_conn < 8.0, "{per_conn:.1} KiB of RSS per idle keep-alive connection");
    // Every idle connection still works.
    for s in idle.iter_mut().step_by(100) {
        s.write_all(b"GET /again HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("write");
        read_responses(s, 1).await;
    }
    node.stop().await;
}

/// A backend that answers one request per connection (reading its Content-Length body first)
/// as if keeping the connection, then closes it.
async fn one_shot_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Some(head) = read_head(&mut s).await else { return };
                let len = head
                    .lines()
                    .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string()))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                let mut body = vec![0u8; len];
                if s.read_exact(&mut body).await.is_ok() {
                    let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await;
                }
            });
        }
    });
    addr
}

/// The backend closes each connection right after its answer, while the proxy holds it idle:
/// the next request, a GET or an upload whose body is still on its way (which could not be
/// replayed on a fresh connection), must not be sent on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_connection_the_backend_closed_is_not_reused() {
    let node = node_with("engine-closed", one_shot_backend().await, 1).await;
    eventually(Duration::from_secs(10), "routable", || async {
        get_text(node.http(), "/").await.ok().filter(|(s, _)| s.is_success())
    })
    .await;
    for round in 0..3 {
        // Well within a second: the backend's close has arrived, the connection is still pooled.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (status, _) = get_text(node.http(), "/again").await.expect("GET");
        assert!(status.is_success(), "GET in round {round}: {status}");
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut s = TcpStream::connect(node.http()).await.expect("connect");
        s.write_all(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n01234").await.expect("head");
        tokio::time::sleep(Duration::from_millis(300)).await;
        s.write_all(b"56789").await.expect("rest of the body");
        let answer = read_responses(&mut s, 1).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "upload in round {round}: {answer}");
    }
    node.stop().await;
}
