//! Attacks from an adversarial review, each against the real gateway over TLS: on the
//! smuggling guard (a bare LF in request trailers), the Host check (userinfo in an
//! HTTP/2 `:authority`), case-insensitive routes (their prefix stripped in any case),
//! and the header policy and path rules, whose every spelling the review tried.

mod common;
use common::raw::{connector, parse_responses, server_name};
use common::*;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::client::TlsStream;

// ---------------------------------------------------------------------------------
// A recording upstream: every request head it receives, with its headers.

#[derive(Clone, Debug)]
struct Arrival {
    path: String,
    headers: Vec<(String, String)>,
}

type Log = Arc<Mutex<Vec<Arrival>>>;

struct Recording {
    addr: SocketAddr,
    log: Log,
    _task: Task,
}

impl Recording {
    async fn start() -> Recording {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let log: Log = Arc::default();
        let shared = log.clone();
        let task = accept_loop(listener, move |stream| {
            let log = shared.clone();
            async move {
                let service = service_fn(move |request: Request<Incoming>| {
                    let log = log.clone();
                    async move {
                        let path = request
                            .uri()
                            .path_and_query()
                            .map_or("/".to_owned(), |p| p.as_str().to_owned());
                        let headers = request
                            .headers()
                            .iter()
                            .map(|(n, v)| {
                                (
                                    n.as_str().to_owned(),
                                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                                )
                            })
                            .collect();
                        log.lock().unwrap().push(Arrival {
                            path: path.clone(),
                            headers,
                        });
                        let _ = request.into_body().collect().await;
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(format!(
                            "{{\"path\":\"{path}\"}}"
                        )))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            }
        });
        Recording {
            addr,
            log,
            _task: task,
        }
    }

    fn paths(&self) -> Vec<String> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .map(|a| a.path.clone())
            .collect()
    }

    fn last(&self) -> Arrival {
        self.log
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("a request reached the upstream")
    }
}

async fn gateway_on(up: &Recording, routes: &str) -> TestGateway {
    TestGateway::start_text(Upstream::start().await, &config_text(up.addr, "", routes)).await
}

// ---------------------------------------------------------------------------------
// Raw TLS

async fn tls_open(gw: &TestGateway) -> TlsStream<TcpStream> {
    let tcp = TcpStream::connect(gw.addr).await.unwrap();
    let tls = connector(&gw.ca_pem, b"http/1.1")
        .connect(server_name(), tcp)
        .await
        .expect("TLS handshake");
    tls
}

/// Writes `wire` in one go and reads until the gateway closes or 3 s pass.
async fn exchange(gw: &TestGateway, wire: &[u8]) -> Vec<u8> {
    let mut tls = tls_open(gw).await;
    if tls.write_all(wire).await.is_ok() {
        let _ = tls.flush().await;
    }
    let mut received = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match tokio::time::timeout_at(deadline, tls.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => received.extend_from_slice(&buf[..n]),
            _ => return received,
        }
    }
}

fn statuses(received: &[u8]) -> Vec<u16> {
    parse_responses(received).iter().map(|r| r.status).collect()
}

fn post_head(gw: &TestGateway, token: &str, path: &str, framing: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: text/plain\r\n{framing}\r\n",
        gw.addr.port()
    )
}

/// The classic probe: both framings. Must never be served.
fn ambiguous(gw: &TestGateway, token: &str) -> String {
    format!(
        "{}0\r\n\r\n",
        post_head(
            gw,
            token,
            "/api/v1/clte",
            "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n"
        )
    )
}

// ---------------------------------------------------------------------------------
// 3. The smuggling guard

/// hyper reads a chunked body's trailer section up to CRLF CRLF, taking a bare LF as an
/// ordinary byte of a trailer line (and httparse then stops the trailers at the bare
/// LF line); the guard splits lines on LF and so sees the trailers end at the bare LF.
/// From there the guard and hyper disagree on where requests start: the guard takes
/// the next lines for a request head with a Content-Length and lets that many bytes
/// through unexamined, and hyper parses a request with both framings in them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bare_lf_in_request_trailers_does_not_blind_the_smuggling_guard() {
    let up = Recording::start().await;
    let gw = gateway_on(&up, "").await;
    let token = gw.alex_token().await;
    let hidden = ambiguous(&gw, &token);
    let wire = format!(
        "{}0\r\nA: 1\r\n\nB: 2\r\nContent-Length: {}\r\n\r\n{hidden}",
        post_head(
            &gw,
            &token,
            "/api/v1/first",
            "Transfer-Encoding: chunked\r\n"
        ),
        hidden.len()
    );
    let received = exchange(&gw, wire.as_bytes()).await;
    assert!(
        !up.paths().iter().any(|p| p.contains("clte")),
        "a request with both Content-Length and Transfer-Encoding reached the upstream \
         ({:?}); statuses {:?}",
        up.paths(),
        statuses(&received)
    );
}

