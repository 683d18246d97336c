//! Replay: rebuild a projection at some version from the whole log, beside the live version,
//! and swap it in with zero downtime.
//!
//! 1. **Bulk.** The rebuild gets its own schema (`replay_<projection>_<id>`) with the
//!    version's tables, without keys or indexes. The log up to the head at the start is read
//!    in pages by position (`user_events_all`: archived months too; every payload lifted to
//!    its current version by the upcasters) while the previous page is folded in memory. At
//!    most every `checkpoint_every` (or when `max_buffered_rows` are waiting) the fold's new
//!    rows go to `*_partial` tables by COPY, with the rebuild's position, in one transaction:
//!    a killed replay resumes from there. Reads take no lock beyond a statement's; writes go
//!    to tables nobody else uses, so appends, projectors and queries never wait on a rebuild.
//! 2. **Finish.** One transaction turns the partials into the version's tables (the device
//!    fold is written whole; usage partials are summed), adds keys and indexes, and marks the
//!    rebuild `tailing`.
//! 3. **Tail.** Batches after the rebuild's position go through the same incremental code as
//!    the live projector ([`crate::apply::apply_events`]), with the search path pointing at
//!    the shadow schema.
//! 4. **Swap.** When the rebuild is within `swap_lag_events` of the head, one transaction
//!    locks the live tables (waiting at most `lock_timeout`, then retrying), brings the shadow
//!    to the live checkpoint, moves the live tables to `retired_<projection>_v<N>_<id>` and the
//!    shadow tables to the live schema, and sets the checkpoint's position and version. Queries
//!    name tables, not schemas: PostgreSQL re-resolves names for statements planned before the
//!    swap (on replicas too, through the WAL), so the query API carries on with no restart.
//!    A live projector still folding the old version finds its checkpoint moved (or its version
//!    changed), rolls its batch back and resumes at the new version.
//!
//!    **Kafka mode** (the projection has stored partition offsets): each partition's workers
//!    have applied up to a position of their own, beyond the checkpoint (the least of them).
//!    The swap locks those offsets after the checkpoint row, brings the shadow up to the
//!    furthest, and hands every partition over after the swap position (each worker skips
//!    what it reads at or below it; a partition the relay recorded as wholly at or below it
//!    starts after its last message). It also counts the swap (`projection_checkpoints.swaps`):
//!    a worker's batch folded before it, even of the same version, is rolled back in its own
//!    transaction, and the worker goes on from the handed-over offsets, in the same group.
//!
//! Beside live appends, a replay can read the history from a streaming replica (`history.rs`:
//! only a standby of this database that has replayed the target) and bounds its share of the
//! primary (`throttle.rs`: events folded per second, COPY bytes per second, index build
//! workers).
//!
//! One file per phase: `bulk.rs` (bulk and finish, writing through `copy.rs`'s binary COPY),
//! `tail.rs` and `swap.rs`; `admin.rs` has what operators run around replays (status,
//! abandon, dropping replaced versions). This file holds the public types, the replay lock
//! and the rebuild's row, and runs the phases in order.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use event_log::ReadError;
use sqlx::{AssertSqlSafe, ConnectOptions, Connection, PgConnection, PgPool, Row};
use tokio_util::sync::CancellationToken;

use read_models::Projection;
use read_models::versions::{TableLayout, quote_ident};

use crate::metrics_names as m;

mod admin;
mod bulk;
mod copy;
mod history;
mod swap;
mod tail;
mod throttle;

pub use admin::{RebuildStatus, abandon, drop_replaced, rebuilds};
use bulk::{bulk, finish_bulk};
pub use history::History;
use tail::tail_and_swap;
pub use throttle::Throttle;

/// How a replay reads, checkpoints and swaps.
#[derive(Debug, Clone, Copy)]
pub struct ReplayConfig {
    /// Events read per page in the bulk phase.
    pub page_events: i64,
    /// Longest time between two bulk checkpoints (what a killed replay can lose).
    pub checkpoint_every: Duration,
    /// Rows waiting in memory that force a checkpoint (bounds memory on huge histories).
    pub max_buffered_rows: usize,
    /// Events per transaction while tailing.
    pub tail_batch: i64,
    /// The swap happens once the rebuild is at most this far behind the head.
    pub swap_lag_events: i64,
    /// How long the swap waits for the live tables' locks before giving up and retrying.
    pub lock_timeout: Duration,
    /// Swap attempts before the replay gives up (it can be run again: it resumes).
    pub swap_attempts: u32,
    /// Replaced versions kept after a swap (older ones are dropped); `None` keeps them all.
    pub keep_old: Option<usize>,
    /// How much of the primary the replay may take.
    pub throttle: Throttle,
}

