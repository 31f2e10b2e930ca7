//! Builds a node from its options and owns the start and shutdown order:
//! store → health → routing table → data plane → reconcile loop → admin; shutdown drains the
//! data plane (no new connections, established ones finish within the drain timeout), then
//! stops everything else.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use arc_swap::ArcSwap;
use shoal_proto::State;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config;
use crate::control::LocalStore;
use crate::dataplane::{DataPlane, DpCtx, Limits, ListenerKind};
use crate::health::{self, HealthCtx, HealthView};
use crate::metrics::Metrics;
use crate::reconcile::{self, NodeCtx};
use crate::routing::{SharedTable, Table};
use crate::shutdown::{self, Phase, Shutdown, Trigger};

/// Everything `shoal node` can be told.
#[derive(Clone, Debug)]
pub struct NodeOptions {
    pub id: String,
    /// Admin API address (port 0 picks a free port).
    pub admin: SocketAddr,
    pub data_dir: PathBuf,
    pub config: Option<PathBuf>,
    /// IP every data listener binds. `None`: a seed config's IP, else 0.0.0.0.
    pub listen_ip: Option<IpAddr>,
    /// The node's HTTP listener port (0 picks a free port).
    pub http_port: u16,
    /// Data-plane worker threads.
    pub threads: usize,
    pub zone: String,
    pub limits: Limits,
    /// How long established connections may finish after shutdown starts.
    pub drain_timeout: Duration,
}

impl NodeOptions {
    /// Options for a node on `ip` with everything else defaulted (tests, `shoal dev`).
    pub fn local(id: &str, ip: IpAddr, data_dir: PathBuf) -> NodeOptions {
        NodeOptions {
            id: id.to_string(),
            admin: SocketAddr::new(ip, 0),
            data_dir,
            config: None,
            listen_ip: Some(ip),
            http_port: 0,
            threads: 1,
            zone: String::new(),
            limits: Limits::default(),
            drain_timeout: Duration::from_secs(5),
        }
    }
}

/// What the admin API and the control loops share.
pub struct NodeShared {
    pub id: String,
    pub zone: String,
    pub admin_addr: SocketAddr,
    pub store: LocalStore,
    pub health: watch::Receiver<Arc<HealthView>>,
    pub table: SharedTable,
    pub metrics: Arc<Metrics>,
    pub shutdown: Shutdown,
    http_addr: Mutex<Option<SocketAddr>>,
}

impl NodeShared {
    pub fn state(&self) -> Arc<State> {
        self.store.current()
    }

    pub fn http_addr(&self) -> Option<SocketAddr> {
        *self.http_addr.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Updates gauges that are cheaper to compute on scrape than on every change.
    pub fn refresh_gauges(&self) {
        self.metrics.config_version.set(self.state().version as i64);
    }
}

/// A running node.
pub struct NodeHandle {
    pub shared: Arc<NodeShared>,
    trigger: Trigger,
    dataplane: Arc<DataPlane>,
    tasks: Vec<JoinHandle<()>>,
    drain_timeout: Duration,
}

impl NodeHandle {
    pub fn admin_addr(&self) -> SocketAddr {
        self.shared.admin_addr
    }

    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.shared.http_addr()
    }

    /// Staged shutdown: stop accepting, let connections finish (bounded), stop.
    pub async fn shutdown(self) {
        tracing::info!(node = %self.shared.id, "shutting down: draining connections");
        self.trigger.advance(Phase::Draining);
        let drained = self.wait_drained();
        let _ = tokio::time::timeout(self.drain_timeout, drained).await;
        self.trigger.advance(Phase::Stopped);
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
        if let Ok(dp) = Arc::try_unwrap(self.dataplane) {
            let _ = tokio::task::spawn_blocking(move || dp.join()).await;
        }
        tracing::info!(node = %self.shared.id, "stopped");
    }

