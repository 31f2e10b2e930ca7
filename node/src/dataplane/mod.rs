//! The data plane: worker threads, each a single-threaded tokio runtime with its own
//! `SO_REUSEPORT` socket per listener, accepting and proxying client connections. Workers read
//! only the routing [`Table`](crate::routing::Table) snapshot and report observations through
//! a bounded channel; they never talk to Raft or gossip.

pub mod accesslog;
pub mod balancer;
pub mod h1;
pub mod h1scan;
pub mod http;
pub mod limits;
pub mod maglev;
pub mod mux;
pub mod pool;
pub mod proxy;
pub mod relay;
pub mod reqid;
mod slots;
pub mod splice;
pub mod tcp;
pub mod tls;
pub mod ws;
pub mod wsframe;

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use socket2::{Domain, Protocol as SockProto, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc};
use tokio::task::AbortHandle;

use crate::health::Reporter;
use crate::metrics::{ListenerMetrics, Metrics};
use crate::routing::SharedTable;
use crate::shutdown::{Phase, Shutdown};
use slots::{Slot, Slots};

/// Limits that protect the node from its clients. Defaults are safe for an edge proxy.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Largest request head (line plus headers) in bytes; beyond it the client gets 431.
    pub max_header_bytes: usize,
    pub max_headers: usize,
    /// A client must send its whole request head within this time (slowloris defence).
    pub header_timeout: Duration,
    /// An idle keep-alive client connection is closed after this long.
    pub keepalive_timeout: Duration,
    /// Client connections open at once per worker; further accepts wait for a slot.
    pub max_connections: usize,
    /// A TLS client must finish its handshake within this time.
    pub tls_handshake_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_header_bytes: 64 * 1024,
            max_headers: 100,
            header_timeout: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(60),
            max_connections: 50_000,
            tls_handshake_timeout: Duration::from_secs(10),
        }
    }
}

/// What every worker shares.
pub struct DpCtx {
    pub table: SharedTable,
    pub metrics: Arc<Metrics>,
    pub reporter: Reporter,
    pub limits: Limits,
    pub shutdown: Shutdown,
    /// Server certificates of the HTTPS listener.
    pub tls: Option<Arc<tls::TlsStore>>,
    /// Client configuration for `backend_tls` pools.
    pub backend_tls: Option<Arc<rustls::ClientConfig>>,
    /// When set, the plain HTTP listener answers every request with a 301 to `https://<host>`.
    pub https_redirect: Option<String>,
    /// Upgraded connections open on this node (shutdown waits for them to close).
    pub tunnels: AtomicUsize,
    /// Where a record per HTTP request and per TCP connection goes (`None`: no access log).
    pub access_log: Option<Arc<accesslog::AccessLog>>,
    /// Whether requests get an `X-Request-Id` and a `traceparent`.
    pub ids: reqid::IdSettings,
    /// The HTTP and HTTPS listeners accept only these sources, each connection starting with
    /// a PROXY protocol header (`--accept-proxy-from`); `None`: no header expected.
    pub accept_proxy_from: Option<Vec<shoal_proto::proxy::Cidr>>,
    /// Accept loops wait until this is true: a node taking over from a running one (a
    /// seamless upgrade) holds the inherited sockets until it is ready, while the old
    /// process goes on accepting from them.
    pub accepting: tokio::sync::watch::Receiver<bool>,
}

/// What a listener serves.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ListenerKind {
    /// The node's HTTP listener: pools attach by URL pattern.
    Http,
    /// The node's HTTPS listener: the same pools, behind TLS.
    Https,
    /// A TCP pool's listener, by its port.
    Tcp(u16),
}

/// A listener as requested: address (port 0 until bound) and kind.
type ListenerKey = (SocketAddr, ListenerKind);

enum WorkerCmd {
    Listen { key: ListenerKey, socket: std::net::TcpListener, metrics: ListenerMetrics },
    Close(ListenerKey),
}

/// An open listener: its bound address and a duplicate of every worker's socket, kept so a
/// seamless upgrade can hand the very sockets (and the connections queued on them) over.
struct Open {
    bound: SocketAddr,
    sockets: Vec<std::net::TcpListener>,
}

/// A listener being handed over: what it serves, as requested, and its sockets.
pub struct Exported<'a> {
    pub addr: SocketAddr,
    pub kind: ListenerKind,
    pub sockets: Vec<std::os::fd::BorrowedFd<'a>>,
}

