//! `config.toml`: its keys, their defaults, and validation.
//!
//! Values are checked while they are deserialised (durations, addresses, PHC strings,
//! route patterns, grant types), so that toml can report the line of a bad value; the
//! checks that span several keys use `Spanned` fields for the same reason. Every error
//! names the file, the line and the key.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer};
use toml::Spanned;

use crate::routes::Pattern;

/// A configuration problem, located as precisely as the file allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file the problem is in.
    pub file: PathBuf,
    /// 1-based line, when the problem is tied to one.
    pub line: Option<usize>,
    /// Dotted key, e.g. `clients[0].client_secret`, when known.
    pub key: Option<String>,
    /// What is wrong and, where possible, how to fix it.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(key) = &self.key {
            write!(f, ": {key}")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The TLS listener and its connection limits.
    #[serde(default)]
    pub server: ServerConfig,
    /// Defaults for every route's upstream connection.
    #[serde(default)]
    pub upstream: UpstreamConfig,
    /// Brute-force protection.
    #[serde(default)]
    pub security: SecurityConfig,
    /// The plain-HTTP listener for health and metrics.
    #[serde(default)]
    pub admin: AdminConfig,
    /// The token table.
    #[serde(default)]
    pub tokens: TokensConfig,
    /// OAuth2 client applications.
    #[serde(default)]
    pub clients: Vec<ClientConfig>,
    /// Users who may sign in.
    #[serde(default)]
    pub users: Vec<UserConfig>,
    /// Where requests go, in order: the first match wins.
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    /// The file this was read from; relative paths in it are relative to its folder.
    #[serde(skip)]
    pub file: PathBuf,
    /// The file's text, so checks made after parsing can still name a line.
    #[serde(skip)]
    source: std::sync::Arc<str>,
}

/// `[server]`
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address of the TLS listener.
    pub listen: SocketAddr,
    /// PEM certificate chain, leaf first. A development pair is generated when both this
    /// and `tls_key` are missing.
    pub tls_cert: Spanned<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub tls_key: Spanned<PathBuf>,
    /// Deadline for a client to complete the TLS handshake.
    #[serde(deserialize_with = "duration")]
    pub tls_handshake_timeout: Duration,
    /// Deadline for a client to send a request's headers (slowloris guard). A new
    /// connection must deliver its first request head (HTTP/2 preface included) within
    /// it; on HTTP/1.1 it also bounds the wait for the next request on a keep-alive
    /// connection.
    #[serde(deserialize_with = "duration")]
    pub header_read_timeout: Duration,
    /// A connection on which no byte moves either way for this long is closed.
    #[serde(deserialize_with = "duration")]
    pub idle_timeout: Duration,
    /// Connections served at once; further ones wait in the listen backlog.
    pub max_connections: usize,
    /// After SIGTERM/SIGINT, how long in-flight requests may take to finish.
    #[serde(deserialize_with = "duration")]
    pub shutdown_grace: Duration,
    /// Peers whose `X-Forwarded-For` is extended rather than replaced.
    pub trusted_proxies: Vec<IpNet>,
    /// Value of a `Strict-Transport-Security` header added to every response, if set.
    pub hsts: Option<String>,
    /// Largest body the gateway's own endpoints (token, revoke…) accept, in bytes.
    pub max_form_body: usize,
    /// Largest request head (request line and headers), in bytes; larger gets 431.
    pub max_header_size: usize,
    /// Streams one HTTP/2 connection may have open at once.
    pub h2_max_concurrent_streams: u32,
    /// Plain-HTTP address that redirects every request to HTTPS (308); none by default.
    pub http_redirect_listen: Option<SocketAddr>,
    /// How often the certificate and key files are checked for replacement; a changed
    /// pair is loaded for new connections without a signal.
    #[serde(deserialize_with = "duration")]
    pub cert_poll_interval: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8443)),
            tls_cert: Spanned::new(0..0, PathBuf::from("certs/gateway.crt")),
            tls_key: Spanned::new(0..0, PathBuf::from("certs/gateway.key")),
            tls_handshake_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: 10_000,
            shutdown_grace: Duration::from_secs(30),
            trusted_proxies: Vec::new(),
            hsts: None,
            max_form_body: 64 * 1024,
            max_header_size: 64 * 1024,
            h2_max_concurrent_streams: 200,
            http_redirect_listen: None,
            cert_poll_interval: Duration::from_secs(10),
        }
    }
}

