//! The accept loop, connections, and graceful shutdown; also the two small plain-HTTP
//! listeners (admin, HTTP→HTTPS redirect) and the certificate-file watch.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::time::{Instant, Sleep};
use tokio_rustls::TlsAcceptor;

use crate::body::{self, Body};
use crate::framing::{Framing, Switch};
use crate::gateway::{self, Shared};

/// A pause after an accept error such as EMFILE, so a full file table does not become a
/// busy loop; the loop itself never ends on an accept error.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// Accepts one connection; an error (EMFILE, a reset before accept) is logged and
/// answered with a short pause and `None`, never the end of the loop.
async fn accept(listener: &TcpListener) -> Option<(tokio::net::TcpStream, std::net::SocketAddr)> {
    match listener.accept().await {
        Ok(accepted) => Some(accepted),
        Err(error) => {
            tracing::warn!(%error, "accept failed");
            tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
            None
        }
    }
}

/// The sockets a gateway serves.
pub struct Listeners {
    /// HTTPS.
    pub tls: TcpListener,
    /// Plain-HTTP health and metrics.
    pub admin: Option<TcpListener>,
    /// Plain-HTTP redirect to HTTPS.
    pub redirect: Option<TcpListener>,
}

/// An I/O stream that fails once no byte has moved either way for `timeout`: the idle
/// timeout of a connection, for HTTP/2 as for HTTP/1.1 and upgraded tunnels alike.
///
/// The timer is not reset on every read and write; it fires, finds the last activity,
/// and re-arms itself for the remainder, so busy connections pay only a clock read.
struct IdleIo<T> {
    inner: T,
    timeout: Duration,
    last_activity: Instant,
    timer: Pin<Box<Sleep>>,
}

impl<T> IdleIo<T> {
    fn new(inner: T, timeout: Duration) -> Self {
        IdleIo {
            inner,
            timeout,
            last_activity: Instant::now(),
            timer: Box::pin(tokio::time::sleep(timeout)),
        }
    }

