//! Which `[[routes]]` entry a request belongs to.
//!
//! The path is normalised before it is matched, and the normalised path is what the
//! upstream receives, so the gateway and the upstream can never disagree on which
//! resource a request names: percent-encoded unreserved characters are decoded (RFC 3986
//! §6.2.2.2), `//` collapses to `/`, and anything an upstream might read as a different
//! path (`.` and `..` segments, `;` path parameters, `\`, NUL, and their encoded forms)
//! is refused. `%2F` and `%5C` stay encoded and so never split a segment here; since
//! many upstream frameworks decode them into separators, a route refuses them unless it
//! sets `escaped_slashes = "keep"`, and a `.` or `..` between them is refused always.
//! `%25` stays encoded: a double encoding such as `%252e` reaches the upstream as sent,
//! as a literal `%2e` after one decoding, never as a dot.

use std::borrow::Cow;
use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::Method;
use serde::{Deserialize, Deserializer};
use toml::Spanned;

use crate::config::{RouteConfig, UpstreamUrl};
use crate::error::Error;
use crate::pool::Pool;

/// One segment of a path pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Segment {
    /// Matches exactly this text.
    Literal(Box<str>),
    /// `*`: any one non-empty segment.
    One,
    /// trailing `**`: zero or more segments.
    Rest,
}

/// A compiled path pattern, e.g. `/api/v1/objects/*/contents/**`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    text: String,
    pub(crate) segments: Vec<Segment>,
    /// Where the pattern stands in the configuration file.
    pub span: Range<usize>,
}

impl Pattern {
    /// Compiles a pattern; the error says what is wrong with it.
    pub fn parse(text: &str) -> Result<Pattern, String> {
        let Some(rest) = text.strip_prefix('/') else {
            return Err(format!("`{text}` must start with '/'"));
        };
        let parts: Vec<&str> = rest.split('/').collect();
        let last = parts.len() - 1;
        let mut segments = Vec::with_capacity(parts.len());
        for (i, part) in parts.iter().enumerate() {
            segments.push(match *part {
                "**" if i == last => Segment::Rest,
                "**" => return Err(format!("`{text}`: `**` may only be the last segment")),
                "*" => Segment::One,
                // A trailing slash is a segment of its own ("/a/" is not "/a"); an empty
                // segment inside could never match a normalised path.
                "" if i == last => Segment::Literal("".into()),
                "" => return Err(format!("`{text}` has an empty segment (`//`)")),
                p if p.contains('*') => {
                    return Err(format!(
                        "`{text}`: `*` and `**` must stand alone in a segment"
                    ))
                }
                p => {
                    let slashed = format!("/{p}");
                    let normalised = normalize_path(&slashed)
                        .map_err(|e| format!("`{text}`: {}", e.description()))?;
                    Segment::Literal(normalised[1..].into())
                }
            });
        }
        Ok(Pattern {
            text: text.to_owned(),
            segments,
            span: 0..0,
        })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether every path this pattern's `other` matches is matched by this one too.
    pub fn covers(&self, other: &Pattern) -> bool {
        let mut theirs = other.segments.iter();
        for mine in &self.segments {
            if *mine == Segment::Rest {
                // `**` takes zero or more segments: whatever is left of theirs.
                return true;
            }
            let Some(their) = theirs.next() else {
                return false;
            };
            let covered = match (mine, their) {
                (Segment::Rest, _) => return true,
                (Segment::One, Segment::One) => true,
                (Segment::One, Segment::Literal(l)) => !l.is_empty(),
                (Segment::Literal(a), Segment::Literal(b)) => a == b,
                _ => false,
            };
            if !covered {
                return false;
            }
        }
        // What is left of theirs: nothing, or the trailing slash this pattern takes too.
        match theirs.next() {
            None => true,
            Some(Segment::Literal(l)) if l.is_empty() => theirs.next().is_none(),
            Some(_) => false,
        }
    }

    /// Whether a normalised path (starting with '/', no query) matches. A pattern
    /// without a trailing slash also matches its path with one (see [`RouteTable`]).
    pub fn matches(&self, path: &str) -> bool {
        let mut parts = path[1..].split('/');
        for segment in &self.segments {
            match segment {
                Segment::Rest => return true,
                Segment::One => match parts.next() {
                    Some(p) if !p.is_empty() => {}
                    _ => return false,
                },
                Segment::Literal(lit) => match parts.next() {
                    Some(p) if p == &**lit => {}
                    _ => return false,
                },
            }
        }
        match parts.next() {
            None => true,
            Some("") => parts.next().is_none(),
            Some(_) => false,
        }
    }
}

impl<'de> Deserialize<'de> for Pattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let spanned = Spanned::<String>::deserialize(d)?;
        let mut pattern = Pattern::parse(spanned.get_ref()).map_err(serde::de::Error::custom)?;
        pattern.span = spanned.span();
        Ok(pattern)
    }
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

