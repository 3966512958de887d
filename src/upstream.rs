//! The gateway's side of one HTTP/1.1 exchange with an upstream: connecting, writing
//! the request, reading the response head, and framing the response body.
//!
//! Why not hyper's client: its connection runs in a task of its own, fed through
//! channels, so each proxied request cost two extra task wakeups, a channel hop each
//! way and a second header encoder. Here the request's own task writes the request and
//! reads the answer, and the response body reads the upstream socket directly as the
//! client's connection asks for it.
//!
//! Response framing follows RFC 9112 §6.3 and is strict, because a pooled connection
//! read one byte too far or too short would hand the rest of one response to the next
//! request (perhaps another user's). Anything ambiguous either fails the exchange (502)
//! or closes the connection instead of pooling it.

use std::fmt::Write as _;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method, StatusCode, Version};
use hyper::body::{Body as _, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_rustls::client::TlsStream;
use tokio_util::either::Either;

use crate::config::UpstreamUrl;
use crate::pool::{Partition, Pool};
use crate::proxy::{put_header, HeaderRewrite, RequestBody};

/// Any error, boxed.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The most header lines an upstream response (or its trailers) may have.
const MAX_HEADERS: usize = 100;
/// The largest response head (or trailer section, or chunk-size line) accepted.
const MAX_HEAD: usize = 64 * 1024;
/// The most bytes read from the upstream in one go.
const READ_CHUNK: usize = 64 * 1024;
/// How much room a read of a head or a small body asks for.
const READ_SMALL: usize = 8 * 1024;

/// Why an exchange with the upstream failed.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The socket failed.
    #[error("upstream connection: {0}")]
    Io(#[from] io::Error),
    /// The client's request body failed (or passed the route's limit) on its way.
    #[error("request body: {0}")]
    Body(#[source] BoxError),
    /// The upstream closed the connection before its response was complete.
    #[error("the upstream closed the connection mid-response")]
    Closed,
    /// The upstream's bytes are not a valid HTTP/1.1 response.
    #[error("invalid response from the upstream: {0}")]
    Malformed(&'static str),
}

/// A connection to an upstream: plain (`http://`, left) or TLS (`https://`, right).
pub type Io = Either<TcpStream, Box<TlsStream<TcpStream>>>;

/// Opens connections to upstream addresses: TCP, then TLS for `https://`, both within
/// the connect deadline.
#[derive(Clone)]
pub struct Connector {
    tls: tokio_rustls::TlsConnector,
    timeout: Duration,
}

impl Connector {
    /// A connector verifying `https://` upstreams with `tls`, giving up on a connection
    /// (TCP and TLS handshake together) after `timeout`.
    pub fn new(mut tls: rustls::ClientConfig, timeout: Duration) -> Connector {
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        Connector {
            tls: tokio_rustls::TlsConnector::from(Arc::new(tls)),
            timeout,
        }
    }

    /// Connects to the address of `url`.
    pub async fn connect(&self, url: &UpstreamUrl) -> io::Result<Conn> {
        let connect = async {
            let host = url.origin.host().unwrap_or_default();
            let https = url.is_https();
            let port = url
                .origin
                .port_u16()
                .unwrap_or(if https { 443 } else { 80 });
            // An IPv6 literal comes bracketed in a URI, not in a socket address.
            let bare = host.trim_start_matches('[').trim_end_matches(']');
            let tcp = TcpStream::connect((bare, port)).await?;
            // Small requests would otherwise wait on Nagle's algorithm.
            tcp.set_nodelay(true)?;
            if !https {
                return Ok(Either::Left(tcp));
            }
            let name = rustls::pki_types::ServerName::try_from(bare.to_owned())
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            let tls = self.tls.connect(name, tcp).await?;
            Ok(Either::Right(Box::new(tls)))
        };
        match tokio::time::timeout(self.timeout, connect).await {
            Ok(io) => io.map(Conn::new),
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "connecting to the upstream timed out",
            )),
        }
    }
}

/// An upstream connection between exchanges.
pub struct Conn {
    io: Io,
    /// Bytes read and not yet used; empty between exchanges.
    buf: BytesMut,
    /// How long the upstream took to answer this connection's last two requests.
    answer_times: AnswerTimes,
}

/// The longest a connection waits in its pool, after an exchange, before it is used
/// again (see [`ResponseBody::settle`]).
pub const MAX_SETTLE: Duration = Duration::from_millis(250);

/// Below this, answers sooner than usual are the noise of a fast upstream, not an answer
/// that was waiting: resting a connection for less would catch nothing.
const MIN_SETTLE_GAP: Duration = Duration::from_micros(500);

/// How long an upstream took to answer a connection's last two requests (until the
/// first byte), oldest first.
#[derive(Clone, Copy, Debug, Default)]
struct AnswerTimes([Duration; 2]);

impl AnswerTimes {
    /// With an answer that took `latest`: the times after it, and how long the
    /// connection should rest before its next request (see [`ResponseBody::settle`]).
    fn after(self, latest: Duration) -> (AnswerTimes, Duration) {
        let expected = self.0[0].max(self.0[1]);
        let settle = if latest < expected / 2 && expected - latest >= MIN_SETTLE_GAP {
            (2 * (expected - latest)).min(MAX_SETTLE)
        } else {
            Duration::ZERO
        };
        (AnswerTimes([self.0[1], latest]), settle)
    }
}

impl Conn {
    fn new(io: Io) -> Conn {
        Conn::with_history(io, BytesMut::new(), AnswerTimes::default())
    }

    fn with_history(io: Io, buf: BytesMut, answer_times: AnswerTimes) -> Conn {
        Conn {
            io,
            buf,
            answer_times,
        }
    }

    /// Whether an idle connection can carry another request: not closed by the
    /// upstream, and holding no byte nobody asked for, whether in this process, in the
    /// TLS session or still in the kernel. Looks without waiting.
    ///
    /// The socket itself is asked (`MSG_PEEK`), not tokio's cached readiness: that is
    /// updated only when the runtime next polls the kernel, so under load it can say
    /// "nothing" about bytes that have already arrived, and an answer the upstream sent
    /// unasked would then be read as the next request's, perhaps another user's.
    pub fn is_reusable(&mut self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        match &mut self.io {
            Either::Left(tcp) => socket_is_quiet(tcp),
            Either::Right(tls) => {
                let (tcp, session) = tls.get_mut();
                tls_is_quiet(tcp, session)
            }
        }
    }

    /// The socket's read readiness, registering `cx` to be woken when something (bytes,
    /// a close) arrives: how an idle connection is watched.
    pub(crate) fn poll_stirred(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        self.tcp().poll_read_ready(cx).map(|_| ())
    }

    /// Forgets a read readiness that [`Conn::is_reusable`] found to hold nothing (a TLS
    /// session ticket, say), so the next [`Conn::poll_stirred`] waits for a new event.
    pub(crate) fn settle(&self) {
        let _ = self.tcp().try_io(tokio::io::Interest::READABLE, || {
            Err::<(), _>(io::ErrorKind::WouldBlock.into())
        });
    }

    fn tcp(&self) -> &TcpStream {
        match &self.io {
            Either::Left(tcp) => tcp,
            Either::Right(tls) => tls.get_ref().0,
        }
    }
}

/// Whether the kernel holds nothing for `tcp`: no byte and no end of stream.
fn socket_is_quiet(tcp: &TcpStream) -> bool {
    let mut byte = [MaybeUninit::<u8>::uninit(); 1];
    matches!(
        socket2::SockRef::from(tcp).peek(&mut byte),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock
    )
}

/// Whether a TLS connection holds no answer: TLS records that came while it was idle
/// are read into the session (they may be session tickets or key updates, which are
/// no answer), and it is quiet when they hold no application data and no close, and
/// nothing more waits in the kernel.
fn tls_is_quiet(tcp: &TcpStream, session: &mut rustls::ClientConnection) -> bool {
    let socket = socket2::SockRef::from(tcp);
    let mut quiet = false;
    // A handful of records at most; more is not what an idle connection receives.
    for _ in 0..4 {
        match session.read_tls(&mut &*socket) {
            Ok(0) => return false,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                quiet = true;
                break;
            }
            Err(_) => return false,
        }
    }
    quiet
        && session
            .process_new_packets()
            .is_ok_and(|state| state.plaintext_bytes_to_read() == 0 && !state.peer_has_closed())
}

