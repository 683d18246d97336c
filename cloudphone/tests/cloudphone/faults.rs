//! Faults under load, against the real binary: the PostgreSQL primary restarted while portals
//! send commands, and the Kafka-protocol broker stopped for 30 s while they do. Clients act
//! as a portal should: one Idempotency-Key per command, retried with the same key after a
//! 503, so every write is eventually acknowledged once and a 503 can be checked against the
//! log ("never a lie").
//!
//! The primary test restarts a throwaway cluster of its own (ops/dev/scratch-postgres.sh),
//! never the shared server. The broker test stops the shared broker (ops/dev/broker.sh), so
//! this module runs in the nextest `kafka` group (one test of the group at a time), and a
//! guard starts the broker again however the test ends.

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sqlx::PgPool;
use test_support::roles::{RoleProcess, init_test_logs};
use test_support::scratch::ScratchPostgres;
use test_support::services::{BROKERS, ops_script, run_script};
use test_support::urls;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::portal::{
    Tally, acks_since, admin_token, assert_acks_in_log, await_acks, await_status, dashboard, provision, spawn_drivers,
};
use crate::support::{CLOUDPHONE, assert_read_models_equal_a_rebuild, projections_reach, relay_reaches};

// ---------------------------------------------------------------------------------------------
// Processes

/// Starts the shared broker again when dropped, however the test ends: the other tests of
/// the `kafka` group need it.
struct BrokerRestarter;

impl Drop for BrokerRestarter {
    fn drop(&mut self) {
        let _ = Command::new(ops_script("broker.sh"))
            .arg("start")
            .stdin(Stdio::null())
            .status();
    }
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL primary restarted

/// `cloudphone serve` (command API, projectors following the log, query API) on a primary
/// that is stopped (fast shutdown: sessions killed with 57P01, then connections refused) for
/// about 5 s under the load of 8 portal clients and a dashboard, then started again. During
/// the outage every command is answered 503 with a problem document and Retry-After (never
/// 500, never a dropped connection), both APIs' /readyz say 503, the dashboard gets 200 or
/// 503; the process stays up and every role reconnects by itself: commands are acknowledged
/// again, /readyz is 200, the projections reach the head and equal a rebuild, the query API
/// answers. Every acknowledged command is in the log, and nothing else was written.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restarted_primary_costs_503s_and_loses_nothing_acknowledged() {
    init_test_logs();
    let cluster = ScratchPostgres::fresh().await;
    let url = cluster.url("cloudphone");
    let dir = tempfile::tempdir().unwrap();
    let mut serve = RoleProcess::start(CLOUDPHONE, "serve", &url, &[], dir.path());
    let command = serve.address("command API listening").await;
    let query = serve.address("query API listening").await;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let tenants = provision(&client, &command, 8, 2).await;
    for base in [&command, &query] {
        await_status(&client, &format!("{base}/readyz"), 200, Duration::from_secs(30)).await;
    }

    let tally = Arc::new(Mutex::new(Tally::default()));
    let done = CancellationToken::new();
    let drivers = spawn_drivers(&client, &command, &tenants, Duration::from_millis(5), &tally, &done);
    let reader = tokio::spawn(dashboard(client.clone(), query.clone(), done.clone()));
    let began = Instant::now();
    await_acks(&tally, began, 200, Duration::from_secs(60)).await;

