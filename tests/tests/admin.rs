//! Admin API: JSON errors for bad input, seed 003's first-check rule, persistence; scoped
//! tokens, rotation of the token file and TLS on the admin listener (CLI and gRPC).

use std::time::Duration;

use http::{Method, StatusCode};
use serde_json::{Value, json};
use shoal_tests::{HttpBackend, TestNode, eventually, free_port};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_4xx_json_errors() {
    let node = TestNode::start("admin-1").await;
    let cases: &[(Method, &str, Option<&str>, StatusCode, &str)] = &[
        (Method::PUT, "/v1/pools/web", Some("{not json"), StatusCode::BAD_REQUEST, "invalid JSON"),
        (Method::PUT, "/v1/pools/web", Some(r#"{"patern": "/"}"#), StatusCode::BAD_REQUEST, "patern"),
        (Method::PUT, "/v1/pools/web", Some(r#"{"pattern": 5}"#), StatusCode::BAD_REQUEST, "invalid type"),
        (Method::PUT, "/v1/pools/web", Some("{}"), StatusCode::BAD_REQUEST, "pattern"),
        (Method::PUT, "/v1/pools/bad%20name", Some(r#"{"pattern": "/"}"#), StatusCode::BAD_REQUEST, "pool names"),
        (Method::PUT, "/v1/pools/t", Some(r#"{"protocol": "tcp", "listen": 0}"#), StatusCode::BAD_REQUEST, "listen"),
        (Method::GET, "/v1/pools/missing", None, StatusCode::NOT_FOUND, "does not exist"),
        (Method::PUT, "/v1/pools/missing/backends/127.0.0.1:1", Some("{}"), StatusCode::NOT_FOUND, "does not exist"),
        (Method::PUT, "/v1/pools/missing/backends/not-an-addr", Some("{}"), StatusCode::BAD_REQUEST, "not an ip:port"),
        (Method::GET, "/v1/nope", None, StatusCode::NOT_FOUND, "no such endpoint"),
        (Method::POST, "/v1/pools", None, StatusCode::METHOD_NOT_ALLOWED, "method not allowed"),
        (Method::DELETE, "/v1/cluster/nodes/nobody", None, StatusCode::NOT_FOUND, "no member"),
        (Method::DELETE, "/v1/cluster/nodes/admin-1", None, StatusCode::CONFLICT, "stop it first"),
    ];
    for (method, path, body, status, needle) in cases {
        let (got, json) = node.call(method.clone(), path, *body).await;
        assert_eq!(got, *status, "{method} {path}: {json}");
        let msg = json["error"].as_str().unwrap_or_default();
        assert!(msg.contains(needle), "{method} {path}: error {msg:?} should mention {needle:?}");
    }
    node.put("/v1/pools/web", json!({"pattern": "/"})).await;
    let (got, json) = node.call(Method::PUT, "/v1/pools/other", Some(r#"{"pattern": "/"}"#)).await;
    assert_eq!(got, StatusCode::CONFLICT, "{json}");
    let (got, json) =
        node.call(Method::PUT, "/v1/pools/web/backends/127.0.0.1:80", Some(r#"{"weight": 0, "force": true}"#)).await;
    assert_eq!(got, StatusCode::BAD_REQUEST, "{json}");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_failing_its_first_check_is_refused_unless_forced() {
    let node = TestNode::start("admin-2").await;
    node.put("/v1/pools/web", json!({"pattern": "/"})).await;
    let dead = format!("127.0.0.1:{}", free_port());
    let (status, json) = node.call(Method::PUT, &format!("/v1/pools/web/backends/{dead}"), Some("{}")).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{json}");
    assert!(json["error"].as_str().unwrap_or_default().contains("failed its first health check"), "{json}");
    let sick = HttpBackend::start("sick").await;
    sick.healthy.store(false, std::sync::atomic::Ordering::Relaxed);
    let (status, json) = node.call(Method::PUT, &format!("/v1/pools/web/backends/{}", sick.addr), None).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "a body other than ok fails: {json}");
    node.put(&format!("/v1/pools/web/backends/{dead}"), json!({"force": true})).await;
    let h = eventually(Duration::from_secs(10), "forced backend checked", || async {
        let h = node.get("/v1/pools/web/health").await;
        (h["backends"][0]["status"] == "BS_SICK").then_some(h)
    })
    .await;
    assert_eq!(h["status"], "PS_EMPTY");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_survives_a_restart() {
    let node = TestNode::start("admin-3").await;
    let a = HttpBackend::start("a").await;
    node.put("/v1/pools/web", json!({"pattern": "/", "algorithm": "p2c"})).await;
    node.put(&format!("/v1/pools/web/backends/{}", a.addr), json!({"weight": 7, "zone": "eu-1a"})).await;
    let before = node.get("/v1/state").await;
    let dir = node.stop().await;
    let node = TestNode::start_in("admin-3", dir, |_| {}).await;
    assert_eq!(node.get("/v1/state").await, before);
    let (status, _) = eventually(Duration::from_secs(10), "serves after restart", || async {
        shoal_tests::get_text(node.http(), "/").await.ok().filter(|(s, _)| s.is_success())
    })
    .await;
    assert_eq!(status, StatusCode::OK);
    node.stop().await;
}

// --- Scoped tokens, rotation and TLS on the admin listener (issue 14, finding 6) ---

const ADMIN_TOKEN: &str = "admin-token-0123456789";
const READ_TOKEN: &str = "read-token-0123456789";
const JOIN_TOKEN: &str = "join-token-0123456789";

/// Writes a private token file.
fn write_tokens(path: &std::path::Path, text: &str) {
    shoal_tests::shoal_node::files::write_atomic(path, text.as_bytes(), 0o600).expect("token file");
}

/// A node whose tokens come from `<dir>/tokens`: one admin, one read, one join for `web`.
async fn scoped_node(id: &str, adjust: impl FnOnce(&mut shoal_tests::shoal_node::node::NodeOptions)) -> TestNode {
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("tokens");
    write_tokens(&file, &format!("# ops\n{ADMIN_TOKEN} admin\n{READ_TOKEN} read\n{JOIN_TOKEN} join web,edge\n"));
    TestNode::start_in(id, dir, |o| {
        o.admin_token_file = Some(file);
        adjust(o);
    })
    .await
}

/// Status and JSON body of an admin call made with `token`.
async fn call_as(node: &TestNode, token: &str, method: Method, path: &str, body: Option<&str>) -> (StatusCode, Value) {
    let client = node.admin.clone().with_token(Some(token.into()));
    let body = body.map(|b| b.as_bytes().to_vec()).unwrap_or_default();
    let (status, bytes) = client.raw_bytes(method, path, body).await.expect("admin answers");
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

fn refused(status: StatusCode, json: &Value, what: &str) {
    assert_eq!(status, StatusCode::FORBIDDEN, "{what}: {json}");
    assert!(json["error"].as_str().is_some_and(|e| e.contains("may not")), "{what}: 403 JSON error, got {json}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_token_reads_but_cannot_write() {
    let node = scoped_node("scope-read", |_| {}).await;
    let (status, json) = call_as(&node, ADMIN_TOKEN, Method::PUT, "/v1/pools/web", Some(r#"{"pattern": "/"}"#)).await;
    assert_eq!(status, StatusCode::OK, "the admin token writes: {json}");
    for path in ["/v1/pools", "/v1/pools/web", "/v1/pools/web/health", "/v1/cluster", "/v1/stats", "/metrics"] {
        let (status, json) = call_as(&node, READ_TOKEN, Method::GET, path, None).await;
        assert_eq!(status, StatusCode::OK, "read token GET {path}: {json}");
    }
    let writes: &[(Method, &str, Option<&str>)] = &[
        (Method::PUT, "/v1/pools/web", Some(r#"{"pattern": "/x/"}"#)),
        (Method::DELETE, "/v1/pools/web", None),
        (Method::PUT, "/v1/pools/web/backends/127.0.0.1:9", Some(r#"{"force": true}"#)),
        (Method::POST, "/v1/pools/web/backends/127.0.0.1:9/leave", None),
        (Method::PUT, "/v1/pools/web/backends/127.0.0.1:9/drain", None),
        (Method::POST, "/v1/tls/reload", None),
    ];
    for (method, path, body) in writes {
        let (status, json) = call_as(&node, READ_TOKEN, method.clone(), path, *body).await;
        refused(status, &json, &format!("read token {method} {path}"));
    }
    let (status, _) = call_as(&node, "unknown-token-0123456789", Method::GET, "/v1/pools", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "an unknown token is a 401");
    assert_eq!(node.get("/v1/pools/web").await["spec"]["pattern"], "/", "nothing changed");
    // Heartbeat secrets are for admin eyes only.
    let (port, hb) = (free_port(), shoal_tests::free_udp_port());
    let body = format!(
        r#"{{"protocol": "tcp", "listen": {port}, "self_register": true,
            "health": {{"check": "heartbeat", "heartbeat_port": {hb}, "heartbeat_secret": "hb-s3cret"}}}}"#
    );
    let (status, json) = call_as(&node, ADMIN_TOKEN, Method::PUT, "/v1/pools/hb", Some(&body)).await;
    assert_eq!(status, StatusCode::OK, "{json}");
    for path in ["/v1/pools/hb", "/v1/pools", "/v1/state"] {
        let (_, json) = call_as(&node, READ_TOKEN, Method::GET, path, None).await;
        assert!(!json.to_string().contains("hb-s3cret") && json.to_string().contains("redacted"), "{path}: {json}");
        let (_, json) = call_as(&node, ADMIN_TOKEN, Method::GET, path, None).await;
        assert!(json.to_string().contains("hb-s3cret"), "the admin token sees it: {path}");
    }
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_token_joins_and_leaves_its_pools_only() {
    let node = scoped_node("scope-join", |_| {}).await;
    let a = HttpBackend::start("a").await;
    for (pool, pattern) in [("web", "/"), ("api", "/api/")] {
        let body = format!(r#"{{"pattern": "{pattern}"}}"#);
        let (status, json) = call_as(&node, ADMIN_TOKEN, Method::PUT, &format!("/v1/pools/{pool}"), Some(&body)).await;
        assert_eq!(status, StatusCode::OK, "{json}");
    }
    let join = format!("/v1/pools/web/backends/{}", a.addr);
    let (status, json) = call_as(&node, JOIN_TOKEN, Method::PUT, &join, Some("{}")).await;
    assert_eq!(status, StatusCode::OK, "join its pool: {json}");
    assert!(node.get("/v1/pools/web").await["backends"].get(a.addr.to_string()).is_some(), "joined");
    let others: &[(Method, String, Option<&str>)] = &[
        (Method::PUT, format!("/v1/pools/api/backends/{}", a.addr), Some("{}")),
        (Method::POST, format!("/v1/pools/api/backends/{}/leave", a.addr), None),
        (Method::DELETE, join.clone(), None),
        (Method::PUT, format!("{join}/drain"), None),
        (Method::PUT, "/v1/pools/web".into(), Some(r#"{"pattern": "/"}"#)),
        (Method::DELETE, "/v1/pools/web".into(), None),
        (Method::GET, "/v1/pools".into(), None),
        (Method::GET, "/v1/state".into(), None),
        (Method::POST, "/v1/tls/reload".into(), None),
    ];
    for (method, path, body) in others {
        let (status, json) = call_as(&node, JOIN_TOKEN, method.clone(), path, *body).await;
        refused(status, &json, &format!("join token {method} {path}"));
    }
    let (status, json) =
        call_as(&node, JOIN_TOKEN, Method::POST, &format!("{join}/leave"), Some(r#"{"drain_timeout_s": 1}"#)).await;
    assert_eq!(status, StatusCode::OK, "leave its pool: {json}");
    assert!(node.get("/v1/pools/web").await["backends"].get(a.addr.to_string()).is_none(), "left");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_the_token_file_takes_effect_without_restart() {
    let node = scoped_node("scope-rotate", |_| {}).await;
    let file = node.dir.path().join("tokens");
    assert_eq!(call_as(&node, ADMIN_TOKEN, Method::GET, "/v1/pools", None).await.0, StatusCode::OK);
    let new_token = "rotated-admin-token-0123456789";
    write_tokens(&file, &format!("{new_token}\n{READ_TOKEN} read\n"));
    let (status, json) = call_as(&node, new_token, Method::PUT, "/v1/pools/web", Some(r#"{"pattern": "/"}"#)).await;
    assert_eq!(status, StatusCode::OK, "the new token (a bare line: admin) works at once: {json}");
    let (status, _) = call_as(&node, ADMIN_TOKEN, Method::GET, "/v1/pools", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "the old token stopped working");
    let (status, _) = call_as(&node, JOIN_TOKEN, Method::GET, "/v1/pools", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "a removed token stopped working");
    // Rewritten in place (no rename) is picked up too; a broken file keeps the tokens in service.
    std::fs::write(&file, format!("{ADMIN_TOKEN} read\n")).expect("in place");
    let (status, json) = call_as(&node, ADMIN_TOKEN, Method::DELETE, "/v1/pools/web", None).await;
    refused(status, &json, "the old token came back read-only");
    write_tokens(&file, "not a token file\n");
    assert_eq!(call_as(&node, ADMIN_TOKEN, Method::GET, "/v1/pools", None).await.0, StatusCode::OK);
    node.stop().await;
}

/// The admin listener's certificate for 127.0.0.1, written to `dir`.
fn admin_cert(dir: &std::path::Path) -> shoal_tests::shoal_node::dataplane::tls::CertFiles {
    let (cert, key) = shoal_tests::shoal_node::dataplane::tls::self_signed(&["127.0.0.1".into()]).expect("cert");
    let files = shoal_tests::shoal_node::dataplane::tls::CertFiles {
        cert: dir.join("admin-cert.pem"),
        key: dir.join("admin-key.pem"),
    };
    std::fs::write(&files.cert, cert).expect("cert");
    shoal_tests::shoal_node::files::write_atomic(&files.key, key.as_bytes(), 0o600).expect("key");
    files
}

fn shoal_cli(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_shoal-under-test"))
        .args(args)
        .env_remove("SHOAL_ADMIN")
        .env_remove("SHOAL_TOKEN")
        .env_remove("SHOAL_ADMIN_CA")
        .output()
        .expect("run shoal")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_and_grpc_speak_tls_to_the_admin_listener() {
    let certs = tempfile::tempdir().expect("dir");
    let files = admin_cert(certs.path());
    let tls = files.clone();
    let node = scoped_node("admin-tls", move |o| o.admin_tls = Some(tls)).await;
    let https = format!("https://{}", node.handle.admin_addr());
    let ca = files.cert.to_string_lossy().into_owned();
    let token_file = node.dir.path().join("tokens").to_string_lossy().into_owned();
    tokio::task::spawn_blocking(move || {
        let ok = |args: &[&str]| {
            let out = shoal_cli(args);
            let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            (out.status.success(), text)
        };
        let (fine, text) = ok(&[
            "--admin",
            &https,
            "--admin-ca",
            &ca,
            "--token-file",
            &token_file,
            "pool",
            "add",
            "web",
            "--pattern",
            "/",
        ]);
        assert!(fine && text.contains("pool web saved"), "admin token over TLS: {text}");
        let (fine, text) = ok(&["--admin", &https, "--admin-ca", &ca, "--token", READ_TOKEN, "pool", "list"]);
        assert!(fine && text.contains("web"), "read token lists over TLS: {text}");
        let (fine, text) = ok(&["--admin", &https, "--admin-ca", &ca, "--token", READ_TOKEN, "pool", "rm", "web"]);
        assert!(!fine && text.contains("403"), "read token may not remove: {text}");
        let (fine, text) = ok(&["--admin", &https, "--token", ADMIN_TOKEN, "status"]);
        assert!(!fine && text.contains("TLS"), "an unknown CA is refused: {text}");
        let plain = https.replace("https://", "http://");
        let (fine, _) = ok(&["--admin", &plain, "--token", ADMIN_TOKEN, "status"]);
        assert!(!fine, "plain HTTP to the TLS listener fails");
        let (fine, text) = ok(&["--admin", &plain, "--admin-ca", &ca, "--token", ADMIN_TOKEN, "status"]);
        assert!(!fine && text.contains("https://"), "--admin-ca with http:// is an error: {text}");
    })
    .await
    .expect("cli");
    // The status page and its data, over TLS (the harness's client trusts the certificate).
    let (status, page) = node.admin.raw(Method::GET, "/", None).await.expect("status page");
    assert!(status.is_success() && String::from_utf8_lossy(&page).contains("<html"), "status page over TLS");
    assert_eq!(call_as(&node, READ_TOKEN, Method::GET, "/v1/stats", None).await.0, StatusCode::OK);
    // gRPC (h2 by ALPN) over the same TLS port.
    let admin_client = grpc_tls(node.handle.admin_addr(), &files.cert, ADMIN_TOKEN).await;
    let mut lb = admin_client;
    lb.add_pool(shoal_tests::grpc::add_pool("/g/", 1)).await.expect("admin token AddPool over TLS");
    let mut read = grpc_tls(node.handle.admin_addr(), &files.cert, READ_TOKEN).await;
    let health =
        read.pool_health(shoal_tests::grpc::pb::PoolHealthReq { pattern: "/g/".into(), healthy: true, sick: true });
    health.await.expect("a read token asks PoolHealth");
    let err =
        read.remove_pool(shoal_tests::grpc::pb::RemovePoolReq { pattern: "/g/".into() }).await.expect_err("write");
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    let mut join = grpc_tls(node.handle.admin_addr(), &files.cert, JOIN_TOKEN).await;
    let err = join.add_pool(shoal_tests::grpc::add_pool("/h/", 1)).await.expect_err("join token");
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    let mut nobody = grpc_tls(node.handle.admin_addr(), &files.cert, "unknown-token-0123456789").await;
    let err = nobody.add_pool(shoal_tests::grpc::add_pool("/h/", 1)).await.expect_err("unknown token");
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err}");
    node.stop().await;
}

/// A gRPC client over TLS (ALPN h2) trusting `ca`, sending `token`.
async fn grpc_tls(admin: std::net::SocketAddr, ca: &std::path::Path, token: &str) -> shoal_tests::grpc::LbClient {
    let config = shoal_tests::shoal_node::dataplane::tls::client_config(Some(ca)).expect("client config");
    let mut config = (*config).clone();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = TlsConnect { addr: admin, config: std::sync::Arc::new(config) };
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{admin}"))
        .expect("endpoint")
        .timeout(Duration::from_secs(30))
        .connect_with_connector(connector)
        .await
        .expect("TLS connect");
    shoal_tests::grpc::client_on(channel, Some(token))
}

/// Connects to one address over TLS and checks the server agreed on h2.
#[derive(Clone)]
struct TlsConnect {
    addr: std::net::SocketAddr,
    config: std::sync::Arc<rustls::ClientConfig>,
}

type TlsIo = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

impl tonic::codegen::Service<http::Uri> for TlsConnect {
    type Response = TlsIo;
    type Error = std::io::Error;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<TlsIo>> + Send>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Uri) -> Self::Future {
        let (addr, config) = (self.addr, self.config.clone());
        Box::pin(async move {
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            let name = rustls_pki_types::ServerName::IpAddress(addr.ip().into());
            let tls = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await?;
            if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
                return Err(std::io::Error::other("the admin listener did not agree on h2"));
            }
            Ok(hyper_util::rt::TokioIo::new(tls))
        })
    }
}
