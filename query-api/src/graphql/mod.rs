//! The GraphQL schema dashboards query: device statistics, daily usage and cost, device
//! lists as Relay connections, users with their nested devices and usage, projection status.
//!
//! Conventions follow Relay and PostGraphile: connections with `edges`, `nodes`, `pageInfo`
//! and `totalCount`; opaque keyset cursors; 64-bit integers as `BigInt` strings; money as
//! integer minor units with a currency; dates as ISO strings. A `user` caller only ever sees
//! its own rows, whatever filter it passes: scoping happens here, before any SQL is built.

pub mod document;
pub mod loaders;
pub mod scalars;
mod types;

use std::any::Any;
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_graphql::dataloader::DataLoader;
use async_graphql::{
    Context, EmptyMutation, EmptySubscription, Enum, ErrorExtensions, InputObject, Object, Schema, SimpleObject,
};
use chrono::{DateTime, NaiveDate, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use self::loaders::ReadLoader;
use self::scalars::{BigInt, decode_cursor};
pub use self::types::{DailyUsage, Device, DeviceConnection, DeviceStats, Money, User};
use crate::reads::{self, DeviceFilter, DeviceOrder, Owners, PageRequest, Period, UsageQuery};

/// The schema served at `/graphql`.
pub type DashboardSchema = Schema<Query, EmptyMutation, EmptySubscription>;

/// Limits that keep one query from taking the service down.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Page size when neither `first` nor `last` is given.
    pub default_page_size: i32,
    /// Largest `first` / `last`.
    pub max_page_size: i32,
    /// Longest range of `dailyUsage` and `usage`, in days.
    pub max_usage_days: i64,
    /// Complexity: fields, with each connection's page size multiplying what it holds.
    pub max_complexity: usize,
    /// What a document may be before it is validated (its depth limit included).
    pub document: document::DocumentLimits,
    /// How long a nested load waits for its siblings' keys before it runs as one statement:
    /// longer batches more under a busy CPU, and adds that much to each nesting level.
    pub load_batch_window: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            default_page_size: 20,
            max_page_size: 100,
            max_usage_days: 366,
            max_complexity: 5_000,
            document: document::DocumentLimits::default(),
            load_batch_window: Duration::from_millis(1),
        }
    }
}

/// Who is asking: everything is scoped by this before SQL is built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Viewer {
    /// Admins and read-only services: every user's rows.
    Everyone,
    /// A user: their own rows only.
    User(Uuid),
}

impl Viewer {
    /// Whose rows a read with this `userId` filter may return.
    pub fn owners(self, requested: Option<Uuid>) -> Owners {
        match (self, requested) {
            (Viewer::Everyone, None) => Owners::Any,
            (Viewer::Everyone, Some(user)) => Owners::Only(user),
            (Viewer::User(me), None) => Owners::Only(me),
            (Viewer::User(me), Some(user)) if user == me => Owners::Only(me),
            (Viewer::User(_), Some(_)) => Owners::Nobody,
        }
    }

    pub fn can_see(self, owner: Uuid) -> bool {
        match self {
            Viewer::Everyone => true,
            Viewer::User(me) => me == owner,
        }
    }

