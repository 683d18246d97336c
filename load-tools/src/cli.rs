//! The flags of every `cloudphone load` verb, with their defaults; the binary mounts
//! [`LoadKind`] as its `load` subcommand.

use clap::{Args, Subcommand};
use operator_console::flags::{DatabaseArgs, MasterKeyArgs};

// `cloudphone load <kind>`: which load to drive. (No doc comment: clap would show it.)
#[derive(Debug, Subcommand)]
pub enum LoadKind {
    /// Portal commands over HTTP against the command API (a child process), group commit
    /// against the one-transaction-per-command baseline, beside the HTTP stack alone and
    /// PostgreSQL alone writing the same rows; CPU per command of each process.
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
    /// Dashboards kept live: `--subscribers` GraphQL subscriptions (`devices`, `deviceStats`)
    /// over WebSocket for `--users` users while portal commands run at `--rate`/s, against the
    /// same dashboards polling over HTTP every second, in the same run: latency from a
    /// command's acknowledgement to the first answer showing it, evaluations and database
    /// transactions per second, the query API's CPU and memory per subscription.
    Subscriptions(LoadSubscriptionsArgs),
    /// The Kafka path at the command API's rate: portal commands at `--rate`/s with the
    /// embedded projector, then through the relay and `--workers` Kafka projector workers
    /// (all child processes) on a broker of the run's own, beside the broker alone (the same
    /// messages with no PostgreSQL); commit-to-read-model latency of both modes, the relay's
    /// throughput and lag, each worker's events/s, CPU per process, and the read models
    /// checked against a rebuild.
    Kafka(LoadKafkaArgs),
    /// The HTTP stack alone, for `load commands` to drive as its ceiling: the command API's
    /// edge answering every command with a fixed answer (no token check, no database).
    #[command(hide = true)]
    FixedAnswerServer(FixedAnswerServerArgs),
}

