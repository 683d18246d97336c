//! A query API on the test's database, a client for it, and read-model rows to query.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)] // shared by several test binaries

use std::net::SocketAddr;
use std::time::Duration;

use chrono::{DateTime, NaiveDate, TimeZone, Utc};
use command_api::auth::{KeySource, Role, mint_token};
use query_api::{QueryApi, QueryApiConfig};
use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub const SECRET: &str = "query-api-test-secret";

/// A running query API; stops when dropped.
pub struct TestApi {
    pub addr: SocketAddr,
    pub client: reqwest::Client,
    stop: CancellationToken,
}

impl Drop for TestApi {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A configuration for tests: the test secret, a free port, quick refreshes.
pub fn test_config() -> QueryApiConfig {
    QueryApiConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        keys: KeySource::Secret(SECRET.into()),
        watermark_interval: Duration::from_millis(20),
        health_interval: Duration::from_millis(200),
        ..QueryApiConfig::default()
    }
}

pub async fn migrated(pool: &PgPool) {
    event_log::migrate(pool).await.unwrap();
    projections::migrate(pool).await.unwrap();
}

pub async fn start(pool: &PgPool, config: QueryApiConfig) -> TestApi {
    let api = QueryApi::build(config, pool.clone(), command_api::telemetry::prometheus())
        .await
        .unwrap();
    let addr = api.local_addr();
    let stop = CancellationToken::new();
    tokio::spawn(api.run_until_stopped(stop.clone().cancelled_owned()));
    let client = reqwest::Client::new();
    // Serving once /healthz answers.
    for _ in 0..200 {
        if client.get(format!("http://{addr}/healthz")).send().await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    TestApi { addr, client, stop }
}

pub fn token(user: Uuid, role: Role) -> String {
    mint_token(
        SECRET,
        &user.to_string(),
        role,
        &[],
        Utc::now(),
        chrono::Duration::hours(1),
    )
    .unwrap()
}

pub fn admin() -> String {
    token(Uuid::from_u128(0xad), Role::Admin)
}

/// One answer: status, `x-cache` and `x-read-source` headers, JSON body.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub cache: Option<String>,
    pub source: Option<String>,
    pub position: Option<i64>,
    pub body: Value,
}

impl Answer {
    /// `data`, after checking there are no errors.
    pub fn data(&self) -> &Value {
        assert_eq!(self.status, StatusCode::OK, "{}", self.body);
        assert!(self.body.get("errors").is_none(), "unexpected errors: {}", self.body);
        &self.body["data"]
    }

    /// The `extensions.code` of the first error.
    pub fn error_code(&self) -> &str {
        self.body["errors"][0]["extensions"]["code"]
            .as_str()
            .unwrap_or_default()
    }
}

impl TestApi {
    pub async fn post_json(&self, token: Option<&str>, body: &Value, headers: &[(&str, &str)]) -> Answer {
        let mut request = self.client.post(format!("http://{}/graphql", self.addr)).json(body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.send().await.unwrap();
        answer(response).await
    }

    pub async fn query(&self, token: &str, query: &str, variables: Value) -> Answer {
        self.post_json(Some(token), &json!({"query": query, "variables": variables}), &[])
            .await
    }

    /// The `/readyz` document.
    pub async fn readiness(&self) -> Value {
        self.client
            .get(format!("http://{}/readyz", self.addr))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    pub async fn metrics(&self) -> String {
        self.client
            .get(format!("http://{}/metrics", self.addr))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

pub async fn answer(response: reqwest::Response) -> Answer {
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let (status, cache, source, position) = (
        response.status(),
        header("x-cache"),
        header("x-read-source"),
        header("x-read-position").and_then(|p| p.parse().ok()),
    );
    let text = response.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({status}): {text}"));
    Answer {
        status,
        cache,
        source,
        position,
        body,
    }
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
    sqlx::query("DELETE FROM device_stats").execute(pool).await.unwrap();
    sqlx::query(
        "INSERT INTO device_stats (user_id, status, provider, device_count, total_cpu_cores, total_memory_mb, last_created_at)
         SELECT owner_id, status, provider, count(*), sum(cpu_cores), sum(memory_mb), max(created_at)
         FROM devices WHERE status <> 'deleted' GROUP BY owner_id, status, provider",
    )
    .execute(pool)
    .await
    .unwrap();
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
