//! The embedded mode: projectors follow the PostgreSQL log directly.

use chrono::{DateTime, NaiveDate, Utc};
use event_log::{AppendBatch, ExpectedVersion, StreamAppend};
use event_schema::{DeviceStatus, Provider};
use read_models::Projection;
use read_models::fleet::StatsKey;
use read_models::stored::load_read_models;
use read_models::usage::UsageKey;
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

use crate::support::*;

#[sqlx::test(migrations = false)]
async fn read_models_follow_the_log_and_equal_a_rebuild(pool: PgPool) {
    let mut world = World::new(&pool, 8, 7).await;
    let (stop, tasks) = start_projectors(&pool);
    world.run(400).await;
    caught_up(&pool).await;
    stop.cancel();
    for task in tasks {
        task.await.unwrap();
    }
    assert_equals_rebuild(&pool).await;
    let stored = load_read_models(&pool).await.unwrap();
    assert!(stored.devices.len() > 20, "the history created devices");
    assert!(stored.devices.values().any(|d| d.status == DeviceStatus::Running));
    assert!(stored.devices.values().any(|d| d.status == DeviceStatus::Deleted));
    // Sessions crossed midnight: some device has usage on consecutive days.
    let days: std::collections::BTreeSet<(Uuid, NaiveDate)> =
        stored.daily_usage.keys().map(|(k, _)| (k.device_id, k.day)).collect();
    assert!(
        days.iter()
            .any(|(d, day)| days.contains(&(*d, *day + chrono::Duration::days(1)))),
        "no session crossed midnight"
    );
}

#[sqlx::test(migrations = false)]
async fn stats_and_usage_hold_the_expected_values(pool: PgPool) {
    let world = World::new(&pool, 1, 1).await;
    let (stop, tasks) = start_projectors(&pool);
    let owner = world.user_id(0);
    // One device, started 23:50 and stopped 00:10 the next day.
    let device = Uuid::now_v7();
    append_session_over_midnight(&world, device, owner, "gcp").await;
    caught_up(&pool).await;
    stop.cancel();
    for task in tasks {
        task.await.unwrap();
    }
    let stored = load_read_models(&pool).await.unwrap();
    let key = StatsKey {
        user_id: owner,
        status: DeviceStatus::Stopped,
        provider: Provider::Gcp,
    };
    assert_eq!(stored.device_stats[&key].device_count, 1);
    assert_eq!(stored.device_stats[&key].total_cpu_cores, 4);
    let day = |d: u32| NaiveDate::from_ymd_opt(2031, 3, d).unwrap();
    let usage = |d: u32| {
        stored
            .daily_usage
            .get(&(
                UsageKey {
                    day: day(d),
                    user_id: owner,
                    device_id: device,
                },
                "USD".to_owned(),
            ))
            .copied()
    };
    assert_eq!(usage(30).map(|u| u.minutes), Some(10));
    assert_eq!(usage(31).map(|u| u.minutes), Some(10));
    let tier_cents_per_hour = match sqlx::query_scalar::<_, String>(
        "SELECT payload->>'pricing_plan_id' FROM user_events WHERE event_type = 'UsageRecorded'",
    )
    .fetch_one(&pool)
    .await
    .unwrap()
    .rsplit('/')
    .next()
    {
        Some("free") => 22,
        Some("pro") => 13,
        _ => 11,
    };
    let cost = (20 * tier_cents_per_hour + 59) / 60;
    assert_eq!(usage(30).unwrap().cost_minor + usage(31).unwrap().cost_minor, cost);
    assert_eq!(stored.devices[&device].minutes_used, 20);
}

