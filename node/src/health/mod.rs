//! Health: what this node observes about backends. Active probers (HTTP or TCP), heartbeat
//! sockets and passive failures reported by the data plane feed one manager task, which
//! applies rise/fall hysteresis and ejections and publishes an immutable [`HealthView`].

pub mod combine;
pub mod heartbeat;
pub mod hysteresis;
pub mod probe;
pub mod shard;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use shoal_proto::proxy::Version as ProxyVersion;
use shoal_proto::{CheckKind, HealthSpec, Pool, State};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tokio::task::AbortHandle;
use tokio::time::Instant;

pub use hysteresis::{Hysteresis, Verdict};

use crate::metrics::Metrics;
use crate::shutdown::Shutdown;
use heartbeat::{HbEvent, PoolHbEvent, TrackerConfig};

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
    tokio::spawn(Manager::new(ctx, view_tx).run(report_rx));
    (view_rx, Reporter(report_tx))
}

struct ProbeResult {
    id: BackendId,
    result: Result<(), String>,
}

/// What a prober checks: kind, settings, the TLS name when the pool speaks TLS, and the PROXY
/// protocol version when the pool sends one.
type ProbeKey = (CheckKind, HealthSpec, Option<Option<String>>, Option<ProxyVersion>);

struct Prober {
    key: ProbeKey,
    task: AbortHandle,
}

struct HbTask {
    port: u16,
    cfg: watch::Sender<TrackerConfig>,
    task: AbortHandle,
}

struct Manager {
    ctx: HealthCtx,
    view_tx: watch::Sender<Arc<HealthView>>,
    view: HealthView,
    hysteresis: HashMap<BackendId, Hysteresis>,
    ejected_until: HashMap<BackendId, Instant>,
    probers: HashMap<BackendId, Prober>,
    hb_tasks: HashMap<String, HbTask>,
    probe_tx: mpsc::Sender<ProbeResult>,
    probe_rx: mpsc::Receiver<ProbeResult>,
    hb_tx: mpsc::Sender<PoolHbEvent>,
    hb_rx: mpsc::Receiver<PoolHbEvent>,
    dynamic: HashSet<BackendId>,
}

