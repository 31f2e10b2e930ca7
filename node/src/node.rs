//! Builds a node from its options and owns the start and shutdown order:
//! Raft → (gossip, Raft RPC, bootstrap, membership) → health → routing table → data plane →
//! reconciler → admin. Shutdown: un-ready in gossip, stop accepting, let connections finish
//! within the drain timeout, stop, then leave Raft and gossip last.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use arc_swap::ArcSwap;
use shoal_proto::State;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::admin::tokens::Tokens;
use crate::config;
use crate::config_watch::{self, Source};
use crate::control::gossip::{Gossip, GossipOptions, Members};
use crate::control::gossip_auth::GossipFilter;
use crate::control::membership::{self, Policy};
use crate::control::raft::channel::{RaftTls, TlsFiles};
use crate::control::raft::network::LinkFilter;
use crate::control::raft::{CoreFailure, RaftNet, RaftNode, RaftTiming, ShoalNode, quorum, server};
use crate::control::secure::ClusterKey;
use crate::dataplane::accesslog::{self, AccessLog};
use crate::dataplane::reqid::IdSettings;
use crate::dataplane::tls::{self, CertFiles, TlsStore};
use crate::dataplane::{DataPlane, DpCtx, Limits, ListenerKind};
use crate::health::combine::{self, PeerObs};
use crate::health::{self, BackendId, HealthCtx, HealthView, Verdict};
use crate::metrics::Metrics;
use crate::reconcile::{self, NodeCtx};
use crate::routing::{Counts, SharedTable, Table};
use crate::shutdown::{self, Phase, Shutdown, Trigger};
use crate::upgrade::Inherited;

/// How a node joins a cluster (`--cluster`, `--join`, `--expect`).
#[derive(Clone)]
pub struct ClusterOptions {
    /// Gossip (UDP) and Raft RPC (TCP) address.
    pub addr: SocketAddr,
    pub join: Vec<String>,
    /// Bootstrap once this many nodes see each other (0: never bootstrap, only join).
    pub expect: usize,
    pub name: String,
    pub gossip_interval: Duration,
    pub probe_replicas: usize,
    pub policy: Policy,
    pub raft: RaftTiming,
    /// Test seam: which Raft links work.
    pub link_filter: Option<LinkFilter>,
    /// Test seam: which peers' gossip gets through (partitions at first boot).
    pub gossip_filter: Option<GossipFilter>,
    /// This node's certificate (Raft RPC) and the cluster's gossip key.
    pub creds: ClusterCreds,
}

/// What a node proves itself with: its certificate from the cluster CA for Raft RPC (mutual
/// TLS), and the cluster's shared key for gossip (UDP). `shoal cert node` writes both.
#[derive(Clone, Debug)]
pub struct ClusterCreds {
    pub tls: Arc<RaftTls>,
    pub key: ClusterKey,
}

impl ClusterCreds {
    /// Reads a directory `shoal cert node --out DIR` wrote; errors name the file.
    pub fn load(dir: &std::path::Path) -> Result<ClusterCreds, String> {
        let tls = RaftTls::load(TlsFiles::in_dir(dir)).map_err(|e| e.to_string())?;
        let key = ClusterKey::load(&dir.join(crate::control::pki::GOSSIP_KEY))?;
        Ok(ClusterCreds { tls: Arc::new(tls), key })
    }
}

impl ClusterOptions {
    /// Options for a node of the cluster its certificate names.
    pub fn new(addr: SocketAddr, join: Vec<String>, expect: usize, creds: ClusterCreds) -> ClusterOptions {
        ClusterOptions {
            addr,
            join,
            expect,
            name: creds.tls.me().cluster.clone(),
            gossip_interval: Duration::from_millis(200),
            probe_replicas: 2,
            policy: Policy::default(),
            raft: RaftTiming::default(),
            link_filter: None,
            gossip_filter: None,
            creds,
        }
    }
}

/// Everything `shoal node` can be told.
#[derive(Clone)]
pub struct NodeOptions {
    pub id: String,
    /// Admin API address (port 0 picks a free port).
    pub admin: SocketAddr,
    pub data_dir: PathBuf,
    pub config: Option<PathBuf>,
    /// How often the config file is re-read (zero: only on SIGHUP).
    pub config_poll: Duration,
    /// IP every data listener binds. `None`: a seed config's IP, else 0.0.0.0.
    pub listen_ip: Option<IpAddr>,
    /// An IPv6 address the HTTP and HTTPS listeners also bind (IPv6-only, same ports), as
    /// nginx's `listen [::]:80`; skipped with a log line when the host has no IPv6.
    pub listen_ip6: Option<IpAddr>,
    /// The node's HTTP listener port (0 picks a free port).
    pub http_port: u16,
    /// Data-plane worker threads (0: one per core).
    pub threads: usize,
    pub zone: String,
    pub limits: Limits,
    /// How long established connections may finish after shutdown starts.
    pub drain_timeout: Duration,
    /// `None`: a one-node cluster of its own.
    pub cluster: Option<ClusterOptions>,
    /// The HTTPS listener's port (needs `tls`).
    pub https_port: Option<u16>,
    /// Server certificates (node-local files; the first is the default, others by SNI).
    pub tls: Vec<CertFiles>,
    /// CA bundle for TLS to backends (default: the system bundle).
    pub backend_ca: Option<PathBuf>,
    /// The plain HTTP listener redirects every request to `https://<host>`.
    pub https_redirect: Option<String>,
    /// EC compatibility mode (`--ec-env`): its pool is applied like a config file, and
    /// gateways named by host name are resolved again while the node runs.
    pub ec: Option<crate::ec::EcSetup>,
    /// The access log: where records go and how they are written (`None`: off).
    pub access_log: Option<AccessLogOptions>,
    /// Whether requests get an `X-Request-Id` and a `traceparent`.
    pub ids: IdSettings,
    /// Sources allowed on the HTTP and HTTPS listeners, each connection starting with a
    /// PROXY protocol header (`--accept-proxy-from`); empty: no header expected.
    pub accept_proxy_from: Vec<shoal_proto::proxy::Cidr>,
    /// Bearer token of the admin API (admin scope), used when `admin_token_file` is `None`.
    pub admin_token: String,
    /// Scoped admin tokens (see `admin::tokens`), re-read when the file changes; replaces
    /// `admin_token`.
    pub admin_token_file: Option<PathBuf>,
    /// Certificate and key of the admin listener: HTTPS (and gRPC over h2 by ALPN) instead of
    /// plain HTTP/h2c.
    pub admin_tls: Option<CertFiles>,
    /// Serve `/metrics` without the token.
    pub public_metrics: bool,
    /// Accept gRPC control calls without the token (`--grpc-allow-unauthenticated`).
    pub grpc_allow_unauthenticated: bool,
    /// Serve the fault-injection endpoints (`--fault-injection`, chaos tests only).
    pub fault_injection: bool,
}

