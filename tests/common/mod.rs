//! Test harness: the real gateway on `127.0.0.1:0` with a certificate made at test time,
//! a real upstream (a small hyper server), and real HTTPS clients (reqwest over rustls).
//!
//! Each file in `tests/` is its own crate and uses only part of this module, hence the
//! `allow(dead_code)`, which also covers the submodules.
#![allow(dead_code)]

pub mod process;
pub mod raw;
pub mod wire;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use covata_gateway::credentials::{hash_password_with, TEST_PARAMS};
use covata_gateway::{Config, Gateway};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use reqwest::header::HeaderMap;
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};

pub const ALEX: (&str, &str) = ("alex@example.com", "alex-password");
pub const ADMIN: (&str, &str) = ("admin@example.com", "admin-password");
/// password + refresh_token + client_credentials; scopes read, write.
pub const APP: (&str, &str) = ("app", "app-secret");
/// password only: no refresh tokens.
pub const NOREFRESH: (&str, &str) = ("norefresh", "norefresh-secret");
/// password + refresh_token with 1-second lifetimes.
pub const SHORT: (&str, &str) = ("short", "short-secret");
/// client_credentials only.
pub const SERVICE: (&str, &str) = ("service", "service-secret");

/// Body size used to return `n` bytes: `GET /api/v1/bytes/{n}` on the upstream.
pub fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8).collect()
}

/// A task aborted on drop, so a failed test leaves no server behind.
pub struct Task(pub tokio::task::JoinHandle<()>);

impl Drop for Task {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Accepts connections on `listener` until the returned task is dropped, each one
/// handled by `serve` on a task of its own.
pub fn accept_loop<F, Fut>(listener: TcpListener, serve: F) -> Task
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    Task(tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(serve(stream));
        }
    }))
}

/// A real upstream: `/.../echo` streams the request body back; `/.../bytes/{n}` answers
/// `n` patterned bytes; `/.../slow/{ms}` waits first; anything else answers JSON with
/// what it received (method, path, query, headers).
pub struct Upstream {
    pub addr: SocketAddr,
    _task: Task,
}

