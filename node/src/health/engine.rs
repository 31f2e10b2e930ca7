//! The health manager's decisions, without sockets or tasks: events in (desired state and
//! membership, probe results, heartbeat events, the data plane's reports, ticks), commands out
//! (start or stop a prober or a heartbeat socket, count an ejection, publish the view). The
//! driver in `health/mod.rs` owns the tasks and feeds it; `now` is passed in, so every decision
//! (sharding, restarts on a changed spec, hysteresis, ejections and what is published) is
//! testable without a runtime.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use shoal_proto::proxy::Version as ProxyVersion;
use shoal_proto::{CheckKind, HealthSpec, Pool, State};
use tokio::time::Instant;

use super::heartbeat::{HbEvent, PoolHbEvent, TrackerConfig};
use super::probe::ProbeError;
use super::{BackendId, EJECTION, HealthView, Heard, Hysteresis, Report, Verdict, shard};

/// What a prober checks. A prober whose spec changes is restarted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeSpec {
    pub kind: CheckKind,
    pub health: HealthSpec,
    /// `Some` when the pool speaks TLS to its backends, holding the name to verify (`None`
    /// inside: the backend's IP).
    pub tls: Option<Option<String>>,
    /// The PROXY protocol version the pool sends, so probes start with a LOCAL header.
    pub proxy: Option<ProxyVersion>,
}

impl ProbeSpec {
    fn of(pool: &Pool) -> ProbeSpec {
        ProbeSpec {
            kind: pool.spec.check(),
            health: pool.spec.health.clone(),
            tls: pool.spec.backend_tls.then(|| pool.spec.backend_tls_name.clone()),
            proxy: pool.spec.send_proxy,
        }
    }
}

/// What the core is told.
#[derive(Debug)]
pub enum Event {
    /// Desired state or live membership changed; both decide which probers run here, so they
    /// come together (`live` empty: a single node, which probes everything).
    Desired { state: Arc<State>, live: Arc<Vec<String>> },
    /// One check of a backend finished.
    Probe { id: BackendId, result: Result<(), ProbeError> },
    /// A pool's heartbeat tracker observed a change.
    Heartbeat(PoolHbEvent),
    /// The driver could not open the heartbeat socket `StartHeartbeat` asked for; the next
    /// desired-state change tries again.
    HeartbeatFailed { pool: String },
    /// From the data plane.
    Report(Report),
    /// Time passed (ejections expire).
    Tick,
}

/// What the driver does, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// Probe `id` now and every `health.interval_ms`, replacing any prober it has.
    StartProbe {
        id: BackendId,
        spec: ProbeSpec,
    },
    StopProbe {
        id: BackendId,
    },
    /// Bind the pool's UDP heartbeat port on the listen IP and track it with `config`.
    StartHeartbeat {
        pool: String,
        port: u16,
        config: TrackerConfig,
    },
    /// Hand a running heartbeat socket a changed configuration.
    ConfigureHeartbeat {
        pool: String,
        config: TrackerConfig,
    },
    StopHeartbeat {
        pool: String,
    },
    /// A passive failure ejected a backend that was not ejected yet (`shoal_ejections_total`).
    CountEjection {
        pool: String,
    },
    /// This node's observations changed.
    Publish(Arc<HealthView>),
}

/// A heartbeat socket the core asked for.
#[derive(Debug)]
struct HbSocket {
    port: u16,
    config: TrackerConfig,
}

/// The manager's state: what runs, what was observed, what was published.
#[derive(Debug)]
pub struct Core {
    me: String,
    probe_replicas: usize,
    view: HealthView,
    published: Arc<HealthView>,
    hysteresis: HashMap<BackendId, Hysteresis>,
    ejected_until: HashMap<BackendId, Instant>,
    probers: HashMap<BackendId, ProbeSpec>,
    heartbeats: HashMap<String, HbSocket>,
    /// Self-registered backends heard of (kept while their pool allows self-registration).
    dynamic: HashSet<BackendId>,
}

