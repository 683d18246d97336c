//! The read models as the query API reads them: every SQL statement of this crate.
//!
//! Filters are built into the statement only when present (bound parameters, never
//! interpolated values), so each shape gets a plan that uses its index instead of a generic
//! `$1 IS NULL OR ...` plan that cannot.

use std::collections::HashMap;

use chrono::{DateTime, Days, NaiveDate, NaiveTime, Utc};
use event_schema::{DeviceStatus, Provider, Tier};
use read_models::fleet::DeviceRow;
use read_models::fleet::device_row;
use read_models::users::{USER_COLUMNS, UserRow, user_row};
use sqlx::{AssertSqlSafe, Postgres, QueryBuilder, Row};
use uuid::Uuid;

use crate::read_pool::ReadPool;

const DEVICE_COLUMNS: &str = "device_id, owner_id, provider, status, cpu_cores, memory_mb, android_version, \
     created_at, last_started_at, minutes_used, updated_position";

/// Whose rows a read may return, after the caller's scope is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Owners {
    /// Everyone's (admins, with no user filter).
    Any,
    Only(Uuid),
    /// Nobody's: a user asked for another user's rows.
    Nobody,
}

/// A set of device statuses or providers, one bit per word of the vocabulary: small and
/// `Copy`, so a filter holding one stays a cheap batch key.
macro_rules! word_set {
    ($set:ident, $word:ty) => {
        #[doc = concat!("A set of [`", stringify!($word), "`]s.")]
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
        pub struct $set(u32);

        impl $set {
            pub fn contains(self, word: $word) -> bool {
                <$word>::ALL
                    .iter()
                    .position(|w| *w == word)
                    .is_some_and(|bit| self.0 & (1 << bit) != 0)
            }

            /// The words' spellings in the database, in vocabulary order.
            pub fn spellings(self) -> Vec<&'static str> {
                <$word>::ALL
                    .iter()
                    .filter(|w| self.contains(**w))
                    .map(|w| w.as_str())
                    .collect()
            }
        }

        impl FromIterator<$word> for $set {
            fn from_iter<I: IntoIterator<Item = $word>>(words: I) -> Self {
                let mut bits = 0;
                for word in words {
                    if let Some(bit) = <$word>::ALL.iter().position(|w| *w == word) {
                        bits |= 1 << bit;
                    }
                }
                $set(bits)
            }
        }
    };
}

word_set!(StatusSet, DeviceStatus);
word_set!(ProviderSet, Provider);

/// Instants from `from` (included) to `to` (excluded); an open end is unbounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct TimeRange {
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
}

impl TimeRange {
    pub fn is_unbounded(&self) -> bool {
        self.from.is_none() && self.to.is_none()
    }

    fn push(&self, sql: &mut QueryBuilder<Postgres>, column: &str) {
        if let Some(from) = self.from {
            sql.push(format_args!(" AND {column} >= ")).push_bind(from);
        }
        if let Some(to) = self.to {
            sql.push(format_args!(" AND {column} < ")).push_bind(to);
        }
    }
}

/// What a device must match apart from its owner. A set holds the values a column may take
/// (an empty set matches nothing); a bounded range leaves out devices with no value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct DeviceConditions {
    pub status: Option<StatusSet>,
    pub provider: Option<ProviderSet>,
    pub created_at: TimeRange,
    pub last_started_at: TimeRange,
}

impl DeviceConditions {
    /// True when the conditions name times, which `device_stats` rows do not have.
    pub fn has_time_ranges(&self) -> bool {
        !(self.created_at.is_unbounded() && self.last_started_at.is_unbounded())
    }

    /// Appends the conditions on `status` and `provider` (the columns `devices` and
    /// `device_stats` share).
    fn push_words(&self, sql: &mut QueryBuilder<Postgres>) {
        if let Some(status) = self.status {
            sql.push(" AND status = ANY(").push_bind(status.spellings()).push(")");
        }
        if let Some(provider) = self.provider {
            sql.push(" AND provider = ANY(")
                .push_bind(provider.spellings())
                .push(")");
        }
    }

    /// Appends every condition, for a statement over `devices`.
    fn push_devices(&self, sql: &mut QueryBuilder<Postgres>) {
        self.push_words(sql);
        self.created_at.push(sql, "created_at");
        self.last_started_at.push(sql, "last_started_at");
    }
}

/// Which devices a list or count covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DeviceFilter {
    pub owners: Owners,
    pub conditions: DeviceConditions,
}

/// The order of a device list; ties are broken by device id (in the list's direction), so
/// every device has one place and keyset cursors are stable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeviceOrder {
    CreatedAtAsc,
    CreatedAtDesc,
    /// Devices never started sort as started at the beginning of time: first ascending, last
    /// descending.
    LastStartedAtAsc,
    LastStartedAtDesc,
    MinutesUsedAsc,
    MinutesUsedDesc,
}

/// How never-started devices sort: as if started at `-infinity`. The indexes of migration
/// 1005 are built over this very expression, so the planner matches them.
const LAST_STARTED_SORT: &str = "coalesce(last_started_at, '-infinity'::timestamptz)";

