//! The authorization-code and implicit grants through `/api/oauth/authorize`, driven
//! over real HTTPS the way a browser would (GET the page, POST the form with its cookie),
//! without following redirects so every `Location` can be checked.

mod common;

use common::*;
use serde_json::Value;

const VERIFIER: &str = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";

/// Clients for browser flows; `callback` is their registered redirect URI.
fn browser_clients(callback: &str) -> String {
    format!(
        r#"
[tokens]
code_lifetime = "1s"

[[clients]]
client_id = "webapp"
client_secret = "{web}"
authorized_grant_types = ["authorization_code", "refresh_token"]
registered_redirect_uris = ["{callback}", "{callback}/second"]
scopes = ["read", "write"]

[[clients]]
client_id = "spa"
public = true
authorized_grant_types = ["authorization_code", "refresh_token"]
registered_redirect_uris = ["{callback}"]

[[clients]]
client_id = "legacy"
client_secret = "{legacy}"
authorized_grant_types = ["implicit"]
registered_redirect_uris = ["{callback}"]
"#,
        web = password_hash("webapp-secret"),
        legacy = password_hash("legacy-secret"),
    )
}

struct Browser {
    gw: TestGateway,
    http: reqwest::Client,
    callback: String,
}

/// A value of a hidden form field in the page.
fn hidden(page: &str, name: &str) -> String {
    let marker = format!("name=\"{name}\" value=\"");
    let start = page
        .find(&marker)
        .unwrap_or_else(|| panic!("no {name} in page"))
        + marker.len();
    page[start..].split('"').next().unwrap().to_owned()
}

fn query_param(url: &str, name: &str) -> Option<String> {
    let url = reqwest::Url::parse(url).unwrap();
    let pairs: Vec<(String, String)> = match url.fragment() {
        Some(fragment) => serde_urlencoded::from_str(fragment).unwrap(),
        None => url.query_pairs().into_owned().collect(),
    };
    pairs.into_iter().find(|(k, _)| k == name).map(|(_, v)| v)
}

struct Page {
    body: String,
    cookie: String,
}

impl Browser {
    async fn start() -> Browser {
        let upstream = Upstream::start().await;
        let callback = format!("http://127.0.0.1:{}/callback", upstream.addr.port());
        let text = config_text(upstream.addr, &browser_clients(&callback), "");
        let gw = TestGateway::start_text(upstream, &text).await;
        let http = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(gw.ca_pem.as_bytes()).unwrap())
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        Browser { gw, http, callback }
    }

    async fn get(&self, query: &[(&str, &str)]) -> reqwest::Response {
        let query = serde_urlencoded::to_string(query).unwrap();
        self.http
            .get(self.gw.url(&format!("/api/oauth/authorize?{query}")))
            .send()
            .await
            .unwrap()
    }

    /// Opens the sign-in page, which must render.
    async fn open(&self, query: &[(&str, &str)]) -> Page {
        let response = self.get(query).await;
        assert_eq!(response.status(), 200);
        let headers = response.headers().clone();
        let csp = headers["content-security-policy"].to_str().unwrap();
        assert!(
            csp.contains("default-src 'none'") && csp.contains("frame-ancestors 'none'"),
            "{csp}"
        );
        assert!(!csp.contains("unsafe-inline"), "{csp}");
        assert_eq!(headers["x-frame-options"], "DENY");
        assert_eq!(headers["cache-control"], "no-store");
        let set_cookie = headers["set-cookie"].to_str().unwrap();
        assert!(
            set_cookie.contains("Secure")
                && set_cookie.contains("HttpOnly")
                && set_cookie.contains("SameSite=Strict")
        );
        let cookie = set_cookie.split(';').next().unwrap().to_owned();
        Page {
            body: response.text().await.unwrap(),
            cookie,
        }
    }

    async fn submit(
        &self,
        page: &Page,
        fields: &[(&str, &str)],
        cookie: Option<&str>,
    ) -> reqwest::Response {
        let mut request = self
            .http
            .post(self.gw.url("/api/oauth/authorize"))
            .form(fields);
        if let Some(cookie) = cookie.or(Some(&page.cookie)).filter(|c| !c.is_empty()) {
            request = request.header("cookie", cookie);
        }
        request.send().await.unwrap()
    }

    async fn sign_in(&self, page: &Page, user: (&str, &str)) -> reqwest::Response {
        let request = hidden(&page.body, "request");
        let csrf = hidden(&page.body, "csrf_token");
        self.submit(
            page,
            &[
                ("request", &request),
                ("csrf_token", &csrf),
                ("username", user.0),
                ("password", user.1),
            ],
            None,
        )
        .await
    }

    /// The whole front channel for `webapp` with PKCE; returns the code.
    async fn code_for(&self, client: &str, extra: &[(&str, &str)]) -> String {
        let challenge = pkce_challenge(VERIFIER);
        let mut query = vec![
            ("response_type", "code"),
            ("client_id", client),
            ("redirect_uri", self.callback.as_str()),
            ("state", "xyz"),
            ("code_challenge", challenge.as_str()),
            ("code_challenge_method", "S256"),
        ];
        query.extend_from_slice(extra);
        let page = self.open(&query).await;
        let response = self.sign_in(&page, ALEX).await;
        assert_eq!(response.status(), 303);
        let location = response.headers()["location"].to_str().unwrap().to_owned();
        assert!(
            location.starts_with(&format!("{}?", self.callback)),
            "{location}"
        );
        assert_eq!(query_param(&location, "state").as_deref(), Some("xyz"));
        query_param(&location, "code").unwrap()
    }

    async fn exchange(
        &self,
        basic: Option<(&str, &str)>,
        form: &[(&str, &str)],
    ) -> reqwest::Response {
        self.gw.token_request(basic, form).await
    }
}

