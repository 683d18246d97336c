//! Bad input gets a clear, typed error and writes nothing; a database that goes away fails
//! the caller without half-writing, and the writer recovers.

use std::time::Duration;

use event_log::{AppendBatch, AppendError, AppendLimits, ExpectedVersion, InvalidEvent, StoreConfig};
use event_schema::{SchemaError, StreamType};
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

use crate::support::*;

fn assert_invalid(result: Result<event_log::AppendOutcome, AppendError>, check: impl Fn(&InvalidEvent) -> bool) {
    match result {
        Err(AppendError::InvalidEvent { reason, .. }) => assert!(check(&reason), "unexpected reason: {reason}"),
        other => panic!("expected InvalidEvent, got {other:?}"),
    }
}

#[sqlx::test(migrations = false)]
async fn malformed_batches_are_refused_before_the_database(pool: PgPool) {
    let config = StoreConfig {
        limits: AppendLimits {
            max_batch_events: 10,
            ..AppendLimits::default()
        },
        ..StoreConfig::default()
    };
    let log = store_with(&pool, config, std::sync::Arc::new(event_log::SystemClock)).await;
    let (device, owner) = (Uuid::now_v7(), Uuid::now_v7());

    assert!(matches!(
        log.append(AppendBatch::default()).await,
        Err(AppendError::EmptyBatch)
    ));
    let empty = AppendBatch::single(device_stream(device, owner, ExpectedVersion::Any, vec![]));
    assert!(matches!(log.append(empty).await, Err(AppendError::EmptyStream { .. })));
    let twice = AppendBatch {
        streams: vec![
            device_stream(device, owner, ExpectedVersion::Any, vec![started(device)]),
            device_stream(device, owner, ExpectedVersion::Any, vec![started(device)]),
        ],
        idempotency: None,
    };
    assert!(matches!(
        log.append(twice).await,
        Err(AppendError::DuplicateStream { .. })
    ));
    let too_big = starts(device, owner, ExpectedVersion::Any, 11);
    assert!(matches!(
        log.append(too_big).await,
        Err(AppendError::BatchTooLarge { events: 11, limit: 10 })
    ));
    let negative = starts(device, owner, ExpectedVersion::Exact(-1), 1);
    assert!(matches!(
        log.append(negative).await,
        Err(AppendError::NegativeExpectedVersion { expected: -1, .. })
    ));
    let bad_key = starts(device, owner, ExpectedVersion::Any, 1).with_idempotency_key("", vec![]);
    assert!(matches!(
        log.append(bad_key).await,
        Err(AppendError::InvalidIdempotencyKey { .. })
    ));
    assert_eq!(count_events(&pool).await, 0);
}

#[sqlx::test(migrations = false)]
async fn events_that_do_not_match_their_type_or_stream_are_refused(pool: PgPool) {
    let log = store(&pool).await;
    let (device, owner) = (Uuid::now_v7(), Uuid::now_v7());
    let with = |mutate: &dyn Fn(&mut event_log::NewEvent)| {
        let mut event = started(device);
        mutate(&mut event);
        AppendBatch::single(device_stream(device, owner, ExpectedVersion::Any, vec![event]))
    };

    // A payload that is not a DeviceStarted.
    let wrong_shape = with(&|e| e.payload = json!({"device_id": "not-a-uuid", "started_at": 5}));
    assert_invalid(log.append(wrong_shape).await, |r| {
        matches!(r, InvalidEvent::Schema(SchemaError::MalformedPayload { .. }))
    });
    let extra_field = with(&|e| e.payload["colour"] = json!("red"));
    assert_invalid(log.append(extra_field).await, |r| {
        matches!(r, InvalidEvent::Schema(SchemaError::MalformedPayload { .. }))
    });
    // A type nobody knows, and a version from the future or the past.
    let unknown = with(&|e| e.event_type = "DeviceTeleported".into());
    assert_invalid(log.append(unknown).await, |r| {
        matches!(r, InvalidEvent::Schema(SchemaError::UnknownEventType { .. }))
    });
    let future = with(&|e| e.schema_version = 9);
    assert_invalid(log.append(future).await, |r| {
        matches!(r, InvalidEvent::NotCurrentVersion { given: 9, .. })
    });
    // A device event on a user stream.
    let mut misplaced = starts(device, owner, ExpectedVersion::Any, 1);
    misplaced.streams[0].stream_type = StreamType::User;
    assert_invalid(log.append(misplaced).await, |r| {
        matches!(
            r,
            InvalidEvent::WrongStream {
                belongs_to: StreamType::Device,
                stream_type: StreamType::User,
                ..
            }
        )
    });
    // Text PostgreSQL cannot store.
    let nul = with(&|e| e.metadata.trace_id = Some("a\0b".into()));
    assert_invalid(log.append(nul).await, |r| matches!(r, InvalidEvent::ContainsNul));
    assert_eq!(count_events(&pool).await, 0);
}