/// `[upstream]`: defaults for every route.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Deadline for a new connection to an upstream: TCP, and the TLS handshake for
    /// `https://`; 504 when it passes.
    #[serde(deserialize_with = "duration")]
    pub connect_timeout: Duration,
    /// Deadline for the upstream's response headers; 504 when it passes. Also how long
    /// the rest of a request body may go without progress once the upstream answered.
    #[serde(deserialize_with = "duration")]
    pub response_timeout: Duration,
    /// How long an unused pooled connection is kept.
    #[serde(deserialize_with = "duration")]
    pub pool_idle_timeout: Duration,
    /// Idle connections kept per upstream.
    pub pool_max_idle_per_host: usize,
    /// PEM file of CA certificates trusted for `https://` upstreams, instead of the
    /// system's roots.
    pub ca_file: Option<PathBuf>,
    /// How long an upstream address that refused or timed out a connection is skipped
    /// when a route lists several.
    #[serde(deserialize_with = "duration")]
    pub cooldown: Duration,
    /// Which requests a pooled connection may carry: `"none"` (any) or `"principal"`
    /// (only one principal's: a token's user and client, or the client address on
    /// public routes), so no byte of one user's exchange can reach another's whatever
    /// the upstream sends. Routes may override it.
    pub pool_partition: PoolPartition,
    /// Whether upstream connections are kept alive for further requests; `false` opens
    /// a connection per request. Routes may override it.
    pub keepalive: bool,
}

/// `pool_partition`: which requests one pooled upstream connection may carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PoolPartition {
    /// Any request to the same address.
    #[default]
    None,
    /// Only requests of one principal.
    Principal,
}

/// `escaped_slashes`: what a route does with `%2F` and `%5C` in a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EscapedSlashes {
    /// 400: many upstream frameworks decode them into separators, and would then serve
    /// another resource than the one the route authorised.
    #[default]
    Reject,
    /// Forwarded as sent, matched as part of their segment (for APIs whose ids hold
    /// slashes); still refused where decoding them would make a `.` or `..` segment.
    Keep,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            connect_timeout: Duration::from_secs(5),
            response_timeout: Duration::from_secs(30),
            pool_idle_timeout: Duration::from_secs(90),
            pool_max_idle_per_host: 256,
            ca_file: None,
            cooldown: Duration::from_secs(10),
            pool_partition: PoolPartition::None,
            keepalive: true,
        }
    }
}

/// `[security]`: brute-force protection of the sign-in paths.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SecurityConfig {
    /// Failed sign-ins per username, and per client IP, before further attempts fail fast.
    pub max_failed_logins: u32,
    /// How long failures are counted, and how long a lockout lasts.
    #[serde(deserialize_with = "duration")]
    pub lockout_window: Duration,
}

impl Default for SecurityConfig {
    fn default() -> Self {
        SecurityConfig {
            max_failed_logins: 5,
            lockout_window: Duration::from_secs(15 * 60),
        }
    }
}

/// `[admin]`
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Plain-HTTP address for `/healthz`, `/readyz` and `/metrics`; keep it private.
    pub listen: SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
        }
    }
}

/// `[tokens]`
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TokensConfig {
    /// Where tokens live; only `"memory"` so far.
    pub store: Spanned<String>,
    /// How often expired tokens are swept from the table.
    #[serde(deserialize_with = "duration")]
    pub sweep_interval: Duration,
    /// How long an authorization code may be exchanged (RFC 6749 §4.1.2: short).
    #[serde(deserialize_with = "duration")]
    pub code_lifetime: Duration,
    /// Most records (access + refresh tokens) the table holds; when full the token
    /// endpoint answers 503 `temporarily_unavailable` instead of growing.
    pub max_live_tokens: usize,
    /// Most live grants (refresh families) per user; a new sign-in beyond it revokes
    /// that user's oldest grant.
    pub max_families_per_user: usize,
    /// After a refresh token is used, how long presenting it again still works (for a
    /// client that lost the response) instead of revoking its family. "0s" for none.
    #[serde(deserialize_with = "duration_or_zero")]
    pub refresh_reuse_grace: Duration,
    /// File the token table is saved to (digests only) on shutdown and periodically,
    /// and loaded from at start, so a restart keeps everyone signed in. None: memory only.
    pub snapshot: Option<PathBuf>,
    /// How often the snapshot is written while running.
    #[serde(deserialize_with = "duration")]
    pub snapshot_interval: Duration,
}

impl Default for TokensConfig {
    fn default() -> Self {
        TokensConfig {
            store: Spanned::new(0..0, "memory".to_owned()),
            sweep_interval: Duration::from_secs(60),
            code_lifetime: Duration::from_secs(60),
            max_live_tokens: 1_000_000,
            max_families_per_user: 100,
            refresh_reuse_grace: Duration::ZERO,
            snapshot: None,
            snapshot_interval: Duration::from_secs(60),
        }
    }
}

