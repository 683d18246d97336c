//! The log is append-only in the database (event-log/migrations/0005_append_only_log.sql):
//! UPDATE, DELETE and TRUNCATE of stored events are refused through the parents and on each
//! partition, live or archived, while appends go on. The tests connect as a superuser, so the
//! refusals hold even for one; only a deliberate bypass gets through, and the chain shows it.

use std::sync::Arc;

use event_log::{EventStore, ExpectedVersion, ManualClock, StoreConfig, partitions};
use sqlx::PgPool;
use sqlx::postgres::PgQueryResult;
use uuid::Uuid;

use crate::support::*;

/// The month every event of `may_log` lands in.
const MAY: &str = "user_events_2037_05";

/// Asserts that `result` is the append-only refusal of `op` on `table`.
fn assert_refused(result: Result<PgQueryResult, sqlx::Error>, op: &str, table: &str) {
    match result {
        Err(sqlx::Error::Database(db)) => {
            assert_eq!(db.code().as_deref(), Some("42501"), "{op} on {table}: {db}");
            assert_eq!(
                db.message(),
                format!("user_events is append-only: {op} refused on {table}")
            );
        }
        other => panic!("{op} on {table} was not refused: {other:?}"),
    }
}

async fn run(pool: &PgPool, statement: &'static str) -> Result<PgQueryResult, sqlx::Error> {
    sqlx::query(statement).execute(pool).await
}

/// Ten events in May 2037: a device created with its owner's quota, then started 8 times.
async fn may_log(pool: &PgPool) -> (EventStore, Uuid, Uuid) {
    let log = store_with(pool, StoreConfig::default(), manual_clock(utc(2037, 5, 10, 8, 0, 0))).await;
    let (device, owner) = (Uuid::now_v7(), Uuid::now_v7());
    log.append(create_device(device, owner))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    log.append(starts(device, owner, ExpectedVersion::Exact(1), 8))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    (log, device, owner)
}

/// All `events` are still there and the whole chain verifies.
async fn assert_intact(pool: &PgPool, events: i64) {
    assert_eq!(count_events(pool).await, events);
    let report = reader(pool)
        .verify_chain(1, None, 100, |_| {})
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (report.checked, report.last_position, report.broken),
        (u64::try_from(events).unwrap_or_default(), events, None)
    );
}

#[sqlx::test(migrations = false)]
async fn update_and_delete_through_user_events_are_refused(pool: PgPool) {
    let (log, device, owner) = may_log(&pool).await;

    // The row triggers fire on the partition holding the row, which the message names.
    assert_refused(
        run(&pool, "UPDATE user_events SET payload = '{}' WHERE position = 3").await,
        "UPDATE",
        MAY,
    );
    // Moving a row to another month is an UPDATE too.
    assert_refused(
        run(
            &pool,
            "UPDATE user_events SET recorded_at = '2037-06-02T00:00:00Z' WHERE position = 3",
        )
        .await,
        "UPDATE",
        MAY,
    );
    assert_refused(
        run(&pool, "DELETE FROM user_events WHERE position = 5").await,
        "DELETE",
        MAY,
    );
    assert_refused(run(&pool, "DELETE FROM user_events").await, "DELETE", MAY);
    assert_intact(&pool, 10).await;

    // Appending goes on as before.
    let outcome = log
        .append(starts(device, owner, ExpectedVersion::Exact(9), 1))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(outcome.last_position, 11);
    assert_intact(&pool, 11).await;
}

#[sqlx::test(migrations = false)]
async fn update_and_delete_naming_a_partition_are_refused(pool: PgPool) {
    may_log(&pool).await;
    assert_refused(
        run(
            &pool,
            "UPDATE user_events_2037_05 SET hash = sha256(hash) WHERE position = 2",
        )
        .await,
        "UPDATE",
        MAY,
    );
    assert_refused(
        run(&pool, "DELETE FROM user_events_2037_05 WHERE position = 10").await,
        "DELETE",
        MAY,
    );
    assert_intact(&pool, 10).await;
}

