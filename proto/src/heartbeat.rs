//! The UDP heartbeat datagrams: seed 004's, byte-compatible with the original load balancer,
//! plus the authenticated forms shoal adds for pools with a `heartbeat_secret`.
//!
//! Seed 004: a backend identifies itself with `"<tcp addr> <udp addr>"` (older backends put the
//! UDP address first; both orders are accepted) until the balancer answers `OK`; afterwards it
//! sends `OK` every interval. The balancer answers `AUTH` to an `OK` from a source it does not
//! know. Authenticated pools answer a bare identification with `NONCE <hex>`; the backend repeats
//! it with a third token `<nonce>.<mac>`, then sends `OK <counter> <mac>` keepalives. The MACs
//! and the rules that make them single-use live in `node::health::heartbeat`.

use std::net::SocketAddr;

/// The balancer's reply to an accepted identification.
pub const OK: &[u8] = b"OK";
/// The balancer's reply to an `OK` from an unknown source: "identify yourself again".
pub const AUTH: &[u8] = b"AUTH";
/// The balancer's challenge to an identification in an authenticated pool.
pub const NONCE: &str = "NONCE";
/// Datagrams longer than this are malformed (an identification is well under 200 bytes).
pub const MAX_DATAGRAM: usize = 512;

/// A decoded heartbeat datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Datagram<'a> {
    /// "I am alive" from an identified backend (or the balancer's acknowledgement).
    Ok,
    /// An authenticated keepalive: a counter that only grows and a MAC over it.
    OkMac { counter: u64, mac: &'a str },
    /// The balancer's one-time challenge to an identification.
    Nonce(&'a str),
    /// The balancer asks the backend to identify again.
    Auth,
    /// An identification: two addresses in either order, and an optional authenticator.
    Id { first: SocketAddr, second: SocketAddr, auth: Option<&'a str> },
}

/// Why a datagram was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    #[error("datagram longer than {MAX_DATAGRAM} bytes")]
    TooLong,
    #[error("datagram is not UTF-8 text")]
    NotText,
    #[error("expected OK, AUTH, NONCE or two addresses")]
    BadShape,
    #[error("not a socket address with a port")]
    BadAddr,
}

/// Decodes one datagram. Never panics; trailing white space (a newline from `nc`) is ignored.
pub fn decode(bytes: &[u8]) -> Result<Datagram<'_>, Malformed> {
    if bytes.len() > MAX_DATAGRAM {
        return Err(Malformed::TooLong);
    }
    let text = std::str::from_utf8(bytes).map_err(|_| Malformed::NotText)?.trim();
    match text {
        "OK" => return Ok(Datagram::Ok),
        "AUTH" => return Ok(Datagram::Auth),
        _ => {}
    }
    let mut parts = text.split_ascii_whitespace();
    let (Some(a), Some(b), auth, None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(Malformed::BadShape);
    };
    match (a, auth) {
        ("OK", Some(mac)) => {
            let counter = b.parse().map_err(|_| Malformed::BadShape)?;
            return Ok(Datagram::OkMac { counter, mac });
        }
        (NONCE, None) => return Ok(Datagram::Nonce(b)),
        _ => {}
    }
    Ok(Datagram::Id { first: address(a)?, second: address(b)?, auth })
}

/// An address a backend can be reached at: port 0 names no TCP or UDP endpoint.
fn address(text: &str) -> Result<SocketAddr, Malformed> {
    text.parse().ok().filter(|a: &SocketAddr| a.port() != 0).ok_or(Malformed::BadAddr)
}

/// Encodes an identification the way backends send it: TCP address first.
pub fn encode_id(tcp: SocketAddr, udp: SocketAddr, auth: Option<&str>) -> Vec<u8> {
    match auth {
        Some(a) => format!("{tcp} {udp} {a}").into_bytes(),
        None => format!("{tcp} {udp}").into_bytes(),
    }
}

/// Encodes an authenticated keepalive.
pub fn encode_ok(counter: u64, mac: &str) -> Vec<u8> {
    format!("OK {counter} {mac}").into_bytes()
}

/// Encodes the balancer's challenge.
pub fn encode_nonce(nonce: &str) -> Vec<u8> {
    format!("{NONCE} {nonce}").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn decodes_seed_datagrams() {
        assert_eq!(decode(b"OK"), Ok(Datagram::Ok));
        assert_eq!(decode(b"OK\n"), Ok(Datagram::Ok));
        assert_eq!(decode(b"AUTH"), Ok(Datagram::Auth));
        let id = decode(b"0.0.0.0:7000 0.0.0.0:7001").expect("id");
        let (tcp, udp) = ("0.0.0.0:7000".parse().unwrap(), "0.0.0.0:7001".parse().unwrap());
        assert_eq!(id, Datagram::Id { first: tcp, second: udp, auth: None });
        let v6 = decode(b"[::1]:7000 [::1]:7001 abc").expect("v6 id with auth");
        assert!(matches!(v6, Datagram::Id { auth: Some("abc"), .. }));
        assert_eq!(decode(b"OK 7 abcd\n"), Ok(Datagram::OkMac { counter: 7, mac: "abcd" }));
        assert_eq!(decode(b"NONCE 00ff"), Ok(Datagram::Nonce("00ff")));
        assert_eq!(decode(&encode_ok(3, "ab")), Ok(Datagram::OkMac { counter: 3, mac: "ab" }));
        assert_eq!(decode(&encode_nonce("cd")), Ok(Datagram::Nonce("cd")));
    }

    #[test]
    fn rejects_garbage() {
        assert_eq!(decode(b""), Err(Malformed::BadShape));
        assert_eq!(decode(b"ok"), Err(Malformed::BadShape));
        assert_eq!(decode(&[0xff, 0xfe]), Err(Malformed::NotText));
        assert_eq!(decode(b"1.2.3.4:5 nope"), Err(Malformed::BadAddr));
        assert_eq!(decode(b"0.0.0.0:0 127.0.0.1:7001"), Err(Malformed::BadAddr), "port 0");
        assert_eq!(decode(b"127.0.0.1:7000 [::1]:0"), Err(Malformed::BadAddr), "port 0");
        assert_eq!(decode(b"a b c d"), Err(Malformed::BadShape));
        assert_eq!(decode(b"OK -1 ab"), Err(Malformed::BadShape));
        assert_eq!(decode(b"OK 1"), Err(Malformed::BadAddr));
        assert_eq!(decode(b"NONCE a b"), Err(Malformed::BadAddr));
        assert_eq!(decode(&[b'x'; 600]), Err(Malformed::TooLong));
    }

    proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..700)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn id_round_trips(ia in any::<std::net::IpAddr>(), pa in 1u16.., ib in any::<std::net::IpAddr>(), pb in 1u16..) {
            let (a, b) = (SocketAddr::new(ia, pa), SocketAddr::new(ib, pb));
            let bytes = encode_id(a, b, None);
            prop_assert_eq!(decode(&bytes), Ok(Datagram::Id { first: a, second: b, auth: None }));
        }
    }
}
