//! Every flag of the binary, with its `CLOUDPHONE_*` environment fallback.

use std::net::SocketAddr;

use clap::{Args, Parser, Subcommand, ValueEnum};
// The flag groups the load tools flatten too live below both, in `operator-console`.
pub use operator_console::flags::{DEFAULT_DATABASE_URL, DatabaseArgs, MasterKeyArgs};

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
pub struct PlatformArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// Create the database if missing and apply the migrations at start (idempotent,
    /// serialised by an advisory lock). Turn off for a role that connects through PgBouncer
    /// in transaction mode, where a session lock would outlive its client; run `cloudphone
    /// migrate` directly on the primary instead. Off, the role creates nothing and refuses
    /// to start on a database that is missing or older than this binary.
    #[arg(long, env = "CLOUDPHONE_MIGRATE_ON_START", default_value_t = true, action = clap::ArgAction::Set)]
    pub migrate_on_start: bool,
    /// Read replicas, comma-separated [default: none; reads go to the primary].
    #[arg(long, env = "CLOUDPHONE_REPLICA_URLS", value_delimiter = ',')]
    pub replica_urls: Vec<String>,
    /// Least time between two batches of an embedded projector while appends go on, in ms
    /// (0: a batch at every commit). Each batch is a transaction with a WAL flush, so many
    /// batches of a few events cost the primary most per event; the read models trail the log
    /// by up to this much more in exchange. A projector catching up never waits.
    #[arg(long, env = "CLOUDPHONE_PROJECTOR_MIN_BATCH_INTERVAL_MS",
          default_value_t = projections::runner::DEFAULT_MIN_BATCH_INTERVAL.as_millis() as u64,
          value_parser = clap::value_parser!(u64).range(0..=1_000))]
    pub projector_min_batch_interval_ms: u64,
    /// Kafka bootstrap servers [default: none; projectors tail the PostgreSQL log].
    #[arg(long, env = "CLOUDPHONE_KAFKA_BROKERS")]
    pub kafka_brokers: Option<String>,
    /// The topic the relay publishes the log to and projectors consume.
    #[arg(long, env = "CLOUDPHONE_KAFKA_TOPIC", default_value = kafka_adapters::relay::DEFAULT_TOPIC)]
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
    /// How long a projector's consumer groups wait for a worker that stopped heartbeating
    /// (crashed, cut off, or a static member stopped) before its partitions go to the other
    /// workers, in ms (`session.timeout.ms`; Kafka's brokers accept 6 000 to 300 000 by
    /// default). Its partitions' events wait that long. At least 3 000 (the workers heartbeat
    /// every 250 ms).
    #[arg(long, env = "CLOUDPHONE_KAFKA_SESSION_TIMEOUT_MS", default_value_t = 30_000,
          value_parser = clap::value_parser!(u64).range(3_000..=3_600_000))]
    pub kafka_session_timeout_ms: u64,
    /// How a projector group's partitions move when a worker joins or leaves: `eager`
    /// (librdkafka's default) stops every worker for one short round; `cooperative` stops only
    /// the partitions that change owner, but for two rounds (measured slower here, BENCHMARKS.md;
    /// it pays off in large groups). The two cannot share a group: switch a running group by
    /// stopping all its workers.
    #[arg(long, env = "CLOUDPHONE_KAFKA_ASSIGNMENT", value_enum, default_value = "eager")]
    pub kafka_assignment: KafkaAssignment,
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
    /// The erasure ledger: a file on storage a database restore does not roll back (another
    /// volume or host, backed up on its own). The command API appends each erasure to it,
    /// fsync'd, before destroying the data key, refuses the erasure (503) when it cannot, and
    /// at start reapplies every erasure it holds (see `cloudphone erasures reapply`). Give
    /// each command API instance a file of its own [default: none; erasures are only in the
    /// database, and a restore to an earlier point undoes them].
    #[arg(long, env = "CLOUDPHONE_ERASURE_LEDGER")]
    pub erasure_ledger: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub query: QueryArgs,
    /// Requests per second each client (token subject) may send.
    #[arg(long, env = "CLOUDPHONE_RATE_LIMIT", default_value_t = 2000)]
    pub rate_limit: u32,
    /// Seconds a request may take before it is answered 503 (counted once its body is in).
    #[arg(long, env = "CLOUDPHONE_REQUEST_TIMEOUT", default_value_t = 10)]
    pub request_timeout: u64,
    /// Origins of browser apps allowed to call both APIs, comma-separated
    /// (`https://dash.example.com,http://localhost:5173`); each exactly `scheme://host[:port]`
    /// [default: none: browsers refuse cross-origin calls].
    #[arg(long, env = "CLOUDPHONE_CORS_ORIGINS", value_delimiter = ',', value_parser = parse_cors_origin)]
    pub cors_origins: Vec<axum::http::HeaderValue>,
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
    /// KiB of kernel send buffer per API connection (SO_SNDBUF): what a client that stops
    /// reading can hold, and how soon a stalled subscription socket is closed as too slow.
    /// 0 leaves it to the kernel's autotuning (up to 4 MiB each).
    #[arg(long, env = "CLOUDPHONE_SOCKET_SEND_BUFFER_KIB", default_value_t = 256)]
    pub socket_send_buffer_kib: usize,
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
    pub fn connection_limits(&self) -> http_edge::connections::ConnectionLimits {
        let defaults = http_edge::connections::ConnectionLimits::default();
        http_edge::connections::ConnectionLimits {
            max_connections: self.max_connections.unwrap_or(defaults.max_connections).max(1),
            header_read_timeout: std::time::Duration::from_secs(self.header_read_timeout_secs),
            body_read_timeout: std::time::Duration::from_secs(self.body_read_timeout_secs),
            keep_alive_timeout: std::time::Duration::from_secs(self.keep_alive_timeout_secs),
            send_buffer_bytes: match self.socket_send_buffer_kib {
                0 => None,
                kib => Some(kib.saturating_mul(1024)),
            },
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
    /// A subscription is evaluated again at most once per this many milliseconds (changes in
    /// between are coalesced into one evaluation).
    #[arg(long, env = "CLOUDPHONE_SUBSCRIPTION_INTERVAL_MS", default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..))]
    pub subscription_interval_ms: u64,
    /// Subscriptions one WebSocket connection may hold.
    #[arg(long, env = "CLOUDPHONE_MAX_SUBSCRIPTIONS_PER_CONNECTION", default_value_t = 100)]
    pub max_subscriptions_per_connection: usize,
    /// Subscription connections one client (token subject) may hold.
    #[arg(
        long,
        env = "CLOUDPHONE_MAX_SUBSCRIPTION_CONNECTIONS_PER_CLIENT",
        default_value_t = 100
    )]
    pub max_subscription_connections_per_client: usize,
    /// Subscription connections the query API holds.
    #[arg(long, env = "CLOUDPHONE_MAX_SUBSCRIPTION_CONNECTIONS", default_value_t = 20_000)]
    pub max_subscription_connections: usize,
    /// Seconds between keep-alive pings on subscription sockets; a client silent for two is
    /// closed (4411).
    #[arg(long, env = "CLOUDPHONE_SUBSCRIPTION_KEEP_ALIVE_SECS", default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..))]
    pub subscription_keep_alive_secs: u64,
    /// Milliseconds one answer may take to be written before its client counts as too slow
    /// and is closed (4410).
    #[arg(long, env = "CLOUDPHONE_SUBSCRIPTION_SEND_TIMEOUT_MS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub subscription_send_timeout_ms: u64,
}

