//! One simulated run: N shoal Raft nodes (real `LogStore` and `StateMachine` on redb files in a
//! temp dir) on a `SimNet`, seeded faults every step, membership driven by shoal's
//! `membership::plan`, seeded clients, and the checkers after every step and at the end.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::{ChangeMembers, RaftLogReader, ServerState};
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use shoal_node::control::membership::{Action, Policy, View, plan};
use shoal_node::control::raft::state_machine::StateMachine;
use shoal_node::control::raft::store::{Db, LogStore};
use shoal_node::control::raft::{NodeId, Raft, RaftTiming, ShoalNode, raft_config, rt};
use shoal_proto::{Command, PoolSpec, Proposal, State};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::check::{self, Committed, Op, Outcome};
use crate::client;
use crate::net::{Factory, Faults, SimNet};
use crate::trace::{Trace, mix};

/// Virtual time per step.
pub const STEP: Duration = Duration::from_millis(20);
/// After healing, every live node must agree within this much virtual time.
pub const CONVERGE: Duration = Duration::from_secs(30);
const CLIENTS: usize = 3;

/// What to run.
#[derive(Clone, Debug)]
pub struct Settings {
    pub seed: u64,
    /// Fault steps (20 ms each); 3000 is one simulated minute.
    pub steps: u64,
    pub verbose: bool,
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

/// A running node and the handles the checkers read through.
struct Node {
    raft: Raft,
    log: LogStore,
    sm: StateMachine,
    up_since: Instant,
}

struct World {
    seed: u64,
    steps: u64,
    rng: StdRng,
    trace: Trace,
    net: SimNet,
    _tmp: tempfile::TempDir,
    base: PathBuf,
    nodes: BTreeMap<NodeId, Node>,
    /// Crashed with their store kept: restart at this time.
    down: BTreeMap<NodeId, Instant>,
    /// When each stopped node went away (crashed, decommissioned or wiped).
    gone_since: BTreeMap<NodeId, Instant>,
    next_id: NodeId,
    /// Per node, the highest applied index whose entries were read into `committed`.
    seen: BTreeMap<NodeId, u64>,
    committed: Committed,
    terms: BTreeMap<NodeId, u64>,
    leaders: BTreeMap<u64, BTreeSet<NodeId>>,
    violations: Vec<String>,
    ops: Arc<Mutex<Vec<Op>>>,
    heal_at: Option<Instant>,
    reconciling: Arc<AtomicBool>,
    script: Vec<(u64, Scripted)>,
}

#[derive(Clone, Copy, Debug)]
enum Scripted {
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
        let mut world = World {
            seed: settings.seed,
            steps: settings.steps,
            script: script(&mut rng, settings.steps),
            rng,
            net: SimNet::new(settings.seed, faults, trace.clone()),
            trace,
            base: tmp.path().to_path_buf(),
            _tmp: tmp,
            nodes: BTreeMap::new(),
            down: BTreeMap::new(),
            gone_since: BTreeMap::new(),
            next_id: 1,
            seen: BTreeMap::new(),
            committed: Committed::new(),
            terms: BTreeMap::new(),
            leaders: BTreeMap::new(),
            violations: Vec::new(),
            ops: Arc::default(),
            heal_at: None,
            reconciling: Arc::default(),
        };
        if let Err(e) = world.play().await {
            world.violations.push(format!("harness error: {e:#}"));
        }
        world.report()
    }

