//! The request-smuggling guard (`crate::framing::Framing::feed`) over a client's
//! HTTP/1.1 byte stream. The properties hold for the guard as it is and for its
//! rewrite: only `Framing::default()` and `feed` are used, no upgrades nor CONNECT
//! are generated where a verdict is asserted.

use std::sync::LazyLock;

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;

use super::{config, corpus, field_value, mutate, mutated, recase, splits, token, Splits, CASES};
use crate::framing::Framing;

static SEEDS: LazyLock<Vec<Vec<u8>>> = LazyLock::new(|| corpus("framing"));

const DICTIONARY: &[&[u8]] = &[
    b"\r\n",
    b"\r\n\r\n",
    b"\n",
    b"POST / HTTP/1.1\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"Content-Length: ",
    b"Content-Length: 5\r\n",
    b"content-length: 0\r\n",
    b"Transfer-Encoding: chunked\r\n",
    b"transfer-encoding: gzip, chunked\r\n",
    b"Transfer-Encoding : chunked\r\n",
    b"Upgrade: websocket\r\n",
    b"CONNECT a:443 HTTP/1.1\r\n",
    b"0\r\n\r\n",
    b"5;ext=1\r\nhello\r\n",
    b"ffffffffffffffff\r\n",
    b": ",
    b", chunked",
    b"\t",
];

/// The guard's verdict on `reads`: whether it refused the stream.
fn refused(reads: &[&[u8]]) -> bool {
    let mut guard = Framing::default();
    reads.iter().any(|read| guard.feed(read).is_err())
}

// ---------------------------------------------------------------------------------
// A model of well-formed request streams.

#[derive(Debug, Clone)]
enum Body {
    None,
    /// `Content-Length`, written with this many leading zeros.
    Length(Vec<u8>, usize),
    Chunked {
        chunks: Vec<(Vec<u8>, String)>,
        last_ext: String,
        trailers: Vec<(String, Vec<u8>)>,
        codings: Option<String>,
    },
}

#[derive(Debug, Clone)]
struct Request {
    blank_lines: usize,
    method: String,
    target: String,
    headers: Vec<(String, Vec<u8>)>,
    body: Body,
    /// Letter case of the framing header's name.
    case: u64,
    /// Where among the other headers the framing header goes.
    at: proptest::sample::Index,
    bare_lf: bool,
}

fn method() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => select(&["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE"][..])
            .prop_map(str::to_owned),
        1 => token(10).prop_filter("no CONNECT nor PRI", |m| {
            !m.eq_ignore_ascii_case("connect") && m != "PRI"
        }),
    ]
}

/// A header that is not about framing or upgrades.
fn plain_header() -> impl Strategy<Value = (String, Vec<u8>)> {
    let name = prop_oneof![
        1 => select(&["Host", "Accept", "Authorization", "Cookie", "TE", "Connection", "Expect"][..])
            .prop_map(str::to_owned),
        2 => token(16),
    ]
    .prop_filter("not a framing or upgrade header", |n| {
        let n = n.to_ascii_lowercase();
        n != "content-length" && n != "transfer-encoding" && n != "upgrade"
    });
    let value = field_value(30).prop_map(|v| {
        if v.windows(7).any(|w| w.eq_ignore_ascii_case(b"upgrade")) {
            b"keep-alive".to_vec()
        } else {
            v
        }
    });
    (name, value)
}

/// Pieces of bodies that look like framing.
const LOOKALIKES: &[&[u8]] = &[
    b"POST /x HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"0\r\n\r\n",
    b"\r\n",
    b"Transfer-Encoding: chunked\r\n",
    b"5\r\nhello\r\n",
    b"x",
];

/// Body bytes, often holding what looks like a request head or a chunk line.
fn body_bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        2 => vec(any::<u8>(), 1..=max),
        2 => vec(select(LOOKALIKES), 1..6)
        .prop_map(|parts| parts.concat()),
    ]
}

