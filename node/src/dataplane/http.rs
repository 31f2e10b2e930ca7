//! L7 HTTP/1.1 reverse proxy (seed 003): pools matched by URL pattern, keep-alive connection
//! reuse to backends, `X-Forwarded-*`, `X-Real-IP` and `Forwarded` headers, hop-by-hop headers
//! removed, bodies streamed in both directions, `Upgrade` (WebSocket) relayed byte for byte once
//! both sides agree.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::{TokioIo, TokioTimer};
use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tracing::Instrument;

use super::count::{CountedIo, ReqBody};
use super::h1scan::{ScanFlag, ScannedIo, Violation};
use super::mux::{Route, join_path};
use super::ws;
use super::{DpCtx, Tried, connect_backend, tls};
use crate::metrics::{ListenerMetrics, PoolMetrics};
use crate::routing::{ActiveGuard, BackendRt, BackendShared, PoolRt};

/// Most backends tried for one request (only retried when nothing was sent).
const MAX_ATTEMPTS: usize = 3;

/// Facts about the client connection a request arrived on.
#[derive(Clone, Copy, Debug)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub tls: bool,
}

/// Serves HTTP/1.1 on one accepted client connection (plain or TLS), in a span naming the
/// client and the listener.
pub async fn serve<S>(io: S, conn: ConnInfo, ctx: Arc<DpCtx>, lm: ListenerMetrics)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let span = tracing::info_span!("conn", client = %conn.peer, listener = %lm.name, tls = conn.tls);
    serve_conn(io, conn, ctx, lm).instrument(span).await
}

async fn serve_conn<S>(io: S, conn: ConnInfo, ctx: Arc<DpCtx>, lm: ListenerMetrics)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc_ctx = ctx.clone();
    let state = Arc::new(ConnState::new(conn));
    let svc_state = state.clone();
    let service = hyper::service::service_fn(move |req| {
        let (ctx, state) = (svc_ctx.clone(), svc_state.clone());
        async move { Ok::<_, Infallible>(handle(req, conn, &ctx, &state).await) }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(ctx.limits.header_timeout)
        .max_buf_size(ctx.limits.max_header_bytes.max(8192))
        .max_headers(ctx.limits.max_headers);
    let io = ScannedIo::new(io, ctx.limits.max_header_bytes, state.clone());
    let io = CountedIo::new(io, lm.bytes_in.clone(), lm.bytes_out.clone());
    let served = builder.serve_connection(TokioIo::new(io), service).with_upgrades();
    tokio::pin!(served);
    let mut shutdown = ctx.shutdown.clone();
    let result = tokio::select! {
        r = served.as_mut() => r,
        _ = shutdown.wait() => {
            // Finish the request in flight, then close instead of keeping the connection alive.
            served.as_mut().graceful_shutdown();
            served.await
        }
    };
    if let Err(e) = result {
        lm.failed.inc();
        tracing::debug!(error = %e, "client connection ended with an error");
    }
}

/// Routes and proxies one request; every failure becomes a short HTTP error.
async fn handle(req: Request<Incoming>, conn: ConnInfo, ctx: &Arc<DpCtx>, state: &ConnState) -> Response<ProxyBody> {
    let scan = &state.scan;
    let table = ctx.table.load_full();
    if let Some(v) = scan.get() {
        return refuse(ctx, v);
    }
    if let Some(bad) = reject_smuggling(req.headers()) {
        ctx.metrics.rejected_inputs.with_label_values(&["http_smuggling"]).inc();
        return error(StatusCode::BAD_REQUEST, bad, true);
    }
    if let (false, Some(host)) = (conn.tls, &ctx.https_redirect) {
        return to_https(host, req.uri());
    }
    let host = if table.mux.has_hosts() { host_of(&req) } else { String::new() };
    match table.mux.route(&host, req.uri().path()) {
        Route::NotFound if table.starting => starting(),
        Route::NotFound => error(StatusCode::NOT_FOUND, "no pool matches this URL", false),
        Route::Redirect(path) => redirect(&path, req.uri()),
        Route::Pool(idx) => {
            let pool = &table.pools[idx];
            let access = ctx.access_log.then(|| (req.method().clone(), req.uri().clone(), Instant::now()));
            let mut resp = forward(req, conn, ctx, pool, &state.client).await;
            if let (Some(v), true) = (scan.get(), resp.status().is_server_error()) {
                // The backend exchange failed because the client's body was malformed.
                resp = refuse(ctx, v);
            }
            pool.metrics.response(resp.status().as_u16());
            if let Some((method, uri, started)) = access {
                let backend = resp.extensions().get::<ServedBy>().map(|s| s.0.as_str()).unwrap_or("-");
                let ms = started.elapsed().as_secs_f64() * 1000.0;
                tracing::info!(%method, %uri, status = resp.status().as_u16(), pool = %pool.name, backend, ms, "request");
            }
            resp
        }
    }
}

/// A starting node may not have applied its pools yet: "try again", not "no such URL".
fn starting() -> Response<ProxyBody> {
    let mut resp = error(StatusCode::SERVICE_UNAVAILABLE, "node is starting", false);
    resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    resp
}

/// Answers a violation the request scanner found, and closes the connection.
fn refuse(ctx: &DpCtx, v: Violation) -> Response<ProxyBody> {
    ctx.metrics.rejected_inputs.with_label_values(&["http_framing"]).inc();
    let status = StatusCode::from_u16(v.status()).unwrap_or(StatusCode::BAD_REQUEST);
    error(status, v.reason(), true)
}

/// Request shapes that smuggle a second request past a proxy: refused outright (RFC 9112 §6.3).
fn reject_smuggling(headers: &HeaderMap) -> Option<&'static str> {
    let te = headers.get_all(header::TRANSFER_ENCODING).iter().count();
    let cl: Vec<&HeaderValue> = headers.get_all(header::CONTENT_LENGTH).iter().collect();
    if te > 0 && !cl.is_empty() {
        return Some("both Transfer-Encoding and Content-Length");
    }
    if cl.len() > 1 {
        return Some("more than one Content-Length");
    }
    if te > 0 {
        let chunked_last = headers
            .get_all(header::TRANSFER_ENCODING)
            .iter()
            .next_back()
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim().to_ascii_lowercase().ends_with("chunked"));
        if !chunked_last {
            return Some("Transfer-Encoding without final chunked");
        }
    }
    None
}

