//! Seed 003's gRPC control API on the admin address: the seed CLI's flow through a follower of a
//! real three-node cluster, authentication and its opt-out, the error codes, the JSON API beside
//! it on the same port, and a client in another language (Python grpcio).

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use http::{Method, StatusCode};
use serde_json::Value;
use shoal_tests::cluster::ProcCluster;
use shoal_tests::grpc::{self, PoolType};
use shoal_tests::{HttpBackend, TestNode, eventually, get_text};
use tonic::Code;

const BIN: &str = env!("CARGO_BIN_EXE_shoal-under-test");
const TOKEN: &str = "test-token-0123456789abcdef";

/// Polls `PoolHealth` until it shows `PS_FULL` with `n` healthy backends.
async fn wait_full(c: &mut grpc::LbClient, pattern: &str, n: usize, on: &str) {
    let mut last = None;
    for _ in 0..400 {
        let h = grpc::pool_health(c, pattern).await.expect("PoolHealth");
        if grpc::full_with(&h, n) {
            return;
        }
        last = Some(h);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("PoolHealth on {on} never showed PS_FULL with {n} BS_HEALTHY backends; last {last:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_cli_flow_through_a_follower_then_traffic_flows_on_every_node() {
    let mut c = ProcCluster::start(BIN, 3, &[]).await;
    let b1 = HttpBackend::start("b1").await;
    let b2 = HttpBackend::start("b2").await;
    let leader = c.wait_leader(Duration::from_secs(30)).await;
    let follower = (leader + 1) % 3;
    let mut lb = grpc::client(c.nodes[follower].admin_addr(), Some(TOKEN)).await;

    // go run cli.go --lb=<follower> --pattern=/ addPool; two addBackend; poolHealth.
    eventually(Duration::from_secs(20), "AddPool through the follower", || {
        let mut lb = lb.clone();
        async move { lb.add_pool(grpc::add_pool("/", 1)).await.ok() }
    })
    .await;
    lb.add_backend(grpc::add_backend("/", b1.addr, "/")).await.expect("addBackend b1");
    lb.add_backend(grpc::add_backend("/", b2.addr, "/")).await.expect("addBackend b2");
    wait_full(&mut lb, "/", 2, "the follower").await;

    // The write went through Raft: every node holds a p2c pool for "/" and routes to both.
    let mut seen = HashSet::new();
    for (i, node) in c.nodes.iter().enumerate() {
        let pools: Value = node.admin().get("/v1/pools").await.expect("pools");
        let pool = pools.as_array().and_then(|p| p.iter().find(|p| p["spec"]["pattern"] == "/")).expect("pool for /");
        assert_eq!(pool["spec"]["algorithm"], "p2c", "{}", node.name);
        assert_eq!(pool["backends"].as_object().map(|b| b.len()), Some(2), "{}", node.name);
        let mut other = grpc::client(node.admin_addr(), Some(TOKEN)).await;
        wait_full(&mut other, "/", 2, &node.name).await;
        for _ in 0..20 {
            let (status, body) = get_text(node.http(), "/").await.expect("GET / through the node");
            assert!(status.is_success(), "node {i}: {status} {body}");
            seen.insert(body.split_whitespace().nth(2).unwrap_or_default().to_string());
        }
    }
    assert_eq!(seen, HashSet::from(["b1".to_string(), "b2".to_string()]), "p2c spreads over both backends");

    // removeBackend and removePool through another node.
    let mut other = grpc::client(c.nodes[(leader + 2) % 3].admin_addr(), Some(TOKEN)).await;
    other.remove_backend(grpc::remove_backend("/", b2.addr)).await.expect("removeBackend");
    wait_full(&mut lb, "/", 1, "the follower").await;
    other.remove_pool(grpc::pb::RemovePoolReq { pattern: "/".into() }).await.expect("removePool");
    // The follower applies the removal a moment after the leader committed it.
    eventually(Duration::from_secs(10), "the follower no longer knows the pool", || {
        let mut lb = lb.clone();
        async move {
            let gone = lb.pool_health(grpc::pb::PoolHealthReq { pattern: "/".into(), healthy: true, sick: true }).await;
            gone.err().filter(|e| e.code() == Code::NotFound)
        }
    })
    .await;
}

/// The gRPC code of a refused call.
fn code<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> Code {
    r.expect_err("the call was refused").code()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_refuses_bad_requests_with_the_seeds_codes() {
    let node = TestNode::start("grpc-codes").await;
    let admin = node.handle.admin_addr();
    let mut lb = grpc::client(admin, Some(node.token())).await;
    let b1 = HttpBackend::start("b1").await;

    let mut no_pattern = grpc::add_pool("", 1);
    assert_eq!(code(lb.add_pool(no_pattern.clone()).await), Code::InvalidArgument, "empty pattern");
    no_pattern.pattern = "/api/".into();
    no_pattern.pool_type = PoolType::PtUnknown.into();
    assert_eq!(code(lb.add_pool(no_pattern.clone()).await), Code::InvalidArgument, "PT_UNKNOWN");
    no_pattern.pool_type = 42;
    assert_eq!(code(lb.add_pool(no_pattern).await), Code::InvalidArgument, "unknown pool type");
    assert_eq!(code(lb.add_backend(grpc::add_backend("/api/", b1.addr, "/")).await), Code::NotFound, "no pool");
    assert_eq!(code(lb.remove_pool(grpc::pb::RemovePoolReq { pattern: "/api/".into() }).await), Code::NotFound);

    lb.add_pool(grpc::add_pool("/api/", 1)).await.expect("addPool");
    assert_eq!(code(lb.add_pool(grpc::add_pool("/api/", 1)).await), Code::AlreadyExists, "one pool per pattern");
    let empty = grpc::pb::AddBackendReq { pattern: "/api/".into(), backend: Some(grpc::pb::Backend { backend: None }) };
    assert_eq!(code(lb.add_backend(empty).await), Code::InvalidArgument, "empty oneof");

    // First check decides: a backend whose /healthz is not "ok" is not added.
    b1.healthy.store(false, std::sync::atomic::Ordering::Relaxed);
    let refused = lb.add_backend(grpc::add_backend("/api/", b1.addr, "/v1")).await.expect_err("sick backend");
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(refused.message().contains("first health check"), "{}", refused.message());
    b1.healthy.store(true, std::sync::atomic::Ordering::Relaxed);
    lb.add_backend(grpc::add_backend("/api/", b1.addr, "/v1")).await.expect("healthy backend");
    let pool = node.get("/v1/pools").await;
    let pool = pool.as_array().and_then(|p| p.iter().find(|p| p["spec"]["pattern"] == "/api/")).expect("pool").clone();
    assert_eq!(pool["spec"]["health"]["path"], "/healthz");
    assert_eq!(pool["backends"][b1.addr.to_string()]["spec"]["url_path"], "/v1", "url_path is kept");
    wait_full(&mut lb, "/api/", 1, "the node").await;
    let h = grpc::pool_health(&mut lb, "/api/").await.expect("health");
    assert_eq!(h.backends[0].backend, Some(grpc::backend(b1.addr, "/v1")), "PoolHealth answers the url_path");
    let healthy_only = grpc::pb::PoolHealthReq { pattern: "/api/".into(), healthy: false, sick: true };
    assert!(lb.pool_health(healthy_only).await.expect("sick only").into_inner().health.expect("h").backends.is_empty());

    assert_eq!(code(lb.remove_backend(grpc::remove_backend("/api/", node.http())).await), Code::NotFound);
    lb.remove_backend(grpc::remove_backend("/api/", b1.addr)).await.expect("removeBackend");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_needs_the_token_and_shares_the_port_with_the_json_api() {
    let node = TestNode::start("grpc-auth").await;
    let admin = node.handle.admin_addr();
    let rejected = |bytes: &[u8]| {
        String::from_utf8_lossy(bytes)
            .lines()
            .filter(|l| l.starts_with("shoal_rejected_inputs_total") && l.contains("admin_auth"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    let before = rejected(&node.admin.raw(Method::GET, "/metrics", None).await.expect("metrics").1);

    let mut anonymous = grpc::client(admin, None).await;
    let e = anonymous.add_pool(grpc::add_pool("/", 1)).await.expect_err("no token");
    assert_eq!(e.code(), Code::Unauthenticated);
    let mut wrong = grpc::client(admin, Some(&"x".repeat(64))).await;
    assert_eq!(grpc::pool_health(&mut wrong, "/").await.expect_err("wrong token").code(), Code::Unauthenticated);
    let after = rejected(&node.admin.raw(Method::GET, "/metrics", None).await.expect("metrics").1);
    assert!(after >= before + 2.0, "rejections counted: {before} -> {after}");
    assert!(node.get("/v1/pools").await.as_array().is_some_and(|p| p.is_empty()), "nothing was written");

    // Unknown services and methods get gRPC answers (not the JSON router's 401 or 404).
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{admin}")).expect("e").connect().await;
    let mut raw = tonic::client::Grpc::new(channel.expect("channel"));
    let codec = || tonic_prost::ProstCodec::<grpc::pb::RemovePoolReq, grpc::pb::RemovePoolResp>::default();
    for (path, token, expected) in [
        ("/rollout.lb.Elsewhere/AddPool", None, Code::Unimplemented),
        ("/rollout.lb.LoadBalancer/Teleport", None, Code::Unauthenticated),
        ("/rollout.lb.LoadBalancer/Teleport", Some(node.token()), Code::Unimplemented),
    ] {
        let mut req = tonic::Request::new(grpc::pb::RemovePoolReq::default());
        if let Some(t) = token {
            req.metadata_mut().insert("authorization", format!("Bearer {t}").parse().expect("metadata"));
        }
        raw.ready().await.expect("ready");
        let r = raw.unary(req, http::uri::PathAndQuery::from_static(path), codec()).await;
        assert_eq!(code(r), expected, "{path} with token {token:?}");
    }

    // With the token it works, and the JSON API on the same port sees the write.
    let mut lb = grpc::client(admin, Some(node.token())).await;
    lb.add_pool(grpc::add_pool("/", 1)).await.expect("addPool with the token");
    let pools = node.get("/v1/pools").await;
    assert_eq!(pools[0]["name"], "root");
    assert_eq!(pools[0]["spec"]["algorithm"], "p2c");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_grpc_only_where_the_operator_opted_in_and_it_is_logged() {
    let mut c = ProcCluster::start(BIN, 1, &["--grpc-allow-unauthenticated"]).await;
    let b1 = HttpBackend::start("b1").await;
    let mut lb = grpc::client(c.nodes[0].admin_addr(), None).await;
    eventually(Duration::from_secs(20), "anonymous AddPool", || {
        let mut lb = lb.clone();
        async move { lb.add_pool(grpc::add_pool("/", 1)).await.ok() }
    })
    .await;
    lb.add_backend(grpc::add_backend("/", b1.addr, "/")).await.expect("anonymous addBackend");
    wait_full(&mut lb, "/", 1, "the node").await;
    assert!(c.nodes[0].log_text().contains("--grpc-allow-unauthenticated"), "the opt-in is logged at start");
    // The JSON API still wants the token.
    let (status, _) = shoal_node::cli::client::AdminClient::new(&c.nodes[0].admin_addr().to_string())
        .expect("client")
        .raw(Method::GET, "/v1/state", None)
        .await
        .expect("answer");
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    c.stop(0);
}

/// The venv `scripts/test` creates with pinned grpcio, grpcio-tools and protobuf.
fn venv_python() -> PathBuf {
    if let Some(p) = std::env::var_os("SHOAL_TEST_PYTHON") {
        return PathBuf::from(p);
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    root.join("target/grpc-venv/bin/python")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_grpcio_client_drives_a_node() {
    let python = venv_python();
    assert!(
        python.exists(),
        "{} is missing: run scripts/test (it creates the venv with pinned grpcio), or \
         scripts/grpc-venv to create only the venv, or point SHOAL_TEST_PYTHON at a python with grpcio",
        python.display()
    );
    let node = TestNode::start("grpc-python").await;
    let b1 = HttpBackend::start("b1").await;
    let b2 = HttpBackend::start("b2").await;
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new(&python)
            .arg(root.join("tests/python/seed003_client.py"))
            .args(["--proto-dir", &root.join("proto").to_string_lossy()])
            .args(["--lb", &node.handle.admin_addr().to_string(), "--token", node.token()])
            .args(["--backend", &b1.addr.to_string(), "--backend", &b2.addr.to_string()])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the Python client finished within 120 s")
    .expect("run the Python client");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "python client failed: {}\n{stdout}\n{stderr}", out.status);
    assert!(stdout.contains("seed 003 flow: ok"), "{stdout}");
    // What Python wrote is what shoal holds: one p2c pool for /py/ with b1 left in it.
    let pools = node.get("/v1/pools").await;
    let pool = pools.as_array().and_then(|p| p.iter().find(|p| p["spec"]["pattern"] == "/py/")).expect("pool /py/");
    assert_eq!(pool["spec"]["algorithm"], "p2c");
    let backends: Vec<&String> = pool["backends"].as_object().expect("backends").keys().collect();
    assert_eq!(backends, vec![&b1.addr.to_string()]);
    let (status, body) = get_text(node.http(), "/py/x").await.expect("GET");
    assert!(status.is_success() && body.contains("b1"), "{status} {body}");
    node.stop().await;
}