    async fn wait_drained(&self) {
        let active = || self.shared.metrics.conns_active.collect_total();
        while active() > 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Sum of a gauge vector over all label values.
trait CollectTotal {
    fn collect_total(&self) -> i64;
}

impl CollectTotal for prometheus::IntGaugeVec {
    fn collect_total(&self) -> i64 {
        use prometheus::core::Collector;
        self.collect()
            .iter()
            .flat_map(|mf| mf.get_metric().iter().map(|m| m.get_gauge().get_value() as i64).collect::<Vec<_>>())
            .sum()
    }
}

/// Starts a node on the current tokio runtime (data-plane workers get their own threads).
pub async fn start(opts: NodeOptions) -> anyhow::Result<NodeHandle> {
    let metrics = Arc::new(Metrics::new(&opts.id));
    let (trigger, shutdown) = shutdown::channel();
    let store = LocalStore::open(&opts.data_dir)?;
    let listen_ip = apply_config_file(&opts, &store).await?;
    let health_ctx = HealthCtx {
        state: store.subscribe(),
        listen_ip,
        metrics: metrics.clone(),
        shutdown: shutdown.clone(),
        assignment: Arc::new(|_| true),
        verifier: Arc::new(health_secret_matches),
    };
    let (health_rx, reporter) = health::spawn(health_ctx);
    let table: SharedTable = Arc::new(ArcSwap::from_pointee(Table::default()));
    let dp_ctx = DpCtx {
        table: table.clone(),
        metrics: metrics.clone(),
        reporter,
        limits: opts.limits.clone(),
        shutdown: shutdown.clone(),
    };
    let threads = if opts.threads == 0 { default_threads() } else { opts.threads };
    let dataplane = Arc::new(DataPlane::start(threads, dp_ctx).context("cannot start data-plane workers")?);
    let admin_listener = tokio::net::TcpListener::bind(opts.admin)
        .await
        .with_context(|| format!("cannot bind the admin address {}", opts.admin))?;
    let shared = Arc::new(NodeShared {
        id: opts.id.clone(),
        zone: opts.zone.clone(),
        admin_addr: admin_listener.local_addr()?,
        store,
        health: health_rx,
        table,
        metrics,
        shutdown: shutdown.clone(),
        http_addr: Mutex::new(None),
    });
    let http_addr = SocketAddr::new(listen_ip, opts.http_port);
    let reconcile_task = spawn_reconciler(
        shared.clone(),
        dataplane.clone(),
        http_addr,
        NodeCtx { workers: threads, zone: opts.zone.clone() },
    );
    wait_first_table(&shared).await;
    let admin_task = tokio::spawn(crate::admin::serve(admin_listener, shared.clone(), shutdown.clone()));
    tracing::info!(node = %opts.id, admin = %shared.admin_addr, http = ?shared.http_addr(), threads, "node started");
    Ok(NodeHandle {
        shared,
        trigger,
        dataplane,
        tasks: vec![reconcile_task, admin_task],
        drain_timeout: opts.drain_timeout,
    })
}

fn default_threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// Plain shared-secret check of a heartbeat identification (constant time).
fn health_secret_matches(secret: &str, _pair: &str, auth: Option<&str>) -> bool {
    use subtle::ConstantTimeEq;
    auth.is_some_and(|a| bool::from(a.as_bytes().ct_eq(secret.as_bytes())))
}

/// Applies `--config` when its content changed since the last start; returns the listen IP.
async fn apply_config_file(opts: &NodeOptions, store: &LocalStore) -> anyhow::Result<IpAddr> {
    let Some(path) = &opts.config else {
        return Ok(opts.listen_ip.unwrap_or(IpAddr::from([0, 0, 0, 0])));
    };
    let file = config::load(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let listen_ip = opts.listen_ip.or(file.listen_ip).unwrap_or(IpAddr::from([0, 0, 0, 0]));
    let digest = format!("{:016x}", crate::dataplane::maglev::stable_hash(&std::fs::read(path)?, 0));
    let marker = opts.data_dir.join("config.applied");
    if std::fs::read_to_string(&marker).ok().as_deref() == Some(digest.as_str()) {
        tracing::info!(config = %path.display(), "config file unchanged since it was applied; the stored state is authoritative");
        return Ok(listen_ip);
    }
    let cmd = file.commands(&store.current());
    store.propose(cmd).await.map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    std::fs::write(&marker, digest)?;
    tracing::info!(config = %path.display(), summary = %config::summary(&file), "config file applied");
    Ok(listen_ip)
}

/// Rebuilds the routing table and the listener set whenever intent or observations change.
fn spawn_reconciler(node: Arc<NodeShared>, dp: Arc<DataPlane>, http_addr: SocketAddr, ctx: NodeCtx) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut state_rx = node.store.subscribe();
        let mut health_rx = node.health.clone();
        let mut shutdown = node.shutdown.clone();
        loop {
            let state = state_rx.borrow_and_update().clone();
            let health = health_rx.borrow_and_update().clone();
            rebuild(&node, &dp, &state, &health, &ctx, http_addr);
            tokio::select! {
                _ = shutdown.wait() => return,
                r = state_rx.changed() => if r.is_err() { return },
                r = health_rx.changed() => if r.is_err() { return },
            }
        }
    })
}

fn rebuild(
    node: &NodeShared,
    dp: &DataPlane,
    state: &State,
    health: &HealthView,
    ctx: &NodeCtx,
    http_addr: SocketAddr,
) {
    let prev = node.table.load_full();
    let next = reconcile::build(state, health, ctx, &prev, &node.metrics);
    for gone in prev.pools.iter().filter(|p| next.pool(&p.name).is_none()) {
        gone.shared.values().for_each(|s| s.pool.clear());
        node.metrics.forget_pool(&gone.name);
    }
    publish_backend_gauges(node, &next);
    node.metrics.table_rebuilds.inc();
    node.metrics.config_version.set(state.version as i64);
    let mut wanted = vec![(http_addr, ListenerKind::Http)];
    wanted.extend(next.tcp.keys().map(|port| (SocketAddr::new(http_addr.ip(), *port), ListenerKind::Tcp(*port))));
    node.table.store(Arc::new(next));
    for (kind, bound) in dp.set_listeners(&wanted) {
        if kind == ListenerKind::Http {
            *node.http_addr.lock().unwrap_or_else(|e| e.into_inner()) = Some(bound);
        }
    }
}

fn publish_backend_gauges(node: &NodeShared, table: &Table) {
    node.metrics.backend_up.reset();
    for pool in &table.pools {
        for addr in pool.shared.keys() {
            let up = pool.routable.iter().any(|b| b.addr == *addr);
            node.metrics.backend_up.with_label_values(&[pool.name.as_str(), &addr.to_string()]).set(i64::from(up));
        }
        node.metrics.pool_fail_open.with_label_values(&[pool.name.as_str()]).set(i64::from(pool.fail_open));
    }
}

async fn wait_first_table(node: &NodeShared) {
    for _ in 0..100 {
        if node.table.load().generation > 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
