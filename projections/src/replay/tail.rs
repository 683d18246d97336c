//! The tail phase: applies the events after the rebuild's position to the shadow tables with
//! the live projector's incremental code, until the rebuild is close enough to the head to swap.

use std::time::{Duration, Instant};

use event_log::{LogReader, LogTail, TailConfig};
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

use super::swap::{Swapped, swap};
use super::{Rebuild, ReplayConfig, ReplayError, ReplayObserver, ReplaySummary};
use crate::apply::apply_events;
use crate::metrics_names as m;
use read_models::versions::quote_ident;

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
pub(super) async fn apply_to_shadow(
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

pub(super) async fn tail_and_swap(
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
        min_batch_interval: Duration::ZERO,
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
