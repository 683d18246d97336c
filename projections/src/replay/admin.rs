//! What operators run around replays: the list of rebuilds, giving one up, and dropping the
//! tables that swaps replaced.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use sqlx::{AssertSqlSafe, PgPool, Row};

use super::{ReplayError, ReplayLock};
use read_models::Projection;
use read_models::versions::quote_ident;

/// Drops the tables replaced by swaps, keeping the newest `keep` per projection (of
/// `projection`, or of all). Returns the schemas dropped.
pub async fn drop_replaced(
    pool: &PgPool,
    projection: Option<Projection>,
    keep: usize,
) -> Result<Vec<String>, ReplayError> {
    let rows: Vec<(i64, String, String)> = sqlx::query_as(
        "SELECT id, projection, replaced_schema FROM projection_rebuilds
         WHERE replaced_schema IS NOT NULL AND replaced_dropped_at IS NULL AND ($1::text IS NULL OR projection = $1)
         ORDER BY projection, swapped_at DESC",
    )
    .bind(projection.map(Projection::name))
    .fetch_all(pool)
    .await?;
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut dropped = Vec::new();
    for (id, projection, schema) in rows {
        let kept = seen.entry(projection).or_default();
        if *kept < keep {
            *kept += 1;
            continue;
        }
        let mut tx = pool.begin().await?;
        sqlx::raw_sql(AssertSqlSafe(format!(
            "DROP SCHEMA IF EXISTS {} CASCADE",
            quote_ident(&schema)
        )))
        .execute(&mut *tx)
        .await?;
        sqlx::query("UPDATE projection_rebuilds SET replaced_dropped_at = now() WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        tracing::info!(%schema, "replaced version dropped");
        dropped.push(schema);
    }
    Ok(dropped)
}

/// Gives up the rebuild of `projection` in progress (if any): drops its schema. Returns its id.
pub async fn abandon(pool: &PgPool, projection: Projection) -> Result<Option<i64>, ReplayError> {
    let lock = ReplayLock::take(pool, projection).await?;
    let row: Option<(i64, String)> = sqlx::query_as(
        "SELECT id, shadow_schema FROM projection_rebuilds WHERE projection = $1 AND state IN ('building', 'tailing')",
    )
    .bind(projection.name())
    .fetch_optional(pool)
    .await?;
    let outcome = match row {
        None => None,
        Some((id, schema)) => {
            let mut tx = pool.begin().await?;
            sqlx::raw_sql(AssertSqlSafe(format!(
                "DROP SCHEMA IF EXISTS {} CASCADE",
                quote_ident(&schema)
            )))
            .execute(&mut *tx)
            .await?;
            sqlx::query("UPDATE projection_rebuilds SET state = 'abandoned', updated_at = now() WHERE id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Some(id)
        }
    };
    lock.release().await;
    Ok(outcome)
}

/// One row of `projection_rebuilds`, for `cloudphone replay --status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RebuildStatus {
    pub id: i64,
    pub projection: String,
    pub version: i32,
    pub state: String,
    pub position: i64,
    pub target_position: i64,
    pub events_folded: i64,
    pub started_at: DateTime<Utc>,
    pub swapped_at: Option<DateTime<Utc>>,
    pub replaced_schema: Option<String>,
    pub replaced_dropped: bool,
}

/// Every rebuild, newest first.
pub async fn rebuilds(pool: &PgPool) -> Result<Vec<RebuildStatus>, ReplayError> {
    let rows = sqlx::query(
        "SELECT id, projection, version, state, position, target_position, events_folded, started_at, swapped_at,
                replaced_schema, replaced_dropped_at IS NOT NULL AS replaced_dropped
         FROM projection_rebuilds ORDER BY id DESC",
    )
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|row| {
            Ok(RebuildStatus {
                id: row.try_get("id")?,
                projection: row.try_get("projection")?,
                version: row.try_get("version")?,
                state: row.try_get("state")?,
                position: row.try_get("position")?,
                target_position: row.try_get("target_position")?,
                events_folded: row.try_get("events_folded")?,
                started_at: row.try_get("started_at")?,
                swapped_at: row.try_get("swapped_at")?,
                replaced_schema: row.try_get("replaced_schema")?,
                replaced_dropped: row.try_get("replaced_dropped")?,
            })
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(ReplayError::from)
}
