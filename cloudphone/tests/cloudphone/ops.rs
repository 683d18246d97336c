//! Operability of the real binary: every role serves health, readiness and Prometheus
//! metrics that move with traffic; every metric the dashboards, the alerting rules and the
//! metrics reference name is really exported; JSON logs parse, and one trace id leads from a
//! command's HTTP request to its event, its publication to Kafka and its projection.
//!
//! Kafka-protocol broker (ops/dev/broker.sh) and the streaming replica (ops/dev/replica.sh)
//! as the test command starts them. These tests run in the `kafka` group (one at a time; one
//! test elsewhere kills the broker).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use http_edge::auth::Role;
use serde_json::{Value, json};
use sqlx::PgPool;
use test_support::roles::RoleProcess;
use test_support::services::BROKERS;
use test_support::{tokens, urls};
use uuid::Uuid;

use crate::support::{CLOUDPHONE, scrape};

const REPLICA_PORT: u16 = 5433;

fn unique_topic() -> String {
    format!("cloudphone-ops-{}", Uuid::now_v7().simple())
}

/// The workspace's `ops/` directory.
fn ops_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../ops")
}

/// The metric names of a scrape (`foo_bucket`, `foo_sum` and `foo_count` count as `foo`).
fn names(samples: &BTreeMap<String, f64>) -> BTreeSet<String> {
    samples
        .keys()
        .map(|series| {
            let name = series.split('{').next().unwrap();
            base_name(name).to_owned()
        })
        .collect()
}

fn base_name(name: &str) -> &str {
    ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|suffix| name.strip_suffix(suffix))
        .unwrap_or(name)
}

/// The sum of every series of `name` whose labels contain all of `labels`.
fn total(samples: &BTreeMap<String, f64>, name: &str, labels: &[&str]) -> f64 {
    samples
        .iter()
        .filter(|(series, _)| {
            let (series_name, rest) = series.split_once('{').unwrap_or((series, ""));
            series_name == name && labels.iter().all(|label| rest.contains(label))
        })
        .map(|(_, value)| value)
        .sum()
}

/// Polls `/metrics` of `base` until `done` holds for a scrape.
async fn scrape_until(
    client: &reqwest::Client,
    base: &str,
    what: &str,
    done: impl Fn(&BTreeMap<String, f64>) -> bool,
) -> BTreeMap<String, f64> {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let samples = scrape(client, base).await;
        if done(&samples) {
            return samples;
        }
        assert!(
            Instant::now() < deadline,
            "{base}/metrics never showed {what}:\n{}",
            samples.keys().cloned().collect::<Vec<_>>().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn healthy_and_ready(client: &reqwest::Client, base: &str) {
    let health = client.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200, "{base}/healthz");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ready = client.get(format!("{base}/readyz")).send().await.unwrap();
        if ready.status() == 200 {
            return;
        }
        assert!(Instant::now() < deadline, "{base}/readyz stayed {}", ready.status());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Registers a user and creates one of their devices; returns the device's answer.
async fn register_with_device(client: &reqwest::Client, command: &str, user: Uuid, traceparent: Option<&str>) -> Value {
    let mut request = client
        .post(format!("{command}/v1/users"))
        .bearer_auth(tokens::development(&user.to_string(), Role::User))
        .json(
            &json!({"tier": "pro", "email": format!("ops.{}@example.com", user.simple()), "phone": "+4915100000000"}),
        );
    if let Some(traceparent) = traceparent {
        request = request.header("traceparent", traceparent);
    }
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), 201);
    let device = client
        .post(format!("{command}/v1/devices"))
        .bearer_auth(tokens::development(&user.to_string(), Role::User))
        .json(&json!({"provider": "huawei", "cpu_cores": 2, "memory_mb": 2048, "android_version": 14}))
        .send()
        .await
        .unwrap();
    assert_eq!(device.status(), 201);
    let trace = device.headers()["x-trace-id"].to_str().unwrap().to_owned();
    let mut body: Value = device.json().await.unwrap();
    body["trace_id"] = Value::String(trace);
    body
}