/// How a message's body is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Framing {
    /// This many bytes remain.
    Length(u64),
    /// Chunked transfer coding, at this point of it.
    Chunked(Chunk),
    /// Until the upstream closes the connection.
    Eof,
    /// Read to the end.
    Done,
    /// After a 101: the connection is now the client's tunnel, never a body to read
    /// nor a connection to reuse.
    Tunnel,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Chunk {
    /// Expecting a chunk-size line.
    Size,
    /// This many bytes of chunk data remain.
    Data(u64),
    /// Expecting the CRLF after chunk data.
    DataEnd,
    /// Expecting trailer fields or the final CRLF.
    Trailers,
}

/// The request's bytes still to go: the head, then the body as it comes.
struct Upload {
    /// Bytes ready to write, oldest first.
    out: Vec<Bytes>,
    body: Option<RequestBody>,
    chunked: bool,
    /// Body bytes the `Content-Length` still promises.
    promised: u64,
    /// The upstream stopped taking the request (it may still answer).
    write_failed: Option<io::Error>,
    /// All of the request is written and flushed.
    sent: bool,
    /// Counts writes to the upstream and frames from the client: how a stalled upload
    /// is told from a slow one.
    moves: u64,
}

impl Upload {
    /// The upload of `head` and then `body`, framed as `framing` says.
    fn new(head: Bytes, body: Option<RequestBody>, framing: Framing) -> Upload {
        let (body, chunked, promised) = match framing {
            Framing::Length(n) => (body, false, n),
            Framing::Chunked(_) => (body, true, 0),
            Framing::Done | Framing::Eof | Framing::Tunnel => (None, false, 0),
        };
        Upload {
            out: vec![head],
            body,
            chunked,
            promised,
            write_failed: None,
            sent: false,
            moves: 0,
        }
    }

    fn is_done(&self) -> bool {
        self.sent || self.write_failed.is_some()
    }

    /// Writes what it can. An error is the client's body failing; a failed write is
    /// kept in `write_failed`, since the upstream may have answered before closing.
    fn poll<W: AsyncWrite + Unpin>(
        &mut self,
        io: &mut W,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), WireError>> {
        if self.is_done() {
            return Poll::Ready(Ok(()));
        }
        loop {
            if !self.out.is_empty() {
                let mut slices = [io::IoSlice::new(&[]); 4];
                for (slice, bytes) in slices.iter_mut().zip(&self.out) {
                    *slice = io::IoSlice::new(bytes);
                }
                let slices = &slices[..self.out.len().min(4)];
                let written = match Pin::new(&mut *io).poll_write_vectored(cx, slices) {
                    Poll::Ready(Ok(0)) => Err(io::ErrorKind::WriteZero.into()),
                    Poll::Ready(Ok(n)) => Ok(n),
                    Poll::Ready(Err(e)) => Err(e),
                    Poll::Pending => return Poll::Pending,
                };
                match written {
                    Ok(mut n) => {
                        self.moves += 1;
                        while let Some(first) = self.out.first_mut().filter(|_| n > 0) {
                            let take = n.min(first.len());
                            first.advance(take);
                            n -= take;
                            if first.is_empty() {
                                self.out.remove(0);
                            }
                        }
                        continue;
                    }
                    Err(e) => {
                        self.write_failed = Some(e);
                        return Poll::Ready(Ok(()));
                    }
                }
            }
            let Some(body) = &mut self.body else {
                // TLS may hold the last record back until flushed: not sent until then.
                match Pin::new(&mut *io).poll_flush(cx) {
                    Poll::Ready(Ok(())) => self.sent = true,
                    Poll::Ready(Err(e)) => self.write_failed = Some(e),
                    Poll::Pending => return Poll::Pending,
                }
                return Poll::Ready(Ok(()));
            };
            match Pin::new(body).poll_frame(cx) {
                Poll::Pending => {
                    // Whatever was written may sit in a TLS buffer while the client is
                    // slow: push it out.
                    if let Poll::Ready(Err(e)) = Pin::new(&mut *io).poll_flush(cx) {
                        self.write_failed = Some(e);
                        return Poll::Ready(Ok(()));
                    }
                    return Poll::Pending;
                }
                Poll::Ready(Some(Err(e))) => {
                    self.body = None;
                    return Poll::Ready(Err(WireError::Body(e)));
                }
                Poll::Ready(Some(Ok(frame))) => {
                    self.moves += 1;
                    self.take_frame(frame)?;
                }
                Poll::Ready(None) => {
                    self.body = None;
                    if self.chunked {
                        self.out.push(Bytes::from_static(b"0\r\n\r\n"));
                    } else if self.promised != 0 {
                        return Poll::Ready(Err(WireError::Body(
                            "the request body ended before its Content-Length".into(),
                        )));
                    }
                }
            }
        }
    }

