//! Applying a batch of events to a projection's read model, in one transaction with its
//! checkpoint: a crash or a redelivery can never count an event twice or lose one.

use std::collections::{BTreeMap, HashMap, HashSet};

use event_schema::{DeviceEvent, Event, EventEnvelope, Quota, SchemaError, StreamType};
use sqlx::{AssertSqlSafe, PgConnection};
use uuid::Uuid;

use read_models::Projection;
use read_models::changes::Touched;
use read_models::fleet::{DeviceRow, device_row};
use read_models::history::StatusChangeKey;
use read_models::stored::UsersAndHistory;
use read_models::usage::{HourKey, ProviderDayKey, ProviderUsage, UsageDelta, UsageKey};
use read_models::users::{USER_COLUMNS, UserRow, user_row};
use read_models::versions::TableLayout;

use crate::fleet::FleetFold;
use crate::metrics_names as m;
use crate::usage::{fold_hourly_usage, fold_usage, fold_usage_by_first_currency, fold_usage_by_provider};
use crate::users::UserFold;

/// What a batch did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Applied {
    /// Events that changed (or were relevant to) the read model.
    pub applied: usize,
    /// Events of a type this code does not know (written by newer code): skipped.
    pub skipped: usize,
    /// Events parked in `projection_dead_letters`.
    pub dead_lettered: usize,
    /// The owners and devices whose rows the batch wrote: what its change notice names.
    pub touched: Touched,
}

impl Applied {
    /// Adds what another part of the same batch did.
    fn add(&mut self, other: Applied) {
        self.applied += other.applied;
        self.skipped += other.skipped;
        self.dead_lettered += other.dead_lettered;
        self.touched.owners.extend(other.touched.owners);
        self.touched.devices.extend(other.touched.devices);
    }
}

/// An event the projection cannot apply, with why.
pub(crate) struct DeadLetter<'a> {
    pub(crate) envelope: &'a EventEnvelope,
    pub(crate) error: String,
}

/// Decodes envelopes for a projection: unknown types are skipped, malformed ones parked.
fn decode<'a>(
    events: &'a [EventEnvelope],
    applied: &mut Applied,
    dead: &mut Vec<DeadLetter<'a>>,
) -> Vec<(&'a EventEnvelope, Event)> {
    let mut decoded = Vec::with_capacity(events.len());
    for envelope in events {
        match envelope.decode() {
            Ok(event) => decoded.push((envelope, event)),
            Err(SchemaError::UnknownEventType { event_type }) => {
                applied.skipped += 1;
                metrics::counter!(m::PROJECTION_SKIPPED_TOTAL, "event_type" => event_type).increment(1);
            }
            Err(error) => dead.push(DeadLetter {
                envelope,
                error: error.to_string(),
            }),
        }
    }
    decoded
}

/// Batches at least this large are catching up, not tailing: see [`begin_batch`].
const CATCH_UP_BATCH: usize = 1_000;

/// Opens the transaction an embedded projector writes a batch of `events` and its
/// checkpoint in. A large batch (catching up) commits without waiting for the WAL flush: a
/// server crash may lose it, but its checkpoint goes with it (same transaction) and the next
/// `checkpoint::advance` (which expects the position this process last wrote) fails, so the
/// projector resumes from what PostgreSQL really holds. A small batch (tailing) waits for the
/// flush: an unflushed commit reaches streaming replicas only when the WAL writer runs (up to
/// `wal_writer_delay`, 200 ms by default), which read-your-writes on a replica would wait for.
pub async fn begin_batch(
    pool: &sqlx::PgPool,
    events: usize,
) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    if events >= CATCH_UP_BATCH {
        sqlx::query("SET LOCAL synchronous_commit = off")
            .execute(&mut *tx)
            .await?;
    }
    plan_tailing_batch(&mut tx, events).await?;
    Ok(tx)
}

