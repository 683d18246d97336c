//! What every handler and extractor shares: the configuration, the schema, the read sources,
//! the cache, the executor, the token verifier, the rate limiter and the subscriptions' hub.

use std::sync::Arc;

use event_log::personal::MasterKeyring;
use http_edge::auth::TokenVerifier;
use http_edge::rate_limit::ClientLimiter;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::cache::{CacheEpoch, CacheKey, ResponseCache};
use crate::config::QueryApiConfig;
use crate::documents::ReadDocuments;
use crate::executor::Executor;
use crate::graphql::handler::Computed;
use crate::graphql::{DashboardSchema, build_schema};
use crate::persisted::PersistedQueries;
use crate::safelist::Safelist;
use crate::single_flight::SingleFlight;
use crate::sources::ReadSources;
use crate::subscriptions::hub::Hub;

pub(crate) type AppState = Arc<Inner>;

/// Memory for documents already read: thousands of dashboard documents, and a flood of
/// distinct ones pushes out only documents.
const READ_DOCUMENTS_MAX_BYTES: u64 = 32 * 1024 * 1024;

pub(crate) struct Inner {
    pub(crate) config: QueryApiConfig,
    pub(crate) schema: DashboardSchema,
    pub(crate) sources: ReadSources,
    pub(crate) master_keys: Arc<MasterKeyring>,
    pub(crate) cache: Option<ResponseCache>,
    /// Cache misses being computed: a key asked again meanwhile waits for the first.
    pub(crate) computing: SingleFlight<CacheKey, Computed>,
    pub(crate) epoch: CacheEpoch,
    pub(crate) persisted: PersistedQueries,
    /// Documents already parsed, measured and normalized, by text.
    pub(crate) documents: ReadDocuments,
    /// With a safelist only its documents run (and persisted queries are not registered).
    pub(crate) safelist: Option<Arc<Safelist>>,
    pub(crate) executor: Executor,
    pub(crate) verifier: TokenVerifier,
    pub(crate) limiter: ClientLimiter,
    pub(crate) metrics: PrometheusHandle,
    /// Subscriptions: their groups, pending changes and sockets.
    pub(crate) live: Arc<Hub>,
}

impl Inner {
    /// Builds the schema, the cache and the rest from `config`; fails only when the
    /// executor's threads cannot be started.
    pub(crate) fn new(
        config: QueryApiConfig,
        sources: ReadSources,
        verifier: TokenVerifier,
        metrics: PrometheusHandle,
    ) -> std::io::Result<Self> {
        Ok(Inner {
            limiter: ClientLimiter::new(config.rate_per_second, config.rate_burst),
            live: Arc::new(Hub::new(config.live)),
            schema: build_schema(&config.limits, config.introspection),
            cache: (config.cache_max_bytes > 0).then(|| ResponseCache::new(config.cache_max_bytes)),
            computing: SingleFlight::new(crate::cache::metrics_names::WAITING),
            epoch: CacheEpoch::new(config.cache_staleness),
            persisted: PersistedQueries::new(config.persisted_queries),
            documents: ReadDocuments::new(READ_DOCUMENTS_MAX_BYTES),
            safelist: config.safelist.clone(),
            executor: Executor::for_this_machine(config.executor_nice)?,
            master_keys: Arc::clone(&config.master_keys),
            sources,
            verifier,
            metrics,
            config,
        })
    }
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueryApi")
            .field("config", &self.config)
            .field("sources", &self.sources)
            .finish_non_exhaustive()
    }
}
