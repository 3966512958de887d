//! Edge features of the proxy path: WebSocket pass-through (and refused upgrades that
//! must stay HTTP), `https://` upstreams with `[upstream] ca_file`, `X-Forwarded-For`
//! behind trusted proxies, HSTS, the HTTP→HTTPS redirect listener, configuration reload
//! and certificate replacement on disk. Everything runs against a real gateway over TLS.

mod common;
use common::raw::{client_tls, parse_responses, provider, tls_connect};
use common::*;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use covata_gateway::{Config, Gateway};
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

// ---------------------------------------------------------------------------------
// Helpers

/// What an upstream of this file received: method, path, headers.
#[derive(Clone, Debug)]
struct Seen {
    method: String,
    path: String,
    headers: http::HeaderMap,
}

type Log = Arc<Mutex<Vec<Seen>>>;

fn record<B>(log: &Log, request: &Request<B>) {
    log.lock().unwrap().push(Seen {
        method: request.method().to_string(),
        path: request.uri().path().to_owned(),
        headers: request.headers().clone(),
    });
}

fn header<'a>(seen: &'a Seen, name: &str) -> Vec<&'a str> {
    seen.headers
        .get_all(name)
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect()
}

fn first_der(pem: &str) -> CertificateDer<'static> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .unwrap()
        .unwrap()
}

fn peer_leaf(tls: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    tls.get_ref().1.peer_certificates().expect("a certificate")[0].clone()
}

async fn get_json(client: &reqwest::Client, url: &str, token: &str) -> Value {
    let response = client.get(url).bearer_auth(token).send().await.unwrap();
    assert_eq!(response.status(), 200, "{url}");
    response.json().await.unwrap()
}

/// A server on 127.0.0.1 that hands each connection, with the shared request log, to
/// `serve`; returns its address, the log and the task accepting connections.
async fn logging_server<F, Fut>(serve: F) -> (SocketAddr, Log, Task)
where
    F: Fn(TcpStream, Log) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let log: Log = Arc::default();
    let task_log = log.clone();
    let task = accept_loop(listener, move |stream| serve(stream, task_log.clone()));
    (addr, log, task)
}

/// A hyper HTTP/1.1 upstream that records every request and answers
/// `answer(&request)` = (status, body).
async fn recording_upstream(
    answer: fn(&Request<Incoming>) -> (u16, String),
) -> (SocketAddr, Log, Task) {
    logging_server(move |stream, log| async move {
        let service = service_fn(move |request: Request<Incoming>| {
            record(&log, &request);
            let (status, body) = answer(&request);
            async move {
                // Read the request body fully before answering.
                let _ = request.into_body().collect().await;
                let mut response = Response::new(Full::new(Bytes::from(body)));
                *response.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
                Ok::<_, Infallible>(response)
            }
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(stream), service)
            .await;
    })
    .await
}

// ---------------------------------------------------------------------------------
// 1. WebSocket pass-through

/// A WebSocket upstream that echoes text and binary messages and records each
/// handshake request.
async fn websocket_upstream() -> (SocketAddr, Log, Task) {
    logging_server(|stream, log| async move {
        // The callback's signature is tungstenite's; its error type is large.
        #[allow(clippy::result_large_err)]
        let callback = |request: &tokio_tungstenite::tungstenite::handshake::server::Request,
                        response| {
            record(&log, request);
            Ok(response)
        };
        let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, callback).await else {
            return;
        };
        while let Some(Ok(message)) = ws.next().await {
            if (message.is_text() || message.is_binary()) && ws.send(message).await.is_err() {
                return;
            }
        }
    })
    .await
}

