//! What the web console's admin view watches: each projection's live version and dead
//! letters ([`ProjectionState`]'s admin fields), the log's head and monthly partitions
//! ([`LogStatus`]), the projection rebuilds in progress ([`Replay`]) and the parked events
//! themselves ([`DeadLetterConnection`]).
//!
//! Admin tokens only ([`admin_only`]). Any other caller, read-only services included, gets an
//! error with the code `FORBIDDEN` rather than a null: the fields are non-null, and the
//! console must tell "not allowed" from "nothing there". As GraphQL propagates an error on a
//! non-null field to the nearest nullable parent, a non-admin asking for one of them loses the
//! rest of that parent too (for a root field, the whole `data`): ask for them on their own.
//!
//! None of them is cached (they describe the source right now, not its read models), and an
//! admin's answers are cached apart from a service's anyway (see [`Viewer::cache_scope`]).

use async_graphql::{ComplexObject, Context, Enum, ErrorExtensions, InputObject, Object, SimpleObject};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Months, Utc};
use event_log::partitions::{PartitionInfo, list_partitions};
use event_log::{LogReader, ReadError};
use read_models::Projection;
use read_models::dead_letters::{self, DeadLetterFilter};
use read_models::status::{self, ProjectionHealth, RebuildProgress};
use uuid::Uuid;

use super::scalars::BigInt;
use super::types::PageInfo;
use super::{ProjectionState, Viewer, bad_input, read_context};

