//! Batched loads for nested fields: every `Device.usage`, `User.devices`, ... of one response
//! level becomes one statement, never one per parent (no N+1 queries).

use std::collections::HashMap;
use std::sync::Arc;

use crate::read_pool::ReadPool;
use async_graphql::dataloader::Loader;
use chrono::NaiveDate;
use uuid::Uuid;

use read_models::users::UserRow;

use crate::reads::{
    self, Counted, DeviceConditions, DeviceFilter, Owners, Page, PageRequest, Period, StatsRecord, UsageRecord,
    UsageSubject,
};

/// Loads from the source one request was routed to.
#[derive(Debug, Clone)]
pub struct ReadLoader {
    pub pool: ReadPool,
}

/// A failed batch; shared by every field that waited on it.
pub type LoadError = Arc<sqlx::Error>;

/// One page of one owner's devices, and with [`Counted::Yes`] how many they have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct OwnerPage {
    pub owner: Uuid,
    pub conditions: DeviceConditions,
    pub page: PageRequest,
    pub counted: Counted,
}

/// How many devices one owner has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct OwnerCount {
    pub owner: Uuid,
    pub conditions: DeviceConditions,
}

/// One user's or one device's usage over a range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct UsageOf {
    pub subject: UsageSubject,
    pub id: Uuid,
    pub from: NaiveDate,
    pub to: NaiveDate,
    pub period: Period,
}

/// One user's `device_stats` rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StatsOf(pub Uuid);

/// Groups keys that differ only in their id, so each group is one statement.
fn grouped<K: Copy, G: Eq + std::hash::Hash>(keys: &[K], group: impl Fn(&K) -> G) -> HashMap<G, Vec<K>> {
    let mut groups: HashMap<G, Vec<K>> = HashMap::new();
    for key in keys {
        groups.entry(group(key)).or_default().push(*key);
    }
    groups
}

impl Loader<OwnerPage> for ReadLoader {
    type Value = Page;
    type Error = LoadError;

    async fn load(&self, keys: &[OwnerPage]) -> Result<HashMap<OwnerPage, Page>, LoadError> {
        let mut loaded = HashMap::new();
        for ((conditions, page, counted), keys) in grouped(keys, |k| (k.conditions, k.page, k.counted)) {
            if let [key] = keys[..]
                && page.size > 0
            {
                // One owner (a dashboard's usual question): the one-owner statement, which
                // PostgreSQL plans once per connection. The lateral join over an array is
                // planned again on every execution, as no generic plan knows the array's length.
                let filter = DeviceFilter {
                    owners: Owners::Only(key.owner),
                    conditions,
                };
                loaded.insert(key, reads::device_page(&self.pool, &filter, &page, counted).await?);
                continue;
            }
            let owners: Vec<Uuid> = keys.iter().map(|k| k.owner).collect();
            let mut pages = reads::device_pages_by_owner(&self.pool, &owners, &conditions, &page, counted).await?;
            for key in keys {
                loaded.insert(key, pages.remove(&key.owner).unwrap_or_default());
            }
        }
        Ok(loaded)
    }
}

impl Loader<OwnerCount> for ReadLoader {
    type Value = i64;
    type Error = LoadError;

    async fn load(&self, keys: &[OwnerCount]) -> Result<HashMap<OwnerCount, i64>, LoadError> {
        let mut loaded = HashMap::new();
        for (conditions, keys) in grouped(keys, |k| k.conditions) {
            let owners: Vec<Uuid> = keys.iter().map(|k| k.owner).collect();
            let counts = reads::count_devices_by_owner(&self.pool, &owners, &conditions).await?;
            for key in keys {
                loaded.insert(key, counts.get(&key.owner).copied().unwrap_or(0));
            }
        }
        Ok(loaded)
    }
}

impl Loader<UsageOf> for ReadLoader {
    type Value = Vec<UsageRecord>;
    type Error = LoadError;

    async fn load(&self, keys: &[UsageOf]) -> Result<HashMap<UsageOf, Vec<UsageRecord>>, LoadError> {
        let mut loaded = HashMap::new();
        for ((subject, from, to, period), keys) in grouped(keys, |k| (k.subject, k.from, k.to, k.period)) {
            let ids: Vec<Uuid> = keys.iter().map(|k| k.id).collect();
            let mut usage = reads::usage_by(&self.pool, subject, &ids, from, to, period).await?;
            for key in keys {
                loaded.insert(key, usage.remove(&key.id).unwrap_or_default());
            }
        }
        Ok(loaded)
    }
}

impl Loader<StatsOf> for ReadLoader {
    type Value = Vec<StatsRecord>;
    type Error = LoadError;

    async fn load(&self, keys: &[StatsOf]) -> Result<HashMap<StatsOf, Vec<StatsRecord>>, LoadError> {
        let users: Vec<Uuid> = keys.iter().map(|k| k.0).collect();
        let mut stats = reads::stats_rows_by_user(&self.pool, &users).await?;
        Ok(keys
            .iter()
            .map(|key| (*key, stats.remove(&key.0).unwrap_or_default()))
            .collect())
    }
}

/// One user's `users` row (version 2 of `fleet`; `None` for a user the log never registered).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct UserRecordOf(pub Uuid);

impl Loader<UserRecordOf> for ReadLoader {
    type Value = UserRow;
    type Error = LoadError;

    async fn load(&self, keys: &[UserRecordOf]) -> Result<HashMap<UserRecordOf, UserRow>, LoadError> {
        let ids: Vec<Uuid> = keys.iter().map(|k| k.0).collect();
        let mut users = reads::users_by_id(&self.pool, &ids).await?;
        Ok(keys
            .iter()
            .filter_map(|key| users.remove(&key.0).map(|row| (*key, row)))
            .collect())
    }
}
