//! Path confusion against real upstream frameworks: whatever path the gateway lets
//! through on a route must name, in the upstream, the resource that route is about.
//!
//! A real Flask app (werkzeug's own server) and a real Express 4 app (its defaults:
//! case-insensitive, non-strict routing), both from `tests/apps/`, run as child processes
//! on 127.0.0.1. Each has a public handler (`/public/...` answers `PUBLIC:...`), an admin
//! handler (`/admin` and `/admin/...` answer `ADMIN-SECRET:...`) and a catch-all (404
//! `OTHER:...`). The gateway in front of them lets `/admin/**` through only for
//! `ROLE_SYSTEM_ADMIN` and `/public/**` for anyone; in front of Express the admin routes
//! also say `case_sensitive = false`, since Express matches paths without regard to case.
//!
//! A battery of tricky request targets (encoded slashes and dots, double encoding, `;`
//! parameters, backslashes, `//`, case, trailing characters, overlong UTF-8, NUL,
//! absolute-form targets, queries and fragments, rewrite headers) goes, without a token,
//! over a raw TLS connection, so the bytes reach the gateway exactly as written. For every
//! one of them the body must never hold `ADMIN-SECRET`, and the status must be 400, 401,
//! 403 or 404, or a 2xx answered by the public handler. The same battery sent straight to
//! each app (no gateway) must reach the admin handler through at least one path other
//! than the plain `/admin` ones, so the battery means something for that framework; and an admin token must reach the admin handler through
//! the gateway, so nothing passes because nothing gets through at all.
//!
//! Each battery runs against three route tables: the two routes above; the same two
//! followed by a public catch-all `/**` (the usual "everything else is public" setup, in
//! which a path the gateway does not take for an admin path goes to the app unchecked);
//! and exact admin patterns `/admin` and `/admin/*` before the same public routes (where
//! a trailing slash decides whether a path is the admin resource).
//!
//! Needs python3 with flask and node with `tests/apps/node_modules` (`.ci/run` installs
//! both when they are missing); without them the tests fail, saying what is missing.

mod common;

use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use common::raw::{client_tls, tls_connect};
use common::wire::{decode_chunked, find};
use common::{config_text, TestGateway, Upstream, ADMIN};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long an app may take to print its port.
const APP_START: Duration = Duration::from_secs(20);
/// How long one request may take, connection to last byte.
const EXCHANGE: Duration = Duration::from_secs(10);

/// What only the admin handlers answer.
const SECRET: &str = "ADMIN-SECRET";

// ---------------------------------------------------------------------------------------
// The battery

/// One tricky request: its target, exactly as it goes on the request line, and extra
/// header lines (each ending in CRLF).
struct Probe {
    target: &'static [u8],
    headers: &'static str,
}

const fn p(target: &'static [u8]) -> Probe {
    Probe {
        target,
        headers: "",
    }
}

const fn ph(target: &'static [u8], headers: &'static str) -> Probe {
    Probe { target, headers }
}