impl Default for ReplayConfig {
    fn default() -> Self {
        ReplayConfig {
            page_events: 20_000,
            checkpoint_every: Duration::from_secs(60),
            // About 120 bytes each: at most ~1.2 GB of fold in memory.
            max_buffered_rows: 10_000_000,
            tail_batch: 10_000,
            swap_lag_events: 1_000,
            lock_timeout: Duration::from_secs(2),
            swap_attempts: 30,
            keep_old: None,
            throttle: Throttle::UNLIMITED,
        }
    }
}

/// Where a replay is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayPhase {
    /// Waiting for the history replica to replay the log up to `target`.
    WaitingForHistory { replayed: i64, target: i64 },
    /// Folding the history up to `target`.
    Bulk { resumed_at: i64, target: i64 },
    /// Writing the final tables, keys and indexes.
    Finishing,
    /// Following the head until close enough to swap.
    Tailing,
    /// Swapped in at `position`.
    Swapped { position: i64 },
}

/// Told about a replay's progress (the CLI draws a bar; tests kill it at some point).
pub trait ReplayObserver: Send + Sync {
    fn phase(&self, phase: ReplayPhase);
    /// The rebuild has every event up to `position`, of `target` (while waiting for the
    /// history replica: the replica has replayed up to `position`).
    fn progress(&self, position: i64, target: i64);
}

/// An observer that ignores everything.
#[derive(Debug, Clone, Copy, Default)]
pub struct Unobserved;

impl ReplayObserver for Unobserved {
    fn phase(&self, _: ReplayPhase) {}
    fn progress(&self, _: i64, _: i64) {}
}

/// What a finished replay did.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplaySummary {
    pub projection: Projection,
    pub version: i32,
    pub rebuild_id: i64,
    /// True when this run continued a rebuild an earlier run had started.
    pub resumed: bool,
    /// Log positions folded by the bulk phase in this run, and how long it took.
    pub bulk_positions: i64,
    pub bulk_seconds: f64,
    /// Events of the streams the version folds (devices; users too from `fleet` v2) decoded
    /// and folded in the bulk phase of this run.
    pub bulk_events: i64,
    /// Events that could not be applied (malformed, unknown types): left out, as the live
    /// projector parks them.
    pub not_applicable: i64,
    pub finish_seconds: f64,
    pub tail_events: i64,
    pub swap_seconds: f64,
    /// The checkpoint the new version went live at.
    pub live_position: i64,
    pub replaced_version: i32,
    /// Where the replaced tables are kept (`None` once dropped by `keep_old`).
    pub replaced_schema: Option<String>,
    pub total_seconds: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("`{projection}` has no version {version} in this code (versions 1 to {latest})")]
    UnknownVersion {
        projection: &'static str,
        version: i32,
        latest: i32,
    },
    #[error("a replay of `{projection}` is already running (another process holds its lock)")]
    AlreadyRunning { projection: &'static str },
    #[error(
        "rebuild {id} of `{projection}` to version {version} is in progress: resume it with \
         `--version {version}`, or give it up with `cloudphone replay {projection} --abandon`"
    )]
    OtherVersionInProgress {
        projection: &'static str,
        id: i64,
        version: i32,
    },
    #[error("rebuild {id} moved under this replay: another process is running it")]
    Moved { id: i64 },
    #[error(
        "the live tables of `{projection}` stayed locked through {attempts} swap attempts; run the replay again to retry"
    )]
    SwapLocked { projection: &'static str, attempts: u32 },
    #[error("replay stopped before the swap; run it again to resume from its checkpoint")]
    Stopped,
    #[error("cannot use the history replica {at}: {source}")]
    HistoryUnreachable {
        at: String,
        #[source]
        source: sqlx::Error,
    },
    #[error(
        "the history replica {at} is not a standby of this primary: {reason}; point --history-url at a streaming replica of this database, or leave it out to read the primary"
    )]
    NotAStandby { at: String, reason: String },
    #[error(
        "the history replica {at} had replayed the log to position {replayed} of the {target} this replay needs after waiting {waited_seconds} s; check its replication (ops/dev/replica.sh lag), wait longer (--history-wait-secs), or leave --history-url out to read the primary"
    )]
    HistoryBehind {
        at: String,
        replayed: i64,
        target: i64,
        waited_seconds: u64,
    },
    #[error(
        "the history replica {at} holds another event than the primary at position {position}: it is not a copy of this log"
    )]
    HistoryDiverged { at: String, position: i64 },
    #[error("replay database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("log read failed: {0}")]
    Read(#[from] ReadError),
}

/// A rebuild's row in `projection_rebuilds`.
#[derive(Debug, Clone)]
struct Rebuild {
    id: i64,
    layout: TableLayout,
    state: String,
    shadow_schema: String,
    target_position: i64,
    position: i64,
    last_recorded_at: Option<DateTime<Utc>>,
    events_folded: i64,
}