impl NodeOptions {
    /// Options for a node on `ip` with everything else defaulted (tests, `shoal dev`).
    pub fn local(id: &str, ip: IpAddr, data_dir: PathBuf) -> NodeOptions {
        NodeOptions {
            id: id.to_string(),
            admin: SocketAddr::new(ip, 0),
            data_dir,
            config: None,
            config_poll: Duration::from_secs(1),
            listen_ip: Some(ip),
            listen_ip6: None,
            http_port: 0,
            threads: 1,
            zone: String::new(),
            limits: Limits::default(),
            drain_timeout: Duration::from_secs(5),
            cluster: None,
            https_port: None,
            tls: Vec::new(),
            backend_ca: None,
            https_redirect: None,
            ec: None,
            access_log: None,
            ids: IdSettings::default(),
            accept_proxy_from: Vec::new(),
            admin_token: crate::control::secure::hex(&rand::random::<[u8; 16]>()),
            admin_token_file: None,
            admin_tls: None,
            public_metrics: false,
            grpc_allow_unauthenticated: false,
            fault_injection: false,
        }
    }
}

/// What the admin API and the control loops share.
pub struct NodeShared {
    pub id: String,
    pub zone: String,
    pub admin_addr: SocketAddr,
    pub cluster_addr: Option<SocketAddr>,
    pub raft: Arc<RaftNode>,
    pub gossip: Option<Arc<Gossip>>,
    /// The cluster's combined health view (what routing uses).
    pub health: watch::Receiver<Arc<HealthView>>,
    /// This node's own observations.
    pub local_health: watch::Receiver<Arc<HealthView>>,
    pub table: SharedTable,
    pub metrics: Arc<Metrics>,
    pub shutdown: Shutdown,
    pub ready: AtomicBool,
    /// Config sources (file, EC environment) not yet applied; the node is not ready before.
    pub sources_pending: AtomicUsize,
    /// Server certificates of the HTTPS listener (reloadable).
    pub tls: Option<Arc<TlsStore>>,
    /// Client TLS for `backend_tls` pools.
    pub backend_tls: Option<Arc<rustls::ClientConfig>>,
    /// The admin token the node started with (the file's first admin token, if any).
    pub admin_token: String,
    /// The scoped tokens in service.
    pub tokens: Tokens,
    /// The admin listener's certificate (`None`: plain HTTP).
    pub admin_tls: Option<Arc<TlsStore>>,
    pub public_metrics: bool,
    pub grpc_allow_unauthenticated: bool,
    /// `PUT /v1/debug/clock` is served (`--fault-injection`).
    pub fault_injection: bool,
    http_addr: Mutex<Option<SocketAddr>>,
    https_addr: Mutex<Option<SocketAddr>>,
    /// The access log, reopened by `POST /v1/access-log/reopen`.
    pub access_log: Option<Arc<AccessLog>>,
}

impl NodeShared {
    /// The bound port of the node's own HTTP or HTTPS listener.
    fn bound_port(&self, kind: &ListenerKind) -> Option<u16> {
        match kind {
            ListenerKind::Http => self.http_addr().map(|a| a.port()),
            ListenerKind::Https => self.https_addr().map(|a| a.port()),
            ListenerKind::Tcp(_) => None,
        }
    }

    pub fn state(&self) -> Arc<State> {
        self.raft.current()
    }

