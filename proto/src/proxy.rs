//! The PROXY protocol (HAProxy's, v1 text and v2 binary): how many bytes a header takes on a
//! stream ([`frame`], shoal's own, so a reader never consumes a byte of the proxied stream),
//! what a framed header says ([`parse`], through the `ppp` crate), the header shoal sends to
//! backends ([`encode`]), and the trusted-source lists ([`Cidr`]).

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use ppp::{v1, v2};
use serde::{Deserialize, Serialize};

/// The v2 signature; v2 headers start with it and nothing else does.
pub const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// A v2 header's fixed part: signature, version/command, family/protocol, length.
pub const V2_FIXED: usize = 16;
/// Longest v1 header, CRLF included (the specification's bound).
pub const V1_MAX: usize = 107;
const V1_PREFIX: &[u8] = b"PROXY ";

/// A PROXY protocol version, as pools name it (`send_proxy = "v1"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Version {
    V1,
    V2,
}

impl Version {
    /// The `version` metric label.
    pub fn label(self) -> &'static str {
        match self {
            Version::V1 => "v1",
            Version::V2 => "v2",
        }
    }
}

/// How much of a stream's start is a PROXY header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Frame {
    /// The header is the first `n` bytes.
    Complete(usize),
    /// No whole header yet, and every byte seen belongs to it (so all may be consumed).
    Incomplete,
}

/// Why a stream's start is not an acceptable PROXY header.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    #[error("not a PROXY protocol header")]
    NotProxy,
    #[error("v1 header longer than 107 bytes")]
    TooLong,
    #[error("v1 header line not ended by CRLF")]
    BadLineEnd,
    #[error("invalid v1 header: {0}")]
    V1(String),
    #[error("invalid v2 header: {0}")]
    V2(String),
    #[error("v2 header for a datagram flow on a stream")]
    Datagram,
}

/// Frames the header at the start of `bytes` (v1 or v2, told apart by their first bytes).
pub fn frame(bytes: &[u8]) -> Result<Frame, Malformed> {
    let n = bytes.len().min(V2_SIGNATURE.len());
    if bytes[..n] == V2_SIGNATURE[..n] {
        if bytes.len() < V2_FIXED {
            return Ok(Frame::Incomplete);
        }
        let total = V2_FIXED + usize::from(u16::from_be_bytes([bytes[14], bytes[15]]));
        return Ok(if bytes.len() >= total { Frame::Complete(total) } else { Frame::Incomplete });
    }
    let n = bytes.len().min(V1_PREFIX.len());
    if bytes[..n] != V1_PREFIX[..n] {
        return Err(Malformed::NotProxy);
    }
    let window = &bytes[..bytes.len().min(V1_MAX)];
    match window.iter().position(|&b| b == b'\n') {
        Some(i) if i > 0 && window[i - 1] == b'\r' => Ok(Frame::Complete(i + 1)),
        Some(_) => Err(Malformed::BadLineEnd),
        None if window.len() == V1_MAX => Err(Malformed::TooLong),
        None => Ok(Frame::Incomplete),
    }
}

/// What a header says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub version: Version,
    /// The client (source) and the address it connected to (destination); `None` for v2
    /// LOCAL, v1 UNKNOWN and families other than IP: the connection's own peer stands.
    pub addrs: Option<(SocketAddr, SocketAddr)>,
}

/// Parses a framed header (exactly the bytes [`frame`] counted).
pub fn parse(header: &[u8]) -> Result<Header, Malformed> {
    if header.starts_with(V2_SIGNATURE) {
        return parse_v2(header);
    }
    let h = v1::Header::try_from(header).map_err(|e| Malformed::V1(e.to_string()))?;
    if h.header.len() != header.len() {
        return Err(Malformed::BadLineEnd);
    }
    let addrs = match h.addresses {
        v1::Addresses::Tcp4(a) => Some((
            SocketAddr::from((a.source_address, a.source_port)),
            SocketAddr::from((a.destination_address, a.destination_port)),
        )),
        v1::Addresses::Tcp6(a) => Some((
            SocketAddr::from((a.source_address, a.source_port)),
            SocketAddr::from((a.destination_address, a.destination_port)),
        )),
        v1::Addresses::Unknown => None,
    };
    Ok(Header { version: Version::V1, addrs })
}