/// Has the statements of a tailing batch of `events` (fewer than a catch-up's) planned once
/// per connection, for the rest of `conn`'s transaction; a larger batch keeps custom plans.
/// A tailing batch touches a few owners and devices, and PostgreSQL plans a prepared
/// statement over a short array (`owner_id = ANY($1)`) afresh on every execution: a custom
/// plan always looks cheaper than a generic one that assumes 10 elements. Every statement of
/// a batch is a lookup or an upsert by key, which the generic plan does as well.
pub async fn plan_tailing_batch(conn: &mut PgConnection, events: usize) -> Result<(), sqlx::Error> {
    if events < CATCH_UP_BATCH {
        sqlx::query("SET LOCAL plan_cache_mode = force_generic_plan")
            .execute(conn)
            .await?;
    }
    Ok(())
}

/// Applies `events` (in position order) to the tables of `layout` that `conn`'s search path
/// resolves (the live ones, or a replay's shadow schema), inside the caller's transaction.
/// Events that cannot be applied are parked in `projection_dead_letters`. A batch the
/// database refuses is applied again in halves, down to single events where needed, and an
/// event it refuses alone is parked with the database's error: one bad event never stops a
/// projection.
pub async fn apply_events(
    conn: &mut PgConnection,
    layout: TableLayout,
    events: &[EventEnvelope],
) -> Result<Applied, sqlx::Error> {
    // A savepoint, so that a batch the database refuses can be undone inside the caller's
    // transaction and applied again in parts (see `refused`).
    sqlx::query("SAVEPOINT projector_batch").execute(&mut *conn).await?;
    let error = match apply_and_park(conn, layout, events).await {
        Ok(applied) => return Ok(applied),
        Err(error) if refused(&error) => error,
        Err(error) => return Err(error),
    };
    sqlx::query("ROLLBACK TO SAVEPOINT projector_batch")
        .execute(&mut *conn)
        .await?;
    let projection = layout.projection;
    metrics::counter!(m::PROJECTION_BATCHES_REFUSED_TOTAL, "projection" => projection.name()).increment(1);
    if let [event] = events {
        let letter = DeadLetter {
            envelope: event,
            error: format!("the database refused it: {error}"),
        };
        return Ok(Applied {
            dead_lettered: park_all(conn, projection, &[letter]).await?,
            ..Applied::default()
        });
    }
    tracing::warn!(
        projection = projection.name(),
        events = events.len(),
        first = events.first().map(|e| e.position),
        %error,
        "the database refused a batch; applying its halves apart"
    );
    // Halves, not single events: a batch of n events with one at fault costs about 2·log2(n)
    // attempts instead of n, and the halves without it apply whole. Applying a batch's events
    // in two batches, in order, gives what applying them in one does.
    let (first, second) = events.split_at(events.len() / 2);
    let mut applied = Box::pin(apply_events(conn, layout, first)).await?;
    applied.add(Box::pin(apply_events(conn, layout, second)).await?);
    Ok(applied)
}

/// True for an error the database will return again for the same statements and rows: the
/// batch itself is at fault (a value out of range, a constraint, an upsert touching a row
/// twice), not the connection or a concurrent transaction. Retrying such a batch as it is
/// would fail for ever and stop the projection; applied in parts, only the event at fault is
/// parked (and a fault of the batch alone, not of any event, parks nothing).
fn refused(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(error) => error.code().is_some_and(|code| {
            // 21: cardinality violation, 22: data exception, 23: integrity constraint
            // violation, 54: program limit exceeded.
            ["21", "22", "23", "54"].iter().any(|class| code.starts_with(class))
        }),
        _ => false,
    }
}

/// [`apply_unparked`], then parks the events it could not apply.
async fn apply_and_park(
    conn: &mut PgConnection,
    layout: TableLayout,
    events: &[EventEnvelope],
) -> Result<Applied, sqlx::Error> {
    let (mut applied, dead) = apply_unparked(conn, layout, events).await?;
    applied.dead_lettered = park_all(conn, layout.projection, &dead).await?;
    Ok(applied)
}

