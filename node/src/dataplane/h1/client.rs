//! The client side of a connection as the engine uses it: the stream, the bytes read but not
//! yet consumed (held only while there are some), who the client is, and the listener's byte
//! counters.

use std::io::{self, IoSlice};
use std::net::SocketAddr;

use tokio::time::Instant;

use super::buf::Buf;
use super::emit::ClientId;
use super::io::{self as hio, Transport};
use crate::metrics::ListenerMetrics;

pub struct Client<T> {
    pub io: T,
    /// Read and not yet consumed; `None` while idle.
    pub buf: Option<Buf>,
    pub peer: SocketAddr,
    /// The address the client connected to (a PROXY header to a backend names it).
    pub local: SocketAddr,
    pub id: ClientId,
    /// Bytes read from and written to the client so far (an access log record takes the
    /// difference over its request).
    pub read_total: u64,
    pub written_total: u64,
    /// When the current request's backend sent its response head.
    pub response_at: Option<Instant>,
    lm: ListenerMetrics,
}

impl<T: Transport> Client<T> {
    pub fn new(io: T, peer: SocketAddr, tls: bool, lm: ListenerMetrics) -> Client<T> {
        Client {
            io,
            buf: None,
            peer,
            local: peer,
            id: ClientId { ip: peer.ip(), tls },
            read_total: 0,
            written_total: 0,
            response_at: None,
            lm,
        }
    }

    /// Sets the address the client connected to.
    pub fn at(mut self, local: SocketAddr) -> Client<T> {
        self.local = local;
        self
    }

    /// The client and the address it connected to, as a PROXY header to a backend says them.
    pub fn addrs(&self) -> (SocketAddr, SocketAddr) {
        (self.peer, self.local)
    }

    /// Reads more (taking a buffer only once readable); 0 is the end of the stream.
    pub async fn read(&mut self) -> io::Result<usize> {
        let n = hio::read(&mut self.io, &mut self.buf).await?;
        self.lm.bytes_in.inc_by(n as u64);
        self.read_total += n as u64;
        Ok(n)
    }

    /// Bytes consumed from the client so far: what requests took, not what was read ahead.
    pub fn consumed_total(&self) -> u64 {
        self.read_total - self.pending().len() as u64
    }

    /// Bytes read and not yet consumed.
    pub fn pending(&self) -> &[u8] {
        self.buf.as_ref().map_or(&[], Buf::bytes)
    }

    /// Marks `n` pending bytes consumed, and gives the buffer back once it is empty.
    pub fn consume(&mut self, n: usize) {
        if let Some(b) = self.buf.as_mut() {
            b.consume(n);
        }
        hio::release(&mut self.buf);
    }

    pub async fn write(&mut self, parts: &mut [IoSlice<'_>]) -> io::Result<()> {
        let n: usize = parts.iter().map(|p| p.len()).sum();
        hio::write_all(&mut self.io, parts).await?;
        self.lm.bytes_out.inc_by(n as u64);
        self.written_total += n as u64;
        Ok(())
    }

    pub async fn send(&mut self, out: &Buf) -> io::Result<()> {
        self.write(&mut [IoSlice::new(out.bytes())]).await
    }

    /// Counts bytes moved past the engine (by a tunnel).
    pub fn count(&mut self, read: u64, written: u64) {
        self.read_total += read;
        self.written_total += written;
        self.lm.bytes_in.inc_by(read);
        self.lm.bytes_out.inc_by(written);
    }

    pub fn failed(&self) {
        self.lm.failed.inc();
    }
}
