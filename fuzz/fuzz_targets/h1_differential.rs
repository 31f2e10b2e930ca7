//! Differential fuzzing of shoal's HTTP/1 engine against three other readings of the same
//! bytes: plain httparse with a straightforward RFC 9112 reading of the framing (written here),
//! the older request-stream scanner `h1scan::Scanner`, and hyper 1.x's HTTP/1 server.
//!
//! Input: the bytes a client sends on one connection (the last byte also sizes hyper's reads).
//! The engine reads requests one after another while it keeps the connection; for each it
//! accepts, whole:
//! - httparse accepts the head with the same length, method and target (an absolute-form
//!   target reduced to its path and query), and the RFC reading gives the same framing and,
//!   for a chunked body, the same payload and end;
//! - hyper, when it accepts that request too (its service saw it and read its whole body), saw
//!   the same method and a body of the same length;
//! - the scanner, fed the requests the engine accepted, flags nothing.
//!
//! The engine is stricter than the others in places (one Content-Length, a single `chunked`,
//! no bare LF, Host rules…): there it must refuse, never accept with another framing.
#![no_main]

use std::convert::Infallible;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

use hyper::body::{Body as _, Incoming};
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper::{Request, Response};
use libfuzzer_sys::fuzz_target;
use shoal_node::dataplane::h1::body::{Framer, drain};
use shoal_node::dataplane::h1::head::{Framing, HeadLimits, parse_request};
use shoal_node::dataplane::h1scan::Scanner;

/// shoal's defaults (`dataplane::Limits`).
const LIMITS: HeadLimits = HeadLimits { max_bytes: 8192, max_headers: 100 };
const MAX_REQUESTS: usize = 8;

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// One request as the engine read it.
struct Accepted {
    start: usize,
    head_len: usize,
    method: String,
    framing: Framing,
    payload: Vec<u8>,
    used: usize,
}

/// How the engine's reading of the connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    Refused,
    /// The input ended inside a request: every byte left belongs to it.
    Incomplete,
    /// The engine stops reading requests (close, upgrade, or enough of them).
    Stopped,
}

/// The requests the engine accepts whole, in order, and how the reading ended.
fn engine(data: &[u8]) -> (Vec<Accepted>, End) {
    let mut out = Vec::new();
    let mut at = 0;
    while out.len() < MAX_REQUESTS {
        let rest = &data[at..];
        let h = match parse_request(rest, LIMITS) {
            Ok(Some(h)) => h,
            Ok(None) => return (out, if rest.is_empty() { End::Stopped } else { End::Incomplete }),
            Err(_) => return (out, End::Refused),
        };
        let mut framer = Framer::new(h.framing);
        let mut payload = Vec::new();
        let Ok(used) = drain(&mut framer, &rest[h.len..], |d| payload.extend_from_slice(d)) else {
            return (out, End::Refused);
        };
        if !framer.done() {
            return (out, End::Incomplete);
        }
        let method = h.method_span.str(rest).to_string();
        out.push(Accepted { start: at, head_len: h.len, method, framing: h.framing, payload, used });
        check_httparse(rest, out.last().expect("pushed"), h.target.of(rest));
        at += h.len + used;
        if !h.keep_alive || h.websocket {
            break;
        }
    }
    (out, End::Stopped)
}

/// Plain httparse on the same bytes, and RFC 9112's reading of the framing it finds.
fn check_httparse(src: &[u8], a: &Accepted, target: &[u8]) {
    let ctx = || format!("request {:?}", lossy(&src[..(a.head_len + a.used).min(src.len())]));
    let mut slots = [httparse::EMPTY_HEADER; 128];
    let mut req = httparse::Request::new(&mut slots);
    match req.parse(src) {
        Ok(httparse::Status::Complete(n)) => assert_eq!(n, a.head_len, "head length: {}", ctx()),
        other => panic!("the engine accepted what httparse reads as {other:?}: {}", ctx()),
    }
    assert_eq!(req.method, Some(a.method.as_str()), "{}", ctx());
    let raw = req.path.expect("path").as_bytes();
    if raw.starts_with(b"/") || raw == b"*" {
        assert_eq!(raw, target, "target: {}", ctx());
    } else {
        // Absolute form: the engine keeps the path and query after the authority.
        let authority = raw.strip_suffix(target).and_then(strip_scheme);
        assert!(
            authority.is_some_and(|a| !a.is_empty() && !a.contains(&b'/') && !a.contains(&b'?')),
            "target {:?}: {}",
            lossy(target),
            ctx()
        );
    }
    let rfc = rfc_framing(req.headers, req.version.expect("version"));
    let same = match (rfc, a.framing) {
        (Some(RfcFraming::Chunked), Framing::Chunked) => true,
        (Some(RfcFraming::Length(n)), Framing::Length(m)) => n == m,
        (Some(RfcFraming::Length(0)), Framing::Empty) => true,
        _ => false,
    };
    assert!(same, "framing {:?} where RFC 9112 reads {rfc:?}: {}", a.framing, ctx());
    let body = &src[a.head_len..];
    match rfc {
        Some(RfcFraming::Chunked) => match rfc_chunked(body) {
            Chunked::Complete { payload, used } => {
                assert_eq!((lossy(&payload), used), (lossy(&a.payload), a.used), "chunked body: {}", ctx())
            }
            other => panic!("the engine read a chunked body that RFC 9112 reads as {other:?}: {}", ctx()),
        },
        _ => assert_eq!(a.payload.as_slice(), &body[..a.used], "{}", ctx()),
    }
}

