//! The node-to-node channel Raft RPC runs on: mutual TLS 1.3 with per-node certificates from
//! the cluster CA (`control::pki`), then `proto::codec` frames inside it.
//!
//! A dialling node verifies the peer's certificate against the DNS name of the node it means to
//! reach (`<id>.node.<cluster>.shoal`); the accepting node takes the peer's node name from its
//! certificate, and the RPC server binds it to the Raft id the peer claims. Session resumption
//! is off, so every connection re-runs chain checks. After the TLS handshake one frame each
//! way exchanges the cluster identity (see `ident.rs`), so nodes of two clusters formed apart
//! refuse each other even when one CA signed both.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use shoal_proto::codec::{self, HEADER_LEN};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_rustls::{TlsAcceptor, TlsConnector, client, server};

use super::ident::{ClusterId, compatible};
use crate::control::pki::{self, NodeIdentity, PkiError};

/// Frame kinds of the identity exchange (requests and replies use the callers' kinds).
pub const KIND_HELLO: u8 = 10;
pub const KIND_HELLO_ACK: u8 = 11;

/// The files a node's channel is made of.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    /// The files `shoal cert node --out DIR` writes.
    pub fn in_dir(dir: &Path) -> TlsFiles {
        TlsFiles { ca: dir.join(pki::CA_CERT), cert: dir.join(pki::NODE_CERT), key: dir.join(pki::NODE_KEY) }
    }
}

/// The PEM texts a channel is made of.
#[derive(Clone)]
pub struct TlsPem {
    pub ca: String,
    pub cert: String,
    pub key: String,
}

impl TlsFiles {
    fn read(&self) -> Result<TlsPem, PkiError> {
        let key = crate::files::read_secret(&self.key).map_err(|e| PkiError::File(self.key.clone(), e))?;
        Ok(TlsPem { ca: pki::read(&self.ca)?, cert: pki::read(&self.cert)?, key })
    }
}

struct Configs {
    pem: TlsPem,
    /// When the certificate in use expires (Unix seconds).
    not_after: i64,
    /// When the CA certificate in use expires (Unix seconds; 0 when it does not parse).
    ca_not_after: i64,
    client: TlsConnector,
    server: TlsAcceptor,
}

/// This node's TLS identity and the configurations made of it; reloadable.
pub struct RaftTls {
    me: NodeIdentity,
    files: Option<TlsFiles>,
    configs: ArcSwap<Configs>,
}

impl std::fmt::Debug for RaftTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RaftTls({}/{})", self.me.cluster, self.me.node)
    }
}

fn invalid(path: &Path, problem: impl ToString) -> PkiError {
    PkiError::Invalid { path: path.to_path_buf(), problem: problem.to_string() }
}

/// Builds both configurations, checking that the certificate is a node certificate the CA
/// signed. `names` label errors with the files the texts came from.
fn configs(pem: TlsPem, names: &TlsFiles) -> Result<(NodeIdentity, Configs), PkiError> {
    let ca: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem.ca.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| invalid(&names.ca, e))?;
    let mut roots = RootCertStore::empty();
    for c in ca {
        roots.add(c).map_err(|e| invalid(&names.ca, e))?;
    }
    if roots.is_empty() {
        return Err(PkiError::NotCertificate(names.ca.clone()));
    }
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem.cert.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| invalid(&names.cert, e))?;
    let leaf = chain.first().ok_or_else(|| PkiError::NotCertificate(names.cert.clone()))?;
    let me = pki::node_identity(leaf, &names.cert)?;
    let key = PrivateKeyDer::from_pem_slice(pem.key.as_bytes()).map_err(|e| invalid(&names.key, e))?;
    verify_own(leaf, &roots, &names.cert)?;

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let roots = Arc::new(roots);
    let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .map_err(|e| invalid(&names.ca, e))?;
    // Certificate validity follows shoal's wall clock (`clock`: a fault-injected jump too).
    let mut server = ServerConfig::builder_with_details(provider.clone(), Arc::new(crate::clock::WallTime))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| invalid(&names.cert, e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain.clone(), key.clone_key())
        .map_err(|e| invalid(&names.key, e))?;
    server.alpn_protocols = vec![pki::ALPN.to_vec()];
    server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    server.send_tls13_tickets = 0;
    let mut client = ClientConfig::builder_with_details(provider, Arc::new(crate::clock::WallTime))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| invalid(&names.cert, e))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| invalid(&names.key, e))?;
    client.alpn_protocols = vec![pki::ALPN.to_vec()];
    client.resumption = rustls::client::Resumption::disabled();
    let configs = Configs {
        ca_not_after: pki::expiry_pem(&pem.ca).unwrap_or(0),
        pem,
        not_after: me.not_after,
        client: TlsConnector::from(Arc::new(client)),
        server: TlsAcceptor::from(Arc::new(server)),
    };
    Ok((me, configs))
}

