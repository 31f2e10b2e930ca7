//! The heartbeat protocol of one pool: a pure [`Tracker`] (datagram in, reply, events and
//! refusal out, `now` passed in) and the UDP task that feeds it.
//!
//! Without a `heartbeat_secret` this is seed 004: an identification `"<tcp> <udp>"` registers
//! its source, and a bare `OK` from that source keeps the backend up. Anyone who reaches the port
//! can do both, so a *self-registering* pool only runs open when its spec says
//! `allow_unauthenticated_heartbeats = true` (validation refuses it otherwise); configured pools
//! stay seed-compatible and the node warns about each of them.
//!
//! With a secret, registration is a challenge–response bound to the source address:
//! 1. backend → node: `"<tcp> <udp>"`; node → that source: `NONCE <n>` (16 random bytes).
//! 2. backend → node, from the same source: `"<tcp> <udp> <n>.<HMAC(secret, id n tcp udp)>"`.
//!    The nonce is stored per source and removed on first use, so the answer only works once and
//!    only from the address the nonce was sent to: a sender that cannot receive there (a spoofer,
//!    or a replay from elsewhere) cannot complete it. This works behind NAT because the backend
//!    never needs to know the address the node sees.
//! 3. keepalives: `OK <counter> <HMAC(secret, ok n counter)>` with a counter that must grow. A
//!    copied keepalive replays an old counter; a forged one fails the MAC; one from another
//!    source is unknown (answered `AUTH`, as the seed does).
//!
//! MACs are HMAC-SHA256 truncated to 128 bits (hex) to keep datagrams small. Every table is
//! bounded: pending nonces per pool ([`MAX_PENDING`], expiring after [`NONCE_TTL`]) and
//! self-registered backends (`max_self_registered`). Each refusal has a [`Refusal`] reason,
//! counted in `shoal_heartbeats_refused_total{pool,reason}`.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use shoal_proto::heartbeat::{self, AUTH, Datagram, OK};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::metrics::Metrics;
use crate::shutdown::Shutdown;

/// A change the tracker observed, keyed by the backend's TCP address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HbEvent {
    Up {
        tcp: SocketAddr,
        source: SocketAddr,
    },
    Down {
        tcp: SocketAddr,
    },
    /// An unconfigured backend identified itself in a pool that accepts self-registration.
    Registered {
        tcp: SocketAddr,
        udp: SocketAddr,
    },
    /// A self-registered backend stayed silent long enough to be forgotten.
    Forgotten {
        tcp: SocketAddr,
    },
}

/// Why a well-formed datagram changed nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// An identification matching no configured server in a pool without self-registration.
    UnknownPair,
    /// A keepalive from a source that has not identified (answered `AUTH`).
    UnknownSource,
    /// A bare identification answer or `OK` where the pool requires a MAC.
    Unauthenticated,
    /// An answer to a nonce this source was not given, already used, or expired.
    StaleNonce,
    BadMac,
    /// A keepalive whose counter did not grow.
    Replay,
    /// The pool already holds `max_self_registered` self-registered backends.
    Cap,
    /// Too many handshakes in flight.
    PendingFull,
    /// `AUTH` or `NONCE` sent to the node: only the node sends those.
    Unexpected,
}

impl Refusal {
    /// The `reason` label of the refusal counter.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::UnknownPair => "unknown_pair",
            Refusal::UnknownSource => "unknown_source",
            Refusal::Unauthenticated => "unauthenticated",
            Refusal::StaleNonce => "stale_nonce",
            Refusal::BadMac => "bad_mac",
            Refusal::Replay => "replay",
            Refusal::Cap => "cap",
            Refusal::PendingFull => "pending_full",
            Refusal::Unexpected => "unexpected",
        }
    }
}

/// What to do with one datagram.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    pub reply: Option<Vec<u8>>,
    pub events: Vec<HbEvent>,
    pub malformed: bool,
    pub refused: Option<Refusal>,
}

