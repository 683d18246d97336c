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

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use chrono::{DateTime, Datelike, NaiveDate, Utc};
use event_log::{LogReader, LogTail, LoggedPayload, ReadError, TailConfig};
use event_schema::{DeviceEvent, Event, StreamType};
use sqlx::postgres::PgCopyIn;
use sqlx::{AssertSqlSafe, ConnectOptions, Connection, PgConnection, PgPool, Row};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::apply::apply_events;
use crate::fleet::{DeviceRow, FleetFold, stats_of};
use crate::stored::device_row;
use crate::usage::{ProviderDayKey, ProviderUsage, UsageDelta, UsageKey, fold_provider_shares, fold_usage_shares};
use crate::versions::{TableLayout, quote_ident};
use crate::{Projection, metrics_names as m};

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
        }
    }
}

/// Where a replay is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayPhase {
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
    /// The rebuild has every event up to `position`, of `target`.
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
    /// Events of device streams decoded and folded in the bulk phase of this run.
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
    #[error(
        "`{projection}` is maintained by Kafka-mode projectors (it has stored partition offsets): \
         a replay swaps in a new version at a log position, which only embedded projectors follow. \
         Run its projectors in embedded mode, then replay"
    )]
    KafkaMode { projection: &'static str },
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
    let started = Instant::now();
    let version = version.unwrap_or(projection.latest_version());
    let layout = projection.layout(version).ok_or(ReplayError::UnknownVersion {
        projection: projection.name(),
        version,
        latest: projection.latest_version(),
    })?;
    refuse_kafka_mode(pool, projection).await?;
    let lock = ReplayLock::take(pool, projection).await?;
    let outcome = run(pool, layout, config, observer, stop, started).await;
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
        Some(rebuild) => (rebuild, true),
        None => (start_rebuild(pool, layout).await?, false),
    };
    tracing::info!(
        projection = projection.name(),
        version = layout.version,
        rebuild = rebuild.id,
        schema = %rebuild.shadow_schema,
        resumed,
        position = rebuild.position,
        target = rebuild.target_position,
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
        let folded = bulk(pool, &mut rebuild, config, observer, stop).await?;
        summary.bulk_positions = rebuild.target_position - from;
        summary.bulk_events = folded.events;
        summary.not_applicable = folded.not_applicable;
        summary.bulk_seconds = bulk_started.elapsed().as_secs_f64();
        observer.phase(ReplayPhase::Finishing);
        let finish_started = Instant::now();
        finish_bulk(pool, &mut rebuild, folded).await?;
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

async fn refuse_kafka_mode(pool: &PgPool, projection: Projection) -> Result<(), ReplayError> {
    let kafka: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM projection_offsets WHERE projection = $1)")
        .bind(projection.name())
        .fetch_one(pool)
        .await?;
    if kafka {
        return Err(ReplayError::KafkaMode {
            projection: projection.name(),
        });
    }
    Ok(())
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

/// Registers a rebuild targeting the current head and creates its schema and tables.
async fn start_rebuild(pool: &PgPool, layout: TableLayout) -> Result<Rebuild, ReplayError> {
    let mut tx = pool.begin().await?;
    let target: i64 = sqlx::query_scalar("SELECT position FROM log_head")
        .fetch_one(&mut *tx)
        .await?;
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

/// What the bulk phase folded in this run, with what is not checkpointed yet.
struct Folded {
    fold: BulkFold,
    events: i64,
    not_applicable: i64,
    /// Events folded since the last checkpoint.
    unsaved_events: i64,
    last_recorded_at: Option<DateTime<Utc>>,
}

/// Rows folded since the last checkpoint.
#[derive(Default)]
struct UsageBuffer {
    usage: HashMap<(UsageKey, String), UsageDelta>,
    by_provider: HashMap<ProviderDayKey, ProviderUsage>,
}

enum BulkFold {
    Fleet(FleetFold),
    Usage(UsageBuffer),
}

impl BulkFold {
    fn buffered(&self) -> usize {
        match self {
            BulkFold::Fleet(fold) => fold.changed_count(),
            BulkFold::Usage(buffer) => buffer.usage.len() + buffer.by_provider.len(),
        }
    }
}

async fn bulk(
    pool: &PgPool,
    rebuild: &mut Rebuild,
    config: ReplayConfig,
    observer: &dyn ReplayObserver,
    stop: &CancellationToken,
) -> Result<Folded, ReplayError> {
    let layout = rebuild.layout;
    let name = layout.projection.name();
    let mut fold = match layout.projection {
        // The device fold needs every device's state so far: the rows an earlier run wrote.
        Projection::Fleet => BulkFold::Fleet(FleetFold::with_rows(partial_devices(pool, rebuild).await?)),
        Projection::DailyUsage => BulkFold::Usage(UsageBuffer::default()),
    };
    metrics::gauge!(m::REPLAY_TARGET_POSITION, "projection" => name).set(rebuild.target_position as f64);
    // One task reads the next page while this one folds the last.
    let (pages_tx, mut pages) = mpsc::channel::<Result<Vec<LoggedPayload>, ReadError>>(2);
    let reader = LogReader::new(pool.clone());
    let (from, target, page) = (rebuild.position, rebuild.target_position, config.page_events);
    let read_stop = stop.child_token();
    let read_task = tokio::spawn({
        let read_stop = read_stop.clone();
        async move {
            let mut after = from;
            while after < target && !read_stop.is_cancelled() {
                let rows = reader.read_payloads(StreamType::Device, after, target, page).await;
                let last = match &rows {
                    Ok(rows) => rows.last().map(|r| r.position),
                    Err(_) => None,
                };
                let failed = rows.is_err();
                if pages_tx.send(rows).await.is_err() || failed {
                    return;
                }
                match last {
                    Some(position) => after = position,
                    None => return,
                }
            }
        }
    });
    let _stop_reader = read_stop.drop_guard();
    let (mut events, mut not_applicable, mut checkpointed) = (0i64, 0i64, 0i64);
    let mut position = rebuild.position;
    let mut last_recorded_at = rebuild.last_recorded_at;
    let mut last_checkpoint = Instant::now();
    let rate_started = Instant::now();
    loop {
        let page = tokio::select! {
            () = stop.cancelled() => return Err(ReplayError::Stopped),
            page = pages.recv() => page,
        };
        let Some(page) = page else {
            break;
        };
        let page = page?;
        let Some(last) = page.last() else {
            break;
        };
        position = last.position;
        last_recorded_at = Some(last.recorded_at);
        for logged in &page {
            let decoded = u16::try_from(logged.schema_version)
                .ok()
                .and_then(|v| Event::decode_text(&logged.event_type, v, &logged.payload).ok());
            let Some(Event::Device(event)) = decoded else {
                not_applicable += 1;
                continue;
            };
            events += 1;
            match &mut fold {
                BulkFold::Fleet(fleet) => {
                    if fleet.apply(logged.position, logged.stream_id, &event).is_err() {
                        not_applicable += 1;
                    }
                }
                BulkFold::Usage(buffer) => {
                    if let DeviceEvent::UsageRecorded(usage) = &event {
                        buffer_usage(buffer, layout, usage);
                    }
                }
            }
        }
        metrics::counter!(m::REPLAY_EVENTS_TOTAL, "projection" => name).increment(page.len() as u64);
        metrics::gauge!(m::REPLAY_POSITION, "projection" => name).set(position as f64);
        let elapsed = rate_started.elapsed().as_secs_f64();
        if elapsed > 0.0 {
            metrics::gauge!(m::REPLAY_EVENTS_PER_SECOND, "projection" => name).set((position - from) as f64 / elapsed);
        }
        observer.progress(position, target);
        if last_checkpoint.elapsed() >= config.checkpoint_every || fold.buffered() >= config.max_buffered_rows {
            checkpoint_bulk(
                pool,
                rebuild,
                &mut fold,
                position,
                last_recorded_at,
                events - checkpointed,
            )
            .await?;
            checkpointed = events;
            last_checkpoint = Instant::now();
        }
    }
    let _ = read_task.await;
    if stop.is_cancelled() {
        checkpoint_bulk(
            pool,
            rebuild,
            &mut fold,
            position,
            last_recorded_at,
            events - checkpointed,
        )
        .await?;
        return Err(ReplayError::Stopped);
    }
    // Past the last device event there may be only other streams' events: the bulk phase
    // covers the whole target either way. The rest is written by `finish_bulk`, straight
    // into the final tables where it can be.
    observer.progress(target, target);
    Ok(Folded {
        fold,
        events,
        not_applicable,
        unsaved_events: events - checkpointed,
        last_recorded_at,
    })
}

fn buffer_usage(buffer: &mut UsageBuffer, layout: TableLayout, usage: &event_schema::UsageRecorded) {
    fold_usage_shares(usage, |key, share| {
        let delta = buffer.usage.entry(key).or_default();
        delta.minutes += share.minutes;
        delta.cost_minor += share.cost_minor;
    });
    if layout.has_provider_breakdown() {
        fold_provider_shares(usage, |key, share| {
            let delta = buffer.by_provider.entry(key).or_default();
            *delta = delta.plus(share);
        });
    }
}

/// Device rows an earlier run of this rebuild wrote: the newest of each device.
async fn partial_devices(pool: &PgPool, rebuild: &Rebuild) -> Result<Vec<DeviceRow>, ReplayError> {
    let s = quote_ident(&rebuild.shadow_schema);
    let rows = sqlx::query(AssertSqlSafe(format!(
        "SELECT DISTINCT ON (device_id) device_id, owner_id, provider, status, cpu_cores, memory_mb, android_version,
                created_at, last_started_at, minutes_used, updated_position
         FROM {s}.devices_partial ORDER BY device_id, updated_position DESC"
    )))
    .fetch_all(pool)
    .await?;
    Ok(rows.iter().map(device_row).collect::<Result<_, _>>()?)
}

/// Writes what was folded since the last checkpoint to the partial tables, with the
/// rebuild's position, in one transaction.
async fn checkpoint_bulk(
    pool: &PgPool,
    rebuild: &mut Rebuild,
    fold: &mut BulkFold,
    position: i64,
    last_recorded_at: Option<DateTime<Utc>>,
    new_events: i64,
) -> Result<(), ReplayError> {
    if position == rebuild.position {
        return Ok(());
    }
    let s = quote_ident(&rebuild.shadow_schema);
    let mut tx = pool.begin().await?;
    match fold {
        BulkFold::Fleet(fleet) => {
            copy_devices(&mut tx, &format!("{s}.devices_partial"), fleet.changed_rows()).await?;
            fleet.clear_changed();
        }
        BulkFold::Usage(buffer) => {
            copy_usage(&mut tx, &format!("{s}.daily_usage_partial"), buffer.usage.iter()).await?;
            copy_by_provider(
                &mut tx,
                &format!("{s}.daily_usage_by_provider_partial"),
                buffer.by_provider.iter(),
            )
            .await?;
            buffer.usage.clear();
            buffer.by_provider.clear();
        }
    }
    let events_folded = rebuild.events_folded + new_events;
    let moved = sqlx::query(
        "UPDATE projection_rebuilds SET position = $3, last_recorded_at = $4, events_folded = $5, updated_at = now()
         WHERE id = $1 AND position = $2 AND state = 'building'",
    )
    .bind(rebuild.id)
    .bind(rebuild.position)
    .bind(position)
    .bind(last_recorded_at)
    .bind(events_folded)
    .execute(&mut *tx)
    .await?;
    if moved.rows_affected() != 1 {
        return Err(ReplayError::Moved { id: rebuild.id });
    }
    tx.commit().await?;
    rebuild.position = position;
    rebuild.last_recorded_at = last_recorded_at;
    rebuild.events_folded = events_folded;
    tracing::debug!(rebuild = rebuild.id, position, "replay checkpoint");
    Ok(())
}

/// Writes the version's tables from the fold (and the partial tables earlier checkpoints
/// left), adds keys and indexes, and marks the rebuild `tailing` at its target, in one
/// transaction.
async fn finish_bulk(pool: &PgPool, rebuild: &mut Rebuild, folded: Folded) -> Result<(), ReplayError> {
    let started = Instant::now();
    let layout = rebuild.layout;
    let s = quote_ident(&rebuild.shadow_schema);
    let mut tx = pool.begin().await?;
    // Key and index builds on freshly loaded tables sort in memory rather than on disk.
    sqlx::query("SET LOCAL maintenance_work_mem = '512MB'")
        .execute(&mut *tx)
        .await?;
    match folded.fold {
        BulkFold::Fleet(fleet) => {
            // The fold holds every device (resumed from the partials): written whole.
            copy_devices(&mut tx, &format!("{s}.devices"), fleet.rows()).await?;
            let stats = stats_of(fleet.rows());
            let mut copy = CopySink::open(&mut tx, &format!("{s}.device_stats")).await?;
            for (key, row) in &stats {
                copy.rows
                    .row(7)
                    .uuid(key.user_id)
                    .text(key.status.as_str())
                    .text(key.provider.as_str())
                    .int8(row.device_count)
                    .int8(row.total_cpu_cores)
                    .int8(row.total_memory_mb)
                    .time(Some(row.last_created_at))
                    .end_row();
                copy.flush_if_full().await?;
            }
            copy.finish().await?;
        }
        BulkFold::Usage(buffer) => {
            let checkpointed: bool = sqlx::query_scalar(AssertSqlSafe(format!(
                "SELECT EXISTS (SELECT 1 FROM {s}.daily_usage_partial)"
            )))
            .fetch_one(&mut *tx)
            .await?;
            if !checkpointed && !layout.usage_keyed_by_currency() {
                // Version 1's key has no currency: rows of one device and day add up (as its
                // incremental upsert adds them), under the first currency in order.
                let mut usage: Vec<_> = buffer.usage.iter().collect();
                usage.sort_unstable_by(|((a, ac), _), ((b, bc), _)| {
                    (a.day, a.user_id, a.device_id, ac).cmp(&(b.day, b.user_id, b.device_id, bc))
                });
                let mut merged: Vec<((UsageKey, String), UsageDelta)> = Vec::with_capacity(usage.len());
                for ((key, currency), delta) in usage {
                    match merged.last_mut() {
                        Some(((last, _), sum)) if last == key => {
                            sum.minutes += delta.minutes;
                            sum.cost_minor += delta.cost_minor;
                        }
                        _ => merged.push(((*key, currency.clone()), *delta)),
                    }
                }
                copy_usage(&mut tx, &format!("{s}.daily_usage"), merged.iter().map(|(k, v)| (k, v))).await?;
            } else if !checkpointed {
                // Everything is in memory, one row per key: straight into the tables, in
                // key order (PostgreSQL's sort finds the input presorted when it builds the
                // keys, and the table is clustered the way a user's days are read).
                let mut usage: Vec<_> = buffer.usage.iter().collect();
                usage.sort_unstable_by(|((a, ac), _), ((b, bc), _)| {
                    (a.user_id, a.day, a.device_id, ac).cmp(&(b.user_id, b.day, b.device_id, bc))
                });
                copy_usage(&mut tx, &format!("{s}.daily_usage"), usage.into_iter()).await?;
                let mut by_provider: Vec<_> = buffer.by_provider.iter().collect();
                by_provider.sort_unstable_by(|(a, _), (b, _)| {
                    (a.user_id, a.day, a.provider.as_str(), &a.currency).cmp(&(
                        b.user_id,
                        b.day,
                        b.provider.as_str(),
                        &b.currency,
                    ))
                });
                copy_by_provider(
                    &mut tx,
                    &format!("{s}.daily_usage_by_provider"),
                    by_provider.into_iter(),
                )
                .await?;
            } else {
                copy_usage(&mut tx, &format!("{s}.daily_usage_partial"), buffer.usage.iter()).await?;
                copy_by_provider(
                    &mut tx,
                    &format!("{s}.daily_usage_by_provider_partial"),
                    buffer.by_provider.iter(),
                )
                .await?;
                sum_usage_partials(&mut tx, layout, &s).await?;
            }
        }
    }
    let copied = Instant::now();
    let events_folded = rebuild.events_folded + folded.unsaved_events;
    let moved = sqlx::query(
        "UPDATE projection_rebuilds SET position = $3, last_recorded_at = coalesce($4, last_recorded_at),
                events_folded = $5, state = 'tailing', updated_at = now()
         WHERE id = $1 AND position = $2 AND state = 'building'",
    )
    .bind(rebuild.id)
    .bind(rebuild.position)
    .bind(rebuild.target_position)
    .bind(folded.last_recorded_at)
    .bind(events_folded)
    .execute(&mut *tx)
    .await?;
    if moved.rows_affected() != 1 {
        return Err(ReplayError::Moved { id: rebuild.id });
    }
    let mut ddl = String::new();
    for table in layout.tables() {
        ddl.push_str(&format!("DROP TABLE {s}.{table}_partial;"));
    }
    ddl.push_str(&layout.index_ddl(&rebuild.shadow_schema));
    sqlx::raw_sql(AssertSqlSafe(ddl)).execute(&mut *tx).await?;
    let indexed = Instant::now();
    let mut analyze = String::new();
    for table in layout.tables() {
        analyze.push_str(&format!("ANALYZE {s}.{table};"));
    }
    sqlx::raw_sql(AssertSqlSafe(analyze)).execute(&mut *tx).await?;
    let analyzed = Instant::now();
    tx.commit().await?;
    tracing::info!(
        rebuild = rebuild.id,
        write_seconds = (copied - started).as_secs_f64(),
        index_seconds = (indexed - copied).as_secs_f64(),
        analyze_seconds = (analyzed - indexed).as_secs_f64(),
        commit_seconds = analyzed.elapsed().as_secs_f64(),
        "rebuild tables written"
    );
    rebuild.state = "tailing".into();
    rebuild.position = rebuild.target_position;
    rebuild.events_folded = events_folded;
    if folded.last_recorded_at.is_some() {
        rebuild.last_recorded_at = folded.last_recorded_at;
    }
    Ok(())
}

/// Sums the usage partial tables into the version's tables.
async fn sum_usage_partials(conn: &mut PgConnection, layout: TableLayout, s: &str) -> Result<(), sqlx::Error> {
    let (key, currency) = if layout.usage_keyed_by_currency() {
        ("day, user_id, device_id, currency", "currency")
    } else {
        // Version 1's key has no currency: rows of one device and day add up, as its
        // incremental upsert adds them.
        ("day, user_id, device_id", "min(currency)")
    };
    let mut sql = format!(
        "INSERT INTO {s}.daily_usage (day, user_id, device_id, minutes, cost_minor, currency)
         SELECT day, user_id, device_id, sum(minutes), sum(cost_minor), {currency}
         FROM {s}.daily_usage_partial GROUP BY {key};"
    );
    if layout.has_provider_breakdown() {
        sql.push_str(&format!(
            "INSERT INTO {s}.daily_usage_by_provider (user_id, day, provider, currency, minutes, cost_minor, sessions)
             SELECT user_id, day, provider, currency, sum(minutes), sum(cost_minor), sum(sessions)
             FROM {s}.daily_usage_by_provider_partial GROUP BY user_id, day, provider, currency;"
        ));
    }
    sqlx::raw_sql(AssertSqlSafe(sql)).execute(conn).await?;
    Ok(())
}

/// Sets the search path of `conn`'s transaction to the shadow schema (then the default), so
/// the incremental code's unqualified table names resolve to the rebuild's tables.
async fn search_shadow(conn: &mut PgConnection, schema: &str, live_schema: &str) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT set_config('search_path', $1, true)")
        .bind(format!("{}, {}", quote_ident(schema), quote_ident(live_schema)))
        .execute(conn)
        .await?;
    Ok(())
}

/// Applies `events` to the shadow tables and moves the rebuild's position, inside `conn`'s
/// transaction.
async fn apply_to_shadow(
    conn: &mut PgConnection,
    rebuild: &mut Rebuild,
    live_schema: &str,
    events: &[event_schema::EventEnvelope],
) -> Result<(), ReplayError> {
    let Some(last) = events.last() else {
        return Ok(());
    };
    search_shadow(&mut *conn, &rebuild.shadow_schema, live_schema).await?;
    apply_events(&mut *conn, rebuild.layout, events).await?;
    let moved = sqlx::query(
        "UPDATE projection_rebuilds SET position = $3, last_recorded_at = $4, updated_at = now()
         WHERE id = $1 AND position = $2 AND state = 'tailing'",
    )
    .bind(rebuild.id)
    .bind(rebuild.position)
    .bind(last.position)
    .bind(last.recorded_at)
    .execute(&mut *conn)
    .await?;
    if moved.rows_affected() != 1 {
        return Err(ReplayError::Moved { id: rebuild.id });
    }
    sqlx::query("SELECT set_config('search_path', $1, true)")
        .bind(quote_ident(live_schema))
        .execute(&mut *conn)
        .await?;
    rebuild.position = last.position;
    rebuild.last_recorded_at = Some(last.recorded_at);
    Ok(())
}

struct Swapped {
    position: i64,
    replaced_version: i32,
    replaced_schema: String,
}

async fn tail_and_swap(
    pool: &PgPool,
    rebuild: &mut Rebuild,
    config: ReplayConfig,
    observer: &dyn ReplayObserver,
    stop: &CancellationToken,
    summary: &mut ReplaySummary,
) -> Result<Swapped, ReplayError> {
    let name = rebuild.layout.projection.name();
    let live_schema: String = sqlx::query_scalar("SELECT current_schema()::text")
        .fetch_one(pool)
        .await?;
    let reader = LogReader::new(pool.clone());
    let tail_config = TailConfig {
        batch_size: config.tail_batch,
        poll_interval: Duration::from_millis(200),
        listen: true,
    };
    let mut tail = LogTail::start(reader.clone(), rebuild.position, tail_config).await;
    let mut attempts = 0;
    loop {
        let head = reader.head().await?.position;
        observer.progress(rebuild.position, head);
        metrics::gauge!(m::REPLAY_POSITION, "projection" => name).set(rebuild.position as f64);
        metrics::gauge!(m::REPLAY_TARGET_POSITION, "projection" => name).set(head as f64);
        if head - rebuild.position <= config.swap_lag_events {
            let swap_started = Instant::now();
            match swap(pool, rebuild, &live_schema, &reader, config).await? {
                Some(swapped) => {
                    summary.swap_seconds = swap_started.elapsed().as_secs_f64();
                    metrics::histogram!(m::REPLAY_SWAP_SECONDS, "projection" => name).record(summary.swap_seconds);
                    return Ok(swapped);
                }
                None => {
                    attempts += 1;
                    tracing::warn!(projection = name, attempts, "live tables busy: swap retried");
                    if attempts >= config.swap_attempts {
                        return Err(ReplayError::SwapLocked {
                            projection: name,
                            attempts,
                        });
                    }
                    // The tail moved on meanwhile: restart it where the rebuild is.
                    tail = LogTail::start(reader.clone(), rebuild.position, tail_config).await;
                }
            }
        }
        let events = tokio::select! {
            () = stop.cancelled() => return Err(ReplayError::Stopped),
            events = tail.next_batch() => events?,
        };
        if events.is_empty() {
            continue;
        }
        let mut tx = pool.begin().await?;
        apply_to_shadow(&mut tx, rebuild, &live_schema, &events).await?;
        tx.commit().await?;
        summary.tail_events += events.len() as i64;
    }
}

/// The swap, in one transaction. `None` when the live tables stayed locked past the timeout.
async fn swap(
    pool: &PgPool,
    rebuild: &mut Rebuild,
    live_schema: &str,
    reader: &LogReader,
    config: ReplayConfig,
) -> Result<Option<Swapped>, ReplayError> {
    let projection = rebuild.layout.projection;
    let live = crate::checkpoint::load(&mut *pool.acquire().await?, projection).await?;
    let live_layout = projection.layout(live.version).unwrap_or(rebuild.layout);
    let l = quote_ident(live_schema);
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT set_config('lock_timeout', $1, true)")
        .bind(format!("{}ms", config.lock_timeout.as_millis()))
        .execute(&mut *tx)
        .await?;
    // The live tables first, then the checkpoint row: the order a projector's batch takes
    // them in, so the two never deadlock.
    let tables: Vec<String> = live_layout.tables().iter().map(|t| format!("{l}.{t}")).collect();
    let locked = sqlx::query(AssertSqlSafe(format!(
        "LOCK TABLE {} IN ACCESS EXCLUSIVE MODE",
        tables.join(", ")
    )))
    .execute(&mut *tx)
    .await;
    if let Err(error) = locked {
        if error
            .as_database_error()
            .and_then(|e| e.code())
            .is_some_and(|code| code == "55P03")
        {
            return Ok(None);
        }
        return Err(error.into());
    }
    let (position, version, last_recorded_at): (i64, i32, Option<DateTime<Utc>>) = sqlx::query_as(
        "SELECT position, version, last_recorded_at FROM projection_checkpoints WHERE projection = $1 FOR UPDATE",
    )
    .bind(projection.name())
    .fetch_one(&mut *tx)
    .await?;
    if version != live.version {
        // Another swap happened between the two reads: look again.
        return Ok(None);
    }
    // Bring the shadow to the live checkpoint (the live version cannot move now), so the
    // checkpoint never goes back.
    while rebuild.position < position {
        let events = reader
            .read_all(rebuild.position, (position - rebuild.position).min(config.tail_batch))
            .await?;
        if events.is_empty() {
            break;
        }
        apply_to_shadow(&mut tx, rebuild, live_schema, &events).await?;
    }
    let new_position = rebuild.position.max(position);
    let recorded_at = if rebuild.position >= position {
        rebuild.last_recorded_at
    } else {
        last_recorded_at
    };
    let replaced_schema = format!("retired_{}_v{}_{}", projection.name(), live.version, rebuild.id);
    let r = quote_ident(&replaced_schema);
    let s = quote_ident(&rebuild.shadow_schema);
    let mut ddl = format!("CREATE SCHEMA {r};");
    for table in live_layout.tables() {
        ddl.push_str(&format!("ALTER TABLE {l}.{table} SET SCHEMA {r};"));
    }
    for table in rebuild.layout.tables() {
        ddl.push_str(&format!("ALTER TABLE {s}.{table} SET SCHEMA {l};"));
    }
    ddl.push_str(&format!("DROP SCHEMA {s};"));
    sqlx::raw_sql(AssertSqlSafe(ddl)).execute(&mut *tx).await?;
    sqlx::query(
        "UPDATE projection_checkpoints SET position = $2, version = $3, last_recorded_at = $4, updated_at = now()
         WHERE projection = $1",
    )
    .bind(projection.name())
    .bind(new_position)
    .bind(rebuild.layout.version)
    .bind(recorded_at)
    .execute(&mut *tx)
    .await?;
    sqlx::query("UPDATE projection_rebuilds SET state = 'superseded', updated_at = now() WHERE projection = $1 AND state = 'live'")
        .bind(projection.name())
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "UPDATE projection_rebuilds SET state = 'live', position = $2, swapped_at = now(), updated_at = now(),
                replaced_version = $3, replaced_schema = $4
         WHERE id = $1",
    )
    .bind(rebuild.id)
    .bind(new_position)
    .bind(live.version)
    .bind(&replaced_schema)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Some(Swapped {
        position: new_position,
        replaced_version: live.version,
        replaced_schema,
    }))
}

