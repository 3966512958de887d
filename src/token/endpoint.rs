//! `POST /api/oauth/token`: the grants of RFC 6749 as Covata's token API serves them.

use std::net::IpAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE, PRAGMA};
use http::{HeaderValue, Method, Request, Response};
use hyper::body::Incoming;
use serde::Serialize;

use crate::body::{self, Body};
use crate::config::GrantType;
use crate::directory::Client;
use crate::error::Error;
use crate::form::{self, Form};
use crate::gateway::{Live, Shared};
use crate::token::client_auth;
use crate::token::scope;
use crate::token::store::{IssueRequest, Issued, RefreshError};

/// The success body of RFC 6749 §5.1, plus Covata's `jti`.
#[derive(Serialize)]
struct TokenResponse<'a> {
    access_token: &'a str,
    token_type: &'static str,
    expires_in: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    refresh_token: Option<&'a str>,
    scope: &'a str,
    jti: String,
}

/// Turns issued tokens into the `200` response, `no-store` as RFC 6749 §5.1 requires.
pub fn token_response(issued: &Issued) -> Response<Body> {
    let json = serde_json::to_vec(&TokenResponse {
        access_token: &issued.access_token,
        token_type: "bearer",
        expires_in: issued.expires_in,
        refresh_token: issued.refresh_token.as_deref(),
        scope: &issued.scope,
        jti: issued.jti.to_string(),
    })
    .unwrap_or_default();
    let mut response = Response::new(body::full(Bytes::from(json)));
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/json;charset=UTF-8"),
    );
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(PRAGMA, HeaderValue::from_static("no-cache"));
    response
}

fn parse_grant_type(name: &str) -> Result<GrantType, Error> {
    match name {
        "password" => Ok(GrantType::Password),
        "authorization_code" => Ok(GrantType::AuthorizationCode),
        "refresh_token" => Ok(GrantType::RefreshToken),
        "client_credentials" => Ok(GrantType::ClientCredentials),
        _ => Err(Error::UnsupportedGrantType(
            format!("grant_type `{}` is not supported", name.escape_default()).into(),
        )),
    }
}

/// Handles one token request.
pub async fn handle(
    shared: &Shared,
    live: &Live,
    request: Request<Incoming>,
    client_ip: IpAddr,
) -> Result<Response<Body>, Error> {
    if request.method() != Method::POST {
        return Err(Error::MethodNotAllowed("POST"));
    }
    let (parts, body) = request.into_parts();
    let server = &live.config.server;
    let form = form::read(
        &parts.headers,
        body,
        server.max_form_body,
        server.header_read_timeout,
    )
    .await?;
    let client = client_auth::authenticate(shared, &live.directory, &parts.headers, &form).await?;
    tracing::Span::current().record("client_id", &*client.id);

    let grant = parse_grant_type(form.require("grant_type")?)?;
    if !client.allows(grant) {
        return Err(Error::UnauthorizedClient(
            format!("this client may not use the {} grant", grant.as_str()).into(),
        ));
    }
    let issued = match grant {
        GrantType::Password => password(shared, live, &client, &form, client_ip).await?,
        GrantType::RefreshToken => refresh(shared, live, &client, &form)?,
        GrantType::ClientCredentials => client_credentials(shared, &client, &form)?,
        GrantType::AuthorizationCode | GrantType::Implicit => {
            return Err(Error::UnsupportedGrantType(
                format!("grant_type `{}` is not available yet", grant.as_str()).into(),
            ))
        }
    };
    Ok(token_response(&issued))
}

/// Whether the client gets a refresh token alongside the access token.
fn refresh_ttl(client: &Client) -> Option<u64> {
    client
        .allows(GrantType::RefreshToken)
        .then_some(client.refresh_ttl)
}

