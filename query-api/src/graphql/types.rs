//! The object types: devices, connections, users, statistics and usage.

use async_graphql::{ComplexObject, Context, Object, SimpleObject};
use chrono::{DateTime, NaiveDate, Utc};
use read_models::fleet::DeviceRow;
use uuid::Uuid;

use super::loaders::{OwnerCount, OwnerPage, StatsOf, UsageOf, UserRecordOf};
use super::scalars::{BigInt, encode_cursor, encode_user_cursor};
use super::{
    DeviceStatus, DevicesOrderBy, Provider, Tier, UsageGroupBy, UserDevicesFilter, fleet_v2_error, loader,
    page_request, read_context, usage_range, usage_read_error,
};
use crate::reads::{
    self, Counted, DeviceFilter, DeviceKey, FleetSize, Owners, Page, PageRequest, StatsRecord, StatsTotals,
    UsageRecord, UsageSubject, UserFilter, UserPage, UserPageRequest,
};
use read_models::users::UserRow;

/// A virtual device as the fleet projection shows it.
#[derive(Debug, Clone)]
pub struct Device(pub DeviceRow);

/// A virtual Android device as the fleet projection shows it: its owner, cloud, status and size,
/// when it was created and last started, the minutes it was billed, and its usage.
#[Object]
impl Device {
    /// The device's id.
    async fn id(&self) -> Uuid {
        self.0.device_id
    }

    /// The id of the user who owns the device.
    async fn owner_id(&self) -> Uuid {
        self.0.owner_id
    }

    /// The device's owner (visible to the caller, since the device is).
    async fn owner(&self) -> User {
        User(self.0.owner_id)
    }

    /// The cloud that hosts the device.
    async fn provider(&self) -> Provider {
        self.0.provider.into()
    }

    /// The device's current status.
    async fn status(&self) -> DeviceStatus {
        self.0.status.into()
    }

    /// Virtual CPU cores.
    async fn cpu_cores(&self) -> i32 {
        self.0.cpu_cores
    }

    /// Memory in MiB.
    async fn memory_mb(&self) -> i32 {
        self.0.memory_mb
    }

    /// The Android major version the device runs (e.g. 13).
    async fn android_version(&self) -> i32 {
        i32::from(self.0.android_version)
    }

    /// When the device was created.
    async fn created_at(&self) -> DateTime<Utc> {
        self.0.created_at
    }

    /// When the device was last started (null if it never was).
    async fn last_started_at(&self) -> Option<DateTime<Utc>> {
        self.0.last_started_at
    }

    /// Billed minutes over the device's life.
    async fn minutes_used(&self) -> BigInt {
        BigInt(self.0.minutes_used)
    }

    /// Log position of the last event applied to this device.
    async fn updated_position(&self) -> BigInt {
        BigInt(self.0.updated_position)
    }

    /// This device's usage over a range of UTC days (batched across devices).
    async fn usage(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "The first UTC day of the range.")] from: NaiveDate,
        #[graphql(desc = "The last UTC day of the range (included; at most 366 days after `from`).")] to: NaiveDate,
        #[graphql(desc = "The period rows sum over (default `DAY`; `HOUR` takes at most 31 days).")] group_by: Option<
            UsageGroupBy,
        >,
    ) -> async_graphql::Result<DailyUsage> {
        usage_of(
            ctx,
            UsageSubject::Device,
            self.0.device_id,
            from,
            to,
            group_by.unwrap_or_default(),
        )
        .await
    }
}

async fn usage_of(
    ctx: &Context<'_>,
    subject: UsageSubject,
    id: Uuid,
    from: NaiveDate,
    to: NaiveDate,
    group_by: UsageGroupBy,
) -> async_graphql::Result<DailyUsage> {
    let read = read_context(ctx);
    let period = group_by.into();
    usage_range(&read.limits, from, to, period)?;
    let key = UsageOf {
        subject,
        id,
        from,
        to,
        period,
    };
    let records = loader(ctx)
        .load_one(key)
        .await
        .map_err(|e| usage_read_error(read, period, &e))?;
    Ok(DailyUsage::new(records.unwrap_or_default()))
}

/// A user: their devices, usage and statistics.
#[derive(Debug, Clone, Copy)]
pub struct User(pub Uuid);

