//! Config files: shoal's own TOML and seed 004's two JSON shapes (`mode: "fl"` and
//! `mode: "ld"`, with `//` comments and the original's misspelled key), both translated into
//! pools (`config_watch` proposes them). Errors name the key and the problem.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use serde::Deserialize;
use shoal_proto::{Algorithm, ApplyError, BackendSpec, Command, HealthSpec, PoolSpec, Protocol, State, apply};

/// A config problem: which key, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {problem}")]
pub struct ConfigError {
    pub key: String,
    pub problem: String,
}

fn err(key: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError { key: key.into(), problem: problem.into() }
}

/// A pool of a config file: name, settings, backends.
pub type PoolEntry = (String, PoolSpec, Vec<(SocketAddr, BackendSpec)>);

/// A parsed config file.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigFile {
    /// One atomic batch that creates (or replaces) every pool of the file.
    pub pools: Vec<PoolEntry>,
    /// The listen IP a seed file names, used when `--listen-ip` is not given.
    pub listen_ip: Option<IpAddr>,
    /// Node settings of the TOML `[node]` table, read at start (flags win).
    pub node: NodeSection,
}

/// The TOML `[node]` table: settings of the node reading the file, not replicated. Values are
/// checked when the file is parsed, so `shoal check-config` names a bad one.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSection {
    /// `off`, `stdout` or a file path.
    pub access_log: Option<String>,
    /// `json`, `common` or `combined`.
    pub access_log_format: Option<String>,
    pub request_id: Option<bool>,
    pub traceparent: Option<bool>,
}

impl NodeSection {
    fn check(&self) -> Result<(), ConfigError> {
        if let Some(v) = &self.access_log {
            crate::dataplane::accesslog::parse_target(v).map_err(|e| err("node.access_log", e.to_string()))?;
        }
        if let Some(v) = &self.access_log_format {
            v.parse::<crate::dataplane::accesslog::Format>()
                .map_err(|e| err("node.access_log_format", e.to_string()))?;
        }
        Ok(())
    }
}

impl ConfigFile {
    /// Checks the whole file as `apply` would, naming the pool in errors.
    pub fn validate(&self) -> Result<State, ConfigError> {
        let mut state = State::default();
        for (name, spec, backends) in &self.pools {
            let prefix = format!("pools.{name}");
            apply(&mut state, &Command::PutPool { name: name.clone(), spec: spec.clone() })
                .map_err(|e| from_apply(&prefix, e))?;
            for (addr, b) in backends {
                apply(&mut state, &Command::PutBackend { pool: name.clone(), addr: *addr, spec: b.clone() })
                    .map_err(|e| from_apply(&format!("{prefix}.backends.\"{addr}\""), e))?;
            }
        }
        Ok(state)
    }
}

fn from_apply(prefix: &str, e: ApplyError) -> ConfigError {
    match e {
        ApplyError::Invalid { key, problem } => err(format!("{prefix}.{key}"), problem),
        other => err(prefix, other.to_string()),
    }
}

/// Reads and parses a config file, deciding the format by content.
pub fn load(path: &Path) -> Result<ConfigFile, ConfigError> {
    let bytes = std::fs::read(path).map_err(|e| unreadable(path, &e))?;
    from_bytes(path, &bytes)
}

/// Parses and validates the content of the config file at `path`.
pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<ConfigFile, ConfigError> {
    let text = std::str::from_utf8(bytes).map_err(|e| err(path.display().to_string(), format!("not UTF-8: {e}")))?;
    let file = parse(text)?;
    file.validate()?;
    Ok(file)
}

/// The error for a config file that cannot be read.
pub fn unreadable(path: &Path, e: &std::io::Error) -> ConfigError {
    err(path.display().to_string(), format!("cannot read: {e}"))
}

/// Parses config text: JSON (seed 004) when it starts with `{`, TOML otherwise.
pub fn parse(text: &str) -> Result<ConfigFile, ConfigError> {
    let trimmed = strip_leading_comments(text);
    if trimmed.starts_with('{') { parse_seed_json(text) } else { parse_toml(text) }
}

fn strip_leading_comments(text: &str) -> &str {
    let mut rest = text.trim_start();
    while rest.starts_with("//") || rest.starts_with('#') {
        rest = rest.split_once('\n').map_or("", |(_, r)| r).trim_start();
    }
    rest
}

// ---------------------------------------------------------------- shoal TOML

