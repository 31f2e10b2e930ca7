//! A small HTTP/1.1 client for the admin API, used by the CLI verbs and `shoal dev`: plain
//! HTTP, or HTTPS verified against a CA file (`--admin-ca`) or the system bundle.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow};
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use serde::de::DeserializeOwned;
use shoal_proto::admin::ErrorBody;
use tokio::net::TcpStream;

/// Talks to one node's admin API.
#[derive(Clone, Debug)]
pub struct AdminClient {
    /// `host:port`.
    authority: String,
    timeout: Duration,
    token: Option<String>,
    /// `https://` was asked for.
    https: bool,
    /// TLS to the admin listener: the client configuration and the name to verify.
    tls: Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>,
}

/// An answer that was not 2xx.
#[derive(Debug, thiserror::Error)]
#[error("{status}: {message}")]
pub struct ApiFailure {
    pub status: StatusCode,
    pub message: String,
}

impl AdminClient {
    /// Accepts `http://host:port`, `https://host:port` (then call [`AdminClient::with_ca`]),
    /// `host:port` or a bare `:port`.
    pub fn new(admin: &str) -> anyhow::Result<AdminClient> {
        let https = admin.starts_with("https://");
        let rest = admin.strip_prefix("https://").or_else(|| admin.strip_prefix("http://")).unwrap_or(admin);
        let authority = rest.trim_end_matches('/');
        let authority =
            if authority.starts_with(':') { format!("127.0.0.1{authority}") } else { authority.to_string() };
        if authority.is_empty() || authority.contains('/') {
            return Err(anyhow!("--admin: {admin:?} is not http://host:port"));
        }
        Ok(AdminClient { authority, timeout: Duration::from_secs(30), token: None, https, tls: None })
    }

    /// Whether the address asked for `https://`.
    pub fn is_https(&self) -> bool {
        self.https
    }

    /// Speaks TLS, verifying the node's certificate against `ca` (PEM) or the system bundle,
    /// for the host named in the address.
    pub fn with_ca(mut self, ca: Option<&std::path::Path>) -> anyhow::Result<AdminClient> {
        let config = crate::dataplane::tls::client_config(ca).map_err(|e| anyhow!("--admin-ca: {e}"))?;
        let host = host_of(&self.authority);
        let name = ServerName::try_from(host.to_string())
            .map_err(|_| anyhow!("--admin: {host:?} is not a name a certificate can be checked against"))?;
        self.https = true;
        self.tls = Some((config, name));
        Ok(self)
    }

    /// Sends `Authorization: Bearer <token>` with every request.
    pub fn with_token(mut self, token: Option<String>) -> AdminClient {
        self.token = token;
        self
    }

    /// How long a call may take (the default is 30 s).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    pub fn authority(&self) -> &str {
        &self.authority
    }

    /// Sends a request; returns the status and body.
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<(StatusCode, Bytes)> {
        let bytes = body.map(|b| serde_json::to_vec(&b)).transpose()?.unwrap_or_default();
        self.raw_bytes(method, path, bytes).await
    }

    /// Sends a request with an arbitrary body (tests of malformed input use it).
    pub async fn raw_bytes(&self, method: Method, path: &str, bytes: Vec<u8>) -> anyhow::Result<(StatusCode, Bytes)> {
        let fut = self.exchange(method, path, bytes);
        tokio::time::timeout(self.timeout, fut)
            .await
            .map_err(|_| anyhow!("no answer from {} within {:?}", self.authority, self.timeout))?
    }

    async fn exchange(&self, method: Method, path: &str, bytes: Vec<u8>) -> anyhow::Result<(StatusCode, Bytes)> {
        let stream = TcpStream::connect(&self.authority)
            .await
            .with_context(|| format!("cannot reach the admin API at {}", self.authority))?;
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, &self.authority)
            .header(http::header::CONTENT_TYPE, "application/json");
        if let Some(t) = &self.token {
            req = req.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let req = req.body(Full::new(Bytes::from(bytes)))?;
        match (&self.tls, self.https) {
            (Some((config, name)), _) => {
                let tls = tokio_rustls::TlsConnector::from(config.clone())
                    .connect(name.clone(), stream)
                    .await
                    .with_context(|| format!("TLS with the admin API at {}", self.authority))?;
                send(TokioIo::new(tls), req).await
            }
            (None, true) => Err(anyhow!("https:// needs a CA (AdminClient::with_ca)")),
            (None, false) => send(TokioIo::new(stream), req).await,
        }
    }

    /// Sends a request and decodes a 2xx JSON answer; other answers become [`ApiFailure`].
    pub async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<T> {
        let (status, bytes) = self.raw(method, path, body).await?;
        if !status.is_success() {
            let message = serde_json::from_slice::<ErrorBody>(&bytes)
                .map(|e| e.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).trim().to_string());
            return Err(ApiFailure { status, message }.into());
        }
        serde_json::from_slice(&bytes).with_context(|| format!("unexpected answer from {path}"))
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.call(Method::GET, path, None).await
    }
}

/// One request on a fresh HTTP/1.1 connection over `io`.
async fn send<I>(io: I, req: Request<Full<Bytes>>) -> anyhow::Result<(StatusCode, Bytes)>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(conn);
    let resp = sender.send_request(req).await?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, body))
}

/// The host of `host:port` or `[v6]:port`.
fn host_of(authority: &str) -> &str {
    let host = authority.rsplit_once(':').map_or(authority, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}
