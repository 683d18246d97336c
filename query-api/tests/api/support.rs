//! Read-model rows to query, and hand-made tokens: what only the query API's tests need. The
//! query API on the test's database and its client are `test_support::query`'s, re-exported
//! here with the migrations; and the statement counter of the tests that count statements.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use chrono::{DateTime, NaiveDate, TimeZone, Utc};
use serde_json::Value;
use sqlx::PgPool;
pub use test_support::db::migrated;
pub use test_support::query::*;
use uuid::Uuid;

// The two users the seeded rows belong to, and their devices' ids.
pub const A: Uuid = Uuid::from_u128(0xa);
pub const B: Uuid = Uuid::from_u128(0xb);

pub fn dev(n: u128) -> Uuid {
    Uuid::from_u128(0xde00 + n)
}

pub fn day(text: &str) -> NaiveDate {
    NaiveDate::parse_from_str(text, "%Y-%m-%d").unwrap()
}

pub fn at(micros: i64) -> DateTime<Utc> {
    Utc.timestamp_micros(1_767_225_600_000_000 + micros).unwrap() // 2026-01-01T00:00:00Z + micros
}

/// A `devices` row.
#[derive(Debug, Clone)]
pub struct SeedDevice {
    pub id: Uuid,
    pub owner: Uuid,
    pub provider: &'static str,
    pub status: &'static str,
    pub cpu: i32,
    pub memory: i32,
    pub created_at: DateTime<Utc>,
}

impl SeedDevice {
    /// A device of the size most tests give one (2 cores, 2 GiB).
    pub fn small(
        id: Uuid,
        owner: Uuid,
        provider: &'static str,
        status: &'static str,
        created_at: DateTime<Utc>,
    ) -> Self {
        SeedDevice {
            id,
            owner,
            provider,
            status,
            cpu: 2,
            memory: 2048,
            created_at,
        }
    }
}

pub async fn insert_devices(pool: &PgPool, devices: &[SeedDevice]) {
    for chunk in devices.chunks(5_000) {
        let ids: Vec<Uuid> = chunk.iter().map(|d| d.id).collect();
        let owners: Vec<Uuid> = chunk.iter().map(|d| d.owner).collect();
        let providers: Vec<&str> = chunk.iter().map(|d| d.provider).collect();
        let statuses: Vec<&str> = chunk.iter().map(|d| d.status).collect();
        let cpus: Vec<i32> = chunk.iter().map(|d| d.cpu).collect();
        let memories: Vec<i32> = chunk.iter().map(|d| d.memory).collect();
        let created: Vec<DateTime<Utc>> = chunk.iter().map(|d| d.created_at).collect();
        sqlx::query(
            "INSERT INTO devices (device_id, owner_id, provider, status, cpu_cores, memory_mb, android_version,
                                  created_at, minutes_used, updated_position)
             SELECT d, o, p, s, c, m, 13, t, 0, 1
             FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::int[], $6::int[], $7::timestamptz[])
                 AS x(d, o, p, s, c, m, t)",
        )
        .bind(&ids)
        .bind(&owners)
        .bind(&providers)
        .bind(&statuses)
        .bind(&cpus)
        .bind(&memories)
        .bind(&created)
        .execute(pool)
        .await
        .unwrap();
    }
}

/// `device_stats` as the fleet projection derives it from `devices`.
pub async fn derive_device_stats(pool: &PgPool) {
    let mut conn = pool.acquire().await.unwrap();
    read_models::fleet::derive_device_stats(&mut conn).await.unwrap();
}

pub async fn insert_usage(
    pool: &PgPool,
    day: NaiveDate,
    user: Uuid,
    device: Uuid,
    minutes: i64,
    cost: i64,
    currency: &str,
) {
    sqlx::query(
        "INSERT INTO daily_usage (day, user_id, device_id, minutes, cost_minor, currency) VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(day)
    .bind(user)
    .bind(device)
    .bind(minutes)
    .bind(cost)
    .bind(currency)
    .execute(pool)
    .await
    .unwrap();
}

/// Moves both projection checkpoints (as a projector would after applying events).
pub async fn set_checkpoints(pool: &PgPool, position: i64) {
    sqlx::query(
        "INSERT INTO projection_checkpoints (projection, position) VALUES ('fleet', $1), ('daily_usage', $1)
         ON CONFLICT (projection) DO UPDATE SET position = EXCLUDED.position",
    )
    .bind(position)
    .execute(pool)
    .await
    .unwrap();
}

pub fn ids(nodes: &Value) -> Vec<String> {
    nodes
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["id"].as_str().unwrap().to_owned())
        .collect()
}

