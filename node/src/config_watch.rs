//! Config sources (a `--config` file, the EC environment) kept in force. A source is applied at
//! start when its content changed since it was last applied; a file is then re-read every poll
//! interval and on SIGHUP. A changed file is validated, compared with the cluster's current
//! state and only the difference is proposed, as one atomic batch. A bad file is refused with
//! the key named, and the running state is kept. What was applied last (digest and pools) is
//! kept in the data dir, so a pool removed from the file is removed from the cluster while pools
//! created through the API are left alone.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use shoal_proto::{ApplyError, Command, Pool, State, apply};
use tokio::signal::unix::Signal;

use crate::config::{self, ConfigError, ConfigFile};
use crate::control::ProposeError;
use crate::control::raft::RaftNode;
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;

/// Pools from a file or the EC environment, proposed when their content changed.
pub struct Source {
    pub label: String,
    pub file: ConfigFile,
    pub digest: String,
    /// File in the data dir remembering what was applied last.
    pub marker: &'static str,
    /// Set for a config file: keep it in force after start.
    pub watch: Option<Watch>,
}

/// How a config file is watched.
pub struct Watch {
    pub path: PathBuf,
    /// How often the file is re-read (zero: only on SIGHUP).
    pub poll: Duration,
    /// SIGHUP, registered before the node reports ready.
    pub hangup: Option<Signal>,
}

/// The digest a config source is known by.
pub fn digest(bytes: &[u8]) -> String {
    format!("{:016x}", crate::hash::stable_hash(bytes, 0))
}

/// What was applied last, kept in the data dir.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Record {
    digest: String,
    /// The pools as the source wrote them (`None`: written by an older version, digest only).
    pools: Option<BTreeMap<String, Pool>>,
}

fn read_record(path: &Path) -> Option<Record> {
    let text = std::fs::read_to_string(path).ok()?;
    match serde_json::from_str(&text) {
        Ok(r) => Some(r),
        Err(_) => Some(Record { digest: text.trim().to_string(), pools: None }),
    }
}

/// Written atomically, so a crash leaves the old record or the new one; owner-only, since
/// the pools it records may carry heartbeat secrets.
fn write_record(path: &Path, record: &Record) -> std::io::Result<()> {
    crate::files::write_atomic(path, &serde_json::to_vec(record).map_err(std::io::Error::other)?, 0o600)
}

// ---------------------------------------------------------------- the difference

/// One change a source makes, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub pool: String,
    pub what: String,
}

/// The commands that bring the source's pools in, and what they change.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    pub commands: Vec<Command>,
    pub changes: Vec<Change>,
}

/// Compares the source's `wanted` pools with the cluster's `current` state. Only pools that
/// changed in the source since `previous` (all of them when `previous` is unknown) are brought
/// to what it says, and pools it no longer has are removed; the cluster's state stays
/// authoritative for the rest. Empty when the state already matches (another node applied the
/// same content). Fails when the result would conflict with pools the source does not own.
pub fn plan(
    previous: Option<&BTreeMap<String, Pool>>,
    current: &State,
    wanted: &BTreeMap<String, Pool>,
) -> Result<Plan, ApplyError> {
    let removed: Vec<&String> = previous
        .into_iter()
        .flat_map(|p| p.keys())
        .filter(|n| !wanted.contains_key(*n) && current.pools.contains_key(*n))
        .collect();
    let edited: Vec<(&Pool, Option<&Pool>)> = wanted
        .values()
        .filter(|p| previous.is_none_or(|prev| prev.get(&p.name) != Some(*p)))
        .map(|p| (p, current.pools.get(&p.name)))
        .filter(|(p, cur)| *cur != Some(*p))
        .collect();
    let mut out = Plan::default();
    for name in &removed {
        out.commands.push(Command::DeletePool { name: (*name).clone() });
        out.changes.push(Change { pool: (*name).clone(), what: "removed (no longer in the file)".into() });
    }
    for (want, cur) in &edited {
        out.commands.extend(pool_commands(want, *cur));
        out.changes.push(Change { pool: want.name.clone(), what: describe(want, *cur) });
    }
    if out.commands.is_empty() || apply(&mut current.clone(), &Command::Batch(out.commands.clone())).is_ok() {
        return Ok(out);
    }
    // In-place edits can collide on the way (two pools swapping a port, a pool turning into a
    // heartbeat pool): replace the edited pools instead.
    out.commands = removed.iter().map(|n| Command::DeletePool { name: (*n).clone() }).collect();
    for (want, cur) in &edited {
        if cur.is_some() {
            out.commands.push(Command::DeletePool { name: want.name.clone() });
        }
    }
    for (want, _) in &edited {
        out.commands.extend(pool_commands(want, None));
    }
    apply(&mut current.clone(), &Command::Batch(out.commands.clone()))?;
    Ok(out)
}

