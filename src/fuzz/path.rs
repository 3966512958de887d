//! Request-path normalisation (`crate::routes::normalize_path`): what decides which
//! route a request takes and what path the upstream receives.

use std::sync::LazyLock;

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;

use super::{config, corpus, mutated, CASES};
use crate::routes::normalize_path;

static SEEDS: LazyLock<Vec<Vec<u8>>> = LazyLock::new(|| corpus("path"));

const DICTIONARY: &[&[u8]] = &[
    b"/",
    b"//",
    b".",
    b"..",
    b"/../",
    b"/./",
    b"%2e",
    b"%2E",
    b"%2f",
    b"%2F",
    b"%5c",
    b"%3b",
    b"%00",
    b"%25",
    b"%41",
    b"%7e",
    b"%",
    b"%g",
    b";",
    b"\\",
    b"\xc3\xa9",
    b"%C3%A9",
];

/// Path pieces that matter to normalisation.
const PIECES: &[&str] = &[
    "/", "/", "/", "//", ".", "..", "...", "%2e", "%2E", "%2e%2e", ".%2e", "%2f", "%2F", "%5c",
    "%5C", "%3b", "%3B", "%00", "%25", "%252e", "%41", "%61", "%7e", "%7E", "%2d", "%5f", "%20",
    "%C3%A9", "%ff", "%", "%4", "%zz", ";", "\\", "a", "b", "api", "v1", "~", "-", "_", "é", "?",
    "#", " ", "\0", "\u{7f}", "+", "@", ":", "=", "&",
];

/// Paths from pieces, usually starting with `/`.
fn pieces_path() -> impl Strategy<Value = String> {
    (any::<bool>(), vec(select(PIECES), 0..16)).prop_map(|(slash, pieces)| {
        let mut path = if slash || pieces.is_empty() {
            String::from("/")
        } else {
            String::new()
        };
        path.push_str(&pieces.concat());
        path
    })
}

fn any_path() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => pieces_path(),
        2 => mutated(&SEEDS, DICTIONARY, 5).prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
        1 => "/.{0,24}",
        1 => ".{0,24}",
    ]
}

/// Whether `path` is what a request can carry: hyper hands the gateway `uri.path()`,
/// which `http` only makes of visible ASCII (and UTF-8) without `?` and `#`.
fn reachable(path: &str) -> bool {
    http::uri::PathAndQuery::try_from(path).is_ok_and(|pq| pq.path() == path)
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~".contains(&b)
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// The normalisation as the README states it, written plainly: absolute; no `\` or
/// `;`, raw or encoded; every `%` starts a valid `%XX`, and none encodes NUL; encoded
/// unreserved characters are decoded and other encodings kept (upper-case hex, so
/// `%2F` stays inside its segment); `//` collapses; no `.` or `..` segment remains.
fn reference(raw: &str) -> Option<String> {
    let bytes = raw.as_bytes();
    if bytes.first() != Some(&b'/')
        || raw.contains(['\\', ';'])
        || raw.bytes().any(|b| b < 0x20 || b == 0x7f)
    {
        return None;
    }
    let mut out: Vec<u8> = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let h = hex(*bytes.get(i + 1)?)?;
            let l = hex(*bytes.get(i + 2)?)?;
            match h * 16 + l {
                0 | b';' => return None,
                d if is_unreserved(d) => out.push(d),
                d => out.extend_from_slice(format!("%{d:02X}").as_bytes()),
            }
            i += 3;
        } else {
            if !(bytes[i] == b'/' && out.last() == Some(&b'/')) {
                out.push(bytes[i]);
            }
            i += 1;
        }
    }
    // A dot segment, with `%2F` and `%5C` counted as separators too (an upstream may
    // decode them before it resolves dot segments).
    let separated = String::from_utf8_lossy(&out)
        .replace("%2F", "/")
        .replace("%5C", "/");
    if has_dot_segment(separated.as_bytes()) {
        return None;
    }
    Some(String::from_utf8(out).expect("only ASCII was changed"))
}

/// Decodes every `%XX` once, and reads a backslash as a slash, as a lenient upstream
/// would.
fn decode_once(path: &str) -> Vec<u8> {
    let bytes = path.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let mut b = bytes[i];
        i += 1;
        if b == b'%' {
            if let (Some(h), Some(l)) = (
                bytes.get(i).and_then(|&b| hex(b)),
                bytes.get(i + 1).and_then(|&b| hex(b)),
            ) {
                b = h * 16 + l;
                i += 2;
            }
        }
        out.push(if b == b'\\' { b'/' } else { b });
    }
    out
}

fn has_dot_segment(path: &[u8]) -> bool {
    path.split(|&b| b == b'/').any(|s| s == b"." || s == b"..")
}

