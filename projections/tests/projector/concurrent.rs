//! Batches applied at the same time by different Kafka workers: each device's stream is in
//! one partition, but one owner's devices are in several, so two workers may apply batches
//! of one owner's devices at once. The owner's aggregates must count both.

use std::time::{Duration, Instant};

use event_log::{AppendBatch, ExpectedVersion, LogReader, StreamAppend};
use event_schema::StreamType;
use projections::apply::{apply_events, lock_for_batch};
use projections::fold_log;
use read_models::Projection;
use read_models::stored::load_read_models;
use sqlx::PgPool;
use uuid::Uuid;

use crate::support::*;

/// Two workers apply one event each, of two devices of one owner, the second while the
/// first's transaction is still open. When each batch recomputed the owner's `device_stats`
/// from `devices` in its own snapshot, the second left one device counted as stopped (`load
/// kafka` found it at 1 000 commands/s with two workers). Now both add to the same buckets,
/// and both devices were created at the same time, so each one leaving the stopped bucket
/// may have been its newest: each rereads it, the second after the first committed.
#[sqlx::test(migrations = false)]
async fn two_workers_applying_one_owners_devices_at_once_both_count_in_device_stats(pool: PgPool) {
    let world = World::new(&pool, 1, 1).await;
    let owner = world.user_id(0);
    let devices = [Uuid::now_v7(), Uuid::now_v7()];
    let append = |device: Uuid, expected: ExpectedVersion, event: event_log::NewEvent| {
        world.store.append(AppendBatch::single(StreamAppend {
            stream_id: device,
            stream_type: StreamType::Device,
            owner_id: owner,
            expected,
            events: vec![event],
        }))
    };
    for device in devices {
        let created = test_support::fixtures::new_event(event_schema::DeviceCreated {
            device_id: device,
            owner_id: owner,
            provider: event_schema::Provider::Aws,
            cpu_cores: 2,
            memory_mb: 2048,
            android_version: 14,
            created_at: t0(),
        });
        append(device, ExpectedVersion::NoStream, created).await.unwrap();
    }
    let (stop, tasks) = start_projectors(&pool);
    caught_up(&pool).await;
    stop.cancel();
    for task in tasks {
        task.await.unwrap();
    }
    // Both devices started: one event on each device's stream.
    for device in devices {
        let started = test_support::fixtures::new_event(event_schema::DeviceStarted {
            device_id: device,
            started_at: t0() + chrono::Duration::minutes(1),
        });
        append(device, ExpectedVersion::Exact(1), started).await.unwrap();
    }
    let reader = LogReader::new(pool.clone());
    let head = reader.head().await.unwrap().position;
    let events = reader.read_all(head - 2, 2).await.unwrap();
    assert_eq!(events.len(), 2);
    let mut conn = pool.acquire().await.unwrap();
    let version = projections::checkpoint::load(&mut conn, Projection::Fleet)
        .await
        .unwrap()
        .version;
    drop(conn);
    let layout = Projection::Fleet.layout(version).unwrap();

    let mut first = pool.begin().await.unwrap();
    lock_for_batch(&mut first, Projection::Fleet).await.unwrap();
    apply_events(&mut first, layout, &events[..1]).await.unwrap();
    let second = tokio::spawn({
        let (pool, batch) = (pool.clone(), events[1..].to_vec());
        async move {
            let mut tx = pool.begin().await.unwrap();
            lock_for_batch(&mut tx, Projection::Fleet).await.unwrap();
            apply_events(&mut tx, layout, &batch).await.unwrap();
            tx.commit().await.unwrap();
        }
    });
    // The second batch is waiting on the first (for a bucket row the first wrote) before
    // the first commits, so the two overlap.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
             WHERE NOT l.granted AND a.datname = current_database()",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        if waiting > 0 || second.is_finished() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the second batch never reached the owner's aggregates"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    first.commit().await.unwrap();
    second.await.unwrap();

    let rebuilt = fold_log(&reader, head, 1_000).await.unwrap();
    let stored = load_read_models(&pool).await.unwrap();
    assert_eq!(stored.devices, rebuilt.devices);
    assert_eq!(
        stored.device_stats, rebuilt.device_stats,
        "device_stats lost one worker's change"
    );
}
