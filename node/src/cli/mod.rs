//! The `shoal` command line: `node`, `dev`, `check-config`, `demo-backend`, and the admin
//! verbs (`pool`, `backend`, `status`, `cluster`, `revoke`) that talk to any node's admin API.

mod args;
pub mod cert;
mod choice;
pub mod client;
pub mod dev;
mod output;
mod takeover;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use http::Method;
use serde_json::{Value, json};
use shoal_proto::admin::{ClusterView, PoolHealth, RemovedNode, WriteResult};
use shoal_proto::proxy::Version;
use shoal_proto::{Algorithm, CheckKind, Pool, Protocol};

use crate::admin::tokens::TokenError;
use crate::config::ConfigError;
use crate::control::raft::{CoreFailure, RaftTiming};
use crate::dataplane::Limits;
use crate::dataplane::accesslog;
use crate::dataplane::accesslog::AccessLogError;
use crate::dataplane::reqid::IdSettings;
use crate::dataplane::tls::CertFiles;
use crate::node::{AccessLogOptions, ClusterCreds, ClusterOptions, CredsError, NodeOptions};
pub use args::parse;
use choice::Choice;
use client::{AdminClient, ApiFailure};

/// shoal: a clustered load balancer.
#[derive(Debug, Parser)]
#[command(
    name = "shoal",
    version,
    about,
    propagate_version = true,
    after_help = "--admin, --admin-ca, --token, --token-file and --json may come before or after the verb."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a load-balancer node.
    Node(Box<NodeArgs>),
    /// Run a local demo cluster with demo backends.
    Dev(dev::DevArgs),
    /// Validate a config file (shoal TOML or seed 004 JSON); exits non-zero on a problem.
    CheckConfig { file: PathBuf },
    /// Manage pools.
    #[command(subcommand)]
    Pool(PoolCmd),
    /// Manage backends.
    #[command(subcommand)]
    Backend(BackendCmd),
    /// Manage the cluster's Raft membership.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Show the cluster: nodes, roles, leader, indexes.
    Status {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// A demo backend: HTTP (`/healthz` → ok) or TCP echo with seed 004 heartbeats.
    DemoBackend(crate::demo::DemoArgs),
    /// Make the cluster CA, node certificates and gossip key, or an HTTPS certificate.
    #[command(subcommand)]
    Cert(cert::CertCmd),
    /// Refuse a node's certificate on the cluster port from now on (every node; live
    /// connections too). The leader then removes the node if it is a member.
    Revoke {
        /// The node's certificate file (node.pem): its serial and node name are read from it.
        #[arg(long, required_unless_present = "serial", conflicts_with = "serial")]
        cert: Option<PathBuf>,
        /// The certificate serial `shoal cert node` printed (hex).
        #[arg(long)]
        serial: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
}

/// A feature turned on or off.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Switch {
    On,
    Off,
}

/// Log output format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}

