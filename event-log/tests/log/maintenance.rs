//! Partition maintenance: months ahead created, months past the retention archived (and
//! still read), repeated passes harmless, a dropped month recreated, and the loop that runs
//! it survives failures and stops when told.

use std::time::Duration;

use chrono::{Datelike, Months, Utc};
use event_log::partitions::{self, MaintenanceTotals, PartitionPolicy, maintain, run_partition_maintenance};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::support::*;

fn policy(months_ahead: u32, retention_months: Option<u32>) -> PartitionPolicy {
    PartitionPolicy {
        months_ahead,
        retention_months,
    }
}

async fn live(pool: &PgPool, name: &str) -> Option<bool> {
    partitions::list_partitions(pool)
        .await
        .unwrap_or_default()
        .into_iter()
        .find(|p| p.name == name)
        .map(|p| !p.archived)
}

#[sqlx::test(migrations = false)]
async fn maintenance_creates_the_months_ahead_and_a_second_pass_does_nothing(pool: PgPool) {
    migrated(&pool).await;
    let now = utc(2041, 3, 15, 9, 30, 0);
    let first = maintain(&pool, now, &policy(4, None))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(first.created, 5, "March 2041 and four months after it: {first:?}");
    assert_eq!(first.months_ahead, 4);
    assert!(first.archived.is_empty() && first.still_open.is_empty());
    for month in 3..=7 {
        let name = format!("user_events_2041_{month:02}");
        assert_eq!(live(&pool, &name).await, Some(true), "{name}");
    }
    assert_eq!(live(&pool, "user_events_2041_08").await, None);

    let second = maintain(&pool, now, &policy(4, None))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(second.created, 0);
    assert_eq!(
        (second.months_ahead, second.live_partitions, second.archived_partitions),
        (first.months_ahead, first.live_partitions, first.archived_partitions)
    );
}

#[sqlx::test(migrations = false)]
async fn months_past_the_retention_move_to_the_archive_and_are_still_read(pool: PgPool) {
    let (device, _) = history_across_months(&pool).await;
    // May 10th with two months' retention: January (ended Feb 1st) and February (ended
    // March 1st) are due; March (ended April 1st) is not.
    let now = utc(2034, 5, 10, 0, 0, 0);
    let report = maintain(&pool, now, &policy(1, Some(2)))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        report.archived.contains(&"user_events_2034_01".to_owned())
            && report.archived.contains(&"user_events_2034_02".to_owned()),
        "{report:?}"
    );
    assert!(
        !report.archived.contains(&"user_events_2034_03".to_owned()),
        "{report:?}"
    );
    assert!(report.still_open.is_empty(), "{report:?}");
    assert_eq!(live(&pool, "user_events_2034_01").await, Some(false));
    assert_eq!(live(&pool, "user_events_2034_02").await, Some(false));
    assert_eq!(live(&pool, "user_events_2034_03").await, Some(true));
    assert_eq!(report.months_ahead, 1, "June was created: {report:?}");
    assert_eq!(report.archived_partitions, report.archived.len());

    // January's events are no longer in the live table, and still read everywhere.
    let in_live: i64 = sqlx::query_scalar("SELECT count(*) FROM user_events")
        .fetch_one(&pool)
        .await
        .unwrap_or(-1);
    assert_eq!(in_live, 2, "only March is live");
    assert_eq!(count_events(&pool).await, 6, "user_events_all still has everything");
    let stream = reader(&pool).read_stream(device, 0, 100).await.unwrap_or_default();
    assert_eq!(
        stream.iter().map(|e| e.stream_version).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5]
    );

    // Again: nothing left to do.
    let again = maintain(&pool, now, &policy(1, Some(2)))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((again.created, again.archived.len()), (0, 0), "{again:?}");
    assert_eq!(again.archived_partitions, report.archived_partitions);
}

#[sqlx::test(migrations = false)]
async fn a_month_the_log_has_not_moved_past_stays_live_whatever_the_retention(pool: PgPool) {
    history_across_months(&pool).await;
    // No retention at all, on May 10th: March and April ended, but the log's last event is
    // of March 5th, so an append could still land in them.
    let report = maintain(&pool, utc(2034, 5, 10, 0, 0, 0), &policy(1, Some(0)))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        report.archived.contains(&"user_events_2034_01".to_owned()),
        "{report:?}"
    );
    assert!(
        report.still_open.contains(&"user_events_2034_03".to_owned())
            && report.still_open.contains(&"user_events_2034_04".to_owned()),
        "{report:?}"
    );
    assert_eq!(live(&pool, "user_events_2034_03").await, Some(true));
    assert_eq!(
        live(&pool, "user_events_2034_05").await,
        Some(true),
        "the current month"
    );
}

