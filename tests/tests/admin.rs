//! Admin API: JSON errors for bad input, seed 003's first-check rule, persistence.

use std::time::Duration;

use http::{Method, StatusCode};
use serde_json::json;
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
