//! The rest of a token's life, end to end (SPEC §1 "Revocation and expiry",
//! "Introspection and metadata", §3; README "Token lifecycle"): RFC 7009 and Covata
//! revocation, expiring a user's tokens, RFC 7662 introspection, RFC 8414 metadata,
//! refresh rotation with reuse detection (RFC 9700) and its grace period, the table and
//! per-user caps, and the token snapshot across restarts of the real binary.

mod common;
use common::process::{api_status, granted, url, Process};
use common::*;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use reqwest::header::HeaderMap;
use reqwest::{Response, StatusCode};
use serde_json::{json, Value};

const REVOKE: &str = "/api/oauth/revoke";
const INTROSPECT: &str = "/api/oauth/introspect";
const COVATA_REVOKE: &str = "/api/v1/auth/token/revoke";
const EXPIRE_ME: &str = "/api/v1/users/me/expire";
const METADATA: &str = "/.well-known/oauth-authorization-server";

/// Well-formed (43 base64url characters) but never issued.
const UNKNOWN_TOKEN: &str = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";

/// What a token response handed out.
struct Tokens {
    access: String,
    refresh: String,
    jti: String,
    body: Value,
}

impl Tokens {
    fn from_body(body: Value) -> Tokens {
        let text = |name: &str| body[name].as_str().unwrap_or_default().to_owned();
        let (access, refresh, jti) = (text("access_token"), text("refresh_token"), text("jti"));
        Tokens {
            access,
            refresh,
            jti,
            body,
        }
    }
}

/// A password grant that must succeed.
async fn sign_in(gw: &TestGateway, client: (&str, &str), user: (&str, &str)) -> Tokens {
    let tokens = Tokens::from_body(gw.password_grant(client, user).await);
    assert!(!tokens.access.is_empty(), "{}", tokens.body);
    tokens
}

/// `grant_type=refresh_token` through `client`.
async fn refresh(gw: &TestGateway, client: (&str, &str), refresh_token: &str) -> Response {
    gw.token_request(
        Some(client),
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh_token),
        ],
    )
    .await
}

/// A refresh through APP that must succeed.
async fn refreshed(gw: &TestGateway, refresh_token: &str, what: &str) -> Tokens {
    let response = refresh(gw, APP, refresh_token).await;
    let status = response.status();
    let body: Value = response.json().await.unwrap();
    assert_eq!(status, 200, "{what}: refresh refused: {body}");
    let tokens = Tokens::from_body(body);
    assert!(!tokens.refresh.is_empty(), "{what}: {}", tokens.body);
    tokens
}

/// A refresh through APP that must fail with `invalid_grant`.
async fn refresh_refused(gw: &TestGateway, refresh_token: &str, what: &str) {
    let response = refresh(gw, APP, refresh_token).await;
    assert_eq!(
        response.status(),
        400,
        "{what}: the refresh token still works"
    );
    expect_error(response, 400, "invalid_grant").await;
}

/// `GET /api/v1/things` with the bearer token.
async fn api(gw: &TestGateway, token: &str) -> Response {
    gw.bearer_get(&gw.http1, "/api/v1/things", token).await
}

async fn assert_live(gw: &TestGateway, token: &str, what: &str) {
    let response = api(gw, token).await;
    let status = response.status();
    let body = response.text().await.unwrap();
    assert_eq!(
        status, 200,
        "{what}: the token should still work; body {body}"
    );
}

/// The token is refused at once: 401 `invalid_token` (RFC 6750 §3.1).
async fn assert_dead(gw: &TestGateway, token: &str, what: &str) {
    let response = api(gw, token).await;
    assert_eq!(response.status(), 401, "{what}: the token still works");
    let challenge = header(response.headers(), "www-authenticate")
        .unwrap_or_default()
        .to_owned();
    assert!(
        challenge.starts_with("Bearer") && challenge.contains("error=\"invalid_token\""),
        "{what}: WWW-Authenticate {challenge:?}"
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "invalid_token", "{what}: {body}");
}

/// `POST /api/oauth/revoke` with Basic credentials (if any) and a form.
async fn revoke(gw: &TestGateway, basic: Option<(&str, &str)>, form: &[(&str, &str)]) -> Response {
    let mut request = gw.http1.post(gw.url(REVOKE)).form(form);
    if let Some((id, secret)) = basic {
        request = request.basic_auth(id, Some(secret));
    }
    request.send().await.unwrap()
}

/// RFC 7009 revocation that must answer 200.
async fn revoke_ok(gw: &TestGateway, client: (&str, &str), form: &[(&str, &str)], what: &str) {
    let response = revoke(gw, Some(client), form).await;
    let status = response.status();
    let body = response.text().await.unwrap();
    assert_eq!(status, 200, "{what}: body {body}");
}

