//! The gateway's HTTP/1.1 towards an upstream that speaks raw bytes, pinned so that a
//! codec of the gateway's own could be checked against hyper's client (it was written
//! against hyper's client, which the codec replaced).
//!
//! Responses: chunked bodies (with chunk extensions, trailers, any split into reads),
//! Content-Length bodies in pieces, bodies ended by closing the connection, `Connection:
//! close`, interim 1xx answers before the final one, and answers without a body (204,
//! 304, HEAD) all arrive whole, and each connection is reused exactly when its framing
//! allows. Malformed heads give the client the gateway's 502, a body cut short never
//! looks complete, and bytes an upstream sends past the end of its answer never become
//! the answer to someone else's request.
//!
//! Requests: the request line, `Host` and the body framing the upstream receives for
//! bodiless, fixed-length, streamed and empty requests from HTTP/1.1 and HTTP/2 clients.

mod common;
use common::raw::{client_tls, parse_responses, tls_connect, RawResponse};
use common::wire::{decode_chunked, find, gateway_for, within, Raw, Reply, OK};
use common::*;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[test]
fn the_chunked_decoder_itself() {
    let wire = b"5;a=b\r\nhello\r\n1 ;c\r\n \r\n0\r\nx-t: 1\r\n\r\nNEXT";
    assert_eq!(
        decode_chunked(wire),
        Some((b"hello ".to_vec(), wire.len() - 4))
    );
    assert_eq!(decode_chunked(b"0\r\n\r\n"), Some((vec![], 5)));
    for cut in 0..wire.len() - 4 {
        assert_eq!(decode_chunked(&wire[..cut]), None, "cut at {cut}");
    }
}

/// `GET path` through `client` with alex's token; the status and the whole body.
async fn get_text(
    gw: &TestGateway,
    client: &reqwest::Client,
    token: &str,
    path: &str,
) -> (u16, String) {
    within(10, async {
        let response = gw.bearer_get(client, path, token).await;
        let status = response.status().as_u16();
        (status, response.text().await.unwrap())
    })
    .await
}

/// `/api/v1/ok` through `client` is answered `ok` as ever after the request for `after`:
/// whatever that request met upstream cost the gateway nothing else.
async fn still_ok(gw: &TestGateway, client: &reqwest::Client, token: &str, after: &str) {
    let (status, body) = get_text(gw, client, token, "/api/v1/ok").await;
    assert_eq!((status, body.as_str()), (200, "ok"), "after {after}");
}

/// `GET path` through `client` is the gateway's 502, and the gateway keeps working
/// (`still_ok`).
async fn bad_gateway_then_ok(gw: &TestGateway, client: &reqwest::Client, token: &str, path: &str) {
    let response = within(10, gw.bearer_get(client, path, token)).await;
    expect_error(response, 502, "bad_gateway").await;
    still_ok(gw, client, token, path).await;
}

#[tokio::test]
async fn a_chunked_answer_with_extensions_in_tiny_writes_arrives_whole_and_keeps_its_connection() {
    let up = Raw::start(|_| {
        Reply::new(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n\
              5;foo=bar\r\nhello\r\n\
              1;quoted=\"a b\";flag\r\n \r\n\
              6\r\nworld!\r\n\
              a;x=1\r\n0123456789\r\n\
              0;last=yes\r\n\r\n",
        )
        .trickled()
    })
    .await;
    let (gw, token) = gateway_for(up.addr, "", "").await;
    for client in [&gw.http1, &gw.http2] {
        let (status, body) = get_text(&gw, client, &token, "/api/v1/chunks").await;
        assert_eq!(status, 200);
        // Extensions are framing, never data.
        assert_eq!(body, "hello world!0123456789");
    }
    // The last chunk ended the answer: the second request took the same connection.
    assert_eq!(up.opened(), 1, "{:?}", up.seen());
}

