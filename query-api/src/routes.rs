//! The query API's routes: `POST /graphql` (and at `GET /graphql` subscriptions over a
//! WebSocket upgrade, or GraphiQL), the audit export and its OpenAPI document
//! (`/openapi.json`), `/healthz`, `/readyz`, `/metrics`, the
//! web console (`/`, [`crate::console`]); the fallbacks for unknown routes and methods; and
//! how the HTTP edge's refusals are answered here (GraphQL errors with codes).

use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http_edge::body::BodyError;
use http_edge::layers::{BodyLimits, EdgeAnswers, with_edge_layers};

use crate::reply::{Json, Rejection, graphql_error};
use crate::state::AppState;

/// Every route, in the HTTP edge's layers.
pub(crate) fn router(state: AppState) -> Router {
    let body = BodyLimits {
        max_bytes: state.config.max_body_bytes,
        timeout: state.config.connections.body_read_timeout,
    };
    let routed = Router::new()
        .route(
            "/graphql",
            get(crate::subscriptions::socket::graphql_get).post(crate::graphql::handler::graphql),
        )
        .route("/v1/audit/events", get(crate::audit::audit_events))
        .route_layer(axum::middleware::from_fn(http_edge::telemetry::track_requests))
        .route("/healthz", get(|| async { Json::ok("{\"status\":\"ok\"}") }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .route("/openapi.json", get(openapi))
        .merge(crate::console::router(&state))
        // A method a route does not take gets a coded error too (axum's own 405 has no body).
        .method_not_allowed_fallback(|| async {
            (
                StatusCode::METHOD_NOT_ALLOWED,
                Json::errors(&[graphql_error(
                    "this route does not take that method; queries go to POST /graphql",
                    "METHOD_NOT_ALLOWED",
                )]),
            )
        })
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                Json::errors(&[graphql_error("no such route; queries go to POST /graphql", "NOT_FOUND")]),
            )
        });
    let cors = state.config.cors_origins.clone();
    http_edge::cors::with_cors(with_edge_layers(routed, body, GraphqlAnswers), &cors).with_state(state)
}

/// The query API answers what its edge refuses as GraphQL errors with codes.
#[derive(Debug, Clone, Copy)]
struct GraphqlAnswers;

impl EdgeAnswers for GraphqlAnswers {
    fn body_refused(&self, error: &BodyError) -> Response {
        let (status, code) = match error {
            BodyError::TimedOut(_) => (StatusCode::REQUEST_TIMEOUT, "REQUEST_TIMEOUT"),
            BodyError::TooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "PAYLOAD_TOO_LARGE"),
            BodyError::Unreadable(_) => (StatusCode::BAD_REQUEST, "BAD_REQUEST"),
        };
        Rejection::new(status, error.to_string(), code).into_response()
    }

    fn panicked(&self) -> Response {
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json::errors(&[graphql_error("internal error", "INTERNAL_SERVER_ERROR")]),
        )
            .into_response()
    }
}

/// `GET /graphql`: GraphiQL, when the configuration turns it on (our own page, loading
/// GraphiQL from this binary: see [`crate::console`]).
pub(crate) async fn graphiql(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if state.config.graphiql {
        crate::console::graphiql_page(&headers).await
    } else {
        Rejection::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "GraphiQL is turned off here; send queries with POST /graphql",
            "METHOD_NOT_ALLOWED",
        )
        .into_response()
    }
}

/// Ready when the primary answers; replicas are reported but do not decide readiness (reads
/// fall back to the primary without them).
async fn readyz(State(state): State<AppState>) -> Response {
    let check = sqlx::query("SELECT 1").execute(state.sources.primary());
    let database = match tokio::time::timeout(Duration::from_secs(2), check).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err("no answer within 2 s".to_owned()),
    };
    let replicas: Vec<serde_json::Value> = state
        .sources
        .replica_states()
        .into_iter()
        .map(|(name, healthy, lag_bytes)| serde_json::json!({"replica": name, "in_rotation": healthy, "lag_bytes": lag_bytes}))
        .collect();
    let (status, body) = match database {
        Ok(()) => (
            StatusCode::OK,
            serde_json::json!({"status": "ready", "database": "ok", "replicas": replicas}),
        ),
        Err(error) => (
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({"status": "unavailable", "database": error, "replicas": replicas}),
        ),
    };
    (status, Json::ok(body.to_string())).into_response()
}

async fn render_metrics(State(state): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

/// The OpenAPI 3.1 document of the audit export (`crate::openapi`).
async fn openapi() -> Response {
    use utoipa::OpenApi as _;
    match crate::openapi::ApiDoc::openapi().to_json() {
        Ok(json) => ([(header::CONTENT_TYPE, "application/json")], json).into_response(),
        Err(error) => {
            tracing::error!(%error, "the OpenAPI document did not serialise");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}