fn bad_path(why: &'static str) -> Error {
    Error::InvalidRequest(Cow::Borrowed(why))
}

/// Normalises a request path for matching and forwarding; borrowed when already normal.
pub fn normalize_path(raw: &str) -> Result<Cow<'_, str>, Error> {
    if !raw.starts_with('/') {
        return Err(bad_path("the request target must be an absolute path"));
    }
    let bytes = raw.as_bytes();
    let mut clean = true;
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'\\' => return Err(bad_path("the path may not contain '\\'")),
            // A URI never holds these; refusing them here keeps the function's contract
            // whoever calls it.
            0..=0x1f | 0x7f => return Err(bad_path("the path may not contain control characters")),
            b';' => return Err(bad_path("the path may not contain ';' parameters")),
            b'%' => clean = false,
            b'/' if bytes.get(i + 1) == Some(&b'/') => clean = false,
            b'.' if is_dot_segment(bytes, i) => {
                return Err(bad_path("the path may not contain '.' or '..' segments"))
            }
            _ => {}
        }
    }
    if clean {
        return Ok(Cow::Borrowed(raw));
    }

    // Bytes, not chars: only ASCII is ever replaced, so UTF-8 text passes unchanged.
    let mut out: Vec<u8> = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let (Some(h), Some(l)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            ) else {
                return Err(bad_path("the path holds a malformed percent-encoding"));
            };
            let decoded = h * 16 + l;
            match decoded {
                0 => return Err(bad_path("the path may not contain NUL")),
                b';' => return Err(bad_path("the path may not contain ';' parameters")),
                _ if is_unreserved(decoded) => out.push(decoded),
                _ => out.extend_from_slice(&[
                    b'%',
                    bytes[i + 1].to_ascii_uppercase(),
                    bytes[i + 2].to_ascii_uppercase(),
                ]),
            }
            i += 3;
        } else {
            if !(b == b'/' && out.last() == Some(&b'/')) {
                out.push(b);
            }
            i += 1;
        }
    }
    // Decoding may have produced dot segments ("%2e%2E"), and an upstream that decodes
    // `%2F` and `%5C` would see them between those too ("..%2F").
    if has_dot_segment(&out) {
        return Err(bad_path("the path may not contain '.' or '..' segments"));
    }
    String::from_utf8(out)
        .map(Cow::Owned)
        .map_err(|_| bad_path("the path is not UTF-8"))
}

/// Whether a normalised path holds `%2F` or `%5C` (normalisation writes hex upper-case).
pub fn has_escaped_slash(path: &str) -> bool {
    memchr::memmem::find(path.as_bytes(), b"%2F").is_some()
        || memchr::memmem::find(path.as_bytes(), b"%5C").is_some()
}

/// Whether a `.` or `..` segment appears when `/`, `%2F` and `%5C` all separate
/// segments, as they do for an upstream that decodes the encoded ones.
fn has_dot_segment(path: &[u8]) -> bool {
    let mut start = 0;
    let mut i = 0;
    let is_dots = |segment: &[u8]| segment == b"." || segment == b"..";
    while i < path.len() {
        let separator = match path[i] {
            b'/' => 1,
            b'%' if matches!(path.get(i + 1..i + 3), Some(b"2F" | b"5C")) => 3,
            _ => 0,
        };
        if separator > 0 {
            if is_dots(&path[start..i]) {
                return true;
            }
            i += separator;
            start = i;
        } else {
            i += 1;
        }
    }
    is_dots(&path[start..])
}

