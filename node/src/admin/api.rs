//! Admin API handlers. Reads answer from this node's applied state; writes become commands.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Path, Query, State as AxState};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;
use shoal_proto::admin::{ClusterView, NodeView, PoolHealth, RemovedNode, WriteResult};
use shoal_proto::{Applied, BackendSpec, Command, Pool, PoolSpec, State};

use super::NodeApi;
use super::json::{ApiError, Body};
use super::tokens::Scope;
use crate::control::ProposeError;
use crate::control::gossip::Members;
use crate::control::membership;
use crate::control::raft::{RaftStatus, ShoalNode};
use crate::health::probe;
use crate::reconcile;
use crate::shutdown::Phase;

type Node = AxState<Arc<NodeApi>>;

/// `GET /healthz`: liveness. The process is alive and its admin runtime answers; it stays `ok`
/// while the node starts and drains, so a supervisor never restarts a node for being unready.
pub async fn healthz() -> Response {
    (StatusCode::OK, "ok\n").into_response()
}

/// `GET /readyz`: readiness to take traffic. 503 while starting (no leader, log not applied,
/// config sources or health verdicts pending) and once draining has begun.
pub async fn readyz(AxState(node): Node) -> Response {
    match (node.shutdown.phase(), node.is_ready()) {
        (Phase::Running, true) => (StatusCode::OK, "ready\n").into_response(),
        (Phase::Running, false) => (StatusCode::SERVICE_UNAVAILABLE, "starting\n").into_response(),
        _ => (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response(),
    }
}

/// `GET /`: the live status page (self-contained HTML, refreshing every 2 s).
pub async fn status_page() -> Response {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], include_str!("status.html")).into_response()
}

/// `GET /v1/stats`: this node's counters per pool (the status page turns them into rates).
pub async fn stats(AxState(node): Node) -> Json<serde_json::Value> {
    let table = node.table.load();
    let pools: serde_json::Map<String, serde_json::Value> = table
        .pools
        .iter()
        .map(|p| {
            let (requests, errors) = p.metrics.totals();
            let active: u64 = p.shared.values().map(|s| s.limits.active()).sum();
            let v = serde_json::json!({
                "requests": requests,
                "errors": errors,
                "bytes_in": p.metrics.bytes_in.get(),
                "bytes_out": p.metrics.bytes_out.get(),
                "active": active,
            });
            (p.name.clone(), v)
        })
        .collect();
    Json(serde_json::json!({ "node": node.id, "pools": pools }))
}

pub async fn metrics(AxState(node): Node) -> Response {
    node.refresh_gauges().await;
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], node.metrics.render()).into_response()
}

/// `?consistent=true` turns a read into a linearizable one.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReadQuery {
    #[serde(default)]
    consistent: bool,
}

/// The state to answer a read from: local, or after a read barrier through the leader.
async fn read_state(node: &NodeApi, q: &ReadQuery) -> Result<Arc<State>, ApiError> {
    if q.consistent {
        node.raft.linearize().await?;
    }
    Ok(node.state())
}

pub async fn state(
    AxState(node): Node,
    Extension(scope): Extension<Scope>,
    Query(q): Query<ReadQuery>,
) -> Result<Json<State>, ApiError> {
    let state = read_state(&node, &q).await?;
    let pools = state.pools.iter().map(|(name, p)| (name.clone(), visible(&scope, p))).collect();
    Ok(Json(State { version: state.version, pools, revoked_certs: state.revoked_certs.clone() }))
}

pub async fn list_pools(
    AxState(node): Node,
    Extension(scope): Extension<Scope>,
    Query(q): Query<ReadQuery>,
) -> Result<Json<Vec<Pool>>, ApiError> {
    Ok(Json(read_state(&node, &q).await?.pools.values().map(|p| visible(&scope, p)).collect()))
}

pub async fn get_pool(
    AxState(node): Node,
    Extension(scope): Extension<Scope>,
    Path(pool): Path<String>,
    Query(q): Query<ReadQuery>,
) -> Result<Json<Pool>, ApiError> {
    read_state(&node, &q).await?.pools.get(&pool).map(|p| Json(visible(&scope, p))).ok_or_else(|| no_pool(&pool))
}

/// What a token may see of a pool: a read token does not get the heartbeat secret (it would
/// let its holder register backends).
fn visible(scope: &Scope, pool: &Pool) -> Pool {
    let mut pool = pool.clone();
    if *scope != Scope::Admin && pool.spec.health.heartbeat_secret.is_some() {
        pool.spec.health.heartbeat_secret = Some(REDACTED.into());
    }
    pool
}

