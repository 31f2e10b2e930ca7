//! Authenticated gossip. chitchat keeps its envelope encoding private, so a transport cannot
//! sign envelopes itself. Instead chitchat runs on a private loopback socket and this relay owns
//! the public gossip address: every datagram leaving is stamped and MACed with the cluster key,
//! every datagram arriving is checked before chitchat sees it; forged, stale, replayed and
//! misaddressed ones and those of other clusters are dropped and counted.
//!
//! Wire format: `"SHG2" | sender (IPv6-mapped address, port: 18 bytes) | sequence (u64 BE) |
//! unix millis (u64 BE) | HMAC-SHA256(key, everything before it | payload) | payload`.
//!
//! The sender is the gossip address the sending node advertises; a receiver refuses a datagram
//! whose UDP source is not that address (only the port is compared when the sender bound a
//! wildcard address), so a captured datagram cannot be reflected from elsewhere. The sequence
//! grows by one per datagram a node sends and starts at its clock in microseconds, but never
//! below the block its data directory records (`incarnation`), so a restarted node starts above
//! what it sent before even when its clock went back; a receiver remembers, per sender, the
//! highest sequence and which of the [`REORDER`] below it it has seen, and refuses repeats and
//! older ones. Stamps more than [`MAX_SKEW`] from the receiver's clock (either way) are
//! refused before the sequence is looked at (counted as `stale`, the skew logged rate-limited
//! with the peer), so a peer's clock jump leaves no state behind: it is heard again as soon as
//! its clock is back in the window.
//!
//! chitchat sends to a peer through a per-peer proxy socket on loopback, so the relay knows the
//! destination, and receives a peer's datagrams from that same proxy, so chitchat sees one
//! stable address per peer, which [`AuthSocket`] maps back to the peer's real address. Proxies
//! are bounded: the least recently used one is closed to make room.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chitchat::ChitchatEnvelope;
use chitchat::transport::{RecvOutcome, SendOutcome, Socket, Transport, UdpSocket as ChitchatSocket};
use tokio::net::UdpSocket;
use tokio::task::AbortHandle;

use super::incarnation::Sequence;
use super::ratelog::LogLimiter;
use super::secure::ClusterKey;
use crate::metrics::Metrics;

const MAGIC: &[u8; 4] = b"SHG2";
const ADDR_LEN: usize = 18;
/// Offsets of the header fields.
const SEQ_AT: usize = 4 + ADDR_LEN;
const TS_AT: usize = SEQ_AT + 8;
const MAC_AT: usize = TS_AT + 8;
const HEADER: usize = MAC_AT + 32;
/// Datagrams stamped further than this from our clock are refused (broken clocks; and what a
/// receiver must remember sequences for).
const MAX_SKEW: Duration = Duration::from_secs(60);
/// A skew beyond this is logged (before datagrams start being refused at [`MAX_SKEW`]).
const WARN_SKEW: Duration = Duration::from_secs(30);
/// At most one skew warning per peer per this period.
const SKEW_LOG_EVERY: Duration = Duration::from_secs(10);
/// How far below the highest sequence seen a datagram may arrive (UDP reorders).
pub const REORDER: u64 = 64;
/// Most peers the relay keeps a proxy socket (one file descriptor, one task) for.
const MAX_PEERS: usize = 512;
/// Most senders whose sequences a receiver remembers (only key holders get an entry).
const MAX_SENDERS: usize = 4096;

fn now_ms() -> u64 {
    crate::clock::unix_ms()
}

/// What the header of a datagram claims: who sent it, its place in the sender's sequence, when.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    pub from: SocketAddr,
    pub seq: u64,
    pub at_ms: u64,
}

fn encode_addr(a: SocketAddr) -> [u8; ADDR_LEN] {
    let ip = match a.ip() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    let mut out = [0u8; ADDR_LEN];
    out[..16].copy_from_slice(&ip.octets());
    out[16..].copy_from_slice(&a.port().to_be_bytes());
    out
}

