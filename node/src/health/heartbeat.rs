//! Seed 004's heartbeat protocol, as a pure per-pool [`Tracker`] (datagram in, reply and
//! events out, `now` passed in) and the UDP task that feeds it.

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

/// What to do with one datagram.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    pub reply: Option<&'static [u8]>,
    pub events: Vec<HbEvent>,
    pub malformed: bool,
    /// An identification that matched nothing (or failed authentication): no reply, as the seed.
    pub rejected: bool,
}

/// Per-pool settings the tracker needs from desired state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TrackerConfig {
    /// Configured `(tcp, udp)` pairs.
    pub servers: Vec<(SocketAddr, SocketAddr)>,
    pub self_register: bool,
    pub timeout: Duration,
    pub secret: Option<String>,
}

/// Heartbeat bookkeeping of one pool.
#[derive(Debug, Default)]
pub struct Tracker {
    cfg: TrackerConfig,
    /// Identified datagram sources → the backend's TCP address.
    sources: HashMap<SocketAddr, SocketAddr>,
    last_ok: HashMap<SocketAddr, Instant>,
    up: HashSet<SocketAddr>,
    dynamic: HashMap<SocketAddr, SocketAddr>,
}

/// A silent self-registered backend is forgotten after this many heartbeat timeouts.
const FORGET_AFTER_TIMEOUTS: u32 = 30;

impl Tracker {
    pub fn new(cfg: TrackerConfig) -> Tracker {
        Tracker { cfg, ..Tracker::default() }
    }

    /// Applies new settings; backends no longer configured are reported down.
    pub fn configure(&mut self, cfg: TrackerConfig) -> Vec<HbEvent> {
        self.cfg = cfg;
        let known: HashSet<SocketAddr> =
            self.cfg.servers.iter().map(|(t, _)| *t).chain(self.dynamic.keys().copied()).collect();
        self.sources.retain(|_, tcp| known.contains(tcp));
        let gone: Vec<SocketAddr> = self.up.iter().filter(|t| !known.contains(t)).copied().collect();
        gone.into_iter().map(|tcp| self.mark_down(tcp)).collect()
    }

    pub fn is_up(&self, tcp: &SocketAddr) -> bool {
        self.up.contains(tcp)
    }

    /// Handles one datagram from `src`.
    pub fn on_datagram(
        &mut self,
        src: SocketAddr,
        bytes: &[u8],
        now: Instant,
        verify: &dyn Fn(&str, &str, Option<&str>) -> bool,
    ) -> Outcome {
        match heartbeat::decode(bytes) {
            Err(_) => Outcome { malformed: true, ..Outcome::default() },
            Ok(Datagram::Ok) => self.on_ok(src, now),
            Ok(Datagram::Auth) => Outcome { rejected: true, ..Outcome::default() },
            Ok(Datagram::Id { first, second, auth }) => {
                let pair = format!("{first} {second}");
                if self.cfg.secret.as_deref().is_some_and(|s| !verify(s, &pair, auth)) {
                    return Outcome { rejected: true, ..Outcome::default() };
                }
                self.on_id(src, first, second, now)
            }
        }
    }

    fn on_ok(&mut self, src: SocketAddr, now: Instant) -> Outcome {
        let Some(tcp) = self.sources.get(&src).copied() else {
            return Outcome { reply: Some(AUTH), ..Outcome::default() };
        };
        self.last_ok.insert(tcp, now);
        let events = self.mark_up(tcp, src).into_iter().collect();
        Outcome { events, ..Outcome::default() }
    }

