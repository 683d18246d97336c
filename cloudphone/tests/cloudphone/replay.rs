//! `cloudphone replay` end to end: dashboards querying the real query API through a rebuild
//! and swap see no error and never an empty or half-built model; a replay process killed
//! (SIGKILL) mid-rebuild resumes from its checkpoint to the same result.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use event_log::{EventStore, LogReader, StoreConfig};
use http_edge::auth::{KeySource, Role};
use projections::fold_log;
use projections::replay::{self, ReplayConfig, Unobserved};
use projections::runner::{ProjectorConfig, spawn_log_projectors};
use query_api::{QueryApi, QueryApiConfig};
use read_models::Projection;
use read_models::stored::load_read_models;
use serde_json::{Value, json};
use sqlx::PgPool;
use test_support::roles::{KillOnDrop, init_test_logs};
use test_support::{db, tokens, urls};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::support::{projections_reach, write_history};

const SECRET: &str = "replay-test-secret";

async fn head(pool: &PgPool) -> i64 {
    LogReader::new(pool.clone()).head().await.unwrap().position
}

/// Appends device histories until the log holds at least `events` events.
async fn history(pool: &PgPool, store: &Arc<EventStore>, events: i64, seed: u64) {
    let done = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn(write_history(
        Arc::clone(store),
        Arc::clone(&done),
        seed,
        Duration::ZERO,
    ));
    let deadline = Instant::now() + Duration::from_secs(120);
    while head(pool).await < events {
        assert!(Instant::now() < deadline, "history not written in time");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    done.store(true, Ordering::Relaxed);
    writer.await.unwrap();
}

const DASHBOARD: &str = "query($u: UUID!, $from: NaiveDate!, $to: NaiveDate!) {
    usage: dailyUsage(filter: {userId: $u, from: $from, to: $to}) { totals { minutes } }
    deviceStats(filter: {userId: $u}) { totals { deviceCount cpuCores } }
    devices(filter: {userId: $u}, first: 1) { totalCount }
}";

/// The dashboard's figures for one user: usage minutes over the last year, live devices,
/// cores, all devices.
fn figures(data: &Value) -> [String; 4] {
    [
        data["usage"]["totals"]["minutes"].to_string(),
        data["deviceStats"]["totals"]["deviceCount"].to_string(),
        data["deviceStats"]["totals"]["cpuCores"].to_string(),
        data["devices"]["totalCount"].to_string(),
    ]
}

