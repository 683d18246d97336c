//! Read routing against a real streaming replica (ops/dev/replica.sh): reads go to the
//! replica while it is well, survive it stopping, come back when it restarts; a read with a
//! position sees that write every time, and so does an audit export with one.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use event_log::{EventStore, StoreConfig};
use projections::runner::{ProjectorConfig, spawn_log_projectors};
use query_api::{ReadError, ReadSources, Source, SourcesConfig};
use sqlx::PgPool;
use test_support::services::{ReplayPaused, replica};
use test_support::urls;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::support::*;

async fn count_checkpoints(pool: PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT count(*) FROM projection_checkpoints")
        .fetch_one(&pool)
        .await
}

#[sqlx::test(migrations = false)]
async fn reads_go_to_the_replica_survive_its_outage_and_return_when_it_is_back(pool: PgPool) {
    let sources = replica_sources(&pool).await;
    let (_, source) = sources.read(count_checkpoints).await.unwrap();
    assert!(matches!(source, Source::Replica(_)), "{source:?}");

    // Queries keep running while the replica goes down: none fails.
    let done = Arc::new(AtomicUsize::new(0));
    let reader = {
        let (sources, done) = (sources.clone(), Arc::clone(&done));
        tokio::spawn(async move {
            let mut answered = Vec::new();
            for _ in 0..400 {
                let (_, source) = sources.read(count_checkpoints).await.expect("no query fails");
                answered.push(source);
                done.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            answered
        })
    };
    while done.load(Ordering::Relaxed) < 20 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    replica("stop");
    let answered = reader.await.unwrap();
    assert!(answered.contains(&Source::Primary), "the primary took over");
    in_rotation(&sources, false).await;
    let (_, source) = sources.read(count_checkpoints).await.unwrap();
    assert_eq!(source, Source::Primary);

    replica("start");
    in_rotation(&sources, true).await;
    let (_, source) = sources.read(count_checkpoints).await.unwrap();
    assert!(matches!(source, Source::Replica(_)), "{source:?}");

    // A query error that is the query's fault is not a replica failure.
    let error = sources
        .read(|pool| async move { sqlx::query("SELECT * FROM no_such_table").execute(&pool).await })
        .await
        .unwrap_err();
    assert!(matches!(error, ReadError::Database(_)), "{error}");
    assert!(sources.replica_states().iter().all(|(_, healthy, _)| *healthy));
    // Nor is a statement stopped by its statement_timeout: it is not run again elsewhere.
    let runs = Arc::new(AtomicUsize::new(0));
    let error = sources
        .read(|pool| {
            let runs = Arc::clone(&runs);
            async move {
                runs.fetch_add(1, Ordering::Relaxed);
                let mut tx = pool.begin().await?;
                sqlx::query("SET LOCAL statement_timeout = 10")
                    .execute(&mut *tx)
                    .await?;
                sqlx::query("SELECT pg_sleep(1)").execute(&mut *tx).await
            }
        })
        .await
        .unwrap_err();
    assert!(error.to_string().contains("statement timeout"), "{error}");
    assert_eq!(
        runs.load(Ordering::Relaxed),
        1,
        "a timed-out statement was retried on the primary"
    );
    assert!(sources.replica_states().iter().all(|(_, healthy, _)| *healthy));
}

#[sqlx::test(migrations = false)]
async fn a_read_with_a_position_sees_that_write_every_time(pool: PgPool) {
    let sources = replica_sources(&pool).await;
    let stop = CancellationToken::new();
    let projectors = spawn_log_projectors(&pool, ProjectorConfig::default(), &stop);
    let store = Arc::new(EventStore::open(pool.clone(), StoreConfig::default()).await.unwrap());
    let owner = Uuid::now_v7();
    let mut from_replica = 0;
    for _ in 0..1000 {
        let (device, position) = append_device_created(&store, owner).await;
        let route = sources.source_at(position).await.unwrap();
        let (source_pool, source) = (route.pool, route.source);
        let seen: Option<Uuid> = sqlx::query_scalar("SELECT device_id FROM devices WHERE device_id = $1")
            .bind(device)
            .fetch_optional(&source_pool)
            .await
            .unwrap();
        assert_eq!(seen, Some(device), "device {device} not visible on {source:?}");
        from_replica += i32::from(matches!(source, Source::Replica(_)));
    }
    assert!(from_replica > 0, "the replica answered none of the reads");

    // A position the log never reached: a clear error after the bounded wait.
    let impatient = ReadSources::new(
        pool.clone(),
        &[],
        SourcesConfig {
            position_wait: Duration::from_millis(200),
            ..SourcesConfig::default()
        },
    )
    .unwrap();
    let error = impatient.source_at(1_000_000).await.unwrap_err();
    assert!(
        matches!(error, ReadError::NotYetVisible { wanted: 1_000_000, .. }),
        "{error}"
    );
    stop.cancel();
    for task in projectors {
        task.await.unwrap();
    }
}

/// Queries until one is answered by the replica.
async fn answered_by_replica(api: &TestApi, token: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let answer = api
            .query(token, "{ devices { totalCount } }", serde_json::json!({}))
            .await;
        answer.data();
        if answer.source.as_deref() == Some("replica") {
            return;
        }
        assert!(Instant::now() < deadline, "the replica never answered: {answer:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Asks `{ devices { totalCount } }` until `source` answers it with `total`; fails with `why`.
async fn devices_counted_by(api: &TestApi, token: &str, source: &str, total: &str, why: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let answer = api
            .post_json(
                Some(token),
                &serde_json::json!({"query": "{ devices { totalCount } }"}),
                &[],
            )
            .await;
        if answer.source.as_deref() == Some(source) && answer.data()["devices"]["totalCount"] == total {
            return;
        }
        assert!(Instant::now() < deadline, "{why}: {answer:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the replica has replayed everything the primary had written when called.
async fn replica_holds_the_primarys_writes(pool: &PgPool) {
    let (written,): (String,) = sqlx::query_as("SELECT pg_current_wal_lsn()::text")
        .fetch_one(pool)
        .await
        .unwrap();
    let replica = PgPool::connect(&urls::replica_database(pool).await).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (replayed,): (Option<bool>,) = sqlx::query_as("SELECT pg_last_wal_replay_lsn() >= $1::pg_lsn")
            .bind(&written)
            .fetch_one(&replica)
            .await
            .unwrap();
        if replayed == Some(true) {
            break;
        }
        assert!(Instant::now() < deadline, "the replica never replayed up to {written}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    replica.close().await;
}

#[sqlx::test(migrations = false)]
async fn graphql_queries_never_fail_while_the_replica_stops_and_use_it_again_when_it_returns(pool: PgPool) {
    let _ = replica_sources(&pool).await;
    let owner = Uuid::from_u128(0x0ca);
    insert_devices(
        &pool,
        &(0..50u128)
            .map(|n| {
                SeedDevice::small(
                    Uuid::from_u128(0xc0_0000 + n),
                    owner,
                    "aws",
                    "running",
                    at(i64::try_from(n).unwrap()),
                )
            })
            .collect::<Vec<_>>(),
    )
    .await;
    derive_device_stats(&pool).await;
    set_checkpoints(&pool, 1).await;
    // The pollers assert every answer whole, from the start: the replica must hold the rows
    // first. In rotation it may not yet (rotation is judged by WAL lag, and a busy machine
    // replays late).
    replica_holds_the_primarys_writes(&pool).await;
    let api = Arc::new(on_replica(&pool).await);
    let token = admin();
    answered_by_replica(&api, &token).await;

    // Four dashboards poll while the replica goes down and comes back.
    let polling = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let answered = Arc::new(AtomicUsize::new(0));
    let pollers: Vec<_> = (0..4)
        .map(|_| {
            let (api, token, polling, answered) = (
                Arc::clone(&api),
                token.clone(),
                Arc::clone(&polling),
                Arc::clone(&answered),
            );
            tokio::spawn(async move {
                let mut sources = Vec::new();
                while polling.load(Ordering::Relaxed) {
                    let answer = api
                        .query(
                            &token,
                            "{ deviceStats { totals { deviceCount } } devices(first: 10) { totalCount nodes { id } } }",
                            serde_json::json!({}),
                        )
                        .await;
                    // Zero failed queries: every answer is complete and right.
                    assert_eq!(answer.data()["devices"]["totalCount"], "50", "{answer:?}");
                    assert_eq!(answer.data()["deviceStats"]["totals"]["deviceCount"], "50");
                    sources.push(answer.source.unwrap());
                    answered.fetch_add(1, Ordering::Relaxed);
                }
                sources
            })
        })
        .collect();
    let wait_for = |n: usize| {
        let answered = Arc::clone(&answered);
        async move {
            let target = answered.load(Ordering::Relaxed) + n;
            // A poller whose assertion failed stops answering: fail here, not at the runner's
            // timeout (its panic is in the output).
            let deadline = Instant::now() + Duration::from_secs(60);
            while answered.load(Ordering::Relaxed) < target {
                assert!(Instant::now() < deadline, "the pollers stopped answering");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };
    wait_for(50).await;
    replica("stop");
    wait_for(200).await;
    replica("start");
    answered_by_replica(&api, &token).await;
    wait_for(50).await;
    polling.store(false, Ordering::Relaxed);
    let mut sources = Vec::new();
    for poller in pollers {
        sources.extend(poller.await.unwrap());
    }
    assert!(
        sources.iter().any(|s| s == "primary"),
        "the primary answered during the outage"
    );
    assert!(
        sources.iter().any(|s| s == "replica"),
        "the replica answered before and after"
    );
    let readiness = api.readiness().await;
    assert_eq!(readiness["replicas"][0]["in_rotation"], true, "{readiness}");
}

#[sqlx::test(migrations = false)]
async fn a_lagging_replica_leaves_rotation_and_rejoins_once_it_has_caught_up(pool: PgPool) {
    let _ = replica_sources(&pool).await;
    set_checkpoints(&pool, 1).await;
    let url = urls::replica_database(&pool).await;
    let config = query_api::QueryApiConfig {
        replica_urls: vec![url.clone()],
        sources: SourcesConfig {
            max_lag_bytes: 256 * 1024,
            position_wait: Duration::from_millis(300),
            ..SourcesConfig::default()
        },
        health_interval: Duration::from_millis(50),
        ..test_config()
    };
    let api = start(&pool, config).await;
    let token = admin();
    answered_by_replica(&api, &token).await;

    // Replay stops on the replica while the primary keeps writing: its lag grows past 256 KiB.
    let paused = ReplayPaused::pause(&url).await;
    let owner = Uuid::from_u128(0x1a9);
    let devices: Vec<SeedDevice> = (0..3_000u128)
        .map(|n| SeedDevice {
            id: Uuid::from_u128(0x1a90_0000 + n),
            owner,
            provider: "azure",
            status: "running",
            cpu: 1,
            memory: 512,
            created_at: at(i64::try_from(n).unwrap()),
        })
        .collect();
    insert_devices(&pool, &devices).await;
    set_checkpoints(&pool, 2).await;
    sqlx::query("SELECT pg_switch_wal()").execute(&pool).await.unwrap();

    // Out of rotation: every answer now comes from the primary, and is fresh.
    devices_counted_by(
        &api,
        &token,
        "primary",
        "3000",
        "the lagging replica stayed in rotation",
    )
    .await;
    let readiness = api.readiness().await;
    assert_eq!(
        readiness["status"], "ready",
        "reads fall back to the primary: still ready"
    );
    assert_eq!(readiness["replicas"][0]["in_rotation"], false, "{readiness}");
    // Read-your-writes at the new position is answered (by the primary), not refused.
    let answer = api
        .post_json(
            Some(&token),
            &serde_json::json!({"query": "{ devices { totalCount } }"}),
            &[("x-min-position", "2")],
        )
        .await;
    assert_eq!(answer.data()["devices"]["totalCount"], "3000");
    assert_eq!(answer.source.as_deref(), Some("primary"));

    // Replay resumes: the replica catches up and serves again, the new rows too. Rejoining
    // rotation is judged by WAL lag, and an answer without a position may reflect the
    // checkpoints the replica had at the last watermark read (20 ms ago at most), whose answer
    // the cache holds: the first answers after the rejoin may still be the old ones ("0").
    drop(paused);
    devices_counted_by(
        &api,
        &token,
        "replica",
        "3000",
        "the replica never served the rows it caught up with",
    )
    .await;
}

/// `GET /v1/audit/events` as an admin, with `headers`: status, `x-read-source` and the body.
async fn export(api: &TestApi, headers: &[(&str, &str)]) -> (reqwest::StatusCode, Option<String>, String) {
    let mut request = api
        .client
        .get(format!("http://{}/v1/audit/events", api.addr))
        .bearer_auth(admin());
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.unwrap();
    let source = response
        .headers()
        .get("x-read-source")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    (response.status(), source, response.text().await.unwrap())
}

/// The `last_position` of an NDJSON export's trailer.
fn exported_up_to(body: &str) -> Option<i64> {
    let trailer: serde_json::Value = serde_json::from_str(body.lines().last().unwrap()).unwrap();
    trailer["trailer"]["last_position"].as_i64()
}

#[sqlx::test(migrations = false)]
async fn an_export_with_a_position_holds_that_event_while_the_replica_is_behind(pool: PgPool) {
    let _ = replica_sources(&pool).await;
    let url = urls::replica_database(&pool).await;
    let config = query_api::QueryApiConfig {
        replica_urls: vec![url.clone()],
        health_interval: Duration::from_millis(50),
        ..test_config()
    };
    let api = start(&pool, config).await;
    answered_by_replica(&api, &admin()).await;

    // Replay stops on the replica (within its lag limit, so it stays in rotation); a command's
    // event is then acknowledged on the primary and the projections apply it there.
    let paused = ReplayPaused::pause(&url).await;
    let store = EventStore::open(pool.clone(), StoreConfig::default()).await.unwrap();
    let (device, position) = append_device_created(&store, Uuid::now_v7()).await;
    set_checkpoints(&pool, position).await;

    // Without a position the replica answers, and its log does not have the event yet.
    let (status, source, body) = export(&api, &[]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(source.as_deref(), Some("replica"));
    assert!(exported_up_to(&body) < Some(position), "{body}");
    // With the command's position the export holds it, read from the primary.
    let wanted = position.to_string();
    let (status, source, body) = export(&api, &[("x-min-position", &wanted)]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(source.as_deref(), Some("primary"));
    assert_eq!(exported_up_to(&body), Some(position), "{body}");
    assert!(body.contains(&device.to_string()), "{body}");
    // A malformed position is refused before any byte of history.
    let (status, _, body) = export(&api, &[("x-min-position", "soon")]).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("X-Min-Position"), "{body}");

    // Once the replica has replayed the position it serves such exports again.
    drop(paused);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, source, body) = export(&api, &[("x-min-position", &wanted)]).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(exported_up_to(&body), Some(position), "{body}");
        if source.as_deref() == Some("replica") {
            break;
        }
        assert!(Instant::now() < deadline, "the replica never served the position again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Subscriptions read from the replica, and push a change only once the replica holds it:
/// an evaluation on a replica that had not replayed the batch would find the answer
/// unchanged and push nothing, and no later batch would come to correct it.
#[sqlx::test(migrations = false)]
async fn a_subscription_on_a_replica_is_pushed_every_change_once_the_replica_holds_it(pool: PgPool) {
    let sources = replica_sources(&pool).await;
    drop(sources);
    let api = on_replica(&pool).await;
    let stop = CancellationToken::new();
    let projectors = spawn_log_projectors(&pool, ProjectorConfig::default(), &stop);
    let store = Arc::new(EventStore::open(pool.clone(), StoreConfig::default()).await.unwrap());
    let owner = Uuid::now_v7();
    let mut socket =
        test_support::live::LiveClient::connect(api.addr, &token(owner, http_edge::auth::Role::User)).await;
    socket
        .subscribe(
            "fleet",
            "subscription { devices(first: 100) { totalCount } }",
            serde_json::json!({}),
        )
        .await;
    socket.next_of("fleet").await;
    for created in 1..=30 {
        append_device_created(&store, owner).await;
        let pushed = socket
            .next_until("fleet", |p| big(&p["data"]["devices"]["totalCount"]) >= created)
            .await;
        assert_eq!(big(&pushed["data"]["devices"]["totalCount"]), created);
    }
    let fallbacks = api.metric("cloudphone_read_fallbacks_total").await;
    assert!(
        fallbacks < 30.0,
        "every evaluation fell back to the primary ({fallbacks})"
    );
    stop.cancel();
    for task in projectors {
        task.await.unwrap();
    }
}

/// `WAITING` requests waiting for position 20 while the checkpoints stand at 10, on sources
/// whose primary is a pool of its own that counts its takes (every statement the sources run
/// takes a connection); returned once the first read has been made, so all of them wait.
struct Waiting {
    primary: PgPool,
    reads: Arc<AtomicUsize>,
    requests: Vec<tokio::task::JoinHandle<Result<query_api::Route, ReadError>>>,
}

const WAITING: usize = 64;

async fn requests_waiting_for_position_20(pool: &PgPool) -> Waiting {
    migrated(pool).await;
    set_checkpoints(pool, 10).await;
    let reads = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&reads);
    let primary = sqlx::postgres::PgPoolOptions::new()
        .max_connections(16)
        .before_acquire(move |_, _| {
            counted.fetch_add(1, Ordering::Relaxed);
            Box::pin(async { Ok(true) })
        })
        .connect_with((*pool.connect_options()).clone())
        .await
        .unwrap();
    let config = SourcesConfig {
        position_wait: Duration::from_secs(30),
        ..SourcesConfig::default()
    };
    let sources = ReadSources::new(primary.clone(), &[], config).unwrap();
    let requests = (0..WAITING)
        .map(|_| {
            let sources = sources.clone();
            tokio::spawn(async move { sources.source_at(20).await })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    while reads.load(Ordering::Relaxed) == 0 {
        assert!(Instant::now() < deadline, "no request read the checkpoints");
        tokio::task::yield_now().await;
    }
    Waiting {
        primary,
        reads,
        requests,
    }
}

/// Requests waiting for one position share their reads of the checkpoints. Each used to read
/// them on its own, every 2 to 50 ms: in `load platform` about 470 waiting requests/s kept
/// every connection of the query API's primary pool busy with those reads alone.
#[sqlx::test(migrations = false)]
async fn requests_waiting_for_a_position_share_their_reads_of_the_checkpoints(pool: PgPool) {
    let waiting = requests_waiting_for_position_20(&pool).await;
    // What the waiting costs over a fixed stretch of it (the measure, not a synchronisation).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let while_waiting = waiting.reads.load(Ordering::Relaxed);
    // Each alone would read about 14 times in those 500 ms (pauses of 2, 4, ... 50 ms).
    assert!(
        while_waiting < WAITING,
        "{WAITING} waiting requests read the checkpoints {while_waiting} times in 500 ms"
    );

    set_checkpoints(&pool, 20).await;
    for request in waiting.requests {
        let route = request.await.unwrap().unwrap();
        assert_eq!(route.source, Source::Primary);
        assert!(route.checkpoints.is_some_and(|at| at.least() >= 20));
    }
}

/// A fault in the middle of the wait: once the primary's checkpoints cannot be read, every
/// request waiting for a position fails with that error, not after its whole wait.
#[sqlx::test(migrations = false)]
async fn requests_waiting_for_a_position_fail_at_once_when_the_checkpoints_cannot_be_read(pool: PgPool) {
    let waiting = requests_waiting_for_position_20(&pool).await;
    waiting.primary.close().await;
    let failed = Instant::now();
    for request in waiting.requests {
        let error = request.await.unwrap().unwrap_err();
        assert!(matches!(error, ReadError::Checkpoints(_)), "{error}");
    }
    assert!(
        failed.elapsed() < Duration::from_secs(5),
        "the waiting requests took {:?} to fail (they may wait 30 s)",
        failed.elapsed()
    );
}
