//! Every aggregate kind has its own id space, and no client's id is an oracle or a 500.
//!
//! Device ids are the server's: a client names a device with a `reference` of its own, from
//! which the id is derived per owner. A user can therefore not create a device whose id is
//! another person's (future) user id, nor one whose id is its own user id; another tenant's
//! device is answered as a missing one; and whatever ids a client sends, in the path or the
//! body, the answer is a 4xx, never a 500.

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;
use reqwest::{Method, StatusCode};
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

use crate::support::*;

fn device_body(extra: serde_json::Value) -> serde_json::Value {
    let mut body = json!({"provider": "aws", "cpu_cores": 2, "memory_mb": 2048, "android_version": 14});
    if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
        body.extend(extra.clone());
    }
    body
}

#[sqlx::test(migrations = false)]
async fn nobody_can_take_a_future_user_id_with_a_device(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let squatter = app.register(Uuid::now_v7(), "enterprise").await;
    let victim = Uuid::now_v7();
    // The old way, choosing the id, is refused with a clear error.
    let chosen = app
        .post("/v1/devices", &squatter, device_body(json!({"device_id": victim})))
        .await;
    assert_eq!(
        (chosen.status, chosen.code()),
        (StatusCode::BAD_REQUEST, "invalid_body"),
        "{chosen:?}"
    );
    assert!(
        chosen.body["detail"].as_str().unwrap().contains("device_id"),
        "{chosen:?}"
    );
    // A reference that spells the victim's id names a device of the squatter's, not the id.
    let referenced = app
        .post(
            "/v1/devices",
            &squatter,
            device_body(json!({"reference": victim.to_string()})),
        )
        .await;
    assert_eq!(referenced.status, StatusCode::CREATED, "{referenced:?}");
    assert_ne!(referenced.body["id"], json!(victim));
    // The victim registers as ever.
    app.register(victim, "pro").await;
}

#[sqlx::test(migrations = false)]
async fn a_reference_names_one_device_of_its_owner(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let (ada, bob) = (Uuid::now_v7(), Uuid::now_v7());
    let (ada_token, bob_token) = (app.register(ada, "pro").await, app.register(bob, "pro").await);
    let first = app
        .post("/v1/devices", &ada_token, device_body(json!({"reference": "phone-1"})))
        .await;
    assert_eq!(first.status, StatusCode::CREATED, "{first:?}");
    let id = first.body["id"].as_str().unwrap().to_owned();
    assert_ne!(id, ada.to_string(), "a device never takes its owner's id");
    // A retry without an Idempotency-Key makes no second device.
    let events = app.event_count().await;
    let again = app
        .post("/v1/devices", &ada_token, device_body(json!({"reference": "phone-1"})))
        .await;
    assert_eq!(
        (again.status, again.code()),
        (StatusCode::CONFLICT, "device_already_exists")
    );
    assert_eq!(app.event_count().await, events);
    // The same reference is another device for another owner, and an admin creating it for
    // Ada names Ada's.
    let bobs = app
        .post("/v1/devices", &bob_token, device_body(json!({"reference": "phone-1"})))
        .await;
    assert_eq!(bobs.status, StatusCode::CREATED, "{bobs:?}");
    assert_ne!(bobs.body["id"], first.body["id"]);
    let admin = app
        .post(
            "/v1/devices",
            &TestApp::admin_token(),
            device_body(json!({"reference": "phone-1", "owner_id": ada})),
        )
        .await;
    assert_eq!(admin.code(), "device_already_exists", "{admin:?}");
    // The device answers to its id.
    let started = app.post_empty(&format!("/v1/devices/{id}/start"), &ada_token).await;
    assert_eq!(started.status, StatusCode::OK, "{started:?}");
    for bad in ["", "with space", &"x".repeat(129), "ünïcode"] {
        let refused = app
            .post("/v1/devices", &ada_token, device_body(json!({"reference": bad})))
            .await;
        assert_eq!(
            (refused.status, refused.code()),
            (StatusCode::UNPROCESSABLE_ENTITY, "invalid_device_reference"),
            "{bad:?}: {refused:?}"
        );
    }
}