#[sqlx::test(migrations = false)]
async fn truncate_of_the_log_or_of_any_partition_is_refused(pool: PgPool) {
    may_log(&pool).await;
    // The parent's own statement trigger fires first (its partitions' would refuse it too).
    assert_refused(run(&pool, "TRUNCATE user_events").await, "TRUNCATE", "user_events");
    // A TRUNCATE naming a partition does not fire the parent's trigger: each has its own.
    assert_refused(run(&pool, "TRUNCATE user_events_2037_05").await, "TRUNCATE", MAY);
    assert_refused(
        run(&pool, "TRUNCATE user_events_2037_06").await,
        "TRUNCATE",
        "user_events_2037_06",
    );
    assert_refused(
        run(&pool, "TRUNCATE user_events_archive").await,
        "TRUNCATE",
        "user_events_archive",
    );
    // A partition created later gets its trigger from ensure_user_event_partitions.
    let created = partitions::ensure_partitions(&pool, utc(2040, 1, 15, 0, 0, 0), 0)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(created, 1);
    assert_refused(
        run(&pool, "TRUNCATE user_events_2040_01").await,
        "TRUNCATE",
        "user_events_2040_01",
    );
    assert_intact(&pool, 10).await;
}

/// January and March 2034 (4 + 2 events), January moved to the archive.
async fn january_archived(pool: &PgPool) -> (EventStore, Arc<ManualClock>, Uuid, Uuid) {
    let (log, clock, device, owner) = log_across_months(pool).await;
    let january = chrono::NaiveDate::from_ymd_opt(2034, 1, 1).unwrap_or_default();
    let name = partitions::archive_partition(pool, january)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(name, "user_events_2034_01");
    let archived: i64 = sqlx::query_scalar("SELECT count(*) FROM user_events_archive")
        .fetch_one(pool)
        .await
        .unwrap_or(-1);
    assert_eq!(archived, 4);
    (log, clock, device, owner)
}

#[sqlx::test(migrations = false)]
async fn an_archived_month_stays_append_only(pool: PgPool) {
    let (log, _clock, device, owner) = january_archived(&pool).await;
    let january = "user_events_2034_01";

    // The DETACH dropped the row trigger cloned from user_events; the archive's clone refuses.
    assert_refused(
        run(
            &pool,
            "UPDATE user_events_2034_01 SET payload = '{}' WHERE position = 2",
        )
        .await,
        "UPDATE",
        january,
    );
    assert_refused(
        run(&pool, "DELETE FROM user_events_2034_01 WHERE position = 4").await,
        "DELETE",
        january,
    );
    assert_refused(
        run(
            &pool,
            "UPDATE user_events_archive SET hash = sha256(hash) WHERE position = 1",
        )
        .await,
        "UPDATE",
        january,
    );
    assert_refused(run(&pool, "DELETE FROM user_events_archive").await, "DELETE", january);
    assert_refused(run(&pool, "TRUNCATE user_events_2034_01").await, "TRUNCATE", january);
    assert_refused(
        run(&pool, "TRUNCATE user_events_archive").await,
        "TRUNCATE",
        "user_events_archive",
    );
    assert_intact(&pool, 6).await;

    let outcome = log
        .append(starts(device, owner, ExpectedVersion::Exact(5), 1))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(outcome.last_position, 7);
    assert_intact(&pool, 7).await;
}

/// A row for `INSERT INTO <table> SELECT ...` (the chain does not matter here).
const ROW: &str = "SELECT 1, gen_random_uuid(), gen_random_uuid(), 'device', 1, 'DeviceStarted', 1,
    gen_random_uuid(), ts, ts, '{}', '{}', sha256(''), sha256('')";

