//! Seed 003's gRPC control API (`rollout.lb.LoadBalancer`, `proto/rollout/lb.proto`) on the
//! admin address, so the seed's CLI and rollout workflow drive a shoal cluster unchanged.
//!
//! Pools are found by their URL pattern (a pattern names at most one pool); a pool created here
//! gets a name derived from its pattern. Writes become the same Raft commands as the JSON API's.
//! The bearer token is checked by an interceptor unless the operator opted out with
//! `--grpc-allow-unauthenticated`; each call then checks the token's scope (a read token may
//! only ask PoolHealth, a join token nothing).

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use shoal_proto::admin::{BackendStatus as AdminStatus, PoolHealth as AdminHealth, PoolStatus as AdminPoolStatus};
use shoal_proto::spec::{MAX_NAME_LEN, backend_key};
use shoal_proto::{
    Algorithm, ApplyError, BackendSpec, CheckKind, Command, HealthSpec, Pool, PoolSpec, Protocol, State,
};
use tonic::{Code, Request, Response, Status};

use super::NodeApi;
use super::tokens::Scope;
use crate::control::ProposeError;
use crate::reconcile;

/// Code generated from `proto/rollout/lb.proto` (messages, server and client).
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("rollout.lb");
}

use pb::load_balancer_server::{LoadBalancer, LoadBalancerServer};

/// Largest request message; the seed's are a few hundred bytes.
const MAX_MESSAGE: usize = 64 * 1024;
/// Longest health-check interval in seconds (the pool spec allows an hour).
const MAX_INTERVAL_SECS: i32 = 3600;

/// The gRPC routes as an axum router; unknown services and methods answer `UNIMPLEMENTED`.
pub fn router(node: Arc<NodeApi>) -> axum::Router {
    let auth_node = node.clone();
    let server = LoadBalancerServer::new(Lb { node }).max_decoding_message_size(MAX_MESSAGE);
    let svc = tonic::service::interceptor::InterceptedService::new(server, move |req| authorize(&auth_node, req));
    tonic::service::Routes::new(svc).prepare().into_axum_router()
}

/// Whether a request is gRPC (any `application/grpc` content type).
pub fn is_grpc<B>(req: &http::Request<B>) -> bool {
    req.headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"))
}

/// The token in the `authorization` metadata, its scope carried to the handlers; unless the
/// operator allowed anonymous calls (every call is then an admin call).
fn authorize(node: &NodeApi, mut req: Request<()>) -> Result<Request<()>, Status> {
    if node.grpc_allow_unauthenticated {
        req.extensions_mut().insert(Scope::Admin);
        return Ok(req);
    }
    let header = req.metadata().get("authorization").and_then(|v| v.to_str().ok());
    match super::auth::authenticate(node, header) {
        Some(scope) => {
            req.extensions_mut().insert(scope);
            Ok(req)
        }
        None => Err(Status::unauthenticated("missing or wrong bearer token in the authorization metadata")),
    }
}

/// Refuses a call whose token may not `write` (or read). A join token has no gRPC calls: seed
/// 003's AddBackend/RemoveBackend are not seed 002's drain-then-leave.
fn require<T>(node: &NodeApi, req: &Request<T>, write: bool) -> Result<(), Status> {
    let allowed = match req.extensions().get::<Scope>() {
        Some(Scope::Admin) => true,
        Some(Scope::Read) => !write,
        Some(Scope::Join(_)) | None => false,
    };
    if allowed {
        return Ok(());
    }
    node.metrics.rejected_inputs.with_label_values(&["admin_scope"]).inc();
    let name = req.extensions().get::<Scope>().map_or("no", Scope::name);
    Err(Status::permission_denied(format!("a {name} token may not make this call")))
}

/// The service over a node's shared state.
struct Lb {
    node: Arc<NodeApi>,
}