impl DeviceOrder {
    pub const ALL: [DeviceOrder; 6] = [
        DeviceOrder::CreatedAtAsc,
        DeviceOrder::CreatedAtDesc,
        DeviceOrder::LastStartedAtAsc,
        DeviceOrder::LastStartedAtDesc,
        DeviceOrder::MinutesUsedAsc,
        DeviceOrder::MinutesUsedDesc,
    ];

    pub fn is_ascending(self) -> bool {
        matches!(
            self,
            DeviceOrder::CreatedAtAsc | DeviceOrder::LastStartedAtAsc | DeviceOrder::MinutesUsedAsc
        )
    }

    /// The SQL expression the list is sorted by, before the device id.
    fn sort_expression(self) -> &'static str {
        match self {
            DeviceOrder::CreatedAtAsc | DeviceOrder::CreatedAtDesc => "created_at",
            DeviceOrder::LastStartedAtAsc | DeviceOrder::LastStartedAtDesc => LAST_STARTED_SORT,
            DeviceOrder::MinutesUsedAsc | DeviceOrder::MinutesUsedDesc => "minutes_used",
        }
    }
}

/// The value a device list is sorted by, for one row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SortValue {
    CreatedAt(DateTime<Utc>),
    /// `None`: never started.
    LastStartedAt(Option<DateTime<Utc>>),
    MinutesUsed(i64),
}

/// A position in a device list: the sort key of one row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DeviceKey {
    pub sort: SortValue,
    pub device_id: Uuid,
}

impl DeviceKey {
    /// `row`'s place in a list in `order`.
    pub fn of(order: DeviceOrder, row: &DeviceRow) -> Self {
        let sort = match order {
            DeviceOrder::CreatedAtAsc | DeviceOrder::CreatedAtDesc => SortValue::CreatedAt(row.created_at),
            DeviceOrder::LastStartedAtAsc | DeviceOrder::LastStartedAtDesc => {
                SortValue::LastStartedAt(row.last_started_at)
            }
            DeviceOrder::MinutesUsedAsc | DeviceOrder::MinutesUsedDesc => SortValue::MinutesUsed(row.minutes_used),
        };
        DeviceKey {
            sort,
            device_id: row.device_id,
        }
    }
}

/// One page of a keyset-paginated device list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PageRequest {
    pub order: DeviceOrder,
    /// Rows wanted (the statement asks for one more to learn whether there are more).
    pub size: i64,
    /// `after` for forward pages, `before` for backward ones; of the request's order.
    pub from: Option<DeviceKey>,
    pub backward: bool,
}

/// Rows of a page in list order, and whether more rows follow in the paging direction.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Page {
    pub rows: Vec<DeviceRow>,
    pub more: bool,
    /// How many rows match across every page, when the page's statement counted them too
    /// ([`Counted::Yes`]) and could tell.
    pub total: Option<i64>,
}

/// Whether a page's statement also counts the rows matching across every page (a
/// connection's `totalCount`): one statement instead of two when the document asks for both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Counted {
    Yes,
    No,
}

impl PageRequest {
    /// The statement reads in ascending key order unless the list is descending, or the page
    /// walks backward (then it reads the other way and the rows are reversed).
    fn ascending(&self) -> bool {
        self.order.is_ascending() != self.backward
    }

    fn push_keyset(&self, sql: &mut QueryBuilder<Postgres>) {
        let Some(from) = self.from else {
            return;
        };
        // One row comparison over the index's own columns: the scan starts at the cursor.
        let comparison = if self.ascending() { ">" } else { "<" };
        sql.push(format_args!(
            " AND ({}, device_id) {comparison} (",
            self.order.sort_expression()
        ));
        match from.sort {
            SortValue::CreatedAt(at) => {
                sql.push_bind(at);
            }
            SortValue::LastStartedAt(at) => {
                sql.push("coalesce(")
                    .push_bind(at)
                    .push("::timestamptz, '-infinity'::timestamptz)");
            }
            SortValue::MinutesUsed(minutes) => {
                sql.push_bind(minutes);
            }
        }
        sql.push(", ").push_bind(from.device_id).push(")");
    }

    fn push_order_and_limit(&self, sql: &mut QueryBuilder<Postgres>) {
        let direction = if self.ascending() { "ASC" } else { "DESC" };
        sql.push(format_args!(
            " ORDER BY {} {direction}, device_id {direction} LIMIT ",
            self.order.sort_expression()
        ));
        sql.push_bind(self.size + 1);
    }

    fn page(&self, mut rows: Vec<DeviceRow>, total: Option<i64>) -> Page {
        let size = usize::try_from(self.size).unwrap_or(0);
        let more = rows.len() > size;
        rows.truncate(size);
        if self.backward {
            rows.reverse();
        }
        Page { rows, more, total }
    }
}

/// Appends the filter's conditions on a statement over `devices`.
fn push_filter(sql: &mut QueryBuilder<Postgres>, filter: &DeviceFilter) {
    if let Owners::Only(owner) = filter.owners {
        sql.push(" AND owner_id = ").push_bind(owner);
    }
    filter.conditions.push_devices(sql);
}