    /// The part of a cache key that separates what different callers may see.
    pub fn cache_scope(self) -> String {
        match self {
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
    pub pool: PgPool,
    pub limits: Limits,
    source_failed: AtomicBool,
    /// Statements run for this request, by what they asked (see [`ReadContext::read_once`]).
    reads: Mutex<HashMap<String, Arc<tokio::sync::OnceCell<ReadResult>>>>,
}

/// A read's rows, or the error it failed with, shared by every field that asked the same.
type ReadResult = Result<Arc<dyn Any + Send + Sync>, Arc<sqlx::Error>>;

impl ReadContext {
    pub fn new(viewer: Viewer, pool: PgPool, limits: Limits) -> Self {
        ReadContext {
            viewer,
            pool,
            limits,
            source_failed: AtomicBool::new(false),
            reads: Mutex::new(HashMap::new()),
        }
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
    Stopped,
    Running,
    Failed,
    Deleted,
}

/// The cloud that hosts a device.
#[derive(Enum, Debug, Clone, Copy, PartialEq, Eq)]
#[graphql(remote = "event_schema::Provider")]
pub enum Provider {
    Aws,
    Gcp,
    Azure,
    Alibaba,
    Huawei,
}

/// The order of a device list (ties broken by device id, so cursors are stable).
#[derive(Enum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DevicesOrderBy {
    #[default]
    CreatedAtAsc,
    CreatedAtDesc,
}

impl From<DevicesOrderBy> for DeviceOrder {
    fn from(order: DevicesOrderBy) -> Self {
        match order {
            DevicesOrderBy::CreatedAtAsc => DeviceOrder::CreatedAtAsc,
            DevicesOrderBy::CreatedAtDesc => DeviceOrder::CreatedAtDesc,
        }
    }
}

/// The period usage rows are summed over.
#[derive(Enum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UsageGroupBy {
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
            UsageGroupBy::Day => Period::Day,
            UsageGroupBy::Week => Period::Week,
            UsageGroupBy::Month => Period::Month,
        }
    }
}

/// Which devices (or device statistics) to return. A `user` caller's own id is always
/// applied; another user's id returns nothing.
#[derive(InputObject, Debug, Clone, Copy, Default)]
pub struct DeviceFilterInput {
    pub user_id: Option<Uuid>,
    pub status: Option<DeviceStatus>,
    pub provider: Option<Provider>,
}

impl DeviceFilterInput {
    fn scoped(self, viewer: Viewer) -> DeviceFilter {
        DeviceFilter {
            owners: viewer.owners(self.user_id),
            status: self.status.map(Into::into),
            provider: self.provider.map(Into::into),
        }
    }
}

/// Devices of one user (nested under `User`).
#[derive(InputObject, Debug, Clone, Copy, Default)]
pub struct UserDevicesFilter {
    pub status: Option<DeviceStatus>,
    pub provider: Option<Provider>,
}

/// Usage over the UTC days `from` to `to`, both included (at most 366 days).
#[derive(InputObject, Debug, Clone, Copy)]
pub struct UsageFilter {
    pub user_id: Option<Uuid>,
    pub device_id: Option<Uuid>,
    pub from: NaiveDate,
    pub to: NaiveDate,
}

/// A user's usage by provider over the UTC days `from` to `to`, both included (at most 366
/// days).
#[derive(InputObject, Debug, Clone, Copy)]
pub struct ProviderUsageFilter {
    pub user_id: Option<Uuid>,
    pub from: NaiveDate,
    pub to: NaiveDate,
}

/// Usage of one period on one cloud provider in one currency.
#[derive(SimpleObject, Debug, Clone)]
pub struct ProviderUsage {
    /// The first day of the period.
    pub period: NaiveDate,
    pub provider: Provider,
    pub minutes: BigInt,
    /// Sessions that touched the period.
    pub sessions: BigInt,
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

/// Checks a usage range against the limits. Dates are years 1 to 9999 (what ISO 8601 and
/// every dashboard writes; PostgreSQL refuses some dates chrono parses).
pub(crate) fn usage_range(limits: &Limits, from: NaiveDate, to: NaiveDate) -> async_graphql::Result<()> {
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
    Ok(())
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

/// The root of every dashboard query.
#[derive(Debug, Default)]
pub struct Query;

#[Object]
impl Query {
    /// Live devices per user, status and provider, with totals. Deleted devices are not
    /// counted.
    async fn device_stats(
        &self,
        ctx: &Context<'_>,
        filter: Option<DeviceFilterInput>,
        #[graphql(
            desc = "Answer from read models that have applied at least this log position (a command's `position`). Also settable with the `X-Min-Position` header."
        )]
        min_position: Option<BigInt>,
    ) -> DeviceStats {
        let _ = min_position; // honoured by routing before execution
        DeviceStats::filtered(filter.unwrap_or_default().scoped(read_context(ctx).viewer))
    }