/// Rebuilds `projection` at `version` (the newest this code knows when `None`) and swaps it
/// in. Resumes a rebuild of the same version that an earlier run left unfinished.
pub async fn replay(
    pool: &PgPool,
    projection: Projection,
    version: Option<i32>,
    config: ReplayConfig,
    observer: &dyn ReplayObserver,
    stop: &CancellationToken,
) -> Result<ReplaySummary, ReplayError> {
    replay_from(pool, &History::primary(), projection, version, config, observer, stop).await
}

/// [`replay`], with the bulk phase reading the history from `history` (a replica of `pool`'s
/// database, checked before anything changes). The tail and the swap use `pool`.
pub async fn replay_from(
    pool: &PgPool,
    history: &History,
    projection: Projection,
    version: Option<i32>,
    config: ReplayConfig,
    observer: &dyn ReplayObserver,
    stop: &CancellationToken,
) -> Result<ReplaySummary, ReplayError> {
    let started = Instant::now();
    let version = version.unwrap_or(projection.latest_version());
    let layout = projection.layout(version).ok_or(ReplayError::UnknownVersion {
        projection: projection.name(),
        version,
        latest: projection.latest_version(),
    })?;
    history.check_standby(pool).await?;
    let lock = ReplayLock::take(pool, projection).await?;
    let outcome = run(pool, history, layout, config, observer, stop, started).await;
    lock.release().await;
    outcome
}

/// The session advisory lock one replay of a projection holds, on a connection of its own
/// (not the pool's): a second replay is refused, and a killed or aborted one releases it
/// when its connection closes.
struct ReplayLock {
    conn: PgConnection,
}

impl ReplayLock {
    async fn take(pool: &PgPool, projection: Projection) -> Result<Self, ReplayError> {
        let mut conn = pool.connect_options().connect().await?;
        // A replay killed a moment ago may still hold it until its server process notices.
        sqlx::query("SET lock_timeout = '3s'").execute(&mut conn).await?;
        let locked = sqlx::query("SELECT pg_advisory_lock(hashtext('cloudphone.replay.' || $1))")
            .bind(projection.name())
            .execute(&mut conn)
            .await;
        match locked {
            Ok(_) => Ok(ReplayLock { conn }),
            Err(error)
                if error
                    .as_database_error()
                    .and_then(|e| e.code())
                    .is_some_and(|c| c == "55P03") =>
            {
                Err(ReplayError::AlreadyRunning {
                    projection: projection.name(),
                })
            }
            Err(error) => Err(error.into()),
        }
    }

    async fn release(self) {
        let _ = self.conn.close().await;
    }
}

async fn run(
    pool: &PgPool,
    history: &History,
    layout: TableLayout,
    config: ReplayConfig,
    observer: &dyn ReplayObserver,
    stop: &CancellationToken,
    started: Instant,
) -> Result<ReplaySummary, ReplayError> {
    let projection = layout.projection;
    let (mut rebuild, resumed) = match in_progress(pool, projection).await? {
        Some(rebuild) if rebuild.layout != layout => {
            return Err(ReplayError::OtherVersionInProgress {
                projection: projection.name(),
                id: rebuild.id,
                version: rebuild.layout.version,
            });
        }
        Some(rebuild) => {
            if rebuild.state == "building" {
                history.wait_for(pool, rebuild.target_position, observer).await?;
            }
            (rebuild, true)
        }
        None => {
            // The target is the head now; the replica must reach it before anything is
            // registered, so a replica that never does leaves no rebuild behind.
            let target: i64 = sqlx::query_scalar("SELECT position FROM log_head")
                .fetch_one(pool)
                .await?;
            history.wait_for(pool, target, observer).await?;
            (start_rebuild(pool, layout, target).await?, false)
        }
    };
    tracing::info!(
        projection = projection.name(),
        version = layout.version,
        rebuild = rebuild.id,
        schema = %rebuild.shadow_schema,
        resumed,
        position = rebuild.position,
        target = rebuild.target_position,
        history = if history.is_replica() { "replica" } else { "primary" },
        "replay started"
    );
    let mut summary = ReplaySummary {
        projection,
        version: layout.version,
        rebuild_id: rebuild.id,
        resumed,
        bulk_positions: 0,
        bulk_seconds: 0.0,
        bulk_events: 0,
        not_applicable: 0,
        finish_seconds: 0.0,
        tail_events: 0,
        swap_seconds: 0.0,
        live_position: 0,
        replaced_version: 0,
        replaced_schema: None,
        total_seconds: 0.0,
    };
    if rebuild.state == "building" {
        let bulk_started = Instant::now();
        let from = rebuild.position;
        observer.phase(ReplayPhase::Bulk {
            resumed_at: from,
            target: rebuild.target_position,
        });
        let folded = bulk(pool, history.pool(pool), &mut rebuild, config, observer, stop).await?;
        summary.bulk_positions = rebuild.target_position - from;
        summary.bulk_events = folded.events;
        summary.not_applicable = folded.not_applicable;
        summary.bulk_seconds = bulk_started.elapsed().as_secs_f64();
        observer.phase(ReplayPhase::Finishing);
        let finish_started = Instant::now();
        finish_bulk(pool, &mut rebuild, folded, config.throttle).await?;
        summary.finish_seconds = finish_started.elapsed().as_secs_f64();
    }
    observer.phase(ReplayPhase::Tailing);
    let swap = tail_and_swap(pool, &mut rebuild, config, observer, stop, &mut summary).await?;
    observer.phase(ReplayPhase::Swapped {
        position: swap.position,
    });
    summary.live_position = swap.position;
    summary.replaced_version = swap.replaced_version;
    summary.replaced_schema = Some(swap.replaced_schema);
    if let Some(keep) = config.keep_old {
        let dropped = drop_replaced(pool, Some(projection), keep).await?;
        if summary.replaced_schema.as_ref().is_some_and(|s| dropped.contains(s)) {
            summary.replaced_schema = None;
        }
    }
    summary.total_seconds = started.elapsed().as_secs_f64();
    metrics::counter!(m::REPLAY_SWAPS_TOTAL, "projection" => projection.name()).increment(1);
    tracing::info!(
        projection = projection.name(),
        version = layout.version,
        position = swap.position,
        "replay swapped in"
    );
    Ok(summary)
}

