//! Building the application: the router with its layers, bound to a port.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use event_log::erasure_ledger::{self, LedgerError};
use event_log::{Clock, EventStore, StoreConfig, SystemClock};
use http_edge::auth::{KeyError, TokenVerifier};
use http_edge::body::BodyError;
use http_edge::connections;
use http_edge::layers::{BodyLimits, EdgeAnswers, with_edge_layers};
use http_edge::problem::EdgeError;
use metrics_exporter_prometheus::PrometheusHandle;
use sqlx::PgPool;
use tokio::net::TcpListener;

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
    #[error("cannot reapply the erasure ledger: {0}")]
    ErasureLedger(#[from] LedgerError),
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
        let verifier = TokenVerifier::new(&config.keys)?.with_max_lifetime(config.max_token_lifetime);
        telemetry::describe_metrics();
        if let Some(ledger) = &config.erasure_ledger {
            reapply_erasures(ledger.path(), &store).await?;
        }
        let listener = connections::bind(config.listen).map_err(|source| StartupError::Bind {
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
        let served = connections::serve(listener, router, state.config.connections, "command", shutdown).await;
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

/// Before serving: every erasure the ledger holds is applied to the database, which a
/// restore may have taken back to before some of them (idempotent; a no-op normally).
async fn reapply_erasures(path: &std::path::Path, store: &EventStore) -> Result<(), LedgerError> {
    let owned = path.to_owned();
    let contents = tokio::task::spawn_blocking(move || erasure_ledger::read(&owned))
        .await
        .map_err(|join| LedgerError::Io {
            path: path.to_owned(),
            source: std::io::Error::other(join.to_string()),
        })??;
    if !contents.unreadable_lines.is_empty() {
        tracing::error!(ledger = %path.display(), lines = ?contents.unreadable_lines, "erasure ledger lines that do not parse");
    }
    let report = erasure_ledger::reapply(store.pool(), &contents.users()).await?;
    if report.changed() {
        tracing::warn!(
            ledger = %path.display(),
            users = report.users,
            reshredded = report.reshredded,
            tombstoned = report.tombstoned,
            "erasures missing from the database (restored from a backup?) reapplied from the ledger"
        );
    } else {
        tracing::info!(ledger = %path.display(), users = report.users, "every erasure in the ledger is in the database");
    }
    Ok(())
}

/// The full router with its layers.
pub fn router(state: AppState) -> Router {
    let timeout = state.config.request_timeout;
    let body = BodyLimits {
        max_bytes: state.config.max_body_bytes,
        timeout: state.config.connections.body_read_timeout,
    };
    let routed = Router::new()
        .merge(routes::router())
        .route_layer(middleware::from_fn(http_edge::telemetry::track_requests))
        .route("/healthz", get(system::healthz))
        .route("/readyz", get(system::readyz))
        .route("/metrics", get(system::metrics))
        .route("/openapi.json", get(system::openapi))
        .fallback(|| async { EdgeError::NoRoute })
        .method_not_allowed_fallback(|| async { EdgeError::MethodNotAllowed })
        // The handler's time limit starts once the body is in: a slow body is the client's
        // (408, by the body read timeout), a slow answer the server's (503).
        .layer(middleware::from_fn_with_state(timeout, time_limit));
    let cors = state.config.cors_origins.clone();
    http_edge::cors::with_cors(with_edge_layers(routed, body, ProblemAnswers), &cors).with_state(state)
}

/// The command API answers what its edge refuses with problem documents.
#[derive(Debug, Clone, Copy)]
struct ProblemAnswers;

impl EdgeAnswers for ProblemAnswers {
    fn body_refused(&self, error: &BodyError) -> Response {
        match error {
            BodyError::TooLarge { .. } => EdgeError::PayloadTooLarge,
            BodyError::TimedOut(_) => EdgeError::BodyTimeout(error.to_string()),
            BodyError::Unreadable(_) => EdgeError::bad_request("unreadable_body", error.to_string()),
        }
        .into_response()
    }

    fn panicked(&self) -> Response {
        EdgeError::Internal("handler panicked".into()).into_response()
    }
}

/// Answers 503 when a request takes longer than the limit. Its append may still commit;
/// a retry with the same Idempotency-Key returns that outcome.
async fn time_limit(State(limit): State<Duration>, request: Request, next: Next) -> Response {
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::unavailable(format!("request took longer than {limit:?}")).into_response(),
    }
}
