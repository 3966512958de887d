//! How much memory a live token costs, and whether lookups slow down as the table
//! grows. Fills the token table with 1,000,000 live access tokens (no refresh tokens)
//! of USERS distinct users and prints the RSS growth per token and the digest + lookup
//! time at 1 and at 1,000,000 tokens.
//!
//! `cargo run --release --example token_memory [COUNT] [USERS]` (defaults: 1,000,000
//! tokens of 10,000 users, i.e. 100 sign-ins each, the default per-user cap).

use std::hint::black_box;
use std::time::Instant;

use covata_gateway::token::store::IssueRequest;
use covata_gateway::token::TokenStore;

/// Resident set size in bytes, from /proc (Linux).
fn rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

fn lookup_ns(store: &TokenStore, tokens: &[String], rounds: usize) -> f64 {
    let started = Instant::now();
    let mut found = 0usize;
    for i in 0..rounds {
        found += usize::from(
            store
                .authenticate(black_box(&tokens[i % tokens.len()]))
                .is_some(),
        );
    }
    assert_eq!(found, rounds, "every token is live");
    started.elapsed().as_nanos() as f64 / rounds as f64
}

fn main() {
    let count: usize = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(1_000_000);
    let users: usize = std::env::args()
        .nth(2)
        .and_then(|n| n.parse().ok())
        .unwrap_or(10_000);
    let roles = vec!["ROLE_COLLABORATOR".to_owned(), "ROLE_ORIGINATOR".to_owned()];
    let store = TokenStore::default();
    let issue = |store: &TokenStore, i: usize| {
        store
            .issue(IssueRequest {
                family: None,
                username: Some(format!("user{}@example.com", i % users).into()),
                client_id: "exampleClientApplication".into(),
                roles: &roles,
                scope: "read write".into(),
                grant_scope: "read write".into(),
                access_ttl: 3600,
                refresh_ttl: None,
            })
            .expect("issue")
            .access_token
    };

    let first = vec![issue(&store, 0)];
    let at_one = lookup_ns(&store, &first, 2_000_000);

    let before = rss();
    let started = Instant::now();
    // Keep a sample of tokens for lookups; holding all of them would count their text.
    let mut sample = Vec::with_capacity(10_000);
    for i in 1..count {
        let token = issue(&store, i);
        if i % (count / 10_000).max(1) == 0 {
            sample.push(token);
        }
    }
    let fill = started.elapsed();
    let grown = rss().saturating_sub(before);
    let at_full = lookup_ns(&store, &sample, 2_000_000);

    println!("tokens in table:        {} ({users} users)", store.len());
    println!(
        "fill time:              {:.2} s ({:.0} tokens/s, one thread)",
        fill.as_secs_f64(),
        count as f64 / fill.as_secs_f64()
    );
    println!(
        "RSS growth:             {:.1} MiB",
        grown as f64 / 1048576.0
    );
    println!(
        "bytes per live token:   {:.0}",
        grown as f64 / (count - 1) as f64
    );
    println!("lookup at 1 token:      {at_one:.0} ns (SHA-256 + DashMap get)");
    println!("lookup at {count} tokens: {at_full:.0} ns");
}