    /// Called when the inner stream is not ready: is the connection idle too long?
    ///
    /// The timer is polled on every stall, not skipped while it seems armed: a poll
    /// refused for want of task budget registers nothing, and an upgraded connection
    /// moves to another task, so only polling again keeps the timer waking this one.
    fn poll_idle(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        while self.timer.as_mut().poll(cx).is_ready() {
            let deadline = self.last_activity + self.timeout;
            if Instant::now() >= deadline {
                return Poll::Ready(io::Error::new(io::ErrorKind::TimedOut, "connection idle"));
            }
            self.timer.as_mut().reset(deadline);
        }
        Poll::Pending
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for IdleIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Pending => this.poll_idle(cx).map(Err),
            ready => {
                this.last_activity = Instant::now();
                ready
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for IdleIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_write(cx, buf) {
            Poll::Pending => this.poll_idle(cx).map(Err),
            ready => {
                this.last_activity = Instant::now();
                ready
            }
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_write_vectored(cx, bufs) {
            Poll::Pending => this.poll_idle(cx).map(Err),
            ready => {
                this.last_activity = Instant::now();
                ready
            }
        }
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

fn connection_builder(server: &crate::config::ServerConfig) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(server.header_read_timeout)
        // hyper's smallest allowed read buffer is 8 KiB; the head must fit in it.
        .max_buf_size(server.max_header_size.max(8192))
        .keep_alive(true);
    // No HTTP/2 keep-alive pings: their traffic would keep an idle connection alive for
    // ever. The byte-level idle timeout (IdleIo) closes idle and dead connections alike.
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(server.h2_max_concurrent_streams)
        .max_header_list_size(u32::try_from(server.max_header_size).unwrap_or(u32::MAX));
    builder
}

/// Runs the listeners until `shutdown`, then drains the HTTPS connections.
pub async fn serve(
    shared: Arc<Shared>,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let Listeners {
        tls: listener,
        admin,
        redirect,
    } = listeners;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut stop = stop_rx.clone();
        async move {
            let _ = stop.wait_for(|s| *s).await;
        }
    };
    let mut side_tasks = Vec::new();
    if let Some(admin) = admin {
        let shared = shared.clone();
        side_tasks.push(tokio::spawn(serve_plain(
            admin,
            move |request| crate::admin::answer(&shared, request),
            stopped(),
        )));
    }
    if let Some(redirect) = redirect {
        let https_port = listener.local_addr().map(|a| a.port()).unwrap_or(443);
        side_tasks.push(tokio::spawn(serve_plain(
            redirect,
            move |request| redirect_to_https(request, https_port),
            stopped(),
        )));
    }
    let background = [
        tokio::spawn(sweep(shared.clone())),
        tokio::spawn(watch_idle_upstream_connections(shared.clone())),
        tokio::spawn(watch_certificate(shared.clone())),
        tokio::spawn(snapshots(shared.clone())),
    ];

    let limit = Arc::new(Semaphore::new(shared.live().config.server.max_connections));
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        // Take a slot before accepting: beyond the limit, new connections wait in the
        // listen backlog while established ones carry on unaffected.
        let permit = tokio::select! {
            permit = limit.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = accept(&listener) => match accepted {
                Some(accepted) => accepted,
                None => continue,
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let live = shared.live();
        let acceptor = TlsAcceptor::from(live.tls.clone());
        let server = &live.config.server;
        let (handshake_timeout, idle_timeout) = (server.tls_handshake_timeout, server.idle_timeout);
        let header_read_timeout = server.header_read_timeout;
        let max_header_size = server.max_header_size;
        let builder = connection_builder(server);
        drop(live);
        let watcher = graceful.watcher();
        let shared = shared.clone();
        shared.metrics.connection_opened();
        tokio::spawn(async move {
            let _permit = permit;
            let stream = IdleIo::new(stream, idle_timeout);
            let tls = match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(error)) => {
                    tracing::debug!(%peer, %error, "TLS handshake failed");
                    shared.metrics.connection_closed();
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    shared.metrics.connection_closed();
                    return;
                }
            };
            let service_shared = shared.clone();
            // hyper's header timeout starts inside its HTTP/1 parser; the protocol sniff
            // before it and HTTP/2's preface and first HEADERS have none. A connection
            // must therefore deliver its first request head within header_read_timeout.
            let first_request = Arc::new(AtomicBool::new(false));
            let seen = first_request.clone();
            let connection_peer = crate::proxy::Peer::new(peer);
            // HTTP/1.1 request framing is checked on the bytes (see framing.rs); HTTP/2
            // frames carry their own lengths and forbid Transfer-Encoding.
            let http1 = tls.get_ref().1.alpn_protocol() != Some(b"h2".as_slice());
            let switch = Arc::new(Switch::default());
            let service_switch = http1.then(|| switch.clone());
            let service = service_fn(move |request| {
                seen.store(true, Ordering::Relaxed);
                let shared = service_shared.clone();
                let peer = connection_peer.clone();
                // The guard holds the bytes after a request that asks to switch
                // protocols until it knows whether this answer switched.
                let switch = service_switch
                    .clone()
                    .filter(|_| crate::framing::asks_to_switch(&request));
                // Boxed: hyper's HTTP/2 server moves each stream's future into a task of
                // its own, copying it whole; a box is one allocation instead of copying
                // the request and its state (callgrind: ~1,500 instructions fewer per
                // HTTP/2 request, HTTP/1.1 unchanged).
                Box::pin(async move {
                    let connect = request.method() == http::Method::CONNECT;
                    let response = gateway::handle(shared, request, peer).await;
                    if let Some(switch) = switch {
                        let status = response.status();
                        switch.decide(
                            status == StatusCode::SWITCHING_PROTOCOLS
                                || (connect && status.is_success()),
                        );
                    }
                    Ok::<_, Infallible>(response)
                })
            });
            let framing = http1.then(|| Framing::new(max_header_size));
            let io = crate::framing::Guarded::new(tls, framing, switch);
            let connection = builder
                .serve_connection_with_upgrades(TokioIo::new(io), service)
                .into_owned();
            let connection = watcher.watch(connection);
            let deadline = tokio::time::sleep(header_read_timeout);
            tokio::pin!(connection, deadline);
            // The deadline is looked at only until the first request: polled on every
            // wake of a busy connection, it would cost every request a timer poll.
            let ended = std::future::poll_fn(|cx| {
                if let Poll::Ready(result) = connection.as_mut().poll(cx) {
                    return Poll::Ready(Some(result));
                }
                if !first_request.load(Ordering::Relaxed) && deadline.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(None);
                }
                Poll::Pending
            })
            .await;
            let result = match ended {
                Some(result) => Some(result),
                // The first request arrived as the timer fired: serve on.
                None if first_request.load(Ordering::Relaxed) => Some(connection.await),
                None => {
                    tracing::debug!(%peer, "no request head within header_read_timeout; closing");
                    None
                }
            };
            if let Some(Err(error)) = result {
                tracing::debug!(%peer, %error, "connection ended with an error");
            }
            shared.metrics.connection_closed();
        });
    }

