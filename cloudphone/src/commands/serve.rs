//! `cloudphone serve` and the long-running roles.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use command_api::{ApiConfig, AppendMode, Application};
use event_log::erasure_ledger::ErasureLedger;
use event_log::partitions::{PartitionPolicy, run_partition_maintenance};
use event_log::pooler::ConnectionPath;
use event_log::{EventStore, StoreConfig, SystemClock};
use http_edge::auth::{DEVELOPMENT_SECRET, KeySource};
use kafka_adapters::projector::{KafkaProjectorConfig, run_kafka_projector};
use kafka_adapters::relay::{RelayConfig, run_relay};
use projections::runner::{ProjectorConfig, spawn_log_projectors};
use query_api::graphql::Limits;
use query_api::graphql::document::DocumentLimits;
use query_api::safelist::Safelist;
use query_api::subscriptions::ChangeFeed;
use query_api::{QueryApi, QueryApiConfig, SourcesConfig};
use read_models::Projection;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::cli::{AppendModeArg, AuthArgs, PlatformArgs};
use crate::commands::database::{self, Schema};
use crate::commands::{role_endpoints, sampler};

/// How often roles behind a transaction pooler look for what notifications would have told
/// them: new events (projectors) and moved checkpoints (subscriptions). One indexed read
/// each; the added latency is at most this.
const POOLED_POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Which roles this process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Roles {
    /// Everything: the command API, the query API and the projectors (following the log, or
    /// with `--kafka-brokers` the relay and Kafka projectors).
    All,
    CommandApi,
    QueryApi,
    Projector,
    Relay,
}

pub async fn run(args: &PlatformArgs, roles: Roles) -> anyhow::Result<()> {
    let pool = if args.migrate_on_start {
        // Idempotent and safe while other instances run: a fresh machine needs nothing else.
        let pool = database::connect(&args.database).await?;
        event_log::migrate(&pool).await.context("migration failed")?;
        read_models::migrate(&pool)
            .await
            .context("read model migration failed")?;
        pool
    } else {
        // The schema is `cloudphone migrate`'s: this role creates nothing.
        database::connect_existing(&args.database, Schema::LogAndReadModels).await?
    };
    // `connect` refused a transaction pooler already (migrations need a session).
    let path = if args.migrate_on_start {
        ConnectionPath::Direct
    } else {
        database::connection_path(&args.database).await?
    };
    if path.is_pooled() && args.kafka_brokers.is_some() && matches!(roles, Roles::All | Roles::Relay) {
        database::require_session(
            &args.database,
            "the relay leads under a session advisory lock and LISTENs for appends; connect it to PostgreSQL directly",
        )
        .await?;
    }
    let metrics = http_edge::telemetry::prometheus();
    register_role_metrics(roles, args.kafka_brokers.is_some());
    let stop = CancellationToken::new();
    let mut background = match roles {
        Roles::All | Roles::Projector => start_projectors(args, &pool, &path, &stop),
        Roles::CommandApi | Roles::QueryApi | Roles::Relay => Vec::new(),
    };
    if matches!(roles, Roles::All | Roles::Relay) {
        match &args.kafka_brokers {
            Some(brokers) => background.push(tokio::spawn(run_relay(
                pool.clone(),
                relay_config(args, brokers),
                stop.clone(),
            ))),
            None if roles == Roles::Relay => {
                anyhow::bail!("the relay needs --kafka-brokers (CLOUDPHONE_KAFKA_BROKERS)")
            }
            None => {}
        }
    }
    if matches!(roles, Roles::Projector | Roles::Relay) {
        // Also samples the process and the pool's connections.
        let broker = match &args.kafka_brokers {
            Some(brokers) => Some(
                kafka_adapters::relay::BrokerProbe::new(brokers, &args.kafka_topic)
                    .context("invalid Kafka client configuration")?,
            ),
            None => None,
        };
        let endpoints =
            role_endpoints::serve_with_broker(args.ops_listen, pool.clone(), metrics, broker, stop.clone()).await?;
        tracing::info!(?roles, "running; stop with SIGTERM");
        shutdown_signal().await;
        stop.cancel();
        let _ = endpoints.await;
        for task in background {
            let _ = task.await;
        }
        pool.close().await;
        return Ok(());
    }
    // Any API stopping (a signal, or a failure) stops the process.
    let shutdown = CancellationToken::new();
    tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            shutdown_signal().await;
            shutdown.cancel();
        }
    });
    let mut servers = Vec::new();
    let mut pools = vec![("primary", pool.clone())];
    let mut read_pools = Vec::new();
    if matches!(roles, Roles::All | Roles::CommandApi) {
        if args.idempotency_retention_hours > 0 {
            // Capped at a century: longer is "forever" in effect, and keeps the date arithmetic in range.
            let hours = args.idempotency_retention_hours.min(24 * 365 * 100);
            let retention = chrono::Duration::hours(i64::try_from(hours).unwrap_or(24));
            background.push(tokio::spawn(expire_idempotency_keys(
                pool.clone(),
                retention,
                stop.clone(),
            )));
        }
        // Every command API instance maintains the partitions; they coordinate in PostgreSQL.
        let maintenance = run_partition_maintenance(
            pool.clone(),
            partition_policy(args),
            Duration::from_secs(args.partition_maintenance_interval_secs.max(1)),
            stop.clone(),
        );
        background.push(tokio::spawn(async move {
            maintenance.await;
        }));
        let app = command_api(args, &pool, metrics.clone()).await?;
        tracing::info!(address = %app.local_addr(), ?roles, "command API listening");
        servers.push((
            "command API",
            tokio::spawn(app.run_until_stopped(shutdown.clone().cancelled_owned())),
        ));
    }
    if matches!(roles, Roles::All | Roles::QueryApi) {
        let (app, query_pool) = query_api(args, &path, metrics.clone()).await?;
        pools.push(("query", query_pool));
        read_pools = app.sources().read_pools();
        tracing::info!(address = %app.local_addr(), replicas = args.replica_urls.len(), "query API listening");
        servers.push((
            "query API",
            tokio::spawn(app.run_until_stopped(shutdown.clone().cancelled_owned())),
        ));
    }
    background.push(sampler::spawn(pools, read_pools, stop.clone()));
    if roles == Roles::All {
        let mode = if args.kafka_brokers.is_some() {
            "relay and Kafka projectors"
        } else {
            "projectors following the log"
        };
        tracing::info!(mode, "running every role; stop with SIGTERM");
    }
    let mut failure = None;
    for (name, server) in servers {
        let served = server.await;
        // The first API to stop stops the others.
        shutdown.cancel();
        match served {
            Ok(Ok(())) => {}
            Ok(Err(error)) => failure = failure.or(Some(anyhow::anyhow!("{name} failed: {error}"))),
            Err(error) => failure = failure.or(Some(anyhow::anyhow!("{name} crashed: {error}"))),
        }
    }
    // The APIs have answered everything they accepted; the background roles stop after their batch.
    stop.cancel();
    for task in background {
        let _ = task.await;
    }
    pool.close().await;
    failure.map_or(Ok(()), Err)
}

