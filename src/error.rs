//! The one error type for everything a request can fail with, and its one mapping to an
//! HTTP status, an RFC error code and a JSON body.
//!
//! Descriptions are written for the client: they never contain a token, a password or a
//! client secret, because they are sent back verbatim and logged.

use std::borrow::Cow;

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE, PRAGMA, WWW_AUTHENTICATE};
use http::{HeaderValue, Response, StatusCode};
use serde::Serialize;

use crate::body::{self, Body};

/// The realm every `WWW-Authenticate` challenge names.
pub const REALM: &str = "covata-gateway";

type Text = Cow<'static, str>;

/// Why a request was not answered with success.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// RFC 6749 §5.2 `invalid_request`: malformed, missing or repeated parameter.
    #[error("{0}")]
    InvalidRequest(Text),
    /// RFC 6749 §5.2 `invalid_client`: client authentication failed.
    #[error("{0}")]
    InvalidClient(Text),
    /// RFC 6749 §5.2 `invalid_grant`: bad user credentials, bad code or refresh token.
    #[error("{0}")]
    InvalidGrant(Text),
    /// RFC 6749 §5.2 `unauthorized_client`: grant type not allowed for this client.
    #[error("{0}")]
    UnauthorizedClient(Text),
    /// RFC 6749 §5.2 `unsupported_grant_type`.
    #[error("{0}")]
    UnsupportedGrantType(Text),
    /// RFC 6749 §5.2 `invalid_scope`.
    #[error("{0}")]
    InvalidScope(Text),
    /// RFC 6749 §4.1.2.1 `temporarily_unavailable`, sent as 503.
    #[error("{0}")]
    TemporarilyUnavailable(Text),
    /// RFC 6750 §3.1: the request carried no bearer token at all (no error code).
    #[error("{0}")]
    MissingToken(Text),
    /// RFC 6750 §3.1 `invalid_token`: malformed, unknown, expired or revoked.
    #[error("{0}")]
    InvalidToken(Text),
    /// RFC 6750 §3.1 `insufficient_scope`: the token lacks a role or scope the route needs.
    #[error("{0}")]
    InsufficientScope(Text),
    /// No route matches the request.
    #[error("{0}")]
    NotFound(Text),
    /// The path exists but not for this method; holds the `Allow` value.
    #[error("method not allowed; use {0}")]
    MethodNotAllowed(&'static str),
    /// The client did not send its request body in time.
    #[error("{0}")]
    RequestTimeout(Text),
    /// The body is larger than the endpoint accepts.
    #[error("{0}")]
    PayloadTooLarge(Text),
    /// The upstream refused the connection or failed mid-response.
    #[error("{0}")]
    BadGateway(Text),
    /// The upstream did not connect or answer in time.
    #[error("{0}")]
    GatewayTimeout(Text),
    /// A fault of the gateway itself (a panicked blocking task, say).
    #[error("{0}")]
    Internal(Text),
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    error_description: &'a str,
}

