//! Enterprise Connect compatibility (seeds 000 and 001): the EC load-balancer image was nginx
//! configured by an env file with `GATEWAY_LIST="host:port host:port …"` and `DNS_NAME`,
//! proxying every path (so `/agent` too) to the gateways on port 80, and, when a certificate and
//! key are mounted, serving 443 with TLS and redirecting port 80 to `https://DNS_NAME`. This
//! module reads those variables and certificate paths, turns them into a shoal pool and node
//! settings, and resolves gateways named by host name again while the node runs.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use shoal_proto::{Algorithm, BackendSpec, CheckKind, HealthSpec, PoolSpec};

use crate::config::{ConfigError, ConfigFile};
use crate::dataplane::tls::CertFiles;

/// The pool EC mode creates.
pub const POOL: &str = "ec-gateways";

/// Where the seeds mount the certificate and key, in the order they are looked for.
pub const CERT_LOCATIONS: &[(&str, &str)] =
    &[("/etc/nginx/certs/cert.crt", "/etc/nginx/certs/certkey.key"), ("~/cert.pem", "~/key.pem")];

/// How often gateways named by host name are resolved again, unless `GATEWAY_RESOLVE_SECONDS`
/// says otherwise (std's resolver reports no TTL; nginx's `resolver valid=` default is 30 s).
pub const RESOLVE_EVERY: Duration = Duration::from_secs(30);

/// What an EC env file asks for.
#[derive(Clone, Debug, PartialEq)]
pub struct EcSetup {
    /// `GATEWAY_LIST` as written, in slot order (gw1 first).
    pub entries: Vec<String>,
    /// Their addresses when the file was read.
    pub gateways: Vec<SocketAddr>,
    /// Where port 80 redirects: `host` or `host:port` (from a name or a URL).
    pub dns_name: Option<String>,
    /// Found at one of [`CERT_LOCATIONS`] (or given on the command line).
    pub tls: Option<CertFiles>,
    /// How often host-name entries are resolved again; `None`: never.
    pub resolve_every: Option<Duration>,
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
    let entries: Vec<String> = list.split_whitespace().map(str::to_string).collect();
    if entries.is_empty() {
        return Err(err("GATEWAY_LIST", "is empty: list the gateways as \"ip:port ip:port\""));
    }
    let mut gateways = Vec::new();
    for (i, entry) in entries.iter().enumerate() {
        let addr = resolve_entry(entry).map_err(|e| {
            err("GATEWAY_LIST", format!("entry {} ({entry:?}) is not a reachable host:port: {e}", i + 1))
        })?;
        gateways.push(addr);
    }
    let dns_name = match vars.get("DNS_NAME").map(|d| d.trim()).filter(|d| !d.is_empty()) {
        Some(d) => Some(redirect_authority(d)?),
        None => None,
    };
    let resolve_every = match vars.get("GATEWAY_RESOLVE_SECONDS").map(|v| v.trim()) {
        None | Some("") => Some(RESOLVE_EVERY),
        Some(v) => match v.parse::<u64>() {
            Ok(0) => None,
            Ok(n) => Some(Duration::from_secs(n)),
            Err(_) => return Err(err("GATEWAY_RESOLVE_SECONDS", format!("{v:?} is not a number of seconds"))),
        },
    };
    Ok(EcSetup { entries, gateways, dns_name, tls: find_certs(home), resolve_every })
}

/// The `host[:port]` port 80 redirects to. `DNS_NAME` is "Gateway DNS Name OR load balancer
/// URL" (seed 001): a URL (`https://lb.example.com:8443/anything`) gives its host and port;
/// its path is dropped, since the original redirected to `https://$DNS_NAME$request_uri`.
pub fn redirect_authority(value: &str) -> Result<String, ConfigError> {
    let bad = |why: &str| err("DNS_NAME", format!("{value:?} {why}"));
    let authority = match value.split_once("://") {
        Some((scheme, rest)) => {
            if !["http", "https", "ws", "wss"].iter().any(|s| scheme.eq_ignore_ascii_case(s)) {
                return Err(bad("is a URL with an unknown scheme (use https://host[:port] or a host name)"));
            }
            rest.split(['/', '?', '#']).next().unwrap_or("")
        }
        None => value,
    };
    let (host, port) = split_authority(authority).ok_or_else(|| bad("is not a host name or URL"))?;
    if host.is_empty() {
        return Err(bad("names no host"));
    }
    if let Some(p) = port
        && !matches!(p.parse::<u16>(), Ok(n) if n > 0)
    {
        return Err(bad("has a bad port"));
    }
    Ok(authority.to_string())
}