fn decode_addr(b: &[u8]) -> Option<SocketAddr> {
    let ip: [u8; 16] = b.get(..16)?.try_into().ok()?;
    let port: [u8; 2] = b.get(16..ADDR_LEN)?.try_into().ok()?;
    Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)).to_canonical(), u16::from_be_bytes(port)))
}

/// Stamps and signs a payload for the wire.
pub fn seal(key: &ClusterKey, stamp: &Stamp, payload: &[u8]) -> Vec<u8> {
    let head = [&MAGIC[..], &encode_addr(stamp.from), &stamp.seq.to_be_bytes(), &stamp.at_ms.to_be_bytes()].concat();
    let tag = key.mac(&[&head, payload]);
    [&head[..], &tag, payload].concat()
}

/// Why an incoming datagram was dropped.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    Malformed,
    Forged,
    /// Stamped more than [`MAX_SKEW`] from our clock, either way.
    Stale,
    /// The UDP source is not the sender the header names.
    Address,
    /// A sequence already seen from that sender, or older than [`REORDER`] below its highest.
    Replay,
}

impl Refused {
    fn label(&self) -> &'static str {
        match self {
            Refused::Malformed => "malformed",
            Refused::Forged => "forged",
            Refused::Stale => "stale",
            Refused::Address => "address",
            Refused::Replay => "replay",
        }
    }
}

/// Checks a datagram's MAC; returns its stamp and payload (freshness, source and sequence are
/// checked by the caller, see [`Guard`] and [`sent_from`]).
pub fn open<'a>(key: &ClusterKey, datagram: &'a [u8]) -> Result<(Stamp, &'a [u8]), Refused> {
    if datagram.len() < HEADER || &datagram[..4] != MAGIC {
        return Err(Refused::Malformed);
    }
    let (head, payload) = (&datagram[..MAC_AT], &datagram[HEADER..]);
    if !key.verify(&[head, payload], &datagram[MAC_AT..HEADER]) {
        return Err(Refused::Forged);
    }
    let word = |at: usize| datagram[at..at + 8].try_into().map(u64::from_be_bytes).map_err(|_| Refused::Malformed);
    let from = decode_addr(&datagram[4..SEQ_AT]).ok_or(Refused::Malformed)?;
    Ok((Stamp { from, seq: word(SEQ_AT)?, at_ms: word(TS_AT)? }, payload))
}

/// Whether a datagram claiming to be from `claimed` may have come from `source`. Nodes must
/// reach each other without address translation (chitchat gossips the advertised address
/// anyway); a node that binds a wildcard address is matched on its port.
pub fn sent_from(claimed: SocketAddr, source: SocketAddr) -> bool {
    let (c, s) = (claimed.ip().to_canonical(), source.ip().to_canonical());
    claimed.port() == source.port() && (c == s || c.is_unspecified())
}

/// A stamp's skew against our clock (positive: the sender's clock is ahead), in milliseconds.
fn skew_ms(stamp: &Stamp, now: u64) -> i64 {
    (stamp.at_ms as i128 - now as i128).clamp(i64::MIN as i128, i64::MAX as i128) as i64
}

/// Per sender: the highest sequence seen and a bitmap of which of the [`REORDER`] below it were.
struct Window {
    highest: u64,
    /// Bit `i` set: `highest - i` was seen.
    seen: u64,
    /// The guard's tick when this sender last got a datagram through (for eviction).
    used: u64,
}

/// Refuses replayed datagrams: remembers recent sequences of up to `max` senders, forgetting
/// the least recently heard first. Only authenticated datagrams reach it, so only key holders
/// take room.
pub struct Guard {
    senders: HashMap<SocketAddr, Window>,
    max: usize,
    tick: u64,
}

impl Guard {
    pub fn new(max: usize) -> Guard {
        Guard { senders: HashMap::new(), max: max.max(1), tick: 0 }
    }