    /// Queues a frame of the client's body, framed for the upstream.
    fn take_frame(&mut self, frame: Frame<Bytes>) -> Result<(), WireError> {
        match frame.into_data() {
            Ok(data) if data.is_empty() => {}
            Ok(data) if self.chunked => {
                let mut line = BytesMut::with_capacity(18);
                let _ = write!(line, "{:x}\r\n", data.len());
                self.out.push(line.freeze());
                self.out.push(data);
                self.out.push(Bytes::from_static(b"\r\n"));
            }
            Ok(data) => {
                let len = data.len() as u64;
                if len > self.promised {
                    self.body = None;
                    return Err(WireError::Body(
                        "the request body is longer than its Content-Length".into(),
                    ));
                }
                self.promised -= len;
                self.out.push(data);
            }
            // The client's trailers stay behind, as with hyper's client (which sent
            // only fields a hop-by-hop `Trailer` header declared): they would carry the
            // gateway's own identity headers past the rewrite.
            Err(_) => {}
        }
        Ok(())
    }

    /// Finishes the upload in a task of its own, once the upstream has answered before
    /// having all of the request: from the response body, it would move only while the
    /// client reads, and a client that sends all before reading would wait for ever.
    /// Gives back the write half when all was sent; after a failure it closes the write
    /// side, so the upstream does not wait for the rest of a body that is not coming.
    ///
    /// Nothing moving either way (no byte taken by the upstream, no frame from the
    /// client) for `stall` ends it as a failure: an upstream that answered and then
    /// stopped reading would otherwise hold the task and the socket for ever.
    async fn finish(mut self, mut write: WriteHalf<Io>, stall: Duration) -> Option<WriteHalf<Io>> {
        let timer = tokio::time::sleep(stall);
        tokio::pin!(timer);
        let mut seen = self.moves;
        let outcome = std::future::poll_fn(|cx| {
            if let Poll::Ready(result) = self.poll(&mut write, cx) {
                return Poll::Ready(result.is_ok() && self.write_failed.is_none());
            }
            if self.moves != seen {
                seen = self.moves;
                timer.as_mut().reset(tokio::time::Instant::now() + stall);
            }
            match std::future::Future::poll(timer.as_mut(), cx) {
                Poll::Ready(()) => Poll::Ready(false),
                Poll::Pending => Poll::Pending,
            }
        })
        .await;
        if outcome {
            return Some(write);
        }
        // A close_notify may not fit into a full socket: bounded too.
        let _ = tokio::time::timeout(stall, write.shutdown()).await;
        None
    }
}

/// Writes the head of a request for the upstream: the request line, `host`, the
/// client's headers as `rewrite` has them, and framing headers of the gateway's own,
/// made from what the body is: `Content-Length` when its length is known, chunked
/// when not, none when there is no body (but a client's `Content-Length: 0` stays).
fn encode_request(
    parts: &http::request::Parts,
    host: &HeaderValue,
    rewrite: &HeaderRewrite<'_>,
    body: &RequestBody,
) -> (Bytes, Framing) {
    let mut out = BytesMut::with_capacity(512 + parts.headers.len() * 64);
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.extend_from_slice(b" ");
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    put_header(&mut out, &header::HOST, host);
    let declared_length = rewrite.write(&parts.headers, &mut out);
    let framing = if body.is_end_stream() {
        if declared_length {
            out.extend_from_slice(b"content-length: 0\r\n");
        }
        Framing::Done
    } else if let Some(length) = body.size_hint().exact() {
        let _ = write!(out, "content-length: {length}\r\n");
        Framing::Length(length)
    } else {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
        Framing::Chunked(Chunk::Size)
    };
    out.extend_from_slice(b"\r\n");
    (out.freeze(), framing)
}

/// A response head read from the upstream.
pub struct Head {
    /// The status.
    pub status: StatusCode,
    /// End-to-end headers: the hop-by-hop ones, and those `Connection` names, are gone.
    pub headers: HeaderMap,
    pub(crate) framing: Framing,
    pub(crate) keep_alive: bool,
}

/// Whether a header is hop-by-hop (RFC 9110 §7.6.1) or for proxies only: one list for
/// requests and responses.
pub(crate) fn is_hop_by_hop(name: &[u8]) -> bool {
    // Every name here is 2 to 19 bytes long; most response headers are not one.
    matches!(name.len(), 2 | 7 | 10 | 16 | 17 | 18 | 19)
        && [
            &b"connection"[..],
            b"keep-alive",
            b"proxy-connection",
            b"te",
            b"transfer-encoding",
            b"upgrade",
            b"proxy-authorization",
            b"proxy-authenticate",
        ]
        .iter()
        .any(|h| h.eq_ignore_ascii_case(name))
}

/// Offsets of one header line's name (start, end) and value (start, end) in the head.
type Line = [u32; 4];

