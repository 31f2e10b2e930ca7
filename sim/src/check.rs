//! Checkers, pure functions over what the run observed, so a self-test can feed them a
//! doctored history and see them fail: the committed log and client history, one cluster
//! identity, and routing verdicts against the backends' true health.
//!
//! The committed log is assembled from every node's applied prefix; `State.version` rises by
//! exactly 1 per successful non-`Noop` command, so replaying that log through the same `apply`
//! and dedup rule as the state machine tells, for each proposal, the version it produced: the
//! history check is a set of order comparisons, no linearizability search.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::SocketAddr;

use openraft::{Entry, EntryPayload, LogId};
use shoal_node::control::raft::ident::ClusterId;
use shoal_node::control::raft::{CommandResult, NodeId, TypeConfig};
use shoal_node::health::{BackendId, Verdict};
use shoal_proto::{ApplyError, CheckKind, Command, Proposal, State, apply};

/// One client operation and how it ended.
#[derive(Clone, Debug)]
pub struct Op {
    pub client: usize,
    pub proposal: u64,
    pub cmd: Command,
    pub invoked_ms: u64,
    pub returned_ms: u64,
    pub outcome: Outcome,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Committed and applied, at this state version.
    Acked(u64),
    /// Committed, and `apply` refused it: it must change nothing.
    Refused(ApplyError),
    /// Timed out: may or may not have happened, but at most once.
    Unknown,
}

/// The committed log as observed: index → entry. Gaps mean a prefix nobody was seen holding.
pub type Committed = BTreeMap<u64, Entry<TypeConfig>>;

/// Records `entry` as committed at its index; a different entry there already is a violation.
pub fn record_committed(log: &mut Committed, node: NodeId, entry: Entry<TypeConfig>) -> Result<(), String> {
    match log.get(&entry.log_id.index) {
        Some(known) if !same_entry(known, &entry) => Err(format!(
            "committed entry changed at index {}: had {} ({}), node {node} has {} ({})",
            entry.log_id.index,
            known.log_id,
            payload(known),
            entry.log_id,
            payload(&entry)
        )),
        Some(_) => Ok(()),
        None => {
            log.insert(entry.log_id.index, entry);
            Ok(())
        }
    }
}

fn same_entry(a: &Entry<TypeConfig>, b: &Entry<TypeConfig>) -> bool {
    a.log_id == b.log_id && payload(a) == payload(b)
}

fn payload(e: &Entry<TypeConfig>) -> String {
    serde_json::to_string(&e.payload).unwrap_or_default()
}

/// Log ids along the committed log never go back (leader ids are totally ordered).
pub fn check_log_order(log: &Committed) -> Vec<String> {
    let mut out = Vec::new();
    let mut prev: Option<&LogId<NodeId>> = None;
    for e in log.values() {
        if let Some(p) = prev
            && p.leader_id > e.log_id.leader_id
        {
            out.push(format!("committed log goes back from {p} to {}", e.log_id));
        }
        prev = Some(&e.log_id);
    }
    out
}

/// What replaying the committed log gives.
#[derive(Debug, Default)]
pub struct Replay {
    pub state: State,
    pub last_index: u64,
    /// Per proposal id: the result of its first application, and how many entries changed the state for it.
    pub results: BTreeMap<u64, (CommandResult, usize)>,
    /// State after each index that changed it (version → index), for per-node comparisons.
    pub by_index: BTreeMap<u64, State>,
}

/// Same rule as the state machine: a repeated id within the last 1024 proposals is a no-op.
const RECENT: usize = 1024;

/// Replays the contiguous committed log from index 1.
pub fn replay(log: &Committed) -> Result<Replay, String> {
    let mut r = Replay::default();
    let mut recent: VecDeque<u64> = VecDeque::new();
    for (index, e) in log {
        if *index != r.last_index + 1 {
            return Err(format!("committed log has a gap before index {index} (last seen {})", r.last_index));
        }
        r.last_index = *index;
        if let EntryPayload::Normal(Proposal { id, cmd }) = &e.payload {
            apply_once(&mut r, &mut recent, *id, cmd);
        }
        r.by_index.insert(*index, r.state.clone());
    }
    Ok(r)
}

fn apply_once(r: &mut Replay, recent: &mut VecDeque<u64>, id: u64, cmd: &Command) {
    if id != 0 && recent.contains(&id) {
        return;
    }
    let before = r.state.version;
    let result = apply(&mut r.state, cmd);
    let changed = usize::from(r.state.version != before);
    let slot = r.results.entry(id).or_insert((result, 0));
    slot.1 += changed;
    if id != 0 {
        if recent.len() >= RECENT {
            recent.pop_front();
        }
        recent.push_back(id);
    }
}