    pub fn http_addr(&self) -> Option<SocketAddr> {
        *self.http_addr.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn https_addr(&self) -> Option<SocketAddr> {
        *self.https_addr.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Work in flight on live peers, per backend (from their gossip).
    pub fn remote_counts(&self) -> HashMap<BackendId, Counts> {
        let mut out: HashMap<BackendId, Counts> = HashMap::new();
        for m in self.members().live().filter(|m| m.name != self.id) {
            for (id, c) in &m.active {
                *out.entry(id.clone()).or_default() += *c;
            }
        }
        out
    }

    pub fn members(&self) -> Arc<Members> {
        self.gossip.as_ref().map(|g| g.members.borrow().clone()).unwrap_or_default()
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed) && self.shutdown.phase() == Phase::Running
    }

    /// Updates gauges that are cheaper to compute on scrape than on every change.
    pub async fn refresh_gauges(&self) {
        let st = self.raft.status().await;
        let m = &self.metrics;
        m.config_version.set(self.state().version as i64);
        m.raft_term.set(st.term as i64);
        m.raft_leader_id.set(st.leader.map(|l| l as i64).unwrap_or(0));
        m.raft_is_leader.set(i64::from(st.leader == Some(self.raft.id)));
        m.raft_commit_index.set(st.committed as i64);
        m.raft_applied_index.set(st.applied as i64);
        m.raft_voters.set(st.voters.len() as i64);
        m.raft_voters_live.set(live_voters(&st.voters, &self.members(), self.raft.id) as i64);
        m.raft_learners.set(st.learners.len() as i64);
        m.gossip_live_nodes.set(self.members().live().count().max(1) as i64);
        m.node_ready.set(i64::from(self.is_ready()));
        for (cert, store) in [("https", &self.tls), ("admin", &self.admin_tls)] {
            for (file, not_after) in store.iter().flat_map(|s| s.expiries()) {
                m.certificate(cert, &file, not_after);
            }
        }
    }
}

/// Voters alive in gossip (by the Raft id they gossip); this node counts as alive itself, so
/// a node without gossip (alone) sees its one voter.
fn live_voters(voters: &std::collections::BTreeSet<u64>, members: &Members, me: u64) -> usize {
    let live: std::collections::HashSet<u64> = members.live().map(|m| m.raft_id).chain([me]).collect();
    voters.iter().filter(|v| live.contains(v)).count()
}

/// A running node.
pub struct NodeHandle {
    pub shared: Arc<NodeShared>,
    trigger: Trigger,
    dataplane: Arc<DataPlane>,
    /// The data plane's own shutdown: after a handover it outlives the control plane.
    dp_trigger: Trigger,
    /// Opens the accept loops (held shut while a node taking over is not ready yet).
    accepting: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    /// The admin server: it closes its connections itself at `Phase::Stopped`.
    admin: JoinHandle<()>,
    /// A duplicate of the admin listening socket and the address it was asked for, to hand over.
    admin_socket: std::net::TcpListener,
    admin_requested: SocketAddr,
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

