//! The `users` table of version 2 of the `fleet` projection: one row per registered user, its
//! tier, quota, registration time and whether it was erased.
//!
//! No personal data: `UserRegistered` carries the email and phone (encrypted in the log, and
//! shredded on erasure); a read model that copied them would keep what erasure destroys, so
//! this table never has them. What it keeps (tier, quota, times) is not personal.

use chrono::{DateTime, Utc};
use event_schema::{Quota, Tier};
use sqlx::Row;
use sqlx::postgres::PgRow;
use uuid::Uuid;

/// A row of `users`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRow {
    pub user_id: Uuid,
    pub tier: Tier,
    /// `None` until the first `QuotaChanged` (registration sets it in the same append).
    pub quota: Option<Quota>,
    pub registered_at: DateTime<Utc>,
    pub erased: bool,
    pub erased_at: Option<DateTime<Utc>>,
    pub updated_position: i64,
}

/// The columns of `users`, in table order.
pub const USER_COLUMNS: &str = "user_id, tier, max_devices, max_cpu_cores, max_memory_mb, registered_at, erased, \
     erased_at, updated_position";

/// One `users` row, selected with [`USER_COLUMNS`].
pub fn user_row(row: &PgRow) -> Result<UserRow, sqlx::Error> {
    let decode = |e: event_schema::UnknownWord| sqlx::Error::Decode(Box::new(e));
    let limit = |column: &str| -> Result<Option<u32>, sqlx::Error> {
        row.try_get::<Option<i64>, _>(column)?
            .map(|value| u32::try_from(value).map_err(|e| sqlx::Error::Decode(Box::new(e))))
            .transpose()
    };
    let quota = match (limit("max_devices")?, limit("max_cpu_cores")?, limit("max_memory_mb")?) {
        (Some(max_devices), Some(max_cpu_cores), Some(max_memory_mb)) => Some(Quota {
            max_devices,
            max_cpu_cores,
            max_memory_mb,
        }),
        _ => None,
    };
    Ok(UserRow {
        user_id: row.try_get("user_id")?,
        tier: row.try_get::<String, _>("tier")?.parse().map_err(decode)?,
        quota,
        registered_at: row.try_get("registered_at")?,
        erased: row.try_get("erased")?,
        erased_at: row.try_get("erased_at")?,
        updated_position: row.try_get("updated_position")?,
    })
}
