//! Backend protection through a real node on loopback: `max_connections` with its queue (HTTP
//! and TCP), slow start (of a new backend and of one restarted under reconnect load), and
//! outlier ejection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering};
use std::time::Duration;

use http::{Method, StatusCode};
use serde_json::{Value, json};
use shoal_tests::{EchoBackend, LOCALHOST, TestNode, eventually, free_port, get_text, raw_http};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

/// An HTTP backend that counts requests in flight and answers each only once the test
/// releases it (or at once when opened wide), with a settable status.
struct Gate {
    addr: SocketAddr,
    name: String,
    inflight: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
    served: Arc<AtomicUsize>,
    status: Arc<AtomicU16>,
    release: Arc<Semaphore>,
    task: tokio::task::JoinHandle<()>,
}

impl Gate {
    async fn start(name: &str, open: bool) -> Gate {
        Gate::start_at(name, open, SocketAddr::new(LOCALHOST, 0)).await
    }

    /// A gate on `addr` (port 0: any), e.g. a restarted one on its old port.
    async fn start_at(name: &str, open: bool, addr: SocketAddr) -> Gate {
        let listener = TcpListener::bind(addr).await.expect("bind");
        let release = Arc::new(Semaphore::new(if open { Semaphore::MAX_PERMITS } else { 0 }));
        let mut g = Gate {
            addr: listener.local_addr().expect("addr"),
            name: name.to_string(),
            inflight: Arc::default(),
            peak: Arc::default(),
            served: Arc::default(),
            status: Arc::new(AtomicU16::new(200)),
            release,
            task: tokio::spawn(async {}),
        };
        let conn = g.conn_state();
        // The connections belong to the accept task: dropping the gate closes them all, as a
        // process that exits would.
        g.task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((s, _)) = listener.accept().await {
                while conns.try_join_next().is_some() {}
                conns.spawn(serve_conn(s, conn.clone()));
            }
        });
        g
    }

    fn conn_state(&self) -> ConnState {
        ConnState {
            name: self.name.clone(),
            inflight: self.inflight.clone(),
            peak: self.peak.clone(),
            served: self.served.clone(),
            status: self.status.clone(),
            release: self.release.clone(),
        }
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Clone)]
struct ConnState {
    name: String,
    inflight: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
    served: Arc<AtomicUsize>,
    status: Arc<AtomicU16>,
    release: Arc<Semaphore>,
}

/// Keep-alive HTTP/1.1 without request bodies: enough for GETs through the proxy.
async fn serve_conn(mut s: TcpStream, st: ConnState) {
    let mut buf = Vec::new();
    loop {
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            let mut chunk = [0u8; 4096];
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let end = buf.windows(4).position(|w| w == b"\r\n\r\n").map_or(0, |p| p + 4);
        buf.drain(..end);
        let now = st.inflight.fetch_add(1, Ordering::SeqCst) + 1;
        st.peak.fetch_max(now, Ordering::SeqCst);
        if let Ok(p) = st.release.acquire().await {
            p.forget();
        }
        st.inflight.fetch_sub(1, Ordering::SeqCst);
        st.served.fetch_add(1, Ordering::SeqCst);
        let status = st.status.load(Ordering::SeqCst);
        let body = st.name.as_bytes();
        let head = format!("HTTP/1.1 {status} X\r\ncontent-length: {}\r\n\r\n", body.len());
        if s.write_all(head.as_bytes()).await.is_err() || s.write_all(body).await.is_err() {
            return;
        }
    }
}

async fn pool(node: &TestNode, name: &str, spec: Value, backends: &[SocketAddr]) {
    let mut body = json!({"pattern": format!("/{name}/"), "health": {"check": "none"}});
    body.as_object_mut().expect("object").extend(spec.as_object().expect("object").clone());
    node.put(&format!("/v1/pools/{name}"), body).await;
    for b in backends {
        node.put(&format!("/v1/pools/{name}/backends/{b}"), json!({})).await;
    }
    let path = format!("/v1/pools/{name}/health");
    let want = backends.len();
    eventually(Duration::from_secs(15), "backends routed", || async {
        let h = node.get(&path).await;
        let n = h["backends"].as_array()?.iter().filter(|b| b["status"] == "BS_HEALTHY").count();
        (n == want).then_some(())
    })
    .await;
}

