//! The `Authorization: Bearer` parse (`crate::auth::bearer_token`, RFC 6750 §2.1),
//! against a reference written from the RFC's grammar for every header value.

use std::sync::LazyLock;

use http::header::AUTHORIZATION;
use http::{HeaderMap, HeaderValue};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;

use super::{config, corpus, mutated, CASES};
use crate::auth::bearer_token;

static SEEDS: LazyLock<Vec<Vec<u8>>> = LazyLock::new(|| corpus("bearer"));

const DICTIONARY: &[&[u8]] = &[
    b"Bearer ", b"bearer", b"Basic ", b" ", b"  ", b"=", b"==", b"\t", b"\xff", b"\x7f", b"a",
    b"~+/",
];

/// What the header map should give: the token, or the error code. Written from
/// RFC 6750 and the gateway's rules, not from the one-pass parser: one header at
/// most; the scheme is everything before the first space and is case-insensitive;
/// another scheme is no token at all unless the value is not visible ASCII; the token
/// is what follows, trimmed of spaces, and must be `b64token`.
fn reference(headers: &HeaderMap) -> Result<String, &'static str> {
    let values: Vec<&HeaderValue> = headers.get_all(AUTHORIZATION).iter().collect();
    let value = match values.as_slice() {
        [] => return Err("unauthorized"),
        [one] => *one,
        _ => return Err("invalid_request"),
    };
    let bytes = value.as_bytes();
    let visible = bytes
        .iter()
        .all(|&b| b == b'\t' || (0x20..0x7f).contains(&b));
    let space = bytes.iter().position(|&b| b == b' ');
    let (scheme, rest) = match space {
        Some(i) => (&bytes[..i], &bytes[i + 1..]),
        None => (bytes, &b""[..]),
    };
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return Err(if visible {
            "unauthorized"
        } else {
            "invalid_token"
        });
    }
    let mut token = rest;
    while let [b' ', tail @ ..] = token {
        token = tail;
    }
    while let [head @ .., b' '] = token {
        token = head;
    }
    let mut body = token;
    while let [head @ .., b'='] = body {
        body = head;
    }
    let b64 = |b: &u8| b.is_ascii_alphanumeric() || b"-._~+/".contains(b);
    if body.is_empty() || !body.iter().all(b64) {
        return Err("invalid_token");
    }
    Ok(String::from_utf8(token.to_vec()).expect("ASCII"))
}

fn check(values: &[Vec<u8>]) -> Result<(), TestCaseError> {
    let mut headers = HeaderMap::new();
    headers.insert("x-other", HeaderValue::from_static("Bearer nope"));
    for value in values {
        let Ok(value) = HeaderValue::from_bytes(value) else {
            // Not a header value: hyper never hands such a request over.
            return Ok(());
        };
        headers.append(AUTHORIZATION, value);
    }
    let ours = bearer_token(&headers)
        .map(str::to_owned)
        .map_err(|e| e.code());
    prop_assert_eq!(ours, reference(&headers), "{:?}", values);
    Ok(())
}

/// Header values built from the pieces that matter.
fn structured() -> impl Strategy<Value = Vec<u8>> {
    const SCHEMES: &[&[u8]] = &[
        b"Bearer",
        b"bearer",
        b"BEARER",
        b"BeArEr",
        b"Basic",
        b"Bearerx",
        b"Bear",
        b"",
        b"Digest",
        b"\xffBearer",
    ];
    let scheme = select(SCHEMES);
    let char = prop_oneof![
        6 => select(&b"abcXYZ0189-._~+/"[..]),
        2 => Just(b'='),
        2 => Just(b' '),
        1 => select(&b"\t\"!#$%&'(),:;<>?@[\\]^`{|}*"[..]),
        1 => 0x80u8..=0xff,
        1 => any::<u8>(),
    ];
    (scheme, vec(Just(b' '), 0..3), vec(char, 0..40)).prop_map(|(scheme, spaces, token)| {
        let mut value = scheme.to_vec();
        value.extend(spaces);
        value.extend(token);
        value
    })
}

proptest! {
    #![proptest_config(config(CASES))]

    /// One header, of any value that is a valid header value: the parser and the
    /// reference agree (same token, or same error code).
    #[test]
    fn one_header_agrees_with_the_reference(value in prop_oneof![
        4 => structured(),
        2 => mutated(&SEEDS, DICTIONARY, 4),
        1 => vec(any::<u8>(), 0..40),
    ]) {
        check(&[value])?;
    }

    /// None, one or several headers.
    #[test]
    fn any_number_of_headers_agrees_with_the_reference(values in vec(structured(), 0..4)) {
        check(&values)?;
    }
}