/// Handle on the worker threads.
pub struct DataPlane {
    workers: Vec<(mpsc::UnboundedSender<WorkerCmd>, JoinHandle<()>)>,
    ctx: Arc<DpCtx>,
    listening: Mutex<HashMap<ListenerKey, Open>>,
    /// Sockets received from the process this one took over, used instead of new ones when
    /// the same listener is wanted (dropped, and so closed, after the first `set_listeners`).
    inherited: Mutex<Option<HashMap<ListenerKey, Vec<std::net::TcpListener>>>>,
    /// Listeners that could not be opened, with the reason (shown by the admin API).
    pub errors: Mutex<BTreeMap<String, String>>,
    /// Every worker's connection slots (a drain waits until none is open).
    slots: Vec<Arc<Slots>>,
    /// Woken when a worker's last connection closes while a drain waits.
    drained: Arc<Notify>,
}

impl DataPlane {
    /// Starts `threads` workers.
    pub fn start(threads: usize, ctx: DpCtx) -> io::Result<DataPlane> {
        let ctx = Arc::new(ctx);
        let drained = Arc::new(Notify::new());
        let (mut workers, mut slots) = (Vec::new(), Vec::new());
        for id in 0..threads.max(1) {
            let (tx, rx) = mpsc::unbounded_channel();
            let wslots = Arc::new(Slots::new(ctx.limits.max_connections, drained.clone()));
            let (wctx, ws) = (ctx.clone(), wslots.clone());
            let thread = std::thread::Builder::new()
                .name(format!("shoal-worker-{id}"))
                .spawn(move || worker_main(id, rx, wctx, ws))?;
            workers.push((tx, thread));
            slots.push(wslots);
        }
        Ok(DataPlane {
            workers,
            ctx,
            listening: Mutex::default(),
            inherited: Mutex::default(),
            errors: Mutex::default(),
            slots,
            drained,
        })
    }

    /// Sockets taken over from a running process, to be used by `set_listeners`.
    pub fn inherit(&self, sockets: HashMap<ListenerKey, Vec<std::net::TcpListener>>) {
        *self.inherited.lock().unwrap_or_else(|e| e.into_inner()) = Some(sockets);
    }