impl User {
    /// The user's `users` row (batched across users), or `None` when the log never
    /// registered them. A `User` is only ever made for a user the caller may see; the check
    /// here keeps it so should that ever change.
    async fn record(&self, ctx: &Context<'_>, field: &str) -> async_graphql::Result<Option<UserRow>> {
        let read = read_context(ctx);
        if !read.viewer.can_see(self.0) {
            return Ok(None);
        }
        loader(ctx)
            .load_one(UserRecordOf(self.0))
            .await
            .map_err(|e| fleet_v2_error(read, field, &e))
    }
}

/// A user: their tier, quota and registration, their devices, usage and statistics. The
/// fields from `tier` to `erasedAt` are served by version 2 of the `fleet` projection: until
/// it is live (`cloudphone replay fleet`) they answer with the error code
/// `PROJECTION_VERSION`. No personal data (email, phone) is served.
#[Object]
impl User {
    /// The user's id.
    async fn id(&self) -> Uuid {
        self.0
    }

    /// The user's subscription tier (null if the log holds no registration for this id).
    async fn tier(&self, ctx: &Context<'_>) -> async_graphql::Result<Option<Tier>> {
        Ok(self.record(ctx, "User.tier").await?.map(|row| row.tier.into()))
    }

    /// The user's device limits (null before any were set, or if the log holds no
    /// registration for this id).
    async fn quota(&self, ctx: &Context<'_>) -> async_graphql::Result<Option<Quota>> {
        Ok(self
            .record(ctx, "User.quota")
            .await?
            .and_then(|row| row.quota)
            .map(|quota| Quota {
                max_devices: BigInt(i64::from(quota.max_devices)),
                max_cpu_cores: BigInt(i64::from(quota.max_cpu_cores)),
                max_memory_mb: BigInt(i64::from(quota.max_memory_mb)),
            }))
    }

    /// When the user registered (null if the log holds no registration for this id).
    async fn registered_at(&self, ctx: &Context<'_>) -> async_graphql::Result<Option<DateTime<Utc>>> {
        Ok(self
            .record(ctx, "User.registeredAt")
            .await?
            .map(|row| row.registered_at))
    }

    /// Whether the user asked to be forgotten: their personal data was crypto-shredded (null
    /// if the log holds no registration for this id).
    async fn erased(&self, ctx: &Context<'_>) -> async_graphql::Result<Option<bool>> {
        Ok(self.record(ctx, "User.erased").await?.map(|row| row.erased))
    }

    /// When the user was erased (null if they were not).
    async fn erased_at(&self, ctx: &Context<'_>) -> async_graphql::Result<Option<DateTime<Utc>>> {
        Ok(self.record(ctx, "User.erasedAt").await?.and_then(|row| row.erased_at))
    }

    /// The user's devices (batched across users: one statement per page shape).
    #[graphql(complexity = "first.or(last).unwrap_or(20).clamp(1, 100) as usize * child_complexity + 1")]
    #[allow(clippy::too_many_arguments)]
    async fn devices(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "Which of the user's devices to list.")] filter: Option<UserDevicesFilter>,
        #[graphql(desc = "The order of the list (default `CREATED_AT_ASC`).")] order_by: Option<DevicesOrderBy>,
        #[graphql(desc = "Page forward: at most this many devices after `after` (0 to 100; default 20).")]
        first: Option<i32>,
        #[graphql(desc = "A cursor from this list and order: the page starts after it.")] after: Option<String>,
        #[graphql(desc = "Page backward: at most this many devices before `before` (0 to 100).")] last: Option<i32>,
        #[graphql(desc = "A cursor from this list and order: the page ends before it.")] before: Option<String>,
    ) -> async_graphql::Result<DeviceConnection> {
        let read = read_context(ctx);
        let request = page_request(
            &read.limits,
            order_by.unwrap_or_default(),
            first,
            after.as_deref(),
            last,
            before.as_deref(),
        )?;
        let key = OwnerPage {
            owner: self.0,
            conditions: filter.unwrap_or_default().conditions()?,
            page: request,
            counted: counted_if_asked(ctx),
        };
        let page = loader(ctx)
            .load_one(key)
            .await
            .map_err(|e| read.database_error(&e))?
            .unwrap_or_default();
        Ok(DeviceConnection {
            filter: DeviceFilter {
                owners: Owners::Only(self.0),
                conditions: key.conditions,
            },
            request,
            page,
            batched_count: true,
        })
    }

    /// The user's usage over a range of UTC days.
    async fn usage(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "The first UTC day of the range.")] from: NaiveDate,
        #[graphql(desc = "The last UTC day of the range (included; at most 366 days after `from`).")] to: NaiveDate,
        #[graphql(desc = "The period rows sum over (default `DAY`; `HOUR` takes at most 31 days).")] group_by: Option<
            UsageGroupBy,
        >,
    ) -> async_graphql::Result<DailyUsage> {
        usage_of(ctx, UsageSubject::User, self.0, from, to, group_by.unwrap_or_default()).await
    }

    /// The user's live devices by status and provider.
    async fn stats(&self) -> DeviceStats {
        DeviceStats::of_user(self.0)
    }
}