    fn on_id(&mut self, src: SocketAddr, first: SocketAddr, second: SocketAddr, now: Instant) -> Outcome {
        let mut events = Vec::new();
        let tcp = match self.match_configured(first, second) {
            Some(tcp) => tcp,
            None if self.cfg.self_register => {
                let (tcp, udp) = orient(src, first, second);
                if self.dynamic.insert(tcp, udp).is_none() {
                    events.push(HbEvent::Registered { tcp, udp });
                }
                tcp
            }
            None => return Outcome { rejected: true, ..Outcome::default() },
        };
        self.sources.retain(|_, t| *t != tcp);
        self.sources.insert(src, tcp);
        self.last_ok.insert(tcp, now);
        events.extend(self.mark_up(tcp, src));
        Outcome { reply: Some(OK), events, ..Outcome::default() }
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

    /// Marks silent backends down and forgets long-silent self-registered ones.
    pub fn tick(&mut self, now: Instant) -> Vec<HbEvent> {
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
            self.sources.retain(|_, t| *t != tcp);
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

/// How far a signed identification's timestamp may be from the node's clock.
const AUTH_WINDOW_SECS: u64 = 300;

fn heartbeat_mac(secret: &str, pair: &str, ts: u64) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let tag = ring::hmac::sign(&key, format!("{pair} {ts}").as_bytes());
    tag.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// The authenticator a backend appends to its identification in pools with a secret:
/// `<unix seconds>.<hex HMAC-SHA256(secret, "<first> <second> <unix seconds>")>`.
pub fn sign_identification(secret: &str, first: SocketAddr, second: SocketAddr) -> String {
    let ts = unix_now();
    format!("{ts}.{}", heartbeat_mac(secret, &format!("{first} {second}"), ts))
}

/// Checks an identification's authenticator (constant time, five-minute window): a copied
/// datagram stops working, and the secret never travels in clear.
pub fn verify_identification(secret: &str, pair: &str, auth: Option<&str>) -> bool {
    let Some((ts, mac)) = auth.and_then(|a| a.split_once('.')) else { return false };
    let Ok(ts) = ts.parse::<u64>() else { return false };
    if ts.abs_diff(unix_now()) > AUTH_WINDOW_SECS {
        return false;
    }
    let expected = heartbeat_mac(secret, pair, ts);
    bool::from(subtle::ConstantTimeEq::ct_eq(expected.as_bytes(), mac.as_bytes()))
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
    verify: super::Verifier,
    mut shutdown: Shutdown,
) {
    let mut tracker = Tracker::new(cfg_rx.borrow_and_update().clone());
    let mut buf = vec![0u8; 2048];
    let tick_every = (tracker.cfg.timeout / 4).max(Duration::from_millis(50));
    let mut tick = tokio::time::interval(tick_every);
    let received = metrics.heartbeats.with_label_values(&[pool.as_str()]);
    let malformed = metrics.heartbeats_malformed.with_label_values(&[pool.as_str()]);
    loop {
        let evs = tokio::select! {
            _ = shutdown.wait() => return,
            changed = cfg_rx.changed() => match changed {
                Ok(()) => tracker.configure(cfg_rx.borrow_and_update().clone()),
                Err(_) => return,
            },
            _ = tick.tick() => tracker.tick(Instant::now()),
            got = socket.recv_from(&mut buf) => {
                let Ok((n, src)) = got else { continue };
                received.inc();
                let out = tracker.on_datagram(src, &buf[..n], Instant::now(), verify.as_ref());
                if out.malformed {
                    malformed.inc();
                    tracing::debug!(pool = %pool, %src, "malformed heartbeat dropped");
                }
                if out.rejected {
                    tracing::debug!(pool = %pool, %src, "heartbeat identification matched no server; no reply");
                }
                if let Some(reply) = out.reply {
                    let _ = socket.send_to(reply, src).await;
                    if reply == AUTH {
                        tracing::info!(pool = %pool, %src, "OK from unknown source, asked it to identify (AUTH)");
                    }
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

    fn tracker(self_register: bool) -> Tracker {
        Tracker::new(TrackerConfig {
            servers: vec![(a("0.0.0.0:7000"), a("0.0.0.0:7001"))],
            self_register,
            timeout: Duration::from_secs(2),
            secret: None,
        })
    }

    fn no_auth(_: &str, _: &str, _: Option<&str>) -> bool {
        true
    }

    #[tokio::test(start_paused = true)]
    async fn seed_protocol_online_offline() {
        let mut t = tracker(false);
        let src = a("127.0.0.1:7001");
        let now = Instant::now();
        let out = t.on_datagram(src, b"0.0.0.0:7000 0.0.0.0:7001", now, &no_auth);
        assert_eq!(out.reply, Some(OK));
        assert_eq!(out.events, vec![HbEvent::Up { tcp: a("0.0.0.0:7000"), source: src }]);
        let out = t.on_datagram(src, b"OK", now + Duration::from_secs(1), &no_auth);
        assert_eq!(out, Outcome::default(), "an OK from a known source is silent");
        assert!(t.tick(now + Duration::from_millis(2500)).is_empty());
        let evs = t.tick(now + Duration::from_millis(3100));
        assert_eq!(evs, vec![HbEvent::Down { tcp: a("0.0.0.0:7000") }]);
        let out = t.on_datagram(src, b"OK", now + Duration::from_secs(4), &no_auth);
        assert_eq!(out.events, vec![HbEvent::Up { tcp: a("0.0.0.0:7000"), source: src }], "back online");
    }

    #[tokio::test(start_paused = true)]
    async fn unknown_sources_and_pairs() {
        let mut t = tracker(false);
        let now = Instant::now();
        let out = t.on_datagram(a("127.0.0.1:9999"), b"OK", now, &no_auth);
        assert_eq!(out.reply, Some(AUTH));
        let out = t.on_datagram(a("127.0.0.1:9999"), b"1.1.1.1:1 1.1.1.1:2", now, &no_auth);
        assert!(out.rejected && out.reply.is_none(), "unknown pair gets no reply");
        assert!(t.on_datagram(a("127.0.0.1:9999"), b"\xff\x00", now, &no_auth).malformed);
        let out = t.on_datagram(a("127.0.0.1:7001"), b"0.0.0.0:7001 0.0.0.0:7000", now, &no_auth);
        assert_eq!(out.reply, Some(OK), "UDP-first order from older backends");
    }

    #[tokio::test(start_paused = true)]
    async fn self_registration() {
        let mut t = tracker(true);
        let now = Instant::now();
        let src = a("10.1.1.5:9001");
        let out = t.on_datagram(src, b"0.0.0.0:9000 0.0.0.0:9001", now, &no_auth);
        assert_eq!(out.reply, Some(OK));
        let tcp = a("10.1.1.5:9000");
        assert_eq!(out.events[0], HbEvent::Registered { tcp, udp: a("0.0.0.0:9001") });
        assert!(t.is_up(&tcp));
        let late = now + Duration::from_secs(2 * 30 + 5);
        let evs = t.tick(now + Duration::from_secs(3));
        assert_eq!(evs, vec![HbEvent::Down { tcp }]);
        assert_eq!(t.tick(late), vec![HbEvent::Forgotten { tcp }]);
    }

    #[test]
    fn signed_identifications_verify_only_with_the_secret() {
        let (tcp, udp) = (a("10.0.0.1:7000"), a("10.0.0.1:7001"));
        let auth = sign_identification("s3cret", tcp, udp);
        let pair = format!("{tcp} {udp}");
        assert!(verify_identification("s3cret", &pair, Some(&auth)));
        assert!(!verify_identification("other", &pair, Some(&auth)));
        assert!(!verify_identification("s3cret", "10.0.0.2:7000 10.0.0.1:7001", Some(&auth)));
        assert!(!verify_identification("s3cret", &pair, Some("s3cret")), "the plain secret is not an authenticator");
        assert!(!verify_identification("s3cret", &pair, Some("1.00")), "a stale timestamp fails");
        assert!(!verify_identification("s3cret", &pair, None));
    }

    #[tokio::test(start_paused = true)]
    async fn secret_is_checked() {
        let mut t = tracker(false);
        t.cfg.secret = Some("s3cret".into());
        let now = Instant::now();
        let deny = |_: &str, _: &str, _: Option<&str>| false;
        assert!(t.on_datagram(a("127.0.0.1:7001"), b"0.0.0.0:7000 0.0.0.0:7001", now, &deny).rejected);
        let out = t.on_datagram(a("127.0.0.1:7001"), b"0.0.0.0:7000 0.0.0.0:7001 tok", now, &no_auth);
        assert_eq!(out.reply, Some(OK));
    }
}
