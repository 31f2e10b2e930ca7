//! Full-duplex byte relay between a client and a backend: each direction copies until EOF
//! and then half-closes the other side, so either peer may finish first; an optional idle
//! timeout ends connections silent in both directions.

use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use super::wsframe::{FrameTracker, GOING_AWAY, close_frame};
use crate::shutdown::{Phase, Shutdown};

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

/// Relays an upgraded WebSocket connection like [`relay`], and when the node reaches its
/// `Stopped` phase ends each direction at the next frame boundary with a close frame 1001
/// (going away) instead of a reset: unmasked towards the client, masked towards the backend.
pub async fn relay_ws<C, B>(client: C, backend: B, idle: Option<Duration>, shutdown: Shutdown) -> (Moved, Ended)
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (mut cr, mut cw) = tokio::io::split(client);
    let (mut br, mut bw) = tokio::io::split(backend);
    let meter = Meter::new();
    let to_backend = Side { meter: &meter, dir: Dir::Up, masked: true };
    let to_client = Side { meter: &meter, dir: Dir::Down, masked: false };
    let mut stopped = shutdown.clone();
    let both = async {
        tokio::select! {
            r = async {
                tokio::try_join!(
                    ws_pipe(&mut cr, &mut bw, to_backend, shutdown.clone()),
                    ws_pipe(&mut br, &mut cw, to_client, shutdown.clone())
                )
            } => r.map(|_| ()),
            // A peer that never finishes its frame cannot hold the node's shutdown forever.
            _ = async { stopped.wait_for(Phase::Stopped).await; tokio::time::sleep(CLOSE_GRACE).await } => Ok(()),
        }
    };
    meter.run(both, idle).await
}

/// How long, once stopping, a direction may take to reach a frame boundary.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// One direction's counters and framing.
struct Side<'a> {
    meter: &'a Meter,
    dir: Dir,
    /// Frames in this direction go client → server and must be masked.
    masked: bool,
}

async fn ws_pipe<R, W>(r: &mut R, w: &mut W, side: Side<'_>, mut shutdown: Shutdown) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUF_START];
    let mut frames = FrameTracker::default();
    let mut stopping = false;
    loop {
        if stopping && frames.at_boundary() {
            w.write_all(&close_frame(GOING_AWAY, side.masked)).await?;
            let _ = w.shutdown().await;
            return Ok(());
        }
        let n = tokio::select! {
            n = r.read(&mut buf) => n?,
            _ = shutdown.wait_for(Phase::Stopped), if !stopping => {
                stopping = true;
                continue;
            }
        };
        if n == 0 {
            let _ = w.shutdown().await;
            return Ok(());
        }
        // Once stopping, forward only the rest of the frame in progress.
        let n = if stopping { frames.until_boundary(&buf[..n]) } else { n };
        frames.feed(&buf[..n]);
        w.write_all(&buf[..n]).await?;
        grow(&mut buf, n);
        side.meter.moved(side.dir, n);
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

    #[tokio::test]
    async fn websocket_relay_closes_with_1001_on_shutdown() {
        let (trigger, shutdown) = crate::shutdown::channel();
        let (client, mut client_peer) = tokio::io::duplex(4096);
        let (backend, mut backend_peer) = tokio::io::duplex(4096);
        let task = tokio::spawn(relay_ws(client, backend, None, shutdown));
        // Half of a 6-byte unmasked text frame from the backend, then shutdown.
        backend_peer.write_all(&[0x81, 0x06, b'h', b'e', b'l']).await.expect("write");
        let mut got = [0u8; 5];
        client_peer.read_exact(&mut got).await.expect("read");
        trigger.advance(Phase::Stopped);
        tokio::time::sleep(Duration::from_millis(50)).await;
        backend_peer.write_all(b"lo!").await.expect("rest of frame");
        let mut rest = Vec::new();
        client_peer.read_to_end(&mut rest).await.expect("read rest");
        assert_eq!(rest, [b'l', b'o', b'!', 0x88, 0x02, 0x03, 0xe9], "frame finished, then close 1001");
        let mut to_backend = Vec::new();
        backend_peer.read_to_end(&mut to_backend).await.expect("backend side");
        assert_eq!(&to_backend[..2], &[0x88, 0x82], "masked close towards the backend");
        let (_, ended) = task.await.expect("join");
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
