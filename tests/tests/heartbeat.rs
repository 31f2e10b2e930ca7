//! Seed 004's UDP heartbeat protocol, its "fl" and "ld" config files, and self-registration.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::json;
use shoal_tests::{EchoBackend, HeartbeatBackend, LOCALHOST, TestNode, eventually, free_port, free_udp_port};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpStream, UdpSocket};

const NO_BACKEND: &str = "{\"response_code\":503,\"response_text\":\"No available backend\"}\n";

async fn status_of(node: &TestNode, pool: &str, addr: SocketAddr) -> String {
    let h = node.get(&format!("/v1/pools/{pool}/health")).await;
    h["backends"]
        .as_array()
        .and_then(|bs| bs.iter().find(|b| b["addr"] == addr.to_string()))
        .and_then(|b| b["status"].as_str())
        .unwrap_or("absent")
        .to_string()
}

async fn wait_status(node: &TestNode, pool: &str, addr: SocketAddr, want: &str) {
    eventually(Duration::from_secs(15), &format!("{addr} {want}"), || async move {
        (status_of(node, pool, addr).await == want).then_some(())
    })
    .await;
}

async fn recv_reply(sock: &UdpSocket) -> Option<String> {
    let mut buf = [0u8; 64];
    let got = tokio::time::timeout(Duration::from_millis(800), sock.recv_from(&mut buf)).await.ok()?.ok()?;
    Some(String::from_utf8_lossy(&buf[..got.0]).into_owned())
}