/// Parks `letters` and counts them; returns how many.
async fn park_all(
    conn: &mut PgConnection,
    projection: Projection,
    letters: &[DeadLetter<'_>],
) -> Result<usize, sqlx::Error> {
    for letter in letters {
        park(conn, projection, letter).await?;
    }
    if !letters.is_empty() {
        metrics::counter!(m::PROJECTION_DEAD_LETTERS_TOTAL, "projection" => projection.name())
            .increment(letters.len() as u64);
    }
    Ok(letters.len())
}

/// Applies what of `events` it can, like [`apply_events`], and returns the events it could
/// not apply instead of parking them (a retry updates the letter it already has).
pub(crate) async fn apply_unparked<'a>(
    conn: &mut PgConnection,
    layout: TableLayout,
    events: &'a [EventEnvelope],
) -> Result<(Applied, Vec<DeadLetter<'a>>), sqlx::Error> {
    let projection = layout.projection;
    let mut applied = Applied::default();
    let mut dead = Vec::new();
    let decoded = decode(events, &mut applied, &mut dead);
    if tracing::enabled!(tracing::Level::DEBUG) {
        // Commits with the batch; a failed commit is logged by the caller and retried.
        for (envelope, _) in &decoded {
            tracing::debug!(
                projection = projection.name(),
                position = envelope.position,
                event_id = %envelope.event_id,
                event_type = %envelope.event_type,
                trace_id = envelope.metadata.trace_id.as_deref().unwrap_or_default(),
                "event projected"
            );
        }
    }
    match projection {
        Projection::Fleet => apply_fleet(conn, layout, &decoded, &mut applied, &mut dead).await?,
        Projection::DailyUsage => apply_usage(conn, layout, &decoded, &mut applied).await?,
    }
    Ok((applied, dead))
}

/// The advisory lock that orders a dead-letter retry against the projector batches of its
/// projection. A batch reads rows, folds them in memory and writes them back: a retry
/// writing the same device row, or the same owner's `device_stats`, between that read and
/// that write would be overwritten (a lost update). Batches hold the lock shared (they never
/// wait for each other, so Kafka workers stay parallel); a retry holds it exclusively, so it
/// sees no batch in flight and none starts until it commits. Transaction-scoped: released at
/// commit or rollback, and safe behind a transaction pooler.
pub async fn lock_for_batch(conn: &mut PgConnection, projection: Projection) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock_shared(hashtext('cloudphone.projection.' || $1))")
        .bind(projection.name())
        .execute(conn)
        .await?;
    Ok(())
}

/// The exclusive side of [`lock_for_batch`], for a retry.
pub(crate) async fn lock_for_retry(conn: &mut PgConnection, projection: Projection) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('cloudphone.projection.' || $1))")
        .bind(projection.name())
        .execute(conn)
        .await?;
    Ok(())
}

/// Parks a message that is not even an envelope (a foreign producer, a corrupted record).
pub async fn park_unreadable(
    conn: &mut PgConnection,
    projection: Projection,
    position: i64,
    error: &str,
    raw: &[u8],
) -> Result<(), sqlx::Error> {
    tracing::warn!(projection = projection.name(), position, %error, "unreadable message parked in the dead-letter table");
    metrics::counter!(m::PROJECTION_DEAD_LETTERS_TOTAL, "projection" => projection.name()).increment(1);
    let raw = serde_json::Value::String(String::from_utf8_lossy(raw).into_owned());
    sqlx::query(
        "INSERT INTO projection_dead_letters (projection, position, event_type, schema_version, error, envelope, parked_in)
         VALUES ($1, $2, '?', 0, $3, $4, current_schema())",
    )
    .bind(projection.name())
    .bind(position)
    .bind(error)
    .bind(raw)
    .execute(conn)
    .await?;
    Ok(())
}

