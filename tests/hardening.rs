//! What a client cannot make the gateway say, and what a misbehaving client or upstream
//! gets back: the gateway's own headers in any spelling, headers some upstreams trust,
//! `Host` rules, malformed request bodies, impossible upstream statuses, HTTP/2 cookies,
//! repeated client credentials, case-insensitive routes, and upstream connections that
//! are never shared between principals or between requests.

mod common;
use common::raw::{client_tls, parse_responses, tls_connect};
use common::wire::{gateway_for, within, Raw, Reply, OK};
use common::*;

use std::time::Duration;

use reqwest::header::{HeaderName, HeaderValue};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The gateway's own headers, spelled as CGI/WSGI, PHP and some Java containers would
/// read them as the real ones, plus headers of its namespace it does not set itself.
const SPOOFED: &[&str] = &[
    "x_authenticated_user",
    "X_Authenticated_Roles",
    "x-authenticated_scope",
    "X_Token_Id",
    "x_forwarded_for",
    "X_Forwarded_Proto",
    "x-forwarded_host",
    "x-forwarded-port",
    "x-forwarded-prefix",
    "x-authenticated-email",
];

/// Headers some upstream stacks trust over what the gateway vouches for.
const DISTRUSTED: &[&str] = &[
    "x-real-ip",
    "x-original-url",
    "x-rewrite-url",
    "x-http-method-override",
    "true-client-ip",
];

fn spoofing(request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
    let mut request = request;
    for name in SPOOFED.iter().chain(DISTRUSTED).chain(&["x_custom_flag"]) {
        request = request.header(
            HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_static("ROLE_SYSTEM_ADMIN"),
        );
    }
    request.header("x-custom", "kept")
}

