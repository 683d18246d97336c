//! The GraphQL schema dashboards query: device statistics, daily usage and cost, device
//! lists as Relay connections, users with their nested devices and usage, projection status.
//!
//! Conventions follow Relay and PostGraphile: connections with `edges`, `nodes`, `pageInfo`
//! and `totalCount`; opaque keyset cursors; 64-bit integers as `BigInt` strings; money as
//! integer minor units with a currency; dates as ISO strings. A `user` caller only ever sees
//! its own rows, whatever filter it passes: scoping happens here, before any SQL is built.
//!
//! This module holds what the types share (limits, the caller, the per-request read context,
//! enums and inputs, argument checks) and builds the schema; `query` holds the root object,
//! `types` the objects below it, [`loaders`] their batched nested loads, [`scalars`] the
//! custom scalars, [`document`] the measuring of a document before validation, and
//! `handler` the `POST /graphql` handler that serves the schema.

#[cfg(test)]
mod descriptions;
pub mod document;
pub(crate) mod handler;
pub mod loaders;
mod operations;
mod query;
pub mod scalars;
pub mod subscription;
mod types;

use std::any::Any;
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_graphql::dataloader::DataLoader;
use async_graphql::{Context, EmptyMutation, Enum, ErrorExtensions, InputObject, Schema, SimpleObject};
use chrono::{DateTime, NaiveDate, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use self::loaders::ReadLoader;
pub use self::query::{ProjectionState, Query};
use self::scalars::{BigInt, decode_cursor};
pub use self::subscription::{Changes, Interest, Subscription};
pub use self::types::{DailyUsage, Device, DeviceConnection, DeviceStats, FleetSizePoint, Money, User, UserConnection};
use crate::read_pool::ReadPool;
use crate::reads::{
    DeviceConditions, DeviceFilter, DeviceOrder, HistoryPeriod, HistoryQuery, Owners, PageRequest, Period, TimeRange,
    UserFilter, UserPageRequest,
};
use crate::sources::Route;

/// The schema served at `/graphql` (subscriptions over WebSocket at the same path).
pub type DashboardSchema = Schema<Query, EmptyMutation, Subscription>;

/// Limits that keep one query from taking the service down.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Page size when neither `first` nor `last` is given.
    pub default_page_size: i32,
    /// Largest `first` / `last`.
    pub max_page_size: i32,
    /// Longest range of `dailyUsage` and `usage`, in days.
    pub max_usage_days: i64,
    /// Longest range grouped by `HOUR`, in hours (whole days of 24): what bounds the rows of
    /// an hourly answer.
    pub max_usage_hours: i64,
    /// Most points (hours or days) one `fleetHistory` answer may hold.
    pub max_history_points: i64,
    /// Complexity: fields, with each connection's page size multiplying what it holds.
    pub max_complexity: usize,
    /// What a document may be before it is validated (its depth limit included).
    pub document: document::DocumentLimits,
    /// How long a nested load waits for its siblings' keys before it runs as one statement:
    /// longer batches more under a busy CPU, and adds that much to each nesting level.
    /// Zero still batches the siblings of one level: they ask for their keys in one poll of
    /// the request's task, and the load is a task of its own that runs after that poll (the
    /// runtime runs a task just spawned next on the same thread) and after a timer of zero.
    pub load_batch_window: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            default_page_size: 20,
            max_page_size: 100,
            max_usage_days: 366,
            max_usage_hours: 31 * 24,
            // 31 days by the hour, about two years by the day.
            max_history_points: 744,
            max_complexity: 5_000,
            document: document::DocumentLimits::default(),
            // 1 ms cost a dashboard's user overview a millisecond per nesting level, twice what
            // PostGraphile answered it in with one client.
            load_batch_window: Duration::ZERO,
        }
    }
}

/// Who is asking: everything is scoped by this before SQL is built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Viewer {
    /// Admins: every user's rows, and the operations fields (see [`operations`]).
    Admin,
    /// Read-only services: every user's rows.
    Everyone,
    /// A user: their own rows only.
    User(Uuid),
}