fn rebuild_from_row(row: &sqlx::postgres::PgRow) -> Result<Option<Rebuild>, sqlx::Error> {
    let projection: String = row.try_get("projection")?;
    let version: i32 = row.try_get("version")?;
    let Some(layout) = Projection::named(&projection).and_then(|p| p.layout(version)) else {
        return Ok(None);
    };
    Ok(Some(Rebuild {
        id: row.try_get("id")?,
        layout,
        state: row.try_get("state")?,
        shadow_schema: row.try_get("shadow_schema")?,
        target_position: row.try_get("target_position")?,
        position: row.try_get("position")?,
        last_recorded_at: row.try_get("last_recorded_at")?,
        events_folded: row.try_get("events_folded")?,
    }))
}

const REBUILD_COLUMNS: &str =
    "id, projection, version, state, shadow_schema, target_position, position, last_recorded_at, events_folded";

async fn in_progress(pool: &PgPool, projection: Projection) -> Result<Option<Rebuild>, ReplayError> {
    let row = sqlx::query(AssertSqlSafe(format!(
        "SELECT {REBUILD_COLUMNS} FROM projection_rebuilds WHERE projection = $1 AND state IN ('building', 'tailing')"
    )))
    .bind(projection.name())
    .fetch_optional(pool)
    .await?;
    match row {
        None => Ok(None),
        Some(row) => match rebuild_from_row(&row)? {
            Some(rebuild) => Ok(Some(rebuild)),
            // Started by newer code at a version this one does not know.
            None => Err(ReplayError::OtherVersionInProgress {
                projection: projection.name(),
                id: row.try_get("id")?,
                version: row.try_get("version")?,
            }),
        },
    }
}

/// Registers a rebuild targeting `target` (the head a moment ago) and creates its schema
/// and tables.
async fn start_rebuild(pool: &PgPool, layout: TableLayout, target: i64) -> Result<Rebuild, ReplayError> {
    let mut tx = pool.begin().await?;
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO projection_rebuilds (projection, version, state, shadow_schema, target_position)
         VALUES ($1, $2, 'building', '', $3) RETURNING id",
    )
    .bind(layout.projection.name())
    .bind(layout.version)
    .bind(target)
    .fetch_one(&mut *tx)
    .await?;
    let schema = format!("replay_{}_{id}", layout.projection.name());
    sqlx::query("UPDATE projection_rebuilds SET shadow_schema = $2 WHERE id = $1")
        .bind(id)
        .bind(&schema)
        .execute(&mut *tx)
        .await?;
    let s = quote_ident(&schema);
    let mut ddl = format!("CREATE SCHEMA {s};{}", layout.table_ddl(&schema));
    for table in layout.tables() {
        ddl.push_str(&format!("CREATE TABLE {s}.{table}_partial (LIKE {s}.{table});"));
    }
    sqlx::raw_sql(AssertSqlSafe(ddl)).execute(&mut *tx).await?;
    tx.commit().await?;
    Ok(Rebuild {
        id,
        layout,
        state: "building".into(),
        shadow_schema: schema,
        target_position: target,
        position: 0,
        last_recorded_at: None,
        events_folded: 0,
    })
}
