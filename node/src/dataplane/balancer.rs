//! Backend selection. Every balancer is precomputed when the routing table is built and picks
//! without locks: a schedule walked by an atomic counter (weighted round robin), a scan of
//! atomic in-flight counters (least connections, power of two choices), or a Maglev table.
//! Balancers see backends only as [`Candidate`]s: routing implements it for its backends, so
//! routing depends on this module and not the other way round.

use std::cell::Cell;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use shoal_proto::Algorithm;

use super::maglev;

/// What a balancer reads of a backend.
pub trait Candidate {
    /// The backend's name in state (`ip:port`): Maglev tables hash it.
    fn key(&self) -> &str;
    fn weight(&self) -> u32;
    /// Connections or requests in flight on this node.
    fn load(&self) -> u64;
}

impl<T: Candidate> Candidate for Arc<T> {
    fn key(&self) -> &str {
        (**self).key()
    }

    fn weight(&self) -> u32 {
        (**self).weight()
    }

    fn load(&self) -> u64 {
        (**self).load()
    }
}

/// A pool's balancer over its routable backends.
#[derive(Debug)]
pub enum Balancer {
    RoundRobin { schedule: Vec<u32>, next: Arc<AtomicUsize> },
    LeastConn { next: Arc<AtomicUsize> },
    P2c,
    Maglev { table: Vec<u32> },
}

impl Balancer {
    /// Precomputes the balancer for `backends`; `next` carries the rotation across rebuilds.
    pub fn new<B: Candidate>(algorithm: Algorithm, backends: &[B], next: Arc<AtomicUsize>) -> Balancer {
        match algorithm {
            Algorithm::RoundRobin => Balancer::RoundRobin { schedule: smooth_wrr(backends), next },
            Algorithm::LeastConn => Balancer::LeastConn { next },
            Algorithm::P2c => Balancer::P2c,
            Algorithm::Maglev => {
                let names: Vec<(&str, u32)> = backends.iter().map(|b| (b.key(), b.weight())).collect();
                Balancer::Maglev { table: maglev::build(&names) }
            }
        }
    }

    /// Picks a backend index not rejected by `skip` (backends already tried for this client).
    pub fn pick<B: Candidate>(&self, backends: &[B], client: IpAddr, skip: &dyn Fn(usize) -> bool) -> Option<usize> {
        if backends.is_empty() {
            return None;
        }
        match self {
            Balancer::RoundRobin { schedule, next } => pick_schedule(schedule, next, skip),
            Balancer::LeastConn { next } => {
                let start = next.fetch_add(1, Ordering::Relaxed);
                least_loaded((0..backends.len()).map(|i| (start + i) % backends.len()), backends, skip)
            }
            Balancer::P2c => pick_p2c(backends, skip),
            Balancer::Maglev { table } => pick_maglev(table, client, skip),
        }
    }
}

fn pick_schedule(schedule: &[u32], next: &AtomicUsize, skip: &dyn Fn(usize) -> bool) -> Option<usize> {
    let start = next.fetch_add(1, Ordering::Relaxed);
    (0..schedule.len()).map(|i| schedule[(start + i) % schedule.len()] as usize).find(|i| !skip(*i))
}

/// The least loaded candidate, comparing `active / weight` without division.
fn least_loaded<B: Candidate>(
    order: impl Iterator<Item = usize>,
    backends: &[B],
    skip: &dyn Fn(usize) -> bool,
) -> Option<usize> {
    let mut best: Option<(usize, u64, u64)> = None;
    for i in order.filter(|i| !skip(*i)) {
        let b = &backends[i];
        let (load, weight) = (b.load(), u64::from(b.weight()));
        match best {
            Some((_, bl, bw)) if load * bw >= bl * weight => {}
            _ => best = Some((i, load, weight)),
        }
    }
    best.map(|(i, _, _)| i)
}

fn pick_p2c<B: Candidate>(backends: &[B], skip: &dyn Fn(usize) -> bool) -> Option<usize> {
    let n = backends.len();
    let a = fast_random(n);
    let b = (a + 1 + fast_random(n.max(2) - 1)) % n;
    match least_loaded([a, b].into_iter(), backends, skip) {
        Some(i) => Some(i),
        None => least_loaded(0..n, backends, skip),
    }
}

fn pick_maglev(table: &[u32], client: IpAddr, skip: &dyn Fn(usize) -> bool) -> Option<usize> {
    if table.is_empty() {
        return None;
    }
    let key = maglev::ip_hash(client, 0);
    let start = (key % table.len() as u64) as usize;
    // Walking the table from the key's slot gives a stable fallback order per client.
    (0..table.len()).map(|i| table[(start + i) % table.len()] as usize).find(|i| !skip(*i))
}

/// Smooth weighted round robin (as nginx): an interleaved schedule of `sum(weight / gcd)` turns.
fn smooth_wrr<B: Candidate>(backends: &[B]) -> Vec<u32> {
    let weights: Vec<i64> = backends.iter().map(|b| i64::from(b.weight().max(1))).collect();
    let g = weights.iter().copied().fold(0, gcd).max(1);
    let weights: Vec<i64> = weights.iter().map(|w| w / g).collect();
    let total: i64 = weights.iter().sum();
    let mut current = vec![0i64; weights.len()];
    let mut schedule = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for (i, w) in weights.iter().enumerate() {
            current[i] += w;
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        schedule.push(best as u32);
    }
    schedule
}

