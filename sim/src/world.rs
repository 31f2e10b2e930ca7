//! One simulated run: N shoal Raft nodes (real `LogStore`, `StateMachine` and cluster
//! `Identity` on redb files in a temp dir) on a `SimNet`, seeded faults every step, simulated
//! gossip feeding shoal's bootstrap gate, membership planner and health combiner, seeded
//! clients, and the checkers after every step and at the end.
//!
//! A third of the seeds start every node uninitialized (3–5 nodes, staggered, `--expect` all
//! of them, often a partition while they form) and let `BootstrapGate` form the
//! cluster; the others initialize three nodes directly. Each node runs, on its own phase, the
//! loops shoal runs: bootstrap every 500 ms, reconcile every second (every node tracks liveness
//! through `Seen`, the leader plans), and every gossip round its health (desired state to the
//! health core, due probes, publish, combine). The backends' true health flips by seed until
//! the world heals.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::{ChangeMembers, RaftLogReader, ServerState};
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use shoal_node::control::gossip::Member;
use shoal_node::control::membership::{Action, BootstrapGate, Policy, Seen, plan};
use shoal_node::control::raft::ident::{ClusterId, Identity, compatible};
use shoal_node::control::raft::state_machine::StateMachine;
use shoal_node::control::raft::store::{Db, LogStore};
use shoal_node::control::raft::{NodeId, Raft, RaftTiming, ShoalNode, raft_config, rt};
use shoal_node::health::combine::PeerObs;
use shoal_proto::{BackendSpec, Command, PoolSpec, Proposal, State};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::check::{self, Committed, Op, Outcome};
use crate::client;
use crate::gossip::{Gossip, ROUND};
use crate::health::NodeHealth;
use crate::net::{Factory, Faults, Peer, SimNet};
use crate::trace::{Trace, mix};

/// Virtual time per step.
pub const STEP: Duration = Duration::from_millis(20);
/// After healing, every live node must agree (Raft state and routing) within this much
/// virtual time.
pub const CONVERGE: Duration = Duration::from_secs(30);
const CLIENTS: usize = 3;
/// Steps per gossip round, bootstrap tick and reconcile tick (shoal's intervals).
const ROUND_STEPS: u64 = ROUND.as_millis() as u64 / STEP.as_millis() as u64;
const BOOTSTRAP_STEPS: u64 = 25;
const RECONCILE_STEPS: u64 = 50;
/// The membership policy, with a short grace so decommissions and partitions play out.
const POLICY: Policy =
    Policy { max_voters: 5, dead_grace: Duration::from_secs(5), promote_after: Duration::from_secs(1), max_lag: 100 };

/// What to run.
#[derive(Clone, Debug)]
pub struct Settings {
    pub seed: u64,
    /// Fault steps (20 ms each); 3000 is one simulated minute.
    pub steps: u64,
    pub verbose: bool,
    /// Checker self-tests only: break the system on purpose, so a checker must fire.
    pub sabotage: Option<Sabotage>,
}

impl Settings {
    pub fn new(seed: u64, steps: u64) -> Settings {
        Settings { seed, steps, verbose: false, sabotage: None }
    }
}

/// Deliberate breakage for the checkers' self-tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sabotage {
    /// Every node starts cut off from the others with `--expect 1`, so each forms a cluster.
    SplitBootstrap,
    /// Nodes combine health from their own probes only, ignoring their peers' observations.
    DeafHealth,
}

/// What a run found.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub seed: u64,
    pub hash: u64,
    pub events: u64,
    pub virtual_ms: u64,
    pub violations: Vec<String>,
    pub acked: usize,
    pub refused: usize,
    pub unknown: usize,
    pub final_version: u64,
    pub leaders: usize,
    pub multi_leader_terms: usize,
    /// `(nodes, expect)` when the cluster formed by bootstrap; `None` when initialized directly.
    pub bootstrap: Option<(usize, usize)>,
    /// Virtual ms from healing until every node's routing matched the true health.
    pub routing_ms: Option<u64>,
    pub tail: Vec<String>,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.violations.is_empty()
    }
}

/// Runs one seed on its own current-thread runtime with tokio's paused clock.
pub fn run(settings: &Settings) -> Report {
    rt::seed(settings.seed);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build();
    let report = match runtime {
        Ok(runtime) => runtime.block_on(World::run(settings.clone())),
        Err(e) => Report { seed: settings.seed, violations: vec![format!("no runtime: {e}")], ..Report::default() },
    };
    rt::unseed();
    report
}

/// A running node: its Raft handles, and the state of the loops shoal runs beside Raft.
struct Node {
    raft: Raft,
    log: LogStore,
    sm: StateMachine,
    ident: Identity,
    name: String,
    /// Offset of this node's loop ticks, in steps (nodes do not tick in lockstep).
    phase: u64,
    /// The bootstrap loop saw Raft initialized, published `raft_init=1` and ended.
    raft_init: bool,
    gate: BootstrapGate,
    seen: Seen,
    /// A membership change of this node's is in flight (its reconcile loop waits on it).
    busy: Arc<AtomicBool>,
    health: NodeHealth,
}

