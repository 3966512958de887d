//! The gateway's upstream connection pool, seen from a real upstream: keep-alive
//! connections are reused and carry the upstream's own `Host`, a response read only in
//! part costs its connection and nothing else, a connection the upstream closes is
//! replaced unnoticed, and idle connections close after `[upstream] pool_idle_timeout`
//! and beyond `pool_max_idle_per_host`, a connection answered before its request body
//! was all sent never returns to the pool, trailers end a body like any other end, a timed-out request's
//! connection closes, and a reused connection that dies unanswered costs idempotent
//! requests nothing.

mod common;
use common::wire::{read_head, OK};
use common::*;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// An upstream that notes which connection (the gateway's source port) and `Host` each
/// request came with, and counts connections opened and closed.
struct Recording {
    addr: SocketAddr,
    requests: Arc<Mutex<Vec<(u16, String)>>>,
    opened: Arc<AtomicUsize>,
    closed: Arc<AtomicUsize>,
    _task: Task,
}

async fn answer(request: Request<Incoming>) -> Response<Full<Bytes>> {
    match request.uri().path() {
        "/api/v1/big" => Response::new(Full::new(Bytes::from(pattern(4 << 20)))),
        "/api/v1/slow" => {
            tokio::time::sleep(Duration::from_millis(300)).await;
            Response::new(Full::new(Bytes::from_static(b"ok")))
        }
        "/api/v1/close" => Response::builder()
            .header("connection", "close")
            .body(Full::new(Bytes::from_static(b"bye")))
            .unwrap(),
        _ => Response::new(Full::new(Bytes::from_static(b"ok"))),
    }
}