/// Commands that turn `cur` (absent: a new pool) into `want` in place.
fn pool_commands(want: &Pool, cur: Option<&Pool>) -> Vec<Command> {
    let name = &want.name;
    let mut cmds = Vec::new();
    for (key, b) in cur.map(|c| &c.backends).into_iter().flatten() {
        if !want.backends.contains_key(key) {
            cmds.push(Command::DeleteBackend { pool: name.clone(), addr: b.addr });
        }
    }
    if cur.is_none_or(|c| c.spec != want.spec) {
        cmds.push(Command::PutPool { name: name.clone(), spec: want.spec.clone() });
    }
    for (key, b) in &want.backends {
        if cur.and_then(|c| c.backends.get(key)) != Some(b) {
            cmds.push(Command::PutBackend { pool: name.clone(), addr: b.addr, spec: b.spec.clone() });
        }
    }
    cmds
}

/// "added (2 backends)" or "changed: algorithm; backends added 10.0.0.3:80".
fn describe(want: &Pool, cur: Option<&Pool>) -> String {
    let Some(cur) = cur else {
        return format!("added ({} backends)", want.backends.len());
    };
    let mut parts = Vec::new();
    let fields = changed_fields(&cur.spec, &want.spec);
    if !fields.is_empty() {
        parts.push(fields.join(", "));
    }
    let list = |keys: Vec<&String>| keys.iter().map(|k| k.as_str()).collect::<Vec<_>>().join(" ");
    let added: Vec<&String> = want.backends.keys().filter(|k| !cur.backends.contains_key(*k)).collect();
    let gone: Vec<&String> = cur.backends.keys().filter(|k| !want.backends.contains_key(*k)).collect();
    let edited: Vec<String> = want
        .backends
        .iter()
        .filter_map(|(k, b)| cur.backends.get(k).filter(|c| *c != b).map(|c| (k, c, b)))
        .map(|(k, c, b)| format!("{k} ({})", changed_fields(&c.spec, &b.spec).join(", ")))
        .collect();
    if !added.is_empty() {
        parts.push(format!("backends added {}", list(added)));
    }
    if !gone.is_empty() {
        parts.push(format!("backends removed {}", list(gone)));
    }
    if !edited.is_empty() {
        parts.push(format!("backends changed {}", edited.join(" ")));
    }
    format!("changed: {}", parts.join("; "))
}

/// Top-level settings that differ between two specs, by their config key.
fn changed_fields<T: Serialize>(a: &T, b: &T) -> Vec<String> {
    let (Ok(serde_json::Value::Object(a)), Ok(serde_json::Value::Object(b))) =
        (serde_json::to_value(a), serde_json::to_value(b))
    else {
        return vec!["settings".into()];
    };
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    keys.into_iter().filter(|k| a.get(*k) != b.get(*k)).cloned().collect()
}

// ---------------------------------------------------------------- applying

/// A source's pools as `apply` would store them.
fn wanted_pools(file: &ConfigFile) -> Result<BTreeMap<String, Pool>, ConfigError> {
    Ok(file.validate()?.pools)
}

/// What a keeper needs of its node.
#[derive(Clone)]
pub struct Ctx {
    pub raft: Arc<RaftNode>,
    pub metrics: Arc<Metrics>,
    pub shutdown: Shutdown,
    /// Sources not yet applied at start (the node is not ready before); a keeper takes its
    /// own off once its first application is over.
    pub pending: Arc<AtomicUsize>,
}

/// Keeps one source in force.
pub struct Keeper {
    node: Ctx,
    label: String,
    marker: PathBuf,
    file: ConfigFile,
    digest: String,
    watch: Option<Watch>,
}

impl Keeper {
    pub fn new(node: Ctx, source: Source, data_dir: &Path) -> Keeper {
        Keeper {
            node,
            label: source.label,
            marker: data_dir.join(source.marker),
            file: source.file,
            digest: source.digest,
            watch: source.watch,
        }
    }

