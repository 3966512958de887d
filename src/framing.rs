//! A guard under hyper on HTTP/1.1 connections that refuses a request head carrying both
//! `Content-Length` and `Transfer-Encoding` (RFC 9112 §6.3: the classic smuggling
//! probe).
//!
//! hyper accepts such a request, lets Transfer-Encoding win and drops Content-Length
//! before the gateway sees the headers, so the refusal has to happen on the bytes. The
//! guard follows the message framing of the plaintext stream (head, then a fixed or
//! chunked body, then the next head) and fails the read that completes an ambiguous
//! head, so hyper never parses it and nothing reaches an upstream.
//!
//! It follows every request of a connection. A request that asks to switch protocols
//! (`Upgrade`, or `CONNECT`) is the one place the stream may stop being HTTP/1.1: the
//! bytes after it are held back from hyper until the gateway has answered it
//! ([`Switch`]). Only a switch (101, or a 2xx to `CONNECT`) ends the guard; any other
//! answer sends the held bytes through it like the rest. Where the guard cannot follow
//! the framing (a malformed length or chunk line, which hyper refuses too), it lets
//! hyper refuse the message and fails every later read, rather than go on blind.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The shortest line limit, whatever the head limit: chunk-size lines and trailer
/// lines are bounded by hyper at 16 KiB.
const MIN_LINE: usize = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Head,
    Body(u64),
    ChunkSize,
    ChunkData(u64),
    ChunkDataEnd,
    Trailers,
    /// A request that asks to switch protocols is complete: what follows waits for
    /// its answer.
    AwaitingSwitch,
    /// The connection switched protocols (a 101, a CONNECT tunnel, or HTTP/2 by prior
    /// knowledge): no more HTTP/1.1 to follow.
    Switched,
    /// The framing could not be followed; hyper refuses the message, and no later
    /// byte is let through.
    Lost,
}

/// Tracks HTTP/1.1 request framing over a byte stream.
#[derive(Debug)]
pub struct Framing {
    phase: Phase,
    line: Vec<u8>,
    max_line: usize,
    content_length: Option<u64>,
    /// The head's `Content-Length` values could not be made one number.
    bad_length: bool,
    chunked: bool,
    transfer_encoding: bool,
    /// The head asks to switch protocols (`Upgrade`, or the `CONNECT` method).
    switch: bool,
    request_line: bool,
    /// Nothing has been seen yet on the connection: only here may the HTTP/2 preface
    /// start.
    at_start: bool,
}

impl Default for Framing {
    fn default() -> Self {
        Framing::new(MIN_LINE)
    }
}

fn ambiguous() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        "request with both Content-Length and Transfer-Encoding refused",
    )
}

fn bare_lf() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        "a line of a chunked request body ended in a bare LF",
    )
}

fn lost() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        "the request framing could not be followed",
    )
}

/// Why the guard refused a stream, and how much of the refused read may still be served.
#[derive(Debug)]
pub struct Refusal {
    /// Bytes at the start of the read that precede the refused head: whole requests,
    /// which hyper may serve before the connection is dropped.
    pub safe: usize,
    /// What was refused.
    pub error: io::Error,
}

impl Refusal {
    fn at(safe: usize, error: io::Error) -> Refusal {
        Refusal { safe, error }
    }
}

/// `Content-Length` as hyper reads it: digits, or a list of equal digit runs.
fn parse_length(value: &[u8]) -> Option<u64> {
    let mut length = None;
    for part in value.split(|&b| b == b',').map(trim) {
        if part.is_empty() || !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let n = part.iter().try_fold(0u64, |n, &d| {
            n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
        })?;
        if length.is_some_and(|l| l != n) {
            return None;
        }
        length = Some(n);
    }
    length
}

impl Framing {
    /// A guard for heads of at most `max_head` bytes (the server's limit): a longer
    /// line cannot be part of a head hyper accepts.
    pub fn new(max_head: usize) -> Framing {
        Framing {
            phase: Phase::Head,
            line: Vec::new(),
            max_line: max_head.max(MIN_LINE),
            content_length: None,
            bad_length: false,
            chunked: false,
            transfer_encoding: false,
            switch: false,
            request_line: true,
            at_start: true,
        }
    }

