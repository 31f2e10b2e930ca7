//! L4 TCP proxy through a real node on loopback.

use std::time::Duration;

use serde_json::json;
use shoal_tests::{EchoBackend, LOCALHOST, TestNode, eventually, free_port};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn tcp_pool(node: &TestNode, name: &str, port: u16, backends: &[&EchoBackend]) {
    node.put(&format!("/v1/pools/{name}"), json!({"protocol": "tcp", "listen": port, "health": {"interval_ms": 200}}))
        .await;
    for b in backends {
        node.put(&format!("/v1/pools/{name}/backends/{}", b.addr), json!({})).await;
    }
    let pool = name.to_string();
    let want = backends.len();
    eventually(Duration::from_secs(10), "backends healthy", || {
        let path = format!("/v1/pools/{pool}/health");
        async move {
            let h = node.get(&path).await;
            let healthy = h["backends"].as_array()?.iter().filter(|b| b["status"] == "BS_HEALTHY").count();
            (healthy == want).then_some(())
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_a_mebibyte_byte_exact_both_ways() {
    let node = TestNode::start("tcp-1").await;
    let echo = EchoBackend::start().await;
    let port = free_port();
    tcp_pool(&node, "echo", port, &[&echo]).await;
    let payload: Vec<u8> = (0..1024 * 1024).map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    let mut client = TcpStream::connect((LOCALHOST, port)).await.expect("connect");
    let (mut r, mut w) = client.split();
    let send = async {
        w.write_all(&payload).await.expect("write");
        w.shutdown().await.expect("half close");
    };
    let mut back = Vec::new();
    let recv = r.read_to_end(&mut back);
    let (_, n) = tokio::join!(send, recv);
    n.expect("read");
    assert_eq!(back.len(), payload.len());
    assert!(back == payload, "echoed bytes differ");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_backend_gets_the_seed_json_line() {
    let node = TestNode::start("tcp-2").await;
    let port = free_port();
    node.put("/v1/pools/empty", json!({"protocol": "tcp", "listen": port})).await;
    let line = eventually(Duration::from_secs(10), "listener answers", || async move {
        let mut s = TcpStream::connect((LOCALHOST, port)).await.ok()?;
        let mut line = String::new();
        s.read_to_string(&mut line).await.ok()?;
        Some(line)
    })
    .await;
    assert_eq!(line, "{\"response_code\":503,\"response_text\":\"No available backend\"}\n");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_backend_falls_over_to_the_next() {
    let node = TestNode::start("tcp-3").await;
    let good = EchoBackend::start().await;
    let doomed = EchoBackend::start().await;
    let port = free_port();
    tcp_pool(&node, "pair", port, &[&good, &doomed]).await;
    doomed.kill();
    tokio::time::sleep(Duration::from_millis(50)).await;
    // Round robin lands on the dead backend for some of these; each must still be served.
    for i in 0..6u8 {
        let mut s = TcpStream::connect((LOCALHOST, port)).await.expect("connect");
        s.write_all(&[i; 16]).await.expect("write");
        let mut buf = [0u8; 16];
        s.read_exact(&mut buf).await.expect("echo through the surviving backend");
        assert_eq!(buf, [i; 16]);
    }
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_connection_survives_reconfiguration() {
    let node = TestNode::start("tcp-4").await;
    let a = EchoBackend::start().await;
    let b = EchoBackend::start().await;
    let port = free_port();
    tcp_pool(&node, "long", port, &[&a]).await;
    let mut s = TcpStream::connect((LOCALHOST, port)).await.expect("connect");
    ping(&mut s, 1).await;
    node.put(&format!("/v1/pools/long/backends/{}", b.addr), json!({"weight": 5})).await;
    ping(&mut s, 2).await;
    node.put("/v1/pools/long", json!({"protocol": "tcp", "listen": port, "algorithm": "least_conn"})).await;
    ping(&mut s, 3).await;
    node.delete(&format!("/v1/pools/long/backends/{}", a.addr)).await;
    ping(&mut s, 4).await;
    node.delete("/v1/pools/long").await;
    ping(&mut s, 5).await;
    node.stop().await;
}

async fn ping(s: &mut TcpStream, round: u8) {
    let msg = [round; 32];
    s.write_all(&msg).await.expect("write");
    let mut buf = [0u8; 32];
    s.read_exact(&mut buf).await.expect("read");
    assert_eq!(buf, msg, "round {round}");
}