/// Drops the tables replaced by swaps, keeping the newest `keep` per projection (of
/// `projection`, or of all). Returns the schemas dropped.
pub async fn drop_replaced(
    pool: &PgPool,
    projection: Option<Projection>,
    keep: usize,
) -> Result<Vec<String>, ReplayError> {
    let rows: Vec<(i64, String, String)> = sqlx::query_as(
        "SELECT id, projection, replaced_schema FROM projection_rebuilds
         WHERE replaced_schema IS NOT NULL AND replaced_dropped_at IS NULL AND ($1::text IS NULL OR projection = $1)
         ORDER BY projection, swapped_at DESC",
    )
    .bind(projection.map(Projection::name))
    .fetch_all(pool)
    .await?;
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut dropped = Vec::new();
    for (id, projection, schema) in rows {
        let kept = seen.entry(projection).or_default();
        if *kept < keep {
            *kept += 1;
            continue;
        }
        let mut tx = pool.begin().await?;
        sqlx::raw_sql(AssertSqlSafe(format!(
            "DROP SCHEMA IF EXISTS {} CASCADE",
            quote_ident(&schema)
        )))
        .execute(&mut *tx)
        .await?;
        sqlx::query("UPDATE projection_rebuilds SET replaced_dropped_at = now() WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        tracing::info!(%schema, "replaced version dropped");
        dropped.push(schema);
    }
    Ok(dropped)
}

/// Gives up the rebuild of `projection` in progress (if any): drops its schema. Returns its id.
pub async fn abandon(pool: &PgPool, projection: Projection) -> Result<Option<i64>, ReplayError> {
    let lock = ReplayLock::take(pool, projection).await?;
    let row: Option<(i64, String)> = sqlx::query_as(
        "SELECT id, shadow_schema FROM projection_rebuilds WHERE projection = $1 AND state IN ('building', 'tailing')",
    )
    .bind(projection.name())
    .fetch_optional(pool)
    .await?;
    let outcome = match row {
        None => None,
        Some((id, schema)) => {
            let mut tx = pool.begin().await?;
            sqlx::raw_sql(AssertSqlSafe(format!(
                "DROP SCHEMA IF EXISTS {} CASCADE",
                quote_ident(&schema)
            )))
            .execute(&mut *tx)
            .await?;
            sqlx::query("UPDATE projection_rebuilds SET state = 'abandoned', updated_at = now() WHERE id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Some(id)
        }
    };
    lock.release().await;
    Ok(outcome)
}

/// One row of `projection_rebuilds`, for `cloudphone replay --status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RebuildStatus {
    pub id: i64,
    pub projection: String,
    pub version: i32,
    pub state: String,
    pub position: i64,
    pub target_position: i64,
    pub events_folded: i64,
    pub started_at: DateTime<Utc>,
    pub swapped_at: Option<DateTime<Utc>>,
    pub replaced_schema: Option<String>,
    pub replaced_dropped: bool,
}

/// Every rebuild, newest first.
pub async fn rebuilds(pool: &PgPool) -> Result<Vec<RebuildStatus>, ReplayError> {
    let rows = sqlx::query(
        "SELECT id, projection, version, state, position, target_position, events_folded, started_at, swapped_at,
                replaced_schema, replaced_dropped_at IS NOT NULL AS replaced_dropped
         FROM projection_rebuilds ORDER BY id DESC",
    )
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|row| {
            Ok(RebuildStatus {
                id: row.try_get("id")?,
                projection: row.try_get("projection")?,
                version: row.try_get("version")?,
                state: row.try_get("state")?,
                position: row.try_get("position")?,
                target_position: row.try_get("target_position")?,
                events_folded: row.try_get("events_folded")?,
                started_at: row.try_get("started_at")?,
                swapped_at: row.try_get("swapped_at")?,
                replaced_schema: row.try_get("replaced_schema")?,
                replaced_dropped: row.try_get("replaced_dropped")?,
            })
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(ReplayError::from)
}

async fn copy_devices<'r>(
    conn: &mut PgConnection,
    table: &str,
    rows: impl Iterator<Item = &'r DeviceRow>,
) -> Result<(), sqlx::Error> {
    let mut copy = CopySink::open(conn, table).await?;
    for row in rows {
        copy.rows
            .row(11)
            .uuid(row.device_id)
            .uuid(row.owner_id)
            .text(row.provider.as_str())
            .text(row.status.as_str())
            .int4(row.cpu_cores)
            .int4(row.memory_mb)
            .int2(row.android_version)
            .time(Some(row.created_at))
            .time(row.last_started_at)
            .int8(row.minutes_used)
            .int8(row.updated_position)
            .end_row();
        copy.flush_if_full().await?;
    }
    copy.finish().await
}

async fn copy_usage<'r>(
    conn: &mut PgConnection,
    table: &str,
    rows: impl ExactSizeIterator<Item = (&'r (UsageKey, String), &'r UsageDelta)>,
) -> Result<(), sqlx::Error> {
    if rows.len() == 0 {
        return Ok(());
    }
    let mut copy = CopySink::open(conn, table).await?;
    for ((key, currency), delta) in rows {
        copy.rows
            .row(6)
            .date(key.day)
            .uuid(key.user_id)
            .uuid(key.device_id)
            .int8(delta.minutes)
            .int8(delta.cost_minor)
            .text(currency)
            .end_row();
        copy.flush_if_full().await?;
    }
    copy.finish().await
}

