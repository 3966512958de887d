//! The gateway: its state, its reload, and where each request goes.
//!
//! State that a reload replaces (clients, users, routes, certificate, upstream clients)
//! lives in [`Live`] behind an `ArcSwap`; state that must survive a reload (the token
//! table, lockout counters, metrics) lives in [`Shared`] directly. A request takes one
//! snapshot of `Live` and uses it throughout, so a reload never changes the rules in the
//! middle of a request.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use http::{HeaderValue, Request, Response};
use hyper::body::Incoming;
use tracing::{field, Instrument};

use crate::admin::Metrics;
use crate::authorize::PendingStore;
use crate::body::Body;
use crate::config::{Config, ConfigError, UpstreamUrl};
use crate::credentials::{SecretCache, Verifier};
use crate::directory::Directory;
use crate::error::Error;
use crate::lockout::Lockout;
use crate::routes::{self, normalize_path, RouteTable};
use crate::token::codes::CodeStore;
use crate::token::lifecycle;
use crate::token::TokenStore;
use crate::{auth, proxy, tls, token};

/// The client id of Covata's documented example client; serving it is a demo setup.
pub const DEMO_CLIENT_ID: &str = "exampleClientApplication";

/// Everything derived from one configuration.
#[derive(Clone)]
pub struct Live {
    /// The configuration itself.
    pub config: Config,
    /// Clients and users.
    pub directory: Arc<Directory>,
    /// Routes, compiled, with their upstream clients.
    pub routes: Arc<RouteTable>,
    /// The TLS server configuration (certificate, ALPN).
    pub tls: Arc<rustls::ServerConfig>,
}

impl Live {
    /// Builds everything a configuration describes; with `generate_cert`, writes a
    /// development certificate first if neither TLS file exists.
    pub fn build(config: Config, generate_cert: bool) -> Result<Live, ConfigError> {
        let cert = config.resolve(config.server.tls_cert.get_ref());
        let key = config.resolve(config.server.tls_key.get_ref());
        let tls_error = |key_name: &str, message: String| {
            let span = match key_name {
                "server.tls_key" => config.server.tls_key.span(),
                "server.tls_cert" => config.server.tls_cert.span(),
                _ => 0..0,
            };
            config.error_at(span, key_name, message)
        };
        if generate_cert
            && tls::ensure_dev_certificate(&cert, &key)
                .map_err(|e| tls_error("server.tls_cert", e.to_string()))?
        {
            tracing::warn!(
                cert = %cert.display(),
                key = %key.display(),
                "no TLS certificate was configured: generated a self-signed development \
                 certificate for localhost; clients will not trust it, do not use it in production"
            );
        }
        for (name, path) in [("server.tls_cert", &cert), ("server.tls_key", &key)] {
            if !path.exists() {
                return Err(tls_error(
                    name,
                    format!(
                        "{} does not exist (when neither tls_cert nor tls_key exists, a development pair is generated)",
                        path.display()
                    ),
                ));
            }
        }
        let tls = tls::server_config(&cert, &key)
            .map_err(|e| tls_error("server.tls_cert", e.to_string()))?;
        let needs_roots = config
            .routes
            .iter()
            .flat_map(|r| &r.upstream.0)
            .any(UpstreamUrl::is_https);
        let ca_file = config.upstream.ca_file.as_ref().map(|p| config.resolve(p));
        let upstream_tls = proxy::upstream_tls(ca_file.as_deref(), needs_roots)
            .map_err(|message| tls_error("upstream.ca_file", message))?;
        let routes = RouteTable::new(&config.routes, &config.upstream, &upstream_tls);
        let directory = Directory::new(&config);
        Ok(Live {
            config,
            directory: Arc::new(directory),
            routes: Arc::new(routes),
            tls,
        })
    }
}

/// State shared by every connection, surviving reloads.
pub struct Shared {
    live: ArcSwap<Live>,
    /// The token table.
    pub tokens: TokenStore,
    /// Client secrets that verified recently.
    pub secrets: SecretCache,
    /// argon2 on the blocking pool.
    pub verifier: Verifier,
    /// Failed sign-in counters.
    pub lockout: Lockout,
    /// Outstanding authorization codes.
    pub codes: CodeStore,
    /// Sign-in pages waiting for the user.
    pub pending: PendingStore,
    /// Counters for `/metrics`.
    pub metrics: Metrics,
    /// False once shutdown begins (`/readyz` turns 503).
    pub ready: AtomicBool,
    /// Held by whoever replaces `live` (reload, certificate watch), so one writer's
    /// read-modify-write never undoes the other's.
    replacing: std::sync::Mutex<()>,
}