async fn forward(
    mut req: Request<Incoming>,
    conn: ConnInfo,
    ctx: &Arc<DpCtx>,
    pool: &PoolRt,
    client: &ClientHeaders,
) -> Response<ProxyBody> {
    let started = Instant::now();
    if pool.routable().is_empty() {
        pool.metrics.no_backend.inc();
        // As HAProxy and Envoy (and shoal's TCP pools) answer: nothing to try, not a bad answer.
        return error(StatusCode::SERVICE_UNAVAILABLE, "no healthy backend", false);
    }
    let asked = if pool.pinning { ws::pinned(req.headers(), req.uri().path()) } else { None };
    let (pin, vm_path) = match asked {
        Some(ws::Pin { slot, path }) => (pool.has_slot(slot).then_some(slot), path),
        None => (None, None),
    };
    let upgrade = wants_upgrade(req.headers());
    let websocket = upgrade && ws::is_websocket(req.headers());
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    let host = request_host(&parts);
    prepare_headers(&mut parts.headers, client, host.as_ref().and_then(|h| h.to_str().ok()), upgrade);
    if let Some(path) = &vm_path {
        parts.uri = with_path(&parts.uri, path);
    }
    let original = parts.uri.clone();
    parts.version = http::Version::HTTP_11;
    let mut outgoing = Some(Request::from_parts(parts, ReqBody::new(body, pool.metrics.bytes_in.clone())));
    let mut tried = Tried::<MAX_ATTEMPTS>::default();
    let attempts = if pin.is_some() { 1 } else { MAX_ATTEMPTS.min(pool.routable().len()) };
    for attempt in 0..attempts {
        let chosen = match pin {
            Some(slot) => pool.by_slot(slot),
            None => pool.pick(conn.peer.ip(), tried.as_slice()),
        };
        let Some(backend) = chosen else { break };
        tried.push(backend.addr);
        if attempt > 0 {
            pool.metrics.retries.inc();
        }
        let guard = backend.shared.track();
        match exchange(&original, &mut outgoing, backend, pool, ctx).await {
            Exchange::Response(resp, sender) => {
                let tunnel = ws::Tunnel { backend: backend.clone(), guard, websocket, pinned: pin.is_some() };
                return respond(resp, sender, tunnel, pool, client_upgrade, started, ctx);
            }
            Exchange::RetryElsewhere => continue,
            Exchange::Failed(status, msg) => return error(status, msg, false),
        }
    }
    pool.metrics.no_backend.inc();
    match pin {
        Some(slot) => {
            error(StatusCode::SERVICE_UNAVAILABLE, &format!("pinned backend gw{slot} is not available"), false)
        }
        None => error(StatusCode::BAD_GATEWAY, "no backend could be reached", false),
    }
}

