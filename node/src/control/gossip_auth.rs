//! Authenticated gossip. chitchat keeps its envelope encoding private, so a transport cannot
//! sign envelopes itself. Instead chitchat runs on a private loopback socket and this relay owns
//! the public gossip address: every datagram leaving is stamped and MACed with the cluster key,
//! every datagram arriving is checked (key, freshness) before chitchat sees it; forged ones and
//! those of other clusters are dropped and counted.
//!
//! Wire format: `"SHG1" | unix millis (u64 BE) | HMAC-SHA256(key, magic | millis | payload) | payload`.
//!
//! chitchat sends to a peer through a per-peer proxy socket on loopback, so the relay knows the
//! destination, and receives a peer's datagrams from that same proxy, so chitchat sees one
//! stable address per peer, which [`AuthSocket`] maps back to the peer's real address.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use chitchat::ChitchatEnvelope;
use chitchat::transport::{RecvOutcome, SendOutcome, Socket, Transport, UdpSocket as ChitchatSocket};
use tokio::net::UdpSocket;

use super::secure::ClusterKey;
use crate::metrics::Metrics;

const MAGIC: &[u8; 4] = b"SHG1";
const HEADER: usize = 4 + 8 + 32;
/// Datagrams stamped further than this from our clock are refused (replays, broken clocks).
const MAX_SKEW: Duration = Duration::from_secs(60);
/// Most peers the relay keeps a proxy socket for.
const MAX_PEERS: usize = 4096;

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Stamps and signs a payload for the wire.
pub fn seal(key: &ClusterKey, payload: &[u8], at_ms: u64) -> Vec<u8> {
    let ts = at_ms.to_be_bytes();
    let tag = key.mac(&[MAGIC, &ts, payload]);
    [&MAGIC[..], &ts, &tag, payload].concat()
}

/// Why an incoming datagram was dropped.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    Malformed,
    Forged,
    Stale,
}

impl Refused {
    fn label(&self) -> &'static str {
        match self {
            Refused::Malformed => "malformed",
            Refused::Forged => "forged",
            Refused::Stale => "stale",
        }
    }
}

/// Checks a datagram; returns its payload.
pub fn open<'a>(key: &ClusterKey, datagram: &'a [u8], now: u64) -> Result<&'a [u8], Refused> {
    if datagram.len() < HEADER || &datagram[..4] != MAGIC {
        return Err(Refused::Malformed);
    }
    let ts: [u8; 8] = datagram[4..12].try_into().map_err(|_| Refused::Malformed)?;
    let payload = &datagram[HEADER..];
    if !key.verify(&[MAGIC, &ts, payload], &datagram[12..HEADER]) {
        return Err(Refused::Forged);
    }
    let at = u64::from_be_bytes(ts);
    if at.abs_diff(now) > MAX_SKEW.as_millis() as u64 {
        return Err(Refused::Stale);
    }
    Ok(payload)
}

/// Decides whether gossip with a peer (by its gossip address) gets through: a test seam for
/// gossip partitions, like the Raft `LinkFilter`; `None` (production) allows every peer.
pub type GossipFilter = Arc<dyn Fn(SocketAddr) -> bool + Send + Sync>;

/// The transport handed to chitchat.
pub struct AuthTransport {
    pub key: ClusterKey,
    pub metrics: Arc<Metrics>,
    pub filter: Option<GossipFilter>,
}

/// Peer ↔ proxy socket bookkeeping shared by the relay tasks and the socket.
#[derive(Default)]
struct Proxies {
    by_peer: HashMap<SocketAddr, Arc<UdpSocket>>,
    by_proxy: HashMap<SocketAddr, SocketAddr>,
}

struct Relay {
    key: ClusterKey,
    public: Arc<UdpSocket>,
    public_addr: SocketAddr,
    inner_addr: SocketAddr,
    proxies: Mutex<Proxies>,
    metrics: Arc<Metrics>,
    filter: Option<GossipFilter>,
}