/// A page of devices (a Relay connection): the devices, their cursors, where the page sits
/// and how many devices match across every page.
#[derive(Debug, Clone)]
pub struct DeviceConnection {
    filter: DeviceFilter,
    request: PageRequest,
    page: Page,
    /// Nested under a user: the count is batched across users.
    batched_count: bool,
}

/// Whether the connection a field returns should count its rows in the page's statement:
/// when the document selects its `totalCount`.
pub(crate) fn counted_if_asked(ctx: &Context<'_>) -> Counted {
    if ctx.look_ahead().field("totalCount").exists() {
        Counted::Yes
    } else {
        Counted::No
    }
}

impl DeviceConnection {
    pub(crate) fn top_level(filter: DeviceFilter, request: PageRequest, page: Page) -> Self {
        DeviceConnection {
            filter,
            request,
            page,
            batched_count: false,
        }
    }

    fn cursor(&self, row: &DeviceRow) -> String {
        encode_cursor(self.request.order, &DeviceKey::of(self.request.order, row))
    }
}

/// A device with its cursor.
#[derive(SimpleObject, Debug, Clone)]
pub struct DeviceEdge {
    /// Opaque: pass it as `after` or `before` to page on from this device (in the same order).
    pub cursor: String,
    /// The device.
    pub node: Device,
}

/// Where a page sits in its list.
#[derive(SimpleObject, Debug, Clone)]
pub struct PageInfo {
    /// For a forward page, whether more rows follow; for a backward page, whether a
    /// `before` cursor was given (rows exist after it).
    pub has_next_page: bool,
    /// For a forward page, whether an `after` cursor was given (rows exist before it).
    /// For a backward page, whether more rows come before it.
    pub has_previous_page: bool,
    /// The cursor of the page's first row (null for an empty page).
    pub start_cursor: Option<String>,
    /// The cursor of the page's last row (null for an empty page): `after` for the next page.
    pub end_cursor: Option<String>,
}

impl PageInfo {
    /// Where a page read in the direction `backward` from a cursor (`paged_from`) sits, with
    /// `more` rows beyond it in that direction.
    fn of(
        backward: bool,
        paged_from: bool,
        more: bool,
        start_cursor: Option<String>,
        end_cursor: Option<String>,
    ) -> Self {
        let (has_next_page, has_previous_page) = if backward {
            (paged_from, more)
        } else {
            (more, paged_from)
        };
        PageInfo {
            has_next_page,
            has_previous_page,
            start_cursor,
            end_cursor,
        }
    }
}

/// A page of devices (a Relay connection): the devices, their cursors, where the page sits
/// and how many devices match across every page.
#[Object]
impl DeviceConnection {
    /// The page's devices with their cursors.
    async fn edges(&self) -> Vec<DeviceEdge> {
        self.page
            .rows
            .iter()
            .map(|row| DeviceEdge {
                cursor: self.cursor(row),
                node: Device(row.clone()),
            })
            .collect()
    }

    /// The page's devices (as `edges`, without cursors).
    async fn nodes(&self) -> Vec<Device> {
        self.page.rows.iter().cloned().map(Device).collect()
    }

    /// Where the page sits in the list.
    async fn page_info(&self) -> PageInfo {
        PageInfo::of(
            self.request.backward,
            self.request.from.is_some(),
            self.page.more,
            self.page.rows.first().map(|row| self.cursor(row)),
            self.page.rows.last().map(|row| self.cursor(row)),
        )
    }

