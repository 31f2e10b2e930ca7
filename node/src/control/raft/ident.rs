//! The cluster's identity: a random 128-bit id created once, by the node that initializes the
//! cluster, and stored in the redb file beside the log. Every other member adopts it from the
//! first Raft request (append, vote, snapshot) it receives, before Raft sees that request. It
//! travels in the handshake, in every RPC envelope and in gossip (`cluster_id`), so two clusters
//! that formed apart (a low `--expect`, reimaged nodes booting while the old cluster was down)
//! refuse each other instead of merging and truncating each other's committed logs.
//!
//! A node without an identity (not initialized yet) may still be added to any cluster; a node
//! with identity X refuses every peer that claims Y. Data directories from before identities
//! have none: their leader creates one and its followers adopt it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::IntCounterVec;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::Instant;

use super::store::{Db, StoreError};

/// A cluster identity (shown as 32 hex digits).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ClusterId(pub u128);

impl ClusterId {
    pub fn generate() -> ClusterId {
        ClusterId(rand::random::<u128>() | 1)
    }
}

impl std::fmt::Display for ClusterId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

/// Text that is not a cluster id.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("a cluster id is 32 hex digits, not {0:?}")]
pub struct BadClusterId(pub String);

impl std::str::FromStr for ClusterId {
    type Err = BadClusterId;

    fn from_str(s: &str) -> Result<ClusterId, BadClusterId> {
        if s.len() != 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(BadClusterId(s.to_string()));
        }
        // 32 hex digits always fit.
        u128::from_str_radix(s, 16).map(ClusterId).map_err(|_| BadClusterId(s.to_string()))
    }
}

/// Why a peer was refused or an identity could not be kept.
#[derive(Debug, thiserror::Error)]
pub enum IdentError {
    /// The peer belongs to another cluster.
    #[error("this node belongs to cluster {ours}, not {theirs}")]
    OtherCluster { ours: ClusterId, theirs: ClusterId },
    /// The identity could not be stored.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What to do with a peer that claims `theirs` when this node holds `ours`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    /// Same cluster, or one side has no identity yet and nothing is to be adopted.
    Accept,
    /// This node has none yet and takes the peer's (a Raft request from a cluster member).
    Adopt(ClusterId),
    /// Two different clusters.
    Refuse { ours: ClusterId, theirs: ClusterId },
}

/// The pure rule: identities that differ never talk; a node without one adopts the identity
/// of a Raft request (`may_adopt`) and otherwise accepts.
pub fn admit(ours: Option<ClusterId>, theirs: Option<ClusterId>, may_adopt: bool) -> Admit {
    match (ours, theirs) {
        (Some(ours), Some(theirs)) if ours != theirs => Admit::Refuse { ours, theirs },
        (None, Some(theirs)) if may_adopt => Admit::Adopt(theirs),
        _ => Admit::Accept,
    }
}

/// Whether two identities may talk (no adoption).
pub fn compatible(a: Option<ClusterId>, b: Option<ClusterId>) -> bool {
    admit(a, b, false) == Admit::Accept
}

/// Where a mismatch was caught (the `where` label of `shoal_cluster_id_mismatch_total`).
pub const AT_HANDSHAKE: &str = "handshake";
pub const AT_RPC: &str = "rpc";
pub const AT_PING: &str = "ping";
pub const AT_GOSSIP: &str = "gossip";

/// One WARN per `where` per this long; the others are counted only.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// This node's identity: durable, observable, and the one place mismatches are counted.
#[derive(Clone)]
pub struct Identity(Arc<Inner>);

struct Inner {
    db: Db,
    tx: watch::Sender<Option<ClusterId>>,
    /// Serializes create/adopt, so two clusters racing for a fresh node cannot both win.
    write: Mutex<()>,
    mismatches: Option<IntCounterVec>,
    last_log: Mutex<HashMap<&'static str, (Instant, u64)>>,
}

impl Identity {
    /// Loads the stored identity (if any) from `db`.
    pub fn open(db: Db, mismatches: Option<IntCounterVec>) -> anyhow::Result<Identity> {
        let stored = db.cluster_id().map_err(|e| anyhow::anyhow!("cluster id: {e}"))?;
        let (tx, _) = watch::channel(stored);
        Ok(Identity(Arc::new(Inner { db, tx, write: Mutex::new(()), mismatches, last_log: Mutex::default() })))
    }

    pub fn get(&self) -> Option<ClusterId> {
        *self.0.tx.borrow()
    }

    pub fn subscribe(&self) -> watch::Receiver<Option<ClusterId>> {
        self.0.tx.subscribe()
    }

    /// The identity in force, created (and stored) if there is none yet.
    pub fn get_or_create(&self) -> Result<ClusterId, IdentError> {
        let _guard = self.0.write.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(id) = self.get() {
            return Ok(id);
        }
        let id = ClusterId::generate();
        self.store(id)?;
        tracing::info!(cluster_id = %id, "created the cluster identity");
        Ok(id)
    }

