//! shoal's HTTP/1 engine: httparse reads heads; everything a proxy must decide itself lives
//! here — the framing rules that keep requests from being read two ways (`head`, `body`), the
//! heads it writes (`emit`), buffers that exist only while bytes do (`buf`, `io`), the exchange
//! with a backend and its reuse verdict (`exchange`, `upstream`), upgraded tunnels (`tunnel`),
//! and one error type for the proxy path (`error`). `dataplane::http` drives it per client
//! connection.

pub mod body;
pub mod buf;
pub mod client;
pub mod emit;
pub mod error;
pub mod exchange;
pub mod head;
pub mod io;
pub mod tunnel;
pub mod upstream;
