//! `shoal demo-backend`: stand-in backends for demos and tests. HTTP mode answers `/healthz`
//! with `ok` (switchable to `fail`), names itself in every answer (with the client identity
//! headers it received), echoes request bodies and serves `/bytes/N`. TCP mode echoes bytes
//! and speaks seed 004's heartbeat protocol (authenticated with `--secret` for pools with a
//! `heartbeat_secret`).

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use clap::Args;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use shoal_proto::heartbeat::{self, Datagram};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio_rustls::TlsAcceptor;

use crate::dataplane::tls::{CertFiles, TlsStore};

#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// HTTP mode: address to serve on.
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Name reported in answers (default: the listen address).
    #[arg(long)]
    pub name: Option<String>,
    /// TCP mode: echo server address (announced in heartbeats).
    #[arg(long, requires = "udp")]
    pub tcp: Option<SocketAddr>,
    /// TCP mode: UDP address heartbeats are sent from.
    #[arg(long, requires = "tcp")]
    pub udp: Option<SocketAddr>,
    /// Heartbeat sockets of the balancer nodes (comma separated).
    #[arg(long, value_delimiter = ',')]
    pub heartbeat_to: Vec<SocketAddr>,
    /// Milliseconds between `OK` heartbeats.
    #[arg(long, default_value_t = 500)]
    pub interval_ms: u64,
    /// The pool's heartbeat secret: answers the balancer's nonce and signs every keepalive.
    #[arg(long)]
    pub secret: Option<String>,
    /// TCP mode: a line sent first on every connection (tells which backend answered).
    #[arg(long)]
    pub banner: Option<String>,
    /// HTTP mode: serve TLS with this certificate (PEM)…
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// …and this key.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
}

/// Serves as `args` say until an error (the CLI runs it until Ctrl-C).
pub async fn serve(args: DemoArgs) -> anyhow::Result<()> {
    match (args.listen, args.tcp, args.udp) {
        (Some(listen), _, _) => {
            let listener = TcpListener::bind(listen).await?;
            let name = args.name.unwrap_or_else(|| listen.to_string());
            let tls = match (&args.tls_cert, &args.tls_key) {
                (Some(cert), Some(key)) => {
                    let files = CertFiles { cert: cert.clone(), key: key.clone() };
                    let store = TlsStore::load(vec![files]).map_err(|e| anyhow::anyhow!(e))?;
                    Some(TlsAcceptor::from(store.current()))
                }
                _ => None,
            };
            tracing::info!(%listen, %name, tls = tls.is_some(), "demo HTTP backend listening");
            serve_http_on(listener, name, Arc::new(AtomicBool::new(true)), tls).await;
            Ok(())
        }
        (None, Some(tcp), Some(udp)) => {
            let listener = TcpListener::bind(tcp).await?;
            let socket = UdpSocket::bind(udp).await?;
            tracing::info!(%tcp, %udp, targets = ?args.heartbeat_to, "demo TCP echo backend with heartbeats");
            let hb = heartbeats(
                socket,
                tcp,
                udp,
                args.heartbeat_to.clone(),
                Duration::from_millis(args.interval_ms),
                args.secret.clone(),
            );
            tokio::select! {
                _ = serve_echo_with_banner(listener, args.banner.clone()) => {}
                _ = hb => {}
            }
            Ok(())
        }
        _ => anyhow::bail!("give --listen ADDR (HTTP) or --tcp ADDR --udp ADDR (TCP echo with heartbeats)"),
    }
}

/// Serves the demo HTTP backend; `healthy` switches `/healthz` between `ok` and `fail`.
pub async fn serve_http(listener: TcpListener, name: String, healthy: Arc<AtomicBool>) {
    serve_http_on(listener, name, healthy, None).await
}

