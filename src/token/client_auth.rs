//! Client authentication for the token endpoint (RFC 6749 §2.3).
//!
//! Confidential clients use HTTP Basic, under `Authorization` or under the
//! `Authentication` spelling of Covata's docs. Public clients name themselves with
//! `client_id` in the body and have no secret.

use std::sync::Arc;

use base64::Engine;
use http::HeaderMap;

use crate::directory::Client;
use crate::error::Error;
use crate::form::Form;
use crate::gateway::Shared;

/// What the request presents as client credentials.
#[derive(Debug, PartialEq, Eq)]
enum Presented {
    Basic { id: String, secret: String },
    Public { id: String },
}

fn bad_credentials() -> Error {
    Error::InvalidClient("Bad client credentials".into())
}

/// The Basic credentials of one header, if it carries the Basic scheme.
fn basic(headers: &HeaderMap, name: &str) -> Result<Option<(String, String)>, Error> {
    let Some(value) = headers.get(name) else {
        return Ok(None);
    };
    let malformed = || Error::InvalidClient("malformed HTTP Basic credentials".into());
    let value = value.to_str().map_err(|_| malformed())?.trim();
    let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
    if !scheme.eq_ignore_ascii_case("basic") {
        // Some other scheme (a stray bearer token, say) is not client authentication.
        return Ok(None);
    }
    let rest = rest.trim();
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(rest)
        .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(rest))
        .map_err(|_| malformed())?;
    let text = String::from_utf8(decoded).map_err(|_| malformed())?;
    let (id, secret) = text.split_once(':').ok_or_else(malformed)?;
    Ok(Some((id.to_owned(), secret.to_owned())))
}

fn presented(headers: &HeaderMap, form: &Form) -> Result<Presented, Error> {
    // One value per header: with two, which one authenticated would depend on which
    // the code read (RFC 9110 §5.3 allows no list here).
    for name in ["authorization", "authentication"] {
        if headers.get_all(name).iter().nth(1).is_some() {
            return Err(Error::InvalidRequest(
                format!("more than one {name} header").into(),
            ));
        }
    }
    let standard = basic(headers, "authorization")?;
    let covata = basic(headers, "authentication")?;
    let header =
        match (standard, covata) {
            (Some(_), Some(_)) => return Err(Error::InvalidRequest(
                "send client credentials in one header, not both Authorization and Authentication"
                    .into(),
            )),
            (a, b) => a.or(b),
        };
    match header {
        Some((id, secret)) => {
            if form.get("client_secret").is_some() {
                return Err(Error::InvalidRequest(
                    "use one client authentication method: HTTP Basic or client_secret, not both"
                        .into(),
                ));
            }
            if form.get("client_id").is_some_and(|body_id| body_id != id) {
                return Err(Error::InvalidRequest(
                    "client_id in the body differs from the authenticated client".into(),
                ));
            }
            Ok(Presented::Basic { id, secret })
        }
        None if form.get("client_secret").is_some() => Err(Error::InvalidClient(
            "client_secret in the body is not supported; use HTTP Basic authentication".into(),
        )),
        None => match form.get("client_id") {
            Some(id) => Ok(Presented::Public { id: id.to_owned() }),
            None => Err(Error::InvalidClient(
                "client authentication is required (HTTP Basic)".into(),
            )),
        },
    }
}

/// RFC 6749 §2.3.1 has clients form-encode id and secret before Basic encoding, but
/// most (Covata's included) send them raw: try raw first, then decoded if different.
fn candidates(id: &str, secret: &str) -> Vec<(String, String)> {
    let mut list = vec![(id.to_owned(), secret.to_owned())];
    let decode = |s: &str| form_decode(s).filter(|d| d != s);
    let (did, dsecret) = (decode(id), decode(secret));
    if did.is_some() || dsecret.is_some() {
        list.push((
            did.unwrap_or_else(|| id.to_owned()),
            dsecret.unwrap_or_else(|| secret.to_owned()),
        ));
    }
    list
}

fn form_decode(s: &str) -> Option<String> {
    let pairs: Vec<(String, String)> =
        serde_urlencoded::from_str(&format!("v={}", s.replace('&', "%26"))).ok()?;
    pairs.into_iter().next().map(|(_, v)| v)
}

