//! Observability: a real Prometheus scraping a three-node cluster, the Grafana dashboard's
//! queries against what shoal exports, the status page in headless Chromium, JSON logs.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use shoal_tests::cluster::ProcCluster;
use shoal_tests::{EchoBackend, HttpBackend, LOCALHOST, TestNode, eventually, free_port, get_text};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BIN: &str = env!("CARGO_BIN_EXE_shoal-under-test");

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A tool the test needs; `scripts/test` (and `.ci/run`) install it from Debian's packages.
fn tool(names: &[&str]) -> PathBuf {
    for n in names {
        for dir in ["/usr/bin", "/usr/local/bin", "/bin"] {
            let p = Path::new(dir).join(n);
            if p.exists() {
                return p;
            }
        }
    }
    panic!("{names:?} not installed: run scripts/test, which installs it (apt-get install {})", names[0]);
}

/// Metric names a PromQL expression refers to.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(pos) = expr[i..].find("shoal_") {
        let start = i + pos;
        let boundary = start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let end =
            expr[start..].find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).map_or(expr.len(), |e| start + e);
        if boundary {
            out.insert(expr[start..end].to_string());
        }
        i = end;
    }
    out
}

/// Series names in a text exposition.
fn exported(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next().map(str::to_string))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grafana_dashboard_queries_only_exported_metrics() {
    let dash: Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("deploy/grafana/dashboards/shoal.json")).expect("read"),
    )
    .expect("dashboard JSON parses");
    let exprs: Vec<String> = dash["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(str::to_string))
        .collect();
    assert!(exprs.len() >= 15, "the dashboard has its panels");
    let wanted: BTreeSet<String> = exprs.iter().flat_map(|e| metric_names(e)).collect();

    // Exercise every path the dashboard shows: traffic, a 502 and a 503, a passive ejection, a websocket.
    let node = TestNode::start("obs-1").await;
    let b = HttpBackend::start("b").await;
    node.put("/v1/pools/web", json!({"pattern": "/", "health": {"interval_ms": 200}})).await;
    node.put(&format!("/v1/pools/web/backends/{}", b.addr), json!({})).await;
    node.put("/v1/pools/empty", json!({"pattern": "/empty/"})).await;
    let dead = format!("127.0.0.1:{}", free_port());
    node.put("/v1/pools/dead", json!({"pattern": "/dead/", "health": {"check": "none"}})).await;
    node.put(&format!("/v1/pools/dead/backends/{dead}"), json!({"force": true})).await;
    eventually(Duration::from_secs(10), "web serves", || async {
        get_text(node.http(), "/").await.ok().filter(|(s, _)| s.is_success())
    })
    .await;
    for path in ["/", "/empty/x", "/dead/x"] {
        let _ = get_text(node.http(), path).await;
    }
    let text = eventually(Duration::from_secs(10), "every dashboard metric exported", || async {
        let (_, bytes) = node.admin.raw(http::Method::GET, "/metrics", None).await.ok()?;
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let have = exported(&text);
        wanted.iter().all(|w| have.contains(w)).then_some(text)
    })
    .await;
    let have = exported(&text);
    let missing: Vec<&String> = wanted.iter().filter(|w| !have.contains(*w)).collect();
    assert!(missing.is_empty(), "dashboard metrics not exported: {missing:?}");
    for family in ["shoal_raft_term", "shoal_heartbeats_received_total", "shoal_connections_accepted_total"] {
        assert!(text.contains(&format!("# TYPE {family}")) || family.contains("heartbeats"), "{family}");
    }
    node.stop().await;
}