/// Parks `letter`, noting the schema whose tables the batch was writing (`current_schema()`:
/// the live schema, or a replay's shadow schema): a retry applies only letters parked against
/// the live tables.
async fn park(conn: &mut PgConnection, projection: Projection, letter: &DeadLetter<'_>) -> Result<(), sqlx::Error> {
    tracing::warn!(
        projection = projection.name(),
        position = letter.envelope.position,
        event_type = %letter.envelope.event_type,
        error = %letter.error,
        "event parked in the dead-letter table"
    );
    sqlx::query(
        "INSERT INTO projection_dead_letters (projection, position, event_id, event_type, schema_version, error, envelope,
                                              parked_in)
         VALUES ($1, $2, $3, $4, $5, $6, $7, current_schema())",
    )
    .bind(projection.name())
    .bind(letter.envelope.position)
    .bind(letter.envelope.event_id)
    .bind(&letter.envelope.event_type)
    .bind(i32::from(letter.envelope.schema_version))
    .bind(&letter.error)
    .bind(serde_json::to_value(letter.envelope).unwrap_or_default())
    .execute(conn)
    .await?;
    Ok(())
}

async fn apply_fleet<'a>(
    conn: &mut PgConnection,
    layout: TableLayout,
    decoded: &[(&'a EventEnvelope, Event)],
    applied: &mut Applied,
    dead: &mut Vec<DeadLetter<'a>>,
) -> Result<(), sqlx::Error> {
    if layout.has_users_and_history() {
        apply_users(conn, decoded, applied, dead).await?;
    }
    let device_ids: Vec<Uuid> = decoded
        .iter()
        .filter(|(envelope, _)| envelope.stream_type == StreamType::Device)
        .map(|(envelope, _)| envelope.stream_id)
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    if device_ids.is_empty() {
        return Ok(());
    }
    let stored = load_devices(conn, &device_ids).await?;
    let before: HashMap<Uuid, DeviceRow> = stored.iter().map(|row| (row.device_id, row.clone())).collect();
    let mut fold = FleetFold::with_rows(stored);
    for (envelope, event) in decoded {
        let Event::Device(device_event) = event else {
            continue;
        };
        match fold.apply(envelope.position, envelope.stream_id, device_event) {
            Ok(()) => applied.applied += 1,
            Err(error) => dead.push(DeadLetter {
                envelope,
                error: error.to_string(),
            }),
        }
    }
    write_devices(conn, fold.changed_rows()).await?;
    applied
        .touched
        .devices
        .extend(fold.changed_rows().map(|row| row.device_id));
    applied.touched.owners.extend(fold.touched_owners());
    let stats = read_models::fleet::stats_changes(&before, fold.changed_rows());
    read_models::fleet::apply_stats_changes(conn, &stats).await?;
    if layout.has_users_and_history() {
        // Last: the all-users rows of the current hour are the ones every concurrent batch
        // (Kafka mode) writes, so they are locked for as short a time as possible.
        write_status_changes(conn, &fold.take_status_changes()).await?;
    }
    Ok(())
}

/// Folds the batch's user events into `users` (version 2 of `fleet`).
async fn apply_users<'a>(
    conn: &mut PgConnection,
    decoded: &[(&'a EventEnvelope, Event)],
    applied: &mut Applied,
    dead: &mut Vec<DeadLetter<'a>>,
) -> Result<(), sqlx::Error> {
    let user_ids: Vec<Uuid> = decoded
        .iter()
        .filter(|(envelope, _)| envelope.stream_type == StreamType::User)
        .map(|(envelope, _)| envelope.stream_id)
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    if user_ids.is_empty() {
        return Ok(());
    }
    let rows = sqlx::query(AssertSqlSafe(format!(
        "SELECT {USER_COLUMNS} FROM users WHERE user_id = ANY($1)"
    )))
    .bind(&user_ids)
    .fetch_all(&mut *conn)
    .await?
    .iter()
    .map(user_row)
    .collect::<Result<Vec<_>, _>>()?;
    let mut fold = UserFold::with_rows(rows);
    for (envelope, event) in decoded {
        let Event::User(user_event) = event else {
            continue;
        };
        match fold.apply(envelope.position, envelope.stream_id, user_event) {
            Ok(()) => applied.applied += 1,
            Err(error) => dead.push(DeadLetter {
                envelope,
                error: error.to_string(),
            }),
        }
    }
    applied
        .touched
        .owners
        .extend(fold.changed_rows().map(|row| row.user_id));
    write_users(conn, fold.changed_rows()).await
}

/// Upserts user rows (UNNEST: one statement for the whole batch).
pub async fn write_users<'r>(
    conn: &mut PgConnection,
    rows: impl Iterator<Item = &'r UserRow>,
) -> Result<(), sqlx::Error> {
    let rows: Vec<&UserRow> = rows.collect();
    if rows.is_empty() {
        return Ok(());
    }
    let limit = |pick: fn(&Quota) -> u32| -> Vec<Option<i64>> {
        rows.iter()
            .map(|r| r.quota.as_ref().map(|q| i64::from(pick(q))))
            .collect()
    };
    sqlx::query(
        "INSERT INTO users (user_id, tier, max_devices, max_cpu_cores, max_memory_mb, registered_at, erased, erased_at,
                            updated_position)
         SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::bigint[], $4::bigint[], $5::bigint[], $6::timestamptz[],
                              $7::boolean[], $8::timestamptz[], $9::bigint[])
         ON CONFLICT (user_id) DO UPDATE SET
             tier = EXCLUDED.tier, max_devices = EXCLUDED.max_devices, max_cpu_cores = EXCLUDED.max_cpu_cores,
             max_memory_mb = EXCLUDED.max_memory_mb, erased = EXCLUDED.erased, erased_at = EXCLUDED.erased_at,
             updated_position = EXCLUDED.updated_position",
    )
    .bind(rows.iter().map(|r| r.user_id).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.tier.as_str()).collect::<Vec<_>>())
    .bind(limit(|q| q.max_devices))
    .bind(limit(|q| q.max_cpu_cores))
    .bind(limit(|q| q.max_memory_mb))
    .bind(rows.iter().map(|r| r.registered_at).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.erased).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.erased_at).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.updated_position).collect::<Vec<_>>())
    .execute(conn)
    .await?;
    Ok(())
}

