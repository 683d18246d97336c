//! `/healthz`, `/readyz` and `/metrics` for the roles that have no HTTP API of their own
//! (the projector, the relay, a replay), so every role is scraped and probed the same way.
//! While they serve, the process and the pool's connections are sampled ([`sampler`]).

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

use kafka_adapters::relay::BrokerProbe;

use crate::commands::sampler;

#[derive(Clone)]
struct RoleState {
    pool: PgPool,
    metrics: PrometheusHandle,
    /// The Kafka roles' brokers, checked for readiness too.
    broker: Option<BrokerProbe>,
}

/// Binds `listen` and serves until `stop` is cancelled, sampling the process and `pool` (as
/// the `primary` pool) meanwhile. Binding fails loudly: a role that cannot be scraped or
/// probed should not start silently.
pub async fn serve(
    listen: SocketAddr,
    pool: PgPool,
    metrics: PrometheusHandle,
    stop: CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    serve_with_broker(listen, pool, metrics, None, stop).await
}

/// [`serve`] for a role in Kafka mode: ready only while `broker` also answers.
pub async fn serve_with_broker(
    listen: SocketAddr,
    pool: PgPool,
    metrics: PrometheusHandle,
    broker: Option<BrokerProbe>,
    stop: CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen} (--ops-listen)"))?;
    let address = listener.local_addr()?;
    tracing::info!(%address, "health, readiness and metrics listening");
    let sampling = sampler::spawn(vec![("primary", pool.clone())], Vec::new(), stop.clone());
    let app = Router::new()
        .route("/healthz", get(|| async { (StatusCode::OK, "{\"status\":\"ok\"}") }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .with_state(RoleState { pool, metrics, broker });
    Ok(tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
        if let Err(error) = served {
            tracing::error!(%error, "health and metrics endpoint failed");
        }
        let _ = sampling.await;
    }))
}

/// Ready when the database answers within 2 s and, in Kafka mode, a broker answers with the
/// topic's metadata within 2 s.
async fn readyz(State(state): State<RoleState>) -> Response {
    const LIMIT: Duration = Duration::from_secs(2);
    let check = event_log::server::answers(&state.pool);
    let database = match tokio::time::timeout(LIMIT, check).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err("no answer within 2 s".to_owned()),
    };
    let broker = match &state.broker {
        None => None,
        Some(probe) => Some(
            match tokio::time::timeout(LIMIT + Duration::from_millis(500), probe.check(LIMIT)).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(error)) => Err(error.to_string()),
                Err(_) => Err("no answer within 2 s".to_owned()),
            },
        ),
    };
    let ready = database.is_ok() && broker.as_ref().is_none_or(Result::is_ok);
    let describe = |check: &Result<(), String>| match check {
        Ok(()) => "ok".to_owned(),
        Err(error) => error.clone(),
    };
    let mut body = serde_json::json!({
        "status": if ready { "ready" } else { "unavailable" },
        "database": describe(&database),
    });
    if let Some(broker) = &broker {
        body["broker"] = serde_json::Value::String(describe(broker));
    }
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

async fn render_metrics(State(state): State<RoleState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}
