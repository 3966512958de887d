//! A request body still going up after the upstream has answered (the upload then runs
//! in a task of its own, `Upload::finish`) never outlives its exchange: a response body
//! dropped early closes the upstream connection, and an upstream that stops reading is
//! given up after `response_timeout` without progress. A second review of the codec
//! found both broken (the task was detached and unbounded, holding the socket through
//! its write half); the comment on each test says how it failed. Helpers shared with
//! tests/upstream_edges.rs are in tests/common/wire.rs.

mod common;
use common::wire::{
    content_length, find, gateway_for, read_head, small_buffer_client, tuned_listener, upload_head,
    within, OK,
};
use common::*;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::client::TlsStream;

/// A listener whose accepted sockets have 4 KiB buffers, so an upstream that stops
/// reading (or writing) fills the path after a few kilobytes on its side.
fn small_buffer_listener() -> TcpListener {
    tuned_listener(|socket| {
        socket.set_recv_buffer_size(4096)?;
        socket.set_send_buffer_size(4096)
    })
}

/// Waits until `counter` has not moved for half a second (the path is full), at most
/// `secs`; returns its value.
async fn until_stalled(counter: &AtomicUsize, secs: u64) -> usize {
    let started = Instant::now();
    let mut last = counter.load(Ordering::SeqCst);
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = counter.load(Ordering::SeqCst);
        if now == last || started.elapsed() > Duration::from_secs(secs) {
            return now;
        }
        last = now;
    }
}

/// Waits up to `secs` for `flag`; returns how long it took, or `None`.
async fn wait_for(flag: &AtomicBool, secs: u64) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(secs) {
        if flag.load(Ordering::SeqCst) {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// A client's upload through the gateway: a small-buffer TLS connection that has sent
/// the head of a POST and sends its body from a task of its own (which keeps the write
/// half, so the connection stays open once the body is out).
struct Upload {
    read: ReadHalf<TlsStream<TcpStream>>,
    writer: JoinHandle<WriteHalf<TlsStream<TcpStream>>>,
}

impl Upload {
    /// Sends the head of a `size`-byte `POST path` through `gw` with `token`, then starts
    /// on the body.
    async fn start(gw: &TestGateway, token: &str, path: &str, size: usize) -> Upload {
        let tls = small_buffer_client(gw).await;
        let (read, mut write) = tokio::io::split(tls);
        let head = upload_head(gw, token, path, size, false);
        write.write_all(head.as_bytes()).await.unwrap();
        let writer = tokio::spawn(async move {
            let body = pattern(size);
            let _ = write.write_all(&body).await;
            write
        });
        Upload { read, writer }
    }

    /// The response as read until `enough` says so or the connection ends, within 10 s.
    async fn read_until(&mut self, enough: impl Fn(&[u8]) -> bool) -> Vec<u8> {
        let mut response = Vec::new();
        within(10, async {
            let mut chunk = [0u8; 1024];
            while !enough(&response) {
                match self.read.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => response.extend_from_slice(&chunk[..n]),
                }
            }
        })
        .await;
        response
    }

    /// The client gives up: it stops sending and closes its connection.
    async fn abandon(self) {
        self.writer.abort();
        let _ = self.writer.await;
        drop(self.read);
    }
}

// ---------------------------------------------------------------------------------
// 1. A response body dropped before its end no longer closes the upstream connection.
//
// `ResponseBody` says "Dropped before its end, it closes the connection", and before
// the split it did (it owned the `Conn`). With `Link::Split` the drop only drops the
// read half and detaches the upload's `JoinHandle` (a dropped JoinHandle does not abort
// its task): the task keeps the write half, and with it the socket, open. If that
// task is blocked writing, nothing ever ends it.
//
// An ordinary echo upstream (answers at once, then reads a piece and writes it back,
// one after the other) and a client that sends before it reads fill the path; this is
// the client's doing, and any proxy would stall. The client then gives up and closes.
// hyper drops the response body; the upstream, blocked writing the echo into a socket
// the gateway no longer reads, and the gateway's upload task, blocked writing the body
// into an upstream that no longer reads, now wait on each other for ever: the upstream
// connection (and the task, and the chunk it holds) never go. Before this commit the
// drop closed the connection and the upstream got a reset at once.

#[tokio::test]
async fn a_response_body_dropped_early_closes_the_upstream_connection() {
    const SIZE: usize = 64 << 20;
    let echoed = Arc::new(AtomicUsize::new(0));
    let gone = Arc::new(AtomicBool::new(false));
    let listener = small_buffer_listener();
    let addr = listener.local_addr().unwrap();
    let (count, flag) = (echoed.clone(), gone.clone());
    let _task = accept_loop(listener, move |mut stream| {
        let (echoed, gone) = (count.clone(), flag.clone());
        async move {
            let mut buf = Vec::new();
            if let Some(head) = read_head(&mut stream, &mut buf).await {
                let length = content_length(&head);
                let answer = format!("HTTP/1.1 200 OK\r\ncontent-length: {length}\r\n\r\n");
                let mut done = 0;
                let mut ok = stream.write_all(answer.as_bytes()).await.is_ok()
                    && stream.write_all(&buf).await.is_ok();
                done += buf.len();
                let mut chunk = vec![0u8; 16 * 1024];
                while ok && done < length {
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => ok = false,
                        Ok(n) => {
                            ok = stream.write_all(&chunk[..n]).await.is_ok();
                            done += n;
                            echoed.store(done, Ordering::SeqCst);
                        }
                    }
                }
                if done >= length {
                    // Not expected: the client never sends it all.
                    return;
                }
            }
            gone.store(true, Ordering::SeqCst);
        }
    });
    let (gw, token) = gateway_for(addr, "", "").await;

    let mut upload = Upload::start(&gw, &token, "/api/v1/echo", SIZE).await;
    // The 200 head comes at once; the client reads no further.
    let response = upload.read_until(|r| find(r, b"\r\n\r\n").is_some()).await;
    assert!(
        response.starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&response)
    );
    let stalled_at = until_stalled(&echoed, 30).await;
    // The client gives up: its connection closes, and hyper drops the response body.
    upload.abandon().await;
    let closed = wait_for(&gone, 5).await;
    assert!(
        closed.is_some(),
        "5 s after the client left (and its response body was dropped half-read), the \
         upstream connection is still open: the upload task holds it (the path stalled \
         after {stalled_at} echoed bytes)"
    );
}

