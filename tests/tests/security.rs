//! Who may talk to a node: the admin token, node certificates on Raft (mutual TLS), the gossip
//! key, heartbeat secrets; and garbage on the cluster ports.

use std::net::SocketAddr;
use std::time::Duration;

use http::{Method, StatusCode};
use serde_json::{Value, json};
use shoal_tests::cluster::{CLUSTER_PORT, ProcCluster};
use shoal_tests::{HeartbeatBackend, LOCALHOST, TestNode, eventually, free_port, free_udp_port, raw_http};
use tokio::io::AsyncWriteExt;

const BIN: &str = env!("CARGO_BIN_EXE_shoal-under-test");

/// Sum of a counter family's samples whose line contains `filter`.
fn counter(text: &str, family: &str, filter: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(family) && l.contains(filter))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_requires_the_token() {
    let node = TestNode::start("sec-admin").await;
    let admin = node.handle.admin_addr();
    for path in ["/v1/pools", "/v1/cluster", "/metrics", "/v1/state", "/v1/stats", "/v1/pools/x/health"] {
        let r = raw_http(admin, Method::GET, path, None).await.expect("answer");
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{path}");
        assert_eq!(r.headers["www-authenticate"], "Bearer");
        let body: Value = serde_json::from_slice(&r.body).expect("json");
        assert_eq!(body, json!({"error": "unauthorized"}), "no detail leaks");
    }
    let r = raw_http(admin, Method::PUT, "/v1/pools/x", Some(br#"{"pattern": "/"}"#.to_vec())).await.expect("answer");
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "writes too");
    let wrong =
        shoal_node::cli::client::AdminClient::new(&admin.to_string()).expect("c").with_token(Some("x".repeat(64)));
    assert_eq!(wrong.raw(Method::GET, "/v1/pools", None).await.expect("answer").0, StatusCode::UNAUTHORIZED);
    let page = raw_http(admin, Method::GET, "/", None).await.expect("page");
    assert_eq!(page.status, StatusCode::OK, "the status page itself holds no data");
    // Probes need no token and learn nothing but the status.
    let live = raw_http(admin, Method::GET, "/healthz", None).await.expect("healthz");
    assert_eq!((live.status, live.text().as_str()), (StatusCode::OK, "ok\n"));
    let ready = raw_http(admin, Method::GET, "/readyz", None).await.expect("readyz");
    assert_eq!((ready.status, ready.text().as_str()), (StatusCode::OK, "ready\n"));
    let head = raw_http(admin, Method::HEAD, "/readyz", None).await.expect("HEAD readyz");
    assert_eq!(head.status, StatusCode::OK);
    assert_eq!(node.call(Method::GET, "/v1/pools", None).await.0, StatusCode::OK, "with the token");
    node.stop().await;

    let open = TestNode::start_in("sec-open", tempfile::tempdir().expect("dir"), |o| o.public_metrics = true).await;
    let a = open.handle.admin_addr();
    assert_eq!(raw_http(a, Method::GET, "/metrics", None).await.expect("m").status, StatusCode::OK);
    assert_eq!(raw_http(a, Method::GET, "/readyz", None).await.expect("h").status, StatusCode::OK);
    assert_eq!(raw_http(a, Method::GET, "/v1/pools", None).await.expect("p").status, StatusCode::UNAUTHORIZED);
    open.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_of_another_ca_cannot_join_and_garbage_is_counted() {
    let mut c = ProcCluster::start(BIN, 3, &[]).await;
    // An intruder with its own CA (same cluster name) and gossip key, pointed at the seeds.
    let foreign = c.dir.path().join("foreign-ca");
    shoal_node::cli::cert::make_ca("shoal", &foreign, 30).expect("foreign CA");
    let intruder_tls = c.dir.path().join("intruder-tls");
    shoal_node::cli::cert::make_node(&foreign, "intruder", &intruder_tls, 30).expect("intruder cert");
    c.add_node("intruder", 9, vec!["--cluster-tls".into(), intruder_tls.to_str().expect("utf8").into()]);
    // Garbage on the Raft (TCP) and gossip (UDP) ports of node 1.
    let target = SocketAddr::new(c.nodes[0].ip, CLUSTER_PORT);
    for junk in [
        &b"GET / HTTP/1.1\r\n\r\n"[..],
        &[0x53, 0x48, shoal_proto::codec::VERSION, 10, 0xff, 0xff, 0xff, 0xff],
        &[0u8; 64],
    ] {
        if let Ok(mut s) = tokio::net::TcpStream::connect(target).await {
            let _ = s.write_all(junk).await;
        }
    }
    let udp = tokio::net::UdpSocket::bind((LOCALHOST, 0)).await.expect("udp");
    for junk in [&b"SHG1 not really"[..], &[0u8; 200], b"hello"] {
        let _ = udp.send_to(junk, target).await;
    }
    let metrics = eventually(Duration::from_secs(30), "intruder and garbage refused", || async {
        let (_, bytes) = c.nodes[0].admin().raw(Method::GET, "/metrics", None).await.ok()?;
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let forged = counter(&text, "shoal_gossip_datagrams_dropped_total", "forged");
        let malformed = counter(&text, "shoal_gossip_datagrams_dropped_total", "malformed");
        let raft = counter(&text, "shoal_rejected_inputs_total", "raft_auth");
        (forged > 0.0 && malformed > 0.0 && raft > 0.0).then_some(text)
    })
    .await;
    eprintln!(
        "dropped: forged gossip {}, malformed gossip {}, Raft handshakes refused {}",
        counter(&metrics, "shoal_gossip_datagrams_dropped_total", "forged"),
        counter(&metrics, "shoal_gossip_datagrams_dropped_total", "malformed"),
        counter(&metrics, "shoal_rejected_inputs_total", "raft_auth")
    );
    let view = c.view(0).await.expect("view");
    let names: Vec<&str> = view["nodes"].as_array().expect("nodes").iter().filter_map(|n| n["id"].as_str()).collect();
    assert!(!names.contains(&"intruder"), "the intruder is neither member nor even seen: {names:?}");
    assert_eq!(names.len(), 3);
    // The cluster still works.
    c.put(1, "/v1/pools/after", json!({"pattern": "/after/"})).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_secret_keeps_impostors_out() {
    let node = TestNode::start("sec-hb").await;
    let (listen, hb) = (free_port(), free_udp_port());
    let spec = json!({"protocol": "tcp", "listen": listen, "self_register": true, "health": {"heartbeat_port": hb, "heartbeat_secret": "s3cret-key"}});
    node.put("/v1/pools/hb", spec).await;
    let target: SocketAddr = (LOCALHOST, hb).into();
    let good = HeartbeatBackend::start(vec![target], Some("s3cret-key".into())).await;
    let impostor = HeartbeatBackend::start(vec![target], Some("guessed".into())).await;
    let anonymous = HeartbeatBackend::start(vec![target], None).await;
    let h = eventually(Duration::from_secs(15), "the real backend registers", || async {
        let h = node.get("/v1/pools/hb/health").await;
        (h["backends"].as_array()?.iter().any(|b| b["addr"] == good.tcp.to_string() && b["status"] == "BS_HEALTHY"))
            .then_some(h)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let h2 = node.get("/v1/pools/hb/health").await;
    let addrs: Vec<String> =
        h2["backends"].as_array().expect("list").iter().map(|b| b["addr"].as_str().unwrap_or("").to_string()).collect();
    assert_eq!(addrs, vec![good.tcp.to_string()], "only the backend with the secret: {h} {h2}");
    drop((impostor, anonymous));
    node.stop().await;
}

/// Issue 14, finding 1: an open self-registering pool must be asked for by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_self_registering_pool_is_refused_without_the_opt_in() {
    let node = TestNode::start("sec-hb-open").await;
    let (listen, hb) = (free_port(), free_udp_port());
    let open = json!({"protocol": "tcp", "listen": listen, "self_register": true, "health": {"heartbeat_port": hb}});
    let (status, body) = node.call(Method::PUT, "/v1/pools/open", Some(&open.to_string())).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let msg = body["error"].as_str().unwrap_or_default();
    assert!(msg.contains("health.heartbeat_secret") && msg.contains("allow_unauthenticated_heartbeats"), "{msg}");
    let (status, _) = node.call(Method::GET, "/v1/pools/open", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "nothing was created");
    let mut opted = open.clone();
    opted["allow_unauthenticated_heartbeats"] = json!(true);
    node.put("/v1/pools/open", opted).await;
    node.stop().await;
}

/// Issue 14, finding 7: secrets others may read are refused, naming the file and its mode, and
/// what shoal writes itself (`cert self-signed`) is private.
#[cfg(unix)]
#[test]
fn secret_files_others_may_read_are_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("dir");
    let token = dir.path().join("admin.token");
    shoal_tests::write_private(&token, "a-token-of-enough-length-0123");
    let ca = dir.path().join("ca");
    let node_tls = dir.path().join("node-tls");
    shoal_node::cli::cert::make_ca("shoal", &ca, 30).expect("ca");
    shoal_node::cli::cert::make_node(&ca, "perm", &node_tls, 30).expect("node");
    let (key, node_key) = (node_tls.join("cluster.key"), node_tls.join("node.key"));
    let run = |args: &[&str]| {
        let data = dir.path().join("data");
        let admin = format!("127.0.0.1:{}", free_port());
        std::process::Command::new(BIN)
            .args(["node", "--id", "perm", "--listen-ip", "127.0.0.1", "--http-port", "0", "--admin", &admin])
            .args(["--data-dir", data.to_str().expect("utf8")])
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run shoal")
    };
    let token_arg = ["--token-file", token.to_str().expect("utf8")];
    let cluster = format!("127.0.0.1:{}", free_port());
    let key_args = ["--cluster", cluster.as_str(), "--cluster-tls", node_tls.to_str().expect("utf8")];
    for (file, mode, args) in [
        (&token, 0o644, token_arg.to_vec()),
        (&token, 0o640, token_arg.to_vec()),
        (&key, 0o604, [&token_arg[..], &key_args[..]].concat()),
        (&node_key, 0o640, [&token_arg[..], &key_args[..]].concat()),
    ] {
        std::fs::set_permissions(file, std::fs::Permissions::from_mode(mode)).expect("chmod");
        let out = run(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "a {mode:o} secret was accepted: {stderr}");
        let named = stderr.contains(&file.display().to_string()) && stderr.contains(&format!("{mode:04o}"));
        assert!(named && stderr.contains("chmod 600"), "the error names the file, its mode and the fix: {stderr}");
        std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o600)).expect("chmod back");
    }

    let out = std::process::Command::new(BIN)
        .args(["cert", "self-signed", "--name", "localhost", "--out", dir.path().join("tls").to_str().expect("utf8")])
        .output()
        .expect("run shoal cert");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mode =
        |name: &str| std::fs::metadata(dir.path().join("tls").join(name)).expect("meta").permissions().mode() & 0o777;
    assert_eq!((mode("key.pem"), mode("cert.pem")), (0o600, 0o644));

    // A TLS private key others may read is refused too (the key `cert` wrote is private).
    let tls_key = dir.path().join("tls").join("key.pem");
    std::fs::set_permissions(&tls_key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let (cert, key) = (dir.path().join("tls").join("cert.pem"), tls_key.clone());
    let https = free_port().to_string();
    let tls_args = [
        token_arg[0],
        token_arg[1],
        "--https-port",
        https.as_str(),
        "--tls-cert",
        cert.to_str().expect("utf8"),
        "--tls-key",
        key.to_str().expect("utf8"),
    ];
    let out = run(&tls_args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains(&tls_key.display().to_string()) && stderr.contains("0644"),
        "{stderr}"
    );
}

/// Issue 14, finding 5: connections that never finish the handshake (a flood from one host,
/// above every bound) are closed and counted, and meanwhile a node joins and writes commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_floods_are_bounded_counted_and_do_not_keep_a_node_out() {
    let mut c = ProcCluster::start(BIN, 3, &[]).await;
    let std::net::IpAddr::V4(first) = c.nodes[0].ip else { panic!("IPv4 test addresses") };
    let [a, b, x, _] = first.octets();
    let attacker = std::net::IpAddr::from([a, b, x, 200]);
    let targets: Vec<SocketAddr> = c.nodes.iter().map(|n| SocketAddr::new(n.ip, CLUSTER_PORT)).collect();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood = tokio::spawn(flood_handshakes(attacker, targets, stop.clone()));
    c.add_node("n4", 4, vec![]);
    eventually(Duration::from_secs(60), "n4 joins while the cluster port is flooded", || async {
        let v = c.view(0).await?;
        v["nodes"]
            .as_array()?
            .iter()
            .any(|n| n["id"] == "n4" && (n["role"] == "learner" || n["voter"] == true))
            .then_some(())
    })
    .await;
    c.put(1, "/v1/pools/flooded", json!({"pattern": "/flooded/"})).await;
    let limited = eventually(Duration::from_secs(30), "refusals counted", || async {
        let mut total = (0.0, 0.0);
        for i in 0..3 {
            let (_, bytes) = c.nodes[i].admin().raw(Method::GET, "/metrics", None).await.ok()?;
            let text = String::from_utf8_lossy(&bytes).into_owned();
            total.0 += counter(&text, "shoal_rejected_inputs_total", "raft_preauth_limit");
            total.1 += counter(&text, "shoal_rejected_inputs_total", "raft_handshake_timeout");
        }
        (total.0 > 0.0 && total.1 > 0.0).then_some(total)
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let opened = flood.await.expect("flood");
    eprintln!("flood: {opened} connections opened; closed at once {}, timed out {}", limited.0, limited.1);
    let log = c.nodes[0].log_text();
    let warns = log.lines().filter(|l| l.contains("WARN") && l.contains("Raft connection refused")).count();
    assert!(warns <= 20, "failed handshakes are logged at most every 10 s per kind, got {warns} lines");
}

/// Opens (and holds ~3 s) bursts of connections that send nothing, from `from`, until `stop`;
/// at most 40 bursts. Returns how many were opened.
async fn flood_handshakes(
    from: std::net::IpAddr,
    targets: Vec<SocketAddr>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> usize {
    let mut opened = 0;
    for _ in 0..40 {
        if stop.load(std::sync::atomic::Ordering::Relaxed) {
            break;
        }
        let mut held = Vec::new();
        for t in &targets {
            for _ in 0..60 {
                let Ok(s) = tokio::net::TcpSocket::new_v4() else { continue };
                if s.bind(SocketAddr::new(from, 0)).is_err() {
                    continue;
                }
                if let Ok(Ok(conn)) = tokio::time::timeout(Duration::from_secs(1), s.connect(*t)).await {
                    held.push(conn);
                    opened += 1;
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    opened
}

/// Issue 14, finding 4: gossip datagrams sealed with the right key but replayed, reflected from
/// another address, or stamped outside the window are each refused under their own reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gossip_replays_reflections_and_stale_stamps_are_refused_by_reason() {
    use shoal_node::control::gossip_auth::{Stamp, seal};
    let c = ProcCluster::start(BIN, 3, &[]).await;
    let key = shoal_node::control::secure::ClusterKey::load(&c.ca_dir().join("cluster.key")).expect("key");
    let target = SocketAddr::new(c.nodes[0].ip, CLUSTER_PORT);
    let udp = tokio::net::UdpSocket::bind((LOCALHOST, 0)).await.expect("udp");
    let me = udp.local_addr().expect("addr");
    let now = shoal_node::clock::unix_ms();
    let other_node = SocketAddr::new(c.nodes[1].ip, CLUSTER_PORT);
    let cases: [(&str, Stamp, usize); 4] = [
        ("replay", Stamp { from: me, seq: 1, at_ms: now }, 2),
        ("address", Stamp { from: other_node, seq: 99, at_ms: now }, 1),
        ("stale", Stamp { from: me, seq: 2, at_ms: now - 120_000 }, 1),
        ("stale", Stamp { from: me, seq: 3, at_ms: now + 120_000 }, 1),
    ];
    for (_, stamp, times) in &cases {
        let d = seal(&key, stamp, b"not a chitchat message");
        for _ in 0..*times {
            udp.send_to(&d, target).await.expect("send");
        }
    }
    let text = eventually(Duration::from_secs(30), "each refusal counted", || async {
        let (_, bytes) = c.nodes[0].admin().raw(Method::GET, "/metrics", None).await.ok()?;
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let got = |r: &str| counter(&text, "shoal_gossip_datagrams_dropped_total", &format!("reason=\"{r}\""));
        (got("replay") >= 1.0 && got("address") >= 1.0 && got("stale") >= 2.0).then_some(text)
    })
    .await;
    let got = |r: &str| counter(&text, "shoal_gossip_datagrams_dropped_total", &format!("reason=\"{r}\""));
    assert_eq!((got("replay"), got("address"), got("stale")), (1.0, 1.0, 2.0), "exactly the datagrams sent");
    assert!(text.contains("shoal_gossip_clock_skew_seconds"), "peers' skew is published");
    c.put(1, "/v1/pools/after-gossip", json!({"pattern": "/g/"})).await;
}

/// Issue 14, finding 3: Raft RPC runs on mutual TLS. A certificate of the cluster's CA may not
/// claim another member's Raft id; a revoked certificate is refused by every node and its
/// member removed while the rest keeps committing; a new certificate brings the node back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_bind_raft_ids_and_revoked_nodes_are_cut_off() {
    use shoal_node::control::raft::channel::{RaftTls, TlsFiles};
    use shoal_node::control::raft::network::{Envelope, KIND_REPLY, KIND_REQUEST, Reply, Request};
    let mut c = ProcCluster::start(BIN, 3, &[]).await;
    let view = c.view(0).await.expect("view");
    let raft_id = |name: &str| {
        view["nodes"].as_array().expect("nodes").iter().find(|n| n["id"] == name).expect("member")["raft_id"]
            .as_u64()
            .expect("raft id")
    };
    let (n1, n2) = (raft_id("n1"), raft_id("n2"));

    // n7 holds a genuine certificate of this cluster, and claims to be n2.
    let tls = RaftTls::load(TlsFiles::in_dir(&c.node_tls("n7"))).expect("n7's channel");
    let ask = |from: u64| {
        let tls = &tls;
        let target = SocketAddr::new(c.nodes[0].ip, CLUSTER_PORT);
        async move {
            let tcp = tokio::net::TcpStream::connect(target).await.expect("connect");
            let (mut ch, peer) = tls.connect(tcp, "n1").await.expect("TLS to n1");
            assert_eq!(peer.node, "n1");
            ch.hello(None).await.expect("hello");
            let env = Envelope { cluster: "shoal".into(), cluster_id: None, from, to: n1, body: Request::Ping };
            ch.send(KIND_REQUEST, &env).await.expect("send");
            let (kind, reply): (u8, Reply) = ch.recv().await.expect("reply");
            assert_eq!(kind, KIND_REPLY);
            reply
        }
    };
    match ask(n2).await {
        Reply::Refused(why) => assert!(why.contains("n7") && why.contains("n2"), "{why}"),
        other => panic!("n7 passed as n2: {other:?}"),
    }
    assert!(matches!(ask(12345).await, Reply::Pong(id, _) if id == n1), "an unknown id rests on the CA alone");

    // Revoke n3's certificate with the CLI.
    let cert = c.node_tls("n3").join("node.pem");
    let out = std::process::Command::new(BIN)
        .args([
            "revoke",
            "--cert",
            cert.to_str().expect("utf8"),
            "--admin",
            &format!("http://{}", c.nodes[0].admin_addr()),
        ])
        .args(["--token", "test-token-0123456789abcdef"])
        .output()
        .expect("shoal revoke");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let voters = |v: &Value| -> Vec<String> {
        let nodes = v["nodes"].as_array().cloned().unwrap_or_default();
        nodes.iter().filter(|n| n["voter"] == true).filter_map(|n| n["id"].as_str().map(String::from)).collect()
    };
    eventually(Duration::from_secs(30), "n3 removed from the voters", || async {
        let v = c.view(0).await?;
        (!voters(&v).contains(&"n3".to_string()) && voters(&v).len() == 2).then_some(())
    })
    .await;
    c.put(0, "/v1/pools/after-revoke", json!({"pattern": "/after-revoke/"})).await;
    // n3's certificate itself no longer gets past n1's handshake, and n1 counts it.
    let revoked = RaftTls::load(TlsFiles::in_dir(&c.node_tls("n3"))).expect("n3's channel");
    let tcp = tokio::net::TcpStream::connect(SocketAddr::new(c.nodes[0].ip, CLUSTER_PORT)).await.expect("connect");
    // TLS 1.3: the client finishes first; the refusal shows on the first read.
    if let Ok((mut ch, _)) = revoked.connect(tcp, "n1").await {
        assert!(ch.hello(None).await.is_err(), "a revoked certificate was answered");
    }
    eventually(Duration::from_secs(10), "the revoked handshake counted", || async {
        let (_, bytes) = c.nodes[0].admin().raw(Method::GET, "/metrics", None).await.ok()?;
        (counter(&String::from_utf8_lossy(&bytes), "shoal_rejected_inputs_total", "raft_revoked") > 0.0).then_some(())
    })
    .await;

    // A new certificate (a new serial) for n3 brings it back.
    c.kill(2);
    std::fs::remove_dir_all(c.dir.path().join("tls").join("n3")).expect("old certificate gone");
    c.node_tls("n3");
    c.restart(2);
    eventually(Duration::from_secs(60), "n3 back as a voter with a new certificate", || async {
        let v = c.view(0).await?;
        voters(&v).contains(&"n3".to_string()).then_some(())
    })
    .await;
    let state = c.state(2).await;
    assert!(state["pools"].get("after-revoke").is_some(), "n3 caught up: {state}");
    assert!(state["revoked_certs"].as_object().is_some_and(|r| r.len() == 1), "{state}");
}