fn gcd(a: i64, b: i64) -> i64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

thread_local! {
    static RNG: Cell<u64> = Cell::new(seed());
}

#[allow(clippy::disallowed_methods)] // only a seed: any clock will do
fn seed() -> u64 {
    let addr = &RNG as *const _ as u64;
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1);
    (addr ^ nanos) | 1
}

/// xorshift64*: a few cycles per draw; fairness is all p2c needs.
pub(crate) fn fast_random(n: usize) -> usize {
    RNG.with(|c| {
        let mut x = c.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        c.set(x);
        (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 32) as usize % n.max(1)
    })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;

    use super::*;

    struct Fake {
        key: String,
        weight: u32,
        load: AtomicU64,
    }

    impl Candidate for Fake {
        fn key(&self) -> &str {
            &self.key
        }

        fn weight(&self) -> u32 {
            self.weight
        }

        fn load(&self) -> u64 {
            self.load.load(Ordering::Relaxed)
        }
    }

    fn backends(weights: &[u32]) -> Vec<Arc<Fake>> {
        let fake = |(i, w): (usize, &u32)| Fake { key: format!("10.0.0.{i}:80"), weight: *w, load: AtomicU64::new(0) };
        weights.iter().enumerate().map(fake).map(Arc::new).collect()
    }

    fn busy(b: &Fake, n: u64) {
        b.load.fetch_add(n, Ordering::Relaxed);
    }

    fn counts(bal: &Balancer, bs: &[Arc<Fake>], n: usize) -> Vec<usize> {
        let mut c = vec![0; bs.len()];
        for i in 0..n {
            let ip = IpAddr::from([192, 168, (i / 256) as u8, i as u8]);
            c[bal.pick(bs, ip, &|_| false).expect("pick")] += 1;
        }
        c
    }

    #[test]
    fn weighted_round_robin_is_exact_and_smooth() {
        let bs = backends(&[5, 1, 1]);
        let bal = Balancer::new(Algorithm::RoundRobin, &bs, Arc::default());
        assert_eq!(counts(&bal, &bs, 700), vec![500, 100, 100]);
        if let Balancer::RoundRobin { schedule, .. } = &bal {
            assert_eq!(schedule, &vec![0, 0, 1, 0, 2, 0, 0], "nginx's smooth order");
        }
    }

    #[test]
    fn round_robin_alternates_two_backends() {
        let bs = backends(&[1, 1]);
        let bal = Balancer::new(Algorithm::RoundRobin, &bs, Arc::default());
        let picks: Vec<usize> =
            (0..4).map(|_| bal.pick(&bs, IpAddr::from([1, 1, 1, 1]), &|_| false).expect("pick")).collect();
        assert_eq!(picks, vec![0, 1, 0, 1]);
    }

    #[test]
    fn skip_moves_to_the_next_backend() {
        let bs = backends(&[1, 1, 1]);
        for alg in [Algorithm::RoundRobin, Algorithm::LeastConn, Algorithm::P2c, Algorithm::Maglev] {
            let bal = Balancer::new(alg, &bs, Arc::default());
            for _ in 0..20 {
                let i = bal.pick(&bs, IpAddr::from([1, 2, 3, 4]), &|i| i != 2).expect("pick");
                assert_eq!(i, 2, "{alg:?}");
            }
            assert_eq!(bal.pick(&bs, IpAddr::from([1, 2, 3, 4]), &|_| true), None, "{alg:?}");
        }
    }

    #[test]
    fn least_conn_prefers_idle_backends() {
        let bs = backends(&[1, 1, 1]);
        busy(&bs[0], 2);
        busy(&bs[2], 1);
        let bal = Balancer::new(Algorithm::LeastConn, &bs, Arc::default());
        for _ in 0..10 {
            assert_eq!(bal.pick(&bs, IpAddr::from([1, 1, 1, 1]), &|_| false), Some(1));
        }
    }

    #[test]
    fn p2c_avoids_the_loaded_backend() {
        let bs = backends(&[1, 1]);
        busy(&bs[0], 5);
        let bal = Balancer::new(Algorithm::P2c, &bs, Arc::default());
        assert_eq!(counts(&bal, &bs, 100), vec![0, 100]);
        let bs = backends(&[1, 1, 1, 1]);
        let c = counts(&Balancer::new(Algorithm::P2c, &bs, Arc::default()), &bs, 4000);
        assert!(c.iter().all(|n| *n > 700), "{c:?}");
    }

    #[test]
    fn maglev_is_sticky_per_client() {
        let bs = backends(&[1, 1, 1, 1]);
        let bal = Balancer::new(Algorithm::Maglev, &bs, Arc::default());
        let ip = IpAddr::from([172, 16, 0, 9]);
        let first = bal.pick(&bs, ip, &|_| false);
        assert!((0..50).all(|_| bal.pick(&bs, ip, &|_| false) == first));
        let c = counts(&bal, &bs, 4000);
        assert!(c.iter().all(|n| *n > 800), "{c:?}");
    }
}
