//! What the query API is configured with (the binary fills it from flags and environment).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use event_log::personal::MasterKeyring;
use http_edge::auth::{DEVELOPMENT_SECRET, KeySource};

use crate::graphql::Limits;
use crate::sources::SourcesConfig;

#[derive(Debug, Clone)]
pub struct QueryApiConfig {
    pub listen: SocketAddr,
    /// Read replicas; none sends every read to the primary.
    pub replica_urls: Vec<String>,
    pub keys: KeySource,
    /// Longest lifetime (`exp - iat`) of a token accepted; `None` accepts any.
    pub max_token_lifetime: Option<Duration>,
    /// Master keys that unwrap users' data keys, to show personal data in audit exports.
    pub master_keys: Arc<MasterKeyring>,
    pub limits: Limits,
    /// Longest a query may run before it is answered with a `TIMEOUT` error.
    pub query_timeout: Duration,
    /// Largest request body accepted.
    pub max_body_bytes: usize,
    /// Bytes of answers the cache holds; 0 turns the cache off.
    pub cache_max_bytes: u64,
    /// How stale a cached answer may be for a caller that names no position: answers are
    /// keyed by an epoch of the checkpoints that moves at most this often. Zero keys by the
    /// exact checkpoints (every projected batch is a new key).
    pub cache_staleness: Duration,
    /// Persisted query texts remembered.
    pub persisted_queries: u64,
    /// Nice value of the threads GraphQL documents are validated and executed on (see
    /// [`crate::executor`]); 0 keeps the process's priority.
    pub executor_nice: i32,
    /// When set, only these documents run.
    pub safelist: Option<Arc<crate::safelist::Safelist>>,
    /// Schema introspection (GraphiQL needs it).
    pub introspection: bool,
    /// GraphiQL at `GET /graphql`.
    pub graphiql: bool,
    pub sources: SourcesConfig,
    /// How often replicas are probed for health and lag.
    pub health_interval: Duration,
    /// How often each source's projection checkpoints are read (cache keys and
    /// read-your-writes routing use them).
    pub watermark_interval: Duration,
    /// Queries per second each client (token subject) may send, with bursts up to `rate_burst`.
    pub rate_per_second: u32,
    pub rate_burst: u32,
    /// Connection limit and header, body and keep-alive timeouts of the listener.
    pub connections: http_edge::connections::ConnectionLimits,
    /// Subscriptions: evaluation pacing and per-socket limits.
    pub live: crate::subscriptions::LiveConfig,
    /// Origins of browser apps allowed to call this API (see `http_edge::cors`); none by
    /// default.
    pub cors_origins: Vec<axum::http::HeaderValue>,
}

impl Default for QueryApiConfig {
    fn default() -> Self {
        QueryApiConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8081)),
            replica_urls: Vec::new(),
            keys: KeySource::Secret(DEVELOPMENT_SECRET.to_owned()),
            max_token_lifetime: Some(http_edge::auth::DEFAULT_MAX_TOKEN_LIFETIME),
            master_keys: Arc::new(MasterKeyring::development()),
            limits: Limits::default(),
            query_timeout: Duration::from_secs(5),
            max_body_bytes: 64 * 1024,
            cache_max_bytes: 64 * 1024 * 1024,
            cache_staleness: Duration::from_secs(1),
            persisted_queries: 10_000,
            safelist: None,
            executor_nice: 10,
            introspection: true,
            graphiql: true,
            sources: SourcesConfig::default(),
            health_interval: Duration::from_secs(1),
            watermark_interval: Duration::from_millis(100),
            rate_per_second: 2_000,
            rate_burst: 4_000,
            connections: http_edge::connections::ConnectionLimits::default(),
            live: crate::subscriptions::LiveConfig::default(),
            cors_origins: Vec::new(),
        }
    }
}
