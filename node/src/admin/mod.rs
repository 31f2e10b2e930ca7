//! The admin API (axum, JSON): pools, backends, health, cluster view, metrics. It listens on
//! its own socket and shares nothing with the data plane's connection limits.

mod api;
pub mod auth;
mod json;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::routing::{get, post, put};
use tokio::net::TcpListener;

pub use json::ApiError;

use crate::node::NodeShared;
use crate::shutdown::{Phase, Shutdown};

/// Builds the router over a node's shared state.
pub fn router(node: Arc<NodeShared>) -> Router {
    Router::new()
        .route("/", get(api::status_page))
        .route("/v1/stats", get(api::stats))
        .route("/healthz", get(api::healthz))
        .route("/metrics", get(api::metrics))
        .route("/v1/state", get(api::state))
        .route("/v1/cluster", get(api::cluster))
        .route("/v1/cluster/probes", get(api::probes))
        .route("/v1/pools", get(api::list_pools))
        .route("/v1/pools/{pool}", get(api::get_pool).put(api::put_pool).delete(api::delete_pool))
        .route("/v1/pools/{pool}/health", get(api::pool_health))
        .route("/v1/pools/{pool}/pick", get(api::pick))
        .route("/v1/pools/{pool}/backends/{addr}", put(api::put_backend).delete(api::delete_backend))
        .route("/v1/pools/{pool}/backends/{addr}/drain", put(api::drain_backend))
        .route("/v1/pools/{pool}/backends/{addr}/leave", post(api::leave_backend))
        .route("/v1/tls/reload", post(api::tls_reload))
        .fallback(|| async { ApiError(StatusCode::NOT_FOUND, "no such endpoint".into()) })
        .method_not_allowed_fallback(|| async {
            ApiError(StatusCode::METHOD_NOT_ALLOWED, "method not allowed here".into())
        })
        .layer(DefaultBodyLimit::max(json::MAX_BODY))
        .layer(axum::middleware::from_fn_with_state(node.clone(), auth::require_token))
        .with_state(node)
}

/// Serves the admin API on `listener` until the node is fully stopped.
pub async fn serve(listener: TcpListener, node: Arc<NodeShared>, mut shutdown: Shutdown) {
    let app = router(node);
    let stop = async move { shutdown.wait_for(Phase::Stopped).await };
    if let Err(e) = axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
        .with_graceful_shutdown(stop)
        .await
    {
        tracing::error!(error = %e, "admin server failed");
    }
}