    /// Applies the source, then watches it (in a cluster, which may still elect its leader).
    pub async fn run(mut self) {
        self.apply_at_start().await;
        self.watch().await;
    }

    /// Proposes the source once a leader accepts writes, when its content changed since it was
    /// last applied; then the node may report ready.
    pub async fn apply_at_start(&mut self) {
        self.apply_if_changed().await;
        self.node.pending.fetch_sub(1, Ordering::Relaxed);
    }

    /// Proposes the source's difference once a leader accepts writes, unless this content was
    /// applied already.
    pub async fn apply_if_changed(&self) {
        let label = &self.label;
        if read_record(&self.marker).is_some_and(|r| r.digest == self.digest) {
            tracing::info!(source = %label, "unchanged since it was applied; the cluster's state is authoritative");
            return;
        }
        let Ok(wanted) = wanted_pools(&self.file) else { return };
        // Until a leader takes it or refuses it: the node is not ready before its sources are in.
        loop {
            match self.bring_in(&self.digest, wanted.clone()).await {
                Ok(_) => {
                    let summary = config::summary(&self.file);
                    return tracing::info!(source = %label, %summary, "pools applied");
                }
                Err(ProposeError::Unavailable(why)) => {
                    tracing::info!(%why, source = %label, "waiting for a leader to apply pools");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => return tracing::error!(source = %label, error = %e, "pools refused"),
            }
        }
    }

    /// Proposes what `wanted` changes, logs each change, and records it once committed.
    async fn bring_in(&self, digest: &str, wanted: BTreeMap<String, Pool>) -> Result<usize, ProposeError> {
        let previous = read_record(&self.marker).and_then(|r| r.pools);
        let plan = plan(previous.as_ref(), &self.node.raft.current(), &wanted)?;
        if !plan.commands.is_empty() {
            let applied = self.node.raft.propose(Command::Batch(plan.commands)).await?;
            for c in &plan.changes {
                tracing::info!(source = %self.label, pool = %c.pool, change = %c.what, version = applied.version, "config change applied");
            }
        }
        let record = Record { digest: digest.to_string(), pools: Some(wanted) };
        if let Err(e) = write_record(&self.marker, &record) {
            tracing::warn!(source = %self.label, error = %e, "cannot record the applied config; it is re-checked at the next start");
        }
        Ok(plan.changes.len())
    }

    /// Re-reads the file every poll interval and on SIGHUP until the node stops.
    pub async fn watch(mut self) {
        let Some(mut watch) = self.watch.take() else { return };
        let mut state = WatchState { seen: Some(self.digest.clone()), failure: None, settling: None };
        let mut shutdown = self.node.shutdown.clone();
        tracing::info!(source = %self.label, poll = ?watch.poll, "watching the config file (and SIGHUP)");
        loop {
            let forced = tokio::select! {
                _ = shutdown.wait() => return,
                _ = tokio::time::sleep(watch.poll), if !watch.poll.is_zero() => false,
                s = recv(&mut watch.hangup) => match s {
                    Some(()) => true,
                    None => { watch.hangup = None; continue }
                },
            };
            if forced {
                tracing::info!(source = %self.label, "SIGHUP: reloading the config file");
            }
            self.check(&watch.path, forced, &mut state).await;
        }
    }

    /// One look at the file: reload it when its content differs from what was seen last
    /// (or always, after SIGHUP).
    async fn check(&self, path: &Path, forced: bool, state: &mut WatchState) {
        let (digest, parsed) = match std::fs::read(path) {
            Ok(bytes) => (digest(&bytes), config::from_bytes(path, &bytes)),
            Err(e) => (format!("unreadable: {e}"), Err(config::unreadable(path, &e))),
        };
        if !forced && !state.settled(&digest) {
            return;
        }
        state.seen = Some(digest.clone());
        if read_record(&self.marker).is_some_and(|r| r.digest == digest) {
            if forced {
                tracing::info!(source = %self.label, "config file unchanged since it was applied");
            }
            return;
        }
        let outcome = match parsed.and_then(|f| {
            self.warn_restart_only(&f);
            wanted_pools(&f)
        }) {
            Err(e) => {
                tracing::error!(source = %self.label, key = %e.key, problem = %e.problem, "config file refused; the running state is kept");
                state.failure = None;
                "invalid"
            }
            Ok(wanted) => self.reload(&digest, wanted, state).await,
        };
        self.node.metrics.config_reloads.with_label_values(&[outcome]).inc();
    }

    async fn reload(&self, digest: &str, wanted: BTreeMap<String, Pool>, state: &mut WatchState) -> &'static str {
        match self.bring_in(digest, wanted).await {
            Ok(n) => {
                tracing::info!(source = %self.label, changes = n, "config file reloaded");
                state.failure = None;
                "ok"
            }
            Err(e) => {
                // Retried at the next poll: a leader may be back, a conflicting pool gone, or a
                // lagging state caught up. Logged once per distinct problem.
                state.seen = None;
                let why = e.to_string();
                if state.failure.as_deref() != Some(why.as_str()) {
                    tracing::error!(source = %self.label, error = %why, "config file not applied; the running state is kept");
                }
                state.failure = Some(why);
                "failed"
            }
        }
    }

