//! Gossip (chitchat): who is in the cluster and what each node observes. Each node writes only
//! its own keys; this module owns the key schema and turns chitchat's node states into typed
//! [`Member`]s, published on a watch channel whenever the live set or any live node's keys change.
//!
//! Keys: `raft_id`, `raft_addr`, `admin`, `http`, `zone`, `ready` (`1`/`0`), `raft_init`
//! (`1` once this node belongs to an initialized Raft cluster), `cluster_id` (its cluster
//! identity, 32 hex digits, once it has one), `v:<pool>/<addr>` (`up`/`down`:
//! verdicts of the probes this node runs), `hb:<pool>/<addr>` (`up|down <udp> [dyn]`:
//! heartbeat backends this node hears), `act:<pool>/<addr>` (connections in flight here).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use chitchat::{ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig, NodeState, spawn_chitchat};
use tokio::sync::watch;

use super::gossip_auth::{AuthTransport, GossipFilter};
use super::incarnation::{self, Recorded, Sequence};
use super::raft::ident::ClusterId;
use super::secure::ClusterKey;
use crate::health::combine::PeerObs;
use crate::health::{BackendId, HealthView, Heard, Verdict};
use crate::metrics::Metrics;
use crate::routing::Counts;

/// How this node joins gossip.
#[derive(Clone)]
pub struct GossipOptions {
    pub name: String,
    pub cluster_id: String,
    /// UDP address to bind and advertise.
    pub addr: SocketAddr,
    pub seeds: Vec<String>,
    pub interval: Duration,
    /// Every datagram is authenticated with the cluster key.
    pub key: ClusterKey,
    /// Test seam: which peers' gossip gets through (`None`: all).
    pub filter: Option<GossipFilter>,
    /// Where this node records its generation and datagram sequence (`incarnation`), so a
    /// restart starts above them whatever its clock says; `None`: from the clock alone.
    pub state_file: Option<PathBuf>,
}

/// A live (or dead) node as gossip describes it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Member {
    pub name: String,
    pub generation: u64,
    pub gossip_addr: Option<SocketAddr>,
    pub raft_id: u64,
    pub raft_addr: String,
    pub admin: String,
    pub http: Option<String>,
    pub zone: String,
    pub ready: bool,
    pub raft_init: bool,
    /// The cluster identity it gossips (`None`: none yet, or unreadable).
    pub cluster_id: Option<ClusterId>,
    pub live: bool,
    pub obs: PeerObs,
    /// Work in flight on that node, per backend.
    pub active: HashMap<BackendId, Counts>,
}

/// Everyone gossip knows about, by node name (a live generation over dead ones, then the
/// highest).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Members {
    pub nodes: BTreeMap<String, Member>,
}

impl Members {
    pub fn live(&self) -> impl Iterator<Item = &Member> {
        self.nodes.values().filter(|m| m.live)
    }

    /// Sorted names of live nodes (for probe sharding).
    pub fn live_names(&self) -> Vec<String> {
        self.live().map(|m| m.name.clone()).collect()
    }
}

/// A running gossip member.
pub struct Gossip {
    handle: ChitchatHandle,
    pub members: watch::Receiver<Arc<Members>>,
}