#[sqlx::test(migrations = false)]
async fn an_unknown_stream_type_is_refused_and_a_stream_keeps_its_type_and_owner(pool: PgPool) {
    let err = "robot".parse::<StreamType>().unwrap_err();
    assert!(err.to_string().contains("unknown stream type `robot`"), "{err}");

    let log = store(&pool).await;
    let (device, owner) = (Uuid::now_v7(), Uuid::now_v7());
    log.append(create_device(device, owner))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // The same id appended as a user stream (with a user event).
    let as_user = AppendBatch::single(user_stream(
        device,
        ExpectedVersion::Any,
        vec![reserved(device, Uuid::now_v7())],
    ));
    let err = log.append(as_user).await.unwrap_err();
    assert!(
        matches!(
            err,
            AppendError::StreamTypeMismatch {
                existing: StreamType::Device,
                requested: StreamType::User,
                ..
            }
        ),
        "{err:?}"
    );
    // Another owner claiming the device stream.
    let hijack = starts(device, Uuid::now_v7(), ExpectedVersion::Any, 1);
    assert!(matches!(
        log.append(hijack).await,
        Err(AppendError::OwnerMismatch { .. })
    ));
    assert_eq!(count_events(&pool).await, 2);
}

#[sqlx::test(migrations = false)]
async fn a_database_connection_lost_mid_append_fails_the_caller_and_the_writer_recovers(pool: PgPool) {
    let log = std::sync::Arc::new(store(&pool).await);
    let (device, owner) = (Uuid::now_v7(), Uuid::now_v7());
    log.append(create_device(device, owner))
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    // Stall the writer inside its transaction, then kill its backend.
    let mut holder = pool.begin().await.unwrap_or_else(|e| panic!("{e}"));
    sqlx::query("SELECT position FROM log_head FOR UPDATE")
        .execute(&mut *holder)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let pending = tokio::spawn({
        let log = log.clone();
        async move { log.append(starts(device, owner, ExpectedVersion::Exact(1), 3)).await }
    });
    eventually("the writer to block on the head", Duration::from_secs(10), || async {
        lock_waiters(&pool).await >= 1
    })
    .await;
    let killed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
          WHERE datname = current_database() AND wait_event_type = 'Lock') t",
    )
    .fetch_one(&pool)
    .await
    .unwrap_or(0);
    assert_eq!(killed, 1);
    holder.rollback().await.unwrap_or_else(|e| panic!("{e}"));

    let err = pending.await.unwrap_or_else(|e| panic!("{e}")).unwrap_err();
    assert!(err.is_unavailable(), "expected an unavailable error, got {err:?}");
    assert_eq!(count_events(&pool).await, 2, "nothing of the failed append was written");
    let head = reader(&pool).head().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(head.position, 2);

    // The same writer task keeps serving once the database answers again.
    let next = log
        .append(starts(device, owner, ExpectedVersion::Exact(1), 3))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((next.first_position, next.last_position), (3, 5));
    let report = reader(&pool)
        .verify_chain(1, None, 100, |_| {})
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(report.broken, None);
}
