//! What the engine writes: the request head a backend receives (hop-by-hop headers gone, the
//! client's identity in `X-Forwarded-*`, `X-Real-IP` and `Forwarded`), the response head a
//! client receives, chunk lines, and the proxy's own short answers. Everything is written into
//! one pooled buffer so a small message leaves in one system call.

use std::fmt::Write as _;
use std::net::IpAddr;

use super::buf::Buf;
use super::head::{Field, Framing, Kind, ReqHead, RespHead};
use crate::dataplane::reqid::{self, Ids};

/// Who the client is, as the identity headers say it.
#[derive(Clone, Copy, Debug)]
pub struct ClientId {
    pub ip: IpAddr,
    pub tls: bool,
}

impl ClientId {
    fn proto(&self) -> &'static str {
        if self.tls { "https" } else { "http" }
    }
}

/// Where the request goes on the backend: the path (already rewritten) and the query.
pub struct Target<'a> {
    pub path: &'a str,
    pub query: &'a str,
}

/// The head sent to a backend for `head` (parsed from `src`), with the proxy's request id and
/// traceparent when `ids` has them.
pub fn request_head(
    out: &mut Buf,
    src: &[u8],
    head: &ReqHead,
    target: &Target<'_>,
    id: ClientId,
    fallback_host: &str,
    ids: &Ids,
) {
    out.put(head.method_span.of(src));
    out.put(b" ");
    out.put(target.path.as_bytes());
    out.put(target.query.as_bytes());
    out.put(b" HTTP/1.1\r\n");
    put_fields(out, src, &head.fields, ids);
    if head.host.is_none() {
        line(out, b"Host", fallback_host.as_bytes());
    }
    forwarding(out, src, head, id);
    correlation(out, ids);
    if head.websocket {
        out.put(b"Connection: upgrade\r\nUpgrade: websocket\r\n");
    }
    if head.framing == Framing::Chunked {
        out.put(b"Transfer-Encoding: chunked\r\n");
    }
    out.put(b"\r\n");
}

/// Forwarded lines, less those the proxy writes itself (`ids`).
fn put_fields(out: &mut Buf, src: &[u8], fields: &[Field], ids: &Ids) {
    for f in fields.iter().filter(|f| f.forwarded() && !ids.replaces(f.name.of(src))) {
        line(out, f.name.of(src), f.value.of(src));
    }
}

/// The proxy's `X-Request-Id` and new `traceparent`, when it sends them.
fn correlation(out: &mut Buf, ids: &Ids) {
    if let Some(rid) = ids.sent_request_id() {
        line(out, b"X-Request-Id", rid.as_bytes());
    }
    if let Some(tp) = &ids.new_traceparent {
        line(out, reqid::TRACEPARENT.as_bytes(), tp.as_bytes());
    }
}

fn line(out: &mut Buf, name: &[u8], value: &[u8]) {
    out.put(name);
    out.put(b": ");
    out.put(value);
    out.put(b"\r\n");
}

/// `X-Forwarded-For` gets the client appended to what came before (the last entry is the one a
/// proxy vouches for); `X-Forwarded-Proto`, `X-Real-IP` and `Forwarded` are replaced, so what a
/// client sent in them never reaches a backend.
fn forwarding(out: &mut Buf, src: &[u8], head: &ReqHead, id: ClientId) {
    out.put(b"X-Forwarded-For: ");
    for f in head.fields.iter().filter(|f| f.kind == Kind::XForwardedFor) {
        let prior = f.value.of(src).trim_ascii();
        if !prior.is_empty() {
            out.put(prior);
            out.put(b", ");
        }
    }
    let ip = IpText::of(id.ip);
    let proto = id.proto().as_bytes();
    out.put(ip.bytes());
    out.put(b"\r\nX-Forwarded-Proto: ");
    out.put(proto);
    out.put(b"\r\nX-Real-IP: ");
    out.put(ip.bytes());
    out.put(b"\r\nForwarded: for=");
    // RFC 7239 §6: an IPv6 node is bracketed and, having colons, quoted.
    if id.ip.is_ipv6() {
        out.put(b"\"[");
        out.put(ip.bytes());
        out.put(b"]\"");
    } else {
        out.put(ip.bytes());
    }
    out.put(b";proto=");
    out.put(proto);
    let quotable = |h: &[u8]| h.iter().all(|&b| b.is_ascii_graphic() && b != b'"' && b != b'\\');
    if let Some(host) = head.host.map(|h| h.of(src)).filter(|h| !h.is_empty() && quotable(h)) {
        out.put(b";host=\"");
        out.put(host);
        out.put(b"\"");
    }
    out.put(b"\r\n");
}

