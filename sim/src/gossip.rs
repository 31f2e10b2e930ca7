//! Gossip membership, modelled on chitchat as shoal runs it, over the `SimNet`'s links.
//!
//! Every round each running node bumps its heartbeat and starts an exchange with a few peers
//! (seeded choice among the nodes it knows plus the join list). An exchange is chitchat's three
//! datagrams: SYN (a → b), SYN-ACK (b → a, carrying b's table) and ACK (a → b, carrying a's),
//! each lost, delayed or cut like any message on that link. So state travels transitively, and
//! a link cut in either direction stops the exchanges that start across it. An observer counts a
//! node live while that node's heartbeat rose within [`DETECT`] (a stand-in for phi accrual).
//! What each node publishes (`raft_init`, `cluster_id`, its health verdicts) is versioned and
//! merged like chitchat's key-values, and a restart starts a new generation.
//!
//! The output is shoal's own `gossip::Members` per observer, the type `should_bootstrap`,
//! `Seen::observe` and the health combiner read in production.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use shoal_node::control::gossip::{Member, Members};
use shoal_node::control::raft::NodeId;
use tokio::time::Instant;

use crate::net::SimNet;
use crate::trace::{Trace, mix};

/// Gossip interval (shoal's default).
pub const ROUND: Duration = Duration::from_millis(200);
/// A node whose heartbeat has not risen for this long looks dead (shoal measured about 1 s
/// from `kill -9` to dead everywhere, with phi accrual at 8 and 200 ms rounds).
pub const DETECT: Duration = Duration::from_millis(1000);
/// Peers contacted per round (chitchat's live fan-out).
const FANOUT: usize = 3;

/// One node's record as gossip carries it.
#[derive(Clone, Debug)]
struct Record {
    generation: u64,
    heartbeat: u64,
    version: u64,
    member: Arc<Member>,
}

/// A record as one observer holds it.
#[derive(Clone, Debug)]
struct Known {
    rec: Record,
    /// When the observer last saw this node's heartbeat rise.
    heard_at: Instant,
}

impl Known {
    /// The observer's failure detector: live while the heartbeat keeps rising.
    fn live(&self, now: Instant) -> bool {
        now.duration_since(self.heard_at) < DETECT
    }
}

/// A running node's gossip state.
struct Node {
    name: String,
    me: Record,
    table: BTreeMap<String, Known>,
    /// Raft ids of the nodes it knows by name (to address datagrams).
    ids: BTreeMap<String, NodeId>,
    /// Live set last traced, to log changes only.
    traced: Vec<String>,
}

enum Leg {
    Syn,
    SynAck(Vec<Record>),
    Ack(Vec<Record>),
}

struct Datagram {
    from: NodeId,
    to: NodeId,
    leg: Leg,
}

/// Every node's gossip, and the datagrams in flight.
pub struct Gossip {
    seed: u64,
    net: SimNet,
    trace: Trace,
    nodes: BTreeMap<NodeId, Node>,
    inflight: BTreeMap<(Instant, u64), Datagram>,
    sent: u64,
    round: u64,
}

impl Gossip {
    pub fn new(seed: u64, net: SimNet, trace: Trace) -> Gossip {
        Gossip { seed, net, trace, nodes: BTreeMap::new(), inflight: BTreeMap::new(), sent: 0, round: 0 }
    }

    /// A node (re)starts: a new generation with only its own keys.
    pub fn start(&mut self, id: NodeId, member: Member, generation: u64) {
        let name = member.name.clone();
        let me = Record { generation, heartbeat: 0, version: 0, member: Arc::new(member) };
        let node = Node { name, me, table: BTreeMap::new(), ids: BTreeMap::new(), traced: Vec::new() };
        self.nodes.insert(id, node);
    }

    /// A node stops: its gossip state goes with it (a restart is a new generation).
    pub fn stop(&mut self, id: NodeId) {
        self.nodes.remove(&id);
    }

    /// Changes a node's own keys; a change bumps its version so peers take it.
    pub fn publish(&mut self, id: NodeId, edit: impl FnOnce(&mut Member)) {
        let Some(node) = self.nodes.get_mut(&id) else { return };
        let mut m = (*node.me.member).clone();
        edit(&mut m);
        if m != *node.me.member {
            node.me.version += 1;
            node.me.member = Arc::new(m);
        }
    }