/// Whether the '.' at `i` starts a "." or ".." segment.
fn is_dot_segment(bytes: &[u8], i: usize) -> bool {
    if i == 0 || bytes[i - 1] != b'/' {
        return false;
    }
    let end = |j: usize| j >= bytes.len() || bytes[j] == b'/';
    end(i + 1) || (bytes.get(i + 1) == Some(&b'.') && end(i + 2))
}

/// A path as case-insensitive routes see it: ASCII letters lower-cased (what Express
/// and other case-insensitive routers compare).
fn fold(path: &str) -> Cow<'_, str> {
    if path.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(path.to_ascii_lowercase())
    } else {
        Cow::Borrowed(path)
    }
}

/// A pattern's segments with their literals lower-cased.
fn fold_segments(segments: &[Segment]) -> Vec<Segment> {
    segments
        .iter()
        .map(|segment| match segment {
            Segment::Literal(text) => Segment::Literal(text.to_ascii_lowercase().into()),
            other => other.clone(),
        })
        .collect()
}

/// One address of a route's upstream, with its passive health.
pub struct Target {
    /// The base URL.
    pub url: UpstreamUrl,
    /// Keep-alive connections to this address (shared with every route naming it with
    /// the same connect deadline).
    pub pool: Arc<Pool>,
    /// Until when (ms since the epoch) this address is skipped after a failed connect.
    down_until: AtomicU64,
}

impl Target {
    /// Skips this address for `cooldown`.
    pub fn mark_down(&self, cooldown: Duration) {
        let until = crate::token::store::now_millis() + cooldown.as_millis() as u64;
        self.down_until.store(until, Ordering::Relaxed);
    }

    fn is_up(&self, now: u64) -> bool {
        self.down_until.load(Ordering::Relaxed) <= now
    }
}

/// A route ready to serve.
pub struct Route {
    /// Position in the file, for logs.
    pub index: usize,
    /// The path pattern.
    pub pattern: Pattern,
    /// Where matching requests go: one address, or several taken in turn.
    pub targets: Vec<Target>,
    next_target: AtomicUsize,
    /// Served without a token.
    pub public: bool,
    /// Methods matched; `None` for all.
    pub methods: Option<Vec<Method>>,
    /// Lower-case host matched; `None` for any.
    pub host: Option<String>,
    /// Any-of roles required.
    pub roles: Vec<String>,
    /// All-of scopes required.
    pub scopes: Vec<String>,
    /// Pass `Authorization` to the upstream.
    pub forward_authorization: bool,
    /// Removed from the front of the path before forwarding.
    pub strip_prefix: Option<String>,
    /// Put in front of the (stripped) path before forwarding.
    pub add_prefix: Option<String>,
    /// Upstream connect deadline.
    pub connect_timeout: Duration,
    /// Upstream response-header deadline.
    pub response_timeout: Duration,
    /// How long an address that failed to connect is skipped.
    pub cooldown: Duration,
    /// Largest forwarded request body; `None` for no limit.
    pub max_request_body: Option<u64>,
    /// A pooled upstream connection carries only one principal's requests.
    pub partitioned: bool,
    /// Upstream connections are kept alive for further requests.
    pub keepalive: bool,
    /// Headers dropped by default that this route passes on.
    pub pass_headers: Vec<http::HeaderName>,
    /// The pattern is matched case-sensitively.
    pub case_sensitive: bool,
    /// `%2F` and `%5C` in the path are forwarded rather than refused.
    pub keep_escaped_slashes: bool,
}

impl Route {
    /// The next address in round-robin order over those not cooling down (and not
    /// `avoid`, the one that just failed), so the healthy ones share the load evenly;
    /// when none is healthy, the next in turn anyway rather than failing untried.
    pub fn pick(&self, avoid: Option<usize>) -> usize {
        let n = self.targets.len();
        if n == 1 {
            return 0;
        }
        let turn = self.next_target.fetch_add(1, Ordering::Relaxed);
        let now = crate::token::store::now_millis();
        let usable = |i: &usize| Some(*i) != avoid && self.targets[*i].is_up(now);
        let healthy = (0..n).filter(usable).count();
        if healthy > 0 {
            return (0..n).filter(usable).nth(turn % healthy).unwrap_or(0);
        }
        let others = (0..n).filter(|&i| Some(i) != avoid).count().max(1);
        (0..n)
            .filter(|&i| Some(i) != avoid)
            .nth(turn % others)
            .unwrap_or(0)
    }

