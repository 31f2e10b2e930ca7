//! The cluster's gossip key: every node holds the same 256-bit key (`cluster.key` beside its
//! certificate), and every gossip datagram carries an HMAC made with it (`gossip_auth.rs`).
//! Raft RPC does not use it: it runs on mutual TLS with per-node certificates (`raft::channel`),
//! as Consul keeps a gossip key beside TLS for RPC (UDP has no TLS).

use std::path::{Path, PathBuf};

use ring::hmac;
use subtle::ConstantTimeEq;

/// Why a cluster key could not be had.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("a cluster key is 64 hex digits (`shoal cert ca` makes one)")]
    NotHex,
    /// The key file could not be read (or is not private).
    #[error("{}: {error}", path.display())]
    Read { path: PathBuf, error: std::io::Error },
    /// The key file does not hold a key.
    #[error("{}: {}", path.display(), KeyError::NotHex)]
    Invalid { path: PathBuf },
}

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

    pub fn from_hex(text: &str) -> Result<ClusterKey, KeyError> {
        let text = text.trim();
        if text.len() != 64 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(KeyError::NotHex);
        }
        let mut raw = [0u8; 32];
        for (i, chunk) in text.as_bytes().chunks(2).enumerate() {
            // Checked above: ASCII hex digits, so neither step fails.
            let pair = std::str::from_utf8(chunk).map_err(|_| KeyError::NotHex)?;
            raw[i] = u8::from_str_radix(pair, 16).map_err(|_| KeyError::NotHex)?;
        }
        Ok(ClusterKey::from_raw(raw))
    }

    /// Reads a key file (refused unless private); errors name the file.
    pub fn load(path: &Path) -> Result<ClusterKey, KeyError> {
        let text =
            crate::files::read_secret(path).map_err(|error| KeyError::Read { path: path.to_path_buf(), error })?;
        ClusterKey::from_hex(&text).map_err(|_| KeyError::Invalid { path: path.to_path_buf() })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_as_hex() {
        let k = ClusterKey::generate();
        assert_eq!(ClusterKey::from_hex(&k.to_hex()).expect("hex").raw, k.raw);
        assert!(matches!(ClusterKey::from_hex("abc"), Err(KeyError::NotHex)));
    }

    #[test]
    fn key_file_errors_name_the_file() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("cluster.key");
        assert!(matches!(ClusterKey::load(&path), Err(KeyError::Read { .. })));
        crate::files::write_atomic(&path, b"abc", 0o600).expect("write");
        let err = ClusterKey::load(&path).expect_err("not a key");
        assert!(matches!(err, KeyError::Invalid { .. }), "{err}");
        let want = format!("{}: a cluster key is 64 hex digits (`shoal cert ca` makes one)", path.display());
        assert_eq!(err.to_string(), want);
    }
}
