//! The web console's operations fields (projection versions and dead letters, the log's head
//! and partitions, the rebuilds in progress) over a real PostgreSQL: what an admin reads, and
//! that no other token reads any of it, from the cache or otherwise.

use chrono::{Datelike, Utc};
use http_edge::auth::{Role, scope};
use serde_json::json;
use sqlx::PgPool;

use crate::support::*;

const OPERATIONS: &str = "{
    projectionStatus { name position version deadLetters }
    log { head headRecordedAt partitions { name from to archived estimatedRows totalBytes } }
    replays { projection version state position targetPosition eventsFolded startedAt updatedAt }
}";

/// daily_usage at version 2 with two dead letters and a rebuild of version 3 under way (plus
/// an earlier, finished one that is no longer in progress); the log's head at 42.
async fn operations_data(pool: &PgPool) {
    migrated(pool).await;
    set_checkpoints(pool, 40).await;
    sqlx::query("UPDATE projection_checkpoints SET version = 2 WHERE projection = 'daily_usage'")
        .execute(pool)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO projection_dead_letters (projection, position, event_type, schema_version, error, envelope)
         VALUES ('daily_usage', 7, 'DeviceStopped', 9, 'unknown schema version', '{}'),
                ('daily_usage', 9, 'DeviceStopped', 9, 'unknown schema version', '{}')",
    )
    .execute(pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO projection_rebuilds (projection, version, state, shadow_schema, target_position, position,
                                          events_folded, started_at, updated_at)
         VALUES ('daily_usage', 2, 'live', 'replay_daily_usage_1', 30, 30, 30,
                 '2026-01-01T00:00:00Z', '2026-01-01T00:01:00Z'),
                ('daily_usage', 3, 'building', 'replay_daily_usage_2', 40, 25, 25,
                 '2026-02-01T00:00:00Z', '2026-02-01T00:00:05Z')",
    )
    .execute(pool)
    .await
    .unwrap();
    sqlx::query("UPDATE log_head SET position = 42")
        .execute(pool)
        .await
        .unwrap();
}

#[sqlx::test(migrations = false)]
async fn an_admin_sees_versions_dead_letters_the_log_and_replays(pool: PgPool) {
    operations_data(&pool).await;
    let api = start(&pool, test_config()).await;
    let answer = api.query(&admin(), OPERATIONS, json!({})).await;
    let data = answer.data();

    assert_eq!(
        data["projectionStatus"],
        json!([
            {"name": "daily_usage", "position": "40", "version": 2, "deadLetters": "2"},
            {"name": "fleet", "position": "40", "version": 1, "deadLetters": "0"},
        ])
    );

    assert_eq!(data["log"]["head"], "42");
    let partitions = data["log"]["partitions"].as_array().unwrap();
    let stored = event_log::partitions::list_partitions(&pool).await.unwrap();
    assert_eq!(partitions.len(), stored.len());
    // `cloudphone migrate` provisions the current month and some ahead, all live.
    let today = Utc::now();
    let current = format!("user_events_{:04}_{:02}", today.year(), today.month());
    let this_month = partitions
        .iter()
        .find(|p| p["name"] == current.as_str())
        .unwrap_or_else(|| panic!("no {current} in {partitions:?}"));
    let from = this_month["from"].as_str().unwrap();
    let to = this_month["to"].as_str().unwrap();
    assert!(
        from.starts_with(&format!("{:04}-{:02}-01T00:00:00", today.year(), today.month())),
        "{from}"
    );
    assert!(
        from < today.to_rfc3339().as_str() && today.to_rfc3339().as_str() < to,
        "{from} {to}"
    );
    assert_eq!(this_month["archived"], false);
    assert!(this_month["totalBytes"].as_str().unwrap().parse::<i64>().unwrap() > 0);
    // Each partition ends where the next begins: no gap, no overlap.
    for pair in partitions.windows(2) {
        assert_eq!(pair[0]["to"], pair[1]["from"], "{pair:?}");
    }

    // Only the rebuild in progress, with its progress.
    assert_eq!(
        data["replays"],
        json!([{
            "projection": "daily_usage", "version": 3, "state": "BUILDING", "position": "25",
            "targetPosition": "40", "eventsFolded": "25",
            "startedAt": "2026-02-01T00:00:00+00:00", "updatedAt": "2026-02-01T00:00:05+00:00",
        }])
    );
}

#[sqlx::test(migrations = false)]
async fn only_an_admin_token_reads_the_operations_fields(pool: PgPool) {
    operations_data(&pool).await;
    let api = start(&pool, test_config()).await;
    let reporting = test_support::tokens::signed(SECRET, "bi", Role::Service, &[scope::DASHBOARDS_READ]);
    let user = token(A, Role::User);

    // The admin asks first: whatever it was told is never served to anyone else.
    let _ = api.query(&admin(), OPERATIONS, json!({})).await.data();
    let answer = api.query(&admin(), OPERATIONS, json!({})).await;
    assert_ne!(
        answer.cache.as_deref(),
        Some("hit"),
        "operations answers are never cached"
    );

    for caller in [&reporting, &user] {
        for field in [
            "{ log { head } }",
            "{ replays { version } }",
            "{ projectionStatus { version } }",
            "{ projectionStatus { deadLetters } }",
            OPERATIONS,
        ] {
            let answer = api.query(caller, field, json!({})).await;
            assert!(answer.status.is_success(), "{answer:?}");
            assert_eq!(answer.error_code(), "FORBIDDEN", "{field}: {answer:?}");
            // The error nulls the field's nearest nullable parent: no value of it is answered.
            let data = answer.body["data"].to_string();
            for name in ["version", "deadLetters", "head", "partitions", "replays"] {
                assert!(!data.contains(name), "{field}: {answer:?}");
            }
        }
        // What every reader may see still answers.
        let answer = api
            .query(caller, "{ projectionStatus { name position } }", json!({}))
            .await;
        assert_eq!(answer.data()["projectionStatus"].as_array().unwrap().len(), 2);
    }
}

