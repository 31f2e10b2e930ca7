//! Enterprise Connect compatibility (seeds 000 and 001): the EC load-balancer image was nginx
//! configured by an env file with `GATEWAY_LIST="ip:port ip:port …"` and `DNS_NAME`, proxying
//! every path (so `/agent` too) to the gateways on port 80, and, when a certificate and key are
//! mounted, serving 443 with TLS and redirecting port 80 to `https://DNS_NAME`. This module reads
//! those variables and certificate paths and turns them into a shoal pool and node settings.

use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};

use shoal_proto::{Algorithm, BackendSpec, CheckKind, HealthSpec, PoolSpec};

use crate::config::{ConfigError, ConfigFile};
use crate::dataplane::tls::CertFiles;

/// The pool EC mode creates.
pub const POOL: &str = "ec-gateways";

/// Where the seeds mount the certificate and key, in the order they are looked for.
pub const CERT_LOCATIONS: &[(&str, &str)] =
    &[("/etc/nginx/certs/cert.crt", "/etc/nginx/certs/certkey.key"), ("~/cert.pem", "~/key.pem")];

/// What an EC env file asks for.
#[derive(Clone, Debug, PartialEq)]
pub struct EcSetup {
    pub gateways: Vec<SocketAddr>,
    pub dns_name: Option<String>,
    /// Found at one of [`CERT_LOCATIONS`] (or given on the command line).
    pub tls: Option<CertFiles>,
}

fn err(key: &str, problem: impl Into<String>) -> ConfigError {
    ConfigError { key: key.to_string(), problem: problem.into() }
}

/// Parses `KEY=VALUE` lines (`#` comments, optional `export`, optional quotes), as Docker's
/// `--env-file` and shells do.
pub fn parse_env(text: &str) -> Result<HashMap<String, String>, ConfigError> {
    let mut vars = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let Some((key, value)) = line.split_once('=') else {
            return Err(err(&format!("line {}", n + 1), format!("{line:?} is not KEY=VALUE")));
        };
        let value = value.trim();
        let value = value
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .or_else(|| value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
            .unwrap_or(value);
        vars.insert(key.trim().to_string(), value.to_string());
    }
    Ok(vars)
}

/// Reads the EC variables; `home` resolves `~` in certificate locations.
pub fn setup(vars: &HashMap<String, String>, home: Option<&Path>) -> Result<EcSetup, ConfigError> {
    let list = vars
        .get("GATEWAY_LIST")
        .ok_or_else(|| err("GATEWAY_LIST", "missing: list the gateways as \"ip:port ip:port\""))?;
    let list = list.trim().trim_start_matches('{').trim_end_matches('}');
    let mut gateways = Vec::new();
    for (i, entry) in list.split_whitespace().enumerate() {
        let addr =
            entry.to_socket_addrs().ok().and_then(|mut a| a.next()).ok_or_else(|| {
                err("GATEWAY_LIST", format!("entry {} ({entry:?}) is not a reachable host:port", i + 1))
            })?;
        gateways.push(addr);
    }
    if gateways.is_empty() {
        return Err(err("GATEWAY_LIST", "is empty: list the gateways as \"ip:port ip:port\""));
    }
    let dns_name = vars.get("DNS_NAME").map(|d| d.trim().to_string()).filter(|d| !d.is_empty());
    if let Some(d) = &dns_name
        && d.contains(['/', ' '])
    {
        return Err(err("DNS_NAME", format!("{d:?} must be a host name (optionally with :port), not a URL")));
    }
    Ok(EcSetup { gateways, dns_name, tls: find_certs(home) })
}

fn find_certs(home: Option<&Path>) -> Option<CertFiles> {
    let expand = |p: &str| match (p.strip_prefix("~/"), home) {
        (Some(rest), Some(h)) => Some(h.join(rest)),
        (Some(_), None) => None,
        (None, _) => Some(PathBuf::from(p)),
    };
    CERT_LOCATIONS.iter().find_map(|(c, k)| {
        let (cert, key) = (expand(c)?, expand(k)?);
        (cert.exists() && key.exists()).then_some(CertFiles { cert, key })
    })
}