/// The roles as production runs them, as separate processes: the command API, the query API
/// reading from the streaming replica, a Kafka projector, the relay. Every role answers
/// /healthz and /readyz; after traffic each one's own metrics have moved; and every metric
/// that ops/metrics.md, the alerting and recording rules and the Grafana dashboards name is
/// exported by one of them (or, for the replay's metrics, by a replay).
#[sqlx::test(migrations = false)]
async fn every_role_exports_the_metrics_that_dashboards_and_alerts_use(pool: PgPool) {
    let url = urls::database(&pool).await;
    let database = url.rsplit('/').next().unwrap().to_owned();
    let replica = format!("postgres://postgres@127.0.0.1:{REPLICA_PORT}/{database}");
    let topic = unique_topic();
    let dir = tempfile::tempdir().unwrap();
    let kafka = [
        ("CLOUDPHONE_KAFKA_BROKERS", BROKERS),
        ("CLOUDPHONE_KAFKA_TOPIC", topic.as_str()),
        ("CLOUDPHONE_KAFKA_PARTITIONS", "2"),
    ];
    // The command API migrates the database; the others start once it listens.
    let mut command_api = RoleProcess::start(CLOUDPHONE, "command-api", &url, &[], dir.path());
    let command = command_api.address("command API listening").await;
    let client = reqwest::Client::new();
    // A replay's metrics, from a replay of the first events (before the Kafka projectors
    // own the projections: a replay refuses to rebuild a projection they consume).
    register_with_device(&client, &command, Uuid::now_v7(), None).await;
    let replay_names = replay_metric_names(&pool).await;
    let mut query_api = RoleProcess::start(
        CLOUDPHONE,
        "query-api",
        &url,
        &[("CLOUDPHONE_REPLICA_URLS", replica.as_str())],
        dir.path(),
    );
    let mut relay = RoleProcess::start(CLOUDPHONE, "relay", &url, &kafka, dir.path());
    let mut projector = RoleProcess::start(CLOUDPHONE, "projector", &url, &kafka, dir.path());
    let query = query_api.address("query API listening").await;
    let relay_ops = relay.address("health, readiness and metrics listening").await;
    let projector_ops = projector.address("health, readiness and metrics listening").await;

    for base in [&command, &query, &relay_ops, &projector_ops] {
        healthy_and_ready(&client, base).await;
    }
    let before = BTreeMap::from([
        ("command", scrape(&client, &command).await),
        ("query", scrape(&client, &query).await),
        ("relay", scrape(&client, &relay_ops).await),
        ("projector", scrape(&client, &projector_ops).await),
    ]);

    // Traffic: commands, a dashboard query (twice: a miss, then a hit), an audit export.
    let user = Uuid::now_v7();
    let device = register_with_device(&client, &command, user, None).await;
    let position = device["position"].as_i64().unwrap();
    for _ in 0..2 {
        let answer = client
            .post(format!("{query}/graphql"))
            .bearer_auth(tokens::development(&Uuid::from_u128(0xad).to_string(), Role::Admin))
            .json(&json!({"query": "{ devices { totalCount } }"}))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200);
    }
    // The export reads the replica, which may not have replayed the user's events yet: ask
    // again until the file holds them (an empty export is complete, just early).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let export = client
            .get(format!("{query}/v1/audit/events?userId={user}"))
            .bearer_auth(tokens::development("auditor-1", Role::Auditor))
            .send()
            .await
            .unwrap();
        assert_eq!(export.status(), 200);
        let file = export.text().await.unwrap();
        assert!(file.contains("\"trailer\""), "{file}");
        if !file.contains("\"count\":0,") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the replica never showed user {user}'s events"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Each role's own figures move.
    let moved = |role: &str, after: &BTreeMap<String, f64>, name: &str, labels: &[&str]| {
        let (was, is) = (total(&before[role], name, labels), total(after, name, labels));
        assert!(is > was, "{role}: {name}{labels:?} did not move ({was} -> {is})");
    };
    let command_after = scrape(&client, &command).await;
    moved(
        "command",
        &command_after,
        "cloudphone_http_requests_total",
        &["route=\"/v1/users\"", "status=\"201\""],
    );
    moved("command", &command_after, "cloudphone_append_events_total", &[]);
    moved(
        "command",
        &command_after,
        "cloudphone_http_request_duration_seconds_count",
        &[],
    );
    let query_after = scrape_until(&client, &query, "the replica probed", |s| {
        total(s, "cloudphone_replica_healthy", &[]) > 0.0
            && s.keys().any(|k| k.starts_with("cloudphone_replica_lag_bytes"))
    })
    .await;
    moved("query", &query_after, "cloudphone_graphql_requests_total", &[]);
    moved(
        "query",
        &query_after,
        "cloudphone_query_cache_lookups_total",
        &["result=\"hit\""],
    );
    moved("query", &query_after, "cloudphone_audit_exports_total", &[]);
    moved("query", &query_after, "cloudphone_export_events_total", &[]);
    let relay_after = scrape_until(&client, &relay_ops, "the relay at the head", |s| {
        total(s, "cloudphone_relay_position", &[]) >= position as f64
    })
    .await;
    moved("relay", &relay_after, "cloudphone_relay_published_total", &[]);
    assert_eq!(total(&relay_after, "cloudphone_relay_leader", &[]), 1.0);
    let projector_after = scrape_until(&client, &projector_ops, "both projections at the head", |s| {
        ["fleet", "daily_usage"]
            .iter()
            .all(|p| total(s, "cloudphone_projection_position", &[&format!("projection=\"{p}\"")]) >= position as f64)
    })
    .await;
    moved(
        "projector",
        &projector_after,
        "cloudphone_projection_events_total",
        &["projection=\"fleet\""],
    );
    // librdkafka's statistics arrive every few seconds.
    let projector_after = scrape_until(&client, &projector_ops, "Kafka consumer lag", |s| {
        s.keys()
            .any(|k| k.starts_with("cloudphone_kafka_consumer_lag_messages"))
    })
    .await;
    for (role, samples) in [
        ("command", &command_after),
        ("query", &query_after),
        ("relay", &relay_after),
        ("projector", &projector_after),
    ] {
        for name in [
            "cloudphone_build_info",
            "process_resident_memory_bytes",
            "process_cpu_seconds_total",
        ] {
            assert!(names(samples).contains(name), "{role} does not export {name}");
        }
    }
    assert!(total(&command_after, "cloudphone_partition_months_ahead", &[]) >= 1.0);
    assert!(total(&command_after, "cloudphone_db_server_max_connections", &[]) > 0.0);

    // Everything the operators' files name is exported somewhere.
    let mut exported: BTreeSet<String> = [&command_after, &query_after, &relay_after, &projector_after]
        .into_iter()
        .flat_map(names)
        .collect();
    exported.extend(replay_names);
    let mut missing = BTreeMap::<String, BTreeSet<String>>::new();
    for (file, named) in metric_names_in_ops_files() {
        for name in named {
            if !exported.contains(&name) {
                missing.entry(name).or_default().insert(file.clone());
            }
        }
    }
    assert!(
        missing.is_empty(),
        "named in ops/ but exported by no role: {missing:#?}"
    );
}

