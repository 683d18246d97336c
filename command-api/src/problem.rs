//! Every failure a client can see, mapped in one place to an RFC 9457 problem document
//! (`application/problem+json`) with a stable machine-readable `code`.

use std::time::Duration;

use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use domain::{DomainError, ErrorKind};
use event_log::personal::PersonalDataError;
use event_log::{AppendError, ReadError};
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

/// Why a request failed. Each variant's doc names its status code.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the body or a parameter is malformed.
    #[error("{detail}")]
    BadRequest { code: &'static str, detail: String },
    /// 401: no token, or one that does not verify.
    #[error("unauthorized: {0}")]
    Unauthorized(#[from] AuthError),
    /// 403: the caller may not do this.
    #[error("{0}")]
    Forbidden(String),
    /// 404, 409 or 422 by the error's kind.
    #[error(transparent)]
    Domain(#[from] DomainError),
    /// 409: the stream kept changing under us after every retry, or has another type or owner.
    #[error("{detail}")]
    Conflict { code: &'static str, detail: String },
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
    /// 422: valid JSON with values that cannot be accepted.
    #[error("{detail}")]
    Unprocessable { code: &'static str, detail: String },
    /// 429: this client sent too many requests.
    #[error("rate limit exceeded")]
    RateLimited { retry_after: Duration },
    /// 503: the event log is unreachable or the request ran out of time; safe to retry.
    #[error("service unavailable: {0}")]
    Unavailable(String),
    /// 500: a bug. Logged with detail, shown without.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    pub fn bad_request(code: &'static str, detail: impl Into<String>) -> Self {
        ApiError::BadRequest {
            code,
            detail: detail.into(),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::Domain(error) => match error.kind() {
                ErrorKind::NotFound => StatusCode::NOT_FOUND,
                ErrorKind::Conflict => StatusCode::CONFLICT,
                ErrorKind::Invalid => StatusCode::UNPROCESSABLE_ENTITY,
            },
            ApiError::Conflict { .. } => StatusCode::CONFLICT,
            ApiError::NoRoute => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Unprocessable { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest { code, .. }
            | ApiError::Conflict { code, .. }
            | ApiError::Unprocessable { code, .. } => code,
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::Domain(error) => error.code(),
            ApiError::NoRoute => "not_found",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::BodyTimeout(_) => "body_timeout",
            ApiError::PayloadTooLarge => "payload_too_large",
            ApiError::UnsupportedMediaType => "unsupported_media_type",
            ApiError::RateLimited { .. } => "rate_limited",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Internal(_) => "internal",
        }
    }

    /// The problem document clients see: internals and token details stay in the logs.
    pub fn problem(&self) -> Problem {
        let status = self.status();
        let detail = match self {
            ApiError::Unauthorized(AuthError::Missing) => "a bearer token is required".to_owned(),
            ApiError::Unauthorized(_) => "the bearer token is invalid or expired".to_owned(),
            ApiError::Internal(_) => "an internal error occurred; it has been logged".to_owned(),
            ApiError::Unavailable(_) => "the service is temporarily unavailable; retry later".to_owned(),
            other => other.to_string(),
        };
        Problem {
            problem_type: format!("https://cloudphone.dev/problems/{}", self.code().replace('_', "-")),
            title: status.canonical_reason().unwrap_or("Error").to_owned(),
            status: status.as_u16(),
            detail,
            code: self.code().to_owned(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match &self {
            ApiError::Internal(detail) => tracing::error!(%detail, "internal error"),
            ApiError::Unavailable(detail) => tracing::warn!(%detail, "unavailable"),
            ApiError::Unauthorized(reason) => tracing::debug!(%reason, "unauthorized"),
            _ => {}
        }
        let mut response = problem_response(&self.problem());
        match &self {
            ApiError::RateLimited { retry_after } => {
                let seconds = retry_after.as_secs().max(1).to_string();
                if let Ok(value) = HeaderValue::from_str(&seconds) {
                    response.headers_mut().insert(header::RETRY_AFTER, value);
                }
            }
            ApiError::Unavailable(_) => {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            ApiError::Unauthorized(_) => {
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            _ => {}
        }
        response
    }
}

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

impl From<AppendError> for ApiError {
    fn from(error: AppendError) -> Self {
        match error {
            AppendError::WrongExpectedVersion { .. } => ApiError::Conflict {
                code: "concurrency_conflict",
                detail: "the resource changed concurrently; retry the request".to_owned(),
            },
            AppendError::StreamTypeMismatch { stream_id, .. } | AppendError::OwnerMismatch { stream_id, .. } => {
                ApiError::Conflict {
                    code: "id_in_use",
                    detail: format!("id {stream_id} is already used by another resource"),
                }
            }
            AppendError::IdempotencyKeyReused { .. } => ApiError::Unprocessable {
                code: "idempotency_key_reused",
                detail: "this Idempotency-Key was used with a different request".to_owned(),
            },
            AppendError::InvalidIdempotencyKey { limit } => ApiError::bad_request(
                "invalid_idempotency_key",
                format!("Idempotency-Key must be 1 to {limit} bytes"),
            ),
            error if error.is_unavailable() => ApiError::Unavailable(error.to_string()),
            // Everything else means the domain produced something the log refuses: a bug.
            error => ApiError::Internal(error.to_string()),
        }
    }
}

impl From<PersonalDataError> for ApiError {
    fn from(error: PersonalDataError) -> Self {
        match error {
            PersonalDataError::Erased(_) => ApiError::Domain(DomainError::UserErased),
            PersonalDataError::Database(e) if event_log::db_error::is_connection_error(&e) => {
                ApiError::Unavailable(format!("personal data keys: {e}"))
            }
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl From<ReadError> for ApiError {
    fn from(error: ReadError) -> Self {
        if error.is_unavailable() {
            ApiError::Unavailable(error.to_string())
        } else {
            ApiError::Internal(error.to_string())
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        match rejection {
            JsonRejection::MissingJsonContentType(_) => ApiError::UnsupportedMediaType,
            JsonRejection::JsonSyntaxError(error) => ApiError::bad_request("malformed_json", error.body_text()),
            JsonRejection::JsonDataError(error) => ApiError::bad_request("invalid_body", error.body_text()),
            JsonRejection::BytesRejection(error) if error.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                ApiError::PayloadTooLarge
            }
            other => ApiError::bad_request("invalid_body", other.body_text()),
        }
    }
}

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        ApiError::bad_request("invalid_path", rejection.body_text())
    }
}
