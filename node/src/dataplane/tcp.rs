//! L4 proxy (seed 004's "fl"/"ld" modes): each client connection goes to one backend of the
//! pool that owns the listener port, full duplex until either side is done.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tracing::Instrument;

use super::limits::{self, Acquired, Refused, Want};
use super::relay::Ended;
use super::splice;
use super::{DpCtx, Tried, connect_backend};
use crate::metrics::ListenerMetrics;
use crate::routing::{ActiveGuard, BackendRt, PoolRt};

/// Seed 004's answer when no backend is up, sent before closing the client.
pub const NO_BACKEND: &[u8] = b"{\"response_code\":503,\"response_text\":\"No available backend\"}\n";

/// Most backends tried for one client connection.
const MAX_ATTEMPTS: usize = 4;

/// Serves one accepted client connection on TCP listener `port`.
pub async fn serve(mut client: TcpStream, peer: SocketAddr, port: u16, ctx: Arc<DpCtx>, lm: ListenerMetrics) {
    let table = ctx.table.load_full();
    let Some(pool) = table.tcp.get(&port).map(|i| &table.pools[*i]) else {
        tracing::debug!(%peer, port, "no pool owns this port any more; closing");
        return;
    };
    let span = tracing::info_span!("conn", client = %peer, listener = port, pool = %pool.name, backend = tracing::field::Empty);
    async move {
        tracing::info!("client connected");
        let Ok(connected) = connect_any(pool, peer, &ctx).await else {
            lm.failed.inc();
            tracing::warn!("every backend at max_connections and no room to wait; closed");
            return;
        };
        let Some((backend, upstream, guard)) = connected else {
            pool.metrics.no_backend.inc();
            lm.failed.inc();
            tracing::warn!("no available backend; answered 503");
            let _ = client.write_all(NO_BACKEND).await;
            let _ = client.shutdown().await;
            return;
        };
        tracing::Span::current().record("backend", tracing::field::display(&backend.key));
        tracing::info!("forwarding traffic between client and backend");
        let (moved, ended) = splice::relay(&client, &upstream, pool.idle_timeout).await;
        drop(guard);
        lm.bytes_in.inc_by(moved.up);
        lm.bytes_out.inc_by(moved.down);
        pool.metrics.bytes_in.inc_by(moved.up);
        pool.metrics.bytes_out.inc_by(moved.down);
        match ended {
            Ended::Closed => tracing::info!(client_to_backend = moved.up, backend_to_client = moved.down, "connection closed"),
            Ended::Idle => tracing::info!(client_to_backend = moved.up, backend_to_client = moved.down, "connection closed: idle timeout"),
            Ended::Error(e) => {
                lm.failed.inc();
                tracing::info!(client_to_backend = moved.up, backend_to_client = moved.down, error = %e, "connection closed by an error");
            }
        }
    }
    .instrument(span)
    .await
}

/// Connects to the balancer's pick, moving on to the next healthy backend on failure.
/// `Err`: refused by the pool's queue (every backend at `max_connections`).
async fn connect_any(pool: &PoolRt, peer: SocketAddr, ctx: &DpCtx) -> Result<Option<Connected>, Refused> {
    let mut tried = Tried::<MAX_ATTEMPTS>::default();
    for attempt in 0..MAX_ATTEMPTS.min(pool.routable().len()) {
        let (backend, guard) = match limits::acquire(&ctx.table, pool, Want::Pick(peer.ip(), tried.as_slice())).await {
            Acquired::Got(backend, guard) => (backend, guard),
            Acquired::NoBackend => return Ok(None),
            Acquired::Refused(why) => return Err(why),
        };
        tried.push(backend.addr);
        if attempt > 0 {
            pool.metrics.retries.inc();
        }
        match connect_backend(backend.addr, pool.connect_timeout).await {
            Ok(stream) => return Ok(Some((backend, stream, guard))),
            Err(e) => {
                pool.metrics.connect_error(&backend.key);
                ctx.reporter.passive_failure(&pool.name, backend.addr, format!("connect: {e}"));
                tracing::warn!(backend = %backend.key, error = %e, "backend connect failed; trying the next one");
            }
        }
    }
    Ok(None)
}

type Connected = (Arc<BackendRt>, TcpStream, ActiveGuard);
