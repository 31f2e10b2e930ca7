//! `shoal dev`: a local demo deployment as child processes of this binary: the node(s) on
//! 127.0.0.x, two demo HTTP backends, and a pool, then it prints what to try. Ctrl-C stops all.

use std::net::SocketAddr;
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
}

/// A child process with a name for messages.
struct Proc {
    name: String,
    child: Child,
}

const HTTP_BACKENDS: [&str; 2] = ["127.0.0.1:8082", "127.0.0.1:8083"];

pub fn run(args: DevArgs) -> ExitCode {
    let dir = args.dir.unwrap_or_else(|| std::env::temp_dir().join(format!("shoal-dev-{}", std::process::id())));
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return super::fail(2, format!("cannot start runtime: {e}")),
    };
    let mut procs = Vec::new();
    let result = rt.block_on(async {
        start_all(&dir, &mut procs)?;
        configure().await?;
        print_tour(&dir);
        watch(&mut procs).await;
        anyhow::Ok(())
    });
    stop_all(&mut procs);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => super::fail(1, format!("{e:#} (logs in {})", dir.join("logs").display())),
    }
}

fn start_all(dir: &Path, procs: &mut Vec<Proc>) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir.join("logs"))?;
    for (i, addr) in HTTP_BACKENDS.iter().enumerate() {
        let name = format!("demo-{}", i + 1);
        procs.push(spawn(dir, &name, &["demo-backend", "--listen", addr, "--name", &name])?);
    }
    let data = dir.join("node-1");
    let data = data.to_string_lossy();
    let node = [
        "node",
        "--id",
        "node-1",
        "--admin",
        "127.0.0.1:8081",
        "--listen-ip",
        "127.0.0.1",
        "--http-port",
        "8080",
        "--data-dir",
        &data,
    ];
    procs.push(spawn(dir, "node-1", &node)?);
    Ok(())
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

/// Creates the demo pool once the node answers.
async fn configure() -> anyhow::Result<()> {
    let admin = AdminClient::new("http://127.0.0.1:8081")?;
    wait_ready(&admin).await?;
    admin.call::<serde_json::Value>(Method::PUT, "/v1/pools/web", Some(json!({ "pattern": "/" }))).await?;
    for addr in HTTP_BACKENDS {
        let path = format!("/v1/pools/web/backends/{addr}");
        retry(|| admin.call::<serde_json::Value>(Method::PUT, &path, Some(json!({})))).await?;
    }
    Ok(())
}

async fn wait_ready(admin: &AdminClient) -> anyhow::Result<()> {
    retry(|| async {
        admin
            .raw(Method::GET, "/healthz", None)
            .await
            .and_then(|(s, _)| if s.is_success() { Ok(()) } else { anyhow::bail!("{s}") })
    })
    .await
    .map_err(|e| anyhow::anyhow!("node at {} did not come up: {e}", admin.authority()))
}

/// Retries for up to 15 s (processes are still starting).
async fn retry<T, F, Fut>(mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

fn print_tour(dir: &Path) {
    let http: SocketAddr = ([127, 0, 0, 1], 8080).into();
    println!("shoal dev is running (state and logs in {})", dir.display());
    println!();
    println!("  HTTP pool \"web\" (pattern /):   curl http://{http}/");
    println!("  admin API:                     http://127.0.0.1:8081/v1/pools");
    println!("  backends: {} and {}", HTTP_BACKENDS[0], HTTP_BACKENDS[1]);
    println!();
    println!("Try:");
    println!("  for i in 1 2 3 4; do curl -s http://{http}/; done     # round robin across both backends");
    println!("  shoal pool health web                                 # seed 003's health table");
    println!("  shoal status");
    println!();
    println!("Ctrl-C stops everything.");
}

/// Waits for Ctrl-C, reporting children that die meanwhile.
async fn watch(procs: &mut [Proc]) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = super::wait_for_signal() => return,
            _ = tick.tick() => {
                for p in procs.iter_mut() {
                    if let Ok(Some(status)) = p.child.try_wait() {
                        eprintln!("{} exited ({status})", p.name);
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
