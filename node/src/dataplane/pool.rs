//! Idle keep-alive connections to one backend, one LIFO list per data-plane worker so a
//! connection is only ever used on the runtime that registered its socket. No task watches an
//! idle connection (that would cost a task per connection): it is checked with a non-blocking
//! read when taken, and too old ones are dropped.

use std::cell::Cell;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::h1::io::Upstream;

/// Idle connections kept per backend and worker.
const MAX_IDLE: usize = 128;
/// An idle connection older than this is closed rather than reused.
const IDLE_TTL: Duration = Duration::from_secs(60);

thread_local! {
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

/// Records which worker the current thread is (set once by each worker thread).
pub fn set_worker(id: usize) {
    WORKER.with(|w| w.set(id));
}

fn worker() -> usize {
    WORKER.with(Cell::get)
}

struct Idle {
    conn: Upstream,
    since: Instant,
}

/// Per-worker lists of idle connections.
#[derive(Default)]
pub struct ConnPool {
    lists: Box<[Mutex<Vec<Idle>>]>,
}

impl std::fmt::Debug for ConnPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnPool").field("workers", &self.lists.len()).finish()
    }
}

impl ConnPool {
    pub fn new(workers: usize) -> ConnPool {
        ConnPool { lists: (0..workers.max(1)).map(|_| Mutex::new(Vec::new())).collect() }
    }

    fn list(&self) -> Option<&Mutex<Vec<Idle>>> {
        self.lists.get(worker())
    }

    /// The most recently used live connection of this worker, if any.
    pub fn take(&self) -> Option<Upstream> {
        let list = self.list()?;
        let mut idle = list.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        while let Some(c) = idle.pop() {
            if now.duration_since(c.since) < IDLE_TTL && c.conn.idle_alive() {
                return Some(c.conn);
            }
        }
        None
    }

    /// Returns a connection whose last exchange completed cleanly in both directions.
    pub fn put(&self, conn: Upstream) {
        let Some(list) = self.list() else { return };
        let mut idle = list.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() >= MAX_IDLE {
            idle.remove(0);
        }
        idle.push(Idle { conn, since: Instant::now() });
    }

    /// Closes every idle connection (backend removed or drained).
    pub fn clear(&self) {
        for list in self.lists.iter() {
            list.lock().unwrap_or_else(|e| e.into_inner()).clear();
        }
    }
}