    /// Staged shutdown: un-ready, stop accepting, let connections finish (bounded), stop.
    pub async fn shutdown(self) {
        tracing::info!(node = %self.shared.id, "shutting down: draining connections");
        if let Some(g) = &self.shared.gossip {
            g.set("ready", Some("0".into())).await;
        }
        self.trigger.advance(Phase::Draining);
        self.dp_trigger.advance(Phase::Draining);
        let _ = tokio::time::timeout(self.drain_timeout, wait_drained(&self.shared.metrics, &self.dataplane)).await;
        self.trigger.advance(Phase::Stopped);
        self.dp_trigger.advance(Phase::Stopped);
        stop_control(self.tasks, self.admin, &self.shared.raft).await;
        if let Some(dp) = Arc::into_inner(self.dataplane) {
            let _ = tokio::task::spawn_blocking(move || dp.join()).await;
        }
        if let Some(g) = self.shared.gossip.as_ref() {
            let _ = g.set("raft_addr", None).await;
        }
        tracing::info!(node = %self.shared.id, "stopped");
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

    /// Hands over (see `upgrade`): stops the control plane and frees the data directory and
    /// the cluster ports, keeping the data plane serving on its last routing table.
    pub async fn release(self) -> Released {
        let id = self.shared.id.clone();
        tracing::info!(node = %id, "handing over: stopping the control plane; connections go on");
        self.trigger.advance(Phase::Draining);
        self.trigger.advance(Phase::Stopped);
        stop_control(self.tasks, self.admin, &self.shared.raft).await;
        let metrics = self.shared.metrics.clone();
        release_shared(self.shared).await;
        Released {
            id,
            metrics,
            dataplane: self.dataplane,
            dp_trigger: self.dp_trigger,
            admin_socket: self.admin_socket,
            admin_requested: self.admin_requested,
        }
    }
}

/// Ends the control plane's tasks and the admin server (its connections hold the node, and
/// so the store, until it has closed them), then stops Raft. The `Stopped` phase must be set.
async fn stop_control(tasks: Vec<JoinHandle<()>>, mut admin: JoinHandle<()>, raft: &RaftNode) {
    for t in &tasks {
        t.abort();
    }
    for t in tasks {
        let _ = t.await;
    }
    if tokio::time::timeout(Duration::from_secs(2), &mut admin).await.is_err() {
        admin.abort();
    }
    raft.shutdown().await;
}

/// Drops the control plane's shared state, which closes the Raft store (redb allows one
/// process) and gossip's socket, once the tasks that held it are gone.
async fn release_shared(shared: Arc<NodeShared>) {
    for _ in 0..100 {
        if Arc::strong_count(&shared) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    match Arc::try_unwrap(shared) {
        Ok(shared) => {
            if let Some(g) = shared.gossip.and_then(Arc::into_inner) {
                g.shutdown().await;
            }
        }
        Err(shared) => {
            tracing::error!(refs = Arc::strong_count(&shared), "the control plane is still referenced after its stop")
        }
    }
}

/// A node that handed its control plane over: its data plane serves until drained.
pub struct Released {
    id: String,
    metrics: Arc<Metrics>,
    dataplane: Arc<DataPlane>,
    dp_trigger: Trigger,
    admin_socket: std::net::TcpListener,
    admin_requested: SocketAddr,
}

impl Released {
    /// Calls `f` with every listening socket, to send them.
    pub fn with_sockets<R>(&self, f: impl FnOnce(&[crate::upgrade::Outgoing<'_>]) -> R) -> R {
        use std::os::fd::AsFd;
        self.dataplane.export(|listeners| {
            let mut out = crate::upgrade::Outgoing::from_dataplane(listeners);
            out.push(crate::upgrade::Outgoing {
                role: crate::upgrade::Role::Admin,
                addr: self.admin_requested,
                sockets: vec![self.admin_socket.as_fd()],
            });
            f(&out)
        })
    }

    /// Stops accepting and serves the connections open until they end or `deadline` passes
    /// (then upgraded ones get their close frames), then stops. Once `shorten` resolves (a
    /// SIGTERM) they get only `rest` more.
    pub async fn drain(self, deadline: Duration, shorten: impl Future<Output = ()>, rest: Duration) {
        let open = open_connections(&self.metrics);
        tracing::info!(node = %self.id, open, tunnels = self.dataplane.tunnels(), deadline_s = deadline.as_secs(), "no longer accepting; serving the connections open");
        self.dp_trigger.advance(Phase::Draining);
        let cut = async {
            shorten.await;
            tracing::info!(node = %self.id, rest_s = rest.as_secs(), "asked to stop: the open connections get the drain timeout");
            tokio::time::sleep(rest).await;
        };
        tokio::select! {
            _ = tokio::time::timeout(deadline, wait_drained(&self.metrics, &self.dataplane)) => {}
            _ = cut => {}
        }
        self.dp_trigger.advance(Phase::Stopped);
        if let Some(dp) = Arc::into_inner(self.dataplane) {
            let _ = tokio::task::spawn_blocking(move || dp.join()).await;
        }
        tracing::info!(node = %self.id, "stopped after the handover");
    }
}

async fn wait_drained(metrics: &Metrics, dp: &DataPlane) {
    while open_connections(metrics) > 0 || dp.tunnels() > 0 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn open_connections(metrics: &Metrics) -> i64 {
    use prometheus::core::Collector;
    metrics
        .conns_active
        .collect()
        .iter()
        .flat_map(|mf| mf.get_metric().iter().map(|m| m.get_gauge().get_value() as i64))
        .sum()
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

/// The admin listener's certificate store; its key must be private.
fn admin_tls_store(files: &CertFiles) -> anyhow::Result<Arc<TlsStore>> {
    crate::files::ensure_private(&files.key)
        .map_err(|e| anyhow::anyhow!("admin TLS key {}: {e}", files.key.display()))?;
    Ok(Arc::new(TlsStore::load(vec![files.clone()]).map_err(|e| anyhow::anyhow!("admin TLS: {e}"))?))
}

/// The node certificate must name this node and its cluster: peers bind the name to the
/// node's Raft id, and gossip announces it.
fn check_identity(id: &str, c: &ClusterOptions) -> anyhow::Result<()> {
    let me = c.creds.tls.me();
    if me.node != id || me.cluster != c.name {
        anyhow::bail!(
            "the node certificate is for node {:?} of cluster {:?}, but this node is {id:?} of cluster {:?} \
             (make one with `shoal cert node --id {id}`, or leave --id and --cluster-name out to take them from it)",
            me.node,
            me.cluster,
            c.name
        );
    }
    Ok(())
}

/// Starts a node on the current tokio runtime (data-plane workers get their own threads).
pub async fn start(opts: NodeOptions) -> anyhow::Result<NodeHandle> {
    start_with(opts, None).await
}

/// Starts a node; with `inherited`, on the sockets of the process it takes over from, and
/// with its accept loops shut until [`NodeHandle::accept_when_ready`].
pub async fn start_with(opts: NodeOptions, mut inherited: Option<Inherited>) -> anyhow::Result<NodeHandle> {
    if let Some(c) = &opts.cluster {
        check_identity(&opts.id, c)?;
    }
    if opts.fault_injection {
        tracing::warn!(
            node = %opts.id,
            clock_offset_ms = crate::clock::offset_ms(),
            "--fault-injection: the admin API can move this node's wall clock (PUT /v1/debug/clock); for chaos tests only"
        );
    }
    let metrics = Arc::new(Metrics::new(&opts.id));
    let (trigger, shutdown) = shutdown::channel();
    let config_file = opts
        .config
        .as_ref()
        .map(|p| config::load(p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display())))
        .transpose()?;
    let listen_ip =
        opts.listen_ip.or(config_file.as_ref().and_then(|f| f.listen_ip)).unwrap_or(IpAddr::from([0, 0, 0, 0]));
    let admin_listener = match inherited.as_mut().and_then(|i| i.take_admin(opts.admin)) {
        Some(l) => tokio::net::TcpListener::from_std(l)?,
        None => tokio::net::TcpListener::bind(opts.admin)
            .await
            .with_context(|| format!("cannot bind the admin address {}", opts.admin))?,
    };
    let admin_socket = {
        use std::os::fd::AsFd;
        std::net::TcpListener::from(admin_listener.as_fd().try_clone_to_owned()?)
    };
    let admin_addr = admin_listener.local_addr()?;
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
    let raft = Arc::new(RaftNode::start(&opts.data_dir.join("raft"), me, net, &timing).await?);
    let mut tasks = Vec::new();
    let gossip = match &opts.cluster {
        Some(c) => Some(start_cluster(c, &opts, &raft, admin_addr, listen_ip, &metrics, &shutdown, &mut tasks).await?),
        None => {
            raft.initialize_alone().await?;
            None
        }
    };
    let members_rx = live_names(gossip.as_deref(), &mut tasks);
    let backend_tls = backend_tls_config(opts.backend_ca.as_deref())?;
    let health_ctx = HealthCtx {
        state: raft.subscribe(),
        listen_ip,
        metrics: metrics.clone(),
        shutdown: shutdown.clone(),
        me: opts.id.clone(),
        members: members_rx,
        probe_replicas: opts.cluster.as_ref().map(|c| c.probe_replicas).unwrap_or(1),
        backend_tls: backend_tls.clone(),
    };
    let (local_health, reporter) = health::spawn(health_ctx);
    let (combined_tx, combined_rx) = watch::channel(Arc::new(HealthView::default()));
    let table: SharedTable = Arc::new(ArcSwap::from_pointee(Table::default()));
    let tls = match opts.https_port {
        Some(_) => {
            for files in &opts.tls {
                crate::files::ensure_private(&files.key)
                    .map_err(|e| anyhow::anyhow!("TLS key {}: {e}", files.key.display()))?;
            }
            Some(Arc::new(TlsStore::load(opts.tls.clone()).map_err(|e| anyhow::anyhow!("TLS: {e}"))?))
        }
        None => None,
    };
    let (tokens, admin_token) = admin_tokens(&opts)?;
    let admin_tls = opts.admin_tls.as_ref().map(admin_tls_store).transpose()?;
    let access_log = start_access_log(&opts, &metrics)?;
    let (dp_trigger, dp_shutdown) = shutdown::channel();
    let (accepting, accepting_rx) = watch::channel(inherited.is_none());
    let dp_ctx = DpCtx {
        table: table.clone(),
        metrics: metrics.clone(),
        reporter,
        limits: opts.limits.clone(),
        shutdown: dp_shutdown,
        accepting: accepting_rx,
        tls: tls.clone(),
        backend_tls: backend_tls.clone(),
        https_redirect: opts.https_redirect.clone(),
        tunnels: AtomicUsize::new(0),
        access_log: access_log.clone(),
        ids: opts.ids,
        accept_proxy_from: (!opts.accept_proxy_from.is_empty()).then(|| opts.accept_proxy_from.clone()),
    };
    let threads = if opts.threads == 0 { default_threads() } else { opts.threads };
    let dataplane = Arc::new(DataPlane::start(threads, dp_ctx).context("cannot start data-plane workers")?);
    if let Some(i) = inherited {
        dataplane.inherit(i.into_dataplane());
    }
    let shared = Arc::new(NodeShared {
        id: opts.id.clone(),
        zone: opts.zone.clone(),
        admin_addr,
        cluster_addr: opts.cluster.as_ref().map(|c| c.addr),
        raft,
        gossip,
        health: combined_rx,
        local_health: local_health.clone(),
        table,
        metrics,
        shutdown: shutdown.clone(),
        ready: AtomicBool::new(false),
        sources_pending: AtomicUsize::new(0),
        tls,
        backend_tls,
        admin_token,
        tokens,
        admin_tls,
        public_metrics: opts.public_metrics,
        grpc_allow_unauthenticated: opts.grpc_allow_unauthenticated,
        fault_injection: opts.fault_injection,
        http_addr: Mutex::new(None),
        https_addr: Mutex::new(None),
        access_log,
    });
    let fixed = Fixed {
        http: SocketAddr::new(listen_ip, opts.http_port),
        https: opts.https_port.map(|p| SocketAddr::new(listen_ip, p)),
        v6: opts.listen_ip6.filter(|ip| *ip != listen_ip && ipv6_usable(*ip)),
    };
    let sources = config_sources(config_file, &opts)?;
    if let Some(ec) = opts.ec.clone() {
        tasks.push(spawn_gateway_watch(shared.clone(), ec, opts.data_dir.clone()));
    }
    shared.sources_pending.store(sources.len(), Ordering::Relaxed);
    for source in sources {
        let mut keeper = config_watch::Keeper::new(shared.clone(), source, &opts.data_dir);
        if shared.gossip.is_some() {
            // A cluster may still be electing its first leader: apply in the background.
            tasks.push(tokio::spawn(keeper.run()));
        } else {
            // Alone, the node is its own leader: have the pools before the listeners open.
            keeper.apply_at_start().await;
            tasks.push(tokio::spawn(keeper.watch()));
        }
    }
    let ctx = NodeCtx { workers: threads, zone: opts.zone.clone() };
    tasks.push(spawn_reconciler(shared.clone(), dataplane.clone(), fixed, ctx, local_health.clone(), combined_tx));
    if let Some(store) = shared.tls.clone() {
        tasks.push(tokio::spawn(watch_certificates(store)));
    }
    if let Some(g) = &shared.gossip {
        tasks.push(tokio::spawn(publish_observations(g.clone(), local_health, shared.clone())));
    }
    wait_first_table(&shared).await;
    let admin = tokio::spawn(crate::admin::serve(admin_listener, shared.clone(), shutdown.clone()));
    tracing::info!(node = %opts.id, raft_id = shared.raft.id, admin = %admin_addr, http = ?shared.http_addr(), cluster = ?shared.cluster_addr, threads, "node started");
    Ok(NodeHandle {
        shared,
        trigger,
        dataplane,
        dp_trigger,
        accepting,
        tasks,
        admin,
        admin_socket,
        admin_requested: opts.admin,
        drain_timeout: opts.drain_timeout,
    })
}

/// Where access log records go and how they are written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccessLogOptions {
    pub target: accesslog::Target,
    pub format: accesslog::Format,
}

/// Opens the access log, and reopens its file on SIGUSR1 (logrotate's signal) for as long as
/// the log lives, through a handover's drain too. SIGUSR1 is taken even without a log file, so
/// a rotation script signalling every node never kills one.
fn start_access_log(opts: &NodeOptions, metrics: &Metrics) -> anyhow::Result<Option<Arc<AccessLog>>> {
    let log = match &opts.access_log {
        Some(a) => Some(
            AccessLog::start(a.target.clone(), a.format, metrics.access_log_dropped.clone())
                .with_context(|| format!("cannot open the access log {}", a.target))?,
        ),
        None => None,
    };
    let weak = log.as_ref().map(Arc::downgrade);
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1()) {
        Ok(usr1) => {
            tokio::spawn(reopen_on_signal(usr1, weak));
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGUSR1; the access log reopens only through the admin API")
        }
    }
    Ok(log)
}

async fn reopen_on_signal(mut usr1: tokio::signal::unix::Signal, log: Option<std::sync::Weak<AccessLog>>) {
    while usr1.recv().await.is_some() {
        let Some(log) = log.as_ref().map(std::sync::Weak::upgrade) else {
            tracing::info!("SIGUSR1: this node writes no access log file; nothing to reopen");
            continue;
        };
        // The node that owned the log has stopped.
        let Some(log) = log else { return };
        if let Ok(Err(e)) = tokio::task::spawn_blocking(move || log.reopen()).await {
            tracing::error!(error = %e, "SIGUSR1: cannot reopen the access log; writing on to the old file");
        }
    }
}

/// Starts gossip, the Raft RPC server, bootstrap and the membership loop.
#[allow(clippy::too_many_arguments)]
async fn start_cluster(
    c: &ClusterOptions,
    opts: &NodeOptions,
    raft: &Arc<RaftNode>,
    admin: SocketAddr,
    listen_ip: IpAddr,
    metrics: &Arc<Metrics>,
    shutdown: &Shutdown,
    tasks: &mut Vec<JoinHandle<()>>,
) -> anyhow::Result<Arc<Gossip>> {
    let rpc = tokio::net::TcpListener::bind(c.addr)
        .await
        .with_context(|| format!("cannot bind the cluster address {} (TCP)", c.addr))?;
    let keys = vec![
        ("raft_id".to_string(), raft.id.to_string()),
        ("raft_addr".to_string(), c.addr.to_string()),
        ("admin".to_string(), admin.to_string()),
        ("http".to_string(), SocketAddr::new(listen_ip, opts.http_port).to_string()),
        ("zone".to_string(), opts.zone.clone()),
        ("ready".to_string(), "0".to_string()),
        ("raft_init".to_string(), if raft.is_initialized().await { "1" } else { "0" }.to_string()),
    ];
    let keys = keys.into_iter().chain(raft.ident.get().map(|id| ("cluster_id".to_string(), id.to_string()))).collect();
    let gopts = GossipOptions {
        name: opts.id.clone(),
        cluster_id: c.name.clone(),
        addr: c.addr,
        seeds: c.join.clone(),
        interval: c.gossip_interval,
        key: c.creds.key.clone(),
        filter: c.gossip_filter.clone(),
        state_file: Some(opts.data_dir.join(crate::control::incarnation::FILE)),
    };
    let gossip = Arc::new(Gossip::start(&gopts, keys, metrics.clone()).await?);
    // Peers' connections wait in the backlog until gossip, which forwarded removals need, runs.
    tasks.push(tokio::spawn(server::serve(rpc, raft.clone(), metrics.clone(), gossip.members.clone())));
    let expect = if c.expect == 0 && c.join.is_empty() { 1 } else { c.expect };
    tasks.push(tokio::spawn(membership::bootstrap(raft.clone(), gossip.clone(), expect, shutdown.clone())));
    tasks.push(tokio::spawn(membership::publish_identity(raft.clone(), gossip.clone(), shutdown.clone())));
    tasks.push(tokio::spawn(watch_cluster_certificate(c.creds.tls.clone(), metrics.clone())));
    let limit = quorum::QuorumWatch::limit_for(c.raft.election_max);
    tasks.push(tokio::spawn(quorum::run(raft.clone(), limit, shutdown.clone())));
    tasks.push(tokio::spawn(membership::reconcile(
        raft.clone(),
        gossip.members.clone(),
        c.policy.clone(),
        shutdown.clone(),
    )));
    Ok(gossip)
}

/// Live node names for probe sharding (empty for a node without gossip).
fn live_names(gossip: Option<&Gossip>, tasks: &mut Vec<JoinHandle<()>>) -> watch::Receiver<Arc<Vec<String>>> {
    let (tx, rx) = watch::channel(Arc::new(Vec::new()));
    if let Some(g) = gossip {
        let mut members = g.members.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let names = members.borrow_and_update().live_names();
                tx.send_if_modified(|n| (**n != names).then(|| *n = Arc::new(names)).is_some());
                if members.changed().await.is_err() {
                    return;
                }
            }
        }));
    }
    rx
}

