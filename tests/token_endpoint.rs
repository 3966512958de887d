//! `POST /api/oauth/token` end to end (SPEC §1, §3; RFC 6749 §4.3, §4.4, §5, §6):
//! a real gateway, real HTTPS through reqwest, a real upstream for the API calls.

mod common;
use common::*;

use base64::Engine;
use reqwest::header::CONTENT_TYPE;
use reqwest::{RequestBuilder, Response, Version};
use serde_json::Value;

const TOKEN_PATH: &str = "/api/oauth/token";
const FORM: &str = "application/x-www-form-urlencoded";

fn b64(text: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(text)
}

/// `Basic base64(id:secret)`.
fn basic_value((id, secret): (&str, &str)) -> String {
    format!("Basic {}", b64(&format!("{id}:{secret}")))
}

/// What a successful token response must hold besides the invariant members.
struct Expect<'a> {
    what: &'a str,
    expires_in: u64,
    refresh: bool,
    scope: &'a str,
}

impl<'a> Expect<'a> {
    /// What `APP` gets by default: an hour's access token, a refresh token, and all of
    /// its scopes.
    fn app(what: &'a str) -> Expect<'a> {
        Expect {
            what,
            expires_in: 3600,
            refresh: true,
            scope: "read write",
        }
    }
}

/// Checks a 200 token response (RFC 6749 §5.1 + Covata's `jti`) and returns its body.
async fn expect_tokens(response: Response, expect: Expect<'_>) -> Value {
    let what = expect.what;
    let status = response.status();
    let headers = response.headers().clone();
    let text = response.text().await.unwrap();
    assert_eq!(status, 200, "{what}: status; body {text}");
    assert_eq!(
        header(&headers, "cache-control"),
        Some("no-store"),
        "{what}: Cache-Control"
    );
    assert_eq!(
        header(&headers, "pragma"),
        Some("no-cache"),
        "{what}: Pragma"
    );
    assert!(
        header(&headers, "content-type").is_some_and(|v| v.starts_with("application/json")),
        "{what}: Content-Type {:?}",
        headers.get("content-type")
    );
    let body: Value = serde_json::from_str(&text).unwrap();

    let access = body["access_token"]
        .as_str()
        .unwrap_or_else(|| panic!("{what}: no access_token in {body}"));
    assert_base64url_token(access, &format!("{what}: access_token"));
    assert_eq!(body["token_type"], "bearer", "{what}: token_type in {body}");
    let expires_in = body["expires_in"]
        .as_u64()
        .unwrap_or_else(|| panic!("{what}: expires_in not a number in {body}"));
    assert!(
        expires_in <= expect.expires_in && expires_in + 5 >= expect.expires_in,
        "{what}: expires_in {expires_in}, expected about {}",
        expect.expires_in
    );
    if expect.refresh {
        let refresh = body["refresh_token"]
            .as_str()
            .unwrap_or_else(|| panic!("{what}: no refresh_token in {body}"));
        assert_base64url_token(refresh, &format!("{what}: refresh_token"));
        assert_ne!(refresh, access, "{what}: refresh token equals access token");
    } else {
        assert!(
            body.get("refresh_token").is_none(),
            "{what}: unexpected refresh_token in {body}"
        );
    }
    assert_eq!(body["scope"], expect.scope, "{what}: scope in {body}");
    let jti = body["jti"]
        .as_str()
        .unwrap_or_else(|| panic!("{what}: no jti in {body}"));
    assert!(
        uuid::Uuid::parse_str(jti).is_ok(),
        "{what}: jti `{jti}` is not a UUID"
    );
    assert_ne!(jti, access, "{what}: jti is the token itself");
    body
}

/// 256 random bits, base64url without padding: 43 characters of `[A-Za-z0-9_-]`.
fn assert_base64url_token(token: &str, what: &str) {
    assert_eq!(token.len(), 43, "{what}: `{token}` is not 43 characters");
    assert!(
        token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
        "{what}: `{token}` is not base64url without padding"
    );
    let decoded = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .unwrap_or_else(|e| panic!("{what}: `{token}` does not decode: {e}"));
    assert_eq!(decoded.len(), 32, "{what}: not 256 bits");
}

fn str_member(body: &Value, name: &str) -> String {
    body[name]
        .as_str()
        .unwrap_or_else(|| panic!("no `{name}` in {body}"))
        .to_owned()
}

/// A token request with the `Authorization: Basic` header.
fn token_post(gw: &TestGateway, client: (&str, &str), form: &[(&str, &str)]) -> RequestBuilder {
    gw.http1
        .post(gw.url(TOKEN_PATH))
        .header("authorization", basic_value(client))
        .form(form)
}

async fn refresh(
    gw: &TestGateway,
    client: (&str, &str),
    refresh_token: &str,
    scope: Option<&str>,
) -> Response {
    let mut form = vec![
        ("grant_type", "refresh_token"),
        ("refresh_token", refresh_token),
    ];
    if let Some(scope) = scope {
        form.push(("scope", scope));
    }
    gw.token_request(Some(client), &form).await
}

/// `GET /api/v1/anything` with a bearer token.
async fn api_call(gw: &TestGateway, token: &str) -> Response {
    gw.bearer_get(&gw.http1, "/api/v1/anything", token).await
}

/// The upstream's JSON echo of a successful API call.
async fn api_ok(gw: &TestGateway, token: &str, what: &str) -> Value {
    let response = api_call(gw, token).await;
    assert_eq!(response.status(), 200, "{what}: API call with a live token");
    response.json().await.unwrap()
}

async fn api_refused(gw: &TestGateway, token: &str, what: &str) {
    let response = api_call(gw, token).await;
    assert_eq!(response.status(), 401, "{what}: API call with a dead token");
    let challenge = header(response.headers(), "www-authenticate").unwrap_or_default();
    assert!(
        challenge.contains("error=\"invalid_token\""),
        "{what}: challenge `{challenge}`"
    );
}

/// A good password grant, to show the gateway still serves after a series of bad requests.
async fn still_serves(gw: &TestGateway) {
    let response = gw.token_request(Some(APP), &password_form(ALEX, &[])).await;
    expect_tokens(
        response,
        Expect::app("good password grant after the bad requests"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_grant_success() {
    let gw = TestGateway::start().await;

    let response = gw.token_request(Some(APP), &password_form(ALEX, &[])).await;
    let default = expect_tokens(response, Expect::app("APP, no scope requested")).await;

    let response = gw
        .token_request(Some(APP), &password_form(ALEX, &[("scope", "read")]))
        .await;
    let read = expect_tokens(
        response,
        Expect {
            scope: "read",
            ..Expect::app("APP, scope=read")
        },
    )
    .await;

    // NOREFRESH lacks the refresh_token grant: no refresh token, and the default
    // lifetime of SPEC §3 (43200 s).
    let response = gw
        .token_request(Some(NOREFRESH), &password_form(ADMIN, &[("scope", "read")]))
        .await;
    let norefresh = expect_tokens(
        response,
        Expect {
            what: "NOREFRESH",
            expires_in: 43200,
            refresh: false,
            scope: "read",
        },
    )
    .await;

    // Every grant gets its own tokens and its own jti.
    let mut seen = std::collections::HashSet::new();
    for body in [&default, &read, &norefresh] {
        for member in ["access_token", "refresh_token", "jti"] {
            if let Some(value) = body[member].as_str() {
                assert!(seen.insert(value.to_owned()), "`{value}` handed out twice");
            }
        }
    }

    // The tokens are live: the upstream sees who they speak for.
    let seen = api_ok(&gw, &str_member(&default, "access_token"), "APP token").await;
    assert_eq!(seen["headers"]["x-authenticated-user"][0], ALEX.0);
    assert_eq!(seen["headers"]["x-authenticated-client"][0], APP.0);
    assert_eq!(seen["headers"]["x-token-id"][0], default["jti"]);
    let seen = api_ok(&gw, &str_member(&read, "access_token"), "APP read token").await;
    assert_eq!(seen["headers"]["x-authenticated-scope"][0], "read");
    let seen = api_ok(
        &gw,
        &str_member(&norefresh, "access_token"),
        "NOREFRESH token",
    )
    .await;
    assert_eq!(seen["headers"]["x-authenticated-user"][0], ADMIN.0);
    assert_eq!(seen["headers"]["x-authenticated-client"][0], NOREFRESH.0);

    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_grant_with_covata_authentication_header() {
    let gw = TestGateway::start().await;
    for (what, value) in [
        ("Authentication: Basic", basic_value(APP)),
        ("Authentication: basic (scheme is case-insensitive)", {
            basic_value(APP).replacen("Basic", "basic", 1)
        }),
    ] {
        let response = gw
            .http1
            .post(gw.url(TOKEN_PATH))
            .header("authentication", value)
            .form(&password_form(ALEX, &[]))
            .send()
            .await
            .unwrap();
        let body = expect_tokens(response, Expect::app(what)).await;
        let seen = api_ok(&gw, &str_member(&body, "access_token"), what).await;
        assert_eq!(
            seen["headers"]["x-authenticated-client"][0], APP.0,
            "{what}"
        );
    }

    // The Covata spelling is checked just as strictly as the standard one.
    let response = gw
        .http1
        .post(gw.url(TOKEN_PATH))
        .header("authentication", basic_value((APP.0, "not-the-secret")))
        .form(&password_form(ALEX, &[]))
        .send()
        .await
        .unwrap();
    assert_eq!(
        header(response.headers(), "www-authenticate"),
        Some("Basic realm=\"covata-gateway\"")
    );
    expect_error(response, 401, "invalid_client").await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_grant_over_http1_and_http2() {
    let gw = TestGateway::start().await;
    for (client, version) in [(&gw.http1, Version::HTTP_11), (&gw.http2, Version::HTTP_2)] {
        let what = format!("{version:?}");
        let response = client
            .post(gw.url(TOKEN_PATH))
            .basic_auth(APP.0, Some(APP.1))
            .form(&password_form(ALEX, &[]))
            .send()
            .await
            .unwrap();
        assert_eq!(response.version(), version, "protocol of the response");
        let body = expect_tokens(response, Expect::app(&what)).await;
        // And an error over the same protocol is a proper RFC 6749 error too.
        let response = client
            .post(gw.url(TOKEN_PATH))
            .basic_auth(APP.0, Some(APP.1))
            .form(&password_form((ALEX.0, "wrong"), &[]))
            .send()
            .await
            .unwrap();
        assert_eq!(response.version(), version, "protocol of the error");
        expect_error(response, 400, "invalid_grant").await;

        let response = gw
            .bearer_get(
                client,
                "/api/v1/anything",
                &str_member(&body, "access_token"),
            )
            .await;
        assert_eq!(response.status(), 200, "{what}: API call");
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_grant_issues_new_working_tokens() {
    let gw = TestGateway::start().await;
    let first = gw.password_grant(APP, ALEX).await;
    let first_access = str_member(&first, "access_token");
    let first_refresh = str_member(&first, "refresh_token");

    let second = expect_tokens(
        refresh(&gw, APP, &first_refresh, None).await,
        Expect::app("refresh"),
    )
    .await;
    let second_access = str_member(&second, "access_token");
    let second_refresh = str_member(&second, "refresh_token");
    assert_ne!(
        second_access, first_access,
        "refresh gave the same access token"
    );
    assert_ne!(
        second_refresh, first_refresh,
        "refresh token did not rotate"
    );
    assert_ne!(second["jti"], first["jti"], "refresh reused the jti");

    let seen = api_ok(&gw, &second_access, "refreshed access token").await;
    assert_eq!(seen["headers"]["x-authenticated-user"][0], ALEX.0);
    assert_eq!(seen["headers"]["x-authenticated-client"][0], APP.0);
    assert_eq!(seen["headers"]["x-authenticated-scope"][0], "read write");
    assert_eq!(seen["headers"]["x-token-id"][0], second["jti"]);
    assert_eq!(
        seen["headers"]["x-authenticated-roles"][0], "ROLE_COLLABORATOR,ROLE_ORIGINATOR",
        "the refreshed token keeps the user's roles"
    );

    // The rotated refresh token works in turn.
    let third = expect_tokens(
        refresh(&gw, APP, &second_refresh, None).await,
        Expect::app("second refresh"),
    )
    .await;
    api_ok(
        &gw,
        &str_member(&third, "access_token"),
        "twice-refreshed token",
    )
    .await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_grant_narrows_scope_and_refuses_widening() {
    let gw = TestGateway::start().await;
    let first = gw.password_grant(APP, ALEX).await;
    assert_eq!(first["scope"], "read write");
    let first_refresh = str_member(&first, "refresh_token");

    // Widening is invalid_scope, and the refused request does not consume the token.
    let body = expect_error(
        refresh(&gw, APP, &first_refresh, Some("admin")).await,
        400,
        "invalid_scope",
    )
    .await;
    assert!(!body.to_string().contains(&first_refresh), "{body}");
    expect_error(
        refresh(&gw, APP, &first_refresh, Some("read admin")).await,
        400,
        "invalid_scope",
    )
    .await;

    let narrowed = expect_tokens(
        refresh(&gw, APP, &first_refresh, Some("read")).await,
        Expect {
            scope: "read",
            ..Expect::app("refresh with scope=read")
        },
    )
    .await;
    let seen = api_ok(
        &gw,
        &str_member(&narrowed, "access_token"),
        "narrowed token",
    )
    .await;
    assert_eq!(seen["headers"]["x-authenticated-scope"][0], "read");
    // The narrowed token lacks `write`, which /api/v1/scoped/** requires.
    let response = gw
        .bearer_get(
            &gw.http1,
            "/api/v1/scoped/x",
            &str_member(&narrowed, "access_token"),
        )
        .await;
    assert_eq!(response.status(), 403, "narrowed token on a write route");

    // RFC 6749 §6: the scope of the original grant carries on; the next refresh may
    // ask for it again (narrowing one access token does not shrink the grant)...
    let next = expect_tokens(
        refresh(
            &gw,
            APP,
            &str_member(&narrowed, "refresh_token"),
            Some("write read"),
        )
        .await,
        Expect {
            scope: "write read",
            ..Expect::app("refresh back to the original scope")
        },
    )
    .await;
    // ...but never beyond it.
    expect_error(
        refresh(&gw, APP, &str_member(&next, "refresh_token"), Some("admin")).await,
        400,
        "invalid_scope",
    )
    .await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reused_refresh_token_revokes_the_whole_family() {
    let gw = TestGateway::start().await;
    let first = gw.password_grant(APP, ALEX).await;
    let first_refresh = str_member(&first, "refresh_token");
    // An unrelated grant of the same user and client, which must survive.
    let other = gw.password_grant(APP, ALEX).await;

    let rotated = expect_tokens(
        refresh(&gw, APP, &first_refresh, None).await,
        Expect::app("rotation"),
    )
    .await;
    let rotated_access = str_member(&rotated, "access_token");
    let rotated_refresh = str_member(&rotated, "refresh_token");
    api_ok(
        &gw,
        &rotated_access,
        "rotated access token before the replay",
    )
    .await;

    // Replay of the already-rotated refresh token.
    let body = expect_error(
        refresh(&gw, APP, &first_refresh, None).await,
        400,
        "invalid_grant",
    )
    .await;
    assert!(!body.to_string().contains(&first_refresh), "{body}");

    // Every token of the family is now dead (RFC 9700 §4.14.2)...
    api_refused(
        &gw,
        &rotated_access,
        "rotated access token after the replay",
    )
    .await;
    api_refused(
        &gw,
        &str_member(&first, "access_token"),
        "original access token after the replay",
    )
    .await;
    expect_error(
        refresh(&gw, APP, &rotated_refresh, None).await,
        400,
        "invalid_grant",
    )
    .await;
    // ...and stays dead: a second replay changes nothing.
    expect_error(
        refresh(&gw, APP, &first_refresh, None).await,
        400,
        "invalid_grant",
    )
    .await;
    api_refused(&gw, &rotated_access, "rotated access token, later").await;

    // Other families are untouched.
    api_ok(&gw, &str_member(&other, "access_token"), "unrelated grant").await;
    expect_tokens(
        refresh(&gw, APP, &str_member(&other, "refresh_token"), None).await,
        Expect::app("refresh of an unrelated grant"),
    )
    .await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_token_of_another_client_is_invalid_grant() {
    let gw = TestGateway::start().await;
    let app_grant = gw.password_grant(APP, ALEX).await;
    let app_refresh = str_member(&app_grant, "refresh_token");

    // SHORT may use the refresh_token grant, but this token was issued to APP: RFC 6749
    // §5.2 names that case under invalid_grant ("was issued to another client").
    let body = expect_error(
        refresh(&gw, SHORT, &app_refresh, None).await,
        400,
        "invalid_grant",
    )
    .await;
    assert!(!body.to_string().contains(&app_refresh), "{body}");

    // NOREFRESH lacks the grant altogether: unauthorized_client, whatever the token.
    expect_error(
        refresh(&gw, NOREFRESH, &app_refresh, None).await,
        400,
        "unauthorized_client",
    )
    .await;

    // Neither attempt used the token up, nor revoked APP's grant.
    api_ok(
        &gw,
        &str_member(&app_grant, "access_token"),
        "APP's access token",
    )
    .await;
    expect_tokens(
        refresh(&gw, APP, &app_refresh, None).await,
        Expect::app("APP refreshing its own token"),
    )
    .await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_credentials_grant_has_no_user_and_no_refresh_token() {
    let gw = TestGateway::start().await;
    let response = gw
        .token_request(Some(SERVICE), &[("grant_type", "client_credentials")])
        .await;
    let status = response.status();
    let headers = response.headers().clone();
    let body: Value = response.json().await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(header(&headers, "cache-control"), Some("no-store"));
    assert_eq!(header(&headers, "pragma"), Some("no-cache"));
    let access = str_member(&body, "access_token");
    assert_base64url_token(&access, "client_credentials access_token");
    assert_eq!(body["token_type"], "bearer");
    assert!(body["expires_in"].as_u64().is_some_and(|e| e > 0), "{body}");
    assert!(
        body.get("refresh_token").is_none(),
        "RFC 6749 §4.4.3: no refresh token for client credentials: {body}"
    );
    let jti = str_member(&body, "jti");
    assert!(uuid::Uuid::parse_str(&jti).is_ok(), "jti `{jti}`");

    // The upstream learns the client and nothing about a user, even if the caller
    // tries to supply one.
    let response = gw
        .http1
        .get(gw.url("/api/v1/anything"))
        .bearer_auth(&access)
        .header("x-authenticated-user", ALEX.0)
        .send()
        .await
        .unwrap();
    let seen = json_ok(response).await;
    let upstream_headers = seen["headers"].as_object().unwrap();
    assert_eq!(seen["headers"]["x-authenticated-client"][0], SERVICE.0);
    assert!(
        !upstream_headers.contains_key("x-authenticated-user"),
        "client_credentials token forwarded a user: {seen}"
    );
    assert_eq!(seen["headers"]["x-token-id"][0], jti.as_str());

    // APP, which also lists client_credentials, gets no refresh token either.
    let response = gw
        .token_request(
            Some(APP),
            &[("grant_type", "client_credentials"), ("scope", "read")],
        )
        .await;
    expect_tokens(
        response,
        Expect {
            what: "APP client_credentials",
            expires_in: 3600,
            refresh: false,
            scope: "read",
        },
    )
    .await;
    gw.stop().await;
}

/// One bad request and the RFC 6749 §5.2 answer it must get.
struct Case {
    what: &'static str,
    request: RequestBuilder,
    status: u16,
    code: &'static str,
}

async fn check_case(case: Case) -> Value {
    let Case {
        what,
        request,
        status,
        code,
    } = case;
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), status, "{what}: status");
    let challenge = header(response.headers(), "www-authenticate").map(str::to_owned);
    if status == 401 {
        assert_eq!(
            challenge.as_deref(),
            Some("Basic realm=\"covata-gateway\""),
            "{what}: invalid_client needs a Basic challenge (RFC 6749 §5.2)"
        );
    }
    let text = response.text().await.unwrap();
    let body: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{what}: body is not JSON ({e}): {text}"));
    assert_eq!(body["error"], code, "{what}: error code in {body}");
    assert!(
        body["error_description"]
            .as_str()
            .is_some_and(|d| !d.is_empty()),
        "{what}: error_description in {body}"
    );
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc6749_errors_for_bad_requests() {
    let gw = TestGateway::start().await;
    let app_refresh = str_member(&gw.password_grant(APP, ALEX).await, "refresh_token");
    let post = || gw.http1.post(gw.url(TOKEN_PATH));
    let good = password_form(ALEX, &[]);
    let raw = |body: &'static str| {
        post()
            .header("authorization", basic_value(APP))
            .header(CONTENT_TYPE, FORM)
            .body(body)
    };

    let cases = vec![
        // Client authentication: 401 invalid_client with a Basic challenge.
        Case {
            what: "Basic credentials that are not base64",
            request: post().header("authorization", "Basic !!!not-base64!!!").form(&good),
            status: 401,
            code: "invalid_client",
        },
        Case {
            what: "Basic credentials without a colon",
            request: post()
                .header("authorization", format!("Basic {}", b64("app")))
                .form(&good),
            status: 401,
            code: "invalid_client",
        },
        Case {
            what: "Authentication header that is not base64",
            request: post().header("authentication", "Basic %%%").form(&good),
            status: 401,
            code: "invalid_client",
        },
        Case {
            what: "wrong client secret",
            request: token_post(&gw, (APP.0, "wrong-secret"), &good),
            status: 401,
            code: "invalid_client",
        },
        Case {
            what: "another client's secret",
            request: token_post(&gw, (APP.0, SERVICE.1), &good),
            status: 401,
            code: "invalid_client",
        },
        Case {
            what: "unknown client",
            request: token_post(&gw, ("no-such-client", "whatever"), &good),
            status: 401,
            code: "invalid_client",
        },
        Case {
            what: "no client authentication at all",
            request: post().form(&good),
            status: 401,
            code: "invalid_client",
        },
        Case {
            what: "a Bearer token instead of Basic client credentials",
            request: post()
                .bearer_auth("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA")
                .form(&good),
            status: 401,
            code: "invalid_client",
        },
        Case {
            what: "client_secret in the body without Basic (not supported)",
            request: post().form(&password_form(
                ALEX,
                &[("client_id", APP.0), ("client_secret", APP.1)],
            )),
            status: 401,
            code: "invalid_client",
        },
        Case {
            what: "confidential client naming itself in the body only",
            request: post().form(&password_form(ALEX, &[("client_id", APP.0)])),
            status: 401,
            code: "invalid_client",
        },
        // invalid_request: malformed requests.
        Case {
            what: "two client authentication methods (Authorization and Authentication)",
            request: token_post(&gw, APP, &good).header("authentication", basic_value(APP)),
            status: 400,
            code: "invalid_request",
        },
        Case {
            what: "two client authentication methods (Basic and client_secret)",
            request: token_post(&gw, APP, &password_form(ALEX, &[("client_secret", APP.1)])),
            status: 400,
            code: "invalid_request",
        },
        Case {
            what: "missing username",
            request: token_post(
                &gw,
                APP,
                &[("grant_type", "password"), ("password", ALEX.1)],
            ),
            status: 400,
            code: "invalid_request",
        },
        Case {
            what: "empty username (RFC 6749 §3.1: empty is absent)",
            request: token_post(&gw, APP, &password_form(("", ALEX.1), &[])),
            status: 400,
            code: "invalid_request",
        },
        Case {
            what: "missing password",
            request: token_post(
                &gw,
                APP,
                &[("grant_type", "password"), ("username", ALEX.0)],
            ),
            status: 400,
            code: "invalid_request",
        },
        Case {
            what: "missing grant_type",
            request: token_post(&gw, APP, &[("username", ALEX.0), ("password", ALEX.1)]),
            status: 400,
            code: "invalid_request",
        },
        Case {
            what: "missing refresh_token on a refresh grant",
            request: token_post(&gw, APP, &[("grant_type", "refresh_token")]),
            status: 400,
            code: "invalid_request",
        },
        Case {
            what: "grant_type sent twice",
            request: raw(
                "grant_type=password&grant_type=password&username=alex%40example.com&password=alex-password",
            ),
            status: 400,
            code: "invalid_request",
        },
        Case {
            what: "password sent twice with different values",
            request: raw(
                "grant_type=password&username=alex%40example.com&password=alex-password&password=x",
            ),
            status: 400,
            code: "invalid_request",
        },
        Case {
            what: "JSON body",
            request: post()
                .header("authorization", basic_value(APP))
                .json(&serde_json::json!({
                    "grant_type": "password",
                    "username": ALEX.0,
                    "password": ALEX.1,
                })),
            status: 400,
            code: "invalid_request",
        },
        Case {
            what: "form body labelled text/plain",
            request: post()
                .header("authorization", basic_value(APP))
                .header(CONTENT_TYPE, "text/plain")
                .body("grant_type=password&username=alex%40example.com&password=alex-password"),
            status: 400,
            code: "invalid_request",
        },
        Case {
            what: "no body and no content type",
            request: post().header("authorization", basic_value(APP)),
            status: 400,
            code: "invalid_request",
        },
        Case {
            what: "empty form body",
            request: raw(""),
            status: 400,
            code: "invalid_request",
        },
        // Grant types.
        Case {
            what: "unsupported grant_type=foo",
            request: token_post(&gw, APP, &[("grant_type", "foo")]),
            status: 400,
            code: "unsupported_grant_type",
        },
        Case {
            what: "NOREFRESH using the refresh_token grant",
            request: token_post(
                &gw,
                NOREFRESH,
                &[("grant_type", "refresh_token"), ("refresh_token", app_refresh.as_str())],
            ),
            status: 400,
            code: "unauthorized_client",
        },
        Case {
            what: "SERVICE using the password grant",
            request: token_post(&gw, SERVICE, &good),
            status: 400,
            code: "unauthorized_client",
        },
        Case {
            what: "NOREFRESH using client_credentials",
            request: token_post(&gw, NOREFRESH, &[("grant_type", "client_credentials")]),
            status: 400,
            code: "unauthorized_client",
        },
        // invalid_grant.
        Case {
            what: "unknown refresh token",
            request: token_post(
                &gw,
                APP,
                &[
                    ("grant_type", "refresh_token"),
                    ("refresh_token", "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"),
                ],
            ),
            status: 400,
            code: "invalid_grant",
        },
        Case {
            what: "an access token presented as a refresh token",
            request: token_post(
                &gw,
                APP,
                &[
                    ("grant_type", "refresh_token"),
                    ("refresh_token", gw.alex_token().await.as_str()),
                ],
            ),
            status: 400,
            code: "invalid_grant",
        },
        // invalid_scope.
        Case {
            what: "scope outside the client's scopes",
            request: token_post(&gw, APP, &password_form(ALEX, &[("scope", "admin")])),
            status: 400,
            code: "invalid_scope",
        },
        Case {
            what: "scope partly outside the client's scopes",
            request: token_post(&gw, APP, &password_form(ALEX, &[("scope", "read admin")])),
            status: 400,
            code: "invalid_scope",
        },
        Case {
            what: "scope with a character RFC 6749 §3.3 forbids",
            request: token_post(&gw, NOREFRESH, &password_form(ALEX, &[("scope", "re\"ad")])),
            status: 400,
            code: "invalid_scope",
        },
        Case {
            what: "client_credentials scope outside the client's scopes",
            request: token_post(
                &gw,
                APP,
                &[("grant_type", "client_credentials"), ("scope", "admin")],
            ),
            status: 400,
            code: "invalid_scope",
        },
    ];
    for case in cases {
        let what = case.what;
        let body = check_case(case).await;
        // No case echoes a secret, a password or a token.
        let text = body.to_string();
        for secret in [APP.1, SERVICE.1, ALEX.1, app_refresh.as_str()] {
            assert!(
                !text.contains(secret),
                "{what}: body echoes `{secret}`: {text}"
            );
        }
    }

    // APP's refresh token was presented by NOREFRESH above; it is still good for APP.
    expect_tokens(
        refresh(&gw, APP, &app_refresh, None).await,
        Expect::app("APP's refresh token after the bad requests"),
    )
    .await;
    still_serves(&gw).await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_user_credentials_are_indistinguishable_and_secrets_never_echo() {
    let gw = TestGateway::start().await;
    let wrong_password = "Wr0ng-P4ssw0rd-c4n4ry";
    let unknown_user = "nobody-c4n4ry@example.com";

    let wrong = gw
        .token_request(Some(APP), &password_form((ALEX.0, wrong_password), &[]))
        .await;
    let wrong_text = expect_error(wrong, 400, "invalid_grant").await.to_string();
    let unknown = gw
        .token_request(
            Some(APP),
            &password_form((unknown_user, wrong_password), &[]),
        )
        .await;
    let unknown_body = expect_error(unknown, 400, "invalid_grant").await;
    let wrong_body: Value = serde_json::from_str(&wrong_text).unwrap();
    assert_eq!(
        wrong_body, unknown_body,
        "unknown user and wrong password must answer alike (no user enumeration)"
    );
    // Even the right password of another user is just "bad credentials".
    let crossed = gw
        .token_request(Some(APP), &password_form((ALEX.0, ADMIN.1), &[]))
        .await;
    assert_eq!(
        expect_error(crossed, 400, "invalid_grant").await,
        wrong_body
    );
    for (what, text) in [
        ("wrong password", &wrong_text),
        ("unknown user", &unknown_body.to_string()),
    ] {
        assert!(
            !text.contains(wrong_password),
            "{what}: echoes the password: {text}"
        );
        assert!(
            !text.contains(unknown_user),
            "{what}: echoes the username: {text}"
        );
        assert!(
            !text.contains(APP.1),
            "{what}: echoes the client secret: {text}"
        );
    }

    // A wrong client secret is not echoed either, nor is the user's password.
    let wrong_secret = "s3cr3t-c4n4ry-xyz";
    let response = gw
        .token_request(Some((APP.0, wrong_secret)), &password_form(ALEX, &[]))
        .await;
    assert_eq!(
        header(response.headers(), "www-authenticate"),
        Some("Basic realm=\"covata-gateway\"")
    );
    let text = expect_error(response, 401, "invalid_client")
        .await
        .to_string();
    assert!(
        !text.contains(wrong_secret),
        "echoes the client secret: {text}"
    );
    assert!(!text.contains(ALEX.1), "echoes the user's password: {text}");

    // An unknown client answers exactly like a wrong secret (no client enumeration).
    let response = gw
        .token_request(
            Some(("no-such-client", wrong_secret)),
            &password_form(ALEX, &[]),
        )
        .await;
    let unknown_client = expect_error(response, 401, "invalid_client").await;
    assert_eq!(unknown_client.to_string(), text);

    // A secret that is right once is not remembered for a different, wrong one.
    gw.password_grant(APP, ALEX).await;
    let response = gw
        .token_request(Some((APP.0, wrong_secret)), &password_form(ALEX, &[]))
        .await;
    expect_error(response, 401, "invalid_client").await;

    still_serves(&gw).await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_refresh_token_is_invalid_grant() {
    let gw = TestGateway::start().await;
    let response = gw
        .token_request(Some(SHORT), &password_form(ALEX, &[("scope", "read")]))
        .await;
    let grant = expect_tokens(
        response,
        Expect {
            what: "SHORT password grant",
            expires_in: 1,
            refresh: true,
            scope: "read",
        },
    )
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    let body = expect_error(
        refresh(&gw, SHORT, &str_member(&grant, "refresh_token"), None).await,
        400,
        "invalid_grant",
    )
    .await;
    assert!(!body
        .to_string()
        .contains(&str_member(&grant, "refresh_token")));
    // The access token of the same grant expired too.
    api_refused(
        &gw,
        &str_member(&grant, "access_token"),
        "expired access token",
    )
    .await;
    still_serves(&gw).await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_on_the_token_endpoint_is_405_with_allow_post() {
    let gw = TestGateway::start().await;
    for (client, version) in [(&gw.http1, "HTTP/1.1"), (&gw.http2, "HTTP/2")] {
        for (what, path) in [
            ("GET", TOKEN_PATH.to_owned()),
            (
                "GET with the grant in the query",
                format!(
                    "{TOKEN_PATH}?grant_type=password&username=alex%40example.com&password=alex-password"
                ),
            ),
        ] {
            let response = client
                .get(gw.url(&path))
                .basic_auth(APP.0, Some(APP.1))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 405, "{version} {what}");
            assert_eq!(
                header(response.headers(), "allow"),
                Some("POST"),
                "{version} {what}: 405 needs Allow (RFC 9110 §15.5.6)"
            );
            let text = response.text().await.unwrap();
            assert!(!text.contains("access_token"), "{version} {what}: {text}");
            assert!(!text.contains(ALEX.1), "{version} {what}: {text}");
        }
    }
    still_serves(&gw).await;
    gw.stop().await;
}

/// Sends `body` to the token endpoint `times` times; every one must be answered 413.
/// A transport error instead (the gateway closing the connection under the client's
/// feet, so the 413 is never read) counts as a failure: RFC 9112 §9.6. Returns a line
/// per failed group, so the test can report every group at once.
async fn check_413(
    gw: &TestGateway,
    client: &reqwest::Client,
    what: &str,
    times: usize,
    body: impl Fn() -> reqwest::Body,
) -> Option<String> {
    let mut failures = Vec::new();
    for attempt in 0..times {
        let sent = client
            .post(gw.url(TOKEN_PATH))
            .basic_auth(APP.0, Some(APP.1))
            .header(CONTENT_TYPE, FORM)
            .body(body())
            .send()
            .await;
        match sent {
            Ok(response) if response.status() == 413 => {}
            Ok(response) => failures.push(format!("  attempt {attempt}: {}", response.status())),
            Err(error) => failures.push(format!("  attempt {attempt}: no response: {error:?}")),
        }
    }
    (!failures.is_empty()).then(|| {
        format!(
            "{what}: {} of {times} requests did not get a 413:\n{}",
            failures.len(),
            failures.join("\n")
        )
    })
}

/// Makes a fresh request body for each attempt.
type BodyMaker = Box<dyn Fn() -> reqwest::Body>;

fn padded_form(len: usize) -> String {
    let mut body =
        String::from("grant_type=password&username=alex%40example.com&password=alex-password&pad=");
    body.push_str(&"x".repeat(len - body.len()));
    assert_eq!(body.len(), len);
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_bodies_get_413() {
    let gw = TestGateway::start().await;
    let limit = 64 * 1024;
    let mib = 1024 * 1024;
    let mut failed = Vec::new();
    for (client, version) in [(&gw.http1, "HTTP/1.1"), (&gw.http2, "HTTP/2")] {
        let groups: [(&str, usize, BodyMaker); 4] = [
            // Declared with Content-Length: refused before reading.
            (
                "64 KiB + 1 byte, Content-Length",
                12,
                Box::new(move || padded_form(limit + 1).into()),
            ),
            (
                "1 MiB, Content-Length",
                20,
                Box::new(move || padded_form(mib).into()),
            ),
            // Streamed without a length (chunked on HTTP/1.1): the limit holds while reading.
            (
                "64 KiB + 4 KiB, streamed",
                4,
                Box::new(move || streamed_body(limit + 4096)),
            ),
            ("1 MiB, streamed", 6, Box::new(move || streamed_body(mib))),
        ];
        for (what, times, body) in groups {
            let what = format!("{version}: {what}");
            failed.extend(check_413(&gw, client, &what, times, body).await);
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n"));

    // A form of exactly 64 KiB is within the limit and is served.
    let response = gw
        .http1
        .post(gw.url(TOKEN_PATH))
        .basic_auth(APP.0, Some(APP.1))
        .header(CONTENT_TYPE, FORM)
        .body(padded_form(limit))
        .send()
        .await
        .unwrap();
    expect_tokens(response, Expect::app("a form of exactly 64 KiB")).await;

    still_serves(&gw).await;
    gw.stop().await;
}
