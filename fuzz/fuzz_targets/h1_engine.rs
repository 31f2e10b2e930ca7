//! shoal's own HTTP/1 engine (`dataplane::h1`) on raw client bytes: the head parser, the body
//! framer and the head the proxy writes to a backend.
//!
//! Input: the bytes a client sends on one connection; the last byte also picks split points,
//! the backend path prefix, the client address and the chunk sizes used to re-encode a body.
//! Requests are read one after another (pipelining) while the engine keeps the connection.
//!
//! Properties:
//! - `head::parse_request` (small and default limits) never panics, and its verdict does not
//!   depend on how much of the stream has arrived: a prefix that ends before the head does is
//!   `Ok(None)` (or refused when its first bytes cannot start a request, and then the whole
//!   input is refused too; or `HeadTooLarge`/`UriTooLong` once past the limit, the whole
//!   input's verdict too), any longer prefix gives exactly the whole input's result;
//!   `head_end` resumed from where a previous read stopped finds the same end.
//! - An accepted head has `len` = the head's end ≤ input length and ≤ the limit, every span
//!   inside the head, and framing, Host and WebSocket verdicts that agree with its fields.
//! - `body::Framer` for the head's framing gives the same payload, bytes used and done/error
//!   verdict fed in one piece, byte by byte and split at a chosen point, and for any prefix
//!   that covers the bytes it used; a chunked payload re-encoded with `emit::chunk_line` and
//!   `LAST_CHUNK` decodes back to itself.
//! - `emit::request_head` writes a head that httparse reads as one complete request with the
//!   same method and the rewritten target, exactly one Host, no hop-by-hop field (only the
//!   engine's own `Transfer-Encoding: chunked` and WebSocket `Connection`/`Upgrade`), the
//!   forwarded fields in order and the identity lines shoal writes.
#![no_main]

use std::net::IpAddr;

use libfuzzer_sys::fuzz_target;
use shoal_node::dataplane::h1::body::{Framer, drain};
use shoal_node::dataplane::h1::buf::Buf;
use shoal_node::dataplane::h1::emit::{self, ClientId, LAST_CHUNK, Target, chunk_line};
use shoal_node::dataplane::h1::error::Reject;
use shoal_node::dataplane::h1::head::{
    Framing, HeadLimits, Kind, Method, ReqHead, Span, content_length, head_end, parse_request, tokens,
};
use shoal_node::dataplane::mux::join_path;
use shoal_node::dataplane::reqid::Ids;

const SMALL: HeadLimits = HeadLimits { max_bytes: 64, max_headers: 4 };
const DEFAULT: HeadLimits = HeadLimits { max_bytes: 8192, max_headers: 100 };
/// Requests followed on one connection.
const MAX_REQUESTS: usize = 8;

type Verdict = Result<Option<ReqHead>, Reject>;