    /// Node settings a file may carry take effect only at start: say so rather than ignore it.
    fn warn_restart_only(&self, file: &ConfigFile) {
        if file.listen_ip != self.file.listen_ip {
            tracing::warn!(source = %self.label, was = ?self.file.listen_ip, now = ?file.listen_ip, "the listen address changes only at restart; pools are reloaded now");
        }
    }
}

struct WatchState {
    /// Digest of the content looked at last (`None`: look again at the next poll).
    seen: Option<String>,
    /// The last failure logged, so a persistent one is not logged every poll.
    failure: Option<String>,
    /// New content seen at the last poll: it is acted on once it stays the same for one more
    /// poll, so a file being written in place is not read half way.
    settling: Option<String>,
}

impl WatchState {
    /// Whether a poll that read `digest` should act on it.
    fn settled(&mut self, digest: &str) -> bool {
        if self.seen.as_deref() == Some(digest) {
            self.settling = None;
            return false;
        }
        if self.settling.as_deref() == Some(digest) {
            self.settling = None;
            return true;
        }
        self.settling = Some(digest.to_string());
        false
    }
}

async fn recv(signal: &mut Option<Signal>) -> Option<()> {
    match signal {
        Some(s) => s.recv().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use shoal_proto::{Algorithm, BackendSpec, PoolSpec};

    use super::*;

    fn pool(name: &str, pattern: &str, backends: &[(&str, u32)]) -> Pool {
        let spec = PoolSpec { pattern: Some(pattern.into()), ..PoolSpec::default() }.normalize();
        let backends = backends
            .iter()
            .map(|(a, w)| {
                let addr = a.parse().expect("addr");
                (
                    a.to_string(),
                    shoal_proto::Backend { addr, spec: BackendSpec { weight: *w, ..BackendSpec::default() } },
                )
            })
            .collect();
        Pool { name: name.into(), spec, backends }
    }

    fn pools(list: &[Pool]) -> BTreeMap<String, Pool> {
        list.iter().map(|p| (p.name.clone(), p.clone())).collect()
    }

    fn state_after(current: &State, plan: &Plan) -> State {
        let mut s = current.clone();
        apply(&mut s, &Command::Batch(plan.commands.clone())).expect("plan applies");
        s
    }

    fn state(list: &[Pool]) -> State {
        State { version: 1, pools: pools(list), ..State::default() }
    }

    #[test]
    fn first_apply_adds_every_pool_and_is_then_empty() {
        let wanted = pools(&[pool("web", "/", &[("10.0.0.1:80", 1)]), pool("api", "/api/", &[])]);
        let plan = plan(None, &State::default(), &wanted).expect("plan");
        assert_eq!(plan.changes.len(), 2);
        assert!(plan.changes.iter().all(|c| c.what.starts_with("added")), "{:?}", plan.changes);
        let after = state_after(&State::default(), &plan);
        assert_eq!(after.pools, wanted);
        // Another node with the same file, or the same node again: nothing to do.
        assert_eq!(super::plan(None, &after, &wanted).expect("plan"), Plan::default());
        assert_eq!(super::plan(Some(&wanted), &after, &wanted).expect("plan"), Plan::default());
    }

    #[test]
    fn edits_add_change_and_remove_only_the_files_pools() {
        let old = pools(&[pool("a", "/a/", &[("10.0.0.1:80", 1)]), pool("b", "/b/", &[("10.0.0.2:80", 1)])]);
        let api = pool("manual", "/m/", &[("10.0.0.9:80", 1)]);
        let current = state(&[old["a"].clone(), old["b"].clone(), api.clone()]);
        let mut b = pool("b", "/b/", &[("10.0.0.2:80", 3), ("10.0.0.3:80", 1)]);
        b.spec.algorithm = Algorithm::LeastConn;
        let wanted = pools(&[b.clone(), pool("c", "/c/", &[("10.0.0.4:80", 1)])]);
        let plan = plan(Some(&old), &current, &wanted).expect("plan");
        let after = state_after(&current, &plan);
        assert!(!after.pools.contains_key("a"), "removed from the file");
        assert_eq!(after.pools["b"], b);
        assert!(after.pools.contains_key("c"));
        assert_eq!(after.pools["manual"], api, "API pools are left alone");
        let what: BTreeMap<&str, &str> = plan.changes.iter().map(|c| (c.pool.as_str(), c.what.as_str())).collect();
        assert_eq!(what["a"], "removed (no longer in the file)");
        assert_eq!(what["b"], "changed: algorithm; backends added 10.0.0.3:80; backends changed 10.0.0.2:80 (weight)");
        assert_eq!(what["c"], "added (1 backends)");
        assert!(matches!(plan.commands[0], Command::DeletePool { .. }));
    }

    #[test]
    fn unchanged_pools_keep_api_edits_and_backend_removal_is_in_place() {
        let old = pools(&[pool("a", "/a/", &[("10.0.0.1:80", 1)]), pool("b", "/b/", &[("10.0.0.2:80", 1)])]);
        let mut drained = old["a"].clone();
        drained.backends.get_mut("10.0.0.1:80").expect("backend").spec.drain = true;
        let current = state(&[drained.clone(), old["b"].clone()]);
        let wanted = pools(&[old["a"].clone(), pool("b", "/b/", &[])]);
        let plan = plan(Some(&old), &current, &wanted).expect("plan");
        assert_eq!(
            plan.commands,
            vec![Command::DeleteBackend { pool: "b".into(), addr: "10.0.0.2:80".parse().unwrap() }]
        );
        assert_eq!(state_after(&current, &plan).pools["a"], drained, "the drain set through the API stays");
    }

    #[test]
    fn removal_of_a_pool_already_gone_is_not_proposed() {
        let old = pools(&[pool("a", "/a/", &[])]);
        assert_eq!(plan(Some(&old), &State::default(), &BTreeMap::new()).expect("plan"), Plan::default());
    }

    #[test]
    fn swapped_patterns_fall_back_to_replacing_the_pools() {
        let old = pools(&[pool("a", "/a/", &[("10.0.0.1:80", 1)]), pool("b", "/b/", &[])]);
        let current = state(&[old["a"].clone(), old["b"].clone()]);
        let wanted = pools(&[pool("a", "/b/", &[("10.0.0.1:80", 1)]), pool("b", "/a/", &[])]);
        let plan = plan(Some(&old), &current, &wanted).expect("plan");
        assert_eq!(state_after(&current, &plan).pools, wanted);
        assert_eq!(plan.changes.len(), 2);
        assert_eq!(plan.changes[0].what, "changed: pattern");
    }

    #[test]
    fn a_conflict_with_an_api_pool_is_refused() {
        let current = state(&[pool("manual", "/", &[])]);
        let wanted = pools(&[pool("web", "/", &[])]);
        let e = plan(None, &current, &wanted).unwrap_err();
        assert!(e.to_string().contains("manual"), "{e}");
    }

    #[test]
    fn new_content_is_acted_on_once_it_stays_the_same_for_a_poll() {
        let mut w = WatchState { seen: Some("a".into()), failure: None, settling: None };
        assert!(!w.settled("a"), "unchanged");
        assert!(!w.settled("half"), "just changed: maybe half written");
        assert!(!w.settled("b"), "still changing");
        assert!(w.settled("b"), "stable for a poll");
        w.seen = Some("b".into());
        assert!(!w.settled("b"));
    }

    #[test]
    fn records_written_by_older_versions_are_a_bare_digest() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("config.applied");
        std::fs::write(&path, "00112233aabbccdd").expect("write");
        let r = read_record(&path).expect("record");
        assert_eq!((r.digest.as_str(), r.pools.is_none()), ("00112233aabbccdd", true));
        write_record(&path, &Record { digest: "x".into(), pools: Some(BTreeMap::new()) }).expect("write");
        assert_eq!(read_record(&path).expect("record").pools, Some(BTreeMap::new()));
    }
}
