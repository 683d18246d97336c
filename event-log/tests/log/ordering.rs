//! The hard guarantee: a reader tailing by position sees every committed event exactly once,
//! in order, while many writers (several stores, as several processes would be, and the
//! unbatched path) commit concurrently and some transactions abort.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use event_log::{AppendError, ExpectedVersion, LogTail, StoreConfig, TailConfig};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use uuid::Uuid;

use crate::support::*;

const WRITERS: usize = 32;
const APPENDS_PER_WRITER: usize = 60;

#[sqlx::test(migrations = false)]
async fn a_reader_never_skips_a_late_commit(_: PgPoolOptions, connect: sqlx::postgres::PgConnectOptions) {
    let pool = PgPoolOptions::new()
        .max_connections(24)
        .connect_with(connect)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    migrated(&pool).await;
    // Four stores: four independent writers competing for the log head like four processes.
    let mut stores = Vec::new();
    for _ in 0..4 {
        stores.push(Arc::new(
            store_with(&pool, StoreConfig::default(), Arc::new(event_log::SystemClock)).await,
        ));
    }

    // The reader starts before the writers and follows with LISTEN + polling.
    let tail_reader = reader(&pool);
    let mut tail = LogTail::start(
        tail_reader,
        0,
        TailConfig {
            batch_size: 97,
            poll_interval: Duration::from_millis(50),
            listen: true,
            ..TailConfig::default()
        },
    )
    .await;

    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let store = stores[w % stores.len()].clone();
        writers.push(tokio::spawn(async move {
            let owner = Uuid::now_v7();
            let device = Uuid::now_v7();
            let mut committed = Vec::new();
            let mut version = 0i64;
            for i in 0..APPENDS_PER_WRITER {
                // Every seventh append claims a wrong version: its transaction share aborts.
                let expected = if i % 7 == 3 {
                    ExpectedVersion::Exact(version + 10)
                } else {
                    ExpectedVersion::Exact(version)
                };
                let batch = starts(device, owner, expected, 1 + i % 3);
                let result = if w % 4 == 0 {
                    store.append_unbatched(batch).await
                } else {
                    store.append(batch).await
                };
                match result {
                    Ok(outcome) => {
                        version = outcome.streams[0].version;
                        committed.extend(outcome.first_position..=outcome.last_position);
                    }
                    Err(AppendError::WrongExpectedVersion { .. }) => {}
                    Err(other) => panic!("writer {w}: {other}"),
                }
            }
            committed
        }));
    }

    // Meanwhile, transactions that take the head lock and roll back, as a crashed writer would.
    let aborter_pool = pool.clone();
    let aborter = tokio::spawn(async move {
        for _ in 0..20 {
            let mut tx = aborter_pool.begin().await.unwrap_or_else(|e| panic!("{e}"));
            sqlx::query("SELECT position FROM log_head FOR UPDATE")
                .execute(&mut *tx)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            tokio::task::yield_now().await;
            tx.rollback().await.unwrap_or_else(|e| panic!("{e}"));
        }
    });

    let mut committed = BTreeSet::new();
    for writer in writers {
        for position in writer.await.unwrap_or_else(|e| panic!("{e}")) {
            assert!(committed.insert(position), "position {position} given to two appends");
        }
    }
    aborter.await.unwrap_or_else(|e| panic!("{e}"));
    let head = reader(&pool).head().await.unwrap_or_else(|e| panic!("{e}")).position;

    // Everything committed is exactly 1..=head: positions are dense, aborts leave no holes.
    assert_eq!(committed.len() as i64, head);
    assert_eq!(committed.iter().next_back().copied(), Some(head));

    let mut seen = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), async {
        while tail.position() < head {
            let batch = tail.next_batch().await.unwrap_or_else(|e| panic!("tail: {e}"));
            seen.extend(batch.iter().map(|e| e.position));
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the tail stalled at {} of {head}", tail.position()));
    let expected: Vec<i64> = (1..=head).collect();
    assert_eq!(seen, expected, "the tail saw every position exactly once, in order");

    let report = reader(&pool)
        .verify_chain(1, None, 500, |_| {})
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(report.broken, None);
    assert_eq!(report.checked as i64, head);
}

#[sqlx::test(migrations = false)]
async fn appends_queued_while_the_writer_waits_for_the_head_join_its_group_and_a_conflict_fails_only_its_caller(
    pool: PgPool,
) {
    let log = Arc::new(store(&pool).await);
    let owner = Uuid::now_v7();
    let (blocker_device, a, b) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());

    // Hold the head lock so the writer's next group stalls inside its transaction.
    let mut holder = pool.begin().await.unwrap_or_else(|e| panic!("{e}"));
    sqlx::query("SELECT position FROM log_head FOR UPDATE")
        .execute(&mut *holder)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let first = tokio::spawn({
        let log = log.clone();
        async move {
            log.append(starts(blocker_device, owner, ExpectedVersion::NoStream, 1))
                .await
        }
    });
    eventually(
        "the writer to wait for the head lock",
        Duration::from_secs(10),
        || async { lock_waiters(&pool).await >= 1 },
    )
    .await;

    // These queue up while the writer waits for the head, and must join the group it is
    // waiting for: two good appends and, between them, one that conflicts with the first good
    // one. (A writer that gathered its group before locking the head committed them in a
    // second transaction, one lock wait later: with several stores on one log, every store's
    // group then held what had arrived before it began to wait, often a single append.)
    let spawn = |batch| {
        let log = log.clone();
        tokio::spawn(async move { log.append(batch).await })
    };
    let good_a = spawn(starts(a, owner, ExpectedVersion::NoStream, 2));
    eventually("1 queued", Duration::from_secs(10), || async { log.queued() == 1 }).await;
    let conflicting = spawn(starts(a, owner, ExpectedVersion::NoStream, 1));
    eventually("2 queued", Duration::from_secs(10), || async { log.queued() == 2 }).await;
    let good_b = spawn(starts(b, owner, ExpectedVersion::NoStream, 3));
    eventually("3 queued", Duration::from_secs(10), || async { log.queued() == 3 }).await;
    holder.rollback().await.unwrap_or_else(|e| panic!("{e}"));

    let join = |t: tokio::task::JoinHandle<Result<event_log::AppendOutcome, AppendError>>| async move {
        t.await.unwrap_or_else(|e| panic!("{e}"))
    };
    let first = join(first).await.unwrap_or_else(|e| panic!("{e}"));
    let good_a = join(good_a).await.unwrap_or_else(|e| panic!("{e}"));
    let conflicting = join(conflicting).await;
    let good_b = join(good_b).await.unwrap_or_else(|e| panic!("{e}"));

    assert!(
        matches!(conflicting, Err(AppendError::WrongExpectedVersion { stream_id, actual: Some(2), .. }) if stream_id == a)
    );
    // One transaction: one commit time for all three, contiguous positions in queue order.
    assert_eq!(first.recorded_at, good_a.recorded_at);
    assert_eq!(good_a.recorded_at, good_b.recorded_at);
    let transactions: i64 = sqlx::query_scalar("SELECT count(DISTINCT xmin::text) FROM user_events")
        .fetch_one(&pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        transactions, 1,
        "the appends queued during the wait went into another group"
    );
    assert_eq!((first.first_position, first.last_position), (1, 1));
    assert_eq!((good_a.first_position, good_a.last_position), (2, 3));
    assert_eq!((good_b.first_position, good_b.last_position), (4, 6));
    assert_eq!(count_events(&pool).await, 6);
}