impl Gossip {
    /// Joins gossip with `keys` published from the first round on.
    pub async fn start(
        opts: &GossipOptions,
        keys: Vec<(String, String)>,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Gossip> {
        let now = crate::clock::wall_now();
        let (generation, seq) = match &opts.state_file {
            Some(file) => incarnation::begin(file, now)?,
            None => {
                let (generation, start, _) = incarnation::next(Recorded::default(), now, 0);
                (generation, Sequence::unrecorded(start))
            }
        };
        let config = ChitchatConfig {
            chitchat_id: ChitchatId::new(opts.name.clone(), generation, opts.addr),
            cluster_id: opts.cluster_id.clone(),
            gossip_interval: opts.interval,
            listen_addr: opts.addr,
            seed_nodes: opts.seeds.clone(),
            failure_detector_config: FailureDetectorConfig {
                phi_threshold: 8.0,
                initial_interval: opts.interval,
                dead_node_grace_period: Duration::from_secs(3600),
                ..FailureDetectorConfig::default()
            },
            marked_for_deletion_grace_period: Duration::from_secs(3600),
            catchup_callback: None,
            extra_liveness_predicate: Some(Box::new(|ns: &NodeState| ns.contains_key("raft_id"))),
            protocol_version: chitchat::ProtocolVersion::V0,
        };
        let transport =
            AuthTransport { key: opts.key.clone(), metrics, filter: opts.filter.clone(), seq: Arc::new(seq) };
        let handle = spawn_chitchat(config, keys, &transport)
            .await
            .map_err(|e| anyhow::anyhow!("cannot start gossip on {}: {e}", opts.addr))?;
        let (tx, members) = watch::channel(Arc::new(Members::default()));
        tokio::spawn(watch_members(handle.chitchat(), tx));
        Ok(Gossip { handle, members })
    }

    /// Sets (or, with `None`, deletes) one of this node's keys.
    pub async fn set(&self, key: &str, value: Option<String>) {
        self.handle
            .with_chitchat(|c| {
                let me = c.self_node_state();
                match &value {
                    Some(v) => me.set(key, v),
                    None if me.get(key).is_some() => me.delete(key),
                    None => {}
                }
            })
            .await;
    }

    /// Publishes this node's observations: verdicts it maintains, heartbeats it hears and
    /// connections in flight; keys that no longer apply are deleted.
    pub async fn publish(&self, local: &HealthView, active: &HashMap<BackendId, Counts>) {
        let mut wanted: HashMap<String, String> = HashMap::new();
        for (id, v) in &local.verdicts {
            let value = match v {
                Verdict::Up => "up",
                Verdict::Down => "down",
                Verdict::Unknown => continue,
            };
            wanted.insert(format!("v:{}/{}", id.0, id.1), value.to_string());
        }
        for (id, h) in &local.heard {
            let state = if h.up { "up" } else { "down" };
            let dynamic = if h.dynamic { " dyn" } else { "" };
            wanted.insert(format!("hb:{}/{}", id.0, id.1), format!("{state} {}{dynamic}", h.udp));
        }
        for (id, c) in active.iter().filter(|(_, c)| **c != Counts::default()) {
            wanted.insert(format!("act:{}/{}", id.0, id.1), format!("{} {} {}", c.active, c.upgraded, c.pinned));
        }
        self.handle
            .with_chitchat(|c| {
                let me = c.self_node_state();
                let stale: Vec<String> = me
                    .key_values()
                    .map(|(k, _)| k)
                    .filter(|k| is_observation(k) && !wanted.contains_key(*k))
                    .map(str::to_string)
                    .collect();
                for k in stale {
                    me.delete(&k);
                }
                for (k, v) in &wanted {
                    me.set(k, v);
                }
            })
            .await;
    }

    /// Leaves gossip (other nodes see this node dead after their failure detector fires).
    pub async fn shutdown(self) {
        let _ = self.handle.shutdown().await;
    }
}

fn is_observation(key: &str) -> bool {
    key.starts_with("v:") || key.starts_with("hb:") || key.starts_with("act:")
}

/// Rebuilds the member list on every live-set change and every second (for dead nodes).
async fn watch_members(chitchat: Arc<tokio::sync::Mutex<chitchat::Chitchat>>, tx: watch::Sender<Arc<Members>>) {
    let mut live_rx = chitchat.lock().await.live_nodes_watcher();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            changed = live_rx.changed() => if changed.is_err() { return },
            _ = tick.tick() => {}
        }
        let live = live_rx.borrow_and_update().clone();
        let members = {
            let c = chitchat.lock().await;
            let dead: Vec<(ChitchatId, NodeState)> =
                c.dead_nodes().filter_map(|id| c.node_state(id).map(|s| (id.clone(), s.clone()))).collect();
            build_members(&live, &dead)
        };
        tx.send_if_modified(|m| {
            let changed = **m != members;
            if changed {
                *m = Arc::new(members);
            }
            changed
        });
        if tx.is_closed() {
            return;
        }
    }
}

/// One member per node name. A live generation wins over dead ones whatever the numbers say:
/// generations come from the clock, and a node restarted with its clock behind (or from a
/// wiped data directory) has a lower one than the incarnation it replaced, which stays in
/// chitchat's dead list for an hour.
fn build_members(live: &BTreeMap<ChitchatId, NodeState>, dead: &[(ChitchatId, NodeState)]) -> Members {
    let mut nodes: BTreeMap<String, Member> = BTreeMap::new();
    let all = live.iter().map(|(id, s)| (id, s, true)).chain(dead.iter().map(|(id, s)| (id, s, false)));
    for (id, state, is_live) in all {
        let m = parse_member(id, state, is_live);
        let newer = nodes.get(&m.name).is_none_or(|old| (m.live, m.generation) > (old.live, old.generation));
        if newer {
            nodes.insert(m.name.clone(), m);
        }
    }
    Members { nodes }
}

