//! The generated history of a world: device lifecycles over months (created, sessions, some
//! resized, stopped, failed or deleted, usage recorded), appended in bulk.

use std::sync::Arc;

use anyhow::Context;
use chrono::{DateTime, TimeZone, Utc};
use event_log::{AppendBatch, EventStore, ExpectedVersion, NewEvent, StoreConfig, StreamAppend};
use event_schema::{
    Currency, DeviceCreated, DeviceDeleted, DeviceFailed, DeviceResized, DeviceStarted, DeviceStopped, Event,
    EventMetadata, Money, Provider, StopReason, StreamType, UsageRecorded,
};
use operator_console::Progress;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sqlx::PgPool;
use uuid::Uuid;

/// Events per bulk append of the history.
const HISTORY_BATCH_EVENTS: usize = 10_000;

/// An event recorded at `occurred_at`, with no metadata.
pub fn new_event(event: impl Into<Event>, occurred_at: DateTime<Utc>) -> anyhow::Result<NewEvent> {
    Ok(NewEvent::from_event(
        &event.into(),
        EventMetadata::default(),
        occurred_at,
    )?)
}

/// One device's whole life: created, sessions (some over midnight), sometimes resized, and
/// an end state of stopped, running, failed or deleted. Whole seconds throughout, so the
/// views' timestamp parsing and the projections' microsecond truncation agree.
fn device_history(rng: &mut StdRng, owner: Uuid, now: DateTime<Utc>) -> anyhow::Result<StreamAppend> {
    let device = Uuid::now_v7();
    let provider = Provider::ALL[rng.random_range(0..Provider::ALL.len())];
    let (mut cpu, mut memory) = (
        rng.random_range(1..=8u32),
        [2048u32, 4096, 8192][rng.random_range(0..3)],
    );
    let created_at = Utc
        .timestamp_opt(now.timestamp() - rng.random_range(86_400..180 * 86_400), 0)
        .single()
        .context("timestamp")?;
    let mut events = vec![new_event(
        DeviceCreated {
            device_id: device,
            owner_id: owner,
            provider,
            cpu_cores: cpu,
            memory_mb: memory,
            android_version: rng.random_range(11..=14),
            created_at,
        },
        created_at,
    )?];
    let mut at = created_at;
    let sessions = rng.random_range(1..=6);
    let ending = rng.random_range(0..10);
    for session in 0..sessions {
        at += chrono::Duration::seconds(rng.random_range(60..36_000));
        if rng.random_range(0..10) == 0 {
            let (to_cpu, to_memory) = (
                rng.random_range(1..=8u32),
                [2048u32, 4096, 8192][rng.random_range(0..3)],
            );
            events.push(new_event(
                DeviceResized {
                    device_id: device,
                    from_cpu_cores: cpu,
                    from_memory_mb: memory,
                    cpu_cores: to_cpu,
                    memory_mb: to_memory,
                },
                at,
            )?);
            (cpu, memory) = (to_cpu, to_memory);
        }
        let started_at = at;
        events.push(new_event(
            DeviceStarted {
                device_id: device,
                started_at,
            },
            at,
        )?);
        let last = session + 1 == sessions;
        if last && ending < 2 {
            break; // still running
        }
        let seconds = rng.random_range(30..180_000);
        let ended_at = started_at + chrono::Duration::seconds(seconds);
        at = ended_at;
        if last && ending == 2 {
            events.push(new_event(
                DeviceFailed {
                    device_id: device,
                    reason: "host lost".into(),
                    failed_at: ended_at,
                },
                at,
            )?);
        } else {
            events.push(new_event(
                DeviceStopped {
                    device_id: device,
                    reason: StopReason::Requested,
                    stopped_at: ended_at,
                },
                at,
            )?);
        }
        let minutes = u32::try_from((seconds + 59) / 60).unwrap_or(u32::MAX);
        events.push(new_event(
            UsageRecorded {
                owner_id: owner,
                device_id: device,
                provider,
                started_at,
                ended_at,
                minutes,
                cost: Money::new(i64::from(minutes) * 3, Currency::USD),
                pricing_plan_id: "load".into(),
            },
            at,
        )?);
        if last && ending == 3 {
            events.push(new_event(
                DeviceDeleted {
                    device_id: device,
                    deleted_at: at,
                },
                at,
            )?);
        }
    }
    Ok(StreamAppend {
        stream_id: device,
        stream_type: StreamType::Device,
        owner_id: owner,
        expected: ExpectedVersion::NoStream,
        events,
    })
}