/// Header names the standard upstream received, lower-case.
fn names(seen: &Value) -> Vec<String> {
    seen["headers"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateways_own_headers_cannot_be_supplied_in_any_spelling() {
    let gw = TestGateway::start().await;
    let token = gw.alex_token().await;
    for client in [&gw.http1, &gw.http2] {
        // A public route (no identity at all) and a protected one (the real identity).
        for (path, token) in [("/api/v1/config", None), ("/api/v1/objects", Some(&token))] {
            let mut request = spoofing(client.get(gw.url(path)));
            if let Some(token) = token {
                request = request.bearer_auth(token);
            }
            let seen = json_ok(request.send().await.unwrap()).await;
            let received = names(&seen);
            for name in SPOOFED.iter().chain(DISTRUSTED).chain(&["x_custom_flag"]) {
                let lower = name.to_ascii_lowercase();
                let values = received_values(&seen, &lower);
                assert!(
                    values.iter().all(|v| *v != "ROLE_SYSTEM_ADMIN"),
                    "{path}: {name} reached the upstream: {seen}"
                );
            }
            assert!(
                received.iter().all(|n| !n.contains('_')),
                "{path}: {received:?}"
            );
            assert_eq!(received_values(&seen, "x-custom"), ["kept"], "{seen}");
            assert_eq!(
                received_values(&seen, "x-forwarded-for"),
                ["127.0.0.1"],
                "{seen}"
            );
            let user = received_values(&seen, "x-authenticated-user");
            match token {
                Some(_) => assert_eq!(user, [ALEX.0], "{seen}"),
                None => assert!(user.is_empty(), "{seen}"),
            }
        }
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_passes_the_dropped_headers_it_lists_and_never_the_gateways_own() {
    let upstream = Upstream::start().await;
    let passing = format!(
        "[[routes]]\npath = \"/api/v1/passing/**\"\nupstream = \"http://{}\"\n\
         pass_headers = [\"X-Real-IP\", \"X_Custom_Flag\"]\n",
        upstream.addr
    );
    let text = config_text(upstream.addr, "", &passing);
    let gw = TestGateway::start_text(upstream, &text).await;
    let token = gw.alex_token().await;
    for client in [&gw.http1, &gw.http2] {
        let request = spoofing(client.get(gw.url("/api/v1/passing/x"))).bearer_auth(&token);
        let seen = json_ok(request.send().await.unwrap()).await;
        assert_eq!(
            received_values(&seen, "x-real-ip"),
            ["ROLE_SYSTEM_ADMIN"],
            "{seen}"
        );
        assert_eq!(
            received_values(&seen, "x_custom_flag"),
            ["ROLE_SYSTEM_ADMIN"],
            "{seen}"
        );
        assert!(received_values(&seen, "x-original-url").is_empty());
        assert!(received_values(&seen, "x_authenticated_user").is_empty());
        assert_eq!(received_values(&seen, "x-authenticated-user"), [ALEX.0]);
    }
    gw.stop().await;
}

fn received_values<'a>(seen: &'a Value, name: &str) -> Vec<&'a str> {
    received(seen, name)
}

/// One request written as raw bytes on a new HTTP/1.1 connection; the responses read
/// until the gateway closes it or two seconds pass.
async fn raw_exchange(gw: &TestGateway, wire: &str) -> Vec<common::raw::RawResponse> {
    let mut tls = tls_connect(gw.addr, client_tls(&[&gw.ca_pem], &[b"http/1.1"])).await;
    tls.write_all(wire.as_bytes()).await.unwrap();
    let mut received = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, tls.read(&mut buf)).await {
        if n == 0 {
            break;
        }
        received.extend_from_slice(&buf[..n]);
    }
    parse_responses(&received)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_rules_of_rfc_9112_are_enforced() {
    let gw = TestGateway::start().await;
    let token = gw.alex_token().await;
    let host = format!("127.0.0.1:{}", gw.addr.port());
    let auth = format!("Authorization: Bearer {token}\r\n");
    let cases = [
        (
            "two Host headers",
            format!("GET /api/v1/x HTTP/1.1\r\nHost: {host}\r\nHost: evil.example\r\n{auth}Connection: close\r\n\r\n"),
            400,
        ),
        (
            "no Host on HTTP/1.1",
            format!("GET /api/v1/x HTTP/1.1\r\n{auth}Connection: close\r\n\r\n"),
            400,
        ),
        (
            "an absolute-form target naming another host",
            format!("GET https://evil.example/api/v1/x HTTP/1.1\r\nHost: {host}\r\n{auth}Connection: close\r\n\r\n"),
            400,
        ),
        (
            "a Host with user information",
            format!("GET /api/v1/x HTTP/1.1\r\nHost: user@{host}\r\n{auth}Connection: close\r\n\r\n"),
            400,
        ),
        (
            "two Host headers on the token endpoint",
            format!("POST /api/oauth/token HTTP/1.1\r\nHost: {host}\r\nHost: evil.example\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"),
            400,
        ),
        (
            "an absolute-form target with its own host",
            format!("GET https://{host}/api/v1/x HTTP/1.1\r\nHost: {host}\r\n{auth}Connection: close\r\n\r\n"),
            200,
        ),
    ];
    for (what, wire, status) in cases {
        let responses = within(10, raw_exchange(&gw, &wire)).await;
        let statuses: Vec<u16> = responses.iter().map(|r| r.status).collect();
        assert_eq!(statuses, [status], "{what}");
        if status == 400 {
            assert_eq!(responses[0].json()["error"], "invalid_request", "{what}");
        }
    }
    // HTTP/1.0 needs no Host.
    let mut tls = tls_connect(gw.addr, client_tls(&[&gw.ca_pem], &[b"http/1.1"])).await;
    let wire = format!("GET /api/v1/x HTTP/1.0\r\n{auth}\r\n");
    tls.write_all(wire.as_bytes()).await.unwrap();
    let mut received = Vec::new();
    let _ = within(10, tls.read_to_end(&mut received)).await;
    let text = String::from_utf8_lossy(&received);
    assert!(text.starts_with("HTTP/1.0 200 OK\r\n"), "{text}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_chunked_request_body_is_the_clients_fault() {
    // An upstream that answers once it has the whole body, as most do.
    let up = Raw::start(|_| Reply::new(OK)).await;
    let (gw, token) = gateway_for(
        up.addr,
        "",
        &format!(
            "[[routes]]\npath = \"/api/v1/echo\"\nupstream = \"http://{}\"\n",
            up.addr
        ),
    )
    .await;
    let host = format!("127.0.0.1:{}", gw.addr.port());
    for (what, body) in [
        ("a chunk-size that is not hex", "zz\r\nhello\r\n0\r\n\r\n"),
        ("chunk data longer than its size", "2\r\nhello\r\n0\r\n\r\n"),
    ] {
        let wire = format!(
            "POST /api/v1/echo HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n\
             Transfer-Encoding: chunked\r\n\r\n{body}"
        );
        let responses = within(10, raw_exchange(&gw, &wire)).await;
        let statuses: Vec<u16> = responses.iter().map(|r| r.status).collect();
        assert_eq!(statuses, [400], "{what}");
        assert_eq!(responses[0].json()["error"], "invalid_request", "{what}");
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_status_outside_100_to_599_is_a_bad_gateway() {
    for status in ["600", "999", "099", "000"] {
        let up = Raw::start(move |_| {
            Reply::new(format!(
                "HTTP/1.1 {status} Odd\r\ncontent-length: 2\r\n\r\nok"
            ))
        })
        .await;
        let (gw, token) = gateway_for(
            up.addr,
            "",
            &format!(
                "[[routes]]\npath = \"/api/v1/odd/**\"\nupstream = \"http://{}\"\n",
                up.addr
            ),
        )
        .await;
        let response = gw.bearer_get(&gw.http1, "/api/v1/odd/x", &token).await;
        expect_error(response, 502, "bad_gateway").await;
        gw.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_cookies_reach_an_http1_upstream_as_one_field() {
    let up = Raw::start(|_| Reply::new(OK)).await;
    let (gw, token) = gateway_for(
        up.addr,
        "",
        &format!(
            "[[routes]]\npath = \"/api/v1/cookies/**\"\nupstream = \"http://{}\"\n",
            up.addr
        ),
    )
    .await;
    let response = gw
        .http2
        .get(gw.url("/api/v1/cookies/x"))
        .bearer_auth(&token)
        .header("cookie", "a=1")
        .header("cookie", "b=2")
        .header("cookie", "c=3")
        .send()
        .await
        .unwrap();
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    assert_eq!(response.status(), 200);
    assert_eq!(
        up.last("/api/v1/cookies/x").headers("cookie"),
        ["a=1; b=2; c=3"]
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_client_credentials_are_an_invalid_request() {
    let gw = TestGateway::start().await;
    use base64::Engine;
    let basic = |id: &str, secret: &str| {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{id}:{secret}"))
        )
    };
    for header in ["authorization", "authentication"] {
        let response = gw
            .http1
            .post(gw.url("/api/oauth/token"))
            .header(header, basic(APP.0, APP.1))
            .header(header, basic(SERVICE.0, SERVICE.1))
            .form(&[("grant_type", "client_credentials")])
            .send()
            .await
            .unwrap();
        expect_error(response, 400, "invalid_request").await;
    }
    // Revocation and introspection authenticate clients the same way.
    for path in ["/api/oauth/revoke", "/api/oauth/introspect"] {
        let response = gw
            .http1
            .post(gw.url(path))
            .header("authorization", basic(APP.0, APP.1))
            .header("authorization", basic(APP.0, "wrong"))
            .form(&[("token", "x")])
            .send()
            .await
            .unwrap();
        expect_error(response, 400, "invalid_request").await;
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_case_insensitive_route_takes_every_spelling_of_its_path() {
    let upstream = Upstream::start().await;
    let routes = format!(
        "[[routes]]\npath = \"/Admin/**\"\nupstream = \"http://{up}\"\n\
         roles = [\"ROLE_SYSTEM_ADMIN\"]\ncase_sensitive = false\n\
         [[routes]]\npath = \"/**\"\nupstream = \"http://{up}\"\npublic = true\n",
        up = upstream.addr
    );
    let text = config_text(upstream.addr, "", &routes);
    let gw = TestGateway::start_text(upstream, &text).await;
    let alex = gw.alex_token().await;
    let admin = gw.access_token(ADMIN).await;
    for path in ["/admin/x", "/ADMIN/x", "/aDmIn/x", "/%41dmin/x", "/admin"] {
        let response = gw.http1.get(gw.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 401, "{path}");
        let response = gw.bearer_get(&gw.http1, path, &alex).await;
        assert_eq!(response.status(), 403, "{path}");
        let seen = json_ok(gw.bearer_get(&gw.http2, path, &admin).await).await;
        assert_eq!(received(&seen, "x-authenticated-user"), [ADMIN.0], "{path}");
    }
    // Other paths are the public catch-all's.
    let response = gw.http1.get(gw.url("/administer")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    gw.stop().await;
}

/// A route with `keepalive = false` opens a connection per request and says so; under
/// `pool_partition = "principal"` two users never share an upstream connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_carry_one_request_or_one_principal_when_asked() {
    let up = Raw::start(|_| Reply::new(OK)).await;
    let routes = format!(
        "[[routes]]\npath = \"/api/v1/once/**\"\nupstream = \"http://{up}\"\nkeepalive = false\n\
         [[routes]]\npath = \"/api/v1/mine/**\"\nupstream = \"http://{up}\"\n\
         pool_partition = \"principal\"\n\
         [[routes]]\npath = \"/api/v1/open/**\"\nupstream = \"http://{up}\"\npublic = true\n\
         pool_partition = \"principal\"\n",
        up = up.addr
    );
    let (gw, alex) = gateway_for(up.addr, "", &routes).await;
    let admin = gw.access_token(ADMIN).await;

    for i in 0..3 {
        let path = format!("/api/v1/once/{i}");
        assert_eq!(gw.bearer_get(&gw.http1, &path, &alex).await.status(), 200);
        assert_eq!(up.last(&path).headers("connection"), ["close"]);
    }
    let once: Vec<usize> = (0..3)
        .map(|i| up.last(&format!("/api/v1/once/{i}")).conn)
        .collect();
    assert!(
        once[0] != once[1] && once[1] != once[2] && once[0] != once[2],
        "{once:?}"
    );

    // Interleaved, one after another: each user's requests reuse that user's connection
    // and no other.
    for i in 0..6 {
        let (token, who) = if i % 2 == 0 {
            (&alex, "alex")
        } else {
            (&admin, "admin")
        };
        let path = format!("/api/v1/mine/{who}/{i}");
        assert_eq!(gw.bearer_get(&gw.http1, &path, token).await.status(), 200);
    }
    let conns = |who: &str| -> Vec<usize> {
        up.seen()
            .iter()
            .filter(|s| s.path().starts_with(&format!("/api/v1/mine/{who}/")))
            .map(|s| s.conn)
            .collect()
    };
    let (a, b) = (conns("alex"), conns("admin"));
    assert_eq!(a.len(), 3);
    assert!(a.iter().all(|c| *c == a[0]), "alex: {a:?}");
    assert!(b.iter().all(|c| *c == b[0]), "admin: {b:?}");
    assert_ne!(a[0], b[0], "two principals shared a connection");

    // Public routes partition by client address: one client, one connection.
    for i in 0..2 {
        let path = format!("/api/v1/open/{i}");
        assert_eq!(
            gw.http1.get(gw.url(&path)).send().await.unwrap().status(),
            200
        );
    }
    let open: Vec<usize> = (0..2)
        .map(|i| up.last(&format!("/api/v1/open/{i}")).conn)
        .collect();
    assert_eq!(open[0], open[1]);
    assert!(!a.contains(&open[0]) && !b.contains(&open[0]));
    gw.stop().await;
}
