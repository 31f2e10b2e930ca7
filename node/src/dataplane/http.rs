//! L7 HTTP/1.1 reverse proxy (seed 003) on shoal's own engine (`h1`): one task per client
//! connection reads request heads (holding no buffer while idle), answers what the proxy
//! answers itself (redirects, 404, 503), routes the rest by host and URL pattern to a pool,
//! picks a backend (retrying elsewhere only while nothing was sent), and relays the exchange;
//! WebSocket upgrades become tunnels. Pipelined requests are answered in order.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::time::{Instant, Sleep};
use tracing::Instrument;

use super::accesslog::{HttpPart, Record};
use super::h1::buf::Buf;
use super::h1::client::Client;
use super::h1::emit::{self, Local};
use super::h1::error::{ProxyError, Reject};
use super::h1::exchange::{self, Next, TunnelStart, Via};
use super::h1::head::{Framing, HeadLimits, Method, ReqHead, head_end, invalid_start, parse_request};
use super::h1::io::Transport;
use super::h1::{tunnel, upstream};
use super::mux::Route;
use super::reqid::{self, Ids};
use super::{DpCtx, Tried, limits, ws};
use crate::metrics::{ListenerMetrics, PoolMetrics};
use crate::routing::PoolRt;
use crate::shutdown::{Phase, Shutdown};

/// Most backends tried for one request (only retried when nothing was sent).
const MAX_ATTEMPTS: usize = 3;

/// Facts about the client connection a request arrived on. `peer` and `local` are the
/// client and the address it connected to: the socket's, or a PROXY protocol header's.
#[derive(Clone, Copy, Debug)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub local: SocketAddr,
    pub tls: bool,
}

/// Serves HTTP/1.1 on one accepted client connection (plain or TLS), in a span naming the
/// client and the listener. Not an `async fn`: the returned future is the connection loop
/// itself, with no second copy of its arguments beside it.
pub fn serve<T: Transport>(io: T, conn: ConnInfo, ctx: Arc<DpCtx>, lm: ListenerMetrics) -> impl Future<Output = ()> {
    let span = tracing::info_span!("conn", client = %conn.peer, listener = %lm.name, tls = conn.tls);
    run(Client::new(io, conn.peer, conn.tls, lm).at(conn.local), ctx).instrument(span)
}

/// What the connection does after a request.
enum After {
    Again,
    Close,
    Tunnel(Box<Tunnel>),
}

/// A tunnel and the pool settings it runs under.
struct Tunnel {
    start: TunnelStart,
    idle: Option<Duration>,
    metrics: Arc<PoolMetrics>,
    /// The upgrade request's access log record, written when the tunnel ends. Boxed: the
    /// tunnel lives in its box as long as the connection, and most nodes log nothing.
    log: Option<Box<Begun>>,
}

/// A request being served: its head, its correlation ids, its access log record.
struct Req {
    head: ReqHead,
    ids: Ids,
    log: Option<Begun>,
}

/// An access log record begun from a request head (before the head is consumed), with the
/// marks its duration and byte counts are measured from.
struct Begun {
    rec: Record,
    started: Instant,
    consumed: u64,
    written: u64,
}

async fn run<T: Transport>(mut c: Client<T>, ctx: Arc<DpCtx>) {
    let mut shutdown = ctx.shutdown.clone();
    let mut deadline = Instant::now() + ctx.limits.header_timeout;
    // One timer for the connection's life, re-armed for each wait: pushing a deadline later
    // costs no work in the timer wheel, where a new timer per wait is registered and removed.
    let mut timer = std::pin::pin!(tokio::time::sleep_until(deadline));
    loop {
        let head = match next_head(&mut c, &ctx, deadline, timer.as_mut(), &mut shutdown).await {
            Ok(Some(head)) => head,
            Ok(None) => break,
            Err(reject) => {
                refuse(&mut c, &ctx, reject).await;
                break;
            }
        };
        let req = begin(&c, head, &ctx);
        // Boxed: the exchange's state exists only while a request is in flight, so an idle
        // connection's future stays small.
        match Box::pin(dispatch(&mut c, req, &ctx)).await {
            After::Again => deadline = Instant::now() + ctx.limits.keepalive_timeout,
            After::Close => break,
            After::Tunnel(t) => {
                Box::pin(run_tunnel(&mut c, t, &ctx)).await;
                break;
            }
        }
    }
    let _ = c.io.shutdown().await;
}