/// Reads one node's keys. Unparseable values are ignored (a peer's bug must not stop routing).
pub fn parse_member(id: &ChitchatId, state: &NodeState, live: bool) -> Member {
    let get = |k: &str| state.get(k).map(str::to_string);
    let mut m = Member {
        name: id.node_id.to_string(),
        generation: id.generation_id,
        gossip_addr: Some(id.gossip_advertise_addr),
        raft_id: get("raft_id").and_then(|v| v.parse().ok()).unwrap_or(0),
        raft_addr: get("raft_addr").unwrap_or_default(),
        admin: get("admin").unwrap_or_default(),
        http: get("http"),
        zone: get("zone").unwrap_or_default(),
        ready: get("ready").as_deref() == Some("1"),
        raft_init: get("raft_init").as_deref() == Some("1"),
        cluster_id: get("cluster_id").and_then(|v| v.parse().ok()),
        live,
        obs: PeerObs { node: id.node_id.to_string(), ..PeerObs::default() },
        active: HashMap::new(),
    };
    for (k, v) in state.key_values() {
        parse_observation(&mut m, k, v);
    }
    m
}

fn parse_observation(m: &mut Member, key: &str, value: &str) {
    if let Some(id) = key.strip_prefix("v:").and_then(backend_id) {
        let v = match value {
            "up" => Verdict::Up,
            "down" => Verdict::Down,
            _ => return,
        };
        m.obs.verdicts.insert(id, v);
    } else if let Some(id) = key.strip_prefix("hb:").and_then(backend_id) {
        let mut parts = value.split_whitespace();
        let (Some(state), Some(udp)) = (parts.next(), parts.next().and_then(|u| u.parse().ok())) else { return };
        let dynamic = parts.next() == Some("dyn");
        m.obs.heard.insert(id, Heard { up: state == "up", udp, dynamic });
    } else if let Some(id) = key.strip_prefix("act:").and_then(backend_id) {
        let mut n = value.split_whitespace().map(|v| v.parse::<u64>().unwrap_or(0));
        let c =
            Counts { active: n.next().unwrap_or(0), upgraded: n.next().unwrap_or(0), pinned: n.next().unwrap_or(0) };
        m.active.insert(id, c);
    }
}

/// `<pool>/<addr>` → backend id (pool names never contain `/`).
fn backend_id(rest: &str) -> Option<BackendId> {
    let (pool, addr) = rest.split_once('/')?;
    Some((pool.to_string(), addr.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observation_keys_round_trip() {
        let mut m = Member::default();
        parse_observation(&mut m, "v:web/10.0.0.1:80", "down");
        parse_observation(&mut m, "hb:logic/[::1]:7000", "up [::1]:7001 dyn");
        parse_observation(&mut m, "act:web/10.0.0.1:80", "3 2 1");
        parse_observation(&mut m, "v:web/garbage", "up");
        parse_observation(&mut m, "hb:logic/10.0.0.1:1", "up not-an-addr");
        let web = ("web".to_string(), "10.0.0.1:80".parse().expect("addr"));
        assert_eq!(m.obs.verdicts.get(&web), Some(&Verdict::Down));
        let hb = ("logic".to_string(), "[::1]:7000".parse().expect("addr"));
        assert_eq!(m.obs.heard[&hb], Heard { up: true, udp: "[::1]:7001".parse().expect("addr"), dynamic: true });
        assert_eq!(m.active[&web], Counts { active: 3, upgraded: 2, pinned: 1 });
        assert_eq!(m.obs.verdicts.len() + m.obs.heard.len(), 2, "garbage ignored");
    }

    #[test]
    fn a_live_generation_wins_over_a_dead_higher_one() {
        let addr: SocketAddr = "127.0.0.3:7946".parse().expect("addr");
        let id = |generation: u64| ChitchatId::new("n3", generation, addr);
        let state = NodeState::for_test();
        // Restarted with the clock 90 s behind: the new generation is the lower one.
        let (old, new) = (id(2_000), id(1_910));
        let live: BTreeMap<ChitchatId, NodeState> = [(new.clone(), state.clone())].into();
        let m = build_members(&live, &[(old.clone(), state.clone())]);
        assert_eq!((m.nodes["n3"].generation, m.nodes["n3"].live), (1_910, true));
        let both: BTreeMap<ChitchatId, NodeState> = [(new, state.clone()), (old, state.clone())].into();
        assert_eq!(build_members(&both, &[]).nodes["n3"].generation, 2_000, "among live ones, the highest");
        assert!(!build_members(&BTreeMap::new(), &[(id(5), state)]).nodes["n3"].live);
    }
}
