//! What a node can be told: `NodeOptions` (everything `shoal node` takes), how it joins a
//! cluster and what it proves itself with.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::control::gossip_auth::GossipFilter;
use crate::control::membership::Policy;
use crate::control::pki::PkiError;
use crate::control::raft::RaftTiming;
use crate::control::raft::channel::{RaftTls, TlsFiles};
use crate::control::raft::network::LinkFilter;
use crate::control::secure::{ClusterKey, KeyError};
use crate::dataplane::Limits;
use crate::dataplane::accesslog;
use crate::dataplane::reqid::IdSettings;
use crate::dataplane::tls::CertFiles;

/// How a node joins a cluster (`--cluster`, `--join`, `--expect`).
#[derive(Clone)]
pub struct ClusterOptions {
    /// Gossip (UDP) and Raft RPC (TCP) address.
    pub addr: SocketAddr,
    pub join: Vec<String>,
    /// Bootstrap once this many nodes see each other (0: never bootstrap, only join).
    pub expect: usize,
    pub name: String,
    pub gossip_interval: Duration,
    pub probe_replicas: usize,
    pub policy: Policy,
    pub raft: RaftTiming,
    /// Test seam: which Raft links work.
    pub link_filter: Option<LinkFilter>,
    /// Test seam: which peers' gossip gets through (partitions at first boot).
    pub gossip_filter: Option<GossipFilter>,
    /// This node's certificate (Raft RPC) and the cluster's gossip key.
    pub creds: ClusterCreds,
}

/// What a node proves itself with: its certificate from the cluster CA for Raft RPC (mutual
/// TLS), and the cluster's shared key for gossip (UDP). `shoal cert node` writes both.
#[derive(Clone, Debug)]
pub struct ClusterCreds {
    pub tls: Arc<RaftTls>,
    pub key: ClusterKey,
}

/// Why a `--cluster-tls` directory could not be used: its certificates, or its gossip key.
/// Both name the file.
#[derive(Debug, thiserror::Error)]
pub enum CredsError {
    #[error(transparent)]
    Tls(#[from] PkiError),
    #[error(transparent)]
    Key(#[from] KeyError),
}

impl ClusterCreds {
    /// Reads a directory `shoal cert node --out DIR` wrote; errors name the file.
    pub fn load(dir: &std::path::Path) -> Result<ClusterCreds, CredsError> {
        let tls = RaftTls::load(TlsFiles::in_dir(dir))?;
        let key = ClusterKey::load(&dir.join(crate::control::pki::GOSSIP_KEY))?;
        Ok(ClusterCreds { tls: Arc::new(tls), key })
    }
}

impl ClusterOptions {
    /// Options for a node of the cluster its certificate names.
    pub fn new(addr: SocketAddr, join: Vec<String>, expect: usize, creds: ClusterCreds) -> ClusterOptions {
        ClusterOptions {
            addr,
            join,
            expect,
            name: creds.tls.me().cluster.clone(),
            gossip_interval: Duration::from_millis(200),
            probe_replicas: 2,
            policy: Policy::default(),
            raft: RaftTiming::default(),
            link_filter: None,
            gossip_filter: None,
            creds,
        }
    }
}

/// Everything `shoal node` can be told.
#[derive(Clone)]
pub struct NodeOptions {
    pub id: String,
    /// Admin API address (port 0 picks a free port).
    pub admin: SocketAddr,
    pub data_dir: PathBuf,
    pub config: Option<PathBuf>,
    /// How often the config file is re-read (zero: only on SIGHUP).
    pub config_poll: Duration,
    /// IP every data listener binds. `None`: a seed config's IP, else 0.0.0.0.
    pub listen_ip: Option<IpAddr>,
    /// An IPv6 address the HTTP and HTTPS listeners also bind (IPv6-only, same ports), as
    /// nginx's `listen [::]:80`; skipped with a log line when the host has no IPv6.
    pub listen_ip6: Option<IpAddr>,
    /// The node's HTTP listener port (0 picks a free port).
    pub http_port: u16,
    /// Data-plane worker threads (0: one per core).
    pub threads: usize,
    pub zone: String,
    pub limits: Limits,
    /// How long established connections may finish after shutdown starts.
    pub drain_timeout: Duration,
    /// `None`: a one-node cluster of its own.
    pub cluster: Option<ClusterOptions>,
    /// The HTTPS listener's port (needs `tls`).
    pub https_port: Option<u16>,
    /// Server certificates (node-local files; the first is the default, others by SNI).
    pub tls: Vec<CertFiles>,
    /// CA bundle for TLS to backends (default: the system bundle).
    pub backend_ca: Option<PathBuf>,
    /// The plain HTTP listener redirects every request to `https://<host>`.
    pub https_redirect: Option<String>,
    /// EC compatibility mode (`--ec-env`): its pool is applied like a config file, and
    /// gateways named by host name are resolved again while the node runs.
    pub ec: Option<crate::ec::EcSetup>,
    /// The access log: where records go and how they are written (`None`: off).
    pub access_log: Option<AccessLogOptions>,
    /// Whether requests get an `X-Request-Id` and a `traceparent`.
    pub ids: IdSettings,
    /// Sources allowed on the HTTP and HTTPS listeners, each connection starting with a
    /// PROXY protocol header (`--accept-proxy-from`); empty: no header expected.
    pub accept_proxy_from: Vec<shoal_proto::proxy::Cidr>,
    /// Bearer token of the admin API (admin scope), used when `admin_token_file` is `None`.
    pub admin_token: String,
    /// Scoped admin tokens (see `admin::tokens`), re-read when the file changes; replaces
    /// `admin_token`.
    pub admin_token_file: Option<PathBuf>,
    /// Certificate and key of the admin listener: HTTPS (and gRPC over h2 by ALPN) instead of
    /// plain HTTP/h2c.
    pub admin_tls: Option<CertFiles>,
    /// Serve `/metrics` without the token.
    pub public_metrics: bool,
    /// Accept gRPC control calls without the token (`--grpc-allow-unauthenticated`).
    pub grpc_allow_unauthenticated: bool,
    /// Serve the fault-injection endpoints (`--fault-injection`, chaos tests only).
    pub fault_injection: bool,
}

impl NodeOptions {
    /// Options for a node on `ip` with everything else defaulted (tests, `shoal dev`).
    pub fn local(id: &str, ip: IpAddr, data_dir: PathBuf) -> NodeOptions {
        NodeOptions {
            id: id.to_string(),
            admin: SocketAddr::new(ip, 0),
            data_dir,
            config: None,
            config_poll: Duration::from_secs(1),
            listen_ip: Some(ip),
            listen_ip6: None,
            http_port: 0,
            threads: 1,
            zone: String::new(),
            limits: Limits::default(),
            drain_timeout: Duration::from_secs(5),
            cluster: None,
            https_port: None,
            tls: Vec::new(),
            backend_ca: None,
            https_redirect: None,
            ec: None,
            access_log: None,
            ids: IdSettings::default(),
            accept_proxy_from: Vec::new(),
            admin_token: crate::control::secure::hex(&rand::random::<[u8; 16]>()),
            admin_token_file: None,
            admin_tls: None,
            public_metrics: false,
            grpc_allow_unauthenticated: false,
            fault_injection: false,
        }
    }
}

/// Where access log records go and how they are written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccessLogOptions {
    pub target: accesslog::Target,
    pub format: accesslog::Format,
}
