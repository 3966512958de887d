//! Reading `application/x-www-form-urlencoded` bodies for the gateway's own endpoints:
//! bounded in size and time, and strict about RFC 6749's rules (§3.1: an empty value is
//! an absent parameter; §3.2: no parameter twice).

use std::collections::HashMap;
use std::time::Duration;

use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use http::HeaderMap;
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::error::Error;

/// A parsed form.
#[derive(Debug, Default)]
pub struct Form {
    params: HashMap<String, String>,
}

impl Form {
    /// Parses a form body; a repeated parameter is `invalid_request`.
    pub fn parse(body: &[u8]) -> Result<Form, Error> {
        let mut params = HashMap::new();
        for (name, value) in form_pairs(body) {
            if params.contains_key(&name) {
                return Err(Error::InvalidRequest(
                    format!("parameter `{name}` is repeated").into(),
                ));
            }
            params.insert(name, value);
        }
        Ok(Form { params })
    }

    /// A parameter's value; an empty one counts as absent.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.params
            .get(name)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    /// A parameter that must be present.
    pub fn require(&self, name: &str) -> Result<&str, Error> {
        self.get(name)
            .ok_or_else(|| Error::InvalidRequest(format!("parameter `{name}` is required").into()))
    }
}

fn form_pairs(body: &[u8]) -> Vec<(String, String)> {
    serde_urlencoded::from_bytes::<Vec<(String, String)>>(body).unwrap_or_default()
}

/// Whether the request declares a form body (`charset` and other parameters allowed),
/// in exactly one `Content-Type`.
pub fn is_form(headers: &HeaderMap) -> bool {
    let mut types = headers.get_all(CONTENT_TYPE).iter();
    let (first, second) = (types.next(), types.next());
    second.is_none()
        && first
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|media| {
                media
                    .trim()
                    .eq_ignore_ascii_case("application/x-www-form-urlencoded")
            })
}

/// Reads a form body of at most `limit` bytes within `deadline`.
pub async fn read(
    headers: &HeaderMap,
    body: Incoming,
    limit: usize,
    deadline: Duration,
) -> Result<Form, Error> {
    if !is_form(headers) {
        return Err(Error::InvalidRequest(
            "the body must be application/x-www-form-urlencoded".into(),
        ));
    }
    let too_large = || Error::PayloadTooLarge(format!("the body exceeds {limit} bytes").into());
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        crate::body::drain(body).await;
        return Err(too_large());
    }
    let mut body = body;
    let read = async {
        let mut collected = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame
                .map_err(|_| Error::InvalidRequest("the request body could not be read".into()))?;
            let Some(data) = frame.data_ref() else {
                continue;
            };
            if collected.len() + data.len() > limit {
                return Ok(None);
            }
            collected.extend_from_slice(data);
        }
        Ok(Some(collected))
    };
    match tokio::time::timeout(deadline, read).await {
        Err(_) => Err(Error::RequestTimeout(
            "the request body did not arrive in time".into(),
        )),
        Ok(Err(error)) => Err(error),
        Ok(Ok(Some(collected))) => Form::parse(&collected),
        Ok(Ok(None)) => {
            crate::body::drain(body).await;
            Err(too_large())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_decodes_and_treats_empty_as_absent() {
        let form =
            Form::parse(b"grant_type=password&username=a%40b.c&password=p+w%26&scope=").unwrap();
        assert_eq!(form.get("username"), Some("a@b.c"));
        assert_eq!(form.get("password"), Some("p w&"));
        assert_eq!(form.get("scope"), None);
        assert_eq!(form.require("scope").unwrap_err().code(), "invalid_request");
    }

    #[test]
    fn repeated_parameter_is_invalid_request() {
        let error = Form::parse(b"a=1&b=2&a=1").unwrap_err();
        assert_eq!(error.code(), "invalid_request");
        assert!(error.description().contains("`a`"));
    }

    #[test]
    fn content_type_with_charset_is_a_form() {
        let mut headers = HeaderMap::new();
        headers.insert(
            CONTENT_TYPE,
            "Application/X-WWW-Form-Urlencoded; charset=UTF-8"
                .parse()
                .unwrap(),
        );
        assert!(is_form(&headers));
        // Two types: which one the body is would depend on which is read.
        let mut twice = headers.clone();
        twice.append(CONTENT_TYPE, "application/json".parse().unwrap());
        assert!(!is_form(&twice));
        headers.insert(CONTENT_TYPE, "application/json".parse().unwrap());
        assert!(!is_form(&headers));
        assert!(!is_form(&HeaderMap::new()));
    }
}