fn parse_toml(text: &str) -> Result<ConfigFile, ConfigError> {
    let root: toml::Table = toml::from_str(text).map_err(|e| err(toml_key(&e), toml_problem(&e)))?;
    let mut pools = Vec::new();
    let mut node = NodeSection::default();
    for (key, value) in root {
        match key.as_str() {
            "node" => {
                node = value.try_into().map_err(|e: toml::de::Error| err("node", e.message().to_string()))?;
                node.check()?;
            }
            "pools" => {
                let table = value.as_table().ok_or_else(|| err("pools", "must be a table of pools"))?;
                for (name, pool) in table {
                    pools.push(parse_toml_pool(name, pool)?);
                }
            }
            other => return Err(err(other, "unknown top-level key (expected `pools` or `node`)")),
        }
    }
    Ok(ConfigFile { pools, listen_ip: None, node })
}

fn parse_toml_pool(name: &str, value: &toml::Value) -> Result<PoolEntry, ConfigError> {
    let prefix = format!("pools.{name}");
    let mut table = value.as_table().cloned().ok_or_else(|| err(&prefix, "must be a table"))?;
    let backends = table.remove("backends");
    let spec: PoolSpec =
        toml::Value::Table(table).try_into().map_err(|e: toml::de::Error| err(&prefix, e.message().to_string()))?;
    let mut list = Vec::new();
    if let Some(backends) = backends {
        let bt = backends
            .as_table()
            .ok_or_else(|| err(format!("{prefix}.backends"), "must be a table keyed by \"ip:port\""))?;
        for (addr, b) in bt {
            let key = format!("{prefix}.backends.\"{addr}\"");
            let addr: SocketAddr = addr.parse().map_err(|_| err(&key, "not an ip:port address"))?;
            let spec: BackendSpec =
                b.clone().try_into().map_err(|e: toml::de::Error| err(&key, e.message().to_string()))?;
            list.push((addr, spec));
        }
    }
    Ok((name.to_string(), spec, list))
}

fn toml_key(e: &toml::de::Error) -> String {
    match e.span() {
        Some(span) => format!("config (bytes {}..{})", span.start, span.end),
        None => "config".into(),
    }
}

fn toml_problem(e: &toml::de::Error) -> String {
    e.message().trim().to_string()
}