    /// Calls `f` with every open listener and its sockets (for a handover).
    pub fn export<R>(&self, f: impl FnOnce(Vec<Exported<'_>>) -> R) -> R {
        use std::os::fd::AsFd;
        let open = self.listening.lock().unwrap_or_else(|e| e.into_inner());
        let listeners = open
            .iter()
            .map(|((addr, kind), o)| Exported {
                addr: *addr,
                kind: kind.clone(),
                sockets: o.sockets.iter().map(|s| s.as_fd()).collect(),
            })
            .collect();
        f(listeners)
    }

    pub fn workers(&self) -> usize {
        self.workers.len()
    }

    /// Upgraded connections open on this node.
    pub fn tunnels(&self) -> usize {
        self.ctx.tunnels.load(Ordering::Relaxed)
    }

    /// Client connections open on this node (upgraded ones included).
    pub fn open_connections(&self) -> usize {
        slots::open(&self.slots)
    }

    /// Resolves once no client connection is open, woken by the last one's close. Tunnels
    /// run in their client connection's task, so none is left either.
    pub async fn drained(&self) {
        slots::drained(&self.slots, &self.drained).await
    }

    /// Opens, keeps or closes listeners so exactly `wanted` are served. Returns the bound
    /// addresses of the listeners opened now (port 0 resolves to a real port).
    pub fn set_listeners(&self, wanted: &[(SocketAddr, ListenerKind)]) -> Vec<(ListenerKind, SocketAddr)> {
        let mut open = self.listening.lock().unwrap_or_else(|e| e.into_inner());
        let mut inherited = self.inherited.lock().unwrap_or_else(|e| e.into_inner()).take().unwrap_or_default();
        let closing: Vec<ListenerKey> = open.keys().filter(|k| !wanted.contains(k)).cloned().collect();
        for key in closing {
            let bound = open.remove(&key).map(|o| o.bound);
            self.broadcast(|| WorkerCmd::Close(key.clone()));
            tracing::info!(addr = ?bound, "listener closed; established connections continue");
        }
        let mut opened = Vec::new();
        for (addr, kind) in wanted {
            if open.contains_key(&(*addr, kind.clone())) {
                continue;
            }
            // An IPv6 listener beside an IPv4 one on the same port takes IPv6 only (as nginx's
            // `listen [::]:80` does); alone, it keeps the host's default (usually dual-stack).
            let v6_only = addr.is_ipv6()
                && wanted.iter().any(|(a, k)| {
                    let port =
                        if a.port() == 0 { open.get(&(*a, k.clone())).map(|o| o.bound.port()) } else { Some(a.port()) };
                    a.is_ipv4() && k == kind && port == Some(addr.port())
                });
            let taken = inherited.remove(&(*addr, kind.clone()));
            match self.bind_all(*addr, kind, v6_only, taken) {
                Ok(o) => {
                    let bound = o.bound;
                    open.insert((*addr, kind.clone()), o);
                    self.errors.lock().unwrap_or_else(|e| e.into_inner()).remove(&addr.to_string());
                    opened.push((kind.clone(), bound));
                }
                Err(e) => {
                    tracing::error!(%addr, ?kind, error = %e, "cannot open listener");
                    self.errors.lock().unwrap_or_else(|e| e.into_inner()).insert(addr.to_string(), e.to_string());
                }
            }
        }
        for ((addr, kind), sockets) in inherited {
            // Connections queued on these are reset when they close: log what was let go.
            tracing::warn!(%addr, ?kind, sockets = sockets.len(), "an inherited listener is no longer configured; closed");
        }
        opened
    }

    /// Binds one `SO_REUSEPORT` socket per worker. A plain bind first makes sure nobody else
    /// (another process, or another node on this IP) already holds the address. Sockets
    /// inherited from the previous process come first; each worker accepts from at least
    /// one socket and every inherited socket has a worker (none may be left unserved: the
    /// kernel keeps queueing connections on it).
    fn bind_all(
        &self,
        addr: SocketAddr,
        kind: &ListenerKind,
        v6_only: bool,
        inherited: Option<Vec<std::net::TcpListener>>,
    ) -> io::Result<Open> {
        let mut sockets = inherited.unwrap_or_default();
        let bound = match sockets.first() {
            Some(s) => s.local_addr()?,
            None => {
                let probe = listener(addr, false, v6_only)?;
                let bound = probe.local_addr()?;
                drop(probe);
                bound
            }
        };
        let taken = sockets.len();
        while sockets.len() < self.workers.len() {
            sockets.push(listener(bound, true, v6_only)?);
        }
        let name = listener_name(kind, bound);
        let metrics = self.ctx.metrics.listener(&name);
        let copies = sockets.iter().map(|s| s.try_clone()).collect::<io::Result<Vec<_>>>()?;
        for (i, socket) in sockets.into_iter().enumerate() {
            let (tx, _) = &self.workers[i % self.workers.len()];
            let _ = tx.send(WorkerCmd::Listen { key: (addr, kind.clone()), socket, metrics: metrics.clone() });
        }
        tracing::info!(addr = %bound, listener = %name, inherited = taken, "listening");
        Ok(Open { bound, sockets: copies })
    }

    fn broadcast(&self, cmd: impl Fn() -> WorkerCmd) {
        for (tx, _) in &self.workers {
            let _ = tx.send(cmd());
        }
    }

    /// Waits for the workers to finish (they stop on the `Stopped` phase).
    pub fn join(self) {
        let log = self.ctx.access_log.clone();
        drop(self.ctx);
        for (tx, thread) in self.workers {
            drop(tx);
            let _ = thread.join();
        }
        // Every record is queued once the workers are gone: write them out.
        if let Some(log) = log {
            log.close();
        }
    }
}

/// The `listener` label of a listener's metrics.
pub fn listener_name(kind: &ListenerKind, addr: SocketAddr) -> String {
    match kind {
        ListenerKind::Http => format!("http:{}", addr.port()),
        ListenerKind::Https => format!("https:{}", addr.port()),
        ListenerKind::Tcp(port) => format!("tcp:{port}"),
    }
}

/// A listening socket; `reuse_port` for the per-worker sockets, `v6_only` for an IPv6
/// listener that leaves IPv4 to its sibling.
fn listener(addr: SocketAddr, reuse_port: bool, v6_only: bool) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(SockProto::TCP))?;
    socket.set_reuse_address(true)?;
    #[cfg(unix)]
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    if v6_only {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

/// An IPv6-only listening socket on `addr` (for checking that the host has IPv6).
pub fn v6_only_listener(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    listener(addr, false, true)
}

/// Whether a bind failed because the host has no IPv6 (no stack, or no such address).
pub fn no_ipv6(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EAFNOSUPPORT | libc::EADDRNOTAVAIL))
}