    /// Devices matching the filter, across every page.
    async fn total_count(&self, ctx: &Context<'_>) -> async_graphql::Result<BigInt> {
        if let Some(total) = self.page.total {
            return Ok(BigInt(total));
        }
        let read = read_context(ctx);
        let count = match (self.batched_count, self.filter.owners) {
            (true, Owners::Only(owner)) => loader(ctx)
                .load_one(OwnerCount {
                    owner,
                    conditions: self.filter.conditions,
                })
                .await
                .map_err(|e| read.database_error(&e))?
                .unwrap_or(0),
            _ => read
                .read_once(format!("count_devices {:?}", self.filter), || {
                    reads::count_devices(&read.read_pool, &self.filter)
                })
                .await
                .map_err(|e| read.database_error(&e))?,
        };
        Ok(BigInt(count))
    }
}

/// A user's device limits.
#[derive(SimpleObject, Debug, Clone)]
pub struct Quota {
    /// Most devices the user may have (deleted ones not counted).
    pub max_devices: BigInt,
    /// Most virtual CPU cores over the user's devices.
    pub max_cpu_cores: BigInt,
    /// Most memory in MiB over the user's devices.
    pub max_memory_mb: BigInt,
}

/// A page of users (a Relay connection), ordered by user id: the users, their cursors, where
/// the page sits and how many users match across every page.
#[derive(Debug, Clone)]
pub struct UserConnection {
    filter: UserFilter,
    request: UserPageRequest,
    page: UserPage,
}

impl UserConnection {
    pub(crate) fn new(filter: UserFilter, request: UserPageRequest, page: UserPage) -> Self {
        UserConnection { filter, request, page }
    }
}

/// A user with their cursor.
#[derive(SimpleObject, Debug, Clone)]
pub struct UserEdge {
    /// Opaque: pass it as `after` or `before` to page on from this user.
    pub cursor: String,
    /// The user.
    pub node: User,
}

/// A page of users (a Relay connection), ordered by user id: the users, their cursors, where
/// the page sits and how many users match across every page.
#[Object]
impl UserConnection {
    /// The page's users with their cursors.
    async fn edges(&self) -> Vec<UserEdge> {
        self.page
            .rows
            .iter()
            .map(|row| UserEdge {
                cursor: encode_user_cursor(row.user_id),
                node: User(row.user_id),
            })
            .collect()
    }

    /// The page's users (as `edges`, without cursors).
    async fn nodes(&self) -> Vec<User> {
        self.page.rows.iter().map(|row| User(row.user_id)).collect()
    }

    /// Where the page sits in the list.
    async fn page_info(&self) -> PageInfo {
        PageInfo::of(
            self.request.backward,
            self.request.from.is_some(),
            self.page.more,
            self.page.rows.first().map(|row| encode_user_cursor(row.user_id)),
            self.page.rows.last().map(|row| encode_user_cursor(row.user_id)),
        )
    }

    /// Users matching the filter, across every page.
    async fn total_count(&self, ctx: &Context<'_>) -> async_graphql::Result<BigInt> {
        let read = read_context(ctx);
        let count = read
            .read_once(format!("count_users {:?}", self.filter), || {
                reads::count_users(&read.read_pool, &self.filter)
            })
            .await
            .map_err(|e| fleet_v2_error(read, "users", &e))?;
        Ok(BigInt(count))
    }
}

/// The fleet's size at one point: devices per status at the end of the hour (or day) that
/// starts at `at`, or now for the current one. Deleted devices are not counted.
#[derive(SimpleObject, Debug, Clone, PartialEq, Eq)]
pub struct FleetSizePoint {
    /// The start of the UTC hour (or day).
    pub at: DateTime<Utc>,
    /// Devices stopped (created and not running).
    pub stopped: BigInt,
    /// Devices running.
    pub running: BigInt,
    /// Devices failed.
    pub failed: BigInt,
    /// Every device counted: `stopped + running + failed`.
    pub total: BigInt,
}

impl From<FleetSize> for FleetSizePoint {
    fn from(size: FleetSize) -> Self {
        FleetSizePoint {
            at: size.at,
            stopped: BigInt(size.stopped),
            running: BigInt(size.running),
            failed: BigInt(size.failed),
            total: BigInt(size.stopped + size.running + size.failed),
        }
    }
}