/// Refuses, at startup, a certificate the CA did not sign or that is not valid now.
fn verify_own(leaf: &CertificateDer<'_>, roots: &RootCertStore, path: &Path) -> Result<(), PkiError> {
    let cert = webpki::EndEntityCert::try_from(leaf).map_err(|e| invalid(path, e))?;
    let now = rustls::pki_types::UnixTime::since_unix_epoch(
        crate::clock::wall_now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default(),
    );
    let algs = rustls::crypto::ring::default_provider().signature_verification_algorithms;
    cert.verify_for_usage(algs.all, &roots.roots, &[], now, webpki::KeyUsage::client_auth(), None, None)
        .map(|_| ())
        .map_err(|e| invalid(path, format!("not usable with this CA: {e}")))
}

impl RaftTls {
    /// Loads the files (the key must be private); errors name the file and the problem.
    pub fn load(files: TlsFiles) -> Result<RaftTls, PkiError> {
        let (me, configs) = configs(files.read()?, &files)?;
        Ok(RaftTls { me, files: Some(files), configs: ArcSwap::from_pointee(configs) })
    }

    /// A channel made of PEM texts (tests and tools).
    pub fn from_pem(pem: TlsPem) -> Result<RaftTls, PkiError> {
        let names = TlsFiles { ca: "ca.pem".into(), cert: "node.pem".into(), key: "node.key".into() };
        let (me, configs) = configs(pem, &names)?;
        Ok(RaftTls { me, files: None, configs: ArcSwap::from_pointee(configs) })
    }

    /// Who this node is, as its certificate says.
    pub fn me(&self) -> &NodeIdentity {
        &self.me
    }

    /// When the certificate in use expires (Unix seconds; renewals move it).
    pub fn not_after(&self) -> i64 {
        self.configs.load().not_after
    }

    /// The certificates in use, for the expiry gauge: `("node" | "ca", file, not_after)`.
    pub fn expiries(&self) -> [(&'static str, PathBuf, i64); 2] {
        let c = self.configs.load();
        let (ca, cert) = match &self.files {
            Some(f) => (f.ca.clone(), f.cert.clone()),
            None => (pki::CA_CERT.into(), pki::NODE_CERT.into()),
        };
        [("node", cert, c.not_after), ("ca", ca, c.ca_not_after)]
    }

    /// Re-reads the files; `Ok(true)` when they changed and new connections now use them.
    /// A certificate for another node or cluster is refused and the old one kept.
    pub fn reload(&self) -> Result<bool, PkiError> {
        let Some(files) = &self.files else { return Ok(false) };
        let pem = files.read()?;
        let current = self.configs.load();
        if pem.ca == current.pem.ca && pem.cert == current.pem.cert && pem.key == current.pem.key {
            return Ok(false);
        }
        let (me, configs) = configs(pem, files)?;
        if (me.cluster.as_str(), me.node.as_str()) != (self.me.cluster.as_str(), self.me.node.as_str()) {
            return Err(invalid(
                &files.cert,
                format!("is for node {} of cluster {}; restart to change who this node is", me.node, me.cluster),
            ));
        }
        self.configs.store(Arc::new(configs));
        Ok(true)
    }

    /// Dials `peer` (its node id) over `io`; the peer's certificate must name it.
    pub async fn connect<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        io: S,
        peer: &str,
    ) -> io::Result<(Channel<client::TlsStream<S>>, NodeIdentity)> {
        let name = ServerName::try_from(pki::node_dns(&self.me.cluster, peer))
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let tls = self.configs.load().client.connect(name, io).await?;
        let identity = peer_identity(tls.get_ref().1.peer_certificates(), &self.me.cluster)?;
        if identity.node != peer {
            return Err(refused(format!("the peer's certificate names node {}, not {peer}", identity.node)));
        }
        Ok((Channel { stream: tls }, identity))
    }

