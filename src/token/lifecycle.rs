//! The rest of a token's life: revocation (RFC 7009 and Covata's endpoints), expiring
//! all of a user's tokens, introspection (RFC 7662) and server metadata (RFC 8414).
//!
//! Every change takes effect on the very next request: the bearer check reads the same
//! table these endpoints remove records from.

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE, PRAGMA};
use http::{HeaderValue, Method, Request, Response};
use hyper::body::Incoming;
use serde_json::{json, Value};

use crate::body::{self, Body};
use crate::config::GrantType;
use crate::error::Error;
use crate::form;
use crate::gateway::{Live, Shared};
use crate::token::client_auth;

/// Roles that may expire another user's tokens.
const USER_ADMIN_ROLES: [&str; 2] = ["ROLE_SYSTEM_ADMIN", "ROLE_USER_ADMIN"];

fn json_response(value: &Value) -> Response<Body> {
    let mut response = Response::new(body::full(Bytes::from(value.to_string())));
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(PRAGMA, HeaderValue::from_static("no-cache"));
    response
}

/// `POST /api/oauth/revoke` (RFC 7009): 200 whether or not the token was known, so
/// the answer says nothing about which tokens exist.
pub async fn revoke(
    shared: &Shared,
    live: &Live,
    request: Request<Incoming>,
) -> Result<Response<Body>, Error> {
    let (client, form) = client_auth::read_form_and_client(shared, live, request).await?;
    let token = form.require("token")?;
    // RFC 7009 §2.1: the hint is only a hint; the lookup covers both kinds anyway.
    let revoked = shared.tokens.revoke(token, &client.id);
    tracing::debug!(revoked, "revocation request");
    Ok(json_response(&json!({})))
}

/// `POST /api/v1/auth/token/revoke` (Covata): the caller's own access token, named by
/// its bearer header (and, if present, the `token` form parameter), with its refresh
/// token and everything else issued with it.
pub async fn covata_revoke(
    shared: &Shared,
    live: &Live,
    request: Request<Incoming>,
) -> Result<Response<Body>, Error> {
    if request.method() != Method::POST {
        return Err(Error::MethodNotAllowed("POST"));
    }
    let (parts, body) = request.into_parts();
    let bearer = crate::auth::bearer_token(&parts.headers)?.to_owned();
    shared
        .tokens
        .authenticate(&bearer)
        .ok_or_else(invalid_token)?;
    let named = if crate::form::is_form(&parts.headers) {
        let server = &live.config.server;
        let form = form::read(
            &parts.headers,
            body,
            server.max_form_body,
            server.header_read_timeout,
        )
        .await?;
        form.get("token").map(str::to_owned)
    } else {
        None
    };
    if named.as_ref().is_some_and(|t| *t != bearer) {
        return Err(Error::InvalidRequest(
            "`token` must be the access token of the Authorization header".into(),
        ));
    }
    shared.tokens.revoke_with_family(&bearer);
    Ok(json_response(&json!({})))
}

fn invalid_token() -> Error {
    Error::InvalidToken("the access token is unknown, expired or revoked".into())
}

/// `PUT /api/v1/users/me/expire` and `PUT /api/v1/users/{username}/expire`: revoke every
/// token of a user. Another user's needs `ROLE_SYSTEM_ADMIN` or `ROLE_USER_ADMIN`.
pub async fn expire_user(
    shared: &Shared,
    live: &Live,
    request: Request<Incoming>,
    target: &str,
) -> Result<Response<Body>, Error> {
    if request.method() != Method::PUT {
        return Err(Error::MethodNotAllowed("PUT"));
    }
    let bearer = crate::auth::bearer_token(request.headers())?;
    let caller = shared
        .tokens
        .authenticate(bearer)
        .ok_or_else(invalid_token)?;
    let username = if target == "me" {
        caller.username.clone().ok_or_else(|| {
            Error::InvalidRequest("a client-credentials token has no user to expire".into())
        })?
    } else {
        let decoded = percent_decode(target)
            .ok_or_else(|| Error::InvalidRequest("the username in the path is malformed".into()))?;
        if caller.username.as_deref() != Some(decoded.as_str())
            && !USER_ADMIN_ROLES.iter().any(|role| caller.has_role(role))
        {
            return Err(Error::InsufficientScope(
                "expiring another user's tokens needs ROLE_SYSTEM_ADMIN or ROLE_USER_ADMIN".into(),
            ));
        }
        match live.directory.user(&decoded) {
            Some(user) => user.username.clone(),
            None => {
                return Err(Error::NotFound(
                    format!("no user `{}`", decoded.escape_default()).into(),
                ))
            }
        }
    };
    tracing::Span::current().record("user", &*username);
    let revoked_grants = shared.tokens.revoke_user(&username);
    tracing::info!(user = &*username, revoked_grants, "user's tokens expired");
    Ok(json_response(&json!({ "revoked_grants": revoked_grants })))
}

