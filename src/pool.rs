//! Keep-alive HTTP/1.1 connections to one upstream address.
//!
//! One pool per upstream address (shared by every route that names it with the same
//! connect deadline) keeps idle connections last-in first-out, so the warmest one is
//! reused. A connection goes back to its pool the moment the response body it carried
//! has been read to the end; a body dropped half-read takes its connection with it,
//! since the rest of that response would still be on the wire.
//!
//! Why not hyper-util's pooled client: per request it hashes a pool key, wraps the
//! connection in a pool guard and spawns a task that waits to hand the connection
//! back. Here the pool is found through the route, and the response body hands the
//! connection back itself.

use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use tower_service::Service;

use crate::config::UpstreamUrl;
use crate::proxy::RequestBody;

/// Opens TCP (and, for `https://`, TLS) connections with the connect deadline set.
pub type Connector = HttpsConnector<HttpConnector>;

/// Any error, boxed.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a request did not get a response.
pub enum SendError {
    /// No connection could be made. Nothing was sent, and the request comes back so it
    /// can go to another address.
    Connect(BoxError, Box<Request<RequestBody>>),
    /// The request failed on an established connection; part of it may have been sent.
    Request(hyper::Error),
}

/// How long a request waits for an idle connection to become ready before it takes
/// another.
const READY_WAIT: Duration = Duration::from_millis(250);

struct Idle {
    sender: SendRequest<RequestBody>,
    since: Instant,
}

/// Idle keep-alive connections to one upstream address.
pub struct Pool {
    connector: Connector,
    /// `scheme://authority/`: what the connector dials.
    address: Uri,
    /// `Host` of every request sent here.
    host: HeaderValue,
    idle: Mutex<Vec<Idle>>,
    idle_timeout: Duration,
    max_idle: usize,
}

impl Pool {
    /// A pool for the address of `url`, keeping at most `max_idle` idle connections,
    /// each for at most `idle_timeout`.
    pub fn new(
        connector: Connector,
        url: &UpstreamUrl,
        idle_timeout: Duration,
        max_idle: usize,
    ) -> Arc<Pool> {
        Arc::new(Pool {
            connector,
            address: url.origin.clone(),
            host: url.host.clone(),
            idle: Mutex::new(Vec::new()),
            idle_timeout,
            max_idle,
        })
    }

    /// Sends `request` (origin-form URI) on an idle connection, or on a new one.
    pub async fn send(
        self: &Arc<Self>,
        mut request: Request<RequestBody>,
    ) -> Result<Response<PooledBody>, SendError> {
        request
            .headers_mut()
            .insert(header::HOST, self.host.clone());
        let uploads = !request.body().is_end_stream();
        while let Some(mut sender) = self.take_idle() {
            // Not ready yet usually means its connection task has yet to see the end of
            // the last response; a moment's wait, not more (a request body still
            // uploading can hold a connection busy for as long as the client likes).
            if !sender.is_ready()
                && !matches!(
                    tokio::time::timeout(READY_WAIT, sender.ready()).await,
                    Ok(Ok(()))
                )
            {
                continue;
            }
            match sender.try_send_request(request).await {
                Ok(response) => return Ok(self.wrap(response, sender, uploads)),
                Err(mut failed) => match failed.take_message() {
                    // The connection closed as it was picked, before a byte was sent:
                    // the request is whole, so it may try the next one.
                    Some(unsent) => request = unsent,
                    None => return Err(SendError::Request(failed.into_error())),
                },
            }
        }
        // Boxed: inline, the connect future (rarely awaited, as connections are reused)
        // would be most of the size of every request's future, copied as it moves.
        let mut sender = match Box::pin(self.connect()).await {
            Ok(sender) => sender,
            Err(error) => return Err(SendError::Connect(error, Box::new(request))),
        };
        match sender.send_request(request).await {
            Ok(response) => Ok(self.wrap(response, sender, uploads)),
            Err(error) => Err(SendError::Request(error)),
        }
    }