    /// Accepts `seq` from `from` once; returns the sender evicted to make room, if any.
    pub fn check(&mut self, from: SocketAddr, seq: u64) -> Result<Option<SocketAddr>, Refused> {
        self.tick += 1;
        let tick = self.tick;
        if let Some(w) = self.senders.get_mut(&from) {
            accept(w, seq)?;
            w.used = tick;
            return Ok(None);
        }
        let evicted = (self.senders.len() >= self.max).then(|| self.evict()).flatten();
        self.senders.insert(from, Window { highest: seq, seen: 1, used: tick });
        Ok(evicted)
    }

    fn evict(&mut self) -> Option<SocketAddr> {
        let oldest = self.senders.iter().min_by_key(|(_, w)| w.used).map(|(a, _)| *a)?;
        self.senders.remove(&oldest);
        Some(oldest)
    }

    #[cfg(test)]
    fn knows(&self, from: &SocketAddr) -> bool {
        self.senders.contains_key(from)
    }
}

/// Records `seq` in a sender's window, refusing repeats and sequences too far behind.
fn accept(w: &mut Window, seq: u64) -> Result<(), Refused> {
    if seq > w.highest {
        let shift = seq - w.highest;
        w.seen = if shift >= REORDER { 1 } else { (w.seen << shift) | 1 };
        w.highest = seq;
        return Ok(());
    }
    let behind = w.highest - seq;
    if behind >= REORDER || w.seen & (1 << behind) != 0 {
        return Err(Refused::Replay);
    }
    w.seen |= 1 << behind;
    Ok(())
}

/// Decides whether gossip with a peer (by its gossip address) gets through: a test seam for
/// gossip partitions, like the Raft `LinkFilter`; `None` (production) allows every peer.
pub type GossipFilter = Arc<dyn Fn(SocketAddr) -> bool + Send + Sync>;

/// The transport handed to chitchat.
pub struct AuthTransport {
    pub key: ClusterKey,
    pub metrics: Arc<Metrics>,
    pub filter: Option<GossipFilter>,
    /// This node's datagram sequence (see `incarnation`).
    pub seq: Arc<Sequence>,
}

/// One peer's proxy socket and the task relaying what chitchat sends through it.
struct Proxy {
    socket: Arc<UdpSocket>,
    task: AbortHandle,
    /// [`Proxies::tick`] when it was last used, for LRU eviction.
    used: u64,
}

/// Peer ↔ proxy socket bookkeeping shared by the relay tasks and the socket.
struct Proxies {
    by_peer: HashMap<SocketAddr, Proxy>,
    by_proxy: HashMap<SocketAddr, SocketAddr>,
    tick: u64,
    max: usize,
}

impl Proxies {
    fn new(max: usize) -> Proxies {
        Proxies { by_peer: HashMap::new(), by_proxy: HashMap::new(), tick: 0, max: max.max(1) }
    }

    /// The live proxy of `peer`, marked as just used.
    fn touch(&mut self, peer: &SocketAddr) -> Option<Arc<UdpSocket>> {
        self.tick += 1;
        let tick = self.tick;
        self.by_peer.get_mut(peer).map(|p| {
            p.used = tick;
            p.socket.clone()
        })
    }

    /// Closes the least recently used proxy; returns its peer.
    fn evict(&mut self) -> Option<SocketAddr> {
        let peer = self.by_peer.iter().min_by_key(|(_, p)| p.used).map(|(a, _)| *a)?;
        let p = self.by_peer.remove(&peer)?;
        p.task.abort();
        self.by_proxy.retain(|_, v| *v != peer);
        Some(peer)
    }
}

