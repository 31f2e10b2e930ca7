//! Commands: the only way desired state changes. Every node applies the same committed
//! commands with the same pure [`apply`], so every node holds the same [`State`].

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::spec::{Backend, BackendSpec, CheckKind, Pool, PoolSpec, Protocol, State, backend_key, validate_pool_name};

/// A command as Raft's log holds it. The proposer picks `id` once per client write and keeps
/// it across retries, so a write whose reply was lost and that is proposed again applies once
/// (0: no deduplication).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Proposal {
    pub id: u64,
    pub cmd: Command,
}

/// A change of desired state, as proposed through Raft.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Command {
    /// Create a pool or replace its settings; its backends are kept.
    PutPool {
        name: String,
        #[serde(with = "self_describing")]
        spec: PoolSpec,
    },
    /// Remove a pool and its backends; established connections finish on their own.
    DeletePool { name: String },
    /// Create a backend or replace its settings.
    PutBackend {
        pool: String,
        addr: SocketAddr,
        #[serde(with = "self_describing")]
        spec: BackendSpec,
    },
    /// Remove a backend; established connections finish on their own.
    DeleteBackend { pool: String, addr: SocketAddr },
    /// Stop (or resume) sending new work to a backend.
    SetDrain { pool: String, addr: SocketAddr, drain: bool },
    /// Several commands applied atomically: all or none. Nesting is limited to
    /// [`MAX_BATCH_DEPTH`] so a hostile frame cannot exhaust the stack while decoding.
    Batch(#[serde(deserialize_with = "batch_depth::deserialize")] Vec<Command>),
    /// Changes nothing; a linearizable read barrier and a liveness probe for writes.
    Noop,
    /// Refuse a node certificate on the cluster port from now on (its serial, lower-case hex,
    /// and the node it names). Revoking twice is not an error.
    RevokeCert { serial: String, node: String },
}

/// Deepest nesting of [`Command::Batch`] a decoder accepts.
pub const MAX_BATCH_DEPTH: usize = 8;

/// Settings cross the Raft wire as JSON inside the binary frame. bincode's layout is positional:
/// a field added in a later release would make an older node misread every following byte,
/// where JSON lets it read entries that leave new settings at their defaults (new spec fields
/// are skipped when default) and refuse, by name, the ones that use them. The JSON store and
/// the API see the plain structure.
mod self_describing {
    use std::fmt;

    use serde::de::{DeserializeOwned, Error as _, Visitor};
    use serde::ser::Error as _;
    use serde::{Deserializer, Serialize, Serializer};

    pub(super) fn serialize<T: Serialize, S: Serializer>(value: &T, ser: S) -> Result<S::Ok, S::Error> {
        if ser.is_human_readable() {
            return value.serialize(ser);
        }
        let json = serde_json::to_vec(value).map_err(S::Error::custom)?;
        ser.serialize_bytes(&json)
    }

    pub(super) fn deserialize<'de, T: DeserializeOwned, D: Deserializer<'de>>(de: D) -> Result<T, D::Error> {
        if de.is_human_readable() {
            return T::deserialize(de);
        }
        let json = de.deserialize_byte_buf(Bytes)?;
        serde_json::from_slice(&json).map_err(D::Error::custom)
    }

    struct Bytes;

    impl Visitor<'_> for Bytes {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("settings as JSON bytes")
        }

        fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }

        fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(v)
        }
    }
}

/// Counts how deep the current thread is inside nested batches while deserializing.
/// Decoders (bincode has no recursion limit) recurse once per level, so the guard must
/// sit in the decoder itself rather than in a check after decoding.
mod batch_depth {
    use std::cell::Cell;

    use serde::{Deserialize, Deserializer, de::Error};

    use super::{Command, MAX_BATCH_DEPTH};

    thread_local! {
        static DEPTH: Cell<usize> = const { Cell::new(0) };
    }

    /// Leaves the level again even when decoding fails half way.
    struct Level;

