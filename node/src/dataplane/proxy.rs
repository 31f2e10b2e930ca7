//! The PROXY protocol on accepted connections: a listener with trusted sources refuses every
//! other source, and reads the header a trusted one must send (v1 or v2, within
//! [`HEADER_TIMEOUT`]) without consuming a byte of the stream behind it: bytes are peeked,
//! framed by `proto::proxy::frame`, and only header bytes are read. The client the header
//! names replaces the socket's peer in [`ConnInfo`], so balancing, `X-Forwarded-For` and logs
//! see it. Outcomes are counted in `shoal_proxy_protocol_headers_total`.

use std::io;
use std::time::Duration;

use shoal_proto::proxy::{self, Cidr, Frame, Header, Malformed};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use super::http::ConnInfo;
use crate::metrics::Metrics;

/// A trusted source gets this long to send its whole header, so a silent one cannot hold a
/// connection slot.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Bytes looked at per peek; a longer v2 header (TLVs) is consumed in several rounds.
const PEEK: usize = 256;

/// Why a connection was refused.
#[derive(Debug)]
enum Refused {
    Untrusted,
    Malformed(Malformed),
    Timeout,
    /// The source closed (or the socket failed) before a whole header came.
    Closed,
}

impl Refused {
    fn label(&self) -> &'static str {
        match self {
            Refused::Untrusted => "untrusted",
            Refused::Malformed(_) => "malformed",
            Refused::Timeout => "timeout",
            Refused::Closed => "closed",
        }
    }
}

/// The connection as the proxy should see it: unchanged without a trusted list; with one,
/// the header's client (`None`: refused and counted, the caller closes the connection).
pub async fn accept(
    stream: &mut TcpStream,
    conn: ConnInfo,
    trusted: Option<&[Cidr]>,
    metrics: &Metrics,
    listener: &str,
) -> Option<ConnInfo> {
    let Some(trusted) = trusted else { return Some(conn) };
    let outcome = if proxy::trusted(trusted, conn.peer.ip()) {
        // Boxed: the read state (a peek buffer) exists only during the header.
        match tokio::time::timeout(HEADER_TIMEOUT, Box::pin(read_header(stream))).await {
            Ok(r) => r,
            Err(_) => Err(Refused::Timeout),
        }
    } else {
        Err(Refused::Untrusted)
    };
    let count = |result: &str, version: &str| {
        metrics.proxy_headers.with_label_values(&[listener, result, version]).inc();
    };
    match outcome {
        Ok(header) => {
            count("ok", header.version.label());
            Some(with_header(conn, header))
        }
        Err(refused) => {
            count(refused.label(), "none");
            let reason = match &refused {
                Refused::Malformed(m) => m.to_string(),
                other => other.label().to_string(),
            };
            tracing::debug!(client = %conn.peer, listener, reason, "PROXY protocol: connection refused");
            None
        }
    }
}

/// The connection as the header describes it; LOCAL and UNKNOWN keep the socket's addresses.
fn with_header(conn: ConnInfo, header: Header) -> ConnInfo {
    match header.addrs {
        Some((client, dst)) => ConnInfo { peer: client, local: dst, ..conn },
        None => conn,
    }
}

/// Reads exactly one header: peeked bytes are consumed only as far as they are header.
async fn read_header(stream: &mut TcpStream) -> Result<Header, Refused> {
    let mut seen: Vec<u8> = Vec::new();
    let mut peek = [0u8; PEEK];
    loop {
        let n = stream.peek(&mut peek).await.map_err(|_| Refused::Closed)?;
        if n == 0 {
            return Err(Refused::Closed);
        }
        let consumed = seen.len();
        seen.extend_from_slice(&peek[..n]);
        match proxy::frame(&seen).map_err(Refused::Malformed)? {
            Frame::Complete(len) => {
                discard(stream, &mut peek[..len - consumed]).await?;
                return proxy::parse(&seen[..len]).map_err(Refused::Malformed);
            }
            // Everything peeked is header: take it, so the next peek waits for new bytes.
            Frame::Incomplete => discard(stream, &mut peek[..n]).await?,
        }
    }
}

/// Reads bytes already seen by a peek (they are in the socket's buffer).
async fn discard(stream: &mut TcpStream, buf: &mut [u8]) -> Result<(), Refused> {
    let read: io::Result<usize> = stream.read_exact(buf).await;
    read.map(drop).map_err(|_| Refused::Closed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let c = TcpStream::connect(l.local_addr().expect("addr")).await.expect("connect");
        let (s, _) = l.accept().await.expect("accept");
        (c, s)
    }

    fn info(s: &TcpStream) -> ConnInfo {
        ConnInfo { peer: s.peer_addr().expect("peer"), local: s.local_addr().expect("local"), tls: false }
    }

    fn loopback() -> Vec<Cidr> {
        vec!["127.0.0.0/8".parse().expect("cidr")]
    }

    #[tokio::test]
    async fn a_header_sent_in_pieces_is_read_and_the_stream_behind_it_kept() {
        let (mut c, mut s) = pair().await;
        let header = b"PROXY TCP4 192.0.2.7 192.0.2.1 4242 80\r\n";
        let writer = tokio::spawn(async move {
            for part in header.chunks(7) {
                c.write_all(part).await.expect("write");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            c.write_all(b"payload").await.expect("write");
            c
        });
        let m = Metrics::new("test");
        let i = info(&s);
        let conn = accept(&mut s, i, Some(&loopback()), &m, "t").await.expect("accepted");
        assert_eq!(conn.peer, "192.0.2.7:4242".parse::<SocketAddr>().expect("addr"));
        assert_eq!(conn.local, "192.0.2.1:80".parse::<SocketAddr>().expect("addr"));
        let _c = writer.await.expect("writer");
        let mut rest = [0u8; 7];
        s.read_exact(&mut rest).await.expect("read");
        assert_eq!(&rest, b"payload");
        assert_eq!(m.proxy_headers.with_label_values(&["t", "ok", "v1"]).get(), 1);
    }

    #[tokio::test]
    async fn untrusted_and_malformed_are_refused_and_counted() {
        let m = Metrics::new("test");
        let (_c, mut s) = pair().await;
        let other: Vec<Cidr> = vec!["10.0.0.0/8".parse().expect("cidr")];
        let i = info(&s);
        assert!(accept(&mut s, i, Some(&other), &m, "t").await.is_none());
        let (mut c, mut s) = pair().await;
        c.write_all(b"GET / HTTP/1.1\r\n\r\n").await.expect("write");
        let i = info(&s);
        assert!(accept(&mut s, i, Some(&loopback()), &m, "t").await.is_none());
        assert_eq!(m.proxy_headers.with_label_values(&["t", "untrusted", "none"]).get(), 1);
        assert_eq!(m.proxy_headers.with_label_values(&["t", "malformed", "none"]).get(), 1);
    }

    #[tokio::test]
    async fn without_a_list_nothing_is_read() {
        let (mut c, mut s) = pair().await;
        c.write_all(b"GET").await.expect("write");
        let m = Metrics::new("test");
        let before = info(&s);
        let conn = accept(&mut s, before, None, &m, "t").await.expect("accepted");
        assert_eq!(conn.peer, before.peer);
        let mut got = [0u8; 3];
        s.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"GET");
    }
}
