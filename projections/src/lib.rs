//! Cloudphone projections: the read models dashboards query, built from the event log.
//!
//! - [`fleet`]: `devices` (one row per device) and `device_stats` (per user, status and
//!   provider), one projection, one checkpoint; from version 2 also [`users`] and the fleet's
//!   size by status over time (net changes per user, hour and status).
//! - [`usage`]: `daily_usage` (per UTC day, user and device; sessions over midnight split).
//! - [`apply`]: a batch of events applied to a projection; [`checkpoint`] moves in the same
//!   transaction, so a crash or a redelivery never counts an event twice.
//! - [`dead_letters`]: retrying a parked event once its cause is fixed (exactly once, in log
//!   order, refused where it would fold out of order), or skipping it with a reason.
//! - [`replay`]: rebuilding a version from the whole log beside the live one and swapping it
//!   in (`cloudphone replay`). The tables' shape (rows, versions, status) is `read-models`'.
//! - [`runner`]: the embedded projector that follows the PostgreSQL log directly (the
//!   scale-out projector consuming the relay's topic is in `kafka-adapters`, over [`apply`]).
//!
//! This crate must never write the event log, never decide business rules (it only folds
//! committed events into tables that can always be rebuilt from the log), and never link a
//! Kafka client.

pub mod apply;
pub mod checkpoint;
pub mod dead_letters;
pub mod fleet;
pub mod rebuild;
pub mod replay;
pub mod runner;
pub mod usage;
pub mod users;

/// Names of the metrics projectors record.
pub mod metrics_names {
    /// Gauge: global position applied, per projection.
    pub const PROJECTION_POSITION: &str = "cloudphone_projection_position";
    /// Gauge: events committed and not yet applied, per projection.
    pub const PROJECTION_LAG_EVENTS: &str = "cloudphone_projection_lag_events";
    /// Gauge: seconds since the last applied event was committed, per projection.
    pub const PROJECTION_LAG_SECONDS: &str = "cloudphone_projection_lag_seconds";
    /// Counter: events applied (or skipped), per projection.
    pub const PROJECTION_EVENTS_TOTAL: &str = "cloudphone_projection_events_total";
    /// Histogram: events per applied batch.
    pub const PROJECTION_BATCH_EVENTS: &str = "cloudphone_projection_batch_events";
    /// Histogram: seconds one batch took to apply and commit.
    pub const PROJECTION_BATCH_SECONDS: &str = "cloudphone_projection_batch_seconds";
    /// Counter: events of unknown types skipped.
    pub const PROJECTION_SKIPPED_TOTAL: &str = "cloudphone_projection_skipped_total";
    /// Counter: events parked in the dead-letter table.
    pub const PROJECTION_DEAD_LETTERS_TOTAL: &str = "cloudphone_projection_dead_letters_total";
    /// Counter: batches (and parts of batches) the database refused (see
    /// `apply::apply_events`): applied again in halves, a refused single event parked.
    pub const PROJECTION_BATCHES_REFUSED_TOTAL: &str = "cloudphone_projection_batches_refused_total";
    /// Gauge: dead letters of a projection still pending (neither retried nor skipped).
    pub const PROJECTION_DEAD_LETTERS_PENDING: &str = "cloudphone_projection_dead_letters_pending";
    /// Gauge: position a replay's rebuild has reached, per projection.
    pub const REPLAY_POSITION: &str = "cloudphone_replay_position";
    /// Gauge: position a replay is heading for (the head at its start; the head while tailing).
    pub const REPLAY_TARGET_POSITION: &str = "cloudphone_replay_target_position";
    /// Counter: events a replay's bulk phase read.
    pub const REPLAY_EVENTS_TOTAL: &str = "cloudphone_replay_events_total";
    /// Gauge: log positions per second a replay's bulk phase folds.
    pub const REPLAY_EVENTS_PER_SECOND: &str = "cloudphone_replay_events_per_second";
    /// Counter: versions swapped in.
    pub const REPLAY_SWAPS_TOTAL: &str = "cloudphone_replay_swaps_total";
    /// Histogram: seconds a swap transaction took (live tables locked meanwhile).
    pub const REPLAY_SWAP_SECONDS: &str = "cloudphone_replay_swap_seconds";
}

pub use rebuild::{fold_log, fold_users_and_history};
