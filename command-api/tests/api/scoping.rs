//! A user token can never touch another user's device or user record.

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;
use reqwest::{Method, StatusCode};
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

use crate::support::*;

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
    let before = app.event_count().await;

    // Random attacker, victim, device and command.
    let cases = (0..4usize, 0..4usize, 0..2usize, 0..7usize).prop_filter("someone else", |(a, v, _, _)| a != v);
    let mut runner = TestRunner::deterministic();
    for _ in 0..120 {
        let (attacker, victim, device, command) = cases.new_tree(&mut runner).unwrap().current();
        let token = &users[attacker].1;
        let (victim_id, device_id) = (users[victim].0, users[victim].2[device]);
        let answer = match command {
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
            4 => {
                app.post(
                    &format!("/v1/devices/{device_id}/failure"),
                    token,
                    json!({"reason": "sabotage"}),
                )
                .await
            }
            5 => {
                app.send(
                    Method::DELETE,
                    &format!("/v1/users/{victim_id}"),
                    Some(token),
                    None,
                    &[],
                )
                .await
            }
            _ => {
                let operations = json!({"operations": [{"op": "delete", "device_id": device_id}]});
                let answer = app.post("/v1/devices/batch", token, operations).await;
                assert_eq!(answer.body["results"][0]["status"], 403, "{answer:?}");
                continue;
            }
        };
        assert_eq!(
            answer.status,
            StatusCode::FORBIDDEN,
            "command {command} by {attacker} on {victim}: {answer:?}"
        );
    }
    assert_eq!(app.event_count().await, before, "no attempt wrote anything");
}
