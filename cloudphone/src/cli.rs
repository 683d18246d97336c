//! Every flag of the binary, with its `CLOUDPHONE_*` environment fallback.

use std::net::SocketAddr;

use clap::{Args, Parser, Subcommand, ValueEnum};

pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/cloudphone";

#[derive(Debug, Parser)]
#[command(
    name = "cloudphone",
    version,
    about = "The Cloudphone event platform: every role and operator verb in one binary.",
    long_about = "The Cloudphone event platform: every role and operator verb in one binary.\n\n\
        Every flag can also be set through the environment variable named after it \
        (CLOUDPHONE_DATABASE_URL for --database-url, ...). Defaults serve a local PostgreSQL \
        with no Kafka (the embedded default)."
)]
pub struct Cli {
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

#[derive(Debug, Args)]
pub struct TelemetryArgs {
    /// Log format [default: text on a terminal, json otherwise].
    #[arg(long, env = "CLOUDPHONE_LOG_FORMAT", value_enum, global = true)]
    pub log_format: Option<LogFormat>,
    /// Which logs to show, in `RUST_LOG` syntax (e.g. `info,event_log=debug`).
    #[arg(long = "log", env = "CLOUDPHONE_LOG", default_value = "info", global = true)]
    pub log_filter: String,
    /// Export traces to this OpenTelemetry collector, OTLP over HTTP/protobuf (e.g.
    /// `http://otel-collector:4318`; `/v1/traces` is appended). Request spans continue the
    /// caller's `traceparent` [default: off].
    #[arg(long, env = "CLOUDPHONE_OTLP_ENDPOINT", global = true)]
    pub otlp_endpoint: Option<String>,
    /// The `service.name` exported traces carry (e.g. the role: `cloudphone-command-api`).
    #[arg(
        long,
        env = "CLOUDPHONE_OTLP_SERVICE_NAME",
        default_value = "cloudphone",
        global = true
    )]
    pub otlp_service_name: String,
}

#[derive(Debug, Clone, Args)]
pub struct DatabaseArgs {
    /// The primary PostgreSQL database; created if it does not exist.
    #[arg(long, env = "CLOUDPHONE_DATABASE_URL", default_value = DEFAULT_DATABASE_URL)]
    pub database_url: String,
    /// Most connections this process opens to the primary.
    #[arg(long, env = "CLOUDPHONE_DATABASE_MAX_CONNECTIONS", default_value_t = 16)]
    pub database_max_connections: u32,
}

