//! A guard under hyper on HTTP/1.1 connections that refuses a request head carrying both
//! `Content-Length` and `Transfer-Encoding` (RFC 9112 §6.3: the classic smuggling
//! probe).
//!
//! hyper accepts such a request, lets Transfer-Encoding win and drops Content-Length
//! before the gateway sees the headers, so the refusal has to happen on the bytes. The
//! guard follows the message framing of the plaintext stream (head, then a fixed or
//! chunked body, then the next head) and fails the read that completes an ambiguous
//! head, so hyper never parses it and nothing reaches an upstream. It stops looking once
//! a request asks to switch protocols (the stream may become a tunnel).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Longest header line the guard buffers; hyper's own head limit refuses longer heads.
const MAX_LINE: usize = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Head,
    Body(u64),
    ChunkSize,
    ChunkData(u64),
    ChunkDataEnd,
    Trailers,
    /// An upgrade was asked for, or framing could not be followed: look no further.
    Done,
}

/// Tracks HTTP/1.1 request framing over a byte stream.
#[derive(Debug)]
pub struct Framing {
    phase: Phase,
    line: Vec<u8>,
    content_length: Option<u64>,
    chunked: bool,
    transfer_encoding: bool,
    upgrade: bool,
    request_line: bool,
}

impl Default for Framing {
    fn default() -> Self {
        Framing {
            phase: Phase::Head,
            line: Vec::new(),
            content_length: None,
            chunked: false,
            transfer_encoding: false,
            upgrade: false,
            request_line: true,
        }
    }
}

fn ambiguous() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        "request with both Content-Length and Transfer-Encoding refused",
    )
}

