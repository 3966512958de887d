//! The response body type shared by the gateway's own answers and proxied ones.
//!
//! An `Either` rather than a boxed body: the proxied side stays hyper's `Incoming`, so a
//! streamed upstream response costs no allocation or dynamic dispatch per frame.

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::Incoming;

/// Body of every response the gateway sends.
pub type Body = Either<Full<Bytes>, Incoming>;

/// A complete in-memory body.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Either::Left(Full::new(bytes.into()))
}

/// An empty body.
pub fn empty() -> Body {
    full(Bytes::new())
}

/// A body streamed from the upstream as it arrives.
pub fn streamed(incoming: Incoming) -> Body {
    Either::Right(incoming)
}
