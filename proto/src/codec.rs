//! The only file that knows the binary wire format. A frame is
//! `magic (2) | version (1) | kind (1) | length (4, big endian) | bincode body`.
//! Peers refuse frames with another magic or version instead of misreading them.

use serde::{Serialize, de::DeserializeOwned};

/// "SH".
pub const MAGIC: [u8; 2] = [0x53, 0x48];
/// Bumped on any incompatible change of a frame body (2: Raft frames carry the cluster identity;
/// 3: pool and backend settings inside commands are JSON, so later settings no longer need a bump).
pub const VERSION: u8 = 3;
/// Bytes before the body.
pub const HEADER_LEN: usize = 8;
/// Largest body accepted; snapshots are chunked below this.
pub const MAX_BODY: usize = 64 * 1024 * 1024;

/// Why a frame could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("bad magic: not a shoal frame")]
    BadMagic,
    #[error("unsupported frame version {0} (this node speaks {VERSION})")]
    BadVersion(u8),
    #[error("frame body of {0} bytes exceeds the {MAX_BODY} byte limit")]
    TooLarge(usize),
    #[error("frame body does not match its length")]
    Truncated,
    #[error("undecodable frame body: {0}")]
    Body(String),
}

/// The parsed fixed header of a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub kind: u8,
    pub len: usize,
}

/// The limit makes bincode refuse a length prefix (string, vector) larger than a frame
/// could hold before it allocates for it: prefixes come from the network.
fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_BODY>()
}

/// Encodes `msg` as a complete frame of the given kind.
pub fn encode<T: Serialize>(kind: u8, msg: &T) -> Result<Vec<u8>, CodecError> {
    frame(kind, &encode_body(msg)?)
}

/// Encodes `msg` as a frame body only (for callers that seal bodies before framing).
pub fn encode_body<T: Serialize>(msg: &T) -> Result<Vec<u8>, CodecError> {
    let body = bincode::serde::encode_to_vec(msg, config()).map_err(|e| CodecError::Body(e.to_string()))?;
    if body.len() > MAX_BODY {
        return Err(CodecError::TooLarge(body.len()));
    }
    Ok(body)
}

/// Puts a header of `kind` in front of an already encoded (or sealed) body.
pub fn frame(kind: u8, body: &[u8]) -> Result<Vec<u8>, CodecError> {
    if body.len() > MAX_BODY {
        return Err(CodecError::TooLarge(body.len()));
    }
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(kind);
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(body);
    Ok(out)
}

/// Parses and checks a frame header; the caller then reads `len` body bytes.
pub fn decode_header(bytes: &[u8; HEADER_LEN]) -> Result<Header, CodecError> {
    if bytes[0..2] != MAGIC {
        return Err(CodecError::BadMagic);
    }
    if bytes[2] != VERSION {
        return Err(CodecError::BadVersion(bytes[2]));
    }
    let len = u32::from_be_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]) as usize;
    if len > MAX_BODY {
        return Err(CodecError::TooLarge(len));
    }
    Ok(Header { kind: bytes[3], len })
}

/// Decodes a body read after its header.
pub fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, CodecError> {
    let (msg, used) = bincode::serde::decode_from_slice(body, config()).map_err(|e| CodecError::Body(e.to_string()))?;
    if used != body.len() {
        return Err(CodecError::Truncated);
    }
    Ok(msg)
}

/// Decodes a whole frame held in memory: `(kind, message)`.
pub fn decode<T: DeserializeOwned>(frame: &[u8]) -> Result<(u8, T), CodecError> {
    let head: &[u8; HEADER_LEN] =
        frame.get(..HEADER_LEN).and_then(|h| h.try_into().ok()).ok_or(CodecError::Truncated)?;
    let header = decode_header(head)?;
    let body = frame.get(HEADER_LEN..).ok_or(CodecError::Truncated)?;
    if body.len() != header.len {
        return Err(CodecError::Truncated);
    }
    Ok((header.kind, decode_body(body)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BackendSpec, Command};
    use proptest::prelude::*;

    #[test]
    fn golden_bytes_of_a_noop_frame() {
        let frame = encode(7, &Command::Noop).expect("encode");
        assert_eq!(&frame[..HEADER_LEN], &[0x53, 0x48, VERSION, 7, 0, 0, 0, 1]);
        assert_eq!(decode::<Command>(&frame).expect("decode"), (7, Command::Noop));
    }

    #[test]
    fn refuses_foreign_frames() {
        assert!(matches!(decode::<Command>(b"GET / HTTP/1.1\r\n"), Err(CodecError::BadMagic)));
        let mut frame = encode(1, &Command::Noop).expect("encode");
        frame[2] = 9;
        assert!(matches!(decode::<Command>(&frame), Err(CodecError::BadVersion(9))));
        let huge = [0x53, 0x48, VERSION, 1, 0xff, 0xff, 0xff, 0xff];
        assert!(matches!(decode_header(&huge), Err(CodecError::TooLarge(_))));
    }

    #[test]
    fn huge_length_prefix_is_refused_without_allocating() {
        // A `PutPool` whose name claims u64::MAX bytes.
        let body = [0u8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff];
        assert!(matches!(decode_body::<Command>(&body), Err(CodecError::Body(_))));
    }

    fn nested(depth: usize) -> Command {
        (0..depth).fold(Command::Noop, |inner, _| Command::Batch(vec![inner]))
    }

    #[test]
    fn deeply_nested_batches_are_refused() {
        let ok = nested(crate::command::MAX_BATCH_DEPTH);
        assert_eq!(decode_body::<Command>(&encode_body(&ok).expect("encode")).expect("decode"), ok);
        // Far deeper than any stack would survive without the guard.
        let mut body = [5u8, 1].repeat(200_000);
        body.push(6);
        assert!(matches!(decode_body::<Command>(&body), Err(CodecError::Body(_))));
        // The guard resets after a refusal: the next frame decodes normally.
        assert_eq!(decode_body::<Command>(&encode_body(&ok).expect("encode")).expect("decode"), ok);
    }

    proptest! {
        #[test]
        fn command_round_trips(pool in "[a-z]{1,8}", port in 1u16.., weight in 1u32..256, drain: bool) {
            let addr = std::net::SocketAddr::from(([10, 0, 0, 1], port));
            let cmd = Command::Batch(vec![
                Command::PutBackend { pool: pool.clone(), addr, spec: BackendSpec { weight, drain, ..BackendSpec::default() } },
                Command::SetDrain { pool, addr, drain },
            ]);
            let frame = encode(3, &cmd).expect("encode");
            prop_assert_eq!(decode::<Command>(&frame).expect("decode"), (3, cmd));
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode::<Command>(&bytes);
        }
    }
}