/// Every request goes without a token. Sources: RFC 3986 §5.2.4 and §6; Orange Tsai,
/// "Breaking Parser Logic" (Black Hat USA 2018: `..;/`, `%2f`, `//` and `\` between a
/// proxy and its backend); Envoy's path normalisation options (`normalize_path`,
/// `merge_slashes`, `path_with_escaped_slashes_action`, `%2E`/`%5C`); the trailing
/// characters that Python's request-line split and Express's case folding drop or ignore.
const BATTERY: &[Probe] = &[
    // Plain references: a public path and an admin path.
    p(b"/public/x"),
    p(b"/admin/x"),
    p(b"/admin"),
    // Encoded slash, in either case, alone and with encoded dots.
    p(b"/public/..%2fadmin/secret"),
    p(b"/public/..%2Fadmin/secret"),
    p(b"/public/%2e%2e%2fadmin/secret"),
    p(b"/public/%2E%2E%2Fadmin/secret"),
    p(b"/public/x/..%2f..%2fadmin/secret"),
    p(b"/public%2f..%2fadmin/secret"),
    p(b"/public%2Fsecret"),
    p(b"/admin%2fsecret"),
    p(b"/admin%2Fsecret"),
    p(b"/admin%2f"),
    p(b"/%2fadmin/secret"),
    p(b"/%2Fadmin"),
    p(b"/%61dmin%2fsecret"),
    p(b"%2fadmin/secret"),
    // Encoded backslash.
    p(b"/public/..%5cadmin/secret"),
    p(b"/public/..%5Cadmin/secret"),
    p(b"/public/%5c..%5cadmin/secret"),
    p(b"/admin%5csecret"),
    // Dot segments, raw.
    p(b"/public/../admin/secret"),
    p(b"/public/./../admin/secret"),
    p(b"/public/x/../../admin/secret"),
    p(b"/./admin/secret"),
    p(b"/public/.."),
    p(b"/admin/."),
    // Dot segments, encoded in every mix.
    p(b"/public/%2e%2e/admin/secret"),
    p(b"/public/%2E%2E/admin/secret"),
    p(b"/public/.%2e/admin/secret"),
    p(b"/public/%2e./admin/secret"),
    p(b"/public/.%2E/admin/secret"),
    p(b"/public/%2e/../admin/secret"),
    p(b"/%2e/admin/secret"),
    p(b"/public/%2e%2e%5cadmin/secret"),
    // Double and nested encoding.
    p(b"/public/%252e%252e%252fadmin/secret"),
    p(b"/public/..%252fadmin/secret"),
    p(b"/admin%252fsecret"),
    p(b"/public/%25%32%65%25%32%65%25%32%66admin/secret"),
    p(b"/public/%%32%65%%32%65/admin/secret"),
    // `;` path parameters.
    p(b"/public/..;/admin/secret"),
    p(b"/public;/../admin/secret"),
    p(b"/public/x;/../../admin/secret"),
    p(b"/admin;/secret"),
    p(b"/admin;jsessionid=x/secret"),
    p(b"/public/..%3b/admin/secret"),
    p(b"/public/..%3B/admin/secret"),
    // Backslashes, raw.
    p(b"/public/..\\admin\\secret"),
    p(b"/public\\..\\admin\\secret"),
    p(b"/admin\\secret"),
    // Repeated slashes.
    p(b"//admin/secret"),
    p(b"///admin/secret"),
    p(b"/admin//secret"),
    p(b"/public//../admin/secret"),
    p(b"/public/x//..//..//admin/secret"),
    // Case.
    p(b"/ADMIN/secret"),
    p(b"/Admin/secret"),
    p(b"/aDmIn/secret"),
    p(b"/ADMIN"),
    p(b"/Admin/"),
    p(b"/%41DMIN/secret"),
    p(b"/%41dmin/secret"),
    p(b"/%61dmin/secret"),
    p(b"/adm%69n/secret"),
    // Trailing slash, dot, space and other characters a router may drop.
    p(b"/admin/"),
    p(b"/admin//"),
    p(b"/admin/secret/"),
    p(b"/Admin/secret/"),
    p(b"/admin."),
    p(b"/admin./secret"),
    p(b"/admin.."),
    p(b"/admin%2e"),
    p(b"/admin~"),
    p(b"/admin%20"),
    p(b"/admin%20/secret"),
    p(b"/admin%09"),
    p(b"/admin%0a"),
    p(b"/admin%0d"),
    p(b"/admin%0b"),
    p(b"/admin%0c"),
    p(b"/admin%1c"),
    p(b"/admin%1f"),
    p(b"/admin%85"),
    p(b"/admin%a0"),
    p(b"/admin%e2%80%a8"),
    p(b"/admin\x85"),
    p(b"/admin\xa0"),
    p(b"/admin\x0b"),
    p(b"/admin\x0c"),
    p(b"/admin\x1c"),
    p(b"/admin\x1f"),
    p(b"/admin\t"),
    p(b"/public/x /admin/secret"),
    // Overlong and look-alike UTF-8.
    p(b"/public/%c0%ae%c0%ae%c0%afadmin/secret"),
    p(b"/public/%c0%ae%c0%ae/admin/secret"),
    p(b"/public/..%c0%afadmin/secret"),
    p(b"/public/..%c1%9cadmin/secret"),
    p(b"/public/%e0%80%ae%e0%80%ae/admin/secret"),
    p(b"/public/..%ef%bc%8fadmin/secret"),
    p(b"/public/%e2%80%a5%2fadmin/secret"),
    p(b"/%ef%bd%81dmin/secret"),
    p(b"/public/%u002e%u002e/admin/secret"),
    // NUL.
    p(b"/admin%00"),
    p(b"/admin%00/secret"),
    p(b"/public/..%00/admin/secret"),
    p(b"/public/x%00/../../admin/secret"),
    // Absolute-form request targets.
    p(b"https://127.0.0.1/admin/secret"),
    p(b"http://127.0.0.1/admin/secret"),
    p(b"https://127.0.0.1//admin/secret"),
    p(b"https://127.0.0.1/ADMIN/secret"),
    p(b"https://127.0.0.1/admin%2fsecret"),
    p(b"https://127.0.0.1/public/..%2fadmin/secret"),
    // Queries and fragments that look like paths.
    p(b"/public/x?/../admin/secret"),
    p(b"/public/x?x=/../../admin/secret"),
    p(b"/public/x?%2f..%2fadmin"),
    p(b"/public?/admin/secret"),
    p(b"/public/x%3f%2f..%2f..%2fadmin/secret"),
    p(b"/admin%3fx"),
    p(b"/public/x#/../../admin/secret"),
    p(b"/public/x%23/..%2f..%2fadmin/secret"),
    p(b"/admin%23"),
    // Headers some backends take the path from.
    ph(b"/public/x", "X-Original-URL: /admin/secret\r\n"),
    ph(b"/public/x", "X-Rewrite-URL: /admin/secret\r\n"),
    ph(b"/public/x", "X-Forwarded-Prefix: /admin\r\n"),
];