fn strip_scheme(uri: &[u8]) -> Option<&[u8]> {
    ["http://", "https://"].iter().find_map(|s| {
        let head = uri.get(..s.len())?;
        head.eq_ignore_ascii_case(s.as_bytes()).then(|| &uri[s.len()..])
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RfcFraming {
    Chunked,
    Length(u64),
}

/// RFC 9112 §6.1–6.3 for a request; `None` where the request must be refused. A list of
/// equal Content-Length values counts as one (§6.3 item 5 allows it).
fn rfc_framing(headers: &[httparse::Header<'_>], minor: u8) -> Option<RfcFraming> {
    let values = |name: &str| {
        headers.iter().filter(move |h| h.name.eq_ignore_ascii_case(name)).map(|h| h.value).collect::<Vec<_>>()
    };
    let te = values("transfer-encoding");
    if !te.is_empty() {
        let codings: Vec<&[u8]> = te.iter().flat_map(|v| v.split(|&b| b == b',')).map(<[u8]>::trim_ascii).collect();
        let last = codings.last()?;
        // §6.1: a request whose final coding is not chunked cannot be framed; HTTP/1.0 has no
        // transfer codings (the server "ought to" treat it as faulty).
        return (minor == 1 && last.eq_ignore_ascii_case(b"chunked")).then_some(RfcFraming::Chunked);
    }
    let mut lengths = values("content-length").into_iter().flat_map(|v| v.split(|&b| b == b','));
    let Some(first) = lengths.next() else { return Some(RfcFraming::Length(0)) };
    let n = decimal(first)?;
    lengths.all(|v| decimal(v) == Some(n)).then_some(RfcFraming::Length(n))
}

/// `1*DIGIT` (surrounding whitespace allowed), fitting in a u64.
fn decimal(v: &[u8]) -> Option<u64> {
    let v = v.trim_ascii();
    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

#[derive(Debug)]
enum Chunked {
    Complete { payload: Vec<u8>, used: usize },
    Incomplete,
    Invalid(#[allow(dead_code, reason = "read in failure messages, through Debug")] &'static str),
}

/// RFC 9112 §7.1, read plainly from a whole buffer:
///   chunk = chunk-size [ chunk-ext ] CRLF chunk-data CRLF;  last-chunk = 1*"0" [ chunk-ext ] CRLF
///   chunk-ext = *( BWS ";" BWS ext-name [ BWS "=" BWS ext-val ] );  trailer-section CRLF.
/// Whitespace after the size with no `;` is accepted (as most servers do), the contents of
/// extensions and trailer lines are not checked (both are dropped; only where they end matters).
fn rfc_chunked(body: &[u8]) -> Chunked {
    let mut payload = Vec::new();
    let mut at = 0;
    loop {
        let Some(line_len) = find_crlf(&body[at..]) else { return Chunked::Incomplete };
        let line = &body[at..at + line_len];
        let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
        if digits == 0 {
            return Chunked::Invalid("no chunk size");
        }
        let after = &line[digits..];
        let ws = after.iter().take_while(|b| matches!(b, b' ' | b'\t')).count();
        if !(after[ws..].is_empty() || after[ws] == b';') {
            return Chunked::Invalid("chunk size followed by something other than an extension");
        }
        let Ok(size) = u64::from_str_radix(std::str::from_utf8(&line[..digits]).expect("hex"), 16) else {
            return Chunked::Invalid("chunk size overflows");
        };
        at += line_len + 2;
        if size == 0 {
            break;
        }
        let Some(end) = usize::try_from(size).ok().and_then(|s| at.checked_add(s)) else {
            return Chunked::Incomplete;
        };
        if body.len() < end + 2 {
            return if body.len() >= end && !b"\r\n".starts_with(&body[end..]) {
                Chunked::Invalid("chunk data not followed by CRLF")
            } else {
                Chunked::Incomplete
            };
        }
        if &body[end..end + 2] != b"\r\n" {
            return Chunked::Invalid("chunk data not followed by CRLF");
        }
        payload.extend_from_slice(&body[at..end]);
        at = end + 2;
    }
    // Trailer lines up to an empty one.
    loop {
        let Some(line_len) = find_crlf(&body[at..]) else { return Chunked::Incomplete };
        at += line_len + 2;
        if line_len == 0 {
            return Chunked::Complete { payload, used: at };
        }
    }
}

/// Length of the line before the next CRLF; a bare CR or LF inside a line is left to the caller.
fn find_crlf(b: &[u8]) -> Option<usize> {
    b.windows(2).position(|w| w == b"\r\n")
}

/// The scanner sees the requests the engine accepted, and the rest of the input when all of
/// it belongs to one more request the engine has neither refused nor finished: it must flag
/// nothing there.
fn check_scanner(data: &[u8], accepted: &[Accepted], end: End) {
    let upto = match (end, accepted.last()) {
        (End::Incomplete, _) => data.len(),
        (_, Some(last)) => last.start + last.head_len + last.used,
        (_, None) => return,
    };
    let mut s = Scanner::new(LIMITS.max_bytes);
    s.feed(&data[..upto]);
    assert_eq!(s.violation, None, "the scanner flags bytes the engine accepts ({end:?}): {:?}", lossy(&data[..upto]));
}

/// What hyper's service saw of one request; `body: None` when reading it failed.
#[derive(Debug)]
struct Seen {
    method: String,
    body: Option<u64>,
}

/// A client connection for hyper: the input in reads of `chunk` bytes, then nothing more (a
/// read that never completes: hyper would take end of stream for the client going away and
/// drop a request it is still reading); answers are dropped.
struct MemIo {
    input: Vec<u8>,
    pos: usize,
    chunk: usize,
}

impl Read for MemIo {
    fn poll_read(mut self: Pin<&mut Self>, _: &mut Context<'_>, mut buf: ReadBufCursor<'_>) -> Poll<io::Result<()>> {
        if self.pos == self.input.len() {
            return Poll::Pending;
        }
        let n = self.chunk.min(buf.remaining()).min(self.input.len() - self.pos);
        let start = self.pos;
        buf.put_slice(&self.input[start..start + n]);
        self.pos += n;
        Poll::Ready(Ok(()))
    }
}

impl Write for MemIo {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Whether a future asked to be polled again.
struct Woken(AtomicBool);

impl Wake for Woken {
    fn wake(self: Arc<Self>) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Polls `fut` until it ends or waits with nobody left to wake it: all its I/O is in memory,
/// so it is then waiting for input that will never come.
fn run_until_idle<F: Future>(fut: F) -> Option<F::Output> {
    let woken = Arc::new(Woken(AtomicBool::new(false)));
    let waker = Waker::from(woken.clone());
    let mut cx = Context::from_waker(&waker);
    let mut fut = std::pin::pin!(fut);
    for _ in 0..100_000 {
        woken.0.store(false, Ordering::SeqCst);
        if let Poll::Ready(out) = fut.as_mut().poll(&mut cx) {
            return Some(out);
        }
        if !woken.0.load(Ordering::SeqCst) {
            return None;
        }
    }
    panic!("hyper never settles");
}

/// Reads a request body to its end; its length, or `None` on an error.
async fn body_len(mut body: Incoming) -> Option<u64> {
    let mut n = 0;
    while let Some(frame) = poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
        if let Some(d) = frame.ok()?.data_ref() {
            n += d.len() as u64;
        }
    }
    Some(n)
}

/// The requests hyper's HTTP/1 server reads from `data`, in order.
fn hyper_reads(data: &[u8], chunk: usize) -> Vec<Seen> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let record = record.clone();
        async move {
            let method = req.method().to_string();
            let body = body_len(req.into_body()).await;
            record.lock().expect("seen").push(Seen { method, body });
            Ok::<_, Infallible>(Response::new(String::new()))
        }
    });
    let io = MemIo { input: data.to_vec(), pos: 0, chunk };
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.header_read_timeout(None);
    let conn = builder.serve_connection(io, service);
    // Hyper refusing the input ends the connection with an error; that is allowed.
    let _ = run_until_idle(conn);
    std::mem::take(&mut *seen.lock().expect("seen"))
}

fn check_hyper(data: &[u8], accepted: &[Accepted], chunk: usize) {
    let seen = hyper_reads(data, chunk);
    for (i, (a, s)) in accepted.iter().zip(&seen).enumerate() {
        assert_eq!(a.method, s.method, "request {i}: {:?}", lossy(data));
        let Some(len) = s.body else { break };
        assert_eq!(
            len,
            a.payload.len() as u64,
            "request {i}: hyper read a body of {len} bytes, the engine {} ({:?}): {:?}",
            a.payload.len(),
            a.framing,
            lossy(data)
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let (accepted, end) = engine(data);
    check_scanner(data, &accepted, end);
    if !accepted.is_empty() {
        let chunk = 1 + data.last().map_or(0, |b| usize::from(*b) * 17);
        check_hyper(data, &accepted, chunk);
    }
});