    /// The path the upstream receives: `strip_prefix` removed, `add_prefix` added.
    pub fn rewrite<'a>(&self, path: &'a str) -> Cow<'a, str> {
        let stripped = match &self.strip_prefix {
            // In the case the route matched in: a route that ignores case strips its
            // prefix in any case.
            Some(prefix) => match path.get(..prefix.len()).and_then(|head| {
                let same = if self.case_sensitive {
                    head == prefix
                } else {
                    head.eq_ignore_ascii_case(prefix)
                };
                same.then(|| &path[prefix.len()..])
            }) {
                Some("") => "/",
                Some(rest) if rest.starts_with('/') => rest,
                _ => path,
            },
            None => path,
        };
        match &self.add_prefix {
            Some(prefix) => Cow::Owned(format!("{prefix}{stripped}")),
            None => Cow::Borrowed(stripped),
        }
    }

    fn accepts(&self, method: &Method, host: Option<&str>) -> bool {
        self.methods
            .as_ref()
            .is_none_or(|methods| methods.contains(method))
            && self
                .host
                .as_ref()
                .is_none_or(|h| host.is_some_and(|host| host.eq_ignore_ascii_case(h)))
    }
}

/// A node of the route trie: one path segment deep.
#[derive(Default)]
struct Node {
    literal: HashMap<Box<str>, Node>,
    one: Option<Box<Node>>,
    /// Routes whose pattern ends here with `**`, in file order.
    rest: Vec<usize>,
    /// Routes whose pattern ends exactly here, in file order.
    end: Vec<usize>,
}

impl Node {
    fn insert(&mut self, segments: &[Segment], index: usize) {
        match segments.split_first() {
            None => self.end.push(index),
            Some((Segment::Rest, _)) => self.rest.push(index),
            Some((Segment::One, tail)) => self
                .one
                .get_or_insert_with(Default::default)
                .insert(tail, index),
            Some((Segment::Literal(l), tail)) => self
                .literal
                .entry(l.clone())
                .or_default()
                .insert(tail, index),
        }
    }
}

/// The routes of a configuration, compiled into a trie of path segments.
///
/// A pattern names its path with or without one trailing slash (`/admin` matches
/// `/admin/`, `/admin/*` matches `/admin/x/`), as most upstream routers do (Express,
/// and Flask's path converters): otherwise `/admin/` could miss a protected `/admin`
/// route, fall to a public catch-all, and be served by the upstream as `/admin`. A
/// pattern written with a trailing slash (`/a/`) still names only that path.
///
/// A lookup walks the path once, following the literal child and the `*` child of each
/// node, and keeps the lowest route index that also accepts the method and host: the
/// first match in file order, without scanning every route or allocating. Routes
/// matched without regard to case have a trie of their own, of lower-case literals,
/// walked with the lower-cased path; the lowest index of both walks wins.
#[derive(Default)]
pub struct RouteTable {
    routes: Vec<Route>,
    root: Node,
    /// The case-insensitive routes, when there are any.
    folded: Option<Node>,
    /// Each upstream connection pool once, however many routes name its address.
    pools: Vec<Arc<Pool>>,
}

fn best_of(
    candidates: &[usize],
    routes: &[Route],
    method: &Method,
    host: Option<&str>,
    best: &mut Option<usize>,
) {
    for &i in candidates {
        if best.is_some_and(|b| i >= b) {
            // In file order: nothing further in this list can beat the best.
            return;
        }
        if routes[i].accepts(method, host) {
            *best = Some(i);
            return;
        }
    }
}