    // Closing the listener makes new connection attempts fail at once.
    drop(listener);
    gateway::set_draining(&shared);
    let grace = shared.live().config.server.shutdown_grace;
    tracing::info!(
        connections = graceful.count(),
        ?grace,
        "shutting down: draining connections"
    );
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            ?grace,
            "shutdown grace period passed; closing the remaining connections"
        );
    }
    for task in background {
        task.abort();
    }
    // After the drain: every token issued by a finished request is in the snapshot.
    gateway::save_snapshot(&shared).await;
    let _ = stop_tx.send(true);
    for task in side_tasks {
        let _ = task.await;
    }
}

/// A plain-HTTP/1.1 listener answering every request with `answer`.
async fn serve_plain<F>(listener: TcpListener, answer: F, shutdown: impl Future<Output = ()>)
where
    F: Fn(&Request<hyper::body::Incoming>) -> Response<Body> + Clone + Send + Sync + 'static,
{
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            accepted = accept(&listener) => match accepted {
                Some(accepted) => accepted,
                None => continue,
            },
            () = &mut shutdown => return,
        };
        let answer = answer.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let response = answer(&request);
                async move { Ok::<_, Infallible>(response) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(
                    TokioIo::new(IdleIo::new(stream, Duration::from_secs(60))),
                    service,
                )
                .await;
        });
    }
}

/// 308 to the same host and path over HTTPS (the method and body are kept by 308).
fn redirect_to_https<B>(request: &Request<B>, https_port: u16) -> Response<Body> {
    let host = request
        .headers()
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(|h| match h.rsplit_once(':') {
            // Keep IPv6 literals whole: "[::1]:80" has a port, "[::1]" has none.
            Some((name, port)) if !port.contains(']') => name,
            _ => h,
        })
        .filter(|h| !h.is_empty());
    let Some(host) = host else {
        let mut response = Response::new(body::full(Bytes::from_static(
            b"a Host header is required\n",
        )));
        *response.status_mut() = StatusCode::BAD_REQUEST;
        return response;
    };
    let port = if https_port == 443 {
        String::new()
    } else {
        format!(":{https_port}")
    };
    let path = request.uri().path_and_query().map_or("/", |p| p.as_str());
    let mut response = Response::new(body::empty());
    *response.status_mut() = StatusCode::PERMANENT_REDIRECT;
    match HeaderValue::from_str(&format!("https://{host}{port}{path}")) {
        Ok(location) => {
            response
                .headers_mut()
                .insert(http::header::LOCATION, location);
        }
        Err(_) => *response.status_mut() = StatusCode::BAD_REQUEST,
    }
    response
}

/// Sweeps expired tokens and stale lockout counters on the blocking pool, so a sweep of
/// a large table never occupies an async worker.
async fn sweep(shared: Arc<Shared>) {
    loop {
        let interval = shared.live().config.tokens.sweep_interval;
        tokio::time::sleep(interval).await;
        let shared = shared.clone();
        let swept = tokio::task::spawn_blocking(move || {
            let window = shared.live().config.security.lockout_window;
            shared.lockout.sweep(window);
            shared.codes.sweep();
            shared.pending.sweep();
            shared.tokens.sweep()
        })
        .await;
        if let Ok(swept) = swept {
            tracing::debug!(swept, "expired tokens swept");
        }
    }
}

/// Watches the idle upstream connections of every pool: closes one as soon as anything
/// arrives on it (see [`crate::pool::Pool::poll_watch`]), and those idle past
/// `[upstream] pool_idle_timeout`, checking four times per timeout so none outlives it
/// by more than a quarter. Connections pooled since the last look are taken into the
/// watch at least every [`WATCH_PERIOD`].
async fn watch_idle_upstream_connections(shared: Arc<Shared>) {
    let mut next_eviction = Instant::now();
    loop {
        let live = shared.live();
        let timeout = live.config.upstream.pool_idle_timeout;
        let tick = tokio::time::sleep(WATCH_PERIOD);
        tokio::pin!(tick);
        std::future::poll_fn(|cx| {
            for pool in live.routes.pools() {
                pool.poll_watch(cx);
            }
            tick.as_mut().poll(cx)
        })
        .await;
        if Instant::now() >= next_eviction {
            for pool in live.routes.pools() {
                pool.evict_idle();
            }
            next_eviction = Instant::now() + (timeout / 4).max(Duration::from_millis(250));
        }
    }
}

/// How often connections pooled since the last look join the idle watch. One that is
/// taken again sooner is checked on its socket when taken.
const WATCH_PERIOD: Duration = Duration::from_millis(100);