    // The outage: at least 5 s, and long enough to see it from outside.
    assert!(cluster.run("stop").await, "the scratch cluster did not stop");
    let stopped = Instant::now();
    let command_unready = await_status(&client, &format!("{command}/readyz"), 503, Duration::from_secs(20)).await;
    let query_unready = await_status(&client, &format!("{query}/readyz"), 503, Duration::from_secs(20)).await;
    let deadline = stopped + Duration::from_secs(30);
    while tally.lock().unwrap().unavailable.iter().all(|at| *at < stopped) {
        assert!(
            Instant::now() < deadline,
            "no command was answered 503 while the primary was down"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let first_503 = tally
        .lock()
        .unwrap()
        .unavailable
        .iter()
        .find(|at| **at >= stopped)
        .copied()
        .unwrap();
    if let Some(rest) = Duration::from_secs(5).checked_sub(stopped.elapsed()) {
        tokio::time::sleep(rest).await;
    }
    serve.assert_alive();
    assert!(cluster.run("start").await, "the scratch cluster did not start again");
    let restarted = Instant::now();
    let outage = restarted - stopped;

    // Everything comes back by itself.
    let first_ack = await_acks(&tally, restarted, 3 * tenants.len(), Duration::from_secs(60)).await;
    let command_ready = await_status(&client, &format!("{command}/readyz"), 200, Duration::from_secs(60)).await;
    let query_ready = await_status(&client, &format!("{query}/readyz"), 200, Duration::from_secs(60)).await;
    done.cancel();
    for driver in drivers {
        driver.await.unwrap();
    }
    let dashboard_seen = reader.await.unwrap();
    serve.assert_alive();

    let tally = Arc::try_unwrap(tally).unwrap().into_inner().unwrap();
    assert!(tally.failures.is_empty(), "clients failed: {:#?}", tally.failures);
    assert!(
        tally.refused.is_empty(),
        "clients were refused (their view of a device was wrong, so an answer lied): {:#?}",
        tally.refused
    );
    let unexpected: Vec<_> = dashboard_seen
        .iter()
        .filter(|(status, _)| *status != 200 && *status != 503)
        .take(5)
        .collect();
    assert!(unexpected.is_empty(), "the dashboard got {unexpected:#?}");

    let pool = PgPool::connect(&url).await.unwrap();
    assert_acks_in_log(&pool, &tally.acks, &tenants).await;
    let head = event_log::LogReader::new(pool.clone()).head().await.unwrap().position;
    let settled = Instant::now();
    projections_reach(&pool, head, Duration::from_secs(60)).await;
    let caught_up = settled.elapsed();
    assert_read_models_equal_a_rebuild(&pool).await;

    // The query API reads its writes again.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let answer = client
            .post(format!("{query}/graphql"))
            .bearer_auth(admin_token())
            .header("x-min-position", head.to_string())
            .json(&json!({"query": "{ devices(first: 1) { totalCount } }"}))
            .send()
            .await
            .unwrap();
        let status = answer.status();
        let body: Value = answer.json().await.unwrap_or_default();
        if status == 200 && body["errors"].is_null() {
            assert_eq!(body["data"]["devices"]["totalCount"], "16", "{body}");
            break;
        }
        assert!(Instant::now() < deadline, "the query API answers {status}: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    serve.assert_alive();
    let errors_logged = serve
        .entries()
        .iter()
        .filter(|e| e["message"] == "internal error")
        .count();
    assert_eq!(errors_logged, 0, "the command API logged internal errors");

    let outage_503s = tally.unavailable.iter().filter(|at| **at >= stopped).count();
    let dashboard_503s = dashboard_seen.iter().filter(|(s, _)| *s == 503).count();
    eprintln!(
        "primary restart: {} commands acknowledged ({} after the restart), {outage_503s} answered 503 \
         (first {:?} after the stop), slowest answer {:?}; outage {outage:?}; /readyz 503 after \
         {command_unready:?} (command) / {query_unready:?} (query), 200 again {command_ready:?} / \
         {query_ready:?} after the restart; first acknowledgement {:?} after the restart; \
         dashboard {} queries, {dashboard_503s} answered 503; projections at head {head} {caught_up:?} \
         after the load",
        tally.acks.len(),
        tally.acks.iter().filter(|a| a.at >= restarted).count(),
        first_503 - stopped,
        tally.slowest,
        first_ack.saturating_duration_since(restarted),
        dashboard_seen.len(),
    );
    pool.close().await;
    drop(serve);
    drop(cluster);
}

// ---------------------------------------------------------------------------------------------
// Broker stopped

/// Every message of `topic` (read from the start of every partition to its end): how many
/// times each position was published.
async fn published_positions(topic: String) -> HashMap<i64, usize> {
    tokio::task::spawn_blocking(move || {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        use rdkafka::message::{Headers, Message};
        use rdkafka::{ClientConfig, Offset, TopicPartitionList};

        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", BROKERS)
            .set("group.id", format!("{topic}-audit"))
            .set("enable.auto.commit", "false")
            .set("broker.address.family", "v4")
            .create()
            .unwrap();
        let timeout = Duration::from_secs(30);
        let metadata = consumer.fetch_metadata(Some(&topic), timeout).unwrap();
        let partitions: Vec<i32> = metadata.topics()[0].partitions().iter().map(|p| p.id()).collect();
        let mut ends = HashMap::new();
        let mut assignment = TopicPartitionList::new();
        for partition in &partitions {
            let (low, high) = consumer.fetch_watermarks(&topic, *partition, timeout).unwrap();
            if high > low {
                ends.insert(*partition, high);
                assignment
                    .add_partition_offset(&topic, *partition, Offset::Offset(low))
                    .unwrap();
            }
        }
        consumer.assign(&assignment).unwrap();
        let mut counts: HashMap<i64, usize> = HashMap::new();
        let deadline = Instant::now() + Duration::from_secs(120);
        while !ends.is_empty() {
            assert!(
                Instant::now() < deadline,
                "the topic was not read to its end: {ends:?} left"
            );
            let Some(message) = consumer.poll(Duration::from_millis(500)) else {
                continue;
            };
            let message = message.unwrap();
            let position = message
                .headers()
                .and_then(|headers| {
                    headers
                        .iter()
                        .find(|h| h.key == kafka_adapters::relay::headers::POSITION)
                        .and_then(|h| h.value)
                        .and_then(|v| std::str::from_utf8(v).ok()?.parse::<i64>().ok())
                })
                .expect("a message without a position header");
            *counts.entry(position).or_default() += 1;
            if ends
                .get(&message.partition())
                .is_some_and(|end| message.offset() + 1 >= *end)
            {
                ends.remove(&message.partition());
            }
        }
        counts
    })
    .await
    .unwrap()
}

/// Scale-out roles as separate processes (command API, relay, Kafka projector) under a
/// steady stream of portal commands; the broker is stopped for 30 s and started again. Not
/// one command fails or waits on it (the log is in PostgreSQL); the relay and the projector
/// reconnect by themselves, the relay catches up and publishes every position exactly once,
/// the projections reach the head and equal a rebuild from the log.
#[sqlx::test(migrations = false)]
async fn a_broker_stopped_for_30_s_fails_no_command_and_loses_no_event(pool: PgPool) {
    init_test_logs();
    let _restarter = BrokerRestarter;
    assert!(
        run_script("broker.sh", vec!["start".into()]).await,
        "ops/dev/broker.sh start failed"
    );
    let url = urls::database(&pool).await;
    let topic = format!("cloudphone.faults.{}", Uuid::now_v7().simple());
    let dir = tempfile::tempdir().unwrap();
    let kafka = [
        ("CLOUDPHONE_KAFKA_BROKERS", BROKERS),
        ("CLOUDPHONE_KAFKA_TOPIC", topic.as_str()),
        ("CLOUDPHONE_KAFKA_PARTITIONS", "4"),
    ];
    // The command API migrates; the others start once it listens.
    let mut command_api = RoleProcess::start(CLOUDPHONE, "command-api", &url, &[], dir.path());
    let command = command_api.address("command API listening").await;
    let mut relay = RoleProcess::start(CLOUDPHONE, "relay", &url, &kafka, dir.path());
    let mut projector = RoleProcess::start(CLOUDPHONE, "projector", &url, &kafka, dir.path());
    relay
        .logged("relay publishing", |e| e["message"] == "relay publishing")
        .await;
    for projection in ["fleet", "daily_usage"] {
        projector
            .logged("its partitions", |e| {
                e["message"] == "partitions assigned"
                    && e["projection"] == projection
                    && e["partitions"].as_str().is_some_and(|p| p != "[]")
            })
            .await;
    }
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let tenants = provision(&client, &command, 4, 2).await;
    let reader = event_log::LogReader::new(pool.clone());

    // A steady stream (about 40 commands, 60 events a second), so that every fault finds
    // commands in flight.
    let tally = Arc::new(Mutex::new(Tally::default()));
    let done = CancellationToken::new();
    let drivers = spawn_drivers(&client, &command, &tenants, Duration::from_millis(100), &tally, &done);
    let began = Instant::now();
    await_acks(&tally, began, 40, Duration::from_secs(60)).await;
    let flowing = reader.head().await.unwrap().position;
    projections_reach(&pool, flowing, Duration::from_secs(90)).await;

    assert!(
        run_script("broker.sh", vec!["stop".into()]).await,
        "ops/dev/broker.sh stop failed"
    );
    let stopped = Instant::now();
    let head_at_stop = reader.head().await.unwrap().position;
    // The outage: commands go on; the roles must not die of it.
    while stopped.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        for role in [&mut command_api, &mut relay, &mut projector] {
            role.assert_alive();
        }
        let tally = tally.lock().unwrap();
        assert!(tally.failures.is_empty(), "a command failed: {:?}", tally.failures);
    }
    let during = acks_since(&tally, stopped);
    let head_at_restart = reader.head().await.unwrap().position;
    assert!(
        run_script("broker.sh", vec!["start".into()]).await,
        "ops/dev/broker.sh start failed"
    );
    let restarted = Instant::now();
    let outage = restarted - stopped;
    assert!(
        during >= 100,
        "only {during} commands acknowledged while the broker was down"
    );

    await_acks(&tally, restarted, 40, Duration::from_secs(60)).await;
    done.cancel();
    for driver in drivers {
        driver.await.unwrap();
    }
    let tally = Arc::try_unwrap(tally).unwrap().into_inner().unwrap();
    assert!(tally.failures.is_empty(), "commands failed: {:#?}", tally.failures);
    assert!(
        tally.unavailable.is_empty(),
        "{} commands answered 503",
        tally.unavailable.len()
    );
    assert!(tally.refused.is_empty(), "commands refused: {:#?}", tally.refused);

    let head = reader.head().await.unwrap().position;
    let load_ended = Instant::now();
    relay_reaches(&pool, &topic, head, Duration::from_secs(180)).await;
    let relay_caught_up = load_ended.elapsed();
    projections_reach(&pool, head, Duration::from_secs(180)).await;
    let projections_caught_up = load_ended.elapsed();
    for role in [&mut command_api, &mut relay, &mut projector] {
        role.assert_alive();
    }
    assert_acks_in_log(&pool, &tally.acks, &tenants).await;
    assert_read_models_equal_a_rebuild(&pool).await;

    // The topic holds every position of the log, and again only what was in flight when the
    // broker went away: the relay promises at-least-once with at most one round in flight
    // re-published (consumers drop those; the read models equal a rebuild above). A broker
    // can make that happen: stopped with SIGTERM, tansu 0.6 (the earlier development broker)
    // shut its storage down under produce requests still being answered, so a batch it
    // stored could lose its acknowledgement and its producer sequence, and the idempotent
    // producer's retry after the restart was stored again. Apache Kafka keeps producer state
    // with the log, and would answer the retry as a duplicate.
    let published = published_positions(topic.clone()).await;
    let missing: Vec<i64> = (1..=head).filter(|p| !published.contains_key(p)).take(10).collect();
    assert!(missing.is_empty(), "never published: {missing:?}...");
    let again: Vec<(i64, usize)> = published
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(p, n)| (*p, *n))
        .collect();
    assert!(
        again
            .iter()
            .all(|(position, times)| *times == 2 && *position <= head_at_restart),
        "published again outside the outage, or more than twice: {again:?}"
    );
    assert!(
        again.len() <= 2_000,
        "more than one relay round published again: {} positions",
        again.len()
    );
    assert_eq!(published.len() as i64, head, "positions beyond the log's head");

    let restarts = relay
        .entries()
        .iter()
        .filter(|e| e["message"] == "relay restarting from its checkpoint")
        .count();
    eprintln!(
        "broker outage: {outage:?} (head {head_at_stop} -> {head_at_restart} meanwhile); {} commands \
         acknowledged, {during} during the outage, none failed, slowest answer {:?}; relay at the \
         head {relay_caught_up:?} and projections {projections_caught_up:?} after the load ended \
         (head {head}); relay restarts {restarts}; {} positions published again",
        tally.acks.len(),
        tally.slowest,
        again.len(),
    );
}
