//! Edges of the gateway's own upstream HTTP/1.1 codec (src/upstream.rs, src/pool.rs)
//! that a review of it found broken, one test each (the comment on each says how it
//! failed): the end of an upload to a slow TLS upstream is flushed; the upload goes on
//! while the client is not reading, and after an early answer; an empty answer frees
//! its connection at once; a `Content-Length` list reaches HTTP/2 clients as one value;
//! an HTTP/1.0 answer with `Transfer-Encoding` is refused. The raw upstream is the
//! one of tests/upstream_wire.rs (tests/common/wire.rs).

mod common;
use common::wire::{
    content_length, gateway_for, read_head, small_buffer_client, tuned_listener, upload_head,
    within, Raw, Reply, OK,
};
use common::*;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

// ---------------------------------------------------------------------------------
// 1. `Content-Length: 0` answers lose their connection (HTTP/1.1 clients).
//
// The head makes `Framing::Length(0)`, so the body starts with `ended == false` and
// `size_hint() == exact(0)`. hyper's HTTP/1.1 server then writes `content-length: 0`,
// finds it can write no body, and drops the body without polling it, so `finish()`
// never runs and the connection is closed. hyper's client pooled these connections.

#[tokio::test]
async fn an_empty_content_length_answer_keeps_its_connection() {
    let up = Raw::start(|seen| match seen.path() {
        "/api/v1/empty" => Reply::new(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"),
        "/api/v1/created" => {
            Reply::new(b"HTTP/1.1 201 Created\r\nlocation: /x/1\r\ncontent-length: 0\r\n\r\n")
        }
        _ => Reply::new(OK),
    })
    .await;
    let (gw, token) = gateway_for(up.addr, "", "").await;
    for path in [
        "/api/v1/empty",
        "/api/v1/ok",
        "/api/v1/created",
        "/api/v1/ok",
    ] {
        let response = within(10, gw.bearer_get(&gw.http1, path, &token)).await;
        assert!(response.status().is_success(), "{path}");
        within(10, response.bytes()).await.unwrap();
    }
    // Give a drop-instead-of-pool a moment to show (the close reaches the upstream).
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        up.opened(),
        1,
        "every `content-length: 0` answer cost the pooled connection"
    );
}

// ---------------------------------------------------------------------------------
// 2. TLS upstreams: the end of a request body can stay in rustls' buffer forever.
//
// `Upload::poll`, once the body has ended and `out` is empty, calls `poll_flush` and
// returns Ready whatever it says; `is_done()` is then true and nobody flushes again.
// tokio-rustls' `poll_write` takes plaintext into rustls' send buffer (up to 64 KiB)
// when the socket is full, and its `poll_read` never writes. So when the upstream
// (or the network) is slower than the client and the socket is full as the body ends,
// the last ≤64 KiB of the body never leave the gateway: the upstream waits for them,
// the gateway waits for the head, and the client gets a 504 at `response_timeout`.
//
// On loopback the kernel's send buffer grows to megabytes (64 KiB MSS), so each time
// the socket turns writable it has room for all rustls holds and the stall needs an
// unlucky body length. Over a real network (MSS 1448) the send buffer stays near
// 2 x cwnd x 4 KiB and the room is often below 64 KiB. The test gets those conditions
// with a relay that announces an MSS of 1024, has a 4 KiB receive buffer and forwards
// the gateway's bytes at about 4 MB/s. The plain-TCP upstream behind the same relay is
// the control.

/// A TCP relay to `target`: slow from the gateway to the upstream, small MSS.
async fn slow_relay(target: SocketAddr) -> (SocketAddr, Task) {
    let listener = tuned_listener(|socket| {
        socket.set_tcp_mss(1024)?;
        socket.set_recv_buffer_size(4096)
    });
    let addr = listener.local_addr().unwrap();
    async fn pump(mut from: impl AsyncRead + Unpin, mut to: impl AsyncWrite + Unpin, slow: bool) {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = from.read(&mut chunk).await {
            if n == 0 || to.write_all(&chunk[..n]).await.is_err() {
                break;
            }
            if slow {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        let _ = to.shutdown().await;
    }
    let task = accept_loop(listener, move |client| async move {
        let Ok(upstream) = TcpStream::connect(target).await else {
            return;
        };
        let ((client_read, client_write), (upstream_read, upstream_write)) =
            (client.into_split(), upstream.into_split());
        tokio::join!(
            pump(client_read, upstream_write, true),
            pump(upstream_read, client_write, false)
        );
    });
    (addr, task)
}

/// Reads the rest of a `length`-byte request body of which `got` bytes are in already,
/// noting in `received` how many have come; whether all of them came before the
/// connection ended.
async fn read_body(
    stream: &mut (impl AsyncRead + Unpin),
    mut got: usize,
    length: usize,
    received: &AtomicUsize,
) -> bool {
    received.store(got, Ordering::SeqCst);
    let mut chunk = vec![0u8; 64 * 1024];
    while got < length {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => got += n,
        }
        received.store(got, Ordering::SeqCst);
    }
    true
}

/// Reads one Content-Length request, notes how many body bytes came, and answers `ok`
/// once it has them all.
async fn serve_counting<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    received: Arc<AtomicUsize>,
) {
    let mut buf = Vec::new();
    let Some(head) = read_head(&mut stream, &mut buf).await else {
        return;
    };
    if !read_body(&mut stream, buf.len(), content_length(&head), &received).await {
        return;
    }
    let _ = stream.write_all(OK).await;
    let _ = stream.flush().await;
    // Keep the connection open: the gateway decides.
    let _ = stream.read(&mut [0u8; 4096]).await;
}