/// The client's address as text, formatted once for the three headers that carry it.
struct IpText {
    /// Room for the longest address text (45 bytes, `INET6_ADDRSTRLEN` less its NUL).
    buf: [u8; 45],
    len: usize,
}

impl IpText {
    fn of(ip: IpAddr) -> IpText {
        let mut text = IpText { buf: [0; 45], len: 0 };
        let _ = write!(text, "{ip}");
        text
    }

    fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl std::fmt::Write for IpText {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let end = self.len + s.len();
        self.buf.get_mut(self.len..end).ok_or(std::fmt::Error)?.copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

/// How the response body travels to the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RespPlan {
    /// Re-encode the payload in chunks (chunked from the backend, HTTP/1.1 client).
    pub chunked: bool,
    pub keep_alive: bool,
    /// HTTP/1.0 client kept alive: it needs to be told.
    pub say_keep_alive: bool,
}

/// The head sent to the client for a backend's response; a final one carries the request id
/// (in place of any the backend sent) when the proxy sends one.
pub fn response_head(out: &mut Buf, src: &[u8], resp: &RespHead, plan: RespPlan, ids: &Ids) {
    let _ = write!(out, "HTTP/1.1 {} ", resp.status);
    out.put(resp.reason.of(src));
    out.put(b"\r\n");
    let none = Ids::default();
    let ids = if resp.informational() && resp.status != 101 { &none } else { ids };
    put_fields(out, src, &resp.fields, ids);
    if let Some(rid) = ids.sent_request_id() {
        line(out, b"X-Request-Id", rid.as_bytes());
    }
    if resp.status == 101 {
        for f in resp.fields.iter().filter(|f| matches!(f.kind, Kind::Upgrade | Kind::Connection)) {
            line(out, f.name.of(src), f.value.of(src));
        }
    } else if plan.chunked {
        out.put(b"Transfer-Encoding: chunked\r\n");
    }
    if resp.status != 101 && !resp.informational() {
        if !plan.keep_alive {
            out.put(b"Connection: close\r\n");
        } else if plan.say_keep_alive {
            out.put(b"Connection: keep-alive\r\n");
        }
    }
    out.put(b"\r\n");
}

/// The line that starts a chunk of `len` bytes.
pub fn chunk_line(len: usize) -> ([u8; 18], usize) {
    let mut line = [0u8; 18];
    let digits = (usize::BITS - len.leading_zeros()).div_ceil(4).max(1) as usize;
    for (i, slot) in line[..digits].iter_mut().enumerate() {
        *slot = b"0123456789abcdef"[(len >> (4 * (digits - 1 - i))) & 0xf];
    }
    line[digits..digits + 2].copy_from_slice(b"\r\n");
    (line, digits + 2)
}

pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// An answer of the proxy's own.
pub struct Local<'a> {
    pub status: u16,
    pub body: &'a str,
    pub location: Option<&'a str>,
    pub retry_after: bool,
    pub close: bool,
    /// HEAD request: the body is announced but not sent.
    pub head_only: bool,
    pub request_id: Option<&'a str>,
}

/// A short plain-text error: "<status> <reason>: <message>".
pub fn error(status: u16, msg: &str) -> String {
    format!("{status} {}: {msg}\n", reason(status))
}

pub fn local(out: &mut Buf, a: &Local<'_>) {
    let _ = write!(
        out,
        "HTTP/1.1 {} {}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n",
        a.status,
        reason(a.status),
        a.body.len()
    );
    if let Some(loc) = a.location {
        let _ = write!(out, "Location: {loc}\r\n");
    }
    if a.retry_after {
        out.put(b"Retry-After: 1\r\n");
    }
    if let Some(rid) = a.request_id {
        line(out, b"X-Request-Id", rid.as_bytes());
    }
    if a.close {
        out.put(b"Connection: close\r\n");
    }
    out.put(b"\r\n");
    if !a.head_only {
        out.put(a.body.as_bytes());
    }
}