impl Viewer {
    /// Whose rows a read with this `userId` filter may return.
    pub fn owners(self, requested: Option<Uuid>) -> Owners {
        match (self, requested) {
            (Viewer::Admin | Viewer::Everyone, None) => Owners::Any,
            (Viewer::Admin | Viewer::Everyone, Some(user)) => Owners::Only(user),
            (Viewer::User(me), None) => Owners::Only(me),
            (Viewer::User(me), Some(user)) if user == me => Owners::Only(me),
            (Viewer::User(_), Some(_)) => Owners::Nobody,
        }
    }

    pub fn can_see(self, owner: Uuid) -> bool {
        match self {
            Viewer::Admin | Viewer::Everyone => true,
            Viewer::User(me) => me == owner,
        }
    }

    /// The part of a cache key that separates what different callers may see.
    pub fn cache_scope(self) -> String {
        match self {
            // Apart from services': an admin's answers may hold what only admins see.
            Viewer::Admin => "admin".to_owned(),
            Viewer::Everyone => "everyone".to_owned(),
            Viewer::User(id) => format!("user:{id}"),
        }
    }
}

/// What one request's resolvers share: the caller, the source it was routed to, whether
/// that source failed under it (then the whole request runs again on the primary), and the
/// reads made so far.
#[derive(Debug)]
pub struct ReadContext {
    pub viewer: Viewer,
    /// The routed source's pool for operator views ([`crate::graphql::operations`]).
    pub pool: PgPool,
    /// The routed source's pool for the dashboards' reads ([`crate::reads`]).
    pub read_pool: ReadPool,
    pub limits: Limits,
    source_failed: AtomicBool,
    /// Statements run for this request, by what they asked (see [`ReadContext::read_once`]).
    reads: Mutex<HashMap<String, Arc<tokio::sync::OnceCell<ReadResult>>>>,
    /// What a subscription's answer depends on, as its root field noted it.
    interest: Mutex<Option<Interest>>,
}

/// A read's rows, or the error it failed with, shared by every field that asked the same.
type ReadResult = Result<Arc<dyn Any + Send + Sync>, Arc<sqlx::Error>>;

impl ReadContext {
    pub fn new(viewer: Viewer, route: &Route, limits: Limits) -> Self {
        ReadContext {
            viewer,
            pool: route.pool.clone(),
            read_pool: route.reads.clone(),
            limits,
            source_failed: AtomicBool::new(false),
            reads: Mutex::new(HashMap::new()),
            interest: Mutex::new(None),
        }
    }

    /// Notes what a subscription field reads (see [`Interest`]).
    pub fn note_interest(&self, interest: Interest) {
        *self.interest.lock().unwrap_or_else(PoisonError::into_inner) = Some(interest);
    }

