//! `cloudphone serve` and the long-running roles.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use command_api::auth::{DEVELOPMENT_SECRET, KeySource};
use command_api::{ApiConfig, AppendMode, Application};
use event_log::{EventStore, StoreConfig, SystemClock};
use projections::Projection;
use projections::runner::{ProjectorConfig, run_log_projector};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::cli::{AppendModeArg, AuthArgs, PlatformArgs};
use crate::commands::database;

/// Which roles this process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Roles {
    /// Everything (the embedded default): the command API and the projectors following the
    /// log. The query API joins when it is built (issue #6).
    All,
    CommandApi,
    Projector,
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
    let projectors = match roles {
        Roles::All | Roles::Projector => start_projectors(&pool, &stop),
        Roles::CommandApi => Vec::new(),
    };
    if roles == Roles::Projector {
        tracing::info!("projectors running; stop with SIGTERM");
        shutdown_signal().await;
        stop.cancel();
        for projector in projectors {
            let _ = projector.await;
        }
        pool.close().await;
        return Ok(());
    }
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
        ..ApiConfig::default()
    };
    let app = Application::with_store(config, store, metrics, Arc::new(SystemClock))
        .await
        .context("cannot start the command API")?;
    tracing::info!(address = %app.local_addr(), ?roles, "command API listening");
    if roles == Roles::All {
        tracing::info!("projectors following the log; the query API is not built yet (issue #6)");
    }
    let served = app
        .run_until_stopped(shutdown_signal())
        .await
        .context("command API failed");
    // The API has answered everything it accepted; the projectors stop after their batch.
    stop.cancel();
    for projector in projectors {
        let _ = projector.await;
    }
    pool.close().await;
    served
}

/// The embedded projectors: each projection follows the PostgreSQL log.
fn start_projectors(pool: &PgPool, stop: &CancellationToken) -> Vec<tokio::task::JoinHandle<()>> {
    Projection::ALL
        .into_iter()
        .map(|projection| {
            tokio::spawn(run_log_projector(
                pool.clone(),
                projection,
                ProjectorConfig::default(),
                stop.clone(),
            ))
        })
        .collect()
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
