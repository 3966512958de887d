//! The proxy path (SPEC §2): routing, the bearer check, roles and scopes, the header
//! rewrite towards the upstream, streaming, path normalisation, upstream failures, and
//! the admin listener. Everything runs against a real gateway, a real upstream and real
//! HTTPS clients.

mod common;
use common::raw::{client_tls, tls_connect};
use common::*;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use reqwest::{Response, StatusCode, Version};
use serde_json::Value;

/// Parses the upstream's JSON description of what it received; the request must have
/// been answered 200 by the upstream.
async fn seen(response: Response) -> Value {
    assert_eq!(response.status(), 200, "expected the upstream's answer");
    let body: Value = response.json().await.unwrap();
    assert!(
        body["headers"].is_object(),
        "not the upstream's answer: {body}"
    );
    body
}

/// Asserts a 401 `invalid_token` answer from the gateway itself.
async fn expect_invalid_token(response: Response, what: &str) {
    let www = challenge(response.headers());
    assert!(
        www.starts_with("Bearer realm=\"covata-gateway\"")
            && www.contains("error=\"invalid_token\""),
        "{what}: WWW-Authenticate {www:?}"
    );
    expect_error(response, 401, "invalid_token").await;
}

/// Asserts a 401 for a request that carried no bearer token.
async fn expect_missing_token(response: Response) {
    assert_eq!(
        challenge(response.headers()),
        "Bearer realm=\"covata-gateway\""
    );
    expect_error(response, 401, "unauthorized").await;
}