/// `ReqHead` has no `PartialEq`; its `Debug` shows every field (spans as offsets).
fn shown(v: &Verdict) -> String {
    format!("{v:?}")
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The prefix lengths worth parsing. Before the head's end: every one for short heads, else
/// those around line ends (where a terminator could be mistaken), around the limit and one
/// chosen by `knob`. Past the head's end the parser sees the same bytes, so the end itself and
/// the whole input suffice there.
fn prefix_points(data: &[u8], end: Option<usize>, max: usize, knob: u8) -> Vec<usize> {
    let len = data.len();
    let before = end.unwrap_or(len + 1).min(len + 1);
    let mut points: Vec<usize> = if before <= 64 {
        (0..before).collect()
    } else {
        let lines = data[..before - 1].iter().enumerate().filter(|(_, b)| **b == b'\n').take(16);
        let mut p: Vec<usize> = lines.flat_map(|(i, _)| [i, i + 1, i + 2]).collect();
        p.extend([0, 1, before - 1, before * usize::from(knob) / 256, max, max + 1]);
        p
    };
    points.extend([len, end.unwrap_or(len)]);
    points.retain(|&p| p <= len && (p < before || p == len || Some(p) == end));
    points.sort_unstable();
    points.dedup();
    points
}

fn check_prefixes(data: &[u8], limits: HeadLimits, whole: &Verdict, knob: u8) {
    let end = head_end(data, 0);
    let whole_shown = shown(whole);
    for p in prefix_points(data, end, limits.max_bytes, knob) {
        let part = &data[..p];
        let got = parse_request(part, limits);
        match end {
            Some(e) if p >= e => {
                assert_eq!(shown(&got), whole_shown, "prefix of {p} bytes (head ends at {e}) parses differently")
            }
            _ if p > limits.max_bytes => {
                assert!(
                    matches!(got, Err(Reject::HeadTooLarge | Reject::UriTooLong)),
                    "prefix of {p} > limit: {got:?}"
                );
                assert_eq!(shown(&got), whole_shown, "prefix too large but whole is {whole:?}");
            }
            // Bytes that cannot start a request are refused early, and the whole head then too.
            _ => assert!(
                matches!(got, Ok(None)) || (got.is_err() && whole.is_err()),
                "prefix of {p} bytes before the head's end: {got:?}, whole: {whole:?}"
            ),
        }
        // The driver resumes the search where the last read ended.
        if head_end(part, 0).is_none() {
            assert_eq!(head_end(data, p), end, "head_end resumed at {p}");
        }
    }
}

/// A span inside `head` (slicing panics otherwise).
fn inside(span: Span, head: &[u8]) -> &[u8] {
    span.of(head)
}

fn check_head(data: &[u8], limits: HeadLimits, h: &ReqHead) {
    assert_eq!(Some(h.len), head_end(data, 0), "head length is not the head's end");
    assert!(h.len <= data.len() && h.len <= limits.max_bytes, "head of {} bytes", h.len);
    assert!(h.fields.len() <= limits.max_headers, "{} fields > {}", h.fields.len(), limits.max_headers);
    let head = &data[..h.len];
    assert!(head.ends_with(b"\r\n\r\n") && !head.windows(2).any(|w| w[1] == b'\n' && w[0] != b'\r'));
    let method = inside(h.method_span, head);
    assert!(!method.is_empty() && method != b"CONNECT");
    let expect = match method {
        b"GET" => Method::Get,
        b"HEAD" => Method::Head,
        b"OPTIONS" => Method::Options,
        _ => Method::Other,
    };
    assert_eq!(h.method, expect);
    let target = inside(h.target, head);
    assert!(h.path_len <= target.len());
    assert!(target.is_empty() || target[0] == b'/' || (target == b"*" && h.method == Method::Options));
    assert!(target.is_ascii() && !target[..h.path_len].contains(&b'?'));
    assert!(h.minor <= 1);
    for f in &h.fields {
        assert!(!inside(f.name, head).is_empty());
        inside(f.value, head);
    }
    check_framing(head, h);
    let hosts: Vec<&[u8]> = h.fields.iter().filter(|f| f.kind == Kind::Host).map(|f| inside(f.value, head)).collect();
    assert!(hosts.len() <= 1 && (h.minor == 0 || hosts.len() == 1));
    assert_eq!(h.host.map(|s| inside(s, head)), hosts.first().copied());
    if h.websocket {
        assert!(h.method == Method::Get && h.minor == 1 && h.framing == Framing::Empty);
    }
}

/// Framing must follow from exactly one framing field (or none).
fn check_framing(head: &[u8], h: &ReqHead) {
    let of = |kind| h.fields.iter().filter(|f| f.kind == kind).map(|f| f.value.of(head)).collect::<Vec<_>>();
    let (cl, te) = (of(Kind::ContentLength), of(Kind::TransferEncoding));
    assert!(cl.len() <= 1 && te.len() <= 1 && (cl.is_empty() || te.is_empty()), "{} CL, {} TE", cl.len(), te.len());
    match h.framing {
        Framing::Chunked => assert!(te[0].trim_ascii().eq_ignore_ascii_case(b"chunked") && h.minor == 1),
        Framing::Length(n) => assert!(n > 0 && content_length(cl[0]) == Some(n)),
        Framing::Empty => assert!(te.is_empty() && cl.iter().all(|v| content_length(v) == Some(0))),
        Framing::UntilClose => panic!("a request framed until close"),
    }
}

type Body = Result<(Vec<u8>, usize, bool), Reject>;

/// Payload, bytes used and whether the body ended, for `input` fed in `pieces`.
fn frame<'a>(framing: Framing, pieces: impl IntoIterator<Item = &'a [u8]>) -> Body {
    let mut f = Framer::new(framing);
    let (mut out, mut used) = (Vec::new(), 0);
    for p in pieces {
        if f.done() {
            break;
        }
        let n = drain(&mut f, p, |d| out.extend_from_slice(d))?;
        assert!(n <= p.len());
        used += n;
        if !f.done() {
            assert_eq!(n, p.len(), "an unfinished body left bytes of a piece unused");
        }
    }
    Ok((out, used, f.done()))
}