/// Live devices (deleted ones are not counted) by user, status and provider, with totals.
#[derive(Debug, Clone, Copy)]
pub struct DeviceStats {
    source: StatsSource,
}

#[derive(Debug, Clone, Copy)]
enum StatsSource {
    Filter(DeviceFilter),
    /// One user's rows, batched across users.
    User(Uuid),
}

impl DeviceStats {
    pub(crate) fn filtered(filter: DeviceFilter) -> Self {
        DeviceStats {
            source: StatsSource::Filter(filter),
        }
    }

    pub(crate) fn of_user(user: Uuid) -> Self {
        DeviceStats {
            source: StatsSource::User(user),
        }
    }

    /// Whether the filter keeps to one owner's rows: at most one per status and provider, so
    /// reading them all costs no more than reading a page, and `rows` and `totals` share one
    /// statement instead of two.
    fn one_owner(filter: &DeviceFilter) -> bool {
        matches!(filter.owners, Owners::Only(_))
    }

    /// Every row of a one-owner filter, read once for both `rows` and `totals`.
    async fn owner_rows(ctx: &Context<'_>, filter: DeviceFilter) -> async_graphql::Result<Vec<StatsRecord>> {
        let read = read_context(ctx);
        read.read_once(format!("stats_rows {filter:?} all"), || {
            reads::stats_rows(&read.read_pool, &filter, i64::MAX)
        })
        .await
        .map_err(|e| read.database_error(&e))
    }

    async fn user_rows(ctx: &Context<'_>, user: Uuid) -> async_graphql::Result<Vec<StatsRecord>> {
        let read = read_context(ctx);
        Ok(loader(ctx)
            .load_one(StatsOf(user))
            .await
            .map_err(|e| read.database_error(&e))?
            .unwrap_or_default())
    }
}

/// One `device_stats` row.
#[derive(SimpleObject, Debug, Clone)]
pub struct DeviceStatsRow {
    /// The devices' owner.
    pub user_id: Uuid,
    /// The devices' status.
    pub status: DeviceStatus,
    /// The devices' cloud provider.
    pub provider: Provider,
    /// How many devices the row counts.
    pub device_count: BigInt,
    /// Their virtual CPU cores, summed.
    pub cpu_cores: BigInt,
    /// Their memory in MiB, summed.
    pub memory_mb: BigInt,
    /// Newest creation time among the devices counted.
    pub last_created_at: DateTime<Utc>,
}

impl From<StatsRecord> for DeviceStatsRow {
    fn from(record: StatsRecord) -> Self {
        DeviceStatsRow {
            user_id: record.user_id,
            status: record.status.into(),
            provider: record.provider.into(),
            device_count: BigInt(record.device_count),
            cpu_cores: BigInt(record.cpu_cores),
            memory_mb: BigInt(record.memory_mb),
            last_created_at: record.last_created_at,
        }
    }
}

/// Sums over every row the filter matches (not only the rows returned).
#[derive(SimpleObject, Debug, Clone)]
pub struct DeviceStatsTotals {
    /// Devices counted.
    pub device_count: BigInt,
    /// Their virtual CPU cores, summed.
    pub cpu_cores: BigInt,
    /// Their memory in MiB, summed.
    pub memory_mb: BigInt,
}

impl From<StatsTotals> for DeviceStatsTotals {
    fn from(totals: StatsTotals) -> Self {
        DeviceStatsTotals {
            device_count: BigInt(totals.device_count),
            cpu_cores: BigInt(totals.cpu_cores),
            memory_mb: BigInt(totals.memory_mb),
        }
    }
}