fn default_threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// The config file (watched, and reloaded on SIGHUP) and the EC environment's pools.
fn config_sources(file: Option<config::ConfigFile>, opts: &NodeOptions) -> anyhow::Result<Vec<Source>> {
    let mut sources = Vec::new();
    if let (Some(file), Some(path)) = (file, opts.config.clone()) {
        let bytes = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .map_err(|e| tracing::warn!(error = %e, "cannot watch SIGHUP; the config file is still polled"))
            .ok();
        sources.push(Source {
            label: path.display().to_string(),
            file,
            digest: config_watch::digest(&bytes),
            marker: "config.applied",
            watch: Some(config_watch::Watch { path, poll: opts.config_poll, hangup }),
        });
    }
    if let Some(ec) = &opts.ec {
        sources.push(ec_source(ec.config())?);
    }
    Ok(sources)
}

/// The EC environment's pool as a config source (one digest per resolved gateway set).
fn ec_source(file: config::ConfigFile) -> anyhow::Result<Source> {
    let digest = config_watch::digest(&serde_json::to_vec(&file.pools)?);
    Ok(Source { label: "EC environment".into(), file, digest, marker: "ec.applied", watch: None })
}

/// Resolves EC gateways named by host name again and proposes a moved one the way the EC
/// environment was proposed: only the difference, so slots keep following `GATEWAY_LIST` order
/// and operator edits to the other gateways (drain flags, weights) stay.
fn spawn_gateway_watch(node: Arc<NodeShared>, ec: crate::ec::EcSetup, data_dir: PathBuf) -> JoinHandle<()> {
    let failures = node.metrics.ec_resolve_failures.clone();
    let resolve: crate::ec::Resolve = Arc::new(crate::ec::resolve_entry);
    tokio::spawn(crate::ec::watch_gateways(ec, resolve, failures, move |file| {
        let (node, data_dir) = (node.clone(), data_dir.clone());
        async move {
            match ec_source(file) {
                Ok(source) => config_watch::Keeper::new(node, source, &data_dir).apply_if_changed().await,
                Err(e) => tracing::error!(error = %e, "cannot encode the EC gateways"),
            }
        }
    }))
}