impl QueryArgs {
    /// Subscriptions' pacing and limits.
    pub fn live(&self) -> query_api::subscriptions::LiveConfig {
        query_api::subscriptions::LiveConfig {
            evaluation_interval: std::time::Duration::from_millis(self.subscription_interval_ms),
            max_subscriptions_per_connection: self.max_subscriptions_per_connection,
            max_connections_per_client: self.max_subscription_connections_per_client,
            max_connections: self.max_subscription_connections,
            keep_alive: std::time::Duration::from_secs(self.subscription_keep_alive_secs),
            send_timeout: std::time::Duration::from_millis(self.subscription_send_timeout_ms),
            ..query_api::subscriptions::LiveConfig::default()
        }
    }
}

/// One `--cors-origins` entry.
fn parse_cors_origin(origin: &str) -> Result<axum::http::HeaderValue, String> {
    http_edge::cors::parse_origins(&[origin.to_owned()])
        .map_err(|error| error.to_string())
        .and_then(|mut parsed| parsed.pop().ok_or_else(|| "no origin".to_owned()))
}

/// `--kafka-assignment`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KafkaAssignment {
    Eager,
    Cooperative,
}

impl From<KafkaAssignment> for kafka_adapters::projector::AssignmentStrategy {
    fn from(assignment: KafkaAssignment) -> Self {
        match assignment {
            KafkaAssignment::Cooperative => Self::Cooperative,
            KafkaAssignment::Eager => Self::Eager,
        }
    }
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
    /// Rebuild a projection from the whole history beside the live one, then swap it in
    /// (on a database `cloudphone migrate` brought to this binary's schema).
    Replay(ReplayArgs),
    /// Events a projection parked because it could not apply them: list, retry, skip.
    DeadLetters {
        #[command(flatten)]
        database: DatabaseArgs,
        #[command(subcommand)]
        action: DeadLettersAction,
    },
    /// Export event history as NDJSON or CSV (with a trailer that `verify --file` checks).
    Export(ExportArgs),
    /// Master keys of personal data: generate one, rotate data keys to the active one, status.
    Keys {
        #[command(subcommand)]
        action: KeysAction,
    },
    /// Recompute the hash chain over the log and report the first position where it breaks.
    Verify(VerifyArgs),
    /// The erasure ledger: after a restore, destroy again the data keys of every user it
    /// names (see ops/runbooks/restore-from-backup.md).
    Erasures {
        #[command(subcommand)]
        action: ErasuresAction,
    },
    /// Drive the platform with a realistic load and report.
    #[cfg(feature = "load")]
    Load {
        #[command(subcommand)]
        kind: load_tools::cli::LoadKind,
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

#[derive(Debug, Subcommand)]
pub enum DeadLettersAction {
    /// List dead letters, oldest first (pending ones unless --state says otherwise).
    List {
        /// Only this projection's.
        #[arg(long, value_enum)]
        projection: Option<ProjectionArg>,
        /// Only letters in this state.
        #[arg(long, value_enum, default_value = "pending")]
        state: DeadLetterStateArg,
        /// Only letters with an id above this (the last id of the previous page).
        #[arg(long)]
        after: Option<i64>,
        /// Most letters to list (at most 1000).
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..))]
        limit: u64,
        /// One JSON document instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Apply parked events again, once their cause is fixed: in log order, exactly once,
    /// refused where applying an old event now would fold it out of order.
    Retry {
        /// The letter to retry.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<i64>,
        /// Retry every pending letter (of --projection, if given).
        #[arg(long)]
        all: bool,
        /// Only letters of this projection: a letter of another one is refused.
        #[arg(long, value_enum)]
        projection: Option<ProjectionArg>,
        #[command(flatten)]
        actor: ActorArgs,
    },
    /// Give up a parked event, recording why (the letter is kept, as `skipped`).
    Skip {
        /// The letter to skip.
        id: i64,
        /// Why (kept with the letter): not blank, at most 1000 characters.
        #[arg(long)]
        reason: String,
        /// Only a letter of this projection: a letter of another one is refused.
        #[arg(long, value_enum)]
        projection: Option<ProjectionArg>,
        #[command(flatten)]
        actor: ActorArgs,
    },
}

