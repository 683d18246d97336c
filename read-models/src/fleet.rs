//! The `fleet` projection's tables: `devices` (one row per device, its current state) and
//! `device_stats` (per user, status and provider: live devices and their sizes), with the one
//! definition of `device_stats` from `devices`, in Rust ([`stats_of`]) and in SQL
//! ([`recompute_device_stats`], [`derive_device_stats`]).

use chrono::{DateTime, Utc};
use event_schema::{DeviceStatus, Provider};
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, Row};
use uuid::Uuid;

/// A row of `devices`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRow {
    pub device_id: Uuid,
    pub owner_id: Uuid,
    pub provider: Provider,
    pub status: DeviceStatus,
    pub cpu_cores: i32,
    pub memory_mb: i32,
    pub android_version: i16,
    pub created_at: DateTime<Utc>,
    pub last_started_at: Option<DateTime<Utc>>,
    pub minutes_used: i64,
    pub updated_position: i64,
}

/// A device event that does not fit the row it would change.
/// The `device_stats` key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StatsKey {
    pub user_id: Uuid,
    pub status: DeviceStatus,
    pub provider: Provider,
}

/// A `device_stats` row's values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatsRow {
    pub device_count: i64,
    pub total_cpu_cores: i64,
    pub total_memory_mb: i64,
    pub last_created_at: DateTime<Utc>,
}

/// `device_stats` as defined from device rows: live (not deleted) devices grouped by owner,
/// status and provider. The SQL recomputation in the projector says the same thing.
pub fn stats_of<'a>(rows: impl IntoIterator<Item = &'a DeviceRow>) -> std::collections::BTreeMap<StatsKey, StatsRow> {
    let mut stats = std::collections::BTreeMap::new();
    for row in rows.into_iter().filter(|r| r.status != DeviceStatus::Deleted) {
        let key = StatsKey {
            user_id: row.owner_id,
            status: row.status,
            provider: row.provider,
        };
        let entry = stats.entry(key).or_insert(StatsRow {
            device_count: 0,
            total_cpu_cores: 0,
            total_memory_mb: 0,
            last_created_at: row.created_at,
        });
        entry.device_count += 1;
        entry.total_cpu_cores += i64::from(row.cpu_cores);
        entry.total_memory_mb += i64::from(row.memory_mb);
        entry.last_created_at = entry.last_created_at.max(row.created_at);
    }
    stats
}

/// One `devices` row, selected with every column.
pub fn device_row(row: &PgRow) -> Result<DeviceRow, sqlx::Error> {
    let decode = |e: event_schema::UnknownWord| sqlx::Error::Decode(Box::new(e));
    Ok(DeviceRow {
        device_id: row.try_get("device_id")?,
        owner_id: row.try_get("owner_id")?,
        provider: row.try_get::<String, _>("provider")?.parse().map_err(decode)?,
        status: row.try_get::<String, _>("status")?.parse().map_err(decode)?,
        cpu_cores: row.try_get("cpu_cores")?,
        memory_mb: row.try_get("memory_mb")?,
        android_version: row.try_get("android_version")?,
        created_at: row.try_get("created_at")?,
        last_started_at: row.try_get("last_started_at")?,
        minutes_used: row.try_get("minutes_used")?,
        updated_position: row.try_get("updated_position")?,
    })
}

/// `device_stats` rows as defined from `devices` (what [`stats_of`] says), for the owners the
/// `$filter` SQL condition keeps (`""` for every owner).
macro_rules! device_stats_of_devices {
    ($filter:literal) => {
        concat!(
            "SELECT owner_id, status, provider, count(*) AS device_count, sum(cpu_cores) AS total_cpu_cores,
                    sum(memory_mb) AS total_memory_mb, max(created_at) AS last_created_at
             FROM devices WHERE status <> 'deleted'",
            $filter,
            " GROUP BY owner_id, status, provider"
        )
    };
}

/// Lock keys owners share for [`recompute_device_stats`] (a power of two). PostgreSQL's lock
/// table holds 64 locks per connection on average (`max_locks_per_transaction`): one lock per
/// owner would exhaust it ("out of shared memory") in a catch-up batch of thousands of
/// owners. Two batches of different owners on one key only wait for each other.
pub const OWNER_LOCK_KEYS: i32 = 128;

/// Recomputes the `device_stats` rows of `owners` from `devices`.
///
/// Kafka workers apply batches of one owner's devices at once (each device's stream is in
/// one partition, the owner's devices in several). A recompute reads the owner's devices in
/// its statement's snapshot, which does not hold another worker's uncommitted device rows:
/// the later commit would overwrite the buckets without the other's change (write skew).
/// So each owner is locked first, until the transaction ends, in one order (no deadlock
/// between batches); the recompute that waited then reads, in a new snapshot, what the
/// other committed. Owners share [`OWNER_LOCK_KEYS`] keys, so a batch holds that many locks
/// at most, however many owners it touches.
pub async fn recompute_device_stats(conn: &mut PgConnection, owners: &[Uuid]) -> Result<(), sqlx::Error> {
    if owners.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "SELECT pg_advisory_xact_lock(hashtext('cloudphone.device_stats'), k)
         FROM (SELECT DISTINCT hashtext(o::text) & ($2 - 1) AS k FROM unnest($1::uuid[]) AS t(o) ORDER BY k) AS keys",
    )
    .bind(owners)
    .bind(OWNER_LOCK_KEYS)
    .execute(&mut *conn)
    .await?;
    // One statement, one scan of the owners' devices: upsert the buckets that have live
    // devices, delete those that have none any more (the two touch disjoint rows). A bucket
    // whose sums did not change is left alone: a write would only leave a dead row version
    // and WAL for the replicas (most events change one or two of an owner's buckets).
    sqlx::query(concat!(
        "WITH fresh AS (",
        device_stats_of_devices!(" AND owner_id = ANY($1)"),
        "), upserted AS (
             INSERT INTO device_stats (user_id, status, provider, device_count, total_cpu_cores, total_memory_mb, last_created_at)
             SELECT * FROM fresh
             ON CONFLICT (user_id, status, provider) DO UPDATE SET
                 device_count = EXCLUDED.device_count, total_cpu_cores = EXCLUDED.total_cpu_cores,
                 total_memory_mb = EXCLUDED.total_memory_mb, last_created_at = EXCLUDED.last_created_at
             WHERE (device_stats.device_count, device_stats.total_cpu_cores, device_stats.total_memory_mb,
                    device_stats.last_created_at)
                 IS DISTINCT FROM (EXCLUDED.device_count, EXCLUDED.total_cpu_cores, EXCLUDED.total_memory_mb,
                    EXCLUDED.last_created_at)
         )
         DELETE FROM device_stats s WHERE s.user_id = ANY($1) AND NOT EXISTS (
             SELECT 1 FROM fresh f WHERE f.owner_id = s.user_id AND f.status = s.status AND f.provider = s.provider)"
    ))
    .bind(owners)
    .execute(conn)
    .await?;
    Ok(())
}

/// Replaces every `device_stats` row with what `devices` defines (for tables filled in bulk,
/// outside the projector: fixtures and generated benchmark data).
pub async fn derive_device_stats(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM device_stats").execute(&mut *conn).await?;
    sqlx::query(concat!(
        "INSERT INTO device_stats (user_id, status, provider, device_count, total_cpu_cores, total_memory_mb, last_created_at) ",
        device_stats_of_devices!("")
    ))
    .execute(conn)
    .await?;
    Ok(())
}
