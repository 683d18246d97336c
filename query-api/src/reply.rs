//! How the query API words and counts its answers: JSON bodies with their content type,
//! GraphQL errors with a `code` extension, [`Rejection`], the error every extractor and route
//! refuses a request with (counted as a `rejected` GraphQL request), and the names of the
//! GraphQL request metrics.

use std::time::Duration;

use async_graphql::{ErrorExtensions, ServerError};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

/// Names of the query API's metrics (HTTP metrics are the HTTP edge's, by route).
pub mod metrics_names {
    /// Counter: GraphQL requests by outcome (`ok`, `error`, `rejected`) and cache result.
    pub const GRAPHQL_REQUESTS_TOTAL: &str = "cloudphone_graphql_requests_total";
    /// Histogram: GraphQL request latency by cache result.
    pub const GRAPHQL_REQUEST_DURATION_SECONDS: &str = "cloudphone_graphql_request_duration_seconds";
}
use metrics_names as m;

/// A JSON body with its content type.
#[derive(Debug)]
pub(crate) struct Json;

impl Json {
    pub(crate) fn ok(body: impl Into<axum::body::Body>) -> Response {
        ([(header::CONTENT_TYPE, "application/json")], body.into()).into_response()
    }

    pub(crate) fn errors(errors: &[ServerError]) -> Response {
        let body = serde_json::json!({ "errors": errors }).to_string();
        Self::ok(body)
    }
}

/// A GraphQL error with a code dashboards can branch on.
pub(crate) fn graphql_error(message: impl Into<String>, code: &'static str) -> ServerError {
    let mut error = ServerError::new(message, None);
    error.extensions = async_graphql::Error::new("")
        .extend_with(|_, e| e.set("code", code))
        .extensions;
    error
}

/// A request refused before it was asked: the status, message and code of its answer, and
/// how long to wait (`Retry-After`) when the client is over its rate.
#[derive(Debug)]
pub(crate) struct Rejection {
    status: StatusCode,
    message: String,
    code: &'static str,
    retry_after: Option<Duration>,
}

impl Rejection {
    pub(crate) fn new(status: StatusCode, message: impl Into<String>, code: &'static str) -> Self {
        Rejection {
            status,
            message: message.into(),
            code,
            retry_after: None,
        }
    }

    pub(crate) fn message(&self) -> &str {
        &self.message
    }

    pub(crate) fn code(&self) -> &'static str {
        self.code
    }

    /// 429: the client's bucket is empty for `wait`.
    pub(crate) fn rate_limited(wait: Duration) -> Self {
        Rejection {
            retry_after: Some(wait),
            ..Rejection::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "too many queries from this client; retry in {} ms",
                    wait.as_millis().max(1)
                ),
                "RATE_LIMITED",
            )
        }
    }
}

impl IntoResponse for Rejection {
    fn into_response(self) -> Response {
        metrics::counter!(m::GRAPHQL_REQUESTS_TOTAL, "outcome" => "rejected", "cache" => "none").increment(1);
        let mut response = (self.status, Json::errors(&[graphql_error(self.message, self.code)])).into_response();
        if let Some(wait) = self.retry_after
            && let Ok(value) = HeaderValue::from_str(&wait.as_secs().max(1).to_string())
        {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
        response
    }
}