pub fn big(value: &Value) -> i64 {
    value.as_str().unwrap().parse().unwrap()
}

/// An HS256 token carrying exactly `claims`, signed with the test secret: for claims
/// `mint_token` never writes (`nbf`, an `iat` other than now, any lifetime).
pub fn signed_claims(claims: &Value) -> String {
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
    let signing_input = format!("{header}.{payload}");
    let signature = URL_SAFE_NO_PAD.encode(hmac_sha256(SECRET.as_bytes(), signing_input.as_bytes()));
    format!("{signing_input}.{signature}")
}

/// HMAC-SHA256 (RFC 2104), so tests can sign tokens without a JWT library of their own.
fn hmac_sha256(key: &[u8], message: &[u8]) -> Vec<u8> {
    use sha2::{Digest, Sha256};
    let mut block = [0u8; 64];
    if key.len() > block.len() {
        let digest = Sha256::digest(key);
        block[..digest.len()].copy_from_slice(&digest);
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let pad = |byte: u8| block.iter().map(|b| b ^ byte).collect::<Vec<u8>>();
    let inner = Sha256::new().chain_update(pad(0x36)).chain_update(message).finalize();
    Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize()
        .to_vec()
}

/// Appends a new device's `DeviceCreated` for `owner`; returns the device and the position.
pub async fn append_device_created(store: &event_log::EventStore, owner: Uuid) -> (Uuid, i64) {
    let device = Uuid::now_v7();
    let created: event_schema::Event = event_schema::DeviceCreated {
        device_id: device,
        owner_id: owner,
        provider: event_schema::Provider::Aws,
        cpu_cores: 2,
        memory_mb: 2048,
        android_version: 14,
        created_at: Utc::now(),
    }
    .into();
    let outcome = store
        .append(event_log::AppendBatch::single(event_log::StreamAppend {
            stream_id: device,
            stream_type: event_schema::StreamType::Device,
            owner_id: owner,
            expected: event_log::ExpectedVersion::NoStream,
            events: vec![
                event_log::NewEvent::from_event(&created, event_schema::EventMetadata::default(), Utc::now()).unwrap(),
            ],
        }))
        .await
        .unwrap();
    (device, outcome.last_position)
}

/// Counts the SQL statements sqlx runs (it logs each one under `sqlx::query`), but for the
/// API's background reads (replica health and checkpoint watermarks), whose ticks fall where
/// they fall.
#[derive(Clone)]
pub struct CountStatements(Arc<AtomicUsize>);

/// Whether an event's `summary` (the statement's first words) is one of the background reads.
struct BackgroundRead(bool);

impl tracing::field::Visit for BackgroundRead {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "summary" {
            let summary = format!("{value:?}");
            self.0 = summary.contains("pg_current_wal_lsn") || summary.contains("SELECT projection, position");
        }
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for CountStatements {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        if event.metadata().target() != "sqlx::query" {
            return;
        }
        let mut background = BackgroundRead(false);
        event.record(&mut background);
        if !background.0 {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Counts every statement this test process runs from now on, but for the background reads.
/// The subscriber is the process's: nextest runs each test in a process of its own.
pub fn count_statements() -> Arc<AtomicUsize> {
    use tracing_subscriber::layer::SubscriberExt;
    let statements = Arc::new(AtomicUsize::new(0));
    let subscriber = tracing_subscriber::registry().with(tracing_subscriber::Layer::with_filter(
        CountStatements(Arc::clone(&statements)),
        tracing_subscriber::filter::Targets::new().with_target("sqlx::query", tracing::Level::TRACE),
    ));
    tracing::subscriber::set_global_default(subscriber).unwrap();
    statements
}

/// The query API of a test that counts statements: no cache, so every answer is computed,
/// and no background reads (replica health, checkpoint watermarks) within the test's time.
pub fn counting_config() -> query_api::QueryApiConfig {
    query_api::QueryApiConfig {
        cache_max_bytes: 0,
        watermark_interval: Duration::from_secs(3600),
        health_interval: Duration::from_secs(3600),
        ..test_config()
    }
}

/// Waits until the subscriptions' change listener has run its one `LISTEN`, which is not a
/// query's statement.
pub async fn listener_started(api: &TestApi) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !api.metrics().await.contains("cloudphone_subscription_listening 1") {
        assert!(
            std::time::Instant::now() < deadline,
            "the change listener never listened"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