async fn upstream_answer(
    request: Request<Incoming>,
) -> Response<http_body_util::Either<Full<Bytes>, Incoming>> {
    use http_body_util::Either;
    let path = request.uri().path().to_owned();
    let segments: Vec<&str> = path.split('/').collect();
    let after = |name: &str| {
        segments
            .iter()
            .position(|s| *s == name)
            .and_then(|i| segments.get(i + 1))
            .and_then(|v| v.parse::<u64>().ok())
    };
    if let Some(ms) = after("slow") {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if segments.contains(&"echo") {
        return Response::new(Either::Right(request.into_body()));
    }
    if let Some(n) = after("bytes") {
        return Response::new(Either::Left(Full::new(Bytes::from(pattern(n as usize)))));
    }
    let mut headers = serde_json::Map::new();
    for (name, value) in request.headers() {
        let entry = headers
            .entry(name.as_str().to_owned())
            .or_insert_with(|| Value::Array(vec![]));
        if let Value::Array(list) = entry {
            list.push(Value::String(
                value.to_str().unwrap_or("<binary>").to_owned(),
            ));
        }
    }
    let seen = serde_json::json!({
        "method": request.method().as_str(),
        "path": request.uri().path(),
        "query": request.uri().query(),
        "version": format!("{:?}", request.version()),
        "headers": headers,
    });
    let mut response = Response::new(Either::Left(Full::new(Bytes::from(seen.to_string()))));
    response
        .headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    response
}

impl Upstream {
    pub async fn start() -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = accept_loop(listener, |stream| async move {
            let service =
                service_fn(|r| async move { Ok::<_, Infallible>(upstream_answer(r).await) });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
        Upstream { addr, _task: task }
    }
}

/// A certificate for 127.0.0.1/localhost, written into `dir`; returns the CA PEM.
pub fn write_certificate(dir: &std::path::Path, cert: &str, key: &str) -> String {
    let generated =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .unwrap();
    let pem = generated.cert.pem();
    std::fs::write(dir.join(cert), &pem).unwrap();
    std::fs::write(dir.join(key), generated.key_pair.serialize_pem()).unwrap();
    pem
}

/// A PHC hash of `secret` with the fast test parameters, for `[[users]]` and `[[clients]]`.
pub fn password_hash(secret: &str) -> String {
    hash_password_with(secret, TEST_PARAMS).unwrap()
}

/// The standard test configuration; `upstream` is where `/api/v1/**` goes and `extra`
/// is appended (more routes, sections) verbatim.
pub fn config_text(upstream: SocketAddr, extra_before_routes: &str, extra: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
tls_cert = "gateway.crt"
tls_key = "gateway.key"
shutdown_grace = "5s"

[admin]
listen = "127.0.0.1:0"

[security]
max_failed_logins = 1000
lockout_window = "1m"

{extra_before_routes}

[[clients]]
client_id = "{app}"
client_secret = "{app_hash}"
authorized_grant_types = ["password", "refresh_token", "client_credentials"]
scopes = ["read", "write"]
access_token_validity_seconds = 3600
refresh_token_validity_seconds = 86400

[[clients]]
client_id = "{noref}"
client_secret = "{noref_hash}"
authorized_grant_types = ["password"]

[[clients]]
client_id = "{short}"
client_secret = "{short_hash}"
authorized_grant_types = ["password", "refresh_token"]
access_token_validity_seconds = 1
refresh_token_validity_seconds = 1

[[clients]]
client_id = "{service}"
client_secret = "{service_hash}"
authorized_grant_types = ["client_credentials"]

[[users]]
username = "{alex}"
password = "{alex_hash}"
roles = ["ROLE_COLLABORATOR", "ROLE_ORIGINATOR"]

[[users]]
username = "{admin}"
password = "{admin_hash}"
roles = ["ROLE_SYSTEM_ADMIN"]

[[routes]]
path = "/api/v1/config"
methods = ["GET"]
upstream = "http://{upstream}"
public = true

[[routes]]
path = "/api/v1/admin/**"
upstream = "http://{upstream}"
roles = ["ROLE_SYSTEM_ADMIN", "ROLE_USER_ADMIN"]

[[routes]]
path = "/api/v1/scoped/**"
upstream = "http://{upstream}"
scopes = ["write"]

[[routes]]
path = "/api/v1/forward/**"
upstream = "http://{upstream}"
forward_authorization = true

{extra}

[[routes]]
path = "/api/v1/**"
upstream = "http://{upstream}"
"#,
        app = APP.0,
        app_hash = password_hash(APP.1),
        noref = NOREFRESH.0,
        noref_hash = password_hash(NOREFRESH.1),
        short = SHORT.0,
        short_hash = password_hash(SHORT.1),
        service = SERVICE.0,
        service_hash = password_hash(SERVICE.1),
        alex = ALEX.0,
        alex_hash = password_hash(ALEX.1),
        admin = ADMIN.0,
        admin_hash = password_hash(ADMIN.1),
    )
}

/// Adds lines to the `[server]` table of the standard configuration text.
pub fn with_server_keys(text: &str, lines: &str) -> String {
    let anchor = "shutdown_grace = \"5s\"";
    assert!(text.contains(anchor));
    text.replacen(anchor, &format!("{anchor}\n{lines}"), 1)
}

/// The password-grant form for `user`, plus `extra` parameters.
pub fn password_form<'a>(
    user: (&'a str, &'a str),
    extra: &[(&'a str, &'a str)],
) -> Vec<(&'a str, &'a str)> {
    let mut form = vec![
        ("grant_type", "password"),
        ("username", user.0),
        ("password", user.1),
    ];
    form.extend_from_slice(extra);
    form
}

/// A running gateway and clients that trust its certificate.
pub struct TestGateway {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub gateway: Gateway,
    /// HTTP/1.1 only.
    pub http1: reqwest::Client,
    /// HTTP/2 (negotiated by ALPN).
    pub http2: reqwest::Client,
    pub ca_pem: String,
    pub dir: tempfile::TempDir,
    pub upstream: Upstream,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

pub fn clients(ca_pem: &str) -> (reqwest::Client, reqwest::Client) {
    let build = |h2: bool| {
        let builder = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap())
            .timeout(Duration::from_secs(30));
        let builder = if h2 {
            builder.http2_prior_knowledge()
        } else {
            builder.http1_only()
        };
        builder.build().unwrap()
    };
    (build(false), build(true))
}

impl TestGateway {
    /// The standard configuration with a fresh upstream.
    pub async fn start() -> TestGateway {
        TestGateway::start_with("", "").await
    }

    /// The standard configuration plus extra TOML.
    pub async fn start_with(extra_before_routes: &str, extra: &str) -> TestGateway {
        let upstream = Upstream::start().await;
        let text = config_text(upstream.addr, extra_before_routes, extra);
        TestGateway::start_text(upstream, &text).await
    }

