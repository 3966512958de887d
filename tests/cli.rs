//! The real `covata-gateway` binary as a child process: its subcommands, its exit codes
//! and messages, the development certificate, graceful shutdown on SIGTERM and reload on
//! SIGHUP.

mod common;

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use common::process::{api_status, command, grant, granted, strip_ansi, url, Process};
use common::*;
use covata_gateway::credentials::Verifier;
use serde_json::Value;

fn stderr_of(output: &Output) -> String {
    strip_ansi(&String::from_utf8_lossy(&output.stderr))
}

fn stdout_of(output: &Output) -> String {
    strip_ansi(&String::from_utf8_lossy(&output.stdout))
}

fn hash_password_cli(stdin: &[u8]) -> Output {
    let mut child = command()
        .arg("hash-password")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary starts");
    {
        let mut input = child.stdin.take().unwrap();
        input.write_all(stdin).unwrap();
        // Dropping stdin closes it: the child sees end of input.
    }
    child.wait_with_output().unwrap()
}

fn check_config(path: &Path) -> Output {
    command()
        .arg("check-config")
        .arg("--config")
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .expect("the binary runs")
}

/// A temporary folder with `config.toml` holding `text` and, with `cert`, a certificate
/// pair at `gateway.crt`/`gateway.key`; returns the folder, the config path and the PEM.
fn config_dir(text: &str, cert: bool) -> (tempfile::TempDir, PathBuf, String) {
    let dir = tempfile::tempdir().unwrap();
    let pem = if cert {
        write_certificate(dir.path(), "gateway.crt", "gateway.key")
    } else {
        String::new()
    };
    let path = dir.path().join("config.toml");
    std::fs::write(&path, text).unwrap();
    (dir, path, pem)
}

/// Any address will do where nothing is ever proxied.
fn nowhere() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9))
}

/// 1-based line of the first line of `text` containing `needle`.
fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("`{needle}` is not in the config"))
        + 1
}

/// The harness config with an unknown key on line 3 (`[server]` is on line 2).
fn with_unknown_key(text: &str) -> String {
    assert!(text.starts_with("\n[server]\n"), "harness layout changed");
    text.replacen("[server]\n", "[server]\nlisen = \"127.0.0.1:1\"\n", 1)
}

/// Asserts check-config refuses `text`, naming every needle and the line of the config
/// holding `line_needle`.
fn assert_refused_at_line(text: &str, line_needle: &str, needles: &[&str]) {
    let line = format!("config.toml:{}", line_of(text, line_needle));
    let (_dir, path, _) = config_dir(text, true);
    let mut needles = needles.to_vec();
    needles.push(&line);
    assert_refused(&check_config(&path), &needles);
}

/// Asserts a refused check-config: exit 1 and every needle on stderr.
fn assert_refused(output: &Output, needles: &[&str]) {
    let stderr = stderr_of(output);
    assert!(
        !output.status.success(),
        "check-config accepted it; stdout: {}\nstderr: {stderr}",
        stdout_of(output)
    );
    assert_eq!(output.status.code(), Some(1), "stderr: {stderr}");
    for needle in needles {
        assert!(
            stderr.contains(needle),
            "`{needle}` not in stderr: {stderr}"
        );
    }
}

async fn token(client: &reqwest::Client, addr: SocketAddr, user: (&str, &str)) -> String {
    granted(client, addr, user).await["access_token"]
        .as_str()
        .unwrap()
        .to_owned()
}

// ---------------------------------------------------------------------------------------
// hash-password

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_password_prints_a_verifiable_argon2id_phc_string() {
    let output = hash_password_cli(b"s3cret\n");
    let stdout = stdout_of(&output);
    assert!(output.status.success(), "stderr: {}", stderr_of(&output));
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "one line: {stdout:?}");
    let phc = lines[0];
    assert!(phc.starts_with("$argon2id$v=19$"), "{phc}");
    let verifier = Verifier::default();
    assert!(verifier.verify(phc.into(), "s3cret".into()).await.unwrap());
    // The newline was the terminator, not part of the password.
    assert!(!verifier
        .verify(phc.into(), "s3cret\n".into())
        .await
        .unwrap());
}

#[test]
fn hash_password_refuses_an_empty_password() {
    let output = hash_password_cli(b"");
    assert!(!output.status.success(), "stdout: {}", stdout_of(&output));
    assert!(stdout_of(&output).is_empty(), "no hash is printed");
    let stderr = stderr_of(&output);
    assert!(stderr.contains("empty"), "stderr: {stderr}");
}

// ---------------------------------------------------------------------------------------
// check-config

#[test]
fn check_config_accepts_a_valid_config() {
    let (_dir, path, _) = config_dir(&config_text(nowhere(), "", ""), true);
    let output = check_config(&path);
    assert!(output.status.success(), "stderr: {}", stderr_of(&output));
    let stdout = stdout_of(&output);
    assert!(stdout.contains("ok"), "stdout: {stdout}");
}

