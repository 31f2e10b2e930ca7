//! L4 proxy (seed 004's "fl"/"ld" modes): each client connection goes to one backend of the
//! pool that owns the listener port, full duplex until either side is done. A pool may
//! require a PROXY protocol header from its clients (`accept_proxy_from`) and send one to its
//! backends (`send_proxy`).

use std::net::SocketAddr;
use std::sync::Arc;
use tokio::time::Instant;

use shoal_proto::proxy;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tracing::Instrument;

use super::accesslog::Record;
use super::http::ConnInfo;
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
pub async fn serve(mut client: TcpStream, conn: ConnInfo, port: u16, ctx: Arc<DpCtx>, lm: ListenerMetrics) {
    let table = ctx.table.load_full();
    let Some(pool) = table.tcp.get(&port).map(|i| &table.pools[*i]) else {
        tracing::debug!(peer = %conn.peer, port, "no pool owns this port any more; closing");
        return;
    };
    let trusted = pool.accept_proxy_from.as_deref();
    let Some(conn) = super::proxy::accept(&mut client, conn, trusted, &ctx.metrics, &lm.name).await else { return };
    let peer = conn.peer;
    let span = tracing::info_span!("conn", client = %peer, listener = port, pool = %pool.name, backend = tracing::field::Empty);
    async move {
        tracing::info!("client connected");
        let mut log = ctx.access_log.is_some().then(|| begin(peer, &pool.name));
        let Ok(connected) = connect_any(pool, &conn, &ctx).await else {
            lm.failed.inc();
            tracing::warn!("every backend at max_connections and no room to wait; closed");
            log_connection(&ctx, log, 0, 0);
            return;
        };
        let Some((backend, upstream, guard)) = connected else {
            pool.metrics.no_backend.inc();
            lm.failed.inc();
            tracing::warn!("no available backend; answered 503");
            let sent = client.write_all(NO_BACKEND).await.is_ok();
            let _ = client.shutdown().await;
            log_connection(&ctx, log, 0, if sent { NO_BACKEND.len() as u64 } else { 0 });
            return;
        };
        if let Some((rec, started)) = log.as_mut() {
            rec.backend = Some(backend.key.clone());
            rec.connect_ms = Some(started.elapsed().as_secs_f64() * 1000.0);
        }
        tracing::Span::current().record("backend", tracing::field::display(&backend.key));
        tracing::info!("forwarding traffic between client and backend");
        let (moved, ended) = splice::relay(&client, &upstream, pool.idle_timeout).await;
        drop(guard);
        log_connection(&ctx, log, moved.up, moved.down);
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

/// A connection's access log record, begun at the accept, and when it began.
fn begin(peer: SocketAddr, pool: &str) -> (Record, Instant) {
    let rec = Record {
        time: Some(crate::clock::wall_now()),
        client: Some(peer),
        pool: Some(pool.to_string()),
        ..Record::default()
    };
    (rec, Instant::now())
}

/// Completes a connection's record as it ends and queues it.
fn log_connection(ctx: &DpCtx, begun: Option<(Record, Instant)>, bytes_in: u64, bytes_out: u64) {
    let (Some(log), Some((mut rec, started))) = (ctx.access_log.as_ref(), begun) else { return };
    rec.bytes_in = bytes_in;
    rec.bytes_out = bytes_out;
    rec.duration_ms = started.elapsed().as_secs_f64() * 1000.0;
    log.log(rec);
}

/// Connects to the balancer's pick, moving on to the next healthy backend on failure.
/// `Err`: refused by the pool's queue (every backend at `max_connections`).
async fn connect_any(pool: &PoolRt, conn: &ConnInfo, ctx: &DpCtx) -> Result<Option<Connected>, Refused> {
    let mut tried = Tried::<MAX_ATTEMPTS>::default();
    for attempt in 0..MAX_ATTEMPTS.min(pool.routable().len()) {
        let (backend, guard) =
            match limits::acquire(&ctx.table, pool, Want::Pick(conn.peer.ip(), tried.as_slice())).await {
                Acquired::Got(backend, guard) => (backend, guard),
                Acquired::NoBackend => return Ok(None),
                Acquired::Refused(why) => return Err(why),
            };
        tried.push(backend.addr);
        if attempt > 0 {
            pool.metrics.retries.inc();
        }
        match connect_proxied(backend.addr, pool, conn).await {
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

/// A connection to `addr`, the pool's PROXY header (naming the client) already sent.
async fn connect_proxied(addr: SocketAddr, pool: &PoolRt, conn: &ConnInfo) -> std::io::Result<TcpStream> {
    let mut stream = connect_backend(addr, pool.connect_timeout).await?;
    if let Some(version) = pool.send_proxy {
        stream.write_all(&proxy::encode(version, Some((conn.peer, conn.local)))).await?;
    }
    Ok(stream)
}

type Connected = (Arc<BackendRt>, TcpStream, ActiveGuard);
