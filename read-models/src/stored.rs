//! Every read model at once: [`ReadModels`], the shape a rebuild from the whole history
//! computes in memory, and [`load_read_models`], the same read from the tables, so the two can
//! be compared row for row.

use std::collections::BTreeMap;

use chrono::{DateTime, NaiveDate, Utc};
use sqlx::{PgPool, Row};
use uuid::Uuid;

use event_schema::DeviceStatus;

use crate::fleet::{DeviceRow, StatsKey, StatsRow, device_row};
use crate::history::StatusChangeKey;
use crate::usage::{HourKey, ProviderDayKey, ProviderUsage, UsageDelta, UsageKey};
use crate::users::{USER_COLUMNS, UserRow, user_row};

/// Every read model, as the full history defines it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReadModels {
    pub devices: BTreeMap<Uuid, DeviceRow>,
    pub device_stats: BTreeMap<StatsKey, StatsRow>,
    pub daily_usage: BTreeMap<(UsageKey, String), UsageDelta>,
    /// `daily_usage_by_provider` (version 2 of `daily_usage`; empty when the version live
    /// has no such table).
    pub usage_by_provider: BTreeMap<ProviderDayKey, ProviderUsage>,
    /// `hourly_usage` (version 3 of `daily_usage`; empty when the version live has no such
    /// table).
    pub hourly_usage: BTreeMap<HourKey, UsageDelta>,
}

impl ReadModels {
    /// These models as version 1 of `daily_usage` holds them (no per-provider breakdown, no
    /// hours).
    pub fn without_provider_breakdown(mut self) -> Self {
        self.usage_by_provider.clear();
        self.without_hourly_usage()
    }

    /// These models as version 2 of `daily_usage` holds them (no hours).
    pub fn without_hourly_usage(mut self) -> Self {
        self.hourly_usage.clear();
        self
    }
}

/// Reads every row of every read model, from the tables `pool`'s search path resolves.
pub async fn load_read_models(pool: &PgPool) -> Result<ReadModels, sqlx::Error> {
    let decode = |e: event_schema::UnknownWord| sqlx::Error::Decode(Box::new(e));
    let mut devices = BTreeMap::new();
    for row in sqlx::query(
        "SELECT device_id, owner_id, provider, status, cpu_cores, memory_mb, android_version, created_at,
                last_started_at, minutes_used, updated_position FROM devices",
    )
    .fetch_all(pool)
    .await?
    {
        let device = device_row(&row)?;
        devices.insert(device.device_id, device);
    }
    let mut device_stats = BTreeMap::new();
    for row in sqlx::query("SELECT user_id, status, provider, device_count, total_cpu_cores, total_memory_mb, last_created_at FROM device_stats")
        .fetch_all(pool)
        .await?
    {
        let key = StatsKey {
            user_id: row.try_get("user_id")?,
            status: row.try_get::<String, _>("status")?.parse().map_err(decode)?,
            provider: row.try_get::<String, _>("provider")?.parse().map_err(decode)?,
        };
        device_stats.insert(
            key,
            StatsRow {
                device_count: row.try_get("device_count")?,
                total_cpu_cores: row.try_get("total_cpu_cores")?,
                total_memory_mb: row.try_get("total_memory_mb")?,
                last_created_at: row.try_get::<DateTime<Utc>, _>("last_created_at")?,
            },
        );
    }
    let mut daily_usage = BTreeMap::new();
    for row in sqlx::query("SELECT day, user_id, device_id, minutes, cost_minor, currency FROM daily_usage")
        .fetch_all(pool)
        .await?
    {
        let key = UsageKey {
            day: row.try_get::<NaiveDate, _>("day")?,
            user_id: row.try_get::<Uuid, _>("user_id")?,
            device_id: row.try_get::<Uuid, _>("device_id")?,
        };
        daily_usage.insert(
            (key, row.try_get::<String, _>("currency")?),
            UsageDelta {
                minutes: row.try_get("minutes")?,
                cost_minor: row.try_get("cost_minor")?,
            },
        );
    }
    let mut usage_by_provider = BTreeMap::new();
    let has_breakdown: bool = sqlx::query_scalar("SELECT to_regclass('daily_usage_by_provider') IS NOT NULL")
        .fetch_one(pool)
        .await?;
    if has_breakdown {
        for row in sqlx::query(
            "SELECT user_id, day, provider, currency, minutes, cost_minor, sessions FROM daily_usage_by_provider",
        )
        .fetch_all(pool)
        .await?
        {
            let key = ProviderDayKey {
                user_id: row.try_get("user_id")?,
                day: row.try_get("day")?,
                provider: row.try_get::<String, _>("provider")?.parse().map_err(decode)?,
                currency: row.try_get("currency")?,
            };
            usage_by_provider.insert(
                key,
                ProviderUsage {
                    minutes: row.try_get("minutes")?,
                    cost_minor: row.try_get("cost_minor")?,
                    sessions: row.try_get("sessions")?,
                },
            );
        }
    }
    let mut hourly_usage = BTreeMap::new();
    let has_hours: bool = sqlx::query_scalar("SELECT to_regclass('hourly_usage') IS NOT NULL")
        .fetch_one(pool)
        .await?;
    if has_hours {
        for row in sqlx::query("SELECT user_id, hour, device_id, currency, minutes, cost_minor FROM hourly_usage")
            .fetch_all(pool)
            .await?
        {
            let key = HourKey {
                user_id: row.try_get("user_id")?,
                hour: row.try_get("hour")?,
                device_id: row.try_get("device_id")?,
                currency: row.try_get("currency")?,
            };
            hourly_usage.insert(
                key,
                UsageDelta {
                    minutes: row.try_get("minutes")?,
                    cost_minor: row.try_get("cost_minor")?,
                },
            );
        }
    }
    Ok(ReadModels {
        devices,
        device_stats,
        daily_usage,
        usage_by_provider,
        hourly_usage,
    })
}

