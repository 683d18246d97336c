//! How a tail batches what it returns: commits that arrive within its `min_batch_interval`
//! of the last batch come back as one batch, and a full batch (catching up) waits for nothing.

use std::time::{Duration, Instant};

use event_log::{ExpectedVersion, LogTail, TailConfig};
use sqlx::PgPool;
use uuid::Uuid;

use crate::support::*;

/// Longest any single wait of these tests may take before they fail.
const LIMIT: Duration = Duration::from_secs(20);

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
    let third = tokio::time::timeout(LIMIT, next)
        .await
        .unwrap_or_else(|_| panic!("the commit after the interval was never returned"))
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(third.iter().map(|e| e.position).collect::<Vec<_>>(), [6]);
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