    impl Drop for Level {
        fn drop(&mut self) {
            DEPTH.with(|d| d.set(d.get().saturating_sub(1)));
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(de: D) -> Result<Vec<Command>, D::Error> {
        let depth = DEPTH.with(|d| {
            d.set(d.get() + 1);
            d.get()
        });
        let _level = Level;
        if depth > MAX_BATCH_DEPTH {
            return Err(D::Error::custom(format!("batches nested deeper than {MAX_BATCH_DEPTH}")));
        }
        Vec::deserialize(de)
    }
}

/// What a successful command did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    /// The state's version after the command.
    pub version: u64,
}

/// Why a command was refused. Refusals are deterministic, so every node refuses alike.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, thiserror::Error)]
#[serde(rename_all = "snake_case")]
pub enum ApplyError {
    #[error("{key}: {problem}")]
    Invalid { key: String, problem: String },
    #[error("pool {0:?} does not exist")]
    NoSuchPool(String),
    #[error("backend {addr} is not in pool {pool:?}")]
    NoSuchBackend { pool: String, addr: String },
    #[error("{0}")]
    Conflict(String),
}

impl ApplyError {
    /// HTTP status the admin API answers with.
    pub fn status(&self) -> u16 {
        match self {
            ApplyError::Invalid { .. } => 400,
            ApplyError::NoSuchPool(_) | ApplyError::NoSuchBackend { .. } => 404,
            ApplyError::Conflict(_) => 409,
        }
    }
}

/// Applies `cmd` to `state`. On error `state` is left exactly as it was.
pub fn apply(state: &mut State, cmd: &Command) -> Result<Applied, ApplyError> {
    let mut next = state.clone();
    apply_inner(&mut next, cmd)?;
    if !matches!(cmd, Command::Noop) {
        next.version += 1;
    }
    *state = next;
    Ok(Applied { version: state.version })
}

fn apply_inner(state: &mut State, cmd: &Command) -> Result<(), ApplyError> {
    match cmd {
        Command::PutPool { name, spec } => put_pool(state, name, spec),
        Command::DeletePool { name } => {
            state.pools.remove(name).map(|_| ()).ok_or_else(|| ApplyError::NoSuchPool(name.clone()))
        }
        Command::PutBackend { pool, addr, spec } => put_backend(state, pool, *addr, spec),
        Command::DeleteBackend { pool, addr } => {
            let p = pool_mut(state, pool)?;
            p.backends.remove(&backend_key(addr)).map(|_| ()).ok_or_else(|| no_backend(pool, addr))
        }
        Command::SetDrain { pool, addr, drain } => {
            let p = pool_mut(state, pool)?;
            let b = p.backends.get_mut(&backend_key(addr)).ok_or_else(|| no_backend(pool, addr))?;
            b.spec.drain = *drain;
            Ok(())
        }
        Command::Batch(cmds) => cmds.iter().try_for_each(|c| apply_inner(state, c)),
        Command::Noop => Ok(()),
        Command::RevokeCert { serial, node } => {
            validate_serial(serial)?;
            state.revoked_certs.insert(serial.clone(), node.clone());
            Ok(())
        }
    }
}

/// A certificate serial as `shoal cert node` prints it: 1 to 20 bytes in lower-case hex.
fn validate_serial(serial: &str) -> Result<(), ApplyError> {
    let hex = serial.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if hex && serial.len().is_multiple_of(2) && (2..=40).contains(&serial.len()) {
        return Ok(());
    }
    Err(ApplyError::Invalid {
        key: "serial".into(),
        problem: format!("{serial:?} is not a certificate serial (2 to 40 lower-case hex digits)"),
    })
}

fn put_pool(state: &mut State, name: &str, spec: &PoolSpec) -> Result<(), ApplyError> {
    validate_pool_name(name)?;
    let spec = spec.clone().normalize();
    spec.validate()?;
    check_conflicts(&state.pools, name, &spec)?;
    let pool = state.pools.entry(name.to_string()).or_insert_with(|| Pool {
        name: name.to_string(),
        spec: spec.clone(),
        backends: BTreeMap::new(),
    });
    if pool.spec.check() != spec.check() && spec.check() == CheckKind::Heartbeat {
        require_heartbeat_addrs(name, &pool.backends)?;
    }
    pool.spec = spec;
    Ok(())
}

/// Two pools may not share a URL pattern, a TCP port or a heartbeat port.
fn check_conflicts(pools: &BTreeMap<String, Pool>, name: &str, spec: &PoolSpec) -> Result<(), ApplyError> {
    for other in pools.values().filter(|p| p.name != name) {
        let o = &other.spec;
        if spec.protocol == Protocol::Http && o.protocol == Protocol::Http && o.pattern == spec.pattern {
            return Err(conflict(name, &other.name, "URL pattern"));
        }
        if spec.listen.is_some() && o.listen == spec.listen {
            return Err(conflict(name, &other.name, "listen port"));
        }
        let hb = spec.health.heartbeat_port;
        if hb.is_some() && (o.health.heartbeat_port == hb || o.listen == hb) {
            return Err(conflict(name, &other.name, "heartbeat port"));
        }
        if spec.listen.is_some() && o.health.heartbeat_port == spec.listen {
            return Err(conflict(name, &other.name, "heartbeat port"));
        }
    }
    Ok(())
}

fn conflict(name: &str, other: &str, what: &str) -> ApplyError {
    ApplyError::Conflict(format!("pool {name:?} would share its {what} with pool {other:?}"))
}

fn require_heartbeat_addrs(pool: &str, backends: &BTreeMap<String, Backend>) -> Result<(), ApplyError> {
    match backends.values().find(|b| b.spec.heartbeat_addr.is_none()) {
        Some(b) => Err(ApplyError::Invalid {
            key: "health.check".into(),
            problem: format!(
                "pool {pool:?} has backend {} without a heartbeat_addr; heartbeat checks need one per backend",
                b.addr
            ),
        }),
        None => Ok(()),
    }
}

fn put_backend(state: &mut State, pool: &str, addr: SocketAddr, spec: &BackendSpec) -> Result<(), ApplyError> {
    spec.validate()?;
    if addr.port() == 0 {
        return Err(ApplyError::Invalid { key: "addr".into(), problem: "port 0 is not a backend port".into() });
    }
    let p = pool_mut(state, pool)?;
    if let Some(slot) = spec.slot
        && let Some(other) = p.backends.values().find(|b| b.spec.slot == Some(slot) && b.addr != addr)
    {
        return Err(ApplyError::Conflict(format!("slot {slot} of pool {pool:?} is taken by {}", other.addr)));
    }
    if p.spec.check() == CheckKind::Heartbeat && spec.heartbeat_addr.is_none() {
        return Err(ApplyError::Invalid {
            key: "heartbeat_addr".into(),
            problem: format!("pool {pool:?} checks heartbeats: give the UDP address the backend sends from"),
        });
    }
    p.backends.insert(backend_key(&addr), Backend { addr, spec: spec.clone() });
    Ok(())
}

fn pool_mut<'a>(state: &'a mut State, pool: &str) -> Result<&'a mut Pool, ApplyError> {
    state.pools.get_mut(pool).ok_or_else(|| ApplyError::NoSuchPool(pool.to_string()))
}

