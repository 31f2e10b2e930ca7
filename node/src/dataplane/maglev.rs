//! Maglev consistent hashing (Eisenbud et al., NSDI 2016) with weights. The table depends only
//! on the backends' names and weights, so every node builds the same table from the same state.

use std::net::IpAddr;

use crate::hash::stable_hash;

/// Table size: a prime ≥ 65537 keeps disruption small and the permutation full.
pub const TABLE_SIZE: usize = 65_537;

/// [`stable_hash`] of a client address (its octets), for per-client choices.
pub fn ip_hash(ip: IpAddr, seed: u64) -> u64 {
    match ip {
        IpAddr::V4(v4) => stable_hash(&v4.octets(), seed),
        IpAddr::V6(v6) => stable_hash(&v6.octets(), seed),
    }
}

/// Builds the lookup table: entry → index into `backends` (given as `(name, weight)`).
/// Empty input gives an empty table.
pub fn build(backends: &[(&str, u32)]) -> Vec<u32> {
    if backends.is_empty() {
        return Vec::new();
    }
    let m = TABLE_SIZE as u64;
    let perms: Vec<(u64, u64)> = backends
        .iter()
        .map(|(name, _)| {
            let offset = stable_hash(name.as_bytes(), 0x5348_4f41) % m;
            let skip = stable_hash(name.as_bytes(), 0x4c4d_4147) % (m - 1) + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0u64; backends.len()];
    let mut table = vec![u32::MAX; TABLE_SIZE];
    let mut filled = 0;
    let max_weight = backends.iter().map(|(_, w)| *w).max().unwrap_or(1).max(1);
    let mut credit = vec![0u32; backends.len()];
    while filled < TABLE_SIZE {
        for (i, (_, weight)) in backends.iter().enumerate() {
            // Weighted: a backend takes a turn each time its credit reaches the largest weight.
            credit[i] += *weight;
            if credit[i] < max_weight {
                continue;
            }
            credit[i] -= max_weight;
            let (offset, skip) = perms[i];
            loop {
                let slot = ((offset + next[i] * skip) % m) as usize;
                next[i] += 1;
                if table[slot] == u32::MAX {
                    table[slot] = i as u32;
                    filled += 1;
                    break;
                }
            }
            if filled == TABLE_SIZE {
                break;
            }
        }
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.0.0.{i}:80")).collect()
    }

    fn table_for(names: &[String]) -> Vec<u32> {
        let input: Vec<(&str, u32)> = names.iter().map(|n| (n.as_str(), 1)).collect();
        build(&input)
    }

    #[test]
    fn distribution_is_even() {
        let n = names(5);
        let t = table_for(&n);
        let mut counts = [0usize; 5];
        t.iter().for_each(|i| counts[*i as usize] += 1);
        let ideal = TABLE_SIZE / 5;
        for c in counts {
            assert!(c.abs_diff(ideal) * 100 / ideal <= 2, "counts {counts:?}");
        }
    }

    #[test]
    fn weights_are_respected() {
        let t = build(&[("a:1", 1), ("b:1", 3)]);
        let b = t.iter().filter(|i| **i == 1).count();
        let share = b * 100 / TABLE_SIZE;
        assert!((73..=77).contains(&share), "b has {share}%");
    }

    #[test]
    fn removing_a_backend_moves_few_keys() {
        let all = names(10);
        let before = table_for(&all);
        let fewer: Vec<String> = all.iter().filter(|n| *n != "10.0.0.3:80").cloned().collect();
        let after = table_for(&fewer);
        let name_before = |i: usize| all[before[i] as usize].as_str();
        let name_after = |i: usize| fewer[after[i] as usize].as_str();
        let moved =
            (0..TABLE_SIZE).filter(|i| name_before(*i) != "10.0.0.3:80" && name_before(*i) != name_after(*i)).count();
        // Only the removed backend's tenth should move, plus a small Maglev overhead.
        assert!(moved * 100 / TABLE_SIZE <= 3, "{moved} of the surviving keys moved");
    }

    #[test]
    fn deterministic() {
        let n = names(7);
        assert_eq!(table_for(&n), table_for(&n));
    }
}
