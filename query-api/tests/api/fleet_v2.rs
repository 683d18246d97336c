//! Version 2 of `fleet` through the API: `users` (admins only), `User.tier`/`quota`/
//! `registeredAt`/`erased` and `fleetHistory` answer `PROJECTION_VERSION` until a replay
//! swaps the version in, then answer what the log says with no restart, kept live by the
//! embedded projector; a user token sees only its own user and history.

use std::collections::BTreeSet;
use std::sync::Arc;

use chrono::{DateTime, Duration, TimeZone, Utc};
use event_log::{AppendBatch, EventStore, ExpectedVersion, StoreConfig, StreamAppend};
use event_schema::{
    DeviceCreated, DeviceDeleted, DeviceFailed, DeviceStarted, DeviceStopped, Event, Personal, Provider, Quota,
    QuotaChanged, StopReason, StreamType, Tier, TierChanged, UserErased, UserRegistered,
};
use http_edge::auth::{Role, scope};
use projections::replay::{self, ReplayConfig, Unobserved};
use projections::runner::{ProjectorConfig, spawn_log_projectors};
use read_models::Projection;
use serde_json::{Value, json};
use sqlx::PgPool;
use test_support::fixtures::new_event;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::support::*;

/// The log's writer and the embedded projectors following it.
struct Writer {
    store: Arc<EventStore>,
    stop: CancellationToken,
    head: i64,
}

impl Writer {
    async fn start(pool: &PgPool) -> (Self, Vec<tokio::task::JoinHandle<()>>) {
        migrated(pool).await;
        let stop = CancellationToken::new();
        let projectors = spawn_log_projectors(pool, ProjectorConfig::default(), &stop);
        let store = Arc::new(EventStore::open(pool.clone(), StoreConfig::default()).await.unwrap());
        (Writer { store, stop, head: 0 }, projectors)
    }

    async fn append(&mut self, stream: Uuid, stream_type: StreamType, owner: Uuid, event: impl Into<Event>) {
        let outcome = self
            .store
            .append(AppendBatch::single(StreamAppend {
                stream_id: stream,
                stream_type,
                owner_id: owner,
                expected: ExpectedVersion::Any,
                events: vec![new_event(event)],
            }))
            .await
            .unwrap();
        self.head = outcome.last_position;
    }

    async fn user(&mut self, user: Uuid, event: impl Into<Event>) {
        self.append(user, StreamType::User, user, event).await;
    }

    async fn device(&mut self, device: Uuid, owner: Uuid, event: impl Into<Event>) {
        self.append(device, StreamType::Device, owner, event).await;
    }