#[tokio::test]
async fn trailers_end_a_chunked_answer_and_keep_its_connection() {
    let up = Raw::start(|seen| {
        let reply = Reply::new(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: x-checksum, x-count\r\n\r\n\
              6\r\nhello \r\n5\r\nworld\r\n0\r\nx-checksum: abc\r\nx-count: 2\r\n\r\n",
        );
        // In one write, or in writes of 1 to 3 bytes (trailer lines split too).
        if seen.path().ends_with("slow") {
            reply.trickled()
        } else {
            reply
        }
    })
    .await;
    let (gw, token) = gateway_for(up.addr, "", "").await;
    for (client, path) in [
        (&gw.http1, "/api/v1/t"),
        (&gw.http2, "/api/v1/t-slow"),
        (&gw.http1, "/api/v1/t-slow"),
        (&gw.http2, "/api/v1/t"),
    ] {
        let (status, body) = get_text(&gw, client, &token, path).await;
        assert_eq!(status, 200);
        assert_eq!(body, "hello world", "{path}");
    }
    assert_eq!(up.opened(), 1, "{:?}", up.seen());
}

#[tokio::test]
async fn a_content_length_body_in_several_writes_arrives_whole_and_keeps_its_connection() {
    let up = Raw::start(|seen| {
        if seen.path() == "/api/v1/tiny" {
            return Reply::new(b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\n\r\nhello, world!")
                .trickled();
        }
        Reply::pieces(&[
            b"HTTP/1.1 200 OK\r\n",
            b"Content-Length: 26\r\nContent-Type: text/plain\r\n\r\n",
            b"abcdefghij",
            b"klmnopq",
            b"rstuvwxyz",
        ])
    })
    .await;
    let (gw, token) = gateway_for(up.addr, "", "").await;
    for client in [&gw.http1, &gw.http2] {
        let (status, body) = get_text(&gw, client, &token, "/api/v1/pieces").await;
        assert_eq!((status, body.as_str()), (200, "abcdefghijklmnopqrstuvwxyz"));
        let (status, body) = get_text(&gw, client, &token, "/api/v1/tiny").await;
        assert_eq!((status, body.as_str()), (200, "hello, world!"));
    }
    assert_eq!(up.opened(), 1, "{:?}", up.seen());
}

#[tokio::test]
async fn an_answer_ended_by_closing_arrives_whole_and_its_connection_is_not_reused() {
    // 20 000 bytes of text, well past one read, in several writes, then the close.
    let text: String = (0..2000).map(|i| format!("{:09}\n", i)).collect();
    let body = text.clone();
    let up = Raw::start(move |seen| {
        let status_line: &[u8] = if seen.path().ends_with("/10") {
            b"HTTP/1.0 200 OK\r\n"
        } else {
            b"HTTP/1.1 200 OK\r\n"
        };
        let (a, b) = body.as_bytes().split_at(7_000);
        Reply::pieces(&[status_line, b"content-type: text/plain\r\n\r\n", a, b]).then_close()
    })
    .await;
    let (gw, token) = gateway_for(up.addr, "", "").await;
    let mut expected_opened = 0;
    for path in ["/api/v1/eof/11", "/api/v1/eof/10"] {
        for client in [&gw.http1, &gw.http2] {
            let (status, received) = get_text(&gw, client, &token, path).await;
            assert_eq!(status, 200, "{path}");
            assert!(received == text, "{path}: {} bytes", received.len());
            // Only the close could end that answer: every request needs a new connection.
            expected_opened += 1;
            assert_eq!(up.opened(), expected_opened, "{path}");
        }
    }
}

#[tokio::test]
async fn a_connection_close_answer_is_the_last_on_its_connection() {
    let up = Raw::start(|seen| match seen.path() {
        // As an upstream should: says close, then closes.
        "/api/v1/close" => {
            Reply::new(b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 3\r\n\r\nbye")
                .then_close()
        }
        // Says close but leaves the connection open (and would answer on it): the
        // gateway must still not send another request there.
        "/api/v1/says-close" => {
            Reply::new(b"HTTP/1.1 200 OK\r\nConnection: Close\r\ncontent-length: 3\r\n\r\nbye")
        }
        _ => Reply::new(OK),
    })
    .await;
    let (gw, token) = gateway_for(up.addr, "", "").await;
    let mut expected_opened = 1;
    for path in ["/api/v1/close", "/api/v1/says-close"] {
        for client in [&gw.http1, &gw.http2] {
            let (status, body) = get_text(&gw, client, &token, path).await;
            assert_eq!((status, body.as_str()), (200, "bye"), "{path}");
            let (status, body) = get_text(&gw, client, &token, "/api/v1/next").await;
            assert_eq!((status, body.as_str()), (200, "ok"), "after {path}");
            // The request after each close needed a new connection, which then served the
            // next close request (kept-alive after `ok`).
            expected_opened += 1;
            assert_eq!(
                up.opened(),
                expected_opened,
                "after {path}: {:?}",
                up.seen()
            );
        }
    }
    // Each close request came on the connection the `ok` before it left open, and each
    // `ok` on a new one.
    let seen = up.seen();
    for pair in seen.windows(2) {
        if pair[0].path() != "/api/v1/next" {
            assert_ne!(pair[0].conn, pair[1].conn, "{seen:?}");
        }
    }
}

#[tokio::test]
async fn interim_answers_before_the_final_one_are_passed_over() {
    const INTERIM: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n\
        HTTP/1.1 103 Early Hints\r\nlink: </a>; rel=preload\r\n\r\n";
    const FINAL: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfinal";
    let up = Raw::start(|seen| match seen.path() {
        "/api/v1/together" => Reply::new([INTERIM, FINAL].concat()),
        "/api/v1/apart" => Reply::pieces(&[
            b"HTTP/1.1 100 Continue\r\n\r\n",
            b"HTTP/1.1 103 Early Hints\r\nlink: </a>; rel=preload\r\n\r\n",
            FINAL,
        ]),
        _ => Reply::new([INTERIM, FINAL].concat()).trickled(),
    })
    .await;
    let (gw, token) = gateway_for(up.addr, "", "").await;
    for path in ["/api/v1/together", "/api/v1/apart", "/api/v1/trickled"] {
        for client in [&gw.http1, &gw.http2] {
            let response = within(10, gw.bearer_get(client, path, &token)).await;
            assert_eq!(response.status(), 200, "{path}");
            // The 103's fields belong to the 103 (RFC 9110 §15.2), not to the answer.
            assert!(response.headers().get("link").is_none(), "{path}");
            assert_eq!(
                within(10, response.text()).await.unwrap(),
                "final",
                "{path}"
            );
        }
    }
    // Interim answers do not end an exchange or its connection.
    assert_eq!(up.opened(), 1, "{:?}", up.seen());
}

#[tokio::test]
async fn bodiless_answers_are_complete_at_their_head_and_keep_their_connection() {
    // Each of these heads is the whole answer, though two of them name a length: after
    // it the upstream sends nothing until the next request, so a gateway waiting for a
    // body would hang, and one reading a body from the next answer would be off by one.
    let up = Raw::start(|seen| match (seen.method(), seen.path()) {
        (_, "/api/v1/204") => Reply::new(b"HTTP/1.1 204 No Content\r\nx-answer: 204\r\n\r\n"),
        // A 304's Content-Length is the selected representation's (RFC 9110 §8.6).
        (_, "/api/v1/304") => {
            Reply::new(b"HTTP/1.1 304 Not Modified\r\netag: \"v1\"\r\ncontent-length: 1234\r\n\r\n")
        }
        ("HEAD", _) => Reply::new(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 1000\r\n\r\n",
        ),
        _ => Reply::new(OK),
    })
    .await;
    let (gw, token) = gateway_for(up.addr, "", "").await;
    for client in [&gw.http1, &gw.http2, &gw.http1] {
        let response = within(10, gw.bearer_get(client, "/api/v1/204", &token)).await;
        assert_eq!(response.status(), 204);
        assert_eq!(header(response.headers(), "x-answer"), Some("204"));
        assert!(within(10, response.bytes()).await.unwrap().is_empty());

        let response = within(10, gw.bearer_get(client, "/api/v1/304", &token)).await;
        assert_eq!(response.status(), 304);
        assert_eq!(header(response.headers(), "etag"), Some("\"v1\""));
        assert!(within(10, response.bytes()).await.unwrap().is_empty());

        let response = within(
            10,
            client
                .head(gw.url("/api/v1/head"))
                .bearer_auth(&token)
                .send(),
        )
        .await
        .unwrap();
        assert_eq!(response.status(), 200);
        // The length of what a GET would have answered, passed on.
        assert_eq!(header(response.headers(), "content-length"), Some("1000"));
        assert!(within(10, response.bytes()).await.unwrap().is_empty());

        let (status, body) = get_text(&gw, client, &token, "/api/v1/ok").await;
        assert_eq!((status, body.as_str()), (200, "ok"));
    }
    assert_eq!(up.opened(), 1, "{:?}", up.seen());
    assert_eq!(up.seen().len(), 12);
}

/// Malformed answers, each to its own path; `/api/v1/ok` answers well.
const BAD: &[(&str, &[u8])] = &[
    (
        "status-not-a-number",
        b"HTTP/1.1 abc OK\r\ncontent-length: 2\r\n\r\nok",
    ),
    (
        "status-line-garbage",
        b"HTPT/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
    ),
    (
        "length-list-conflicting",
        b"HTTP/1.1 200 OK\r\nContent-Length: 12, 13\r\n\r\nhello world!",
    ),
    (
        "length-twice-differing",
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nok!",
    ),
    (
        "length-negative",
        b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\nok",
    ),
    (
        "length-not-a-number",
        b"HTTP/1.1 200 OK\r\ncontent-length: two\r\n\r\nok",
    ),
    (
        "length-hex",
        b"HTTP/1.1 200 OK\r\ncontent-length: 0x2\r\n\r\nok",
    ),
    (
        "header-without-colon",
        b"HTTP/1.1 200 OK\r\nx-fine: 1\r\nno colon here\r\ncontent-length: 2\r\n\r\nok",
    ),
    (
        "header-name-with-space",
        b"HTTP/1.1 200 OK\r\nx bad: 1\r\ncontent-length: 2\r\n\r\nok",
    ),
];

#[tokio::test]
async fn malformed_answers_are_502_and_the_gateway_keeps_working() {
    let up = Raw::start(|seen| {
        let name = seen.path().trim_start_matches("/api/v1/bad/");
        match BAD.iter().find(|(n, _)| *n == name) {
            // Left open: the gateway must give up on the head, not wait for more.
            Some((_, bytes)) => Reply::new(bytes),
            None => Reply::new(OK),
        }
    })
    .await;
    let (gw, token) = gateway_for(up.addr, "", "").await;
    for (name, _) in BAD {
        for client in [&gw.http1, &gw.http2] {
            bad_gateway_then_ok(&gw, client, &token, &format!("/api/v1/bad/{name}")).await;
        }
    }
}

#[tokio::test]
async fn an_upstream_closing_before_its_head_is_complete_is_502() {
    let up = Raw::start(|seen| match seen.path() {
        "/api/v1/nothing" => Reply::new(b"").then_close(),
        "/api/v1/half-status" => Reply::new(b"HTTP/1.1 20").then_close(),
        "/api/v1/half-head" => Reply::pieces(&[b"HTTP/1.1 200 OK\r\n", b"content-le"]).then_close(),
        "/api/v1/no-empty-line" => {
            Reply::new(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n").then_close()
        }
        _ => Reply::new(OK),
    })
    .await;
    let (gw, token) = gateway_for(up.addr, "", "").await;
    for path in [
        "/api/v1/nothing",
        "/api/v1/half-status",
        "/api/v1/half-head",
        "/api/v1/no-empty-line",
    ] {
        for client in [&gw.http1, &gw.http2] {
            bad_gateway_then_ok(&gw, client, &token, path).await;
        }
    }
}

#[tokio::test]
async fn a_huge_answer_head_is_502() {
    // Response heads are limited to 64 KiB. One header of 70 KiB is past it, and so is
    // one of 1 MiB; 60 KiB is not. (Before the gateway had its own codec, a 70 KiB head
    // passed to HTTP/1.1 clients and broke HTTP/2 clients' connections, whose header
    // lists are limited: a 502 is the clear answer.)
    let head_with = |size: usize| {
        let mut head = b"HTTP/1.1 200 OK\r\nx-huge: ".to_vec();
        head.resize(head.len() + size, b'a');
        head.extend_from_slice(b"\r\ncontent-length: 2\r\n\r\nok");
        head
    };
    let (over, huge, under) = (head_with(70 << 10), head_with(1 << 20), head_with(60 << 10));
    let up = Raw::start(move |seen| match seen.path() {
        "/api/v1/over" => Reply::new(&over),
        "/api/v1/huge" => Reply::new(&huge),
        "/api/v1/under" => Reply::new(&under),
        _ => Reply::new(OK),
    })
    .await;
    let (gw, token) = gateway_for(up.addr, "", "").await;
    let response = within(10, gw.bearer_get(&gw.http1, "/api/v1/under", &token)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-huge"].len(), 60 << 10);
    for (client, path) in [
        (&gw.http1, "/api/v1/over"),
        (&gw.http2, "/api/v1/over"),
        (&gw.http1, "/api/v1/huge"),
        (&gw.http2, "/api/v1/huge"),
    ] {
        bad_gateway_then_ok(&gw, client, &token, path).await;
    }
}

#[tokio::test]
async fn a_body_cut_short_never_looks_complete() {
    let up = Raw::start(|seen| match seen.path() {
        // 10 of 100 bytes, then the close.
        "/api/v1/short-length" => {
            Reply::new(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789").then_close()
        }
        // A chunk-size line that is no number; the connection stays open.
        "/api/v1/bad-chunk" => Reply::pieces(&[
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n",
            b"zz\r\nhello\r\n0\r\n\r\n",
        ]),
        // Chunks, then the close before the last chunk.
        "/api/v1/no-last-chunk" => {
            Reply::new(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
                .then_close()
        }
        _ => Reply::new(OK),
    })
    .await;
    let (gw, token) = gateway_for(up.addr, "", "").await;
    for path in [
        "/api/v1/short-length",
        "/api/v1/bad-chunk",
        "/api/v1/no-last-chunk",
    ] {
        for client in [&gw.http1, &gw.http2] {
            let outcome = within(10, async {
                let response = client.get(gw.url(path)).bearer_auth(&token).send().await?;
                let status = response.status().as_u16();
                Ok::<_, reqwest::Error>((status, response.bytes().await))
            })
            .await;
            // A 502 before the body, a response that fails (before its head, when the
            // upstream's break is known as soon as the head) or a body that fails or is
            // short; never a whole, successful answer of the declared size.
            match &outcome {
                Err(_) | Ok((502, _) | (200, Err(_))) => {}
                Ok((200, Ok(body))) => assert!(
                    path == "/api/v1/short-length" && body.len() != 100,
                    "{path}: a complete-looking body {body:?}"
                ),
                other => panic!("{path}: {other:?}"),
            }
            still_ok(&gw, client, &token, path).await;
        }
    }
}

#[tokio::test]
async fn bytes_past_the_end_of_an_answer_never_answer_the_next_request() {
    // The first answer is followed, in the same write, by a whole second answer nobody
    // asked for. If the gateway kept that connection and read on, the next request (of
    // another client, another user) would get `sneaky`.
    let up = Raw::start(|seen| match seen.path() {
        "/api/v1/first" => Reply::new(
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfirst\
              HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nsneaky",
        ),
        "/api/v1/first-chunked" => Reply::new(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n0\r\n\r\n\
              HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nsneaky",
        ),
        _ => Reply::new(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nreal"),
    })
    .await;
    let (gw, alex) = gateway_for(up.addr, "", "").await;
    let admin = gw.access_token(ADMIN).await;
    for round in 0..10 {
        for first in ["/api/v1/first", "/api/v1/first-chunked"] {
            let (status, body) = get_text(&gw, &gw.http1, &alex, first).await;
            assert_eq!((status, body.as_str()), (200, "first"), "round {round}");
            let client = if round % 2 == 0 { &gw.http2 } else { &gw.http1 };
            let response = within(10, gw.bearer_get(client, "/api/v1/second", &admin)).await;
            let status = response.status().as_u16();
            let body = within(10, response.bytes()).await;
            match (status, &body) {
                (200, Ok(body)) => assert_eq!(&body[..], b"real", "round {round} after {first}"),
                // An error is fine; someone else's answer is not.
                (_, Ok(body)) => assert!(
                    find(body, b"sneaky").is_none(),
                    "round {round} after {first}: {status} {body:?}"
                ),
                (_, Err(_)) => {}
            }
        }
    }
    // And no request went on a connection that had carried extra bytes: whatever the
    // upstream sent there after its answer is of unknown meaning, so that connection
    // ends (today it is closed, and the next request opens a new one).
    let seen = up.seen();
    for pair in seen.windows(2) {
        if pair[0].path().starts_with("/api/v1/first") {
            assert_ne!(pair[0].conn, pair[1].conn, "{seen:?}");
        }
    }
}

#[tokio::test]
async fn what_the_upstream_receives_for_a_bodiless_get() {
    let up = Raw::start(|_| Reply::new(OK)).await;
    let (gw, token) = gateway_for(up.addr, "", "").await;
    for (client, path) in [
        (&gw.http1, "/api/v1/get/h1?x=1"),
        (&gw.http2, "/api/v1/get/h2?x=1"),
    ] {
        let (status, _) = get_text(&gw, client, &token, path).await;
        assert_eq!(status, 200);
        let seen = up.last(path);
        assert_eq!(seen.request_line(), format!("GET {path} HTTP/1.1"));
        // The upstream's own authority, once, whatever the client addressed.
        assert_eq!(seen.headers("host"), [up.addr.to_string()], "{}", seen.head);
        // No framing at all says no body (RFC 9112 §6.3): the gateway sends neither header.
        assert!(
            seen.headers("transfer-encoding").is_empty(),
            "{}",
            seen.head
        );
        assert!(seen.headers("content-length").is_empty(), "{}", seen.head);
        assert!(seen.body.is_empty());
    }
}

#[tokio::test]
async fn what_the_upstream_receives_for_a_body_of_known_length() {
    let up = Raw::start(|_| Reply::new(OK)).await;
    let (gw, token) = gateway_for(up.addr, "", "").await;
    let data = pattern(100_000);
    for (client, path) in [(&gw.http1, "/api/v1/put/h1"), (&gw.http2, "/api/v1/put/h2")] {
        let response = within(
            10,
            client
                .post(gw.url(path))
                .bearer_auth(&token)
                .body(data.clone())
                .send(),
        )
        .await
        .unwrap();
        assert_eq!(response.status(), 200);
        let seen = up.last(path);
        assert_eq!(seen.request_line(), format!("POST {path} HTTP/1.1"));
        assert_eq!(seen.headers("host"), [up.addr.to_string()]);
        assert_eq!(seen.headers("content-length"), ["100000"], "{}", seen.head);
        assert!(
            seen.headers("transfer-encoding").is_empty(),
            "{}",
            seen.head
        );
        assert!(seen.body == data, "{path}: {} bytes", seen.body.len());
    }
}

#[tokio::test]
async fn what_the_upstream_receives_for_a_streamed_body() {
    let up = Raw::start(|_| Reply::new(OK)).await;
    let (gw, token) = gateway_for(up.addr, "", "").await;
    for (client, path) in [
        (&gw.http1, "/api/v1/stream/h1"),
        (&gw.http2, "/api/v1/stream/h2"),
    ] {
        // No length known in advance: chunked from the HTTP/1.1 client, DATA frames
        // without content-length from the HTTP/2 one.
        let response = within(
            10,
            client
                .post(gw.url(path))
                .bearer_auth(&token)
                .body(chunked_body(200_000, 7_000))
                .send(),
        )
        .await
        .unwrap();
        assert_eq!(response.status(), 200);
        let seen = up.last(path);
        assert_eq!(seen.request_line(), format!("POST {path} HTTP/1.1"));
        assert_eq!(seen.headers("host"), [up.addr.to_string()]);
        assert_eq!(
            seen.headers("transfer-encoding"),
            ["chunked"],
            "{}",
            seen.head
        );
        assert!(seen.headers("content-length").is_empty(), "{}", seen.head);
        let (decoded, used) = decode_chunked(&seen.body).expect("a complete chunked body");
        assert_eq!(used, seen.body.len());
        assert!(
            decoded == pattern(200_000),
            "{path}: {} bytes",
            decoded.len()
        );
    }
}

#[tokio::test]
async fn an_empty_post_reaches_the_upstream_framed_as_bodiless() {
    let up =
        Raw::start(|_| Reply::new(b"HTTP/1.1 201 Created\r\ncontent-length: 7\r\n\r\ncreated"))
            .await;
    let (gw, token) = gateway_for(up.addr, "", "").await;
    // What each client sends and what reaches the upstream today: the client's own
    // `content-length: 0` is passed on (reqwest's HTTP/2 side sends one, its HTTP/1.1
    // side sends no framing at all for an empty body), and nothing is added where the
    // client sent none. Either way the upstream reads no body (RFC 9112 §6.3).
    for (client, version, length) in [(&gw.http1, "h1", None), (&gw.http2, "h2", Some("0"))] {
        for (how, body) in [("empty", Some(Vec::new())), ("none", None)] {
            let path = format!("/api/v1/empty/{version}/{how}");
            let mut request = client.post(gw.url(&path)).bearer_auth(&token);
            if let Some(body) = body {
                request = request.body(body);
            }
            let response = within(10, request.send()).await.unwrap();
            assert_eq!(response.status(), 201, "{path}");
            assert_eq!(within(10, response.text()).await.unwrap(), "created");
            let seen = up.last(&path);
            assert_eq!(seen.request_line(), format!("POST {path} HTTP/1.1"));
            assert!(
                seen.headers("transfer-encoding").is_empty(),
                "{}",
                seen.head
            );
            assert_eq!(
                seen.headers("content-length").first().copied(),
                length,
                "{}",
                seen.head
            );
            assert!(seen.body.is_empty());
        }
    }

    // `Content-Length: 0` from an HTTP/1.1 client (curl -d '' sends it) stays.
    let path = "/api/v1/empty/raw";
    let mut tls = tls_connect(gw.addr, client_tls(&[&gw.ca_pem], &[b"http/1.1"])).await;
    let wire = format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nAuthorization: Bearer {token}\r\n\
         Content-Length: 0\r\nConnection: close\r\n\r\n",
        gw.addr.port()
    );
    tls.write_all(wire.as_bytes()).await.unwrap();
    let mut received = Vec::new();
    within(10, tls.read_to_end(&mut received)).await.unwrap();
    let responses = parse_responses(&received);
    assert_eq!(responses.len(), 1, "{}", String::from_utf8_lossy(&received));
    assert_eq!(
        (responses[0].status, &responses[0].body[..]),
        (201, &b"created"[..])
    );
    let seen = up.last(path);
    assert_eq!(seen.headers("content-length"), ["0"], "{}", seen.head);
    assert!(
        seen.headers("transfer-encoding").is_empty(),
        "{}",
        seen.head
    );

    // Bodiless requests leave nothing behind on the connection: one served them all.
    assert_eq!(up.opened(), 1);
}

/// Writes `wire` to the gateway over TLS (HTTP/1.1) and reads until it closes.
async fn raw_exchange(gw: &TestGateway, wire: &str) -> Vec<RawResponse> {
    let mut tls = tls_connect(gw.addr, client_tls(&[&gw.ca_pem], &[b"http/1.1"])).await;
    tls.write_all(wire.as_bytes()).await.unwrap();
    tls.flush().await.unwrap();
    let mut received = Vec::new();
    let _ = within(10, tls.read_to_end(&mut received)).await;
    parse_responses(&received)
}

#[tokio::test]
async fn a_clients_request_trailers_stay_behind() {
    // Trailers would carry the gateway's own identity headers past the header rewrite
    // to any upstream that merges trailers into headers.
    let up = Raw::start(|_| Reply::new(OK)).await;
    let (gw, token) = gateway_for(up.addr, "", "").await;
    let host = format!("127.0.0.1:{}", gw.addr.port());
    let responses = raw_exchange(
        &gw,
        &format!(
            "POST /api/v1/trailers HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n\
             Transfer-Encoding: chunked\r\nTrailer: x-authenticated-user\r\n\
             Connection: close\r\n\r\n\
             5\r\nhello\r\n0\r\nx-authenticated-user: admin@example.com\r\n\r\n"
        ),
    )
    .await;
    assert_eq!(responses.len(), 1);
    assert_eq!(responses[0].status, 200);
    let seen = up.last("/api/v1/trailers");
    assert_eq!(seen.headers("transfer-encoding"), ["chunked"]);
    assert_eq!(
        seen.body,
        b"5\r\nhello\r\n0\r\n\r\n",
        "{:?}",
        String::from_utf8_lossy(&seen.body)
    );
    assert!(seen.headers("trailer").is_empty(), "{}", seen.head);
}

#[tokio::test]
async fn only_websocket_upgrades_are_forwarded() {
    // After a 101 the connection is a tunnel in which no request is checked: an `h2c`
    // upgrade would let the client send the upstream any HTTP/2 request with any path
    // and identity headers. The upstream here would switch to anything it is asked to.
    let up = Raw::start(|seen| {
        if seen.headers("upgrade").is_empty() {
            Reply::new(OK)
        } else {
            Reply::new(
                b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: h2c\r\n\r\n",
            )
        }
    })
    .await;
    let (gw, token) = gateway_for(up.addr, "", "").await;
    let host = format!("127.0.0.1:{}", gw.addr.port());
    for protocol in ["h2c", "H2C", "spdy/3", "websocket-but-not"] {
        let responses = raw_exchange(
            &gw,
            &format!(
                "GET /api/v1/switch HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n\
                 Connection: Upgrade, HTTP2-Settings, close\r\nUpgrade: {protocol}\r\n\
                 HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
            ),
        )
        .await;
        assert_eq!(responses.len(), 1, "{protocol}");
        assert_eq!(responses[0].status, 200, "{protocol}: an ordinary answer");
        assert!(responses[0].header("upgrade").is_none(), "{protocol}");
        let seen = up.last("/api/v1/switch");
        assert!(
            seen.headers("upgrade").is_empty(),
            "{protocol}: {}",
            seen.head
        );
        assert!(
            seen.headers("http2-settings").is_empty(),
            "{protocol}: {}",
            seen.head
        );
        assert!(
            seen.headers("connection").is_empty(),
            "{protocol}: {}",
            seen.head
        );
    }
}

#[tokio::test]
async fn response_trailers_reach_http1_clients_that_accept_them() {
    let up = Raw::start(|_| {
        Reply::new(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: x-checksum\r\n\r\n\
              2\r\nok\r\n0\r\nx-checksum: 1\r\n\r\n",
        )
    })
    .await;
    let (gw, token) = gateway_for(up.addr, "", "").await;
    let host = format!("127.0.0.1:{}", gw.addr.port());
    let mut tls = tls_connect(gw.addr, client_tls(&[&gw.ca_pem], &[b"http/1.1"])).await;
    let wire = format!(
        "GET /api/v1/sum HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n\
         TE: trailers\r\nConnection: close\r\n\r\n"
    );
    tls.write_all(wire.as_bytes()).await.unwrap();
    let mut received = Vec::new();
    let _ = within(10, tls.read_to_end(&mut received)).await;
    let text = String::from_utf8_lossy(&received);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("\r\n0\r\nx-checksum: 1\r\n\r\n"), "{text}");
}