/// Pinned: when the guard cannot read a chunk-size line it turns `Lost` and lets the
/// rest of that read through to hyper unexamined (framing.rs `Phase::Lost => return
/// Ok(bytes.len())`); that is safe only while hyper refuses every such line. It does
/// for an empty or blank one (hyper wants a digit first), so nothing pipelined behind
/// is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_chunk_size_line_does_not_let_the_rest_of_the_read_past_the_guard() {
    let up = Recording::start().await;
    let gw = gateway_on(&up, "").await;
    let token = gw.alex_token().await;
    for blank in ["", " ", "\t"] {
        let wire = format!(
            "{}{blank}\r\n\r\n{}",
            post_head(
                &gw,
                &token,
                "/api/v1/first",
                "Transfer-Encoding: chunked\r\n"
            ),
            ambiguous(&gw, &token)
        );
        let received = exchange(&gw, wire.as_bytes()).await;
        assert!(
            !up.paths().iter().any(|p| p.contains("clte")),
            "chunk-size line {blank:?}: a request with both Content-Length and \
             Transfer-Encoding reached the upstream ({:?}); statuses {:?}",
            up.paths(),
            statuses(&received)
        );
    }
}

// ---------------------------------------------------------------------------------
// 2. Headers and Host

/// A hyper HTTP/2 client on one TLS connection to the gateway.
async fn h2_client(gw: &TestGateway) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
    let tcp = TcpStream::connect(gw.addr).await.unwrap();
    let tls = connector(&gw.ca_pem, b"h2")
        .connect(server_name(), tcp)
        .await
        .unwrap();
    let (send, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .handshake(TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    send
}

/// RFC 9113 §8.3.1: `:authority` must not hold userinfo; `checked_host` refuses it in a
/// Host header (and in an HTTP/1.1 absolute-form target, by comparison with Host), but
/// an HTTP/2 request without a Host field is taken at its `:authority` unchecked, and
/// the userinfo-laden value is routed on and sent upstream as X-Forwarded-Host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_authority_with_userinfo_is_refused_like_a_host_header_with_it() {
    let up = Recording::start().await;
    let gw = gateway_on(&up, "").await;
    let mut h2 = h2_client(&gw).await;
    let request = Request::builder()
        .uri(format!(
            "https://trusted.example@127.0.0.1:{}/api/v1/config",
            gw.addr.port()
        ))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = h2.send_request(request).await.unwrap();
    let status = response.status().as_u16();
    let forwarded_host: Vec<String> = up
        .log
        .lock()
        .unwrap()
        .iter()
        .flat_map(|a| a.headers.clone())
        .filter(|(n, _)| n == "x-forwarded-host")
        .map(|(_, v)| v)
        .collect();
    assert_eq!(
        status, 400,
        "an :authority with userinfo was served; the upstream saw X-Forwarded-Host {forwarded_host:?}"
    );
}

/// Pinned: no spelling of a gateway-owned header reaches the upstream, over HTTP/1.1
/// or HTTP/2, and a client naming the gateway's own headers in `Connection` does not
/// make the gateway drop what it sets itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owned_headers_cannot_be_spoofed_or_suppressed() {
    let up = Recording::start().await;
    let gw = gateway_on(&up, "").await;
    let token = gw.alex_token().await;
    let spoofs = "X-Authenticated-User: mallory\r\nx_authenticated_user: mallory\r\n\
                  X-AUTHENTICATED-ROLES: ROLE_SYSTEM_ADMIN\r\nX_Token_Id: forged\r\n\
                  X-Forwarded-For: 6.6.6.6\r\nx_forwarded_for: 6.6.6.6\r\n\
                  X-Forwarded-Proto: http\r\nForwarded: for=6.6.6.6\r\n\
                  X-Real-IP: 6.6.6.6\r\nX-Original-URL: /api/v1/admin/x\r\n\
                  X-HTTP-Method-Override: DELETE\r\n\
                  Connection: keep-alive, X-Forwarded-For, X-Authenticated-User, x-forwarded-proto\r\n";
    let wire = format!(
        "GET /api/v1/h1 HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nAuthorization: Bearer {token}\r\n{spoofs}\r\n",
        gw.addr.port()
    );
    let mut tls = tls_open(&gw).await;
    tls.write_all(wire.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_secs(3), tls.read(&mut buf)).await;
    let seen = up.last();
    let values = |name: &str| -> Vec<String> {
        seen.headers
            .iter()
            .filter(|(n, _)| n.replace('_', "-") == name)
            .map(|(_, v)| v.clone())
            .collect()
    };
    assert_eq!(
        values("x-authenticated-user"),
        ["alex@example.com"],
        "{seen:?}"
    );
    assert_eq!(values("x-forwarded-for"), ["127.0.0.1"], "{seen:?}");
    assert_eq!(values("x-forwarded-proto"), ["https"], "{seen:?}");
    assert!(
        !values("x-authenticated-roles")
            .iter()
            .any(|v| v.contains("ADMIN")),
        "{seen:?}"
    );
    for gone in [
        "x-token-id",
        "forwarded",
        "x-real-ip",
        "x-original-url",
        "x-http-method-override",
    ] {
        assert!(
            values(gone).iter().all(|v| !v.contains("forged")
                && !v.contains("6.6.6.6")
                && !v.contains("admin")
                && v != "DELETE"),
            "{gone}: {seen:?}"
        );
    }

    // The same over HTTP/2.
    let mut h2 = h2_client(&gw).await;
    let mut request = Request::builder()
        .uri(format!("https://127.0.0.1:{}/api/v1/h2", gw.addr.port()))
        .header("authorization", format!("Bearer {token}"));
    for (n, v) in [
        ("x-authenticated-user", "mallory"),
        ("x_authenticated_user", "mallory"),
        ("x-forwarded-for", "6.6.6.6"),
        ("forwarded", "for=6.6.6.6"),
        ("x-real-ip", "6.6.6.6"),
    ] {
        request = request.header(n, v);
    }
    let response = h2
        .send_request(request.body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let seen = up.last();
    assert_eq!(seen.path, "/api/v1/h2");
    let text = format!("{:?}", seen.headers);
    assert!(
        !text.contains("mallory") && !text.contains("6.6.6.6"),
        "{text}"
    );
}