fn with_path(uri: &Uri, path: &str) -> Uri {
    let pq = match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    };
    Uri::try_from(pq).unwrap_or_else(|_| uri.clone())
}

/// Outcome of sending the request to one backend.
enum Exchange {
    Response(Response<Incoming>, SendRequest<ReqBody>),
    /// Nothing was sent: another backend may take the request.
    RetryElsewhere,
    Failed(StatusCode, &'static str),
}

/// Sends `outgoing` (taken, and put back when hyper returns it unsent) to `backend`.
async fn exchange(
    original: &Uri,
    outgoing: &mut Option<Request<ReqBody>>,
    backend: &BackendRt,
    pool: &PoolRt,
    ctx: &DpCtx,
) -> Exchange {
    // A pooled connection may have been closed by the backend meanwhile: hyper hands the
    // request back unsent, and we retry on a fresh connection to the same backend.
    let mut pooled = backend.shared.pool.take();
    loop {
        let fresh = pooled.is_none();
        let mut sender = match pooled.take() {
            Some(s) => s,
            // Boxed: the connect (and TLS) state is large and rarely needed with keep-alive;
            // inline it would be moved around with every request's future.
            None => match Box::pin(open(backend, pool, ctx)).await {
                Ok(s) => s,
                Err(()) => return Exchange::RetryElsewhere,
            },
        };
        if sender.ready().await.is_err() {
            if fresh {
                return Exchange::Failed(StatusCode::BAD_GATEWAY, "backend closed the connection");
            }
            continue;
        }
        let Some(mut out) = outgoing.take() else {
            return Exchange::Failed(StatusCode::BAD_GATEWAY, "request lost");
        };
        address(&mut out, original, backend);
        let sent = tokio::time::timeout(pool.response_timeout, sender.try_send_request(out)).await;
        match sent {
            Err(_) => {
                tracing::warn!(pool = %pool.name, backend = %backend.key, "backend response timeout");
                return Exchange::Failed(StatusCode::GATEWAY_TIMEOUT, "backend response timeout");
            }
            Ok(Ok(resp)) => return Exchange::Response(resp, sender),
            Ok(Err(mut e)) => match e.take_message() {
                Some(unsent) if !fresh => {
                    *outgoing = Some(unsent);
                    continue;
                }
                _ => {
                    let err = e.into_error();
                    tracing::warn!(pool = %pool.name, backend = %backend.key, error = %err, "backend exchange failed");
                    ctx.reporter.passive_failure(&pool.name, backend.addr, format!("exchange: {err}"));
                    return Exchange::Failed(StatusCode::BAD_GATEWAY, "backend failed to answer");
                }
            },
        }
    }
}

/// Points the request at `backend`: its `url_path` in front of the path, origin form, a Host.
fn address(req: &mut Request<ReqBody>, original: &Uri, backend: &BackendRt) {
    let plain = backend.url_path == "/" && original.scheme().is_none();
    *req.uri_mut() = if plain {
        original.clone()
    } else {
        let path = join_path(&backend.url_path, original.path());
        let pq = match original.query() {
            Some(q) => format!("{path}?{q}"),
            None => path,
        };
        Uri::try_from(pq).unwrap_or_else(|_| Uri::from_static("/"))
    };
    if !req.headers().contains_key(header::HOST)
        && let Ok(v) = HeaderValue::from_str(&backend.key)
    {
        req.headers_mut().insert(header::HOST, v);
    }
}

/// Opens a new keep-alive connection to `backend` (over TLS for `backend_tls` pools);
/// failures are reported as passive.
async fn open(backend: &BackendRt, pool: &PoolRt, ctx: &DpCtx) -> Result<SendRequest<ReqBody>, ()> {
    let fail = |what: &str, e: &dyn std::fmt::Display| {
        pool.metrics.connect_error(&backend.key);
        ctx.reporter.passive_failure(&pool.name, backend.addr, format!("{what}: {e}"));
        tracing::warn!(pool = %pool.name, backend = %backend.key, error = %e, "backend {what} failed");
    };
    let stream = connect_backend(backend.addr, pool.connect_timeout).await.map_err(|e| fail("connect", &e))?;
    if !pool.backend_tls {
        return handshake(TokioIo::new(stream), backend).await;
    }
    let Some(config) = ctx.backend_tls.clone() else {
        fail("TLS", &"no client TLS configuration (--backend-ca)");
        return Err(());
    };
    let name = tls::backend_name(pool.backend_tls_name.as_deref(), backend.addr.ip());
    let connecting = tokio_rustls::TlsConnector::from(config).connect(name, stream);
    let tls_stream = match tokio::time::timeout(pool.connect_timeout, connecting).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            fail("TLS handshake", &e);
            return Err(());
        }
        Err(_) => {
            fail("TLS handshake", &"timeout");
            return Err(());
        }
    };
    handshake(TokioIo::new(tls_stream), backend).await
}

