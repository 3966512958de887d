//! Micro-benchmarks of what every proxied request pays: route matching (with 10 and
//! 1,000 routes), path normalisation, bearer parsing, token digest + lookup, and the
//! upstream header rewrite. Run with `cargo bench --bench hot_paths`.

use std::hint::black_box;
use std::path::Path;

use covata_gateway::config::Config;
use covata_gateway::proxy::{HeaderRewrite, Origin, Peer};
use covata_gateway::routes::{normalize_path, RouteTable};
use covata_gateway::token::store::IssueRequest;
use covata_gateway::token::TokenStore;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use http::{HeaderMap, HeaderValue, Method};

/// `n` routes shaped like a real API: `/svcK/v1/things/*/...`, the catch-all last.
fn routes_config(n: usize) -> String {
    let mut text = String::new();
    for k in 0..n - 1 {
        let path = match k % 4 {
            0 => format!("/svc{k}/v1/objects/*/contents/**"),
            1 => format!("/svc{k}/v1/objects/*/view"),
            2 => format!("/svc{k}/v1/versions/**"),
            _ => format!("/svc{k}/v1/config"),
        };
        text.push_str(&format!(
            "[[routes]]\npath = \"{path}\"\nupstream = \"http://127.0.0.1:8081\"\n"
        ));
    }
    text.push_str("[[routes]]\npath = \"/**\"\nupstream = \"http://127.0.0.1:8081\"\n");
    text
}

fn route_matching(c: &mut Criterion) {
    let tls = covata_gateway::proxy::upstream_tls(None, false).unwrap();
    let mut group = c.benchmark_group("route_find");
    for n in [10usize, 1000] {
        let config = Config::parse(&routes_config(n), Path::new("bench.toml")).unwrap();
        let table = RouteTable::new(&config.routes, &config.upstream, &tls);
        // A path that matches a route near the end of the file, and one that only the
        // catch-all takes: the worst cases for a linear scan.
        let late = format!("/svc{}/v1/objects/42/contents/a/b", (n - 2) / 4 * 4);
        for (name, path) in [
            ("late_match", late.as_str()),
            ("catch_all", "/unrouted/path/x"),
        ] {
            group.bench_with_input(BenchmarkId::new(name, n), path, |b, path| {
                b.iter(|| {
                    table
                        .find(black_box(&Method::GET), None, black_box(path))
                        .map(|r| r.index)
                })
            });
        }
    }
    group.finish();
}

fn request_path(c: &mut Criterion) {
    c.bench_function("normalize_path/clean", |b| {
        b.iter(|| normalize_path(black_box("/api/v1/objects/42/contents/chunk/7")).is_ok())
    });
    let mut headers = HeaderMap::new();
    headers.insert(
        "authorization",
        HeaderValue::from_static("Bearer bPiv8g3FK01YVGu8Bg4jFTSJZ4l4xN8uY3lHH3D0hcs"),
    );
    c.bench_function("bearer_token", |b| {
        b.iter(|| covata_gateway::auth::bearer_token(black_box(&headers)).map(str::len))
    });
}

/// Issues an hour-long access token for one user with one role.
fn issue(store: &TokenStore) -> String {
    store
        .issue(IssueRequest {
            family: None,
            username: Some("alex@example.com".into()),
            client_id: "app".into(),
            roles: &["ROLE_COLLABORATOR".to_owned()],
            scope: "read write".into(),
            grant_scope: "read write".into(),
            access_ttl: 3600,
            refresh_ttl: None,
        })
        .unwrap()
        .access_token
}

fn token_lookup(c: &mut Criterion) {
    let store = TokenStore::default();
    let token = issue(&store);
    for _ in 0..100_000 {
        issue(&store);
    }
    c.bench_function("token_digest_and_lookup/100k", |b| {
        b.iter(|| store.authenticate(black_box(&token)).is_some())
    });
    c.bench_function("token_digest_and_lookup/unknown", |b| {
        b.iter(|| {
            store
                .authenticate(black_box("bPiv8g3FK01YVGu8Bg4jFTSJZ4l4xN8uY3lHH3D0hcs"))
                .is_some()
        })
    });
}

/// The upstream header rewrite for a typical API call: the client's headers in, the
/// identity and `X-Forwarded-*` set, hop-by-hop and spoofed headers gone.
fn header_rewrite(c: &mut Criterion) {
    let tls = covata_gateway::proxy::upstream_tls(None, false).unwrap();
    let config = Config::parse(&routes_config(2), Path::new("bench.toml")).unwrap();
    let table = RouteTable::new(&config.routes, &config.upstream, &tls);
    let route = table
        .find(&Method::GET, None, "/api/v1/objects/42")
        .expect("the catch-all matches");
    let store = TokenStore::default();
    let identity = store.authenticate(&issue(&store)).unwrap();
    let mut headers = HeaderMap::new();
    for (name, value) in [
        ("host", "api.example.com"),
        ("user-agent", "oha/1.16.0"),
        ("accept", "*/*"),
        ("accept-encoding", "gzip, br"),
        (
            "authorization",
            "Bearer bPiv8g3FK01YVGu8Bg4jFTSJZ4l4xN8uY3lHH3D0hcs",
        ),
        ("x-authenticated-user", "spoofed@example.com"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    let peer = Peer::new("203.0.113.7:50000".parse().unwrap());
    let origin = Origin {
        peer: &peer,
        trusted_proxies: &[],
    };
    // Since the gateway speaks HTTP/1.1 to upstreams itself, the rewrite happens as the
    // upstream head is written: this measures making the rewrite and writing the lines.
    let mut out = bytes::BytesMut::with_capacity(4096);
    c.bench_function("header_rewrite", |b| {
        b.iter(|| {
            out.clear();
            let host = headers.get("host").cloned();
            let rewrite = HeaderRewrite::new(&headers, host, Some(&identity), route, &origin);
            rewrite.write(black_box(&headers), &mut out);
            out.len()
        })
    });
}

criterion_group!(
    benches,
    route_matching,
    request_path,
    token_lookup,
    header_rewrite
);
criterion_main!(benches);