impl EcSetup {
    /// The gateway pool: every path, gateways in list order as slots gw1…gwN (pinning), TCP
    /// health checks, and the original's timeouts (connect/send 600 s, read 86 400 s).
    pub fn config(&self) -> ConfigFile {
        let spec = PoolSpec {
            pattern: Some("/".into()),
            algorithm: Algorithm::RoundRobin,
            health: HealthSpec { check: Some(CheckKind::Tcp), ..HealthSpec::default() },
            pinning: true,
            connect_timeout_ms: 600_000,
            response_timeout_ms: 600_000,
            idle_timeout_ms: 86_400_000,
            ..PoolSpec::default()
        };
        let backends = self
            .gateways
            .iter()
            .enumerate()
            .map(|(i, addr)| (*addr, BackendSpec { slot: Some(i as u32 + 1), ..BackendSpec::default() }))
            .collect();
        ConfigFile { pools: vec![(POOL.to_string(), spec, backends)], listen_ip: None }
    }

    /// With TLS (`tls`: a certificate was found or given) the plain port redirects to
    /// `https://DNS_NAME`; without a name it cannot.
    pub fn redirect_host(&self, tls: bool) -> Result<Option<String>, ConfigError> {
        match (tls, &self.dns_name) {
            (false, _) => Ok(None),
            (true, Some(d)) => Ok(Some(d.clone())),
            (true, None) => Err(err("DNS_NAME", "is needed with a certificate: port 80 redirects to https://DNS_NAME")),
        }
    }
}

/// The process environment, for the container image (`docker run --env-file`).
pub fn process_env() -> HashMap<String, String> {
    std::env::vars().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_001_environment_file() {
        let text = "# EC gateways\nGATEWAY_LIST=10.0.0.5:8080 10.0.0.6:8080\nDNS_NAME=lb.example.com\n";
        let vars = parse_env(text).expect("parse");
        let s = setup(&vars, None).expect("setup");
        assert_eq!(s.gateways, vec!["10.0.0.5:8080".parse().expect("a"), "10.0.0.6:8080".parse().expect("b")]);
        assert_eq!(s.dns_name.as_deref(), Some("lb.example.com"));
        let cfg = s.config();
        let state = cfg.validate().expect("valid pool");
        let pool = &state.pools[POOL];
        assert!(pool.spec.pinning);
        assert_eq!(pool.backends["10.0.0.6:8080"].spec.slot, Some(2), "gw2 is the second gateway");
    }

    #[test]
    fn quotes_braces_and_export_are_accepted() {
        let vars = parse_env("export GATEWAY_LIST=\"{127.0.0.1:1 127.0.0.1:2}\"\nDNS_NAME='x.test'\n").expect("parse");
        assert_eq!(setup(&vars, None).expect("setup").gateways.len(), 2);
    }

    #[test]
    fn bad_files_name_the_variable() {
        let missing = setup(&parse_env("DNS_NAME=a\n").expect("parse"), None).expect_err("no list");
        assert_eq!(missing.key, "GATEWAY_LIST");
        let bad = setup(&parse_env("GATEWAY_LIST=nonsense\n").expect("parse"), None).expect_err("bad entry");
        assert!(bad.problem.contains("nonsense"), "{bad}");
        assert!(parse_env("just words\n").is_err());
        let url = setup(&parse_env("GATEWAY_LIST=127.0.0.1:1\nDNS_NAME=https://x/\n").expect("parse"), None);
        assert_eq!(url.expect_err("url").key, "DNS_NAME");
    }

    #[test]
    fn certificates_are_found_in_the_home_directory() {
        let home = tempfile::tempdir().expect("home");
        let vars = parse_env("GATEWAY_LIST=127.0.0.1:1\n").expect("parse");
        assert_eq!(setup(&vars, Some(home.path())).expect("setup").tls, None);
        std::fs::write(home.path().join("cert.pem"), "x").expect("cert");
        std::fs::write(home.path().join("key.pem"), "y").expect("key");
        let s = setup(&vars, Some(home.path())).expect("setup");
        assert_eq!(s.tls.as_ref().map(|t| t.cert.clone()), Some(home.path().join("cert.pem")));
        assert_eq!(s.redirect_host(s.tls.is_some()).expect_err("no DNS_NAME").key, "DNS_NAME");
    }
}
