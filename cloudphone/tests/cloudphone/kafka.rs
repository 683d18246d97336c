//! Scale-out mode against a real Kafka-protocol broker (ops/dev/broker.sh; the test command
//! starts it): the relay publishes the log, projector workers in a consumer group build the
//! read models. Each test uses its own topic and consumer groups. These tests run one at a
//! time (nextest group `kafka`): one of them kills the broker.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use event_log::{EventStore, StoreConfig};
use kafka_adapters::projector::{KafkaProjectorConfig, run_kafka_projector};
use kafka_adapters::relay::{RelayConfig, run_relay};
use read_models::Projection;
use sqlx::PgPool;
use test_support::live::LiveClient;
use test_support::roles::{KillOnDrop, init_test_logs};
use test_support::services::{BROKERS, broker};
use test_support::{db, tokens, urls};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::support::{assert_read_models_equal_a_rebuild, projections_reach, relay_reaches, write_history};

/// Pause between a writer's appends: a steady stream of about a hundred events a second,
/// enough to keep every partition busy through a rebalance while the tests leave the cores
/// to the roles they run.
const PACE: Duration = Duration::from_millis(25);

fn unique_topic() -> String {
    format!("cloudphone.test.{}", Uuid::now_v7().simple())
}

async fn prepared(pool: &PgPool) {
    init_test_logs();
    broker("start");
    db::migrated(pool).await;
}

/// The relay of a test's own topic (4 partitions), its checkpoint named after the topic.
fn relay_config(topic: &str) -> RelayConfig {
    RelayConfig {
        topic: topic.to_owned(),
        name: topic.to_owned(),
        partitions: 4,
        ..RelayConfig::new(BROKERS)
    }
}

fn start_in_process(pool: &PgPool, topic: &str, stop: &CancellationToken) -> Vec<tokio::task::JoinHandle<()>> {
    let relay = relay_config(topic);
    let mut tasks = vec![tokio::spawn(run_relay(pool.clone(), relay, stop.clone()))];
    tasks.extend(start_projectors_in_process(pool, topic, stop));
    tasks
}

fn start_projectors_in_process(
    pool: &PgPool,
    topic: &str,
    stop: &CancellationToken,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    for projection in Projection::ALL {
        let config = KafkaProjectorConfig {
            topic: topic.to_owned(),
            group_id: format!("{topic}-{}", projection.name()),
            ..KafkaProjectorConfig::new(BROKERS, projection)
        };
        tasks.push(tokio::spawn(run_kafka_projector(
            pool.clone(),
            projection,
            config,
            stop.clone(),
        )));
    }
    tasks
}