/// The metric names a replay exports: a replay run in this process, its registry rendered.
/// (`cloudphone replay --ops-listen` serves the same registry while it runs.)
async fn replay_metric_names(pool: &PgPool) -> BTreeSet<String> {
    let handle = http_edge::telemetry::prometheus();
    let observer = projections::replay::Unobserved;
    let stop = tokio_util::sync::CancellationToken::new();
    projections::replay::replay(
        pool,
        read_models::Projection::Fleet,
        None,
        projections::replay::ReplayConfig::default(),
        &observer,
        &stop,
    )
    .await
    .unwrap();
    handle
        .render()
        .lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .map(|line| base_name(line.split(['{', ' ']).next().unwrap()).to_owned())
        .collect()
}

/// Every `cloudphone_*` and `process_*` metric name in ops/metrics.md (first column), the
/// Prometheus rules and config, and the Grafana dashboards, by file. Recording-rule names
/// (with `:`) are the rules' own.
fn metric_names_in_ops_files() -> BTreeMap<String, BTreeSet<String>> {
    let ops = ops_dir();
    let mut files = vec![ops.join("metrics.md")];
    for dir in ["prometheus", "grafana/dashboards"] {
        for entry in std::fs::read_dir(ops.join(dir)).unwrap() {
            let path = entry.unwrap().path();
            if path
                .extension()
                .is_some_and(|e| e == "yml" || e == "yaml" || e == "json")
            {
                files.push(path);
            }
        }
    }
    let mut by_file = BTreeMap::new();
    for path in files {
        let text = std::fs::read_to_string(&path).unwrap();
        let mut found = BTreeSet::new();
        let bytes = text.as_bytes();
        for prefix in ["cloudphone_", "process_"] {
            let mut from = 0;
            while let Some(at) = text[from..].find(prefix).map(|i| i + from) {
                let end = text[at..]
                    .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
                    .map_or(text.len(), |i| i + at);
                // A name, not part of a longer word or of a recording rule (`job:cloudphone_...`).
                let before = at.checked_sub(1).map(|i| bytes[i] as char);
                let after = text[end..].chars().next();
                let part_of_word = before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':');
                if !part_of_word && after != Some(':') {
                    found.insert(base_name(&text[at..end]).to_owned());
                }
                from = end;
            }
        }
        assert!(
            !found.is_empty() || path.ends_with("prometheus.yml"),
            "{} names no metric",
            path.display()
        );
        by_file.insert(path.display().to_string(), found);
    }
    by_file
}

