//! Body framing (RFC 9112 §6–7): how many of the bytes that follow a head belong to its body.
//! The framer sees bytes in whatever pieces the socket delivers and says which are payload;
//! chunk lines and trailers are consumed, never forwarded: the engine writes its own chunk
//! lines, so nothing a client put in a chunk extension or trailer reaches a backend.

use std::ops::Range;

use super::error::Reject;
use super::head::Framing;

/// Longest chunk-size line (digits, extensions, CRLF).
const MAX_CHUNK_LINE: u32 = 4096;
/// Largest trailer section, dropped after validation.
const MAX_TRAILERS: u32 = 8192;

/// One body in progress.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framer {
    /// Payload bytes still due.
    Length(u64),
    Chunked(Chunk),
    /// Every byte until the peer closes (responses only).
    UntilClose,
    Done,
}

/// Where a chunked body stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Chunk {
    /// In a size line: digits seen, value so far, whitespace after the digits, in an
    /// extension, line length, CR seen.
    Size {
        digits: u8,
        value: u64,
        bws: bool,
        ext: bool,
        len: u32,
        cr: bool,
    },
    Data(u64),
    /// After a chunk's data: 0 = expecting CR, 1 = expecting LF.
    DataEnd(u8),
    /// In the trailer section: bytes so far, bytes of the current line, CR seen.
    Trailer {
        total: u32,
        line: u32,
        cr: bool,
    },
}

const SIZE_START: Chunk = Chunk::Size { digits: 0, value: 0, bws: false, ext: false, len: 0, cr: false };

/// What one `feed` did: bytes used from the input, and the payload among them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    pub used: usize,
    pub data: Option<Range<usize>>,
}

impl Framer {
    pub fn new(framing: Framing) -> Framer {
        match framing {
            Framing::Empty | Framing::Length(0) => Framer::Done,
            Framing::Length(n) => Framer::Length(n),
            Framing::Chunked => Framer::Chunked(SIZE_START),
            Framing::UntilClose => Framer::UntilClose,
        }
    }

    pub fn done(&self) -> bool {
        *self == Framer::Done
    }

    /// Consumes the next bytes of `input`: stops after one run of payload, or at the end of
    /// the body. Call again with the rest while `used < input.len()` and not done.
    pub fn feed(&mut self, input: &[u8]) -> Result<Step, Reject> {
        match self {
            Framer::Done => Ok(Step { used: 0, data: None }),
            Framer::UntilClose => Ok(Step { used: input.len(), data: Some(0..input.len()) }),
            Framer::Length(left) => {
                let n = (*left).min(input.len() as u64) as usize;
                *left -= n as u64;
                if *left == 0 {
                    *self = Framer::Done;
                }
                Ok(Step { used: n, data: (n > 0).then_some(0..n) })
            }
            Framer::Chunked(state) => {
                let (used, data, done) = chunked(state, input)?;
                if done {
                    *self = Framer::Done;
                }
                Ok(Step { used, data })
            }
        }
    }
}

/// Runs the chunked state machine over `input` until a run of data, the end, or the input ends.
fn chunked(state: &mut Chunk, input: &[u8]) -> Result<(usize, Option<Range<usize>>, bool), Reject> {
    let mut i = 0;
    while i < input.len() {
        if let Chunk::Data(left) = state {
            let n = (*left).min((input.len() - i) as u64) as usize;
            *left -= n as u64;
            if *left == 0 {
                *state = Chunk::DataEnd(0);
            }
            return Ok((i + n, Some(i..i + n), false));
        }
        let b = input[i];
        i += 1;
        if step(state, b)? {
            return Ok((i, None, true));
        }
    }
    Ok((i, None, false))
}

/// One byte outside chunk data; true when the body ended.
fn step(state: &mut Chunk, b: u8) -> Result<bool, Reject> {
    match state {
        Chunk::Size { digits, value, bws, ext, len, cr } => {
            *len += 1;
            if *len > MAX_CHUNK_LINE {
                return Err(Reject::BadChunk("chunk size line too long"));
            }
            if *cr {
                if b != b'\n' {
                    return Err(Reject::BadChunk("CR without LF in a chunk size line"));
                }
                if *digits == 0 {
                    return Err(Reject::BadChunk("chunk size without digits"));
                }
                *state =
                    if *value == 0 { Chunk::Trailer { total: 0, line: 0, cr: false } } else { Chunk::Data(*value) };
                return Ok(false);
            }
            size_byte(digits, value, bws, ext, cr, b)?;
        }
        Chunk::DataEnd(seen) => match (*seen, b) {
            (0, b'\r') => *seen = 1,
            (1, b'\n') => *state = SIZE_START,
            _ => return Err(Reject::BadChunk("chunk data not followed by CRLF")),
        },
        Chunk::Trailer { total, line, cr } => return trailer_byte(total, line, cr, b),
        Chunk::Data(_) => unreachable!("data is consumed in runs"),
    }
    Ok(false)
}