#[derive(Debug, Args)]
pub struct NodeArgs {
    /// Node id, unique in the cluster (default: the name in the --cluster-tls certificate,
    /// else the host name).
    #[arg(long)]
    pub id: Option<String>,
    /// Admin API address.
    #[arg(long, default_value = "127.0.0.1:8081")]
    pub admin: SocketAddr,
    /// Where the node keeps its state.
    #[arg(long, default_value = "shoal-data")]
    pub data_dir: PathBuf,
    /// Pools from a shoal TOML or seed 004 JSON file; watched, and reloaded on SIGHUP: a change
    /// is proposed, a bad file refused with the running state kept.
    #[arg(long, visible_alias = "config-path")]
    pub config: Option<PathBuf>,
    /// How often the --config file is re-read, in milliseconds (0: only on SIGHUP).
    #[arg(long, default_value_t = 1000, hide = true)]
    pub config_poll_ms: u64,
    /// Port of the node's HTTP listener (HTTP pools attach to it by URL pattern) [default: 8080,
    /// 80 with --ec-env].
    #[arg(long)]
    pub http_port: Option<u16>,
    /// Port of the node's HTTPS listener (same pools, behind TLS) [default: none, 443 with
    /// --ec-env and a certificate].
    #[arg(long)]
    pub https_port: Option<u16>,
    /// Certificate chain (PEM) for HTTPS; repeat with --tls-key for more names (SNI).
    #[arg(long)]
    pub tls_cert: Vec<PathBuf>,
    /// Private key (PEM) of the --tls-cert at the same position.
    #[arg(long)]
    pub tls_key: Vec<PathBuf>,
    /// CA bundle (PEM) trusted for TLS to backends (default: the system bundle).
    #[arg(long)]
    pub backend_ca: Option<PathBuf>,
    /// Answer every plain-HTTP request with a redirect to https://HOST.
    #[arg(long)]
    pub https_redirect: Option<String>,
    /// Enterprise Connect mode: GATEWAY_LIST, DNS_NAME (a host name or a URL) and
    /// GATEWAY_RESOLVE_SECONDS (default 30) from this env file ("-": from the environment);
    /// serves every path from the gateways on port 80, and 443 when a certificate is found at
    /// /etc/nginx/certs/cert.crt + certkey.key or ~/cert.pem + ~/key.pem.
    #[arg(long)]
    pub ec_env: Option<PathBuf>,
    /// IP every data listener binds (default: the seed config's IP, else 0.0.0.0).
    #[arg(long)]
    pub listen_ip: Option<IpAddr>,
    /// IPv6 address the HTTP and HTTPS listeners also bind, on the same ports (IPv6 only; skipped
    /// when the host has no IPv6) [default: none; :: with --ec-env when --listen-ip is 0.0.0.0
    /// or not given].
    #[arg(long)]
    pub listen_ip6: Option<std::net::Ipv6Addr>,
    /// Data-plane worker threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// This node's zone, for zone-aware routing.
    #[arg(long, default_value = "")]
    pub zone: String,
    /// Seconds established connections get to finish on shutdown.
    #[arg(long, default_value_t = 10)]
    pub drain_timeout: u64,
    /// Seconds the old process of a seamless upgrade (a new `shoal node` on the same data
    /// directory, or SIGUSR2) serves its established connections, WebSockets included.
    #[arg(long, default_value_t = 4 * 3600)]
    pub upgrade_drain: u64,
    /// Largest request head in bytes (431 beyond).
    #[arg(long, default_value_t = 65536)]
    pub max_header_bytes: usize,
    /// Client connections open at once, per worker; further clients wait in the accept queue.
    #[arg(long, default_value_t = 50000)]
    pub max_connections: usize,
    /// Most header fields in a request (431 beyond).
    #[arg(long, default_value_t = 100)]
    pub max_headers: usize,
    /// Seconds a client gets to send a whole request head, from its first byte (or from the
    /// accept, for a connection's first request): the slowloris defence.
    #[arg(long, default_value_t = 10)]
    pub header_timeout: u64,
    /// Seconds an idle keep-alive client connection is kept open.
    #[arg(long, default_value_t = 60)]
    pub keepalive_timeout: u64,
    /// Seconds a TLS client gets to finish its handshake.
    #[arg(long, default_value_t = 10)]
    pub tls_handshake_timeout: u64,
    #[arg(long, value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
    /// Access log, one record per HTTP request and per TCP connection: off, stdout or a file
    /// path (appended to; reopened on SIGUSR1 and POST /v1/access-log/reopen). Alone: stdout
    /// [default: the --config file's [node] access_log, else off].
    #[arg(long, value_name = "off|stdout|PATH", num_args = 0..=1, default_missing_value = "stdout")]
    pub access_log: Option<String>,
    /// Access log format [default: the --config file's [node] access_log_format, else json].
    #[arg(long, value_parser = ["json", "common", "combined"])]
    pub access_log_format: Option<String>,
    /// Keep a valid client X-Request-Id, make one otherwise; send it to the backend and back
    /// to the client [default: on, or the --config file's [node] request_id].
    #[arg(long, value_enum)]
    pub request_id: Option<Switch>,
    /// Pass a valid W3C traceparent through, start a new trace otherwise [default: on, or the
    /// --config file's [node] traceparent].
    #[arg(long, value_enum)]
    pub traceparent: Option<Switch>,
    /// The HTTP and HTTPS listeners accept only these sources (CIDR blocks, comma separated),
    /// each connection starting with a PROXY protocol header (v1 or v2) that names the client
    /// [default: none, no header expected].
    #[arg(long, value_delimiter = ',', value_name = "CIDR")]
    pub accept_proxy_from: Vec<shoal_proto::proxy::Cidr>,
    /// Join a cluster: this node's gossip address (UDP); Raft RPC uses TCP on the same address.
    #[arg(long)]
    pub cluster: Option<SocketAddr>,
    /// Gossip addresses of other nodes to contact first (comma separated; names resolve by DNS).
    #[arg(long, value_delimiter = ',', requires = "cluster")]
    pub join: Vec<String>,
    /// The directory `shoal cert node` wrote for this node: its certificate and key (Raft RPC
    /// runs on mutual TLS), the cluster CA and the gossip key.
    #[arg(long, value_name = "DIR")]
    pub cluster_tls: Option<PathBuf>,
    /// Admin API token file; created with a random admin token (mode 0600) when missing
    /// [default: <data-dir>/admin.token]. One token a line, optionally scoped: `<token>`
    /// or `<token> admin`, `<token> read`, `<token> join POOL,POOL`. Re-read when it changes.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Certificate chain (PEM) of the admin listener: the admin API (and gRPC) over TLS.
    #[arg(long, requires = "admin_tls_key")]
    pub admin_tls_cert: Option<PathBuf>,
    /// Private key (PEM, mode 0600) of --admin-tls-cert.
    #[arg(long, requires = "admin_tls_cert")]
    pub admin_tls_key: Option<PathBuf>,
    /// Serve /metrics without the admin token (for Prometheus). /healthz and /readyz are
    /// always open.
    #[arg(long)]
    pub public_metrics: bool,
    /// Accept seed 003's gRPC control calls (AddPool, AddBackend, ...) without the admin token,
    /// as the seed's own CLI sends none. Anyone who reaches the admin address can then change
    /// what the cluster routes.
    #[arg(long)]
    pub grpc_allow_unauthenticated: bool,
    /// Bootstrap a new cluster once this many nodes see each other (default: 1 without
    /// --join, else 0 = only join an existing cluster).
    #[arg(long, requires = "cluster")]
    pub expect: Option<usize>,
    /// Cluster name; nodes of other clusters are ignored [default: the name in the
    /// --cluster-tls certificate].
    #[arg(long)]
    pub cluster_name: Option<String>,
    /// Nodes that actively probe each backend.
    #[arg(long, default_value_t = 2)]
    pub probe_replicas: usize,
    /// Seconds a voter must be unreachable before the leader removes it.
    #[arg(long, default_value_t = 120)]
    pub dead_voter_grace: u64,
    /// Gossip round interval in milliseconds (a silent node is marked dead after about eight
    /// mean intervals between its heartbeats).
    #[arg(long, default_value_t = 200, hide = true)]
    pub gossip_interval_ms: u64,
    /// Raft heartbeat interval in milliseconds; also the deadline of every replication RPC, so
    /// it must exceed the round trip between nodes (raise it with --election-timeout-ms for
    /// nodes farther apart than ~50 ms).
    #[arg(long, default_value_t = 100)]
    pub raft_heartbeat_ms: u64,
    /// Raft minimum election timeout in milliseconds (the maximum is 1.5 times that); keep it at
    /// least four heartbeat intervals.
    #[arg(long, default_value_t = 400)]
    pub election_timeout_ms: u64,
    /// For chaos tests only, never in production: the admin API serves PUT /v1/debug/clock
    /// (admin token), which moves this node's wall clock by an offset.
    #[arg(long)]
    pub fault_injection: bool,
    /// For chaos tests only: start with the wall clock moved by this many milliseconds
    /// (negative: behind).
    #[arg(long, requires = "fault_injection", allow_negative_numbers = true, value_name = "MS")]
    pub fault_clock_offset_ms: Option<i64>,
}

