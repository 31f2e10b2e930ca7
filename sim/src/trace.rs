//! The ordered event log of one run and its hash. Events carry virtual time only (never wall
//! clock), so two runs of one seed must hash alike: determinism is checked, not assumed.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::time::Instant;

/// How many recent events a failure report shows.
const TAIL: usize = 200;

/// Shared by the network, the clients and the world.
#[derive(Clone)]
pub struct Trace(Arc<Mutex<Inner>>);

struct Inner {
    start: Instant,
    hash: u64,
    events: u64,
    tail: VecDeque<String>,
    verbose: bool,
}

impl Trace {
    pub fn new(verbose: bool) -> Trace {
        let inner =
            Inner { start: Instant::now(), hash: 0xcbf2_9ce4_8422_2325, events: 0, tail: VecDeque::new(), verbose };
        Trace(Arc::new(Mutex::new(inner)))
    }

    /// Virtual milliseconds since the run started.
    pub fn now_ms(&self) -> u64 {
        let start = self.lock().start;
        Instant::now().duration_since(start).as_millis() as u64
    }

    /// Appends one event (FNV-1a over its text, stamped with virtual time).
    pub fn event(&self, what: impl AsRef<str>) {
        let ms = self.now_ms();
        let line = format!("{ms:>7} {}", what.as_ref());
        let mut t = self.lock();
        for b in line.bytes().chain([b'\n']) {
            t.hash = (t.hash ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
        t.events += 1;
        if t.verbose {
            eprintln!("{line}");
        }
        if t.tail.len() == TAIL {
            t.tail.pop_front();
        }
        t.tail.push_back(line);
    }

    pub fn hash(&self) -> u64 {
        self.lock().hash
    }

    pub fn events(&self) -> u64 {
        self.lock().events
    }

    pub fn tail(&self) -> Vec<String> {
        self.lock().tail.iter().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// SplitMix64: every random decision is a pure function of the seed and a few counters, so
/// turning one fault class off does not shift the others.
pub fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