// ---------------------------------------------------------------------------------------
// The frameworks

#[derive(Clone, Copy, Debug)]
enum Framework {
    Flask,
    Express,
}

fn apps_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/apps")
}

impl Framework {
    fn name(self) -> &'static str {
        match self {
            Framework::Flask => "flask",
            Framework::Express => "express",
        }
    }

    /// The header in which the app reports the path it routed on (a JSON string).
    fn seen_header(self) -> &'static str {
        match self {
            Framework::Flask => "x-seen-path-info",
            Framework::Express => "x-seen-path",
        }
    }

    /// Keys the admin routes need for this framework's routing: Express matches paths
    /// without regard to case, so the gateway must too.
    fn admin_route_keys(self) -> &'static str {
        match self {
            Framework::Flask => "",
            Framework::Express => "case_sensitive = false\n",
        }
    }

    /// Panics, naming what is missing, unless the framework can be run.
    fn require(self) {
        match self {
            Framework::Flask => {
                let hint = "tests/path_confusion.rs needs python3 with flask: \
                    `python3 -m pip install -r tests/apps/requirements.txt` (.ci/run does this)";
                let output = Command::new("python3")
                    .args(["-c", "import flask"])
                    .stdin(Stdio::null())
                    .output()
                    .unwrap_or_else(|e| panic!("{hint}; python3 cannot be run: {e}"));
                assert!(
                    output.status.success(),
                    "{hint}; python3 cannot import flask:\n{}",
                    String::from_utf8_lossy(&output.stderr)
                );
            }
            Framework::Express => {
                let hint = "tests/path_confusion.rs needs node with express in \
                    tests/apps/node_modules: `npm ci --prefix tests/apps` (.ci/run does this)";
                let output = Command::new("node")
                    .arg("--version")
                    .stdin(Stdio::null())
                    .output()
                    .unwrap_or_else(|e| panic!("{hint}; node cannot be run: {e}"));
                assert!(output.status.success(), "{hint}; `node --version` failed");
                let express = apps_dir().join("node_modules/express/package.json");
                assert!(
                    express.is_file(),
                    "{hint}; {} is missing",
                    express.display()
                );
            }
        }
    }

    fn command(self) -> Command {
        let dir = apps_dir();
        let mut command = match self {
            Framework::Flask => {
                let mut c = Command::new("python3");
                c.arg("-u").arg(dir.join("flask_app.py"));
                c
            }
            Framework::Express => {
                let mut c = Command::new("node");
                c.arg(dir.join("express_app.js"));
                c
            }
        };
        command
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        command
    }
}