#[derive(Debug, Clone, Args)]
pub struct PlatformArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// Apply the migrations at start (idempotent, serialised by an advisory lock). Turn off
    /// for a role that connects through PgBouncer in transaction mode, where a session lock
    /// would outlive its client; run `cloudphone migrate` directly on the primary instead.
    #[arg(long, env = "CLOUDPHONE_MIGRATE_ON_START", default_value_t = true, action = clap::ArgAction::Set)]
    pub migrate_on_start: bool,
    /// Read replicas, comma-separated [default: none; reads go to the primary].
    #[arg(long, env = "CLOUDPHONE_REPLICA_URLS", value_delimiter = ',')]
    pub replica_urls: Vec<String>,
    /// Kafka bootstrap servers [default: none; projectors tail the PostgreSQL log].
    #[arg(long, env = "CLOUDPHONE_KAFKA_BROKERS")]
    pub kafka_brokers: Option<String>,
    /// The topic the relay publishes the log to and projectors consume.
    #[arg(long, env = "CLOUDPHONE_KAFKA_TOPIC", default_value = event_log::relay::DEFAULT_TOPIC)]
    pub kafka_topic: String,
    /// Partitions of the topic when the relay creates it.
    #[arg(long, env = "CLOUDPHONE_KAFKA_PARTITIONS", default_value_t = 6)]
    pub kafka_partitions: i32,
    /// A stable identity for this projector process in its consumer groups (Kafka static
    /// membership, e.g. the pod name of a StatefulSet): restarted with the same identity, it
    /// takes its partitions back without a rebalance of the whole group.
    #[arg(long, env = "CLOUDPHONE_KAFKA_INSTANCE_ID")]
    pub kafka_instance_id: Option<String>,
    /// Longest a projector's fetch waits at the broker when there is nothing new, in ms
    /// (`fetch.wait.max.ms`). Apache Kafka answers as soon as a message arrives; a broker
    /// that waits it out adds up to this to every event's latency.
    #[arg(long, env = "CLOUDPHONE_KAFKA_FETCH_WAIT_MS", default_value_t = 10)]
    pub kafka_fetch_wait_ms: u64,
    /// Where the projector and relay roles serve /healthz, /readyz and /metrics (`serve` and
    /// the APIs serve them on their own listeners). Port 0 picks a free port.
    #[arg(long, env = "CLOUDPHONE_OPS_LISTEN", default_value = "127.0.0.1:9464")]
    pub ops_listen: SocketAddr,
    /// Where the command API listens.
    #[arg(long, env = "CLOUDPHONE_COMMAND_LISTEN", default_value = "127.0.0.1:8080")]
    pub command_listen: SocketAddr,
    /// Where the query API listens.
    #[arg(long, env = "CLOUDPHONE_QUERY_LISTEN", default_value = "127.0.0.1:8081")]
    pub query_listen: SocketAddr,
    #[command(flatten)]
    pub auth: AuthArgs,
    #[command(flatten)]
    pub master_keys: MasterKeyArgs,
    #[command(flatten)]
    pub query: QueryArgs,
    /// Requests per second each client (token subject) may send.
    #[arg(long, env = "CLOUDPHONE_RATE_LIMIT", default_value_t = 2000)]
    pub rate_limit: u32,
    /// Seconds a request may take before it is answered 503 (counted once its body is in).
    #[arg(long, env = "CLOUDPHONE_REQUEST_TIMEOUT", default_value_t = 10)]
    pub request_timeout: u64,
    /// Connections each API listener keeps open at once; past it a new connection is answered
    /// 503 `too_many_connections` and closed [default: 30000, or less to fit the
    /// file-descriptor limit, which start-up raises as far as it may].
    #[arg(long, env = "CLOUDPHONE_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Seconds a client has to send a request's headers, counted from when the connection
    /// is ready for a request; a connection that trickles them is closed.
    #[arg(long, env = "CLOUDPHONE_HEADER_READ_TIMEOUT_SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub header_read_timeout_secs: u64,
    /// Seconds a request body may take to arrive once its headers have; then 408.
    #[arg(long, env = "CLOUDPHONE_BODY_READ_TIMEOUT_SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub body_read_timeout_secs: u64,
    /// Seconds a kept-alive connection may sit idle (no request, no bytes) before it is closed.
    #[arg(long, env = "CLOUDPHONE_KEEP_ALIVE_TIMEOUT_SECS", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    pub keep_alive_timeout_secs: u64,
    /// Hours an idempotency key answers retries with its original outcome; after that the
    /// same key is a new request. 0 keeps keys forever.
    #[arg(long, env = "CLOUDPHONE_IDEMPOTENCY_RETENTION_HOURS", default_value_t = 24)]
    pub idempotency_retention_hours: u64,
    /// Months after the current one that always have a partition of the log. The command
    /// API (and `serve`) checks at start and every --partition-maintenance-interval-secs, and
    /// recreates a missing month.
    #[arg(
        long,
        env = "CLOUDPHONE_PARTITIONS_AHEAD",
        default_value_t = event_log::DEFAULT_PARTITIONS_AHEAD,
        value_parser = clap::value_parser!(u32).range(0..=120)
    )]
    pub partitions_ahead: u32,
    /// Seconds between two partition maintenance passes (months ahead created, months past
    /// --partition-retention-months archived). Hourly checks keep the months ahead with
    /// plenty of margin and recover quickly from a failed pass.
    #[arg(
        long,
        env = "CLOUDPHONE_PARTITION_MAINTENANCE_INTERVAL_SECS",
        default_value_t = 3600,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub partition_maintenance_interval_secs: u64,
    /// Move a month of the log to the archive (`user_events_archive`, still read by stream
    /// reads, exports, verify and replays) once it ended more than this many months ago and
    /// the log has moved past it [default: never archive].
    #[arg(long, env = "CLOUDPHONE_PARTITION_RETENTION_MONTHS")]
    pub partition_retention_months: Option<u32>,
    /// How commands reach the log: `group` (group commit) or `unbatched` (one transaction per
    /// command: the benchmark baseline).
    #[arg(long, env = "CLOUDPHONE_APPEND_MODE", value_enum, default_value = "group")]
    pub append_mode: AppendModeArg,
}

impl PlatformArgs {
    /// The API listeners' connection limits.
    pub fn connection_limits(&self) -> command_api::connections::ConnectionLimits {
        let defaults = command_api::connections::ConnectionLimits::default();
        command_api::connections::ConnectionLimits {
            max_connections: self.max_connections.unwrap_or(defaults.max_connections).max(1),
            header_read_timeout: std::time::Duration::from_secs(self.header_read_timeout_secs),
            body_read_timeout: std::time::Duration::from_secs(self.body_read_timeout_secs),
            keep_alive_timeout: std::time::Duration::from_secs(self.keep_alive_timeout_secs),
        }
    }
}

