//! Micro-benchmarks of the per-request decisions: balancer picks (each algorithm) and the URL
//! pattern lookup. Run with `cargo bench -p shoal-node`.

use std::hint::black_box;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use shoal_node::dataplane::balancer::Balancer;
use shoal_node::dataplane::maglev;
use shoal_node::dataplane::mux::Mux;
use shoal_node::routing::{BackendRt, BackendShared};
use shoal_proto::Algorithm;

fn backends(n: u8) -> Vec<Arc<BackendRt>> {
    (0..n)
        .map(|i| {
            let addr = SocketAddr::from(([10, 0, 0, i], 8080));
            Arc::new(BackendRt {
                key: addr.to_string(),
                addr,
                url_path: "/".into(),
                weight: 1 + u32::from(i % 3),
                zone: String::new(),
                slot: None,
                shared: Arc::new(BackendShared::new(1, Arc::default())),
            })
        })
        .collect()
}

fn balancers(c: &mut Criterion) {
    let bs = backends(16);
    let client = IpAddr::from([192, 168, 1, 77]);
    for (name, alg) in [
        ("round_robin", Algorithm::RoundRobin),
        ("least_conn", Algorithm::LeastConn),
        ("p2c", Algorithm::P2c),
        ("maglev", Algorithm::Maglev),
    ] {
        let bal = Balancer::new(alg, &bs, Arc::default());
        c.bench_function(&format!("pick/{name}/16"), |b| {
            b.iter(|| bal.pick(black_box(&bs), black_box(client), &|_| false))
        });
    }
    let names: Vec<String> = (0..16).map(|i| format!("10.0.0.{i}:8080")).collect();
    let input: Vec<(&str, u32)> = names.iter().map(|n| (n.as_str(), 1)).collect();
    c.bench_function("maglev/build/16", |b| b.iter(|| maglev::build(black_box(&input))));
}

fn routing(c: &mut Criterion) {
    for pools in [50, 1000] {
        let patterns: Vec<String> =
            (0..pools).map(|i| format!("/svc{i}/")).chain(["/".to_string(), "/api/v2/".to_string()]).collect();
        let mux = Mux::new(patterns.iter().enumerate().map(|(i, p)| (p.as_str(), i)));
        c.bench_function(&format!("mux/route/subtree/{pools}"), |b| {
            b.iter(|| mux.route(black_box(""), black_box("/api/v2/users/42")))
        });
        c.bench_function(&format!("mux/route/root/{pools}"), |b| {
            b.iter(|| mux.route(black_box(""), black_box("/index.html")))
        });
    }
}

criterion_group!(benches, balancers, routing);
criterion_main!(benches);