fn ext() -> impl Strategy<Value = String> {
    vec(
        (
            select(&["", " ", "\t"][..]),
            token(6),
            proptest::option::of(prop_oneof![token(6), "\"[a-z ;=]{0,6}\""]),
        )
            .prop_map(|(bws, n, v)| match v {
                Some(v) => format!("{bws};{n}={v}"),
                None => format!("{bws};{n}"),
            }),
        0..3,
    )
    .prop_map(|e| e.concat())
}

fn body() -> impl Strategy<Value = Body> {
    prop_oneof![
        2 => Just(Body::None),
        3 => (body_bytes(200), prop_oneof![4 => Just(0usize), 1 => 1..4usize])
            .prop_map(|(data, zeros)| Body::Length(data, zeros)),
        3 => (
            vec((body_bytes(60), ext()), 0..5),
            ext(),
            vec(plain_header(), 0..3),
            proptest::option::of(select(&["gzip", "deflate, br"][..])),
        )
            .prop_map(|(chunks, last_ext, trailers, codings)| Body::Chunked {
                chunks,
                last_ext,
                trailers,
                codings: codings.map(str::to_owned),
            }),
    ]
}

fn request() -> impl Strategy<Value = Request> {
    (
        prop_oneof![6 => Just(0usize), 1 => 1..3usize],
        method(),
        "/[a-zA-Z0-9/._~%-]{0,20}",
        vec(plain_header(), 0..8),
        body(),
        any::<u64>(),
        any::<proptest::sample::Index>(),
        prop_oneof![9 => Just(false), 1 => Just(true)],
    )
        .prop_map(
            |(blank_lines, method, target, headers, body, case, at, bare_lf)| Request {
                blank_lines,
                method,
                target,
                headers,
                body,
                case,
                at,
                bare_lf,
            },
        )
}

