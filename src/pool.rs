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

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{Request, Response};

use crate::config::UpstreamUrl;
use crate::proxy::{HeaderRewrite, RequestBody};
use crate::upstream::{Conn, Connector, Exchange, Failed, ResponseBody, WireError};

/// Why a request did not get a response.
pub enum SendError {
    /// No connection could be made. Nothing was sent, and the request comes back so it
    /// can go to another address.
    Connect(std::io::Error, Box<Request<RequestBody>>),
    /// The request failed on an established connection; part of it may have been sent.
    Request(WireError),
}

struct Idle {
    conn: Conn,
    since: Instant,
}

/// Idle keep-alive connections to one upstream address.
pub struct Pool {
    connector: Connector,
    /// What the connector dials; its `host` is the `Host` of every request sent here.
    url: UpstreamUrl,
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
            url: url.clone(),
            idle: Mutex::new(Vec::new()),
            idle_timeout,
            max_idle,
        })
    }

    /// Sends `request` (origin-form URI, the client's headers) with `rewrite` applied,
    /// on an idle connection or a new one, and waits for the response head. When the
    /// rewrite asks for an upgrade, a 101 answer is accepted and its body gives up the
    /// connection ([`ResponseBody::into_upgraded`]). A request body the upstream has
    /// not all taken when it answers goes on until `stall` passes without progress.
    pub async fn send(
        self: &Arc<Self>,
        request: Request<RequestBody>,
        rewrite: &HeaderRewrite<'_>,
        stall: Duration,
    ) -> Result<Response<ResponseBody>, SendError> {
        let (conn, reused) = match self.take_idle() {
            Some(conn) => (conn, true),
            None => match self.connect().await {
                Ok(conn) => (conn, false),
                Err(error) => return Err(SendError::Connect(error, Box::new(request))),
            },
        };
        let exchange = Exchange::new(conn, request, &self.url.host, rewrite);
        let (head, mut body) = match exchange.response(stall).await {
            Ok(answer) => answer,
            // A kept-alive connection the upstream closed just as it was picked (its
            // keep-alive timeout ran out between the check and the request): the request
            // never reached it, or reached it and was dropped unanswered. Idempotent and
            // bodiless, it goes again on a fresh connection, as nginx does.
            Err(Failed {
                replay: Some(replay),
                ..
            }) if reused => {
                let conn = self
                    .connect()
                    .await
                    .map_err(|e| SendError::Request(e.into()))?;
                Exchange::replay(conn, replay)
                    .response(stall)
                    .await
                    .map_err(|failed| SendError::Request(failed.error))?
            }
            Err(failed) => return Err(SendError::Request(failed.error)),
        };
        body.set_home(Arc::downgrade(self));
        let mut response = Response::new(body);
        *response.status_mut() = head.status;
        *response.headers_mut() = head.headers;
        Ok(response)
    }

    /// A new connection. Boxed: inline, the connect future (rarely awaited, as
    /// connections are reused) would be most of the size of every request's future.
    async fn connect(&self) -> std::io::Result<Conn> {
        Box::pin(self.connector.connect(&self.url)).await
    }

    /// Closes idle connections past `idle_timeout` and those the upstream closed.
    pub fn evict_idle(&self) {
        let timeout = self.idle_timeout;
        let stale: Vec<Idle> = match self.idle.lock() {
            Ok(mut idle) => {
                let mut stale = Vec::new();
                for mut c in std::mem::take(&mut *idle) {
                    if c.since.elapsed() < timeout && c.conn.is_reusable() {
                        idle.push(c);
                    } else {
                        stale.push(c);
                    }
                }
                stale
            }
            Err(_) => Vec::new(),
        };
        // Closed outside the lock.
        drop(stale);
    }

    fn take_idle(&self) -> Option<Conn> {
        loop {
            let Idle { mut conn, since } = self.idle.lock().ok()?.pop()?;
            // Checked outside the lock; a closed one is dropped (closed) here too.
            if since.elapsed() < self.idle_timeout && conn.is_reusable() {
                return Some(conn);
            }
        }
    }

    /// Takes back a connection whose exchange ended cleanly.
    pub(crate) fn give_back(&self, conn: Conn) {
        if self.max_idle == 0 {
            return;
        }
        let stale = self.idle.lock().ok().and_then(|mut idle| {
            // Full: the longest-idle connection makes room (closed once the lock is
            // released), not the one that just proved itself.
            let stale = (idle.len() >= self.max_idle).then(|| idle.remove(0));
            idle.push(Idle {
                conn,
                since: Instant::now(),
            });
            stale
        });
        drop(stale);
    }
}