    /// What the subscription evaluated with this context reads, if its field said.
    pub fn interest(&self) -> Option<Interest> {
        *self.interest.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `read` once per request for one `key` (the read's name and arguments); every other
    /// field asking the same shares its rows. async-graphql resolves each copy of a field a
    /// document selects (it does not merge the fields of one response key, as graphql-js
    /// does), so without this a document repeating a field a thousand times, in the text or
    /// through fragment spreads, within every limit, would run a thousand statements.
    pub async fn read_once<T, F, Fut>(&self, key: String, read: F) -> Result<T, Arc<sqlx::Error>>
    where
        T: Clone + Send + Sync + 'static,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, sqlx::Error>>,
    {
        // The type is part of the key, so the rows under one key are always a `T`.
        let key = format!("{} {key}", std::any::type_name::<T>());
        let cell = {
            let mut reads = self.reads.lock().unwrap_or_else(PoisonError::into_inner);
            Arc::clone(reads.entry(key).or_default())
        };
        let shared = cell
            .get_or_init(|| async {
                match read().await {
                    Ok(rows) => Ok(Arc::new(rows) as Arc<dyn Any + Send + Sync>),
                    Err(error) => Err(Arc::new(error)),
                }
            })
            .await;
        match shared {
            Ok(rows) => Ok(rows
                .downcast_ref::<T>()
                .cloned()
                .unwrap_or_else(|| unreachable!("the rows of a key are of the type in the key"))),
            Err(error) => Err(Arc::clone(error)),
        }
    }

    /// True when a statement failed because the source did (not because of the query).
    pub fn source_failed(&self) -> bool {
        self.source_failed.load(Ordering::Relaxed)
    }

    /// The GraphQL error for a failed statement; details go to the log, not to the client.
    pub fn database_error(&self, error: &sqlx::Error) -> async_graphql::Error {
        if crate::sources::is_source_failure(error) {
            self.source_failed.store(true, Ordering::Relaxed);
            tracing::warn!(%error, "read model source failed");
            async_graphql::Error::new("the read models are unavailable right now; retry shortly")
                .extend_with(|_, e| e.set("code", "SOURCE_UNAVAILABLE"))
        } else if is_data_exception(error) {
            // A value PostgreSQL cannot hold (a date or number out of its range): the
            // arguments' fault, whatever check let it through.
            tracing::info!(%error, "read model query refused a value");
            bad_input("a value in the query is out of the range the read models can hold")
        } else {
            tracing::error!(%error, "read model query failed");
            async_graphql::Error::new("the read models could not be read")
                .extend_with(|_, e| e.set("code", "INTERNAL_SERVER_ERROR"))
        }
    }
}

pub(crate) fn read_context<'a>(ctx: &Context<'a>) -> &'a ReadContext {
    ctx.data_unchecked::<Arc<ReadContext>>()
}

pub(crate) fn loader<'a>(ctx: &Context<'a>) -> &'a DataLoader<ReadLoader> {
    ctx.data_unchecked::<DataLoader<ReadLoader>>()
}

/// A client error with a code dashboards can branch on.
pub(crate) fn bad_input(message: impl Into<String>) -> async_graphql::Error {
    async_graphql::Error::new(message).extend_with(|_, e| e.set("code", "BAD_USER_INPUT"))
}

/// The statuses of a device as read models show them.
#[derive(Enum, Debug, Clone, Copy, PartialEq, Eq)]
#[graphql(remote = "event_schema::DeviceStatus")]
pub enum DeviceStatus {
    /// Created or stopped: not running and not billed.
    Stopped,
    /// Started and billed by the minute until it stops.
    Running,
    /// Stopped by a failure on the provider's side (not billed).
    Failed,
    /// Deleted by its owner; the row is kept, but statistics do not count it.
    Deleted,
}

/// The cloud that hosts a device.
#[derive(Enum, Debug, Clone, Copy, PartialEq, Eq)]
#[graphql(remote = "event_schema::Provider")]
pub enum Provider {
    /// Amazon Web Services.
    Aws,
    /// Google Cloud Platform.
    Gcp,
    /// Microsoft Azure.
    Azure,
    /// Alibaba Cloud.
    Alibaba,
    /// Huawei Cloud.
    Huawei,
}

/// A customer's subscription tier: it selects default quotas and prices.
#[derive(Enum, Debug, Clone, Copy, PartialEq, Eq)]
#[graphql(remote = "event_schema::Tier")]
pub enum Tier {
    /// The free tier.
    Free,
    /// The basic paid tier.
    Basic,
    /// The professional tier.
    Pro,
    /// The enterprise tier.
    Enterprise,
}

/// Which users `users` lists; every condition given must hold.
#[derive(InputObject, Debug, Clone, Default)]
pub struct UsersFilter {
    /// Only users in one of these tiers (a single value is a list of one; an empty list
    /// matches nothing).
    pub tier: Option<Vec<Tier>>,
    /// Only users who were erased (`true`) or only those who were not (`false`).
    pub erased: Option<bool>,
}