/// Creates `device` on `provider` for `owner` at 23:50, starts it, stops it 20 minutes later.
async fn append_session_over_midnight(world: &World, device: Uuid, owner: Uuid, provider: &str) {
    use domain::device::{self, DeviceCommand, DeviceContext, DeviceState};
    use event_log::{AppendBatch, ExpectedVersion, NewEvent, StreamAppend};
    use event_schema::{Event, EventMetadata, StreamType};
    let pricing = domain::PricingTable::standard();
    let reader = event_log::LogReader::new(world.store.pool().clone());
    let owner_events: Vec<Event> = reader
        .read_stream(owner, 0, 100)
        .await
        .unwrap()
        .iter()
        .map(|e| e.decode().unwrap())
        .collect();
    let mut owner_state = domain::UserState::Unregistered;
    for e in &owner_events {
        if let Event::User(e) = e {
            owner_state = domain::user::evolve(owner_state, e);
        }
    }
    world
        .clock
        .set(chrono::TimeZone::with_ymd_and_hms(&chrono::Utc, 2031, 3, 30, 23, 50, 0).unwrap());
    let mut state = DeviceState::Absent;
    let mut version = 0;
    let commands = [
        DeviceCommand::Create {
            device_id: device,
            owner_id: owner,
            provider: provider.into(),
            cpu_cores: 4,
            memory_mb: 4096,
            android_version: 14,
        },
        DeviceCommand::Start,
        DeviceCommand::Stop {
            reason: event_schema::StopReason::Requested,
        },
    ];
    for (i, command) in commands.iter().enumerate() {
        if i == 2 {
            world.clock.advance(chrono::Duration::minutes(20));
        }
        let now = event_log::Clock::now(world.clock.as_ref());
        let events = device::decide(
            command,
            DeviceContext {
                device: &state,
                owner: &owner_state,
                pricing: &pricing,
            },
            now,
        )
        .unwrap();
        let device_events: Vec<Event> = events
            .iter()
            .filter(|e| e.stream_type() == StreamType::Device)
            .cloned()
            .collect();
        let user_events: Vec<Event> = events
            .iter()
            .filter(|e| e.stream_type() == StreamType::User)
            .cloned()
            .collect();
        let encode = |events: &[Event]| {
            events
                .iter()
                .map(|e| NewEvent::from_event(e, EventMetadata::default(), now).unwrap())
                .collect::<Vec<_>>()
        };
        let mut streams = vec![StreamAppend {
            stream_id: device,
            stream_type: StreamType::Device,
            owner_id: owner,
            expected: if version == 0 {
                ExpectedVersion::NoStream
            } else {
                ExpectedVersion::Exact(version)
            },
            events: encode(&device_events),
        }];
        if !user_events.is_empty() {
            streams.push(StreamAppend {
                stream_id: owner,
                stream_type: StreamType::User,
                owner_id: owner,
                expected: ExpectedVersion::Any,
                events: encode(&user_events),
            });
        }
        let outcome = world
            .store
            .append(AppendBatch {
                streams,
                idempotency: None,
            })
            .await
            .unwrap();
        version = outcome.streams[0].version;
        for e in &device_events {
            if let Event::Device(e) = e {
                state = device::evolve(state, e);
            }
        }
    }
}

/// The row version (`xmin`) of each of `owner`'s `device_stats` buckets, by status and provider.
async fn stats_row_versions(pool: &PgPool, owner: Uuid) -> Vec<(String, String, String)> {
    sqlx::query_as("SELECT status, provider, xmin::text FROM device_stats WHERE user_id = $1 ORDER BY 1, 2")
        .bind(owner)
        .fetch_all(pool)
        .await
        .unwrap()
}