/// Reads whatever the proxy sends within a moment (the 503 line, or nothing).
async fn first_bytes(port: u16, send: &[u8]) -> String {
    let mut s = TcpStream::connect((LOCALHOST, port)).await.expect("connect");
    let _ = s.write_all(send).await;
    let mut buf = vec![0u8; 256];
    match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
        Ok(Ok(n)) => String::from_utf8_lossy(&buf[..n]).into_owned(),
        _ => String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_protocol_online_offline_and_auth() {
    let node = TestNode::start("hb-1").await;
    let echo = EchoBackend::start().await;
    let backend_udp = UdpSocket::bind((LOCALHOST, 0)).await.expect("udp");
    let (listen, hb) = (free_port(), free_udp_port());
    node.put("/v1/pools/logic", json!({"protocol": "tcp", "listen": listen, "health": {"heartbeat_port": hb}})).await;
    let path = format!("/v1/pools/logic/backends/{}", echo.addr);
    node.put(&path, json!({"heartbeat_addr": backend_udp.local_addr().expect("addr").to_string()})).await;
    let lb: SocketAddr = (LOCALHOST, hb).into();
    assert_eq!(status_of(&node, "logic", echo.addr).await, "BS_UNKNOWN");

    // An OK before identifying is answered with AUTH.
    let auth = eventually(Duration::from_secs(10), "AUTH reply", || async {
        backend_udp.send_to(b"OK", lb).await.ok()?;
        recv_reply(&backend_udp).await
    })
    .await;
    assert_eq!(auth, "AUTH");
    assert_eq!(first_bytes(listen, b"hi").await, NO_BACKEND);

    // Identification (TCP first) is acknowledged with OK and marks the backend up.
    let id = format!("{} {}", echo.addr, backend_udp.local_addr().expect("addr"));
    backend_udp.send_to(id.as_bytes(), lb).await.expect("send id");
    assert_eq!(recv_reply(&backend_udp).await.as_deref(), Some("OK"));
    wait_status(&node, "logic", echo.addr, "BS_HEALTHY").await;
    assert_eq!(first_bytes(listen, b"hello").await, "hello");

    // Silence beyond the 2 s timeout takes it offline; an OK brings it back online.
    wait_status(&node, "logic", echo.addr, "BS_SICK").await;
    assert_eq!(first_bytes(listen, b"hi").await, NO_BACKEND);
    backend_udp.send_to(b"OK", lb).await.expect("send ok");
    wait_status(&node, "logic", echo.addr, "BS_HEALTHY").await;

    // An unknown pair gets no reply; garbage is counted and dropped.
    let stranger = UdpSocket::bind((LOCALHOST, 0)).await.expect("udp");
    stranger.send_to(b"127.0.0.1:1 127.0.0.1:2", lb).await.expect("send");
    assert_eq!(recv_reply(&stranger).await, None);
    stranger.send_to(&[0xff, 0x00, 0x13], lb).await.expect("send");
    let metrics = eventually(Duration::from_secs(5), "malformed counted", || async {
        let m = node.admin.raw(http::Method::GET, "/metrics", None).await.ok()?;
        let text = String::from_utf8_lossy(&m.1).into_owned();
        let counted = text.lines().any(|l| {
            l.starts_with("shoal_heartbeats_malformed_total{") && l.contains("pool=\"logic\"") && l.ends_with(" 1")
        });
        counted.then_some(text)
    })
    .await;
    assert!(metrics.contains("shoal_heartbeats_received_total"));
    node.stop().await;
}

fn seed_fl(listen: u16, hb: u16, b: &HeartbeatBackend) -> String {
    format!(
        r#"{{
    "mode": "fl", // frontend to logic reverse proxy
    "client_tcp_listening_addr": "0.0.0.0:{listen}", // tcp addr to which the frontend can connect to
    "logic_heartbeat_udp_addr": "0.0.0.0:{hb}", // udp addr to which your logic server will be sending status updates
    "logic_servers": [
        // <udp> <tcp> listening addrs for each of the logical servers
        "{} {}"
    ]
}}"#,
        b.tcp, b.udp
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_fl_config_file_runs_as_is() {
    let (listen, hb) = (free_port(), free_udp_port());
    let backend = HeartbeatBackend::start(vec![(LOCALHOST, hb).into()], None).await;
    let dir = tempfile::tempdir().expect("dir");
    let cfg = dir.path().join("frontend_logic_rp_config.json");
    std::fs::write(&cfg, seed_fl(listen, hb, &backend)).expect("write config");
    let node = TestNode::start_in("fl", dir, |o| o.config = Some(cfg)).await;
    wait_status(&node, "logic", backend.tcp, "BS_HEALTHY").await;
    assert_eq!(first_bytes(listen, b"Hello from frontend").await, "Hello from frontend");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_ld_bridge_works_in_both_directions() {
    let (logic_listen, data_listen, logic_hb, data_hb) = (free_port(), free_port(), free_udp_port(), free_udp_port());
    let logic = HeartbeatBackend::start_named(vec![(LOCALHOST, logic_hb).into()], None, Some("logic-server")).await;
    let data = HeartbeatBackend::start_named(vec![(LOCALHOST, data_hb).into()], None, Some("data-server")).await;
    let cfg_text = format!(
        r#"{{
    "mode": "ld",
    "logic_servers_tcp_listening_addr": "0.0.0.0:{logic_listen}",
    "logic_servers_heartbeat_udp_addr": "0.0.0.0:{logic_hb}",
    "data_servers_tcp_listening_addr": "0.0.0.0:{data_listen}",
    "data_servers_hearbeat_udp_addr": "0.0.0.0:{data_hb}",
    "logic_servers": [
        "{} {}"
    ],
    "data_servers": [
        "{} {}"
    ]
}}"#,
        logic.tcp, logic.udp, data.tcp, data.udp
    );
    let dir = tempfile::tempdir().expect("dir");
    let cfg = dir.path().join("logic_data_rp_config.json");
    std::fs::write(&cfg, cfg_text).expect("write config");
    let node = TestNode::start_in("ld", dir, |o| o.config = Some(cfg)).await;
    wait_status(&node, "data", data.tcp, "BS_HEALTHY").await;
    wait_status(&node, "logic", logic.tcp, "BS_HEALTHY").await;
    // A logic server connecting to its listener talks to a data server, and vice versa.
    assert_eq!(
        banner_and_echo(logic_listen, "from logic").await,
        ("data-server".to_string(), "from logic".to_string())
    );
    assert_eq!(banner_and_echo(data_listen, "from data").await, ("logic-server".to_string(), "from data".to_string()));
    node.stop().await;
}

async fn banner_and_echo(port: u16, msg: &str) -> (String, String) {
    let s = TcpStream::connect((LOCALHOST, port)).await.expect("connect");
    let mut s = BufReader::new(s);
    let mut banner = String::new();
    s.read_line(&mut banner).await.expect("banner");
    s.get_mut().write_all(format!("{msg}\n").as_bytes()).await.expect("write");
    let mut echoed = String::new();
    s.read_line(&mut echoed).await.expect("echo");
    (banner.trim().to_string(), echoed.trim().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn self_registered_backends_are_routed() {
    let node = TestNode::start("hb-self").await;
    let (listen, hb) = (free_port(), free_udp_port());
    node.put(
        "/v1/pools/open",
        json!({"protocol": "tcp", "listen": listen, "self_register": true, "allow_unauthenticated_heartbeats": true, "health": {"heartbeat_port": hb}}),
    )
    .await;
    let b = HeartbeatBackend::start(vec![(LOCALHOST, hb).into()], None).await;
    wait_status(&node, "open", b.tcp, "BS_HEALTHY").await;
    let h = node.get("/v1/pools/open/health").await;
    assert_eq!(h["backends"][0]["dynamic"], true);
    assert_eq!(first_bytes(listen, b"ping").await, "ping");
    b.silence();
    wait_status(&node, "open", b.tcp, "BS_SICK").await;
    node.stop().await;
}