/// Adds net changes of the fleet's size to `fleet_status_changes` and, summed over users, to
/// `fleet_status_changes_all`. Rows go in key order, so two batches committing at once lock
/// shared rows in the same order and never deadlock.
pub async fn write_status_changes(
    conn: &mut PgConnection,
    changes: &BTreeMap<StatusChangeKey, i64>,
) -> Result<(), sqlx::Error> {
    if changes.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO fleet_status_changes (user_id, hour, status, delta)
         SELECT * FROM UNNEST($1::uuid[], $2::timestamptz[], $3::text[], $4::bigint[])
         ON CONFLICT (user_id, hour, status) DO UPDATE SET delta = fleet_status_changes.delta + EXCLUDED.delta",
    )
    .bind(changes.keys().map(|k| k.user_id).collect::<Vec<_>>())
    .bind(changes.keys().map(|k| k.hour).collect::<Vec<_>>())
    .bind(changes.keys().map(|k| k.status.as_str()).collect::<Vec<_>>())
    .bind(changes.values().copied().collect::<Vec<_>>())
    .execute(&mut *conn)
    .await?;
    let all = UsersAndHistory::sum_over_users(changes);
    sqlx::query(
        "INSERT INTO fleet_status_changes_all (hour, status, delta)
         SELECT * FROM UNNEST($1::timestamptz[], $2::text[], $3::bigint[])
         ON CONFLICT (hour, status) DO UPDATE SET delta = fleet_status_changes_all.delta + EXCLUDED.delta",
    )
    .bind(all.keys().map(|(hour, _)| *hour).collect::<Vec<_>>())
    .bind(all.keys().map(|(_, status)| status.as_str()).collect::<Vec<_>>())
    .bind(all.values().copied().collect::<Vec<_>>())
    .execute(conn)
    .await?;
    Ok(())
}

