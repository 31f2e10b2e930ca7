//! Upgraded connections (WebSocket): which backend a request pins (the Enterprise Connect
//! gateway forms), and how open tunnels are counted. Tunnels (`h1::tunnel`) run in their
//! client connection's task: reconfiguration, leader changes and draining never touch them;
//! node shutdown ends them with a close frame after the drain grace.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::DpCtx;
use crate::routing::BackendRt;

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
pub fn pinned<'a>(header: impl Fn(&str) -> Option<&'a str>, path: &str) -> Option<Pin> {
    let header = |name: &str| header(name).map(str::trim);
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

/// Counts an upgraded connection on its backend (and, when pinned, as a super connection).
pub(super) struct TunnelCount {
    backend: Arc<BackendRt>,
    pinned: bool,
    ctx: Arc<DpCtx>,
}

impl TunnelCount {
    pub(super) fn new(backend: Arc<BackendRt>, pinned: bool, ctx: Arc<DpCtx>) -> TunnelCount {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// One header, as the engine's lookup sees it.
    fn headers(name: &'static str, value: &'static str) -> impl Fn(&str) -> Option<&'static str> {
        move |n: &str| n.eq_ignore_ascii_case(name).then_some(value)
    }

    fn none(_: &str) -> Option<&'static str> {
        None
    }

    #[test]
    fn the_three_ec_pinning_forms() {
        assert_eq!(pinned(headers("x-server-select", "gw2"), "/agent"), Some(Pin { slot: 2, path: None }));
        assert_eq!(pinned(headers("x-cf-app-instance", "6f1d-aa:0"), "/agent"), Some(Pin { slot: 1, path: None }));
        let vm = pinned(none, "/vm3/agent");
        assert_eq!(vm, Some(Pin { slot: 3, path: Some("/agent".into()) }));
        assert_eq!(pinned(none, "/vm12"), Some(Pin { slot: 12, path: Some("/".into()) }));
        assert_eq!(pinned(none, "/agent"), None);
        assert_eq!(pinned(none, "/vmware/agent"), None);
        assert_eq!(pinned(headers("x-server-select", "gw0"), "/agent"), None);
        assert_eq!(pinned(headers("x-cf-app-instance", "garbage"), "/agent"), None);
    }

    #[test]
    fn server_select_takes_gw_and_vm_names() {
        let slot = |v: &'static str| pinned(headers("x-server-select", v), "/agent").map(|p| p.slot);
        assert_eq!(slot("vm2"), Some(2));
        assert_eq!(slot("VM7"), Some(7));
        assert_eq!(slot("Gw3"), Some(3));
        assert_eq!(slot(" gw4 "), Some(4));
        assert_eq!(slot("5"), Some(5));
        for garbage in ["", "gw", "vm", "gw-1", "gw+1", "gw1x", "x2", "gw99999999999", "vm0", "g2"] {
            assert_eq!(slot(garbage), None, "{garbage:?} pins nothing");
        }
        // A value that is no gateway name leaves the other forms to decide.
        assert_eq!(pinned(headers("x-server-select", "nonsense"), "/vm2/agent").map(|p| p.slot), Some(2));
    }
}
