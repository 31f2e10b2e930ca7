//! The Enterprise Connect edge: WebSockets over plain and TLS listeners, gateway pinning and
//! super-connection coverage, certificate reload, the EC env file, join/leave, zones.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use http::StatusCode;
use serde_json::{Value, json};
use shoal_tests::{
    HttpBackend, LOCALHOST, TestNode, eventually, get_text, tls_client, try_ws_over, write_cert, ws_echo, ws_over,
};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

const BIN: &str = env!("CARGO_BIN_EXE_shoal-under-test");

async fn wait_healthy(node: &TestNode, pool: &str, n: usize) {
    let path = format!("/v1/pools/{pool}/health");
    eventually(Duration::from_secs(15), &format!("{n} healthy in {pool}"), || async {
        let h = node.get(&path).await;
        let healthy = h["backends"].as_array()?.iter().filter(|b| b["status"] == "BS_HEALTHY").count();
        (healthy == n).then_some(())
    })
    .await;
}

/// Three gateway stand-ins in a pinning pool, slots gw1..gw3 in order.
async fn gateways(node: &TestNode) -> Vec<HttpBackend> {
    let mut gws = Vec::new();
    for i in 1..=3 {
        gws.push(HttpBackend::start(&format!("gw{i}")).await);
    }
    node.put("/v1/pools/ec", json!({"pattern": "/", "pinning": true, "health": {"interval_ms": 200, "rise": 1}})).await;
    for (i, g) in gws.iter().enumerate() {
        node.put(&format!("/v1/pools/ec/backends/{}", g.addr), json!({"slot": i + 1})).await;
    }
    wait_healthy(node, "ec", 3).await;
    gws
}

