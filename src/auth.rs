//! The bearer check of every proxied request (RFC 6750).

use std::sync::Arc;

use http::header::AUTHORIZATION;
use http::HeaderMap;

use crate::error::Error;
use crate::routes::Route;
use crate::token::{Identity, TokenStore};

/// The token of an `Authorization: Bearer` header.
///
/// No header, or a header of another scheme, is a request without a token (401 with no
/// error code); a bearer header whose token is empty or not `b64token` syntax is
/// `invalid_token`.
pub fn bearer_token(headers: &HeaderMap) -> Result<&str, Error> {
    let missing =
        || Error::MissingToken("Full authentication is required to access this resource".into());
    let malformed = || Error::InvalidToken("the bearer token is malformed".into());
    let mut values = headers.get_all(AUTHORIZATION).iter();
    let value = values.next().ok_or_else(missing)?;
    if values.next().is_some() {
        return Err(Error::InvalidRequest(
            "more than one Authorization header".into(),
        ));
    }
    let value = value.to_str().map_err(|_| malformed())?;
    let (scheme, token) = value.split_once(' ').unwrap_or((value, ""));
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(missing());
    }
    let token = token.trim_matches(' ');
    // RFC 6750 §2.1: b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="
    let body = token.trim_end_matches('=');
    let b64token = !body.is_empty()
        && body.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'+' | b'/')
        });
    if !b64token {
        return Err(malformed());
    }
    Ok(token)
}

/// Checks the request's token against the route's policy; returns who it speaks for.
pub fn authorize(
    tokens: &TokenStore,
    route: &Route,
    headers: &HeaderMap,
) -> Result<Arc<Identity>, Error> {
    let token = bearer_token(headers)?;
    let identity = tokens.authenticate(token).ok_or_else(|| {
        Error::InvalidToken("the access token is unknown, expired or revoked".into())
    })?;
    if !route.roles.is_empty() && !route.roles.iter().any(|r| identity.has_role(r)) {
        return Err(Error::InsufficientScope(
            format!(
                "this resource needs one of the roles {}",
                route.roles.join(", ")
            )
            .into(),
        ));
    }
    if let Some(missing) = route.scopes.iter().find(|s| !identity.has_scope(s)) {
        return Err(Error::InsufficientScope(
            format!("this resource needs the scope `{missing}`").into(),
        ));
    }
    Ok(identity)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, value.parse().unwrap());
        headers
    }

    #[test]
    fn parses_bearer_tokens() {
        assert_eq!(
            bearer_token(&with("Bearer abc-_.~+/==")).unwrap(),
            "abc-_.~+/=="
        );
        assert_eq!(bearer_token(&with("bearer abc")).unwrap(), "abc");
        assert_eq!(
            bearer_token(&HeaderMap::new()).unwrap_err().code(),
            "unauthorized"
        );
        assert_eq!(
            bearer_token(&with("Basic YTpi")).unwrap_err().code(),
            "unauthorized"
        );
        for bad in [
            "Bearer",
            "Bearer ",
            "Bearer a b",
            "Bearer a\"b",
            "Bearer ===",
            "Bearer a=b",
        ] {
            assert_eq!(
                bearer_token(&with(bad)).unwrap_err().code(),
                "invalid_token",
                "{bad}"
            );
        }
        let mut two = with("Bearer a");
        two.append(AUTHORIZATION, "Bearer b".parse().unwrap());
        assert_eq!(bearer_token(&two).unwrap_err().code(), "invalid_request");
    }
}
