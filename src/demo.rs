//! `covata-gateway demo-upstream`: a small upstream service for trying the gateway out
//! and for benchmarks. It answers every request with JSON describing what it received
//! from the gateway (method, path, identity headers), or with a fixed body of a chosen
//! size. It reads each request body to its end before answering.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

fn describe(request: &Request<Incoming>) -> Bytes {
    let header = |name: &str| {
        request
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let value = serde_json::json!({
        "service": "covata-gateway demo upstream",
        "method": request.method().as_str(),
        "path": request.uri().path(),
        "query": request.uri().query(),
        "authenticated_user": header("x-authenticated-user"),
        "authenticated_client": header("x-authenticated-client"),
        "authenticated_roles": header("x-authenticated-roles"),
        "authenticated_scope": header("x-authenticated-scope"),
        "token_id": header("x-token-id"),
        "forwarded_for": header("x-forwarded-for"),
    });
    Bytes::from(serde_json::to_vec_pretty(&value).unwrap_or_default())
}

/// Serves on every listener until the process ends. With `body_size`, every answer is
/// that many bytes of `x` (for benchmarks); otherwise a JSON echo.
pub async fn serve(listeners: Vec<TcpListener>, body_size: Option<usize>) {
    let fixed = body_size.map(|n| Bytes::from(vec![b'x'; n]));
    let mut tasks = Vec::new();
    for listener in listeners {
        let fixed = fixed.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let fixed = fixed.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request: Request<Incoming>| {
                        let (body, kind) = match &fixed {
                            Some(bytes) => (bytes.clone(), "application/octet-stream"),
                            None => (describe(&request), "application/json"),
                        };
                        let mut response = Response::new(Full::new(body));
                        response
                            .headers_mut()
                            .insert(CONTENT_TYPE, HeaderValue::from_static(kind));
                        async move {
                            // Read the upload before answering, as a real service does:
                            // an answer before the body ends costs the connection. Read
                            // and dropped, so no upload is ever held whole.
                            let mut body = request.into_body();
                            while let Some(Ok(_)) = body.frame().await {}
                            Ok::<_, Infallible>(response)
                        }
                    });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
}

/// Binds every address; fails naming the first that cannot be bound.
pub async fn bind(addresses: &[SocketAddr]) -> Result<Vec<TcpListener>, String> {
    let mut listeners = Vec::new();
    for address in addresses {
        listeners.push(
            TcpListener::bind(address)
                .await
                .map_err(|e| format!("cannot listen on {address}: {e}"))?,
        );
    }
    Ok(listeners)
}
