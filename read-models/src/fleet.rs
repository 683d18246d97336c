//! The `fleet` projection's tables: `devices` (one row per device, its current state) and
//! `device_stats` (per user, status and provider: live devices and their sizes), with the one
//! definition of `device_stats` from `devices`, in Rust ([`stats_of`]) and in SQL
//! ([`derive_device_stats`]), and how a batch of device changes moves it ([`stats_changes`],
//! [`apply_stats_changes`]).

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
/// status and provider. [`derive_device_stats`] says the same in SQL.
pub fn stats_of<'a>(rows: impl IntoIterator<Item = &'a DeviceRow>) -> std::collections::BTreeMap<StatsKey, StatsRow> {
    let mut stats = std::collections::BTreeMap::new();
    for row in rows {
        let Some(key) = stats_key(row) else {
            continue;
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

/// How a batch changed one `device_stats` bucket: the sums to add, and the newest creation
/// time among the devices that entered it and among those that left it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StatsChange {
    pub device_count: i64,
    pub total_cpu_cores: i64,
    pub total_memory_mb: i64,
    pub newest_entered: Option<DateTime<Utc>>,
    pub newest_left: Option<DateTime<Utc>>,
}

impl StatsChange {
    fn is_none(&self) -> bool {
        *self == StatsChange::default()
    }
}

/// The bucket a device is counted in; none once it is deleted.
fn stats_key(row: &DeviceRow) -> Option<StatsKey> {
    (row.status != DeviceStatus::Deleted).then_some(StatsKey {
        user_id: row.owner_id,
        status: row.status,
        provider: row.provider,
    })
}

/// What moving devices from their stored rows (`before`; a device missing there is new) to
/// `after` changes in `device_stats` ([`stats_of`] of the whole fleet, before and after).
/// A device that stays in its bucket changes only its sizes there; buckets a batch leaves as
/// they were are not listed, so they are not written.
pub fn stats_changes<'a>(
    before: &std::collections::HashMap<Uuid, DeviceRow>,
    after: impl IntoIterator<Item = &'a DeviceRow>,
) -> std::collections::BTreeMap<StatsKey, StatsChange> {
    let mut changes: std::collections::BTreeMap<StatsKey, StatsChange> = std::collections::BTreeMap::new();
    for new in after {
        let old = before.get(&new.device_id);
        let (old_key, new_key) = (old.and_then(stats_key), stats_key(new));
        match (old, old_key, new_key) {
            (Some(old), Some(old_key), Some(new_key)) if old_key == new_key => {
                let change = changes.entry(new_key).or_default();
                change.total_cpu_cores += i64::from(new.cpu_cores) - i64::from(old.cpu_cores);
                change.total_memory_mb += i64::from(new.memory_mb) - i64::from(old.memory_mb);
            }
            _ => {
                if let (Some(old), Some(old_key)) = (old, old_key) {
                    let change = changes.entry(old_key).or_default();
                    change.device_count -= 1;
                    change.total_cpu_cores -= i64::from(old.cpu_cores);
                    change.total_memory_mb -= i64::from(old.memory_mb);
                    change.newest_left = change.newest_left.max(Some(old.created_at));
                }
                if let Some(new_key) = new_key {
                    let change = changes.entry(new_key).or_default();
                    change.device_count += 1;
                    change.total_cpu_cores += i64::from(new.cpu_cores);
                    change.total_memory_mb += i64::from(new.memory_mb);
                    change.newest_entered = change.newest_entered.max(Some(new.created_at));
                }
            }
        }
    }
    changes.retain(|_, change| !change.is_none());
    changes
}

/// Adds a batch's [`stats_changes`] to `device_stats`, after the batch's device rows were
/// written: the sums by addition; the newest creation time by `GREATEST`, unless a device
/// that left the bucket was the newest, when it is read again from the bucket's devices
/// (one range of `devices_owner_idx`); a bucket left with no device is deleted.
///
/// Kafka workers apply batches of one owner's devices at once (each device's stream is in
/// one partition, the owner's devices in several). Additions commute, and each bucket's row
/// lock orders the workers that change it: one that waited adds to what the other
/// committed, and rereads the newest creation time (a new statement, a new snapshot) only
/// after its own addition has waited. The buckets are written in key order (a `BTreeMap`),
/// so two batches lock the rows they share in one order and never deadlock.
pub async fn apply_stats_changes(
    conn: &mut PgConnection,
    changes: &std::collections::BTreeMap<StatsKey, StatsChange>,
) -> Result<(), sqlx::Error> {
    if changes.is_empty() {
        return Ok(());
    }
    let keys: Vec<&StatsKey> = changes.keys().collect();
    let values: Vec<&StatsChange> = changes.values().collect();
    // A bucket only left has no creation time to add: -infinity leaves the stored one (NOT
    // NULL is checked before the conflict is). A bucket only left that was not stored comes
    // back without a time and fails the batch below, rather than store a negative count.
    let rows = sqlx::query(
        "INSERT INTO device_stats AS s (user_id, status, provider, device_count, total_cpu_cores, total_memory_mb,
                                        last_created_at)
         SELECT user_id, status, provider, device_count, total_cpu_cores, total_memory_mb,
                coalesce(newest_entered, '-infinity')
         FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::bigint[], $5::bigint[], $6::bigint[], $7::timestamptz[])
              AS c(user_id, status, provider, device_count, total_cpu_cores, total_memory_mb, newest_entered)
         ON CONFLICT (user_id, status, provider) DO UPDATE SET
             device_count = s.device_count + EXCLUDED.device_count,
             total_cpu_cores = s.total_cpu_cores + EXCLUDED.total_cpu_cores,
             total_memory_mb = s.total_memory_mb + EXCLUDED.total_memory_mb,
             last_created_at = GREATEST(s.last_created_at, EXCLUDED.last_created_at)
         RETURNING user_id, status, provider, device_count, nullif(last_created_at, '-infinity') AS last_created_at",
    )
    .bind(keys.iter().map(|k| k.user_id).collect::<Vec<_>>())
    .bind(keys.iter().map(|k| k.status.as_str()).collect::<Vec<_>>())
    .bind(keys.iter().map(|k| k.provider.as_str()).collect::<Vec<_>>())
    .bind(values.iter().map(|c| c.device_count).collect::<Vec<_>>())
    .bind(values.iter().map(|c| c.total_cpu_cores).collect::<Vec<_>>())
    .bind(values.iter().map(|c| c.total_memory_mb).collect::<Vec<_>>())
    .bind(values.iter().map(|c| c.newest_entered).collect::<Vec<_>>())
    .fetch_all(&mut *conn)
    .await?;
    let decode = |e: event_schema::UnknownWord| sqlx::Error::Decode(Box::new(e));
    let mut to_settle: Vec<StatsKey> = Vec::new();
    for row in &rows {
        let key = StatsKey {
            user_id: row.try_get("user_id")?,
            status: row.try_get::<String, _>("status")?.parse().map_err(decode)?,
            provider: row.try_get::<String, _>("provider")?.parse().map_err(decode)?,
        };
        let count: i64 = row.try_get("device_count")?;
        let newest: Option<DateTime<Utc>> = row.try_get("last_created_at")?;
        let newest_left = changes.get(&key).and_then(|c| c.newest_left);
        if count == 0 || newest.is_none_or(|newest| newest_left.is_some_and(|left| left >= newest)) {
            to_settle.push(key);
        }
    }
    if to_settle.is_empty() {
        return Ok(());
    }
    // Disjoint rows: the emptied buckets are deleted, the others take their newest live
    // device's creation time (a bucket still counting devices it has none of fails the
    // batch on NOT NULL rather than store a wrong time).
    sqlx::query(
        "WITH settle AS (
             SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[]) AS k(user_id, status, provider)
         ), emptied AS (
             DELETE FROM device_stats s USING settle k
             WHERE (s.user_id, s.status, s.provider) = (k.user_id, k.status, k.provider) AND s.device_count = 0
         )
         UPDATE device_stats s SET last_created_at = n.newest
         FROM (SELECT k.user_id, k.status, k.provider,
                      (SELECT max(d.created_at) FROM devices d
                       WHERE (d.owner_id, d.status, d.provider) = (k.user_id, k.status, k.provider)) AS newest
               FROM settle k) n
         WHERE (s.user_id, s.status, s.provider) = (n.user_id, n.status, n.provider) AND s.device_count <> 0
           AND s.last_created_at IS DISTINCT FROM n.newest",
    )
    .bind(to_settle.iter().map(|k| k.user_id).collect::<Vec<_>>())
    .bind(to_settle.iter().map(|k| k.status.as_str()).collect::<Vec<_>>())
    .bind(to_settle.iter().map(|k| k.provider.as_str()).collect::<Vec<_>>())
    .execute(conn)
    .await?;
    Ok(())
}

/// Replaces every `device_stats` row with what `devices` defines (for tables filled in bulk,
/// outside the projector: fixtures and generated benchmark data).
pub async fn derive_device_stats(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM device_stats").execute(&mut *conn).await?;
    // What stats_of says, in SQL.
    sqlx::query(
        "INSERT INTO device_stats (user_id, status, provider, device_count, total_cpu_cores, total_memory_mb, last_created_at)
         SELECT owner_id, status, provider, count(*), sum(cpu_cores), sum(memory_mb), max(created_at)
         FROM devices WHERE status <> 'deleted'
         GROUP BY owner_id, status, provider",
    )
    .execute(conn)
    .await?;
    Ok(())
}
