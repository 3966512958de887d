//! `/api/oauth/authorize`: the sign-in page of the authorization-code and implicit
//! grants (RFC 6749 §4.1, §4.2) with PKCE (RFC 7636).
//!
//! `GET` validates the request and shows the sign-in form; the request itself is kept
//! server-side under a random id, so the form carries only that id and a CSRF token.
//! The CSRF token is also set as a `__Host-` cookie and its digest kept with the
//! request: a form posted from another site, or by a browser that did not load this
//! request's page, fails. `POST` checks the user like the password grant does (same
//! argon2 path, same lockout) and redirects with the code, or the token in the fragment.
//!
//! Until the client and redirect URI are known to be good, errors are shown as a page
//! and never redirect (RFC 6749 §4.1.2.1): otherwise the gateway would be an open
//! redirector. After that, errors go back to the client with `error` and `state`.

use std::net::IpAddr;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use dashmap::DashMap;
use http::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, COOKIE, LOCATION, REFERRER_POLICY,
    SET_COOKIE, X_CONTENT_TYPE_OPTIONS, X_FRAME_OPTIONS,
};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::body::{self, Body};
use crate::config::GrantType;
use crate::directory::Client;
use crate::error::Error;
use crate::form::{self, Form};
use crate::gateway::{Live, Shared};
use crate::token::codes::{is_pkce_string, CodeGrant};
use crate::token::endpoint::sign_in;
use crate::token::scope;
use crate::token::store::IssueRequest;

/// How long a sign-in page stays usable.
const PENDING_LIFETIME: Duration = Duration::from_secs(10 * 60);
/// Outstanding sign-in pages at most; beyond it new ones get 503 rather than memory.
const PENDING_MAX: usize = 100_000;
/// The cookie that carries the CSRF token.
const CSRF_COOKIE: &str = "__Host-covata-csrf";

/// What the client asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ResponseType {
    Code,
    Token,
}

/// An authorization request waiting for the user to sign in.
#[derive(Debug, Clone)]
struct Pending {
    client_id: Arc<str>,
    redirect_uri: String,
    redirect_uri_given: bool,
    state: Option<String>,
    scope: String,
    code_challenge: Option<String>,
    response_type: ResponseType,
    csrf_digest: [u8; 32],
    created: Instant,
}

/// Sign-in requests in progress, by their random id.
#[derive(Default)]
pub struct PendingStore {
    requests: DashMap<String, Pending>,
}

impl PendingStore {
    /// Drops requests older than their lifetime.
    pub fn sweep(&self) {
        self.requests
            .retain(|_, p| p.created.elapsed() < PENDING_LIFETIME);
    }

    fn get(&self, id: &str) -> Option<Pending> {
        self.requests
            .get(id)
            .map(|p| p.clone())
            .filter(|p| p.created.elapsed() < PENDING_LIFETIME)
    }
}

