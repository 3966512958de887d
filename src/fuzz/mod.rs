//! Property tests ("fuzzing" on stable Rust, with proptest) of every parser that meets
//! untrusted bytes: the upstream response head and chunked decoder ([`upstream`]), the
//! request-smuggling guard ([`framing`]), the bearer header ([`bearer`]), form bodies
//! ([`form`]) and request paths ([`path`]). `docs/FUZZING.md` says what each property
//! checks and how to run the long campaign.
//!
//! Inputs come from two places: strategies that generate well-formed (or deliberately
//! ambiguous) messages from scratch, and mutations (bit flips, byte changes, insertions
//! of interesting tokens, deletions, duplications, truncation, splices) of the seed
//! inputs checked in under `fuzz/corpus/<parser>/`.
//!
//! Every property runs [`CASES`] cases by default so that the whole module stays
//! within a few seconds of a debug `cargo test` on two cores; `PROPTEST_CASES=N` raises
//! (or lowers) every property to N cases, as the `proptest!` macro reads it after the
//! configuration given here.

use std::path::Path;

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;

mod bearer;
mod form;
mod framing;
mod path;
mod upstream;

/// The default number of cases of one property in `cargo test`.
pub(crate) const CASES: u32 = 512;

/// The configuration of a property with `cases` cases by default; `PROPTEST_CASES`
/// overrides it (the `proptest!` macro applies the environment after this).
pub(crate) fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        // A failing case is shrunk for at most this long, so a long run that finds
        // something reports it within minutes rather than hours.
        max_shrink_time: 120_000,
        // Rejected inputs count over the whole run: a long one must not abort on them.
        max_local_rejects: u32::MAX,
        ..ProptestConfig::with_cases(cases)
    }
}

/// The seed inputs of one parser, `fuzz/corpus/<parser>/*`, in file-name order.
pub(crate) fn corpus(parser: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(parser);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("a corpus entry").path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    let seeds: Vec<Vec<u8>> = files
        .iter()
        .map(|path| std::fs::read(path).expect("a corpus file"))
        .collect();
    assert!(seeds.len() >= 10, "{}: too few seeds", dir.display());
    seeds
}

/// One edit of a mutated input; positions are fractions of the input's length.
#[derive(Debug, Clone)]
pub(crate) enum Mutation {
    FlipBit(Index, u8),
    SetByte(Index, u8),
    Insert(Index, Vec<u8>),
    Delete(Index, usize),
    Duplicate(Index, usize, Index),
    Truncate(Index),
    /// Replaces the tail from here with the tail of another seed, from its fraction.
    Splice(Index, Index, Index),
}

impl Mutation {
    /// Applies the edit to `input`; `seeds` are the splice donors.
    pub(crate) fn apply(&self, input: &mut Vec<u8>, seeds: &[Vec<u8>]) {
        let len = input.len();
        match self {
            Mutation::FlipBit(at, bit) if len > 0 => input[at.index(len)] ^= 1 << (bit % 8),
            Mutation::SetByte(at, byte) if len > 0 => input[at.index(len)] = *byte,
            Mutation::Insert(at, bytes) => {
                let at = at.index(len + 1);
                input.splice(at..at, bytes.iter().copied());
            }
            Mutation::Delete(at, n) if len > 0 => {
                let at = at.index(len);
                input.drain(at..(at + n).min(len));
            }
            Mutation::Duplicate(from, n, to) if len > 0 => {
                let from = from.index(len);
                let copy = input[from..(from + n).min(len)].to_vec();
                let to = to.index(len + 1);
                input.splice(to..to, copy);
            }
            Mutation::Truncate(at) => input.truncate(at.index(len + 1)),
            Mutation::Splice(at, donor, from) if !seeds.is_empty() => {
                let donor = &seeds[donor.index(seeds.len())];
                input.truncate(at.index(len + 1));
                input.extend_from_slice(&donor[from.index(donor.len() + 1)..]);
            }
            _ => {}
        }
    }
}

/// Bytes that matter to HTTP and URL parsers, for single-byte edits.
const SPECIAL: &[u8] = b"\r\n\t :;,=\"%/\\.+&?#0123456789abcdefABCDEF-_~\x00\x0b\x0c\x7f\x80\xff";

