//! Monthly partitions: created ahead and on demand, concurrently, archived, and pruned.

use std::sync::Arc;

use chrono::{Duration, NaiveDate};
use event_log::partitions::{self, ArchiveError};
use event_log::{Clock, ExpectedVersion, StoreConfig};
use futures::TryStreamExt;
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

use crate::support::*;

async fn partition_names(pool: &PgPool) -> Vec<(String, bool)> {
    partitions::list_partitions(pool)
        .await
        .unwrap_or_default()
        .into_iter()
        .map(|p| (p.name, p.archived))
        .collect()
}

#[sqlx::test(migrations = false)]
async fn an_append_at_the_last_microsecond_of_a_month_never_lacks_a_partition(pool: PgPool) {
    let last_microsecond = utc(2031, 12, 31, 23, 59, 59) + Duration::microseconds(999_999);
    let clock = manual_clock(last_microsecond);
    // No months ahead: only December 2031 exists when the store opens.
    let config = StoreConfig {
        partitions_ahead: 0,
        ..StoreConfig::default()
    };
    let log = store_with(&pool, config, clock.clone()).await;
    assert!(
        !partition_names(&pool)
            .await
            .iter()
            .any(|(n, _)| n == "user_events_2032_01")
    );

    let (device, owner) = (Uuid::now_v7(), Uuid::now_v7());
    let december = log
        .append(starts(device, owner, ExpectedVersion::NoStream, 1))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(december.recorded_at, last_microsecond);

    clock.advance(Duration::microseconds(1));
    let january = log
        .append(starts(device, owner, ExpectedVersion::Exact(1), 1))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(january.recorded_at, utc(2032, 1, 1, 0, 0, 0));

    let names = partition_names(&pool).await;
    assert!(names.contains(&("user_events_2031_12".into(), false)), "{names:?}");
    assert!(names.contains(&("user_events_2032_01".into(), false)), "{names:?}");
    let in_january: i64 = sqlx::query_scalar("SELECT count(*) FROM user_events_2032_01")
        .fetch_one(&pool)
        .await
        .unwrap_or(0);
    assert_eq!(in_january, 1);
}

#[sqlx::test(migrations = false)]
async fn a_partition_dropped_behind_the_writers_back_is_recreated(pool: PgPool) {
    let clock = manual_clock(utc(2033, 5, 20, 12, 0, 0));
    let config = StoreConfig {
        partitions_ahead: 1,
        ..StoreConfig::default()
    };
    let log = store_with(&pool, config, clock.clone()).await;
    // The writer believes June exists; an operator drops it anyway.
    sqlx::query("DROP TABLE user_events_2033_06")
        .execute(&pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    clock.set(utc(2033, 6, 2, 0, 0, 0));
    let (device, owner) = (Uuid::now_v7(), Uuid::now_v7());
    let outcome = log
        .append(starts(device, owner, ExpectedVersion::NoStream, 2))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(outcome.last_position, 2);
    assert!(
        partition_names(&pool)
            .await
            .contains(&("user_events_2033_06".into(), false))
    );
}

#[sqlx::test(migrations = false)]
async fn concurrent_ensures_create_each_partition_once(pool: PgPool) {
    migrated(&pool).await;
    let at = utc(2040, 1, 15, 0, 0, 0);
    let calls: Vec<_> = (0..8)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move { partitions::ensure_partitions(&pool, at, 5).await })
        })
        .collect();
    let mut created = 0;
    for call in calls {
        created += call
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|e| panic!("{e}"));
    }
    assert_eq!(
        created, 6,
        "2040-01 and five months ahead, each created by exactly one caller"
    );
    let names = partition_names(&pool).await;
    for month in 1..=6 {
        let name = format!("user_events_2040_{month:02}");
        assert_eq!(names.iter().filter(|(n, _)| *n == name).count(), 1, "{name}");
    }
    // And again: nothing to do.
    assert_eq!(partitions::ensure_partitions(&pool, at, 5).await.unwrap_or(-1), 0);
}

#[sqlx::test(migrations = false)]
async fn migrating_twice_and_concurrently_is_harmless(pool: PgPool) {
    migrated(&pool).await;
    let runs: Vec<_> = (0..4)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move { event_log::migrate(&pool).await })
        })
        .collect();
    for run in runs {
        run.await
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let head: i64 = sqlx::query_scalar("SELECT count(*) FROM log_head")
        .fetch_one(&pool)
        .await
        .unwrap_or(0);
    assert_eq!(head, 1);
}

#[sqlx::test(migrations = false)]
async fn an_archived_month_is_still_read_and_still_verifies(pool: PgPool) {
    let (device, owner) = history_across_months(&pool).await;
    let january = NaiveDate::from_ymd_opt(2034, 1, 1).unwrap_or_default();

    let name = partitions::archive_partition(&pool, january)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(name, "user_events_2034_01");
    assert!(
        partition_names(&pool)
            .await
            .contains(&("user_events_2034_01".into(), true))
    );
    let live: i64 = sqlx::query_scalar("SELECT count(*) FROM user_events")
        .fetch_one(&pool)
        .await
        .unwrap_or(-1);
    assert_eq!(live, 2, "only March is live");

    let log = reader(&pool);
    let stream = log.read_stream(device, 0, 100).await.unwrap_or_default();
    assert_eq!(
        stream.iter().map(|e| e.stream_version).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5]
    );
    let all = log.read_all(0, 100).await.unwrap_or_default();
    assert_eq!(all.len(), 6);
    let owned: Vec<_> = log
        .read_owner(owner, utc(2034, 1, 1, 0, 0, 0), utc(2034, 4, 1, 0, 0, 0), 2)
        .try_collect()
        .await
        .unwrap_or_default();
    assert_eq!(owned.iter().map(|e| e.position).collect::<Vec<_>>(), [1, 2, 3, 4, 5, 6]);
    let report = log
        .verify_chain(1, None, 100, |_| {})
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((report.checked, report.broken), (6, None));

    // Archiving again is a no-op.
    assert_eq!(
        partitions::archive_partition(&pool, january).await.ok().as_deref(),
        Some("user_events_2034_01")
    );
}

