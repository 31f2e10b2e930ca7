//! Seed 004's UDP heartbeat datagrams: the decoder, and the per-pool tracker fed a stream of them.
//!
//! Input: the raw datagram bytes. For the tracker the input is also split on NUL bytes into a
//! sequence of datagrams, sent from a few sources with the clock advancing between them.
#![no_main]

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use shoal_node::health::heartbeat::{HbEvent, Tracker, TrackerConfig};
use shoal_proto::heartbeat::{AUTH, Datagram, MAX_DATAGRAM, Malformed, OK, decode, encode_id};

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("static address")
}

fn check_decode(bytes: &[u8]) {
    let got = decode(bytes);
    if bytes.len() > MAX_DATAGRAM {
        assert_eq!(got, Err(Malformed::TooLong));
        return;
    }
    match std::str::from_utf8(bytes) {
        Err(_) => assert_eq!(got, Err(Malformed::NotText)),
        Ok(text) => match text.trim() {
            "OK" => assert_eq!(got, Ok(Datagram::Ok)),
            "AUTH" => assert_eq!(got, Ok(Datagram::Auth)),
            _ => assert!(!matches!(
                got,
                Ok(Datagram::Ok | Datagram::Auth) | Err(Malformed::NotText | Malformed::TooLong)
            )),
        },
    }
    // Trailing white space (a newline from `nc`) never changes the meaning.
    if bytes.len() < MAX_DATAGRAM {
        let mut nl = bytes.to_vec();
        nl.push(b'\n');
        assert_eq!(decode(&nl), got, "a trailing newline changed the decoding");
    }
    // An identification re-encodes to a datagram that decodes to the same thing.
    if let Ok(Datagram::Id { first, second, auth }) = got {
        if let Some(a) = auth {
            assert!(!a.is_empty() && !a.bytes().any(|b| b.is_ascii_whitespace()), "auth token {a:?}");
        }
        let again = encode_id(first, second, auth);
        if again.len() <= MAX_DATAGRAM {
            assert_eq!(decode(&again), got, "re-encoded {:?}", String::from_utf8_lossy(&again));
        } else {
            assert_eq!(decode(&again), Err(Malformed::TooLong));
        }
    }
}

/// Drives one tracker through the datagram sequence, checking its event stream stays coherent.
fn run_tracker(datagrams: &[&[u8]], self_register: bool, secret: Option<&str>) {
    let servers = vec![
        (addr("0.0.0.0:7000"), addr("0.0.0.0:7001")),
        (addr("10.0.0.1:8000"), addr("10.0.0.1:8001")),
        (addr("[::]:9000"), addr("[::]:9001")),
    ];
    let mut tracker = Tracker::new(TrackerConfig {
        servers: servers.clone(),
        self_register,
        max_self_registered: 8,
        timeout: Duration::from_secs(2),
        secret: secret.map(str::to_string),
    });
    let sources = [addr("127.0.0.1:7001"), addr("10.0.0.1:8001"), addr("[::1]:9001"), addr("192.0.2.7:40000")];
    let start = tokio::time::Instant::now();
    let mut up: HashSet<SocketAddr> = HashSet::new();
    let mut registered: HashSet<SocketAddr> = HashSet::new();
    let mut seen: HashSet<SocketAddr> = HashSet::new();
    let mut apply = |events: &[HbEvent], up: &mut HashSet<SocketAddr>, seen: &mut HashSet<SocketAddr>| {
        for e in events {
            match *e {
                HbEvent::Up { tcp, .. } => {
                    assert!(up.insert(tcp), "Up for {tcp} which was already up: {events:?}");
                    seen.insert(tcp);
                }
                HbEvent::Down { tcp } => assert!(up.remove(&tcp), "Down for {tcp} which was not up: {events:?}"),
                HbEvent::Registered { tcp, .. } => {
                    assert!(self_register, "Registered without self_register");
                    assert!(registered.insert(tcp), "{tcp} registered twice");
                    seen.insert(tcp);
                }
                HbEvent::Forgotten { tcp } => {
                    assert!(registered.remove(&tcp), "Forgotten {tcp} that was not registered");
                    assert!(!up.contains(&tcp), "Forgotten {tcp} while up");
                }
            }
        }
    };
    for (i, bytes) in datagrams.iter().enumerate() {
        let src = sources[(i + bytes.len()) % sources.len()];
        let now = start + Duration::from_millis(700 * i as u64);
        let out = tracker.on_datagram(src, bytes, now);
        let decoded = decode(bytes);
        assert_eq!(out.malformed, decoded.is_err(), "malformed flag disagrees with decode");
        if out.malformed {
            assert!(out.reply.is_none() && out.events.is_empty(), "dropped datagram had effects: {out:?}");
        }
        if out.refused.is_some() {
            assert!(out.events.is_empty(), "refused datagram had effects: {out:?}");
            assert!(out.reply.is_none() || out.reply.as_deref() == Some(AUTH), "refused but answered: {out:?}");
        }
        match decoded {
            Ok(Datagram::Ok | Datagram::OkMac { .. }) => {
                assert!(out.reply.is_none() || out.reply.as_deref() == Some(AUTH));
                if secret.is_some() {
                    assert!(out.refused.is_some(), "a keepalive was accepted without a nonce ever answered");
                }
            }
            Ok(Datagram::Auth | Datagram::Nonce(_)) => assert!(out.refused.is_some()),
            Ok(Datagram::Id { .. }) => {
                if secret.is_some() {
                    // Without the secret no answer to a nonce can verify: at most a challenge.
                    assert!(out.events.is_empty(), "identification accepted without the secret: {out:?}");
                    assert!(out.reply.as_deref().is_none_or(|r| r.starts_with(b"NONCE ")), "{out:?}");
                } else {
                    assert!(out.reply.is_none() || out.reply.as_deref() == Some(OK));
                    assert_eq!(out.reply.is_some(), out.refused.is_none());
                }
            }
            Err(_) => {}
        }
        apply(&out.events, &mut up, &mut seen);
        if i % 3 == 2 {
            let events = tracker.tick(now + Duration::from_millis(2100));
            apply(&events, &mut up, &mut seen);
        }
        for tcp in &seen {
            assert_eq!(tracker.is_up(tcp), up.contains(tcp), "is_up({tcp}) disagrees with the events");
        }
    }
    // Long silence: everything goes down, self-registered backends are forgotten.
    let late = start + Duration::from_secs(3600);
    let events = tracker.tick(late);
    apply(&events, &mut up, &mut seen);
    assert!(up.is_empty(), "still up after an hour of silence: {up:?}");
    let events = tracker.tick(late + Duration::from_secs(3600));
    apply(&events, &mut up, &mut seen);
    assert!(registered.is_empty(), "never forgotten: {registered:?}");
    // Reconfiguring to no servers reports nothing for backends that are already down.
    let events = tracker.configure(TrackerConfig { servers: Vec::new(), ..TrackerConfig::default() });
    assert!(events.is_empty(), "{events:?}");
}

fuzz_target!(|data: &[u8]| {
    check_decode(data);
    let datagrams: Vec<&[u8]> = data.split(|b| *b == 0).take(64).collect();
    for d in &datagrams {
        check_decode(d);
    }
    run_tracker(&datagrams, false, None);
    run_tracker(&datagrams, true, None);
    run_tracker(&datagrams, true, Some("s3cret"));
});