/// An OAuth2 grant type a client may be allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GrantType {
    /// Resource owner password credentials (RFC 6749 §4.3).
    Password,
    /// Authorization code (RFC 6749 §4.1).
    AuthorizationCode,
    /// Refresh token (RFC 6749 §6).
    RefreshToken,
    /// Client credentials (RFC 6749 §4.4); the token has no user.
    ClientCredentials,
    /// Implicit (RFC 6749 §4.2).
    Implicit,
}

impl GrantType {
    /// The name used in `grant_type` and in config.
    pub fn as_str(self) -> &'static str {
        match self {
            GrantType::Password => "password",
            GrantType::AuthorizationCode => "authorization_code",
            GrantType::RefreshToken => "refresh_token",
            GrantType::ClientCredentials => "client_credentials",
            GrantType::Implicit => "implicit",
        }
    }
}

/// `[[clients]]`: a client application.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// The id the client authenticates with.
    pub client_id: Spanned<String>,
    /// argon2id PHC string of the secret (`covata-gateway hash-password`); absent for a
    /// public client.
    #[serde(default)]
    pub client_secret: Option<PhcString>,
    /// A client that cannot keep a secret: sends `client_id` in the body, must use PKCE.
    #[serde(default)]
    pub public: bool,
    /// The grants this client may use.
    pub authorized_grant_types: Spanned<Vec<GrantType>>,
    /// Exact redirect URIs for the authorization-code and implicit grants.
    #[serde(default)]
    pub registered_redirect_uris: Vec<String>,
    /// Lifetime of an access token, in seconds.
    #[serde(default = "default_access_validity")]
    pub access_token_validity_seconds: u64,
    /// Lifetime of a refresh token, in seconds.
    #[serde(default = "default_refresh_validity")]
    pub refresh_token_validity_seconds: u64,
    /// Scopes this client may ask for; absent means any.
    #[serde(default)]
    pub scopes: Option<Vec<String>>,
}

fn default_access_validity() -> u64 {
    43_200
}

fn default_refresh_validity() -> u64 {
    2_592_000
}

/// `[[users]]`: a user who may sign in.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    /// The sign-in name, usually an email address.
    pub username: Spanned<String>,
    /// argon2id PHC string of the password.
    pub password: PhcString,
    /// Covata roles, e.g. `ROLE_COLLABORATOR`.
    pub roles: Spanned<Vec<String>>,
}

/// `[[routes]]`: where a request goes and who may send it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Path pattern: literal segments, `*` for one segment, a trailing `**` for the rest.
    pub path: Pattern,
    /// Base URL of the upstream, `http[s]://host:port[/prefix]`, or a list of them to
    /// take in turn (round-robin, skipping addresses that recently failed to connect).
    pub upstream: Upstreams,
    /// Serve without a bearer token.
    #[serde(default)]
    pub public: bool,
    /// Methods this route matches; absent means all.
    #[serde(default)]
    pub methods: Option<Vec<MethodName>>,
    /// Host this route matches (without port, case-insensitive); absent means any.
    #[serde(default)]
    pub host: Option<String>,
    /// The token's user must have at least one of these roles.
    #[serde(default)]
    pub roles: Vec<String>,
    /// The token must carry every one of these scopes.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Pass the client's `Authorization` header on to the upstream.
    #[serde(default)]
    pub forward_authorization: bool,
    /// Overrides `[upstream] connect_timeout` for this route.
    #[serde(default, deserialize_with = "optional_duration")]
    pub connect_timeout: Option<Duration>,
    /// Overrides `[upstream] response_timeout` for this route.
    #[serde(default, deserialize_with = "optional_duration")]
    pub response_timeout: Option<Duration>,
    /// Largest request body forwarded on this route, in bytes; larger gets 413.
    #[serde(default)]
    pub max_request_body: Option<u64>,
    /// Removed from the front of the path before forwarding, e.g. "/api/v1".
    #[serde(default)]
    pub strip_prefix: Option<String>,
    /// Put in front of the path before forwarding (after strip_prefix), e.g. "/v2".
    #[serde(default)]
    pub add_prefix: Option<String>,
    /// Overrides `[upstream] pool_partition` for this route.
    #[serde(default)]
    pub pool_partition: Option<PoolPartition>,
    /// Overrides `[upstream] keepalive` for this route.
    #[serde(default)]
    pub keepalive: Option<bool>,
    /// Request headers that are dropped by default (names with `_`, and `X-Real-IP`,
    /// `X-Original-URL` and the others some upstreams trust) but that this route's
    /// upstream needs. Headers the gateway sets itself can never be passed.
    #[serde(default)]
    pub pass_headers: Vec<String>,
    /// Match this route's pattern without regard to case, for upstreams that route that
    /// way (Express does by default), so that `/ADMIN` cannot slip past an `/admin`
    /// route to a catch-all.
    #[serde(default = "yes")]
    pub case_sensitive: bool,
    /// `%2F` and `%5C` in the path: `"reject"` (400, the default) or `"keep"`.
    #[serde(default)]
    pub escaped_slashes: EscapedSlashes,
}

