//! Replay: a rebuilt version equals the incrementally maintained one, row for row; a replay
//! stopped or aborted mid-rebuild resumes to the same result; bad requests are refused.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use projections::fold_log;
use projections::replay::{self, ReplayConfig, ReplayError, ReplayObserver, ReplayPhase, Unobserved};
use read_models::stored::load_read_models;
use read_models::{Projection, ReadModels};
use serde_json::json;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::support::*;

/// Small pages and a checkpoint after every page: many resumable steps on a small history.
fn small_steps() -> ReplayConfig {
    ReplayConfig {
        page_events: 37,
        checkpoint_every: Duration::ZERO,
        ..ReplayConfig::default()
    }
}

async fn reference(pool: &PgPool) -> ReadModels {
    let reader = event_log::LogReader::new(pool.clone());
    let head = reader.head().await.unwrap().position;
    fold_log(&reader, head, 1_000).await.unwrap()
}

async fn live_version(pool: &PgPool, projection: Projection) -> (i32, i64) {
    sqlx::query_as("SELECT version, position FROM projection_checkpoints WHERE projection = $1")
        .bind(projection.name())
        .fetch_one(pool)
        .await
        .unwrap()
}

/// A history with everything replay must handle: the domain's random commands, a
/// `DeviceCreated` stored at schema version 1 (upcast on read), and a malformed event.
async fn history(pool: &PgPool, seed: u64, steps: usize) -> World {
    let mut world = World::new(pool, 6, seed).await;
    world.run(steps / 2).await;
    let old_device = Uuid::now_v7();
    let owner = world.user_id(0);
    let v1 = json!({"device_id": old_device, "owner_id": owner, "provider": "aws", "cpu_cores": 2,
                    "memory_mb": 1024, "created_at": "2031-03-30T20:00:00Z"});
    append_raw(pool, old_device, "DeviceCreated", 1, v1).await;
    append_raw(
        pool,
        Uuid::now_v7(),
        "DeviceStarted",
        1,
        json!({"device_id": "not a uuid"}),
    )
    .await;
    world.run(steps / 2).await;
    world
}

async fn project_to_head(pool: &PgPool) {
    let (stop, tasks) = start_projectors(pool);
    caught_up(pool).await;
    stop.cancel();
    for task in tasks {
        task.await.unwrap();
    }
}