async fn handshake<T>(io: TokioIo<T>, backend: &BackendRt) -> Result<SendRequest<ReqBody>, ()>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    match hyper::client::conn::http1::Builder::new().handshake(io).await {
        Ok((sender, conn)) => {
            tokio::spawn(async move {
                let _ = conn.with_upgrades().await;
            });
            Ok(sender)
        }
        Err(e) => {
            tracing::warn!(backend = %backend.key, error = %e, "backend handshake failed");
            Err(())
        }
    }
}

fn respond(
    mut resp: Response<Incoming>,
    sender: SendRequest<ReqBody>,
    tunnel: ws::Tunnel,
    pool: &PoolRt,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    started: Instant,
    ctx: &Arc<DpCtx>,
) -> Response<ProxyBody> {
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let Some(client) = client_upgrade else {
            return error(StatusCode::BAD_GATEWAY, "backend switched protocols unasked", false);
        };
        let backend_upgrade = hyper::upgrade::on(&mut resp);
        ws::spawn(client, backend_upgrade, tunnel, pool, ctx.clone());
        let (parts, _) = resp.into_parts();
        return Response::from_parts(parts, ProxyBody::empty());
    }
    strip_hop_by_hop(resp.headers_mut(), false);
    if ctx.access_log {
        resp.extensions_mut().insert(ServedBy(tunnel.backend.key.clone()));
    }
    let done = ResponseGuard {
        _active: tunnel.guard,
        conn: Some((sender, tunnel.backend.shared.clone())),
        started,
        metrics: pool.metrics.clone(),
    };
    if resp.body().is_end_stream() {
        // No body to relay (204, HEAD, length 0): the exchange is already complete.
        done.complete();
        return resp.map(|body| ProxyBody::Backend { body, guard: None });
    }
    resp.map(|body| ProxyBody::Backend { body, guard: Some(done) })
}

fn wants_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE) && connection_has(headers, "upgrade")
}

fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Removes hop-by-hop headers (RFC 9110 §7.6.1), keeping `Upgrade` on upgrade requests.
fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // One pass over the names is cheaper than hashing nine removals on every message.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    if headers.contains_key(header::CONNECTION) {
        remove_listed(headers, keep_upgrade);
    }
    for name in HOP_BY_HOP {
        if keep_upgrade && (name == header::UPGRADE || name == header::CONNECTION) {
            continue;
        }
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
}

const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::UPGRADE,
];

fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(name) || name.as_str() == "keep-alive" || name.as_str() == "proxy-connection"
}

/// Removes the headers a `Connection` header names (other than the usual tokens).
fn remove_listed(headers: &mut HeaderMap, keep_upgrade: bool) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.eq_ignore_ascii_case("keep-alive") && !t.eq_ignore_ascii_case("close"))
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .filter(|n| !(keep_upgrade && n == header::UPGRADE))
        .collect();
    for name in listed {
        headers.remove(name);
    }
}

/// The request's host (Host header, else the URI's authority), for `Forwarded: host=`; a
/// header value clone shares its bytes.
fn request_host(parts: &http::request::Parts) -> Option<HeaderValue> {
    let authority = || parts.uri.authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok());
    parts.headers.get(header::HOST).cloned().or_else(authority)
}

/// Client identity headers: `X-Forwarded-For` gets the client appended (nginx's
/// `$proxy_add_x_forwarded_for`: the last entry is the one a proxy vouches for), while
/// `X-Real-IP` and `Forwarded` are replaced outright, so what a client sent in them never
/// reaches a backend: shoal sends one `Forwarded` element (for, proto, host) of its own.
fn prepare_headers(headers: &mut HeaderMap, client: &ClientHeaders, host: Option<&str>, upgrade: bool) {
    strip_hop_by_hop(headers, upgrade);
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    let xff = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(prior) => {
            let joined = format!("{prior}, {}", client.ip.to_str().unwrap_or(""));
            HeaderValue::from_str(&joined).unwrap_or_else(|_| client.ip.clone())
        }
        None => client.ip.clone(),
    };
    headers.insert("x-forwarded-for", xff);
    headers.insert("x-forwarded-proto", HeaderValue::from_static(if client.tls { "https" } else { "http" }));
    headers.insert("x-real-ip", client.ip.clone());
    headers.insert(header::FORWARDED, client.forwarded(host));
}