fn yes() -> bool {
    true
}

/// One upstream URL or several.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstreams(pub Vec<UpstreamUrl>);

impl<'de> Deserialize<'de> for Upstreams {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum OneOrMany {
            One(String),
            Many(Vec<String>),
        }
        let texts = match OneOrMany::deserialize(d)
            .map_err(|_| serde::de::Error::custom("upstream is a URL or a list of URLs"))?
        {
            OneOrMany::One(text) => vec![text],
            OneOrMany::Many(texts) => texts,
        };
        if texts.is_empty() {
            return Err(serde::de::Error::custom("upstream lists no URL"));
        }
        texts
            .iter()
            .map(|t| UpstreamUrl::parse(t))
            .collect::<Result<Vec<_>, _>>()
            .map(Upstreams)
            .map_err(serde::de::Error::custom)
    }
}

/// An argon2id PHC string, checked for form when read.
#[derive(Clone, PartialEq, Eq)]
pub struct PhcString(pub String);

impl fmt::Debug for PhcString {
    // A hash is not a secret, but it is an offline-cracking target: keep it out of logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PhcString(..)")
    }
}

impl<'de> Deserialize<'de> for PhcString {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        crate::credentials::check_phc(&text).map_err(serde::de::Error::custom)?;
        Ok(PhcString(text))
    }
}

/// An HTTP method name, checked when read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MethodName(pub http::Method);

impl<'de> Deserialize<'de> for MethodName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let upper = text.to_ascii_uppercase();
        http::Method::from_bytes(upper.as_bytes())
            .map(MethodName)
            .map_err(|_| serde::de::Error::custom(format!("`{text}` is not an HTTP method")))
    }
}

/// An upstream base URL: `http[s]://authority[/prefix]`, no query or fragment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamUrl {
    /// Path prefix without a trailing slash; empty for none.
    pub prefix: String,
    /// `scheme://authority/` (`http` or `https`): what a connection is opened to.
    pub origin: http::Uri,
    /// `Host` of requests sent there: the host, with the port only when it is not the
    /// scheme's default (as clients write it, and as virtual hosts and signatures
    /// expect).
    pub host: http::HeaderValue,
}

impl UpstreamUrl {
    /// Parses and checks an upstream URL.
    pub fn parse(text: &str) -> Result<Self, String> {
        let uri: http::Uri = text
            .parse()
            .map_err(|e| format!("`{text}` is not a URL: {e}"))?;
        let scheme = uri
            .scheme()
            .cloned()
            .ok_or_else(|| format!("`{text}` needs a scheme, e.g. http://{text}"))?;
        if scheme != http::uri::Scheme::HTTP && scheme != http::uri::Scheme::HTTPS {
            return Err(format!("`{text}`: an upstream is http:// or https://"));
        }
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| format!("`{text}` has no host"))?;
        if authority.as_str().contains('@') {
            return Err(format!(
                "`{text}`: an upstream URL takes no user or password (they would be sent as part of Host)"
            ));
        }
        if uri.query().is_some() || text.contains('#') {
            return Err(format!(
                "`{text}`: an upstream URL takes no query or fragment"
            ));
        }
        let origin = http::Uri::builder()
            .scheme(scheme.clone())
            .authority(authority.clone())
            .path_and_query("/")
            .build()
            .map_err(|e| format!("`{text}` is not a URL: {e}"))?;
        let default_port = if scheme == http::uri::Scheme::HTTPS {
            443
        } else {
            80
        };
        let host = match authority.port_u16() {
            Some(port) if port != default_port => format!("{}:{port}", authority.host()),
            _ => authority.host().to_owned(),
        };
        let host = http::HeaderValue::try_from(host)
            .map_err(|_| format!("`{text}`: the host is not a valid Host header"))?;
        Ok(UpstreamUrl {
            prefix: uri.path().trim_end_matches('/').to_owned(),
            origin,
            host,
        })
    }

    /// Whether connections to it use TLS.
    pub fn is_https(&self) -> bool {
        self.origin.scheme() == Some(&http::uri::Scheme::HTTPS)
    }
}