impl Outcome {
    fn refuse(why: Refusal) -> Outcome {
        Outcome { refused: Some(why), ..Outcome::default() }
    }
}

/// Per-pool settings the tracker needs from desired state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TrackerConfig {
    /// Configured `(tcp, udp)` pairs.
    pub servers: Vec<(SocketAddr, SocketAddr)>,
    pub self_register: bool,
    pub max_self_registered: usize,
    pub timeout: Duration,
    pub secret: Option<String>,
}

/// An identified source: the backend it speaks for and, in authenticated pools, the nonce its
/// keepalives are keyed to and the last counter accepted.
#[derive(Debug)]
struct Registration {
    tcp: SocketAddr,
    nonce: Option<String>,
    counter: u64,
}

#[derive(Debug)]
struct Pending {
    nonce: String,
    issued: Instant,
}

/// Heartbeat bookkeeping of one pool.
#[derive(Debug, Default)]
pub struct Tracker {
    cfg: TrackerConfig,
    sources: HashMap<SocketAddr, Registration>,
    pending: HashMap<SocketAddr, Pending>,
    last_ok: HashMap<SocketAddr, Instant>,
    up: HashSet<SocketAddr>,
    dynamic: HashMap<SocketAddr, SocketAddr>,
}

/// A silent self-registered backend is forgotten after this many heartbeat timeouts.
const FORGET_AFTER_TIMEOUTS: u32 = 30;
/// Handshakes in flight per pool; more are refused until some complete or expire.
pub const MAX_PENDING: usize = 256;
/// A nonce must be answered within this long.
pub const NONCE_TTL: Duration = Duration::from_secs(5);

/// Who an acceptable identification speaks for.
enum Target {
    Configured(SocketAddr),
    New(SocketAddr, SocketAddr),
}

impl Tracker {
    pub fn new(cfg: TrackerConfig) -> Tracker {
        Tracker { cfg, ..Tracker::default() }
    }

    /// Applies new settings; backends no longer configured are reported down. A changed secret
    /// drops every registration: each backend must prove the new one (its next `OK` gets `AUTH`).
    pub fn configure(&mut self, cfg: TrackerConfig) -> Vec<HbEvent> {
        if cfg.secret != self.cfg.secret {
            self.sources.clear();
            self.pending.clear();
        }
        self.cfg = cfg;
        let known: HashSet<SocketAddr> =
            self.cfg.servers.iter().map(|(t, _)| *t).chain(self.dynamic.keys().copied()).collect();
        self.sources.retain(|_, r| known.contains(&r.tcp));
        let gone: Vec<SocketAddr> = self.up.iter().filter(|t| !known.contains(t)).copied().collect();
        gone.into_iter().map(|tcp| self.mark_down(tcp)).collect()
    }

    pub fn is_up(&self, tcp: &SocketAddr) -> bool {
        self.up.contains(tcp)
    }

    /// Backends tracked (configured or self-registered) and how many of them are up.
    pub fn counts(&self) -> (usize, usize) {
        let known: HashSet<SocketAddr> =
            self.cfg.servers.iter().map(|(t, _)| *t).chain(self.dynamic.keys().copied()).collect();
        (known.len(), self.up.len())
    }

    /// Handles one datagram from `src`.
    pub fn on_datagram(&mut self, src: SocketAddr, bytes: &[u8], now: Instant) -> Outcome {
        match heartbeat::decode(bytes) {
            Err(_) => Outcome { malformed: true, ..Outcome::default() },
            Ok(Datagram::Ok) => self.on_ok(src, None, now),
            Ok(Datagram::OkMac { counter, mac }) => self.on_ok(src, Some((counter, mac)), now),
            Ok(Datagram::Auth | Datagram::Nonce(_)) => Outcome::refuse(Refusal::Unexpected),
            Ok(Datagram::Id { first, second, auth }) => match self.on_id(src, first, second, auth, now) {
                Ok(out) => out,
                Err(why) => Outcome::refuse(why),
            },
        }
    }

