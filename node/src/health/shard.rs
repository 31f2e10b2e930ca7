//! Which live nodes probe a backend: rendezvous (highest-random-weight) hashing picks `k`
//! nodes per backend, so every node computes the same assignment from the same membership and
//! a membership change moves only the backends of the nodes that came or went.

use crate::hash::stable_hash;

use super::BackendId;

/// The `k` probers of `backend` among `live` node names (all of them when fewer).
pub fn probers<'a>(live: &'a [String], backend: &BackendId, k: usize) -> Vec<&'a str> {
    let key = format!("{}/{}", backend.0, backend.1);
    let mut scored: Vec<(u64, &str)> = live.iter().map(|n| (score(n, &key), n.as_str())).collect();
    scored.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)));
    scored.into_iter().take(k.max(1)).map(|(_, n)| n).collect()
}

/// Whether `me` probes `backend`.
pub fn assigned(me: &str, live: &[String], backend: &BackendId, k: usize) -> bool {
    live.is_empty() || probers(live, backend, k).contains(&me)
}

fn score(node: &str, key: &str) -> u64 {
    let mut bytes = Vec::with_capacity(node.len() + key.len() + 1);
    bytes.extend_from_slice(node.as_bytes());
    bytes.push(0);
    bytes.extend_from_slice(key.as_bytes());
    stable_hash(&bytes, 0x7072_6f62)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    fn backends(n: u16) -> Vec<BackendId> {
        (0..n).map(|i| ("web".to_string(), SocketAddr::from(([10, 0, 0, 1], 8000 + i)))).collect()
    }

    fn nodes(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn each_backend_gets_k_probers_and_load_spreads() {
        let live = nodes(&["a", "b", "c"]);
        let mut load = std::collections::HashMap::new();
        for b in backends(300) {
            let p = probers(&live, &b, 2);
            assert_eq!(p.len(), 2);
            p.iter().for_each(|n| *load.entry(*n).or_insert(0) += 1);
        }
        assert!(load.values().all(|l| (170..=230).contains(l)), "{load:?}");
    }

    #[test]
    fn fewer_nodes_than_k_means_all_probe() {
        let live = nodes(&["solo"]);
        assert!(assigned("solo", &live, &backends(1)[0], 2));
        assert!(assigned("anyone", &[], &backends(1)[0], 2), "no membership yet: probe everything");
    }

    #[test]
    fn losing_a_node_only_moves_its_backends() {
        let before = nodes(&["a", "b", "c", "d"]);
        let after = nodes(&["a", "b", "d"]);
        for b in backends(200) {
            let old = probers(&before, &b, 2);
            let new = probers(&after, &b, 2);
            for survivor in old.iter().filter(|n| **n != "c") {
                assert!(new.contains(survivor), "{b:?}: {old:?} -> {new:?}");
            }
        }
    }
}
