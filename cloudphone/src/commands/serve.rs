//! `cloudphone serve` and the long-running roles.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use command_api::auth::{DEVELOPMENT_SECRET, KeySource};
use command_api::{ApiConfig, AppendMode, Application};
use event_log::relay::{RelayConfig, run_relay};
use event_log::{EventStore, StoreConfig, SystemClock};
use projections::Projection;
use projections::kafka::{KafkaProjectorConfig, run_kafka_projector};
use projections::runner::{ProjectorConfig, spawn_log_projectors};
use query_api::graphql::Limits;
use query_api::{QueryApi, QueryApiConfig, SourcesConfig};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::cli::{AppendModeArg, AuthArgs, PlatformArgs};
use crate::commands::{database, role_endpoints};

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
    let pool = database::connect(&args.database).await?;
    // Idempotent and safe while other instances run: a fresh machine needs nothing else.
    event_log::migrate(&pool).await.context("migration failed")?;
    projections::migrate(&pool)
        .await
        .context("read model migration failed")?;
    let metrics = command_api::telemetry::prometheus();
    let stop = CancellationToken::new();
    let mut background = match roles {
        Roles::All | Roles::Projector => start_projectors(args, &pool, &stop),
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
        let endpoints = role_endpoints::serve(args.ops_listen, pool.clone(), metrics, stop.clone()).await?;
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
        let app = command_api(args, &pool, metrics.clone()).await?;
        tracing::info!(address = %app.local_addr(), ?roles, "command API listening");
        servers.push((
            "command API",
            tokio::spawn(app.run_until_stopped(shutdown.clone().cancelled_owned())),
        ));
    }
    if matches!(roles, Roles::All | Roles::QueryApi) {
        let app = query_api(args, metrics.clone()).await?;
        tracing::info!(address = %app.local_addr(), replicas = args.replica_urls.len(), "query API listening");
        servers.push((
            "query API",
            tokio::spawn(app.run_until_stopped(shutdown.clone().cancelled_owned())),
        ));
    }
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
        EventStore::open(pool.clone(), StoreConfig::default())
            .await
            .context("cannot open the event log")?,
    );
    let config = ApiConfig {
        listen: args.command_listen,
        keys: key_source(&args.auth)?,
        rate_per_second: args.rate_limit,
        rate_burst: args.rate_limit.saturating_mul(2),
        request_timeout: Duration::from_secs(args.request_timeout.max(1)),
        append_mode: match args.append_mode {
            AppendModeArg::Group => AppendMode::GroupCommit,
            AppendModeArg::Unbatched => AppendMode::Unbatched,
        },
        master_keys: args.master_keys.keyring()?,
        ..ApiConfig::default()
    };
    Application::with_store(config, store, metrics, Arc::new(SystemClock))
        .await
        .context("cannot start the command API")
}

/// The query API on a primary pool of its own (reads never queue behind appends), with
/// statement timeouts on every source.
async fn query_api(
    args: &PlatformArgs,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
) -> anyhow::Result<QueryApi> {
    let q = &args.query;
    let query_timeout = Duration::from_millis(q.query_timeout_ms.max(1));
    // A statement a little longer than the query: the query's own limit answers first.
    let statement_timeout = query_timeout + Duration::from_millis(500);
    let primary = database::connect_with_statement_timeout(&args.database, statement_timeout).await?;
    let config = QueryApiConfig {
        listen: args.query_listen,
        replica_urls: args.replica_urls.clone(),
        keys: key_source(&args.auth)?,
        master_keys: args.master_keys.keyring()?,
        limits: Limits {
            max_page_size: q.query_max_page_size.max(1),
            default_page_size: 20.min(q.query_max_page_size.max(1)),
            max_depth: q.query_max_depth,
            max_complexity: q.query_max_complexity,
            ..Limits::default()
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
        ..QueryApiConfig::default()
    };
    QueryApi::build(config, primary, metrics)
        .await
        .context("cannot start the query API")
}

/// One projector per projection: following the PostgreSQL log (embedded), or consuming the
/// relay's topic when brokers are configured.
fn start_projectors(args: &PlatformArgs, pool: &PgPool, stop: &CancellationToken) -> Vec<tokio::task::JoinHandle<()>> {
    let Some(brokers) = &args.kafka_brokers else {
        return spawn_log_projectors(pool, ProjectorConfig::default(), stop);
    };
    Projection::ALL
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
                ..KafkaProjectorConfig::new(brokers.clone(), projection)
            };
            tokio::spawn(run_kafka_projector(pool.clone(), projection, config, stop.clone()))
        })
        .collect()
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
