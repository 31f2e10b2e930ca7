//! Request correlation headers: `X-Request-Id` (kept when the client's is usable, else a new
//! UUIDv4-shaped id) and W3C `traceparent` (passed through when valid, else a new trace is
//! started, sampled, so backends with a parent-based sampler trace it as they did before a
//! proxy stood in front of them). Pure: the HTTP engine asks, the emitter writes.

use std::cell::RefCell;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

pub const REQUEST_ID: &str = "x-request-id";
pub const TRACEPARENT: &str = "traceparent";

/// Longest client-sent request id kept; longer ones are replaced (they would bloat every log line).
pub const MAX_REQUEST_ID: usize = 128;

/// Whether the node keeps and makes each header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdSettings {
    pub request_id: bool,
    pub traceparent: bool,
}

impl Default for IdSettings {
    fn default() -> Self {
        IdSettings { request_id: true, traceparent: true }
    }
}

/// A client's request id is kept when it is 1..=128 visible ASCII characters without quotes
/// or backslashes (so it is written into a log line and a header unchanged).
pub fn valid_request_id(v: &[u8]) -> bool {
    !v.is_empty() && v.len() <= MAX_REQUEST_ID && v.iter().all(|&b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
}

/// W3C Trace Context `traceparent`: `00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`,
/// lower-case, ids not all zero. A later version may carry more fields after a `-`; version
/// `ff` is invalid.
pub fn valid_traceparent(v: &[u8]) -> bool {
    if v.len() < 55 || (v.len() > 55 && (v[..2] == *b"00" || v[55] != b'-')) {
        return false;
    }
    let hex = |s: &[u8]| s.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    let zero = |s: &[u8]| s.iter().all(|&b| b == b'0');
    let (version, trace, parent, flags) = (&v[0..2], &v[3..35], &v[36..52], &v[53..55]);
    v[2] == b'-'
        && v[35] == b'-'
        && v[52] == b'-'
        && hex(version)
        && version != b"ff"
        && hex(trace)
        && !zero(trace)
        && hex(parent)
        && !zero(parent)
        && hex(flags)
}

thread_local! {
    // Seeded from the OS once per thread: ids need uniqueness, not secrecy, and a request
    // must not pay for a cryptographic generator.
    static RNG: RefCell<SmallRng> = RefCell::new(SmallRng::from_os_rng());
}

fn random_u128() -> u128 {
    RNG.with(|r| r.borrow_mut().random())
}

/// A new request id: 128 random bits written as a version 4 UUID.
pub fn new_request_id() -> String {
    let bits = random_u128() & !(0xf << 76) & !(0x3 << 62) | (0x4 << 76) | (0x2 << 62);
    // One allocation per request: the groups are formatted straight from the bits.
    let group = |shift: u32, mask: u128| (bits >> shift) & mask;
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        group(96, 0xffff_ffff),
        group(80, 0xffff),
        group(64, 0xffff),
        group(48, 0xffff),
        group(0, 0xffff_ffff_ffff)
    )
}

/// A new trace: random trace and span ids (never zero), sampled.
pub fn new_traceparent() -> String {
    let bits = random_u128();
    let trace = if bits == 0 { 1 } else { bits };
    let span = (random_u128() as u64).max(1);
    format!("00-{trace:032x}-{span:016x}-01")
}

/// What a request carries onwards, decided from the header values the client sent (`None`:
/// absent, or sent more than once).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Ids {
    /// The request id logged; sent to the backend and to the client when `own_request_id`.
    pub request_id: Option<String>,
    /// The proxy sends `request_id` itself (any client line is dropped).
    pub own_request_id: bool,
    /// A traceparent of our own, replacing the client's (`None`: the client's passes as is).
    pub new_traceparent: Option<String>,
    /// The client sent a value that was replaced (counted as malformed input).
    pub replaced_request_id: bool,
    pub replaced_traceparent: bool,
}

