//! Idle keep-alive connections to one backend, one LIFO list per data-plane worker so a
//! connection is only ever used on the runtime that registered its socket. No task watches an
//! idle connection (that would cost a task per connection): it is checked when taken (from the
//! runtime's readiness while it was idle briefly, else with a non-blocking peek), and too old
//! ones are dropped.

use std::cell::Cell;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::h1::io::Upstream;

/// Idle connections kept per backend and worker.
const MAX_IDLE: usize = 128;
/// An idle connection older than this is closed rather than reused.
const IDLE_TTL: Duration = Duration::from_secs(60);
/// A connection idle for less than this that the runtime has not seen readable is taken
/// without a peek (a system call on every request otherwise); one that closed unseen is
/// caught by the exchange, which replays a request it still holds whole on a fresh connection.
const PEEK_AFTER: Duration = Duration::from_secs(1);

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
            let idle_for = now.duration_since(c.since);
            if idle_for < IDLE_TTL && ((idle_for < PEEK_AFTER && c.conn.quiet()) || c.conn.idle_alive()) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::h1::buf::Buf;
    use crate::dataplane::h1::io;
    use tokio::io::AsyncWriteExt;
    use tokio::net::{TcpListener, TcpStream};

    /// A connection to a loopback peer, after reading the peer's `hello` as an exchange would.
    async fn pair(hello: &[u8]) -> (Upstream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let conn = TcpStream::connect(listener.local_addr().expect("addr")).await.expect("connect");
        let (mut peer, _) = listener.accept().await.expect("accept");
        peer.write_all(hello).await.expect("write");
        let mut conn = Upstream::Tcp(conn);
        let mut buf: Option<Buf> = None;
        let n = io::read(&mut conn, &mut buf).await.expect("read");
        assert_eq!(n, hello.len());
        (conn, peer)
    }

    /// Lets the runtime's driver take in what the peer did.
    async fn settle() {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    #[tokio::test]
    async fn a_drained_connection_is_quiet_until_its_peer_speaks_or_closes() {
        let (conn, mut peer) = pair(b"HTTP/1.1 200 OK\r\n\r\n").await;
        settle().await;
        assert!(conn.quiet(), "a short read left the socket drained");
        peer.write_all(b"x").await.expect("write");
        settle().await;
        assert!(!conn.quiet() && !conn.idle_alive());
        let (conn, peer) = pair(b"ok").await;
        drop(peer);
        settle().await;
        assert!(!conn.quiet() && !conn.idle_alive());
    }

    #[tokio::test]
    async fn closed_or_talking_connections_are_not_taken() {
        let pool = ConnPool::new(1);
        let (live, _live_peer) = pair(b"ok").await;
        let (closed, closed_peer) = pair(b"ok").await;
        let (talking, mut talking_peer) = pair(b"ok").await;
        pool.put(live);
        pool.put(closed);
        pool.put(talking);
        drop(closed_peer);
        talking_peer.write_all(b"HTTP/1.1 408 Request Timeout\r\n\r\n").await.expect("write");
        settle().await;
        assert!(pool.take().is_some(), "the live connection");
        assert!(pool.take().is_none(), "the other two were dropped");
    }
}