async fn load_devices(conn: &mut PgConnection, ids: &[Uuid]) -> Result<Vec<DeviceRow>, sqlx::Error> {
    sqlx::query(
        "SELECT device_id, owner_id, provider, status, cpu_cores, memory_mb, android_version, created_at,
                last_started_at, minutes_used, updated_position
         FROM devices WHERE device_id = ANY($1)",
    )
    .bind(ids)
    .fetch_all(conn)
    .await?
    .iter()
    .map(device_row)
    .collect()
}

/// Upserts device rows (UNNEST: one statement for the whole batch).
pub async fn write_devices<'r>(
    conn: &mut PgConnection,
    rows: impl Iterator<Item = &'r DeviceRow>,
) -> Result<(), sqlx::Error> {
    let rows: Vec<&DeviceRow> = rows.collect();
    if rows.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO devices (device_id, owner_id, provider, status, cpu_cores, memory_mb, android_version, created_at,
                              last_started_at, minutes_used, updated_position)
         SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::int[], $6::int[], $7::smallint[],
                              $8::timestamptz[], $9::timestamptz[], $10::bigint[], $11::bigint[])
         ON CONFLICT (device_id) DO UPDATE SET
             status = EXCLUDED.status, cpu_cores = EXCLUDED.cpu_cores, memory_mb = EXCLUDED.memory_mb,
             last_started_at = EXCLUDED.last_started_at, minutes_used = EXCLUDED.minutes_used,
             updated_position = EXCLUDED.updated_position",
    )
    .bind(rows.iter().map(|r| r.device_id).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.owner_id).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.provider.as_str()).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.status.as_str()).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.cpu_cores).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.memory_mb).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.android_version).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.created_at).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.last_started_at).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.minutes_used).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.updated_position).collect::<Vec<_>>())
    .execute(conn)
    .await?;
    Ok(())
}

async fn apply_usage(
    conn: &mut PgConnection,
    layout: TableLayout,
    decoded: &[(&EventEnvelope, Event)],
    applied: &mut Applied,
) -> Result<(), sqlx::Error> {
    let mut deltas: BTreeMap<(UsageKey, String), UsageDelta> = BTreeMap::new();
    let mut first_currency = BTreeMap::new();
    let mut by_provider = BTreeMap::new();
    let mut hourly = BTreeMap::new();
    for (_, event) in decoded {
        if let Event::Device(DeviceEvent::UsageRecorded(usage)) = event {
            if layout.usage_keyed_by_currency() {
                fold_usage(&mut deltas, usage);
            } else {
                fold_usage_by_first_currency(&mut deltas, &mut first_currency, usage);
            }
            if layout.has_provider_breakdown() {
                fold_usage_by_provider(&mut by_provider, usage);
            }
            if layout.has_hourly_usage() {
                fold_hourly_usage(&mut hourly, usage);
            }
            applied.applied += 1;
        }
    }
    for (key, _) in deltas.keys() {
        applied.touched.owners.insert(key.user_id);
        applied.touched.devices.insert(key.device_id);
    }
    write_usage(conn, layout, &deltas).await?;
    write_usage_by_provider(conn, &by_provider).await?;
    write_hourly_usage(conn, &hourly).await
}