impl From<UsersFilter> for UserFilter {
    fn from(filter: UsersFilter) -> Self {
        UserFilter {
            tiers: filter.tier.map(|list| list.into_iter().map(Into::into).collect()),
            erased: filter.erased,
        }
    }
}

/// The points of `fleetHistory`.
#[derive(Enum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FleetHistoryGroupBy {
    /// One point per UTC hour (the default).
    #[default]
    Hour,
    /// One point per UTC day.
    Day,
}

impl From<FleetHistoryGroupBy> for HistoryPeriod {
    fn from(group: FleetHistoryGroupBy) -> Self {
        match group {
            FleetHistoryGroupBy::Hour => HistoryPeriod::Hour,
            FleetHistoryGroupBy::Day => HistoryPeriod::Day,
        }
    }
}

/// The range of `fleetHistory`: the hours (or days) from the one holding `from` up to the one
/// holding `to`, excluded (at most 744 points).
#[derive(InputObject, Debug, Clone, Copy)]
pub struct FleetHistoryFilter {
    /// Only this user's fleet (for a `user` caller, their own id or nothing); every user's
    /// when left out.
    pub user_id: Option<Uuid>,
    /// The first instant of the range: its hour (or day) is the first point.
    pub from: DateTime<Utc>,
    /// The first instant after the range (excluded); a partial hour (or day) counts whole.
    pub to: DateTime<Utc>,
}

impl FleetHistoryFilter {
    /// The history query this filter asks for, within the limits.
    pub(crate) fn query(
        self,
        limits: &Limits,
        viewer: Viewer,
        group_by: FleetHistoryGroupBy,
    ) -> async_graphql::Result<HistoryQuery> {
        let period = HistoryPeriod::from(group_by);
        if self.from >= self.to {
            return Err(bad_input(format!(
                "`from` ({}) must be before `to` ({})",
                self.from, self.to
            )));
        }
        for (name, at) in [("from", self.from), ("to", self.to)] {
            if !(1..=9999).contains(&chrono::Datelike::year(&at)) {
                return Err(bad_input(format!("`{name}` ({at}) must be in the years 1 to 9999")));
            }
        }
        let from = period.start_of(self.from);
        let last = period.start_of(self.to - chrono::Duration::microseconds(1));
        let points = (last - from).num_seconds() / period.length().num_seconds() + 1;
        if points > limits.max_history_points {
            return Err(bad_input(format!(
                "the range covers {points} points; at most {} are allowed (use `groupBy: DAY` for long ranges)",
                limits.max_history_points
            )));
        }
        Ok(HistoryQuery {
            owners: viewer.owners(self.user_id),
            from,
            to: last + period.length(),
            period,
        })
    }
}

/// The error of a field served by a projection version that is not live on this source.
pub(crate) fn projection_version_error(
    what: &str,
    version: i32,
    projection: &str,
    replay: &str,
) -> async_graphql::Error {
    async_graphql::Error::new(format!(
        "{what} needs version {version} of the {projection} projection, which is not live on this \
         source yet: run `cloudphone replay {replay}`"
    ))
    .extend_with(|_, e| e.set("code", "PROJECTION_VERSION"))
}

/// The error of a field served by version 2 of `fleet`, for a failed read: the version is not
/// live (`PROJECTION_VERSION`), or the source failed.
pub(crate) fn fleet_v2_error(read: &ReadContext, what: &str, error: &sqlx::Error) -> async_graphql::Error {
    if is_undefined_table(error) {
        projection_version_error(what, 2, "fleet", "fleet")
    } else {
        read.database_error(error)
    }
}

/// The order of a device list (ties broken by device id, in the list's direction, so every
/// device has one place and cursors are stable).
#[derive(Enum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DevicesOrderBy {
    /// Oldest first (the default).
    #[default]
    CreatedAtAsc,
    /// Newest first.
    CreatedAtDesc,
    /// Least recently started first; devices never started come before all others.
    LastStartedAtAsc,
    /// Most recently started first; devices never started come after all others.
    LastStartedAtDesc,
    /// Fewest billed minutes first.
    MinutesUsedAsc,
    /// Most billed minutes first.
    MinutesUsedDesc,
}

