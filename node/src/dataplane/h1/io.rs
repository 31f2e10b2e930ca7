//! The engine's view of a connection: a byte stream that can say it is readable without being
//! handed a buffer. Reads wait for readiness first and take a pooled buffer only then, so a
//! connection waiting for its next request holds no buffer. Streams that cannot report
//! readiness (in-memory ones in tests and fuzzing) fall back to waiting inside the read.

use std::future::poll_fn;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use super::buf::Buf;

/// A byte stream the engine can serve.
pub trait Transport: AsyncRead + AsyncWrite + Unpin {
    /// True when `poll_read_ready` is exact enough that a read returning `Pending` right after
    /// it can drop its buffer and wait for readiness again.
    const READINESS: bool = false;

    /// Resolves when a read may make progress.
    fn poll_read_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// The server name a TLS client asked for. Read from the session rather than kept per
    /// connection: only an access log record needs it.
    fn server_name(&self) -> Option<&str> {
        None
    }
}

impl Transport for TcpStream {
    const READINESS: bool = true;

    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        TcpStream::poll_read_ready(self, cx)
    }
}

/// Plaintext rustls already decrypted (or a close it already saw) is ready without the socket.
fn tls_ready(
    tcp: &TcpStream,
    state: Result<rustls::IoState, rustls::Error>,
    cx: &mut Context<'_>,
) -> Poll<io::Result<()>> {
    match state {
        Ok(s) if s.plaintext_bytes_to_read() == 0 && !s.peer_has_closed() => tcp.poll_read_ready(cx),
        _ => Poll::Ready(Ok(())),
    }
}

impl Transport for tokio_rustls::server::TlsStream<TcpStream> {
    const READINESS: bool = true;

    fn server_name(&self) -> Option<&str> {
        self.get_ref().1.server_name()
    }

    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let (tcp, conn) = self.get_mut();
        tls_ready(tcp, conn.process_new_packets(), cx)
    }
}

impl Transport for tokio_rustls::client::TlsStream<TcpStream> {
    const READINESS: bool = true;

    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let (tcp, conn) = self.get_mut();
        tls_ready(tcp, conn.process_new_packets(), cx)
    }
}

impl Transport for tokio::io::DuplexStream {}

/// Reads what is available into `slot` (taking a pooled buffer only once the stream is
/// readable) and returns the byte count; 0 is the end of the stream. An empty buffer goes back
/// to the pool when the read turns out to have nothing.
pub async fn read<T: Transport>(io: &mut T, slot: &mut Option<Buf>) -> io::Result<usize> {
    loop {
        if slot.is_none() {
            poll_fn(|cx| io.poll_read_ready(cx)).await?;
        }
        let buf = slot.get_or_insert_with(Buf::take);
        if buf.spare().is_empty() {
            return Err(io::Error::other("read buffer full"));
        }
        let wait_inside = !T::READINESS || !buf.is_empty();
        let polled = poll_fn(|cx| match read_once(io, buf, cx) {
            Poll::Ready(r) => Poll::Ready(Some(r)),
            Poll::Pending if wait_inside => Poll::Pending,
            Poll::Pending => Poll::Ready(None),
        })
        .await;
        match polled {
            Some(r) => return r,
            // A false positive: give the (empty) buffer back and wait for readiness again.
            None => *slot = None,
        }
    }
}

fn read_once<T: Transport>(io: &mut T, buf: &mut Buf, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
    let spare = buf.spare();
    let mut rb = ReadBuf::new(spare);
    match Pin::new(&mut *io).poll_read(cx, &mut rb) {
        Poll::Ready(Ok(())) => {
            let n = rb.filled().len();
            buf.filled(n);
            Poll::Ready(Ok(n))
        }
        Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
        Poll::Pending => Poll::Pending,
    }
}

/// Drops `slot`'s buffer when it holds nothing, so it returns to the pool.
pub fn release(slot: &mut Option<Buf>) {
    if slot.as_ref().is_some_and(Buf::is_empty) {
        *slot = None;
    }
}

/// Writes every slice, in as few system calls as the stream allows, then flushes (a no-op on
/// TCP; TLS sends its records).
pub async fn write_all<T: AsyncWrite + Unpin>(io: &mut T, parts: &mut [IoSlice<'_>]) -> io::Result<()> {
    let mut parts = &mut parts[..];
    IoSlice::advance_slices(&mut parts, 0);
    while !parts.is_empty() {
        let n = io.write_vectored(parts).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut parts, n);
    }
    io.flush().await
}

/// A connection to a backend: plain, or TLS for `backend_tls` pools.
pub enum Upstream {
    Tcp(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Upstream {
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Upstream::Tcp(s) => s,
            Upstream::Tls(s) => s.get_ref().0,
        }
    }

    /// True while the runtime has not seen the socket readable since a read last drained it.
    /// A backend never speaks first, so a quiet idle connection is open, up to a close the
    /// runtime has yet to take in (which the exchange's replay covers). No system call.
    pub fn quiet(&self) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        self.tcp().poll_read_ready(&mut cx).is_pending()
    }

    /// A pooled connection is alive when a non-blocking peek finds nothing: a backend never
    /// speaks first, so data or EOF means it is closing (or broken). Peeking leaves a TLS
    /// stream's bytes where they are.
    pub fn idle_alive(&self) -> bool {
        let mut probe = [std::mem::MaybeUninit::<u8>::uninit(); 1];
        let peeked = socket2::SockRef::from(self.tcp()).peek(&mut probe);
        matches!(peeked, Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }
}

impl Transport for Upstream {
    const READINESS: bool = true;

    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Upstream::Tcp(s) => Transport::poll_read_ready(s, cx),
            Upstream::Tls(s) => Transport::poll_read_ready(&mut **s, cx),
        }
    }
}

impl AsyncRead for Upstream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Upstream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Upstream::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Upstream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Upstream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Upstream::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Upstream::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Upstream::Tls(s) => Pin::new(&mut **s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Upstream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Upstream::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Upstream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Upstream::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }
}