/// RFC 7009 revocation of `token` with a `token_type_hint`, which must answer 200.
async fn revoke_hinted(
    gw: &TestGateway,
    client: (&str, &str),
    token: &str,
    hint: &str,
    what: &str,
) {
    revoke_ok(
        gw,
        client,
        &[("token", token), ("token_type_hint", hint)],
        what,
    )
    .await;
}

/// `POST /api/oauth/introspect`: status, headers and JSON body.
async fn introspect(
    gw: &TestGateway,
    basic: Option<(&str, &str)>,
    token: &str,
) -> (StatusCode, HeaderMap, Value) {
    let mut request = gw.http1.post(gw.url(INTROSPECT)).form(&[("token", token)]);
    if let Some((id, secret)) = basic {
        request = request.basic_auth(id, Some(secret));
    }
    let response = request.send().await.unwrap();
    let (status, headers) = (response.status(), response.headers().clone());
    let body: Value = response.json().await.unwrap_or(Value::Null);
    (status, headers, body)
}

/// Introspection says exactly `{"active": false}` (RFC 7662 §2.2), not cacheable.
async fn assert_inactive(gw: &TestGateway, token: &str, what: &str) {
    let (status, headers, body) = introspect(gw, Some(APP), token).await;
    assert_eq!(status, 200, "{what}: {body}");
    assert_eq!(
        header(&headers, "cache-control"),
        Some("no-store"),
        "{what}"
    );
    assert_eq!(body, json!({ "active": false }), "{what}");
}