/// Stands for a secret in answers to tokens that may not see it.
pub const REDACTED: &str = "redacted";

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
    Ok(Json(reconcile::pool_health(p, &health, &node.table.load(), &node.remote_counts())))
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
    slot: Option<u32>,
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
            slot: self.slot.or(base.slot),
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
        first_check(&node, p, addr).await.map_err(|reason| {
            ApiError(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("backend {addr} failed its first health check ({reason}); fix it, or add it with force=true"),
            )
        })?;
    }
    write(&node, Command::PutBackend { pool, addr, spec }).await
}

/// Seed 003: a backend that fails its first health check is not added (unless forced). Runs the
/// pool's check once from this node; `Err` is the reason.
pub(super) async fn first_check(node: &NodeApi, pool: &Pool, addr: SocketAddr) -> Result<(), probe::ProbeError> {
    let kind = pool.spec.check();
    if !kind.is_active() {
        return Ok(());
    }
    let tls = match (pool.spec.backend_tls, node.backend_tls.clone()) {
        (true, Some(c)) => Some((c, pool.spec.backend_tls_name.clone())),
        _ => None,
    };
    probe::probe(kind, addr, &pool.spec.health, tls.as_ref(), pool.spec.send_proxy).await
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

/// Body of `POST /v1/pools/{pool}/backends/{addr}/leave`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LeaveRequest {
    /// Seconds to wait for established connections before removing the backend anyway.
    drain_timeout_s: u64,
}

impl Default for LeaveRequest {
    fn default() -> Self {
        LeaveRequest { drain_timeout_s: 30 }
    }
}

/// Seed 002's stopProxy: drain (no new work), wait until no node has work in flight on the
/// backend (or the timeout), then remove it.
pub async fn leave_backend(
    AxState(node): Node,
    Path((pool, addr)): Path<(String, String)>,
    Body(req): Body<LeaveRequest>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let addr = parse_addr(&addr)?;
    if req.drain_timeout_s > 86_400 {
        return Err(ApiError::bad_request("drain_timeout_s: at most 86400"));
    }
    let _drained = write(&node, Command::SetDrain { pool: pool.clone(), addr, drain: true }).await?;
    let started = tokio::time::Instant::now();
    let deadline = started + std::time::Duration::from_secs(req.drain_timeout_s);
    let left = wait_drained(&node, &pool, addr, deadline).await;
    let removed = write(&node, Command::DeleteBackend { pool, addr }).await?;
    Ok(Json(serde_json::json!({
        "version": removed.0.version,
        "drained": left == 0,
        "active_left": left,
        "waited_ms": started.elapsed().as_millis() as u64,
    })))
}

/// Polls cluster-wide work in flight until it has been zero for two gossip rounds.
async fn wait_drained(node: &NodeApi, pool: &str, addr: SocketAddr, deadline: tokio::time::Instant) -> u64 {
    let id = (pool.to_string(), addr);
    let mut quiet = 0;
    loop {
        let local =
            node.table.load().pool(pool).and_then(|p| p.shared.get(&addr)).map(|s| s.limits.active()).unwrap_or(0);
        let remote = node.remote_counts().get(&id).map(|c| c.active).unwrap_or(0);
        let active = local + remote;
        quiet = if active == 0 { quiet + 1 } else { 0 };
        if quiet >= 4 || tokio::time::Instant::now() >= deadline {
            return active;
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
}

/// Body of `POST /v1/cluster/revoke`: a node certificate's serial and the node it names.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RevokeRequest {
    serial: String,
    node: String,
}

/// `POST /v1/cluster/revoke`: every node refuses this certificate on the cluster port from
/// now on (established connections included); the leader removes a member that presents it.
pub async fn revoke(AxState(node): Node, Body(req): Body<RevokeRequest>) -> Result<Json<WriteResult>, ApiError> {
    write(&node, Command::RevokeCert { serial: req.serial.to_ascii_lowercase().replace(':', ""), node: req.node }).await
}

/// `DELETE /v1/cluster/nodes/{id}`: removes a member (name or Raft id) from the Raft
/// membership now, instead of after `--dead-voter-grace`. Refused (409) while it is live in
/// gossip or when the voters left would lack a live majority; 404 when it is no member.
/// Answers once the change is committed; a follower has the leader decide and make it.
pub async fn remove_node(AxState(node): Node, Path(id): Path<String>) -> Result<Json<RemovedNode>, ApiError> {
    Ok(Json(membership::remove(&node.raft, || node.members(), &id).await?))
}

/// Body of `PUT /v1/debug/clock`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClockRequest {
    offset_ms: Option<i64>,
}

/// `PUT /v1/debug/clock` (`--fault-injection` only): moves this node's wall clock `offset_ms`
/// from the system clock (0: back to it); answers the offset in force.
pub async fn set_clock(Body(req): Body<ClockRequest>) -> Result<Json<serde_json::Value>, ApiError> {
    let ms = req.offset_ms.ok_or_else(|| ApiError::bad_request("the body must be {\"offset_ms\": <integer>}"))?;
    crate::clock::set_offset_ms(ms).map_err(|e| ApiError::bad_request(e.to_string()))?;
    tracing::warn!(offset_ms = ms, "fault injection: this node's wall clock moved");
    Ok(Json(serde_json::json!({ "offset_ms": crate::clock::offset_ms() })))
}

