//! Request and response heads: one httparse call over the buffered bytes once they can hold a
//! whole head, then the framing rules a proxy must enforce (RFC 9112) and a classification of
//! every header, kept as offsets into the connection's buffer so nothing is copied. A request
//! that could be read two ways (smuggling) is refused here, before any byte reaches a backend.

use std::mem::MaybeUninit;

use super::error::Reject;

/// Most header lines parsed in one head (the configured limit is at most this).
pub const MAX_HEADERS: usize = 128;

/// A byte range of the buffer the head was parsed from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Span {
    off: u32,
    len: u32,
}

impl Span {
    fn within(base: &[u8], part: &[u8]) -> Span {
        let off = part.as_ptr() as usize - base.as_ptr() as usize;
        Span { off: off as u32, len: part.len() as u32 }
    }

    pub fn of<'a>(&self, buf: &'a [u8]) -> &'a [u8] {
        &buf[self.off as usize..(self.off + self.len) as usize]
    }

    pub fn str<'a>(&self, buf: &'a [u8]) -> &'a str {
        std::str::from_utf8(self.of(buf)).unwrap_or("")
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The first `n` bytes.
    fn prefix(self, n: usize) -> Span {
        Span { off: self.off, len: (n as u32).min(self.len) }
    }

    /// Everything after the first `n` bytes.
    fn skip(self, n: usize) -> Span {
        let n = (n as u32).min(self.len);
        Span { off: self.off + n, len: self.len - n }
    }
}

/// What a header is to the proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Forwarded as it is.
    Other,
    Host,
    ContentLength,
    TransferEncoding,
    Connection,
    Upgrade,
    XForwardedFor,
    /// Hop-by-hop (RFC 9110 §7.6.1), or replaced by the proxy's own value: never forwarded.
    Dropped,
}

/// One header line.
#[derive(Clone, Copy, Debug)]
pub struct Field {
    pub name: Span,
    pub value: Span,
    pub kind: Kind,
    /// Named by a `Connection` token: hop-by-hop for this message only.
    pub listed: bool,
}

impl Field {
    /// Whether the line goes to the next hop unchanged.
    pub fn forwarded(&self) -> bool {
        !self.listed && matches!(self.kind, Kind::Other | Kind::ContentLength | Kind::Host)
    }
}

/// How a message body is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    Empty,
    Length(u64),
    Chunked,
    /// Responses only: the body ends when the backend closes.
    UntilClose,
}

/// The kinds of request the engine treats differently.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
    Options,
    Other,
}

/// A parsed, validated request head.
#[derive(Debug)]
pub struct ReqHead {
    /// Bytes of the head, final empty line included.
    pub len: usize,
    pub method: Method,
    pub method_span: Span,
    /// Path and query in origin form (absolute-form targets are reduced to it).
    pub target: Span,
    /// Length of the path within `target` (the query follows).
    pub path_len: usize,
    /// `HTTP/1.x` minor version.
    pub minor: u8,
    pub fields: Vec<Field>,
    pub framing: Framing,
    /// The request's host (the Host header, equal to any absolute-form authority).
    pub host: Option<Span>,
    pub keep_alive: bool,
    /// A WebSocket upgrade the proxy will relay if the backend agrees.
    pub websocket: bool,
}

impl ReqHead {
    pub fn path<'a>(&self, buf: &'a [u8]) -> &'a str {
        let t = self.target.of(buf);
        match std::str::from_utf8(&t[..self.path_len]) {
            Ok("") | Err(_) => "/",
            Ok(p) => p,
        }
    }

    /// The query with its `?`, or "".
    pub fn query<'a>(&self, buf: &'a [u8]) -> &'a str {
        self.target.skip(self.path_len).str(buf)
    }

    /// The value of the first header called `name` (ASCII case-insensitive), trimmed.
    pub fn header<'a>(&self, buf: &'a [u8], name: &str) -> Option<&'a str> {
        header(&self.fields, buf, name)
    }
}

/// A parsed response head.
#[derive(Debug)]
pub struct RespHead {
    pub len: usize,
    pub status: u16,
    pub reason: Span,
    pub minor: u8,
    pub fields: Vec<Field>,
    pub framing: Framing,
    pub keep_alive: bool,
}

impl RespHead {
    /// 1xx other than 101: relayed, then the real response follows.
    pub fn informational(&self) -> bool {
        (100..200).contains(&self.status) && self.status != 101
    }
}

