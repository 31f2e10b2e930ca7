//! PROXY protocol through a real node on loopback: headers accepted from trusted sources (the
//! HTTP listener's `--accept-proxy-from`, a TCP pool's `accept_proxy_from`) and their client
//! used for X-Forwarded-For and Maglev; untrusted, malformed and silent sources refused and
//! counted; `send_proxy` v1/v2 read by backends that require the header, health probes
//! (v2 LOCAL / v1 UNKNOWN) included.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use shoal_proto::proxy::{self, Frame, Header, Version};
use shoal_tests::{HttpBackend, LOCALHOST, TestNode, eventually, free_port, tls_client, write_cert};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

const WAIT: Duration = Duration::from_secs(20);

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("socket address")
}

/// Sends `bytes` on a new connection to `addr` and reads until the node closes it (a node
/// refusing the connection may reset it: what was read so far counts).
async fn exchange(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let _ = s.write_all(bytes).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut out)).await.expect("the node closes the connection");
    out
}

fn get_close(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: lb.test\r\nConnection: close\r\n\r\n").into_bytes()
}

fn counted(node: &TestNode, listener: &str, result: &str, version: &str) -> u64 {
    node.handle.shared.metrics.proxy_headers.with_label_values(&[listener, result, version]).get()
}

async fn wait_healthy(node: &TestNode, pool: &str, n: usize) {
    let path = format!("/v1/pools/{pool}/health");
    eventually(WAIT, &format!("{n} healthy in {pool}"), || async {
        let h = node.get(&path).await;
        let healthy = h["backends"].as_array()?.iter().filter(|b| b["status"] == "BS_HEALTHY").count();
        (healthy == n).then_some(())
    })
    .await;
}

/// A backend that requires a PROXY header on every connection (closing it otherwise), records
/// each header, and then echoes (TCP) or answers one HTTP request with the header's client
/// (`/healthz`: `ok`).
struct ProxyBackend {
    addr: SocketAddr,
    headers: Arc<Mutex<Vec<Header>>>,
    task: JoinHandle<()>,
}

impl ProxyBackend {
    async fn start(http: bool) -> ProxyBackend {
        let listener = TcpListener::bind((LOCALHOST, 0)).await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let headers = Arc::new(Mutex::new(Vec::new()));
        let seen = headers.clone();
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                tokio::spawn(serve_one(s, http, seen.clone()));
            }
        });
        ProxyBackend { addr, headers, task }
    }

    fn headers(&self) -> Vec<Header> {
        self.headers.lock().expect("lock").clone()
    }
}

impl Drop for ProxyBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_one(mut s: TcpStream, http: bool, seen: Arc<Mutex<Vec<Header>>>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let header = loop {
        let Ok(n) = s.read(&mut chunk).await else { return };
        if n == 0 {
            return;
        }
        buf.extend_from_slice(&chunk[..n]);
        match proxy::frame(&buf) {
            Ok(Frame::Complete(len)) => match proxy::parse(&buf[..len]) {
                Ok(h) => {
                    buf.drain(..len);
                    break h;
                }
                Err(_) => return,
            },
            Ok(Frame::Incomplete) => continue,
            Err(_) => return,
        }
    };
    seen.lock().expect("lock").push(header);
    if !http {
        // Echo what followed the header, then everything else.
        if s.write_all(&buf).await.is_err() {
            return;
        }
        let (mut r, mut w) = s.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
        return;
    }
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let Ok(n) = s.read(&mut chunk).await else { return };
        if n == 0 {
            return;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = if buf.starts_with(b"GET /healthz ") {
        "ok".to_string()
    } else {
        format!("client={}", header.addrs.map_or("local".to_string(), |(src, _)| src.to_string()))
    };
    let answer = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len());
    let _ = s.write_all(answer.as_bytes()).await;
    // Keep-alive as far as the backend is concerned: shoal decides whether to reuse.
    let _ = s.read(&mut chunk).await;
}

