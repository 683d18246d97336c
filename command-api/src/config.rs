//! What the command API is configured with (the binary fills it from flags and environment).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use event_log::erasure_ledger::ErasureLedger;
use event_log::personal::MasterKeyring;

use http_edge::auth::KeySource;

/// How commands reach the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendMode {
    /// Coalesced by the writer task (the default).
    GroupCommit,
    /// One transaction per command: the naive baseline benchmarks compare against.
    Unbatched,
}

#[derive(Debug, Clone)]
pub struct ApiConfig {
    pub listen: SocketAddr,
    pub keys: KeySource,
    /// Longest lifetime (`exp - iat`) of a token accepted; `None` accepts any.
    pub max_token_lifetime: Option<Duration>,
    /// Largest request body accepted.
    pub max_body_bytes: usize,
    /// Requests per second each client (token subject) may send, with bursts up to `rate_burst`.
    pub rate_per_second: u32,
    pub rate_burst: u32,
    /// Longest a request may take before it is answered 503 (its append may still commit;
    /// a retry with the same Idempotency-Key tells).
    pub request_timeout: Duration,
    /// How often a command is decided again after a concurrent change to its streams.
    pub max_attempts: u32,
    /// Aggregates kept in memory.
    pub cached_aggregates: u64,
    pub append_mode: AppendMode,
    /// Master keys that wrap the per-user keys of personal data.
    pub master_keys: Arc<MasterKeyring>,
    /// Connection limit and header, body and keep-alive timeouts of the listener.
    pub connections: http_edge::connections::ConnectionLimits,
    /// Origins of browser apps allowed to call this API (see `http_edge::cors`); none by
    /// default.
    pub cors_origins: Vec<axum::http::HeaderValue>,
    /// The erasure ledger (event_log::erasure_ledger): each erasure is written there, fsync'd,
    /// before the data key is destroyed, and at start every erasure it names is reapplied to
    /// the database (a restore may have rolled them back). `None`: erasures are only in the
    /// database.
    pub erasure_ledger: Option<Arc<ErasureLedger>>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            keys: KeySource::Secret(http_edge::auth::DEVELOPMENT_SECRET.to_owned()),
            max_token_lifetime: Some(http_edge::auth::DEFAULT_MAX_TOKEN_LIFETIME),
            max_body_bytes: 256 * 1024,
            rate_per_second: 2_000,
            rate_burst: 4_000,
            request_timeout: Duration::from_secs(10),
            max_attempts: 20,
            cached_aggregates: 200_000,
            append_mode: AppendMode::GroupCommit,
            master_keys: Arc::new(MasterKeyring::development()),
            connections: http_edge::connections::ConnectionLimits::default(),
            cors_origins: Vec::new(),
            erasure_ledger: None,
        }
    }
}

/// Most operations in one `POST /v1/devices/batch`.
pub const MAX_BATCH_OPERATIONS: usize = 500;