    fn on_ok(&mut self, src: SocketAddr, mac: Option<(u64, &str)>, now: Instant) -> Outcome {
        let Some(reg) = self.sources.get_mut(&src) else {
            return Outcome { reply: Some(AUTH.to_vec()), ..Outcome::refuse(Refusal::UnknownSource) };
        };
        if let Some(secret) = self.cfg.secret.as_deref() {
            let (Some((counter, mac)), Some(nonce)) = (mac, reg.nonce.as_deref()) else {
                return Outcome::refuse(Refusal::Unauthenticated);
            };
            if counter <= reg.counter {
                return Outcome::refuse(Refusal::Replay);
            }
            if !same(&ok_mac(secret, nonce, counter), mac) {
                return Outcome::refuse(Refusal::BadMac);
            }
            reg.counter = counter;
        }
        let tcp = reg.tcp;
        self.last_ok.insert(tcp, now);
        let events = self.mark_up(tcp, src).into_iter().collect();
        Outcome { events, ..Outcome::default() }
    }

    fn on_id(
        &mut self,
        src: SocketAddr,
        first: SocketAddr,
        second: SocketAddr,
        auth: Option<&str>,
        now: Instant,
    ) -> Result<Outcome, Refusal> {
        let target = self.target(src, first, second)?;
        let nonce = match (self.cfg.secret.clone(), auth) {
            (None, _) => None,
            (Some(_), None) => return self.challenge(src, now),
            (Some(secret), Some(token)) => Some(self.redeem(&secret, src, token, first, second, now)?),
        };
        let mut events = Vec::new();
        let tcp = match target {
            Target::Configured(tcp) => tcp,
            Target::New(tcp, udp) => {
                self.dynamic.insert(tcp, udp);
                events.push(HbEvent::Registered { tcp, udp });
                tcp
            }
        };
        self.sources.retain(|_, r| r.tcp != tcp);
        self.sources.insert(src, Registration { tcp, nonce, counter: 0 });
        self.last_ok.insert(tcp, now);
        events.extend(self.mark_up(tcp, src));
        Ok(Outcome { reply: Some(OK.to_vec()), events, ..Outcome::default() })
    }

    /// The backend an identification speaks for, if the pool accepts it.
    fn target(&self, src: SocketAddr, first: SocketAddr, second: SocketAddr) -> Result<Target, Refusal> {
        if let Some(tcp) = self.match_configured(first, second) {
            return Ok(Target::Configured(tcp));
        }
        if !self.cfg.self_register {
            return Err(Refusal::UnknownPair);
        }
        let (tcp, udp) = orient(src, first, second);
        if self.dynamic.contains_key(&tcp) {
            return Ok(Target::Configured(tcp));
        }
        if self.dynamic.len() >= self.cfg.max_self_registered {
            return Err(Refusal::Cap);
        }
        Ok(Target::New(tcp, udp))
    }

    /// Sends `src` a nonce (the same one while it is fresh, so a retried identification does
    /// not invalidate an answer already on its way).
    fn challenge(&mut self, src: SocketAddr, now: Instant) -> Result<Outcome, Refusal> {
        self.pending.retain(|_, p| now.duration_since(p.issued) <= NONCE_TTL);
        if !self.pending.contains_key(&src) && self.pending.len() >= MAX_PENDING {
            return Err(Refusal::PendingFull);
        }
        let p = self.pending.entry(src).or_insert_with(|| Pending { nonce: new_nonce(), issued: now });
        Ok(Outcome { reply: Some(heartbeat::encode_nonce(&p.nonce)), ..Outcome::default() })
    }

    /// Checks an answer `<nonce>.<mac>` against the nonce sent to `src`, consuming it.
    fn redeem(
        &mut self,
        secret: &str,
        src: SocketAddr,
        token: &str,
        first: SocketAddr,
        second: SocketAddr,
        now: Instant,
    ) -> Result<String, Refusal> {
        let pending = self.pending.remove(&src).filter(|p| now.duration_since(p.issued) <= NONCE_TTL);
        let (Some(p), Some((nonce, mac))) = (pending, token.split_once('.')) else {
            return Err(Refusal::StaleNonce);
        };
        if nonce != p.nonce {
            return Err(Refusal::StaleNonce);
        }
        if !same(&id_mac(secret, nonce, first, second), mac) {
            return Err(Refusal::BadMac);
        }
        Ok(p.nonce)
    }

