//! Failures at the HTTP edge, rendered as RFC 9457 problem documents
//! (`application/problem+json`) with a stable machine-readable `code`.
//!
//! [`EdgeError`] holds what any API can refuse before its own logic runs (authentication, rate
//! limits, bodies, routing, time limits); an API's own error type wraps it and adds its
//! domain's failures, so each failure is still mapped to a status in exactly one place.

use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::auth::AuthError;

/// An RFC 9457 problem document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Problem {
    /// A URI naming the problem type.
    #[serde(rename = "type")]
    pub problem_type: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    /// Stable, machine-readable error code (the domain error codes, and a few of the API's).
    pub code: String,
}

impl Problem {
    /// The document for `status` and `code`, its type URI derived from the code.
    pub fn new(status: StatusCode, code: &str, detail: String) -> Self {
        Problem {
            problem_type: format!("https://cloudphone.dev/problems/{}", code.replace('_', "-")),
            title: status.canonical_reason().unwrap_or("Error").to_owned(),
            status: status.as_u16(),
            detail,
            code: code.to_owned(),
        }
    }
}

/// Why a request was refused at the edge. Each variant's doc names its status code.
#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    /// 400: the body or a parameter is malformed.
    #[error("{detail}")]
    BadRequest { code: &'static str, detail: String },
    /// 401: no token, or one that does not verify.
    #[error("unauthorized: {0}")]
    Unauthorized(#[from] AuthError),
    /// 403: the caller may not do this.
    #[error("{0}")]
    Forbidden(String),
    /// 404: no route here.
    #[error("no such resource")]
    NoRoute,
    /// 405: the route exists, not with this method.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// 408: the request body stopped arriving.
    #[error("{0}")]
    BodyTimeout(String),
    /// 413: the body is over the limit.
    #[error("the request body is larger than the limit")]
    PayloadTooLarge,
    /// 415: not `application/json`.
    #[error("expected Content-Type: application/json")]
    UnsupportedMediaType,
    /// 429: this client sent too many requests.
    #[error("rate limit exceeded")]
    RateLimited { retry_after: Duration },
    /// 503: a dependency is unreachable or the request ran out of time; safe to retry.
    #[error("service unavailable: {0}")]
    Unavailable(String),
    /// 500: a bug. Logged with detail, shown without.
    #[error("internal error: {0}")]
    Internal(String),
}

impl EdgeError {
    pub fn bad_request(code: &'static str, detail: impl Into<String>) -> Self {
        EdgeError::BadRequest {
            code,
            detail: detail.into(),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            EdgeError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            EdgeError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            EdgeError::Forbidden(_) => StatusCode::FORBIDDEN,
            EdgeError::NoRoute => StatusCode::NOT_FOUND,
            EdgeError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            EdgeError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            EdgeError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            EdgeError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            EdgeError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            EdgeError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            EdgeError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            EdgeError::BadRequest { code, .. } => code,
            EdgeError::Unauthorized(_) => "unauthorized",
            EdgeError::Forbidden(_) => "forbidden",
            EdgeError::NoRoute => "not_found",
            EdgeError::MethodNotAllowed => "method_not_allowed",
            EdgeError::BodyTimeout(_) => "body_timeout",
            EdgeError::PayloadTooLarge => "payload_too_large",
            EdgeError::UnsupportedMediaType => "unsupported_media_type",
            EdgeError::RateLimited { .. } => "rate_limited",
            EdgeError::Unavailable(_) => "unavailable",
            EdgeError::Internal(_) => "internal",
        }
    }

    /// The problem document clients see: internals and token details stay in the logs.
    pub fn problem(&self) -> Problem {
        let detail = match self {
            EdgeError::Unauthorized(AuthError::Missing) => "a bearer token is required".to_owned(),
            EdgeError::Unauthorized(_) => "the bearer token is invalid or expired".to_owned(),
            EdgeError::Internal(_) => "an internal error occurred; it has been logged".to_owned(),
            EdgeError::Unavailable(_) => "the service is temporarily unavailable; retry later".to_owned(),
            other => other.to_string(),
        };
        Problem::new(self.status(), self.code(), detail)
    }
}

impl IntoResponse for EdgeError {
    fn into_response(self) -> Response {
        match &self {
            EdgeError::Internal(detail) => tracing::error!(%detail, "internal error"),
            EdgeError::Unavailable(detail) => tracing::warn!(%detail, "unavailable"),
            EdgeError::Unauthorized(reason) => tracing::debug!(%reason, "unauthorized"),
            _ => {}
        }
        let mut response = problem_response(&self.problem());
        match &self {
            EdgeError::RateLimited { retry_after } => {
                let seconds = retry_after.as_secs().max(1).to_string();
                if let Ok(value) = HeaderValue::from_str(&seconds) {
                    response.headers_mut().insert(header::RETRY_AFTER, value);
                }
            }
            EdgeError::Unavailable(_) => {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            EdgeError::Unauthorized(_) => {
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            _ => {}
        }
        response
    }
}

/// A problem document as a response, with its status and content type.
pub fn problem_response(problem: &Problem) -> Response {
    let status = StatusCode::from_u16(problem.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = serde_json::to_vec(problem).unwrap_or_default();
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        )],
        body,
    )
        .into_response()
}
