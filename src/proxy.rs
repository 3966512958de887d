//! Forwarding to upstreams: the header rewrite, retries across addresses, upgrades,
//! and streaming.
//!
//! Both bodies stream: the request's `Incoming` is written to the upstream as it
//! arrives, and the upstream's body is read as the client takes it, so a 10 MiB chunk
//! of Covata's content service passes through without being held in memory.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{HeaderMap, Request, Response, StatusCode, Uri, Version};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::TokioIo;
use ipnet::IpNet;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use tokio::io::AsyncWriteExt;

use crate::body::{self, Body};
use crate::error::Error;
use crate::header_policy;
use crate::pool::{Partition, SendError};
use crate::routes::{Route, Target};
use crate::token::Identity;
use crate::upstream::{is_hop_by_hop, ResponseBody, WireError};

/// TLS settings for `https://` upstreams: the roots of `ca_file`, else the system's.
/// `needed` is false when no route uses https, so a machine without a CA bundle can
/// still run a gateway of plain-HTTP upstreams.
pub fn upstream_tls(ca_file: Option<&Path>, needed: bool) -> Result<rustls::ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| format!("{}: {e}", path.display()))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("{}: {e}", path.display()))?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(format!(
                    "{}: holds no usable CA certificate",
                    path.display()
                ));
            }
        }
        None if needed => {
            let native = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(native.certs);
            if roots.is_empty() {
                return Err("no system CA certificates found for https:// upstreams; set [upstream] ca_file".into());
            }
        }
        None => {}
    }
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// The body the gateway forwards: the client's, streamed, cut off past a route's
/// `max_request_body`.
pub struct RequestBody {
    inner: Option<Incoming>,
    remaining: Option<u64>,
}

impl RequestBody {
    fn new(incoming: Incoming, limit: Option<u64>) -> Self {
        RequestBody {
            inner: Some(incoming),
            remaining: limit,
        }
    }
}

/// The forwarded body passed the route's limit.
#[derive(Debug, thiserror::Error)]
#[error("the request body exceeds this route's limit")]
pub struct BodyTooLarge;

impl hyper::body::Body for RequestBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let Some(inner) = &mut this.inner else {
            return Poll::Ready(None);
        };
        match std::task::ready!(Pin::new(inner).poll_frame(cx)) {
            Some(Ok(frame)) => {
                if let (Some(remaining), Some(data)) = (&mut this.remaining, frame.data_ref()) {
                    let len = data.len() as u64;
                    if len > *remaining {
                        // Drain the rest so the client can read the 413 (see body::drain).
                        if let Some(rest) = this.inner.take() {
                            tokio::spawn(body::drain(rest));
                        }
                        return Poll::Ready(Some(Err(Box::new(BodyTooLarge))));
                    }
                    *remaining -= len;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(error)) => Poll::Ready(Some(Err(Box::new(error)))),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Incoming::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or(SizeHint::with_exact(0), Incoming::size_hint)
    }
}

/// Identity headers the gateway sets. Named once here: a `&str` name would be parsed
/// again on every insert.
static X_AUTHENTICATED_USER: HeaderName = HeaderName::from_static("x-authenticated-user");
static X_AUTHENTICATED_CLIENT: HeaderName = HeaderName::from_static("x-authenticated-client");
static X_AUTHENTICATED_ROLES: HeaderName = HeaderName::from_static("x-authenticated-roles");
static X_AUTHENTICATED_SCOPE: HeaderName = HeaderName::from_static("x-authenticated-scope");
static X_TOKEN_ID: HeaderName = HeaderName::from_static("x-token-id");
/// `X-Forwarded-*` headers the gateway sets.
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Whether a client's request header stops at the gateway whatever the route passes:
/// hop-by-hop headers, the gateway's own identity and `X-Forwarded-*` headers in any
/// spelling (and `Forwarded`, which would contradict them; see [`header_policy`]),
/// `Host` (the upstream gets its own authority; the client's is in
/// `X-Forwarded-Host`), `Expect` (hyper answers a 100-continue when the body is first
/// read, which the gateway does right after writing the upstream head; the upstream's
/// own 100 would only be skipped) and, unless the route forwards it, `Authorization`.
fn is_dropped_request_header(name: &HeaderName, forward_authorization: bool) -> bool {
    match name.as_str() {
        "host"
        | "expect"
        // The client's trailers stay behind (see upstream::Upload), so their
        // announcement does too.
        | "trailer" => true,
        "authorization" => !forward_authorization,
        name => is_hop_by_hop(name.as_bytes()) || header_policy::is_owned(name),
    }
}

