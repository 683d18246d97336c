//! Request bodies read whole before routing, for both APIs.
//!
//! A request answered without its body being read (a 401, 404 or 405, a refused content
//! type) makes hyper close the connection after the answer, and a keep-alive client that
//! already sent its next request on that connection sees it reset instead of answered. Reading
//! the body first (bodies here are small and bounded) keeps every such connection usable. A
//! body over the limit is not read: its answer says `Connection: close`, so the client opens
//! a new connection instead of reusing one the server is about to close.

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderValue, header};
use axum::response::Response;

/// Why a body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("the request body is larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("the request body could not be read: {0}")]
    Unreadable(axum::Error),
    /// The client stopped sending its body: its fault, answered 408 (not the server's 503).
    #[error("the request body did not arrive within {0:?}")]
    TimedOut(std::time::Duration),
}

/// The request with its body read into memory, up to `limit` bytes, within `timeout`.
pub async fn read_whole_body(
    request: Request,
    limit: usize,
    timeout: std::time::Duration,
) -> Result<Request, BodyError> {
    let (parts, body) = request.into_parts();
    match tokio::time::timeout(timeout, axum::body::to_bytes(body, limit)).await {
        Ok(Ok(bytes)) => Ok(Request::from_parts(parts, Body::from(bytes))),
        Ok(Err(error)) if is_over_limit(&error) => Err(BodyError::TooLarge { limit }),
        Ok(Err(error)) => Err(BodyError::Unreadable(error)),
        Err(_) => Err(BodyError::TimedOut(timeout)),
    }
}

/// Marks an answer after which the server closes the connection (its body was left unread).
pub fn closing(mut response: Response) -> Response {
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

fn is_over_limit(error: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(current) = source {
        if current.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = current.source();
    }
    false
}