impl Shared {
    /// The current configuration-derived state.
    pub fn live(&self) -> Arc<Live> {
        self.live.load_full()
    }
}

/// A covata-gateway instance: build it from a configuration, then [`Gateway::serve`].
#[derive(Clone)]
pub struct Gateway {
    shared: Arc<Shared>,
}

impl Gateway {
    /// Builds a gateway; generates a development certificate when none is configured.
    pub fn new(config: Config) -> Result<Gateway, ConfigError> {
        let live = Live::build(config, true)?;
        if live.directory.client(DEMO_CLIENT_ID).is_some() {
            tracing::warn!(
                client_id = DEMO_CLIENT_ID,
                "the demo client from Covata's documentation is configured; \
                 remove it before exposing this gateway"
            );
        }
        let tokens = TokenStore::default();
        apply_token_limits(&tokens, &live.config);
        if let Some(path) = live
            .config
            .tokens
            .snapshot
            .as_ref()
            .map(|p| live.config.resolve(p))
        {
            load_snapshot(&tokens, &path);
        }
        Ok(Gateway {
            shared: Arc::new(Shared {
                live: ArcSwap::from_pointee(live),
                tokens,
                secrets: SecretCache::default(),
                verifier: Verifier::default(),
                lockout: Lockout::default(),
                codes: CodeStore::default(),
                pending: PendingStore::default(),
                metrics: Metrics::default(),
                ready: AtomicBool::new(true),
                replacing: std::sync::Mutex::new(()),
            }),
        })
    }

    /// Replaces clients, users, routes and certificate with a new configuration's, after
    /// validating it; tokens, connections and counters are kept. On error nothing changes.
    pub fn reload(&self, config: Config) -> Result<(), ConfigError> {
        let _replacing = self
            .shared
            .replacing
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let old = self.shared.live();
        if config.server.listen != old.config.server.listen
            || config.admin.listen != old.config.admin.listen
        {
            tracing::warn!("listen addresses do not change on reload; restart to move them");
        }
        let live = Live::build(config, false)?;
        apply_token_limits(&self.shared.tokens, &live.config);
        self.shared.live.store(Arc::new(live));
        // A changed or removed secret must not keep working from the cache.
        self.shared.secrets.clear();
        Ok(())
    }

    /// The state shared with the server tasks.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Serves TLS on `listener` and the admin endpoints on `admin` until `shutdown`
    /// completes, then drains in-flight requests for at most `server.shutdown_grace`.
    pub async fn serve(
        &self,
        listener: tokio::net::TcpListener,
        admin: Option<tokio::net::TcpListener>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) {
        let listeners = crate::server::Listeners {
            tls: listener,
            admin,
            redirect: None,
        };
        self.serve_all(listeners, shutdown).await
    }

    /// Like [`Gateway::serve`], with every listener (including the HTTP→HTTPS redirect).
    pub async fn serve_all(
        &self,
        listeners: crate::server::Listeners,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) {
        crate::server::serve(self.shared.clone(), listeners, shutdown).await
    }
}

fn apply_token_limits(tokens: &TokenStore, config: &Config) {
    let limits = &config.tokens;
    tokens.set_limits(
        limits.max_live_tokens,
        limits.max_families_per_user,
        limits.refresh_reuse_grace,
    );
}

/// Loads the token snapshot at start. A missing file is a first start; a file that does
/// not load is moved aside (kept for inspection) and the gateway starts empty.
fn load_snapshot(tokens: &TokenStore, path: &std::path::Path) {
    if !path.exists() {
        tracing::info!(snapshot = %path.display(), "no token snapshot yet; starting with an empty table");
        return;
    }
    match tokens.load_snapshot(path) {
        Ok(loaded) => tracing::info!(snapshot = %path.display(), loaded, "token snapshot loaded"),
        Err(error) => {
            let stamp = crate::token::store::now_millis() / 1000;
            let aside = path.with_extension(format!("corrupt-{stamp}"));
            let moved = std::fs::rename(path, &aside);
            tracing::error!(
                snapshot = %path.display(),
                %error,
                moved_to = %aside.display(),
                moved = moved.is_ok(),
                "the token snapshot is corrupt; it was moved aside and the gateway starts with an empty table"
            );
        }
    }
}

/// Writes the token snapshot if one is configured (on the blocking pool).
pub(crate) async fn save_snapshot(shared: &Arc<Shared>) {
    let live = shared.live();
    let Some(path) = live
        .config
        .tokens
        .snapshot
        .as_ref()
        .map(|p| live.config.resolve(p))
    else {
        return;
    };
    let writer = shared.clone();
    let target = path.clone();
    match tokio::task::spawn_blocking(move || writer.tokens.write_snapshot(&target)).await {
        Ok(Ok(written)) => {
            tracing::debug!(snapshot = %path.display(), written, "token snapshot written")
        }
        Ok(Err(error)) => {
            tracing::error!(snapshot = %path.display(), %error, "cannot write the token snapshot")
        }
        Err(_) => tracing::error!("the snapshot writer failed"),
    }
}