struct World {
    seed: u64,
    steps: u64,
    step: u64,
    sabotage: Option<Sabotage>,
    rng: StdRng,
    trace: Trace,
    net: SimNet,
    gossip: Gossip,
    _tmp: tempfile::TempDir,
    base: PathBuf,
    nodes: BTreeMap<NodeId, Node>,
    /// Stopped with their store kept (crashed, or not started yet): start at this time.
    down: BTreeMap<NodeId, Instant>,
    next_id: NodeId,
    /// `--expect` of every node (0: join only).
    expect: usize,
    bootstrap: Option<(usize, usize)>,
    /// Every cluster identity created, by whom; every node whose `initialize` succeeded.
    identities: Vec<(NodeId, ClusterId)>,
    initialized: Vec<NodeId>,
    /// The backends' true health (by address, whatever pool lists them).
    truth: BTreeMap<SocketAddr, bool>,
    /// One flip of a backend's health per this many steps, on average.
    flip_every: u32,
    /// Per node, the highest applied index whose entries were read into `committed`.
    seen: BTreeMap<NodeId, u64>,
    committed: Committed,
    terms: BTreeMap<NodeId, u64>,
    leaders: BTreeMap<u64, BTreeSet<NodeId>>,
    violations: Vec<String>,
    ops: Arc<Mutex<Vec<Op>>>,
    heal_at: Option<Instant>,
    routing_ms: Option<u64>,
    script: Vec<(u64, Scripted)>,
}

#[derive(Clone, Copy, Debug)]
enum Scripted {
    /// A partition while the cluster forms (bootstrap seeds).
    Partition,
    Grow,
    Shrink,
    Replace,
}

fn tmp_base() -> std::io::Result<tempfile::TempDir> {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() { tempfile::Builder::new().prefix("shoal-sim").tempdir_in(shm) } else { tempfile::tempdir() }
}

impl World {
    async fn run(settings: Settings) -> Report {
        let trace = Trace::new(settings.verbose);
        let mut rng = StdRng::seed_from_u64(mix(settings.seed));
        let faults = Faults {
            loss: rng.random_range(0..50),
            dup: rng.random_range(0..20),
            max_delay: rng.random_range(1..20),
            spike: rng.random_range(0..10),
        };
        trace.event(format!("seed {} faults {faults:?}", settings.seed));
        let tmp = match tmp_base() {
            Ok(t) => t,
            Err(e) => {
                return Report {
                    seed: settings.seed,
                    violations: vec![format!("no temp dir: {e}")],
                    ..Report::default()
                };
            }
        };
        let net = SimNet::new(settings.seed, faults, trace.clone());
        let mut world = World {
            seed: settings.seed,
            steps: settings.steps,
            step: 0,
            sabotage: settings.sabotage,
            script: script(&mut rng, settings.steps),
            flip_every: rng.random_range(100..1000),
            rng,
            gossip: Gossip::new(settings.seed, net.clone(), trace.clone()),
            net,
            trace,
            base: tmp.path().to_path_buf(),
            _tmp: tmp,
            nodes: BTreeMap::new(),
            down: BTreeMap::new(),
            next_id: 1,
            expect: 0,
            bootstrap: None,
            identities: Vec::new(),
            initialized: Vec::new(),
            truth: BTreeMap::new(),
            seen: BTreeMap::new(),
            committed: Committed::new(),
            terms: BTreeMap::new(),
            leaders: BTreeMap::new(),
            violations: Vec::new(),
            ops: Arc::default(),
            heal_at: None,
            routing_ms: None,
        };
        if let Err(e) = world.play().await {
            world.violations.push(format!("harness error: {e:#}"));
        }
        world.report()
    }

    async fn play(&mut self) -> anyhow::Result<()> {
        self.truth = backends().map(|a| (a, self.rng.random_bool(0.8))).collect();
        self.trace.event(format!("true health {:?}", self.truth));
        let split = self.sabotage == Some(Sabotage::SplitBootstrap);
        if split || self.rng.random_ratio(1, 3) {
            self.form_by_bootstrap(split).await?;
        } else {
            self.form_directly().await?;
        }
        let (stop_tx, stop) = watch::channel(false);
        let mut clients: Vec<_> = (0..CLIENTS)
            .map(|c| {
                tokio::spawn(client::run(
                    self.seed,
                    c,
                    self.net.clone(),
                    self.trace.clone(),
                    self.ops.clone(),
                    stop.clone(),
                ))
            })
            .collect();
        clients.push(tokio::spawn(client::setup(
            self.seed,
            CLIENTS + 1,
            health_pool(),
            self.net.clone(),
            self.trace.clone(),
            self.ops.clone(),
            stop.clone(),
        )));
        for step in 0..self.steps {
            self.tick().await;
            self.faults(step).await?;
        }
        self.heal().await?;
        let _ = stop_tx.send(true);
        for c in clients {
            let _ = c.await;
        }
        self.converge().await;
        self.final_checks();
        for id in self.nodes.keys().copied().collect::<Vec<_>>() {
            self.stop(id).await;
        }
        Ok(())
    }

