//! Outages and shutdown: a database that goes away is a 503 (never a 500), the API recovers by
//! itself, and a graceful stop finishes the appends in flight.

use std::str::FromStr;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, PgConnection, PgPool};
use uuid::Uuid;

use crate::support::*;

async fn admin_connection() -> PgConnection {
    let url = std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    PgConnectOptions::from_str(&url).unwrap().connect().await.unwrap()
}

async fn current_database(pool: &PgPool) -> String {
    sqlx::query_scalar("SELECT current_database()")
        .fetch_one(pool)
        .await
        .unwrap()
}

#[sqlx::test(migrations = false)]
async fn a_database_outage_is_503_and_the_api_recovers_by_itself(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let token = app.register(Uuid::now_v7(), "pro").await;
    let device = app.create_device(&token).await;
    let database = current_database(&app.pool).await;
    let events = app.event_count().await;

    let mut admin = admin_connection().await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "ALTER DATABASE \"{database}\" ALLOW_CONNECTIONS false"
    )))
    .execute(&mut admin)
    .await
    .unwrap();
    sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1")
        .bind(&database)
        .execute(&mut admin)
        .await
        .unwrap();

    let down = app.post_empty(&format!("/v1/devices/{device}/start"), &token).await;
    assert_eq!(
        (down.status, down.code()),
        (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        "{down:?}"
    );
    assert!(down.headers.get("retry-after").is_some());
    // An aggregate that must be read from the log fails the same way.
    let other = app
        .post_empty(&format!("/v1/devices/{}/start", Uuid::now_v7()), &token)
        .await;
    assert_eq!(other.status, StatusCode::SERVICE_UNAVAILABLE, "{other:?}");
    let ready = app.send(reqwest::Method::GET, "/readyz", None, None, &[]).await;
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);

    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "ALTER DATABASE \"{database}\" ALLOW_CONNECTIONS true"
    )))
    .execute(&mut admin)
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let up = loop {
        let answer = app.post_empty(&format!("/v1/devices/{device}/start"), &token).await;
        if answer.status != StatusCode::SERVICE_UNAVAILABLE || Instant::now() > deadline {
            break answer;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(up.status, StatusCode::OK, "{up:?}");
    assert_eq!(app.event_count().await, events + 1, "the failed attempts wrote nothing");
}

#[sqlx::test(migrations = false)]
async fn a_graceful_stop_finishes_the_append_in_flight(pool: PgPool) {
    let mut app = TestApp::spawn(pool).await;
    let token = app.register(Uuid::now_v7(), "pro").await;
    let device = app.create_device(&token).await;

    // Stall appends on the head lock, send a command, then ask the server to stop.
    let mut holder = app.pool.begin().await.unwrap();
    sqlx::query("SELECT position FROM log_head FOR UPDATE")
        .execute(&mut *holder)
        .await
        .unwrap();
    let url = app.url(&format!("/v1/devices/{device}/start"));
    let client = app.client.clone();
    let in_flight = tokio::spawn({
        let token = token.clone();
        async move { client.post(url).bearer_auth(token).send().await.map(|r| r.status()) }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while lock_waiters(&app.pool).await == 0 {
        assert!(Instant::now() < deadline, "the append never reached the lock");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let stopping = tokio::spawn(async move {
        let result = app.stop().await;
        (result, app)
    });
    holder.rollback().await.unwrap();

    assert_eq!(
        in_flight.await.unwrap().unwrap(),
        StatusCode::OK,
        "the in-flight command completed"
    );
    let (stopped, app) = stopping.await.unwrap();
    stopped.unwrap();
    let types = app.stream_types(device).await;
    assert_eq!(types, ["DeviceCreated", "DeviceStarted"]);
}

async fn lock_waiters(pool: &PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
    )
    .fetch_one(pool)
    .await
    .unwrap_or(0)
}

#[sqlx::test(migrations = false)]
async fn a_request_over_its_time_is_503_and_its_idempotent_retry_tells_what_happened(pool: PgPool) {
    let app = TestApp::spawn_with(pool, |config| config.request_timeout = Duration::from_millis(300)).await;
    let token = app.register(Uuid::now_v7(), "pro").await;
    let device = app.create_device(&token).await;

    let mut holder = app.pool.begin().await.unwrap();
    sqlx::query("SELECT position FROM log_head FOR UPDATE")
        .execute(&mut *holder)
        .await
        .unwrap();
    let path = format!("/v1/devices/{device}/start");
    let key = [("idempotency-key", "slow-start")];
    let timed_out = app.send(reqwest::Method::POST, &path, Some(&token), None, &key).await;
    assert_eq!(
        (timed_out.status, timed_out.code()),
        (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
    );
    holder.rollback().await.unwrap();

    // The append was queued before the answer; once it commits, the retry returns its outcome.
    let deadline = Instant::now() + Duration::from_secs(10);
    let retry = loop {
        let answer = app.send(reqwest::Method::POST, &path, Some(&token), None, &key).await;
        if answer.status == StatusCode::OK || Instant::now() > deadline {
            break answer;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(retry.status, StatusCode::OK, "{retry:?}");
    assert_eq!(
        app.stream_types(device).await,
        ["DeviceCreated", "DeviceStarted"],
        "started exactly once"
    );
}
