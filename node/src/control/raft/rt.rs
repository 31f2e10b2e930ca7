//! openraft's async runtime for shoal: tokio, exactly as `openraft::TokioRuntime`, except that
//! the random election timeout can be drawn from a seed. Production never seeds it (every draw
//! comes from the OS); the deterministic simulation (`sim/`) seeds it per thread so that a run
//! replays exactly.

use std::cell::Cell;
use std::future::Future;
use std::time::Duration;

use openraft::{AsyncRuntime, OptionalSend, TokioRuntime};
use rand08::SeedableRng;
use rand08::rngs::StdRng;

type Tokio = TokioRuntime;

thread_local! {
    /// `(seed, draws so far)` while a simulation runs on this thread.
    static SEED: Cell<Option<(u64, u64)>> = const { Cell::new(None) };
}

/// Makes every later election-timeout draw on this thread a function of `seed`.
pub fn seed(seed: u64) {
    SEED.with(|s| s.set(Some((seed, 0))));
}

/// Back to OS randomness on this thread.
pub fn unseed() {
    SEED.with(|s| s.set(None));
}

/// SplitMix64: spreads `(seed, draw)` into independent-looking generator seeds.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// tokio, with a seedable `thread_rng`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ShoalRt;

impl AsyncRuntime for ShoalRt {
    type JoinError = <Tokio as AsyncRuntime>::JoinError;
    type JoinHandle<T: OptionalSend + 'static> = <Tokio as AsyncRuntime>::JoinHandle<T>;
    type Sleep = <Tokio as AsyncRuntime>::Sleep;
    type Instant = <Tokio as AsyncRuntime>::Instant;
    type TimeoutError = <Tokio as AsyncRuntime>::TimeoutError;
    type Timeout<R, T: Future<Output = R> + OptionalSend> = <Tokio as AsyncRuntime>::Timeout<R, T>;
    type ThreadLocalRng = StdRng;
    type OneshotSender<T: OptionalSend> = <Tokio as AsyncRuntime>::OneshotSender<T>;
    type OneshotReceiverError = <Tokio as AsyncRuntime>::OneshotReceiverError;
    type OneshotReceiver<T: OptionalSend> = <Tokio as AsyncRuntime>::OneshotReceiver<T>;

    fn spawn<T>(future: T) -> Self::JoinHandle<T::Output>
    where
        T: Future + OptionalSend + 'static,
        T::Output: OptionalSend + 'static,
    {
        Tokio::spawn(future)
    }

    fn sleep(duration: Duration) -> Self::Sleep {
        Tokio::sleep(duration)
    }

    fn sleep_until(deadline: Self::Instant) -> Self::Sleep {
        Tokio::sleep_until(deadline)
    }

    fn timeout<R, F: Future<Output = R> + OptionalSend>(duration: Duration, future: F) -> Self::Timeout<R, F> {
        Tokio::timeout(duration, future)
    }

    fn timeout_at<R, F: Future<Output = R> + OptionalSend>(deadline: Self::Instant, future: F) -> Self::Timeout<R, F> {
        Tokio::timeout_at(deadline, future)
    }

    fn is_panic(join_error: &Self::JoinError) -> bool {
        Tokio::is_panic(join_error)
    }

    fn thread_rng() -> Self::ThreadLocalRng {
        match SEED.with(|s| s.get()) {
            Some((seed, draws)) => {
                SEED.with(|s| s.set(Some((seed, draws + 1))));
                StdRng::seed_from_u64(mix(seed ^ mix(draws)))
            }
            None => StdRng::from_entropy(),
        }
    }

    fn oneshot<T>() -> (Self::OneshotSender<T>, Self::OneshotReceiver<T>)
    where
        T: OptionalSend,
    {
        Tokio::oneshot()
    }
}

#[cfg(test)]
mod tests {
    use rand08::Rng;

    use super::*;

    #[test]
    fn seeded_draws_repeat_and_unseeded_draws_vary() {
        let draw = || ShoalRt::thread_rng().gen_range(800u64..1600);
        seed(7);
        let first: Vec<u64> = (0..4).map(|_| draw()).collect();
        seed(7);
        let again: Vec<u64> = (0..4).map(|_| draw()).collect();
        assert_eq!(first, again);
        unseed();
        let free: Vec<u64> = (0..8).map(|_| ShoalRt::thread_rng().r#gen::<u64>()).collect();
        assert!(free.windows(2).any(|w| w[0] != w[1]));
    }
}