// ---------------------------------------------------------------- seed 004 JSON

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SeedFl {
    #[allow(dead_code)]
    mode: String,
    client_tcp_listening_addr: String,
    logic_heartbeat_udp_addr: String,
    logic_servers: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SeedLd {
    #[allow(dead_code)]
    mode: String,
    logic_servers_tcp_listening_addr: String,
    logic_servers_heartbeat_udp_addr: String,
    data_servers_tcp_listening_addr: String,
    #[serde(alias = "data_servers_heartbeat_udp_addr")]
    data_servers_hearbeat_udp_addr: String,
    logic_servers: Vec<String>,
    data_servers: Vec<String>,
}

fn parse_seed_json(text: &str) -> Result<ConfigFile, ConfigError> {
    let stripped = strip_json_comments(text)?;
    let value: serde_json::Value =
        serde_json::from_str(&stripped).map_err(|e| err(format!("config line {}", e.line()), e.to_string()))?;
    let mode =
        value.get("mode").and_then(|m| m.as_str()).ok_or_else(|| err("mode", "missing: expected \"fl\" or \"ld\""))?;
    match mode {
        "fl" => {
            let fl: SeedFl = serde_json::from_value(value).map_err(|e| err("config", e.to_string()))?;
            let (ip, port) = split_listen("client_tcp_listening_addr", &fl.client_tcp_listening_addr)?;
            let (_, hb) = split_listen("logic_heartbeat_udp_addr", &fl.logic_heartbeat_udp_addr)?;
            let pool = heartbeat_pool("logic", port, hb, "logic_servers", &fl.logic_servers)?;
            Ok(ConfigFile { pools: vec![pool], listen_ip: Some(ip), node: NodeSection::default() })
        }
        "ld" => {
            let ld: SeedLd = serde_json::from_value(value).map_err(|e| err("config", e.to_string()))?;
            let (ip, logic_port) =
                split_listen("logic_servers_tcp_listening_addr", &ld.logic_servers_tcp_listening_addr)?;
            let (_, data_port) = split_listen("data_servers_tcp_listening_addr", &ld.data_servers_tcp_listening_addr)?;
            let (_, logic_hb) = split_listen("logic_servers_heartbeat_udp_addr", &ld.logic_servers_heartbeat_udp_addr)?;
            let (_, data_hb) = split_listen("data_servers_hearbeat_udp_addr", &ld.data_servers_hearbeat_udp_addr)?;
            // Logic servers connect to their listener and reach a data server, and vice versa.
            let data = heartbeat_pool("data", logic_port, data_hb, "data_servers", &ld.data_servers)?;
            let logic = heartbeat_pool("logic", data_port, logic_hb, "logic_servers", &ld.logic_servers)?;
            Ok(ConfigFile { pools: vec![data, logic], listen_ip: Some(ip), node: NodeSection::default() })
        }
        other => Err(err("mode", format!("{other:?} is not a mode: expected \"fl\" or \"ld\""))),
    }
}

fn strip_json_comments(text: &str) -> Result<String, ConfigError> {
    let mut out = String::new();
    std::io::Read::read_to_string(&mut json_comments::StripComments::new(text.as_bytes()), &mut out)
        .map_err(|e| err("config", format!("cannot strip comments: {e}")))?;
    Ok(out)
}

fn split_listen(key: &str, value: &str) -> Result<(IpAddr, u16), ConfigError> {
    let addr: SocketAddr =
        value.trim().parse().map_err(|_| err(key, format!("{value:?} is not an ip:port address")))?;
    if addr.port() == 0 {
        return Err(err(key, "port 0 cannot be listened on"));
    }
    Ok((addr.ip(), addr.port()))
}

/// A seed pool: TCP listener, heartbeat checks, servers given as `"<tcp addr> <udp addr>"`.
fn heartbeat_pool(
    name: &str,
    listen: u16,
    heartbeat: u16,
    key: &str,
    servers: &[String],
) -> Result<PoolEntry, ConfigError> {
    let spec = PoolSpec {
        protocol: Protocol::Tcp,
        listen: Some(listen),
        algorithm: Algorithm::RoundRobin,
        health: HealthSpec { heartbeat_port: Some(heartbeat), ..HealthSpec::default() },
        ..PoolSpec::default()
    }
    .normalize();
    let mut backends = Vec::new();
    for (i, entry) in servers.iter().enumerate() {
        let k = format!("{key}[{i}]");
        let mut parts = entry.split_whitespace();
        let (Some(tcp), Some(udp), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(err(k, format!("{entry:?}: expected \"<tcp addr> <udp addr>\"")));
        };
        let tcp: SocketAddr = tcp.parse().map_err(|_| err(&k, format!("{tcp:?} is not an ip:port address")))?;
        let udp: SocketAddr = udp.parse().map_err(|_| err(&k, format!("{udp:?} is not an ip:port address")))?;
        backends.push((tcp, BackendSpec { heartbeat_addr: Some(udp), ..BackendSpec::default() }));
    }
    Ok((name.to_string(), spec, backends))
}

/// A short human summary for `shoal check-config`.
pub fn summary(file: &ConfigFile) -> String {
    let pools: BTreeMap<&str, usize> = file.pools.iter().map(|(n, _, b)| (n.as_str(), b.len())).collect();
    let list: Vec<String> = pools.iter().map(|(n, b)| format!("{n} ({b} backends)")).collect();
    format!("{} pools: {}", pools.len(), list.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    const FL: &str = r#"{
    "mode": "fl", // frontend to logic reverse proxy
    "client_tcp_listening_addr": "0.0.0.0:3001", // tcp addr to which the frontend can connect to
    "logic_heartbeat_udp_addr": "0.0.0.0:5000", // udp addr to which your logic server will be sending status updates
    "logic_servers": [
        // <udp> <tcp> listening addrs for each of the logical servers
        "0.0.0.0:7000 0.0.0.0:7001",
        "0.0.0.0:7002 0.0.0.0:7003"
    ]
}"#;

    const LD: &str = r#"{
    "mode": "ld",
    "logic_servers_tcp_listening_addr": "0.0.0.0:3001",
    "logic_servers_heartbeat_udp_addr": "0.0.0.0:5001",
    "data_servers_tcp_listening_addr": "0.0.0.0:3000",
    "data_servers_hearbeat_udp_addr": "0.0.0.0:5000",
    "logic_servers": [
        "0.0.0.0:7002 0.0.0.0:7003"
    ],
    "data_servers": [
        "0.0.0.0:7000 0.0.0.0:7001"
    ]
}"#;

    #[test]
    fn seed_fl_file_is_accepted_as_is() {
        let f = parse(FL).expect("fl");
        let state = f.validate().expect("valid");
        let logic = &state.pools["logic"];
        assert_eq!(logic.spec.listen, Some(3001));
        assert_eq!(logic.spec.health.heartbeat_port, Some(5000));
        let b = &logic.backends["0.0.0.0:7000"];
        assert_eq!(b.spec.heartbeat_addr, Some("0.0.0.0:7001".parse().expect("addr")), "TCP first");
        assert_eq!(f.listen_ip, Some("0.0.0.0".parse().expect("ip")));
    }

    #[test]
    fn seed_ld_file_bridges_both_directions() {
        let state = parse(LD).expect("ld").validate().expect("valid");
        assert_eq!(state.pools["data"].spec.listen, Some(3001), "logic side reaches data servers");
        assert_eq!(state.pools["data"].spec.health.heartbeat_port, Some(5000));
        assert!(state.pools["data"].backends.contains_key("0.0.0.0:7000"));
        assert_eq!(state.pools["logic"].spec.listen, Some(3000), "data side reaches logic servers");
        assert_eq!(state.pools["logic"].spec.health.heartbeat_port, Some(5001));
    }

    #[test]
    fn toml_config_round_trip() {
        let text = r#"
[pools.web]
pattern = "/"
algorithm = "least_conn"
[pools.web.health]
interval_ms = 500
[pools.web.backends."127.0.0.1:8082"]
weight = 3
[pools.api]
pattern = "/api/"
"#;
        let state = parse(text).expect("toml").validate().expect("valid");
        assert_eq!(state.pools["web"].spec.algorithm, Algorithm::LeastConn);
        assert_eq!(state.pools["web"].backends["127.0.0.1:8082"].spec.weight, 3);
    }

    #[test]
    fn errors_name_the_key() {
        let cases: &[(&str, &str)] = &[
            ("[pools.web]\npatern = \"/\"\n", "pools.web"),
            ("[pools.web]\npattern = \"/\"\nalgorithm = \"fastest\"\n", "pools.web"),
            ("[pools.web]\npattern = \"/\"\n[pools.web.backends.\"nope\"]\n", "pools.web.backends.\"nope\""),
            (
                "[pools.web]\npattern = \"/\"\n[pools.web.backends.\"1.2.3.4:80\"]\nweight = 0\n",
                "pools.web.backends.\"1.2.3.4:80\".weight",
            ),
            ("[pools.t]\nprotocol = \"tcp\"\n", "pools.t.listen"),
            ("[pools.web]\npattern = \"/\"\n[pools.web.health]\nrise = 0\n", "pools.web.health.rise"),
            ("[listeners]\n", "listeners"),
            ("[pools.a]\npattern = \"/\"\n[pools.b]\npattern = \"/\"\n", "pools.b"),
            ("[pools.a]\nprotocol = \"tcp\"\nlisten = 3001\n[pools.b]\nprotocol = \"tcp\"\nlisten = 3001\n", "pools.b"),
            (
                "[pools.web]\npattern = \"/\"\n[pools.web.health]\nheartbeat_port = 5000\ncheck = \"http\"\n",
                "pools.web.health.heartbeat_port",
            ),
            ("[pools.web]\npattern = \"/\"\nscope = { zones = [] }\n", "pools.web.scope.zones"),
            (
                "[pools.t]\nprotocol = \"tcp\"\nlisten = 3001\nself_register = true\n[pools.t.health]\nheartbeat_port = 5000\n",
                "pools.t.health.heartbeat_secret",
            ),
            (
                "[pools.t]\nprotocol = \"tcp\"\nlisten = 3001\nself_register = true\nmax_self_registered = 0\n[pools.t.health]\nheartbeat_port = 5000\nheartbeat_secret = \"k\"\n",
                "pools.t.max_self_registered",
            ),
            (
                "[pools.web]\npattern = \"/\"\n[pools.web.backends.\"1.2.3.4:80\"]\nurl_path = \"no-slash\"\n",
                "pools.web.backends.\"1.2.3.4:80\".url_path",
            ),
            (
                "[pools.web]\npattern = \"/\"\n[pools.web.backends.\"1.2.3.4:80\"]\nzone = \"has space\"\n",
                "pools.web.backends.\"1.2.3.4:80\".zone",
            ),
            (
                "[pools.web]\npattern = \"/\"\n[pools.web.backends.\"1.2.3.4:80\"]\nwieght = 2\n",
                "pools.web.backends.\"1.2.3.4:80\"",
            ),
            (
                "[pools.t]\nprotocol = \"tcp\"\nlisten = 3001\naccept_proxy_from = [\"10.0.0.0/33\"]\n",
                "pools.t.accept_proxy_from",
            ),
            ("[pools.web]\npattern = \"/\"\naccept_proxy_from = [\"10.0.0.0/8\"]\n", "pools.web.accept_proxy_from"),
            ("[pools.web]\npattern = \"/\"\nsend_proxy = \"v3\"\n", "pools.web"),
            ("[pools.web]\npattern = 5\n", "pools.web"),
            ("[pools.web]\npattern = \"/\"\npanic_threshold = 300\n", "pools.web"),
            ("[pools.web]\npattern = \"/\"\nqueue_timeout_ms = 0\n", "pools.web.queue_timeout_ms"),
            ("[pools.web]\npattern = \"/\"\nslow_start_s = 7200\n", "pools.web.slow_start_s"),
            ("[pools.web]\npattern = \"/\"\nmax_connections = 2000000\n", "pools.web.max_connections"),
            (
                "[pools.web]\npattern = \"/\"\n[pools.web.outlier]\nconsecutive_5xx = 0\n",
                "pools.web.outlier.consecutive_5xx",
            ),
            ("[pools.web]\npattern = \"/\"\n[pools.web.outlier]\nconsecutive5xx = 3\n", "pools.web"),
            ("[pools.\"bad name\"]\npattern = \"/\"\n", "pools.bad name"),
            ("[pools.web\n", "config"),
            ("{\"mode\": \"xx\"}", "mode"),
            (
                "{\"mode\": \"fl\", \"client_tcp_listening_addr\": \"nope\", \"logic_heartbeat_udp_addr\": \"0.0.0.0:5000\", \"logic_servers\": []}",
                "client_tcp_listening_addr",
            ),
            (
                "{\"mode\": \"fl\", \"client_tcp_listening_addr\": \"0.0.0.0:1\", \"logic_heartbeat_udp_addr\": \"0.0.0.0:5000\", \"logic_servers\": [\"1.1.1.1:1\"]}",
                "logic_servers[0]",
            ),
        ];
        for (text, key) in cases {
            let e = parse(text).and_then(|f| f.validate().map(|_| ())).expect_err(text);
            assert!(e.key.starts_with(key), "{text:?}: got key {:?} ({})", e.key, e.problem);
        }
    }

    #[test]
    fn proxy_protocol_settings_parse() {
        let text = "[pools.t]\nprotocol = \"tcp\"\nlisten = 3001\naccept_proxy_from = [\"10.0.0.0/8\", \"2001:db8::/32\"]\nsend_proxy = \"v2\"\n";
        let state = parse(text).and_then(|f| f.validate()).expect("valid");
        let spec = &state.pools["t"].spec;
        assert_eq!(spec.accept_proxy_from, ["10.0.0.0/8", "2001:db8::/32"]);
        assert_eq!(spec.send_proxy, Some(shoal_proto::proxy::Version::V2));
    }

    #[test]
    fn unknown_toml_fields_are_reported_with_their_name() {
        let e = parse("[pools.web]\npatern = \"/\"\n").expect_err("typo");
        assert!(e.problem.contains("patern"), "{e}");
    }

    #[test]
    fn the_node_table_is_read_and_checked() {
        let file = parse(
            "[node]\naccess_log = \"/var/log/shoal.log\"\naccess_log_format = \"combined\"\nrequest_id = false\n",
        )
        .expect("valid");
        assert_eq!(file.node.access_log.as_deref(), Some("/var/log/shoal.log"));
        assert_eq!(file.node.access_log_format.as_deref(), Some("combined"));
        assert_eq!((file.node.request_id, file.node.traceparent), (Some(false), None));
        let e = parse("[node]\naccess_log_format = \"xml\"\n").expect_err("bad format");
        assert_eq!(e.key, "node.access_log_format");
        assert!(e.problem.contains("xml"), "{e}");
        assert_eq!(parse("[node]\naccess_log = \"\"\n").expect_err("empty").key, "node.access_log");
        let e = parse("[node]\nacess_log = \"stdout\"\n").expect_err("typo");
        assert!(e.key == "node" && e.problem.contains("acess_log"), "{e}");
        assert!(parse("[node]\nrequest_id = \"yes\"\n").is_err());
    }
}
