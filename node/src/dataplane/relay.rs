//! Full-duplex byte relay between a client and a backend: each direction copies until EOF
//! and then half-closes the other side, so either peer may finish first; an optional idle
//! timeout ends connections silent in both directions.

use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

/// Per-direction buffer: small for chatty or idle connections, grown for bulk transfers.
pub(super) const BUF_START: usize = 4 * 1024;
pub(super) const BUF_MAX: usize = 64 * 1024;

/// Quadruples the buffer (up to the maximum) after a read filled it.
pub(super) fn grow(buf: &mut Vec<u8>, filled: usize) {
    if filled == buf.len() && buf.len() < BUF_MAX {
        buf.resize((buf.len() * 4).min(BUF_MAX), 0);
    }
}

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

/// Relays until both directions are done, an error, or the idle timeout.
pub async fn relay<C, B>(client: C, backend: B, idle: Option<Duration>) -> (Moved, Ended)
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (mut cr, mut cw) = tokio::io::split(client);
    let (mut br, mut bw) = tokio::io::split(backend);
    let meter = Meter::new();
    let both = async {
        tokio::try_join!(pipe(&mut cr, &mut bw, &meter, Dir::Up), pipe(&mut br, &mut cw, &meter, Dir::Down)).map(|_| ())
    };
    meter.run(both, idle).await
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

async fn pipe<R, W>(r: &mut R, w: &mut W, meter: &Meter, dir: Dir) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUF_START];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            // Half-close: the peer may still answer on the other direction.
            let _ = w.shutdown().await;
            return Ok(());
        }
        w.write_all(&buf[..n]).await?;
        grow(&mut buf, n);
        meter.moved(dir, n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn relays_both_ways_and_half_closes() {
        let (client, mut client_peer) = tokio::io::duplex(1024);
        let (backend, mut backend_peer) = tokio::io::duplex(1024);
        let task = tokio::spawn(relay(client, backend, None));
        client_peer.write_all(b"hello").await.expect("write");
        let mut buf = [0u8; 5];
        backend_peer.read_exact(&mut buf).await.expect("read");
        assert_eq!(&buf, b"hello");
        client_peer.shutdown().await.expect("half close");
        backend_peer.write_all(b"bye!!!").await.expect("answer after half close");
        backend_peer.shutdown().await.expect("close");
        let mut rest = Vec::new();
        client_peer.read_to_end(&mut rest).await.expect("read rest");
        assert_eq!(rest, b"bye!!!");
        let (moved, ended) = task.await.expect("join");
        assert_eq!(moved, Moved { up: 5, down: 6 });
        assert!(matches!(ended, Ended::Closed));
    }

    #[tokio::test(start_paused = true)]
    async fn idle_timeout_ends_silent_connections() {
        let (client, _c) = tokio::io::duplex(64);
        let (backend, _b) = tokio::io::duplex(64);
        let (_, ended) = relay(client, backend, Some(Duration::from_secs(5))).await;
        assert!(matches!(ended, Ended::Idle));
    }
}
