//! Every way a proxied request can fail, in one type: what failed, whether another attempt may
//! take the request (never when a byte of it may have reached a backend), which status the
//! client gets, and whether the backend counts a passive failure. Failure sites return these;
//! `server.rs` turns them into responses in one place.

use std::fmt;

/// A request the engine refuses before any byte reaches a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reject {
    HeadTooLarge,
    /// The request line alone is longer than the head limit.
    UriTooLong,
    /// HTTP/2.0 or later in an HTTP/1 request line.
    Version,
    TooManyHeaders,
    BareLf,
    Malformed(&'static str),
    Framing(&'static str),
    Host(&'static str),
    Target(&'static str),
    Upgrade(&'static str),
    Connect,
    BadChunk(&'static str),
    HeadTimeout,
}

impl Reject {
    pub fn status(&self) -> u16 {
        match self {
            Reject::HeadTooLarge | Reject::TooManyHeaders => 431,
            Reject::UriTooLong => 414,
            Reject::Version => 505,
            Reject::Connect => 405,
            Reject::HeadTimeout => 408,
            _ => 400,
        }
    }

    pub fn reason(&self) -> &'static str {
        match self {
            Reject::HeadTooLarge => "request head too large",
            Reject::UriTooLong => "request target too long",
            Reject::Version => "HTTP version not supported",
            Reject::TooManyHeaders => "too many header fields",
            Reject::BareLf => "bare LF line ending in the request head",
            Reject::Connect => "CONNECT is not supported",
            Reject::HeadTimeout => "request head not received in time",
            Reject::Malformed(r)
            | Reject::Framing(r)
            | Reject::Host(r)
            | Reject::Target(r)
            | Reject::Upgrade(r)
            | Reject::BadChunk(r) => r,
        }
    }

    /// The `shoal_rejected_inputs_total` label.
    pub fn metric(&self) -> &'static str {
        match self {
            Reject::Framing(_) => "http_smuggling",
            Reject::HeadTimeout => "http_head_timeout",
            _ => "http_framing",
        }
    }
}

/// Why an exchange with a backend failed.
#[derive(Debug)]
pub enum ProxyError {
    /// The client's bytes broke the rules mid-exchange (a bad chunk).
    Reject(Reject),
    /// The client went away; nobody to answer.
    ClientGone,
    /// No connection could be made: nothing was sent.
    Connect(String),
    /// A reused connection was closed by the backend before it answered, and the whole
    /// request can be sent again.
    Stale,
    /// The backend failed after the request (or part of it) was sent.
    BackendIo(String),
    BackendTimeout,
    BadResponse(&'static str),
    /// The backend switched protocols although the request asked for no upgrade.
    UnaskedUpgrade,
    /// The backend failed after the response started: the client connection is cut.
    Truncated(String),
}

impl ProxyError {
    /// Whether another attempt may carry the request: only when it never left the proxy, or
    /// went to a pooled connection that died idle and can be replayed whole.
    pub fn retryable(&self) -> bool {
        matches!(self, ProxyError::Connect(_) | ProxyError::Stale)
    }

    /// Status for the client; `None` when no answer can be written.
    pub fn status(&self) -> Option<u16> {
        match self {
            ProxyError::Reject(r) => Some(r.status()),
            ProxyError::ClientGone | ProxyError::Truncated(_) => None,
            ProxyError::BackendTimeout => Some(504),
            _ => Some(502),
        }
    }

    /// Whether it counts against the backend's health (passive ejection).
    pub fn passive_failure(&self) -> bool {
        matches!(
            self,
            ProxyError::Connect(_) | ProxyError::BackendIo(_) | ProxyError::BadResponse(_) | ProxyError::Truncated(_)
        )
    }

    pub fn reason(&self) -> &str {
        match self {
            ProxyError::Reject(r) => r.reason(),
            ProxyError::ClientGone => "client went away",
            ProxyError::Connect(_) => "no backend could be reached",
            ProxyError::Stale => "backend closed the connection",
            ProxyError::BackendIo(_) => "backend failed to answer",
            ProxyError::BackendTimeout => "backend response timeout",
            ProxyError::BadResponse(r) => r,
            ProxyError::UnaskedUpgrade => "backend switched protocols unasked",
            ProxyError::Truncated(_) => "backend response cut short",
        }
    }
}

impl fmt::Display for ProxyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProxyError::Connect(e) | ProxyError::BackendIo(e) | ProxyError::Truncated(e) => {
                write!(f, "{}: {e}", self.reason())
            }
            _ => f.write_str(self.reason()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_unsent_requests_are_retried() {
        assert!(ProxyError::Connect("refused".into()).retryable());
        assert!(ProxyError::Stale.retryable());
        for e in [ProxyError::BackendIo("reset".into()), ProxyError::BackendTimeout, ProxyError::BadResponse("x")] {
            assert!(!e.retryable(), "{e}");
        }
        assert_eq!(ProxyError::BackendTimeout.status(), Some(504));
        assert_eq!(ProxyError::ClientGone.status(), None);
        assert_eq!(ProxyError::Reject(Reject::BadChunk("x")).status(), Some(400));
        assert!(!ProxyError::Reject(Reject::BadChunk("x")).passive_failure());
    }
}
