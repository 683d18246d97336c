//! Appends: positions, versions, atomic multi-stream batches, conflicts, idempotency.

use event_log::{AppendError, ExpectedVersion, StoreConfig};
use sqlx::PgPool;
use uuid::Uuid;

use crate::support::*;

#[sqlx::test(migrations = false)]
async fn an_append_gets_dense_positions_and_stream_versions(pool: PgPool) {
    let log = store(&pool).await;
    let (device, owner) = (Uuid::now_v7(), Uuid::now_v7());

    let first = log
        .append(create_device(device, owner))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((first.first_position, first.last_position), (1, 2));
    assert_eq!(first.streams.iter().map(|s| s.version).collect::<Vec<_>>(), [1, 1]);

    let second = log
        .append(starts(device, owner, ExpectedVersion::Exact(1), 3))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((second.first_position, second.last_position), (3, 5));
    assert_eq!(second.streams[0].version, 4);

    let events = reader(&pool).read_stream(device, 0, 100).await.unwrap_or_default();
    assert_eq!(
        events.iter().map(|e| e.stream_version).collect::<Vec<_>>(),
        [1, 2, 3, 4]
    );
    assert_eq!(events.iter().map(|e| e.position).collect::<Vec<_>>(), [1, 3, 4, 5]);
    assert!(events.iter().all(|e| e.owner_id == owner));
    let head = reader(&pool).head().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(head.position, 5);
    assert_eq!(head.hash, events[3].hash);
}

#[sqlx::test(migrations = false)]
async fn a_conflict_on_one_stream_writes_none_of_the_batch(pool: PgPool) {
    let log = store(&pool).await;
    let (device, owner) = (Uuid::now_v7(), Uuid::now_v7());
    log.append(create_device(device, owner))
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    // The device stream is at 1; claim 5. The owner stream part alone would be fine.
    let mut batch = create_device(device, owner);
    batch.streams[0].expected = ExpectedVersion::Exact(5);
    let err = log.append(batch).await.unwrap_err();
    match err {
        AppendError::WrongExpectedVersion {
            stream_id,
            expected,
            actual,
        } => {
            assert_eq!(stream_id, device);
            assert_eq!(expected, ExpectedVersion::Exact(5));
            assert_eq!(actual, Some(1));
        }
        other => panic!("expected a version conflict, got {other:?}"),
    }
    assert_eq!(count_events(&pool).await, 2, "nothing of the failed batch was written");
    let owner_stream = reader(&pool).stream_info(owner).await.unwrap_or_default();
    assert_eq!(owner_stream.map(|s| s.version), Some(1));
}

#[sqlx::test(migrations = false)]
async fn expected_versions_mean_what_they_say(pool: PgPool) {
    let log = store(&pool).await;
    let (device, owner) = (Uuid::now_v7(), Uuid::now_v7());
    let conflict = |r: Result<_, AppendError>| matches!(r, Err(AppendError::WrongExpectedVersion { .. }));

    assert!(
        conflict(log.append(starts(device, owner, ExpectedVersion::Exact(1), 1)).await),
        "exact on a missing stream"
    );
    assert!(
        log.append(starts(device, owner, ExpectedVersion::NoStream, 1))
            .await
            .is_ok()
    );
    assert!(
        conflict(log.append(starts(device, owner, ExpectedVersion::NoStream, 1)).await),
        "no-stream on an existing one"
    );
    assert!(
        conflict(log.append(starts(device, owner, ExpectedVersion::Exact(0), 1)).await),
        "exact(0) means no stream"
    );
    assert!(
        log.append(starts(device, owner, ExpectedVersion::Exact(1), 2))
            .await
            .is_ok()
    );
    assert!(log.append(starts(device, owner, ExpectedVersion::Any, 1)).await.is_ok());
    let info = reader(&pool).stream_info(device).await.unwrap_or_default();
    assert_eq!(info.map(|s| s.version), Some(4));
}

#[sqlx::test(migrations = false)]
async fn a_retried_idempotent_append_returns_the_original_outcome_and_writes_nothing(pool: PgPool) {
    let log = store(&pool).await;
    let (device, owner) = (Uuid::now_v7(), Uuid::now_v7());
    let batch = || create_device(device, owner).with_idempotency_key("req-1", b"hash-a".to_vec());

    let original = log.append(batch()).await.unwrap_or_else(|e| panic!("{e}"));
    assert!(!original.replayed);
    // A retry builds new event ids and timestamps, as a real client retry would.
    let retry = log.append(batch()).await.unwrap_or_else(|e| panic!("{e}"));
    assert!(retry.replayed);
    assert_eq!(
        (
            retry.first_position,
            retry.last_position,
            &retry.streams,
            retry.recorded_at
        ),
        (
            original.first_position,
            original.last_position,
            &original.streams,
            original.recorded_at
        )
    );
    assert_eq!(count_events(&pool).await, 2);

    let other_request = create_device(device, owner).with_idempotency_key("req-1", b"hash-b".to_vec());
    let err = log.append(other_request).await.unwrap_err();
    assert!(
        matches!(err, AppendError::IdempotencyKeyReused { ref key } if key == "req-1"),
        "{err:?}"
    );
    assert_eq!(count_events(&pool).await, 2);
}