impl From<DevicesOrderBy> for DeviceOrder {
    fn from(order: DevicesOrderBy) -> Self {
        match order {
            DevicesOrderBy::CreatedAtAsc => DeviceOrder::CreatedAtAsc,
            DevicesOrderBy::CreatedAtDesc => DeviceOrder::CreatedAtDesc,
            DevicesOrderBy::LastStartedAtAsc => DeviceOrder::LastStartedAtAsc,
            DevicesOrderBy::LastStartedAtDesc => DeviceOrder::LastStartedAtDesc,
            DevicesOrderBy::MinutesUsedAsc => DeviceOrder::MinutesUsedAsc,
            DevicesOrderBy::MinutesUsedDesc => DeviceOrder::MinutesUsedDesc,
        }
    }
}

/// The period usage rows are summed over.
#[derive(Enum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UsageGroupBy {
    /// UTC hours; a row's `periodStart` is the hour, its `period` the UTC day the hour is in.
    /// The hours of a day always add up exactly to the day's minutes and cost. A range of at
    /// most 31 days (744 hours). Served by version 3 of the `daily_usage` projection: until it
    /// is live (`cloudphone replay daily-usage`), the error code `PROJECTION_VERSION`; from
    /// the swap on, answered with no restart. Not for `usageByProvider`.
    Hour,
    /// UTC days; a row's `period` is the day.
    #[default]
    Day,
    /// ISO weeks (Monday to Sunday); a row's `period` is the Monday.
    Week,
    /// Calendar months; a row's `period` is the first of the month.
    Month,
}

impl From<UsageGroupBy> for Period {
    fn from(group: UsageGroupBy) -> Self {
        match group {
            UsageGroupBy::Hour => Period::Hour,
            UsageGroupBy::Day => Period::Day,
            UsageGroupBy::Week => Period::Week,
            UsageGroupBy::Month => Period::Month,
        }
    }
}

/// Which devices (or device statistics) to return; every condition given must hold. A
/// `user` caller's own id is always applied; another user's id returns nothing.
#[derive(InputObject, Debug, Clone, Default)]
pub struct DeviceFilterInput {
    /// Only this user's devices (for a `user` caller, their own id or nothing).
    pub user_id: Option<Uuid>,
    /// Only devices in one of these statuses (a single value is a list of one; an empty list
    /// matches nothing).
    pub status: Option<Vec<DeviceStatus>>,
    /// Only devices on one of these cloud providers (a single value is a list of one; an
    /// empty list matches nothing).
    pub provider: Option<Vec<Provider>>,
    /// Only devices created in this range. Not for `deviceStats`, whose rows have no times.
    pub created_at: Option<TimeRangeInput>,
    /// Only devices last started in this range (never-started devices are left out). Not for
    /// `deviceStats`, whose rows have no times.
    pub last_started_at: Option<TimeRangeInput>,
}

impl DeviceFilterInput {
    fn scoped(self, viewer: Viewer) -> async_graphql::Result<DeviceFilter> {
        Ok(DeviceFilter {
            owners: viewer.owners(self.user_id),
            conditions: device_conditions(self.status, self.provider, self.created_at, self.last_started_at)?,
        })
    }
}

/// Devices of one user (nested under `User`); every condition given must hold.
#[derive(InputObject, Debug, Clone, Default)]
pub struct UserDevicesFilter {
    /// Only devices in one of these statuses (a single value is a list of one; an empty list
    /// matches nothing).
    pub status: Option<Vec<DeviceStatus>>,
    /// Only devices on one of these cloud providers (a single value is a list of one; an
    /// empty list matches nothing).
    pub provider: Option<Vec<Provider>>,
    /// Only devices created in this range.
    pub created_at: Option<TimeRangeInput>,
    /// Only devices last started in this range (never-started devices are left out).
    pub last_started_at: Option<TimeRangeInput>,
}

