//! A query API on the test's database and a client for it; read sources and query APIs on the
//! streaming replica (ops/dev/replica.sh).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use http_edge::auth::{KeySource, Role};
use query_api::{QueryApi, QueryApiConfig, ReadSources, SourcesConfig};
use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{services, tokens, urls};

/// The secret of [`test_config`]'s keys.
pub const SECRET: &str = "query-api-test-secret";

/// A running query API; stops when dropped.
#[derive(Debug)]
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

/// A configuration for tests: the test secret, a free port, quick refreshes, and a patient
/// wait for a position asked for.
pub fn test_config() -> QueryApiConfig {
    QueryApiConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        keys: KeySource::Secret(SECRET.into()),
        watermark_interval: Duration::from_millis(20),
        health_interval: Duration::from_millis(200),
        // Tests read their own writes through projectors running in the test process, on a
        // machine the test command shares with load tests: there the projectors may stand
        // further behind than production's 2 s budget. The answer is awaited, not the budget;
        // a test of the budget sets its own.
        sources: SourcesConfig {
            position_wait: Duration::from_secs(30),
            ..SourcesConfig::default()
        },
        ..QueryApiConfig::default()
    }
}

/// Starts a query API on `pool` with `config`; returns once it serves.
pub async fn start(pool: &PgPool, config: QueryApiConfig) -> TestApi {
    let api = QueryApi::build(config, pool.clone(), http_edge::telemetry::prometheus())
        .await
        .unwrap();
    let addr = api.local_addr();
    let stop = CancellationToken::new();
    tokio::spawn(api.run_until_stopped(stop.clone().cancelled_owned()));
    // A request that hangs fails the test with the request named, well before the runner's
    // own timeout would end it silently.
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    // Serving once /healthz answers.
    for _ in 0..200 {
        if client.get(format!("http://{addr}/healthz")).send().await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    TestApi { addr, client, stop }
}

/// A token for `user` with `role`, signed with [`SECRET`].
pub fn token(user: Uuid, role: Role) -> String {
    tokens::signed(SECRET, &user.to_string(), role, &[])
}

/// An admin's token, signed with [`SECRET`].
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

    /// One metric's value summed over its series (0 when absent).
    pub async fn metric(&self, name: &str) -> f64 {
        self.metrics()
            .await
            .lines()
            .filter(|line| line.starts_with(name) && line[name.len()..].starts_with([' ', '{']))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

async fn answer(response: reqwest::Response) -> Answer {
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

/// Starts the shared replica, migrates the test's database, waits until the replica has
/// replayed that, and returns read sources over both with the replica in rotation.
pub async fn replica_sources(pool: &PgPool) -> ReadSources {
    let url = services::replica_of(pool).await;
    let config = SourcesConfig {
        position_wait: Duration::from_secs(5),
        ..SourcesConfig::default()
    };
    let sources = ReadSources::new(pool.clone(), &[url], config).unwrap();
    in_rotation(&sources, true).await;
    sources
}

/// Probes until the replica is (or is not) in rotation.
pub async fn in_rotation(sources: &ReadSources, wanted: bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        sources.check_health().await;
        if sources
            .replica_states()
            .iter()
            .all(|(_, healthy, _)| *healthy == wanted)
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "replica never became {}: {:?}",
            if wanted { "healthy" } else { "unhealthy" },
            sources.replica_states()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A query API reading from the replica (the cache off, so every query reads).
pub async fn on_replica(pool: &PgPool) -> TestApi {
    let url = urls::replica_database(pool).await;
    let config = QueryApiConfig {
        replica_urls: vec![url],
        cache_max_bytes: 0,
        sources: SourcesConfig {
            position_wait: Duration::from_secs(5),
            ..SourcesConfig::default()
        },
        ..test_config()
    };
    start(pool, config).await
}
