//! Device lists in every order and under combined filters, over a real PostgreSQL: paging
//! either way returns each device exactly once, in order (ties on the sort value, and devices
//! never started, included), filters combine, and a user token still sees its own devices only.

use chrono::{DateTime, Utc};
use http_edge::auth::Role;
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

use crate::support::*;

const STATUSES: [&str; 4] = ["running", "stopped", "failed", "deleted"];
const PROVIDERS: [&str; 3] = ["aws", "gcp", "azure"];

/// A device as the test expects to see it.
#[derive(Debug, Clone)]
struct Expected {
    id: Uuid,
    owner: Uuid,
    status: &'static str,
    provider: &'static str,
    created_at: DateTime<Utc>,
    last_started_at: Option<DateTime<Utc>>,
    minutes_used: i64,
}

/// 60 devices of A, B and C with few distinct sort values (many ties), a third never started.
async fn fleet(pool: &PgPool) -> Vec<Expected> {
    migrated(pool).await;
    let owners = [A, B, Uuid::from_u128(0xc)];
    let devices: Vec<Expected> = (0..60u128)
        .map(|n| {
            let i = i64::try_from(n).unwrap();
            Expected {
                // Ids not in creation order, so the tie-breaker is visible.
                id: Uuid::from_u128(0xd000 + (n * 37) % 61),
                owner: owners[(n % 3) as usize],
                status: STATUSES[(n % 4) as usize],
                provider: PROVIDERS[(n % 5 % 3) as usize],
                created_at: at((i % 20) * 1_000_000),
                last_started_at: (n % 3 != 1).then(|| at((i % 7) * 60_000_000)),
                minutes_used: i % 6 * 10,
            }
        })
        .collect();
    let seeds: Vec<SeedDevice> = devices
        .iter()
        .map(|d| SeedDevice {
            id: d.id,
            owner: d.owner,
            provider: d.provider,
            status: d.status,
            cpu: 2,
            memory: 1024,
            created_at: d.created_at,
        })
        .collect();
    insert_devices(pool, &seeds).await;
    for d in &devices {
        sqlx::query("UPDATE devices SET last_started_at = $2, minutes_used = $3 WHERE device_id = $1")
            .bind(d.id)
            .bind(d.last_started_at)
            .bind(d.minutes_used)
            .execute(pool)
            .await
            .unwrap();
    }
    derive_device_stats(pool).await;
    set_checkpoints(pool, 1).await;
    devices
}

const ORDERS: [&str; 6] = [
    "CREATED_AT_ASC",
    "CREATED_AT_DESC",
    "LAST_STARTED_AT_ASC",
    "LAST_STARTED_AT_DESC",
    "MINUTES_USED_ASC",
    "MINUTES_USED_DESC",
];

/// The devices in `order`, as the API must list them.
fn sorted(devices: &[Expected], order: &str) -> Vec<String> {
    let mut devices = devices.to_vec();
    // Never started sorts as the beginning of time.
    let started = |d: &Expected| d.last_started_at.unwrap_or(DateTime::<Utc>::MIN_UTC);
    devices.sort_by(|a, b| match order {
        "CREATED_AT_ASC" | "CREATED_AT_DESC" => (a.created_at, a.id).cmp(&(b.created_at, b.id)),
        "LAST_STARTED_AT_ASC" | "LAST_STARTED_AT_DESC" => (started(a), a.id).cmp(&(started(b), b.id)),
        _ => (a.minutes_used, a.id).cmp(&(b.minutes_used, b.id)),
    });
    if order.ends_with("DESC") {
        devices.reverse();
    }
    devices.iter().map(|d| d.id.to_string()).collect()
}

const PAGE: &str = "query($f: DeviceFilterInput, $o: DevicesOrderBy, $first: Int, $after: String,
                          $last: Int, $before: String) {
    devices(filter: $f, orderBy: $o, first: $first, after: $after, last: $last, before: $before) {
        totalCount nodes { id } pageInfo { hasNextPage hasPreviousPage startCursor endCursor } } }";

