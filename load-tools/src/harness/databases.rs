//! The databases load runs use: each run's own database on the server `--database-url`
//! names (dropped and created again, never the database named there), settled after a bulk
//! load as a live system's would be, how far the projections have got in it, and whether
//! their read models equal a rebuild from the log.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::Context;
use event_log::LogReader;
use read_models::Projection;
use read_models::stored::load_read_models;
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection, Executor, PgPool};

/// The database of `load commands` and `load projections`.
pub const LOAD_DATABASE: &str = "cloudphone_load";

/// A fresh database for one mode, so each starts from the same empty state.
pub async fn fresh_database(url: &str) -> anyhow::Result<PgPool> {
    recreate_database(url, LOAD_DATABASE, 32).await
}

/// Drops and creates the database `name` on the server of `url` (never the database `url`
/// names), and applies the event log's migrations.
pub async fn recreate_database(url: &str, name: &str, max_connections: u32) -> anyhow::Result<PgPool> {
    let options = PgConnectOptions::from_str(url).context("--database-url")?;
    let mut admin = options
        .clone()
        .database("postgres")
        .disable_statement_logging()
        .connect()
        .await
        .context("connect to postgres")?;
    admin
        .execute(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
        )))
        .await?;
    admin
        .execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .await?;
    admin.close().await?;
    let pool = event_log::pool_options(max_connections)
        .connect_with(options.database(name))
        .await?;
    event_log::migrate(&pool).await?;
    Ok(pool)
}

/// `url` with its database replaced by `database` (for a child process that takes a URL).
pub fn database_url_of(url: &str, database: &str) -> anyhow::Result<String> {
    let scheme_end = url.find("://").context("--database-url is not a URL")? + 3;
    let rest = &url[scheme_end..];
    let (path_part, query) = match rest.find('?') {
        Some(at) => rest.split_at(at),
        None => (rest, ""),
    };
    let authority = path_part.split('/').next().unwrap_or(path_part);
    Ok(format!("{}{authority}/{database}{query}", &url[..scheme_end]))
}

/// What autovacuum and the checkpointer would have done long since in a live system, done
/// now, so the bulk-loaded history does not skew the latency phases.
///
/// Only the tables that hold rows: autovacuum never analyzes a table that has had none, and
/// one analyzed empty is planned as empty. A connection that prepares a statement on it then
/// caches a sequential scan as its generic plan and keeps it while the table grows (found in
/// `load platform`: the command API's idempotency lookup read 19M to 59M rows per run, on a
/// server whose autovacuum is off and so never analyzes it again).
pub async fn settle_database(pool: &PgPool) -> anyhow::Result<()> {
    let filled: Vec<String> = sqlx::query_scalar(
        "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema')
           AND n.nspname NOT LIKE 'pg_toast%' AND pg_relation_size(c.oid) > 0
         ORDER BY 1",
    )
    .fetch_all(pool)
    .await
    .context("listing the tables that hold rows")?;
    if !filled.is_empty() {
        let vacuum = format!("VACUUM (ANALYZE) {}", filled.join(", "));
        pool.execute(sqlx::AssertSqlSafe(vacuum))
            .await
            .context("VACUUM ANALYZE")?;
    }
    pool.execute("CHECKPOINT").await.context("CHECKPOINT")?;
    Ok(())
}

/// Waits (at most two minutes) until streaming replicas of the server have replayed the
/// provisioning's WAL, so their replay does not compete with the first phase for the cores.
pub async fn wait_for_replicas(pool: &PgPool) {
    let started = Instant::now();
    loop {
        let behind: Result<Option<i64>, sqlx::Error> = sqlx::query_scalar(
            "SELECT max(pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn))::bigint FROM pg_stat_replication",
        )
        .fetch_one(pool)
        .await;
        match behind {
            Ok(Some(bytes)) if bytes > 0 => {
                if started.elapsed() > Duration::from_secs(120) {
                    println!(
                        "  a streaming replica is still {bytes} bytes of WAL behind after 120 s: measuring anyway"
                    );
                    return;
                }
            }
            // Caught up, no replicas, or not allowed to look.
            _ => {
                if started.elapsed() > Duration::from_secs(1) {
                    println!(
                        "  waited {:.1} s for streaming replicas to replay the provisioning",
                        started.elapsed().as_secs_f64()
                    );
                }
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Each projection's checkpoint, by name.
pub async fn checkpoints(pool: &PgPool) -> anyhow::Result<BTreeMap<String, i64>> {
    let rows: Vec<(String, i64)> = sqlx::query_as("SELECT projection, position FROM projection_checkpoints")
        .fetch_all(pool)
        .await?;
    Ok(rows.into_iter().collect())
}

/// The position every projection has applied (0 until each has a checkpoint).
pub async fn applied(pool: &PgPool) -> anyhow::Result<i64> {
    let positions = checkpoints(pool).await?;
    if positions.len() < Projection::ALL.len() {
        return Ok(0);
    }
    Ok(positions.values().copied().min().unwrap_or(0))
}

/// How the read models differ from a rebuild of the log, if they do.
pub async fn read_models_differ(reader: &LogReader, pool: &PgPool, head: i64) -> anyhow::Result<Option<String>> {
    let rebuilt = projections::fold_log(reader, head, 5_000).await?;
    let stored = load_read_models(pool).await?;
    let differing: Vec<String> = stored
        .devices
        .iter()
        .filter(|(id, row)| rebuilt.devices.get(*id) != Some(*row))
        .map(|(id, row)| format!("device {id}: stored {row:?}, rebuilt {:?}", rebuilt.devices.get(id)))
        .take(3)
        .collect();
    Ok(if stored.devices.len() != rebuilt.devices.len() {
        Some(format!(
            "{} devices stored, {} rebuilt",
            stored.devices.len(),
            rebuilt.devices.len()
        ))
    } else if !differing.is_empty() {
        Some(differing.join("; "))
    } else if stored.device_stats != rebuilt.device_stats {
        Some("device_stats".to_owned())
    } else if stored.daily_usage != rebuilt.daily_usage {
        Some("daily_usage".to_owned())
    } else {
        None
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_load_database_replaces_only_the_database_of_the_url() {
        let url = |u| database_url_of(u, "cloudphone_load_queries").unwrap();
        assert_eq!(
            url("postgres://postgres@127.0.0.1:5432/cloudphone"),
            "postgres://postgres@127.0.0.1:5432/cloudphone_load_queries"
        );
        assert_eq!(
            url("postgres://u:p@db:5433/x?sslmode=disable"),
            "postgres://u:p@db:5433/cloudphone_load_queries?sslmode=disable"
        );
        assert_eq!(url("postgresql://h"), "postgresql://h/cloudphone_load_queries");
        assert!(database_url_of("not a url", "x").is_err());
    }
}
