//! Health, readiness, metrics and the OpenAPI document.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use serde::Serialize;
use utoipa::OpenApi;

use crate::openapi::ApiDoc;
use crate::problem::ApiError;
use crate::state::AppState;

#[derive(Debug, Serialize)]
pub struct Health {
    status: &'static str,
}

/// Alive: the process answers.
pub async fn healthz() -> Json<Health> {
    Json(Health { status: "ok" })
}

#[derive(Debug, Serialize)]
pub struct Readiness {
    status: &'static str,
    database: &'static str,
    partition: String,
}

/// Ready: the database answers and this month's partition exists.
pub async fn readyz(State(state): State<AppState>) -> Result<Json<Readiness>, ApiError> {
    let partition = Utc::now().format("user_events_%Y_%m").to_string();
    let check = sqlx::query_scalar::<_, bool>("SELECT to_regclass($1) IS NOT NULL")
        .bind(&partition)
        .fetch_one(state.store.pool());
    match tokio::time::timeout(Duration::from_secs(2), check).await {
        Ok(Ok(true)) => Ok(Json(Readiness {
            status: "ready",
            database: "ok",
            partition,
        })),
        Ok(Ok(false)) => Err(ApiError::unavailable(format!("partition {partition} is missing"))),
        Ok(Err(error)) => Err(ApiError::unavailable(format!("database: {error}"))),
        Err(_) => Err(ApiError::unavailable("database did not answer within 2 s")),
    }
}

/// Prometheus text exposition.
pub async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        )],
        state.metrics.render(),
    )
        .into_response()
}

/// The OpenAPI 3.1 document of this API.
pub async fn openapi() -> Response {
    match ApiDoc::openapi().to_json() {
        Ok(json) => (
            [(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))],
            json,
        )
            .into_response(),
        Err(error) => ApiError::internal(error.to_string()).into_response(),
    }
}