/// Parses a response head at the start of `buf`; `None` when more bytes are needed.
/// The head's bytes are taken from `buf`, and header values share them.
pub(crate) fn parse_head(buf: &mut BytesMut, method: &Method) -> Result<Option<Head>, WireError> {
    let mut lines: [Line; MAX_HEADERS] = [[0; 4]; MAX_HEADERS];
    let (len, code, minor, count) = {
        let mut headers = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut response = httparse::Response::new(&mut []);
        let base = buf.as_ptr() as usize;
        match httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut response,
            buf,
            &mut headers,
        ) {
            Ok(httparse::Status::Complete(len)) if len <= MAX_HEAD => {
                for (slot, h) in lines.iter_mut().zip(response.headers.iter()) {
                    // Heads are at most MAX_HEAD bytes: offsets fit in u32.
                    let name = (h.name.as_ptr() as usize - base) as u32;
                    let value = (h.value.as_ptr() as usize - base) as u32;
                    *slot = [
                        name,
                        name + h.name.len() as u32,
                        value,
                        value + h.value.len() as u32,
                    ];
                }
                (
                    len,
                    response.code.unwrap_or(0),
                    response.version.unwrap_or(1),
                    response.headers.len(),
                )
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => return Ok(None),
            Ok(_) | Err(httparse::Error::TooManyHeaders) => {
                return Err(WireError::Malformed("the response head is too large"))
            }
            Err(_) => return Err(WireError::Malformed("the response head does not parse")),
        }
    };
    let bytes = buf.split_to(len).freeze();
    // RFC 9110 §15: three digits, 100 to 599; what lies beyond has no meaning a client
    // could be given.
    if !(100..=599).contains(&code) {
        return Err(WireError::Malformed("status code outside 100-599"));
    }
    let status = StatusCode::from_u16(code).map_err(|_| WireError::Malformed("bad status"))?;
    let version = if minor == 0 {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    let mut headers = HeaderMap::with_capacity(count);
    let mut length: Option<u64> = None;
    let mut repeated_length = false;
    let mut chunked = None;
    let mut close = false;
    // HTTP/1.0 connections close after each response unless they say otherwise.
    let mut keep_alive_asked = false;
    let mut named_by_connection: Vec<HeaderName> = Vec::new();
    for &[name_start, name_end, value_start, value_end] in &lines[..count] {
        let value_at = value_start as usize..value_end as usize;
        let name = &bytes[name_start as usize..name_end as usize];
        let value = &bytes[value_at.clone()];
        if name.eq_ignore_ascii_case(b"content-length") {
            let n = parse_length(value)?;
            if length.is_some_and(|previous| previous != n) {
                return Err(WireError::Malformed("conflicting Content-Length"));
            }
            // `3, 3` or a repeated header: the one value goes on, as one header (HTTP/2
            // clients reset a stream over anything else).
            repeated_length |= length.is_some() || value.contains(&b',');
            length = Some(n);
        }
        if is_hop_by_hop(name) {
            if name.eq_ignore_ascii_case(b"transfer-encoding") {
                // Only the last coding decides the framing (RFC 9112 §6.3).
                let last = value.rsplit(|&b| b == b',').next().unwrap_or_default();
                chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
            } else if name.eq_ignore_ascii_case(b"connection") {
                for token in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                    if token.eq_ignore_ascii_case(b"close") {
                        close = true;
                    } else if token.eq_ignore_ascii_case(b"keep-alive") {
                        keep_alive_asked = true;
                    } else if let Ok(named) = HeaderName::from_bytes(token) {
                        named_by_connection.push(named);
                    }
                }
            }
            continue;
        }
        let name = HeaderName::from_bytes(name)
            .map_err(|_| WireError::Malformed("invalid header name"))?;
        let value = HeaderValue::from_maybe_shared(bytes.slice(value_at.clone()))
            .map_err(|_| WireError::Malformed("invalid header value"))?;
        headers.append(name, value);
    }
    close |= version == Version::HTTP_10 && !keep_alive_asked;
    for name in &named_by_connection {
        headers.remove(name);
    }
    let bodiless = *method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    if chunked.is_some() && version == Version::HTTP_10 {
        // RFC 9112 §6.1: HTTP/1.0 has no transfer codings; such framing is faulty.
        return Err(WireError::Malformed(
            "Transfer-Encoding in an HTTP/1.0 response",
        ));
    }
    let framing = match (bodiless, chunked, length) {
        _ if status == StatusCode::SWITCHING_PROTOCOLS => Framing::Tunnel,
        (true, _, _) | (false, None, Some(0)) => Framing::Done,
        (false, Some(true), _) => Framing::Chunked(Chunk::Size),
        (false, Some(false), _) => Framing::Eof,
        (false, None, Some(n)) => Framing::Length(n),
        (false, None, None) => Framing::Eof,
    };
    if let (true, Some(n), None) = (repeated_length, length, chunked) {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
    }
    if chunked.is_some() && length.is_some() {
        // Both: Transfer-Encoding wins, and the Content-Length must not reach the
        // client, whose framing hyper derives from it. Such an upstream is suspect;
        // its connection is not reused.
        headers.remove(header::CONTENT_LENGTH);
        close = true;
    }
    if matches!(framing, Framing::Eof | Framing::Tunnel) {
        close = true;
    }
    Ok(Some(Head {
        status,
        headers,
        framing,
        keep_alive: !close,
    }))
}

/// A Content-Length value: digits only (RFC 9110 §8.6); a list of equal values, as
/// some servers send after merging, is one value.
fn parse_length(value: &[u8]) -> Result<u64, WireError> {
    let mut result = None;
    for part in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
        if part.is_empty() || part.len() > 19 || !part.iter().all(u8::is_ascii_digit) {
            return Err(WireError::Malformed("invalid Content-Length"));
        }
        let n = part.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
        if result.is_some_and(|r| r != n) {
            return Err(WireError::Malformed("conflicting Content-Length"));
        }
        result = Some(n);
    }
    result.ok_or(WireError::Malformed("invalid Content-Length"))
}

/// Reads from `io` into `buf`, making room for `want` bytes. `Ok(0)` is end of stream.
fn poll_fill<R: AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut BytesMut,
    want: usize,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    if buf.capacity() - buf.len() < want {
        buf.reserve(want);
    }
    tokio_util::io::poll_read_buf(Pin::new(io), cx, buf)
}

/// One request on its way: written, with its response head awaited.
pub struct Exchange {
    conn: Conn,
    upload: Upload,
    method: Method,
    /// Whether the request asked to switch protocols (a 101 is then welcome).
    upgrade: bool,
    /// The whole request, for a request that may be sent again: idempotent and
    /// bodiless.
    replayable: Option<Bytes>,
    /// When the first byte of a response arrived.
    heard: Option<std::time::Instant>,
    /// Whether the connection may carry another request afterwards (a route may want
    /// a new connection for every request).
    reuse: bool,
}

/// A request that failed before any byte of an answer came back, and that may be
/// sent again on another connection (RFC 9110 §9.2.2: idempotent, and without a body,
/// so it is whole here).
pub struct Replay {
    head: Bytes,
    method: Method,
    upgrade: bool,
    reuse: bool,
}

/// A failed exchange.
pub struct Failed {
    /// Why it failed.
    pub error: WireError,
    /// Set when the connection died before answering and the request may be sent
    /// again: what a reused connection closed by the upstream at the wrong moment
    /// looks like.
    pub replay: Option<Replay>,
}

impl Exchange {
    /// Encodes `request` (origin-form target, the client's headers) for `conn`, with
    /// `host` as its Host and `rewrite` applied to its headers; it is written by
    /// [`Exchange::response`].
    pub fn new(
        conn: Conn,
        request: http::Request<RequestBody>,
        host: &HeaderValue,
        rewrite: &HeaderRewrite<'_>,
    ) -> Exchange {
        let (parts, body) = request.into_parts();
        let (head, framing) = encode_request(&parts, host, rewrite, &body);
        let bodiless = framing == Framing::Done;
        let replayable = (bodiless && parts.method.is_idempotent()).then(|| head.clone());
        Exchange {
            conn,
            upload: Upload::new(head, Some(body), framing),
            method: parts.method,
            upgrade: rewrite.upgrades(),
            replayable,
            heard: None,
            reuse: rewrite.keeps_alive(),
        }
    }

