//! Admin API handlers. Reads answer from this node's applied state; writes become commands.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State as AxState};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use shoal_proto::admin::{ClusterView, NodeView, PoolHealth, WriteResult};
use shoal_proto::{BackendSpec, CheckKind, Command, Pool, PoolSpec, State};

use super::json::{ApiError, Body};
use crate::health::probe;
use crate::node::NodeShared;
use crate::reconcile;
use crate::shutdown::Phase;

type Node = AxState<Arc<NodeShared>>;

pub async fn healthz(AxState(node): Node) -> Response {
    if node.shutdown.phase() == Phase::Running {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response()
    }
}

pub async fn metrics(AxState(node): Node) -> Response {
    node.refresh_gauges();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], node.metrics.render()).into_response()
}

pub async fn state(AxState(node): Node) -> Json<Arc<State>> {
    Json(node.state())
}

pub async fn list_pools(AxState(node): Node) -> Json<Vec<Pool>> {
    Json(node.state().pools.values().cloned().collect())
}

pub async fn get_pool(AxState(node): Node, Path(pool): Path<String>) -> Result<Json<Pool>, ApiError> {
    node.state().pools.get(&pool).cloned().map(Json).ok_or_else(|| no_pool(&pool))
}

pub async fn put_pool(
    AxState(node): Node,
    Path(pool): Path<String>,
    Body(spec): Body<PoolSpec>,
) -> Result<Json<WriteResult>, ApiError> {
    write(&node, Command::PutPool { name: pool, spec }).await
}

pub async fn delete_pool(AxState(node): Node, Path(pool): Path<String>) -> Result<Json<WriteResult>, ApiError> {
    write(&node, Command::DeletePool { name: pool }).await
}

pub async fn pool_health(AxState(node): Node, Path(pool): Path<String>) -> Result<Json<PoolHealth>, ApiError> {
    let state = node.state();
    let p = state.pools.get(&pool).ok_or_else(|| no_pool(&pool))?;
    let health = node.health.borrow().clone();
    Ok(Json(reconcile::pool_health(p, &health, &node.table.load())))
}

/// Body of `PUT /v1/pools/{pool}/backends/{addr}`: the backend's settings plus `force`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackendRequest {
    url_path: Option<String>,
    weight: Option<u32>,
    zone: Option<String>,
    drain: Option<bool>,
    heartbeat_addr: Option<SocketAddr>,
    /// Add even if the first health check fails.
    force: bool,
}

impl BackendRequest {
    fn into_spec(self, existing: Option<&BackendSpec>) -> (BackendSpec, bool) {
        let base = existing.cloned().unwrap_or_default();
        let spec = BackendSpec {
            url_path: self.url_path.unwrap_or(base.url_path),
            weight: self.weight.unwrap_or(base.weight),
            zone: self.zone.unwrap_or(base.zone),
            drain: self.drain.unwrap_or(base.drain),
            heartbeat_addr: self.heartbeat_addr.or(base.heartbeat_addr),
        };
        (spec, self.force)
    }
}

pub async fn put_backend(
    AxState(node): Node,
    Path((pool, addr)): Path<(String, String)>,
    Body(req): Body<BackendRequest>,
) -> Result<Json<WriteResult>, ApiError> {
    let addr = parse_addr(&addr)?;
    let state = node.state();
    let p = state.pools.get(&pool).ok_or_else(|| no_pool(&pool))?;
    let existing = p.backends.get(&addr.to_string()).map(|b| &b.spec);
    let (spec, force) = req.into_spec(existing);
    if existing.is_none() && !force {
        first_check(p, addr).await?;
    }
    write(&node, Command::PutBackend { pool, addr, spec }).await
}

/// Seed 003: a backend that fails its first health check is not added (unless forced).
async fn first_check(pool: &Pool, addr: SocketAddr) -> Result<(), ApiError> {
    let kind = pool.spec.check();
    if !matches!(kind, CheckKind::Http | CheckKind::Tcp) {
        return Ok(());
    }
    probe::probe(kind, addr, &pool.spec.health).await.map_err(|reason| {
        ApiError(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("backend {addr} failed its first health check ({reason}); fix it, or add it with force=true"),
        )
    })
}

pub async fn delete_backend(
    AxState(node): Node,
    Path((pool, addr)): Path<(String, String)>,
) -> Result<Json<WriteResult>, ApiError> {
    let addr = parse_addr(&addr)?;
    write(&node, Command::DeleteBackend { pool, addr }).await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrainRequest {
    drain: bool,
}

impl Default for DrainRequest {
    fn default() -> Self {
        DrainRequest { drain: true }
    }
}

pub async fn drain_backend(
    AxState(node): Node,
    Path((pool, addr)): Path<(String, String)>,
    Body(req): Body<DrainRequest>,
) -> Result<Json<WriteResult>, ApiError> {
    let addr = parse_addr(&addr)?;
    write(&node, Command::SetDrain { pool, addr, drain: req.drain }).await
}

pub async fn cluster(AxState(node): Node) -> Json<ClusterView> {
    let state = node.state();
    let me = NodeView {
        id: node.id.clone(),
        admin: node.admin_addr.to_string(),
        cluster: None,
        http: node.http_addr().map(|a| a.to_string()),
        zone: node.zone.clone(),
        live: true,
        ready: node.shutdown.phase() == Phase::Running,
        role: "leader".into(),
        voter: true,
    };
    Json(ClusterView {
        node: node.id.clone(),
        leader: Some(node.id.clone()),
        term: 1,
        commit_index: state.version,
        applied_index: state.version,
        config_version: state.version,
        nodes: vec![me],
    })
}

async fn write(node: &NodeShared, cmd: Command) -> Result<Json<WriteResult>, ApiError> {
    node.metrics.proposals.inc();
    match node.store.propose(cmd).await {
        Ok(applied) => Ok(Json(WriteResult { version: applied.version })),
        Err(e) => {
            node.metrics.proposal_failures.inc();
            Err(e.into())
        }
    }
}

fn parse_addr(raw: &str) -> Result<SocketAddr, ApiError> {
    raw.parse().map_err(|_| ApiError::bad_request(format!("{raw:?} is not an ip:port backend address")))
}

fn no_pool(pool: &str) -> ApiError {
    ApiError::not_found(format!("pool {pool:?} does not exist"))
}