async fn copy_by_provider<'r>(
    conn: &mut PgConnection,
    table: &str,
    rows: impl ExactSizeIterator<Item = (&'r ProviderDayKey, &'r ProviderUsage)>,
) -> Result<(), sqlx::Error> {
    // Also how version 1 (which has no such table) skips it.
    if rows.len() == 0 {
        return Ok(());
    }
    let mut copy = CopySink::open(conn, table).await?;
    for (key, delta) in rows {
        copy.rows
            .row(7)
            .uuid(key.user_id)
            .date(key.day)
            .text(key.provider.as_str())
            .text(&key.currency)
            .int8(delta.minutes)
            .int8(delta.cost_minor)
            .int8(delta.sessions)
            .end_row();
        copy.flush_if_full().await?;
    }
    copy.finish().await
}

/// Rows in PostgreSQL's binary COPY format (no text to format or parse: uuids, dates and
/// numbers go as their bytes), columns in table order.
#[derive(Debug, Default)]
struct CopyRows {
    buffer: Vec<u8>,
    rows: u64,
}

/// Days and microseconds in PostgreSQL's binary formats count from 2000-01-01.
const PG_EPOCH_DAYS_FROM_CE: i32 = 730_120;
const PG_EPOCH_UNIX_MICROS: i64 = 946_684_800_000_000;