async fn command_api(
    args: &PlatformArgs,
    pool: &PgPool,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
) -> anyhow::Result<Application> {
    let store = Arc::new(
        EventStore::open(
            pool.clone(),
            StoreConfig {
                partitions_ahead: args.partitions_ahead,
                ..StoreConfig::default()
            },
        )
        .await
        .context("cannot open the event log")?,
    );
    let config = ApiConfig {
        listen: args.command_listen,
        keys: key_source(&args.auth)?,
        max_token_lifetime: args.auth.max_token_lifetime(),
        rate_per_second: args.rate_limit,
        rate_burst: args.rate_limit.saturating_mul(2),
        request_timeout: Duration::from_secs(args.request_timeout.max(1)),
        append_mode: match args.append_mode {
            AppendModeArg::Group => AppendMode::GroupCommit,
            AppendModeArg::Unbatched => AppendMode::Unbatched,
        },
        master_keys: args.master_keys.keyring()?,
        connections: args.connection_limits(),
        cors_origins: args.cors_origins.clone(),
        erasure_ledger: match &args.erasure_ledger {
            Some(path) => Some(Arc::new(
                ErasureLedger::open(path).context("cannot open the erasure ledger")?,
            )),
            None => None,
        },
        ..ApiConfig::default()
    };
    Application::with_store(config, store, metrics, Arc::new(SystemClock))
        .await
        .context("cannot start the command API")
}

