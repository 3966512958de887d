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
    // One pass over the bytes, as this runs for every proxied request: the scheme is
    // everything before the first space; the token what follows, trimmed of spaces.
    let bytes = value.as_bytes();
    let (scheme, rest) = match memchr::memchr(b' ', bytes) {
        Some(space) => (&bytes[..space], &bytes[space + 1..]),
        None => (bytes, &[][..]),
    };
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        // Another scheme is no token, unless the header is not even visible ASCII.
        return Err(if value.to_str().is_ok() {
            missing()
        } else {
            malformed()
        });
    }
    let start = rest.iter().position(|&b| b != b' ').unwrap_or(rest.len());
    let end = rest
        .iter()
        .rposition(|&b| b != b' ')
        .map_or(start, |i| i + 1);
    let token = &rest[start..end];
    // RFC 6750 §2.1: b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="
    let padding = token.iter().rev().take_while(|&&b| b == b'=').count();
    let body = &token[..token.len() - padding];
    if body.is_empty() || !body.iter().all(|&b| B64TOKEN[usize::from(b)]) {
        return Err(malformed());
    }
    // All ASCII by now, so this cannot fail; no unsafe needed to say so.
    std::str::from_utf8(token).map_err(|_| malformed())
}

/// The bytes of RFC 6750's `b64token` before its `=` padding.
const B64TOKEN: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] =
            c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~' | b'+' | b'/');
        b += 1;
    }
    table
};

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
        // Not visible ASCII: malformed, whatever the scheme.
        let mut odd = HeaderMap::new();
        odd.insert(
            AUTHORIZATION,
            http::HeaderValue::from_bytes(b"Basic \xff").unwrap(),
        );
        assert_eq!(bearer_token(&odd).unwrap_err().code(), "invalid_token");
        let mut two = with("Bearer a");
        two.append(AUTHORIZATION, "Bearer b".parse().unwrap());
        assert_eq!(bearer_token(&two).unwrap_err().code(), "invalid_request");
    }

    /// The parse as first written (to_str, split, trims), kept to check the one-pass
    /// version against: same token or same error code for every value.
    fn reference(value: &http::HeaderValue) -> Result<String, &'static str> {
        let Ok(value) = value.to_str() else {
            return Err("invalid_token");
        };
        let (scheme, token) = value.split_once(' ').unwrap_or((value, ""));
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err("unauthorized");
        }
        let token = token.trim_matches(' ');
        let body = token.trim_end_matches('=');
        let ok = !body.is_empty()
            && body.bytes().all(|b| {
                b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'+' | b'/')
            });
        if ok {
            Ok(token.to_owned())
        } else {
            Err("invalid_token")
        }
    }

    #[test]
    fn one_pass_parse_agrees_with_the_reference_on_every_short_value() {
        // Every value of up to four bytes from an alphabet of the interesting ones,
        // behind each of a few prefixes.
        let alphabet: &[u8] = b" =aZ9-~/\t\"\x7f\xff";
        let prefixes: [&[u8]; 6] = [
            b"",
            b"Bearer",
            b"bearer ",
            b"BEARER  ",
            b"Basic ",
            b"Bearerx",
        ];
        let mut checked = 0;
        for prefix in prefixes {
            let mut suffix: Vec<u8> = Vec::new();
            loop {
                let mut value = prefix.to_vec();
                value.extend_from_slice(&suffix);
                if let Ok(header) = http::HeaderValue::from_bytes(&value) {
                    let mut headers = HeaderMap::new();
                    headers.insert(AUTHORIZATION, header.clone());
                    let ours = bearer_token(&headers)
                        .map(str::to_owned)
                        .map_err(|e| e.code());
                    assert_eq!(ours, reference(&header), "{value:?}");
                    checked += 1;
                }
                // Next suffix, counting in base alphabet.len(), lengths 0..=4.
                let mut i = 0;
                loop {
                    if i == suffix.len() {
                        if suffix.len() == 4 {
                            break;
                        }
                        suffix.push(alphabet[0]);
                        break;
                    }
                    let at = alphabet.iter().position(|&c| c == suffix[i]).unwrap();
                    if at + 1 < alphabet.len() {
                        suffix[i] = alphabet[at + 1];
                        break;
                    }
                    suffix[i] = alphabet[0];
                    i += 1;
                }
                if i == 4 && suffix.len() == 4 && suffix.iter().all(|&c| c == alphabet[0]) {
                    break;
                }
            }
        }
        assert!(checked > 50_000, "{checked}");
    }
}