/// The client's address as the gateway should believe it: the peer, unless the peer is
/// a trusted proxy, in which case the nearest untrusted address of `X-Forwarded-For`.
pub fn client_ip(headers: &HeaderMap, peer: IpAddr, trusted: &[IpNet]) -> IpAddr {
    if !trusted.iter().any(|net| net.contains(&peer)) {
        return peer;
    }
    let forwarded: Vec<IpAddr> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|a| a.trim().parse().ok())
        .collect();
    forwarded
        .into_iter()
        .rev()
        .find(|ip| !trusted.iter().any(|net| net.contains(ip)))
        .unwrap_or(peer)
}

/// A connection's TCP peer, with its `X-Forwarded-For` form made once per connection
/// rather than formatted on every request.
#[derive(Clone, Debug)]
pub struct Peer {
    /// The peer's address.
    pub addr: SocketAddr,
    header: HeaderValue,
}

impl Peer {
    /// The peer at `addr`.
    pub fn new(addr: SocketAddr) -> Self {
        // An IP address is always a valid header value; the fallback is never taken.
        let header = HeaderValue::try_from(addr.ip().to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        Peer { addr, header }
    }
}

/// What the header rewrite needs to know about the connection.
pub struct Origin<'a> {
    /// The TCP peer.
    pub peer: &'a Peer,
    /// `server.trusted_proxies`.
    pub trusted_proxies: &'a [IpNet],
}

/// The header rewrite of one request, applied as its head is written for the upstream
/// ([`HeaderRewrite::write`]): hop-by-hop headers, and anything the client could use to
/// spoof the gateway's own, stay behind; identity and `X-Forwarded-*` are added.
///
/// Written rather than applied to the client's header map: removing and inserting map
/// entries cost more than the rest of the rewrite together.
pub struct HeaderRewrite<'a> {
    forward_authorization: bool,
    /// Headers dropped by default that the route passes.
    pass: &'a [HeaderName],
    /// Whether the upstream connection may be kept for further requests.
    keepalive: bool,
    /// Names the client's `Connection` header lists: hop-by-hop by its say-so. Only
    /// those not dropped anyway: browsers send `keep-alive` on every request.
    connection_named: Vec<HeaderName>,
    /// Whether `Connection` lists `upgrade`.
    connection_upgrade: bool,
    identity: Option<&'a Identity>,
    /// `X-Forwarded-For` when a trusted proxy's chain is extended; else the peer's.
    chained_xff: Option<HeaderValue>,
    peer: &'a Peer,
    original_host: Option<HeaderValue>,
    /// The protocol an upgrade request asks for.
    upgrade: Option<HeaderValue>,
}

