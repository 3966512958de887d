//! Measures what one misbehaving upstream exchange costs behind a pooling proxy: an
//! upstream that, exactly once, sends bytes nobody asked for a little after a complete
//! answer, and a load of tagged requests from several users that checks every answer
//! names the request (and the user) it was sent for.
//!
//! Self-contained (tokio, reqwest, serde_json, socket2; nothing of the test harness),
//! because two crates include it by path: tests/pool_desync.rs (the gateway in process)
//! and examples/desync.rs (separate processes, for nginx too: bench/desync.sh).
//!
//! The upstream answers `GET /…/T` with `200`, `x-answer-tag: T`, `x-answer-user: U`
//! and the body `tag=T user=U\n` (Content-Length framed, kept alive), where T is the
//! request's `x-tag` and U its `x-authenticated-user`; `HEAD` gets the same head without
//! the body; `GET /…/nocontent/T` gets a `204` naming T and U in its head. It answers
//! the requests of a connection one at a time, each after a set latency. Once, after
//! `after` requests, on the first request its mode applies to, it misbehaves
//! ([`Mode`]): the bytes go from a task of their own while the connection goes on
//! answering, as a second write of a buggy server would.
//!
//! The upstream also tells, with `MSG_PEEK` on its own socket, how the proxy went on
//! with the misbehaving connection ([`UpstreamReport`]): whether each later request
//! came after bytes the proxy had not read were already in its receive buffer (a check
//! before reuse could have seen them) or before they were written (none could have).

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};

/// How the upstream misbehaves, once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// After answering a GET, the same complete response again, 150 ms later.
    LateResponse,
    /// A HEAD answer with a Content-Length, its body following 50 ms later.
    HeadBody,
    /// A 204 answer, with a body following 50 ms later.
    NoContentBody,
    /// After answering a GET, junk bytes 50 ms later.
    TrailingJunk,
    /// Never: the control run.
    None,
}

/// What the junk of [`Mode::TrailingJunk`] is: no status line, no CRLF to skip.
pub const JUNK: &[u8] = b"junk-after-the-response\r\n\r\n";

impl Mode {
    pub const MISBEHAVING: [Mode; 4] = [
        Mode::LateResponse,
        Mode::HeadBody,
        Mode::NoContentBody,
        Mode::TrailingJunk,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Mode::LateResponse => "late-response",
            Mode::HeadBody => "head-body",
            Mode::NoContentBody => "204-body",
            Mode::TrailingJunk => "trailing-junk",
            Mode::None => "none",
        }
    }

    pub fn parse(name: &str) -> Option<Mode> {
        [Mode::None]
            .into_iter()
            .chain(Mode::MISBEHAVING)
            .find(|m| m.name() == name)
    }

    /// How long after the answer the unasked-for bytes are written.
    pub fn delay(self) -> Duration {
        match self {
            Mode::LateResponse => Duration::from_millis(150),
            _ => Duration::from_millis(50),
        }
    }

    fn applies_to(self, kind: Kind) -> bool {
        match self {
            Mode::LateResponse | Mode::TrailingJunk => kind == Kind::Get,
            Mode::HeadBody => kind == Kind::Head,
            Mode::NoContentBody => kind == Kind::NoContent,
            Mode::None => false,
        }
    }
}

/// The three kinds of request the load sends, and the upstream answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `GET /api/v1/desync/T`: 200 with a body.
    Get,
    /// `HEAD /api/v1/desync/T`: 200 with a Content-Length and no body.
    Head,
    /// `GET /api/v1/desync/nocontent/T`: 204.
    NoContent,
}

impl Kind {
    /// The load's mix: GETs, and one in every 32 requests of the kind the mode needs to
    /// misbehave on (HEAD or 204). GETs only otherwise, as a HEAD taking a GET's
    /// answer would end a shift (its body stays behind, and the connection closes).
    fn of(n: usize, mode: Mode) -> Kind {
        match (mode, n % 32) {
            (Mode::HeadBody, 5) => Kind::Head,
            (Mode::NoContentBody, 5) => Kind::NoContent,
            _ => Kind::Get,
        }
    }

