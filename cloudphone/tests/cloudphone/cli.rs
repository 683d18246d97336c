//! The binary as an operator uses it: real process, real database.

use std::process::{Command, Output};

use chrono::Utc;
use event_log::{AppendBatch, EventStore, ExpectedVersion, NewEvent, StoreConfig, StreamAppend};
use event_schema::{DeviceStarted, Event, EventMetadata, StreamType};
use sqlx::PgPool;
use test_support::{db, tokens, urls};
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

#[test]
fn verbs_without_a_database_fail_with_a_clear_error() {
    // Every verb that needs the database fails with a clear error, not a panic.
    for args in [
        &["query-api"][..],
        &["replay", "fleet"],
        &["export"],
        &["keys", "status"],
    ] {
        let output = cloudphone("postgres://nobody@127.0.0.1:1/none", args);
        assert!(!output.status.success());
        assert!(
            text(&output).contains("cannot reach PostgreSQL"),
            "{args:?}: {}",
            text(&output)
        );
    }
    // A replay needs a projection, and knows which exist.
    let output = cloudphone("postgres://nobody@127.0.0.1:1/none", &["replay", "billing"]);
    assert!(!output.status.success());
    assert!(text(&output).contains("fleet, daily-usage"), "{}", text(&output));
}

#[test]
fn a_projector_interval_out_of_range_or_not_a_number_is_refused_before_anything_starts() {
    for (flag, env) in [(Some("5000"), None), (None, Some("ten"))] {
        let mut command = Command::new(env!("CARGO_BIN_EXE_cloudphone"));
        command
            .arg("projector")
            .env("CLOUDPHONE_DATABASE_URL", "postgres://nobody@127.0.0.1:1/none");
        if let Some(value) = flag {
            command.args(["--projector-min-batch-interval-ms", value]);
        }
        if let Some(value) = env {
            command.env("CLOUDPHONE_PROJECTOR_MIN_BATCH_INTERVAL_MS", value);
        }
        let output = command.output().expect("run cloudphone");
        let shown = text(&output);
        assert!(!output.status.success(), "{shown}");
        assert!(shown.contains("--projector-min-batch-interval-ms"), "{shown}");
        assert!(
            !shown.contains("cannot reach PostgreSQL"),
            "it tried the database first: {shown}"
        );
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
    let url = urls::database(&pool).await;
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
    let url = urls::database(&pool).await;
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

    // Past the append-only triggers, as only a superuser could on purpose.
    let changed = db::tamper(
        &pool,
        "UPDATE user_events SET metadata = '{\"actor\": {\"role\": \"admin\", \"subject\": \"mallory\"}}' WHERE position = 4",
    )
    .await;
    assert_eq!(changed, 1);
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

#[test]
fn token_mints_a_verifiable_token_and_refuses_a_bad_subject() {
    let user = Uuid::now_v7();
    let output = cloudphone(
        "postgres://unused@127.0.0.1:1/x",
        &["token", "--user", &user.to_string(), "--role", "admin"],
    );
    assert!(output.status.success(), "{}", text(&output));
    let token = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    let verifier = http_edge::auth::TokenVerifier::new(&http_edge::auth::KeySource::Secret(
        http_edge::auth::DEVELOPMENT_SECRET.into(),
    ))
    .unwrap();
    let principal = verifier.verify(&token).unwrap();
    assert!(principal.is_admin());
    assert_eq!(principal.user_id, Some(user));

    let bad = cloudphone("postgres://unused@127.0.0.1:1/x", &["token", "--user", "alice"]);
    assert!(!bad.status.success());
    assert!(text(&bad).contains("must be a UUID"), "{}", text(&bad));
}

/// `serve` on a fresh database: migrates, answers commands, stops cleanly on SIGTERM.
#[sqlx::test(migrations = false)]
async fn serve_answers_commands_and_stops_cleanly_on_sigterm(pool: PgPool) {
    use std::io::{BufRead, BufReader};
    let url = urls::database(&pool).await;
    let mut child = Command::new(env!("CARGO_BIN_EXE_cloudphone"))
        .args(["serve"])
        .env("CLOUDPHONE_DATABASE_URL", &url)
        .env("CLOUDPHONE_COMMAND_LISTEN", "127.0.0.1:0")
        .env("CLOUDPHONE_QUERY_LISTEN", "127.0.0.1:0")
        .env("CLOUDPHONE_LOG_FORMAT", "json")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The JSON log says where the APIs listen.
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let (mut address, mut query_address) = (None, None);
    while address.is_none() || query_address.is_none() {
        let line = lines.next().expect("serve exited before listening").unwrap();
        let entry: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        let listening = entry["address"].as_str().map(str::to_owned);
        match entry["message"].as_str() {
            Some("command API listening") => address = listening,
            Some("query API listening") => query_address = listening,
            _ => {}
        }
    }
    let (address, query_address) = (address.unwrap(), query_address.unwrap());
    let drain = std::thread::spawn(move || lines.map_while(Result::ok).collect::<Vec<_>>());

    let user = Uuid::now_v7();
    let token = tokens::development(&user.to_string(), http_edge::auth::Role::User);
    let client = reqwest::Client::new();
    let registered = client
        .post(format!("http://{address}/v1/users"))
        .bearer_auth(&token)
        .json(&serde_json::json!({"tier": "pro", "email": "a@example.com", "phone": "+4915112345678"}))
        .send()
        .await
        .unwrap();
    assert_eq!(registered.status(), 201);
    let ready = client.get(format!("http://{address}/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    let created = client
        .post(format!("http://{address}/v1/devices"))
        .bearer_auth(&token)
        .json(&serde_json::json!({"provider": "huawei", "cpu_cores": 2, "memory_mb": 2048, "android_version": 14}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);

    let created: serde_json::Value = created.json().await.unwrap();
    let device = created["id"].as_str().unwrap().to_owned();
    let position = created["position"].as_i64().unwrap();

    // The embedded projectors bring the command into the read models, and the query API
    // answers at the command's position.
    let answer: serde_json::Value = client
        .post(format!("http://{query_address}/graphql"))
        .bearer_auth(&token)
        .header("x-min-position", position.to_string())
        .json(
            &serde_json::json!({"query": "query($id: UUID!) { device(id: $id) { ownerId provider status }
            deviceStats { totals { deviceCount } } }", "variables": {"id": device}}),
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        answer["data"],
        serde_json::json!({"device": {"ownerId": user, "provider": "HUAWEI", "status": "STOPPED"},
                           "deviceStats": {"totals": {"deviceCount": "1"}}}),
        "{answer}"
    );

    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = child.wait().unwrap();
    assert!(status.success(), "serve exited with {status}");
    let logs = drain.join().unwrap().join("\n");
    assert!(logs.contains("command API stopped"), "{logs}");
    assert!(logs.contains("query API stopped"), "{logs}");
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM user_events")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(events, 4);
}