    /// `x-min-position` for the last append: the answer reflects it.
    fn seen(&self) -> [(&'static str, String); 1] {
        [("x-min-position", self.head.to_string())]
    }
}

async fn ask(api: &TestApi, token: &str, writer: &Writer, query: &str, variables: Value) -> Answer {
    let [(name, value)] = writer.seen();
    api.post_json(
        Some(token),
        &json!({"query": query, "variables": variables}),
        &[(name, value.as_str())],
    )
    .await
}

async fn replay_fleet_v2(pool: &PgPool) {
    let summary = replay::replay(
        pool,
        Projection::Fleet,
        Some(2),
        ReplayConfig::default(),
        &Unobserved,
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_eq!(summary.version, 2);
}

fn registered(user: Uuid, tier: Tier, at: DateTime<Utc>) -> UserRegistered {
    UserRegistered {
        user_id: user,
        tier,
        email: Personal::new(format!("{user}@example.com")),
        phone: Personal::new("+4915112345678".into()),
        registered_at: at,
    }
}

fn quota(max_devices: u32) -> Quota {
    Quota {
        max_devices,
        max_cpu_cores: 4 * max_devices,
        max_memory_mb: 8_192 * max_devices,
    }
}

const USERS_PAGE: &str = "query($first: Int, $after: String, $last: Int, $before: String, $filter: UsersFilter) {
    users(first: $first, after: $after, last: $last, before: $before, filter: $filter) {
        totalCount pageInfo { hasNextPage hasPreviousPage startCursor endCursor }
        edges { cursor node { id tier quota { maxDevices maxCpuCores maxMemoryMb } registeredAt erased erasedAt } } } }";

const USER: &str = "query($id: UUID!) { user(id: $id) { id tier quota { maxDevices maxCpuCores maxMemoryMb } registeredAt erased erasedAt } }";

#[sqlx::test(migrations = false)]
async fn users_answer_what_the_log_says_once_fleet_v2_is_swapped_in_and_only_to_admins(pool: PgPool) {
    let (mut writer, _projectors) = Writer::start(&pool).await;
    let api = start(&pool, test_config()).await;
    let admin = admin();
    // Eleven users: tiers in turn, each with a quota; some change tier, some are erased.
    let base = Utc.with_ymd_and_hms(2026, 2, 1, 8, 0, 0).unwrap();
    let tiers = [Tier::Free, Tier::Basic, Tier::Pro, Tier::Enterprise];
    let mut users: Vec<Uuid> = (0..11).map(|_| Uuid::now_v7()).collect();
    users.sort();
    let mut expected = Vec::new();
    for (i, user) in users.iter().enumerate() {
        let at = base + Duration::minutes(i as i64);
        writer.user(*user, registered(*user, tiers[i % 4], at)).await;
        writer
            .user(
                *user,
                QuotaChanged {
                    user_id: *user,
                    quota: quota(i as u32 + 1),
                },
            )
            .await;
        let mut tier = tiers[i % 4];
        if i % 3 == 0 {
            writer
                .user(
                    *user,
                    TierChanged {
                        user_id: *user,
                        from: tier,
                        to: Tier::Pro,
                    },
                )
                .await;
            tier = Tier::Pro;
        }
        let erased = (i % 5 == 1).then(|| at + Duration::days(1));
        if let Some(erased_at) = erased {
            writer
                .user(
                    *user,
                    UserErased {
                        user_id: *user,
                        erased_at,
                    },
                )
                .await;
        }
        expected.push(json!({
            "id": user, "tier": tier.as_str().to_uppercase(),
            "quota": {"maxDevices": (i + 1).to_string(), "maxCpuCores": (4 * (i + 1)).to_string(),
                      "maxMemoryMb": (8_192 * (i + 1)).to_string()},
            "registeredAt": at.to_rfc3339(),
            "erased": erased.is_some(),
            "erasedAt": erased.map(|e| e.to_rfc3339()),
        }));
    }

    // Version 1 live: a clear error naming the replay, for the list and for the fields.
    let answer = ask(&api, &admin, &writer, USERS_PAGE, json!({"first": 5})).await;
    assert_eq!(answer.error_code(), "PROJECTION_VERSION", "{answer:?}");
    let message = answer.body["errors"][0]["message"].as_str().unwrap_or_default();
    assert!(message.contains("cloudphone replay fleet"), "{message}");
    let answer = ask(&api, &admin, &writer, USER, json!({"id": users[0]})).await;
    assert_eq!(answer.error_code(), "PROJECTION_VERSION", "{answer:?}");
    assert_eq!(
        answer.body["data"]["user"]["id"],
        json!(users[0]),
        "the rest still answers"
    );

    replay_fleet_v2(&pool).await;

    // Forward in pages of 4, then backward from the end: every user once, in id order.
    let mut forward = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let answer = ask(&api, &admin, &writer, USERS_PAGE, json!({"first": 4, "after": after})).await;
        let users_page = &answer.data()["users"];
        assert_eq!(users_page["totalCount"], "11");
        forward.extend(
            users_page["edges"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["node"].clone()),
        );
        assert_eq!(users_page["pageInfo"]["hasPreviousPage"], after.is_some());
        if users_page["pageInfo"]["hasNextPage"] == false {
            break;
        }
        after = users_page["pageInfo"]["endCursor"].as_str().map(str::to_owned);
    }
    assert_eq!(forward, expected, "forward pages");
    let mut backward = Vec::new();
    let mut before: Option<String> = None;
    loop {
        let answer = ask(&api, &admin, &writer, USERS_PAGE, json!({"last": 3, "before": before})).await;
        let users_page = &answer.data()["users"];
        let mut nodes: Vec<Value> = users_page["edges"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["node"].clone())
            .collect();
        nodes.append(&mut backward);
        backward = nodes;
        if users_page["pageInfo"]["hasPreviousPage"] == false {
            break;
        }
        before = users_page["pageInfo"]["startCursor"].as_str().map(str::to_owned);
    }
    assert_eq!(backward, expected, "backward pages");

