//! `POST /api/oauth/token`: the grants of RFC 6749 as Covata's token API serves them.

use std::net::IpAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE, PRAGMA};
use http::{HeaderValue, Request, Response};
use hyper::body::Incoming;
use serde::Serialize;

use crate::body::{self, Body};
use crate::config::GrantType;
use crate::directory::{Client, User};
use crate::error::Error;
use crate::form::Form;
use crate::gateway::{Live, Shared};
use crate::token::client_auth;
use crate::token::codes::{is_pkce_string, pkce_matches, CodeError};
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
        "implicit" => Err(Error::UnsupportedGrantType(
            "the implicit grant is not a token endpoint grant; use /api/oauth/authorize".into(),
        )),
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
    let (client, form) = client_auth::read_form_and_client(shared, live, request).await?;
    let grant = parse_grant_type(form.require("grant_type")?)?;
    if !client.allows(grant) {
        return Err(Error::UnauthorizedClient(
            format!("this client may not use the {} grant", grant.as_str()).into(),
        ));
    }
    // Before any grant runs: a refresh must not use up its token only to find no room.
    let records =
        1 + usize::from(grant != GrantType::ClientCredentials && refresh_ttl(&client).is_some());
    if !shared.tokens.has_room(records) {
        return Err(Error::TemporarilyUnavailable(
            "the token table is full; try again later".into(),
        ));
    }
    let issued = match grant {
        GrantType::Password => password(shared, live, &client, &form, client_ip).await?,
        GrantType::RefreshToken => refresh(shared, live, &client, &form)?,
        GrantType::ClientCredentials => client_credentials(shared, &client, &form)?,
        GrantType::AuthorizationCode => authorization_code(shared, live, &client, &form)?,
        // parse_grant_type never yields it: implicit is served at /api/oauth/authorize.
        GrantType::Implicit => {
            return Err(Error::UnsupportedGrantType(
                "the implicit grant is not a token endpoint grant".into(),
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

/// Checks a user's password, with the lockout, exactly as both the password grant and
/// the sign-in page need it: one error for an unknown user, a wrong password and a
/// lockout, and the same argon2 cost for an unknown user as for a known one.
pub(crate) async fn sign_in(
    shared: &Shared,
    live: &Live,
    username: &str,
    password: &str,
    client_ip: IpAddr,
) -> Result<Arc<User>, Error> {
    tracing::Span::current().record("user", username);
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
    match user.filter(|_| verified) {
        Some(user) => {
            shared.lockout.succeed(username);
            Ok(user.clone())
        }
        None => {
            shared
                .lockout
                .fail(username, client_ip, security.lockout_window);
            Err(bad_credentials())
        }
    }
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
    let user = sign_in(shared, live, username, password, client_ip).await?;
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

fn authorization_code(
    shared: &Shared,
    live: &Live,
    client: &Arc<Client>,
    form: &Form,
) -> Result<Issued, Error> {
    let code = form.require("code")?;
    let redirect_uri = form.get("redirect_uri");
    let verifier = form.get("code_verifier");
    let mut roles: Vec<String> = Vec::new();
    let redeemed = shared.codes.redeem(code, &client.id, |grant| {
        // RFC 6749 §4.1.3: the same redirect_uri as the authorization request, if it had one.
        let redirect_ok = match redirect_uri {
            Some(uri) => uri == grant.redirect_uri,
            None => !grant.redirect_uri_given,
        };
        if !redirect_ok {
            return Err(Error::InvalidGrant(
                "redirect_uri does not match the authorization request".into(),
            ));
        }
        match (&grant.code_challenge, verifier) {
            (Some(challenge), Some(verifier)) => {
                if !is_pkce_string(verifier) || !pkce_matches(verifier, challenge) {
                    return Err(Error::InvalidGrant(
                        "code_verifier does not match the code_challenge".into(),
                    ));
                }
            }
            (Some(_), None) => {
                return Err(Error::InvalidGrant(
                    "code_verifier is required (PKCE was used)".into(),
                ))
            }
            // Without a challenge a verifier proves nothing; refuse rather than ignore.
            (None, Some(_)) => {
                return Err(Error::InvalidGrant(
                    "code_verifier sent but no code_challenge was".into(),
                ))
            }
            (None, None) => {}
        }
        let user = live
            .directory
            .user(&grant.username)
            .ok_or_else(|| Error::InvalidGrant("the user of this code no longer exists".into()))?;
        roles.clone_from(&user.roles);
        Ok(())
    });
    let grant = match redeemed {
        Ok(grant) => grant,
        Err(CodeError::Invalid) => {
            return Err(Error::InvalidGrant(
                "the authorization code is invalid or expired".into(),
            ))
        }
        Err(CodeError::Replayed(Some(family))) => {
            shared.tokens.revoke_family(family);
            tracing::warn!(
                client_id = &*client.id,
                "authorization code replayed; the tokens issued from it are revoked"
            );
            return Err(Error::InvalidGrant(
                "the authorization code was already used; the tokens issued from it are revoked"
                    .into(),
            ));
        }
        // Spent by an attempt that failed: nothing was issued from it.
        Err(CodeError::Replayed(None)) => {
            return Err(Error::InvalidGrant(
                "the authorization code was already used".into(),
            ))
        }
        Err(CodeError::Rejected(error)) => return Err(error),
    };
    tracing::Span::current().record("user", &*grant.username);
    let issued = shared.tokens.issue(IssueRequest {
        family: None,
        username: Some(grant.username.clone()),
        client_id: client.id.clone(),
        roles: &roles,
        scope: grant.scope.clone(),
        grant_scope: grant.scope,
        access_ttl: client.access_ttl,
        refresh_ttl: refresh_ttl(client),
    })?;
    shared.codes.bind_family(code, issued.family);
    Ok(issued)
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
