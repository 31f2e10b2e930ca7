//! Upgraded connections (WebSocket): which backend a request pins (the Enterprise Connect
//! gateway forms), and the tunnel task that relays the upgraded bytes. Tunnels live in their
//! own tasks: reconfiguration, leader changes and draining never touch them; node shutdown
//! ends them with a close frame after the drain grace.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use http::header::{self, HeaderMap};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use super::{DpCtx, relay};
use crate::routing::{ActiveGuard, BackendRt, PoolRt};

/// Where a request asked to go: a slot (gwN is slot N) and, for `/vmN/...`, the rest of the path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pin {
    pub slot: u32,
    pub path: Option<String>,
}

/// The EC forms, in order: `X-Server-Select: gwN` (or `vmN`, the later gateways' name, or a
/// bare `N`), `X-CF-APP-INSTANCE: <guid>:<index>` (index counts from 0, so index 0 is gw1), a
/// path `/vmN/...`. An `X-Server-Select` value that is none of these is ignored (nginx's
/// `default`). Whether the slot exists is the pool's business: see `PoolRt::has_slot`.
pub fn pinned(headers: &HeaderMap, path: &str) -> Option<Pin> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
    if let Some(slot) = header("x-server-select").and_then(server_select) {
        return Some(Pin { slot, path: None });
    }
    if let Some(v) = header("x-cf-app-instance") {
        let index: u32 = v.rsplit_once(':')?.1.parse().ok()?;
        return Some(Pin { slot: index.checked_add(1)?, path: None });
    }
    let rest = path.strip_prefix("/vm")?;
    let digits = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
    let slot: u32 = rest[..digits].parse().ok().filter(|n| *n > 0)?;
    let tail = &rest[digits..];
    if !(tail.is_empty() || tail.starts_with('/')) {
        return None;
    }
    let path = if tail.is_empty() { "/".to_string() } else { tail.to_string() };
    Some(Pin { slot, path: Some(path) })
}

/// The slot of an `X-Server-Select` value: `gwN`, `vmN` (any case) or `N`, with N > 0.
fn server_select(v: &str) -> Option<u32> {
    let prefixed = v.get(..2).filter(|p| p.eq_ignore_ascii_case("gw") || p.eq_ignore_ascii_case("vm"));
    let digits = if prefixed.is_some() { &v[2..] } else { v };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().filter(|n| *n > 0)
}

/// Whether the request asks for a WebSocket (as opposed to another upgrade).
pub fn is_websocket(headers: &HeaderMap) -> bool {
    headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|p| p.trim().eq_ignore_ascii_case("websocket")))
}

/// Counts an upgraded connection on its backend (and, when pinned, as a super connection).
struct TunnelCount {
    backend: Arc<BackendRt>,
    pinned: bool,
    ctx: Arc<DpCtx>,
}

impl TunnelCount {
    fn new(backend: Arc<BackendRt>, pinned: bool, ctx: Arc<DpCtx>) -> TunnelCount {
        backend.shared.upgraded.fetch_add(1, Ordering::Relaxed);
        if pinned {
            backend.shared.pinned.fetch_add(1, Ordering::Relaxed);
        }
        ctx.tunnels.fetch_add(1, Ordering::Relaxed);
        TunnelCount { backend, pinned, ctx }
    }
}

impl Drop for TunnelCount {
    fn drop(&mut self) {
        self.backend.shared.upgraded.fetch_sub(1, Ordering::Relaxed);
        if self.pinned {
            self.backend.shared.pinned.fetch_sub(1, Ordering::Relaxed);
        }
        self.ctx.tunnels.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What a tunnel needs besides the two upgrade futures.
pub struct Tunnel {
    pub backend: Arc<BackendRt>,
    pub guard: ActiveGuard,
    pub websocket: bool,
    pub pinned: bool,
}

/// Relays an upgraded connection once both sides have switched protocols.
pub fn spawn(client: OnUpgrade, backend_side: OnUpgrade, t: Tunnel, pool: &PoolRt, ctx: Arc<DpCtx>) {
    let metrics = pool.metrics.clone();
    let idle = pool.idle_timeout;
    let pool_name = pool.name.clone();
    tokio::spawn(async move {
        let (client, upstream) = match tokio::try_join!(client, backend_side) {
            Ok(pair) => pair,
            Err(e) => {
                tracing::warn!(pool = %pool_name, backend = %t.backend.key, error = %e, "upgrade failed");
                return;
            }
        };
        let _count = TunnelCount::new(t.backend.clone(), t.pinned, ctx.clone());
        metrics.upgrades.inc();
        let (client, upstream) = (TokioIo::new(client), TokioIo::new(upstream));
        let (moved, ended) = if t.websocket {
            relay::relay_ws(client, upstream, idle, ctx.shutdown.clone()).await
        } else {
            relay::relay(client, upstream, idle).await
        };
        metrics.upgrades.dec();
        metrics.bytes_in.inc_by(moved.up);
        metrics.bytes_out.inc_by(moved.down);
        drop(t.guard);
        tracing::info!(pool = %pool_name, backend = %t.backend.key, pinned = t.pinned, client_to_backend = moved.up, backend_to_client = moved.down, ?ended, "upgraded connection closed");
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(name: &'static str, value: &'static str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(name, HeaderValue::from_static(value));
        h
    }

    #[test]
    fn the_three_ec_pinning_forms() {
        assert_eq!(pinned(&headers("x-server-select", "gw2"), "/agent"), Some(Pin { slot: 2, path: None }));
        assert_eq!(pinned(&headers("x-cf-app-instance", "6f1d-aa:0"), "/agent"), Some(Pin { slot: 1, path: None }));
        let vm = pinned(&HeaderMap::new(), "/vm3/agent");
        assert_eq!(vm, Some(Pin { slot: 3, path: Some("/agent".into()) }));
        assert_eq!(pinned(&HeaderMap::new(), "/vm12"), Some(Pin { slot: 12, path: Some("/".into()) }));
        assert_eq!(pinned(&HeaderMap::new(), "/agent"), None);
        assert_eq!(pinned(&HeaderMap::new(), "/vmware/agent"), None);
        assert_eq!(pinned(&headers("x-server-select", "gw0"), "/agent"), None);
        assert_eq!(pinned(&headers("x-cf-app-instance", "garbage"), "/agent"), None);
    }

    #[test]
    fn server_select_takes_gw_and_vm_names() {
        let slot = |v: &'static str| pinned(&headers("x-server-select", v), "/agent").map(|p| p.slot);
        assert_eq!(slot("vm2"), Some(2));
        assert_eq!(slot("VM7"), Some(7));
        assert_eq!(slot("Gw3"), Some(3));
        assert_eq!(slot(" gw4 "), Some(4));
        assert_eq!(slot("5"), Some(5));
        for garbage in ["", "gw", "vm", "gw-1", "gw+1", "gw1x", "x2", "gw99999999999", "vm0", "g2"] {
            assert_eq!(slot(garbage), None, "{garbage:?} pins nothing");
        }
        // A value that is no gateway name leaves the other forms to decide.
        assert_eq!(pinned(&headers("x-server-select", "nonsense"), "/vm2/agent").map(|p| p.slot), Some(2));
    }

    #[test]
    fn websocket_detection() {
        assert!(is_websocket(&headers("upgrade", "WebSocket")));
        assert!(!is_websocket(&headers("upgrade", "h2c")));
    }
}
