//! Connections to backends: a pooled idle one when this worker has a live one, else a new one
//! (over TLS for `backend_tls` pools, after the PROXY header for `send_proxy` pools). Failures
//! are counted and reported as passive health observations here, once.

use std::net::SocketAddr;
use std::sync::Arc;

use shoal_proto::proxy;
use tokio::io::AsyncWriteExt;

use super::error::ProxyError;
use super::io::Upstream;
use crate::dataplane::{DpCtx, connect_backend, tls};
use crate::routing::{BackendRt, PoolRt};

/// A connection to `backend` for the client `addrs` (client, address it connected to) and
/// whether it was reused from the pool.
///
/// `send_proxy` pools never pool: a PROXY header is sent once, at the start of a backend
/// connection, and names one client connection (its port included), so the connection may
/// carry that client's requests only. Keying the idle lists by client would let no other
/// client connection take one (each has its own source port), while filling the per-backend
/// lists with connections kept open after their client left and evicting reusable ones; so
/// such a connection closes after its exchange, which is what a backend requiring the header
/// for each client expects.
pub async fn get(
    backend: &Arc<BackendRt>,
    pool: &PoolRt,
    ctx: &DpCtx,
    addrs: (SocketAddr, SocketAddr),
) -> Result<(Upstream, bool), ProxyError> {
    if pool.send_proxy.is_none()
        && let Some(conn) = backend.shared.pool.take()
    {
        return Ok((conn, true));
    }
    // Boxed: the connect and TLS state is large and only needed without a pooled connection.
    Box::pin(open(backend, pool, ctx, addrs)).await.map(|c| (c, false))
}

/// A new connection to `backend` for the client `addrs`.
pub async fn open(
    backend: &BackendRt,
    pool: &PoolRt,
    ctx: &DpCtx,
    addrs: (SocketAddr, SocketAddr),
) -> Result<Upstream, ProxyError> {
    let fail = |what: &str, e: &dyn std::fmt::Display| {
        pool.metrics.connect_error(&backend.key);
        ctx.reporter.passive_failure(&pool.name, backend.addr, format!("{what}: {e}"));
        tracing::warn!(pool = %pool.name, backend = %backend.key, error = %e, "backend {what} failed");
        ProxyError::Connect(format!("{what}: {e}"))
    };
    let mut stream = connect_backend(backend.addr, pool.connect_timeout).await.map_err(|e| fail("connect", &e))?;
    if let Some(version) = pool.send_proxy {
        // Before any TLS: the header belongs to the TCP connection.
        let header = proxy::encode(version, Some(addrs));
        stream.write_all(&header).await.map_err(|e| fail("PROXY header", &e))?;
    }
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