/// Why `shoal node` will not start with its flags: it prints the text and exits 2. Each names
/// the flag or file and the problem. A cause is part of the text and deliberately not a
/// `source` (as in `TlsError`), so reporters walking the chain do not print it twice.
#[derive(Debug, thiserror::Error)]
pub enum OptionsError {
    #[error("--tls-cert and --tls-key must come in pairs")]
    UnpairedTls,
    #[error("--https-port needs --tls-cert and --tls-key")]
    HttpsWithoutCert,
    #[error("--ec-env {}: {error}", path.display())]
    ReadEcEnv { path: PathBuf, error: std::io::Error },
    /// The EC env file (or the environment, for "-") is not a usable EC setup.
    #[error("{}: {error}", path.display())]
    EcEnv { path: PathBuf, error: ConfigError },
    /// A certificate was found or given, but no DNS_NAME for port 80 to redirect to.
    #[error("--ec-env: {0}")]
    EcRedirect(ConfigError),
    /// The --config file, read at start for its `[node]` table, is not valid.
    #[error("{}: {error}", path.display())]
    Config { path: PathBuf, error: ConfigError },
    #[error("--access-log: {0}")]
    AccessLog(AccessLogError),
    #[error("--access-log-format: {0}")]
    AccessLogFormat(AccessLogError),
    #[error(
        "--cluster needs --cluster-tls DIR: this node's certificate, the cluster CA and the gossip key \
         (make them with `shoal cert ca --out CA` once, then `shoal cert node --ca CA --id ID --out DIR` per node)"
    )]
    ClusterWithoutTls,
    #[error("--cluster-tls {0}")]
    ClusterTls(CredsError),
    #[error(
        "--election-timeout-ms {election_ms} must be at least three times --raft-heartbeat-ms {heartbeat_ms} \
         (followers would elect while the leader is healthy)"
    )]
    ElectionTimeout { election_ms: u64, heartbeat_ms: u64 },
    /// The admin token file is unreadable, not private, or holds a bad line.
    #[error("--token-file {}: {error}", path.display())]
    TokenFile { path: PathBuf, error: TokenError },
}

impl NodeArgs {
    /// Node options from the flags (and the EC environment, with --ec-env).
    pub fn options(&self) -> Result<NodeOptions, OptionsError> {
        if self.tls_cert.len() != self.tls_key.len() {
            return Err(OptionsError::UnpairedTls);
        }
        let mut tls: Vec<CertFiles> = self
            .tls_cert
            .iter()
            .zip(&self.tls_key)
            .map(|(c, k)| CertFiles { cert: c.clone(), key: k.clone() })
            .collect();
        let ec = self.ec_env.as_ref().map(|p| ec_setup(p)).transpose()?;
        if let Some(found) = ec.as_ref().and_then(|e| e.tls.clone())
            && tls.is_empty()
        {
            tls.push(found);
        }
        let redirect = match &ec {
            Some(e) => e.redirect_host(!tls.is_empty()).map_err(OptionsError::EcRedirect)?,
            _ => None,
        };
        let https_port = self.https_port.or((ec.is_some() && !tls.is_empty()).then_some(443));
        if https_port.is_some() && tls.is_empty() {
            return Err(OptionsError::HttpsWithoutCert);
        }
        let cluster = self.cluster_options()?;
        let (access_log, ids) = self.observability()?;
        let id = match (&self.id, &cluster) {
            (Some(id), _) => id.clone(),
            (None, Some(c)) => c.creds.tls.me().node.clone(),
            (None, None) => default_id(),
        };
        Ok(NodeOptions {
            id,
            admin: self.admin,
            data_dir: self.data_dir.clone(),
            config: self.config.clone(),
            config_poll: Duration::from_millis(self.config_poll_ms),
            listen_ip: self.listen_ip,
            listen_ip6: self.listen_ip6.map(IpAddr::V6).or_else(|| ec_ipv6(ec.is_some(), self.listen_ip)),
            http_port: self.http_port.unwrap_or(if ec.is_some() { 80 } else { 8080 }),
            https_port,
            tls,
            backend_ca: self.backend_ca.clone(),
            https_redirect: self.https_redirect.clone().or(redirect),
            ec,
            access_log,
            ids,
            accept_proxy_from: self.accept_proxy_from.clone(),
            threads: self.threads,
            zone: self.zone.clone(),
            limits: Limits {
                max_header_bytes: self.max_header_bytes,
                max_connections: self.max_connections,
                max_headers: self.max_headers,
                header_timeout: Duration::from_secs(self.header_timeout.max(1)),
                keepalive_timeout: Duration::from_secs(self.keepalive_timeout.max(1)),
                tls_handshake_timeout: Duration::from_secs(self.tls_handshake_timeout.max(1)),
            },
            drain_timeout: Duration::from_secs(self.drain_timeout),
            cluster,
            admin_token: String::new(),
            admin_token_file: Some(self.admin_token_file()?),
            admin_tls: match (&self.admin_tls_cert, &self.admin_tls_key) {
                (Some(cert), Some(key)) => Some(CertFiles { cert: cert.clone(), key: key.clone() }),
                _ => None,
            },
            public_metrics: self.public_metrics,
            grpc_allow_unauthenticated: self.grpc_allow_unauthenticated,
            fault_injection: self.fault_injection,
        })
    }

    /// The access log and request-id settings: flags first, then the --config file's `[node]` table.
    fn observability(&self) -> Result<(Option<AccessLogOptions>, IdSettings), OptionsError> {
        let file = match &self.config {
            Some(path) => {
                crate::config::load(path).map_err(|error| OptionsError::Config { path: path.clone(), error })?.node
            }
            None => Default::default(),
        };
        let on = |flag: Option<Switch>, file: Option<bool>| flag.map_or(file.unwrap_or(true), |s| s == Switch::On);
        let ids = IdSettings {
            request_id: on(self.request_id, file.request_id),
            traceparent: on(self.traceparent, file.traceparent),
        };
        let target = self.access_log.as_deref().or(file.access_log.as_deref()).unwrap_or("off");
        let target = accesslog::parse_target(target).map_err(OptionsError::AccessLog)?;
        let format = self.access_log_format.as_deref().or(file.access_log_format.as_deref()).unwrap_or("json");
        let format: accesslog::Format = format.parse().map_err(OptionsError::AccessLogFormat)?;
        Ok((target.map(|target| AccessLogOptions { target, format }), ids))
    }