struct Relay {
    key: ClusterKey,
    public: Arc<UdpSocket>,
    public_addr: SocketAddr,
    inner_addr: SocketAddr,
    proxies: Mutex<Proxies>,
    /// Numbers the datagrams this node sends.
    seq: Arc<Sequence>,
    guard: Mutex<Guard>,
    metrics: Arc<Metrics>,
    filter: Option<GossipFilter>,
    /// Peers whose clock is off by more than [`WARN_SKEW`] now, each with its own log limit
    /// (only key holders get here; at most [`MAX_SENDERS`]).
    skewed: Mutex<HashMap<SocketAddr, LogLimiter>>,
}

impl Relay {
    fn new(
        key: ClusterKey,
        public: Arc<UdpSocket>,
        inner_addr: SocketAddr,
        metrics: Arc<Metrics>,
        seq: Arc<Sequence>,
    ) -> Relay {
        Relay {
            key,
            public_addr: public.local_addr().unwrap_or_else(|_| (Ipv4Addr::UNSPECIFIED, 0).into()),
            public,
            inner_addr,
            proxies: Mutex::new(Proxies::new(MAX_PEERS)),
            seq,
            guard: Mutex::new(Guard::new(MAX_SENDERS)),
            metrics,
            filter: None,
            skewed: Mutex::new(HashMap::new()),
        }
    }

    /// Whether the partition seam lets datagrams to and from `peer` through.
    fn allowed(&self, peer: SocketAddr) -> bool {
        self.filter.as_ref().is_none_or(|f| f(peer))
    }

    /// The proxy socket for `peer`, created (with its outbound task) on first use; when there
    /// are too many, the least recently used one is closed, so a stream of new addresses cannot
    /// lock real peers out.
    async fn proxy(self: &Arc<Self>, peer: SocketAddr) -> std::io::Result<Arc<UdpSocket>> {
        if let Some(p) = self.lock_proxies().touch(&peer) {
            return Ok(p);
        }
        let socket = Arc::new(UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await?);
        let addr = socket.local_addr()?;
        let mut p = self.lock_proxies();
        if let Some(existing) = p.touch(&peer) {
            return Ok(existing); // created meanwhile by another task
        }
        if p.by_peer.len() >= p.max
            && let Some(old) = p.evict()
        {
            self.metrics.gossip_proxies_evicted.inc();
            tracing::debug!(%old, %peer, "closed the least recently used gossip proxy");
        }
        let task = tokio::spawn(outbound(self.clone(), socket.clone(), peer)).abort_handle();
        let used = p.tick;
        p.by_peer.insert(peer, Proxy { socket: socket.clone(), task, used });
        p.by_proxy.insert(addr, peer);
        Ok(socket)
    }

    fn lock_proxies(&self) -> std::sync::MutexGuard<'_, Proxies> {
        self.proxies.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn peer_of(&self, proxy: &SocketAddr) -> Option<SocketAddr> {
        self.lock_proxies().by_proxy.get(proxy).copied()
    }

    /// Stamps a payload as this node's next datagram.
    fn seal(&self, payload: &[u8]) -> Vec<u8> {
        let stamp = Stamp { from: self.public_addr, seq: self.seq.next(), at_ms: now_ms() };
        seal(&self.key, &stamp, payload)
    }

