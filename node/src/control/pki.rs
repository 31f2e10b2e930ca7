//! The cluster's certificates: one CA per cluster, one certificate per node naming it, and the
//! identity a peer's certificate proves.
//!
//! A node certificate carries exactly one URI SAN `spiffe://<cluster>/node/<id>` (the name Raft
//! RPC binds to the Raft id a peer claims), the DNS SAN `<id>.node.<cluster>.shoal` (what a
//! dialling node verifies with stock rustls name checks), both `serverAuth` and `clientAuth`
//! (every node is both), a random 16-byte serial (what a revocation deny-lists) and a bounded
//! validity. The CA carries the URI SAN `spiffe://<cluster>` so `shoal cert node` learns the
//! cluster from it, and a unique subject (two CAs with one subject make confusing errors).

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber,
};
use time::{Duration, OffsetDateTime};

/// ALPN name of Raft RPC over TLS: a client offering anything else is refused.
pub const ALPN: &[u8] = b"shoal-raft/1";

/// File names in a node's cluster directory (`shoal cert node --out`) and the CA directory.
pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca.key";
pub const NODE_CERT: &str = "node.pem";
pub const NODE_KEY: &str = "node.key";
pub const GOSSIP_KEY: &str = "cluster.key";

/// Why a certificate could not be made, read or used.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{what} {name:?} is not valid: use lower-case letters, digits, '-', '_' and '.' (1 to 63 characters)")]
    BadName { what: &'static str, name: String },
    #[error("{0}: {1}")]
    File(PathBuf, std::io::Error),
    #[error("{0}: not a PEM certificate")]
    NotCertificate(PathBuf),
    #[error("{0}: {1}")]
    Parse(PathBuf, String),
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{path}: {problem}")]
    Invalid { path: PathBuf, problem: String },
}

/// What a node certificate says about its holder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeIdentity {
    pub cluster: String,
    pub node: String,
    /// The certificate's serial, as lower-case hex (the revocation key).
    pub serial: String,
    /// Seconds since the epoch after which the certificate is expired.
    pub not_after: i64,
}

/// Checks a cluster or node name: it becomes a DNS label and part of a URI.
pub fn check_name(what: &'static str, name: &str) -> Result<(), PkiError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b))
        && !name.starts_with(['.', '-'])
        && !name.ends_with(['.', '-'])
        && !name.contains("..");
    if ok { Ok(()) } else { Err(PkiError::BadName { what, name: name.to_string() }) }
}

pub fn node_uri(cluster: &str, node: &str) -> String {
    format!("spiffe://{cluster}/node/{node}")
}

/// The DNS name a node's certificate is verified against when dialling it.
pub fn node_dns(cluster: &str, node: &str) -> String {
    format!("{node}.node.{cluster}.shoal")
}

/// A new cluster CA: `(certificate PEM, key PEM)`.
pub fn new_ca(cluster: &str, days: u32) -> Result<(String, String), PkiError> {
    check_name("cluster name", cluster)?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::CommonName,
        format!("shoal cluster CA {cluster} {}", crate::control::secure::hex(&random_serial())),
    );
    dn.push(DnType::OrganizationName, cluster);
    params.distinguished_name = dn;
    params.subject_alt_names = vec![SanType::URI(format!("spiffe://{cluster}").try_into()?)];
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    validity(&mut params, days);
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// A certificate for `node`, signed by the CA: `(certificate PEM, key PEM, serial hex)`.
pub fn issue_node(ca_pem: &str, ca_key_pem: &str, node: &str, days: u32) -> Result<(String, String, String), PkiError> {
    check_name("node id", node)?;
    let cluster = ca_cluster(ca_pem, Path::new(CA_CERT))?;
    let issuer = Issuer::from_ca_cert_pem(ca_pem, KeyPair::from_pem(ca_key_pem)?)?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, node);
    dn.push(DnType::OrganizationName, cluster.as_str());
    params.distinguished_name = dn;
    params.subject_alt_names = vec![
        SanType::URI(node_uri(&cluster, node).try_into()?),
        SanType::DnsName(node_dns(&cluster, node).try_into()?),
    ];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    let serial = random_serial();
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    validity(&mut params, days);
    let cert = params.signed_by(&key, &issuer)?;
    Ok((cert.pem(), key.serialize_pem(), crate::control::secure::hex(&serial)))
}

/// Valid from an hour ago (clocks differ) for `days`.
fn validity(params: &mut CertificateParams, days: u32) {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(i64::from(days.max(1)));
}

/// 16 random bytes, top bit clear and first byte non-zero: DER keeps them as they are, so the
/// serial a peer presents is byte for byte the one printed when it was issued.
fn random_serial() -> [u8; 16] {
    let mut s: [u8; 16] = rand::random();
    s[0] = (s[0] & 0x7f).max(1);
    s
}

/// The first certificate of a PEM text, as DER.
fn first_der(pem: &str, path: &Path) -> Result<Vec<u8>, PkiError> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .and_then(Result::ok)
        .map(|c| c.to_vec())
        .ok_or_else(|| PkiError::NotCertificate(path.to_path_buf()))
}