fn parse_v2(header: &[u8]) -> Result<Header, Malformed> {
    let h = v2::Header::try_from(header).map_err(|e| Malformed::V2(e.to_string()))?;
    if h.command == v2::Command::Local {
        return Ok(Header { version: Version::V2, addrs: None });
    }
    if h.protocol == v2::Protocol::Datagram {
        return Err(Malformed::Datagram);
    }
    let addrs = match h.addresses {
        v2::Addresses::IPv4(a) => Some((
            SocketAddr::from((a.source_address, a.source_port)),
            SocketAddr::from((a.destination_address, a.destination_port)),
        )),
        v2::Addresses::IPv6(a) => Some((
            SocketAddr::from((a.source_address, a.source_port)),
            SocketAddr::from((a.destination_address, a.destination_port)),
        )),
        // The specification: a receiver ignores UNSPEC addresses; a unix peer is no IP client.
        v2::Addresses::Unspecified | v2::Addresses::Unix(_) => None,
    };
    Ok(Header { version: Version::V2, addrs })
}

/// The header sent ahead of a backend connection: a client's addresses, or, with `None`
/// (health probes), v2 LOCAL / v1 UNKNOWN, which a backend requiring the header accepts and
/// reads as "the proxy itself".
pub fn encode(version: Version, addrs: Option<(SocketAddr, SocketAddr)>) -> Vec<u8> {
    let addrs = addrs.map(same_family);
    match version {
        Version::V1 => {
            let a = addrs.map_or(v1::Addresses::Unknown, v1::Addresses::from);
            a.to_string().into_bytes()
        }
        Version::V2 => {
            let built = match addrs {
                Some(pair) => {
                    v2::Builder::with_addresses(v2::Version::Two | v2::Command::Proxy, v2::Protocol::Stream, pair)
                        .build()
                }
                None => v2::Builder::new(
                    v2::Version::Two | v2::Command::Local,
                    v2::AddressFamily::Unspecified | v2::Protocol::Unspecified,
                )
                .build(),
            };
            // Building only fails when a length passes 64 KiB; these are at most 52 bytes.
            built.unwrap_or_else(|_| local_v2())
        }
    }
}

/// A v2 LOCAL header written out by hand (the fallback that cannot fail).
fn local_v2() -> Vec<u8> {
    let mut out = V2_SIGNATURE.to_vec();
    out.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
    out
}

/// Both addresses in one family (a header has one): an IPv4 one beside an IPv6 one becomes
/// IPv4-mapped IPv6, and two mapped ones become plain IPv4.
fn same_family((src, dst): (SocketAddr, SocketAddr)) -> (SocketAddr, SocketAddr) {
    let canon = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
    let (src, dst) = (canon(src), canon(dst));
    if src.is_ipv4() == dst.is_ipv4() {
        return (src, dst);
    }
    let v6 = |a: SocketAddr| match a.ip() {
        IpAddr::V4(ip) => SocketAddr::new(IpAddr::V6(ip.to_ipv6_mapped()), a.port()),
        IpAddr::V6(_) => a,
    };
    (v6(src), v6(dst))
}

/// An address block (`10.0.0.0/8`, `2001:db8::/32`; a bare address is a block of one).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cidr {
    net: IpAddr,
    len: u8,
}

impl Cidr {
    /// Whether `ip` is in the block; IPv4-mapped IPv6 peers (dual-stack sockets) count as IPv4.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.net, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => prefix_eq(&net.octets(), &ip.octets(), self.len),
            (IpAddr::V6(net), IpAddr::V6(ip)) => prefix_eq(&net.octets(), &ip.octets(), self.len),
            _ => false,
        }
    }
}

fn prefix_eq(a: &[u8], b: &[u8], len: u8) -> bool {
    let (whole, rest) = (usize::from(len / 8), len % 8);
    if a[..whole] != b[..whole] {
        return false;
    }
    rest == 0 || (a[whole] ^ b[whole]) >> (8 - rest) == 0
}