    // Filters: tiers and erasure.
    let answer = ask(
        &api,
        &admin,
        &writer,
        USERS_PAGE,
        json!({"first": 100, "filter": {"tier": ["PRO"], "erased": false}}),
    )
    .await;
    let listed: Vec<&Value> = answer.data()["users"]["edges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["node"])
        .collect();
    let wanted: Vec<&Value> = expected
        .iter()
        .filter(|u| u["tier"] == "PRO" && u["erased"] == false)
        .collect();
    assert!(!wanted.is_empty());
    assert_eq!(listed, wanted);
    assert_eq!(answer.data()["users"]["totalCount"], wanted.len().to_string());

    // Live after the swap: a new registration and an erasure show with no restart.
    let late = Uuid::now_v7();
    writer
        .user(late, registered(late, Tier::Free, base + Duration::days(3)))
        .await;
    writer
        .user(
            users[0],
            UserErased {
                user_id: users[0],
                erased_at: base + Duration::days(4),
            },
        )
        .await;
    let answer = ask(
        &api,
        &admin,
        &writer,
        USERS_PAGE,
        json!({"first": 100, "filter": {"erased": true}}),
    )
    .await;
    let erased: BTreeSet<String> = answer.data()["users"]["edges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["node"]["id"].as_str().unwrap().to_owned())
        .collect();
    assert!(erased.contains(&users[0].to_string()) && erased.contains(&users[1].to_string()));
    let answer = ask(&api, &admin, &writer, USER, json!({"id": late})).await;
    assert_eq!(answer.data()["user"]["tier"], "FREE");
    assert_eq!(answer.data()["user"]["quota"], Value::Null, "no quota set yet");

    // A user token: its own User, never the list nor another user's fields.
    let mine = token(users[2], Role::User);
    let answer = ask(&api, &mine, &writer, USERS_PAGE, json!({"first": 5})).await;
    assert_eq!(answer.error_code(), "FORBIDDEN", "{answer:?}");
    assert_eq!(answer.body["data"], Value::Null);
    let answer = ask(&api, &mine, &writer, USER, json!({"id": users[2]})).await;
    assert_eq!(answer.data()["user"], expected[2]);
    for other in [users[3], users[1], late] {
        let answer = ask(&api, &mine, &writer, USER, json!({"id": other})).await;
        assert_eq!(answer.data()["user"], Value::Null, "another user's User");
    }
    // Nor through a device: a device of someone else is null, so is its owner.
    let theirs = Uuid::now_v7();
    let created = DeviceCreated {
        device_id: theirs,
        owner_id: users[3],
        provider: Provider::Aws,
        cpu_cores: 2,
        memory_mb: 2048,
        android_version: 14,
        created_at: base,
    };
    writer.device(theirs, users[3], created).await;
    let answer = ask(
        &api,
        &mine,
        &writer,
        "query($id: UUID!) { device(id: $id) { owner { tier erased } } }",
        json!({"id": theirs}),
    )
    .await;
    assert_eq!(answer.data()["device"], Value::Null);
    // A service token with dashboards:read reads dashboards, not the user list.
    let service = test_support::tokens::signed(SECRET, "bi", Role::Service, &[scope::DASHBOARDS_READ]);
    let answer = ask(&api, &service, &writer, USERS_PAGE, json!({"first": 5})).await;
    assert_eq!(answer.error_code(), "FORBIDDEN", "{answer:?}");
    writer.stop.cancel();
}

fn at(hour: u32, minute: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 2, hour, minute, 0).unwrap()
}

const HISTORY: &str = "query($f: FleetHistoryFilter!, $g: FleetHistoryGroupBy) {
    fleetHistory(filter: $f, groupBy: $g) { at stopped running failed total } }";

/// `[stopped, running, failed]` per point.
fn counts(answer: &Answer) -> Vec<[i64; 3]> {
    answer.data()["fleetHistory"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let n = |k: &str| big(&p[k]);
            assert_eq!(n("total"), n("stopped") + n("running") + n("failed"));
            [n("stopped"), n("running"), n("failed")]
        })
        .collect()
}

/// `deviceStats` counts per status `[stopped, running, failed]`.
async fn stats_counts(api: &TestApi, token: &str, writer: &Writer, user: Option<Uuid>) -> [i64; 3] {
    let answer = ask(
        api,
        token,
        writer,
        "query($f: DeviceFilterInput) { deviceStats(filter: $f) { rows { status deviceCount } } }",
        json!({"f": {"userId": user}}),
    )
    .await;
    let mut sums = [0; 3];
    for row in answer.data()["deviceStats"]["rows"].as_array().unwrap() {
        let slot = match row["status"].as_str().unwrap() {
            "STOPPED" => 0,
            "RUNNING" => 1,
            "FAILED" => 2,
            other => panic!("{other} is not counted"),
        };
        sums[slot] += big(&row["deviceCount"]);
    }
    sums
}

