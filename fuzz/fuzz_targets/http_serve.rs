//! The whole HTTP/1 request path of the proxy, end to end: `dataplane::http::serve` on an
//! in-memory connection (the engine's head parser and framing rules, the mux,
//! redirects, pinning, header rewriting, the attempt to reach a backend and the error answers).
//!
//! Input: the raw bytes a client sends on one connection; they arrive in reads whose size the
//! last input byte chooses, then the client half-closes. Backends are a reserved local port
//! that refuses connections (bound, never listening), so no request leaves the machine and none
//! waits on a timeout. Answers must be well-formed HTTP/1.x responses, never a 500 or a 101.
#![no_main]

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use shoal_node::dataplane::h1::io::Transport;
use shoal_node::dataplane::http::{ConnInfo, serve};
use shoal_node::dataplane::{DpCtx, Limits};
use shoal_node::health::{HealthView, Reporter};
use shoal_node::metrics::{ListenerMetrics, Metrics};
use shoal_node::reconcile::{self, NodeCtx};
use shoal_node::routing::Table;
use shoal_node::shutdown::{self, Trigger};
use shoal_proto::{BackendSpec, CheckKind, Command, HealthSpec, PoolSpec, State, apply};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Largest head the proxy accepts here, small so 431 answers are reachable with short inputs.
const MAX_HEAD: usize = 1024;

struct Env {
    rt: tokio::runtime::Runtime,
    ctx: Arc<DpCtx>,
    lm: ListenerMetrics,
    _trigger: Trigger,
    _refuser: socket2::Socket,
}

/// A pool spec that needs no health checks (every backend counts as healthy).
fn pool(pattern: &str, pinning: bool) -> PoolSpec {
    PoolSpec {
        pattern: Some(pattern.into()),
        pinning,
        health: HealthSpec { check: Some(CheckKind::None), ..HealthSpec::default() },
        connect_timeout_ms: 200,
        response_timeout_ms: 200,
        ..PoolSpec::default()
    }
}

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        // A port nobody can listen on while we hold it: connections to it are refused at once.
        let refuser = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
        refuser.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into()).expect("bind");
        let backend = refuser.local_addr().expect("addr").as_socket().expect("inet");
        let put = |state: &mut State, name: &str, spec: PoolSpec| {
            apply(state, &Command::PutPool { name: name.into(), spec }).expect("pool");
        };
        let mut state = State::default();
        put(&mut state, "root", pool("/", false)); // no backends: 502 without any I/O
        put(&mut state, "api", pool("/api/", false));
        put(&mut state, "img", pool("img.example.com/", false));
        put(&mut state, "gw", pool("/gw/", true));
        put(&mut state, "exact", pool("/exact", false));
        for (p, slot) in [("api", None), ("img", None), ("gw", Some(1)), ("exact", None)] {
            let spec = BackendSpec { slot, url_path: "/base".into(), ..BackendSpec::default() };
            apply(&mut state, &Command::PutBackend { pool: p.into(), addr: backend, spec }).expect("backend");
        }
        let metrics = Arc::new(Metrics::new("fuzz"));
        let nctx = NodeCtx { workers: 1, zone: String::new() };
        let table = reconcile::build(&state, &HealthView::default(), &nctx, &Table::default(), &metrics);
        assert_eq!(table.pools.len(), 5);
        let (trigger, shutdown) = shutdown::channel();
        let limits = Limits { max_header_bytes: MAX_HEAD, header_timeout: Duration::from_secs(5), ..Limits::default() };
        let ctx = Arc::new(DpCtx {
            table: Arc::new(arc_swap::ArcSwap::from_pointee(table)),
            metrics: metrics.clone(),
            reporter: Reporter::detached(),
            limits,
            shutdown,
            accepting: tokio::sync::watch::channel(true).1,
            tls: None,
            backend_tls: None,
            https_redirect: None,
            tunnels: AtomicUsize::new(0),
            access_log: None,
            ids: shoal_node::dataplane::reqid::IdSettings::default(),
            accept_proxy_from: None,
        });
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        Env { rt, ctx, lm: metrics.listener("fuzz"), _trigger: trigger, _refuser: refuser }
    })
}

/// A client connection: the input in reads of `chunk` bytes, then end of stream.
struct FuzzIo {
    input: Vec<u8>,
    pos: usize,
    chunk: usize,
    out: Arc<std::sync::Mutex<Vec<u8>>>,
}

impl AsyncRead for FuzzIo {
    fn poll_read(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let n = self.chunk.min(buf.remaining()).min(self.input.len() - self.pos);
        let start = self.pos;
        buf.put_slice(&self.input[start..start + n]);
        self.pos += n;
        Poll::Ready(Ok(()))
    }
}

/// No readiness to report: the engine waits inside the read.
impl Transport for FuzzIo {}

impl AsyncWrite for FuzzIo {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let mut out = self.out.lock().expect("out");
        if out.len() < 1 << 20 {
            out.extend_from_slice(buf);
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// The first answer must parse as an HTTP/1.x response; no answer may be a 500 or a 101.
/// (Later answers are only searched for: HEAD responses announce a length but carry no body,
/// so splitting a pipelined stream needs the requests; status lines cannot occur in bodies,
/// which only echo a path, and paths hold no spaces.)
fn check_output(out: &[u8], input: &[u8]) {
    let shown = || format!("output {:?}\nto input {:?}", String::from_utf8_lossy(out), String::from_utf8_lossy(input));
    if !out.is_empty() {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        match resp.parse(out) {
            Ok(httparse::Status::Complete(_)) => {}
            other => panic!("malformed response {other:?}: {}", shown()),
        }
    }
    let has = |needle: &[u8]| out.windows(needle.len()).any(|w| w == needle);
    for bad in [&b"HTTP/1.1 500 "[..], b"HTTP/1.0 500 ", b" 101 Switching"] {
        assert!(!has(bad), "{:?} in {}", String::from_utf8_lossy(bad), shown());
    }
}

fuzz_target!(|data: &[u8]| {
    let env = env();
    let chunk = 1 + data.last().map_or(0, |b| usize::from(*b) * 17);
    let out = Arc::new(std::sync::Mutex::new(Vec::new()));
    let io = FuzzIo { input: data.to_vec(), pos: 0, chunk, out: out.clone() };
    let peer = SocketAddr::from(([192, 0, 2, 1], 50000));
    let conn = ConnInfo { peer, local: SocketAddr::from(([192, 0, 2, 2], 80)), tls: false };
    let (ctx, lm) = (env.ctx.clone(), env.lm.clone());
    env.rt.block_on(async move {
        tokio::time::timeout(Duration::from_secs(20), serve(io, conn, ctx, lm)).await.expect("serve hung");
    });
    let out = out.lock().expect("out");
    check_output(&out, data);
});
