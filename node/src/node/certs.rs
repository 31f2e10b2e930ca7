//! The certificate stores a node serves with (HTTPS, admin, backend client TLS) and the
//! watchers that reload certificates when their files change.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;

use crate::control::raft::channel::RaftTls;
use crate::dataplane::tls::{self, CertFiles, TlsStore};
use crate::metrics::Metrics;

/// The HTTPS listener's certificate store (`None` without an HTTPS port); keys must be private.
pub(super) fn https_store(port: Option<u16>, files: &[CertFiles]) -> anyhow::Result<Option<Arc<TlsStore>>> {
    if port.is_none() {
        return Ok(None);
    }
    for f in files {
        crate::files::ensure_private(&f.key).map_err(|e| anyhow::anyhow!("TLS key {}: {e}", f.key.display()))?;
    }
    Ok(Some(Arc::new(TlsStore::load(files.to_vec()).map_err(|e| anyhow::anyhow!("TLS: {e}"))?)))
}

/// The admin listener's certificate store; its key must be private.
pub(super) fn admin_store(files: &CertFiles) -> anyhow::Result<Arc<TlsStore>> {
    crate::files::ensure_private(&files.key)
        .map_err(|e| anyhow::anyhow!("admin TLS key {}: {e}", files.key.display()))?;
    Ok(Arc::new(TlsStore::load(vec![files.clone()]).map_err(|e| anyhow::anyhow!("admin TLS: {e}"))?))
}

/// Client TLS for `backend_tls` pools: the given CA file must load; the system bundle may be absent.
pub(super) fn backend_client(ca: Option<&Path>) -> anyhow::Result<Option<Arc<rustls::ClientConfig>>> {
    match (ca, tls::client_config(ca)) {
        (_, Ok(c)) => Ok(Some(c)),
        (Some(_), Err(e)) => Err(anyhow::anyhow!("--backend-ca: {e}")),
        (None, Err(e)) => {
            tracing::debug!(error = %e, "no CA bundle: pools with backend_tls cannot connect");
            Ok(None)
        }
    }
}

/// Spawns the HTTPS certificates' watcher.
pub(super) fn spawn_https_watch(store: Arc<TlsStore>) -> JoinHandle<()> {
    tokio::spawn(watch_certificates(store))
}

/// Reloads the server certificates when their files change (every 2 s).
async fn watch_certificates(store: Arc<TlsStore>) {
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tick.tick().await;
        match store.reload_if_changed() {
            Some(Ok(())) => {
                tracing::info!("TLS certificates reloaded (files changed); established connections untouched")
            }
            Some(Err(e)) => tracing::error!(error = %e, "TLS reload failed; the previous certificates stay in service"),
            None => {}
        }
    }
}

/// Reloads the node certificate when its files change (every 2 s): a renewed certificate is
/// used by new Raft connections; a broken or foreign one is refused (logged once) and the
/// running one kept.
pub(super) async fn watch_cluster_certificate(tls: Arc<RaftTls>, metrics: Arc<Metrics>) {
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    let mut last_error = String::new();
    loop {
        tick.tick().await;
        match tls.reload() {
            Ok(true) => tracing::info!("node certificate reloaded; new Raft connections use it"),
            Ok(false) => last_error.clear(),
            Err(e) if e.to_string() != last_error => {
                last_error = e.to_string();
                tracing::error!(error = %e, "node certificate reload failed; the running one stays in service");
            }
            Err(_) => {}
        }
        for (cert, file, not_after) in tls.expiries() {
            metrics.certificate(cert, &file, not_after);
        }
    }
}
