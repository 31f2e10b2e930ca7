//! TLS with rustls (ring provider, no OpenSSL). Server side: node-local certificate and key
//! files (never replicated), several certificates chosen by SNI, ALPN `http/1.1`, reloaded
//! when the files change or on an admin call; a failed reload keeps the certificates in
//! service. Client side: TLS to backends (`wss://` gateways) verified against a CA file.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// Why certificates could not be loaded or made; each names the file and the problem. The
/// cause is part of the message (the texts operators know) and deliberately not a `source`,
/// so that error reporters walking the chain do not print it twice.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS needs at least one certificate and key")]
    NoCertificates,
    #[error("{}: cannot read certificates: {error}", path.display())]
    ReadCertificates { path: PathBuf, error: pem::Error },
    #[error("{}: invalid PEM: {error}", path.display())]
    InvalidPem { path: PathBuf, error: pem::Error },
    #[error("{}: no certificate found (expected PEM \"BEGIN CERTIFICATE\")", path.display())]
    NoCertificate { path: PathBuf },
    #[error("{}: no usable private key: {error}", path.display())]
    Key { path: PathBuf, error: pem::Error },
    /// The key does not match the certificate, or rustls refuses the pair.
    #[error("{} and {}: {error}", cert.display(), key.display())]
    Pair { cert: PathBuf, key: PathBuf, error: rustls::Error },
    /// The protocol versions the provider offers (not expected with ring).
    #[error("{0}")]
    Config(rustls::Error),
    #[error("no --backend-ca given and no system CA bundle found")]
    NoCaBundle,
    #[error("{}: {error}", path.display())]
    ReadCa { path: PathBuf, error: pem::Error },
    #[error("{}: {error}", path.display())]
    BadCa { path: PathBuf, error: rustls::Error },
    #[error("{}: no CA certificate found", path.display())]
    NoCaCertificate { path: PathBuf },
    #[error("{0}")]
    Generate(rcgen::Error),
}

/// A certificate chain file and its key file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// One loaded certificate.
#[derive(Debug)]
struct Loaded {
    key: Arc<CertifiedKey>,
}

impl Loaded {
    /// When the leaf certificate expires (Unix seconds; 0 when x509 parsing fails, which
    /// rustls accepting it makes unlikely, and which an expiry alert then reports).
    fn not_after(&self) -> i64 {
        self.key.cert.first().and_then(|c| crate::control::pki::expiry_der(c)).unwrap_or(0)
    }
}

/// Picks the first certificate valid for the client's SNI name; the first one otherwise.
#[derive(Debug)]
struct SniResolver {
    certs: Vec<Loaded>,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let by_name = hello.server_name().and_then(|name| {
            let name = ServerName::try_from(name.to_string()).ok()?;
            self.certs.iter().find(|c| valid_for(&c.key, &name))
        });
        by_name.or_else(|| self.certs.first()).map(|c| c.key.clone())
    }
}

fn valid_for(key: &CertifiedKey, name: &ServerName<'_>) -> bool {
    let Some(der) = key.cert.first() else { return false };
    webpki::EndEntityCert::try_from(der).is_ok_and(|ee| ee.verify_is_valid_for_subject_name(name).is_ok())
}

/// Reads a certificate chain and its key; errors name the file and the problem.
fn load_pair(files: &CertFiles) -> Result<Loaded, TlsError> {
    let path = || files.cert.clone();
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|error| TlsError::ReadCertificates { path: path(), error })?
        .collect::<Result<_, _>>()
        .map_err(|error| TlsError::InvalidPem { path: path(), error })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate { path: path() });
    }
    let key =
        PrivateKeyDer::from_pem_file(&files.key).map_err(|error| TlsError::Key { path: files.key.clone(), error })?;
    let certified = CertifiedKey::from_der(chain, key, &provider()).map_err(|error| TlsError::Pair {
        cert: path(),
        key: files.key.clone(),
        error,
    })?;
    Ok(Loaded { key: Arc::new(certified) })
}

fn server_config(certs: Vec<Loaded>) -> Result<Arc<ServerConfig>, TlsError> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(SniResolver { certs }));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The node's server certificates, swapped atomically on reload.
pub struct TlsStore {
    files: Vec<CertFiles>,
    config: ArcSwap<ServerConfig>,
    /// When each file's leaf certificate in service expires (Unix seconds), in `files` order.
    expiries: ArcSwap<Vec<i64>>,
    stamps: Mutex<Vec<Option<SystemTime>>>,
}

impl std::fmt::Debug for TlsStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStore").field("files", &self.files).finish()
    }
}

