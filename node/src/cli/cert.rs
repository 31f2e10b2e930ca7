//! `shoal cert`: the files a cluster runs on. `ca` makes the cluster CA and gossip key once;
//! `node` makes one node's directory (its certificate and key, the CA certificate and the gossip
//! key), which `shoal node --cluster-tls DIR` reads; `self-signed` makes an HTTPS certificate.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Subcommand;

use super::fail;
use crate::control::pki::{self, CA_CERT, CA_KEY, GOSSIP_KEY, NODE_CERT, NODE_KEY, PkiError};
use crate::control::secure::{ClusterKey, KeyError};
use crate::dataplane::tls::TlsError;

/// Why `shoal cert` made nothing (or not everything); the texts are what it prints.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("{} already holds a CA: a second one would split the cluster (use another --out)", .0.display())]
    CaExists(PathBuf),
    #[error("cannot write {}: {error}", path.display())]
    Write { path: PathBuf, error: std::io::Error },
    /// A file of the CA directory is missing or unreadable.
    #[error("--ca {}: {error} (make a CA with `shoal cert ca --out DIR`)", path.display())]
    ReadCa { path: PathBuf, error: std::io::Error },
    /// The CA directory's gossip key is not a key.
    #[error("{}: {error}", path.display())]
    GossipKey { path: PathBuf, error: KeyError },
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error("cannot generate a certificate: {0}")]
    Generate(TlsError),
}