    fn cluster_options(&self) -> Result<Option<ClusterOptions>, OptionsError> {
        let Some(addr) = self.cluster else { return Ok(None) };
        let dir = self.cluster_tls.as_ref().ok_or(OptionsError::ClusterWithoutTls)?;
        let creds = ClusterCreds::load(dir).map_err(OptionsError::ClusterTls)?;
        let expect = self.expect.unwrap_or(if self.join.is_empty() { 1 } else { 0 });
        let mut c = ClusterOptions::new(addr, self.join.clone(), expect, creds);
        if let Some(name) = &self.cluster_name {
            c.name = name.clone();
        }
        c.probe_replicas = self.probe_replicas.max(1);
        c.policy.dead_grace = Duration::from_secs(self.dead_voter_grace);
        c.gossip_interval = Duration::from_millis(self.gossip_interval_ms.max(10));
        if self.election_timeout_ms < 3 * self.raft_heartbeat_ms.max(10) {
            return Err(OptionsError::ElectionTimeout {
                election_ms: self.election_timeout_ms,
                heartbeat_ms: self.raft_heartbeat_ms,
            });
        }
        c.raft = RaftTiming::new(
            Duration::from_millis(self.raft_heartbeat_ms.max(10)),
            Duration::from_millis(self.election_timeout_ms),
        );
        Ok(Some(c))
    }

    /// The token file, checked and created (one admin token, mode 0600) when missing.
    fn admin_token_file(&self) -> Result<PathBuf, OptionsError> {
        let path = self.token_file.clone().unwrap_or_else(|| self.data_dir.join("admin.token"));
        match crate::admin::tokens::load_or_create(&path) {
            Ok(_) => Ok(path),
            Err(error) => Err(OptionsError::TokenFile { path, error }),
        }
    }
}

/// The EC image listened on `[::]:80` and `[::]:443` beside IPv4: so does EC mode when the
/// node listens on every IPv4 address.
fn ec_ipv6(ec: bool, listen_ip: Option<IpAddr>) -> Option<IpAddr> {
    let everywhere = listen_ip.is_none_or(|ip| ip == IpAddr::from([0, 0, 0, 0]));
    (ec && everywhere).then_some(IpAddr::from(std::net::Ipv6Addr::UNSPECIFIED))
}

/// Reads an EC env file, or the process environment for "-".
fn ec_setup(path: &std::path::Path) -> Result<crate::ec::EcSetup, OptionsError> {
    let bad = |error| OptionsError::EcEnv { path: path.to_path_buf(), error };
    let vars = if path.as_os_str() == "-" {
        crate::ec::process_env()
    } else {
        let text = std::fs::read_to_string(path)
            .map_err(|error| OptionsError::ReadEcEnv { path: path.to_path_buf(), error })?;
        crate::ec::parse_env(&text).map_err(bad)?
    };
    let home = std::env::var_os("HOME").map(PathBuf::from);
    crate::ec::setup(&vars, home.as_deref()).map_err(bad)
}

fn default_id() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "shoal-1".into())
}

/// Where the admin API is.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// Admin API of any node.
    #[arg(long, env = "SHOAL_ADMIN", default_value = "http://127.0.0.1:8081")]
    pub admin: String,
    /// Admin API bearer token.
    #[arg(long, env = "SHOAL_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// File holding the admin token (e.g. a node's <data-dir>/admin.token: its first token).
    #[arg(long, conflicts_with = "token")]
    pub token_file: Option<PathBuf>,
    /// CA certificate (PEM) that an https:// --admin is verified against [default: the
    /// system bundle].
    #[arg(long, env = "SHOAL_ADMIN_CA")]
    pub admin_ca: Option<PathBuf>,
    /// Print the raw JSON answer.
    #[arg(long)]
    pub json: bool,
}

// Parsed once per command line: the size of the largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum PoolCmd {
    /// Create a pool or change its settings.
    Add(PoolAddArgs),
    /// Remove a pool (established connections finish).
    Rm {
        pool: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List pools.
    List {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show a pool's health table.
    Health {
        pool: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Debug, Args)]
pub struct PoolAddArgs {
    pub pool: String,
    /// URL pattern (HTTP pools), Go ServeMux style: "/", "/api/", "host/path".
    #[arg(long)]
    pub pattern: Option<String>,
    /// Listener port (TCP pools).
    #[arg(long)]
    pub listen: Option<u16>,
    #[arg(long, value_enum, default_value_t = Choice(Protocol::Http))]
    pub protocol: Choice<Protocol>,
    #[arg(long, value_enum, default_value_t = Choice(Algorithm::RoundRobin))]
    pub algorithm: Choice<Algorithm>,
    /// Health check kind (default: http for HTTP pools, tcp for TCP pools, heartbeat with --heartbeat-port).
    #[arg(long, value_enum)]
    pub check: Option<Choice<CheckKind>>,
    #[arg(long)]
    pub health_path: Option<String>,
    #[arg(long)]
    pub interval_ms: Option<u64>,
    #[arg(long)]
    pub timeout_ms: Option<u64>,
    #[arg(long)]
    pub rise: Option<u32>,
    #[arg(long)]
    pub fall: Option<u32>,
    /// UDP port for seed 004 heartbeats.
    #[arg(long)]
    pub heartbeat_port: Option<u16>,
    /// Accept backends that identify themselves by heartbeat without being configured.
    #[arg(long)]
    pub self_register: bool,
    /// Secret heartbeat backends must prove (challenge-response and signed keepalives).
    #[arg(long)]
    pub heartbeat_secret: Option<String>,
    /// Let a self-registering pool without a secret accept anyone who reaches its heartbeat port.
    #[arg(long)]
    pub allow_unauthenticated_heartbeats: bool,
    /// Require a 2xx status from health checks too.
    #[arg(long)]
    pub require_2xx: bool,
    /// TCP pools: accept only these sources (CIDR blocks, comma separated), each connection
    /// starting with a PROXY protocol header that names the client.
    #[arg(long, value_delimiter = ',', value_name = "CIDR")]
    pub accept_proxy_from: Vec<String>,
    /// Send a PROXY protocol header of this version ahead of every backend connection.
    #[arg(long, value_enum)]
    pub send_proxy: Option<Choice<Version>>,
    /// Most requests or connections in flight to each backend from one node (0: no limit).
    #[arg(long)]
    pub max_connections: Option<u32>,
    /// Requests that may wait for a slot when every backend is at --max-connections.
    #[arg(long)]
    pub queue_max: Option<u32>,
    /// Longest wait for a slot before a 503 (ms).
    #[arg(long)]
    pub queue_timeout_ms: Option<u64>,
    /// Seconds over which a backend that turns healthy ramps to its full weight (0: off).
    #[arg(long)]
    pub slow_start_s: Option<u32>,
    /// Eject a backend after this many consecutive 5xx answers (turns outlier detection on).
    #[arg(long)]
    pub outlier_consecutive_5xx: Option<u32>,
    /// First outlier ejection time (ms); each further ejection lasts one more of these.
    #[arg(long, requires = "outlier_consecutive_5xx")]
    pub outlier_base_ejection_ms: Option<u64>,
    /// Most of the pool's backends ejected as outliers at once (percent).
    #[arg(long, requires = "outlier_consecutive_5xx")]
    pub outlier_max_ejection_percent: Option<u8>,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Debug, Subcommand)]
