//! Monthly partitions of `user_events`: keep them ahead of time, list them, move sealed
//! months to the archive. The SQL functions live in `partitions.sql` at the repository root.
//!
//! [`maintain`] is one maintenance pass (create the months ahead, archive the months past
//! the retention) with the time passed in; [`run_partition_maintenance`] runs it at start
//! and then periodically in the command API, and records the `cloudphone_partition*`
//! metrics alerts watch.

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Datelike, Months, NaiveDate, TimeZone, Utc};
use sqlx::{PgExecutor, PgPool, Row};
use tokio_util::sync::CancellationToken;

use crate::metrics_names as m;

/// A month as a single ordinal (`year * 12 + month0`), for cheap comparisons.
fn month_key(at: DateTime<Utc>) -> i32 {
    at.year() * 12 + at.month0() as i32
}

/// Creates the partitions for the month holding `at` and `months_ahead` months after it.
/// Idempotent and safe under concurrent callers; returns how many it created.
pub async fn ensure_partitions(pool: &PgPool, at: DateTime<Utc>, months_ahead: u32) -> Result<i32, sqlx::Error> {
    sqlx::query_scalar("SELECT ensure_user_event_partitions($1, $2)")
        .bind(at)
        .bind(i32::try_from(months_ahead).unwrap_or(i32::MAX))
        .fetch_one(pool)
        .await
}

/// One monthly partition, live or archived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionInfo {
    pub name: String,
    /// First day of the month it holds (UTC).
    pub month: NaiveDate,
    /// True once moved to `user_events_archive`.
    pub archived: bool,
    /// The planner's row estimate (`pg_class.reltuples`); -1 before the first ANALYZE.
    pub estimated_rows: i64,
    pub total_bytes: i64,
}

/// Every partition of `user_events` and of the archive, oldest month first.
pub async fn list_partitions<'c>(executor: impl PgExecutor<'c>) -> Result<Vec<PartitionInfo>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT c.relname::text AS name, p.relname = 'user_events_archive' AS archived,
                c.reltuples::bigint AS estimated_rows, pg_total_relation_size(c.oid) AS total_bytes
         FROM pg_inherits i
         JOIN pg_class c ON c.oid = i.inhrelid
         JOIN pg_class p ON p.oid = i.inhparent
         WHERE p.oid IN ('user_events'::regclass, 'user_events_archive'::regclass)
         ORDER BY c.relname",
    )
    .fetch_all(executor)
    .await?;
    let mut partitions = Vec::with_capacity(rows.len());
    for row in rows {
        let name: String = row.try_get("name")?;
        // Names are made by ensure_user_event_partitions: user_events_YYYY_MM.
        let Some(month) = name
            .strip_prefix("user_events_")
            .and_then(|ym| NaiveDate::parse_from_str(&format!("{ym}_01"), "%Y_%m_%d").ok())
        else {
            continue;
        };
        partitions.push(PartitionInfo {
            name,
            month,
            archived: row.try_get("archived")?,
            estimated_rows: row.try_get("estimated_rows")?,
            total_bytes: row.try_get("total_bytes")?,
        });
    }
    Ok(partitions)
}

/// How many whole months after the one holding `now` have a live partition, counting
/// consecutively (the gauge an alert watches: 0 means next month's appends would need one
/// created on the spot).
pub fn months_provisioned_ahead(partitions: &[PartitionInfo], now: DateTime<Utc>) -> u32 {
    let live: BTreeSet<i32> = partitions
        .iter()
        .filter(|p| !p.archived)
        .map(|p| p.month.year() * 12 + p.month.month0() as i32)
        .collect();
    let current = month_key(now);
    (1..).take_while(|ahead| live.contains(&(current + ahead))).count() as u32
}

/// Why a month could not be archived.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("no partition for {0}")]
    NoSuchPartition(NaiveDate),
    #[error("{0}")]
    StillOpen(String),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// Moves the month holding `month` from `user_events` to `user_events_archive` (a no-op if it
