//! One misbehaving upstream exchange must not cost other requests their answers: an
//! upstream that sends bytes after a complete response, arriving a little later (a
//! second whole response 150 ms on, the body of a HEAD or 204 answer 50 ms on, trailing
//! junk), must not have those bytes read as the answer to the next request on that
//! pooled connection, perhaps another user's, nor keep the connection one answer behind.
//!
//! The real gateway in front of the misbehaving upstream of tests/common/desync.rs
//! (shared with examples/desync.rs and bench/desync.sh, which run the same scenario
//! against nginx), under a load of 16 keep-alive HTTP/1.1 clients of four users, each
//! request tagged; at most 3,000 requests or 8 s per scenario. Counted by the clients:
//! answers naming another request (wrong), naming another user (cross-user), no answer
//! (failed); by the upstream: which requests the misbehaving connection carried after
//! the late bytes, and whether each was sent while unread bytes had been waiting in the
//! gateway's receive buffer for a while (a check of the connection before reusing it
//! would have seen them), or before they came (nothing to see).
//!
//! One wrong answer no check can avoid: bytes arriving while a request already waits on
//! the connection are its answer as far as anyone can tell. Its real answer then comes
//! while the next request waits, for as long as the connection is reused before the
//! upstream has answered (a slow upstream, a busy pool): behind nginx, and behind the
//! gateway before it let a connection rest in its pool as long as its upstream takes to
//! answer, that shift lasted for hundreds of requests. So with the default pool, and an
//! upstream slow enough (5 ms) to keep a shifted connection shifted, the wrong answers
//! are at most two, and no request may be sent on a connection holding bytes nobody
//! asked for; with `[upstream] pool_partition = "principal"` no answer may reach another
//! user, and with a route's `keepalive = false` none may be wrong.

mod common;
#[path = "common/desync.rs"]
mod desync;

use common::*;
use desync::{Behaviour, Load, MisbehavingUpstream, Mode, Principal, Tally, UpstreamReport};

use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::Context;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

/// Two more users, so that four principals share the pool.
const CAROL: (&str, &str) = ("carol@example.com", "carol-password");
const DAVE: (&str, &str) = ("dave@example.com", "dave-password");

/// Requests before the upstream misbehaves: the pool is warm and the load steady.
const AFTER: usize = 300;
const MAX_REQUESTS: usize = 3000;
const MAX_TIME: Duration = Duration::from_secs(8);
const CONCURRENCY: usize = 16;

/// How long the upstream takes over each answer: slow enough that a shifted connection
/// is reused before its owed answer comes, again and again, unless the pool lets it
/// rest.
const UPSTREAM_LATENCY: Duration = Duration::from_millis(5);

/// Wrong answers one misbehaving exchange may cost with the default pool: the request
/// waiting when the late bytes came, and at most one more. Without the rest in the pool
/// (measured with a 5 ms upstream, release build, 32 clients): 83 to 605 wrong answers
/// a run, and nginx 0 to 623 (BENCHMARKS.md, "Misbehaving upstreams").
const DEFAULT_POOL_BOUND: usize = 2;

/// How the gateway is set up for a scenario.
#[derive(Clone, Copy, Debug)]
enum Setup {
    /// The shipped defaults.
    Default,
    /// `[upstream] pool_partition = "principal"`: a pooled connection carries the
    /// requests of one principal (user and client) only.
    PerPrincipal,
    /// The route's `keepalive = false`: a connection per request.
    NoKeepalive,
}