async fn metrics(node: &TestNode) -> String {
    let (_, bytes) = node.admin.raw(Method::GET, "/metrics", None).await.expect("metrics");
    String::from_utf8_lossy(&bytes).into_owned()
}

/// The value of the first series of `name` carrying `label`.
fn metric(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_caps_concurrency_and_queued_requests_succeed() {
    let node = TestNode::start("limits-1").await;
    let gate = Gate::start("g", false).await;
    let spec = json!({"max_connections": 2, "queue_max": 50, "queue_timeout_ms": 60000});
    pool(&node, "cap", spec, &[gate.addr]).await;
    let http = node.http();
    let clients: Vec<_> = (0..6).map(|_| tokio::spawn(get_text(http, "/cap/x"))).collect();
    eventually(Duration::from_secs(15), "two at the backend, four queued", || async {
        let m = metrics(&node).await;
        let queued = metric(&m, "shoal_pool_queue_depth", "pool=\"cap\"");
        (gate.inflight.load(Ordering::SeqCst) == 2 && queued == 4.0).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(gate.peak.load(Ordering::SeqCst), 2, "never more than max_connections at once");
    gate.release.add_permits(6);
    for c in clients {
        let (status, body) = c.await.expect("join").expect("request");
        assert_eq!((status, body.as_str()), (StatusCode::OK, "g"));
    }
    assert_eq!(gate.peak.load(Ordering::SeqCst), 2);
    let m = metrics(&node).await;
    assert_eq!(metric(&m, "shoal_pool_queue_depth", "pool=\"cap\""), 0.0);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_timeout_and_full_queue_answer_503_with_retry_after() {
    let node = TestNode::start("limits-2").await;
    let gate = Gate::start("g", false).await;
    let spec = json!({"max_connections": 1, "queue_max": 1, "queue_timeout_ms": 1500});
    pool(&node, "q", spec, &[gate.addr]).await;
    let http = node.http();
    let held = tokio::spawn(get_text(http, "/q/held"));
    eventually(Duration::from_secs(15), "one at the backend", || async {
        (gate.inflight.load(Ordering::SeqCst) == 1).then_some(())
    })
    .await;
    let queued = tokio::spawn(raw_http(http, Method::GET, "/q/queued", None));
    eventually(Duration::from_secs(15), "one queued", || async {
        (metric(&metrics(&node).await, "shoal_pool_queue_depth", "pool=\"q\"") == 1.0).then_some(())
    })
    .await;
    let full = raw_http(http, Method::GET, "/q/full", None).await.expect("full");
    assert_eq!(full.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(full.headers.contains_key("retry-after"), "{:?}", full.headers);
    assert!(full.text().contains("queue is full"), "{}", full.text());
    let timed_out = queued.await.expect("join").expect("queued");
    assert_eq!(timed_out.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(timed_out.headers.contains_key("retry-after"));
    assert!(timed_out.text().contains("timed out waiting"), "{}", timed_out.text());
    let m = metrics(&node).await;
    assert_eq!(metric(&m, "shoal_pool_queue_full_total", "pool=\"q\""), 1.0);
    assert_eq!(metric(&m, "shoal_pool_queue_timeouts_total", "pool=\"q\""), 1.0);
    gate.release.add_permits(10);
    assert_eq!(held.await.expect("join").expect("held").0, StatusCode::OK);
    assert_eq!(get_text(http, "/q/after").await.expect("after").0, StatusCode::OK, "the slot freed");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_pools_limit_connections_and_close_after_the_queue_timeout() {
    let node = TestNode::start("limits-3").await;
    let echo = EchoBackend::start().await;
    let port = free_port();
    node.put(
        "/v1/pools/l4",
        json!({"protocol": "tcp", "listen": port, "health": {"check": "none"}, "max_connections": 1, "queue_timeout_ms": 500}),
    )
    .await;
    node.put(&format!("/v1/pools/l4/backends/{}", echo.addr), json!({})).await;
    let mut first = eventually(Duration::from_secs(15), "listener echoes", || async {
        let mut s = TcpStream::connect((LOCALHOST, port)).await.ok()?;
        s.write_all(b"ping").await.ok()?;
        let mut b = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut b)).await.ok()?.ok()?;
        (&b == b"ping").then_some(s)
    })
    .await;
    let mut second = TcpStream::connect((LOCALHOST, port)).await.expect("connect");
    let _ = second.write_all(b"pong").await;
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(20), second.read_to_end(&mut rest)).await.expect("closed");
    assert!(n.is_err() || rest.is_empty(), "the second connection got no backend: {rest:?}");
    let m = metrics(&node).await;
    assert_eq!(metric(&m, "shoal_pool_queue_timeouts_total", "pool=\"l4\""), 1.0);
    first.write_all(b"more").await.expect("write");
    let mut b = [0u8; 4];
    first.read_exact(&mut b).await.expect("first still relayed");
    drop(first);
    eventually(Duration::from_secs(15), "a slot again after the first closed", || async {
        let mut s = TcpStream::connect((LOCALHOST, port)).await.ok()?;
        s.write_all(b"next").await.ok()?;
        let mut b = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut b)).await.ok()?.ok()?;
        (&b == b"next").then_some(())
    })
    .await;
    node.stop().await;
}

/// Share of `n` requests answered by `name`.
async fn share(node: &TestNode, path: &str, name: &str, n: usize) -> f64 {
    let mut hits = 0;
    for _ in 0..n {
        let (status, body) = get_text(node.http(), path).await.expect("request");
        assert_eq!(status, StatusCode::OK);
        hits += usize::from(body == name);
    }
    hits as f64 / n as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_start_ramps_a_new_backend_to_an_equal_share() {
    let node = TestNode::start("limits-4").await;
    let old = Gate::start("old", true).await;
    let new = Gate::start("new", true).await;
    pool(&node, "ramp", json!({"slow_start_s": 10}), &[old.addr]).await;
    // Let the first backend's own ramp (it was new too) finish.
    tokio::time::sleep(Duration::from_secs(11)).await;
    pool(&node, "ramp", json!({"slow_start_s": 10}), &[old.addr, new.addr]).await;
    let early = share(&node, "/ramp/x", "new", 60).await;
    assert!(early < 0.3, "a freshly added backend takes a small share: {early}");
    tokio::time::sleep(Duration::from_secs(10)).await;
    let later = share(&node, "/ramp/x", "new", 200).await;
    assert!((0.4..=0.6).contains(&later), "after slow_start_s its share is even: {later}");
    node.stop().await;
}

/// Ramp time of the restart measurement.
const RAMP_S: u32 = 6;
/// How long the restarted gateway stays down: past the 5 s passive ejection its failed connects
/// earn, so its return is the health checks' verdict, and past `RAMP_S`, so the other two ended
/// their own first ramp before it comes back.
const DOWN: Duration = Duration::from_secs(7);
/// Seconds measured after it turns healthy again: the ramp and a few more.
const MEASURED_S: usize = RAMP_S as usize + 4;
/// Clients of the reconnect load per pool, each with a fresh connection per request and at most
/// one request every `PACE`: at most 300 requests a second, enough for a share per second.
const CLIENTS: usize = 3;
const PACE: Duration = Duration::from_millis(10);
/// Every client stops after this many requests or this long, whatever the test does.
const MAX_REQUESTS: usize = 20_000;
const MAX_LOAD: Duration = Duration::from_secs(90);

/// When each request of a load was answered, and by whom (`None`: not a 200).
type Answers = Vec<(tokio::time::Instant, Option<String>)>;

/// One client of the reconnect load on `path` until `stop` is set.
async fn reconnect_client(http: SocketAddr, path: String, stop: Arc<AtomicBool>) -> Answers {
    let deadline = tokio::time::Instant::now() + MAX_LOAD;
    let mut pace = tokio::time::interval(PACE);
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut answers = Vec::new();
    while answers.len() < MAX_REQUESTS && !stop.load(Ordering::Relaxed) && tokio::time::Instant::now() < deadline {
        pace.tick().await;
        let got = get_text(http, &path).await.ok().filter(|(s, _)| *s == StatusCode::OK).map(|(_, body)| body);
        answers.push((tokio::time::Instant::now(), got));
    }
    answers
}

/// The restarted gateway's share of the answers in each second after `t0`, with their count.
fn shares_per_second(answers: &Answers, t0: tokio::time::Instant, name: &str) -> Vec<(f64, usize)> {
    (0..MEASURED_S)
        .map(|k| {
            let (from, to) = (t0 + Duration::from_secs(k as u64), t0 + Duration::from_secs(k as u64 + 1));
            let bucket: Vec<&String> =
                answers.iter().filter(|(t, _)| (from..to).contains(t)).filter_map(|(_, b)| b.as_ref()).collect();
            let hits = bucket.iter().filter(|b| b.as_str() == name).count();
            (hits as f64 / bucket.len().max(1) as f64, bucket.len())
        })
        .collect()
}

/// A round-robin HTTP pool of three gateways with fast TCP health checks, as EC mode builds
/// it: under reconnect load one gateway stops (its connections close), stays down for `DOWN`,
/// and restarts on its port. Returns its share per second after it is healthy again.
async fn share_after_restart(node: &TestNode, name: &str, slow_start_s: u32) -> Vec<(f64, usize)> {
    let gates = [Gate::start("gw1", true).await, Gate::start("gw2", true).await, Gate::start("gw3", true).await];
    let addrs: Vec<SocketAddr> = gates.iter().map(|g| g.addr).collect();
    let health = json!({"check": "tcp", "interval_ms": 100, "timeout_ms": 1000, "rise": 2, "fall": 2});
    let spec = json!({"algorithm": "round_robin", "slow_start_s": slow_start_s, "health": health});
    pool(node, name, spec, &addrs).await;
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| tokio::spawn(reconnect_client(node.http(), format!("/{name}/agent"), stop.clone())))
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let [gw1, gw2, gw3] = gates;
    let addr = gw3.addr;
    drop(gw3);
    let down = tokio::time::Instant::now();
    wait_status(node, name, addr, "BS_SICK").await;
    tokio::time::sleep_until(down + DOWN).await;
    let _back = Gate::start_at("gw3", true, addr).await;
    wait_status(node, name, addr, "BS_HEALTHY").await;
    let t0 = tokio::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(MEASURED_S as u64)).await;
    stop.store(true, Ordering::Relaxed);
    let mut answers = Answers::new();
    for c in clients {
        answers.extend(c.await.expect("client"));
    }
    let failed = answers.iter().filter(|(_, b)| b.is_none()).count();
    let failed_after = answers.iter().filter(|(t, b)| *t >= t0 && b.is_none()).count();
    drop((gw1, gw2));
    let series = shares_per_second(&answers, t0, "gw3");
    let shares: Vec<String> = series.iter().map(|(s, _)| format!("{s:.3}")).collect();
    let counts: Vec<usize> = series.iter().map(|(_, n)| *n).collect();
    eprintln!(
        "slow_start_s={slow_start_s}: restarted gateway's share per second after healthy again \
         (fair 0.333): [{}]; answers per second {counts:?}; failed {failed} of {}, {failed_after} after healthy",
        shares.join(", "),
        answers.len()
    );
    for (k, (_, n)) in series.iter().enumerate() {
        assert!(*n >= 20, "second {k}: too few answers to judge a share ({counts:?})");
    }
    series
}

async fn wait_status(node: &TestNode, pool: &str, addr: SocketAddr, want: &str) {
    let path = format!("/v1/pools/{pool}/health");
    eventually(Duration::from_secs(20), &format!("{addr} {want}"), || async {
        let h = node.get(&path).await;
        let b = h["backends"].as_array()?.iter().find(|b| b["addr"] == addr.to_string())?.clone();
        (b["status"] == want).then_some(())
    })
    .await;
}

/// Issue 16's question: a gateway restarted under reconnect load comes back at a small share
/// that grows to its fair one over `slow_start_s`; the same restart without slow start takes
/// its fair share at once (the control, so the measurement can fail).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_start_ramps_a_gateway_restarted_under_reconnect_load() {
    let node = TestNode::start("limits-7").await;
    let (ramped, control) =
        tokio::join!(share_after_restart(&node, "ramp", RAMP_S), share_after_restart(&node, "flat", 0));
    let fair = 1.0 / 3.0;
    let low = 0.6 * fair;
    let first = ramped[0].0;
    assert!(first < low, "the first second after it is back, its share is small: {first:.3} ({ramped:?})");
    let mid = ramped[RAMP_S as usize / 2].0;
    assert!(mid > first, "its share grows during the ramp: {first:.3} then {mid:.3} ({ramped:?})");
    for (k, (share, _)) in ramped.iter().enumerate().skip(RAMP_S as usize + 1) {
        assert!(*share >= low, "second {k}, after slow_start_s: about a fair share, not {share:.3} ({ramped:?})");
    }
    for (k, (share, _)) in control.iter().enumerate() {
        assert!(*share >= low, "without slow start it is fair at once; second {k}: {share:.3} ({control:?})");
    }
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consecutive_5xx_eject_a_backend_until_its_ejection_ends() {
    let node = TestNode::start("limits-5").await;
    let good = Gate::start("good", true).await;
    let bad = Gate::start("bad", true).await;
    bad.status.store(500, Ordering::SeqCst);
    let spec = json!({"outlier": {"consecutive_5xx": 3, "base_ejection_ms": 3000, "max_ejection_percent": 50}});
    pool(&node, "od", spec, &[good.addr, bad.addr]).await;
    let http = node.http();
    for _ in 0..6 {
        get_text(http, "/od/x").await.expect("request");
    }
    assert_eq!(bad.served.load(Ordering::SeqCst), 3, "round robin sent every other request");
    eventually(Duration::from_secs(10), "bad ejected", || async {
        let h = node.get("/v1/pools/od/health").await;
        let sick = h["backends"].as_array()?.iter().any(|b| b["status"] == "BS_SICK");
        sick.then_some(())
    })
    .await;
    bad.status.store(200, Ordering::SeqCst);
    for _ in 0..10 {
        let (status, body) = get_text(http, "/od/x").await.expect("request");
        if bad.served.load(Ordering::SeqCst) > 3 {
            break; // the ejection already ended on a slow machine
        }
        assert_eq!((status, body.as_str()), (StatusCode::OK, "good"));
    }
    let m = metrics(&node).await;
    assert_eq!(metric(&m, "shoal_ejections_total", "reason=\"outlier\""), 1.0);
    eventually(Duration::from_secs(20), "bad back after its ejection", || async {
        let (_, body) = get_text(http, "/od/x").await.ok()?;
        (body == "bad").then_some(())
    })
    .await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_names_bad_limit_settings() {
    let node = TestNode::start("limits-6").await;
    let cases = [
        (r#"{"pattern": "/a/", "queue_timeout_ms": 0}"#, "queue_timeout_ms"),
        (r#"{"pattern": "/a/", "slow_start_s": 99999}"#, "slow_start_s"),
        (r#"{"pattern": "/a/", "outlier": {"max_ejection_percent": 150}}"#, "outlier.max_ejection_percent"),
        (r#"{"pattern": "/a/", "outlier": {"base_ejection_ms": 1}}"#, "outlier.base_ejection_ms"),
    ];
    for (body, key) in cases {
        let (status, answer) = node.call(Method::PUT, "/v1/pools/a", Some(body)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert!(answer.to_string().contains(key), "{body}: {answer}");
    }
    let ok = r#"{"pattern": "/a/", "max_connections": 10, "outlier": {"consecutive_5xx": 2}}"#;
    assert_eq!(node.call(Method::PUT, "/v1/pools/a", Some(ok)).await.0, StatusCode::OK);
    let listed = node.get("/v1/pools/a").await;
    assert!(listed.to_string().contains("\"base_ejection_ms\":30000"), "defaults filled: {listed}");
    node.stop().await;
}
