//! Upgraded (WebSocket) connections after the 101: one task relays both directions, waiting on
//! readiness with no buffer and borrowing one from the worker's pool only while bytes are in
//! flight, so an idle tunnel costs its two sockets and a few counters. Each direction ends with
//! a half-close when its sender closes; an idle timeout ends silent tunnels; when the node
//! stops, each direction finishes the frame in progress and sends a close frame 1001.

use std::io::IoSlice;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::time::Instant;

use super::buf::Buf;
use super::io::{self as hio, Transport};
use crate::dataplane::relay::{Ended, Moved};
use crate::dataplane::wsframe::{FrameTracker, GOING_AWAY, close_frame};
use crate::shutdown::{Phase, Shutdown};

/// How long, once stopping, a direction may take to reach a frame boundary.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// One direction of the tunnel.
#[derive(Default)]
struct Side {
    /// Bytes read and not yet written on.
    buf: Option<Buf>,
    frames: FrameTracker,
    /// The sender closed (or the direction was ended with a close frame).
    done: bool,
    moved: u64,
}

enum Event {
    Up(std::io::Result<usize>),
    Down(std::io::Result<usize>),
    Idle,
    Stop,
    Grace,
}

/// Relays until both directions are done, an error, the idle timeout, or the end of the grace
/// after the node stopped. `held` are client bytes that arrived with the upgrade request.
pub async fn relay<C: Transport, B: Transport>(
    client: &mut C,
    backend: &mut B,
    held: Option<Buf>,
    idle: Option<Duration>,
    mut shutdown: Shutdown,
) -> (Moved, Ended) {
    let mut up = Side { buf: held, ..Side::default() };
    let mut down = Side::default();
    let mut last = Instant::now();
    let mut stopping: Option<Instant> = None;
    let ended = loop {
        if let Err(e) = flush_pending(&mut up, backend, true, stopping.is_some()).await {
            break Ended::Error(e);
        }
        if let Err(e) = flush_pending(&mut down, client, false, stopping.is_some()).await {
            break Ended::Error(e);
        }
        if up.done && down.done {
            break Ended::Closed;
        }
        // One timer for both deadlines: an idle tunnel's task holds every branch's state.
        let idle_at = idle.map(|d| last + d);
        let grace_at = stopping.map(|t| t + CLOSE_GRACE);
        let event = tokio::select! {
            r = hio::read(client, &mut up.buf), if !up.done => Event::Up(r),
            r = hio::read(backend, &mut down.buf), if !down.done => Event::Down(r),
            _ = sleep_until_opt(earliest(idle_at, grace_at)) => {
                if grace_at.is_some_and(|g| Instant::now() >= g) { Event::Grace } else { Event::Idle }
            }
            _ = shutdown.wait_for(Phase::Stopped), if stopping.is_none() => Event::Stop,
        };
        let step = match event {
            Event::Up(r) => on_read(&mut up, backend, r).await,
            Event::Down(r) => on_read(&mut down, client, r).await,
            Event::Idle => break Ended::Idle,
            Event::Grace => break Ended::Closed,
            Event::Stop => {
                stopping = Some(Instant::now());
                Ok(())
            }
        };
        if let Err(e) = step {
            break Ended::Error(e);
        }
        last = Instant::now();
    };
    (Moved { up: up.moved, down: down.moved }, ended)
}

fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// After a read: at the end of the stream, half-close the other side.
async fn on_read<W: Transport>(side: &mut Side, to: &mut W, r: std::io::Result<usize>) -> std::io::Result<()> {
    match r {
        Ok(0) => {
            side.done = true;
            side.buf = None;
            let _ = to.shutdown().await;
            Ok(())
        }
        Ok(_) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Writes what `side` holds to `to`. Once stopping, only the rest of the frame in progress
/// goes, then a close frame (masked towards the backend), and the direction ends.
async fn flush_pending<W: Transport>(side: &mut Side, to: &mut W, masked: bool, stopping: bool) -> std::io::Result<()> {
    if side.done {
        return Ok(());
    }
    if let Some(buf) = side.buf.as_mut().filter(|b| !b.is_empty()) {
        let bytes = buf.bytes();
        let len = bytes.len();
        let n = if stopping { side.frames.until_boundary(bytes) } else { len };
        side.frames.feed(&bytes[..n]);
        hio::write_all(to, &mut [IoSlice::new(&bytes[..n])]).await?;
        side.moved += n as u64;
        // Once stopping, bytes past the frame boundary are not relayed.
        buf.consume(if stopping { len } else { n });
    }
    hio::release(&mut side.buf);
    if stopping && side.frames.at_boundary() {
        hio::write_all(to, &mut [IoSlice::new(&close_frame(GOING_AWAY, masked))]).await?;
        let _ = to.shutdown().await;
        side.done = true;
        side.buf = None;
    }
    Ok(())
}