/// The body after a head; returns the bytes it used when it ended.
fn check_body(framing: Framing, rest: &[u8], knob: u8) -> Option<usize> {
    let whole = frame(framing, [rest]);
    let bytewise = frame(framing, rest.chunks(1));
    assert_eq!(whole, bytewise, "byte-by-byte framing differs ({framing:?})");
    let at = rest.len() * usize::from(knob) / 256;
    let (a, b) = rest.split_at(at);
    assert_eq!(whole, frame(framing, [a, b]), "framing split at {at} differs ({framing:?})");
    let (payload, used, done) = match whole {
        Ok(ok) => ok,
        Err(e) => {
            assert_eq!(framing, Framing::Chunked, "{e:?} for {framing:?}");
            assert_eq!(e.status(), 400);
            return None;
        }
    };
    assert!(payload.len() <= used && used <= rest.len());
    assert!(done || used == rest.len());
    // Bytes past the body never change it.
    assert_eq!(frame(framing, [&rest[..used]]), Ok((payload.clone(), used, done)));
    match framing {
        Framing::Length(n) => {
            let take = rest.len().min(n as usize);
            assert_eq!((payload.as_slice(), used, done), (&rest[..take], take, rest.len() as u64 >= n));
        }
        Framing::Empty => assert_eq!((payload.len(), used, done), (0, 0, true)),
        Framing::Chunked => round_trip(&payload, knob),
        Framing::UntilClose => unreachable!(),
    }
    done.then_some(used)
}

/// The payload in chunks whose sizes `knob` picks, as the engine writes them, decodes to itself.
fn round_trip(payload: &[u8], knob: u8) {
    let size = 1 + usize::from(knob % 64);
    let mut enc = Vec::new();
    for c in payload.chunks(size) {
        let (line, n) = chunk_line(c.len());
        enc.extend_from_slice(&line[..n]);
        enc.extend_from_slice(c);
        enc.extend_from_slice(b"\r\n");
    }
    enc.extend_from_slice(LAST_CHUNK);
    let got = frame(Framing::Chunked, [enc.as_slice()]);
    assert_eq!(got, Ok((payload.to_vec(), enc.len(), true)), "re-encoded body {:?}", lossy(&enc));
    assert_eq!(frame(Framing::Chunked, enc.chunks(1)), got);
}

/// Fields a proxy must never forward (RFC 9110 §7.6.1), besides the engine's own lines.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
];

fn client(knob: u8) -> ClientId {
    let ip: IpAddr = if knob & 1 == 0 { [192, 0, 2, 7].into() } else { "2001:db8::5".parse().expect("ip") };
    ClientId { ip, tls: knob & 2 != 0 }
}

/// The lines `emit::request_head` must write for `h`, in order.
fn expected_fields(src: &[u8], h: &ReqHead, id: ClientId, fallback: &str) -> Vec<(String, Vec<u8>)> {
    let mut lines: Vec<(String, Vec<u8>)> =
        h.fields.iter().filter(|f| f.forwarded()).map(|f| (f.name.str(src).into(), f.value.of(src).to_vec())).collect();
    if h.host.is_none() {
        lines.push(("Host".into(), fallback.into()));
    }
    let mut xff: Vec<&[u8]> = h
        .fields
        .iter()
        .filter(|f| f.kind == Kind::XForwardedFor)
        .map(|f| f.value.of(src).trim_ascii())
        .filter(|v| !v.is_empty())
        .collect();
    let ip = id.ip.to_string();
    xff.push(ip.as_bytes());
    let proto = if id.tls { "https" } else { "http" };
    lines.push(("X-Forwarded-For".into(), xff.join(&b", "[..])));
    lines.push(("X-Forwarded-Proto".into(), proto.into()));
    lines.push(("X-Real-IP".into(), ip.clone().into()));
    let node = if id.ip.is_ipv6() { format!("\"[{ip}]\"") } else { ip };
    let mut fwd = format!("for={node};proto={proto}").into_bytes();
    if let Some(host) = h.host.map(|s| s.of(src)).filter(|v| !v.is_empty()) {
        fwd.extend_from_slice(b";host=\"");
        fwd.extend_from_slice(host);
        fwd.push(b'"');
    }
    lines.push(("Forwarded".into(), fwd));
    if h.websocket {
        lines.push(("Connection".into(), b"upgrade".to_vec()));
        lines.push(("Upgrade".into(), b"websocket".to_vec()));
    }
    if h.framing == Framing::Chunked {
        lines.push(("Transfer-Encoding".into(), b"chunked".to_vec()));
    }
    lines
}

