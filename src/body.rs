//! The response body type shared by the gateway's own answers and proxied ones.
//!
//! An `Either` rather than a boxed body: the proxied side stays the upstream's body, so
//! a streamed upstream response costs no allocation or dynamic dispatch per frame.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;

use crate::upstream::ResponseBody;

/// Body of every response the gateway sends.
pub type Body = Either<Full<Bytes>, ResponseBody>;

/// A complete in-memory body.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Either::Left(Full::new(bytes.into()))
}

/// An empty body.
pub fn empty() -> Body {
    full(Bytes::new())
}

/// A body streamed from the upstream as it arrives.
pub fn streamed(upstream: ResponseBody) -> Body {
    Either::Right(upstream)
}

/// How much of a refused body is read and thrown away so the client sees the refusal.
pub const DRAIN_LIMIT: u64 = 8 * 1024 * 1024;
/// How long draining a refused body may take at most.
pub const DRAIN_TIME: Duration = Duration::from_secs(5);

/// Reads and discards what remains of a request body, up to [`DRAIN_LIMIT`] bytes and
/// [`DRAIN_TIME`]. Answering 413 and closing while the client is still sending makes
/// the kernel reset the connection, and the client then never reads the 413; draining
/// first is the lingering close RFC 9112 §9.6 asks for.
pub async fn drain(mut body: Incoming) {
    let discard = async {
        let mut read = 0u64;
        while read < DRAIN_LIMIT {
            match body.frame().await {
                Some(Ok(frame)) => read += frame.data_ref().map_or(0, |d| d.len() as u64),
                _ => return,
            }
        }
    };
    let _ = tokio::time::timeout(DRAIN_TIME, discard).await;
}