/// Adds per-key usage to `daily_usage`.
pub async fn write_usage(
    conn: &mut PgConnection,
    layout: TableLayout,
    deltas: &BTreeMap<(UsageKey, String), UsageDelta>,
) -> Result<(), sqlx::Error> {
    if deltas.is_empty() {
        return Ok(());
    }
    let statement = format!(
        "INSERT INTO daily_usage (day, user_id, device_id, minutes, cost_minor, currency)
         SELECT * FROM UNNEST($1::date[], $2::uuid[], $3::uuid[], $4::bigint[], $5::bigint[], $6::text[])
         ON CONFLICT {} DO UPDATE SET
             minutes = daily_usage.minutes + EXCLUDED.minutes,
             cost_minor = daily_usage.cost_minor + EXCLUDED.cost_minor",
        layout.usage_conflict_target()
    );
    sqlx::query(AssertSqlSafe(statement))
        .bind(deltas.keys().map(|(k, _)| k.day).collect::<Vec<_>>())
        .bind(deltas.keys().map(|(k, _)| k.user_id).collect::<Vec<_>>())
        .bind(deltas.keys().map(|(k, _)| k.device_id).collect::<Vec<_>>())
        .bind(deltas.values().map(|d| d.minutes).collect::<Vec<_>>())
        .bind(deltas.values().map(|d| d.cost_minor).collect::<Vec<_>>())
        .bind(deltas.keys().map(|(_, currency)| currency.as_str()).collect::<Vec<_>>())
        .execute(conn)
        .await?;
    Ok(())
}

/// Adds per-provider usage to `daily_usage_by_provider` (version 2 of `daily_usage`).
pub async fn write_usage_by_provider(
    conn: &mut PgConnection,
    deltas: &BTreeMap<ProviderDayKey, ProviderUsage>,
) -> Result<(), sqlx::Error> {
    if deltas.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO daily_usage_by_provider (user_id, day, provider, currency, minutes, cost_minor, sessions)
         SELECT * FROM UNNEST($1::uuid[], $2::date[], $3::text[], $4::text[], $5::bigint[], $6::bigint[], $7::bigint[])
         ON CONFLICT (user_id, day, provider, currency) DO UPDATE SET
             minutes = daily_usage_by_provider.minutes + EXCLUDED.minutes,
             cost_minor = daily_usage_by_provider.cost_minor + EXCLUDED.cost_minor,
             sessions = daily_usage_by_provider.sessions + EXCLUDED.sessions",
    )
    .bind(deltas.keys().map(|k| k.user_id).collect::<Vec<_>>())
    .bind(deltas.keys().map(|k| k.day).collect::<Vec<_>>())
    .bind(deltas.keys().map(|k| k.provider.as_str()).collect::<Vec<_>>())
    .bind(deltas.keys().map(|k| k.currency.as_str()).collect::<Vec<_>>())
    .bind(deltas.values().map(|d| d.minutes).collect::<Vec<_>>())
    .bind(deltas.values().map(|d| d.cost_minor).collect::<Vec<_>>())
    .bind(deltas.values().map(|d| d.sessions).collect::<Vec<_>>())
    .execute(conn)
    .await?;
    Ok(())
}

/// Adds per-hour usage to `hourly_usage` (version 3 of `daily_usage`).
pub async fn write_hourly_usage(
    conn: &mut PgConnection,
    deltas: &BTreeMap<HourKey, UsageDelta>,
) -> Result<(), sqlx::Error> {
    if deltas.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO hourly_usage (user_id, hour, device_id, currency, minutes, cost_minor)
         SELECT * FROM UNNEST($1::uuid[], $2::timestamptz[], $3::uuid[], $4::text[], $5::bigint[], $6::bigint[])
         ON CONFLICT (user_id, hour, device_id, currency) DO UPDATE SET
             minutes = hourly_usage.minutes + EXCLUDED.minutes,
             cost_minor = hourly_usage.cost_minor + EXCLUDED.cost_minor",
    )
    .bind(deltas.keys().map(|k| k.user_id).collect::<Vec<_>>())
    .bind(deltas.keys().map(|k| k.hour).collect::<Vec<_>>())
    .bind(deltas.keys().map(|k| k.device_id).collect::<Vec<_>>())
    .bind(deltas.keys().map(|k| k.currency.as_str()).collect::<Vec<_>>())
    .bind(deltas.values().map(|d| d.minutes).collect::<Vec<_>>())
    .bind(deltas.values().map(|d| d.cost_minor).collect::<Vec<_>>())
    .execute(conn)
    .await?;
    Ok(())
}
