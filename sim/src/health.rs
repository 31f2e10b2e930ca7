//! One node's health: a simulated driver of shoal's own health manager core
//! (`health::engine::Core`), as `health/mod.rs` drives it in the node. It feeds the core the
//! node's events (desired state with gossip's live set, ticks, probe results) and carries out
//! its commands in the simulated world: a prober is a due time, and its check reads the
//! backends' true health instead of a socket. Which node probes which backend, restarts,
//! hysteresis and what is published are therefore the core's decisions, not a copy of them.
//! The routing view is the real `health::combine::combine` over the published view and the
//! observations of the peers gossip shows live, as the node's reconciler computes it.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use shoal_node::health::combine::{PeerObs, combine};
use shoal_node::health::engine::{Command, Core, Event};
use shoal_node::health::probe::ProbeError;
use shoal_node::health::{BackendId, HealthView, Verdict};
use shoal_proto::State;
use tokio::time::Instant;

/// How many live nodes probe each backend (shoal's `--probe-replicas` default).
pub const PROBE_REPLICAS: usize = 2;

/// What a failed check reports (any failure counts the same to the core).
const SICK: ProbeError = ProbeError::Status(503);

/// A running prober (the node's probe task): it checks at `next`, then every `interval`.
struct Prober {
    interval: Duration,
    next: Instant,
}

/// A node's health manager (the core and what its commands started) and its routing view.
pub struct NodeHealth {
    core: Core,
    probers: BTreeMap<BackendId, Prober>,
    /// The last view the core published (what the node gossips and combines).
    published: Arc<HealthView>,
    combined: HealthView,
}

impl NodeHealth {
    /// The health manager of node `me`.
    pub fn new(me: &str) -> NodeHealth {
        NodeHealth {
            core: Core::new(me.to_string(), PROBE_REPLICAS),
            probers: BTreeMap::new(),
            published: Arc::default(),
            combined: HealthView::default(),
        }
    }

    /// The driver's desired-state event: desired state with gossip's live set (the node feeds
    /// it on every state or membership update, changed or not), then its periodic tick.
    /// Returns what the driver did, for the trace.
    pub fn sync(&mut self, state: Arc<State>, live: Vec<String>, now: Instant) -> Vec<String> {
        let mut done = self.step(Event::Desired { state, live: Arc::new(live) }, now);
        done.extend(self.step(Event::Tick, now));
        done
    }

    /// Runs the probes that are due against the true health; returns the verdicts that changed.
    pub fn probe(&mut self, now: Instant, up: impl Fn(SocketAddr) -> bool) -> Vec<(BackendId, Verdict)> {
        let due: Vec<BackendId> =
            self.probers.iter().filter(|(_, p)| p.next <= now).map(|(id, _)| id.clone()).collect();
        let mut changed = Vec::new();
        for id in due {
            if let Some(p) = self.probers.get_mut(&id) {
                p.next = now + p.interval;
            }
            let before = self.verdict(&id);
            let result = if up(id.1) { Ok(()) } else { Err(SICK) };
            self.step(Event::Probe { id: id.clone(), result }, now);
            let after = self.verdict(&id);
            if after != before {
                changed.push((id, after));
            }
        }
        changed
    }

    /// What this node gossips: its published verdicts (`Unknown` is never gossiped) and
    /// heartbeats, as `Gossip::publish` writes them and peers parse them.
    pub fn published(&self, me: &str) -> PeerObs {
        let verdicts = self.published.verdicts.iter().filter(|(_, v)| **v != Verdict::Unknown);
        PeerObs {
            node: me.to_string(),
            verdicts: verdicts.map(|(id, v)| (id.clone(), *v)).collect(),
            heard: self.published.heard.clone(),
        }
    }

    /// Recomputes the routing view from desired state, the published view and the live
    /// peers' observations; returns whether the verdicts changed.
    pub fn combine(&mut self, state: &State, peers: &[PeerObs]) -> bool {
        let next = combine(state, &self.published, peers, &self.combined);
        let changed = next.verdicts != self.combined.verdicts;
        self.combined = next;
        changed
    }

    /// The routing view's verdicts.
    pub fn routing(&self) -> &HashMap<BackendId, Verdict> {
        &self.combined.verdicts
    }

    /// This node's own verdict of `id` (`Unknown`: it maintains none).
    fn verdict(&self, id: &BackendId) -> Verdict {
        self.core.view().verdicts.get(id).copied().unwrap_or_default()
    }

    /// Feeds `event` to the core and carries out its commands, as the node's driver does.
    /// The core emits them in no fixed order (it keeps hash maps), but every stop precedes
    /// every start and the driver's state here is ordered, so the outcome is deterministic;
    /// the returned trace lines are sorted for the same reason.
    fn step(&mut self, event: Event, now: Instant) -> Vec<String> {
        let mut done: Vec<String> =
            self.core.handle(event, now).into_iter().filter_map(|c| self.execute(c, now)).collect();
        done.sort();
        done
    }

    /// Carries out one command; returns a trace line for those that change what runs.
    fn execute(&mut self, command: Command, now: Instant) -> Option<String> {
        match command {
            Command::StartProbe { id, spec } => {
                // A new prober checks at once (`probe_loop`), then every interval.
                let interval = Duration::from_millis(spec.health.interval_ms.max(1));
                let line = format!("start prober {}/{}", id.0, id.1);
                self.probers.insert(id, Prober { interval, next: now });
                Some(line)
            }
            Command::StopProbe { id } => {
                self.probers.remove(&id);
                Some(format!("stop prober {}/{}", id.0, id.1))
            }
            // No heartbeat backends are simulated: a socket would hear nothing, so none is
            // kept (the world's pools are actively checked anyway).
            Command::StartHeartbeat { pool, port, .. } => Some(format!("start heartbeat socket {pool} :{port}")),
            Command::StopHeartbeat { pool } => Some(format!("stop heartbeat socket {pool}")),
            Command::ConfigureHeartbeat { .. } => None,
            // The simulation reports no passive failures, and keeps no metrics.
            Command::CountEjection { .. } => None,
            Command::Publish(view) => {
                self.published = view;
                None
            }
        }
    }
}