    /// Billed minutes and cost per day (or week, or month) over a range of UTC days, with
    /// totals over the range.
    async fn daily_usage(
        &self,
        ctx: &Context<'_>,
        filter: UsageFilter,
        group_by: Option<UsageGroupBy>,
        #[graphql(desc = "See `deviceStats(minPosition)`.")] min_position: Option<BigInt>,
    ) -> async_graphql::Result<DailyUsage> {
        let _ = min_position;
        let read = read_context(ctx);
        usage_range(&read.limits, filter.from, filter.to)?;
        let query = UsageQuery {
            owners: read.viewer.owners(filter.user_id),
            device: filter.device_id,
            from: filter.from,
            to: filter.to,
            period: group_by.unwrap_or_default().into(),
        };
        let records = read
            .read_once(format!("usage {query:?}"), || reads::usage(&read.pool, &query))
            .await
            .map_err(|e| read.database_error(&e))?;
        Ok(DailyUsage::new(records))
    }

    /// Billed minutes, cost and sessions per period, cloud provider and currency (a session
    /// over midnight counts on both days). Served by version 2 of the `daily_usage`
    /// projection; until it is live (`cloudphone replay daily-usage`) this answers with the
    /// error code `PROJECTION_VERSION`, and from the swap on it answers, with no restart.
    async fn usage_by_provider(
        &self,
        ctx: &Context<'_>,
        filter: ProviderUsageFilter,
        group_by: Option<UsageGroupBy>,
        #[graphql(desc = "See `deviceStats(minPosition)`.")] min_position: Option<BigInt>,
    ) -> async_graphql::Result<Vec<ProviderUsage>> {
        let _ = min_position;
        let read = read_context(ctx);
        usage_range(&read.limits, filter.from, filter.to)?;
        let query = UsageQuery {
            owners: read.viewer.owners(filter.user_id),
            device: None,
            from: filter.from,
            to: filter.to,
            period: group_by.unwrap_or_default().into(),
        };
        let records = match read
            .read_once(format!("usage_by_provider {query:?}"), || {
                reads::usage_by_provider(&read.pool, &query)
            })
            .await
        {
            Ok(records) => records,
            Err(error) if is_undefined_table(&error) => {
                return Err(async_graphql::Error::new(
                    "usage by provider needs version 2 of the daily_usage projection, which is not live \
                     on this source yet: run `cloudphone replay daily-usage`",
                )
                .extend_with(|_, e| e.set("code", "PROJECTION_VERSION")));
            }
            Err(error) => return Err(read.database_error(&error)),
        };
        records
            .into_iter()
            .map(|record| {
                let provider: event_schema::Provider = record.provider.parse().map_err(|_| {
                    tracing::error!(provider = %record.provider, "unknown provider in daily_usage_by_provider");
                    async_graphql::Error::new("the read models could not be read")
                        .extend_with(|_, e| e.set("code", "INTERNAL_SERVER_ERROR"))
                })?;
                Ok(ProviderUsage {
                    period: record.period,
                    provider: provider.into(),
                    minutes: BigInt(record.minutes),
                    sessions: BigInt(record.sessions),
                    cost: Money {
                        amount_minor: BigInt(record.cost_minor),
                        currency: record.currency,
                    },
                })
            })
            .collect()
    }

    /// Devices as a Relay connection, paged by keyset (stable while devices are created).
    #[graphql(complexity = "first.or(last).unwrap_or(20).clamp(1, 100) as usize * child_complexity + 1")]
    #[allow(clippy::too_many_arguments)]
    async fn devices(
        &self,
        ctx: &Context<'_>,
        filter: Option<DeviceFilterInput>,
        order_by: Option<DevicesOrderBy>,
        first: Option<i32>,
        after: Option<String>,
        last: Option<i32>,
        before: Option<String>,
        #[graphql(desc = "See `deviceStats(minPosition)`.")] min_position: Option<BigInt>,
    ) -> async_graphql::Result<DeviceConnection> {
        let _ = min_position;
        let read = read_context(ctx);
        let request = page_request(
            &read.limits,
            order_by.unwrap_or_default(),
            first,
            after.as_deref(),
            last,
            before.as_deref(),
        )?;
        let filter = filter.unwrap_or_default().scoped(read.viewer);
        let page = read
            .read_once(format!("device_page {filter:?} {request:?}"), || {
                reads::device_page(&read.pool, &filter, &request)
            })
            .await
            .map_err(|e| read.database_error(&e))?;
        Ok(DeviceConnection::top_level(filter, request, page))
    }

