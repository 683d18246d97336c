//! The Cloudphone event log on PostgreSQL: the source of truth every other part trusts.
//!
//! - [`EventStore`] appends: one or more streams per batch, all or nothing, with optimistic
//!   concurrency per stream (`ExpectedVersion`), idempotency keys, and group commit (one
//!   writer task coalesces concurrent appends into few transactions).
//! - [`LogReader`] reads by stream, by global position, by owner and time range, and verifies
//!   the hash chain; it works on the primary or a replica. [`LogTail`] follows the log.
//! - [`migrate()`] applies `partitions.sql` and the migrations; [`partitions`] keeps monthly
//!   partitions ahead and archives sealed months. Stored events are append-only: triggers
//!   refuse UPDATE, DELETE and TRUNCATE (`event-log/migrations/0005_append_only_log.sql`).
//! - [`history`] streams the history out for auditors in the [`export`] file format, which
//!   [`export::verify_export`] checks; [`personal`] keeps per-user data keys so personal
//!   fields are stored encrypted and a user can be erased by destroying their key.
//! - [`pooler`] tells whether a connection keeps a session of its own or goes through a
//!   transaction pooler (PgBouncer), where session locks, `LISTEN` and settings do not hold.
//!
//! # Why no reader ever skips an event
//!
//! Positions from a sequence are handed out at insert time but become visible at commit time,
//! and transactions commit in any order: a reader that saw 101 before 100 committed would move
//! past 100 forever. Here every append transaction first takes the row lock on the single
//! `log_head` row (`SELECT ... FOR UPDATE`), assigns positions `head + 1 ..` itself, and holds
//! the lock until COMMIT. PostgreSQL makes a committed transaction visible before it releases
//! its locks, so the next writer can only assign positions after the previous writer's rows
//! are visible; hence positions become visible in order, on the primary and, because commit
//! records replay in WAL order, on every replica. A snapshot that sees position N sees every
//! position below N. A rolled-back transaction never advanced `log_head`, so positions are
//! dense: 1, 2, 3, ... with no gaps at all, and a reader never waits on a hole.
//!
//! The price is that appends are serialised. Group commit pays it back: the lock is taken
//! once per group of hundreds of appends, not once per append, and the hash chain (which is
//! serial by nature) costs nothing extra. The `xid8`/`pg_snapshot_xmin` alternative allows
//! parallel writers but leaves gaps, makes readers wait behind the oldest open transaction,
//! and still needs serialising for the hash chain.
//!
//! The transactional outbox relay that publishes what was committed to Kafka lives in
//! `kafka-adapters`; its checkpoint table is migrated here, with the log.
//!
//! This crate must never decide business rules (that is `domain`), and never link a Kafka
//! client or publish inside an append: the relay publishes what was committed.

mod append;
pub mod chain;
pub mod clock;
pub mod db_error;
pub mod erasure_ledger;
pub mod export;
pub mod history;
pub mod idempotency;
mod migrate;
pub mod partitions;
pub mod personal;
pub mod pooler;
mod read;
pub mod server;
mod tail;
mod writer;

pub use append::{
    AppendBatch, AppendError, AppendLimits, AppendOutcome, ExpectedVersion, IdempotencyKey, InvalidEvent, NewEvent,
    StreamAppend, StreamRevision,
};
pub use chain::{ChainBreak, ChainVerifier};
pub use clock::{Clock, ManualClock, SystemClock};
pub use migrate::{
    DEFAULT_PARTITIONS_AHEAD, MigrateError, PARTITIONS_SQL, PING_IDLE_AFTER, applied_versions,
    create_database_if_missing, migrate, migrator, pool_options,
};
pub use read::{ChainReport, LogHead, LogReader, LoggedPayload, ReadError, StreamInfo};
pub use tail::{LogTail, NOTIFY_CHANNEL, TailConfig, tail_session_options};
pub use writer::{EventStore, StoreConfig};

/// Names of the metrics this crate records (Prometheus conventions: units as suffixes).
pub mod metrics_names {
    /// Histogram: seconds one group commit took, from BEGIN to COMMIT.
    pub const APPEND_GROUP_SECONDS: &str = "cloudphone_append_group_seconds";
    /// Histogram: appends (batches) per group commit.
    pub const APPEND_GROUP_BATCHES: &str = "cloudphone_append_group_batches";
    /// Counter: events committed.
    pub const APPEND_EVENTS_TOTAL: &str = "cloudphone_append_events_total";
    /// Counter: appends refused for a wrong expected version, type or owner.
    pub const APPEND_CONFLICTS_TOTAL: &str = "cloudphone_append_conflicts_total";
    /// Counter: appends answered from a stored idempotency outcome.
    pub const APPEND_IDEMPOTENT_REPLAYS_TOTAL: &str = "cloudphone_append_idempotent_replays_total";
    /// Counter: events written into audit exports (HTTP and `cloudphone export`).
    pub const EXPORT_EVENTS_TOTAL: &str = "cloudphone_export_events_total";
    /// Counter: idempotency keys deleted after their retention.
    pub const IDEMPOTENCY_KEYS_EXPIRED_TOTAL: &str = "cloudphone_idempotency_keys_expired_total";
    /// Gauge: consecutive months after the current one with a live partition (alert below 1).
    pub const PARTITION_MONTHS_AHEAD: &str = "cloudphone_partition_months_ahead";
    /// Gauge: partitions of the log, by `state` (`live` or `archived`).
    pub const PARTITIONS: &str = "cloudphone_partitions";
    /// Counter: partition maintenance passes, by `outcome` (`ok` or `error`).
    pub const PARTITION_MAINTENANCE_RUNS_TOTAL: &str = "cloudphone_partition_maintenance_runs_total";
    /// Gauge: unix seconds of the last successful partition maintenance pass.
    pub const PARTITION_MAINTENANCE_LAST_SUCCESS_TIMESTAMP_SECONDS: &str =
        "cloudphone_partition_maintenance_last_success_timestamp_seconds";
    /// Counter: partitions created by maintenance.
    pub const PARTITIONS_CREATED_TOTAL: &str = "cloudphone_partitions_created_total";
    /// Counter: partitions moved to the archive by maintenance.
    pub const PARTITIONS_ARCHIVED_TOTAL: &str = "cloudphone_partitions_archived_total";
}
use metrics_names as m;