impl Framing {
    /// Follows `bytes`; an error means the connection must be dropped.
    pub fn feed(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            match self.phase {
                Phase::Done => return Ok(()),
                Phase::Body(n) | Phase::ChunkData(n) => {
                    let take = n.min(bytes.len() as u64);
                    bytes = &bytes[take as usize..];
                    let left = n - take;
                    self.phase = match (self.phase, left) {
                        (Phase::Body(_), 0) => Phase::Head,
                        (Phase::Body(_), left) => Phase::Body(left),
                        (_, 0) => Phase::ChunkDataEnd,
                        (_, left) => Phase::ChunkData(left),
                    };
                }
                Phase::Head | Phase::ChunkSize | Phase::ChunkDataEnd | Phase::Trailers => {
                    let Some(end) = memchr::memchr(b'\n', bytes) else {
                        // A line continued by the next read: kept until it ends.
                        self.line.extend_from_slice(bytes);
                        if self.line.len() > MAX_LINE {
                            self.phase = Phase::Done;
                        }
                        return Ok(());
                    };
                    let (line, rest) = bytes.split_at(end + 1);
                    bytes = rest;
                    if self.line.len() + line.len() > MAX_LINE {
                        self.phase = Phase::Done;
                        return Ok(());
                    }
                    if self.line.is_empty() {
                        // Nearly always: the whole line came in this read, and is read
                        // where it lies.
                        self.line_done(trim_eol(line))?;
                    } else {
                        let mut joined = std::mem::take(&mut self.line);
                        joined.extend_from_slice(line);
                        self.line_done(trim_eol(&joined))?;
                        joined.clear();
                        self.line = joined;
                    }
                }
            }
        }
        Ok(())
    }

    fn line_done(&mut self, line: &[u8]) -> io::Result<()> {
        match self.phase {
            Phase::Head => self.head_line(line),
            Phase::ChunkSize => {
                let size = line.split(|&b| b == b';').next().unwrap_or_default();
                let size = std::str::from_utf8(size)
                    .ok()
                    .and_then(|s| u64::from_str_radix(s.trim(), 16).ok());
                self.phase = match size {
                    Some(0) => Phase::Trailers,
                    Some(n) => Phase::ChunkData(n),
                    // hyper will refuse this; the guard has nothing left to follow.
                    None => Phase::Done,
                };
                Ok(())
            }
            Phase::ChunkDataEnd => {
                self.phase = if line.is_empty() {
                    Phase::ChunkSize
                } else {
                    Phase::Done
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
                if line.starts_with(b"CONNECT ") || line.starts_with(b"PRI * HTTP/2") {
                    self.phase = Phase::Done;
                }
            }
            return Ok(());
        }
        if line.is_empty() {
            if self.transfer_encoding && self.content_length.is_some() {
                return Err(ambiguous());
            }
            self.phase = if self.upgrade {
                Phase::Done
            } else if self.chunked {
                Phase::ChunkSize
            } else {
                match self.content_length {
                    Some(n) if n > 0 => Phase::Body(n),
                    _ => Phase::Head,
                }
            };
            if self.phase == Phase::Head {
                self.next_head();
            } else {
                self.reset_head();
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
            let length = std::str::from_utf8(value)
                .ok()
                .and_then(|v| v.parse::<u64>().ok());
            match length {
                Some(n) => self.content_length = Some(n),
                // Malformed or listed lengths: hyper refuses those itself.
                None => self.phase_after_head_is_unknown(),
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            self.transfer_encoding = true;
            self.chunked = value
                .rsplit(|&b| b == b',')
                .next()
                .is_some_and(|last| trim(last).eq_ignore_ascii_case(b"chunked"));
        } else if name.eq_ignore_ascii_case(b"upgrade") {
            self.upgrade = true;
        }
        Ok(())
    }

    fn phase_after_head_is_unknown(&mut self) {
        self.content_length = Some(u64::MAX);
    }

    fn reset_head(&mut self) {
        self.content_length = None;
        self.chunked = false;
        self.transfer_encoding = false;
        self.upgrade = false;
        self.request_line = true;
    }

    fn next_head(&mut self) {
        self.reset_head();
        self.phase = Phase::Head;
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

/// A stream whose reads pass through a [`Framing`] guard.
pub struct Guarded<T> {
    inner: T,
    framing: Option<Framing>,
}

impl<T> Guarded<T> {
    /// Guards `inner` when `guard` (HTTP/1.1), else passes it through.
    pub fn new(inner: T, guard: bool) -> Self {
        Guarded {
            inner,
            framing: guard.then(Framing::default),
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Guarded<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        std::task::ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        if let Some(framing) = &mut this.framing {
            if let Err(error) = framing.feed(&buf.filled()[before..]) {
                // Take the bytes back: hyper must never parse the ambiguous head.
                buf.set_filled(before);
                return Poll::Ready(Err(error));
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Guarded<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed_all(chunks: &[&[u8]]) -> io::Result<Framing> {
        let mut framing = Framing::default();
        for chunk in chunks {
            framing.feed(chunk)?;
        }
        Ok(framing)
    }

    fn byte_by_byte(stream: &[u8]) -> io::Result<Framing> {
        let chunks: Vec<&[u8]> = stream.chunks(1).collect();
        feed_all(&chunks)
    }

    #[test]
    fn both_framings_are_refused_in_either_order() {
        for head in [
            &b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
            b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\nHost: a\r\ncontent-length: 5\r\n\r\n",
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
        stream.extend_from_slice(b"GET /c HTTP/1.1\r\nHost: a\r\n\r\n");
        assert!(feed_all(&[&stream]).is_ok());
        let framing = byte_by_byte(&stream).unwrap();
        assert_eq!(framing.phase, Phase::Head);
        // And the guard still refuses an ambiguous head after all that.
        let mut bad = stream.clone();
        bad.extend_from_slice(hidden);
        assert!(feed_all(&[&bad]).is_err());
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
    fn an_overlong_line_ends_the_guard_whole_or_in_pieces() {
        let mut head = b"GET / HTTP/1.1\r\nX-Long: ".to_vec();
        head.resize(head.len() + MAX_LINE, b'a');
        head.extend_from_slice(b"\r\n");
        assert_eq!(feed_all(&[&head]).unwrap().phase, Phase::Done);
        let pieces: Vec<&[u8]> = head.chunks(1000).collect();
        assert_eq!(feed_all(&pieces).unwrap().phase, Phase::Done);
    }

    #[test]
    fn upgrades_end_the_guard() {
        let stream = b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n\x81\x05hello Content-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(feed_all(&[stream]).is_ok());
    }

    #[test]
    fn ordinary_requests_pass() {
        let stream = b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\nPOST /t HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcGET / HTTP/1.1\r\n\r\n";
        assert_eq!(feed_all(&[stream]).unwrap().phase, Phase::Head);
        assert_eq!(byte_by_byte(stream).unwrap().phase, Phase::Head);
    }
}