#[tonic::async_trait]
impl LoadBalancer for Lb {
    async fn add_pool(&self, req: Request<pb::AddPoolReq>) -> Result<Response<pb::AddPoolResp>, Status> {
        require(&self.node, &req, true)?;
        let req = req.into_inner();
        let spec = pool_spec(&req)?;
        let state = self.node.state();
        if let Some(p) = find_pool(&state, &req.pattern) {
            return Err(Status::already_exists(format!("pattern {:?} is served by pool {:?}", req.pattern, p.name)));
        }
        let name = pool_name(&req.pattern);
        if let Some(p) = state.pools.get(&name) {
            let msg = format!("pool name {name:?} (derived from the pattern) is taken by pool {:?}", p.spec.pattern);
            return Err(Status::already_exists(msg));
        }
        self.propose(Command::PutPool { name, spec }).await.map_err(|e| match e {
            ProposeError::Refused(ApplyError::Conflict(msg)) => Status::already_exists(msg),
            e => e.into(),
        })?;
        Ok(Response::new(pb::AddPoolResp {}))
    }

    async fn remove_pool(&self, req: Request<pb::RemovePoolReq>) -> Result<Response<pb::RemovePoolResp>, Status> {
        require(&self.node, &req, true)?;
        let pool = self.pool(&req.into_inner().pattern).await?;
        self.propose(Command::DeletePool { name: pool.name }).await?;
        Ok(Response::new(pb::RemovePoolResp {}))
    }

    async fn add_backend(&self, req: Request<pb::AddBackendReq>) -> Result<Response<pb::AddBackendResp>, Status> {
        require(&self.node, &req, true)?;
        let req = req.into_inner();
        let (addr, url_path) = ip_backend(req.backend.as_ref())?;
        let pool = self.pool(&req.pattern).await?;
        let existing = pool.backends.get(&backend_key(&addr)).map(|b| b.spec.clone());
        let spec = BackendSpec { url_path, ..existing.clone().unwrap_or_default() };
        spec.validate().map_err(|e| Status::invalid_argument(format!("backend.ip_backend.{e}")))?;
        if existing.is_none() {
            super::api::first_check(&self.node, &pool, addr).await.map_err(|reason| {
                Status::failed_precondition(format!(
                    "backend {addr} failed its first health check ({reason}); not added"
                ))
            })?;
        }
        self.propose(Command::PutBackend { pool: pool.name, addr, spec }).await?;
        Ok(Response::new(pb::AddBackendResp {}))
    }

    async fn remove_backend(
        &self,
        req: Request<pb::RemoveBackendReq>,
    ) -> Result<Response<pb::RemoveBackendResp>, Status> {
        require(&self.node, &req, true)?;
        let req = req.into_inner();
        let (addr, _) = ip_backend(req.backend.as_ref())?;
        let pool = self.pool(&req.pattern).await?;
        self.propose(Command::DeleteBackend { pool: pool.name, addr }).await?;
        Ok(Response::new(pb::RemoveBackendResp {}))
    }

    async fn pool_health(&self, req: Request<pb::PoolHealthReq>) -> Result<Response<pb::PoolHealthResp>, Status> {
        require(&self.node, &req, false)?;
        let req = req.into_inner();
        let pool = self.pool(&req.pattern).await?;
        let view = self.node.health.borrow().clone();
        let answer = reconcile::pool_health(&pool, &view, &self.node.table.load(), &self.node.remote_counts());
        let health = health_answer(&pool, &answer, req.healthy, req.sick);
        Ok(Response::new(pb::PoolHealthResp { health: Some(health) }))
    }
}

impl Lb {
    /// The pool serving `pattern`. A pool missing here is looked up again after a read barrier,
    /// so a client that created it through another node a moment ago still finds it.
    async fn pool(&self, pattern: &str) -> Result<Pool, Status> {
        if pattern.is_empty() {
            return Err(Status::invalid_argument("pattern: must not be empty"));
        }
        if let Some(p) = find_pool(&self.node.state(), pattern) {
            return Ok(p.clone());
        }
        self.node.raft.linearize().await.map_err(Status::from)?;
        find_pool(&self.node.state(), pattern)
            .cloned()
            .ok_or_else(|| Status::not_found(format!("no pool serves pattern {pattern:?}")))
    }

