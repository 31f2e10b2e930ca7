//! The access log of a node: opened at start, reopened on SIGUSR1.

use std::sync::{Arc, Weak};

use anyhow::Context;

use super::NodeOptions;
use crate::dataplane::accesslog::AccessLog;
use crate::metrics::Metrics;

/// Opens the access log, and reopens its file on SIGUSR1 (logrotate's signal) for as long as
/// the log lives, through a handover's drain too. SIGUSR1 is taken even without a log file, so
/// a rotation script signalling every node never kills one.
pub(super) fn start(opts: &NodeOptions, metrics: &Metrics) -> anyhow::Result<Option<Arc<AccessLog>>> {
    let log = match &opts.access_log {
        Some(a) => Some(
            AccessLog::start(a.target.clone(), a.format, metrics.access_log_dropped.clone())
                .with_context(|| format!("cannot open the access log {}", a.target))?,
        ),
        None => None,
    };
    let weak = log.as_ref().map(Arc::downgrade);
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1()) {
        Ok(usr1) => {
            tokio::spawn(reopen_on_signal(usr1, weak));
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGUSR1; the access log reopens only through the admin API")
        }
    }
    Ok(log)
}

async fn reopen_on_signal(mut usr1: tokio::signal::unix::Signal, log: Option<Weak<AccessLog>>) {
    while usr1.recv().await.is_some() {
        let Some(log) = log.as_ref().map(Weak::upgrade) else {
            tracing::info!("SIGUSR1: this node writes no access log file; nothing to reopen");
            continue;
        };
        // The node that owned the log has stopped.
        let Some(log) = log else { return };
        if let Ok(Err(e)) = tokio::task::spawn_blocking(move || log.reopen()).await {
            tracing::error!(error = %e, "SIGUSR1: cannot reopen the access log; writing on to the old file");
        }
    }
}