/// A framework's app as a child process; killed when dropped.
struct App {
    framework: Framework,
    child: Child,
    addr: SocketAddr,
    stderr: Arc<Mutex<String>>,
    stderr_reader: Option<JoinHandle<()>>,
}

impl App {
    /// Starts the app and waits (bounded) for the port it prints first.
    fn start(framework: Framework) -> App {
        framework.require();
        let mut child = framework
            .command()
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start the {} app: {e}", framework.name()));
        let stdout = child.stdout.take().unwrap();
        let stderr_pipe = child.stderr.take().unwrap();
        let stderr: Arc<Mutex<String>> = Arc::default();
        let log = stderr.clone();
        let stderr_reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr_pipe).lines() {
                let Ok(line) = line else { break };
                let mut log = log.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let _ = tx.send(lines.next());
            // Keep the pipe drained for as long as the app lives.
            for _ in lines {}
        });
        let mut app = App {
            framework,
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            stderr,
            stderr_reader: Some(stderr_reader),
        };
        let first = rx.recv_timeout(APP_START);
        let port = match &first {
            Ok(Some(Ok(line))) => line.trim().parse::<u16>().ok(),
            _ => None,
        };
        match port {
            Some(port) if port != 0 => app.addr.set_port(port),
            _ => panic!(
                "the {} app did not print its port within {APP_START:?} (first line: {first:?}); \
                 its stderr:\n{}",
                framework.name(),
                app.stop_and_log()
            ),
        }
        app
    }

    /// Kills the app and returns everything it wrote to stderr.
    fn stop_and_log(&mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(reader) = self.stderr_reader.take() {
            let _ = reader.join();
        }
        self.stderr.lock().unwrap().clone()
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }
}

impl Drop for App {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------
// Raw HTTP/1.1 exchanges

/// One parsed answer.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// What came back for one request.
#[derive(Debug)]
enum Outcome {
    Answered(Answer),
    /// The connection ended without an answer: the request was refused on the wire.
    Closed,
    TimedOut,
}

impl Outcome {
    fn answer(&self) -> Option<&Answer> {
        match self {
            Outcome::Answered(answer) => Some(answer),
            _ => None,
        }
    }

    fn leaked(&self) -> bool {
        self.answer()
            .is_some_and(|a| find(&a.body, SECRET.as_bytes()).is_some())
    }

    fn status_text(&self) -> String {
        match self {
            Outcome::Answered(a) => a.status.to_string(),
            Outcome::Closed => "closed".into(),
            Outcome::TimedOut => "timeout".into(),
        }
    }

    /// The handler's marker, or the gateway's error code, for the table.
    fn marker(&self) -> String {
        let Some(answer) = self.answer() else {
            return "-".into();
        };
        let text = answer.text();
        if text.starts_with('{') {
            if let Ok(json) = serde_json::from_str::<serde_json::Value>(&text) {
                if let Some(code) = json["error"].as_str() {
                    return format!("gateway:{code}");
                }
            }
        }
        if text.is_empty() {
            return "(empty)".into();
        }
        let first = answer
            .body
            .split(|&b| b == b'\n')
            .next()
            .unwrap_or_default();
        truncate(&escape(first), 36)
    }

    /// What the app said it routed on, when the answer came from the app.
    fn seen(&self, framework: Framework) -> String {
        self.answer()
            .and_then(|a| a.header(framework.seen_header()))
            .unwrap_or("")
            .to_owned()
    }
}

/// Printable ASCII as is, anything else as `\xNN`.
fn escape(bytes: &[u8]) -> String {
    let mut out = String::new();
    for &b in bytes {
        if (0x20..0x7f).contains(&b) && b != b'\\' {
            out.push(b as char);
        } else {
            let _ = write!(out, "\\x{b:02x}");
        }
    }
    out
}

fn truncate(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        text.to_owned()
    } else {
        let cut: String = text.chars().take(max - 1).collect();
        format!("{cut}…")
    }
}

