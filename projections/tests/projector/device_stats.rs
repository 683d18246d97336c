//! `device_stats` kept by adding each batch's changes: the cases where adding is not enough,
//! the newest device leaving its bucket and the last one leaving it, against PostgreSQL.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use event_log::{AppendBatch, ExpectedVersion, StreamAppend};
use event_schema::{DeviceStatus, Provider, StreamType};
use projections::fold_log;
use read_models::fleet::{StatsKey, StatsRow};
use read_models::stored::load_read_models;
use sqlx::PgPool;
use uuid::Uuid;

use crate::support::*;

/// Appends one event to `device`'s stream, at `version` events before it.
async fn append_device(world: &World, owner: Uuid, device: Uuid, version: i64, event: event_log::NewEvent) {
    let expected = match version {
        0 => ExpectedVersion::NoStream,
        n => ExpectedVersion::Exact(n),
    };
    world
        .store
        .append(AppendBatch::single(StreamAppend {
            stream_id: device,
            stream_type: StreamType::Device,
            owner_id: owner,
            expected,
            events: vec![event],
        }))
        .await
        .unwrap();
}

/// The owner's buckets once the projectors caught up, checked against a rebuild.
async fn buckets(pool: &PgPool, owner: Uuid) -> BTreeMap<DeviceStatus, (i64, DateTime<Utc>)> {
    caught_up(pool).await;
    let reader = event_log::LogReader::new(pool.clone());
    let head = reader.head().await.unwrap().position;
    let rebuilt = fold_log(&reader, head, 1_000).await.unwrap();
    let stored = load_read_models(pool).await.unwrap();
    assert_eq!(
        stored.device_stats, rebuilt.device_stats,
        "device_stats differ from a rebuild"
    );
    stored
        .device_stats
        .iter()
        .filter(|(key, _)| key.user_id == owner)
        .map(|(key, row): (&StatsKey, &StatsRow)| {
            assert_eq!(key.provider, Provider::Aws);
            (key.status, (row.device_count, row.last_created_at))
        })
        .collect()
}

#[sqlx::test(migrations = false)]
async fn the_newest_device_leaving_hands_its_bucket_the_next_newest_time_and_the_last_empties_it(pool: PgPool) {
    let world = World::new(&pool, 1, 1).await;
    let (stop, tasks) = start_projectors(&pool);
    let owner = world.user_id(0);
    let created = |minutes: i64| t0() + chrono::Duration::minutes(minutes);
    let devices = [Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7()];
    for (minutes, device) in devices.iter().enumerate() {
        let event = test_support::fixtures::new_event(event_schema::DeviceCreated {
            device_id: *device,
            owner_id: owner,
            provider: Provider::Aws,
            cpu_cores: 2,
            memory_mb: 2048,
            android_version: 14,
            created_at: created(minutes as i64),
        });
        append_device(&world, owner, *device, 0, event).await;
    }
    let stopped = DeviceStatus::Stopped;
    assert_eq!(
        buckets(&pool, owner).await,
        BTreeMap::from([(stopped, (3, created(2)))])
    );

    // The newest starts: the stopped bucket's newest is now the second device.
    let started = test_support::fixtures::new_event(event_schema::DeviceStarted {
        device_id: devices[2],
        started_at: created(10),
    });
    append_device(&world, owner, devices[2], 1, started).await;
    assert_eq!(
        buckets(&pool, owner).await,
        BTreeMap::from([(stopped, (2, created(1))), (DeviceStatus::Running, (1, created(2)))])
    );

    // The oldest leaves: the newest time stays.
    let deleted = |device: Uuid| {
        test_support::fixtures::new_event(event_schema::DeviceDeleted {
            device_id: device,
            deleted_at: created(20),
        })
    };
    append_device(&world, owner, devices[0], 1, deleted(devices[0])).await;
    assert_eq!(
        buckets(&pool, owner).await,
        BTreeMap::from([(stopped, (1, created(1))), (DeviceStatus::Running, (1, created(2)))])
    );

    // The last stopped device leaves: its bucket is gone, not kept at zero.
    append_device(&world, owner, devices[1], 1, deleted(devices[1])).await;
    assert_eq!(
        buckets(&pool, owner).await,
        BTreeMap::from([(DeviceStatus::Running, (1, created(2)))])
    );
    stop.cancel();
    for task in tasks {
        task.await.unwrap();
    }
}
