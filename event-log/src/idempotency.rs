//! Retention of idempotency keys. A key answers retries of its append with the original
//! outcome for as long as it is kept; after that, the same key is a new request. Clients
//! retry within minutes, so a day (the default of the roles) is ample, and the table stays
//! the size of a day's keyed appends instead of growing with the whole history.

use chrono::{DateTime, Utc};
use sqlx::PgPool;

/// Keys deleted per statement: short transactions, no long lock on the table.
const CHUNK: i64 = 10_000;

/// Deletes the keys recorded before `recorded_before`; returns how many.
pub async fn expire_idempotency_keys(pool: &PgPool, recorded_before: DateTime<Utc>) -> Result<u64, sqlx::Error> {
    let mut expired = 0;
    loop {
        let deleted = sqlx::query(
            "DELETE FROM append_idempotency WHERE key IN (
                 SELECT key FROM append_idempotency WHERE recorded_at < $1 LIMIT $2)",
        )
        .bind(recorded_before)
        .bind(CHUNK)
        .execute(pool)
        .await?
        .rows_affected();
        expired += deleted;
        metrics::counter!(crate::metrics_names::IDEMPOTENCY_KEYS_EXPIRED_TOTAL).increment(deleted);
        if deleted < CHUNK as u64 {
            return Ok(expired);
        }
    }
}
