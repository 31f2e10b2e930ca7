//! The admin API: JSON over HTTP/1.1 (axum) for pools, backends, health, cluster view and
//! metrics, and seed 003's gRPC control API over h2c on the same socket. A request whose
//! content type is `application/grpc*` goes to the gRPC routes, anything else to the JSON
//! router, so every gRPC caller gets a gRPC-shaped answer. It listens on its own socket and
//! shares nothing with the data plane's connection limits. With `--admin-tls-cert/-key` the
//! socket speaks TLS (h2 or HTTP/1.1 by ALPN, see `tls`); tokens and their scopes are in
//! `tokens` and `auth`. What it needs of the node is the narrow [`NodeApi`] handle (see
//! `handle`), which the node builds; this module never imports the node module.

mod api;
pub mod auth;
pub mod grpc;
mod handle;
mod json;
mod tls;
pub mod tokens;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::routing::{MethodRouter, any, delete, get, post, put};
use tokio::net::TcpListener;
use tower::ServiceExt;

pub use handle::{NodeApi, NodeStatus};
pub use json::ApiError;

use crate::shutdown::{Phase, Shutdown};

/// Builds the admin service over a node's handle: gRPC by content type, else JSON.
pub fn router(node: Arc<NodeApi>) -> Router {
    let json = json_router(node.clone());
    let grpc = grpc::router(node);
    Router::new().fallback_service(tower::service_fn(move |req: axum::extract::Request| {
        let to = if grpc::is_grpc(&req) { grpc.clone() } else { json.clone() };
        to.oneshot(req)
    }))
}

/// The JSON API behind the bearer-token middleware.
fn json_router(node: Arc<NodeApi>) -> Router {
    Router::new()
        .route("/", get(api::status_page))
        .route("/v1/stats", get(api::stats))
        .route("/healthz", get(api::healthz))
        .route("/readyz", get(api::readyz))
        .route("/metrics", get(api::metrics))
        .route("/v1/state", get(api::state))
        .route("/v1/cluster", get(api::cluster))
        .route("/v1/cluster/probes", get(api::probes))
        .route("/v1/cluster/revoke", post(api::revoke))
        .route("/v1/cluster/nodes/{id}", delete(api::remove_node))
        .route("/v1/pools", get(api::list_pools))
        .route("/v1/pools/{pool}", get(api::get_pool).put(api::put_pool).delete(api::delete_pool))
        .route("/v1/pools/{pool}/health", get(api::pool_health))
        .route("/v1/pools/{pool}/pick", get(api::pick))
        .route("/v1/pools/{pool}/backends/{addr}", put(api::put_backend).delete(api::delete_backend))
        .route("/v1/pools/{pool}/backends/{addr}/drain", put(api::drain_backend))
        .route("/v1/pools/{pool}/backends/{addr}/leave", post(api::leave_backend))
        .route("/v1/tls/reload", post(api::tls_reload))
        .route("/v1/access-log/reopen", post(api::access_log_reopen))
        .route("/v1/debug/clock", fault_route(&node, put(api::set_clock)))
        .fallback(|| async { ApiError(StatusCode::NOT_FOUND, "no such endpoint".into()) })
        .method_not_allowed_fallback(|| async {
            ApiError(StatusCode::METHOD_NOT_ALLOWED, "method not allowed here".into())
        })
        .route_layer(axum::middleware::from_fn_with_state(node.clone(), auth::require_scope))
        .layer(DefaultBodyLimit::max(json::MAX_BODY))
        .layer(axum::middleware::from_fn_with_state(node.clone(), auth::require_token))
        .with_state(node)
}

/// A fault-injection route: `handler` with `--fault-injection`, else a 404 for every method.
fn fault_route(node: &NodeApi, handler: MethodRouter<Arc<NodeApi>>) -> MethodRouter<Arc<NodeApi>> {
    if node.fault_injection { handler } else { any(api::fault_injection_off) }
}

/// Serves the admin API on `listener` until the node is fully stopped.
pub async fn serve(listener: TcpListener, node: Arc<NodeApi>, mut shutdown: Shutdown) {
    if node.grpc_allow_unauthenticated {
        tracing::warn!(
            admin = %node.admin_addr,
            "--grpc-allow-unauthenticated: gRPC calls without the admin token can change pools and backends"
        );
    }
    let tls = node.admin_tls.clone();
    let app = router(node);
    let stop = async move { shutdown.wait_for(Phase::Stopped).await };
    if let Some(store) = tls {
        return tls::serve(listener, app, tls::AdminTls::new(store), stop).await;
    }
    if let Err(e) = axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
        .with_graceful_shutdown(stop)
        .await
    {
        tracing::error!(error = %e, "admin server failed");
    }
}
