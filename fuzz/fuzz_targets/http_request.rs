//! The pieces of the HTTP request path that see raw client input, without sockets:
//! the request-stream scanner (`h1scan::Scanner`), the URL mux (`mux::Mux::route`,
//! `clean_path`, `join_path`) and WebSocket pinning (`ws::pinned`).
//!
//! Input: raw bytes a client sends on a connection (one or more requests). The scanner sees them
//! in one read, split in two at a point chosen by the last input byte, and one byte per read; the
//! verdict must not depend on how the bytes were cut. The first request line and headers (parsed
//! leniently here) give the host, path and headers for the mux and pinning.
#![no_main]

use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use shoal_node::dataplane::h1scan::{Scanner, Violation};
use shoal_node::dataplane::mux::{self, Mux, Route};
use shoal_node::dataplane::ws;

/// The scanner's verdict for `data` fed in the given pieces.
fn scan<'a>(max_head: usize, pieces: impl IntoIterator<Item = &'a [u8]>) -> Option<Violation> {
    let mut s = Scanner::new(max_head);
    for p in pieces {
        s.feed(p);
    }
    s.violation
}

fn check_scanner(data: &[u8]) {
    let at = data.last().map_or(0, |b| data.len() * usize::from(*b) / 256);
    for max_head in [8192, 40] {
        let whole = scan(max_head, [data]);
        let (a, b) = data.split_at(at);
        let split = scan(max_head, [a, b]);
        let bytewise = scan(max_head, data.chunks(1));
        assert_eq!(whole, split, "verdict depends on the split at {at} (max_head {max_head})");
        assert_eq!(whole, bytewise, "verdict differs when fed byte by byte (max_head {max_head})");
        if let Some(v) = whole {
            assert!(matches!(v.status(), 400 | 431));
            assert!(!v.reason().is_empty());
            if v == Violation::HeadTooLarge {
                assert!(data.len() > max_head, "HeadTooLarge for {} bytes <= {max_head}", data.len());
            }
        }
    }
}

/// Go's ServeMux rules, written naively: host-specific patterns first, then the longest
/// matching pattern (an exact pattern is as long as the key, so it wins).
fn reference(patterns: &[(String, usize)], host: &str, path: &str) -> Option<usize> {
    let best = |key: &str| {
        patterns
            .iter()
            .filter(|(p, _)| p == key || (p.ends_with('/') && key.starts_with(p.as_str())))
            .max_by_key(|(p, _)| p.len())
            .map(|(_, i)| *i)
    };
    let has_hosts = patterns.iter().any(|(p, _)| !p.starts_with('/'));
    if has_hosts
        && !host.is_empty()
        && let Some(i) = best(&format!("{host}{path}"))
    {
        return Some(i);
    }
    best(path)
}

fn needs_cleaning(path: &str) -> bool {
    path.contains("//")
        || path.contains("/./")
        || path.contains("/../")
        || path.ends_with("/.")
        || path.ends_with("/..")
}

fn check_clean(path: &str) {
    let clean = mux::clean_path(path);
    assert!(clean.starts_with('/'), "clean_path({path:?}) = {clean:?}");
    assert!(!needs_cleaning(&clean), "clean_path({path:?}) = {clean:?} is not clean");
    assert_eq!(mux::clean_path(&clean), clean, "clean_path is not idempotent on {path:?}");
    if path.starts_with('/') && !needs_cleaning(path) {
        assert_eq!(clean, path, "clean_path changed an already clean path");
    }
    if path.ends_with('/') {
        assert!(clean.ends_with('/'), "clean_path({path:?}) = {clean:?} lost the trailing slash");
    }
}

fn check_join(prefix: &str, path: &str) {
    let joined = mux::join_path(prefix, path);
    if prefix.is_empty() || prefix == "/" {
        assert_eq!(joined, path);
    } else {
        let p = prefix.strip_suffix('/').unwrap_or(prefix);
        let rest = path.strip_prefix('/').unwrap_or(path);
        assert_eq!(joined, format!("{p}/{rest}"), "join_path({prefix:?}, {path:?})");
    }
}