impl Manager {
    fn new(ctx: HealthCtx, view_tx: watch::Sender<Arc<HealthView>>) -> Manager {
        let (probe_tx, probe_rx) = mpsc::channel(1024);
        let (hb_tx, hb_rx) = mpsc::channel(1024);
        Manager {
            ctx,
            view_tx,
            view: HealthView::default(),
            hysteresis: HashMap::new(),
            ejected_until: HashMap::new(),
            probers: HashMap::new(),
            hb_tasks: HashMap::new(),
            probe_tx,
            probe_rx,
            hb_tx,
            hb_rx,
            dynamic: HashSet::new(),
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
        self.sync(&state).await;
        loop {
            tokio::select! {
                _ = shutdown.wait() => break,
                changed = state_rx.changed() => {
                    if changed.is_err() { break }
                    let state = state_rx.borrow_and_update().clone();
                    self.sync(&state).await;
                }
                changed = members_rx.changed(), if members_open => {
                    if changed.is_err() {
                        members_open = false;
                        continue;
                    }
                    members_rx.borrow_and_update();
                    let state = state_rx.borrow().clone();
                    self.sync(&state).await;
                }
                Some(r) = self.probe_rx.recv() => self.on_probe(r),
                Some(e) = self.hb_rx.recv() => self.on_heartbeat(e),
                Some(r) = reports.recv() => self.on_report(r),
                _ = expiry.tick() => self.expire(Instant::now()),
            }
            self.publish();
        }
        self.stop_all();
    }

    fn publish(&mut self) {
        if **self.view_tx.borrow() != self.view {
            self.view_tx.send_replace(Arc::new(self.view.clone()));
        }
    }

    /// Starts, restarts and stops probers and heartbeat sockets to match desired state.
    async fn sync(&mut self, state: &State) {
        let members = self.ctx.members.borrow().clone();
        let k = self.ctx.probe_replicas;
        let mut wanted: HashMap<BackendId, ProbeKey> = HashMap::new();
        for pool in state.pools.values() {
            let kind = pool.spec.check();
            for b in pool.backends.values() {
                let id = (pool.name.clone(), b.addr);
                if matches!(kind, CheckKind::Http | CheckKind::Tcp) && shard::assigned(&self.ctx.me, &members, &id, k) {
                    let tls = pool.spec.backend_tls.then(|| pool.spec.backend_tls_name.clone());
                    wanted.insert(id, (kind, pool.spec.health.clone(), tls, pool.spec.send_proxy));
                }
            }
        }
        self.sync_probers(wanted);
        self.sync_heartbeats(state).await;
        self.forget_removed(state);
    }

    fn sync_probers(&mut self, mut wanted: HashMap<BackendId, ProbeKey>) {
        let mut stopped = Vec::new();
        self.probers.retain(|id, p| {
            let keep = wanted.get(id) == Some(&p.key);
            if keep {
                wanted.remove(id);
            } else {
                p.task.abort();
                stopped.push(id.clone());
            }
            keep
        });
        // A verdict this node no longer maintains must not linger in its gossip.
        for id in stopped {
            self.view.verdicts.remove(&id);
            self.hysteresis.remove(&id);
        }
        for (id, key) in wanted {
            let tls = key.2.clone().and_then(|name| Some((self.ctx.backend_tls.clone()?, name)));
            let task =
                tokio::spawn(probe_loop(id.clone(), key.clone(), tls, self.probe_tx.clone(), self.ctx.metrics.clone()));
            self.probers.insert(id, Prober { key, task: task.abort_handle() });
        }
    }

    async fn sync_heartbeats(&mut self, state: &State) {
        let pools: HashMap<&str, &Pool> = state
            .pools
            .values()
            .filter(|p| p.spec.check() == CheckKind::Heartbeat)
            .map(|p| (p.name.as_str(), p))
            .collect();
        self.hb_tasks.retain(|name, t| {
            let keep = pools.get(name.as_str()).and_then(|p| p.spec.health.heartbeat_port) == Some(t.port);
            if !keep {
                t.task.abort();
            }
            keep
        });
        for (name, pool) in pools {
            let cfg = tracker_config(pool);
            if let Some(t) = self.hb_tasks.get(name) {
                if t.cfg.send_if_modified(|c| (*c != cfg).then(|| *c = cfg).is_some()) {
                    warn_if_unauthenticated(pool);
                }
                continue;
            }
            let Some(port) = pool.spec.health.heartbeat_port else { continue };
            warn_if_unauthenticated(pool);
            match UdpSocket::bind((self.ctx.listen_ip, port)).await {
                Ok(socket) => {
                    tracing::info!(pool = name, addr = %SocketAddr::new(self.ctx.listen_ip, port), "heartbeat socket listening");
                    let (cfg_tx, cfg_rx) = watch::channel(cfg);
                    let task = tokio::spawn(heartbeat::serve(
                        name.to_string(),
                        socket,
                        cfg_rx,
                        self.hb_tx.clone(),
                        self.ctx.metrics.clone(),
                        self.ctx.shutdown.clone(),
                    ));
                    self.hb_tasks.insert(name.to_string(), HbTask { port, cfg: cfg_tx, task: task.abort_handle() });
                }
                Err(e) => tracing::error!(pool = name, port, error = %e, "cannot bind heartbeat socket"),
            }
        }
    }

    /// Drops observations of pools and backends that left desired state.
    fn forget_removed(&mut self, state: &State) {
        let exists = |id: &BackendId| {
            state.pools.get(&id.0).is_some_and(|p| {
                p.backends.contains_key(&id.1.to_string()) || (p.spec.self_register && self.dynamic.contains(id))
            })
        };
        let stale: Vec<BackendId> = self
            .view
            .verdicts
            .keys()
            .chain(self.view.heard.keys())
            .chain(self.view.reasons.keys())
            .filter(|id| !exists(id))
            .cloned()
            .collect();
        for id in stale {
            self.view.verdicts.remove(&id);
            self.view.heard.remove(&id);
            self.view.reasons.remove(&id);
            self.view.ejected.remove(&id);
            self.hysteresis.remove(&id);
            self.ejected_until.remove(&id);
        }
        self.dynamic.retain(|id| state.pools.get(&id.0).is_some_and(|p| p.spec.self_register));
    }

    fn on_probe(&mut self, r: ProbeResult) {
        let Some(prober) = self.probers.get(&r.id) else { return };
        let (rise, fall) = (prober.key.1.rise, prober.key.1.fall);
        if let Err(reason) = &r.result {
            self.view.reasons.insert(r.id.clone(), reason.clone());
        }
        let h = self.hysteresis.entry(r.id.clone()).or_default();
        if let Some(verdict) = h.record(r.result.is_ok(), rise, fall) {
            log_verdict(&r.id, verdict, self.view.reasons.get(&r.id));
            self.view.verdicts.insert(r.id.clone(), verdict);
        }
        if r.result.is_ok() {
            self.view.reasons.remove(&r.id);
        }
    }

    fn on_heartbeat(&mut self, e: PoolHbEvent) {
        let id = (
            e.pool,
            match &e.event {
                HbEvent::Up { tcp, .. }
                | HbEvent::Down { tcp }
                | HbEvent::Registered { tcp, .. }
                | HbEvent::Forgotten { tcp } => *tcp,
            },
        );
        match e.event {
            HbEvent::Up { source, .. } => {
                let dynamic = self.dynamic.contains(&id);
                self.view.heard.insert(id.clone(), Heard { up: true, udp: source, dynamic });
                self.view.reasons.remove(&id);
            }
            HbEvent::Down { .. } => {
                if let Some(h) = self.view.heard.get_mut(&id) {
                    h.up = false;
                }
                self.view.reasons.insert(id, "no heartbeat within the timeout".into());
            }
            HbEvent::Registered { .. } => {
                self.dynamic.insert(id);
            }
            HbEvent::Forgotten { .. } => {
                self.dynamic.remove(&id);
                self.view.heard.remove(&id);
                self.view.reasons.remove(&id);
            }
        }
    }

    fn on_report(&mut self, r: Report) {
        match r {
            Report::PassiveFailure { pool, addr, reason } => {
                let id = (pool, addr);
                if self.eject(id.clone(), EJECTION, &reason) {
                    tracing::warn!(pool = %id.0, backend = %id.1, %reason, "backend ejected after a passive failure");
                    self.ctx.metrics.ejections.with_label_values(&[id.0.as_str(), "passive"]).inc();
                }
            }
            Report::Outlier { pool, addr, reason, duration } => {
                let id = (pool, addr);
                self.eject(id.clone(), duration, &reason);
                tracing::warn!(pool = %id.0, backend = %id.1, %reason, ?duration, "backend ejected as an outlier");
            }
        }
    }

    /// Keeps `id` out of rotation for at least `duration`; true when it was not ejected yet.
    fn eject(&mut self, id: BackendId, duration: Duration, reason: &str) -> bool {
        let until = Instant::now() + duration;
        let prev = self.ejected_until.get(&id).copied();
        self.ejected_until.insert(id.clone(), prev.map_or(until, |p| p.max(until)));
        self.view.reasons.insert(id.clone(), reason.to_string());
        self.view.ejected.insert(id);
        prev.is_none()
    }

    fn expire(&mut self, now: Instant) {
        let done: Vec<BackendId> =
            self.ejected_until.iter().filter(|(_, t)| **t <= now).map(|(id, _)| id.clone()).collect();
        for id in done {
            self.ejected_until.remove(&id);
            self.view.ejected.remove(&id);
            tracing::info!(pool = %id.0, backend = %id.1, "ejection over; backend back in rotation if healthy");
        }
    }

    fn stop_all(&mut self) {
        self.probers.values().for_each(|p| p.task.abort());
        self.hb_tasks.values().for_each(|t| t.task.abort());
    }
}

fn tracker_config(pool: &Pool) -> TrackerConfig {
    TrackerConfig {
        servers: pool.backends.values().filter_map(|b| Some((b.addr, b.spec.heartbeat_addr?))).collect(),
        self_register: pool.spec.self_register,
        max_self_registered: pool.spec.max_self_registered as usize,
        timeout: Duration::from_millis(pool.spec.health.heartbeat_timeout_ms),
        secret: pool.spec.health.heartbeat_secret.clone(),
    }
}

/// Names each pool whose heartbeats anyone who reaches its port can forge (at start and apply).
fn warn_if_unauthenticated(pool: &Pool) {
    if pool.spec.health.heartbeat_secret.is_some() {
        return;
    }
    let port = pool.spec.health.heartbeat_port.unwrap_or(0);
    if pool.spec.allow_unauthenticated_heartbeats {
        tracing::warn!(
            pool = %pool.name,
            port,
            "allow_unauthenticated_heartbeats = true: anyone who reaches this UDP port can add backends to the pool"
        );
    } else {
        tracing::warn!(
            pool = %pool.name,
            port,
            "heartbeats are unauthenticated (seed 004): anyone who reaches this UDP port can mark the configured \
             backends up; set health.heartbeat_secret"
        );
    }
}

fn log_verdict(id: &BackendId, verdict: Verdict, reason: Option<&String>) {
    match verdict {
        Verdict::Up => tracing::info!(pool = %id.0, backend = %id.1, "backend healthy"),
        Verdict::Down => {
            tracing::warn!(pool = %id.0, backend = %id.1, reason = reason.map(String::as_str).unwrap_or(""), "backend sick")
        }
        Verdict::Unknown => {}
    }
}

/// Probes one backend now and then every interval until aborted.
async fn probe_loop(
    id: BackendId,
    (kind, spec, _, proxy): ProbeKey,
    tls: Option<probe::ProbeTls>,
    tx: mpsc::Sender<ProbeResult>,
    metrics: Arc<Metrics>,
) {
    let interval = Duration::from_millis(spec.interval_ms);
    let checks = metrics.health_checks.with_label_values(&[id.0.as_str()]);
    let failures = metrics.health_check_failures.with_label_values(&[id.0.as_str()]);
    loop {
        let started = Instant::now();
        let result = probe::probe(kind, id.1, &spec, tls.as_ref(), proxy).await;
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