#[sqlx::test(migrations = false)]
async fn partitions_made_before_the_migration_are_covered_by_it(pool: PgPool) {
    // A database at migration 0004, with an archived and a live month made the way
    // ensure_user_event_partitions did before it (no TRUNCATE trigger), holding a row each.
    sqlx::raw_sql(event_log::PARTITIONS_SQL)
        .execute(&pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    event_log::migrator()
        .run_to(4, &pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let setup = format!(
        "CREATE TABLE user_events_2030_01 (LIKE user_events INCLUDING DEFAULTS INCLUDING CONSTRAINTS);
         ALTER TABLE user_events_archive ATTACH PARTITION user_events_2030_01
             FOR VALUES FROM ('2030-01-01T00:00:00Z') TO ('2030-02-01T00:00:00Z');
         CREATE TABLE user_events_2030_02 (LIKE user_events INCLUDING DEFAULTS INCLUDING CONSTRAINTS);
         ALTER TABLE user_events ATTACH PARTITION user_events_2030_02
             FOR VALUES FROM ('2030-02-01T00:00:00Z') TO ('2030-03-01T00:00:00Z');
         TRUNCATE user_events_2030_01, user_events_2030_02; -- unprotected so far
         INSERT INTO user_events_archive {ROW} FROM (SELECT timestamptz '2030-01-10T00:00:00Z' AS ts) t;
         INSERT INTO user_events {ROW} FROM (SELECT timestamptz '2030-02-10T00:00:00Z' AS ts) t;"
    );
    sqlx::raw_sql(sqlx::AssertSqlSafe(setup))
        .execute(&pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // Unprotected so far.
    for statement in [
        "UPDATE user_events_2030_01 SET payload = '{\"before\": 1}'",
        "UPDATE user_events SET payload = '{\"before\": 2}'",
    ] {
        assert_eq!(
            run(&pool, statement).await.map(|done| done.rows_affected()).ok(),
            Some(1)
        );
    }

    migrated(&pool).await;

    let january = "user_events_2030_01";
    assert_refused(
        run(&pool, "UPDATE user_events_2030_01 SET payload = '{}'").await,
        "UPDATE",
        january,
    );
    assert_refused(run(&pool, "DELETE FROM user_events_2030_01").await, "DELETE", january);
    assert_refused(run(&pool, "TRUNCATE user_events_2030_01").await, "TRUNCATE", january);
    let february = "user_events_2030_02";
    assert_refused(
        run(&pool, "UPDATE user_events_2030_02 SET payload = '{}'").await,
        "UPDATE",
        february,
    );
    assert_refused(run(&pool, "DELETE FROM user_events").await, "DELETE", february);
    assert_refused(run(&pool, "TRUNCATE user_events_2030_02").await, "TRUNCATE", february);
    assert_eq!(count_events(&pool).await, 2);
}

#[sqlx::test(migrations = false)]
async fn a_superuser_can_still_bypass_on_purpose_and_the_chain_shows_it(pool: PgPool) {
    may_log(&pool).await;
    let mut conn = pool.acquire().await.unwrap_or_else(|e| panic!("{e}"));
    let changed = tamper(
        &mut *conn,
        "UPDATE user_events SET payload = jsonb_set(payload, '{started_at}', '\"2001-01-01T00:00:00Z\"') WHERE position = 4",
    )
    .await;
    assert_eq!(changed, 1);
    assert_eq!(
        tamper(&mut *conn, "DELETE FROM user_events WHERE position = 8").await,
        1
    );
    assert_eq!(count_events(&pool).await, 9);

    // The bypass ended with its transaction: the same session is refused again.
    let role: String = sqlx::query_scalar("SELECT current_setting('session_replication_role')")
        .fetch_one(&mut *conn)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(role, "origin");
    assert_refused(
        sqlx::query("DELETE FROM user_events WHERE position = 9")
            .execute(&mut *conn)
            .await,
        "DELETE",
        MAY,
    );

    let report = reader(&pool)
        .verify_chain(1, None, 100, |_| {})
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(report.broken.as_ref().map(|b| b.position()), Some(4), "{report:?}");
    assert_eq!(report.last_position, 3);
}