    /// Decides about a peer claiming `theirs`, adopting it when allowed; a refusal is counted
    /// under `at` and logged (rate-limited).
    pub fn check(&self, theirs: Option<ClusterId>, may_adopt: bool, at: &'static str) -> Result<(), IdentError> {
        // Every Raft request passes here: the common answer needs no lock.
        if admit(self.get(), theirs, may_adopt) == Admit::Accept {
            return Ok(());
        }
        let _guard = self.0.write.lock().unwrap_or_else(|e| e.into_inner());
        match admit(self.get(), theirs, may_adopt) {
            Admit::Accept => Ok(()),
            Admit::Adopt(id) => {
                self.store(id)?;
                tracing::info!(cluster_id = %id, "joined a cluster: adopted its identity");
                Ok(())
            }
            Admit::Refuse { ours, theirs } => {
                self.refused(at, ours, theirs);
                Err(IdentError::OtherCluster { ours, theirs })
            }
        }
    }

    /// Counts and logs (at most one WARN per `at` every 10 s) a peer of another cluster.
    pub fn refused(&self, at: &'static str, ours: ClusterId, theirs: ClusterId) {
        if let Some(c) = &self.0.mismatches {
            c.with_label_values(&[at]).inc();
        }
        let now = Instant::now();
        let suppressed = {
            let mut last = self.0.last_log.lock().unwrap_or_else(|e| e.into_inner());
            match last.get_mut(at) {
                Some((when, n)) if now.duration_since(*when) < LOG_EVERY => {
                    *n += 1;
                    return;
                }
                Some((when, n)) => {
                    let suppressed = *n;
                    (*when, *n) = (now, 0);
                    suppressed
                }
                None => {
                    last.insert(at, (now, 0));
                    0
                }
            }
        };
        tracing::warn!(
            at,
            ours = %ours,
            theirs = %theirs,
            suppressed,
            "refused a node of another cluster (two clusters never merge; see README, Clustering)"
        );
    }

    fn store(&self, id: ClusterId) -> Result<(), StoreError> {
        self.0.db.set_cluster_id(id)?;
        self.0.tx.send_replace(Some(id));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u128) -> Option<ClusterId> {
        Some(ClusterId(n))
    }

    #[test]
    fn different_identities_never_talk_and_fresh_nodes_adopt() {
        assert_eq!(admit(id(1), id(1), true), Admit::Accept);
        assert_eq!(admit(id(1), id(2), true), Admit::Refuse { ours: ClusterId(1), theirs: ClusterId(2) });
        assert_eq!(admit(id(1), id(2), false), Admit::Refuse { ours: ClusterId(1), theirs: ClusterId(2) });
        assert_eq!(admit(None, id(2), true), Admit::Adopt(ClusterId(2)));
        assert_eq!(admit(None, id(2), false), Admit::Accept, "a ping or a forwarded write adopts nothing");
        assert_eq!(admit(id(1), None, true), Admit::Accept, "a peer without identity may still be added");
        assert_eq!(admit(None, None, true), Admit::Accept);
        assert!(compatible(None, id(3)) && compatible(id(3), id(3)) && !compatible(id(3), id(4)));
    }

    #[test]
    fn ids_round_trip_as_hex_and_garbage_is_refused() {
        let c = ClusterId::generate();
        assert_eq!(c.to_string().len(), 32);
        assert_eq!(c.to_string().parse::<ClusterId>(), Ok(c));
        assert_eq!("xyz".parse::<ClusterId>(), Err(BadClusterId("xyz".into())));
        assert!("0123456789abcdef0123456789abcdeg".parse::<ClusterId>().is_err());
    }

    #[tokio::test]
    async fn the_identity_is_durable_adopted_once_and_mismatches_are_counted() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("raft.redb");
        let counter = IntCounterVec::new(prometheus::Opts::new("m", "m"), &["where"]).expect("counter");
        {
            let ident = Identity::open(Db::open(&path).expect("open"), Some(counter.clone())).expect("ident");
            assert_eq!(ident.get(), None);
            ident.check(id(7), false, AT_PING).expect("no adoption from a ping");
            assert_eq!(ident.get(), None);
            ident.check(id(7), true, AT_RPC).expect("adopt");
            assert_eq!(ident.get(), id(7));
            let err = ident.check(id(8), true, AT_RPC).expect_err("a second cluster cannot take the node over");
            assert!(matches!(err, IdentError::OtherCluster { ours: ClusterId(7), theirs: ClusterId(8) }), "{err}");
            assert!(ident.check(id(8), true, AT_RPC).is_err());
            assert_eq!(ident.get_or_create().expect("stored"), ClusterId(7));
        }
        let reopened = Identity::open(Db::open(&path).expect("reopen"), None).expect("ident");
        assert_eq!(reopened.get(), id(7), "stored with the log");
        assert_eq!(counter.with_label_values(&[AT_RPC]).get(), 2);
    }
}