    /// One device, or null if it does not exist or is not the caller's.
    async fn device(
        &self,
        ctx: &Context<'_>,
        id: Uuid,
        #[graphql(desc = "See `deviceStats(minPosition)`.")] min_position: Option<BigInt>,
    ) -> async_graphql::Result<Option<Device>> {
        let _ = min_position;
        // A root field has no siblings to batch with: read at once rather than wait for a batch.
        let read = read_context(ctx);
        let ids = [id];
        let row = read
            .read_once(format!("devices_by_id {id}"), || reads::devices_by_id(&read.pool, &ids))
            .await
            .map_err(|e| read.database_error(&e))?
            .into_iter()
            .next();
        Ok(row.filter(|row| read.viewer.can_see(row.owner_id)).map(Device))
    }

    /// A user with their devices, usage and statistics, or null if the caller may not see them.
    async fn user(
        &self,
        ctx: &Context<'_>,
        id: Uuid,
        #[graphql(desc = "See `deviceStats(minPosition)`.")] min_position: Option<BigInt>,
    ) -> Option<User> {
        let _ = min_position;
        read_context(ctx).viewer.can_see(id).then_some(User(id))
    }

    /// How far each projection has applied the log, on the source that answered.
    #[graphql(cache_control(no_cache))]
    async fn projection_status(&self, ctx: &Context<'_>) -> async_graphql::Result<Vec<ProjectionState>> {
        let read = read_context(ctx);
        let states = read
            .read_once("projection_status".to_owned(), || {
                projections::status::projection_status(&read.pool)
            })
            .await
            .map_err(|e| read.database_error(&e))?;
        let now = Utc::now();
        Ok(states
            .into_iter()
            .map(|state| ProjectionState {
                lag_seconds: match state.last_recorded_at {
                    _ if state.lag_events == 0 => 0.0,
                    Some(at) => (now - at).num_milliseconds().max(0) as f64 / 1000.0,
                    None => f64::MAX,
                },
                name: state.projection,
                position: BigInt(state.position),
                head: BigInt(state.head),
                lag_events: BigInt(state.lag_events),
                last_recorded_at: state.last_recorded_at,
            })
            .collect())
    }
}

/// One projection's progress.
#[derive(SimpleObject, Debug, Clone)]
#[graphql(cache_control(no_cache))]
pub struct ProjectionState {
    pub name: String,
    /// Every event at or below this log position is applied.
    pub position: BigInt,
    /// The log's last position.
    pub head: BigInt,
    pub lag_events: BigInt,
    /// Seconds between now and the commit of the last applied event, while behind (0 when
    /// caught up).
    pub lag_seconds: f64,
    pub last_recorded_at: Option<DateTime<Utc>>,
}

/// Builds the schema with its limits. Introspection is off unless asked for. The depth limit
/// is [`document::check_document`]'s, which lets introspection nest deeper than data.
pub fn build_schema(limits: &Limits, introspection: bool) -> DashboardSchema {
    let builder = Schema::build(Query, EmptyMutation, EmptySubscription)
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
            pool: read.pool.clone(),
        },
        tokio::spawn,
    )
    .delay(read.limits.load_batch_window);
    request.data(read).data(loader)
}

