//! WebSocket frame boundaries in one direction of a relayed byte stream (RFC 6455 §5.2).
//! The relay never rewrites frames; it only needs to know where one ends so that, when the node
//! shuts down, it can insert a close frame between two frames instead of cutting one in half.

/// Close code 1001: the endpoint is going away (node shutdown).
pub const GOING_AWAY: u16 = 1001;

/// Where the stream stands relative to frame boundaries.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FrameTracker {
    header: [u8; 14],
    have: usize,
    /// Payload bytes still to come of the current frame (valid when the header is complete).
    remaining: u64,
}

impl FrameTracker {
    /// True between two frames.
    pub fn at_boundary(&self) -> bool {
        self.have == 0 && self.remaining == 0
    }

    /// Consumes `bytes`; returns how many of them complete the frame in progress (the rest
    /// belongs to later frames). Returns 0 when already at a boundary.
    pub fn feed(&mut self, bytes: &[u8]) -> usize {
        let mut i = 0;
        let mut first_boundary = None;
        while i < bytes.len() {
            if self.remaining > 0 {
                let take = (self.remaining.min((bytes.len() - i) as u64)) as usize;
                self.remaining -= take as u64;
                i += take;
            } else {
                self.header[self.have] = bytes[i];
                self.have += 1;
                i += 1;
                if let Some(payload) = self.header_complete() {
                    self.have = 0;
                    self.remaining = payload;
                }
            }
            if self.at_boundary() && first_boundary.is_none() {
                first_boundary = Some(i);
            }
        }
        first_boundary.unwrap_or(bytes.len())
    }

    /// Bytes of `bytes` up to (and including) the end of the frame in progress.
    pub fn until_boundary(&self, bytes: &[u8]) -> usize {
        let mut probe = self.clone();
        if probe.at_boundary() {
            return 0;
        }
        probe.feed(bytes)
    }

    /// The payload length once the header is complete, `None` while more header bytes are due.
    fn header_complete(&self) -> Option<u64> {
        let h = &self.header[..self.have];
        if h.len() < 2 {
            return None;
        }
        let masked = h[1] & 0x80 != 0;
        let mask_len = if masked { 4 } else { 0 };
        let (len, ext) = match h[1] & 0x7f {
            126 => (None, 2),
            127 => (None, 8),
            n => (Some(u64::from(n)), 0),
        };
        if h.len() < 2 + ext + mask_len {
            return None;
        }
        let len = len.unwrap_or_else(|| h[2..2 + ext].iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b)));
        Some(len)
    }
}

/// A close frame with `code`; `masked` for the client-to-server direction (RFC 6455 §5.3).
pub fn close_frame(code: u16, masked: bool) -> Vec<u8> {
    let payload = code.to_be_bytes();
    if !masked {
        return vec![0x88, 0x02, payload[0], payload[1]];
    }
    let mask: [u8; 4] = rand::random();
    vec![0x88, 0x82, mask[0], mask[1], mask[2], mask[3], payload[0] ^ mask[0], payload[1] ^ mask[1]]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(payload_len: usize, masked: bool) -> Vec<u8> {
        let mut f = vec![0x82];
        let m = if masked { 0x80 } else { 0 };
        match payload_len {
            n if n < 126 => f.push(m | n as u8),
            n if n <= 0xffff => {
                f.push(m | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(m | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        if masked {
            f.extend_from_slice(&[1, 2, 3, 4]);
        }
        f.extend(std::iter::repeat_n(0xab, payload_len));
        f
    }

    #[test]
    fn tracks_boundaries_across_arbitrary_chunks() {
        for (len, masked) in [(0, false), (5, true), (125, false), (126, true), (70_000, false)] {
            let bytes: Vec<u8> = [frame(len, masked), frame(3, masked)].concat();
            for chunk in [1, 2, 7, 1000, bytes.len()] {
                let mut t = FrameTracker::default();
                let mut boundaries = 0;
                for piece in bytes.chunks(chunk) {
                    t.feed(piece);
                    boundaries += usize::from(t.at_boundary());
                }
                assert!(t.at_boundary(), "len {len} chunk {chunk}");
                assert!(boundaries >= 1);
            }
        }
    }

    #[test]
    fn until_boundary_stops_at_the_end_of_the_current_frame() {
        let mut t = FrameTracker::default();
        let first = frame(10, false);
        t.feed(&first[..5]);
        let rest: Vec<u8> = [&first[5..], &frame(4, false)[..]].concat();
        assert_eq!(t.until_boundary(&rest), first.len() - 5);
        assert_eq!(FrameTracker::default().until_boundary(&rest), 0, "already at a boundary");
    }

    #[test]
    fn close_frames_are_well_formed() {
        assert_eq!(close_frame(GOING_AWAY, false), vec![0x88, 0x02, 0x03, 0xe9]);
        let masked = close_frame(GOING_AWAY, true);
        let code = [masked[6] ^ masked[2], masked[7] ^ masked[3]];
        assert_eq!(u16::from_be_bytes(code), 1001);
    }
}