/// Whether this host can listen on `ip` (IPv6): a host without IPv6 answers EAFNOSUPPORT or
/// EADDRNOTAVAIL, and the node then serves IPv4 only (logged). Other errors are left to the
/// listener itself, which reports them like any bind failure.
fn ipv6_usable(ip: IpAddr) -> bool {
    match crate::dataplane::v6_only_listener(SocketAddr::new(ip, 0)) {
        Ok(_) => true,
        Err(e) if crate::dataplane::no_ipv6(&e) => {
            tracing::warn!(%ip, error = %e, "this host has no IPv6: listening on IPv4 only");
            false
        }
        Err(_) => true,
    }
}

/// Client TLS for `backend_tls` pools: the given CA file must load; the system bundle may be absent.
fn backend_tls_config(ca: Option<&std::path::Path>) -> anyhow::Result<Option<Arc<rustls::ClientConfig>>> {
    match (ca, tls::client_config(ca)) {
        (_, Ok(c)) => Ok(Some(c)),
        (Some(_), Err(e)) => Err(anyhow::anyhow!("--backend-ca: {e}")),
        (None, Err(e)) => {
            tracing::debug!(error = %e, "no CA bundle: pools with backend_tls cannot connect");
            Ok(None)
        }
    }
}

/// Reloads the server certificates when their files change (every 2 s).
async fn watch_certificates(store: Arc<TlsStore>) {
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tick.tick().await;
        match store.reload_if_changed() {
            Some(Ok(())) => {
                tracing::info!("TLS certificates reloaded (files changed); established connections untouched")
            }
            Some(Err(e)) => tracing::error!(error = %e, "TLS reload failed; the previous certificates stay in service"),
            None => {}
        }
    }
}