    fn expected_status(self) -> u16 {
        match self {
            Kind::NoContent => 204,
            _ => 200,
        }
    }
}

/// Milliseconds since the Unix epoch: one clock for the upstream and the load, even in
/// separate processes.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The body that names a request and its user.
pub fn body_for(tag: &str, user: &str) -> String {
    format!("tag={tag} user={user}\n")
}

/// (tag, user) named by a body, if it is one of ours.
fn parse_body(body: &[u8]) -> Option<(String, String)> {
    let text = std::str::from_utf8(body).ok()?.strip_suffix('\n')?;
    let (tag, user) = text.strip_prefix("tag=")?.split_once(" user=")?;
    Some((tag.to_owned(), user.to_owned()))
}

/// How long unread bytes must have waited in the proxy's receive buffer before it sent
/// a request on that connection for the reuse to count as avoidable: a proxy that looks
/// just before sending may have looked just before they came (microseconds, mostly),
/// and its thread may be preempted in between.
pub const AVOIDABLE: Duration = Duration::from_micros(250);

/// What the upstream saw of its one misbehaviour (times in Unix ms).
#[derive(Clone, Debug, Default)]
pub struct UpstreamReport {
    pub mode: &'static str,
    pub requests: usize,
    pub connections: usize,
    /// The request whose answer misbehaved, and its user.
    pub misbehaved_tag: Option<String>,
    pub misbehaved_user: Option<String>,
    pub misbehaved_ms: Option<u64>,
    /// When the unasked-for bytes were written (none: the proxy had closed it by then).
    pub late_written_ms: Option<u64>,
    pub late_write_failed: bool,
    /// Whether a request was waiting on the connection (read and not yet answered, or
    /// sent and not yet read) when the late bytes went: then they answer it, and no
    /// check of the idle connection could have caught them.
    pub late_landed_in_flight: Option<bool>,
    /// Whether the upstream was working on a request when the late bytes went (that
    /// request was read before them, so it is not among `requests_after_late`).
    pub late_while_answering: Option<bool>,
    /// Requests the misbehaving connection carried between the answer and the late
    /// bytes, and after the late bytes.
    pub requests_before_late: usize,
    pub requests_after_late: usize,
    /// Of those after the late bytes: sent by the proxy when bytes it had not read had
    /// been in its receive buffer for at least [`AVOIDABLE`] (the request came that long
    /// after the upstream's last write): a `MSG_PEEK` when the connection was taken
    /// from the pool would have seen them, so reusing it was avoidable.
    pub after_late_peekable: usize,
    /// ... sent less than [`AVOIDABLE`] after that write: the proxy may have looked
    /// just before the bytes came.
    pub after_late_raced: usize,
    /// ... sent before that write (the upstream was still working on the one before):
    /// nothing on the wire yet, so no check could have caught them.
    pub after_late_unpeekable: usize,
    /// The first 64 of those in order: `p`, `r`, `u` as above.
    pub after_late_steps: String,
    /// For the first 64 that were not `u`: how long (µs) after the upstream's last
    /// write the request came.
    pub after_late_gaps_us: Vec<u64>,
    /// When the proxy closed the misbehaving connection (none: still open).
    pub closed_ms: Option<u64>,
}

impl UpstreamReport {
    pub fn to_json(&self) -> Value {
        json!({
            "mode": self.mode,
            "requests": self.requests,
            "connections": self.connections,
            "misbehaved_tag": self.misbehaved_tag,
            "misbehaved_user": self.misbehaved_user,
            "misbehaved_ms": self.misbehaved_ms,
            "late_written_ms": self.late_written_ms,
            "late_write_failed": self.late_write_failed,
            "late_landed_in_flight": self.late_landed_in_flight,
            "late_while_answering": self.late_while_answering,
            "requests_before_late": self.requests_before_late,
            "requests_after_late": self.requests_after_late,
            "after_late_peekable": self.after_late_peekable,
            "after_late_raced": self.after_late_raced,
            "after_late_unpeekable": self.after_late_unpeekable,
            "after_late_steps": self.after_late_steps,
            "after_late_gaps_us": self.after_late_gaps_us,
            "wrong_with_exact_peeks": self.wrong_with_exact_peeks(),
            "closed_ms": self.closed_ms,
        })
    }