/// Reloads the certificate and key of the current configuration for new connections.
pub(crate) fn reload_certificate(shared: &Shared) -> Result<(), ConfigError> {
    let _replacing = shared.replacing.lock().unwrap_or_else(|e| e.into_inner());
    let old = shared.live();
    let config = &old.config;
    let cert = config.resolve(config.server.tls_cert.get_ref());
    let key = config.resolve(config.server.tls_key.get_ref());
    let tls = tls::server_config(&cert, &key).map_err(|e| {
        config.error_at(
            config.server.tls_cert.span(),
            "server.tls_cert",
            e.to_string(),
        )
    })?;
    shared.live.store(Arc::new(Live {
        tls,
        ..(*old).clone()
    }));
    Ok(())
}

/// Host without port, from `Host` or `:authority`; a fully qualified name's final dot
/// goes too (`example.com.` is `example.com`), so that it meets the same routes.
fn host_name(value: &HeaderValue) -> Option<&str> {
    let host = value.to_str().ok()?;
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next();
    }
    let name = host.rsplit_once(':').map_or(host, |(name, _)| name);
    Some(name.strip_suffix('.').unwrap_or(name))
}

/// Answers one request; errors become their JSON responses here and are logged once.
pub async fn handle(
    shared: Arc<Shared>,
    request: Request<Incoming>,
    peer: proxy::Peer,
) -> Response<Body> {
    let started = Instant::now();
    let live = shared.live();
    let span = |method: &http::Method, path: &str, facts: &Facts| {
        tracing::info_span!(
            "request",
            method = %method,
            path,
            peer = %peer.addr.ip(),
            route = facts.route,
            client_id = field::Empty,
            user = facts.user.as_deref(),
        )
    };
    let result = if let Some(endpoint) = OwnEndpoint::of(request.uri().path()) {
        // The gateway's own endpoints run in their span, so what they log on the way
        // (client, user) carries the request's context.
        let span = span(request.method(), request.uri().path(), &Facts::default());
        // Boxed, here and below: inline, the largest branch sets the size of every
        // request's future, which hyper's HTTP/2 server copies several times as it
        // spawns each stream.
        let result = Box::pin(own_endpoint(endpoint, &shared, &live, request, &peer))
            .instrument(span.clone())
            .await;
        result.map_err(|error| (error, span))
    } else {
        // Proxied requests, tens of thousands a second, make a span only when there is
        // something to log: at `info`, one per request cost ~7 us of CPU (a seventh of
        // the gateway's work per request).
        // Cheap clones (reference-counted): the failure line needs them after the
        // request has moved on, and the routing borrows the path from them.
        let (method, uri) = (request.method().clone(), request.uri().clone());
        let mut facts = Facts::default();
        let result = Box::pin(proxied(&shared, &live, request, &uri, &peer, &mut facts)).await;
        result.map_err(|error| (error, span(&method, uri.path(), &facts)))
    };
    let mut response = match result {
        Ok(response) => response,
        Err((error, span)) => {
            let _entered = span.enter();
            let status = error.status().as_u16();
            if error.is_server_side() {
                tracing::warn!(status, code = error.code(), description = %error.description(), "request failed");
            } else {
                tracing::info!(status, code = error.code(), description = %error.description(), "request refused");
            }
            error.into_response()
        }
    };
    if let Some(hsts) = &live.config.server.hsts {
        if let Ok(value) = HeaderValue::from_str(hsts) {
            response
                .headers_mut()
                .insert(http::header::STRICT_TRANSPORT_SECURITY, value);
        }
    }
    shared.metrics.record(response.status(), started.elapsed());
    response
}

/// What a proxied request's log line says beyond method, path and peer.
#[derive(Default)]
struct Facts {
    route: Option<usize>,
    user: Option<Arc<str>>,
}

/// An endpoint the gateway answers itself rather than routing.
enum OwnEndpoint {
    Token,
    Authorize,
    Revoke,
    Introspect,
    Metadata,
    CovataRevoke,
    /// `PUT /api/v1/users/{user}/expire`.
    ExpireUser(String),
}

