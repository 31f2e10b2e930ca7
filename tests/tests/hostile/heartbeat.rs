//! The heartbeat table: seed 004's UDP protocol on an open pool with a configured backend, and
//! the authenticated handshake (nonce, MACed answer, counted keepalives) on a self-registering
//! pool capped at one backend. Each case is one datagram from one of four sockets; the outcome
//! is the node's exact reply or silence, and which counter moved by exactly one:
//! `shoal_heartbeats_refused_total{reason}`, `shoal_heartbeats_malformed_total`, or none.
//! Cases run in order and build on each other (a nonce is issued, answered, replayed…).

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::json;
use shoal_node::health::heartbeat::{NONCE_TTL, answer_nonce, ok_mac};
use shoal_proto::heartbeat::encode_ok;
use shoal_tests::{EchoBackend, HttpBackend, TestNode, eventually, free_port, free_udp_port, get_text};
use tokio::net::UdpSocket;

use super::{code, shown};
use Counter::Refused;
use Pool::{Auth, Seed};
use Sender::{Attacker, Backend, Other, SeedBackend};

const SECRET: &str = "hostile-s3cret";
/// What the authenticated backend announces as its TCP address (`0.0.0.0`: the IP it sends from).
const TCP: &str = "0.0.0.0:9000";
/// Every `reason` of the refusal counter.
const REASONS: [&str; 9] = [
    "unknown_pair",
    "unknown_source",
    "unauthenticated",
    "stale_nonce",
    "bad_mac",
    "replay",
    "cap",
    "pending_full",
    "unexpected",
];

/// Which pool a datagram goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pool {
    /// Seed 004 as it was: no secret, one configured backend.
    Seed,
    /// `heartbeat_secret`, self-registration, `max_self_registered: 1`.
    Auth,
}

/// Which socket sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sender {
    /// The authenticated pool's backend (127.0.0.1).
    Backend,
    /// The seed pool's configured backend (127.0.0.1).
    SeedBackend,
    /// Another host (127.0.0.2).
    Attacker,
    /// Another socket on the backend's host.
    Other,
}