    /// About how many requests would have taken bytes not theirs had the proxy looked
    /// with `MSG_PEEK` before each reuse and closed the connection at the first unread
    /// byte: the one being answered when the late bytes came, and those sent on the
    /// connection before the first that found unread bytes there for a while (`p`).
    /// An estimate: such a proxy's timing differs.
    pub fn wrong_with_exact_peeks(&self) -> Option<usize> {
        self.late_written_ms?;
        let first = usize::from(self.late_while_answering == Some(true));
        let before_a_peekable = if self.after_late_peekable == 0 {
            self.after_late_raced + self.after_late_unpeekable
        } else {
            // Only the first 64 steps are kept: at least this many.
            self.after_late_steps
                .chars()
                .take_while(|c| *c != 'p')
                .count()
        };
        Some(first + before_a_peekable)
    }

    /// One line for a test's output.
    pub fn summary(&self) -> String {
        let open = match (self.late_written_ms, self.closed_ms) {
            (Some(late), Some(closed)) => {
                format!("closed {} ms after", closed as i64 - late as i64)
            }
            (Some(_), None) => "still open".to_owned(),
            (None, _) => "never sent".to_owned(),
        };
        format!(
            "late bytes {} ({}); the connection carried {} more requests ({} sent with \
             unread bytes there for {} µs or more, {} sooner, {} before they came: {}; µs \
             the bytes waited: {:?}), {open}; with exact peeks about {:?} wrong",
            if self.late_written_ms.is_some() {
                "sent"
            } else {
                "not sent"
            },
            match self.late_landed_in_flight {
                Some(true) => "a request was waiting",
                Some(false) => "the connection was idle",
                None => "-",
            },
            self.requests_after_late,
            self.after_late_peekable,
            AVOIDABLE.as_micros(),
            self.after_late_raced,
            self.after_late_unpeekable,
            self.after_late_steps,
            self.after_late_gaps_us,
            self.wrong_with_exact_peeks(),
        )
    }
}

/// How the upstream behaves.
#[derive(Clone, Copy, Debug)]
pub struct Behaviour {
    pub mode: Mode,
    /// Requests answered well before the misbehaviour.
    pub after: usize,
    /// How long each answer takes (one request at a time per connection, as a server
    /// doing some work).
    pub latency: Duration,
}

impl Behaviour {
    pub fn new(mode: Mode, after: usize, latency: Duration) -> Behaviour {
        Behaviour {
            mode,
            after,
            latency,
        }
    }
}

struct Shared {
    mode: Mode,
    after: usize,
    latency: Duration,
    requests: AtomicUsize,
    connections: AtomicUsize,
    armed: AtomicBool,
    report: Mutex<UpstreamReport>,
}

/// The misbehaving upstream; stops accepting when dropped.
pub struct MisbehavingUpstream {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    accept: tokio::task::JoinHandle<()>,
}

impl Drop for MisbehavingUpstream {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl MisbehavingUpstream {
    /// Listens on `listen` (port 0: any free port) and behaves as `behaviour` says:
    /// misbehaves once, on the first request its mode applies to after `after`.
    pub async fn start(
        behaviour: Behaviour,
        listen: SocketAddr,
    ) -> std::io::Result<MisbehavingUpstream> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let Behaviour {
            mode,
            after,
            latency,
        } = behaviour;
        let shared = Arc::new(Shared {
            mode,
            after,
            latency,
            requests: AtomicUsize::new(0),
            connections: AtomicUsize::new(0),
            armed: AtomicBool::new(true),
            report: Mutex::new(UpstreamReport {
                mode: mode.name(),
                ..UpstreamReport::default()
            }),
        });
        let serving = shared.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    // Out of descriptors or the like: not a reason to spin.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                serving.connections.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(serve(stream, serving.clone()));
            }
        });
        Ok(MisbehavingUpstream {
            addr,
            shared,
            accept,
        })
    }

    pub fn report(&self) -> UpstreamReport {
        report_of(&self.shared)
    }
}