/// `host[:port]` with a bracketed IPv6 host or a DNS-name-like host (no user info, no spaces).
fn split_authority(a: &str) -> Option<(&str, Option<&str>)> {
    let (host, port) = if let Some(rest) = a.strip_prefix('[') {
        let (ip, after) = rest.split_once(']')?;
        ip.parse::<Ipv6Addr>().ok()?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':')?),
        };
        (ip, port)
    } else {
        let (host, port) = match a.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (a, None),
        };
        let name_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_');
        if !host.chars().all(name_char) {
            return None;
        }
        (host, port)
    };
    Some((host, port))
}

/// Resolves one `GATEWAY_LIST` entry: an IPv4 address when the name has one (the gateways of
/// the seeds are IPv4), else the first address.
pub fn resolve_entry(entry: &str) -> io::Result<SocketAddr> {
    let addrs: Vec<SocketAddr> = entry.to_socket_addrs()?.collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no address"))
}

/// Whether an entry is a host name (resolved again) rather than an address literal.
fn is_name(entry: &str) -> bool {
    entry.parse::<SocketAddr>().is_err()
}

/// One round of resolving the gateways again.
#[derive(Debug, PartialEq)]
pub struct Round {
    /// One address per entry, in slot order.
    pub addrs: Vec<SocketAddr>,
    /// Entries that failed (index, error); they kept their previous address.
    pub failed: Vec<(usize, String)>,
}

/// Resolves the host-name entries again with `resolve`; literals and failures keep `previous`,
/// so a resolver outage never empties or reorders the pool.
pub fn resolve_again(
    entries: &[String],
    previous: &[SocketAddr],
    resolve: &dyn Fn(&str) -> io::Result<SocketAddr>,
) -> Round {
    let mut round = Round { addrs: previous.to_vec(), failed: Vec::new() };
    for (i, entry) in entries.iter().enumerate().filter(|(_, e)| is_name(e)) {
        match resolve(entry) {
            Ok(addr) if i < round.addrs.len() => round.addrs[i] = addr,
            Ok(_) => {}
            Err(e) => round.failed.push((i, e.to_string())),
        }
    }
    round
}

/// A resolver function, injectable for tests.
pub type Resolve = Arc<dyn Fn(&str) -> io::Result<SocketAddr> + Send + Sync>;

