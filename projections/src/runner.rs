//! The embedded projector: follows the PostgreSQL log directly (no Kafka) and applies each
//! batch with its checkpoint in one transaction.

use std::time::{Duration, Instant};

use event_log::{LogReader, LogTail, TailConfig};
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

use crate::apply::{apply_events, begin_batch, lock_for_batch};
use crate::checkpoint::{self, CheckpointMoved, ProjectionCheckpoint};
use read_models::Projection;
use read_models::changes::{self, ChangeNotice};

use crate::metrics_names as m;

/// The default of [`ProjectorConfig::min_batch_interval`] (and of the binary's
/// `--projector-min-batch-interval-ms`).
pub const DEFAULT_MIN_BATCH_INTERVAL: Duration = Duration::from_millis(10);

/// How a projector reads and batches.
#[derive(Debug, Clone, Copy)]
pub struct ProjectorConfig {
    /// Most events applied in one transaction. A batch is whatever is committed when the
    /// projector looks, up to this: small when the log is quiet (fresh), large under load.
    pub batch_size: i64,
    /// How long to wait for a notification before polling the log anyway.
    pub poll_interval: Duration,
    /// LISTEN for appends (off behind a transaction pooler).
    pub listen: bool,
    /// Least time between two batches while appends go on (`TailConfig::min_batch_interval`):
    /// each batch is a transaction with a WAL flush, so batches of a few events cost the
    /// primary most per event. A caught-up projector's read models trail by up to this more.
    pub min_batch_interval: Duration,
}

