//! The bulk phase: folds the history up to the rebuild's target in memory, checkpoints it to
//! the `*_partial` tables, and finishes it into the version's tables with keys and indexes.

use std::collections::HashMap;
use std::time::Instant;

use chrono::{DateTime, Utc};
use event_log::{LogReader, LoggedPayload, ReadError};
use event_schema::{DeviceEvent, Event};
use read_models::fleet::device_row;
use read_models::history::StatusChangeKey;
use read_models::users::{USER_COLUMNS, UserRow, user_row};
use sqlx::{AssertSqlSafe, PgConnection, PgPool};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::copy::{
    copy_by_provider, copy_device_stats, copy_devices, copy_hourly, copy_status_changes, copy_usage, copy_users,
};
use super::throttle::{Pacer, Throttle, pace};
use super::{Rebuild, ReplayConfig, ReplayError, ReplayObserver};
use read_models::Projection;
use read_models::fleet::{DeviceRow, stats_of};
use read_models::usage::{HourKey, ProviderDayKey, ProviderUsage, UsageDelta, UsageKey};
use read_models::versions::{TableLayout, quote_ident};

use crate::fleet::FleetFold;
use crate::metrics_names as m;
use crate::usage::{fold_hourly_shares, fold_provider_shares, fold_usage_shares};
use crate::users::UserFold;

/// What the bulk phase folded in this run, with what is not checkpointed yet.
pub(super) struct Folded {
    fold: BulkFold,
    pub(super) events: i64,
    pub(super) not_applicable: i64,
    /// Events folded since the last checkpoint.
    unsaved_events: i64,
    last_recorded_at: Option<DateTime<Utc>>,
}

/// Rows folded since the last checkpoint.
#[derive(Default)]
struct UsageBuffer {
    usage: HashMap<(UsageKey, String), UsageDelta>,
    by_provider: HashMap<ProviderDayKey, ProviderUsage>,
    hourly: HashMap<HourKey, UsageDelta>,
}

impl UsageBuffer {
    /// Appends the buffered rows to the partial tables of shadow schema `s` (quoted): at a
    /// checkpoint, and at the finish of a rebuild that checkpointed, whose rest is then
    /// summed with what earlier checkpoints left there.
    async fn copy_to_partials(
        &self,
        conn: &mut PgConnection,
        s: &str,
        write_rate: Option<u64>,
    ) -> Result<(), sqlx::Error> {
        copy_usage(conn, &format!("{s}.daily_usage_partial"), self.usage.iter(), write_rate).await?;
        copy_by_provider(
            conn,
            &format!("{s}.daily_usage_by_provider_partial"),
            self.by_provider.iter(),
            write_rate,
        )
        .await?;
        copy_hourly(
            conn,
            &format!("{s}.hourly_usage_partial"),
            self.hourly.iter(),
            write_rate,
        )
        .await
    }
}

/// The fleet's folds: devices always; users and the history's net changes from version 2
/// (the user fold then stays empty on version 1, which reads no user events).
struct FleetBulk {
    devices: FleetFold,
    users: UserFold,
}

enum BulkFold {
    Fleet(FleetBulk),
    Usage(UsageBuffer),
}

impl BulkFold {
    fn buffered(&self) -> usize {
        match self {
            BulkFold::Fleet(fold) => {
                fold.devices.changed_count() + fold.users.changed_count() + fold.devices.status_change_count()
            }
            BulkFold::Usage(buffer) => buffer.usage.len() + buffer.by_provider.len() + buffer.hourly.len(),
        }
    }
}