impl TlsStore {
    /// Loads every pair; any problem is an error naming the file (the node does not start).
    pub fn load(files: Vec<CertFiles>) -> Result<TlsStore, TlsError> {
        if files.is_empty() {
            return Err(TlsError::NoCertificates);
        }
        let (config, expiries) = Self::build(&files)?;
        let stamps = files.iter().map(stamp).collect();
        Ok(TlsStore {
            files,
            config: ArcSwap::new(config),
            expiries: ArcSwap::from_pointee(expiries),
            stamps: Mutex::new(stamps),
        })
    }

    fn build(files: &[CertFiles]) -> Result<(Arc<ServerConfig>, Vec<i64>), TlsError> {
        let certs = files.iter().map(load_pair).collect::<Result<Vec<_>, _>>()?;
        let expiries = certs.iter().map(Loaded::not_after).collect();
        Ok((server_config(certs)?, expiries))
    }

    /// Each certificate file in service and when its leaf certificate expires (Unix seconds).
    pub fn expiries(&self) -> Vec<(PathBuf, i64)> {
        self.files.iter().map(|f| f.cert.clone()).zip(self.expiries.load().iter().copied()).collect()
    }

    /// The configuration new handshakes use.
    pub fn current(&self) -> Arc<ServerConfig> {
        self.config.load_full()
    }

    /// Reloads every file; on error the certificates in service stay.
    pub fn reload(&self) -> Result<(), TlsError> {
        let (config, expiries) = Self::build(&self.files)?;
        self.config.store(config);
        self.expiries.store(Arc::new(expiries));
        *self.stamps.lock().unwrap_or_else(|e| e.into_inner()) = self.files.iter().map(stamp).collect();
        Ok(())
    }

    /// Reloads when a file's modification time or size changed since the last load.
    pub fn reload_if_changed(&self) -> Option<Result<(), TlsError>> {
        let now: Vec<Option<SystemTime>> = self.files.iter().map(stamp).collect();
        let changed = *self.stamps.lock().unwrap_or_else(|e| e.into_inner()) != now;
        if !changed {
            return None;
        }
        let result = self.reload();
        if result.is_err() {
            // Do not retry the same broken files every tick; wait for the next change.
            *self.stamps.lock().unwrap_or_else(|e| e.into_inner()) = now;
        }
        Some(result)
    }

    pub fn files(&self) -> &[CertFiles] {
        &self.files
    }
}

fn stamp(files: &CertFiles) -> Option<SystemTime> {
    let a = std::fs::metadata(&files.cert).and_then(|m| m.modified()).ok()?;
    let b = std::fs::metadata(&files.key).and_then(|m| m.modified()).ok()?;
    Some(a.max(b))
}