/// Why an entry is not an address or CIDR block; each names the entry.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BadCidr {
    #[error("{0:?} is not an address or CIDR block")]
    NotAddress(String),
    #[error("{0:?}: the prefix length must be 0 to {1}")]
    PrefixLength(String, u8),
    #[error("{0:?} has host bits set (write its network address)")]
    HostBits(String),
}

impl FromStr for Cidr {
    type Err = BadCidr;

    fn from_str(s: &str) -> Result<Cidr, BadCidr> {
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let net: IpAddr = addr.parse().map_err(|_| BadCidr::NotAddress(s.to_string()))?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let len = match len {
            None => max,
            // Plain decimal only, so `/08` or `/+8` are not read as 8.
            Some(l) if l == "0" || (!l.starts_with('0') && l.bytes().all(|b| b.is_ascii_digit())) => {
                l.parse::<u8>().ok().filter(|l| *l <= max).ok_or_else(|| BadCidr::PrefixLength(s.to_string(), max))?
            }
            Some(_) => return Err(BadCidr::PrefixLength(s.to_string(), max)),
        };
        if masked(net, len) != net {
            return Err(BadCidr::HostBits(s.to_string()));
        }
        Ok(Cidr { net, len })
    }
}

/// `net` with the bits past `len` cleared.
fn masked(net: IpAddr, len: u8) -> IpAddr {
    match net {
        IpAddr::V4(n) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            IpAddr::from((u32::from(n) & mask).to_be_bytes())
        }
        IpAddr::V6(n) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            IpAddr::from((u128::from(n) & mask).to_be_bytes())
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.net, self.len)
    }
}

/// Parses a list of blocks; the error names the entry.
pub fn parse_cidrs<S: AsRef<str>>(list: &[S]) -> Result<Vec<Cidr>, BadCidr> {
    list.iter().map(|s| s.as_ref().trim().parse()).collect()
}