/// Writes the token snapshot every `snapshot_interval`, so a crash loses little.
async fn snapshots(shared: Arc<Shared>) {
    loop {
        tokio::time::sleep(shared.live().config.tokens.snapshot_interval).await;
        gateway::save_snapshot(&shared).await;
    }
}

fn modified(path: &std::path::Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// Loads a replaced certificate/key pair for new connections, without a signal. A pair
/// that does not load (say, the key is not written yet) is retried when a file changes
/// again; the old certificate stays in use meanwhile.
async fn watch_certificate(shared: Arc<Shared>) {
    let stamp = |shared: &Shared| {
        let live = shared.live();
        let server = &live.config.server;
        (
            modified(&live.config.resolve(server.tls_cert.get_ref())),
            modified(&live.config.resolve(server.tls_key.get_ref())),
        )
    };
    let mut seen = stamp(&shared);
    loop {
        tokio::time::sleep(shared.live().config.server.cert_poll_interval).await;
        let now = stamp(&shared);
        if now == seen {
            continue;
        }
        seen = now;
        match gateway::reload_certificate(&shared) {
            Ok(()) => tracing::info!("certificate file changed: loaded for new connections"),
            Err(error) => {
                tracing::error!(%error, "certificate file changed but does not load; keeping the previous one")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// As an upgraded connection does: one task reads a little, another takes over,
    /// drains a burst (its first stall comes with the task budget spent), and then the
    /// peer falls silent. The idle timer must wake the second task.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn idle_io_times_out_in_the_task_it_moved_to_after_a_burst() {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(8 << 20).unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(1).unwrap();
        let mut client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let mut idle = IdleIo::new(server, Duration::from_millis(500));
        // The first task: one stalled read, which arms the timer with its waker.
        let mut idle = tokio::spawn(async move {
            std::future::poll_fn(|cx| {
                let mut byte = [0u8; 1];
                let stalled = Pin::new(&mut idle)
                    .poll_read(cx, &mut ReadBuf::new(&mut byte))
                    .is_pending();
                assert!(stalled);
                Poll::Ready(())
            })
            .await;
            idle
        })
        .await
        .unwrap();
        let writer = tokio::spawn(async move {
            client.write_all(&vec![7u8; 8 << 20]).await.unwrap();
            // Open and silent from here on.
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(client);
        });
        // The burst is waiting in the socket before the second task starts to read.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let started = std::time::Instant::now();
        let copied = tokio::spawn(async move {
            let mut sink = tokio::io::sink();
            tokio::time::timeout(
                Duration::from_secs(5),
                tokio::io::copy(&mut idle, &mut sink),
            )
            .await
        })
        .await
        .unwrap();
        writer.abort();
        match copied {
            Ok(Err(error)) => assert_eq!(error.kind(), io::ErrorKind::TimedOut),
            other => panic!(
                "not closed by the idle timer: {other:?} after {:?}",
                started.elapsed()
            ),
        }
        assert!(started.elapsed() < Duration::from_secs(3));
    }

    #[tokio::test]
    async fn idle_io_fails_after_silence_but_not_while_bytes_move() {
        let (a, mut b) = tokio::io::duplex(64);
        let mut idle = IdleIo::new(a, Duration::from_millis(150));
        let mut buf = [0u8; 1];
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_millis(80)).await;
            b.write_all(b"x").await.unwrap();
            idle.read_exact(&mut buf).await.unwrap();
        }
        let started = std::time::Instant::now();
        let error = idle.read_exact(&mut buf).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= Duration::from_millis(140));
    }

    #[test]
    fn redirects_keep_host_path_and_query() {
        let request = |host: &str| {
            Request::builder()
                .uri("/api/v1/x?y=1")
                .header("host", host)
                .body(())
                .unwrap()
        };
        let location = |r: Response<Body>| r.headers()["location"].to_str().unwrap().to_owned();
        assert_eq!(
            location(redirect_to_https(&request("example.com:80"), 443)),
            "https://example.com/api/v1/x?y=1"
        );
        assert_eq!(
            location(redirect_to_https(&request("example.com"), 8443)),
            "https://example.com:8443/api/v1/x?y=1"
        );
        assert_eq!(
            location(redirect_to_https(&request("[::1]:80"), 8443)),
            "https://[::1]:8443/api/v1/x?y=1"
        );
        let no_host = Request::builder().uri("/").body(()).unwrap();
        assert_eq!(redirect_to_https(&no_host, 443).status(), 400);
    }
}