/// Reads until a whole request head is buffered, waiting until `deadline` on `timer`.
/// `Ok(None)`: the connection ends quietly (closed, idle timeout, or the node draining while
/// nothing is pending).
async fn next_head<T: Transport>(
    c: &mut Client<T>,
    ctx: &DpCtx,
    mut deadline: Instant,
    mut timer: Pin<&mut Sleep>,
    shutdown: &mut Shutdown,
) -> Result<Option<ReqHead>, Reject> {
    let limits = HeadLimits { max_bytes: ctx.limits.max_header_bytes, max_headers: ctx.limits.max_headers };
    let mut searched = 0;
    loop {
        let pending = c.pending();
        if !pending.is_empty() {
            // httparse restarts at byte 0: only call it once the head can be complete.
            if (head_end(pending, searched).is_some() || pending.len() > limits.max_bytes)
                && let Some(head) = parse_request(pending, limits)?
            {
                return Ok(Some(head));
            }
            if let Some(reject) = invalid_start(pending) {
                return Err(reject);
            }
            searched = pending.len();
            make_room(c, limits.max_bytes);
        }
        let idle = c.pending().is_empty();
        if timer.deadline() != deadline {
            timer.as_mut().reset(deadline);
        }
        let read = tokio::select! {
            // Bytes that came in time win over the timer, as they did over a timeout's.
            biased;
            r = c.read() => r,
            _ = timer.as_mut() => return if idle { Ok(None) } else { Err(Reject::HeadTimeout) },
            _ = shutdown.wait(), if idle => return Ok(None),
        };
        match read {
            Ok(n) if n > 0 => {
                if idle {
                    // The header timeout runs from a head's first byte (or the accept).
                    deadline = deadline.min(Instant::now() + ctx.limits.header_timeout);
                }
            }
            _ => return Ok(None),
        }
    }
}

/// A head longer than a pooled buffer may still be within the limit: grow for it.
fn make_room<T>(c: &mut Client<T>, max_head: usize) {
    if let Some(buf) = c.buf.as_mut()
        && buf.len() == buf.capacity()
    {
        buf.grow(max_head + 1);
    }
}

/// Answers a request the engine refused, and closes.
async fn refuse<T: Transport>(c: &mut Client<T>, ctx: &DpCtx, reject: Reject) {
    ctx.metrics.rejected_inputs.with_label_values(&[reject.metric()]).inc();
    tracing::debug!(reason = reject.reason(), "request refused");
    send_error(c, reject.status(), reject.reason()).await;
}

/// The error answer sent where the connection closes after it: nothing more of the request is read.
async fn send_error<T: Transport>(c: &mut Client<T>, status: u16, reason: &str) {
    send_error_with(c, status, reason, None).await;
}

async fn send_error_with<T: Transport>(c: &mut Client<T>, status: u16, reason: &str, request_id: Option<&str>) {
    let body = emit::error(status, reason);
    let local =
        Local { status, body: &body, location: None, retry_after: false, close: true, head_only: false, request_id };
    send_local(c, &local).await;
}

async fn send_local<T: Transport>(c: &mut Client<T>, local: &Local<'_>) -> bool {
    let mut out = Buf::take();
    emit::local(&mut out, local);
    c.send(&out).await.is_ok()
}

/// An answer of the proxy's own to `req`. A request body is not read: the connection closes.
async fn answer<T: Transport>(
    c: &mut Client<T>,
    ctx: &DpCtx,
    req: Req,
    status: u16,
    body: &str,
    location: Option<&str>,
) -> After {
    let head = &req.head;
    let close = head.framing != Framing::Empty || !head.keep_alive || ctx.shutdown.phase() >= Phase::Draining;
    c.consume(head.len);
    let local = Local {
        status,
        body,
        location,
        retry_after: status == 503,
        close,
        head_only: head.method == Method::Head,
        request_id: req.ids.sent_request_id(),
    };
    let sent = send_local(c, &local).await;
    log_request(c, ctx, req.log, status);
    if sent && !close { After::Again } else { After::Close }
}

