//! How a tail batches what it returns: commits that arrive within its `min_batch_interval`
//! of the last batch come back as one batch, and a full batch (catching up) waits for nothing.

use std::time::{Duration, Instant};

use event_log::{ExpectedVersion, LogReader, LogTail, ReadError, TailConfig, tail_session_options};
use event_schema::EventEnvelope;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::support::*;

/// Longest any single wait of these tests may take before they fail.
const LIMIT: Duration = Duration::from_secs(20);

/// The positions of the batch a spawned `next_batch` returns within [`LIMIT`]; `what` says in
/// the failure which events never came back.
async fn positions_within(next: JoinHandle<Result<Vec<EventEnvelope>, ReadError>>, what: &str) -> Vec<i64> {
    tokio::time::timeout(LIMIT, next)
        .await
        .unwrap_or_else(|_| panic!("{what} was never returned"))
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|e| panic!("{e}"))
        .iter()
        .map(|e| e.position)
        .collect()
}

#[sqlx::test(migrations = false)]
async fn commits_within_the_min_batch_interval_come_back_as_one_batch_no_sooner(pool: PgPool) {
    let log = store(&pool).await;
    let interval = Duration::from_millis(300);
    // Polls far apart: only notifications and the interval move this tail.
    let mut tail = LogTail::start(
        reader(&pool),
        0,
        TailConfig {
            batch_size: 100,
            poll_interval: Duration::from_secs(300),
            listen: true,
            min_batch_interval: interval,
        },
    )
    .await;
    log.append(starts(Uuid::now_v7(), Uuid::now_v7(), ExpectedVersion::NoStream, 1))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let before_first = Instant::now();
    let first = tokio::time::timeout(LIMIT, tail.next_batch())
        .await
        .unwrap_or_else(|_| panic!("the first batch never came"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(first.len(), 1);

    // Four commits, each with its notification, all committed before the tail is asked.
    for _ in 0..4 {
        log.append(starts(Uuid::now_v7(), Uuid::now_v7(), ExpectedVersion::NoStream, 1))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let second = tokio::time::timeout(LIMIT, tail.next_batch())
        .await
        .unwrap_or_else(|_| panic!("the second batch never came"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        before_first.elapsed() >= interval,
        "the second batch came {:?} after the first was asked for, within the interval {interval:?}",
        before_first.elapsed()
    );
    assert_eq!(second.iter().map(|e| e.position).collect::<Vec<_>>(), [2, 3, 4, 5]);

    // Reading the notifications while it waits loses no wake-up: a commit made while the
    // next call waits comes back (the poll interval is 300 s).
    let next = tokio::spawn(async move { tail.next_batch().await });
    log.append(starts(Uuid::now_v7(), Uuid::now_v7(), ExpectedVersion::NoStream, 1))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let third = positions_within(next, "the commit after the interval").await;
    assert_eq!(third, [6]);
}

#[sqlx::test(migrations = false)]
async fn a_full_batch_waits_for_no_interval(pool: PgPool) {
    let log = store(&pool).await;
    log.append(starts(Uuid::now_v7(), Uuid::now_v7(), ExpectedVersion::NoStream, 5))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // An interval longer than the test's limit: any wait for it fails the test.
    let mut tail = LogTail::start(
        reader(&pool),
        0,
        TailConfig {
            batch_size: 2,
            poll_interval: Duration::from_millis(50),
            listen: true,
            min_batch_interval: Duration::from_secs(600),
        },
    )
    .await;
    let mut sizes = Vec::new();
    for _ in 0..3 {
        let batch = tokio::time::timeout(LIMIT, tail.next_batch())
            .await
            .unwrap_or_else(|_| panic!("a batch after a full one waited; sizes so far {sizes:?}"))
            .unwrap_or_else(|e| panic!("{e}"));
        sizes.push(batch.len());
    }
    assert_eq!(
        sizes,
        [2, 2, 1],
        "catching up, the tail returns full batches back to back"
    );
}

/// A listening tail reads on a session of its own, which plans the read once
/// (`tail_session_options`). On a log of several months PostgreSQL plans the read afresh at
/// every call otherwise: a plan made for the floor, with the months before it pruned, always
/// looks cheaper than the generic plan, which prunes them as it runs.
#[sqlx::test(migrations = false)]
async fn a_tail_session_plans_the_read_once_where_a_plain_one_plans_it_every_time(pool: PgPool) {
    let log = store(&pool).await;
    let now = chrono::Utc::now();
    event_log::partitions::ensure_partitions(&pool, now - chrono::Duration::days(200), 7)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    log.append(starts(Uuid::now_v7(), Uuid::now_v7(), ExpectedVersion::NoStream, 3))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let floor = reader(&pool).head().await.unwrap_or_else(|e| panic!("{e}")).recorded_at;

    // (generic, custom) plans of the read on one session after ten reads.
    let plans = |options: PgConnectOptions| async move {
        let session = PgPoolOptions::new()
            .max_connections(1)
            .connect_with(options)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let reader = LogReader::new(session.clone());
        for _ in 0..10 {
            let events = reader
                .read_all_since(1, floor, 100)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(events.iter().map(|e| e.position).collect::<Vec<_>>(), [2, 3]);
        }
        let (generic, custom): (i64, i64) = sqlx::query_as(
            "SELECT generic_plans, custom_plans FROM pg_prepared_statements
             WHERE statement LIKE '%WHERE position > $1 AND recorded_at >= $2%'",
        )
        .fetch_one(&session)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        (generic, custom)
    };
    let plain = plans((*pool.connect_options()).clone()).await;
    assert!(
        plain.1 >= 5,
        "a plain session planned the read {} times in 10 (generic {}): the premise of the tail's session no longer holds",
        plain.1,
        plain.0
    );
    let tail = plans(tail_session_options(&pool.connect_options())).await;
    assert_eq!(tail, (10, 0), "a tail's session must plan the read once, generically");

    // A listening tail still returns every event once, in order, reading on that session.
    let mut tail = LogTail::start(reader(&pool), 0, TailConfig::default()).await;
    let first = tail.poll().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(first.iter().map(|e| e.position).collect::<Vec<_>>(), [1, 2, 3]);
    assert!(tail.poll().await.unwrap_or_else(|e| panic!("{e}")).is_empty());
}

/// A tail whose session is terminated between two reads reads through the pool meanwhile,
/// loses nothing, and listens again on a new session.
#[sqlx::test(migrations = false)]
async fn a_tail_whose_session_is_terminated_reads_through_the_pool_then_listens_again(pool: PgPool) {
    let log = store(&pool).await;
    let append = || async {
        log.append(starts(Uuid::now_v7(), Uuid::now_v7(), ExpectedVersion::NoStream, 1))
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    };
    append().await;
    // Polls far apart: after the read through the pool, only a new LISTEN brings the third.
    let mut tail = LogTail::start(
        reader(&pool),
        0,
        TailConfig {
            poll_interval: Duration::from_secs(300),
            ..TailConfig::default()
        },
    )
    .await;
    let first = tail.poll().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(first.iter().map(|e| e.position).collect::<Vec<_>>(), [1]);

    // The session that listens and made that read is terminated, as an operator would.
    let session: i32 = sqlx::query_scalar(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()
         AND query LIKE '%WHERE position > $1 AND recorded_at >= $2%'",
    )
    .fetch_one(&pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let terminated: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1, 10000)")
        .bind(session)
        .fetch_one(&pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(terminated, "the tail's session {session} did not exit");
    append().await;
    let second = tail.poll().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(second.iter().map(|e| e.position).collect::<Vec<_>>(), [2]);

    // The next wait listens on a new session; once it does, a commit wakes it.
    let next = tokio::spawn(async move { tail.next_batch().await });
    let deadline = Instant::now() + LIMIT;
    loop {
        let listening: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()
             AND pid <> $1 AND query LIKE 'LISTEN%'",
        )
        .bind(session)
        .fetch_one(&pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        if listening > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the tail never listened again");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    append().await;
    let third = positions_within(next, "the commit after the new LISTEN").await;
    assert_eq!(third, [3]);
}
