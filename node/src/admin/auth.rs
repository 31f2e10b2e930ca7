//! Who may use the admin API: a bearer token, compared in constant time. `GET /` (the status
//! page's static HTML, which carries no data), `/healthz` and `/readyz` (a status and nothing
//! else, for probes) are always served; `/metrics` only when the node runs with
//! `--public-metrics`. A missing or wrong token gets a bare 401 (gRPC: `UNAUTHENTICATED`).

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use super::json::ApiError;
use crate::node::NodeShared;

/// Reads the token in `path`, or creates the file with a fresh random token (mode 0600). A
/// token file group or others may read is refused.
pub fn load_or_create_token(path: &Path) -> Result<String, String> {
    match crate::files::read_secret(path) {
        Ok(text) if text.trim().len() >= 16 => Ok(text.trim().to_string()),
        Ok(_) => Err("the token must be at least 16 characters".into()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let token: String = crate::control::secure::hex(&rand::random::<[u8; 32]>());
            write_secret(path, &token).map_err(|e| e.to_string())?;
            Ok(token)
        }
        Err(e) => Err(e.to_string()),
    }
}

/// Writes a secret readable by its owner only.
pub fn write_secret(path: &Path, secret: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut f = options.open(path)?;
    f.write_all(secret.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()
}

fn is_public(node: &NodeShared, path: &str) -> bool {
    matches!(path, "/" | "/healthz" | "/readyz") || (node.public_metrics && path == "/metrics")
}

/// Whether an `Authorization` value carries the node's bearer token; a refusal is counted.
pub fn bearer_ok(node: &NodeShared, header: Option<&str>) -> bool {
    let presented = header.and_then(|v| v.strip_prefix("Bearer ")).map(str::trim).unwrap_or("");
    let ok = bool::from(presented.as_bytes().ct_eq(node.admin_token.as_bytes()));
    if !ok {
        node.metrics.rejected_inputs.with_label_values(&["admin_auth"]).inc();
    }
    ok
}

/// Axum middleware: lets a request through only with the node's bearer token.
pub async fn require_token(State(node): State<Arc<NodeShared>>, req: Request, next: Next) -> Response {
    if is_public(&node, req.uri().path()) {
        return next.run(req).await;
    }
    if bearer_ok(&node, req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok())) {
        return next.run(req).await;
    }
    let mut resp = ApiError(StatusCode::UNAUTHORIZED, "unauthorized".into()).into_response();
    resp.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_created_private_and_then_reused() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("sub/admin.token");
        let first = load_or_create_token(&path).expect("create");
        assert_eq!(first.len(), 64);
        assert_eq!(load_or_create_token(&path).expect("read"), first);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        std::fs::write(&path, "short").expect("write");
        assert!(load_or_create_token(&path).is_err());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::write(&path, "a-long-enough-token-0123").expect("write");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).expect("chmod");
            let err = load_or_create_token(&path).expect_err("group-readable");
            assert!(err.contains("0640") && err.contains("chmod 600"), "{err}");
        }
    }
}
