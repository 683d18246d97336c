//! The root of every dashboard query ([`Query`]): its fields scope what they read to the
//! caller, check their arguments against the limits and read once per request.

use async_graphql::{Context, ErrorExtensions, Object, SimpleObject};
use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::operations::{self, LogStatus, Replay};
use super::scalars::BigInt;
use super::types::counted_if_asked;
use super::{
    DailyUsage, Device, DeviceConnection, DeviceFilterInput, DeviceStats, DevicesOrderBy, FleetHistoryFilter,
    FleetHistoryGroupBy, FleetSizePoint, Money, ProviderUsage, ProviderUsageFilter, UsageFilter, UsageGroupBy, User,
    UserConnection, UsersFilter, bad_input, daily_usage_version_error, fleet_v2_error, is_undefined_table,
    page_request, read_context, usage_range, usage_read_error, user_page_request,
};
use crate::reads::{self, Counted, Owners, Period, UsageQuery, UserFilter};

/// The root of every dashboard query.
#[derive(Debug, Default)]
pub struct Query;

/// The root of every dashboard query. A `user` token only ever sees its own rows; admins and
/// read-only services see every user's.
#[Object]
impl Query {
    /// Live devices per user, status and provider, with totals. Deleted devices are not
    /// counted.
    pub(crate) async fn device_stats(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "Which devices to count; a `user` caller only ever sees their own.")] filter: Option<
            DeviceFilterInput,
        >,
        #[graphql(
            desc = "Answer from read models that have applied at least this log position (a command's `position`). Also settable with the `X-Min-Position` header."
        )]
        min_position: Option<BigInt>,
    ) -> async_graphql::Result<DeviceStats> {
        let _ = min_position; // honoured by routing before execution
        let filter = filter.unwrap_or_default().scoped(read_context(ctx).viewer)?;
        if filter.conditions.has_time_ranges() {
            return Err(bad_input(
                "deviceStats counts devices by user, status and provider, without times: \
                 `createdAt` and `lastStartedAt` filter `devices` only",
            ));
        }
        Ok(DeviceStats::filtered(filter))
    }

    /// Billed minutes and cost per hour (or day, week, month) over a range of UTC days, with
    /// totals over the range. By `HOUR`, served by version 3 of the `daily_usage` projection:
    /// until it is live (`cloudphone replay daily-usage`) that grouping answers with the error
    /// code `PROJECTION_VERSION`, and from the swap on it answers, with no restart.
    pub(crate) async fn daily_usage(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "The range of days, and whose usage; a `user` caller only ever sees their own.")]
        filter: UsageFilter,
        #[graphql(desc = "The period rows sum over (default `DAY`; `HOUR` takes at most 31 days).")] group_by: Option<
            UsageGroupBy,
        >,
        #[graphql(desc = "See `deviceStats(minPosition)`.")] min_position: Option<BigInt>,
    ) -> async_graphql::Result<DailyUsage> {
        let _ = min_position;
        let read = read_context(ctx);
        let period: Period = group_by.unwrap_or_default().into();
        usage_range(&read.limits, filter.from, filter.to, period)?;
        let query = UsageQuery {
            owners: read.viewer.owners(filter.user_id),
            device: filter.device_id,
            from: filter.from,
            to: filter.to,
            period,
        };
        let records = read
            .read_once(format!("usage {query:?}"), || reads::usage(&read.read_pool, &query))
            .await
            .map_err(|e| usage_read_error(read, period, &e))?;
        Ok(DailyUsage::new(records))
    }

    /// Billed minutes, cost and sessions per period, cloud provider and currency (a session
    /// over midnight counts on both days). Served by version 2 of the `daily_usage`
    /// projection; until it is live (`cloudphone replay daily-usage`) this answers with the
    /// error code `PROJECTION_VERSION`, and from the swap on it answers, with no restart.
    async fn usage_by_provider(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "The range of days, and whose usage; a `user` caller only ever sees their own.")]
        filter: ProviderUsageFilter,
        #[graphql(desc = "The period rows sum over (default `DAY`; not `HOUR`).")] group_by: Option<UsageGroupBy>,
        #[graphql(desc = "See `deviceStats(minPosition)`.")] min_position: Option<BigInt>,
    ) -> async_graphql::Result<Vec<ProviderUsage>> {
        let _ = min_position;
        let read = read_context(ctx);
        let period: Period = group_by.unwrap_or_default().into();
        if period == Period::Hour {
            // The per-provider breakdown is kept per day only (`daily_usage_by_provider`).
            return Err(bad_input(
                "usageByProvider sums days: group it by DAY, WEEK or MONTH (dailyUsage takes HOUR)",
            ));
        }
        usage_range(&read.limits, filter.from, filter.to, period)?;
        let query = UsageQuery {
            owners: read.viewer.owners(filter.user_id),
            device: None,
            from: filter.from,
            to: filter.to,
            period,
        };
        let records = match read
            .read_once(format!("usage_by_provider {query:?}"), || {
                reads::usage_by_provider(&read.read_pool, &query)
            })
            .await
        {
            Ok(records) => records,
            Err(error) if is_undefined_table(&error) => return Err(daily_usage_version_error("usage by provider", 2)),
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
    pub(crate) async fn devices(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "Which devices to list; a `user` caller only ever sees their own.")] filter: Option<
            DeviceFilterInput,
        >,
        #[graphql(desc = "The order of the list (default `CREATED_AT_ASC`).")] order_by: Option<DevicesOrderBy>,
        #[graphql(desc = "Page forward: at most this many devices after `after` (0 to 100; default 20).")]
        first: Option<i32>,
        #[graphql(desc = "A cursor from this list and order: the page starts after it.")] after: Option<String>,
        #[graphql(desc = "Page backward: at most this many devices before `before` (0 to 100).")] last: Option<i32>,
        #[graphql(desc = "A cursor from this list and order: the page ends before it.")] before: Option<String>,
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
        let filter = filter.unwrap_or_default().scoped(read.viewer)?;
        // Counted in the page's statement only within one owner's devices. Across everyone's
        // (an admin's list), aliases of the list in other page sizes would each count every
        // device again; the separate count is shared by them all (`read_once`).
        let counted = match filter.owners {
            Owners::Only(_) => counted_if_asked(ctx),
            Owners::Any | Owners::Nobody => Counted::No,
        };
        let page = read
            .read_once(format!("device_page {filter:?} {request:?} {counted:?}"), || {
                reads::device_page(&read.read_pool, &filter, &request, counted)
            })
            .await
            .map_err(|e| read.database_error(&e))?;
        Ok(DeviceConnection::top_level(filter, request, page))
    }

    /// One device, or null if it does not exist or is not the caller's.
    pub(crate) async fn device(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "The device's id.")] id: Uuid,
        #[graphql(desc = "See `deviceStats(minPosition)`.")] min_position: Option<BigInt>,
    ) -> async_graphql::Result<Option<Device>> {
        let _ = min_position;
        // A root field has no siblings to batch with: read at once rather than wait for a batch.
        let read = read_context(ctx);
        let row = read
            .read_once(format!("device_by_id {id}"), || {
                reads::device_by_id(&read.read_pool, id)
            })
            .await
            .map_err(|e| read.database_error(&e))?;
        Ok(row.filter(|row| read.viewer.can_see(row.owner_id)).map(Device))
    }

    /// A user with their devices, usage and statistics, or null if the caller may not see them.
    async fn user(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "The user's id.")] id: Uuid,
        #[graphql(desc = "See `deviceStats(minPosition)`.")] min_position: Option<BigInt>,
    ) -> Option<User> {
        let _ = min_position;
        read_context(ctx).viewer.can_see(id).then_some(User(id))
    }

    /// Users as a Relay connection ordered by user id (UUIDv7: roughly registration order),
    /// paged by keyset: tier, quota, registration and erasure, never personal data. Admin
    /// tokens only: others get the error code `FORBIDDEN`. Served by version 2 of the `fleet`
    /// projection: until it is live (`cloudphone replay fleet`) this answers with the error
    /// code `PROJECTION_VERSION`, and from the swap on it answers, with no restart.
    #[graphql(
        guard = "users_admin_only",
        complexity = "first.or(last).unwrap_or(20).clamp(1, 100) as usize * child_complexity + 1"
    )]
    #[allow(clippy::too_many_arguments)]
    async fn users(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "Which users to list.")] filter: Option<UsersFilter>,
        #[graphql(desc = "Page forward: at most this many users after `after` (0 to 100; default 20).")] first: Option<
            i32,
        >,
        #[graphql(desc = "A cursor from this list: the page starts after it.")] after: Option<String>,
        #[graphql(desc = "Page backward: at most this many users before `before` (0 to 100).")] last: Option<i32>,
        #[graphql(desc = "A cursor from this list: the page ends before it.")] before: Option<String>,
        #[graphql(desc = "See `deviceStats(minPosition)`.")] min_position: Option<BigInt>,
    ) -> async_graphql::Result<UserConnection> {
        let _ = min_position;
        let read = read_context(ctx);
        let request = user_page_request(&read.limits, first, after.as_deref(), last, before.as_deref())?;
        let filter = UserFilter::from(filter.unwrap_or_default());
        let page = read
            .read_once(format!("user_page {filter:?} {request:?}"), || {
                reads::user_page(&read.read_pool, &filter, &request)
            })
            .await
            .map_err(|e| fleet_v2_error(read, "users", &e))?;
        Ok(UserConnection::new(filter, request, page))
    }

    /// The fleet's size over time, for charts: devices per status at the end of each UTC
    /// hour (or day) of a range (at most 744 points), the current one included; deleted
    /// devices are not counted, as in `deviceStats`. Served by version 2 of the `fleet`
    /// projection: until it is live (`cloudphone replay fleet`) this answers with the error
    /// code `PROJECTION_VERSION`, and from the swap on it answers, with no restart.
    pub(crate) async fn fleet_history(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "The range, and whose fleet; a `user` caller only ever sees their own.")]
        filter: FleetHistoryFilter,
        #[graphql(desc = "One point per hour (the default) or per day.")] group_by: Option<FleetHistoryGroupBy>,
        #[graphql(desc = "See `deviceStats(minPosition)`.")] min_position: Option<BigInt>,
    ) -> async_graphql::Result<Vec<FleetSizePoint>> {
        let _ = min_position;
        let read = read_context(ctx);
        let query = filter.query(&read.limits, read.viewer, group_by.unwrap_or_default())?;
        if query.owners == reads::Owners::Nobody {
            // Another user's fleet: nothing, as every other field answers a user for it.
            return Ok(Vec::new());
        }
        let changes = read
            .read_once(format!("status_changes {query:?}"), || {
                reads::status_changes(&read.read_pool, &query)
            })
            .await
            .map_err(|e| fleet_v2_error(read, "the fleet's history", &e))?;
        Ok(reads::fleet_sizes(&changes, query.from, query.to, query.period)
            .into_iter()
            .map(Into::into)
            .collect())
    }

    /// How far each projection has applied the log, on the source that answered.
    #[graphql(cache_control(no_cache))]
    pub(crate) async fn projection_status(&self, ctx: &Context<'_>) -> async_graphql::Result<Vec<ProjectionState>> {
        let read = read_context(ctx);
        let states = read
            .read_once("projection_status".to_owned(), || {
                read_models::status::projection_status(&read.pool)
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

    /// The event log on the source that answered: its head and monthly partitions. Admin
    /// tokens only: others get the error code `FORBIDDEN`.
    #[graphql(guard = "operations::admin_only", cache_control(no_cache))]
    async fn log(&self, ctx: &Context<'_>) -> async_graphql::Result<LogStatus> {
        operations::log_status(ctx).await
    }

    /// Events projections parked because they could not apply them, oldest first, with what
    /// operators did about each (`cloudphone dead-letters retry|skip`). Admin tokens only:
    /// others get the error code `FORBIDDEN`.
    #[graphql(
        guard = "operations::admin_only",
        cache_control(no_cache),
        complexity = "first.unwrap_or(20).clamp(1, 100) as usize * child_complexity + 1"
    )]
    async fn dead_letters(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "Which letters to list.")] filter: Option<operations::DeadLettersFilter>,
        #[graphql(desc = "At most this many letters after `after` (0 to 100; default 20).")] first: Option<i32>,
        #[graphql(desc = "A cursor from this list: the page starts after it.")] after: Option<String>,
    ) -> async_graphql::Result<operations::DeadLetterConnection> {
        operations::dead_letter_page(ctx, filter, first, after).await
    }

    /// Projection rebuilds in progress (`cloudphone replay`), oldest first; empty when none
    /// runs. Admin tokens only: others get the error code `FORBIDDEN`.
    #[graphql(guard = "operations::admin_only", cache_control(no_cache))]
    async fn replays(&self, ctx: &Context<'_>) -> async_graphql::Result<Vec<Replay>> {
        operations::replays(ctx).await
    }
}

/// One projection's progress.
#[derive(SimpleObject, Debug, Clone)]
#[graphql(cache_control(no_cache), complex)]
pub struct ProjectionState {
    /// The projection (`fleet`, `daily_usage`).
    pub name: String,
    /// Every event at or below this log position is applied.
    pub position: BigInt,
    /// The log's last position.
    pub head: BigInt,
    /// Events committed to the log and not applied yet.
    pub lag_events: BigInt,
    /// Seconds between now and the commit of the last applied event, while behind (0 when
    /// caught up).
    pub lag_seconds: f64,
    /// When the last applied event was committed to the log (null before the first).
    pub last_recorded_at: Option<DateTime<Utc>>,
}

/// The guard of `users`: admins pass, anyone else gets `FORBIDDEN`.
fn users_admin_only(ctx: &Context<'_>) -> async_graphql::Result<()> {
    operations::only_admins_may_read(ctx, "`users`")
}
