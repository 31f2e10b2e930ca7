//! The cluster key and the authenticated, encrypted channel Raft RPC runs on.
//!
//! Every node of a cluster holds the same 256-bit key (`--cluster-key-file`). A connection
//! starts with a mutual challenge–response (each side proves it holds the key over both fresh
//! nonces); both sides then derive one ChaCha20-Poly1305 key per direction and seal every frame
//! body with a counter nonce, so frames cannot be forged, altered, replayed or reordered. A peer
//! without the key cannot join, vote or append: it never gets past the handshake.

use std::io;
use std::path::Path;

use ring::aead::{CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
use ring::hmac;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use shoal_proto::codec::{self, HEADER_LEN};
use subtle::ConstantTimeEq;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::control::raft::ident::{ClusterId, compatible};

/// Frame kinds of the handshake (sealed frames use the callers' kinds).
const KIND_HELLO: u8 = 10;
const KIND_CHALLENGE: u8 = 11;
const KIND_PROOF: u8 = 12;

/// The shared secret of a cluster.
#[derive(Clone)]
pub struct ClusterKey {
    raw: [u8; 32],
    /// HMAC key schedule of `raw`, computed once: gossip MACs every datagram.
    hmac: hmac::Key,
}

impl std::fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterKey(…)")
    }
}

impl ClusterKey {
    /// A fresh random key.
    pub fn generate() -> ClusterKey {
        ClusterKey::from_raw(rand::random())
    }

    fn from_raw(raw: [u8; 32]) -> ClusterKey {
        ClusterKey { raw, hmac: hmac::Key::new(hmac::HMAC_SHA256, &raw) }
    }

    /// 64 hex digits.
    pub fn to_hex(&self) -> String {
        hex(&self.raw)
    }

    pub fn from_hex(text: &str) -> Result<ClusterKey, String> {
        let text = text.trim();
        if text.len() != 64 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err("a cluster key is 64 hex digits (create one with `shoal cert cluster-key`)".into());
        }
        let mut raw = [0u8; 32];
        for (i, chunk) in text.as_bytes().chunks(2).enumerate() {
            let pair = std::str::from_utf8(chunk).map_err(|e| e.to_string())?;
            raw[i] = u8::from_str_radix(pair, 16).map_err(|e| e.to_string())?;
        }
        Ok(ClusterKey::from_raw(raw))
    }

    /// Reads a key file (refused unless private); errors name the file.
    pub fn load(path: &Path) -> Result<ClusterKey, String> {
        let text = crate::files::read_secret(path).map_err(|e| format!("{}: {e}", path.display()))?;
        ClusterKey::from_hex(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// HMAC-SHA256 of the parts, in order.
    pub fn mac(&self, parts: &[&[u8]]) -> [u8; 32] {
        let mut ctx = hmac::Context::with_key(&self.hmac);
        parts.iter().for_each(|p| ctx.update(p));
        let tag = ctx.sign();
        let mut out = [0u8; 32];
        out.copy_from_slice(tag.as_ref());
        out
    }

    /// Constant-time check of a MAC over `parts`.
    pub fn verify(&self, parts: &[&[u8]], tag: &[u8]) -> bool {
        self.mac(parts).as_slice().ct_eq(tag).into()
    }
}

/// Lower-case hex digits of `bytes` (keys and tokens).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[derive(Serialize, Deserialize)]
struct Hello {
    cluster: String,
    /// The client's cluster identity (`None`: not initialized yet).
    id: Option<ClusterId>,
    nonce: [u8; 32],
}

#[derive(Serialize, Deserialize)]
struct Challenge {
    nonce: [u8; 32],
    proof: [u8; 32],
    /// The server's cluster identity.
    id: Option<ClusterId>,
}

/// The handshake named another cluster identity (the error inside an `io::Error`).
#[derive(Debug, thiserror::Error)]
#[error("the peer belongs to cluster {theirs}, this node to {ours}")]
pub struct OtherCluster {
    pub ours: ClusterId,
    pub theirs: ClusterId,
}

impl OtherCluster {
    /// The mismatch an I/O error carries, if it is one.
    pub fn of(e: &io::Error) -> Option<&OtherCluster> {
        e.get_ref().and_then(|inner| inner.downcast_ref::<OtherCluster>())
    }
}

/// Refuses a peer whose identity differs from ours (either may still have none).
fn same_cluster(ours: Option<ClusterId>, theirs: Option<ClusterId>) -> io::Result<()> {
    match (ours, theirs) {
        (Some(ours), Some(theirs)) if !compatible(Some(ours), Some(theirs)) => {
            Err(io::Error::new(io::ErrorKind::PermissionDenied, OtherCluster { ours, theirs }))
        }
        _ => Ok(()),
    }
}

#[derive(Serialize, Deserialize)]
struct Proof {
    proof: [u8; 32],
}

/// One direction's cipher and frame counter.
struct Sealer {
    key: LessSafeKey,
    counter: u64,
}

impl Sealer {
    fn new(material: [u8; 32]) -> Sealer {
        let unbound = UnboundKey::new(&CHACHA20_POLY1305, &material).unwrap_or_else(|_| unreachable!("32-byte key"));
        Sealer { key: LessSafeKey::new(unbound), counter: 0 }
    }

    fn nonce(&mut self) -> Nonce {
        let mut n = [0u8; 12];
        n[4..].copy_from_slice(&self.counter.to_be_bytes());
        self.counter += 1;
        Nonce::assume_unique_for_key(n)
    }
}

/// A stream whose frames are sealed with per-direction session keys.
pub struct SecureStream<S> {
    stream: S,
    tx: Sealer,
    rx: Sealer,
}

fn bad(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, msg.to_string())
}