#[derive(Debug, Clone, Args)]
pub struct ActorArgs {
    /// Who resolves the letter, for the record [default: $USER].
    #[arg(long, env = "CLOUDPHONE_ACTOR")]
    pub actor: Option<String>,
}

impl ActorArgs {
    /// The name recorded with a resolution.
    pub fn name(&self) -> String {
        self.actor
            .clone()
            .or_else(|| std::env::var("USER").ok())
            .unwrap_or_else(|| "cloudphone-cli".to_owned())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DeadLetterStateArg {
    /// Parked, not applied.
    Pending,
    /// Applied by a retry.
    Retried,
    /// Given up, with a reason.
    Skipped,
    /// Any state.
    All,
}

impl DeadLetterStateArg {
    /// The state to filter on (`None`: any).
    pub fn state(self) -> Option<read_models::dead_letters::DeadLetterState> {
        use read_models::dead_letters::DeadLetterState;
        match self {
            DeadLetterStateArg::Pending => Some(DeadLetterState::Pending),
            DeadLetterStateArg::Retried => Some(DeadLetterState::Retried),
            DeadLetterStateArg::Skipped => Some(DeadLetterState::Skipped),
            DeadLetterStateArg::All => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ProjectionArg {
    /// `devices` and `device_stats` (and, from version 2, `users` and the fleet's history).
    Fleet,
    /// `daily_usage` (from version 2 with `daily_usage_by_provider`, from version 3 with `hourly_usage`).
    DailyUsage,
}

impl From<ProjectionArg> for read_models::Projection {
    fn from(arg: ProjectionArg) -> Self {
        match arg {
            ProjectionArg::Fleet => read_models::Projection::Fleet,
            ProjectionArg::DailyUsage => read_models::Projection::DailyUsage,
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
    /// Read the history (the bulk phase's scan of the whole log) from this streaming replica
    /// of the primary instead of the primary. It must be a standby of the primary's database
    /// (checked: system identifier, database, recovery) and is waited for until it has
    /// replayed the position the replay targets; the tail and the swap stay on the primary.
    /// Empty: read the primary [default: read the primary].
    #[arg(long, env = "CLOUDPHONE_REPLAY_HISTORY_URL", hide_env_values = true)]
    pub history_url: Option<String>,
    /// Longest wait, in seconds, for the history replica to replay the log up to the
    /// replay's target before giving up (nothing is changed then).
    #[arg(long, env = "CLOUDPHONE_REPLAY_HISTORY_WAIT_SECS", default_value_t = 600)]
    pub history_wait_secs: u64,
    /// Log positions the bulk phase reads and folds per second at most, so that live
    /// appends keep their latency (0: no limit). With the default, appends' p99 stayed
    /// within 2x of quiet during replays of 1M and 2M events on a 2-core primary, and was
    /// 4–5x at 10M, most while the tables and indexes were written (BENCHMARKS.md).
    #[arg(long, env = "CLOUDPHONE_REPLAY_MAX_EVENTS_PER_SECOND", default_value_t = DEFAULT_MAX_EVENTS_PER_SECOND)]
    pub max_events_per_second: u64,
    /// MiB per second the replay writes into its tables on the primary at most (each MiB is
    /// WAL that live commits flush behind; 0: no limit).
    #[arg(long, env = "CLOUDPHONE_REPLAY_MAX_WRITE_MIB_PER_SECOND", default_value_t = DEFAULT_MAX_WRITE_MIB_PER_SECOND)]
    pub max_write_mib_per_second: u64,
    /// Parallel workers each key or index build of the replay may start on the primary
    /// (max_parallel_maintenance_workers; each is a core busy building).
    #[arg(long, env = "CLOUDPHONE_REPLAY_INDEX_WORKERS", default_value_t = 0)]
    pub index_workers: u32,
    /// Serve /metrics, /healthz and /readyz here while the replay runs [default: not served].
    #[arg(long, env = "CLOUDPHONE_REPLAY_OPS_LISTEN")]
    pub ops_listen: Option<std::net::SocketAddr>,
    /// Print the summary as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

/// The bulk phase's default pace (see BENCHMARKS.md, "Replays beside live appends").
pub const DEFAULT_MAX_EVENTS_PER_SECOND: u64 = 150_000;
/// The default cap on what a replay writes into its tables per second, in MiB.
pub const DEFAULT_MAX_WRITE_MIB_PER_SECOND: u64 = 16;

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
pub enum ErasuresAction {
    /// Destroy again the data key of every user the ledgers name (the erasures a restore of
    /// the database rolled back); users the database does not know get a tombstone, so no
    /// key is ever made for them. Idempotent: run it after every restore, before any role
    /// serves; prints how many keys were shredded again. Exits 1 when a ledger cannot be
    /// read or holds lines that do not parse (after reapplying what it could read).
    Reapply(ErasuresArgs),
    /// What `reapply` would do, changing nothing; exits 1 when the database lacks an erasure
    /// the ledgers hold.
    Check(ErasuresArgs),
}

#[derive(Debug, Args)]
pub struct ErasuresArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// Ledger files (repeat, or comma-separated: one per command API instance).
    #[arg(
        long = "ledger",
        env = "CLOUDPHONE_ERASURE_LEDGER",
        value_delimiter = ',',
        required = true
    )]
    pub ledgers: Vec<std::path::PathBuf>,
}