/// The query API on a primary pool of its own (reads never queue behind appends), with
/// statement timeouts on every source; returns that pool too, for the connection gauges.
async fn query_api(
    args: &PlatformArgs,
    path: &ConnectionPath,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
) -> anyhow::Result<(QueryApi, PgPool)> {
    let q = &args.query;
    let query_timeout = Duration::from_millis(q.query_timeout_ms.max(1));
    // A statement a little longer than the query: the query's own limit answers first.
    let statement_timeout = query_timeout + Duration::from_millis(500);
    let primary = database::connect_with_statement_timeout(&args.database, statement_timeout, path).await?;
    let mut live = q.live();
    if path.is_pooled() {
        // Notifications do not pass a transaction pooler: watch the checkpoints instead.
        live.change_feed = ChangeFeed::PollCheckpoints(POOLED_POLL_INTERVAL);
        tracing::info!(
            interval_ms = POOLED_POLL_INTERVAL.as_millis() as u64,
            "behind a transaction pooler: subscriptions follow the projections' checkpoints by polling"
        );
    }
    let config = QueryApiConfig {
        listen: args.query_listen,
        replica_urls: args.replica_urls.clone(),
        keys: key_source(&args.auth)?,
        max_token_lifetime: args.auth.max_token_lifetime(),
        master_keys: args.master_keys.keyring()?,
        limits: Limits {
            max_page_size: q.query_max_page_size.max(1),
            default_page_size: 20.min(q.query_max_page_size.max(1)),
            max_complexity: q.query_max_complexity,
            document: DocumentLimits {
                max_depth: q.query_max_depth,
                max_selections: q.query_max_selections,
                max_tokens: q.query_max_tokens,
                max_aliases: q.query_max_aliases,
                max_fragments: q.query_max_fragments,
                ..DocumentLimits::default()
            },
            ..Limits::default()
        },
        executor_nice: q.query_executor_nice,
        safelist: match &q.graphql_safelist {
            Some(path) => {
                let safelist = Safelist::from_file(path)?;
                tracing::info!(documents = safelist.len(), path = %path.display(), "only safelisted documents run");
                Some(Arc::new(safelist))
            }
            None => None,
        },
        query_timeout,
        rate_per_second: args.rate_limit,
        rate_burst: args.rate_limit.saturating_mul(2),
        cache_max_bytes: q.query_cache_mb.saturating_mul(1024 * 1024),
        cache_staleness: Duration::from_millis(q.query_cache_staleness_ms),
        introspection: q.graphql_introspection,
        graphiql: q.graphiql,
        sources: SourcesConfig {
            max_lag_bytes: q.replica_max_lag_bytes,
            position_wait: Duration::from_millis(q.read_your_writes_wait_ms),
            statement_timeout: Some(statement_timeout),
            ..SourcesConfig::default()
        },
        connections: args.connection_limits(),
        live,
        cors_origins: args.cors_origins.clone(),
        ..QueryApiConfig::default()
    };
    let api = QueryApi::build(config, primary.clone(), metrics)
        .await
        .context("cannot start the query API")?;
    Ok((api, primary))
}

/// One projector per projection: following the PostgreSQL log (embedded), or consuming the
/// relay's topic when brokers are configured.
fn start_projectors(
    args: &PlatformArgs,
    pool: &PgPool,
    path: &ConnectionPath,
    stop: &CancellationToken,
) -> Vec<tokio::task::JoinHandle<()>> {
    // The gauge of pending dead letters, in either mode.
    let gauge = tokio::spawn(projections::dead_letters::watch_pending(pool.clone(), stop.clone()));
    let Some(brokers) = &args.kafka_brokers else {
        let tailing = ProjectorConfig {
            min_batch_interval: Duration::from_millis(args.projector_min_batch_interval_ms),
            ..ProjectorConfig::default()
        };
        let config = if path.is_pooled() {
            tracing::info!(
                interval_ms = POOLED_POLL_INTERVAL.as_millis() as u64,
                "behind a transaction pooler: projectors follow the log by polling (LISTEN needs a session)"
            );
            ProjectorConfig {
                listen: false,
                poll_interval: POOLED_POLL_INTERVAL,
                ..tailing
            }
        } else {
            tailing
        };
        let mut tasks = spawn_log_projectors(pool, config, stop);
        tasks.push(gauge);
        return tasks;
    };
    let mut tasks: Vec<_> = Projection::ALL
        .into_iter()
        .map(|projection| {
            let config = KafkaProjectorConfig {
                topic: args.kafka_topic.clone(),
                group_id: format!("cloudphone-projector-{}-{}", args.kafka_topic, projection.name()),
                instance_id: args
                    .kafka_instance_id
                    .as_ref()
                    .map(|id| format!("{id}-{}", projection.name())),
                fetch_wait: Duration::from_millis(args.kafka_fetch_wait_ms),
                session_timeout: Duration::from_millis(args.kafka_session_timeout_ms),
                assignment: args.kafka_assignment.into(),
                ..KafkaProjectorConfig::new(brokers.clone(), projection)
            };
            tokio::spawn(run_kafka_projector(pool.clone(), projection, config, stop.clone()))
        })
        .collect();
    tasks.push(gauge);
    tasks
}