    /// Checks a datagram from `source`; returns its payload.
    fn admit<'a>(&self, datagram: &'a [u8], source: SocketAddr, now: u64) -> Result<&'a [u8], Refused> {
        let (stamp, payload) = open(&self.key, datagram)?;
        if !sent_from(stamp.from, source) {
            return Err(Refused::Address);
        }
        self.observe_skew(source, skew_ms(&stamp, now));
        if skew_ms(&stamp, now).unsigned_abs() > MAX_SKEW.as_millis() as u64 {
            return Err(Refused::Stale);
        }
        // Keyed by the source: senders bound to a wildcard address all claim `0.0.0.0:port`.
        let sender = SocketAddr::new(source.ip().to_canonical(), source.port());
        let evicted = self.guard.lock().unwrap_or_else(|e| e.into_inner()).check(sender, stamp.seq)?;
        if let Some(gone) = evicted {
            let _ = self.metrics.gossip_clock_skew.remove_label_values(&[&gone.to_string()]);
        }
        Ok(payload)
    }

    /// Publishes a peer's skew, warning (at most every [`SKEW_LOG_EVERY`] per peer) while it
    /// is beyond [`WARN_SKEW`], and saying so once it is back.
    fn observe_skew(&self, peer: SocketAddr, skew: i64) {
        let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
        self.metrics.gossip_clock_skew.with_label_values(&[&peer.to_string()]).set(skew as f64 / 1000.0);
        let mut skewed = self.skewed.lock().unwrap_or_else(|e| e.into_inner());
        if skew.unsigned_abs() <= WARN_SKEW.as_millis() as u64 {
            if skewed.remove(&peer).is_some() {
                tracing::info!(%peer, skew_ms = skew, "gossip peer's clock is back within ±30 s");
            }
            return;
        }
        if !skewed.contains_key(&peer) && skewed.len() >= MAX_SENDERS {
            return; // the gauge still shows it
        }
        let limiter = skewed.entry(peer).or_insert_with(|| LogLimiter::new(SKEW_LOG_EVERY));
        if let Some(suppressed) = limiter.allow() {
            let refused = skew.unsigned_abs() > MAX_SKEW.as_millis() as u64;
            tracing::warn!(
                %peer,
                skew_ms = skew,
                refused,
                suppressed,
                "gossip peer's clock is off (datagrams beyond ±60 s are refused; check NTP)"
            );
        }
    }
}

/// chitchat → proxy → sign → public socket → peer.
async fn outbound(relay: Arc<Relay>, proxy: Arc<UdpSocket>, peer: SocketAddr) {
    let mut buf = vec![0u8; 65_536];
    loop {
        let Ok((n, from)) = proxy.recv_from(&mut buf).await else { return };
        if from != relay.inner_addr || !relay.allowed(peer) {
            continue;
        }
        let _ = relay.public.send_to(&relay.seal(&buf[..n]), peer).await;
    }
}

/// Peer → public socket → verify → proxy → chitchat.
async fn inbound(relay: Arc<Relay>) {
    let mut buf = vec![0u8; 65_536];
    loop {
        let Ok((n, peer)) = relay.public.recv_from(&mut buf).await else { continue };
        if !relay.allowed(peer) {
            continue;
        }
        match relay.admit(&buf[..n], peer, now_ms()) {
            Ok(payload) => {
                if let Ok(proxy) = relay.proxy(peer).await {
                    let _ = proxy.send_to(payload, relay.inner_addr).await;
                }
            }
            Err(why) => {
                relay.metrics.gossip_dropped.with_label_values(&[why.label()]).inc();
                tracing::debug!(%peer, ?why, "gossip datagram dropped");
            }
        }
    }
}

/// chitchat's socket: its private loopback socket, seen through the relay's address mapping.
pub struct AuthSocket {
    inner: ChitchatSocket,
    relay: Arc<Relay>,
    public_addr: SocketAddr,
    inbound: tokio::task::JoinHandle<()>,
}

impl Drop for AuthSocket {
    fn drop(&mut self) {
        self.inbound.abort();
        // The proxies' tasks hold the relay, and so the public socket: a process handing over
        // to its successor must free the gossip port.
        let mut p = self.relay.lock_proxies();
        p.by_peer.drain().for_each(|(_, proxy)| proxy.task.abort());
        p.by_proxy.clear();
    }
}

#[async_trait]
impl Transport for AuthTransport {
    async fn open(&self, listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        let public = Arc::new(UdpSocket::bind(listen_addr).await?);
        let inner = ChitchatSocket::open((Ipv4Addr::LOCALHOST, 0).into()).await?;
        let mut relay =
            Relay::new(self.key.clone(), public, inner.local_addr()?, self.metrics.clone(), self.seq.clone());
        relay.filter = self.filter.clone();
        let relay = Arc::new(relay);
        let public_addr = relay.public_addr;
        let inbound = tokio::spawn(inbound(relay.clone()));
        Ok(Box::new(AuthSocket { inner, relay, public_addr, inbound }))
    }
}

