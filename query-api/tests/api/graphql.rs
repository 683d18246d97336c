//! The GraphQL API over known read-model rows in a real PostgreSQL: every query and filter,
//! keyset pagination under concurrent creation, batched nested loads (statements counted),
//! scoping of user tokens (randomized), limits, persisted queries and the cache.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use chrono::Utc;
use http_edge::auth::{Role, scope};
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use uuid::Uuid;

use crate::support::*;

/// A: a1 aws running, a2 gcp stopped, a3 aws deleted, a4 aws running; B: b1 azure failed.
async fn known_data(pool: &PgPool) {
    migrated(pool).await;
    let device = |n, owner, provider, status, cpu, memory| SeedDevice {
        id: dev(n),
        owner,
        provider,
        status,
        cpu,
        memory,
        created_at: at(i64::try_from(n).unwrap() * 1_000),
    };
    insert_devices(
        pool,
        &[
            device(1, A, "aws", "running", 2, 2048),
            device(2, A, "gcp", "stopped", 4, 4096),
            device(3, A, "aws", "deleted", 8, 8192),
            device(4, A, "aws", "running", 2, 1024),
            device(5, B, "azure", "failed", 1, 512),
        ],
    )
    .await;
    derive_device_stats(pool).await;
    insert_usage(pool, day("2026-01-05"), A, dev(1), 60, 100, "USD").await;
    insert_usage(pool, day("2026-01-06"), A, dev(1), 30, 50, "USD").await;
    insert_usage(pool, day("2026-01-06"), A, dev(2), 10, 20, "EUR").await;
    insert_usage(pool, day("2026-02-02"), A, dev(2), 5, 7, "USD").await;
    insert_usage(pool, day("2026-01-05"), B, dev(5), 99, 999, "USD").await;
    set_checkpoints(pool, 0).await;
}

fn rows_of(data: &Value) -> Vec<(String, String, i64, i64)> {
    data["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["period"].as_str().unwrap().to_owned(),
                r["cost"]["currency"].as_str().unwrap().to_owned(),
                big(&r["minutes"]),
                big(&r["cost"]["amountMinor"]),
            )
        })
        .collect()
}

const USAGE: &str = "query($f: UsageFilter!, $g: UsageGroupBy) { dailyUsage(filter: $f, groupBy: $g) {
    rows { period minutes cost { amountMinor currency } } totals { minutes costs { amountMinor currency } } } }";