/// `cloudphone serve` in Kafka mode: commands over HTTP reach the read models through the
/// relay, the topic and the projector workers, and a user's subscription is pushed the
/// changes the Kafka-mode workers commit.
#[sqlx::test(migrations = false)]
async fn kafka_mode_commands_reach_the_read_models(pool: PgPool) {
    prepared(&pool).await;
    let url = urls::database(&pool).await;
    let topic = unique_topic();
    let mut child = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_cloudphone"))
            .arg("serve")
            .env("CLOUDPHONE_DATABASE_URL", &url)
            .env("CLOUDPHONE_COMMAND_LISTEN", "127.0.0.1:0")
            .env("CLOUDPHONE_QUERY_LISTEN", "127.0.0.1:0")
            .env("CLOUDPHONE_KAFKA_BROKERS", BROKERS)
            .env("CLOUDPHONE_KAFKA_TOPIC", &topic)
            .env("CLOUDPHONE_LOG_FORMAT", "json")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(child.0.stderr.take().unwrap()).lines();
    let (mut address, mut query_address) = (None, None);
    while address.is_none() || query_address.is_none() {
        let line = lines.next().expect("serve exited").unwrap();
        let entry: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        let listening = entry["address"].as_str().map(str::to_owned);
        match entry["message"].as_str() {
            Some("command API listening") => address = listening,
            Some("query API listening") => query_address = listening,
            _ => {}
        }
    }
    let (address, query_address) = (address.unwrap(), query_address.unwrap());
    std::thread::spawn(move || lines.for_each(drop));

    let client = reqwest::Client::new();
    // The first user watches their fleet live: pushed from Kafka-mode projectors' commits.
    let mut watcher = None;
    for _ in 0..5 {
        let user = Uuid::now_v7();
        let token = tokens::development(&user.to_string(), http_edge::auth::Role::User);
        if watcher.is_none() {
            let mut socket = LiveClient::connect(query_address.parse().unwrap(), &token).await;
            socket
                .subscribe(
                    "fleet",
                    "subscription { devices(first: 10) { totalCount nodes { status } } }",
                    serde_json::json!({}),
                )
                .await;
            assert_eq!(socket.next_of("fleet").await["data"]["devices"]["totalCount"], "0");
            watcher = Some(socket);
        }
        let body = serde_json::json!({"tier": "pro", "email": "k@example.com", "phone": "+4915112345678"});
        let answer = client
            .post(format!("http://{address}/v1/users"))
            .bearer_auth(&token)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 201);
        for _ in 0..3 {
            let body = serde_json::json!({"provider": "gcp", "cpu_cores": 2, "memory_mb": 2048, "android_version": 14});
            let answer = client
                .post(format!("http://{address}/v1/devices"))
                .bearer_auth(&token)
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(answer.status(), 201);
            let device = answer.json::<serde_json::Value>().await.unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned();
            for action in ["start", "stop"] {
                let answer = client
                    .post(format!("http://{address}/v1/devices/{device}/{action}"))
                    .bearer_auth(&token)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(answer.status(), 200);
            }
        }
    }
    let head = event_log::LogReader::new(pool.clone()).head().await.unwrap().position;
    projections_reach(&pool, head, Duration::from_secs(60)).await;
    let mut watcher = watcher.unwrap();
    watcher
        .next_until("fleet", |answer| {
            let devices = &answer["data"]["devices"];
            devices["totalCount"] == "3"
                && devices["nodes"]
                    .as_array()
                    .is_some_and(|nodes| nodes.iter().all(|node| node["status"] == "STOPPED"))
        })
        .await;
    let _ = Command::new("kill").args(["-TERM", &child.0.id().to_string()]).status();
    assert!(child.0.wait().unwrap().success());
    assert_read_models_equal_a_rebuild(&pool).await;
    let devices: i64 = sqlx::query_scalar("SELECT count(*) FROM devices")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(devices, 15);
}

