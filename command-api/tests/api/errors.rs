//! Every error status, as an RFC 9457 problem document with a stable code.

use http_edge::auth::{Role, mint_token};
use reqwest::{Method, StatusCode};
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

use crate::support::*;

fn assert_problem(answer: &Answer, status: StatusCode, code: &str) {
    assert_eq!(answer.status, status, "{answer:?}");
    assert_eq!(answer.code(), code, "{answer:?}");
    assert_eq!(answer.content_type, "application/problem+json", "{answer:?}");
    assert_eq!(answer.body["status"], status.as_u16());
    assert!(
        answer.body["type"].as_str().is_some_and(|t| t.starts_with("https://")),
        "{answer:?}"
    );
    assert!(
        answer.body["title"].is_string() && answer.body["detail"].is_string(),
        "{answer:?}"
    );
}

#[sqlx::test(migrations = false)]
async fn malformed_requests_are_400(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let token = app.register(Uuid::now_v7(), "pro").await;
    let raw = |body: &'static str| {
        app.client
            .post(app.url("/v1/devices"))
            .bearer_auth(&token)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    assert_problem(
        &TestApp::answer(raw("{\"provider\":").await.unwrap()).await,
        StatusCode::BAD_REQUEST,
        "malformed_json",
    );
    let wrong_type = raw(r#"{"provider":"aws","cpu_cores":"four","memory_mb":2048,"android_version":14}"#);
    assert_problem(
        &TestApp::answer(wrong_type.await.unwrap()).await,
        StatusCode::BAD_REQUEST,
        "invalid_body",
    );
    let negative = raw(r#"{"provider":"aws","cpu_cores":-4,"memory_mb":2048,"android_version":14}"#);
    assert_problem(
        &TestApp::answer(negative.await.unwrap()).await,
        StatusCode::BAD_REQUEST,
        "invalid_body",
    );
    let unknown = raw(r#"{"provider":"aws","cpu_cores":4,"memory_mb":2048,"android_version":14,"gpu":true}"#);
    assert_problem(
        &TestApp::answer(unknown.await.unwrap()).await,
        StatusCode::BAD_REQUEST,
        "invalid_body",
    );
    let bad_id = app.post_empty("/v1/devices/not-a-uuid/start", &token).await;
    assert_problem(&bad_id, StatusCode::BAD_REQUEST, "invalid_id");
    let bad_key = app
        .send(
            Method::POST,
            "/v1/users",
            Some(&token),
            Some(json!({})),
            &[("idempotency-key", "has spaces")],
        )
        .await;
    assert_problem(&bad_key, StatusCode::BAD_REQUEST, "invalid_idempotency_key");
    assert_eq!(app.event_count().await, 2, "only the registration was written");
}

#[sqlx::test(migrations = false)]
async fn missing_or_bad_tokens_are_401(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let body = json!({"provider": "aws", "cpu_cores": 2, "memory_mb": 2048, "android_version": 14});
    let none = app
        .send(Method::POST, "/v1/devices", None, Some(body.clone()), &[])
        .await;
    assert_problem(&none, StatusCode::UNAUTHORIZED, "unauthorized");
    assert_eq!(
        none.headers.get("www-authenticate").and_then(|v| v.to_str().ok()),
        Some("Bearer")
    );
    let forged = mint_token(
        "not-the-secret",
        &Uuid::now_v7().to_string(),
        Role::Admin,
        &[],
        chrono::Utc::now(),
        chrono::Duration::hours(1),
    )
    .unwrap();
    assert_problem(
        &app.post("/v1/devices", &forged, body.clone()).await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );
    let expired = mint_token(
        SECRET,
        &Uuid::now_v7().to_string(),
        Role::User,
        &[],
        chrono::Utc::now() - chrono::Duration::hours(3),
        chrono::Duration::hours(1),
    )
    .unwrap();
    assert_problem(
        &app.post("/v1/devices", &expired, body).await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );
    assert_eq!(app.event_count().await, 0);
}

#[sqlx::test(migrations = false)]
async fn acting_beyond_ones_rights_is_403(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let user = Uuid::now_v7();
    let token = app.register(user, "pro").await;
    let quota = app
        .send(
            Method::PUT,
            &format!("/v1/users/{user}/quota"),
            Some(&token),
            Some(json!({"max_devices": 99, "max_cpu_cores": 999, "max_memory_mb": 999999})),
            &[],
        )
        .await;
    assert_problem(&quota, StatusCode::FORBIDDEN, "forbidden");
    let for_someone_else = app
        .post("/v1/devices", &token, json!({"owner_id": Uuid::now_v7(), "provider": "aws", "cpu_cores": 2, "memory_mb": 2048, "android_version": 14}))
        .await;
    assert_problem(&for_someone_else, StatusCode::FORBIDDEN, "forbidden");
}

#[sqlx::test(migrations = false)]
async fn unknown_things_are_404_and_wrong_methods_405(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let token = app.register(Uuid::now_v7(), "pro").await;
    assert_problem(
        &app.post_empty(&format!("/v1/devices/{}/start", Uuid::now_v7()), &token)
            .await,
        StatusCode::NOT_FOUND,
        "device_not_found",
    );
    let admin = TestApp::admin_token();
    let tier = app
        .send(
            Method::PUT,
            &format!("/v1/users/{}/tier", Uuid::now_v7()),
            Some(&admin),
            Some(json!({"tier": "pro"})),
            &[],
        )
        .await;
    assert_problem(&tier, StatusCode::NOT_FOUND, "user_not_found");
    assert_problem(
        &app.send(Method::GET, "/v2/anything", None, None, &[]).await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    assert_problem(
        &app.send(Method::PATCH, "/v1/devices", Some(&token), None, &[]).await,
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
    );
}

#[sqlx::test(migrations = false)]
async fn invalid_transitions_are_409_and_invalid_values_422(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let token = app.register(Uuid::now_v7(), "free").await;
    let device = app.create_device(&token).await;
    app.post_empty(&format!("/v1/devices/{device}/start"), &token).await;
    assert_problem(
        &app.post_empty(&format!("/v1/devices/{device}/start"), &token).await,
        StatusCode::CONFLICT,
        "device_already_running",
    );
    let resize = app
        .post(
            &format!("/v1/devices/{device}/resize"),
            &token,
            json!({"cpu_cores": 4, "memory_mb": 4096}),
        )
        .await;
    assert_problem(&resize, StatusCode::CONFLICT, "device_running");

    // Free tier: one device, so the second is over quota.
    let second = app
        .post(
            "/v1/devices",
            &token,
            json!({"provider": "aws", "cpu_cores": 1, "memory_mb": 1024, "android_version": 14}),
        )
        .await;
    assert_problem(&second, StatusCode::UNPROCESSABLE_ENTITY, "quota_exceeded");
    let unknown_provider = app
        .post(
            "/v1/devices",
            &token,
            json!({"provider": "moon", "cpu_cores": 1, "memory_mb": 1024, "android_version": 14}),
        )
        .await;
    assert_problem(&unknown_provider, StatusCode::UNPROCESSABLE_ENTITY, "unknown_provider");
    let too_big = app
        .post(
            "/v1/devices",
            &token,
            json!({"provider": "aws", "cpu_cores": 64, "memory_mb": 1024, "android_version": 14}),
        )
        .await;
    assert_problem(&too_big, StatusCode::UNPROCESSABLE_ENTITY, "cpu_cores_out_of_range");
    let bad_email = app
        .post(
            "/v1/users",
            &TestApp::user_token(Uuid::now_v7()),
            json!({"tier": "pro", "email": "nope", "phone": "+4915112345678"}),
        )
        .await;
    assert_problem(&bad_email, StatusCode::UNPROCESSABLE_ENTITY, "invalid_email");
    let empty_batch = app.post("/v1/devices/batch", &token, json!({"operations": []})).await;
    assert_problem(&empty_batch, StatusCode::UNPROCESSABLE_ENTITY, "invalid_batch_size");
}

#[sqlx::test(migrations = false)]
async fn a_body_over_the_limit_is_413_and_not_json_is_415(pool: PgPool) {
    let app = TestApp::spawn_with(pool, |config| config.max_body_bytes = 1024).await;
    let token = app.register(Uuid::now_v7(), "pro").await;
    let huge = app
        .post(
            &format!("/v1/devices/{}/failure", Uuid::now_v7()),
            &token,
            json!({"reason": "x".repeat(4096)}),
        )
        .await;
    assert_problem(&huge, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");
    // Its body was left unread, so the server closes the connection and says so: a keep-alive
    // client must not send its next request on it.
    assert_eq!(huge.headers["connection"], "close");
    // A refused request whose body fits is read whole: the connection stays usable.
    let refused = app
        .client
        .put(app.url("/v1/devices"))
        .bearer_auth(&token)
        .json(&json!({"provider": "aws"}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert!(refused.headers().get("connection").is_none());
    let text = app
        .client
        .post(app.url("/v1/devices"))
        .bearer_auth(&token)
        .header("content-type", "text/plain")
        .body("provider=aws")
        .send()
        .await
        .unwrap();
    assert_problem(
        &TestApp::answer(text).await,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    );
}

#[sqlx::test(migrations = false)]
async fn a_client_over_its_rate_is_429_with_retry_after(pool: PgPool) {
    let app = TestApp::spawn_with(pool, |config| {
        config.rate_per_second = 1;
        config.rate_burst = 2;
    })
    .await;
    let user = Uuid::now_v7();
    let token = TestApp::user_token(user);
    let other = TestApp::user_token(Uuid::now_v7());
    let path = format!("/v1/devices/{}/start", Uuid::now_v7());
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(app.post_empty(&path, &token).await.status);
    }
    assert_eq!(&statuses[..2], [StatusCode::NOT_FOUND, StatusCode::NOT_FOUND]);
    let limited = app.post_empty(&path, &token).await;
    assert_problem(&limited, StatusCode::TOO_MANY_REQUESTS, "rate_limited");
    assert!(limited.headers.get("retry-after").is_some());
    // Limits are per client: another token is unaffected.
    assert_eq!(app.post_empty(&path, &other).await.status, StatusCode::NOT_FOUND);
}