#[sqlx::test(migrations = false)]
async fn a_polling_tail_works_without_notifications_and_a_listening_one_wakes_at_once(pool: PgPool) {
    let log = store(&pool).await;
    let (device, owner) = (Uuid::now_v7(), Uuid::now_v7());

    let mut polling = LogTail::start(
        reader(&pool),
        0,
        TailConfig {
            listen: false,
            poll_interval: Duration::from_millis(20),
            batch_size: 10,
            ..TailConfig::default()
        },
    )
    .await;
    // Poll interval far longer than the test allows: only a notification can wake it in time.
    let mut listening = LogTail::start(
        reader(&pool),
        0,
        TailConfig {
            listen: true,
            poll_interval: Duration::from_secs(300),
            batch_size: 10,
            ..TailConfig::default()
        },
    )
    .await;
    assert!(listening.poll().await.unwrap_or_default().is_empty());
    let woke = tokio::spawn(async move {
        let batch = listening.next_batch().await;
        (batch, listening)
    });
    log.append(starts(device, owner, ExpectedVersion::NoStream, 3))
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    let (batch, _) = tokio::time::timeout(Duration::from_secs(20), woke)
        .await
        .unwrap_or_else(|_| panic!("the listening tail was not woken by NOTIFY"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(batch.unwrap_or_default().len(), 3);
    let polled = tokio::time::timeout(Duration::from_secs(20), polling.next_batch())
        .await
        .unwrap_or_else(|_| panic!("the polling tail never saw the events"))
        .unwrap_or_default();
    assert_eq!(polled.iter().map(|e| e.position).collect::<Vec<_>>(), [1, 2, 3]);
}