    /// Three nodes, the first initialized with all three as voters (its identity created first).
    async fn form_directly(&mut self) -> anyhow::Result<()> {
        let first: Vec<NodeId> = (0..3).map(|_| self.fresh_id()).collect();
        for id in &first {
            self.start(*id).await?;
        }
        let members = first.iter().map(|id| (*id, shoal_node(*id))).collect::<BTreeMap<_, _>>();
        self.create_identity(first[0])?;
        self.nodes[&first[0]].raft.initialize(members).await?;
        self.initialized.push(first[0]);
        Ok(())
    }

    /// 3–5 uninitialized nodes, started over 1.5 s, with `--expect` all of them
    /// (or, for the self-test, 1 and everyone cut off for 3 s); half the time a partition
    /// strikes while they form.
    async fn form_by_bootstrap(&mut self, split: bool) -> anyhow::Result<()> {
        let n = if split { 3 } else { self.rng.random_range(3..=5) };
        // `--expect` below the number of nodes forming the cluster is unsupported: a partition
        // while they form can then make two clusters (seed 179 with expect 2 of 3, README).
        self.expect = if split { 1 } else { n };
        self.bootstrap = Some((n, self.expect));
        self.trace.event(format!("bootstrap: {n} nodes, expect {}", self.expect));
        let now = Instant::now();
        for _ in 0..n {
            let id = self.fresh_id();
            let at = if split { 0 } else { self.rng.random_range(0..1500) };
            self.down.insert(id, now + Duration::from_millis(at));
        }
        if split {
            let ids: Vec<NodeId> = self.down.keys().copied().collect();
            let cut = ids.iter().flat_map(|a| ids.iter().filter(move |b| *b != a).map(move |b| (*a, *b))).collect();
            self.net.set_cut(cut);
            self.heal_at = Some(now + Duration::from_secs(3));
            self.trace.event("self-test: everyone cut off for 3 s");
        } else if self.rng.random_bool(0.5) {
            // A partition at a random step while the nodes start and gossip finds them.
            let at = self.rng.random_range(1..100);
            self.script.push((at, Scripted::Partition));
        }
        Ok(())
    }