impl Default for ProjectorConfig {
    fn default() -> Self {
        ProjectorConfig {
            batch_size: 10_000,
            poll_interval: Duration::from_millis(500),
            listen: true,
            min_batch_interval: DEFAULT_MIN_BATCH_INTERVAL,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProjectorError {
    #[error("projector database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("log read failed: {0}")]
    Read(#[from] event_log::ReadError),
    #[error(transparent)]
    CheckpointMoved(#[from] CheckpointMoved),
    /// The live version was built by newer code (a replay run by a newer binary).
    #[error(
        "projection `{projection}` is live at version {version}, which this code does not know: \
         run the binary that built it, or replay a version this one knows"
    )]
    UnknownVersion { projection: &'static str, version: i32 },
    #[error("Kafka: {0}")]
    Kafka(String),
    /// Kafka mode: a replay swapped its rebuild in (version `from` replaced by `to`) while
    /// this batch was folded; the batch is rolled back and the worker resumes at the new
    /// tables from the offsets the swap handed over.
    #[error(
        "a replay swapped `{projection}` in (version {from} replaced by {to}); the batch folded before it is rolled back"
    )]
    Swapped {
        projection: &'static str,
        from: i32,
        to: i32,
    },
    /// Kafka mode: a partition's stored offset moved under this worker (it lost the
    /// partition in a rebalance it had not seen yet); its batch is rolled back.
    #[error("offsets of `{projection}` moved under this worker: another worker owns the partition now")]
    OffsetsMoved { projection: &'static str },
    #[error(
        "projection `{projection}` ran in Kafka mode and applied events up to position {applied}, \
         beyond its checkpoint {checkpoint}: following the log from the checkpoint would apply \
         them twice. Let the Kafka projectors catch up with the relay before switching to \
         embedded mode, or rebuild the projection"
    )]
    AheadInKafkaMode {
        projection: &'static str,
        checkpoint: i64,
        applied: i64,
    },
}

/// Spawns one embedded projector per projection; each runs until `stop` is cancelled.
pub fn spawn_log_projectors(
    pool: &PgPool,
    config: ProjectorConfig,
    stop: &CancellationToken,
) -> Vec<tokio::task::JoinHandle<()>> {
    Projection::ALL
        .into_iter()
        .map(|projection| tokio::spawn(run_log_projector(pool.clone(), projection, config, stop.clone())))
        .collect()
}

/// Runs one projection from the log until `stop` is cancelled. Errors (the database going
/// away, a concurrent instance) are logged and the projector resumes from its checkpoint.
pub async fn run_log_projector(pool: PgPool, projection: Projection, config: ProjectorConfig, stop: CancellationToken) {
    let mut backoff = Duration::from_millis(100);
    while !stop.is_cancelled() {
        match follow(&pool, projection, config, &stop).await {
            Ok(()) => break,
            Err(error) => {
                // A replay swapping a version in moves the checkpoint: resume at once (no
                // doubling) from what PostgreSQL holds.
                let moved = matches!(error, ProjectorError::CheckpointMoved(_));
                if matches!(
                    error,
                    ProjectorError::AheadInKafkaMode { .. } | ProjectorError::UnknownVersion { .. }
                ) {
                    tracing::error!(projection = projection.name(), %error, "projector cannot start");
                } else if moved {
                    tracing::info!(projection = projection.name(), %error, "projector resuming from its checkpoint");
                } else {
                    tracing::warn!(projection = projection.name(), %error, ?backoff, "projector restarting from its checkpoint");
                }
                let delay = if moved { Duration::from_millis(10) } else { backoff };
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(delay) => {}
                }
                if !moved {
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
    tracing::info!(projection = projection.name(), "projector stopped");
}

async fn follow(
    pool: &PgPool,
    projection: Projection,
    config: ProjectorConfig,
    stop: &CancellationToken,
) -> Result<(), ProjectorError> {
    let mut conn = pool.acquire().await?;
    let mut at = resume_point(&mut conn, projection).await?;
    drop(conn);
    let layout = projection.layout(at.version).ok_or(ProjectorError::UnknownVersion {
        projection: projection.name(),
        version: at.version,
    })?;
    let reader = LogReader::new(pool.clone());
    let tail_config = TailConfig {
        batch_size: config.batch_size,
        poll_interval: config.poll_interval,
        listen: config.listen,
        min_batch_interval: config.min_batch_interval,
    };
    let mut tail = LogTail::start(reader.clone(), at.position, tail_config).await;
    let mut last_head_check = Instant::now() - Duration::from_secs(60);
    tracing::info!(
        projection = projection.name(),
        position = at.position,
        version = at.version,
        "projector following the log"
    );
    loop {
        let events = tokio::select! {
            () = stop.cancelled() => return Ok(()),
            events = tail.next_batch() => events?,
        };
        let Some(last) = events.last() else {
            continue;
        };
        let next = ProjectionCheckpoint {
            position: last.position,
            last_recorded_at: Some(last.recorded_at),
            version: at.version,
        };
        let started = Instant::now();
        let mut tx = begin_batch(pool, events.len()).await?;
        lock_for_batch(&mut tx, projection).await?;
        let applied = apply_events(&mut tx, layout, &events).await?;
        // Also when no row changed: the checkpoint moved (live projection status).
        changes::publish(
            &mut tx,
            &ChangeNotice::of_batch(projection, next.position, &applied.touched),
        )
        .await?;
        if !checkpoint::advance(&mut tx, projection, at.position, next).await? {
            return Err(CheckpointMoved {
                projection: projection.name(),
                expected: at.position,
            }
            .into());
        }
        tx.commit().await?;
        at = next;
        record_batch(projection, events.len(), applied.applied, started.elapsed(), at);
        if last_head_check.elapsed() >= Duration::from_secs(1) {
            last_head_check = Instant::now();
            if let Ok(head) = reader.head().await {
                metrics::gauge!(m::PROJECTION_LAG_EVENTS, "projection" => projection.name())
                    .set((head.position - at.position).max(0) as f64);
            }
        }
    }
}

/// Where an embedded projector resumes: the projection's checkpoint, unless Kafka-mode
/// projectors applied events beyond it. Kafka partitions apply independently, so after a
/// Kafka run the checkpoint (the minimum over partitions) may trail events already applied;
/// following the log from there would apply them twice.
pub async fn resume_point(
    conn: &mut PgConnection,
    projection: Projection,
) -> Result<ProjectionCheckpoint, ProjectorError> {
    let at = checkpoint::load(&mut *conn, projection).await?;
    let applied: Option<i64> =
        sqlx::query_scalar("SELECT max(last_position) FROM projection_offsets WHERE projection = $1")
            .bind(projection.name())
            .fetch_one(&mut *conn)
            .await?;
    match applied {
        Some(applied) if applied > at.position => Err(ProjectorError::AheadInKafkaMode {
            projection: projection.name(),
            checkpoint: at.position,
            applied,
        }),
        _ => Ok(at),
    }
}

fn record_batch(projection: Projection, events: usize, applied: usize, took: Duration, at: ProjectionCheckpoint) {
    let name = projection.name();
    metrics::counter!(m::PROJECTION_EVENTS_TOTAL, "projection" => name).increment(events as u64);
    metrics::histogram!(m::PROJECTION_BATCH_EVENTS, "projection" => name).record(events as f64);
    metrics::histogram!(m::PROJECTION_BATCH_SECONDS, "projection" => name).record(took.as_secs_f64());
    metrics::gauge!(m::PROJECTION_POSITION, "projection" => name).set(at.position as f64);
    if let Some(recorded_at) = at.last_recorded_at {
        let lag = (chrono::Utc::now() - recorded_at).num_milliseconds().max(0) as f64 / 1000.0;
        metrics::gauge!(m::PROJECTION_LAG_SECONDS, "projection" => name).set(lag);
    }
    tracing::debug!(
        projection = name,
        events,
        applied,
        position = at.position,
        "batch applied"
    );
}