impl UserDevicesFilter {
    fn conditions(self) -> async_graphql::Result<DeviceConditions> {
        device_conditions(self.status, self.provider, self.created_at, self.last_started_at)
    }
}

/// Instants from `from` (included) to `to` (excluded); leave one out for an open end.
#[derive(InputObject, Debug, Clone, Copy, Default)]
#[graphql(name = "TimeRange")]
pub struct TimeRangeInput {
    /// The first instant in the range (included).
    pub from: Option<DateTime<Utc>>,
    /// The first instant after the range (excluded).
    pub to: Option<DateTime<Utc>>,
}

impl TimeRangeInput {
    fn checked(self, name: &str) -> async_graphql::Result<TimeRange> {
        if let (Some(from), Some(to)) = (self.from, self.to)
            && from > to
        {
            return Err(bad_input(format!("`{name}.from` ({from}) is after `{name}.to` ({to})")));
        }
        Ok(TimeRange {
            from: self.from,
            to: self.to,
        })
    }
}

fn device_conditions(
    status: Option<Vec<DeviceStatus>>,
    provider: Option<Vec<Provider>>,
    created_at: Option<TimeRangeInput>,
    last_started_at: Option<TimeRangeInput>,
) -> async_graphql::Result<DeviceConditions> {
    Ok(DeviceConditions {
        status: status.map(|list| list.into_iter().map(Into::into).collect()),
        provider: provider.map(|list| list.into_iter().map(Into::into).collect()),
        created_at: created_at.unwrap_or_default().checked("createdAt")?,
        last_started_at: last_started_at.unwrap_or_default().checked("lastStartedAt")?,
    })
}

/// Usage over the UTC days `from` to `to`, both included (at most 366 days).
#[derive(InputObject, Debug, Clone, Copy)]
pub struct UsageFilter {
    /// Only this user's usage (for a `user` caller, their own id or nothing).
    pub user_id: Option<Uuid>,
    /// Only this device's usage.
    pub device_id: Option<Uuid>,
    /// The first UTC day of the range.
    pub from: NaiveDate,
    /// The last UTC day of the range (included).
    pub to: NaiveDate,
}

/// A user's usage by provider over the UTC days `from` to `to`, both included (at most 366
/// days).
#[derive(InputObject, Debug, Clone, Copy)]
pub struct ProviderUsageFilter {
    /// Only this user's usage (for a `user` caller, their own id or nothing).
    pub user_id: Option<Uuid>,
    /// The first UTC day of the range.
    pub from: NaiveDate,
    /// The last UTC day of the range (included).
    pub to: NaiveDate,
}

/// Usage of one period on one cloud provider in one currency.
#[derive(SimpleObject, Debug, Clone)]
pub struct ProviderUsage {
    /// The first day of the period.
    pub period: NaiveDate,
    /// The cloud the devices ran on.
    pub provider: Provider,
    /// Billed minutes in the period.
    pub minutes: BigInt,
    /// Sessions that touched the period.
    pub sessions: BigInt,
    /// What the minutes cost.
    pub cost: Money,
}

/// SQLSTATE class 22, data exception: a value out of range, an invalid date.
fn is_data_exception(error: &sqlx::Error) -> bool {
    error
        .as_database_error()
        .and_then(|e| e.code())
        .is_some_and(|code| code.starts_with("22"))
}

/// The statement named a table this source does not have (a projection version not live).
fn is_undefined_table(error: &sqlx::Error) -> bool {
    error
        .as_database_error()
        .and_then(|e| e.code())
        .is_some_and(|code| code == "42P01")
}

/// The error of a field that needs a version of the `daily_usage` projection this source does
/// not have live yet (its statement named a table that is not there).
pub(crate) fn daily_usage_version_error(what: &str, version: i32) -> async_graphql::Error {
    projection_version_error(what, version, "daily_usage", "daily-usage")
}