impl RouteTable {
    /// Compiles the configured routes with the `[upstream]` defaults filled in.
    pub fn new(
        routes: &[RouteConfig],
        defaults: &crate::config::UpstreamConfig,
        tls: &rustls::ClientConfig,
    ) -> RouteTable {
        let mut connectors = HashMap::new();
        let mut pools: HashMap<(http::Uri, Duration), Arc<Pool>> = HashMap::new();
        let mut root = Node::default();
        let mut folded: Option<Node> = None;
        let routes = routes
            .iter()
            .enumerate()
            .map(|(index, r)| {
                if r.case_sensitive {
                    root.insert(&r.path.segments, index);
                } else {
                    folded
                        .get_or_insert_with(Node::default)
                        .insert(&fold_segments(&r.path.segments), index);
                }
                let connect_timeout = r.connect_timeout.unwrap_or(defaults.connect_timeout);
                let mut pool_for = |url: &UpstreamUrl| {
                    let key = (url.origin.clone(), connect_timeout);
                    pools
                        .entry(key)
                        .or_insert_with(|| {
                            let connector = connectors
                                .entry(connect_timeout)
                                .or_insert_with(|| {
                                    crate::upstream::Connector::new(tls.clone(), connect_timeout)
                                })
                                .clone();
                            Pool::new(
                                connector,
                                url,
                                defaults.pool_idle_timeout,
                                defaults.pool_max_idle_per_host,
                            )
                        })
                        .clone()
                };
                Route {
                    index,
                    pattern: r.path.clone(),
                    targets: r
                        .upstream
                        .0
                        .iter()
                        .map(|url| Target {
                            url: url.clone(),
                            pool: pool_for(url),
                            down_until: AtomicU64::new(0),
                        })
                        .collect(),
                    next_target: AtomicUsize::new(0),
                    public: r.public,
                    methods: r
                        .methods
                        .as_ref()
                        .map(|m| m.iter().map(|m| m.0.clone()).collect()),
                    host: r.host.as_ref().map(|h| h.to_ascii_lowercase()),
                    roles: r.roles.clone(),
                    scopes: r.scopes.clone(),
                    forward_authorization: r.forward_authorization,
                    strip_prefix: r.strip_prefix.clone(),
                    add_prefix: r.add_prefix.clone(),
                    connect_timeout,
                    response_timeout: r.response_timeout.unwrap_or(defaults.response_timeout),
                    cooldown: defaults.cooldown,
                    max_request_body: r.max_request_body,
                    partitioned: r.pool_partition.unwrap_or(defaults.pool_partition)
                        == crate::config::PoolPartition::Principal,
                    keepalive: r.keepalive.unwrap_or(defaults.keepalive),
                    // Checked when the configuration was read.
                    pass_headers: r
                        .pass_headers
                        .iter()
                        .filter_map(|name| {
                            http::HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()).ok()
                        })
                        .collect(),
                    case_sensitive: r.case_sensitive,
                    keep_escaped_slashes: r.escaped_slashes == crate::config::EscapedSlashes::Keep,
                }
            })
            .collect();
        let pools = pools.into_values().collect();
        RouteTable {
            routes,
            root,
            folded,
            pools,
        }
    }

    /// Every upstream connection pool the routes use, each once.
    pub fn pools(&self) -> impl Iterator<Item = &Pool> {
        self.pools.iter().map(|pool| &**pool)
    }

    /// The first route matching a normalised path, method and host (without port).
    pub fn find(&self, method: &Method, host: Option<&str>, path: &str) -> Option<&Route> {
        let mut best = None;
        self.walk(&self.root, Some(&path[1..]), method, host, &mut best);
        if let Some(folded) = &self.folded {
            let lower = fold(path);
            self.walk(folded, Some(&lower[1..]), method, host, &mut best);
        }
        best.map(|i| &self.routes[i])
    }

    fn walk(
        &self,
        node: &Node,
        rest: Option<&str>,
        method: &Method,
        host: Option<&str>,
        best: &mut Option<usize>,
    ) {
        best_of(&node.rest, &self.routes, method, host, best);
        let Some(rest) = rest else {
            best_of(&node.end, &self.routes, method, host, best);
            return;
        };
        if rest.is_empty() {
            // A trailing slash: the path also names the one without it.
            best_of(&node.end, &self.routes, method, host, best);
        }
        let (segment, tail) = match rest.split_once('/') {
            Some((segment, tail)) => (segment, Some(tail)),
            None => (rest, None),
        };
        if let Some(child) = node.literal.get(segment) {
            self.walk(child, tail, method, host, best);
        }
        if let (Some(child), false) = (&node.one, segment.is_empty()) {
            self.walk(child, tail, method, host, best);
        }
    }

    /// All routes, in order.
    pub fn iter(&self) -> impl Iterator<Item = &Route> {
        self.routes.iter()
    }
}

