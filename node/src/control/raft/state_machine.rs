//! The Raft state machine: desired `State` plus what Raft needs (last applied log id, last
//! membership) and the results of recent proposals (so a retried write applies once). Commands
//! go through the pure `proto::apply`; every applied batch is published on a watch channel that
//! routing and the admin API read. Snapshots are JSON, persisted in redb.

use std::collections::VecDeque;
use std::io::Cursor;
use std::sync::Arc;

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    AnyError, Entry, EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, SnapshotMeta, StorageError,
    StorageIOError, StoredMembership,
};
use serde::{Deserialize, Serialize};
use shoal_proto::{Applied, Proposal, State, apply};
use tokio::sync::{Mutex, watch};

use super::store::{Db, to_snapshot};
use super::{CommandResult, NodeId, ShoalNode, TypeConfig};

/// What a snapshot holds besides its metadata.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct SmData {
    last_applied: Option<LogId<NodeId>>,
    last_membership: StoredMembership<NodeId, ShoalNode>,
    state: State,
    /// Results of the last `RECENT` proposals, oldest first. Part of the snapshot, so every node
    /// makes the same "seen before" decision.
    #[serde(default)]
    recent: VecDeque<(u64, CommandResult)>,
}

/// Proposals remembered for deduplication: far more than can be retried within a write deadline.
const RECENT: usize = 1024;

impl SmData {
    /// Applies a proposal once: a repeated id gets the first result and changes nothing.
    fn apply(&mut self, p: &Proposal) -> CommandResult {
        if p.id != 0
            && let Some((_, first)) = self.recent.iter().find(|(id, _)| *id == p.id)
        {
            return first.clone();
        }
        let result = apply(&mut self.state, &p.cmd);
        if p.id != 0 {
            if self.recent.len() >= RECENT {
                self.recent.pop_front();
            }
            self.recent.push_back((p.id, result.clone()));
        }
        result
    }
}

/// The state machine; clones share everything.
#[derive(Clone)]
pub struct StateMachine {
    data: Arc<Mutex<SmData>>,
    db: Db,
    state_tx: watch::Sender<Arc<State>>,
    applied_tx: watch::Sender<u64>,
}

fn sm_err(e: impl ToString) -> StorageError<NodeId> {
    StorageIOError::write_state_machine(AnyError::error(e.to_string())).into()
}