fn report_of(shared: &Shared) -> UpstreamReport {
    let mut report = shared.report.lock().unwrap().clone();
    report.requests = shared.requests.load(Ordering::Relaxed);
    report.connections = shared.connections.load(Ordering::Relaxed);
    report
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// One request head: method, path, x-tag, x-authenticated-user, Content-Length.
struct Asked {
    method: String,
    path: String,
    tag: String,
    user: String,
    length: usize,
}

fn parse_request(head: &str) -> Option<Asked> {
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let (method, path) = (first.next()?.to_owned(), first.next()?.to_owned());
    let mut asked = Asked {
        method,
        path,
        tag: "-".to_owned(),
        user: "-".to_owned(),
        length: 0,
    };
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("x-tag") {
            asked.tag = value.to_owned();
        } else if name.eq_ignore_ascii_case("x-authenticated-user") {
            asked.user = value.to_owned();
        } else if name.eq_ignore_ascii_case("content-length") {
            asked.length = value.parse().ok()?;
        }
    }
    Some(asked)
}

/// The answer to a request of `kind`: its head and its body (not sent for a HEAD).
fn answer(kind: Kind, tag: &str, user: &str) -> (Vec<u8>, Vec<u8>) {
    let body = body_for(tag, user).into_bytes();
    let head = match kind {
        Kind::NoContent => {
            format!(
                "HTTP/1.1 204 No Content\r\nx-answer-tag: {tag}\r\nx-answer-user: {user}\r\n\r\n"
            )
        }
        Kind::Get | Kind::Head => format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\
             x-answer-tag: {tag}\r\nx-answer-user: {user}\r\n\r\n",
            body.len()
        ),
    };
    (head.into_bytes(), body)
}

/// The write side of one connection, shared by its request loop and the late bytes.
struct Writer {
    half: OwnedWriteHalf,
    /// Whether the next request had already arrived when the last write went out.
    request_waiting: bool,
    /// When the last write went out.
    last_write: Instant,
    /// A request read and not yet answered.
    in_progress: bool,
}

impl Writer {
    /// Writes `bytes`, then looks (without reading) whether a request is waiting.
    async fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.half.write_all(bytes).await?;
        self.request_waiting = waiting(self.half.as_ref());
        self.last_write = Instant::now();
        Ok(())
    }
}

/// Whether bytes are waiting in `stream`'s receive buffer: a real `MSG_PEEK`, not
/// tokio's idea of readiness.
fn waiting(stream: &TcpStream) -> bool {
    let mut byte = [std::mem::MaybeUninit::<u8>::uninit(); 1];
    matches!(socket2::SockRef::from(stream).peek(&mut byte), Ok(n) if n > 0)
}