#[sqlx::test(migrations = false)]
async fn an_owner_bucket_the_batch_did_not_change_is_not_rewritten(pool: PgPool) {
    let world = World::new(&pool, 1, 1).await;
    let (stop, tasks) = start_projectors(&pool);
    let owner = world.user_id(0);
    append_session_over_midnight(&world, Uuid::now_v7(), owner, "gcp").await;
    caught_up(&pool).await;
    let before = stats_row_versions(&pool, owner).await;
    assert_eq!(before.len(), 1, "{before:?}");
    assert_eq!((before[0].0.as_str(), before[0].1.as_str()), ("stopped", "gcp"));

    // The owner's next device is on another provider: its events touch the owner, and the
    // gcp bucket's sums stay the same, so its row keeps its version.
    append_session_over_midnight(&world, Uuid::now_v7(), owner, "aws").await;
    caught_up(&pool).await;
    stop.cancel();
    for task in tasks {
        task.await.unwrap();
    }
    let after = stats_row_versions(&pool, owner).await;
    assert_eq!(after.len(), 2, "{after:?}");
    assert_eq!((after[0].0.as_str(), after[0].1.as_str()), ("stopped", "aws"));
    assert_eq!(after[1], before[0], "the unchanged gcp bucket was rewritten");
    assert_equals_rebuild(&pool).await;
}

#[sqlx::test(migrations = false)]
async fn a_malformed_event_is_parked_and_an_unknown_type_skipped_and_the_projector_moves_on(pool: PgPool) {
    let mut world = World::new(&pool, 3, 3).await;
    world.run(30).await;
    let device: Uuid = sqlx::query_scalar("SELECT stream_id FROM streams WHERE stream_type = 'device' LIMIT 1")
        .fetch_one(&pool)
        .await
        .unwrap();
    append_raw(
        &pool,
        device,
        "DeviceStarted",
        1,
        json!({"device_id": device, "started_at": "not a time"}),
    )
    .await;
    append_raw(&pool, device, "DeviceStarted", 9, json!({"device_id": device})).await;
    append_raw(&pool, device, "DeviceTeleported", 1, json!({"to": "mars"})).await;
    world.run(30).await;

    let (stop, tasks) = start_projectors(&pool);
    caught_up(&pool).await;
    stop.cancel();
    for task in tasks {
        task.await.unwrap();
    }
    let parked: Vec<(String, String, i32)> =
        sqlx::query_as("SELECT projection, event_type, schema_version FROM projection_dead_letters ORDER BY projection, schema_version")
            .fetch_all(&pool)
            .await
            .unwrap();
    // The fleet projection parks both bad DeviceStarted (a malformed payload, a version from
    // the future); daily_usage parks them too (it decodes every event). The unknown type is
    // skipped by both.
    assert_eq!(
        parked,
        [
            ("daily_usage".to_owned(), "DeviceStarted".to_owned(), 1),
            ("daily_usage".to_owned(), "DeviceStarted".to_owned(), 9),
            ("fleet".to_owned(), "DeviceStarted".to_owned(), 1),
            ("fleet".to_owned(), "DeviceStarted".to_owned(), 9),
        ]
    );
    assert_equals_rebuild(&pool).await;
}

#[sqlx::test(migrations = false)]
async fn two_instances_of_one_projection_never_count_twice(pool: PgPool) {
    let mut world = World::new(&pool, 6, 11).await;
    // Two full sets of projectors on the same checkpoints.
    let (stop_a, tasks_a) = start_projectors(&pool);
    let (stop_b, tasks_b) = start_projectors(&pool);
    world.run(300).await;
    caught_up(&pool).await;
    stop_a.cancel();
    stop_b.cancel();
    for task in tasks_a.into_iter().chain(tasks_b) {
        task.await.unwrap();
    }
    assert_equals_rebuild(&pool).await;
}

#[sqlx::test(migrations = false)]
async fn a_projector_whose_connections_are_killed_resumes_from_its_checkpoint(pool: PgPool) {
    let mut world = World::new(&pool, 6, 5).await;
    let (stop, tasks) = start_projectors(&pool);
    for _ in 0..5 {
        world.run(60).await;
        // Kill every other backend of this database: the projectors' and the store's.
        sqlx::query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        .execute(&pool)
        .await
        .unwrap();
    }
    world.run(30).await;
    caught_up(&pool).await;
    stop.cancel();
    for task in tasks {
        task.await.unwrap();
    }
    assert_equals_rebuild(&pool).await;
    let checkpoints: Vec<String> = sqlx::query_scalar("SELECT projection FROM projection_checkpoints ORDER BY 1")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(checkpoints, [Projection::DailyUsage.name(), Projection::Fleet.name()]);
}