/// A raw HTTP/1.1 GET over TLS with exactly this request target, so that no client
/// library normalises `..`, `%2e%2e` or `//` before the gateway sees it.
async fn raw_get(gw: &TestGateway, target: &str, token: Option<&str>) -> (StatusCode, Value) {
    let tls = tls_connect(gw.addr, client_tls(&[&gw.ca_pem], &[b"http/1.1"])).await;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(connection);
    let mut request = hyper::Request::get(target)
        .header("host", format!("127.0.0.1:{}", gw.addr.port()).as_str());
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}").as_str());
    }
    let request = request.body(Empty::<Bytes>::new()).unwrap();
    assert_eq!(
        request.uri().to_string(),
        target,
        "the target is sent as is"
    );
    let response = sender.send_request(request).await.unwrap();
    let status = StatusCode::from_u16(response.status().as_u16()).unwrap();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let json = serde_json::from_slice(&body)
        .unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(&body)));
    (status, json)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_protocols_reach_the_upstream_with_identity_and_forwarding_headers() {
    let gw = TestGateway::start().await;
    let grant = gw.password_grant(APP, ALEX).await;
    let token = grant["access_token"].as_str().unwrap();
    let jti = grant["jti"].as_str().unwrap();
    let scope = grant["scope"].as_str().unwrap();
    assert!(!jti.is_empty() && jti != token);
    let host = format!("127.0.0.1:{}", gw.addr.port());
    let query = "a=1&b=%2F%20x&c=&d=caf%C3%A9&a=2";

    for (client, version) in [(&gw.http1, Version::HTTP_11), (&gw.http2, Version::HTTP_2)] {
        let response = client
            .get(gw.url(&format!("/api/v1/objects/42?{query}")))
            .bearer_auth(token)
            .header("x-authenticated-user", "admin@example.com")
            .header("x-authenticated-roles", "ROLE_SYSTEM_ADMIN")
            .header("x-authenticated-client", "spoofed-client")
            .header("x-authenticated-scope", "admin")
            .header("x-token-id", "00000000-0000-0000-0000-000000000000")
            .header("x-forwarded-for", "6.6.6.6")
            .header("x-forwarded-proto", "http")
            .header("x-forwarded-host", "evil.example.com")
            .header("forwarded", "for=6.6.6.6;proto=http;host=evil.example.com")
            .header("x-custom", "kept")
            .send()
            .await
            .unwrap();
        assert_eq!(response.version(), version);
        let seen = seen(response).await;
        let h = |name| received(&seen, name);
        assert_eq!(seen["method"], "GET", "{version:?}");
        assert_eq!(seen["path"], "/api/v1/objects/42", "{version:?}");
        assert_eq!(
            seen["query"], query,
            "{version:?}: the query arrives intact"
        );
        assert_eq!(h("x-authenticated-user"), [ALEX.0], "{version:?}");
        assert_eq!(
            h("x-authenticated-roles"),
            ["ROLE_COLLABORATOR,ROLE_ORIGINATOR"],
            "{version:?}"
        );
        assert_eq!(h("x-authenticated-client"), [APP.0], "{version:?}");
        assert_eq!(h("x-authenticated-scope"), [scope], "{version:?}");
        assert_eq!(h("x-token-id"), [jti], "{version:?}");
        assert_eq!(h("x-forwarded-for"), ["127.0.0.1"], "{version:?}");
        assert_eq!(h("x-forwarded-proto"), ["https"], "{version:?}");
        assert_eq!(h("x-forwarded-host"), [host.as_str()], "{version:?}");
        assert!(h("forwarded").is_empty(), "{version:?}: {seen}");
        assert!(h("authorization").is_empty(), "{version:?}: {seen}");
        assert_eq!(h("x-custom"), ["kept"], "{version:?}");
        // The upstream is addressed by its own authority.
        assert_eq!(
            h("host"),
            [gw.upstream.addr.to_string().as_str()],
            "{version:?}"
        );
        // The token itself appears nowhere in what the upstream received.
        assert!(!seen.to_string().contains(token), "{version:?}: {seen}");
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_without_a_user_cannot_borrow_one() {
    let gw = TestGateway::start().await;
    let response = gw
        .token_request(Some(SERVICE), &[("grant_type", "client_credentials")])
        .await;
    let grant = json_ok(response).await;
    let token = grant["access_token"].as_str().unwrap();
    for client in [&gw.http1, &gw.http2] {
        let response = client
            .get(gw.url("/api/v1/objects"))
            .bearer_auth(token)
            .header("x-authenticated-user", ADMIN.0)
            .header("x-authenticated-roles", "ROLE_SYSTEM_ADMIN")
            .send()
            .await
            .unwrap();
        let seen = seen(response).await;
        assert!(received(&seen, "x-authenticated-user").is_empty(), "{seen}");
        assert!(
            !received(&seen, "x-authenticated-roles").contains(&"ROLE_SYSTEM_ADMIN"),
            "{seen}"
        );
        assert_eq!(received(&seen, "x-authenticated-client"), [SERVICE.0]);
        assert_eq!(
            received(&seen, "x-token-id"),
            [grant["jti"].as_str().unwrap()]
        );
        // Nor a role it does not have.
        let response = client
            .get(gw.url("/api/v1/admin/x"))
            .bearer_auth(token)
            .header("x-authenticated-roles", "ROLE_SYSTEM_ADMIN")
            .send()
            .await
            .unwrap();
        expect_error(response, 403, "insufficient_scope").await;
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_do_not_reach_the_upstream() {
    let gw = TestGateway::start().await;
    let token = gw.alex_token().await;
    let response = gw
        .http1
        .get(gw.url("/api/v1/objects"))
        .bearer_auth(&token)
        .header("connection", "keep-alive, x-drop-me")
        .header("x-drop-me", "1")
        .header("keep-alive", "timeout=5, max=100")
        .header("proxy-authorization", "Basic dXNlcjpwYXNz")
        .header("proxy-connection", "keep-alive")
        .header("x-stays", "1")
        .send()
        .await
        .unwrap();
    let seen = seen(response).await;
    for name in [
        "connection",
        "x-drop-me",
        "keep-alive",
        "proxy-authorization",
        "proxy-connection",
    ] {
        assert!(received(&seen, name).is_empty(), "{name} reached: {seen}");
    }
    assert_eq!(received(&seen, "x-stays"), ["1"]);
    assert_eq!(received(&seen, "x-authenticated-user"), [ALEX.0]);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_authorization_route_passes_the_bearer_token() {
    let gw = TestGateway::start().await;
    let token = gw.alex_token().await;
    for client in [&gw.http1, &gw.http2] {
        let response = gw.bearer_get(client, "/api/v1/forward/x", &token).await;
        let forwarded = seen(response).await;
        assert_eq!(
            received(&forwarded, "authorization"),
            [format!("Bearer {token}").as_str()]
        );
        assert_eq!(received(&forwarded, "x-authenticated-user"), [ALEX.0]);
        // A route without the flag keeps the token to itself.
        let response = gw.bearer_get(client, "/api/v1/other/x", &token).await;
        assert!(received(&seen(response).await, "authorization").is_empty());
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_mebibytes_stream_through_both_ways() {
    const N: usize = 5 << 20;
    let gw = TestGateway::start().await;
    let token = gw.alex_token().await;
    let expected = pattern(N);
    for (client, version) in [(&gw.http1, Version::HTTP_11), (&gw.http2, Version::HTTP_2)] {
        let response = client
            .post(gw.url("/api/v1/echo"))
            .bearer_auth(&token)
            .body(streamed_body(N))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{version:?}");
        assert_eq!(response.version(), version);
        let body = response.bytes().await.unwrap();
        assert_eq!(body.len(), N, "{version:?}: echoed length");
        assert!(body[..] == expected[..], "{version:?}: echoed bytes differ");

        let response = gw
            .bearer_get(client, &format!("/api/v1/bytes/{N}"), &token)
            .await;
        assert_eq!(response.status(), 200, "{version:?}");
        let body = response.bytes().await.unwrap();
        assert_eq!(body.len(), N, "{version:?}: downloaded length");
        assert!(
            body[..] == expected[..],
            "{version:?}: downloaded bytes differ"
        );
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_without_a_usable_bearer_token_are_refused() {
    let gw = TestGateway::start().await;
    let url = gw.url("/api/v1/objects");
    for client in [&gw.http1, &gw.http2] {
        // No Authorization at all.
        expect_missing_token(client.get(&url).send().await.unwrap()).await;
        // Another scheme is no bearer token either.
        let response = client
            .get(&url)
            .basic_auth(ALEX.0, Some(ALEX.1))
            .send()
            .await
            .unwrap();
        expect_missing_token(response).await;
        // Malformed bearer credentials.
        for bad in [
            "Bearer",
            "Bearer ",
            "Bearer a b",
            "Bearer \"x\"",
            "Bearer ===",
        ] {
            let response = client
                .get(&url)
                .header("authorization", bad)
                .send()
                .await
                .unwrap();
            expect_invalid_token(response, bad).await;
        }
        // Well-formed but unknown.
        let response = client
            .get(&url)
            .bearer_auth("dGhpcy1pcy1ub3QtYS10b2tlbi1hdC1hbGwtMDEyMzQ1Njc4OQ")
            .send()
            .await
            .unwrap();
        expect_invalid_token(response, "unknown token").await;
    }

    // Two Authorization headers are ambiguous: refused, whichever one is valid.
    let token = gw.alex_token().await;
    let response = gw
        .http1
        .get(&url)
        .header("authorization", format!("Bearer {token}"))
        .header("authorization", "Bearer other")
        .send()
        .await
        .unwrap();
    expect_error(response, 400, "invalid_request").await;

    // A refresh token is not an access token.
    let grant = gw.password_grant(APP, ALEX).await;
    let refresh = grant["refresh_token"].as_str().unwrap();
    let response = gw
        .http1
        .get(&url)
        .bearer_auth(refresh)
        .send()
        .await
        .unwrap();
    expect_invalid_token(response, "refresh token as bearer").await;
    // ... while the access token of the same grant works.
    let access = grant["access_token"].as_str().unwrap();
    let response = gw.http1.get(&url).bearer_auth(access).send().await.unwrap();
    seen(response).await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_access_token_is_invalid() {
    let gw = TestGateway::start().await;
    let grant = gw.password_grant(SHORT, ALEX).await;
    let token = grant["access_token"].as_str().unwrap();
    assert_eq!(grant["expires_in"], 1, "{grant}");
    let url = gw.url("/api/v1/objects");
    let response = gw.http1.get(&url).bearer_auth(token).send().await.unwrap();
    assert_eq!(response.status(), 200, "the fresh token works");
    tokio::time::sleep(Duration::from_millis(2100)).await;
    for client in [&gw.http1, &gw.http2] {
        let response = client.get(&url).bearer_auth(token).send().await.unwrap();
        expect_invalid_token(response, "expired token").await;
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_and_scopes_are_enforced() {
    let gw = TestGateway::start().await;
    let alex = gw.alex_token().await;
    let admin = gw.access_token(ADMIN).await;

    for client in [&gw.http1, &gw.http2] {
        let response = gw.bearer_get(client, "/api/v1/admin/x", &alex).await;
        let www = challenge(response.headers());
        assert!(
            www.starts_with("Bearer realm=\"covata-gateway\"")
                && www.contains("error=\"insufficient_scope\""),
            "{www:?}"
        );
        expect_error(response, 403, "insufficient_scope").await;

        let response = gw.bearer_get(client, "/api/v1/admin/x", &admin).await;
        let seen = seen(response).await;
        assert_eq!(seen["path"], "/api/v1/admin/x");
        assert_eq!(
            received(&seen, "x-authenticated-roles"),
            ["ROLE_SYSTEM_ADMIN"]
        );
    }

    let read = gw.token_with_scope(ALEX, "read").await;
    let response = gw.bearer_get(&gw.http1, "/api/v1/scoped/x", &read).await;
    let www = challenge(response.headers());
    assert!(www.contains("error=\"insufficient_scope\""), "{www:?}");
    expect_error(response, 403, "insufficient_scope").await;
    // The read-only token is fine where no scope is required.
    let response = gw.bearer_get(&gw.http1, "/api/v1/objects", &read).await;
    assert_eq!(
        received(&seen(response).await, "x-authenticated-scope"),
        ["read"]
    );

    let read_write = gw.token_with_scope(ALEX, "read write").await;
    let response = gw
        .bearer_get(&gw.http2, "/api/v1/scoped/x", &read_write)
        .await;
    let seen = seen(response).await;
    assert_eq!(seen["path"], "/api/v1/scoped/x");
    assert_eq!(received(&seen, "x-authenticated-scope"), ["read write"]);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_route_only_for_its_method_and_no_route_is_404() {
    let gw = TestGateway::start().await;
    for client in [&gw.http1, &gw.http2] {
        let response = client
            .get(gw.url("/api/v1/config"))
            .header("x-authenticated-user", "admin@example.com")
            .header("x-token-id", "00000000-0000-0000-0000-000000000000")
            .send()
            .await
            .unwrap();
        let seen = seen(response).await;
        assert_eq!(seen["path"], "/api/v1/config");
        // Public: no identity, and no spoofed one either.
        assert!(received(&seen, "x-authenticated-user").is_empty(), "{seen}");
        assert!(received(&seen, "x-token-id").is_empty(), "{seen}");
        assert_eq!(received(&seen, "x-forwarded-proto"), ["https"]);

        // POST is not the public route's method: it falls to /api/v1/**.
        let response = client.post(gw.url("/api/v1/config")).send().await.unwrap();
        expect_missing_token(response).await;
    }

    let token = gw.alex_token().await;
    for client in [&gw.http1, &gw.http2] {
        let response = client
            .post(gw.url("/api/v1/config"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(seen(response).await["method"], "POST");

        for path in ["/nothing/here", "/api/v2/objects", "/"] {
            let response = gw.bearer_get(client, path, &token).await;
            expect_error(response, 404, "not_found").await;
        }
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsafe_paths_are_refused_and_paths_are_normalised() {
    // A route for ids that hold encoded slashes; every other route refuses them.
    let upstream = Upstream::start().await;
    let ids = format!(
        "[[routes]]\npath = \"/api/v1/ids/**\"\nupstream = \"http://{}\"\n\
         escaped_slashes = \"keep\"\n",
        upstream.addr
    );
    let text = config_text(upstream.addr, "", &ids);
    let gw = TestGateway::start_text(upstream, &text).await;
    let alex = gw.alex_token().await;
    let admin = gw.access_token(ADMIN).await;

    for target in [
        "/api/v1/../admin/x",
        "/api/v1/objects/..",
        "/api/v1/./admin/x",
        "/api/v1/%2e%2e/admin",
        "/api/v1/%2E%2e/admin/x",
        "/api/v1/.%2e/admin/x",
        "/api/v1/x;y=1",
        "/api/v1/x%3by=1",
        "/api/v1/x%5c..%5cadmin",
        "/api/v1/x%00",
        "/api/v1/x%zz",
        // Encoded slashes and backslashes: many frameworks decode them into separators.
        "/api/v1/objects/a%2Fb",
        "/api/v1/objects/a%2fb",
        "/api/v1/objects/a%5Cb",
        "/api/v1/public/..%2fadmin/x",
    ] {
        let (status, body) = raw_get(&gw, target, Some(&alex)).await;
        assert_eq!(status, 400, "{target}: {body}");
        assert_eq!(body["error"], "invalid_request", "{target}: {body}");
    }

    // Empty segments and encoded unreserved characters name the admin route itself.
    for target in [
        "/api/v1//admin/x",
        "//api/v1/admin/x",
        "/api/v1/%61dmin/x",
        "/api/v1/%61%64%6D%69%6E/x",
        "/api%2fv1/admin/x",
    ] {
        let (status, body) = raw_get(&gw, target, Some(&alex)).await;
        if target.contains("%2f") {
            // An encoded slash never splits a segment: no route at all, never a bypass.
            assert_eq!(status, 404, "{target}: {body}");
            continue;
        }
        assert_eq!(status, 403, "{target}: {body}");
        assert_eq!(body["error"], "insufficient_scope", "{target}: {body}");
        let (status, body) = raw_get(&gw, target, Some(&admin)).await;
        assert_eq!(status, 200, "{target}: {body}");
        assert_eq!(body["path"], "/api/v1/admin/x", "{target}: {body}");
    }

    // The upstream receives the normalised path, and the query untouched.
    for (target, path, query) in [
        ("/api/v1/objects/%7Ex", "/api/v1/objects/~x", Value::Null),
        (
            "/api/v1//ids///%7euser/a%2fb%5Cc?q=%7E&r=..",
            "/api/v1/ids/~user/a%2Fb%5Cc",
            Value::from("q=%7E&r=.."),
        ),
        (
            "/api/v1/objects/a%20b",
            "/api/v1/objects/a%20b",
            Value::Null,
        ),
    ] {
        let (status, body) = raw_get(&gw, target, Some(&alex)).await;
        assert_eq!(status, 200, "{target}: {body}");
        assert_eq!(body["path"], path, "{target}: {body}");
        assert_eq!(body["query"], query, "{target}: {body}");
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_upstream_is_502_and_the_gateway_carries_on() {
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let extra = format!(
        r#"
[[routes]]
path = "/api/v1/down/**"
upstream = "http://127.0.0.1:{closed}"
"#
    );
    let gw = TestGateway::start_with("", &extra).await;
    let token = gw.alex_token().await;
    for client in [&gw.http1, &gw.http2] {
        let response = gw.bearer_get(client, "/api/v1/down/x", &token).await;
        expect_error(response, 502, "bad_gateway").await;
        let response = client
            .post(gw.url("/api/v1/down/x"))
            .bearer_auth(&token)
            .body("some body")
            .send()
            .await
            .unwrap();
        expect_error(response, 502, "bad_gateway").await;
        let response = gw.bearer_get(client, "/api/v1/objects", &token).await;
        assert_eq!(seen(response).await["path"], "/api/v1/objects");
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_upstream_is_504_and_the_gateway_carries_on() {
    let upstream = Upstream::start().await;
    let extra = format!(
        r#"
[[routes]]
path = "/api/v1/slowroute/**"
upstream = "http://{}"
response_timeout = "300ms"
"#,
        upstream.addr
    );
    let text = config_text(upstream.addr, "", &extra);
    let gw = TestGateway::start_text(upstream, &text).await;
    let token = gw.alex_token().await;
    for client in [&gw.http1, &gw.http2] {
        let started = Instant::now();
        let response = gw
            .bearer_get(client, "/api/v1/slowroute/slow/2000", &token)
            .await;
        let elapsed = started.elapsed();
        expect_error(response, 504, "gateway_timeout").await;
        assert!(
            elapsed >= Duration::from_millis(250) && elapsed < Duration::from_millis(1500),
            "answered after {elapsed:?}"
        );
        // Fast enough on the same route, and the default route is unaffected.
        let response = gw
            .bearer_get(client, "/api/v1/slowroute/slow/10", &token)
            .await;
        assert_eq!(seen(response).await["path"], "/api/v1/slowroute/slow/10");
        let response = gw
            .bearer_get(client, "/api/v1/objects/slow/600", &token)
            .await;
        assert_eq!(seen(response).await["path"], "/api/v1/objects/slow/600");
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_listener_serves_health_readiness_and_metrics() {
    let gw = TestGateway::start().await;
    let admin = |path: &str| format!("http://127.0.0.1:{}{path}", gw.admin.port());
    // One answered request of each of two classes, so the counters have something.
    let token = gw.alex_token().await;
    let response = gw.bearer_get(&gw.http1, "/api/v1/objects", &token).await;
    seen(response).await;
    let response = gw
        .http1
        .get(gw.url("/api/v1/objects"))
        .send()
        .await
        .unwrap();
    expect_missing_token(response).await;

    for path in ["/healthz", "/readyz"] {
        let response = gw.http1.get(admin(path)).send().await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
    }
    let response = gw.http1.get(admin("/nothing")).send().await.unwrap();
    assert_eq!(response.status(), 404);
    let response = gw.http1.get(admin("/metrics")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    assert!(text.contains("covata_gateway_requests_total"), "{text}");
    let count = |class: &str| -> u64 {
        let prefix = format!("covata_gateway_requests_total{{class=\"{class}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .unwrap_or_else(|| panic!("no {class} line: {text}"))
            .trim()
            .parse()
            .unwrap()
    };
    assert!(count("2xx") >= 2, "{text}");
    assert!(count("4xx") >= 1, "{text}");
    gw.stop().await;
}