/// What the identity headers say about one client connection, computed once per connection.
pub struct ClientHeaders {
    /// The client's IP as a header value.
    ip: HeaderValue,
    tls: bool,
    /// `for=…;proto=…`: the `Forwarded` element without its host.
    forwarded: String,
}

impl ClientHeaders {
    fn new(conn: ConnInfo) -> ClientHeaders {
        let ip = conn.peer.ip();
        let value = HeaderValue::from_str(&ip.to_string()).unwrap_or(HeaderValue::from_static("unknown"));
        // RFC 7239 §6: an IPv6 node is bracketed and, having colons, quoted.
        let node = if ip.is_ipv6() { format!("\"[{ip}]\"") } else { ip.to_string() };
        let proto = if conn.tls { "https" } else { "http" };
        ClientHeaders { ip: value, tls: conn.tls, forwarded: format!("for={node};proto={proto}") }
    }

    /// The `Forwarded` element for a request to `host` (left out when it cannot be quoted).
    fn forwarded(&self, host: Option<&str>) -> HeaderValue {
        let quotable = |h: &&str| !h.is_empty() && h.bytes().all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\');
        let value = match host.filter(quotable) {
            Some(h) => format!("{};host=\"{h}\"", self.forwarded),
            None => self.forwarded.clone(),
        };
        HeaderValue::from_str(&value).unwrap_or(HeaderValue::from_static("for=unknown"))
    }
}

/// Per-connection state the request handler shares with the connection's IO wrappers.
pub struct ConnState {
    /// Violations the request scanner saw on this connection.
    pub scan: ScanFlag,
    /// The client's identity headers, computed once per connection.
    client: ClientHeaders,
}

impl ConnState {
    fn new(conn: ConnInfo) -> ConnState {
        ConnState { scan: ScanFlag::default(), client: ClientHeaders::new(conn) }
    }
}

impl AsRef<ScanFlag> for ConnState {
    fn as_ref(&self) -> &ScanFlag {
        &self.scan
    }
}

/// The Host header (or URI authority) without port, lower-cased, for host patterns.
fn host_of(req: &Request<Incoming>) -> String {
    let raw = req.uri().host().or_else(|| req.headers().get(header::HOST).and_then(|h| h.to_str().ok())).unwrap_or("");
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

/// The plain listener of a TLS deployment sends everyone to `https://host` (as the EC image did).
fn to_https(host: &str, uri: &Uri) -> Response<ProxyBody> {
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    redirect_to(&format!("https://{host}{path}"))
}

fn redirect(path: &str, uri: &Uri) -> Response<ProxyBody> {
    let location = match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    };
    redirect_to(&location)
}