/// How a failed usage read answers: an hourly read on a source without `hourly_usage` needs
/// version 3; anything else is the source's failure.
pub(crate) fn usage_read_error(read: &ReadContext, period: Period, error: &sqlx::Error) -> async_graphql::Error {
    if period == Period::Hour && is_undefined_table(error) {
        daily_usage_version_error("usage by hour", 3)
    } else {
        read.database_error(error)
    }
}

/// Checks a usage range against the limits, before anything is read. Dates are years 1 to
/// 9999 (what ISO 8601 and every dashboard writes; PostgreSQL refuses some dates chrono
/// parses). An hourly range has a tighter limit: its rows grow 24 times faster.
pub(crate) fn usage_range(
    limits: &Limits,
    from: NaiveDate,
    to: NaiveDate,
    period: Period,
) -> async_graphql::Result<()> {
    for (name, date) in [("from", from), ("to", to)] {
        if !(1..=9999).contains(&chrono::Datelike::year(&date)) {
            return Err(bad_input(format!(
                "`{name}` ({date}) must be a date of the years 1 to 9999"
            )));
        }
    }
    if from > to {
        return Err(bad_input(format!("`from` ({from}) is after `to` ({to})")));
    }
    let days = (to - from).num_days() + 1;
    if days > limits.max_usage_days {
        return Err(bad_input(format!(
            "the range covers {days} days; at most {} are allowed",
            limits.max_usage_days
        )));
    }
    let hours = days * 24;
    if period == Period::Hour && hours > limits.max_usage_hours {
        return Err(bad_input(format!(
            "grouped by HOUR, the range covers {days} days ({hours} hours); at most {} hours ({} days) \
             are allowed: group by DAY for longer ranges",
            limits.max_usage_hours,
            limits.max_usage_hours / 24
        )));
    }
    Ok(())
}

/// The page size, direction and cursor Relay paging arguments ask for, checked.
fn page_direction<'a>(
    limits: &Limits,
    first: Option<i32>,
    after: Option<&'a str>,
    last: Option<i32>,
    before: Option<&'a str>,
) -> async_graphql::Result<(i32, bool, Option<&'a str>)> {
    let (size, backward, cursor) = match (first, last) {
        (Some(_), Some(_)) => return Err(bad_input("pass `first` or `last`, not both")),
        (_, None) if before.is_some() && after.is_none() && first.is_none() => (limits.default_page_size, true, before),
        (first, None) => {
            if before.is_some() {
                return Err(bad_input("`before` pages backward: use it with `last`"));
            }
            (first.unwrap_or(limits.default_page_size), false, after)
        }
        (None, Some(last)) => {
            if after.is_some() {
                return Err(bad_input("`after` pages forward: use it with `first`"));
            }
            (last, true, before)
        }
    };
    if size < 0 || size > limits.max_page_size {
        return Err(bad_input(format!(
            "page size {size} is out of range: `first` and `last` take 0 to {}",
            limits.max_page_size
        )));
    }
    Ok((size, backward, cursor))
}

/// Turns Relay paging arguments into a keyset page request.
pub(crate) fn page_request(
    limits: &Limits,
    order: DevicesOrderBy,
    first: Option<i32>,
    after: Option<&str>,
    last: Option<i32>,
    before: Option<&str>,
) -> async_graphql::Result<PageRequest> {
    let order = DeviceOrder::from(order);
    let (size, backward, cursor) = page_direction(limits, first, after, last, before)?;
    let from = cursor
        .map(|cursor| decode_cursor(cursor, order))
        .transpose()
        .map_err(|error| bad_input(error.to_string()))?;
    Ok(PageRequest {
        order,
        size: i64::from(size),
        from,
        backward,
    })
}

/// Turns Relay paging arguments into a keyset page request over users.
pub(crate) fn user_page_request(
    limits: &Limits,
    first: Option<i32>,
    after: Option<&str>,
    last: Option<i32>,
    before: Option<&str>,
) -> async_graphql::Result<UserPageRequest> {
    let (size, backward, cursor) = page_direction(limits, first, after, last, before)?;
    let from = cursor
        .map(scalars::decode_user_cursor)
        .transpose()
        .map_err(|error| bad_input(error.to_string()))?;
    Ok(UserPageRequest {
        size: i64::from(size),
        from,
        backward,
    })
}

