//! Scoped admin tokens and the token file they come from.
//!
//! One token a line, optionally followed by its scope; `#` starts a comment:
//!
//! ```text
//! 3f9c…e1                    # a bare token: admin (the single-token files of old)
//! 7a21…0b admin              # everything
//! 5c4d…99 read               # GET endpoints only
//! 0e8f…42 join web,api       # join/leave of backends in pools web and api only
//! ```
//!
//! The file is re-read when its modification time, size or inode changes, checked (one
//! `stat`) on every authenticated request: rotation is "write the new file" (atomically, by
//! rename, or in place), with no restart and no polling task. A file that no longer parses,
//! or is no longer private, is refused with a WARN and the tokens in service stay.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use subtle::ConstantTimeEq;

/// Shortest token accepted: guessing must stay out of reach.
pub const MIN_TOKEN_LEN: usize = 16;

/// Why a token file was refused.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("line {line}: {problem}")]
    Line { line: usize, problem: LineError },
    #[error("no token in the file")]
    Empty,
    /// The file could not be read or created (or is not private).
    #[error("{0}")]
    Io(std::io::Error),
}

/// What is wrong with one line of a token file.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    #[error("a token must be at least {MIN_TOKEN_LEN} characters")]
    TooShort,
    #[error("the same token appears twice")]
    Duplicate,
    #[error("a join token names its pools: `<token> join pool1,pool2`")]
    JoinWithoutPools,
    #[error("unknown scope {0:?} (admin, read or join POOLS)")]
    UnknownScope(String),
    #[error("too many words: `<token> [admin | read | join POOL,POOL]`")]
    TooManyWords,
    #[error("empty pool name in {0:?}")]
    EmptyPool(String),
}

/// What a token may do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Everything.
    Admin,
    /// Read-only: GET endpoints (status, pools, health, metrics).
    Read,
    /// Join/leave backends of the named pools, nothing else (seed 002's startProxy/stopProxy).
    Join(Vec<String>),
}

impl Scope {
    /// A short name for logs and refusals.
    pub fn name(&self) -> &'static str {
        match self {
            Scope::Admin => "admin",
            Scope::Read => "read",
            Scope::Join(_) => "join",
        }
    }
}

/// The parsed tokens: (token, scope) in file order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TokenSet {
    entries: Vec<(String, Scope)>,
}

impl TokenSet {
    /// A set holding one admin token.
    pub fn admin(token: &str) -> TokenSet {
        TokenSet { entries: vec![(token.to_string(), Scope::Admin)] }
    }

    /// Parses a token file; errors name the line.
    pub fn parse(text: &str) -> Result<TokenSet, TokenError> {
        let mut entries: Vec<(String, Scope)> = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let at = |problem| TokenError::Line { line: n + 1, problem };
            let entry = parse_line(line).map_err(at)?;
            if entries.iter().any(|(t, _)| *t == entry.0) {
                return Err(at(LineError::Duplicate));
            }
            entries.push(entry);
        }
        if entries.is_empty() {
            return Err(TokenError::Empty);
        }
        Ok(TokenSet { entries })
    }

    /// The scope of `presented`. Every token is compared in constant time, so the answer's
    /// timing does not tell which one (if any) was close.
    pub fn scope_of(&self, presented: &str) -> Option<Scope> {
        let mut found = None;
        for (token, scope) in &self.entries {
            if bool::from(presented.as_bytes().ct_eq(token.as_bytes())) {
                found = Some(scope.clone());
            }
        }
        found
    }

    /// The first admin token (what a node started with, for tools on the same host).
    pub fn first_admin(&self) -> Option<&str> {
        self.entries.iter().find(|(_, s)| *s == Scope::Admin).map(|(t, _)| t.as_str())
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

fn parse_line(line: &str) -> Result<(String, Scope), LineError> {
    let mut words = line.split_whitespace();
    let token = words.next().unwrap_or_default().to_string();
    if token.len() < MIN_TOKEN_LEN {
        return Err(LineError::TooShort);
    }
    let scope = match (words.next(), words.next()) {
        (None | Some("admin"), None) => Scope::Admin,
        (Some("read"), None) => Scope::Read,
        (Some("join"), Some(pools)) => Scope::Join(join_pools(pools)?),
        (Some("join"), None) => return Err(LineError::JoinWithoutPools),
        (Some(other), None) => return Err(LineError::UnknownScope(other.to_string())),
        _ => return Err(LineError::TooManyWords),
    };
    if words.next().is_some() {
        return Err(LineError::TooManyWords);
    }
    Ok((token, scope))
}

fn join_pools(list: &str) -> Result<Vec<String>, LineError> {
    let pools: Vec<String> = list.split(',').map(str::trim).map(String::from).collect();
    if pools.iter().any(|p| p.is_empty()) {
        return Err(LineError::EmptyPool(list.to_string()));
    }
    Ok(pools)
}

/// What identifies a version of the file on disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

fn stamp(path: &Path) -> Option<Stamp> {
    let meta = std::fs::metadata(path).ok()?;
    #[cfg(unix)]
    let inode = std::os::unix::fs::MetadataExt::ino(&meta);
    #[cfg(not(unix))]
    let inode = 0;
    Some(Stamp { modified: meta.modified().ok(), len: meta.len(), inode })
}

/// The tokens in service: fixed, or from a file re-read when it changes.
pub struct Tokens {
    file: Option<PathBuf>,
    set: ArcSwap<TokenSet>,
    seen: Mutex<Option<Stamp>>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens").field("file", &self.file).field("count", &self.set.load().len()).finish()
    }
}

impl Tokens {
    /// One admin token that never changes (tests, `shoal dev`).
    pub fn fixed(token: &str) -> Tokens {
        Tokens { file: None, set: ArcSwap::from_pointee(TokenSet::admin(token)), seen: Mutex::new(None) }
    }