impl Relay {
    /// Whether the partition seam lets datagrams to and from `peer` through.
    fn allowed(&self, peer: SocketAddr) -> bool {
        self.filter.as_ref().is_none_or(|f| f(peer))
    }

    /// The proxy socket for `peer`, created (with its outbound task) on first use.
    async fn proxy(self: &Arc<Self>, peer: SocketAddr) -> std::io::Result<Arc<UdpSocket>> {
        if let Some(p) = self.proxies.lock().unwrap_or_else(|e| e.into_inner()).by_peer.get(&peer) {
            return Ok(p.clone());
        }
        let socket = Arc::new(UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await?);
        let addr = socket.local_addr()?;
        {
            let mut p = self.proxies.lock().unwrap_or_else(|e| e.into_inner());
            if p.by_peer.len() >= MAX_PEERS {
                return Err(std::io::Error::other("too many gossip peers"));
            }
            p.by_peer.insert(peer, socket.clone());
            p.by_proxy.insert(addr, peer);
        }
        tokio::spawn(outbound(self.clone(), socket.clone(), peer));
        Ok(socket)
    }

    fn peer_of(&self, proxy: &SocketAddr) -> Option<SocketAddr> {
        self.proxies.lock().unwrap_or_else(|e| e.into_inner()).by_proxy.get(proxy).copied()
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
        let _ = relay.public.send_to(&seal(&relay.key, &buf[..n], now_ms()), peer).await;
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
        match open(&relay.key, &buf[..n], now_ms()) {
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
    }
}

#[async_trait]
impl Transport for AuthTransport {
    async fn open(&self, listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        let public = Arc::new(UdpSocket::bind(listen_addr).await?);
        let inner = ChitchatSocket::open((Ipv4Addr::LOCALHOST, 0).into()).await?;
        let relay = Arc::new(Relay {
            key: self.key.clone(),
            public_addr: public.local_addr()?,
            public,
            inner_addr: inner.local_addr()?,
            proxies: Mutex::default(),
            metrics: self.metrics.clone(),
            filter: self.filter.clone(),
        });
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

    #[test]
    fn sealed_datagrams_open_only_with_the_key_and_in_time() {
        let key = ClusterKey::generate();
        let sealed = seal(&key, b"gossip", 1_000_000);
        assert_eq!(open(&key, &sealed, 1_000_500), Ok(&b"gossip"[..]));
        assert_eq!(open(&ClusterKey::generate(), &sealed, 1_000_500), Err(Refused::Forged));
        assert_eq!(open(&key, &sealed, 1_000_000 + 61_000), Err(Refused::Stale));
        let mut tampered = sealed.clone();
        *tampered.last_mut().expect("byte") ^= 1;
        assert_eq!(open(&key, &tampered, 1_000_000), Err(Refused::Forged));
        assert_eq!(open(&key, b"garbage", 0), Err(Refused::Malformed));
        assert_eq!(open(&key, &[], 0), Err(Refused::Malformed));
    }

    #[tokio::test]
    async fn relay_maps_peers_to_stable_proxies() {
        let key = ClusterKey::generate();
        let t = AuthTransport { key, metrics: Arc::new(Metrics::new("t")), filter: None };
        let socket = t.open((Ipv4Addr::LOCALHOST, 0).into()).await.expect("open");
        let s = socket.local_addr().expect("addr");
        assert!(s.port() != 0);
        drop(socket);
        let relay = Arc::new(Relay {
            key: ClusterKey::generate(),
            public: Arc::new(UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("bind")),
            public_addr: s,
            inner_addr: s,
            proxies: Mutex::default(),
            metrics: Arc::new(Metrics::new("t")),
            filter: None,
        });
        let peer: SocketAddr = "127.0.0.1:9".parse().expect("addr");
        let a = relay.proxy(peer).await.expect("proxy");
        let b = relay.proxy(peer).await.expect("proxy");
        assert_eq!(a.local_addr().expect("a"), b.local_addr().expect("b"));
        assert_eq!(relay.peer_of(&a.local_addr().expect("a")), Some(peer));
        assert_eq!(relay.proxies_len(), 1);
    }
}