/// One edit, inserting `dictionary` tokens among other things.
pub(crate) fn mutation(dictionary: &'static [&'static [u8]]) -> impl Strategy<Value = Mutation> {
    let byte = prop_oneof![3 => proptest::sample::select(SPECIAL), 1 => any::<u8>()];
    let insert = prop_oneof![
        2 => proptest::sample::select(dictionary).prop_map(<[u8]>::to_vec),
        1 => vec(byte.clone(), 1..4),
    ];
    prop_oneof![
        2 => (any::<Index>(), 0..8u8).prop_map(|(at, bit)| Mutation::FlipBit(at, bit)),
        3 => (any::<Index>(), byte).prop_map(|(at, b)| Mutation::SetByte(at, b)),
        4 => (any::<Index>(), insert).prop_map(|(at, bytes)| Mutation::Insert(at, bytes)),
        2 => (any::<Index>(), 1..16usize).prop_map(|(at, n)| Mutation::Delete(at, n)),
        1 => (any::<Index>(), 1..32usize, any::<Index>())
            .prop_map(|(from, n, to)| Mutation::Duplicate(from, n, to)),
        1 => any::<Index>().prop_map(Mutation::Truncate),
        1 => (any::<Index>(), any::<Index>(), any::<Index>())
            .prop_map(|(at, donor, from)| Mutation::Splice(at, donor, from)),
    ]
}

/// A seed of `seeds` with up to `max` mutations applied.
pub(crate) fn mutated(
    seeds: &'static [Vec<u8>],
    dictionary: &'static [&'static [u8]],
    max: usize,
) -> impl Strategy<Value = Vec<u8>> {
    (any::<Index>(), vec(mutation(dictionary), 0..=max)).prop_map(move |(seed, edits)| {
        let mut input = seeds[seed.index(seeds.len())].clone();
        for edit in &edits {
            edit.apply(&mut input, seeds);
        }
        input
    })
}

/// `input` with up to `max` mutations applied (for generated inputs).
pub(crate) fn mutate(
    input: impl Strategy<Value = Vec<u8>>,
    dictionary: &'static [&'static [u8]],
    max: usize,
) -> impl Strategy<Value = Vec<u8>> {
    (input, vec(mutation(dictionary), 1..=max)).prop_map(|(mut input, edits)| {
        for edit in &edits {
            edit.apply(&mut input, &[]);
        }
        input
    })
}

/// Where to cut an input into reads: positions as fractions, or every byte.
#[derive(Debug, Clone)]
pub(crate) enum Splits {
    At(Vec<Index>),
    EveryByte,
}

pub(crate) fn splits() -> impl Strategy<Value = Splits> {
    prop_oneof![
        8 => vec(any::<Index>(), 0..10).prop_map(Splits::At),
        1 => Just(Splits::EveryByte),
    ]
}

impl Splits {
    /// `input` cut into consecutive, possibly empty pieces.
    pub(crate) fn cut<'a>(&self, input: &'a [u8]) -> Vec<&'a [u8]> {
        match self {
            Splits::EveryByte => input.chunks(1).collect(),
            Splits::At(at) => {
                let mut cuts: Vec<usize> = at.iter().map(|i| i.index(input.len() + 1)).collect();
                cuts.sort_unstable();
                let mut pieces = Vec::with_capacity(cuts.len() + 1);
                let mut start = 0;
                for cut in cuts {
                    pieces.push(&input[start..cut]);
                    start = cut;
                }
                pieces.push(&input[start..]);
                pieces
            }
        }
    }
}

/// An HTTP token (`tchar`s), 1 to `max` long.
pub(crate) fn token(max: usize) -> impl Strategy<Value = String> {
    vec(
        proptest::sample::select(
            &b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"[..],
        ),
        1..=max,
    )
    .prop_map(|b| String::from_utf8(b).expect("ASCII"))
}

/// A header field value as a sender should write it: visible ASCII, obs-text, and
/// inner spaces and tabs; no whitespace at either end. Possibly empty.
pub(crate) fn field_value(max: usize) -> impl Strategy<Value = Vec<u8>> {
    let byte = prop_oneof![
        8 => 0x21u8..0x7f,
        1 => Just(b' '),
        1 => Just(b'\t'),
        1 => 0x80u8..=0xff,
    ];
    vec(byte, 0..=max).prop_map(|mut v| {
        while v.last().is_some_and(|b| *b == b' ' || *b == b'\t') {
            v.pop();
        }
        while v.first().is_some_and(|b| *b == b' ' || *b == b'\t') {
            v.remove(0);
        }
        v
    })
}

/// `text` in random letter case, driven by `mask`.
pub(crate) fn recase(text: &str, mask: u64) -> String {
    text.chars()
        .enumerate()
        .map(|(i, c)| {
            if mask >> (i % 64) & 1 == 1 {
                c.to_ascii_uppercase()
            } else {
                c.to_ascii_lowercase()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `PROPTEST_CASES` wins over the configured default, as the long campaign relies
    /// on: the `proptest!` macro runs the configuration through
    /// `contextualize_config`, which reads the environment after `with_cases`.
    #[test]
    fn proptest_cases_env_overrides_the_default() {
        let runs = std::cell::Cell::new(0u64);
        proptest!(config(7), |(_byte in any::<u8>())| {
            runs.set(runs.get() + 1);
        });
        let expected = std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(7);
        assert_eq!(runs.get(), expected);
    }

    #[test]
    fn every_corpus_is_there() {
        for parser in ["upstream", "framing", "bearer", "form", "path"] {
            corpus(parser);
        }
    }
}