/// Appends the filter's conditions on a statement over `device_stats`, which has no times:
/// callers refuse a filter with time ranges first ([`DeviceConditions::has_time_ranges`]).
fn push_stats_filter(sql: &mut QueryBuilder<Postgres>, filter: &DeviceFilter) {
    if let Owners::Only(owner) = filter.owners {
        sql.push(" AND user_id = ").push_bind(owner);
    }
    filter.conditions.push_words(sql);
}

/// One page of the devices matching `filter`; with [`Counted::Yes`], also how many match
/// across every page, in the same statement.
pub async fn device_page(
    pool: &ReadPool,
    filter: &DeviceFilter,
    page: &PageRequest,
    counted: Counted,
) -> Result<Page, sqlx::Error> {
    if filter.owners == Owners::Nobody {
        return Ok(Page {
            total: (counted == Counted::Yes).then_some(0),
            ..Page::default()
        });
    }
    if page.size == 0 {
        return Ok(Page::default());
    }
    let mut sql = QueryBuilder::new(format!("SELECT {DEVICE_COLUMNS}"));
    if counted == Counted::Yes {
        // Uncorrelated, so PostgreSQL runs it once (an InitPlan) with its own plan, beside the
        // page's index scan: the cost of the separate count statement without its round trip.
        sql.push(", (SELECT count(*) FROM devices WHERE true");
        push_filter(&mut sql, filter);
        sql.push(") AS total");
    }
    sql.push(" FROM devices WHERE true");
    push_filter(&mut sql, filter);
    page.push_keyset(&mut sql);
    page.push_order_and_limit(&mut sql);
    let rows = sql.build().fetch_all(&mut *pool.acquire().await?).await?;
    let total = match (counted, rows.first()) {
        (Counted::No, _) => None,
        (Counted::Yes, Some(row)) => Some(row.try_get("total")?),
        // No row carried the count: without a cursor, no row matches at all; after one, the
        // count is unknown here and read on its own.
        (Counted::Yes, None) => page.from.is_none().then_some(0),
    };
    let rows = rows.iter().map(device_row).collect::<Result<Vec<_>, _>>()?;
    Ok(page.page(rows, total))
}

/// The same page of each owner's devices, in one statement (a lateral join per owner); with
/// [`Counted::Yes`], also how many devices each owner has under the same conditions.
pub async fn device_pages_by_owner(
    pool: &ReadPool,
    owners: &[Uuid],
    conditions: &DeviceConditions,
    page: &PageRequest,
    counted: Counted,
) -> Result<HashMap<Uuid, Page>, sqlx::Error> {
    let mut sql = QueryBuilder::new("SELECT o.owner AS page_owner, ");
    sql.push(if counted == Counted::Yes {
        "c.total, "
    } else {
        "NULL::bigint AS total, "
    });
    sql.push("d.* FROM unnest(")
        .push_bind(owners.to_vec())
        .push("::uuid[]) AS o(owner)");
    if counted == Counted::Yes {
        sql.push(" CROSS JOIN LATERAL (SELECT count(*) AS total FROM devices WHERE owner_id = o.owner");
        conditions.push_devices(&mut sql);
        sql.push(") AS c");
    }
    // A left join, so an owner with an empty page still brings its count.
    sql.push(format!(
        " LEFT JOIN LATERAL (SELECT {DEVICE_COLUMNS} FROM devices WHERE owner_id = o.owner"
    ));
    conditions.push_devices(&mut sql);
    page.push_keyset(&mut sql);
    page.push_order_and_limit(&mut sql);
    sql.push(") AS d ON true");
    let mut by_owner: HashMap<Uuid, (Vec<DeviceRow>, Option<i64>)> =
        owners.iter().map(|o| (*o, (Vec::new(), None))).collect();
    for row in sql.build().fetch_all(&mut *pool.acquire().await?).await? {
        let owner: Uuid = row.try_get("page_owner")?;
        let entry = by_owner.entry(owner).or_default();
        entry.1 = row.try_get("total")?;
        if row.try_get::<Option<Uuid>, _>("device_id")?.is_some() {
            entry.0.push(device_row(&row)?);
        }
    }
    Ok(by_owner
        .into_iter()
        .map(|(owner, (rows, total))| (owner, page.page(rows, total)))
        .collect())
}

/// How many devices match `filter`.
pub async fn count_devices(pool: &ReadPool, filter: &DeviceFilter) -> Result<i64, sqlx::Error> {
    if filter.owners == Owners::Nobody {
        return Ok(0);
    }
    let mut sql = QueryBuilder::new("SELECT count(*) FROM devices WHERE true");
    push_filter(&mut sql, filter);
    sql.build_query_scalar().fetch_one(&mut *pool.acquire().await?).await
}

/// How many devices each owner has (with the same conditions), in one statement.
pub async fn count_devices_by_owner(
    pool: &ReadPool,
    owners: &[Uuid],
    conditions: &DeviceConditions,
) -> Result<HashMap<Uuid, i64>, sqlx::Error> {
    let mut sql = QueryBuilder::new("SELECT owner_id, count(*) FROM devices WHERE ");
    push_id_match(&mut sql, "owner_id", owners);
    conditions.push_devices(&mut sql);
    sql.push(" GROUP BY owner_id");
    let rows: Vec<(Uuid, i64)> = sql.build_query_as().fetch_all(&mut *pool.acquire().await?).await?;
    let mut counts: HashMap<Uuid, i64> = owners.iter().map(|o| (*o, 0)).collect();
    counts.extend(rows);
    Ok(counts)
}

