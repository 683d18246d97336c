//! Every failure a client of the command API can see, mapped in one place to an RFC 9457
//! problem document: the edge's refusals ([`EdgeError`]) and the command API's own (domain
//! rules, conflicts in the log, values that cannot be accepted).

use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use domain::{DomainError, ErrorKind};
use event_log::personal::PersonalDataError;
use event_log::{AppendError, ReadError};
pub use http_edge::problem::{EdgeError, Problem, problem_response};

use http_edge::auth::AuthError;

/// Why a request failed. Each variant's doc names its status code.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Refused at the edge: authentication, rate limits, bodies, routing, time, outages, bugs.
    #[error(transparent)]
    Edge(#[from] EdgeError),
    /// 404, 409 or 422 by the error's kind.
    #[error(transparent)]
    Domain(#[from] DomainError),
    /// 409: the stream kept changing under us after every retry, or has another type or owner.
    #[error("{detail}")]
    Conflict { code: &'static str, detail: String },
    /// 422: valid JSON with values that cannot be accepted.
    #[error("{detail}")]
    Unprocessable { code: &'static str, detail: String },
}

impl ApiError {
    pub fn bad_request(code: &'static str, detail: impl Into<String>) -> Self {
        EdgeError::bad_request(code, detail).into()
    }

    pub fn forbidden(detail: impl Into<String>) -> Self {
        EdgeError::Forbidden(detail.into()).into()
    }

    pub fn unavailable(detail: impl Into<String>) -> Self {
        EdgeError::Unavailable(detail.into()).into()
    }

    pub fn internal(detail: impl Into<String>) -> Self {
        EdgeError::Internal(detail.into()).into()
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Edge(error) => error.status(),
            ApiError::Domain(error) => match error.kind() {
                ErrorKind::NotFound => StatusCode::NOT_FOUND,
                ErrorKind::Conflict => StatusCode::CONFLICT,
                ErrorKind::Invalid => StatusCode::UNPROCESSABLE_ENTITY,
            },
            ApiError::Conflict { .. } => StatusCode::CONFLICT,
            ApiError::Unprocessable { .. } => StatusCode::UNPROCESSABLE_ENTITY,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            ApiError::Edge(error) => error.code(),
            ApiError::Domain(error) => error.code(),
            ApiError::Conflict { code, .. } | ApiError::Unprocessable { code, .. } => code,
        }
    }

    /// The problem document clients see: internals and token details stay in the logs.
    pub fn problem(&self) -> Problem {
        match self {
            ApiError::Edge(error) => error.problem(),
            other => Problem::new(other.status(), other.code(), other.to_string()),
        }
    }
}

impl From<AuthError> for ApiError {
    fn from(error: AuthError) -> Self {
        EdgeError::Unauthorized(error).into()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match self {
            ApiError::Edge(error) => error.into_response(),
            other => problem_response(&other.problem()),
        }
    }
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
            error if error.is_unavailable() => ApiError::unavailable(error.to_string()),
            // Everything else means the domain produced something the log refuses: a bug.
            error => ApiError::internal(error.to_string()),
        }
    }
}

impl From<PersonalDataError> for ApiError {
    fn from(error: PersonalDataError) -> Self {
        match error {
            PersonalDataError::Erased(_) => ApiError::Domain(DomainError::UserErased),
            PersonalDataError::Database(e) if event_log::db_error::is_connection_error(&e) => {
                ApiError::unavailable(format!("personal data keys: {e}"))
            }
            other => ApiError::internal(other.to_string()),
        }
    }
}

impl From<ReadError> for ApiError {
    fn from(error: ReadError) -> Self {
        if error.is_unavailable() {
            ApiError::unavailable(error.to_string())
        } else {
            ApiError::internal(error.to_string())
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        match rejection {
            JsonRejection::MissingJsonContentType(_) => EdgeError::UnsupportedMediaType.into(),
            JsonRejection::JsonSyntaxError(error) => ApiError::bad_request("malformed_json", error.body_text()),
            JsonRejection::JsonDataError(error) => ApiError::bad_request("invalid_body", error.body_text()),
            JsonRejection::BytesRejection(error) if error.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                EdgeError::PayloadTooLarge.into()
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