impl StateMachine {
    /// Restores the state from the last persisted snapshot (Raft re-applies the rest).
    pub fn open(db: Db) -> anyhow::Result<StateMachine> {
        let data = match db.load_snapshot().map_err(|e| anyhow::anyhow!("cannot read snapshot: {e}"))? {
            Some((_, bytes)) => serde_json::from_slice(&bytes)?,
            None => SmData::default(),
        };
        let applied = data.last_applied.map(|l| l.index).unwrap_or(0);
        let (state_tx, _) = watch::channel(Arc::new(data.state.clone()));
        let (applied_tx, _) = watch::channel(applied);
        Ok(StateMachine { data: Arc::new(Mutex::new(data)), db, state_tx, applied_tx })
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<State>> {
        self.state_tx.subscribe()
    }

    /// Index of the last applied log entry (0 before any).
    pub fn applied(&self) -> watch::Receiver<u64> {
        self.applied_tx.subscribe()
    }

    pub fn current(&self) -> Arc<State> {
        self.state_tx.borrow().clone()
    }

    fn publish(&self, data: &SmData) {
        self.state_tx.send_if_modified(|s| {
            let changed = **s != data.state;
            if changed {
                *s = Arc::new(data.state.clone());
            }
            changed
        });
        self.applied_tx.send_replace(data.last_applied.map(|l| l.index).unwrap_or(0));
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        let data = self.data.lock().await.clone();
        let bytes = serde_json::to_vec(&data).map_err(sm_err)?;
        let id = match data.last_applied {
            Some(l) => format!("{}-{}-{}", l.leader_id.term, l.index, data.state.version),
            None => "empty".into(),
        };
        let meta =
            SnapshotMeta { last_log_id: data.last_applied, last_membership: data.last_membership, snapshot_id: id };
        self.db.save_snapshot(&meta, &bytes).map_err(|e| StorageIOError::write_snapshot(None, AnyError::error(e)))?;
        Ok(to_snapshot(meta, bytes))
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, ShoalNode>), StorageError<NodeId>> {
        let data = self.data.lock().await;
        Ok((data.last_applied, data.last_membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<CommandResult>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut data = self.data.lock().await;
        let mut out = Vec::new();
        for entry in entries {
            data.last_applied = Some(entry.log_id);
            let result = match entry.payload {
                EntryPayload::Blank => Ok(Applied { version: data.state.version }),
                EntryPayload::Normal(p) => data.apply(&p),
                EntryPayload::Membership(m) => {
                    data.last_membership = StoredMembership::new(Some(entry.log_id), m);
                    Ok(Applied { version: data.state.version })
                }
            };
            out.push(result);
        }
        self.publish(&data);
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError<NodeId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, ShoalNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<NodeId>> {
        let bytes = snapshot.into_inner();
        let new: SmData = serde_json::from_slice(&bytes)
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), AnyError::error(e.to_string())))?;
        self.db
            .save_snapshot(meta, &bytes)
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), AnyError::error(e)))?;
        let mut data = self.data.lock().await;
        *data = SmData {
            last_applied: meta.last_log_id,
            last_membership: meta.last_membership.clone(),
            state: new.state,
            recent: new.recent,
        };
        self.publish(&data);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        let stored = self.db.load_snapshot().map_err(|e| StorageIOError::read_snapshot(None, AnyError::error(e)))?;
        Ok(stored.map(|(meta, data)| to_snapshot(meta, data)))
    }
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId};
    use shoal_proto::{ApplyError, Command, PoolSpec};

    use super::*;

    fn entry(index: u64, p: &Proposal) -> Entry<TypeConfig> {
        Entry { log_id: LogId::new(CommittedLeaderId::new(1, 1), index), payload: EntryPayload::Normal(p.clone()) }
    }

    fn proposal(id: u64, cmd: Command) -> Proposal {
        Proposal { id, cmd }
    }

    fn put(name: &str) -> Command {
        let spec: PoolSpec = serde_json::from_value(serde_json::json!({"pattern": "/"})).expect("spec");
        Command::PutPool { name: name.into(), spec }
    }

    fn open() -> (tempfile::TempDir, StateMachine) {
        let dir = tempfile::tempdir().expect("dir");
        let db = Db::open(&dir.path().join("raft.redb")).expect("db");
        (dir, StateMachine::open(db).expect("sm"))
    }

    #[tokio::test]
    async fn a_retried_proposal_applies_once() {
        let (_dir, mut sm) = open();
        let create = proposal(7, put("web"));
        let delete = proposal(8, Command::DeletePool { name: "web".into() });
        let entries = [entry(1, &create), entry(2, &delete), entry(3, &delete), entry(4, &create)];
        let out = sm.apply(entries).await.expect("apply");
        // The repeated delete reports its first success (not "not found"); the repeated create
        // does not bring the pool back.
        assert_eq!(out[2], out[1]);
        assert!(out[1].is_ok());
        assert_eq!(out[3], out[0]);
        assert!(sm.current().pools.is_empty());
        // Without an id, a repeat is applied again and fails like any second delete.
        let plain = proposal(0, Command::DeletePool { name: "web".into() });
        let out = sm.apply([entry(5, &plain)]).await.expect("apply");
        assert!(matches!(out[0], Err(ApplyError::NoSuchPool(_))), "{out:?}");
    }

    #[tokio::test]
    async fn snapshots_carry_what_was_applied() {
        let (_dir, mut sm) = open();
        let create = proposal(11, put("api"));
        sm.apply([entry(1, &create)]).await.expect("apply");
        let snap = sm.build_snapshot().await.expect("snapshot");
        let (_dir2, mut other) = open();
        other.install_snapshot(&snap.meta, snap.snapshot).await.expect("install");
        other.apply([entry(2, &proposal(12, Command::DeletePool { name: "api".into() }))]).await.expect("apply");
        let out = other.apply([entry(3, &create)]).await.expect("apply");
        assert!(out[0].is_ok());
        assert!(other.current().pools.is_empty(), "a create retried after a snapshot must not apply again");
    }

    #[tokio::test]
    async fn only_the_most_recent_proposals_are_remembered() {
        let (_dir, mut sm) = open();
        let entries: Vec<_> = (1..=RECENT as u64 + 5).map(|i| entry(i, &proposal(i, Command::Noop))).collect();
        sm.apply(entries).await.expect("apply");
        let data = sm.data.lock().await;
        assert_eq!(data.recent.len(), RECENT);
        assert_eq!(data.recent.front().map(|r| r.0), Some(6));
    }
}