/// Resolves the host-name gateways every `resolve_every` and hands a changed pool to `apply`
/// (the node proposes it as it proposes the env file). Failures are logged and counted in
/// `failures`; they keep the previous address. Returns at once when there is nothing to do.
pub async fn watch_gateways<F, Fut>(ec: EcSetup, resolve: Resolve, failures: prometheus::IntCounter, mut apply: F)
where
    F: FnMut(ConfigFile) -> Fut,
    Fut: Future<Output = ()>,
{
    let Some(every) = ec.resolve_every.filter(|_| ec.entries.iter().any(|e| is_name(e))) else { return };
    tracing::info!(every_s = every.as_secs(), "EC gateways named by host name are resolved again periodically");
    let mut current = ec.gateways.clone();
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let (entries, previous, resolve) = (ec.entries.clone(), current.clone(), resolve.clone());
        // std's resolver blocks; a hung lookup must not stall the next rounds forever.
        let job = tokio::task::spawn_blocking(move || resolve_again(&entries, &previous, &*resolve));
        let round = match tokio::time::timeout(Duration::from_secs(20), job).await {
            Ok(Ok(round)) => round,
            _ => {
                failures.inc();
                tracing::warn!("EC gateway resolution timed out; the previous addresses stay");
                continue;
            }
        };
        for (i, why) in &round.failed {
            failures.inc();
            tracing::warn!(slot = i + 1, entry = %ec.entries[*i], error = %why, kept = %current[*i], "EC gateway did not resolve; its previous address stays");
        }
        if round.addrs != current {
            for (i, (old, new)) in current.iter().zip(&round.addrs).enumerate().filter(|(_, (o, n))| o != n) {
                tracing::info!(slot = i + 1, entry = %ec.entries[i], %old, %new, "EC gateway moved");
            }
            current = round.addrs;
            apply(ec.config_for(&current)).await;
        }
    }
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
    /// The gateway pool as resolved when the file was read.
    pub fn config(&self) -> ConfigFile {
        self.config_for(&self.gateways)
    }

    /// The gateway pool: every path, `gateways` in list order as slots gw1…gwN (pinning), TCP
    /// health checks, and the original's timeouts (connect/send 600 s, read 86 400 s).
    pub fn config_for(&self, gateways: &[SocketAddr]) -> ConfigFile {
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
        let backends = gateways
            .iter()
            .enumerate()
            .map(|(i, addr)| (*addr, BackendSpec { slot: Some(i as u32 + 1), ..BackendSpec::default() }))
            .collect();
        ConfigFile { pools: vec![(POOL.to_string(), spec, backends)], listen_ip: None, node: Default::default() }
    }

    /// With TLS (`tls`: a certificate was found or given) the plain port redirects to
    /// `https://DNS_NAME` (host and port); without a name it cannot.
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
        for dns in ["ftp://x/", "https://", "https://user@x/", "lb example", "x:99999", "x:0", "https://[nope]/", "a/b"]
        {
            let vars = parse_env(&format!("GATEWAY_LIST=127.0.0.1:1\nDNS_NAME={dns}\n")).expect("parse");
            let e = setup(&vars, None).expect_err(dns);
            assert_eq!(e.key, "DNS_NAME", "{dns}: {e}");
            assert!(e.problem.contains(dns), "the value is quoted: {e}");
        }
        let vars = parse_env("GATEWAY_LIST=127.0.0.1:1\nGATEWAY_RESOLVE_SECONDS=soon\n").expect("parse");
        assert_eq!(setup(&vars, None).expect_err("interval").key, "GATEWAY_RESOLVE_SECONDS");
    }

    #[test]
    fn dns_name_may_be_a_load_balancer_url() {
        let cases = [
            ("lb.example.com", "lb.example.com"),
            ("lb.example.com:8443", "lb.example.com:8443"),
            ("https://lb.example.com:8443/anything", "lb.example.com:8443"),
            ("https://lb.example.com", "lb.example.com"),
            ("HTTPS://lb.example.com/?q=1", "lb.example.com"),
            ("wss://lb.example.com/agent", "lb.example.com"),
            ("http://10.0.0.9:8080", "10.0.0.9:8080"),
            ("https://[2001:db8::1]:8443/x", "[2001:db8::1]:8443"),
        ];
        for (value, want) in cases {
            assert_eq!(redirect_authority(value).expect(value), want, "{value}");
        }
        let vars = parse_env("GATEWAY_LIST=127.0.0.1:1\nDNS_NAME=https://lb.example.com:8443/anything\n").expect("env");
        let s = setup(&vars, None).expect("setup");
        assert_eq!(s.redirect_host(true).expect("tls").as_deref(), Some("lb.example.com:8443"));
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("addr")
    }

    /// A resolver over a fixed table: names missing from it fail.
    fn table(entries: &[(&str, &str)]) -> impl Fn(&str) -> io::Result<SocketAddr> + Send + Sync + 'static {
        let map: HashMap<String, SocketAddr> = entries.iter().map(|(n, a)| (n.to_string(), addr(a))).collect();
        move |name| map.get(name).copied().ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no such host"))
    }

    #[test]
    fn resolving_again_keeps_slots_and_survives_failures() {
        let entries: Vec<String> = ["gw-a:8080", "10.0.0.2:8080", "gw-c:8080"].map(String::from).to_vec();
        let previous = [addr("172.18.0.2:8080"), addr("10.0.0.2:8080"), addr("172.18.0.4:8080")];
        // gw-a moved, gw-c did not: only slot 1 changes.
        let moved = table(&[("gw-a:8080", "172.18.0.9:8080"), ("gw-c:8080", "172.18.0.4:8080")]);
        let round = resolve_again(&entries, &previous, &moved);
        assert_eq!(round.addrs, [addr("172.18.0.9:8080"), addr("10.0.0.2:8080"), addr("172.18.0.4:8080")]);
        assert!(round.failed.is_empty());
        // The resolver knows nothing: every name keeps its address, the literal is not asked.
        let round = resolve_again(&entries, &previous, &table(&[]));
        assert_eq!(round.addrs, previous);
        assert_eq!(round.failed.iter().map(|(i, _)| *i).collect::<Vec<_>>(), [0, 2]);
    }

    #[tokio::test(start_paused = true)]
    async fn moved_gateways_are_proposed_in_slot_order() {
        let vars = parse_env("GATEWAY_LIST=127.0.0.1:1 127.0.0.1:2\nGATEWAY_RESOLVE_SECONDS=5\n").expect("env");
        let mut ec = setup(&vars, None).expect("setup");
        ec.entries = vec!["gw-a:1".into(), "gw-b:2".into()];
        let rounds = [
            table(&[("gw-a:1", "127.0.0.1:1"), ("gw-b:2", "127.0.0.1:2")]), // unchanged
            table(&[("gw-b:2", "127.0.0.7:2")]),                            // a fails, b moved
            table(&[("gw-a:1", "127.0.0.1:1"), ("gw-b:2", "127.0.0.7:2")]), // unchanged again
        ];
        // Two names per round: the n-th lookup belongs to round n / 2.
        let calls = std::sync::atomic::AtomicUsize::new(0);
        let resolve: Resolve = Arc::new(move |name| {
            let n = calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed) / 2;
            rounds.get(n).map_or(Err(io::Error::other("no more rounds")), |r| r(name))
        });
        let failures = prometheus::IntCounter::new("f", "f").expect("counter");
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let watcher = tokio::spawn(watch_gateways(ec, resolve, failures.clone(), move |file: ConfigFile| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(file);
            }
        }));
        // Rounds at 5, 10 and 15 s (paused time; a blocking lookup holds the clock still).
        tokio::time::sleep(Duration::from_millis(17_500)).await;
        let mut proposed = Vec::new();
        while let Ok(f) = rx.try_recv() {
            proposed.push(f);
        }
        watcher.abort();
        assert_eq!(proposed.len(), 1, "only the round that moved gw2 proposes: {proposed:?}");
        let (_, _, backends) = &proposed[0].pools[0];
        let slots: Vec<(SocketAddr, Option<u32>)> = backends.iter().map(|(a, b)| (*a, b.slot)).collect();
        assert_eq!(slots, [(addr("127.0.0.1:1"), Some(1)), (addr("127.0.0.7:2"), Some(2))]);
        assert_eq!(failures.get(), 1, "the failed lookup of gw-a is counted");
    }

    #[tokio::test(start_paused = true)]
    async fn literal_gateways_need_no_watcher() {
        let ec = setup(&parse_env("GATEWAY_LIST=127.0.0.1:1\n").expect("env"), None).expect("setup");
        let resolve: Resolve = Arc::new(|_: &str| -> io::Result<SocketAddr> { panic!("literals are never resolved") });
        let failures = prometheus::IntCounter::new("f", "f").expect("counter");
        let done = tokio::time::timeout(
            Duration::from_secs(1),
            watch_gateways(ec, resolve, failures, |_: ConfigFile| async {}),
        );
        assert!(done.await.is_ok(), "returns at once");
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
