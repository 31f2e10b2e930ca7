//! `shoal dev`: a local three-node cluster as child processes of this binary, on 127.0.0.1–3
//! (every node binds the same ports on its own loopback IP, as on separate VMs), with two demo
//! HTTP backends, a heartbeat demo backend, an HTTP pool and a TCP pool. Ctrl-C stops all.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::Duration;

use clap::Args;
use http::Method;
use serde_json::json;

use super::client::AdminClient;

#[derive(Debug, Clone, Args)]
pub struct DevArgs {
    /// Where nodes keep state and logs (default: a fresh temporary directory).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Number of nodes (on 127.0.0.1, 127.0.0.2, …).
    #[arg(long, default_value_t = 3)]
    pub nodes: u8,
}

/// A child process with a name for messages.
struct Proc {
    name: String,
    child: Child,
}

const HTTP_BACKENDS: [&str; 2] = ["127.0.0.1:8082", "127.0.0.1:8083"];
const HB_TCP: &str = "127.0.0.1:7000";
const HB_UDP: &str = "127.0.0.1:7001";

pub fn run(args: DevArgs) -> ExitCode {
    let dir = args.dir.unwrap_or_else(|| std::env::temp_dir().join(format!("shoal-dev-{}", std::process::id())));
    let n = args.nodes.clamp(1, 9);
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return super::fail(2, format!("cannot start runtime: {e}")),
    };
    let mut procs = Vec::new();
    let result = rt.block_on(async {
        let secrets = Secrets::create(&dir)?;
        start_all(&dir, n, &secrets, &mut procs)?;
        configure(n, &secrets.token, &secrets.heartbeat).await?;
        print_tour(&dir, n, &procs, &secrets.token);
        watch(&mut procs).await;
        anyhow::Ok(())
    });
    stop_all(&mut procs);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => super::fail(1, format!("{e:#} (logs in {})", dir.join("logs").display())),
    }
}

fn ip(i: u8) -> String {
    format!("127.0.0.{i}")
}

fn start_all(dir: &Path, n: u8, secrets: &Secrets, procs: &mut Vec<Proc>) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir.join("logs"))?;
    for (i, addr) in HTTP_BACKENDS.iter().enumerate() {
        let name = format!("demo-{}", i + 1);
        procs.push(spawn(dir, &name, &["demo-backend", "--listen", addr, "--name", &name])?);
    }
    let targets: Vec<String> = (1..=n).map(|i| format!("{}:5000", ip(i))).collect();
    let targets = targets.join(",");
    let hb = [
        "demo-backend",
        "--tcp",
        HB_TCP,
        "--udp",
        HB_UDP,
        "--heartbeat-to",
        &targets,
        "--secret",
        &secrets.heartbeat,
        "--banner",
        "demo-tcp",
    ];
    procs.push(spawn(dir, "demo-tcp", &hb)?);
    let seeds: Vec<String> = (1..=n).map(|i| format!("{}:7946", ip(i))).collect();
    let seeds = seeds.join(",");
    let expect = n.to_string();
    let token = secrets.token_file.to_string_lossy();
    for i in 1..=n {
        let (name, ip) = (format!("node-{i}"), ip(i));
        let data = dir.join(&name).to_string_lossy().into_owned();
        let tls = secrets.node_tls(dir, &name)?;
        let tls = tls.to_string_lossy();
        let cluster = format!("{ip}:7946");
        let admin = format!("{ip}:8081");
        let args = [
            "node",
            "--id",
            &name,
            "--cluster",
            &cluster,
            "--join",
            &seeds,
            "--expect",
            &expect,
            "--admin",
            &admin,
            "--listen-ip",
            &ip,
            "--http-port",
            "8080",
            "--data-dir",
            &data,
            "--cluster-tls",
            &tls,
            "--token-file",
            &token,
            "--public-metrics",
        ];
        procs.push(spawn(dir, &name, &args)?);
    }
    Ok(())
}

/// One cluster CA (certificates for every dev node) and one admin token.
struct Secrets {
    ca_dir: PathBuf,
    token_file: PathBuf,
    token: String,
    /// The TCP pool's heartbeat secret, new each run (the demo backend gets it by flag).
    heartbeat: String,
}

impl Secrets {
    /// Creates the files in `dir`, or reuses those a previous run left there.
    fn create(dir: &Path) -> anyhow::Result<Secrets> {
        let ca_dir = dir.join("ca");
        let token_file = dir.join("admin.token");
        if !ca_dir.join(crate::control::pki::CA_KEY).exists() {
            super::cert::make_ca("shoal", &ca_dir, 3650).map_err(anyhow::Error::msg)?;
        }
        let tokens = crate::admin::tokens::load_or_create(&token_file)
            .map_err(|e| anyhow::anyhow!("{}: {e}", token_file.display()))?;
        let token = tokens.current().first_admin().unwrap_or_default().to_string();
        let heartbeat = crate::control::secure::hex(&rand::random::<[u8; 16]>());
        Ok(Secrets { ca_dir, token_file, token, heartbeat })
    }

