//! Building the application: the router with its layers, bound to a port.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::HeaderName;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use event_log::{Clock, EventStore, StoreConfig, SystemClock};
use metrics_exporter_prometheus::PrometheusHandle;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use crate::auth::{KeyError, TokenVerifier};
use crate::body::{self, BodyError};
use crate::config::ApiConfig;
use crate::problem::ApiError;
use crate::routes::{self, system};
use crate::state::{AppState, Inner};
use crate::telemetry;

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open the event log: {0}")]
    EventLog(#[from] sqlx::Error),
    #[error("token keys: {0}")]
    Keys(#[from] KeyError),
}

/// The command API, bound and ready to serve.
#[derive(Debug)]
pub struct Application {
    listener: TcpListener,
    router: Router,
    state: AppState,
}

impl Application {
    /// Opens the event log on `pool` (migrated already) and binds `config.listen` (port 0
    /// picks a free port; see [`Application::local_addr`]).
    pub async fn build(config: ApiConfig, pool: PgPool, metrics: PrometheusHandle) -> Result<Self, StartupError> {
        Self::build_with_clock(config, pool, metrics, Arc::new(SystemClock)).await
    }

    pub async fn build_with_clock(
        config: ApiConfig,
        pool: PgPool,
        metrics: PrometheusHandle,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, StartupError> {
        let store = Arc::new(EventStore::open_with_clock(pool, StoreConfig::default(), Arc::clone(&clock)).await?);
        Self::with_store(config, store, metrics, clock).await
    }

    /// Builds on an event store that other roles of the process share.
    pub async fn with_store(
        config: ApiConfig,
        store: Arc<EventStore>,
        metrics: PrometheusHandle,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, StartupError> {
        let verifier = TokenVerifier::new(&config.keys)?;
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|source| StartupError::Bind {
                addr: config.listen,
                source,
            })?;
        let state = AppState(Arc::new(Inner::new(config, store, verifier, metrics, clock)));
        Ok(Application {
            router: router(state.clone()),
            listener,
            state,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().unwrap_or_else(|_| self.state.config.listen)
    }

    /// Serves until `shutdown` resolves, then finishes in-flight requests and appends.
    pub async fn run_until_stopped(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let Application {
            listener,
            router,
            state,
        } = self;
        let forget_old_clients = {
            let state = state.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(60));
                loop {
                    tick.tick().await;
                    state.limiter.retain_recent();
                }
            })
        };
        let served = axum::serve(listener, router.into_make_service_with_connect_info::<SocketAddr>())
            .with_graceful_shutdown(shutdown)
            .await;
        forget_old_clients.abort();
        // Every request is answered; the writer drains whatever it still holds.
        let store = Arc::clone(&state.store);
        drop(state);
        if let Ok(store) = Arc::try_unwrap(store) {
            store.shutdown().await;
        }
        tracing::info!("command API stopped");
        served
    }
}

/// The full router with its layers.
pub fn router(state: AppState) -> Router {
    let request_id = HeaderName::from_static("x-request-id");
    let timeout = state.config.request_timeout;
    let body_limit = state.config.max_body_bytes;
    Router::new()
        .merge(routes::router())
        .route_layer(middleware::from_fn(telemetry::track_requests))
        .route("/healthz", get(system::healthz))
        .route("/readyz", get(system::readyz))
        .route("/metrics", get(system::metrics))
        .route("/openapi.json", get(system::openapi))
        .fallback(|| async { ApiError::NoRoute })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(middleware::from_fn_with_state(body_limit, read_whole_body))
        .layer(middleware::from_fn_with_state(timeout, time_limit))
        .layer(CatchPanicLayer::custom(|_| {
            ApiError::Internal("handler panicked".into()).into_response()
        }))
        .layer(PropagateRequestIdLayer::new(request_id.clone()))
        .layer(TraceLayer::new_for_http().make_span_with(telemetry::request_span))
        .layer(middleware::from_fn(telemetry::ensure_trace_context))
        .layer(SetRequestIdLayer::new(request_id, MakeRequestUuid))
        .with_state(state)
}

/// Reads the body before routing (see [`crate::body`]).
async fn read_whole_body(State(limit): State<usize>, request: Request, next: Next) -> Response {
    match body::read_whole_body(request, limit).await {
        Ok(request) => next.run(request).await,
        Err(BodyError::TooLarge { .. }) => body::closing(ApiError::PayloadTooLarge.into_response()),
        Err(error @ BodyError::Unreadable(_)) => body::closing(
            ApiError::BadRequest {
                code: "unreadable_body",
                detail: error.to_string(),
            }
            .into_response(),
        ),
    }
}

/// Answers 503 when a request takes longer than the limit. Its append may still commit;
/// a retry with the same Idempotency-Key returns that outcome.
async fn time_limit(State(limit): State<Duration>, request: Request, next: Next) -> Response {
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::Unavailable(format!("request took longer than {limit:?}")).into_response(),
    }
}