/// Live devices (deleted ones are not counted) by user, status and provider, with totals.
#[Object]
impl DeviceStats {
    /// Rows ordered by user, status and provider.
    // Aggregate rows from one statement: weighed per hundred, so aliases of large pages add up
    // against the complexity limit.
    #[graphql(complexity = "((first.max(1) as usize + 99) / 100) * child_complexity + 1")]
    async fn rows(
        &self,
        ctx: &Context<'_>,
        #[graphql(
            default = 500,
            validator(minimum = 0, maximum = 5000),
            desc = "At most this many rows (0 to 5000)."
        )]
        first: i32,
    ) -> async_graphql::Result<Vec<DeviceStatsRow>> {
        let read = read_context(ctx);
        let records = match self.source {
            StatsSource::Filter(filter) if !Self::one_owner(&filter) => read
                .read_once(format!("stats_rows {filter:?} {first}"), || {
                    reads::stats_rows(&read.read_pool, &filter, i64::from(first))
                })
                .await
                .map_err(|e| read.database_error(&e))?,
            StatsSource::Filter(filter) => {
                let mut rows = Self::owner_rows(ctx, filter).await?;
                rows.truncate(usize::try_from(first).unwrap_or(0));
                rows
            }
            StatsSource::User(user) => {
                let mut rows = Self::user_rows(ctx, user).await?;
                rows.truncate(usize::try_from(first).unwrap_or(0));
                rows
            }
        };
        Ok(records.into_iter().map(Into::into).collect())
    }

    /// Sums over every row the filter matches (not only the rows returned).
    async fn totals(&self, ctx: &Context<'_>) -> async_graphql::Result<DeviceStatsTotals> {
        let read = read_context(ctx);
        let totals = match self.source {
            StatsSource::Filter(filter) if !Self::one_owner(&filter) => read
                .read_once(format!("stats_totals {filter:?}"), || {
                    reads::stats_totals(&read.read_pool, &filter)
                })
                .await
                .map_err(|e| read.database_error(&e))?,
            StatsSource::Filter(filter) => StatsTotals::of(&Self::owner_rows(ctx, filter).await?),
            StatsSource::User(user) => StatsTotals::of(&Self::user_rows(ctx, user).await?),
        };
        Ok(totals.into())
    }
}

/// An amount of money in integer minor units (cents for USD).
#[derive(SimpleObject, Debug, Clone, PartialEq, Eq)]
pub struct Money {
    /// The amount in the currency's minor unit (cents for USD, yen for JPY).
    pub amount_minor: BigInt,
    /// ISO 4217 code.
    pub currency: String,
}

/// Usage of one period (hour, day, week or month) in one currency.
#[derive(SimpleObject, Debug, Clone)]
pub struct UsagePeriod {
    /// The first day of the period (for an hour, the UTC day it is in).
    pub period: NaiveDate,
    /// The first instant of the period, in UTC: the hour for `HOUR`, else midnight of
    /// `period`.
    pub period_start: DateTime<Utc>,
    /// Billed minutes in the period.
    pub minutes: BigInt,
    /// What the minutes cost.
    pub cost: Money,
}

/// Sums over the whole range.
#[derive(SimpleObject, Debug, Clone)]
pub struct UsageTotals {
    /// Billed minutes over the range.
    pub minutes: BigInt,
    /// One amount per currency billed in the range.
    pub costs: Vec<Money>,
}

/// Usage rows per period with totals over the range.
#[derive(SimpleObject, Debug, Clone)]
#[graphql(complex)]
pub struct DailyUsage {
    /// One row per period and currency with usage, oldest period first.
    pub rows: Vec<UsagePeriod>,
    #[graphql(skip)]
    records: Vec<UsageRecord>,
}

impl DailyUsage {
    pub(crate) fn new(records: Vec<UsageRecord>) -> Self {
        let rows = records
            .iter()
            .map(|record| UsagePeriod {
                period: record.period,
                period_start: record.period_start,
                minutes: BigInt(record.minutes),
                cost: Money {
                    amount_minor: BigInt(record.cost_minor),
                    currency: record.currency.clone(),
                },
            })
            .collect();
        DailyUsage { rows, records }
    }
}

#[ComplexObject]
impl DailyUsage {
    /// Sums over the whole range.
    async fn totals(&self) -> UsageTotals {
        let mut costs: Vec<Money> = Vec::new();
        let mut minutes = 0i64;
        for record in &self.records {
            minutes += record.minutes;
            match costs.iter_mut().find(|m| m.currency == record.currency) {
                Some(money) => money.amount_minor = BigInt(money.amount_minor.0 + record.cost_minor),
                None => costs.push(Money {
                    amount_minor: BigInt(record.cost_minor),
                    currency: record.currency.clone(),
                }),
            }
        }
        costs.sort_by(|a, b| a.currency.cmp(&b.currency));
        UsageTotals {
            minutes: BigInt(minutes),
            costs,
        }
    }
}
