//! The cluster-port table: what reaches a node's Raft port (TCP), which speaks mutual TLS 1.3
//! (`control::raft::channel`), then a hello frame each way with the cluster identity, then
//! `proto::codec` request frames (`control::raft::server`). Each case opens its own connection
//! (plain TCP, or TLS with the client the case describes) and sends its bytes; the outcome is
//! the `Reply` the node sent or the connection closed, and which counter moved by exactly one:
//! `shoal_rejected_inputs_total{kind}`, `shoal_cluster_id_mismatch_total{where}`, or none.
//! Cases run in order on a one-node cluster; the last three hold a connection, revoke its
//! certificate through the admin API and try the certificate again.

use std::sync::Arc;
use std::time::Duration;

use http::Method;
use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, Issuer, KeyPair, SanType, date_time_ymd};
use rustls::client::Resumption;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, SupportedProtocolVersion};
use serde_json::json;
use shoal_node::control::pki::{self, ALPN};
use shoal_node::control::raft::channel::testing::TestCa;
use shoal_node::control::raft::channel::{Hello, KIND_HELLO, KIND_HELLO_ACK, MAX_HELLO, TlsPem};
use shoal_node::control::raft::ident::ClusterId;
use shoal_node::control::raft::network::{Envelope, KIND_REPLY, KIND_REQUEST, Reply, Request};
use shoal_node::control::raft::server::HANDSHAKE_TIMEOUT;
use shoal_node::node::ClusterOptions;
use shoal_proto::codec::{self, HEADER_LEN, MAX_BODY, VERSION};
use shoal_tests::{TestNode, eventually, free_port};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::code;

/// The cluster (its CA's name) and the node under test (its id is its certificate's name).
const CLUSTER: &str = "shoal";
const NODE: &str = "hostile-cluster";
/// A Raft id no member has.
const STRANGER: u64 = 4242;
/// A Raft id that is not the node's, and a cluster identity that is not its cluster's.
const NOT_THE_NODE: u64 = 7;
const OTHER_IDENT: ClusterId = ClusterId(7);
/// Every `kind` of the cluster port's refusals, and every `where` of identity mismatches.
const KINDS: [&str; 7] = [
    "raft_preauth_limit",
    "raft_handshake_timeout",
    "raft_auth",
    "raft_revoked",
    "raft_frame",
    "raft_identity",
    "raft_misdirected",
];
const WHERES: [&str; 4] = ["handshake", "rpc", "ping", "gossip"];