/// The guard of every operations field: admins pass, anyone else gets `FORBIDDEN`.
pub(crate) fn admin_only(ctx: &Context<'_>) -> async_graphql::Result<()> {
    only_admins_may_read(
        ctx,
        "the operations fields (projection versions and dead letters, `log`, `replays`, `deadLetters`)",
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

/// Where a parked event stands.
#[derive(Enum, Debug, Clone, Copy, PartialEq, Eq)]
#[graphql(remote = "read_models::dead_letters::DeadLetterState")]
pub enum DeadLetterState {
    /// Parked: the event is missing from the projection's read model.
    Pending,
    /// Applied by `cloudphone dead-letters retry`.
    Retried,
    /// Given up by an operator, with a reason (`resolutionNote`).
    Skipped,
}

/// Which dead letters to list.
#[derive(InputObject, Debug, Clone, Default)]
pub struct DeadLettersFilter {
    /// Only this projection's (`fleet`, `daily_usage`).
    pub projection: Option<String>,
    /// Only letters in this state.
    pub state: Option<DeadLetterState>,
}

/// An event a projection parked because it could not apply it (see the runbook
/// `ops/runbooks/dead-letters.md`), and what an operator did about it.
#[derive(SimpleObject, Debug, Clone)]
#[graphql(cache_control(no_cache))]
pub struct DeadLetter {
    /// The letter's id, as `cloudphone dead-letters retry|skip` take it.
    pub id: BigInt,
    /// The projection that parked it (`fleet`, `daily_usage`).
    pub projection: String,
    /// The event's log position (-1: a message on the topic with no position).
    pub position: BigInt,
    /// The event's id; null for a message that was not an event envelope.
    pub event_id: Option<Uuid>,
    /// The event's type (`?` for a message that was not an envelope).
    pub event_type: String,
    /// The event's schema version.
    pub schema_version: i32,
    /// Why the last attempt to apply it failed.
    pub error: String,
    /// Pending (waiting for an operator), retried (applied once by a retry) or skipped.
    pub state: DeadLetterState,
    /// Times the projection tried to apply it: 1 when parked, one more per retry.
    pub attempts: i32,
    /// When it was parked.
    pub created_at: DateTime<Utc>,
    /// When it was last retried (null: never).
    pub last_attempt_at: Option<DateTime<Utc>>,
    /// When it was retried successfully or skipped (null while pending).
    pub resolved_at: Option<DateTime<Utc>>,
    /// Who retried or skipped it.
    pub resolved_by: Option<String>,
    /// Why it was skipped (null otherwise).
    pub resolution_note: Option<String>,
}

impl From<dead_letters::DeadLetter> for DeadLetter {
    fn from(l: dead_letters::DeadLetter) -> Self {
        DeadLetter {
            id: BigInt(l.id),
            projection: l.projection,
            position: BigInt(l.position),
            event_id: l.event_id,
            event_type: l.event_type,
            schema_version: l.schema_version,
            error: l.error,
            state: l.state.into(),
            attempts: l.attempts,
            created_at: l.created_at,
            last_attempt_at: l.last_attempt_at,
            resolved_at: l.resolved_at,
            resolved_by: l.resolved_by,
            resolution_note: l.resolution_note,
        }
    }
}

/// A dead letter with its cursor.
#[derive(SimpleObject, Debug, Clone)]
#[graphql(cache_control(no_cache))]
pub struct DeadLetterEdge {
    /// Opaque: pass it as `after` to page on from this letter.
    pub cursor: String,
    /// The letter.
    pub node: DeadLetter,
}

/// A page of dead letters (a Relay connection, forward only), oldest first.
#[derive(Debug, Clone)]
pub struct DeadLetterConnection {
    filter: DeadLetterFilter,
    paged_from: bool,
    letters: Vec<DeadLetter>,
    more: bool,
}

/// A page of dead letters (a Relay connection, forward only), oldest first.
#[Object(cache_control(no_cache))]
impl DeadLetterConnection {
    /// The page's letters with their cursors.
    async fn edges(&self) -> Vec<DeadLetterEdge> {
        self.letters
            .iter()
            .map(|letter| DeadLetterEdge {
                cursor: encode_dead_letter_cursor(letter.id.0),
                node: letter.clone(),
            })
            .collect()
    }

    /// The page's letters (as `edges`, without cursors).
    async fn nodes(&self) -> Vec<DeadLetter> {
        self.letters.clone()
    }

    /// Where the page sits in the list.
    async fn page_info(&self) -> PageInfo {
        PageInfo {
            has_next_page: self.more,
            has_previous_page: self.paged_from,
            start_cursor: self.letters.first().map(|l| encode_dead_letter_cursor(l.id.0)),
            end_cursor: self.letters.last().map(|l| encode_dead_letter_cursor(l.id.0)),
        }
    }

    /// Letters matching the filter, across every page.
    async fn total_count(&self, ctx: &Context<'_>) -> async_graphql::Result<BigInt> {
        let read = read_context(ctx);
        let count = read
            .read_once(format!("count_dead_letters {:?}", self.filter), || {
                dead_letters::count(&read.pool, self.filter)
            })
            .await
            .map_err(|e| read.database_error(&e))?;
        Ok(BigInt(count))
    }
}

fn encode_dead_letter_cursor(id: i64) -> String {
    URL_SAFE_NO_PAD.encode(format!("dl1:{id}"))
}

/// The letter id a dead-letter cursor holds; any other cursor is refused.
fn decode_dead_letter_cursor(cursor: &str) -> async_graphql::Result<i64> {
    let invalid = || {
        bad_input(format!(
            "`after` is not a cursor of this list: {}",
            cursor.chars().take(64).collect::<String>()
        ))
    };
    let bytes = URL_SAFE_NO_PAD.decode(cursor.trim()).map_err(|_| invalid())?;
    let text = String::from_utf8(bytes).map_err(|_| invalid())?;
    text.strip_prefix("dl1:")
        .and_then(|id| id.parse::<i64>().ok())
        .ok_or_else(invalid)
}

/// One page of dead letters (admins only: see the module's docs).
pub(crate) async fn dead_letter_page(
    ctx: &Context<'_>,
    filter: Option<DeadLettersFilter>,
    first: Option<i32>,
    after: Option<String>,
) -> async_graphql::Result<DeadLetterConnection> {
    let read = read_context(ctx);
    let filter = filter.unwrap_or_default();
    let projection = filter
        .projection
        .as_deref()
        .map(|name| {
            Projection::named(name).ok_or_else(|| {
                bad_input(format!(
                    "unknown projection `{}`: fleet or daily_usage",
                    name.chars().take(64).collect::<String>()
                ))
            })
        })
        .transpose()?;
    let size = first.unwrap_or(read.limits.default_page_size);
    if size < 0 || size > read.limits.max_page_size {
        return Err(bad_input(format!(
            "page size {size} is out of range: `first` takes 0 to {}",
            read.limits.max_page_size
        )));
    }
    let after_id = after.as_deref().map(decode_dead_letter_cursor).transpose()?;
    let filter = DeadLetterFilter {
        projection,
        state: filter.state.map(Into::into),
        after_id,
    };
    let mut letters = if size == 0 {
        Vec::new()
    } else {
        // One more than asked: whether another page follows.
        read.read_once(format!("dead_letters {filter:?} {size}"), || {
            dead_letters::list(&read.pool, filter, i64::from(size) + 1)
        })
        .await
        .map_err(|e| read.database_error(&e))?
    };
    let more = letters.len() > usize::try_from(size).unwrap_or_default();
    letters.truncate(usize::try_from(size).unwrap_or_default());
    Ok(DeadLetterConnection {
        filter: DeadLetterFilter {
            after_id: None,
            ..filter
        },
        paged_from: after_id.is_some(),
        letters: letters.into_iter().map(DeadLetter::from).collect(),
        more,
    })
}