/// Decides the request's ids and, with an access log, begins its record.
fn begin<T: Transport>(c: &Client<T>, head: ReqHead, ctx: &DpCtx) -> Req {
    let src = c.pending();
    let ids = Ids::decide(ctx.ids, single(&head, src, reqid::REQUEST_ID), single(&head, src, reqid::TRACEPARENT));
    if ids.replaced_request_id {
        ctx.metrics.rejected_inputs.with_label_values(&["request_id"]).inc();
    }
    if ids.replaced_traceparent {
        ctx.metrics.rejected_inputs.with_label_values(&["traceparent"]).inc();
    }
    let log = ctx.access_log.is_some().then(|| Begun {
        rec: Record {
            time: Some(crate::clock::wall_now()),
            client: Some(c.peer),
            http: Some(http_part(&head, src, &ids)),
            sni: c.io.server_name().map(Arc::from),
            ..Record::default()
        },
        started: Instant::now(),
        consumed: c.consumed_total(),
        written: c.written_total,
    });
    Req { head, ids, log }
}

/// A header's value when the request has exactly one such line (two make it ambiguous: `b""`).
fn single<'a>(head: &ReqHead, src: &'a [u8], name: &str) -> Option<&'a [u8]> {
    let mut lines = head.fields.iter().filter(|f| f.name.of(src).eq_ignore_ascii_case(name.as_bytes()));
    let first = lines.next()?;
    Some(if lines.next().is_some() { b"" } else { first.value.of(src).trim_ascii() })
}

fn http_part(head: &ReqHead, src: &[u8], ids: &Ids) -> HttpPart {
    let target = head.target.str(src);
    HttpPart {
        method: head.method_span.str(src).to_string(),
        path: if target.is_empty() { "/".to_string() } else { target.to_string() },
        protocol: if head.minor == 0 { "HTTP/1.0" } else { "HTTP/1.1" },
        status: 0,
        request_id: ids.request_id.clone(),
        ec_pin: None,
        user_agent: head.header(src, "user-agent").map(str::to_string),
        referer: head.header(src, "referer").map(str::to_string),
    }
}

/// Completes a request's record (status, bytes, duration) and queues it.
fn log_request<T: Transport>(c: &Client<T>, ctx: &DpCtx, begun: Option<Begun>, status: u16) {
    let (Some(log), Some(mut b)) = (ctx.access_log.as_ref(), begun) else { return };
    if let Some(h) = b.rec.http.as_mut() {
        h.status = status;
    }
    b.rec.bytes_in = c.consumed_total().saturating_sub(b.consumed);
    b.rec.bytes_out = c.written_total.saturating_sub(b.written);
    b.rec.duration_ms = b.started.elapsed().as_secs_f64() * 1000.0;
    log.log(b.rec);
}

async fn dispatch<T: Transport>(c: &mut Client<T>, req: Req, ctx: &Arc<DpCtx>) -> After {
    let head = &req.head;
    let table = ctx.table.load_full();
    if let (false, Some(host)) = (c.id.tls, &ctx.https_redirect) {
        // The plain listener of a TLS deployment sends everyone to `https://host` (as the EC image did).
        let location = format!("https://{host}{}{}", head.path(c.pending()), head.query(c.pending()));
        return redirect(c, ctx, req, &location).await;
    }
    let host = if table.mux.has_hosts() { host_key(head, c.pending()) } else { String::new() };
    let route = table.mux.route(&host, head.path(c.pending()));
    match route {
        Route::NotFound if table.starting => {
            // A starting node may not have applied its pools yet: "try again", not "no such URL".
            answer(c, ctx, req, 503, &emit::error(503, "node is starting"), None).await
        }
        Route::NotFound => answer(c, ctx, req, 404, &emit::error(404, "no pool matches this URL"), None).await,
        Route::Redirect(path) => {
            let location = format!("{path}{}", head.query(c.pending()));
            redirect(c, ctx, req, &location).await
        }
        Route::Pool(idx) => forward(c, req, ctx, &table.pools[idx]).await,
    }
}

async fn redirect<T: Transport>(c: &mut Client<T>, ctx: &DpCtx, req: Req, location: &str) -> After {
    let body = format!("<a href=\"{location}\">Moved Permanently</a>.\n");
    answer(c, ctx, req, 301, &body, Some(location)).await
}