async fn tls_node(dir: &tempfile::TempDir) -> (TestNode, shoal_node::dataplane::tls::CertFiles) {
    let files = write_cert(dir.path(), "server", &["localhost", "127.0.0.1"]);
    let tls = files.clone();
    let data = tempfile::tempdir().expect("data");
    let node = TestNode::start_in("edge-tls", data, |o| {
        o.https_port = Some(0);
        o.tls = vec![tls];
    })
    .await;
    (node, files)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_over_tls_passes_messages_untouched() {
    let dir = tempfile::tempdir().expect("dir");
    let (node, files) = tls_node(&dir).await;
    let gw = HttpBackend::start("gw").await;
    node.put("/v1/pools/ec", json!({"pattern": "/", "health": {"interval_ms": 200}})).await;
    node.put(&format!("/v1/pools/ec/backends/{}", gw.addr), json!({})).await;
    wait_healthy(&node, "ec", 1).await;
    let tcp = TcpStream::connect(node.https()).await.expect("connect");
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
    let tls = tls_client(&files.cert).connect(name, tcp).await.expect("TLS handshake");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let (mut ws, resp) = ws_over(tls, "wss://localhost/agent", &[]).await;
    assert_eq!(resp.headers()["x-backend"], "gw");
    ws_echo(&mut ws, "hello over wss").await;
    let big: Vec<u8> = (0..1024 * 1024).map(|i: u32| (i % 241) as u8).collect();
    ws.send(Message::binary(big.clone())).await.expect("send");
    assert_eq!(ws.next().await.expect("open").expect("frame"), Message::binary(big));
    ws.send(Message::Ping(vec![9, 9].into())).await.expect("ping");
    assert_eq!(ws.next().await.expect("open").expect("frame"), Message::Pong(vec![9, 9].into()));
    ws.close(None).await.expect("close");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_agent_superconns_cover_every_gateway() {
    let node = TestNode::start("edge-pin").await;
    let gws = gateways(&node).await;
    let url = format!("ws://{}/agent", node.http());
    let mut conns = Vec::new();
    for n in 1..=3 {
        let tcp = TcpStream::connect(node.http()).await.expect("connect");
        let (mut ws, resp) = ws_over(tcp, &url, &[("x-server-select", &format!("gw{n}"))]).await;
        assert_eq!(resp.headers()["x-backend"], format!("gw{n}").as_str(), "gw{n} reached the named gateway");
        ws_echo(&mut ws, &format!("superconn {n}")).await;
        conns.push(ws);
    }
    let h = eventually(Duration::from_secs(10), "coverage 3/3", || async {
        let h = node.get("/v1/pools/ec/health").await;
        (h["pinned_coverage"] == json!({"covered": 3, "total": 3})).then_some(h)
    })
    .await;
    assert!(h["backends"].as_array().expect("backends").iter().all(|b| b["pinned"] == 1 && b["upgraded"] == 1), "{h}");
    // The other EC forms: Cloud Foundry's instance header (index 1 is gw2) and /vmN/ paths.
    let tcp = TcpStream::connect(node.http()).await.expect("connect");
    let (_, resp) = ws_over(tcp, &url, &[("x-cf-app-instance", "4c1e-app-guid:1")]).await;
    assert_eq!(resp.headers()["x-backend"], "gw2");
    let tcp = TcpStream::connect(node.http()).await.expect("connect");
    let (mut ws, resp) = ws_over(tcp, &format!("ws://{}/vm3/agent", node.http()), &[]).await;
    assert_eq!(resp.headers()["x-backend"], "gw3");
    ws_echo(&mut ws, "via vm path").await;
    let (_, body) = get_text(node.http(), "/vm1/status").await.expect("get");
    assert!(body.contains("hello from gw1 path=/status"), "the /vmN prefix is stripped: {body}");
    // A client agent with nothing special may land on any gateway.
    let tcp = TcpStream::connect(node.http()).await.expect("connect");
    let (_, resp) = ws_over(tcp, &url, &[]).await;
    assert!(resp.headers()["x-backend"].to_str().expect("name").starts_with("gw"));
    // Pinned to an unhealthy gateway: 503 at once, never another gateway.
    gws[1].healthy.store(false, Ordering::Relaxed);
    wait_healthy(&node, "ec", 2).await;
    let resp = shoal_tests::raw_http(node.http(), http::Method::GET, "/vm2/agent", None).await.expect("get");
    assert_eq!(resp.status, StatusCode::SERVICE_UNAVAILABLE, "{}", resp.text());
    drop(conns);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_select_takes_vm_names_and_unknown_pins_go_to_any_gateway() {
    let node = TestNode::start("edge-vm").await;
    let gws = gateways(&node).await;
    let (http, url) = (node.http(), format!("ws://{}/agent", node.http()));
    let open = |headers: Vec<(&'static str, &'static str)>| {
        let url = url.clone();
        async move {
            let tcp = TcpStream::connect(http).await.expect("connect");
            let (mut ws, resp) = ws_over(tcp, &url, &headers).await;
            ws_echo(&mut ws, "pinned?").await;
            resp.headers()["x-backend"].to_str().expect("name").to_string()
        }
    };
    assert_eq!(open(vec![("x-server-select", "vm2")]).await, "gw2", "vmN names gateway N as gwN does");
    assert_eq!(open(vec![("x-server-select", "VM3")]).await, "gw3");
    // Names of no gateway (nginx's `default`): any healthy gateway, never 503 or 404.
    gws[1].healthy.store(false, Ordering::Relaxed);
    wait_healthy(&node, "ec", 2).await;
    for value in ["gw9", "vm42", "garbage", "gw0"] {
        for _ in 0..3 {
            let landed = open(vec![("x-server-select", value)]).await;
            assert!(landed == "gw1" || landed == "gw3", "{value}: landed on {landed}, not a healthy gateway");
        }
    }
    let (status, body) = get_text(node.http(), "/vm9/status").await.expect("get");
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains("path=/status") && !body.contains("gw2"), "{body}");
    // A pin to the existing but unhealthy gateway still fails at once, in every form.
    for (name, value) in [("x-server-select", "vm2"), ("x-server-select", "gw2"), ("x-cf-app-instance", "app:1")] {
        let tcp = TcpStream::connect(node.http()).await.expect("connect");
        let refused = try_ws_over(tcp, &url, &[(name, value)]).await;
        let text = format!("{:?}", refused.expect_err("pinned to a sick gateway"));
        assert!(text.contains("503"), "{name}: {value}: {text}");
    }
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_sent_identity_headers_do_not_reach_gateways() {
    let node = TestNode::start("edge-ids").await;
    let _gws = gateways(&node).await;
    let mut tcp = TcpStream::connect(node.http()).await.expect("connect");
    let request = "GET /whoami HTTP/1.1\r\nHost: lb.example.test\r\nX-Real-IP: 6.6.6.6\r\n\
                   Forwarded: for=6.6.6.6;proto=https\r\nForwarded: for=7.7.7.7\r\n\
                   X-Forwarded-For: 8.8.8.8\r\nConnection: close\r\n\r\n";
    tokio::io::AsyncWriteExt::write_all(&mut tcp, request.as_bytes()).await.expect("send");
    let mut answer = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut tcp, &mut answer).await.expect("read");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains(" real-ip=127.0.0.1 "), "X-Real-IP is the client's address: {answer}");
    assert!(
        answer.contains(" forwarded=for=127.0.0.1;proto=http;host=\"lb.example.test\"\n"),
        "one Forwarded element, shoal's own: {answer}"
    );
    assert!(answer.contains(" xff=8.8.8.8, 127.0.0.1 "), "X-Forwarded-For is appended to: {answer}");
    assert!(!answer.contains("6.6.6.6") && !answer.contains("7.7.7.7"), "{answer}");
    node.stop().await;
}

/// EC mode's listener shape (0.0.0.0 and [::] on one port, as nginx's `listen 80; listen
/// [::]:80;`), with an ephemeral port: the IPv6 listener must take IPv6 only, or it would clash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_listener_beside_every_ipv4_address() {
    let has_ipv6 = std::net::TcpListener::bind("[::1]:0").is_ok();
    let node = TestNode::start_in("edge-v6", tempfile::tempdir().expect("data"), |o| {
        o.listen_ip = Some(std::net::Ipv4Addr::UNSPECIFIED.into());
        o.listen_ip6 = Some(std::net::Ipv6Addr::UNSPECIFIED.into());
    })
    .await;
    let gw = HttpBackend::start("gw").await;
    node.put("/v1/pools/ec", json!({"pattern": "/", "health": {"interval_ms": 200}})).await;
    node.put(&format!("/v1/pools/ec/backends/{}", gw.addr), json!({})).await;
    wait_healthy(&node, "ec", 1).await;
    let port = node.http().port();
    let (status, body) = get_text(SocketAddr::new(LOCALHOST, port), "/v4").await.expect("IPv4");
    assert_eq!(status, StatusCode::OK, "{body}");
    if has_ipv6 {
        let v6 = SocketAddr::new(std::net::Ipv6Addr::LOCALHOST.into(), port);
        let (status, body) = get_text(v6, "/v6").await.expect("IPv6 on the same port");
        assert_eq!(status, StatusCode::OK, "{body}");
        assert!(body.contains("real-ip=::1 "), "{body}");
    }
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_reload_serves_new_clients_and_keeps_old_connections() {
    let dir = tempfile::tempdir().expect("dir");
    let (node, files) = tls_node(&dir).await;
    let gw = HttpBackend::start("gw").await;
    node.put("/v1/pools/ec", json!({"pattern": "/", "health": {"interval_ms": 200}})).await;
    node.put(&format!("/v1/pools/ec/backends/{}", gw.addr), json!({})).await;
    wait_healthy(&node, "ec", 1).await;
    let old_ca = dir.path().join("old-ca.pem");
    std::fs::copy(&files.cert, &old_ca).expect("keep old cert");
    let name = || rustls_pki_types::ServerName::try_from("localhost").expect("name");
    let tcp = TcpStream::connect(node.https()).await.expect("connect");
    let tls = tls_client(&old_ca).connect(name(), tcp).await.expect("old handshake");
    let (mut old_ws, _) = ws_over(tls, "wss://localhost/agent", &[]).await;
    ws_echo(&mut old_ws, "before reload").await;

    // A broken file is refused and the old certificate stays in service.
    std::fs::write(&files.cert, "garbage").expect("break cert");
    let (status, body) = node.call(http::Method::POST, "/v1/tls/reload", None).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let tcp = TcpStream::connect(node.https()).await.expect("connect");
    tls_client(&old_ca).connect(name(), tcp).await.expect("old certificate still served");

    // A new certificate is picked up; new clients see it, the old WebSocket lives on.
    let new = write_cert(dir.path(), "new", &["localhost"]);
    std::fs::copy(&new.cert, &files.cert).expect("install cert");
    std::fs::copy(&new.key, &files.key).expect("install key");
    let (status, body) = node.call(http::Method::POST, "/v1/tls/reload", None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let tcp = TcpStream::connect(node.https()).await.expect("connect");
    assert!(tls_client(&old_ca).connect(name(), tcp).await.is_err(), "old certificate no longer served");
    let tcp = TcpStream::connect(node.https()).await.expect("connect");
    tls_client(&new.cert).connect(name(), tcp).await.expect("new certificate served");
    ws_echo(&mut old_ws, "after reload").await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ec_env_file_runs_like_the_original_image() {
    let gws = [HttpBackend::start("gw1").await, HttpBackend::start("gw2").await];
    let dir = tempfile::tempdir().expect("dir");
    let env = dir.path().join("environment.env");
    // gw1 by host name (resolved again while the node runs), DNS_NAME as a load balancer URL.
    let list = format!("localhost:{} {}", gws[0].addr.port(), gws[1].addr);
    std::fs::write(&env, format!("GATEWAY_LIST={list}\nDNS_NAME=https://lb.example.test:8443/ignored\n")).expect("env");
    // Where this host has ::1 the node must serve it; where it has not, it must say so and go on.
    let has_ipv6 = std::net::TcpListener::bind("[::1]:0").is_ok();
    let log = std::fs::File::create(dir.path().join("node.log")).expect("log");
    let cert = write_cert(dir.path(), "cert", &["lb.example.test", "127.0.0.1"]);
    let (http_port, https_port, admin_port) =
        (shoal_tests::free_port(), shoal_tests::free_port(), shoal_tests::free_port());
    let admin = format!("127.0.0.1:{admin_port}");
    let mut child = std::process::Command::new(BIN)
        .args([
            "node",
            "--id",
            "ec",
            "--ec-env",
            env.to_str().expect("utf8"),
            "--listen-ip",
            "127.0.0.1",
            "--listen-ip6",
            "::1",
            "--admin",
            &admin,
        ])
        .args(["--http-port", &http_port.to_string(), "--https-port", &https_port.to_string()])
        .args(["--tls-cert", cert.cert.to_str().expect("utf8"), "--tls-key", cert.key.to_str().expect("utf8")])
        .args(["--data-dir", dir.path().join("data").to_str().expect("utf8")])
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn");
    let plain = SocketAddr::new(LOCALHOST, http_port);
    let redirect = eventually(Duration::from_secs(20), "port 80 redirects", || async {
        shoal_tests::raw_http(plain, http::Method::GET, "/agent?x=1", None).await.ok()
    })
    .await;
    assert_eq!(redirect.status, StatusCode::MOVED_PERMANENTLY);
    assert_eq!(redirect.headers["location"], "https://lb.example.test:8443/agent?x=1", "the URL's host and port");
    let name = rustls_pki_types::ServerName::try_from("lb.example.test").expect("name");
    let wss = |addr: SocketAddr, pin: &'static str| {
        let (name, ca) = (name.clone(), cert.cert.clone());
        async move {
            let tcp = TcpStream::connect(addr).await.ok()?;
            let tls = tls_client(&ca).connect(name, tcp).await.ok()?;
            let opened = try_ws_over(tls, "wss://lb.example.test/agent", &[("x-server-select", pin)]).await;
            let (mut ws, resp) = opened.ok()?;
            ws_echo(&mut ws, "through the EC image").await;
            Some(resp.headers()["x-backend"].to_str().ok()?.to_string())
        }
    };
    let secure = SocketAddr::new(LOCALHOST, https_port);
    let landed = eventually(Duration::from_secs(20), "vm2 through wss", || wss(secure, "vm2")).await;
    assert_eq!(landed, "gw2");
    let landed = eventually(Duration::from_secs(20), "gw1 by host name", || wss(secure, "gw1")).await;
    assert_eq!(landed, "gw1");
    if has_ipv6 {
        let secure6 = SocketAddr::new(std::net::Ipv6Addr::LOCALHOST.into(), https_port);
        let landed = eventually(Duration::from_secs(20), "wss over [::1]", || wss(secure6, "vm2")).await;
        assert_eq!(landed, "gw2", "the IPv6 listener serves the same pool");
        let plain6 = SocketAddr::new(std::net::Ipv6Addr::LOCALHOST.into(), http_port);
        let redirect = shoal_tests::raw_http(plain6, http::Method::GET, "/", None).await.expect("[::1]:80");
        assert_eq!(redirect.status, StatusCode::MOVED_PERMANENTLY);
    }
    let _ = child.kill();
    let _ = child.wait();
    let logged = std::fs::read_to_string(dir.path().join("node.log")).expect("log");
    if !has_ipv6 {
        assert!(logged.contains("no IPv6"), "a host without ::1 is reported: {logged}");
    }
    assert!(logged.contains("resolved again"), "the host-name gateway is watched: {logged}");

    // A broken env file names the variable and exits non-zero.
    std::fs::write(&env, "DNS_NAME=lb.example.test\n").expect("env");
    let out =
        std::process::Command::new(BIN).args(["node", "--ec-env", env.to_str().expect("utf8")]).output().expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("GATEWAY_LIST"), "{}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leave_drains_before_removing() {
    let node = TestNode::start_in("edge-leave", tempfile::tempdir().expect("dir"), |o| {
        o.admin_token = "edge-token-0123456789".into()
    })
    .await;
    let (a, b) = (HttpBackend::start("a").await, HttpBackend::start("b").await);
    let admin = format!("http://{}", node.handle.admin_addr());
    let join = |addr: SocketAddr, zone: &'static str| {
        let admin = admin.clone();
        tokio::task::spawn_blocking(move || {
            let out = std::process::Command::new(BIN)
                .args(["backend", "join", "web", &addr.to_string(), "--zone", zone, "--weight", "2", "--admin", &admin])
                .env("SHOAL_TOKEN", "edge-token-0123456789")
                .output()
                .expect("run");
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        })
    };
    node.put("/v1/pools/web", json!({"pattern": "/", "health": {"interval_ms": 200}})).await;
    join(a.addr, "z1").await.expect("join a");
    join(b.addr, "z2").await.expect("join b");
    wait_healthy(&node, "web", 2).await;
    // Hold a WebSocket on `a`, then ask `a` to leave.
    let mut held = None;
    for _ in 0..4 {
        let tcp = TcpStream::connect(node.http()).await.expect("connect");
        let (ws, resp) = ws_over(tcp, &format!("ws://{}/agent", node.http()), &[]).await;
        if resp.headers()["x-backend"] == "a" {
            held = Some(ws);
            break;
        }
    }
    let mut held = held.expect("a websocket on backend a");
    let leave_admin = admin.clone();
    let a_addr = a.addr.to_string();
    let leaving = tokio::task::spawn_blocking(move || {
        std::process::Command::new(BIN)
            .args(["backend", "leave", "web", &a_addr, "--drain-timeout", "20", "--json", "--admin", &leave_admin])
            .env("SHOAL_TOKEN", "edge-token-0123456789")
            .output()
            .expect("run")
    });
    let h = eventually(Duration::from_secs(10), "a draining", || async {
        let h = node.get("/v1/pools/web/health").await;
        h["backends"].as_array()?.iter().any(|b| b["status"] == "BS_DRAINING").then_some(h)
    })
    .await;
    assert!(h["backends"].as_array().expect("list").iter().any(|b| b["active"] == 1), "{h}");
    for _ in 0..6 {
        assert!(
            get_text(node.http(), "/").await.expect("get").1.contains("hello from b"),
            "no new work for a draining backend"
        );
    }
    ws_echo(&mut held, "still served while draining").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    held.close(None).await.expect("close");
    drop(held);
    let out = leaving.await.expect("leave");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(r["drained"], true, "{r}");
    assert!(r["waited_ms"].as_u64().expect("waited") >= 500, "{r}");
    let pool = node.get("/v1/pools/web").await;
    assert!(pool["backends"].get(a.addr.to_string()).is_none(), "a removed after draining");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zone_preference_with_fallback_and_scopes() {
    let dir = tempfile::tempdir().expect("dir");
    let node = TestNode::start_in("edge-zone", dir, |o| o.zone = "eu-west-1a".into()).await;
    let (near, far) = (HttpBackend::start("near").await, HttpBackend::start("far").await);
    node.put("/v1/pools/web", json!({"pattern": "/", "health": {"interval_ms": 200, "rise": 1, "fall": 1}})).await;
    node.put(&format!("/v1/pools/web/backends/{}", near.addr), json!({"zone": "eu-west-1a"})).await;
    node.put(&format!("/v1/pools/web/backends/{}", far.addr), json!({"zone": "us-east-1b"})).await;
    wait_healthy(&node, "web", 2).await;
    let who = || async {
        get_text(node.http(), "/").await.expect("get").1.split_whitespace().nth(2).unwrap_or("").to_string()
    };
    for _ in 0..6 {
        assert_eq!(who().await, "near", "this node's zone first");
    }
    near.healthy.store(false, Ordering::Relaxed);
    wait_healthy(&node, "web", 1).await;
    for _ in 0..4 {
        assert_eq!(who().await, "far", "falls back to another zone");
    }
    near.healthy.store(true, Ordering::Relaxed);
    wait_healthy(&node, "web", 2).await;
    assert_eq!(who().await, "near");
    // A regional scope keeps traffic inside the region even when it is unhealthy there.
    node.put("/v1/pools/web", json!({"pattern": "/", "scope": {"region": "us-"}, "health": {"interval_ms": 200}}))
        .await;
    for _ in 0..4 {
        assert_eq!(who().await, "far");
    }
    node.put(
        "/v1/pools/web",
        json!({"pattern": "/", "scope": {"zones": ["eu-west-1a"]}, "health": {"interval_ms": 200}}),
    )
    .await;
    eventually(Duration::from_secs(10), "only the listed zone", || async { (who().await == "near").then_some(()) })
        .await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_backends_verified_against_a_ca_file() {
    let dir = tempfile::tempdir().expect("dir");
    let gw_cert = write_cert(dir.path(), "gw", &["gw.internal"]);
    let store = shoal_node::dataplane::tls::TlsStore::load(vec![gw_cert.clone()]).expect("gateway cert");
    let listener = tokio::net::TcpListener::bind((LOCALHOST, 0)).await.expect("bind");
    let gw_addr = listener.local_addr().expect("addr");
    let healthy = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let acceptor = tokio_rustls::TlsAcceptor::from(store.current());
    let gw = tokio::spawn(shoal_node::demo::serve_http_on(listener, "tls-gw".into(), healthy, Some(acceptor)));
    let ca = gw_cert.cert.clone();
    let node = TestNode::start_in("edge-btls", tempfile::tempdir().expect("data"), |o| o.backend_ca = Some(ca)).await;
    let spec =
        json!({"pattern": "/", "backend_tls": true, "backend_tls_name": "gw.internal", "health": {"interval_ms": 200}});
    node.put("/v1/pools/secure", spec).await;
    node.put(&format!("/v1/pools/secure/backends/{gw_addr}"), json!({})).await;
    wait_healthy(&node, "secure", 1).await;
    let (status, body) = get_text(node.http(), "/x").await.expect("get");
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains("hello from tls-gw"), "{body}");
    let tcp = TcpStream::connect(node.http()).await.expect("connect");
    let (mut ws, _) = ws_over(tcp, &format!("ws://{}/agent", node.http()), &[]).await;
    ws_echo(&mut ws, "ws to a wss gateway").await;
    // A name the certificate does not carry fails verification: no silent downgrade.
    let wrong = json!({"pattern": "/", "backend_tls": true, "backend_tls_name": "other.internal", "health": {"interval_ms": 200}});
    node.put("/v1/pools/secure", wrong).await;
    wait_healthy(&node, "secure", 0).await;
    gw.abort();
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_websockets_with_close_1001_after_the_grace() {
    let node = TestNode::start_in("edge-bye", tempfile::tempdir().expect("data"), |o| {
        o.drain_timeout = Duration::from_millis(800);
    })
    .await;
    let gw = HttpBackend::start("gw").await;
    node.put("/v1/pools/ec", json!({"pattern": "/", "health": {"interval_ms": 200}})).await;
    node.put(&format!("/v1/pools/ec/backends/{}", gw.addr), json!({})).await;
    wait_healthy(&node, "ec", 1).await;
    let tcp = TcpStream::connect(node.http()).await.expect("connect");
    let (mut ws, _) = ws_over(tcp, &format!("ws://{}/agent", node.http()), &[]).await;
    ws_echo(&mut ws, "before shutdown").await;
    let stopping = tokio::spawn(node.stop());
    tokio::time::sleep(Duration::from_millis(300)).await;
    ws_echo(&mut ws, "during the grace period").await;
    let frame = tokio::time::timeout(Duration::from_secs(10), ws.next()).await.expect("close in time");
    match frame {
        Some(Ok(Message::Close(Some(close)))) => assert_eq!(u16::from(close.code), 1001),
        other => panic!("expected a close frame 1001, got {other:?}"),
    }
    stopping.await.expect("stopped");
}
