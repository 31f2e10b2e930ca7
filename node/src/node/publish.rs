//! Publishing this node's observations (probe verdicts, heartbeats) and its work in flight
//! per backend in gossip, for peers' combined views and for drains that wait for zero.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::control::gossip::Gossip;
use crate::health::{BackendId, HealthView};
use crate::routing::{Counts, SharedTable, Table};

/// Spawns the publisher: `local` is this node's own view, `table` where its work in flight is.
pub(super) fn spawn(
    gossip: Arc<Gossip>,
    local: watch::Receiver<Arc<HealthView>>,
    table: SharedTable,
) -> JoinHandle<()> {
    tokio::spawn(publish_observations(gossip, local, table))
}

/// Keeps this node's gossip keys in step with its local observations (at most every 200 ms).
async fn publish_observations(gossip: Arc<Gossip>, mut local: watch::Receiver<Arc<HealthView>>, table: SharedTable) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        let view = local.borrow_and_update().clone();
        gossip.publish(&view, &active_per_backend(&table.load())).await;
        tokio::select! {
            r = local.changed() => if r.is_err() { return },
            _ = tick.tick() => {}
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Work in flight on this node per backend (gossiped so a drain can wait for zero).
fn active_per_backend(table: &Table) -> HashMap<BackendId, Counts> {
    table
        .pools
        .iter()
        .flat_map(|p| p.shared.iter().map(move |(addr, s)| ((p.name.clone(), *addr), s.counts())))
        .filter(|(_, c)| *c != Counts::default())
        .collect()
}
