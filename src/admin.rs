//! The admin listener: `/healthz`, `/readyz`, `/metrics` (Prometheus text), plain HTTP.
//! It is meant for a private address: it shows counts, never tokens or names.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http::header::CONTENT_TYPE;
use http::{HeaderValue, Request, Response, StatusCode};

use crate::body::{self, Body};
use crate::gateway::Shared;

/// Request and connection counters.
#[derive(Debug, Default)]
pub struct Metrics {
    by_class: [AtomicU64; 5],
    latency_micros_sum: AtomicU64,
    connections_opened: AtomicU64,
    connections_closed: AtomicU64,
}

impl Metrics {
    /// Counts one answered request.
    pub fn record(&self, status: StatusCode, latency: Duration) {
        let class = (status.as_u16() / 100).clamp(1, 5) as usize - 1;
        self.by_class[class].fetch_add(1, Ordering::Relaxed);
        self.latency_micros_sum
            .fetch_add(latency.as_micros() as u64, Ordering::Relaxed);
    }

    /// Counts an accepted connection.
    pub fn connection_opened(&self) {
        self.connections_opened.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a closed connection.
    pub fn connection_closed(&self) {
        self.connections_closed.fetch_add(1, Ordering::Relaxed);
    }

    fn render(&self, shared: &Shared) -> String {
        let mut out = String::with_capacity(1024);
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        out.push_str("# HELP covata_gateway_requests_total Requests answered, by status class.\n");
        out.push_str("# TYPE covata_gateway_requests_total counter\n");
        let mut total = 0;
        for (i, counter) in self.by_class.iter().enumerate() {
            let n = load(counter);
            total += n;
            let _ = writeln!(
                out,
                "covata_gateway_requests_total{{class=\"{}xx\"}} {n}",
                i + 1
            );
        }
        out.push_str(
            "# HELP covata_gateway_request_duration_seconds_sum Time spent answering requests.\n",
        );
        out.push_str("# TYPE covata_gateway_request_duration_seconds_sum counter\n");
        let _ = writeln!(
            out,
            "covata_gateway_request_duration_seconds_sum {}",
            load(&self.latency_micros_sum) as f64 / 1e6
        );
        let _ = writeln!(out, "covata_gateway_request_duration_seconds_count {total}");
        let opened = load(&self.connections_opened);
        let open = opened.saturating_sub(load(&self.connections_closed));
        out.push_str("# TYPE covata_gateway_connections_total counter\n");
        let _ = writeln!(out, "covata_gateway_connections_total {opened}");
        out.push_str("# TYPE covata_gateway_connections_open gauge\n");
        let _ = writeln!(out, "covata_gateway_connections_open {open}");
        out.push_str(
            "# HELP covata_gateway_tokens Records in the token table (access and refresh).\n",
        );
        out.push_str("# TYPE covata_gateway_tokens gauge\n");
        let _ = writeln!(out, "covata_gateway_tokens {}", shared.tokens.len());
        out
    }
}

fn text(
    status: StatusCode,
    body: impl Into<bytes::Bytes>,
    content_type: &'static str,
) -> Response<Body> {
    let mut response = Response::new(body::full(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// Answers one admin request.
pub fn answer<B>(shared: &Shared, request: &Request<B>) -> Response<Body> {
    const PLAIN: &str = "text/plain; charset=utf-8";
    match request.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n", PLAIN),
        "/readyz" if shared.ready.load(Ordering::Relaxed) => text(StatusCode::OK, "ready\n", PLAIN),
        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "draining\n", PLAIN),
        "/metrics" => text(
            StatusCode::OK,
            shared.metrics.render(shared),
            "text/plain; version=0.0.4; charset=utf-8",
        ),
        _ => text(StatusCode::NOT_FOUND, "not found\n", PLAIN),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_by_status_class() {
        let metrics = Metrics::default();
        metrics.record(StatusCode::OK, Duration::from_millis(2));
        metrics.record(StatusCode::UNAUTHORIZED, Duration::from_millis(1));
        metrics.record(StatusCode::BAD_GATEWAY, Duration::from_millis(1));
        let counts: Vec<u64> = metrics
            .by_class
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        assert_eq!(counts, vec![0, 1, 0, 1, 1]);
    }
}
