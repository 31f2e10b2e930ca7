//! Connections to backends: a pooled idle one when this worker has a live one, else a new one
//! (over TLS for `backend_tls` pools). Failures are counted and reported as passive health
//! observations here, once.

use std::sync::Arc;

use super::error::ProxyError;
use super::io::Upstream;
use crate::dataplane::{DpCtx, connect_backend, tls};
use crate::routing::{BackendRt, PoolRt};

/// A connection to `backend` and whether it was reused from the pool.
pub async fn get(backend: &Arc<BackendRt>, pool: &PoolRt, ctx: &DpCtx) -> Result<(Upstream, bool), ProxyError> {
    if let Some(conn) = backend.shared.pool.take() {
        return Ok((conn, true));
    }
    // Boxed: the connect and TLS state is large and only needed without a pooled connection.
    Box::pin(open(backend, pool, ctx)).await.map(|c| (c, false))
}

/// A new connection to `backend`.
pub async fn open(backend: &BackendRt, pool: &PoolRt, ctx: &DpCtx) -> Result<Upstream, ProxyError> {
    let fail = |what: &str, e: &dyn std::fmt::Display| {
        pool.metrics.connect_error(&backend.key);
        ctx.reporter.passive_failure(&pool.name, backend.addr, format!("{what}: {e}"));
        tracing::warn!(pool = %pool.name, backend = %backend.key, error = %e, "backend {what} failed");
        ProxyError::Connect(format!("{what}: {e}"))
    };
    let stream = connect_backend(backend.addr, pool.connect_timeout).await.map_err(|e| fail("connect", &e))?;
    if !pool.backend_tls {
        return Ok(Upstream::Tcp(stream));
    }
    let Some(config) = ctx.backend_tls.clone() else {
        return Err(fail("TLS", &"no client TLS configuration (--backend-ca)"));
    };
    let name = tls::backend_name(pool.backend_tls_name.as_deref(), backend.addr.ip());
    let connecting = tokio_rustls::TlsConnector::from(config).connect(name, stream);
    match tokio::time::timeout(pool.connect_timeout, connecting).await {
        Ok(Ok(s)) => Ok(Upstream::Tls(Box::new(s))),
        Ok(Err(e)) => Err(fail("TLS handshake", &e)),
        Err(_) => Err(fail("TLS handshake", &"timeout")),
    }
}