fn header<'a>(fields: &[Field], buf: &'a [u8], name: &str) -> Option<&'a str> {
    fields.iter().find(|f| f.name.of(buf).eq_ignore_ascii_case(name.as_bytes())).map(|f| f.value.str(buf).trim())
}

/// Size and count limits for request heads.
#[derive(Clone, Copy, Debug)]
pub struct HeadLimits {
    pub max_bytes: usize,
    pub max_headers: usize,
}

/// Where the head ends, searching from `from` (bytes before it were searched already, minus
/// the three that may start a terminator); bare-LF terminators are found too, to be refused.
pub fn head_end(buf: &[u8], from: usize) -> Option<usize> {
    let start = from.saturating_sub(3);
    let mut i = start;
    while let Some(p) = buf[i..].iter().position(|&b| b == b'\n') {
        let lf = i + p;
        if lf >= 1 && buf[lf - 1] == b'\n' {
            return Some(lf + 1);
        }
        if lf >= 2 && buf[lf - 1] == b'\r' && buf[lf - 2] == b'\n' {
            return Some(lf + 1);
        }
        i = lf + 1;
    }
    None
}

/// Parses a request head from the start of `buf`. `Ok(None)`: not complete yet.
pub fn parse_request(buf: &[u8], limits: HeadLimits) -> Result<Option<ReqHead>, Reject> {
    let Some(end) = head_end(buf, 0) else {
        if buf.len() > limits.max_bytes {
            return Err(too_large(buf, limits.max_bytes));
        }
        return invalid_start(buf).map_or(Ok(None), Err);
    };
    if end > limits.max_bytes {
        return Err(too_large(buf, limits.max_bytes));
    }
    let buf = &buf[..end];
    if has_bare_lf(buf) {
        return Err(Reject::BareLf);
    }
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let slots = &mut slots[..limits.max_headers.clamp(1, MAX_HEADERS)];
    let mut req = httparse::Request::new(&mut []);
    match httparse::ParserConfig::default().parse_request_with_uninit_headers(&mut req, buf, slots) {
        Ok(httparse::Status::Complete(n)) if n == end => {}
        Ok(_) => return Err(Reject::Malformed("incomplete head")),
        Err(httparse::Error::TooManyHeaders) => return Err(Reject::TooManyHeaders),
        Err(httparse::Error::Version) if newer_major_version(buf) => return Err(Reject::Version),
        Err(e) => return Err(Reject::Malformed(parse_error(e))),
    }
    let method = req.method.unwrap_or("");
    let target = req.path.unwrap_or("");
    let minor = req.version.unwrap_or(1);
    let fields = classify(buf, req.headers, true);
    request_rules(buf, method, target, minor, fields)
}

fn parse_error(e: httparse::Error) -> &'static str {
    match e {
        httparse::Error::HeaderName => "invalid header name (space before the colon, or obs-fold)",
        httparse::Error::HeaderValue => "invalid header value",
        httparse::Error::NewLine => "invalid line ending",
        httparse::Error::Token => "invalid method or request line",
        httparse::Error::Version => "unsupported HTTP version",
        _ => "malformed request head",
    }
}

/// RFC 9112 §3: a request line that does not fit in the head limit has a target longer than
/// the proxy parses (414, a MUST); a longer head with a short request line has too many or too
/// large fields (431).
fn too_large(buf: &[u8], max_bytes: usize) -> Reject {
    let line = &buf[..max_bytes.min(buf.len())][line_start(buf).min(max_bytes)..];
    if line.contains(&b'\n') { Reject::HeadTooLarge } else { Reject::UriTooLong }
}

/// Where the request line begins: after any empty lines (RFC 9112 §2.2 lets a server skip
/// them, and httparse does).
fn line_start(buf: &[u8]) -> usize {
    buf.iter().position(|b| !matches!(b, b'\r' | b'\n')).unwrap_or(buf.len())
}

/// Bytes that cannot begin a request line whatever follows (a TLS ClientHello, binary noise):
/// refused at once instead of holding the connection until the head timeout. Never stricter
/// than httparse on the whole head: empty lines may come first (RFC 9112 §2.2), then the
/// method is a token up to its space.
pub fn invalid_start(buf: &[u8]) -> Option<Reject> {
    let line = &buf[line_start(buf)..];
    let method = line.iter().position(|&b| b == b' ').map_or(line, |sp| &line[..sp]);
    let bad = (method.is_empty() && line.len() > method.len()) || !method.iter().all(|&b| is_tchar(b));
    bad.then_some(Reject::Malformed("invalid method or request line"))
}

