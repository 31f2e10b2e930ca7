//! URL pattern matching with Go `net/http` ServeMux semantics (the classic, pre-1.22 rules
//! seed 003 relied on): a pattern is `[host]/path`; an exact path wins, otherwise the longest
//! pattern ending in `/` that prefixes the path; host-specific patterns take precedence.
//! Like ServeMux, a request for `/tree` redirects to `/tree/` when only the subtree exists,
//! and unclean paths (`//`, `/./`, `/../`) redirect to their cleaned form.

use std::collections::HashMap;

/// What the mux decided for a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// Index of the pool in the routing table.
    Pool(usize),
    /// Answer `301 Moved Permanently` with this path (the query is appended by the caller).
    Redirect(String),
    NotFound,
}

/// A compiled set of patterns.
#[derive(Clone, Debug, Default)]
pub struct Mux {
    /// Every pattern; those ending in `/` are subtrees.
    exact: HashMap<String, usize>,
    /// Subtree patterns without their trailing `/` (what redirects to them).
    roots: std::collections::HashSet<String>,
    has_hosts: bool,
}

impl Mux {
    /// Builds a mux from `(pattern, pool index)` pairs. Patterns were validated by `apply`.
    pub fn new<'a>(patterns: impl IntoIterator<Item = (&'a str, usize)>) -> Mux {
        let mut mux = Mux::default();
        for (pattern, idx) in patterns {
            mux.has_hosts |= !pattern.starts_with('/');
            if let Some(root) = pattern.strip_suffix('/') {
                mux.roots.insert(root.to_string());
            }
            mux.exact.insert(pattern.to_string(), idx);
        }
        mux
    }

    /// Whether any pattern names a host (callers skip computing the host otherwise).
    pub fn has_hosts(&self) -> bool {
        self.has_hosts
    }

    /// Routes a request path (without query) for `host` (without port).
    pub fn route(&self, host: &str, path: &str) -> Route {
        if path.is_empty() || !path.starts_with('/') {
            return Route::NotFound;
        }
        if needs_cleaning(path) {
            return Route::Redirect(clean_path(path));
        }
        let exact = self.exact.get(path).copied();
        if exact.is_none() && self.should_redirect_to_subtree(host, path) {
            return Route::Redirect(format!("{path}/"));
        }
        match self.lookup(host, path, exact) {
            Some(idx) => Route::Pool(idx),
            None => Route::NotFound,
        }
    }

    /// `exact`: the pattern equal to `path`, already looked up by the caller.
    fn lookup(&self, host: &str, path: &str, exact: Option<usize>) -> Option<usize> {
        if self.has_hosts && !host.is_empty() {
            let mut key = String::with_capacity(host.len() + path.len());
            key.push_str(host);
            key.push_str(path);
            if let Some(idx) = self.exact.get(&key).copied().or_else(|| self.longest_subtree(&key)) {
                return Some(idx);
            }
        }
        exact.or_else(|| self.longest_subtree(path))
    }

    fn longest_subtree(&self, key: &str) -> Option<usize> {
        // The longest subtree pattern prefixing `key`: subtree patterns end in `/`, so only the
        // prefixes ending at a `/` can be one; try them longest first. The cost follows the
        // path's depth, not the number of pools.
        key.rmatch_indices('/').find_map(|(i, _)| self.exact.get(&key[..=i]).copied())
    }

    /// ServeMux: `/tree` redirects to `/tree/` when `/tree/` is registered and `/tree` is not
    /// (even if a shorter subtree such as `/` would match).
    /// (Callers have checked that `path` itself is not a pattern.)
    fn should_redirect_to_subtree(&self, host: &str, path: &str) -> bool {
        if path.ends_with('/') {
            return false;
        }
        self.roots.contains(path)
            || (self.has_hosts && !host.is_empty() && self.roots.contains(&format!("{host}{path}")))
    }
}

fn needs_cleaning(path: &str) -> bool {
    path.contains("//")
        || path.contains("/./")
        || path.contains("/../")
        || path.ends_with("/.")
        || path.ends_with("/..")
}

/// Lexical path cleaning as Go's `path.Clean`, keeping a trailing slash like ServeMux does.
pub fn clean_path(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for seg in path.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            s => parts.push(s),
        }
    }
    let mut out = String::with_capacity(path.len());
    for p in &parts {
        out.push('/');
        out.push_str(p);
    }
    let trailing = path.ends_with('/') || path.ends_with("/.") || path.ends_with("/..");
    if out.is_empty() || trailing {
        out.push('/');
    }
    out
}

/// Go's `singleJoiningSlash`: joins a backend's `url_path` and the request path.
pub fn join_path(prefix: &str, path: &str) -> String {
    if prefix == "/" || prefix.is_empty() {
        return path.to_string();
    }
    match (prefix.ends_with('/'), path.starts_with('/')) {
        (true, true) => format!("{prefix}{}", &path[1..]),
        (false, false) => format!("{prefix}/{path}"),
        _ => format!("{prefix}{path}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mux() -> Mux {
        Mux::new([("/", 0), ("/api/", 1), ("/api/v2/", 2), ("/exact", 3), ("img.example.com/", 4), ("/tree/", 5)])
    }

    #[test]
    fn longest_subtree_wins() {
        let m = mux();
        assert_eq!(m.route("", "/"), Route::Pool(0));
        assert_eq!(m.route("", "/anything"), Route::Pool(0));
        assert_eq!(m.route("", "/api/users"), Route::Pool(1));
        assert_eq!(m.route("", "/api/v2/users"), Route::Pool(2));
        assert_eq!(m.route("", "/api/v2/"), Route::Pool(2));
    }

    #[test]
    fn exact_patterns_match_only_themselves() {
        let m = mux();
        assert_eq!(m.route("", "/exact"), Route::Pool(3));
        assert_eq!(m.route("", "/exact/more"), Route::Pool(0));
        let only = Mux::new([("/exact", 0)]);
        assert_eq!(only.route("", "/exactly"), Route::NotFound);
    }

    #[test]
    fn host_patterns_take_precedence() {
        let m = mux();
        assert_eq!(m.route("img.example.com", "/api/x"), Route::Pool(4));
        assert_eq!(m.route("other.example.com", "/api/x"), Route::Pool(1));
    }

    #[test]
    fn redirects_like_servemux() {
        let m = Mux::new([("/tree/", 0)]);
        assert_eq!(m.route("", "/tree"), Route::Redirect("/tree/".into()));
        assert_eq!(mux().route("", "/api"), Route::Redirect("/api/".into()), "even when / would match");
        assert_eq!(m.route("", "/tree//x"), Route::Redirect("/tree/x".into()));
        assert_eq!(m.route("", "/tree/a/../b"), Route::Redirect("/tree/b".into()));
        assert_eq!(m.route("", "/other"), Route::NotFound);
        assert_eq!(m.route("", "*"), Route::NotFound);
    }

    #[test]
    fn clean_and_join() {
        assert_eq!(clean_path("/a//b/./c/../d/"), "/a/b/d/");
        assert_eq!(clean_path("/../.."), "/");
        assert_eq!(join_path("/", "/x"), "/x");
        assert_eq!(join_path("/app", "/x"), "/app/x");
        assert_eq!(join_path("/app/", "/x"), "/app/x");
    }
}
