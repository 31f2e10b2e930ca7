//! PROXY protocol headers as a listener reads them: `shoal_proto::proxy::frame` on every
//! prefix of the input, the way peeks and reads deliver it, and `parse` on what it frames.
//!
//! Input: the bytes a trusted source sends at the start of a connection.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_proto::proxy::{Frame, V1_MAX, V2_FIXED, encode, frame, parse};

fuzz_target!(|data: &[u8]| {
    let whole = frame(data);
    match whole {
        Ok(Frame::Complete(n)) => {
            assert!(n <= data.len() && n > 0, "framed {n} of {}", data.len());
            // The framing never reads past the header: every longer input frames the same.
            let mut more = data.to_vec();
            more.extend_from_slice(b"\r\n\r\n\0\r\nQUIT\nPROXY ");
            assert_eq!(frame(&more), whole);
            // Every shorter prefix asks for more (all of its bytes being header) or was
            // refused already; none claims a different length.
            for cut in 0..n {
                match frame(&data[..cut]) {
                    Ok(Frame::Incomplete) | Err(_) => {}
                    Ok(Frame::Complete(m)) => panic!("prefix {cut} framed as {m}, whole as {n}"),
                }
            }
            if data[0] == b'P' {
                assert!(n <= V1_MAX && data[n - 2..n] == *b"\r\n");
            } else {
                assert!(n >= V2_FIXED);
            }
            // Whatever parses re-encodes to a header that parses to the same addresses.
            if let Ok(h) = parse(&data[..n]) {
                let again = encode(h.version, h.addrs);
                assert_eq!(frame(&again), Ok(Frame::Complete(again.len())));
                let back = parse(&again).expect("an encoded header parses");
                assert_eq!(back.version, h.version);
                let canon = |a: Option<(std::net::SocketAddr, std::net::SocketAddr)>| {
                    a.map(|(s, d)| (s.ip().to_canonical(), s.port(), d.ip().to_canonical(), d.port()))
                };
                assert_eq!(canon(back.addrs), canon(h.addrs));
            }
        }
        Ok(Frame::Incomplete) => {
            assert!(data.len() < V1_MAX || data[0] != b'P', "a v1 header past 107 bytes is refused");
        }
        Err(_) => {
            // A refusal is final: more bytes never make it acceptable.
            let mut more = data.to_vec();
            more.extend_from_slice(b"\r\n");
            assert!(frame(&more).is_err());
        }
    }
    // Parsing any bytes at all never panics.
    let _ = parse(data);
});
