//! `shoal node --config-path FILE` as a process: edits to the file are applied (pools added,
//! changed, removed), a bad file is refused with the key logged and counted while the running
//! state is kept, SIGHUP reloads at once, and pools created through the API are left alone.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use http::Method;
use serde_json::{Value, json};
use shoal_node::cli::client::AdminClient;
use shoal_tests::{eventually, free_port};

/// Long enough for a loaded 2-core machine.
const WITHIN: Duration = Duration::from_secs(30);

/// One `shoal node` process with its own data dir, config file and log.
struct Proc {
    dir: tempfile::TempDir,
    child: Child,
    admin: AdminClient,
}

impl Proc {
    /// Starts a node on the config file `text`, re-read every `poll_ms` (0: only on SIGHUP).
    async fn start(text: &str, poll_ms: u64) -> Proc {
        let dir = tempfile::tempdir().expect("dir");
        std::fs::write(dir.path().join("pools.toml"), text).expect("config");
        shoal_tests::write_private(&dir.path().join("token"), "reload-test-token-0123456789");
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let log = std::fs::File::create(dir.path().join("node.log")).expect("log");
        let path = |name: &str| dir.path().join(name).to_string_lossy().into_owned();
        let child = Command::new(env!("CARGO_BIN_EXE_shoal-under-test"))
            .args(["node", "--id", "cfg", "--listen-ip", "127.0.0.1", "--threads", "1", "--drain-timeout", "1"])
            .args(["--admin", &admin.to_string(), "--http-port", &free_port().to_string()])
            .args(["--data-dir", &path("data"), "--token-file", &path("token")])
            .args(["--config-path", &path("pools.toml"), "--config-poll-ms", &poll_ms.to_string()])
            .env("RUST_LOG", "info,openraft=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn shoal node");
        let admin = AdminClient::new(&admin.to_string())
            .expect("admin client")
            .with_token(Some("reload-test-token-0123456789".into()));
        let p = Proc { dir, child, admin };
        p.until("the node answers with its pools", |s| s["pools"].is_object()).await;
        p
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("pools.toml")
    }

    /// Replaces the config file the way editors do: write a new file, rename it over the old.
    fn write(&self, text: &str) {
        let tmp = self.dir.path().join("pools.toml.new");
        std::fs::write(&tmp, text).expect("write");
        std::fs::rename(&tmp, self.config()).expect("rename");
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("node.log")).unwrap_or_default()
    }

    /// Waits until the node's log holds `text` (a line may be written just after the state
    /// it reports is visible through the API).
    async fn logged(&self, text: &str) {
        let what = format!("the log to say {text:?}");
        eventually(WITHIN, &what, || async { self.log().contains(text).then_some(()) }).await;
    }

    fn hangup(&self) {
        let ok = Command::new("kill").args(["-HUP", &self.child.id().to_string()]).status().expect("kill");
        assert!(ok.success(), "kill -HUP");
    }

    async fn state(&self) -> Option<Value> {
        self.admin.get("/v1/state").await.ok()
    }

    /// Waits until the state satisfies `check`.
    async fn until(&self, what: &str, check: impl Fn(&Value) -> bool) -> Value {
        eventually(WITHIN, what, || async { self.state().await.filter(|s| check(s)) }).await
    }

    /// Waits until `shoal_config_reloads_total{result}` reaches `n`, and checks it stays there.
    async fn counted(&self, result: &str, n: u64) {
        let what = format!("{n} reloads counted as {result}");
        eventually(WITHIN, &what, || async { (self.reloads(result).await >= n).then_some(()) }).await;
        assert_eq!(self.reloads(result).await, n, "{what}");
    }

    async fn reloads(&self, result: &str) -> u64 {
        let (_, body) = self.admin.raw(Method::GET, "/metrics", None).await.expect("metrics");
        let text = String::from_utf8_lossy(&body).into_owned();
        let label = format!("result=\"{result}\"");
        text.lines()
            .filter(|l| l.starts_with("shoal_config_reloads_total{") && l.contains(&label))
            .find_map(|l| l.rsplit_once(' '))
            .map_or(0, |(_, v)| v.trim().parse().expect("counter value"))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("----- node log -----\n{}", self.log());
        }
    }
}

fn pools(state: &Value) -> Vec<String> {
    state["pools"].as_object().map(|m| m.keys().cloned().collect()).unwrap_or_default()
}

fn weight(state: &Value, pool: &str, backend: &str) -> Option<u64> {
    state["pools"][pool]["backends"][backend]["spec"]["weight"].as_u64()
}

const FIRST: &str = r#"
[pools.a]
pattern = "/a/"
[pools.a.backends."127.0.0.1:9001"]

[pools.b]
pattern = "/b/"
[pools.b.backends."127.0.0.1:9002"]
weight = 1
"#;

const EDITED: &str = r#"
[pools.b]
pattern = "/b/"
algorithm = "least_conn"
[pools.b.backends."127.0.0.1:9002"]
weight = 5
[pools.b.backends."127.0.0.1:9003"]