#[async_trait]
impl Socket for AuthSocket {
    fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.public_addr)
    }

    async fn send(&mut self, to: SocketAddr, envelope: ChitchatEnvelope) -> anyhow::Result<SendOutcome> {
        let proxy = self.relay.proxy(to).await?;
        self.inner.send(proxy.local_addr()?, envelope).await
    }

    async fn recv(&mut self) -> anyhow::Result<RecvOutcome> {
        loop {
            let mut got = self.inner.recv().await?;
            // Only the relay's proxies may reach chitchat's private socket.
            if let Some(peer) = self.relay.peer_of(&got.from_addr) {
                got.from_addr = peer;
                return Ok(got);
            }
        }
    }
}

impl Relay {
    #[cfg(test)]
    fn proxies_len(&self) -> usize {
        self.proxies.lock().unwrap_or_else(|e| e.into_inner()).by_peer.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("addr")
    }

    fn stamp(from: &str, seq: u64, at_ms: u64) -> Stamp {
        Stamp { from: addr(from), seq, at_ms }
    }

    #[test]
    fn sealed_datagrams_open_only_with_the_key_and_name_their_sender() {
        let key = ClusterKey::generate();
        let st = stamp("10.0.0.1:7946", 42, 1_000_000);
        let sealed = seal(&key, &st, b"gossip");
        assert_eq!(open(&key, &sealed), Ok((st, &b"gossip"[..])));
        let v6 = stamp("[2001:db8::1]:7946", 1, 5);
        assert_eq!(open(&key, &seal(&key, &v6, b"")).map(|(s, _)| s), Ok(v6));
        assert_eq!(open(&ClusterKey::generate(), &sealed), Err(Refused::Forged));
        for at in [4, SEQ_AT, TS_AT, MAC_AT, sealed.len() - 1] {
            let mut tampered = sealed.clone();
            tampered[at] ^= 1;
            assert_eq!(open(&key, &tampered), Err(Refused::Forged), "byte {at} is covered");
        }
        assert_eq!(open(&key, b"garbage"), Err(Refused::Malformed));
        assert_eq!(open(&key, &[]), Err(Refused::Malformed));
        let mut old = sealed.clone();
        old[..4].copy_from_slice(b"SHG1");
        assert_eq!(open(&key, &old), Err(Refused::Malformed));
    }

    #[test]
    fn the_claimed_sender_must_be_the_source() {
        let a = addr("10.0.0.1:7946");
        assert!(sent_from(a, a));
        assert!(sent_from(a, addr("[::ffff:10.0.0.1]:7946")), "IPv4-mapped sources are the same address");
        assert!(!sent_from(a, addr("10.0.0.9:7946")), "another host reflecting a capture");
        assert!(!sent_from(a, addr("10.0.0.1:7947")));
        assert!(sent_from(addr("0.0.0.0:7946"), a), "a wildcard bind is matched on its port");
        assert!(!sent_from(addr("0.0.0.0:7946"), addr("10.0.0.1:9")));
    }

    #[test]
    fn repeats_and_old_sequences_are_refused_and_reordering_within_the_window_is_not() {
        let mut g = Guard::new(16);
        let a = addr("10.0.0.1:7946");
        assert_eq!(g.check(a, 1000), Ok(None));
        assert_eq!(g.check(a, 1000), Err(Refused::Replay), "the same datagram twice");
        assert_eq!(g.check(a, 1003), Ok(None));
        assert_eq!(g.check(a, 1001), Ok(None), "late by two: UDP reorders");
        assert_eq!(g.check(a, 1001), Err(Refused::Replay));
        assert_eq!(g.check(a, 1002), Ok(None));
        assert_eq!(g.check(a, 1003), Err(Refused::Replay));
        assert_eq!(g.check(a, 1003 + REORDER), Ok(None));
        assert_eq!(g.check(a, 1003), Err(Refused::Replay), "now beyond the reorder window");
        assert_eq!(g.check(a, 1004), Ok(None), "just inside it and never seen");
        assert_eq!(g.check(a, 1_000_000), Ok(None), "a restarted sender starts higher");
        assert_eq!(g.check(a, 1003 + REORDER), Err(Refused::Replay));
        assert_eq!(g.check(addr("10.0.0.2:7946"), 1000), Ok(None), "sequences are per sender");
    }

