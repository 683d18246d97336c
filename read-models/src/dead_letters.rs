//! `projection_dead_letters`: events a projection parked because it could not apply them, and
//! what an operator did about each (retried, skipped). Reading only: listing for the CLI and
//! the query API, counting for the gauge. Retrying and skipping fold events or write the
//! projector's bookkeeping, so they live with the writer (`projections::dead_letters`).

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use sqlx::postgres::PgRow;
use sqlx::{PgPool, Row};
use uuid::Uuid;

use crate::Projection;

/// Most letters one listing returns, whatever the caller asks for: a page is read into memory.
pub const MAX_PAGE: i64 = 1_000;

/// Where a parked event stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeadLetterState {
    /// Parked: its event is missing from the read model.
    Pending,
    /// Applied by a retry, in the transaction that marked it.
    Retried,
    /// Given up by an operator, with a reason.
    Skipped,
}

impl DeadLetterState {
    pub const ALL: [DeadLetterState; 3] = [
        DeadLetterState::Pending,
        DeadLetterState::Retried,
        DeadLetterState::Skipped,
    ];

    /// The word stored in `projection_dead_letters.state`.
    pub const fn as_str(self) -> &'static str {
        match self {
            DeadLetterState::Pending => "pending",
            DeadLetterState::Retried => "retried",
            DeadLetterState::Skipped => "skipped",
        }
    }
}

impl fmt::Display for DeadLetterState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// A state word this code does not know (a newer binary wrote it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown dead-letter state `{0}`")]
pub struct UnknownState(pub String);

impl FromStr for DeadLetterState {
    type Err = UnknownState;

    fn from_str(word: &str) -> Result<Self, Self::Err> {
        DeadLetterState::ALL
            .into_iter()
            .find(|state| state.as_str() == word)
            .ok_or_else(|| UnknownState(word.to_owned()))
    }
}

/// A row of `projection_dead_letters`, without the parked envelope (which can be large; read
/// it from the log by `position`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub id: i64,
    /// [`Projection::name`] of the projection that parked it.
    pub projection: String,
    /// The event's global position (`-1`: a message on the topic with no position header).
    pub position: i64,
    /// `None` for a message that was not an envelope at all.
    pub event_id: Option<Uuid>,
    pub event_type: String,
    pub schema_version: i32,
    /// Why the last attempt failed.
    pub error: String,
    pub state: DeadLetterState,
    /// Times the projection tried to apply it: 1 when parked, one more per retry.
    pub attempts: i32,
    pub created_at: DateTime<Utc>,
    pub last_attempt_at: Option<DateTime<Utc>>,
    pub resolved_at: Option<DateTime<Utc>>,
    pub resolved_by: Option<String>,
    /// A skip's reason.
    pub resolution_note: Option<String>,
}

/// The columns [`dead_letter_row`] reads.
pub const DEAD_LETTER_COLUMNS: &str = "id, projection, position, event_id, event_type, schema_version, error, state, \
     attempts, created_at, last_attempt_at, resolved_at, resolved_by, resolution_note";

/// One row selected with [`DEAD_LETTER_COLUMNS`].
pub fn dead_letter_row(row: &PgRow) -> Result<DeadLetter, sqlx::Error> {
    Ok(DeadLetter {
        id: row.try_get("id")?,
        projection: row.try_get("projection")?,
        position: row.try_get("position")?,
        event_id: row.try_get("event_id")?,
        event_type: row.try_get("event_type")?,
        schema_version: row.try_get("schema_version")?,
        error: row.try_get("error")?,
        state: row
            .try_get::<String, _>("state")?
            .parse()
            .map_err(|e: UnknownState| sqlx::Error::Decode(Box::new(e)))?,
        attempts: row.try_get("attempts")?,
        created_at: row.try_get("created_at")?,
        last_attempt_at: row.try_get("last_attempt_at")?,
        resolved_at: row.try_get("resolved_at")?,
        resolved_by: row.try_get("resolved_by")?,
        resolution_note: row.try_get("resolution_note")?,
    })
}

/// Which letters a listing returns.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeadLetterFilter {
    /// Only this projection's (all when `None`).
    pub projection: Option<Projection>,
    /// Only letters in this state (all when `None`).
    pub state: Option<DeadLetterState>,
    /// Only letters with an id above this (the keyset cursor of the previous page).
    pub after_id: Option<i64>,
}

/// Up to `limit` letters matching `filter`, oldest (lowest id) first; `limit` is clamped to
/// 1..=[`MAX_PAGE`].
pub async fn list(pool: &PgPool, filter: DeadLetterFilter, limit: i64) -> Result<Vec<DeadLetter>, sqlx::Error> {
    let statement = format!(
        "SELECT {DEAD_LETTER_COLUMNS} FROM projection_dead_letters
         WHERE ($1::text IS NULL OR projection = $1) AND ($2::text IS NULL OR state = $2) AND id > $3
         ORDER BY id LIMIT $4"
    );
    sqlx::query(sqlx::AssertSqlSafe(statement))
        .bind(filter.projection.map(Projection::name))
        .bind(filter.state.map(DeadLetterState::as_str))
        .bind(filter.after_id.unwrap_or(0))
        .bind(limit.clamp(1, MAX_PAGE))
        .fetch_all(pool)
        .await?
        .iter()
        .map(dead_letter_row)
        .collect()
}

/// How many letters match `filter` (its cursor ignored): a listing's total.
pub async fn count(pool: &PgPool, filter: DeadLetterFilter) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT count(*) FROM projection_dead_letters
         WHERE ($1::text IS NULL OR projection = $1) AND ($2::text IS NULL OR state = $2)",
    )
    .bind(filter.projection.map(Projection::name))
    .bind(filter.state.map(DeadLetterState::as_str))
    .fetch_one(pool)
    .await
}

/// One letter by id.
pub async fn get(pool: &PgPool, id: i64) -> Result<Option<DeadLetter>, sqlx::Error> {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {DEAD_LETTER_COLUMNS} FROM projection_dead_letters WHERE id = $1"
    )))
    .bind(id)
    .fetch_optional(pool)
    .await?
    .as_ref()
    .map(dead_letter_row)
    .transpose()
}

/// Pending letters of `projection` (through the partial index of pending letters).
pub async fn pending(pool: &PgPool, projection: Projection) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT count(*) FROM projection_dead_letters WHERE projection = $1 AND state = 'pending'")
        .bind(projection.name())
        .fetch_one(pool)
        .await
}