#[sqlx::test(migrations = false)]
async fn concurrent_appends_with_one_idempotency_key_write_once(pool: PgPool) {
    let log = std::sync::Arc::new(store(&pool).await);
    let (device, owner) = (Uuid::now_v7(), Uuid::now_v7());
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let log = log.clone();
            tokio::spawn(async move {
                log.append(create_device(device, owner).with_idempotency_key("same", vec![1]))
                    .await
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for task in tasks {
        outcomes.push(
            task.await
                .unwrap_or_else(|e| panic!("{e}"))
                .unwrap_or_else(|e| panic!("{e}")),
        );
    }
    assert_eq!(outcomes.iter().filter(|o| !o.replayed).count(), 1);
    assert!(outcomes.iter().all(|o| o.first_position == outcomes[0].first_position));
    assert_eq!(count_events(&pool).await, 2);
}

#[sqlx::test(migrations = false)]
async fn the_unbatched_path_gives_the_same_guarantees(pool: PgPool) {
    let log = store(&pool).await;
    let (device, owner) = (Uuid::now_v7(), Uuid::now_v7());
    let outcome = log
        .append_unbatched(create_device(device, owner))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(outcome.last_position, 2);
    let err = log.append_unbatched(create_device(device, owner)).await.unwrap_err();
    assert!(matches!(err, AppendError::WrongExpectedVersion { .. }), "{err:?}");
    let report = reader(&pool)
        .verify_chain(1, None, 100, |_| {})
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((report.checked, report.broken), (2, None));
}

#[sqlx::test(migrations = false)]
async fn a_large_batch_goes_through_copy_and_reads_back_exactly(pool: PgPool) {
    let log = store(&pool).await;
    let (device, owner) = (Uuid::now_v7(), Uuid::now_v7());
    // Text that COPY must escape: tabs, newlines, carriage returns, backslashes, non-ASCII.
    let reasons = [
        "plain",
        "tab\there",
        "line\nbreak",
        "cr\rlf",
        "back\\slash",
        "émoji 📱",
        "\\N",
    ];
    let mut events = vec![created(device, owner)];
    events.extend((0..5_000).map(|i| failed(device, reasons[i % reasons.len()])));
    let batch = event_log::AppendBatch::single(device_stream(device, owner, ExpectedVersion::NoStream, events.clone()));
    assert!(
        batch.event_count() >= log.config().copy_threshold,
        "the batch must take the COPY path"
    );

    let outcome = log.append(batch).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(outcome.last_position, 5_001);
    let stored = reader(&pool).read_stream(device, 0, 10_000).await.unwrap_or_default();
    assert_eq!(stored.len(), events.len());
    for (stored, sent) in stored.iter().zip(&events) {
        assert_eq!(stored.event_id, sent.event_id);
        assert_eq!(stored.payload, sent.payload);
    }
    let report = reader(&pool)
        .verify_chain(1, None, 1_000, |_| {})
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((report.checked, report.broken), (5_001, None));
}

#[sqlx::test(migrations = false)]
async fn commit_time_never_goes_backwards_when_a_clock_does(pool: PgPool) {
    let clock = manual_clock(utc(2037, 6, 1, 12, 0, 0));
    let log = store_with(&pool, event_log::StoreConfig::default(), clock.clone()).await;
    let (device, owner) = (Uuid::now_v7(), Uuid::now_v7());
    let first = log
        .append(starts(device, owner, ExpectedVersion::NoStream, 1))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // Another writer's clock, an hour behind.
    clock.set(utc(2037, 6, 1, 11, 0, 0));
    let second = log
        .append(starts(device, owner, ExpectedVersion::Exact(1), 1))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(second.recorded_at, first.recorded_at);
    let events = reader(&pool).read_all(0, 10).await.unwrap_or_default();
    assert!(events.windows(2).all(|w| w[0].recorded_at <= w[1].recorded_at));
}

#[sqlx::test(migrations = false)]
async fn expired_idempotency_keys_are_new_requests_and_kept_ones_still_replay(pool: PgPool) {
    let clock = manual_clock(utc(2026, 3, 1, 12, 0, 0));
    let log = store_with(&pool, StoreConfig::default(), clock.clone()).await;
    let (device, owner) = (Uuid::now_v7(), Uuid::now_v7());
    let keyed = |key: &str| starts(device, owner, ExpectedVersion::Any, 1).with_idempotency_key(key, vec![7]);

    let old = log.append(keyed("old")).await.unwrap();
    clock.advance(chrono::Duration::days(2));
    let recent = log.append(keyed("recent")).await.unwrap();

    let expired = event_log::idempotency::expire_idempotency_keys(&pool, utc(2026, 3, 2, 12, 0, 0))
        .await
        .unwrap();
    assert_eq!(expired, 1);

    // The expired key is a new request: it writes again.
    let again = log.append(keyed("old")).await.unwrap();
    assert!(!again.replayed);
    assert!(again.first_position > recent.last_position, "{again:?}");
    // The kept key still answers with its original outcome.
    let retry = log.append(keyed("recent")).await.unwrap();
    assert!(retry.replayed);
    assert_eq!(retry.first_position, recent.first_position);
    assert!(old.first_position < recent.first_position);
}