#[sqlx::test(migrations = false)]
async fn an_open_or_missing_month_cannot_be_archived(pool: PgPool) {
    history_across_months(&pool).await;
    let march = NaiveDate::from_ymd_opt(2034, 3, 1).unwrap_or_default();
    let err = partitions::archive_partition(&pool, march).await;
    assert!(matches!(err, Err(ArchiveError::StillOpen(_))), "{err:?}");
    let long_ago = NaiveDate::from_ymd_opt(1999, 1, 1).unwrap_or_default();
    let err = partitions::archive_partition(&pool, long_ago).await;
    assert!(matches!(err, Err(ArchiveError::NoSuchPartition(_))), "{err:?}");
}

#[sqlx::test(migrations = false)]
async fn months_ahead_counts_consecutive_live_partitions(pool: PgPool) {
    let clock = manual_clock(utc(2035, 11, 3, 0, 0, 0));
    let _log = store_with(&pool, StoreConfig::default(), clock.clone()).await;
    let list = partitions::list_partitions(&pool).await.unwrap_or_default();
    assert_eq!(partitions::months_provisioned_ahead(&list, clock.now()), 3);
    assert_eq!(partitions::months_provisioned_ahead(&list, utc(2036, 2, 1, 0, 0, 0)), 0);
}

/// Names of the relations a plan scans (walks EXPLAIN's JSON), with their loop counts when
/// the plan was executed.
fn scanned(plan: &Value, out: &mut Vec<(String, Option<i64>)>) {
    match plan {
        Value::Object(node) => {
            if let Some(Value::String(relation)) = node.get("Relation Name") {
                out.push((relation.clone(), node.get("Actual Loops").and_then(Value::as_i64)));
            }
            node.values().for_each(|v| scanned(v, out));
        }
        Value::Array(items) => items.iter().for_each(|v| scanned(v, out)),
        _ => {}
    }
}

/// The proof of partition pruning the issue asks for, on the real queries' shapes.
#[sqlx::test(migrations = false)]
async fn partition_pruning_reads_only_the_months_it_needs(pool: PgPool) {
    let (device, owner) = history_across_months(&pool).await;
    partitions::archive_partition(&pool, NaiveDate::from_ymd_opt(2034, 1, 1).unwrap_or_default())
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    // Owner + time range (plan-time pruning): only March, although January (archived),
    // February, April.. exist.
    let plan: Value = sqlx::query_scalar(
        "EXPLAIN (FORMAT JSON) SELECT * FROM user_events_all
         WHERE owner_id = $1 AND recorded_at >= '2034-03-01T00:00:00Z' AND recorded_at < '2034-03-20T00:00:00Z'
         ORDER BY recorded_at, position",
    )
    .bind(owner)
    .fetch_one(&pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let mut relations = Vec::new();
    scanned(&plan, &mut relations);
    let names: Vec<&str> = relations.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["user_events_2034_03"], "{plan}");

    // Stream read (run-time pruning by the stream's created_at): months before the stream
    // existed are never executed. Move the stream's start to March to make that visible.
    sqlx::query("UPDATE streams SET created_at = '2034-03-01T00:00:00Z' WHERE stream_id = $1")
        .bind(device)
        .execute(&pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let plan: Value = sqlx::query_scalar(
        "EXPLAIN (ANALYZE, FORMAT JSON) SELECT * FROM user_events_all
         WHERE stream_id = $1 AND stream_version > 0
           AND recorded_at >= (SELECT created_at FROM streams WHERE stream_id = $1)
         ORDER BY stream_version",
    )
    .bind(device)
    .fetch_one(&pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let mut relations = Vec::new();
    scanned(&plan, &mut relations);
    let executed: Vec<&str> = relations
        .iter()
        .filter(|(n, loops)| n.starts_with("user_events_2") && loops.unwrap_or(0) > 0)
        .map(|(n, _)| n.as_str())
        .collect();
    assert!(
        !executed.contains(&"user_events_2034_01"),
        "January was scanned: {plan}"
    );
    assert!(executed.contains(&"user_events_2034_03"), "{plan}");
}

#[sqlx::test(migrations = false)]
async fn reading_an_owner_streams_every_event_in_order_across_pages(pool: PgPool) {
    let clock = manual_clock(utc(2036, 1, 29, 0, 0, 0));
    let log = Arc::new(store_with(&pool, StoreConfig::default(), clock.clone()).await);
    let (owner, other) = (Uuid::now_v7(), Uuid::now_v7());
    let mut expected = Vec::new();
    for day in 0..6 {
        clock.advance(Duration::days(1));
        for who in [owner, other] {
            let outcome = log
                .append(starts(Uuid::now_v7(), who, ExpectedVersion::NoStream, 5))
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            if who == owner && day > 0 && day < 5 {
                expected.extend(outcome.first_position..=outcome.last_position);
            }
        }
    }
    // Days 1..=4 are Jan 31 .. Feb 3: the range crosses a month boundary.
    let from = utc(2036, 1, 31, 0, 0, 0);
    let to = utc(2036, 2, 4, 0, 0, 0);
    let got: Vec<i64> = reader(&pool)
        .read_owner(owner, from, to, 3)
        .map_ok(|e| e.position)
        .try_collect()
        .await
        .unwrap_or_default();
    assert_eq!(got, expected);
}
