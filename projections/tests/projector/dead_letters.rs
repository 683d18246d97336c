//! Dead letters resolved by an operator: a parked event retried once its cause is fixed is
//! applied exactly once (also when retried twice or concurrently), in log order, and refused
//! where it would fold out of order; a skip keeps the letter with its reason.
//!
//! "An older projector binary" (`test_support::older_projector`) parks the events here: the
//! log's events are real and current, shown to the real `apply_events` as a schema version
//! from the future. The fix is deploying this code; a retry reads the event again from the
//! log.

use event_log::LogReader;
use projections::dead_letters::{self, DeadLetterError, Refusal, RetryOutcome, SkipOutcome};
use projections::fold_log;
use read_models::Projection;
use read_models::dead_letters::{DeadLetterFilter, DeadLetterState, MAX_PAGE};
use read_models::stored::load_read_models;
use serde_json::json;
use sqlx::PgPool;
use test_support::older_projector::project_as_an_older_binary;
use uuid::Uuid;

use crate::support::*;

const ACTOR: &str = "test-operator";

/// The device events of the log, in order: (position, device, event type).
async fn device_events(pool: &PgPool) -> Vec<(i64, Uuid, String)> {
    sqlx::query_as(
        "SELECT position, stream_id, event_type FROM user_events WHERE stream_type = 'device' ORDER BY position",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

/// A device with usage: its creation's position and its first usage's.
async fn a_device_with_usage(pool: &PgPool) -> (Uuid, i64, i64) {
    let events = device_events(pool).await;
    let (usage, device) = events
        .iter()
        .find(|(_, _, t)| t == "UsageRecorded")
        .map(|(p, d, _)| (*p, *d))
        .expect("the history recorded usage");
    let created = events
        .iter()
        .find(|(_, d, t)| *d == device && t == "DeviceCreated")
        .map(|(p, _, _)| *p)
        .unwrap();
    (device, created, usage)
}

async fn pending(pool: &PgPool, projection: Option<Projection>) -> Vec<read_models::dead_letters::DeadLetter> {
    let filter = DeadLetterFilter {
        projection,
        state: Some(DeadLetterState::Pending),
        after_id: None,
    };
    read_models::dead_letters::list(pool, filter, MAX_PAGE).await.unwrap()
}

async fn letter_at(pool: &PgPool, projection: Projection, position: i64) -> read_models::dead_letters::DeadLetter {
    let filter = DeadLetterFilter {
        projection: Some(projection),
        ..DeadLetterFilter::default()
    };
    read_models::dead_letters::list(pool, filter, MAX_PAGE)
        .await
        .unwrap()
        .into_iter()
        .find(|l| l.position == position)
        .unwrap_or_else(|| panic!("no {} letter at {position}", projection.name()))
}

#[sqlx::test(migrations = false)]
async fn events_an_older_projector_parked_are_listed_then_retried_in_log_order_to_equal_a_rebuild(pool: PgPool) {
    let mut world = World::new(&pool, 3, 23).await;
    world.run(120).await;
    let (device, created, usage) = a_device_with_usage(&pool).await;
    project_as_an_older_binary(&pool, &[created, usage]).await;

    // Listed: both unknown events in both projections, and the device's other events the
    // fleet fold could not apply without its creation.
    let fleet = pending(&pool, Some(Projection::Fleet)).await;
    let mut fleet_positions: Vec<i64> = fleet.iter().map(|l| l.position).collect();
    fleet_positions.sort_unstable();
    let device_positions: Vec<i64> = device_events(&pool)
        .await
        .into_iter()
        .filter(|(_, d, _)| *d == device)
        .map(|(p, _, _)| p)
        .collect();
    assert_eq!(
        fleet_positions, device_positions,
        "every event of the device is parked in fleet"
    );
    let first = fleet.iter().find(|l| l.position == created).unwrap();
    assert!(first.error.contains("99"), "{}", first.error);
    assert!(
        fleet
            .iter()
            .all(|l| l.attempts == 1 && l.state == DeadLetterState::Pending)
    );
    let usage_letters = pending(&pool, Some(Projection::DailyUsage)).await;
    assert_eq!(
        usage_letters.iter().map(|l| l.position).collect::<Vec<_>>(),
        [created, usage]
    );
    let stored = load_read_models(&pool).await.unwrap();
    assert!(
        !stored.devices.contains_key(&device),
        "the device is missing before the retry"
    );

    let reports = dead_letters::retry_pending(&pool, None, ACTOR).await.unwrap();
    assert_eq!(reports.len(), fleet.len() + usage_letters.len());
    assert!(
        reports.iter().all(|r| r.outcome == RetryOutcome::Applied),
        "{reports:#?}"
    );
    assert_equals_rebuild(&pool).await;
    assert!(pending(&pool, None).await.is_empty());
    let retried = letter_at(&pool, Projection::DailyUsage, usage).await;
    assert_eq!(retried.state, DeadLetterState::Retried);
    assert_eq!(retried.attempts, 2);
    assert_eq!(retried.resolved_by.as_deref(), Some(ACTOR));
    assert!(retried.resolved_at.is_some());
    let health = read_models::status::projection_health(&pool).await.unwrap();
    assert!(health.iter().all(|h| h.dead_letters == 0), "{health:?}");

    // Later events keep being applied on top, by the projector as usual.
    world.run(40).await;
    let (stop, tasks) = start_projectors(&pool);
    caught_up(&pool).await;
    stop.cancel();
    for task in tasks {
        task.await.unwrap();
    }
    assert_equals_rebuild(&pool).await;
}

#[sqlx::test(migrations = false)]
async fn a_letter_retried_twice_or_concurrently_is_applied_once(pool: PgPool) {
    let mut world = World::new(&pool, 2, 5).await;
    world.run(80).await;
    let (_, _, usage) = a_device_with_usage(&pool).await;
    // The last event of some device: nothing of its stream comes after it, so fleet applies it.
    let events = device_events(&pool).await;
    let last = events.iter().rev().map(|(p, _, _)| *p).find(|p| *p != usage).unwrap();
    let last_stream = events.iter().find(|(p, _, _)| *p == last).unwrap().1;
    assert!(!events.iter().any(|(p, d, _)| *d == last_stream && *p > last));
    project_as_an_older_binary(&pool, &[usage, last]).await;
    let letter = letter_at(&pool, Projection::DailyUsage, usage).await;

    let retries = (0..8).map(|_| {
        let pool = pool.clone();
        tokio::spawn(async move { dead_letters::retry(&pool, letter.id, None, ACTOR).await.unwrap() })
    });
    let outcomes: Vec<RetryOutcome> = futures::future::join_all(retries)
        .await
        .into_iter()
        .map(|r| r.unwrap().outcome)
        .collect();
    assert_eq!(
        outcomes.iter().filter(|o| **o == RetryOutcome::Applied).count(),
        1,
        "{outcomes:#?}"
    );
    assert!(
        outcomes.iter().all(|o| *o == RetryOutcome::Applied
            || matches!(
                o,
                RetryOutcome::AlreadyResolved {
                    state: DeadLetterState::Retried,
                    ..
                }
            )),
        "{outcomes:#?}"
    );
    // And once more, later: nothing done, and it says so.
    let again = dead_letters::retry(&pool, letter.id, None, ACTOR).await.unwrap();
    assert!(
        matches!(&again.outcome, RetryOutcome::AlreadyResolved { state: DeadLetterState::Retried, resolved_by: Some(by), .. } if by == ACTOR),
        "{again:?}"
    );
    // Each projection's letter of an event is its own: the fleet letter is still pending.
    // Retried twice at once there too: applied once.
    let fleet = letter_at(&pool, Projection::Fleet, last).await;
    assert_eq!(fleet.state, DeadLetterState::Pending);
    let (a, b) = tokio::join!(
        dead_letters::retry(&pool, fleet.id, Some(Projection::Fleet), ACTOR),
        dead_letters::retry(&pool, fleet.id, Some(Projection::Fleet), ACTOR),
    );
    let mut outcomes = [a.unwrap().outcome.as_str(), b.unwrap().outcome.as_str()];
    outcomes.sort_unstable();
    assert_eq!(outcomes, ["already_resolved", "applied"]);
    // What is left pending: the usage event's fleet letter (refused, its stream moved on) and
    // the daily_usage letter of `last` (applied now).
    let rest = dead_letters::retry_pending(&pool, Some(Projection::DailyUsage), ACTOR)
        .await
        .unwrap();
    assert!(rest.iter().all(|r| r.outcome == RetryOutcome::Applied), "{rest:?}");
    let reader = LogReader::new(pool.clone());
    let head = reader.head().await.unwrap().position;
    let rebuilt = fold_log(&reader, head, 1_000)
        .await
        .unwrap()
        .without_provider_breakdown();
    assert_eq!(load_read_models(&pool).await.unwrap().daily_usage, rebuilt.daily_usage);
    assert_eq!(letter_at(&pool, Projection::DailyUsage, usage).await.attempts, 2);
}

#[sqlx::test(migrations = false)]
async fn a_retry_that_fails_again_keeps_the_letter_pending_with_its_new_error_and_attempts(pool: PgPool) {
    let mut world = World::new(&pool, 2, 3).await;
    world.run(20).await;
    let device = device_events(&pool).await[0].1;
    // Malformed in the log itself: no code will ever decode it.
    append_raw(
        &pool,
        device,
        "DeviceStarted",
        1,
        json!({"device_id": device, "started_at": "not a time"}),
    )
    .await;
    project_as_an_older_binary(&pool, &[]).await;
    let letter = pending(&pool, Some(Projection::Fleet)).await.remove(0);
    assert_eq!(letter.attempts, 1);
    assert!(letter.last_attempt_at.is_none());

    for attempt in 2..=3 {
        let report = dead_letters::retry(&pool, letter.id, Some(Projection::Fleet), ACTOR)
            .await
            .unwrap();
        match report.outcome {
            RetryOutcome::Failed { error, attempts } => {
                assert_eq!(attempts, attempt);
                assert_eq!(error, letter.error, "the same payload fails the same way");
            }
            other => panic!("{other:?}"),
        }
        let stored = read_models::dead_letters::get(&pool, letter.id).await.unwrap().unwrap();
        assert_eq!(stored.state, DeadLetterState::Pending);
        assert_eq!(stored.attempts, attempt);
        assert!(stored.last_attempt_at.is_some());
        assert!(stored.resolved_at.is_none());
    }
    assert_equals_rebuild(&pool).await;
}

#[sqlx::test(migrations = false)]
async fn an_old_device_event_is_refused_once_a_later_one_is_applied_and_old_usage_is_added(pool: PgPool) {
    let mut world = World::new(&pool, 3, 11).await;
    world.run(150).await;
    // A device's usage followed by a later event of the same device.
    let events = device_events(&pool).await;
    let (usage, device) = events
        .iter()
        .filter(|(_, _, t)| t == "UsageRecorded")
        .find(|(p, d, _)| events.iter().any(|(q, e, _)| e == d && q > p))
        .map(|(p, d, _)| (*p, *d))
        .expect("a device with events after a usage");
    project_as_an_older_binary(&pool, &[usage]).await;
    let before = load_read_models(&pool).await.unwrap();

    let fleet = letter_at(&pool, Projection::Fleet, usage).await;
    let report = dead_letters::retry(&pool, fleet.id, None, ACTOR).await.unwrap();
    match &report.outcome {
        RetryOutcome::Refused(
            refusal @ Refusal::LaterEventApplied {
                stream_id,
                applied_position,
            },
        ) => {
            assert_eq!(*stream_id, device);
            assert!(*applied_position > usage);
            assert!(refusal.to_string().contains("cloudphone replay"), "{refusal}");
        }
        other => panic!("{other:?}"),
    }
    let still = read_models::dead_letters::get(&pool, fleet.id).await.unwrap().unwrap();
    assert_eq!((still.state, still.attempts), (DeadLetterState::Pending, 1));
    assert_eq!(
        load_read_models(&pool).await.unwrap().devices,
        before.devices,
        "the device row changed"
    );

    // Usage sums are order-free: the same event is added to daily_usage now.
    let usage_letter = letter_at(&pool, Projection::DailyUsage, usage).await;
    let report = dead_letters::retry(&pool, usage_letter.id, None, ACTOR).await.unwrap();
    assert_eq!(report.outcome, RetryOutcome::Applied);
    let reader = LogReader::new(pool.clone());
    let head = reader.head().await.unwrap().position;
    let rebuilt = fold_log(&reader, head, 1_000)
        .await
        .unwrap()
        .without_provider_breakdown();
    assert_eq!(load_read_models(&pool).await.unwrap().daily_usage, rebuilt.daily_usage);
}

#[sqlx::test(migrations = false)]
async fn a_skip_keeps_the_letter_with_its_reason_and_refuses_a_bad_one(pool: PgPool) {
    let mut world = World::new(&pool, 2, 9).await;
    world.run(60).await;
    let (_, _, usage) = a_device_with_usage(&pool).await;
    project_as_an_older_binary(&pool, &[usage]).await;
    let letter = letter_at(&pool, Projection::DailyUsage, usage).await;

    for bad in [
        "",
        "   ",
        "line\nbreak",
        &"x".repeat(dead_letters::MAX_REASON_CHARS + 1),
    ] {
        let refused = dead_letters::skip(&pool, letter.id, None, bad, ACTOR).await;
        assert!(
            matches!(refused, Err(DeadLetterError::BadReason)),
            "{bad:?}: {refused:?}"
        );
    }
    assert_eq!(
        read_models::dead_letters::get(&pool, letter.id)
            .await
            .unwrap()
            .unwrap()
            .state,
        DeadLetterState::Pending
    );

    let reason = "usage re-billed by hand in ticket OPS-1234";
    let skipped = dead_letters::skip(&pool, letter.id, Some(Projection::DailyUsage), reason, ACTOR)
        .await
        .unwrap();
    assert_eq!(skipped, SkipOutcome::Skipped);
    let stored = read_models::dead_letters::get(&pool, letter.id).await.unwrap().unwrap();
    assert_eq!(stored.state, DeadLetterState::Skipped);
    assert_eq!(stored.resolution_note.as_deref(), Some(reason));
    assert_eq!(stored.resolved_by.as_deref(), Some(ACTOR));
    assert!(stored.resolved_at.is_some());
    // Resolved for good: neither a second skip nor a retry changes it or applies the event.
    let before = load_read_models(&pool).await.unwrap();
    assert!(matches!(
        dead_letters::skip(&pool, letter.id, None, "again", ACTOR)
            .await
            .unwrap(),
        SkipOutcome::AlreadyResolved {
            state: DeadLetterState::Skipped,
            ..
        }
    ));
    assert!(matches!(
        dead_letters::retry(&pool, letter.id, None, ACTOR)
            .await
            .unwrap()
            .outcome,
        RetryOutcome::AlreadyResolved {
            state: DeadLetterState::Skipped,
            ..
        }
    ));
    assert_eq!(load_read_models(&pool).await.unwrap().daily_usage, before.daily_usage);
    let stored = read_models::dead_letters::get(&pool, letter.id).await.unwrap().unwrap();
    assert_eq!(stored.resolution_note.as_deref(), Some(reason));
    assert!(
        dead_letters::retry_pending(&pool, Some(Projection::DailyUsage), ACTOR)
            .await
            .unwrap()
            .is_empty()
    );
}

#[sqlx::test(migrations = false)]
async fn hostile_ids_projections_and_limits_are_refused_or_bounded(pool: PgPool) {
    let mut world = World::new(&pool, 2, 13).await;
    world.run(40).await;
    let (_, created, _) = a_device_with_usage(&pool).await;
    project_as_an_older_binary(&pool, &[created]).await;
    let letter = letter_at(&pool, Projection::DailyUsage, created).await;

    for id in [0, -1, i64::MAX, letter.id + 1_000_000] {
        assert!(matches!(
            dead_letters::retry(&pool, id, None, ACTOR).await,
            Err(DeadLetterError::NotFound(n)) if n == id
        ));
        assert!(matches!(
            dead_letters::skip(&pool, id, None, "why", ACTOR).await,
            Err(DeadLetterError::NotFound(_))
        ));
    }
    // A daily_usage letter named under --projection fleet: refused, untouched.
    let wrong = dead_letters::retry(&pool, letter.id, Some(Projection::Fleet), ACTOR).await;
    assert!(
        matches!(&wrong, Err(DeadLetterError::WrongProjection { actual, expected: "fleet", .. }) if actual == "daily_usage"),
        "{wrong:?}"
    );
    let wrong = dead_letters::skip(&pool, letter.id, Some(Projection::Fleet), "why", ACTOR).await;
    assert!(
        matches!(wrong, Err(DeadLetterError::WrongProjection { .. })),
        "{wrong:?}"
    );
    let stored = read_models::dead_letters::get(&pool, letter.id).await.unwrap().unwrap();
    assert_eq!((stored.state, stored.attempts), (DeadLetterState::Pending, 1));
    // retry --all --projection fleet leaves daily_usage's letters alone.
    dead_letters::retry_pending(&pool, Some(Projection::Fleet), ACTOR)
        .await
        .unwrap();
    assert_eq!(pending(&pool, Some(Projection::DailyUsage)).await.len(), 1);
    // A blank actor is refused too (it is the record of who did it).
    assert!(matches!(
        dead_letters::retry(&pool, letter.id, None, " ").await,
        Err(DeadLetterError::BadActor)
    ));

    // Limits are bounded whatever is asked.
    for _ in 0..3 {
        sqlx::query(
            "INSERT INTO projection_dead_letters (projection, position, event_type, schema_version, error, envelope)
             SELECT 'daily_usage', g, 'DeviceStarted', 1, 'test', '{}' FROM generate_series(1, 600) g",
        )
        .execute(&pool)
        .await
        .unwrap();
    }
    let all = DeadLetterFilter::default();
    assert_eq!(
        read_models::dead_letters::list(&pool, all, i64::MAX)
            .await
            .unwrap()
            .len() as i64,
        MAX_PAGE
    );
    assert_eq!(read_models::dead_letters::list(&pool, all, -5).await.unwrap().len(), 1);
    assert!(read_models::dead_letters::count(&pool, all).await.unwrap() > MAX_PAGE);
    // A letter that names no event (a message that was not an envelope) is not retried.
    let unknown: i64 = sqlx::query_scalar("SELECT min(id) FROM projection_dead_letters WHERE error = 'test'")
        .fetch_one(&pool)
        .await
        .unwrap();
    let refused = dead_letters::retry(&pool, unknown, None, ACTOR).await.unwrap();
    assert!(
        matches!(refused.outcome, RetryOutcome::Refused(Refusal::NotAnEvent)),
        "{refused:?}"
    );
}