/// What must hold of any accepted output: it is normal (normalising it again gives it
/// back), and carries nothing an upstream could read as another path.
fn check_output(out: &str) -> Result<(), TestCaseError> {
    let again = normalize_path(out);
    prop_assert!(again.is_ok(), "normal output refused: {:?}", out);
    let again = again.expect("checked");
    prop_assert_eq!(again.as_ref(), out, "not idempotent");
    prop_assert!(out.starts_with('/'));
    prop_assert!(!has_dot_segment(out.as_bytes()), "{:?}", out);
    for bad in ["\\", ";", "\0", "//"] {
        prop_assert!(!out.contains(bad), "{:?} holds {:?}", out, bad);
    }
    // Every %XX left is a valid encoding of something that must stay encoded.
    let bytes = out.as_bytes();
    for (i, _) in out.match_indices('%') {
        let (h, l) = (bytes.get(i + 1).copied(), bytes.get(i + 2).copied());
        let (Some(h), Some(l)) = (h, l) else {
            prop_assert!(false, "a bare % in {:?}", out);
            unreachable!()
        };
        prop_assert!(h.is_ascii_hexdigit() && l.is_ascii_hexdigit(), "{:?}", out);
        prop_assert!(
            !h.is_ascii_lowercase() && !l.is_ascii_lowercase(),
            "lower-case hex: {:?}",
            out
        );
        let d = hex(h).expect("hex") * 16 + hex(l).expect("hex");
        prop_assert!(
            !is_unreserved(d) && d != 0,
            "{:?} keeps %{}{}",
            out,
            h as char,
            l as char
        );
    }
    // Decoding once more never makes a dot segment, not even through an encoded slash
    // or backslash.
    prop_assert!(!has_dot_segment(&decode_once(out)), "{:?}", out);
    Ok(())
}

proptest! {
    #![proptest_config(config(CASES))]

    /// Any string: no panic; an accepted output is normal, idempotent and clean.
    /// Strings a request can carry: exactly the reference's verdict and output.
    #[test]
    fn paths_normalise_as_documented(raw in any_path()) {
        let ours = normalize_path(&raw);
        if !reachable(&raw) {
            // Not a request path (control bytes, `?`, `#`, no leading `/`): only
            // idempotence is asked of these.
            if let Ok(out) = &ours {
                let out = out.to_string();
                let again = normalize_path(&out).ok();
                prop_assert_eq!(again.as_deref(), Some(out.as_str()));
            }
            return Ok(());
        }
        let expected = reference(&raw);
        prop_assert_eq!(ours.is_ok(), expected.is_some(), "{:?}", raw);
        if let Ok(out) = &ours {
            check_output(out)?;
            prop_assert_eq!(Some(out.as_ref()), expected.as_deref(), "{:?}", raw);
        }
    }
}

#[cfg(test)]
mod regressions {
    use super::*;

    /// `%2F` stays encoded inside its segment, so `..` between two encoded slashes is
    /// no segment of the path as the gateway routes it; but an upstream that decodes
    /// `%2F` (or `%5C`) before resolving dot segments reads `/a%2F..%2Fb` as `/b`. Such
    /// paths are refused, whatever a route does with encoded slashes.
    #[test]
    fn encoded_slash_around_dot_dot() {
        for raw in [
            "/a%2F..%2Fb",
            "/a/..%2fb",
            "/files/%2e%2e%2Fetc",
            "/a%5C..%5Cb",
            "/a/..%5cb",
        ] {
            let refused = normalize_path(raw).expect_err(raw);
            assert_eq!(refused.code(), "invalid_request", "{raw}");
        }
        // Encoded slashes elsewhere are kept, upper-case, for the route to decide on.
        assert_eq!(normalize_path("/ids/a%2fb").unwrap(), "/ids/a%2Fb");
        assert_eq!(normalize_path("/ids/a%5cb").unwrap(), "/ids/a%5Cb");
    }

    /// Found by this campaign: when a path needed rewriting (a `%XX` or a `//`), every
    /// byte not rewritten was pushed as a `char` of its own, so UTF-8 text became
    /// Latin-1 mojibake (`/é%41` came out as `/Ã©A`), and again at each pass. `http`
    /// does put UTF-8 in `uri.path()`, so the route was matched against, and the
    /// upstream received, a path the client never sent.
    #[test]
    fn non_ascii_path_with_an_encoding_is_kept() {
        assert!(reachable("/é%41"));
        assert_eq!(normalize_path("/é%41").unwrap(), "/éA");
        assert_eq!(normalize_path("/é//x").unwrap(), "/é/x");
        let once = normalize_path("/é%20").unwrap().into_owned();
        assert_eq!(once, "/é%20");
        assert_eq!(normalize_path(&once).unwrap(), once);
    }

    /// A URI never carries control bytes, but the function refuses them itself rather
    /// than rely on its caller's parser.
    #[test]
    fn raw_control_bytes_are_refused() {
        assert!(!reachable("/a\0b"));
        for raw in ["/a\0b", "/a\tb", "/a\rb", "/a\nb", "/a\x7fb", "/a%00b"] {
            assert!(normalize_path(raw).is_err(), "{raw:?}");
        }
    }
}