    /// Sends a failed request again, on `conn`.
    pub fn replay(conn: Conn, replay: Replay) -> Exchange {
        Exchange {
            conn,
            upload: Upload::new(replay.head, None, Framing::Done),
            method: replay.method,
            upgrade: replay.upgrade,
            // Once is enough.
            replayable: None,
            heard: None,
            reuse: replay.reuse,
        }
    }

    /// Sends the request and waits for the final response head (interim 1xx answers
    /// other than 101 are skipped). If the upstream answers before it has all of the
    /// request, the rest goes on in a task of its own, given up after `stall` without
    /// progress.
    pub async fn response(mut self, stall: Duration) -> Result<(Head, ResponseBody), Failed> {
        let started = std::time::Instant::now();
        let head = match std::future::poll_fn(|cx| self.poll_head(cx)).await {
            Ok(head) => head,
            Err(error) => {
                let died = match &error {
                    WireError::Closed => true,
                    WireError::Io(e) => matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionReset
                            | io::ErrorKind::ConnectionAborted
                            | io::ErrorKind::BrokenPipe
                            | io::ErrorKind::UnexpectedEof
                    ),
                    _ => false,
                };
                let replay = match (died && self.heard.is_none(), self.replayable) {
                    (true, Some(head)) => Some(Replay {
                        head,
                        method: self.method,
                        upgrade: self.upgrade,
                        reuse: self.reuse,
                    }),
                    _ => None,
                };
                return Err(Failed { error, replay });
            }
        };
        let done = head.framing == Framing::Done;
        let Conn {
            io,
            buf,
            answer_times,
        } = self.conn;
        // Until the first byte: how long the upstream took to answer, however slowly it then
        // writes the head.
        let first_byte = self.heard.map_or(started.elapsed(), |at| at - started);
        let (answer_times, settle) = answer_times.after(first_byte);
        // An answer that came before the whole request was sent ends the connection's
        // use, as nginx does: the upstream may not have read the rest (a 401 or 413 to a
        // body it refused), and would then parse the client's body bytes as requests of
        // their own, past the gateway's checks.
        let keep_alive =
            head.keep_alive && self.reuse && self.upload.sent && self.upload.write_failed.is_none();
        // An error answer before the whole body: the upstream does not want the rest,
        // and the connection ends with this exchange, so the rest is not sent (RFC 9112
        // §9.6 asks a client to stop sending a body the server refuses). An upstream
        // that answers early yet reads on (a 200 to a stream it echoes) still gets it.
        let refused = head.status.is_client_error() || head.status.is_server_error();
        let link = if self.upload.is_done() || refused {
            // Nearly always: the request was written before the answer came.
            Link::Whole(io)
        } else {
            let (read, write) = tokio::io::split(io);
            let upload = tokio::spawn(self.upload.finish(write, stall));
            Link::Split { read, upload }
        };
        let body = ResponseBody {
            link: Some(link),
            buf,
            framing: head.framing,
            keep_alive,
            home: None,
            ended: done,
            answer_times,
            settle,
        };
        Ok((head, body))
    }

    fn poll_head(&mut self, cx: &mut Context<'_>) -> Poll<Result<Head, WireError>> {
        loop {
            if !self.upload.is_done() {
                if let Poll::Ready(Err(e)) = self.upload.poll(&mut self.conn.io, cx) {
                    return Poll::Ready(Err(e));
                }
            }
            while !self.conn.buf.is_empty() {
                match parse_head(&mut self.conn.buf, &self.method)? {
                    None => break,
                    Some(head) if head.status == StatusCode::SWITCHING_PROTOCOLS => {
                        if !self.upgrade {
                            return Poll::Ready(Err(WireError::Malformed(
                                "the upstream switched protocols unasked",
                            )));
                        }
                        return Poll::Ready(Ok(head));
                    }
                    // 100 Continue, 103 Early Hints and the like: the final answer follows.
                    Some(head) if head.status.is_informational() => continue,
                    Some(head) => return Poll::Ready(Ok(head)),
                }
            }
            match poll_fill(&mut self.conn.io, &mut self.conn.buf, READ_SMALL, cx) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(match self.upload.write_failed.take() {
                        Some(e) => WireError::Io(e),
                        None => WireError::Closed,
                    }))
                }
                Poll::Ready(Ok(_)) => {
                    self.heard.get_or_insert_with(std::time::Instant::now);
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(WireError::Io(e))),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// The connection under a response body.
enum Link {
    /// The request is all sent.
    Whole(Io),
    /// The rest of the request is on its way in a task of its own, which gives the
    /// write half back when all is sent.
    Split {
        read: ReadHalf<Io>,
        upload: JoinHandle<Option<WriteHalf<Io>>>,
    },
}

/// A response body read from the upstream as the client's connection asks for it.
/// Dropped before its end, it closes the connection.
pub struct ResponseBody {
    link: Option<Link>,
    /// Bytes read and not yet used.
    buf: BytesMut,
    framing: Framing,
    keep_alive: bool,
    /// The pool the connection goes back to once its exchange is over, and whose
    /// requests it may carry there.
    home: Option<(Weak<Pool>, Option<Partition>)>,
    ended: bool,
    /// How long the upstream took to answer this request and the one before.
    answer_times: AnswerTimes,
    /// How long the connection rests in its pool before it carries another request.
    ///
    /// An upstream that once sends an answer too many leaves its connection an answer
    /// ahead: the extra one answers the request then waiting, the real answer then
    /// comes while the next request waits, and so on, for as long as the connection is
    /// reused faster than the upstream answers; no look at the socket before reuse can
    /// see it. The one sign is the first wrong answer coming sooner than the upstream
    /// answers. So an answer whose first byte came in less than half the time of the
    /// slower of the connection's two before (and half a millisecond or more sooner) makes
    /// it rest for twice the difference (at most [`MAX_SETTLE`]): the answer still owed then arrives while nobody waits on the
    /// connection, where the watch sees it and closes it. One wrong answer (sometimes
    /// two), not a lasting shift; ordinary answers, in time, rest not at all.
    settle: Duration,
}

impl ResponseBody {
    /// Sets where the connection goes at the end, and sends it there now if the body
    /// is empty.
    pub fn set_home(&mut self, home: Weak<Pool>, partition: Option<Partition>) {
        self.home = Some((home, partition));
        if self.ended {
            self.finish();
        }
    }

