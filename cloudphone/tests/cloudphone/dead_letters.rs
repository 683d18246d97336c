//! `cloudphone dead-letters list|retry|skip` as an operator runs them: real process, real
//! database, events parked by the projectors' own code. The rules behind the verbs (exactly
//! once, log order, concurrency) are tested in `projections`; this checks what the verbs
//! print, their exit codes, and that what they report is what happened to the read models.

use std::process::{Command, Output};

use chrono::{Duration, Utc};
use event_log::{AppendBatch, EventStore, ExpectedVersion, LogReader, NewEvent, StoreConfig, StreamAppend};
use event_schema::{
    Currency, DeviceCreated, DeviceStarted, DeviceStopped, Event, EventMetadata, Money, Provider, StopReason,
    StreamType, UsageRecorded,
};
use read_models::stored::load_read_models;
use serde_json::Value;
use sqlx::PgPool;
use test_support::older_projector::project_as_an_older_binary;
use test_support::{db, urls};
use uuid::Uuid;

fn cloudphone(database_url: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cloudphone"))
        .args(args)
        .env("CLOUDPHONE_DATABASE_URL", database_url)
        .env("CLOUDPHONE_LOG", "error")
        .env("CLOUDPHONE_LOG_FORMAT", "json")
        .env_remove("CLOUDPHONE_ACTOR")
        .output()
        .expect("run cloudphone")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A device created, started, billed and stopped: positions 1 to 4 (usage at 3).
async fn device_session(pool: &PgPool) -> Uuid {
    let store = EventStore::open(pool.clone(), StoreConfig::default()).await.unwrap();
    let (device, owner) = (Uuid::now_v7(), Uuid::now_v7());
    let start = Utc::now() - Duration::hours(2);
    let end = start + Duration::minutes(30);
    let events: Vec<Event> = vec![
        DeviceCreated {
            device_id: device,
            owner_id: owner,
            provider: Provider::Aws,
            cpu_cores: 4,
            memory_mb: 8192,
            android_version: 14,
            created_at: start - Duration::minutes(5),
        }
        .into(),
        DeviceStarted {
            device_id: device,
            started_at: start,
        }
        .into(),
        UsageRecorded {
            owner_id: owner,
            device_id: device,
            provider: Provider::Aws,
            started_at: start,
            ended_at: end,
            minutes: 30,
            cost: Money {
                amount_minor: 450,
                currency: Currency::USD,
            },
            pricing_plan_id: "test".into(),
        }
        .into(),
        DeviceStopped {
            device_id: device,
            stopped_at: end,
            reason: StopReason::Requested,
        }
        .into(),
    ];
    let events = events
        .iter()
        .map(|e| NewEvent::from_event(e, EventMetadata::default(), Utc::now()).unwrap())
        .collect();
    store
        .append(AppendBatch::single(StreamAppend {
            stream_id: device,
            stream_type: StreamType::Device,
            owner_id: owner,
            expected: ExpectedVersion::NoStream,
            events,
        }))
        .await
        .unwrap();
    device
}

fn listed(url: &str, args: &[&str]) -> Value {
    let output = cloudphone(url, &[&["dead-letters", "list", "--json"][..], args].concat());
    assert!(output.status.success(), "{}", stderr(&output));
    serde_json::from_str(&stdout(&output)).unwrap()
}

async fn daily_usage_equals_a_rebuild(pool: &PgPool) -> bool {
    let reader = LogReader::new(pool.clone());
    let head = reader.head().await.unwrap().position;
    let rebuilt = projections::fold_log(&reader, head, 1_000)
        .await
        .unwrap()
        .without_provider_breakdown();
    load_read_models(pool).await.unwrap().daily_usage == rebuilt.daily_usage
}

#[sqlx::test(migrations = false)]
async fn an_operator_lists_retries_once_and_skips_dead_letters_with_a_reason(pool: PgPool) {
    db::migrated(&pool).await;
    let url = urls::database(&pool).await;
    device_session(&pool).await;
    project_as_an_older_binary(&pool, &[3]).await;
    assert!(
        !daily_usage_equals_a_rebuild(&pool).await,
        "the usage is missing before the retry"
    );

    let pending = listed(&url, &[]);
    assert_eq!(pending["total"], 2, "{pending}");
    let letters = pending["letters"].as_array().unwrap();
    let id_of = |projection: &str| {
        letters
            .iter()
            .find(|l| l["projection"] == projection)
            .map(|l| (l["id"].as_i64().unwrap(), l))
            .unwrap()
    };
    let (usage_id, usage) = id_of("daily_usage");
    let (fleet_id, _) = id_of("fleet");
    assert_eq!(usage["position"], 3);
    assert_eq!(usage["event_type"], "UsageRecorded");
    assert_eq!(usage["state"], "pending");
    assert_eq!(usage["attempts"], 1);
    let only_fleet = listed(&url, &["--projection", "fleet"]);
    assert_eq!(only_fleet["total"], 1);
    let table = cloudphone(&url, &["dead-letters", "list"]);
    assert!(stdout(&table).contains("UsageRecorded"), "{}", stdout(&table));
    assert!(stdout(&table).contains("2 of 2 shown"), "{}", stdout(&table));

    // Hostile input: bounded, or refused in one line, changing nothing.
    let huge = listed(&url, &["--limit", "99999999999"]);
    assert_eq!(huge["letters"].as_array().unwrap().len(), 2);
    assert!(
        !cloudphone(&url, &["dead-letters", "list", "--limit", "0"])
            .status
            .success()
    );
    let wrong = cloudphone(
        &url,
        &["dead-letters", "retry", &usage_id.to_string(), "--projection", "fleet"],
    );
    assert!(!wrong.status.success());
    assert!(
        stderr(&wrong).contains("belongs to projection `daily_usage`, not `fleet`"),
        "{}",
        stderr(&wrong)
    );
    let unknown = cloudphone(&url, &["dead-letters", "retry", "987654321"]);
    assert!(!unknown.status.success());
    assert!(
        stderr(&unknown).contains("no dead letter has id 987654321"),
        "{}",
        stderr(&unknown)
    );
    for reason in ["", "  ", &"why ".repeat(400)] {
        let bad = cloudphone(
            &url,
            &["dead-letters", "skip", &fleet_id.to_string(), "--reason", reason],
        );
        assert!(!bad.status.success(), "reason {reason:?} was taken");
        assert!(stderr(&bad).contains("needs a reason"), "{}", stderr(&bad));
    }
    assert_eq!(listed(&url, &[])["total"], 2, "a refused command changed a letter");

    // The cause is fixed (this binary knows the event): the retry applies it, once.
    let retried = cloudphone(
        &url,
        &["dead-letters", "retry", &usage_id.to_string(), "--actor", "alice"],
    );
    assert!(retried.status.success(), "{}", stderr(&retried));
    assert!(stdout(&retried).contains("applied"), "{}", stdout(&retried));
    assert!(daily_usage_equals_a_rebuild(&pool).await);
    let again = cloudphone(&url, &["dead-letters", "retry", &usage_id.to_string()]);
    assert!(again.status.success(), "{}", stderr(&again));
    assert!(
        stdout(&again).contains("already retried")
            && stdout(&again).contains("by alice")
            && stdout(&again).contains("nothing done"),
        "{}",
        stdout(&again)
    );
    assert!(
        daily_usage_equals_a_rebuild(&pool).await,
        "a second retry applied the event again"
    );

    // The fleet's device already has its stop applied: refused, pointing to a replay.
    let refused = cloudphone(&url, &["dead-letters", "retry", "--all"]);
    assert!(!refused.status.success());
    assert!(stdout(&refused).contains("cloudphone replay"), "{}", stdout(&refused));
    assert!(
        stderr(&refused).contains("1 of 1 dead letter(s) still pending"),
        "{}",
        stderr(&refused)
    );

    let skipped = cloudphone(
        &url,
        &[
            "dead-letters",
            "skip",
            &fleet_id.to_string(),
            "--reason",
            "rebuilt by replay",
            "--actor",
            "bob",
        ],
    );
    assert!(skipped.status.success(), "{}", stderr(&skipped));
    let record = listed(&url, &["--state", "skipped"]);
    assert_eq!(record["total"], 1);
    assert_eq!(record["letters"][0]["resolution_note"], "rebuilt by replay");
    assert_eq!(record["letters"][0]["resolved_by"], "bob");
    assert_eq!(
        listed(&url, &["--state", "all"])["total"],
        2,
        "resolved letters are kept"
    );
    let nothing = cloudphone(&url, &["dead-letters", "retry", "--all"]);
    assert!(nothing.status.success(), "{}", stderr(&nothing));
    assert!(
        stdout(&nothing).contains("no pending dead letters"),
        "{}",
        stdout(&nothing)
    );
}