/// Like [`serve_http`], behind TLS when `tls` is given (a `wss://` gateway stand-in).
pub async fn serve_http_on(listener: TcpListener, name: String, healthy: Arc<AtomicBool>, tls: Option<TlsAcceptor>) {
    let name: Arc<str> = name.into();
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let _ = stream.set_nodelay(true);
        let (name, healthy, tls) = (name.clone(), healthy.clone(), tls.clone());
        tokio::spawn(async move {
            match tls {
                None => serve_conn(stream, name, healthy).await,
                Some(acceptor) => {
                    if let Ok(s) = acceptor.accept(stream).await {
                        serve_conn(s, name, healthy).await;
                    }
                }
            }
        });
    }
}

async fn serve_conn<S>(stream: S, name: Arc<str>, healthy: Arc<AtomicBool>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |req| answer(req, name.clone(), healthy.clone()));
    let conn = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).with_upgrades();
    let _ = conn.await;
}

type DemoBody = BoxBody<Bytes, hyper::Error>;

fn full(data: impl Into<Bytes>) -> DemoBody {
    Full::new(data.into()).map_err(|never: Infallible| match never {}).boxed()
}

async fn answer(
    req: Request<Incoming>,
    name: Arc<str>,
    healthy: Arc<AtomicBool>,
) -> Result<Response<DemoBody>, Infallible> {
    let path = req.uri().path().to_string();
    let resp = match (req.method().as_str(), path.as_str()) {
        _ if is_websocket(&req) => websocket_echo(req),
        (_, "/healthz") => Response::new(full(if healthy.load(Ordering::Relaxed) { "ok\n" } else { "fail\n" })),
        ("POST", "/_demo/health") => {
            let fail = req.uri().query().is_some_and(|q| q.contains("fail"));
            healthy.store(!fail, Ordering::Relaxed);
            Response::new(full("switched\n"))
        }
        (_, p) if p.starts_with("/bytes/") => {
            let n: usize = p["/bytes/".len()..].parse().unwrap_or(0).min(64 << 20);
            Response::new(full(vec![b'x'; n]))
        }
        ("POST" | "PUT", _) => Response::new(req.into_body().boxed()),
        _ => {
            let all = |name: &str| {
                let values: Vec<&str> = req.headers().get_all(name).iter().filter_map(|v| v.to_str().ok()).collect();
                if values.is_empty() { "-".to_string() } else { values.join(" | ") }
            };
            let (xff, real, fwd) = (all("x-forwarded-for"), all("x-real-ip"), all("forwarded"));
            Response::new(full(format!("hello from {name} path={path} xff={xff} real-ip={real} forwarded={fwd}\n")))
        }
    };
    let mut resp = resp;
    if let Ok(v) = http::HeaderValue::from_str(&name) {
        resp.headers_mut().insert("x-backend", v);
    }
    if path == "/missing" {
        *resp.status_mut() = StatusCode::NOT_FOUND;
    }
    Ok(resp)
}

fn is_websocket(req: &Request<Incoming>) -> bool {
    req.headers()
        .get(http::header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

/// Accepts a WebSocket and echoes every data message; pings are answered by tungstenite.
fn websocket_echo(mut req: Request<Incoming>) -> Response<DemoBody> {
    let Some(key) = req.headers().get("sec-websocket-key").cloned() else {
        let mut r = Response::new(full("missing Sec-WebSocket-Key\n"));
        *r.status_mut() = StatusCode::BAD_REQUEST;
        return r;
    };
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else { return };
        let ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            TokioIo::new(upgraded),
            tokio_tungstenite::tungstenite::protocol::Role::Server,
            None,
        )
        .await;
        echo_messages(ws).await;
    });
    let mut resp = Response::new(full(Bytes::new()));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(http::header::UPGRADE, http::HeaderValue::from_static("websocket"));
    h.insert(http::header::CONNECTION, http::HeaderValue::from_static("Upgrade"));
    if let Ok(v) = http::HeaderValue::from_str(&accept) {
        h.insert("sec-websocket-accept", v);
    }
    resp
}

async fn echo_messages<S>(mut ws: tokio_tungstenite::WebSocketStream<S>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    while let Some(Ok(msg)) = ws.next().await {
        let reply = match msg {
            Message::Text(_) | Message::Binary(_) => msg,
            Message::Close(frame) => {
                let _ = ws.close(frame).await;
                return;
            }
            _ => continue,
        };
        if ws.send(reply).await.is_err() {
            return;
        }
    }
}

