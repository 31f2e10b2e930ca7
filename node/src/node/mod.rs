//! Builds a node from its options and owns the start order: Raft → (gossip, Raft RPC,
//! bootstrap, membership) → health → routing table → data plane → config sources →
//! reconciler → admin. Each service lives in its own file and starts from what it needs;
//! `start_with` only composes them. Shutdown (`stop`): un-ready in gossip, stop accepting,
//! let connections finish within the drain timeout, stop, then leave Raft and gossip last.

mod access_log;
mod certs;
mod cluster;
mod listeners;
mod options;
mod publish;
mod readiness;
mod reconciler;
mod sources;
mod stop;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use arc_swap::ArcSwap;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use options::{AccessLogOptions, ClusterCreds, ClusterOptions, CredsError, NodeOptions};
pub use stop::Released;

use self::listeners::{Bound, Fixed};
use self::readiness::Readiness;
use self::reconciler::Reconciler;
use crate::admin::tokens::Tokens;
use crate::admin::{NodeApi, NodeStatus};
use crate::config;
use crate::config_watch;
use crate::control::gossip::{Gossip, Members};
use crate::control::raft::{CoreFailure, RaftNet, RaftNode, ShoalNode};
use crate::dataplane::accesslog::AccessLog;
use crate::dataplane::tls::TlsStore;
use crate::dataplane::{DataPlane, DpCtx};
use crate::health::{self, HealthCtx, HealthView, Reporter};
use crate::metrics::Metrics;
use crate::reconcile::NodeCtx;
use crate::routing::{SharedTable, Table};
use crate::shutdown::{self, Shutdown, Trigger};
use crate::upgrade::Inherited;

/// What the admin API asks the node while it runs.
struct Status {
    readiness: Arc<Readiness>,
    bound: Arc<Bound>,
}

impl NodeStatus for Status {
    fn is_ready(&self) -> bool {
        self.readiness.is_ready()
    }

    fn http_addr(&self) -> Option<SocketAddr> {
        self.bound.http()
    }

    fn https_addr(&self) -> Option<SocketAddr> {
        self.bound.https()
    }
}

/// A running node.
pub struct NodeHandle {
    /// What the admin API sees of the node (tests read it too).
    pub shared: Arc<NodeApi>,
    /// The admin token the node started with (the file's first admin token, if any).
    pub admin_token: String,
    gossip: Option<Arc<Gossip>>,
    trigger: Trigger,
    dataplane: Arc<DataPlane>,
    /// The data plane's own shutdown: after a handover it outlives the control plane.
    dp_trigger: Trigger,
    /// Opens the accept loops (held shut while a node taking over is not ready yet).
    accepting: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    /// The admin server: it closes its connections itself at `Phase::Stopped`.
    admin: JoinHandle<()>,
    admin_socket: AdminSocket,
    drain_timeout: Duration,
}