/// What a case does on the cluster port.
pub enum Step {
    /// Plain TCP (no TLS): these bytes, the write side left open.
    Plain(&'static [u8]),
    /// Plain TCP: bytes built at run time (what they are, and how).
    PlainMade(&'static str, fn(&Ctx) -> Vec<u8>),
    /// Plain TCP: nothing, then the write side closed.
    Hangup,
    /// Plain TCP: nothing, the connection held open.
    Silent,
    /// A TLS client as `client` says, then `then` (bytes inside the channel).
    Tls { client: &'static str, config: fn(&Ctx) -> ClientConfig, then: &'static str, send: fn(&Ctx) -> Vec<u8> },
    /// The certificate of `lingering` connects, asks a Ping and keeps the connection.
    Hold,
    /// `POST /v1/cluster/revoke` with the serial of `lingering`; the held connection is read.
    Revoke,
}

/// What the node answers on the connection.
#[derive(Clone, Copy, Debug)]
pub enum Expect {
    /// The connection ends and the node sent no frame (a TLS alert at most).
    Closed,
    /// The node answers the hello with its own, then ends the connection without a reply.
    ClosedAfterHello,
    /// The connection ends without a reply only after the handshake timeout.
    TimedOut,
    /// `Reply::Refused` with this text (`{id}`: the node's Raft id, `{ident}`: its identity).
    Refused(&'static str),
    /// `Reply::Pong` with the node's Raft id and cluster identity.
    Pong,
}

/// The one counter that moves by exactly one, if any.
#[derive(Clone, Copy, Debug)]
pub enum Counted {
    Nothing,
    /// `shoal_rejected_inputs_total{kind}`.
    Rejected(&'static str),
    /// `shoal_cluster_id_mismatch_total{where}`.
    Mismatch(&'static str),
}

pub struct Case {
    pub name: &'static str,
    pub step: Step,
    pub expect: Expect,
    pub counted: Counted,
}

use Counted::{Mismatch, Nothing, Rejected};
use Expect::{Closed, ClosedAfterHello, Pong, Refused, TimedOut};

/// The node's identity, the CA, and the certificates the cases present.
pub struct Ctx {
    ca: TestCa,
    raft_id: u64,
    ident: Option<ClusterId>,
    /// This CA's certificate for node `peer`, a node the cluster does not have.
    peer: TlsPem,
    /// This CA's certificate for node `lingering`, revoked by the `Revoke` step.
    lingering: TlsPem,
    held: Option<TlsStream<TcpStream>>,
}

// ----- what is sent -----

fn hello(id: Option<ClusterId>) -> Vec<u8> {
    codec::encode(KIND_HELLO, &Hello { id }).expect("hello")
}

/// A hello naming the node's own cluster identity.
fn ours(c: &Ctx) -> Vec<u8> {
    hello(c.ident)
}

fn envelope(c: &Ctx, from: u64, body: Request) -> Envelope {
    Envelope { cluster: CLUSTER.into(), cluster_id: c.ident, from, to: c.raft_id, body }
}

fn frame(kind: u8, env: &Envelope) -> Vec<u8> {
    codec::encode(kind, env).expect("frame")
}

/// A Ping from a Raft id no member has, as a request frame.
fn ping(c: &Ctx) -> Vec<u8> {
    frame(KIND_REQUEST, &envelope(c, STRANGER, Request::Ping))
}

/// A frame header announcing `len` body bytes.
fn header(magic: [u8; 2], version: u8, kind: u8, len: usize) -> Vec<u8> {
    let mut h = magic.to_vec();
    h.extend([version, kind]);
    h.extend((len as u32).to_be_bytes());
    h
}

fn then_ping(c: &Ctx) -> Vec<u8> {
    [ours(c), ping(c)].concat()
}

// ----- the TLS clients -----

fn chain(pem: &str) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem.as_bytes()).collect::<Result<_, _>>().expect("certificate PEM")
}

/// A client that trusts this cluster's CA for the node's certificate and presents `cert`.
fn client(
    c: &Ctx,
    versions: &[&'static SupportedProtocolVersion],
    cert: Option<&TlsPem>,
    alpn: &[&[u8]],
) -> ClientConfig {
    let mut roots = RootCertStore::empty();
    for ca in chain(&c.ca.cert) {
        roots.add(ca).expect("root");
    }
    let builder = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(versions)
        .expect("versions")
        .with_root_certificates(roots);
    let mut config = match cert {
        Some(pem) => builder
            .with_client_auth_cert(chain(&pem.cert), PrivateKeyDer::from_pem_slice(pem.key.as_bytes()).expect("key"))
            .expect("client certificate"),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    config.resumption = Resumption::disabled();
    config
}

const TLS13: &[&SupportedProtocolVersion] = &[&rustls::version::TLS13];

/// A TLS 1.3 client with `shoal-raft/1` presenting `cert`.
fn presenting(c: &Ctx, cert: &TlsPem) -> ClientConfig {
    client(c, TLS13, Some(cert), &[ALPN])
}

fn as_peer(c: &Ctx) -> ClientConfig {
    presenting(c, &c.peer)
}

/// A certificate this cluster's CA signs: a node certificate for `crafted` as `shoal cert node`
/// makes it, then changed by `adjust`.
fn signed_by_our_ca(c: &Ctx, adjust: impl FnOnce(&mut CertificateParams)) -> TlsPem {
    let issuer = Issuer::from_ca_cert_pem(&c.ca.cert, KeyPair::from_pem(&c.ca.key).expect("CA key")).expect("issuer");
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![
        SanType::URI(pki::node_uri(CLUSTER, "crafted").try_into().expect("uri")),
        SanType::DnsName(pki::node_dns(CLUSTER, "crafted").try_into().expect("dns")),
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    adjust(&mut params);
    let cert = params.signed_by(&key, &issuer).expect("sign");
    TlsPem { ca: c.ca.cert.clone(), cert: cert.pem(), key: key.serialize_pem() }
}

fn uri(text: &str) -> SanType {
    SanType::URI(text.try_into().expect("uri"))
}

// ----- the table -----

const fn case(name: &'static str, step: Step, expect: Expect, counted: Counted) -> Case {
    Case { name, step, expect, counted }
}

/// Plain bytes: not TLS, so the handshake fails at once.
const fn plain(name: &'static str, bytes: &'static [u8]) -> Case {
    case(name, Step::Plain(bytes), Closed, Rejected("raft_auth"))
}

/// A TLS client the handshake refuses; it then sends a hello and a Ping, which go unanswered.
const fn refused_tls(name: &'static str, client: &'static str, config: fn(&Ctx) -> ClientConfig) -> Case {
    let step = Step::Tls { client, config, then: "a hello and a Ping", send: then_ping };
    case(name, step, Closed, Rejected("raft_auth"))
}

/// This CA's certificate for `peer` with `shoal-raft/1`, then `then`.
const fn as_node(
    name: &'static str,
    then: &'static str,
    send: fn(&Ctx) -> Vec<u8>,
    expect: Expect,
    counted: Counted,
) -> Case {
    case(name, Step::Tls { client: VALID, config: as_peer, then, send }, expect, counted)
}

const VALID: &str = "TLS 1.3, this CA's certificate for node `peer`, ALPN `shoal-raft/1`";

/// The cluster-port cases, in the order they run.
pub const CASES: &[Case] = &[
    // Not TLS at all.
    plain("an HTTP request", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
    case("64 zero bytes", Step::PlainMade("64 NUL bytes", |_| vec![0; 64]), Closed, Rejected("raft_auth")),
    plain("a frame of the plaintext protocol (codec version 1)", &[0x53, 0x48, 1, 1, 0, 0, 0, 1, 0]),
    case(
        "a Raft request without TLS",
        Step::PlainMade("a Ping request frame of the current codec, in the clear", ping),
        Closed,
        Rejected("raft_auth"),
    ),
    plain("a TLS record header announcing 65 535 bytes", &[0x16, 0x03, 0x01, 0xff, 0xff]),
    case("connect and hang up", Step::Hangup, Closed, Rejected("raft_auth")),
    case("connect and send nothing", Step::Silent, TimedOut, Rejected("raft_handshake_timeout")),
    // TLS that does not prove a node of this cluster.
    refused_tls("TLS 1.2 only", "TLS 1.2 only, this CA's certificate for node `peer`", |c| {
        client(c, &[&rustls::version::TLS12], Some(&c.peer), &[ALPN])
    }),
    refused_tls("no client certificate", "TLS 1.3 without a client certificate", |c| client(c, TLS13, None, &[ALPN])),
    refused_tls(
        "another CA of the same cluster name",
        "a node certificate for `peer` from a second CA named `shoal`",
        |c| presenting(c, &TestCa::new(CLUSTER).pem("peer")),
    ),
    refused_tls("another cluster's CA", "a node certificate for `peer` from the CA of cluster `other`", |c| {
        presenting(c, &TestCa::new("other").pem("peer"))
    }),
    refused_tls(
        "this CA, naming another cluster",
        "this CA signed it, but it names `spiffe://other/node/crafted`",
        |c| {
            presenting(
                c,
                &signed_by_our_ca(c, |p| {
                    p.subject_alt_names = vec![uri("spiffe://other/node/crafted")];
                }),
            )
        },
    ),
    refused_tls("this CA, no node name", "this CA signed it, with only a DNS name (no spiffe URI)", |c| {
        presenting(
            c,
            &signed_by_our_ca(c, |p| {
                p.subject_alt_names = vec![SanType::DnsName("crafted.example".try_into().expect("dns"))];
            }),
        )
    }),
    refused_tls(
        "this CA, two node names",
        "this CA signed it, naming `spiffe://shoal/node/a` and `spiffe://shoal/node/b`",
        |c| {
            presenting(
                c,
                &signed_by_our_ca(c, |p| {
                    p.subject_alt_names = vec![uri("spiffe://shoal/node/a"), uri("spiffe://shoal/node/b")];
                }),
            )
        },
    ),
    refused_tls("this CA, expired", "this CA signed it, valid only during 2020", |c| {
        presenting(
            c,
            &signed_by_our_ca(c, |p| {
                p.not_before = date_time_ymd(2020, 1, 1);
                p.not_after = date_time_ymd(2021, 1, 1);
            }),
        )
    }),
    refused_tls("this CA, for servers only", "this CA signed it, extended key usage serverAuth only", |c| {
        presenting(
            c,
            &signed_by_our_ca(c, |p| {
                p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            }),
        )
    }),
    refused_tls("the CA certificate itself", "the cluster CA's own certificate and key as the client's", |c| {
        let ca = TlsPem { ca: c.ca.cert.clone(), cert: c.ca.cert.clone(), key: c.ca.key.clone() };
        presenting(c, &ca)
    }),
    refused_tls("another ALPN", "TLS 1.3, this CA's certificate for `peer`, ALPN `h2` only", |c| {
        client(c, TLS13, Some(&c.peer), &[b"h2"])
    }),
    refused_tls("no ALPN", "TLS 1.3, this CA's certificate for `peer`, no ALPN", |c| {
        client(c, TLS13, Some(&c.peer), &[])
    }),
    // A node of this cluster, and a bad identity exchange.
    as_node(
        "a hello naming another cluster identity",
        "a hello with identity 000…07",
        |_| hello(Some(OTHER_IDENT)),
        ClosedAfterHello,
        Mismatch("handshake"),
    ),
    as_node("a request instead of a hello", "a Ping request frame first", ping, Closed, Rejected("raft_auth")),
    as_node(
        "a hello over its size limit",
        "a hello frame of 257 bytes (at most 256)",
        |_| [header(codec::MAGIC, VERSION, KIND_HELLO, MAX_HELLO + 1), vec![0; MAX_HELLO + 1]].concat(),
        Closed,
        Rejected("raft_auth"),
    ),
    as_node(
        "a hello that is not a Hello",
        "a hello frame with body `ff ff ff ff`",
        |_| [header(codec::MAGIC, VERSION, KIND_HELLO, 4), vec![0xff; 4]].concat(),
        Closed,
        Rejected("raft_auth"),
    ),
    // A node of this cluster, then a bad frame.
    as_node(
        "a frame over MAX_BODY",
        "a hello, then a request header announcing 64 MiB + 1",
        |c| [ours(c), header(codec::MAGIC, VERSION, KIND_REQUEST, MAX_BODY + 1)].concat(),
        ClosedAfterHello,
        Rejected("raft_frame"),
    ),
    as_node(
        "a frame with a bad magic",
        "a hello, then a Ping frame starting `XX`",
        |c| [ours(c), b"XX".to_vec(), ping(c)[2..].to_vec()].concat(),
        ClosedAfterHello,
        Rejected("raft_frame"),
    ),
    as_node(
        "a frame of codec version 1",
        "a hello, then a Ping frame with version byte 1",
        |c| {
            let mut f = ping(c);
            f[2] = 1;
            [ours(c), f].concat()
        },
        ClosedAfterHello,
        Rejected("raft_frame"),
    ),
    as_node(
        "a reply frame instead of a request",
        "a hello, then a Ping envelope in a frame of kind 2 (reply)",
        |c| [ours(c), frame(KIND_REPLY, &envelope(c, STRANGER, Request::Ping))].concat(),
        Refused("expected a request frame"),
        Rejected("raft_frame"),
    ),
    as_node(
        "an undecodable request body",
        "a hello, then a request frame with body `ff ff ff ff`",
        |c| [ours(c), header(codec::MAGIC, VERSION, KIND_REQUEST, 4), vec![0xff; 4]].concat(),
        ClosedAfterHello,
        Rejected("raft_frame"),
    ),
    as_node(
        "an empty request body",
        "a hello, then a request frame of length 0",
        |c| [ours(c), header(codec::MAGIC, VERSION, KIND_REQUEST, 0)].concat(),
        ClosedAfterHello,
        Rejected("raft_frame"),
    ),
    as_node(
        "a request with a byte after the envelope",
        "a hello, then a Ping frame whose body has one extra byte",
        |c| {
            let env = codec::encode_body(&envelope(c, STRANGER, Request::Ping)).expect("body");
            let body = [env, vec![0]].concat();
            [ours(c), codec::frame(KIND_REQUEST, &body).expect("frame")].concat()
        },
        ClosedAfterHello,
        Rejected("raft_frame"),
    ),
    // A node of this cluster, then a well-formed request it may not make.
    as_node(
        "an envelope naming another cluster",
        "a hello, then a Ping with cluster `other`",
        |c| {
            let env = Envelope { cluster: "other".into(), ..envelope(c, STRANGER, Request::Ping) };
            [ours(c), frame(KIND_REQUEST, &env)].concat()
        },
        Refused("this node belongs to cluster \"shoal\""),
        Rejected("raft_misdirected"),
    ),
    as_node(
        "an envelope for another node",
        "a hello, then a Ping with `to` 7 (not the node's Raft id)",
        |c| {
            let env = Envelope { to: NOT_THE_NODE, ..envelope(c, STRANGER, Request::Ping) };
            [ours(c), frame(KIND_REQUEST, &env)].concat()
        },
        Refused("this is node {id}, not 7"),
        Rejected("raft_misdirected"),
    ),
    as_node(
        "claims a member's Raft id",
        "a hello, then a Ping with `from` the node's own Raft id",
        |c| [ours(c), frame(KIND_REQUEST, &envelope(c, c.raft_id, Request::Ping))].concat(),
        Refused("Raft id {id} is node hostile-cluster, but the certificate names node peer"),
        Rejected("raft_identity"),
    ),
    as_node(
        "an envelope naming another cluster identity",
        "a hello, then a Ping with cluster identity 000…07",
        |c| {
            let env = Envelope { cluster_id: Some(OTHER_IDENT), ..envelope(c, STRANGER, Request::Ping) };
            [ours(c), frame(KIND_REQUEST, &env)].concat()
        },
        Refused("this node belongs to cluster {ident}, not 00000000000000000000000000000007"),
        Mismatch("rpc"),
    ),
    as_node("a Ping from an unknown Raft id", "a hello, then a Ping from Raft id 4242", then_ping, Pong, Nothing),
    as_node(
        "a node without a cluster identity yet",
        "a hello without identity, then a Ping without identity",
        |c| {
            let env = Envelope { cluster_id: None, ..envelope(c, STRANGER, Request::Ping) };
            [hello(None), frame(KIND_REQUEST, &env)].concat()
        },
        Pong,
        Nothing,
    ),
    // Revocation: a live connection is dropped, a new one refused.
    case("a node that stays connected", Step::Hold, Pong, Nothing),
    case("its certificate revoked", Step::Revoke, Closed, Rejected("raft_revoked")),
    case(
        "the revoked certificate again",
        Step::Tls {
            client: "TLS 1.3, the revoked certificate of `lingering`",
            config: |c| presenting(c, &c.lingering),
            then: "a hello and a Ping",
            send: then_ping,
        },
        Closed,
        Rejected("raft_revoked"),
    ),
];

// ----- running the table -----

/// What the node did on a connection.
#[derive(Debug)]
enum Seen {
    /// The connection ended; `hello`: after the node's hello.
    Closed {
        hello: bool,
    },
    Reply(Box<Reply>),
    /// Anything else: still open, a frame we did not expect, an error of the test itself.
    Other(String),
}

/// Counters by `kind=…` and `where=…`.
fn counts(node: &TestNode) -> Vec<(String, u64)> {
    let m = &node.handle.shared.metrics;
    let rejected = KINDS.iter().map(|k| (format!("kind={k}"), m.rejected_inputs.with_label_values(&[*k]).get()));
    let mismatch = WHERES.iter().map(|w| (format!("where={w}"), m.cluster_id_mismatch.with_label_values(&[*w]).get()));
    rejected.chain(mismatch).collect()
}

fn label(counted: Counted) -> Option<String> {
    match counted {
        Nothing => None,
        Rejected(k) => Some(format!("kind={k}")),
        Mismatch(w) => Some(format!("where={w}")),
    }
}

/// Reads until the peer closes (or 10 s pass).
async fn closed<S: AsyncRead + Unpin>(s: &mut S) -> Seen {
    let mut buf = [0u8; 4096];
    let reading = async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return Seen::Closed { hello: false },
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), reading).await.unwrap_or(Seen::Other("still open after 10 s".into()))
}

/// Reads frames: the node's hello is noted, a reply is returned, an end is `Closed`.
async fn answer<S: AsyncRead + Unpin>(s: &mut S) -> Seen {
    let reading = async {
        let mut hello = false;
        loop {
            let mut head = [0u8; HEADER_LEN];
            if s.read_exact(&mut head).await.is_err() {
                return Seen::Closed { hello };
            }
            let h = match codec::decode_header(&head) {
                Ok(h) => h,
                Err(e) => return Seen::Other(format!("a bad frame from the node: {e}")),
            };
            let mut body = vec![0; h.len];
            if s.read_exact(&mut body).await.is_err() {
                return Seen::Closed { hello };
            }
            match h.kind {
                KIND_HELLO_ACK if !hello => hello = true,
                KIND_REPLY => {
                    return match codec::decode_body::<Reply>(&body) {
                        Ok(r) => Seen::Reply(Box::new(r)),
                        Err(e) => Seen::Other(format!("an undecodable reply: {e}")),
                    };
                }
                k => return Seen::Other(format!("a frame of kind {k} from the node")),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), reading).await.unwrap_or(Seen::Other("no answer in 10 s".into()))
}

/// TLS to the node with `config`, then `bytes`; `None` when the handshake failed on our side.
async fn tls(to: std::net::SocketAddr, config: ClientConfig, bytes: &[u8]) -> Option<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(to).await.expect("connect");
    let name = ServerName::try_from(pki::node_dns(CLUSTER, NODE)).expect("server name");
    let connecting = TlsConnector::from(Arc::new(config)).connect(name, tcp);
    let mut s = tokio::time::timeout(Duration::from_secs(10), connecting).await.ok()?.ok()?;
    // A refusal may arrive first: writing into a closed connection is part of the case.
    let _ = s.write_all(bytes).await;
    let _ = s.flush().await;
    Some(s)
}

async fn open_plain(to: std::net::SocketAddr, bytes: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(to).await.expect("connect");
    let _ = s.write_all(bytes).await;
    s
}

async fn step(node: &TestNode, to: std::net::SocketAddr, case: &Case, ctx: &mut Ctx) -> Seen {
    match &case.step {
        Step::Plain(bytes) => closed(&mut open_plain(to, bytes).await).await,
        Step::PlainMade(_, make) => closed(&mut open_plain(to, &make(ctx)).await).await,
        Step::Hangup => {
            let mut s = open_plain(to, b"").await;
            let _ = s.shutdown().await;
            closed(&mut s).await
        }
        Step::Silent => {
            let started = Instant::now();
            let seen = closed(&mut open_plain(to, b"").await).await;
            let after = started.elapsed();
            if after < HANDSHAKE_TIMEOUT * 3 / 4 {
                return Seen::Other(format!("closed after {after:?}, before the handshake timeout"));
            }
            seen
        }
        Step::Tls { config, send, .. } => match tls(to, config(ctx), &send(ctx)).await {
            Some(mut s) => answer(&mut s).await,
            None => Seen::Closed { hello: false },
        },
        Step::Hold => {
            let Some(mut s) = tls(to, presenting(ctx, &ctx.lingering), &then_ping(ctx)).await else {
                return Seen::Other("the TLS handshake failed".into());
            };
            let seen = answer(&mut s).await;
            ctx.held = Some(s);
            seen
        }
        Step::Revoke => {
            let serial = pki::node_identity_pem(&ctx.lingering.cert, std::path::Path::new("lingering.pem"))
                .expect("serial")
                .serial;
            let body = json!({ "serial": serial }).to_string();
            let (status, answer) = node.call(Method::POST, "/v1/cluster/revoke", Some(&body)).await;
            if !status.is_success() {
                return Seen::Other(format!("revoke answered {status}: {answer}"));
            }
            match ctx.held.as_mut() {
                Some(s) => closed(s).await,
                None => Seen::Other("no held connection".into()),
            }
        }
    }
}

/// Whether the node did what the case expects.
fn matches(expect: Expect, seen: &Seen, ctx: &Ctx) -> bool {
    match (expect, seen) {
        (Closed | TimedOut, Seen::Closed { hello: false }) => true,
        (ClosedAfterHello, Seen::Closed { hello: true }) => true,
        (Refused(text), Seen::Reply(reply)) => matches!(&**reply, Reply::Refused(why) if *why == filled(text, ctx)),
        (Pong, Seen::Reply(reply)) => {
            matches!(&**reply, Reply::Pong(id, ident) if *id == ctx.raft_id && *ident == ctx.ident)
        }
        _ => false,
    }
}

fn filled(text: &str, ctx: &Ctx) -> String {
    let ident = ctx.ident.map(|i| i.to_string()).unwrap_or_default();
    text.replace("{id}", &ctx.raft_id.to_string()).replace("{ident}", &ident)
}

/// Runs one case and checks its answer and that exactly its counter moved by one.
async fn run(node: &TestNode, to: std::net::SocketAddr, case: &Case, ctx: &mut Ctx) -> Result<(), String> {
    let before = counts(node);
    let seen = step(node, to, case, ctx).await;
    let mut want = before.clone();
    if let Some(label) = label(case.counted) {
        want.iter_mut().find(|(l, _)| *l == label).expect("a known counter").1 += 1;
    }
    // The node counts before it closes, so this is quick; the wait covers a lost race with
    // a reply that was sent before the count.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut got = counts(node);
    while got != want && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
        got = counts(node);
    }
    let mut problems = Vec::new();
    if !matches(case.expect, &seen, ctx) {
        let saw = match &seen {
            Seen::Other(what) => what.clone(),
            other => format!("{other:?}"),
        };
        problems.push(format!("saw {saw}, expected {:?}", case.expect));
    }
    if got != want {
        let moved: Vec<String> = got
            .iter()
            .zip(&before)
            .filter(|(g, b)| g.1 != b.1)
            .map(|(g, b)| format!("{} +{}", g.0, g.1 - b.1))
            .collect();
        problems.push(format!("counters moved: {moved:?}, expected {:?} +1", label(case.counted)));
    }
    if problems.is_empty() { Ok(()) } else { Err(problems.join("; ")) }
}

/// Every cluster-port case in order on a one-node cluster, which then still commits a write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_cluster_port_case_gets_its_exact_answer_and_counter() {
    let ca = TestCa::new(CLUSTER);
    let creds = ca.creds(NODE);
    let to = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let node = TestNode::start_in(NODE, tempfile::tempdir().expect("dir"), |o| {
        o.cluster = Some(ClusterOptions::new(to, vec![], 1, creds));
    })
    .await;
    let raft = node.handle.shared.raft.clone();
    eventually(Duration::from_secs(30), "the one-node cluster leads with an identity", || async {
        let leads = raft.raft.metrics().borrow().current_leader == Some(raft.id);
        (leads && raft.ident.get().is_some()).then_some(())
    })
    .await;
    assert!(raft.id != STRANGER && raft.id != NOT_THE_NODE, "the test's ids are not the node's");
    let mut ctx = Ctx {
        peer: ca.pem("peer"),
        lingering: ca.pem("lingering"),
        ca,
        raft_id: raft.id,
        ident: raft.ident.get(),
        held: None,
    };
    let started = Instant::now();
    let mut failed = Vec::new();
    for case in CASES {
        if let Err(e) = run(&node, to, case, &mut ctx).await {
            failed.push(format!("{}: {e}\n    sent {}", case.name, sent(case)));
        }
    }
    eprintln!("{} cluster-port cases in {:?}", CASES.len(), started.elapsed());
    assert!(failed.is_empty(), "{} of {} cluster-port cases failed:\n{}", failed.len(), CASES.len(), failed.join("\n"));

    // The node still commits a write.
    eventually(Duration::from_secs(30), "a pool is written through Raft", || async {
        let spec = json!({"pattern": "/", "health": {"interval_ms": 300}}).to_string();
        node.call(Method::PUT, "/v1/pools/web", Some(&spec)).await.0.is_success().then_some(())
    })
    .await;
    assert!(node.get("/v1/pools").await.to_string().contains("web"), "the pool is there");
    node.stop().await;
}

fn sent(case: &Case) -> String {
    match &case.step {
        Step::Plain(b) => format!("plain TCP: {}", code(b)),
        Step::PlainMade(what, _) => format!("plain TCP: {what}"),
        Step::Hangup => "plain TCP: nothing, then FIN".into(),
        Step::Silent => "plain TCP: nothing, the connection left open".into(),
        Step::Tls { client, then, .. } => format!("{client}; then {then}"),
        Step::Hold => "TLS 1.3, this CA's certificate for node `lingering`; a hello, a Ping; kept open".into(),
        Step::Revoke => {
            "`POST /v1/cluster/revoke {\"serial\": <lingering's>}` on the admin API; the held connection read".into()
        }
    }
}

fn outcome(case: &Case) -> String {
    let answer = match case.expect {
        Closed => "closed, no frame back".to_string(),
        ClosedAfterHello => "its hello (identity) back, then closed".to_string(),
        TimedOut => format!("closed after the {HANDSHAKE_TIMEOUT:?} handshake timeout"),
        Refused(text) => {
            let text = text.replace("{id}", "<its Raft id>").replace("{ident}", "<its cluster identity>");
            format!("`Reply::Refused`: `{text}`")
        }
        Pong => "`Reply::Pong(<its Raft id>, <its cluster identity>)`".to_string(),
    };
    let counter = match case.counted {
        Nothing => "nothing counted".to_string(),
        Rejected(k) => format!("rejected_inputs{{kind=\"{k}\"}} +1"),
        Mismatch(w) => format!("cluster_id_mismatch{{where=\"{w}\"}} +1"),
    };
    format!("{answer}; {counter}")
}

/// The table as rows for the case list: family, name, what is sent, outcome.
pub fn rows() -> Vec<[String; 4]> {
    CASES.iter().map(|c| ["cluster port".to_string(), c.name.to_string(), sent(c), outcome(c)]).collect()
}