fn size_byte(
    digits: &mut u8,
    value: &mut u64,
    bws: &mut bool,
    ext: &mut bool,
    cr: &mut bool,
    b: u8,
) -> Result<(), Reject> {
    match b {
        b'\r' => *cr = true,
        _ if *ext => {
            // Extensions: visible ASCII, space and tab only (no bare LF, NUL or controls).
            if !(b == b'\t' || (b' '..=b'~').contains(&b)) {
                return Err(Reject::BadChunk("invalid byte in a chunk extension"));
            }
        }
        b';' if *digits > 0 => *ext = true,
        // RFC 9112 §7.1.1: only whitespace may stand between the size and the `;` of an
        // extension; `5 6` must not read as 5 here and as something else elsewhere.
        b' ' | b'\t' if *digits > 0 => *bws = true,
        _ if *bws => return Err(Reject::BadChunk("chunk size followed by more than whitespace")),
        _ => {
            let d = (b as char).to_digit(16).ok_or(Reject::BadChunk("invalid chunk size"))?;
            *digits += 1;
            if *digits > 16 {
                return Err(Reject::BadChunk("chunk size too large"));
            }
            *value = (*value << 4) | u64::from(d);
        }
    }
    Ok(())
}

/// Trailer lines are checked for line endings and size, then dropped.
fn trailer_byte(total: &mut u32, line: &mut u32, cr: &mut bool, b: u8) -> Result<bool, Reject> {
    *total += 1;
    if *total > MAX_TRAILERS {
        return Err(Reject::BadChunk("trailer section too large"));
    }
    if *cr {
        if b != b'\n' {
            return Err(Reject::BadChunk("CR without LF in the trailer section"));
        }
        if *line == 0 {
            return Ok(true);
        }
        (*line, *cr) = (0, false);
        return Ok(false);
    }
    match b {
        b'\r' => *cr = true,
        b'\n' | 0 => return Err(Reject::BadChunk("bare LF or NUL in the trailer section")),
        _ => *line += 1,
    }
    // The line limit of chunk size lines holds for trailer lines too (as in `h1scan`).
    if *line > MAX_CHUNK_LINE {
        return Err(Reject::BadChunk("trailer line too long"));
    }
    Ok(false)
}

/// Feeds `input` to `framer` until it is used up or the body ends, calling `data` with each
/// run of payload; returns the bytes used.
pub fn drain(framer: &mut Framer, input: &[u8], mut data: impl FnMut(&[u8])) -> Result<usize, Reject> {
    let mut at = 0;
    while at < input.len() && !framer.done() {
        let step = framer.feed(&input[at..])?;
        if let Some(r) = step.data {
            data(&input[at + r.start..at + r.end]);
        }
        at += step.used;
    }
    Ok(at)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Payload and bytes used for `input` fed in pieces of `piece` bytes.
    fn run(framing: Framing, input: &[u8], piece: usize) -> Result<(Vec<u8>, usize, bool), Reject> {
        let mut f = Framer::new(framing);
        let (mut out, mut used) = (Vec::new(), 0);
        for p in input.chunks(piece.max(1)) {
            if f.done() {
                break;
            }
            used += drain(&mut f, p, |d| out.extend_from_slice(d))?;
        }
        Ok((out, used, f.done()))
    }

    #[test]
    fn lengths_and_chunks() {
        assert_eq!(run(Framing::Length(3), b"abcdef", 100).expect("ok"), (b"abc".to_vec(), 3, true));
        let body = b"5;name=\"v\"\r\nhello\r\n3\r\n, w\r\n0\r\nX-T: 1\r\n\r\nNEXT";
        for piece in [1, 2, 7, 100] {
            let (data, used, done) = run(Framing::Chunked, body, piece).expect("valid");
            assert_eq!((data.as_slice(), used, done), (&b"hello, w"[..], body.len() - 4, true), "piece {piece}");
        }
    }

    #[test]
    fn whitespace_may_end_a_size_or_precede_an_extension() {
        for body in [&b"5 \r\nhello\r\n0\r\n\r\n"[..], b"5 \t;a=b c\r\nhello\r\n0\t\r\n\r\n"] {
            let (data, used, done) = run(Framing::Chunked, body, 1).expect("valid");
            assert_eq!((data.as_slice(), used, done), (&b"hello"[..], body.len(), true));
        }
        let trailer = [b"0\r\nX: ".as_slice(), &[b'a'; 4093], b"\r\n\r\n"].concat();
        assert_eq!(
            run(Framing::Chunked, &trailer, 100).expect("a 4096-byte trailer line"),
            (vec![], trailer.len(), true)
        );
    }

    #[test]
    fn bad_chunk_lines_are_refused() {
        let bad: [&[u8]; 12] = [
            b"\r\n",
            b";ext\r\n",
            b"5;a\nb\r\nhello\r\n0\r\n\r\n",
            b"11111111111111111\r\n",
            b"0x5\r\n",
            b" 5\r\n",
            b"5\r\nhelloXX0\r\n\r\n",
            b"5\nhello\r\n",
            b"0\r\nX: 1\n\r\n",
            b"5 6\r\nhello\r\n0\r\n\r\n",
            b"5\t;a\r\nhello\r\n0 x\r\n\r\n",
            &[b"0\r\nX: ".as_slice(), &[b'a'; 4094], b"\r\n\r\n"].concat(),
        ];
        for b in bad {
            assert!(run(Framing::Chunked, b, 100).is_err(), "{:?}", String::from_utf8_lossy(b));
        }
    }

    proptest! {
        #[test]
        fn any_split_gives_the_same_body(data in proptest::collection::vec(any::<u8>(), 0..300), piece in 1usize..40) {
            let mut enc = Vec::new();
            for c in data.chunks(37) {
                enc.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
                enc.extend_from_slice(c);
                enc.extend_from_slice(b"\r\n");
            }
            enc.extend_from_slice(b"0\r\n\r\n");
            let (out, used, done) = run(Framing::Chunked, &enc, piece).expect("valid");
            prop_assert_eq!(out, data);
            prop_assert_eq!(used, enc.len());
            prop_assert!(done);
        }
    }
}
