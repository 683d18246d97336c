//! What the web console's admin view watches: each projection's live version and dead
//! letters ([`ProjectionState`]'s admin fields), the log's head and monthly partitions
//! ([`LogStatus`]) and the projection rebuilds in progress ([`Replay`]).
//!
//! Admin tokens only ([`admin_only`]). Any other caller, read-only services included, gets an
//! error with the code `FORBIDDEN` rather than a null: the fields are non-null, and the
//! console must tell "not allowed" from "nothing there". As GraphQL propagates an error on a
//! non-null field to the nearest nullable parent, a non-admin asking for one of them loses the
//! rest of that parent too (for a root field, the whole `data`): ask for them on their own.
//!
//! None of them is cached (they describe the source right now, not its read models), and an
//! admin's answers are cached apart from a service's anyway (see [`Viewer::cache_scope`]).

use async_graphql::{ComplexObject, Context, Enum, ErrorExtensions, SimpleObject};
use chrono::{DateTime, Months, Utc};
use event_log::partitions::{PartitionInfo, list_partitions};
use event_log::{LogReader, ReadError};
use read_models::status::{self, ProjectionHealth, RebuildProgress};

use super::scalars::BigInt;
use super::{ProjectionState, Viewer, read_context};

/// The guard of every operations field: admins pass, anyone else gets `FORBIDDEN`.
pub(crate) fn admin_only(ctx: &Context<'_>) -> async_graphql::Result<()> {
    only_admins_may_read(
        ctx,
        "the operations fields (projection versions and dead letters, `log`, `replays`)",
    )
}

/// Admins pass; anyone else gets `FORBIDDEN`, naming `what` they may not read.
pub(crate) fn only_admins_may_read(ctx: &Context<'_>, what: &str) -> async_graphql::Result<()> {
    match read_context(ctx).viewer {
        Viewer::Admin => Ok(()),
        Viewer::Everyone | Viewer::User(_) => {
            Err(async_graphql::Error::new(format!("only admin tokens may read {what}"))
                .extend_with(|_, e| e.set("code", "FORBIDDEN")))
        }
    }
}

/// A stored value the API cannot show (a bug or a hand-edited row); logged, never shown.
fn internal_error(what: &str) -> async_graphql::Error {
    tracing::error!(what, "operations status holds a value the API cannot show");
    async_graphql::Error::new("the operations status could not be read")
        .extend_with(|_, e| e.set("code", "INTERNAL_SERVER_ERROR"))
}

#[ComplexObject]
impl ProjectionState {
    /// The version of the projection's live tables (a replay builds the next one beside
    /// them, see `replays`). Admin tokens only: others get the error code `FORBIDDEN`.
    #[graphql(guard = "admin_only")]
    async fn version(&self, ctx: &Context<'_>) -> async_graphql::Result<i32> {
        Ok(health_of(ctx, &self.name).await?.version)
    }

    /// Events the projection could not apply, parked in `projection_dead_letters` (0 when
    /// healthy). Admin tokens only: others get the error code `FORBIDDEN`.
    #[graphql(guard = "admin_only")]
    async fn dead_letters(&self, ctx: &Context<'_>) -> async_graphql::Result<BigInt> {
        Ok(BigInt(health_of(ctx, &self.name).await?.dead_letters))
    }
}

/// One projection's health, read once per request for every projection.
async fn health_of(ctx: &Context<'_>, projection: &str) -> async_graphql::Result<ProjectionHealth> {
    let read = read_context(ctx);
    read.read_once("projection_health".to_owned(), || status::projection_health(&read.pool))
        .await
        .map_err(|e| read.database_error(&e))?
        .into_iter()
        .find(|health| health.projection == projection)
        .ok_or_else(|| internal_error("a projection checkpoint vanished between two statements"))
}

/// The event log on the source that answered.
#[derive(SimpleObject, Debug, Clone)]
#[graphql(cache_control(no_cache))]
pub struct LogStatus {
    /// The position of the last committed event (0 for an empty log).
    pub head: BigInt,
    /// When the last event was committed.
    pub head_recorded_at: DateTime<Utc>,
    /// The monthly partitions of `user_events`, live and archived, oldest first.
    pub partitions: Vec<LogPartition>,
}