    /// The node's `--cluster-tls` directory, made from the dev CA on first use.
    fn node_tls(&self, dir: &Path, node: &str) -> anyhow::Result<PathBuf> {
        let out = dir.join("tls").join(node);
        if !out.join(crate::control::pki::NODE_KEY).exists() {
            super::cert::make_node(&self.ca_dir, node, &out, 365).map_err(anyhow::Error::msg)?;
        }
        Ok(out)
    }
}

fn spawn(dir: &Path, name: &str, args: &[&str]) -> anyhow::Result<Proc> {
    let exe = std::env::current_exe()?;
    let log = std::fs::File::create(dir.join("logs").join(format!("{name}.log")))?;
    let child = Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .map_err(|e| anyhow::anyhow!("cannot start {name}: {e}"))?;
    Ok(Proc { name: name.to_string(), child })
}

/// Creates the demo pools through node 1 once the cluster accepts writes.
async fn configure(n: u8, token: &str, heartbeat_secret: &str) -> anyhow::Result<()> {
    let admin = AdminClient::new(&format!("http://{}:8081", ip(1)))?.with_token(Some(token.to_string()));
    let web = json!({ "pattern": "/" });
    retry(|| admin.call::<serde_json::Value>(Method::PUT, "/v1/pools/web", Some(web.clone()))).await?;
    for addr in HTTP_BACKENDS {
        let path = format!("/v1/pools/web/backends/{addr}");
        retry(|| admin.call::<serde_json::Value>(Method::PUT, &path, Some(json!({})))).await?;
    }
    let health = json!({ "heartbeat_port": 5000, "heartbeat_secret": heartbeat_secret });
    let tcp = json!({ "protocol": "tcp", "listen": 3001, "health": health });
    retry(|| admin.call::<serde_json::Value>(Method::PUT, "/v1/pools/logic", Some(tcp.clone()))).await?;
    let path = format!("/v1/pools/logic/backends/{HB_TCP}");
    retry(|| admin.call::<serde_json::Value>(Method::PUT, &path, Some(json!({ "heartbeat_addr": HB_UDP })))).await?;
    for i in 1..=n {
        let node = AdminClient::new(&format!("http://{}:8081", ip(i)))?.with_token(Some(token.to_string()));
        retry(|| async {
            let (s, _) = node.raw(Method::GET, "/readyz", None).await?;
            if s.is_success() { Ok(()) } else { anyhow::bail!("node-{i} not ready: {s}") }
        })
        .await?;
    }
    Ok(())
}

/// Retries for up to 30 s (processes are still starting, the cluster still electing).
async fn retry<T, F, Fut>(mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

fn print_tour(dir: &Path, n: u8, procs: &[Proc], token: &str) {
    println!("shoal dev: a {n}-node cluster is running (state and logs in {})", dir.display());
    println!();
    for i in 1..=n {
        let pid = procs.iter().find(|p| p.name == format!("node-{i}")).map(|p| p.child.id()).unwrap_or(0);
        println!("  node-{i} (pid {pid}): HTTP http://{0}:8080/   TCP {0}:3001   admin http://{0}:8081/", ip(i));
    }
    println!(
        "  backends: HTTP {} and {}; TCP echo {HB_TCP} (heartbeats from {HB_UDP})",
        HTTP_BACKENDS[0], HTTP_BACKENDS[1]
    );
    println!();
    println!("  status page: http://{}:8081/#token={token}", ip(1));
    println!("  metrics:     http://{}:8081/metrics (open without a token in dev: --public-metrics)", ip(1));
    println!();
    println!("The admin API wants the token; for the commands below:");
    println!("  export SHOAL_TOKEN={token}");
    println!();
    println!("Try:");
    println!("  for i in 1 2 3 4; do curl -s http://127.0.0.{}:8080/; done   # any node, round robin", n.min(2));
    println!("  echo hello | nc -q1 127.0.0.1 3001                        # TCP pool via heartbeats");
    println!("  shoal status                                              # nodes, roles, leader");
    println!("  shoal pool health web --admin http://127.0.0.{}:8081", n);
    println!("  shoal pool add api --pattern /api/ --admin http://127.0.0.2:8081   # write on any node");
    println!("  kill -9 <pid of the leader>       # traffic keeps flowing; a new leader takes writes");
    println!();
    println!("Ctrl-C stops everything.");
}

/// Waits for Ctrl-C, reporting children that die meanwhile (once each).
async fn watch(procs: &mut [Proc]) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut reported = vec![false; procs.len()];
    loop {
        tokio::select! {
            _ = super::wait_for_signal() => return,
            _ = tick.tick() => {
                for (p, seen) in procs.iter_mut().zip(reported.iter_mut()) {
                    if let (Ok(Some(status)), false) = (p.child.try_wait(), *seen) {
                        eprintln!("{} exited ({status})", p.name);
                        *seen = true;
                    }
                }
            }
        }
    }
}

/// Children got the terminal's SIGINT too; give them a moment, then kill what remains.
fn stop_all(procs: &mut [Proc]) {
    for _ in 0..100 {
        if procs.iter_mut().all(|p| !matches!(p.child.try_wait(), Ok(None))) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for p in procs.iter_mut() {
        let _ = p.child.kill();
        let _ = p.child.wait();
    }
}