/// Every device the filter matches, walking pages of 7 forward, then backward from the end.
async fn walk(api: &TestApi, token: &str, filter: &Value, order: &str) -> (Vec<String>, Vec<String>, i64) {
    let mut forward = Vec::new();
    let mut after = Value::Null;
    let total = loop {
        let vars = json!({"f": filter, "o": order, "first": 7, "after": after});
        let answer = api.query(token, PAGE, vars).await;
        let devices = &answer.data()["devices"];
        forward.extend(ids(&devices["nodes"]));
        if devices["pageInfo"]["hasNextPage"] != true {
            break big(&devices["totalCount"]);
        }
        after = devices["pageInfo"]["endCursor"].clone();
        assert!(forward.len() <= 60, "paging does not end: {order}");
    };
    let mut backward = Vec::new();
    let mut before = Value::Null;
    loop {
        let vars = json!({"f": filter, "o": order, "last": 7, "before": before});
        let answer = api.query(token, PAGE, vars).await;
        let devices = &answer.data()["devices"];
        let mut page = ids(&devices["nodes"]);
        page.extend(backward);
        backward = page;
        if devices["pageInfo"]["hasPreviousPage"] != true {
            break;
        }
        before = devices["pageInfo"]["startCursor"].clone();
        assert!(backward.len() <= 60, "paging back does not end: {order}");
    }
    (forward, backward, total)
}

#[sqlx::test(migrations = false)]
async fn paging_through_every_order_returns_every_device_once_in_order(pool: PgPool) {
    let devices = fleet(&pool).await;
    let api = start(&pool, test_config()).await;
    for order in ORDERS {
        let (forward, backward, total) = walk(&api, &admin(), &Value::Null, order).await;
        let expected = sorted(&devices, order);
        assert_eq!(forward, expected, "{order} forward");
        assert_eq!(backward, expected, "{order} backward");
        assert_eq!(total, 60);
    }
    // A cursor of one order is refused by another.
    let vars = json!({"o": "MINUTES_USED_ASC", "first": 1});
    let answer = api.query(&admin(), PAGE, vars).await;
    let cursor = answer.data()["devices"]["pageInfo"]["endCursor"].clone();
    let vars = json!({"o": "MINUTES_USED_DESC", "first": 1, "after": cursor});
    assert_eq!(api.query(&admin(), PAGE, vars).await.error_code(), "BAD_USER_INPUT");
}

