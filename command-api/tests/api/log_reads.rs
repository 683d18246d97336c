//! What a command reads from the log before it decides. A create on an id the server has just
//! generated reads no stream: none can have that id. A create on a client's reference reads
//! the stream its id names, which may be in the log already.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

use crate::support::*;

const LIMIT: Duration = Duration::from_secs(20);

/// Whether a statement of this database waits for a lock on `user_events_archive`.
async fn waits_for_the_archive(pool: &PgPool) -> bool {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_locks l JOIN pg_class c ON c.oid = l.relation
          WHERE c.relname = 'user_events_archive' AND NOT l.granted
            AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()))",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

#[sqlx::test(migrations = false)]
async fn a_create_on_a_generated_id_reads_no_stream_and_one_on_a_reference_does(pool: PgPool) {
    let app = TestApp::spawn(pool.clone()).await;
    let token = app.register(Uuid::now_v7(), "enterprise").await;
    let body = json!({"provider": "aws", "cpu_cores": 2, "memory_mb": 2048, "android_version": 14});
    let before = app.event_count().await;

    // A stream is read through `user_events_all`, which takes in the archived months; an
    // append never touches them. With the archive held, every stream read waits.
    let mut holder = pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE user_events_archive IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *holder)
        .await
        .unwrap();

    let generated = tokio::time::timeout(LIMIT, app.post("/v1/devices", &token, body.clone()))
        .await
        .expect("a create on a generated id waited for the archive: it read a stream");
    assert_eq!(generated.status, StatusCode::CREATED, "{generated:?}");

    // The same create with a reference does read, so it waits until the archive is released.
    let mut with_reference = body.clone();
    with_reference["reference"] = json!("rack-7-slot-3");
    let request = app
        .client
        .post(app.url("/v1/devices"))
        .bearer_auth(&token)
        .json(&with_reference)
        .send();
    let referenced = tokio::spawn(async move { TestApp::answer(request.await.unwrap()).await });
    let deadline = Instant::now() + LIMIT;
    while !waits_for_the_archive(&pool).await {
        assert!(
            Instant::now() < deadline,
            "the create on a reference never read its stream"
        );
        assert!(
            !referenced.is_finished(),
            "the create on a reference finished without reading its stream"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    holder.rollback().await.unwrap();
    let referenced = tokio::time::timeout(LIMIT, referenced).await.unwrap().unwrap();
    assert_eq!(referenced.status, StatusCode::CREATED, "{referenced:?}");
    assert_ne!(referenced.body["id"], generated.body["id"]);
    assert_eq!(
        app.event_count().await,
        before + 2 * 2,
        "two creates of two events each"
    );
}
