//! Cross-origin requests from browser apps on other origins: allowed only for the exact
//! origins an operator lists (`--cors-origins`), none by default. Preflights are answered
//! before authentication, rate limits or body reading, and the headers the APIs speak in
//! (tokens, idempotency keys, trace context, positions) are allowed and exposed.

use std::time::Duration;

use axum::Router;
use axum::http::{HeaderName, HeaderValue, Method, header};
use tower_http::cors::{AllowOrigin, CorsLayer};

/// An origin that cannot be allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CorsError {
    #[error(
        "`{0}` is not an origin: write scheme://host[:port] (e.g. https://dash.example.com), with no path; \
         `*` is not taken, list each origin"
    )]
    NotAnOrigin(String),
}

/// Parses allowed origins (each `scheme://host[:port]`).
pub fn parse_origins(origins: &[String]) -> Result<Vec<HeaderValue>, CorsError> {
    origins.iter().map(|origin| parse_origin(origin)).collect()
}

fn parse_origin(origin: &str) -> Result<HeaderValue, CorsError> {
    let invalid = || CorsError::NotAnOrigin(origin.chars().take(200).collect());
    let (scheme, rest) = origin.split_once("://").ok_or_else(invalid)?;
    let host_ok = !rest.is_empty()
        && rest
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'));
    if !matches!(scheme, "http" | "https") || !host_ok {
        return Err(invalid());
    }
    HeaderValue::from_str(origin).map_err(|_| invalid())
}

/// Wraps `router` in a CORS layer for `origins` (outermost, so preflights are answered
/// first); without origins the router is left as it is and browsers refuse cross-origin
/// calls.
pub fn with_cors<S>(router: Router<S>, origins: &[HeaderValue]) -> Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    if origins.is_empty() {
        return router;
    }
    let allowed_headers = [
        header::AUTHORIZATION,
        header::CONTENT_TYPE,
        HeaderName::from_static("idempotency-key"),
        HeaderName::from_static("traceparent"),
        HeaderName::from_static("tracestate"),
        HeaderName::from_static("x-min-position"),
        HeaderName::from_static("x-request-id"),
    ];
    let exposed_headers = [
        header::LOCATION,
        header::RETRY_AFTER,
        HeaderName::from_static("x-read-position"),
        HeaderName::from_static("x-read-source"),
        HeaderName::from_static("x-cache"),
        HeaderName::from_static("x-trace-id"),
        HeaderName::from_static("x-request-id"),
    ];
    router.layer(
        CorsLayer::new()
            .allow_origin(AllowOrigin::list(origins.iter().cloned()))
            .allow_methods([Method::GET, Method::POST, Method::DELETE, Method::OPTIONS])
            .allow_headers(allowed_headers)
            .expose_headers(exposed_headers)
            .max_age(Duration::from_secs(600)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_exact_origins_are_taken() {
        let ok = parse_origins(&["https://dash.example.com".into(), "http://localhost:5173".into()]).unwrap();
        assert_eq!(ok.len(), 2);
        for bad in [
            "*",
            "dash.example.com",
            "https://dash.example.com/path",
            "ftp://x",
            "https://",
            "https://a b",
        ] {
            assert!(parse_origins(&[bad.to_owned()]).is_err(), "{bad} was taken");
        }
    }
}