impl<'de> Deserialize<'de> for UpstreamUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        UpstreamUrl::parse(&text).map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for UpstreamUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = self.origin.scheme_str().unwrap_or_default();
        let authority = self.origin.authority().map_or("", |a| a.as_str());
        write!(f, "{scheme}://{authority}{}", self.prefix)
    }
}

/// Parses `"500ms"`, `"10s"`, `"15m"`; zero is refused because every duration here is a
/// deadline or a period.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let value = parse_duration_or_zero(text)?;
    if value.is_zero() {
        return Err(format!("`{text}`: a duration must be greater than zero"));
    }
    Ok(value)
}

/// The longest duration a setting may have. Deadlines are added to the clock, and a
/// sum beyond what it can hold would panic in the middle of a request.
const MAX_DURATION: Duration = Duration::from_secs(36_525 * 24 * 3600);

/// As [`parse_duration`], zero allowed.
fn parse_duration_or_zero(text: &str) -> Result<Duration, String> {
    let value = humantime::parse_duration(text.trim()).map_err(|e| {
        format!("`{text}` is not a duration ({e}); write it with a unit, e.g. \"10s\"")
    })?;
    if value > MAX_DURATION {
        return Err(format!("`{text}`: a duration may be at most 100 years"));
    }
    Ok(value)
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    parse_duration(&text).map_err(serde::de::Error::custom)
}

fn duration_or_zero<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    parse_duration_or_zero(&text).map_err(serde::de::Error::custom)
}

fn optional_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration(d).map(Some)
}

/// 1-based line of a byte offset.
fn line_of(source: &str, offset: usize) -> usize {
    source[..offset.min(source.len())].matches('\n').count() + 1
}