impl Ids {
    pub fn decide(settings: IdSettings, request_id: Option<&[u8]>, traceparent: Option<&[u8]>) -> Ids {
        let mut ids = Ids::default();
        if settings.request_id {
            ids.own_request_id = true;
            match request_id {
                Some(v) if valid_request_id(v) => ids.request_id = std::str::from_utf8(v).ok().map(str::to_string),
                other => {
                    ids.replaced_request_id = other.is_some();
                    ids.request_id = Some(new_request_id());
                }
            }
        } else if let Some(v) = request_id.filter(|v| valid_request_id(v)) {
            // Not ours to make, but worth logging when the client brought one.
            ids.request_id = std::str::from_utf8(v).ok().map(str::to_string);
        }
        if settings.traceparent && !traceparent.is_some_and(valid_traceparent) {
            ids.replaced_traceparent = traceparent.is_some();
            ids.new_traceparent = Some(new_traceparent());
        }
        ids
    }

    /// The request id the proxy sends to the backend and the client.
    pub fn sent_request_id(&self) -> Option<&str> {
        self.request_id.as_deref().filter(|_| self.own_request_id)
    }

    /// Whether a header line (client's or backend's) is dropped because the proxy sends its own value.
    pub fn replaces(&self, name: &[u8]) -> bool {
        (self.own_request_id && name.eq_ignore_ascii_case(REQUEST_ID.as_bytes()))
            || (self.new_traceparent.is_some() && name.eq_ignore_ascii_case(TRACEPARENT.as_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn request_ids_are_bounded_visible_ascii() {
        assert!(valid_request_id(b"abc-123_XYZ.=/+:"));
        assert!(valid_request_id(&[b'a'; 128]));
        assert!(!valid_request_id(&[b'a'; 129]));
        assert!(!valid_request_id(b""));
        assert!(!valid_request_id(b"a b"));
        assert!(!valid_request_id(b"a\"b"));
        assert!(!valid_request_id(b"a\\b"));
        assert!(!valid_request_id("é".as_bytes()));
        assert!(!valid_request_id(b"a\tb"));
    }

    #[test]
    fn traceparents_follow_the_w3c_grammar() {
        assert!(valid_traceparent(TP.as_bytes()));
        assert!(valid_traceparent(b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-later"));
        assert!(!valid_traceparent(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-more"));
        assert!(!valid_traceparent(b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"));
        assert!(!valid_traceparent(b"00-00000000000000000000000000000000-00f067aa0ba902b7-01"));
        assert!(!valid_traceparent(b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01"));
        assert!(!valid_traceparent(b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01"));
        assert!(!valid_traceparent(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7"));
        assert!(!valid_traceparent(b"00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"));
        assert!(!valid_traceparent(b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x"));
    }

    #[test]
    fn generated_values_are_well_formed_and_distinct() {
        let a = new_request_id();
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4", "{a}");
        assert!(matches!(&a[19..20], "8" | "9" | "a" | "b"), "{a}");
        assert!(valid_request_id(a.as_bytes()));
        assert_ne!(a, new_request_id());
        let t = new_traceparent();
        assert!(valid_traceparent(t.as_bytes()), "{t}");
        assert!(t.ends_with("-01"));
        assert_ne!(t, new_traceparent());
    }

    #[test]
    fn ids_are_kept_replaced_or_made() {
        let on = IdSettings::default();
        let kept = Ids::decide(on, Some(b"client-1"), Some(TP.as_bytes()));
        assert_eq!(kept.sent_request_id(), Some("client-1"));
        assert_eq!(kept.new_traceparent, None);
        assert!(!kept.replaced_request_id && !kept.replaced_traceparent);
        assert!(kept.replaces(b"X-Request-ID"), "ours is sent, so the client's line is dropped");
        assert!(!kept.replaces(b"traceparent"), "a valid traceparent passes as is");

        let bad = Ids::decide(on, Some(b"has space"), Some(b"garbage"));
        assert_ne!(bad.request_id.as_deref(), Some("has space"));
        assert!(bad.replaced_request_id && bad.replaced_traceparent);
        assert!(bad.replaces(b"Traceparent"));

        let absent = Ids::decide(on, None, None);
        assert!(absent.request_id.is_some() && absent.new_traceparent.is_some());
        assert!(!absent.replaced_request_id && !absent.replaced_traceparent);

        let off = IdSettings { request_id: false, traceparent: false };
        let passed = Ids::decide(off, Some(b"bad id"), Some(b"garbage"));
        assert_eq!(passed, Ids::default());
        assert_eq!(passed.sent_request_id(), None);
        assert!(!passed.replaces(b"x-request-id") && !passed.replaces(b"traceparent"));
        assert_eq!(Ids::decide(off, Some(b"ok"), None).request_id.as_deref(), Some("ok"));
    }
}