#[derive(Debug, Subcommand)]
pub enum CertCmd {
    /// A new cluster: OUT/ca.pem, OUT/ca.key and OUT/cluster.key (the gossip key). Keep ca.key
    /// off the nodes; it signs node certificates.
    Ca {
        /// The cluster's name (lower-case letters, digits, '-', '_', '.').
        #[arg(long, default_value = "shoal")]
        cluster: String,
        #[arg(long)]
        out: PathBuf,
        /// Days the CA stays valid.
        #[arg(long, default_value_t = 3650)]
        days: u32,
    },
    /// One node's directory for `shoal node --cluster-tls OUT`: node.pem and node.key (a
    /// certificate naming --id), ca.pem and cluster.key.
    Node {
        /// The directory `shoal cert ca` wrote.
        #[arg(long)]
        ca: PathBuf,
        /// The node's id (its --id; lower-case letters, digits, '-', '_', '.').
        #[arg(long)]
        id: String,
        /// Where to write [default: ./<id>].
        #[arg(long)]
        out: Option<PathBuf>,
        /// Days the certificate stays valid.
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
    /// A self-signed certificate and key: OUT/cert.pem and OUT/key.pem.
    SelfSigned {
        /// DNS names or IP addresses the certificate is valid for (repeatable).
        #[arg(long = "name", required = true)]
        names: Vec<String>,
        #[arg(long, default_value = ".")]
        out: PathBuf,
    },
}

pub fn run(cmd: CertCmd) -> ExitCode {
    let done = match cmd {
        CertCmd::Ca { cluster, out, days } => make_ca(&cluster, &out, days),
        CertCmd::Node { ca, id, out, days } => {
            let out = out.unwrap_or_else(|| PathBuf::from(&id));
            make_node(&ca, &id, &out, days)
        }
        CertCmd::SelfSigned { names, out } => self_signed(&names, &out),
    };
    match done {
        Ok(msg) => {
            println!("{msg}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(1, e.to_string()),
    }
}

/// Writes `text` to `dir/name`; private files are owner-only (nodes refuse others).
fn write(dir: &Path, name: &str, text: &str, private: bool) -> Result<(), CertError> {
    let path = dir.join(name);
    std::fs::create_dir_all(dir)
        .and_then(|_| crate::files::write_atomic(&path, text.as_bytes(), if private { 0o600 } else { 0o644 }))
        .map_err(|error| CertError::Write { path, error })
}

/// `shoal cert ca`: the CA and gossip key of a new cluster in `out` (never overwritten).
pub fn make_ca(cluster: &str, out: &Path, days: u32) -> Result<String, CertError> {
    if out.join(CA_KEY).exists() {
        return Err(CertError::CaExists(out.to_path_buf()));
    }
    let (cert, key) = pki::new_ca(cluster, days)?;
    write(out, CA_KEY, &key, true)?;
    write(out, CA_CERT, &cert, false)?;
    write(out, GOSSIP_KEY, &ClusterKey::generate().to_hex(), true)?;
    Ok(format!(
        "wrote the CA of cluster {cluster} to {dir}: {CA_CERT}, {CA_KEY} (keep it off the nodes) and {GOSSIP_KEY}\n\
         next, for each node: shoal cert node --ca {dir} --id <node id> --out <dir for that node>",
        dir = out.display()
    ))
}

/// `shoal cert node`: node `id`'s `--cluster-tls` directory, from the CA directory.
pub fn make_node(ca_dir: &Path, id: &str, out: &Path, days: u32) -> Result<String, CertError> {
    let read = |name: &str, secret: bool| {
        let path = ca_dir.join(name);
        let text = if secret { crate::files::read_secret(&path) } else { std::fs::read_to_string(&path) };
        text.map_err(|error| CertError::ReadCa { path, error })
    };
    let (ca, ca_key, gossip) = (read(CA_CERT, false)?, read(CA_KEY, true)?, read(GOSSIP_KEY, true)?);
    ClusterKey::from_hex(&gossip).map_err(|error| CertError::GossipKey { path: ca_dir.join(GOSSIP_KEY), error })?;
    let (cert, key, serial) = pki::issue_node(&ca, &ca_key, id, days)?;
    let cluster = pki::ca_cluster(&ca, &ca_dir.join(CA_CERT))?;
    write(out, NODE_KEY, &key, true)?;
    write(out, NODE_CERT, &cert, false)?;
    write(out, CA_CERT, &ca, false)?;
    write(out, GOSSIP_KEY, gossip.trim(), true)?;
    Ok(format!(
        "wrote node {id} of cluster {cluster} to {dir} (certificate serial {serial}, valid {days} days)\n\
         start it with: shoal node --cluster-tls {dir} --cluster <ip:port> ...",
        dir = out.display()
    ))
}

fn self_signed(names: &[String], out: &Path) -> Result<String, CertError> {
    let (cert, key) = crate::dataplane::tls::self_signed(names).map_err(CertError::Generate)?;
    write(out, "key.pem", &key, true)?;
    write(out, "cert.pem", &cert, false)?;
    Ok(format!(
        "wrote {} and {} for {}",
        out.join("cert.pem").display(),
        out.join("key.pem").display(),
        names.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_then_node_makes_a_loadable_directory() {
        let dir = tempfile::tempdir().expect("dir");
        let ca = dir.path().join("ca");
        make_ca("prod", &ca, 10).expect("ca");
        let err = make_ca("prod", &ca, 10).expect_err("twice");
        assert!(matches!(&err, CertError::CaExists(dir) if *dir == ca), "{err}");
        assert!(err.to_string().contains("already holds a CA"), "{err}");
        let n1 = dir.path().join("n1");
        let msg = make_node(&ca, "n1", &n1, 10).expect("node");
        assert!(msg.contains("serial"), "{msg}");
        let creds = crate::node::ClusterCreds::load(&n1).expect("the node directory loads");
        assert_eq!((creds.tls.me().cluster.as_str(), creds.tls.me().node.as_str()), ("prod", "n1"));
        let err = make_node(&ca, "Bad Name", &dir.path().join("x"), 10).expect_err("bad id");
        assert!(matches!(err, CertError::Pki(PkiError::BadName { what: "node id", .. })), "{err}");
        let err = make_node(&dir.path().join("none"), "n2", &dir.path().join("y"), 10).expect_err("no CA");
        assert!(matches!(&err, CertError::ReadCa { path, .. } if path.ends_with(CA_CERT)), "{err}");
        let text = err.to_string();
        assert!(text.starts_with("--ca ") && text.contains("ca.pem"), "{err}");
    }
}