#[sqlx::test(migrations = false)]
async fn filters_on_lists_and_ranges_combine(pool: PgPool) {
    let devices = fleet(&pool).await;
    let api = start(&pool, test_config()).await;
    let from = at(3_000_000);
    let to = at(15_000_000);
    let started_from = at(60_000_000);
    let filter = json!({
        "status": ["RUNNING", "FAILED"],
        "provider": ["AWS", "GCP"],
        "createdAt": {"from": from, "to": to},
        "lastStartedAt": {"from": started_from},
    });
    let matching: Vec<Expected> = devices
        .iter()
        .filter(|d| ["running", "failed"].contains(&d.status) && ["aws", "gcp"].contains(&d.provider))
        .filter(|d| d.created_at >= from && d.created_at < to)
        .filter(|d| d.last_started_at.is_some_and(|at| at >= started_from))
        .cloned()
        .collect();
    assert!(matching.len() > 2 && matching.len() < 20, "{}", matching.len());
    for order in ORDERS {
        let (forward, backward, total) = walk(&api, &admin(), &filter, order).await;
        let expected = sorted(&matching, order);
        assert_eq!(forward, expected, "{order}");
        assert_eq!(backward, expected, "{order}");
        assert_eq!(total, i64::try_from(matching.len()).unwrap());
    }

    // A single value is a list of one, in a literal and in a variable.
    let running = devices.iter().filter(|d| d.status == "running").count();
    let answer = api
        .query(
            &admin(),
            "{ devices(filter: {status: RUNNING}) { totalCount } }",
            json!({}),
        )
        .await;
    assert_eq!(
        big(&answer.data()["devices"]["totalCount"]),
        i64::try_from(running).unwrap()
    );
    let answer = api.query(&admin(), PAGE, json!({"f": {"status": "RUNNING"}})).await;
    assert_eq!(
        big(&answer.data()["devices"]["totalCount"]),
        i64::try_from(running).unwrap()
    );
    // An empty list matches nothing; a range upside down is refused.
    let answer = api.query(&admin(), PAGE, json!({"f": {"provider": []}})).await;
    assert_eq!(big(&answer.data()["devices"]["totalCount"]), 0);
    let answer = api
        .query(&admin(), PAGE, json!({"f": {"createdAt": {"from": to, "to": from}}}))
        .await;
    assert_eq!(answer.error_code(), "BAD_USER_INPUT", "{answer:?}");
    // deviceStats has no times to filter by: refused, not ignored.
    let answer = api
        .query(
            &admin(),
            "query($f: DeviceFilterInput) { deviceStats(filter: $f) { totals { deviceCount } } }",
            json!({"f": {"createdAt": {"from": from}}}),
        )
        .await;
    assert_eq!(answer.error_code(), "BAD_USER_INPUT", "{answer:?}");
    // Lists filter deviceStats too (deleted devices are never counted there).
    let answer = api
        .query(
            &admin(),
            "query($f: DeviceFilterInput) { deviceStats(filter: $f) { totals { deviceCount } } }",
            json!({"f": {"status": ["RUNNING", "DELETED"], "provider": "AWS"}}),
        )
        .await;
    let live_running_aws = devices
        .iter()
        .filter(|d| d.status == "running" && d.provider == "aws")
        .count();
    assert_eq!(
        big(&answer.data()["deviceStats"]["totals"]["deviceCount"]),
        i64::try_from(live_running_aws).unwrap()
    );
}

#[sqlx::test(migrations = false)]
async fn a_user_still_sees_only_their_own_devices_in_every_order(pool: PgPool) {
    let devices = fleet(&pool).await;
    let api = start(&pool, test_config()).await;
    let alice = token(A, Role::User);
    let own: Vec<Expected> = devices.iter().filter(|d| d.owner == A).cloned().collect();
    let own_running: Vec<Expected> = own.iter().filter(|d| d.status == "running").cloned().collect();
    for order in ORDERS {
        let (forward, _, total) = walk(&api, &alice, &Value::Null, order).await;
        assert_eq!(forward, sorted(&own, order), "{order}");
        assert_eq!(total, i64::try_from(own.len()).unwrap());
        // Asking for another user's devices returns nothing.
        let (forward, _, _) = walk(&api, &alice, &json!({"userId": B}), order).await;
        assert!(forward.is_empty(), "{order}");

        // Nested under the user, batched with the other users' pages: the same lists.
        let query = "query($o: DevicesOrderBy) { a: user(id: \"00000000-0000-0000-0000-00000000000a\") {
                devices(orderBy: $o, first: 100, filter: {status: [RUNNING], lastStartedAt: {}}) {
                    totalCount nodes { id } } }
            b: user(id: \"00000000-0000-0000-0000-00000000000b\") { devices(orderBy: $o) { nodes { id } } } }";
        let answer = api.query(&admin(), query, json!({"o": order})).await;
        let data = answer.data();
        assert_eq!(
            ids(&data["a"]["devices"]["nodes"]),
            sorted(&own_running, order),
            "{order}"
        );
        assert_eq!(
            big(&data["a"]["devices"]["totalCount"]),
            i64::try_from(own_running.len()).unwrap()
        );
        let answer = api.query(&alice, query, json!({"o": order})).await;
        assert_eq!(answer.data()["b"], Value::Null, "{order}");
    }
}