#[sqlx::test(migrations = false)]
async fn every_query_and_filter_answers_from_known_data(pool: PgPool) {
    known_data(&pool).await;
    let api = start(&pool, test_config()).await;
    let admin = admin();
    let alice = token(A, Role::User);

    // deviceStats: live devices only, rows ordered by user, status, provider.
    let stats = "query($f: DeviceFilterInput) { deviceStats(filter: $f) {
        rows { userId status provider deviceCount cpuCores memoryMb } totals { deviceCount cpuCores memoryMb } } }";
    let answer = api.query(&admin, stats, json!({"f": {"userId": A}})).await;
    let data = &answer.data()["deviceStats"];
    assert_eq!(
        data["totals"],
        json!({"deviceCount": "3", "cpuCores": "8", "memoryMb": "7168"})
    );
    assert_eq!(
        data["rows"],
        json!([
            {"userId": A, "status": "RUNNING", "provider": "AWS", "deviceCount": "2", "cpuCores": "4", "memoryMb": "3072"},
            {"userId": A, "status": "STOPPED", "provider": "GCP", "deviceCount": "1", "cpuCores": "4", "memoryMb": "4096"},
        ])
    );
    let answer = api.query(&admin, stats, json!({"f": {"provider": "AZURE"}})).await;
    assert_eq!(answer.data()["deviceStats"]["totals"]["deviceCount"], "1");
    let answer = api.query(&admin, stats, json!({"f": {"status": "RUNNING"}})).await;
    assert_eq!(answer.data()["deviceStats"]["totals"]["cpuCores"], "4");
    let answer = api.query(&admin, stats, json!({})).await;
    assert_eq!(answer.data()["deviceStats"]["totals"]["deviceCount"], "4");
    assert_eq!(answer.data()["deviceStats"]["rows"].as_array().unwrap().len(), 3);

    // dailyUsage by day, week and month; totals per currency.
    let jan = json!({"userId": A, "from": "2026-01-01", "to": "2026-01-31"});
    let answer = api.query(&admin, USAGE, json!({"f": jan})).await;
    let data = &answer.data()["dailyUsage"];
    assert_eq!(
        rows_of(data),
        vec![
            ("2026-01-05".into(), "USD".into(), 60, 100),
            ("2026-01-06".into(), "EUR".into(), 10, 20),
            ("2026-01-06".into(), "USD".into(), 30, 50),
        ]
    );
    assert_eq!(
        data["totals"],
        json!({"minutes": "100", "costs": [{"amountMinor": "20", "currency": "EUR"}, {"amountMinor": "150", "currency": "USD"}]})
    );
    let answer = api.query(&admin, USAGE, json!({"f": jan, "g": "WEEK"})).await;
    assert_eq!(
        rows_of(&answer.data()["dailyUsage"]),
        vec![
            ("2026-01-05".into(), "EUR".into(), 10, 20),
            ("2026-01-05".into(), "USD".into(), 90, 150)
        ]
    );
    let two_months = json!({"userId": A, "from": "2026-01-01", "to": "2026-02-28"});
    let answer = api.query(&admin, USAGE, json!({"f": two_months, "g": "MONTH"})).await;
    assert_eq!(
        rows_of(&answer.data()["dailyUsage"]),
        vec![
            ("2026-01-01".into(), "EUR".into(), 10, 20),
            ("2026-01-01".into(), "USD".into(), 90, 150),
            ("2026-02-01".into(), "USD".into(), 5, 7),
        ]
    );
    let one_device = json!({"deviceId": dev(2), "from": "2026-01-01", "to": "2026-01-31"});
    let answer = api.query(&admin, USAGE, json!({"f": one_device})).await;
    assert_eq!(
        rows_of(&answer.data()["dailyUsage"]),
        vec![("2026-01-06".into(), "EUR".into(), 10, 20)]
    );
    let everyone = json!({"from": "2026-01-05", "to": "2026-01-05"});
    let answer = api.query(&admin, USAGE, json!({"f": everyone})).await;
    assert_eq!(
        rows_of(&answer.data()["dailyUsage"]),
        vec![("2026-01-05".into(), "USD".into(), 159, 1099)]
    );
    // Ranges: at most 366 days, and in order.
    let too_long = json!({"from": "2025-01-01", "to": "2026-01-31"});
    let answer = api.query(&admin, USAGE, json!({"f": too_long})).await;
    assert_eq!(
        (answer.status.as_u16(), answer.error_code()),
        (200, "BAD_USER_INPUT"),
        "{}",
        answer.body
    );
    let backwards = json!({"from": "2026-02-01", "to": "2026-01-01"});
    let answer = api.query(&admin, USAGE, json!({"f": backwards})).await;
    assert_eq!(answer.error_code(), "BAD_USER_INPUT");
    let leap_year = json!({"from": "2028-01-01", "to": "2028-12-31"});
    api.query(&admin, USAGE, json!({"f": leap_year})).await.data();

    // devices: filters, order, both paging directions, totalCount across pages.
    let devices = "query($f: DeviceFilterInput, $o: DevicesOrderBy, $first: Int, $after: String, $last: Int, $before: String) {
        devices(filter: $f, orderBy: $o, first: $first, after: $after, last: $last, before: $before) {
            totalCount pageInfo { hasNextPage hasPreviousPage startCursor endCursor }
            edges { cursor node { id status provider cpuCores memoryMb androidVersion createdAt ownerId } } nodes { id } } }";
    let aws = json!({"userId": A, "provider": "AWS"});
    let page = api.query(&admin, devices, json!({"f": aws, "first": 2})).await;
    let data = &page.data()["devices"];
    assert_eq!(data["totalCount"], "3");
    assert_eq!(ids(&data["nodes"]), vec![dev(1).to_string(), dev(3).to_string()]);
    assert_eq!(data["pageInfo"]["hasNextPage"], true);
    assert_eq!(data["pageInfo"]["hasPreviousPage"], false);
    assert_eq!(data["edges"][0]["node"]["status"], "RUNNING");
    assert_eq!(data["edges"][1]["node"]["status"], "DELETED");
    assert_eq!(data["edges"][0]["node"]["createdAt"], "2026-01-01T00:00:00.001+00:00");
    let end = data["pageInfo"]["endCursor"].clone();
    assert_eq!(end, data["edges"][1]["cursor"]);
    let next = api
        .query(&admin, devices, json!({"f": aws, "first": 2, "after": end}))
        .await;
    let data = &next.data()["devices"];
    assert_eq!(ids(&data["nodes"]), vec![dev(4).to_string()]);
    assert_eq!(data["pageInfo"]["hasNextPage"], false);
    assert_eq!(data["pageInfo"]["hasPreviousPage"], true);
    let back = api
        .query(
            &admin,
            devices,
            json!({"f": aws, "last": 2, "before": data["pageInfo"]["startCursor"]}),
        )
        .await;
    assert_eq!(
        ids(&back.data()["devices"]["nodes"]),
        vec![dev(1).to_string(), dev(3).to_string()]
    );
    assert_eq!(back.data()["devices"]["pageInfo"]["hasPreviousPage"], false);
    let newest = api
        .query(&admin, devices, json!({"o": "CREATED_AT_DESC", "first": 2}))
        .await;
    assert_eq!(
        ids(&newest.data()["devices"]["nodes"]),
        vec![dev(5).to_string(), dev(4).to_string()]
    );
    // A cursor belongs to its order.
    let wrong = api
        .query(
            &admin,
            devices,
            json!({"o": "CREATED_AT_ASC", "first": 2, "after": newest.data()["devices"]["pageInfo"]["endCursor"]}),
        )
        .await;
    assert_eq!(wrong.error_code(), "BAD_USER_INPUT", "{}", wrong.body);
    let stopped = api.query(&admin, devices, json!({"f": {"status": "STOPPED"}})).await;
    assert_eq!(ids(&stopped.data()["devices"]["nodes"]), vec![dev(2).to_string()]);

    // device and user, with nested connections and usage.
    let device = "query($id: UUID!) { device(id: $id) { id provider status minutesUsed owner { id } usage(from: \"2026-01-01\", to: \"2026-01-31\") { totals { minutes } } } }";
    let answer = api.query(&admin, device, json!({"id": dev(5)})).await;
    let data = &answer.data()["device"];
    assert_eq!(
        (data["provider"].as_str(), data["status"].as_str()),
        (Some("AZURE"), Some("FAILED"))
    );
    assert_eq!(data["owner"]["id"], json!(B));
    assert_eq!(data["usage"]["totals"]["minutes"], "99");
    let answer = api.query(&alice, device, json!({"id": dev(5)})).await;
    assert_eq!(
        answer.data()["device"],
        Value::Null,
        "another user's device is invisible"
    );
    let answer = api.query(&admin, device, json!({"id": Uuid::from_u128(77)})).await;
    assert_eq!(answer.data()["device"], Value::Null);

    let user = "query($id: UUID!) { user(id: $id) { id
        devices(first: 10, filter: {provider: AWS}) { totalCount nodes { id usage(from: \"2026-01-01\", to: \"2026-01-31\") { totals { minutes } } } }
        usage(from: \"2026-01-01\", to: \"2026-12-31\", groupBy: MONTH) { rows { period } totals { minutes } }
        stats { rows { status provider deviceCount } totals { deviceCount memoryMb } } } }";
    let answer = api.query(&alice, user, json!({"id": A})).await;
    let data = &answer.data()["user"];
    assert_eq!(data["devices"]["totalCount"], "3");
    assert_eq!(data["devices"]["nodes"][0]["usage"]["totals"]["minutes"], "90");
    assert_eq!(data["usage"]["totals"]["minutes"], "105");
    assert_eq!(
        data["usage"]["rows"].as_array().unwrap().len(),
        3,
        "EUR and USD in January, USD in February"
    );
    assert_eq!(data["stats"]["totals"], json!({"deviceCount": "3", "memoryMb": "7168"}));
    let answer = api.query(&alice, user, json!({"id": B})).await;
    assert_eq!(answer.data()["user"], Value::Null);

    // projectionStatus reads the source that answered.
    set_checkpoints(&pool, 0).await;
    let answer = api
        .query(
            &admin,
            "{ projectionStatus { name position head lagEvents lagSeconds } }",
            json!({}),
        )
        .await;
    let names: Vec<&str> = answer.data()["projectionStatus"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["daily_usage", "fleet"]);
    assert_eq!(answer.cache.as_deref(), Some("bypass"), "status is never cached");
}

#[sqlx::test(migrations = false)]
async fn pagination_walks_a_10k_fleet_both_ways_without_duplicates_or_holes_while_devices_are_created(pool: PgPool) {
    migrated(&pool).await;
    let owner = Uuid::from_u128(0x10_000);
    let fleet: Vec<SeedDevice> = (0..10_000)
        .map(|n| {
            SeedDevice::small(
                Uuid::from_u128(0x000f_1ee7_0000 + n),
                owner,
                ["aws", "gcp", "azure"][usize::try_from(n % 3).unwrap()],
                "running",
                // Some share a timestamp: the device id breaks the tie.
                at(i64::try_from(n / 2).unwrap() * 1_000),
            )
        })
        .collect();
    insert_devices(&pool, &fleet).await;
    set_checkpoints(&pool, 1).await;
    let api = start(&pool, test_config()).await;
    let token = token(owner, Role::User);

    // Devices keep being created (and the projection moving) during both walks.
    let creating = Arc::new(AtomicBool::new(true));
    let created = Arc::new(AtomicUsize::new(0));
    let creator = {
        let (pool, creating, created) = (pool.clone(), Arc::clone(&creating), Arc::clone(&created));
        tokio::spawn(async move {
            let mut position = 1;
            while creating.load(Ordering::Relaxed) {
                let device = SeedDevice {
                    id: Uuid::now_v7(),
                    owner,
                    provider: "aws",
                    status: "stopped",
                    cpu: 1,
                    memory: 1024,
                    created_at: Utc::now(),
                };
                insert_devices(&pool, &[device]).await;
                position += 1;
                set_checkpoints(&pool, position).await;
                created.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    let original: Vec<String> = fleet.iter().map(|d| d.id.to_string()).collect();
    let devices = "query($first: Int, $after: String, $last: Int, $before: String) {
        devices(first: $first, after: $after, last: $last, before: $before) {
            pageInfo { hasNextPage hasPreviousPage startCursor endCursor } nodes { id } } }";

    let mut forward: Vec<String> = Vec::new();
    let mut after = Value::Null;
    loop {
        let page = api.query(&token, devices, json!({"first": 100, "after": after})).await;
        let data = &page.data()["devices"];
        forward.extend(ids(&data["nodes"]));
        if data["pageInfo"]["hasNextPage"] != true {
            break;
        }
        after = data["pageInfo"]["endCursor"].clone();
        // New devices land after the original fleet; stop once it is walked and some were seen.
        if forward.len() > original.len() + 200 {
            break;
        }
    }
    let mut backward: Vec<String> = Vec::new();
    let mut before = Value::Null;
    loop {
        let page = api.query(&token, devices, json!({"last": 100, "before": before})).await;
        let data = &page.data()["devices"];
        let mut ids = ids(&data["nodes"]);
        ids.reverse();
        backward.extend(ids);
        if data["pageInfo"]["hasPreviousPage"] != true {
            break;
        }
        before = data["pageInfo"]["startCursor"].clone();
    }
    creating.store(false, Ordering::Relaxed);
    creator.await.unwrap();
    assert!(
        created.load(Ordering::Relaxed) > 10,
        "devices were created during the walks"
    );

    for (walk, seen) in [("forward", &forward), ("backward", &backward)] {
        let unique: HashSet<&String> = seen.iter().collect();
        assert_eq!(unique.len(), seen.len(), "{walk}: a device was returned twice");
        let walked: Vec<&String> = seen.iter().filter(|id| original.contains(id)).collect();
        assert_eq!(walked.len(), original.len(), "{walk}: a device was skipped");
    }
    assert_eq!(
        &forward[..original.len()],
        &original[..],
        "forward walk in creation order"
    );
    let mut oldest_first: Vec<&String> = backward.iter().rev().collect();
    oldest_first.truncate(original.len());
    assert_eq!(
        oldest_first,
        original.iter().collect::<Vec<_>>(),
        "backward walk in reverse creation order"
    );
}

#[sqlx::test(migrations = false)]
async fn nested_loads_are_batched_into_one_statement_per_level(pool: PgPool) {
    let statements = count_statements();
    migrated(&pool).await;
    // 50 devices of 10 owners, each with usage.
    let devices: Vec<SeedDevice> = (0..50u128)
        .map(|n| SeedDevice {
            id: Uuid::from_u128(0xb000 + n),
            owner: Uuid::from_u128(0x0e00 + n % 10),
            provider: "gcp",
            status: "running",
            cpu: 2,
            memory: 1024,
            created_at: at(i64::try_from(n).unwrap()),
        })
        .collect();
    insert_devices(&pool, &devices).await;
    derive_device_stats(&pool).await;
    for device in &devices {
        insert_usage(&pool, day("2026-03-01"), device.owner, device.id, 10, 5, "USD").await;
    }
    set_checkpoints(&pool, 1).await;
    // A window long enough that no sibling misses its batch however busy the machine (the
    // default, none, batches siblings on a quiet machine; see `Limits::load_batch_window`).
    let config = query_api::QueryApiConfig {
        limits: query_api::graphql::Limits {
            load_batch_window: Duration::from_millis(100),
            ..test_config().limits
        },
        ..counting_config()
    };
    let api = start(&pool, config).await;
    listener_started(&api).await;
    let query = "{ devices(first: 50) { nodes { id
        usage(from: \"2026-03-01\", to: \"2026-03-31\") { totals { minutes } }
        owner { id devices(first: 3) { totalCount nodes { id } } stats { totals { deviceCount } }
                usage(from: \"2026-03-01\", to: \"2026-03-31\") { totals { minutes } } } } } }";
    let admin = admin();
    api.query(&admin, "{ devices(first: 1) { nodes { id } } }", json!({}))
        .await
        .data();

    let before = statements.load(Ordering::Relaxed);
    let answer = api.query(&admin, query, json!({})).await;
    let ran = statements.load(Ordering::Relaxed) - before;
    let nodes = answer.data()["devices"]["nodes"].as_array().unwrap().clone();
    assert_eq!(nodes.len(), 50);
    for node in &nodes {
        assert_eq!(node["usage"]["totals"]["minutes"], "10");
        assert_eq!(node["owner"]["devices"]["totalCount"], "5");
        assert_eq!(node["owner"]["devices"]["nodes"].as_array().unwrap().len(), 3);
        assert_eq!(node["owner"]["stats"]["totals"]["deviceCount"], "5");
        assert_eq!(node["owner"]["usage"]["totals"]["minutes"], "50");
    }
    // The page, then one statement each for device usage, owners' pages with their counts,
    // owners' stats and owners' usage: 5, whatever the number of devices and owners. One
    // statement per parent would be 91 here.
    assert_eq!(ran, 5, "statements for 50 devices of 10 owners");
}

/// A dashboard asking for a page with its `totalCount`, or for statistics rows with their
/// totals, gets both from one statement; the counts stay right past the first page, after the
/// last one, under a filter and for a user with nothing.
#[sqlx::test(migrations = false)]
async fn a_page_and_its_count_and_stats_rows_and_their_totals_are_one_statement_each(pool: PgPool) {
    let statements = count_statements();
    migrated(&pool).await;
    // 25 devices of A (every fifth stopped, two providers), one of B.
    let mut devices: Vec<SeedDevice> = (0..25u128)
        .map(|n| SeedDevice {
            id: dev(0x100 + n),
            owner: A,
            provider: if n % 2 == 0 { "aws" } else { "gcp" },
            status: if n % 5 == 0 { "stopped" } else { "running" },
            cpu: 2,
            memory: 1024,
            created_at: at(i64::try_from(n).unwrap() * 1_000),
        })
        .collect();
    devices.push(SeedDevice {
        id: dev(0x200),
        owner: B,
        provider: "aws",
        status: "running",
        cpu: 4,
        memory: 2048,
        created_at: at(1),
    });
    insert_devices(&pool, &devices).await;
    derive_device_stats(&pool).await;
    set_checkpoints(&pool, 1).await;
    let config = counting_config();
    let api = start(&pool, config).await;
    listener_started(&api).await;
    let alice = token(A, Role::User);
    let nobody = token(Uuid::from_u128(0xdead), Role::User);
    let ran = async |token: &str, query: &str, variables: Value| {
        let before = statements.load(Ordering::Relaxed);
        let data = api.query(token, query, variables).await.data().clone();
        (statements.load(Ordering::Relaxed) - before, data)
    };
    let page = "query($user: UUID!, $after: String, $status: [DeviceStatus!]) {
        devices(filter: { userId: $user, status: $status }, first: 20, after: $after) {
            totalCount pageInfo { hasNextPage endCursor } nodes { id } } }";

    let (n, first) = ran(&alice, page, json!({ "user": A })).await;
    assert_eq!(n, 1, "a first page with its count: {first}");
    assert_eq!(first["devices"]["totalCount"], "25");
    assert_eq!(first["devices"]["nodes"].as_array().unwrap().len(), 20);
    assert_eq!(first["devices"]["pageInfo"]["hasNextPage"], true);

    let cursor = first["devices"]["pageInfo"]["endCursor"].clone();
    let (n, second) = ran(&alice, page, json!({ "user": A, "after": cursor })).await;
    assert_eq!(n, 1, "a later page with its count: {second}");
    assert_eq!(second["devices"]["totalCount"], "25");
    assert_eq!(second["devices"]["nodes"].as_array().unwrap().len(), 5);

    let cursor = second["devices"]["pageInfo"]["endCursor"].clone();
    let (n, past) = ran(&alice, page, json!({ "user": A, "after": cursor })).await;
    assert_eq!(
        past["devices"]["totalCount"], "25",
        "past the last page the count is read on its own"
    );
    assert_eq!(past["devices"]["nodes"], json!([]));
    assert_eq!(n, 2, "an empty page after a cursor cannot carry the count");

    let (n, stopped) = ran(&alice, page, json!({ "user": A, "status": ["STOPPED"] })).await;
    assert_eq!((n, &stopped["devices"]["totalCount"]), (1, &json!("5")), "{stopped}");
    let (n, none) = ran(&nobody, page, json!({ "user": Uuid::from_u128(0xdead) })).await;
    assert_eq!((n, &none["devices"]["totalCount"]), (1, &json!("0")), "{none}");
    let (n, other) = ran(&alice, page, json!({ "user": B })).await;
    assert_eq!(
        (n, &other["devices"]["totalCount"]),
        (0, &json!("0")),
        "another user's: nothing read"
    );

    // Without totalCount the page statement counts nothing, and with it nested under a user
    // the batched page counts too.
    let (n, _) = ran(&alice, "{ devices(first: 5) { nodes { id } } }", json!({})).await;
    assert_eq!(n, 1);
    let (n, nested) = ran(
        &alice,
        &format!("{{ user(id: \"{A}\") {{ devices(first: 3) {{ totalCount }} }} }}"),
        json!({}),
    )
    .await;
    assert_eq!(
        (n, &nested["user"]["devices"]["totalCount"]),
        (1, &json!("25")),
        "{nested}"
    );

    let stats = "query($user: UUID!) { deviceStats(filter: { userId: $user }) {
        rows(first: 1) { status provider deviceCount } totals { deviceCount cpuCores memoryMb } } }";
    let (n, mine) = ran(&alice, stats, json!({ "user": A })).await;
    assert_eq!(n, 1, "one owner's rows and totals: {mine}");
    assert_eq!(mine["deviceStats"]["rows"].as_array().unwrap().len(), 1);
    assert_eq!(
        mine["deviceStats"]["totals"],
        json!({ "deviceCount": "25", "cpuCores": "50", "memoryMb": "25600" }),
        "totals over every row, not only the one returned"
    );
    let admin = admin();
    // Everyone's devices: each alias's page on its own and one count shared by them all, not
    // a count of every device per alias.
    let (n, lists) = ran(
        &admin,
        "{ a: devices(first: 1) { totalCount } b: devices(first: 2) { totalCount }
           c: devices(first: 3) { totalCount } }",
        json!({}),
    )
    .await;
    assert_eq!(
        (&lists["a"]["totalCount"], &lists["c"]["totalCount"]),
        (&json!("26"), &json!("26"))
    );
    assert_eq!(n, 4, "three pages and one count: {lists}");
    let (n, everyone) = ran(
        &admin,
        "{ deviceStats { rows { deviceCount } totals { deviceCount } } }",
        json!({}),
    )
    .await;
    assert_eq!(everyone["deviceStats"]["totals"]["deviceCount"], "26");
    assert_eq!(
        n, 2,
        "everyone's rows are not read whole: a page of them and the totals"
    );
}

#[sqlx::test(migrations = false)]
async fn a_user_token_never_sees_another_users_rows_whatever_it_asks(pool: PgPool) {
    migrated(&pool).await;
    let mut rng = StdRng::seed_from_u64(6);
    let users: Vec<Uuid> = (0..8u128).map(|n| Uuid::from_u128(0x5e00 + n)).collect();
    let mut devices = Vec::new();
    for (i, user) in users.iter().enumerate() {
        for n in 0..rng.random_range(0..6u128) {
            devices.push(SeedDevice {
                id: Uuid::from_u128(0xd_0000 + (i as u128) * 100 + n),
                owner: *user,
                provider: ["aws", "gcp"].choose(&mut rng).unwrap(),
                status: ["running", "stopped", "deleted"].choose(&mut rng).unwrap(),
                cpu: rng.random_range(1..8),
                memory: 1024,
                created_at: at(rng.random_range(0..1_000_000)),
            });
        }
    }
    insert_devices(&pool, &devices).await;
    derive_device_stats(&pool).await;
    for device in &devices {
        insert_usage(&pool, day("2026-04-01"), device.owner, device.id, 7, 3, "USD").await;
    }
    set_checkpoints(&pool, 1).await;
    let api = start(&pool, test_config()).await;
    let all_devices: Vec<Uuid> = devices.iter().map(|d| d.id).collect();

    for _ in 0..150 {
        let me = *users.choose(&mut rng).unwrap();
        let token = token(me, Role::User);
        let filter_user = match rng.random_range(0..3) {
            0 => Value::Null,
            1 => json!(me),
            _ => json!(users.choose(&mut rng).unwrap()),
        };
        let mine = devices.iter().filter(|d| d.owner == me).count();
        match rng.random_range(0..5) {
            0 => {
                let answer = api
                    .query(&token, "query($u: UUID) { devices(filter: {userId: $u}, first: 100) { totalCount nodes { ownerId } } }", json!({"u": filter_user}))
                    .await;
                let data = &answer.data()["devices"];
                for node in data["nodes"].as_array().unwrap() {
                    assert_eq!(node["ownerId"], json!(me), "another user's device");
                }
                let expected = if filter_user.is_null() || filter_user == json!(me) {
                    mine
                } else {
                    0
                };
                assert_eq!(big(&data["totalCount"]), i64::try_from(expected).unwrap());
            }
            1 => {
                let answer = api
                    .query(
                        &token,
                        "query($u: UUID) { deviceStats(filter: {userId: $u}) { rows { userId } } }",
                        json!({"u": filter_user}),
                    )
                    .await;
                for row in answer.data()["deviceStats"]["rows"].as_array().unwrap() {
                    assert_eq!(row["userId"], json!(me));
                }
            }
            2 => {
                let answer = api
                    .query(&token, "query($u: UUID) { dailyUsage(filter: {userId: $u, from: \"2026-04-01\", to: \"2026-04-30\"}) { totals { minutes } } }", json!({"u": filter_user}))
                    .await;
                let expected = if filter_user.is_null() || filter_user == json!(me) {
                    mine * 7
                } else {
                    0
                };
                assert_eq!(
                    big(&answer.data()["dailyUsage"]["totals"]["minutes"]),
                    i64::try_from(expected).unwrap()
                );
            }
            3 => {
                let id = all_devices.choose(&mut rng).unwrap();
                let answer = api
                    .query(
                        &token,
                        "query($id: UUID!) { device(id: $id) { ownerId } }",
                        json!({"id": id}),
                    )
                    .await;
                let device = &answer.data()["device"];
                assert!(device.is_null() || device["ownerId"] == json!(me), "{device}");
            }
            _ => {
                let other = users.choose(&mut rng).unwrap();
                let answer = api
                    .query(
                        &token,
                        "query($id: UUID!) { user(id: $id) { id devices { nodes { ownerId } } } }",
                        json!({"id": other}),
                    )
                    .await;
                let user = &answer.data()["user"];
                assert_eq!(user.is_null(), *other != me, "{user}");
            }
        }
    }

    // No token, a bad token, a service without the read scope: refused before any read.
    let query = json!({"query": "{ devices { totalCount } }"});
    assert_eq!(api.post_json(None, &query, &[]).await.status, 401);
    let answer = api.post_json(Some("not-a-token"), &query, &[]).await;
    assert_eq!((answer.status.as_u16(), answer.error_code()), (401, "UNAUTHENTICATED"));
    let service = test_support::tokens::signed(SECRET, "billing", Role::Service, &[scope::USERS_WRITE]);
    assert_eq!(api.post_json(Some(&service), &query, &[]).await.status, 403);
    let reporting = test_support::tokens::signed(SECRET, "bi", Role::Service, &[scope::DASHBOARDS_READ]);
    let answer = api.post_json(Some(&reporting), &query, &[]).await;
    assert_eq!(
        big(&answer.data()["devices"]["totalCount"]),
        i64::try_from(devices.len()).unwrap()
    );
}

#[sqlx::test(migrations = false)]
async fn abusive_or_malformed_requests_get_clear_errors_never_a_5xx(pool: PgPool) {
    known_data(&pool).await;
    let api = start(&pool, test_config()).await;
    let admin = admin();
    let deep = "{ user(id: \"00000000-0000-0000-0000-00000000000a\") { devices { nodes { owner { devices { nodes { owner { devices { nodes { owner { devices { nodes { owner { devices { nodes { id } } } } } } } } } } } } } } } }";
    let complex =
        "{ devices(first: 100) { nodes { owner { devices(first: 100) { nodes { id status provider } } } } } }";
    let cases: Vec<(&str, Value, u16, &str)> = vec![
        ("too deep", json!({"query": deep}), 200, "QUERY_TOO_COMPLEX"),
        ("too complex", json!({"query": complex}), 200, "QUERY_TOO_COMPLEX"),
        (
            "page too large",
            json!({"query": "{ devices(first: 1000) { nodes { id } } }"}),
            200,
            "BAD_USER_INPUT",
        ),
        (
            "negative page",
            json!({"query": "{ devices(last: -5) { nodes { id } } }"}),
            200,
            "BAD_USER_INPUT",
        ),
        (
            "garbled cursor",
            json!({"query": "{ devices(after: \"%%%\") { nodes { id } } }"}),
            200,
            "BAD_USER_INPUT",
        ),
        ("unknown field", json!({"query": "{ devices { secrets } }"}), 200, ""),
        ("syntax error", json!({"query": "{ devices { "}), 200, ""),
        (
            "bad enum",
            json!({"query": "{ devices(filter: {status: EXPLODED}) { totalCount } }"}),
            200,
            "",
        ),
        ("bad uuid", json!({"query": "{ device(id: \"nope\") { id } }"}), 200, ""),
        (
            "bad date",
            json!({"query": "{ dailyUsage(filter: {from: \"2026-13-01\", to: \"2026-01-01\"}) { rows { period } } }"}),
            200,
            "",
        ),
        (
            "bad minPosition",
            json!({"query": "{ devices(minPosition: \"soon\") { totalCount } }"}),
            400,
            "BAD_USER_INPUT",
        ),
        (
            "variables not an object",
            json!({"query": "{ devices { totalCount } }", "variables": [1]}),
            400,
            "BAD_REQUEST",
        ),
        ("no query", json!({"variables": {}}), 400, "BAD_REQUEST"),
        ("mutation", json!({"query": "mutation { x }"}), 200, ""),
        (
            "unknown operation",
            json!({"query": "query A { devices { totalCount } }", "operationName": "B"}),
            200,
            "",
        ),
    ];
    for (name, body, status, code) in cases {
        let answer = api.post_json(Some(&admin), &body, &[]).await;
        assert_eq!(answer.status.as_u16(), status, "{name}: {}", answer.body);
        assert!(
            answer.body["errors"].as_array().is_some_and(|e| !e.is_empty()),
            "{name}: {}",
            answer.body
        );
        if !code.is_empty() {
            assert_eq!(answer.error_code(), code, "{name}: {}", answer.body);
        }
    }
    // Raw bodies: not JSON, a batch, too large, a bad header.
    let url = format!("http://{}/graphql", api.addr);
    for (name, body, status) in [
        ("not JSON", "{{{".to_owned(), 400),
        ("batch", "[{\"query\": \"{ devices { totalCount } }\"}]".to_owned(), 400),
        ("huge", format!("{{\"query\": \"{}\"}}", "{ a }".repeat(40_000)), 413),
    ] {
        let response = api
            .client
            .post(&url)
            .bearer_auth(&admin)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), status, "{name}");
        // Only the body left unread closes the connection, and the answer says so.
        let closing = response.headers().get("connection").is_some_and(|v| v == "close");
        assert_eq!(closing, status == 413, "{name}");
    }
    let answer = api
        .post_json(
            Some(&admin),
            &json!({"query": "{ devices { totalCount } }"}),
            &[("x-min-position", "-3")],
        )
        .await;
    assert_eq!(answer.status.as_u16(), 400);

    // A query over its time limit (here: blocked by a lock) is stopped with a TIMEOUT error.
    let impatient = start(
        &pool,
        query_api::QueryApiConfig {
            query_timeout: Duration::from_millis(300),
            ..test_config()
        },
    )
    .await;
    let mut blocker = pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE devices IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *blocker)
        .await
        .unwrap();
    let answer = impatient.query(&admin, "{ devices { totalCount } }", json!({})).await;
    assert_eq!(
        (answer.status.as_u16(), answer.error_code()),
        (200, "TIMEOUT"),
        "{}",
        answer.body
    );
    blocker.rollback().await.unwrap();
    impatient
        .query(&admin, "{ devices { totalCount } }", json!({}))
        .await
        .data();
}