#[sqlx::test(migrations = false)]
async fn the_fleet_history_counts_each_hour_as_scripted_and_agrees_with_device_stats(pool: PgPool) {
    let (mut writer, _projectors) = Writer::start(&pool).await;
    let api = start(&pool, test_config()).await;
    let admin = admin();
    let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
    let (d1, d2, d3, d4) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    let created = |device, owner, at| DeviceCreated {
        device_id: device,
        owner_id: owner,
        provider: Provider::Gcp,
        cpu_cores: 2,
        memory_mb: 2048,
        android_version: 14,
        created_at: at,
    };
    // Before the swap: A's d1 created 10:05, started 10:30; d2 created 11:00; B's d4 created 10:10.
    writer.device(d1, a, created(d1, a, at(10, 5))).await;
    writer
        .device(
            d1,
            a,
            DeviceStarted {
                device_id: d1,
                started_at: at(10, 30),
            },
        )
        .await;
    writer.device(d2, a, created(d2, a, at(11, 0))).await;
    writer.device(d4, b, created(d4, b, at(10, 10))).await;
    let range = json!({"userId": a, "from": at(10, 0), "to": at(16, 0)});
    let answer = ask(&api, &admin, &writer, HISTORY, json!({"f": range})).await;
    assert_eq!(answer.error_code(), "PROJECTION_VERSION", "{answer:?}");
    let message = answer.body["errors"][0]["message"].as_str().unwrap_or_default();
    assert!(message.contains("cloudphone replay fleet"), "{message}");

    replay_fleet_v2(&pool).await;

    // After the swap, live: d2 started 11:15 and failed 13:20; d1 stopped 12:10; d3 created
    // 12:00 and deleted 14:40; B's d4 started 13:00.
    writer
        .device(
            d2,
            a,
            DeviceStarted {
                device_id: d2,
                started_at: at(11, 15),
            },
        )
        .await;
    let stopped = DeviceStopped {
        device_id: d1,
        reason: StopReason::Requested,
        stopped_at: at(12, 10),
    };
    writer.device(d1, a, stopped).await;
    writer.device(d3, a, created(d3, a, at(12, 0))).await;
    writer
        .device(
            d4,
            b,
            DeviceStarted {
                device_id: d4,
                started_at: at(13, 0),
            },
        )
        .await;
    let failed = DeviceFailed {
        device_id: d2,
        reason: "host lost".into(),
        failed_at: at(13, 20),
    };
    writer.device(d2, a, failed).await;
    writer
        .device(
            d3,
            a,
            DeviceDeleted {
                device_id: d3,
                deleted_at: at(14, 40),
            },
        )
        .await;

    // A by the hour, 10:00 to 16:00: [stopped, running, failed] at the end of each hour.
    let mine = token(a, Role::User);
    let a_hours = [[0, 1, 0], [0, 2, 0], [2, 1, 0], [2, 0, 1], [1, 0, 1], [1, 0, 1]];
    let answer = ask(&api, &mine, &writer, HISTORY, json!({"f": range})).await;
    assert_eq!(counts(&answer), a_hours);
    let points = answer.data()["fleetHistory"].as_array().unwrap().clone();
    assert_eq!(points[0]["at"], "2026-03-02T10:00:00+00:00");
    assert_eq!(points[5]["at"], "2026-03-02T15:00:00+00:00");
    // The same without a user id (a user's own fleet), and the admin asking for A.
    let own = json!({"from": at(10, 0), "to": at(16, 0)});
    assert_eq!(
        counts(&ask(&api, &mine, &writer, HISTORY, json!({"f": own})).await),
        a_hours
    );
    assert_eq!(
        counts(&ask(&api, &admin, &writer, HISTORY, json!({"f": range})).await),
        a_hours
    );
    // A range starting mid-way: the changes before it are its base.
    let later = json!({"userId": a, "from": at(12, 30), "to": at(14, 0)});
    assert_eq!(
        counts(&ask(&api, &mine, &writer, HISTORY, json!({"f": later})).await),
        [[2, 1, 0], [2, 0, 1]]
    );
    // Every user's fleet (the all-users table): A's plus B's d4 (stopped from 10, running from 13).
    let everyone = json!({"from": at(10, 0), "to": at(16, 0)});
    assert_eq!(
        counts(&ask(&api, &admin, &writer, HISTORY, json!({"f": everyone})).await),
        [[1, 1, 0], [1, 2, 0], [3, 1, 0], [2, 1, 1], [1, 1, 1], [1, 1, 1]]
    );
    // By the day: the count at the end of the day.
    let day = json!({"userId": a, "from": at(0, 0), "to": at(23, 0)});
    assert_eq!(
        counts(&ask(&api, &mine, &writer, HISTORY, json!({"f": day, "g": "DAY"})).await),
        [[1, 0, 1]]
    );
    // The last point equals deviceStats, for A and for everyone.
    assert_eq!(a_hours[5], stats_counts(&api, &mine, &writer, None).await);
    assert_eq!([1, 1, 1], stats_counts(&api, &admin, &writer, None).await);

    // Live events keep the two in agreement: B's device stops, A's failed one is deleted.
    let now = Utc::now();
    writer
        .device(
            d4,
            b,
            DeviceStopped {
                device_id: d4,
                reason: StopReason::Idle,
                stopped_at: now,
            },
        )
        .await;
    writer
        .device(
            d2,
            a,
            DeviceDeleted {
                device_id: d2,
                deleted_at: now,
            },
        )
        .await;
    let up_to_now = json!({"from": now - Duration::hours(2), "to": now + Duration::minutes(1)});
    for (token, user) in [(&admin, None), (&mine, Some(a))] {
        let mut range = up_to_now.clone();
        range["userId"] = json!(user);
        let answer = ask(&api, token, &writer, HISTORY, json!({"f": range})).await;
        let last = *counts(&answer).last().unwrap();
        assert_eq!(last, stats_counts(&api, token, &writer, user).await, "{user:?}");
    }

    // Hostile: another user's history is empty, whatever the range; a huge range is refused.
    let theirs = json!({"userId": b, "from": at(10, 0), "to": at(16, 0)});
    let answer = ask(&api, &mine, &writer, HISTORY, json!({"f": theirs})).await;
    assert_eq!(answer.data()["fleetHistory"], json!([]));
    let huge = json!({"from": "2020-01-01T00:00:00Z", "to": "2026-01-01T00:00:00Z"});
    for group in ["HOUR", "DAY"] {
        let answer = ask(&api, &admin, &writer, HISTORY, json!({"f": huge, "g": group})).await;
        assert_eq!(answer.error_code(), "BAD_USER_INPUT", "{answer:?}");
    }
    let backwards = json!({"from": at(16, 0), "to": at(10, 0)});
    let answer = ask(&api, &admin, &writer, HISTORY, json!({"f": backwards})).await;
    assert_eq!(answer.error_code(), "BAD_USER_INPUT", "{answer:?}");
    writer.stop.cancel();
}

