//! The `daily_usage` projection's rows: minutes and cost per day, user and device (and, from
//! version 2, per currency), `daily_usage_by_provider` per user, day and provider, and (from
//! version 3) `hourly_usage` per user, UTC hour, device and currency.

use chrono::{DateTime, NaiveDate, Utc};
use event_schema::Provider;
use uuid::Uuid;

/// The `daily_usage` key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UsageKey {
    pub day: NaiveDate,
    pub user_id: Uuid,
    pub device_id: Uuid,
}

/// What one batch adds to `daily_usage`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UsageDelta {
    pub minutes: i64,
    pub cost_minor: i64,
}

/// The key of `daily_usage_by_provider` (version 2 of `daily_usage`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProviderDayKey {
    pub user_id: Uuid,
    pub day: NaiveDate,
    pub provider: Provider,
    pub currency: String,
}

/// A `daily_usage_by_provider` row's values: `sessions` counts the sessions that touched the
/// day (a session over midnight counts on both days).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ProviderUsage {
    pub minutes: i64,
    pub cost_minor: i64,
    pub sessions: i64,
}

impl ProviderUsage {
    pub fn plus(self, other: ProviderUsage) -> ProviderUsage {
        ProviderUsage {
            minutes: self.minutes + other.minutes,
            cost_minor: self.cost_minor + other.cost_minor,
            sessions: self.sessions + other.sessions,
        }
    }
}

/// The key of `hourly_usage` (version 3 of `daily_usage`); its values are a [`UsageDelta`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HourKey {
    pub user_id: Uuid,
    /// The start of the UTC hour.
    pub hour: DateTime<Utc>,
    pub device_id: Uuid,
    pub currency: String,
}
