//! Subscriptions over WebSocket against a real PostgreSQL and the embedded projectors: what a
//! command changes is pushed to its owner's subscriptions and to no one else's, identical
//! subscriptions are evaluated once, no update is lost when the change listener or a
//! projector restarts, slow and hostile clients are closed with a code that says why, and
//! shutdown closes every socket.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use event_log::{AppendBatch, EventStore, ExpectedVersion, StoreConfig, StreamAppend};
use event_schema::{DeviceStarted, Provider, StreamType};
use http_edge::auth::Role;
use projections::runner::{ProjectorConfig, spawn_log_projectors};
use query_api::QueryApiConfig;
use query_api::subscriptions::LiveConfig;
use serde_json::{Value, json};
use sqlx::PgPool;
use test_support::fixtures::new_event;
use test_support::live::{LiveClient, PATIENCE};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::support::*;

const DEVICES: &str = "subscription { devices(first: 100) { totalCount nodes { id ownerId status } } }";
const EVALUATIONS: &str = "cloudphone_subscription_evaluations_total";

/// A query API with subscriptions on `pool`, once its change listener is in place (its first
/// round, "everything changed", is over, so counts start clean).
async fn live_api(pool: &PgPool, live: LiveConfig) -> TestApi {
    migrated(pool).await;
    let api = start(pool, QueryApiConfig { live, ..test_config() }).await;
    metric_reaches(&api, "cloudphone_subscription_rounds_total", 1.0).await;
    api
}

/// The log's writer and the embedded projectors following it.
struct Writer {
    store: Arc<EventStore>,
    stop: CancellationToken,
    projectors: Vec<tokio::task::JoinHandle<()>>,
}

impl Writer {
    async fn start(pool: &PgPool) -> Self {
        let stop = CancellationToken::new();
        Writer {
            store: Arc::new(EventStore::open(pool.clone(), StoreConfig::default()).await.unwrap()),
            projectors: spawn_log_projectors(pool, ProjectorConfig::default(), &stop),
            stop,
        }
    }

    async fn stop_projectors(&mut self) {
        self.stop.cancel();
        for task in self.projectors.drain(..) {
            task.await.unwrap();
        }
    }

    /// A new device of `owner`; returns its id.
    async fn create_device(&self, owner: Uuid) -> Uuid {
        append_device_created(&self.store, owner).await.0
    }

    async fn start_device(&self, device: Uuid, owner: Uuid) {
        let started = DeviceStarted {
            device_id: device,
            started_at: Utc::now(),
        };
        self.append(device, owner, ExpectedVersion::Any, started).await;
    }

    async fn append(
        &self,
        device: Uuid,
        owner: Uuid,
        expected: ExpectedVersion,
        event: impl Into<event_schema::Event>,
    ) {
        self.store
            .append(AppendBatch::single(StreamAppend {
                stream_id: device,
                stream_type: StreamType::Device,
                owner_id: owner,
                expected,
                events: vec![new_event(event)],
            }))
            .await
            .unwrap();
    }
}

/// A metric's value summed over its series (0 when absent).
async fn metric(api: &TestApi, name: &str) -> f64 {
    api.metric(name).await
}