#[tokio::test]
async fn the_end_of_a_request_body_reaches_a_slow_tls_upstream() {
    let generated = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
    let cert_pem = generated.cert.pem();
    let key = PrivateKeyDer::from_pem_slice(generated.key_pair.serialize_pem().as_bytes()).unwrap();
    let cert = CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(common::raw::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .unwrap();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));

    let tls_received = Arc::new(AtomicUsize::new(0));
    let tls_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tls_addr = tls_listener.local_addr().unwrap();
    let seen = tls_received.clone();
    let _tls_task = accept_loop(tls_listener, move |stream| {
        let (acceptor, seen) = (acceptor.clone(), seen.clone());
        async move {
            if let Ok(tls) = acceptor.accept(stream).await {
                serve_counting(tls, seen).await;
            }
        }
    });
    let plain_received = Arc::new(AtomicUsize::new(0));
    let plain_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let plain_addr = plain_listener.local_addr().unwrap();
    let seen = plain_received.clone();
    let _plain_task = accept_loop(plain_listener, move |stream| {
        serve_counting(stream, seen.clone())
    });
    let (tls_relay, _tls_relay) = slow_relay(tls_addr).await;
    let (plain_relay, _plain_relay) = slow_relay(plain_addr).await;

    let files = tempfile::tempdir().unwrap();
    let ca = files.path().join("upstream-ca.pem");
    std::fs::write(&ca, &cert_pem).unwrap();
    let before = format!(
        "[upstream]\nca_file = \"{}\"\nresponse_timeout = \"8s\"\n",
        ca.display()
    );
    let routes = format!(
        "[[routes]]\npath = \"/api/v1/tls/**\"\nupstream = \"https://{tls_relay}\"\n\n\
         [[routes]]\npath = \"/api/v1/plain/**\"\nupstream = \"http://{plain_relay}\"\n"
    );
    let (gw, token) = gateway_for(plain_addr, &before, &routes).await;

    const SIZE: usize = 2 << 20;
    let body = pattern(SIZE);
    for (path, received) in [
        ("/api/v1/plain/upload", &plain_received),
        ("/api/v1/tls/upload", &tls_received),
    ] {
        let started = std::time::Instant::now();
        let response = within(
            20,
            gw.http1
                .post(gw.url(path))
                .bearer_auth(&token)
                .body(body.clone())
                .send(),
        )
        .await
        .unwrap();
        let status = response.status().as_u16();
        let text = within(10, response.text()).await.unwrap_or_default();
        eprintln!("{path}: {status} after {:?}", started.elapsed());
        assert_eq!(
            (status, text.as_str(), received.load(Ordering::SeqCst)),
            (200, "ok", SIZE),
            "{path}: the answer, and what the upstream received of the {SIZE}-byte body"
        );
    }
}

// ---------------------------------------------------------------------------------
// 3. The upload only moves while the client reads the response.
//
// After the head, the request body is written from `ResponseBody::poll_data` only, i.e.
// only while hyper's server polls the response body, which it stops doing as soon as
// the client stops reading. An upstream that answers while it reads (streaming
// transforms, echo, an early answer with a large body) and a client that sends its whole
// body before it reads (most blocking clients do) then deadlock: the client waits for
// the gateway to take its body, the gateway waits for the client to take the response.
// hyper's client wrote the request body from its connection task whatever the response
// body's reader did.