/// Every fault-injection route of a node started without `--fault-injection`.
pub async fn fault_injection_off() -> ApiError {
    ApiError::not_found(
        "fault injection is off: only a node started with --fault-injection (chaos tests only) serves this",
    )
}

/// `POST /v1/tls/reload`: reloads this node's certificate files now.
pub async fn tls_reload(AxState(node): Node) -> Result<Json<serde_json::Value>, ApiError> {
    let store = node.tls.as_ref().ok_or_else(|| ApiError::not_found("this node has no HTTPS listener"))?;
    store.reload().map_err(|e| {
        ApiError(StatusCode::UNPROCESSABLE_ENTITY, format!("reload failed, previous certificates stay: {e}"))
    })?;
    let files: Vec<String> = store.files().iter().map(|f| f.cert.display().to_string()).collect();
    Ok(Json(serde_json::json!({ "reloaded": true, "certificates": files })))
}

/// `POST /v1/access-log/reopen`: reopens the access log file (after logrotate moved it).
pub async fn access_log_reopen(AxState(node): Node) -> Result<Json<serde_json::Value>, ApiError> {
    let log = node.access_log.clone().ok_or_else(|| ApiError::not_found("this node has no access log"))?;
    let target = log.target().to_string();
    tokio::task::spawn_blocking(move || log.reopen())
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| ApiError(StatusCode::UNPROCESSABLE_ENTITY, format!("reopen failed, the old file stays: {e}")))?;
    Ok(Json(serde_json::json!({ "reopened": true, "target": target })))
}

pub async fn cluster(AxState(node): Node) -> Json<ClusterView> {
    let st = node.raft.status().await;
    let members = node.members();
    let name_of = |id: u64| st.nodes.get(&id).map(|n| n.name.clone()).unwrap_or_else(|| id.to_string());
    let mut nodes: Vec<NodeView> = st.nodes.iter().map(|(id, n)| member_view(&node, &st, *id, n, &members)).collect();
    for m in members.nodes.values().filter(|m| !st.nodes.contains_key(&m.raft_id)) {
        nodes.push(NodeView {
            id: m.name.clone(),
            raft_id: m.raft_id,
            admin: m.admin.clone(),
            cluster: m.gossip_addr.map(|a| a.to_string()),
            http: m.http.clone(),
            zone: m.zone.clone(),
            live: m.live,
            ready: m.live && m.ready,
            // Gossip remembers dead nodes for an hour: a removed one is "gone", not joining.
            role: if m.live { "joining" } else { "gone" }.into(),
            voter: false,
        });
    }
    nodes.sort_by(|a, b| a.id.cmp(&b.id));
    Json(ClusterView {
        node: node.id.clone(),
        leader: st.leader.map(name_of),
        term: st.term,
        commit_index: st.committed,
        applied_index: st.applied,
        config_version: node.state().version,
        nodes,
    })
}

fn member_view(node: &NodeApi, st: &RaftStatus, id: u64, n: &ShoalNode, members: &Members) -> NodeView {
    let gossip = members.nodes.get(&n.name).filter(|m| m.raft_id == id);
    let me = id == node.raft.id;
    let role = if me {
        node.raft.role().to_string()
    } else if st.leader == Some(id) {
        "leader".into()
    } else if st.voters.contains(&id) {
        "follower".into()
    } else {
        "learner".into()
    };
    NodeView {
        id: n.name.clone(),
        raft_id: id,
        admin: n.admin.clone(),
        cluster: (!n.raft_addr.is_empty()).then(|| n.raft_addr.clone()),
        http: if me { node.http_addr().map(|a| a.to_string()) } else { gossip.and_then(|g| g.http.clone()) },
        zone: if me { node.zone.clone() } else { gossip.map(|g| g.zone.clone()).unwrap_or_default() },
        live: me || gossip.is_some_and(|g| g.live),
        ready: if me { node.is_ready() } else { gossip.is_some_and(|g| g.live && g.ready) },
        role,
        voter: st.voters.contains(&id),
    }
}

/// `GET /v1/cluster/probes`: which live node actively checks which backend (`pool/addr`).
pub async fn probes(AxState(node): Node) -> Json<std::collections::BTreeMap<String, Vec<String>>> {
    let fmt = |ids: &mut dyn Iterator<Item = &crate::health::BackendId>| {
        let mut v: Vec<String> = ids.map(|(p, a)| format!("{p}/{a}")).collect();
        v.sort();
        v
    };
    let mut out = std::collections::BTreeMap::new();
    out.insert(node.id.clone(), fmt(&mut node.local_health.borrow().verdicts.keys()));
    for m in node.members().live().filter(|m| m.name != node.id) {
        out.insert(m.name.clone(), fmt(&mut m.obs.verdicts.keys()));
    }
    Json(out)
}