/// One monthly partition of the event log.
#[derive(SimpleObject, Debug, Clone)]
#[graphql(cache_control(no_cache))]
pub struct LogPartition {
    /// The table's name, `user_events_YYYY_MM`.
    pub name: String,
    /// The first instant it holds (the month's first midnight, UTC).
    pub from: DateTime<Utc>,
    /// The first instant it no longer holds (the next month's first midnight, UTC).
    pub to: DateTime<Utc>,
    /// True once moved to `user_events_archive` (exports still read it).
    pub archived: bool,
    /// The planner's estimate of its rows; null until PostgreSQL first analyzes it.
    pub estimated_rows: Option<BigInt>,
    /// Its size on disk with indexes and TOAST, in bytes.
    pub total_bytes: BigInt,
}

impl LogPartition {
    fn new(partition: PartitionInfo) -> Option<Self> {
        let from = partition.month.and_hms_opt(0, 0, 0)?.and_utc();
        let to = from.checked_add_months(Months::new(1))?;
        Some(LogPartition {
            name: partition.name,
            from,
            to,
            archived: partition.archived,
            estimated_rows: (partition.estimated_rows >= 0).then_some(BigInt(partition.estimated_rows)),
            total_bytes: BigInt(partition.total_bytes),
        })
    }
}

/// The log's head and partitions (admins only: see the module's docs).
pub(crate) async fn log_status(ctx: &Context<'_>) -> async_graphql::Result<LogStatus> {
    let read = read_context(ctx);
    let (head, head_recorded_at, partitions) = read
        .read_once("log_status".to_owned(), || async {
            let head = LogReader::new(read.pool.clone())
                .head()
                .await
                .map_err(|error| match error {
                    ReadError::Unavailable(error) | ReadError::Database(error) => error,
                    corrupt @ ReadError::Corrupt { .. } => sqlx::Error::Decode(Box::new(corrupt)),
                })?;
            let partitions = list_partitions(&read.pool).await?;
            Ok((head.position, head.recorded_at, partitions))
        })
        .await
        .map_err(|e| read.database_error(&e))?;
    Ok(LogStatus {
        head: BigInt(head),
        head_recorded_at,
        partitions: partitions
            .into_iter()
            .map(|partition| LogPartition::new(partition).ok_or_else(|| internal_error("a partition's month")))
            .collect::<async_graphql::Result<_>>()?,
    })
}

/// Where a rebuild is.
#[derive(Enum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayState {
    /// Folding the log, from its start up to `targetPosition`, into the new tables.
    Building,
    /// The new tables are complete and follow the log head until they are swapped in.
    Tailing,
}

/// A projection rebuild `cloudphone replay` is running beside the live tables.
#[derive(SimpleObject, Debug, Clone)]
#[graphql(cache_control(no_cache))]
pub struct Replay {
    /// The projection rebuilt (`fleet`, `daily_usage`).
    pub projection: String,
    /// The version being built.
    pub version: i32,
    /// Where the rebuild is.
    pub state: ReplayState,
    /// Every event at or below this log position is in the new tables.
    pub position: BigInt,
    /// The log head when the rebuild started: `BUILDING` ends there.
    pub target_position: BigInt,
    /// Events applied to the new tables so far.
    pub events_folded: BigInt,
    /// When the rebuild started.
    pub started_at: DateTime<Utc>,
    /// When the rebuild last recorded progress (a stale value means it stopped).
    pub updated_at: DateTime<Utc>,
}

impl Replay {
    fn new(rebuild: RebuildProgress) -> Option<Self> {
        let state = match rebuild.state.as_str() {
            "building" => ReplayState::Building,
            "tailing" => ReplayState::Tailing,
            _ => return None,
        };
        Some(Replay {
            projection: rebuild.projection,
            version: rebuild.version,
            state,
            position: BigInt(rebuild.position),
            target_position: BigInt(rebuild.target_position),
            events_folded: BigInt(rebuild.events_folded),
            started_at: rebuild.started_at,
            updated_at: rebuild.updated_at,
        })
    }
}

/// The rebuilds in progress, oldest first (admins only: see the module's docs).
pub(crate) async fn replays(ctx: &Context<'_>) -> async_graphql::Result<Vec<Replay>> {
    let read = read_context(ctx);
    read.read_once("rebuilds_in_progress".to_owned(), || {
        status::rebuilds_in_progress(&read.pool)
    })
    .await
    .map_err(|e| read.database_error(&e))?
    .into_iter()
    .map(|rebuild| Replay::new(rebuild).ok_or_else(|| internal_error("a rebuild's state")))
    .collect()
}
