//! shoal-tests: the harness the black-box tests share: in-process nodes on loopback, mock
//! backends (HTTP, TCP echo, heartbeat speakers), a tiny HTTP client and polling helpers.
//! Every wait is bounded; timeouts are generous so the tests pass on a loaded 2-core machine.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use shoal_node::cli::client::AdminClient;
use shoal_node::node::{self, NodeHandle, NodeOptions};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::JoinHandle;

pub mod cluster;
pub mod grpc;

pub use shoal_node;
pub use shoal_proto;

/// Loopback, where every test's traffic stays.
pub const LOCALHOST: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

/// A TCP port free at the time of asking.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind((LOCALHOST, 0)).and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

/// A UDP port free at the time of asking.
pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind((LOCALHOST, 0)).and_then(|s| s.local_addr()).map(|a| a.port()).expect("free udp port")
}

/// Resident set size of process `pid` in KiB, from `/proc/<pid>/status` (0 where unreadable).
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// A node running in this process, with its data directory.
pub struct TestNode {
    pub handle: NodeHandle,
    pub dir: tempfile::TempDir,
    pub admin: AdminClient,
}

impl TestNode {
    /// Starts a node on 127.0.0.1 with ephemeral admin and HTTP ports.
    pub async fn start(id: &str) -> TestNode {
        let dir = tempfile::tempdir().expect("temp dir");
        Self::start_in(id, dir, |_| {}).await
    }

    /// Starts a node in `dir`, letting the caller adjust its options.
    pub async fn start_in(id: &str, dir: tempfile::TempDir, adjust: impl FnOnce(&mut NodeOptions)) -> TestNode {
        if std::env::var_os("SHOAL_TEST_LOG").is_some() {
            shoal_node::cli::init_logging(shoal_node::cli::LogFormat::Human);
        }
        let mut opts = NodeOptions::local(id, LOCALHOST, dir.path().to_path_buf());
        adjust(&mut opts);
        let tls_ca = opts.admin_tls.as_ref().map(|files| files.cert.clone());
        let handle = node::start(opts).await.expect("node starts");
        // The node's admin token: the fixed one, or the token file's first admin token.
        let token = handle.admin_token.clone();
        let mut admin =
            AdminClient::new(&handle.admin_addr().to_string()).expect("admin client").with_token(Some(token));
        if let Some(ca) = tls_ca {
            admin = admin.with_ca(Some(&ca)).expect("admin TLS client");
        }
        TestNode { handle, dir, admin }
    }

    pub fn http(&self) -> SocketAddr {
        self.handle.http_addr().expect("http listener bound")
    }

    pub fn https(&self) -> SocketAddr {
        self.handle.shared.https_addr().expect("https listener bound")
    }

    /// `PUT path` with a JSON body; panics on a non-2xx answer.
    pub async fn put(&self, path: &str, body: Value) -> Value {
        self.admin.call(Method::PUT, path, Some(body)).await.unwrap_or_else(|e| panic!("PUT {path}: {e:#}"))
    }

    pub async fn delete(&self, path: &str) -> Value {
        self.admin.call(Method::DELETE, path, None).await.unwrap_or_else(|e| panic!("DELETE {path}: {e:#}"))
    }

    pub async fn get(&self, path: &str) -> Value {
        self.admin.get(path).await.unwrap_or_else(|e| panic!("GET {path}: {e:#}"))
    }

    /// Status and JSON body of any admin call (with the node's token).
    pub async fn call(&self, method: Method, path: &str, body: Option<&str>) -> (StatusCode, Value) {
        let body = body.map(|b| b.as_bytes().to_vec()).unwrap_or_default();
        let (status, bytes) = self.admin.raw_bytes(method, path, body).await.expect("admin answers");
        (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }

    pub fn token(&self) -> &str {
        &self.handle.admin_token
    }

    /// Stops the node, keeping its data directory for a restart.
    pub async fn stop(self) -> tempfile::TempDir {
        self.handle.shutdown().await;
        self.dir
    }
}

/// An HTTP answer.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One HTTP/1.1 request on a fresh connection.
pub async fn raw_http(addr: SocketAddr, method: Method, path: &str, body: Option<Vec<u8>>) -> anyhow::Result<Answer> {
    let stream = TcpStream::connect(addr).await?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, addr.to_string())
        .body(Full::new(Bytes::from(body.unwrap_or_default())))?;
    let resp = tokio::time::timeout(Duration::from_secs(20), send.send_request(req)).await??;
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok(Answer { status, headers, body })
}

/// `GET path` through a proxy: status and body as text.
pub async fn get_text(addr: SocketAddr, path: &str) -> anyhow::Result<(StatusCode, String)> {
    let answer = raw_http(addr, Method::GET, path, None).await?;
    Ok((answer.status, answer.text()))
}

/// Polls `check` every 50 ms until it returns `Some` or `within` passes.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {within:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A demo HTTP backend (`/healthz` → ok, answers name itself) running in this process.
pub struct HttpBackend {
    pub addr: SocketAddr,
    pub name: String,
    pub healthy: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

impl HttpBackend {
    pub async fn start(name: &str) -> HttpBackend {
        Self::start_at(name, SocketAddr::new(LOCALHOST, 0)).await
    }