/// The `daily_usage` rows (day, device, currency, minutes, cost) `conn` sees.
async fn usage_rows(conn: &mut sqlx::PgConnection) -> Vec<(NaiveDate, Uuid, String, i64, i64)> {
    sqlx::query_as("SELECT day, device_id, currency, minutes, cost_minor FROM daily_usage ORDER BY day, device_id")
        .fetch_all(conn)
        .await
        .unwrap()
}

fn created(device: Uuid, owner: Uuid, at: DateTime<Utc>) -> event_log::NewEvent {
    test_support::fixtures::new_event(event_schema::DeviceCreated {
        device_id: device,
        owner_id: owner,
        provider: Provider::Aws,
        cpu_cores: 2,
        memory_mb: 2048,
        android_version: 14,
        created_at: at,
    })
}

/// A 10-minute session of `device` from `started_at`, costing `amount_minor`.
fn session(
    device: Uuid,
    owner: Uuid,
    started_at: DateTime<Utc>,
    amount_minor: i64,
    currency: event_schema::Currency,
) -> event_log::NewEvent {
    test_support::fixtures::new_event(event_schema::UsageRecorded {
        owner_id: owner,
        device_id: device,
        provider: Provider::Aws,
        started_at,
        ended_at: started_at + chrono::Duration::minutes(10),
        minutes: 10,
        cost: event_schema::Money { amount_minor, currency },
        pricing_plan_id: "aws-standard-v1".to_owned(),
    })
}

fn to_stream(device: Uuid, owner: Uuid, expected: ExpectedVersion, events: Vec<event_log::NewEvent>) -> StreamAppend {
    StreamAppend {
        stream_id: device,
        stream_type: event_schema::StreamType::Device,
        owner_id: owner,
        expected,
        events,
    }
}

async fn open_store(pool: &PgPool) -> event_log::EventStore {
    test_support::db::migrated(pool).await;
    event_log::EventStore::open(pool.clone(), event_log::StoreConfig::default())
        .await
        .unwrap()
}

/// Version 1 of `daily_usage` keys its rows without the currency. A batch holding one device's
/// usage of one day in two currencies made PostgreSQL refuse the batch's upsert ("ON CONFLICT
/// DO UPDATE command cannot affect row a second time"), and the projector retried that batch
/// for ever: under load, where batches grow, the projection stood still. The batch now gives
/// the rows that applying its events one at a time gives.
#[sqlx::test(migrations = false)]
async fn a_batch_with_one_device_day_in_two_currencies_applies_as_its_events_one_at_a_time(pool: PgPool) {
    use event_schema::Currency;
    let store = open_store(&pool).await;
    let (device, owner) = (Uuid::now_v7(), Uuid::now_v7());
    let morning = t0() - chrono::Duration::hours(10);
    let mut events = vec![created(device, owner, morning)];
    for (hour, currency) in [(1, Currency::USD), (2, Currency::EUR), (3, Currency::USD)] {
        events.push(session(
            device,
            owner,
            morning + chrono::Duration::hours(hour),
            100 * hour,
            currency,
        ));
    }
    store
        .append(AppendBatch::single(to_stream(
            device,
            owner,
            ExpectedVersion::NoStream,
            events,
        )))
        .await
        .unwrap();
    let logged = event_log::LogReader::new(pool.clone()).read_all(0, 100).await.unwrap();
    assert_eq!(logged.len(), 4);
    let layout = Projection::DailyUsage.layout(1).unwrap();

    let mut tx = pool.begin().await.unwrap();
    for event in &logged {
        projections::apply::apply_events(&mut tx, layout, std::slice::from_ref(event))
            .await
            .unwrap();
    }
    let one_at_a_time = usage_rows(&mut tx).await;
    tx.rollback().await.unwrap();
    assert_eq!(
        one_at_a_time,
        vec![(morning.date_naive(), device, "USD".to_owned(), 30, 600)],
        "version 1: one row per device and day, in the currency it was created with"
    );

    let mut tx = pool.begin().await.unwrap();
    let applied = projections::apply::apply_events(&mut tx, layout, &logged)
        .await
        .unwrap();
    assert_eq!(applied.applied, 3, "the three usage events");
    assert_eq!(applied.dead_lettered, 0);
    assert_eq!(usage_rows(&mut tx).await, one_at_a_time);
    let refused: Option<String> = sqlx::query_scalar("SELECT min(error) FROM projection_dead_letters")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(refused, None, "the batch folded whole, not event by event");
    tx.rollback().await.unwrap();

    // And the projector itself goes past such a batch (it starts after the four events, so
    // its first batch holds them all).
    let (stop, tasks) = start_projectors(&pool);
    caught_up(&pool).await;
    stop.cancel();
    for task in tasks {
        task.await.unwrap();
    }
    let mut conn = pool.acquire().await.unwrap();
    assert_eq!(usage_rows(&mut conn).await, one_at_a_time);
}