    async fn play(&mut self) -> anyhow::Result<()> {
        let first: Vec<NodeId> = (0..3).map(|_| self.fresh_id()).collect();
        for id in &first {
            self.start(*id).await?;
        }
        let members = first.iter().map(|id| (*id, shoal_node(*id))).collect::<BTreeMap<_, _>>();
        self.nodes[&first[0]].raft.initialize(members).await?;
        let (stop_tx, stop) = watch::channel(false);
        let clients: Vec<_> = (0..CLIENTS)
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
        for step in 0..self.steps {
            tokio::time::sleep(STEP).await;
            self.faults(step).await?;
            self.observe().await;
            if step.is_multiple_of(25) {
                self.reconcile();
            }
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
        let config = Arc::new(raft_config("sim", &RaftTiming::default())?);
        let factory = Factory { me: id, net: self.net.clone() };
        let raft = Raft::new(id, config, factory, LogStore::new(db.clone()), sm.clone()).await?;
        self.net.set_up(id, Some(raft.clone()));
        self.nodes.insert(id, Node { raft, log: LogStore::new(db), sm, up_since: Instant::now() });
        self.gone_since.remove(&id);
        self.trace.event(format!("start {id}"));
        Ok(())
    }

    /// Stops a node abruptly (no leadership hand-over); its store stays on disk.
    async fn stop(&mut self, id: NodeId) {
        self.net.set_up(id, None);
        if let Some(node) = self.nodes.remove(&id) {
            let _ = node.raft.shutdown().await;
        }
        self.gone_since.insert(id, Instant::now());
        self.trace.event(format!("stop {id}"));
    }

    /// Voters in the current leader's membership config.
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

    /// Whether stopping one more of the voters still leaves a live majority of them.
    fn may_stop_one(&self, voters: &BTreeSet<NodeId>) -> bool {
        let live = voters.iter().filter(|v| self.nodes.contains_key(v)).count();
        (live - 1) * 2 > voters.len()
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
        if let Some(pos) = self.script.iter().position(|(at, _)| *at == step) {
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
        let Some((_, voters)) = self.voters() else { return };
        if !self.may_stop_one(&voters) {
            return;
        }
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        let Some(&id) = ids.choose(&mut self.rng) else { return };
        let out = Duration::from_millis(self.rng.random_range(500..8000));
        self.trace.event(format!("crash {id} for {} ms", out.as_millis()));
        self.stop(id).await;
        self.down.insert(id, Instant::now() + out);
    }

    async fn scripted(&mut self, what: Scripted) -> anyhow::Result<()> {
        self.trace.event(format!("script {what:?}"));
        match what {
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
                    if !self.may_stop_one(&voters) {
                        break;
                    }
                    if let Some(&id) = live.choose(&mut self.rng) {
                        self.trace.event(format!("decommission {id}"));
                        self.stop(id).await;
                    }
                }
            }
            Scripted::Replace => {
                // A node loses its disk and comes back as a new node.
                let Some((_, voters)) = self.voters() else { return Ok(()) };
                let live: Vec<NodeId> = voters.iter().copied().filter(|v| self.nodes.contains_key(v)).collect();
                if !self.may_stop_one(&voters) {
                    return Ok(());
                }
                if let Some(&old) = live.choose(&mut self.rng) {
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

    /// One pass of shoal's membership planner on the leader, liveness taken from the harness
    /// (gossip is not simulated).
    fn reconcile(&mut self) {
        if self.reconciling.load(Ordering::SeqCst) {
            return;
        }
        let Some(leader) = client::leader(&self.net) else { return };
        let Some(node) = self.nodes.get(&leader) else { return };
        let m = node.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let configs = membership.get_joint_config();
        let joint = (configs.len() > 1).then(|| configs.last().cloned().unwrap_or_default());
        let now = Instant::now();
        let view = View {
            me: leader,
            voters: membership.voter_ids().collect(),
            learners: membership.learner_ids().collect(),
            live: self.nodes.iter().map(|(id, n)| (*id, (shoal_node(*id), now - n.up_since))).collect(),
            absent: self.gone_since.iter().map(|(id, t)| (*id, now - *t)).collect(),
            matched: m.replication.iter().flatten().map(|(id, l)| (*id, l.map(|l| l.index).unwrap_or(0))).collect(),
            last_log_index: m.last_log_index.unwrap_or(0),
            joint,
            ..View::default()
        };
        let policy = Policy {
            max_voters: 5,
            dead_grace: Duration::from_secs(5),
            promote_after: Duration::from_secs(1),
            max_lag: 100,
        };
        let Some(action) = plan(&view, &policy) else { return };
        self.trace.event(format!("plan on {leader}: {action:?}"));
        let (raft, busy, trace) = (node.raft.clone(), self.reconciling.clone(), self.trace.clone());
        busy.store(true, Ordering::SeqCst);
        tokio::spawn(async move {
            let done = tokio::time::timeout(Duration::from_secs(10), execute(&raft, action.clone())).await;
            trace.event(format!(
                "plan {action:?}: {}",
                match done {
                    Ok(Ok(())) => "done".to_string(),
                    Ok(Err(e)) => format!("failed: {e}"),
                    Err(_) => "timed out".to_string(),
                }
            ));
            busy.store(false, Ordering::SeqCst);
        });
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

    /// After healing: one leader, a settled membership holding every live node, and the same
    /// applied index and state everywhere; then a fresh write must succeed and spread.
    async fn converge(&mut self) {
        let deadline = Instant::now() + CONVERGE;
        let mut wrote = false;
        let mut tick = 0u64;
        while Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
            self.observe().await;
            tick += 1;
            if tick.is_multiple_of(5) {
                self.reconcile();
            }
            if !self.settled() {
                continue;
            }
            if wrote {
                self.trace.event("converged");
                return;
            }
            let cmd = Command::PutPool {
                name: "final".into(),
                spec: PoolSpec { pattern: Some("/final/".into()), ..PoolSpec::default() },
            };
            let p = Proposal { id: mix(self.seed ^ 0xF1A1) | 1, cmd: cmd.clone() };
            let invoked_ms = self.trace.now_ms();
            let outcome = client::write_once(&self.net, p.clone(), deadline).await;
            self.trace.event(format!("final write {outcome:?}"));
            let op = Op {
                client: CLIENTS,
                proposal: p.id,
                cmd,
                invoked_ms,
                returned_ms: self.trace.now_ms(),
                outcome: outcome.clone(),
            };
            self.ops.lock().unwrap_or_else(|p| p.into_inner()).push(op);
            if !matches!(outcome, Outcome::Acked(_)) {
                self.violations.push(format!("after healing, a fresh write failed: {outcome:?}"));
                return;
            }
            wrote = true;
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

    fn final_checks(&mut self) {
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
