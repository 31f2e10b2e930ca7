//! This process's wall clock: `SystemTime::now()` plus a process-wide signed offset.
//!
//! Every wall-clock read of shoal that decides something goes through [`wall_now`] or
//! [`unix_ms`]: gossip stamps and their freshness check (`control::gossip_auth`), the gossip
//! generation (`control::gossip`) and certificate validity on the Raft channel
//! (`control::raft::channel`). Timers and timeouts use tokio's monotonic clock and are not
//! affected. The data plane's TLS (HTTPS listeners, TLS to backends) keeps the system clock.
//!
//! The offset is zero unless the fault-injection endpoint changes it: `PUT /v1/debug/clock`,
//! served only by a node started with `--fault-injection` (chaos tests). Containers share the
//! host kernel's clock and the image is a static binary, so a jump of one node's clock has to
//! be made inside shoal; nothing else sets the offset.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Largest offset accepted, either way (a day: far beyond any skew worth testing, and far
/// from `SystemTime`'s limits).
pub const MAX_OFFSET_MS: i64 = 86_400_000;

/// Milliseconds added to the system clock (negative: this node's clock is behind).
static OFFSET_MS: AtomicI64 = AtomicI64::new(0);

/// The offset in force, in milliseconds.
pub fn offset_ms() -> i64 {
    OFFSET_MS.load(Ordering::Relaxed)
}

/// Why an offset was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("offset_ms must be within ±{MAX_OFFSET_MS} (one day), not {0}")]
pub struct OutOfRange(pub i64);

/// Sets the offset (only the fault-injection endpoint and `--fault-injection`'s startup
/// offset call this).
pub fn set_offset_ms(ms: i64) -> Result<(), OutOfRange> {
    if ms.unsigned_abs() > MAX_OFFSET_MS as u64 {
        return Err(OutOfRange(ms));
    }
    OFFSET_MS.store(ms, Ordering::Relaxed);
    Ok(())
}

/// `now` moved by `offset_ms` (saturating at the epoch and at `SystemTime`'s limits).
pub fn shifted(now: SystemTime, offset_ms: i64) -> SystemTime {
    let by = Duration::from_millis(offset_ms.unsigned_abs());
    if offset_ms >= 0 {
        now.checked_add(by).unwrap_or(now)
    } else {
        now.checked_sub(by).unwrap_or(UNIX_EPOCH).max(UNIX_EPOCH)
    }
}

/// The wall clock as shoal sees it.
#[allow(clippy::disallowed_methods)] // the one read of the system clock
pub fn wall_now() -> SystemTime {
    shifted(SystemTime::now(), offset_ms())
}

/// [`wall_now`] in milliseconds since the Unix epoch (0 before it).
pub fn unix_ms() -> u64 {
    wall_now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// [`wall_now`] in microseconds since the Unix epoch (0 before it).
pub fn unix_us() -> u64 {
    wall_now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

/// [`wall_now`] for rustls, so certificate validity on the Raft channel follows the offset.
#[derive(Debug)]
pub struct WallTime;

impl rustls::time_provider::TimeProvider for WallTime {
    fn current_time(&self) -> Option<rustls::pki_types::UnixTime> {
        Some(rustls::pki_types::UnixTime::since_unix_epoch(wall_now().duration_since(UNIX_EPOCH).ok()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shifting_moves_both_ways_and_saturates() {
        let t = UNIX_EPOCH + Duration::from_secs(1_000);
        assert_eq!(shifted(t, 90_000), t + Duration::from_secs(90));
        assert_eq!(shifted(t, -90_000), t - Duration::from_secs(90));
        assert_eq!(shifted(t, 0), t);
        assert_eq!(shifted(t, -2_000_000), UNIX_EPOCH, "never before the epoch");
    }

    #[test]
    fn offsets_beyond_a_day_are_refused() {
        // Only refusals here: a test must not move the clock of the other tests in this process.
        assert_eq!(set_offset_ms(MAX_OFFSET_MS + 1), Err(OutOfRange(MAX_OFFSET_MS + 1)));
        assert_eq!(set_offset_ms(i64::MIN), Err(OutOfRange(i64::MIN)));
        assert_eq!(offset_ms(), 0);
    }
}
