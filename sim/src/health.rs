//! One node's health, modelled on shoal's health manager: it probes the actively checked
//! backends that `health::shard::assigned` gives it (against the world's true health instead of
//! sockets), applies the real `Hysteresis`, publishes its verdicts as its gossip observations,
//! and computes the routing view with the real `health::combine::combine` from its own verdicts
//! and those of the peers its gossip shows live.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use shoal_node::health::combine::{PeerObs, combine};
use shoal_node::health::{BackendId, HealthView, Hysteresis, Verdict, shard};
use shoal_proto::{CheckKind, HealthSpec, State};
use tokio::time::Instant;

/// How many live nodes probe each backend (shoal's `--probe-replicas` default).
pub const PROBE_REPLICAS: usize = 2;

/// A running prober: its spec (a changed spec restarts it), hysteresis and next probe.
struct Prober {
    key: (CheckKind, HealthSpec),
    hysteresis: Hysteresis,
    next: Instant,
}

/// A node's probers, its own verdicts and its combined (routing) view.
#[derive(Default)]
pub struct NodeHealth {
    probers: BTreeMap<BackendId, Prober>,
    local: HealthView,
    combined: HealthView,
}

impl NodeHealth {
    /// The manager's `sync`: runs a prober for every assigned backend of `state`, stops the
    /// others and forgets their verdicts (a verdict this node no longer maintains must not
    /// linger in its gossip). A new prober probes at once.
    pub fn sync(&mut self, me: &str, state: &State, live: &[String], now: Instant) {
        let mut wanted: BTreeMap<BackendId, (CheckKind, HealthSpec)> = BTreeMap::new();
        for pool in state.pools.values() {
            let kind = pool.spec.check();
            for b in pool.backends.values() {
                let id = (pool.name.clone(), b.addr);
                if kind.is_active() && shard::assigned(me, live, &id, PROBE_REPLICAS) {
                    wanted.insert(id, (kind, pool.spec.health.clone()));
                }
            }
        }
        let local = &mut self.local;
        self.probers.retain(|id, p| {
            let keep = wanted.get(id) == Some(&p.key);
            if keep {
                wanted.remove(id);
            } else {
                local.verdicts.remove(id);
            }
            keep
        });
        for (id, key) in wanted {
            self.probers.insert(id, Prober { key, hysteresis: Hysteresis::default(), next: now });
        }
    }

    /// Runs the probes that are due against the true health; returns the verdicts that changed.
    pub fn probe(&mut self, now: Instant, up: impl Fn(SocketAddr) -> bool) -> Vec<(BackendId, Verdict)> {
        let mut changed = Vec::new();
        for (id, p) in self.probers.iter_mut().filter(|(_, p)| p.next <= now) {
            let spec = &p.key.1;
            if let Some(v) = p.hysteresis.record(up(id.1), spec.rise, spec.fall) {
                self.local.verdicts.insert(id.clone(), v);
                changed.push((id.clone(), v));
            }
            p.next = now + Duration::from_millis(spec.interval_ms.max(1));
        }
        changed
    }

    /// What this node gossips: the verdicts it maintains (`Unknown` is never published).
    pub fn published(&self, me: &str) -> PeerObs {
        let verdicts = self.local.verdicts.iter().filter(|(_, v)| **v != Verdict::Unknown);
        PeerObs {
            node: me.to_string(),
            verdicts: verdicts.map(|(id, v)| (id.clone(), *v)).collect(),
            ..PeerObs::default()
        }
    }

    /// Recomputes the routing view from desired state, this node's verdicts and its live
    /// peers' observations; returns whether the verdicts changed.
    pub fn combine(&mut self, state: &State, peers: &[PeerObs]) -> bool {
        let next = combine(state, &self.local, peers, &self.combined);
        let changed = next.verdicts != self.combined.verdicts;
        self.combined = next;
        changed
    }

    /// The routing view's verdicts.
    pub fn routing(&self) -> &std::collections::HashMap<BackendId, Verdict> {
        &self.combined.verdicts
    }
}