impl CopyRows {
    const SIGNATURE: &'static [u8] = b"PGCOPY\n\xff\r\n\0";

    fn header() -> Vec<u8> {
        let mut header = Self::SIGNATURE.to_vec();
        header.extend_from_slice(&0i32.to_be_bytes()); // flags
        header.extend_from_slice(&0i32.to_be_bytes()); // header extension length
        header
    }

    fn row(&mut self, fields: i16) -> &mut Self {
        self.buffer.extend_from_slice(&fields.to_be_bytes());
        self
    }

    fn field(&mut self, bytes: &[u8]) -> &mut Self {
        let len = i32::try_from(bytes.len()).unwrap_or(i32::MAX);
        self.buffer.extend_from_slice(&len.to_be_bytes());
        self.buffer.extend_from_slice(bytes);
        self
    }

    fn uuid(&mut self, value: Uuid) -> &mut Self {
        self.field(value.as_bytes())
    }

    fn date(&mut self, value: NaiveDate) -> &mut Self {
        self.field(&(value.num_days_from_ce() - PG_EPOCH_DAYS_FROM_CE).to_be_bytes())
    }

    fn int2(&mut self, value: i16) -> &mut Self {
        self.field(&value.to_be_bytes())
    }

    fn int4(&mut self, value: i32) -> &mut Self {
        self.field(&value.to_be_bytes())
    }

