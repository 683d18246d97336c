//! `/healthz`, `/readyz` and `/metrics` for the roles that have no HTTP API of their own
//! (the projector and the relay), so every role is scraped and probed the same way.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

#[derive(Clone)]
struct RoleState {
    pool: PgPool,
    metrics: PrometheusHandle,
}

/// Binds `listen` and serves until `stop` is cancelled. Binding fails loudly: a role that
/// cannot be scraped or probed should not start silently.
pub async fn serve(
    listen: SocketAddr,
    pool: PgPool,
    metrics: PrometheusHandle,
    stop: CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen} (--ops-listen)"))?;
    let address = listener.local_addr()?;
    tracing::info!(%address, "health, readiness and metrics listening");
    let app = Router::new()
        .route("/healthz", get(|| async { (StatusCode::OK, "{\"status\":\"ok\"}") }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .with_state(RoleState { pool, metrics });
    Ok(tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
        if let Err(error) = served {
            tracing::error!(%error, "health and metrics endpoint failed");
        }
    }))
}

/// Ready when the database answers within 2 s (the broker is checked by librdkafka itself:
/// its errors show in the consumer and relay error counters).
async fn readyz(State(state): State<RoleState>) -> Response {
    let check = sqlx::query("SELECT 1").execute(&state.pool);
    let (status, body) = match tokio::time::timeout(Duration::from_secs(2), check).await {
        Ok(Ok(_)) => (StatusCode::OK, "{\"status\":\"ready\",\"database\":\"ok\"}".to_owned()),
        Ok(Err(error)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({"status": "unavailable", "database": error.to_string()}).to_string(),
        ),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "{\"status\":\"unavailable\",\"database\":\"no answer within 2 s\"}".to_owned(),
        ),
    };
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

async fn render_metrics(State(state): State<RoleState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}
