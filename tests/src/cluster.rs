//! Clusters of real `shoal node` processes on loopback: node `i` runs on `127.X.Y.i`, so every
//! node binds the same ports on its own IP as on separate VMs, and `X.Y` is unique per cluster
//! so tests can run side by side. Nodes can be killed with SIGKILL, stopped with SIGTERM and
//! restarted on the same data directory. Logs go to files that are printed when a test fails.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use http::Method;
use serde_json::Value;
use shoal_node::cli::client::AdminClient;

use crate::eventually;

/// Fixed ports on every node's own IP.
pub const HTTP_PORT: u16 = 19080;
pub const ADMIN_PORT: u16 = 19081;
pub const CLUSTER_PORT: u16 = 19946;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// One node process.
pub struct ProcNode {
    pub name: String,
    pub ip: IpAddr,
    pub data: PathBuf,
    /// The admin token file every node of the cluster shares.
    pub token_file: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    extra: Vec<String>,
    /// Logs reach the log file through a pipe copied by the test process, so they are kept
    /// when the node may no longer write files (a file-size limit set with `prlimit`).
    pub pipe_logs: bool,
    /// A command the node is started through (e.g. `prlimit --fsize=0 --`); empty: none.
    pub wrapper: Vec<String>,
    /// The threads copying piped logs, done once the process has exited.
    copiers: Vec<std::thread::JoinHandle<()>>,
    /// The process a seamless upgrade replaced, while it drains.
    previous: Option<Child>,
}

impl ProcNode {
    pub fn admin(&self) -> AdminClient {
        let token = std::fs::read_to_string(&self.token_file).ok().map(|t| t.trim().to_string());
        AdminClient::new(&SocketAddr::new(self.ip, ADMIN_PORT).to_string()).expect("admin client").with_token(token)
    }

    pub fn http(&self) -> SocketAddr {
        SocketAddr::new(self.ip, HTTP_PORT)
    }

    pub fn cluster(&self) -> SocketAddr {
        SocketAddr::new(self.ip, CLUSTER_PORT)
    }

    /// What the node has logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn admin_addr(&self) -> SocketAddr {
        SocketAddr::new(self.ip, ADMIN_PORT)
    }

    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// The process id while the node has a process (running or exited, not yet restarted).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// How the node's process ended, waiting for it up to `within` (`None`: still running).
    pub async fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                // Its last lines may still be in the pipe.
                for copier in self.copiers.drain(..) {
                    let _ = copier.join();
                }
                return Some(status);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Copies a child's output into its log file (a thread per stream, ending at EOF).
fn copy_to_log(mut from: impl std::io::Read + Send + 'static, log: &std::fs::File) -> std::thread::JoinHandle<()> {
    let mut to = log.try_clone().expect("log");
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut from, &mut to);
    })
}

/// A cluster of node processes sharing one temporary directory.
pub struct ProcCluster {
    pub bin: String,
    pub dir: tempfile::TempDir,
    pub nodes: Vec<ProcNode>,
    prefix: (u8, u8),
    /// Flags every node gets (timings, grace periods).
    pub common: Vec<String>,
}

impl ProcCluster {
    /// Starts `n` nodes that bootstrap together (`--expect n`).
    pub async fn start(bin: &str, n: usize, common: &[&str]) -> ProcCluster {
        let k = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let prefix = (10 + (pid % 200) as u8, (k % 250) as u8 + 1);
        let dir = tempfile::tempdir().expect("temp dir");
        shoal_node::cli::cert::make_ca("shoal", &dir.path().join("ca"), 30).expect("cluster CA");
        let token = dir.path().join("admin.token");
        crate::write_private(&token, "test-token-0123456789abcdef");
        let secrets = ["--token-file", token.to_str().expect("utf8")];
        let mut c = ProcCluster {
            bin: bin.to_string(),
            dir,
            nodes: Vec::new(),
            prefix,
            common: fast_timings().into_iter().chain(secrets.iter().chain(common).map(|s| s.to_string())).collect(),
        };
        for i in 1..=n {
            let expect = vec!["--expect".to_string(), n.to_string()];
            c.add_node(&format!("n{i}"), i as u8, expect);
        }
        c.wait_leader(Duration::from_secs(30)).await;
        c
    }