fn percent_decode(segment: &str) -> Option<String> {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = segment.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// `POST /api/oauth/introspect` (RFC 7662), for authenticated confidential clients
/// (resource servers): `{"active": false}` for anything not live.
pub async fn introspect(
    shared: &Shared,
    live: &Live,
    request: Request<Incoming>,
) -> Result<Response<Body>, Error> {
    let (client, form) = client_auth::read_form_and_client(shared, live, request).await?;
    if client.is_public() {
        return Err(Error::InvalidClient(
            "a public client may not introspect tokens".into(),
        ));
    }
    let token = form.require("token")?;
    let Some(found) = shared.tokens.introspect(token) else {
        return Ok(json_response(&json!({ "active": false })));
    };
    let roles = if found.access {
        found.roles
    } else {
        // A refresh token carries no roles of its own: report the user's current ones.
        found
            .username
            .as_deref()
            .and_then(|u| live.directory.user(u))
            .map(|u| u.roles.clone())
            .unwrap_or_default()
    };
    let mut body = json!({
        "active": true,
        "scope": found.scope,
        "client_id": &*found.client_id,
        "exp": found.expires_at / 1000,
        "iat": found.issued_at / 1000,
        "token_type": if found.access { "bearer" } else { "refresh_token" },
        "jti": found.jti.to_string(),
        "roles": roles,
    });
    if let Some(username) = &found.username {
        body["username"] = json!(&**username);
        body["sub"] = json!(&**username);
    }
    Ok(json_response(&body))
}

/// `GET /.well-known/oauth-authorization-server` (RFC 8414). The issuer is the origin
/// the client reached the gateway at.
pub fn metadata(live: &Live, request: &Request<Incoming>) -> Result<Response<Body>, Error> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return Err(Error::MethodNotAllowed("GET"));
    }
    let host = crate::proxy::request_host(request)
        .and_then(|h| h.to_str().ok().map(str::to_owned))
        .unwrap_or_else(|| live.config.server.listen.to_string());
    let issuer = format!("https://{host}");
    let mut grants: Vec<&str> = Vec::new();
    let mut scopes: Vec<&str> = Vec::new();
    let mut any_scope = false;
    for client in live.directory.clients() {
        for grant in &client.grants {
            if !grants.contains(&grant.as_str()) {
                grants.push(grant.as_str());
            }
        }
        match &client.scopes {
            Some(list) => scopes.extend(
                list.iter()
                    .map(String::as_str)
                    .filter(|s| !scopes.contains(s))
                    .collect::<Vec<_>>(),
            ),
            None => any_scope = true,
        }
    }
    grants.sort_unstable();
    scopes.sort_unstable();
    let token_grants: Vec<&str> = grants
        .iter()
        .copied()
        .filter(|g| *g != GrantType::Implicit.as_str())
        .collect();
    let mut response_types = vec!["code"];
    if grants.contains(&GrantType::Implicit.as_str()) {
        response_types.push("token");
    }
    let mut body = json!({
        "issuer": issuer,
        "authorization_endpoint": format!("{issuer}/api/oauth/authorize"),
        "token_endpoint": format!("{issuer}/api/oauth/token"),
        "revocation_endpoint": format!("{issuer}/api/oauth/revoke"),
        "introspection_endpoint": format!("{issuer}/api/oauth/introspect"),
        "response_types_supported": response_types,
        "response_modes_supported": ["query", "fragment"],
        "grant_types_supported": token_grants,
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "none"],
        "revocation_endpoint_auth_methods_supported": ["client_secret_basic", "none"],
        "introspection_endpoint_auth_methods_supported": ["client_secret_basic"],
        "code_challenge_methods_supported": ["S256"],
    });
    if !any_scope {
        body["scopes_supported"] = json!(scopes);
    }
    let mut response = Response::new(body::full(Bytes::from(body.to_string())));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames_in_paths_are_percent_decoded() {
        assert_eq!(
            percent_decode("alex%40example.com").as_deref(),
            Some("alex@example.com")
        );
        assert_eq!(percent_decode("plain").as_deref(), Some("plain"));
        assert_eq!(percent_decode("bad%4"), None);
        assert_eq!(percent_decode("bad%zz"), None);
        assert_eq!(percent_decode("%ff"), None);
    }
}
