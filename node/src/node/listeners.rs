//! The node's own listeners (HTTP, HTTPS and their IPv6 companions): which to serve, where
//! they got bound, and the data plane's listener set brought in line with a routing table.

use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;

use crate::dataplane::{DataPlane, ListenerKind};

/// Whether this host can listen on `ip` (IPv6): a host without IPv6 answers EAFNOSUPPORT or
/// EADDRNOTAVAIL, and the node then serves IPv4 only (logged). Other errors are left to the
/// listener itself, which reports them like any bind failure.
pub(super) fn ipv6_usable(ip: IpAddr) -> bool {
    match crate::dataplane::v6_only_listener(SocketAddr::new(ip, 0)) {
        Ok(_) => true,
        Err(e) if crate::dataplane::no_ipv6(&e) => {
            tracing::warn!(%ip, error = %e, "this host has no IPv6: listening on IPv4 only");
            false
        }
        Err(_) => true,
    }
}

/// The node's own listeners (pools add TCP ones).
#[derive(Clone, Copy, Debug)]
pub(super) struct Fixed {
    http: SocketAddr,
    https: Option<SocketAddr>,
    /// The IPv6 address the HTTP and HTTPS listeners also bind, on the same ports.
    v6: Option<IpAddr>,
}

impl Fixed {
    /// The listeners asked for: `http_port` and `https_port` on `ip`, and on `ip6` too when it
    /// differs and this host has IPv6.
    pub(super) fn new(ip: IpAddr, http_port: u16, https_port: Option<u16>, ip6: Option<IpAddr>) -> Fixed {
        Fixed {
            http: SocketAddr::new(ip, http_port),
            https: https_port.map(|p| SocketAddr::new(ip, p)),
            v6: ip6.filter(|v6| *v6 != ip && ipv6_usable(*v6)),
        }
    }

    /// The listeners to serve. An IPv6 companion takes its IPv4 listener's port; with port 0
    /// that is known only once the IPv4 one is bound (`bound`), so it may be missing at first.
    fn wanted(
        &self,
        tcp_ports: impl Iterator<Item = u16>,
        bound: impl Fn(&ListenerKind) -> Option<u16>,
    ) -> Vec<(SocketAddr, ListenerKind)> {
        let mut wanted = vec![(self.http, ListenerKind::Http)];
        wanted.extend(self.https.map(|a| (a, ListenerKind::Https)));
        if let Some(ip6) = self.v6 {
            let companions: Vec<_> = wanted
                .iter()
                .filter_map(|(a, kind)| {
                    let port = if a.port() == 0 { bound(kind)? } else { a.port() };
                    Some((SocketAddr::new(ip6, port), kind.clone()))
                })
                .collect();
            wanted.extend(companions);
        }
        wanted.extend(tcp_ports.map(|port| (SocketAddr::new(self.http.ip(), port), ListenerKind::Tcp(port))));
        wanted
    }

    /// How many listeners `wanted` has when every IPv6 companion is known.
    fn complete(&self) -> usize {
        let own = 1 + usize::from(self.https.is_some());
        own * (1 + usize::from(self.v6.is_some()))
    }
}

/// Where the node's own HTTP and HTTPS listeners are bound (port 0 resolved), once they are.
#[derive(Default)]
pub struct Bound {
    http: Mutex<Option<SocketAddr>>,
    https: Mutex<Option<SocketAddr>>,
}

impl Bound {
    pub fn http(&self) -> Option<SocketAddr> {
        *self.http.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn https(&self) -> Option<SocketAddr> {
        *self.https.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The bound port of the node's own HTTP or HTTPS listener.
    fn port(&self, kind: &ListenerKind) -> Option<u16> {
        match kind {
            ListenerKind::Http => self.http().map(|a| a.port()),
            ListenerKind::Https => self.https().map(|a| a.port()),
            ListenerKind::Tcp(_) => None,
        }
    }

    /// Remembers the IPv4 HTTP and HTTPS listeners among those just opened.
    fn record(&self, fixed: &Fixed, opened: Vec<(ListenerKind, SocketAddr)>) {
        for (kind, bound) in opened {
            let slot = match kind {
                _ if bound.ip() != fixed.http.ip() => continue,
                ListenerKind::Http => &self.http,
                ListenerKind::Https => &self.https,
                ListenerKind::Tcp(_) => continue,
            };
            *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(bound);
        }
    }
}

/// Opens, keeps or closes the data plane's listeners: the fixed ones and a TCP listener per
/// port in `tcp_ports`.
pub(super) fn apply(dp: &DataPlane, fixed: &Fixed, bound: &Bound, tcp_ports: &[u16]) {
    // Twice at most: IPv6 companions of port-0 listeners learn their port from the first pass.
    for _ in 0..2 {
        let wanted = fixed.wanted(tcp_ports.iter().copied(), |kind| bound.port(kind));
        bound.record(fixed, dp.set_listeners(&wanted));
        if wanted.len() >= fixed.complete() + tcp_ports.len() {
            break;
        }
    }
}