async fn password(
    shared: &Shared,
    live: &Live,
    client: &Arc<Client>,
    form: &Form,
    client_ip: IpAddr,
) -> Result<Issued, Error> {
    let username = form.require("username")?;
    let password = form.require("password")?;
    let granted = scope::grant(form.get("scope"), client.scopes.as_deref())?;
    tracing::Span::current().record("user", username);

    // One message for an unknown user, a wrong password and a lockout (no enumeration).
    let bad_credentials = || Error::InvalidGrant("Bad credentials".into());
    let security = &live.config.security;
    if shared.lockout.is_locked(
        username,
        client_ip,
        security.max_failed_logins,
        security.lockout_window,
    ) {
        return Err(bad_credentials());
    }
    let user = live.directory.user(username);
    let phc = user.map_or_else(
        || live.directory.decoy_password.clone(),
        |u| u.password.clone(),
    );
    let verified = shared.verifier.verify(phc, password.to_owned()).await?;
    let Some(user) = user.filter(|_| verified) else {
        shared
            .lockout
            .fail(username, client_ip, security.lockout_window);
        return Err(bad_credentials());
    };
    shared.lockout.succeed(username);
    shared.tokens.issue(IssueRequest {
        family: None,
        username: Some(user.username.clone()),
        client_id: client.id.clone(),
        roles: &user.roles,
        scope: granted.clone(),
        grant_scope: granted,
        access_ttl: client.access_ttl,
        refresh_ttl: refresh_ttl(client),
    })
}

fn refresh(
    shared: &Shared,
    live: &Live,
    client: &Arc<Client>,
    form: &Form,
) -> Result<Issued, Error> {
    let token = form.require("refresh_token")?;
    let requested = form.get("scope");
    let mut narrowed = String::new();
    let mut roles: Vec<String> = Vec::new();
    let redeemed = shared.tokens.redeem_refresh(token, &client.id, |grant| {
        narrowed = scope::narrow(requested, &grant.scope)?;
        if let Some(name) = &grant.username {
            // The user may have been removed or had roles changed by a reload since.
            let user = live.directory.user(name).ok_or_else(|| {
                Error::InvalidGrant("the user of this grant no longer exists".into())
            })?;
            roles.clone_from(&user.roles);
        }
        Ok(())
    });
    let (grant, family) = match redeemed {
        Ok(redeemed) => redeemed,
        Err(RefreshError::Invalid) => {
            return Err(Error::InvalidGrant(
                "the refresh token is invalid, expired or revoked".into(),
            ))
        }
        Err(RefreshError::WrongClient) => {
            return Err(Error::InvalidGrant(
                "the refresh token was issued to another client".into(),
            ))
        }
        Err(RefreshError::Replayed) => {
            tracing::warn!(
                client_id = &*client.id,
                "refresh token replayed; its whole token family is revoked"
            );
            return Err(Error::InvalidGrant(
                "the refresh token was already used; all tokens of this grant are revoked".into(),
            ));
        }
        Err(RefreshError::Rejected(error)) => return Err(error),
    };
    if let Some(user) = &grant.username {
        tracing::Span::current().record("user", &**user);
    }
    shared.tokens.issue(IssueRequest {
        family: Some(family),
        username: grant.username.clone(),
        client_id: client.id.clone(),
        roles: &roles,
        scope: narrowed,
        grant_scope: grant.scope.to_string(),
        access_ttl: client.access_ttl,
        refresh_ttl: refresh_ttl(client),
    })
}

fn client_credentials(shared: &Shared, client: &Arc<Client>, form: &Form) -> Result<Issued, Error> {
    let granted = scope::grant(form.get("scope"), client.scopes.as_deref())?;
    // RFC 6749 §4.4.3: no refresh token for client credentials.
    shared.tokens.issue(IssueRequest {
        family: None,
        username: None,
        client_id: client.id.clone(),
        roles: &[],
        scope: granted.clone(),
        grant_scope: granted,
        access_ttl: client.access_ttl,
        refresh_ttl: None,
    })
}