/// Reloads the node certificate when its files change (every 2 s): a renewed certificate is
/// used by new Raft connections; a broken or foreign one is refused (logged once) and the
/// running one kept.
async fn watch_cluster_certificate(tls: Arc<RaftTls>, metrics: Arc<Metrics>) {
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    let mut last_error = String::new();
    loop {
        tick.tick().await;
        match tls.reload() {
            Ok(true) => tracing::info!("node certificate reloaded; new Raft connections use it"),
            Ok(false) => last_error.clear(),
            Err(e) if e.to_string() != last_error => {
                last_error = e.to_string();
                tracing::error!(error = %e, "node certificate reload failed; the running one stays in service");
            }
            Err(_) => {}
        }
        for (cert, file, not_after) in tls.expiries() {
            metrics.certificate(cert, &file, not_after);
        }
    }
}

/// The node's own listeners (pools add TCP ones).
#[derive(Clone, Copy, Debug)]
struct Fixed {
    http: SocketAddr,
    https: Option<SocketAddr>,
    /// The IPv6 address the HTTP and HTTPS listeners also bind, on the same ports.
    v6: Option<IpAddr>,
}

impl Fixed {
    /// The listeners to serve. An IPv6 companion takes its IPv4 listener's port; with port 0
    /// that is known only once the IPv4 one is bound (`bound`), so it may be missing at first.
    fn wanted(
        &self,
        tcp_ports: impl Iterator<Item = u16>,
        bound: impl Fn(&ListenerKind) -> Option<u16>,
    ) -> Vec<(SocketAddr, ListenerKind)> {
        let mut wanted = vec![(self.http, ListenerKind::Http)];
        wanted.extend(self.https.map(|a| (a, ListenerKind::Https)));
        if let Some(ip6) = self.v6 {
            let companions: Vec<_> = wanted
                .iter()
                .filter_map(|(a, kind)| {
                    let port = if a.port() == 0 { bound(kind)? } else { a.port() };
                    Some((SocketAddr::new(ip6, port), kind.clone()))
                })
                .collect();
            wanted.extend(companions);
        }
        wanted.extend(tcp_ports.map(|port| (SocketAddr::new(self.http.ip(), port), ListenerKind::Tcp(port))));
        wanted
    }

    /// How many listeners `wanted` has when every IPv6 companion is known.
    fn complete(&self) -> usize {
        let own = 1 + usize::from(self.https.is_some());
        own * (1 + usize::from(self.v6.is_some()))
    }
}

/// Rebuilds the combined health view, the routing table and the listener set whenever
/// intent, local observations or peers' observations change.
fn spawn_reconciler(
    node: Arc<NodeShared>,
    dp: Arc<DataPlane>,
    fixed: Fixed,
    ctx: NodeCtx,
    mut local_rx: watch::Receiver<Arc<HealthView>>,
    combined_tx: watch::Sender<Arc<HealthView>>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut state_rx = node.raft.subscribe();
        let mut members_rx = node
            .gossip
            .as_ref()
            .map(|g| g.members.clone())
            .unwrap_or_else(|| watch::channel(Arc::new(Members::default())).1);
        let mut shutdown = node.shutdown.clone();
        let started = Instant::now();
        let mut members_open = node.gossip.is_some();
        let mut raft_rx = node.raft.metrics();
        let mut raft_open = true;
        loop {
            let state = state_rx.borrow_and_update().clone();
            let local = local_rx.borrow_and_update().clone();
            let members = members_rx.borrow_and_update().clone();
            let peers: Vec<PeerObs> = members.live().filter(|m| m.name != node.id).map(|m| m.obs.clone()).collect();
            let prev = combined_tx.borrow().clone();
            let combined = Arc::new(combine::combine(&state, &local, &peers, &prev));
            update_readiness(&node, &state, &combined, started).await;
            combined_tx.send_replace(combined.clone());
            rebuild(&node, &dp, &state, &combined, &ctx, fixed);
            tokio::select! {
                _ = shutdown.wait() => return,
                r = state_rx.changed() => if r.is_err() { return },
                r = local_rx.changed() => if r.is_err() { return },
                r = members_rx.changed(), if members_open => members_open = r.is_ok(),
                // Readiness waits on Raft (a leader, the log applied) and on time.
                r = raft_rx.changed(), if raft_open && !node.ready.load(Ordering::Relaxed) => raft_open = r.is_ok(),
                _ = tokio::time::sleep(Duration::from_secs(1)), if !node.ready.load(Ordering::Relaxed) => {}
            }
        }
    })
}

