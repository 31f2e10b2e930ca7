//! What the two relays (`splice` for L4, `h1::tunnel` for upgraded HTTP) share: bytes moved
//! each way, how a relay ended, and the meter whose idle timeout ends connections silent in
//! both directions.

use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// Bytes moved each way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Moved {
    /// Client to backend.
    pub up: u64,
    /// Backend to client.
    pub down: u64,
}

/// How a relay ended.
#[derive(Debug)]
pub enum Ended {
    /// Both sides closed.
    Closed,
    /// Nothing moved for the idle timeout.
    Idle,
    Error(io::Error),
}

/// Which way bytes go.
#[derive(Clone, Copy, Debug)]
pub(super) enum Dir {
    /// Client to backend.
    Up,
    /// Backend to client.
    Down,
}

/// What the two directions of one relay share: their byte counts and the time of the last
/// progress either made, which the idle timeout watches.
pub(super) struct Meter {
    start: Instant,
    /// Milliseconds after `start`.
    last: AtomicU64,
    up: AtomicU64,
    down: AtomicU64,
}

impl Meter {
    pub(super) fn new() -> Meter {
        Meter { start: Instant::now(), last: AtomicU64::new(0), up: AtomicU64::new(0), down: AtomicU64::new(0) }
    }

    /// Records `n` bytes delivered in direction `dir`.
    pub(super) fn moved(&self, dir: Dir, n: usize) {
        let count = match dir {
            Dir::Up => &self.up,
            Dir::Down => &self.down,
        };
        count.fetch_add(n as u64, Ordering::Relaxed);
        self.last.store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Drives `both` directions to their end, or stops them at the idle timeout.
    pub(super) async fn run(
        &self,
        both: impl Future<Output = io::Result<()>>,
        idle: Option<Duration>,
    ) -> (Moved, Ended) {
        let ended = tokio::select! {
            r = both => match r { Ok(()) => Ended::Closed, Err(e) => Ended::Error(e) },
            _ = self.idle(idle) => Ended::Idle,
        };
        (Moved { up: self.up.load(Ordering::Relaxed), down: self.down.load(Ordering::Relaxed) }, ended)
    }

    /// Resolves once nothing moved for `idle`; never without a timeout.
    async fn idle(&self, idle: Option<Duration>) {
        let Some(idle) = idle else { return std::future::pending().await };
        loop {
            let deadline = self.start + Duration::from_millis(self.last.load(Ordering::Relaxed)) + idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn idle_timeout_ends_silent_connections() {
        let meter = Meter::new();
        let (_, ended) = meter.run(std::future::pending(), Some(Duration::from_secs(5))).await;
        assert!(matches!(ended, Ended::Idle));
    }
}