/// RFC 9110 §5.6.2 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// `HTTP/2.0` and later in an HTTP/1 request line: the version, not the request, is refused
/// (RFC 9110 §15.6.6, 505). Anything else httparse calls a bad version is a 400.
fn newer_major_version(head: &[u8]) -> bool {
    let line = head[line_start(head)..].split(|&b| b == b'\r').next().unwrap_or(&[]);
    let version = line.rsplit(|&b| b == b' ').next().unwrap_or(&[]);
    matches!(version, [b'H', b'T', b'T', b'P', b'/', major, b'.', minor]
        if (b'2'..=b'9').contains(major) && minor.is_ascii_digit())
}

/// A LF not preceded by CR: some parsers end lines there and others do not.
fn has_bare_lf(head: &[u8]) -> bool {
    head.iter().enumerate().any(|(i, &b)| b == b'\n' && (i == 0 || head[i - 1] != b'\r'))
}

fn classify(buf: &[u8], headers: &[httparse::Header<'_>], request: bool) -> Vec<Field> {
    let mut fields: Vec<Field> = headers
        .iter()
        .map(|h| Field {
            name: Span::within(buf, h.name.as_bytes()),
            value: Span::within(buf, h.value),
            kind: kind_of(h.name, request),
            listed: false,
        })
        .collect();
    mark_listed(buf, &mut fields);
    fields
}

/// Hop-by-hop headers besides Connection, Upgrade and Transfer-Encoding (RFC 9110 §7.6.1).
const HOP_BY_HOP: [&str; 6] =
    ["keep-alive", "proxy-connection", "te", "trailer", "proxy-authenticate", "proxy-authorization"];
/// Client identity headers the proxy replaces with its own in requests.
const REPLACED: [&str; 3] = ["x-real-ip", "forwarded", "x-forwarded-proto"];

fn kind_of(name: &str, request: bool) -> Kind {
    let is = |n: &str| name.eq_ignore_ascii_case(n);
    if is("host") {
        Kind::Host
    } else if is("content-length") {
        Kind::ContentLength
    } else if is("transfer-encoding") {
        Kind::TransferEncoding
    } else if is("connection") {
        Kind::Connection
    } else if is("upgrade") {
        Kind::Upgrade
    } else if request && is("x-forwarded-for") {
        Kind::XForwardedFor
    } else if HOP_BY_HOP.iter().any(|d| is(d)) || (request && REPLACED.iter().any(|d| is(d))) {
        Kind::Dropped
    } else {
        Kind::Other
    }
}

/// Headers a `Connection` header names are hop-by-hop; framing, identity and WebSocket
/// handshake headers are never removed that way (a client must not strip `Content-Length` or
/// `X-Forwarded-For` on its way, nor send an upgrade the backend cannot complete).
fn mark_listed(buf: &[u8], fields: &mut [Field]) {
    let tokens: Vec<Span> = fields
        .iter()
        .filter(|f| f.kind == Kind::Connection)
        .flat_map(|f| tokens(f.value.of(buf)).map(move |t| Span::within(buf, t)))
        .collect();
    for t in tokens {
        let t = t.of(buf);
        for f in fields.iter_mut().filter(|f| f.kind == Kind::Other) {
            if f.name.of(buf).eq_ignore_ascii_case(t) && !protected(t) {
                f.listed = true;
            }
        }
    }
}

fn protected(name: &[u8]) -> bool {
    let lower = name.to_ascii_lowercase();
    lower.starts_with(b"x-forwarded-")
        || lower.starts_with(b"sec-websocket-")
        || lower == b"host"
        || lower == b"content-length"
}

/// Comma-separated tokens of a list header, trimmed, empty ones skipped.
pub fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value.split(|&b| b == b',').map(|t| t.trim_ascii()).filter(|t| !t.is_empty())
}

fn has_token(buf: &[u8], fields: &[Field], kind: Kind, token: &str) -> bool {
    fields
        .iter()
        .filter(|f| f.kind == kind)
        .any(|f| tokens(f.value.of(buf)).any(|t| t.eq_ignore_ascii_case(token.as_bytes())))
}