[pools.c]
pattern = "/c/"
[pools.c.backends."127.0.0.1:9004"]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_edits_are_applied_and_bad_files_refused() {
    let node = Proc::start(FIRST, 200).await;
    node.until("the file's pools", |s| pools(s) == ["a", "b"]).await;
    node.admin
        .call::<Value>(Method::PUT, "/v1/pools/manual", Some(json!({ "pattern": "/manual/" })))
        .await
        .expect("API pool");

    node.write(EDITED);
    let s = node.until("a removed, b changed, c added", |s| pools(s) == ["b", "c", "manual"]).await;
    assert_eq!(s["pools"]["b"]["spec"]["algorithm"], "least_conn");
    assert_eq!(weight(&s, "b", "127.0.0.1:9002"), Some(5));
    assert_eq!(weight(&s, "b", "127.0.0.1:9003"), Some(1));
    node.logged("removed (no longer in the file)").await;
    node.logged("backends added 127.0.0.1:9003").await;
    node.counted("ok", 1).await;

    let version = s["version"].as_u64().expect("version");
    node.write("[pools.b]\npattern = \"/b/\"\nalgoritm = \"least_conn\"\n");
    node.counted("invalid", 1).await;
    node.logged("config file refused").await;
    node.logged("pools.b").await; // the key is named
    let kept = node.state().await.expect("state");
    assert_eq!((kept["version"].as_u64(), pools(&kept)), (Some(version), pools(&s)), "running state kept");

    // Fixing the file applies it although the bad content was seen in between.
    node.write(&EDITED.replace("weight = 5", "weight = 7"));
    node.until("the fixed file applied", |s| weight(s, "b", "127.0.0.1:9002") == Some(7)).await;
    node.counted("ok", 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_a_seed_004_file_at_once() {
    let (hb, listen) = (shoal_tests::free_udp_port(), free_port());
    let seed = |servers: &str| {
        format!(
            r#"{{
    "mode": "fl", // frontend to logic reverse proxy
    "client_tcp_listening_addr": "127.0.0.1:{listen}",
    "logic_heartbeat_udp_addr": "127.0.0.1:{hb}",
    "logic_servers": [ {servers} ]
}}"#
        )
    };
    // Polling off: only SIGHUP can reload.
    let node = Proc::start(&seed(r#""127.0.0.1:7000 127.0.0.1:7001""#), 0).await;
    let s = node.until("the seed's pool", |s| pools(s) == ["logic"]).await;
    assert_eq!(s["pools"]["logic"]["backends"].as_object().map(|b| b.len()), Some(1));
    node.logged("watching the config file").await;

    node.write(&seed(r#""127.0.0.1:7000 127.0.0.1:7001", "127.0.0.1:7002 127.0.0.1:7003""#));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let unchanged = node.state().await.expect("state");
    assert_eq!(unchanged["pools"]["logic"]["backends"].as_object().map(|b| b.len()), Some(1), "not polled");
    node.hangup();
    let s = node
        .until("SIGHUP applied the second server", |s| {
            s["pools"]["logic"]["backends"].as_object().is_some_and(|b| b.contains_key("127.0.0.1:7002"))
        })
        .await;
    assert_eq!(s["pools"]["logic"]["backends"]["127.0.0.1:7002"]["spec"]["heartbeat_addr"], "127.0.0.1:7003");

    // A bad seed file on SIGHUP: refused with the key named, the pool kept, the node running.
    node.write(&seed(r#""127.0.0.1:7000""#));
    node.hangup();
    node.counted("invalid", 1).await;
    node.logged("logic_servers[0]").await;
    let kept = node.state().await.expect("state");
    assert_eq!(kept["pools"]["logic"]["backends"].as_object().map(|b| b.len()), Some(2));
}

/// `shoal check-config` takes the same files the node reloads.
#[test]
fn check_config_accepts_the_reloaded_files() {
    let dir = tempfile::tempdir().expect("dir");
    let file: &Path = &dir.path().join("pools.toml");
    std::fs::write(file, EDITED).expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_shoal-under-test"))
        .args(["check-config", &file.to_string_lossy()])
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("2 pools"), "{}", String::from_utf8_lossy(&out.stdout));
}

/// Two nodes reading the same file: the edit is applied once and they do not fight over it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_sharing_a_file_apply_it_once() {
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("pools.toml");
    std::fs::write(&file, FIRST).expect("config");
    let file_arg = file.to_string_lossy().into_owned();
    let bin = env!("CARGO_BIN_EXE_shoal-under-test");
    let c = shoal_tests::cluster::ProcCluster::start(bin, 2, &["--config-path", &file_arg, "--config-poll-ms", "200"])
        .await;
    let state = |i: usize| {
        let admin = c.nodes[i].admin();
        async move { admin.get::<Value>("/v1/state").await.ok() }
    };
    for i in 0..2 {
        eventually(WITHIN, "the file's pools on every node", || async {
            state(i).await.filter(|s| pools(s) == ["a", "b"])
        })
        .await;
    }
    let tmp = dir.path().join("pools.toml.new");
    std::fs::write(&tmp, EDITED).expect("write");
    std::fs::rename(&tmp, &file).expect("rename");
    for i in 0..2 {
        eventually(WITHIN, "the edit on every node", || async {
            state(i).await.filter(|s| pools(s) == ["b", "c"] && weight(s, "b", "127.0.0.1:9002") == Some(5))
        })
        .await;
    }
    // Both nodes look at the file every 200 ms: once settled, nothing is proposed back and forth.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = state(0).await.expect("state")["version"].as_u64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    for i in 0..2 {
        let now = state(i).await.expect("state");
        assert_eq!(now["version"].as_u64(), before, "node {i}: the state kept changing");
    }
}