/// `cloudphone serve` in Kafka mode with JSON logs: one W3C trace id, sent in `traceparent`
/// or made by the API (and answered in `x-trace-id`), is in the request's log lines, the
/// stored event's metadata, the relay's publication line and the projectors' lines.
#[sqlx::test(migrations = false)]
async fn one_trace_id_leads_from_a_request_to_its_projection(pool: PgPool) {
    let url = urls::database(&pool).await;
    let topic = unique_topic();
    let dir = tempfile::tempdir().unwrap();
    let mut serve = RoleProcess::start(
        CLOUDPHONE,
        "serve",
        &url,
        &[
            ("CLOUDPHONE_KAFKA_BROKERS", BROKERS),
            ("CLOUDPHONE_KAFKA_TOPIC", topic.as_str()),
            ("CLOUDPHONE_KAFKA_PARTITIONS", "2"),
            (
                "CLOUDPHONE_LOG",
                "info,tower_http=debug,command_api=debug,kafka_adapters::relay=debug,projections::apply=debug",
            ),
        ],
        dir.path(),
    );
    let command = serve.address("command API listening").await;
    let client = reqwest::Client::new();

    // The client's trace: its id is followed.
    let trace = format!("{:032x}", Uuid::new_v4().as_u128());
    let traceparent = format!("00-{trace}-00f067aa0ba902b7-01");
    let user = Uuid::now_v7();
    let device = register_with_device(&client, &command, user, Some(&traceparent)).await;
    // No trace from the client: the API makes one and says which.
    let made = device["trace_id"].as_str().unwrap().to_owned();
    assert_eq!(made.len(), 32);
    assert!(made.bytes().all(|b| b.is_ascii_hexdigit()));
    assert_ne!(made, trace);

    let stored: Vec<(String, Option<String>)> = sqlx::query_as(
        "SELECT event_type, metadata->>'trace_id' FROM user_events WHERE owner_id = $1 ORDER BY position",
    )
    .bind(user)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(stored[0], ("UserRegistered".to_owned(), Some(trace.clone())));
    assert!(
        stored
            .iter()
            .any(|(t, id)| t == "DeviceCreated" && id.as_deref() == Some(made.as_str()))
    );

    let limit = Duration::from_secs(60);
    for id in [&trace, &made] {
        let in_request = |e: &Value| e["span"]["trace_id"] == id.as_str() && e["span"]["name"] == "request";
        let appended = serve
            .logged_within("the append in the request's span", limit, |e| {
                e["message"] == "events appended" && in_request(e)
            })
            .await;
        assert!(
            !appended["span"]["request_id"].as_str().unwrap_or_default().is_empty(),
            "{appended}"
        );
        serve
            .logged_within("the request's response", limit, |e| {
                e["message"] == "finished processing request" && in_request(e)
            })
            .await;
        serve
            .logged_within("the event's publication", limit, |e| {
                e["message"] == "event published" && e["trace_id"] == id.as_str()
            })
            .await;
    }
    for projection in ["fleet", "daily_usage"] {
        serve
            .logged_within("the device's projection", limit, |e| {
                e["message"] == "event projected" && e["trace_id"] == made.as_str() && e["projection"] == projection
            })
            .await;
    }
    // Every line is JSON with a timestamp, a level and a target.
    let text = std::fs::read_to_string(&serve.log).unwrap();
    for line in text.lines() {
        let entry: Value = serde_json::from_str(line).unwrap_or_else(|_| panic!("not JSON: {line}"));
        for key in ["timestamp", "level", "target"] {
            assert!(entry[key].is_string(), "no {key} in {line}");
        }
    }
}