/// The tables version 2 of `fleet` adds (`users` and the fleet's history), as the full history
/// defines them. Apart from [`ReadModels`], so the comparisons of the version 1 tables hold
/// whichever version is live.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UsersAndHistory {
    pub users: BTreeMap<Uuid, UserRow>,
    /// `fleet_status_changes`: every (user, hour, status) a transition touched, with the net
    /// change of the count (0 when the hour's changes cancelled out).
    pub status_changes: BTreeMap<StatusChangeKey, i64>,
    /// `fleet_status_changes_all`: the same summed over users.
    pub status_changes_all: BTreeMap<(DateTime<Utc>, DeviceStatus), i64>,
}

impl UsersAndHistory {
    /// The all-users rows as the per-user rows define them.
    pub fn sum_over_users(
        status_changes: &BTreeMap<StatusChangeKey, i64>,
    ) -> BTreeMap<(DateTime<Utc>, DeviceStatus), i64> {
        let mut all = BTreeMap::new();
        for (key, delta) in status_changes {
            *all.entry((key.hour, key.status)).or_insert(0) += delta;
        }
        all
    }
}

/// Reads `users` and the fleet's history (`None` when the live `fleet` version has no such
/// tables), from the tables `pool`'s search path resolves.
pub async fn load_users_and_history(pool: &PgPool) -> Result<Option<UsersAndHistory>, sqlx::Error> {
    let decode = |e: event_schema::UnknownWord| sqlx::Error::Decode(Box::new(e));
    let live: bool = sqlx::query_scalar("SELECT to_regclass('users') IS NOT NULL")
        .fetch_one(pool)
        .await?;
    if !live {
        return Ok(None);
    }
    let mut models = UsersAndHistory::default();
    let statement = format!("SELECT {USER_COLUMNS} FROM users");
    for row in sqlx::query(sqlx::AssertSqlSafe(statement)).fetch_all(pool).await? {
        let user = user_row(&row)?;
        models.users.insert(user.user_id, user);
    }
    for row in sqlx::query("SELECT user_id, hour, status, delta FROM fleet_status_changes")
        .fetch_all(pool)
        .await?
    {
        let key = StatusChangeKey {
            user_id: row.try_get("user_id")?,
            hour: row.try_get("hour")?,
            status: row.try_get::<String, _>("status")?.parse().map_err(decode)?,
        };
        models.status_changes.insert(key, row.try_get("delta")?);
    }
    for row in sqlx::query("SELECT hour, status, delta FROM fleet_status_changes_all")
        .fetch_all(pool)
        .await?
    {
        let status: DeviceStatus = row.try_get::<String, _>("status")?.parse().map_err(decode)?;
        models
            .status_changes_all
            .insert((row.try_get("hour")?, status), row.try_get("delta")?);
    }
    Ok(Some(models))
}