impl Config {
    /// Reads, parses and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let source = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_owned(),
            line: None,
            key: None,
            message: format!("cannot read the configuration file: {e}"),
        })?;
        Config::parse(&source, path)
    }

    /// Parses and validates configuration text; `path` names it in errors and anchors its
    /// relative paths.
    pub fn parse(source: &str, path: &Path) -> Result<Config, ConfigError> {
        let mut config: Config = toml::from_str(source).map_err(|e| {
            let line = e.span().map(|s| line_of(source, s.start));
            // toml's message names the key; add the offending line itself for context.
            let context = line
                .and_then(|l| source.lines().nth(l - 1))
                .map(|text| format!(" (in `{}`)", text.trim()))
                .unwrap_or_default();
            ConfigError {
                file: path.to_owned(),
                line,
                key: None,
                message: format!("{}{context}", e.message().trim_end()),
            }
        })?;
        config.file = path.to_owned();
        config.source = source.into();
        config.validate(source)?;
        Ok(config)
    }

    /// An error about `key`, located at `span` when the key was written in the file.
    pub fn error_at(
        &self,
        span: std::ops::Range<usize>,
        key: &str,
        message: String,
    ) -> ConfigError {
        ConfigError {
            file: self.file.clone(),
            line: (span.end > 0).then(|| line_of(&self.source, span.start)),
            key: Some(key.to_owned()),
            message,
        }
    }

    /// Resolves a path from the file against the file's folder.
    pub fn resolve(&self, path: &Path) -> PathBuf {
        match self.file.parent() {
            Some(dir) if path.is_relative() => dir.join(path),
            _ => path.to_owned(),
        }
    }

    fn validate(&self, source: &str) -> Result<(), ConfigError> {
        let error =
            |span: Option<std::ops::Range<usize>>, key: String, message: String| ConfigError {
                file: self.file.clone(),
                line: span.filter(|s| s.end > 0).map(|s| line_of(source, s.start)),
                key: Some(key),
                message,
            };

        if self.tokens.store.get_ref() != "memory" {
            return Err(error(
                Some(self.tokens.store.span()),
                "tokens.store".into(),
                format!(
                    "`{}` is not supported; the only store so far is \"memory\"",
                    self.tokens.store.get_ref()
                ),
            ));
        }
        if self.server.max_header_size < 1024 || self.server.h2_max_concurrent_streams == 0 {
            return Err(error(
                None,
                "server.max_header_size".into(),
                "max_header_size must be at least 1024 and h2_max_concurrent_streams at least 1"
                    .into(),
            ));
        }
        if let Some(ca) = &self.upstream.ca_file {
            if !self.resolve(ca).exists() {
                return Err(error(
                    None,
                    "upstream.ca_file".into(),
                    format!("{} does not exist", self.resolve(ca).display()),
                ));
            }
        }
        if self.tokens.max_live_tokens == 0 || self.tokens.max_families_per_user == 0 {
            return Err(error(
                None,
                "tokens.max_live_tokens".into(),
                "max_live_tokens and max_families_per_user must be at least 1".into(),
            ));
        }
        if self.server.max_connections == 0 {
            return Err(error(
                None,
                "server.max_connections".into(),
                "must be at least 1".into(),
            ));
        }
        if let Some(hsts) = &self.server.hsts {
            if http::HeaderValue::from_str(hsts).is_err() || !hsts.contains("max-age=") {
                return Err(error(
                    None,
                    "server.hsts".into(),
                    format!("`{hsts}` is not a Strict-Transport-Security value, e.g. \"max-age=31536000\""),
                ));
            }
        }

        let mut client_ids = HashSet::new();
        for (i, client) in self.clients.iter().enumerate() {
            let id = client.client_id.get_ref();
            let at = |field: &str| format!("clients[{i}].{field}");
            let span = Some(client.client_id.span());
            if id.is_empty() || id.contains(':') || id.chars().any(char::is_control) {
                return Err(error(
                    span,
                    at("client_id"),
                    format!("`{id}` is not a usable client id (empty, or holds ':' or a control character)"),
                ));
            }
            if !client_ids.insert(id.as_str()) {
                return Err(error(
                    span,
                    at("client_id"),
                    format!("`{id}` is defined twice"),
                ));
            }
            match (client.public, &client.client_secret) {
                (false, None) => {
                    return Err(error(
                        span,
                        at("client_secret"),
                        "a confidential client needs a client_secret (or set public = true)".into(),
                    ))
                }
                (true, Some(_)) => {
                    return Err(error(
                        span,
                        at("client_secret"),
                        "a public client has no secret; remove client_secret or public = true"
                            .into(),
                    ))
                }
                _ => {}
            }
            let grants = client.authorized_grant_types.get_ref();
            let grants_span = Some(client.authorized_grant_types.span());
            if grants.is_empty() {
                return Err(error(
                    grants_span,
                    at("authorized_grant_types"),
                    "lists no grant type".into(),
                ));
            }
            if client.public {
                if let Some(bad) = grants
                    .iter()
                    .find(|g| matches!(g, GrantType::Password | GrantType::ClientCredentials))
                {
                    return Err(error(
                        grants_span,
                        at("authorized_grant_types"),
                        format!("a public client cannot use the {} grant", bad.as_str()),
                    ));
                }
            }
            let redirects_needed = grants
                .iter()
                .any(|g| matches!(g, GrantType::AuthorizationCode | GrantType::Implicit));
            if redirects_needed && client.registered_redirect_uris.is_empty() {
                return Err(error(
                    grants_span,
                    at("registered_redirect_uris"),
                    "the authorization_code and implicit grants need at least one registered redirect URI".into(),
                ));
            }
            for uri in &client.registered_redirect_uris {
                let parsed: Result<http::Uri, _> = uri.parse();
                let absolute = parsed
                    .as_ref()
                    .is_ok_and(|u| u.scheme().is_some() && u.authority().is_some());
                if !absolute || uri.contains('#') {
                    return Err(error(
                        span,
                        at("registered_redirect_uris"),
                        format!(
                            "`{uri}` must be an absolute URI without a fragment (RFC 6749 §3.1.2)"
                        ),
                    ));
                }
            }
            if client.access_token_validity_seconds == 0
                || client.refresh_token_validity_seconds == 0
            {
                return Err(error(
                    span,
                    at("access_token_validity_seconds"),
                    "token validity must be at least 1 second".into(),
                ));
            }
            if let Some(scopes) = &client.scopes {
                if let Some(bad) = scopes
                    .iter()
                    .find(|s| !crate::token::scope::is_scope_token(s))
                {
                    return Err(error(
                        span,
                        at("scopes"),
                        format!("`{bad}` is not a scope (RFC 6749 §3.3: printable ASCII, no space, quote or backslash)"),
                    ));
                }
            }
        }

        let mut usernames = HashSet::new();
        for (i, user) in self.users.iter().enumerate() {
            let name = user.username.get_ref();
            let span = Some(user.username.span());
            let at = |field: &str| format!("users[{i}].{field}");
            if name.is_empty() || name.chars().any(char::is_control) {
                return Err(error(
                    span,
                    at("username"),
                    "must be non-empty and hold no control character".into(),
                ));
            }
            if !usernames.insert(name.as_str()) {
                return Err(error(
                    span,
                    at("username"),
                    format!("`{name}` is defined twice"),
                ));
            }
            let roles = user.roles.get_ref();
            if roles.is_empty() {
                return Err(error(
                    Some(user.roles.span()),
                    at("roles"),
                    "a user needs at least one role".into(),
                ));
            }
            if let Some(bad) = roles
                .iter()
                .find(|r| r.is_empty() || r.contains(',') || !r.is_ascii() || r.contains(' '))
            {
                return Err(error(
                    Some(user.roles.span()),
                    at("roles"),
                    format!("`{bad}` is not a role name (ASCII, no comma or space)"),
                ));
            }
        }

        for (i, route) in self.routes.iter().enumerate() {
            if let Some(host) = &route.host {
                if host.is_empty() || host.contains([':', '/', ' ']) {
                    return Err(error(
                        Some(route.path.span.clone()),
                        format!("routes[{i}].host"),
                        format!("`{host}` is not a host name (no port, scheme or path)"),
                    ));
                }
            }
            for (name, prefix) in [
                ("strip_prefix", &route.strip_prefix),
                ("add_prefix", &route.add_prefix),
            ] {
                if let Some(prefix) = prefix {
                    let valid = prefix.starts_with('/')
                        && !prefix.ends_with('/')
                        && crate::routes::normalize_path(prefix)
                            .is_ok_and(|p| p == prefix.as_str());
                    if !valid {
                        return Err(error(
                            Some(route.path.span.clone()),
                            format!("routes[{i}].{name}"),
                            format!("`{prefix}` must be a normalised path starting with '/' and not ending with '/', e.g. \"/api/v1\""),
                        ));
                    }
                }
            }
            for name in &route.pass_headers {
                let lower = name.to_ascii_lowercase();
                let problem = if http::HeaderName::from_bytes(lower.as_bytes()).is_err() {
                    Some("is not a header name")
                } else if crate::header_policy::is_owned(&lower) {
                    Some("is set by the gateway itself and is never taken from the client")
                } else if crate::upstream::is_hop_by_hop(lower.as_bytes())
                    || matches!(lower.as_str(), "host" | "content-length" | "authorization")
                {
                    Some("is not an end-to-end header the route could pass (Authorization has forward_authorization)")
                } else {
                    None
                };
                if let Some(problem) = problem {
                    return Err(error(
                        Some(route.path.span.clone()),
                        format!("routes[{i}].pass_headers"),
                        format!("`{name}` {problem}"),
                    ));
                }
            }
            if route.public && (!route.roles.is_empty() || !route.scopes.is_empty()) {
                return Err(error(
                    Some(route.path.span.clone()),
                    format!("routes[{i}].public"),
                    "a public route cannot also require roles or scopes".into(),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("test.toml"))
    }

    #[test]
    fn upstream_urls_are_plain_http_or_https_bases() {
        let url = UpstreamUrl::parse("https://svc:8443/base/").unwrap();
        assert_eq!(url.origin.authority().unwrap().as_str(), "svc:8443");
        assert!(url.is_https());
        assert_eq!(url.to_string(), "https://svc:8443/base");
        assert_eq!(url.prefix, "/base");
        for bad in [
            "http://user:secret@svc:8081",
            "ftp://svc",
            "svc:8081",
            "http://svc/?q=1",
            "http://svc/#f",
        ] {
            assert!(UpstreamUrl::parse(bad).is_err(), "{bad} accepted");
        }
        let error = UpstreamUrl::parse("http://user:secret@svc").unwrap_err();
        assert!(error.contains("no user or password"), "{error}");
    }

    #[test]
    fn upstream_host_leaves_out_the_default_port_only() {
        let host = |url: &str| UpstreamUrl::parse(url).unwrap().host;
        assert_eq!(host("http://svc"), "svc");
        assert_eq!(host("http://svc:80/base"), "svc");
        assert_eq!(host("https://svc:443"), "svc");
        assert_eq!(host("http://svc:443"), "svc:443");
        assert_eq!(host("https://127.0.0.1:8443"), "127.0.0.1:8443");
        assert_eq!(host("http://[::1]:8081"), "[::1]:8081");
        let origin = |url: &str| UpstreamUrl::parse(url).unwrap().origin.to_string();
        assert_eq!(origin("https://svc:8443/base/"), "https://svc:8443/");
    }

    #[test]
    fn empty_file_is_all_defaults() {
        let config = parse("").unwrap();
        assert_eq!(config.server.listen.port(), 8443);
        assert_eq!(config.server.header_read_timeout, Duration::from_secs(10));
        assert_eq!(config.security.max_failed_logins, 5);
        assert_eq!(config.tokens.store.get_ref(), "memory");
    }

    #[test]
    fn unknown_key_names_the_key_and_the_line() {
        let error = parse("[server]\nlisten = \"127.0.0.1:1\"\nlisen = \"x\"\n").unwrap_err();
        assert_eq!(error.line, Some(3), "{error}");
        assert!(error.to_string().contains("lisen"), "{error}");
        assert!(error.to_string().starts_with("test.toml:3"), "{error}");
    }

    #[test]
    fn durations_go_up_to_a_hundred_years() {
        assert!(parse_duration("100y").is_ok());
        assert!(parse_duration_or_zero("0s").is_ok());
        assert!(parse_duration("100y 1s").is_err());
    }

    #[test]
    fn bad_values_are_located() {
        let cases = [
            ("[server]\nlisten = \"localhost\"\n", 2, "listen"),
            ("[server]\n\nidle_timeout = \"10 parsecs\"\n", 3, "idle_timeout"),
            ("[server]\nidle_timeout = \"0s\"\n", 2, "greater than zero"),
            // Added to the clock per request, beyond what it holds: a panic, once.
            (
                "[upstream]\nresponse_timeout = \"500000000000y\"\n",
                2,
                "at most 100 years",
            ),
            (
                "[tokens]\nrefresh_reuse_grace = \"101y\"\n",
                2,
                "at most 100 years",
            ),
            (
                "[[users]]\nusername = \"a\"\npassword = \"hunter2\"\nroles = [\"R\"]\n",
                3,
                "PHC",
            ),
            (
                "[[clients]]\nclient_id = \"c\"\nclient_secret = \"x\"\nauthorized_grant_types = [\"pasword\"]\n",
                3,
                "",
            ),
            (
                "[[routes]]\npath = \"/a/**/b\"\nupstream = \"http://127.0.0.1:1\"\n",
                2,
                "**",
            ),
            (
                "[[routes]]\npath = \"/a\"\nupstream = \"127.0.0.1:1\"\n",
                3,
                "scheme",
            ),
            ("[tokens]\nstore = \"redis://x:1\"\n", 2, "not supported"),
        ];
        for (text, line, needle) in cases {
            let error = parse(text).unwrap_err();
            assert_eq!(error.line, Some(line), "{text}\n=> {error}");
            assert!(error.to_string().contains(needle), "{text}\n=> {error}");
        }
    }

    #[test]
    fn cross_key_problems_name_the_key() {
        let hash =
            crate::credentials::hash_password_with("pw", crate::credentials::TEST_PARAMS).unwrap();
        let client = |extra: &str| {
            format!(
                "[[clients]]\nclient_id = \"c\"\nauthorized_grant_types = [\"password\"]\n{extra}"
            )
        };
        let cases = [
            (client(""), "clients[0].client_secret"),
            (
                client(&format!("client_secret = \"{hash}\"\npublic = true\n")),
                "clients[0].client_secret",
            ),
            (
                format!(
                    "{}{}",
                    client(&format!("client_secret = \"{hash}\"\n")),
                    client(&format!("client_secret = \"{hash}\"\n"))
                ),
                "clients[1].client_id",
            ),
            (
                format!("[[users]]\nusername = \"u\"\npassword = \"{hash}\"\nroles = []\n"),
                "users[0].roles",
            ),
            // The gateway's own headers are never passed, in any spelling.
            (
                "[[routes]]\npath = \"/a\"\nupstream = \"http://127.0.0.1:1\"\n\
                 pass_headers = [\"X_Authenticated_User\"]\n"
                    .to_owned(),
                "routes[0].pass_headers",
            ),
            (
                "[[routes]]\npath = \"/a\"\nupstream = \"http://127.0.0.1:1\"\n\
                 pass_headers = [\"Transfer-Encoding\"]\n"
                    .to_owned(),
                "routes[0].pass_headers",
            ),
            (
                "[[routes]]\npath = \"/a\"\nupstream = \"http://127.0.0.1:1\"\n\
                 pass_headers = [\"bad header\"]\n"
                    .to_owned(),
                "routes[0].pass_headers",
            ),
        ];
        for (text, key) in cases {
            let error = parse(&text).unwrap_err();
            assert_eq!(error.key.as_deref(), Some(key), "{text}\n=> {error}");
            assert!(error.line.is_some(), "{error}");
        }
    }
}
