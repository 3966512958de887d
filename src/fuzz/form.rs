//! `application/x-www-form-urlencoded` bodies (`crate::form::Form::parse`), checked
//! against a decoder written from the WHATWG URL standard's form parser, and by round
//! trips of forms encoded by serde_urlencoded and by a deliberately odd encoder.

use std::collections::HashMap;
use std::sync::LazyLock;

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::{select, Index};

use super::{config, corpus, mutated, CASES};
use crate::form::Form;

static SEEDS: LazyLock<Vec<Vec<u8>>> = LazyLock::new(|| corpus("form"));

const DICTIONARY: &[&[u8]] = &[
    b"&",
    b"=",
    b"+",
    b"%",
    b"%20",
    b"%26",
    b"%3D",
    b"%2",
    b"%zz",
    b"%C3%A9",
    b"%FF",
    b"%00",
    b"grant_type=",
    b"&grant_type=password",
    b"\xc3\xa9",
    b"\xff",
];

/// `application/x-www-form-urlencoded` parsing (WHATWG URL §5.1): split on `&`, skip
/// empty pieces, split at the first `=`, `+` is a space, `%XX` decodes (anything else
/// stays as it is), then UTF-8 with replacement characters.
fn reference(body: &[u8]) -> Vec<(String, String)> {
    fn decode(bytes: &[u8]) -> String {
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            let hex = |b: u8| (b as char).to_digit(16);
            match bytes[i] {
                b'+' => out.push(b' '),
                b'%' => {
                    match (
                        bytes.get(i + 1).and_then(|&b| hex(b)),
                        bytes.get(i + 2).and_then(|&b| hex(b)),
                    ) {
                        (Some(h), Some(l)) => {
                            out.push((h * 16 + l) as u8);
                            i += 3;
                            continue;
                        }
                        _ => out.push(b'%'),
                    }
                }
                b => out.push(b),
            }
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    }
    body.split(|&b| b == b'&')
        .filter(|piece| !piece.is_empty())
        .map(|piece| match piece.iter().position(|&b| b == b'=') {
            Some(eq) => (decode(&piece[..eq]), decode(&piece[eq + 1..])),
            None => (decode(piece), String::new()),
        })
        .collect()
}

/// What `Form::parse` must make of `body`: refused iff a name repeats (after
/// decoding); otherwise every parameter readable, an empty value as absent.
fn check(body: &[u8]) -> Result<(), TestCaseError> {
    let pairs = reference(body);
    let mut unique: HashMap<&str, &str> = HashMap::new();
    let repeated = pairs
        .iter()
        .any(|(name, value)| unique.insert(name, value).is_some());
    match Form::parse(body) {
        Ok(form) => {
            prop_assert!(!repeated, "a repeated parameter passed: {:?}", body);
            for (name, value) in &pairs {
                let expected = Some(value.as_str()).filter(|v| !v.is_empty());
                prop_assert_eq!(form.get(name), expected, "{:?}", name);
            }
            prop_assert_eq!(form.get("\u{0}not-a-parameter"), None);
        }
        Err(e) => {
            prop_assert!(repeated, "refused without a repeat: {:?}: {}", body, e);
            prop_assert_eq!(e.code(), "invalid_request");
        }
    }
    Ok(())
}

/// A parameter name or value: any text, weighted to the characters that need
/// encoding.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[a-z_]{0,12}",
        2 => "[ -~]{0,16}",
        1 => ".{0,8}",
        1 => vec(select(&["&", "=", "+", "%", " ", "%20", "é", "\u{1F600}", "\0", "a"][..]), 0..6)
            .prop_map(|p| p.concat()),
    ]
}

/// At least `min` parameters with distinct names.
fn unique_pairs(min: usize) -> impl Strategy<Value = Vec<(String, String)>> {
    vec((text(), text()), min..8).prop_map(|pairs| {
        let mut seen = std::collections::HashSet::new();
        pairs
            .into_iter()
            .filter(|(name, _)| seen.insert(name.clone()))
            .collect()
    })
}