#[sqlx::test(migrations = false)]
async fn a_subscribed_fleet_history_is_pushed_when_the_owners_devices_change_and_only_then(pool: PgPool) {
    let (mut writer, _projectors) = Writer::start(&pool).await;
    let api = start(&pool, test_config()).await;
    replay_fleet_v2(&pool).await;
    let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
    let hour = Utc::now();
    let range = json!({"f": {"from": hour - Duration::hours(1), "to": hour + Duration::hours(1)}});
    let subscription =
        "subscription($f: FleetHistoryFilter!) { fleetHistory(filter: $f) { at stopped running total } }";
    let mut socket = test_support::live::LiveClient::connect(api.addr, &token(a, Role::User)).await;
    socket.subscribe("h", subscription, range).await;
    let latest = |payload: &Value| {
        let points = payload["data"]["fleetHistory"].as_array().cloned().unwrap_or_default();
        points.last().map(|p| (big(&p["stopped"]), big(&p["running"])))
    };
    assert_eq!(latest(&socket.next_of("h").await), Some((0, 0)));
    // Another user's device: not A's history. Then A's device, created and started.
    let theirs = Uuid::now_v7();
    writer
        .device(
            theirs,
            b,
            DeviceCreated {
                device_id: theirs,
                owner_id: b,
                provider: Provider::Aws,
                cpu_cores: 2,
                memory_mb: 2048,
                android_version: 14,
                created_at: hour,
            },
        )
        .await;
    let mine = Uuid::now_v7();
    writer
        .device(
            mine,
            a,
            DeviceCreated {
                device_id: mine,
                owner_id: a,
                provider: Provider::Aws,
                cpu_cores: 2,
                memory_mb: 2048,
                android_version: 14,
                created_at: hour,
            },
        )
        .await;
    let pushed = socket.next_of("h").await;
    assert_eq!(latest(&pushed), Some((1, 0)), "B's device was not counted: {pushed}");
    writer
        .device(
            mine,
            a,
            DeviceStarted {
                device_id: mine,
                started_at: hour,
            },
        )
        .await;
    let pushed = socket.next_until("h", |p| latest(p) != Some((1, 0))).await;
    assert_eq!(latest(&pushed), Some((0, 1)), "{pushed}");
    writer.stop.cancel();
}