/// Appends `column = ANY(ids)`, or `column = id` when there is one id (a dashboard's usual
/// question). PostgreSQL plans a prepared statement over an array afresh on every execution:
/// a custom plan for a short array always looks cheaper than a generic one that cannot know
/// the array's length. `= $1` by key gets its generic plan, made once per connection.
fn push_id_match(sql: &mut QueryBuilder<Postgres>, column: &str, ids: &[Uuid]) {
    match ids {
        [one] => sql.push(format_args!("{column} = ")).push_bind(*one),
        _ => sql
            .push(format_args!("{column} = ANY("))
            .push_bind(ids.to_vec())
            .push(")"),
    };
}

/// The device with this id, if it exists (`= $1`: see [`push_id_match`]).
pub async fn device_by_id(pool: &ReadPool, id: Uuid) -> Result<Option<DeviceRow>, sqlx::Error> {
    let row = sqlx::query(AssertSqlSafe(format!(
        "SELECT {DEVICE_COLUMNS} FROM devices WHERE device_id = $1"
    )))
    .bind(id)
    .fetch_optional(&mut *pool.acquire().await?)
    .await?;
    row.as_ref().map(device_row).transpose()
}

/// A `device_stats` row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatsRecord {
    pub user_id: Uuid,
    pub status: DeviceStatus,
    pub provider: Provider,
    pub device_count: i64,
    pub cpu_cores: i64,
    pub memory_mb: i64,
    pub last_created_at: DateTime<Utc>,
}

/// Sums over `device_stats` rows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsTotals {
    pub device_count: i64,
    pub cpu_cores: i64,
    pub memory_mb: i64,
}

impl StatsTotals {
    /// The sums over `rows`, as `stats_totals` computes them over the same rows. A sum past
    /// `i64` saturates: PostgreSQL's `bigint` cast would refuse it, and a dashboard total that
    /// large is already meaningless.
    pub fn of(rows: &[StatsRecord]) -> Self {
        rows.iter().fold(StatsTotals::default(), |sum, row| StatsTotals {
            device_count: sum.device_count.saturating_add(row.device_count),
            cpu_cores: sum.cpu_cores.saturating_add(row.cpu_cores),
            memory_mb: sum.memory_mb.saturating_add(row.memory_mb),
        })
    }
}

/// `device_stats` rows matching `filter`, ordered by user, status and provider, at most `limit`.
pub async fn stats_rows(pool: &ReadPool, filter: &DeviceFilter, limit: i64) -> Result<Vec<StatsRecord>, sqlx::Error> {
    if filter.owners == Owners::Nobody {
        return Ok(Vec::new());
    }
    let mut sql = QueryBuilder::new(
        "SELECT user_id, status, provider, device_count, total_cpu_cores, total_memory_mb, last_created_at
         FROM device_stats WHERE true",
    );
    push_stats_filter(&mut sql, filter);
    sql.push(" ORDER BY user_id, status, provider LIMIT ").push_bind(limit);
    sql.build()
        .fetch_all(&mut *pool.acquire().await?)
        .await?
        .iter()
        .map(stats_record)
        .collect()
}

/// `device_stats` rows of each of these users, in one statement.
pub async fn stats_rows_by_user(
    pool: &ReadPool,
    users: &[Uuid],
) -> Result<HashMap<Uuid, Vec<StatsRecord>>, sqlx::Error> {
    let mut sql = QueryBuilder::new(
        "SELECT user_id, status, provider, device_count, total_cpu_cores, total_memory_mb, last_created_at
         FROM device_stats WHERE ",
    );
    push_id_match(&mut sql, "user_id", users);
    sql.push(" ORDER BY user_id, status, provider");
    let rows = sql.build().fetch_all(&mut *pool.acquire().await?).await?;
    let mut by_user: HashMap<Uuid, Vec<StatsRecord>> = users.iter().map(|u| (*u, Vec::new())).collect();
    for row in &rows {
        let record = stats_record(row)?;
        by_user.entry(record.user_id).or_default().push(record);
    }
    Ok(by_user)
}

fn stats_record(row: &sqlx::postgres::PgRow) -> Result<StatsRecord, sqlx::Error> {
    let decode = |e: event_schema::UnknownWord| sqlx::Error::Decode(Box::new(e));
    Ok(StatsRecord {
        user_id: row.try_get("user_id")?,
        status: row.try_get::<String, _>("status")?.parse().map_err(decode)?,
        provider: row.try_get::<String, _>("provider")?.parse().map_err(decode)?,
        device_count: row.try_get("device_count")?,
        cpu_cores: row.try_get("total_cpu_cores")?,
        memory_mb: row.try_get("total_memory_mb")?,
        last_created_at: row.try_get("last_created_at")?,
    })
}