/// is archived already). Reads through `user_events_all` keep reaching it.
pub async fn archive_partition<'c>(executor: impl PgExecutor<'c>, month: NaiveDate) -> Result<String, ArchiveError> {
    let result = sqlx::query_scalar("SELECT archive_user_event_partition($1)")
        .bind(month)
        .fetch_one(executor)
        .await;
    match result {
        Ok(name) => Ok(name),
        Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("42P01") => {
            Err(ArchiveError::NoSuchPartition(month))
        }
        Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("55000") => {
            Err(ArchiveError::StillOpen(db.message().to_owned()))
        }
        Err(error) => Err(ArchiveError::Database(error)),
    }
}

/// What partition maintenance keeps true.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionPolicy {
    /// Months after the current one that must have a live partition.
    pub months_ahead: u32,
    /// Move a live month to the archive once it ended more than this many months before
    /// now; `None` never archives.
    pub retention_months: Option<u32>,
}

impl Default for PartitionPolicy {
    fn default() -> Self {
        PartitionPolicy {
            months_ahead: crate::DEFAULT_PARTITIONS_AHEAD,
            retention_months: None,
        }
    }
}

/// What one [`maintain`] pass did, and the state it left.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MaintenanceReport {
    /// Partitions this pass created.
    pub created: u32,
    /// Partitions this pass moved to the archive, oldest first.
    pub archived: Vec<String>,
    /// Months past the retention that stay live because the log has not moved past them yet
    /// (`archive_user_event_partition` refuses them: an append could still land there).
    /// The next pass tries again.
    pub still_open: Vec<String>,
    /// Another instance was archiving at the same moment, so this pass archived nothing.
    pub archive_skipped: bool,
    /// Consecutive months after the current one with a live partition, after the pass.
    pub months_ahead: u32,
    /// Partitions attached to `user_events` after the pass.
    pub live_partitions: usize,
    /// Partitions in `user_events_archive` after the pass.
    pub archived_partitions: usize,
}