    #[test]
    fn the_guard_forgets_the_least_recently_heard_sender_first() {
        let mut g = Guard::new(2);
        let (a, b, c) = (addr("10.0.0.1:1"), addr("10.0.0.2:1"), addr("10.0.0.3:1"));
        g.check(a, 1).expect("a");
        g.check(b, 1).expect("b");
        g.check(a, 2).expect("a again");
        assert_eq!(g.check(c, 1), Ok(Some(b)), "b was heard least recently");
        assert!(g.knows(&a) && g.knows(&c) && !g.knows(&b));
        assert_eq!(g.check(a, 2), Err(Refused::Replay), "a is still protected");
    }

    fn test_relay(public: UdpSocket, inner: SocketAddr, max_peers: usize) -> Arc<Relay> {
        let seq = Arc::new(Sequence::unrecorded(1));
        let mut relay = Relay::new(ClusterKey::generate(), Arc::new(public), inner, Arc::new(Metrics::new("t")), seq);
        relay.proxies = Mutex::new(Proxies::new(max_peers));
        Arc::new(relay)
    }

    async fn loopback_udp() -> UdpSocket {
        UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("bind")
    }

    #[tokio::test]
    async fn relay_maps_peers_to_stable_proxies() {
        let key = ClusterKey::generate();
        let seq = Arc::new(Sequence::unrecorded(1));
        let t = AuthTransport { key, metrics: Arc::new(Metrics::new("t")), filter: None, seq };
        let socket = t.open((Ipv4Addr::LOCALHOST, 0).into()).await.expect("open");
        assert!(socket.local_addr().expect("addr").port() != 0);
        drop(socket);
        let relay = test_relay(loopback_udp().await, addr("127.0.0.1:9"), MAX_PEERS);
        let peer = addr("127.0.0.1:9");
        let a = relay.proxy(peer).await.expect("proxy");
        let b = relay.proxy(peer).await.expect("proxy");
        assert_eq!(a.local_addr().expect("a"), b.local_addr().expect("b"));
        assert_eq!(relay.peer_of(&a.local_addr().expect("a")), Some(peer));
        assert_eq!(relay.proxies_len(), 1);
    }

    #[tokio::test]
    async fn idle_proxies_are_evicted_so_recent_peers_keep_theirs() {
        let relay = test_relay(loopback_udp().await, addr("127.0.0.1:9"), 3);
        let peers: Vec<SocketAddr> = (1..=3).map(|i| addr(&format!("127.0.0.{i}:7946"))).collect();
        let mut first = Vec::new();
        for p in &peers {
            first.push(relay.proxy(*p).await.expect("proxy").local_addr().expect("addr"));
        }
        relay.proxy(peers[0]).await.expect("used again");
        relay.proxy(peers[2]).await.expect("used again");
        // A stream of new addresses (more than the bound) only ever displaces idle ones.
        for i in 10..20 {
            relay.proxy(addr(&format!("127.0.0.{i}:7946"))).await.expect("never refused");
            relay.proxy(peers[0]).await.expect("a real peer keeps talking");
        }
        assert_eq!(relay.proxies_len(), 3);
        let again = relay.proxy(peers[0]).await.expect("proxy").local_addr().expect("addr");
        assert_eq!(again, first[0], "the busy peer kept its proxy (chitchat sees one stable address)");
        assert_eq!(relay.peer_of(&first[1]), None, "the idle one was closed and unmapped");
        assert_eq!(relay.metrics.gossip_proxies_evicted.get(), 10, "one per new peer beyond the bound");
    }