    fn ip(&self, i: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(127, self.prefix.0, self.prefix.1, i))
    }

    /// Seeds every node joins through: the first three nodes.
    fn seeds(&self) -> String {
        (1..=3).map(|i| SocketAddr::new(self.ip(i), CLUSTER_PORT).to_string()).collect::<Vec<_>>().join(",")
    }

    /// The CA directory every node's certificate comes from (`shoal cert ca` output).
    pub fn ca_dir(&self) -> PathBuf {
        self.dir.path().join("ca")
    }

    /// Node `name`'s `--cluster-tls` directory, issued by the cluster CA on first use.
    pub fn node_tls(&self, name: &str) -> PathBuf {
        let out = self.dir.path().join("tls").join(name);
        if !out.join(shoal_node::control::pki::NODE_KEY).exists() {
            shoal_node::cli::cert::make_node(&self.ca_dir(), name, &out, 30).expect("node certificate");
        }
        out
    }

    /// Adds and starts node `name` on `127.X.Y.i` (its certificate from the cluster CA unless
    /// `extra` names another `--cluster-tls`).
    pub fn add_node(&mut self, name: &str, i: u8, mut extra: Vec<String>) -> usize {
        if !extra.iter().any(|a| a == "--cluster-tls") {
            extra.extend(["--cluster-tls".to_string(), self.node_tls(name).to_string_lossy().into_owned()]);
        }
        let ip = self.ip(i);
        let node = ProcNode {
            name: name.to_string(),
            ip,
            data: self.dir.path().join(name),
            token_file: self.dir.path().join("admin.token"),
            log: self.dir.path().join(format!("{name}.log")),
            child: None,
            extra,
            pipe_logs: false,
            wrapper: Vec::new(),
            copiers: Vec::new(),
            previous: None,
        };
        self.nodes.push(node);
        let idx = self.nodes.len() - 1;
        self.launch(idx);
        idx
    }

    fn launch(&mut self, idx: usize) {
        let seeds = self.seeds();
        let n = &mut self.nodes[idx];
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&n.log).expect("log file");
        let ip = n.ip.to_string();
        let mut cmd = match n.wrapper.split_first() {
            Some((wrapper, args)) => {
                let mut cmd = Command::new(wrapper);
                cmd.args(args).arg(&self.bin);
                cmd
            }
            None => Command::new(&self.bin),
        };
        cmd.args(["node", "--id", &n.name, "--listen-ip", &ip, "--http-port", &HTTP_PORT.to_string()])
            .args(["--admin", &SocketAddr::new(n.ip, ADMIN_PORT).to_string()])
            .args(["--cluster", &SocketAddr::new(n.ip, CLUSTER_PORT).to_string(), "--join", &seeds])
            .args(["--data-dir", &n.data.to_string_lossy(), "--threads", "1", "--drain-timeout", "2"])
            .args(overridden(&self.common, &n.extra))
            .args(&n.extra)
            .env("RUST_LOG", "info,openraft=warn")
            .stdin(Stdio::null());
        if n.pipe_logs {
            cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        } else {
            cmd.stdout(log.try_clone().expect("log")).stderr(log.try_clone().expect("log"));
        }
        let mut child = cmd.spawn().expect("spawn shoal node");
        if let (Some(out), Some(err)) = (child.stdout.take(), child.stderr.take()) {
            n.copiers = vec![copy_to_log(out, &log), copy_to_log(err, &log)];
        }
        n.child = Some(child);
    }

    /// SIGKILL: no goodbye, no flush beyond what was already fsynced.
    pub fn kill(&mut self, idx: usize) {
        if let Some(mut c) = self.nodes[idx].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for the node to exit; how it exited (`None`: it had to be killed, or
    /// was not running).
    pub fn stop(&mut self, idx: usize) -> Option<std::process::ExitStatus> {
        let mut c = self.nodes[idx].child.take()?;
        let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
        for _ in 0..200 {
            match c.try_wait() {
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
                Ok(Some(status)) => return Some(status),
                Err(_) => break,
            }
        }
        let _ = c.kill();
        let _ = c.wait();
        None
    }

    /// Starts a second process of a running node on its data directory: a seamless upgrade,
    /// the new process takes over from the running one, which drains and exits.
    pub fn take_over(&mut self, idx: usize) {
        self.nodes[idx].previous = self.nodes[idx].child.take();
        self.launch(idx);
    }

    /// How the process replaced by [`ProcCluster::take_over`] ended, waiting up to `within`.
    pub async fn wait_previous_exit(&mut self, idx: usize, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(status) = self.nodes[idx].previous.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                return Some(status);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Starts a stopped node again on its data directory.
    pub fn restart(&mut self, idx: usize) {
        self.launch(idx);
    }

    /// Starts a stopped node again on its data directory with `args` added for this start only.
    pub fn restart_with(&mut self, idx: usize, args: &[&str]) {
        let kept = self.nodes[idx].extra.clone();
        self.nodes[idx].extra.extend(args.iter().map(|a| a.to_string()));
        self.launch(idx);
        self.nodes[idx].extra = kept;
    }

    /// The `/v1/cluster` view of node `idx`.
    pub async fn view(&self, idx: usize) -> Option<Value> {
        self.nodes[idx].admin().get("/v1/cluster").await.ok()
    }

    /// Index of the leader as the running nodes agree on it.
    pub async fn leader(&mut self) -> Option<usize> {
        let mut names = Vec::new();
        for i in 0..self.nodes.len() {
            if !self.nodes[i].is_running() {
                continue;
            }
            let leader = self.view(i).await.and_then(|v| v["leader"].as_str().map(str::to_string))?;
            names.push(leader);
        }
        let first = names.first()?.clone();
        if names.iter().any(|n| *n != first) {
            return None;
        }
        self.nodes.iter_mut().position(|n| n.name == first).filter(|i| self.nodes[*i].child.is_some())
    }

    pub async fn wait_leader(&mut self, within: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(l) = self.leader().await {
                return l;
            }
            if tokio::time::Instant::now() >= deadline {
                self.dump_logs();
                panic!("no agreed leader within {within:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `PUT` through node `idx`, retried while the cluster elects (bounded).
    pub async fn put(&self, idx: usize, path: &str, body: Value) -> Value {
        let admin = self.nodes[idx].admin();
        eventually(Duration::from_secs(20), &format!("PUT {path} via {}", self.nodes[idx].name), || {
            let (admin, body) = (admin.clone(), body.clone());
            async move { admin.call::<Value>(Method::PUT, path, Some(body)).await.ok() }
        })
        .await
    }

    /// The desired state as node `idx` has applied it.
    pub async fn state(&self, idx: usize) -> Value {
        self.nodes[idx].admin().get("/v1/state").await.expect("state")
    }

    /// Prints every node's log (called when a test is about to fail).
    pub fn dump_logs(&self) {
        for n in &self.nodes {
            let text = std::fs::read_to_string(&n.log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(60).collect();
            eprintln!("----- {} ({}) -----", n.name, n.log.display());
            for line in tail.into_iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

impl Drop for ProcCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
        }
        for i in 0..self.nodes.len() {
            self.kill(i);
            if let Some(mut c) = self.nodes[i].previous.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// `common` flags without those `extra` sets itself (a node may override, e.g., its key).
fn overridden(common: &[String], extra: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < common.len() {
        let takes_value = common.get(i + 1).is_some_and(|v| !v.starts_with("--"));
        let width = if takes_value { 2 } else { 1 };
        if !extra.contains(&common[i]) {
            out.extend_from_slice(&common[i..i + width]);
        }
        i += width;
    }
    out
}

/// Quicker gossip and Raft than production defaults, still safe on a loaded 2-core machine.
fn fast_timings() -> Vec<String> {
    ["--gossip-interval-ms", "200", "--raft-heartbeat-ms", "150", "--election-timeout-ms", "800"]
        .iter()
        .map(|s| s.to_string())
        .collect()
}
