//! Where every projection stands, for dashboards and read-your-writes.

use chrono::{DateTime, Utc};
use sqlx::PgPool;

/// One projection's progress against the log head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProjectionStatus {
    pub projection: String,
    pub position: i64,
    pub head: i64,
    /// Events committed to the log and not applied yet.
    pub lag_events: i64,
    /// Commit time of the last applied event.
    pub last_recorded_at: Option<DateTime<Utc>>,
}

impl ProjectionStatus {
    /// Seconds between the log head's commit and the last applied event's (0 when caught up).
    pub fn lag_seconds(&self, head_recorded_at: DateTime<Utc>) -> f64 {
        match self.last_recorded_at {
            _ if self.lag_events == 0 => 0.0,
            Some(at) => (head_recorded_at - at).num_milliseconds().max(0) as f64 / 1000.0,
            None => f64::INFINITY,
        }
    }
}

/// Every projection's checkpoint with the log head, read in one statement (one snapshot).
pub async fn projection_status(pool: &PgPool) -> Result<Vec<ProjectionStatus>, sqlx::Error> {
    let rows: Vec<(String, i64, i64, Option<DateTime<Utc>>)> = sqlx::query_as(
        "SELECT c.projection, c.position, h.position, c.last_recorded_at
         FROM projection_checkpoints c CROSS JOIN log_head h ORDER BY c.projection",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(projection, position, head, last_recorded_at)| ProjectionStatus {
            projection,
            position,
            head,
            lag_events: (head - position).max(0),
            last_recorded_at,
        })
        .collect())
}

/// What operators watch about one projection besides its position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProjectionHealth {
    pub projection: String,
    /// The version of the live tables (`projection_checkpoints.version`).
    pub version: i32,
    /// Events parked in `projection_dead_letters` because they could not be applied, and not
    /// resolved since (retried or skipped).
    pub dead_letters: i64,
}

/// Every projection's live version and dead-letter count, by projection name.
pub async fn projection_health(pool: &PgPool) -> Result<Vec<ProjectionHealth>, sqlx::Error> {
    // Counted per checkpoint through projection_dead_letters_pending_idx (partial, pending
    // letters only): an index-only count, never a scan of the parked envelopes.
    let rows: Vec<(String, i32, i64)> = sqlx::query_as(
        "SELECT c.projection, c.version,
                (SELECT count(*) FROM projection_dead_letters d WHERE d.projection = c.projection AND d.state = 'pending')
         FROM projection_checkpoints c ORDER BY c.projection",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(projection, version, dead_letters)| ProjectionHealth {
            projection,
            version,
            dead_letters,
        })
        .collect())
}

/// A rebuild `cloudphone replay` is running beside the live tables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RebuildProgress {
    pub projection: String,
    /// The version being built.
    pub version: i32,
    /// `building` (folding the log up to `target_position`) or `tailing` (complete, following
    /// the head until the swap).
    pub state: String,
    /// Every event at or below this position is in the rebuild's tables.
    pub position: i64,
    /// The log head when the rebuild started: the end of its bulk phase.
    pub target_position: i64,
    pub events_folded: i64,
    pub started_at: DateTime<Utc>,
    /// When the rebuild last recorded progress.
    pub updated_at: DateTime<Utc>,
}

/// The rebuilds in progress (at most one per projection), oldest first.
pub async fn rebuilds_in_progress(pool: &PgPool) -> Result<Vec<RebuildProgress>, sqlx::Error> {
    #[allow(clippy::type_complexity)] // one row of the statement below, column for column
    let rows: Vec<(String, i32, String, i64, i64, i64, DateTime<Utc>, DateTime<Utc>)> = sqlx::query_as(
        "SELECT projection, version, state, position, target_position, events_folded, started_at, updated_at
         FROM projection_rebuilds WHERE state IN ('building', 'tailing') ORDER BY started_at, id",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(
            |(projection, version, state, position, target_position, events_folded, started_at, updated_at)| {
                RebuildProgress {
                    projection,
                    version,
                    state,
                    position,
                    target_position,
                    events_folded,
                    started_at,
                    updated_at,
                }
            },
        )
        .collect())
}