fn request_rules(
    buf: &[u8],
    method: &str,
    target: &str,
    minor: u8,
    fields: Vec<Field>,
) -> Result<Option<ReqHead>, Reject> {
    let method_span = Span::within(buf, method.as_bytes());
    let method = match method {
        "GET" => Method::Get,
        "HEAD" => Method::Head,
        "OPTIONS" => Method::Options,
        "CONNECT" => return Err(Reject::Connect),
        _ => Method::Other,
    };
    let framing = request_framing(buf, &fields, minor)?;
    let host = single_host(buf, &fields, minor)?;
    let target_span = Span::within(buf, target.as_bytes());
    let (target, path_len) = origin_form(buf, target_span, method, host)?;
    let close = has_token(buf, &fields, Kind::Connection, "close");
    let keep_alive = !close && (minor == 1 || has_token(buf, &fields, Kind::Connection, "keep-alive"));
    let websocket = websocket(buf, &fields, method, minor, framing)?;
    Ok(Some(ReqHead {
        len: buf.len(),
        method,
        method_span,
        target,
        path_len,
        minor,
        fields,
        framing,
        host,
        keep_alive,
        websocket,
    }))
}

/// RFC 9112 §6: one way to read the body or none at all.
fn request_framing(buf: &[u8], fields: &[Field], minor: u8) -> Result<Framing, Reject> {
    let mut lengths = fields.iter().filter(|f| f.kind == Kind::ContentLength);
    let mut codings = fields.iter().filter(|f| f.kind == Kind::TransferEncoding);
    let (cl, cl2) = (lengths.next(), lengths.next());
    let (te, te2) = (codings.next(), codings.next());
    if cl2.is_some() {
        return Err(Reject::Framing("more than one Content-Length"));
    }
    if te2.is_some() {
        return Err(Reject::Framing("more than one Transfer-Encoding"));
    }
    match (cl, te) {
        (Some(_), Some(_)) => Err(Reject::Framing("both Transfer-Encoding and Content-Length")),
        (Some(cl), None) => match content_length(cl.value.of(buf)) {
            Some(0) => Ok(Framing::Empty),
            Some(n) => Ok(Framing::Length(n)),
            None => Err(Reject::Framing("invalid Content-Length")),
        },
        (None, Some(_)) if minor == 0 => Err(Reject::Framing("Transfer-Encoding in an HTTP/1.0 request")),
        (None, Some(te)) if te.value.of(buf).trim_ascii().eq_ignore_ascii_case(b"chunked") => Ok(Framing::Chunked),
        (None, Some(_)) => Err(Reject::Framing("Transfer-Encoding other than a single chunked")),
        (None, None) => Ok(Framing::Empty),
    }
}

/// `1*DIGIT` and nothing else (no sign, no spaces inside, no list), fitting in a u64.
pub fn content_length(value: &[u8]) -> Option<u64> {
    let v = value.trim_ascii();
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    v.iter().try_fold(0u64, |n, d| n.checked_mul(10)?.checked_add(u64::from(d - b'0')))
}

/// HTTP/1.1 requires exactly one Host (RFC 9112 §3.2); a second one is refused in any version.
fn single_host(buf: &[u8], fields: &[Field], minor: u8) -> Result<Option<Span>, Reject> {
    let mut hosts = fields.iter().filter(|f| f.kind == Kind::Host);
    let (first, second) = (hosts.next(), hosts.next());
    if second.is_some() {
        return Err(Reject::Host("more than one Host header"));
    }
    match first {
        None if minor == 1 => Err(Reject::Host("missing Host header")),
        None => Ok(None),
        Some(h) if valid_host(h.value.of(buf)) => Ok(Some(h.value)),
        Some(_) => Err(Reject::Host("invalid Host header")),
    }
}

/// RFC 9112 §3.2 `Host = uri-host [ ":" port ]`: a reg-name or IPv4 address, or an IPv6
/// address in brackets, then at most one port of digits that names a TCP port (`x:y`, `a:b:c`
/// and `x:99999` are refused: a proxy must not route by a Host it cannot read one way).
fn valid_host(v: &[u8]) -> bool {
    if v.is_empty() || v.len() > 255 {
        return false;
    }
    let (host, port) = if v[0] == b'[' {
        let Some(close) = v.iter().position(|&b| b == b']') else { return false };
        let literal = std::str::from_utf8(&v[1..close]).ok();
        if literal.and_then(|l| l.parse::<std::net::Ipv6Addr>().ok()).is_none() {
            return false;
        }
        (&v[..=close], &v[close + 1..])
    } else {
        let colon = v.iter().position(|&b| b == b':').unwrap_or(v.len());
        let reg_name = |b: &u8| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=%".contains(b);
        if colon == 0 || !v[..colon].iter().all(reg_name) {
            return false;
        }
        (&v[..colon], &v[colon..])
    };
    !host.is_empty() && valid_port(port)
}

