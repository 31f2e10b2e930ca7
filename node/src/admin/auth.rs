//! Who may use the admin API: a bearer token (see [`super::tokens`] for the file and its
//! scopes), compared in constant time. `GET /` (the status
//! page's static HTML, which carries no data), `/healthz` and `/readyz` (a status and nothing
//! else, for probes) are always served; `/metrics` only when the node runs with
//! `--public-metrics`. A missing or wrong token gets a bare 401 (gRPC: `UNAUTHENTICATED`); a
//! known token whose scope does not cover the call gets a 403 JSON error (gRPC:
//! `PERMISSION_DENIED`). Authentication wraps the whole router, so unknown paths answer 401
//! too; the scope check runs after routing, on the matched route and its `{pool}`.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use axum::extract::rejection::RawPathParamsRejection;
use axum::extract::{MatchedPath, RawPathParams, Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::NodeApi;
use super::json::ApiError;
use super::tokens::Scope;

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

fn is_public(node: &NodeApi, path: &str) -> bool {
    matches!(path, "/" | "/healthz" | "/readyz") || (node.public_metrics && path == "/metrics")
}

/// The scope of the token in an `Authorization: Bearer` value; an unknown or missing token is
/// counted and gets `None`.
pub fn authenticate(node: &NodeApi, header: Option<&str>) -> Option<Scope> {
    let presented = header.and_then(|v| v.strip_prefix("Bearer ")).map(str::trim).unwrap_or("");
    let scope = if presented.is_empty() { None } else { node.tokens.scope_of(presented) };
    if scope.is_none() {
        node.metrics.rejected_inputs.with_label_values(&["admin_auth"]).inc();
    }
    scope
}

/// Axum middleware (outer): a request without a known token gets a bare 401; a known one
/// carries its [`Scope`] on to [`require_scope`].
pub async fn require_token(State(node): State<Arc<NodeApi>>, mut req: Request, next: Next) -> Response {
    if is_public(&node, req.uri().path()) {
        req.extensions_mut().insert(Public);
        return next.run(req).await;
    }
    match authenticate(&node, req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok())) {
        Some(scope) => {
            req.extensions_mut().insert(scope);
            next.run(req).await
        }
        None => {
            let mut resp = ApiError(StatusCode::UNAUTHORIZED, "unauthorized".into()).into_response();
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
            resp
        }
    }
}

/// Marks a request to an endpoint served without a token.
#[derive(Clone, Copy, Debug)]
struct Public;

/// Axum route middleware (inner, after routing): a token whose scope does not cover the
/// matched route gets a 403 JSON error.
pub async fn require_scope(
    State(node): State<Arc<NodeApi>>,
    route: MatchedPath,
    params: Result<RawPathParams, RawPathParamsRejection>,
    req: Request,
    next: Next,
) -> Response {
    if req.extensions().get::<Public>().is_some() {
        return next.run(req).await;
    }
    let pool = params.as_ref().ok().and_then(|p| p.iter().find(|(k, _)| *k == "pool").map(|(_, v)| v));
    let scope = req.extensions().get::<Scope>().cloned();
    match scope {
        Some(scope) if allows(&scope, req.method(), route.as_str(), pool) => next.run(req).await,
        other => {
            node.metrics.rejected_inputs.with_label_values(&["admin_scope"]).inc();
            let name = other.as_ref().map_or("no", Scope::name);
            let what = format!("{} {}", req.method(), req.uri().path());
            ApiError(StatusCode::FORBIDDEN, format!("a {name} token may not {what}")).into_response()
        }
    }
}

/// Seed 002's join (`shoal backend join`) and leave (`shoal backend leave`) routes.
const JOIN_ROUTES: &[(Method, &str)] =
    &[(Method::PUT, "/v1/pools/{pool}/backends/{addr}"), (Method::POST, "/v1/pools/{pool}/backends/{addr}/leave")];

/// Whether `scope` may call `method` on the route pattern `route` (for `pool`, if any).
pub fn allows(scope: &Scope, method: &Method, route: &str, pool: Option<&str>) -> bool {
    match scope {
        Scope::Admin => true,
        Scope::Read => *method == Method::GET || *method == Method::HEAD,
        Scope::Join(pools) => {
            JOIN_ROUTES.iter().any(|(m, r)| m == method && *r == route)
                && pool.is_some_and(|p| pools.iter().any(|allowed| allowed == p))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::tokens::load_or_create;

    #[test]
    fn tokens_are_created_private_and_then_reused() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("sub/admin.token");
        let first = load_or_create(&path).expect("create").current().first_admin().expect("admin").to_string();
        assert_eq!(first.len(), 64);
        assert_eq!(load_or_create(&path).expect("read").current().first_admin(), Some(first.as_str()));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        std::fs::write(&path, "short").expect("write");
        assert!(load_or_create(&path).is_err());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::write(&path, "a-long-enough-token-0123").expect("write");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).expect("chmod");
            let err = load_or_create(&path).expect_err("group-readable").to_string();
            assert!(err.contains("0640") && err.contains("chmod 600"), "{err}");
        }
    }

    #[test]
    fn scopes_cover_their_routes_only() {
        let backend = "/v1/pools/{pool}/backends/{addr}";
        let leave = "/v1/pools/{pool}/backends/{addr}/leave";
        let join = Scope::Join(vec!["web".into()]);
        assert!(allows(&Scope::Admin, &Method::DELETE, "/v1/pools/{pool}", Some("web")));
        assert!(allows(&Scope::Read, &Method::GET, "/v1/pools", None));
        assert!(!allows(&Scope::Read, &Method::PUT, backend, Some("web")));
        assert!(!allows(&Scope::Read, &Method::POST, "/v1/tls/reload", None));
        assert!(allows(&join, &Method::PUT, backend, Some("web")));
        assert!(allows(&join, &Method::POST, leave, Some("web")));
        assert!(!allows(&join, &Method::PUT, backend, Some("api")), "another pool");
        assert!(!allows(&join, &Method::DELETE, backend, Some("web")), "remove is not leave");
        assert!(!allows(&join, &Method::GET, "/v1/pools", None), "not even reads");
        assert!(!allows(&join, &Method::PUT, "/v1/pools/{pool}", Some("web")));
        let member = "/v1/cluster/nodes/{id}";
        assert!(allows(&Scope::Admin, &Method::DELETE, member, None));
        assert!(!allows(&Scope::Read, &Method::DELETE, member, None), "removing a member is an admin's call");
        assert!(!allows(&join, &Method::DELETE, member, None));
    }
}