fn check_mux(host: &str, path: &str) {
    // A realistic table, plus patterns derived from the request so exact, subtree, host and
    // redirect cases are all reachable.
    let mut raw: Vec<String> = ["/", "/api/", "/api/v2/", "/exact", "/tree/", "img.example.com/", "img.example.com/x"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    if let Some(i) = path.rfind('/') {
        raw.push(path[..=i].to_string());
        raw.push(format!("{path}/"));
    }
    if !host.is_empty() && !host.contains('/') {
        raw.push(format!("{host}/"));
    }
    raw.sort();
    raw.dedup();
    for skip_root in [false, true] {
        let patterns: Vec<(String, usize)> =
            raw.iter().filter(|p| !(skip_root && *p == "/")).cloned().enumerate().map(|(i, p)| (p, i)).collect();
        let m = Mux::new(patterns.iter().map(|(p, i)| (p.as_str(), *i)));
        let mut current = path.to_string();
        for hop in 0.. {
            assert!(hop <= 2, "redirect chain too long from {path:?}: now at {current:?}");
            match m.route(host, &current) {
                Route::Redirect(to) => {
                    assert!(to.starts_with('/'), "redirect to {to:?}");
                    assert_ne!(to, current, "redirect to itself");
                    current = to;
                }
                Route::NotFound => {
                    if current.starts_with('/') {
                        assert_eq!(reference(&patterns, host, &current), None, "mux missed a match for {current:?}");
                    }
                    break;
                }
                Route::Pool(i) => {
                    assert!(current.starts_with('/'));
                    assert_eq!(Some(i), reference(&patterns, host, &current), "host {host:?} path {current:?}");
                    break;
                }
            }
        }
    }
}

fn check_pinning(headers: &HeaderMap, path: &str) {
    let lookup = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let Some(pin) = ws::pinned(lookup, path) else { return };
    assert!(pin.slot > 0, "slot 0 pinned");
    if let Some(p) = &pin.path {
        assert!(p.starts_with('/'), "pinned path {p:?}");
        assert!(path.starts_with("/vm") && path.len() > p.len() && (p == "/" || path.ends_with(p.as_str())));
        let valid = |name: &str| headers.get(name).is_some_and(|v| v.to_str().is_ok());
        assert!(!valid("x-server-select") && !valid("x-cf-app-instance"), "a pinning header lost to the path");
    }
}

fuzz_target!(|data: &[u8]| {
    check_scanner(data);

    // The first request: a lenient parse for the headers, else the raw request line.
    let mut storage = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut storage);
    let parsed = req.parse(data).is_ok();
    let line = data.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let target = match (parsed, req.path) {
        (true, Some(p)) => p.to_string(),
        _ => line.split(' ').nth(1).unwrap_or("").to_string(),
    };
    let path = target.split('?').next().unwrap_or("").to_string();
    let mut headers = HeaderMap::new();
    let mut host = String::new();
    if parsed {
        for h in req.headers.iter().filter(|h| !h.name.is_empty()) {
            if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(h.name.as_bytes()), HeaderValue::from_bytes(h.value)) {
                headers.append(n, v);
            }
            if h.name.eq_ignore_ascii_case("host") {
                let raw = String::from_utf8_lossy(h.value).to_ascii_lowercase();
                host = match raw.rsplit_once(':') {
                    Some((h, p)) if !raw.starts_with('[') && p.bytes().all(|b| b.is_ascii_digit()) => h.to_string(),
                    _ => raw,
                };
            }
        }
    }

    check_clean(&path);
    check_clean(&target);
    for prefix in ["", "/", "/app", "/app/", path.as_str()] {
        check_join(prefix, &path);
        check_join(prefix, &mux::clean_path(&path));
    }
    check_mux(&host, &path);
    check_mux("", &target);
    check_pinning(&headers, &path);
    check_pinning(&HeaderMap::new(), &path);
});
