//! The L4 relay for TCP-to-TCP connections. Each direction waits for readiness without a
//! buffer and copies through one borrowed from the worker's pool (`h1::buf`) only while bytes
//! are in flight, so an idle L4 connection holds none; once a read fills a whole buffer (a bulk
//! transfer) it switches to splice(2) through a pipe, so bytes go from socket to socket inside
//! the kernel without a copy into user space. Short and chatty connections never pay for the
//! pipe, and a pipe that cannot be made (descriptor limit) just means copying on.

use std::io;
use std::net::Shutdown;
use std::os::fd::OwnedFd;
use std::time::Duration;

use rustix::pipe::{PipeFlags, SpliceFlags};
use tokio::io::Interest;
use tokio::net::TcpStream;

use super::h1::buf::{BUF_SIZE, Buf};
use super::relay::{Dir, Ended, Meter, Moved};

/// Pipe capacity asked for: a few large segments in flight per splice call.
const PIPE_SIZE: usize = 256 * 1024;

/// Relays until both directions are done, an error, or the idle timeout.
pub async fn relay(client: &TcpStream, backend: &TcpStream, idle: Option<Duration>) -> (Moved, Ended) {
    let meter = Meter::new();
    let both = async {
        tokio::try_join!(direction(client, backend, &meter, Dir::Up), direction(backend, client, &meter, Dir::Down))
            .map(|_| ())
    };
    meter.run(both, idle).await
}

async fn direction(r: &TcpStream, w: &TcpStream, meter: &Meter, dir: Dir) -> io::Result<()> {
    if !copy(r, w, meter, dir, true).await? {
        return Ok(());
    }
    match Pipe::new() {
        Ok(pipe) => pipe.relay(r, w, meter, dir).await,
        Err(e) => {
            tracing::debug!(error = %e, "no pipe for splice; copying instead");
            copy(r, w, meter, dir, false).await.map(|_| ())
        }
    }
}

/// Copies until EOF (then half-closes `w` and returns false) or, with `until_bulk`, until a
/// read fills a whole buffer (returns true).
async fn copy(r: &TcpStream, w: &TcpStream, meter: &Meter, dir: Dir, until_bulk: bool) -> io::Result<bool> {
    loop {
        let Some(buf) = read(r).await? else {
            half_close(w);
            return Ok(false);
        };
        write_all(w, buf.bytes()).await?;
        meter.moved(dir, buf.len());
        if until_bulk && buf.len() == BUF_SIZE {
            return Ok(true);
        }
    }
}

/// The next bytes from `r` in a pooled buffer, taken only once `r` is readable; `None` at EOF.
async fn read(r: &TcpStream) -> io::Result<Option<Buf>> {
    loop {
        r.readable().await?;
        let mut buf = Buf::take();
        match r.try_read(buf.spare()) {
            Ok(0) => return Ok(None),
            Ok(n) => {
                buf.filled(n);
                return Ok(Some(buf));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

async fn write_all(w: &TcpStream, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        w.writable().await?;
        match w.try_write(buf) {
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Half-close: the peer may still answer on the other direction. A socket the peer already
/// reset has nothing left to tell, so the error is of no use.
fn half_close(w: &TcpStream) {
    let _ = socket2::SockRef::from(w).shutdown(Shutdown::Write);
}

/// The kernel buffer a direction splices through.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let (read, write) = rustix::pipe::pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK)?;
        // A bigger pipe moves more per wakeup; the default (64 KiB) still works if refused.
        let _ = rustix::pipe::fcntl_setpipe_size(&write, PIPE_SIZE);
        Ok(Pipe { read, write })
    }

    /// Moves everything from `r` to `w` through the pipe until EOF, then half-closes `w`.
    /// The pipe is drained completely before the next fill, so a splice into it never
    /// finds it full and an EAGAIN always means the socket is not ready.
    async fn relay(&self, r: &TcpStream, w: &TcpStream, meter: &Meter, dir: Dir) -> io::Result<()> {
        let flags = SpliceFlags::MOVE | SpliceFlags::NONBLOCK;
        loop {
            let n = r
                .async_io(Interest::READABLE, || {
                    Ok(rustix::pipe::splice(r, None, &self.write, None, PIPE_SIZE, flags)?)
                })
                .await?;
            if n == 0 {
                half_close(w);
                return Ok(());
            }
            let mut left = n;
            while left > 0 {
                let m = w
                    .async_io(Interest::WRITABLE, || Ok(rustix::pipe::splice(&self.read, None, w, None, left, flags)?))
                    .await?;
                if m == 0 {
                    return Err(io::ErrorKind::WriteZero.into());
                }
                left -= m;
            }
            meter.moved(dir, n);
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// A connected pair of loopback sockets.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (a.expect("connect"), b.expect("accept").0)
    }

    #[tokio::test]
    async fn bulk_and_chatty_traffic_arrive_intact_both_ways() {
        let (mut client, client_side) = pair().await;
        let (backend_side, mut backend) = pair().await;
        let task = tokio::spawn(async move { relay(&client_side, &backend_side, None).await });
        // Several MiB upwards: past the copy phase into splicing.
        let up: Vec<u8> = (0..5_000_000u32).map(|i| (i % 251) as u8).collect();
        let sent = up.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.expect("write");
            client.shutdown().await.expect("half close");
            let mut answer = Vec::new();
            client.read_to_end(&mut answer).await.expect("read answer");
            answer
        });
        let mut got = Vec::new();
        backend.read_to_end(&mut got).await.expect("read");
        assert!(got == up, "{} bytes arrived of {}, or corrupted", got.len(), up.len());
        backend.write_all(b"thanks").await.expect("answer after the half close");
        backend.shutdown().await.expect("close");
        assert_eq!(writer.await.expect("join"), b"thanks");
        let (moved, ended) = task.await.expect("join");
        assert_eq!(moved, Moved { up: up.len() as u64, down: 6 });
        assert!(matches!(ended, Ended::Closed), "{ended:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn idle_timeout_ends_silent_connections() {
        let (_client, client_side) = pair().await;
        let (backend_side, _backend) = pair().await;
        let (_, ended) = relay(&client_side, &backend_side, Some(Duration::from_secs(5))).await;
        assert!(matches!(ended, Ended::Idle), "{ended:?}");
    }
}