/// The Host without its port, lower-cased, for host patterns.
fn host_key(head: &ReqHead, src: &[u8]) -> String {
    let raw = head.host.map_or("", |h| h.str(src));
    strip_port(raw).to_ascii_lowercase()
}

fn strip_port(raw: &str) -> &str {
    if raw.starts_with('[') {
        return raw.find(']').map_or(raw, |i| &raw[..=i]);
    }
    match raw.rsplit_once(':') {
        Some((h, p)) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => raw,
    }
}

/// Sends the request to a backend of `pool` and relays the answer.
async fn forward<T: Transport>(c: &mut Client<T>, mut req: Req, ctx: &Arc<DpCtx>, pool: &PoolRt) -> After {
    let started = Instant::now();
    if let Some(b) = req.log.as_mut() {
        b.rec.pool = Some(pool.name.to_string());
    }
    if pool.routable().is_empty() {
        pool.metrics.no_backend.inc();
        // As HAProxy and Envoy (and shoal's TCP pools) answer: nothing to try, not a bad answer.
        pool.metrics.response(503);
        return answer(c, ctx, req, 503, &emit::error(503, "no healthy backend"), None).await;
    }
    let head = &req.head;
    let src = c.pending();
    let asked = if pool.pinning { ws::pinned(|name| head.header(src, name), head.path(src)) } else { None };
    let (pin, vm_path) = match asked {
        Some(ws::Pin { slot, path }) => (pool.has_slot(slot).then_some(slot), path),
        None => (None, None),
    };
    if let Some(h) = req.log.as_mut().and_then(|b| b.rec.http.as_mut()) {
        h.ec_pin = pin;
    }
    let mut tried = Tried::<MAX_ATTEMPTS>::default();
    let attempts = if pin.is_some() { 1 } else { MAX_ATTEMPTS.min(pool.routable().len()) };
    for attempt in 0..attempts {
        let want = match pin {
            Some(slot) => limits::Want::Slot(slot),
            None => limits::Want::Pick(c.peer.ip(), tried.as_slice()),
        };
        let (backend, guard) = match limits::acquire(&ctx.table, pool, want).await {
            limits::Acquired::Got(backend, guard) => (backend, guard),
            limits::Acquired::NoBackend => break,
            limits::Acquired::Refused(why) => {
                pool.metrics.response(503);
                return answer(c, ctx, req, 503, &emit::error(503, why.reason()), None).await;
            }
        };
        let backend = &backend;
        tried.push(backend.addr);
        if attempt > 0 {
            pool.metrics.retries.inc();
        }
        let connecting = Instant::now();
        // A connect failure sent nothing: another backend may take the request.
        let Ok((conn, reused)) = upstream::get(backend, pool, ctx, c.addrs()).await else { continue };
        let sent = Instant::now();
        c.response_at = None;
        let via = Via { backend, pool, ctx, conn, reused, ids: &req.ids };
        let result = exchange::run(c, &req.head, vm_path.as_deref(), via, guard, pin.is_some()).await;
        let status = result.as_ref().map_or_else(|e| e.status().unwrap_or(0), |(s, _)| *s);
        limits::observe(&ctx.reporter, pool, backend, status);
        pool.metrics.duration.observe(started.elapsed().as_secs_f64());
        if let Some(b) = req.log.as_mut() {
            b.rec.backend = Some(backend.key.to_string());
            b.rec.connect_ms = Some(sent.duration_since(connecting).as_secs_f64() * 1000.0);
            b.rec.response_ms = c.response_at.map(|at| at.duration_since(sent).as_secs_f64() * 1000.0);
        }
        let rid = req.ids.sent_request_id();
        return match finish(c, ctx, pool, &backend.key, backend.addr, result, rid).await {
            After::Tunnel(mut t) => {
                t.log = req.log.map(Box::new);
                After::Tunnel(t)
            }
            after => {
                log_request(c, ctx, req.log, status);
                after
            }
        };
    }
    pool.metrics.no_backend.inc();
    let (status, msg) = match pin {
        Some(slot) => (503, format!("pinned backend gw{slot} is not available")),
        None => (502, "no backend could be reached".to_string()),
    };
    pool.metrics.response(status);
    answer(c, ctx, req, status, &emit::error(status, &msg), None).await
}

