//! Where each projection stands in the log.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use read_models::Projection;

/// A projection's stored progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProjectionCheckpoint {
    pub position: i64,
    pub last_recorded_at: Option<DateTime<Utc>>,
    /// The live version of the projection's tables (see [`read_models::versions`]).
    pub version: i32,
}

/// The checkpoint moved while this batch was being applied: another projector instance is
/// running the same projection. The batch is rolled back and the tail restarts from there.
#[derive(Debug, thiserror::Error)]
#[error("checkpoint of `{projection}` moved from {expected} concurrently")]
pub struct CheckpointMoved {
    pub projection: &'static str,
    pub expected: i64,
}

pub async fn load(conn: &mut PgConnection, projection: Projection) -> Result<ProjectionCheckpoint, sqlx::Error> {
    sqlx::query("INSERT INTO projection_checkpoints (projection) VALUES ($1) ON CONFLICT DO NOTHING")
        .bind(projection.name())
        .execute(&mut *conn)
        .await?;
    let (position, last_recorded_at, version): (i64, Option<DateTime<Utc>>, i32) =
        sqlx::query_as("SELECT position, last_recorded_at, version FROM projection_checkpoints WHERE projection = $1")
            .bind(projection.name())
            .fetch_one(conn)
            .await?;
    Ok(ProjectionCheckpoint {
        position,
        last_recorded_at,
        version,
    })
}

/// Moves the checkpoint from `from` to `to`, inside the caller's transaction. Returns false
/// when it was not at `from` at version `to.version` (another instance moved it, or a replay
/// swapped another version in: the caller's batch was folded for tables that are not live).
pub async fn advance(
    conn: &mut PgConnection,
    projection: Projection,
    from: i64,
    to: ProjectionCheckpoint,
) -> Result<bool, sqlx::Error> {
    let result = sqlx::query(
        "UPDATE projection_checkpoints SET position = $3, last_recorded_at = $4, updated_at = now()
         WHERE projection = $1 AND position = $2 AND version = $5",
    )
    .bind(projection.name())
    .bind(from)
    .bind(to.position)
    .bind(to.last_recorded_at)
    .bind(to.version)
    .execute(conn)
    .await?;
    Ok(result.rows_affected() == 1)
}