    pub async fn start_at(name: &str, addr: SocketAddr) -> HttpBackend {
        let listener = TcpListener::bind(addr).await.expect("bind backend");
        let addr = listener.local_addr().expect("addr");
        let healthy = Arc::new(AtomicBool::new(true));
        let task = tokio::spawn(shoal_node::demo::serve_http(listener, name.to_string(), healthy.clone()));
        HttpBackend { addr, name: name.to_string(), healthy, task }
    }

    /// Stops accepting and drops the listener (connections in flight end with the task).
    pub fn kill(&self) {
        self.task.abort();
    }
}

impl Drop for HttpBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A TCP echo server.
pub struct EchoBackend {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl EchoBackend {
    pub async fn start() -> EchoBackend {
        let listener = TcpListener::bind((LOCALHOST, 0)).await.expect("bind echo");
        let addr = listener.local_addr().expect("addr");
        EchoBackend { addr, task: tokio::spawn(shoal_node::demo::serve_echo(listener)) }
    }

    pub fn kill(&self) {
        self.task.abort();
    }
}

impl Drop for EchoBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A seed 004 backend: TCP echo plus the heartbeat protocol towards `targets`.
pub struct HeartbeatBackend {
    pub tcp: SocketAddr,
    pub udp: SocketAddr,
    echo: JoinHandle<()>,
    beats: JoinHandle<()>,
}

impl HeartbeatBackend {
    pub async fn start(targets: Vec<SocketAddr>, secret: Option<String>) -> HeartbeatBackend {
        Self::start_named(targets, secret, None).await
    }

    /// A heartbeat backend whose echo first sends `banner` and a newline.
    pub async fn start_named(
        targets: Vec<SocketAddr>,
        secret: Option<String>,
        banner: Option<&str>,
    ) -> HeartbeatBackend {
        let listener = TcpListener::bind((LOCALHOST, 0)).await.expect("bind tcp");
        let socket = UdpSocket::bind((LOCALHOST, 0)).await.expect("bind udp");
        let (tcp, udp) = (listener.local_addr().expect("tcp"), socket.local_addr().expect("udp"));
        let beats =
            tokio::spawn(shoal_node::demo::heartbeats(socket, tcp, udp, targets, Duration::from_millis(200), secret));
        let echo = tokio::spawn(shoal_node::demo::serve_echo_with_banner(listener, banner.map(str::to_string)));
        HeartbeatBackend { tcp, udp, echo, beats }
    }

    /// Stops heartbeats only (the TCP side keeps answering).
    pub fn silence(&self) {
        self.beats.abort();
    }
}

impl Drop for HeartbeatBackend {
    fn drop(&mut self) {
        self.echo.abort();
        self.beats.abort();
    }
}

/// Writes a secret file owner-only (mode 0600), as nodes require of keys and tokens.
pub fn write_private(path: &std::path::Path, text: &str) {
    shoal_node::files::write_atomic(path, text.as_bytes(), 0o600)
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// A self-signed certificate for `names`, written to `dir` as `<stem>.pem` / `<stem>.key`.
pub fn write_cert(dir: &std::path::Path, stem: &str, names: &[&str]) -> shoal_node::dataplane::tls::CertFiles {
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let (cert, key) = shoal_node::dataplane::tls::self_signed(&names).expect("self-signed");
    let files = shoal_node::dataplane::tls::CertFiles {
        cert: dir.join(format!("{stem}.pem")),
        key: dir.join(format!("{stem}.key")),
    };
    std::fs::write(&files.cert, cert).expect("write cert");
    write_private(&files.key, &key);
    files
}

/// A TLS client that trusts exactly the certificates in `ca_pem`.
pub fn tls_client(ca_pem: &std::path::Path) -> tokio_rustls::TlsConnector {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_file_iter(ca_pem).expect("read ca") {
        roots.add(cert.expect("pem")).expect("add ca");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// WebSocket client streams used by the tests.
pub type Ws<S> = tokio_tungstenite::WebSocketStream<S>;

/// A completed WebSocket handshake: the stream and the server's response.
pub type WsOpened<S> = (Ws<S>, http::Response<Option<Vec<u8>>>);

/// Opens a WebSocket to `path` over `stream`, with extra request headers.
pub async fn ws_over<S>(stream: S, url: &str, headers: &[(&str, &str)]) -> WsOpened<S>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    try_ws_over(stream, url, headers).await.expect("websocket handshake")
}

/// Like [`ws_over`], but a refused handshake is an error to retry on, not a panic.
pub async fn try_ws_over<S>(
    stream: S,
    url: &str,
    headers: &[(&str, &str)],
) -> Result<WsOpened<S>, tokio_tungstenite::tungstenite::Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = url.into_client_request().expect("ws request");
    for (k, v) in headers {
        req.headers_mut().insert(http::HeaderName::from_bytes(k.as_bytes()).expect("name"), v.parse().expect("value"));
    }
    tokio_tungstenite::client_async(req, stream).await
}

/// Sends a text message and expects it echoed.
pub async fn ws_echo<S>(ws: &mut Ws<S>, text: &str)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    ws.send(Message::text(text.to_string())).await.expect("ws send");
    let got = tokio::time::timeout(Duration::from_secs(10), ws.next()).await.expect("ws answer in time");
    assert_eq!(got.expect("ws open").expect("ws frame"), Message::text(text.to_string()));
}
