//! Every endpoint, driven the way a portal drives it.

use http_edge::auth::{Role, scope};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

use crate::support::*;

#[sqlx::test(migrations = false)]
async fn a_device_lives_its_whole_life_through_the_api(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let user = Uuid::now_v7();
    let token = app.register(user, "pro").await;

    let created = app
        .send(
            Method::POST,
            "/v1/devices",
            Some(&token),
            Some(json!({"provider": "gcp", "cpu_cores": 4, "memory_mb": 8192, "android_version": 14})),
            &[("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")],
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{created:?}");
    let device: Uuid = created.body["id"].as_str().unwrap().parse().unwrap();
    assert_eq!(created.headers["location"], format!("/v1/devices/{device}").as_str());
    assert_eq!(created.body["stream_version"], 1);
    assert_eq!(
        created.body["position"],
        app.head().await,
        "the answer carries the position of the last write"
    );

    let started = app.post_empty(&format!("/v1/devices/{device}/start"), &token).await;
    assert_eq!(
        (started.status, &started.body["stream_version"]),
        (StatusCode::OK, &json!(2))
    );
    let stopped = app
        .post(&format!("/v1/devices/{device}/stop"), &token, json!({"reason": "idle"}))
        .await;
    assert_eq!(
        (stopped.status, &stopped.body["stream_version"]),
        (StatusCode::OK, &json!(4))
    );
    let resized = app
        .post(
            &format!("/v1/devices/{device}/resize"),
            &token,
            json!({"cpu_cores": 8, "memory_mb": 16384}),
        )
        .await;
    assert_eq!(resized.status, StatusCode::OK, "{resized:?}");
    app.post_empty(&format!("/v1/devices/{device}/start"), &token).await;
    let deleted = app
        .send(
            Method::DELETE,
            &format!("/v1/devices/{device}"),
            Some(&token),
            None,
            &[],
        )
        .await;
    assert_eq!(deleted.status, StatusCode::OK, "{deleted:?}");
    assert_eq!(deleted.body["position"], app.head().await);

    assert_eq!(
        app.stream_types(device).await,
        [
            "DeviceCreated",
            "DeviceStarted",
            "DeviceStopped",
            "UsageRecorded",
            "DeviceResized",
            "DeviceStarted",
            "DeviceStopped",
            "UsageRecorded",
            "DeviceDeleted"
        ]
    );
    assert_eq!(
        app.stream_types(user).await,
        [
            "UserRegistered",
            "QuotaChanged",
            "QuotaReserved",
            "QuotaReleased",
            "QuotaReserved",
            "QuotaReleased"
        ]
    );
    // Metadata: the actor, the caller's trace id, a correlation id per request.
    let metadata: Value =
        sqlx::query_scalar("SELECT metadata FROM user_events_all WHERE stream_id = $1 AND stream_version = 1")
            .bind(device)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(metadata["actor"], json!({"role": "user", "subject": user.to_string()}));
    assert_eq!(metadata["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert!(
        metadata["correlation_id"]
            .as_str()
            .is_some_and(|id| Uuid::parse_str(id).is_ok())
    );
}

#[sqlx::test(migrations = false)]
async fn admins_and_scoped_services_manage_users(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let admin = TestApp::admin_token();
    let user = Uuid::now_v7();
    let registered = app
        .post(
            "/v1/users",
            &admin,
            json!({"user_id": user, "tier": "free", "email": "x@example.com", "phone": "+12025550123"}),
        )
        .await;
    assert_eq!(registered.status, StatusCode::CREATED, "{registered:?}");
    assert_eq!(registered.headers["location"], format!("/v1/users/{user}").as_str());

    let quota = app
        .send(
            Method::PUT,
            &format!("/v1/users/{user}/quota"),
            Some(&admin),
            Some(json!({"max_devices": 7, "max_cpu_cores": 20, "max_memory_mb": 65536})),
            &[],
        )
        .await;
    assert_eq!(
        (quota.status, &quota.body["stream_version"]),
        (StatusCode::OK, &json!(3))
    );
    // The same quota again changes nothing and says where the stream stands.
    let again = app
        .send(
            Method::PUT,
            &format!("/v1/users/{user}/quota"),
            Some(&admin),
            Some(json!({"max_devices": 7, "max_cpu_cores": 20, "max_memory_mb": 65536})),
            &[],
        )
        .await;
    assert_eq!(
        (again.status, &again.body["stream_version"], &again.body["position"]),
        (StatusCode::OK, &json!(3), &quota.body["position"])
    );

    let billing = TestApp::token(Role::Service, "billing", &[scope::USERS_WRITE]);
    let tier = app
        .send(
            Method::PUT,
            &format!("/v1/users/{user}/tier"),
            Some(&billing),
            Some(json!({"tier": "enterprise"})),
            &[],
        )
        .await;
    assert_eq!(tier.status, StatusCode::OK, "{tier:?}");

    let own = TestApp::user_token(user);
    let erased = app
        .send(Method::DELETE, &format!("/v1/users/{user}"), Some(&own), None, &[])
        .await;
    assert_eq!(erased.status, StatusCode::OK, "{erased:?}");
    assert_eq!(
        app.stream_types(user).await,
        [
            "UserRegistered",
            "QuotaChanged",
            "QuotaChanged",
            "TierChanged",
            "UserErased"
        ]
    );
    let after = app
        .send(
            Method::PUT,
            &format!("/v1/users/{user}/tier"),
            Some(&billing),
            Some(json!({"tier": "pro"})),
            &[],
        )
        .await;
    assert_eq!((after.status, after.code()), (StatusCode::CONFLICT, "user_erased"));
}

#[sqlx::test(migrations = false)]
async fn a_provider_service_reports_failures_but_cannot_start_devices(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let token = app.register(Uuid::now_v7(), "pro").await;
    let device = app.create_device(&token).await;
    let webhook = TestApp::token(Role::Service, "provider-webhook", &[scope::DEVICES_REPORT]);
    let failed = app
        .post(
            &format!("/v1/devices/{device}/failure"),
            &webhook,
            json!({"reason": "host lost"}),
        )
        .await;
    assert_eq!(failed.status, StatusCode::OK, "{failed:?}");
    let start = app.post_empty(&format!("/v1/devices/{device}/start"), &webhook).await;
    assert_eq!(start.status, StatusCode::FORBIDDEN);
    assert_eq!(app.stream_types(device).await, ["DeviceCreated", "DeviceFailed"]);
}

#[sqlx::test(migrations = false)]
async fn a_batch_answers_each_operation_on_its_own(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let token = app.register(Uuid::now_v7(), "enterprise").await;
    let mut devices = Vec::new();
    for _ in 0..20 {
        devices.push(app.create_device(&token).await);
    }
    app.post_empty(&format!("/v1/devices/{}/start", devices[0]), &token)
        .await;
    let before = app.event_count().await;

    let mut operations: Vec<Value> = devices.iter().map(|d| json!({"op": "start", "device_id": d})).collect();
    operations.push(json!({"op": "delete", "device_id": devices[1]}));
    operations.push(json!({"op": "stop", "device_id": Uuid::now_v7()}));
    let answer = app
        .post("/v1/devices/batch", &token, json!({"operations": operations}))
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
    let results = answer.body["results"].as_array().unwrap();
    assert_eq!(results.len(), 22);
    assert_eq!(results[0]["status"], 409, "device 0 was already running");
    assert_eq!(results[0]["error"]["code"], "device_already_running");
    assert!(results[1..20].iter().all(|r| r["status"] == 200), "{results:?}");
    assert_eq!(results[21]["status"], 404);
    assert_eq!(answer.body["succeeded"], 20);
    assert_eq!(answer.body["failed"], 2);
    assert!(results.iter().enumerate().all(|(i, r)| r["index"] == i));
    // Device 1: started, then deleted (stopped and billed first), in whichever order the
    // operations ran; 19 starts + delete's 4 events (stop, usage, deleted, released).
    assert_eq!(app.event_count().await - before, 19 + 4);
}

#[sqlx::test(migrations = false)]
async fn health_readiness_metrics_and_openapi_answer(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let token = app.register(Uuid::now_v7(), "pro").await;
    app.create_device(&token).await;
    for path in ["/healthz", "/readyz"] {
        let answer = app.send(Method::GET, path, None, None, &[]).await;
        assert_eq!(answer.status, StatusCode::OK, "{path}");
    }
    let metrics = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "cloudphone_http_requests_total{route=\"/v1/devices\",method=\"POST\",status=\"201\"} 1",
        "cloudphone_http_request_duration_seconds_bucket",
        "cloudphone_append_events_total",
        "cloudphone_append_group_batches_bucket",
    ] {
        assert!(metrics.contains(name), "{name} missing from /metrics:\n{metrics}");
    }
    let doc = app.send(Method::GET, "/openapi.json", None, None, &[]).await;
    assert_eq!(doc.body["openapi"], "3.1.0");
    // What is served is the contract clients generate code from (the lib test keeps the
    // file equal to the generated document; this keeps the route serving that document).
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.json");
    let checked_in: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert!(
        doc.body == checked_in,
        "GET /openapi.json differs from {path}; if the change is meant, run \
         CLOUDPHONE_BLESS_CONTRACTS=1 cargo test -p command-api --lib and review the diff"
    );
    for path in [
        "/v1/users",
        "/v1/devices",
        "/v1/devices/{id}/start",
        "/v1/devices/batch",
        "/v1/users/{id}/quota",
    ] {
        assert!(doc.body["paths"][path].is_object(), "{path} not documented");
    }
}
