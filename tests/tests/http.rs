//! L7 HTTP proxy: pools by URL pattern, balancing, health checks, bodies, WebSocket upgrades.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use http::{Method, StatusCode};
use serde_json::json;
use shoal_node::control::raft::channel::testing::TestCa;
use shoal_node::node::ClusterOptions;
use shoal_tests::{HttpBackend, TestNode, eventually, get_text, raw_http};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

async fn add_backend(node: &TestNode, pool: &str, b: &HttpBackend, body: serde_json::Value) {
    node.put(&format!("/v1/pools/{pool}/backends/{}", b.addr), body).await;
}

async fn wait_healthy(node: &TestNode, pool: &str, n: usize) {
    let path = format!("/v1/pools/{pool}/health");
    eventually(Duration::from_secs(15), &format!("{n} healthy in {pool}"), || async {
        let h = node.get(&path).await;
        let healthy = h["backends"].as_array()?.iter().filter(|b| b["status"] == "BS_HEALTHY").count();
        (healthy == n).then_some(())
    })
    .await;
}

/// Which backend answered, from the demo backend's `hello from NAME ...` line.
fn who(body: &str) -> String {
    body.split_whitespace().nth(2).unwrap_or("").to_string()
}

async fn fast_pool(node: &TestNode, name: &str, pattern: &str) {
    node.put(
        &format!("/v1/pools/{name}"),
        json!({"pattern": pattern, "health": {"interval_ms": 200, "rise": 1, "fall": 2}}),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_by_pattern_and_joins_url_paths() {
    let node = TestNode::start("http-1").await;
    let (root, api) = (HttpBackend::start("root").await, HttpBackend::start("api").await);
    fast_pool(&node, "root", "/").await;
    fast_pool(&node, "api", "/api/").await;
    fast_pool(&node, "exact", "/exact").await;
    add_backend(&node, "root", &root, json!({})).await;
    add_backend(&node, "api", &api, json!({"url_path": "/v1"})).await;
    add_backend(&node, "exact", &api, json!({})).await;
    wait_healthy(&node, "api", 1).await;
    wait_healthy(&node, "root", 1).await;
    wait_healthy(&node, "exact", 1).await;
    let http = node.http();
    let (_, body) = get_text(http, "/anything").await.expect("root");
    assert_eq!(who(&body), "root");
    let (_, body) = get_text(http, "/api/users?id=7").await.expect("api");
    assert!(body.starts_with("hello from api path=/v1/api/users "), "{body}");
    assert!(body.contains("xff=127.0.0.1"), "X-Forwarded-For reaches the backend: {body}");
    let (_, body) = get_text(http, "/exact").await.expect("exact");
    assert_eq!(who(&body), "api");
    let (_, body) = get_text(http, "/exact/sub").await.expect("exact is not a subtree");
    assert_eq!(who(&body), "root");
    let redirect = raw_http(http, Method::GET, "/api?x=1", None).await.expect("redirect");
    assert_eq!(redirect.status, StatusCode::MOVED_PERMANENTLY);
    assert_eq!(redirect.headers["location"], "/api/?x=1");
    node.delete("/v1/pools/root").await;
    let (status, _) = get_text(http, "/nothing-here").await.expect("404");
    assert_eq!(status, StatusCode::NOT_FOUND);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_and_failed_backend_leaves_and_returns() {
    let node = TestNode::start("http-2").await;
    let a = HttpBackend::start("a").await;
    let b = HttpBackend::start("b").await;
    node.put("/v1/pools/web", json!({"pattern": "/", "health": {"interval_ms": 300}})).await;
    add_backend(&node, "web", &a, json!({})).await;
    add_backend(&node, "web", &b, json!({})).await;
    wait_healthy(&node, "web", 2).await;
    let http = node.http();
    let mut seen = Vec::new();
    for _ in 0..4 {
        seen.push(who(&get_text(http, "/").await.expect("get").1));
    }
    assert!(seen == ["a", "b", "a", "b"] || seen == ["b", "a", "b", "a"], "round robin: {seen:?}");

    // A dead backend leaves rotation within 3 health intervals, even without traffic.
    let b_addr = b.addr;
    b.kill();
    drop(b);
    let started = tokio::time::Instant::now();
    wait_healthy(&node, "web", 1).await;
    assert!(started.elapsed() <= Duration::from_millis(3 * 300 + 1500), "took {:?}", started.elapsed());
    for _ in 0..6 {
        let (status, body) = get_text(http, "/").await.expect("get");
        assert_eq!((status, who(&body)), (StatusCode::OK, "a".to_string()));
    }
    // It returns once it passes its checks again.
    let _b2 = HttpBackend::start_at("b", b_addr).await;
    wait_healthy(&node, "web", 2).await;
    let answers: Vec<String> = futures_util::future::join_all((0..6).map(|_| get_text(http, "/")))
        .await
        .into_iter()
        .map(|r| who(&r.expect("get").1))
        .collect();
    assert!(answers.contains(&"b".to_string()), "b is back in rotation: {answers:?}");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unhealthy_pool_answers_503_and_sick_backend_is_skipped() {
    let node = TestNode::start("http-3").await;
    let a = HttpBackend::start("a").await;
    let b = HttpBackend::start("b").await;
    fast_pool(&node, "web", "/").await;
    add_backend(&node, "web", &a, json!({})).await;
    add_backend(&node, "web", &b, json!({})).await;
    wait_healthy(&node, "web", 2).await;
    b.healthy.store(false, Ordering::Relaxed);
    wait_healthy(&node, "web", 1).await;
    for _ in 0..4 {
        assert_eq!(who(&get_text(node.http(), "/").await.expect("get").1), "a");
    }
    a.healthy.store(false, Ordering::Relaxed);
    wait_healthy(&node, "web", 0).await;
    let (status, body) = get_text(node.http(), "/").await.expect("get");
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    let h = node.get("/v1/pools/web/health").await;
    assert_eq!(h["status"], "PS_EMPTY");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_and_response_bodies_stream_through() {
    let node = TestNode::start("http-4").await;
    let a = HttpBackend::start("a").await;
    fast_pool(&node, "web", "/").await;
    add_backend(&node, "web", &a, json!({})).await;
    wait_healthy(&node, "web", 1).await;
    let payload: Vec<u8> = (0..1024 * 1024).map(|i: u32| (i % 251) as u8).collect();
    let echoed = raw_http(node.http(), Method::POST, "/upload", Some(payload.clone())).await.expect("post");
    assert_eq!(echoed.status, StatusCode::OK);
    assert!(echoed.body == payload, "POST body echoed byte for byte");
    let big = raw_http(node.http(), Method::GET, "/bytes/3000000", None).await.expect("big");
    assert_eq!(big.body.len(), 3_000_000);
    // Many requests in a row reuse backend connections and keep working.
    for _ in 0..50 {
        assert_eq!(get_text(node.http(), "/").await.expect("get").0, StatusCode::OK);
    }
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_survives_pool_changes() {
    let node = TestNode::start("http-ws").await;
    let a = HttpBackend::start("a").await;
    let b = HttpBackend::start("b").await;
    fast_pool(&node, "ws", "/").await;
    add_backend(&node, "ws", &a, json!({})).await;
    wait_healthy(&node, "ws", 1).await;
    let mut ws = connect_ws(node.http(), "/agent").await;
    let mut round = 0;
    let mut check = async |ws: &mut Ws| {
        round += 1;
        let text = format!("round {round}");
        ws.send(Message::text(text.clone())).await.expect("send");
        assert_eq!(ws.next().await.expect("open").expect("frame"), Message::text(text));
    };
    check(&mut ws).await;
    add_backend(&node, "ws", &b, json!({"weight": 3})).await;
    check(&mut ws).await;
    fast_pool(&node, "ws", "/").await;
    node.put("/v1/pools/ws", json!({"pattern": "/", "algorithm": "least_conn"})).await;
    check(&mut ws).await;
    node.put(&format!("/v1/pools/ws/backends/{}/drain", a.addr), json!({"drain": true})).await;
    check(&mut ws).await;
    node.delete(&format!("/v1/pools/ws/backends/{}", a.addr)).await;
    check(&mut ws).await;
    node.delete("/v1/pools/ws").await;
    check(&mut ws).await;
    // Large binary messages and pings pass untouched.
    let big: Vec<u8> = (0..1024 * 1024).map(|i: u32| (i % 253) as u8).collect();
    ws.send(Message::binary(big.clone())).await.expect("send big");
    assert_eq!(ws.next().await.expect("open").expect("frame"), Message::binary(big));
    ws.send(Message::Ping(vec![1, 2, 3].into())).await.expect("ping");
    assert_eq!(ws.next().await.expect("open").expect("frame"), Message::Pong(vec![1, 2, 3].into()));
    ws.close(None).await.expect("close");
    drop(ws);
    node.stop().await;
}

type Ws = tokio_tungstenite::WebSocketStream<TcpStream>;

async fn connect_ws(addr: SocketAddr, path: &str) -> Ws {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let url = format!("ws://{addr}{path}");
    let (ws, resp) = tokio_tungstenite::client_async(url, stream).await.expect("websocket handshake");
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    ws
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_shape_the_share() {
    let node = TestNode::start("http-5").await;
    let a = HttpBackend::start("a").await;
    let b = HttpBackend::start("b").await;
    fast_pool(&node, "web", "/").await;
    add_backend(&node, "web", &a, json!({"weight": 3})).await;
    add_backend(&node, "web", &b, json!({"weight": 1})).await;
    wait_healthy(&node, "web", 2).await;
    let mut counts: HashMap<String, usize> = HashMap::new();
    for _ in 0..40 {
        *counts.entry(who(&get_text(node.http(), "/").await.expect("get").1)).or_default() += 1;
    }
    assert_eq!((counts["a"], counts["b"]), (30, 10), "{counts:?}");
    node.stop().await;
}

/// A backend that counts the connections it accepts (answers with a Content-Length body).
async fn counting_backend() -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::AtomicUsize;
    let listener = tokio::net::TcpListener::bind((shoal_tests::LOCALHOST, 0)).await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let accepts = std::sync::Arc::new(AtomicUsize::new(0));
    let counter = accepts.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            counter.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|req: http::Request<hyper::body::Incoming>| async move {
                    let body = if req.uri().path() == "/healthz" { "ok" } else { "counted" };
                    Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(
                        bytes::Bytes::from(body),
                    )))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, accepts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_connections_are_reused_for_sized_and_empty_bodies() {
    let node = TestNode::start("http-reuse").await;
    let (addr, accepts) = counting_backend().await;
    node.put("/v1/pools/web", json!({"pattern": "/", "health": {"check": "tcp", "interval_ms": 60000}})).await;
    node.put(&format!("/v1/pools/web/backends/{addr}"), json!({})).await;
    eventually(Duration::from_secs(10), "serving", || async {
        get_text(node.http(), "/").await.ok().filter(|(s, _)| s.is_success())
    })
    .await;
    let before = accepts.load(Ordering::Relaxed);
    for _ in 0..100 {
        let (status, body) = get_text(node.http(), "/x").await.expect("get");
        assert_eq!((status, body.as_str()), (StatusCode::OK, "counted"));
        let head = raw_http(node.http(), Method::HEAD, "/x", None).await.expect("head");
        assert_eq!(head.status, StatusCode::OK);
    }
    let opened = accepts.load(Ordering::Relaxed) - before;
    assert!(opened <= 3, "200 sequential requests opened {opened} backend connections");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_starting_node_says_retry_instead_of_not_found() {
    // Waiting for a second node that never comes: no leader, so no pools yet and not ready.
    let cluster = SocketAddr::new(shoal_tests::LOCALHOST, shoal_tests::free_port());
    let dir = tempfile::tempdir().expect("dir");
    let node = TestNode::start_in("lonely", dir, |o| {
        o.cluster = Some(ClusterOptions::new(cluster, vec![], 2, TestCa::new("shoal").creds("lonely")));
    })
    .await;
    let resp = raw_http(node.http(), Method::GET, "/anything", None).await.expect("answer");
    assert_eq!(resp.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(resp.headers["retry-after"], "1");
    assert!(!node.handle.shared.is_ready(), "the node became ready without a leader or verdicts");
    // Probes without a token: alive, but not ready for traffic.
    let ready = raw_http(node.handle.admin_addr(), Method::GET, "/readyz", None).await.expect("readyz");
    assert_eq!((ready.status, ready.text().as_str()), (StatusCode::SERVICE_UNAVAILABLE, "starting\n"));
    let live = raw_http(node.handle.admin_addr(), Method::GET, "/healthz", None).await.expect("healthz");
    assert_eq!(live.status, StatusCode::OK, "a starting node is alive");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_node_is_not_ready_but_alive() {
    let node = TestNode::start("draining").await;
    let backend = HttpBackend::start("b1").await;
    node.put("/v1/pools/web", json!({"pattern": "/", "health": {"interval_ms": 200}})).await;
    add_backend(&node, "web", &backend, json!({})).await;
    wait_healthy(&node, "web", 1).await;
    let admin = node.handle.admin_addr();
    // An open WebSocket keeps the node draining for its drain timeout (5 s).
    let tcp = TcpStream::connect(node.http()).await.expect("connect");
    let (mut ws, _) = shoal_tests::ws_over(tcp, &format!("ws://{}/agent", node.http()), &[]).await;
    shoal_tests::ws_echo(&mut ws, "before the drain").await;
    let stopping = tokio::spawn(node.stop());
    eventually(Duration::from_secs(4), "/readyz says draining", || async {
        let r = raw_http(admin, Method::GET, "/readyz", None).await.ok()?;
        (r.status == StatusCode::SERVICE_UNAVAILABLE && r.text() == "draining\n").then_some(())
    })
    .await;
    let live = raw_http(admin, Method::GET, "/healthz", None).await.expect("healthz while draining");
    assert_eq!(live.status, StatusCode::OK, "draining is not dead: a supervisor must not restart it");
    drop(ws);
    stopping.await.expect("stopped");
}
