//! A user token can never touch another user's device or user record.

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;
use reqwest::{Method, StatusCode};
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

use crate::support::*;

/// One device command sent by `token` on `device_id`.
async fn device_command(app: &TestApp, token: &str, device_id: Uuid, command: usize) -> Answer {
    match command {
        0 => app.post_empty(&format!("/v1/devices/{device_id}/start"), token).await,
        1 => app.post_empty(&format!("/v1/devices/{device_id}/stop"), token).await,
        2 => {
            app.post(
                &format!("/v1/devices/{device_id}/resize"),
                token,
                json!({"cpu_cores": 1, "memory_mb": 1024}),
            )
            .await
        }
        3 => {
            app.send(
                Method::DELETE,
                &format!("/v1/devices/{device_id}"),
                Some(token),
                None,
                &[],
            )
            .await
        }
        _ => {
            app.post(
                &format!("/v1/devices/{device_id}/failure"),
                token,
                json!({"reason": "sabotage"}),
            )
            .await
        }
    }
}

/// Another tenant's device is answered exactly as a device that does not exist (status,
/// code and document), so a user learns nothing about ids they do not own; another user's
/// account is refused whether it exists or not.
#[sqlx::test(migrations = false)]
async fn a_user_token_cannot_touch_another_users_devices_or_account(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let mut users = Vec::new();
    for _ in 0..4 {
        let user = Uuid::now_v7();
        let token = app.register(user, "pro").await;
        let devices = vec![app.create_device(&token).await, app.create_device(&token).await];
        users.push((user, token, devices));
    }
    // A deleted device of the victim's, too: "deleted" would tell it existed.
    let deleted = app.create_device(&users[0].1).await;
    let gone = app
        .send(
            Method::DELETE,
            &format!("/v1/devices/{deleted}"),
            Some(&users[0].1),
            None,
            &[],
        )
        .await;
    assert_eq!(gone.status, StatusCode::OK, "{gone:?}");
    users[0].2.push(deleted);
    let before = app.event_count().await;

    // Random attacker, victim, device and command.
    let cases = (0..4usize, 0..4usize, 0..3usize, 0..7usize).prop_filter("someone else", |(a, v, _, _)| a != v);
    let mut runner = TestRunner::deterministic();
    for _ in 0..120 {
        let (attacker, victim, device, command) = cases.new_tree(&mut runner).unwrap().current();
        let token = &users[attacker].1;
        let victim_id = users[victim].0;
        let Some(&device_id) = users[victim].2.get(device) else {
            continue;
        };
        let missing = Uuid::now_v7();
        match command {
            0..=4 => {
                let theirs = device_command(&app, token, device_id, command).await;
                let nobodys = device_command(&app, token, missing, command).await;
                assert_eq!(theirs.status, StatusCode::NOT_FOUND, "command {command}: {theirs:?}");
                assert_eq!(
                    (theirs.status, &theirs.body),
                    (nobodys.status, &nobodys.body),
                    "command {command} by {attacker} on {victim}'s device tells it apart from a missing one"
                );
            }
            5 => {
                let answer = app
                    .send(
                        Method::DELETE,
                        &format!("/v1/users/{victim_id}"),
                        Some(token),
                        None,
                        &[],
                    )
                    .await;
                assert_eq!(answer.status, StatusCode::FORBIDDEN, "{answer:?}");
                let nobody = app
                    .send(Method::DELETE, &format!("/v1/users/{missing}"), Some(token), None, &[])
                    .await;
                assert_eq!((answer.status, &answer.body), (nobody.status, &nobody.body));
            }
            _ => {
                let batch = |device: Uuid| json!({"operations": [{"op": "delete", "device_id": device}]});
                let theirs = app.post("/v1/devices/batch", token, batch(device_id)).await;
                let nobodys = app.post("/v1/devices/batch", token, batch(missing)).await;
                assert_eq!(theirs.body["results"][0]["status"], 404, "{theirs:?}");
                assert_eq!(theirs.body["results"][0]["error"], nobodys.body["results"][0]["error"]);
            }
        }
    }
    assert_eq!(app.event_count().await, before, "no attempt wrote anything");
}