    /// A configured pair matches in either order; `0.0.0.0`/`::` in config matches any IP.
    fn match_configured(&self, a: SocketAddr, b: SocketAddr) -> Option<SocketAddr> {
        let same = |cfg: SocketAddr, got: SocketAddr| {
            cfg.port() == got.port() && (cfg.ip() == got.ip() || cfg.ip().is_unspecified())
        };
        self.cfg
            .servers
            .iter()
            .find(|(t, u)| (same(*t, a) && same(*u, b)) || (same(*t, b) && same(*u, a)))
            .map(|(t, _)| *t)
    }

    /// Marks silent backends down, forgets long-silent self-registered ones and expired nonces.
    pub fn tick(&mut self, now: Instant) -> Vec<HbEvent> {
        self.pending.retain(|_, p| now.duration_since(p.issued) <= NONCE_TTL);
        let timeout = self.cfg.timeout;
        let silent: Vec<SocketAddr> = self
            .up
            .iter()
            .filter(|t| self.last_ok.get(*t).is_none_or(|at| now.duration_since(*at) > timeout))
            .copied()
            .collect();
        let mut events: Vec<HbEvent> = silent.into_iter().map(|t| self.mark_down(t)).collect();
        let forget = timeout * FORGET_AFTER_TIMEOUTS;
        let stale: Vec<SocketAddr> = self
            .dynamic
            .keys()
            .filter(|t| !self.up.contains(*t) && self.last_ok.get(*t).is_none_or(|at| now.duration_since(*at) > forget))
            .copied()
            .collect();
        for tcp in stale {
            self.dynamic.remove(&tcp);
            self.last_ok.remove(&tcp);
            self.sources.retain(|_, r| r.tcp != tcp);
            events.push(HbEvent::Forgotten { tcp });
        }
        events
    }

    fn mark_up(&mut self, tcp: SocketAddr, source: SocketAddr) -> Option<HbEvent> {
        self.up.insert(tcp).then_some(HbEvent::Up { tcp, source })
    }

    fn mark_down(&mut self, tcp: SocketAddr) -> HbEvent {
        self.up.remove(&tcp);
        HbEvent::Down { tcp }
    }
}

/// Which of two announced addresses is the TCP one: the backend sends from its UDP port, so
/// the address whose port equals the source port is the UDP address; else TCP comes first.
/// An unspecified TCP IP (`0.0.0.0`) means "the IP I send from".
fn orient(src: SocketAddr, first: SocketAddr, second: SocketAddr) -> (SocketAddr, SocketAddr) {
    let (mut tcp, udp) =
        if first.port() == src.port() && second.port() != src.port() { (second, first) } else { (first, second) };
    if tcp.ip().is_unspecified() {
        tcp.set_ip(src.ip());
    }
    (tcp, udp)
}

fn new_nonce() -> String {
    crate::control::secure::hex(&rand::random::<[u8; 16]>())
}

/// HMAC-SHA256 over a domain-separated message, truncated to 128 bits, as hex.
fn mac(secret: &str, message: &str) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    crate::control::secure::hex(&ring::hmac::sign(&key, message.as_bytes()).as_ref()[..16])
}

fn same(expected: &str, got: &str) -> bool {
    bool::from(subtle::ConstantTimeEq::ct_eq(expected.as_bytes(), got.as_bytes()))
}

/// The MAC answering `nonce` for the identification `"<first> <second>"`.
pub fn id_mac(secret: &str, nonce: &str, first: SocketAddr, second: SocketAddr) -> String {
    mac(secret, &format!("shoal-hb-id {nonce} {first} {second}"))
}