/// Ids of the wrong kind, of nobody, or of someone else, in the path and in the body, from
/// users, admins and services: always a 4xx, and the log is written only by commands that
/// succeeded.
#[sqlx::test(migrations = false)]
async fn no_id_a_client_sends_gets_a_5xx(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let (ada, bob) = (Uuid::now_v7(), Uuid::now_v7());
    let (ada_token, bob_token) = (app.register(ada, "enterprise").await, app.register(bob, "pro").await);
    let ada_device = app.create_device(&ada_token).await;
    let bob_device = app.create_device(&bob_token).await;
    let admin = TestApp::admin_token();
    let service = TestApp::token(
        http_edge::auth::Role::Service,
        "signup",
        &["users:write", "devices:write"],
    );
    let ids = [
        ada,
        bob,
        ada_device,
        bob_device,
        Uuid::nil(),
        Uuid::max(),
        Uuid::now_v7(),
    ];
    let tokens = [ada_token.clone(), bob_token.clone(), admin, service];
    let cases = (0..tokens.len(), 0..ids.len(), 0..ids.len(), 0..9usize);
    let mut runner = TestRunner::deterministic();
    for _ in 0..250 {
        let (who, a, b, command) = cases.new_tree(&mut runner).unwrap().current();
        let (token, id, other) = (&tokens[who], ids[a], ids[b]);
        let answer = match command {
            0 => app.post_empty(&format!("/v1/devices/{id}/start"), token).await,
            1 => app.post_empty(&format!("/v1/devices/{id}/stop"), token).await,
            2 => {
                app.send(Method::DELETE, &format!("/v1/devices/{id}"), Some(token), None, &[])
                    .await
            }
            3 => {
                app.post("/v1/devices", token, device_body(json!({"owner_id": id})))
                    .await
            }
            4 => {
                app.post(
                    "/v1/devices",
                    token,
                    device_body(json!({"owner_id": id, "reference": other.to_string()})),
                )
                .await
            }
            5 => {
                app.post(
                    "/v1/users",
                    token,
                    json!({"user_id": id, "tier": "pro", "email": "x@example.com", "phone": "+4915112345678"}),
                )
                .await
            }
            6 => {
                app.send(
                    Method::PUT,
                    &format!("/v1/users/{id}/tier"),
                    Some(token),
                    Some(json!({"tier": "basic"})),
                    &[],
                )
                .await
            }
            7 => {
                app.send(Method::DELETE, &format!("/v1/users/{id}"), Some(token), None, &[])
                    .await
            }
            _ => {
                app.post(
                    "/v1/devices/batch",
                    token,
                    json!({"operations": [{"op": "start", "device_id": id}, {"op": "delete", "device_id": other}]}),
                )
                .await
            }
        };
        assert!(
            answer.status.is_success() || answer.status.is_client_error(),
            "command {command} by token {who} on {id} / {other}: {answer:?}"
        );
        if let Some(results) = answer.body["results"].as_array() {
            for result in results {
                let status = result["status"].as_u64().unwrap();
                assert!(status < 500, "batch item: {result}");
            }
        }
    }
    // A device id registered as a user (by a trusted signup service): the id is another
    // kind's, so it is 409 `id_in_use`, never a 500, and the device is untouched.
    let carol = app.register(Uuid::now_v7(), "pro").await;
    let fresh_device = app.create_device(&carol).await;
    let registered = app
        .post(
            "/v1/users",
            &tokens[3],
            json!({"user_id": fresh_device, "tier": "pro", "email": "x@example.com", "phone": "+4915112345678"}),
        )
        .await;
    assert_eq!(
        (registered.status, registered.code()),
        (StatusCode::CONFLICT, "id_in_use"),
        "{registered:?}"
    );
}