    /// Closes idle connections past `idle_timeout` and those the upstream closed.
    pub fn evict_idle(&self) {
        let timeout = self.idle_timeout;
        if let Ok(mut idle) = self.idle.lock() {
            idle.retain(|c| c.since.elapsed() < timeout && !c.sender.is_closed());
        }
    }

    fn take_idle(&self) -> Option<SendRequest<RequestBody>> {
        let mut idle = self.idle.lock().ok()?;
        while let Some(c) = idle.pop() {
            if c.since.elapsed() < self.idle_timeout && !c.sender.is_closed() {
                return Some(c.sender);
            }
        }
        None
    }

    fn give_back(self: Arc<Self>, mut sender: SendRequest<RequestBody>, uploads: bool) {
        if sender.is_closed() {
            return;
        }
        if uploads && !sender.is_ready() {
            // The upstream answered before it had the whole request body, and hyper is
            // still sending it: pooled now, the connection would hold up whoever takes
            // it next. It joins the pool once idle, if that comes before the idle
            // timeout. Bodiless requests, nearly all of them, never pay this task.
            let timeout = self.idle_timeout;
            tokio::spawn(async move {
                if let Ok(Ok(())) = tokio::time::timeout(timeout, sender.ready()).await {
                    self.push_idle(sender);
                }
            });
            return;
        }
        self.push_idle(sender);
    }

    fn push_idle(&self, sender: SendRequest<RequestBody>) {
        if self.max_idle == 0 {
            return;
        }
        let stale = self.idle.lock().ok().and_then(|mut idle| {
            // Full: the longest-idle connection makes room (closed once the lock is
            // released), not the one that just proved itself.
            let stale = (idle.len() >= self.max_idle).then(|| idle.remove(0));
            idle.push(Idle {
                sender,
                since: Instant::now(),
            });
            stale
        });
        drop(stale);
    }

    async fn connect(&self) -> Result<SendRequest<RequestBody>, BoxError> {
        let io = self.connector.clone().call(self.address.clone()).await?;
        let (sender, connection) = hyper::client::conn::http1::Builder::new()
            .handshake(io)
            .await?;
        tokio::spawn(async move {
            if let Err(error) = connection.with_upgrades().await {
                tracing::debug!(%error, "upstream connection ended with an error");
            }
        });
        Ok(sender)
    }

    fn wrap(
        self: &Arc<Self>,
        response: Response<Incoming>,
        sender: SendRequest<RequestBody>,
        uploads: bool,
    ) -> Response<PooledBody> {
        // After 101 the connection belongs to the tunnel, never to the pool.
        let home = (response.status() != StatusCode::SWITCHING_PROTOCOLS).then(|| Home {
            sender,
            pool: Arc::downgrade(self),
            uploads,
        });
        let (parts, inner) = response.into_parts();
        let mut body = PooledBody { inner, home };
        body.give_back_if_done();
        Response::from_parts(parts, body)
    }
}

/// An upstream response body that returns its connection to the pool once read to the
/// end.
pub struct PooledBody {
    inner: Incoming,
    home: Option<Home>,
}

/// Where a response's connection goes back to.
struct Home {
    sender: SendRequest<RequestBody>,
    pool: Weak<Pool>,
    /// The request had a body, which hyper may still be sending.
    uploads: bool,
}

impl PooledBody {
    fn give_back_if_done(&mut self) {
        if self.inner.is_end_stream() {
            self.give_back();
        }
    }

    fn give_back(&mut self) {
        if let Some(home) = self.home.take() {
            if let Some(pool) = home.pool.upgrade() {
                pool.give_back(home.sender, home.uploads);
            }
        }
    }
}

impl hyper::body::Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.give_back(),
            // Trailers end a body, and hyper's server stops polling once it has them.
            Poll::Ready(Some(Ok(frame))) if frame.is_trailers() => self.give_back(),
            Poll::Ready(Some(Ok(_))) => self.give_back_if_done(),
            // A broken body leaves a connection in an unknown state: it goes.
            Poll::Ready(Some(Err(_))) => self.home = None,
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
