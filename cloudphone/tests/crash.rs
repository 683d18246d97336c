//! A projector process killed (SIGKILL) at random points while events flow ends, once caught
//! up, with read models equal to a rebuild from scratch: nothing counted twice, nothing lost.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests panic on purpose

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use chrono::Utc;
use event_log::{AppendBatch, EventStore, ExpectedVersion, NewEvent, StoreConfig, StreamAppend};
use event_schema::*;
use projections::stored::load_read_models;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sqlx::PgPool;
use uuid::Uuid;

async fn url_of(pool: &PgPool) -> String {
    let name: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(pool)
        .await
        .unwrap();
    let server = std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let base = server
        .rsplit_once('/')
        .map(|(base, _)| base.to_owned())
        .unwrap_or(server);
    format!("{base}/{name}")
}

fn projector(url: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_cloudphone"))
        .arg("projector")
        .env("CLOUDPHONE_DATABASE_URL", url)
        .env("CLOUDPHONE_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn event(event: impl Into<Event>) -> NewEvent {
    NewEvent::from_event(&event.into(), EventMetadata::default(), Utc::now()).unwrap()
}

/// Device lifecycles: create, then start / stop+usage cycles, sometimes a delete.
async fn write_history(store: Arc<EventStore>, done: Arc<AtomicBool>, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let owner = Uuid::now_v7();
    let mut devices: Vec<(Uuid, i64, bool)> = Vec::new();
    while !done.load(Ordering::Relaxed) {
        let now = Utc::now();
        let (device, version, running, events) = if devices.is_empty() || rng.random_range(0..8) == 0 {
            let device = Uuid::now_v7();
            let created = DeviceCreated {
                device_id: device,
                owner_id: owner,
                provider: Provider::Aws,
                cpu_cores: rng.random_range(1..5),
                memory_mb: 2048,
                android_version: 14,
                created_at: now,
            };
            (device, 0, false, vec![event(created)])
        } else {
            let index = rng.random_range(0..devices.len());
            let (device, version, running) = devices[index];
            if running {
                let stopped = DeviceStopped {
                    device_id: device,
                    reason: StopReason::Requested,
                    stopped_at: now,
                };
                let minutes = rng.random_range(1..3000);
                let usage = UsageRecorded {
                    owner_id: owner,
                    device_id: device,
                    provider: Provider::Aws,
                    started_at: now - chrono::Duration::minutes(i64::from(minutes)),
                    ended_at: now,
                    minutes,
                    cost: Money::new(i64::from(minutes) / 5, Currency::USD),
                    pricing_plan_id: "test".into(),
                };
                (device, version, true, vec![event(stopped), event(usage)])
            } else {
                (
                    device,
                    version,
                    false,
                    vec![event(DeviceStarted {
                        device_id: device,
                        started_at: now,
                    })],
                )
            }
        };
        let count = events.len() as i64;
        let expected = if version == 0 {
            ExpectedVersion::NoStream
        } else {
            ExpectedVersion::Exact(version)
        };
        let batch = AppendBatch::single(StreamAppend {
            stream_id: device,
            stream_type: StreamType::Device,
            owner_id: owner,
            expected,
            events,
        });
        store.append(batch).await.unwrap();
        match devices.iter_mut().find(|(id, _, _)| *id == device) {
            Some(entry) => *entry = (device, version + count, !running),
            None => devices.push((device, count, false)),
        }
        tokio::task::yield_now().await;
    }
}

#[sqlx::test(migrations = false)]
async fn a_projector_killed_twenty_times_ends_equal_to_a_rebuild(pool: PgPool) {
    event_log::migrate(&pool).await.unwrap();
    projections::migrate(&pool).await.unwrap();
    let url = url_of(&pool).await;
    let store = Arc::new(EventStore::open(pool.clone(), StoreConfig::default()).await.unwrap());
    let done = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..4)
        .map(|seed| tokio::spawn(write_history(store.clone(), done.clone(), seed)))
        .collect();

    let mut rng = StdRng::seed_from_u64(99);
    let mut kills = 0;
    while kills < 20 {
        let mut child = projector(&url);
        // Let it run for a random while (it may be mid-batch, mid-commit or idle), then SIGKILL.
        tokio::time::sleep(Duration::from_millis(rng.random_range(50..400))).await;
        child.kill().unwrap();
        child.wait().unwrap();
        kills += 1;
    }
    done.store(true, Ordering::Relaxed);
    for writer in writers {
        writer.await.unwrap();
    }

    // A last run catches up.
    let mut child = projector(&url);
    let head = event_log::LogReader::new(pool.clone()).head().await.unwrap().position;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let lag: Vec<i64> = sqlx::query_scalar("SELECT $1 - position FROM projection_checkpoints")
            .bind(head)
            .fetch_all(&pool)
            .await
            .unwrap();
        if lag.len() == 2 && lag.iter().all(|l| *l == 0) {
            break;
        }
        assert!(Instant::now() < deadline, "the projector never caught up: lag {lag:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();

    let rebuilt = projections::fold_log(&event_log::LogReader::new(pool.clone()), head, 5_000)
        .await
        .unwrap();
    let stored = load_read_models(&pool).await.unwrap();
    assert!(head > 500, "enough events flowed: {head}");
    assert_eq!(stored.devices.len(), rebuilt.devices.len());
    let differing: Vec<_> = stored
        .devices
        .iter()
        .filter(|(id, row)| rebuilt.devices.get(*id) != Some(*row))
        .take(3)
        .collect();
    assert!(
        differing.is_empty(),
        "devices differ from a rebuild, e.g. {differing:?}"
    );
    assert!(
        stored.device_stats == rebuilt.device_stats,
        "device_stats differ from a rebuild"
    );
    assert!(
        stored.daily_usage == rebuilt.daily_usage,
        "daily_usage differs from a rebuild"
    );
}