/// What a day of one device costs in [`a_device_whose_day_is_full`]: any more overflows the
/// `bigint` of its `daily_usage` row, so the database refuses it.
const FULL: i64 = i64::MAX - 5;

/// A device whose day already costs [`FULL`].
struct FullDay {
    rich: Uuid,
    owner: Uuid,
    morning: DateTime<Utc>,
}

/// Appends a device with one session costing [`FULL`], and projects it (the projectors are
/// stopped again on return).
async fn a_device_whose_day_is_full(pool: &PgPool, store: &event_log::EventStore) -> FullDay {
    let (rich, owner) = (Uuid::now_v7(), Uuid::now_v7());
    let morning = t0() - chrono::Duration::hours(10);
    let events = vec![
        created(rich, owner, morning),
        session(
            rich,
            owner,
            morning + chrono::Duration::hours(1),
            FULL,
            event_schema::Currency::USD,
        ),
    ];
    store
        .append(AppendBatch::single(to_stream(
            rich,
            owner,
            ExpectedVersion::NoStream,
            events,
        )))
        .await
        .unwrap();
    let (stop, tasks) = start_projectors(pool);
    caught_up(pool).await;
    stop.cancel();
    for task in tasks {
        task.await.unwrap();
    }
    FullDay { rich, owner, morning }
}