async fn send_plain<S: AsyncWrite + Unpin, T: Serialize>(s: &mut S, kind: u8, msg: &T) -> io::Result<()> {
    let frame = codec::encode(kind, msg).map_err(|e| io::Error::other(e.to_string()))?;
    s.write_all(&frame).await
}

/// Largest handshake frame: they hold a cluster name and 32-byte values, and they arrive
/// before the peer has proved anything, so a stranger cannot make us buffer much.
const MAX_HANDSHAKE_FRAME: usize = 4096;

/// Reads one frame's kind and raw body of at most `max` bytes. The buffer grows as bytes
/// arrive rather than trusting the announced length up front.
async fn read_raw<S: AsyncRead + Unpin>(s: &mut S, max: usize) -> io::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; HEADER_LEN];
    s.read_exact(&mut head).await?;
    let header = codec::decode_header(&head).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
    if header.len > max {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("frame of {} bytes exceeds {max}", header.len)));
    }
    let mut body = Vec::with_capacity(header.len.min(64 * 1024));
    (&mut *s).take(header.len as u64).read_to_end(&mut body).await?;
    if body.len() != header.len {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok((header.kind, body))
}

async fn recv_plain<S: AsyncRead + Unpin, T: DeserializeOwned>(s: &mut S, kind: u8) -> io::Result<T> {
    let (got, body) = read_raw(s, MAX_HANDSHAKE_FRAME).await?;
    if got != kind {
        return Err(bad("unexpected handshake frame"));
    }
    codec::decode_body(&body).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))
}

fn session(key: &ClusterKey, label: &[u8], first: &[u8; 32], second: &[u8; 32]) -> Sealer {
    Sealer::new(key.mac(&[label, first, second]))
}

impl<S: AsyncRead + AsyncWrite + Unpin> SecureStream<S> {
    /// Client side of the handshake: proves the key and checks the server proves it too, and
    /// that it belongs to the same cluster identity (`id`: ours).
    pub async fn connect(
        mut stream: S,
        key: &ClusterKey,
        cluster: &str,
        id: Option<ClusterId>,
    ) -> io::Result<SecureStream<S>> {
        let mine: [u8; 32] = rand::random();
        send_plain(&mut stream, KIND_HELLO, &Hello { cluster: cluster.to_string(), id, nonce: mine }).await?;
        let ch: Challenge = recv_plain(&mut stream, KIND_CHALLENGE).await?;
        if !key.verify(&[b"shoal-raft-server", &mine, &ch.nonce], &ch.proof) {
            return Err(bad("the peer does not hold this cluster's key"));
        }
        same_cluster(id, ch.id)?;
        let proof = key.mac(&[b"shoal-raft-client", &ch.nonce, &mine]);
        send_plain(&mut stream, KIND_PROOF, &Proof { proof }).await?;
        Ok(SecureStream {
            stream,
            tx: session(key, b"c2s", &mine, &ch.nonce),
            rx: session(key, b"s2c", &mine, &ch.nonce),
        })
    }

    /// Server side of the handshake (`id`: this node's cluster identity).
    pub async fn accept(
        mut stream: S,
        key: &ClusterKey,
        cluster: &str,
        id: Option<ClusterId>,
    ) -> io::Result<SecureStream<S>> {
        let hello: Hello = recv_plain(&mut stream, KIND_HELLO).await?;
        if hello.cluster != cluster {
            return Err(bad("the peer belongs to another cluster"));
        }
        let mine: [u8; 32] = rand::random();
        let proof = key.mac(&[b"shoal-raft-server", &hello.nonce, &mine]);
        send_plain(&mut stream, KIND_CHALLENGE, &Challenge { nonce: mine, proof, id }).await?;
        let p: Proof = recv_plain(&mut stream, KIND_PROOF).await?;
        if !key.verify(&[b"shoal-raft-client", &mine, &hello.nonce], &p.proof) {
            return Err(bad("the peer does not hold this cluster's key"));
        }
        // Only a key holder learns it was refused for its identity (and gets it counted).
        same_cluster(id, hello.id)?;
        Ok(SecureStream {
            stream,
            tx: session(key, b"s2c", &hello.nonce, &mine),
            rx: session(key, b"c2s", &hello.nonce, &mine),
        })
    }