/// Parses the first HTTP/1.x response in `data`; `None` until it is complete (a body
/// without a length is complete at the end of the connection, `eof`).
fn parse_answer(data: &[u8], eof: bool) -> Option<Answer> {
    let end = find(data, b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&data[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .filter(|l| l.starts_with("HTTP/1."))
        .and_then(|l| l.get(9..12))
        .and_then(|s| s.parse::<u16>().ok())?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let mut answer = Answer {
        status,
        headers,
        body: Vec::new(),
    };
    let rest = &data[end + 4..];
    if let Some(length) = answer.header("content-length") {
        let length: usize = length.parse().ok()?;
        answer.body = rest.get(..length)?.to_vec();
    } else if answer
        .header("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    {
        answer.body = decode_chunked(rest)?.0;
    } else if status == 204 || status == 304 || (100..200).contains(&status) {
    } else if eof {
        answer.body = rest.to_vec();
    } else {
        return None;
    }
    Some(answer)
}

/// Writes `request`, then reads the answer; bounded by `EXCHANGE`.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, request: &[u8]) -> Outcome {
    let io = async {
        // A peer that refuses the request may close before it is all written; what it
        // answered is still there to read.
        let _ = stream.write_all(request).await;
        let _ = stream.flush().await;
        let mut data = Vec::new();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => {
                    return parse_answer(&data, true).map_or(Outcome::Closed, Outcome::Answered)
                }
                Ok(n) => data.extend_from_slice(&buf[..n]),
            }
            if let Some(answer) = parse_answer(&data, false) {
                return Outcome::Answered(answer);
            }
        }
    };
    tokio::time::timeout(EXCHANGE, io)
        .await
        .unwrap_or(Outcome::TimedOut)
}

/// `GET target` with `Connection: close`, `Host`, and `headers`.
fn request(target: &[u8], host: SocketAddr, headers: &str) -> Vec<u8> {
    let mut out = b"GET ".to_vec();
    out.extend_from_slice(target);
    out.extend_from_slice(
        format!(
            " HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: close\r\n{headers}\r\n",
            host.port()
        )
        .as_bytes(),
    );
    out
}

/// The request straight to the app, over plain TCP.
async fn direct(app: &App, target: &[u8], headers: &str) -> Outcome {
    let Ok(Ok(tcp)) = tokio::time::timeout(EXCHANGE, TcpStream::connect(app.addr)).await else {
        panic!(
            "cannot connect to the {} app at {}; its stderr:\n{}",
            app.framework.name(),
            app.addr,
            app.stderr()
        );
    };
    exchange(tcp, &request(target, app.addr, headers)).await
}

/// The request through the gateway, over a TLS connection of its own.
async fn through(gw: &TestGateway, target: &[u8], headers: &str) -> Outcome {
    let tls = client_tls(&[&gw.ca_pem], &[b"http/1.1"]);
    let stream = tokio::time::timeout(EXCHANGE, tls_connect(gw.addr, tls))
        .await
        .expect("TLS connection to the gateway in time");
    exchange(stream, &request(target, gw.addr, headers)).await
}

// ---------------------------------------------------------------------------------------
// The gateway

/// The route tables each battery runs against: the admin patterns (each requiring
/// ROLE_SYSTEM_ADMIN, with the framework's `admin_route_keys`), then `/public/**`
/// (public), then, with `catch_all`, `/**` (public).
#[derive(Clone, Copy)]
struct Scenario {
    name: &'static str,
    admin: &'static [&'static str],
    catch_all: bool,
}

const SCENARIOS: [Scenario; 3] = [
    Scenario {
        name: "/admin/** (ROLE_SYSTEM_ADMIN), /public/** (public)",
        admin: &["/admin/**"],
        catch_all: false,
    },
    Scenario {
        name: "/admin/** (ROLE_SYSTEM_ADMIN), /public/** (public), /** (public)",
        admin: &["/admin/**"],
        catch_all: true,
    },
    // Exact patterns: a gateway that takes `/admin/` or `/admin/secret/` for another
    // resource than `/admin` or `/admin/secret` sends them to the catch-all, while Express
    // (non-strict routing) and Flask's `<path:...>` serve them from the admin handler.
    Scenario {
        name: "/admin and /admin/* (ROLE_SYSTEM_ADMIN), /public/** (public), /** (public)",
        admin: &["/admin", "/admin/*"],
        catch_all: true,
    },
];

