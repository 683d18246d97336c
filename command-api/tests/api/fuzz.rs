//! Random and malformed requests never produce a 5xx or a partial write.

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;
use reqwest::Method;
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

use crate::support::*;

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        prop_oneof![
            Just("aws".to_owned()),
            Just("running".to_owned()),
            Just("\u{0}".to_owned()),
            "\\PC{0,12}",
        ]
        .prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    Just("provider".to_owned()),
                    Just("cpu_cores".to_owned()),
                    Just("memory_mb".to_owned()),
                    Just("android_version".to_owned()),
                    Just("tier".to_owned()),
                    Just("reason".to_owned()),
                    Just("operations".to_owned()),
                    "[a-z_]{1,8}",
                ],
                inner,
                0..6
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A valid body for the route with one field replaced by something random.
fn mutated(valid: Value, field: &str, value: Value) -> Value {
    let mut body = valid;
    if let Some(object) = body.as_object_mut() {
        object.insert(field.to_owned(), value);
    }
    body
}

#[sqlx::test(migrations = false)]
async fn random_and_malformed_bodies_never_cause_a_5xx_or_a_partial_write(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let user = Uuid::now_v7();
    let token = app.register(user, "enterprise").await;
    let admin = TestApp::admin_token();
    let device = app.create_device(&token).await;

    let routes: Vec<(Method, String, Value)> = vec![
        (
            Method::POST,
            "/v1/users".into(),
            json!({"tier": "pro", "email": "a@b.co", "phone": "+4915112345678"}),
        ),
        (
            Method::POST,
            "/v1/devices".into(),
            json!({"provider": "aws", "cpu_cores": 2, "memory_mb": 2048, "android_version": 14}),
        ),
        (Method::POST, format!("/v1/devices/{device}/start"), json!({})),
        (
            Method::POST,
            format!("/v1/devices/{device}/stop"),
            json!({"reason": "idle"}),
        ),
        (
            Method::POST,
            format!("/v1/devices/{device}/resize"),
            json!({"cpu_cores": 4, "memory_mb": 4096}),
        ),
        (
            Method::POST,
            format!("/v1/devices/{device}/failure"),
            json!({"reason": "x"}),
        ),
        (
            Method::PUT,
            format!("/v1/users/{user}/quota"),
            json!({"max_devices": 5, "max_cpu_cores": 50, "max_memory_mb": 100000}),
        ),
        (Method::PUT, format!("/v1/users/{user}/tier"), json!({"tier": "pro"})),
        (
            Method::POST,
            "/v1/devices/batch".into(),
            json!({"operations": [{"op": "start", "device_id": device}]}),
        ),
        (Method::DELETE, format!("/v1/devices/{}", Uuid::now_v7()), Value::Null),
    ];
    let strategy = (
        0..routes.len(),
        0..4u8,
        arb_json(),
        prop::collection::vec(any::<u8>(), 0..64),
        any::<bool>(),
    );
    let mut runner = TestRunner::deterministic();
    let mut statuses = std::collections::BTreeMap::new();
    for _ in 0..600 {
        let (route, shape, random, bytes, as_admin) = strategy.new_tree(&mut runner).unwrap().current();
        let (method, path, valid) = &routes[route];
        let token = if as_admin { &admin } else { &token };
        let mut request = app.client.request(method.clone(), app.url(path)).bearer_auth(token);
        request = match shape {
            0 => request.json(&random),
            1 => {
                let field = valid
                    .as_object()
                    .and_then(|o| o.keys().next().cloned())
                    .unwrap_or_else(|| "x".into());
                request.json(&mutated(valid.clone(), &field, random))
            }
            2 => request.header("content-type", "application/json").body(bytes),
            _ => request.header("content-type", "text/plain").body(bytes),
        };
        let answer = TestApp::answer(request.send().await.unwrap()).await;
        assert!(answer.status.as_u16() < 500, "{method} {path}: {answer:?}");
        assert!(
            answer.status.is_success() || answer.content_type == "application/problem+json",
            "{answer:?}"
        );
        *statuses.entry(answer.status.as_u16()).or_insert(0) += 1;
    }
    // The fuzzing reached both refusals and real writes.
    assert!(
        statuses.keys().any(|s| *s == 400) && statuses.keys().any(|s| *s < 300),
        "{statuses:?}"
    );

    // No partial write: every device created has its reservation, versions are dense, the
    // chain verifies.
    let orphans: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM user_events_all d WHERE d.event_type = 'DeviceCreated' AND NOT EXISTS (
             SELECT 1 FROM user_events_all r WHERE r.event_type = 'QuotaReserved'
             AND r.payload->>'device_id' = d.stream_id::text)",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(orphans, 0);
    let gaps: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT stream_id, max(stream_version) AS v, count(*) AS n FROM user_events_all GROUP BY stream_id) s WHERE v <> n",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(gaps, 0);
    let report = event_log::LogReader::new(app.pool.clone())
        .verify_chain(1, None, 1000, |_| {})
        .await
        .unwrap();
    assert_eq!(report.broken, None);
}