impl NodeHandle {
    pub fn admin_addr(&self) -> SocketAddr {
        self.shared.admin_addr
    }

    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.shared.http_addr()
    }

    /// Resolves if the Raft core stops without a shutdown having asked (a storage error): the
    /// process must then exit, see `cli::run_node`.
    pub fn raft_failure(&self) -> impl Future<Output = CoreFailure> + Send + 'static {
        self.shared.raft.failure()
    }

    /// Opens the accept loops once the node is ready (or after `max`): a node that took
    /// over sockets must not answer from an empty table while the old one still serves.
    pub async fn accept_when_ready(&self, max: Duration) -> bool {
        let ready = tokio::time::timeout(max, async {
            while !self.shared.is_ready() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .is_ok();
        self.accepting.send_replace(true);
        ready
    }
}

/// A duplicate of the admin listening socket and the address it was asked for, to hand over.
struct AdminSocket {
    socket: std::net::TcpListener,
    requested: SocketAddr,
}

/// Binds the admin listener (or takes the inherited one) and keeps a duplicate to hand over.
async fn bind_admin(
    requested: SocketAddr,
    inherited: Option<&mut Inherited>,
) -> anyhow::Result<(tokio::net::TcpListener, AdminSocket)> {
    let listener = match inherited.and_then(|i| i.take_admin(requested)) {
        Some(l) => tokio::net::TcpListener::from_std(l)?,
        None => tokio::net::TcpListener::bind(requested)
            .await
            .with_context(|| format!("cannot bind the admin address {requested}"))?,
    };
    let socket = {
        use std::os::fd::AsFd;
        std::net::TcpListener::from(listener.as_fd().try_clone_to_owned()?)
    };
    Ok((listener, AdminSocket { socket, requested }))
}

/// The admin tokens: from the token file when one is given, else the one fixed token.
fn admin_tokens(opts: &NodeOptions) -> anyhow::Result<(Tokens, String)> {
    match &opts.admin_token_file {
        Some(path) => {
            let tokens = Tokens::from_file(path).map_err(|e| anyhow::anyhow!("token file {}: {e}", path.display()))?;
            let first = tokens.current().first_admin().unwrap_or_default().to_string();
            Ok((tokens, first))
        }
        None => Ok((Tokens::fixed(&opts.admin_token), opts.admin_token.clone())),
    }
}

/// Checks what must hold before anything starts, and warns about test-only switches.
fn preflight(opts: &NodeOptions) -> anyhow::Result<()> {
    if let Some(c) = &opts.cluster {
        cluster::check_identity(&opts.id, c)?;
    }
    if opts.fault_injection {
        tracing::warn!(
            node = %opts.id,
            clock_offset_ms = crate::clock::offset_ms(),
            "--fault-injection: the admin API can move this node's wall clock (PUT /v1/debug/clock); for chaos tests only"
        );
    }
    Ok(())
}

/// Opens the Raft store and starts its core (not yet part of any cluster).
async fn start_raft(opts: &NodeOptions, admin_addr: SocketAddr, metrics: &Metrics) -> anyhow::Result<Arc<RaftNode>> {
    let me = ShoalNode {
        name: opts.id.clone(),
        raft_addr: opts.cluster.as_ref().map(|c| c.addr.to_string()).unwrap_or_default(),
        admin: admin_addr.to_string(),
    };
    let net = RaftNet {
        cluster: opts.cluster.as_ref().map(|c| c.name.clone()).unwrap_or_else(|| "shoal".into()),
        tls: opts.cluster.as_ref().map(|c| c.creds.tls.clone()),
        filter: opts.cluster.as_ref().and_then(|c| c.link_filter.clone()),
        mismatches: Some(metrics.cluster_id_mismatch.clone()),
    };
    let timing = opts.cluster.as_ref().map(|c| c.raft.clone()).unwrap_or_default();
    Ok(Arc::new(RaftNode::start(&opts.data_dir.join("raft"), me, net, &timing).await?))
}

/// The control plane: Raft, gossip (in a cluster) and the tasks serving them.
struct Control {
    raft: Arc<RaftNode>,
    gossip: Option<Arc<Gossip>>,
    tasks: Vec<JoinHandle<()>>,
}

/// Starts Raft, then joins the cluster (gossip and the cluster loops) or, alone, initializes
/// a one-node cluster.
async fn start_control(
    opts: &NodeOptions,
    addrs: (SocketAddr, IpAddr),
    metrics: &Arc<Metrics>,
    shutdown: &Shutdown,
) -> anyhow::Result<Control> {
    let raft = start_raft(opts, addrs.0, metrics).await?;
    let Some(c) = &opts.cluster else {
        raft.initialize_alone().await?;
        return Ok(Control { raft, gossip: None, tasks: Vec::new() });
    };
    let started = cluster::start(c, opts, &raft, addrs, metrics, shutdown).await?;
    Ok(Control { raft, gossip: Some(started.gossip), tasks: started.tasks })
}

/// The data plane's share of a start: what its workers read, and the switches kept to drive it.
struct Plane {
    dataplane: Arc<DataPlane>,
    dp_trigger: Trigger,
    accepting: watch::Sender<bool>,
    threads: usize,
}

/// What the data plane is started with besides the options.
struct PlaneInputs {
    table: SharedTable,
    metrics: Arc<Metrics>,
    reporter: Reporter,
    tls: Option<Arc<TlsStore>>,
    backend_tls: Option<Arc<rustls::ClientConfig>>,
    access_log: Option<Arc<AccessLog>>,
}

/// Starts the worker threads; with `inherited` sockets their accept loops stay shut until
/// [`NodeHandle::accept_when_ready`].
fn start_dataplane(opts: &NodeOptions, i: PlaneInputs, inherited: Option<Inherited>) -> anyhow::Result<Plane> {
    let (dp_trigger, dp_shutdown) = shutdown::channel();
    let (accepting, accepting_rx) = watch::channel(inherited.is_none());
    let dp_ctx = DpCtx {
        table: i.table,
        metrics: i.metrics,
        reporter: i.reporter,
        limits: opts.limits.clone(),
        shutdown: dp_shutdown,
        accepting: accepting_rx,
        tls: i.tls,
        backend_tls: i.backend_tls,
        https_redirect: opts.https_redirect.clone(),
        tunnels: Default::default(),
        access_log: i.access_log,
        ids: opts.ids,
        accept_proxy_from: (!opts.accept_proxy_from.is_empty()).then(|| opts.accept_proxy_from.clone()),
    };
    let threads = if opts.threads == 0 { default_threads() } else { opts.threads };
    let dataplane = Arc::new(DataPlane::start(threads, dp_ctx).context("cannot start data-plane workers")?);
    if let Some(i) = inherited {
        dataplane.inherit(i.into_dataplane());
    }
    Ok(Plane { dataplane, dp_trigger, accepting, threads })
}

fn default_threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// Starts a node on the current tokio runtime (data-plane workers get their own threads).
pub async fn start(opts: NodeOptions) -> anyhow::Result<NodeHandle> {
    start_with(opts, None).await
}

/// Starts a node; with `inherited`, on the sockets of the process it takes over from, and
/// with its accept loops shut until [`NodeHandle::accept_when_ready`].
pub async fn start_with(opts: NodeOptions, mut inherited: Option<Inherited>) -> anyhow::Result<NodeHandle> {
    preflight(&opts)?;
    let metrics = Arc::new(Metrics::new(&opts.id));
    let (trigger, shutdown) = shutdown::channel();
    let config_file = opts
        .config
        .as_ref()
        .map(|p| config::load(p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display())))
        .transpose()?;
    let listen_ip =
        opts.listen_ip.or(config_file.as_ref().and_then(|f| f.listen_ip)).unwrap_or(IpAddr::from([0, 0, 0, 0]));
    let (admin_listener, admin_socket) = bind_admin(opts.admin, inherited.as_mut()).await?;
    let admin_addr = admin_listener.local_addr()?;
    let Control { raft, gossip, mut tasks } =
        start_control(&opts, (admin_addr, listen_ip), &metrics, &shutdown).await?;
    let (members_rx, names_task) = cluster::live_names(gossip.as_deref());
    tasks.extend(names_task);
    let backend_tls = certs::backend_client(opts.backend_ca.as_deref())?;
    let (local_health, reporter) = health::spawn(HealthCtx {
        state: raft.subscribe(),
        listen_ip,
        metrics: metrics.clone(),
        shutdown: shutdown.clone(),
        me: opts.id.clone(),
        members: members_rx,
        probe_replicas: opts.cluster.as_ref().map(|c| c.probe_replicas).unwrap_or(1),
        backend_tls: backend_tls.clone(),
    });
    let (combined_tx, combined_rx) = watch::channel(Arc::new(HealthView::default()));
    let table: SharedTable = Arc::new(ArcSwap::from_pointee(Table::default()));
    let tls = certs::https_store(opts.https_port, &opts.tls)?;
    let (tokens, admin_token) = admin_tokens(&opts)?;
    let admin_tls = opts.admin_tls.as_ref().map(certs::admin_store).transpose()?;
    let access_log = access_log::start(&opts, &metrics)?;
    let plane = start_dataplane(
        &opts,
        PlaneInputs {
            table: table.clone(),
            metrics: metrics.clone(),
            reporter,
            tls: tls.clone(),
            backend_tls: backend_tls.clone(),
            access_log: access_log.clone(),
        },
        inherited,
    )?;
    let readiness = Arc::new(Readiness::new(shutdown.clone()));
    let bound = Arc::new(Bound::default());
    let shared = Arc::new(NodeApi {
        id: opts.id.clone(),
        zone: opts.zone.clone(),
        admin_addr,
        raft: raft.clone(),
        gossip_members: gossip
            .as_ref()
            .map(|g| g.members.clone())
            .unwrap_or_else(|| watch::channel(Arc::new(Members::default())).1),
        health: combined_rx,
        local_health: local_health.clone(),
        table: table.clone(),
        metrics: metrics.clone(),
        shutdown: shutdown.clone(),
        status: Arc::new(Status { readiness: readiness.clone(), bound: bound.clone() }),
        tls: tls.clone(),
        backend_tls,
        tokens,
        admin_tls,
        public_metrics: opts.public_metrics,
        grpc_allow_unauthenticated: opts.grpc_allow_unauthenticated,
        fault_injection: opts.fault_injection,
        access_log,
    });
    let fixed = Fixed::new(listen_ip, opts.http_port, opts.https_port, opts.listen_ip6);
    let keepers = config_watch::Ctx {
        raft: raft.clone(),
        metrics: metrics.clone(),
        shutdown: shutdown.clone(),
        pending: readiness.sources_pending(),
    };
    tasks.extend(sources::start(config_file, &opts, keepers, gossip.is_none()).await?);
    let reconciler = Reconciler {
        id: opts.id.clone(),
        raft: raft.clone(),
        gossip: gossip.clone(),
        readiness,
        table: table.clone(),
        metrics,
        shutdown: shutdown.clone(),
        dp: plane.dataplane.clone(),
        fixed,
        bound: bound.clone(),
        ctx: NodeCtx { workers: plane.threads, zone: opts.zone.clone() },
        local: local_health.clone(),
        combined: combined_tx,
    };
    tasks.push(reconciler.spawn());
    tasks.extend(tls.map(certs::spawn_https_watch));
    tasks.extend(gossip.clone().map(|g| publish::spawn(g, local_health, table.clone())));
    reconciler::wait_first_table(&table, &bound).await;
    let admin = tokio::spawn(crate::admin::serve(admin_listener, shared.clone(), shutdown));
    tracing::info!(node = %opts.id, raft_id = raft.id, admin = %admin_addr, http = ?bound.http(), cluster = ?opts.cluster.as_ref().map(|c| c.addr), threads = plane.threads, "node started");
    Ok(NodeHandle {
        shared,
        admin_token,
        gossip,
        trigger,
        dataplane: plane.dataplane,
        dp_trigger: plane.dp_trigger,
        accepting: plane.accepting,
        tasks,
        admin,
        admin_socket,
        drain_timeout: opts.drain_timeout,
    })
}
