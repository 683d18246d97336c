//! `device_stats` kept by adding each batch's changes: the cases where adding is not enough,
//! the newest device leaving its bucket and the last one leaving it, against PostgreSQL.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use event_log::{AppendBatch, ExpectedVersion, StreamAppend};
use event_schema::{DeviceStatus, Provider, StreamType};
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
    assert_equals_rebuild(pool).await;
    load_read_models(pool)
        .await
        .unwrap()
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

/// A catch-up batch: ten thousand owners' devices created in one batch, then half of them
/// started and a quarter deleted (buckets emptied, buckets left by their newest device) in
/// another, each applied in one transaction. The buckets equal a rebuild, and the batch
/// takes no heavyweight lock per owner or bucket: PostgreSQL's lock table holds 64 per
/// connection on average, which a lock per owner exhausted ("out of shared memory").
#[sqlx::test(migrations = false)]
async fn a_catch_up_batch_of_ten_thousand_owners_equals_a_rebuild_under_a_few_locks(pool: PgPool) {
    let world = World::new(&pool, 1, 1).await;
    let (stop, tasks) = start_projectors(&pool);
    caught_up(&pool).await;
    stop.cancel();
    for task in tasks {
        task.await.unwrap();
    }
    let reader = event_log::LogReader::new(pool.clone());
    let owners: Vec<Uuid> = (0..10_000).map(|_| Uuid::now_v7()).collect();
    let devices: Vec<Uuid> = (0..10_000).map(|_| Uuid::now_v7()).collect();
    let stream = |i: usize, expected: ExpectedVersion, event: event_log::NewEvent| StreamAppend {
        stream_id: devices[i],
        stream_type: StreamType::Device,
        owner_id: owners[i],
        expected,
        events: vec![event],
    };
    let mut rounds: Vec<Vec<StreamAppend>> = Vec::new();
    rounds.push(
        (0..devices.len())
            .map(|i| {
                let created = test_support::fixtures::new_event(event_schema::DeviceCreated {
                    device_id: devices[i],
                    owner_id: owners[i],
                    provider: [Provider::Aws, Provider::Gcp][i % 2],
                    cpu_cores: 2,
                    memory_mb: 2048,
                    android_version: 14,
                    created_at: t0() + chrono::Duration::seconds(i as i64),
                });
                stream(i, ExpectedVersion::NoStream, created)
            })
            .collect(),
    );
    rounds.push(
        (0..devices.len())
            .filter(|i| i % 4 != 3)
            .map(|i| {
                let event = if i % 2 == 0 {
                    test_support::fixtures::new_event(event_schema::DeviceStarted {
                        device_id: devices[i],
                        started_at: t0() + chrono::Duration::hours(1),
                    })
                } else {
                    test_support::fixtures::new_event(event_schema::DeviceDeleted {
                        device_id: devices[i],
                        deleted_at: t0() + chrono::Duration::hours(1),
                    })
                };
                stream(i, ExpectedVersion::Exact(1), event)
            })
            .collect(),
    );
    let mut conn = pool.acquire().await.unwrap();
    let version = projections::checkpoint::load(&mut conn, read_models::Projection::Fleet)
        .await
        .unwrap()
        .version;
    drop(conn);
    let layout = read_models::Projection::Fleet.layout(version).unwrap();
    for streams in rounds {
        let after = reader.head().await.unwrap().position;
        let count = streams.len();
        for chunk in streams.chunks(1_000) {
            world
                .store
                .append(AppendBatch {
                    streams: chunk.to_vec(),
                    idempotency: None,
                })
                .await
                .unwrap();
        }
        let events = reader.read_all(after, 20_000).await.unwrap();
        assert_eq!(events.len(), count);
        let mut tx = pool.begin().await.unwrap();
        projections::apply::lock_for_batch(&mut tx, read_models::Projection::Fleet)
            .await
            .unwrap();
        projections::apply::apply_events(&mut tx, layout, &events)
            .await
            .unwrap();
        let held: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_locks WHERE pid = pg_backend_pid() AND locktype IN ('advisory', 'tuple')",
        )
        .fetch_one(&mut *tx)
        .await
        .unwrap();
        tx.commit().await.unwrap();
        assert!(held <= 8, "{held} advisory or tuple locks for one batch");
    }
    assert_equals_rebuild(&pool).await;
    let stored = load_read_models(&pool).await.unwrap();
    // Every owner kept a bucket or lost its only one: 2 500 kept their stopped device, 5 000
    // started theirs, 2 500 deleted it.
    assert_eq!(stored.device_stats.len(), 7_500);
}