impl Error {
    /// The HTTP status this error is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            Error::InvalidRequest(_)
            | Error::InvalidGrant(_)
            | Error::UnauthorizedClient(_)
            | Error::UnsupportedGrantType(_)
            | Error::InvalidScope(_) => StatusCode::BAD_REQUEST,
            Error::InvalidClient(_) | Error::MissingToken(_) | Error::InvalidToken(_) => {
                StatusCode::UNAUTHORIZED
            }
            Error::InsufficientScope(_) => StatusCode::FORBIDDEN,
            Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Error::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Error::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Error::TemporarilyUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Error::BadGateway(_) => StatusCode::BAD_GATEWAY,
            Error::GatewayTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The `error` member of the JSON body: the RFC code where an RFC defines one.
    pub fn code(&self) -> &'static str {
        match self {
            Error::InvalidRequest(_) => "invalid_request",
            Error::InvalidClient(_) => "invalid_client",
            Error::InvalidGrant(_) => "invalid_grant",
            Error::UnauthorizedClient(_) => "unauthorized_client",
            Error::UnsupportedGrantType(_) => "unsupported_grant_type",
            Error::InvalidScope(_) => "invalid_scope",
            Error::TemporarilyUnavailable(_) => "temporarily_unavailable",
            // Spring Security OAuth, which Covata's clients talk to, uses this code.
            Error::MissingToken(_) => "unauthorized",
            Error::InvalidToken(_) => "invalid_token",
            Error::InsufficientScope(_) => "insufficient_scope",
            Error::NotFound(_) => "not_found",
            Error::MethodNotAllowed(_) => "method_not_allowed",
            Error::RequestTimeout(_) => "request_timeout",
            Error::PayloadTooLarge(_) => "payload_too_large",
            Error::BadGateway(_) => "bad_gateway",
            Error::GatewayTimeout(_) => "gateway_timeout",
            Error::Internal(_) => "server_error",
        }
    }

    /// The `error_description` member of the JSON body.
    pub fn description(&self) -> Cow<'_, str> {
        Cow::Borrowed(match self {
            Error::MethodNotAllowed(_) => return Cow::Owned(self.to_string()),
            Error::InvalidRequest(t)
            | Error::InvalidClient(t)
            | Error::InvalidGrant(t)
            | Error::UnauthorizedClient(t)
            | Error::UnsupportedGrantType(t)
            | Error::InvalidScope(t)
            | Error::TemporarilyUnavailable(t)
            | Error::MissingToken(t)
            | Error::InvalidToken(t)
            | Error::InsufficientScope(t)
            | Error::NotFound(t)
            | Error::RequestTimeout(t)
            | Error::PayloadTooLarge(t)
            | Error::BadGateway(t)
            | Error::GatewayTimeout(t)
            | Error::Internal(t) => t,
        })
    }

    /// The challenge RFC 6749 §5.2 (Basic) or RFC 6750 §3 (Bearer) asks for, if any.
    pub fn www_authenticate(&self) -> Option<HeaderValue> {
        let challenge = match self {
            Error::InvalidClient(_) => format!("Basic realm=\"{REALM}\""),
            Error::MissingToken(_) => format!("Bearer realm=\"{REALM}\""),
            Error::InvalidToken(_) | Error::InsufficientScope(_) => format!(
                "Bearer realm=\"{REALM}\", error=\"{}\", error_description=\"{}\"",
                self.code(),
                // A quoted-string may not hold a bare quote or backslash.
                self.description().replace(['"', '\\'], "'")
            ),
            _ => return None,
        };
        HeaderValue::from_str(&challenge).ok()
    }

    /// Whether this is the gateway's fault (or its upstream's) rather than the client's.
    pub fn is_server_side(&self) -> bool {
        self.status().is_server_error()
    }

    /// The complete response: status, challenge, `no-store`, JSON body.
    pub fn into_response(self) -> Response<Body> {
        let json = serde_json::to_vec(&ErrorBody {
            error: self.code(),
            error_description: &self.description(),
        })
        .unwrap_or_default();
        let mut response = Response::new(body::full(Bytes::from(json)));
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        // RFC 6749 §5.1/§5.2: token responses, errors included, must not be cached.
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        headers.insert(PRAGMA, HeaderValue::from_static("no-cache"));
        if let Some(challenge) = self.www_authenticate() {
            headers.insert(WWW_AUTHENTICATE, challenge);
        }
        if let Error::MethodNotAllowed(allow) = self {
            headers.insert(http::header::ALLOW, HeaderValue::from_static(allow));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The mapping is public interface (clients branch on status and code): pin all of it.
    #[test]
    fn every_variant_maps_to_its_status_and_code() {
        let t = || Text::Borrowed("x");
        let table = [
            (Error::InvalidRequest(t()), 400, "invalid_request", None),
            (
                Error::InvalidClient(t()),
                401,
                "invalid_client",
                Some("Basic"),
            ),
            (Error::InvalidGrant(t()), 400, "invalid_grant", None),
            (
                Error::UnauthorizedClient(t()),
                400,
                "unauthorized_client",
                None,
            ),
            (
                Error::UnsupportedGrantType(t()),
                400,
                "unsupported_grant_type",
                None,
            ),
            (Error::InvalidScope(t()), 400, "invalid_scope", None),
            (
                Error::TemporarilyUnavailable(t()),
                503,
                "temporarily_unavailable",
                None,
            ),
            (
                Error::MissingToken(t()),
                401,
                "unauthorized",
                Some("Bearer"),
            ),
            (
                Error::InvalidToken(t()),
                401,
                "invalid_token",
                Some("Bearer"),
            ),
            (
                Error::InsufficientScope(t()),
                403,
                "insufficient_scope",
                Some("Bearer"),
            ),
            (Error::NotFound(t()), 404, "not_found", None),
            (
                Error::MethodNotAllowed("POST"),
                405,
                "method_not_allowed",
                None,
            ),
            (Error::RequestTimeout(t()), 408, "request_timeout", None),
            (Error::PayloadTooLarge(t()), 413, "payload_too_large", None),
            (Error::BadGateway(t()), 502, "bad_gateway", None),
            (Error::GatewayTimeout(t()), 504, "gateway_timeout", None),
            (Error::Internal(t()), 500, "server_error", None),
        ];
        for (error, status, code, scheme) in table {
            assert_eq!(error.status().as_u16(), status, "{error:?}");
            assert_eq!(error.code(), code, "{error:?}");
            let challenge = error.www_authenticate();
            assert_eq!(
                challenge
                    .as_ref()
                    .map(|c| c.to_str().unwrap().split(' ').next().unwrap()),
                scheme,
                "{error:?}"
            );
        }
    }

    #[test]
    fn bearer_challenges_carry_the_code_except_when_no_token_was_sent() {
        let missing = Error::MissingToken("no token".into()).www_authenticate();
        assert_eq!(missing.unwrap(), "Bearer realm=\"covata-gateway\"");
        let invalid = Error::InvalidToken("say \"hi\"".into()).www_authenticate();
        assert_eq!(
            invalid.unwrap(),
            "Bearer realm=\"covata-gateway\", error=\"invalid_token\", error_description=\"say 'hi'\""
        );
    }

    #[test]
    fn response_is_json_and_not_cacheable() {
        let response = Error::InvalidGrant("bad".into()).into_response();
        assert_eq!(response.status(), 400);
        assert_eq!(response.headers()[CACHE_CONTROL], "no-store");
        assert_eq!(response.headers()[PRAGMA], "no-cache");
        assert_eq!(response.headers()[CONTENT_TYPE], "application/json");
    }
}