/// An upstream that reads the request body and, at the same time, answers with
/// `answer_len` bytes, the last of them once it has read the whole body; notes how
/// many body bytes it read.
async fn serve_duplex(stream: TcpStream, answer_len: usize, received: Arc<AtomicUsize>) {
    let (mut read, mut write) = stream.into_split();
    let mut buf = Vec::new();
    let Some(head) = read_head(&mut read, &mut buf).await else {
        return;
    };
    let length = content_length(&head);
    let reader = tokio::spawn(async move {
        read_body(&mut read, buf.len(), length, &received).await;
    });
    let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {answer_len}\r\n\r\n");
    if write.write_all(head.as_bytes()).await.is_err() {
        return;
    }
    let piece = vec![b'r'; 64 * 1024];
    let mut sent = 0;
    // All but the last piece at once; the last once the whole body is in (an answer
    // ends after its request, as an echo's does).
    let mut reader = Some(reader);
    while sent < answer_len {
        let n = piece.len().min(answer_len - sent);
        if sent + n == answer_len {
            if let Some(reader) = reader.take() {
                let _ = reader.await;
            }
        }
        if write.write_all(&piece[..n]).await.is_err() {
            return;
        }
        sent += n;
    }
}

/// The gateway before a `serve_duplex` upstream answering `size` bytes; the count of
/// body bytes the upstream has read.
async fn duplex_gateway(size: usize) -> (TestGateway, String, Arc<AtomicUsize>, Task) {
    let received = Arc::new(AtomicUsize::new(0));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = received.clone();
    let task = accept_loop(listener, move |stream| {
        serve_duplex(stream, size, seen.clone())
    });
    let (gw, token) = gateway_for(addr, "", "").await;
    (gw, token, received, task)
}

#[tokio::test]
async fn a_client_that_sends_its_whole_body_before_reading_is_not_deadlocked() {
    const SIZE: usize = 24 << 20;
    let (gw, token, received, _task) = duplex_gateway(SIZE).await;

    let mut tls = small_buffer_client(&gw).await;
    let head = upload_head(&gw, &token, "/api/v1/duplex", SIZE, true);
    let body = pattern(SIZE);
    let sent = tokio::time::timeout(Duration::from_secs(15), async {
        tls.write_all(head.as_bytes()).await?;
        tls.write_all(&body).await?;
        tls.flush().await
    })
    .await;
    assert!(
        matches!(sent, Ok(Ok(()))),
        "the client could not send its body within 15 s ({sent:?}); the upstream had read \
         {} of {SIZE} bytes",
        received.load(Ordering::SeqCst)
    );
    let mut response = Vec::new();
    within(20, tls.read_to_end(&mut response)).await.unwrap();
    assert!(response.starts_with(b"HTTP/1.1 200"));
    assert_eq!(received.load(Ordering::SeqCst), SIZE);
}

/// The same exchange with a client that reads while it sends: passes, which shows the
/// test above fails on the coupling and not on the sizes.
#[tokio::test]
async fn control_a_client_that_reads_while_sending_gets_through() {
    const SIZE: usize = 24 << 20;
    let (gw, token, received, _task) = duplex_gateway(SIZE).await;

    let tls = small_buffer_client(&gw).await;
    let (mut read, mut write) = tokio::io::split(tls);
    let head = upload_head(&gw, &token, "/api/v1/duplex", SIZE, true);
    let body = pattern(SIZE);
    let reader = tokio::spawn(async move {
        let mut response = Vec::new();
        let _ = read.read_to_end(&mut response).await;
        response.len()
    });
    within(30, async {
        write.write_all(head.as_bytes()).await.unwrap();
        write.write_all(&body).await.unwrap();
        write.flush().await.unwrap();
    })
    .await;
    let got = within(30, reader).await.unwrap();
    assert!(got > SIZE);
    assert_eq!(received.load(Ordering::SeqCst), SIZE);
}

// ---------------------------------------------------------------------------------
// 4. An early final answer cuts the rest of the request body.
//
// When the response body ends before the upload (`finish()` with `!upload.is_done()`),
// the connection is dropped, so the upstream, which answered `202 Accepted` with
// keep-alive and is reading the body it was promised, gets an EOF mid-body. hyper's
// client kept sending the body after the response had ended (upstream_pool.rs:
// "hyper keeps sending it after the response is complete"), and the connection waited
// outside the pool until it had.

