//! What every handler shares.

use std::sync::Arc;

use domain::PricingTable;
use domain::device::DeviceState;
use domain::user::UserState;
use event_log::personal::PersonalDataKeys;
use event_log::{AppendBatch, AppendError, AppendOutcome, Clock, EventStore, LogReader};
use http_edge::auth::TokenVerifier;
use http_edge::rate_limit::ClientLimiter;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::aggregates::Slots;
use crate::config::{ApiConfig, AppendMode};

#[derive(Clone, Debug)]
pub struct AppState(pub Arc<Inner>);

#[derive(Debug)]
pub struct Inner {
    pub config: ApiConfig,
    pub store: Arc<EventStore>,
    pub reader: LogReader,
    /// Per-user data keys: personal fields are encrypted before they reach the log.
    pub personal: PersonalDataKeys,
    pub users: Slots<UserState>,
    pub devices: Slots<DeviceState>,
    pub pricing: PricingTable,
    pub verifier: TokenVerifier,
    pub limiter: ClientLimiter,
    pub metrics: PrometheusHandle,
    pub clock: Arc<dyn Clock>,
}

impl std::ops::Deref for AppState {
    type Target = Inner;

    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl Inner {
    pub fn new(
        config: ApiConfig,
        store: Arc<EventStore>,
        verifier: TokenVerifier,
        metrics: PrometheusHandle,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Inner {
            reader: LogReader::new(store.pool().clone()),
            personal: PersonalDataKeys::new(store.pool().clone(), config.master_keys.clone()),
            users: Slots::new(config.cached_aggregates),
            devices: Slots::new(config.cached_aggregates),
            pricing: PricingTable::standard(),
            limiter: ClientLimiter::new(config.rate_per_second, config.rate_burst),
            config,
            store,
            verifier,
            metrics,
            clock,
        }
    }

    pub async fn append(&self, batch: AppendBatch) -> Result<AppendOutcome, AppendError> {
        let events: usize = batch.streams.iter().map(|s| s.events.len()).sum();
        let outcome = match self.config.append_mode {
            AppendMode::GroupCommit => self.store.append(batch).await,
            AppendMode::Unbatched => self.store.append_unbatched(batch).await,
        };
        // In the request's span: its trace id leads from here to the relay and the projectors.
        if let Ok(outcome) = &outcome {
            if outcome.replayed {
                metrics::counter!(crate::telemetry::IDEMPOTENT_REPLAYS_TOTAL).increment(1);
            }
            tracing::debug!(
                events,
                last_position = outcome.last_position,
                replayed = outcome.replayed,
                "events appended"
            );
        }
        outcome
    }
}