/// A node is ready once it follows a leader with the log applied, its config sources are in,
/// and every actively checked backend has a verdict (its own or a peer's), or after a grace
/// period; until then routing has nothing "assumed up" to offer anyway.
async fn update_readiness(node: &NodeShared, state: &State, view: &HealthView, started: Instant) {
    if node.ready.load(Ordering::Relaxed) {
        return;
    }
    let unknown = state
        .pools
        .values()
        .filter(|p| p.spec.check().is_active())
        .flat_map(|p| p.backends.values().map(move |b| (p.name.clone(), b.addr)))
        .filter(|id: &BackendId| view.verdicts.get(id).copied().unwrap_or_default() == Verdict::Unknown)
        .count();
    let pending = node.sources_pending.load(Ordering::Relaxed);
    // Before a leader is known and its log applied, the state may lack pools it is about to get.
    let raft = node.raft.status().await;
    let caught_up = raft.leader.is_some() && raft.applied >= raft.committed;
    if (unknown == 0 && pending == 0 && caught_up) || started.elapsed() > Duration::from_secs(10) {
        node.ready.store(true, Ordering::Relaxed);
        if let Some(g) = &node.gossip {
            g.set("ready", Some("1".into())).await;
        }
        tracing::info!(node = %node.id, unknown, pending, "node ready");
    }
}

fn rebuild(node: &NodeShared, dp: &DataPlane, state: &State, health: &HealthView, ctx: &NodeCtx, fixed: Fixed) {
    let prev = node.table.load_full();
    let mut next = reconcile::build(state, health, ctx, &prev, &node.metrics);
    next.starting = !node.ready.load(Ordering::Relaxed);
    for gone in prev.pools.iter().filter(|p| next.pool(&p.name).is_none()) {
        gone.shared.values().for_each(|s| s.pool.clear());
        node.metrics.forget_pool(&gone.name);
    }
    for pool in &next.pools {
        let was = prev.pool(&pool.name).is_some_and(|p| p.fail_open);
        match (was, pool.fail_open) {
            (false, true) => {
                tracing::warn!(pool = %pool.name, routable = pool.routable().len(), "pool fails open: too few healthy backends, routing to all of them")
            }
            (true, false) => tracing::info!(pool = %pool.name, "pool no longer fails open"),
            _ => {}
        }
    }
    publish_backend_gauges(node, &next);
    node.metrics.table_rebuilds.inc();
    node.metrics.config_version.set(state.version as i64);
    let tcp_ports: Vec<u16> = next.tcp.keys().copied().collect();
    node.table.store(Arc::new(next));
    // Queued requests pick again from the new table (backends may have come or gone).
    node.table.load().pools.iter().for_each(|p| p.queue.rebuilt());
    // Twice at most: IPv6 companions of port-0 listeners learn their port from the first pass.
    for _ in 0..2 {
        let wanted = fixed.wanted(tcp_ports.iter().copied(), |kind| node.bound_port(kind));
        for (kind, bound) in dp.set_listeners(&wanted) {
            let slot = match kind {
                _ if bound.ip() != fixed.http.ip() => continue,
                ListenerKind::Http => &node.http_addr,
                ListenerKind::Https => &node.https_addr,
                ListenerKind::Tcp(_) => continue,
            };
            *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(bound);
        }
        if wanted.len() >= fixed.complete() + tcp_ports.len() {
            break;
        }
    }
}

fn publish_backend_gauges(node: &NodeShared, table: &Table) {
    node.metrics.backend_up.reset();
    for pool in &table.pools {
        for addr in pool.shared.keys() {
            let up = pool.routable().iter().any(|b| b.addr == *addr);
            node.metrics.backend_up.with_label_values(&[pool.name.as_str(), &addr.to_string()]).set(i64::from(up));
        }
        node.metrics.pool_fail_open.with_label_values(&[pool.name.as_str()]).set(i64::from(pool.fail_open));
    }
}

/// Keeps this node's gossip keys in step with its local observations (at most every 200 ms).
async fn publish_observations(gossip: Arc<Gossip>, mut local: watch::Receiver<Arc<HealthView>>, node: Arc<NodeShared>) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        let view = local.borrow_and_update().clone();
        gossip.publish(&view, &active_per_backend(&node.table.load())).await;
        tokio::select! {
            r = local.changed() => if r.is_err() { return },
            _ = tick.tick() => {}
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Work in flight on this node per backend (gossiped so a drain can wait for zero).
pub fn active_per_backend(table: &Table) -> HashMap<BackendId, Counts> {
    table
        .pools
        .iter()
        .flat_map(|p| p.shared.iter().map(move |(addr, s)| ((p.name.clone(), *addr), s.counts())))
        .filter(|(_, c)| *c != Counts::default())
        .collect()
}

async fn wait_first_table(node: &NodeShared) {
    for _ in 0..200 {
        // The listeners are bound right after the table is stored.
        if node.table.load().generation > 0 && node.http_addr().is_some() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::gossip::Member;

    fn member(name: &str, raft_id: u64, live: bool) -> (String, Member) {
        (name.to_string(), Member { name: name.into(), raft_id, live, ..Member::default() })
    }

    #[test]
    fn live_voters_counts_voters_gossip_sees_alive_and_this_node() {
        let members = Members { nodes: [member("a", 1, true), member("b", 2, false), member("c", 3, true)].into() };
        let voters = [1, 2, 3].into();
        assert_eq!(live_voters(&voters, &members, 1), 2, "b is dead");
        assert_eq!(live_voters(&voters, &Members::default(), 2), 1, "alone: itself");
        assert_eq!(live_voters(&[1, 3].into(), &members, 4), 2, "a learner that sees both voters");
    }
}
