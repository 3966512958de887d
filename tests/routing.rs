//! Routing (SPEC §2.1) and upstream selection: first match in file order across the
//! route trie, public/role/scope checks per route, `methods` and `host` matching,
//! `strip_prefix`/`add_prefix`, round-robin over several addresses, the one retry on
//! the next address when a connection fails before the body was sent, the passive
//! health cool-down, and `check-config`'s warning about shadowed routes.
//!
//! Two real upstreams of this file's own (`Named`) answer JSON naming themselves, so a
//! test can tell which one a request reached.

mod common;
use common::*;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use reqwest::Version;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;

// ---------------------------------------------------------------------------------------
// A named upstream

/// An upstream that answers every request with JSON naming itself and describing what it
/// received: `{"upstream", "method", "path", "query", "headers", "body_len",
/// "body_sha256"}`; it counts the requests it answered.
struct Named {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    _task: Task,
}

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

async fn named_answer(
    name: &'static str,
    hits: Arc<AtomicUsize>,
    request: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let (parts, body) = request.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let mut headers = serde_json::Map::new();
    for (header, value) in &parts.headers {
        headers.insert(
            header.as_str().to_owned(),
            Value::String(value.to_str().unwrap_or("<binary>").to_owned()),
        );
    }
    let seen = serde_json::json!({
        "upstream": name,
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "query": parts.uri.query(),
        "headers": headers,
        "body_len": body.len(),
        "body_sha256": sha256_hex(&body),
    });
    // Counted once the whole request (body included) arrived.
    hits.fetch_add(1, Ordering::SeqCst);
    let mut response = Response::new(Full::new(Bytes::from(seen.to_string())));
    response
        .headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    response
}

impl Named {
    async fn start(name: &'static str) -> Named {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Named::serve(name, listener)
    }

