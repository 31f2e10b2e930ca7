//! Rate-limited logging for events a stranger can trigger at will (failed handshakes, refused
//! datagrams): at most one line per period, carrying how many were suppressed since the last,
//! so a flood can neither fill the disk nor hide that it happened.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Decides which occurrences of one event get a log line.
pub struct LogLimiter {
    every: Duration,
    /// When the last line was allowed, and occurrences suppressed since.
    state: Mutex<Option<(Instant, u64)>>,
}

impl LogLimiter {
    pub const fn new(every: Duration) -> LogLimiter {
        LogLimiter { every, state: Mutex::new(None) }
    }

    /// `Some(suppressed)` when this occurrence should be logged (with the number suppressed
    /// since the previous line), `None` when it is suppressed.
    pub fn allow(&self) -> Option<u64> {
        let now = Instant::now();
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match state.as_mut() {
            Some((when, n)) if now.duration_since(*when) < self.every => {
                *n += 1;
                None
            }
            Some((when, n)) => {
                let suppressed = *n;
                (*when, *n) = (now, 0);
                Some(suppressed)
            }
            None => {
                *state = Some((now, 0));
                Some(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn one_line_per_period_with_the_count_suppressed() {
        let l = LogLimiter::new(Duration::from_secs(10));
        assert_eq!(l.allow(), Some(0));
        for _ in 0..5 {
            assert_eq!(l.allow(), None);
        }
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(l.allow(), Some(5), "the next line says how many were hidden");
        assert_eq!(l.allow(), None);
    }
}