#[sqlx::test(migrations = false)]
async fn a_client_over_its_rate_is_told_to_retry_later_and_others_are_not(pool: PgPool) {
    known_data(&pool).await;
    let api = start(
        &pool,
        query_api::QueryApiConfig {
            rate_per_second: 1,
            rate_burst: 3,
            ..test_config()
        },
    )
    .await;
    let (greedy, other) = (token(A, Role::User), token(B, Role::User));
    let query = "{ devices { totalCount } }";
    let mut statuses = Vec::new();
    for _ in 0..6 {
        statuses.push(api.query(&greedy, query, json!({})).await);
    }
    assert!(statuses[..3].iter().all(|a| a.status == 200), "the burst is allowed");
    let limited = statuses.last().unwrap();
    assert_eq!(
        (limited.status.as_u16(), limited.error_code()),
        (429, "RATE_LIMITED"),
        "{}",
        limited.body
    );
    api.query(&other, query, json!({})).await.data();
}

#[sqlx::test(migrations = false)]
async fn persisted_queries_graphiql_and_introspection(pool: PgPool) {
    known_data(&pool).await;
    let api = start(&pool, test_config()).await;
    let admin = admin();
    let query = "{ deviceStats { totals { deviceCount } } }";
    let hash = hex::encode(Sha256::digest(query.as_bytes()));
    let by_hash = json!({"extensions": {"persistedQuery": {"version": 1, "sha256Hash": hash}}});
    let answer = api.post_json(Some(&admin), &by_hash, &[]).await;
    assert_eq!(
        (answer.status.as_u16(), answer.error_code()),
        (200, "PERSISTED_QUERY_NOT_FOUND")
    );
    let register = json!({"query": query, "extensions": {"persistedQuery": {"version": 1, "sha256Hash": hash}}});
    assert_eq!(
        api.post_json(Some(&admin), &register, &[]).await.data()["deviceStats"]["totals"]["deviceCount"],
        "4"
    );
    assert_eq!(
        api.post_json(Some(&admin), &by_hash, &[]).await.data()["deviceStats"]["totals"]["deviceCount"],
        "4"
    );
    let mismatch = json!({"query": "{ devices { totalCount } }", "extensions": {"persistedQuery": {"version": 1, "sha256Hash": hash}}});
    assert_eq!(api.post_json(Some(&admin), &mismatch, &[]).await.status, 400);

    let page = api
        .client
        .get(format!("http://{}/graphql", api.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains("graphiql"));
    let introspection = "{ __schema { queryType { name } } }";
    assert_eq!(
        api.query(&admin, introspection, json!({})).await.data()["__schema"]["queryType"]["name"],
        "Query"
    );

    let production = start(
        &pool,
        query_api::QueryApiConfig {
            introspection: false,
            graphiql: false,
            ..test_config()
        },
    )
    .await;
    let answer = production.query(&admin, introspection, json!({})).await;
    assert_eq!(answer.body["data"]["__schema"], Value::Null, "{}", answer.body);
    let page = production
        .client
        .get(format!("http://{}/graphql", production.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 405);
}

#[sqlx::test(migrations = false)]
async fn the_cache_answers_repeats_and_never_serves_an_answer_older_than_the_checkpoint(pool: PgPool) {
    known_data(&pool).await;
    set_checkpoints(&pool, 10).await;
    let api = start(&pool, test_config()).await;
    let admin = admin();
    let alice = token(A, Role::User);
    let count = "{ devices { totalCount } }";

    let first = api.query(&admin, count, json!({})).await;
    assert_eq!(
        (first.cache.as_deref(), first.data()["devices"]["totalCount"].as_str()),
        (Some("miss"), Some("5"))
    );
    // The same question, laid out differently: the same answer from memory.
    let again = api
        .query(
            &admin,
            "{\n  devices {\n    totalCount # all of them\n  }\n}",
            json!({}),
        )
        .await;
    assert_eq!(again.cache.as_deref(), Some("hit"));
    assert_eq!(again.body, first.body);
    // Another caller's scope is another key.
    let mine = api.query(&alice, count, json!({})).await;
    assert_eq!(
        (mine.cache.as_deref(), mine.data()["devices"]["totalCount"].as_str()),
        (Some("miss"), Some("4"))
    );

    // A device appears and the projection's checkpoint moves: the cached count is not reused.
    insert_devices(
        &pool,
        &[SeedDevice {
            id: dev(9),
            owner: B,
            provider: "aws",
            status: "running",
            cpu: 1,
            memory: 512,
            created_at: at(9_000),
        }],
    )
    .await;
    set_checkpoints(&pool, 11).await;
    // With the position as minPosition, the answer is read at (or after) it, every time.
    let fresh = api
        .post_json(Some(&admin), &json!({"query": count}), &[("x-min-position", "11")])
        .await;
    assert_eq!(fresh.data()["devices"]["totalCount"], "6", "{:?}", fresh.cache);
    assert!(fresh.position.unwrap() >= 11);
    let by_argument = api
        .query(&admin, "{ devices(minPosition: 11) { totalCount } }", json!({}))
        .await;
    assert_eq!(by_argument.data()["devices"]["totalCount"], "6");
    // Without a position, the next watermark refresh (20 ms here) moves the key as well.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let answer = api.query(&admin, count, json!({})).await;
        if answer.data()["devices"]["totalCount"] == "6" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the cache kept an answer older than the checkpoint"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // A position the read models never reach: a clear error after the bounded wait.
    let impatient = start(
        &pool,
        query_api::QueryApiConfig {
            sources: query_api::SourcesConfig {
                position_wait: Duration::from_millis(100),
                ..query_api::SourcesConfig::default()
            },
            ..test_config()
        },
    )
    .await;
    let answer = impatient
        .post_json(Some(&admin), &json!({"query": count}), &[("x-min-position", "500")])
        .await;
    assert_eq!(
        (answer.status.as_u16(), answer.error_code()),
        (200, "NOT_YET_VISIBLE"),
        "{}",
        answer.body
    );

    let metrics = api.metrics().await;
    let ratio: f64 = metrics
        .lines()
        .find(|l| l.starts_with("cloudphone_query_cache_hit_ratio"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .expect("the hit ratio is exported");
    assert!(ratio > 0.0 && ratio < 1.0, "{ratio}");
    assert!(
        metrics.contains("cloudphone_query_cache_lookups_total{result=\"hit\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("cloudphone_graphql_requests_total"));
}

#[sqlx::test(migrations = false)]
async fn usage_by_provider_answers_once_daily_usage_v2_is_swapped_in_with_no_restart(pool: PgPool) {
    known_data(&pool).await;
    let api = start(&pool, test_config()).await;
    let admin = admin();
    let query = "query($f: ProviderUsageFilter!) { usageByProvider(filter: $f, groupBy: MONTH) {
        period provider minutes sessions cost { amountMinor currency } } }";
    let filter = json!({"f": {"userId": A, "from": "2026-01-01", "to": "2026-12-31"}});
    // Version 1 is live: a clear error, not a 5xx, and the rest of the API is unaffected.
    let answer = api.query(&admin, query, filter.clone()).await;
    assert_eq!(answer.error_code(), "PROJECTION_VERSION", "{answer:?}");
    assert!(answer.status.is_success());

    // A replay swaps version 2 in (the log is empty here: the tables come up empty), then
    // rows arrive; the running API answers from them.
    let summary = projections::replay::replay(
        &pool,
        read_models::Projection::DailyUsage,
        Some(2),
        projections::replay::ReplayConfig::default(),
        &projections::replay::Unobserved,
        &tokio_util::sync::CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_eq!(summary.version, 2);
    sqlx::query(
        "INSERT INTO daily_usage_by_provider (user_id, day, provider, currency, minutes, cost_minor, sessions) VALUES
             ($1, '2026-03-01', 'aws', 'USD', 30, 60, 2), ($1, '2026-03-02', 'aws', 'USD', 10, 20, 1),
             ($1, '2026-03-02', 'gcp', 'EUR', 5, 7, 1), ($2, '2026-03-02', 'gcp', 'EUR', 99, 99, 9)",
    )
    .bind(A)
    .bind(B)
    .execute(&pool)
    .await
    .unwrap();
    set_checkpoints(&pool, 1_000_000).await;
    let answer = api.query(&admin, query, filter.clone()).await;
    assert_eq!(
        answer.data()["usageByProvider"],
        json!([
            {"period": "2026-03-01", "provider": "AWS", "minutes": "40", "sessions": "3",
             "cost": {"amountMinor": "80", "currency": "USD"}},
            {"period": "2026-03-01", "provider": "GCP", "minutes": "5", "sessions": "1",
             "cost": {"amountMinor": "7", "currency": "EUR"}},
        ]),
        "{answer:?}"
    );
    // A user token sees its own breakdown only.
    let answer = api.query(&token(B, Role::User), query, filter).await;
    assert_eq!(answer.data()["usageByProvider"], json!([]), "{answer:?}");
}

#[sqlx::test(migrations = false)]
async fn an_answer_cached_before_a_replay_swap_is_not_served_after_it(pool: PgPool) {
    known_data(&pool).await;
    let api = start(&pool, test_config()).await;
    let admin = admin();
    let query = "query($f: UsageFilter!) { dailyUsage(filter: $f) { totals { minutes } } }";
    let filter = json!({"f": {"from": "2026-01-01", "to": "2026-12-31"}});
    let minutes = |answer: &Answer| big(&answer.data()["dailyUsage"]["totals"]["minutes"]);
    let first = api.query(&admin, query, filter.clone()).await;
    let again = api.query(&admin, query, filter.clone()).await;
    assert_eq!((minutes(&first), again.cache.as_deref()), (204, Some("hit")));

    // The log is empty, so the rebuilt version holds no usage, and the swap leaves every
    // checkpoint at the position it had: only the version tells the answers apart.
    let summary = projections::replay::replay(
        &pool,
        read_models::Projection::DailyUsage,
        Some(2),
        projections::replay::ReplayConfig::default(),
        &projections::replay::Unobserved,
        &tokio_util::sync::CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_eq!(summary.version, 2);
    let positions: Vec<i64> = sqlx::query_scalar("SELECT position FROM projection_checkpoints ORDER BY projection")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(positions, [0, 0]);
    // Once the API has read the new version (its watermark refresh), the old answer is gone.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let after = api.query(&admin, query, filter.clone()).await;
        if minutes(&after) == 0 {
            assert_ne!(after.cache.as_deref(), Some("hit"), "{after:?}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the v1 answer is still served: {after:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Appends `sessions` random usage sessions of A's two devices and B's one (created first if
/// `create`): starts over March 2026's first twenty days, lengths from a minute to thirty
/// hours (so many cross midnight and several hours), odd costs in two currencies. Returns
/// the log position of the last.
async fn append_random_sessions(store: &event_log::EventStore, rng: &mut StdRng, sessions: usize, create: bool) -> i64 {
    let devices = [(dev(1), A), (dev(2), A), (dev(3), B)];
    let append = |device: Uuid, owner: Uuid, expected, event: event_schema::Event| {
        store.append(event_log::AppendBatch::single(event_log::StreamAppend {
            stream_id: device,
            stream_type: event_schema::StreamType::Device,
            owner_id: owner,
            expected,
            events: vec![test_support::fixtures::new_event(event)],
        }))
    };
    let mut position = 0;
    if create {
        for (device, owner) in devices {
            let created = event_schema::DeviceCreated {
                device_id: device,
                owner_id: owner,
                provider: event_schema::Provider::Aws,
                cpu_cores: 2,
                memory_mb: 2048,
                android_version: 14,
                created_at: at(0),
            };
            let appended = append(device, owner, event_log::ExpectedVersion::NoStream, created.into());
            position = appended.await.unwrap().last_position;
        }
    }
    let march = at(0) + chrono::Duration::days(59); // 2026-03-01T00:00:00Z
    for _ in 0..sessions {
        let (device, owner) = *devices.choose(rng).unwrap();
        let started_at = march + chrono::Duration::seconds(rng.random_range(0..20 * 86_400));
        let length = chrono::Duration::seconds(rng.random_range(60..30 * 3_600));
        let minutes = u32::try_from((length.num_seconds() + 59) / 60).unwrap();
        let currency = if rng.random_bool(0.2) {
            event_schema::Currency::EUR
        } else {
            event_schema::Currency::USD
        };
        let usage = event_schema::UsageRecorded {
            owner_id: owner,
            device_id: device,
            provider: event_schema::Provider::Aws,
            started_at,
            ended_at: started_at + length,
            minutes,
            cost: event_schema::Money {
                amount_minor: rng.random_range(0..10_000),
                currency,
            },
            pricing_plan_id: "aws-standard-v1".to_owned(),
        };
        let appended = append(device, owner, event_log::ExpectedVersion::Any, usage.into());
        position = appended.await.unwrap().last_position;
    }
    position
}

const USAGE_BY: &str = "query($f: UsageFilter!, $g: UsageGroupBy, $p: BigInt) {
    dailyUsage(filter: $f, groupBy: $g, minPosition: $p) {
        rows { period periodStart minutes cost { amountMinor currency } }
        totals { minutes costs { amountMinor currency } } } }";

/// Minutes and cost per (UTC day, currency) of a `dailyUsage` answer, its rows summed by
/// day; checks on the way that each row's `periodStart` is a whole hour of its `period`.
fn by_day(answer: &Answer) -> std::collections::BTreeMap<(String, String), (i64, i64)> {
    let mut days = std::collections::BTreeMap::new();
    let rows = answer.data()["dailyUsage"]["rows"]
        .as_array()
        .unwrap_or_else(|| panic!("{answer:?}"));
    for row in rows {
        let start: chrono::DateTime<Utc> = row["periodStart"].as_str().unwrap().parse().unwrap();
        assert_eq!(start.timestamp() % 3_600, 0, "{row}");
        assert_eq!(start.date_naive().to_string(), row["period"].as_str().unwrap(), "{row}");
        let key = (
            row["period"].as_str().unwrap().to_owned(),
            row["cost"]["currency"].as_str().unwrap().to_owned(),
        );
        let sum: &mut (i64, i64) = days.entry(key).or_default();
        sum.0 += big(&row["minutes"]);
        sum.1 += big(&row["cost"]["amountMinor"]);
    }
    days
}

/// For each filter: the HOUR answer's hours of every day add up to the DAY answer's day,
/// minutes and cost, and the totals are the same. Returns the hour rows seen.
async fn assert_hours_add_up_to_days(api: &TestApi, token: &str, filters: &[Value], position: i64) -> usize {
    let mut hour_rows = 0;
    for filter in filters {
        let ask = |group: &str| {
            api.query(
                token,
                USAGE_BY,
                json!({"f": filter, "g": group, "p": position.to_string()}),
            )
        };
        let (days, hours) = (ask("DAY").await, ask("HOUR").await);
        assert_eq!(by_day(&hours), by_day(&days), "hours by day vs days for {filter}");
        assert_eq!(
            hours.data()["dailyUsage"]["totals"],
            days.data()["dailyUsage"]["totals"],
            "{filter}"
        );
        hour_rows += hours.data()["dailyUsage"]["rows"].as_array().map_or(0, Vec::len);
    }
    hour_rows
}

#[sqlx::test(migrations = false)]
async fn usage_by_hour_answers_once_daily_usage_v3_is_swapped_in_and_its_hours_add_up_to_the_days(pool: PgPool) {
    migrated(&pool).await;
    let store = event_log::EventStore::open(pool.clone(), event_log::StoreConfig::default())
        .await
        .unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let projectors =
        projections::runner::spawn_log_projectors(&pool, projections::runner::ProjectorConfig::default(), &stop);
    let api = start(&pool, test_config()).await;
    let admin = admin();
    let mut rng = StdRng::seed_from_u64(22);
    let position = append_random_sessions(&store, &mut rng, 60, true).await;
    let march = |user: Uuid| json!({"userId": user, "from": "2026-03-01", "to": "2026-03-31"});
    let filters = [
        march(A),
        march(B),
        json!({"deviceId": dev(2), "from": "2026-03-01", "to": "2026-03-31"}),
        json!({"from": "2026-03-05", "to": "2026-03-12"}),
    ];

    // Version 1 is live: DAY answers at the position, HOUR is a clear error naming the replay.
    // (Asked over a range the checks below do not ask: the cache keys answers by checkpoint
    // positions, which a swap with no new event leaves where they were.)
    let early_march = json!({"userId": A, "from": "2026-03-01", "to": "2026-03-30"});
    let days = api
        .query(
            &admin,
            USAGE_BY,
            json!({"f": early_march, "g": "DAY", "p": position.to_string()}),
        )
        .await;
    assert!(!by_day(&days).is_empty(), "{days:?}");
    let hours = api
        .query(
            &admin,
            USAGE_BY,
            json!({"f": march(A), "g": "HOUR", "p": position.to_string()}),
        )
        .await;
    assert_eq!(hours.error_code(), "PROJECTION_VERSION", "{hours:?}");
    assert!(
        hours.body.to_string().contains("cloudphone replay daily-usage"),
        "{}",
        hours.body
    );
    let nested = "query($u: UUID!) { user(id: $u) { usage(from: \"2026-03-01\", to: \"2026-03-31\", groupBy: HOUR) { rows { periodStart } } } }";
    let answer = api.query(&admin, nested, json!({"u": A})).await;
    assert_eq!(answer.error_code(), "PROJECTION_VERSION", "{answer:?}");

    // The replay builds the newest version (3) from the log while the projectors run, and
    // swaps it in; the running API answers by hour.
    let summary = projections::replay::replay(
        &pool,
        read_models::Projection::DailyUsage,
        None,
        projections::replay::ReplayConfig::default(),
        &projections::replay::Unobserved,
        &tokio_util::sync::CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_eq!((summary.version, summary.replaced_version), (3, 1));
    let rows = assert_hours_add_up_to_days(&api, &admin, &filters, position).await;
    let day_rows: usize = by_day(&days).len();
    assert!(rows > day_rows * 2, "hours are finer than days: {rows} hour rows");

    // Live usage after the swap, applied by the projectors at version 3: still in agreement.
    let position = append_random_sessions(&store, &mut rng, 40, false).await;
    assert_hours_add_up_to_days(&api, &admin, &filters, position).await;
    // Nested usage by hour is the same answer as the root field's.
    let root = api
        .query(
            &admin,
            USAGE_BY,
            json!({"f": march(A), "g": "HOUR", "p": position.to_string()}),
        )
        .await;
    let answer = api.query(&admin, nested, json!({"u": A})).await;
    let starts = |rows: &Value| -> Vec<Value> {
        rows.as_array()
            .unwrap()
            .iter()
            .map(|r| r["periodStart"].clone())
            .collect()
    };
    assert_eq!(
        starts(&answer.data()["user"]["usage"]["rows"]),
        starts(&root.data()["dailyUsage"]["rows"]),
        "{answer:?}"
    );

    // A user token sees its own hours only, whatever it asks.
    let user_b = token(B, Role::User);
    let own = api
        .query(
            &user_b,
            USAGE_BY,
            json!({"f": {"from": "2026-03-01", "to": "2026-03-31"}, "g": "HOUR", "p": position.to_string()}),
        )
        .await;
    let as_admin = api
        .query(
            &admin,
            USAGE_BY,
            json!({"f": march(B), "g": "HOUR", "p": position.to_string()}),
        )
        .await;
    assert!(!by_day(&own).is_empty());
    assert_eq!(own.data()["dailyUsage"], as_admin.data()["dailyUsage"]);
    let others = api
        .query(
            &user_b,
            USAGE_BY,
            json!({"f": march(A), "g": "HOUR", "p": position.to_string()}),
        )
        .await;
    assert_eq!(others.data()["dailyUsage"]["rows"], json!([]), "{others:?}");
    assert_hours_add_up_to_days(
        &api,
        &user_b,
        &[json!({"from": "2026-03-01", "to": "2026-03-31"})],
        position,
    )
    .await;

    stop.cancel();
    for task in projectors {
        task.await.unwrap();
    }
}

#[sqlx::test(migrations = false)]
async fn a_huge_hourly_range_is_refused_before_anything_is_read(pool: PgPool) {
    known_data(&pool).await;
    let api = start(&pool, test_config()).await;
    let admin = admin();
    // Refused whether or not version 3 is live: the range is checked first.
    for (from, to) in [
        ("0001-01-01", "9999-12-31"),
        ("2026-01-01", "2026-12-31"),
        ("2026-01-01", "2026-02-01"),
    ] {
        let answer = api
            .query(&admin, USAGE_BY, json!({"f": {"from": from, "to": to}, "g": "HOUR"}))
            .await;
        assert_eq!(answer.error_code(), "BAD_USER_INPUT", "{from}..{to}: {answer:?}");
        let nested = format!(
            "{{ user(id: \"{A}\") {{ usage(from: \"{from}\", to: \"{to}\", groupBy: HOUR) {{ rows {{ minutes }} }} }} }}"
        );
        let answer = api.query(&admin, &nested, json!({})).await;
        assert_eq!(answer.error_code(), "BAD_USER_INPUT", "{from}..{to}: {answer:?}");
    }
    let answer = api
        .query(
            &admin,
            USAGE_BY,
            json!({"f": {"from": "2026-01-01", "to": "2026-02-01"}, "g": "HOUR"}),
        )
        .await;
    assert!(answer.body.to_string().contains("at most 744 hours"), "{}", answer.body);
    // usageByProvider sums days only: HOUR is refused with a clear error, not a wrong answer.
    let answer = api
        .query(
            &admin,
            "{ usageByProvider(filter: {from: \"2026-03-01\", to: \"2026-03-02\"}, groupBy: HOUR) { period } }",
            json!({}),
        )
        .await;
    assert_eq!(answer.error_code(), "BAD_USER_INPUT", "{answer:?}");
    // The longest range allowed answers (empty here: version 1 has no hours, so the code says so).
    let answer = api
        .query(
            &admin,
            USAGE_BY,
            json!({"f": {"from": "2026-01-01", "to": "2026-01-31"}, "g": "HOUR"}),
        )
        .await;
    assert_eq!(answer.error_code(), "PROJECTION_VERSION", "{answer:?}");
}

#[sqlx::test(migrations = false)]
async fn browser_apps_on_listed_origins_only_may_call(pool: PgPool) {
    migrated(&pool).await;
    let listed = "https://dash.example.com";
    let config = query_api::QueryApiConfig {
        cors_origins: http_edge::cors::parse_origins(&[listed.to_owned()]).unwrap(),
        ..test_config()
    };
    let api = start(&pool, config).await;
    let default = start(&pool, test_config()).await;
    let preflight = |api: &TestApi, origin: &str| {
        api.client
            .request(reqwest::Method::OPTIONS, format!("http://{}/graphql", api.addr))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization, content-type, x-min-position",
            )
            .send()
    };
    let allowed = preflight(&api, listed).await.unwrap();
    assert_eq!(allowed.headers()["access-control-allow-origin"], listed);
    let headers = allowed.headers()["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        headers.contains("authorization") && headers.contains("x-min-position"),
        "{headers}"
    );
    for (api, origin) in [(&api, "https://evil.example.com"), (&default, listed)] {
        let refused = preflight(api, origin).await.unwrap();
        assert!(
            refused.headers().get("access-control-allow-origin").is_none(),
            "{origin} was allowed"
        );
    }
    // A real request from the listed origin carries the header and exposes the position.
    let answer = api
        .client
        .post(format!("http://{}/graphql", api.addr))
        .header("origin", listed)
        .bearer_auth(admin())
        .json(&json!({"query": "{ projectionStatus { name } }"}))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.headers()["access-control-allow-origin"], listed);
    let exposed = answer.headers()["access-control-expose-headers"].to_str().unwrap();
    assert!(exposed.contains("x-read-position"), "{exposed}");
}