/// The largest `minPosition` argument among the root fields of the operation that will run
/// (read before execution, since the position decides which source answers).
pub fn min_position_argument(
    document: &async_graphql::parser::types::ExecutableDocument,
    operation_name: Option<&str>,
    variables: &serde_json::Value,
) -> Result<Option<i64>, String> {
    use async_graphql::Name;
    use async_graphql::parser::types::{DocumentOperations, ExecutableDocument, Selection, SelectionSet};
    use async_graphql_value::Value;

    let operation = match (&document.operations, operation_name) {
        (DocumentOperations::Single(operation), _) => operation,
        (DocumentOperations::Multiple(operations), Some(name)) => match operations.get(&Name::new(name)) {
            Some(operation) => operation,
            None => return Ok(None),
        },
        (DocumentOperations::Multiple(_), None) => return Ok(None),
    };
    let defaults: std::collections::HashMap<&str, &async_graphql::Value> = operation
        .node
        .variable_definitions
        .iter()
        .filter_map(|v| {
            v.node
                .default_value
                .as_ref()
                .map(|d| (v.node.name.node.as_str(), &d.node))
        })
        .collect();
    let position = |value: &Value| -> Result<Option<i64>, String> {
        let json = match value {
            Value::Variable(name) => match variables.get(name.as_str()) {
                Some(json) => json.clone(),
                None => match defaults.get(name.as_str()) {
                    Some(default) => (*default).clone().into_json().map_err(|e| e.to_string())?,
                    None => return Ok(None),
                },
            },
            other => other.clone().into_const().map_or(serde_json::Value::Null, |v| {
                v.into_json().unwrap_or(serde_json::Value::Null)
            }),
        };
        match json {
            serde_json::Value::Null => Ok(None),
            serde_json::Value::Number(n) => n
                .as_i64()
                .map(Some)
                .ok_or_else(|| format!("minPosition {n} is not a 64-bit integer")),
            serde_json::Value::String(s) => s
                .trim()
                .parse()
                .map(Some)
                .map_err(|_| format!("minPosition `{s}` is not a 64-bit integer")),
            other => Err(format!("minPosition {other} is not a 64-bit integer")),
        }
    };
    fn walk(
        set: &SelectionSet,
        document: &ExecutableDocument,
        depth: usize,
        position: &dyn Fn(&Value) -> Result<Option<i64>, String>,
    ) -> Result<Option<i64>, String> {
        let mut largest = None;
        if depth > 8 {
            return Ok(None);
        }
        for item in &set.items {
            let found = match &item.node {
                Selection::Field(field) => {
                    let mut found = None;
                    for (name, value) in &field.node.arguments {
                        if name.node.as_str() == "minPosition" {
                            found = found.max(position(&value.node)?);
                        }
                    }
                    found
                }
                Selection::InlineFragment(fragment) => {
                    walk(&fragment.node.selection_set.node, document, depth + 1, position)?
                }
                Selection::FragmentSpread(spread) => match document.fragments.get(&spread.node.fragment_name.node) {
                    Some(fragment) => walk(&fragment.node.selection_set.node, document, depth + 1, position)?,
                    None => None,
                },
            };
            largest = largest.max(found);
        }
        Ok(largest)
    }
    walk(&operation.node.selection_set.node, document, 0, &position)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn min_position_argument(
        query: &str,
        operation_name: Option<&str>,
        variables: &serde_json::Value,
    ) -> Result<Option<i64>, String> {
        let document = async_graphql::parser::parse_query(query).unwrap();
        super::min_position_argument(&document, operation_name, variables)
    }

    #[test]
    fn min_position_comes_from_literals_variables_and_defaults() {
        let vars = serde_json::json!({"p": "42"});
        assert_eq!(
            min_position_argument("{ devices(minPosition: 7) { totalCount } }", None, &vars),
            Ok(Some(7))
        );
        assert_eq!(
            min_position_argument(
                "query($p: BigInt) { a: device(id: \"x\", minPosition: $p) { id } b: devices(minPosition: \"9\") { totalCount } }",
                None,
                &vars
            ),
            Ok(Some(42))
        );
        assert_eq!(
            min_position_argument(
                "query($q: BigInt = 5) { devices(minPosition: $q) { totalCount } }",
                None,
                &vars
            ),
            Ok(Some(5))
        );
        assert_eq!(
            min_position_argument(
                "{ ... on Query { devices(minPosition: 3) { totalCount } } }",
                None,
                &vars
            ),
            Ok(Some(3))
        );
        assert_eq!(
            min_position_argument("{ devices { totalCount } }", None, &vars),
            Ok(None)
        );
        assert!(min_position_argument("{ devices(minPosition: \"soon\") { totalCount } }", None, &vars).is_err());
        // Of several operations, the one named runs.
        let two =
            "query A { devices(minPosition: 1) { totalCount } } query B { devices(minPosition: 2) { totalCount } }";
        assert_eq!(min_position_argument(two, Some("B"), &vars), Ok(Some(2)));
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