/// Folds the log up to the rebuild's target, reading it from `history` (the primary or a
/// replica that has replayed the target) at most `config.throttle.events_per_second`;
/// checkpoints go to the primary, `pool`.
pub(super) async fn bulk(
    pool: &PgPool,
    history: &PgPool,
    rebuild: &mut Rebuild,
    config: ReplayConfig,
    observer: &dyn ReplayObserver,
    stop: &CancellationToken,
) -> Result<Folded, ReplayError> {
    let layout = rebuild.layout;
    let name = layout.projection.name();
    let mut fold = match layout.projection {
        // The device fold needs every device's state so far: the rows an earlier run wrote.
        Projection::Fleet => BulkFold::Fleet(FleetBulk {
            devices: FleetFold::with_rows(partial_devices(pool, rebuild).await?),
            users: UserFold::with_rows(partial_users(pool, rebuild).await?),
        }),
        Projection::DailyUsage => BulkFold::Usage(UsageBuffer::default()),
    };
    metrics::gauge!(m::REPLAY_TARGET_POSITION, "projection" => name).set(rebuild.target_position as f64);
    // One task reads the next page while this one folds the last.
    let (pages_tx, mut pages) = mpsc::channel::<Result<Vec<LoggedPayload>, ReadError>>(2);
    let reader = LogReader::new(history.clone());
    let (from, target, page) = (rebuild.position, rebuild.target_position, config.page_events);
    let mut pacer = Pacer::new(config.throttle.events_per_second);
    let stream_types = layout.stream_types();
    let read_stop = stop.child_token();
    let read_task = tokio::spawn({
        let read_stop = read_stop.clone();
        async move {
            let mut after = from;
            while after < target && !read_stop.is_cancelled() {
                let rows = read_page(&reader, stream_types, after, target, page).await;
                let last = match &rows {
                    Ok(rows) => rows.last().map(|r| r.position),
                    Err(_) => None,
                };
                let failed = rows.is_err();
                if pages_tx.send(rows).await.is_err() || failed {
                    return;
                }
                match last {
                    // Positions, not events of these streams, measure the pace: the read
                    // covers the positions in between either way.
                    Some(position) => {
                        pace(&mut pacer, u64::try_from(position - after).unwrap_or(0)).await;
                        after = position;
                    }
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
            let applicable = match (&mut fold, decoded) {
                (BulkFold::Fleet(fleet), Some(Event::Device(event))) => {
                    fleet.devices.apply(logged.position, logged.stream_id, &event).is_ok()
                }
                (BulkFold::Fleet(fleet), Some(Event::User(event))) => {
                    fleet.users.apply(logged.position, logged.stream_id, &event).is_ok()
                }
                (BulkFold::Usage(buffer), Some(Event::Device(event))) => {
                    if let DeviceEvent::UsageRecorded(usage) = &event {
                        buffer_usage(buffer, layout, usage);
                    }
                    true
                }
                (BulkFold::Usage(_), Some(Event::User(_))) | (_, None) => {
                    not_applicable += 1;
                    continue;
                }
            };
            events += 1;
            if !applicable {
                not_applicable += 1;
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
                config.throttle,
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
            config.throttle,
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

/// Reads a page; a read a hot standby cancelled for a conflict with its recovery (it had to
/// apply WAL that removes rows the read might see) is tried again.
async fn read_page(
    reader: &LogReader,
    stream_types: &[event_schema::StreamType],
    after: i64,
    target: i64,
    page: i64,
) -> Result<Vec<LoggedPayload>, ReadError> {
    const ATTEMPTS: u32 = 5;
    let mut attempt = 1;
    loop {
        match reader.read_payloads(stream_types, after, target, page).await {
            Err(ReadError::Database(error)) if attempt < ATTEMPTS && is_recovery_conflict(&error) => {
                tracing::warn!(
                    attempt,
                    after,
                    "history read cancelled by the replica's recovery: reading again"
                );
                attempt += 1;
            }
            rows => return rows,
        }
    }
}

/// SQLSTATE 40001 (serialization_failure) is what a standby answers when it cancels a query
/// for a recovery conflict; on the primary these reads never get it.
fn is_recovery_conflict(error: &sqlx::Error) -> bool {
    error
        .as_database_error()
        .and_then(|e| e.code())
        .is_some_and(|code| code == "40001")
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
    if layout.has_hourly_usage() {
        fold_hourly_shares(usage, |key, share| {
            let delta = buffer.hourly.entry(key).or_default();
            delta.minutes += share.minutes;
            delta.cost_minor += share.cost_minor;
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

/// User rows an earlier run of this rebuild wrote: the newest of each user (none for a
/// version without `users`).
async fn partial_users(pool: &PgPool, rebuild: &Rebuild) -> Result<Vec<UserRow>, ReplayError> {
    if !rebuild.layout.has_users_and_history() {
        return Ok(Vec::new());
    }
    let s = quote_ident(&rebuild.shadow_schema);
    let rows = sqlx::query(AssertSqlSafe(format!(
        "SELECT DISTINCT ON (user_id) {USER_COLUMNS} FROM {s}.users_partial ORDER BY user_id, updated_position DESC"
    )))
    .fetch_all(pool)
    .await?;
    Ok(rows.iter().map(user_row).collect::<Result<_, _>>()?)
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
    throttle: Throttle,
) -> Result<(), ReplayError> {
    if position == rebuild.position {
        return Ok(());
    }
    let write_rate = throttle.write_bytes_per_second;
    let s = quote_ident(&rebuild.shadow_schema);
    let mut tx = pool.begin().await?;
    match fold {
        BulkFold::Fleet(fleet) => {
            copy_devices(
                &mut tx,
                &format!("{s}.devices_partial"),
                fleet.devices.changed_rows(),
                write_rate,
            )
            .await?;
            fleet.devices.clear_changed();
            if rebuild.layout.has_users_and_history() {
                copy_users(
                    &mut tx,
                    &format!("{s}.users_partial"),
                    fleet.users.changed_rows(),
                    write_rate,
                )
                .await?;
                fleet.users.clear_changed();
                let changes = fleet.devices.take_status_changes();
                copy_status_changes(
                    &mut tx,
                    &format!("{s}.fleet_status_changes_partial"),
                    changes.iter(),
                    write_rate,
                )
                .await?;
            }
        }
        BulkFold::Usage(buffer) => {
            buffer.copy_to_partials(&mut tx, &s, write_rate).await?;
            buffer.usage.clear();
            buffer.by_provider.clear();
            buffer.hourly.clear();
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
pub(super) async fn finish_bulk(
    pool: &PgPool,
    rebuild: &mut Rebuild,
    folded: Folded,
    throttle: Throttle,
) -> Result<(), ReplayError> {
    let started = Instant::now();
    let layout = rebuild.layout;
    let s = quote_ident(&rebuild.shadow_schema);
    let write_rate = throttle.write_bytes_per_second;
    let mut tx = pool.begin().await?;
    // Key and index builds on freshly loaded tables sort in memory rather than on disk.
    sqlx::query("SET LOCAL maintenance_work_mem = '512MB'")
        .execute(&mut *tx)
        .await?;
    if let Some(workers) = throttle.index_workers {
        // Each parallel worker is another core building an index; live appends need one.
        sqlx::query("SELECT set_config('max_parallel_maintenance_workers', $1, true)")
            .bind(workers.to_string())
            .execute(&mut *tx)
            .await?;
    }
    match folded.fold {
        BulkFold::Fleet(mut fleet) => {
            // The fold holds every device (resumed from the partials): written whole.
            copy_devices(&mut tx, &format!("{s}.devices"), fleet.devices.rows(), write_rate).await?;
            if layout.has_users_and_history() {
                // Users too; the history's net changes are sums over checkpoints.
                copy_users(&mut tx, &format!("{s}.users"), fleet.users.rows(), write_rate).await?;
                finish_status_changes(&mut tx, &s, &fleet.devices.take_status_changes(), write_rate).await?;
            }
            let stats = stats_of(fleet.devices.rows());
            copy_device_stats(&mut tx, &format!("{s}.device_stats"), stats.iter(), write_rate).await?;
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
                copy_usage(
                    &mut tx,
                    &format!("{s}.daily_usage"),
                    merged.iter().map(|(k, v)| (k, v)),
                    write_rate,
                )
                .await?;
            } else if !checkpointed {
                // Everything is in memory, one row per key: straight into the tables, in
                // key order (PostgreSQL's sort finds the input presorted when it builds the
                // keys, and the table is clustered the way a user's days are read).
                let mut usage: Vec<_> = buffer.usage.iter().collect();
                usage.sort_unstable_by(|((a, ac), _), ((b, bc), _)| {
                    (a.user_id, a.day, a.device_id, ac).cmp(&(b.user_id, b.day, b.device_id, bc))
                });
                copy_usage(&mut tx, &format!("{s}.daily_usage"), usage.into_iter(), write_rate).await?;
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
                    write_rate,
                )
                .await?;
                let mut hourly: Vec<_> = buffer.hourly.iter().collect();
                hourly.sort_unstable_by_key(|(key, _)| *key);
                copy_hourly(&mut tx, &format!("{s}.hourly_usage"), hourly.into_iter(), write_rate).await?;
            } else {
                buffer.copy_to_partials(&mut tx, &s, write_rate).await?;
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

/// Writes the history's net changes: straight from the fold when nothing was checkpointed,
/// else the fold's rest beside the partials and their sums; then the all-users rows as the
/// per-user rows' sums (one pass over a table of one row per user, hour and status).
async fn finish_status_changes(
    conn: &mut PgConnection,
    s: &str,
    changes: &std::collections::BTreeMap<StatusChangeKey, i64>,
    write_rate: Option<u64>,
) -> Result<(), sqlx::Error> {
    let checkpointed: bool = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT EXISTS (SELECT 1 FROM {s}.fleet_status_changes_partial)"
    )))
    .fetch_one(&mut *conn)
    .await?;
    if checkpointed {
        copy_status_changes(
            &mut *conn,
            &format!("{s}.fleet_status_changes_partial"),
            changes.iter(),
            write_rate,
        )
        .await?;
        sqlx::raw_sql(AssertSqlSafe(format!(
            "INSERT INTO {s}.fleet_status_changes (user_id, hour, status, delta)
             SELECT user_id, hour, status, sum(delta) FROM {s}.fleet_status_changes_partial
             GROUP BY user_id, hour, status ORDER BY user_id, hour, status"
        )))
        .execute(&mut *conn)
        .await?;
    } else {
        // Key order: the fold's map is sorted, so the key's index builds from presorted input.
        copy_status_changes(
            &mut *conn,
            &format!("{s}.fleet_status_changes"),
            changes.iter(),
            write_rate,
        )
        .await?;
    }
    sqlx::raw_sql(AssertSqlSafe(format!(
        "INSERT INTO {s}.fleet_status_changes_all (hour, status, delta)
         SELECT hour, status, sum(delta) FROM {s}.fleet_status_changes GROUP BY hour, status ORDER BY hour, status"
    )))
    .execute(conn)
    .await?;
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
    if layout.has_hourly_usage() {
        sql.push_str(&format!(
            "INSERT INTO {s}.hourly_usage (user_id, hour, device_id, currency, minutes, cost_minor)
             SELECT user_id, hour, device_id, currency, sum(minutes), sum(cost_minor)
             FROM {s}.hourly_usage_partial GROUP BY user_id, hour, device_id, currency;"
        ));
    }
    sqlx::raw_sql(AssertSqlSafe(sql)).execute(conn).await?;
    Ok(())
}