struct Outcome {
    tally: Tally,
    upstream: UpstreamReport,
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

/// The gateway (as `setup` says) in front of an upstream misbehaving as `mode`, under
/// the load; prints what it saw (shown when the test fails, or with --nocapture).
///
/// The gateway runs on a runtime of its own with one worker thread, as it does alone
/// on a core (and as bench/desync.sh runs it); the upstream and the load share another.
fn scenario(mode: Mode, setup: Setup) -> Outcome {
    let (gateway_runtime, load_runtime) = (runtime(), runtime());
    let outcome = load_runtime.block_on(scenario_on(mode, setup, gateway_runtime.handle()));
    gateway_runtime.shutdown_timeout(Duration::from_secs(2));
    load_runtime.shutdown_timeout(Duration::from_secs(2));
    outcome
}

async fn scenario_on(mode: Mode, setup: Setup, gateway: &tokio::runtime::Handle) -> Outcome {
    let behaviour = Behaviour::new(mode, AFTER, UPSTREAM_LATENCY);
    let up = MisbehavingUpstream::start(behaviour, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let mut before = format!(
        r#"
[[users]]
username = "{carol}"
password = "{carol_hash}"
roles = ["ROLE_COLLABORATOR"]

[[users]]
username = "{dave}"
password = "{dave_hash}"
roles = ["ROLE_COLLABORATOR"]
"#,
        carol = CAROL.0,
        carol_hash = password_hash(CAROL.1),
        dave = DAVE.0,
        dave_hash = password_hash(DAVE.1),
    );
    let mut routes = String::new();
    match setup {
        Setup::Default => {}
        // These keys are the fix's; a gateway without them refuses the configuration,
        // and the test fails there, at start.
        Setup::PerPrincipal => before.push_str("\n[upstream]\npool_partition = \"principal\"\n"),
        Setup::NoKeepalive => {
            routes = format!(
                "[[routes]]\npath = \"/api/v1/desync/**\"\nupstream = \"http://{}\"\nkeepalive = false\n",
                up.addr
            )
        }
    }
    let text = config_text(up.addr, &before, &routes);
    // A gateway that does not know a key says so here, rather than in a panic on its
    // runtime.
    let check = tempfile::tempdir().unwrap();
    std::fs::write(check.path().join("config.toml"), &text).unwrap();
    if let Err(e) = covata_gateway::Config::load(&check.path().join("config.toml")) {
        panic!("{setup:?}: the gateway refuses the configuration: {e:?}");
    }
    let gw = gateway
        .spawn(async move { TestGateway::start_text(Upstream::start().await, &text).await })
        .await
        .unwrap();
    let mut principals = Vec::new();
    for user in [ALEX, ADMIN, CAROL, DAVE] {
        principals.push(Principal {
            name: user.0.to_owned(),
            token: Some(gw.access_token(user).await),
        });
    }
    let load = Load {
        base: gw.url(""),
        mode,
        principals,
        concurrency: CONCURRENCY,
        max_requests: MAX_REQUESTS,
        max_time: MAX_TIME,
        request_timeout: Duration::from_secs(5),
        ca_pem: Some(gw.ca_pem.clone()),
    };
    let tally = desync::run(&load).await;
    let upstream = up.report();
    println!(
        "{} / {setup:?}: {}; upstream: {}",
        mode.name(),
        tally.summary(),
        upstream.summary()
    );
    // The same as one JSON line, for collecting runs.
    let mut json = tally.to_json();
    json["mode"] = mode.name().into();
    json["setup"] = format!("{setup:?}").into();
    json["upstream"] = upstream.to_json();
    println!("desync-json {json}");
    for wrong in tally.wrongs.iter().take(5) {
        println!("  wrong: {wrong:?}");
    }
    // The scenario happened: the upstream misbehaved, and the load went on long enough
    // after it for the late bytes to come and be read by someone.
    if mode != Mode::None {
        assert!(
            upstream.misbehaved_ms.is_some(),
            "the upstream never misbehaved ({} requests)",
            upstream.requests
        );
        let misbehaved = upstream.misbehaved_ms.unwrap();
        let load_end = tally.started_ms + tally.elapsed.as_millis() as u64;
        assert!(
            load_end > misbehaved + mode.delay().as_millis() as u64 + 300,
            "the load ended too soon after the misbehaviour to see its effect"
        );
    }
    assert!(tally.requests > AFTER * 2, "{}", tally.summary());
    drop(gw);
    Outcome { tally, upstream }
}

fn default_pool(mode: Mode) {
    let Outcome { tally, upstream } = scenario(mode, Setup::Default);
    let context = format!(
        "{}: {}; upstream: {}",
        mode.name(),
        tally.summary(),
        upstream.summary()
    );
    assert_eq!(
        upstream.after_late_peekable,
        0,
        "a request was sent on a connection whose unread bytes had been waiting for {:?} \
         µs or more; {context}",
        desync::AVOIDABLE.as_micros()
    );
    assert!(
        tally.wrong <= DEFAULT_POOL_BOUND,
        "one misbehaving exchange cost {} wrong answers; {context}",
        tally.wrong
    );
    // Bytes that are not an answer cost at most the one request that read them: the
    // connection closes at once.
    assert!(tally.failed <= 1, "{context}");
}

fn per_principal_pool(mode: Mode) {
    let Outcome { tally, upstream } = scenario(mode, Setup::PerPrincipal);
    assert_eq!(
        tally.cross_user,
        0,
        "{}: answers went to other users with pool_partition = \"principal\": {}; {:?}; \
         upstream: {}",
        mode.name(),
        tally.summary(),
        tally.wrongs.first(),
        upstream.to_json()
    );
}

fn no_keepalive(mode: Mode) {
    let Outcome { tally, upstream } = scenario(mode, Setup::NoKeepalive);
    assert_eq!(
        (tally.wrong, tally.failed),
        (0, 0),
        "{}: with keepalive = false: {}; upstream: {}",
        mode.name(),
        tally.summary(),
        upstream.to_json()
    );
}

/// The harness itself: a well-behaved upstream gives every answer to its request.
#[test]
fn a_well_behaved_upstream_gives_every_answer_to_its_request() {
    let Outcome { tally, .. } = scenario(Mode::None, Setup::Default);
    assert_eq!(tally.right, tally.requests, "{}", tally.summary());
}

#[test]
fn a_second_response_150_ms_late_costs_at_most_two_wrong_answers() {
    default_pool(Mode::LateResponse);
}

#[test]
fn a_head_answers_late_body_costs_at_most_two_wrong_answers() {
    default_pool(Mode::HeadBody);
}

#[test]
fn a_204_answers_late_body_costs_at_most_two_wrong_answers() {
    default_pool(Mode::NoContentBody);
}

#[test]
fn late_trailing_junk_costs_at_most_two_wrong_answers() {
    default_pool(Mode::TrailingJunk);
}

#[test]
fn a_pool_per_principal_never_gives_an_answer_to_another_user() {
    for mode in Mode::MISBEHAVING {
        per_principal_pool(mode);
    }
}

#[test]
fn without_keepalive_no_answer_is_wrong() {
    for mode in Mode::MISBEHAVING {
        no_keepalive(mode);
    }
}

/// Why a pool cannot trust tokio to tell it whether an idle connection holds unread
/// bytes: after a read that did not fill its buffer, tokio marks the socket not
/// readable, and it learns otherwise only when its I/O driver next polls epoll. Until
/// then a poll with a no-op waker (what `Conn::is_reusable` does) answers Pending for
/// bytes already in the kernel's buffer, which a `MSG_PEEK` sees. On a busy worker
/// thread the driver may not turn for a while; here it cannot, as the thread blocks.
#[test]
fn tokio_readiness_can_hide_bytes_already_received() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let (mut client, (mut server, _)) = (client.unwrap(), accepted.unwrap());
        server.write_all(common::wire::OK).await.unwrap();
        // The answer, read as the gateway reads it: into more room than it fills.
        let mut answer = Vec::with_capacity(8192);
        client.read_buf(&mut answer).await.unwrap();
        assert_eq!(answer, common::wire::OK);

        server.write_all(b"late").await.unwrap();
        // Time for the bytes to arrive, without letting the runtime's driver run.
        std::thread::sleep(Duration::from_millis(50));
        let peek = |client: &TcpStream| {
            let mut byte = [MaybeUninit::<u8>::uninit(); 16];
            socket2::SockRef::from(client).peek(&mut byte).unwrap()
        };
        assert_eq!(peek(&client), 4, "the kernel holds the late bytes");
        let poll_once = |client: &mut TcpStream| {
            let mut cx = Context::from_waker(std::task::Waker::noop());
            let mut byte = [0u8; 1];
            let mut probe = ReadBuf::new(&mut byte);
            Pin::new(client).poll_read(&mut cx, &mut probe).is_pending()
        };
        assert!(
            poll_once(&mut client),
            "tokio's cached readiness said the socket had bytes to read"
        );
        // Once the driver has turned, tokio sees them.
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert!(!poll_once(&mut client), "the driver did not see the bytes");
    });
}
