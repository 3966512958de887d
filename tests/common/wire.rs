//! HTTP/1.1 on the upstream's side of the gateway, byte for byte, for the tests of the
//! gateway's own upstream codec (tests/upstream_wire.rs, tests/upstream_edges.rs,
//! tests/upstream_uploads.rs, tests/upstream_pool.rs): reading request heads and
//! bodies as an upstream gets them, a raw upstream that answers with exactly the bytes
//! a test gives, a gateway in front of such an upstream, listeners with tuned sockets,
//! and a client with small socket buffers.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use super::raw::{client_tls, server_name};
use super::{accept_loop, config_text, Task, TestGateway, Upstream};

/// A short answer that keeps its connection: `200 OK`, body `ok`.
pub const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";

/// Where `needle` first stands in `haystack`.
pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Every value of header `name` in `head` (a request or response head, its first line
/// skipped), in order, trimmed; the name is matched without regard to case.
pub fn head_values<'a>(head: &'a str, name: &str) -> Vec<&'a str> {
    head.split("\r\n")
        .skip(1)
        .filter_map(|line| line.split_once(':'))
        .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim())
        .collect()
}

/// The first `Content-Length` of `head`, 0 when there is none; panics when it is not a
/// number.
pub fn content_length(head: &str) -> usize {
    head_values(head, "content-length")
        .first()
        .map_or(0, |v| v.parse().expect("a numeric Content-Length"))
}