async fn metric_reaches(api: &TestApi, name: &str, wanted: f64) -> f64 {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let value = metric(api, name).await;
        if value >= wanted {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} stayed at {value}, below {wanted}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn total(payload: &Value) -> i64 {
    big(&payload["data"]["devices"]["totalCount"])
}

/// A fresh query for what `DEVICES` subscribes to.
async fn queried_devices(api: &TestApi, token: &str) -> Value {
    let answer = api
        .query(token, &DEVICES.replacen("subscription", "query", 1), json!({}))
        .await;
    answer.data()["devices"].clone()
}

#[sqlx::test(migrations = false)]
async fn a_change_is_pushed_to_its_owners_subscriptions_and_evaluates_no_one_elses(pool: PgPool) {
    let api = live_api(&pool, LiveConfig::default()).await;
    let writer = Writer::start(&pool).await;
    let (alice, bob) = (Uuid::now_v7(), Uuid::now_v7());
    let mut alice_socket = LiveClient::connect(api.addr, &token(alice, Role::User)).await;
    let mut bob_socket = LiveClient::connect(api.addr, &token(bob, Role::User)).await;
    let mut admin_socket = LiveClient::connect(api.addr, &admin()).await;
    for socket in [&mut alice_socket, &mut bob_socket, &mut admin_socket] {
        socket.subscribe("fleet", DEVICES, json!({})).await;
        assert_eq!(
            total(&socket.next_of("fleet").await),
            0,
            "the current answer comes at once"
        );
    }
    let first_answers = metric(&api, EVALUATIONS).await;
    assert_eq!(first_answers, 3.0, "one evaluation per distinct subscription");

    let device = writer.create_device(alice).await;
    let pushed = alice_socket.next_of("fleet").await;
    assert_eq!(ids(&pushed["data"]["devices"]["nodes"]), vec![device.to_string()]);
    admin_socket.next_until("fleet", |p| total(p) == 1).await;

    let bobs = writer.create_device(bob).await;
    let pushed = bob_socket.next_of("fleet").await;
    assert_eq!(
        ids(&pushed["data"]["devices"]["nodes"]),
        vec![bobs.to_string()],
        "Bob's first push is his own change: Alice's was never his"
    );
    admin_socket.next_until("fleet", |p| total(p) == 2).await;
    // Alice's batch evaluated Alice's and the admin's subscriptions, Bob's batch Bob's and the
    // admin's: had Bob's been evaluated for Alice's change, there would be one more. Rounds
    // run one after another, so the first is over once the second has pushed.
    let evaluations = metric_reaches(&api, EVALUATIONS, first_answers + 4.0).await;
    assert_eq!(evaluations, first_answers + 4.0);

    // A change that leaves an answer as it was is evaluated, not pushed: Alice's status
    // subscription of another device shows nothing new when Bob's device starts.
    writer.start_device(bobs, bob).await;
    let started = bob_socket
        .next_until("fleet", |p| p["data"]["devices"]["nodes"][0]["status"] == "RUNNING")
        .await;
    assert_eq!(total(&started), 1);
    assert!(
        alice_socket.message_within(Duration::from_millis(200)).await.is_none(),
        "Alice got a push for Bob's device"
    );
    // Every pushed answer is what a query returns now.
    assert_eq!(
        started["data"]["devices"],
        queried_devices(&api, &token(bob, Role::User)).await
    );
}

#[sqlx::test(migrations = false)]
async fn identical_subscriptions_share_one_evaluation(pool: PgPool) {
    let api = live_api(&pool, LiveConfig::default()).await;
    let writer = Writer::start(&pool).await;
    let owner = Uuid::now_v7();
    let token = token(owner, Role::User);
    let mut sockets = Vec::new();
    for _ in 0..10 {
        let mut socket = LiveClient::connect(api.addr, &token).await;
        // The same question, written differently: one group.
        socket
            .subscribe("a", &format!("# a comment\n{}", DEVICES.replace(' ', "  ")), json!({}))
            .await;
        // One at a time: `next_of` skips the other subscription's answers.
        socket.next_of("a").await;
        socket.subscribe("b", DEVICES, json!({})).await;
        socket.next_of("b").await;
        sockets.push(socket);
    }
    assert_eq!(metric(&api, "cloudphone_subscription_groups").await, 1.0);
    assert_eq!(metric(&api, "cloudphone_subscriptions").await, 20.0);
    assert_eq!(
        metric(&api, EVALUATIONS).await,
        1.0,
        "the first answer was evaluated once"
    );

    let device = writer.create_device(owner).await;
    for socket in &mut sockets {
        let mut pushed = std::collections::BTreeSet::new();
        while pushed.len() < 2 {
            let message = socket.message().await;
            assert_eq!(message["type"], "next", "{message}");
            let nodes = &message["payload"]["data"]["devices"]["nodes"];
            assert_eq!(ids(nodes), vec![device.to_string()]);
            pushed.insert(message["id"].as_str().unwrap().to_owned());
        }
    }
    assert_eq!(metric(&api, EVALUATIONS).await, 2.0, "20 subscribers, one evaluation");
    assert_eq!(metric(&api, "cloudphone_subscription_pushes_total").await, 20.0 + 20.0);

    // Completing every subscription lets the group go.
    for socket in &mut sockets {
        socket.complete("a").await;
        socket.complete("b").await;
    }
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while metric(&api, "cloudphone_subscription_groups").await > 0.0
        || metric(&api, "cloudphone_subscriptions").await > 0.0
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the group or its subscriptions outlived the completes"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[sqlx::test(migrations = false)]
async fn no_update_is_lost_when_the_listener_or_the_projectors_restart(pool: PgPool) {
    let api = live_api(&pool, LiveConfig::default()).await;
    let mut writer = Writer::start(&pool).await;
    let owner = Uuid::now_v7();
    let token = token(owner, Role::User);
    let mut socket = LiveClient::connect(api.addr, &token).await;
    socket.subscribe("fleet", DEVICES, json!({})).await;
    socket.next_of("fleet").await;

    // The listener's session is killed: notices sent while it reconnects are lost, so the
    // reconnection counts as "everything changed".
    writer.create_device(owner).await;
    let killed: i64 = sqlx::query_scalar(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
         WHERE datname = current_database() AND query LIKE 'LISTEN%'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(killed >= 1, "no listening session found");
    for _ in 0..5 {
        writer.create_device(owner).await;
    }
    socket.next_until("fleet", |p| total(p) == 6).await;

    // The projectors stop while commands go on, then start again from their checkpoints.
    writer.stop_projectors().await;
    for _ in 0..5 {
        writer.create_device(owner).await;
    }
    writer = Writer {
        projectors: spawn_log_projectors(&pool, ProjectorConfig::default(), &CancellationToken::new()),
        ..writer
    };
    let last = socket.next_until("fleet", |p| total(p) == 11).await;
    assert_eq!(last["data"]["devices"], queried_devices(&api, &token).await);
    drop(writer);
}

#[sqlx::test(migrations = false)]
async fn usage_and_projection_status_are_live_too(pool: PgPool) {
    let api = live_api(&pool, LiveConfig::default()).await;
    let writer = Writer::start(&pool).await;
    let owner = Uuid::now_v7();
    let mut socket = LiveClient::connect(api.addr, &admin()).await;
    let today = Utc::now().date_naive();
    socket
        .subscribe(
            "usage",
            "subscription($u: UUID!, $d: NaiveDate!) { dailyUsage(filter: {userId: $u, from: $d, to: $d}) { totals { minutes } } }",
            json!({"u": owner, "d": today}),
        )
        .await;
    let first = socket.next_of("usage").await;
    assert_eq!(big(&first["data"]["dailyUsage"]["totals"]["minutes"]), 0);
    socket
        .subscribe(
            "status",
            "subscription { projectionStatus { name position } }",
            json!({}),
        )
        .await;
    socket.next_of("status").await;

    let device = writer.create_device(owner).await;
    // Within the day subscribed to, whatever the clock says by now: a session ending "now"
    // was split over two days when the test ran across midnight, and the day asked for never
    // reached 7 minutes.
    let started_at = today.and_time(chrono::NaiveTime::MIN).and_utc() + chrono::Duration::hours(1);
    let usage = event_schema::UsageRecorded {
        owner_id: owner,
        device_id: device,
        provider: Provider::Aws,
        started_at,
        ended_at: started_at + chrono::Duration::minutes(7),
        minutes: 7,
        cost: event_schema::Money {
            amount_minor: 70,
            currency: event_schema::Currency::USD,
        },
        pricing_plan_id: "aws-standard-v1".to_owned(),
    };
    writer.append(device, owner, ExpectedVersion::Any, usage).await;
    // Both subscriptions' answers arrive on one socket, in either order.
    let (mut usage_seen, mut status_seen) = (false, false);
    while !(usage_seen && status_seen) {
        let message = socket.message().await;
        assert_eq!(message["type"], "next", "{message}");
        let payload = &message["payload"];
        assert!(payload.get("errors").is_none(), "{payload}");
        match message["id"].as_str() {
            Some("usage") => usage_seen |= big(&payload["data"]["dailyUsage"]["totals"]["minutes"]) == 7,
            Some("status") => {
                status_seen |= payload["data"]["projectionStatus"]
                    .as_array()
                    .is_some_and(|states| states.iter().all(|s| big(&s["position"]) >= 2));
            }
            other => panic!("an answer for {other:?}"),
        }
    }
}

#[sqlx::test(migrations = false)]
async fn usage_by_hour_is_live_once_daily_usage_v3_is_swapped_in(pool: PgPool) {
    let api = live_api(&pool, LiveConfig::default()).await;
    let writer = Writer::start(&pool).await;
    let owner = Uuid::now_v7();
    let device = writer.create_device(owner).await;
    // Version 3 is built and swapped in while the projectors run.
    let summary = projections::replay::replay(
        &pool,
        read_models::Projection::DailyUsage,
        None,
        projections::replay::ReplayConfig::default(),
        &projections::replay::Unobserved,
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_eq!(summary.version, 3);
    let mut socket = LiveClient::connect(api.addr, &token(owner, Role::User)).await;
    let today = Utc::now().date_naive();
    socket
        .subscribe(
            "hours",
            "subscription($d: NaiveDate!) { dailyUsage(filter: {from: $d, to: $d}, groupBy: HOUR) {
                rows { periodStart minutes cost { amountMinor } } totals { minutes } } }",
            json!({"d": today}),
        )
        .await;
    let first = socket.next_of("hours").await;
    assert!(first.get("errors").is_none(), "{first}");
    assert_eq!(first["data"]["dailyUsage"]["rows"], json!([]), "{first}");

    // 00:50 -> 02:10 today: 80 minutes over three hours, pushed by hour.
    let midnight = today.and_time(chrono::NaiveTime::MIN).and_utc();
    let usage = event_schema::UsageRecorded {
        owner_id: owner,
        device_id: device,
        provider: Provider::Aws,
        started_at: midnight + chrono::Duration::minutes(50),
        ended_at: midnight + chrono::Duration::minutes(130),
        minutes: 80,
        cost: event_schema::Money {
            amount_minor: 81,
            currency: event_schema::Currency::USD,
        },
        pricing_plan_id: "aws-standard-v1".to_owned(),
    };
    writer.append(device, owner, ExpectedVersion::Any, usage).await;
    let pushed = socket
        .next_until("hours", |p| {
            p["data"]["dailyUsage"]["totals"]["minutes"].as_str() == Some("80")
        })
        .await;
    let hour = |h: i64| (midnight + chrono::Duration::hours(h)).to_rfc3339();
    let rows = &pushed["data"]["dailyUsage"]["rows"];
    assert_eq!(
        rows,
        &json!([
            {"periodStart": hour(0), "minutes": "10", "cost": {"amountMinor": "10"}},
            {"periodStart": hour(1), "minutes": "60", "cost": {"amountMinor": "61"}},
            {"periodStart": hour(2), "minutes": "10", "cost": {"amountMinor": "10"}},
        ]),
        "{pushed}"
    );
}

#[sqlx::test(migrations = false)]
async fn the_legacy_protocol_and_a_token_on_the_upgrade_request_work(pool: PgPool) {
    let api = live_api(&pool, LiveConfig::default()).await;
    let writer = Writer::start(&pool).await;
    let owner = Uuid::now_v7();
    let authorization = format!("Bearer {}", token(owner, Role::User));
    let mut socket = LiveClient::open(api.addr, "graphql-ws", Some(&authorization))
        .await
        .unwrap();
    socket.send(json!({"type": "connection_init"})).await;
    assert_eq!(socket.message().await["type"], "connection_ack");
    socket.subscribe("1", DEVICES, json!({})).await;
    assert_eq!(total(&socket.next_of("1").await), 0);
    writer.create_device(owner).await;
    socket.next_until("1", |p| total(p) == 1).await;

    // A bad token on the upgrade request: refused before switching protocols.
    let refused = LiveClient::open(api.addr, "graphql-transport-ws", Some("Bearer nope")).await;
    assert!(refused.is_err(), "a bad token was upgraded");
}

#[sqlx::test(migrations = false)]
async fn a_socket_is_closed_when_its_token_expires(pool: PgPool) {
    let api = live_api(&pool, LiveConfig::default()).await;
    let owner = Uuid::now_v7();
    // Expired 24 s ago: still accepted within the 30 s of clock skew every check allows, and
    // past it 6 s from now.
    let expiring = http_edge::auth::mint_token(
        test_support::query::SECRET,
        &owner.to_string(),
        Role::User,
        &[],
        Utc::now() - chrono::Duration::seconds(24),
        chrono::Duration::zero(),
    )
    .unwrap();
    let mut socket = LiveClient::connect(api.addr, &expiring).await;
    socket.subscribe("1", DEVICES, json!({})).await;
    assert_eq!(total(&socket.next_of("1").await), 0);
    // A fresh token's socket stays.
    let mut fresh = LiveClient::connect(api.addr, &token(owner, Role::User)).await;
    fresh.subscribe("1", DEVICES, json!({})).await;
    fresh.next_of("1").await;
    let closed = socket.closed().await;
    assert_eq!(closed.code, 4403, "{closed:?}");
    assert!(closed.reason.contains("expired"), "{closed:?}");
    assert!(fresh.message_within(Duration::from_millis(500)).await.is_none());
}

#[sqlx::test(migrations = false)]
async fn hostile_sockets_are_closed_with_a_code_that_says_why(pool: PgPool) {
    let api = live_api(
        &pool,
        LiveConfig {
            init_timeout: Duration::from_millis(300),
            max_subscriptions_per_connection: 3,
            max_connections_per_client: 2,
            max_message_bytes: 16 * 1024,
            ..LiveConfig::default()
        },
    )
    .await;
    let owner = Uuid::now_v7();
    let token = token(owner, Role::User);
    let transport = "graphql-transport-ws";
    async fn closed_with(api: &TestApi, send: Vec<Message>) -> u16 {
        let mut socket = LiveClient::open(api.addr, "graphql-transport-ws", None).await.unwrap();
        for message in send {
            socket.send_raw(message).await.unwrap();
        }
        socket.closed().await.code
    }
    // Never initialised: closed when the init timeout passes.
    assert_eq!(closed_with(&api, vec![]).await, 4408);
    // Garbage, binary frames, unknown types.
    assert_eq!(closed_with(&api, vec![Message::text("{not json")]).await, 4400);
    assert_eq!(closed_with(&api, vec![Message::binary(vec![1, 2, 3])]).await, 4400);
    assert_eq!(
        closed_with(&api, vec![Message::text(r#"{"type":"start","id":"1"}"#)]).await,
        4400
    );
    // Subscribing before the ack; a bad token; a token that may not read dashboards.
    let subscribe = json!({"id": "1", "type": "subscribe", "payload": {"query": DEVICES}}).to_string();
    assert_eq!(closed_with(&api, vec![Message::text(subscribe.clone())]).await, 4401);
    let init = |token: &str| {
        Message::text(
            json!({"type": "connection_init", "payload": {"authorization": format!("Bearer {token}")}}).to_string(),
        )
    };
    assert_eq!(closed_with(&api, vec![init("forged.token.here")]).await, 4403);
    let auditor = test_support::tokens::signed(SECRET, "auditor-1", Role::Auditor, &[]);
    assert_eq!(closed_with(&api, vec![init(&auditor)]).await, 4403);
    // A message over the size limit ends the socket (the WebSocket layer's own close).
    let huge = json!({"id": "1", "type": "subscribe", "payload": {"query": "x".repeat(64 * 1024)}}).to_string();
    assert_ne!(closed_with(&api, vec![init(&token), Message::text(huge)]).await, 1000);
    // Two inits; a duplicate id.
    assert_eq!(closed_with(&api, vec![init(&token), init(&token)]).await, 4429);
    let mut socket = LiveClient::connect(api.addr, &token).await;
    socket.subscribe("1", DEVICES, json!({})).await;
    socket.next_of("1").await;
    socket.subscribe("1", DEVICES, json!({})).await;
    assert_eq!(socket.closed().await.code, 4409);

    // Refusals that keep the socket: each subscription ends with an error naming its code.
    let mut socket = LiveClient::connect(api.addr, &token).await;
    let refused = |id: &'static str, query: String, variables: Value| (id, query, variables);
    let cases = [
        refused("query", "query { projectionStatus { name } }".into(), json!({})),
        refused("invalid", "subscription { nope }".into(), json!({})),
        refused(
            "deep",
            format!("subscription {}{}", "{ devices { nodes ".repeat(40), "}".repeat(81)),
            json!({}),
        ),
        refused(
            "bad-var",
            "subscription($id: UUID!) { device(id: $id) { id } }".into(),
            json!({"id": "not-a-uuid"}),
        ),
        refused(
            "two-roots",
            "subscription { a: projectionStatus { name } b: projectionStatus { name } }".into(),
            json!({}),
        ),
        refused(
            "root-fragment",
            "subscription { ...F } fragment F on Subscription { projectionStatus { name } }".into(),
            json!({}),
        ),
    ];
    for (id, query, variables) in cases {
        socket.subscribe(id, &query, variables).await;
        let message = socket.message().await;
        assert_eq!(
            (message["id"].as_str(), message["type"].as_str()),
            (Some(id), Some("error")),
            "{message}"
        );
        assert!(message["payload"][0]["extensions"]["code"].is_string(), "{message}");
    }
    // Another user's rows: an empty answer, never theirs.
    let other = Uuid::now_v7();
    socket
        .subscribe(
            "other",
            "subscription($u: UUID) { devices(filter: {userId: $u}) { totalCount } }",
            json!({"u": other}),
        )
        .await;
    assert_eq!(total(&socket.next_of("other").await), 0);
    // More subscriptions than a connection may hold.
    for id in ["s1", "s2"] {
        socket.subscribe(id, DEVICES, json!({})).await;
        socket.next_of(id).await;
    }
    socket.subscribe("s3", DEVICES, json!({})).await;
    let message = socket.message().await;
    assert_eq!(
        message["payload"][0]["extensions"]["code"], "TOO_MANY_SUBSCRIPTIONS",
        "{message}"
    );
    // More connections than a client may hold: this is the third of this token's.
    let mut second = LiveClient::connect(api.addr, &token).await;
    let mut third = LiveClient::open(api.addr, transport, None).await.unwrap();
    third.send_raw(init(&token)).await.unwrap();
    assert_eq!(third.closed().await.code, 4430);
    second.subscribe("x", DEVICES, json!({})).await;
    second.next_of("x").await;
    let closes = metric(&api, "cloudphone_subscription_closed_total").await;
    assert!(closes >= 10.0, "closes counted: {closes}");
}

#[sqlx::test(migrations = false)]
async fn a_client_that_stops_reading_is_closed_and_holds_no_backlog(pool: PgPool) {
    // Every step is bounded: this test once hung in CI (under a loaded run) with nothing to
    // say where, so a hang now names its step.
    let api = within(
        PATIENCE * 3,
        "the API's start",
        live_api(
            &pool,
            LiveConfig {
                send_timeout: Duration::from_millis(300),
                evaluation_interval: Duration::from_millis(5),
                // Pings are not what closes it here (a loaded machine can take that long).
                keep_alive: Duration::from_secs(600),
                ..LiveConfig::default()
            },
        ),
    )
    .await;
    let writer = within(PATIENCE, "the writer's start", Writer::start(&pool)).await;
    let owner = Uuid::now_v7();
    let token = token(owner, Role::User);
    // Large answers (a page of 100 devices with every field, about 35 KB), to fill the
    // connection's send buffer (256 KiB, which Linux doubles) in a few pushes.
    let wide = "subscription { devices(first: 100) { totalCount nodes { id ownerId provider status cpuCores memoryMb \
                androidVersion createdAt lastStartedAt minutesUsed updatedPosition } } }";
    for _ in 0..10 {
        let created = futures::future::join_all((0..10).map(|_| writer.create_device(owner)));
        within(PATIENCE, "ten appends before the socket", created).await;
    }
    let stalled = within(
        PATIENCE,
        "the stalled socket's handshake",
        stalled_socket(api.addr, &token, wide),
    )
    .await;
    // Every change makes a new answer (a new device: the count moves, and the page is sent
    // whole); the stalled client takes none of them. New devices, not starts: a second start
    // of a running device changes nothing, and an unchanged answer is not sent.
    let deadline = tokio::time::Instant::now() + PATIENCE * 6;
    while within(
        PATIENCE,
        "a metrics scrape",
        metric(&api, "cloudphone_subscription_closed_total"),
    )
    .await
        < 1.0
    {
        let created = futures::future::join_all((0..10).map(|_| writer.create_device(owner)));
        within(PATIENCE, "ten appends", created).await;
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stalled client was never closed ({} answers pushed)",
            metric(&api, "cloudphone_subscription_pushes_total").await
        );
    }
    let metrics = within(PATIENCE, "the last metrics scrape", api.metrics()).await;
    assert!(
        metrics.contains("cloudphone_subscription_closed_total{reason=\"too_slow\"} 1"),
        "closed for another reason: {metrics}"
    );
    // What the server wrote before giving up is bounded by the send buffer, not by the
    // kernel's autotuning (which took about 100 answers of this size before the bound).
    let pushed = within(
        PATIENCE,
        "a metrics scrape",
        metric(&api, "cloudphone_subscription_pushes_total"),
    )
    .await;
    assert!(pushed <= 40.0, "{pushed} answers went to a client that read none");
    drop(stalled);
}

/// `future`, or a failure that names what hung (a hang would otherwise show only as the
/// runner's timeout, with nothing to say where).
async fn within<T>(patience: Duration, what: &str, future: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(patience, future).await {
        Ok(value) => value,
        Err(_) => panic!("{what} took longer than {patience:?}"),
    }
}

#[sqlx::test(migrations = false)]
async fn a_client_that_never_answers_pings_is_closed(pool: PgPool) {
    let api = live_api(
        &pool,
        LiveConfig {
            keep_alive: Duration::from_millis(100),
            ..LiveConfig::default()
        },
    )
    .await;
    let token = token(Uuid::now_v7(), Role::User);
    let silent = stalled_socket(api.addr, &token, "subscription { projectionStatus { name } }").await;
    let mut answering = LiveClient::connect(api.addr, &token).await;
    answering
        .subscribe("status", "subscription { projectionStatus { name } }", json!({}))
        .await;
    answering.next_of("status").await;
    // The client that reads (and so answers pings) stays while the silent one is closed.
    let (_, heard) = tokio::join!(
        metric_reaches(&api, "cloudphone_subscription_closed_total", 1.0),
        answering.message_within(Duration::from_millis(1000))
    );
    assert!(heard.is_none(), "{heard:?}");
    let metrics = api.metrics().await;
    assert!(
        metrics.contains("cloudphone_subscription_closed_total{reason=\"gone_quiet\"} 1"),
        "{metrics}"
    );
    drop(silent);
}

/// A socket with a tiny receive buffer that subscribes and then never reads.
async fn stalled_socket(addr: std::net::SocketAddr, token: &str, query: &str) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(addr).await.unwrap();
    let handshake = format!(
        "GET /graphql HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Protocol: graphql-transport-ws\r\n\r\n"
    );
    stream.write_all(handshake.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    while !response.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte).await.unwrap();
        response.push(byte[0]);
    }
    assert!(
        response.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&response)
    );
    for message in [
        json!({"type": "connection_init", "payload": {"authorization": format!("Bearer {token}")}}),
        json!({"id": "1", "type": "subscribe", "payload": {"query": query}}),
    ] {
        stream
            .write_all(&masked_text_frame(message.to_string().as_bytes()))
            .await
            .unwrap();
    }
    stream
}

/// A client's text frame (clients must mask; a zero mask keeps the bytes as they are).
fn masked_text_frame(payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![0x81];
    match payload.len() {
        n if n < 126 => frame.push(0x80 | u8::try_from(n).unwrap()),
        n => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&u16::try_from(n).unwrap().to_be_bytes());
        }
    }
    frame.extend_from_slice(&[0, 0, 0, 0]);
    frame.extend_from_slice(payload);
    frame
}

#[sqlx::test(migrations = false)]
async fn shutdown_closes_every_socket_as_going_away(pool: PgPool) {
    let api = live_api(&pool, LiveConfig::default()).await;
    let owner = Uuid::now_v7();
    let mut socket = LiveClient::connect(api.addr, &token(owner, Role::User)).await;
    socket.subscribe("fleet", DEVICES, json!({})).await;
    socket.next_of("fleet").await;
    drop(api);
    let closed = socket.closed().await;
    assert_eq!(closed.code, 1001, "{closed:?}");
}