    async fn propose(&self, cmd: Command) -> Result<(), ProposeError> {
        super::api::propose(&self.node, cmd).await.map(|_| ())
    }
}

impl From<ProposeError> for Status {
    fn from(e: ProposeError) -> Status {
        let code = match &e {
            ProposeError::Refused(ApplyError::Invalid { .. }) => Code::InvalidArgument,
            ProposeError::Refused(ApplyError::NoSuchPool(_) | ApplyError::NoSuchBackend { .. }) => Code::NotFound,
            ProposeError::Refused(ApplyError::Conflict(_)) => Code::FailedPrecondition,
            ProposeError::Unavailable(_) => Code::Unavailable,
        };
        Status::new(code, e.to_string())
    }
}

/// The HTTP pool whose pattern is exactly `pattern`.
pub fn find_pool<'a>(state: &'a State, pattern: &str) -> Option<&'a Pool> {
    state.pools.values().find(|p| p.spec.protocol == Protocol::Http && p.spec.pattern.as_deref() == Some(pattern))
}

/// A pool name for `pattern`. Different patterns never get the same name, so two clients adding
/// two patterns at once cannot overwrite each other's pool: letters, digits and `-` stay, `/`
/// becomes `_`, any other byte `.hh`; `/` alone is `root`. A name too long is cut and ends in
/// `.x` and 16 hex digits of the pattern's SHA-256 (`.x` never occurs in an uncut name).
pub fn pool_name(pattern: &str) -> String {
    if pattern == "/" {
        return "root".into();
    }
    let mut name = String::with_capacity(pattern.len());
    for b in pattern.bytes() {
        match b {
            b'/' => name.push('_'),
            b if b.is_ascii_alphanumeric() || b == b'-' => name.push(char::from(b)),
            b => {
                let _ = write!(name, ".{b:02x}");
            }
        }
    }
    if name.len() > MAX_NAME_LEN {
        let digest = ring::digest::digest(&ring::digest::SHA256, pattern.as_bytes());
        name.truncate(100);
        name.push_str(".x");
        name.push_str(&crate::control::secure::hex(&digest.as_ref()[..8]));
    }
    name
}

/// The pool an `AddPoolReq` asks for: a `p2c` HTTP pool with the request's check, if any.
pub fn pool_spec(req: &pb::AddPoolReq) -> Result<PoolSpec, Status> {
    if req.pattern.is_empty() {
        return Err(Status::invalid_argument("pattern: must not be empty; give a URL pattern such as \"/\""));
    }
    if pb::PoolType::try_from(req.pool_type) != Ok(pb::PoolType::PtP2c) {
        let msg = format!("pool_type: {} is not a pool type shoal knows; use PT_P2C", req.pool_type);
        return Err(Status::invalid_argument(msg));
    }
    let spec = PoolSpec {
        protocol: Protocol::Http,
        pattern: Some(req.pattern.clone()),
        algorithm: Algorithm::P2c,
        health: health_spec(req.health_checks.as_ref())?,
        ..PoolSpec::default()
    };
    spec.clone().normalize().validate().map_err(|e| Status::invalid_argument(e.to_string()))?;
    Ok(spec)
}