/// Sums over every `device_stats` row matching `filter`.
pub async fn stats_totals(pool: &ReadPool, filter: &DeviceFilter) -> Result<StatsTotals, sqlx::Error> {
    if filter.owners == Owners::Nobody {
        return Ok(StatsTotals::default());
    }
    let mut sql = QueryBuilder::new(
        "SELECT coalesce(sum(device_count), 0)::bigint, coalesce(sum(total_cpu_cores), 0)::bigint,
                coalesce(sum(total_memory_mb), 0)::bigint FROM device_stats WHERE true",
    );
    push_stats_filter(&mut sql, filter);
    let (device_count, cpu_cores, memory_mb): (i64, i64, i64) =
        sql.build_query_as().fetch_one(&mut *pool.acquire().await?).await?;
    Ok(StatsTotals {
        device_count,
        cpu_cores,
        memory_mb,
    })
}

/// How usage rows are summed over time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Period {
    /// UTC hours: read from `hourly_usage` (version 3 of the `daily_usage` projection), which
    /// a source without that version does not have (the read fails with undefined table).
    Hour,
    Day,
    /// ISO weeks, starting on Monday.
    Week,
    Month,
}

impl Period {
    fn trunc(self) -> &'static str {
        match self {
            Period::Hour => "hour",
            Period::Day => "day",
            Period::Week => "week",
            Period::Month => "month",
        }
    }
}

/// The instants of the UTC days `from` to `to` (both included): from `from`'s midnight to the
/// midnight after `to`, excluded.
fn day_bounds(from: NaiveDate, to: NaiveDate) -> (DateTime<Utc>, DateTime<Utc>) {
    let midnight = |day: NaiveDate| day.and_time(NaiveTime::MIN).and_utc();
    (
        midnight(from),
        midnight(to.checked_add_days(Days::new(1)).unwrap_or(to)),
    )
}

/// Which usage rows to sum, and over what.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UsageQuery {
    pub owners: Owners,
    pub device: Option<Uuid>,
    pub from: NaiveDate,
    pub to: NaiveDate,
    pub period: Period,
}

/// Minutes and cost of one period in one currency.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRecord {
    /// The period's first day (for an hour, the UTC day it is in).
    pub period: NaiveDate,
    /// The period's first instant (for a day, week or month, UTC midnight of `period`).
    pub period_start: DateTime<Utc>,
    pub currency: String,
    pub minutes: i64,
    pub cost_minor: i64,
}

impl UsageRecord {
    /// A day's, week's or month's row.
    fn of_days(period: NaiveDate, currency: String, minutes: i64, cost_minor: i64) -> Self {
        UsageRecord {
            period,
            period_start: period.and_time(NaiveTime::MIN).and_utc(),
            currency,
            minutes,
            cost_minor,
        }
    }

    /// An hour's row.
    fn of_hour(hour: DateTime<Utc>, currency: String, minutes: i64, cost_minor: i64) -> Self {
        UsageRecord {
            period: hour.date_naive(),
            period_start: hour,
            currency,
            minutes,
            cost_minor,
        }
    }
}

/// Usage per period and currency over the query's days (inclusive), in period order.
pub async fn usage(pool: &ReadPool, query: &UsageQuery) -> Result<Vec<UsageRecord>, sqlx::Error> {
    if query.owners == Owners::Nobody {
        return Ok(Vec::new());
    }
    if query.period == Period::Hour {
        return hourly_usage(pool, query).await;
    }
    let mut sql = QueryBuilder::new("SELECT date_trunc(");
    sql.push_bind(query.period.trunc())
        .push(", day)::date AS period, currency, sum(minutes)::bigint, sum(cost_minor)::bigint FROM daily_usage WHERE day BETWEEN ")
        .push_bind(query.from)
        .push(" AND ")
        .push_bind(query.to);
    if let Owners::Only(owner) = query.owners {
        sql.push(" AND user_id = ").push_bind(owner);
    }
    if let Some(device) = query.device {
        sql.push(" AND device_id = ").push_bind(device);
    }
    sql.push(" GROUP BY 1, 2 ORDER BY 1, 2");
    let rows: Vec<(NaiveDate, String, i64, i64)> = sql.build_query_as().fetch_all(&mut *pool.acquire().await?).await?;
    Ok(rows
        .into_iter()
        .map(|(period, currency, minutes, cost_minor)| UsageRecord::of_days(period, currency, minutes, cost_minor))
        .collect())
}

/// Usage per UTC hour and currency over the query's days, from `hourly_usage`.
async fn hourly_usage(pool: &ReadPool, query: &UsageQuery) -> Result<Vec<UsageRecord>, sqlx::Error> {
    let (from, until) = day_bounds(query.from, query.to);
    let mut sql = QueryBuilder::new(
        "SELECT hour, currency, sum(minutes)::bigint, sum(cost_minor)::bigint FROM hourly_usage WHERE hour >= ",
    );
    sql.push_bind(from).push(" AND hour < ").push_bind(until);
    if let Owners::Only(owner) = query.owners {
        sql.push(" AND user_id = ").push_bind(owner);
    }
    if let Some(device) = query.device {
        sql.push(" AND device_id = ").push_bind(device);
    }
    sql.push(" GROUP BY 1, 2 ORDER BY 1, 2");
    let rows: Vec<(DateTime<Utc>, String, i64, i64)> =
        sql.build_query_as().fetch_all(&mut *pool.acquire().await?).await?;
    Ok(rows
        .into_iter()
        .map(|(hour, currency, minutes, cost_minor)| UsageRecord::of_hour(hour, currency, minutes, cost_minor))
        .collect())
}

