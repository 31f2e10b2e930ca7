//! Active probes: a TCP connect, or an HTTP `GET` whose trimmed body must be one of the
//! accepted values (seed 003: `ok`), optionally with a 2xx status. To a pool that sends the
//! PROXY protocol, a probe starts with a v2 LOCAL (v1 UNKNOWN) header: a backend requiring
//! the header accepts it, and reads the connection as the proxy's own.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use shoal_proto::proxy::{self, Version};
use shoal_proto::{CheckKind, HealthSpec};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Largest health body read; anything longer fails the check.
const MAX_BODY: usize = 4096;

/// TLS settings of a probe to a `backend_tls` pool: client config and the name to verify.
pub type ProbeTls = (Arc<rustls::ClientConfig>, Option<String>);

/// Why a check failed. The `Display` text is the reason operators see (the view's `reasons`,
/// the admin API's refusal of a backend failing its first check), so it stays word for word.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("no answer within {0} ms")]
    Timeout(u64),
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("PROXY header: {0}")]
    ProxyHeader(std::io::Error),
    #[error("TLS: {0}")]
    Tls(std::io::Error),
    #[error("handshake: {0}")]
    Handshake(hyper::Error),
    /// The request could not be built (a path `http` refuses).
    #[error("request: {0}")]
    BadRequest(http::Error),
    #[error("request: {0}")]
    Request(hyper::Error),
    /// Reading the body failed, or it exceeded [`MAX_BODY`].
    #[error("body: {0}")]
    Body(Box<dyn std::error::Error + Send + Sync>),
    /// `require_2xx` and the status is not 2xx.
    #[error("status {0}")]
    Status(u16),
    /// The trimmed body (its first 40 characters) is none of the accepted values.
    #[error("status {status}, body {body:?} is not one of {expect:?}")]
    UnexpectedBody { status: u16, body: String, expect: Vec<String> },
}

/// Runs one check of `kind` against `addr`.
pub async fn probe(
    kind: CheckKind,
    addr: SocketAddr,
    spec: &HealthSpec,
    tls: Option<&ProbeTls>,
    proxy: Option<Version>,
) -> Result<(), ProbeError> {
    let timeout = Duration::from_millis(spec.timeout_ms);
    let run = async {
        match kind {
            CheckKind::Tcp => connect(addr, proxy).await.map(drop),
            CheckKind::Http => http_probe(addr, spec, tls, proxy).await,
            CheckKind::Heartbeat | CheckKind::None => Ok(()),
        }
    };
    match tokio::time::timeout(timeout, run).await {
        Ok(r) => r,
        Err(_) => Err(ProbeError::Timeout(spec.timeout_ms)),
    }
}

/// A connection to `addr`, with the LOCAL header written when the pool sends the protocol.
async fn connect(addr: SocketAddr, proxy: Option<Version>) -> Result<TcpStream, ProbeError> {
    let mut stream = TcpStream::connect(addr).await.map_err(ProbeError::Connect)?;
    if let Some(version) = proxy {
        stream.write_all(&proxy::encode(version, None)).await.map_err(ProbeError::ProxyHeader)?;
    }
    Ok(stream)
}

async fn http_probe(
    addr: SocketAddr,
    spec: &HealthSpec,
    tls: Option<&ProbeTls>,
    proxy: Option<Version>,
) -> Result<(), ProbeError> {
    let stream = connect(addr, proxy).await?;
    let _ = stream.set_nodelay(true);
    match tls {
        None => http_exchange(TokioIo::new(stream), addr, spec).await,
        Some((config, name)) => {
            let server = crate::dataplane::tls::backend_name(name.as_deref(), addr.ip());
            let tls_stream = tokio_rustls::TlsConnector::from(config.clone())
                .connect(server, stream)
                .await
                .map_err(ProbeError::Tls)?;
            http_exchange(TokioIo::new(tls_stream), addr, spec).await
        }
    }
}

async fn http_exchange<T>(io: TokioIo<T>, addr: SocketAddr, spec: &HealthSpec) -> Result<(), ProbeError>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut send, conn) =
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(io).await.map_err(ProbeError::Handshake)?;
    let conn_task = tokio::spawn(conn);
    let req = http::Request::get(spec.path.as_str())
        .header(http::header::HOST, addr.to_string())
        .header(http::header::USER_AGENT, "shoal-health/1")
        .header(http::header::CONNECTION, "close")
        .body(Empty::new())
        .map_err(ProbeError::BadRequest)?;
    let result = async {
        let resp = send.send_request(req).await.map_err(ProbeError::Request)?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), MAX_BODY).collect().await.map_err(ProbeError::Body)?.to_bytes();
        judge(spec, status.as_u16(), &body)
    }
    .await;
    conn_task.abort();
    result
}

/// Seed 003 ignores the status code; `require_2xx` adds that condition.
pub fn judge(spec: &HealthSpec, status: u16, body: &[u8]) -> Result<(), ProbeError> {
    if spec.require_2xx && !(200..300).contains(&status) {
        return Err(ProbeError::Status(status));
    }
    if spec.expect.is_empty() {
        return Ok(());
    }
    let text = String::from_utf8_lossy(body);
    let trimmed = text.trim();
    if spec.expect.iter().any(|e| e == trimmed) {
        Ok(())
    } else {
        let body = trimmed.chars().take(40).collect();
        Err(ProbeError::UnexpectedBody { status, body, expect: spec.expect.clone() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn judges_like_the_seed() {
        let spec = HealthSpec::default();
        assert!(judge(&spec, 200, b"ok\n").is_ok());
        assert!(judge(&spec, 500, b" OK ").is_ok(), "the seed ignores the status");
        assert!(judge(&spec, 200, b"okay").is_err());
        let strict = HealthSpec { require_2xx: true, ..HealthSpec::default() };
        assert!(judge(&strict, 503, b"ok").is_err());
        let any = HealthSpec { expect: vec![], ..HealthSpec::default() };
        assert!(judge(&any, 200, b"whatever").is_ok());
    }

    #[test]
    fn reasons_read_as_before() {
        let strict = HealthSpec { require_2xx: true, ..HealthSpec::default() };
        let status = judge(&strict, 503, b"ok").unwrap_err();
        assert!(matches!(status, ProbeError::Status(503)));
        assert_eq!(status.to_string(), "status 503");
        let body = judge(&HealthSpec::default(), 200, b" nope \n").unwrap_err();
        assert!(matches!(&body, ProbeError::UnexpectedBody { status: 200, body, .. } if body == "nope"));
        assert_eq!(body.to_string(), r#"status 200, body "nope" is not one of ["ok", "OK"]"#);
        assert_eq!(ProbeError::Timeout(1000).to_string(), "no answer within 1000 ms");
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(ProbeError::Connect(refused).to_string(), "connect: connection refused");
    }

    #[tokio::test]
    async fn a_closed_port_fails_to_connect() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        let err = probe(CheckKind::Tcp, addr, &HealthSpec::default(), None, None).await.unwrap_err();
        assert!(matches!(err, ProbeError::Connect(_)), "{err}");
    }
}