/// The seed's status check becomes the pool's HTTP check; without one every backend counts as
/// healthy (passive ejection still applies).
fn health_spec(checks: Option<&pb::HealthChecks>) -> Result<HealthSpec, Status> {
    let none = HealthSpec { check: Some(CheckKind::None), ..HealthSpec::default() };
    let Some(checks) = checks else { return Ok(none) };
    let interval_ms = match checks.interval_secs {
        0 => none.interval_ms,
        s @ 1..=MAX_INTERVAL_SECS => u64::from(s.unsigned_abs()) * 1000,
        s => {
            let msg =
                format!("health_checks.interval_secs: {s} is not from 1 to {MAX_INTERVAL_SECS} (0: every second)");
            return Err(Status::invalid_argument(msg));
        }
    };
    let status = match checks.health_checks.as_slice() {
        [] => return Ok(HealthSpec { interval_ms, ..none }),
        [only] => match &only.health_check {
            Some(pb::health_check::HealthCheck::StatusCheck(s)) => s,
            None => return Err(Status::invalid_argument("health_checks.health_checks[0]: set status_check")),
        },
        more => {
            let msg = format!("health_checks.health_checks: shoal runs one check per pool, not {}", more.len());
            return Err(Status::invalid_argument(msg));
        }
    };
    let path = if status.url_path.is_empty() { "/healthz".to_string() } else { status.url_path.clone() };
    if !path.starts_with('/') || path.chars().any(|c| c.is_ascii_whitespace() || c.is_ascii_control()) {
        let msg = format!(
            "health_checks.health_checks[0].status_check.url_path: {path:?} must start with '/' and contain no spaces"
        );
        return Err(Status::invalid_argument(msg));
    }
    Ok(HealthSpec {
        check: Some(CheckKind::Http),
        path,
        expect: status.healthy_values.clone(),
        interval_ms,
        ..HealthSpec::default()
    })
}

/// The backend address and URL path of a request's `Backend` (only `ip_backend` exists).
pub fn ip_backend(backend: Option<&pb::Backend>) -> Result<(SocketAddr, String), Status> {
    let Some(pb::Backend { backend: Some(pb::backend::Backend::IpBackend(b)) }) = backend else {
        return Err(Status::invalid_argument("backend: set ip_backend"));
    };
    let ip: IpAddr =
        b.ip.trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .map_err(|_| Status::invalid_argument(format!("backend.ip_backend.ip: {:?} is not an IP address", b.ip)))?;
    let port = u16::try_from(b.port).ok().filter(|p| *p != 0).ok_or_else(|| {
        Status::invalid_argument(format!("backend.ip_backend.port: {} is not from 1 to 65535", b.port))
    })?;
    let url_path = if b.url_path.is_empty() { "/".to_string() } else { b.url_path.clone() };
    Ok((SocketAddr::new(ip, port), url_path))
}

/// `PoolHealth` as the seed answers it: the pool's status and the healthy and/or sick backends
/// asked for. Backends not in rotation for other reasons (no verdict yet, draining) are listed
/// as `BS_UNKNOWN` with the sick ones.
pub fn health_answer(pool: &Pool, health: &AdminHealth, healthy: bool, sick: bool) -> pb::PoolHealth {
    let backends = health
        .backends
        .iter()
        .filter_map(|b| {
            let status = match b.status {
                AdminStatus::Healthy => pb::BackendStatus::BsHealthy,
                AdminStatus::Sick => pb::BackendStatus::BsSick,
                AdminStatus::Unknown | AdminStatus::Draining => pb::BackendStatus::BsUnknown,
            };
            let wanted = if status == pb::BackendStatus::BsHealthy { healthy } else { sick };
            let url_path = pool.backends.get(&backend_key(&b.addr)).map(|c| c.spec.url_path.clone());
            wanted.then(|| pb::BackendHealth {
                backend: Some(ip_message(b.addr, url_path.unwrap_or_else(|| "/".into()))),
                status: status.into(),
            })
        })
        .collect();
    let status = match health.status {
        AdminPoolStatus::Full => pb::PoolStatus::PsFull,
        AdminPoolStatus::Degraded => pb::PoolStatus::PsDegraded,
        AdminPoolStatus::Empty => pb::PoolStatus::PsEmpty,
    };
    pb::PoolHealth { status: status.into(), backends }
}

