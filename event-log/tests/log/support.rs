//! Shared helpers: a migrated store on the test's database, and events to append. `new_event`
//! and `tamper` are `test_support`'s, which other crates' tests use too.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeZone, Utc};
use event_log::{
    AppendBatch, Clock, EventStore, ExpectedVersion, LogReader, ManualClock, NewEvent, StoreConfig, StreamAppend,
};
use event_schema::*;
use sqlx::PgPool;
pub use test_support::db::tamper;
pub use test_support::fixtures::new_event;
use uuid::Uuid;

pub async fn migrated(pool: &PgPool) {
    event_log::migrate(pool)
        .await
        .unwrap_or_else(|e| panic!("migrate: {e}"));
}

pub async fn store(pool: &PgPool) -> EventStore {
    store_with(pool, StoreConfig::default(), Arc::new(event_log::SystemClock)).await
}

pub async fn store_with(pool: &PgPool, config: StoreConfig, clock: Arc<dyn Clock>) -> EventStore {
    migrated(pool).await;
    EventStore::open_with_clock(pool.clone(), config, clock)
        .await
        .unwrap_or_else(|e| panic!("open store: {e}"))
}

pub fn reader(pool: &PgPool) -> LogReader {
    LogReader::new(pool.clone())
}

pub fn manual_clock(at: DateTime<Utc>) -> Arc<ManualClock> {
    Arc::new(ManualClock::new(at))
}

pub fn utc(y: i32, m: u32, d: u32, h: u32, min: u32, s: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(y, m, d, h, min, s)
        .single()
        .unwrap_or_else(|| panic!("bad date"))
}

pub fn started(device_id: Uuid) -> NewEvent {
    new_event(DeviceStarted {
        device_id,
        started_at: Utc::now(),
    })
}

pub fn created(device_id: Uuid, owner_id: Uuid) -> NewEvent {
    new_event(DeviceCreated {
        device_id,
        owner_id,
        provider: Provider::Aws,
        cpu_cores: 2,
        memory_mb: 2048,
        android_version: 14,
        created_at: Utc::now(),
    })
}

pub fn failed(device_id: Uuid, reason: &str) -> NewEvent {
    new_event(DeviceFailed {
        device_id,
        reason: reason.to_owned(),
        failed_at: Utc::now(),
    })
}

pub fn reserved(user_id: Uuid, device_id: Uuid) -> NewEvent {
    new_event(QuotaReserved {
        user_id,
        device_id,
        cpu_cores: 2,
        memory_mb: 2048,
    })
}

pub fn device_stream(
    device_id: Uuid,
    owner_id: Uuid,
    expected: ExpectedVersion,
    events: Vec<NewEvent>,
) -> StreamAppend {
    StreamAppend {
        stream_id: device_id,
        stream_type: StreamType::Device,
        owner_id,
        expected,
        events,
    }
}

pub fn user_stream(user_id: Uuid, expected: ExpectedVersion, events: Vec<NewEvent>) -> StreamAppend {
    StreamAppend {
        stream_id: user_id,
        stream_type: StreamType::User,
        owner_id: user_id,
        expected,
        events,
    }
}

/// A batch that creates a device and reserves its quota on the owner's stream.
pub fn create_device(device_id: Uuid, owner_id: Uuid) -> AppendBatch {
    AppendBatch {
        streams: vec![
            device_stream(
                device_id,
                owner_id,
                ExpectedVersion::NoStream,
                vec![created(device_id, owner_id)],
            ),
            user_stream(owner_id, ExpectedVersion::Any, vec![reserved(owner_id, device_id)]),
        ],
        idempotency: None,
    }
}

/// `n` DeviceStarted events for one device stream (payload validity is all that matters).
pub fn starts(device_id: Uuid, owner_id: Uuid, expected: ExpectedVersion, n: usize) -> AppendBatch {
    AppendBatch::single(device_stream(
        device_id,
        owner_id,
        expected,
        (0..n).map(|_| started(device_id)).collect(),
    ))
}

/// Waits for `condition` to hold, checking every few milliseconds, failing after `limit`.
pub async fn eventually<F, Fut>(what: &str, limit: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !condition().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Number of backends of this database waiting on a lock.
pub async fn lock_waiters(pool: &PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
    )
    .fetch_one(pool)
    .await
    .unwrap_or(0)
}

pub async fn count_events(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM user_events_all")
        .fetch_one(pool)
        .await
        .unwrap_or(-1)
}

/// Writes one device's events in January and March 2034 and moves the log past January.
pub async fn history_across_months(pool: &PgPool) -> (Uuid, Uuid) {
    let (_, _, device, owner) = log_across_months(pool).await;
    (device, owner)
}

/// As `history_across_months`, and returns the log and its clock (in March 2034) too.
pub async fn log_across_months(pool: &PgPool) -> (EventStore, Arc<ManualClock>, Uuid, Uuid) {
    let clock = manual_clock(utc(2034, 1, 10, 8, 0, 0));
    let log = store_with(pool, StoreConfig::default(), clock.clone()).await;
    let (device, owner) = (Uuid::now_v7(), Uuid::now_v7());
    log.append(create_device(device, owner))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    log.append(starts(device, owner, ExpectedVersion::Exact(1), 2))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    clock.set(utc(2034, 3, 5, 8, 0, 0));
    log.append(starts(device, owner, ExpectedVersion::Exact(3), 2))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(clock.now().format("%Y-%m").to_string(), "2034-03");
    (log, clock, device, owner)
}