/// The MAC of keepalive number `counter` of the registration keyed by `nonce`.
pub fn ok_mac(secret: &str, nonce: &str, counter: u64) -> String {
    mac(secret, &format!("shoal-hb-ok {nonce} {counter}"))
}

/// The third token of an identification answering `nonce`.
pub fn answer_nonce(secret: &str, nonce: &str, first: SocketAddr, second: SocketAddr) -> String {
    format!("{nonce}.{}", id_mac(secret, nonce, first, second))
}

/// An event tagged with its pool, as sent to the health manager.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolHbEvent {
    pub pool: String,
    pub event: HbEvent,
}

/// Serves one pool's heartbeat socket until shutdown or until the pool's settings stop
/// matching this socket (the health manager then starts a new task).
pub async fn serve(
    pool: String,
    socket: UdpSocket,
    mut cfg_rx: watch::Receiver<TrackerConfig>,
    events: mpsc::Sender<PoolHbEvent>,
    metrics: Arc<Metrics>,
    mut shutdown: Shutdown,
) {
    let mut tracker = Tracker::new(cfg_rx.borrow_and_update().clone());
    let mut buf = vec![0u8; 2048];
    let tick_every = (tracker.cfg.timeout / 4).max(Duration::from_millis(50));
    let mut tick = tokio::time::interval(tick_every);
    let received = metrics.heartbeats.with_label_values(&[pool.as_str()]);
    let malformed = metrics.heartbeats_malformed.with_label_values(&[pool.as_str()]);
    let lost = metrics.heartbeat_backends_lost.with_label_values(&[pool.as_str()]);
    let known = metrics.heartbeat_backends_known.with_label_values(&[pool.as_str()]);
    let up = metrics.heartbeat_backends_up.with_label_values(&[pool.as_str()]);
    loop {
        let (k, u) = tracker.counts();
        known.set(k as i64);
        up.set(u as i64);
        let evs = tokio::select! {
            _ = shutdown.wait() => return,
            changed = cfg_rx.changed() => match changed {
                Ok(()) => tracker.configure(cfg_rx.borrow_and_update().clone()),
                Err(_) => return,
            },
            _ = tick.tick() => {
                // Down on a tick means silence (a removed backend goes down in `configure`).
                let evs = tracker.tick(Instant::now());
                lost.inc_by(evs.iter().filter(|e| matches!(e, HbEvent::Down { .. })).count() as u64);
                evs
            }
            got = socket.recv_from(&mut buf) => {
                let Ok((n, src)) = got else { continue };
                received.inc();
                let out = tracker.on_datagram(src, &buf[..n], Instant::now());
                if out.malformed {
                    malformed.inc();
                    tracing::debug!(pool = %pool, %src, "malformed heartbeat dropped");
                }
                if let Some(why) = out.refused {
                    metrics.heartbeats_refused.with_label_values(&[pool.as_str(), why.as_str()]).inc();
                    tracing::debug!(pool = %pool, %src, reason = why.as_str(), "heartbeat refused");
                }
                if let Some(reply) = &out.reply {
                    let _ = socket.send_to(reply, src).await;
                }
                out.events
            }
        };
        for event in evs {
            log_event(&pool, &event);
            if events.send(PoolHbEvent { pool: pool.clone(), event }).await.is_err() {
                return;
            }
        }
    }
}