/// Routes that can never match because an earlier route takes every request they
/// would: `(shadowed, by)` indices.
pub fn shadowed(routes: &[RouteConfig]) -> Vec<(usize, usize)> {
    let covers_methods =
        |earlier: &RouteConfig, later: &RouteConfig| match (&earlier.methods, &later.methods) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(e), Some(l)) => l.iter().all(|m| e.contains(m)),
        };
    let covers_host =
        |earlier: &RouteConfig, later: &RouteConfig| match (&earlier.host, &later.host) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(e), Some(l)) => e.eq_ignore_ascii_case(l),
        };
    let mut found = Vec::new();
    for (j, later) in routes.iter().enumerate() {
        if let Some(i) = routes[..j].iter().position(|earlier| {
            earlier.path.covers(&later.path)
                && covers_methods(earlier, later)
                && covers_host(earlier, later)
        }) {
            found.push((j, i));
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Pattern {
        Pattern::parse(text).unwrap()
    }

    #[test]
    fn literal_one_and_rest() {
        let contents = p("/api/v1/objects/*/contents/**");
        assert!(contents.matches("/api/v1/objects/42/contents"));
        assert!(contents.matches("/api/v1/objects/42/contents/"));
        assert!(contents.matches("/api/v1/objects/42/contents/a/b/c"));
        assert!(!contents.matches("/api/v1/objects//contents"));
        assert!(!contents.matches("/api/v1/objects/42/43/contents"));
        assert!(!contents.matches("/api/v1/objects/42/view"));

        let view = p("/api/v1/objects/*/view");
        assert!(view.matches("/api/v1/objects/7/view"));
        // One trailing slash names the same resource for most upstream routers.
        assert!(view.matches("/api/v1/objects/7/view/"));
        assert!(!view.matches("/api/v1/objects/7/view/x"));
        assert!(!view.matches("/api/v1/objects/7/"));

        let all = p("/**");
        assert!(all.matches("/"));
        assert!(all.matches("/anything/at/all"));
        assert!(p("/").matches("/"));
        assert!(!p("/").matches("/a"));
        assert!(p("/a/").matches("/a/"));
        assert!(!p("/a/").matches("/a"));
    }

    #[test]
    fn encoded_slash_stays_inside_its_segment() {
        let one = p("/files/*");
        let path = normalize_path("/files/a%2fb").unwrap();
        assert_eq!(path, "/files/a%2Fb");
        assert!(one.matches(&path));
    }

    #[test]
    fn bad_patterns_are_refused() {
        for bad in [
            "api", "/a/**/b", "/a//b", "/a/b*", "/a/**x", "/a/%zz", "/a/../b",
        ] {
            assert!(Pattern::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn normalisation() {
        assert!(matches!(normalize_path("/a/b").unwrap(), Cow::Borrowed(_)));
        assert_eq!(normalize_path("/a//b///c").unwrap(), "/a/b/c");
        assert_eq!(
            normalize_path("/client%61pps/%7Euser").unwrap(),
            "/clientapps/~user"
        );
        assert_eq!(normalize_path("/a%20b").unwrap(), "/a%20b");
        assert_eq!(normalize_path("/a/.../b").unwrap(), "/a/.../b");
        assert_eq!(normalize_path("/a/..b").unwrap(), "/a/..b");
        // Encoded slashes stay encoded (upper-case) for the route to accept or refuse.
        assert_eq!(normalize_path("/a%5cb%2fc").unwrap(), "/a%5Cb%2Fc");
        assert!(has_escaped_slash("/a%5Cb") && has_escaped_slash("/a%2Fb"));
        assert!(!has_escaped_slash("/a%25b") && !has_escaped_slash("/a/b"));
        // A double encoding is not decoded twice: `%252e` stays what it is.
        assert_eq!(
            normalize_path("/a/%252e%252e/b").unwrap(),
            "/a/%252e%252e/b"
        );
        let long = format!("/{}", "a/".repeat(10_000));
        assert_eq!(normalize_path(&long).unwrap(), long);
        for bad in [
            "/a/../b",
            "/a/..",
            "/./a",
            "/a/%2e%2E/b",
            "/a/.%2e",
            "/a;x=1/b",
            "/a/b%3bc",
            "/a\\b",
            // A `.` or `..` between encoded slashes, which an upstream may decode.
            "/public/..%2fadmin",
            "/public/..%5Cadmin",
            "/a/%2E%2E%2Fb",
            "/a%2F..",
            "/a%2F.%2Fb",
            "/a%00",
            "/a%2",
            "/a%zz",
            "*",
            "",
        ] {
            assert!(normalize_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn first_match_wins_and_methods_and_host_filter() {
        let toml = r#"
            [[routes]]
            path = "/api/v1/config"
            methods = ["get"]
            upstream = "http://127.0.0.1:1"
            public = true
            [[routes]]
            path = "/api/v1/**"
            host = "API.example.com"
            upstream = "http://127.0.0.1:2"
            [[routes]]
            path = "/api/v1/**"
            upstream = "http://127.0.0.1:3/base/"
        "#;
        let config = crate::config::Config::parse(toml, std::path::Path::new("t.toml")).unwrap();
        let tls = crate::proxy::upstream_tls(None, false).unwrap();
        let table = RouteTable::new(&config.routes, &config.upstream, &tls);
        let find = |m: &Method, host, path| table.find(m, host, path).map(|r| r.index);
        assert_eq!(find(&Method::GET, None, "/api/v1/config"), Some(0));
        assert_eq!(find(&Method::POST, None, "/api/v1/config"), Some(2));
        assert_eq!(
            find(&Method::POST, Some("api.example.com"), "/api/v1/config"),
            Some(1)
        );
        assert_eq!(find(&Method::GET, Some("other"), "/api/v1/x"), Some(2));
        assert_eq!(find(&Method::GET, None, "/api/v2"), None);
        assert_eq!(table.iter().nth(2).unwrap().targets[0].url.prefix, "/base");
    }

    fn table(toml: &str) -> (crate::config::Config, RouteTable) {
        let config = crate::config::Config::parse(toml, std::path::Path::new("t.toml")).unwrap();
        let tls = crate::proxy::upstream_tls(None, false).unwrap();
        let table = RouteTable::new(&config.routes, &config.upstream, &tls);
        (config, table)
    }

    /// The trie must answer exactly what a first-match linear scan answers.
    #[test]
    fn trie_agrees_with_a_linear_scan() {
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let words = ["a", "b", "api", "v1", ""];
        let methods = [Method::GET, Method::POST, Method::DELETE];
        let mut toml = String::new();
        for _ in 0..300 {
            let depth = 1 + next(4);
            let mut path = String::new();
            for d in 0..depth {
                let last = d == depth - 1;
                let segment = match next(8) {
                    0 => "*",
                    1 if last && d >= 2 => "**",
                    n => words[(n as usize) % 4],
                };
                path.push('/');
                path.push_str(segment);
            }
            if next(10) == 0 && !path.ends_with("**") {
                path.push('/');
            }
            let methods = match next(3) {
                0 => format!("methods = [\"{}\"]\n", methods[next(3) as usize]),
                _ => String::new(),
            };
            let host = if next(6) == 0 {
                "host = \"h.example\"\n"
            } else {
                ""
            };
            toml.push_str(&format!(
                "[[routes]]\npath = \"{path}\"\nupstream = \"http://127.0.0.1:1\"\n{methods}{host}"
            ));
        }
        let (_, table) = table(&toml);
        let mut matched = 0;
        for _ in 0..5000 {
            let depth = next(5);
            let mut path = String::new();
            for _ in 0..depth {
                path.push('/');
                path.push_str(words[next(5) as usize]);
            }
            if path.is_empty() || next(5) == 0 {
                path.push('/');
            }
            let method = &methods[next(3) as usize];
            let host = [None, Some("h.example"), Some("other")][next(3) as usize];
            let linear = table
                .routes
                .iter()
                .find(|r| r.accepts(method, host) && r.pattern.matches(&path))
                .map(|r| r.index);
            assert_eq!(
                table.find(method, host, &path).map(|r| r.index),
                linear,
                "{method} {host:?} {path}"
            );
            matched += usize::from(linear.is_some());
        }
        // The comparison means something only if both hits and misses are common.
        assert!((500..4500).contains(&matched), "{matched} of 5000 matched");
    }

    #[test]
    fn covers_and_shadowing() {
        let covers = |a: &str, b: &str| p(a).covers(&p(b));
        assert!(covers("/api/**", "/api/v1/*"));
        assert!(covers("/api/**", "/api"));
        assert!(covers("/api/*", "/api/x"));
        assert!(!covers("/api/*", "/api/**"));
        assert!(!covers("/api/*", "/api/"));
        assert!(!covers("/api/x", "/api/*"));
        assert!(covers("/api/x", "/api/x/"));
        assert!(!covers("/api/x/", "/api/x"));
        assert!(!covers("/api/v1/*", "/api/**"));
        let (config, _) = table(
            r#"
            [[routes]]
            path = "/api/**"
            methods = ["GET"]
            upstream = "http://127.0.0.1:1"
            [[routes]]
            path = "/api/v1/x"
            upstream = "http://127.0.0.1:1"
            [[routes]]
            path = "/api/v1/y"
            methods = ["GET"]
            upstream = "http://127.0.0.1:1"
            [[routes]]
            path = "/api/v1/z"
            methods = ["GET"]
            host = "a.example"
            upstream = "http://127.0.0.1:1"
        "#,
        );
        assert_eq!(shadowed(&config.routes), vec![(2, 0), (3, 0)]);
    }

    #[test]
    fn prefixes_are_rewritten_on_segment_boundaries() {
        let (_, table) = table(
            r#"
            [[routes]]
            path = "/api/v1/**"
            strip_prefix = "/api/v1"
            add_prefix = "/v2"
            upstream = "http://127.0.0.1:1"
            [[routes]]
            path = "/old/**"
            strip_prefix = "/old"
            upstream = "http://127.0.0.1:1"
        "#,
        );
        let route = |i: usize| table.iter().nth(i).unwrap();
        assert_eq!(route(0).rewrite("/api/v1/objects/1"), "/v2/objects/1");
        assert_eq!(route(0).rewrite("/api/v1"), "/v2/");
        assert_eq!(route(1).rewrite("/old/x"), "/x");
        assert_eq!(route(1).rewrite("/old"), "/");
        assert_eq!(route(1).rewrite("/older/x"), "/older/x");
        for bad in [
            "strip_prefix = \"api\"",
            "add_prefix = \"/v2/\"",
            "strip_prefix = \"/a/../b\"",
        ] {
            let text =
                format!("[[routes]]\npath = \"/**\"\nupstream = \"http://127.0.0.1:1\"\n{bad}\n");
            let error =
                crate::config::Config::parse(&text, std::path::Path::new("t.toml")).unwrap_err();
            assert!(error.key.unwrap().starts_with("routes[0]."), "{bad}");
        }
    }

    #[test]
    fn round_robin_skips_addresses_cooling_down() {
        let (_, table) = table(
            "[[routes]]\npath = \"/**\"\nupstream = [\"http://127.0.0.1:1\", \"http://127.0.0.1:2\", \"http://127.0.0.1:3\"]\n",
        );
        let route = table.iter().next().unwrap();
        let picks: Vec<usize> = (0..6).map(|_| route.pick(None)).collect();
        assert_eq!(picks, vec![0, 1, 2, 0, 1, 2]);
        route.targets[1].mark_down(Duration::from_secs(60));
        let picks: Vec<usize> = (0..6).map(|_| route.pick(None)).collect();
        assert!(!picks.contains(&1), "{picks:?}");
        // The healthy two share the load evenly, not 2:1 to the down one's neighbour.
        assert_eq!(picks.iter().filter(|&&p| p == 0).count(), 3, "{picks:?}");
        assert_ne!(route.pick(Some(0)), 0);
        for target in &route.targets {
            target.mark_down(Duration::from_secs(60));
        }
        // All down: still try one rather than fail without trying.
        assert!(route.pick(None) < 3);
    }
}
