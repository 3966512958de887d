//! The gateway's edge limits under hostile clients: slowloris request heads, idle
//! connections, oversized heads and bodies, request smuggling, the connection limit and
//! the sign-in lockout. Each test drives a real gateway over TLS (raw bytes where a
//! client library would refuse to misbehave) and, where it matters whether a request got
//! through, an upstream of this file that logs every request head it receives. Every
//! test ends by checking that the same gateway still serves an ordinary sign-in and API
//! call.

mod common;
use common::raw::{connector, parse_responses, server_name, RawResponse};
use common::*;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::client::TlsStream;

// ---------------------------------------------------------------------------------
// A counting upstream

/// One request as the upstream saw it: its head, and how much of its body arrived.
#[derive(Clone, Debug)]
struct Arrival {
    method: String,
    path: String,
    /// Body bytes received (so far, or in all).
    bytes: usize,
    /// Whether the body arrived complete (false while reading or when it broke off).
    complete: bool,
}

type Log = Arc<Mutex<Vec<Arrival>>>;

/// A hyper upstream that logs every request head the moment it arrives, then reads the
/// whole body and answers 200 with `{"path", "bytes"}`.
struct Counting {
    addr: SocketAddr,
    log: Log,
    _task: Task,
}

async fn count(log: Log, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = request.uri().path().to_owned();
    let index = {
        let mut log = log.lock().unwrap();
        log.push(Arrival {
            method: request.method().to_string(),
            path: path.clone(),
            bytes: 0,
            complete: false,
        });
        log.len() - 1
    };
    let mut body = request.into_body();
    let mut complete = true;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Some(data) = frame.data_ref() {
                    log.lock().unwrap()[index].bytes += data.len();
                }
            }
            Err(_) => {
                complete = false;
                break;
            }
        }
    }
    let bytes = {
        let mut log = log.lock().unwrap();
        log[index].complete = complete;
        log[index].bytes
    };
    let json = serde_json::json!({ "path": path, "bytes": bytes });
    let mut response = Response::new(Full::new(Bytes::from(json.to_string())));
    response
        .headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    response
}