#[sqlx::test(migrations = false)]
async fn a_rebuild_equals_the_incremental_models_row_for_row(pool: PgPool) {
    for (round, seed) in [11u64, 29].into_iter().enumerate() {
        if round > 0 {
            // A second random history on top of the first, replayed again.
            let mut world = World::new(&pool, 3, seed).await;
            world.run(250).await;
        } else {
            history(&pool, seed, 400).await;
        }
        project_to_head(&pool).await;
        let incremental = load_read_models(&pool).await.unwrap();
        assert!(incremental.devices.len() > 20 && !incremental.daily_usage.is_empty());
        if round == 0 {
            // The history starts on 2031-03-30; its first month goes to the archive, which a
            // replay reads too.
            let month = chrono::NaiveDate::from_ymd_opt(2031, 3, 1).unwrap();
            event_log::partitions::archive_partition(&pool, month).await.unwrap();
            let archived: i64 = sqlx::query_scalar("SELECT count(*) FROM user_events_archive")
                .fetch_one(&pool)
                .await
                .unwrap();
            assert!(archived > 0, "events in the archived month");
        }

        // Round 0 checkpoints after every page (partial tables summed at the end); round 1
        // folds everything in memory and writes the tables straight from it.
        let config = if round == 0 {
            small_steps()
        } else {
            ReplayConfig::default()
        };
        // The same version rebuilt: the fleet.
        let summary = replay::replay(
            &pool,
            Projection::Fleet,
            None,
            config,
            &Unobserved,
            &CancellationToken::new(),
        )
        .await
        .unwrap();
        assert!(summary.bulk_events > 0 && summary.not_applicable >= 1, "{summary:?}");
        let rebuilt = load_read_models(&pool).await.unwrap();
        assert_eq!(rebuilt.devices, incremental.devices, "round {round}: devices");
        assert_eq!(
            rebuilt.device_stats, incremental.device_stats,
            "round {round}: device_stats"
        );
        // The device stored at v1 was lifted: Android 11, the upcaster's default.
        assert!(
            rebuilt.devices.values().any(|d| d.android_version == 11),
            "round {round}: upcast"
        );

        // daily_usage at the version live now, then (first round) v1 -> v2.
        let (version, _) = live_version(&pool, Projection::DailyUsage).await;
        let summary = replay::replay(
            &pool,
            Projection::DailyUsage,
            Some(version),
            config,
            &Unobserved,
            &CancellationToken::new(),
        )
        .await
        .unwrap();
        assert_eq!(summary.replaced_version, version);
        let rebuilt = load_read_models(&pool).await.unwrap();
        assert_eq!(
            rebuilt.daily_usage, incremental.daily_usage,
            "round {round}: daily_usage v{version}"
        );
        assert_eq!(rebuilt.usage_by_provider, incremental.usage_by_provider);
        assert_eq!(rebuilt.hourly_usage, incremental.hourly_usage);
        if version == 3 {
            assert!(!rebuilt.hourly_usage.is_empty());
            assert_hours_add_up_to_days(&rebuilt);
        }
        if version == 1 {
            // Version 1 once more, folded whole in memory (its rows merged there, not in SQL).
            replay::replay(
                &pool,
                Projection::DailyUsage,
                Some(1),
                ReplayConfig::default(),
                &Unobserved,
                &CancellationToken::new(),
            )
            .await
            .unwrap();
            let rebuilt = load_read_models(&pool).await.unwrap();
            assert_eq!(
                rebuilt.daily_usage, incremental.daily_usage,
                "daily_usage v1 from memory"
            );
            replay::replay(
                &pool,
                Projection::DailyUsage,
                Some(2),
                small_steps(),
                &Unobserved,
                &CancellationToken::new(),
            )
            .await
            .unwrap();
            assert_eq!(live_version(&pool, Projection::DailyUsage).await.0, 2);
            let v2 = load_read_models(&pool).await.unwrap();
            assert_eq!(v2.daily_usage, incremental.daily_usage, "v2 keeps the same usage");
            assert!(!v2.usage_by_provider.is_empty());
            assert_eq!(v2.usage_by_provider, reference(&pool).await.usage_by_provider);
            assert!(v2.hourly_usage.is_empty(), "version 2 has no hours");
            // v2 -> v3 from checkpointed partials (round 1 rebuilds v3 from memory).
            replay::replay(
                &pool,
                Projection::DailyUsage,
                Some(3),
                small_steps(),
                &Unobserved,
                &CancellationToken::new(),
            )
            .await
            .unwrap();
            assert_eq!(live_version(&pool, Projection::DailyUsage).await.0, 3);
            let v3 = load_read_models(&pool).await.unwrap();
            assert_eq!(v3.daily_usage, incremental.daily_usage, "v3 keeps the same days");
            assert_eq!(v3.usage_by_provider, v2.usage_by_provider);
            assert!(!v3.hourly_usage.is_empty());
            assert_eq!(v3.hourly_usage, reference(&pool).await.hourly_usage);
            assert_hours_add_up_to_days(&v3);
        }
        // After the swaps, the live projectors maintain the new versions incrementally.
        World::new(&pool, 2, seed + 1).await.run(150).await;
        project_to_head(&pool).await;
        let stored = load_read_models(&pool).await.unwrap();
        assert_eq!(
            stored,
            reference(&pool).await,
            "round {round}: incremental after the swap"
        );
        assert_hours_add_up_to_days(&stored);
    }
    // The rebuilt device_stats swapped in keeps the page room of migration 1004.
    let options: Option<Vec<String>> =
        sqlx::query_scalar("SELECT reloptions FROM pg_class WHERE oid = 'device_stats'::regclass")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(options, Some(vec!["fillfactor=70".to_owned()]));
    // Every swap kept the version it replaced, until dropped.
    let kept: i64 =
        sqlx::query_scalar("SELECT count(*) FROM information_schema.schemata WHERE schema_name LIKE 'retired\\_%'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(
        kept, 7,
        "2 fleet rebuilds and 5 daily_usage swaps keep what they replaced"
    );
    let dropped = replay::drop_replaced(&pool, None, 1).await.unwrap();
    assert_eq!(dropped.len(), 5, "{dropped:?}");
    let dropped = replay::drop_replaced(&pool, Some(Projection::Fleet), 0).await.unwrap();
    assert_eq!(dropped.len(), 1);
    let shadows: i64 =
        sqlx::query_scalar("SELECT count(*) FROM information_schema.schemata WHERE schema_name LIKE 'replay\\_%'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(shadows, 0, "no shadow schema is left behind");
}

/// Cancels `stop` once the bulk phase passes a fraction of its target, or after a number of
/// pages (each page is checkpointed before the next one is reported).
struct StopAt {
    fraction: f64,
    pages: i64,
    stop: CancellationToken,
    seen: AtomicI64,
}

impl ReplayObserver for StopAt {
    fn phase(&self, _: ReplayPhase) {}

    fn progress(&self, position: i64, target: i64) {
        let pages = self.seen.fetch_add(1, Ordering::SeqCst) + 1;
        if position as f64 >= target as f64 * self.fraction || pages >= self.pages {
            self.stop.cancel();
        }
    }
}

#[sqlx::test(migrations = false)]
async fn a_replay_stopped_or_aborted_mid_rebuild_resumes_to_the_same_result(pool: PgPool) {
    history(&pool, 5, 500).await;
    project_to_head(&pool).await;
    let expected = reference(&pool).await;
    for projection in Projection::ALL {
        // Stopped (Ctrl-C) a third of the way: the rebuild stays, with its checkpoint.
        let stop = CancellationToken::new();
        let observer = StopAt {
            fraction: 0.3,
            pages: i64::MAX,
            stop: stop.clone(),
            seen: AtomicI64::new(0),
        };
        let err = replay::replay(&pool, projection, None, small_steps(), &observer, &stop)
            .await
            .unwrap_err();
        assert!(matches!(err, ReplayError::Stopped), "{err}");
        let (state, position, target): (String, i64, i64) = sqlx::query_as(
            "SELECT state, position, target_position FROM projection_rebuilds WHERE projection = $1 ORDER BY id DESC LIMIT 1",
        )
        .bind(projection.name())
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(state, "building");
        assert!(0 < position && position < target, "{position} of {target}");

        // Aborted at an arbitrary await (a killed process: mid-transaction, mid-COPY) in a
        // second run that resumed from there.
        let seen = Arc::new(StopAt {
            fraction: 1.0,
            pages: 4,
            stop: CancellationToken::new(),
            seen: AtomicI64::new(0),
        });
        // Its own pool, closed after the abort, as a killed process's connections close.
        let own = sqlx::postgres::PgPoolOptions::new()
            .max_connections(4)
            .connect_with((*pool.connect_options()).clone())
            .await
            .unwrap();
        let task = tokio::spawn({
            let (own, seen) = (own.clone(), Arc::clone(&seen));
            async move {
                let never = CancellationToken::new();
                replay::replay(&own, projection, None, small_steps(), seen.as_ref(), &never).await
            }
        });
        seen.stop.cancelled().await;
        task.abort();
        assert!(task.await.unwrap_err().is_cancelled());
        own.close().await;
        let position_after_abort: i64 =
            sqlx::query_scalar("SELECT position FROM projection_rebuilds WHERE projection = $1 AND state = 'building'")
                .bind(projection.name())
                .fetch_one(&pool)
                .await
                .unwrap();
        assert!(
            position_after_abort > position,
            "the second run checkpointed before it was aborted: {position} -> {position_after_abort} of {target}"
        );

        // Run again: it resumes (the aborted run's lock went with its connection) and swaps.
        let summary = replay::replay(
            &pool,
            projection,
            None,
            small_steps(),
            &Unobserved,
            &CancellationToken::new(),
        )
        .await
        .unwrap();
        assert!(summary.resumed);
        assert!(summary.bulk_positions < target, "resumed, not restarted: {summary:?}");
    }
    let stored = load_read_models(&pool).await.unwrap();
    assert_eq!(stored, expected, "a resumed rebuild equals a fold of the whole log");
    // Fleet v2's users and history too (resumed from their partial tables).
    let reader = event_log::LogReader::new(pool.clone());
    let head = reader.head().await.unwrap().position;
    let users_and_history = projections::fold_users_and_history(&reader, head, 1_000).await.unwrap();
    assert!(!users_and_history.users.is_empty() && !users_and_history.status_changes.is_empty());
    assert_eq!(
        read_models::stored::load_users_and_history(&pool).await.unwrap(),
        Some(users_and_history),
        "a resumed fleet v2 equals a fold of the whole log"
    );
}

#[sqlx::test(migrations = false)]
async fn bad_replay_requests_are_refused_clearly_and_change_nothing(pool: PgPool) {
    history(&pool, 3, 60).await;
    project_to_head(&pool).await;
    let before = load_read_models(&pool).await.unwrap();
    let never = CancellationToken::new();
    let err = replay::replay(
        &pool,
        Projection::DailyUsage,
        Some(9),
        small_steps(),
        &Unobserved,
        &never,
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("has no version 9"), "{err}");

    // A rebuild of v1 left in progress: a replay of v2 is refused until it is abandoned.
    let stop = CancellationToken::new();
    stop.cancel();
    let err = replay::replay(
        &pool,
        Projection::DailyUsage,
        Some(1),
        small_steps(),
        &Unobserved,
        &stop,
    )
    .await
    .unwrap_err();
    assert!(matches!(err, ReplayError::Stopped), "{err}");
    let err = replay::replay(
        &pool,
        Projection::DailyUsage,
        Some(2),
        small_steps(),
        &Unobserved,
        &never,
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("--abandon"), "{err}");

    // Another replay of the same projection holds the lock.
    let mut holder = pool.acquire().await.unwrap();
    sqlx::query("SELECT pg_advisory_lock(hashtext('cloudphone.replay.daily_usage'))")
        .execute(&mut *holder)
        .await
        .unwrap();
    let err = replay::replay(
        &pool,
        Projection::DailyUsage,
        Some(1),
        small_steps(),
        &Unobserved,
        &never,
    )
    .await
    .unwrap_err();
    assert!(matches!(err, ReplayError::AlreadyRunning { .. }), "{err}");
    sqlx::query("SELECT pg_advisory_unlock_all()")
        .execute(&mut *holder)
        .await
        .unwrap();
    drop(holder);

    assert!(replay::abandon(&pool, Projection::DailyUsage).await.unwrap().is_some());
    assert_eq!(replay::abandon(&pool, Projection::DailyUsage).await.unwrap(), None);

    assert_eq!(
        load_read_models(&pool).await.unwrap(),
        before,
        "refused replays changed nothing"
    );
    let schemas: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM information_schema.schemata WHERE schema_name LIKE 'replay\\_%' OR schema_name LIKE 'retired\\_%'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(schemas, 0);
}

#[sqlx::test(migrations = false)]
async fn a_live_projector_of_the_old_version_moves_to_the_new_one_at_the_swap(pool: PgPool) {
    let mut world = history(&pool, 8, 200).await;
    let (stop, tasks) = start_projectors(&pool);
    caught_up(&pool).await;
    // The live projectors keep running at v1 while v2 is built and swapped in; then more
    // history arrives and must land in v2's tables, per provider too.
    replay::replay(
        &pool,
        Projection::DailyUsage,
        Some(2),
        small_steps(),
        &Unobserved,
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    world.run(200).await;
    caught_up(&pool).await;
    stop.cancel();
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(live_version(&pool, Projection::DailyUsage).await.0, 2);
    let stored = load_read_models(&pool).await.unwrap();
    assert_eq!(stored, reference(&pool).await.without_hourly_usage());
}

#[sqlx::test(migrations = false)]
async fn after_the_swap_to_v3_live_projectors_keep_every_days_hours_adding_up_to_it(pool: PgPool) {
    let mut world = history(&pool, 13, 200).await;
    let (stop, tasks) = start_projectors(&pool);
    caught_up(&pool).await;
    // The live projectors keep running (at v1) while v3 is built and swapped in; then more
    // history arrives and must land in v3's tables, hours included.
    let summary = replay::replay(
        &pool,
        Projection::DailyUsage,
        None,
        ReplayConfig::default(),
        &Unobserved,
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_eq!((summary.version, summary.replaced_version), (3, 1));
    let swapped = load_read_models(&pool).await.unwrap();
    assert!(!swapped.hourly_usage.is_empty());
    assert_hours_add_up_to_days(&swapped);
    world.run(200).await;
    caught_up(&pool).await;
    stop.cancel();
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(live_version(&pool, Projection::DailyUsage).await.0, 3);
    let stored = load_read_models(&pool).await.unwrap();
    assert!(
        stored.hourly_usage.len() > swapped.hourly_usage.len(),
        "live hours were added"
    );
    assert_eq!(stored, reference(&pool).await);
    assert_hours_add_up_to_days(&stored);
}

/// Every `daily_usage` row equals the sum of its hours in `hourly_usage` (minutes and cost),
/// and no hour is outside a day.
fn assert_hours_add_up_to_days(models: &ReadModels) {
    use std::collections::BTreeMap;
    let mut summed: BTreeMap<(chrono::NaiveDate, Uuid, Uuid, String), (i64, i64)> = BTreeMap::new();
    for (key, hour) in &models.hourly_usage {
        let sum = summed
            .entry((key.hour.date_naive(), key.user_id, key.device_id, key.currency.clone()))
            .or_default();
        sum.0 += hour.minutes;
        sum.1 += hour.cost_minor;
    }
    let days: BTreeMap<_, _> = models
        .daily_usage
        .iter()
        .map(|((key, currency), day)| {
            (
                (key.day, key.user_id, key.device_id, currency.clone()),
                (day.minutes, day.cost_minor),
            )
        })
        .collect();
    assert_eq!(summed, days, "the hours of each day add up to its daily_usage row");
}

/// Kafka mode at the swap: each partition's workers applied up to a position of their own,
/// and the checkpoint is only the least of them. The new version is built up to the
/// furthest, and every partition of the replayed projection is handed over after the swap
/// position: workers skip what they read at or below it, and a partition whose published
/// messages are all at or below it (by the relay's record) starts after them. Offsets never
/// move back; another projection's offsets are not touched.
#[sqlx::test(migrations = false)]
async fn a_swap_in_kafka_mode_hands_every_partition_over_after_the_swap_position(pool: PgPool) {
    history(&pool, 13, 200).await;
    project_to_head(&pool).await;
    let (_, head) = live_version(&pool, Projection::DailyUsage).await;
    let topic = "cloudphone.test.swap";
    sqlx::query("UPDATE projection_checkpoints SET position = $1 WHERE projection = 'daily_usage'")
        .bind(head - 10)
        .execute(&pool)
        .await
        .unwrap();
    // (partition, next_offset, last_position applied) as the workers left them, and
    // (last_offset, last_position) the relay recorded.
    let workers: [(i32, i64, i64); 3] = [(0, 60, head), (1, 40, head - 10), (2, 100, head - 3)];
    let relay: [(i32, i64, i64); 3] = [(0, 70, head - 1), (1, 90, head + 500), (2, 50, head - 3)];
    for (partition, next_offset, last_position) in workers {
        for projection in ["daily_usage", "fleet"] {
            sqlx::query("INSERT INTO projection_offsets VALUES ($1, $2, $3, $4, $5)")
                .bind(projection)
                .bind(topic)
                .bind(partition)
                .bind(next_offset)
                .bind(last_position)
                .execute(&pool)
                .await
                .unwrap();
        }
    }
    sqlx::query("INSERT INTO relay_checkpoints (relay, position, partitions) VALUES ($1, $2, 3)")
        .bind(topic)
        .bind(head)
        .execute(&pool)
        .await
        .unwrap();
    for (partition, last_offset, last_position) in relay {
        sqlx::query("INSERT INTO relay_partitions VALUES ($1, $2, $3, $4)")
            .bind(topic)
            .bind(partition)
            .bind(last_offset)
            .bind(last_position)
            .execute(&pool)
            .await
            .unwrap();
    }

    let summary = replay::replay(
        &pool,
        Projection::DailyUsage,
        Some(2),
        small_steps(),
        &Unobserved,
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_eq!(summary.live_position, head, "built up to the furthest partition");
    assert_eq!(live_version(&pool, Projection::DailyUsage).await, (2, head));
    let offsets = |projection: &'static str| {
        let pool = pool.clone();
        async move {
            sqlx::query_as::<_, (i32, i64, i64)>(
                "SELECT partition, next_offset, last_position FROM projection_offsets
                 WHERE projection = $1 ORDER BY partition",
            )
            .bind(projection)
            .fetch_all(&pool)
            .await
            .unwrap()
        }
    };
    assert_eq!(
        offsets("daily_usage").await,
        vec![(0, 71, head), (1, 40, head), (2, 100, head)],
        "0: past the relay's last message; 1: the relay published beyond the swap there; \
         2: the workers were further than the relay's record"
    );
    assert_eq!(offsets("fleet").await, workers.to_vec(), "another projection's offsets");
    let stored = load_read_models(&pool).await.unwrap();
    assert_eq!(stored, reference(&pool).await.without_hourly_usage());
}