/// Builds the schema with its limits. Introspection is off unless asked for. The depth limit
/// is [`document::check_document`]'s, which lets introspection nest deeper than data.
pub fn build_schema(limits: &Limits, introspection: bool) -> DashboardSchema {
    let builder = scalars::describe_foreign_scalars(Schema::build(Query, EmptyMutation, Subscription))
        .limit_complexity(limits.max_complexity)
        .limit_recursive_depth(32)
        .limit_directives(8);
    let builder = if introspection {
        builder
    } else {
        builder.disable_introspection()
    };
    builder.finish()
}

/// The per-request data a query executes with.
pub fn request_data(request: async_graphql::Request, read: Arc<ReadContext>) -> async_graphql::Request {
    let loader = DataLoader::new(
        ReadLoader {
            pool: read.read_pool.clone(),
        },
        tokio::spawn,
    )
    .delay(read.limits.load_batch_window);
    request.data(read).data(loader)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The schema dashboards are written against is checked in (`query-api/schema.graphql`),
    /// so a change to it shows in review. `CLOUDPHONE_BLESS_CONTRACTS=1` rewrites the file.
    #[test]
    fn the_schema_is_the_checked_in_one() {
        let sdl = build_schema(&Limits::default(), true).sdl();
        test_support::contracts::assert_checked_in(
            &sdl,
            concat!(env!("CARGO_MANIFEST_DIR"), "/schema.graphql"),
            "cargo test -p query-api --lib",
        );
    }

    #[test]
    fn a_user_sees_only_their_own_rows_whatever_they_ask() {
        let me = Uuid::from_u128(1);
        let other = Uuid::from_u128(2);
        assert_eq!(Viewer::User(me).owners(None), Owners::Only(me));
        assert_eq!(Viewer::User(me).owners(Some(me)), Owners::Only(me));
        assert_eq!(Viewer::User(me).owners(Some(other)), Owners::Nobody);
        assert_eq!(Viewer::Everyone.owners(Some(other)), Owners::Only(other));
        assert_eq!(Viewer::Everyone.owners(None), Owners::Any);
        assert!(!Viewer::User(me).can_see(other));
    }

    #[test]
    fn an_hourly_range_is_bounded_in_hours() {
        let limits = Limits::default();
        let day = |d: &str| NaiveDate::parse_from_str(d, "%Y-%m-%d").unwrap();
        assert!(usage_range(&limits, day("2026-01-01"), day("2026-01-31"), Period::Hour).is_ok());
        let refused = usage_range(&limits, day("2026-01-01"), day("2026-02-01"), Period::Hour).unwrap_err();
        assert!(refused.message.contains("at most 744 hours"), "{}", refused.message);
        // The same range by day is fine; the day limit still holds for hours.
        assert!(usage_range(&limits, day("2026-01-01"), day("2026-02-01"), Period::Day).is_ok());
        assert!(usage_range(&limits, day("0001-01-01"), day("9999-12-31"), Period::Hour).is_err());
    }

    #[test]
    fn page_arguments_are_checked() {
        let limits = Limits::default();
        let order = DevicesOrderBy::CreatedAtAsc;
        assert!(page_request(&limits, order, Some(1), None, Some(1), None).is_err());
        assert!(page_request(&limits, order, Some(101), None, None, None).is_err());
        assert!(page_request(&limits, order, Some(-1), None, None, None).is_err());
        assert!(page_request(&limits, order, None, Some("junk"), None, None).is_err());
        assert!(page_request(&limits, order, Some(5), None, None, Some("x")).is_err());
        let page = page_request(&limits, order, None, None, None, None).unwrap();
        assert_eq!((page.size, page.backward), (20, false));
        let page = page_request(&limits, order, None, None, Some(3), None).unwrap();
        assert_eq!((page.size, page.backward), (3, true));
    }
}
