//! The quota holds under concurrency: reservations are appended atomically with the device,
//! against the owner's stream version.

use reqwest::StatusCode;
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

use crate::support::*;

#[sqlx::test(migrations = false)]
async fn fifty_concurrent_creates_never_exceed_the_quota(pool: PgPool) {
    // Two API instances on one database, as two processes would be: each caches the owner, so
    // only the version check on the owner's stream can keep them from both spending the quota.
    let app = TestApp::spawn(pool.clone()).await;
    let twin = TestApp::spawn(pool).await;
    let user = Uuid::now_v7();
    let token = app.register(user, "pro").await;
    let admin = TestApp::admin_token();
    let quota = app
        .send(
            reqwest::Method::PUT,
            &format!("/v1/users/{user}/quota"),
            Some(&admin),
            Some(json!({"max_devices": 10, "max_cpu_cores": 100, "max_memory_mb": 1000000})),
            &[],
        )
        .await;
    assert_eq!(quota.status, StatusCode::OK);

    let body = json!({"provider": "aws", "cpu_cores": 2, "memory_mb": 2048, "android_version": 14});
    // Both instances hold the owner in memory before the race: `app` from registering it,
    // `twin` from creating the first device.
    twin.create_device(&token).await;
    let answers = futures::future::join_all((0..50).map(|i| {
        let instance = if i % 2 == 0 { &app } else { &twin };
        instance.post("/v1/devices", &token, body.clone())
    }))
    .await;
    let created = answers.iter().filter(|a| a.status == StatusCode::CREATED).count();
    let refused = answers
        .iter()
        .filter(|a| a.status == StatusCode::UNPROCESSABLE_ENTITY && a.code() == "quota_exceeded")
        .count();
    assert_eq!(created, 9, "{answers:?}");
    assert_eq!(refused, 41, "every other request is refused for the quota: {answers:?}");

    let devices: i64 =
        sqlx::query_scalar("SELECT count(*) FROM streams WHERE stream_type = 'device' AND owner_id = $1")
            .bind(user)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    let reservations: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM user_events_all WHERE stream_id = $1 AND event_type = 'QuotaReserved'",
    )
    .bind(user)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!((devices, reservations), (10, 10));
}