impl Counting {
    async fn start() -> Counting {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let log: Log = Arc::default();
        let shared = log.clone();
        let task = accept_loop(listener, move |stream| {
            let log = shared.clone();
            async move {
                let service = service_fn(move |request| {
                    let log = log.clone();
                    async move { Ok::<_, Infallible>(count(log, request).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            }
        });
        Counting {
            addr,
            log,
            _task: task,
        }
    }

    fn arrivals(&self) -> Vec<Arrival> {
        self.log.lock().unwrap().clone()
    }

    fn paths(&self) -> Vec<String> {
        self.arrivals().into_iter().map(|a| a.path).collect()
    }
}

/// The standard configuration with every `/api/v1/**` route on the counting upstream,
/// `server_keys` added to `[server]` and `routes` before the catch-all route.
fn config_for(up: &Counting, server_keys: &str, routes: &str) -> String {
    with_server_keys(&config_text(up.addr, "", routes), server_keys)
}

async fn start(up: &Counting, server_keys: &str, routes: &str) -> TestGateway {
    TestGateway::start_text(
        Upstream::start().await,
        &config_for(up, server_keys, routes),
    )
    .await
}

// ---------------------------------------------------------------------------------
// Raw TLS

/// A TLS connection to the gateway, handshake completed, offering only `alpn`.
async fn tls_open(gw: &TestGateway, alpn: &[u8]) -> TlsStream<TcpStream> {
    let tcp = TcpStream::connect(gw.addr).await.unwrap();
    let tls = tokio::time::timeout(
        Duration::from_secs(5),
        connector(&gw.ca_pem, alpn).connect(server_name(), tcp),
    )
    .await
    .expect("TLS handshake in time")
    .expect("TLS handshake");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(alpn));
    tls
}

/// How a connection ended while we were reading it.
#[derive(Debug, PartialEq)]
enum End {
    /// Orderly end of stream.
    Eof,
    /// Reset, or closed without TLS close_notify.
    Error(String),
    /// Still open when we stopped waiting.
    Open,
}

impl End {
    fn closed(&self) -> bool {
        *self != End::Open
    }
}

/// Reads until the gateway closes the connection or `wait` passes.
async fn read_to_close<R: tokio::io::AsyncRead + Unpin>(
    reader: &mut R,
    wait: Duration,
) -> (Vec<u8>, End) {
    let mut received = Vec::new();
    let deadline = tokio::time::Instant::now() + wait;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match tokio::time::timeout_at(deadline, reader.read(&mut buf)).await {
            Err(_) => return (received, End::Open),
            Ok(Ok(0)) => return (received, End::Eof),
            Ok(Ok(n)) => received.extend_from_slice(&buf[..n]),
            Ok(Err(error)) => return (received, End::Error(error.to_string())),
        }
    }
}

/// Writes `wire` on a new HTTP/1.1 connection and reads until the gateway closes it (at
/// most 5 s). A write error (the gateway closed early) is not a failure: what was read
/// tells what happened.
async fn exchange(gw: &TestGateway, wire: &[u8]) -> (Vec<u8>, End) {
    let mut tls = tls_open(gw, b"http/1.1").await;
    if tls.write_all(wire).await.is_ok() {
        let _ = tls.flush().await;
    }
    read_to_close(&mut tls, Duration::from_secs(5)).await
}

/// The responses parsed from `received`, whose statuses must be exactly `expected`.
fn expect_statuses(received: &[u8], expected: &[u16]) -> Vec<RawResponse> {
    let responses = parse_responses(received);
    assert_eq!(
        responses.iter().map(|r| r.status).collect::<Vec<_>>(),
        expected,
        "{:?}",
        String::from_utf8_lossy(received)
    );
    responses
}

/// A hyper HTTP/1.1 client on one TLS connection; the task ends when the connection does.
async fn h1_client(
    gw: &TestGateway,
) -> (
    hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    JoinHandle<()>,
) {
    let tls = tls_open(gw, b"http/1.1").await;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    let task = tokio::spawn(async move {
        let _ = connection.await;
    });
    (sender, task)
}

/// A hyper HTTP/2 client on one TLS connection (it sends no pings of its own, and answers
/// the gateway's); the task ends when the connection does.
async fn h2_client(
    gw: &TestGateway,
) -> (
    hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
    JoinHandle<()>,
) {
    let tls = tls_open(gw, b"h2").await;
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    let task = tokio::spawn(async move {
        let _ = connection.await;
    });
    (sender, task)
}

fn get(gw: &TestGateway, path: &str, token: &str, absolute: bool) -> Request<Empty<Bytes>> {
    let authority = format!("127.0.0.1:{}", gw.addr.port());
    let uri = if absolute {
        format!("https://{authority}{path}")
    } else {
        path.to_owned()
    };
    let mut request = Request::get(uri);
    if !absolute {
        request = request.header("host", authority.as_str());
    }
    request
        .header("authorization", format!("Bearer {token}").as_str())
        .body(Empty::new())
        .unwrap()
}

/// Waits for a spawned connection task to end; whether it did within `wait`.
async fn ends_within(task: &mut JoinHandle<()>, wait: Duration) -> bool {
    tokio::time::timeout(wait, task).await.is_ok()
}

// ---------------------------------------------------------------------------------
// Shared checks

/// Nothing above broke the gateway: a fresh sign-in and an API call over both protocols
/// reach the upstream.
async fn still_serves(gw: &TestGateway, up: &Counting) {
    still_serves_over(gw, up, &[&gw.http1, &gw.http2]).await;
}

async fn still_serves_over(gw: &TestGateway, up: &Counting, clients: &[&reqwest::Client]) {
    let before = up.arrivals().len();
    let token = gw.alex_token().await;
    for client in clients {
        let response = client
            .get(gw.url("/api/v1/after/all"))
            .bearer_auth(&token)
            .send()
            .await
            .expect("the gateway still answers");
        let body = json_ok(response).await;
        assert_eq!(body["path"], "/api/v1/after/all", "{body}");
    }
    let after = up.paths();
    assert_eq!(
        &after[before..],
        vec!["/api/v1/after/all"; clients.len()],
        "{after:?}"
    );
}

fn head_of_request(gw: &TestGateway, token: &str, target: &str) -> String {
    format!(
        "GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nAuthorization: Bearer {token}\r\n\
         X-Padding: {}\r\n\r\n",
        gw.addr.port(),
        "p".repeat(64)
    )
}

/// Sends `wire` one byte every `pace` on a connection of protocol `alpn` until the
/// gateway closes it. Returns how long that took (None: still open after `give_up`),
/// how many bytes had been sent, and what the gateway wrote back.
async fn drip(
    gw: &TestGateway,
    alpn: &'static [u8],
    wire: Vec<u8>,
    pace: Duration,
    give_up: Duration,
) -> (Option<Duration>, usize, Vec<u8>) {
    let tls = tls_open(gw, alpn).await;
    let started = Instant::now();
    let (mut reader, mut writer) = tokio::io::split(tls);
    let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = sent.clone();
    let writing = tokio::spawn(async move {
        for byte in wire {
            if writer.write_all(&[byte]).await.is_err() || writer.flush().await.is_err() {
                return;
            }
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::time::sleep(pace).await;
        }
        // All sent: keep the connection open (and silent) until the test gives up.
        tokio::time::sleep(Duration::from_secs(60)).await;
    });
    let (received, end) = read_to_close(&mut reader, give_up).await;
    let elapsed = started.elapsed();
    writing.abort();
    let sent = sent.load(std::sync::atomic::Ordering::SeqCst);
    (end.closed().then_some(elapsed), sent, received)
}

// ---------------------------------------------------------------------------------
// 1. Slowloris

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowloris_head_is_cut_off_while_other_clients_are_served() {
    let up = Counting::start().await;
    let gw = start(&up, "header_read_timeout = \"1s\"", "").await;
    let token = gw.alex_token().await;

    // Four slow clients at once, each far from finishing its head when the timeout hits.
    let wire = head_of_request(&gw, &token, "/api/v1/slowloris").into_bytes();
    let total = wire.len();
    let pace = Duration::from_millis(300);
    let slow: Vec<_> = (0..4)
        .map(|_| drip(&gw, b"http/1.1", wire.clone(), pace, Duration::from_secs(4)))
        .collect();
    let slow = futures_util::future::join_all(slow);

    let normal = async {
        tokio::time::sleep(Duration::from_millis(400)).await;
        for i in 0..3 {
            let started = Instant::now();
            let response = gw
                .bearer_get(&gw.http1, &format!("/api/v1/normal/{i}"), &token)
                .await;
            assert_eq!(response.status(), 200);
            assert!(
                started.elapsed() < Duration::from_millis(800),
                "a normal request beside the slowloris took {:?}",
                started.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    let (slow, ()) = tokio::join!(slow, normal);

    for (closed_after, sent, received) in slow {
        let closed_after = closed_after.unwrap_or_else(|| {
            panic!(
                "a head dripped one byte per 300 ms was still open after 4 s ({sent} bytes sent)"
            )
        });
        assert!(
            closed_after >= Duration::from_millis(900) && closed_after <= Duration::from_secs(3),
            "closed after {closed_after:?}, header_read_timeout is 1 s"
        );
        assert!(sent < total, "the head was completed: {sent} of {total}");
        // hyper closes without a word; a 408 first would do too, anything else would not.
        let responses = parse_responses(&received);
        assert!(
            responses.iter().all(|r| r.status == 408)
                && (received.is_empty() || !responses.is_empty()),
            "{:?}",
            String::from_utf8_lossy(&received)
        );
    }
    let paths = up.paths();
    assert_eq!(
        paths,
        ["/api/v1/normal/0", "/api/v1/normal/1", "/api/v1/normal/2"],
        "only the normal requests reached the upstream"
    );
    still_serves(&gw, &up).await;
}

/// On HTTP/2 the gateway's own header_read_timeout deadline covers the preface and the
/// first request only: a connection past its first request may sit quiet for longer
/// (up to idle_timeout) and be served again. (On HTTP/1.1 hyper also bounds the wait
/// between keep-alive requests by it, as config.toml says.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_connection_past_its_first_request_outlives_header_read_timeout() {
    let up = Counting::start().await;
    let gw = start(&up, "header_read_timeout = \"300ms\"", "").await;
    let token = gw.alex_token().await;
    let (mut sender, mut task) = h2_client(&gw).await;
    let first = sender
        .send_request(get(&gw, "/api/v1/kept/0", &token, true))
        .await
        .unwrap();
    assert_eq!(first.status(), 200);
    assert!(
        !ends_within(&mut task, Duration::from_millis(900)).await,
        "the connection closed within three header_read_timeouts of its first request"
    );
    let second = sender
        .send_request(get(&gw, "/api/v1/kept/1", &token, true))
        .await
        .unwrap();
    assert_eq!(second.status(), 200);
    assert_eq!(up.paths(), ["/api/v1/kept/0", "/api/v1/kept/1"]);
}

/// HTTP/2 starts with a 24-byte connection preface before any request head; a client
/// that drips it is just as much a slowloris and the same deadline applies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowloris_dripping_the_http2_preface_is_cut_off_too() {
    let up = Counting::start().await;
    let gw = start(&up, "header_read_timeout = \"1s\"", "").await;
    let mut wire = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    // An empty SETTINGS frame after the preface, for a client that gets that far.
    wire.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    let (closed_after, sent, _) = drip(
        &gw,
        b"h2",
        wire,
        Duration::from_millis(300),
        Duration::from_secs(4),
    )
    .await;
    let closed_after = closed_after.unwrap_or_else(|| {
        panic!(
            "an HTTP/2 client dripping its preface (one byte per 300 ms, {sent} bytes sent) \
             was still connected after 4 s, although header_read_timeout is 1 s"
        )
    });
    assert!(
        closed_after <= Duration::from_secs(3),
        "closed only after {closed_after:?}"
    );
    assert!(up.paths().is_empty());
    still_serves(&gw, &up).await;
}

// ---------------------------------------------------------------------------------
// 2. Idle timeout

/// A short idle timeout, and a header read timeout well past it.
const IDLE_TIMEOUT_KEYS: &str = "idle_timeout = \"700ms\"\nheader_read_timeout = \"5s\"";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_close_after_idle_timeout_busy_ones_stay() {
    let up = Counting::start().await;
    let gw = start(&up, IDLE_TIMEOUT_KEYS, "").await;
    let token = gw.alex_token().await;

    // Handshake done, not a byte after it: closed by the idle timeout, not the 5 s one.
    for alpn in [&b"h2"[..], &b"http/1.1"[..]] {
        let mut tls = tls_open(&gw, alpn).await;
        let started = Instant::now();
        let (received, end) = read_to_close(&mut tls, Duration::from_secs(3)).await;
        let elapsed = started.elapsed();
        assert!(
            end.closed(),
            "{}: a silent connection was still open after 3 s",
            String::from_utf8_lossy(alpn)
        );
        assert!(
            elapsed >= Duration::from_millis(600) && elapsed <= Duration::from_secs(2),
            "{}: closed after {elapsed:?}",
            String::from_utf8_lossy(alpn)
        );
        assert!(received.is_empty(), "{received:?}");
    }

    // Busy connections carry on well past the idle timeout: a request every 300 ms for
    // 2 s, all on one connection per protocol.
    let (mut h1, mut h1_task) = h1_client(&gw).await;
    let (mut h2, h2_task) = h2_client(&gw).await;
    let started = Instant::now();
    let mut sent = 0;
    let mut h1_last = Instant::now();
    while started.elapsed() < Duration::from_secs(2) {
        h1.ready().await.expect("the HTTP/1.1 connection is usable");
        let response = h1
            .send_request(get(&gw, "/api/v1/busy/h1", &token, false))
            .await
            .expect("HTTP/1.1 request on the busy connection");
        assert_eq!(response.status(), 200);
        response.into_body().collect().await.unwrap();
        h1_last = Instant::now();
        h2.ready().await.expect("the HTTP/2 connection is usable");
        let response = h2
            .send_request(get(&gw, "/api/v1/busy/h2", &token, true))
            .await
            .expect("HTTP/2 request on the busy connection");
        assert_eq!(response.status(), 200);
        response.into_body().collect().await.unwrap();
        sent += 1;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(sent >= 5, "only {sent} rounds in 2 s");
    assert!(!h1_task.is_finished() && !h2_task.is_finished());

    // Then silence on the HTTP/1.1 connection: it goes after the idle timeout.
    assert!(
        ends_within(&mut h1_task, Duration::from_secs(2)).await,
        "an HTTP/1.1 keep-alive connection silent for 2 s was not closed (idle_timeout 700ms)"
    );
    let silent = h1_last.elapsed();
    assert!(
        silent >= Duration::from_millis(600),
        "closed after {silent:?} of silence"
    );
    drop(h2);
    h2_task.abort();

    let busy = up
        .paths()
        .iter()
        .filter(|p| p.starts_with("/api/v1/busy/"))
        .count();
    assert_eq!(busy, 2 * sent);
    still_serves(&gw, &up).await;
}

/// An HTTP/2 client that sends no request for longer than `idle_timeout` is idle, even
/// though its stack answers the gateway's keep-alive pings: idle_timeout documents "a
/// connection with no request in flight for this long is closed".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_http2_client_is_closed_after_idle_timeout() {
    let up = Counting::start().await;
    let gw = start(&up, IDLE_TIMEOUT_KEYS, "").await;
    let token = gw.alex_token().await;
    let (mut h2, mut task) = h2_client(&gw).await;
    h2.ready().await.unwrap();
    let response = h2
        .send_request(get(&gw, "/api/v1/once", &token, true))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.into_body().collect().await.unwrap();
    let silent = Instant::now();
    let closed = ends_within(&mut task, Duration::from_millis(2500)).await;
    assert!(
        closed,
        "an HTTP/2 connection with no request for 2.5 s was still open (idle_timeout 700ms)"
    );
    assert!(silent.elapsed() >= Duration::from_millis(600));
    still_serves(&gw, &up).await;
}

// ---------------------------------------------------------------------------------
// 3. Header size

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_head_gets_431_and_never_reaches_the_upstream() {
    let up = Counting::start().await;
    let gw = start(&up, "", "").await;
    let token = gw.alex_token().await;
    let host = format!("127.0.0.1:{}", gw.addr.port());
    let with_header = |path: &str, size: usize| {
        format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n\
             X-Big: {}\r\nConnection: close\r\n\r\n",
            "b".repeat(size)
        )
    };

    // HTTP/1.1, 100 KiB header against the default 64 KiB head limit.
    let (received, end) = exchange(&gw, with_header("/api/v1/big", 100 * 1024).as_bytes()).await;
    assert!(
        end.closed(),
        "the connection stays open after a 100 KiB head"
    );
    expect_statuses(&received, &[431]);

    // HTTP/2: the same header through reqwest.
    let result = gw
        .http2
        .get(gw.url("/api/v1/big/h2"))
        .bearer_auth(&token)
        .header("x-big", "b".repeat(100 * 1024))
        .send()
        .await;
    match result {
        Ok(response) => assert_eq!(response.status(), 431),
        Err(error) => panic!("HTTP/2 oversized head: no 431 but {error:?}"),
    }

    // 4 KiB is an ordinary header.
    let (received, _) = exchange(&gw, with_header("/api/v1/fine", 4 * 1024).as_bytes()).await;
    let responses = expect_statuses(&received, &[200]);
    assert_eq!(responses[0].json()["path"], "/api/v1/fine");
    let response = gw
        .http2
        .get(gw.url("/api/v1/fine/h2"))
        .bearer_auth(&token)
        .header("x-big", "b".repeat(4 * 1024))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    assert_eq!(up.paths(), ["/api/v1/fine", "/api/v1/fine/h2"]);
    still_serves(&gw, &up).await;
}

// ---------------------------------------------------------------------------------
// 4. Body limits

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_the_limits_get_413() {
    let up = Counting::start().await;
    let limited = format!(
        "[[routes]]\npath = \"/api/v1/limited/**\"\nupstream = \"http://{}\"\n\
         max_request_body = 1024\n",
        up.addr
    );
    let gw = start(&up, "", &limited).await;
    let token = gw.alex_token().await;

    // The token endpoint: a 100 KiB form (max_form_body is 64 KiB).
    let padding = "a".repeat(100 * 1024);
    let response = gw
        .token_request(
            Some(APP),
            &[
                ("grant_type", "password"),
                ("username", ALEX.0),
                ("password", ALEX.1),
                ("padding", &padding),
            ],
        )
        .await;
    expect_error(response, 413, "payload_too_large").await;

    let post = |path: &str, body: reqwest::Body| {
        gw.http1
            .post(gw.url(path))
            .bearer_auth(&token)
            .body(body)
            .send()
    };
    // Declared lengths: over the limit is refused before anything is forwarded, however
    // the body then trickles in. Once in one piece through reqwest, once by hand: the
    // head and 512 bytes, a pause, then the rest (a gateway that only counted the bytes
    // would have sent the head and the first 512 on by then).
    for (path, n) in [
        ("/api/v1/limited/declared-2048", 2048),
        ("/api/v1/limited/declared-1025", 1025),
    ] {
        let response = post(path, reqwest::Body::from(pattern(n))).await.unwrap();
        let body = expect_error(response, 413, "payload_too_large").await;
        assert!(
            body["error_description"].as_str().unwrap().contains("1024"),
            "{body}"
        );

        let mut tls = tls_open(&gw, b"http/1.1").await;
        let head = post_head(
            &gw,
            &token,
            &format!("{path}/raw"),
            &format!("Content-Length: {n}\r\nConnection: close\r\n"),
        );
        let body = pattern(n);
        tls.write_all(head.as_bytes()).await.unwrap();
        tls.write_all(&body[..512]).await.unwrap();
        tls.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        // The gateway may have answered already; it reads (drains) the rest either way.
        let _ = tls.write_all(&body[512..]).await;
        let _ = tls.flush().await;
        let (received, _) = read_to_close(&mut tls, Duration::from_secs(5)).await;
        let responses = expect_statuses(&received, &[413]);
        assert_eq!(responses[0].json()["error"], "payload_too_large");
    }
    assert!(
        up.paths().is_empty(),
        "a declared oversized body reached the upstream: {:?}",
        up.arrivals()
    );

    // Streamed (chunked) bodies: in one 4 KiB piece, and in 256-byte pieces that only
    // pass the limit together.
    for (path, chunk) in [
        ("/api/v1/limited/chunked-4096", 4096),
        ("/api/v1/limited/chunked-4096-small", 256),
    ] {
        let response = post(path, chunked_body(4096, chunk)).await.unwrap();
        expect_error(response, 413, "payload_too_large").await;
    }
    // The head of a streamed request may have gone out before the body passed the limit,
    // but never more than the limit's worth of body, and never a complete request.
    tokio::time::sleep(Duration::from_millis(200)).await;
    for arrival in up.arrivals() {
        assert!(
            arrival.path.starts_with("/api/v1/limited/chunked-"),
            "{arrival:?}"
        );
        assert!(
            !arrival.complete && arrival.bytes <= 1024,
            "an oversized streamed body reached the upstream: {arrival:?}"
        );
    }

    // At and under the limit, declared or streamed, bodies pass whole.
    let before = up.arrivals().len();
    for (path, body, n) in [
        (
            "/api/v1/limited/ok-512",
            reqwest::Body::from(pattern(512)),
            512,
        ),
        (
            "/api/v1/limited/ok-1024",
            reqwest::Body::from(pattern(1024)),
            1024,
        ),
        (
            "/api/v1/limited/ok-512-chunked",
            chunked_body(512, 100),
            512,
        ),
        (
            "/api/v1/limited/ok-1024-chunked",
            chunked_body(1024, 256),
            1024,
        ),
    ] {
        let response = post(path, body).await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
        let seen: Value = response.json().await.unwrap();
        assert_eq!(seen["bytes"], n, "{path}: {seen}");
    }
    let passed: Vec<(String, usize, bool)> = up.arrivals()[before..]
        .iter()
        .map(|a| (a.path.clone(), a.bytes, a.complete))
        .collect();
    assert_eq!(
        passed,
        [
            ("/api/v1/limited/ok-512".to_owned(), 512, true),
            ("/api/v1/limited/ok-1024".to_owned(), 1024, true),
            ("/api/v1/limited/ok-512-chunked".to_owned(), 512, true),
            ("/api/v1/limited/ok-1024-chunked".to_owned(), 1024, true),
        ]
    );
    // Other routes have no limit.
    let response = post("/api/v1/unlimited", reqwest::Body::from(pattern(4096)))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    still_serves(&gw, &up).await;
}

// ---------------------------------------------------------------------------------
// 5. Request smuggling

/// What the gateway did with one malformed request: a 400 (and nothing else) or a closed
/// connection without an answer are both a refusal.
fn assert_refused(what: &str, received: &[u8], end: &End) {
    let text = String::from_utf8_lossy(received);
    assert!(end.closed(), "{what}: the connection stayed open: {text}");
    let responses = parse_responses(received);
    let statuses: Vec<u16> = responses.iter().map(|r| r.status).collect();
    assert!(
        statuses == [400] || received.is_empty(),
        "{what}: expected a 400 or a closed connection, got {statuses:?}: {text}"
    );
}

fn post_head(gw: &TestGateway, token: &str, path: &str, framing: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: text/plain\r\n{framing}\r\n",
        gw.addr.port()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_framing_is_refused_before_the_upstream() {
    let up = Counting::start().await;
    let gw = start(&up, "", "").await;
    let token = gw.alex_token().await;
    let smuggled = "GET /api/v1/smuggled HTTP/1.1\r\nHost: x\r\n\r\n";
    let cases = [
        (
            "two different Content-Lengths",
            "Content-Length: 5\r\nContent-Length: 6\r\n",
            format!("hello!{smuggled}"),
        ),
        (
            "Content-Length lists two values",
            "Content-Length: 5, 6\r\n",
            format!("hello!{smuggled}"),
        ),
        (
            "chunked is not the last transfer coding",
            "Transfer-Encoding: chunked, identity\r\n",
            format!("5\r\nhello\r\n0\r\n\r\n{smuggled}"),
        ),
        (
            "an unknown transfer coding",
            "Transfer-Encoding: xchunked\r\n",
            format!("5\r\nhello\r\n0\r\n\r\n{smuggled}"),
        ),
        (
            "whitespace before the colon",
            "Transfer-Encoding : chunked\r\n",
            format!("5\r\nhello\r\n0\r\n\r\n{smuggled}"),
        ),
        (
            "a folded Transfer-Encoding line",
            "Transfer-Encoding:\r\n chunked\r\n",
            format!("5\r\nhello\r\n0\r\n\r\n{smuggled}"),
        ),
        (
            "a negative Content-Length",
            "Content-Length: -1\r\n",
            smuggled.to_owned(),
        ),
    ];
    for (what, framing, body) in &cases {
        let wire = format!(
            "{}{body}",
            post_head(
                &gw,
                &token,
                &format!("/api/v1/case/{}", what.len()),
                framing
            )
        );
        let (received, end) = exchange(&gw, wire.as_bytes()).await;
        assert_refused(what, &received, &end);
    }
    assert_eq!(
        up.paths(),
        Vec::<String>::new(),
        "a malformed request reached the upstream"
    );

    // An ordinary request on a new connection gets through, exactly once.
    let wire = format!(
        "{}hello",
        post_head(
            &gw,
            &token,
            "/api/v1/ordinary",
            "Content-Length: 5\r\nConnection: close\r\n"
        )
    );
    let (received, _) = exchange(&gw, wire.as_bytes()).await;
    let responses = expect_statuses(&received, &[200]);
    assert_eq!(responses[0].json()["bytes"], 5);
    assert_eq!(up.paths(), ["/api/v1/ordinary"]);
    still_serves(&gw, &up).await;
}

/// RFC 9112 §6.3: Content-Length together with Transfer-Encoding is the classic
/// smuggling probe; the gateway promises to refuse it (README "Smuggling") rather than
/// let its parser pick one framing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_length_with_transfer_encoding_is_refused() {
    let up = Counting::start().await;
    let gw = start(&up, "", "").await;
    let token = gw.alex_token().await;
    let smuggled = "GET /api/v1/smuggled HTTP/1.1\r\nHost: x\r\n\r\n";
    for (what, framing) in [
        (
            "Content-Length before Transfer-Encoding",
            "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
        ),
        (
            "Transfer-Encoding before Content-Length",
            "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
        ),
    ] {
        let wire = format!(
            "{}0\r\n\r\n{smuggled}",
            post_head(&gw, &token, "/api/v1/clte", framing)
        );
        let (received, end) = exchange(&gw, wire.as_bytes()).await;
        assert_refused(what, &received, &end);
        assert_eq!(
            up.paths(),
            Vec::<String>::new(),
            "{what}: the request was forwarded to the upstream"
        );
    }
    let response = gw.bearer_get(&gw.http1, "/api/v1/ordinary", &token).await;
    assert_eq!(response.status(), 200);
    assert_eq!(up.paths(), ["/api/v1/ordinary"]);
    still_serves(&gw, &up).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_hidden_in_a_body_stays_body() {
    let up = Counting::start().await;
    let gw = start(&up, "", "").await;
    let token = gw.alex_token().await;
    let host = format!("127.0.0.1:{}", gw.addr.port());
    // A complete, authorised request as the body of another.
    let hidden = format!(
        "GET /api/v1/smuggled HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n\r\n"
    );
    for framing in [
        format!("Content-Length: {}\r\nConnection: close\r\n", hidden.len()),
        "Transfer-Encoding: chunked\r\nConnection: close\r\n".to_owned(),
    ] {
        let body = if framing.contains("chunked") {
            format!("{:x}\r\n{hidden}\r\n0\r\n\r\n", hidden.len())
        } else {
            hidden.clone()
        };
        let wire = format!(
            "{}{body}",
            post_head(&gw, &token, "/api/v1/carrier", &framing)
        );
        let (received, _) = exchange(&gw, wire.as_bytes()).await;
        let responses = expect_statuses(&received, &[200]);
        assert_eq!(responses[0].json()["bytes"], hidden.len());
    }
    let arrivals = up.arrivals();
    assert_eq!(
        arrivals
            .iter()
            .map(|a| (a.method.as_str(), a.path.as_str(), a.bytes))
            .collect::<Vec<_>>(),
        [
            ("POST", "/api/v1/carrier", hidden.len()),
            ("POST", "/api/v1/carrier", hidden.len())
        ],
        "the hidden request must arrive as body bytes only"
    );

    // Bytes after a chunked body are the next request on the connection: the gateway
    // parses and authorises it itself (no token here: 401), it is not passed along.
    let wire = format!(
        "{}5\r\nhello\r\n0\r\n\r\nGET /api/v1/smuggled HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n",
        post_head(&gw, &token, "/api/v1/carrier", "Transfer-Encoding: chunked\r\n")
    );
    let (received, _) = exchange(&gw, wire.as_bytes()).await;
    let responses = expect_statuses(&received, &[200, 401]);
    assert_eq!(responses[0].json()["bytes"], 5);
    assert_eq!(
        up.paths(),
        ["/api/v1/carrier", "/api/v1/carrier", "/api/v1/carrier"]
    );
    still_serves(&gw, &up).await;
}

// ---------------------------------------------------------------------------------
// 6. max_connections

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_holds_new_handshakes_until_a_slot_frees() {
    let up = Counting::start().await;
    let gw = start(&up, "max_connections = 1", "").await;
    let host = format!("127.0.0.1:{}", gw.addr.port());
    let public = format!("GET /api/v1/config HTTP/1.1\r\nHost: {host}\r\n\r\n");

    let mut first = tls_open(&gw, b"http/1.1").await;
    // The second connection's TCP connect succeeds (the backlog), its handshake must wait.
    let tcp = TcpStream::connect(gw.addr).await.unwrap();
    let connector = connector(&gw.ca_pem, b"http/1.1");
    let mut second = tokio::spawn(async move { connector.connect(server_name(), tcp).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !second.is_finished(),
        "a second TLS handshake completed while max_connections = 1 was taken"
    );

    // The established connection is unaffected.
    first.write_all(public.as_bytes()).await.unwrap();
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    while parse_responses(&received).is_empty() {
        let n = tokio::time::timeout(Duration::from_secs(5), first.read(&mut buf))
            .await
            .expect("the first connection is answered")
            .unwrap();
        assert!(n > 0, "the first connection was closed");
        received.extend_from_slice(&buf[..n]);
    }
    assert_eq!(parse_responses(&received)[0].status, 200);
    assert!(!second.is_finished(), "handshake completed over the limit");

    // Once the first closes, the second is accepted and served.
    drop(first);
    let mut second = tokio::time::timeout(Duration::from_secs(3), &mut second)
        .await
        .expect("the waiting handshake completes once the slot frees")
        .unwrap()
        .expect("TLS handshake");
    second
        .write_all(
            format!("GET /api/v1/config HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
    let (received, _) = read_to_close(&mut second, Duration::from_secs(5)).await;
    expect_statuses(&received, &[200]);
    drop(second);
    assert_eq!(up.paths(), ["/api/v1/config", "/api/v1/config"]);
    // One client connection at a time fits in the limit (reqwest keeps its connection
    // for the sign-in and the call).
    still_serves_over(&gw, &up, &[&gw.http1]).await;
}

// ---------------------------------------------------------------------------------
// 7. Lockout

/// A password grant from `ip` (as forwarded by a trusted proxy); the response.
async fn sign_in(
    gw: &TestGateway,
    user: &str,
    password: &str,
    ip: Option<&str>,
) -> reqwest::Response {
    let mut request = gw
        .http1
        .post(gw.url("/api/oauth/token"))
        .basic_auth(APP.0, Some(APP.1))
        .form(&password_form((user, password), &[]));
    if let Some(ip) = ip {
        request = request.header("x-forwarded-for", ip);
    }
    request.send().await.unwrap()
}

async fn refused(response: reqwest::Response) -> Value {
    expect_error(response, 400, "invalid_grant").await
}

/// A gateway locking out after 3 failures within 1 s, behind trusted proxies or not.
async fn start_lockout(up: &Counting, trusted: bool) -> TestGateway {
    let text = config_for(
        up,
        if trusted {
            "trusted_proxies = [\"127.0.0.0/8\"]"
        } else {
            ""
        },
        "",
    );
    let old = "max_failed_logins = 1000\nlockout_window = \"1m\"";
    assert!(text.contains(old));
    let text = text.replace(old, "max_failed_logins = 3\nlockout_window = \"1s\"");
    TestGateway::start_text(Upstream::start().await, &text).await
}

/// Three usernames nobody has.
const NOBODIES: [&str; 3] = [
    "nobody1@example.com",
    "nobody2@example.com",
    "nobody3@example.com",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_username_refuses_even_the_right_password_until_the_window_passes() {
    let up = Counting::start().await;
    let gw = start_lockout(&up, true).await;
    // Failures from three different addresses: only the username's counter reaches 3.
    // The window opens somewhere between `started` and `first_done`.
    let started = Instant::now();
    let mut first_done = None;
    let mut wrong = Vec::new();
    for ip in ["10.1.0.1", "10.1.0.2", "10.1.0.3"] {
        wrong.push(refused(sign_in(&gw, ALEX.0, "wrong-password", Some(ip)).await).await);
        first_done.get_or_insert_with(Instant::now);
    }
    assert!(wrong.iter().all(|w| *w == wrong[0]), "{wrong:?}");
    let locked = refused(sign_in(&gw, ALEX.0, ALEX.1, Some("10.1.0.4")).await).await;
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "too slow to test a 1 s window"
    );
    assert_eq!(
        locked, wrong[0],
        "a locked-out sign-in must look exactly like a wrong password"
    );
    // The lock is the username's: another user from the same address signs in.
    assert_eq!(
        sign_in(&gw, ADMIN.0, ADMIN.1, Some("10.1.0.4"))
            .await
            .status(),
        200
    );

    tokio::time::sleep_until((first_done.unwrap() + Duration::from_millis(1200)).into()).await;
    let response = sign_in(&gw, ALEX.0, ALEX.1, Some("10.1.0.4")).await;
    assert_eq!(response.status(), 200, "the lockout outlived its window");
    let body: Value = response.json().await.unwrap();
    assert!(body["access_token"].is_string(), "{body}");
    still_serves(&gw, &up).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_from_one_address_lock_out_every_username_from_it() {
    let up = Counting::start().await;
    // No trusted proxies: the address is the TCP peer, 127.0.0.1, and X-Forwarded-For
    // must not get a locked-out client a fresh counter.
    let gw = start_lockout(&up, false).await;
    let started = Instant::now();
    let mut first_done = None;
    let mut wrong = Vec::new();
    for user in NOBODIES {
        wrong.push(refused(sign_in(&gw, user, "guess", None).await).await);
        first_done.get_or_insert_with(Instant::now);
    }
    let locked = refused(sign_in(&gw, ADMIN.0, ADMIN.1, None).await).await;
    assert_eq!(
        locked, wrong[0],
        "a locked-out sign-in must look like a wrong one"
    );
    let spoofed = refused(sign_in(&gw, ADMIN.0, ADMIN.1, Some("10.9.9.9")).await).await;
    assert_eq!(
        spoofed, wrong[0],
        "X-Forwarded-For from an untrusted peer escaped the lockout"
    );
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "too slow to test a 1 s window"
    );

    tokio::time::sleep_until((first_done.unwrap() + Duration::from_millis(1200)).into()).await;
    assert_eq!(sign_in(&gw, ADMIN.0, ADMIN.1, None).await.status(), 200);
    still_serves(&gw, &up).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_address_lockout_is_per_address() {
    let up = Counting::start().await;
    let gw = start_lockout(&up, true).await;
    for user in NOBODIES {
        refused(sign_in(&gw, user, "guess", Some("10.2.0.1")).await).await;
    }
    let locked = refused(sign_in(&gw, ADMIN.0, ADMIN.1, Some("10.2.0.1")).await).await;
    assert_eq!(locked["error_description"], "Bad credentials", "{locked}");
    assert_eq!(
        sign_in(&gw, ADMIN.0, ADMIN.1, Some("10.2.0.2"))
            .await
            .status(),
        200,
        "another address is not locked"
    );
    still_serves(&gw, &up).await;
}

/// The smuggling guard holds for every request of a connection: after a `CONNECT` (which
/// the gateway answers 400), after requests asking to switch protocols that are answered
/// without a switch, and after a repeated `Content-Length`; the ambiguous request behind
/// each is refused (the whole request before it is still answered), and the request
/// hidden behind that never reaches the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_smuggling_guard_holds_for_every_request_of_a_connection() {
    let up = Counting::start().await;
    let gw = start(&up, "", "").await;
    let token = gw.alex_token().await;
    let host = format!("127.0.0.1:{}", gw.addr.port());
    let smuggled = format!("GET /api/v1/smuggled HTTP/1.1\r\nHost: {host}\r\n\r\n");
    let ambiguous = format!(
        "{}0\r\n\r\n{smuggled}",
        post_head(
            &gw,
            &token,
            "/api/v1/clte",
            "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n"
        )
    );
    let openers = [
        (
            "CONNECT",
            format!("CONNECT {host} HTTP/1.1\r\nHost: {host}\r\n\r\n"),
            400,
        ),
        (
            "an h2c upgrade, answered without a switch",
            format!(
                "GET /api/v1/upgrade HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n\
                 Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\n"
            ),
            200,
        ),
        (
            "a WebSocket upgrade the upstream refuses",
            format!(
                "GET /api/v1/websocket HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n\
                 Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
                 Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
            ),
            200,
        ),
        (
            "a repeated Content-Length of one value, which hyper reads as one",
            format!(
                "{}hello",
                post_head(
                    &gw,
                    &token,
                    "/api/v1/list",
                    "Content-Length: 5\r\nContent-Length: 5\r\n"
                )
            ),
            200,
        ),
    ];
    for (what, opener, status) in &openers {
        let wire = format!("{opener}{ambiguous}");
        let (received, end) = exchange(&gw, wire.as_bytes()).await;
        let text = String::from_utf8_lossy(&received);
        assert!(end.closed(), "{what}: the connection stayed open: {text}");
        let statuses: Vec<u16> = parse_responses(&received)
            .iter()
            .map(|r| r.status)
            .collect();
        assert_eq!(
            statuses,
            [*status],
            "{what}: the opener is answered and the ambiguous request is not: {text}"
        );
        assert!(
            !up.paths()
                .iter()
                .any(|p| p.contains("smuggled") || p.contains("clte")),
            "{what}: {:?} reached the upstream",
            up.paths()
        );
    }
    still_serves(&gw, &up).await;
}