/// Every acknowledged write applied exactly once at its version, no refused write took effect,
/// unknown outcomes at most once, and real-time order respected by versions.
pub fn check_history(r: &Replay, ops: &[Op]) -> Vec<String> {
    let mut out = Vec::new();
    for op in ops {
        let seen = r.results.get(&op.proposal);
        match (&op.outcome, seen) {
            (Outcome::Acked(v), Some((Ok(a), 1))) if a.version == *v => {}
            (Outcome::Acked(v), other) => out.push(format!(
                "acked write {:#x} at version {v} is not in the log exactly once there: {other:?}",
                op.proposal
            )),
            (Outcome::Refused(_), None | Some((Err(_), 0))) => {}
            (Outcome::Refused(e), other) => {
                out.push(format!("refused write {:#x} ({e}) took effect: {other:?}", op.proposal))
            }
            (Outcome::Unknown, None | Some((_, 0 | 1))) => {}
            (Outcome::Unknown, other) => {
                out.push(format!("write {:#x} applied more than once: {other:?}", op.proposal))
            }
        }
    }
    out.extend(check_real_time(ops));
    out
}

/// If A was acked before B was invoked, A's version is lower.
fn check_real_time(ops: &[Op]) -> Vec<String> {
    let mut acked: Vec<(&Op, u64)> =
        ops.iter().filter_map(|o| if let Outcome::Acked(v) = o.outcome { Some((o, v)) } else { None }).collect();
    let mut by_return = acked.clone();
    by_return.sort_by_key(|(o, _)| o.returned_ms);
    acked.sort_by_key(|(o, _)| o.invoked_ms);
    let mut out = Vec::new();
    let (mut i, mut max_before): (usize, Option<(&Op, u64)>) = (0, None);
    for (b, vb) in &acked {
        while i < by_return.len() && by_return[i].0.returned_ms < b.invoked_ms {
            if max_before.is_none_or(|(_, v)| by_return[i].1 > v) {
                max_before = Some(by_return[i]);
            }
            i += 1;
        }
        if let Some((a, va)) = max_before
            && va >= *vb
        {
            out.push(format!(
                "write {:#x} acked at {} ms with version {va}, yet {:#x} invoked later at {} ms got version {vb}",
                a.proposal, a.returned_ms, b.proposal, b.invoked_ms
            ));
        }
    }
    out
}

/// At most one cluster identity ever formed, and at most one node ever initialized a cluster:
/// two would be two clusters that never merge (shoal refuses across identities by design).
/// `created` lists each identity creation (node, identity); `initialized` each node whose
/// `initialize` succeeded.
pub fn check_one_cluster(created: &[(NodeId, ClusterId)], initialized: &[NodeId]) -> Vec<String> {
    let mut out = Vec::new();
    let distinct: BTreeSet<u128> = created.iter().map(|(_, c)| c.0).collect();
    if distinct.len() > 1 {
        let by: Vec<NodeId> = created.iter().map(|(n, _)| *n).collect();
        out.push(format!("{} cluster identities formed (created by nodes {by:?})", distinct.len()));
    }
    let nodes: BTreeSet<NodeId> = initialized.iter().copied().collect();
    if nodes.len() > 1 {
        out.push(format!("{} nodes initialized a cluster: {nodes:?}", nodes.len()));
    }
    out
}

/// The routing verdicts every node must hold once health has settled: for each backend of
/// `state`, up or down as `up` says for actively checked pools, up for unchecked ones.
pub fn expected_routing(state: &State, up: impl Fn(SocketAddr) -> bool) -> HashMap<BackendId, Verdict> {
    let mut out = HashMap::new();
    for pool in state.pools.values() {
        for b in pool.backends.values() {
            let v = match pool.spec.check() {
                CheckKind::None => Verdict::Up,
                CheckKind::Http | CheckKind::Tcp if up(b.addr) => Verdict::Up,
                CheckKind::Http | CheckKind::Tcp => Verdict::Down,
                // Heartbeat pools are not simulated: whatever combine says.
                CheckKind::Heartbeat => continue,
            };
            out.insert((pool.name.clone(), b.addr), v);
        }
    }
    out
}

/// Every node's routing verdicts equal `expected` (hence each other); one line per node that
/// differs, naming a few of its differences.
pub fn check_routing(
    expected: &HashMap<BackendId, Verdict>,
    views: &BTreeMap<NodeId, HashMap<BackendId, Verdict>>,
) -> Vec<String> {
    let mut out = Vec::new();
    for (node, view) in views {
        let mut diffs: Vec<String> = expected
            .iter()
            .filter(|(id, v)| view.get(*id) != Some(*v))
            .map(|(id, v)| format!("{}/{} {:?} (truth {v:?})", id.0, id.1, view.get(id).copied().unwrap_or_default()))
            .chain(view.keys().filter(|id| !expected.contains_key(*id)).map(|id| format!("{}/{} extra", id.0, id.1)))
            .collect();
        if diffs.is_empty() {
            continue;
        }
        diffs.sort();
        let more = diffs.len().saturating_sub(4);
        diffs.truncate(4);
        let more = if more > 0 { format!(" and {more} more") } else { String::new() };
        out.push(format!("node {node} routes {}{more}", diffs.join(", ")));
    }
    out
}
