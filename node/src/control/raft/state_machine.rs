//! The Raft state machine: desired `State` plus what Raft needs (last applied log id, last
//! membership). Commands go through the pure `proto::apply`; every applied batch is published
//! on a watch channel that routing and the admin API read. Snapshots are JSON, persisted in redb.

use std::io::Cursor;
use std::sync::Arc;

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    AnyError, Entry, EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, SnapshotMeta, StorageError,
    StorageIOError, StoredMembership,
};
use serde::{Deserialize, Serialize};
use shoal_proto::{Applied, State, apply};
use tokio::sync::{Mutex, watch};

use super::store::{Db, to_snapshot};
use super::{CommandResult, NodeId, ShoalNode, TypeConfig};

/// What a snapshot holds besides its metadata.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct SmData {
    last_applied: Option<LogId<NodeId>>,
    last_membership: StoredMembership<NodeId, ShoalNode>,
    state: State,
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
                EntryPayload::Normal(cmd) => apply(&mut data.state, &cmd),
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
        *data =
            SmData { last_applied: meta.last_log_id, last_membership: meta.last_membership.clone(), state: new.state };
        self.publish(&data);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        let stored = self.db.load_snapshot().map_err(|e| StorageIOError::read_snapshot(None, AnyError::error(e)))?;
        Ok(stored.map(|(meta, data)| to_snapshot(meta, data)))
    }
}