/// Usage per period, provider and currency (`daily_usage_by_provider`, version 2 of the
/// `daily_usage` projection).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderUsageRecord {
    pub period: NaiveDate,
    pub provider: String,
    pub currency: String,
    pub minutes: i64,
    pub cost_minor: i64,
    pub sessions: i64,
}

/// Usage per period, provider and currency over the query's days (its `device` must be
/// `None`: the breakdown is per user), in period order.
pub async fn usage_by_provider(pool: &ReadPool, query: &UsageQuery) -> Result<Vec<ProviderUsageRecord>, sqlx::Error> {
    if query.owners == Owners::Nobody {
        return Ok(Vec::new());
    }
    let mut sql = QueryBuilder::new("SELECT date_trunc(");
    sql.push_bind(query.period.trunc())
        .push(
            ", day)::date AS period, provider, currency, sum(minutes)::bigint, sum(cost_minor)::bigint, \
             sum(sessions)::bigint FROM daily_usage_by_provider WHERE day BETWEEN ",
        )
        .push_bind(query.from)
        .push(" AND ")
        .push_bind(query.to);
    if let Owners::Only(owner) = query.owners {
        sql.push(" AND user_id = ").push_bind(owner);
    }
    sql.push(" GROUP BY 1, 2, 3 ORDER BY 1, 2, 3");
    let rows: Vec<(NaiveDate, String, String, i64, i64, i64)> =
        sql.build_query_as().fetch_all(&mut *pool.acquire().await?).await?;
    Ok(rows
        .into_iter()
        .map(
            |(period, provider, currency, minutes, cost_minor, sessions)| ProviderUsageRecord {
                period,
                provider,
                currency,
                minutes,
                cost_minor,
                sessions,
            },
        )
        .collect())
}

/// Which column a batched usage read groups by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UsageSubject {
    User,
    Device,
}

/// Usage per period and currency for each of these users (or devices), in one statement.
pub async fn usage_by(
    pool: &ReadPool,
    subject: UsageSubject,
    ids: &[Uuid],
    from: NaiveDate,
    to: NaiveDate,
    period: Period,
) -> Result<HashMap<Uuid, Vec<UsageRecord>>, sqlx::Error> {
    let column = match subject {
        UsageSubject::User => "user_id",
        UsageSubject::Device => "device_id",
    };
    let mut by_id: HashMap<Uuid, Vec<UsageRecord>> = ids.iter().map(|id| (*id, Vec::new())).collect();
    if period == Period::Hour {
        let (from, until) = day_bounds(from, to);
        let mut sql = QueryBuilder::new(format!(
            "SELECT {column}, hour, currency, sum(minutes)::bigint, sum(cost_minor)::bigint FROM hourly_usage WHERE "
        ));
        push_id_match(&mut sql, column, ids);
        sql.push(" AND hour >= ")
            .push_bind(from)
            .push(" AND hour < ")
            .push_bind(until)
            .push(" GROUP BY 1, 2, 3 ORDER BY 1, 2, 3");
        let rows: Vec<(Uuid, DateTime<Utc>, String, i64, i64)> =
            sql.build_query_as().fetch_all(&mut *pool.acquire().await?).await?;
        for (id, hour, currency, minutes, cost_minor) in rows {
            by_id
                .entry(id)
                .or_default()
                .push(UsageRecord::of_hour(hour, currency, minutes, cost_minor));
        }
        return Ok(by_id);
    }
    let mut sql = QueryBuilder::new(format!("SELECT {column}, date_trunc("));
    sql.push_bind(period.trunc())
        .push(", day)::date, currency, sum(minutes)::bigint, sum(cost_minor)::bigint FROM daily_usage WHERE ");
    push_id_match(&mut sql, column, ids);
    sql.push(" AND day BETWEEN ")
        .push_bind(from)
        .push(" AND ")
        .push_bind(to)
        .push(" GROUP BY 1, 2, 3 ORDER BY 1, 2, 3");
    let rows: Vec<(Uuid, NaiveDate, String, i64, i64)> =
        sql.build_query_as().fetch_all(&mut *pool.acquire().await?).await?;
    for (id, period, currency, minutes, cost_minor) in rows {
        by_id
            .entry(id)
            .or_default()
            .push(UsageRecord::of_days(period, currency, minutes, cost_minor));
    }
    Ok(by_id)
}

word_set!(TierSet, Tier);

/// Which users a list or count covers (`users`, version 2 of the `fleet` projection).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct UserFilter {
    /// Only users of these tiers (an empty set matches nothing).
    pub tiers: Option<TierSet>,
    /// Only erased users (`true`) or only users not erased (`false`).
    pub erased: Option<bool>,
}

