//! The accept loop, connections, and graceful shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

use crate::gateway::{self, Shared};

/// A pause after an accept error such as EMFILE, so a full file table does not become a
/// busy loop; the loop itself never ends on an accept error.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

fn connection_builder(server: &crate::config::ServerConfig) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(server.header_read_timeout)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(server.idle_timeout / 2)
        .keep_alive_timeout(server.header_read_timeout);
    builder
}

/// Runs the TLS listener (and the admin listener) until `shutdown`, then drains.
pub async fn serve(
    shared: Arc<Shared>,
    listener: TcpListener,
    admin: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let admin_task = admin.map(|admin| {
        let mut stop = stop_rx.clone();
        tokio::spawn(crate::admin::serve(shared.clone(), admin, async move {
            let _ = stop.wait_for(|s| *s).await;
        }))
    });
    let sweeper = tokio::spawn(sweep(shared.clone()));

    let live = shared.live();
    let limit = Arc::new(Semaphore::new(live.config.server.max_connections));
    drop(live);
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
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let live = shared.live();
        let acceptor = TlsAcceptor::from(live.tls.clone());
        let handshake_timeout = live.config.server.tls_handshake_timeout;
        let builder = connection_builder(&live.config.server);
        drop(live);
        let watcher = graceful.watcher();
        let shared = shared.clone();
        shared.metrics.connection_opened();
        tokio::spawn(async move {
            let _permit = permit;
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
            let service = service_fn(move |request| {
                let shared = service_shared.clone();
                async move { Ok::<_, Infallible>(gateway::handle(shared, request, peer).await) }
            });
            let connection = builder
                .serve_connection_with_upgrades(TokioIo::new(tls), service)
                .into_owned();
            if let Err(error) = watcher.watch(connection).await {
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
    sweeper.abort();
    let _ = stop_tx.send(true);
    if let Some(task) = admin_task {
        let _ = task.await;
    }
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
