//! Which `[[routes]]` entry a request belongs to.
//!
//! The path is normalised before it is matched, and the normalised path is what the
//! upstream receives, so the gateway and the upstream can never disagree on which
//! resource a request names: percent-encoded unreserved characters are decoded (RFC 3986
//! §6.2.2.2), `//` collapses to `/`, and anything an upstream might read as a different
//! path (`.` and `..` segments, `;` path parameters, `\`, their encoded forms, NUL) is
//! refused. `%2F` stays encoded and so never splits a segment.

use std::borrow::Cow;
use std::collections::HashMap;
use std::ops::Range;
use std::time::Duration;

use http::Method;
use serde::{Deserialize, Deserializer};
use toml::Spanned;

use crate::config::{RouteConfig, UpstreamUrl};
use crate::error::Error;
use crate::proxy::UpstreamClient;

/// One segment of a path pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
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
    segments: Vec<Segment>,
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

    /// Whether a normalised path (starting with '/', no query) matches.
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
        parts.next().is_none()
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

    let mut out = String::with_capacity(raw.len());
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
                b'\\' => return Err(bad_path("the path may not contain '\\'")),
                b';' => return Err(bad_path("the path may not contain ';' parameters")),
                _ if is_unreserved(decoded) => out.push(decoded as char),
                _ => {
                    out.push('%');
                    out.push(char::from(bytes[i + 1]).to_ascii_uppercase());
                    out.push(char::from(bytes[i + 2]).to_ascii_uppercase());
                }
            }
            i += 3;
        } else {
            if !(b == b'/' && out.ends_with('/')) {
                out.push(b as char);
            }
            i += 1;
        }
    }
    // Decoding may have produced dot segments ("%2e%2E").
    if out
        .as_bytes()
        .iter()
        .enumerate()
        .any(|(i, &b)| b == b'.' && is_dot_segment(out.as_bytes(), i))
    {
        return Err(bad_path("the path may not contain '.' or '..' segments"));
    }
    Ok(Cow::Owned(out))
}

/// Whether the '.' at `i` starts a "." or ".." segment.
fn is_dot_segment(bytes: &[u8], i: usize) -> bool {
    if i == 0 || bytes[i - 1] != b'/' {
        return false;
    }
    let end = |j: usize| j >= bytes.len() || bytes[j] == b'/';
    end(i + 1) || (bytes.get(i + 1) == Some(&b'.') && end(i + 2))
}

/// A route ready to serve.
pub struct Route {
    /// Position in the file, for logs.
    pub index: usize,
    /// The path pattern.
    pub pattern: Pattern,
    /// Where matching requests go.
    pub upstream: UpstreamUrl,
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
    /// Upstream connect deadline.
    pub connect_timeout: Duration,
    /// Upstream response-header deadline.
    pub response_timeout: Duration,
    /// Largest forwarded request body; `None` for no limit.
    pub max_request_body: Option<u64>,
    /// Pooled client for the upstream (shared by routes with the same connect deadline).
    pub client: UpstreamClient,
}

/// The routes of a configuration, in order.
#[derive(Default)]
pub struct RouteTable {
    routes: Vec<Route>,
}

impl RouteTable {
    /// Compiles the configured routes with the `[upstream]` defaults filled in.
    pub fn new(
        routes: &[RouteConfig],
        defaults: &crate::config::UpstreamConfig,
        tls: &rustls::ClientConfig,
    ) -> RouteTable {
        let mut clients: HashMap<Duration, UpstreamClient> = HashMap::new();
        let routes = routes
            .iter()
            .enumerate()
            .map(|(index, r)| {
                let connect_timeout = r.connect_timeout.unwrap_or(defaults.connect_timeout);
                let client = clients
                    .entry(connect_timeout)
                    .or_insert_with(|| crate::proxy::client(defaults, tls.clone(), connect_timeout))
                    .clone();
                Route {
                    index,
                    pattern: r.path.clone(),
                    upstream: r.upstream.clone(),
                    public: r.public,
                    methods: r
                        .methods
                        .as_ref()
                        .map(|m| m.iter().map(|m| m.0.clone()).collect()),
                    host: r.host.as_ref().map(|h| h.to_ascii_lowercase()),
                    roles: r.roles.clone(),
                    scopes: r.scopes.clone(),
                    forward_authorization: r.forward_authorization,
                    connect_timeout,
                    response_timeout: r.response_timeout.unwrap_or(defaults.response_timeout),
                    max_request_body: r.max_request_body,
                    client,
                }
            })
            .collect();
        RouteTable { routes }
    }

    /// The first route matching a normalised path, method and host (without port).
    pub fn find(&self, method: &Method, host: Option<&str>, path: &str) -> Option<&Route> {
        self.routes.iter().find(|route| {
            route
                .methods
                .as_ref()
                .is_none_or(|methods| methods.contains(method))
                && route
                    .host
                    .as_ref()
                    .is_none_or(|h| host.is_some_and(|host| host.eq_ignore_ascii_case(h)))
                && route.pattern.matches(path)
        })
    }

    /// All routes, in order.
    pub fn iter(&self) -> impl Iterator<Item = &Route> {
        self.routes.iter()
    }
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
        assert!(!view.matches("/api/v1/objects/7/view/"));
        assert!(!view.matches("/api/v1/objects/7/view/x"));

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
            "/a%5cb",
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
        assert_eq!(table.iter().nth(2).unwrap().upstream.prefix, "/base");
    }
}