/// Empty, or `:` and digits up to 65535 (`port = *DIGIT`, so `host:` is allowed).
fn valid_port(port: &[u8]) -> bool {
    match port {
        [] | [b':'] => true,
        [b':', digits @ ..] => {
            digits.iter().all(u8::is_ascii_digit)
                && std::str::from_utf8(digits).ok().and_then(|d| d.parse::<u16>().ok()).is_some()
        }
        _ => false,
    }
}

/// The target in origin form: the path and query, from an absolute-form URI after checking its
/// authority against Host (RFC 9112 §3.2.2: route and forward by one host).
fn origin_form(buf: &[u8], target: Span, method: Method, host: Option<Span>) -> Result<(Span, usize), Reject> {
    let t = target.of(buf);
    if !t.is_ascii() {
        return Err(Reject::Target("non-ASCII request target"));
    }
    if t == b"*" {
        return if method == Method::Options {
            Ok((target, 1))
        } else {
            Err(Reject::Target("'*' is only for OPTIONS"))
        };
    }
    let target = match absolute_authority(t) {
        Some((authority, rest_at)) => {
            let same = host.is_some_and(|h| same_authority(h.of(buf), authority, t[4] == b's' || t[4] == b'S'));
            if !same {
                return Err(Reject::Host("absolute-form URI and Host name different hosts"));
            }
            target.skip(rest_at)
        }
        None if t.first() == Some(&b'/') => target,
        None => return Err(Reject::Target("request target is not origin-form or absolute-form")),
    };
    let t = target.of(buf);
    if t.is_empty() {
        // `http://host` (no path) asks for "/": an empty target stands for it.
        return Ok((target.prefix(0), 0));
    }
    if t[0] != b'/' {
        return Err(Reject::Target("absolute-form URI without a path"));
    }
    let path_len = t.iter().position(|&b| b == b'?').unwrap_or(t.len());
    Ok((target, path_len))
}

/// For `http://authority/...` or `https://...`: the authority and where the rest begins.
fn absolute_authority(t: &[u8]) -> Option<(&[u8], usize)> {
    let scheme_len = if t.len() >= 7 && t[..7].eq_ignore_ascii_case(b"http://") {
        7
    } else if t.len() >= 8 && t[..8].eq_ignore_ascii_case(b"https://") {
        8
    } else {
        return None;
    };
    let rest = &t[scheme_len..];
    let end = rest.iter().position(|&b| b == b'/' || b == b'?').unwrap_or(rest.len());
    Some((&rest[..end], scheme_len + end))
}

/// Host and authority agree, ignoring case and the scheme's default port.
fn same_authority(host: &[u8], authority: &[u8], https: bool) -> bool {
    let default = if https { &b":443"[..] } else { &b":80"[..] };
    let norm = |v: &[u8]| -> Vec<u8> {
        let v = v.strip_suffix(default).unwrap_or(v);
        v.to_ascii_lowercase()
    };
    !authority.is_empty() && !authority.contains(&b'@') && norm(host) == norm(authority)
}

/// A WebSocket upgrade (RFC 6455 §4.1) is relayed; any other `Upgrade` is dropped as the
/// hop-by-hop header it is, so a backend can never switch a connection the proxy did not route.
fn websocket(buf: &[u8], fields: &[Field], method: Method, minor: u8, framing: Framing) -> Result<bool, Reject> {
    let asks = has_token(buf, fields, Kind::Connection, "upgrade");
    let websocket = has_token(buf, fields, Kind::Upgrade, "websocket");
    if !(asks && websocket) {
        return Ok(false);
    }
    let upgrades = fields.iter().filter(|f| f.kind == Kind::Upgrade).count();
    let only_websocket =
        upgrades == 1 && header(fields, buf, "upgrade").is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    if !only_websocket {
        return Err(Reject::Upgrade("Upgrade must name websocket alone"));
    }
    if method != Method::Get || minor != 1 || framing != Framing::Empty {
        return Err(Reject::Upgrade("a WebSocket upgrade is a GET over HTTP/1.1 without a body"));
    }
    if header(fields, buf, "sec-websocket-key").is_none_or(str::is_empty) {
        return Err(Reject::Upgrade("WebSocket upgrade without Sec-WebSocket-Key"));
    }
    Ok(true)
}

