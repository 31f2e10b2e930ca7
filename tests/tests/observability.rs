//! Observability: a real Prometheus scraping a three-node cluster, the Grafana dashboard's
//! queries against what shoal exports, the status page in headless Chromium, JSON logs.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use shoal_tests::cluster::ProcCluster;
use shoal_tests::{
    EchoBackend, HeartbeatBackend, HttpBackend, LOCALHOST, TestNode, eventually, free_port, free_udp_port, get_text,
    write_cert,
};
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

/// The value of the first series of `name` whose label text contains every one of `labels`.
fn sample(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| l.split(['{', ' ']).next() == Some(name))
        .find(|l| labels.iter().all(|want| l.contains(want)))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

async fn metrics_text(node: &TestNode) -> String {
    let (_, bytes) = node.admin.raw(http::Method::GET, "/metrics", None).await.expect("metrics");
    String::from_utf8_lossy(&bytes).into_owned()
}

/// When a PEM certificate file expires (Unix seconds), read independently of shoal.
fn not_after(pem_file: &Path) -> f64 {
    let pem = std::fs::read(pem_file).expect("read cert");
    let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).expect("pem");
    pem.parse_x509().expect("x509").validity().not_after.timestamp() as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alert_rules_query_only_exported_metrics() {
    let rules = std::fs::read_to_string(repo().join("deploy/prometheus/alerts.yml")).expect("read alerts.yml");
    let code: String = rules.lines().filter(|l| !l.trim_start().starts_with('#')).collect::<Vec<_>>().join("\n");
    let wanted = metric_names(&code);
    assert!(wanted.len() >= 12, "the rules use shoal's metrics: {wanted:?}");

    // A node with an HTTPS listener, admin TLS, an HTTP pool with traffic and a heartbeat pool.
    let certs = tempfile::tempdir().expect("dir");
    let https = write_cert(certs.path(), "web", &["localhost"]);
    let admin = write_cert(certs.path(), "admin", &["127.0.0.1"]);
    let (https_files, admin_files) = (https.clone(), admin.clone());
    let node = TestNode::start_in("alerts-1", tempfile::tempdir().expect("data"), move |o| {
        o.https_port = Some(0);
        o.tls = vec![https_files];
        o.admin_tls = Some(admin_files);
    })
    .await;
    let b = HttpBackend::start("b").await;
    node.put("/v1/pools/web", json!({"pattern": "/", "health": {"interval_ms": 200}})).await;
    node.put(&format!("/v1/pools/web/backends/{}", b.addr), json!({})).await;
    let (listen, hb) = (free_port(), free_udp_port());
    node.put(
        "/v1/pools/logic",
        json!({"protocol": "tcp", "listen": listen, "self_register": true,
               "allow_unauthenticated_heartbeats": true, "health": {"heartbeat_port": hb, "heartbeat_timeout_ms": 1000}}),
    )
    .await;
    let beats = HeartbeatBackend::start(vec![(LOCALHOST, hb).into()], None).await;
    eventually(Duration::from_secs(10), "web serves", || async {
        get_text(node.http(), "/").await.ok().filter(|(s, _)| s.is_success())
    })
    .await;
    let text = eventually(Duration::from_secs(15), "every metric the rules use, the node ready", || async {
        let text = metrics_text(&node).await;
        let have = exported(&text);
        let ready = sample(&text, "shoal_node_ready", &[]) == Some(1.0);
        let beating = sample(&text, "shoal_heartbeat_backends_up", &["pool=\"logic\""]) == Some(1.0);
        (ready && beating && wanted.iter().all(|w| have.contains(w) || w == "shoal_heartbeat_backends_lost_total"))
            .then_some(text)
    })
    .await;
    let https_file = format!("file=\"{}\"", https.cert.display());
    let admin_file = format!("file=\"{}\"", admin.cert.display());
    let expiry = "shoal_certificate_expiry_timestamp_seconds";
    assert_eq!(sample(&text, expiry, &["cert=\"https\"", &https_file]), Some(not_after(&https.cert)));
    assert_eq!(sample(&text, expiry, &["cert=\"admin\"", &admin_file]), Some(not_after(&admin.cert)));
    assert_eq!(sample(&text, "shoal_raft_voters_live", &[]), Some(1.0), "alone: its own voter");
    assert_eq!(sample(&text, "shoal_heartbeat_backends_known", &["pool=\"logic\""]), Some(1.0));

    // A silent heartbeat backend is lost: counted, and no longer up.
    beats.silence();
    let text = eventually(Duration::from_secs(15), "the silent backend lost", || async {
        let text = metrics_text(&node).await;
        (sample(&text, "shoal_heartbeat_backends_lost_total", &["pool=\"logic\""]) == Some(1.0)).then_some(text)
    })
    .await;
    assert_eq!(sample(&text, "shoal_heartbeat_backends_up", &["pool=\"logic\""]), Some(0.0));
    let have = exported(&text);
    let missing: Vec<&String> = wanted.iter().filter(|w| !have.contains(*w)).collect();
    assert!(missing.is_empty(), "alert rules use metrics no node exports: {missing:?}");

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

/// The state of alert `name` for `instance` in Prometheus: "firing", "pending" or "inactive".
async fn alert_state(prom: SocketAddr, name: &str, instance: &str) -> Option<String> {
    let answer = shoal_tests::raw_http(prom, http::Method::GET, "/api/v1/alerts", None).await.ok()?;
    let v: Value = serde_json::from_slice(&answer.body).ok()?;
    let alerts = v["data"]["alerts"].as_array()?;
    let state = alerts
        .iter()
        .filter(|a| a["labels"]["alertname"] == name && a["labels"]["instance"] == instance)
        .filter_map(|a| a["state"].as_str())
        .max_by_key(|s| match *s {
            "firing" => 2,
            "pending" => 1,
            _ => 0,
        });
    Some(state.unwrap_or("inactive").to_string())
}

/// A real Prometheus scrapes a cluster of node processes with deploy/prometheus/alerts.yml
/// loaded: the alert gauges are there on every node, and ShoalNodeDown fires for a killed node
/// and resolves after its restart (scenario 19 does the same with the compose image).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_prometheus_scrapes_a_three_node_cluster() {
    let prometheus = tool(&["prometheus"]);
    let mut c = ProcCluster::start(BIN, 3, &[]).await;
    let b = HttpBackend::start("b").await;
    c.put(0, "/v1/pools/web", json!({"pattern": "/", "health": {"interval_ms": 300}})).await;
    c.put(1, &format!("/v1/pools/web/backends/{}", b.addr), json!({})).await;
    let dir = tempfile::tempdir().expect("dir");
    let targets: Vec<String> =
        c.nodes.iter().map(|n| format!("\"{}\"", SocketAddr::new(n.ip, shoal_tests::cluster::ADMIN_PORT))).collect();
    let config = format!(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: shoal\n    authorization:\n      credentials_file: {}\n    static_configs:\n      - targets: [{}]\n",
        repo().join("deploy/prometheus/alerts.yml").display(),
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
    // The gauges the alerts need, from every node: Raft certificate and CA expiry (in the
    // future), readiness, every voter seen alive.
    for (query, want) in [
        ("count(shoal_certificate_expiry_timestamp_seconds{cert=\"node\"} > time())", 3.0),
        ("count(shoal_certificate_expiry_timestamp_seconds{cert=\"ca\"} > time())", 3.0),
        ("count(shoal_node_ready == 1)", 3.0),
        ("min(shoal_raft_voters_live)", 3.0),
    ] {
        eventually(Duration::from_secs(60), query, || async { prom_query(prom, query).await.filter(|v| *v == want) })
            .await;
    }
    eprintln!("prometheus: requests {first} -> {later}, leaders {leaders}, nodes {nodes}");

    // Kill a node: ShoalNodeDown (for: 30s) fires for it; restarted, the alert resolves.
    let victim = 2;
    let instance = SocketAddr::new(c.nodes[victim].ip, shoal_tests::cluster::ADMIN_PORT).to_string();
    assert_eq!(alert_state(prom, "ShoalNodeDown", &instance).await.as_deref(), Some("inactive"));
    c.kill(victim);
    eventually(Duration::from_secs(120), "ShoalNodeDown fires for the killed node", || async {
        (alert_state(prom, "ShoalNodeDown", &instance).await? == "firing").then_some(())
    })
    .await;
    for other in [0, 1] {
        let other = SocketAddr::new(c.nodes[other].ip, shoal_tests::cluster::ADMIN_PORT).to_string();
        assert_eq!(alert_state(prom, "ShoalNodeDown", &other).await.as_deref(), Some("inactive"), "{other}");
    }
    eventually(Duration::from_secs(60), "the leader sees a voter missing", || async {
        prom_query(prom, "max(shoal_raft_voters - shoal_raft_voters_live and on (instance) shoal_raft_is_leader == 1)")
            .await
            .filter(|v| *v == 1.0)
    })
    .await;
    c.restart(victim);
    eventually(Duration::from_secs(90), "ShoalNodeDown resolves after the restart", || async {
        (alert_state(prom, "ShoalNodeDown", &instance).await? == "inactive").then_some(())
    })
    .await;
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
