//! Read-your-writes across roles, against a real streaming replica (ops/dev/replica.sh): a
//! device created through the command API, applied by the projectors, is seen by the next
//! query to the query API reading from the replica, every time. In the `replica` test group
//! with the query API's replica tests (one at a time: one of them stops the replica).

use projections::runner::{ProjectorConfig, spawn_log_projectors};
use sqlx::PgPool;
use test_support::query;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

#[sqlx::test(migrations = false)]
async fn a_device_created_through_the_command_api_is_seen_by_the_next_query_1000_times_out_of_1000(pool: PgPool) {
    use http_edge::auth::{KeySource, Role};
    let _ = query::replica_sources(&pool).await;
    let stop = CancellationToken::new();
    let projectors = spawn_log_projectors(&pool, ProjectorConfig::default(), &stop);
    let commands = command_api::Application::build(
        command_api::ApiConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            keys: KeySource::Secret(query::SECRET.into()),
            ..command_api::ApiConfig::default()
        },
        pool.clone(),
        http_edge::telemetry::prometheus(),
    )
    .await
    .unwrap();
    let command_url = format!("http://{}", commands.local_addr());
    let stop_commands = CancellationToken::new();
    let command_server = tokio::spawn(commands.run_until_stopped(stop_commands.clone().cancelled_owned()));
    let api = query::on_replica(&pool).await;
    let client = reqwest::Client::new();

    let users: Vec<(Uuid, String)> = (0..10)
        .map(|_| {
            let user = Uuid::now_v7();
            (user, query::token(user, Role::User))
        })
        .collect();
    for (_, token) in &users {
        let registered = client
            .post(format!("{command_url}/v1/users"))
            .bearer_auth(token)
            .json(&serde_json::json!({"tier": "enterprise", "email": "ryw@example.com", "phone": "+4915112345678"}))
            .send()
            .await
            .unwrap();
        assert_eq!(registered.status(), 201);
    }
    let mut from_replica = 0;
    for i in 0..1000 {
        let (user, token) = &users[i % users.len()];
        let created: serde_json::Value = client
            .post(format!("{command_url}/v1/devices"))
            .bearer_auth(token)
            .json(&serde_json::json!({"provider": "gcp", "cpu_cores": 2, "memory_mb": 2048, "android_version": 14}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let (id, position) = (
            created["id"].as_str().unwrap().to_owned(),
            created["position"].as_i64().unwrap(),
        );
        // Half carry the position as an argument, half as the header.
        let answer = if i % 2 == 0 {
            api.query(
                token,
                "query($id: UUID!, $p: BigInt) { device(id: $id, minPosition: $p) { id ownerId status } }",
                serde_json::json!({"id": id, "p": position.to_string()}),
            )
            .await
        } else {
            api.post_json(
                Some(token),
                &serde_json::json!({"query": "query($id: UUID!) { device(id: $id) { id ownerId status } }", "variables": {"id": id}}),
                &[("x-min-position", &position.to_string())],
            )
            .await
        };
        let device = &answer.data()["device"];
        assert_eq!(
            device["id"],
            id.as_str(),
            "iteration {i}: the device is not visible at position {position}"
        );
        assert_eq!(device["ownerId"], user.to_string());
        assert!(answer.position.unwrap() >= position);
        from_replica += usize::from(answer.source.as_deref() == Some("replica"));
    }
    assert!(
        from_replica > 500,
        "only {from_replica} of 1000 read-your-writes answers came from the replica"
    );

    stop_commands.cancel();
    command_server.await.unwrap().unwrap();
    stop.cancel();
    for task in projectors {
        task.await.unwrap();
    }
}