/// Turns an exchange's outcome into what the connection does next; every failure is answered
/// (when an answer can still be written) and counted here.
async fn finish<T: Transport>(
    c: &mut Client<T>,
    ctx: &DpCtx,
    pool: &PoolRt,
    backend: &str,
    addr: SocketAddr,
    result: Result<(u16, Next), ProxyError>,
    request_id: Option<&str>,
) -> After {
    match result {
        Ok((status, next)) => {
            pool.metrics.response(status);
            match next {
                Next::Again => After::Again,
                Next::Close => After::Close,
                Next::Tunnel(start) => After::Tunnel(Box::new(Tunnel {
                    start,
                    idle: pool.idle_timeout,
                    metrics: pool.metrics.clone(),
                    log: None,
                })),
            }
        }
        Err(e) => {
            if e.passive_failure() {
                tracing::warn!(pool = %pool.name, backend, error = %e, "backend exchange failed");
                ctx.reporter.passive_failure(&pool.name, addr, e.to_string());
            }
            if let ProxyError::Reject(r) = &e {
                ctx.metrics.rejected_inputs.with_label_values(&[r.metric()]).inc();
            }
            let Some(status) = e.status() else {
                c.failed();
                return After::Close;
            };
            pool.metrics.response(status);
            send_error_with(c, status, e.reason(), request_id).await;
            After::Close
        }
    }
}

/// Relays an upgraded connection until it ends. The tunnel's state stays in its box (the
/// connection's future holds the pointer): an idle tunnel is the EC workload, so its task
/// carries no inline copy of the upstream stream or the upgrade request's log record.
async fn run_tunnel<T: Transport>(c: &mut Client<T>, mut t: Box<Tunnel>, ctx: &Arc<DpCtx>) {
    let _count = ws::TunnelCount::new(t.start.backend.clone(), t.start.pinned, ctx.clone());
    t.metrics.upgrades.inc();
    // Bytes the client sent after its upgrade request were held until the backend agreed.
    let held = c.buf.take();
    let (moved, ended) = tunnel::relay(&mut c.io, &mut t.start.upstream, held, t.idle, ctx.shutdown.clone()).await;
    // Past the last await: what is moved out of the box now is never part of the idle task.
    let Tunnel { start: TunnelStart { upstream, backend, guard, pinned }, metrics, log, .. } = *t;
    metrics.upgrades.dec();
    metrics.bytes_in.inc_by(moved.up);
    metrics.bytes_out.inc_by(moved.down);
    c.count(moved.up, moved.down);
    drop(guard);
    log_request(c, ctx, log.map(|b| *b), 101);
    drop(upstream);
    tracing::info!(pool = %metrics.pool, backend = %backend.key, pinned, client_to_backend = moved.up, backend_to_client = moved.down, ?ended, "upgraded connection closed");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn future_size<A, B, C, Fut, F: FnOnce(A, B, C) -> Fut>(_: &F) -> usize {
        std::mem::size_of::<Fut>()
    }

    /// An idle WebSocket is what an EC node holds by the thousand: its box and its relay
    /// future are all it keeps beside the connection's task (an inline log record made each
    /// tunnel 1.3 KiB larger once).
    #[test]
    fn an_idle_tunnel_holds_little() {
        use tokio::net::TcpStream;
        assert!(std::mem::size_of::<Tunnel>() <= 128, "Tunnel: {} bytes", std::mem::size_of::<Tunnel>());
        let f = |c: &'static mut Client<TcpStream>, t: Box<Tunnel>, ctx: &'static Arc<DpCtx>| run_tunnel(c, t, ctx);
        assert!(future_size(&f) <= 1024, "tunnel future: {} bytes", future_size(&f));
    }

    #[test]
    fn ports_are_stripped_from_hosts() {
        assert_eq!(strip_port("example.com:8080"), "example.com");
        assert_eq!(strip_port("example.com"), "example.com");
        assert_eq!(strip_port("[::1]:80"), "[::1]");
        assert_eq!(strip_port("[::1]"), "[::1]");
    }
}
