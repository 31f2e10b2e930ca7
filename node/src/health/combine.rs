//! The cluster's view of backend health, combined from this node's observations and those its
//! live peers gossip. Pure: same inputs, same view, on every node.
//!
//! - Active checks: the live probers' verdicts vote (ties count as up); when no prober reports
//!   (a prober died, its replacement has not checked yet) the previous verdict stands, so a
//!   handover never flips a backend to unknown.
//! - Heartbeats: a backend is up while any live node hears it (backends may talk to one node).
//! - Passive ejections stay local: each node ejects on its own failures.

use std::collections::HashMap;

use shoal_proto::{CheckKind, State};

use super::{BackendId, HealthView, Heard, Verdict};

/// What one live peer reports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerObs {
    pub node: String,
    pub verdicts: HashMap<BackendId, Verdict>,
    pub heard: HashMap<BackendId, Heard>,
}

/// Combines `local` and `peers` into the view routing uses; `prev` is the last combined view.
pub fn combine(state: &State, local: &HealthView, peers: &[PeerObs], prev: &HealthView) -> HealthView {
    let mut out = HealthView {
        reasons: local.reasons.clone(),
        ejected: local.ejected.clone(),
        heard: local.heard.clone(),
        ..HealthView::default()
    };
    let heard: Vec<(&str, &BackendId, &Heard)> = local
        .heard
        .iter()
        .map(|(id, h)| ("", id, h))
        .chain(peers.iter().flat_map(|p| p.heard.iter().map(move |(id, h)| (p.node.as_str(), id, h))))
        .collect();
    for (_, id, h) in &heard {
        if h.dynamic && state.pools.get(&id.0).is_some_and(|p| p.spec.self_register) {
            out.dynamic.entry(id.0.clone()).or_default().insert(id.1, h.udp);
        }
    }
    for pool in state.pools.values() {
        let configured = pool.backends.values().map(|b| b.addr);
        let dynamic = out.dynamic.get(&pool.name).map(|d| d.keys().copied().collect::<Vec<_>>()).unwrap_or_default();
        for addr in configured.chain(dynamic) {
            let id = (pool.name.clone(), addr);
            let verdict = match pool.spec.check() {
                CheckKind::None => Verdict::Up,
                CheckKind::Heartbeat => heartbeat_verdict(&id, &heard, prev),
                CheckKind::Http | CheckKind::Tcp => {
                    let (v, reporter) = probe_verdict(&id, local, peers, prev);
                    if v == Verdict::Down && !out.reasons.contains_key(&id) && !reporter.is_empty() {
                        out.reasons.insert(id.clone(), format!("sick according to {reporter}"));
                    }
                    v
                }
            };
            out.verdicts.insert(id, verdict);
        }
    }
    out
}

fn probe_verdict(id: &BackendId, local: &HealthView, peers: &[PeerObs], prev: &HealthView) -> (Verdict, String) {
    let reports = local
        .verdicts
        .get(id)
        .map(|v| ("", *v))
        .into_iter()
        .chain(peers.iter().filter_map(|p| p.verdicts.get(id).map(|v| (p.node.as_str(), *v))))
        .filter(|(_, v)| *v != Verdict::Unknown);
    let (mut up, mut down, mut downer) = (0, 0, "");
    for (node, v) in reports {
        match v {
            Verdict::Up => up += 1,
            _ => {
                down += 1;
                downer = node;
            }
        }
    }
    match (up, down) {
        (0, 0) => (prev.verdicts.get(id).copied().unwrap_or_default(), String::new()),
        (u, d) if u >= d => (Verdict::Up, String::new()),
        _ => (Verdict::Down, downer.to_string()),
    }
}

