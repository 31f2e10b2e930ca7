//! The node-to-node frame codec (`magic | version | kind | u32 BE length | bincode body`).
//!
//! Input: a whole frame. It is decoded as a `Command` frame, and its bytes are also tried as a
//! bare body of a `Command` and of a `State` (what snapshots carry), so the fuzzer does not have
//! to rediscover the header to explore bincode. Whatever decodes must re-encode to a frame that
//! decodes to the same value, and encoding must be deterministic. Decoded commands are also run
//! through `apply`, the pure function every node runs on committed commands.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_proto::codec::{self, CodecError, HEADER_LEN, MAGIC, MAX_BODY, VERSION};
use shoal_proto::{Command, PoolSpec, State, apply};

fn check_header(data: &[u8]) {
    let Some(head) = data.get(..HEADER_LEN) else { return };
    let head: &[u8; HEADER_LEN] = head.try_into().expect("8 bytes");
    match codec::decode_header(head) {
        Ok(h) => {
            assert_eq!(head[..2], MAGIC);
            assert_eq!(head[2], VERSION);
            assert_eq!(h.kind, head[3]);
            assert_eq!(h.len, u32::from_be_bytes([head[4], head[5], head[6], head[7]]) as usize);
            assert!(h.len <= MAX_BODY);
        }
        Err(CodecError::BadMagic) => assert_ne!(head[..2], MAGIC),
        Err(CodecError::BadVersion(v)) => assert!(head[..2] == MAGIC && v == head[2] && v != VERSION),
        Err(CodecError::TooLarge(n)) => assert!(n > MAX_BODY),
        Err(e) => panic!("decode_header returned {e:?}"),
    }
}

/// `(kind, value)` decoded from a frame: re-encoding gives a frame that decodes to the same
/// value, and encoding that value again gives the very same bytes.
fn round_trip<T>(kind: u8, value: &T)
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let frame = codec::encode(kind, value).expect("a decoded value re-encodes");
    assert_eq!(&frame[..2], &MAGIC);
    assert_eq!(frame[2], VERSION);
    assert_eq!(frame[3], kind);
    assert_eq!(frame.len() - HEADER_LEN, u32::from_be_bytes([frame[4], frame[5], frame[6], frame[7]]) as usize);
    let (k2, again): (u8, T) = codec::decode(&frame).expect("a re-encoded frame decodes");
    assert_eq!(k2, kind);
    assert_eq!(&again, value, "round trip changed the value");
    assert_eq!(codec::encode(kind, &again).expect("encode"), frame, "encoding is not deterministic");
    let body = codec::encode_body(value).expect("encode_body");
    assert_eq!(body, frame[HEADER_LEN..], "encode_body and encode disagree");
    assert_eq!(codec::frame(kind, &body).expect("frame"), frame);
}

/// `apply` is all or nothing and bumps the version exactly on success (except `Noop`).
fn check_apply(cmd: &Command) {
    // Give the command something to act on: a pool and backends it may address by name
    // (the ones the seed frames use).
    let mut base = State::default();
    let spec = PoolSpec { pattern: Some("/".into()), ..PoolSpec::default() };
    apply(&mut base, &Command::PutPool { name: "web".into(), spec }).expect("seed pool");
    for addr in ["10.0.0.1:8082", "[2001:db8::1]:443"] {
        let put =
            Command::PutBackend { pool: "web".into(), addr: addr.parse().expect("addr"), spec: Default::default() };
        apply(&mut base, &put).expect("seed backend");
    }
    for start in [State::default(), base] {
        let mut state = start.clone();
        match apply(&mut state, cmd) {
            Ok(applied) => {
                let bump = u64::from(!matches!(cmd, Command::Noop));
                assert_eq!(applied.version, start.version + bump);
                assert_eq!(state.version, applied.version);
                // What apply accepted survives the wire unchanged.
                round_trip(9, &state);
            }
            Err(e) => {
                assert_eq!(state, start, "a refused command changed the state: {e}");
                assert!(matches!(e.status(), 400 | 404 | 409));
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    check_header(data);
    match codec::decode::<Command>(data) {
        Ok((kind, cmd)) => {
            assert!(data.len() >= HEADER_LEN);
            assert_eq!(kind, data[3]);
            round_trip(kind, &cmd);
            check_apply(&cmd);
        }
        Err(CodecError::Truncated) | Err(CodecError::Body(_)) => {}
        Err(CodecError::BadMagic | CodecError::BadVersion(_) | CodecError::TooLarge(_)) => {
            assert!(data.len() >= HEADER_LEN, "a header error needs a whole header");
        }
    }
    if let Ok(cmd) = codec::decode_body::<Command>(data) {
        round_trip(1, &cmd);
        check_apply(&cmd);
    }
    if let Ok(state) = codec::decode_body::<State>(data) {
        round_trip(2, &state);
    }
});