    /// Seals and sends one message.
    pub async fn send<T: Serialize>(&mut self, kind: u8, msg: &T) -> io::Result<()> {
        let mut body = codec::encode_body(msg).map_err(|e| io::Error::other(e.to_string()))?;
        let nonce = self.tx.nonce();
        self.tx
            .key
            .seal_in_place_append_tag(nonce, ring::aead::Aad::from([kind]), &mut body)
            .map_err(|_| io::Error::other("seal failed"))?;
        let frame = codec::frame(kind, &body).map_err(|e| io::Error::other(e.to_string()))?;
        self.stream.write_all(&frame).await
    }

    /// Receives and opens one message; a forged or replayed frame is an error.
    pub async fn recv<T: DeserializeOwned>(&mut self) -> io::Result<(u8, T)> {
        let (kind, mut body) = read_raw(&mut self.stream, codec::MAX_BODY).await?;
        let nonce = self.rx.nonce();
        let plain = self
            .rx
            .key
            .open_in_place(nonce, ring::aead::Aad::from([kind]), &mut body)
            .map_err(|_| bad("frame failed authentication"))?;
        let msg = codec::decode_body(plain).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        Ok((kind, msg))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn same_key_talks_and_other_keys_are_refused() {
        let key = ClusterKey::generate();
        let (a, b) = tokio::io::duplex(4096);
        let k2 = key.clone();
        let server = tokio::spawn(async move {
            let mut s = SecureStream::accept(b, &k2, "c", None).await.expect("accept");
            let (kind, msg): (u8, String) = s.recv().await.expect("recv");
            s.send(kind + 1, &format!("{msg}!")).await.expect("send");
        });
        let mut c = SecureStream::connect(a, &key, "c", None).await.expect("connect");
        c.send(1, &"hello".to_string()).await.expect("send");
        let (kind, reply): (u8, String) = c.recv().await.expect("recv");
        assert_eq!((kind, reply.as_str()), (2, "hello!"));
        server.await.expect("server");

        let (a, b) = tokio::io::duplex(4096);
        let other = ClusterKey::generate();
        let server = tokio::spawn(async move { SecureStream::accept(b, &key, "c", None).await.map(|_| ()) });
        assert!(SecureStream::connect(a, &other, "c", None).await.is_err(), "a wrong key fails the handshake");
        assert!(server.await.expect("join").is_err());
    }

    #[tokio::test]
    async fn tampered_frames_are_rejected() {
        let key = ClusterKey::generate();
        let (a, b) = tokio::io::duplex(4096);
        let k2 = key.clone();
        let server = tokio::spawn(async move {
            let mut s = SecureStream::accept(b, &k2, "c", None).await.expect("accept");
            s.recv::<String>().await
        });
        let mut c = SecureStream::connect(a, &key, "c", None).await.expect("connect");
        // Write a frame sealed for the wrong position (counter 5 instead of 0).
        c.tx.counter = 5;
        c.send(1, &"forged".to_string()).await.expect("send");
        assert!(server.await.expect("join").is_err());
    }

    #[tokio::test]
    async fn an_oversized_hello_is_refused_before_it_is_read() {
        let key = ClusterKey::generate();
        let (mut a, b) = tokio::io::duplex(4096);
        let server = tokio::spawn(async move { SecureStream::accept(b, &key, "c", None).await.map(|_| ()) });
        // Announces a 64 MiB hello and sends none of it: the server must not wait for it.
        let head = [codec::MAGIC[0], codec::MAGIC[1], codec::VERSION, KIND_HELLO, 4, 0, 0, 0];
        a.write_all(&head).await.expect("write");
        let err = server.await.expect("join").expect_err("refused");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
    }

    #[tokio::test]
    async fn the_handshake_refuses_another_cluster_identity_both_ways() {
        let key = ClusterKey::generate();
        let (x, y) = (Some(ClusterId(1)), Some(ClusterId(2)));
        for (client, server, ok) in [(x, x, true), (None, x, true), (x, None, true), (x, y, false)] {
            let (a, b) = tokio::io::duplex(4096);
            let k2 = key.clone();
            let accepted = tokio::spawn(async move { SecureStream::accept(b, &k2, "c", server).await.map(|_| ()) });
            let connected = SecureStream::connect(a, &key, "c", client).await.map(|_| ());
            let accepted = accepted.await.expect("join");
            if ok {
                assert!(connected.is_ok(), "{client:?} -> {server:?}");
                assert!(accepted.is_ok(), "{client:?} -> {server:?}");
            } else {
                let err = connected.expect_err("the client refuses the server's identity");
                assert_eq!(OtherCluster::of(&err).map(|o| (o.ours, o.theirs)), Some((ClusterId(1), ClusterId(2))));
            }
        }
    }

    #[test]
    fn keys_round_trip_as_hex() {
        let k = ClusterKey::generate();
        assert_eq!(ClusterKey::from_hex(&k.to_hex()).expect("hex").raw, k.raw);
        assert!(ClusterKey::from_hex("abc").is_err());
    }
}