    /// After a 101: the upstream connection, and any bytes it sent after the head.
    pub fn into_upgraded(mut self) -> Option<(Io, Bytes)> {
        match self.link.take()? {
            Link::Whole(io) => Some((io, std::mem::take(&mut self.buf).freeze())),
            Link::Split { upload, .. } => {
                upload.abort();
                None
            }
        }
    }

    /// The response is read to its end: the connection goes back to the pool if it
    /// can carry another request (kept alive, nothing unread), once the request is
    /// all sent too.
    fn finish(&mut self) {
        self.ended = true;
        let link = self.link.take();
        let home = self.home.take();
        let pool = home.as_ref().and_then(|(home, _)| home.upgrade());
        let (Some(link), Some(pool), Some((_, partition)), true) =
            (link, pool, home, self.keep_alive && self.buf.is_empty())
        else {
            return;
        };
        match link {
            Link::Whole(io) => pool.give_back(
                Conn::with_history(io, std::mem::take(&mut self.buf), self.answer_times),
                partition,
                self.settle,
            ),
            Link::Split { read, upload } => {
                // The upload may still be going; the connection joins the pool when it is
                // done, if it ends well.
                let (answer_times, settle) = (self.answer_times, self.settle);
                tokio::spawn(async move {
                    if let Ok(Some(write)) = upload.await {
                        if read.is_pair_of(&write) {
                            let conn = Conn::with_history(
                                read.unsplit(write),
                                BytesMut::new(),
                                answer_times,
                            );
                            pool.give_back(conn, partition, settle);
                        }
                    }
                });
            }
        }
    }

    fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, WireError>>> {
        let Some(link) = &mut self.link else {
            return Poll::Ready(None);
        };
        loop {
            let buf = &mut self.buf;
            let want = match self.framing {
                Framing::Done | Framing::Tunnel => return Poll::Ready(None),
                Framing::Length(n) => {
                    if !buf.is_empty() {
                        let take = buf.len().min(usize::try_from(n).unwrap_or(usize::MAX));
                        self.framing = match n - take as u64 {
                            0 => Framing::Done,
                            rest => Framing::Length(rest),
                        };
                        return Poll::Ready(Some(Ok(Frame::data(buf.split_to(take).freeze()))));
                    }
                    usize::try_from(n)
                        .unwrap_or(READ_CHUNK)
                        .clamp(READ_SMALL, READ_CHUNK)
                }
                Framing::Eof => {
                    if !buf.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(buf.split().freeze()))));
                    }
                    READ_CHUNK
                }
                Framing::Chunked(state) => match decode_chunk(buf, state)? {
                    Step::Data(data, next) => {
                        self.framing = Framing::Chunked(next);
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    Step::Next(next) => {
                        self.framing = Framing::Chunked(next);
                        continue;
                    }
                    Step::End(trailers) => {
                        self.framing = Framing::Done;
                        if let Some(trailers) = trailers {
                            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                        }
                        continue;
                    }
                    Step::More(Some(n)) => usize::try_from(n)
                        .unwrap_or(READ_CHUNK)
                        .clamp(READ_SMALL, READ_CHUNK),
                    Step::More(None) => READ_SMALL,
                },
            };
            let filled = match link {
                Link::Whole(io) => poll_fill(io, &mut self.buf, want, cx),
                Link::Split { read, .. } => poll_fill(read, &mut self.buf, want, cx),
            };
            match filled {
                Poll::Ready(Ok(0)) if self.framing == Framing::Eof => {
                    self.keep_alive = false;
                    self.framing = Framing::Done;
                }
                Poll::Ready(Ok(0)) => return Poll::Ready(Some(Err(WireError::Closed))),
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Some(Err(WireError::Io(e)))),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // Dropped before its end: the upload task holds the other half of the socket,
        // and would keep it open; the connection is to close now.
        if let Some(Link::Split { upload, .. }) = &self.link {
            upload.abort();
        }
    }
}

