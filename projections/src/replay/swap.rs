//! The swap: in one transaction, brings the shadow to the live checkpoint and trades the live
//! tables for the rebuilt ones.

use chrono::{DateTime, Utc};
use event_log::LogReader;
use sqlx::{AssertSqlSafe, PgConnection, PgPool};

use super::tail::apply_to_shadow;
use super::{Rebuild, ReplayConfig, ReplayError};
use read_models::Projection;
use read_models::changes::ChangeNotice;
use read_models::versions::quote_ident;

pub(super) struct Swapped {
    pub(super) position: i64,
    pub(super) replaced_version: i32,
    pub(super) replaced_schema: String,
}

/// The swap, in one transaction. `None` when the live tables stayed locked past the timeout.
pub(super) async fn swap(
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
    // Kafka mode: each partition's workers have applied up to a position of their own, and
    // the checkpoint is only the least of them. Locked like the checkpoint row (a worker's
    // batch takes the row, then its offsets), so no batch of the replaced version lands now.
    let applied: Vec<i64> = sqlx::query_scalar(
        "SELECT last_position FROM projection_offsets WHERE projection = $1 ORDER BY topic, partition FOR UPDATE",
    )
    .bind(projection.name())
    .fetch_all(&mut *tx)
    .await?;
    let kafka_mode = !applied.is_empty();
    // Bring the shadow to everything the live tables hold (the live version cannot move
    // now), so the checkpoint never goes back and no partition's worker applies an event the
    // new tables already hold, or misses one.
    let position = applied.into_iter().fold(position, i64::max);
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
        "UPDATE projection_checkpoints SET position = $2, version = $3, last_recorded_at = $4, swaps = swaps + 1,
                updated_at = now()
         WHERE projection = $1",
    )
    .bind(projection.name())
    .bind(new_position)
    .bind(rebuild.layout.version)
    .bind(recorded_at)
    .execute(&mut *tx)
    .await?;
    if kafka_mode {
        hand_over_offsets(&mut tx, projection, new_position).await?;
    }
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
    // Every row may differ in the rebuilt tables: live subscriptions evaluate again.
    read_models::changes::publish(&mut tx, &ChangeNotice::everything(projection, new_position)).await?;
    tx.commit().await?;
    Ok(Some(Swapped {
        position: new_position,
        replaced_version: live.version,
        replaced_schema,
    }))
}

/// Kafka mode: the new version's workers continue each partition exactly after `position`.
/// Every event up to it is in the new tables, so a worker skips what it reads at or below it
/// (as it skips a duplicate publication); and a partition whose every published message is
/// at or below it, by the relay's record of offsets and positions, starts after the last
/// one, without reading them again. Offsets never move back.
async fn hand_over_offsets(conn: &mut PgConnection, projection: Projection, position: i64) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE projection_offsets o SET
             last_position = greatest(o.last_position, $2),
             next_offset = greatest(o.next_offset, coalesce((
                 SELECT r.last_offset + 1 FROM relay_partitions r
                 WHERE r.relay = o.topic AND r.partition = o.partition AND r.last_position <= $2), 0))
         WHERE o.projection = $1",
    )
    .bind(projection.name())
    .bind(position)
    .execute(conn)
    .await?;
    Ok(())
}
