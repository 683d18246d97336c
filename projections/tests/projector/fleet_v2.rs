//! Version 2 of `fleet`: `users` and the fleet's history by status, built by replay (both its
//! checkpointed and its in-memory paths) from a history of tier changes, quotas and erasures,
//! then maintained live by the embedded projector after the swap; always equal to a fold of
//! the whole log, and the history always adds up to `device_stats`.

use std::collections::BTreeMap;
use std::time::Duration;

use domain::user::UserCommand;
use event_schema::{DeviceStatus, Quota, Tier};
use projections::replay::{self, ReplayConfig, Unobserved};
use projections::{fold_log, fold_users_and_history};
use read_models::stored::{UsersAndHistory, load_read_models, load_users_and_history};
use read_models::{Projection, ReadModels};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::support::*;

async fn reference(pool: &PgPool) -> (ReadModels, UsersAndHistory) {
    let reader = event_log::LogReader::new(pool.clone());
    let head = reader.head().await.unwrap().position;
    (
        fold_log(&reader, head, 1_000).await.unwrap(),
        fold_users_and_history(&reader, head, 1_000).await.unwrap(),
    )
}

async fn project_to_head(pool: &PgPool) {
    let (stop, tasks) = start_projectors(pool);
    caught_up(pool).await;
    stop.cancel();
    for task in tasks {
        task.await.unwrap();
    }
}

/// The history summed over every hour, per user and status: what `device_stats` counts.
fn counts_of_history(history: &UsersAndHistory) -> BTreeMap<(Uuid, DeviceStatus), i64> {
    let mut counts = BTreeMap::new();
    for (key, delta) in &history.status_changes {
        *counts.entry((key.user_id, key.status)).or_insert(0) += delta;
    }
    counts.retain(|_, n| *n != 0);
    counts
}

fn counts_of_stats(models: &ReadModels) -> BTreeMap<(Uuid, DeviceStatus), i64> {
    let mut counts = BTreeMap::new();
    for (key, row) in &models.device_stats {
        *counts.entry((key.user_id, key.status)).or_insert(0) += row.device_count;
    }
    counts
}

/// `devices` and `device_stats` equal the fold's, whatever version is live.
async fn assert_fleet_v1_tables(pool: &PgPool, models: &ReadModels) {
    let stored = load_read_models(pool).await.unwrap();
    assert_eq!(stored.devices, models.devices);
    assert_eq!(stored.device_stats, models.device_stats);
}

async fn replay_fleet(pool: &PgPool, version: i32, config: ReplayConfig) -> replay::ReplaySummary {
    replay::replay(
        pool,
        Projection::Fleet,
        Some(version),
        config,
        &Unobserved,
        &CancellationToken::new(),
    )
    .await
    .unwrap()
}

#[sqlx::test(migrations = false)]
async fn fleet_v2_rebuilt_from_the_log_equals_it_and_stays_equal_live_after_the_swap(pool: PgPool) {
    let mut world = World::new(&pool, 5, 41).await;
    world.run(200).await;
    assert!(
        world
            .user_command(0, UserCommand::ChangeTier { tier: Tier::Basic })
            .await
    );
    let quota = Quota {
        max_devices: 7,
        max_cpu_cores: 30,
        max_memory_mb: 65_536,
    };
    assert!(world.user_command(1, UserCommand::SetQuota { quota }).await);
    assert!(world.user_command(2, UserCommand::Erase).await);
    world.run(100).await;
    project_to_head(&pool).await;
    assert_eq!(
        load_users_and_history(&pool).await.unwrap(),
        None,
        "version 1 has no users table"
    );

    // Checkpointed after every page: partial tables summed at the end.
    let summary = replay_fleet(
        &pool,
        2,
        ReplayConfig {
            page_events: 29,
            checkpoint_every: Duration::ZERO,
            ..ReplayConfig::default()
        },
    )
    .await;
    assert_eq!((summary.version, summary.replaced_version), (2, 1));
    let (models, expected) = reference(&pool).await;
    let stored = load_users_and_history(&pool).await.unwrap().expect("v2 is live");
    assert_eq!(stored, expected, "users and history rebuilt from checkpoints");
    assert_fleet_v1_tables(&pool, &models).await;
    // What the log says of the users: the tier change, the quota, the erasure.
    let user = |n: usize| &stored.users[&world.user_id(n)];
    assert_eq!(stored.users.len(), 5);
    assert_eq!(user(0).tier, Tier::Basic);
    assert_eq!(user(1).quota, Some(quota));
    assert!(user(2).erased && user(2).erased_at.is_some());
    assert!(!user(3).erased && user(3).erased_at.is_none());
    assert_eq!(counts_of_history(&stored), counts_of_stats(&models));
    assert!(!stored.status_changes.is_empty());
    assert_eq!(
        stored.status_changes_all,
        UsersAndHistory::sum_over_users(&stored.status_changes)
    );
    // No personal data in the table: only these columns.
    let columns: Vec<String> = sqlx::query_scalar(
        "SELECT column_name::text FROM information_schema.columns WHERE table_name = 'users'
         AND table_schema = current_schema() ORDER BY ordinal_position",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        columns,
        [
            "user_id",
            "tier",
            "max_devices",
            "max_cpu_cores",
            "max_memory_mb",
            "registered_at",
            "erased",
            "erased_at",
            "updated_position"
        ]
    );

    // Live after the swap: the embedded projector maintains v2 incrementally.
    world.run(150).await;
    assert!(
        world
            .user_command(3, UserCommand::ChangeTier { tier: Tier::Basic })
            .await
    );
    assert!(world.user_command(4, UserCommand::Erase).await);
    world.run(50).await;
    project_to_head(&pool).await;
    let (models, expected) = reference(&pool).await;
    let stored = load_users_and_history(&pool).await.unwrap().expect("v2 is live");
    assert_eq!(stored, expected, "maintained incrementally after the swap");
    assert_fleet_v1_tables(&pool, &models).await;
    assert_eq!(counts_of_history(&stored), counts_of_stats(&models));
    assert!(stored.users[&world.user_id(4)].erased);

    // Version 2 again, folded whole in memory (no checkpoint): the same rows.
    replay_fleet(&pool, 2, ReplayConfig::default()).await;
    assert_eq!(load_users_and_history(&pool).await.unwrap(), Some(expected));
    // And back to version 1: its tables only.
    replay_fleet(&pool, 1, ReplayConfig::default()).await;
    assert_eq!(load_users_and_history(&pool).await.unwrap(), None);
    assert_fleet_v1_tables(&pool, &models).await;
}
