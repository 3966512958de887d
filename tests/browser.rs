//! The sign-in page in a real browser: headless Chromium, driven through chromedriver.
//! Open the authorize URL, type a wrong password, then the right one, land on the
//! client's redirect URI with a code, exchange it with PKCE, call an API with the token.
//!
//! Needs Debian's `chromium` and `chromium-driver` (`.ci/run` installs them). The
//! sign-in page's screenshot is written to `target/sign-in.png`; with
//! `UPDATE_SCREENSHOT=1` also to `docs/sign-in.png`, the picture in the README.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use fantoccini::{ClientBuilder, Locator};
use serde_json::{json, Value};

struct Driver {
    child: Child,
    url: String,
    _profile: tempfile::TempDir,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn find_program(names: &[&str]) -> String {
    for name in names {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {name}")])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
        if let Some(path) = found.filter(|p| !p.is_empty()) {
            return path;
        }
    }
    panic!(
        "none of {names:?} is installed: this test needs Debian's chromium and chromium-driver \
         (`apt-get install chromium chromium-driver`; .ci/run installs them)"
    );
}

async fn start_driver() -> Driver {
    let driver = std::env::var("CHROMEDRIVER").unwrap_or_else(|_| find_program(&["chromedriver"]));
    // chromedriver takes a port number, not a socket: take a free one from the kernel.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(driver)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromedriver starts");
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            Instant::now() < deadline,
            "chromedriver did not start listening"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Driver {
        child,
        url: format!("http://127.0.0.1:{port}"),
        _profile: tempfile::tempdir().unwrap(),
    }
}

async fn browser(driver: &Driver) -> fantoccini::Client {
    let chromium = std::env::var("CHROMIUM")
        .unwrap_or_else(|_| find_program(&["chromium", "chromium-browser"]));
    let profile = driver._profile.path().display().to_string();
    let capabilities = json!({
        "browserName": "chrome",
        // The gateway's certificate is made by this test; the browser cannot know it.
        "acceptInsecureCerts": true,
        "goog:chromeOptions": {
            "binary": chromium,
            "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=720,640",
                format!("--user-data-dir={profile}"),
            ],
        },
    });
    let Value::Object(capabilities) = capabilities else {
        unreachable!()
    };
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(capabilities)
        .connect(&driver.url)
        .await
        .expect("a chromium session")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_in_in_a_real_browser_then_exchange_and_call_the_api() {
    let hash = password_hash("webapp-secret");
    let upstream = Upstream::start().await;
    let callback = format!("http://127.0.0.1:{}/callback", upstream.addr.port());
    let clients = format!(
        r#"
[[clients]]
client_id = "webapp"
client_secret = "{hash}"
authorized_grant_types = ["authorization_code", "refresh_token"]
registered_redirect_uris = ["{callback}"]
scopes = ["read", "write"]
"#
    );
    let text = config_text(upstream.addr, &clients, "");
    let gw = TestGateway::start_text(upstream, &text).await;

    let verifier = "M25iVXpKU3puUjFaYWg3T1NDTDQtcW1ROUY5YXlwalNoc0hhakxifmZHag";
    let challenge = pkce_challenge(verifier);
    let query = serde_urlencoded::to_string([
        ("response_type", "code"),
        ("client_id", "webapp"),
        ("redirect_uri", callback.as_str()),
        ("state", "af0ifjsldkj"),
        ("scope", "read write"),
        ("code_challenge", challenge.as_str()),
        ("code_challenge_method", "S256"),
    ])
    .unwrap();

    let driver = start_driver().await;
    let client = browser(&driver).await;
    let outcome = async {
        client
            .goto(&gw.url(&format!("/api/oauth/authorize?{query}")))
            .await?;
        assert_eq!(client.title().await?, "Sign in");

        // A wrong password shows the message and keeps the username, not the password.
        client
            .find(Locator::Id("username"))
            .await?
            .send_keys(ALEX.0)
            .await?;
        client
            .find(Locator::Id("password"))
            .await?
            .send_keys("wrong-password")
            .await?;
        client.find(Locator::Id("sign-in")).await?.click().await?;
        let error = client.wait().for_element(Locator::Id("error")).await?;
        assert_eq!(error.text().await?, "Wrong username or password.");
        let username = client.find(Locator::Id("username")).await?;
        assert_eq!(username.prop("value").await?.as_deref(), Some(ALEX.0));
        assert_eq!(
            client
                .find(Locator::Id("password"))
                .await?
                .prop("value")
                .await?
                .as_deref(),
            Some("")
        );

        // A fresh page for the picture in the README.
        client
            .goto(&gw.url(&format!("/api/oauth/authorize?{query}")))
            .await?;
        client
            .find(Locator::Id("username"))
            .await?
            .send_keys(ALEX.0)
            .await?;
        let png = client.screenshot().await?;
        assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
        let target = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/sign-in.png");
        std::fs::write(&target, &png).unwrap();
        if std::env::var_os("UPDATE_SCREENSHOT").is_some() {
            let docs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs");
            std::fs::create_dir_all(&docs).unwrap();
            std::fs::write(docs.join("sign-in.png"), &png).unwrap();
        }

        client
            .find(Locator::Id("password"))
            .await?
            .send_keys(ALEX.1)
            .await?;
        client.find(Locator::Id("sign-in")).await?.click().await?;
        let deadline = Instant::now() + Duration::from_secs(15);
        let landed = loop {
            let url = client.current_url().await?;
            if url.as_str().starts_with(&callback) {
                break url;
            }
            assert!(Instant::now() < deadline, "never redirected; at {url}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        Ok::<_, fantoccini::error::CmdError>(landed)
    }
    .await;
    let _ = client.close().await;
    let landed = outcome.expect("the browser session");

    let params: Vec<(String, String)> = landed.query_pairs().into_owned().collect();
    let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    assert_eq!(get("state").as_deref(), Some("af0ifjsldkj"));
    let code = get("code").expect("a code in the redirect");

    let response = gw
        .token_request(
            Some(("webapp", "webapp-secret")),
            &[
                ("grant_type", "authorization_code"),
                ("code", &code),
                ("redirect_uri", &callback),
                ("code_verifier", verifier),
            ],
        )
        .await;
    let tokens = json_ok(response).await;
    assert_eq!(tokens["scope"], "read write");
    let api = gw
        .bearer_get(
            &gw.http2,
            "/api/v1/objects",
            tokens["access_token"].as_str().unwrap(),
        )
        .await;
    let seen = json_ok(api).await;
    assert_eq!(seen["headers"]["x-authenticated-user"][0], ALEX.0);
    assert_eq!(seen["headers"]["x-authenticated-client"][0], "webapp");
}