/// Reads into `buf` until `complete` finds a whole unit at its start, then takes that
/// unit out; `None` when the connection ends first.
async fn take_when<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
    complete: impl Fn(&[u8]) -> Option<usize>,
) -> Option<Vec<u8>> {
    let mut chunk = [0u8; 16 * 1024];
    loop {
        if let Some(n) = complete(buf) {
            return Some(buf.drain(..n).collect());
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Reads one request head (through its empty line) into a string; what follows stays
/// in `buf`.
pub async fn read_head<S: AsyncRead + Unpin>(stream: &mut S, buf: &mut Vec<u8>) -> Option<String> {
    let head = take_when(stream, buf, |b| find(b, b"\r\n\r\n").map(|i| i + 4)).await?;
    Some(String::from_utf8(head).expect("the request head is text"))
}

/// Decodes a complete chunked body (RFC 9112 §7.1) at the start of `wire`: the data and
/// how many bytes its encoding took, trailer section included; `None` while incomplete.
/// Panics on anything that is not valid chunked coding: the gateway must never send it.
pub fn decode_chunked(wire: &[u8]) -> Option<(Vec<u8>, usize)> {
    let mut data = Vec::new();
    let mut at = 0;
    loop {
        let line_end = at + find(&wire[at..], b"\r\n")?;
        let line = std::str::from_utf8(&wire[at..line_end]).expect("chunk-size line is text");
        // Extensions (and the whitespace RFC 9112 allows before them) are not the size.
        let size_text = line.split(';').next().unwrap_or_default();
        let size_text = size_text.trim_end_matches([' ', '\t']);
        let size = usize::from_str_radix(size_text, 16)
            .unwrap_or_else(|_| panic!("bad chunk-size line {line:?}"));
        at = line_end + 2;
        if size == 0 {
            // The trailer section: field lines up to an empty one.
            loop {
                let end = at + find(&wire[at..], b"\r\n")?;
                let empty = end == at;
                at = end + 2;
                if empty {
                    return Some((data, at));
                }
            }
        }
        if wire.len() < at + size + 2 {
            return None;
        }
        data.extend_from_slice(&wire[at..at + size]);
        assert_eq!(
            &wire[at + size..at + size + 2],
            b"\r\n",
            "chunk data ends in CRLF"
        );
        at += size + 2;
    }
}

/// One request as the raw upstream read it.
#[derive(Clone, Debug)]
pub struct Seen {
    /// Which connection it came on: 1 for the first the upstream accepted, and so on.
    pub conn: usize,
    /// The head, byte for byte, up to and including its empty line.
    pub head: String,
    /// The body as framed on the wire (chunked coding left in place).
    pub body: Vec<u8>,
}

impl Seen {
    pub fn request_line(&self) -> &str {
        self.head.split("\r\n").next().unwrap_or_default()
    }

    pub fn method(&self) -> &str {
        self.request_line().split(' ').next().unwrap_or_default()
    }

    pub fn path(&self) -> &str {
        self.request_line().split(' ').nth(1).unwrap_or_default()
    }

    /// Every value of header `name`, in order.
    pub fn headers(&self, name: &str) -> Vec<&str> {
        head_values(&self.head, name)
    }
}

/// What the raw upstream writes back to one request.
pub struct Reply {
    /// Written one after another, with `pause` between them.
    pieces: Vec<Vec<u8>>,
    pause: Duration,
    /// Shut the connection down once written; otherwise read the next request.
    close: bool,
}

impl Reply {
    /// `bytes` in one write; the connection stays open.
    pub fn new(bytes: impl AsRef<[u8]>) -> Reply {
        Reply {
            pieces: vec![bytes.as_ref().to_vec()],
            pause: Duration::ZERO,
            close: false,
        }
    }

    /// Each piece its own write, a few milliseconds apart, so each reaches the gateway
    /// in a read of its own.
    pub fn pieces(pieces: &[&[u8]]) -> Reply {
        Reply {
            pieces: pieces.iter().map(|p| p.to_vec()).collect(),
            pause: Duration::from_millis(5),
            close: false,
        }
    }

    /// The same bytes in writes of 1 to 3 bytes, a millisecond apart: every boundary
    /// (status line, header lines, chunk-size lines, chunk data) falls between reads.
    pub fn trickled(self) -> Reply {
        let all = self.pieces.concat();
        let mut pieces = Vec::new();
        let mut at = 0;
        for size in [1, 2, 3].into_iter().cycle() {
            if at >= all.len() {
                break;
            }
            let end = (at + size).min(all.len());
            pieces.push(all[at..end].to_vec());
            at = end;
        }
        Reply {
            pieces,
            pause: Duration::from_millis(1),
            ..self
        }
    }

    pub fn then_close(self) -> Reply {
        Reply {
            close: true,
            ..self
        }
    }
}

type Answer = Arc<dyn Fn(&Seen) -> Reply + Send + Sync>;

/// A raw HTTP/1.1 upstream: reads each request (head, then the body its framing
/// says), notes it, and writes what `answer` says. Counts connections opened.
pub struct Raw {
    pub addr: SocketAddr,
    opened: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<Seen>>>,
    _task: Task,
}

impl Raw {
    pub async fn start(answer: impl Fn(&Seen) -> Reply + Send + Sync + 'static) -> Raw {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let answer: Answer = Arc::new(answer);
        let opened = Arc::new(AtomicUsize::new(0));
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let (count, log) = (opened.clone(), seen.clone());
        let task = accept_loop(listener, move |stream| {
            let conn = count.fetch_add(1, Ordering::SeqCst) + 1;
            serve_raw(stream, conn, answer.clone(), log.clone())
        });
        Raw {
            addr,
            opened,
            seen,
            _task: task,
        }
    }

    /// How many connections the upstream has accepted.
    pub fn opened(&self) -> usize {
        self.opened.load(Ordering::SeqCst)
    }

    /// Every request read so far, in order.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// The last request read with `path`.
    pub fn last(&self, path: &str) -> Seen {
        self.seen()
            .into_iter()
            .rev()
            .find(|s| s.path() == path)
            .unwrap_or_else(|| panic!("no request for {path} reached the upstream"))
    }
}

async fn serve_raw(mut stream: TcpStream, conn: usize, answer: Answer, log: Arc<Mutex<Vec<Seen>>>) {
    // Each write leaves at once: the splits the tests ask for reach the gateway.
    let _ = stream.set_nodelay(true);
    let mut buf = Vec::new();
    while let Some(head) = read_head(&mut stream, &mut buf).await {
        let chunked = head_values(&head, "transfer-encoding")
            .iter()
            .any(|v| v.eq_ignore_ascii_case("chunked"));
        // Neither framing header: no body (a length of 0).
        let length = content_length(&head);
        let body = if chunked {
            take_when(&mut stream, &mut buf, |b| decode_chunked(b).map(|(_, n)| n)).await
        } else {
            take_when(&mut stream, &mut buf, |b| {
                (b.len() >= length).then_some(length)
            })
            .await
        };
        let Some(body) = body else {
            return;
        };
        let seen = Seen { conn, head, body };
        let reply = answer(&seen);
        log.lock().unwrap().push(seen);
        for (i, piece) in reply.pieces.iter().enumerate() {
            if i > 0 && !reply.pause.is_zero() {
                tokio::time::sleep(reply.pause).await;
            }
            if stream.write_all(piece).await.is_err() {
                return;
            }
        }
        if reply.close {
            let _ = stream.shutdown().await;
            return;
        }
    }
}

/// A gateway whose `/api/v1/**` goes to `up`, with `before` and `routes` added to the
/// standard configuration (see `config_text`), and a token for alex.
pub async fn gateway_for(up: SocketAddr, before: &str, routes: &str) -> (TestGateway, String) {
    let text = config_text(up, before, routes);
    let gw = TestGateway::start_text(Upstream::start().await, &text).await;
    let token = gw.alex_token().await;
    (gw, token)
}

/// `future`, or a failed test after `secs` seconds: a gateway waiting for bytes that
/// never come fails here rather than at the client's 30 s timeout.
pub async fn within<T>(secs: u64, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), future)
        .await
        .unwrap_or_else(|_| panic!("not done within {secs} s"))
}

/// A listener on 127.0.0.1 whose socket `tune` sets up before it listens: what is set
/// then (buffer sizes, the MSS) holds for every connection it accepts.
pub fn tuned_listener(tune: impl FnOnce(&socket2::Socket) -> std::io::Result<()>) -> TcpListener {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    tune(&socket).unwrap();
    socket
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    socket.listen(16).unwrap();
    socket.set_nonblocking(true).unwrap();
    TcpListener::from_std(socket.into()).unwrap()
}

/// A TLS connection to the gateway with small socket buffers (so that megabytes, not
/// tens of them, fill the path).
pub async fn small_buffer_client(gw: &TestGateway) -> tokio_rustls::client::TlsStream<TcpStream> {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(64 * 1024).unwrap();
    socket.set_send_buffer_size(64 * 1024).unwrap();
    let tcp = socket.connect(gw.addr).await.unwrap();
    tokio_rustls::TlsConnector::from(client_tls(&[&gw.ca_pem], &[b"http/1.1"]))
        .connect(server_name(), tcp)
        .await
        .unwrap()
}

/// The head of a raw `POST path` of `size` bytes through `gw` with `token`, and
/// `Connection: close` when `close`.
pub fn upload_head(gw: &TestGateway, token: &str, path: &str, size: usize, close: bool) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nAuthorization: Bearer {token}\r\n\
         Content-Length: {size}\r\n{}\r\n",
        gw.addr.port(),
        if close { "Connection: close\r\n" } else { "" }
    )
}