fn websocket_request(
    gw: &TestGateway,
    path: &str,
    token: Option<&str>,
) -> tokio_tungstenite::tungstenite::handshake::client::Request {
    let mut request = format!("wss://127.0.0.1:{}{path}", gw.addr.port())
        .into_client_request()
        .unwrap();
    if let Some(token) = token {
        request
            .headers_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_echo_through_the_gateway_needs_a_token() {
    let (ws_addr, ws_log, _ws_task) = websocket_upstream().await;
    let upstream = Upstream::start().await;
    let route = format!("[[routes]]\npath = \"/api/v1/ws/**\"\nupstream = \"http://{ws_addr}\"\n");
    let text = config_text(upstream.addr, "", &route);
    let gw = TestGateway::start_text(upstream, &text).await;
    let token = gw.alex_token().await;
    let h1 = client_tls(&[&gw.ca_pem], &[b"http/1.1"]);

    // Without a token: 401 from the gateway, no tunnel, the upstream never contacted.
    let tls = tls_connect(gw.addr, h1.clone()).await;
    match tokio_tungstenite::client_async(websocket_request(&gw, "/api/v1/ws/echo", None), tls)
        .await
    {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 401);
            assert!(response.headers().get("upgrade").is_none());
        }
        other => panic!("expected a 401 refusal, got {other:?}"),
    }
    // A bad token: 401 too.
    let tls = tls_connect(gw.addr, h1.clone()).await;
    match tokio_tungstenite::client_async(
        websocket_request(&gw, "/api/v1/ws/echo", Some("not-a-token")),
        tls,
    )
    .await
    {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 401)
        }
        other => panic!("expected a 401 refusal, got {other:?}"),
    }
    assert!(
        ws_log.lock().unwrap().is_empty(),
        "the upstream was reached"
    );

    // With the token: a working tunnel.
    let tls = tls_connect(gw.addr, h1.clone()).await;
    let (mut ws, response) = tokio::time::timeout(
        Duration::from_secs(5),
        tokio_tungstenite::client_async(
            websocket_request(&gw, "/api/v1/ws/echo?room=7", Some(&token)),
            tls,
        ),
    )
    .await
    .expect("the handshake completes")
    .expect("the upgrade succeeds");
    assert_eq!(response.status(), 101);

    let messages = [
        Message::Text("hello through the gateway".into()),
        Message::Binary(pattern(70_000).into()),
        Message::Text("ünïcödé ✓".into()),
        Message::Binary(vec![0u8, 255, 1, 254].into()),
    ];
    for message in &messages {
        ws.send(message.clone()).await.unwrap();
        let echoed = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("an echo in time")
            .expect("the stream is open")
            .unwrap();
        assert_eq!(&echoed, message);
    }
    // Clean close: our Close is answered with a Close and the stream then ends.
    ws.close(None).await.unwrap();
    let mut got_close = false;
    loop {
        match tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("the close completes in time")
        {
            Some(Ok(Message::Close(_))) => got_close = true,
            Some(Ok(other)) => panic!("unexpected message after close: {other:?}"),
            Some(Err(error)) => panic!("the close was not clean: {error}"),
            None => break,
        }
    }
    assert!(
        got_close,
        "the upstream's Close came back through the tunnel"
    );

    let log = ws_log.lock().unwrap().clone();
    assert_eq!(log.len(), 1, "{log:?}");
    let handshake = &log[0];
    assert_eq!(handshake.method, "GET");
    assert_eq!(handshake.path, "/api/v1/ws/echo");
    assert_eq!(header(handshake, "x-authenticated-user"), [ALEX.0]);
    assert_eq!(header(handshake, "x-authenticated-client"), [APP.0]);
    assert!(
        header(handshake, "authorization").is_empty(),
        "{handshake:?}"
    );
    assert!(
        header(handshake, "upgrade")
            .iter()
            .any(|v| v.eq_ignore_ascii_case("websocket")),
        "{handshake:?}"
    );
    gw.stop().await;
}

// ---------------------------------------------------------------------------------
// 2. A refused upgrade stays HTTP (GHSA-xq2h-p299-vjwv)