async fn serve(stream: TcpStream, shared: Arc<Shared>) {
    let _ = stream.set_nodelay(true);
    let (mut read, half) = stream.into_split();
    let writer = Arc::new(tokio::sync::Mutex::new(Writer {
        half,
        request_waiting: false,
        last_write: Instant::now(),
        in_progress: false,
    }));
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    let mut misbehaving = false;
    'requests: loop {
        let end = loop {
            if let Some(i) = find(&buf, b"\r\n\r\n") {
                break i + 4;
            }
            if buf.len() > 64 * 1024 {
                break 'requests;
            }
            match read.read(&mut chunk).await {
                Ok(0) | Err(_) => break 'requests,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let arrived = Instant::now();
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        buf.drain(..end);
        let Some(asked) = parse_request(&head) else {
            break;
        };
        // A body (none is expected) is read past.
        while buf.len() < asked.length {
            match read.read(&mut chunk).await {
                Ok(0) | Err(_) => break 'requests,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        buf.drain(..asked.length);
        if asked.path == "/__desync/report" {
            let body = report_of(&shared).to_json().to_string();
            let answer = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                 content-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = writer.lock().await.write(answer.as_bytes()).await;
            break;
        }
        let kind = if asked.method == "HEAD" {
            Kind::Head
        } else if asked.path.contains("/nocontent/") {
            Kind::NoContent
        } else {
            Kind::Get
        };
        let n = shared.requests.fetch_add(1, Ordering::Relaxed) + 1;
        {
            let mut writer = writer.lock().await;
            writer.in_progress = true;
            if misbehaving {
                let mut report = shared.report.lock().unwrap();
                if report.late_written_ms.is_some() {
                    report.requests_after_late += 1;
                    let step = if writer.request_waiting {
                        report.after_late_unpeekable += 1;
                        'u'
                    } else {
                        let gap = arrived.saturating_duration_since(writer.last_write);
                        if report.after_late_gaps_us.len() < 64 {
                            report.after_late_gaps_us.push(gap.as_micros() as u64);
                        }
                        if gap >= AVOIDABLE {
                            report.after_late_peekable += 1;
                            'p'
                        } else {
                            report.after_late_raced += 1;
                            'r'
                        }
                    };
                    if report.after_late_steps.len() < 64 {
                        report.after_late_steps.push(step);
                    }
                } else {
                    report.requests_before_late += 1;
                }
            }
        }
        if !shared.latency.is_zero() {
            tokio::time::sleep(shared.latency).await;
        }
        let (head, body) = answer(kind, &asked.tag, &asked.user);
        let mut whole = head;
        if kind == Kind::Get {
            whole.extend_from_slice(&body);
        }
        {
            let mut writer = writer.lock().await;
            writer.in_progress = false;
            if writer.write(&whole).await.is_err() {
                break;
            }
        }
        let now = n > shared.after
            && shared.mode.applies_to(kind)
            && shared.armed.swap(false, Ordering::SeqCst);
        if now {
            misbehaving = true;
            {
                let mut report = shared.report.lock().unwrap();
                report.misbehaved_tag = Some(asked.tag.clone());
                report.misbehaved_user = Some(asked.user.clone());
                report.misbehaved_ms = Some(unix_ms());
            }
            let late = match shared.mode {
                Mode::LateResponse => whole,
                // The body a HEAD or a 204 must not have: what a GET would have got.
                Mode::HeadBody | Mode::NoContentBody => body,
                Mode::TrailingJunk | Mode::None => JUNK.to_vec(),
            };
            let (writer, shared) = (writer.clone(), shared.clone());
            tokio::spawn(async move {
                tokio::time::sleep(shared.mode.delay()).await;
                let mut writer = writer.lock().await;
                let answering = writer.in_progress;
                let in_flight = answering || waiting(writer.half.as_ref());
                let written = writer.write(&late).await.is_ok();
                let mut report = shared.report.lock().unwrap();
                if written {
                    report.late_written_ms = Some(unix_ms());
                    report.late_landed_in_flight = Some(in_flight);
                    report.late_while_answering = Some(answering);
                } else {
                    report.late_write_failed = true;
                }
            });
        }
    }
    if misbehaving {
        shared.report.lock().unwrap().closed_ms = Some(unix_ms());
    }
}

/// Who sends requests: a user name, and the bearer token to present for it (none: the
/// name goes to the proxy as `x-authenticated-user` itself, for a proxy without auth).
#[derive(Clone, Debug)]
pub struct Principal {
    pub name: String,
    pub token: Option<String>,
}

/// The load: `concurrency` workers, each on one keep-alive HTTP/1.1 connection of its
/// own, each its own principal in turn, sending tagged requests until `max_requests`
/// have been sent or `max_time` has passed.
#[derive(Clone, Debug)]
pub struct Load {
    /// `https://host:port`.
    pub base: String,
    /// The upstream's misbehaviour, for the mix of requests it needs.
    pub mode: Mode,
    pub principals: Vec<Principal>,
    pub concurrency: usize,
    pub max_requests: usize,
    pub max_time: Duration,
    pub request_timeout: Duration,
    /// The certificate to trust (PEM); none: trust any (a benchmark on loopback).
    pub ca_pem: Option<String>,
}

/// One answer that named another request.
#[derive(Clone, Debug)]
pub struct Wrong {
    pub at_ms: u64,
    pub asked_tag: String,
    pub asked_user: String,
    pub got_tag: String,
    pub got_user: String,
    pub status: u16,
}

/// What the load saw.
#[derive(Clone, Debug, Default)]
pub struct Tally {
    pub requests: usize,
    /// Answers naming their own request.
    pub right: usize,
    /// Answers naming another request.
    pub wrong: usize,
    /// Answers naming another user (wrong ones, all of them).
    pub cross_user: usize,
    /// No answer from the upstream: the proxy's own error, a timeout, a broken body.
    pub failed: usize,
    pub failures: BTreeMap<String, usize>,
    /// Every wrong answer, in order of arrival.
    pub wrongs: Vec<Wrong>,
    pub started_ms: u64,
    pub elapsed: Duration,
}

impl Tally {
    pub fn to_json(&self) -> Value {
        let first = self.wrongs.iter().map(|w| w.at_ms).min();
        let last = self.wrongs.iter().map(|w| w.at_ms).max();
        json!({
            "requests": self.requests,
            "right": self.right,
            "wrong": self.wrong,
            "cross_user": self.cross_user,
            "failed": self.failed,
            "failures": self.failures,
            "first_wrong_ms": first,
            "last_wrong_ms": last,
            "started_ms": self.started_ms,
            "elapsed_s": self.elapsed.as_secs_f64(),
            "wrong_samples": self.wrongs.iter().take(8).map(|w| json!({
                "at_ms": w.at_ms, "asked": w.asked_tag, "asked_user": w.asked_user,
                "got": w.got_tag, "got_user": w.got_user, "status": w.status,
            })).collect::<Vec<_>>(),
        })
    }

    /// One line for a test's output.
    pub fn summary(&self) -> String {
        format!(
            "{} requests in {:.2} s: {} right, {} wrong ({} cross-user), {} failed {:?}",
            self.requests,
            self.elapsed.as_secs_f64(),
            self.right,
            self.wrong,
            self.cross_user,
            self.failed,
            self.failures
        )
    }
}

enum Outcome {
    Right,
    Wrong(Wrong),
    Failed(String),
}

/// Runs the load; returns when it is done, and within `max_time + request_timeout`
/// (plus a little) in any case.
pub async fn run(load: &Load) -> Tally {
    let run_id = format!(
        "{:08x}",
        (unix_ms() ^ std::process::id() as u64) & 0xffff_ffff
    );
    let started = Instant::now();
    let tally = Arc::new(Mutex::new(Tally {
        started_ms: unix_ms(),
        ..Tally::default()
    }));
    let issued = Arc::new(AtomicUsize::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for worker in 0..load.concurrency.max(1) {
        let principal = load.principals[worker % load.principals.len()].clone();
        let (load, tally, issued, run_id) =
            (load.clone(), tally.clone(), issued.clone(), run_id.clone());
        workers.spawn(async move {
            let client = client(&load);
            loop {
                if started.elapsed() >= load.max_time {
                    break;
                }
                let n = issued.fetch_add(1, Ordering::Relaxed);
                if n >= load.max_requests {
                    break;
                }
                let tag = format!("{run_id}-{n}");
                let outcome = one(
                    &client,
                    &load.base,
                    &principal,
                    Kind::of(n, load.mode),
                    &tag,
                )
                .await;
                let mut tally = tally.lock().unwrap();
                tally.requests += 1;
                match outcome {
                    Outcome::Right => tally.right += 1,
                    Outcome::Wrong(wrong) => {
                        tally.wrong += 1;
                        if wrong.got_user != wrong.asked_user {
                            tally.cross_user += 1;
                        }
                        tally.wrongs.push(wrong);
                    }
                    Outcome::Failed(why) => {
                        tally.failed += 1;
                        *tally.failures.entry(why).or_default() += 1;
                    }
                }
            }
        });
    }
    let deadline = load.max_time + load.request_timeout + Duration::from_secs(2);
    let _ = tokio::time::timeout(deadline, async {
        while workers.join_next().await.is_some() {}
    })
    .await;
    workers.abort_all();
    let mut tally = tally.lock().unwrap().clone();
    tally.elapsed = started.elapsed();
    tally
}

fn client(load: &Load) -> reqwest::Client {
    let builder = reqwest::Client::builder()
        .use_rustls_tls()
        .http1_only()
        .pool_max_idle_per_host(1)
        .timeout(load.request_timeout);
    let builder = match &load.ca_pem {
        Some(pem) => builder
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(pem.as_bytes()).unwrap()),
        None => builder.danger_accept_invalid_certs(true),
    };
    builder.build().unwrap()
}

async fn one(
    client: &reqwest::Client,
    base: &str,
    principal: &Principal,
    kind: Kind,
    tag: &str,
) -> Outcome {
    let (method, path) = match kind {
        Kind::Get => (reqwest::Method::GET, format!("/api/v1/desync/{tag}")),
        Kind::Head => (reqwest::Method::HEAD, format!("/api/v1/desync/{tag}")),
        Kind::NoContent => (
            reqwest::Method::GET,
            format!("/api/v1/desync/nocontent/{tag}"),
        ),
    };
    let mut request = client
        .request(method, format!("{base}{path}"))
        .header("x-tag", tag);
    request = match &principal.token {
        Some(token) => request.bearer_auth(token),
        None => request.header("x-authenticated-user", &principal.name),
    };
    let response = match request.send().await {
        Ok(response) => response,
        Err(e) if e.is_timeout() => return Outcome::Failed("timeout".into()),
        Err(e) if e.is_connect() => return Outcome::Failed("connect".into()),
        Err(_) => return Outcome::Failed("request error".into()),
    };
    let status = response.status().as_u16();
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let (head_tag, head_user) = (header("x-answer-tag"), header("x-answer-user"));
    let body = match response.bytes().await {
        Ok(body) => body,
        Err(e) if e.is_timeout() => return Outcome::Failed("timeout (body)".into()),
        Err(_) => return Outcome::Failed("body error".into()),
    };
    let from_body = parse_body(&body);
    let (got_tag, got_user) = match (head_tag, head_user, &from_body) {
        (Some(t), Some(u), Some((bt, bu))) if (bt, bu) != (&t, &u) => {
            // A head from one answer and a body from another: the head's request
            // unless it is this one.
            if t == tag {
                (bt.clone(), bu.clone())
            } else {
                (t, u)
            }
        }
        (Some(t), Some(u), _) => (t, u),
        (_, _, Some((t, u))) => (t.clone(), u.clone()),
        _ => return Outcome::Failed(format!("status {status}")),
    };
    if got_tag != tag {
        return Outcome::Wrong(Wrong {
            at_ms: unix_ms(),
            asked_tag: tag.to_owned(),
            asked_user: principal.name.clone(),
            got_tag,
            got_user,
            status,
        });
    }
    if got_user != principal.name {
        // Its own tag with another user's name: the proxy added the wrong identity.
        return Outcome::Wrong(Wrong {
            at_ms: unix_ms(),
            asked_tag: tag.to_owned(),
            asked_user: principal.name.clone(),
            got_tag,
            got_user,
            status,
        });
    }
    if kind == Kind::Get && from_body.is_none() {
        return Outcome::Failed(format!("status {status}, body not an answer"));
    }
    if status != kind.expected_status() {
        return Outcome::Failed(format!("status {status} for its own answer"));
    }
    Outcome::Right
}

/// Fetches the report of the misbehaving upstream at `addr` over plain HTTP/1.1.
pub async fn fetch_report(addr: SocketAddr) -> std::io::Result<Value> {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await?;
        stream
            .write_all(b"GET /__desync/report HTTP/1.1\r\nhost: upstream\r\n\r\n")
            .await?;
        let mut all = Vec::new();
        stream.read_to_end(&mut all).await?;
        let start = find(&all, b"\r\n\r\n").map_or(all.len(), |i| i + 4);
        serde_json::from_slice(&all[start..])
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    };
    tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .unwrap_or_else(|_| {
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the upstream's report",
            ))
        })
}
