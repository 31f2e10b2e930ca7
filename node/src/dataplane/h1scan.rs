//! An independent HTTP/1 request-stream scanner, kept as a second oracle for the engine
//! (`h1`): it follows message framing (heads, fixed bodies, chunked bodies) byte by byte and
//! records the first smuggling shape or oversize head it sees. The differential fuzz target
//! checks that whatever it flags, the engine refuses too. It never changes the bytes.

/// What the scanner refuses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Violation {
    /// Both `Content-Length` and `Transfer-Encoding` (RFC 9112 §6.3: a smuggling shape).
    LengthAndChunked,
    /// A request head above the configured limit.
    HeadTooLarge,
    /// A chunk size line that is not hex, or a chunk not followed by CRLF.
    BadChunk,
}

impl Violation {
    pub fn status(self) -> u16 {
        match self {
            Violation::HeadTooLarge => 431,
            Violation::LengthAndChunked | Violation::BadChunk => 400,
        }
    }

    pub fn reason(self) -> &'static str {
        match self {
            Violation::LengthAndChunked => "both Content-Length and Transfer-Encoding",
            Violation::HeadTooLarge => "request head too large",
            Violation::BadChunk => "malformed chunked body",
        }
    }
}

#[derive(Debug)]
enum State {
    Head,
    Fixed(u64),
    ChunkSize,
    ChunkData(u64),
    ChunkEnd,
    Trailers,
    /// Upgrades, CONNECT, or anything hyper will refuse itself: nothing more to check.
    Done,
}

/// Follows one connection's request stream.
#[derive(Debug)]
pub struct Scanner {
    state: State,
    line: Vec<u8>,
    max_head: usize,
    pub violation: Option<Violation>,
}

/// Longest chunk-size or trailer line considered.
const MAX_LINE: usize = 4096;

impl Scanner {
    pub fn new(max_head: usize) -> Scanner {
        Scanner { state: State::Head, line: Vec::new(), max_head, violation: None }
    }

    /// Consumes bytes as they arrive from the client.
    pub fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() && self.violation.is_none() {
            let used = match self.state {
                State::Done => return,
                State::Head => self.head(bytes),
                State::Fixed(n) => {
                    let take = (n.min(bytes.len() as u64)) as usize;
                    self.state = if n == take as u64 { State::Head } else { State::Fixed(n - take as u64) };
                    take
                }
                State::ChunkSize => self.chunk_size(bytes),
                State::ChunkData(n) => {
                    let take = (n.min(bytes.len() as u64)) as usize;
                    self.state = if n == take as u64 { State::ChunkEnd } else { State::ChunkData(n - take as u64) };
                    take
                }
                State::ChunkEnd => self.chunk_end(bytes),
                State::Trailers => self.trailers(bytes),
            };
            bytes = &bytes[used..];
        }
    }

    fn fail(&mut self, v: Violation) {
        self.violation = Some(v);
        self.state = State::Done;
    }

    /// Collects bytes up to the blank line ending a head; returns how many it used.
    fn head(&mut self, bytes: &[u8]) -> usize {
        if self.line.is_empty()
            && let Some(p) = find(bytes, b"\r\n\r\n")
        {
            // The usual case: a whole head in one read, inspected in place.
            return self.complete_head(bytes, p + 4);
        }
        let start = self.line.len();
        self.line.extend_from_slice(bytes);
        let search_from = start.saturating_sub(3);
        let Some(pos) = find(&self.line[search_from..], b"\r\n\r\n").map(|p| p + search_from + 4) else {
            if self.line.len() > self.max_head {
                self.fail(Violation::HeadTooLarge);
            }
            return bytes.len();
        };
        let head = std::mem::take(&mut self.line);
        self.complete_head(&head, pos);
        pos - start
    }

    /// Inspects the head `buf[..len]` and moves on to its body.
    fn complete_head(&mut self, buf: &[u8], len: usize) -> usize {
        if len > self.max_head {
            self.fail(Violation::HeadTooLarge);
            return buf.len();
        }
        let (next, length_and_chunked) = framing(&buf[..len]);
        self.state = next;
        if length_and_chunked {
            self.fail(Violation::LengthAndChunked);
        }
        len
    }

    fn chunk_size(&mut self, bytes: &[u8]) -> usize {
        self.with_line(bytes, |me, line| {
            let size = line.split(|b| *b == b';').next().unwrap_or(&[]);
            let size = std::str::from_utf8(size).ok().map(str::trim).filter(|s| !s.is_empty() && s.len() <= 16);
            match size.and_then(|s| u64::from_str_radix(s, 16).ok()) {
                Some(0) => me.state = State::Trailers,
                Some(n) => me.state = State::ChunkData(n),
                None => me.fail(Violation::BadChunk),
            }
        })
    }

    fn chunk_end(&mut self, bytes: &[u8]) -> usize {
        self.with_line(bytes, |me, line| {
            if line.is_empty() {
                me.state = State::ChunkSize;
            } else {
                me.fail(Violation::BadChunk);
            }
        })
    }

    fn trailers(&mut self, bytes: &[u8]) -> usize {
        self.with_line(bytes, |me, line| {
            if line.is_empty() {
                me.state = State::Head;
            }
        })
    }

    /// Hands the next CRLF-terminated line to `then` once it is complete and returns how many
    /// bytes it used. A line inside one read is inspected in place; only a line spanning reads
    /// is buffered, so the cost is linear and the verdict (a line longer than [`MAX_LINE`] is
    /// refused) does not depend on where reads split.
    fn with_line(&mut self, bytes: &[u8], then: impl FnOnce(&mut Self, &[u8])) -> usize {
        let pending = self.line.len();
        // A CR ending the previous read and an LF starting this one end the line.
        let split_crlf = self.line.last() == Some(&b'\r') && bytes.first() == Some(&b'\n');
        let (in_bytes, used) = if split_crlf {
            (None, 1)
        } else if let Some(p) = find(bytes, b"\r\n") {
            (Some(p), p + 2)
        } else {
            // One byte of slack for a CR that may end a line of exactly MAX_LINE bytes.
            if pending + bytes.len() > MAX_LINE + 1 {
                self.fail(Violation::BadChunk);
            } else {
                self.line.extend_from_slice(bytes);
            }
            return bytes.len();
        };
        let len = in_bytes.map_or(pending.saturating_sub(1), |p| pending + p);
        if len > MAX_LINE {
            self.fail(Violation::BadChunk);
            return used;
        }
        match in_bytes {
            Some(p) if pending == 0 => then(self, &bytes[..p]),
            _ => {
                let mut line = std::mem::take(&mut self.line);
                line.extend_from_slice(&bytes[..in_bytes.unwrap_or(0)]);
                line.truncate(len);
                then(self, &line);
                line.clear();
                self.line = line;
            }
        }
        used
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    memchr::memmem::find(hay, needle)
}