    fn int8(&mut self, value: i64) -> &mut Self {
        self.field(&value.to_be_bytes())
    }

    fn time(&mut self, value: Option<DateTime<Utc>>) -> &mut Self {
        match value {
            Some(at) => self.field(&(at.timestamp_micros() - PG_EPOCH_UNIX_MICROS).to_be_bytes()),
            None => {
                self.buffer.extend_from_slice(&(-1i32).to_be_bytes());
                self
            }
        }
    }

    fn text(&mut self, value: &str) -> &mut Self {
        self.field(value.as_bytes())
    }

    fn end_row(&mut self) {
        self.rows += 1;
    }
}

/// Rows streamed to PostgreSQL with `COPY ... FROM STDIN (FORMAT binary)` in chunks, so the
/// server stores one chunk while the next is encoded.
struct CopySink<'c> {
    copy: PgCopyIn<&'c mut PgConnection>,
    rows: CopyRows,
}

impl<'c> CopySink<'c> {
    const CHUNK_BYTES: usize = 1 << 20;

    async fn open(conn: &'c mut PgConnection, table: &str) -> Result<Self, sqlx::Error> {
        let copy = conn
            .copy_in_raw(&format!("COPY {table} FROM STDIN (FORMAT binary)"))
            .await?;
        Ok(CopySink {
            copy,
            rows: CopyRows {
                buffer: CopyRows::header(),
                rows: 0,
            },
        })
    }