/// Parses a response head to a request made with `method`. `Ok(None)`: not complete yet.
pub fn parse_response(buf: &[u8], method: Method, max_bytes: usize) -> Result<Option<RespHead>, &'static str> {
    let Some(end) = head_end(buf, 0) else {
        return if buf.len() > max_bytes { Err("response head too large") } else { Ok(None) };
    };
    let buf = &buf[..end];
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let mut config = httparse::ParserConfig::default();
    config.allow_spaces_after_header_name_in_responses(true);
    match config.parse_response_with_uninit_headers(&mut resp, buf, &mut slots) {
        Ok(httparse::Status::Complete(n)) if n == end => {}
        Ok(_) | Err(_) => return Err("malformed response head"),
    }
    let status = resp.code.unwrap_or(0);
    let minor = resp.version.unwrap_or(1);
    let reason = Span::within(buf, resp.reason.unwrap_or("").as_bytes());
    let fields = classify(buf, resp.headers, false);
    let framing = response_framing(buf, &fields, status, method)?;
    let close = has_token(buf, &fields, Kind::Connection, "close");
    let keep_alive = !close && (minor == 1 || has_token(buf, &fields, Kind::Connection, "keep-alive"));
    Ok(Some(RespHead { len: end, status, reason, minor, fields, framing, keep_alive }))
}