fn routes(framework: Framework, app: SocketAddr, scenario: Scenario) -> String {
    let mut text = String::new();
    for pattern in scenario.admin {
        text.push_str(&format!(
            "\n[[routes]]\npath = \"{pattern}\"\nupstream = \"http://{app}\"\n\
             roles = [\"ROLE_SYSTEM_ADMIN\"]\n{}",
            framework.admin_route_keys()
        ));
    }
    text.push_str(&format!(
        "\n[[routes]]\npath = \"/public/**\"\nupstream = \"http://{app}\"\npublic = true\n"
    ));
    if scenario.catch_all {
        text.push_str(&format!(
            "\n[[routes]]\npath = \"/**\"\nupstream = \"http://{app}\"\npublic = true\n"
        ));
    }
    text
}

async fn gateway_for(framework: Framework, app: &App, scenario: Scenario) -> TestGateway {
    let text = config_text(app.addr, "", &routes(framework, app.addr, scenario));
    if let Err(error) = covata_gateway::Config::parse(&text, Path::new("config.toml")) {
        panic!(
            "the gateway refused the {} test configuration ({}): {error}{}",
            framework.name(),
            scenario.name,
            if framework.admin_route_keys().is_empty() {
                ""
            } else {
                "\n(the admin route for Express says `case_sensitive = false`: a gateway \
                 without that route key cannot be configured to match Express's \
                 case-insensitive routing)"
            }
        );
    }
    TestGateway::start_text(Upstream::start().await, &text).await
}

// ---------------------------------------------------------------------------------------
// The check

/// Whether an answer through the gateway keeps the promise: no admin content, and either
/// a refusal (400, 401, 403, 404, or a connection closed without an answer) or the
/// public handler's 2xx.
fn verdict(outcome: &Outcome) -> &'static str {
    if outcome.leaked() {
        return "LEAK";
    }
    match outcome {
        Outcome::Closed => "ok",
        Outcome::TimedOut => "TIMEOUT",
        Outcome::Answered(a) if matches!(a.status, 400 | 401 | 403 | 404) => "ok",
        Outcome::Answered(a)
            if (200..300).contains(&a.status) && a.body.starts_with(b"PUBLIC:") =>
        {
            "ok"
        }
        Outcome::Answered(_) => "BAD STATUS",
    }
}

struct Row {
    target: String,
    direct: Outcome,
    gateway: Vec<Outcome>,
}

fn table(framework: Framework, rows: &[Row]) -> String {
    const TARGET: usize = 48;
    const CELL: usize = 34;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n== {}: every request without a token ==",
        framework.name()
    );
    let _ = writeln!(out, "direct: straight to the app, no gateway");
    for (i, scenario) in SCENARIOS.iter().enumerate() {
        let _ = writeln!(out, "gateway {}: routes {}", i + 1, scenario.name);
    }
    let _ = writeln!(
        out,
        "app saw: the path the app routed on (through a gateway when one let it through)"
    );
    let mut header = format!("{:<TARGET$} | {:<CELL$}", "request target", "direct");
    for i in 0..SCENARIOS.len() {
        let _ = write!(header, " | {:<CELL$}", format!("gateway {}", i + 1));
    }
    let _ = writeln!(out, "{header} | app saw");
    let cell = |o: &Outcome, with_verdict: bool| {
        let mut text = format!("{} {}", o.status_text(), o.marker());
        if with_verdict {
            let verdict = verdict(o);
            // Room for the verdict even when the marker is long.
            text = format!("{} {verdict}", truncate(&text, CELL - verdict.len() - 1));
        }
        truncate(&text, CELL)
    };
    for row in rows {
        let mut line = format!(
            "{:<TARGET$} | {:<CELL$}",
            truncate(&row.target, TARGET),
            cell(&row.direct, false)
        );
        for o in &row.gateway {
            let _ = write!(line, " | {:<CELL$}", cell(o, true));
        }
        let seen = row
            .gateway
            .iter()
            .map(|o| o.seen(framework))
            .find(|s| !s.is_empty())
            .unwrap_or_else(|| row.direct.seen(framework));
        let _ = writeln!(out, "{line} | {seen}");
    }
    out
}