impl Recording {
    async fn start() -> Recording {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests: Arc<Mutex<Vec<(u16, String)>>> = Arc::default();
        let (opened, closed) = (Arc::<AtomicUsize>::default(), Arc::<AtomicUsize>::default());
        let (log, open, close) = (requests.clone(), opened.clone(), closed.clone());
        let task = accept_loop(listener, move |stream| {
            let (log, close) = (log.clone(), close.clone());
            open.fetch_add(1, Ordering::SeqCst);
            async move {
                let port = stream.peer_addr().unwrap().port();
                let service = service_fn(move |request: Request<Incoming>| {
                    let host = header_text(request.headers().get("host"));
                    log.lock().unwrap().push((port, host));
                    async move { Ok::<_, Infallible>(answer(request).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
                close.fetch_add(1, Ordering::SeqCst);
            }
        });
        Recording {
            addr,
            requests,
            opened,
            closed,
            _task: task,
        }
    }

    fn connections_used(&self) -> Vec<u16> {
        let mut ports: Vec<u16> = self.requests.lock().unwrap().iter().map(|r| r.0).collect();
        ports.dedup();
        ports
    }

    async fn wait_closed(&self, n: usize, within: Duration) {
        let start = Instant::now();
        while self.closed.load(Ordering::SeqCst) < n {
            assert!(
                start.elapsed() < within,
                "{} of {n} upstream connections closed after {within:?}",
                self.closed.load(Ordering::SeqCst)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn header_text(value: Option<&http::HeaderValue>) -> String {
    value.map_or("<none>".into(), |v| v.to_str().unwrap().to_owned())
}

async fn gateway_before(upstream: SocketAddr, sections: &str) -> TestGateway {
    let text = config_text(upstream, sections, "");
    TestGateway::start_text(Upstream::start().await, &text).await
}

async fn get(gw: &TestGateway, token: &str, path: &str) -> reqwest::Response {
    gw.bearer_get(&gw.http1, path, token).await
}

/// An upstream that serves each connection with `serve`; its address and the count of
/// connections it has accepted.
async fn counting_upstream<F, Fut>(serve: F) -> (SocketAddr, Arc<AtomicUsize>, Task)
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let opened = Arc::new(AtomicUsize::new(0));
    let counter = opened.clone();
    let task = accept_loop(listener, move |stream| {
        counter.fetch_add(1, Ordering::SeqCst);
        serve(stream)
    });
    (addr, opened, task)
}

#[tokio::test]
async fn sequential_requests_share_one_upstream_connection_with_its_own_host() {
    let up = Recording::start().await;
    let gw = gateway_before(up.addr, "").await;
    let token = gw.alex_token().await;
    for _ in 0..10 {
        let response = get(&gw, &token, "/api/v1/x").await;
        assert_eq!(response.status(), 200);
        assert_eq!(response.text().await.unwrap(), "ok");
    }
    assert_eq!(up.connections_used().len(), 1, "{:?}", up.requests);
    assert_eq!(up.opened.load(Ordering::SeqCst), 1);
    let host = up.addr.to_string();
    assert!(
        up.requests.lock().unwrap().iter().all(|(_, h)| *h == host),
        "every request carries Host {host}: {:?}",
        up.requests
    );
}

#[tokio::test]
async fn a_response_read_in_part_costs_its_connection_and_nothing_else() {
    let up = Recording::start().await;
    let gw = gateway_before(up.addr, "").await;
    let token = gw.alex_token().await;
    let mut response = get(&gw, &token, "/api/v1/big").await;
    assert_eq!(response.status(), 200);
    assert!(!response.chunk().await.unwrap().unwrap().is_empty());
    drop(response);
    // The rest of the 4 MiB answer was still on that connection: it must close rather
    // than serve the next request.
    up.wait_closed(1, Duration::from_secs(10)).await;

    let response = get(&gw, &token, "/api/v1/x").await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "ok");
    assert_eq!(up.opened.load(Ordering::SeqCst), 2);

    // Read to the end, the big answer leaves its connection for the next request.
    let response = get(&gw, &token, "/api/v1/big").await;
    assert_eq!(response.bytes().await.unwrap(), pattern(4 << 20));
    assert_eq!(get(&gw, &token, "/api/v1/x").await.status(), 200);
    assert_eq!(up.opened.load(Ordering::SeqCst), 2, "{:?}", up.requests);
}

#[tokio::test]
async fn a_connection_the_upstream_closes_is_replaced_unnoticed() {
    let up = Recording::start().await;
    let gw = gateway_before(up.addr, "").await;
    let token = gw.alex_token().await;
    for _ in 0..3 {
        let response = get(&gw, &token, "/api/v1/close").await;
        assert_eq!(response.status(), 200);
        assert_eq!(response.text().await.unwrap(), "bye");
        let response = get(&gw, &token, "/api/v1/x").await;
        assert_eq!(response.status(), 200);
        assert_eq!(response.text().await.unwrap(), "ok");
    }
    // Each `Connection: close` ends its connection; the request after it needs a new one.
    assert_eq!(up.opened.load(Ordering::SeqCst), 4, "{:?}", up.requests);
}

#[tokio::test]
async fn an_idle_connection_the_upstream_drops_silently_is_replaced() {
    // An upstream with a short keep-alive timeout of its own: it answers one request
    // per connection and then closes it after a moment, without saying so.
    let (addr, opened, _task) = counting_upstream(|mut stream| async move {
        if read_head(&mut stream, &mut Vec::new()).await.is_none() {
            return;
        }
        let _ = stream.write_all(OK).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    })
    .await;
    let gw = gateway_before(addr, "").await;
    let token = gw.alex_token().await;
    for round in 0..3 {
        let response = get(&gw, &token, "/api/v1/x").await;
        assert_eq!(response.status(), 200, "round {round}");
        assert_eq!(response.text().await.unwrap(), "ok");
        // Time for the close to reach the gateway before the next request.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(opened.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn idle_connections_close_after_pool_idle_timeout() {
    let up = Recording::start().await;
    let gw = gateway_before(up.addr, "[upstream]\npool_idle_timeout = \"1s\"\n").await;
    let token = gw.alex_token().await;
    let started = Instant::now();
    assert_eq!(get(&gw, &token, "/api/v1/x").await.status(), 200);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        up.closed.load(Ordering::SeqCst),
        0,
        "closed before its time"
    );
    up.wait_closed(1, Duration::from_secs(5)).await;
    assert!(started.elapsed() >= Duration::from_secs(1));

    // The next request simply opens a new connection.
    assert_eq!(get(&gw, &token, "/api/v1/x").await.status(), 200);
    assert_eq!(up.opened.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn no_more_idle_connections_are_kept_than_pool_max_idle_per_host() {
    let up = Recording::start().await;
    let gw = gateway_before(up.addr, "[upstream]\npool_max_idle_per_host = 1\n").await;
    let token = gw.alex_token().await;
    // Three at once need three connections...
    let (a, b, c) = tokio::join!(
        get(&gw, &token, "/api/v1/slow"),
        get(&gw, &token, "/api/v1/slow"),
        get(&gw, &token, "/api/v1/slow"),
    );
    for response in [a, b, c] {
        assert_eq!(response.status(), 200);
        assert_eq!(response.text().await.unwrap(), "ok");
    }
    assert_eq!(up.opened.load(Ordering::SeqCst), 3);
    // ...of which one stays open for the next request and two close.
    up.wait_closed(2, Duration::from_secs(5)).await;
    assert_eq!(get(&gw, &token, "/api/v1/x").await.status(), 200);
    assert_eq!(up.opened.load(Ordering::SeqCst), 3);
    assert_eq!(up.closed.load(Ordering::SeqCst), 2);
}

/// A connection whose upstream answers much sooner than it did the two times before
/// rests in its pool (twice the difference, at most 250 ms), so that an answer the
/// upstream still owes from an earlier exchange (it sent one too many, late) arrives
/// while nobody waits on the connection, and is seen (tests/pool_desync.rs). Meanwhile
/// requests take other connections; answers in their usual time rest not at all.
#[tokio::test]
async fn a_connection_rests_in_the_pool_after_an_answer_much_sooner_than_usual() {
    let up = Recording::start().await;
    let gw = gateway_before(up.addr, "").await;
    let token = gw.alex_token().await;
    // Two answers in 300 ms, one after the other, on one connection: no rest between.
    assert_eq!(get(&gw, &token, "/api/v1/slow").await.status(), 200);
    assert_eq!(get(&gw, &token, "/api/v1/slow").await.status(), 200);
    assert_eq!(up.opened.load(Ordering::SeqCst), 1);
    // Then one at once: now the connection rests, so the next request opens a second.
    assert_eq!(get(&gw, &token, "/api/v1/x").await.status(), 200);
    assert_eq!(get(&gw, &token, "/api/v1/x").await.status(), 200);
    assert_eq!(up.opened.load(Ordering::SeqCst), 2);
    // After the rest both are reused.
    tokio::time::sleep(Duration::from_millis(350)).await;
    for _ in 0..4 {
        assert_eq!(get(&gw, &token, "/api/v1/x").await.status(), 200);
    }
    assert_eq!(up.opened.load(Ordering::SeqCst), 2);
    let ports: std::collections::HashSet<u16> = up
        .requests
        .lock()
        .unwrap()
        .iter()
        .map(|(port, _)| *port)
        .collect();
    assert_eq!(ports.len(), 2);
}

/// A raw HTTP/1.1 upstream: for each request head, `answer(head)` is written back, and
/// `then(head)` says whether to read on (`true`) or to swallow the rest of the
/// connection's bytes and close (`false`). Counts connections opened and closed.
fn raw_upstream(
    listener: TcpListener,
    answer: fn(&str) -> &'static [u8],
    keep_serving: fn(&str) -> bool,
) -> (Arc<AtomicUsize>, Arc<AtomicUsize>, Task) {
    let (opened, closed) = (Arc::<AtomicUsize>::default(), Arc::<AtomicUsize>::default());
    let (open, close) = (opened.clone(), closed.clone());
    let task = accept_loop(listener, move |mut stream| {
        open.fetch_add(1, Ordering::SeqCst);
        let close = close.clone();
        async move {
            let mut buf = Vec::new();
            while let Some(head) = read_head(&mut stream, &mut buf).await {
                let _ = stream.write_all(answer(&head)).await;
                if !keep_serving(&head) {
                    let mut sink = [0u8; 4096];
                    while let Ok(n) = stream.read(&mut sink).await {
                        if n == 0 {
                            break;
                        }
                    }
                    break;
                }
            }
            close.fetch_add(1, Ordering::SeqCst);
        }
    });
    (opened, closed, task)
}

#[tokio::test]
async fn a_connection_answered_before_its_body_was_sent_never_returns_to_the_pool() {
    // The upstream answers each POST at once, before reading its body, then reads the
    // body to its end: the gateway keeps sending it after the response is complete,
    // outside the pool, and then closes the connection: an upstream that answered
    // early may not read the body as a body, and must not get another request after it.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (opened, closed, _task) = raw_upstream(listener, |_| OK, |head| !head.starts_with("POST"));
    // Six such connections in the pool, each holding a request up to 250 ms, would
    // push a GET past this deadline.
    let gw = gateway_before(addr, "[upstream]\nresponse_timeout = \"1s\"\n").await;
    let token = gw.alex_token().await;
    let uploads: Vec<_> = (0..6)
        .map(|_| {
            // Ten bytes every 100 ms for 1 s.
            let trickle = futures_util::stream::unfold(0, |i| async move {
                if i == 10 {
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                Some((Ok::<_, std::io::Error>(Bytes::from(vec![b'x'; 10])), i + 1))
            });
            let request = gw
                .http1
                .post(gw.url("/api/v1/upload"))
                .bearer_auth(&token)
                .body(reqwest::Body::wrap_stream(trickle));
            tokio::spawn(async move {
                let response = request.send().await.unwrap();
                (response.status().as_u16(), response.text().await.unwrap())
            })
        })
        .collect();
    for upload in uploads {
        let answer = tokio::time::timeout(Duration::from_millis(900), upload)
            .await
            .expect("the early answer arrives while the body is still being sent")
            .unwrap();
        assert_eq!(answer, (200, "ok".to_owned()));
    }
    let response = get(&gw, &token, "/api/v1/x").await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "ok");
    // Once the bodies are all sent, their connections close, and the next request
    // takes the GET's connection, not one of theirs.
    let deadline = Instant::now() + Duration::from_secs(5);
    while closed.load(Ordering::SeqCst) < 6 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(closed.load(Ordering::SeqCst), 6);
    assert_eq!(get(&gw, &token, "/api/v1/x").await.status(), 200);
    assert_eq!(opened.load(Ordering::SeqCst), 7);
}

#[tokio::test]
async fn an_error_answered_before_the_body_stops_the_upload() {
    // The upstream answers 413 at once and then counts what still arrives: the rest of
    // a body it refused is not sent, and the connection closes.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let after_answer = Arc::new(AtomicUsize::new(usize::MAX));
    let counted = after_answer.clone();
    let _task = accept_loop(listener, move |mut stream| {
        let counted = counted.clone();
        async move {
            let mut buf = Vec::new();
            if read_head(&mut stream, &mut buf).await.is_none() {
                return;
            }
            let mut rest = buf.len();
            let refusal = b"HTTP/1.1 413 Content Too Large\r\ncontent-length: 0\r\n\r\n";
            stream.write_all(refusal).await.unwrap();
            let mut sink = [0u8; 4096];
            while let Ok(n) = stream.read(&mut sink).await {
                if n == 0 {
                    break;
                }
                rest += n;
            }
            counted.store(rest, Ordering::SeqCst);
        }
    });
    let gw = gateway_before(addr, "").await;
    let token = gw.alex_token().await;
    // A hundred bytes every 50 ms for 2 s: 4,000 in all.
    let trickle = futures_util::stream::unfold(0, |i| async move {
        if i == 40 {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        Some((Ok::<_, std::io::Error>(Bytes::from(vec![b'x'; 100])), i + 1))
    });
    let response = gw
        .http1
        .post(gw.url("/api/v1/upload"))
        .bearer_auth(&token)
        .body(reqwest::Body::wrap_stream(trickle))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    let deadline = Instant::now() + Duration::from_secs(5);
    while after_answer.load(Ordering::SeqCst) == usize::MAX && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let received = after_answer.load(Ordering::SeqCst);
    assert!(
        received < 4000,
        "the upstream received {received} body bytes"
    );
}

#[tokio::test]
async fn a_response_with_trailers_keeps_its_connection() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (opened, _closed, _task) = raw_upstream(
        listener,
        |_| {
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: x-checksum\r\n\r\n\
              2\r\nok\r\n0\r\nx-checksum: 1\r\n\r\n"
        },
        |_| true,
    );
    let gw = gateway_before(addr, "").await;
    let token = gw.alex_token().await;
    // hyper's servers, HTTP/1.1 and HTTP/2 alike, stop reading a body at its trailers.
    for client in [&gw.http1, &gw.http2, &gw.http1, &gw.http2] {
        let response = gw.bearer_get(client, "/api/v1/x", &token).await;
        assert_eq!(response.status(), 200);
        assert_eq!(response.text().await.unwrap(), "ok");
    }
    assert_eq!(opened.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_timed_out_request_closes_its_connection() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // Answers /api/v1/x; never answers /api/v1/hang.
    let (opened, closed, _task) = raw_upstream(
        listener,
        |head| if head.contains("/hang") { b"" } else { OK },
        |head| !head.contains("/hang"),
    );
    let gw = gateway_before(addr, "[upstream]\nresponse_timeout = \"500ms\"\n").await;
    let token = gw.alex_token().await;
    assert_eq!(get(&gw, &token, "/api/v1/x").await.status(), 200);
    expect_error(
        get(&gw, &token, "/api/v1/hang").await,
        504,
        "gateway_timeout",
    )
    .await;
    // Half an exchange is still on that connection: it must close, not serve again.
    let start = Instant::now();
    while closed.load(Ordering::SeqCst) < 1 {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the timed-out connection stays open"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(get(&gw, &token, "/api/v1/x").await.status(), 200);
    assert_eq!(opened.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_kept_alive_connection_closed_unanswered_is_retried_only_for_idempotent_requests() {
    // Each connection answers its first request and then, at the second, closes without
    // a word: what an upstream whose keep-alive timeout runs out just as the gateway
    // reuses its connection looks like from the gateway.
    let (addr, opened, _task) = counting_upstream(|mut stream| async move {
        let mut buf = Vec::new();
        if read_head(&mut stream, &mut buf).await.is_some() {
            let _ = stream.write_all(OK).await;
        }
        // The second head is read, and the connection dropped unanswered.
        let _ = read_head(&mut stream, &mut buf).await;
    })
    .await;
    let gw = gateway_before(addr, "").await;
    let token = gw.alex_token().await;
    let send = |method: reqwest::Method| {
        gw.http1
            .request(method, gw.url("/api/v1/x"))
            .bearer_auth(&token)
            .send()
    };

    // GET: the second request dies with its connection and goes again on a new one.
    assert_eq!(send(reqwest::Method::GET).await.unwrap().status(), 200);
    assert_eq!(opened.load(Ordering::SeqCst), 1);
    let response = send(reqwest::Method::GET).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "ok");
    assert_eq!(
        opened.load(Ordering::SeqCst),
        2,
        "retried on a new connection"
    );

    // DELETE is idempotent too. The connection the retry opened has served one request.
    assert_eq!(send(reqwest::Method::DELETE).await.unwrap().status(), 200);
    assert_eq!(opened.load(Ordering::SeqCst), 3);

    // POST is not: the upstream may have acted on it, so the client hears of the failure.
    assert_eq!(send(reqwest::Method::GET).await.unwrap().status(), 200);
    assert_eq!(opened.load(Ordering::SeqCst), 4);
    let response = send(reqwest::Method::POST).await.unwrap();
    expect_error(response, 502, "bad_gateway").await;
    assert_eq!(opened.load(Ordering::SeqCst), 4, "no retry");
}
