//! The HTTP table: request smuggling shapes, malformed and oversized heads, request lines,
//! Host, Content-Length and chunked framing, Expect, pipelining and non-HTTP bytes on the plain
//! listener. Each case is sent on a fresh connection in one write; the outcome is the statuses
//! answered in order, whether the node closed the connection (an open one must serve one more
//! request), and exactly the requests a recording backend received, so anything smuggled
//! behind a refused or finished request would show.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::json;
use shoal_tests::{TestNode, eventually, get_text};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::{code, shown, still_serves};

/// The node's head limit in this test (`max_header_bytes`).
const LIMIT: usize = 16 * 1024;
/// The node's header timeout in this test.
const HEAD_TIMEOUT: Duration = Duration::from_secs(2);

/// What a case sends.
pub enum Send {
    Raw(&'static [u8]),
    /// Built at run time (too long to write out): what it is, and how to build it.
    Made(&'static str, fn() -> Vec<u8>),
}

impl Send {
    fn bytes(&self) -> Vec<u8> {
        match self {
            Send::Raw(b) => b.to_vec(),
            Send::Made(_, make) => make(),
        }
    }

    fn shown(&self) -> String {
        match self {
            Send::Raw(b) => shown(b),
            Send::Made(what, _) => what.to_string(),
        }
    }
}

/// One hostile request and what must come of it.
pub struct Case {
    pub name: &'static str,
    pub send: Send,
    /// Statuses the client gets, in order (a relayed 100 included).
    pub answers: &'static [u16],
    /// The node closes the connection after them (else it must serve one more request).
    pub closed: bool,
    /// Every request the backend received, as `METHOD target body-bytes` (`-` for a body the
    /// backend did not read; `+trailers` when trailer fields reached it).
    pub backend: &'static [&'static str],
}

const fn refused(name: &'static str, send: &'static [u8], status: u16) -> Case {
    Case { name, send: Send::Raw(send), answers: status_list(status), closed: true, backend: &[] }
}

const fn status_list(status: u16) -> &'static [u16] {
    match status {
        400 => &[400],
        405 => &[405],
        408 => &[408],
        414 => &[414],
        431 => &[431],
        505 => &[505],
        _ => panic!("add the status to status_list"),
    }
}

const fn served(name: &'static str, send: &'static [u8], backend: &'static [&'static str]) -> Case {
    Case { name, send: Send::Raw(send), answers: &[200], closed: false, backend }
}