async fn framework_keeps_to_what_the_gateway_authorised(framework: Framework) {
    let app = App::start(framework);

    // The app without the gateway: the handlers answer as they should, and the battery
    // reaches the admin handler at least once.
    let control = direct(&app, b"/admin/x", "").await;
    assert!(
        control
            .answer()
            .is_some_and(|a| a.status == 200 && a.text() == "ADMIN-SECRET:x"),
        "the {} app's admin handler: {control:?}\n{}",
        framework.name(),
        app.stderr()
    );
    let control = direct(&app, b"/public/x", "").await;
    assert!(
        control
            .answer()
            .is_some_and(|a| a.status == 200 && a.text() == "PUBLIC:x"),
        "the {} app's public handler: {control:?}",
        framework.name()
    );
    let mut rows = Vec::new();
    for probe in BATTERY {
        rows.push(Row {
            target: escape(probe.target)
                + &probe
                    .headers
                    .trim_end()
                    .split("\r\n")
                    .filter(|h| !h.is_empty())
                    .map(|h| format!(" + {h}"))
                    .collect::<String>(),
            direct: direct(&app, probe.target, probe.headers).await,
            gateway: Vec::new(),
        });
    }

    let mut violations = Vec::new();
    for (index, scenario) in SCENARIOS.iter().enumerate() {
        let gw = gateway_for(framework, &app, *scenario).await;
        let admin = gw.access_token(ADMIN).await;
        let alex = gw.alex_token().await;

        // Positive controls, through the same raw client: the gateway does let the admin
        // in, and anyone to the public handler, so a pass is not the gateway refusing all.
        let bearer = |token: &str| format!("Authorization: Bearer {token}\r\n");
        let seen = through(&gw, b"/admin/x", &bearer(&admin)).await;
        assert!(
            seen.answer()
                .is_some_and(|a| a.status == 200 && a.text() == "ADMIN-SECRET:x"),
            "{}, gateway {}: an admin token must reach the admin handler: {seen:?}\n{}",
            framework.name(),
            index + 1,
            app.stderr()
        );
        let seen = through(&gw, b"/public/x", "").await;
        assert!(
            seen.answer()
                .is_some_and(|a| a.status == 200 && a.text() == "PUBLIC:x"),
            "{}, gateway {}: no token must reach the public handler: {seen:?}",
            framework.name(),
            index + 1
        );
        let seen = through(&gw, b"/admin/x", &bearer(&alex)).await;
        assert!(
            seen.answer().is_some_and(|a| a.status == 403) && !seen.leaked(),
            "{}, gateway {}: a token without ROLE_SYSTEM_ADMIN must get 403: {seen:?}",
            framework.name(),
            index + 1
        );

        for (probe, row) in BATTERY.iter().zip(rows.iter_mut()) {
            let outcome = through(&gw, probe.target, probe.headers).await;
            let verdict = verdict(&outcome);
            if verdict != "ok" {
                violations.push(format!(
                    "gateway {}: {} -> {} {} [{verdict}]",
                    index + 1,
                    row.target,
                    outcome.status_text(),
                    outcome.marker()
                ));
            }
            row.gateway.push(outcome);
        }
        gw.stop().await;
    }

    // Printed rather than put in the panic messages: the test's captured output is shown
    // with a failure, and with `--nocapture` on success.
    println!("{}", table(framework, &rows));
    // Beyond the plain admin paths, a battery meaningful for this framework reaches the
    // admin handler some other way too.
    let reached: Vec<&str> = rows
        .iter()
        .filter(|r| r.direct.leaked() && !matches!(r.target.as_str(), "/admin/x" | "/admin"))
        .map(|r| r.target.as_str())
        .collect();
    assert!(
        !reached.is_empty(),
        "sent straight to the {} app, no tricky path of the battery reached the admin \
         handler: it tests nothing this framework would confuse (table above)",
        framework.name()
    );
    assert!(
        violations.is_empty(),
        "{}: {} request(s) through the gateway were answered with admin content or a \
         status other than 400/401/403/404 or a public 2xx (table above):\n  {}",
        framework.name(),
        violations.len(),
        violations.join("\n  ")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flask_serves_only_what_the_gateway_authorised() {
    framework_keeps_to_what_the_gateway_authorised(Framework::Flask).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn express_serves_only_what_the_gateway_authorised() {
    framework_keeps_to_what_the_gateway_authorised(Framework::Express).await;
}