    /// Accepts a connection; the client must present a node certificate of this cluster.
    pub async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        io: S,
    ) -> io::Result<(Channel<server::TlsStream<S>>, NodeIdentity)> {
        let tls = self.configs.load().server.accept(io).await?;
        let (_, conn) = tls.get_ref();
        if conn.alpn_protocol() != Some(pki::ALPN) {
            return Err(refused("the peer did not ask for shoal-raft/1".into()));
        }
        let identity = peer_identity(conn.peer_certificates(), &self.me.cluster)?;
        Ok((Channel { stream: tls }, identity))
    }
}

fn refused(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, msg)
}

/// The node identity of a verified peer chain, which must belong to `cluster`.
fn peer_identity(certs: Option<&[CertificateDer<'_>]>, cluster: &str) -> io::Result<NodeIdentity> {
    let leaf = certs.and_then(|c| c.first()).ok_or_else(|| refused("the peer sent no certificate".into()))?;
    let id = pki::node_identity(leaf, Path::new("peer certificate")).map_err(|e| refused(e.to_string()))?;
    if id.cluster != cluster {
        return Err(refused(format!("the peer's certificate is for cluster {}", id.cluster)));
    }
    Ok(id)
}

/// The handshake named another cluster identity (the error inside an `io::Error`).
#[derive(Debug, thiserror::Error)]
#[error("the peer belongs to cluster {theirs}, this node to {ours}")]
pub struct OtherCluster {
    pub ours: ClusterId,
    pub theirs: ClusterId,
}

impl OtherCluster {
    /// The mismatch an I/O error carries, if it is one.
    pub fn of(e: &io::Error) -> Option<&OtherCluster> {
        e.get_ref().and_then(|inner| inner.downcast_ref::<OtherCluster>())
    }
}

/// Refuses a peer whose identity differs from ours (either may still have none).
fn same_cluster(ours: Option<ClusterId>, theirs: Option<ClusterId>) -> io::Result<()> {
    match (ours, theirs) {
        (Some(ours), Some(theirs)) if !compatible(Some(ours), Some(theirs)) => {
            Err(io::Error::new(io::ErrorKind::PermissionDenied, OtherCluster { ours, theirs }))
        }
        _ => Ok(()),
    }
}

/// The body of both identity-exchange frames.
#[derive(Debug, Serialize, Deserialize)]
pub struct Hello {
    /// The sender's cluster identity (`None`: not initialized yet).
    pub id: Option<ClusterId>,
}

/// Largest frame of the identity exchange.
pub const MAX_HELLO: usize = 256;

/// Codec frames over an authenticated stream.
pub struct Channel<S> {
    stream: S,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Channel<S> {
    /// Client side of the identity exchange (`id`: ours).
    pub async fn hello(&mut self, id: Option<ClusterId>) -> io::Result<()> {
        self.send(KIND_HELLO, &Hello { id }).await?;
        let (kind, body) = self.read_raw(MAX_HELLO).await?;
        let theirs: Hello = decode(kind, KIND_HELLO_ACK, &body)?;
        same_cluster(id, theirs.id)
    }

    /// Server side of the identity exchange: answers with ours, then judges theirs (so both
    /// sides learn of a mismatch and count it).
    pub async fn answer_hello(&mut self, id: Option<ClusterId>) -> io::Result<()> {
        let (kind, body) = self.read_raw(MAX_HELLO).await?;
        let theirs: Hello = decode(kind, KIND_HELLO, &body)?;
        self.send(KIND_HELLO_ACK, &Hello { id }).await?;
        same_cluster(id, theirs.id)
    }

    /// Sends one message as one frame.
    pub async fn send<T: Serialize>(&mut self, kind: u8, msg: &T) -> io::Result<()> {
        let frame = codec::encode(kind, msg).map_err(|e| io::Error::other(e.to_string()))?;
        self.stream.write_all(&frame).await?;
        self.stream.flush().await
    }

    /// Receives one message.
    pub async fn recv<T: DeserializeOwned>(&mut self) -> io::Result<(u8, T)> {
        let (kind, body) = self.read_raw(codec::MAX_BODY).await?;
        let msg = codec::decode_body(&body).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        Ok((kind, msg))
    }

    /// Reads one frame's kind and raw body of at most `max` bytes; the buffer grows as bytes
    /// arrive rather than trusting the announced length up front.
    async fn read_raw(&mut self, max: usize) -> io::Result<(u8, Vec<u8>)> {
        let mut head = [0u8; HEADER_LEN];
        self.stream.read_exact(&mut head).await?;
        let header =
            codec::decode_header(&head).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        if header.len > max {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("frame of {} bytes exceeds {max}", header.len),
            ));
        }
        let mut body = Vec::with_capacity(header.len.min(64 * 1024));
        (&mut self.stream).take(header.len as u64).read_to_end(&mut body).await?;
        if body.len() != header.len {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Ok((header.kind, body))
    }
}

fn decode<T: DeserializeOwned>(got: u8, want: u8, body: &[u8]) -> io::Result<T> {
    if got != want {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "unexpected handshake frame"));
    }
    codec::decode_body(body).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))
}