fn random_token() -> Result<String, Error> {
    let mut bytes = [0u8; 32];
    getrandom::getrandom(&mut bytes)
        .map_err(|_| Error::Internal("the system random generator failed".into()))?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

fn html_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "\
*{box-sizing:border-box}\
body{margin:0;font:16px/1.5 system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;background:#f3f5f8;color:#1b2430}\
main{max-width:24rem;margin:8vh auto;padding:2rem;background:#fff;border-radius:12px;box-shadow:0 2px 12px rgba(0,0,0,.08)}\
h1{margin:0 0 .25rem;font-size:1.5rem}\
.for{margin:0 0 1.5rem;color:#4a5565}\
label{display:block;margin:1rem 0 .25rem;font-weight:600}\
input{width:100%;padding:.6rem .75rem;font:inherit;border:1px solid #8a94a3;border-radius:6px}\
input:focus{outline:3px solid #2563eb;outline-offset:1px;border-color:#2563eb}\
button{margin-top:1.5rem;width:100%;padding:.7rem;font:inherit;font-weight:600;color:#fff;background:#1d4ed8;border:0;border-radius:6px;cursor:pointer}\
button:focus{outline:3px solid #93c5fd;outline-offset:2px}\
.error{margin:0 0 1rem;padding:.6rem .75rem;color:#7f1d1d;background:#fee2e2;border-radius:6px}\
.scope{margin:1.25rem 0 0;font-size:.875rem;color:#4a5565}";

/// The CSP hash of the inline style, so the page needs no `'unsafe-inline'`.
static STYLE_HASH: LazyLock<String> = LazyLock::new(|| {
    base64::engine::general_purpose::STANDARD.encode(Sha256::digest(STYLE.as_bytes()))
});

fn origin_of(uri: &str) -> Option<String> {
    let uri: http::Uri = uri.parse().ok()?;
    Some(format!("{}://{}", uri.scheme()?, uri.authority()?))
}

fn page(status: StatusCode, title: &str, main: &str, form_target: Option<&str>) -> Response<Body> {
    let html = format!(
        "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{title}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n<main>\n{main}</main>\n</body>\n</html>\n",
        title = html_escape(title),
    );
    // form-action must allow where the sign-in redirects to: browsers apply it to the
    // redirect that follows a form submission.
    let form_action = match form_target.and_then(origin_of) {
        Some(origin) => format!("'self' {origin}"),
        None => "'self'".to_owned(),
    };
    let csp = format!(
        "default-src 'none'; style-src 'sha256-{}'; form-action {form_action}; \
         frame-ancestors 'none'; base-uri 'none'",
        *STYLE_HASH
    );
    let mut response = Response::new(body::full(Bytes::from(html)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    if let Ok(csp) = HeaderValue::from_str(&csp) {
        headers.insert(CONTENT_SECURITY_POLICY, csp);
    }
    response
}

/// A page that explains a problem and links nowhere: used whenever redirecting back
/// could send the user to a place the client did not register.
fn error_page(status: StatusCode, message: &str) -> Response<Body> {
    let main = format!(
        "<h1>Sign-in problem</h1>\n<p class=\"error\" role=\"alert\">{}</p>\n\
         <p>Go back to the application and start the sign-in again.</p>\n",
        html_escape(message)
    );
    page(status, "Sign-in problem", &main, None)
}

fn sign_in_page(
    pending: &Pending,
    id: &str,
    csrf: &str,
    username: &str,
    error: Option<&str>,
) -> Response<Body> {
    let error = error
        .map(|e| {
            format!(
                "<p class=\"error\" role=\"alert\" id=\"error\">{}</p>\n",
                html_escape(e)
            )
        })
        .unwrap_or_default();
    let scope = if pending.scope.is_empty() {
        String::new()
    } else {
        format!(
            "<p class=\"scope\">Access requested: {}</p>\n",
            html_escape(&pending.scope)
        )
    };
    let main = format!(
        "<h1>Sign in</h1>\n<p class=\"for\">to continue to <strong>{client}</strong></p>\n{error}\
         <form method=\"post\" action=\"/api/oauth/authorize\">\n\
         <input type=\"hidden\" name=\"request\" value=\"{id}\">\n\
         <input type=\"hidden\" name=\"csrf_token\" value=\"{csrf}\">\n\
         <label for=\"username\">Username</label>\n\
         <input id=\"username\" name=\"username\" type=\"text\" autocomplete=\"username\" \
         autocapitalize=\"none\" spellcheck=\"false\" required autofocus value=\"{username}\">\n\
         <label for=\"password\">Password</label>\n\
         <input id=\"password\" name=\"password\" type=\"password\" autocomplete=\"current-password\" required>\n\
         <button type=\"submit\" id=\"sign-in\">Sign in</button>\n</form>\n{scope}",
        client = html_escape(&pending.client_id),
        id = html_escape(id),
        csrf = html_escape(csrf),
        username = html_escape(username),
    );
    let mut response = page(
        StatusCode::OK,
        "Sign in",
        &main,
        Some(&pending.redirect_uri),
    );
    let cookie = format!("{CSRF_COOKIE}={csrf}; Path=/; Secure; HttpOnly; SameSite=Strict");
    if let Ok(cookie) = HeaderValue::from_str(&cookie) {
        response.headers_mut().insert(SET_COOKIE, cookie);
    }
    response
}

/// `redirect_uri` with parameters added to its query (code) or as its fragment (token).
fn redirect_url(redirect_uri: &str, params: &[(&str, &str)], fragment: bool) -> String {
    let encoded = serde_urlencoded::to_string(params).unwrap_or_default();
    if fragment {
        format!("{redirect_uri}#{encoded}")
    } else if redirect_uri.contains('?') {
        format!("{redirect_uri}&{encoded}")
    } else {
        format!("{redirect_uri}?{encoded}")
    }
}

fn redirect(location: &str) -> Response<Body> {
    let mut response = Response::new(body::empty());
    // 303: the browser follows a POST's redirect with a GET.
    *response.status_mut() = StatusCode::SEE_OTHER;
    let headers = response.headers_mut();
    if let Ok(location) = HeaderValue::from_str(location) {
        headers.insert(LOCATION, location);
    }
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    response
}

/// Sends an error back to the client's registered redirect URI (RFC 6749 §4.1.2.1).
fn redirect_error(
    redirect_uri: &str,
    fragment: bool,
    error: &str,
    description: &str,
    state: Option<&str>,
) -> Response<Body> {
    let mut params = vec![("error", error), ("error_description", description)];
    if let Some(state) = state {
        params.push(("state", state));
    }
    redirect(&redirect_url(redirect_uri, &params, fragment))
}

/// Handles GET and POST of `/api/oauth/authorize`.
pub async fn handle(
    shared: &Shared,
    live: &Live,
    request: Request<Incoming>,
    client_ip: IpAddr,
) -> Result<Response<Body>, Error> {
    match *request.method() {
        Method::GET => show(shared, live, &request),
        Method::POST => submit(shared, live, request, client_ip).await,
        _ => Err(Error::MethodNotAllowed("GET, POST")),
    }
}

/// The client's redirect URI for this request: exactly a registered one, or the only
/// registered one when the request names none (RFC 6749 §3.1.2.3).
fn resolve_redirect(
    client: &Client,
    requested: Option<&str>,
) -> Result<(String, bool), &'static str> {
    match requested {
        Some(uri) if client.redirect_uris.iter().any(|r| r == uri) => Ok((uri.to_owned(), true)),
        Some(_) => Err("The redirect_uri is not registered for this application."),
        None => match client.redirect_uris.as_slice() {
            [only] => Ok((only.clone(), false)),
            [] => Err("This application has no registered redirect URI."),
            _ => Err("This application has several redirect URIs; the request must name one."),
        },
    }
}

fn show(
    shared: &Shared,
    live: &Live,
    request: &Request<Incoming>,
) -> Result<Response<Body>, Error> {
    let query = request.uri().query().unwrap_or("");
    let params = match Form::parse(query.as_bytes()) {
        Ok(params) => params,
        Err(error) => return Ok(error_page(StatusCode::BAD_REQUEST, &error.description())),
    };
    let Some(client) = params
        .get("client_id")
        .and_then(|id| live.directory.client(id))
    else {
        return Ok(error_page(
            StatusCode::BAD_REQUEST,
            "Unknown or missing client_id.",
        ));
    };
    let (redirect_uri, redirect_uri_given) =
        match resolve_redirect(client, params.get("redirect_uri")) {
            Ok(resolved) => resolved,
            Err(message) => return Ok(error_page(StatusCode::BAD_REQUEST, message)),
        };
    tracing::Span::current().record("client_id", &*client.id);

    // From here on the redirect URI is trusted: errors go back to the client.
    let state = params.get("state");
    let response_type = match params.get("response_type") {
        Some("code") => ResponseType::Code,
        Some("token") => ResponseType::Token,
        other => {
            let (code, text) = match other {
                None => ("invalid_request", "response_type is required"),
                Some(_) => (
                    "unsupported_response_type",
                    "response_type must be code or token",
                ),
            };
            return Ok(redirect_error(&redirect_uri, false, code, text, state));
        }
    };
    let fragment = response_type == ResponseType::Token;
    let fail =
        |code: &str, text: &str| Ok(redirect_error(&redirect_uri, fragment, code, text, state));
    let needed = match response_type {
        ResponseType::Code => GrantType::AuthorizationCode,
        ResponseType::Token => GrantType::Implicit,
    };
    if !client.allows(needed) {
        return fail(
            "unauthorized_client",
            &format!("this client may not use the {} grant", needed.as_str()),
        );
    }
    let scope = match scope::grant(params.get("scope"), client.scopes.as_deref()) {
        Ok(scope) => scope,
        Err(error) => return fail(error.code(), &error.description()),
    };
    let code_challenge = match (
        params.get("code_challenge"),
        params.get("code_challenge_method"),
    ) {
        (None, None) => None,
        (Some(challenge), Some("S256")) if is_pkce_string(challenge) => Some(challenge.to_owned()),
        (Some(_), Some("S256")) => {
            return fail(
                "invalid_request",
                "code_challenge must be 43-128 characters of base64url",
            )
        }
        (Some(_), None | Some("plain")) | (None, Some(_)) => {
            return fail(
                "invalid_request",
                "PKCE needs code_challenge with code_challenge_method=S256 (plain is not accepted)",
            )
        }
        (Some(_), Some(_)) => return fail("invalid_request", "code_challenge_method must be S256"),
    };
    if response_type == ResponseType::Code && client.is_public() && code_challenge.is_none() {
        return fail(
            "invalid_request",
            "a public client must use PKCE (code_challenge, S256)",
        );
    }

    if shared.pending.requests.len() >= PENDING_MAX {
        return Err(Error::TemporarilyUnavailable(
            "too many sign-ins in progress; try again shortly".into(),
        ));
    }
    let id = random_token()?;
    let csrf = random_token()?;
    let pending = Pending {
        client_id: client.id.clone(),
        redirect_uri,
        redirect_uri_given,
        state: state.map(str::to_owned),
        scope,
        code_challenge,
        response_type,
        csrf_digest: Sha256::digest(csrf.as_bytes()).into(),
        created: Instant::now(),
    };
    let response = sign_in_page(&pending, &id, &csrf, "", None);
    shared.pending.requests.insert(id, pending);
    Ok(response)
}

fn cookie_value<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// Whether form token, cookie and the request's stored digest all agree.
fn csrf_ok(pending: &Pending, form: &Form, headers: &HeaderMap) -> bool {
    let (Some(field), Some(cookie)) = (form.get("csrf_token"), cookie_value(headers, CSRF_COOKIE))
    else {
        return false;
    };
    let digest: [u8; 32] = Sha256::digest(field.as_bytes()).into();
    bool::from(field.as_bytes().ct_eq(cookie.as_bytes()))
        && bool::from(digest.ct_eq(&pending.csrf_digest))
}

async fn submit(
    shared: &Shared,
    live: &Live,
    request: Request<Incoming>,
    client_ip: IpAddr,
) -> Result<Response<Body>, Error> {
    let (parts, body) = request.into_parts();
    let server = &live.config.server;
    let form = form::read(
        &parts.headers,
        body,
        server.max_form_body,
        server.header_read_timeout,
    )
    .await?;
    let expired = "This sign-in page has expired or was already used.";
    let Some(id) = form.get("request") else {
        return Ok(error_page(StatusCode::BAD_REQUEST, expired));
    };
    let Some(pending) = shared.pending.get(id) else {
        return Ok(error_page(StatusCode::BAD_REQUEST, expired));
    };
    if !csrf_ok(&pending, &form, &parts.headers) {
        return Ok(error_page(
            StatusCode::FORBIDDEN,
            "The sign-in form could not be verified (missing or wrong CSRF token).",
        ));
    }
    // The client may have been removed by a reload since the page was shown.
    let Some(client) = live.directory.client(&pending.client_id).cloned() else {
        shared.pending.requests.remove(id);
        return Ok(error_page(StatusCode::BAD_REQUEST, "Unknown client."));
    };
    tracing::Span::current().record("client_id", &*client.id);
    let csrf = form.get("csrf_token").unwrap_or_default();
    let username = form.get("username").unwrap_or_default();
    let (Some(_), Some(password)) = (form.get("username"), form.get("password")) else {
        return Ok(sign_in_page(
            &pending,
            id,
            csrf,
            username,
            Some("Enter your username and password."),
        ));
    };
    let user = match sign_in(shared, live, username, password, client_ip).await {
        Ok(user) => user,
        Err(Error::InvalidGrant(_)) => {
            return Ok(sign_in_page(
                &pending,
                id,
                csrf,
                username,
                Some("Wrong username or password."),
            ))
        }
        Err(other) => return Err(other),
    };
    // Single use: a second submission of the same page finds nothing.
    if shared.pending.requests.remove(id).is_none() {
        return Ok(error_page(StatusCode::BAD_REQUEST, expired));
    }
    let state = pending.state.as_deref();
    let location = match pending.response_type {
        ResponseType::Code => {
            let code = shared.codes.issue(
                CodeGrant {
                    client_id: client.id.clone(),
                    redirect_uri: pending.redirect_uri.clone(),
                    redirect_uri_given: pending.redirect_uri_given,
                    code_challenge: pending.code_challenge.clone(),
                    scope: pending.scope.clone(),
                    username: user.username.clone(),
                },
                live.config.tokens.code_lifetime,
            )?;
            let mut params = vec![("code", code.as_str())];
            params.extend(state.map(|s| ("state", s)));
            redirect_url(&pending.redirect_uri, &params, false)
        }
        ResponseType::Token => {
            // RFC 6749 §4.2.2: never a refresh token in the implicit grant.
            let issued = shared.tokens.issue(IssueRequest {
                family: None,
                username: Some(user.username.clone()),
                client_id: client.id.clone(),
                roles: &user.roles,
                scope: pending.scope.clone(),
                grant_scope: pending.scope.clone(),
                access_ttl: client.access_ttl,
                refresh_ttl: None,
            })?;
            let expires_in = issued.expires_in.to_string();
            let jti = issued.jti.to_string();
            let mut params = vec![
                ("access_token", issued.access_token.as_str()),
                ("token_type", "bearer"),
                ("expires_in", expires_in.as_str()),
                ("scope", issued.scope.as_str()),
                ("jti", jti.as_str()),
            ];
            params.extend(state.map(|s| ("state", s)));
            redirect_url(&pending.redirect_uri, &params, true)
        }
    };
    let mut response = redirect(&location);
    let clear = format!("{CSRF_COOKIE}=; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age=0");
    if let Ok(clear) = HeaderValue::from_str(&clear) {
        response.headers_mut().insert(SET_COOKIE, clear);
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirect_urls_keep_existing_query_and_encode() {
        assert_eq!(
            redirect_url("https://a/cb", &[("code", "x y"), ("state", "s&t")], false),
            "https://a/cb?code=x+y&state=s%26t"
        );
        assert_eq!(
            redirect_url("https://a/cb?k=1", &[("code", "c")], false),
            "https://a/cb?k=1&code=c"
        );
        assert_eq!(
            redirect_url("https://a/cb", &[("access_token", "t")], true),
            "https://a/cb#access_token=t"
        );
    }

    #[test]
    fn escaping() {
        assert_eq!(
            html_escape("<a href=\"x\">'&"),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;"
        );
    }

    #[test]
    fn cookies() {
        let mut headers = HeaderMap::new();
        headers.insert(
            COOKIE,
            HeaderValue::from_static("a=1; __Host-covata-csrf=tok; b=2"),
        );
        assert_eq!(cookie_value(&headers, CSRF_COOKIE), Some("tok"));
        assert_eq!(cookie_value(&headers, "c"), None);
    }
}