const WEBAPP: (&str, &str) = ("webapp", "webapp-secret");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn code_flow_with_pkce_then_api_call() {
    let b = Browser::start().await;
    let code = b.code_for("webapp", &[("scope", "read")]).await;
    let response = b
        .exchange(
            Some(WEBAPP),
            &[
                ("grant_type", "authorization_code"),
                ("code", &code),
                ("redirect_uri", &b.callback),
                ("code_verifier", VERIFIER),
            ],
        )
        .await;
    let tokens = json_ok(response).await;
    assert_eq!(tokens["scope"], "read");
    assert!(tokens["refresh_token"].is_string());
    let api =
        b.gw.bearer_get(
            &b.gw.http1,
            "/api/v1/files",
            tokens["access_token"].as_str().unwrap(),
        )
        .await;
    let seen = json_ok(api).await;
    assert_eq!(seen["headers"]["x-authenticated-user"][0], ALEX.0);
    assert_eq!(seen["headers"]["x-authenticated-client"][0], "webapp");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_client_uses_pkce_without_a_secret() {
    let b = Browser::start().await;
    // Without PKCE a public client is sent back with invalid_request.
    let response = b
        .get(&[
            ("response_type", "code"),
            ("client_id", "spa"),
            ("state", "s1"),
        ])
        .await;
    assert_eq!(response.status(), 303);
    let location = response.headers()["location"].to_str().unwrap();
    assert_eq!(
        query_param(location, "error").as_deref(),
        Some("invalid_request")
    );
    assert_eq!(query_param(location, "state").as_deref(), Some("s1"));

    let code = b.code_for("spa", &[]).await;
    let form = [
        ("grant_type", "authorization_code"),
        ("client_id", "spa"),
        ("code", code.as_str()),
        ("redirect_uri", b.callback.as_str()),
        ("code_verifier", VERIFIER),
    ];
    let response = b.exchange(None, &form).await;
    let tokens = json_ok(response).await;
    // The public client refreshes without a secret too.
    let refresh = b
        .exchange(
            None,
            &[
                ("grant_type", "refresh_token"),
                ("client_id", "spa"),
                ("refresh_token", tokens["refresh_token"].as_str().unwrap()),
            ],
        )
        .await;
    assert_eq!(refresh.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_code_is_refused_and_revokes_its_tokens() {
    let b = Browser::start().await;
    let code = b.code_for("webapp", &[]).await;
    let form = [
        ("grant_type", "authorization_code"),
        ("code", code.as_str()),
        ("redirect_uri", b.callback.as_str()),
        ("code_verifier", VERIFIER),
    ];
    let first: Value = b.exchange(Some(WEBAPP), &form).await.json().await.unwrap();
    let access = first["access_token"].as_str().unwrap().to_owned();
    let api = |token: String| {
        let request = b.gw.http1.get(b.gw.url("/api/v1/x")).bearer_auth(token);
        async move { request.send().await.unwrap().status() }
    };
    assert_eq!(api(access.clone()).await, 200);
    expect_error(b.exchange(Some(WEBAPP), &form).await, 400, "invalid_grant").await;
    assert_eq!(
        api(access).await,
        401,
        "tokens from a replayed code are revoked"
    );
    let refresh = [
        ("grant_type", "refresh_token"),
        ("refresh_token", first["refresh_token"].as_str().unwrap()),
    ];
    expect_error(
        b.exchange(Some(WEBAPP), &refresh).await,
        400,
        "invalid_grant",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exchange_errors() {
    let b = Browser::start().await;
    let other = format!("{}/second", b.callback);
    type Case<'a> = (
        &'a str,
        Vec<(&'a str, &'a str)>,
        Option<(&'a str, &'a str)>,
        u16,
        &'a str,
    );
    let cases: Vec<Case> = vec![
        (
            "wrong redirect_uri",
            vec![
                ("redirect_uri", other.as_str()),
                ("code_verifier", VERIFIER),
            ],
            Some(WEBAPP),
            400,
            "invalid_grant",
        ),
        (
            "missing redirect_uri",
            vec![("code_verifier", VERIFIER)],
            Some(WEBAPP),
            400,
            "invalid_grant",
        ),
        (
            "wrong code_verifier",
            vec![
                ("redirect_uri", b.callback.as_str()),
                ("code_verifier", "x".repeat(43).leak()),
            ],
            Some(WEBAPP),
            400,
            "invalid_grant",
        ),
        (
            "missing code_verifier",
            vec![("redirect_uri", b.callback.as_str())],
            Some(WEBAPP),
            400,
            "invalid_grant",
        ),
        (
            "a client not allowed the grant",
            vec![
                ("redirect_uri", b.callback.as_str()),
                ("code_verifier", VERIFIER),
            ],
            Some(APP),
            400,
            "unauthorized_client",
        ),
    ];
    for (what, extra, client, status, error) in cases {
        let code = b.code_for("webapp", &[]).await;
        let mut form = vec![
            ("grant_type", "authorization_code"),
            ("code", code.as_str()),
        ];
        form.extend(extra);
        let response = b.exchange(client, &form).await;
        assert_eq!(response.status(), status, "{what}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"], error, "{what}: {body}");
        // RFC 6749 §4.1.2: single use. A failed exchange spends the code; only a client
        // not allowed the grant at all never reaches it.
        let good = [
            ("grant_type", "authorization_code"),
            ("code", code.as_str()),
            ("redirect_uri", b.callback.as_str()),
            ("code_verifier", VERIFIER),
        ];
        let retried = b.exchange(Some(WEBAPP), &good).await;
        if error == "unauthorized_client" {
            assert_eq!(retried.status(), 200, "{what}");
        } else {
            let body = expect_error(retried, 400, "invalid_grant").await;
            assert_eq!(
                body["error_description"], "the authorization code was already used",
                "{what}"
            );
        }
    }
    let code = b.code_for("webapp", &[]).await;
    let good = [
        ("grant_type", "authorization_code"),
        ("code", code.as_str()),
        ("redirect_uri", b.callback.as_str()),
        ("code_verifier", VERIFIER),
    ];
    // ...and a code past its lifetime (1 s in this config) does not.
    let late = b.code_for("webapp", &[]).await;
    tokio::time::sleep(std::time::Duration::from_millis(1300)).await;
    let mut form = good.to_vec();
    form[1] = ("code", late.as_str());
    expect_error(b.exchange(Some(WEBAPP), &form).await, 400, "invalid_grant").await;
    expect_error(
        b.exchange(
            Some(WEBAPP),
            &[
                ("grant_type", "authorization_code"),
                ("code", "made-up"),
                ("redirect_uri", b.callback.as_str()),
            ],
        )
        .await,
        400,
        "invalid_grant",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csrf_token_missing_or_wrong_is_refused() {
    let b = Browser::start().await;
    let challenge = pkce_challenge(VERIFIER);
    let query = [
        ("response_type", "code"),
        ("client_id", "webapp"),
        ("redirect_uri", b.callback.as_str()),
        ("code_challenge", challenge.as_str()),
        ("code_challenge_method", "S256"),
    ];
    let page = b.open(&query).await;
    let request = hidden(&page.body, "request");
    let csrf = hidden(&page.body, "csrf_token");
    let user = [("username", ALEX.0), ("password", ALEX.1)];
    let with = |extra: &[(&'static str, String)]| {
        let mut fields: Vec<(&str, String)> =
            user.iter().map(|(k, v)| (*k, v.to_string())).collect();
        fields.push(("request", request.clone()));
        fields.extend(extra.iter().cloned());
        fields
    };
    type Case<'a> = (&'a str, Vec<(&'a str, String)>, Option<&'a str>);
    let cases: Vec<Case> = vec![
        ("no token", with(&[]), None),
        ("wrong token", with(&[("csrf_token", "A".repeat(43))]), None),
        ("no cookie", with(&[("csrf_token", csrf.clone())]), Some("")),
        (
            "cookie of another page",
            with(&[("csrf_token", csrf.clone())]),
            Some("__Host-covata-csrf=forged"),
        ),
    ];
    for (what, fields, cookie) in cases {
        let fields: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let response = b.submit(&page, &fields, cookie).await;
        assert_eq!(response.status(), 403, "{what}");
        assert!(
            response.headers().get("location").is_none(),
            "{what}: never redirects"
        );
    }
    // The page itself is still good for the real user.
    assert_eq!(b.sign_in(&page, ALEX).await.status(), 303);
    // And used once, it is gone.
    assert_eq!(b.sign_in(&page, ALEX).await.status(), 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_rerenders_the_form_without_the_password() {
    let b = Browser::start().await;
    let challenge = pkce_challenge(VERIFIER);
    let page = b
        .open(&[
            ("response_type", "code"),
            ("client_id", "webapp"),
            ("redirect_uri", b.callback.as_str()),
            ("code_challenge", challenge.as_str()),
            ("code_challenge_method", "S256"),
        ])
        .await;
    let response = b.sign_in(&page, (ALEX.0, "not-the-password")).await;
    assert_eq!(response.status(), 200);
    let body = response.text().await.unwrap();
    assert!(body.contains("Wrong username or password."), "{body}");
    assert!(
        body.contains(&format!("value=\"{}\"", ALEX.0)),
        "the username is kept"
    );
    assert!(
        !body.contains("not-the-password"),
        "the password is not echoed"
    );
    // Then the right password on the same page works.
    assert_eq!(b.sign_in(&page, ALEX).await.status(), 303);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_client_or_redirect_never_redirects() {
    let b = Browser::start().await;
    let evil = [
        "https://evil.example/callback",
        &format!("{}.evil.example", b.callback),
        &format!("{}/../other", b.callback),
        &format!("{}?x=1", b.callback),
        &b.callback.to_uppercase(),
    ];
    for redirect in evil {
        let response = b
            .get(&[
                ("response_type", "code"),
                ("client_id", "webapp"),
                ("redirect_uri", redirect),
                ("state", "s"),
            ])
            .await;
        assert_eq!(response.status(), 400, "{redirect}");
        assert!(response.headers().get("location").is_none(), "{redirect}");
        let body = response.text().await.unwrap();
        assert!(body.contains("redirect_uri is not registered"), "{body}");
    }
    // Unknown or missing client: an error page, whatever redirect_uri says.
    for client in [Some("nobody"), None] {
        let mut query = vec![
            ("response_type", "code"),
            ("redirect_uri", b.callback.as_str()),
        ];
        query.extend(client.map(|c| ("client_id", c)));
        let response = b.get(&query).await;
        assert_eq!(response.status(), 400);
        assert!(response.headers().get("location").is_none());
    }
    // webapp registers two URIs, so it must name one.
    let response = b
        .get(&[("response_type", "code"), ("client_id", "webapp")])
        .await;
    assert_eq!(response.status(), 400);
    // Duplicated parameters are refused without redirecting.
    let response = b
        .http
        .get(b.gw.url(&format!(
            "/api/oauth/authorize?response_type=code&client_id=webapp&client_id=webapp&redirect_uri={}",
            b.callback
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    assert!(response.headers().get("location").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_after_a_good_redirect_go_back_to_the_client() {
    let b = Browser::start().await;
    let challenge = pkce_challenge(VERIFIER);
    let cases = [
        (vec![("response_type", "token")], "unauthorized_client"),
        (
            vec![("response_type", "id_token")],
            "unsupported_response_type",
        ),
        (vec![], "invalid_request"),
        (
            vec![("response_type", "code"), ("scope", "admin")],
            "invalid_scope",
        ),
        (
            vec![
                ("response_type", "code"),
                ("code_challenge", challenge.as_str()),
                ("code_challenge_method", "plain"),
            ],
            "invalid_request",
        ),
        (
            vec![
                ("response_type", "code"),
                ("code_challenge", "short"),
                ("code_challenge_method", "S256"),
            ],
            "invalid_request",
        ),
    ];
    for (extra, error) in cases {
        let mut query = vec![
            ("client_id", "webapp"),
            ("redirect_uri", b.callback.as_str()),
            ("state", "st"),
        ];
        query.extend(extra.iter().cloned());
        let response = b.get(&query).await;
        assert_eq!(response.status(), 303, "{error}");
        let location = response.headers()["location"].to_str().unwrap().to_owned();
        assert!(location.starts_with(&b.callback), "{location}");
        assert_eq!(
            query_param(&location, "error").as_deref(),
            Some(error),
            "{location}"
        );
        assert_eq!(query_param(&location, "state").as_deref(), Some("st"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn implicit_grant_only_for_clients_that_list_it() {
    let b = Browser::start().await;
    let page = b
        .open(&[
            ("response_type", "token"),
            ("client_id", "legacy"),
            ("state", "imp"),
            ("scope", "read"),
        ])
        .await;
    let response = b.sign_in(&page, ALEX).await;
    assert_eq!(response.status(), 303);
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    assert!(
        location.starts_with(&format!("{}#", b.callback)),
        "token in the fragment: {location}"
    );
    assert!(query_param(&location, "refresh_token").is_none());
    assert_eq!(query_param(&location, "state").as_deref(), Some("imp"));
    assert_eq!(
        query_param(&location, "token_type").as_deref(),
        Some("bearer")
    );
    let token = query_param(&location, "access_token").unwrap();
    let api = b.gw.bearer_get(&b.gw.http1, "/api/v1/x", &token).await;
    assert_eq!(api.status(), 200);

    // webapp does not list implicit: sent back with unauthorized_client, in the fragment.
    let response = b
        .get(&[
            ("response_type", "token"),
            ("client_id", "webapp"),
            ("redirect_uri", b.callback.as_str()),
        ])
        .await;
    let location = response.headers()["location"].to_str().unwrap();
    assert!(location.contains('#'), "{location}");
    assert_eq!(
        query_param(location, "error").as_deref(),
        Some("unauthorized_client")
    );
}