/// A client configuration trusting the CA certificates of `ca_file` (PEM), or the system bundle.
pub fn client_config(ca_file: Option<&Path>) -> Result<Arc<ClientConfig>, TlsError> {
    let path = match ca_file {
        Some(p) => p.to_path_buf(),
        None => system_bundle().ok_or(TlsError::NoCaBundle)?,
    };
    let mut roots = RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(&path).map_err(|error| TlsError::ReadCa { path: path.clone(), error })?;
    for cert in certs {
        let cert = cert.map_err(|error| TlsError::InvalidPem { path: path.clone(), error })?;
        roots.add(cert).map_err(|error| TlsError::BadCa { path: path.clone(), error })?;
    }
    if roots.is_empty() {
        return Err(TlsError::NoCaCertificate { path });
    }
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn system_bundle() -> Option<PathBuf> {
    ["/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt", "/etc/ssl/cert.pem"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// The name a backend's certificate is verified against: the pool's name, else its IP.
pub fn backend_name(name: Option<&str>, ip: IpAddr) -> ServerName<'static> {
    name.and_then(|n| ServerName::try_from(n.to_string()).ok()).unwrap_or(ServerName::IpAddress(ip.into()))
}

/// `shoal cert self-signed`: a certificate and key for `names` (DNS names or IPs), in PEM.
pub fn self_signed(names: &[String]) -> Result<(String, String), TlsError> {
    let key = rcgen::KeyPair::generate().map_err(TlsError::Generate)?;
    let params = rcgen::CertificateParams::new(names.to_vec()).map_err(TlsError::Generate)?;
    let cert = params.self_signed(&key).map_err(TlsError::Generate)?;
    Ok((cert.pem(), key.serialize_pem()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_pair(dir: &Path, stem: &str, names: &[&str]) -> CertFiles {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let (cert, key) = self_signed(&names).expect("self-signed");
        let files = CertFiles { cert: dir.join(format!("{stem}.pem")), key: dir.join(format!("{stem}.key")) };
        std::fs::write(&files.cert, cert).expect("write cert");
        std::fs::write(&files.key, key).expect("write key");
        files
    }

    #[test]
    fn bad_files_are_named_and_reload_keeps_the_old_certificate() {
        let dir = tempfile::tempdir().expect("dir");
        let good = write_pair(dir.path(), "a", &["a.example"]);
        let store = TlsStore::load(vec![good.clone()]).expect("load");
        let before = store.current();
        std::fs::write(&good.cert, "not a certificate").expect("break");
        let err = store.reload().expect_err("broken cert");
        assert!(matches!(&err, TlsError::NoCertificate { path } if *path == good.cert), "{err}");
        assert!(err.to_string().contains("a.pem"), "{err}");
        assert!(Arc::ptr_eq(&before, &store.current()), "old certificate still in service");
        let other = write_pair(dir.path(), "b", &["b.example"]);
        let mismatched = CertFiles { cert: other.cert.clone(), key: dir.path().join("a.key") };
        let err = TlsStore::load(vec![mismatched]).expect_err("key mismatch");
        assert!(matches!(err, TlsError::Pair { .. }), "{err}");
        let text = err.to_string();
        assert!(text.contains("b.pem") && text.contains("a.key"), "{err}");
        let missing = CertFiles { cert: dir.path().join("nope.pem"), key: dir.path().join("nope.key") };
        let err = TlsStore::load(vec![missing]).expect_err("missing");
        assert!(matches!(err, TlsError::ReadCertificates { .. }), "{err}");
        assert!(
            err.to_string()
                .starts_with(&format!("{}: cannot read certificates: ", dir.path().join("nope.pem").display()))
        );
        assert!(matches!(TlsStore::load(Vec::new()), Err(TlsError::NoCertificates)));
    }

    #[test]
    fn a_missing_key_and_a_bad_ca_file_are_told_apart() {
        let dir = tempfile::tempdir().expect("dir");
        let good = write_pair(dir.path(), "a", &["a.example"]);
        let keyless = CertFiles { cert: good.cert.clone(), key: dir.path().join("none.key") };
        let err = TlsStore::load(vec![keyless]).expect_err("no key");
        assert!(matches!(err, TlsError::Key { .. }), "{err}");
        assert!(err.to_string().contains("none.key: no usable private key"), "{err}");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "no PEM here").expect("write");
        let err = client_config(Some(&empty)).expect_err("no CA");
        assert!(matches!(&err, TlsError::NoCaCertificate { path } if *path == empty), "{err}");
        assert_eq!(err.to_string(), format!("{}: no CA certificate found", empty.display()));
        assert!(client_config(Some(&good.cert)).is_ok(), "a self-signed certificate is its own CA");
    }

    /// Writes a self-signed pair valid until `not_after` (Unix seconds).
    fn write_expiring(files: &CertFiles, not_after: i64) {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(vec!["e.example".to_string()]).expect("params");
        params.not_after = time::OffsetDateTime::from_unix_timestamp(not_after).expect("time");
        let cert = params.self_signed(&key).expect("sign");
        std::fs::write(&files.cert, cert.pem()).expect("write cert");
        std::fs::write(&files.key, key.serialize_pem()).expect("write key");
    }

    #[test]
    fn expiries_follow_the_certificates_in_service() {
        let dir = tempfile::tempdir().expect("dir");
        let files = CertFiles { cert: dir.path().join("e.pem"), key: dir.path().join("e.key") };
        write_expiring(&files, 2_000_000_000);
        let store = TlsStore::load(vec![files.clone()]).expect("load");
        assert_eq!(store.expiries(), vec![(files.cert.clone(), 2_000_000_000)]);
        write_expiring(&files, 2_100_000_000);
        store.reload().expect("reload");
        assert_eq!(store.expiries(), vec![(files.cert.clone(), 2_100_000_000)], "a renewal moves the expiry");
        std::fs::write(&files.cert, "broken").expect("break");
        assert!(store.reload().is_err());
        assert_eq!(store.expiries()[0].1, 2_100_000_000, "a failed reload keeps the one in service");
    }

    #[test]
    fn sni_picks_the_matching_certificate() {
        let dir = tempfile::tempdir().expect("dir");
        let a = load_pair(&write_pair(dir.path(), "a", &["a.example"])).expect("a");
        let b = load_pair(&write_pair(dir.path(), "b", &["b.example", "127.0.0.1"])).expect("b");
        let name = |n: &str| ServerName::try_from(n.to_string()).expect("name");
        assert!(valid_for(&b.key, &name("b.example")));
        assert!(!valid_for(&a.key, &name("b.example")));
        assert!(valid_for(&b.key, &name("127.0.0.1")));
    }
}