fn heartbeat_verdict(id: &BackendId, heard: &[(&str, &BackendId, &Heard)], prev: &HealthView) -> Verdict {
    let mine: Vec<&Heard> = heard.iter().filter(|(_, i, _)| *i == id).map(|(_, _, h)| *h).collect();
    if mine.iter().any(|h| h.up) {
        Verdict::Up
    } else if !mine.is_empty() || prev.verdicts.get(id) == Some(&Verdict::Up) {
        // Heard but silent, or nobody alive hears it any more.
        Verdict::Down
    } else {
        prev.verdicts.get(id).copied().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_proto::{BackendSpec, Command, PoolSpec, Protocol, apply};
    use std::net::SocketAddr;

    fn addr(i: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, i], 80))
    }

    fn state() -> State {
        let mut st = State::default();
        let web = PoolSpec { pattern: Some("/".into()), ..PoolSpec::default() };
        apply(&mut st, &Command::PutPool { name: "web".into(), spec: web }).expect("web");
        apply(&mut st, &Command::PutBackend { pool: "web".into(), addr: addr(1), spec: BackendSpec::default() })
            .expect("b");
        let mut hb =
            PoolSpec { protocol: Protocol::Tcp, listen: Some(3001), self_register: true, ..PoolSpec::default() };
        hb.health.heartbeat_port = Some(5000);
        hb.health.heartbeat_secret = Some("k".into());
        apply(&mut st, &Command::PutPool { name: "hb".into(), spec: hb }).expect("hb");
        st
    }

    fn peer(node: &str, v: Option<Verdict>, heard: Option<Heard>) -> PeerObs {
        let mut p = PeerObs { node: node.into(), ..PeerObs::default() };
        if let Some(v) = v {
            p.verdicts.insert(("web".into(), addr(1)), v);
        }
        if let Some(h) = heard {
            p.heard.insert(("hb".into(), addr(9)), h);
        }
        p
    }

    fn web(view: &HealthView) -> Verdict {
        view.verdicts[&("web".to_string(), addr(1))]
    }

    #[test]
    fn peers_verdicts_count_when_this_node_does_not_probe() {
        let st = state();
        let none = HealthView::default();
        let v = combine(&st, &none, &[peer("b", Some(Verdict::Down), None)], &none);
        assert_eq!(web(&v), Verdict::Down);
        assert_eq!(v.reasons[&("web".to_string(), addr(1))], "sick according to b");
        let v = combine(&st, &none, &[peer("b", Some(Verdict::Down), None), peer("c", Some(Verdict::Up), None)], &none);
        assert_eq!(web(&v), Verdict::Up, "a tie counts as up");
    }

    #[test]
    fn verdict_is_sticky_while_no_prober_reports() {
        let st = state();
        let none = HealthView::default();
        let first = combine(&st, &none, &[peer("b", Some(Verdict::Up), None)], &none);
        let handover = combine(&st, &none, &[peer("c", Some(Verdict::Unknown), None)], &first);
        assert_eq!(web(&handover), Verdict::Up);
        assert_eq!(web(&combine(&st, &none, &[], &none)), Verdict::Unknown, "a new node knows nothing yet");
    }

    #[test]
    fn heartbeat_backends_heard_anywhere_are_routable_everywhere() {
        let st = state();
        let none = HealthView::default();
        let udp = SocketAddr::from(([10, 0, 0, 9], 81));
        let heard = Heard { up: true, udp, dynamic: true };
        let v = combine(&st, &none, &[peer("a", None, Some(heard.clone()))], &none);
        let id = ("hb".to_string(), addr(9));
        assert_eq!(v.verdicts[&id], Verdict::Up);
        assert_eq!(v.dynamic["hb"][&addr(9)], udp);
        // The only node hearing it died: it is down, not stuck up.
        let after = combine(&st, &none, &[], &v);
        assert_eq!(after.verdicts.get(&id), None, "a forgotten self-registered backend disappears");
        let silent = combine(&st, &none, &[peer("a", None, Some(Heard { up: false, ..heard }))], &v);
        assert_eq!(silent.verdicts[&id], Verdict::Down);
    }
}
