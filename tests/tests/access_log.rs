//! Request ids, traceparent and the access log through real nodes on loopback: what the
//! backend and the client see, the JSON and combined lines written for HTTP requests and TCP
//! connections, and a node process reopening its log file on SIGUSR1 after a rename.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use shoal_node::dataplane::accesslog::{Format, Target};
use shoal_node::dataplane::reqid::{IdSettings, valid_traceparent};
use shoal_node::node::AccessLogOptions;
use shoal_tests::cluster::ProcCluster;
use shoal_tests::{
    EchoBackend, HttpBackend, LOCALHOST, TestNode, eventually, free_port, get_text, tls_client, write_cert,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const BIN: &str = env!("CARGO_BIN_EXE_shoal-under-test");
const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// A backend that answers `ok` to everything and keeps every request head it got.
struct Capture {
    addr: SocketAddr,
    heads: Arc<Mutex<Vec<String>>>,
}

impl Capture {
    async fn start() -> Capture {
        let listener = TcpListener::bind((LOCALHOST, 0)).await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let heads = Arc::new(Mutex::new(Vec::new()));
        let kept = heads.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                tokio::spawn(serve_capture(s, kept.clone()));
            }
        });
        Capture { addr, heads }
    }

    /// The head of the request whose target is `path` (health probes go elsewhere).
    fn head_for(&self, path: &str) -> String {
        let heads = self.heads.lock().expect("lock");
        let line = format!("GET {path} HTTP/1.1\r\n");
        heads.iter().rev().find(|h| h.starts_with(&line)).cloned().unwrap_or_else(|| panic!("no request for {path}"))
    }
}

async fn serve_capture(mut s: TcpStream, heads: Arc<Mutex<Vec<String>>>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head: Vec<u8> = buf.drain(..end + 4).collect();
            heads.lock().expect("lock").push(String::from_utf8_lossy(&head).into_owned());
            let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Request-Id: from-the-backend\r\n\r\nok";
            if s.write_all(answer).await.is_err() {
                return;
            }
        }
        match s.read(&mut chunk).await {
            Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => return,
        }
    }
}

/// Values of header `name` in a head's text (any case).
fn values(head: &str, name: &str) -> Vec<String> {
    head.lines()
        .filter_map(|l| l.split_once(':'))
        .filter(|(n, _)| n.trim().eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim().to_string())
        .collect()
}

/// One `GET path` with extra header lines over `io`: the response head and body as text.
async fn get_on<S: AsyncRead + AsyncWrite + Unpin>(mut io: S, path: &str, extra: &str) -> (String, String) {
    let req = format!("GET {path} HTTP/1.1\r\nHost: lb.test\r\n{extra}Connection: close\r\n\r\n");
    io.write_all(req.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), io.read_to_end(&mut out)).await.expect("answer in time").ok();
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (head.to_string(), body.to_string())
}

async fn get(addr: SocketAddr, path: &str, extra: &str) -> (String, String) {
    get_on(TcpStream::connect(addr).await.expect("connect"), path, extra).await
}

/// The access log's lines once `pred` holds for one of them.
async fn lines_when(path: &Path, what: &str, pred: impl Fn(&str) -> bool) -> Vec<String> {
    eventually(Duration::from_secs(20), what, || async {
        let text = std::fs::read_to_string(path).ok()?;
        let lines: Vec<String> = text.lines().map(str::to_string).collect();
        lines.iter().any(|l| pred(l)).then_some(lines)
    })
    .await
}

/// The JSON record whose `key` is `value`.
async fn record(path: &Path, key: &str, value: &str) -> Value {
    let lines = lines_when(path, &format!("a record with {key}={value}"), |l| {
        serde_json::from_str::<Value>(l).is_ok_and(|v| v[key] == value)
    })
    .await;
    lines.iter().filter_map(|l| serde_json::from_str::<Value>(l).ok()).find(|v| v[key] == value).expect("record")
}

async fn logged_node(
    id: &str,
    log: &Path,
    format: Format,
    adjust: impl FnOnce(&mut shoal_node::node::NodeOptions),
) -> TestNode {
    let data = tempfile::tempdir().expect("data");
    let target = Target::File(log.to_path_buf());
    TestNode::start_in(id, data, |o| {
        o.access_log = Some(AccessLogOptions { target, format });
        adjust(o);
    })
    .await
}

/// Pool `web` on `/` with `backend` as EC gateway 1 (pinning on: unpinned requests balance as usual).
async fn http_pool(node: &TestNode, backend: SocketAddr) {
    node.put("/v1/pools/web", json!({"pattern": "/", "pinning": true, "health": {"interval_ms": 200}})).await;
    node.put(&format!("/v1/pools/web/backends/{backend}"), json!({"slot": 1})).await;
    eventually(Duration::from_secs(15), "the backend healthy", || async {
        let h = node.get("/v1/pools/web/health").await;
        (h["backends"][0]["status"] == "BS_HEALTHY").then_some(())
    })
    .await;
}