    async fn flush_if_full(&mut self) -> Result<(), sqlx::Error> {
        if self.rows.buffer.len() >= Self::CHUNK_BYTES {
            let chunk = std::mem::take(&mut self.rows.buffer);
            self.copy.send(chunk).await?;
        }
        Ok(())
    }

    async fn finish(mut self) -> Result<(), sqlx::Error> {
        self.rows.buffer.extend_from_slice(&(-1i16).to_be_bytes()); // trailer
        let chunk = std::mem::take(&mut self.rows.buffer);
        self.copy.send(chunk).await?;
        self.copy.finish().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    #[test]
    fn copy_rows_are_postgres_binary_format() {
        let mut copy = CopyRows::default();
        let at = Utc.with_ymd_and_hms(2000, 1, 2, 0, 0, 0).single();
        let day = NaiveDate::from_ymd_opt(2000, 1, 3).unwrap_or_default();
        copy.row(6)
            .uuid(Uuid::from_u128(1))
            .text("gcp")
            .int8(-5)
            .time(at)
            .time(None)
            .date(day)
            .end_row();
        let mut expected = vec![0, 6];
        expected.extend_from_slice(&[0, 0, 0, 16]);
        expected.extend_from_slice(Uuid::from_u128(1).as_bytes());
        expected.extend_from_slice(&[0, 0, 0, 3, b'g', b'c', b'p']);
        expected.extend_from_slice(&[0, 0, 0, 8]);
        expected.extend_from_slice(&(-5i64).to_be_bytes());
        expected.extend_from_slice(&[0, 0, 0, 8]);
        expected.extend_from_slice(&86_400_000_000i64.to_be_bytes());
        expected.extend_from_slice(&[0xff, 0xff, 0xff, 0xff]);
        expected.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 2]);
        assert_eq!(copy.buffer, expected);
        assert_eq!(copy.rows, 1);
        assert_eq!(&CopyRows::header()[..11], b"PGCOPY\n\xff\r\n\0");
        assert_eq!(CopyRows::header().len(), 19);
    }
}