/// Why a maintenance pass stopped.
#[derive(Debug, thiserror::Error)]
pub enum MaintenanceError {
    #[error("cannot create the partitions ahead: {0}")]
    Ensure(#[source] sqlx::Error),
    #[error("cannot archive {month}: {source}")]
    Archive {
        month: NaiveDate,
        #[source]
        source: ArchiveError,
    },
    #[error("database error during partition maintenance: {0}")]
    Database(#[from] sqlx::Error),
}

/// Serialises archiving between instances (every command API runs maintenance), so a month
/// is archived, and counted, by one of them.
const ARCHIVE_LOCK: &str = "cloudphone.user_events.archive";

/// One maintenance pass at `now`: creates the partitions of the current month and
/// `policy.months_ahead` months after it, then, with a retention, archives every live month
/// that ended more than `retention_months` months before `now`. Idempotent, and safe while
/// appends run and while other instances maintain the same database.
pub async fn maintain(
    pool: &PgPool,
    now: DateTime<Utc>,
    policy: &PartitionPolicy,
) -> Result<MaintenanceReport, MaintenanceError> {
    let created = ensure_partitions(pool, now, policy.months_ahead)
        .await
        .map_err(MaintenanceError::Ensure)?;
    let mut report = MaintenanceReport {
        created: u32::try_from(created).unwrap_or(0),
        ..MaintenanceReport::default()
    };
    if let Some(retention) = policy.retention_months {
        archive_expired(pool, now, retention, &mut report).await?;
    }
    let partitions = list_partitions(pool).await?;
    report.months_ahead = months_provisioned_ahead(&partitions, now);
    report.live_partitions = partitions.iter().filter(|p| !p.archived).count();
    report.archived_partitions = partitions.len() - report.live_partitions;
    Ok(report)
}

/// Archives the live months past the retention, oldest first, under [`ARCHIVE_LOCK`]; if
/// another instance holds it, leaves the work to that one.
async fn archive_expired(
    pool: &PgPool,
    now: DateTime<Utc>,
    retention_months: u32,
    report: &mut MaintenanceReport,
) -> Result<(), MaintenanceError> {
    // One transaction with a transaction-scoped lock: nothing outlives it, also behind
    // PgBouncer in transaction mode (where a session lock would stay on a server connection).
    let mut tx = pool.begin().await?;
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock(hashtext($1))")
        .bind(ARCHIVE_LOCK)
        .fetch_one(&mut *tx)
        .await?;
    if !locked {
        report.archive_skipped = true;
        return Ok(());
    }
    // Listed under the lock, so a month another instance archived is not archived (and
    // counted) again.
    let due: Vec<NaiveDate> = list_partitions(&mut *tx)
        .await?
        .into_iter()
        .filter(|p| !p.archived && past_retention(p.month, now, retention_months))
        .map(|p| p.month)
        .collect();
    let mut archived = Vec::new();
    for month in due {
        // A savepoint per month: a month that cannot be archived yet leaves the others be.
        let mut attempt = sqlx::Acquire::begin(&mut *tx).await?;
        match archive_partition(&mut *attempt, month).await {
            Ok(name) => {
                attempt.commit().await?;
                archived.push(name);
            }
            Err(ArchiveError::StillOpen(_)) => report.still_open.push(partition_name(month)),
            // Dropped by an operator since the listing: nothing left to archive.
            Err(ArchiveError::NoSuchPartition(_)) => {}
            Err(source) => return Err(MaintenanceError::Archive { month, source }),
        }
    }
    tx.commit().await?;
    report.archived.extend(archived);
    Ok(())
}

/// Whether the month starting at `month` ended more than `retention_months` months before
/// `now`.
fn past_retention(month: NaiveDate, now: DateTime<Utc>, retention_months: u32) -> bool {
    month
        .checked_add_months(Months::new(retention_months.saturating_add(1)))
        .and_then(|limit| limit.and_hms_opt(0, 0, 0))
        .is_some_and(|limit| limit.and_utc() < now)
}

fn partition_name(month: NaiveDate) -> String {
    format!("user_events_{}", month.format("%Y_%m"))
}

/// How a maintenance loop went, returned when it stops.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MaintenanceTotals {
    pub runs: u64,
    pub failures: u64,
}

/// Runs [`maintain`] at start and then every `interval` until `stop` is cancelled. A failed
/// pass is logged and counted, never fatal: the next one tries again. Records the
/// `cloudphone_partition*` metrics (see [`crate::metrics_names`]).
pub async fn run_partition_maintenance(
    pool: PgPool,
    policy: PartitionPolicy,
    interval: Duration,
    stop: CancellationToken,
) -> MaintenanceTotals {
    describe_metrics();
    let interval = interval.max(Duration::from_millis(10));
    let mut totals = MaintenanceTotals::default();
    loop {
        let pass = tokio::select! {
            () = stop.cancelled() => break,
            pass = maintain(&pool, Utc::now(), &policy) => pass,
        };
        totals.runs += 1;
        match pass {
            Ok(report) => record(&report),
            Err(error) => {
                totals.failures += 1;
                metrics::counter!(m::PARTITION_MAINTENANCE_RUNS_TOTAL, "outcome" => "error").increment(1);
                tracing::warn!(%error, retry_in = ?interval, "partition maintenance failed; retrying later");
            }
        }
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(interval) => {}
        }
    }
    totals
}

fn record(report: &MaintenanceReport) {
    metrics::counter!(m::PARTITION_MAINTENANCE_RUNS_TOTAL, "outcome" => "ok").increment(1);
    metrics::gauge!(m::PARTITION_MAINTENANCE_LAST_SUCCESS_TIMESTAMP_SECONDS)
        .set(Utc::now().timestamp_millis() as f64 / 1000.0);
    metrics::gauge!(m::PARTITION_MONTHS_AHEAD).set(f64::from(report.months_ahead));
    metrics::gauge!(m::PARTITIONS, "state" => "live").set(report.live_partitions as f64);
    metrics::gauge!(m::PARTITIONS, "state" => "archived").set(report.archived_partitions as f64);
    metrics::counter!(m::PARTITIONS_CREATED_TOTAL).increment(u64::from(report.created));
    metrics::counter!(m::PARTITIONS_ARCHIVED_TOTAL).increment(report.archived.len() as u64);
    if report.created > 0 || !report.archived.is_empty() {
        tracing::info!(
            created = report.created,
            archived = ?report.archived,
            months_ahead = report.months_ahead,
            "partition maintenance"
        );
    }
    if !report.still_open.is_empty() {
        tracing::debug!(still_open = ?report.still_open, "months past the retention stay live: the log has not moved past them");
    }
}