/// The URI SANs of a DER certificate, its serial and its expiry.
fn uris_serial_expiry(der: &[u8], path: &Path) -> Result<(Vec<String>, String, i64), PkiError> {
    let parse = |e: String| PkiError::Parse(path.to_path_buf(), e);
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| parse(e.to_string()))?;
    let mut uris = Vec::new();
    if let Some(san) = cert.subject_alternative_name().map_err(|e| parse(e.to_string()))? {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::URI(u) = name {
                uris.push(u.to_string());
            }
        }
    }
    let serial = crate::control::secure::hex(cert.raw_serial());
    Ok((uris, serial, cert.validity().not_after.timestamp()))
}

/// When a DER certificate expires (Unix seconds); `None` when it does not parse.
pub fn expiry_der(der: &[u8]) -> Option<i64> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(cert.validity().not_after.timestamp())
}

/// When the first certificate of a PEM text expires (Unix seconds).
pub fn expiry_pem(pem: &str) -> Option<i64> {
    expiry_der(&first_der(pem, Path::new("")).ok()?)
}

/// The cluster a CA certificate (PEM) is for.
pub fn ca_cluster(ca_pem: &str, path: &Path) -> Result<String, PkiError> {
    let (uris, _, _) = uris_serial_expiry(&first_der(ca_pem, path)?, path)?;
    let cluster = uris.iter().find_map(|u| u.strip_prefix("spiffe://")).filter(|c| !c.contains('/'));
    cluster.map(str::to_string).ok_or_else(|| PkiError::Invalid {
        path: path.to_path_buf(),
        problem: "not a shoal cluster CA (no spiffe://<cluster> name; make one with `shoal cert ca`)".into(),
    })
}

/// The identity a node certificate (DER) proves: exactly one `spiffe://<cluster>/node/<id>`.
pub fn node_identity(der: &[u8], path: &Path) -> Result<NodeIdentity, PkiError> {
    let (uris, serial, not_after) = uris_serial_expiry(der, path)?;
    let ids: Vec<(&str, &str)> = uris
        .iter()
        .filter_map(|u| u.strip_prefix("spiffe://")?.split_once("/node/"))
        .filter(|(c, n)| check_name("cluster name", c).is_ok() && check_name("node id", n).is_ok())
        .collect();
    match ids.as_slice() {
        [(cluster, node)] => {
            Ok(NodeIdentity { cluster: cluster.to_string(), node: node.to_string(), serial, not_after })
        }
        _ => Err(PkiError::Invalid {
            path: path.to_path_buf(),
            problem: "not a shoal node certificate (it needs exactly one spiffe://<cluster>/node/<id> name; make one with `shoal cert node`)".into(),
        }),
    }
}

/// The identity of a node certificate file.
pub fn node_identity_pem(pem: &str, path: &Path) -> Result<NodeIdentity, PkiError> {
    node_identity(&first_der(pem, path)?, path)
}

/// Reads a file, naming it in the error.
pub fn read(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(|e| PkiError::File(path.to_path_buf(), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_certificate_names_its_cluster_and_node() {
        let (ca, ca_key) = new_ca("prod", 30).expect("ca");
        assert_eq!(ca_cluster(&ca, Path::new("ca.pem")).expect("cluster"), "prod");
        let (cert, _key, serial) = issue_node(&ca, &ca_key, "n1", 30).expect("node");
        let id = node_identity_pem(&cert, Path::new("node.pem")).expect("identity");
        assert_eq!((id.cluster.as_str(), id.node.as_str(), id.serial.as_str()), ("prod", "n1", serial.as_str()));
        assert_eq!(serial.len(), 32);
        let days = (id.not_after - OffsetDateTime::now_utc().unix_timestamp()) / 86_400;
        assert!((29..=30).contains(&days), "{days}");
        let (_, _, again) = issue_node(&ca, &ca_key, "n1", 30).expect("node again");
        assert_ne!(serial, again, "every certificate gets its own serial");
    }

    #[test]
    fn names_and_foreign_files_are_refused_with_a_reason() {
        for bad in ["", "N1", "a b", "-x", "x.", "a..b", &"x".repeat(64), "a/b"] {
            assert!(check_name("node id", bad).is_err(), "{bad:?}");
        }
        for good in ["n1", "lb-1.example", "node_1"] {
            check_name("node id", good).expect(good);
        }
        let (ca, _) = new_ca("c", 1).expect("ca");
        let err = node_identity_pem(&ca, Path::new("x.pem")).expect_err("a CA is not a node");
        assert!(err.to_string().contains("x.pem"), "{err}");
        let (plain, _) = crate::dataplane::tls::self_signed(&["a.example".into()]).expect("self-signed");
        assert!(ca_cluster(&plain, Path::new("y.pem")).is_err());
        assert!(matches!(ca_cluster("junk", Path::new("z.pem")), Err(PkiError::NotCertificate(_))));
    }
}