pub enum ClusterCmd {
    /// Remove a stopped node from the Raft membership now, instead of after
    /// --dead-voter-grace. Refused while the node is live in gossip (stop it first) or when
    /// the voters left would lack a live majority. A removed node rejoins by starting again.
    Remove {
        /// The node's name or Raft id (`shoal status` shows both).
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum BackendCmd {
    /// Add a backend (refused if its first health check fails, unless --force).
    Add(BackendAddArgs),
    /// Remove a backend (established connections finish).
    Rm {
        pool: String,
        addr: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Join a pool from the backend's own host (seed 002's startProxy); same as add.
    Join(BackendAddArgs),
    /// Leave a pool from the backend's own host (seed 002's stopProxy): drain, wait for
    /// connections in flight on every node to finish (or the timeout), then remove.
    Leave {
        pool: String,
        addr: String,
        /// Seconds to wait for established connections.
        #[arg(long, default_value_t = 30)]
        drain_timeout: u64,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Stop sending new work to a backend (or resume with --undo).
    Drain {
        pool: String,
        addr: String,
        #[arg(long)]
        undo: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Debug, Args)]
pub struct BackendAddArgs {
    pub pool: String,
    /// Backend address, ip:port.
    pub addr: String,
    #[arg(long)]
    pub url_path: Option<String>,
    #[arg(long)]
    pub weight: Option<u32>,
    #[arg(long)]
    pub zone: Option<String>,
    /// UDP address the backend sends heartbeats from (heartbeat pools).
    #[arg(long)]
    pub heartbeat_addr: Option<SocketAddr>,
    /// Slot for pinned requests (gwN is slot N).
    #[arg(long)]
    pub slot: Option<u32>,
    /// Add even if the first health check fails.
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// Runs a parsed command line to completion.
pub fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Node(args) => run_node(*args),
        Command::Dev(args) => dev::run(args),
        Command::CheckConfig { file } => check_config(&file),
        Command::DemoBackend(args) => run_demo(args),
        Command::Cert(cmd) => cert::run(cmd),
        other => client_main(other),
    }
}

/// Sets up logging for long-running commands.
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,openraft=warn".into());
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).try_init(),
    };
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).thread_name("shoal-control").enable_all().build()
}

/// Exit status of a node whose Raft storage failed while it ran (sysexits' `EX_IOERR`): it
/// exits at once so clients fail over and its supervisor restarts it from its data directory.
pub const EXIT_STORAGE_FAILED: u8 = 74;
/// Exit status of a node whose Raft core stopped for another reason, a panic (`EX_SOFTWARE`).
pub const EXIT_RAFT_STOPPED: u8 = 70;

fn run_node(args: NodeArgs) -> ExitCode {
    init_logging(args.log_format);
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => return fail(2, format!("cannot start runtime: {e}")),
    };
    catch_file_size_signal(&rt);
    let opts = match args.options() {
        Ok(o) => o,
        Err(e) => return fail(2, e.to_string()),
    };
    // The clock is the process's: set here, before anything reads it (a node's first gossip
    // generation and sequence come from it).
    if let Some(ms) = args.fault_clock_offset_ms
        && let Err(e) = crate::clock::set_offset_ms(ms)
    {
        return fail(2, format!("--fault-clock-offset-ms: {e}"));
    }
    let data_dir = opts.data_dir.clone();
    let upgrade_drain = Duration::from_secs(args.upgrade_drain);
    let drain_timeout = Duration::from_secs(args.drain_timeout);
    takeover::remember_executable();
    let failed = rt.block_on(async {
        let node = match takeover::start(opts).await {
            Ok(n) => n,
            Err(e) => return Err(fail(1, format!("{e:#}"))),
        };
        let offer = match crate::upgrade::Offer::bind(&data_dir) {
            Ok(o) => Some(o),
            Err(e) => {
                tracing::warn!(error = %e, "no upgrade socket in the data directory: seamless upgrades are off");
                None
            }
        };
        let result = takeover::serve(node, offer.as_ref(), upgrade_drain, drain_timeout).await;
        if let Some(o) = &offer {
            o.remove();
        }
        Ok(result)
    });
    match failed {
        Ok(None) => ExitCode::SUCCESS,
        Err(code) => code,
        Ok(Some(failure)) => {
            // No drain: the control plane is gone and the in-memory view can't be trusted.
            let code = match failure {
                CoreFailure::Storage(_) => EXIT_STORAGE_FAILED,
                CoreFailure::Stopped(_) => EXIT_RAFT_STOPPED,
            };
            tracing::error!(
                data_dir = %data_dir.display(),
                exit_code = code,
                "{failure}; exiting so the supervisor restarts the node from its data directory"
            );
            rt.shutdown_background();
            ExitCode::from(code)
        }
    }
}