impl Core {
    /// A core for node `me`, with `probe_replicas` probers per actively checked backend.
    pub fn new(me: String, probe_replicas: usize) -> Core {
        Core {
            me,
            probe_replicas,
            view: HealthView::default(),
            published: Arc::new(HealthView::default()),
            hysteresis: HashMap::new(),
            ejected_until: HashMap::new(),
            probers: HashMap::new(),
            heartbeats: HashMap::new(),
            dynamic: HashSet::new(),
        }
    }

    /// This node's current observations (published or about to be).
    pub fn view(&self) -> &HealthView {
        &self.view
    }

    /// Applies one event; a changed view ends the commands with a `Publish`.
    pub fn handle(&mut self, event: Event, now: Instant) -> Vec<Command> {
        let mut out = Vec::new();
        match event {
            Event::Desired { state, live } => self.sync(&state, &live, &mut out),
            Event::Probe { id, result } => self.on_probe(id, result),
            Event::Heartbeat(e) => self.on_heartbeat(e),
            Event::HeartbeatFailed { pool } => {
                self.heartbeats.remove(&pool);
            }
            Event::Report(r) => self.on_report(r, now, &mut out),
            Event::Tick => self.expire(now),
        }
        if *self.published != self.view {
            self.published = Arc::new(self.view.clone());
            out.push(Command::Publish(self.published.clone()));
        }
        out
    }

    /// Starts, restarts and stops probers and heartbeat sockets to match desired state.
    fn sync(&mut self, state: &State, live: &[String], out: &mut Vec<Command>) {
        let mut wanted: HashMap<BackendId, ProbeSpec> = HashMap::new();
        for pool in state.pools.values().filter(|p| p.spec.check().is_active()) {
            for b in pool.backends.values() {
                let id = (pool.name.clone(), b.addr);
                if shard::assigned(&self.me, live, &id, self.probe_replicas) {
                    wanted.insert(id, ProbeSpec::of(pool));
                }
            }
        }
        self.sync_probers(wanted, out);
        self.sync_heartbeats(state, out);
        self.forget_removed(state);
    }

    fn sync_probers(&mut self, mut wanted: HashMap<BackendId, ProbeSpec>, out: &mut Vec<Command>) {
        let mut stopped = Vec::new();
        self.probers.retain(|id, spec| {
            let keep = wanted.get(id) == Some(spec);
            if keep {
                wanted.remove(id);
            } else {
                stopped.push(id.clone());
            }
            keep
        });
        // A verdict this node no longer maintains must not linger in its gossip.
        for id in stopped {
            self.view.verdicts.remove(&id);
            self.hysteresis.remove(&id);
            out.push(Command::StopProbe { id });
        }
        for (id, spec) in wanted {
            self.probers.insert(id.clone(), spec.clone());
            out.push(Command::StartProbe { id, spec });
        }
    }