impl UserFilter {
    fn push(&self, sql: &mut QueryBuilder<Postgres>) {
        if let Some(tiers) = self.tiers {
            sql.push(" AND tier = ANY(").push_bind(tiers.spellings()).push(")");
        }
        if let Some(erased) = self.erased {
            sql.push(" AND erased = ").push_bind(erased);
        }
    }
}

/// One page of the user list, ordered by user id (ids are UUIDv7: roughly registration
/// order), paged by keyset on the table's key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct UserPageRequest {
    pub size: i64,
    /// `after` for forward pages, `before` for backward ones.
    pub from: Option<Uuid>,
    pub backward: bool,
}

/// Rows of a user page in list order, and whether more follow in the paging direction.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserPage {
    pub rows: Vec<UserRow>,
    pub more: bool,
}

/// One page of the users matching `filter`.
pub async fn user_page(pool: &ReadPool, filter: &UserFilter, page: &UserPageRequest) -> Result<UserPage, sqlx::Error> {
    let mut sql = QueryBuilder::new(format!("SELECT {USER_COLUMNS} FROM users WHERE true"));
    filter.push(&mut sql);
    let (comparison, direction) = if page.backward { ("<", "DESC") } else { (">", "ASC") };
    if let Some(from) = page.from {
        sql.push(format_args!(" AND user_id {comparison} ")).push_bind(from);
    }
    sql.push(format_args!(" ORDER BY user_id {direction} LIMIT "))
        .push_bind(page.size + 1);
    // Run even for a page of 0 rows: a fleet version without `users` must answer
    // PROJECTION_VERSION whatever the page size.
    let rows = sql.build().fetch_all(&mut *pool.acquire().await?).await?;
    let mut rows = rows.iter().map(user_row).collect::<Result<Vec<_>, _>>()?;
    let size = usize::try_from(page.size).unwrap_or(0);
    let more = rows.len() > size;
    rows.truncate(size);
    if page.backward {
        rows.reverse();
    }
    Ok(UserPage { rows, more })
}

/// How many users match `filter`.
pub async fn count_users(pool: &ReadPool, filter: &UserFilter) -> Result<i64, sqlx::Error> {
    let mut sql = QueryBuilder::new("SELECT count(*) FROM users WHERE true");
    filter.push(&mut sql);
    sql.build_query_scalar().fetch_one(&mut *pool.acquire().await?).await
}

/// The `users` rows with these ids (those that exist).
pub async fn users_by_id(pool: &ReadPool, ids: &[Uuid]) -> Result<HashMap<Uuid, UserRow>, sqlx::Error> {
    let mut sql = QueryBuilder::new(format!("SELECT {USER_COLUMNS} FROM users WHERE "));
    push_id_match(&mut sql, "user_id", ids);
    let rows = sql.build().fetch_all(&mut *pool.acquire().await?).await?;
    rows.iter()
        .map(|row| user_row(row).map(|user| (user.user_id, user)))
        .collect()
}

/// The periods of the fleet's history.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HistoryPeriod {
    Hour,
    Day,
}

impl HistoryPeriod {
    fn trunc(self) -> &'static str {
        match self {
            HistoryPeriod::Hour => "hour",
            HistoryPeriod::Day => "day",
        }
    }

    pub fn length(self) -> chrono::Duration {
        match self {
            HistoryPeriod::Hour => chrono::Duration::hours(1),
            HistoryPeriod::Day => chrono::Duration::days(1),
        }
    }

    /// The start of the UTC period `at` falls in.
    pub fn start_of(self, at: DateTime<Utc>) -> DateTime<Utc> {
        let seconds = self.length().num_seconds();
        let at = at.timestamp();
        DateTime::from_timestamp(at - at.rem_euclid(seconds), 0).unwrap_or_default()
    }
}

/// Which part of the fleet's history to read: the periods starting at `from` up to `to`
/// (excluded), both period starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HistoryQuery {
    pub owners: Owners,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub period: HistoryPeriod,
}

/// Net changes of the device count by status: those before the range (`period` = `None`,
/// the base) and those of each period in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusChange {
    pub period: Option<DateTime<Utc>>,
    pub status: DeviceStatus,
    pub delta: i64,
}

/// The net changes a history query sums, in one statement: the base (every change before
/// the range, summed per status) and the changes within it per period. Everyone's history
/// reads the all-users table, which grows with hours, not users.
pub async fn status_changes(pool: &ReadPool, query: &HistoryQuery) -> Result<Vec<StatusChange>, sqlx::Error> {
    if query.owners == Owners::Nobody {
        return Ok(Vec::new());
    }
    let (table, owner_condition) = match query.owners {
        Owners::Only(_) => ("fleet_status_changes", "user_id = $4 AND "),
        _ => ("fleet_status_changes_all", ""),
    };
    // `date_trunc` in UTC whatever the session's time zone.
    let statement = format!(
        "SELECT NULL::timestamptz AS period, status, sum(delta)::bigint AS delta FROM {table}
         WHERE {owner_condition}hour < $1 GROUP BY status
         UNION ALL
         SELECT date_trunc($3, hour, 'UTC') AS period, status, sum(delta)::bigint AS delta FROM {table}
         WHERE {owner_condition}hour >= $1 AND hour < $2 GROUP BY 1, 2
         ORDER BY 1 NULLS FIRST, 2"
    );
    let mut read = sqlx::query_as::<_, (Option<DateTime<Utc>>, String, i64)>(AssertSqlSafe(statement))
        .bind(query.from)
        .bind(query.to)
        .bind(query.period.trunc());
    if let Owners::Only(owner) = query.owners {
        read = read.bind(owner);
    }
    let decode = |e: event_schema::UnknownWord| sqlx::Error::Decode(Box::new(e));
    read.fetch_all(&mut *pool.acquire().await?)
        .await?
        .into_iter()
        .map(|(period, status, delta)| {
            Ok(StatusChange {
                period,
                status: status.parse().map_err(decode)?,
                delta,
            })
        })
        .collect()
}