/// Runs the demo backend until Ctrl-C.
fn run_demo(args: crate::demo::DemoArgs) -> ExitCode {
    init_logging(LogFormat::Human);
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return fail(2, format!("cannot start runtime: {e}")),
    };
    rt.block_on(async move {
        let result = tokio::select! {
            r = crate::demo::serve(args) => r,
            _ = wait_for_signal() => Ok(()),
        };
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(1, format!("{e:#}")),
        }
    })
}

/// Writing past a file-size limit (`ulimit -f`, systemd's `LimitFSIZE=`) raises SIGXFSZ, which
/// kills the process by default; with it caught the write fails with EFBIG instead, and Raft's
/// storage error path handles it as it handles a full disk (PostgreSQL ignores it likewise).
fn catch_file_size_signal(rt: &tokio::runtime::Runtime) {
    use tokio::signal::unix::{SignalKind, signal};
    let _in_runtime = rt.enter();
    match signal(SignalKind::from_raw(libc::SIGXFSZ)) {
        // tokio keeps the handler installed for the life of the process.
        Ok(stream) => drop(stream),
        Err(e) => tracing::warn!(error = %e, "cannot catch SIGXFSZ: a file-size limit would kill the node"),
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => return std::future::pending().await,
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

fn check_config(file: &std::path::Path) -> ExitCode {
    match crate::config::load(file) {
        Ok(cfg) => {
            println!("{}: ok, {}", file.display(), crate::config::summary(&cfg));
            ExitCode::SUCCESS
        }
        Err(e) => fail(1, format!("{}: {e}", file.display())),
    }
}

/// Prints `error: msg` and returns the exit code.
pub fn fail(code: u8, msg: String) -> ExitCode {
    eprintln!("error: {msg}");
    ExitCode::from(code)
}

fn client_main(cmd: Command) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return fail(2, format!("cannot start runtime: {e}")),
    };
    match rt.block_on(client_verb(cmd)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => match e.downcast_ref::<ApiFailure>() {
            Some(f) => fail(1, format!("{} ({})", f.message, f.status)),
            None => fail(1, format!("{e:#}")),
        },
    }
}

/// Percent-encodes what may not stand in a URL path segment (IPv6 brackets, '%', '/').
pub fn seg(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '[' => "%5B".to_string(),
            ']' => "%5D".to_string(),
            '%' => "%25".to_string(),
            '/' => "%2F".to_string(),
            ' ' => "%20".to_string(),
            c => c.to_string(),
        })
        .collect()
}

async fn client_verb(cmd: Command) -> anyhow::Result<()> {
    match cmd {
        Command::Pool(PoolCmd::Add(args)) => pool_add(args).await,
        Command::Pool(PoolCmd::Rm { pool, client }) => {
            let r: WriteResult =
                connect(&client)?.call(Method::DELETE, &format!("/v1/pools/{}", seg(&pool)), None).await?;
            output::written(&client, &r, &format!("pool {pool} removed"))
        }
        Command::Pool(PoolCmd::List { client }) => {
            let pools: Vec<Pool> = connect(&client)?.get("/v1/pools").await?;
            output::pools(&client, &pools)
        }
        Command::Pool(PoolCmd::Health { pool, client }) => {
            let h: PoolHealth = connect(&client)?.get(&format!("/v1/pools/{}/health", seg(&pool))).await?;
            output::health(&client, &h)
        }
        Command::Backend(BackendCmd::Add(args) | BackendCmd::Join(args)) => backend_add(args).await,
        Command::Backend(BackendCmd::Leave { pool, addr, drain_timeout, client }) => {
            let path = format!("/v1/pools/{}/backends/{}/leave", seg(&pool), seg(&addr));
            let body = json!({ "drain_timeout_s": drain_timeout });
            let mut admin = connect(&client)?;
            admin.set_timeout(Duration::from_secs(drain_timeout + 30));
            let r: Value = admin.call(Method::POST, &path, Some(body)).await?;
            output::left(&client, &r, &pool, &addr)
        }
        Command::Backend(BackendCmd::Rm { pool, addr, client }) => {
            let path = format!("/v1/pools/{}/backends/{}", seg(&pool), seg(&addr));
            let r: WriteResult = connect(&client)?.call(Method::DELETE, &path, None).await?;
            output::written(&client, &r, &format!("backend {addr} removed from {pool}"))
        }
        Command::Backend(BackendCmd::Drain { pool, addr, undo, client }) => {
            let path = format!("/v1/pools/{}/backends/{}/drain", seg(&pool), seg(&addr));
            let r: WriteResult = connect(&client)?.call(Method::PUT, &path, Some(json!({ "drain": !undo }))).await?;
            let what = if undo { "back in rotation" } else { "draining" };
            output::written(&client, &r, &format!("backend {addr} of {pool} {what}"))
        }
        Command::Cluster(ClusterCmd::Remove { id, client }) => {
            let path = format!("/v1/cluster/nodes/{}", seg(&id));
            let r: RemovedNode = connect(&client)?.call(Method::DELETE, &path, None).await?;
            output::removed(&client, &r)
        }
        Command::Status { client } => {
            let v: ClusterView = connect(&client)?.get("/v1/cluster").await?;
            output::cluster(&client, &v)
        }
        Command::Revoke { cert, serial, client } => {
            let (serial, node) = revoked(cert.as_deref(), serial)?;
            let body = json!({ "serial": serial, "node": node });
            let r: WriteResult = connect(&client)?.call(Method::POST, "/v1/cluster/revoke", Some(body)).await?;
            output::written(&client, &r, &format!("certificate {serial} refused by every node"))
        }
        Command::Node(_)
        | Command::Dev(_)
        | Command::CheckConfig { .. }
        | Command::DemoBackend(_)
        | Command::Cert(_) => Ok(()),
    }
}

