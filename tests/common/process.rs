//! The real `covata-gateway` binary as a child process: started with a config, its
//! stderr log collected line by line, its serving line read for the bound addresses.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::APP;

pub const BIN: &str = env!("CARGO_BIN_EXE_covata-gateway");

/// How long a child may take to start serving on a busy machine.
pub const START: Duration = Duration::from_secs(15);

/// Removes ANSI escape sequences (CSI `ESC [ ... final`, and a lone `ESC x`), in case
/// the log is coloured anyway.
pub fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c != '\u{1b}' {
            out.push(c);
            continue;
        }
        if chars.next() == Some('[') {
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) {
                    break;
                }
            }
        }
    }
    out
}

/// The binary with `RUST_LOG=info` and no colours.
pub fn command() -> Command {
    let mut command = Command::new(BIN);
    command.env("RUST_LOG", "info").env("NO_COLOR", "1");
    command
}

/// A gateway process; killed when dropped, so a failing test leaves no child behind.
pub struct Process {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
    eof: Arc<AtomicBool>,
}

impl Process {
    pub fn spawn(config: &Path) -> Process {
        Process::spawn_signalling(config, None)
    }

    /// Like `spawn`; with `on_serving`, the reader thread sends that signal the moment the
    /// `covata-gateway serving` line arrives, as a supervisor watching the log would.
    pub fn spawn_signalling(config: &Path, on_serving: Option<&'static str>) -> Process {
        let mut child = command()
            .arg("--config")
            .arg(config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the binary starts");
        let stderr = child.stderr.take().unwrap();
        let log: Arc<Mutex<Vec<String>>> = Arc::default();
        let eof: Arc<AtomicBool> = Arc::default();
        let (lines, done) = (log.clone(), eof.clone());
        let pid = child.id().to_string();
        std::thread::spawn(move || {
            let mut on_serving = on_serving;
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let line = strip_ansi(&line);
                if line.contains("covata-gateway serving") {
                    if let Some(name) = on_serving.take() {
                        let _ = Command::new("kill")
                            .args([format!("-{name}"), pid.clone()])
                            .status();
                    }
                }
                lines.lock().unwrap().push(line);
            }
            done.store(true, Ordering::SeqCst);
        });
        Process { child, log, eof }
    }

    /// The log lines so far.
    pub fn lines(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    pub fn find_log(&self, needle: &str) -> Option<String> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .find(|l| l.contains(needle))
            .cloned()
    }

    /// The first log line containing `needle`, waiting for it up to `timeout`.
    pub async fn wait_log(&self, needle: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let finished = self.eof.load(Ordering::SeqCst);
            if let Some(line) = self.find_log(needle) {
                return Some(line);
            }
            if finished || Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The `name=ADDR` field of the `covata-gateway serving` line, once it is logged.
    pub async fn serving_field(&self, name: &str) -> SocketAddr {
        let line = self
            .wait_log("covata-gateway serving", START)
            .await
            .unwrap_or_else(|| panic!("the gateway did not start; log:\n{}", self.log_text()));
        line.split(&format!(" {name}="))
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|addr| addr.parse().ok())
            .unwrap_or_else(|| panic!("no {name}=ADDR in `{line}`"))
    }

    /// The TLS address, from the `covata-gateway serving listen=...` line.
    pub async fn listen_addr(&self) -> SocketAddr {
        self.serving_field("listen").await
    }

    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([format!("-{name}"), self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{name} failed");
    }

    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The exit status, if the process ends within `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The exit status; the process must end within `timeout`.
    pub async fn exited(&mut self, timeout: Duration) -> ExitStatus {
        self.wait_exit(timeout)
            .await
            .unwrap_or_else(|| panic!("still running; log:\n{}", self.log_text()))
    }

    /// Everything the process wrote to stderr, once it has exited.
    pub async fn full_log(&self) -> String {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.eof.load(Ordering::SeqCst) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.log_text()
    }

    /// SIGTERM, then the exit status and the whole log.
    pub async fn terminate(mut self) -> (ExitStatus, String) {
        self.signal("TERM");
        let status = self.exited(Duration::from_secs(10)).await;
        (status, self.full_log().await)
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// `https://127.0.0.1:PORT/path` for a gateway process listening on `addr`.
pub fn url(addr: SocketAddr, path: &str) -> String {
    format!("https://127.0.0.1:{}{}", addr.port(), path)
}

/// A password grant through the `app` client.
pub async fn grant(
    client: &reqwest::Client,
    addr: SocketAddr,
    user: (&str, &str),
) -> reqwest::Response {
    client
        .post(url(addr, "/api/oauth/token"))
        .basic_auth(APP.0, Some(APP.1))
        .form(&super::password_form(user, &[]))
        .send()
        .await
        .unwrap()
}

/// A password grant through the `app` client that must succeed; the JSON body.
pub async fn granted(client: &reqwest::Client, addr: SocketAddr, user: (&str, &str)) -> Value {
    let response = grant(client, addr, user).await;
    assert_eq!(response.status(), 200, "password grant for {}", user.0);
    response.json().await.unwrap()
}

/// The status of `GET path` with a bearer token.
pub async fn api_status(
    client: &reqwest::Client,
    addr: SocketAddr,
    path: &str,
    token: &str,
) -> u16 {
    client
        .get(url(addr, path))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}