    fn dropped(relay: &Relay, reason: &str) -> u64 {
        relay.metrics.gossip_dropped.with_label_values(&[reason]).get()
    }

    #[tokio::test]
    async fn replays_reflections_and_stale_datagrams_are_refused_and_counted() {
        let relay = test_relay(loopback_udp().await, addr("127.0.0.1:9"), 8);
        let src = addr("127.0.0.5:7946");
        let now = 10_000_000;
        let good = seal(&relay.key, &stamp("127.0.0.5:7946", 7, now), b"x");
        assert_eq!(relay.admit(&good, src, now), Ok(&b"x"[..]));
        assert_eq!(relay.admit(&good, src, now + 1_000), Err(Refused::Replay), "captured and replayed");
        assert_eq!(relay.admit(&good, addr("127.0.0.66:4000"), now), Err(Refused::Address), "reflected");
        let stale = seal(&relay.key, &stamp("127.0.0.5:7946", 8, now - 61_000), b"x");
        assert_eq!(relay.admit(&stale, src, now), Err(Refused::Stale));
        let next = seal(&relay.key, &stamp("127.0.0.5:7946", 8, now), b"x");
        assert_eq!(relay.admit(&next, src, now), Ok(&b"x"[..]), "a refused stale one took no sequence");
    }

    #[tokio::test]
    async fn the_inbound_path_counts_each_refusal() {
        let public = loopback_udp().await;
        let relay = test_relay(public, addr("127.0.0.1:9"), 8);
        tokio::spawn(inbound(relay.clone()));
        let sender = loopback_udp().await;
        let me = sender.local_addr().expect("addr");
        let d = seal(&relay.key, &Stamp { from: me, seq: 1, at_ms: now_ms() }, b"x");
        for _ in 0..3 {
            sender.send_to(&d, relay.public_addr).await.expect("send");
        }
        let elsewhere = seal(&relay.key, &Stamp { from: addr("127.0.0.9:1"), seq: 1, at_ms: now_ms() }, b"x");
        sender.send_to(&elsewhere, relay.public_addr).await.expect("send");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while (dropped(&relay, "replay"), dropped(&relay, "address")) != (2, 1) {
            assert!(tokio::time::Instant::now() < deadline, "replay {}", dropped(&relay, "replay"));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn clock_skew_is_published_per_peer() {
        let relay = test_relay(loopback_udp().await, addr("127.0.0.1:9"), 8);
        let now = 50_000_000;
        for (i, skew) in [(1u64, 2_500i64), (2, -40_000), (3, 75_000)] {
            let from = format!("127.0.0.{i}:7946");
            let d = seal(&relay.key, &stamp(&from, 1, (now as i64 + skew) as u64), b"x");
            let _ = relay.admit(&d, addr(&from), now);
            let seen = relay.metrics.gossip_clock_skew.with_label_values(&[&from]).get();
            assert!((seen - skew as f64 / 1000.0).abs() < 1e-9, "{from}: {seen}");
        }
        assert_eq!(dropped(&relay, "stale"), 0, "admit leaves counting to the inbound loop");
        let skewed = |relay: &Relay| {
            let mut v: Vec<SocketAddr> = relay.skewed.lock().expect("lock").keys().copied().collect();
            v.sort();
            v
        };
        assert_eq!(skewed(&relay), [addr("127.0.0.2:7946"), addr("127.0.0.3:7946")], "each warned on its own");
        let back = seal(&relay.key, &stamp("127.0.0.3:7946", 2, now), b"x");
        relay.admit(&back, addr("127.0.0.3:7946"), now).expect("in the window again");
        assert_eq!(skewed(&relay), [addr("127.0.0.2:7946")], "a peer back in range is forgotten");
    }
}
