//! Durable Raft storage in one redb file: the log, the vote, the committed id and the latest
//! snapshot. Every write is a redb transaction committed with fsync before it is acknowledged,
//! so a voter never comes back with less than it promised.

// openraft's trait methods return its (large) `StorageError`; our helpers return the same type.
#![allow(clippy::result_large_err)]

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage, Snapshot};
use openraft::{AnyError, Entry, LogId, OptionalSend, RaftLogReader, SnapshotMeta, StorageError, StorageIOError, Vote};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{NodeId, TypeConfig};

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

const VOTE: &str = "vote";
const COMMITTED: &str = "committed";
const PURGED: &str = "last_purged";
const SNAPSHOT_META: &str = "snapshot_meta";
const SNAPSHOT_DATA: &str = "snapshot_data";
/// The cluster identity (see `ident.rs`): written once, never changed.
const CLUSTER_ID: &str = "cluster_id";

type StResult<T> = Result<T, StorageError<NodeId>>;

/// Why a metadata read or write failed. The texts are those of the underlying errors, which
/// openraft receives (as strings) through [`read_err`] and [`write_err`].
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Transaction(#[from] redb::TransactionError),
    #[error(transparent)]
    Table(#[from] redb::TableError),
    #[error(transparent)]
    Storage(#[from] redb::StorageError),
    #[error(transparent)]
    Commit(#[from] redb::CommitError),
    /// A stored value that does not decode (the key names it).
    #[error("{key}: {error}")]
    Decode { key: String, error: serde_json::Error },
    #[error(transparent)]
    Encode(serde_json::Error),
}

/// A persisted snapshot: its metadata and its bytes.
pub type StoredSnapshot = (SnapshotMeta<NodeId, super::ShoalNode>, Vec<u8>);

/// The redb database shared by the log store and the state machine.
#[derive(Clone)]
pub struct Db(Arc<Database>);

impl Db {
    /// Opens (or creates) the database file. Opening writes (a recovery, the tables), so a
    /// full disk fails here, with the file named, rather than later.
    pub fn open(path: &Path) -> anyhow::Result<Db> {
        Self::init(path, Database::create(path))
    }

    /// Opens the store, waiting up to `patience` while another process still holds it: a
    /// node handing over to this one (a seamless upgrade) closes it just before.
    pub async fn open_waiting(path: &Path, patience: std::time::Duration) -> anyhow::Result<Db> {
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            match Database::create(path) {
                Err(redb::DatabaseError::DatabaseAlreadyOpen) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                opened => return Self::init(path, opened),
            }
        }
    }

    fn init(path: &Path, opened: Result<Database, redb::DatabaseError>) -> anyhow::Result<Db> {
        let fail = |e: &dyn std::fmt::Display| anyhow::anyhow!("cannot open the Raft store {}: {e}", path.display());
        let db = opened.map_err(|e| fail(&e))?;
        let txn = db.begin_write().map_err(|e| fail(&e))?;
        txn.open_table(LOG).map_err(|e| fail(&e))?;
        txn.open_table(META).map_err(|e| fail(&e))?;
        txn.commit().map_err(|e| fail(&e))?;
        Ok(Db(Arc::new(db)))
    }

    fn meta<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StoreError> {
        let txn = self.0.begin_read()?;
        let table = txn.open_table(META)?;
        let Some(raw) = table.get(key)? else { return Ok(None) };
        serde_json::from_slice(raw.value())
            .map(Some)
            .map_err(|error| StoreError::Decode { key: key.to_string(), error })
    }

    fn put_meta(&self, pairs: &[(&str, Vec<u8>)]) -> Result<(), StoreError> {
        let txn = self.0.begin_write()?;
        {
            let mut table = txn.open_table(META)?;
            for (k, v) in pairs {
                table.insert(*k, v.as_slice())?;
            }
        }
        Ok(txn.commit()?)
    }

    /// The stored cluster identity, if this node has one.
    pub fn cluster_id(&self) -> Result<Option<super::ident::ClusterId>, StoreError> {
        self.meta(CLUSTER_ID)
    }

    /// Stores the cluster identity (fsynced before it returns).
    pub fn set_cluster_id(&self, id: super::ident::ClusterId) -> Result<(), StoreError> {
        self.put_meta(&[(CLUSTER_ID, json(&id)?)])
    }

    /// Persists a snapshot (meta and data) atomically.
    pub fn save_snapshot(&self, meta: &SnapshotMeta<NodeId, super::ShoalNode>, data: &[u8]) -> Result<(), StoreError> {
        self.put_meta(&[(SNAPSHOT_META, json(meta)?), (SNAPSHOT_DATA, data.to_vec())])
    }

    /// The latest persisted snapshot.
    pub fn load_snapshot(&self) -> Result<Option<StoredSnapshot>, StoreError> {
        let Some(meta) = self.meta(SNAPSHOT_META)? else { return Ok(None) };
        let txn = self.0.begin_read()?;
        let table = txn.open_table(META)?;
        let data = table.get(SNAPSHOT_DATA)?.map(|v| v.value().to_vec()).unwrap_or_default();
        Ok(Some((meta, data)))
    }
}

fn json<T: Serialize>(v: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(v).map_err(StoreError::Encode)
}

fn read_err(e: impl ToString) -> StorageError<NodeId> {
    StorageIOError::read_logs(AnyError::error(e.to_string())).into()
}

fn write_err(e: impl ToString) -> StorageError<NodeId> {
    StorageIOError::write_logs(AnyError::error(e.to_string())).into()
}

/// The Raft log, vote and committed id.
#[derive(Clone)]
pub struct LogStore {
    db: Db,
}

impl LogStore {
    pub fn new(db: Db) -> LogStore {
        LogStore { db }
    }

    fn last_entry_id(&self) -> StResult<Option<LogId<NodeId>>> {
        let txn = self.db.0.begin_read().map_err(read_err)?;
        let table = txn.open_table(LOG).map_err(read_err)?;
        let Some((_, raw)) = table.last().map_err(read_err)? else { return Ok(None) };
        let entry: Entry<TypeConfig> = serde_json::from_slice(raw.value()).map_err(read_err)?;
        Ok(Some(entry.log_id))
    }

    /// Removes log entries in `range` in one durable transaction.
    fn remove_range(&self, range: impl RangeBounds<u64>, extra_meta: Option<(&str, Vec<u8>)>) -> StResult<()> {
        let txn = self.db.0.begin_write().map_err(write_err)?;
        {
            let mut table = txn.open_table(LOG).map_err(write_err)?;
            let start = match range.start_bound() {
                Bound::Included(s) => *s,
                Bound::Excluded(s) => s + 1,
                Bound::Unbounded => 0,
            };
            let end = match range.end_bound() {
                Bound::Included(e) => e.saturating_add(1),
                Bound::Excluded(e) => *e,
                Bound::Unbounded => u64::MAX,
            };
            table.retain_in(start..end, |_, _| false).map_err(write_err)?;
            if let Some((k, v)) = extra_meta {
                let mut meta = txn.open_table(META).map_err(write_err)?;
                meta.insert(k, v.as_slice()).map_err(write_err)?;
            }
        }
        txn.commit().map_err(write_err)
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> StResult<Vec<Entry<TypeConfig>>> {
        let txn = self.db.0.begin_read().map_err(read_err)?;
        let table = txn.open_table(LOG).map_err(read_err)?;
        let mut out = Vec::new();
        for item in table.range::<u64>((range.start_bound().cloned(), range.end_bound().cloned())).map_err(read_err)? {
            let (_, raw) = item.map_err(read_err)?;
            out.push(serde_json::from_slice(raw.value()).map_err(read_err)?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> StResult<LogState<TypeConfig>> {
        let last_purged_log_id: Option<LogId<NodeId>> = self.db.meta(PURGED).map_err(read_err)?;
        let last_log_id = self.last_entry_id()?.or(last_purged_log_id);
        Ok(LogState { last_purged_log_id, last_log_id })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> StResult<()> {
        let bytes = json(vote).map_err(|e| StorageIOError::write_vote(AnyError::error(e)))?;
        self.db.put_meta(&[(VOTE, bytes)]).map_err(|e| StorageIOError::write_vote(AnyError::error(e)).into())
    }

    async fn read_vote(&mut self) -> StResult<Option<Vote<NodeId>>> {
        self.db.meta(VOTE).map_err(|e| StorageIOError::read_vote(AnyError::error(e)).into())
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> StResult<()> {
        self.db.put_meta(&[(COMMITTED, json(&committed).map_err(write_err)?)]).map_err(write_err)
    }

    async fn read_committed(&mut self) -> StResult<Option<LogId<NodeId>>> {
        Ok(self.db.meta::<Option<LogId<NodeId>>>(COMMITTED).map_err(read_err)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let txn = self.db.0.begin_write().map_err(write_err)?;
        {
            let mut table = txn.open_table(LOG).map_err(write_err)?;
            for entry in entries {
                let bytes = serde_json::to_vec(&entry).map_err(write_err)?;
                table.insert(entry.log_id.index, bytes.as_slice()).map_err(write_err)?;
            }
        }
        // redb commits with fsync: the entries are durable before Raft counts them.
        let result = txn.commit().map_err(|e| std::io::Error::other(e.to_string()));
        let failed = result.as_ref().err().map(|e| e.to_string());
        callback.log_io_completed(result);
        match failed {
            Some(e) => Err(write_err(e)),
            None => Ok(()),
        }
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> StResult<()> {
        self.remove_range(log_id.index.., None)
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> StResult<()> {
        let purged = json(&log_id).map_err(write_err)?;
        self.remove_range(..=log_id.index, Some((PURGED, purged)))
    }
}

/// A stored snapshot as openraft wants it.
pub fn to_snapshot(meta: SnapshotMeta<NodeId, super::ShoalNode>, data: Vec<u8>) -> Snapshot<TypeConfig> {
    Snapshot { meta, snapshot: Box::new(std::io::Cursor::new(data)) }
}

#[cfg(test)]
mod tests {
    use openraft::testing::{StoreBuilder, Suite};

    use super::*;
    use crate::control::raft::state_machine::StateMachine;

    struct Builder;

    impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for Builder {
        async fn build(&self) -> StResult<(tempfile::TempDir, LogStore, StateMachine)> {
            let dir = tempfile::tempdir().map_err(write_err)?;
            let db = Db::open(&dir.path().join("raft.redb")).map_err(write_err)?;
            let sm = StateMachine::open(db.clone()).map_err(write_err)?;
            Ok((dir, LogStore::new(db), sm))
        }
    }

    /// openraft's own storage test suite, against the redb store.
    #[test]
    fn openraft_storage_suite() {
        Suite::test_all(Builder).expect("storage suite");
    }

    #[tokio::test]
    async fn log_and_vote_survive_reopening() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("raft.redb");
        let vote = Vote::new(3, 42);
        {
            let mut store = LogStore::new(Db::open(&path).expect("open"));
            store.save_vote(&vote).await.expect("vote");
        }
        let mut store = LogStore::new(Db::open(&path).expect("reopen"));
        assert_eq!(store.read_vote().await.expect("read"), Some(vote));
    }

    #[tokio::test]
    async fn an_undecodable_value_names_its_key_and_reaches_openraft_as_text() {
        let dir = tempfile::tempdir().expect("dir");
        let db = Db::open(&dir.path().join("raft.redb")).expect("open");
        db.put_meta(&[(VOTE, b"not json".to_vec())]).expect("put");
        let err = db.meta::<Vote<NodeId>>(VOTE).expect_err("garbage");
        assert!(matches!(&err, StoreError::Decode { key, .. } if key == VOTE), "{err}");
        let text = err.to_string();
        assert!(text.starts_with("vote: "), "{text}");
        let raft_err = LogStore::new(db.clone()).read_vote().await.expect_err("garbage vote");
        assert_eq!(raft_err, StorageIOError::read_vote(AnyError::error(&text)).into());
        assert!(matches!(db.cluster_id(), Ok(None)), "no identity yet");
    }
}