// ---------------------------------------------------------------------------------
// 2. After an early answer, the upload runs on for ever once the upstream stops
//    reading, even after the client has left.
//
// `Upload::finish` is `poll_fn(|cx| self.poll(&mut write, cx)).await` with no deadline.
// While `out` holds bytes and `poll_write` is Pending, `Upload::poll` returns Pending
// without polling the client's body, so the body's error (the client closed; or the
// gateway's own idle_timeout closed it) is never seen. The response has ended and
// `finish()` spawned the reunite task, which waits on the upload as well. Before the
// answer the same stall is cut by response_timeout (timeout_at around Pool::send);
// before this commit, the end of the response dropped the connection. Here the
// upstream socket stays open as long as the upstream keeps it, i.e. for ever for an
// upstream that is hung (the kernel still accepts its connection) — one socket and one
// task per such request. (After a body error on a TLS upstream, `write.shutdown()`
// has the same problem: close_notify cannot be written into a full socket, and the
// await has no bound.)

#[tokio::test]
async fn an_upload_after_an_early_answer_does_not_outlive_its_client() {
    const SIZE: usize = 64 << 20;
    let gone = Arc::new(AtomicBool::new(false));
    let listener = small_buffer_listener();
    let addr = listener.local_addr().unwrap();
    let flag = gone.clone();
    let _task = accept_loop(listener, move |mut stream| {
        let gone = flag.clone();
        async move {
            let mut buf = Vec::new();
            if read_head(&mut stream, &mut buf).await.is_none() {
                return;
            }
            // A complete answer at once (keep-alive), then the upstream stops reading,
            // as a hung process would. A byte now and then (which the gateway never
            // reads) tells whether the gateway's end of the connection is still open.
            if stream.write_all(OK).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                if stream.write_all(b"x").await.is_err() {
                    gone.store(true, Ordering::SeqCst);
                    return;
                }
            }
        }
    });
    let before = "[upstream]\nresponse_timeout = \"2s\"\n";
    let (gw, token) = gateway_for(addr, before, "").await;

    let mut upload = Upload::start(&gw, &token, "/api/v1/hung", SIZE).await;
    let response = upload.read_until(|r| r.ends_with(b"\r\n\r\nok")).await;
    assert!(
        response.starts_with(b"HTTP/1.1 200") && response.ends_with(b"ok"),
        "{:?}",
        String::from_utf8_lossy(&response)
    );
    // The body stalls at once (the upstream reads nothing); the client gives up.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    upload.abandon().await;
    let closed = wait_for(&gone, 10).await;
    assert!(
        closed.is_some(),
        "10 s after the client left (response_timeout 2 s), the gateway still holds the \
         upstream connection: the upload task waits on a write with no deadline and never \
         sees the client's body fail"
    );
}