    /// The tokens of `path`; the file must exist, be private and parse.
    pub fn from_file(path: &Path) -> Result<Tokens, TokenError> {
        let seen = stamp(path);
        let set = read_file(path)?;
        Ok(Tokens { file: Some(path.to_path_buf()), set: ArcSwap::from_pointee(set), seen: Mutex::new(seen) })
    }

    /// The scope of a presented token, after picking up a changed file.
    pub fn scope_of(&self, presented: &str) -> Option<Scope> {
        self.refresh();
        self.set.load().scope_of(presented)
    }

    /// The tokens now in service.
    pub fn current(&self) -> Arc<TokenSet> {
        self.refresh();
        self.set.load_full()
    }

    /// Re-reads the file when its stamp changed; a bad file keeps the tokens in service.
    fn refresh(&self) {
        let Some(path) = &self.file else { return };
        let now = stamp(path);
        {
            let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
            if *seen == now {
                return;
            }
            // Whatever the outcome, this version was looked at: a broken file is reported once.
            *seen = now;
        }
        match read_file(path) {
            Ok(set) => {
                tracing::info!(file = %path.display(), tokens = set.len(), "admin token file reloaded");
                self.set.store(Arc::new(set));
            }
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "admin token file refused; the tokens in service stay")
            }
        }
    }
}

fn read_file(path: &Path) -> Result<TokenSet, TokenError> {
    let text = crate::files::read_secret(path).map_err(TokenError::Io)?;
    TokenSet::parse(&text)
}

/// Reads the token file at `path`, or creates it holding one fresh admin token (mode 0600).
pub fn load_or_create(path: &Path) -> Result<Tokens, TokenError> {
    match crate::files::read_secret(path) {
        Ok(_) => Tokens::from_file(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let token: String = crate::control::secure::hex(&rand::random::<[u8; 32]>());
            super::auth::write_secret(path, &token).map_err(TokenError::Io)?;
            Tokens::from_file(path)
        }
        Err(e) => Err(TokenError::Io(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "aaaaaaaaaaaaaaaa1";
    const R: &str = "rrrrrrrrrrrrrrrr1";
    const J: &str = "jjjjjjjjjjjjjjjj1";

    #[test]
    fn a_bare_token_is_admin_and_scopes_parse() {
        let set = TokenSet::parse(&format!("# tokens\n{A}\n\n{R} read  # ro\n{J} join web, api\n")).expect_err("space");
        assert!(matches!(&set, TokenError::Line { line: 5, problem: LineError::EmptyPool(p) } if p == "web,"), "{set}");
        let set = TokenSet::parse(&format!("# tokens\n{A}\n\n{R} read  # ro\n{J} join web,api\n")).expect("parses");
        assert_eq!(set.scope_of(A), Some(Scope::Admin));
        assert_eq!(set.scope_of(R), Some(Scope::Read));
        assert_eq!(set.scope_of(J), Some(Scope::Join(vec!["web".into(), "api".into()])));
        assert_eq!(set.scope_of("nope-nope-nope-nope"), None);
        assert_eq!(set.scope_of(""), None);
        assert_eq!(set.first_admin(), Some(A));
        assert_eq!(TokenSet::parse(&format!("{A} admin")).expect("explicit").scope_of(A), Some(Scope::Admin));
    }

    #[test]
    fn bad_lines_are_named() {
        let line = |line, problem| Some((line, problem));
        for (text, want, why) in [
            ("short".to_string(), line(1, LineError::TooShort), "line 1: a token must be at least 16"),
            (
                format!("{A}\n{R} write"),
                line(2, LineError::UnknownScope("write".into())),
                "line 2: unknown scope \"write\"",
            ),
            (format!("{J} join"), line(1, LineError::JoinWithoutPools), "names its pools"),
            (format!("{J} join a,,b"), line(1, LineError::EmptyPool("a,,b".into())), "empty pool name"),
            (format!("{A} read extra"), line(1, LineError::TooManyWords), "too many words"),
            (format!("{A}\n{A} read"), line(2, LineError::Duplicate), "line 2: the same token appears twice"),
            ("# nothing\n\n".to_string(), None, "no token"),
        ] {
            let err = TokenSet::parse(&text).expect_err(&text);
            match (&err, want) {
                (TokenError::Line { line, problem }, Some(want)) => assert_eq!((*line, problem.clone()), want),
                (TokenError::Empty, None) => {}
                _ => panic!("{text:?}: unexpected {err:?}"),
            }
            assert!(err.to_string().contains(why), "{text:?}: {err}");
        }
    }

    #[cfg(unix)]
    #[test]
    fn a_changed_file_is_picked_up_and_a_broken_one_keeps_the_old_tokens() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("admin.token");
        crate::files::write_atomic(&path, A.as_bytes(), 0o600).expect("write");
        let tokens = Tokens::from_file(&path).expect("load");
        assert_eq!(tokens.scope_of(A), Some(Scope::Admin));
        crate::files::write_atomic(&path, format!("{R} read\n").as_bytes(), 0o600).expect("rotate");
        assert_eq!(tokens.scope_of(A), None, "the old token stops working");
        assert_eq!(tokens.scope_of(R), Some(Scope::Read));
        crate::files::write_atomic(&path, b"garbage", 0o600).expect("break");
        assert_eq!(tokens.scope_of(R), Some(Scope::Read), "a broken file keeps the tokens in service");
        crate::files::write_atomic(&path, J.as_bytes(), 0o644).expect("readable");
        assert_eq!(tokens.scope_of(R), Some(Scope::Read), "a readable file is refused");
        assert_eq!(Tokens::fixed(A).scope_of(A), Some(Scope::Admin));
    }
}