impl hyper::body::Body for ResponseBody {
    type Data = Bytes;
    type Error = WireError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, WireError>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        let polled = self.poll_data(cx);
        match &polled {
            Poll::Ready(None) => self.finish(),
            // Trailers end a body, and hyper's servers stop polling once they have them.
            Poll::Ready(Some(Ok(frame))) if frame.is_trailers() => self.finish(),
            // The last data of a Content-Length body: over now, without another poll.
            Poll::Ready(Some(Ok(_))) if self.framing == Framing::Done => self.finish(),
            Poll::Ready(Some(Ok(_))) => {}
            // A broken body leaves the connection in an unknown state: it goes.
            Poll::Ready(Some(Err(_))) => {
                self.ended = true;
                if let Some(Link::Split { upload, .. }) = self.link.take() {
                    upload.abort();
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Length(n) => SizeHint::with_exact(n),
            Framing::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

/// What one step of chunked decoding found.
pub(crate) enum Step {
    /// Chunk data, and the state after it.
    Data(Bytes, Chunk),
    /// A framing line was consumed.
    Next(Chunk),
    /// The body ended, with trailers if there were any.
    End(Option<HeaderMap>),
    /// More bytes are needed (at least this many, when known).
    More(Option<u64>),
}

/// Decodes what `buf` holds of a chunked body in state `state` (RFC 9112 §7.1).
pub(crate) fn decode_chunk(buf: &mut BytesMut, state: Chunk) -> Result<Step, WireError> {
    match state {
        Chunk::Data(n) => {
            if buf.is_empty() {
                return Ok(Step::More(Some(n)));
            }
            let take = buf.len().min(usize::try_from(n).unwrap_or(usize::MAX));
            let rest = n - take as u64;
            let next = if rest == 0 {
                Chunk::DataEnd
            } else {
                Chunk::Data(rest)
            };
            Ok(Step::Data(buf.split_to(take).freeze(), next))
        }
        Chunk::DataEnd => match buf.get(..2) {
            None => Ok(Step::More(None)),
            Some(b"\r\n") => {
                buf.advance(2);
                Ok(Step::Next(Chunk::Size))
            }
            Some(_) => Err(WireError::Malformed("chunk data not followed by CRLF")),
        },
        Chunk::Size => {
            let Some(end) = memchr::memchr(b'\n', buf) else {
                return if buf.len() > MAX_HEAD {
                    Err(WireError::Malformed("chunk-size line too long"))
                } else {
                    Ok(Step::More(None))
                };
            };
            let size = parse_chunk_size(&buf[..end])?;
            buf.advance(end + 1);
            Ok(Step::Next(if size == 0 {
                Chunk::Trailers
            } else {
                Chunk::Data(size)
            }))
        }
        Chunk::Trailers => {
            if buf.starts_with(b"\r\n") {
                buf.advance(2);
                return Ok(Step::End(None));
            }
            if buf.len() < 2 {
                return Ok(Step::More(None));
            }
            let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
            match httparse::parse_headers(buf, &mut fields) {
                Ok(httparse::Status::Complete((len, fields))) => {
                    let mut trailers = HeaderMap::with_capacity(fields.len());
                    for field in fields.iter() {
                        // Fields about the connection or the framing have no place in
                        // trailers (RFC 9110 §6.5.1), and HTTP/2 refuses them.
                        let raw = field.name.as_bytes();
                        if is_hop_by_hop(raw) || raw.eq_ignore_ascii_case(b"content-length") {
                            continue;
                        }
                        let name = HeaderName::from_bytes(field.name.as_bytes())
                            .map_err(|_| WireError::Malformed("invalid trailer name"))?;
                        let value = HeaderValue::from_bytes(field.value)
                            .map_err(|_| WireError::Malformed("invalid trailer value"))?;
                        trailers.append(name, value);
                    }
                    buf.advance(len);
                    Ok(Step::End(Some(trailers)))
                }
                Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => Ok(Step::More(None)),
                _ => Err(WireError::Malformed("invalid trailer section")),
            }
        }
    }
}

/// `chunk-size [ chunk-ext ] CRLF`, the line without its LF.
pub(crate) fn parse_chunk_size(line: &[u8]) -> Result<u64, WireError> {
    let bad = || WireError::Malformed("invalid chunk-size line");
    let line = line.strip_suffix(b"\r").ok_or_else(bad)?;
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 15 {
        return Err(bad());
    }
    let rest = &line[digits..];
    // Extensions are ignored, but must be extensions: `;` after optional whitespace
    // (BWS: spaces and tabs only; a bare CR or a form feed is no whitespace here).
    let blank = rest
        .iter()
        .take_while(|&&b| b == b' ' || b == b'\t')
        .count();
    let rest = &rest[blank..];
    if !(rest.is_empty() || rest.starts_with(b";")) || rest.iter().any(|&b| b < 0x20 && b != b'\t')
    {
        return Err(bad());
    }
    Ok(line[..digits].iter().fold(0u64, |n, &d| {
        n * 16 + u64::from((d as char).to_digit(16).unwrap_or(0))
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str) -> Result<Option<Head>, WireError> {
        parse_head(&mut BytesMut::from(text.as_bytes()), &Method::GET)
    }

    #[test]
    fn response_framing_follows_rfc_9112() {
        let h = head("HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-a: 1\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(h.framing, Framing::Length(5));
        assert!(h.keep_alive);
        assert_eq!(h.headers["content-length"], "5");

        let h = head("HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(h.framing, Framing::Chunked(Chunk::Size));
        assert!(!h.headers.contains_key("transfer-encoding"));

        // Both: chunked wins, Content-Length goes, and so does the connection.
        let h = head("HTTP/1.1 200 OK\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(h.framing, Framing::Chunked(Chunk::Size));
        assert!(!h.headers.contains_key("content-length"));
        assert!(!h.keep_alive);

        let h = head("HTTP/1.1 200 OK\r\n\r\n").unwrap().unwrap();
        assert_eq!((h.framing, h.keep_alive), (Framing::Eof, false));
        let h = head("HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!h.keep_alive);
        let h = head("HTTP/1.0 200 OK\r\ncontent-length: 1\r\nconnection: keep-alive\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(h.keep_alive);
        let h = head("HTTP/1.1 204 No Content\r\ncontent-length: 7\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(h.framing, Framing::Done);
        let h = parse_head(
            &mut BytesMut::from(&b"HTTP/1.1 200 OK\r\ncontent-length: 7\r\n\r\n"[..]),
            &Method::HEAD,
        )
        .unwrap()
        .unwrap();
        assert_eq!((h.framing, h.keep_alive), (Framing::Done, true));
        assert_eq!(h.headers["content-length"], "7");

        // A list of one value, or the same header twice, reaches the client as one.
        for twice in [
            "content-length: 3, 3\r\n",
            "content-length: 3\r\ncontent-length: 3\r\n",
        ] {
            let h = head(&format!("HTTP/1.1 200 OK\r\n{twice}\r\n"))
                .unwrap()
                .unwrap();
            assert_eq!(h.framing, Framing::Length(3));
            let values: Vec<_> = h.headers.get_all("content-length").iter().collect();
            assert_eq!(values, ["3"]);
        }
        // An empty body is over at its head, so the connection is free at once.
        let h = head("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!((h.framing, h.keep_alive), (Framing::Done, true));
        // A 101 makes the connection a tunnel: no body, and never back in the pool.
        let h = head(
            "HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n",
        )
        .unwrap()
        .unwrap();
        assert_eq!((h.framing, h.keep_alive), (Framing::Tunnel, false));
        assert!(head("HTTP/1.1 200 OK\r\ncontent-length: 3")
            .unwrap()
            .is_none());
    }

    #[test]
    fn hop_by_hop_and_connection_named_response_headers_go() {
        let h = head(
            "HTTP/1.1 200 OK\r\nconnection: x-secret, close\r\nkeep-alive: 5\r\nx-secret: 1\r\n\
             upgrade: h2c\r\nproxy-authenticate: Basic\r\ntrailer: x\r\ncontent-type: a/b\r\n\
             content-length: 0\r\n\r\n",
        )
        .unwrap()
        .unwrap();
        let mut names: Vec<&str> = h.headers.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        // `Trailer` is end-to-end (RFC 9110 §6.6.2, not in §7.6.1's list): hyper's
        // HTTP/1.1 server sends the trailers it announces.
        assert_eq!(names, ["content-length", "content-type", "trailer"]);
        assert!(!h.keep_alive);
    }

    #[test]
    fn bad_response_heads_are_refused() {
        for bad in [
            "HTTP/1.1 abc OK\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 1, 2\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: +1\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 99999999999999999999\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length:\r\n\r\n",
            "HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
            "HTTP/2 200 OK\r\n\r\n",
            "HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
            "SSH-2.0-OpenSSH\r\n\r\n",
        ] {
            assert!(head(bad).is_err(), "{bad:?}");
        }
        let huge = format!("HTTP/1.1 200 OK\r\nx: {}", "a".repeat(MAX_HEAD));
        assert!(head(&huge).is_err());
    }

    fn decode_all(wire: &[u8]) -> Result<(Vec<u8>, Option<HeaderMap>, usize), WireError> {
        let mut buf = BytesMut::new();
        let mut state = Chunk::Size;
        let mut body = Vec::new();
        // Fed one byte at a time: every state must cope with a split anywhere.
        for (i, &b) in wire.iter().enumerate() {
            buf.extend_from_slice(&[b]);
            loop {
                match decode_chunk(&mut buf, state)? {
                    Step::Data(data, next) => {
                        body.extend_from_slice(&data);
                        state = next;
                    }
                    Step::Next(next) => state = next,
                    Step::End(trailers) => return Ok((body, trailers, wire.len() - i - 1)),
                    Step::More(_) => break,
                }
            }
        }
        Err(WireError::Closed)
    }

    #[test]
    fn chunked_bodies_decode_whatever_the_splits() {
        let (body, trailers, left) =
            decode_all(b"5;foo=bar\r\nhello\r\n1 ; x\r\n!\r\nA\r\n0123456789\r\n0\r\n\r\nNEXT")
                .unwrap();
        assert_eq!(body, b"hello!0123456789");
        assert!(trailers.is_none());
        assert_eq!(left, 4, "bytes after the body are not consumed");
        // Connection and framing fields among trailers are dropped.
        let (body, trailers, _) = decode_all(
            b"2\r\nok\r\n0\r\nx-sum: 1\r\nconnection: close\r\ncontent-length: 9\r\n\
              transfer-encoding: chunked\r\ny: 2\r\n\r\n",
        )
        .unwrap();
        assert_eq!(body, b"ok");
        let trailers = trailers.unwrap();
        assert_eq!(trailers.len(), 2, "{trailers:?}");
        assert_eq!(
            (&trailers["x-sum"], &trailers["y"]),
            (&"1".parse().unwrap(), &"2".parse().unwrap())
        );
        for bad in [
            &b"zz\r\n"[..],
            b"5\r\nhelloXX",
            b"5\n",
            b"-1\r\n",
            b"1234567890123456\r\n",
            b"5 x\r\n",
            b"\r\n",
        ] {
            assert!(
                decode_all(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn only_an_answer_much_sooner_than_the_ones_before_makes_a_connection_rest() {
        let ms = Duration::from_millis;
        let times = |a, b| AnswerTimes([ms(a), ms(b)]);
        // No history, or answers in their usual time: no rest.
        assert_eq!(AnswerTimes::default().after(ms(5)).1, Duration::ZERO);
        assert_eq!(times(5, 5).after(ms(4)).1, Duration::ZERO);
        assert_eq!(times(5, 6).after(ms(9)).1, Duration::ZERO);
        // A fast upstream's noise: no rest.
        let us = Duration::from_micros;
        assert_eq!(
            AnswerTimes([us(100), us(500)]).after(us(50)).1,
            Duration::ZERO
        );
        assert_eq!(AnswerTimes([us(100), us(900)]).after(us(50)).1, us(1700));
        // An answer sooner than half the slower of the two before: twice the difference.
        assert_eq!(times(5, 2).after(ms(1)).1, ms(8));
        assert_eq!(times(5, 5).after(ms(0)).1, ms(10));
        assert_eq!(times(900, 5).after(ms(1)).1, MAX_SETTLE);
        // The latest becomes history.
        assert_eq!(times(5, 6).after(ms(1)).0 .0, [ms(6), ms(1)]);
    }

    #[test]
    fn chunk_sizes_are_hex() {
        assert_eq!(parse_chunk_size(b"ff\r").unwrap(), 255);
        assert_eq!(parse_chunk_size(b"0\r").unwrap(), 0);
        assert_eq!(parse_chunk_size(b"FfFf;a=\"b\"\r").unwrap(), 65535);
        assert_eq!(
            parse_chunk_size(b"fffffffffffffff\r").unwrap(),
            0xfff_ffff_ffff_ffff
        );
    }

    /// A small deterministic generator (xorshift64*): the same inputs every run.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }
    }

    /// Runs a body decoder over all of `wire` as the response body would, returning
    /// how many bytes of data it produced; errors are fine, panics and loops are not.
    fn drain_body(wire: &[u8], framing: Framing) -> usize {
        let mut buf = BytesMut::from(wire);
        let mut produced = 0;
        let mut state = match framing {
            Framing::Chunked(state) => state,
            _ => return 0,
        };
        // Each step consumes input or ends; more steps than bytes would be a loop.
        for _ in 0..=wire.len() + 2 {
            match decode_chunk(&mut buf, state) {
                Ok(Step::Data(data, next)) => {
                    assert!(!data.is_empty());
                    produced += data.len();
                    state = next;
                }
                Ok(Step::Next(next)) => state = next,
                Ok(Step::End(_)) | Ok(Step::More(_)) | Err(_) => return produced,
            }
        }
        panic!("the chunked decoder did not progress on {wire:?}");
    }

    #[test]
    fn no_upstream_bytes_panic_the_parsers() {
        let seeds: [&[u8]; 6] = [
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-type: a/b\r\n\r\nhello",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n\
              5;x=y\r\nhello\r\n0\r\nx-sum: 1\r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n",
            b"HTTP/1.0 200 OK\r\nconnection: keep-alive, x-a\r\nx-a: 1\r\ncontent-length: 3, 3\r\n\r\nabc",
            b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ntransfer-encoding: chunked\r\n\r\n\
              a\r\n0123456789\r\n0\r\n\r\n",
        ];
        let alphabet = b":;, \t\r\n0123456789abcdefABCDEF-\x00\x7f\xff";
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut heads = 0;
        for round in 0..60_000 {
            let mut wire = seeds[round % seeds.len()].to_vec();
            for _ in 0..1 + rng.below(4) {
                let at = rng.below(wire.len() + 1);
                match rng.below(5) {
                    0 if at < wire.len() => wire[at] = alphabet[rng.below(alphabet.len())],
                    1 => wire.insert(at, alphabet[rng.below(alphabet.len())]),
                    2 if at < wire.len() => {
                        wire.remove(at);
                    }
                    3 => wire.truncate(at),
                    _ => {
                        let end = (at + rng.below(8)).min(wire.len());
                        let copy = wire[at..end].to_vec();
                        wire.splice(at..at, copy);
                    }
                }
            }
            for method in [Method::GET, Method::HEAD] {
                let mut buf = BytesMut::from(&wire[..]);
                if let Ok(Some(head)) = parse_head(&mut buf, &method) {
                    heads += 1;
                    // What is left is the body (or the next head): never more than came.
                    assert!(buf.len() < wire.len());
                    let produced = drain_body(&buf, head.framing);
                    assert!(produced <= buf.len());
                }
            }
        }
        // The mutations leave many heads valid: the body decoders were reached.
        assert!(heads > 10_000, "{heads}");
    }
}