pub fn reason(status: u16) -> &'static str {
    http::StatusCode::from_u16(status).ok().and_then(|s| s.canonical_reason()).unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::h1::head::{HeadLimits, parse_request};

    fn emitted(raw: &str, ip: &str, tls: bool) -> String {
        let head = parse_request(raw.as_bytes(), HeadLimits { max_bytes: 8192, max_headers: 100 })
            .expect("valid")
            .expect("complete");
        let mut out = Buf::take();
        let target = Target { path: head.path(raw.as_bytes()), query: head.query(raw.as_bytes()) };
        let id = ClientId { ip: ip.parse().expect("ip"), tls };
        request_head(&mut out, raw.as_bytes(), &head, &target, id, "10.0.0.1:80", &Ids::default());
        String::from_utf8(out.bytes().to_vec()).expect("ascii")
    }

    #[test]
    fn identity_headers_are_appended_or_replaced() {
        let raw = "GET /p?q=1 HTTP/1.1\r\nHost: lb.test\r\nX-Forwarded-For: 1.2.3.4\r\nX-Real-IP: 6.6.6.6\r\nForwarded: for=7.7.7.7\r\nX-Forwarded-Proto: https\r\nConnection: keep-alive, X-Secret\r\nX-Secret: s\r\nKeep-Alive: timeout=5\r\nX-Kept: 1\r\n\r\n";
        let out = emitted(raw, "10.0.0.9", false);
        assert_eq!(
            out,
            "GET /p?q=1 HTTP/1.1\r\nHost: lb.test\r\nX-Kept: 1\r\nX-Forwarded-For: 1.2.3.4, 10.0.0.9\r\nX-Forwarded-Proto: http\r\nX-Real-IP: 10.0.0.9\r\nForwarded: for=10.0.0.9;proto=http;host=\"lb.test\"\r\n\r\n"
        );
        let out = emitted("GET / HTTP/1.0\r\n\r\n", "2001:db8::5", true);
        assert!(out.contains("\r\nHost: 10.0.0.1:80\r\n"), "{out}");
        assert!(out.contains("Forwarded: for=\"[2001:db8::5]\";proto=https\r\n"), "{out}");
        // The longest address texts fit whole in every header.
        for ip in ["1111:2222:3333:4444:5555:6666:7777:8888", "::ffff:255.255.255.255"] {
            let out = emitted("GET / HTTP/1.1\r\nHost: a\r\n\r\n", ip, false);
            let want = format!("X-Forwarded-For: {ip}\r\nX-Forwarded-Proto: http\r\nX-Real-IP: {ip}\r\n");
            assert!(out.contains(&want) && out.contains(&format!("for=\"[{ip}]\";")), "{out}");
        }
    }

    #[test]
    fn chunked_and_upgrade_requests_say_so_themselves() {
        let raw = "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(emitted(raw, "10.0.0.9", false).ends_with("Transfer-Encoding: chunked\r\n\r\n"));
        let ws =
            "GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: k\r\n\r\n";
        let out = emitted(ws, "10.0.0.9", false);
        assert!(
            out.contains("Sec-WebSocket-Key: k\r\n") && out.contains("Connection: upgrade\r\nUpgrade: websocket\r\n")
        );
    }

    #[test]
    fn the_proxy_s_ids_replace_the_client_s_lines() {
        let raw = "GET / HTTP/1.1\r\nHost: a\r\nX-Request-ID: bad id\r\ntraceparent: junk\r\ntracestate: k=v\r\n\r\n";
        let head = parse_request(raw.as_bytes(), HeadLimits { max_bytes: 8192, max_headers: 100 })
            .expect("valid")
            .expect("complete");
        let ids = Ids {
            request_id: Some("rid".into()),
            own_request_id: true,
            new_traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
            ..Ids::default()
        };
        let mut out = Buf::take();
        let target = Target { path: "/", query: "" };
        let id = ClientId { ip: "10.0.0.9".parse().expect("ip"), tls: false };
        request_head(&mut out, raw.as_bytes(), &head, &target, id, "b", &ids);
        let out = String::from_utf8(out.bytes().to_vec()).expect("ascii");
        assert!(!out.contains("bad id") && !out.contains("junk"), "{out}");
        assert!(out.contains("tracestate: k=v\r\n"), "tracestate passes: {out}");
        assert!(
            out.contains(
                "X-Request-Id: rid\r\ntraceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n"
            )
        );
        let mut local_out = Buf::take();
        let a = Local {
            status: 404,
            body: "x",
            location: None,
            retry_after: false,
            close: false,
            head_only: false,
            request_id: ids.sent_request_id(),
        };
        local(&mut local_out, &a);
        assert!(String::from_utf8_lossy(local_out.bytes()).contains("\r\nX-Request-Id: rid\r\n"));
    }

    #[test]
    fn chunk_lines_are_hex() {
        for (len, text) in [(0x1f40, &b"1f40\r\n"[..]), (0, b"0\r\n"), (15, b"f\r\n"), (16, b"10\r\n")] {
            let (line, n) = chunk_line(len);
            assert_eq!(&line[..n], text);
        }
    }
}
