//! `cloudphone serve` and the long-running roles.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use command_api::auth::{DEVELOPMENT_SECRET, KeySource};
use command_api::{ApiConfig, AppendMode, Application};
use event_log::{EventStore, StoreConfig, SystemClock};

use crate::cli::{AppendModeArg, AuthArgs, PlatformArgs};
use crate::commands::database;

/// Which roles this process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Roles {
    /// Everything (the embedded default). Today: the command API; projectors and the query
    /// API join as they are built (issues #5 and #6).
    All,
    CommandApi,
}

pub async fn run(args: &PlatformArgs, roles: Roles) -> anyhow::Result<()> {
    let pool = database::connect(&args.database).await?;
    // Idempotent and safe while other instances run: a fresh machine needs nothing else.
    event_log::migrate(&pool).await.context("migration failed")?;
    let metrics = command_api::telemetry::prometheus();
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
        tracing::info!("projectors and the query API are not built yet (issues #5 and #6)");
    }
    app.run_until_stopped(shutdown_signal())
        .await
        .context("command API failed")?;
    pool.close().await;
    Ok(())
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