fn describe_metrics() {
    use metrics::{Unit, describe_counter, describe_gauge};
    describe_gauge!(
        m::PARTITION_MONTHS_AHEAD,
        "Consecutive months after the current one with a live partition of the log"
    );
    describe_gauge!(m::PARTITIONS, "Partitions of the log, by state (live or archived)");
    describe_counter!(
        m::PARTITION_MAINTENANCE_RUNS_TOTAL,
        "Partition maintenance passes, by outcome (ok or error)"
    );
    describe_gauge!(
        m::PARTITION_MAINTENANCE_LAST_SUCCESS_TIMESTAMP_SECONDS,
        Unit::Seconds,
        "Unix time of the last successful partition maintenance pass"
    );
    describe_counter!(
        m::PARTITIONS_CREATED_TOTAL,
        "Partitions of the log created by maintenance"
    );
    describe_counter!(
        m::PARTITIONS_ARCHIVED_TOTAL,
        "Partitions of the log moved to the archive by maintenance"
    );
}

/// The writer's memory of which months have partitions, so the common case (the current
/// month) costs no round trip.
#[derive(Debug)]
pub(crate) struct PartitionCache {
    months_ahead: u32,
    ensured: Mutex<BTreeSet<i32>>,
}

impl PartitionCache {
    pub(crate) fn new(months_ahead: u32) -> Self {
        PartitionCache {
            months_ahead,
            ensured: Mutex::new(BTreeSet::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeSet<i32>> {
        self.ensured.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Makes sure the month holding `at` (and the months ahead) has a partition.
    pub(crate) async fn ensure_covering(&self, pool: &PgPool, at: DateTime<Utc>) -> Result<(), sqlx::Error> {
        let key = month_key(at);
        if self.lock().contains(&key) {
            return Ok(());
        }
        let created = ensure_partitions(pool, at, self.months_ahead).await?;
        if created > 0 {
            tracing::info!(created, %at, "created user_events partitions");
        }
        let mut ensured = self.lock();
        for ahead in 0..=self.months_ahead as i32 {
            ensured.insert(key + ahead);
        }
        Ok(())
    }

    /// Forgets everything, after the database said a partition is missing after all.
    pub(crate) fn forget(&self) {
        self.lock().clear();
    }
}

/// The first instant of the month holding `at`, in UTC.
pub fn month_start(at: DateTime<Utc>) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(at.year(), at.month(), 1, 0, 0, 0)
        .single()
        .unwrap_or(at)
}

#[cfg(test)]
mod tests {
    use chrono::{NaiveDate, TimeZone, Utc};

    use super::past_retention;

    fn day(y: i32, m: u32, d: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(y, m, d).unwrap_or_default()
    }

    #[test]
    fn a_month_is_past_the_retention_once_it_ended_that_many_months_ago() {
        let january = day(2034, 1, 1);
        let at = |y, m, d| Utc.with_ymd_and_hms(y, m, d, 0, 0, 1).single().unwrap_or_default();
        // Ended on February 1st; with three months' retention, due after May 1st.
        assert!(!past_retention(january, at(2034, 4, 30), 3));
        assert!(past_retention(january, at(2034, 5, 1), 3));
        // No retention: due as soon as the month ended.
        assert!(!past_retention(january, at(2034, 1, 31), 0));
        assert!(past_retention(january, at(2034, 2, 1), 0));
        // Absurd retentions never archive, rather than overflow.
        assert!(!past_retention(january, at(2034, 5, 1), u32::MAX));
    }
}