/// The query API's limits, cache and replica routing.
#[derive(Debug, Clone, Args)]
pub struct QueryArgs {
    /// Megabytes of answers the query cache holds (0 turns it off).
    #[arg(long, env = "CLOUDPHONE_QUERY_CACHE_MB", default_value_t = 64)]
    pub query_cache_mb: u64,
    /// Milliseconds a cached answer may lag the newest checkpoint for a query that names no
    /// position (answers are recomputed at most this often while projections move; 0: at
    /// every projected batch).
    #[arg(long, env = "CLOUDPHONE_QUERY_CACHE_STALENESS_MS", default_value_t = 1000)]
    pub query_cache_staleness_ms: u64,
    /// Milliseconds a query may run before it is stopped with a TIMEOUT error.
    #[arg(long, env = "CLOUDPHONE_QUERY_TIMEOUT_MS", default_value_t = 5000)]
    pub query_timeout_ms: u64,
    /// Largest `first` / `last` of a connection.
    #[arg(long, env = "CLOUDPHONE_QUERY_MAX_PAGE_SIZE", default_value_t = 100)]
    pub query_max_page_size: i32,
    /// Deepest nesting of fields in a query (introspection has its own limit of 20).
    #[arg(long, env = "CLOUDPHONE_QUERY_MAX_DEPTH", default_value_t = 12)]
    pub query_max_depth: usize,
    /// Largest complexity of a query (fields, multiplied by page sizes of connections).
    #[arg(long, env = "CLOUDPHONE_QUERY_MAX_COMPLEXITY", default_value_t = 5000)]
    pub query_max_complexity: usize,
    /// Most fields a document may select once its fragments are expanded (measured without
    /// expanding them, before validation).
    #[arg(long, env = "CLOUDPHONE_QUERY_MAX_SELECTIONS", default_value_t = 5000)]
    pub query_max_selections: u64,
    /// Most lexical tokens in a document.
    #[arg(long, env = "CLOUDPHONE_QUERY_MAX_TOKENS", default_value_t = 4000)]
    pub query_max_tokens: usize,
    /// Most aliases in a document.
    #[arg(long, env = "CLOUDPHONE_QUERY_MAX_ALIASES", default_value_t = 64)]
    pub query_max_aliases: usize,
    /// Most fragment definitions in a document.
    #[arg(long, env = "CLOUDPHONE_QUERY_MAX_FRAGMENTS", default_value_t = 64)]
    pub query_max_fragments: usize,
    /// Nice value (0 to 19) of the threads GraphQL documents are validated and executed on:
    /// above the rest of the process's, so that when the CPU is short, health checks, portal
    /// commands and projections get it first.
    #[arg(long, env = "CLOUDPHONE_QUERY_EXECUTOR_NICE", default_value_t = 10, value_parser = clap::value_parser!(i32).range(0..=19))]
    pub query_executor_nice: i32,
    /// Run only the documents of this file (an Apollo persisted query manifest, or a JSON
    /// map of ids to documents); every other document is refused with DOCUMENT_NOT_ALLOWED
    /// [default: any document within the limits runs].
    #[arg(long, env = "CLOUDPHONE_GRAPHQL_SAFELIST")]
    pub graphql_safelist: Option<std::path::PathBuf>,
    /// Serve GraphiQL at GET /graphql (turn off in production if dashboards do not need it).
    #[arg(long, env = "CLOUDPHONE_GRAPHIQL", default_value_t = true, action = clap::ArgAction::Set)]
    pub graphiql: bool,
    /// Answer schema introspection queries.
    #[arg(long, env = "CLOUDPHONE_GRAPHQL_INTROSPECTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub graphql_introspection: bool,
    /// A replica further behind the primary than this many bytes of WAL leaves rotation.
    #[arg(long, env = "CLOUDPHONE_REPLICA_MAX_LAG_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub replica_max_lag_bytes: i64,
    /// Milliseconds a read-your-writes query (minPosition / X-Min-Position) waits for a
    /// replica to reach its position before the primary answers.
    #[arg(long, env = "CLOUDPHONE_READ_YOUR_WRITES_WAIT_MS", default_value_t = 2000)]
    pub read_your_writes_wait_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AppendModeArg {
    Group,
    Unbatched,
}

#[derive(Debug, Clone, Args)]
pub struct AuthArgs {
    /// HS256 secret for bearer tokens [default: a fixed development secret, with a warning].
    #[arg(long, env = "CLOUDPHONE_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// Verify RS256/ES256 tokens with this public key (PEM) instead of the secret.
    #[arg(long, env = "CLOUDPHONE_JWT_PUBLIC_KEY", conflicts_with = "jwks_file")]
    pub jwt_public_key: Option<std::path::PathBuf>,
    /// Algorithm of --jwt-public-key: RS256 or ES256.
    #[arg(long, env = "CLOUDPHONE_JWT_ALGORITHM", default_value = "RS256")]
    pub jwt_algorithm: String,
    /// Verify tokens with the keys of this JWKS file (chosen by the token's `kid`).
    #[arg(long, env = "CLOUDPHONE_JWKS_FILE")]
    pub jwks_file: Option<std::path::PathBuf>,
    /// Longest lifetime (`exp` minus `iat`) of a token accepted, in seconds; 0 accepts any.
    /// `nbf` and `iat` are checked too, with 30 s of leeway for clock skew.
    #[arg(long, env = "CLOUDPHONE_MAX_TOKEN_LIFETIME_SECS", default_value_t = 86_400)]
    pub max_token_lifetime_secs: u64,
}

impl AuthArgs {
    /// The token lifetime limit, `None` for no limit.
    pub fn max_token_lifetime(&self) -> Option<std::time::Duration> {
        (self.max_token_lifetime_secs > 0).then(|| std::time::Duration::from_secs(self.max_token_lifetime_secs))
    }
}

/// The master keys that wrap each user's personal-data key.
#[derive(Debug, Clone, Args)]
pub struct MasterKeyArgs {
    /// The active master key, `<id>:<base64 of 32 bytes>` (`cloudphone keys generate` makes
    /// one). New data keys are wrapped with it [default: a development key from the source
    /// code, with a warning].
    #[arg(long, env = "CLOUDPHONE_MASTER_KEY", hide_env_values = true)]
    pub master_key: Option<String>,
    /// Earlier master keys, comma-separated, still accepted for unwrapping until
    /// `cloudphone keys rotate` has rewrapped everything under the active one.
    #[arg(
        long,
        env = "CLOUDPHONE_PREVIOUS_MASTER_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub previous_master_keys: Vec<String>,
}

impl MasterKeyArgs {
    pub fn keyring(&self) -> anyhow::Result<std::sync::Arc<event_log::personal::MasterKeyring>> {
        let keyring =
            event_log::personal::MasterKeyring::from_config(self.master_key.as_deref(), &self.previous_master_keys)?;
        if keyring.is_development() {
            tracing::warn!(
                "NO MASTER KEY CONFIGURED: personal data is encrypted under the built-in development \
                 master key. Set CLOUDPHONE_MASTER_KEY (cloudphone keys generate) in production."
            );
        }
        Ok(std::sync::Arc::new(keyring))
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run every role in one process: the embedded default.
    Serve(PlatformArgs),
    /// Run the HTTP command API for portals.
    CommandApi(PlatformArgs),
    /// Run the GraphQL query API for dashboards.
    QueryApi(PlatformArgs),
    /// Run projector workers that build the read models.
    Projector(PlatformArgs),
    /// Run the outbox relay that publishes the log to Kafka.
    Relay(PlatformArgs),
    /// Create the database if missing and apply partitions.sql and the migrations.
    Migrate(DatabaseArgs),
    /// Inspect and maintain the monthly partitions of the event log.
    Partitions {
        #[command(flatten)]
        database: DatabaseArgs,
        #[command(subcommand)]
        action: PartitionsAction,
    },
    /// Rebuild a projection from the whole history beside the live one, then swap it in.
    Replay(ReplayArgs),
    /// Export event history as NDJSON or CSV (with a trailer that `verify --file` checks).
    Export(ExportArgs),
    /// Master keys of personal data: generate one, rotate data keys to the active one, status.
    Keys {
        #[command(subcommand)]
        action: KeysAction,
    },
    /// Recompute the hash chain over the log and report the first position where it breaks.
    Verify(VerifyArgs),
    /// Drive the platform with a realistic load and report.
    Load {
        #[command(subcommand)]
        kind: LoadKind,
    },
    /// Print a bearer token signed with the configured HS256 secret (for local use and scripts).
    Token(TokenArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RoleArg {
    User,
    Admin,
    Service,
    /// May export and verify the event history, nothing else.
    Auditor,
}

#[derive(Debug, Args)]
pub struct TokenArgs {
    /// The user id (for user and admin tokens) or the service name.
    #[arg(long, alias = "subject")]
    pub user: String,
    #[arg(long, value_enum, default_value = "user")]
    pub role: RoleArg,
    /// Scopes of a service token (users:write, devices:write, devices:report), repeatable.
    #[arg(long)]
    pub scope: Vec<String>,
    /// Hours until the token expires.
    #[arg(long, default_value_t = 24)]
    pub ttl_hours: i64,
    /// HS256 secret [default: the development secret].
    #[arg(long, env = "CLOUDPHONE_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum PartitionsAction {
    /// Create partitions for this month and the months ahead (idempotent).
    Ensure {
        /// Months after the current one to create.
        #[arg(long, default_value_t = event_log::DEFAULT_PARTITIONS_AHEAD)]
        months_ahead: u32,
    },
    /// List live and archived partitions.
    List,
    /// Move a sealed month (one the log has moved past) to the archive table.
    Detach {
        /// The month, as YYYY-MM.
        month: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ProjectionArg {
    /// `devices` and `device_stats`.
    Fleet,
    /// `daily_usage` (and, from version 2, `daily_usage_by_provider`).
    DailyUsage,
}

impl From<ProjectionArg> for projections::Projection {
    fn from(arg: ProjectionArg) -> Self {
        match arg {
            ProjectionArg::Fleet => projections::Projection::Fleet,
            ProjectionArg::DailyUsage => projections::Projection::DailyUsage,
        }
    }
}

/// `cloudphone replay <projection> [--version N]`, or one of the housekeeping actions.
///
/// The rebuild goes into its own schema while the live version keeps serving and keeps up;
/// near the head it is swapped in atomically. A replay that is stopped or killed resumes
/// from its last checkpoint when run again with the same version.
#[derive(Debug, Args)]
pub struct ReplayArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// The projection to rebuild.
    #[arg(value_enum, required_unless_present_any = ["drop_old", "status"])]
    pub projection: Option<ProjectionArg>,
    /// The version to build [default: the newest this binary knows].
    #[arg(long)]
    pub version: Option<i32>,
    /// Drop the tables that swaps replaced (of the projection given, or of all), then exit.
    #[arg(long, conflicts_with_all = ["version", "abandon"])]
    pub drop_old: bool,
    /// Give up the projection's rebuild in progress (drops its schema), then exit.
    #[arg(long, requires = "projection", conflicts_with = "version")]
    pub abandon: bool,
    /// List rebuilds (in progress, live, superseded) and exit.
    #[arg(long)]
    pub status: bool,
    /// After a swap, keep this many replaced versions per projection and drop older ones
    /// [default: keep all until --drop-old].
    #[arg(long, env = "CLOUDPHONE_REPLAY_KEEP_OLD")]
    pub keep_old: Option<usize>,
    /// Longest time between two checkpoints of the bulk phase (what a kill can lose).
    #[arg(long, env = "CLOUDPHONE_REPLAY_CHECKPOINT_EVERY_MS", default_value_t = 60_000)]
    pub checkpoint_every_ms: u64,
    /// Folded rows held in memory before a checkpoint writes them out (about 120 bytes
    /// each). A rebuild that fits writes its tables straight from memory.
    #[arg(long, env = "CLOUDPHONE_REPLAY_MAX_BUFFERED_ROWS", default_value_t = 10_000_000)]
    pub max_buffered_rows: usize,
    /// Events read per page in the bulk phase.
    #[arg(long, env = "CLOUDPHONE_REPLAY_PAGE_EVENTS", default_value_t = 20_000)]
    pub page_events: i64,
    /// Swap once the rebuild is at most this many events behind the head.
    #[arg(long, env = "CLOUDPHONE_REPLAY_SWAP_LAG_EVENTS", default_value_t = 1_000)]
    pub swap_lag_events: i64,
    /// How long the swap may wait for the live tables' locks before retrying (queries on
    /// those tables wait behind it meanwhile).
    #[arg(long, env = "CLOUDPHONE_REPLAY_LOCK_TIMEOUT_MS", default_value_t = 2_000)]
    pub lock_timeout_ms: u64,
    /// Serve /metrics, /healthz and /readyz here while the replay runs [default: not served].
    #[arg(long, env = "CLOUDPHONE_REPLAY_OPS_LISTEN")]
    pub ops_listen: Option<std::net::SocketAddr>,
    /// Print the summary as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

/// `cloudphone verify`: the log's hash chain, or an export file's.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// First position to verify (its predecessor's stored hash is trusted as the anchor).
    #[arg(long, default_value_t = 1, conflicts_with = "file")]
    pub from: i64,
    /// Last position to verify [default: the head of the log].
    #[arg(long, conflicts_with = "file")]
    pub to: Option<i64>,
    /// Verify this export file (NDJSON or CSV, from `cloudphone export` or
    /// `GET /v1/audit/events`) instead of the log: every hash, the links between
    /// consecutive positions, and the trailer (a truncated file has none). `-` is stdin.
    #[arg(long)]
    pub file: Option<std::path::PathBuf>,
    /// With --file: the file's format [default: from its extension or first bytes].
    #[arg(long, value_enum, requires = "file")]
    pub format: Option<ExportFormatArg>,
    /// With --file: also compare the file's first and last hashes with the log's at those
    /// positions, proving the file is the log's history and not a chain made up anew.
    #[arg(long, requires = "file")]
    pub against_log: bool,
}

/// `cloudphone export`: the same filters as `GET /v1/audit/events`, streamed in constant
/// memory from the log (archived months included) to a file or stdout.
#[derive(Debug, Args)]
pub struct ExportArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,
    #[command(flatten)]
    pub master_keys: MasterKeyArgs,
    /// Only events owned by this user (their own and their devices').
    #[arg(long = "user")]
    pub user_id: Option<uuid::Uuid>,
    /// Only events of this stream (a user or a device).
    #[arg(long = "stream")]
    pub stream_id: Option<uuid::Uuid>,
    /// Only events of this type (e.g. UserRegistered).
    #[arg(long)]
    pub event_type: Option<String>,
    /// Events recorded at or after this time (RFC 3339).
    #[arg(long)]
    pub from: Option<chrono::DateTime<chrono::Utc>>,
    /// Events recorded before this time (RFC 3339).
    #[arg(long)]
    pub to: Option<chrono::DateTime<chrono::Utc>>,
    /// Resume after this position (the last one a partial file holds).
    #[arg(long, default_value_t = 0)]
    pub after: i64,
    /// Stop at this position [default: the head when the export starts].
    #[arg(long)]
    pub until: Option<i64>,
    /// File format [default: from the output's extension, else ndjson].
    #[arg(long, value_enum)]
    pub format: Option<ExportFormatArg>,
    /// Write here; `-` is stdout.
    #[arg(long, short = 'o', default_value = "-")]
    pub output: std::path::PathBuf,
    /// `decrypt`: personal fields shown decrypted (or as erased) beside the stored ciphertext;
    /// `omit`: ciphertext only (no master key needed).
    #[arg(long, value_enum, default_value = "decrypt")]
    pub personal: PersonalArg,
    /// Events read per query.
    #[arg(long, env = "CLOUDPHONE_EXPORT_PAGE_EVENTS", default_value_t = 10_000)]
    pub page_events: i64,
    /// Print the summary as JSON (on stderr when the export goes to stdout).
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ExportFormatArg {
    Ndjson,
    Csv,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PersonalArg {
    Decrypt,
    Omit,
}

#[derive(Debug, Subcommand)]
pub enum KeysAction {
    /// Print a new random master key (`<id>:<base64>`) for CLOUDPHONE_MASTER_KEY.
    Generate {
        /// The key's id, recorded beside every data key it wraps [default: a dated id].
        #[arg(long)]
        id: Option<String>,
    },
    /// Rewrap every data key under the active master key. Run it after making a new key
    /// active (and the old one a previous key) on every role; the roles keep serving
    /// throughout, and a stopped rotation is finished by running it again.
    Rotate {
        #[command(flatten)]
        database: DatabaseArgs,
        #[command(flatten)]
        master_keys: MasterKeyArgs,
        /// Data keys rewrapped per transaction.
        #[arg(long, default_value_t = 1_000)]
        batch: i64,
    },
    /// How many data keys each master key wraps, and how many users are erased.
    Status {
        #[command(flatten)]
        database: DatabaseArgs,
        #[command(flatten)]
        master_keys: MasterKeyArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum LoadKind {
    /// Portal commands over HTTP against the command API, group commit against the
    /// one-transaction-per-command baseline.
    Commands(LoadCommandsArgs),
    /// The projectors: catch-up throughput over a generated history and event-to-read-model
    /// latency under a steady stream, against `REFRESH MATERIALIZED VIEW CONCURRENTLY` of
    /// equivalent views on the same data (and through Kafka with `--kafka-brokers`).
    Projections(LoadProjectionsArgs),
    /// Dashboard GraphQL queries over HTTP against the query API, uncached and with its
    /// cache, against a PostGraphile v4 server over the same read-model tables (the
    /// generic GraphQL-over-PostgreSQL baseline), in the same run on the same data.
    Queries(LoadQueriesArgs),
    /// Replays: each projection rebuilt from a generated history (bulk rate, swap, effect on
    /// append latency), against `REFRESH MATERIALIZED VIEW` of equivalent views on the same
    /// data.
    Replay(LoadReplayArgs),
    /// The audit export: `cloudphone export` (NDJSON, CSV, personal data decrypted or
    /// omitted) and `verify --file` over a generated history, child processes of this binary
    /// (rate, peak RSS), against PostgreSQL's `COPY ... TO STDOUT` of the same columns.
    Export(LoadExportArgs),
    /// The whole platform: a generated world (users with quotas, a fleet, months of history
    /// across partitions), the command API, a projector and the query API as separate
    /// processes, driven at `--rate` operations/s by portal commands and dashboard queries
    /// (read-your-writes after a command), with audit exports and a replay in the background.
    /// Reports throughput and p50/p99/p999 per operation, projection lag, the query cache's
    /// hit ratio, errors by kind, CPU and RSS per role; fails on any 5xx or transport error.
    Platform(LoadPlatformArgs),
    /// Hostile clients: `cloudphone serve` as a child process, quiet and then attacked by
    /// `--connections` sockets trickling header lines and `--document-clients` clients
    /// sending the worst GraphQL documents known (fragment bombs, nesting, alias and token
    /// floods, introspection abuse, the heaviest allowed); reports `/healthz` and portal
    /// command p99 in both phases and each document kind's p99.
    Hostile(LoadHostileArgs),
    /// A history checker under faults (issue #20): the roles as separate processes on a
    /// PostgreSQL cluster of the run's own behind a TCP proxy, portal clients recording every
    /// operation's invocation and outcome while faults come on a schedule (primary restarted,
    /// `kill -9` of each role, the network to PostgreSQL cut or blackholed, with `--kafka` the
    /// broker killed); then the log is checked against the history (acknowledged exactly once,
    /// nothing from refusals, every refusal justified by the stream's state) and the read
    /// models against a rebuild. Fails on any violation.
    History(LoadHistoryArgs),
}

#[derive(Debug, Args)]
pub struct LoadHistoryArgs {
    /// Seconds of load with faults (longer if the first round of every fault kind needs it).
    #[arg(long, env = "CLOUDPHONE_LOAD_HISTORY_DURATION", default_value_t = 120)]
    pub duration: u64,
    /// Concurrent portal clients, each acting for two users, one operation at a time.
    #[arg(long, env = "CLOUDPHONE_LOAD_HISTORY_CLIENTS", default_value_t = 16)]
    pub clients: usize,
    /// Seed of the operations and of the fault schedule.
    #[arg(long, env = "CLOUDPHONE_LOAD_HISTORY_SEED", default_value_t = 42)]
    pub seed: u64,
    /// Seconds between the starts of two faults (each heals before the next).
    #[arg(long, env = "CLOUDPHONE_LOAD_HISTORY_FAULT_EVERY", default_value_t = 6, value_parser = clap::value_parser!(u64).range(1..))]
    pub fault_every: u64,
    /// Scale-out mode: the relay and two Kafka projector workers on a broker of the run's own
    /// (ops/dev/broker.sh on a free port), which the faults kill too.
    #[arg(long, env = "CLOUDPHONE_LOAD_HISTORY_KAFKA")]
    pub kafka: bool,
    /// Operations per second over all clients at most [default: as fast as answered; 40
    /// with --kafka, which the development broker carries].
    #[arg(long, env = "CLOUDPHONE_LOAD_HISTORY_RATE")]
    pub rate: Option<u64>,
    /// The command API's `--request-timeout` (s): short, so requests time out during faults
    /// while their appends wait in the group-commit writer's queue.
    #[arg(long, env = "CLOUDPHONE_LOAD_HISTORY_REQUEST_TIMEOUT", default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..))]
    pub request_timeout: u64,
    /// Also write the report as JSON to this file.
    #[arg(long, env = "CLOUDPHONE_LOAD_HISTORY_JSON")]
    pub json: Option<std::path::PathBuf>,
}

#[derive(Debug, Args)]
pub struct LoadHostileArgs {
    /// The server to use; the load runs in its own database `cloudphone_load_hostile`,
    /// recreated on every run (never in the one named here).
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// Sockets trickling header lines during the attack, split between the two APIs.
    #[arg(long, default_value_t = 20_000)]
    pub connections: usize,
    /// Clients sending hostile GraphQL documents during the attack.
    #[arg(long, default_value_t = 16)]
    pub document_clients: usize,
    /// Portal clients sending commands in both phases.
    #[arg(long, default_value_t = 8)]
    pub command_clients: usize,
    /// The document clients also send the costliest documents the limits let through (seven
    /// full device pages, the standard introspection query): legitimate load at full speed,
    /// beside the attack.
    #[arg(long)]
    pub with_allowed: bool,
    /// Seconds of each phase.
    #[arg(long, default_value_t = 30)]
    pub duration: u64,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
    /// Internal: only trickle `--connections` sockets at these `host:port`s until killed (the
    /// attack runs in several such processes, each within its file-descriptor limit).
    #[arg(long, hide = true, value_delimiter = ',')]
    pub trickle_at: Vec<String>,
}

#[derive(Debug, Args)]
pub struct LoadPlatformArgs {
    /// The server to use; the load runs in its own database `cloudphone_load_platform`,
    /// recreated on every run (never in the one named here).
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// The master keys the world's personal data is encrypted under (the roles get them too).
    #[command(flatten)]
    pub master_keys: MasterKeyArgs,
    /// Events of the generated world's history, recorded over the last `--history-months`.
    #[arg(long, default_value_t = 200_000)]
    pub history_events: u64,
    /// Months the world's history spans (each a partition of the log).
    #[arg(long, default_value_t = 6)]
    pub history_months: u32,
    /// Users of the world the portals and dashboards act for (their quotas are raised by an
    /// admin first, as support would for a busy customer).
    #[arg(long, default_value_t = 200)]
    pub users: usize,
    /// Seconds of measured load.
    #[arg(long, default_value_t = 60)]
    pub duration: u64,
    /// Operations per second, started on schedule whatever the answers' latency (open loop;
    /// latency counts from the scheduled start, so a stall is not hidden).
    #[arg(long, default_value_t = 300)]
    pub rate: u64,
    /// Percent of operations that are portal commands; the rest are dashboard queries.
    #[arg(long, default_value_t = 40)]
    pub command_percent: u32,
    /// Most operations in flight; a scheduled operation finding none free is counted as shed.
    #[arg(long, default_value_t = 256)]
    pub max_in_flight: usize,
    /// Seconds between two audit exports of a user's history (0: none).
    #[arg(long, default_value_t = 10)]
    pub export_every: u64,
    /// Skip the replay of `daily_usage` that starts a third of the way into the load.
    #[arg(long)]
    pub no_replay: bool,
    /// Seed of the world, the users chosen and the operation mix.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

#[derive(Debug, Args)]
pub struct LoadExportArgs {
    /// The server to use; the load runs in its own database `cloudphone_load_export`,
    /// recreated unless `--reuse` (never in the one named here).
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// The master keys the users' personal data is encrypted under (and the exports decrypt
    /// with).
    #[command(flatten)]
    pub master_keys: MasterKeyArgs,
    /// Events of generated history (device lifecycles and the owners' registrations).
    #[arg(long, default_value_t = 1_000_000)]
    pub events: u64,
    /// Keep the database if it already holds at least `--events` events (and export all of
    /// them) instead of writing the history again.
    #[arg(long)]
    pub reuse: bool,
    /// Events each export reads per query (`cloudphone export --page-events`).
    #[arg(long, default_value_t = 10_000)]
    pub page_events: i64,
    /// Seed of the generated history.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

#[derive(Debug, Args)]
pub struct LoadReplayArgs {
    /// The server to use; the load runs in its own database `cloudphone_load_replay`,
    /// recreated on every run (never in the one named here).
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// Events of generated history to replay.
    #[arg(long, default_value_t = 10_000_000)]
    pub events: u64,
    /// Single-event appends per second while append latency is measured.
    #[arg(long, default_value_t = 200)]
    pub rate: u64,
    /// Seconds of the quiet (no replay) append-latency phase.
    #[arg(long, default_value_t = 20)]
    pub duration: u64,
    /// Seed of the generated history.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

#[derive(Debug, Args)]
pub struct LoadQueriesArgs {
    /// The server to use; the load runs in its own database `cloudphone_load_queries`,
    /// dropped and recreated on every run (never in the one named here).
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// Devices in the generated read models (spread over the users, about six months).
    #[arg(long, default_value_t = 100_000)]
    pub devices: u64,
    /// Rows of `daily_usage` (one per device and UTC day with usage).
    #[arg(long, default_value_t = 1_000_000)]
    pub usage_rows: u64,
    /// Users the devices belong to (skewed: a few own hundreds of devices, the median user
    /// about `--devices / --users`).
    #[arg(long, default_value_t = 5_000)]
    pub users: u64,
    /// Users whose dashboards are being watched: each polls the same five queries (with its
    /// own device and 30-day range), as dashboards do.
    #[arg(long, default_value_t = 200)]
    pub hot_users: usize,
    /// Seconds each measured phase runs.
    #[arg(long, default_value_t = 15)]
    pub duration: u64,
    /// Concurrent HTTP clients, each in a closed loop.
    #[arg(long, default_value_t = 32)]
    pub clients: usize,
    /// Connections of the query API's pool and of PostGraphile's (the same for both).
    #[arg(long, default_value_t = 32)]
    pub pool_size: u32,
    /// Seed of the generated data, the hot users and the query mix.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Skip the PostGraphile baseline (it needs Node 18+ and npm).
    #[arg(long)]
    pub no_postgraphile: bool,
    /// Where the PostGraphile baseline lives (`run.sh`, `queries.json`)
    /// [default: ops/bench/postgraphile of this repository].
    #[arg(long)]
    pub postgraphile_dir: Option<std::path::PathBuf>,
    /// Run PostGraphile with this many cluster workers (`PGL_CLUSTER_WORKERS`)
    /// [default: one process, PostGraphile's default].
    #[arg(long)]
    pub postgraphile_workers: Option<u32>,
    /// Also measure the cached query API while the projections' checkpoints advance every
    /// this many milliseconds, as projectors applying a stream of events would (each advance
    /// the API sees moves the cache's epoch at most once per `--cache-staleness-ms`)
    /// [default: not measured].
    #[arg(long)]
    pub advance_checkpoints_ms: Option<u64>,
    /// The cached API's staleness window (`--query-cache-staleness-ms` of the query API).
    #[arg(long, default_value_t = 1000)]
    pub cache_staleness_ms: u64,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

#[derive(Debug, Args)]
pub struct LoadProjectionsArgs {
    /// The server to use; the load runs in its own database `cloudphone_load`, recreated
    /// (never in the one named here).
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// Events of generated history the projectors catch up on and the views refresh over.
    #[arg(long, default_value_t = 1_000_000)]
    pub events: u64,
    /// Events per second appended while latency is measured.
    #[arg(long, default_value_t = 1_000)]
    pub rate: u64,
    /// Seconds each latency phase runs.
    #[arg(long, default_value_t = 15)]
    pub duration: u64,
    /// Also measure latency through a relay and Kafka projector workers on these brokers.
    #[arg(long, env = "CLOUDPHONE_KAFKA_BROKERS")]
    pub kafka_brokers: Option<String>,
    /// Events per second appended in the Kafka latency phase (the development broker carries
    /// about 200 messages/s to a consumer group; see BENCHMARKS.md).
    #[arg(long, default_value_t = 50)]
    pub kafka_rate: u64,
    /// Seed of the generated history.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

#[derive(Debug, Args)]
pub struct LoadCommandsArgs {
    /// The server to use; the load runs in its own database `cloudphone_load`, recreated for
    /// each mode (never in the one named here).
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// Seconds to drive each mode.
    #[arg(long, default_value_t = 20)]
    pub duration: u64,
    /// Concurrent HTTP clients.
    #[arg(long, default_value_t = 128)]
    pub clients: usize,
    /// Users (each with its own fleet), spread over the clients.
    #[arg(long, default_value_t = 512)]
    pub users: usize,
    /// Seed of the command mix.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Skip the one-transaction-per-command baseline.
    #[arg(long)]
    pub no_baseline: bool,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}