/// `GET /v1/pools/{pool}/pick?client=IP`: the backend this node would choose for a client.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PickQuery {
    client: std::net::IpAddr,
}

pub async fn pick(
    AxState(node): Node,
    Path(pool): Path<String>,
    Query(q): Query<PickQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let table = node.table.load();
    let p = table.pool(&pool).ok_or_else(|| no_pool(&pool))?;
    let chosen = p.pick(q.client, &[]).map(|b| b.key.clone());
    Ok(Json(serde_json::json!({ "pool": pool, "client": q.client, "backend": chosen })))
}

async fn write(node: &NodeApi, cmd: Command) -> Result<Json<WriteResult>, ApiError> {
    let applied = propose(node, cmd).await?;
    Ok(Json(WriteResult { version: applied.version }))
}

/// Proposes an admin write (JSON or gRPC), counting proposals and failures.
pub(super) async fn propose(node: &NodeApi, cmd: Command) -> Result<Applied, ProposeError> {
    node.metrics.proposals.inc();
    node.raft.propose(cmd).await.inspect_err(|_| node.metrics.proposal_failures.inc())
}

fn parse_addr(raw: &str) -> Result<SocketAddr, ApiError> {
    raw.parse().map_err(|_| ApiError::bad_request(format!("{raw:?} is not an ip:port backend address")))
}

fn no_pool(pool: &str) -> ApiError {
    ApiError::not_found(format!("pool {pool:?} does not exist"))
}

#[cfg(test)]
mod status_page_tests {
    /// The page's source: every check below reads it as a browser would get it.
    const PAGE: &str = include_str!("status.html");

    /// Interpolations that return HTML made only of escaped values (pill and yes escape their
    /// arguments; `rows` are built by the same rule). Anything else must be `esc(…)`.
    const HTML_HELPERS: &[&str] = &[
        "pill(",
        "yes(",
        "rows.join(\"\")",
        "n.live ? pill(\"alive\", \"ok\") : pill(\"dead\", \"bad\")",
        "h.fail_open ? pill(\"fail-open\", \"warn\") : \"\"",
    ];

    /// Every `${…}` expression of the page's template literals, in order.
    fn interpolations(page: &str) -> Vec<&str> {
        let mut out = Vec::new();
        let mut rest = page;
        while let Some(start) = rest.find("${") {
            let body = &rest[start + 2..];
            let mut depth = 1;
            let end = body
                .char_indices()
                .find(|(_, c)| {
                    match c {
                        '{' => depth += 1,
                        '}' => depth -= 1,
                        _ => {}
                    }
                    depth == 0
                })
                .map(|(i, _)| i)
                .unwrap_or(body.len());
            out.push(body[..end].trim());
            rest = &body[end..];
        }
        out
    }

    #[test]
    fn every_interpolated_value_is_escaped() {
        let all = interpolations(PAGE);
        assert!(all.len() > 20, "the scan found the template literals: {all:?}");
        for expr in all {
            let escaped = expr.starts_with("esc(");
            let helper = HTML_HELPERS.iter().any(|h| if h.ends_with('(') { expr.starts_with(h) } else { expr == *h });
            assert!(escaped || helper, "`${{{expr}}}` goes into the HTML unescaped: wrap it in esc()");
        }
    }

    #[test]
    fn esc_covers_attribute_quotes_and_pill_escapes_its_class() {
        // A value in `data-node="…"` must not close the attribute.
        for (c, entity) in [("&", "&amp;"), ("<", "&lt;"), (">", "&gt;"), ("'", "&#39;")] {
            assert!(PAGE.contains(&format!("\"{c}\": \"{entity}\"")), "esc maps {c}");
        }
        assert!(PAGE.contains("'\"': \"&quot;\""), "esc maps the double quote");
        assert!(PAGE.contains("/[&<>\"']/g"), "esc replaces all five characters everywhere");
        assert!(PAGE.contains("class=\"pill ${esc(kind)}\">${esc(label)}"), "pill escapes both arguments");
        assert!(!PAGE.contains("function text("), "the old helper (no quote escaping) is gone");
        // Only the built strings go into innerHTML.
        let sinks: Vec<&str> = PAGE.lines().filter(|l| l.contains("innerHTML")).map(str::trim).collect();
        assert_eq!(sinks.len(), 2, "{sinks:?}");
        assert!(sinks.iter().all(|l| l.contains("= rows.join(\"\")") || l.contains("= html.join(\"\")")), "{sinks:?}");
    }
}