fn redirect_to(location: &str) -> Response<ProxyBody> {
    let mut resp = Response::new(ProxyBody::full(format!("<a href=\"{location}\">Moved Permanently</a>.\n")));
    *resp.status_mut() = StatusCode::MOVED_PERMANENTLY;
    if let Ok(v) = HeaderValue::from_str(location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}

/// A short plain-text error; `close` also ends the client connection.
pub fn error(status: StatusCode, msg: &str, close: bool) -> Response<ProxyBody> {
    let mut resp = Response::new(ProxyBody::full(format!(
        "{} {}: {msg}\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    )));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    if close {
        resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

/// The backend that answered, for the access log.
#[derive(Clone, Debug)]
struct ServedBy(String);

/// What finishing (or abandoning) a proxied response does.
struct ResponseGuard {
    _active: ActiveGuard,
    /// Returned to the idle pool only when the body ended cleanly.
    conn: Option<(SendRequest<ReqBody>, Arc<BackendShared>)>,
    started: Instant,
    metrics: Arc<PoolMetrics>,
}

impl ResponseGuard {
    fn complete(mut self) {
        if let Some((sender, shared)) = self.conn.take() {
            shared.pool.put(sender);
        }
    }
}

impl Drop for ResponseGuard {
    fn drop(&mut self) {
        self.metrics.duration.observe(self.started.elapsed().as_secs_f64());
    }
}

pin_project! {
    /// Response body: streamed from a backend, or a small body of our own.
    #[project = ProxyBodyProj]
    pub enum ProxyBody {
        Backend { #[pin] body: Incoming, guard: Option<ResponseGuard> },
        Full { data: Option<Bytes> },
    }
}

impl ProxyBody {
    pub fn full(data: impl Into<Bytes>) -> ProxyBody {
        ProxyBody::Full { data: Some(data.into()) }
    }

    pub fn empty() -> ProxyBody {
        ProxyBody::Full { data: None }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.project() {
            ProxyBodyProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            ProxyBodyProj::Backend { mut body, guard } => {
                let polled = body.as_mut().poll_frame(cx);
                match &polled {
                    Poll::Ready(None) => {
                        if let Some(g) = guard.take() {
                            g.complete();
                        }
                    }
                    Poll::Ready(Some(Err(_))) => drop(guard.take()),
                    Poll::Ready(Some(Ok(frame))) => {
                        if let (Some(data), Some(g)) = (frame.data_ref(), guard.as_ref()) {
                            g.metrics.bytes_out.inc_by(data.len() as u64);
                        }
                        // With a known length hyper stops polling after the last frame: the
                        // exchange is complete now, and the connection can go back to the pool.
                        if body.is_end_stream()
                            && let Some(g) = guard.take()
                        {
                            g.complete();
                        }
                    }
                    Poll::Pending => {}
                }
                polled
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Full { data } => data.is_none(),
            ProxyBody::Backend { body, .. } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Full { data } => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
            ProxyBody::Backend { body, .. } => body.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }

    fn client(peer: &str, tls: bool) -> ClientHeaders {
        ClientHeaders::new(ConnInfo { peer: peer.parse().expect("peer"), tls })
    }

    #[test]
    fn forwarded_headers_append() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("1.2.3.4"));
        prepare_headers(&mut h, &client("10.0.0.9:5000", true), Some("lb.test"), false);
        assert_eq!(h["x-forwarded-for"], "1.2.3.4, 10.0.0.9");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-real-ip"], "10.0.0.9");
        assert_eq!(h["forwarded"], "for=10.0.0.9;proto=https;host=\"lb.test\"");
    }

    #[test]
    fn client_sent_real_ip_and_forwarded_are_replaced() {
        let mut h = HeaderMap::new();
        h.append("x-real-ip", HeaderValue::from_static("6.6.6.6"));
        h.append("x-real-ip", HeaderValue::from_static("7.7.7.7"));
        h.append("forwarded", HeaderValue::from_static("for=6.6.6.6;proto=https"));
        h.append("forwarded", HeaderValue::from_static("for=7.7.7.7"));
        prepare_headers(&mut h, &client("[2001:db8::5]:443", false), Some("lb.test:8443"), false);
        let all =
            |name: &str| h.get_all(name).iter().map(|v| v.to_str().expect("ascii").to_string()).collect::<Vec<_>>();
        assert_eq!(all("x-real-ip"), ["2001:db8::5"]);
        assert_eq!(all("forwarded"), ["for=\"[2001:db8::5]\";proto=http;host=\"lb.test:8443\""]);
        assert_eq!(all("x-forwarded-for"), ["2001:db8::5"]);
        // A host that cannot be quoted is left out rather than passed on broken.
        let mut h = HeaderMap::new();
        prepare_headers(&mut h, &client("10.0.0.9:5000", false), Some("a\"b"), false);
        assert_eq!(h["forwarded"], "for=10.0.0.9;proto=http");
    }

    #[test]
    fn ports_are_stripped_from_hosts() {
        assert_eq!(strip_port("example.com:8080"), "example.com");
        assert_eq!(strip_port("example.com"), "example.com");
        assert_eq!(strip_port("[::1]:80"), "[::1]");
        assert_eq!(strip_port("[::1]"), "[::1]");
    }

    #[test]
    fn smuggling_shapes_are_refused() {
        let mut h = HeaderMap::new();
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        assert_eq!(reject_smuggling(&h), None);
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("5"));
        assert!(reject_smuggling(&h).is_some());
        let mut h = HeaderMap::new();
        h.append(header::CONTENT_LENGTH, HeaderValue::from_static("5"));
        h.append(header::CONTENT_LENGTH, HeaderValue::from_static("6"));
        assert!(reject_smuggling(&h).is_some());
        let mut h = HeaderMap::new();
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked, gzip"));
        assert!(reject_smuggling(&h).is_some());
    }
}