/// With `--otlp-endpoint`, request spans go to the collector over OTLP/HTTP under the
/// caller's trace id. The collector here is a plain HTTP listener that keeps what it gets.
#[sqlx::test(migrations = false)]
async fn traces_are_exported_over_otlp_under_the_callers_trace_id(pool: PgPool) {
    use axum::body::Bytes;
    use axum::extract::State;
    use std::sync::{Arc, Mutex};

    /// What the collector received: content type and body of each export.
    type Received = Arc<Mutex<Vec<(String, Bytes)>>>;
    let received: Received = Arc::default();
    let collector = axum::Router::new()
        .route(
            "/v1/traces",
            axum::routing::post(
                |State(kept): State<Received>, headers: axum::http::HeaderMap, body: Bytes| async move {
                    let kind = headers
                        .get("content-type")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_owned();
                    kept.lock().unwrap().push((kind, body));
                    axum::http::StatusCode::OK
                },
            ),
        )
        .with_state(received.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, collector).await });

    let url = urls::database(&pool).await;
    let dir = tempfile::tempdir().unwrap();
    let mut serve = RoleProcess::start(
        CLOUDPHONE,
        "command-api",
        &url,
        &[
            ("CLOUDPHONE_OTLP_ENDPOINT", endpoint.as_str()),
            ("CLOUDPHONE_OTLP_SERVICE_NAME", "cloudphone-command-api"),
            // Export spans at once rather than every 5 s.
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
        dir.path(),
    );
    let command = serve.address("command API listening").await;
    let trace = Uuid::new_v4();
    let traceparent = format!("00-{}-00f067aa0ba902b7-01", trace.simple());
    let user = Uuid::now_v7();
    register_with_device(&reqwest::Client::new(), &command, user, Some(&traceparent)).await;

    // OTLP/protobuf carries trace ids as their 16 raw bytes.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = received.lock().unwrap().clone();
        if let Some((kind, _)) = got.iter().find(|(_, body)| contains(body, trace.as_bytes())) {
            assert_eq!(kind, "application/x-protobuf");
            let service = got.iter().any(|(_, body)| contains(body, b"cloudphone-command-api"));
            assert!(service, "no export names the service");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the collector got {} exports, none with trace {trace}",
            got.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|window| window == needle)
}

/// A Kafka projector whose brokers do not answer is alive but not ready, and says why;
/// with a broker that answers, it is ready.
#[sqlx::test(migrations = false)]
async fn a_kafka_role_is_not_ready_while_its_broker_is_unreachable(pool: PgPool) {
    let url = urls::database(&pool).await;
    let dir = tempfile::tempdir().unwrap();
    // Port 1 on loopback: nothing listens there.
    let mut dead = RoleProcess::start(
        CLOUDPHONE,
        "projector",
        &url,
        &[
            ("CLOUDPHONE_KAFKA_BROKERS", "127.0.0.1:1"),
            ("CLOUDPHONE_KAFKA_TOPIC", "unreachable"),
        ],
        dir.path(),
    );
    let ops = dead.address("health, readiness and metrics listening").await;
    let client = reqwest::Client::new();
    assert_eq!(client.get(format!("{ops}/healthz")).send().await.unwrap().status(), 200);
    let ready = client.get(format!("{ops}/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    let body: Value = ready.json().await.unwrap();
    assert_eq!(body["database"], "ok", "{body}");
    assert_ne!(body["broker"], "ok", "{body}");

    let topic = unique_topic();
    let mut live = RoleProcess::start(
        CLOUDPHONE,
        "projector",
        &url,
        &[
            ("CLOUDPHONE_KAFKA_BROKERS", BROKERS),
            ("CLOUDPHONE_KAFKA_TOPIC", topic.as_str()),
        ],
        dir.path(),
    );
    let ops = live.address("health, readiness and metrics listening").await;
    healthy_and_ready(&client, &ops).await;
    let body: Value = client
        .get(format!("{ops}/readyz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["broker"], "ok", "{body}");
}

/// `--migrate-on-start false` (a role behind PgBouncer): the role leaves the schema to
/// `cloudphone migrate`; on a database nobody migrated it stops with an error, having
/// created nothing. After `cloudphone migrate` the same role starts.
#[sqlx::test(migrations = false)]
async fn a_role_told_not_to_migrate_leaves_the_schema_alone(pool: PgPool) {
    let url = urls::database(&pool).await;
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_cloudphone"))
            .args(args)
            .env("CLOUDPHONE_DATABASE_URL", &url)
            .env("CLOUDPHONE_COMMAND_LISTEN", "127.0.0.1:0")
            .env("CLOUDPHONE_MIGRATE_ON_START", "false")
            .env("CLOUDPHONE_LOG_FORMAT", "json")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let refused = run(&["command-api"]);
    assert!(!refused.status.success());
    let migrations: Option<String> = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations')::text")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(migrations, None, "{}", String::from_utf8_lossy(&refused.stderr));

    assert!(run(&["migrate"]).status.success());
    let dir = tempfile::tempdir().unwrap();
    let mut api = RoleProcess::start(
        CLOUDPHONE,
        "command-api",
        &url,
        &[("CLOUDPHONE_MIGRATE_ON_START", "false")],
        dir.path(),
    );
    let command = api.address("command API listening").await;
    healthy_and_ready(&reqwest::Client::new(), &command).await;
}