/// An event the database refuses stops nothing: the batch holding it is applied again in
/// halves, the event is parked with the database's error, and the events around it are
/// applied. (Here the refusal is a day's cost overflowing its bigint; before, the projector
/// retried the refused batch for ever and the projection stood still.)
#[sqlx::test(migrations = false)]
async fn an_event_the_database_refuses_is_parked_and_the_events_beside_it_are_applied(pool: PgPool) {
    use event_schema::Currency;
    let store = open_store(&pool).await;
    let FullDay { rich, owner, morning } = a_device_whose_day_is_full(&pool, &store).await;
    let (other, third) = (Uuid::now_v7(), Uuid::now_v7());
    let (stop, tasks) = start_projectors(&pool);

    // One commit, so one batch: another device's events, then a session the database cannot
    // add to the first device's day, then a third device's events.
    let later = morning + chrono::Duration::hours(2);
    let appended = store
        .append(AppendBatch {
            streams: vec![
                to_stream(
                    other,
                    owner,
                    ExpectedVersion::NoStream,
                    vec![
                        created(other, owner, later),
                        session(other, owner, later, 70, Currency::USD),
                    ],
                ),
                to_stream(
                    rich,
                    owner,
                    ExpectedVersion::Exact(2),
                    vec![session(rich, owner, later, 100, Currency::USD)],
                ),
                to_stream(
                    third,
                    owner,
                    ExpectedVersion::NoStream,
                    vec![
                        created(third, owner, later),
                        session(third, owner, later, 30, Currency::USD),
                    ],
                ),
            ],
            idempotency: None,
        })
        .await;
    let appended = appended.unwrap_or_else(|e| panic!("{e}"));
    caught_up(&pool).await;
    stop.cancel();
    for task in tasks {
        task.await.unwrap();
    }

    let mut conn = pool.acquire().await.unwrap();
    let day = morning.date_naive();
    assert_eq!(
        usage_rows(&mut conn).await,
        {
            let mut rows = vec![
                (day, rich, "USD".to_owned(), 10, FULL),
                (day, other, "USD".to_owned(), 10, 70),
                (day, third, "USD".to_owned(), 10, 30),
            ];
            rows.sort();
            rows
        },
        "the refused session is not counted; the sessions beside it are"
    );
    let parked: Vec<(String, i64, String)> =
        sqlx::query_as("SELECT projection, position, error FROM projection_dead_letters ORDER BY id")
            .fetch_all(&mut *conn)
            .await
            .unwrap();
    assert_eq!(parked.len(), 1, "{parked:?}");
    let (projection, position, error) = &parked[0];
    assert_eq!(projection, "daily_usage");
    assert_eq!(*position, appended.last_position - 2, "the refused session's position");
    assert!(
        error.contains("the database refused it") && error.contains("out of range"),
        "{error}"
    );
}

