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