fn no_backend(pool: &str, addr: &SocketAddr) -> ApplyError {
    ApplyError::NoSuchBackend { pool: pool.to_string(), addr: addr.to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a node of another release puts in a frame: `PutPool` (variant 0) with its
    /// settings as JSON bytes, which bincode lays out as `Vec<u8>` is.
    #[derive(Serialize)]
    enum Foreign {
        PutPool { name: String, spec: Vec<u8> },
    }

    fn foreign_put_pool(json: &str) -> Result<Command, crate::codec::CodecError> {
        let frame = crate::codec::encode(1, &Foreign::PutPool { name: "p".into(), spec: json.as_bytes().to_vec() })
            .expect("encode");
        crate::codec::decode::<Command>(&frame).map(|(_, c)| c)
    }

    #[test]
    fn settings_from_another_release_are_read_by_name() {
        // An older node's settings lack newer fields: they take their defaults.
        let cmd = foreign_put_pool(r#"{"pattern":"/old"}"#).expect("older settings decode");
        assert_eq!(cmd, Command::PutPool { name: "p".into(), spec: http_pool("/old") });
        // A newer node's setting this node lacks is refused by name, never misread.
        let err = foreign_put_pool(r#"{"pattern":"/","future_setting":1}"#).expect_err("unknown setting");
        assert!(err.to_string().contains("future_setting"), "{err}");
        // And this node's own frames carry the settings as JSON.
        let frame =
            crate::codec::encode(1, &Command::PutPool { name: "p".into(), spec: http_pool("/x") }).expect("encode");
        assert!(frame.windows(14).any(|w| w == br#""pattern":"/x""#), "settings are JSON on the wire");
    }

    fn http_pool(pattern: &str) -> PoolSpec {
        PoolSpec { pattern: Some(pattern.into()), ..PoolSpec::default() }
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("test address")
    }

    #[test]
    fn put_pool_then_backend_bumps_version() {
        let mut st = State::default();
        let r = apply(&mut st, &Command::PutPool { name: "web".into(), spec: http_pool("/") });
        assert_eq!(r, Ok(Applied { version: 1 }));
        let cmd =
            Command::PutBackend { pool: "web".into(), addr: addr("127.0.0.1:8082"), spec: BackendSpec::default() };
        assert_eq!(apply(&mut st, &cmd), Ok(Applied { version: 2 }));
        let pool = &st.pools["web"];
        assert_eq!(pool.spec.check(), CheckKind::Http, "normalize picks http checks");
        assert!(pool.backends.contains_key("127.0.0.1:8082"));
    }

    #[test]
    fn revoked_certificates_are_kept_by_serial() {
        let mut st = State::default();
        let revoke = |serial: &str| Command::RevokeCert { serial: serial.into(), node: "n3".into() };
        apply(&mut st, &revoke("7f01")).expect("revoke");
        apply(&mut st, &revoke("7f01")).expect("twice is fine");
        assert_eq!(st.revoked_certs.get("7f01").map(String::as_str), Some("n3"));
        for bad in ["", "7F01", "abc", "xyz0", &"ab".repeat(21)] {
            assert!(matches!(apply(&mut st, &revoke(bad)), Err(ApplyError::Invalid { .. })), "{bad:?}");
        }
        assert_eq!(st.version, 2);
        let frame = crate::codec::encode(1, &st).expect("encode");
        assert_eq!(crate::codec::decode::<State>(&frame).expect("decode").1, st, "bincode round trip");
        let old: State = serde_json::from_str(r#"{"version": 3, "pools": {}}"#).expect("an older snapshot");
        assert!(old.revoked_certs.is_empty());
    }

    #[test]
    fn refused_command_leaves_state_untouched() {
        let mut st = State::default();
        apply(&mut st, &Command::PutPool { name: "a".into(), spec: http_pool("/") }).expect("first pool");
        let before = st.clone();
        let dup = Command::PutPool { name: "b".into(), spec: http_pool("/") };
        assert!(matches!(apply(&mut st, &dup), Err(ApplyError::Conflict(_))));
        let batch = Command::Batch(vec![
            Command::PutPool { name: "c".into(), spec: http_pool("/c/") },
            Command::DeletePool { name: "missing".into() },
        ]);
        assert_eq!(apply(&mut st, &batch), Err(ApplyError::NoSuchPool("missing".into())));
        assert_eq!(st, before);
    }

    #[test]
    fn tcp_pool_needs_port_and_no_http_check() {
        let mut st = State::default();
        let spec = PoolSpec { protocol: Protocol::Tcp, ..PoolSpec::default() };
        let err = apply(&mut st, &Command::PutPool { name: "t".into(), spec }).unwrap_err();
        assert!(matches!(err, ApplyError::Invalid { ref key, .. } if key == "listen"), "{err}");
        let spec = PoolSpec { protocol: Protocol::Tcp, listen: Some(3001), ..PoolSpec::default() };
        apply(&mut st, &Command::PutPool { name: "t".into(), spec }).expect("tcp pool");
        assert_eq!(st.pools["t"].spec.check(), CheckKind::Tcp);
    }

    #[test]
    fn heartbeat_pool_backends_need_udp_addr() {
        let mut st = State::default();
        let mut spec = PoolSpec { protocol: Protocol::Tcp, listen: Some(3001), ..PoolSpec::default() };
        spec.health.heartbeat_port = Some(5000);
        apply(&mut st, &Command::PutPool { name: "logic".into(), spec }).expect("pool");
        assert_eq!(st.pools["logic"].spec.check(), CheckKind::Heartbeat);
        let no_hb =
            Command::PutBackend { pool: "logic".into(), addr: addr("127.0.0.1:7000"), spec: BackendSpec::default() };
        assert!(apply(&mut st, &no_hb).is_err());
        let spec = BackendSpec { heartbeat_addr: Some(addr("127.0.0.1:7001")), ..BackendSpec::default() };
        let ok = Command::PutBackend { pool: "logic".into(), addr: addr("127.0.0.1:7000"), spec };
        apply(&mut st, &ok).expect("backend with heartbeat addr");
    }

    #[test]
    fn open_self_registering_pool_needs_the_explicit_opt_in() {
        let mut st = State::default();
        let mut spec =
            PoolSpec { protocol: Protocol::Tcp, listen: Some(3001), self_register: true, ..PoolSpec::default() };
        spec.health.heartbeat_port = Some(5000);
        let put = |spec: &PoolSpec| Command::PutPool { name: "open".into(), spec: spec.clone() };
        let err = apply(&mut st, &put(&spec)).expect_err("open pool refused");
        assert!(matches!(err, ApplyError::Invalid { ref key, .. } if key == "health.heartbeat_secret"), "{err}");
        assert!(err.to_string().contains("allow_unauthenticated_heartbeats"), "{err}");
        spec.allow_unauthenticated_heartbeats = true;
        apply(&mut st, &put(&spec)).expect("opted in");
        spec.health.heartbeat_secret = Some("k".into());
        let err = apply(&mut st, &put(&spec)).expect_err("opt-in with a secret is contradictory");
        assert!(matches!(err, ApplyError::Invalid { ref key, .. } if key == "allow_unauthenticated_heartbeats"));
        spec.allow_unauthenticated_heartbeats = false;
        apply(&mut st, &put(&spec)).expect("secret");
        spec.max_self_registered = 0;
        let err = apply(&mut st, &put(&spec)).expect_err("cap 0");
        assert!(matches!(err, ApplyError::Invalid { ref key, .. } if key == "max_self_registered"));
    }

    #[test]
    fn ports_conflict_across_pools() {
        let mut st = State::default();
        let mut spec = PoolSpec { protocol: Protocol::Tcp, listen: Some(3001), ..PoolSpec::default() };
        spec.health.heartbeat_port = Some(5000);
        apply(&mut st, &Command::PutPool { name: "a".into(), spec }).expect("a");
        let clash = PoolSpec { protocol: Protocol::Tcp, listen: Some(5000), ..PoolSpec::default() };
        assert!(matches!(
            apply(&mut st, &Command::PutPool { name: "b".into(), spec: clash }),
            Err(ApplyError::Conflict(_))
        ));
    }

    #[test]
    fn drain_and_delete_backend() {
        let mut st = State::default();
        apply(&mut st, &Command::PutPool { name: "web".into(), spec: http_pool("/") }).expect("pool");
        let a = addr("10.0.0.1:80");
        apply(&mut st, &Command::PutBackend { pool: "web".into(), addr: a, spec: BackendSpec::default() })
            .expect("backend");
        apply(&mut st, &Command::SetDrain { pool: "web".into(), addr: a, drain: true }).expect("drain");
        assert!(st.pools["web"].backends["10.0.0.1:80"].spec.drain);
        apply(&mut st, &Command::DeleteBackend { pool: "web".into(), addr: a }).expect("delete");
        let again = apply(&mut st, &Command::DeleteBackend { pool: "web".into(), addr: a });
        assert!(matches!(again, Err(ApplyError::NoSuchBackend { .. })));
    }

    #[test]
    fn noop_keeps_version() {
        let mut st = State::default();
        assert_eq!(apply(&mut st, &Command::Noop), Ok(Applied { version: 0 }));
    }
}

#[cfg(test)]
mod props {
    use super::*;
    use crate::spec::Scope;
    use proptest::prelude::*;

    fn addr() -> impl Strategy<Value = SocketAddr> {
        (0u8..4, 1u16..5).prop_map(|(h, p)| SocketAddr::from(([10, 0, 0, h], 8000 + p)))
    }

    fn pool_name() -> impl Strategy<Value = String> {
        prop_oneof![Just("a".to_string()), Just("b".to_string()), Just("c".to_string()), Just("bad name".to_string())]
    }

    fn pool_spec() -> impl Strategy<Value = PoolSpec> {
        (
            any::<bool>(),
            0u8..4,
            prop::option::of(3000u16..3003),
            prop::option::of(5000u16..5002),
            any::<bool>(),
            0u8..120,
        )
            .prop_map(|(tcp, pattern, listen, hb, self_register, panic)| {
                let mut s = PoolSpec {
                    protocol: if tcp { Protocol::Tcp } else { Protocol::Http },
                    pattern: (!tcp).then(|| ["/", "/a/", "/b", "x"][usize::from(pattern)].to_string()),
                    listen: if tcp { listen } else { None },
                    self_register,
                    panic_threshold: panic,
                    scope: if pattern == 3 { Scope::Region("eu-".into()) } else { Scope::Global },
                    ..PoolSpec::default()
                };
                s.health.heartbeat_port = hb;
                s
            })
    }

    fn backend_spec() -> impl Strategy<Value = BackendSpec> {
        (0u32..300, any::<bool>(), prop::option::of(addr()), prop::option::of(0u32..4)).prop_map(
            |(weight, drain, heartbeat_addr, slot)| BackendSpec {
                weight,
                drain,
                heartbeat_addr,
                slot,
                ..BackendSpec::default()
            },
        )
    }

    fn command() -> impl Strategy<Value = Command> {
        let leaf = prop_oneof![
            (pool_name(), pool_spec()).prop_map(|(name, spec)| Command::PutPool { name, spec }),
            pool_name().prop_map(|name| Command::DeletePool { name }),
            (pool_name(), addr(), backend_spec()).prop_map(|(pool, addr, spec)| Command::PutBackend {
                pool,
                addr,
                spec
            }),
            (pool_name(), addr()).prop_map(|(pool, addr)| Command::DeleteBackend { pool, addr }),
            (pool_name(), addr(), any::<bool>()).prop_map(|(pool, addr, drain)| Command::SetDrain {
                pool,
                addr,
                drain
            }),
            Just(Command::Noop),
        ];
        leaf.prop_recursive(2, 8, 4, |inner| prop::collection::vec(inner, 0..4).prop_map(Command::Batch))
    }

    /// Every invariant `apply` promises about a state it produced.
    fn assert_valid(st: &State) {
        for (name, pool) in &st.pools {
            assert_eq!(name, &pool.name);
            crate::spec::validate_pool_name(name).expect("pool name");
            pool.spec.validate().expect("pool spec");
            for (key, b) in &pool.backends {
                assert_eq!(key, &b.addr.to_string());
                b.spec.validate().expect("backend spec");
                if pool.spec.check() == CheckKind::Heartbeat {
                    assert!(b.spec.heartbeat_addr.is_some());
                }
            }
        }
        for pool in st.pools.values() {
            assert!(check_conflicts(&st.pools, &pool.name, &pool.spec).is_ok(), "{} conflicts", pool.name);
        }
    }

    proptest! {
        #[test]
        fn any_command_sequence_leaves_a_valid_state(cmds in prop::collection::vec(command(), 0..40)) {
            let mut st = State::default();
            let mut version = 0;
            for cmd in &cmds {
                let before = st.clone();
                match apply(&mut st, cmd) {
                    Ok(a) => {
                        prop_assert!(a.version >= version);
                        version = a.version;
                    }
                    Err(_) => prop_assert_eq!(&st, &before, "a refused command changes nothing"),
                }
                assert_valid(&st);
            }
        }

        #[test]
        fn the_same_log_gives_the_same_state_on_every_node(cmds in prop::collection::vec(command(), 0..40)) {
            let (mut one, mut two) = (State::default(), State::default());
            let r1: Vec<_> = cmds.iter().map(|c| apply(&mut one, c)).collect();
            let r2: Vec<_> = cmds.iter().map(|c| apply(&mut two, c)).collect();
            prop_assert_eq!(r1, r2);
            prop_assert_eq!(&one, &two);
            // Through the wire format too: a node that decodes the log applies the same commands.
            let mut three = State::default();
            for c in &cmds {
                let frame = crate::codec::encode(1, c).expect("encode");
                let (_, decoded): (u8, Command) = crate::codec::decode(&frame).expect("decode");
                let _ = apply(&mut three, &decoded);
            }
            prop_assert_eq!(&one, &three);
            let json: State = serde_json::from_str(&serde_json::to_string(&one).expect("json")).expect("json back");
            prop_assert_eq!(one, json, "snapshots (JSON) round-trip");
        }
    }
}