#[sqlx::test(migrations = false)]
async fn no_rebuild_in_progress_is_an_empty_list(pool: PgPool) {
    migrated(&pool).await;
    set_checkpoints(&pool, 0).await;
    let api = start(&pool, test_config()).await;
    let answer = api
        .query(&admin(), "{ replays { projection } log { head } }", json!({}))
        .await;
    assert_eq!(answer.data(), &json!({"replays": [], "log": {"head": "0"}}));
}

const DEAD_LETTERS: &str = "query($filter: DeadLettersFilter, $first: Int, $after: String) {
    deadLetters(filter: $filter, first: $first, after: $after) {
        totalCount
        pageInfo { hasNextPage hasPreviousPage endCursor }
        nodes { projection position eventType schemaVersion error state attempts resolvedBy resolutionNote }
    }
}";

#[sqlx::test(migrations = false)]
async fn an_admin_lists_dead_letters_page_by_page_and_no_other_token_does(pool: PgPool) {
    operations_data(&pool).await;
    sqlx::query(
        "INSERT INTO projection_dead_letters (projection, position, event_type, schema_version, error, envelope,
                                              state, resolved_at, resolved_by, resolution_note)
         VALUES ('fleet', 8, 'DeviceStarted', 1, 'bad payload', '{}', 'skipped', now(), 'ops', 'duplicate of 7')",
    )
    .execute(&pool)
    .await
    .unwrap();
    let api = start(&pool, test_config()).await;

    let first = api
        .query(
            &admin(),
            DEAD_LETTERS,
            json!({"filter": {"projection": "daily_usage"}, "first": 1}),
        )
        .await;
    let page = &first.data()["deadLetters"];
    assert_eq!(page["totalCount"], "2");
    assert_eq!(
        page["nodes"],
        json!([{
            "projection": "daily_usage", "position": "7", "eventType": "DeviceStopped", "schemaVersion": 9,
            "error": "unknown schema version", "state": "PENDING", "attempts": 1, "resolvedBy": null,
            "resolutionNote": null,
        }])
    );
    assert_eq!(page["pageInfo"]["hasNextPage"], true);
    assert_eq!(page["pageInfo"]["hasPreviousPage"], false);
    let cursor = page["pageInfo"]["endCursor"].as_str().unwrap().to_owned();
    let second = api
        .query(
            &admin(),
            DEAD_LETTERS,
            json!({"filter": {"projection": "daily_usage"}, "first": 1, "after": cursor}),
        )
        .await;
    let page = &second.data()["deadLetters"];
    assert_eq!(page["nodes"][0]["position"], "9");
    assert_eq!(page["pageInfo"]["hasNextPage"], false);
    assert_eq!(page["pageInfo"]["hasPreviousPage"], true);

    let skipped = api
        .query(&admin(), DEAD_LETTERS, json!({"filter": {"state": "SKIPPED"}}))
        .await;
    let page = &skipped.data()["deadLetters"];
    assert_eq!(page["totalCount"], "1");
    assert_eq!(page["nodes"][0]["projection"], "fleet");
    assert_eq!(page["nodes"][0]["resolvedBy"], "ops");
    assert_eq!(page["nodes"][0]["resolutionNote"], "duplicate of 7");
    let all = api.query(&admin(), DEAD_LETTERS, json!({})).await;
    assert_eq!(all.data()["deadLetters"]["totalCount"], "3");
    // The same counts the operations view shows: pending letters only.
    let status = api
        .query(&admin(), "{ projectionStatus { name deadLetters } }", json!({}))
        .await;
    assert_eq!(
        status.data()["projectionStatus"],
        json!([{"name": "daily_usage", "deadLetters": "2"}, {"name": "fleet", "deadLetters": "0"}])
    );

    // Hostile arguments: refused, not clamped silently or passed to SQL.
    for variables in [
        json!({"first": 1_000_000}),
        json!({"first": -1}),
        json!({"filter": {"projection": "fleet'; DROP TABLE devices; --"}}),
        json!({"after": "not a cursor"}),
        json!({"after": "dTE6MDE5M2Y1ZjAtMDAwMC03MDAwLTgwMDAtMDAwMDAwMDAwMDAw"}),
    ] {
        let answer = api.query(&admin(), DEAD_LETTERS, variables.clone()).await;
        assert_eq!(answer.error_code(), "BAD_USER_INPUT", "{variables}: {answer:?}");
    }

    let reporting = test_support::tokens::signed(SECRET, "bi", Role::Service, &[scope::DASHBOARDS_READ]);
    for caller in [&reporting, &token(A, Role::User)] {
        let answer = api.query(caller, DEAD_LETTERS, json!({})).await;
        assert!(answer.status.is_success(), "{answer:?}");
        assert_eq!(answer.error_code(), "FORBIDDEN", "{answer:?}");
        let data = answer.body["data"].to_string();
        for leaked in [
            "DeviceStopped",
            "unknown schema version",
            "duplicate of 7",
            "totalCount",
        ] {
            assert!(!data.contains(leaked), "{answer:?}");
        }
    }
}