    fn sync_heartbeats(&mut self, state: &State, out: &mut Vec<Command>) {
        let pools: HashMap<&str, &Pool> = state
            .pools
            .values()
            .filter(|p| p.spec.check() == CheckKind::Heartbeat)
            .map(|p| (p.name.as_str(), p))
            .collect();
        // A pool that left, stopped heartbeating or moved port gives up its socket.
        self.heartbeats.retain(|name, s| {
            let keep = pools.get(name.as_str()).and_then(|p| p.spec.health.heartbeat_port) == Some(s.port);
            if !keep {
                out.push(Command::StopHeartbeat { pool: name.clone() });
            }
            keep
        });
        for (name, pool) in pools {
            let config = tracker_config(pool);
            if let Some(s) = self.heartbeats.get_mut(name) {
                if s.config != config {
                    s.config = config.clone();
                    warn_if_unauthenticated(pool);
                    out.push(Command::ConfigureHeartbeat { pool: name.to_string(), config });
                }
                continue;
            }
            let Some(port) = pool.spec.health.heartbeat_port else { continue };
            warn_if_unauthenticated(pool);
            self.heartbeats.insert(name.to_string(), HbSocket { port, config: config.clone() });
            out.push(Command::StartHeartbeat { pool: name.to_string(), port, config });
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

    fn on_probe(&mut self, id: BackendId, result: Result<(), ProbeError>) {
        // A stopped prober's last result may still arrive: it no longer counts.
        let Some(spec) = self.probers.get(&id) else { return };
        let (rise, fall) = (spec.health.rise, spec.health.fall);
        if let Err(reason) = &result {
            self.view.reasons.insert(id.clone(), reason.to_string());
        }
        let h = self.hysteresis.entry(id.clone()).or_default();
        if let Some(verdict) = h.record(result.is_ok(), rise, fall) {
            log_verdict(&id, verdict, self.view.reasons.get(&id));
            self.view.verdicts.insert(id.clone(), verdict);
        }
        if result.is_ok() {
            self.view.reasons.remove(&id);
        }
    }

    fn on_heartbeat(&mut self, e: PoolHbEvent) {
        let tcp = match &e.event {
            HbEvent::Up { tcp, .. }
            | HbEvent::Down { tcp }
            | HbEvent::Registered { tcp, .. }
            | HbEvent::Forgotten { tcp } => *tcp,
        };
        let id = (e.pool, tcp);
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

    fn on_report(&mut self, r: Report, now: Instant, out: &mut Vec<Command>) {
        match r {
            Report::PassiveFailure { pool, addr, reason } => {
                let id = (pool, addr);
                if self.eject(id.clone(), now + EJECTION, &reason) {
                    tracing::warn!(pool = %id.0, backend = %id.1, %reason, "backend ejected after a passive failure");
                    out.push(Command::CountEjection { pool: id.0 });
                }
            }
            Report::Outlier { pool, addr, reason, duration } => {
                let id = (pool, addr);
                self.eject(id.clone(), now + duration, &reason);
                tracing::warn!(pool = %id.0, backend = %id.1, %reason, ?duration, "backend ejected as an outlier");
            }
        }
    }

    /// Keeps `id` out of rotation until at least `until`; true when it was not ejected yet.
    fn eject(&mut self, id: BackendId, until: Instant, reason: &str) -> bool {
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

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_proto::{BackendSpec, Command as Write, PoolSpec, Protocol, apply};
    use std::net::SocketAddr;

    fn addr(i: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, i], 80))
    }

    fn id(pool: &str, i: u8) -> BackendId {
        (pool.to_string(), addr(i))
    }

    fn put(st: &mut State, write: Write) {
        apply(st, &write).expect("valid write");
    }

    /// `web` (HTTP checks) with backends 1..=n, `plain` (no checks) with backend 1, and `hb`
    /// (heartbeats on port 5000) with backend 1 sending from port 81.
    fn state(n: u8) -> State {
        let mut st = State::default();
        put(
            &mut st,
            Write::PutPool { name: "web".into(), spec: PoolSpec { pattern: Some("/".into()), ..PoolSpec::default() } },
        );
        for i in 1..=n {
            put(&mut st, Write::PutBackend { pool: "web".into(), addr: addr(i), spec: BackendSpec::default() });
        }
        let mut plain = PoolSpec { pattern: Some("/plain/".into()), ..PoolSpec::default() };
        plain.health.check = Some(CheckKind::None);
        put(&mut st, Write::PutPool { name: "plain".into(), spec: plain });
        put(&mut st, Write::PutBackend { pool: "plain".into(), addr: addr(1), spec: BackendSpec::default() });
        let mut hb = PoolSpec { protocol: Protocol::Tcp, listen: Some(3001), ..PoolSpec::default() };
        hb.health.heartbeat_port = Some(5000);
        hb.health.heartbeat_secret = Some("k".into());
        put(&mut st, Write::PutPool { name: "hb".into(), spec: hb });
        let heartbeat_addr = Some(SocketAddr::from(([10, 0, 0, 1], 81)));
        put(
            &mut st,
            Write::PutBackend {
                pool: "hb".into(),
                addr: addr(1),
                spec: BackendSpec { heartbeat_addr, ..BackendSpec::default() },
            },
        );
        st
    }

    fn desired(st: &State, live: &[&str]) -> Event {
        let live = live.iter().map(|s| s.to_string()).collect();
        Event::Desired { state: Arc::new(st.clone()), live: Arc::new(live) }
    }

    fn started(commands: &[Command]) -> Vec<BackendId> {
        let mut ids: Vec<BackendId> = commands
            .iter()
            .filter_map(|c| match c {
                Command::StartProbe { id, .. } => Some(id.clone()),
                _ => None,
            })
            .collect();
        ids.sort();
        ids
    }

    fn stopped(commands: &[Command]) -> Vec<BackendId> {
        let mut ids: Vec<BackendId> = commands
            .iter()
            .filter_map(|c| match c {
                Command::StopProbe { id } => Some(id.clone()),
                _ => None,
            })
            .collect();
        ids.sort();
        ids
    }

    fn published(commands: &[Command]) -> Option<&HealthView> {
        commands.iter().find_map(|c| match c {
            Command::Publish(view) => Some(view.as_ref()),
            _ => None,
        })
    }

    fn probe(core: &mut Core, id: &BackendId, result: Result<(), ProbeError>) -> Vec<Command> {
        core.handle(Event::Probe { id: id.clone(), result }, Instant::now())
    }

    /// A core that probes everything in `state(n)` and has started its heartbeat socket.
    fn running(n: u8) -> Core {
        let mut core = Core::new("a".into(), 2);
        core.handle(desired(&state(n), &[]), Instant::now());
        core
    }

    #[test]
    fn a_single_node_probes_every_actively_checked_backend() {
        let mut core = Core::new("a".into(), 2);
        let out = core.handle(desired(&state(3), &[]), Instant::now());
        assert_eq!(started(&out), vec![id("web", 1), id("web", 2), id("web", 3)], "no prober for plain or hb");
        let spec = out.iter().find_map(|c| match c {
            Command::StartProbe { spec, .. } => Some(spec.clone()),
            _ => None,
        });
        let web = &state(3).pools["web"].spec;
        let want = ProbeSpec { kind: CheckKind::Http, health: web.health.clone(), tls: None, proxy: None };
        assert_eq!(spec, Some(want));
        assert!(out.contains(&Command::StartHeartbeat {
            pool: "hb".into(),
            port: 5000,
            config: tracker_config(&state(3).pools["hb"]),
        }));
        assert!(published(&out).is_none(), "nothing observed yet");
    }

    #[test]
    fn probers_are_sharded_by_rendezvous() {
        let live = ["a", "b", "c"];
        let names: Vec<String> = live.iter().map(|s| s.to_string()).collect();
        let st = state(30);
        let mut core = Core::new("a".into(), 1);
        let mine = started(&core.handle(desired(&st, &live), Instant::now()));
        let want: Vec<BackendId> =
            (1..=30).map(|i| id("web", i)).filter(|b| shard::assigned("a", &names, b, 1)).collect();
        assert_eq!(mine, want);
        assert!(!mine.is_empty() && mine.len() < 30, "a third of them, give or take: {}", mine.len());
    }

    #[test]
    fn unchanged_desired_state_changes_nothing() {
        let mut core = running(2);
        assert_eq!(core.handle(desired(&state(2), &[]), Instant::now()), vec![]);
        assert_eq!(core.handle(Event::Tick, Instant::now()), vec![], "no change, no publish");
    }

    #[test]
    fn a_changed_check_restarts_and_a_removed_backend_stops() {
        let mut core = running(2);
        let mut st = state(2);
        let web = &mut st.pools.get_mut("web").expect("web").spec;
        web.health.interval_ms = 500;
        let out = core.handle(desired(&st, &[]), Instant::now());
        assert_eq!(stopped(&out), vec![id("web", 1), id("web", 2)]);
        assert_eq!(started(&out), vec![id("web", 1), id("web", 2)]);
        let restart = out.iter().position(|c| matches!(c, Command::StartProbe { .. }));
        assert!(out.iter().position(|c| matches!(c, Command::StopProbe { .. })) < restart, "stop before start");

        probe(&mut core, &id("web", 2), Ok(()));
        put(&mut st, Write::DeleteBackend { pool: "web".into(), addr: addr(2) });
        let out = core.handle(desired(&st, &[]), Instant::now());
        assert_eq!(stopped(&out), vec![id("web", 2)]);
        assert_eq!(started(&out), vec![]);
        assert_eq!(published(&out).map(|v| v.verdicts.len()), Some(0), "its verdict goes with it");
    }

    #[test]
    fn a_backend_handed_to_another_node_leaves_the_published_view() {
        let names: Vec<String> = ["a", "b"].iter().map(|s| s.to_string()).collect();
        // A backend that `b` probes when both are live (k = 1).
        let theirs = (1..=20).map(|i| id("web", i)).find(|b| !shard::assigned("a", &names, b, 1)).expect("one");
        let mut core = Core::new("a".into(), 1);
        core.handle(desired(&state(20), &["a"]), Instant::now());
        let out = probe(&mut core, &theirs, Err(ProbeError::Status(503)));
        assert_eq!(published(&out).map(|v| v.verdicts[&theirs]), Some(Verdict::Down));
        let out = core.handle(desired(&state(20), &["a", "b"]), Instant::now());
        let gone = stopped(&out);
        assert!(gone.contains(&theirs) && gone.iter().all(|b| !shard::assigned("a", &names, b, 1)), "{gone:?}");
        assert_eq!(started(&out), vec![]);
        let view = published(&out).expect("published");
        assert!(!view.verdicts.contains_key(&theirs), "only the verdicts this node maintains are gossiped");
        assert_eq!(view.reasons.get(&theirs).map(String::as_str), Some("status 503"), "the reason stays for operators");
        assert_eq!(probe(&mut core, &theirs, Ok(())), vec![], "a stopped prober's late result is ignored");
    }

    #[test]
    fn verdicts_follow_hysteresis_and_reasons_follow_results() {
        let mut core = running(1);
        let web = id("web", 1);
        let out = probe(&mut core, &web, Err(ProbeError::Timeout(1000)));
        let view = published(&out).expect("first result decides");
        assert_eq!(view.verdicts[&web], Verdict::Down);
        assert_eq!(view.reasons[&web], "no answer within 1000 ms");
        // rise = 2: one success clears the reason but not the verdict.
        let out = probe(&mut core, &web, Ok(()));
        let view = published(&out).expect("reason cleared");
        assert_eq!((view.verdicts[&web], view.reasons.get(&web)), (Verdict::Down, None));
        let out = probe(&mut core, &web, Ok(()));
        assert_eq!(published(&out).map(|v| v.verdicts[&web]), Some(Verdict::Up));
        // fall = 3: two failures only change the reason.
        probe(&mut core, &web, Err(ProbeError::Status(500)));
        probe(&mut core, &web, Err(ProbeError::Status(500)));
        assert_eq!(core.view().verdicts[&web], Verdict::Up);
        probe(&mut core, &web, Err(ProbeError::Status(500)));
        assert_eq!(core.view().verdicts[&web], Verdict::Down);
    }

    #[test]
    fn heartbeat_sockets_follow_the_pool() {
        let mut core = running(1);
        let mut st = state(1);
        // A new configured backend reconfigures the socket in place.
        let heartbeat_addr = Some(SocketAddr::from(([10, 0, 0, 2], 81)));
        put(
            &mut st,
            Write::PutBackend {
                pool: "hb".into(),
                addr: addr(2),
                spec: BackendSpec { heartbeat_addr, ..BackendSpec::default() },
            },
        );
        let out = core.handle(desired(&st, &[]), Instant::now());
        assert_eq!(
            out,
            vec![Command::ConfigureHeartbeat { pool: "hb".into(), config: tracker_config(&st.pools["hb"]) }]
        );
        // A new port replaces it; a failed bind is retried at the next change.
        st.pools.get_mut("hb").expect("hb").spec.health.heartbeat_port = Some(5001);
        let out = core.handle(desired(&st, &[]), Instant::now());
        let config = tracker_config(&st.pools["hb"]);
        let start = Command::StartHeartbeat { pool: "hb".into(), port: 5001, config };
        assert_eq!(out, vec![Command::StopHeartbeat { pool: "hb".into() }, start.clone()]);
        core.handle(Event::HeartbeatFailed { pool: "hb".into() }, Instant::now());
        assert_eq!(core.handle(desired(&st, &[]), Instant::now()), vec![start]);
        st.pools.remove("hb");
        assert_eq!(core.handle(desired(&st, &[]), Instant::now()), vec![Command::StopHeartbeat { pool: "hb".into() }]);
    }

    #[test]
    fn heartbeats_are_published_as_heard() {
        let mut core = running(1);
        let udp = SocketAddr::from(([10, 0, 0, 1], 81));
        let hb = |event| Event::Heartbeat(PoolHbEvent { pool: "hb".into(), event });
        let out = core.handle(hb(HbEvent::Up { tcp: addr(1), source: udp }), Instant::now());
        let view = published(&out).expect("heard");
        assert_eq!(view.heard[&id("hb", 1)], Heard { up: true, udp, dynamic: false });
        let out = core.handle(hb(HbEvent::Down { tcp: addr(1) }), Instant::now());
        let view = published(&out).expect("silent");
        assert!(!view.heard[&id("hb", 1)].up);
        assert_eq!(view.reasons[&id("hb", 1)], "no heartbeat within the timeout");
        // A backend heard of in a pool that does not accept self-registration is forgotten at
        // the next sync; in one that does, it stays.
        core.handle(hb(HbEvent::Registered { tcp: addr(7), udp }), Instant::now());
        core.handle(hb(HbEvent::Up { tcp: addr(7), source: udp }), Instant::now());
        assert!(core.view().heard[&id("hb", 7)].dynamic);
        core.handle(desired(&state(1), &[]), Instant::now());
        assert!(!core.view().heard.contains_key(&id("hb", 7)));
    }

    #[test]
    fn passive_failures_eject_for_a_while_and_are_counted_once() {
        let mut core = running(1);
        let t0 = Instant::now();
        let failure =
            || Event::Report(Report::PassiveFailure { pool: "web".into(), addr: addr(1), reason: "reset".into() });
        let out = core.handle(failure(), t0);
        assert_eq!(out[0], Command::CountEjection { pool: "web".into() });
        let view = published(&out).expect("ejected");
        assert!(view.ejected.contains(&id("web", 1)));
        assert_eq!(view.reasons[&id("web", 1)], "reset");
        let again = core.handle(failure(), t0 + Duration::from_secs(1));
        assert!(!again.contains(&Command::CountEjection { pool: "web".into() }), "already ejected");
        assert_eq!(core.handle(Event::Tick, t0 + EJECTION), vec![], "the second failure extended it");
        let out = core.handle(Event::Tick, t0 + EJECTION + Duration::from_secs(1));
        assert!(published(&out).is_some_and(|v| v.ejected.is_empty()));
    }

    #[test]
    fn outliers_eject_for_their_duration_uncounted() {
        let mut core = running(1);
        let t0 = Instant::now();
        let outlier = Report::Outlier {
            pool: "web".into(),
            addr: addr(1),
            reason: "5 consecutive 5xx".into(),
            duration: Duration::from_secs(30),
        };
        let out = core.handle(Event::Report(outlier), t0);
        assert!(matches!(out.as_slice(), [Command::Publish(v)] if v.ejected.contains(&id("web", 1))));
        assert_eq!(core.handle(Event::Tick, t0 + EJECTION), vec![]);
        assert!(core.handle(Event::Tick, t0 + Duration::from_secs(30)).len() == 1);
    }
}