/// RFC 9112 §6.3 for responses; a response that could be read two ways is a bad gateway.
fn response_framing(buf: &[u8], fields: &[Field], status: u16, method: Method) -> Result<Framing, &'static str> {
    if method == Method::Head || (100..200).contains(&status) || status == 204 || status == 304 {
        return Ok(Framing::Empty);
    }
    let te: Vec<&Field> = fields.iter().filter(|f| f.kind == Kind::TransferEncoding).collect();
    let cls: Vec<&Field> = fields.iter().filter(|f| f.kind == Kind::ContentLength).collect();
    if !te.is_empty() {
        if !cls.is_empty() {
            return Err("response with both Transfer-Encoding and Content-Length");
        }
        let last = te.iter().flat_map(|f| tokens(f.value.of(buf))).last();
        return Ok(if last.is_some_and(|t| t.eq_ignore_ascii_case(b"chunked")) {
            Framing::Chunked
        } else {
            Framing::UntilClose
        });
    }
    let mut lengths = cls.iter().map(|f| content_length(f.value.of(buf)));
    match lengths.next() {
        None => Ok(Framing::UntilClose),
        Some(None) => Err("response with an invalid Content-Length"),
        Some(Some(n)) if lengths.all(|m| m == Some(n)) => Ok(if n == 0 { Framing::Empty } else { Framing::Length(n) }),
        Some(Some(_)) => Err("response with conflicting Content-Length headers"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: HeadLimits = HeadLimits { max_bytes: 8192, max_headers: 100 };

    fn req(raw: &str) -> Result<ReqHead, Reject> {
        parse_request(raw.as_bytes(), LIMITS).map(|h| h.expect("complete"))
    }

    fn refused(raw: &str) -> u16 {
        req(raw).expect_err(raw).status()
    }

    #[test]
    fn a_plain_request_is_classified() {
        let raw = "GET /a/b?x=1 HTTP/1.1\r\nHost: Example.com\r\nConnection: keep-alive, X-Secret\r\nX-Secret: 1\r\nX-Kept: 2\r\nX-Forwarded-For: 1.2.3.4\r\n\r\nrest";
        let h = req(raw).expect("valid");
        let b = raw.as_bytes();
        assert_eq!(h.len, raw.len() - 4);
        assert_eq!(h.path(b), "/a/b");
        assert_eq!(h.query(b), "?x=1");
        assert_eq!(h.host.expect("host").str(b), "Example.com");
        assert!(h.keep_alive && !h.websocket);
        assert_eq!(h.framing, Framing::Empty);
        let kept: Vec<&str> = h.fields.iter().filter(|f| f.forwarded()).map(|f| f.name.str(b)).collect();
        assert_eq!(kept, ["Host", "X-Kept"]);
    }

    #[test]
    fn smuggling_shapes_are_refused() {
        let cases = [
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5 5\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, chunked\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
            ("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: a\r\nX-Fold: a\r\n b\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost : a\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHo st: a\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: a b\r\n\r\n", 400),
            ("GET http://evil.example/ HTTP/1.1\r\nHost: good.example\r\n\r\n", 400),
            ("GET / HTTP/1.1\nHost: a\n\n", 400),
            ("GET / HTTP/1.1\r\nHost: a\nX: b\r\n\r\n", 400),
            ("CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n", 405),
            ("GET * HTTP/1.1\r\nHost: a\r\n\r\n", 400),
            ("GET a/b HTTP/1.1\r\nHost: a\r\n\r\n", 400),
            (
                "GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket, h2c\r\nConnection: upgrade\r\nSec-WebSocket-Key: k\r\n\r\n",
                400,
            ),
            ("GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n", 400),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: upgrade\r\nSec-WebSocket-Key: k\r\n\r\n",
                400,
            ),
            ("GET / HTTP/1.1\r\nHost: a:b\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: a:1:2\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: a:65536\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: [::1\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: [zz]\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: :80\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: a]\r\n\r\n", 400),
            ("GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
            ("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505),
            ("\r\nGET / HTTP/3.0\r\nHost: a\r\n\r\n", 505),
            ("GET / HTTP/1.2\r\nHost: a\r\n\r\n", 400),
            ("GET / http/1.1\r\nHost: a\r\n\r\n", 400),
            ("GET / HTTP/2\r\nHost: a\r\n\r\n", 400),
            ("GET /\r\n\r\n", 400),
        ];
        for (raw, status) in cases {
            assert_eq!(refused(raw), status, "{raw:?}");
        }
    }

    #[test]
    fn absolute_form_agrees_with_host_and_is_reduced_to_origin_form() {
        let raw = "GET HTTP://Good.Example:80/p?q HTTP/1.1\r\nHost: good.example\r\n\r\n";
        let h = req(raw).expect("valid");
        assert_eq!(h.target.str(raw.as_bytes()), "/p?q");
        assert_eq!(h.path(raw.as_bytes()), "/p");
        let raw = "GET http://good.example HTTP/1.1\r\nHost: good.example\r\n\r\n";
        assert!(req(raw).expect("valid").target.is_empty(), "an empty target stands for /");
        assert_eq!(refused("GET http://a@good.example/ HTTP/1.1\r\nHost: good.example\r\n\r\n"), 400);
    }

    #[test]
    fn upgrades_other_than_websocket_are_dropped_not_relayed() {
        let raw = "GET / HTTP/1.1\r\nHost: a\r\nUpgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\nHTTP2-Settings: x\r\n\r\n";
        let h = req(raw).expect("valid");
        assert!(!h.websocket);
        assert!(
            h.fields.iter().filter(|f| f.forwarded()).all(|f| f.kind == Kind::Host),
            "Upgrade and HTTP2-Settings go"
        );
        let ws = "GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: WebSocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhl\r\nSec-WebSocket-Version: 13\r\n\r\n";
        assert!(req(ws).expect("valid").websocket);
        // Naming the handshake headers in Connection does not strip them.
        let listed = "GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade, Sec-WebSocket-Key\r\nSec-WebSocket-Key: dGhl\r\n\r\n";
        let h = req(listed).expect("valid");
        assert!(
            h.websocket
                && h.fields.iter().any(|f| f.forwarded() && f.name.str(listed.as_bytes()) == "Sec-WebSocket-Key")
        );
    }

    #[test]
    fn framing_and_keep_alive() {
        let h = req("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 005\r\n\r\n").expect("valid");
        assert_eq!(h.framing, Framing::Length(5));
        let h = req("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked\r\n\r\n").expect("valid");
        assert_eq!(h.framing, Framing::Chunked);
        let h = req("GET / HTTP/1.0\r\n\r\n").expect("valid");
        assert!(!h.keep_alive);
        let h = req("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").expect("valid");
        assert!(h.keep_alive);
        let h = req("GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").expect("valid");
        assert!(!h.keep_alive);
        // Connection cannot strip framing or identity headers.
        let raw =
            "POST / HTTP/1.1\r\nHost: a\r\nConnection: Content-Length, X-Forwarded-For\r\nContent-Length: 1\r\n\r\n";
        let h = req(raw).expect("valid");
        assert!(h.fields.iter().any(|f| f.kind == Kind::ContentLength && f.forwarded()));
    }

    #[test]
    fn limits_hold_before_the_head_ends() {
        let big = format!("GET / HTTP/1.1\r\nHost: a\r\nX: {}", "a".repeat(9000));
        assert_eq!(parse_request(big.as_bytes(), LIMITS).expect_err("too large").status(), 431);
        let many: String = (0..101).map(|i| format!("X-{i}: 1\r\n")).collect();
        let raw = format!("GET / HTTP/1.1\r\nHost: a\r\n{many}\r\n");
        assert_eq!(refused(&raw), 431);
        assert!(parse_request(b"GET / HTTP/1.1\r\nHost: a\r\n", LIMITS).expect("partial").is_none());
    }

    #[test]
    fn hosts_follow_the_uri_grammar() {
        for ok in ["a", "a.example:80", "a:", "127.0.0.1:65535", "[::1]", "[::1]:8080", "[::ffff:1.2.3.4]", "x_y~z"] {
            assert!(valid_host(ok.as_bytes()), "{ok}");
        }
        let bad = [
            "",
            "a b",
            ":80",
            "a:b",
            "a:1:2",
            "a:65536",
            "a:-1",
            "a:+1",
            "[::1",
            "[]",
            "[1::2::3]",
            "[::1]x",
            "a/b",
            "a@b",
        ];
        for bad in bad {
            assert!(!valid_host(bad.as_bytes()), "{bad}");
        }
    }

    #[test]
    fn a_request_line_beyond_the_limit_is_414_and_other_large_heads_431() {
        let long = format!("GET /{} HTTP/1.1\r\nHost: a\r\n\r\n", "a".repeat(9000));
        assert_eq!(parse_request(long.as_bytes(), LIMITS).expect_err("too long").status(), 414);
        assert_eq!(parse_request(&long.as_bytes()[..8200], LIMITS).expect_err("too long so far").status(), 414);
        let after_empty_line = format!("\r\n{long}");
        assert_eq!(parse_request(after_empty_line.as_bytes(), LIMITS).expect_err("too long").status(), 414);
        let fields = format!("GET / HTTP/1.1\r\nHost: a\r\nX: {}\r\n\r\n", "a".repeat(9000));
        assert_eq!(parse_request(fields.as_bytes(), LIMITS).expect_err("too large").status(), 431);
    }

    #[test]
    fn bytes_that_cannot_start_a_request_are_refused_before_the_head_ends() {
        for bad in
            [&b"\x16\x03\x01\x02\x00\x01"[..], b"\x00", b" GET", b"\r\n GET", b"GE(T / HTTP/1.1\r\n", b"GET\r\nHost"]
        {
            let got = parse_request(bad, LIMITS);
            assert_eq!(got.expect_err("refused early").status(), 400, "{:?}", String::from_utf8_lossy(bad));
        }
        for fine in [&b""[..], b"\r\n", b"G", b"GET", b"GET /", b"BREW /x HTTP/1.1\r\nHost", b"\r\nget / HTTP/1.1\r\n"]
        {
            assert!(parse_request(fine, LIMITS).expect("may still be a request").is_none(), "{fine:?}");
        }
    }

    #[test]
    fn head_end_finds_both_terminators_across_reads() {
        let raw = b"GET / HTTP/1.1\r\nHost: a\r\n\r\nBODY";
        assert_eq!(head_end(raw, 0), Some(raw.len() - 4));
        assert_eq!(head_end(raw, 26), Some(raw.len() - 4));
        assert_eq!(head_end(b"GET / HTTP/1.1\nHost: a\n\n", 0), Some(24));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: a\r\n", 0), None);
    }

    #[test]
    fn content_length_is_digits_only() {
        assert_eq!(content_length(b"0"), Some(0));
        assert_eq!(content_length(b" 42 "), Some(42));
        for bad in [&b"+5"[..], b"-1", b"5 5", b"", b"0x10", b"1,1", b"18446744073709551616"] {
            assert_eq!(content_length(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn responses_are_framed_strictly() {
        let parse = |raw: &str, m| parse_response(raw.as_bytes(), m, 8192).map(|h| h.expect("complete"));
        let h = parse("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n", Method::Get).expect("ok");
        assert_eq!((h.status, h.framing, h.keep_alive), (200, Framing::Length(3), true));
        let h = parse("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n", Method::Head).expect("ok");
        assert_eq!(h.framing, Framing::Empty);
        let h = parse("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", Method::Get).expect("ok");
        assert_eq!(h.framing, Framing::Chunked);
        let h = parse("HTTP/1.0 200 OK\r\n\r\n", Method::Get).expect("ok");
        assert_eq!((h.framing, h.keep_alive), (Framing::UntilClose, false));
        let h = parse("HTTP/1.1 204 No Content\r\n\r\n", Method::Get).expect("ok");
        assert_eq!(h.framing, Framing::Empty);
        assert!(
            parse("HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", Method::Get).is_err()
        );
        assert!(parse("HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n", Method::Get).is_err());
        let h = parse("HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n", Method::Get).expect("ok");
        assert_eq!(h.framing, Framing::Length(3));
    }
}