fn ip_message(addr: SocketAddr, url_path: String) -> pb::Backend {
    let ip = pb::IpBackend { ip: addr.ip().to_string(), port: i32::from(addr.port()), url_path };
    pb::Backend { backend: Some(pb::backend::Backend::IpBackend(ip)) }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use shoal_proto::admin::BackendHealth as AdminBackend;
    use shoal_proto::apply;

    use super::*;

    fn status_check(path: &str, values: &[&str], interval_secs: i32) -> pb::HealthChecks {
        let check =
            pb::StatusCheck { url_path: path.into(), healthy_values: values.iter().map(|v| v.to_string()).collect() };
        pb::HealthChecks {
            health_checks: vec![pb::HealthCheck {
                health_check: Some(pb::health_check::HealthCheck::StatusCheck(check)),
            }],
            interval_secs,
        }
    }

    fn add_pool(pattern: &str, pool_type: i32, checks: Option<pb::HealthChecks>) -> pb::AddPoolReq {
        pb::AddPoolReq { pattern: pattern.into(), pool_type, health_checks: checks }
    }

    #[test]
    fn the_seeds_add_pool_becomes_a_p2c_pool_with_its_status_check() {
        let req = add_pool("/", pb::PoolType::PtP2c.into(), Some(status_check("/healthz", &["ok"], 5)));
        let spec = pool_spec(&req).expect("spec");
        assert_eq!(spec.pattern.as_deref(), Some("/"));
        assert_eq!(spec.algorithm, Algorithm::P2c);
        assert_eq!(spec.health.check, Some(CheckKind::Http));
        assert_eq!(spec.health.path, "/healthz");
        assert_eq!(spec.health.expect, vec!["ok".to_string()]);
        assert_eq!(spec.health.interval_ms, 5000);
        let bare = pool_spec(&add_pool("/api/", 1, None)).expect("no checks");
        assert_eq!(bare.health.check, Some(CheckKind::None), "without a check every backend counts as healthy");
    }

    #[test]
    fn bad_add_pool_requests_are_invalid_arguments_naming_the_field() {
        let p2c = i32::from(pb::PoolType::PtP2c);
        let cases = [
            (add_pool("", p2c, None), "pattern"),
            (add_pool("/", 0, None), "pool_type"),
            (add_pool("/", 9, None), "pool_type"),
            (add_pool("no-slash", p2c, None), "pattern"),
            (add_pool("/", p2c, Some(status_check("/h", &["ok"], -1))), "interval_secs"),
            (add_pool("/", p2c, Some(status_check("/h", &["ok"], 3601))), "interval_secs"),
            (add_pool("/", p2c, Some(status_check("healthz", &["ok"], 1))), "url_path"),
            (
                add_pool(
                    "/",
                    p2c,
                    Some(pb::HealthChecks {
                        health_checks: vec![pb::HealthCheck { health_check: None }],
                        interval_secs: 1,
                    }),
                ),
                "status_check",
            ),
        ];
        for (req, field) in cases {
            let e = pool_spec(&req).expect_err(field);
            assert_eq!(e.code(), Code::InvalidArgument, "{req:?}");
            assert!(e.message().contains(field), "{field}: {}", e.message());
        }
        let mut two = status_check("/h", &["ok"], 1);
        two.health_checks.push(two.health_checks[0].clone());
        assert_eq!(pool_spec(&add_pool("/", p2c, Some(two))).expect_err("two").code(), Code::InvalidArgument);
    }

    #[test]
    fn pool_names_are_valid_and_distinct_per_pattern() {
        let long_a = format!("/{}a/", "x".repeat(300));
        let long_b = format!("/{}b/", "x".repeat(300));
        let patterns = [
            "/",
            "/api/",
            "/api",
            "api/",
            "/a_b/",
            "/a.b/",
            "/a-b/",
            "example.com/",
            "example.com:8080/x",
            "/%2f",
            "/_",
            &long_a,
            &long_b,
        ];
        let names: BTreeSet<String> = patterns.iter().map(|p| pool_name(p)).collect();
        assert_eq!(names.len(), patterns.len(), "{names:?}");
        for name in &names {
            shoal_proto::spec::validate_pool_name(name).expect(name);
        }
        assert_eq!(pool_name("/"), "root");
        assert_eq!(pool_name("/api/"), "_api_");
        assert_eq!(pool_name("/api/"), pool_name("/api/"), "stable");
    }

    #[test]
    fn backends_need_an_ip_and_a_port() {
        let b = |ip: &str, port: i32, url_path: &str| pb::Backend {
            backend: Some(pb::backend::Backend::IpBackend(pb::IpBackend {
                ip: ip.into(),
                port,
                url_path: url_path.into(),
            })),
        };
        assert_eq!(
            ip_backend(Some(&b("127.0.0.1", 8082, ""))).expect("ok"),
            ("127.0.0.1:8082".parse().expect("a"), "/".into())
        );
        assert_eq!(ip_backend(Some(&b("[::1]", 80, "/v1"))).expect("v6").0, "[::1]:80".parse().expect("a"));
        for bad in [b("host", 80, "/"), b("1.2.3.4", 0, "/"), b("1.2.3.4", 70000, "/"), b("1.2.3.4", -1, "/")] {
            assert_eq!(ip_backend(Some(&bad)).expect_err("bad").code(), Code::InvalidArgument);
        }
        assert_eq!(ip_backend(None).expect_err("none").code(), Code::InvalidArgument);
        assert_eq!(
            ip_backend(Some(&pb::Backend { backend: None })).expect_err("empty oneof").code(),
            Code::InvalidArgument
        );
    }

    #[test]
    fn pool_health_lists_the_backends_asked_for() {
        let mut st = State::default();
        let spec = PoolSpec { pattern: Some("/".into()), ..PoolSpec::default() };
        apply(&mut st, &Command::PutPool { name: "root".into(), spec }).expect("pool");
        let a: SocketAddr = "10.0.0.1:80".parse().expect("a");
        let spec = BackendSpec { url_path: "/v1".into(), ..BackendSpec::default() };
        apply(&mut st, &Command::PutBackend { pool: "root".into(), addr: a, spec }).expect("backend");
        let pool = find_pool(&st, "/").expect("found by pattern");
        assert!(find_pool(&st, "/x/").is_none());
        let backend = |addr: &str, status| AdminBackend {
            addr: addr.parse().expect("addr"),
            status,
            weight: 1,
            zone: String::new(),
            dynamic: false,
            active: 0,
            upgraded: 0,
            pinned: 0,
            slot: None,
            reason: None,
        };
        let health = AdminHealth {
            pool: "root".into(),
            status: AdminPoolStatus::Degraded,
            fail_open: false,
            backends: vec![
                backend("10.0.0.1:80", AdminStatus::Healthy),
                backend("10.0.0.2:80", AdminStatus::Sick),
                backend("10.0.0.3:80", AdminStatus::Unknown),
            ],
            pinned_coverage: None,
        };
        let both = health_answer(pool, &health, true, true);
        assert_eq!(both.status, i32::from(pb::PoolStatus::PsDegraded));
        let statuses: Vec<i32> = both.backends.iter().map(|b| b.status).collect();
        assert_eq!(statuses, vec![1, 2, 0]);
        assert_eq!(both.backends[0].backend, Some(ip_message(a, "/v1".into())), "url_path is kept");
        assert_eq!(health_answer(pool, &health, true, false).backends.len(), 1);
        assert_eq!(health_answer(pool, &health, false, true).backends.len(), 2);
        assert!(health_answer(pool, &health, false, false).backends.is_empty());
    }

    #[test]
    fn refusals_map_to_grpc_codes() {
        let code = |e: ProposeError| Status::from(e).code();
        assert_eq!(code(ApplyError::Invalid { key: "k".into(), problem: "p".into() }.into()), Code::InvalidArgument);
        assert_eq!(code(ApplyError::NoSuchPool("p".into()).into()), Code::NotFound);
        assert_eq!(code(ApplyError::Conflict("c".into()).into()), Code::FailedPrecondition);
        assert_eq!(code(ProposeError::Unavailable("no leader".into())), Code::Unavailable);
    }
}