    fn serve(name: &'static str, listener: TcpListener) -> Named {
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let counter = hits.clone();
        let task = accept_loop(listener, move |stream| {
            let counter = counter.clone();
            async move {
                let service = service_fn(move |r| {
                    let counter = counter.clone();
                    async move { Ok::<_, Infallible>(named_answer(name, counter, r).await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            }
        });
        Named {
            addr,
            hits,
            _task: task,
        }
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

/// An address on 127.0.0.1 that refuses connections: a socket bound to a port picked by
/// the system but not listening. Holding the socket keeps the port reserved, so no
/// listener of a test running alongside can take it over while it is meant to be dead
/// (which a bound-noted-dropped port cannot promise).
struct Dead {
    socket: tokio::net::TcpSocket,
    addr: SocketAddr,
}

impl Dead {
    fn new() -> Dead {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
        let addr = socket.local_addr().unwrap();
        Dead { socket, addr }
    }

    /// Brings the address to life: a named upstream now listens on it.
    fn revive(self, name: &'static str) -> Named {
        Named::serve(name, self.socket.listen(1024).unwrap())
    }
}

/// `n` distinct dead addresses.
fn dead_addrs(n: usize) -> Vec<Dead> {
    (0..n).map(|_| Dead::new()).collect()
}

// ---------------------------------------------------------------------------------------
// Helpers

/// A gateway on the standard configuration whose `/api/v1/**` catch-all (and the
/// harness's own routes) go to `catch_all`.
async fn gateway(catch_all: &Named, before_routes: &str, routes: &str) -> TestGateway {
    let text = config_text(catch_all.addr, before_routes, routes);
    TestGateway::start_text(Upstream::start().await, &text).await
}

/// A `[[routes]]` entry: `path`, `upstream` and any further `key = value` lines.
fn route(path: &str, upstream: &str, more: &str) -> String {
    format!("\n[[routes]]\npath = \"{path}\"\nupstream = {upstream}\n{more}\n")
}

fn url(addr: SocketAddr) -> String {
    format!("\"http://{addr}\"")
}

fn urls(addrs: &[SocketAddr]) -> String {
    let list: Vec<String> = addrs.iter().map(|a| url(*a)).collect();
    format!("[{}]", list.join(", "))
}

/// The named upstream's answer: the request must have been answered 200 by one of them.
async fn reached(response: reqwest::Response, what: &str) -> Value {
    let status = response.status();
    let text = response.text().await.unwrap();
    assert_eq!(status, 200, "{what}: {text}");
    let body: Value =
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("{what}: not JSON: {text}"));
    assert!(
        body["upstream"].is_string(),
        "{what}: not a named upstream's answer: {body}"
    );
    body
}

fn who(seen: &Value) -> &str {
    seen["upstream"].as_str().unwrap()
}

/// `n` bytes that differ from request to request (`seed`).
fn payload(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

// ---------------------------------------------------------------------------------------
// 1. Content service vs access service, first match in file order

/// The shipped configuration's split between Covata's two services.
fn content_service_routes(b: SocketAddr) -> String {
    [
        route("/api/v1/objects/*/contents/**", &url(b), ""),
        route("/api/v1/objects/*/view", &url(b), ""),
        route("/api/v1/versions/**", &url(b), ""),
    ]
    .concat()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_and_access_service_paths_reach_their_own_upstream() {
    let a = Named::start("A").await;
    let b = Named::start("B").await;
    let gw = gateway(&a, "", &content_service_routes(b.addr)).await;
    let token = gw.alex_token().await;

    let cases = [
        ("/api/v1/objects/42/contents", "B"),
        ("/api/v1/objects/42/contents/", "B"),
        ("/api/v1/objects/42/contents/a/b", "B"),
        ("/api/v1/objects/contents/contents", "B"),
        ("/api/v1/objects/42/view", "B"),
        ("/api/v1/versions", "B"),
        ("/api/v1/versions/9/contents", "B"),
        ("/api/v1/objects/42", "A"),
        ("/api/v1/objects/42/view/x", "A"),
        // One trailing slash names the same resource (as upstream routers read it).
        ("/api/v1/objects/42/view/", "B"),
        ("/api/v1/objects/42/views", "A"),
        ("/api/v1/objects/42/43/contents", "A"),
        ("/api/v1/objects/42/content", "A"),
        ("/api/v1/objects", "A"),
        ("/api/v1/versionsx/1", "A"),
        ("/api/v1/contents/1", "A"),
        ("/api/v1", "A"),
    ];
    for (client, version) in [(&gw.http1, Version::HTTP_11), (&gw.http2, Version::HTTP_2)] {
        for (path, expected) in cases {
            let response = gw.bearer_get(client, &format!("{path}?x=1"), &token).await;
            assert_eq!(response.version(), version);
            let seen = reached(response, path).await;
            assert_eq!(who(&seen), expected, "{path} ({version:?}): {seen}");
            assert_eq!(seen["path"], path, "the path is forwarded as it is");
            assert_eq!(seen["query"], "x=1");
            assert_eq!(seen["headers"]["x-authenticated-user"], ALEX.0);
        }
    }
    let per_protocol = cases.iter().filter(|(_, u)| *u == "B").count();
    assert_eq!(b.hits(), 2 * per_protocol);
    assert_eq!(a.hits(), 2 * (cases.len() - per_protocol));

    // Outside every route: 404 JSON from the gateway, nothing forwarded.
    let response = gw
        .bearer_get(&gw.http1, "/api/v2/objects/42/contents", &token)
        .await;
    expect_error(response, 404, "not_found").await;
    assert_eq!(a.hits() + b.hits(), 2 * cases.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_route_in_file_order_wins_across_trie_branches() {
    let a = Named::start("A").await;
    let b = Named::start("B").await;
    let routes = [
        // A general route before a more specific one: the general one wins.
        route("/api/v1/first/**", &url(a.addr), ""),
        route("/api/v1/first/x", &url(b.addr), ""),
        // A `*` route before a literal one: found on another branch, still first.
        route("/api/v1/order/*/x", &url(b.addr), ""),
        route("/api/v1/order/lit/x", &url(a.addr), ""),
        // A literal route before a `*` route and a `**` route.
        route("/api/v1/turn/lit/x", &url(a.addr), ""),
        route("/api/v1/turn/*/x", &url(b.addr), ""),
        route("/api/v1/turn/**", &url(a.addr), ""),
        // An exact route before a `**` that also takes it, and deeper paths.
        route("/api/v1/deep/a/b", &url(b.addr), ""),
        route("/api/v1/deep/**", &url(a.addr), ""),
    ]
    .concat();
    let gw = gateway(&a, "", &routes).await;
    let token = gw.alex_token().await;
    for (path, expected) in [
        ("/api/v1/first/x", "A"),
        ("/api/v1/order/lit/x", "B"),
        ("/api/v1/order/other/x", "B"),
        ("/api/v1/turn/lit/x", "A"),
        ("/api/v1/turn/other/x", "B"),
        ("/api/v1/turn/other/y", "A"),
        ("/api/v1/deep/a/b", "B"),
        ("/api/v1/deep/a/b/c", "A"),
        ("/api/v1/deep/a", "A"),
    ] {
        let response = gw.bearer_get(&gw.http1, path, &token).await;
        let seen = reached(response, path).await;
        assert_eq!(who(&seen), expected, "{path}: {seen}");
    }
}

// ---------------------------------------------------------------------------------------
// 2. Public routes

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_public_route_needs_no_token_but_only_for_its_methods_and_path() {
    let a = Named::start("A").await;
    let gw = gateway(&a, "", "").await;

    let response = gw.http1.get(gw.url("/api/v1/config")).send().await.unwrap();
    let seen = reached(response, "public GET").await;
    assert_eq!(who(&seen), "A");
    assert_eq!(seen["path"], "/api/v1/config");
    assert!(
        seen["headers"].get("x-authenticated-user").is_none()
            && seen["headers"].get("x-token-id").is_none(),
        "no identity on a public request: {seen}"
    );
    assert_eq!(a.hits(), 1);

    // POST is not in the public route's methods: it falls through to the catch-all,
    // which wants a token.
    for (method, path) in [
        (reqwest::Method::POST, "/api/v1/config"),
        (reqwest::Method::DELETE, "/api/v1/config"),
        (reqwest::Method::GET, "/api/v1/config/secret"),
    ] {
        let response = gw
            .http1
            .request(method.clone(), gw.url(path))
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(
            challenge(response.headers()),
            "Bearer realm=\"covata-gateway\"",
            "{method} {path}"
        );
        expect_error(response, 401, "unauthorized").await;
    }
    assert_eq!(a.hits(), 1, "nothing without a token reached the upstream");

    // With a token, the POST goes through.
    let token = gw.alex_token().await;
    let response = gw
        .http2
        .post(gw.url("/api/v1/config"))
        .bearer_auth(&token)
        .body("{}")
        .send()
        .await
        .unwrap();
    let seen = reached(response, "POST with token").await;
    assert_eq!(seen["method"], "POST");
    assert_eq!(seen["headers"]["x-authenticated-user"], ALEX.0);
}

// ---------------------------------------------------------------------------------------
// 3. Roles and scopes

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn role_and_scope_limited_routes() {
    let a = Named::start("A").await;
    let b = Named::start("B").await;
    let routes = [
        route(
            "/api/v1/clientapps/**",
            &url(b.addr),
            "roles = [\"ROLE_SYSTEM_ADMIN\"]",
        ),
        route("/api/v1/writes/**", &url(b.addr), "scopes = [\"write\"]"),
    ]
    .concat();
    let gw = gateway(&a, "", &routes).await;
    let alex = gw.alex_token().await;
    let admin = gw.access_token(ADMIN).await;

    // Zero rest segments are inside the route too: no falling through to the catch-all.
    for path in ["/api/v1/clientapps", "/api/v1/clientapps/exampleApp"] {
        let response = gw.bearer_get(&gw.http1, path, &alex).await;
        let www = challenge(response.headers());
        assert!(
            www.starts_with("Bearer realm=\"covata-gateway\"")
                && www.contains("error=\"insufficient_scope\""),
            "{path}: WWW-Authenticate {www:?}"
        );
        expect_error(response, 403, "insufficient_scope").await;
    }
    assert_eq!(a.hits() + b.hits(), 0, "a refused request is not forwarded");

    let response = gw
        .bearer_get(&gw.http2, "/api/v1/clientapps/exampleApp", &admin)
        .await;
    let seen = reached(response, "admin").await;
    assert_eq!(who(&seen), "B");
    assert_eq!(seen["headers"]["x-authenticated-user"], ADMIN.0);
    assert_eq!(
        seen["headers"]["x-authenticated-roles"],
        "ROLE_SYSTEM_ADMIN"
    );
    assert_eq!(b.hits(), 1);

    // scopes = ["write"]: "read" is not enough, "read write" is.
    let read = gw.token_with_scope(ALEX, "read").await;
    let read_write = gw.token_with_scope(ALEX, "read write").await;
    let response = gw
        .http1
        .put(gw.url("/api/v1/writes/1"))
        .bearer_auth(&read)
        .body("x")
        .send()
        .await
        .unwrap();
    assert!(challenge(response.headers()).contains("error=\"insufficient_scope\""));
    expect_error(response, 403, "insufficient_scope").await;
    assert_eq!(b.hits(), 1);
    let response = gw
        .http1
        .put(gw.url("/api/v1/writes/1"))
        .bearer_auth(&read_write)
        .body("x")
        .send()
        .await
        .unwrap();
    let seen = reached(response, "read write").await;
    assert_eq!(who(&seen), "B");
    assert_eq!(seen["method"], "PUT");
    assert_eq!(seen["headers"]["x-authenticated-scope"], "read write");
    assert_eq!(b.hits(), 2);
    assert_eq!(a.hits(), 0);
}

// ---------------------------------------------------------------------------------------
// 4. methods

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_methods_limited_route_takes_only_its_methods() {
    let a = Named::start("A").await;
    let b = Named::start("B").await;
    let routes = route(
        "/api/v1/items/**",
        &url(b.addr),
        "methods = [\"GET\", \"PUT\"]",
    );
    let gw = gateway(&a, "", &routes).await;
    let token = gw.alex_token().await;
    for (method, expected) in [
        (reqwest::Method::GET, "B"),
        (reqwest::Method::PUT, "B"),
        (reqwest::Method::DELETE, "A"),
        (reqwest::Method::POST, "A"),
        (reqwest::Method::PATCH, "A"),
    ] {
        for client in [&gw.http1, &gw.http2] {
            let response = client
                .request(method.clone(), gw.url("/api/v1/items/7"))
                .bearer_auth(&token)
                .send()
                .await
                .unwrap();
            let seen = reached(response, method.as_str()).await;
            assert_eq!(who(&seen), expected, "{method}: {seen}");
            assert_eq!(seen["method"], method.as_str());
        }
    }
    assert_eq!(b.hits(), 4);
    assert_eq!(a.hits(), 6);
}

// ---------------------------------------------------------------------------------------
// 5. host

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_limited_route_matches_the_host_without_its_port() {
    let a = Named::start("A").await;
    let b = Named::start("B").await;
    let routes = route("/api/v1/**", &url(b.addr), "host = \"content.example\"");
    let gw = gateway(&a, "", &routes).await;
    let token = gw.alex_token().await;

    // HTTP/1.1 with the Host header set explicitly.
    for (host, expected) in [
        (Some("content.example:8443"), "B"),
        (Some("content.example"), "B"),
        (Some("CONTENT.Example:8443"), "B"),
        (None, "A"),
        (Some("other.example:8443"), "A"),
        (Some("content.example.evil:8443"), "A"),
        (Some("www.content.example"), "A"),
    ] {
        let mut request = gw
            .http1
            .get(gw.url("/api/v1/objects/1"))
            .bearer_auth(&token);
        if let Some(host) = host {
            request = request.header("host", host);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.version(), Version::HTTP_11);
        let seen = reached(response, &format!("Host {host:?}")).await;
        assert_eq!(who(&seen), expected, "Host {host:?}: {seen}");
        if let Some(host) = host {
            assert_eq!(seen["headers"]["x-forwarded-host"], host);
        }
    }
    assert_eq!(b.hits(), 3);
    assert_eq!(a.hits(), 4);

    // HTTP/2 addressing content.example (the :authority): reqwest connects to the
    // gateway for that name. The certificate is for 127.0.0.1/localhost only, so this
    // one client accepts any certificate.
    let h2 = reqwest::Client::builder()
        .use_rustls_tls()
        .danger_accept_invalid_certs(true)
        .http2_prior_knowledge()
        .resolve("content.example", gw.addr)
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let response = h2
        .get(format!(
            "https://content.example:{}/api/v1/objects/1",
            gw.addr.port()
        ))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.version(), Version::HTTP_2);
    let seen = reached(response, "h2 content.example").await;
    assert_eq!(who(&seen), "B", "{seen}");
    assert_eq!(b.hits(), 4);
    let response = gw.bearer_get(&gw.http2, "/api/v1/objects/1", &token).await;
    assert_eq!(who(&reached(response, "h2 127.0.0.1").await), "A");
}

// ---------------------------------------------------------------------------------------
// 6. strip_prefix / add_prefix

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strip_prefix_and_add_prefix_rewrite_the_forwarded_path() {
    let a = Named::start("A").await;
    let b = Named::start("B").await;
    let routes = [
        route(
            "/legacy/**",
            &url(b.addr),
            "strip_prefix = \"/legacy\"\nadd_prefix = \"/api/v2\"",
        ),
        route("/strip/**", &url(b.addr), "strip_prefix = \"/strip\""),
        route("/api/v1/add/**", &url(b.addr), "add_prefix = \"/base\""),
        route(
            "/prefixed/**",
            &format!("\"http://{}/svc\"", b.addr),
            "strip_prefix = \"/prefixed\"",
        ),
    ]
    .concat();
    let gw = gateway(&a, "", &routes).await;
    let token = gw.alex_token().await;
    for (target, path, query) in [
        (
            "/legacy/rest/of/path?q=1",
            "/api/v2/rest/of/path",
            Some("q=1"),
        ),
        ("/legacy", "/api/v2/", None),
        ("/legacy/", "/api/v2/", None),
        ("/legacy/legacy/x", "/api/v2/legacy/x", None),
        ("/strip/a/b?z=%2F", "/a/b", Some("z=%2F")),
        ("/strip", "/", None),
        ("/api/v1/add/x", "/base/api/v1/add/x", None),
        ("/prefixed/x", "/svc/x", None),
        ("/prefixed", "/svc/", None),
    ] {
        let response = gw.bearer_get(&gw.http1, target, &token).await;
        let seen = reached(response, target).await;
        assert_eq!(who(&seen), "B", "{target}: {seen}");
        assert_eq!(seen["path"], path, "{target}: {seen}");
        assert_eq!(seen["query"].as_str(), query, "{target}: {seen}");
    }
    // A route without rewrite keys forwards the path untouched.
    let response = gw.bearer_get(&gw.http1, "/api/v1/legacy/x", &token).await;
    let seen = reached(response, "catch-all").await;
    assert_eq!(who(&seen), "A");
    assert_eq!(seen["path"], "/api/v1/legacy/x");
}

// ---------------------------------------------------------------------------------------
// 7. Round-robin

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_addresses_are_taken_in_turn() {
    let a = Named::start("A").await;
    let b = Named::start("B").await;
    let c = Named::start("C").await;
    let routes = route("/api/v1/rr/**", &urls(&[a.addr, b.addr]), "");
    let gw = gateway(&c, "", &routes).await;
    let token = gw.alex_token().await;
    let mut order = Vec::new();
    for i in 0..10 {
        let client = if i % 3 == 0 { &gw.http2 } else { &gw.http1 };
        let response = gw
            .bearer_get(client, &format!("/api/v1/rr/{i}"), &token)
            .await;
        let seen = reached(response, "round-robin").await;
        assert_eq!(seen["path"], format!("/api/v1/rr/{i}"));
        order.push(who(&seen).to_owned());
    }
    assert_eq!(a.hits(), 5, "{order:?}");
    assert_eq!(b.hits(), 5, "{order:?}");
    assert_eq!(c.hits(), 0);
    assert!(
        order.windows(2).all(|w| w[0] != w[1]),
        "strictly alternating: {order:?}"
    );
}

// ---------------------------------------------------------------------------------------
// 8. One address dead: retry and cool-down

async fn post_and_check(gw: &TestGateway, token: &str, path: &str, body: Vec<u8>) -> Value {
    let sha = sha256_hex(&body);
    let len = body.len();
    let response = gw
        .http1
        .post(gw.url(path))
        .bearer_auth(token)
        .body(body)
        // A body lost on the way would leave the upstream waiting: fail fast instead.
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .unwrap();
    let seen = reached(response, &format!("POST {path}")).await;
    assert_eq!(seen["method"], "POST");
    assert_eq!(seen["body_len"], len, "{path}: {seen}");
    assert_eq!(seen["body_sha256"], sha, "{path}: the body arrived intact");
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_address_is_retried_past_and_then_skipped_during_the_cooldown() {
    let a = Named::start("A").await;
    let c = Named::start("C").await;
    let dead = Dead::new();
    let routes = route("/api/v1/failover/**", &urls(&[dead.addr, a.addr]), "");
    let gw = gateway(&c, "[upstream]\ncooldown = \"30s\"\n", &routes).await;
    let token = gw.alex_token().await;

    // The very first request goes to the first address, which refuses: it is retried on
    // A, body and all, since the body was never polled.
    let seen = post_and_check(&gw, &token, "/api/v1/failover/0", payload(1024, 0)).await;
    assert_eq!(who(&seen), "A");
    assert_eq!(a.hits(), 1);

    // The dead address comes back to life, but it failed within the cool-down: the
    // gateway must not try it again yet.
    let revived = dead.revive("D");
    let mut requests = 1;
    for i in 0..10 {
        let response = gw
            .bearer_get(&gw.http1, &format!("/api/v1/failover/get/{i}"), &token)
            .await;
        assert_eq!(who(&reached(response, "GET").await), "A");
        requests += 1;
    }
    for i in 1..10u8 {
        let seen = post_and_check(
            &gw,
            &token,
            &format!("/api/v1/failover/{i}"),
            payload(1024, i),
        )
        .await;
        assert_eq!(who(&seen), "A");
        requests += 1;
    }
    assert_eq!(a.hits(), requests, "every request reached A");
    assert_eq!(
        revived.hits(),
        0,
        "an address that failed is skipped for the cool-down"
    );
    assert_eq!(c.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posts_whose_connection_failed_are_retried_with_their_bodies_intact() {
    let a = Named::start("A").await;
    let c = Named::start("C").await;
    // Each route's first request meets a dead first address: six retries for sure.
    let dead = dead_addrs(6);
    let routes: String = dead
        .iter()
        .enumerate()
        .map(|(i, d)| route(&format!("/api/v1/fo{i}/**"), &urls(&[d.addr, a.addr]), ""))
        .collect();
    let gw = gateway(&c, "[upstream]\ncooldown = \"30s\"\n", &routes).await;
    let token = gw.alex_token().await;

    // Fixed-length bodies, small and large, over HTTP/1.1.
    let seen = post_and_check(&gw, &token, "/api/v1/fo0/up", payload(1024, 7)).await;
    assert_eq!(who(&seen), "A");
    let seen = post_and_check(&gw, &token, "/api/v1/fo1/up", payload(300_000, 8)).await;
    assert_eq!(who(&seen), "A");

    // A streamed (chunked) body.
    let n = 200_000;
    let response = gw
        .http1
        .post(gw.url("/api/v1/fo2/up"))
        .bearer_auth(&token)
        .body(streamed_body(n))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .unwrap();
    let seen = reached(response, "streamed POST").await;
    assert_eq!(seen["body_len"], n);
    assert_eq!(seen["body_sha256"], sha256_hex(&pattern(n)));

    // HTTP/2, fixed and streamed.
    let body = payload(1024, 9);
    let response = gw
        .http2
        .post(gw.url("/api/v1/fo3/up"))
        .bearer_auth(&token)
        .body(body.clone())
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .unwrap();
    assert_eq!(response.version(), Version::HTTP_2);
    let seen = reached(response, "h2 POST").await;
    assert_eq!(seen["body_len"], body.len());
    assert_eq!(seen["body_sha256"], sha256_hex(&body));
    let response = gw
        .http2
        .put(gw.url("/api/v1/fo4/up"))
        .bearer_auth(&token)
        .body(streamed_body(n))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .unwrap();
    let seen = reached(response, "h2 streamed PUT").await;
    assert_eq!(seen["method"], "PUT");
    assert_eq!(seen["body_len"], n);
    assert_eq!(seen["body_sha256"], sha256_hex(&pattern(n)));

    // An empty POST too.
    let seen = post_and_check(&gw, &token, "/api/v1/fo5/up", Vec::new()).await;
    assert_eq!(who(&seen), "A");

    assert_eq!(a.hits(), 6);
    assert_eq!(c.hits(), 0);
}

// ---------------------------------------------------------------------------------------
// 9. Every address dead

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_addresses_dead_is_502_and_the_gateway_carries_on() {
    let a = Named::start("A").await;
    let dead = dead_addrs(2);
    let routes = [
        route("/api/v1/gone/**", &urls(&[dead[0].addr, dead[1].addr]), ""),
        route("/api/v1/single/**", &url(dead[0].addr), ""),
    ]
    .concat();
    let gw = gateway(&a, "[upstream]\ncooldown = \"30s\"\n", &routes).await;
    let token = gw.alex_token().await;

    let started = Instant::now();
    for i in 0..3 {
        let response = gw
            .bearer_get(&gw.http1, &format!("/api/v1/gone/{i}"), &token)
            .await;
        expect_error(response, 502, "bad_gateway").await;
        let response = gw
            .http2
            .post(gw.url(&format!("/api/v1/gone/{i}")))
            .bearer_auth(&token)
            .body(payload(1024, i))
            .send()
            .await
            .unwrap();
        expect_error(response, 502, "bad_gateway").await;
    }
    let response = gw.bearer_get(&gw.http1, "/api/v1/single/x", &token).await;
    expect_error(response, 502, "bad_gateway").await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "refused connections fail fast: {:?}",
        started.elapsed()
    );

    for client in [&gw.http1, &gw.http2] {
        let response = gw.bearer_get(client, "/api/v1/working", &token).await;
        assert_eq!(who(&reached(response, "working route").await), "A");
    }
    assert_eq!(a.hits(), 2);
}

// ---------------------------------------------------------------------------------------
// 10. check-config warns about shadowed routes

#[test]
fn check_config_warns_about_shadowed_routes() {
    let dir = tempfile::tempdir().unwrap();
    write_certificate(dir.path(), "gateway.crt", "gateway.key");
    let up = "\"http://127.0.0.1:9\"";
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\ntls_cert = \"gateway.crt\"\ntls_key = \"gateway.key\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n{}",
        [
            route("/api/**", up, ""),
            route("/api/v1/x", up, ""),
            // An earlier GET-only route shadows a later GET-only one, not an any-method one.
            route("/other/**", up, "methods = [\"GET\"]"),
            route("/other/y", up, ""),
            route("/other/z", up, "methods = [\"GET\"]"),
            // An earlier host-limited route does not shadow a route for any host.
            route("/h/**", up, "host = \"a.example\""),
            route("/h/x", up, ""),
        ]
        .concat()
    );
    let path = dir.path().join("config.toml");
    std::fs::write(&path, text).unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_covata-gateway"))
        .arg("check-config")
        .arg("--config")
        .arg(&path)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("the binary runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "a shadowed route is a warning, not an error\nstdout: {stdout}\nstderr: {stderr}"
    );
    let warnings: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("warning:"))
        .collect();
    assert_eq!(warnings.len(), 2, "stdout: {stdout}");
    let first = warnings[0];
    assert!(
        first.starts_with("warning: routes[1]")
            && first.contains("/api/v1/x")
            && first.contains("can never match")
            && first.contains("routes[0]"),
        "stdout: {stdout}"
    );
    assert!(
        warnings[1].starts_with("warning: routes[4]")
            && warnings[1].contains("can never match")
            && warnings[1].contains("routes[2]"),
        "stdout: {stdout}"
    );
    assert!(
        stdout.contains(&format!("{}: ok", path.display())),
        "stdout: {stdout}"
    );
}