    /// What `id`'s gossip reports now: itself and every node it has heard of, live or not.
    pub fn members(&self, id: NodeId, now: Instant) -> Members {
        let Some(node) = self.nodes.get(&id) else { return Members::default() };
        let mut nodes = BTreeMap::new();
        for (name, k) in &node.table {
            let mut m = (*k.rec.member).clone();
            m.live = k.live(now);
            m.generation = k.rec.generation;
            nodes.insert(name.clone(), m);
        }
        let mut me = (*node.me.member).clone();
        me.live = true;
        me.generation = node.me.generation;
        nodes.insert(node.name.clone(), me);
        Members { nodes }
    }

    /// One gossip round: heartbeats rise and each node starts exchanges with `FANOUT` peers
    /// chosen among those it knows and the join list `seeds`.
    pub fn round(&mut self, now: Instant, seeds: &[NodeId]) {
        self.round += 1;
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        for id in ids {
            let Some(node) = self.nodes.get_mut(&id) else { continue };
            node.me.heartbeat += 1;
            let mut known: Vec<NodeId> = node.ids.values().copied().chain(seeds.iter().copied()).collect();
            known.sort_unstable();
            known.dedup();
            known.retain(|p| *p != id);
            for k in 0..FANOUT.min(known.len()) {
                // A seeded partial shuffle: pick one of the remaining candidates.
                let r = mix(self.seed ^ mix(id ^ mix(self.round ^ mix(0x6055 + k as u64))));
                let pick = k + (r as usize) % (known.len() - k);
                known.swap(k, pick);
                self.send(id, known[k], Leg::Syn, now);
            }
        }
        self.trace_liveness(now);
    }

    /// Delivers every datagram due by `now`, answering SYNs and SYN-ACKs.
    pub fn deliver(&mut self, now: Instant) {
        while let Some(entry) = self.inflight.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let d = entry.remove();
            // Arrives only at a running node over a link still open.
            if !self.nodes.contains_key(&d.to) || self.net.is_cut(d.from, d.to) {
                continue;
            }
            match d.leg {
                Leg::Syn => {
                    let table = self.snapshot(d.to);
                    self.send(d.to, d.from, Leg::SynAck(table), now);
                }
                Leg::SynAck(records) => {
                    self.merge(d.to, records, now);
                    let table = self.snapshot(d.to);
                    self.send(d.to, d.from, Leg::Ack(table), now);
                }
                Leg::Ack(records) => self.merge(d.to, records, now),
            }
        }
    }

    fn send(&mut self, from: NodeId, to: NodeId, leg: Leg, now: Instant) {
        let Some(delay) = self.net.datagram(from, to) else { return };
        self.sent += 1;
        self.inflight.insert((now + delay, self.sent), Datagram { from, to, leg });
    }

    /// The sender's whole table, itself included (chitchat sends deltas; the merge is the same).
    fn snapshot(&self, id: NodeId) -> Vec<Record> {
        let Some(node) = self.nodes.get(&id) else { return Vec::new() };
        node.table.values().map(|k| k.rec.clone()).chain([node.me.clone()]).collect()
    }

    fn merge(&mut self, id: NodeId, records: Vec<Record>, now: Instant) {
        let Some(node) = self.nodes.get_mut(&id) else { return };
        for rec in records {
            let name = rec.member.name.clone();
            if name == node.name {
                continue;
            }
            if rec.member.raft_id != 0 {
                node.ids.insert(name.clone(), rec.member.raft_id);
            }
            match node.table.get_mut(&name) {
                None => {
                    node.table.insert(name, Known { rec, heard_at: now });
                }
                Some(k) if rec.generation > k.rec.generation => *k = Known { rec, heard_at: now },
                Some(k) if rec.generation == k.rec.generation => {
                    if rec.heartbeat > k.rec.heartbeat {
                        k.rec.heartbeat = rec.heartbeat;
                        k.heard_at = now;
                    }
                    if rec.version > k.rec.version {
                        k.rec.version = rec.version;
                        k.rec.member = rec.member;
                    }
                }
                Some(_) => {}
            }
        }
    }

    /// Logs each observer's live set when it changes.
    fn trace_liveness(&mut self, now: Instant) {
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        for id in ids {
            let Some(node) = self.nodes.get_mut(&id) else { continue };
            let mut live: Vec<String> = node
                .table
                .iter()
                .filter(|(_, k)| k.live(now))
                .map(|(name, _)| name.clone())
                .chain([node.name.clone()])
                .collect();
            live.sort_unstable();
            if node.traced != live {
                self.trace.event(format!("gossip {id} sees live {}", live.join(",")));
                node.traced = live;
            }
        }
    }
}