    fn fresh_id(&mut self) -> NodeId {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    fn dir(&self, id: NodeId) -> PathBuf {
        self.base.join(format!("n{id}"))
    }

    async fn start(&mut self, id: NodeId) -> anyhow::Result<()> {
        let dir = self.dir(id);
        std::fs::create_dir_all(&dir)?;
        let db = open_db(&dir.join("raft.redb")).await?;
        let sm = StateMachine::open(db.clone())?;
        let ident = Identity::open(db.clone(), None)?;
        let config = Arc::new(raft_config("sim", &RaftTiming::default())?);
        let factory = Factory { me: id, net: self.net.clone() };
        let raft = Raft::new(id, config, factory, LogStore::new(db.clone()), sm.clone()).await?;
        self.net.set_up(id, Some(Peer { raft: raft.clone(), ident: ident.clone() }));
        let raft_init = raft.is_initialized().await.unwrap_or(false);
        let name = format!("n{id}");
        let member = Member {
            name: name.clone(),
            raft_id: id,
            raft_addr: shoal_node(id).raft_addr,
            raft_init,
            cluster_id: ident.get(),
            live: true,
            obs: PeerObs { node: name.clone(), ..PeerObs::default() },
            ..Member::default()
        };
        // A restart is a new gossip generation (shoal takes the wall clock; here virtual time).
        self.gossip.start(id, member, self.trace.now_ms() + 1);
        let health = NodeHealth::new(&name);
        let node = Node {
            raft,
            log: LogStore::new(db),
            sm,
            ident,
            name,
            phase: mix(self.seed ^ mix(id ^ 0x9A5E)) % RECONCILE_STEPS,
            raft_init,
            gate: BootstrapGate::default(),
            seen: Seen::default(),
            busy: Arc::default(),
            health,
        };
        self.nodes.insert(id, node);
        self.trace.event(format!("start {id}"));
        Ok(())
    }

    /// Stops a node abruptly (no leadership hand-over); its store stays on disk.
    async fn stop(&mut self, id: NodeId) {
        self.net.set_up(id, None);
        self.gossip.stop(id);
        if let Some(node) = self.nodes.remove(&id) {
            let _ = node.raft.shutdown().await;
        }
        self.trace.event(format!("stop {id}"));
    }

    /// Creates `id`'s cluster identity if it has none, recording the creation.
    fn create_identity(&mut self, id: NodeId) -> anyhow::Result<()> {
        let Some(node) = self.nodes.get(&id) else { return Ok(()) };
        if node.ident.get().is_some() {
            return Ok(());
        }
        let cid = node.ident.get_or_create().map_err(|e| anyhow::anyhow!("node {id}: {e}"))?;
        self.identities.push((id, cid));
        // Identities are random (OS entropy): the trace names them by order, never by value.
        self.trace.event(format!("node {id} creates cluster identity #{}", self.identities.len()));
        Ok(())
    }

    /// One step of virtual time, then whatever shoal's loops do at this step.
    async fn tick(&mut self) {
        tokio::time::sleep(STEP).await;
        self.step += 1;
        self.observe().await;
        let now = Instant::now();
        self.gossip.deliver(now);
        if self.step.is_multiple_of(ROUND_STEPS) {
            self.gossip_round(now);
        }
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        for id in ids {
            let Some(phase) = self.nodes.get(&id).map(|n| n.phase) else { continue };
            if (self.step + phase).is_multiple_of(BOOTSTRAP_STEPS) {
                self.bootstrap_tick(id).await;
            }
            if (self.step + phase).is_multiple_of(RECONCILE_STEPS) {
                self.reconcile_tick(id).await;
            }
        }
    }

    /// Every node publishes its keys, gossip runs a round, then every node's health runs: its
    /// core is told desired state and gossip's live set (probers follow), due probes run,
    /// verdicts combine.
    fn gossip_round(&mut self, now: Instant) {
        for (id, node) in &self.nodes {
            let obs = node.health.published(&node.name);
            let (init, cid) = (node.raft_init, node.ident.get());
            self.gossip.publish(*id, |m| {
                m.raft_init = init;
                m.cluster_id = cid;
                m.obs = obs;
            });
        }
        // The join list: every node the world runs or will restart.
        let seeds: Vec<NodeId> = self.nodes.keys().chain(self.down.keys()).copied().collect();
        self.gossip.round(now, &seeds);
        let deaf = self.sabotage == Some(Sabotage::DeafHealth);
        for (id, node) in self.nodes.iter_mut() {
            let members = self.gossip.members(*id, now);
            let state = node.sm.current();
            for line in node.health.sync(state.clone(), members.live_names(), now) {
                self.trace.event(format!("health {id}: {line}"));
            }
            let truth = &self.truth;
            for ((pool, addr), v) in node.health.probe(now, |a| truth.get(&a).copied().unwrap_or(true)) {
                self.trace.event(format!("health {id}: {pool}/{addr} {v:?}"));
            }
            let peers: Vec<PeerObs> = if deaf {
                Vec::new()
            } else {
                members.live().filter(|m| m.name != node.name).map(|m| m.obs.clone()).collect()
            };
            node.health.combine(&state, &peers);
        }
    }

    /// shoal's bootstrap loop, one tick: publish `raft_init` once Raft is initialized, else
    /// initialize when the gate opens (identity first, so every member adopts it).
    async fn bootstrap_tick(&mut self, id: NodeId) {
        let Some(node) = self.nodes.get_mut(&id) else { return };
        if node.raft_init {
            return;
        }
        if node.raft.is_initialized().await.unwrap_or(false) {
            node.raft_init = true;
            self.trace.event(format!("node {id} initialized: raft_init=1"));
            return;
        }
        let members = self.gossip.members(id, Instant::now());
        let Some(voters) = node.gate.tick(id, self.expect, &members) else { return };
        let ids: Vec<NodeId> = voters.iter().map(|(v, _)| *v).collect();
        self.trace.event(format!("bootstrap on {id} with voters {ids:?}"));
        if let Err(e) = self.create_identity(id) {
            self.trace.event(format!("bootstrap on {id}: no identity: {e}"));
            return;
        }
        let Some(node) = self.nodes.get(&id) else { return };
        match node.raft.initialize(voters.into_iter().collect::<BTreeMap<_, _>>()).await {
            Ok(()) => {
                if !self.initialized.contains(&id) {
                    self.initialized.push(id);
                }
            }
            Err(e) => self.trace.event(format!("bootstrap on {id} did not happen: {e}")),
        }
    }

    /// shoal's reconcile loop, one tick on one node: a leader without an identity creates
    /// one (`adopt_legacy_identity`); every node tracks liveness from its gossip; the leader
    /// plans one change and carries it out, admitting a learner only after a ping.
    async fn reconcile_tick(&mut self, id: NodeId) {
        let now = Instant::now();
        let Some(node) = self.nodes.get(&id) else { return };
        if node.busy.load(Ordering::SeqCst) {
            return;
        }
        let metrics = node.raft.metrics().borrow().clone();
        if metrics.state == ServerState::Leader
            && node.ident.get().is_none()
            && let Err(e) = self.create_identity(id)
        {
            self.trace.event(format!("leader {id}: no identity: {e}"));
        }
        let members = self.gossip.members(id, now);
        let Some(node) = self.nodes.get_mut(&id) else { return };
        let ours = node.ident.get();
        let Some(view) = node.seen.observe(id, &metrics, &members, ours, now) else { return };
        let Some(action) = plan(&view, &POLICY) else { return };
        self.trace.event(format!("plan on {id}: {action:?}"));
        let (raft, busy, trace, net) = (node.raft.clone(), node.busy.clone(), self.trace.clone(), self.net.clone());
        busy.store(true, Ordering::SeqCst);
        tokio::spawn(async move {
            let done = match &action {
                Action::AddLearner(new, _) => verified(&net, id, *new, ours).await,
                _ => Ok(()),
            };
            let done = match done {
                Ok(()) => match tokio::time::timeout(Duration::from_secs(10), execute(&raft, action.clone())).await {
                    Ok(r) => r,
                    Err(_) => Err("timed out".to_string()),
                },
                Err(e) => Err(e),
            };
            trace.event(format!(
                "plan on {id} {action:?}: {}",
                match done {
                    Ok(()) => "done".to_string(),
                    Err(e) => format!("failed: {e}"),
                }
            ));
            busy.store(false, Ordering::SeqCst);
        });
    }

    /// The leader and its voters, only while its membership is uniform and applied: a fault
    /// decided against a config still in flight could leave the config that stays with no
    /// live majority (seed 476: two voters stopped for good under a lost config change).
    fn voters(&self) -> Option<(NodeId, BTreeSet<NodeId>)> {
        let leader = client::leader(&self.net)?;
        let m = self.nodes.get(&leader)?.raft.metrics().borrow().clone();
        let config = &m.membership_config;
        let applied = config.log_id().map(|l| l.index) <= m.last_applied.map(|l| l.index);
        if !applied || config.membership().get_joint_config().len() > 1 {
            return None;
        }
        Some((leader, config.membership().voter_ids().collect()))
    }

    /// Whether stopping `id` for good still leaves a live majority in every voter config any
    /// running node holds (committed or not, joint halves included): one node's view may be
    /// stale (seed 182: a deposed leader still saw n1 as a voter the new leader had removed,
    /// and a second decommission decided on its view left the real config without a majority).
    fn may_stop(&self, id: NodeId) -> bool {
        self.nodes.values().all(|n| {
            let m = n.raft.metrics().borrow().membership_config.clone();
            m.membership().get_joint_config().iter().all(|voters| {
                let live = voters.iter().filter(|v| **v != id && self.nodes.contains_key(v)).count();
                live * 2 > voters.len()
            })
        })
    }

    async fn faults(&mut self, step: u64) -> anyhow::Result<()> {
        let now = Instant::now();
        if self.heal_at.is_some_and(|t| now >= t) {
            self.heal_at = None;
            self.net.set_cut(BTreeSet::new());
            self.trace.event("partition healed");
        }
        let due: Vec<NodeId> = self.down.iter().filter(|(_, t)| now >= **t).map(|(id, _)| *id).collect();
        for id in due {
            self.down.remove(&id);
            self.start(id).await?;
        }
        if self.heal_at.is_none() && self.rng.random_ratio(1, 150) {
            self.partition();
        }
        if self.rng.random_ratio(1, 400) {
            self.crash().await;
        }
        if self.rng.random_ratio(1, self.flip_every) {
            let addrs: Vec<SocketAddr> = self.truth.keys().copied().collect();
            if let Some(a) = addrs.choose(&mut self.rng).copied() {
                let up = self.truth.entry(a).or_default();
                *up = !*up;
                self.trace.event(format!("backend {a} turns {}", if *up { "up" } else { "down" }));
            }
        }
        while let Some(pos) = self.script.iter().position(|(at, _)| *at == step) {
            let (_, what) = self.script.remove(pos);
            self.scripted(what).await?;
        }
        Ok(())
    }

    fn partition(&mut self) {
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        if ids.len() < 2 {
            return;
        }
        let leader = client::leader(&self.net);
        let x = match leader {
            Some(l) if self.rng.random_bool(0.5) => l,
            _ => ids[self.rng.random_range(0..ids.len())],
        };
        let others: Vec<NodeId> = ids.iter().copied().filter(|y| *y != x).collect();
        let mut cut = BTreeSet::new();
        let kind = self.rng.random_range(0..4);
        let name = match kind {
            0 => {
                for y in &others {
                    cut.extend([(x, *y), (*y, x)]);
                }
                "isolate"
            }
            1 => {
                cut.extend(others.iter().map(|y| (x, *y)));
                "one-way: unheard"
            }
            2 => {
                cut.extend(others.iter().map(|y| (*y, x)));
                "one-way: deaf"
            }
            _ => {
                // x bridges two halves that cannot reach each other.
                let (a, b) = others.split_at(others.len() / 2);
                for p in a {
                    for q in b {
                        cut.extend([(*p, *q), (*q, *p)]);
                    }
                }
                "bridge"
            }
        };
        let lasts = Duration::from_millis(self.rng.random_range(500..5000));
        self.trace.event(format!("partition {name} around {x} for {} ms: {cut:?}", lasts.as_millis()));
        self.net.set_cut(cut);
        self.heal_at = Some(Instant::now() + lasts);
    }

    async fn crash(&mut self) {
        if self.voters().is_none() {
            return;
        }
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        let Some(&id) = ids.choose(&mut self.rng) else { return };
        if !self.may_stop(id) {
            return;
        }
        let out = Duration::from_millis(self.rng.random_range(500..8000));
        self.trace.event(format!("crash {id} for {} ms", out.as_millis()));
        self.stop(id).await;
        self.down.insert(id, Instant::now() + out);
    }

    async fn scripted(&mut self, what: Scripted) -> anyhow::Result<()> {
        self.trace.event(format!("script {what:?}"));
        match what {
            Scripted::Partition => {
                if self.heal_at.is_none() {
                    self.partition();
                }
            }
            Scripted::Grow => {
                for _ in 0..2 {
                    let id = self.fresh_id();
                    self.start(id).await?;
                }
            }
            Scripted::Shrink => {
                // Decommission two voters for good: plan removes them after the dead grace.
                for _ in 0..2 {
                    let Some((_, voters)) = self.voters() else { break };
                    let live: Vec<NodeId> = voters.iter().copied().filter(|v| self.nodes.contains_key(v)).collect();
                    let Some(&id) = live.choose(&mut self.rng) else { break };
                    if self.may_stop(id) {
                        self.trace.event(format!("decommission {id}"));
                        self.stop(id).await;
                    }
                }
            }
            Scripted::Replace => {
                // A node loses its disk and comes back as a new node.
                let Some((_, voters)) = self.voters() else { return Ok(()) };
                let live: Vec<NodeId> = voters.iter().copied().filter(|v| self.nodes.contains_key(v)).collect();
                let Some(&old) = live.choose(&mut self.rng) else { return Ok(()) };
                if self.may_stop(old) {
                    self.stop(old).await;
                    std::fs::remove_dir_all(self.dir(old))?;
                    let new = self.fresh_id();
                    self.trace.event(format!("wipe {old}, rejoins as {new}"));
                    self.start(new).await?;
                }
            }
        }
        Ok(())
    }

    /// Reads every node's metrics and newly applied entries; checks terms, leaders and the log.
    async fn observe(&mut self) {
        for (id, node) in self.nodes.iter_mut() {
            let m = node.raft.metrics().borrow().clone();
            let term = self.terms.entry(*id).or_default();
            // Term 0 is what metrics show before a restarted core has published its vote.
            if m.current_term != 0 && m.current_term < *term {
                self.violations.push(format!("node {id}: term went back from {term} to {}", m.current_term));
            }
            *term = (*term).max(m.current_term);
            if m.state == ServerState::Leader && self.leaders.entry(m.current_term).or_default().insert(*id) {
                self.trace.event(format!("leader {id} term {}", m.current_term));
                let lid = m.vote.leader_id();
                if lid.node_id != *id || !m.vote.is_committed() {
                    self.violations.push(format!("node {id} leads without its own committed vote: {}", m.vote));
                }
            }
            let applied = m.last_applied.map(|l| l.index).unwrap_or(0);
            let seen = self.seen.entry(*id).or_default();
            if applied <= *seen {
                continue;
            }
            match node.log.try_get_log_entries(*seen + 1..=applied).await {
                Ok(entries) => {
                    for e in entries {
                        if let Err(v) = check::record_committed(&mut self.committed, *id, e) {
                            self.violations.push(v);
                        }
                    }
                }
                Err(e) => self.violations.push(format!("node {id}: cannot read its log: {e}")),
            }
            *seen = applied;
        }
    }

    /// Lifts every fault and restarts every crashed node.
    async fn heal(&mut self) -> anyhow::Result<()> {
        self.trace.event("heal");
        self.heal_at = None;
        self.net.set_cut(BTreeSet::new());
        self.net.set_faults(Faults { max_delay: 5, ..Faults::default() });
        for id in std::mem::take(&mut self.down).into_keys() {
            self.start(id).await?;
        }
        Ok(())
    }

    /// After healing: one leader, a settled membership holding every live node, the same
    /// applied index and state everywhere, and a fresh write that succeeds and spreads; and
    /// every node's routing verdicts equal to the backends' (now fixed) true health.
    async fn converge(&mut self) {
        let healed = Instant::now();
        let deadline = healed + CONVERGE;
        let mut final_write: Option<JoinHandle<Outcome>> = None;
        let mut wrote = false;
        while Instant::now() < deadline {
            self.tick().await;
            if let Some(w) = final_write.take_if(|w| w.is_finished()) {
                let outcome = w.await.unwrap_or(Outcome::Unknown);
                if !matches!(outcome, Outcome::Acked(_)) {
                    self.violations.push(format!("after healing, a fresh write failed: {outcome:?}"));
                    return;
                }
                wrote = true;
            }
            if !self.settled() {
                continue;
            }
            if !wrote {
                if final_write.is_none() {
                    final_write = Some(self.final_write(deadline));
                }
                continue;
            }
            if self.routing_ms.is_none() && self.routing().is_empty() {
                self.routing_ms = Some(healed.elapsed().as_millis() as u64);
                self.trace.event("routing agrees with the true health everywhere");
            }
            if self.routing_ms.is_some() {
                self.trace.event("converged");
                return;
            }
        }
        if wrote && self.settled() {
            let why = self.routing().join("; ");
            self.violations.push(format!(
                "routing not converged {} s after healing (truth {:?}): {why}",
                CONVERGE.as_secs(),
                self.truth
            ));
            return;
        }
        let detail: Vec<String> = self
            .nodes
            .iter()
            .map(|(id, n)| {
                let m = n.raft.metrics().borrow().clone();
                format!(
                    "{id}: {:?} term {} applied {:?} log {:?} members {}",
                    m.state,
                    m.current_term,
                    m.last_applied,
                    m.last_log_index,
                    m.membership_config.membership()
                )
            })
            .collect();
        self.violations.push(format!("not converged {} s after healing: {}", CONVERGE.as_secs(), detail.join("; ")));
    }

    /// The fresh write after healing, in the background so shoal's loops keep running.
    fn final_write(&self, deadline: Instant) -> JoinHandle<Outcome> {
        let cmd = Command::PutPool {
            name: "final".into(),
            spec: PoolSpec { pattern: Some("/final/".into()), ..PoolSpec::default() },
        };
        let p = Proposal { id: mix(self.seed ^ 0xF1A1) | 1, cmd: cmd.clone() };
        let (net, trace, ops) = (self.net.clone(), self.trace.clone(), self.ops.clone());
        tokio::spawn(async move {
            let invoked_ms = trace.now_ms();
            let outcome = client::write_once(&net, p.clone(), deadline).await;
            trace.event(format!("final write {outcome:?}"));
            let op = Op {
                client: CLIENTS,
                proposal: p.id,
                cmd,
                invoked_ms,
                returned_ms: trace.now_ms(),
                outcome: outcome.clone(),
            };
            ops.lock().unwrap_or_else(|p| p.into_inner()).push(op);
            outcome
        })
    }

    fn settled(&self) -> bool {
        let Some(leader) = client::leader(&self.net) else { return false };
        let Some(l) = self.nodes.get(&leader) else { return false };
        let lm = l.raft.metrics().borrow().clone();
        let membership = lm.membership_config.membership();
        let members: BTreeSet<NodeId> = membership.nodes().map(|(id, _)| *id).collect();
        let live: BTreeSet<NodeId> = self.nodes.keys().copied().collect();
        // An even voter count is allowed: `plan` promotes up to an odd count but never demotes
        // a live voter, so 5 voters losing one for good stay at 4.
        if membership.get_joint_config().len() > 1
            || members != live
            || lm.last_applied.map(|x| x.index) != lm.last_log_index
        {
            return false;
        }
        let state = l.sm.current();
        self.nodes.values().all(|n| {
            let m = n.raft.metrics().borrow().clone();
            m.last_applied == lm.last_applied && n.sm.current() == state
        })
    }

    /// Where the nodes' routing verdicts differ from the true health (empty: they all agree).
    fn routing(&self) -> Vec<String> {
        let Some(first) = self.nodes.values().next() else { return Vec::new() };
        let truth = &self.truth;
        let expected = check::expected_routing(&first.sm.current(), |a| truth.get(&a).copied().unwrap_or(true));
        let views = self.nodes.iter().map(|(id, n)| (*id, n.health.routing().clone())).collect();
        check::check_routing(&expected, &views)
    }

    fn final_checks(&mut self) {
        self.violations.extend(check::check_one_cluster(&self.identities, &self.initialized));
        let held: BTreeSet<Option<u128>> = self.nodes.values().map(|n| n.ident.get().map(|c| c.0)).collect();
        if held.len() > 1 || held.contains(&None) {
            let count = held.iter().flatten().count();
            self.violations.push(format!(
                "live nodes hold {count} distinct cluster identities{}",
                if held.contains(&None) { " and some none" } else { "" }
            ));
        }
        self.violations.extend(check::check_log_order(&self.committed));
        let replay = match check::replay(&self.committed) {
            Ok(r) => r,
            Err(e) => {
                self.violations.push(e);
                return;
            }
        };
        let ops = self.ops.lock().unwrap_or_else(|p| p.into_inner()).clone();
        self.violations.extend(check::check_history(&replay, &ops));
        for (id, n) in &self.nodes {
            let applied = n.raft.metrics().borrow().last_applied.map(|l| l.index).unwrap_or(0);
            let expect = replay.by_index.get(&applied).cloned().unwrap_or_default();
            let has: State = (*n.sm.current()).clone();
            if has != expect {
                self.violations.push(format!(
                    "node {id} at index {applied} holds version {}, the committed log gives version {}",
                    has.version, expect.version
                ));
            }
        }
        self.trace.event(format!("final version {} at index {}", replay.state.version, replay.last_index));
    }

    fn report(self) -> Report {
        let ops = self.ops.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let count = |f: fn(&Outcome) -> bool| ops.iter().filter(|o| f(&o.outcome)).count();
        Report {
            seed: self.seed,
            hash: self.trace.hash(),
            events: self.trace.events(),
            virtual_ms: self.trace.now_ms(),
            acked: count(|o| matches!(o, Outcome::Acked(_))),
            refused: count(|o| matches!(o, Outcome::Refused(_))),
            unknown: count(|o| matches!(o, Outcome::Unknown)),
            final_version: check::replay(&self.committed).map(|r| r.state.version).unwrap_or(0),
            leaders: self.leaders.values().map(|s| s.len()).sum(),
            multi_leader_terms: self.leaders.values().filter(|s| s.len() > 1).count(),
            bootstrap: self.bootstrap,
            routing_ms: self.routing_ms,
            tail: self.trace.tail(),
            violations: self.violations,
        }
    }
}

/// When the scripted membership changes happen (step numbers), jittered per seed.
fn script(rng: &mut StdRng, steps: u64) -> Vec<(u64, Scripted)> {
    let mut out = Vec::new();
    for (frac, what) in [(6, Scripted::Grow), (2, Scripted::Shrink)] {
        let at = steps / frac;
        out.push((at + rng.random_range(0..=at / 4), what));
    }
    if rng.random_bool(0.8) {
        out.push((steps * 3 / 4 + rng.random_range(0..=steps / 16), Scripted::Replace));
    }
    out
}

fn shoal_node(id: NodeId) -> ShoalNode {
    ShoalNode { name: format!("n{id}"), raft_addr: format!("sim:{id}"), admin: String::new() }
}

/// Opens the store; a just-stopped node's tasks may still hold it for a moment.
async fn open_db(path: &Path) -> anyhow::Result<Db> {
    let mut tries = 0;
    loop {
        match Db::open(path) {
            Ok(db) => return Ok(db),
            Err(e) if tries < 100 => {
                tries += 1;
                let _ = e;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// The addresses of every backend the clients and the health pool use.
fn backends() -> impl Iterator<Item = SocketAddr> {
    (1..=6).map(|i| SocketAddr::from(([10, 0, 0, i], 80))).chain((1..=3).map(|i| SocketAddr::from(([10, 0, 1, i], 80))))
}

/// The world's own health-checked pool (HTTP checks, shoal's default interval, rise and fall).
fn health_pool() -> Vec<Command> {
    let pool =
        Command::PutPool { name: "h".into(), spec: PoolSpec { pattern: Some("/h/".into()), ..PoolSpec::default() } };
    let backends = (1..=3).map(|i| Command::PutBackend {
        pool: "h".into(),
        addr: SocketAddr::from(([10, 0, 1, i], 80)),
        spec: BackendSpec::default(),
    });
    [pool].into_iter().chain(backends).collect()
}

/// shoal's `verified`: a gossiped node is admitted only after it answers a ping, with no
/// identity of another cluster.
async fn verified(net: &SimNet, from: NodeId, to: NodeId, ours: Option<ClusterId>) -> Result<(), String> {
    match net.ping(from, to, Duration::from_secs(3)).await {
        Ok(theirs) if compatible(ours, theirs) => Ok(()),
        Ok(_) => Err("not admitted: another cluster".into()),
        Err(e) => Err(format!("not admitted: ping {e}")),
    }
}

async fn execute(r: &Raft, action: Action) -> Result<(), String> {
    let result = match action {
        Action::AddLearner(id, node) => r.add_learner(id, node, false).await.map(|_| ()),
        Action::Promote(id) => r.change_membership(ChangeMembers::AddVoterIds([id].into()), false).await.map(|_| ()),
        Action::RemoveVoter(id) => {
            r.change_membership(ChangeMembers::RemoveVoters([id].into()), false).await.map(|_| ())
        }
        Action::RemoveLearner(id) => {
            r.change_membership(ChangeMembers::RemoveNodes([id].into()), false).await.map(|_| ())
        }
        Action::FinishJoint(goal) => {
            r.change_membership(ChangeMembers::ReplaceAllVoters(goal), false).await.map(|_| ())
        }
    };
    result.map_err(|e| e.to_string())
}