/// Echoes every byte back until the client closes.
pub async fn serve_echo(listener: TcpListener) {
    serve_echo_with_banner(listener, None).await
}

/// Like [`serve_echo`], first sending `banner` and a newline on every connection.
pub async fn serve_echo_with_banner(listener: TcpListener, banner: Option<String>) {
    let banner: Option<Arc<str>> = banner.map(Into::into);
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        tokio::spawn(echo(stream, banner.clone()));
    }
}

async fn echo(mut stream: TcpStream, banner: Option<Arc<str>>) {
    if let Some(b) = banner
        && stream.write_all(format!("{b}\n").as_bytes()).await.is_err()
    {
        return;
    }
    let (mut r, mut w) = stream.split();
    let _ = tokio::io::copy(&mut r, &mut w).await;
    let _ = w.shutdown().await;
}

/// One balancer as a heartbeat backend sees it.
#[derive(Default)]
struct Link {
    /// The nonce our last signed identification answered (authenticated pools).
    answered: Option<String>,
    /// Set once the balancer said `OK`: the nonce keepalives are keyed to, and their counter.
    registered: Option<(Option<String>, u64)>,
}

/// The backend side of the heartbeat protocol: identify each second until acknowledged, then
/// `OK` every interval; identify again when a balancer answers `AUTH`. With a secret, answer the
/// balancer's `NONCE` with a signed identification and sign every keepalive with a fresh counter.
pub async fn heartbeats(
    socket: UdpSocket,
    tcp: SocketAddr,
    udp: SocketAddr,
    targets: Vec<SocketAddr>,
    interval: Duration,
    secret: Option<String>,
) {
    let mut links: HashMap<SocketAddr, Link> = targets.iter().map(|t| (*t, Link::default())).collect();
    let mut tick = tokio::time::interval(interval.min(Duration::from_secs(1)));
    let mut last_id = tokio::time::Instant::now() - Duration::from_secs(10);
    let mut buf = [0u8; 512];
    let plain_id = heartbeat::encode_id(tcp, udp, None);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let identify_due = last_id.elapsed() >= Duration::from_secs(1);
                for (target, link) in &mut links {
                    if let Some((nonce, counter)) = &mut link.registered {
                        *counter += 1;
                        let beat = match (secret.as_deref(), nonce.as_deref()) {
                            (Some(s), Some(n)) => heartbeat::encode_ok(*counter, &crate::health::heartbeat::ok_mac(s, n, *counter)),
                            _ => heartbeat::OK.to_vec(),
                        };
                        let _ = socket.send_to(&beat, target).await;
                    } else if identify_due {
                        let _ = socket.send_to(&plain_id, target).await;
                    }
                }
                if identify_due {
                    last_id = tokio::time::Instant::now();
                }
            }
            got = socket.recv_from(&mut buf) => {
                let Ok((n, from)) = got else { continue };
                let Some(link) = links.get_mut(&from) else { continue };
                match heartbeat::decode(&buf[..n]) {
                    Ok(Datagram::Ok) if link.registered.is_none() => {
                        link.registered = Some((link.answered.take(), 0));
                        tracing::info!(balancer = %from, "balancer acknowledged our identification");
                    }
                    Ok(Datagram::Nonce(nonce)) if link.registered.is_none() => {
                        let Some(s) = secret.as_deref() else {
                            tracing::warn!(balancer = %from, "balancer wants a signed identification; give --secret");
                            continue;
                        };
                        let token = crate::health::heartbeat::answer_nonce(s, nonce, tcp, udp);
                        link.answered = Some(nonce.to_string());
                        let _ = socket.send_to(&heartbeat::encode_id(tcp, udp, Some(&token)), from).await;
                    }
                    Ok(Datagram::Auth) => {
                        tracing::info!(balancer = %from, "balancer asked us to identify again");
                        *link = Link::default();
                        let _ = socket.send_to(&plain_id, from).await;
                    }
                    _ => {}
                }
            }
        }
    }
}
