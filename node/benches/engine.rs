//! Micro-benchmark of the HTTP/1 engine's per-request work: parse a browser-like request head,
//! apply the framing rules, and write the head a backend receives (hop-by-hop headers dropped,
//! identity headers added). Run with `cargo bench -p shoal-node --bench engine`.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use shoal_node::dataplane::h1::buf::Buf;
use shoal_node::dataplane::h1::emit::{ClientId, Target, request_head};
use shoal_node::dataplane::h1::head::{HeadLimits, parse_request};
use shoal_node::dataplane::reqid::Ids;

const REQUEST: &[u8] = b"GET /api/v1/users/42?expand=roles HTTP/1.1\r\n\
Host: app.example.com\r\n\
User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/130.0 Safari/537.36\r\n\
Accept: application/json, text/plain, */*\r\n\
Accept-Language: en-US,en;q=0.9\r\n\
Accept-Encoding: gzip, deflate, br\r\n\
Cookie: session=5f1d2c3b4a596877; theme=dark\r\n\
Connection: keep-alive\r\n\
X-Forwarded-For: 203.0.113.7\r\n\
\r\n";

fn head_parse_and_rewrite(c: &mut Criterion) {
    let limits = HeadLimits { max_bytes: 64 * 1024, max_headers: 100 };
    let id = ClientId { ip: [10, 1, 2, 3].into(), tls: false };
    c.bench_function("h1/parse_head", |b| {
        b.iter(|| black_box(parse_request(black_box(REQUEST), limits).ok().flatten()).map(|h| h.len))
    });
    c.bench_function("h1/parse_and_rewrite_head", |b| {
        b.iter(|| {
            let head = parse_request(black_box(REQUEST), limits).ok().flatten().expect("valid head");
            let mut out = Buf::take();
            let target = Target { path: head.path(REQUEST), query: head.query(REQUEST) };
            request_head(&mut out, REQUEST, &head, &target, id, "10.0.0.1:8080", &Ids::default());
            black_box(out.len())
        })
    });
}

criterion_group!(benches, head_parse_and_rewrite);
criterion_main!(benches);
