//! The query API service, built and bound ([`QueryApi::build`]) and served until stopped
//! ([`QueryApi::run_until_stopped`]) with its background work: replica health checks,
//! watermarks, forgetting idle clients' rate buckets, the subscriptions' change listener and
//! evaluation rounds.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_edge::auth::{KeyError, TokenVerifier};
use metrics_exporter_prometheus::PrometheusHandle;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::QueryApiConfig;
use crate::routes;
use crate::sources::ReadSources;
use crate::state::{AppState, Inner};

pub use crate::reply::metrics_names;

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("token keys: {0}")]
    Keys(#[from] KeyError),
    #[error("invalid replica URL: {0}")]
    Replica(#[from] sqlx::Error),
    #[error("cannot start the GraphQL executor's threads: {0}")]
    Executor(#[source] std::io::Error),
}

/// The query API, bound and ready to serve.
#[derive(Debug)]
pub struct QueryApi {
    listener: TcpListener,
    state: AppState,
}

impl QueryApi {
    /// Binds `config.listen` (port 0 picks a free port; see [`QueryApi::local_addr`]).
    /// `primary` should be a pool of its own: reads must not queue behind appends. It must not
    /// outlive this API either: connections it opens on the API's executor threads belong to
    /// that runtime and fail once it has stopped.
    pub async fn build(
        config: QueryApiConfig,
        primary: PgPool,
        metrics: PrometheusHandle,
    ) -> Result<Self, StartupError> {
        metrics::describe_counter!(
            event_log::metrics_names::EXPORT_EVENTS_TOTAL,
            "Events written into audit exports"
        );
        let verifier = TokenVerifier::new(&config.keys)?.with_max_lifetime(config.max_token_lifetime);
        let sources = ReadSources::new(primary, &config.replica_urls, config.sources.clone())?;
        let listener = http_edge::connections::bind(config.listen).map_err(|source| StartupError::Bind {
            addr: config.listen,
            source,
        })?;
        let state = Arc::new(Inner::new(config, sources, verifier, metrics).map_err(StartupError::Executor)?);
        Ok(QueryApi { listener, state })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().unwrap_or_else(|_| self.state.config.listen)
    }

    pub fn sources(&self) -> &ReadSources {
        &self.state.sources
    }

    /// Serves until `shutdown` resolves, then finishes in-flight queries.
    pub async fn run_until_stopped(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let QueryApi { listener, state } = self;
        let stop = CancellationToken::new();
        // Probe before the first request, so replicas that are up serve from the start.
        state.sources.check_health().await;
        state.sources.refresh_watermarks().await;
        let health = state
            .sources
            .spawn_health_checks(state.config.health_interval, stop.clone());
        let watermarks = state
            .sources
            .spawn_watermarks(state.config.watermark_interval, stop.clone());
        let forget_old_clients = {
            let state = Arc::clone(&state);
            let stop = stop.clone();
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        () = stop.cancelled() => break,
                        () = tokio::time::sleep(Duration::from_secs(60)) => state.limiter.retain_recent(),
                    }
                }
            })
        };
        let listening = tokio::spawn(crate::subscriptions::listener::follow_changes(
            Arc::clone(&state.live),
            state.sources.primary().clone(),
        ));
        // Evaluations run on the executor's threads (each one's work is sent there); the
        // rounds only wait.
        let rounds = tokio::spawn(Arc::clone(&state.live).run_rounds(Arc::clone(&state)));
        // Sockets close as soon as shutdown begins, not after the requests in flight.
        let live = Arc::clone(&state.live);
        let shutdown = async move {
            shutdown.await;
            live.closing.cancel();
        };
        let limits = state.config.connections;
        // The connections are served on the executor's threads (registered with its reactor,
        // so the listener moves there too): a flood of requests occupies those, never the
        // threads the command API and the projectors run on in `cloudphone serve`.
        let listener = listener.into_std()?;
        let serving = state.executor.spawn({
            let router = routes::router(Arc::clone(&state));
            async move {
                let listener = tokio::net::TcpListener::from_std(listener)?;
                http_edge::connections::serve(listener, router, limits, "query", shutdown).await
            }
        });
        let served = serving.await.unwrap_or_else(|error| Err(std::io::Error::other(error)));
        stop.cancel();
        state.live.closing.cancel();
        state.live.sockets.close();
        if tokio::time::timeout(Duration::from_secs(5), state.live.sockets.wait())
            .await
            .is_err()
        {
            tracing::warn!("subscription sockets still open 5 s after shutdown; dropping them");
        }
        let _ = tokio::join!(health, watermarks, forget_old_clients, listening, rounds);
        // The dashboards' connections end with a goodbye to the server, not a dropped socket.
        for (_, pool) in state.sources.read_pools() {
            pool.close().await;
        }
        tracing::info!("query API stopped");
        served
    }
}