/// The HTTP cases, in the order they run.
pub const CASES: &[Case] = &[
    // Request smuggling: a request that could be read two ways is refused before any byte of it
    // reaches a backend, and the connection closes so nothing behind it is read.
    refused(
        "CL + TE",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
        400,
    ),
    refused(
        "TE + CL",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
        400,
    ),
    refused(
        "conflicting CL",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        400,
    ),
    refused(
        "duplicate equal CL",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
        400,
    ),
    refused("CL list of equal values", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 5\r\n\r\nhello", 400),
    refused("signed CL", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\nhello", 400),
    refused("negative CL", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", 400),
    refused("empty CL", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: \r\n\r\n", 400),
    refused(
        "CL of 20 digits (past u64)",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 18446744073709551616\r\n\r\nhello",
        400,
    ),
    refused("obs-fold", b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n", 400),
    refused("TE not chunked", b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 400),
    refused(
        "TE chunked twice",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    refused(
        "TE chunked and identity in two fields",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n",
        400,
    ),
    refused(
        "TE identity, chunked",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: identity, chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    refused("TE in HTTP/1.0", b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    refused("bare LF", b"GET / HTTP/1.1\nHost: x\n\n", 400),
    refused("no Host", b"GET / HTTP/1.1\r\n\r\n", 400),
    refused("two Hosts", b"GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", 400),
    refused("absolute-form host mismatch", b"GET http://other.example/ HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    refused("absolute-form with userinfo", b"GET http://u:p@x/ HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    // Bodies: chunk lines the engine cannot read one way are refused (nothing was sent yet:
    // the whole request arrived in one read).
    refused(
        "bad chunk size",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
        400,
    ),
    refused(
        "chunk without CRLF",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n",
        400,
    ),
    refused(
        "chunk extension with LF",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5;a\nb\r\nhello\r\n0\r\n\r\n",
        400,
    ),
    refused("empty chunk size", b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\r\n", 400),
    refused(
        "chunk size of 17 hex digits",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n10000000000000005\r\nhello\r\n0\r\n\r\n",
        400,
    ),
    refused(
        "chunk size with 0x",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n",
        400,
    ),
    refused(
        "negative chunk size",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n",
        400,
    ),
    refused(
        "two sizes on a chunk line",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5 6\r\nhello\r\n0\r\n\r\n",
        400,
    ),
    Case {
        name: "chunk extension over 4 KiB",
        send: Send::Made("a chunked POST whose first chunk line is `5;a=` and 4 200 `b`s", long_chunk_extension),
        answers: &[400],
        closed: true,
        backend: &[],
    },
    refused(
        "NUL in a trailer",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX-T: a\x00b\r\n\r\n",
        400,
    ),
    refused(
        "bare LF in the trailers",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX-T: 1\n\r\n",
        400,
    ),
    // Header syntax.
    refused("space in header name", b"GET / HTTP/1.1\r\nHost: x\r\nX A: b\r\n\r\n", 400),
    refused("space before the colon", b"GET / HTTP/1.1\r\nHost : x\r\n\r\n", 400),
    refused("tab before the colon", b"GET / HTTP/1.1\r\nHost: x\r\nX-A\t: b\r\n\r\n", 400),
    refused("non-token byte in a header name", b"GET / HTTP/1.1\r\nHost: x\r\nX@A: b\r\n\r\n", 400),
    refused("empty header name", b"GET / HTTP/1.1\r\nHost: x\r\n: x\r\n\r\n", 400),
    refused("NUL in a header value", b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n", 400),
    refused("CR alone in a header value", b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\rb\r\n\r\n", 400),
    // Request lines.
    refused("two spaces after the method", b"GET  / HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    refused("space after the version", b"GET / HTTP/1.1 \r\nHost: x\r\n\r\n", 400),
    refused("HTTP/0.9 request line", b"GET /\r\n\r\n", 400),
    refused("HTTP/2.0 in an HTTP/1 request line", b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", 505),
    refused("HTTP/2 prior-knowledge preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505),
    refused("HTTP/3.0", b"GET / HTTP/3.0\r\nHost: x\r\n\r\n", 505),
    refused("HTTP/1.2", b"GET / HTTP/1.2\r\nHost: x\r\n\r\n", 400),
    refused("lowercase version", b"GET / http/1.1\r\nHost: x\r\n\r\n", 400),
    refused("CONNECT", b"CONNECT x:443 HTTP/1.1\r\nHost: x:443\r\n\r\n", 405),
    refused("asterisk-form for GET", b"GET * HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    refused("target without a leading slash", b"GET a/b HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    refused("non-ASCII target", b"GET /\xc3\xa9 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    refused("NUL in the target", b"GET /\x00 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    // Host values (RFC 9112 §3.2: an invalid one is a 400).
    refused("Host with a space", b"GET / HTTP/1.1\r\nHost: x y\r\n\r\n", 400),
    refused("Host with a port out of range", b"GET / HTTP/1.1\r\nHost: x:99999\r\n\r\n", 400),
    refused("Host with a non-numeric port", b"GET / HTTP/1.1\r\nHost: x:y\r\n\r\n", 400),
    refused("Host with two colons", b"GET / HTTP/1.1\r\nHost: x:1:2\r\n\r\n", 400),
    refused("empty Host", b"GET / HTTP/1.1\r\nHost: \r\n\r\n", 400),
    // Upgrades: only a complete WebSocket handshake is relayed; other upgrades are dropped.
    refused(
        "WebSocket without key",
        b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
        400,
    ),
    refused(
        "WebSocket without key, lowercase token",
        b"GET /agent HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
        400,
    ),
    refused(
        "control bytes in Upgrade",
        b"GET /agent HTTP/1.1\r\nHost: x\r\nUpgrade: \x01\x02\r\nConnection: upgrade\r\n\r\n",
        400,
    ),
    refused(
        "WebSocket upgrade on a POST",
        b"POST / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: upgrade\r\nSec-WebSocket-Key: dGhl\r\nContent-Length: 0\r\n\r\n",
        400,
    ),
    refused(
        "Upgrade naming websocket and h2c",
        b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket, h2c\r\nConnection: upgrade\r\nSec-WebSocket-Key: dGhl\r\n\r\n",
        400,
    ),
    served(
        "Upgrade: h2c is dropped, not relayed",
        b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\n",
        &["GET / 0"],
    ),
    // Sizes (the node's limit is 16 KiB of head and 100 fields).
    Case {
        name: "header above the limit",
        send: Send::Made("a GET with a 100 000-byte X-Big header", big_header),
        answers: &[431],
        closed: true,
        backend: &[],
    },
    Case {
        name: "request line above the limit",
        send: Send::Made("`GET /aaa…` with a 100 000-byte target", long_request_line),
        answers: &[414],
        closed: true,
        backend: &[],
    },
    Case {
        name: "head exactly at the limit",
        send: Send::Made("a GET whose head is 16 384 bytes (an X-Pad header fills it)", || head_of(LIMIT)),
        answers: &[200],
        closed: false,
        backend: &["GET / 0"],
    },
    Case {
        name: "head one byte over the limit",
        send: Send::Made("a GET whose head is 16 385 bytes", || head_of(LIMIT + 1)),
        answers: &[431],
        closed: true,
        backend: &[],
    },
    Case {
        name: "100 fields, the limit",
        send: Send::Made("a GET with Host and 99 `X-i: 1` headers", || many_fields(99)),
        answers: &[200],
        closed: false,
        backend: &["GET / 0"],
    },
    Case {
        name: "101 fields",
        send: Send::Made("a GET with Host and 100 `X-i: 1` headers", || many_fields(100)),
        answers: &[431],
        closed: true,
        backend: &[],
    },
    Case {
        name: "too many headers",
        send: Send::Made("a GET with Host and 200 `X-i: 1` headers", || many_fields(200)),
        answers: &[431],
        closed: true,
        backend: &[],
    },
    Case {
        name: "1000 tiny headers",
        send: Send::Made("a GET with Host and 1 000 `X-i: 1` headers", || many_fields(1000)),
        answers: &[431],
        closed: true,
        backend: &[],
    },
    // Bytes that are not HTTP/1 at all: refused at once, not held until the head timeout.
    Case {
        name: "TLS ClientHello on the plain port",
        send: Send::Made("a TLS 1.3 ClientHello record (rustls, SNI x)", client_hello),
        answers: &[400],
        closed: true,
        backend: &[],
    },
    refused("binary garbage", b"\x00\x01\x02\x03\xff\xfe\xfd", 400),
    Case {
        name: "head never finished",
        send: Send::Raw(b"GET / HTTP/1.1\r\nHost: x\r\n"),
        answers: &[408],
        closed: true,
        backend: &[],
    },
    // Accepted oddities: each is served as RFC 9110/9112 reads it, exactly once.
    served("lowercase method is an unknown method", b"get / HTTP/1.1\r\nHost: x\r\n\r\n", &["get / 0"]),
    served("unknown method", b"BREW /pot HTTP/1.1\r\nHost: x\r\n\r\n", &["BREW /pot 0"]),
    Case {
        name: "OPTIONS * matches no pool",
        send: Send::Raw(b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n"),
        answers: &[404],
        closed: false,
        backend: &[],
    },
    served("empty line before the request line", b"\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n", &["GET / 0"]),
    served("absolute-form matching Host", b"GET http://x/p?q=1 HTTP/1.1\r\nHost: x\r\n\r\n", &["GET /p?q=1 0"]),
    served("absolute-form https with its default port", b"GET https://x:443/s HTTP/1.1\r\nHost: x\r\n\r\n", &["GET /s 0"]),
    served("IPv6 literal Host with a port", b"GET / HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n", &["GET / 0"]),
    served("Host with an empty port", b"GET / HTTP/1.1\r\nHost: x:\r\n\r\n", &["GET / 0"]),
    served("CL with leading zeros", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 005\r\n\r\nhello", &["POST / 5"]),
    served(
        "Connection cannot strip Content-Length",
        b"POST / HTTP/1.1\r\nHost: x\r\nConnection: Content-Length\r\nContent-Length: 5\r\n\r\nhello",
        &["POST / 5"],
    ),
    served(
        "chunked body with an extension",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5;name=\"v\"\r\nhello\r\n0\r\n\r\n",
        &["POST / 5"],
    ),
    served(
        "whitespace between chunk size and extension",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5 \t;a=b\r\nhello\r\n0\r\n\r\n",
        &["POST / 5"],
    ),
    served(
        "TE with trailing whitespace",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked \t\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        &["POST / 5"],
    ),
    served(
        "TE after a tab",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding:\tchunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        &["POST / 5"],
    ),
    served(
        "TE Chunked in capitals",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: CHUNKED\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        &["POST / 5"],
    ),
    served(
        "trailers, forbidden fields among them, are dropped",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nContent-Length: 50\r\nHost: evil\r\nX-T: 1\r\n\r\n",
        &["POST / 5"],
    ),
    Case {
        name: "Expect: 100-continue with the body",
        send: Send::Raw(b"POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\nhello"),
        answers: &[100, 200],
        closed: false,
        backend: &["POST / 5"],
    },
    Case {
        name: "Expect: 100-continue answered early with 413",
        send: Send::Raw(b"POST /reject HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n"),
        answers: &[413],
        closed: true,
        backend: &["POST /reject -"],
    },
    // Connections: what follows a request is read only while the connection lives.
    Case {
        name: "two pipelined requests",
        send: Send::Raw(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n"),
        answers: &[200, 200],
        closed: false,
        backend: &["GET /a 0", "GET /b 0"],
    },
    Case {
        name: "nothing after Connection: close is served",
        send: Send::Raw(b"GET /a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"),
        answers: &[200],
        closed: true,
        backend: &["GET /a 0"],
    },
    Case {
        name: "body longer than declared, then a bad head",
        send: Send::Raw(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhelloGARBAGE\r\n\r\n"),
        answers: &[200, 400],
        closed: true,
        backend: &["POST / 5"],
    },
    Case {
        name: "body longer than declared, then binary",
        send: Send::Raw(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello{\"smuggled\": true}"),
        answers: &[200, 400],
        closed: true,
        backend: &["POST / 5"],
    },
    Case {
        name: "HTTP/1.0 without Host",
        send: Send::Raw(b"GET / HTTP/1.0\r\n\r\n"),
        answers: &[200],
        closed: true,
        backend: &["GET / 0"],
    },
    served("HTTP/1.0 keep-alive", b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", &["GET / 0"]),
];

fn long_chunk_extension() -> Vec<u8> {
    let ext = "b".repeat(4200);
    format!("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5;a={ext}\r\nhello\r\n0\r\n\r\n")
        .into_bytes()
}

fn big_header() -> Vec<u8> {
    format!("GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "a".repeat(100_000)).into_bytes()
}

fn long_request_line() -> Vec<u8> {
    format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(100_000)).into_bytes()
}

/// A GET whose head is exactly `len` bytes.
fn head_of(len: usize) -> Vec<u8> {
    let bare = "GET / HTTP/1.1\r\nHost: x\r\nX-Pad: \r\n\r\n".len();
    format!("GET / HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n", "p".repeat(len - bare)).into_bytes()
}

fn many_fields(n: usize) -> Vec<u8> {
    let fields: String = (0..n).map(|i| format!("X-{i}: 1\r\n")).collect();
    format!("GET / HTTP/1.1\r\nHost: x\r\n{fields}\r\n").into_bytes()
}

/// The first flight of a real TLS client.
fn client_hello() -> Vec<u8> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let name = rustls_pki_types::ServerName::try_from("x").expect("name");
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).expect("client");
    let mut out = Vec::new();
    conn.write_tls(&mut out).expect("hello");
    assert_eq!(out.first(), Some(&0x16), "a handshake record");
    out
}

/// A backend that records every request it receives (`/healthz` aside): method, target and
/// the body bytes it read. `/reject` is answered 413 without reading the body.
struct Recorder {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Recorder {
    async fn start() -> Recorder {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let log = log.clone();
                let svc = hyper::service::service_fn(move |req| record(req, log.clone()));
                // Room for the fields the proxy adds to a head at the node's 100-field limit.
                let mut builder = hyper::server::conn::http1::Builder::new();
                builder.max_headers(200);
                tokio::spawn(builder.serve_connection(TokioIo::new(stream), svc));
            }
        });
        Recorder { addr, seen, task }
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().expect("log").clone()
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn record(
    req: hyper::Request<Incoming>,
    log: Arc<Mutex<Vec<String>>>,
) -> Result<hyper::Response<Full<Bytes>>, Infallible> {
    let line = format!("{} {}", req.method(), req.uri());
    let answer = |status: u16, body: &'static str| {
        let mut resp = hyper::Response::new(Full::new(Bytes::from_static(body.as_bytes())));
        *resp.status_mut() = http::StatusCode::from_u16(status).expect("status");
        Ok(resp)
    };
    match req.uri().path() {
        "/healthz" => return answer(200, "ok"),
        "/reject" => {
            log.lock().expect("log").push(format!("{line} -"));
            return answer(413, "too large");
        }
        _ => {}
    }
    let body = match req.into_body().collect().await {
        Ok(c) if c.trailers().is_some() => format!("{} +trailers", c.to_bytes().len()),
        Ok(c) => c.to_bytes().len().to_string(),
        Err(_) => "cut".to_string(),
    };
    log.lock().expect("log").push(format!("{line} {body}"));
    answer(200, "seen")
}

/// A client connection that reads answers one at a time.
struct Client {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    async fn open(addr: SocketAddr) -> Client {
        Client { stream: TcpStream::connect(addr).await.expect("connect"), buf: Vec::new() }
    }

    /// Reads more; false at end of stream, on an error or after 10 s without bytes.
    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 16 * 1024];
        match tokio::time::timeout(Duration::from_secs(10), self.stream.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
            _ => false,
        }
    }

    /// The status of the next complete answer (its body read past by its Content-Length).
    async fn answer(&mut self) -> Option<u16> {
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4) {
                let head = String::from_utf8_lossy(&self.buf[..end]).into_owned();
                let status: u16 = head.split(' ').nth(1)?.parse().ok()?;
                let length = head
                    .lines()
                    .find_map(|l| l.split_once(':').filter(|(n, _)| n.eq_ignore_ascii_case("content-length")))
                    .map_or(0, |(_, v)| v.trim().parse::<usize>().expect("length"));
                let length = if (100..200).contains(&status) { 0 } else { length };
                while self.buf.len() < end + length {
                    if !self.fill().await {
                        return None;
                    }
                }
                self.buf.drain(..end + length);
                return Some(status);
            }
            if !self.fill().await {
                return None;
            }
        }
    }

    /// Whether the node closed the connection with nothing more to say.
    async fn closed(&mut self) -> Result<(), String> {
        if !self.buf.is_empty() {
            return Err(format!("more bytes: {}", shown(&self.buf)));
        }
        let mut rest = [0u8; 256];
        match tokio::time::timeout(Duration::from_secs(5), self.stream.read(&mut rest)).await {
            Ok(Ok(0) | Err(_)) => Ok(()),
            Ok(Ok(n)) => Err(format!("more bytes: {}", shown(&rest[..n]))),
            Err(_) => Err("still open after 5 s".into()),
        }
    }
}

/// Runs one case; returns what went wrong.
async fn run(node: &TestNode, backend: &Recorder, case: &Case) -> Result<(), String> {
    let before = backend.seen().len();
    let mut c = Client::open(node.http()).await;
    c.stream.write_all(&case.send.bytes()).await.map_err(|e| format!("write: {e}"))?;
    let mut answers = Vec::new();
    while answers.len() < case.answers.len() {
        let Some(status) = c.answer().await else { break };
        answers.push(status);
    }
    if answers != case.answers {
        return Err(format!("answers {answers:?}, expected {:?}", case.answers));
    }
    let mut expected: Vec<String> = case.backend.iter().map(|s| s.to_string()).collect();
    if case.closed {
        c.closed().await.map_err(|e| format!("not closed: {e}"))?;
    } else {
        c.stream.write_all(b"GET /again HTTP/1.1\r\nHost: x\r\n\r\n").await.map_err(|e| format!("write: {e}"))?;
        let again = c.answer().await;
        if again != Some(200) {
            return Err(format!("the open connection answered {again:?} to one more request"));
        }
        expected.push("GET /again 0".into());
    }
    let seen = backend.seen()[before..].to_vec();
    if seen != expected {
        return Err(format!("the backend saw {seen:?}, expected {expected:?}"));
    }
    Ok(())
}

/// Every HTTP case, one after another on one node, which serves a normal client after each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_http_case_gets_its_exact_answer_and_nothing_reaches_the_backend_twice() {
    let node = TestNode::start_in("hostile-http", tempfile::tempdir().expect("dir"), |o| {
        o.limits.max_header_bytes = LIMIT;
        o.limits.header_timeout = HEAD_TIMEOUT;
    })
    .await;
    let backend = Recorder::start().await;
    node.put("/v1/pools/web", json!({"pattern": "/", "health": {"interval_ms": 300}})).await;
    node.put(&format!("/v1/pools/web/backends/{}", backend.addr), json!({})).await;
    eventually(Duration::from_secs(10), "serving", || async {
        get_text(node.http(), "/").await.ok().filter(|(s, _)| s.is_success())
    })
    .await;
    let mut failed = Vec::new();
    for case in CASES {
        if let Err(e) = run(&node, &backend, case).await {
            failed.push(format!("{}: {e}\n    sent {}", case.name, case.send.shown()));
        }
        still_serves(&node).await;
    }
    assert!(failed.is_empty(), "{} of {} HTTP cases failed:\n{}", failed.len(), CASES.len(), failed.join("\n"));
    node.stop().await;
}

/// The table as rows for the case list: family, name, what is sent, outcome.
pub fn rows() -> Vec<[String; 4]> {
    CASES
        .iter()
        .map(|c| {
            let statuses: Vec<String> = c.answers.iter().map(u16::to_string).collect();
            let conn = if c.closed { "closed" } else { "kept open" };
            let saw = if c.backend.is_empty() { "nothing".to_string() } else { c.backend.join(", ") };
            let outcome = format!("{}; {conn}; backend saw {saw}", statuses.join(" then "));
            let sent = match &c.send {
                Send::Raw(b) => code(b),
                Send::Made(what, _) => what.to_string(),
            };
            ["HTTP".to_string(), c.name.to_string(), sent, outcome]
        })
        .collect()
}