#[tokio::test]
async fn the_rest_of_a_body_still_reaches_an_upstream_that_answered_early() {
    const SIZE: usize = 1 << 20;
    const FIRST: usize = 32 * 1024;
    let received = Arc::new(AtomicUsize::new(0));
    let ended = Arc::new(Mutex::new(None::<&'static str>));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (seen, end) = (received.clone(), ended.clone());
    let _task = accept_loop(listener, move |mut stream| {
        let (seen, end) = (seen.clone(), end.clone());
        async move {
            let mut buf = Vec::new();
            let Some(head) = read_head(&mut stream, &mut buf).await else {
                return;
            };
            let length = content_length(&head);
            // Accepted at once; then the body, all of it, as promised.
            let _ = stream
                .write_all(b"HTTP/1.1 202 Accepted\r\ncontent-length: 8\r\n\r\naccepted")
                .await;
            if !read_body(&mut stream, buf.len(), length, &seen).await {
                *end.lock().unwrap() = Some("the gateway closed mid-body");
                return;
            }
            *end.lock().unwrap() = Some("complete");
            let _ = stream.read(&mut [0u8; 4096]).await;
        }
    });
    let (gw, token) = gateway_for(addr, "", "").await;

    let mut tls = small_buffer_client(&gw).await;
    let head = upload_head(&gw, &token, "/api/v1/accept", SIZE, false);
    let body = pattern(SIZE);
    // The head and a first piece of the body (small enough for the socket buffers).
    tls.write_all(head.as_bytes()).await.unwrap();
    tls.write_all(&body[..FIRST]).await.unwrap();
    tls.flush().await.unwrap();
    // The whole 202 arrives while most of the body is still to come.
    let mut response = Vec::new();
    let read = within(10, async {
        let mut chunk = [0u8; 4096];
        while !response.ends_with(b"accepted") {
            match tls.read(&mut chunk).await {
                Ok(0) => return Err("closed".to_owned()),
                Ok(n) => response.extend_from_slice(&chunk[..n]),
                Err(e) => return Err(e.to_string()),
            }
        }
        Ok(())
    })
    .await;
    // The client goes on with its body, as RFC 9112 lets it after a 2xx.
    let rest = within(10, async {
        tls.write_all(&body[FIRST..]).await?;
        tls.flush().await
    })
    .await;
    eprintln!(
        "client: reading the 202: {read:?} ({:?}); sending the rest: {rest:?}",
        String::from_utf8_lossy(&response)
    );
    within(10, async {
        while ended.lock().unwrap().is_none() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert_eq!(
        (*ended.lock().unwrap(), received.load(Ordering::SeqCst)),
        (Some("complete"), SIZE),
        "what the upstream that answered 202 got of the body"
    );
}

// ---------------------------------------------------------------------------------
// 5. A `Content-Length` list the codec accepts is passed on verbatim.
//
// `parse_length` accepts `3, 3` (RFC 9110 §8.6 lets a recipient) and frames the body
// by it, but the header goes to the client as `3, 3`. The h2 crate parses a received
// content-length as a single number and resets the stream (PROTOCOL_ERROR), so HTTP/2
// clients lose an answer the gateway accepted. (hyper's client passed it on too; the
// codec, deciding the framing, can now send the one value it used.)

#[tokio::test]
async fn a_content_length_list_reaches_http2_clients_as_one_value() {
    let up = Raw::start(|seen| match seen.path() {
        "/api/v1/list" => Reply::new(b"HTTP/1.1 200 OK\r\ncontent-length: 3, 3\r\n\r\nabc"),
        _ => Reply::new(OK),
    })
    .await;
    let (gw, token) = gateway_for(up.addr, "", "").await;
    for client in [&gw.http2, &gw.http1] {
        let outcome = within(10, async {
            let response = client
                .get(gw.url("/api/v1/list"))
                .bearer_auth(&token)
                .send()
                .await?;
            let length = response
                .headers()
                .get_all("content-length")
                .iter()
                .map(|v| v.to_str().unwrap_or_default().to_owned())
                .collect::<Vec<_>>();
            let status = response.status().as_u16();
            Ok::<_, reqwest::Error>((status, length, response.text().await?))
        })
        .await;
        let (status, length, body) = outcome.unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!((status, body.as_str()), (200, "abc"));
        assert_eq!(length, ["3"]);
    }
}

// ---------------------------------------------------------------------------------
// 6. An HTTP/1.0 answer with Transfer-Encoding keeps its connection.
//
// RFC 9112 §6.1: a recipient of an HTTP/1.0 message with Transfer-Encoding "MUST treat
// the message as if the framing is faulty, even if a Content-Length is present, and
// close the connection after processing the message". `parse_head` decodes it as
// chunked and, with `Connection: keep-alive`, pools the connection (HTTP/1.0 chunked
// is what a smuggling intermediary would produce). hyper's client refused such an
// answer outright ("HTTP/1.0 cannot have Transfer-Encoding header": 502).

#[tokio::test]
async fn an_http10_answer_with_transfer_encoding_is_the_last_on_its_connection() {
    let up = Raw::start(|seen| match seen.path() {
        "/api/v1/ten" => Reply::new(
            b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\n\
              transfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        ),
        _ => Reply::new(OK),
    })
    .await;
    let (gw, token) = gateway_for(up.addr, "", "").await;
    for path in ["/api/v1/ten", "/api/v1/ok"] {
        let response = within(10, gw.bearer_get(&gw.http1, path, &token)).await;
        let _ = within(10, response.bytes()).await;
    }
    assert_eq!(
        up.opened(),
        2,
        "the request after it went on the same connection"
    );
}