#[sqlx::test(migrations = false)]
async fn dashboards_see_no_error_and_no_half_built_model_through_replays_and_swaps(pool: PgPool) {
    init_test_logs();
    db::migrated(&pool).await;
    let store = Arc::new(EventStore::open(pool.clone(), StoreConfig::default()).await.unwrap());
    // A user whose history is complete before the replays: every answer about them must be
    // exactly the final one, whatever the rebuild is doing.
    history(&pool, &store, 3_000, 1).await;
    let frozen: Uuid = sqlx::query_scalar("SELECT owner_id FROM streams WHERE stream_type = 'device' LIMIT 1")
        .fetch_one(&pool)
        .await
        .unwrap();
    // Each role its own pool, as in production (the test's pool is small).
    let url = urls::database(&pool).await;
    let role_pool = || async {
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(8)
            .connect(&url)
            .await
            .unwrap()
    };
    let (projector_pool, query_pool, replay_pool) = (role_pool().await, role_pool().await, role_pool().await);
    let stop = CancellationToken::new();
    let projectors = spawn_log_projectors(&projector_pool, ProjectorConfig::default(), &stop);
    projections_reach(&pool, head(&pool).await, Duration::from_secs(60)).await;

    let config = QueryApiConfig {
        listen: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        keys: KeySource::Secret(SECRET.into()),
        // Every query reaches the tables.
        cache_max_bytes: 0,
        watermark_interval: Duration::from_millis(20),
        rate_per_second: 1_000_000,
        rate_burst: 1_000_000,
        ..QueryApiConfig::default()
    };
    let api = QueryApi::build(config, query_pool, http_edge::telemetry::prometheus())
        .await
        .unwrap();
    let url = format!("http://{}/graphql", api.local_addr());
    tokio::spawn(api.run_until_stopped(stop.clone().cancelled_owned()));
    let now = chrono::Utc::now();
    let admin = tokens::signed(SECRET, &Uuid::from_u128(0xad).to_string(), Role::Admin, &[]);
    let to = (now + chrono::Duration::days(1)).date_naive();
    let from = to - chrono::Duration::days(365);
    let client = reqwest::Client::new();
    let ask = move |client: reqwest::Client, url: String, admin: String| async move {
        let response = client
            .post(&url)
            .bearer_auth(&admin)
            .json(&json!({"query": DASHBOARD, "variables": {"u": frozen, "from": from, "to": to}}))
            .send()
            .await;
        match response {
            Ok(response) => {
                let status = response.status();
                let body: Value = response.json().await.unwrap_or(Value::Null);
                (status, body)
            }
            Err(error) => panic!("query API unreachable: {error}"),
        }
    };
    let (status, body) = ask(client.clone(), url.clone(), admin.clone()).await;
    assert!(status.is_success() && body["errors"].is_null(), "{status} {body}");
    let expected = figures(&body["data"]);
    assert_ne!(expected[0], "\"0\"", "the frozen user has usage: {body}");

    // Writes continue (another user) and the dashboard polls, through both replays.
    let done = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn(write_history(
        Arc::clone(&store),
        Arc::clone(&done),
        2,
        Duration::from_millis(2),
    ));
    let answers = Arc::new(AtomicU64::new(0));
    let poller = tokio::spawn({
        let (client, url, admin, done, answers) = (
            client.clone(),
            url.clone(),
            admin.clone(),
            done.clone(),
            answers.clone(),
        );
        let expected = expected.clone();
        async move {
            let mut wrong = Vec::new();
            while !done.load(Ordering::Relaxed) {
                let (status, body) = ask(client.clone(), url.clone(), admin.clone()).await;
                if !status.is_success() || !body["errors"].is_null() || figures(&body["data"]) != expected {
                    wrong.push(format!("{status} {body}"));
                }
                answers.fetch_add(1, Ordering::Relaxed);
            }
            wrong
        }
    });
    let config = ReplayConfig {
        page_events: 200,
        checkpoint_every: Duration::ZERO,
        ..ReplayConfig::default()
    };
    let never = CancellationToken::new();
    let before_replays = answers.load(Ordering::Relaxed);
    let fleet = replay::replay(&replay_pool, Projection::Fleet, None, config, &Unobserved, &never)
        .await
        .unwrap();
    let usage = replay::replay(&replay_pool, Projection::DailyUsage, None, config, &Unobserved, &never)
        .await
        .unwrap();
    // The newest version: v1 -> v3 (hours too) while writes and dashboards go on.
    assert_eq!(usage.version, 3);
    let during_replays = answers.load(Ordering::Relaxed) - before_replays;
    // A few more answers after the swaps, then stop writing.
    let after = answers.load(Ordering::Relaxed);
    while answers.load(Ordering::Relaxed) < after + 20 {
        tokio::task::yield_now().await;
    }
    done.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    let wrong = poller.await.unwrap();
    assert!(
        wrong.is_empty(),
        "{} wrong answers, e.g. {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(3)]
    );
    assert!(
        during_replays >= 20,
        "the dashboard polled through the replays ({during_replays} answers)"
    );
    assert!(fleet.tail_events + usage.tail_events > 0 || fleet.live_position > 0);

    // The live projectors moved to the new versions and keep the models exact.
    projections_reach(&pool, head(&pool).await, Duration::from_secs(60)).await;
    stop.cancel();
    for task in projectors {
        task.await.unwrap();
    }
    let reader = LogReader::new(pool.clone());
    let rebuilt = fold_log(&reader, head(&pool).await, 5_000).await.unwrap();
    assert_eq!(load_read_models(&pool).await.unwrap(), rebuilt);
}

fn replay_process(url: &str, projection: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_cloudphone"));
    command
        .args([
            "replay",
            projection,
            "--page-events",
            "25",
            "--checkpoint-every-ms",
            "0",
        ])
        .env("CLOUDPHONE_DATABASE_URL", url)
        .env("CLOUDPHONE_LOG", "warn");
    command
}