#[derive(Debug, Args)]
pub struct LoadKafkaArgs {
    /// The server to use; the load runs in its own database `cloudphone_load_kafka`,
    /// recreated on every run (never in the one named here).
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// Portal commands per second in each phase (open loop; one to two events each).
    #[arg(long, default_value_t = 1_000)]
    pub rate: u64,
    /// Seconds of commands in each phase (embedded, Kafka).
    #[arg(long, default_value_t = 20)]
    pub duration: u64,
    /// Users the commands act for.
    #[arg(long, default_value_t = 256)]
    pub users: usize,
    /// Kafka projector worker processes (each consumes for every projection).
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Partitions of the run's topic.
    #[arg(long, default_value_t = 6)]
    pub partitions: i32,
    /// How the run's broker stores messages: `memory` carries the command API's rate,
    /// `sqlite` (the tests' engine, durable) about 200 messages/s.
    #[arg(long, value_enum, default_value_t = crate::harness::broker::BrokerEngine::Memory)]
    pub broker_engine: crate::harness::broker::BrokerEngine,
    /// Messages the broker carries alone, with no PostgreSQL (0 skips that phase).
    #[arg(long, default_value_t = 100_000)]
    pub broker_messages: u64,
    /// After the Kafka phase, faults while the commands go on at `--rate`: a worker added,
    /// one stopped with SIGTERM, one killed with `kill -9` and restarted, one killed for good
    /// (its partitions move after `--session-timeout-ms`), and (with `--broker-engine sqlite`
    /// only) the broker killed and restarted; the latency spike of each is reported, and the
    /// read models must still equal a rebuild.
    #[arg(long)]
    pub faults: bool,
    /// The workers' `session.timeout.ms` (`CLOUDPHONE_KAFKA_SESSION_TIMEOUT_MS`): how long a
    /// killed worker's partitions wait before the others take them. Shorter than the
    /// production default (30 000) so a fault window need not be long.
    #[arg(long, default_value_t = 10_000)]
    pub session_timeout_ms: u64,
    /// The workers' rebalancing (`CLOUDPHONE_KAFKA_ASSIGNMENT`): `eager` or `cooperative`, to
    /// compare what a worker joining or leaving costs.
    #[arg(long, default_value = "eager", value_parser = ["eager", "cooperative"])]
    pub assignment: String,
    /// Seconds between two faults (and of the quiet window before the first).
    #[arg(long, default_value_t = 20)]
    pub fault_interval: u64,
    /// Seed of the command mix.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

#[derive(Debug, Args)]
pub struct FixedAnswerServerArgs {
    /// Where to listen.
    #[arg(long)]
    pub listen: std::net::SocketAddr,
}

#[derive(Debug, Args)]
pub struct LoadSubscriptionsArgs {
    /// The server to use; the load runs in its own database `cloudphone_load_subscriptions`,
    /// recreated on every run (never in the one named here).
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// Subscriptions held open in the push phase, spread evenly over the users (and as many
    /// polling dashboards in the poll phase).
    #[arg(long, env = "CLOUDPHONE_LOAD_SUBSCRIPTIONS_SUBSCRIBERS", default_value_t = 10_000)]
    pub subscribers: usize,
    /// Users the dashboards and the portal commands act for.
    #[arg(long, env = "CLOUDPHONE_LOAD_SUBSCRIPTIONS_USERS", default_value_t = 1_000)]
    pub users: usize,
    /// Subscriptions on one socket (the query API allows 100, and 100 sockets per user).
    #[arg(long, env = "CLOUDPHONE_LOAD_SUBSCRIPTIONS_PER_SOCKET", default_value_t = 10)]
    pub per_socket: usize,
    /// Portal commands per second (open loop), in every phase.
    #[arg(long, env = "CLOUDPHONE_LOAD_SUBSCRIPTIONS_RATE", default_value_t = 500)]
    pub rate: u64,
    /// Seconds of each phase (commands only, push, poll).
    #[arg(long, env = "CLOUDPHONE_LOAD_SUBSCRIPTIONS_SECONDS", default_value_t = 30)]
    pub seconds: u64,
    /// Milliseconds between two polls of one dashboard in the poll phase.
    #[arg(
        long,
        env = "CLOUDPHONE_LOAD_SUBSCRIPTIONS_POLL_INTERVAL_MS",
        default_value_t = 1_000
    )]
    pub poll_interval_ms: u64,
    /// Skip the polling baseline.
    #[arg(long, env = "CLOUDPHONE_LOAD_SUBSCRIPTIONS_NO_POLL")]
    pub no_poll: bool,
    /// Seed of the users chosen and the command mix.
    #[arg(long, env = "CLOUDPHONE_LOAD_SUBSCRIPTIONS_SEED", default_value_t = 42)]
    pub seed: u64,
    /// Also write the report as JSON to this file.
    #[arg(long, env = "CLOUDPHONE_LOAD_SUBSCRIPTIONS_JSON")]
    pub json: Option<std::path::PathBuf>,
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
    /// A streaming replica of the server (its URL; the database part is replaced by the
    /// run's), read by the replays of the new mode (`--history-url`) [default: the new mode
    /// reads the primary, throttled].
    #[arg(long, env = "CLOUDPHONE_LOAD_REPLICA_URL")]
    pub replica_url: Option<String>,
    /// An argument added to the new mode's `cloudphone replay` (repeatable), e.g.
    /// `--new-mode-arg=--max-events-per-second=100000` to try other limits than its defaults.
    #[arg(long, allow_hyphen_values = true)]
    pub new_mode_arg: Vec<String>,
    /// Leave out the materialized views' refresh (the baseline of issue #7).
    #[arg(long)]
    pub skip_views: bool,
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
    /// Where a PostGraphile baseline lives (`run.sh`, `queries.json`, `package.json`); give it
    /// once per baseline [default: ops/bench/postgraphile (v4) and ops/bench/postgraphile-v5
    /// of this repository].
    #[arg(long)]
    pub postgraphile_dir: Vec<std::path::PathBuf>,
    /// Run PostGraphile with this many cluster workers (`PGL_CLUSTER_WORKERS`; v4 only, v5
    /// has none) [default: one process, PostGraphile's default].
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
    /// Skip the parts alone: the HTTP stack answering fixed answers, and PostgreSQL writing
    /// the group-commit phase's rows again with pgbench.
    #[arg(long)]
    pub no_limits: bool,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}