async fn metric(node: &TestNode, series: &str) -> f64 {
    let (_, bytes) = node.admin.raw_bytes(http::Method::GET, "/metrics", Vec::new()).await.expect("metrics");
    let text = String::from_utf8_lossy(&bytes).into_owned();
    text.lines().filter(|l| l.starts_with(series)).filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok()).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_and_traceparents_reach_the_backend_and_the_log() {
    let dir = tempfile::tempdir().expect("dir");
    let log = dir.path().join("access.log");
    let cert = write_cert(dir.path(), "server", &["localhost"]);
    let tls = cert.clone();
    let node = logged_node("alog-1", &log, Format::Json, |o| {
        o.https_port = Some(0);
        o.tls = vec![tls];
    })
    .await;
    let backend = Capture::start().await;
    http_pool(&node, backend.addr).await;
    let http = node.http();

    // Absent: made, the same at the backend and in the response; a trace is started.
    let (resp, body) = get(http, "/made", "").await;
    assert_eq!(body, "ok");
    let rid = values(&resp, "x-request-id");
    assert_eq!(rid.len(), 1, "one id, the backend's own replaced: {resp}");
    assert_eq!(rid[0].len(), 36, "a UUID: {}", rid[0]);
    let seen = backend.head_for("/made");
    assert_eq!(values(&seen, "x-request-id"), rid);
    let started = values(&seen, "traceparent");
    assert!(started.len() == 1 && valid_traceparent(started[0].as_bytes()) && started[0].ends_with("-01"), "{seen}");

    // Valid: kept; a valid traceparent passes unchanged.
    let (resp, _) = get(http, "/kept?x=1", &format!("X-Request-Id: client-id-1\r\ntraceparent: {TP}\r\n")).await;
    assert_eq!(values(&resp, "x-request-id"), ["client-id-1"]);
    let seen = backend.head_for("/kept?x=1");
    assert_eq!(values(&seen, "x-request-id"), ["client-id-1"]);
    assert_eq!(values(&seen, "traceparent"), [TP]);

    // Invalid (too long; a malformed traceparent): replaced, and counted.
    let long = "a".repeat(129);
    let (resp, _) = get(http, "/replaced", &format!("X-Request-Id: {long}\r\ntraceparent: 00-nothex-01\r\n")).await;
    let made = values(&resp, "x-request-id");
    assert!(made.len() == 1 && made[0] != long, "{resp}");
    let seen = backend.head_for("/replaced");
    assert_eq!(values(&seen, "x-request-id"), made);
    let tp = values(&seen, "traceparent");
    assert!(tp.len() == 1 && valid_traceparent(tp[0].as_bytes()), "{seen}");
    assert!(metric(&node, "shoal_rejected_inputs_total{kind=\"request_id\"").await >= 1.0);
    assert!(metric(&node, "shoal_rejected_inputs_total{kind=\"traceparent\"").await >= 1.0);

    // The JSON record of the kept request names every field.
    let extra = "User-Agent: test-agent/1\r\nReferer: http://from.test/\r\n";
    get(http, "/kept?x=2", &format!("X-Request-Id: client-id-2\r\n{extra}")).await;
    let v = record(&log, "request_id", "client-id-2").await;
    assert_eq!(v["type"], "http");
    assert_eq!(v["client"], "127.0.0.1");
    assert_eq!((v["method"].as_str(), v["path"].as_str()), (Some("GET"), Some("/kept?x=2")));
    assert_eq!((v["protocol"].as_str(), v["status"].as_u64()), (Some("HTTP/1.1"), Some(200)));
    assert_eq!(v["pool"], "web");
    assert_eq!(v["backend"], backend.addr.to_string());
    assert_eq!((v["user_agent"].as_str(), v["referer"].as_str()), (Some("test-agent/1"), Some("http://from.test/")));
    assert!(v["bytes_in"].as_u64().expect("bytes_in") > 60, "the whole request head: {v}");
    assert!(v["bytes_out"].as_u64().expect("bytes_out") > 40, "the whole response: {v}");
    for key in ["connect_ms", "response_ms", "duration_ms"] {
        assert!(v[key].as_f64().is_some_and(|ms| ms >= 0.0), "{key}: {v}");
    }
    assert!(v["ec_pin"].is_null() && v["sni"].is_null(), "{v}");
    assert!(v["time"].as_str().is_some_and(|t| t.ends_with('Z') && t.len() == 24), "{v}");

    // An EC-pinned request names its slot.
    let (resp, _) = get(http, "/pinned", "X-Server-Select: gw1\r\nX-Request-Id: pin-1\r\n").await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert_eq!(record(&log, "request_id", "pin-1").await["ec_pin"], 1);

    // An answer of the proxy's own is logged too, and carries its id.
    node.delete("/v1/pools/web").await;
    let (resp, _) = get(http, "/gone", "X-Request-Id: local-2\r\n").await;
    assert!(resp.starts_with("HTTP/1.1 404") && values(&resp, "x-request-id") == ["local-2"], "{resp}");
    let v = record(&log, "request_id", "local-2").await;
    assert_eq!((v["status"].as_u64(), v["pool"].is_null(), v["backend"].is_null()), (Some(404), true, true));

    // TLS: the server name the client asked for.
    http_pool(&node, backend.addr).await;
    let tcp = TcpStream::connect(node.https()).await.expect("connect");
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
    let stream = tls_client(&cert.cert).connect(name, tcp).await.expect("TLS");
    let (resp, _) = get_on(stream, "/tls", "X-Request-Id: tls-1\r\n").await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let v = record(&log, "request_id", "tls-1").await;
    assert_eq!(v["sni"], "localhost");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_connections_and_combined_lines() {
    let dir = tempfile::tempdir().expect("dir");
    let log = dir.path().join("access.log");
    let node = logged_node("alog-2", &log, Format::Combined, |o| {
        o.ids = IdSettings { request_id: false, traceparent: false };
    })
    .await;
    let backend = Capture::start().await;
    http_pool(&node, backend.addr).await;

    // Ids off: the client's headers pass as they are, nothing is added.
    let extra = "X-Request-Id: not valid but passed\r\nUser-Agent: agent \"q\"\r\nReferer: http://r.test/\r\n";
    let (resp, _) = get(node.http(), "/combined?a=1", extra).await;
    assert_eq!(values(&resp, "x-request-id"), ["from-the-backend"], "the backend's own passes: {resp}");
    let seen = backend.head_for("/combined?a=1");
    assert_eq!(values(&seen, "x-request-id"), ["not valid but passed"]);
    assert!(values(&seen, "traceparent").is_empty(), "{seen}");

    let lines = lines_when(&log, "the combined line", |l| l.contains("/combined?a=1")).await;
    let line = lines.iter().find(|l| l.contains("/combined?a=1")).expect("line");
    // 127.0.0.1 - - [30/Nov/2026:17:00:00 +0000] "GET /combined?a=1 HTTP/1.1" 200 77 "http://r.test/" "agent \x22q\x22"
    let (host, rest) = line.split_once(" - - [").expect("host - - [");
    assert_eq!(host, "127.0.0.1");
    let (time, rest) = rest.split_once("] ").expect("time");
    assert!(time.ends_with(" +0000") && time.len() == 26, "{time}");
    let rest = rest.strip_prefix("\"GET /combined?a=1 HTTP/1.1\" ").expect("request line");
    let mut fields = rest.splitn(3, ' ');
    assert_eq!(fields.next(), Some("200"));
    let bytes: u64 = fields.next().expect("bytes").parse().expect("bytes");
    assert!(bytes > 40, "{line}");
    assert_eq!(fields.next(), Some("\"http://r.test/\" \"agent \\x22q\\x22\""), "{line}");

    // A TCP connection gets its line when it ends.
    let (echo, port) = echo_pool(&node).await;
    let mut s = TcpStream::connect((LOCALHOST, port)).await.expect("connect");
    s.write_all(b"hello").await.expect("write");
    let mut back = [0u8; 5];
    s.read_exact(&mut back).await.expect("echo");
    drop(s);
    let want = format!("\"TCP echo {}\" - 5", echo.addr);
    lines_when(&log, "the TCP line", |l| l.contains(&want)).await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_records_of_tcp_connections() {
    let dir = tempfile::tempdir().expect("dir");
    let log = dir.path().join("access.json");
    let node = logged_node("alog-3", &log, Format::Json, |_| {}).await;
    let (echo, port) = echo_pool(&node).await;
    let mut s = TcpStream::connect((LOCALHOST, port)).await.expect("connect");
    s.write_all(b"0123456789").await.expect("write");
    let mut back = [0u8; 10];
    s.read_exact(&mut back).await.expect("echo");
    drop(s);
    let v = record(&log, "type", "tcp").await;
    assert_eq!((v["pool"].as_str(), v["backend"].as_str()), (Some("echo"), Some(echo.addr.to_string().as_str())));
    assert_eq!((v["bytes_in"].as_u64(), v["bytes_out"].as_u64()), (Some(10), Some(10)));
    assert_eq!(v["protocol"], "tcp");
    assert!(v["status"].is_null() && v["method"].is_null(), "{v}");
    assert!(v["connect_ms"].as_f64().is_some() && v["duration_ms"].as_f64().is_some(), "{v}");
    assert_eq!(metric(&node, "shoal_access_log_dropped_total").await, 0.0);
    node.stop().await;
}

/// Lines of `path` that mention `needle`.
fn count(path: &PathBuf, needle: &str) -> usize {
    std::fs::read_to_string(path).unwrap_or_default().lines().filter(|l| l.contains(needle)).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_process_reopens_its_log_on_sigusr1_and_through_the_api() {
    let logs = tempfile::tempdir().expect("dir");
    let log = logs.path().join("access.log");
    let log_arg = log.to_str().expect("utf8");
    let mut c = ProcCluster::start(BIN, 1, &["--access-log", log_arg, "--access-log-format", "common"]).await;
    let backend = HttpBackend::start("b1").await;
    c.put(0, "/v1/pools/web", json!({"pattern": "/", "health": {"interval_ms": 200}})).await;
    c.put(0, &format!("/v1/pools/web/backends/{}", backend.addr), json!({})).await;
    let http = c.nodes[0].http();
    eventually(Duration::from_secs(30), "the pool answers", || async {
        let (s, _) = get_text(http, "/before").await.ok()?;
        s.is_success().then_some(())
    })
    .await;
    lines_when(&log, "the first line", |l| l.contains("\"GET /before HTTP/1.1\" 200")).await;

    // logrotate: rename, then SIGUSR1; the node writes on to the old file until it reopens.
    let rotated = logs.path().join("access.log.1");
    std::fs::rename(&log, &rotated).expect("rename");
    let pid = c.nodes[0].pid().expect("pid").to_string();
    assert!(Command::new("kill").args(["-USR1", &pid]).status().expect("kill").success());
    eventually(Duration::from_secs(20), "a new file after SIGUSR1", || async { log.exists().then_some(()) }).await;
    get_text(http, "/after-signal").await.expect("request");
    lines_when(&log, "the request in the new file", |l| l.contains("GET /after-signal ")).await;
    assert_eq!(count(&rotated, "GET /after-signal "), 0);
    assert!(count(&rotated, "GET /before ") >= 1);
    assert!(c.nodes[0].is_running(), "SIGUSR1 must not stop the node");

    // The admin API does the same, authenticated.
    let second = logs.path().join("access.log.2");
    std::fs::rename(&log, &second).expect("rename");
    let admin = c.nodes[0].admin();
    let answer: Value = admin.call(http::Method::POST, "/v1/access-log/reopen", None).await.expect("reopen");
    assert_eq!(answer["reopened"], true);
    assert!(log.exists(), "reopened before the answer");
    get_text(http, "/after-api").await.expect("request");
    lines_when(&log, "the request after the API reopen", |l| l.contains("GET /after-api ")).await;
    assert_eq!(count(&second, "GET /after-api "), 0);
    let anonymous = shoal_node::cli::client::AdminClient::new(&c.nodes[0].admin_addr().to_string()).expect("client");
    let refused = anonymous.call::<Value>(http::Method::POST, "/v1/access-log/reopen", None).await;
    assert!(refused.is_err(), "reopening needs a token");
}

#[test]
fn bad_settings_name_the_key_and_fail() {
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("shoal.toml");
    std::fs::write(&file, "[node]\naccess_log_format = \"xml\"\n").expect("write");
    let out = Command::new(BIN).arg("check-config").arg(&file).output().expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("node.access_log_format") && err.contains("xml"), "{err}");
    std::fs::write(&file, "[node]\naccess_log = \"stdout\"\nrequest_id = false\n").expect("write");
    let out = Command::new(BIN).arg("check-config").arg(&file).output().expect("run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let data = dir.path().join("data");
    let out =
        Command::new(BIN).args(["node", "--access-log-format", "xml", "--data-dir"]).arg(&data).output().expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--access-log-format"), "{err}");
}

/// A TCP pool `echo` on a free port with one echo backend, once that backend is healthy.
async fn echo_pool(node: &TestNode) -> (EchoBackend, u16) {
    let echo = EchoBackend::start().await;
    let port = free_port();
    node.put("/v1/pools/echo", json!({"protocol": "tcp", "listen": port, "health": {"interval_ms": 200}})).await;
    node.put(&format!("/v1/pools/echo/backends/{}", echo.addr), json!({})).await;
    eventually(Duration::from_secs(15), "echo healthy", || async {
        let h = node.get("/v1/pools/echo/health").await;
        (h["backends"][0]["status"] == "BS_HEALTHY").then_some(())
    })
    .await;
    (echo, port)
}