#[sqlx::test(migrations = false)]
async fn a_replay_process_killed_mid_rebuild_resumes_to_the_same_result(pool: PgPool) {
    db::migrated(&pool).await;
    let store = Arc::new(EventStore::open(pool.clone(), StoreConfig::default()).await.unwrap());
    history(&pool, &store, 3_000, 3).await;
    let stop = CancellationToken::new();
    let projectors = spawn_log_projectors(&pool, ProjectorConfig::default(), &stop);
    projections_reach(&pool, head(&pool).await, Duration::from_secs(60)).await;
    stop.cancel();
    for task in projectors {
        task.await.unwrap();
    }
    let url = urls::database(&pool).await;
    for projection in ["fleet", "daily-usage"] {
        let name = projection.replace('-', "_");
        let child = replay_process(&url, projection)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut child = KillOnDrop(child);
        // Killed once its checkpoint is a quarter of the way.
        let deadline = Instant::now() + Duration::from_secs(60);
        let killed_at = loop {
            let row: Option<(String, i64, i64)> = sqlx::query_as(
                "SELECT state, position, target_position FROM projection_rebuilds WHERE projection = $1 ORDER BY id DESC LIMIT 1",
            )
            .bind(&name)
            .fetch_optional(&pool)
            .await
            .unwrap();
            if let Some((state, position, target)) = row {
                assert_eq!(state, "building", "{projection} finished before it could be killed");
                if position * 4 >= target {
                    child.0.kill().unwrap();
                    child.0.wait().unwrap();
                    break (position, target);
                }
            }
            assert!(Instant::now() < deadline, "{projection}: no progress");
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let (state, position): (String, i64) = sqlx::query_as(
            "SELECT state, position FROM projection_rebuilds WHERE projection = $1 ORDER BY id DESC LIMIT 1",
        )
        .bind(&name)
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(state, "building");
        assert!(
            position >= killed_at.0 && position < killed_at.1,
            "{position} of {}",
            killed_at.1
        );

        let output = replay_process(&url, projection).arg("--json").output().unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let summary: Value = serde_json::from_str(stdout.trim()).unwrap();
        assert_eq!(summary["resumed"], true, "{summary}");
        assert!(summary["bulk_positions"].as_i64().unwrap() < killed_at.1, "{summary}");
    }
    let reader = LogReader::new(pool.clone());
    let rebuilt = fold_log(&reader, head(&pool).await, 5_000).await.unwrap();
    assert_eq!(load_read_models(&pool).await.unwrap(), rebuilt);
    // The status listing shows both swaps and what they replaced.
    let output = Command::new(env!("CARGO_BIN_EXE_cloudphone"))
        .args(["replay", "--status"])
        .env("CLOUDPHONE_DATABASE_URL", &url)
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success());
    assert!(
        listing.contains("retired_fleet_v1_") && listing.contains("retired_daily_usage_v1_"),
        "{listing}"
    );
    let output = Command::new(env!("CARGO_BIN_EXE_cloudphone"))
        .args(["replay", "--drop-old"])
        .env("CLOUDPHONE_DATABASE_URL", &url)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&output.stdout).contains("dropped 2 replaced version(s)"));
}

#[sqlx::test(migrations = false)]
async fn a_replay_reads_its_history_from_the_replica_and_refuses_one_that_is_not_a_standby(pool: PgPool) {
    db::migrated(&pool).await;
    let store = Arc::new(EventStore::open(pool.clone(), StoreConfig::default()).await.unwrap());
    history(&pool, &store, 500, 5).await;
    let url = urls::database(&pool).await;
    let replica = test_support::services::replica_of(&pool).await;
    let nowhere = format!(
        "postgres://postgres:secret@127.0.0.1:{}/nowhere",
        test_support::services::free_port()
    );
    for (history_url, says) in [
        (nowhere.as_str(), "cannot use the history replica 127.0.0.1:"),
        (url.as_str(), "is not a standby of this primary: it is not in recovery"),
    ] {
        let output = replay_process(&url, "fleet")
            .args(["--history-url", history_url])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{stderr}");
        let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(errors.len(), 1, "{stderr}");
        assert!(errors[0].contains(says), "{stderr}");
        assert!(!stderr.contains("secret"), "no password in messages: {stderr}");
        let rebuilds: i64 = sqlx::query_scalar("SELECT count(*) FROM projection_rebuilds")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(rebuilds, 0, "a refused replay changes nothing: {stderr}");
    }

    let output = replay_process(&url, "fleet")
        .args(["--history-url", replica.as_str(), "--json"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let summary: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(summary["history"], "replica", "{summary}");
    let reader = LogReader::new(pool.clone());
    let folded = fold_log(&reader, head(&pool).await, 5_000).await.unwrap();
    let models = load_read_models(&pool).await.unwrap();
    assert_eq!(models.devices, folded.devices);
    assert_eq!(models.device_stats, folded.device_stats);
}