/// How the body after this head is framed (`Done` when the scanner should stop), and whether
/// the head carries both a length and a transfer coding.
fn framing(head: &[u8]) -> (State, bool) {
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut req = httparse::Request::new(&mut headers);
    let Ok(httparse::Status::Complete(_)) = req.parse(head) else { return (State::Done, false) };
    if req.method == Some("CONNECT") {
        return (State::Done, false);
    }
    let (mut length, mut chunked, mut te, mut upgrade) = (None, false, false, false);
    for h in req.headers.iter() {
        let value = std::str::from_utf8(h.value).unwrap_or("").trim();
        if h.name.eq_ignore_ascii_case("content-length") {
            length = value.parse::<u64>().ok();
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            te = true;
            chunked = value.to_ascii_lowercase().ends_with("chunked");
        } else if h.name.eq_ignore_ascii_case("upgrade") {
            upgrade = true;
        }
    }
    let has_length = req.headers.iter().any(|h| h.name.eq_ignore_ascii_case("content-length"));
    let state = match (te, chunked, length, upgrade) {
        (_, _, _, true) => State::Done,
        (true, _, _, _) if has_length => State::Done,
        (true, true, None, _) => State::ChunkSize,
        (true, false, _, _) => State::Done,
        (false, _, Some(n), _) if n > 0 => State::Fixed(n),
        _ => State::Head,
    };
    (state, te && has_length)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn scan(input: &[u8], chunk: usize) -> Option<Violation> {
        let mut s = Scanner::new(8192);
        input.chunks(chunk.max(1)).for_each(|c| s.feed(c));
        s.violation
    }

    #[test]
    fn benign_streams_pass_in_any_chunking() {
        let stream = b"GET / HTTP/1.1\r\nHost: a\r\n\r\nPOST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhelloPOST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n0\r\nX-Trailer: 1\r\n\r\nGET /last HTTP/1.1\r\nHost: a\r\n\r\n";
        for chunk in [1, 2, 3, 7, 64, stream.len()] {
            assert_eq!(scan(stream, chunk), None, "chunk {chunk}");
        }
    }

    #[test]
    fn line_limit_holds_however_reads_split() {
        let head = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n".to_vec();
        for (len, verdict) in [(MAX_LINE, None), (MAX_LINE + 1, Some(Violation::BadChunk))] {
            let mut stream = head.clone();
            stream.extend(std::iter::repeat_n(b'x', len));
            stream.extend_from_slice(b"\r\n\r\nGET / HTTP/1.1\r\n\r\n");
            for chunk in [1, 2, 7, 4096, stream.len()] {
                assert_eq!(scan(&stream, chunk), verdict, "trailer of {len} bytes in reads of {chunk}");
            }
        }
    }

    #[test]
    fn smuggling_shapes_are_caught_after_benign_requests() {
        let cl_te = b"GET / HTTP/1.1\r\nHost: a\r\n\r\nPOST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        let te_cl = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n";
        let bad_chunk = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n";
        let missing_crlf = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n";
        for chunk in [1, 5, 1000] {
            assert_eq!(scan(cl_te, chunk), Some(Violation::LengthAndChunked));
            assert_eq!(scan(te_cl, chunk), Some(Violation::LengthAndChunked));
            assert_eq!(scan(bad_chunk, chunk), Some(Violation::BadChunk));
            assert_eq!(scan(missing_crlf, chunk), Some(Violation::BadChunk));
        }
    }

    #[test]
    fn oversized_heads_are_refused() {
        let mut big = b"GET / HTTP/1.1\r\nX-Big: ".to_vec();
        big.extend(std::iter::repeat_n(b'a', 10_000));
        big.extend_from_slice(b"\r\n\r\n");
        assert_eq!(scan(&big, 1000), Some(Violation::HeadTooLarge));
        let never_ending = vec![b'a'; 9000];
        assert_eq!(scan(&never_ending, 100), Some(Violation::HeadTooLarge));
    }

    #[test]
    fn upgrades_stop_the_scan() {
        let ws = b"GET /agent HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n\x81\x05hello";
        assert_eq!(scan(ws, 3), None);
    }

    proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2000), chunk in 1usize..64) {
            let _ = scan(&bytes, chunk);
        }
    }
}