fn check_emit(src: &[u8], h: &ReqHead, knob: u8) {
    let prefix = ["", "/", "/base", "/base/"][usize::from(knob >> 2) % 4];
    let path = join_path(prefix, h.path(src));
    let query = h.query(src);
    let id = client(knob);
    let fallback = "10.0.0.1:80";
    let mut out = Buf::take();
    emit::request_head(&mut out, src, h, &Target { path: &path, query }, id, fallback, &Ids::default());
    let out = out.bytes();
    let mut slots = [httparse::EMPTY_HEADER; 256];
    let mut req = httparse::Request::new(&mut slots);
    let ctx = || format!("emitted {:?}\nfor {:?}", lossy(out), lossy(&src[..h.len]));
    match req.parse(out) {
        Ok(httparse::Status::Complete(n)) => assert_eq!(n, out.len(), "{}", ctx()),
        other => panic!("emitted head does not parse: {other:?}\n{}", ctx()),
    }
    assert_eq!(req.method.map(str::as_bytes), Some(h.method_span.of(src)), "{}", ctx());
    assert_eq!(req.path, Some(format!("{path}{query}").as_str()), "{}", ctx());
    assert_eq!(req.version, Some(1));
    let got: Vec<(String, Vec<u8>)> = req.headers.iter().map(|f| (f.name.to_string(), f.value.to_vec())).collect();
    assert_eq!(got, expected_fields(src, h, id, fallback), "{}", ctx());
    let count = |name: &str| got.iter().filter(|(n, _)| n.eq_ignore_ascii_case(name)).count();
    assert_eq!(count("host"), 1, "{}", ctx());
    for name in ["x-forwarded-for", "x-forwarded-proto", "x-real-ip", "forwarded"] {
        assert_eq!(count(name), 1, "{name}: {}", ctx());
    }
    for name in HOP_BY_HOP {
        let own = match name {
            "transfer-encoding" => usize::from(h.framing == Framing::Chunked),
            "connection" | "upgrade" => usize::from(h.websocket),
            _ => 0,
        };
        assert_eq!(count(name), own, "hop-by-hop {name}: {}", ctx());
    }
    // Fields the client's Connection header named stay behind (framing and identity excepted).
    let listed: Vec<&[u8]> =
        h.fields.iter().filter(|f| f.kind == Kind::Connection).flat_map(|f| tokens(f.value.of(src))).collect();
    for t in listed {
        let name = String::from_utf8_lossy(t).to_ascii_lowercase();
        let kept = name == "host" || name == "content-length" || name.starts_with("x-forwarded-");
        let own = ["x-real-ip", "forwarded", "connection", "upgrade", "transfer-encoding"].contains(&name.as_str());
        if !kept && !own {
            assert_eq!(count(&name), 0, "{name} named by Connection was forwarded: {}", ctx());
        }
    }
}

/// Follows the requests on one connection with `limits`.
fn check_stream(data: &[u8], limits: HeadLimits, knob: u8) {
    let mut at = 0;
    for n in 0..MAX_REQUESTS {
        let rest = &data[at..];
        let verdict = parse_request(rest, limits);
        if n == 0 || rest.len() <= 1024 {
            check_prefixes(rest, limits, &verdict, knob);
        }
        let h = match verdict {
            Ok(Some(h)) => h,
            Ok(None) => return,
            Err(e) => {
                assert!(matches!(e.status(), 400 | 405 | 414 | 431 | 505) && !e.reason().is_empty());
                if matches!(e, Reject::HeadTooLarge | Reject::UriTooLong) {
                    assert!(head_end(rest, 0).map_or(rest.len(), |e| e) > limits.max_bytes);
                }
                return;
            }
        };
        check_head(rest, limits, &h);
        check_emit(rest, &h, knob);
        let Some(used) = check_body(h.framing, &rest[h.len..], knob) else { return };
        if !h.keep_alive || h.websocket {
            return;
        }
        at += h.len + used;
    }
}

fuzz_target!(|data: &[u8]| {
    let knob = data.last().copied().unwrap_or(0);
    for limits in [SMALL, DEFAULT] {
        check_stream(data, limits, knob);
    }
    // Any bytes as a chunked body, whatever the head.
    check_body(Framing::Chunked, data, knob);
});