/// `PUT` an expire path with a bearer token.
async fn expire(gw: &TestGateway, path: &str, token: &str) -> Response {
    gw.http1
        .put(gw.url(path))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

// ---------------------------------------------------------------------------------------
// RFC 7009: POST /api/oauth/revoke

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc7009_revoking_an_access_token_kills_it_at_once_and_spares_its_refresh_token() {
    let gw = TestGateway::start().await;
    let alex = sign_in(&gw, APP, ALEX).await;
    assert_live(&gw, &alex.access, "before revocation").await;

    revoke_hinted(
        &gw,
        APP,
        &alex.access,
        "access_token",
        "revoke access token",
    )
    .await;
    assert_dead(&gw, &alex.access, "revoked access token").await;

    // An access token goes alone: its refresh token still gets a working pair.
    let renewed = refreshed(&gw, &alex.refresh, "refresh after access revocation").await;
    assert_live(&gw, &renewed.access, "access token from the refresh").await;
    assert_dead(&gw, &alex.access, "revoked access token after the refresh").await;

    // RFC 7009 §2.1: a wrong hint only widens the search; the token is still revoked.
    let other = sign_in(&gw, APP, ALEX).await;
    revoke_hinted(
        &gw,
        APP,
        &other.access,
        "refresh_token",
        "revoke access token with a refresh_token hint",
    )
    .await;
    assert_dead(
        &gw,
        &other.access,
        "access token revoked under a wrong hint",
    )
    .await;
    assert_live(&gw, &renewed.access, "the other grant").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc7009_revoking_a_refresh_token_kills_its_whole_grant() {
    let gw = TestGateway::start().await;
    let first = sign_in(&gw, APP, ALEX).await;
    let second = refreshed(&gw, &first.refresh, "rotate").await;
    let unrelated = sign_in(&gw, APP, ALEX).await;
    assert_live(&gw, &first.access, "original access token").await;
    assert_live(&gw, &second.access, "rotated access token").await;

    revoke_hinted(
        &gw,
        APP,
        &second.refresh,
        "refresh_token",
        "revoke refresh token",
    )
    .await;
    assert_dead(
        &gw,
        &second.access,
        "access token of the revoked refresh token",
    )
    .await;
    assert_dead(&gw, &first.access, "older access token of the same grant").await;
    refresh_refused(&gw, &second.refresh, "revoked refresh token").await;

    // Without a hint as well, and the user's other grant is untouched.
    let third = sign_in(&gw, APP, ALEX).await;
    revoke_ok(
        &gw,
        APP,
        &[("token", &third.refresh)],
        "revoke without hint",
    )
    .await;
    assert_dead(&gw, &third.access, "access token, refresh revoked unhinted").await;
    refresh_refused(&gw, &third.refresh, "refresh revoked unhinted").await;
    assert_live(&gw, &unrelated.access, "another grant of the same user").await;
    refreshed(&gw, &unrelated.refresh, "another grant's refresh token").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc7009_unknown_tokens_and_other_clients_tokens_answer_200_and_change_nothing() {
    let gw = TestGateway::start().await;
    revoke_ok(&gw, APP, &[("token", UNKNOWN_TOKEN)], "unknown token").await;
    revoke_ok(&gw, APP, &[("token", "not even a token")], "garbage token").await;

    let alex = sign_in(&gw, APP, ALEX).await;
    // SERVICE and SHORT are authenticated, but the tokens are APP's (RFC 7009 §2.1).
    revoke_ok(&gw, SERVICE, &[("token", &alex.access)], "foreign access").await;
    revoke_hinted(
        &gw,
        SHORT,
        &alex.refresh,
        "refresh_token",
        "foreign refresh",
    )
    .await;
    assert_live(
        &gw,
        &alex.access,
        "APP's access token after others revoked it",
    )
    .await;
    let (_, _, seen) = introspect(&gw, Some(APP), &alex.refresh).await;
    assert_eq!(
        seen["active"], true,
        "refresh token after others revoked it"
    );
    refreshed(
        &gw,
        &alex.refresh,
        "APP's refresh token after others revoked it",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc7009_needs_client_auth_a_token_and_post() {
    let gw = TestGateway::start().await;
    let alex = sign_in(&gw, APP, ALEX).await;

    let response = revoke(&gw, None, &[("token", &alex.access)]).await;
    let challenge = header(response.headers(), "www-authenticate").map(str::to_owned);
    expect_error(response, 401, "invalid_client").await;
    assert!(
        challenge.as_deref().is_some_and(|c| c.starts_with("Basic")),
        "{challenge:?}"
    );
    let response = revoke(
        &gw,
        Some((APP.0, "wrong-secret")),
        &[("token", &alex.access)],
    )
    .await;
    expect_error(response, 401, "invalid_client").await;
    assert_live(&gw, &alex.access, "after unauthenticated revocations").await;

    let response = revoke(&gw, Some(APP), &[("token_type_hint", "access_token")]).await;
    expect_error(response, 400, "invalid_request").await;

    let response = gw
        .http1
        .get(gw.url(&format!("{REVOKE}?token={}", alex.access)))
        .basic_auth(APP.0, Some(APP.1))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 405);
    let allow = header(response.headers(), "allow").unwrap_or_default();
    assert!(allow.contains("POST"), "Allow: {allow:?}");
    assert_live(&gw, &alex.access, "after a GET revocation").await;
}

// ---------------------------------------------------------------------------------------
// Covata: POST /api/v1/auth/token/revoke

async fn covata_revoke(gw: &TestGateway, bearer: Option<&str>, token: Option<&str>) -> Response {
    let form: Vec<(&str, &str)> = token.map(|t| ("token", t)).into_iter().collect();
    let mut request = gw.http1.post(gw.url(COVATA_REVOKE)).form(&form);
    if let Some(bearer) = bearer {
        request = request.bearer_auth(bearer);
    }
    request.send().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn covata_revoke_kills_the_bearer_token_and_its_refresh_token() {
    let gw = TestGateway::start().await;
    let alex = sign_in(&gw, APP, ALEX).await;
    let other = sign_in(&gw, APP, ALEX).await;

    let response = covata_revoke(&gw, Some(&alex.access), Some(&alex.access)).await;
    let status = response.status();
    let body = response.text().await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_dead(&gw, &alex.access, "Covata-revoked access token").await;
    refresh_refused(
        &gw,
        &alex.refresh,
        "refresh token of a Covata-revoked token",
    )
    .await;
    assert_inactive(
        &gw,
        &alex.refresh,
        "refresh token of a Covata-revoked token",
    )
    .await;
    assert_live(&gw, &other.access, "another grant of the same user").await;

    // A rotated grant: revoking the newest access token takes the older ones too.
    let rotated = refreshed(&gw, &other.refresh, "rotate").await;
    let response = covata_revoke(&gw, Some(&rotated.access), Some(&rotated.access)).await;
    assert_eq!(response.status(), 200);
    assert_dead(&gw, &rotated.access, "Covata-revoked rotated token").await;
    assert_dead(&gw, &other.access, "older access token of that grant").await;
    refresh_refused(&gw, &rotated.refresh, "rotated refresh token").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn covata_revoke_refuses_a_mismatched_token_and_a_missing_or_dead_bearer() {
    let gw = TestGateway::start().await;
    let alex = sign_in(&gw, APP, ALEX).await;
    let admin = sign_in(&gw, APP, ADMIN).await;

    let response = covata_revoke(&gw, Some(&alex.access), Some(&admin.access)).await;
    expect_error(response, 400, "invalid_request").await;
    assert_live(&gw, &alex.access, "bearer of a refused revocation").await;
    assert_live(&gw, &admin.access, "token named by a refused revocation").await;

    let response = covata_revoke(&gw, None, Some(&alex.access)).await;
    assert_eq!(response.status(), 401);
    let challenge = header(response.headers(), "www-authenticate").unwrap_or_default();
    assert!(challenge.starts_with("Bearer"), "{challenge:?}");
    assert_live(&gw, &alex.access, "after a revocation without bearer").await;

    let response = covata_revoke(&gw, Some(UNKNOWN_TOKEN), Some(UNKNOWN_TOKEN)).await;
    expect_error(response, 401, "invalid_token").await;
}

// ---------------------------------------------------------------------------------------
// PUT /api/v1/users/{me|username}/expire

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expire_me_revokes_every_token_of_the_caller_and_no_one_else() {
    let gw = TestGateway::start().await;
    let first = sign_in(&gw, APP, ALEX).await;
    let second = sign_in(&gw, APP, ALEX).await;
    let rotated = refreshed(&gw, &second.refresh, "rotate the second grant").await;
    let no_refresh = sign_in(&gw, NOREFRESH, ALEX).await;
    let admin = sign_in(&gw, APP, ADMIN).await;
    let service = Tokens::from_body(
        gw.token_request(Some(SERVICE), &[("grant_type", "client_credentials")])
            .await
            .json()
            .await
            .unwrap(),
    );

    let response = expire(&gw, EXPIRE_ME, &first.access).await;
    let status = response.status();
    let body: Value = response.json().await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["revoked_grants"], 3, "three sign-ins of alex: {body}");

    for (token, what) in [
        (&first.access, "first sign-in (the caller)"),
        (&second.access, "second sign-in"),
        (&rotated.access, "second sign-in, rotated"),
        (&no_refresh.access, "sign-in through another client"),
    ] {
        assert_dead(&gw, token, what).await;
    }
    refresh_refused(&gw, &first.refresh, "first refresh token").await;
    refresh_refused(&gw, &rotated.refresh, "rotated refresh token").await;
    assert_live(&gw, &admin.access, "another user's token").await;
    assert_live(&gw, &service.access, "a client-credentials token").await;
    refreshed(&gw, &admin.refresh, "another user's refresh token").await;

    // The caller's token is gone too, so it cannot expire anything any more.
    let response = expire(&gw, EXPIRE_ME, &first.access).await;
    expect_error(response, 401, "invalid_token").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiring_another_user_needs_an_admin_role() {
    let gw = TestGateway::start().await;
    let alex = sign_in(&gw, APP, ALEX).await;
    let admin = sign_in(&gw, APP, ADMIN).await;

    let response = expire(
        &gw,
        "/api/v1/users/admin%40example.com/expire",
        &alex.access,
    )
    .await;
    let challenge = header(response.headers(), "www-authenticate").map(str::to_owned);
    expect_error(response, 403, "insufficient_scope").await;
    assert!(
        challenge
            .as_deref()
            .is_some_and(|c| c.contains("insufficient_scope")),
        "{challenge:?}"
    );
    assert_live(&gw, &admin.access, "admin after alex tried to expire them").await;

    let response = expire(
        &gw,
        "/api/v1/users/alex%40example.com/expire",
        &admin.access,
    )
    .await;
    let status = response.status();
    let body: Value = response.json().await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["revoked_grants"], 1, "{body}");
    assert_dead(&gw, &alex.access, "alex expired by an admin").await;
    refresh_refused(&gw, &alex.refresh, "alex's refresh token").await;
    assert_live(&gw, &admin.access, "the admin's own token").await;

    let response = expire(
        &gw,
        "/api/v1/users/nobody%40example.com/expire",
        &admin.access,
    )
    .await;
    expect_error(response, 404, "not_found").await;

    let service = gw
        .token_request(Some(SERVICE), &[("grant_type", "client_credentials")])
        .await;
    let service = Tokens::from_body(json_ok(service).await);
    let response = expire(&gw, EXPIRE_ME, &service.access).await;
    expect_error(response, 400, "invalid_request").await;
    assert_live(&gw, &service.access, "client-credentials token").await;
}

// ---------------------------------------------------------------------------------------
// RFC 7662: POST /api/oauth/introspect

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn introspection_of_live_tokens_reports_their_claims() {
    let gw = TestGateway::start().await;
    let before = now_secs();
    let alex = sign_in(&gw, APP, ALEX).await;

    let (status, headers, body) = introspect(&gw, Some(APP), &alex.access).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(header(&headers, "cache-control"), Some("no-store"));
    assert!(
        header(&headers, "content-type").is_some_and(|c| c.starts_with("application/json")),
        "{headers:?}"
    );
    assert_eq!(body["active"], true, "{body}");
    assert_eq!(body["token_type"], "bearer", "{body}");
    assert_eq!(body["client_id"], APP.0, "{body}");
    assert_eq!(body["username"], ALEX.0, "{body}");
    assert_eq!(body["scope"], alex.body["scope"], "{body}");
    let scopes: BTreeSet<&str> = body["scope"].as_str().unwrap().split(' ').collect();
    assert_eq!(scopes, BTreeSet::from(["read", "write"]), "{body}");
    assert_eq!(body["jti"], alex.jti.as_str(), "{body}");
    assert!(!alex.jti.is_empty());
    let roles: BTreeSet<&str> = body["roles"]
        .as_array()
        .unwrap_or_else(|| panic!("no roles: {body}"))
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    assert_eq!(
        roles,
        BTreeSet::from(["ROLE_COLLABORATOR", "ROLE_ORIGINATOR"]),
        "{body}"
    );
    let iat = body["iat"]
        .as_u64()
        .unwrap_or_else(|| panic!("iat: {body}"));
    let exp = body["exp"]
        .as_u64()
        .unwrap_or_else(|| panic!("exp: {body}"));
    assert!(
        iat + 1 >= before && iat <= now_secs() + 1,
        "iat {iat} is seconds since the epoch, now {before}"
    );
    assert!(
        (3599..=3601).contains(&(exp - iat)),
        "exp {exp} - iat {iat}: APP's tokens live 3600 s"
    );

    let (status, headers, body) = introspect(&gw, Some(APP), &alex.refresh).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(header(&headers, "cache-control"), Some("no-store"));
    assert_eq!(body["active"], true, "{body}");
    assert_eq!(body["token_type"], "refresh_token", "{body}");
    assert_eq!(body["client_id"], APP.0, "{body}");
    assert_eq!(body["username"], ALEX.0, "{body}");
    let exp = body["exp"]
        .as_u64()
        .unwrap_or_else(|| panic!("exp: {body}"));
    assert!(
        (86_399..=86_401).contains(&(exp - now_secs())),
        "refresh exp {exp}: APP's refresh tokens live 86400 s"
    );

    // Another authenticated client (a resource server) may introspect too.
    let (status, _, body) = introspect(&gw, Some(SERVICE), &alex.access).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["active"], true, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn introspection_of_expired_revoked_used_and_unknown_tokens_is_just_inactive() {
    let gw = TestGateway::start().await;
    let short = sign_in(&gw, SHORT, ALEX).await;
    let (_, _, body) = introspect(&gw, Some(APP), &short.access).await;
    assert_eq!(body["active"], true, "a fresh SHORT token: {body}");

    let revoked = sign_in(&gw, APP, ALEX).await;
    revoke_ok(&gw, APP, &[("token", &revoked.refresh)], "revoke").await;
    let rotated = sign_in(&gw, APP, ALEX).await;
    refreshed(&gw, &rotated.refresh, "rotate").await;

    assert_inactive(&gw, &revoked.access, "access token of a revoked grant").await;
    assert_inactive(&gw, &revoked.refresh, "revoked refresh token").await;
    assert_inactive(&gw, &rotated.refresh, "used (rotated) refresh token").await;
    assert_inactive(&gw, UNKNOWN_TOKEN, "unknown token").await;
    assert_inactive(&gw, "not a token at all", "garbage").await;

    let (status, _, body) = introspect(&gw, None, &rotated.access).await;
    assert_eq!(status, 401, "no client auth: {body}");
    assert_eq!(body["error"], "invalid_client", "{body}");
    assert!(body.get("active").is_none(), "{body}");

    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_inactive(&gw, &short.access, "expired access token").await;
    assert_inactive(&gw, &short.refresh, "expired refresh token").await;
}

// ---------------------------------------------------------------------------------------
// RFC 8414: GET /.well-known/oauth-authorization-server

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_metadata_names_the_endpoints_grants_and_pkce() {
    let gw = TestGateway::start().await;
    let issuer = format!("https://127.0.0.1:{}", gw.addr.port());
    for (client, what) in [(&gw.http1, "HTTP/1.1"), (&gw.http2, "HTTP/2")] {
        let response = client.get(gw.url(METADATA)).send().await.unwrap();
        assert_eq!(response.status(), 200, "{what}");
        let content_type = header(response.headers(), "content-type").unwrap_or_default();
        assert!(
            content_type.starts_with("application/json"),
            "{what}: {content_type}"
        );
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["issuer"], issuer.as_str(), "{what}: {body}");
        for (member, path) in [
            ("token_endpoint", "/api/oauth/token"),
            ("authorization_endpoint", "/api/oauth/authorize"),
            ("revocation_endpoint", REVOKE),
            ("introspection_endpoint", INTROSPECT),
        ] {
            assert_eq!(body[member], format!("{issuer}{path}"), "{what}: {body}");
        }
        let grants: Vec<&str> = body["grant_types_supported"]
            .as_array()
            .unwrap_or_else(|| panic!("{what}: {body}"))
            .iter()
            .map(|g| g.as_str().unwrap())
            .collect();
        for grant in ["password", "refresh_token", "client_credentials"] {
            assert!(grants.contains(&grant), "{what}: {grant} missing: {body}");
        }
        assert_eq!(
            body["code_challenge_methods_supported"],
            json!(["S256"]),
            "{what}"
        );
        let response_types = body["response_types_supported"].as_array();
        assert!(
            response_types.is_some_and(|t| t.contains(&json!("code"))),
            "{what}: RFC 8414 requires response_types_supported: {body}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Refresh rotation: reuse detection and the grace period (RFC 9700 §4.14.2)

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_refresh_token_revokes_every_token_of_its_family() {
    let gw = TestGateway::start().await;
    let first = sign_in(&gw, APP, ALEX).await;
    let second = refreshed(&gw, &first.refresh, "first rotation").await;
    let third = refreshed(&gw, &second.refresh, "second rotation").await;
    let bystander = sign_in(&gw, APP, ALEX).await;
    assert_live(&gw, &third.access, "newest access token").await;

    // The original, long rotated, comes back: a thief or a stale client.
    refresh_refused(&gw, &first.refresh, "replayed original refresh token").await;
    for (token, what) in [
        (&first.access, "original access token"),
        (&second.access, "first rotated access token"),
        (&third.access, "newest access token"),
    ] {
        assert_dead(&gw, token, what).await;
    }
    refresh_refused(&gw, &third.refresh, "newest refresh token").await;
    assert_inactive(&gw, &third.refresh, "newest refresh token").await;
    assert_live(&gw, &bystander.access, "another grant of the same user").await;
    refreshed(&gw, &bystander.refresh, "another grant's refresh token").await;

    // Without a grace period even an immediate second use is a replay.
    let again = sign_in(&gw, APP, ALEX).await;
    let next = refreshed(&gw, &again.refresh, "rotation").await;
    refresh_refused(&gw, &again.refresh, "immediate reuse").await;
    assert_dead(&gw, &next.access, "access token of the replayed family").await;
    refresh_refused(&gw, &next.refresh, "refresh token of the replayed family").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_used_refresh_token_works_again_only_within_the_grace_period() {
    let gw = TestGateway::start_with("[tokens]\nrefresh_reuse_grace = \"2s\"\n", "").await;
    let first = sign_in(&gw, APP, ALEX).await;
    let used = Instant::now();
    let second = refreshed(&gw, &first.refresh, "first use").await;
    // The client lost that response and retries: within the grace it gets new tokens.
    let retried = refreshed(&gw, &first.refresh, "reuse within the grace").await;
    assert!(
        used.elapsed() < Duration::from_millis(1500),
        "too slow to test the grace"
    );
    assert_ne!(retried.access, second.access);
    assert_live(&gw, &second.access, "first rotation").await;
    assert_live(&gw, &retried.access, "retried rotation").await;
    let bystander = sign_in(&gw, APP, ALEX).await;

    tokio::time::sleep_until((used + Duration::from_millis(2300)).into()).await;
    refresh_refused(&gw, &first.refresh, "reuse after the grace").await;
    for (token, what) in [
        (&first.access, "original access token"),
        (&second.access, "first rotation"),
        (&retried.access, "retried rotation"),
    ] {
        assert_dead(&gw, token, what).await;
    }
    refresh_refused(&gw, &second.refresh, "first rotation's refresh token").await;
    refresh_refused(&gw, &retried.refresh, "retried rotation's refresh token").await;
    assert_live(&gw, &bystander.access, "another grant").await;
}

// ---------------------------------------------------------------------------------------
// Caps

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_table_answers_503_until_revocation_makes_room() {
    let gw = TestGateway::start_with("[tokens]\nmax_live_tokens = 6\n", "").await;
    // Each APP sign-in is two records (access + refresh).
    let a = sign_in(&gw, APP, ALEX).await;
    let b = sign_in(&gw, APP, ADMIN).await;
    let c = sign_in(&gw, APP, ALEX).await;

    let full = gw.token_request(Some(APP), &password_form(ALEX, &[])).await;
    expect_error(full, 503, "temporarily_unavailable").await;
    let full = refresh(&gw, APP, &c.refresh).await;
    expect_error(full, 503, "temporarily_unavailable").await;
    assert_live(&gw, &a.access, "an issued token while the table is full").await;

    // Revoking a grant frees its two records; the refused refresh did not use c's token.
    revoke_ok(&gw, APP, &[("token", &a.refresh)], "make room").await;
    let c2 = refreshed(&gw, &c.refresh, "refresh once there is room").await;
    assert_live(&gw, &c2.access, "refreshed token").await;
    let full = gw
        .token_request(Some(SERVICE), &[("grant_type", "client_credentials")])
        .await;
    expect_error(full, 503, "temporarily_unavailable").await;

    revoke_ok(&gw, APP, &[("token", &b.refresh)], "make room again").await;
    let d = sign_in(&gw, APP, ADMIN).await;
    assert_live(&gw, &d.access, "sign-in once there is room").await;
}

/// `max_live_tokens` is the most records the table holds: a grant that needs two
/// records when one is left must not push the table past it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_table_never_holds_more_than_max_live_tokens() {
    let gw = TestGateway::start_with("[tokens]\nmax_live_tokens = 5\n", "").await;
    let table = || gw.gateway.shared().tokens.len();
    sign_in(&gw, APP, ALEX).await;
    sign_in(&gw, APP, ADMIN).await;
    assert_eq!(table(), 4);
    let third = gw.token_request(Some(APP), &password_form(ALEX, &[])).await;
    let status = third.status();
    assert!(
        table() <= 5,
        "max_live_tokens = 5 but the table holds {} records (the last grant answered {status})",
        table()
    );
    expect_error(third, 503, "temporarily_unavailable").await;
    // One record fits.
    let single = sign_in(&gw, NOREFRESH, ALEX).await;
    assert_live(&gw, &single.access, "the grant that fits").await;
    assert_eq!(table(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sign_in_beyond_max_families_per_user_revokes_the_oldest() {
    let gw = TestGateway::start_with("[tokens]\nmax_families_per_user = 2\n", "").await;
    let admin = sign_in(&gw, APP, ADMIN).await;
    let first = sign_in(&gw, APP, ALEX).await;
    let second = sign_in(&gw, APP, ALEX).await;
    assert_live(&gw, &first.access, "first sign-in within the cap").await;
    // A refresh stays in its grant and does not count as a sign-in.
    let second = refreshed(&gw, &second.refresh, "rotate the second").await;
    assert_live(&gw, &first.access, "first sign-in after a refresh").await;

    let third = sign_in(&gw, APP, ALEX).await;
    assert_dead(&gw, &first.access, "oldest sign-in beyond the cap").await;
    refresh_refused(&gw, &first.refresh, "oldest sign-in's refresh token").await;
    assert_live(&gw, &second.access, "second sign-in").await;
    assert_live(&gw, &third.access, "third sign-in").await;
    assert_live(&gw, &admin.access, "another user's sign-in").await;
    refreshed(&gw, &third.refresh, "third sign-in's refresh token").await;
}

// ---------------------------------------------------------------------------------------
// The snapshot across restarts of the real binary

async fn process_sign_in(client: &reqwest::Client, addr: SocketAddr, user: (&str, &str)) -> Tokens {
    Tokens::from_body(granted(client, addr, user).await)
}

async fn process_api(client: &reqwest::Client, addr: SocketAddr, token: &str) -> u16 {
    api_status(client, addr, "/api/v1/things", token).await
}

async fn process_refresh(client: &reqwest::Client, addr: SocketAddr, token: &str) -> Response {
    client
        .post(url(addr, "/api/oauth/token"))
        .basic_auth(APP.0, Some(APP.1))
        .form(&[("grant_type", "refresh_token"), ("refresh_token", token)])
        .send()
        .await
        .unwrap()
}

/// A folder with a certificate and the standard config plus `tokens`.
fn snapshot_setup(upstream: SocketAddr, tokens: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let pem = write_certificate(dir.path(), "gateway.crt", "gateway.key");
    let text = config_text(upstream, tokens, "");
    std::fs::write(dir.path().join("config.toml"), text).unwrap();
    (dir, pem)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_snapshot_keeps_tokens_and_revocations_across_a_restart_and_a_corrupt_one_is_set_aside()
{
    let upstream = Upstream::start().await;
    let (dir, pem) = snapshot_setup(upstream.addr, "[tokens]\nsnapshot = \"tokens.snapshot\"\n");
    let config = dir.path().join("config.toml");
    let snapshot = dir.path().join("tokens.snapshot");
    let (http1, _) = clients(&pem);

    // First run: sign in, revoke admin's access token, stop.
    let gw = Process::spawn(&config);
    let addr = gw.listen_addr().await;
    let alex = process_sign_in(&http1, addr, ALEX).await;
    let admin = process_sign_in(&http1, addr, ADMIN).await;
    let revoked = http1
        .post(url(addr, REVOKE))
        .basic_auth(APP.0, Some(APP.1))
        .form(&[("token", admin.access.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), 200);
    assert_eq!(process_api(&http1, addr, &admin.access).await, 401);
    assert_eq!(process_api(&http1, addr, &alex.access).await, 200);
    let (status, log) = gw.terminate().await;
    assert!(status.success(), "{status:?}; log:\n{log}");

    let text = std::fs::read_to_string(&snapshot)
        .unwrap_or_else(|e| panic!("no snapshot after SIGTERM ({e}); log:\n{log}"));
    assert!(!text.trim().is_empty(), "empty snapshot");
    for (token, what) in [
        (&alex.access, "alex's access token"),
        (&alex.refresh, "alex's refresh token"),
        (&admin.access, "admin's access token"),
        (&admin.refresh, "admin's refresh token"),
    ] {
        assert!(!token.is_empty());
        assert!(!text.contains(token.as_str()), "{what} is in the snapshot");
    }

    // Second run on the same config: nobody was signed out, the revocation holds.
    let gw = Process::spawn(&config);
    let addr = gw.listen_addr().await;
    assert_eq!(
        process_api(&http1, addr, &alex.access).await,
        200,
        "alex's access token after the restart; log:\n{}",
        gw.log_text()
    );
    assert_eq!(
        process_api(&http1, addr, &admin.access).await,
        401,
        "admin's revoked token came back after the restart"
    );
    let renewed = process_refresh(&http1, addr, &alex.refresh).await;
    assert_eq!(
        renewed.status(),
        200,
        "alex's refresh token after the restart"
    );
    let renewed = Tokens::from_body(renewed.json().await.unwrap());
    assert_eq!(process_api(&http1, addr, &renewed.access).await, 200);
    let (status, log) = gw.terminate().await;
    assert!(status.success(), "{status:?}; log:\n{log}");

    // Third run on a corrupt snapshot: it serves, says so, keeps the file aside.
    let garbage = "this is not a token snapshot\n\u{0}\u{1}{{{\n";
    std::fs::write(&snapshot, garbage).unwrap();
    let gw = Process::spawn(&config);
    let addr = gw.listen_addr().await;
    let complaint = gw
        .lines()
        .into_iter()
        .find(|l| l.contains("ERROR") && l.contains("snapshot"));
    assert!(
        complaint.is_some(),
        "no error about the snapshot; log:\n{}",
        gw.log_text()
    );
    let aside: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("tokens.corrupt-"))
        .collect();
    assert_eq!(aside.len(), 1, "moved-aside snapshot: {aside:?}");
    assert_eq!(
        std::fs::read_to_string(dir.path().join(&aside[0])).unwrap(),
        garbage,
        "the corrupt file is kept as it was"
    );
    for (token, what) in [
        (&alex.access, "alex's old access token"),
        (&renewed.access, "alex's renewed access token"),
    ] {
        assert_eq!(process_api(&http1, addr, token).await, 401, "{what}");
    }
    let fresh = process_sign_in(&http1, addr, ALEX).await;
    assert_eq!(process_api(&http1, addr, &fresh.access).await, 200);
    let (status, log) = gw.terminate().await;
    assert!(status.success(), "{status:?}; log:\n{log}");
    drop(upstream);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_snapshot_is_also_written_periodically_so_a_crash_loses_little() {
    let upstream = Upstream::start().await;
    let (dir, pem) = snapshot_setup(
        upstream.addr,
        "[tokens]\nsnapshot = \"tokens.snapshot\"\nsnapshot_interval = \"200ms\"\n",
    );
    let config = dir.path().join("config.toml");
    let snapshot = dir.path().join("tokens.snapshot");
    let (http1, _) = clients(&pem);

    let mut gw = Process::spawn(&config);
    let addr = gw.listen_addr().await;
    let alex = process_sign_in(&http1, addr, ALEX).await;
    // Header + alex's access and refresh records, written without any shutdown.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let lines = std::fs::read_to_string(&snapshot)
            .map(|t| t.lines().count())
            .unwrap_or(0);
        if lines >= 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no periodic snapshot with alex's tokens; log:\n{}",
            gw.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    gw.signal("KILL");
    gw.exited(Duration::from_secs(5)).await;

    let gw = Process::spawn(&config);
    let addr = gw.listen_addr().await;
    assert_eq!(
        process_api(&http1, addr, &alex.access).await,
        200,
        "alex's token after a crash; log:\n{}",
        gw.log_text()
    );
    drop(gw);
    drop(upstream);
}