async fn prom_query(prom: SocketAddr, query: &str) -> Option<f64> {
    let path = format!("/api/v1/query?query={}", urlencode(query));
    let answer = shoal_tests::raw_http(prom, http::Method::GET, &path, None).await.ok()?;
    let v: Value = serde_json::from_slice(&answer.body).ok()?;
    v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'.' | b'-' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_prometheus_scrapes_a_three_node_cluster() {
    let prometheus = tool(&["prometheus"]);
    let c = ProcCluster::start(BIN, 3, &[]).await;
    let b = HttpBackend::start("b").await;
    c.put(0, "/v1/pools/web", json!({"pattern": "/", "health": {"interval_ms": 300}})).await;
    c.put(1, &format!("/v1/pools/web/backends/{}", b.addr), json!({})).await;
    let dir = tempfile::tempdir().expect("dir");
    let targets: Vec<String> =
        c.nodes.iter().map(|n| format!("\"{}\"", SocketAddr::new(n.ip, shoal_tests::cluster::ADMIN_PORT))).collect();
    let config = format!(
        "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: shoal\n    authorization:\n      credentials_file: {}\n    static_configs:\n      - targets: [{}]\n",
        c.nodes[0].token_file.display(),
        targets.join(", ")
    );
    std::fs::write(dir.path().join("prometheus.yml"), config).expect("config");
    let prom: SocketAddr = (LOCALHOST, free_port()).into();
    let mut child = Command::new(prometheus)
        .arg(format!("--config.file={}", dir.path().join("prometheus.yml").display()))
        .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
        .arg(format!("--web.listen-address={prom}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start prometheus");
    let traffic = async |n: usize| {
        for i in 0..n {
            let _ = get_text(c.nodes[i % 3].http(), "/").await;
        }
    };
    eventually(Duration::from_secs(30), "every node serves", || async {
        for n in &c.nodes {
            get_text(n.http(), "/").await.ok().filter(|(s, _)| s.is_success())?;
        }
        Some(())
    })
    .await;
    traffic(30).await;
    let first = eventually(Duration::from_secs(60), "prometheus sees requests", || async {
        prom_query(prom, "sum(shoal_http_requests_total)").await.filter(|v| *v > 0.0)
    })
    .await;
    traffic(60).await;
    let later = eventually(Duration::from_secs(60), "the request count grows", || async {
        prom_query(prom, "sum(shoal_http_requests_total)").await.filter(|v| *v > first)
    })
    .await;
    let leaders = eventually(Duration::from_secs(60), "one leader", || async {
        prom_query(prom, "count(shoal_raft_is_leader == 1)").await.filter(|v| *v == 1.0)
    })
    .await;
    let nodes = eventually(Duration::from_secs(60), "all three nodes scraped", || async {
        prom_query(prom, "count(shoal_raft_term)").await.filter(|v| *v == 3.0)
    })
    .await;
    eprintln!("prometheus: requests {first} -> {later}, leaders {leaders}, nodes {nodes}");
    let _ = child.kill();
    let _ = child.wait();
}

/// Headless Chromium's flags; the virtual time budget lets the status page's script fetch and render.
const HEADLESS: [&str; 5] =
    ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--virtual-time-budget=6000"];

/// The DOM of `url` once headless Chromium has run its scripts.
async fn rendered_dom(chromium: PathBuf, url: String) -> String {
    let out = tokio::task::spawn_blocking(move || {
        Command::new(chromium)
            .args(HEADLESS)
            .arg("--dump-dom")
            .arg(&url)
            .stderr(Stdio::null())
            .output()
            .expect("run chromium")
    })
    .await
    .expect("join");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_renders_nodes_and_pools_in_headless_chromium() {
    let chromium = tool(&["chromium", "chromium-browser"]);
    let node = TestNode::start("obs-page").await;
    let b = HttpBackend::start("b").await;
    node.put("/v1/pools/web", json!({"pattern": "/", "health": {"interval_ms": 200}})).await;
    node.put(&format!("/v1/pools/web/backends/{}", b.addr), json!({"weight": 3})).await;
    node.put("/v1/pools/api", json!({"pattern": "/api/"})).await;
    eventually(Duration::from_secs(10), "web serves", || async {
        get_text(node.http(), "/").await.ok().filter(|(s, _)| s.is_success())
    })
    .await;
    let url = format!("http://{}/#token={}", node.handle.admin_addr(), node.token());
    let out_dir = repo().join("target");
    std::fs::create_dir_all(&out_dir).expect("target dir");
    let shot = out_dir.join("status-page.png");
    let dom = rendered_dom(chromium.clone(), url.clone()).await;
    assert!(dom.contains("data-node=\"obs-page\""), "the node appears: {dom:.2000}");
    assert!(dom.contains("data-pool=\"web\"") && dom.contains("data-pool=\"api\""), "the pools appear: {dom:.2000}");
    assert!(dom.contains("BS_HEALTHY") && dom.contains("PS_FULL"), "health appears: {dom:.3000}");
    let shot2 = shot.clone();
    tokio::task::spawn_blocking(move || {
        let status = Command::new(chromium)
            .args(HEADLESS)
            .arg("--window-size=1280,900")
            .arg(format!("--screenshot={}", shot2.display()))
            .arg(&url)
            .stderr(Stdio::null())
            .stdout(Stdio::null())
            .status()
            .expect("run chromium");
        assert!(status.success());
    })
    .await
    .expect("join");
    let size = std::fs::metadata(&shot).map(|m| m.len()).unwrap_or(0);
    assert!(size > 10_000, "screenshot kept at {} ({size} bytes)", shot.display());
    node.stop().await;
}

/// Issue 14, finding 7: values the page shows come from operators and peers (a node's id and
/// zone here); markup in them, or a quote that would close an attribute, is shown as text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_shows_hostile_names_as_text_in_headless_chromium() {
    let chromium = tool(&["chromium", "chromium-browser"]);
    let id = r#"evil" data-x="<img src=x onerror=alert(1)>"#;
    let zone = "<img src=x onerror=alert(2)>";
    let node = TestNode::start_in(id, tempfile::tempdir().expect("dir"), |o| o.zone = zone.into()).await;
    node.put("/v1/pools/web", json!({"pattern": "/"})).await;
    let url = format!("http://{}/#token={}", node.handle.admin_addr(), node.token());
    let dom = rendered_dom(chromium, url).await;
    assert!(dom.contains("data-pool=\"web\""), "the page rendered: {dom:.2000}");
    assert!(!dom.contains("<img"), "markup from a node's id or zone became an element: {dom:.4000}");
    assert!(!dom.contains("data-node=\"evil\""), "a quote in a value closed the attribute: {dom:.4000}");
    assert!(dom.contains("data-node=\"evil&quot; data-x=&quot;&lt;img"), "the attribute holds it all: {dom:.4000}");
    assert!(dom.contains("&lt;img src=x onerror=alert(2)&gt;"), "the zone is shown as text: {dom:.4000}");
    assert!(dom.contains("evil\" data-x=\"&lt;img"), "the id is shown as text: {dom:.4000}");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_the_connection_span_and_seed_events() {
    let echo = EchoBackend::start().await;
    let dir = tempfile::tempdir().expect("dir");
    let (admin, listen) = (free_port(), free_port());
    let log = dir.path().join("node.log");
    let token_file = dir.path().join("admin.token");
    let mut child = Command::new(BIN)
        .args(["node", "--id", "logs", "--log-format", "json", "--listen-ip", "127.0.0.1", "--http-port", "0"])
        .args(["--token-file", token_file.to_str().expect("utf8")])
        .args(["--admin", &format!("127.0.0.1:{admin}"), "--data-dir", dir.path().join("data").to_str().expect("utf8")])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("spawn");
    let token = eventually(Duration::from_secs(20), "token file written", || async {
        std::fs::read_to_string(&token_file).ok().map(|t| t.trim().to_string()).filter(|t| !t.is_empty())
    })
    .await;
    let client = shoal_node::cli::client::AdminClient::new(&format!("127.0.0.1:{admin}"))
        .expect("client")
        .with_token(Some(token));
    eventually(Duration::from_secs(20), "pool created", || async {
        let body = json!({"protocol": "tcp", "listen": listen});
        client.call::<Value>(http::Method::PUT, "/v1/pools/echo", Some(body)).await.ok()
    })
    .await;
    let path = format!("/v1/pools/echo/backends/{}", echo.addr);
    client.call::<Value>(http::Method::PUT, &path, Some(json!({}))).await.expect("backend");
    eventually(Duration::from_secs(20), "echo through the proxy", || async {
        let mut s = tokio::net::TcpStream::connect((LOCALHOST, listen)).await.ok()?;
        s.write_all(b"hello").await.ok()?;
        s.shutdown().await.ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        (buf == b"hello").then_some(())
    })
    .await;
    let closed = eventually(Duration::from_secs(10), "connection closed event", || async {
        let text = std::fs::read_to_string(&log).ok()?;
        text.lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|v| v["message"] == "connection closed" && v["client_to_backend"] == 5)
    })
    .await;
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(closed["level"], "INFO");
    assert_eq!(closed["backend_to_client"], 5);
    let span = &closed["span"];
    assert_eq!(span["pool"], "echo", "{closed}");
    assert_eq!(span["backend"], echo.addr.to_string(), "{closed}");
    assert_eq!(span["listener"], listen, "{closed}");
    assert!(span["client"].as_str().unwrap_or("").starts_with("127.0.0.1:"), "{closed}");
    let text = std::fs::read_to_string(&log).expect("log");
    for event in ["client connected", "forwarding traffic between client and backend"] {
        assert!(text.contains(event), "missing {event:?}");
    }
}