/// The serial (and node name) to revoke, from a certificate file or as given.
fn revoked(cert: Option<&std::path::Path>, serial: Option<String>) -> anyhow::Result<(String, String)> {
    match (cert, serial) {
        (Some(path), _) => {
            let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("--cert {}: {e}", path.display()))?;
            let id = crate::control::pki::node_identity_pem(&text, path)?;
            Ok((id.serial, id.node))
        }
        (None, Some(serial)) => Ok((serial.to_ascii_lowercase().replace(':', ""), String::new())),
        (None, None) => Err(anyhow::anyhow!("give --cert FILE or --serial HEX")),
    }
}

fn connect(client: &ClientArgs) -> anyhow::Result<AdminClient> {
    let token = match (&client.token, &client.token_file) {
        (Some(t), _) => Some(t.trim().to_string()),
        (None, Some(f)) => Some(first_token(
            &crate::files::read_secret(f).map_err(|e| anyhow::anyhow!("--token-file {}: {e}", f.display()))?,
        )),
        (None, None) => None,
    };
    let admin = AdminClient::new(&client.admin)?.with_token(token);
    match (admin.is_https(), &client.admin_ca) {
        (true, ca) => admin.with_ca(ca.as_deref()),
        (false, Some(_)) => Err(anyhow::anyhow!("--admin-ca needs an https:// --admin address")),
        (false, None) => Ok(admin),
    }
}

/// The first token of a token file (its first line that is not a comment), scope dropped.
fn first_token(text: &str) -> String {
    let line = text.lines().map(|l| l.split('#').next().unwrap_or("").trim()).find(|l| !l.is_empty());
    line.and_then(|l| l.split_whitespace().next()).unwrap_or_default().to_string()
}

async fn pool_add(a: PoolAddArgs) -> anyhow::Result<()> {
    let path = format!("/v1/pools/{}", seg(&a.pool));
    let r: WriteResult = connect(&a.client)?.call(Method::PUT, &path, Some(pool_body(&a))).await?;
    output::written(&a.client, &r, &format!("pool {} saved", a.pool))
}

/// The `PUT /v1/pools/{pool}` body: the flags given, in the proto enums' serde names.
fn pool_body(a: &PoolAddArgs) -> Value {
    let tcp = a.protocol.0 == Protocol::Tcp || (a.listen.is_some() && a.pattern.is_none());
    let protocol = if tcp { Protocol::Tcp } else { Protocol::Http };
    let mut limits = json!({});
    add_limits(&mut limits, a);
    let mut health = serde_json::Map::new();
    insert_some(&mut health, "check", a.check.map(|c| json!(c.0)));
    insert_some(&mut health, "path", a.health_path.clone().map(Value::from));
    insert_some(&mut health, "interval_ms", a.interval_ms.map(Value::from));
    insert_some(&mut health, "timeout_ms", a.timeout_ms.map(Value::from));
    insert_some(&mut health, "rise", a.rise.map(Value::from));
    insert_some(&mut health, "fall", a.fall.map(Value::from));
    insert_some(&mut health, "heartbeat_port", a.heartbeat_port.map(Value::from));
    insert_some(&mut health, "heartbeat_secret", a.heartbeat_secret.clone().map(Value::from));
    if a.require_2xx {
        health.insert("require_2xx".into(), Value::from(true));
    }
    let mut body = json!({
        "protocol": protocol,
        "algorithm": a.algorithm.0,
        "health": health,
        "self_register": a.self_register,
        "allow_unauthenticated_heartbeats": a.allow_unauthenticated_heartbeats,
    });
    if let Some(p) = &a.pattern {
        body["pattern"] = Value::from(p.clone());
    }
    if let Some(l) = a.listen {
        body["listen"] = Value::from(l);
    }
    if !a.accept_proxy_from.is_empty() {
        body["accept_proxy_from"] = Value::from(a.accept_proxy_from.clone());
    }
    if let Some(v) = a.send_proxy {
        body["send_proxy"] = json!(v.0);
    }
    if let (Some(body), Value::Object(limits)) = (body.as_object_mut(), limits) {
        body.extend(limits);
    }
    body
}

/// Backend protection flags: only those given are sent, so the pool's defaults apply to the rest.
fn add_limits(body: &mut Value, a: &PoolAddArgs) {
    let Some(map) = body.as_object_mut() else { return };
    insert_some(map, "max_connections", a.max_connections.map(Value::from));
    insert_some(map, "queue_max", a.queue_max.map(Value::from));
    insert_some(map, "queue_timeout_ms", a.queue_timeout_ms.map(Value::from));
    insert_some(map, "slow_start_s", a.slow_start_s.map(Value::from));
    if let Some(n) = a.outlier_consecutive_5xx {
        let mut outlier = serde_json::Map::new();
        outlier.insert("consecutive_5xx".into(), Value::from(n));
        insert_some(&mut outlier, "base_ejection_ms", a.outlier_base_ejection_ms.map(Value::from));
        insert_some(&mut outlier, "max_ejection_percent", a.outlier_max_ejection_percent.map(Value::from));
        map.insert("outlier".into(), Value::Object(outlier));
    }
}

fn insert_some(map: &mut serde_json::Map<String, Value>, key: &str, value: Option<Value>) {
    if let Some(v) = value {
        map.insert(key.into(), v);
    }
}