/// The device count per counted status at the end of one period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FleetSize {
    /// The period's start.
    pub at: DateTime<Utc>,
    pub stopped: i64,
    pub running: i64,
    pub failed: i64,
}

/// The count at the end of each period from `from` up to `to` (excluded): the base plus the
/// running sum of the periods' changes. Periods with no change repeat the count before them.
pub fn fleet_sizes(
    changes: &[StatusChange],
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    period: HistoryPeriod,
) -> Vec<FleetSize> {
    let mut count = FleetSize {
        at: from,
        stopped: 0,
        running: 0,
        failed: 0,
    };
    let add = |count: &mut FleetSize, change: &StatusChange| match change.status {
        DeviceStatus::Stopped => count.stopped += change.delta,
        DeviceStatus::Running => count.running += change.delta,
        DeviceStatus::Failed => count.failed += change.delta,
        DeviceStatus::Deleted => {}
    };
    for change in changes.iter().filter(|c| c.period.is_none()) {
        add(&mut count, change);
    }
    let mut within: Vec<&StatusChange> = changes.iter().filter(|c| c.period.is_some()).collect();
    within.sort_by_key(|c| c.period);
    let mut within = within.into_iter().peekable();
    let mut sizes = Vec::new();
    let mut at = from;
    while at < to {
        while let Some(change) = within.next_if(|c| c.period.is_some_and(|p| p <= at)) {
            add(&mut count, change);
        }
        sizes.push(FleetSize { at, ..count });
        at += period.length();
    }
    sizes
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use proptest::prelude::*;

    use super::*;

    fn hour(h: i64) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).single().unwrap_or_default() + chrono::Duration::hours(h)
    }

    fn change(period: Option<i64>, status: DeviceStatus, delta: i64) -> StatusChange {
        StatusChange {
            period: period.map(hour),
            status,
            delta,
        }
    }

    #[test]
    fn the_count_at_each_hour_is_the_base_plus_the_changes_so_far() {
        let changes = [
            change(None, DeviceStatus::Stopped, 2),
            change(None, DeviceStatus::Running, 1),
            change(Some(11), DeviceStatus::Stopped, -1),
            change(Some(11), DeviceStatus::Running, 1),
            change(Some(13), DeviceStatus::Failed, 1),
            change(Some(13), DeviceStatus::Running, -1),
        ];
        let sizes = fleet_sizes(&changes, hour(10), hour(14), HistoryPeriod::Hour);
        let counts: Vec<(i64, i64, i64)> = sizes.iter().map(|s| (s.stopped, s.running, s.failed)).collect();
        assert_eq!(counts, [(2, 1, 0), (1, 2, 0), (1, 2, 0), (1, 1, 1)]);
        assert_eq!(
            sizes.iter().map(|s| s.at).collect::<Vec<_>>(),
            [hour(10), hour(11), hour(12), hour(13)]
        );
        assert_eq!(HistoryPeriod::Day.start_of(hour(30)), hour(24));
        assert_eq!(
            HistoryPeriod::Hour.start_of(hour(30) + chrono::Duration::minutes(59)),
            hour(30)
        );
    }

    proptest! {
        /// Reading a range equals reading from the beginning of time and keeping the range.
        #[test]
        fn a_range_starts_from_the_sum_of_everything_before_it(
            deltas in proptest::collection::vec((0i64..48, 0usize..3, -3i64..4), 0..60),
            from in 0i64..48,
            length in 1i64..24,
        ) {
            let statuses = [DeviceStatus::Stopped, DeviceStatus::Running, DeviceStatus::Failed];
            let all: Vec<StatusChange> = deltas
                .iter()
                .map(|(h, s, d)| change(Some(*h), statuses[*s], *d))
                .collect();
            let everything = fleet_sizes(&all, hour(0), hour(from + length), HistoryPeriod::Hour);
            let ranged: Vec<StatusChange> = deltas
                .iter()
                .map(|(h, s, d)| change((*h >= from).then_some(*h), statuses[*s], *d))
                .filter(|c| c.period.is_none_or(|p| p < hour(from + length)))
                .collect();
            let sizes = fleet_sizes(&ranged, hour(from), hour(from + length), HistoryPeriod::Hour);
            let from_index = usize::try_from(from).unwrap_or(0);
            prop_assert_eq!(&sizes[..], &everything[from_index..]);
        }
    }
}