#[sqlx::test(migrations = false)]
async fn a_dropped_future_partition_is_recreated_by_the_next_pass(pool: PgPool) {
    migrated(&pool).await;
    let now = utc(2042, 6, 15, 0, 0, 0);
    maintain(&pool, now, &policy(3, None))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // An operator detaches and drops an (empty) month ahead.
    sqlx::raw_sql("ALTER TABLE user_events DETACH PARTITION user_events_2042_08; DROP TABLE user_events_2042_08")
        .execute(&pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let list = partitions::list_partitions(&pool).await.unwrap_or_default();
    assert_eq!(partitions::months_provisioned_ahead(&list, now), 1);

    let report = maintain(&pool, now, &policy(3, None))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((report.created, report.months_ahead), (1, 3), "{report:?}");
    assert_eq!(live(&pool, "user_events_2042_08").await, Some(true));
}

/// The name of the partition `months` months after the current one. Read before the loop
/// under test starts: its passes read the clock later, so they provision at least this month
/// even when a month begins in between.
fn months_from_now(months: u32) -> String {
    let month = Utc::now()
        .date_naive()
        .with_day(1)
        .and_then(|first| first.checked_add_months(Months::new(months)))
        .unwrap_or_else(|| panic!("date out of range"));
    format!("user_events_{}", month.format("%Y_%m"))
}

/// The loop's passes of one outcome ("ok" or "error"), as its metrics count them.
fn passes(metrics: &metrics_exporter_prometheus::PrometheusHandle, outcome: &str) -> u64 {
    let series = format!(r#"cloudphone_partition_maintenance_runs_total{{outcome="{outcome}"}} "#);
    metrics
        .render()
        .lines()
        .find_map(|line| line.strip_prefix(series.as_str()))
        .and_then(|count| count.trim().parse().ok())
        .unwrap_or(0)
}

fn metrics_of_this_test() -> metrics_exporter_prometheus::PrometheusHandle {
    // nextest runs each test in a process of its own, so this recorder is this test's.
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .unwrap_or_else(|e| panic!("{e}"))
}

#[sqlx::test(migrations = false)]
async fn the_maintenance_loop_outlives_a_failing_pass_and_stops_when_cancelled(pool: PgPool) {
    // The loop's passes are seen through its metrics.
    let metrics = metrics_of_this_test();
    let seventh = months_from_now(7);
    // Not migrated yet: every pass fails (the partition functions do not exist).
    let stop = CancellationToken::new();
    let running = tokio::spawn(run_partition_maintenance(
        pool.clone(),
        policy(7, None),
        Duration::from_millis(50),
        stop.clone(),
    ));
    eventually("three failed passes", Duration::from_secs(20), || async {
        passes(&metrics, "error") >= 3
    })
    .await;
    assert!(!running.is_finished(), "a failed pass stopped the loop");
    // Migrating creates three months ahead; a later pass of the loop creates the seventh.
    migrated(&pool).await;
    // A pass that overlaps the migration may create the seventh month and still fail (what
    // it reads next is not migrated yet): wait for a pass that succeeded, too.
    eventually("a successful pass", Duration::from_secs(20), || async {
        live(&pool, &seventh).await == Some(true) && passes(&metrics, "ok") >= 1
    })
    .await;

    stop.cancel();
    let totals = tokio::time::timeout(Duration::from_secs(10), running)
        .await
        .unwrap_or_else(|_| panic!("the loop did not stop"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(totals.failures >= 1, "{totals:?}");
    assert!(totals.runs > totals.failures, "{totals:?}");
}

#[sqlx::test(migrations = false)]
async fn the_maintenance_loop_runs_at_start_and_stops_while_waiting(pool: PgPool) {
    let metrics = metrics_of_this_test();
    migrated(&pool).await;
    let ninth = months_from_now(9);
    let stop = CancellationToken::new();
    let running = tokio::spawn(run_partition_maintenance(
        pool.clone(),
        policy(9, None),
        Duration::from_secs(3600),
        stop.clone(),
    ));
    // The pass is counted when it has finished (it lists the partitions after creating them);
    // then the loop waits its hour, and the cancel must end that wait.
    eventually("the first pass", Duration::from_secs(20), || async {
        passes(&metrics, "ok") == 1
    })
    .await;
    assert_eq!(
        live(&pool, &ninth).await,
        Some(true),
        "the first pass did not create {ninth}"
    );
    stop.cancel();
    let totals = tokio::time::timeout(Duration::from_secs(10), running)
        .await
        .unwrap_or_else(|_| panic!("the loop did not stop within its hour-long wait"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(totals, MaintenanceTotals { runs: 1, failures: 0 });
}

#[sqlx::test(migrations = false)]
async fn instances_maintaining_at_once_archive_each_month_once(pool: PgPool) {
    history_across_months(&pool).await;
    let now = utc(2034, 5, 10, 0, 0, 0);
    let passes: Vec<_> = (0..4)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move { maintain(&pool, now, &policy(2, Some(2))).await })
        })
        .collect();
    let mut archived = Vec::new();
    for pass in passes {
        let report = pass
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|e| panic!("{e}"));
        archived.extend(report.archived);
    }
    archived.sort();
    let once = {
        let mut once = archived.clone();
        once.dedup();
        once
    };
    assert_eq!(archived, once, "a month archived twice");
    // (`migrate` also made this year's months, which 2034 archives as well.)
    assert!(
        archived.ends_with(&["user_events_2034_01".to_owned(), "user_events_2034_02".to_owned()]),
        "{archived:?}"
    );
    assert_eq!(live(&pool, "user_events_2034_01").await, Some(false));
}