#[test]
fn check_config_names_an_unknown_key_and_its_line() {
    let (_dir, path, _) = config_dir(&with_unknown_key(&config_text(nowhere(), "", "")), true);
    assert_refused(&check_config(&path), &["lisen", "config.toml:3"]);
}

#[test]
fn check_config_names_a_bad_listen_address() {
    let text = config_text(nowhere(), "", "").replacen(
        "listen = \"127.0.0.1:0\"",
        "listen = \"localhost\"",
        1,
    );
    assert_refused_at_line(&text, "\"localhost\"", &["listen", "localhost"]);
}

#[test]
fn check_config_names_the_missing_certificate_when_only_the_key_exists() {
    let (dir, path, _) = config_dir(&config_text(nowhere(), "", ""), true);
    std::fs::remove_file(dir.path().join("gateway.crt")).unwrap();
    assert_refused(&check_config(&path), &["tls_cert", "gateway.crt"]);
}

#[test]
fn check_config_names_a_bad_password_hash() {
    let user = "[[users]]\nusername = \"bad@example.com\"\npassword = \"hunter2\"\nroles = [\"ROLE_COLLABORATOR\"]\n";
    let text = config_text(nowhere(), user, "");
    assert_refused_at_line(&text, "\"hunter2\"", &["password", "PHC"]);
}

#[test]
fn check_config_names_a_bad_duration() {
    let text = config_text(nowhere(), "", "").replacen(
        "shutdown_grace = \"5s\"\n",
        "shutdown_grace = \"5s\"\nidle_timeout = \"10 parsecs\"\n",
        1,
    );
    assert_refused_at_line(&text, "parsecs", &["idle_timeout", "10 parsecs"]);
}

#[test]
fn check_config_names_a_missing_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nowhere.toml");
    let output = check_config(&path);
    assert_refused(&output, &[&path.display().to_string()]);
}

// ---------------------------------------------------------------------------------------
// The server refusing to start

/// Starts the server on `config`, which must exit within 10 s, and not successfully;
/// its whole log.
async fn failed_start_log(config: &Path) -> String {
    let mut gw = Process::spawn(config);
    let status = gw.exited(Duration::from_secs(10)).await;
    let log = gw.full_log().await;
    assert!(!status.success(), "log:\n{log}");
    log
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_exits_non_zero_on_a_bad_config() {
    let (_dir, path, _) = config_dir(&with_unknown_key(&config_text(nowhere(), "", "")), true);
    let log = failed_start_log(&path).await;
    assert!(log.contains("lisen"), "log:\n{log}");
    assert!(log.contains("config.toml:3"), "log:\n{log}");
    assert!(!log.contains("covata-gateway serving"), "log:\n{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_exits_non_zero_when_the_listen_address_is_taken() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = taken.local_addr().unwrap();
    let text = config_text(nowhere(), "", "").replacen(
        "listen = \"127.0.0.1:0\"",
        &format!("listen = \"{taken_addr}\""),
        1,
    );
    let (_dir, path, _) = config_dir(&text, true);
    let log = failed_start_log(&path).await;
    assert!(log.contains(&taken_addr.to_string()), "log:\n{log}");
    assert!(log.contains("server.listen"), "log:\n{log}");
    drop(taken);
}

// ---------------------------------------------------------------------------------------
// First start without a certificate

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_start_generates_a_private_development_certificate_and_serves_with_it() {
    let upstream = Upstream::start().await;
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:0"
tls_cert = "certs/gateway.crt"
tls_key = "certs/gateway.key"

[admin]
listen = "127.0.0.1:0"

[[routes]]
path = "/api/v1/config"
upstream = "http://{}"
public = true
"#,
        upstream.addr
    );
    let (dir, path, _) = config_dir(&text, false);
    let (cert, key) = (
        dir.path().join("certs/gateway.crt"),
        dir.path().join("certs/gateway.key"),
    );
    assert!(!cert.exists() && !key.exists());

    let gw = Process::spawn(&path);
    let addr = gw.listen_addr().await;
    assert!(cert.exists(), "certificate written");
    assert!(key.exists(), "key written");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "key mode {:o}", mode & 0o777);
    }
    let warning = gw
        .find_log("development certificate")
        .unwrap_or_else(|| panic!("no warning; log:\n{}", gw.log_text()));
    assert!(warning.contains("WARN"), "{warning}");

    let pem = std::fs::read_to_string(&cert).unwrap();
    let (http1, http2) = clients(&pem);
    for client in [&http1, &http2] {
        let response = client
            .get(url(addr, "/api/v1/config"))
            .send()
            .await
            .unwrap();
        let seen = json_ok(response).await;
        assert_eq!(seen["path"], "/api/v1/config");
    }
}