async fn backend_add(a: BackendAddArgs) -> anyhow::Result<()> {
    let mut body = serde_json::Map::new();
    insert_some(&mut body, "url_path", a.url_path.map(Value::from));
    insert_some(&mut body, "weight", a.weight.map(Value::from));
    insert_some(&mut body, "zone", a.zone.map(Value::from));
    insert_some(&mut body, "heartbeat_addr", a.heartbeat_addr.map(|h| Value::from(h.to_string())));
    insert_some(&mut body, "slot", a.slot.map(Value::from));
    if a.force {
        body.insert("force".into(), Value::from(true));
    }
    let path = format!("/v1/pools/{}/backends/{}", seg(&a.pool), seg(&a.addr));
    let r: WriteResult = connect(&a.client)?.call(Method::PUT, &path, Some(Value::Object(body))).await?;
    output::written(&a.client, &r, &format!("backend {} added to {}", a.addr, a.pool))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ec_mode_listens_on_ipv6_beside_every_ipv4_address() {
        let any6 = Some(IpAddr::from(std::net::Ipv6Addr::UNSPECIFIED));
        assert_eq!(ec_ipv6(true, None), any6);
        assert_eq!(ec_ipv6(true, Some(IpAddr::from([0, 0, 0, 0]))), any6);
        assert_eq!(ec_ipv6(true, Some(IpAddr::from([127, 0, 0, 1]))), None, "one chosen address stays one");
        assert_eq!(ec_ipv6(false, None), None, "only EC mode (the nginx image) adds [::]");
    }

    /// Why `shoal node ARGS` would not start.
    fn refused(args: &[&str]) -> OptionsError {
        let cli = Cli::try_parse_from(["shoal", "node"].iter().chain(args)).expect("the flags parse");
        let Command::Node(node) = cli.command else { panic!("not `shoal node`") };
        match node.options() {
            Ok(_) => panic!("{args:?} was accepted"),
            Err(e) => e,
        }
    }

    /// The line `shoal node ARGS` prints after `error: `.
    fn refusal(args: &[&str]) -> String {
        refused(args).to_string()
    }

    #[test]
    fn bad_node_flags_name_the_flag_and_the_problem() {
        assert_eq!(refusal(&["--tls-cert", "c.pem"]), "--tls-cert and --tls-key must come in pairs");
        assert_eq!(refusal(&["--https-port", "8443"]), "--https-port needs --tls-cert and --tls-key");
        assert_eq!(refusal(&["--access-log", ""]), "--access-log: must be off, stdout or a file path");
        assert_eq!(
            refusal(&["--cluster", "127.0.0.1:7946"]),
            "--cluster needs --cluster-tls DIR: this node's certificate, the cluster CA and the gossip key \
             (make them with `shoal cert ca --out CA` once, then `shoal cert node --ca CA --id ID --out DIR` per node)"
        );
        let missing = "No such file or directory (os error 2)";
        assert_eq!(
            refusal(&["--cluster", "127.0.0.1:7946", "--cluster-tls", "/nonexistent-shoal"]),
            format!("--cluster-tls /nonexistent-shoal/node.key: {missing}")
        );
        assert_eq!(
            refusal(&["--ec-env", "/nonexistent-shoal.env"]),
            format!("--ec-env /nonexistent-shoal.env: {missing}")
        );
        // config::load names the file itself, so the path shows twice (kept as it was).
        assert_eq!(
            refusal(&["--config", "/nonexistent-shoal.toml"]),
            format!("/nonexistent-shoal.toml: /nonexistent-shoal.toml: cannot read: {missing}")
        );
    }

    #[test]
    fn bad_node_files_name_the_file_and_the_problem() {
        let dir = tempfile::tempdir().expect("dir");
        let path = |name: &str| dir.path().join(name).to_str().expect("utf8").to_string();
        std::fs::write(path("no-list.env"), "DNS_NAME=lb.example.test\n").expect("env");
        assert_eq!(
            refusal(&["--ec-env", &path("no-list.env")]),
            format!("{}: GATEWAY_LIST: missing: list the gateways as \"ip:port ip:port\"", path("no-list.env"))
        );
        std::fs::write(path("garbled.env"), "GATEWAY_LIST\n").expect("env");
        assert_eq!(
            refusal(&["--ec-env", &path("garbled.env")]),
            format!("{}: line 1: \"GATEWAY_LIST\" is not KEY=VALUE", path("garbled.env"))
        );
        std::fs::write(path("no-name.env"), "GATEWAY_LIST=127.0.0.1:9000\n").expect("env");
        assert_eq!(
            refusal(&["--ec-env", &path("no-name.env"), "--tls-cert", "c.pem", "--tls-key", "k.pem"]),
            "--ec-env: DNS_NAME: is needed with a certificate: port 80 redirects to https://DNS_NAME"
        );
        std::fs::write(path("short.token"), "short\n").expect("token");
        std::fs::set_permissions(path("short.token"), std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .expect("mode");
        let short = refused(&["--data-dir", &path("data"), "--token-file", &path("short.token")]);
        assert!(matches!(short, OptionsError::TokenFile { error: TokenError::Line { .. }, .. }), "{short:?}");
        assert_eq!(
            short.to_string(),
            format!("--token-file {}: line 1: a token must be at least 16 characters", path("short.token"))
        );

        let ca = dir.path().join("ca");
        cert::make_ca("prod", &ca, 10).expect("ca");
        cert::make_node(&ca, "n1", &dir.path().join("n1"), 10).expect("node");
        let cluster = ["--cluster", "127.0.0.1:7946", "--cluster-tls", &path("n1")];
        assert_eq!(
            refusal(&[&cluster[..], &["--raft-heartbeat-ms", "200", "--election-timeout-ms", "500"]].concat()),
            "--election-timeout-ms 500 must be at least three times --raft-heartbeat-ms 200 \
             (followers would elect while the leader is healthy)"
        );
        std::fs::write(dir.path().join("n1").join("cluster.key"), "not hex\n").expect("key");
        let bad_key = refused(&cluster);
        assert!(matches!(bad_key, OptionsError::ClusterTls(CredsError::Key(_))), "{bad_key:?}");
        assert_eq!(
            refusal(&cluster),
            format!(
                "--cluster-tls {}/cluster.key: a cluster key is 64 hex digits (`shoal cert ca` makes one)",
                path("n1")
            )
        );
    }

    #[test]
    fn the_client_sends_the_first_token_of_a_file() {
        assert_eq!(first_token("abc\n"), "abc");
        assert_eq!(first_token("# rotated 2026-11\n\n  tok1 admin  # ops\ntok2 read\n"), "tok1");
        assert_eq!(first_token("# nothing\n"), "");
    }
}
