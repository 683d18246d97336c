//! What several of these tests share and no other crate's tests need: the binary under test,
//! a stream of realistic device histories, waits for the projections and the relay, the check
//! that read models equal a rebuild from the log, and one scrape of `/metrics`. What other
//! crates' tests need too is in `test-support`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use chrono::Utc;
use event_log::{AppendBatch, EventStore, ExpectedVersion, StreamAppend};
use event_schema::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use read_models::stored::load_read_models;
use sqlx::PgPool;
use test_support::fixtures::new_event;
use uuid::Uuid;

/// The `cloudphone` binary cargo built for these tests.
pub const CLOUDPHONE: &str = env!("CARGO_BIN_EXE_cloudphone");

/// Device lifecycles: create, then start / stop+usage cycles, sometimes a delete.
/// Appends until `done`, pausing `pace` between appends (zero: as fast as possible).
pub async fn write_history(store: Arc<EventStore>, done: Arc<AtomicBool>, seed: u64, pace: Duration) {
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
            (device, 0, false, vec![new_event(created)])
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
                (device, version, true, vec![new_event(stopped), new_event(usage)])
            } else {
                (
                    device,
                    version,
                    false,
                    vec![new_event(DeviceStarted {
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
        if pace.is_zero() {
            tokio::task::yield_now().await;
        } else {
            tokio::time::sleep(pace).await;
        }
    }
}

/// Waits until every projection's checkpoint reaches `head`.
pub async fn projections_reach(pool: &PgPool, head: i64, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let positions: Vec<i64> = sqlx::query_scalar("SELECT position FROM projection_checkpoints")
            .fetch_all(pool)
            .await
            .unwrap();
        if positions.len() == 2 && positions.iter().all(|p| *p >= head) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "projections stuck at {positions:?}, head {head}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every read model equals one folded from the whole log.
pub async fn assert_read_models_equal_a_rebuild(pool: &PgPool) {
    let reader = event_log::LogReader::new(pool.clone());
    let head = reader.head().await.unwrap().position;
    let rebuilt = projections::fold_log(&reader, head, 5_000).await.unwrap();
    let stored = load_read_models(pool).await.unwrap();
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

/// Waits until the relay named `relay` has published the log up to `head`.
pub async fn relay_reaches(pool: &PgPool, relay: &str, head: i64, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let position: Option<i64> = sqlx::query_scalar("SELECT position FROM relay_checkpoints WHERE relay = $1")
            .bind(relay)
            .fetch_optional(pool)
            .await
            .unwrap();
        if position.is_some_and(|p| p >= head) {
            return;
        }
        assert!(Instant::now() < deadline, "relay stuck at {position:?}, head {head}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One scrape of `/metrics`: every sample, keyed by name and labels as written.
pub async fn scrape(client: &reqwest::Client, base: &str) -> BTreeMap<String, f64> {
    let response = client.get(format!("{base}/metrics")).send().await.unwrap();
    assert_eq!(response.status(), 200, "{base}/metrics");
    let text = response.text().await.unwrap();
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').unwrap();
            (series.to_owned(), value.parse::<f64>().unwrap_or(f64::NAN))
        })
        .collect()
}