// ---------------------------------------------------------------------------------------
// Signals

/// The harness config and certificate in a temporary folder, with a live upstream.
struct Setup {
    _dir: tempfile::TempDir,
    path: PathBuf,
    pem: String,
    upstream: Upstream,
}

async fn setup(extra_before_routes: &str) -> Setup {
    let upstream = Upstream::start().await;
    let (dir, path, pem) = config_dir(&config_text(upstream.addr, extra_before_routes, ""), true);
    Setup {
        _dir: dir,
        path,
        pem,
        upstream,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_refuses_new_ones_and_exits_zero() {
    let setup = setup("").await;
    let mut gw = Process::spawn(&setup.path);
    let addr = gw.listen_addr().await;
    let (http1, _) = clients(&setup.pem);
    let token = token(&http1, addr, ALEX).await;

    let started = Instant::now();
    let in_flight = tokio::spawn({
        let client = http1.clone();
        let target = url(addr, "/api/v1/slow/1500");
        async move {
            let response = client.get(target).bearer_auth(token).send().await?;
            let status = response.status().as_u16();
            let body = response.text().await?;
            Ok::<_, reqwest::Error>((status, body, started.elapsed()))
        }
    });

    tokio::time::sleep(Duration::from_millis(300)).await;
    gw.signal("TERM");

    tokio::time::sleep_until((started + Duration::from_millis(800)).into()).await;
    let connect =
        tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr)).await;
    assert!(
        matches!(&connect, Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused),
        "a new connection during the drain: {connect:?}"
    );
    assert!(
        !in_flight.is_finished(),
        "the slow request was still in flight when new connections were refused"
    );

    let (status, body, elapsed) = tokio::time::timeout(Duration::from_secs(10), in_flight)
        .await
        .expect("the in-flight request finished")
        .unwrap()
        .unwrap_or_else(|e| panic!("in-flight request failed: {e}; log:\n{}", gw.log_text()));
    assert_eq!(status, 200, "{body}");
    assert!(elapsed >= Duration::from_millis(1500), "{elapsed:?}");
    let seen: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(seen["path"], "/api/v1/slow/1500");

    // Well inside the 5 s grace: the drain ends when the last request does.
    let exit = gw.exited(Duration::from_secs(4)).await;
    let log = gw.full_log().await;
    assert!(exit.success(), "{exit:?}; log:\n{log}");
    assert!(log.contains("shutdown signal received"), "log:\n{log}");
    drop(setup.upstream);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_users_keeps_tokens_and_refuses_a_broken_config() {
    let setup = setup("").await;
    let mut gw = Process::spawn(&setup.path);
    let addr = gw.listen_addr().await;
    let (http1, _) = clients(&setup.pem);
    let alex = token(&http1, addr, ALEX).await;
    const NEWBIE: (&str, &str) = ("newbie@example.com", "newbie-pw");
    assert_ne!(grant(&http1, addr, NEWBIE).await.status(), 200, "not yet");

    let hash = password_hash(NEWBIE.1);
    let user = format!(
        "[[users]]\nusername = \"{}\"\npassword = \"{hash}\"\nroles = [\"ROLE_COLLABORATOR\"]\n",
        NEWBIE.0
    );
    let reloaded = config_text(setup.upstream.addr, &user, "");
    std::fs::write(&setup.path, &reloaded).unwrap();
    gw.signal("HUP");

    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if grant(&http1, addr, NEWBIE).await.status() == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new user cannot sign in after SIGHUP; log:\n{}",
            gw.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        gw.wait_log("configuration reloaded", Duration::from_secs(2))
            .await
            .is_some(),
        "log:\n{}",
        gw.log_text()
    );
    assert_eq!(
        api_status(&http1, addr, "/api/v1/x", &alex).await,
        200,
        "old token kept"
    );
    assert!(gw.running());

    // A broken file is refused and the running configuration stays.
    std::fs::write(&setup.path, with_unknown_key(&reloaded)).unwrap();
    gw.signal("HUP");
    let refused = gw
        .wait_log("reload refused", Duration::from_secs(5))
        .await
        .unwrap_or_else(|| panic!("no refusal logged; log:\n{}", gw.log_text()));
    assert!(refused.contains("ERROR"), "{refused}");
    assert!(refused.contains("lisen"), "{refused}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(gw.running(), "log:\n{}", gw.log_text());
    let newbie = token(&http1, addr, NEWBIE).await;
    assert_eq!(api_status(&http1, addr, "/api/v1/x", &newbie).await, 200);
    assert_eq!(api_status(&http1, addr, "/api/v1/x", &alex).await, 200);
}

/// The serving line announces readiness: a supervisor may signal from then on. A signal
/// that arrives before its handler is installed gets the default action (the process is
/// killed), so the handlers must exist by the time the line is logged. Each round sends
/// its signal the moment the line appears; several rounds make a race show.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_sent_as_soon_as_serving_is_logged_are_handled() {
    let setup = setup("").await;
    for round in 0..4 {
        let mut gw = Process::spawn_signalling(&setup.path, Some("HUP"));
        gw.listen_addr().await;
        let reloaded = gw
            .wait_log("configuration reloaded", Duration::from_secs(5))
            .await;
        assert!(
            reloaded.is_some() && gw.running(),
            "round {round}: SIGHUP right after the serving line was not a reload: {:?}; log:\n{}",
            gw.wait_exit(Duration::from_millis(100)).await,
            gw.log_text()
        );
        gw.signal("TERM");
        let exit = gw.wait_exit(Duration::from_secs(5)).await;
        assert!(exit.is_some_and(|e| e.success()), "round {round}: {exit:?}");

        let mut gw = Process::spawn_signalling(&setup.path, Some("TERM"));
        gw.listen_addr().await;
        let exit = gw.wait_exit(Duration::from_secs(5)).await;
        assert!(
            exit.is_some_and(|e| e.success()),
            "round {round}: SIGTERM right after the serving line was not a graceful stop: {exit:?}; log:\n{}",
            gw.full_log().await
        );
    }
}