/// The broker dies (SIGKILL) mid-stream and comes back: no append fails, nothing is lost or
/// counted twice, the relay catches up to the head.
/// The roles' readiness probe looks the topic up before the relay has created it, and the
/// relay looks before it creates: neither look may let the broker create the topic (with its
/// default partitions: 4 on the development broker, 1 on Apache Kafka), or the relay would
/// publish to fewer partitions than configured, bounding the workers' parallelism.
#[sqlx::test(migrations = false)]
async fn the_relay_creates_its_topic_with_its_partitions_after_a_probe_looked(pool: PgPool) {
    prepared(&pool).await;
    let topic = unique_topic();
    let probe = kafka_adapters::relay::BrokerProbe::new(BROKERS, &topic).unwrap();
    probe.check(Duration::from_secs(10)).await.unwrap();
    let stop = CancellationToken::new();
    let relay = RelayConfig {
        partitions: 7,
        ..relay_config(&topic)
    };
    let relay_task = tokio::spawn(run_relay(pool.clone(), relay, stop.clone()));
    let deadline = Instant::now() + Duration::from_secs(60);
    let partitions = loop {
        let recorded: Option<i32> = sqlx::query_scalar("SELECT partitions FROM relay_checkpoints WHERE relay = $1")
            .bind(&topic)
            .fetch_optional(&pool)
            .await
            .unwrap();
        if let Some(partitions) = recorded.filter(|p| *p > 0) {
            break partitions;
        }
        assert!(Instant::now() < deadline, "the relay recorded no partition count");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    stop.cancel();
    relay_task.await.unwrap();
    assert_eq!(
        partitions, 7,
        "the relay publishes to a topic of {partitions} partitions"
    );
}

#[sqlx::test(migrations = false)]
async fn a_broker_killed_mid_stream_loses_and_duplicates_nothing(pool: PgPool) {
    prepared(&pool).await;
    let topic = unique_topic();
    let stop = CancellationToken::new();
    let tasks = start_in_process(&pool, &topic, &stop);
    let store = Arc::new(EventStore::open(pool.clone(), StoreConfig::default()).await.unwrap());
    let done = Arc::new(AtomicBool::new(false));
    // write_history panics on any failed append: commands never depend on the broker.
    let writers: Vec<_> = (0..2)
        .map(|seed| tokio::spawn(write_history(store.clone(), done.clone(), seed, PACE)))
        .collect();

    // Events flow through Kafka before the kill.
    let reader = event_log::LogReader::new(pool.clone());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let applied: Option<i64> = sqlx::query_scalar("SELECT min(position) FROM projection_checkpoints")
            .fetch_one(&pool)
            .await
            .unwrap();
        if applied.is_some_and(|p| p > 30) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "nothing reached the read models through Kafka"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    broker("kill");
    let before_outage = reader.head().await.unwrap().position;
    // Appends go on while the broker is down.
    let deadline = Instant::now() + Duration::from_secs(30);
    while reader.head().await.unwrap().position < before_outage + 150 {
        assert!(Instant::now() < deadline, "appends stalled while the broker was down");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    broker("start");
    writers_drained(&pool, &topic, &done, writers, Duration::from_secs(120)).await;
    stop.cancel();
    for task in tasks {
        task.await.unwrap();
    }
    assert_read_models_equal_a_rebuild(&pool).await;
}

/// What no relay would publish reaches the topic: a message that is not an envelope, and a
/// second copy of an event already published. The first is parked in the dead-letter table
/// (for each projection) and the partition moves on; the second changes nothing.
#[sqlx::test(migrations = false)]
async fn a_poison_message_is_parked_and_a_duplicate_is_a_no_op(pool: PgPool) {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    prepared(&pool).await;
    let topic = unique_topic();
    let stop = CancellationToken::new();
    let tasks = start_in_process(&pool, &topic, &stop);
    let store = Arc::new(EventStore::open(pool.clone(), StoreConfig::default()).await.unwrap());
    let done = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn(write_history(store.clone(), done.clone(), 7, PACE));
    let reader = event_log::LogReader::new(pool.clone());
    projections_reach(&pool, 40, Duration::from_secs(60)).await;

    let producer: FutureProducer = RelayConfig::new(BROKERS).producer_config().create().unwrap();
    let published = reader.read_all(0, 1).await.unwrap().remove(0);
    let key = published.stream_id.to_string();
    let copy = serde_json::to_vec(&published).unwrap();
    let timeout = Duration::from_secs(30);
    producer
        .send(
            FutureRecord::to(&topic).key(&key).payload(&b"{not an envelope"[..]),
            timeout,
        )
        .await
        .unwrap();
    producer
        .send(FutureRecord::to(&topic).key(&key).payload(&copy), timeout)
        .await
        .unwrap();
    tokio::task::spawn_blocking(move || drop(producer)).await.unwrap();

    // Events written after the poison message still arrive (the partition is not blocked).
    let after = reader.head().await.unwrap().position + 60;
    projections_reach(&pool, after, Duration::from_secs(60)).await;
    done.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    let head = reader.head().await.unwrap().position;
    projections_reach(&pool, head, Duration::from_secs(60)).await;
    stop.cancel();
    for task in tasks {
        task.await.unwrap();
    }
    let parked: Vec<(String, String)> =
        sqlx::query_as("SELECT projection, error FROM projection_dead_letters ORDER BY projection")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(
        parked.len(),
        2,
        "the poison message is parked once per projection: {parked:?}"
    );
    assert_eq!(parked[0].0, "daily_usage");
    assert_eq!(parked[1].0, "fleet");
    assert_read_models_equal_a_rebuild(&pool).await;
}

/// A `cloudphone projector` process in Kafka mode, its JSON log written to `log`.
fn kafka_projector(url: &str, topic: &str, instance: Option<&str>, log: &std::path::Path) -> KillOnDrop {
    let log = std::fs::File::create(log).unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_cloudphone"));
    if let Some(instance) = instance {
        command.env("CLOUDPHONE_KAFKA_INSTANCE_ID", instance);
    }
    KillOnDrop(
        command
            .arg("projector")
            .env("CLOUDPHONE_DATABASE_URL", url)
            .env("CLOUDPHONE_KAFKA_BROKERS", BROKERS)
            .env("CLOUDPHONE_KAFKA_TOPIC", topic)
            .env("CLOUDPHONE_OPS_LISTEN", "127.0.0.1:0")
            .env("CLOUDPHONE_LOG", "info")
            .env("CLOUDPHONE_LOG_FORMAT", "json")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    )
}

/// Waits until the worker logging to `log` has been assigned partitions of both projections.
async fn assigned_partitions(log: &std::path::Path, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let assigned = |projection: &str| {
            text.lines()
                .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
                .any(|entry| {
                    entry["message"] == "partitions assigned"
                        && entry["projection"] == projection
                        && entry["partitions"].as_str().is_some_and(|p| p != "[]")
                })
        };
        if Projection::ALL.iter().all(|p| assigned(p.name())) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} was assigned no partitions:\n{text}",
            log.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The address a role logged for its health and metrics endpoints.
fn ops_address(log: &std::path::Path) -> String {
    let text = std::fs::read_to_string(log).unwrap();
    text.lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .find(|entry| entry["message"] == "health, readiness and metrics listening")
        .and_then(|entry| entry["address"].as_str().map(str::to_owned))
        .unwrap_or_else(|| panic!("no ops address in {}:\n{text}", log.display()))
}

/// Two projector processes in one consumer group share the partitions. The second, a
/// static member (`--kafka-instance-id`, as a StatefulSet pod), is killed (SIGKILL) and
/// restarted under the same identity: it takes its partitions back. Then the first stops
/// gracefully (SIGTERM: it leaves the group) and the second takes every partition. Each
/// hand-over loses and duplicates nothing.
///
/// A worker killed for good, whose partitions move once its session expires, is one of the
/// faults of `load::load_kafka_faults_lose_nothing_and_measure_each_spike`.
#[sqlx::test(migrations = false)]
async fn projector_workers_share_partitions_and_rebalances_lose_nothing(pool: PgPool) {
    prepared(&pool).await;
    let url = urls::database(&pool).await;
    let topic = unique_topic();
    let logs = std::env::temp_dir().join(&topic);
    std::fs::create_dir_all(&logs).unwrap();
    let log = |name: &str| logs.join(name);
    let stop = CancellationToken::new();
    let relay = relay_config(&topic);
    let relay_task = tokio::spawn(run_relay(pool.clone(), relay, stop.clone()));
    let store = Arc::new(EventStore::open(pool.clone(), StoreConfig::default()).await.unwrap());
    let done = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..2)
        .map(|seed| tokio::spawn(write_history(store.clone(), done.clone(), seed + 10, PACE)))
        .collect();
    let reader = event_log::LogReader::new(pool.clone());

    // The first worker forms both groups alone (so it leads them), then the second joins.
    let first = kafka_projector(&url, &topic, None, &log("first.log"));
    assigned_partitions(&log("first.log"), Duration::from_secs(60)).await;
    let second = kafka_projector(&url, &topic, Some("second"), &log("second.log"));
    assigned_partitions(&log("second.log"), Duration::from_secs(60)).await;
    let shared = reader.head().await.unwrap().position + 50;
    projections_reach(&pool, shared, Duration::from_secs(120)).await;

    drop(second); // SIGKILL, mid-batch as likely as not
    let restarted = kafka_projector(&url, &topic, Some("second"), &log("restarted.log"));
    assigned_partitions(&log("restarted.log"), Duration::from_secs(90)).await;
    let after_crash = reader.head().await.unwrap().position + 50;
    projections_reach(&pool, after_crash, Duration::from_secs(120)).await;

    // The worker is probed and scraped like every role.
    let ops = ops_address(&log("restarted.log"));
    let http = reqwest::Client::new();
    let ready = http.get(format!("http://{ops}/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    let metrics = http
        .get(format!("http://{ops}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "cloudphone_projection_position{projection=\"fleet\"}",
        "cloudphone_projection_lag_events{projection=\"daily_usage\"}",
        "cloudphone_projection_batch_events_bucket",
        "cloudphone_projection_events_total",
    ] {
        assert!(
            metrics.contains(name),
            "{name} missing from the projector's metrics:\n{metrics}"
        );
    }

    // A graceful stop: the first worker leaves the group; the restarted one takes over.
    let mut first = first;
    let status = Command::new("kill")
        .args(["-TERM", &first.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    assert!(
        first.0.wait().unwrap().success(),
        "a projector stops cleanly on SIGTERM"
    );
    let after_leave = reader.head().await.unwrap().position + 50;
    projections_reach(&pool, after_leave, Duration::from_secs(120)).await;

    writers_drained(&pool, &topic, &done, writers, Duration::from_secs(60)).await;
    drop(restarted);
    stop.cancel();
    relay_task.await.unwrap();
    assert_read_models_equal_a_rebuild(&pool).await;
    let _ = std::fs::remove_dir_all(&logs);
}

/// Stops the writers, then waits until the relay `topic` has published the log's head (within
/// `relay_limit`) and both projections have applied it; returns that head.
async fn writers_drained(
    pool: &PgPool,
    topic: &str,
    done: &AtomicBool,
    writers: Vec<tokio::task::JoinHandle<()>>,
    relay_limit: Duration,
) -> i64 {
    done.store(true, Ordering::Relaxed);
    for writer in writers {
        writer.await.unwrap();
    }
    let head = event_log::LogReader::new(pool.clone()).head().await.unwrap().position;
    relay_reaches(pool, topic, head, relay_limit).await;
    projections_reach(pool, head, Duration::from_secs(120)).await;
    head
}

/// Writes history until the head passes `more` events beyond where it was; returns the head.
async fn append_some(store: &Arc<EventStore>, pool: &PgPool, seed: u64, more: i64) -> i64 {
    let reader = event_log::LogReader::new(pool.clone());
    let target = reader.head().await.unwrap().position + more;
    let done = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn(write_history(store.clone(), done.clone(), seed, PACE));
    let deadline = Instant::now() + Duration::from_secs(60);
    while reader.head().await.unwrap().position < target {
        assert!(Instant::now() < deadline, "appends stalled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    done.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    reader.head().await.unwrap().position
}

/// A projection built in embedded mode switches to Kafka mode (the relay publishes the whole
/// history again) and back, and no event is applied twice or missed. Switching back while a
/// Kafka partition is ahead of the checkpoint is refused with a clear error.
#[sqlx::test(migrations = false)]
async fn switching_between_embedded_and_kafka_mode_applies_every_event_once(pool: PgPool) {
    use projections::runner::{ProjectorConfig, ProjectorError, resume_point, spawn_log_projectors};

    prepared(&pool).await;
    let store = Arc::new(EventStore::open(pool.clone(), StoreConfig::default()).await.unwrap());
    let embedded = |stop: &CancellationToken| spawn_log_projectors(&pool, ProjectorConfig::default(), stop);

    // Embedded first.
    let stop = CancellationToken::new();
    let tasks = embedded(&stop);
    let head = append_some(&store, &pool, 21, 150).await;
    projections_reach(&pool, head, Duration::from_secs(60)).await;
    stop.cancel();
    for task in tasks {
        task.await.unwrap();
    }

    // Then Kafka: the relay starts from the beginning of the log, so the topic repeats
    // everything the embedded projectors applied.
    let topic = unique_topic();
    let stop = CancellationToken::new();
    let tasks = start_in_process(&pool, &topic, &stop);
    let head = append_some(&store, &pool, 22, 150).await;
    relay_reaches(&pool, &topic, head, Duration::from_secs(120)).await;
    projections_reach(&pool, head, Duration::from_secs(120)).await;
    stop.cancel();
    for task in tasks {
        task.await.unwrap();
    }
    assert_read_models_equal_a_rebuild(&pool).await;

    // Back to embedded: the Kafka projectors caught up, so nothing is ahead of the checkpoint.
    let stop = CancellationToken::new();
    let tasks = embedded(&stop);
    let head = append_some(&store, &pool, 23, 100).await;
    projections_reach(&pool, head, Duration::from_secs(60)).await;
    stop.cancel();
    for task in tasks {
        task.await.unwrap();
    }
    assert_read_models_equal_a_rebuild(&pool).await;

    // A partition that applied beyond the checkpoint (as when Kafka projectors stop while one
    // partition lags) makes the embedded projector refuse to start rather than count twice.
    sqlx::query("UPDATE projection_offsets SET last_position = $1 WHERE projection = 'fleet' AND partition = 0")
        .bind(head + 10)
        .execute(&pool)
        .await
        .unwrap();
    let mut conn = pool.acquire().await.unwrap();
    match resume_point(&mut conn, Projection::Fleet).await {
        Err(ProjectorError::AheadInKafkaMode {
            checkpoint, applied, ..
        }) => assert_eq!((checkpoint, applied), (head, head + 10)),
        other => panic!("expected a refusal, got {other:?}"),
    }
    let daily = resume_point(&mut conn, Projection::DailyUsage).await.unwrap();
    assert_eq!(daily.position, head);
}

/// Waits until the role logging (JSON) to `log` has logged `message`.
async fn logged(log: &std::path::Path, message: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .any(|entry| entry["message"] == message)
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} never logged {message:?}:\n{text}",
            log.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn relay_process(url: &str, topic: &str, log: &std::path::Path) -> KillOnDrop {
    let log = std::fs::File::create(log).unwrap();
    KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_cloudphone"))
            .arg("relay")
            .env("CLOUDPHONE_DATABASE_URL", url)
            .env("CLOUDPHONE_KAFKA_BROKERS", BROKERS)
            .env("CLOUDPHONE_KAFKA_TOPIC", topic)
            .env("CLOUDPHONE_KAFKA_PARTITIONS", "4")
            .env("CLOUDPHONE_OPS_LISTEN", "127.0.0.1:0")
            .env("CLOUDPHONE_LOG", "info")
            .env("CLOUDPHONE_LOG_FORMAT", "json")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    )
}

/// Two relay processes: one publishes, the other stands by. The active one is killed
/// (SIGKILL) mid-stream; the standby takes the lock over and publishes from the checkpoint.
/// Nothing is lost, and what was published twice around the takeover counts once.
#[sqlx::test(migrations = false)]
async fn a_standby_relay_takes_over_when_the_active_one_dies(pool: PgPool) {
    prepared(&pool).await;
    let url = urls::database(&pool).await;
    let topic = unique_topic();
    let logs = std::env::temp_dir().join(&topic);
    std::fs::create_dir_all(&logs).unwrap();
    let log = |name: &str| logs.join(name);

    let first = relay_process(&url, &topic, &log("first.log"));
    logged(&log("first.log"), "relay publishing", Duration::from_secs(30)).await;
    let second = relay_process(&url, &topic, &log("second.log"));
    logged(
        &log("second.log"),
        "another relay is active; standing by",
        Duration::from_secs(30),
    )
    .await;

    let stop = CancellationToken::new();
    let projectors = start_projectors_in_process(&pool, &topic, &stop);
    let store = Arc::new(EventStore::open(pool.clone(), StoreConfig::default()).await.unwrap());
    let done = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..2)
        .map(|seed| tokio::spawn(write_history(store.clone(), done.clone(), seed + 30, PACE)))
        .collect();
    let reader = event_log::LogReader::new(pool.clone());
    let before = reader.head().await.unwrap().position + 50;
    projections_reach(&pool, before, Duration::from_secs(120)).await;
    let text = std::fs::read_to_string(log("second.log")).unwrap();
    assert!(
        !text.contains("\"relay publishing\""),
        "the standby published while the first relay was active:\n{text}"
    );

    drop(first); // SIGKILL: its session, and with it the lock, ends with the process
    logged(&log("second.log"), "relay publishing", Duration::from_secs(60)).await;
    let after = reader.head().await.unwrap().position + 50;
    projections_reach(&pool, after, Duration::from_secs(120)).await;

    // The standby reports itself as the active relay.
    let ops = ops_address(&log("second.log"));
    let metrics = reqwest::get(format!("http://{ops}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("cloudphone_relay_leader 1"),
        "the standby is not the leader:\n{metrics}"
    );

    writers_drained(&pool, &topic, &done, writers, Duration::from_secs(60)).await;
    drop(second);
    stop.cancel();
    for task in projectors {
        task.await.unwrap();
    }
    assert_read_models_equal_a_rebuild(&pool).await;
    let _ = std::fs::remove_dir_all(&logs);
}

/// Replay in Kafka mode, the production topology: `cloudphone replay` (the runbook's
/// command) rebuilds `daily_usage` at its newest version and then `fleet`, and swaps each in
/// while two projector processes share the partitions and appends keep coming. For the first
/// the relay is stopped, so the rebuild follows the log ahead of what the workers applied
/// (as when the Kafka path lags); for the second it runs. The workers roll back the batch
/// they folded before the swap, go on from the offsets the swap handed over (skipping what
/// the new tables already hold), and nothing is counted twice or lost: the read models at
/// the end equal a rebuild, for every table of the new version.
#[sqlx::test(migrations = false)]
async fn a_replay_in_kafka_mode_swaps_in_while_two_workers_consume(pool: PgPool) {
    prepared(&pool).await;
    let url = urls::database(&pool).await;
    let topic = unique_topic();
    let logs = std::env::temp_dir().join(&topic);
    std::fs::create_dir_all(&logs).unwrap();
    let log = |name: &str| logs.join(name);
    let relay = relay_config(&topic);
    let (relay_stop, relay_stop_after) = (CancellationToken::new(), CancellationToken::new());
    let relay_task = tokio::spawn(run_relay(pool.clone(), relay.clone(), relay_stop.clone()));
    let store = Arc::new(EventStore::open(pool.clone(), StoreConfig::default()).await.unwrap());
    let done = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..2)
        .map(|seed| tokio::spawn(write_history(store.clone(), done.clone(), seed + 30, PACE)))
        .collect();
    let reader = event_log::LogReader::new(pool.clone());
    let first = kafka_projector(&url, &topic, Some("first"), &log("first.log"));
    assigned_partitions(&log("first.log"), Duration::from_secs(60)).await;
    let second = kafka_projector(&url, &topic, Some("second"), &log("second.log"));
    assigned_partitions(&log("second.log"), Duration::from_secs(60)).await;
    let shared = reader.head().await.unwrap().position + 50;
    projections_reach(&pool, shared, Duration::from_secs(120)).await;
    let (daily_usage_before, _): (i32, i64) =
        sqlx::query_as("SELECT version, position FROM projection_checkpoints WHERE projection = 'daily_usage'")
            .fetch_one(&pool)
            .await
            .unwrap();

    // The relay stops; appends go on, so the log runs ahead of the workers.
    relay_stop.cancel();
    relay_task.await.unwrap();
    let relayed: i64 = sqlx::query_scalar("SELECT position FROM relay_checkpoints WHERE relay = $1")
        .bind(&topic)
        .fetch_one(&pool)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while reader.head().await.unwrap().position < relayed + 50 {
        assert!(Instant::now() < deadline, "appends stalled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut relay_task = None;
    for projection in ["daily-usage", "fleet"] {
        let output = Command::new(env!("CARGO_BIN_EXE_cloudphone"))
            .args(["replay", projection, "--json"])
            .env("CLOUDPHONE_DATABASE_URL", &url)
            .env("CLOUDPHONE_LOG", "warn")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "replay {projection} in Kafka mode: {stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        if relay_task.is_none() {
            let summary: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
            assert!(
                summary["live_position"].as_i64().unwrap() > relayed,
                "the rebuild went live ahead of what Kafka carried: {summary}"
            );
            relay_task = Some(tokio::spawn(run_relay(
                pool.clone(),
                relay.clone(),
                relay_stop_after.clone(),
            )));
        }
        // Appends after the swap reach the new version through both workers.
        let after_swap = reader.head().await.unwrap().position + 50;
        projections_reach(&pool, after_swap, Duration::from_secs(120)).await;
    }
    let (daily_usage_after, _): (i32, i64) =
        sqlx::query_as("SELECT version, position FROM projection_checkpoints WHERE projection = 'daily_usage'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(daily_usage_after, Projection::DailyUsage.latest_version());
    assert!(
        daily_usage_after > daily_usage_before,
        "the replay swapped a new version in"
    );

    let head = writers_drained(&pool, &topic, &done, writers, Duration::from_secs(60)).await;
    drop((first, second));
    relay_stop_after.cancel();
    if let Some(task) = relay_task {
        task.await.unwrap();
    }
    let rebuilt = projections::fold_log(&reader, head, 5_000).await.unwrap();
    assert!(
        read_models::stored::load_read_models(&pool).await.unwrap() == rebuilt,
        "the read models differ from a rebuild of the log"
    );
    // The fence did its work: some worker's batch was folded for a replaced version.
    let fenced = ["first.log", "second.log"].iter().any(|name| {
        std::fs::read_to_string(log(name))
            .unwrap_or_default()
            .contains("kafka projector resuming at the new version")
    });
    assert!(fenced, "no worker met a swapped version");
    let _ = std::fs::remove_dir_all(&logs);
}