    /// Follows `bytes`; returns how many were taken before a request that asks to
    /// switch protocols was complete (the rest must wait for [`Framing::resume`]). A
    /// refusal means the connection must be dropped, after the bytes before the refused
    /// head (which are whole requests) have been served.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<usize, Refusal> {
        let mut rest = bytes;
        // Where, in `bytes`, the head being read began: `None` when it began in an
        // earlier read (those bytes are hyper's already).
        let mut head_start = None;
        while !rest.is_empty() {
            match self.phase {
                Phase::Switched => return Ok(bytes.len()),
                // hyper refuses the message it has; nothing after it may reach hyper.
                Phase::Lost => return Ok(bytes.len() - rest.len()),
                Phase::AwaitingSwitch => return Ok(bytes.len() - rest.len()),
                Phase::Body(n) | Phase::ChunkData(n) => {
                    self.at_start = false;
                    let take = n.min(rest.len() as u64);
                    rest = &rest[take as usize..];
                    let left = n - take;
                    match (self.phase, left) {
                        (Phase::Body(_), 0) => self.next_head(),
                        (Phase::Body(_), left) => self.phase = Phase::Body(left),
                        (_, 0) => self.phase = Phase::ChunkDataEnd,
                        (_, left) => self.phase = Phase::ChunkData(left),
                    }
                }
                Phase::Head | Phase::ChunkSize | Phase::ChunkDataEnd | Phase::Trailers => {
                    let Some(end) = memchr::memchr(b'\n', rest) else {
                        // A line continued by the next read: kept until it ends.
                        if self.line.len() + rest.len() > self.max_line {
                            return Err(Refusal::at(0, lost()));
                        }
                        self.line.extend_from_slice(rest);
                        return Ok(bytes.len());
                    };
                    let line_start = bytes.len() - rest.len();
                    let (line, after) = rest.split_at(end + 1);
                    rest = after;
                    if self.line.len() + line.len() > self.max_line {
                        return Err(Refusal::at(0, lost()));
                    }
                    if self.phase == Phase::Head && self.request_line {
                        head_start = self.line.is_empty().then_some(line_start);
                    }
                    // In a chunked body only CRLF ends a line: hyper reads a bare LF
                    // there as an ordinary byte (a trailer section ends only at CRLF
                    // CRLF), so a guard that took it for a line end would lose step.
                    let crlf = match line.len() {
                        1 => self.line.last() == Some(&b'\r'),
                        n => line[n - 2] == b'\r',
                    };
                    if self.phase != Phase::Head && !crlf {
                        self.phase = Phase::Lost;
                        return Err(Refusal::at(head_start.unwrap_or(0), bare_lf()));
                    }
                    let done = if self.line.is_empty() {
                        // Nearly always: the whole line came in this read, and is read
                        // where it lies.
                        self.line_done(trim_eol(line))
                    } else {
                        let mut joined = std::mem::take(&mut self.line);
                        joined.extend_from_slice(line);
                        let done = self.line_done(trim_eol(&joined));
                        joined.clear();
                        self.line = joined;
                        done
                    };
                    if let Err(error) = done {
                        self.phase = Phase::Lost;
                        return Err(Refusal::at(head_start.unwrap_or(0), error));
                    }
                }
            }
        }
        Ok(bytes.len())
    }

    /// Whether the guard holds further bytes back until a switch is decided.
    pub fn awaits_switch(&self) -> bool {
        self.phase == Phase::AwaitingSwitch
    }

    /// Whether the guard lets nothing more through.
    fn is_lost(&self) -> bool {
        self.phase == Phase::Lost
    }

    /// The request that asked to switch was answered without a switch: the stream
    /// goes on as HTTP/1.1.
    pub fn resume(&mut self) {
        if self.phase == Phase::AwaitingSwitch {
            self.phase = Phase::Head;
        }
    }

    fn line_done(&mut self, line: &[u8]) -> io::Result<()> {
        match self.phase {
            Phase::Head => self.head_line(line),
            Phase::ChunkSize => {
                // Laxer than hyper (which also wants nothing but whitespace before a
                // `;`): where both read a size, it is the same size.
                let size = line.split(|&b| b == b';').next().unwrap_or_default();
                let size = std::str::from_utf8(size)
                    .ok()
                    .and_then(|s| u64::from_str_radix(s.trim(), 16).ok());
                self.phase = match size {
                    Some(0) => Phase::Trailers,
                    Some(n) => Phase::ChunkData(n),
                    None => Phase::Lost,
                };
                Ok(())
            }
            Phase::ChunkDataEnd => {
                self.phase = if line.is_empty() {
                    Phase::ChunkSize
                } else {
                    Phase::Lost
                };
                Ok(())
            }
            Phase::Trailers => {
                if line.is_empty() {
                    self.next_head();
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn head_line(&mut self, line: &[u8]) -> io::Result<()> {
        if self.request_line {
            // Blank lines before a request line are tolerated (RFC 9112 §2.2).
            if !line.is_empty() {
                self.request_line = false;
                if self.at_start && line == b"PRI * HTTP/2.0" {
                    // HTTP/2 by prior knowledge: hyper serves the connection as HTTP/2,
                    // whose frames carry their own lengths.
                    self.phase = Phase::Switched;
                    return Ok(());
                }
                self.at_start = false;
                self.switch = line.starts_with(b"CONNECT ");
            }
            return Ok(());
        }
        if line.is_empty() {
            if self.transfer_encoding && (self.content_length.is_some() || self.bad_length) {
                return Err(ambiguous());
            }
            if self.bad_length || (self.transfer_encoding && !self.chunked) {
                // hyper answers 400 and reads no further.
                self.phase = Phase::Lost;
                return Ok(());
            }
            if self.chunked {
                self.phase = Phase::ChunkSize;
            } else {
                match self.content_length {
                    Some(n) if n > 0 => self.phase = Phase::Body(n),
                    _ => self.next_head(),
                }
            }
            return Ok(());
        }
        let Some(colon) = memchr::memchr(b':', line) else {
            return Ok(());
        };
        let name = &line[..colon];
        // Most header lines are none of the three; their values are never looked at.
        if !matches!(name.len(), 7 | 14 | 17) {
            return Ok(());
        }
        let value = trim(&line[colon + 1..]);
        if name.eq_ignore_ascii_case(b"content-length") {
            match parse_length(value) {
                Some(n) if self.content_length.is_none_or(|l| l == n) => {
                    self.content_length = Some(n)
                }
                _ => self.bad_length = true,
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            self.transfer_encoding = true;
            self.chunked = value
                .rsplit(|&b| b == b',')
                .next()
                .is_some_and(|last| trim(last).eq_ignore_ascii_case(b"chunked"));
        } else if name.eq_ignore_ascii_case(b"upgrade") {
            self.switch = true;
        }
        Ok(())
    }

    /// The message is over: the next head begins, unless the one just ended asked to
    /// switch protocols.
    fn next_head(&mut self) {
        self.phase = if self.switch {
            Phase::AwaitingSwitch
        } else {
            Phase::Head
        };
        self.content_length = None;
        self.bad_length = false;
        self.chunked = false;
        self.transfer_encoding = false;
        self.switch = false;
        self.request_line = true;
    }
}

fn trim_eol(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

fn trim(bytes: &[u8]) -> &[u8] {
    let start = bytes
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |i| i + 1);
    &bytes[start..end]
}

/// How the gateway answered a request that asked to switch protocols: shared by a
/// connection's [`Guarded`] stream and the service answering its requests.
#[derive(Debug, Default)]
pub struct Switch {
    /// 0: not answered yet; 1: answered without a switch; 2: switched.
    decided: AtomicU8,
    reader: Mutex<Option<Waker>>,
}

const UNDECIDED: u8 = 0;
const STAYED: u8 = 1;
const SWITCHED: u8 = 2;

impl Switch {
    /// Records the answer to the request that asked to switch: `switched` when it was
    /// a 101 (or a 2xx to `CONNECT`). Wakes the connection's reader.
    pub fn decide(&self, switched: bool) {
        let state = if switched { SWITCHED } else { STAYED };
        self.decided.store(state, Ordering::Release);
        let waker = self.reader.lock().ok().and_then(|mut w| w.take());
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// The answer, taken (the next request that asks to switch waits afresh); `None`
    /// after registering `cx` to be woken when it comes.
    fn take(&self, cx: &mut Context<'_>) -> Option<bool> {
        let taken = |s: &Self| match s.decided.swap(UNDECIDED, Ordering::AcqRel) {
            UNDECIDED => None,
            state => Some(state == SWITCHED),
        };
        if let Some(decided) = taken(self) {
            return Some(decided);
        }
        if let Ok(mut reader) = self.reader.lock() {
            *reader = Some(cx.waker().clone());
        }
        // It may have come between the look and the registration.
        taken(self)
    }
}

/// Whether a request asks to switch protocols, so that the answer to it must be
/// recorded in the connection's [`Switch`].
pub fn asks_to_switch<B>(request: &http::Request<B>) -> bool {
    request.method() == http::Method::CONNECT
        || request.headers().contains_key(http::header::UPGRADE)
}

/// A stream whose reads pass through a [`Framing`] guard.
///
/// Where the guard refuses what follows (an ambiguous head) or cannot follow it (what
/// hyper refuses too), no further byte reaches hyper: reads wait until the answers to
/// what hyper already has are written, then fail, which ends the connection.
pub struct Guarded<T> {
    inner: T,
    framing: Option<Framing>,
    /// After a refusal that left whole requests to serve: reads wait until their
    /// answers are being written (waking this), then fail.
    draining: Option<Draining>,
    /// Bytes read after a request that asks to switch, held until it is answered.
    held: Vec<u8>,
    switch: Arc<Switch>,
}

impl<T> Guarded<T> {
    /// Guards `inner` with `framing` (HTTP/1.1), or passes it through (`None`);
    /// `switch` carries the answers to requests that ask to switch protocols.
    pub fn new(inner: T, framing: Option<Framing>, switch: Arc<Switch>) -> Self {
        Guarded {
            inner,
            framing,
            draining: None,
            held: Vec::new(),
            switch,
        }
    }
}

impl<T: AsyncRead + Unpin> Guarded<T> {
    /// Gives hyper what it may have of the held bytes.
    fn release_held(&mut self, buf: &mut ReadBuf<'_>) -> io::Result<()> {
        let n = self.held.len().min(buf.remaining());
        let taken = match &mut self.framing {
            Some(framing) => match framing.feed(&self.held[..n]) {
                Ok(taken) => taken,
                Err(refusal) if refusal.safe > 0 => {
                    // Serve the whole requests before the refused head; the next read
                    // fails.
                    self.held.truncate(refusal.safe);
                    refusal.safe
                }
                Err(refusal) => return Err(refusal.error),
            },
            None => n,
        };
        buf.put_slice(&self.held[..taken]);
        self.held.drain(..taken);
        Ok(())
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Guarded<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(draining) = &mut this.draining {
            // No more bytes: the requests hyper has are answered, then the connection
            // ends (with an error, so hyper does not wait for a next request).
            if !draining.answered {
                draining.reader = Some(cx.waker().clone());
                return Poll::Pending;
            }
            return Poll::Ready(Err(lost()));
        }
        loop {
            if let Some(framing) = &mut this.framing {
                if framing.is_lost() {
                    // hyper refuses the message it has: let it answer, then end.
                    this.draining = Some(Draining::default());
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                if framing.awaits_switch() {
                    match this.switch.take(cx) {
                        None => return Poll::Pending,
                        // A tunnel now: the held bytes are its first, as they came.
                        Some(true) => this.framing = None,
                        Some(false) => framing.resume(),
                    }
                }
            }
            if this.held.is_empty() {
                break;
            }
            if buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            let before = buf.filled().len();
            this.release_held(buf)?;
            if buf.filled().len() > before {
                return Poll::Ready(Ok(()));
            }
            // Nothing released: what is held follows another request that asks to
            // switch, whose answer is awaited above.
        }
        let before = buf.filled().len();
        std::task::ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        if let Some(framing) = &mut this.framing {
            let read = buf.filled().len() - before;
            match framing.feed(&buf.filled()[before..]) {
                Ok(taken) if taken < read => {
                    // The rest waits for the answer to the request that asks to switch.
                    this.held.extend_from_slice(&buf.filled()[before + taken..]);
                    buf.set_filled(before + taken);
                }
                Ok(_) => {}
                Err(refusal) => {
                    // Take the refused head back: hyper must never parse it. The whole
                    // requests before it are served before the connection ends.
                    buf.set_filled(before + refusal.safe);
                    if refusal.safe == 0 {
                        return Poll::Ready(Err(refusal.error));
                    }
                    this.draining = Some(Draining::default());
                }
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// The end of a connection whose stream was refused after whole requests.
#[derive(Default)]
struct Draining {
    /// Some answer has been written since.
    wrote: bool,
    /// ... and flushed.
    answered: bool,
    reader: Option<Waker>,
}

impl<T> Guarded<T> {
    /// Notes, on a draining connection, that an answer is being written.
    fn wrote(&mut self, written: &Poll<io::Result<usize>>) {
        if let (Some(draining), Poll::Ready(Ok(1..))) = (&mut self.draining, written) {
            draining.wrote = true;
        }
    }

    /// Answers were flushed: a draining connection may now end.
    fn flushed(&mut self) {
        if let Some(draining) = self.draining.as_mut().filter(|d| d.wrote) {
            draining.answered = true;
            if let Some(reader) = draining.reader.take() {
                reader.wake();
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Guarded<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.wrote(&written);
        written
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.wrote(&written);
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let flushed = Pin::new(&mut this.inner).poll_flush(cx);
        if flushed.is_ready() {
            this.flushed();
        }
        flushed
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed_all(chunks: &[&[u8]]) -> Result<Framing, Refusal> {
        let mut framing = Framing::default();
        for chunk in chunks {
            let taken = framing.feed(chunk)?;
            assert_eq!(taken, chunk.len(), "no switch was asked for");
        }
        Ok(framing)
    }

    fn byte_by_byte(stream: &[u8]) -> Result<Framing, Refusal> {
        let chunks: Vec<&[u8]> = stream.chunks(1).collect();
        feed_all(&chunks)
    }

    #[test]
    fn both_framings_are_refused_in_either_order() {
        for head in [
            &b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
            b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\nHost: a\r\ncontent-length: 5\r\n\r\n",
            // A list hyper reads as one length is a length all the same.
            b"POST /x HTTP/1.1\r\nContent-Length: 5, 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST /x HTTP/1.1\r\nContent-Length: x\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            assert!(feed_all(&[head]).is_err());
            assert!(byte_by_byte(head).is_err());
        }
    }

    #[test]
    fn bodies_are_skipped_so_their_contents_are_not_heads() {
        let hidden = b"POST /x HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n";
        let mut stream = format!(
            "POST /a HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            hidden.len()
        )
        .into_bytes();
        stream.extend_from_slice(hidden);
        // A chunked body holding the same bytes, split across chunks.
        stream.extend_from_slice(b"POST /b HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n");
        let (a, b) = hidden.split_at(20);
        stream.extend_from_slice(format!("{:x};ext=1\r\n", a.len()).as_bytes());
        stream.extend_from_slice(a);
        stream.extend_from_slice(format!("\r\n{:X}\r\n", b.len()).as_bytes());
        stream.extend_from_slice(b);
        stream.extend_from_slice(b"\r\n0\r\nX-Trailer: 1\r\n\r\n");
        // hyper reads `5, 5` as 5: so does the guard, and follows on.
        stream.extend_from_slice(b"POST /c HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\nabcde");
        stream.extend_from_slice(b"GET /d HTTP/1.1\r\nHost: a\r\n\r\n");
        assert!(feed_all(&[&stream]).is_ok());
        let framing = byte_by_byte(&stream).unwrap();
        assert_eq!(framing.phase, Phase::Head);
        // And the guard still refuses an ambiguous head after all that.
        let mut bad = stream.clone();
        bad.extend_from_slice(hidden);
        assert!(feed_all(&[&bad]).is_err());
    }

    #[test]
    fn the_requests_before_a_refused_head_may_be_served() {
        let first = b"POST /a HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\nhello";
        let refused =
            b"POST /x HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n";
        let mut stream = first.to_vec();
        stream.extend_from_slice(refused);
        let refusal = feed_all(&[&stream]).unwrap_err();
        assert_eq!(refusal.safe, first.len());
        // A head that began in an earlier read leaves nothing of this one to serve.
        let (a, b) = stream.split_at(first.len() + 10);
        let mut framing = Framing::default();
        assert_eq!(framing.feed(a).unwrap(), a.len());
        assert_eq!(framing.feed(b).unwrap_err().safe, 0);
        assert!(framing.is_lost());
    }

    #[test]
    fn a_head_split_anywhere_between_reads_is_followed() {
        let ambiguous = b"GET /a HTTP/1.1\r\nHost: a\r\n\r\nPOST /x HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n";
        let fine =
            b"POST /t HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcGET / HTTP/1.1\r\nHost: a\r\n\r\n";
        for at in 0..=ambiguous.len() {
            let (a, b) = ambiguous.split_at(at);
            assert!(feed_all(&[a, b]).is_err(), "split at {at}");
        }
        for at in 0..=fine.len() {
            let (a, b) = fine.split_at(at);
            assert_eq!(
                feed_all(&[a, b]).unwrap().phase,
                Phase::Head,
                "split at {at}"
            );
        }
    }

    #[test]
    fn an_overlong_line_fails_the_connection_whole_or_in_pieces() {
        let mut head = b"GET / HTTP/1.1\r\nX-Long: ".to_vec();
        head.resize(head.len() + MIN_LINE, b'a');
        head.extend_from_slice(b"\r\n");
        assert!(feed_all(&[&head]).is_err());
        let pieces: Vec<&[u8]> = head.chunks(1000).collect();
        assert!(feed_all(&pieces).is_err());
        // A larger configured head limit takes the line.
        let mut framing = Framing::new(2 * MIN_LINE);
        assert!(framing.feed(&head).is_ok());
    }

    #[test]
    fn framing_it_cannot_follow_lets_nothing_more_through() {
        for stream in [
            &b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"[..],
            b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\naXY\r\n",
            b"POST /a HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"POST /a HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
        ] {
            let framing = feed_all(&[stream]).unwrap();
            assert!(framing.is_lost(), "{:?}", String::from_utf8_lossy(stream));
            // Not even the rest of the read that lost it passes.
            let mut more = stream.to_vec();
            more.extend_from_slice(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
            assert_eq!(Framing::default().feed(&more).unwrap(), stream.len());
        }
    }

    #[test]
    fn a_bare_lf_in_a_chunked_body_is_refused() {
        // hyper takes a bare LF there for an ordinary byte; a guard that took it for a
        // line end would read `B: 2 ...` as the head of a next request.
        let head = b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        for body in [
            &b"0\r\nA: 1\r\n\nB: 2\r\nContent-Length: 40\r\n\r\n"[..],
            b"0\r\n\n",
            b"5\nhello\r\n0\r\n\r\n",
            b"5\r\nhello\n0\r\n\r\n",
        ] {
            let mut stream = head.to_vec();
            stream.extend_from_slice(body);
            assert!(
                feed_all(&[&stream]).is_err(),
                "{:?}",
                String::from_utf8_lossy(body)
            );
            assert!(
                byte_by_byte(&stream).is_err(),
                "{:?}",
                String::from_utf8_lossy(body)
            );
        }
        // CRLF split between reads is still CRLF.
        let mut stream = head.to_vec();
        stream.extend_from_slice(b"5\r\nhello\r\n0\r\nA: 1\r\n\r\n");
        assert_eq!(byte_by_byte(&stream).unwrap().phase, Phase::Head);
    }

    #[test]
    fn a_request_that_asks_to_switch_holds_what_follows() {
        let upgrade = b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n";
        let after = b"POST /x HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let mut stream = upgrade.to_vec();
        stream.extend_from_slice(after);
        let mut framing = Framing::default();
        assert_eq!(framing.feed(&stream).unwrap(), upgrade.len());
        assert!(framing.awaits_switch());
        // Not switched: the held bytes are a request like any other, and refused.
        framing.resume();
        assert!(framing.feed(after).is_err());
        // The same after CONNECT, whose answer here is never a tunnel.
        let mut framing = Framing::default();
        let connect = b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n";
        let mut stream = connect.to_vec();
        stream.extend_from_slice(after);
        assert_eq!(framing.feed(&stream).unwrap(), connect.len());
        framing.resume();
        assert!(framing.feed(after).is_err());
    }

    #[test]
    fn the_http2_preface_counts_only_at_the_start() {
        let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
        let framing = feed_all(&[preface]).unwrap();
        assert_eq!(framing.phase, Phase::Switched);
        let mut stream = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n".to_vec();
        stream.extend_from_slice(preface);
        stream.extend_from_slice(
            b"POST /x HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        );
        assert!(feed_all(&[&stream]).is_err());
    }

    #[test]
    fn ordinary_requests_pass() {
        let stream = b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\nPOST /t HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcGET / HTTP/1.1\r\n\r\n";
        assert_eq!(feed_all(&[stream]).unwrap().phase, Phase::Head);
        assert_eq!(byte_by_byte(stream).unwrap().phase, Phase::Head);
    }
}