/// A CA and node certificates made in memory (tests, `shoal dev`).
pub mod testing {
    use super::*;

    /// A cluster CA that issues node channels, and the cluster's gossip key.
    pub struct TestCa {
        pub cert: String,
        pub key: String,
        pub gossip: crate::control::secure::ClusterKey,
    }

    impl TestCa {
        pub fn new(cluster: &str) -> TestCa {
            let (cert, key) = pki::new_ca(cluster, 30).expect("a CA");
            TestCa { cert, key, gossip: crate::control::secure::ClusterKey::generate() }
        }

        /// Everything node `node` of this cluster proves itself with.
        pub fn creds(&self, node: &str) -> crate::node::ClusterCreds {
            crate::node::ClusterCreds { tls: self.node(node), key: self.gossip.clone() }
        }

        /// PEM texts of a node certificate.
        pub fn pem(&self, node: &str) -> TlsPem {
            let (cert, key, _) = pki::issue_node(&self.cert, &self.key, node, 30).expect("a node certificate");
            TlsPem { ca: self.cert.clone(), cert, key }
        }

        pub fn node(&self, node: &str) -> Arc<RaftTls> {
            Arc::new(RaftTls::from_pem(self.pem(node)).expect("a node channel"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::TestCa;
    use super::*;

    /// Connects `client` to `server` over an in-memory pipe, dialling `name`.
    async fn pair(
        client: &RaftTls,
        server: &RaftTls,
        name: &str,
    ) -> (io::Result<NodeIdentity>, io::Result<NodeIdentity>) {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let accepting = async {
            let (mut ch, who) = server.accept(b).await?;
            let (kind, msg): (u8, String) = ch.recv().await?;
            ch.send(kind + 1, &format!("{msg}!")).await?;
            Ok(who)
        };
        let dialling = async {
            let (mut ch, who) = client.connect(a, name).await?;
            ch.send(1, &"hi".to_string()).await?;
            let (kind, msg): (u8, String) = ch.recv().await?;
            assert_eq!((kind, msg.as_str()), (2, "hi!"));
            Ok(who)
        };
        tokio::join!(dialling, accepting)
    }

    #[tokio::test]
    async fn nodes_of_one_ca_talk_and_learn_each_others_names() {
        let ca = TestCa::new("c");
        let (n1, n2) = (ca.node("n1"), ca.node("n2"));
        let (dialled, accepted) = pair(&n2, &n1, "n1").await;
        assert_eq!(dialled.expect("client").node, "n1");
        assert_eq!(accepted.expect("server").node, "n2");
    }

    #[tokio::test]
    async fn a_wrong_name_or_a_foreign_ca_is_refused() {
        let ca = TestCa::new("c");
        let (n1, n2) = (ca.node("n1"), ca.node("n2"));
        let (dialled, _) = pair(&n2, &n1, "n3").await;
        assert!(dialled.is_err(), "n1's certificate is not n3's");
        let stranger = TestCa::new("c").node("n9");
        let (dialled, accepted) = pair(&stranger, &n1, "n1").await;
        assert!(dialled.is_err() && accepted.is_err(), "another CA of the same cluster name");
        let other = TestCa::new("d").node("n1");
        assert!(pair(&other, &n1, "n1").await.1.is_err(), "another cluster");
    }

    #[tokio::test]
    async fn the_identity_exchange_refuses_another_cluster_both_ways() {
        let ca = TestCa::new("c");
        let (n1, n2) = (ca.node("n1"), ca.node("n2"));
        let (x, y) = (Some(ClusterId(1)), Some(ClusterId(2)));
        for (client, server, ok) in [(x, x, true), (None, x, true), (x, None, true), (x, y, false)] {
            let (a, b) = tokio::io::duplex(64 * 1024);
            let accepted = async { n1.accept(b).await?.0.answer_hello(server).await };
            let connected = async { n2.connect(a, "n1").await?.0.hello(client).await };
            let (connected, accepted) = tokio::join!(connected, accepted);
            if ok {
                assert!(connected.is_ok() && accepted.is_ok(), "{client:?} -> {server:?}");
            } else {
                let err = connected.expect_err("the client refuses the server's identity");
                assert_eq!(OtherCluster::of(&err).map(|o| (o.ours, o.theirs)), Some((ClusterId(1), ClusterId(2))));
                assert!(accepted.is_err());
            }
        }
    }

    #[test]
    fn files_are_checked_at_load_and_reload_keeps_the_identity() {
        let dir = tempfile::tempdir().expect("dir");
        let ca = TestCa::new("c");
        let files = TlsFiles::in_dir(dir.path());
        let write = |pem: &TlsPem| {
            std::fs::write(&files.ca, &pem.ca).expect("ca");
            std::fs::write(&files.cert, &pem.cert).expect("cert");
            crate::files::write_atomic(&files.key, pem.key.as_bytes(), 0o600).expect("key");
        };
        write(&ca.pem("n1"));
        let tls = RaftTls::load(files.clone()).expect("load");
        assert_eq!(tls.me().node, "n1");
        assert!(!tls.reload().expect("unchanged"));
        write(&ca.pem("n1"));
        assert!(tls.reload().expect("a renewed certificate"));
        write(&ca.pem("n2"));
        assert!(tls.reload().expect_err("another node").to_string().contains("node.pem"));
        let mut foreign = ca.pem("n1");
        foreign.ca = TestCa::new("c").cert;
        write(&foreign);
        let err = RaftTls::load(files.clone()).expect_err("signed by another CA");
        assert!(err.to_string().contains("not usable with this CA"), "{err}");
        write(&ca.pem("n1"));
        std::fs::set_permissions(&files.key, std::os::unix::fs::PermissionsExt::from_mode(0o644)).expect("chmod");
        assert!(RaftTls::load(files).expect_err("readable key").to_string().contains("chmod 600"));
    }
}