// ---------------------------------------------------------------------------------------
// The serving line

/// With `listen = "127.0.0.1:0"` for both listeners, the serving line is the only way to
/// learn where they are: it must name the bound admin address, not the configured one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serving_line_names_the_bound_admin_address() {
    let setup = setup("").await;
    let gw = Process::spawn(&setup.path);
    let listen = gw.listen_addr().await;
    let admin = gw.serving_field("admin").await;
    assert_ne!(listen.port(), 0);
    assert_ne!(
        admin.port(),
        0,
        "the serving line names the configured admin address, not the bound one: {}",
        gw.find_log("covata-gateway serving").unwrap()
    );
    let health = reqwest::Client::new()
        .get(format!("http://{admin}/healthz"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
}

// ---------------------------------------------------------------------------------------
// --help

#[test]
fn help_lists_the_subcommands() {
    let output = command()
        .arg("--help")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(output.status.success(), "stderr: {}", stderr_of(&output));
    let stdout = stdout_of(&output);
    for name in ["hash-password", "check-config", "demo-upstream"] {
        assert!(stdout.contains(name), "`{name}` not in:\n{stdout}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_are_logged_once_with_their_request_context_and_no_secret() {
    // Port 9 has no listener: every proxied request fails with 502.
    let (_dir, path, pem) = config_dir(&config_text(nowhere(), "", ""), true);
    let gw = Process::spawn(&path);
    let addr = gw.listen_addr().await;
    let (http1, _) = clients(&pem);
    let token = token(&http1, addr, ALEX).await;
    let forged = "Zm9yZ2VkLXRva2VuLXRoYXQtaXMtbm90LWluLXRoZS10YWJsZQ";

    assert_eq!(
        api_status(&http1, addr, "/api/v1/things/1", &token).await,
        502
    );
    assert_eq!(
        api_status(&http1, addr, "/api/v1/things/2", forged).await,
        401
    );
    let refused = http1
        .post(url(addr, "/api/oauth/token"))
        .basic_auth(APP.0, Some("not-the-secret"))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);

    let wait = |needle: &'static str| gw.wait_log(needle, Duration::from_secs(5));
    let failed = wait("path=\"/api/v1/things/1\"").await;
    let failed = failed.unwrap_or_else(|| panic!("the 502 is not logged:\n{}", gw.log_text()));
    for part in [
        "request failed",
        "status=502",
        "method=GET",
        "route=",
        "user=\"alex@example.com\"",
    ] {
        assert!(failed.contains(part), "`{part}` missing from: {failed}");
    }
    let unknown = wait("path=\"/api/v1/things/2\"")
        .await
        .expect("the 401 is logged");
    for part in ["request refused", "status=401", "invalid_token"] {
        assert!(unknown.contains(part), "`{part}` missing from: {unknown}");
    }
    let bad_client = wait("path=\"/api/oauth/token\"").await;
    let bad_client = bad_client.expect("the refused client is logged");
    for part in ["request refused", "status=401", "invalid_client"] {
        assert!(
            bad_client.contains(part),
            "`{part}` missing from: {bad_client}"
        );
    }

    let log = gw.log_text();
    for line in ["path=\"/api/v1/things/1\"", "path=\"/api/v1/things/2\""] {
        assert_eq!(log.matches(line).count(), 1, "logged once: {log}");
    }
    for secret in [token.as_str(), forged, "not-the-secret", APP.1] {
        assert!(!log.contains(secret), "a secret reached the log:\n{log}");
    }
}