/// Reads a POSTed form and authenticates its client: the start of every
/// client-authenticated endpoint (token, revoke, introspect).
pub async fn read_form_and_client(
    shared: &Shared,
    live: &crate::gateway::Live,
    request: http::Request<hyper::body::Incoming>,
) -> Result<(Arc<Client>, Form), Error> {
    if request.method() != http::Method::POST {
        return Err(Error::MethodNotAllowed("POST"));
    }
    let (parts, body) = request.into_parts();
    let server = &live.config.server;
    let form = crate::form::read(
        &parts.headers,
        body,
        server.max_form_body,
        server.header_read_timeout,
    )
    .await?;
    let client = authenticate(shared, &live.directory, &parts.headers, &form).await?;
    tracing::Span::current().record("client_id", &*client.id);
    Ok((client, form))
}

/// Authenticates the client of a token-endpoint request.
pub async fn authenticate(
    shared: &Shared,
    directory: &crate::directory::Directory,
    headers: &HeaderMap,
    form: &Form,
) -> Result<Arc<Client>, Error> {
    match presented(headers, form)? {
        Presented::Public { id } => match directory.client(&id) {
            Some(client) if client.is_public() => Ok(client.clone()),
            Some(_) => Err(Error::InvalidClient(
                "this client must authenticate with HTTP Basic".into(),
            )),
            None => Err(bad_credentials()),
        },
        Presented::Basic { id, secret } => {
            for (id, secret) in candidates(&id, &secret) {
                let Some(client) = directory.client(&id) else {
                    continue;
                };
                let Some(phc) = &client.secret else {
                    return Err(Error::InvalidClient(
                        "a public client has no secret; send client_id in the body".into(),
                    ));
                };
                if shared.secrets.contains(&client.id, &secret) {
                    return Ok(client.clone());
                }
                if shared.verifier.verify(phc.clone(), secret.clone()).await? {
                    shared.secrets.remember(&client.id, &secret);
                    return Ok(client.clone());
                }
            }
            // Unknown client: spend what a wrong secret costs, so ids cannot be probed.
            if directory.client(&id).is_none() {
                shared
                    .verifier
                    .verify(directory.decoy_password.clone(), secret)
                    .await?;
            }
            Err(bad_credentials())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| (k.parse().unwrap(), v.parse().unwrap()))
            .collect()
    }

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    #[test]
    fn basic_under_either_spelling() {
        let form = Form::default();
        for name in ["Authorization", "Authentication"] {
            let h = headers(&[(name, &format!("basic {}", b64("app:s:e:c")))]);
            assert_eq!(
                presented(&h, &form).unwrap(),
                Presented::Basic {
                    id: "app".into(),
                    secret: "s:e:c".into()
                }
            );
        }
    }

    #[test]
    fn malformed_and_conflicting_credentials() {
        let form = Form::default();
        let bad = ["Basic !!!notbase64", &format!("Basic {}", b64("no-colon"))];
        for value in bad {
            let error = presented(&headers(&[("authorization", value)]), &form).unwrap_err();
            assert_eq!(error.code(), "invalid_client", "{value}");
        }
        let both = headers(&[
            ("authorization", &format!("Basic {}", b64("a:b"))),
            ("authentication", &format!("Basic {}", b64("a:b"))),
        ]);
        assert_eq!(
            presented(&both, &form).unwrap_err().code(),
            "invalid_request"
        );
        let with_secret = Form::parse(b"client_secret=x").unwrap();
        let basic = headers(&[("authorization", &format!("Basic {}", b64("a:b")))]);
        assert_eq!(
            presented(&basic, &with_secret).unwrap_err().code(),
            "invalid_request"
        );
        assert_eq!(
            presented(&HeaderMap::new(), &with_secret)
                .unwrap_err()
                .code(),
            "invalid_client"
        );
        assert_eq!(
            presented(&HeaderMap::new(), &form).unwrap_err().code(),
            "invalid_client"
        );
        let other_id = Form::parse(b"client_id=z").unwrap();
        assert_eq!(
            presented(&basic, &other_id).unwrap_err().code(),
            "invalid_request"
        );
    }

    #[test]
    fn bearer_header_is_not_client_auth() {
        let form = Form::parse(b"client_id=spa").unwrap();
        let h = headers(&[("authorization", "Bearer abc")]);
        assert_eq!(
            presented(&h, &form).unwrap(),
            Presented::Public { id: "spa".into() }
        );
    }

    #[test]
    fn form_encoded_credentials_are_tried_decoded_too() {
        assert_eq!(
            candidates("app", "plain"),
            vec![("app".into(), "plain".into())]
        );
        assert_eq!(
            candidates("my%20app", "a+b%26"),
            vec![
                ("my%20app".into(), "a+b%26".into()),
                ("my app".into(), "a b&".into())
            ]
        );
    }
}
