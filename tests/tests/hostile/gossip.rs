//! The gossip table: datagrams on the cluster port's UDP side, checked by the relay in
//! `control::gossip_auth` before chitchat sees them (`SHG2` header, sender, sequence, clock
//! stamp, HMAC). Each case is one datagram from a test socket that holds the cluster key; the
//! outcome is which `shoal_gossip_datagrams_dropped_total{reason}` moved by exactly one, or none
//! (the relay let it through). Cases run in order: the sender's sequence window builds up.

use std::net::SocketAddr;
use std::time::Duration;

use http::Method;
use serde_json::json;
use shoal_node::control::gossip_auth::{Stamp, seal};
use shoal_node::control::secure::ClusterKey;
use shoal_node::node::ClusterOptions;
use shoal_tests::{HttpBackend, TestNode, eventually, free_port, get_text};
use tokio::net::UdpSocket;

use super::{code, shown};

/// Wire offsets of the `SHG2` header (see `gossip_auth`): magic, sender, sequence, stamp, MAC.
const SEQ_AT: usize = 4 + 18;
const TS_AT: usize = SEQ_AT + 8;
const MAC_AT: usize = TS_AT + 8;
const HEADER: usize = MAC_AT + 32;
/// Sequences are relative to this one.
const BASE: u64 = 1_000_000;
const REASONS: [&str; 5] = ["malformed", "forged", "stale", "address", "replay"];