/// Deletes idempotency keys older than `retention`, at start and every ten minutes.
async fn expire_idempotency_keys(pool: PgPool, retention: chrono::Duration, stop: CancellationToken) {
    loop {
        match event_log::idempotency::expire_idempotency_keys(&pool, chrono::Utc::now() - retention).await {
            Ok(0) => {}
            Ok(expired) => tracing::info!(expired, "idempotency keys expired"),
            Err(error) => tracing::warn!(%error, "idempotency key expiry failed; retrying later"),
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(600)) => {}
        }
    }
}

fn partition_policy(args: &PlatformArgs) -> PartitionPolicy {
    PartitionPolicy {
        months_ahead: args.partitions_ahead,
        retention_months: args.partition_retention_months,
    }
}

/// Sets every counter of the roles this process runs to 0 at start (and each labelled one
/// for every label value it will have), so a counter's first increment is an increase that
/// `increase()` and `rate()` see, and a dashboard shows 0 rather than no data.
fn register_role_metrics(roles: Roles, kafka: bool) {
    let zero = |name: &'static str| metrics::counter!(name).increment(0);
    if matches!(roles, Roles::All | Roles::Projector) {
        use projections::metrics_names as p;
        for projection in Projection::ALL.map(Projection::name) {
            metrics::counter!(p::PROJECTION_EVENTS_TOTAL, "projection" => projection).increment(0);
            metrics::counter!(p::PROJECTION_DEAD_LETTERS_TOTAL, "projection" => projection).increment(0);
            metrics::counter!(p::PROJECTION_BATCHES_REFUSED_TOTAL, "projection" => projection).increment(0);
            if kafka {
                metrics::counter!(kafka_adapters::metrics_names::PROJECTION_CONSUMER_ERRORS_TOTAL, "projection" => projection).increment(0);
            }
        }
    }
    if roles == Roles::Relay || (roles == Roles::All && kafka) {
        use kafka_adapters::relay::metrics_names as r;
        zero(r::RELAY_PUBLISHED_TOTAL);
        zero(r::RELAY_ERRORS_TOTAL);
    }
    if matches!(roles, Roles::All | Roles::CommandApi) {
        use command_api::telemetry as c;
        use event_log::metrics_names as e;
        for name in [
            e::APPEND_EVENTS_TOTAL,
            e::APPEND_CONFLICTS_TOTAL,
            e::APPEND_IDEMPOTENT_REPLAYS_TOTAL,
            e::IDEMPOTENCY_KEYS_EXPIRED_TOTAL,
            e::PARTITIONS_CREATED_TOTAL,
            e::PARTITIONS_ARCHIVED_TOTAL,
            c::COMMAND_RETRIES_TOTAL,
            c::COMMAND_STALE_DECISIONS_TOTAL,
            c::IDEMPOTENT_REPLAYS_TOTAL,
            c::PERSONAL_DATA_KEYS_DESTROYED_TOTAL,
        ] {
            zero(name);
        }
        for outcome in ["ok", "error"] {
            metrics::counter!(e::PARTITION_MAINTENANCE_RUNS_TOTAL, "outcome" => outcome).increment(0);
        }
    }
    if matches!(roles, Roles::All | Roles::QueryApi) {
        use query_api::audit::metrics_names as a;
        use query_api::sources::metrics_names as s;
        for reason in ["no_replica", "replica_failed", "replica_behind"] {
            metrics::counter!(s::READ_FALLBACKS_TOTAL, "reason" => reason).increment(0);
        }
        zero(a::AUDIT_EXPORT_FAILURES_TOTAL);
        zero(event_log::metrics_names::EXPORT_EVENTS_TOTAL);
    }
}

fn relay_config(args: &PlatformArgs, brokers: &str) -> RelayConfig {
    RelayConfig {
        topic: args.kafka_topic.clone(),
        name: args.kafka_topic.clone(),
        partitions: args.kafka_partitions,
        ..RelayConfig::new(brokers)
    }
}

fn key_source(args: &AuthArgs) -> anyhow::Result<KeySource> {
    if let Some(path) = &args.jwks_file {
        return KeySource::jwks_file(path).context("--jwks-file");
    }
    if let Some(path) = &args.jwt_public_key {
        return KeySource::public_key_file(path, &args.jwt_algorithm).context("--jwt-public-key");
    }
    Ok(KeySource::Secret(match &args.jwt_secret {
        Some(secret) => secret.clone(),
        None => {
            tracing::warn!(
                "NO JWT SECRET CONFIGURED: using the built-in development secret. Anyone can mint \
                 tokens for this instance. Set CLOUDPHONE_JWT_SECRET (or a public key) in production."
            );
            DEVELOPMENT_SECRET.to_owned()
        }
    }))
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let interrupt = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => {}
        () = terminate => {}
    }
    tracing::info!("shutting down: finishing in-flight requests");
}