fn refusing_answer(request: &Request<Incoming>) -> (u16, String) {
    let path = request.uri().path().to_owned();
    if request.headers().contains_key("upgrade") {
        let status = if path.ends_with("/forbidden") {
            403
        } else {
            200
        };
        (status, format!("refused upgrade of {path}"))
    } else {
        (200, format!("plain answer for {path}"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_upgrade_keeps_the_connection_http() {
    let (up_addr, log, _task) = recording_upstream(refusing_answer).await;
    let gw = TestGateway::start_text(Upstream::start().await, &{
        let route =
            format!("[[routes]]\npath = \"/api/v1/ws/**\"\nupstream = \"http://{up_addr}\"\n");
        config_text(up_addr, "", &route)
    })
    .await;
    let token = gw.alex_token().await;
    let host = format!("127.0.0.1:{}", gw.addr.port());

    for (refusal, refused_status) in [("/api/v1/ws/ok", 200), ("/api/v1/ws/forbidden", 403)] {
        log.lock().unwrap().clear();
        let mut tls = tls_connect(gw.addr, client_tls(&[&gw.ca_pem], &[b"http/1.1"])).await;
        // The upgrade request, then (in the same write) a request the gateway must refuse
        // (alex is no admin) and an ordinary one that closes the connection. Were the
        // refused upgrade turned into a tunnel, the admin request would reach the upstream
        // unchecked.
        let wire = format!(
            "GET {refusal} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n\
             Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n\
             GET /api/v1/admin/smuggled HTTP/1.1\r\nHost: {host}\r\n\
             Authorization: Bearer {token}\r\n\r\n\
             GET /api/v1/ws/after HTTP/1.1\r\nHost: {host}\r\n\
             Authorization: Bearer {token}\r\nConnection: close\r\n\r\n"
        );
        tls.write_all(wire.as_bytes()).await.unwrap();
        tls.flush().await.unwrap();
        let mut received = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut received));
        let _ = read.await;
        let text = String::from_utf8_lossy(&received).into_owned();
        let responses = parse_responses(&received);
        assert_eq!(
            responses.iter().map(|r| r.status).collect::<Vec<_>>(),
            [refused_status, 403, 200],
            "{refusal}: three HTTP answers on one connection, got:\n{text}"
        );
        assert_eq!(
            String::from_utf8_lossy(&responses[0].body),
            format!("refused upgrade of {refusal}")
        );
        assert!(responses[0].header("upgrade").is_none(), "{text}");
        assert!(
            String::from_utf8_lossy(&responses[1].body).contains("insufficient_scope"),
            "{text}"
        );
        assert_eq!(
            String::from_utf8_lossy(&responses[2].body),
            "plain answer for /api/v1/ws/after"
        );

        let log = log.lock().unwrap().clone();
        let paths: Vec<&str> = log.iter().map(|s| s.path.as_str()).collect();
        assert_eq!(paths, [refusal, "/api/v1/ws/after"], "{log:?}");
        let after = &log[1];
        assert_eq!(after.method, "GET");
        assert_eq!(header(after, "x-authenticated-user"), [ALEX.0], "{after:?}");
        assert!(header(after, "authorization").is_empty(), "{after:?}");
        assert!(header(after, "upgrade").is_empty(), "{after:?}");
    }
    gw.stop().await;
}

// ---------------------------------------------------------------------------------
// 3. https upstreams

/// A TLS upstream (hyper over tokio-rustls) with a certificate for 127.0.0.1; returns its
/// address, its CA PEM, the request log.
async fn tls_upstream() -> (SocketAddr, String, Log, Task) {
    let generated =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .unwrap();
    let cert_pem = generated.cert.pem();
    let key = PrivateKeyDer::from_pem_slice(generated.key_pair.serialize_pem().as_bytes()).unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![first_der(&cert_pem)], key)
        .unwrap();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let (addr, log, task) = logging_server(move |stream, log| {
        let acceptor = acceptor.clone();
        async move {
            let Ok(tls) = acceptor.accept(stream).await else {
                return;
            };
            let service = service_fn(move |request: Request<Incoming>| {
                record(&log, &request);
                let body = format!("secure answer for {}", request.uri().path());
                async move { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body)))) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), service)
                .await;
        }
    })
    .await;
    (addr, cert_pem, log, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_upstreams_are_verified_against_ca_file() {
    let (up_addr, up_pem, log, _task) = tls_upstream().await;
    let files = tempfile::tempdir().unwrap();
    let right_ca = files.path().join("upstream-ca.pem");
    std::fs::write(&right_ca, &up_pem).unwrap();
    let wrong_ca = files.path().join("other-ca.pem");
    let other = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
    std::fs::write(&wrong_ca, other.cert.pem()).unwrap();
    let route =
        format!("[[routes]]\npath = \"/api/v1/secure/**\"\nupstream = \"https://{up_addr}\"\n");

    let upstream = Upstream::start().await;
    let before = format!("[upstream]\nca_file = \"{}\"\n", right_ca.display());
    let text = config_text(upstream.addr, &before, &route);
    let gw = TestGateway::start_text(upstream, &text).await;
    let token = gw.alex_token().await;
    for client in [&gw.http1, &gw.http2] {
        let response = gw
            .bearer_get(client, "/api/v1/secure/things/1", &token)
            .await;
        assert_eq!(response.status(), 200);
        assert_eq!(
            response.text().await.unwrap(),
            "secure answer for /api/v1/secure/things/1"
        );
    }
    {
        let log = log.lock().unwrap();
        assert_eq!(log.len(), 2, "{log:?}");
        for seen in log.iter() {
            assert_eq!(seen.path, "/api/v1/secure/things/1");
            assert_eq!(header(seen, "x-authenticated-user"), [ALEX.0]);
            assert_eq!(header(seen, "x-forwarded-proto"), ["https"]);
        }
    }
    gw.stop().await;

    // A gateway that trusts a different CA refuses to talk to this upstream.
    let upstream = Upstream::start().await;
    let before = format!("[upstream]\nca_file = \"{}\"\n", wrong_ca.display());
    let text = config_text(upstream.addr, &before, &route);
    let gw = TestGateway::start_text(upstream, &text).await;
    let token = gw.alex_token().await;
    let response = gw
        .bearer_get(&gw.http1, "/api/v1/secure/things/2", &token)
        .await;
    expect_error(response, 502, "bad_gateway").await;
    assert_eq!(log.lock().unwrap().len(), 2, "no request got through");
    gw.stop().await;
}

// ---------------------------------------------------------------------------------
// 4. X-Forwarded-For

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x_forwarded_for_is_extended_only_for_trusted_proxies() {
    for (trusted, expected) in [(true, "203.0.113.9, 127.0.0.1"), (false, "127.0.0.1")] {
        let upstream = Upstream::start().await;
        let mut text = config_text(upstream.addr, "", "");
        if trusted {
            text = with_server_keys(&text, "trusted_proxies = [\"127.0.0.0/8\"]");
        }
        let gw = TestGateway::start_text(upstream, &text).await;
        let token = gw.alex_token().await;
        for client in [&gw.http1, &gw.http2] {
            let response = client
                .get(gw.url("/api/v1/objects/1"))
                .bearer_auth(&token)
                .header("x-forwarded-for", "203.0.113.9")
                .send()
                .await
                .unwrap();
            let seen = json_ok(response).await;
            assert_eq!(
                received(&seen, "x-forwarded-for"),
                [expected],
                "trusted={trusted}"
            );
        }
        gw.stop().await;
    }
}

// ---------------------------------------------------------------------------------
// 5. HSTS

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hsts_is_on_every_response_only_when_configured() {
    for hsts in [Some("max-age=31536000"), None] {
        let upstream = Upstream::start().await;
        let mut text = config_text(upstream.addr, "", "");
        if let Some(value) = hsts {
            text = with_server_keys(&text, &format!("hsts = \"{value}\""));
        }
        let gw = TestGateway::start_text(upstream, &text).await;
        let grant = gw.token_request(Some(APP), &password_form(ALEX, &[])).await;
        let mut responses = vec![("token endpoint", 200, grant.headers().clone())];
        let token = grant.json::<Value>().await.unwrap()["access_token"]
            .as_str()
            .unwrap()
            .to_owned();
        for client in [&gw.http1, &gw.http2] {
            let proxied = gw.bearer_get(client, "/api/v1/objects/1", &token).await;
            responses.push((
                "proxied",
                proxied.status().as_u16(),
                proxied.headers().clone(),
            ));
            let missing = client.get(gw.url("/no/such/route")).send().await.unwrap();
            responses.push((
                "no route",
                missing.status().as_u16(),
                missing.headers().clone(),
            ));
            let unauthorised = client
                .get(gw.url("/api/v1/objects/1"))
                .send()
                .await
                .unwrap();
            responses.push((
                "no token",
                unauthorised.status().as_u16(),
                unauthorised.headers().clone(),
            ));
        }
        let bad_client = gw
            .token_request(
                Some((APP.0, "wrong")),
                &[("grant_type", "client_credentials")],
            )
            .await;
        responses.push((
            "bad client",
            bad_client.status().as_u16(),
            bad_client.headers().clone(),
        ));
        let expected_statuses = [200, 200, 404, 401, 200, 404, 401, 401];
        for ((what, status, headers), expected_status) in responses.iter().zip(expected_statuses) {
            assert_eq!(*status, expected_status, "{what}");
            let values: Vec<_> = headers
                .get_all("strict-transport-security")
                .iter()
                .map(|v| v.to_str().unwrap())
                .collect();
            match hsts {
                Some(value) => assert_eq!(values, [value], "{what} ({status})"),
                None => assert!(values.is_empty(), "{what} ({status}): {values:?}"),
            }
        }
        gw.stop().await;
    }
}

// ---------------------------------------------------------------------------------
// 6. The HTTP→HTTPS redirect listener

/// A plain-HTTP/1.1 request to `addr`; returns status, Location and body.
async fn plain_request(
    addr: SocketAddr,
    method: &str,
    target: &str,
    host: Option<&str>,
    body: &'static str,
) -> (u16, Option<String>, Bytes) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(connection);
    let mut request = Request::builder().method(method).uri(target);
    if let Some(host) = host {
        request = request.header("host", host);
    }
    if !body.is_empty() {
        request = request.header("content-type", "application/x-www-form-urlencoded");
    }
    let request = request
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let status = response.status().as_u16();
    let location = response
        .headers()
        .get("location")
        .map(|v| v.to_str().unwrap().to_owned());
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, location, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redirect_listener_sends_everything_to_https() {
    let (up_addr, log, _task) = recording_upstream(|_| (200, "upstream".into())).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_pem = write_certificate(dir.path(), "gateway.crt", "gateway.key");
    let path = dir.path().join("config.toml");
    std::fs::write(&path, config_text(up_addr, "", "")).unwrap();
    let gateway = Gateway::new(Config::load(&path).unwrap()).unwrap();
    let tls = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let redirect = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (tls_addr, plain_addr) = (tls.local_addr().unwrap(), redirect.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = gateway.clone();
    let server = tokio::spawn(async move {
        let listeners = covata_gateway::server::Listeners {
            tls,
            admin: None,
            redirect: Some(redirect),
        };
        serving
            .serve_all(listeners, async move {
                let _ = stopped.await;
            })
            .await;
    });
    let _server = Task(server);
    let port = tls_addr.port();

    let (status, location, body) =
        plain_request(plain_addr, "GET", "/api/v1/x?y=1", Some("example.com"), "").await;
    assert_eq!(status, 308);
    assert_eq!(
        location.as_deref(),
        Some(format!("https://example.com:{port}/api/v1/x?y=1").as_str())
    );
    assert!(body.is_empty(), "{body:?}");

    // The port the client named is replaced by the HTTPS one.
    let (status, location, _) =
        plain_request(plain_addr, "GET", "/", Some("example.com:80"), "").await;
    assert_eq!(status, 308);
    assert_eq!(
        location.as_deref(),
        Some(format!("https://example.com:{port}/").as_str())
    );

    // A POST to the token endpoint is redirected too (308 keeps the method), never
    // answered over plain HTTP.
    let form = "grant_type=password&username=alex%40example.com&password=alex-password";
    let (status, location, body) = plain_request(
        plain_addr,
        "POST",
        "/api/oauth/token",
        Some("example.com"),
        form,
    )
    .await;
    assert_eq!(status, 308);
    assert_eq!(
        location.as_deref(),
        Some(format!("https://example.com:{port}/api/oauth/token").as_str())
    );
    assert!(!String::from_utf8_lossy(&body).contains("access_token"));

    // The admin paths are not served there either.
    let (status, _, body) =
        plain_request(plain_addr, "GET", "/healthz", Some("example.com"), "").await;
    assert_eq!(status, 308);
    assert!(body.is_empty());
    assert!(
        log.lock().unwrap().is_empty(),
        "nothing reached the upstream"
    );

    // And the HTTPS listener it points to does serve the gateway.
    let (http1, _) = clients(&ca_pem);
    let response = http1
        .post(format!("https://127.0.0.1:{port}/api/oauth/token"))
        .basic_auth(APP.0, Some(APP.1))
        .form(&password_form(ALEX, &[]))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    let _ = stop.send(());
}

// ---------------------------------------------------------------------------------
// 7. Reload

const CAROL: (&str, &str) = ("carol@example.com", "carol-password");

fn carol_block() -> String {
    format!(
        "[[users]]\nusername = \"{}\"\npassword = \"{}\"\nroles = [\"ROLE_COLLABORATOR\"]\n",
        CAROL.0,
        password_hash(CAROL.1)
    )
}

async fn sign_in_status(gw: &TestGateway, user: (&str, &str)) -> u16 {
    gw.token_request(Some(APP), &password_form(user, &[]))
        .await
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_adds_users_and_keeps_tokens() {
    let gw = TestGateway::start().await;
    let token = gw.alex_token().await;
    assert_eq!(
        sign_in_status(&gw, CAROL).await,
        400,
        "carol is not known yet"
    );

    let new_path = gw.dir.path().join("reloaded.toml");
    std::fs::write(&new_path, config_text(gw.upstream.addr, &carol_block(), "")).unwrap();
    gw.gateway.reload(Config::load(&new_path).unwrap()).unwrap();

    assert_eq!(sign_in_status(&gw, CAROL).await, 200, "carol signs in");
    let carol: Value = gw.password_grant(APP, CAROL).await;
    let carol_token = carol["access_token"].as_str().unwrap();
    let seen = get_json(&gw.http2, &gw.url("/api/v1/objects/1"), carol_token).await;
    assert_eq!(received(&seen, "x-authenticated-user"), [CAROL.0]);
    for client in [&gw.http1, &gw.http2] {
        let seen = get_json(client, &gw.url("/api/v1/objects/1"), &token).await;
        assert_eq!(received(&seen, "x-authenticated-user"), [ALEX.0]);
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_config_is_refused_and_the_old_one_keeps_serving() {
    let gw = TestGateway::start().await;
    let token = gw.alex_token().await;

    // An unknown key: the file does not load at all.
    let unknown = gw.dir.path().join("unknown-key.toml");
    let text = with_server_keys(&config_text(gw.upstream.addr, "", ""), "bogus_key = 1");
    std::fs::write(&unknown, text).unwrap();
    let error = Config::load(&unknown).expect_err("an unknown key is an error");
    assert!(error.to_string().contains("bogus_key"), "{error}");

    // It parses, but the certificate it names does not exist: reload refuses it whole
    // (carol, whom it adds, does not appear).
    let missing = gw.dir.path().join("missing-cert.toml");
    let text = config_text(gw.upstream.addr, &carol_block(), "")
        .replace("tls_cert = \"gateway.crt\"", "tls_cert = \"missing.crt\"");
    std::fs::write(&missing, text).unwrap();
    let config = Config::load(&missing).expect("the text itself is valid");
    let error = gw
        .gateway
        .reload(config)
        .expect_err("a missing certificate fails the reload");
    assert!(error.to_string().contains("tls_cert"), "{error}");

    assert_eq!(sign_in_status(&gw, CAROL).await, 400, "the old users stay");
    assert_eq!(sign_in_status(&gw, ALEX).await, 200);
    for client in [&gw.http1, &gw.http2] {
        let seen = get_json(client, &gw.url("/api/v1/objects/1"), &token).await;
        assert_eq!(received(&seen, "x-authenticated-user"), [ALEX.0]);
    }
    // New connections still get the old certificate.
    let tls = tls_connect(gw.addr, client_tls(&[&gw.ca_pem], &[b"http/1.1"])).await;
    assert_eq!(peer_leaf(&tls), first_der(&gw.ca_pem));
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_replaced_on_disk_is_used_for_new_connections() {
    let upstream = Upstream::start().await;
    let text = with_server_keys(
        &config_text(upstream.addr, "", ""),
        "cert_poll_interval = \"200ms\"",
    );
    let gw = TestGateway::start_text(upstream, &text).await;
    let token = gw.alex_token().await;
    let old_der = first_der(&gw.ca_pem);

    // An HTTP/2 connection opened before the swap.
    let tls = tls_connect(gw.addr, client_tls(&[&gw.ca_pem], &[b"h2"])).await;
    assert_eq!(peer_leaf(&tls), old_der);
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut h2, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(connection);
    let h2_get = |path: &str| {
        Request::get(format!("https://127.0.0.1:{}{path}", gw.addr.port()))
            .header("authorization", format!("Bearer {token}"))
            .body(Empty::<Bytes>::new())
            .unwrap()
    };
    let response = h2.send_request(h2_get("/api/v1/before")).await.unwrap();
    assert_eq!(response.status(), 200);

    // Replace the pair on disk (a different key, a different CA).
    let new_pem = write_certificate(gw.dir.path(), "gateway.crt", "gateway.key");
    let new_der = first_der(&new_pem);
    assert_ne!(new_der, old_der);
    let both = client_tls(&[&gw.ca_pem, &new_pem], &[b"http/1.1"]);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let tls = tls_connect(gw.addr, both.clone()).await;
        if peer_leaf(&tls) == new_der {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "new connections still get the old certificate"
        );
    }
    // Stable: every further new connection gets the new one.
    for _ in 0..3 {
        let tls = tls_connect(gw.addr, both.clone()).await;
        assert_eq!(peer_leaf(&tls), new_der);
    }

    // A client that trusts only the new CA, with the token issued before the swap.
    let (new_http1, new_http2) = clients(&new_pem);
    for client in [&new_http1, &new_http2] {
        let seen = get_json(client, &gw.url("/api/v1/after"), &token).await;
        assert_eq!(received(&seen, "x-authenticated-user"), [ALEX.0]);
    }
    // The HTTP/2 connection from before the swap carries on.
    h2.ready().await.expect("the old connection is still open");
    let response = h2.send_request(h2_get("/api/v1/still-open")).await.unwrap();
    assert_eq!(response.status(), 200);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let seen: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(seen["path"], "/api/v1/still-open");
    assert_eq!(received(&seen, "x-authenticated-user"), [ALEX.0]);
    gw.stop().await;
}