/// Connects to a backend with a timeout, Nagle off.
pub async fn connect_backend(addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timeout"))??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// The backends already tried for one client request or connection (at most `N`), so a
/// retry picks another; kept inline because it lives on every request's path.
struct Tried<const N: usize> {
    addrs: [SocketAddr; N],
    len: usize,
}

impl<const N: usize> Default for Tried<N> {
    fn default() -> Self {
        Tried { addrs: [SocketAddr::from(([0, 0, 0, 0], 0)); N], len: 0 }
    }
}

impl<const N: usize> Tried<N> {
    fn push(&mut self, a: SocketAddr) {
        if self.len < N {
            self.addrs[self.len] = a;
            self.len += 1;
        }
    }

    fn as_slice(&self) -> &[SocketAddr] {
        &self.addrs[..self.len]
    }
}

fn worker_main(id: usize, rx: mpsc::UnboundedReceiver<WorkerCmd>, ctx: Arc<DpCtx>, slots: Arc<Slots>) {
    pool::set_worker(id);
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(worker = id, error = %e, "cannot start worker runtime");
            return;
        }
    };
    rt.block_on(run_worker(rx, ctx, slots));
}

async fn run_worker(mut rx: mpsc::UnboundedReceiver<WorkerCmd>, ctx: Arc<DpCtx>, slots: Arc<Slots>) {
    let mut accepting: HashMap<ListenerKey, Vec<AbortHandle>> = HashMap::new();
    let mut shutdown = ctx.shutdown.clone();
    loop {
        tokio::select! {
            cmd = rx.recv() => match cmd {
                Some(WorkerCmd::Listen { key, socket, metrics }) => {
                    match TcpListener::from_std(socket) {
                        Ok(listener) => {
                            let task = tokio::spawn(accept_loop(listener, key.1.clone(), ctx.clone(), slots.clone(), metrics));
                            accepting.entry(key).or_default().push(task.abort_handle());
                        }
                        Err(e) => tracing::error!(addr = %key.0, error = %e, "worker cannot adopt listener"),
                    }
                }
                Some(WorkerCmd::Close(key)) => {
                    accepting.remove(&key).into_iter().flatten().for_each(|t| t.abort());
                }
                None => break,
            },
            _ = shutdown.wait() => break,
        }
    }
    // Stop accepting; connections in flight finish until the node moves to `Stopped`.
    accepting.values().flatten().for_each(AbortHandle::abort);
    let max = ctx.limits.max_connections as u32;
    tokio::select! {
        _ = slots.permits.acquire_many(max) => {}
        _ = shutdown.wait_for(Phase::Stopped) => {}
    }
    // Upgraded connections end with close frames once `Stopped`; let them write those.
    shutdown.wait_for(Phase::Stopped).await;
    for _ in 0..60 {
        if ctx.tunnels.load(Ordering::Relaxed) == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn accept_loop(
    listener: TcpListener,
    kind: ListenerKind,
    ctx: Arc<DpCtx>,
    slots: Arc<Slots>,
    lm: ListenerMetrics,
) {
    let mut gate = ctx.accepting.clone();
    let _ = gate.wait_for(|open| *open).await;
    if !*gate.borrow() {
        return;
    }
    loop {
        let Ok(permit) = slots.permits.acquire().await else { return };
        let (stream, peer) = match listener.accept().await {
            Ok(pair) => pair,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        // Where the client connected: a PROXY header sent to a backend names it.
        let local = stream.local_addr().unwrap_or(peer);
        let conn = http::ConnInfo { peer, local, tls: false };
        lm.accepted.inc();
        lm.active.inc();
        let slot = Slot::open(&slots, permit);
        let (ctx, lm2) = (ctx.clone(), lm.clone());
        // One spawn per kind: a task is sized for its largest state, so a plain HTTP
        // connection must not carry room for a TLS handshake or an L4 relay.
        match kind {
            ListenerKind::Http if ctx.accept_proxy_from.is_none() => {
                spawn_conn(http::serve(stream, conn, ctx, lm2), lm.clone(), slot);
            }
            ListenerKind::Http => spawn_conn(serve_proxied(stream, conn, ctx, lm2), lm.clone(), slot),
            ListenerKind::Https => {
                spawn_conn(async move { serve_tls(stream, conn, ctx, &lm2).await }, lm.clone(), slot)
            }
            ListenerKind::Tcp(port) => spawn_conn(tcp::serve(stream, conn, port, ctx, lm2), lm.clone(), slot),
        }
    }
}

/// Runs one client connection; its slot is freed when it ends.
fn spawn_conn(conn: impl std::future::Future<Output = ()> + Send + 'static, lm: ListenerMetrics, slot: Slot) {
    tokio::spawn(async move {
        conn.await;
        lm.active.dec();
        drop(slot);
    });
}

/// Plain HTTP behind a PROXY protocol header.
async fn serve_proxied(mut stream: TcpStream, conn: http::ConnInfo, ctx: Arc<DpCtx>, lm: ListenerMetrics) {
    let trusted = ctx.accept_proxy_from.as_deref();
    if let Some(conn) = proxy::accept(&mut stream, conn, trusted, &ctx.metrics, &lm.name).await {
        http::serve(stream, conn, ctx, lm).await;
    }
}

/// Completes the TLS handshake (bounded) and serves HTTP over it. A PROXY header, when the
/// listener takes one, comes before the TLS handshake.
async fn serve_tls(mut stream: TcpStream, conn: http::ConnInfo, ctx: Arc<DpCtx>, lm: &ListenerMetrics) {
    let Some(store) = ctx.tls.as_ref() else { return };
    let trusted = ctx.accept_proxy_from.as_deref();
    let Some(conn) = proxy::accept(&mut stream, conn, trusted, &ctx.metrics, &lm.name).await else { return };
    let peer = conn.peer;
    let acceptor = tokio_rustls::TlsAcceptor::from(store.current());
    match tokio::time::timeout(ctx.limits.tls_handshake_timeout, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => http::serve(tls, http::ConnInfo { tls: true, ..conn }, ctx, lm.clone()).await,
        Ok(Err(e)) => {
            lm.failed.inc();
            ctx.metrics.rejected_inputs.with_label_values(&["tls_handshake"]).inc();
            tracing::debug!(client = %peer, error = %e, "TLS handshake failed");
        }
        Err(_) => {
            lm.failed.inc();
            tracing::debug!(client = %peer, "TLS handshake timed out");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn future_size<A, Fut, F: FnOnce(A) -> Fut>(_: &F) -> usize {
        std::mem::size_of::<Fut>()
    }

    /// A task is as large as its largest state for its whole life: an idle plain HTTP
    /// connection must not carry room for a request exchange (boxed) or a TLS handshake.
    #[test]
    fn an_idle_connection_task_stays_small() {
        type Args = (TcpStream, Arc<DpCtx>, ListenerMetrics);
        let peer: SocketAddr = "192.0.2.1:1".parse().expect("addr");
        let conn = http::ConnInfo { peer, local: peer, tls: false };
        let plain = |(s, ctx, lm): Args| http::serve(s, conn, ctx, lm);
        let l4 = |(s, ctx, lm): Args| tcp::serve(s, conn, 1, ctx, lm);
        assert!(future_size(&plain) <= 1280, "HTTP connection future: {} bytes", future_size(&plain));
        assert!(future_size(&l4) <= 4096, "L4 connection future: {} bytes", future_size(&l4));
    }

    #[test]
    fn missing_ipv6_is_told_apart_from_other_bind_errors() {
        assert!(no_ipv6(&io::Error::from_raw_os_error(libc::EAFNOSUPPORT)));
        assert!(no_ipv6(&io::Error::from_raw_os_error(libc::EADDRNOTAVAIL)));
        assert!(!no_ipv6(&io::Error::from_raw_os_error(libc::EADDRINUSE)));
        assert!(!no_ipv6(&io::Error::from_raw_os_error(libc::EACCES)));
    }

    #[test]
    fn an_ipv6_sibling_shares_the_port_of_an_ipv4_listener() {
        let v4 = listener(SocketAddr::from(([0, 0, 0, 0], 0)), true, false).expect("IPv4 listener");
        let port = v4.local_addr().expect("addr").port();
        let any6 = SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port));
        // The probe `bind_all` makes first: no reuse-port, so a dual-stack socket would clash.
        match listener(any6, false, true) {
            Ok(v6) => assert_eq!(v6.local_addr().expect("addr").port(), port),
            Err(e) => assert!(no_ipv6(&e), "only a host without IPv6 may refuse: {e}"),
        }
    }
}
