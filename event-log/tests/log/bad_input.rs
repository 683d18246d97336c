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

/// A store with one device created (positions 1 and 2), the log head held by a transaction
/// of the test's, and an append of `starts` events to that device spawned behind it.
struct HeldHead {
    log: std::sync::Arc<event_log::EventStore>,
    device: Uuid,
    owner: Uuid,
    holder: sqlx::Transaction<'static, sqlx::Postgres>,
    pending: tokio::task::JoinHandle<Result<event_log::AppendOutcome, AppendError>>,
}

async fn an_append_behind_a_held_head(pool: &PgPool, starts_to_append: usize) -> HeldHead {
    let log = std::sync::Arc::new(store(pool).await);
    let (device, owner) = (Uuid::now_v7(), Uuid::now_v7());
    log.append(create_device(device, owner))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut holder = pool.begin().await.unwrap_or_else(|e| panic!("{e}"));
    sqlx::query("SELECT position FROM log_head FOR UPDATE")
        .execute(&mut *holder)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let pending = tokio::spawn({
        let log = log.clone();
        async move {
            log.append(starts(device, owner, ExpectedVersion::Exact(1), starts_to_append))
                .await
        }
    });
    HeldHead {
        log,
        device,
        owner,
        holder,
        pending,
    }
}

#[sqlx::test(migrations = false)]
async fn a_database_connection_lost_mid_append_fails_the_caller_and_the_writer_recovers(pool: PgPool) {
    // Stall the writer inside its transaction, then kill its backend.
    let HeldHead {
        log,
        device,
        owner,
        holder,
        pending,
    } = an_append_behind_a_held_head(&pool, 3).await;
    // Kill the backend waiting for the head. A kept connection's first failure there is taken
    // for a backend that ended since the last group, and the head is asked for again on a new
    // connection (BEGIN and a lock wait changed nothing), which waits in turn: kill that one
    // too. The second failure reaches the caller.
    let mut killed: Vec<i32> = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !pending.is_finished() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for the append to fail"
        );
        let waiter: Option<i32> = sqlx::query_scalar(
            "SELECT pid FROM pg_stat_activity
             WHERE datname = current_database() AND wait_event_type = 'Lock' AND pid <> ALL($1)",
        )
        .bind(&killed)
        .fetch_optional(&pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        let Some(waiter) = waiter else {
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        };
        assert!(
            killed.len() < 2,
            "the writer asked for the head a third time after {killed:?} were killed"
        );
        let terminated: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1, 10000)")
            .bind(waiter)
            .fetch_one(&pool)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(terminated, "backend {waiter} did not exit");
        killed.push(waiter);
    }
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

/// The writer keeps its connection from one group to the next and, under load, does not ping
/// it before each (a round trip on the serial path). A backend that ended since the last
/// group therefore fails the next head lock, which changed nothing: the writer takes it again
/// on a new connection, and the append that came next never sees the failure.
#[sqlx::test(migrations = false)]
async fn the_writers_connection_killed_between_groups_costs_no_append(pool: PgPool) {
    // Find the writer's backend: the one waiting for the head while a test transaction holds it.
    let HeldHead {
        log,
        device,
        owner,
        holder,
        pending,
    } = an_append_behind_a_held_head(&pool, 1).await;
    eventually("the writer to block on the head", Duration::from_secs(10), || async {
        lock_waiters(&pool).await >= 1
    })
    .await;
    let writer: i32 = sqlx::query_scalar(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
    )
    .fetch_one(&pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    holder.rollback().await.unwrap_or_else(|e| panic!("{e}"));
    let second = pending
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(second.last_position, 3);

    // Its backend ends while the writer waits for the next append, well within the time a
    // kept connection goes without a ping.
    let terminated: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1, 10000)")
        .bind(writer)
        .fetch_one(&pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(terminated, "the writer's backend {writer} did not exit");

    let third = log
        .append(starts(device, owner, ExpectedVersion::Exact(2), 2))
        .await
        .unwrap_or_else(|e| panic!("the append after the writer's backend ended failed: {e}"));
    assert_eq!((third.first_position, third.last_position), (4, 5));
    assert_eq!(count_events(&pool).await, 5);
    let report = reader(&pool)
        .verify_chain(1, None, 100, |_| {})
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(report.broken, None);
}

/// The pools ping a connection on its way out of the pool only when it sat idle for more than
/// `PING_IDLE_AFTER` (sqlx's ping on every hand-out cost a round trip per statement). A
/// connection the database dropped while it sat idle (a restart, a proxy's idle timeout, an
/// operator's `pg_terminate_backend`) is still found dead and replaced before any statement
/// runs on it: no caller sees the error.
#[sqlx::test(migrations = false)]
async fn pooled_connections_killed_while_idle_are_replaced_before_a_statement_runs(
    _: sqlx::postgres::PgPoolOptions,
    connect: sqlx::postgres::PgConnectOptions,
) {
    use sqlx::{ConnectOptions, Connection};
    const CONNECTIONS: usize = 3;
    let pool = event_log::pool_options(CONNECTIONS as u32).connect_lazy_with(connect.clone());
    // Open all of them: each held while the others are taken, then returned.
    let mut held = Vec::new();
    for _ in 0..CONNECTIONS {
        let mut conn = pool.acquire().await.unwrap_or_else(|e| panic!("{e}"));
        sqlx::query("SELECT 1")
            .execute(&mut *conn)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        held.push(conn);
    }
    drop(held);
    eventually("the connections back in the pool", Duration::from_secs(10), || async {
        pool.num_idle() == CONNECTIONS
    })
    .await;
    // The state under test is idleness itself: nothing to await but time.
    tokio::time::sleep(event_log::PING_IDLE_AFTER + Duration::from_millis(200)).await;

    let mut operator = connect.connect().await.unwrap_or_else(|e| panic!("{e}"));
    let killed: i64 = sqlx::query_scalar(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
         WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend'",
    )
    .fetch_one(&mut operator)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(killed, CONNECTIONS as i64);
    operator.close().await.unwrap_or_else(|e| panic!("{e}"));

    // Every connection the pool hands out now works, the first statement on each included.
    let mut again = Vec::new();
    for n in 0..CONNECTIONS {
        let mut conn = pool.acquire().await.unwrap_or_else(|e| panic!("{e}"));
        let one: i32 = sqlx::query_scalar("SELECT 1")
            .fetch_one(&mut *conn)
            .await
            .unwrap_or_else(|e| panic!("statement {n} on a pooled connection failed: {e}"));
        assert_eq!(one, 1);
        again.push(conn);
    }
}