impl<'a> HeaderRewrite<'a> {
    /// The rewrite of a request with the client's `headers`, on `route`, from `origin`;
    /// `original_host` becomes `X-Forwarded-Host`.
    pub fn new(
        headers: &HeaderMap,
        original_host: Option<HeaderValue>,
        identity: Option<&'a Identity>,
        route: &'a Route,
        origin: &Origin<'a>,
    ) -> HeaderRewrite<'a> {
        let peer = origin.peer.addr.ip();
        let trusted = origin.trusted_proxies.iter().any(|net| net.contains(&peer));
        let chained_xff = if trusted {
            let joined: Vec<&str> = headers
                .get_all(&X_FORWARDED_FOR)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect();
            (!joined.is_empty())
                .then(|| HeaderValue::from_str(&format!("{}, {peer}", joined.join(", "))).ok())
                .flatten()
        } else {
            None
        };
        // On the bytes: one non-ASCII byte must not hide the names beside it. Names
        // dropped in any case (and `close`, no header) are not kept: nothing to look up
        // or allocate for the usual `Connection: keep-alive`.
        let mut connection_upgrade = false;
        let connection_named = headers
            .get_all(header::CONNECTION)
            .iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
            .map(<[u8]>::trim_ascii)
            .filter(|name| {
                connection_upgrade |= name.eq_ignore_ascii_case(b"upgrade");
                !crate::upstream::is_hop_by_hop(name) && !name.eq_ignore_ascii_case(b"close")
            })
            .filter_map(|name| HeaderName::from_bytes(name).ok())
            .collect();
        HeaderRewrite {
            forward_authorization: route.forward_authorization,
            pass: &route.pass_headers,
            keepalive: route.keepalive,
            connection_named,
            connection_upgrade,
            identity,
            chained_xff,
            peer: origin.peer,
            original_host,
            upgrade: None,
        }
    }

    /// Asks the upstream to switch to `protocol` (`Connection: upgrade`, `Upgrade`).
    pub fn upgrade(&mut self, protocol: HeaderValue) {
        self.upgrade = Some(protocol);
    }

    /// Whether the request asks the upstream to switch protocols.
    pub fn upgrades(&self) -> bool {
        self.upgrade.is_some()
    }

    /// Whether the upstream connection may carry further requests afterwards.
    pub fn keeps_alive(&self) -> bool {
        self.keepalive
    }

    /// Whether the client's header `name` stays behind.
    fn drops(&self, name: &HeaderName) -> bool {
        is_dropped_request_header(name, self.forward_authorization)
            || (header_policy::is_dropped_by_default(name.as_str()) && !self.pass.contains(name))
            || (!self.connection_named.is_empty() && self.connection_named.contains(name))
    }

    /// Writes the client's `headers` that go on (all but `Content-Length`, which the
    /// framing decides), then the gateway's own, as `name: value` lines. Returns whether
    /// the client sent a `Content-Length`.
    pub fn write(&self, headers: &HeaderMap, out: &mut BytesMut) -> bool {
        let mut declared_length = false;
        let mut cookies_written = false;
        for (name, value) in headers {
            if name == header::CONTENT_LENGTH {
                declared_length = true;
            } else if name == header::COOKIE {
                // HTTP/2 clients send each cookie as a field of its own (RFC 9113
                // §8.2.3); an HTTP/1.1 upstream expects one field, joined with "; ".
                if !cookies_written {
                    cookies_written = true;
                    write_cookies(out, headers);
                }
            } else if !self.drops(name) {
                put_header(out, name, value);
            }
        }
        // An upgrade's connection becomes a tunnel, never pooled either way.
        if !self.keepalive && self.upgrade.is_none() {
            out.extend_from_slice(b"connection: close\r\n");
        }
        if let Some(identity) = self.identity {
            if let Some(user) = &identity.user_header {
                put_header(out, &X_AUTHENTICATED_USER, user);
            }
            put_header(out, &X_AUTHENTICATED_CLIENT, &identity.client_header);
            put_header(out, &X_AUTHENTICATED_ROLES, &identity.roles_header);
            put_header(out, &X_AUTHENTICATED_SCOPE, &identity.scope_header);
            put_header(out, &X_TOKEN_ID, &identity.jti_header);
        }
        let xff = self.chained_xff.as_ref().unwrap_or(&self.peer.header);
        put_header(out, &X_FORWARDED_FOR, xff);
        out.extend_from_slice(b"x-forwarded-proto: https\r\n");
        if let Some(host) = &self.original_host {
            put_header(out, &X_FORWARDED_HOST, host);
        }
        if let Some(protocol) = &self.upgrade {
            out.extend_from_slice(b"connection: upgrade\r\n");
            put_header(out, &header::UPGRADE, protocol);
        }
        declared_length
    }
}

