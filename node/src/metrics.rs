//! One Prometheus registry per node (never the global one: tests run several nodes in one
//! process). Hot-path handles are resolved once per pool when the routing table is built, so
//! the data plane increments plain atomics instead of looking labels up per request.

use std::collections::HashMap;

use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Every metric a node exports.
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    // data plane, by listener
    pub conns_accepted: IntCounterVec,
    pub conns_active: IntGaugeVec,
    pub conns_failed: IntCounterVec,
    pub listener_bytes_in: IntCounterVec,
    pub listener_bytes_out: IntCounterVec,
    // data plane, by pool
    pub http_requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub pool_bytes_in: IntCounterVec,
    pub pool_bytes_out: IntCounterVec,
    pub backend_connect_errors: IntCounterVec,
    pub retries: IntCounterVec,
    pub no_backend: IntCounterVec,
    pub upgrades_active: IntGaugeVec,
    /// PROXY protocol headers on accepting listeners, by listener, result and version.
    pub proxy_headers: IntCounterVec,
    // health
    pub backend_up: IntGaugeVec,
    pub health_checks: IntCounterVec,
    pub health_check_failures: IntCounterVec,
    pub ejections: IntCounterVec,
    pub queue_depth: IntGaugeVec,
    pub queue_timeouts: IntCounterVec,
    pub queue_full: IntCounterVec,
    pub pool_fail_open: IntGaugeVec,
    pub heartbeats: IntCounterVec,
    pub heartbeats_malformed: IntCounterVec,
    pub heartbeats_refused: IntCounterVec,
    // control plane
    pub config_version: IntGauge,
    pub table_rebuilds: IntCounter,
    pub gossip_live_nodes: IntGauge,
    pub gossip_dropped: IntCounterVec,
    /// Last clock skew seen per gossip peer (their stamp minus our clock), seconds.
    pub gossip_clock_skew: GaugeVec,
    /// Idle per-peer gossip proxies evicted to make room for another peer.
    pub gossip_proxies_evicted: IntCounter,
    pub raft_term: IntGauge,
    pub raft_leader_id: IntGauge,
    pub raft_is_leader: IntGauge,
    pub raft_commit_index: IntGauge,
    pub raft_applied_index: IntGauge,
    pub raft_voters: IntGauge,
    pub raft_learners: IntGauge,
    pub proposals: IntCounter,
    pub proposal_failures: IntCounter,
    pub admin_requests: IntCounterVec,
    pub rejected_inputs: IntCounterVec,
    /// Peers refused because they belong to another cluster identity, by where it was caught.
    pub cluster_id_mismatch: IntCounterVec,
    pub config_reloads: IntCounterVec,
    /// EC gateways named by host name whose re-resolution failed (the old address stays).
    pub ec_resolve_failures: IntCounter,
    /// Access log records dropped because the writer fell behind.
    pub access_log_dropped: IntCounter,
    /// When each certificate this node loads expires (Unix seconds), by role and file.
    pub cert_expiry: IntGaugeVec,
    /// 1 while the node answers `/readyz` with 200.
    pub node_ready: IntGauge,
    /// Raft voters alive in this node's gossip view (itself included).
    pub raft_voters_live: IntGauge,
    /// Heartbeat backends of a pool: configured or self-registered, and up among them.
    pub heartbeat_backends_known: IntGaugeVec,
    pub heartbeat_backends_up: IntGaugeVec,
    /// Heartbeat backends marked down because they fell silent.
    pub heartbeat_backends_lost: IntCounterVec,
}

/// Request duration buckets, in seconds: 100 µs to 30 s.
const DURATION_BUCKETS: &[f64] =
    &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(g.clone())).expect("unique metric");
    g
}

fn float_gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    let g = GaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(g.clone())).expect("unique metric");
    g
}

fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("valid metric");
    r.register(Box::new(g.clone())).expect("unique metric");
    g
}

fn plain_counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