fn log_event(pool: &str, event: &HbEvent) {
    match event {
        HbEvent::Up { tcp, source } => tracing::info!(pool, backend = %tcp, %source, "backend back online (heartbeat)"),
        HbEvent::Down { tcp } => {
            tracing::warn!(pool, backend = %tcp, "backend offline: no heartbeat within the timeout")
        }
        HbEvent::Registered { tcp, udp } => {
            tracing::info!(pool, backend = %tcp, heartbeat = %udp, "backend registered itself")
        }
        HbEvent::Forgotten { tcp } => {
            tracing::info!(pool, backend = %tcp, "self-registered backend forgotten after a long silence")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().expect("addr")
    }

    fn config(self_register: bool, secret: Option<&str>) -> TrackerConfig {
        TrackerConfig {
            servers: vec![(a("0.0.0.0:7000"), a("0.0.0.0:7001"))],
            self_register,
            max_self_registered: 2,
            timeout: Duration::from_secs(2),
            secret: secret.map(str::to_string),
        }
    }

    fn tracker(self_register: bool) -> Tracker {
        Tracker::new(config(self_register, None))
    }

    fn ok() -> Option<Vec<u8>> {
        Some(OK.to_vec())
    }

    /// Runs the handshake for `id` from `src`; returns the nonce and the signed answer.
    fn handshake(t: &mut Tracker, src: SocketAddr, id: &str, secret: &str, now: Instant) -> (String, Vec<u8>) {
        let out = t.on_datagram(src, id.as_bytes(), now);
        let reply = out.reply.expect("a nonce");
        let Ok(Datagram::Nonce(nonce)) = heartbeat::decode(&reply) else { panic!("not a nonce: {reply:?}") };
        let (first, second) = id.split_once(' ').expect("pair");
        let token = answer_nonce(secret, nonce, a(first), a(second));
        (nonce.to_string(), format!("{id} {token}").into_bytes())
    }

    #[tokio::test(start_paused = true)]
    async fn seed_protocol_online_offline() {
        let mut t = tracker(false);
        let src = a("127.0.0.1:7001");
        let now = Instant::now();
        let out = t.on_datagram(src, b"0.0.0.0:7000 0.0.0.0:7001", now);
        assert_eq!(out.reply, ok());
        assert_eq!(out.events, vec![HbEvent::Up { tcp: a("0.0.0.0:7000"), source: src }]);
        let out = t.on_datagram(src, b"OK", now + Duration::from_secs(1));
        assert_eq!(out, Outcome::default(), "an OK from a known source is silent");
        assert!(t.tick(now + Duration::from_millis(2500)).is_empty());
        assert_eq!(t.counts(), (1, 1), "one configured backend, up");
        let evs = t.tick(now + Duration::from_millis(3100));
        assert_eq!(evs, vec![HbEvent::Down { tcp: a("0.0.0.0:7000") }]);
        assert_eq!(t.counts(), (1, 0), "known but lost");
        let out = t.on_datagram(src, b"OK", now + Duration::from_secs(4));
        assert_eq!(out.events, vec![HbEvent::Up { tcp: a("0.0.0.0:7000"), source: src }], "back online");
    }

    #[tokio::test(start_paused = true)]
    async fn unknown_sources_and_pairs() {
        let mut t = tracker(false);
        let now = Instant::now();
        let out = t.on_datagram(a("127.0.0.1:9999"), b"OK", now);
        assert_eq!((out.reply, out.refused), (Some(AUTH.to_vec()), Some(Refusal::UnknownSource)));
        let out = t.on_datagram(a("127.0.0.1:9999"), b"1.1.1.1:1 1.1.1.1:2", now);
        assert_eq!((out.reply, out.refused), (None, Some(Refusal::UnknownPair)), "unknown pair gets no reply");
        assert!(t.on_datagram(a("127.0.0.1:9999"), b"\xff\x00", now).malformed);
        assert_eq!(t.on_datagram(a("127.0.0.1:9999"), b"NONCE ab", now).refused, Some(Refusal::Unexpected));
        let out = t.on_datagram(a("127.0.0.1:7001"), b"0.0.0.0:7001 0.0.0.0:7000", now);
        assert_eq!(out.reply, ok(), "UDP-first order from older backends");
    }

    #[tokio::test(start_paused = true)]
    async fn self_registration() {
        let mut t = tracker(true);
        let now = Instant::now();
        let src = a("10.1.1.5:9001");
        let out = t.on_datagram(src, b"0.0.0.0:9000 0.0.0.0:9001", now);
        assert_eq!(out.reply, ok());
        let tcp = a("10.1.1.5:9000");
        assert_eq!(out.events[0], HbEvent::Registered { tcp, udp: a("0.0.0.0:9001") });
        assert!(t.is_up(&tcp));
        let late = now + Duration::from_secs(2 * 30 + 5);
        let evs = t.tick(now + Duration::from_secs(3));
        assert_eq!(evs, vec![HbEvent::Down { tcp }]);
        assert_eq!(t.counts(), (2, 0), "the configured one and the silent self-registered one are known");
        assert_eq!(t.tick(late), vec![HbEvent::Forgotten { tcp }]);
        assert_eq!(t.counts(), (1, 0), "the self-registered one is forgotten");
    }

    #[tokio::test(start_paused = true)]
    async fn self_registrations_are_capped() {
        let mut t = tracker(true);
        let now = Instant::now();
        for i in 1..=2 {
            let out = t.on_datagram(a(&format!("10.0.0.{i}:9001")), b"0.0.0.0:9000 0.0.0.0:9001", now);
            assert_eq!(out.reply, ok());
        }
        let out = t.on_datagram(a("10.0.0.3:9001"), b"0.0.0.0:9000 0.0.0.0:9001", now);
        assert_eq!((out.reply, out.refused), (None, Some(Refusal::Cap)));
        assert!(!t.is_up(&a("10.0.0.3:9000")));
        let again = t.on_datagram(a("10.0.0.1:9001"), b"0.0.0.0:9000 0.0.0.0:9001", now);
        assert_eq!(again.reply, ok(), "a registered backend may identify again at the cap");
        assert_eq!(t.on_datagram(a("127.0.0.1:7001"), b"0.0.0.0:7000 0.0.0.0:7001", now).reply, ok(), "configured");
    }

    #[tokio::test(start_paused = true)]
    async fn authenticated_registration_and_keepalives() {
        let mut t = Tracker::new(config(true, Some("s3cret")));
        let now = Instant::now();
        let src = a("10.0.0.9:9001");
        let id = "0.0.0.0:9000 0.0.0.0:9001";
        let (nonce, answer) = handshake(&mut t, src, id, "s3cret", now);
        assert!(!t.is_up(&a("10.0.0.9:9000")), "a nonce alone registers nothing");
        let out = t.on_datagram(src, &answer, now);
        assert_eq!(out.reply, ok());
        assert!(t.is_up(&a("10.0.0.9:9000")));
        let later = now + Duration::from_secs(1);
        let ok1 = heartbeat::encode_ok(1, &ok_mac("s3cret", &nonce, 1));
        assert_eq!(t.on_datagram(src, &ok1, later), Outcome::default());
        assert_eq!(t.on_datagram(src, &ok1, later).refused, Some(Refusal::Replay), "same keepalive twice");
        assert_eq!(t.on_datagram(src, b"OK", later).refused, Some(Refusal::Unauthenticated), "bare OK");
        let forged = heartbeat::encode_ok(9, &ok_mac("guess", &nonce, 9));
        assert_eq!(t.on_datagram(src, &forged, later).refused, Some(Refusal::BadMac));
        let ok5 = heartbeat::encode_ok(5, &ok_mac("s3cret", &nonce, 5));
        assert_eq!(t.on_datagram(a("10.0.0.66:9001"), &ok5, later).refused, Some(Refusal::UnknownSource));
        assert_eq!(t.on_datagram(src, &ok5, later), Outcome::default(), "counters may skip");
    }

    #[tokio::test(start_paused = true)]
    async fn spoofed_keepalives_do_not_keep_a_dead_backend_up() {
        let mut t = Tracker::new(config(false, Some("s3cret")));
        let now = Instant::now();
        let src = a("127.0.0.1:7001");
        let (_, answer) = handshake(&mut t, src, "0.0.0.0:7000 0.0.0.0:7001", "s3cret", now);
        assert_eq!(t.on_datagram(src, &answer, now).reply, ok());
        for s in 1..=3 {
            let at = now + Duration::from_secs(s);
            assert!(t.on_datagram(src, b"OK", at).refused.is_some());
            let stale = heartbeat::encode_ok(s, &ok_mac("s3cret", "other-nonce", s));
            assert_eq!(t.on_datagram(src, &stale, at).refused, Some(Refusal::BadMac));
        }
        assert_eq!(t.tick(now + Duration::from_secs(3)), vec![HbEvent::Down { tcp: a("0.0.0.0:7000") }]);
    }

    #[tokio::test(start_paused = true)]
    async fn captured_identifications_cannot_be_replayed() {
        let mut t = Tracker::new(config(true, Some("s3cret")));
        let now = Instant::now();
        let (src, attacker) = (a("10.0.0.9:9001"), a("10.6.6.6:9001"));
        let id = "0.0.0.0:9000 0.0.0.0:9001";
        let (_, answer) = handshake(&mut t, src, id, "s3cret", now);
        let from_elsewhere = t.on_datagram(attacker, &answer, now);
        assert_eq!((from_elsewhere.reply, from_elsewhere.refused), (None, Some(Refusal::StaleNonce)));
        assert!(!t.is_up(&a("10.6.6.6:9000")));
        assert_eq!(t.on_datagram(src, &answer, now).reply, ok());
        assert_eq!(t.on_datagram(src, &answer, now).refused, Some(Refusal::StaleNonce), "twice");
        // The attacker's own nonce does not make the captured answer valid.
        let _ = t.on_datagram(attacker, id.as_bytes(), now);
        assert_eq!(t.on_datagram(attacker, &answer, now).refused, Some(Refusal::StaleNonce));
        // A wrong secret and a late answer fail too.
        let (_, wrong) = handshake(&mut t, a("10.0.0.7:9001"), id, "guess", now);
        assert_eq!(t.on_datagram(a("10.0.0.7:9001"), &wrong, now).refused, Some(Refusal::BadMac));
        let (_, late) = handshake(&mut t, a("10.0.0.8:9001"), id, "s3cret", now);
        let out = t.on_datagram(a("10.0.0.8:9001"), &late, now + NONCE_TTL + Duration::from_secs(1));
        assert_eq!(out.refused, Some(Refusal::StaleNonce));
        let bare = t.on_datagram(a("10.0.0.8:9001"), b"0.0.0.0:9000 0.0.0.0:9001 whatever", now);
        assert_eq!(bare.refused, Some(Refusal::StaleNonce), "a token without a nonce issued");
    }

    #[tokio::test(start_paused = true)]
    async fn pending_nonces_are_bounded() {
        let mut t = Tracker::new(config(true, Some("s3cret")));
        let now = Instant::now();
        for i in 0..MAX_PENDING {
            let src = SocketAddr::from(([10, 1, (i / 256) as u8, (i % 256) as u8], 9001));
            assert!(t.on_datagram(src, b"0.0.0.0:9000 0.0.0.0:9001", now).reply.is_some());
        }
        let out = t.on_datagram(a("10.2.0.1:9001"), b"0.0.0.0:9000 0.0.0.0:9001", now);
        assert_eq!(out.refused, Some(Refusal::PendingFull));
        t.tick(now + NONCE_TTL + Duration::from_secs(1));
        let out = t.on_datagram(a("10.2.0.1:9001"), b"0.0.0.0:9000 0.0.0.0:9001", now + NONCE_TTL * 2);
        assert!(out.reply.is_some(), "expired nonces make room");
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_secret_drops_registrations() {
        let mut t = Tracker::new(config(false, None));
        let now = Instant::now();
        let src = a("127.0.0.1:7001");
        assert_eq!(t.on_datagram(src, b"0.0.0.0:7000 0.0.0.0:7001", now).reply, ok());
        t.configure(config(false, Some("s3cret")));
        let out = t.on_datagram(src, b"OK", now);
        assert_eq!((out.reply, out.refused), (Some(AUTH.to_vec()), Some(Refusal::UnknownSource)));
    }
}