async fn node_accepting_from(id: &str, cidrs: &[&str]) -> TestNode {
    let dir = tempfile::tempdir().expect("temp dir");
    let cidrs: Vec<proxy::Cidr> = cidrs.iter().map(|c| c.parse().expect("cidr")).collect();
    TestNode::start_in(id, dir, |o| o.accept_proxy_from = cidrs).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_listener_takes_v1_and_v2_from_trusted_sources_and_refuses_the_rest() {
    let node = node_accepting_from("pp-http", &["127.0.0.0/8"]).await;
    let web = HttpBackend::start("web").await;
    node.put("/v1/pools/web", json!({"pattern": "/", "health": {"interval_ms": 200, "rise": 1}})).await;
    node.put(&format!("/v1/pools/web/backends/{}", web.addr), json!({})).await;
    wait_healthy(&node, "web", 1).await;
    let http = node.http();
    let listener = format!("http:{}", http.port());

    // v1: the header's client is the one X-Forwarded-For names; the request right behind it
    // in the same segment is served (the header reader took nothing more).
    let v1 = [b"PROXY TCP4 203.0.113.7 192.0.2.1 5555 80\r\n".as_slice(), &get_close("/a")].concat();
    let answer = String::from_utf8_lossy(&exchange(http, &v1).await).to_string();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("xff=203.0.113.7 "), "v1 client in X-Forwarded-For: {answer}");

    let header = proxy::encode(Version::V2, Some((sa("[2001:db8::7]:4000"), sa("[2001:db8::1]:80"))));
    let answer = String::from_utf8_lossy(&exchange(http, &[header, get_close("/b")].concat()).await).to_string();
    assert!(answer.contains("xff=2001:db8::7 "), "v2 client in X-Forwarded-For: {answer}");

    // v2 LOCAL (a balancer's own health check) keeps the socket's peer.
    let local = proxy::encode(Version::V2, None);
    let answer = String::from_utf8_lossy(&exchange(http, &[local, get_close("/c")].concat()).await).to_string();
    assert!(answer.contains("xff=127.0.0.1 "), "LOCAL keeps the peer: {answer}");
    assert_eq!(counted(&node, &listener, "ok", "v1"), 1);
    assert_eq!(counted(&node, &listener, "ok", "v2"), 2);

    // A trusted source without a header (or with a broken one) is closed unanswered.
    assert!(exchange(http, &get_close("/d")).await.is_empty(), "no header: closed without an answer");
    let broken = [b"PROXY TCP4 203.0.113.7 192.0.2.1 99999 80\r\n".as_slice(), &get_close("/e")].concat();
    assert!(exchange(http, &broken).await.is_empty(), "bad port: closed");
    assert_eq!(counted(&node, &listener, "malformed", "none"), 2);

    // A silent source does not hold its slot past the header deadline.
    let mut silent = TcpStream::connect(http).await.expect("connect");
    let mut out = Vec::new();
    let n = tokio::time::timeout(WAIT, silent.read_to_end(&mut out)).await.expect("closed after the deadline");
    assert_eq!(n.map(|_| out.len()).unwrap_or(0), 0);
    assert_eq!(counted(&node, &listener, "timeout", "none"), 1);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_listener_reads_the_header_before_the_tls_handshake() {
    let dir = tempfile::tempdir().expect("dir");
    let files = write_cert(dir.path(), "server", &["localhost"]);
    let tls = files.clone();
    let data = tempfile::tempdir().expect("data");
    let node = TestNode::start_in("pp-https", data, |o| {
        o.https_port = Some(0);
        o.tls = vec![tls];
        o.accept_proxy_from = vec!["127.0.0.1".parse().expect("cidr")];
    })
    .await;
    let web = HttpBackend::start("web").await;
    node.put("/v1/pools/web", json!({"pattern": "/", "health": {"interval_ms": 200, "rise": 1}})).await;
    node.put(&format!("/v1/pools/web/backends/{}", web.addr), json!({})).await;
    wait_healthy(&node, "web", 1).await;
    let mut tcp = TcpStream::connect(node.https()).await.expect("connect");
    tcp.write_all(b"PROXY TCP6 2001:db8::9 2001:db8::1 6000 443\r\n").await.expect("header");
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
    let mut tls = tls_client(&files.cert).connect(name, tcp).await.expect("TLS handshake after the header");
    tls.write_all(&get_close("/")).await.expect("request");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(WAIT, tls.read_to_end(&mut out)).await.expect("answer");
    let answer = String::from_utf8_lossy(&out);
    assert!(answer.contains("xff=2001:db8::9 "), "{answer}");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_sources_are_refused_and_counted() {
    let node = node_accepting_from("pp-untrusted", &["10.0.0.0/8"]).await;
    let web = HttpBackend::start("web").await;
    node.put("/v1/pools/web", json!({"pattern": "/", "health": {"interval_ms": 200, "rise": 1}})).await;
    node.put(&format!("/v1/pools/web/backends/{}", web.addr), json!({})).await;
    wait_healthy(&node, "web", 1).await;
    let http = node.http();
    let v1 = [b"PROXY TCP4 10.1.1.1 10.0.0.1 5555 80\r\n".as_slice(), &get_close("/")].concat();
    assert!(exchange(http, &v1).await.is_empty(), "loopback is not in 10.0.0.0/8");
    assert_eq!(counted(&node, &format!("http:{}", http.port()), "untrusted", "none"), 1);

    // The API refuses a bad block (and an HTTP pool's own list) with a 400 naming the key.
    let (status, body) = node
        .call(
            http::Method::PUT,
            "/v1/pools/bad",
            Some(r#"{"protocol": "tcp", "listen": 9, "accept_proxy_from": ["10.0.0.0/33"]}"#),
        )
        .await;
    assert_eq!(status, http::StatusCode::BAD_REQUEST, "{body}");
    assert!(body["error"].as_str().is_some_and(|e| e.contains("accept_proxy_from")), "{body}");
    let (status, _) = node
        .call(http::Method::PUT, "/v1/pools/bad", Some(r#"{"pattern": "/x", "accept_proxy_from": ["10.0.0.0/8"]}"#))
        .await;
    assert_eq!(status, http::StatusCode::BAD_REQUEST);

    // A TCP pool's own list: the same rule on its listener.
    let echo = ProxyBackend::start(false).await;
    let port = free_port();
    let spec = json!({"protocol": "tcp", "listen": port, "accept_proxy_from": ["192.0.2.0/24"], "send_proxy": "v2",
        "health": {"interval_ms": 200, "rise": 1}});
    node.put("/v1/pools/l4", spec).await;
    node.put(&format!("/v1/pools/l4/backends/{}", echo.addr), json!({})).await;
    wait_healthy(&node, "l4", 1).await;
    let listener = format!("tcp:{port}");
    eventually(WAIT, "TCP listener refuses loopback", || async {
        let refused = exchange((LOCALHOST, port).into(), b"PROXY UNKNOWN\r\nhello").await.is_empty();
        (refused && counted(&node, &listener, "untrusted", "none") > 0).then_some(())
    })
    .await;
    assert!(echo.headers().iter().all(|h| h.addrs.is_none()), "only probes reached the backend");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_pool_balances_and_forwards_on_the_header_client() {
    let node = TestNode::start("pp-tcp").await;
    let (a, b) = (ProxyBackend::start(false).await, ProxyBackend::start(false).await);
    let port = free_port();
    // v1 to the backends: probes send UNKNOWN, which they must accept to be healthy.
    // A generous `fall`: a probe stalled on a loaded machine must not move clients mid-test.
    let spec = json!({"protocol": "tcp", "listen": port, "algorithm": "maglev", "accept_proxy_from": ["127.0.0.1"],
        "send_proxy": "v1", "health": {"interval_ms": 200, "rise": 1, "fall": 20, "timeout_ms": 3000}});
    node.put("/v1/pools/l4", spec).await;
    for be in [&a, &b] {
        node.put(&format!("/v1/pools/l4/backends/{}", be.addr), json!({})).await;
    }
    wait_healthy(&node, "l4", 2).await;
    assert!(a.headers().iter().chain(&b.headers()).all(|h| h.version == Version::V1 && h.addrs.is_none()));

    let addr: SocketAddr = (LOCALHOST, port).into();
    // The health API can show both backends healthy a moment before the routing table routes
    // to both: clients of another range go through until each backend has had one.
    eventually(WAIT, "the data plane routes to both backends", || async {
        for i in 1..=16u8 {
            let header =
                proxy::encode(Version::V2, Some((SocketAddr::from(([203, 0, 113, i], 40_000)), sa("192.0.2.1:7000"))));
            exchange_half(addr, &[header, b"warm".to_vec()].concat()).await;
        }
        let served = |be: &ProxyBackend| be.headers().iter().any(|h| h.addrs.is_some());
        (served(&a) && served(&b)).then_some(())
    })
    .await;
    let warmed = counted(&node, &format!("tcp:{port}"), "ok", "v2");
    let mut landed: HashMap<SocketAddr, SocketAddr> = HashMap::new();
    for round in 0..2 {
        for i in 1..=16u8 {
            let client = SocketAddr::from(([198, 51, 100, i], 40_000 + u16::from(i)));
            let header = proxy::encode(Version::V2, Some((client, sa("192.0.2.1:7000"))));
            let echoed = exchange_half(addr, &[header, b"ping".to_vec()].concat()).await;
            assert_eq!(echoed, b"ping", "round {round}, client {client}");
            let backend = [&a, &b]
                .into_iter()
                .find(|be| be.headers().iter().filter(|h| h.addrs.map(|x| x.0) == Some(client)).count() == round + 1)
                .map(|be| be.addr)
                .expect("one backend saw this client's header");
            // The backend's header names the client and the address it connected to.
            let seen = a.headers().into_iter().chain(b.headers()).find(|h| h.addrs.map(|x| x.0) == Some(client));
            assert_eq!(seen.and_then(|h| h.addrs), Some((client, sa("192.0.2.1:7000"))));
            assert_eq!(*landed.entry(client).or_insert(backend), backend, "Maglev keeps {client} on one backend");
        }
    }
    let used: HashSet<SocketAddr> = landed.values().copied().collect();
    assert_eq!(used.len(), 2, "the header's clients spread over both backends (the socket peer is one address)");
    assert_eq!(counted(&node, &format!("tcp:{port}"), "ok", "v2"), warmed + 32);
    node.stop().await;
}

/// Sends `bytes`, half-closes, and reads the echo until the node closes.
async fn exchange_half(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(bytes).await.expect("write");
    s.shutdown().await.expect("half close");
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut out)).await.expect("echo ends").expect("read");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_pool_sends_a_header_per_backend_connection() {
    let node = TestNode::start("pp-send").await;
    let gw = ProxyBackend::start(true).await;
    // HTTP probes to this backend start with v2 LOCAL; it answers nothing without a header.
    node.put("/v1/pools/gw", json!({"pattern": "/", "send_proxy": "v2", "health": {"interval_ms": 200, "rise": 1}}))
        .await;
    node.put(&format!("/v1/pools/gw/backends/{}", gw.addr), json!({})).await;
    wait_healthy(&node, "gw", 1).await;
    assert!(gw.headers().iter().any(|h| h.version == Version::V2 && h.addrs.is_none()), "probes sent LOCAL");

    // Two keep-alive requests from one client, then one from another client connection: each
    // backend connection's header names the client connection it serves.
    let http = node.http();
    let mut c1 = TcpStream::connect(http).await.expect("connect");
    let c1_addr = c1.local_addr().expect("addr");
    for path in ["/one", "/two"] {
        let req = format!("GET {path} HTTP/1.1\r\nHost: lb.test\r\n\r\n");
        c1.write_all(req.as_bytes()).await.expect("write");
        let body = read_response(&mut c1).await;
        assert_eq!(body, format!("client={c1_addr}"), "{path}");
    }
    let mut c2 = TcpStream::connect(http).await.expect("connect");
    let c2_addr = c2.local_addr().expect("addr");
    c2.write_all(b"GET /three HTTP/1.1\r\nHost: lb.test\r\n\r\n").await.expect("write");
    assert_eq!(read_response(&mut c2).await, format!("client={c2_addr}"), "no connection of client 1 reused");
    let proxied: Vec<Header> = gw.headers().into_iter().filter(|h| h.addrs.is_some()).collect();
    assert_eq!(proxied.len(), 3, "one backend connection, and one header, per request: {proxied:?}");
    assert!(proxied.iter().all(|h| h.addrs.map(|x| x.1) == Some(http)), "destination is the listener");
    node.stop().await;
}

/// Reads one response with a Content-Length body and returns the body.
async fn read_response(s: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .expect("content-length");
            if buf.len() >= end + 4 + len {
                return String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).to_string();
            }
        }
        let n = tokio::time::timeout(WAIT, s.read(&mut chunk)).await.expect("answer in time").expect("read");
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&buf));
        buf.extend_from_slice(&chunk[..n]);
    }
}