/// At scale: a catch-up batch of 2 000 events with one the database refuses in its middle.
/// Halving finds it in about 2·log2(2 000) attempts (event by event it would be 2 000), parks
/// it alone, and applies the other 1 999 events in the same batch.
#[sqlx::test(migrations = false)]
async fn a_large_batch_with_one_refused_event_parks_that_event_alone(pool: PgPool) {
    use event_schema::Currency;
    const DEVICES: usize = 1_000;
    let store = open_store(&pool).await;
    let FullDay { rich, owner, morning } = a_device_whose_day_is_full(&pool, &store).await;

    // With the projectors stopped: 1 000 devices with a session each, and in the middle a
    // session the first device's day cannot take.
    let later = morning + chrono::Duration::hours(2);
    let mut streams: Vec<StreamAppend> = (0..DEVICES)
        .map(|_| {
            let device = Uuid::now_v7();
            to_stream(
                device,
                owner,
                ExpectedVersion::NoStream,
                vec![
                    created(device, owner, later),
                    session(device, owner, later, 1, Currency::USD),
                ],
            )
        })
        .collect();
    streams.insert(
        DEVICES / 2,
        to_stream(
            rich,
            owner,
            ExpectedVersion::Exact(2),
            vec![session(rich, owner, later, 100, Currency::USD)],
        ),
    );
    let appended = store
        .append(AppendBatch {
            streams,
            idempotency: None,
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let refused_position = 2 + 2 * (DEVICES / 2) as i64 + 1;

    // One batch holds them all.
    let stop = tokio_util::sync::CancellationToken::new();
    let config = projections::runner::ProjectorConfig {
        batch_size: 10_000,
        ..projections::runner::ProjectorConfig::default()
    };
    let tasks = projections::runner::spawn_log_projectors(&pool, config, &stop);
    caught_up(&pool).await;
    stop.cancel();
    for task in tasks {
        task.await.unwrap();
    }

    let mut conn = pool.acquire().await.unwrap();
    let parked: Vec<(i64, String)> = sqlx::query_as("SELECT position, error FROM projection_dead_letters")
        .fetch_all(&mut *conn)
        .await
        .unwrap();
    assert_eq!(parked.len(), 1, "{parked:?}");
    assert_eq!(parked[0].0, refused_position);
    assert!(parked[0].1.contains("out of range"), "{}", parked[0].1);
    let (rows, minutes, rich_cost): (i64, i64, i64) = sqlx::query_as(
        "SELECT count(*), sum(minutes)::bigint, max(cost_minor) FILTER (WHERE device_id = $1) FROM daily_usage",
    )
    .bind(rich)
    .fetch_one(&mut *conn)
    .await
    .unwrap();
    assert_eq!(rows, DEVICES as i64 + 1);
    assert_eq!(minutes, 10 * (DEVICES as i64 + 1), "every session but the refused one");
    assert_eq!(rich_cost, FULL);
    assert_eq!(appended.last_position, 2 + 2 * DEVICES as i64 + 1);
}

/// A tailing batch plans each statement once per connection (PostgreSQL re-planned the
/// batch's `= ANY($1)` lookups on every execution: a short array always looks cheaper to a
/// custom plan); a catch-up batch commits without waiting for the flush. Both settings end
/// with the batch's transaction: the second batch runs on the first one's connection.
#[sqlx::test(migrations = false)]
async fn a_batch_sets_its_planning_and_its_commit_for_its_size(pool: PgPool) {
    let one = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect_with((*pool.connect_options()).clone())
        .await
        .unwrap();
    let settings = "SELECT current_setting('plan_cache_mode'), current_setting('synchronous_commit')";

    let mut tailing = projections::apply::begin_batch(&one, 10).await.unwrap();
    let (plans, commit): (String, String) = sqlx::query_as(settings).fetch_one(&mut *tailing).await.unwrap();
    assert_eq!((plans.as_str(), commit.as_str()), ("force_generic_plan", "on"));
    tailing.commit().await.unwrap();

    let mut catching_up = projections::apply::begin_batch(&one, 5_000).await.unwrap();
    let (plans, commit): (String, String) = sqlx::query_as(settings).fetch_one(&mut *catching_up).await.unwrap();
    assert_eq!((plans.as_str(), commit.as_str()), ("auto", "off"));
    catching_up.commit().await.unwrap();
}

/// A caught-up projector gathers what is committed after a batch for its
/// `min_batch_interval`: under steady appends, fewer transactions (each with a WAL flush)
/// of more events. What comes after the interval is applied all the same, and a stop does
/// not wait for the interval.
#[sqlx::test(migrations = false)]
async fn a_commit_right_after_a_batch_waits_for_the_min_batch_interval_then_is_applied(pool: PgPool) {
    let store = open_store(&pool).await;
    let interval = std::time::Duration::from_secs(3);
    let stop = tokio_util::sync::CancellationToken::new();
    let config = projections::runner::ProjectorConfig {
        min_batch_interval: interval,
        ..projections::runner::ProjectorConfig::default()
    };
    let tasks = projections::runner::spawn_log_projectors(&pool, config, &stop);
    let create = |device: Uuid| {
        let owner = Uuid::now_v7();
        AppendBatch::single(to_stream(
            device,
            owner,
            ExpectedVersion::NoStream,
            vec![created(device, owner, t0())],
        ))
    };
    store.append(create(Uuid::now_v7())).await.unwrap();
    caught_up(&pool).await;

    let appended = std::time::Instant::now();
    store.append(create(Uuid::now_v7())).await.unwrap();
    caught_up(&pool).await;
    // The first batch ended before `caught_up` saw it, so the interval began a little before
    // the append: half of it is left for that.
    assert!(
        appended.elapsed() >= interval / 2,
        "applied {:?} after its append, within the projector's interval of {interval:?}",
        appended.elapsed()
    );
    // Both projectors now wait out an interval that began with the batch just applied.
    let stopping = std::time::Instant::now();
    stop.cancel();
    for task in tasks {
        task.await.unwrap();
    }
    assert!(
        stopping.elapsed() < interval / 3,
        "stopping took {:?}: it waited for the interval",
        stopping.elapsed()
    );
    let devices: i64 = sqlx::query_scalar("SELECT count(*) FROM devices")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(devices, 2);
}