impl OwnEndpoint {
    fn of(path: &str) -> Option<OwnEndpoint> {
        Some(match path {
            "/api/oauth/token" => OwnEndpoint::Token,
            "/api/oauth/authorize" => OwnEndpoint::Authorize,
            "/api/oauth/revoke" => OwnEndpoint::Revoke,
            "/api/oauth/introspect" => OwnEndpoint::Introspect,
            "/.well-known/oauth-authorization-server" => OwnEndpoint::Metadata,
            "/api/v1/auth/token/revoke" => OwnEndpoint::CovataRevoke,
            path => {
                let user = path
                    .strip_prefix("/api/v1/users/")
                    .and_then(|rest| rest.strip_suffix("/expire"))
                    .filter(|user| !user.is_empty() && !user.contains('/'))?;
                OwnEndpoint::ExpireUser(user.to_owned())
            }
        })
    }
}

/// RFC 9112 §6.3: both framings at once is the classic smuggling probe. hyper lets
/// Transfer-Encoding win; refuse it outright instead, so it never reaches anyone.
fn refuse_double_framing(request: &Request<Incoming>) -> Result<(), Error> {
    let headers = request.headers();
    if headers.contains_key(http::header::TRANSFER_ENCODING)
        && headers.contains_key(http::header::CONTENT_LENGTH)
    {
        return Err(Error::InvalidRequest(
            "a request may not carry both Content-Length and Transfer-Encoding".into(),
        ));
    }
    Ok(())
}

async fn own_endpoint(
    endpoint: OwnEndpoint,
    shared: &Shared,
    live: &Live,
    request: Request<Incoming>,
    peer: &proxy::Peer,
) -> Result<Response<Body>, Error> {
    refuse_double_framing(&request)?;
    proxy::checked_host(&request)?;
    let client_ip = || {
        proxy::client_ip(
            request.headers(),
            peer.addr.ip(),
            &live.config.server.trusted_proxies,
        )
    };
    match endpoint {
        OwnEndpoint::Token => {
            let ip = client_ip();
            token::endpoint::handle(shared, live, request, ip).await
        }
        OwnEndpoint::Authorize => {
            let ip = client_ip();
            crate::authorize::handle(shared, live, request, ip).await
        }
        OwnEndpoint::Revoke => lifecycle::revoke(shared, live, request).await,
        OwnEndpoint::Introspect => lifecycle::introspect(shared, live, request).await,
        OwnEndpoint::Metadata => lifecycle::metadata(live, &request),
        OwnEndpoint::CovataRevoke => lifecycle::covata_revoke(shared, live, request).await,
        OwnEndpoint::ExpireUser(user) => lifecycle::expire_user(shared, live, request, &user).await,
    }
}

/// Routes, checks the token and forwards. `uri` is the request's own, cloned so the
/// normalised path may borrow from it while the request moves on.
async fn proxied(
    shared: &Shared,
    live: &Live,
    request: Request<Incoming>,
    uri: &http::Uri,
    peer: &proxy::Peer,
    facts: &mut Facts,
) -> Result<Response<Body>, Error> {
    refuse_double_framing(&request)?;
    let host = proxy::checked_host(&request)?;
    let path = normalize_path(uri.path())?;
    let route = live
        .routes
        .find(request.method(), host.as_ref().and_then(host_name), &path)
        .ok_or_else(|| Error::NotFound("no route matches this request".into()))?;
    facts.route = Some(route.index);
    if !route.keep_escaped_slashes && routes::has_escaped_slash(&path) {
        return Err(Error::InvalidRequest(
            "encoded slashes (%2F, %5C) are not accepted on this route".into(),
        ));
    }
    let identity = if route.public {
        None
    } else {
        let identity = auth::authorize(&shared.tokens, route, request.headers())?;
        facts.user.clone_from(&identity.username);
        Some(identity)
    };
    let origin = proxy::Origin {
        peer,
        trusted_proxies: &live.config.server.trusted_proxies,
    };
    proxy::forward(route, identity.as_deref(), host, request, &path, &origin).await
}

/// Marks the gateway as draining (`/readyz` answers 503).
pub(crate) fn set_draining(shared: &Shared) {
    shared.ready.store(false, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_name_drops_the_port() {
        let h = |s: &'static str| HeaderValue::from_static(s);
        assert_eq!(
            host_name(&h("api.example.com:8443")),
            Some("api.example.com")
        );
        assert_eq!(host_name(&h("api.example.com")), Some("api.example.com"));
        assert_eq!(host_name(&h("[::1]:8443")), Some("::1"));
        assert_eq!(host_name(&h("127.0.0.1")), Some("127.0.0.1"));
        assert_eq!(
            host_name(&h("api.example.com.:8443")),
            Some("api.example.com")
        );
        assert_eq!(host_name(&h("api.example.com.")), Some("api.example.com"));
    }
}