pub enum Send {
    Raw(&'static [u8]),
    /// Built from the run's addresses and the last nonce the backend got: what it is, and how.
    Made(&'static str, fn(&Ctx) -> Vec<u8>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reply {
    Silent,
    Exact(&'static str),
    /// `NONCE <32 hex digits>`.
    Nonce,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Accepted: no refusal counted.
    None,
    Malformed,
    Refused(&'static str),
}

pub struct Case {
    pub name: &'static str,
    pub pool: Pool,
    pub from: Sender,
    pub send: Send,
    pub reply: Reply,
    pub counter: Counter,
    /// Sent this long after the case before it (nonces expire).
    pub after: Duration,
}

const fn case(name: &'static str, pool: Pool, from: Sender, send: Send, reply: Reply, counter: Counter) -> Case {
    Case { name, pool, from, send, reply, counter, after: Duration::ZERO }
}

const fn malformed(name: &'static str, send: Send) -> Case {
    case(name, Pool::Auth, Sender::Attacker, send, Reply::Silent, Counter::Malformed)
}

/// The run's addresses and the handshake state the datagrams are built from.
pub struct Ctx {
    backend: SocketAddr,
    attacker: SocketAddr,
    other: SocketAddr,
    seed_tcp: SocketAddr,
    seed_udp: SocketAddr,
    /// The last nonce the backend was sent.
    nonce: String,
}

impl Ctx {
    fn id(&self) -> String {
        format!("{TCP} {}", self.backend)
    }

    /// The backend's identification answering the current nonce with `secret`.
    fn answer(&self, secret: &str) -> Vec<u8> {
        let tcp = TCP.parse().expect("tcp");
        format!("{} {}", self.id(), answer_nonce(secret, &self.nonce, tcp, self.backend)).into_bytes()
    }

    fn keepalive(&self, counter: u64) -> Vec<u8> {
        encode_ok(counter, &ok_mac(SECRET, &self.nonce, counter))
    }
}

/// The heartbeat cases, in the order they run.
pub const CASES: &[Case] = &[
    // Seed 004, byte-compatible: anyone who reaches the port may identify a configured pair.
    case("OK before identifying", Seed, SeedBackend, Send::Raw(b"OK"), Reply::Exact("AUTH"), Refused("unknown_source")),
    case(
        "a pair no backend has",
        Seed,
        SeedBackend,
        Send::Raw(b"127.0.0.1:1 127.0.0.1:2"),
        Reply::Silent,
        Refused("unknown_pair"),
    ),
    case(
        "0.0.0.0 for a backend configured at 127.0.0.1",
        Seed,
        SeedBackend,
        Send::Made("`0.0.0.0:<tcp port> <udp>`", |c| {
            format!("0.0.0.0:{} {}", c.seed_tcp.port(), c.seed_udp).into_bytes()
        }),
        Reply::Silent,
        Refused("unknown_pair"),
    ),
    case(
        "identification, UDP address first",
        Seed,
        SeedBackend,
        Send::Made("`<udp> <tcp>`", |c| format!("{} {}", c.seed_udp, c.seed_tcp).into_bytes()),
        Reply::Exact("OK"),
        Counter::None,
    ),
    case("keepalive", Seed, SeedBackend, Send::Raw(b"OK"), Reply::Silent, Counter::None),
    case(
        "counter and MAC in an open pool are ignored",
        Seed,
        SeedBackend,
        Send::Raw(b"OK 1 zz"),
        Reply::Silent,
        Counter::None,
    ),
    case(
        "identification with a trailing newline (nc)",
        Seed,
        SeedBackend,
        Send::Made("`<tcp> <udp>\\n`", |c| format!("{} {}\n", c.seed_tcp, c.seed_udp).into_bytes()),
        Reply::Exact("OK"),
        Counter::None,
    ),
    case("AUTH sent to the seed pool", Seed, SeedBackend, Send::Raw(b"AUTH"), Reply::Silent, Refused("unexpected")),
    case(
        "keepalive from another host",
        Seed,
        Attacker,
        Send::Raw(b"OK"),
        Reply::Exact("AUTH"),
        Refused("unknown_source"),
    ),
    case(
        "another host claims the configured pair (open pools allow it)",
        Seed,
        Attacker,
        Send::Made("`<tcp> <udp>` of the configured backend", |c| {
            format!("{} {}", c.seed_tcp, c.seed_udp).into_bytes()
        }),
        Reply::Exact("OK"),
        Counter::None,
    ),
    case(
        "the displaced backend must identify again",
        Seed,
        SeedBackend,
        Send::Raw(b"OK"),
        Reply::Exact("AUTH"),
        Refused("unknown_source"),
    ),
    // Malformed datagrams: dropped silently, whoever sends them.
    malformed("empty datagram", Send::Raw(b"")),
    malformed("largest UDP datagram", Send::Made("65 507 bytes of `x`", |_| vec![b'x'; 65_507])),
    malformed("513 bytes, one past the limit", Send::Made("`OK` and 511 spaces", |_| padded_ok(513))),
    case(
        "OK padded to 512 bytes, the limit",
        Auth,
        Attacker,
        Send::Made("`OK` and 510 spaces", |_| padded_ok(512)),
        Reply::Exact("AUTH"),
        Refused("unknown_source"),
    ),
    malformed("not UTF-8", Send::Raw(b"\xff\xfe\x00OK")),
    malformed("lowercase ok", Send::Raw(b"ok")),
    malformed("four tokens", Send::Raw(b"0.0.0.0:9000 127.0.0.2:9001 a b")),
    malformed("host names for addresses", Send::Raw(b"localhost:9000 localhost:9001")),
    malformed("TCP port 0", Send::Raw(b"0.0.0.0:0 127.0.0.2:9001")),
    malformed("UDP port 0", Send::Raw(b"0.0.0.0:9000 127.0.0.2:0")),
    malformed("port out of range", Send::Raw(b"0.0.0.0:70000 127.0.0.2:9001")),
    malformed("keepalive counter past u64", Send::Raw(b"OK 18446744073709551616 00")),
    malformed("negative keepalive counter", Send::Raw(b"OK -1 00")),
    // Before any registration: only the handshake is open.
    case(
        "OK before any identification",
        Auth,
        Attacker,
        Send::Raw(b"OK"),
        Reply::Exact("AUTH"),
        Refused("unknown_source"),
    ),
    case(
        "OK with a newline before any identification",
        Auth,
        Attacker,
        Send::Raw(b"OK\n"),
        Reply::Exact("AUTH"),
        Refused("unknown_source"),
    ),
    case(
        "signed OK with a garbage MAC before identifying",
        Auth,
        Attacker,
        Send::Raw(b"OK 1 zz"),
        Reply::Exact("AUTH"),
        Refused("unknown_source"),
    ),
    case("AUTH sent to the node", Auth, Attacker, Send::Raw(b"AUTH"), Reply::Silent, Refused("unexpected")),
    case("NONCE sent to the node", Auth, Attacker, Send::Raw(b"NONCE 00"), Reply::Silent, Refused("unexpected")),
    case(
        "an answer no nonce was issued for",
        Auth,
        Other,
        Send::Made("`0.0.0.0:9000 <other> deadbeef.cafe`", |c| format!("{TCP} {} deadbeef.cafe", c.other).into_bytes()),
        Reply::Silent,
        Refused("stale_nonce"),
    ),
    case(
        "an IPv6 pair gets a nonce too",
        Auth,
        Attacker,
        Send::Raw(b"[::1]:9000 [::1]:9001"),
        Reply::Nonce,
        Counter::None,
    ),
    case(
        "an answer token without a dot",
        Auth,
        Attacker,
        Send::Raw(b"[::1]:9000 [::1]:9001 nodot"),
        Reply::Silent,
        Refused("stale_nonce"),
    ),
    case(
        "identification gets a nonce",
        Auth,
        Backend,
        Send::Made("`0.0.0.0:9000 <udp>`", |c| c.id().into_bytes()),
        Reply::Nonce,
        Counter::None,
    ),
    case(
        "answer with a garbage MAC",
        Auth,
        Backend,
        Send::Made("`<id> <nonce>.zz`", |c| format!("{} {}.zz", c.id(), c.nonce).into_bytes()),
        Reply::Silent,
        Refused("bad_mac"),
    ),
    case(
        "a nonce is single-use, even after a failed answer",
        Auth,
        Backend,
        Send::Made("`<id> <nonce>.<right MAC>` for the nonce just used", |c| c.answer(SECRET)),
        Reply::Silent,
        Refused("stale_nonce"),
    ),
    case(
        "identification gets a new nonce",
        Auth,
        Backend,
        Send::Made("`<id>`", |c| c.id().into_bytes()),
        Reply::Nonce,
        Counter::None,
    ),
    case(
        "answer MACed with another secret",
        Auth,
        Backend,
        Send::Made("`<id> <nonce>.<MAC with another secret>`", |c| c.answer("guessed")),
        Reply::Silent,
        Refused("bad_mac"),
    ),
    case(
        "identification gets a third nonce",
        Auth,
        Backend,
        Send::Made("`<id>`", |c| c.id().into_bytes()),
        Reply::Nonce,
        Counter::None,
    ),
    case(
        "answer naming a nonce it was not sent",
        Auth,
        Backend,
        Send::Made("`<id> <made-up nonce>.<right MAC for it>`", |c| {
            let tcp = TCP.parse().expect("tcp");
            format!("{} {}", c.id(), answer_nonce(SECRET, "00112233445566778899aabbccddeeff", tcp, c.backend))
                .into_bytes()
        }),
        Reply::Silent,
        Refused("stale_nonce"),
    ),
    case(
        "identification gets a fourth nonce",
        Auth,
        Backend,
        Send::Made("`<id>`", |c| c.id().into_bytes()),
        Reply::Nonce,
        Counter::None,
    ),
    case(
        "answer whose MAC covers another pair",
        Auth,
        Backend,
        Send::Made("`0.0.0.0:9100 <udp> <nonce>.<MAC over 0.0.0.0:9000 <udp>>`", |c| {
            let answer = String::from_utf8(c.answer(SECRET)).expect("text");
            answer.replacen(TCP, "0.0.0.0:9100", 1).into_bytes()
        }),
        Reply::Silent,
        Refused("bad_mac"),
    ),
    case(
        "identification gets a fifth nonce",
        Auth,
        Backend,
        Send::Made("`<id>`", |c| c.id().into_bytes()),
        Reply::Nonce,
        Counter::None,
    ),
    case(
        "captured answer replayed from elsewhere",
        Auth,
        Attacker,
        Send::Made("the backend's valid answer", |c| c.answer(SECRET)),
        Reply::Silent,
        Refused("stale_nonce"),
    ),
    case(
        "the real answer registers",
        Auth,
        Backend,
        Send::Made("`<id> <nonce>.<MAC>`", |c| c.answer(SECRET)),
        Reply::Exact("OK"),
        Counter::None,
    ),
    case(
        "the same answer twice",
        Auth,
        Backend,
        Send::Made("the answer again", |c| c.answer(SECRET)),
        Reply::Silent,
        Refused("stale_nonce"),
    ),
    // Registered: keepalives must be signed, fresh and from the registered source.
    case(
        "keepalive from another source",
        Auth,
        Attacker,
        Send::Raw(b"OK"),
        Reply::Exact("AUTH"),
        Refused("unknown_source"),
    ),
    case(
        "signed keepalive from elsewhere",
        Auth,
        Attacker,
        Send::Made("`OK 1 <MAC>`", |c| c.keepalive(1)),
        Reply::Exact("AUTH"),
        Refused("unknown_source"),
    ),
    case(
        "a second registration is over the cap",
        Auth,
        Attacker,
        Send::Made("`0.0.0.0:9100 <attacker>`", |c| format!("0.0.0.0:9100 {}", c.attacker).into_bytes()),
        Reply::Silent,
        Refused("cap"),
    ),
    case(
        "an IPv6 pair is over the cap",
        Auth,
        Other,
        Send::Raw(b"[::1]:9000 [::1]:9001"),
        Reply::Silent,
        Refused("cap"),
    ),
    case(
        "valid keepalive",
        Auth,
        Backend,
        Send::Made("`OK 1 <MAC>`", |c| c.keepalive(1)),
        Reply::Silent,
        Counter::None,
    ),
    case(
        "the same keepalive again",
        Auth,
        Backend,
        Send::Made("`OK 1 <MAC>`", |c| c.keepalive(1)),
        Reply::Silent,
        Refused("replay"),
    ),
    case(
        "keepalive counter 0",
        Auth,
        Backend,
        Send::Made("`OK 0 <MAC>`", |c| c.keepalive(0)),
        Reply::Silent,
        Refused("replay"),
    ),
    case(
        "keepalive MAC of another counter",
        Auth,
        Backend,
        Send::Made("`OK 6 <MAC of 5>`", |c| encode_ok(6, &ok_mac(SECRET, &c.nonce, 5))),
        Reply::Silent,
        Refused("bad_mac"),
    ),
    case(
        "keepalive MACed with another secret",
        Auth,
        Backend,
        Send::Made("`OK 7 <MAC with another secret>`", |c| encode_ok(7, &ok_mac("guessed", &c.nonce, 7))),
        Reply::Silent,
        Refused("bad_mac"),
    ),
    case(
        "keepalive MAC in upper case",
        Auth,
        Backend,
        Send::Made("`OK 8 <MAC in upper case>`", |c| encode_ok(8, &ok_mac(SECRET, &c.nonce, 8).to_uppercase())),
        Reply::Silent,
        Refused("bad_mac"),
    ),
    case(
        "bare OK from the registered source",
        Auth,
        Backend,
        Send::Raw(b"OK"),
        Reply::Silent,
        Refused("unauthenticated"),
    ),
    case(
        "keepalive skipping counters",
        Auth,
        Backend,
        Send::Made("`OK 3 <MAC>`", |c| c.keepalive(3)),
        Reply::Silent,
        Counter::None,
    ),
    case(
        "the registered backend may identify again at the cap",
        Auth,
        Backend,
        Send::Made("`<id>`", |c| c.id().into_bytes()),
        Reply::Nonce,
        Counter::None,
    ),
    Case {
        name: "an answer after its nonce expired",
        pool: Auth,
        from: Backend,
        send: Send::Made("the right answer, 5.5 s after the nonce (its lifetime is 5 s)", |c| c.answer(SECRET)),
        reply: Reply::Silent,
        counter: Refused("stale_nonce"),
        after: Duration::from_millis(NONCE_TTL.as_millis() as u64 + 500),
    },
];

fn padded_ok(len: usize) -> Vec<u8> {
    let mut d = b"OK".to_vec();
    d.resize(len, b' ');
    d
}

/// One pool's heartbeat counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Counts {
    received: u64,
    malformed: u64,
    refused: [u64; REASONS.len()],
}

impl Counts {
    fn of(node: &TestNode, pool: &str) -> Counts {
        let m = &node.handle.shared.metrics;
        Counts {
            received: m.heartbeats.with_label_values(&[pool]).get(),
            malformed: m.heartbeats_malformed.with_label_values(&[pool]).get(),
            refused: REASONS.map(|r| m.heartbeats_refused.with_label_values(&[pool, r]).get()),
        }
    }

    /// `self` after `n` more datagrams moved `counter`.
    fn plus(&self, counter: Counter, n: u64) -> Counts {
        let mut c = self.clone();
        c.received += n;
        match counter {
            Counter::None => {}
            Counter::Malformed => c.malformed += 1,
            Counter::Refused(r) => c.refused[REASONS.iter().position(|x| *x == r).expect("a reason")] += 1,
        }
        c
    }
}

struct Run<'a> {
    node: &'a TestNode,
    ports: [(Pool, &'static str, SocketAddr); 2],
    sockets: [(Sender, UdpSocket); 4],
    /// Sends the empty datagram that tells when the node has handled everything before it.
    marker: UdpSocket,
}

impl Run<'_> {
    fn socket(&self, from: Sender) -> &UdpSocket {
        &self.sockets.iter().find(|(f, _)| *f == from).expect("socket").1
    }

    fn port(&self, pool: Pool) -> (&'static str, SocketAddr) {
        self.ports.iter().find(|(p, _, _)| *p == pool).map(|(_, name, addr)| (*name, *addr)).expect("pool")
    }

    /// Sends one case and checks the counters, then the reply; returns the reply.
    async fn case(&self, case: &Case, ctx: &Ctx) -> Result<Option<String>, String> {
        let (pool, to) = self.port(case.pool);
        let sock = self.socket(case.from);
        let before = Counts::of(self.node, pool);
        sock.send_to(&bytes(case, ctx), to).await.map_err(|e| format!("send: {e}"))?;
        eventually(Duration::from_secs(10), "the datagram received", || async {
            (Counts::of(self.node, pool).received > before.received).then_some(())
        })
        .await;
        // The marker is handled after the case: once it is counted, so is everything the case did.
        self.marker.send_to(b"", to).await.map_err(|e| format!("send: {e}"))?;
        let want = before.plus(case.counter, 1).plus(Counter::Malformed, 1);
        let got = settle(self.node, pool, &want).await;
        if got != want {
            return Err(format!("counters {got:?}, expected {want:?} (marker included)"));
        }
        let reply = recv(sock, if case.reply == Reply::Silent { 100 } else { 3_000 }).await;
        let ok = match (case.reply, reply.as_deref()) {
            (Reply::Silent, None) => true,
            (Reply::Exact(want), Some(got)) => want == got,
            (Reply::Nonce, Some(got)) => {
                got.strip_prefix("NONCE ").is_some_and(|n| n.len() == 32 && n.bytes().all(|b| b.is_ascii_hexdigit()))
            }
            _ => false,
        };
        if !ok {
            return Err(format!("replied {reply:?}, expected {:?}", case.reply));
        }
        Ok(reply)
    }
}

/// The pool's counters once they equal `want`, or after 10 s.
async fn settle(node: &TestNode, pool: &str, want: &Counts) -> Counts {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let now = Counts::of(node, pool);
        if now == *want || tokio::time::Instant::now() >= deadline {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn bytes(case: &Case, ctx: &Ctx) -> Vec<u8> {
    match &case.send {
        Send::Raw(b) => b.to_vec(),
        Send::Made(_, make) => make(ctx),
    }
}

async fn recv(sock: &UdpSocket, within_ms: u64) -> Option<String> {
    let mut buf = [0u8; 256];
    let got = tokio::time::timeout(Duration::from_millis(within_ms), sock.recv_from(&mut buf)).await.ok()?.ok()?;
    Some(String::from_utf8_lossy(&buf[..got.0]).into_owned())
}

async fn udp(ip: &str) -> UdpSocket {
    UdpSocket::bind((ip, 0)).await.unwrap_or_else(|e| panic!("udp on {ip}: {e}"))
}

/// Issue 14, finding 1 and the seed protocol: every heartbeat case in order on one node, then
/// spoofed keepalives from the backend's own address, which must not keep it up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_heartbeat_case_gets_its_exact_reply_and_refusal_reason() {
    let node = TestNode::start("hostile-hb").await;
    let web = HttpBackend::start("web").await;
    node.put("/v1/pools/web", json!({"pattern": "/", "health": {"interval_ms": 300}})).await;
    node.put(&format!("/v1/pools/web/backends/{}", web.addr), json!({})).await;

    let (auth_port, seed_port) = (free_udp_port(), free_udp_port());
    let health = json!({"heartbeat_port": auth_port, "heartbeat_secret": SECRET, "heartbeat_timeout_ms": 1000});
    let spec = json!({"protocol": "tcp", "listen": free_port(), "self_register": true, "max_self_registered": 1, "health": health});
    node.put("/v1/pools/hb", spec).await;
    let seed_backend = EchoBackend::start().await;
    let seed_sock = udp("127.0.0.1").await;
    let seed_udp = seed_sock.local_addr().expect("addr");
    node.put(
        "/v1/pools/seed",
        json!({"protocol": "tcp", "listen": free_port(), "health": {"heartbeat_port": seed_port}}),
    )
    .await;
    node.put(
        &format!("/v1/pools/seed/backends/{}", seed_backend.addr),
        json!({"heartbeat_addr": seed_udp.to_string()}),
    )
    .await;

    let (backend, attacker, other) = (udp("127.0.0.1").await, udp("127.0.0.2").await, udp("127.0.0.1").await);
    let mut ctx = Ctx {
        backend: backend.local_addr().expect("addr"),
        attacker: attacker.local_addr().expect("addr"),
        other: other.local_addr().expect("addr"),
        seed_tcp: seed_backend.addr,
        seed_udp,
        nonce: String::new(),
    };
    let run = Run {
        node: &node,
        ports: [
            (Pool::Auth, "hb", ([127, 0, 0, 1], auth_port).into()),
            (Pool::Seed, "seed", ([127, 0, 0, 1], seed_port).into()),
        ],
        sockets: [(Backend, backend), (SeedBackend, seed_sock), (Attacker, attacker), (Other, other)],
        marker: udp("127.0.0.1").await,
    };
    // Both heartbeat sockets listen once a datagram to each is counted.
    for pool in [Pool::Auth, Pool::Seed] {
        let (name, to) = run.port(pool);
        eventually(Duration::from_secs(15), "the heartbeat socket listens", || async {
            run.marker.send_to(b"", to).await.ok()?;
            tokio::time::sleep(Duration::from_millis(100)).await;
            (Counts::of(&node, name).received > 0).then_some(())
        })
        .await;
    }

    let mut failed = Vec::new();
    for case in CASES {
        tokio::time::sleep(case.after).await;
        match run.case(case, &ctx).await {
            Ok(Some(reply)) if case.from == Backend && case.reply == Reply::Nonce => {
                ctx.nonce = reply.trim_start_matches("NONCE ").to_string();
            }
            Ok(_) => {}
            Err(e) => failed.push(format!("{}: {e}\n    sent {}", case.name, shown(&bytes(case, &ctx)))),
        }
    }
    assert!(failed.is_empty(), "{} of {} heartbeat cases failed:\n{}", failed.len(), CASES.len(), failed.join("\n"));

    spoofed_keepalives_do_not_keep_the_backend_up(&run, &ctx).await;
    let (status, _) = get_text(node.http(), "/").await.expect("a normal client is served");
    assert!(status.is_success());
    node.stop().await;
}

/// From the backend's own address (what a spoofer would forge): bare, replayed and forged
/// keepalives do not keep it up once real ones stop, and each is counted by reason.
async fn spoofed_keepalives_do_not_keep_the_backend_up(run: &Run<'_>, ctx: &Ctx) {
    const SPOOFS: u64 = 12;
    let (pool, lb) = run.port(Pool::Auth);
    let before = Counts::of(run.node, pool);
    let replayed = ctx.keepalive(1);
    let forged = encode_ok(99, &ok_mac("guessed", &ctx.nonce, 99));
    for _ in 0..SPOOFS {
        for bytes in [&b"OK"[..], &replayed, &forged] {
            run.socket(Backend).send_to(bytes, lb).await.expect("send");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let h = run.node.get("/v1/pools/hb/health").await;
    let list: Vec<(String, String)> = h["backends"]
        .as_array()
        .expect("backends")
        .iter()
        .map(|b| (b["addr"].as_str().unwrap_or("").to_string(), b["status"].as_str().unwrap_or("").to_string()))
        .collect();
    assert_eq!(list, vec![("127.0.0.1:9000".to_string(), "BS_SICK".to_string())], "{h}");
    let mut want = before.clone();
    want.received += 3 * SPOOFS;
    for (reason, n) in [("unauthenticated", SPOOFS), ("replay", SPOOFS), ("bad_mac", SPOOFS)] {
        want.refused[REASONS.iter().position(|r| *r == reason).expect("reason")] += n;
    }
    assert_eq!(settle(run.node, pool, &want).await, want, "each spoof refused under its reason");
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
            let from = match c.from {
                Backend => "backend",
                SeedBackend => "seed backend",
                Attacker => "other host",
                Other => "other socket",
            };
            let pool = if c.pool == Pool::Seed { "seed pool" } else { "authenticated pool" };
            let reply = match c.reply {
                Reply::Silent => "silence".to_string(),
                Reply::Exact(r) => format!("`{r}`"),
                Reply::Nonce => "`NONCE <hex>`".to_string(),
            };
            let counter = match c.counter {
                Counter::None => "no refusal".to_string(),
                Counter::Malformed => "malformed +1".to_string(),
                Counter::Refused(r) => format!("refused{{reason=\"{r}\"}} +1"),
            };
            let sent = format!("to the {pool}, from the {from}: {sent}");
            ["heartbeat".to_string(), c.name.to_string(), sent, format!("{reply}; {counter}")]
        })
        .collect()
}
