//! Commit-to-read-model latency: appends acknowledged (their last position and when), then
//! settled when the projections' checkpoints are seen to cover them.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use sqlx::PgPool;

use crate::harness::databases::applied;

/// Appends acknowledged and not yet seen in the read models: last position -> when acked.
pub type Pending = Arc<Mutex<BTreeMap<i64, Instant>>>;

/// Notes an acknowledged append (keeping the earlier acknowledgement of a position).
pub fn acknowledged(pending: &Pending, position: i64, at: Instant) {
    if let Ok(mut pending) = pending.lock() {
        pending.entry(position).or_insert(at);
    }
}

/// Records the latency of every pending append at or below `visible`.
pub fn settle(pending: &Pending, visible: i64, now: Instant, latencies: &mut Histogram<u64>) {
    for (_, micros) in settle_each(pending, visible, now) {
        let _ = latencies.record(micros);
    }
}

/// Takes every pending append at or below `visible`: when each was acknowledged, and its
/// latency in microseconds (at least 1).
pub fn settle_each(pending: &Pending, visible: i64, now: Instant) -> Vec<(Instant, u64)> {
    let Ok(mut pending) = pending.lock() else {
        return Vec::new();
    };
    let later = pending.split_off(&(visible + 1));
    std::mem::replace(&mut *pending, later)
        .into_values()
        .map(|acked| {
            let micros = now.saturating_duration_since(acked).as_micros();
            (acked, u64::try_from(micros).unwrap_or(u64::MAX).max(1))
        })
        .collect()
}

/// Whether appends are still waiting to be seen.
pub fn outstanding(pending: &Pending) -> bool {
    pending.lock().map(|p| !p.is_empty()).unwrap_or(false)
}

/// What both projections' checkpoints cover, polled every millisecond.
pub async fn poll_checkpoints(pool: &PgPool) -> anyhow::Result<(i64, Instant)> {
    tokio::time::sleep(Duration::from_millis(1)).await;
    let position = applied(pool).await?;
    Ok((position, Instant::now()))
}

/// What both projections' checkpoints cover, woken by the projectors' change notices (every
/// batch and every checkpoint move publishes one): a query per notice rather than a poll
/// every millisecond, whose cost would be counted as PostgreSQL's in CPU per operation. A
/// poll every 50 ms covers a notice missed while the listener reconnects.
#[derive(Debug)]
pub struct CheckpointWatch {
    pool: PgPool,
    listener: sqlx::postgres::PgListener,
}

impl CheckpointWatch {
    pub async fn start(pool: &PgPool) -> anyhow::Result<Self> {
        let mut listener = sqlx::postgres::PgListener::connect_with(pool).await?;
        listener.listen(read_models::changes::CHANNEL).await?;
        Ok(CheckpointWatch {
            pool: pool.clone(),
            listener,
        })
    }

    /// Waits for the next notice (at most 50 ms), then reads what both checkpoints cover.
    pub async fn next(&mut self) -> anyhow::Result<(i64, Instant)> {
        let _ = tokio::time::timeout(Duration::from_millis(50), self.listener.recv()).await;
        let position = applied(&self.pool).await?;
        Ok((position, Instant::now()))
    }
}
