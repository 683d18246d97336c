//! Replays beside live appends: the history read from the real streaming replica
//! (ops/dev/replica.sh) gives the same models as the primary's, a replica behind is waited
//! for, one that cannot be used is refused before anything changes; the throttle holds the
//! replay to its rates.

use std::sync::Arc;
use std::time::{Duration, Instant};

use projections::replay::{
    self, History, ReplayConfig, ReplayError, ReplayObserver, ReplayPhase, Throttle, Unobserved,
};
use read_models::Projection;
use read_models::stored::load_read_models;
use sqlx::PgPool;
use test_support::services::{ReplayPaused, free_port, replica_of};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::support::*;

/// Small pages and a checkpoint after every page: the replica serves many reads.
fn small_steps() -> ReplayConfig {
    ReplayConfig {
        page_events: 37,
        checkpoint_every: Duration::ZERO,
        ..ReplayConfig::default()
    }
}

fn replica(url: &str, catch_up: Duration) -> History {
    History::replica(PgPool::connect_lazy(url).unwrap(), catch_up)
}

async fn project_to_head(pool: &PgPool) {
    let (stop, tasks) = start_projectors(pool);
    caught_up(pool).await;
    stop.cancel();
    for task in tasks {
        task.await.unwrap();
    }
}

async fn live_version(pool: &PgPool, projection: Projection) -> i32 {
    sqlx::query_scalar("SELECT version FROM projection_checkpoints WHERE projection = $1")
        .bind(projection.name())
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Rebuilds registered and their schemas: none means a refused replay changed nothing.
async fn rebuilds_and_schemas(pool: &PgPool) -> (i64, i64) {
    sqlx::query_as(
        "SELECT (SELECT count(*) FROM projection_rebuilds),
                (SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'replay\\_%')",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

#[sqlx::test(migrations = false)]
async fn a_replay_reading_the_replica_equals_the_incremental_models(pool: PgPool) {
    let mut world = World::new(&pool, 6, 41).await;
    world.run(300).await;
    project_to_head(&pool).await;
    let incremental = load_read_models(&pool).await.unwrap();
    assert!(incremental.devices.len() > 10 && !incremental.daily_usage.is_empty());
    let url = replica_of(&pool).await;
    let history = replica(&url, Duration::from_secs(30));

    let never = CancellationToken::new();
    // Each at the version the projectors keep live: the same tables, row for row.
    let fleet = replay::replay_from(
        &pool,
        &history,
        Projection::Fleet,
        Some(live_version(&pool, Projection::Fleet).await),
        small_steps(),
        &Unobserved,
        &never,
    )
    .await
    .unwrap();
    assert!(fleet.bulk_events > 0, "{fleet:?}");
    let usage = replay::replay_from(
        &pool,
        &history,
        Projection::DailyUsage,
        Some(live_version(&pool, Projection::DailyUsage).await),
        ReplayConfig::default(),
        &Unobserved,
        &never,
    )
    .await
    .unwrap();
    assert!(usage.bulk_events > 0, "{usage:?}");
    let rebuilt = load_read_models(&pool).await.unwrap();
    assert_eq!(rebuilt.devices, incremental.devices);
    assert_eq!(rebuilt.device_stats, incremental.device_stats);
    assert_eq!(rebuilt.daily_usage, incremental.daily_usage);
    assert_eq!(rebuilt.usage_by_provider, incremental.usage_by_provider);
    assert_eq!(rebuilt.hourly_usage, incremental.hourly_usage);
}

/// Wakes the test when the replay starts waiting for the replica.
#[derive(Default)]
struct SeesWaiting {
    waiting: Notify,
}

impl ReplayObserver for SeesWaiting {
    fn phase(&self, phase: ReplayPhase) {
        if let ReplayPhase::WaitingForHistory { replayed, target } = phase {
            assert!(replayed < target, "waits only for a replica behind");
            self.waiting.notify_one();
        }
    }

    fn progress(&self, _: i64, _: i64) {}
}

#[sqlx::test(migrations = false)]
async fn a_replica_behind_is_waited_for_then_read(pool: PgPool) {
    let mut world = World::new(&pool, 4, 43).await;
    world.run(200).await;
    let url = replica_of(&pool).await;
    // The replica stops applying WAL: what is appended now is on the primary only.
    let paused = ReplayPaused::pause(&url).await;
    world.run(100).await;
    project_to_head(&pool).await;
    let incremental = load_read_models(&pool).await.unwrap();
    let never = CancellationToken::new();

    // Not waited for long enough: refused in one line, nothing registered.
    let started = Instant::now();
    let err = replay::replay_from(
        &pool,
        &replica(&url, Duration::from_millis(300)),
        Projection::Fleet,
        None,
        ReplayConfig::default(),
        &Unobserved,
        &never,
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, ReplayError::HistoryBehind { replayed, target, .. } if replayed < target),
        "{err}"
    );
    assert!(started.elapsed() >= Duration::from_millis(300), "it waited first");
    assert!(!err.to_string().contains('\n'), "{err}");
    assert_eq!(rebuilds_and_schemas(&pool).await, (0, 0));

    // Waited for: nothing is registered while the replica is behind, and once it replays,
    // the replay reads it to the same models.
    let observer = Arc::new(SeesWaiting::default());
    let version = live_version(&pool, Projection::Fleet).await;
    let replay = tokio::spawn({
        let (pool, observer, url) = (pool.clone(), Arc::clone(&observer), url.clone());
        async move {
            let history = replica(&url, Duration::from_secs(60));
            replay::replay_from(
                &pool,
                &history,
                Projection::Fleet,
                Some(version),
                small_steps(),
                observer.as_ref(),
                &CancellationToken::new(),
            )
            .await
        }
    });
    observer.waiting.notified().await;
    assert_eq!(
        rebuilds_and_schemas(&pool).await,
        (0, 0),
        "nothing registered while waiting"
    );
    drop(paused);
    let summary = replay.await.unwrap().unwrap();
    assert!(summary.bulk_events > 0);
    let rebuilt = load_read_models(&pool).await.unwrap();
    assert_eq!(rebuilt.devices, incremental.devices);
    assert_eq!(rebuilt.device_stats, incremental.device_stats);
}

#[sqlx::test(migrations = false)]
async fn a_history_that_is_unreachable_or_not_a_standby_is_refused_and_changes_nothing(pool: PgPool) {
    let mut world = World::new(&pool, 3, 47).await;
    world.run(100).await;
    let url = replica_of(&pool).await;
    let never = CancellationToken::new();
    let other_database = format!("{}/postgres", url.rsplit_once('/').unwrap().0);
    let cases = [
        (
            History::replica(
                PgPool::connect_lazy(&format!("postgres://postgres@127.0.0.1:{}/nowhere", free_port())).unwrap(),
                Duration::from_secs(5),
            ),
            "cannot use the history replica",
        ),
        (
            History::replica(pool.clone(), Duration::from_secs(5)),
            "not in recovery",
        ),
        (replica(&other_database, Duration::from_secs(5)), "another database"),
    ];
    for (history, says) in cases {
        let err = replay::replay_from(
            &pool,
            &history,
            Projection::Fleet,
            None,
            ReplayConfig::default(),
            &Unobserved,
            &never,
        )
        .await
        .unwrap_err();
        let message = err.to_string();
        assert!(message.contains(says), "{message}");
        assert!(!message.contains('\n'), "one line: {message}");
        assert!(
            matches!(
                err,
                ReplayError::HistoryUnreachable { .. } | ReplayError::NotAStandby { .. }
            ),
            "{err:?}"
        );
        assert_eq!(rebuilds_and_schemas(&pool).await, (0, 0), "{message}");
    }
}

#[sqlx::test(migrations = false)]
async fn a_throttled_replay_keeps_to_its_rates(pool: PgPool) {
    let mut world = World::new(&pool, 4, 53).await;
    world.run(300).await;
    let (last_device_event, devices): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT max(position) FROM user_events WHERE stream_type = 'device'),
                (SELECT count(*) FROM streams WHERE stream_type = 'device')",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(last_device_event > 300 && devices > 20);
    let (events_per_second, write_bytes_per_second) = (600, 10_000);
    let config = ReplayConfig {
        page_events: 50,
        throttle: Throttle {
            events_per_second: Some(events_per_second),
            write_bytes_per_second: Some(write_bytes_per_second),
            index_workers: Some(0),
        },
        ..ReplayConfig::default()
    };
    let summary = replay::replay(
        &pool,
        Projection::Fleet,
        Some(1),
        config,
        &Unobserved,
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    // The bulk phase reads every position up to the last device event at the rate.
    let bulk_floor = last_device_event as f64 / events_per_second as f64;
    assert!(
        summary.bulk_seconds >= bulk_floor,
        "bulk {:.2} s for {last_device_event} positions at {events_per_second}/s",
        summary.bulk_seconds
    );
    // Each device row is more than 100 bytes of binary COPY (two UUIDs, eight other fields).
    let write_floor = (devices * 100) as f64 / write_bytes_per_second as f64;
    assert!(
        summary.finish_seconds >= write_floor,
        "finish {:.2} s for {devices} devices at {write_bytes_per_second} B/s",
        summary.finish_seconds
    );
    // Paced, it still builds what an unpaced replay builds: the rows of a fold of the whole
    // log, and every key and index the reads depend on.
    let rebuilt = load_read_models(&pool).await.unwrap();
    let reader = event_log::LogReader::new(pool.clone());
    let head = reader.head().await.unwrap().position;
    let folded = projections::fold_log(&reader, head, 1_000).await.unwrap();
    assert_eq!(rebuilt.devices, folded.devices);
    assert_eq!(rebuilt.device_stats, folded.device_stats);
    assert_eq!(fleet_indexes(&pool).await, FLEET_INDEXES);
}

/// The fleet's keys and indexes the query API's reads depend on.
const FLEET_INDEXES: &[&str] = &[
    "device_stats_pkey",
    "devices_created_idx",
    "devices_last_started_idx",
    "devices_minutes_used_idx",
    "devices_owner_created_idx",
    "devices_owner_idx",
    "devices_owner_last_started_idx",
    "devices_owner_minutes_used_idx",
    "devices_pkey",
];

/// The keys and indexes of the live fleet tables (`devices`, `device_stats`), by name.
async fn fleet_indexes(pool: &PgPool) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT indexname::text FROM pg_indexes
         WHERE tablename IN ('devices', 'device_stats') AND schemaname = current_schema()
         ORDER BY 1",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}