/// Whether `ip` is in any of `list`.
pub fn trusted(list: &[Cidr], ip: IpAddr) -> bool {
    list.iter().any(|c| c.contains(ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().expect("socket address")
    }

    #[test]
    fn v1_is_framed_at_its_crlf_and_not_a_byte_further() {
        let h = b"PROXY TCP4 192.0.2.1 198.51.100.2 5000 80\r\nGET / HTTP/1.1\r\n";
        let Ok(Frame::Complete(n)) = frame(h) else { panic!("complete") };
        assert_eq!(&h[..n], b"PROXY TCP4 192.0.2.1 198.51.100.2 5000 80\r\n");
        let parsed = parse(&h[..n]).expect("parse");
        assert_eq!(parsed, Header { version: Version::V1, addrs: Some((sa("192.0.2.1:5000"), sa("198.51.100.2:80"))) });
    }

    #[test]
    fn partial_headers_ask_for_more_and_every_byte_seen_is_header() {
        let full = encode(Version::V2, Some((sa("[2001:db8::1]:4000"), sa("[2001:db8::2]:443"))));
        for cut in 0..full.len() {
            assert_eq!(frame(&full[..cut]), Ok(Frame::Incomplete), "v2 cut at {cut}");
        }
        let v1 = b"PROXY TCP6 2001:db8::1 2001:db8::2 4000 443\r\n";
        for cut in 0..v1.len() {
            assert_eq!(frame(&v1[..cut]), Ok(Frame::Incomplete), "v1 cut at {cut}");
        }
    }

    #[test]
    fn v2_is_framed_by_its_length_field() {
        let mut bytes = encode(Version::V2, Some((sa("10.1.2.3:1234"), sa("10.0.0.1:80"))));
        let len = bytes.len();
        assert_eq!(len, V2_FIXED + 12);
        bytes.extend_from_slice(b"payload");
        assert_eq!(frame(&bytes), Ok(Frame::Complete(len)));
        let h = parse(&bytes[..len]).expect("parse");
        assert_eq!(h.addrs, Some((sa("10.1.2.3:1234"), sa("10.0.0.1:80"))));
    }

    #[test]
    fn local_and_unknown_keep_the_socket_peer() {
        let local = encode(Version::V2, None);
        assert_eq!(frame(&local), Ok(Frame::Complete(16)));
        assert_eq!(parse(&local), Ok(Header { version: Version::V2, addrs: None }));
        let unknown = encode(Version::V1, None);
        assert_eq!(unknown, b"PROXY UNKNOWN\r\n");
        assert_eq!(parse(&unknown), Ok(Header { version: Version::V1, addrs: None }));
    }

    #[test]
    fn garbage_is_refused_early() {
        assert_eq!(frame(b"GET / HTTP/1.1\r\n"), Err(Malformed::NotProxy));
        assert_eq!(frame(b"\r\n\r\nX"), Err(Malformed::NotProxy));
        assert_eq!(frame(b"PROXY TCP4 1.2.3.4\n"), Err(Malformed::BadLineEnd));
        let long = [b"PROXY ".as_slice(), &[b'A'; 200]].concat();
        assert_eq!(frame(&long), Err(Malformed::TooLong));
        assert!(parse(b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 80\r\n").is_err());
        assert!(parse(b"PROXY TCP4 ::1 ::2 1 2\r\n").is_err());
    }

    #[test]
    fn v2_datagram_and_bad_versions_are_refused() {
        let mut h = encode(Version::V2, Some((sa("10.1.2.3:1234"), sa("10.0.0.1:80"))));
        h[13] = 0x12; // IPv4, DGRAM
        assert_eq!(parse(&h), Err(Malformed::Datagram));
        h[12] = 0x31; // version 3
        assert!(parse(&h).is_err());
    }

    #[test]
    fn mixed_families_are_sent_as_ipv6() {
        let h = encode(Version::V1, Some((sa("10.0.0.5:1"), sa("[2001:db8::1]:80"))));
        assert_eq!(h, b"PROXY TCP6 ::ffff:10.0.0.5 2001:db8::1 1 80\r\n");
        let h = encode(Version::V1, Some((sa("[::ffff:10.0.0.5]:1"), sa("10.0.0.1:80"))));
        assert_eq!(h, b"PROXY TCP4 10.0.0.5 10.0.0.1 1 80\r\n");
    }

    #[test]
    fn cidrs_parse_and_match() {
        let c: Cidr = "10.0.0.0/8".parse().expect("cidr");
        assert!(c.contains("10.200.1.1".parse().expect("ip")));
        assert!(c.contains("::ffff:10.0.0.1".parse().expect("ip")));
        assert!(!c.contains("11.0.0.1".parse().expect("ip")));
        let one: Cidr = "127.0.0.1".parse().expect("cidr");
        assert!(one.contains("127.0.0.1".parse().expect("ip")) && !one.contains("127.0.0.2".parse().expect("ip")));
        let v6: Cidr = "2001:db8::/32".parse().expect("cidr");
        assert!(v6.contains("2001:db8:ffff::1".parse().expect("ip")));
        let all: Cidr = "0.0.0.0/0".parse().expect("cidr");
        assert!(all.contains("8.8.8.8".parse().expect("ip")));
        let odd: Cidr = "10.0.0.0/13".parse().expect("cidr");
        assert!(odd.contains("10.7.255.255".parse().expect("ip")) && !odd.contains("10.8.0.0".parse().expect("ip")));
        let s = String::from;
        for (bad, why) in [
            ("10.0.0.0/33", BadCidr::PrefixLength(s("10.0.0.0/33"), 32)),
            ("10.0.0.1/8", BadCidr::HostBits(s("10.0.0.1/8"))),
            ("nope", BadCidr::NotAddress(s("nope"))),
            ("10.0.0.0/", BadCidr::PrefixLength(s("10.0.0.0/"), 32)),
            ("10.0.0.0/08", BadCidr::PrefixLength(s("10.0.0.0/08"), 32)),
            ("::/129", BadCidr::PrefixLength(s("::/129"), 128)),
        ] {
            assert_eq!(bad.parse::<Cidr>(), Err(why), "{bad}");
        }
        assert_eq!(parse_cidrs(&["10.0.0.0/8", "::1"]).expect("list").len(), 2);
        let err = parse_cidrs(&["10.0.0.0/8", " 10.0.0.1/8 "]).expect_err("host bits");
        assert_eq!(err.to_string(), "\"10.0.0.1/8\" has host bits set (write its network address)");
    }
}