/// Encodes `text` as a form would, with choices a sender may make: which bytes to
/// percent-encode beyond those that must be, upper- or lower-case hex, `+` or `%20`.
fn odd_encode(text: &str, choices: u64) -> String {
    let mut out = String::new();
    for (i, b) in text.bytes().enumerate() {
        let choice = choices.rotate_left(i as u32 * 3) & 7;
        let must = !(b.is_ascii_alphanumeric() || b"*-._".contains(&b));
        if b == b' ' && choice < 4 {
            out.push('+');
        } else if must || choice == 7 {
            if choice & 1 == 0 {
                out.push_str(&format!("%{b:02X}"));
            } else {
                out.push_str(&format!("%{b:02x}"));
            }
        } else {
            out.push(b as char);
        }
    }
    out
}

fn join(pairs: &[(String, String)], choices: u64, separators: &[usize]) -> String {
    let mut body = String::new();
    for (i, (name, value)) in pairs.iter().enumerate() {
        let extra = separators.get(i).copied().unwrap_or(0);
        if i > 0 || extra > 0 {
            body.push_str(&"&".repeat(1 + extra));
        }
        body.push_str(&odd_encode(name, choices.rotate_left(i as u32)));
        body.push('=');
        body.push_str(&odd_encode(value, choices.rotate_right(i as u32)));
    }
    body
}

proptest! {
    #![proptest_config(config(CASES))]

    /// Any bytes: no panic, and the reference's verdict and values.
    #[test]
    fn any_body_agrees_with_the_reference(body in prop_oneof![
        3 => mutated(&SEEDS, DICTIONARY, 6),
        1 => vec(prop_oneof![select(&b"a=&+%2Fe9"[..]), any::<u8>()], 0..60),
    ]) {
        check(&body)?;
    }

    /// Distinct parameters encoded by serde_urlencoded read back as they were.
    #[test]
    fn serde_urlencoded_forms_read_back(pairs in unique_pairs(0)) {
        let body = serde_urlencoded::to_string(&pairs).expect("encodable");
        let form = Form::parse(body.as_bytes());
        prop_assert!(form.is_ok(), "{:?}", body);
        let form = form.expect("checked");
        for (name, value) in &pairs {
            prop_assert_eq!(form.get(name), Some(value.as_str()).filter(|v| !v.is_empty()));
        }
        check(body.as_bytes())?;
    }

    /// The same through an encoder that makes every legitimate odd choice.
    #[test]
    fn oddly_encoded_forms_read_back(
        pairs in unique_pairs(0),
        choices in any::<u64>(),
        separators in vec(0..2usize, 0..8),
    ) {
        let body = join(&pairs, choices, &separators);
        let form = Form::parse(body.as_bytes());
        prop_assert!(form.is_ok(), "{:?}", body);
        let form = form.expect("checked");
        for (name, value) in &pairs {
            prop_assert_eq!(form.get(name), Some(value.as_str()).filter(|v| !v.is_empty()));
        }
    }

    /// A name given twice (encoded the same or differently, with any value) is refused.
    #[test]
    fn a_repeated_name_is_refused(
        pairs in unique_pairs(1),
        which in any::<Index>(),
        value in text(),
        at in any::<Index>(),
        choices in any::<(u64, u64)>(),
    ) {
        let mut pairs = pairs;
        let name = pairs[which.index(pairs.len())].0.clone();
        pairs.insert(at.index(pairs.len() + 1), (name, value));
        // The two copies are encoded independently.
        let (a, b) = pairs.split_at(pairs.len() / 2);
        let body = format!("{}&{}", join(a, choices.0, &[]), join(b, choices.1, &[]));
        let refused = Form::parse(body.as_bytes());
        prop_assert!(refused.is_err(), "{:?}", body);
        prop_assert_eq!(refused.err().map(|e| e.code()), Some("invalid_request"));
    }
}