/// Writes the request's cookies as one `cookie` line.
fn write_cookies(out: &mut BytesMut, headers: &HeaderMap) {
    out.extend_from_slice(b"cookie: ");
    for (i, value) in headers.get_all(header::COOKIE).iter().enumerate() {
        if i > 0 {
            out.extend_from_slice(b"; ");
        }
        out.extend_from_slice(value.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
}

/// Writes one `name: value` header line.
pub fn put_header(out: &mut BytesMut, name: &HeaderName, value: &HeaderValue) {
    out.extend_from_slice(name.as_str().as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// The Host the client addressed: `Host` on HTTP/1, `:authority` on HTTP/2.
pub fn request_host<B>(request: &Request<B>) -> Option<HeaderValue> {
    request.headers().get(header::HOST).cloned().or_else(|| {
        request
            .uri()
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    })
}

/// The Host the client addressed, checked as RFC 9112 §3.2 and RFC 9113 §8.3.1 ask:
/// at most one `Host`, a valid authority without user information, required on
/// HTTP/1.1, and the same as the target's authority when both are given (an
/// absolute-form target, or HTTP/2's `:authority`), so that the gateway and an upstream
/// can never disagree on which host a request is for.
pub fn checked_host<B>(request: &Request<B>) -> Result<Option<HeaderValue>, Error> {
    let bad = |why: &'static str| Err(Error::InvalidRequest(why.into()));
    let mut hosts = request.headers().get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return bad("a request may carry only one Host header");
    }
    // RFC 9110 §7.2 and RFC 9113 §8.3.1: a host and optional port, no userinfo.
    let is_host = |a: &http::uri::Authority| !a.as_str().contains('@') && !a.host().is_empty();
    let authority = request.uri().authority();
    if authority.is_some_and(|a| !is_host(a)) {
        return bad("the request target's authority is not a valid host");
    }
    match (host, authority) {
        (Some(host), authority) => {
            let valid = http::uri::Authority::try_from(host.as_bytes()).is_ok_and(|a| is_host(&a));
            if !valid {
                return bad("the Host header is not a valid host");
            }
            if authority.is_some_and(|a| {
                !a.as_str()
                    .eq_ignore_ascii_case(host.to_str().unwrap_or_default())
            }) {
                return bad("the Host header differs from the request target's authority");
            }
            Ok(Some(host.clone()))
        }
        (None, Some(authority)) => Ok(HeaderValue::from_str(authority.as_str()).ok()),
        (None, None) if request.version() == Version::HTTP_11 => {
            bad("an HTTP/1.1 request needs a Host header")
        }
        (None, None) => Ok(None),
    }
}

/// The origin-form target (`/path?query`) sent to an upstream address. When the path
/// reaches the upstream exactly as the client sent it, the client's path-and-query is
/// reused (a reference-counted clone) rather than formatted and parsed again.
fn upstream_uri(
    target: &crate::config::UpstreamUrl,
    path: &str,
    original: Option<&PathAndQuery>,
) -> Result<Uri, Error> {
    let prefix = &target.prefix;
    let path_and_query = match original {
        Some(original) if prefix.is_empty() && original.path() == path => original.clone(),
        _ => {
            let text = match original.and_then(PathAndQuery::query) {
                Some(query) => format!("{prefix}{path}?{query}"),
                None => format!("{prefix}{path}"),
            };
            PathAndQuery::try_from(text).map_err(|_| {
                Error::InvalidRequest("the request target cannot be forwarded".into())
            })?
        }
    };
    Ok(Uri::from(path_and_query))
}

/// The gateway's error for a failed connect: 504 when the connect deadline passed,
/// else 502.
fn connect_failed(error: &std::io::Error, route: &Route) -> Error {
    if error.kind() == std::io::ErrorKind::TimedOut {
        return Error::GatewayTimeout(
            format!(
                "the upstream did not accept a connection within {:?}",
                route.connect_timeout
            )
            .into(),
        );
    }
    Error::BadGateway("the upstream is unreachable".into())
}

/// The gateway's error for a failed exchange: the client's own body is the client's
/// fault (413 past the route's limit, 400 when it is malformed or ends early); anything
/// else is the upstream's (504 for a connect deadline on a retry, else 502).
fn exchange_failed(error: &WireError, route: &Route) -> Error {
    match error {
        WireError::Body(cause) if cause.is::<BodyTooLarge>() => {
            too_large(route.max_request_body.unwrap_or_default())
        }
        WireError::Body(cause) => {
            Error::InvalidRequest(format!("the request body could not be read: {cause}").into())
        }
        WireError::Io(io) if io.kind() == std::io::ErrorKind::TimedOut => connect_failed(io, route),
        _ => Error::BadGateway("the upstream failed to answer".into()),
    }
}

enum Failure {
    /// No connection; the request was not sent and comes back whole.
    Connect(std::io::Error, Box<Request<RequestBody>>),
    Other(WireError),
    TimedOut,
}

async fn send(
    route: &Route,
    target: &Target,
    request: Request<RequestBody>,
    rewrite: &HeaderRewrite<'_>,
    deadline: tokio::time::Instant,
    partition: Option<&Partition>,
) -> Result<Response<ResponseBody>, Failure> {
    // response_timeout also bounds a stall of the upload after an early answer.
    let stall = route.response_timeout;
    let sent = target
        .pool
        .send(request, rewrite, stall, partition.cloned());
    match tokio::time::timeout_at(deadline, sent).await {
        Err(_) => Err(Failure::TimedOut),
        Ok(Err(SendError::Connect(error, request))) => Err(Failure::Connect(error, request)),
        Ok(Err(SendError::Request(error))) => Err(Failure::Other(error)),
        Ok(Ok(response)) => Ok(response),
    }
}

/// The protocol an HTTP/1.1 request asks to switch to, when it is WebSocket:
/// `Connection: upgrade` (among the names `rewrite` found there) and
/// `Upgrade: websocket`.
fn upgrade_requested<B>(request: &Request<B>, rewrite: &HeaderRewrite<'_>) -> Option<HeaderValue> {
    if request.version() != Version::HTTP_11 {
        return None;
    }
    let connection_upgrade = rewrite.connection_upgrade;
    // WebSocket only. After a 101 the connection is a tunnel no request on it is checked
    // in; an `h2c` upgrade would let the client send the upstream any HTTP/2 request,
    // with any path and identity headers ("h2c smuggling"). Other upgrades go on as
    // plain requests, their Upgrade header dropped like any hop-by-hop header.
    connection_upgrade
        .then(|| request.headers().get(header::UPGRADE).cloned())
        .flatten()
        .filter(|protocol| protocol.as_bytes().eq_ignore_ascii_case(b"websocket"))
}

fn too_large(limit: u64) -> Error {
    Error::PayloadTooLarge(
        format!("the request body exceeds this route's limit of {limit} bytes").into(),
    )
}

/// Forwards a request to its route's upstream and streams the answer back.
/// `original_host` is the Host the client addressed ([`request_host`]), passed on as
/// `X-Forwarded-Host`.
///
/// An `Upgrade` request is forwarded with its `Upgrade` header; only when the upstream
/// answers 101 do the two connections become a byte tunnel. Any other answer is an
/// ordinary response and the client's connection stays HTTP (so a refused upgrade can
/// never smuggle bytes past the gateway).
pub async fn forward(
    route: &Route,
    identity: Option<&Identity>,
    original_host: Option<HeaderValue>,
    mut request: Request<Incoming>,
    path: &str,
    origin: &Origin<'_>,
) -> Result<Response<Body>, Error> {
    if let Some(limit) = route.max_request_body {
        let declared = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit) {
            body::drain(request.into_body()).await;
            return Err(too_large(limit));
        }
    }
    let mut rewrite = HeaderRewrite::new(request.headers(), original_host, identity, route, origin);
    let upgrade = upgrade_requested(&request, &rewrite);
    let client_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut request));
    if let Some(protocol) = &upgrade {
        rewrite.upgrade(protocol.clone());
    }
    let (parts, incoming) = request.into_parts();
    let path = route.rewrite(path);
    let original = parts.uri.path_and_query();
    let mut forwarded = Request::new(RequestBody::new(incoming, route.max_request_body));
    *forwarded.method_mut() = parts.method;
    *forwarded.headers_mut() = parts.headers;

    let partition = route.partitioned.then(|| match identity {
        Some(identity) => Partition::Principal {
            user: identity.username.clone(),
            client: identity.client_id.clone(),
        },
        None => Partition::Address(client_ip(
            forwarded.headers(),
            origin.peer.addr.ip(),
            origin.trusted_proxies,
        )),
    });
    let deadline = tokio::time::Instant::now() + route.response_timeout;
    let target = route.pick(None);
    *forwarded.uri_mut() = upstream_uri(&route.targets[target].url, &path, original)?;
    let mut outcome = send(
        route,
        &route.targets[target],
        forwarded,
        &rewrite,
        deadline,
        partition.as_ref(),
    )
    .await;
    if let Err(Failure::Connect(error, mut unsent)) = outcome {
        route.targets[target].mark_down(route.cooldown);
        outcome = if route.targets.len() > 1 {
            let next = route.pick(Some(target));
            tracing::debug!(
                route = route.index,
                failed = %route.targets[target].url,
                next = %route.targets[next].url,
                "upstream connect failed before the request was sent; retrying on the next address"
            );
            *unsent.uri_mut() = upstream_uri(&route.targets[next].url, &path, original)?;
            let retried = send(
                route,
                &route.targets[next],
                *unsent,
                &rewrite,
                deadline,
                partition.as_ref(),
            )
            .await;
            if let Err(Failure::Connect(_, _)) = &retried {
                route.targets[next].mark_down(route.cooldown);
            }
            retried
        } else {
            Err(Failure::Connect(error, unsent))
        };
    }
    let response = outcome.map_err(|failure| match failure {
        Failure::Connect(error, _) => connect_failed(&error, route),
        Failure::Other(error) => exchange_failed(&error, route),
        Failure::TimedOut => Error::GatewayTimeout(
            format!(
                "the upstream did not answer within {:?}",
                route.response_timeout
            )
            .into(),
        ),
    })?;

    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        // The wire layer accepts a 101 only for a request that asked to upgrade.
        let (Some(client_upgrade), Some(protocol)) = (client_upgrade, upgrade) else {
            return Err(Error::BadGateway(
                "the upstream switched protocols unasked".into(),
            ));
        };
        let (mut parts, upstream) = response.into_parts();
        let Some((mut upstream_io, early)) = upstream.into_upgraded() else {
            return Err(Error::BadGateway("the upstream connection is gone".into()));
        };
        tokio::spawn(async move {
            match client_upgrade.await {
                Ok(client_io) => {
                    let mut client_io = TokioIo::new(client_io);
                    // Bytes the upstream sent right behind its 101 belong to the tunnel.
                    let copied = async {
                        client_io.write_all(&early).await?;
                        tokio::io::copy_bidirectional(&mut client_io, &mut upstream_io).await
                    };
                    if let Err(error) = copied.await {
                        tracing::debug!(%error, "upgraded connection ended with an error");
                    }
                }
                Err(error) => tracing::debug!(%error, "protocol switch failed"),
            }
        });
        // Only `websocket` is asked for, so only it can have been switched to.
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(header::UPGRADE, protocol);
        return Ok(Response::from_parts(parts, body::empty()));
    }

    // The wire layer has dropped the hop-by-hop headers already.
    let (parts, upstream) = response.into_parts();
    Ok(Response::from_parts(parts, body::streamed(upstream)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rewrite_drops_spoofed_and_hop_by_hop_headers_and_sets_its_own() {
        let tls = upstream_tls(None, false).unwrap();
        let config = crate::config::Config::parse(
            "[[routes]]\npath = \"/keep/**\"\nupstream = \"http://127.0.0.1:1\"\n\
             forward_authorization = true\n\
             [[routes]]\npath = \"/**\"\nupstream = \"http://127.0.0.1:1\"\n",
            Path::new("test.toml"),
        )
        .unwrap();
        let table = crate::routes::RouteTable::new(&config.routes, &config.upstream, &tls);
        let find = |path| table.find(&http::Method::GET, None, path).unwrap();
        let client_headers = || {
            let mut headers = HeaderMap::new();
            for (k, v) in [
                ("host", "api.example.com"),
                ("authorization", "Bearer secret"),
                ("connection", "keep-alive, X-Private,close , Upgrade"),
                ("x-private", "1"),
                ("expect", "100-continue"),
                ("x-authenticated-user", "spoofed"),
                ("x-token-id", "spoofed"),
                ("forwarded", "for=6.6.6.6"),
                ("x-forwarded-for", "6.6.6.6"),
                ("x-forwarded-proto", "http"),
                ("accept", "*/*"),
            ] {
                headers.append(HeaderName::from_static(k), HeaderValue::from_static(v));
            }
            headers
        };
        let peer = Peer::new("203.0.113.7:50000".parse().unwrap());
        let host = Some(HeaderValue::from_static("api.example.com"));

        // The header lines written for the upstream, as a map.
        let written = |rewrite: HeaderRewrite<'_>| {
            let mut out = BytesMut::new();
            rewrite.write(&client_headers(), &mut out);
            let text = String::from_utf8(out.to_vec()).unwrap();
            let mut headers = HeaderMap::new();
            for line in text.split_terminator("\r\n") {
                let (name, value) = line.split_once(": ").unwrap();
                headers.append(
                    HeaderName::from_bytes(name.as_bytes()).unwrap(),
                    HeaderValue::from_str(value).unwrap(),
                );
            }
            headers
        };
        let untrusted = Origin {
            peer: &peer,
            trusted_proxies: &[],
        };
        let rewrite = HeaderRewrite::new(
            &client_headers(),
            host.clone(),
            None,
            find("/x"),
            &untrusted,
        );
        // Of the names Connection lists, only those not dropped anyway are kept.
        assert_eq!(
            rewrite.connection_named,
            [HeaderName::from_static("x-private")]
        );
        assert!(rewrite.connection_upgrade);
        let headers = written(rewrite);
        let mut names: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            [
                "accept",
                "x-forwarded-for",
                "x-forwarded-host",
                "x-forwarded-proto"
            ]
        );
        assert_eq!(headers["x-forwarded-for"], "203.0.113.7");
        assert_eq!(headers["x-forwarded-proto"], "https");
        assert_eq!(headers["x-forwarded-host"], "api.example.com");

        // A route that forwards Authorization keeps it; a trusted peer's chain is kept
        // and extended.
        let trusted_proxies: Vec<IpNet> = vec!["203.0.113.0/24".parse().unwrap()];
        let trusted = Origin {
            peer: &peer,
            trusted_proxies: &trusted_proxies,
        };
        let rewrite = HeaderRewrite::new(&client_headers(), host, None, find("/keep/x"), &trusted);
        let headers = written(rewrite);
        assert_eq!(headers["authorization"], "Bearer secret");
        assert_eq!(headers["x-forwarded-for"], "6.6.6.6, 203.0.113.7");
        assert!(!headers.contains_key("x-authenticated-user"));
        assert!(!headers.contains_key("x-private"));
    }

    #[test]
    fn upstream_targets_keep_the_query_and_add_the_prefix() {
        let plain = crate::config::UpstreamUrl::parse("http://127.0.0.1:8081").unwrap();
        let prefixed = crate::config::UpstreamUrl::parse("https://svc:9443/base").unwrap();
        let original = PathAndQuery::from_static("/a/%62?x=1&y");
        let uri = |target, path, original| upstream_uri(target, path, original).unwrap();
        // Unchanged path: the client's own target goes on, byte for byte.
        assert_eq!(
            uri(&plain, "/a/%62", Some(&original)).to_string(),
            "/a/%62?x=1&y"
        );
        // A normalised or rewritten path replaces the client's, the query stays.
        assert_eq!(
            uri(&plain, "/a/b", Some(&original)).to_string(),
            "/a/b?x=1&y"
        );
        assert_eq!(
            uri(&prefixed, "/a/%62", Some(&original)).to_string(),
            "/base/a/%62?x=1&y"
        );
        assert_eq!(uri(&prefixed, "/", None).to_string(), "/base/");
    }

    #[test]
    fn client_ip_trusts_only_trusted_proxies() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-forwarded-for",
            HeaderValue::from_static("1.2.3.4, 10.0.0.7"),
        );
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let proxy: IpAddr = [10, 0, 0, 1].into();
        let stranger: IpAddr = [8, 8, 8, 8].into();
        assert_eq!(
            client_ip(&headers, proxy, &trusted),
            IpAddr::from([1, 2, 3, 4])
        );
        assert_eq!(client_ip(&headers, stranger, &trusted), stranger);
        assert_eq!(client_ip(&HeaderMap::new(), proxy, &trusted), proxy);
    }
}