impl Metrics {
    /// A registry whose every series carries `node="<node id>"` and the `shoal_` prefix.
    pub fn new(node: &str) -> Metrics {
        let labels = HashMap::from([("node".to_string(), node.to_string())]);
        let r = Registry::new_custom(Some("shoal".into()), Some(labels)).expect("valid registry");
        #[cfg(target_os = "linux")]
        {
            // Process metrics (RSS, fds, CPU) come without the shoal_ prefix, as is customary.
            let pc = prometheus::process_collector::ProcessCollector::for_self();
            let _ = r.register(Box::new(pc));
        }
        let duration = HistogramVec::new(
            HistogramOpts::new("request_duration_seconds", "HTTP request duration through the proxy, by pool")
                .buckets(DURATION_BUCKETS.to_vec()),
            &["pool"],
        )
        .expect("valid metric");
        r.register(Box::new(duration.clone())).expect("unique metric");
        Metrics {
            conns_accepted: counter(&r, "connections_accepted_total", "Client connections accepted", &["listener"]),
            conns_active: gauge_vec(&r, "connections_active", "Client connections open", &["listener"]),
            conns_failed: counter(
                &r,
                "connections_failed_total",
                "Client connections that ended in an error",
                &["listener"],
            ),
            listener_bytes_in: counter(&r, "listener_bytes_in_total", "Bytes received from clients", &["listener"]),
            listener_bytes_out: counter(&r, "listener_bytes_out_total", "Bytes sent to clients", &["listener"]),
            http_requests: counter(
                &r,
                "http_requests_total",
                "HTTP requests by pool and status class",
                &["pool", "class"],
            ),
            request_duration: duration,
            pool_bytes_in: counter(&r, "pool_bytes_in_total", "Bytes received from clients, by pool", &["pool"]),
            pool_bytes_out: counter(&r, "pool_bytes_out_total", "Bytes sent to clients, by pool", &["pool"]),
            backend_connect_errors: counter(
                &r,
                "backend_connect_errors_total",
                "Failed connects to backends",
                &["pool", "backend"],
            ),
            retries: counter(&r, "retries_total", "Requests or connections retried on another backend", &["pool"]),
            no_backend: counter(
                &r,
                "no_healthy_backend_total",
                "Requests or connections refused: no backend available",
                &["pool"],
            ),
            upgrades_active: gauge_vec(
                &r,
                "upgraded_connections_active",
                "Upgraded (WebSocket) connections open",
                &["pool"],
            ),
            proxy_headers: counter(
                &r,
                "proxy_protocol_headers_total",
                "PROXY protocol headers on listeners that require one, by result (ok; refused: malformed, \
                 untrusted source, timeout, closed) and version (none when refused before it was known)",
                &["listener", "result", "version"],
            ),
            backend_up: gauge_vec(&r, "backend_up", "1 when this node routes to the backend", &["pool", "backend"]),
            health_checks: counter(&r, "health_checks_total", "Active health checks run by this node", &["pool"]),
            health_check_failures: counter(
                &r,
                "health_check_failures_total",
                "Active health checks that failed",
                &["pool"],
            ),
            ejections: counter(
                &r,
                "ejections_total",
                "Backends ejected by this node, by reason (passive: connect or reset failures, outlier: 5xx answers)",
                &["pool", "reason"],
            ),
            queue_depth: gauge_vec(
                &r,
                "pool_queue_depth",
                "Requests or connections waiting for a backend below max_connections",
                &["pool"],
            ),
            queue_timeouts: counter(
                &r,
                "pool_queue_timeouts_total",
                "Queued requests or connections refused after queue_timeout_ms",
                &["pool"],
            ),
            queue_full: counter(
                &r,
                "pool_queue_full_total",
                "Requests or connections refused because the pool's queue held queue_max already",
                &["pool"],
            ),
            pool_fail_open: gauge_vec(
                &r,
                "pool_fail_open",
                "1 while the pool routes to every backend (panic mode)",
                &["pool"],
            ),
            heartbeats: counter(&r, "heartbeats_received_total", "Heartbeat datagrams received", &["pool"]),
            heartbeats_malformed: counter(
                &r,
                "heartbeats_malformed_total",
                "Heartbeat datagrams dropped as malformed",
                &["pool"],
            ),
            heartbeats_refused: counter(
                &r,
                "heartbeats_refused_total",
                "Heartbeat datagrams refused (unknown pair or source, bad or replayed MAC, cap reached...)",
                &["pool", "reason"],
            ),
            config_version: gauge(&r, "config_version", "Version of the applied desired state"),
            table_rebuilds: plain_counter(&r, "routing_table_rebuilds_total", "Routing snapshots built"),
            gossip_live_nodes: gauge(&r, "gossip_live_nodes", "Nodes alive according to gossip"),
            gossip_dropped: counter(&r, "gossip_datagrams_dropped_total", "Gossip datagrams dropped", &["reason"]),
            gossip_clock_skew: float_gauge_vec(
                &r,
                "gossip_clock_skew_seconds",
                "Last clock skew seen from a gossip peer (its stamp minus this node's clock; refused beyond 60)",
                &["peer"],
            ),
            gossip_proxies_evicted: plain_counter(
                &r,
                "gossip_proxies_evicted_total",
                "Least recently used gossip peer proxies closed to make room for another peer",
            ),
            raft_term: gauge(&r, "raft_term", "Current Raft term"),
            raft_leader_id: gauge(&r, "raft_leader_id", "Raft id of the current leader, 0 when unknown"),
            raft_is_leader: gauge(&r, "raft_is_leader", "1 on the Raft leader"),
            raft_commit_index: gauge(&r, "raft_commit_index", "Raft log index known committed"),
            raft_applied_index: gauge(&r, "raft_applied_index", "Raft log index applied to the state"),
            raft_voters: gauge(&r, "raft_voters", "Voters in the Raft membership"),
            raft_learners: gauge(&r, "raft_learners", "Learners in the Raft membership"),
            proposals: plain_counter(&r, "raft_proposals_total", "Commands proposed through this node"),
            proposal_failures: plain_counter(&r, "raft_proposal_failures_total", "Proposals that failed to commit"),
            admin_requests: counter(&r, "admin_requests_total", "Admin API requests by status class", &["class"]),
            rejected_inputs: counter(&r, "rejected_inputs_total", "Hostile or malformed inputs dropped", &["kind"]),
            cluster_id_mismatch: counter(
                &r,
                "cluster_id_mismatch_total",
                "Nodes of another cluster identity refused (handshake, rpc, ping, gossip)",
                &["where"],
            ),
            cert_expiry: gauge_vec(
                &r,
                "certificate_expiry_timestamp_seconds",
                "When a certificate this node loads expires (Unix time), by cert (https, admin, node: the Raft one, ca) and file",
                &["cert", "file"],
            ),
            node_ready: gauge(&r, "node_ready", "1 while the node is ready to take traffic (/readyz answers 200)"),
            raft_voters_live: gauge(
                &r,
                "raft_voters_live",
                "Raft voters alive in this node's gossip view, itself included",
            ),
            heartbeat_backends_known: gauge_vec(
                &r,
                "heartbeat_backends_known",
                "Heartbeat backends of the pool this node tracks (configured or self-registered)",
                &["pool"],
            ),
            heartbeat_backends_up: gauge_vec(
                &r,
                "heartbeat_backends_up",
                "Heartbeat backends of the pool up by their heartbeats on this node",
                &["pool"],
            ),
            heartbeat_backends_lost: counter(
                &r,
                "heartbeat_backends_lost_total",
                "Heartbeat backends marked down because no heartbeat came within the timeout",
                &["pool"],
            ),
            config_reloads: counter(
                &r,
                "config_reloads_total",
                "Config file reloads by result (ok, invalid: refused as written, failed: not committed)",
                &["result"],
            ),
            access_log_dropped: plain_counter(
                &r,
                "access_log_dropped_total",
                "Access log records dropped because the writer's queue was full",
            ),
            ec_resolve_failures: plain_counter(
                &r,
                "ec_gateway_resolve_failures_total",
                "GATEWAY_LIST host names that failed to resolve again (previous address kept)",
            ),
            registry: r,
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }

    /// Resolves one pool's hot-path handles.
    pub fn pool(&self, pool: &str) -> PoolMetrics {
        let class = |c: &str| self.http_requests.with_label_values(&[pool, c]);
        PoolMetrics {
            requests: [class("1xx"), class("2xx"), class("3xx"), class("4xx"), class("5xx")],
            duration: self.request_duration.with_label_values(&[pool]),
            bytes_in: self.pool_bytes_in.with_label_values(&[pool]),
            bytes_out: self.pool_bytes_out.with_label_values(&[pool]),
            retries: self.retries.with_label_values(&[pool]),
            no_backend: self.no_backend.with_label_values(&[pool]),
            upgrades: self.upgrades_active.with_label_values(&[pool]),
            queue_depth: self.queue_depth.with_label_values(&[pool]),
            queue_timeouts: self.queue_timeouts.with_label_values(&[pool]),
            queue_full: self.queue_full.with_label_values(&[pool]),
            ejections: self.ejections.with_label_values(&[pool, "outlier"]),
            connect_errors: self.backend_connect_errors.clone(),
            pool: pool.to_string(),
        }
    }

    /// Resolves one listener's hot-path handles.
    pub fn listener(&self, listener: &str) -> ListenerMetrics {
        ListenerMetrics {
            name: listener.into(),
            accepted: self.conns_accepted.with_label_values(&[listener]),
            active: self.conns_active.with_label_values(&[listener]),
            failed: self.conns_failed.with_label_values(&[listener]),
            bytes_in: self.listener_bytes_in.with_label_values(&[listener]),
            bytes_out: self.listener_bytes_out.with_label_values(&[listener]),
        }
    }

    /// Forgets a removed pool's series so dashboards stop showing it.
    pub fn forget_pool(&self, pool: &str) {
        for class in ["1xx", "2xx", "3xx", "4xx", "5xx"] {
            let _ = self.http_requests.remove_label_values(&[pool, class]);
        }
        let _ = self.pool_fail_open.remove_label_values(&[pool]);
        let _ = self.heartbeat_backends_known.remove_label_values(&[pool]);
        let _ = self.heartbeat_backends_up.remove_label_values(&[pool]);
        let _ = self.queue_depth.remove_label_values(&[pool]);
    }

    /// Exports when a certificate expires; `cert` is its role (https, admin, node, ca).
    pub fn certificate(&self, cert: &str, file: &std::path::Path, not_after: i64) {
        self.cert_expiry.with_label_values(&[cert, &file.display().to_string()]).set(not_after);
    }
}

/// Pre-resolved metric handles of one pool.
#[derive(Clone, Debug)]
pub struct PoolMetrics {
    pub pool: String,
    requests: [IntCounter; 5],
    pub duration: Histogram,
    pub bytes_in: IntCounter,
    pub bytes_out: IntCounter,
    pub retries: IntCounter,
    pub no_backend: IntCounter,
    pub upgrades: IntGauge,
    pub queue_depth: IntGauge,
    pub queue_timeouts: IntCounter,
    pub queue_full: IntCounter,
    /// Outlier ejections decided by the data plane.
    pub ejections: IntCounter,
    connect_errors: IntCounterVec,
}

impl PoolMetrics {
    /// Counts a response by status class.
    pub fn response(&self, status: u16) {
        let idx = usize::from((status / 100).clamp(1, 5) - 1);
        self.requests[idx].inc();
    }

    /// Requests answered so far, and how many of them were 5xx.
    pub fn totals(&self) -> (u64, u64) {
        (self.requests.iter().map(|c| c.get()).sum(), self.requests[4].get())
    }

    pub fn connect_error(&self, backend: &str) {
        self.connect_errors.with_label_values(&[self.pool.as_str(), backend]).inc();
    }
}

/// Pre-resolved metric handles of one listener.
#[derive(Clone, Debug)]
pub struct ListenerMetrics {
    /// The `listener` label, also used in log spans.
    pub name: std::sync::Arc<str>,
    pub accepted: IntCounter,
    pub active: IntGauge,
    pub failed: IntCounter,
    pub bytes_in: IntCounter,
    pub bytes_out: IntCounter,
}