impl Request {
    /// The request's bytes; `extra` header lines go among the others (for the
    /// ambiguous request).
    fn serialise(&self, extra: &[Vec<u8>], out: &mut Vec<u8>) {
        let eol: &[u8] = if self.bare_lf { b"\n" } else { b"\r\n" };
        for _ in 0..self.blank_lines {
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(format!("{} {} HTTP/1.1", self.method, self.target).as_bytes());
        out.extend_from_slice(eol);
        let mut lines: Vec<Vec<u8>> = self
            .headers
            .iter()
            .map(|(name, value)| {
                let mut line = format!("{name}: ").into_bytes();
                line.extend_from_slice(value);
                line
            })
            .collect();
        let framing = match &self.body {
            Body::None => None,
            Body::Length(data, zeros) => Some(format!(
                "{}: {}{}",
                recase("content-length", self.case),
                "0".repeat(*zeros),
                data.len()
            )),
            Body::Chunked { codings, .. } => Some(format!(
                "{}: {}chunked",
                recase("transfer-encoding", self.case),
                codings
                    .as_ref()
                    .map(|c| format!("{c}, "))
                    .unwrap_or_default()
            )),
        };
        let mut extra = extra.to_vec();
        extra.extend(framing.map(String::into_bytes));
        for line in extra {
            let at = self.at.index(lines.len() + 1);
            lines.insert(at, line);
        }
        for line in lines {
            out.extend_from_slice(&line);
            out.extend_from_slice(eol);
        }
        out.extend_from_slice(eol);
        match &self.body {
            Body::None => {}
            Body::Length(data, _) => out.extend_from_slice(data),
            Body::Chunked {
                chunks,
                last_ext,
                trailers,
                ..
            } => {
                for (data, ext) in chunks {
                    out.extend_from_slice(format!("{:x}{ext}\r\n", data.len()).as_bytes());
                    out.extend_from_slice(data);
                    out.extend_from_slice(b"\r\n");
                }
                out.extend_from_slice(format!("0{last_ext}\r\n").as_bytes());
                for (name, value) in trailers {
                    out.extend_from_slice(format!("{name}: ").as_bytes());
                    out.extend_from_slice(value);
                    out.extend_from_slice(b"\r\n");
                }
                out.extend_from_slice(b"\r\n");
            }
        }
    }
}

fn stream() -> impl Strategy<Value = Vec<u8>> {
    vec(request(), 1..5).prop_map(|requests| {
        let mut out = Vec::new();
        for r in &requests {
            r.serialise(&[], &mut out);
        }
        out
    })
}

/// A stream whose last request (after well-formed ones) carries both a
/// `Content-Length` and a `Transfer-Encoding`, followed by anything.
fn ambiguous_stream() -> impl Strategy<Value = Vec<u8>> {
    let length = prop_oneof![
        4 => (0..100_000u64).prop_map(|n| n.to_string()),
        1 => select(&["0", "00", "5, 5", "", "abc", "18446744073709551616", "-1"][..]).prop_map(str::to_owned),
    ];
    let coding = select(
        &[
            "chunked",
            "gzip, chunked",
            "identity",
            "chunked, identity",
            "gzip",
            "",
            "CHUNKED",
            "chunked ",
            "x",
        ][..],
    );
    (
        vec(request(), 0..4),
        request(),
        length,
        coding,
        any::<(u64, u64)>(),
        any::<bool>(),
        vec(any::<u8>(), 0..40),
    )
        .prop_map(
            |(before, mut bad, length, coding, (c1, c2), te_first, tail)| {
                let mut out = Vec::new();
                for r in &before {
                    r.serialise(&[], &mut out);
                }
                bad.body = Body::None;
                let cl = format!("{}: {length}", recase("content-length", c1)).into_bytes();
                let te = format!("{}: {coding}", recase("transfer-encoding", c2)).into_bytes();
                let extra = if te_first { [te, cl] } else { [cl, te] };
                bad.serialise(&extra, &mut out);
                out.extend_from_slice(&tail);
                out
            },
        )
}

proptest! {
    #![proptest_config(config(CASES))]

    /// Streams of well-formed requests (any method, headers, Content-Length or
    /// chunked bodies with extensions and trailers, bodies that look like heads)
    /// pass, however they are cut into reads.
    #[test]
    fn well_formed_streams_pass(stream in stream(), cut in splits()) {
        prop_assert!(!refused(&[&stream]), "{:?}", String::from_utf8_lossy(&stream));
        prop_assert!(!refused(&cut.cut(&stream)), "{:?}", String::from_utf8_lossy(&stream));
    }

    /// A stream whose k-th head (reached by following the bodies before it) has both
    /// framing headers is refused, whole or cut.
    #[test]
    fn an_ambiguous_head_is_refused(stream in ambiguous_stream(), cut in splits()) {
        prop_assert!(refused(&[&stream]), "{:?}", String::from_utf8_lossy(&stream));
        prop_assert!(refused(&cut.cut(&stream)), "{:?}", String::from_utf8_lossy(&stream));
    }

    /// Any bytes: no panic, and the same verdict whole, cut anywhere, or byte by byte.
    #[test]
    fn any_stream_gets_one_verdict(
        input in prop_oneof![
            3 => mutated(&SEEDS, DICTIONARY, 6),
            2 => mutate(stream(), DICTIONARY, 4),
            2 => mutate(ambiguous_stream(), DICTIONARY, 4),
            1 => vec(any::<u8>(), 0..300),
        ],
        cut in splits(),
    ) {
        let whole = refused(&[&input]);
        prop_assert_eq!(whole, refused(&cut.cut(&input)), "{:?}", String::from_utf8_lossy(&input));
        prop_assert_eq!(whole, refused(&Splits::EveryByte.cut(&input)));
    }
}

#[cfg(test)]
mod regressions {
    use super::*;

    /// The corpus's smuggling probes (files named `refuse-*`) are refused and its
    /// ordinary streams (`pass-*`) pass, whole and byte by byte.
    #[test]
    fn corpus_verdicts() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/framing");
        let mut seen = 0;
        for entry in std::fs::read_dir(dir).expect("the corpus") {
            let path = entry.expect("an entry").path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_owned();
            let input = std::fs::read(&path).expect("a seed");
            let expected = if name.starts_with("refuse-") {
                true
            } else if name.starts_with("pass-") {
                false
            } else {
                continue;
            };
            seen += 1;
            assert_eq!(refused(&[&input]), expected, "{name}");
            assert_eq!(refused(&Splits::EveryByte.cut(&input)), expected, "{name}");
        }
        assert!(seen >= 10, "{seen}");
    }
}
