//! A small HTTP/1.1 client for the admin API, used by the CLI verbs and `shoal dev`.

use std::time::Duration;

use anyhow::{Context, anyhow};
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
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
}

/// An answer that was not 2xx.
#[derive(Debug, thiserror::Error)]
#[error("{status}: {message}")]
pub struct ApiFailure {
    pub status: StatusCode,
    pub message: String,
}

impl AdminClient {
    /// Accepts `http://host:port`, `host:port` or a bare `:port`.
    pub fn new(admin: &str) -> anyhow::Result<AdminClient> {
        let rest = admin.strip_prefix("http://").unwrap_or(admin);
        if admin.starts_with("https://") {
            return Err(anyhow!("--admin: https is not supported by the CLI; use http://"));
        }
        let authority = rest.trim_end_matches('/');
        let authority =
            if authority.starts_with(':') { format!("127.0.0.1{authority}") } else { authority.to_string() };
        if authority.is_empty() || authority.contains('/') {
            return Err(anyhow!("--admin: {admin:?} is not http://host:port"));
        }
        Ok(AdminClient { authority, timeout: Duration::from_secs(30), token: None })
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
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, &self.authority)
            .header(http::header::CONTENT_TYPE, "application/json");
        if let Some(t) = &self.token {
            req = req.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let req = req.body(Full::new(Bytes::from(bytes)))?;
        let resp = send.send_request(req).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok((status, body))
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
