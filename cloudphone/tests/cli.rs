//! The binary as an operator uses it: real process, real database.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests panic on purpose

use std::process::{Command, Output};

use chrono::Utc;
use event_log::{AppendBatch, EventStore, ExpectedVersion, NewEvent, StoreConfig, StreamAppend};
use event_schema::{DeviceStarted, Event, EventMetadata, StreamType};
use sqlx::PgPool;
use uuid::Uuid;

fn cloudphone(database_url: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cloudphone"))
        .args(args)
        .env("CLOUDPHONE_DATABASE_URL", database_url)
        .env("CLOUDPHONE_LOG_FORMAT", "json")
        .output()
        .expect("run cloudphone")
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// A URL for the test's own database on the server of `DATABASE_URL`.
async fn url_of(pool: &PgPool) -> String {
    let name: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(pool)
        .await
        .unwrap();
    let server = std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let base = server
        .rsplit_once('/')
        .map(|(base, _)| base.to_owned())
        .unwrap_or(server);
    format!("{base}/{name}")
}

#[test]
fn verbs_that_are_not_built_say_so_and_fail() {
    for verb in ["query-api", "projector", "relay", "replay", "export", "load"] {
        let output = cloudphone("postgres://nobody@127.0.0.1:1/none", &[verb]);
        assert!(!output.status.success(), "{verb} succeeded");
        assert!(text(&output).contains("is not built yet"), "{verb}: {}", text(&output));
    }
}

#[test]
fn a_database_that_cannot_be_reached_is_a_clear_error() {
    let output = cloudphone("postgres://postgres:secret@127.0.0.1:1/cloudphone", &["migrate"]);
    assert!(!output.status.success());
    let shown = text(&output);
    assert!(shown.contains("cannot reach PostgreSQL"), "{shown}");
    assert!(!shown.contains("secret"), "the password leaked: {shown}");
}

#[sqlx::test(migrations = false)]
async fn migrate_is_repeatable_and_partitions_are_listed(pool: PgPool) {
    let url = url_of(&pool).await;
    for _ in 0..2 {
        let output = cloudphone(&url, &["migrate"]);
        assert!(output.status.success(), "{}", text(&output));
    }
    let output = cloudphone(&url, &["partitions", "list"]);
    assert!(output.status.success(), "{}", text(&output));
    let month = Utc::now().format("user_events_%Y_%m").to_string();
    assert!(text(&output).contains(&month), "{}", text(&output));
    assert!(
        text(&output).contains("3 months provisioned ahead"),
        "{}",
        text(&output)
    );
    let output = cloudphone(&url, &["partitions", "detach", "not-a-month"]);
    assert!(!output.status.success());
    assert!(text(&output).contains("month must look like"), "{}", text(&output));
}

#[sqlx::test(migrations = false)]
async fn verify_passes_on_an_intact_log_and_names_the_tampered_position(pool: PgPool) {
    let url = url_of(&pool).await;
    event_log::migrate(&pool).await.unwrap();
    let store = EventStore::open(pool.clone(), StoreConfig::default()).await.unwrap();
    let device = Uuid::now_v7();
    let events = (0..6)
        .map(|_| {
            let event = Event::from(DeviceStarted {
                device_id: device,
                started_at: Utc::now(),
            });
            NewEvent::from_event(&event, EventMetadata::default(), Utc::now()).unwrap()
        })
        .collect();
    store
        .append(AppendBatch::single(StreamAppend {
            stream_id: device,
            stream_type: StreamType::Device,
            owner_id: Uuid::now_v7(),
            expected: ExpectedVersion::NoStream,
            events,
        }))
        .await
        .unwrap();

    let output = cloudphone(&url, &["verify"]);
    assert!(output.status.success(), "{}", text(&output));
    assert!(text(&output).contains("verified 6 events"), "{}", text(&output));

    sqlx::query("UPDATE user_events SET metadata = '{\"actor\": {\"role\": \"admin\", \"subject\": \"mallory\"}}' WHERE position = 4")
        .execute(&pool)
        .await
        .unwrap();
    let output = cloudphone(&url, &["verify"]);
    assert!(!output.status.success());
    assert!(
        text(&output).contains("chain broken at position 4"),
        "{}",
        text(&output)
    );
    let output = cloudphone(&url, &["verify", "--from", "5"]);
    assert!(
        output.status.success(),
        "a range after the tampered event verifies: {}",
        text(&output)
    );
}
