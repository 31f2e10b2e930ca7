//! A worker's client connections: its `max_connections` permits and its open count, both
//! given back by a connection's [`Slot`] when it ends. The open counts are the drain signal:
//! [`drained`] is woken by the close that leaves a worker with none, it never polls.
//!
//! The count is kept beside the permits rather than derived from them, or from the
//! listeners' `connections_active` gauges: an accept loop holds a permit while it waits in
//! `accept` and a stopping worker takes them all, and a gauge is a metric (a Prometheus
//! `dec` tells nothing about reaching zero). Counting costs one uncontended atomic op per
//! open and per close, on the worker's own cache line.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering, fence};

use tokio::sync::{Notify, Semaphore, SemaphorePermit};

/// Set in a count once anyone waits for the data plane to drain: only then does a close
/// that reaches zero wake the waiters. It stays set (a drain ends the data plane).
const DRAINING: usize = 1 << (usize::BITS - 1);

/// One worker's connection slots, aligned so that workers' counts never share a cache line.
#[repr(align(128))]
pub(super) struct Slots {
    /// `max_connections` permits; an accept loop holds one while accepting.
    pub permits: Semaphore,
    /// Open client connections, with [`DRAINING`] set once a drain waits. Kept, not derived
    /// from `permits` or the listeners' gauges: see the module docs.
    open: AtomicUsize,
    /// Shared by every worker's slots: woken by a close that reaches zero while draining.
    drained: Arc<Notify>,
}

impl Slots {
    pub fn new(max_connections: usize, drained: Arc<Notify>) -> Slots {
        Slots { permits: Semaphore::new(max_connections), open: AtomicUsize::new(0), drained }
    }

    /// Client connections open on this worker.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed) & !DRAINING
    }

    /// Marks the count as watched and returns it. A read-modify-write always reads the
    /// latest count, and its release pairs with the acquire fence in `close`.
    fn watch(&self) -> usize {
        self.open.fetch_or(DRAINING, Ordering::AcqRel) & !DRAINING
    }

    fn close(&self) {
        self.permits.add_permits(1);
        if self.open.fetch_sub(1, Ordering::Relaxed) == DRAINING | 1 {
            // Whoever set DRAINING registered for a wake-up before: make that visible.
            fence(Ordering::Acquire);
            self.drained.notify_waiters();
        }
    }
}

/// A client connection's place: its permit and its count, given back when it is dropped.
pub(super) struct Slot(Arc<Slots>);

impl Slot {
    /// Counts the connection accepted with `permit` (taken from `slots`).
    pub fn open(slots: &Arc<Slots>, permit: SemaphorePermit<'_>) -> Slot {
        permit.forget();
        slots.open.fetch_add(1, Ordering::Relaxed);
        Slot(slots.clone())
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// Client connections open on every worker.
pub(super) fn open(workers: &[Arc<Slots>]) -> usize {
    workers.iter().map(|s| s.open()).sum()
}

/// Resolves once no worker has a connection open; `notify` is the one the slots share.
pub(super) async fn drained(workers: &[Arc<Slots>], notify: &Notify) {
    loop {
        // Registered before the counts are looked at, so a close right after is not missed.
        let mut woken = std::pin::pin!(notify.notified());
        woken.as_mut().enable();
        if workers.iter().map(|s| s.watch()).sum::<usize>() == 0 {
            return;
        }
        woken.await;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures_util::FutureExt;

    use super::*;

    fn workers(n: usize) -> (Vec<Arc<Slots>>, Arc<Notify>) {
        let notify = Arc::new(Notify::new());
        ((0..n).map(|_| Arc::new(Slots::new(4, notify.clone()))).collect(), notify)
    }

    fn open_one(slots: &Arc<Slots>) -> Slot {
        Slot::open(slots, slots.permits.try_acquire().expect("a free permit"))
    }

    #[test]
    fn drained_resolves_at_once_with_nothing_open() {
        let (w, notify) = workers(2);
        assert_eq!(drained(&w, &notify).now_or_never(), Some(()));
        // Again, with DRAINING already set.
        assert_eq!(drained(&w, &notify).now_or_never(), Some(()));
    }

    #[test]
    fn a_slot_holds_a_permit_and_a_count_until_dropped() {
        let (w, _) = workers(1);
        let slot = open_one(&w[0]);
        assert_eq!((w[0].open(), w[0].permits.available_permits()), (1, 3));
        drop(slot);
        assert_eq!((w[0].open(), w[0].permits.available_permits()), (0, 4));
    }

    #[tokio::test]
    async fn drained_resolves_when_the_last_connection_closes_and_not_before() {
        let (w, notify) = workers(2);
        let (a, b, c) = (open_one(&w[0]), open_one(&w[0]), open_one(&w[1]));
        let mut drain = std::pin::pin!(drained(&w, &notify));
        assert!(drain.as_mut().now_or_never().is_none());
        assert_eq!(open(&w), 3);
        drop(a);
        drop(c);
        assert!(drain.as_mut().now_or_never().is_none(), "one connection is still open");
        let closer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            drop(b);
        });
        tokio::time::timeout(Duration::from_secs(5), drain).await.expect("woken by the last close");
        assert_eq!(open(&w), 0);
        closer.join().expect("closer");
    }

    #[tokio::test]
    async fn no_wake_up_is_lost_when_closes_race_the_drain() {
        for _ in 0..200 {
            let (w, notify) = workers(2);
            let slots: Vec<Slot> = w.iter().map(open_one).collect();
            let closers: Vec<_> = slots.into_iter().map(|s| std::thread::spawn(move || drop(s))).collect();
            tokio::time::timeout(Duration::from_secs(5), drained(&w, &notify)).await.expect("drained");
            closers.into_iter().for_each(|t| t.join().expect("closer"));
        }
    }
}
