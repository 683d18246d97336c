//! Monthly partitions of `user_events`: keep them ahead of time, list them, move sealed
//! months to the archive. The SQL functions live in `partitions.sql` at the repository root.

use std::collections::BTreeSet;
use std::sync::Mutex;

use chrono::{DateTime, Datelike, NaiveDate, TimeZone, Utc};
use sqlx::{PgPool, Row};

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
pub async fn list_partitions(pool: &PgPool) -> Result<Vec<PartitionInfo>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT c.relname::text AS name, p.relname = 'user_events_archive' AS archived,
                c.reltuples::bigint AS estimated_rows, pg_total_relation_size(c.oid) AS total_bytes
         FROM pg_inherits i
         JOIN pg_class c ON c.oid = i.inhrelid
         JOIN pg_class p ON p.oid = i.inhparent
         WHERE p.oid IN ('user_events'::regclass, 'user_events_archive'::regclass)
         ORDER BY c.relname",
    )
    .fetch_all(pool)
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
pub async fn archive_partition(pool: &PgPool, month: NaiveDate) -> Result<String, ArchiveError> {
    let result = sqlx::query_scalar("SELECT archive_user_event_partition($1)")
        .bind(month)
        .fetch_one(pool)
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
