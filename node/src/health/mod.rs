//! Health: what this node observes about backends. Active probers (HTTP or TCP), heartbeat
//! sockets and passive failures reported by the data plane feed one manager task, which
//! applies rise/fall hysteresis and ejections and publishes an immutable [`HealthView`].
//!
//! The manager's decisions live in the pure [`Core`](self::engine::Core) (events in, commands out); this
//! module is its driver: it turns channel messages into events and carries out the commands
//! (spawning and aborting probers, binding heartbeat sockets, publishing the view).

pub mod combine;
pub mod engine;
pub mod heartbeat;
pub mod hysteresis;
pub mod probe;
pub mod shard;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use shoal_proto::State;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tokio::task::AbortHandle;
use tokio::time::Instant;

pub use hysteresis::{Hysteresis, Verdict};

use self::engine::{Command, Core, Event, ProbeSpec};
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;
use heartbeat::{PoolHbEvent, TrackerConfig};

/// `(pool, backend address)`.
pub type BackendId = (String, SocketAddr);

/// How long a backend stays out of rotation after a passive failure on this node.
pub const EJECTION: Duration = Duration::from_secs(5);

/// Backend health as one node sees it (the manager's output) or as the cluster sees it
/// (`combine`'s output, which routing uses).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HealthView {
    /// Active-check verdicts (local: this node's probes; combined: every backend's verdict).
    pub verdicts: HashMap<BackendId, Verdict>,
    /// Last failure reason, for operators.
    pub reasons: HashMap<BackendId, String>,
    /// Ejected on this node after passive failures.
    pub ejected: HashSet<BackendId>,
    /// Heartbeat backends this node has identified.
    pub heard: HashMap<BackendId, Heard>,
    /// Combined only: self-registered backends, pool → TCP address → UDP address.
    pub dynamic: BTreeMap<String, BTreeMap<SocketAddr, SocketAddr>>,
}

/// A heartbeat backend as this node hears it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Heard {
    /// Sent `OK` within the timeout.
    pub up: bool,
    /// Where its datagrams come from.
    pub udp: SocketAddr,
    /// Registered itself (not configured).
    pub dynamic: bool,
}

/// What the data plane tells the health manager.
#[derive(Clone, Debug)]
pub enum Report {
    /// Connect error or reset talking to a backend.
    PassiveFailure { pool: String, addr: SocketAddr, reason: String },
    /// The data plane's outlier detection ejects a backend for `duration` (already counted).
    Outlier { pool: String, addr: SocketAddr, reason: String, duration: Duration },
}

/// Sender half handed to the data plane; never blocks it.
#[derive(Clone, Debug)]
pub struct Reporter(mpsc::Sender<Report>);

impl Reporter {
    pub fn passive_failure(&self, pool: &str, addr: SocketAddr, reason: impl Into<String>) {
        let _ = self.0.try_send(Report::PassiveFailure { pool: pool.to_string(), addr, reason: reason.into() });
    }

    pub fn outlier(&self, pool: &str, addr: SocketAddr, reason: String, duration: Duration) {
        let _ = self.0.try_send(Report::Outlier { pool: pool.to_string(), addr, reason, duration });
    }

    /// A reporter whose reports go nowhere (tests).
    pub fn detached() -> Reporter {
        Reporter(mpsc::channel(1).0)
    }
}

/// Everything the manager needs.
pub struct HealthCtx {
    pub state: watch::Receiver<Arc<State>>,
    pub listen_ip: IpAddr,
    pub metrics: Arc<Metrics>,
    pub shutdown: Shutdown,
    /// This node's name, for probe sharding.
    pub me: String,
    /// Live node names (empty: a single node, which probes everything).
    pub members: watch::Receiver<Arc<Vec<String>>>,
    /// Probers per backend.
    pub probe_replicas: usize,
    /// Client TLS for probing `backend_tls` pools.
    pub backend_tls: Option<Arc<rustls::ClientConfig>>,
}

/// Starts the manager; returns the view and the data plane's reporter.
pub fn spawn(ctx: HealthCtx) -> (watch::Receiver<Arc<HealthView>>, Reporter) {
    let (view_tx, view_rx) = watch::channel(Arc::new(HealthView::default()));
    let (report_tx, report_rx) = mpsc::channel(1024);
    tokio::spawn(Driver::new(ctx, view_tx).run(report_rx));
    (view_rx, Reporter(report_tx))
}

struct ProbeResult {
    id: BackendId,
    result: Result<(), probe::ProbeError>,
}

struct HbTask {
    cfg: watch::Sender<TrackerConfig>,
    task: AbortHandle,
}

/// The manager task: the core's decisions carried out with sockets and tasks.
struct Driver {
    ctx: HealthCtx,
    core: Core,
    view_tx: watch::Sender<Arc<HealthView>>,
    probers: HashMap<BackendId, AbortHandle>,
    hb_tasks: HashMap<String, HbTask>,
    probe_tx: mpsc::Sender<ProbeResult>,
    probe_rx: mpsc::Receiver<ProbeResult>,
    hb_tx: mpsc::Sender<PoolHbEvent>,
    hb_rx: mpsc::Receiver<PoolHbEvent>,
}

impl Driver {
    fn new(ctx: HealthCtx, view_tx: watch::Sender<Arc<HealthView>>) -> Driver {
        let (probe_tx, probe_rx) = mpsc::channel(1024);
        let (hb_tx, hb_rx) = mpsc::channel(1024);
        Driver {
            core: Core::new(ctx.me.clone(), ctx.probe_replicas),
            ctx,
            view_tx,
            probers: HashMap::new(),
            hb_tasks: HashMap::new(),
            probe_tx,
            probe_rx,
            hb_tx,
            hb_rx,
        }
    }