    /// A gateway on exactly this configuration text.
    pub async fn start_text(upstream: Upstream, text: &str) -> TestGateway {
        let dir = tempfile::tempdir().unwrap();
        let ca_pem = write_certificate(dir.path(), "gateway.crt", "gateway.key");
        let path: PathBuf = dir.path().join("config.toml");
        std::fs::write(&path, text).unwrap();
        let config = Config::load(&path).unwrap();
        let gateway = Gateway::new(config).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let admin_addr = admin.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let serving = gateway.clone();
        let task = tokio::spawn(async move {
            serving
                .serve(listener, Some(admin), async move {
                    let _ = rx.await;
                })
                .await;
        });
        let (http1, http2) = clients(&ca_pem);
        TestGateway {
            addr,
            admin: admin_addr,
            gateway,
            http1,
            http2,
            ca_pem,
            dir,
            upstream,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{}", self.addr.port(), path)
    }

    /// POST /api/oauth/token with Basic client credentials (if any) and a form.
    pub async fn token_request(
        &self,
        basic: Option<(&str, &str)>,
        form: &[(&str, &str)],
    ) -> reqwest::Response {
        let mut request = self.http1.post(self.url("/api/oauth/token")).form(form);
        if let Some((id, secret)) = basic {
            request = request.basic_auth(id, Some(secret));
        }
        request.send().await.unwrap()
    }

    /// A password grant that must succeed; returns the JSON body.
    pub async fn password_grant(&self, client: (&str, &str), user: (&str, &str)) -> Value {
        let response = self
            .token_request(Some(client), &password_form(user, &[]))
            .await;
        assert_eq!(response.status(), 200, "password grant failed");
        response.json().await.unwrap()
    }

    /// A password grant through `APP` asking for `scope`; returns the access token.
    pub async fn token_with_scope(&self, user: (&str, &str), scope: &str) -> String {
        let response = self
            .token_request(Some(APP), &password_form(user, &[("scope", scope)]))
            .await;
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["scope"], scope, "{body}");
        body["access_token"].as_str().unwrap().to_owned()
    }

    /// `GET path` through `client` with a bearer token.
    pub async fn bearer_get(
        &self,
        client: &reqwest::Client,
        path: &str,
        token: &str,
    ) -> reqwest::Response {
        client
            .get(self.url(path))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
    }

    /// An access token for alex through the `app` client.
    pub async fn alex_token(&self) -> String {
        self.access_token(ALEX).await
    }

    /// An access token for `user` through the `app` client.
    pub async fn access_token(&self, user: (&str, &str)) -> String {
        self.password_grant(APP, user).await["access_token"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// Stops the gateway (as SIGTERM would) and waits for the drain to finish.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .expect("the gateway drained in time")
                .unwrap();
        }
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// Asserts a 200 answer and returns its JSON body.
pub async fn json_ok(response: reqwest::Response) -> Value {
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

/// Asserts an OAuth-style JSON error and returns the body.
pub async fn expect_error(response: reqwest::Response, status: u16, code: &str) -> Value {
    assert_eq!(response.status(), status, "status for {code}");
    assert_eq!(
        response
            .headers()
            .get("cache-control")
            .map(|v| v.to_str().unwrap()),
        Some("no-store")
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], code, "{body}");
    assert!(
        body["error_description"]
            .as_str()
            .is_some_and(|d| !d.is_empty()),
        "{body}"
    );
    body
}

/// A streaming request body of `n` patterned bytes in 64 KiB chunks.
pub fn streamed_body(n: usize) -> reqwest::Body {
    chunked_body(n, 64 * 1024)
}

/// A streamed (chunked) body of `n` patterned bytes in `chunk`-byte pieces.
pub fn chunked_body(n: usize, chunk: usize) -> reqwest::Body {
    let data = pattern(n);
    let chunks: Vec<Result<Bytes, std::io::Error>> = data
        .chunks(chunk)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    reqwest::Body::wrap_stream(futures_util::stream::iter(chunks))
}

/// The value of header `name`, if present (and text).
pub fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).map(|v| v.to_str().unwrap())
}

/// The `WWW-Authenticate` value, empty when absent.
pub fn challenge(headers: &HeaderMap) -> String {
    headers
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

/// Every value of header `name` the standard upstream received, from its JSON answer
/// (empty when absent).
pub fn received<'a>(seen: &'a Value, name: &str) -> Vec<&'a str> {
    seen["headers"][name]
        .as_array()
        .map(|values| values.iter().map(|v| v.as_str().unwrap()).collect())
        .unwrap_or_default()
}

/// The PKCE S256 code challenge for `verifier` (RFC 7636 §4.2).
pub fn pkce_challenge(verifier: &str) -> String {
    use base64::Engine;
    use sha2::Digest;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(sha2::Sha256::digest(verifier.as_bytes()))
}