// ---------------------------------------------------------------------------------
// 4. Paths

/// A `case_sensitive = false` route matches `/API/V1/CI/x`, but its `strip_prefix` is
/// compared case-sensitively, so the prefix stays on and the upstream is sent
/// `/inner/API/V1/CI/x` (a path of the upstream the route never named) instead of
/// `/inner/x`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_case_insensitive_route_strips_its_prefix_in_any_case() {
    let up = Recording::start().await;
    let gw = gateway_on(
        &up,
        &format!(
            "[[routes]]\npath = \"/api/v1/ci/**\"\nupstream = \"http://{}\"\ncase_sensitive = false\n\
             strip_prefix = \"/api/v1/ci\"\nadd_prefix = \"/inner\"\n",
            up.addr
        ),
    )
    .await;
    let token = gw.alex_token().await;
    for (target, expected) in [("/api/v1/ci/x", "/inner/x"), ("/api/v1/CI/x", "/inner/x")] {
        let response = gw
            .http1
            .get(gw.url(target))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(up.last().path, expected, "{target}");
    }
}

/// Pinned: path and target tricks a client could use to reach another route's resource
/// are refused (400) or routed as the upstream will read them (403 for alex on the
/// admin route), over raw HTTP/1.1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_and_target_tricks_do_not_reach_another_routes_resource() {
    let up = Recording::start().await;
    let gw = gateway_on(&up, "").await;
    let token = gw.alex_token().await;
    let port = gw.addr.port();
    let cases: Vec<(String, String, u16)> = vec![
        ("/api/v1/config/..%2fadmin/x".into(), String::new(), 400),
        ("/api/v1/config%2f..%2fadmin/x".into(), String::new(), 400),
        ("/api/v1/config/%2e%2e/admin/x".into(), String::new(), 400),
        ("/api/v1/config/.%2e/admin/x".into(), String::new(), 400),
        ("/api/v1/admin%2fx".into(), String::new(), 400),
        ("/api/v1/admin%5cx".into(), String::new(), 400),
        ("/api/v1/admin;x=1/y".into(), String::new(), 400),
        ("/api/v1/admin%3bx/y".into(), String::new(), 400),
        ("/api/v1//admin/x".into(), String::new(), 403),
        ("/api/v1/%61dmin/x".into(), String::new(), 403),
        ("/api/v1/admin/".into(), String::new(), 403),
        (
            format!("https://127.0.0.1:{port}/api/v1/admin/x"),
            String::new(),
            403,
        ),
        // An absolute-form target for another authority than Host.
        (
            "https://other.example/api/v1/admin/x".into(),
            String::new(),
            400,
        ),
        ("*".into(), String::new(), 400),
        // A second Host.
        (
            "/api/v1/x".into(),
            format!("Host: 127.0.0.1:{port}\r\n"),
            400,
        ),
    ];
    for (target, extra, expected) in cases {
        let wire = format!(
            "GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{extra}Authorization: Bearer {token}\r\n\
             Connection: close\r\n\r\n"
        );
        let received = exchange(&gw, wire.as_bytes()).await;
        assert_eq!(
            statuses(&received),
            [expected],
            "{target}: {}",
            String::from_utf8_lossy(&received)
        );
    }
    assert!(
        !up.paths()
            .iter()
            .any(|p| p.to_ascii_lowercase().contains("admin")),
        "{:?}",
        up.paths()
    );
}
