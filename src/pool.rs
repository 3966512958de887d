//! Keep-alive HTTP/1.1 connections to one upstream address.
//!
//! One pool per upstream address (shared by every route that names it with the same
//! connect deadline) keeps idle connections last-in first-out, so the warmest one is
//! reused. A connection goes back to its pool the moment the response body it carried
//! has been read to the end; a body dropped half-read takes its connection with it,
//! since the rest of that response would still be on the wire.
//!
//! HTTP/1.1 answers carry no request id: a byte an upstream sends after a complete
//! response would be read as the answer to the next request on that connection, and
//! that request may be another user's. So an idle connection is watched and closed
//! when anything (bytes, a close) arrives ([`Pool::poll_watch`]), and is checked again,
//! on the socket itself, when it is taken. What remains is a byte that arrives after
//! the next request was written, which nothing in HTTP/1.1 tells from its answer; a
//! route with `pool_partition = "principal"` keeps each connection to one principal's
//! requests ([`Partition`]), so even that cannot cross from one user to another.
//!
//! Why not hyper-util's pooled client: per request it hashes a pool key, wraps the
//! connection in a pool guard and spawns a task that waits to hand the connection
//! back. Here the pool is found through the route, and the response body hands the
//! connection back itself.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::task::Context;
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

/// Whose requests a pooled connection may carry, under `pool_partition = "principal"`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Partition {
    /// A token's user (none for a client's own token) with its client.
    Principal {
        /// The user.
        user: Option<Arc<str>>,
        /// The client the token was issued to.
        client: Arc<str>,
    },
    /// A request without a token (a public route), by client address.
    Address(IpAddr),
}

struct Idle {
    conn: Conn,
    since: Instant,
    /// Not to be used before this (see `ResponseBody::settle`).
    ready_at: Instant,
    partition: Option<Partition>,
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
    /// With a `partition`, only a connection that carried that partition's requests
    /// is reused, and the connection goes back tagged with it.
    pub async fn send(
        self: &Arc<Self>,
        request: Request<RequestBody>,
        rewrite: &HeaderRewrite<'_>,
        stall: Duration,
        partition: Option<Partition>,
    ) -> Result<Response<ResponseBody>, SendError> {
        let (conn, reused) = match self.take_idle(partition.as_ref()) {
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
        body.set_home(Arc::downgrade(self), partition);
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

    /// Watches the idle connections: polls each socket's readiness with `cx`'s waker,
    /// and closes every connection where something arrived (an answer nobody asked
    /// for, or the upstream's close). A connection is registered here once it has
    /// been polled, so the caller polls again on its wake-ups and now and then for
    /// connections pooled since.
    pub fn poll_watch(&self, cx: &mut Context<'_>) {
        let stirred: Vec<Idle> = match self.idle.lock() {
            Ok(mut idle) => {
                let mut stirred = Vec::new();
                let mut i = 0;
                while i < idle.len() {
                    let conn = &mut idle[i].conn;
                    if conn.poll_stirred(cx).is_ready() {
                        if !conn.is_reusable() {
                            stirred.push(idle.remove(i));
                            continue;
                        }
                        // A spurious readiness, or TLS records that were no answer:
                        // wait for the next one.
                        conn.settle();
                        let _ = conn.poll_stirred(cx);
                    }
                    i += 1;
                }
                stirred
            }
            Err(_) => Vec::new(),
        };
        // Closed outside the lock.
        drop(stirred);
    }

    fn take_idle(&self, partition: Option<&Partition>) -> Option<Conn> {
        loop {
            let Idle {
                mut conn, since, ..
            } = {
                let mut idle = self.idle.lock().ok()?;
                // The most recently pooled one of this partition that has rested.
                let now = Instant::now();
                let at = idle
                    .iter()
                    .rposition(|c| c.ready_at <= now && c.partition.as_ref() == partition)?;
                idle.remove(at)
            };
            // Checked outside the lock, on the socket; one that holds anything is
            // dropped (closed) here, never written to.
            if since.elapsed() < self.idle_timeout && conn.is_reusable() {
                return Some(conn);
            }
        }
    }

    /// Takes back a connection whose exchange ended cleanly, with the partition whose
    /// requests it may carry, to be reused once it has rested for `settle`.
    pub(crate) fn give_back(&self, conn: Conn, partition: Option<Partition>, settle: Duration) {
        if self.max_idle == 0 {
            return;
        }
        let stale = self.idle.lock().ok().and_then(|mut idle| {
            // Full: the longest-idle connection makes room (closed once the lock is
            // released), not the one that just proved itself.
            let stale = (idle.len() >= self.max_idle).then(|| idle.remove(0));
            let since = Instant::now();
            idle.push(Idle {
                conn,
                since,
                ready_at: since + settle,
                partition,
            });
            stale
        });
        drop(stale);
    }
}