/// Appends `events` events of device histories in bulk (two appends in flight).
pub async fn write_history(pool: &PgPool, events: u64, seed: u64) -> anyhow::Result<()> {
    write_history_since(pool, events, seed, None).await
}

/// A clock for writing a history that spans months: the log records each batch at
/// `since + (now - since) * written / total`, so the events fill the monthly partitions from
/// `since` to now in order (the log's times never go backwards).
#[derive(Debug)]
struct HistoryClock {
    since: chrono::DateTime<Utc>,
    span: chrono::Duration,
    total: u64,
    written: Arc<std::sync::atomic::AtomicU64>,
}

impl event_log::Clock for HistoryClock {
    fn now(&self) -> chrono::DateTime<Utc> {
        let written = self.written.load(std::sync::atomic::Ordering::Relaxed).min(self.total);
        let fraction = written as f64 / self.total.max(1) as f64;
        let offset = chrono::Duration::milliseconds((self.span.num_milliseconds() as f64 * fraction) as i64);
        self.since + offset
    }
}

/// [`write_history`], recorded from `since` to now when given (else at the time of writing).
pub async fn write_history_since(
    pool: &PgPool,
    events: u64,
    seed: u64,
    since: Option<chrono::DateTime<Utc>>,
) -> anyhow::Result<()> {
    let written_so_far = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let clock: Arc<dyn event_log::Clock> = match since {
        Some(since) => Arc::new(HistoryClock {
            since,
            span: Utc::now() - since,
            total: events,
            written: Arc::clone(&written_so_far),
        }),
        None => Arc::new(event_log::SystemClock),
    };
    let store = Arc::new(EventStore::open_with_clock(pool.clone(), StoreConfig::default(), clock).await?);
    let mut rng = StdRng::seed_from_u64(seed);
    let owners: Vec<Uuid> = (0..(events / 100).max(1)).map(|_| Uuid::now_v7()).collect();
    let now = Utc::now();
    let mut progress = Progress::new("history", events);
    // A history spread over months needs many batches, or its first batch's time is all of it.
    let batch_events = match since {
        Some(_) => HISTORY_BATCH_EVENTS.min(usize::try_from(events / 256).unwrap_or(usize::MAX).max(1)),
        None => HISTORY_BATCH_EVENTS,
    };
    let mut written = 0u64;
    let mut in_flight = tokio::task::JoinSet::new();
    while written < events {
        let mut streams = Vec::new();
        let mut count = 0usize;
        while count < batch_events && written + (count as u64) < events {
            let owner = owners[rng.random_range(0..owners.len())];
            let mut stream = device_history(&mut rng, owner, now)?;
            let room = usize::try_from(events - written).unwrap_or(usize::MAX) - count;
            stream.events.truncate(room.max(1));
            count += stream.events.len();
            streams.push(stream);
        }
        let batch = AppendBatch {
            streams,
            idempotency: None,
        };
        if in_flight.len() >= 2
            && let Some(done) = in_flight.join_next().await
        {
            done??;
        }
        let store = Arc::clone(&store);
        in_flight.spawn(async move { store.append(batch).await.map(|_| ()) });
        written += count as u64;
        written_so_far.store(written, std::sync::atomic::Ordering::Relaxed);
        progress.set(written);
    }
    while let Some(done) = in_flight.join_next().await {
        done??;
    }
    progress.finish();
    if let Ok(store) = Arc::try_unwrap(store) {
        store.shutdown().await;
    }
    Ok(())
}