pub enum Send {
    Raw(&'static [u8]),
    /// Built with the key and our address at run time: what it is, and how.
    Made(&'static str, fn(&Ctx) -> Vec<u8>),
}

pub struct Case {
    pub name: &'static str,
    pub send: Send,
    /// The drop reason counted, or `None` when the relay passes the datagram on.
    pub dropped: Option<&'static str>,
}

const fn case(name: &'static str, send: Send, dropped: Option<&'static str>) -> Case {
    Case { name, send, dropped }
}

/// The key, our address, and the last datagram sent.
pub struct Ctx {
    key: ClusterKey,
    me: SocketAddr,
    other: SocketAddr,
    last: Vec<u8>,
}

fn now_ms() -> u64 {
    shoal_node::clock::unix_ms()
}

impl Ctx {
    /// A datagram from us with sequence `seq`, stamped `skew_ms` from now.
    fn sealed(&self, seq: u64, skew_ms: i64) -> Vec<u8> {
        self.sealed_as(self.me, seq, skew_ms, b"not a chitchat message")
    }

    fn sealed_as(&self, from: SocketAddr, seq: u64, skew_ms: i64, payload: &[u8]) -> Vec<u8> {
        let at_ms = now_ms().saturating_add_signed(skew_ms);
        seal(&self.key, &Stamp { from, seq, at_ms }, payload)
    }

    /// A fresh datagram with one byte at `at` flipped after sealing.
    fn flipped(&self, at: usize) -> Vec<u8> {
        let mut d = self.sealed(BASE, 0);
        d[at] ^= 1;
        d
    }
}

const fn dropped(name: &'static str, send: Send, reason: &'static str) -> Case {
    case(name, send, Some(reason))
}

const fn passed(name: &'static str, what: &'static str, make: fn(&Ctx) -> Vec<u8>) -> Case {
    case(name, Send::Made(what, make), None)
}

/// The gossip cases, in the order they run.
pub const CASES: &[Case] = &[
    dropped("empty datagram", Send::Raw(b""), "malformed"),
    dropped("magic alone", Send::Raw(b"SHG2"), "malformed"),
    dropped(
        "header one byte short",
        Send::Made("the first 69 bytes of a sealed datagram (the header is 70)", |c| {
            c.sealed(BASE, 0)[..HEADER - 1].to_vec()
        }),
        "malformed",
    ),
    dropped(
        "the previous version's magic",
        Send::Made("a sealed datagram starting `SHG1`", |c| [&b"SHG1"[..], &c.sealed(BASE, 0)[4..]].concat()),
        "malformed",
    ),
    dropped(
        "lowercase magic",
        Send::Made("a sealed datagram starting `shg2`", |c| [&b"shg2"[..], &c.sealed(BASE, 0)[4..]].concat()),
        "malformed",
    ),
    dropped("an HTTP request", Send::Raw(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"), "malformed"),
    dropped("200 zero bytes", Send::Made("200 NUL bytes", |_| vec![0; 200]), "malformed"),
    dropped("largest UDP datagram of noise", Send::Made("65 507 bytes of `Z`", |_| vec![b'Z'; 65_507]), "malformed"),
    dropped(
        "a header with an all-zero MAC",
        Send::Made("magic, our address, sequence, stamp, 32 zero bytes", |c| {
            [&c.sealed(BASE, 0)[..MAC_AT], &[0u8; 32][..]].concat()
        }),
        "forged",
    ),
    dropped(
        "sealed with another cluster's key",
        Send::Made("a fresh datagram MACed with a new random key", |c| {
            let stamp = Stamp { from: c.me, seq: BASE, at_ms: now_ms() };
            seal(&ClusterKey::generate(), &stamp, b"x")
        }),
        "forged",
    ),
    dropped("a MAC bit flipped", Send::Made("a fresh datagram, MAC byte 0 xor 1", |c| c.flipped(MAC_AT)), "forged"),
    dropped(
        "payload changed after sealing",
        Send::Made("a fresh datagram, last byte xor 1", |c| {
            let d = c.sealed(BASE, 0);
            c.flipped(d.len() - 1)
        }),
        "forged",
    ),
    dropped(
        "sequence changed after sealing",
        Send::Made("a fresh datagram, sequence byte xor 1", |c| c.flipped(SEQ_AT + 7)),
        "forged",
    ),
    dropped(
        "stamp changed after sealing",
        Send::Made("a fresh datagram, stamp byte xor 1", |c| c.flipped(TS_AT + 7)),
        "forged",
    ),
    dropped(
        "sender changed after sealing",
        Send::Made("a fresh datagram, sender port byte xor 1", |c| c.flipped(SEQ_AT - 1)),
        "forged",
    ),
    passed("a fresh sealed datagram", "sequence BASE+10, stamped now", |c| c.sealed(BASE + 10, 0)),
    dropped(
        "the same datagram again",
        Send::Made("the previous datagram, byte for byte", |c| c.last.clone()),
        "replay",
    ),
    dropped(
        "the same sequence, stamped anew",
        Send::Made("sequence BASE+10, stamped now", |c| c.sealed(BASE + 10, 0)),
        "replay",
    ),
    passed("a later sequence", "sequence BASE+20", |c| c.sealed(BASE + 20, 0)),
    passed("an earlier one inside the reorder window", "sequence BASE+15", |c| c.sealed(BASE + 15, 0)),
    dropped("that one again", Send::Made("sequence BASE+15", |c| c.sealed(BASE + 15, 0)), "replay"),
    dropped("64 below the highest", Send::Made("sequence BASE+20-64", |c| c.sealed(BASE + 20 - 64, 0)), "replay"),
    passed("63 below the highest, never seen", "sequence BASE+20-63", |c| c.sealed(BASE + 20 - 63, 0)),
    dropped(
        "stamped 61 s ago",
        Send::Made("sequence BASE+21, stamped now - 61 s", |c| c.sealed(BASE + 21, -61_000)),
        "stale",
    ),
    dropped(
        "stamped 61 s ahead",
        Send::Made("sequence BASE+22, stamped now + 61 s", |c| c.sealed(BASE + 22, 61_000)),
        "stale",
    ),
    passed("stamped 50 s ago, inside the window", "sequence BASE+23, stamped now - 50 s", |c| {
        c.sealed(BASE + 23, -50_000)
    }),
    passed("a stale datagram took no sequence", "sequence BASE+21, stamped now", |c| c.sealed(BASE + 21, 0)),
    dropped(
        "names another node as its sender",
        Send::Made("sequence BASE+30 claiming 127.0.0.9:<another port>", |c| c.sealed_as(c.other, BASE + 30, 0, b"x")),
        "address",
    ),
    dropped(
        "names our IP with another port",
        Send::Made("sequence BASE+30 claiming 127.0.0.1:<our port + 1>", |c| {
            let elsewhere = SocketAddr::new(c.me.ip(), c.me.port().wrapping_add(1).max(1));
            c.sealed_as(elsewhere, BASE + 30, 0, b"x")
        }),
        "address",
    ),
    passed("names 0.0.0.0 with our port (a wildcard bind)", "sequence BASE+31 claiming 0.0.0.0:<our port>", |c| {
        c.sealed_as(SocketAddr::from(([0, 0, 0, 0], c.me.port())), BASE + 31, 0, b"x")
    }),
    passed(
        "the largest UDP datagram, sealed",
        "65 507 bytes: header and a 65 437-byte payload, sequence BASE+32",
        |c| c.sealed_as(c.me, BASE + 32, 0, &vec![b'Z'; 65_507 - HEADER]),
    ),
    passed("the largest sequence", "sequence u64::MAX", |c| c.sealed(u64::MAX, 0)),
    dropped("any lower sequence after it", Send::Made("sequence BASE+40", |c| c.sealed(BASE + 40, 0)), "replay"),
];

fn counts(node: &TestNode) -> [u64; REASONS.len()] {
    REASONS.map(|r| node.handle.shared.metrics.gossip_dropped.with_label_values(&[r]).get())
}

fn bytes(case: &Case, ctx: &Ctx) -> Vec<u8> {
    match &case.send {
        Send::Raw(b) => b.to_vec(),
        Send::Made(_, make) => make(ctx),
    }
}

/// Sends one case, then an empty datagram as a marker (the relay handles datagrams in order:
/// once the marker is counted, so is the case); checks the counters moved exactly as expected.
async fn run(node: &TestNode, sock: &UdpSocket, to: SocketAddr, case: &Case, ctx: &Ctx) -> Result<(), String> {
    let before = counts(node);
    sock.send_to(&bytes(case, ctx), to).await.map_err(|e| format!("send: {e}"))?;
    sock.send_to(b"", to).await.map_err(|e| format!("send: {e}"))?;
    let mut want = before;
    want[0] += 1;
    if let Some(reason) = case.dropped {
        want[REASONS.iter().position(|r| *r == reason).expect("a reason")] += 1;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut got = counts(node);
    while got != want && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
        got = counts(node);
    }
    if got != want {
        let show = |c: [u64; 5]| REASONS.iter().zip(c).map(|(r, n)| format!("{r}={n}")).collect::<Vec<_>>().join(" ");
        return Err(format!("counters {}, expected {} (marker included)", show(got), show(want)));
    }
    Ok(())
}

/// Issue 14, finding 4: every gossip case in order on a one-node cluster, which keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_gossip_case_is_passed_or_dropped_under_its_exact_reason() {
    let creds = shoal_node::control::raft::channel::testing::TestCa::new("shoal").creds("hostile-gossip");
    let key = creds.key.clone();
    let cluster = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let node = TestNode::start_in("hostile-gossip", tempfile::tempdir().expect("dir"), |o| {
        o.cluster = Some(ClusterOptions::new(cluster, vec![], 1, creds));
    })
    .await;
    let sock = UdpSocket::bind("127.0.0.1:0").await.expect("udp");
    let mut ctx = Ctx {
        key,
        me: sock.local_addr().expect("addr"),
        other: SocketAddr::from(([127, 0, 0, 9], free_port())),
        last: Vec::new(),
    };
    eventually(Duration::from_secs(15), "the gossip port listens", || async {
        sock.send_to(b"", cluster).await.ok()?;
        tokio::time::sleep(Duration::from_millis(100)).await;
        (counts(&node)[0] > 0).then_some(())
    })
    .await;

    let mut failed = Vec::new();
    for case in CASES {
        let sent = bytes(case, &ctx);
        if let Err(e) = run(&node, &sock, cluster, case, &ctx).await {
            failed.push(format!("{}: {e}\n    sent {}", case.name, shown(&sent)));
        }
        ctx.last = sent;
    }
    assert!(failed.is_empty(), "{} of {} gossip cases failed:\n{}", failed.len(), CASES.len(), failed.join("\n"));

    // The one-node cluster still takes writes and serves.
    let web = HttpBackend::start("web").await;
    eventually(Duration::from_secs(30), "a pool is written through Raft", || async {
        let spec = json!({"pattern": "/", "health": {"interval_ms": 300}}).to_string();
        node.call(Method::PUT, "/v1/pools/web", Some(&spec)).await.0.is_success().then_some(())
    })
    .await;
    node.put(&format!("/v1/pools/web/backends/{}", web.addr), json!({})).await;
    eventually(Duration::from_secs(15), "served", || async {
        get_text(node.http(), "/").await.ok().filter(|(s, _)| s.is_success())
    })
    .await;
    node.stop().await;
}

/// The table as rows for the case list: family, name, what is sent, outcome.
pub fn rows() -> Vec<[String; 4]> {
    CASES
        .iter()
        .map(|c| {
            let sent = match &c.send {
                Send::Raw(b) => code(b),
                Send::Made(what, _) => what.to_string(),
            };
            let outcome = match c.dropped {
                Some(r) => format!("dropped{{reason=\"{r}\"}} +1"),
                None => "passed to chitchat, nothing dropped".to_string(),
            };
            ["gossip".to_string(), c.name.to_string(), sent, outcome]
        })
        .collect()
}