    async fn run(mut self, mut reports: mpsc::Receiver<Report>) {
        let mut state_rx = self.ctx.state.clone();
        let mut members_rx = self.ctx.members.clone();
        // A node without gossip has a closed, never-changing membership channel.
        let mut members_open = true;
        let mut shutdown = self.ctx.shutdown.clone();
        let mut expiry = tokio::time::interval(Duration::from_millis(250));
        let state = state_rx.borrow_and_update().clone();
        self.step(self.desired(state)).await;
        loop {
            let event = tokio::select! {
                _ = shutdown.wait() => break,
                changed = state_rx.changed() => {
                    if changed.is_err() { break }
                    let state = state_rx.borrow_and_update().clone();
                    self.desired(state)
                }
                changed = members_rx.changed(), if members_open => {
                    if changed.is_err() {
                        members_open = false;
                        continue;
                    }
                    members_rx.borrow_and_update();
                    let state = state_rx.borrow().clone();
                    self.desired(state)
                }
                Some(r) = self.probe_rx.recv() => Event::Probe { id: r.id, result: r.result },
                Some(e) = self.hb_rx.recv() => Event::Heartbeat(e),
                Some(r) = reports.recv() => Event::Report(r),
                _ = expiry.tick() => Event::Tick,
            };
            self.step(event).await;
        }
        self.stop_all();
    }

    /// `state` with the latest membership (both decide placement).
    fn desired(&self, state: Arc<State>) -> Event {
        Event::Desired { state, live: self.ctx.members.borrow().clone() }
    }

    /// Feeds `event` to the core and carries out its commands, reporting failures back.
    async fn step(&mut self, event: Event) {
        let mut events = vec![event];
        while let Some(event) = events.pop() {
            for command in self.core.handle(event, Instant::now()) {
                events.extend(self.execute(command).await);
            }
        }
    }

    async fn execute(&mut self, command: Command) -> Option<Event> {
        match command {
            Command::StartProbe { id, spec } => self.start_probe(id, spec),
            Command::StopProbe { id } => {
                if let Some(task) = self.probers.remove(&id) {
                    task.abort();
                }
            }
            Command::StartHeartbeat { pool, port, config } => return self.start_heartbeat(pool, port, config).await,
            Command::ConfigureHeartbeat { pool, config } => {
                if let Some(t) = self.hb_tasks.get(&pool) {
                    t.cfg.send_replace(config);
                }
            }
            Command::StopHeartbeat { pool } => {
                if let Some(t) = self.hb_tasks.remove(&pool) {
                    t.task.abort();
                }
            }
            Command::CountEjection { pool } => {
                self.ctx.metrics.ejections.with_label_values(&[pool.as_str(), "passive"]).inc();
            }
            Command::Publish(view) => {
                self.view_tx.send_replace(view);
            }
        }
        None
    }

    fn start_probe(&mut self, id: BackendId, spec: ProbeSpec) {
        let tls = spec.tls.clone().and_then(|name| Some((self.ctx.backend_tls.clone()?, name)));
        let task = tokio::spawn(probe_loop(id.clone(), spec, tls, self.probe_tx.clone(), self.ctx.metrics.clone()));
        if let Some(old) = self.probers.insert(id, task.abort_handle()) {
            old.abort();
        }
    }

    async fn start_heartbeat(&mut self, pool: String, port: u16, config: TrackerConfig) -> Option<Event> {
        let addr = SocketAddr::new(self.ctx.listen_ip, port);
        let socket = match UdpSocket::bind(addr).await {
            Ok(socket) => socket,
            Err(e) => {
                tracing::error!(pool, port, error = %e, "cannot bind heartbeat socket");
                return Some(Event::HeartbeatFailed { pool });
            }
        };
        tracing::info!(pool, %addr, "heartbeat socket listening");
        let (cfg_tx, cfg_rx) = watch::channel(config);
        let task = tokio::spawn(heartbeat::serve(
            pool.clone(),
            socket,
            cfg_rx,
            self.hb_tx.clone(),
            self.ctx.metrics.clone(),
            self.ctx.shutdown.clone(),
        ));
        if let Some(old) = self.hb_tasks.insert(pool, HbTask { cfg: cfg_tx, task: task.abort_handle() }) {
            old.task.abort();
        }
        None
    }

    fn stop_all(&mut self) {
        self.probers.values().for_each(AbortHandle::abort);
        self.hb_tasks.values().for_each(|t| t.task.abort());
    }
}

/// Probes one backend now and then every interval until aborted.
async fn probe_loop(
    id: BackendId,
    spec: ProbeSpec,
    tls: Option<probe::ProbeTls>,
    tx: mpsc::Sender<ProbeResult>,
    metrics: Arc<Metrics>,
) {
    let interval = Duration::from_millis(spec.health.interval_ms);
    let checks = metrics.health_checks.with_label_values(&[id.0.as_str()]);
    let failures = metrics.health_check_failures.with_label_values(&[id.0.as_str()]);
    loop {
        let started = Instant::now();
        let result = probe::probe(spec.kind, id.1, &spec.health, tls.as_ref(), spec.proxy).await;
        checks.inc();
        if result.is_err() {
            failures.inc();
        }
        if tx.send(ProbeResult { id: id.clone(), result }).await.is_err() {
            return;
        }
        tokio::time::sleep_until(started + interval).await;
    }
}
