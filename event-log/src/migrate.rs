//! Bringing a database to the schema this code expects.
//!
//! `migrate` applies, under one advisory lock so concurrent runs queue instead of racing:
//! `partitions.sql` (idempotent: the partitioned table and its functions), then the
//! versioned migrations in `event-log/migrations` (each once, recorded by sqlx), then makes
//! sure partitions exist for this month and the next ones. Safe to run twice and while the
//! platform is up.

use std::collections::BTreeSet;

use chrono::Utc;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{AssertSqlSafe, ConnectOptions, Connection, PgConnection, PgPool};

use crate::partitions::ensure_partitions;

/// Versioned migrations of the log (0001-0999), embedded in the binary. Other crates keep
/// their own versions (projections: 1000+) in the same table, so each ignores the others'.
pub fn migrator() -> Migrator {
    let mut migrator = sqlx::migrate!("./migrations");
    migrator.set_ignore_missing(true);
    migrator
}

/// The partitioned table and its maintenance functions (the repository's `partitions.sql`).
pub const PARTITIONS_SQL: &str = include_str!("../../partitions.sql");

/// Months of partitions `migrate` makes sure exist after the current one.
pub const DEFAULT_PARTITIONS_AHEAD: u32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("database error while migrating: {0}")]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Migration(#[from] sqlx::migrate::MigrateError),
}

/// Applies everything (see the module documentation).
pub async fn migrate(pool: &PgPool) -> Result<(), MigrateError> {
    let mut conn = pool.acquire().await?;
    sqlx::query("SELECT pg_advisory_lock(hashtext('cloudphone.migrate'))")
        .execute(&mut *conn)
        .await?;
    let result: Result<(), MigrateError> = async {
        sqlx::raw_sql(PARTITIONS_SQL).execute(&mut *conn).await?;
        // On its own pooled connection: `Migrator::run` on a borrowed connection makes a
        // future that is not `Send` (a known sqlx limitation). Our lock still serialises us.
        migrator().run(pool).await?;
        Ok(())
    }
    .await;
    let unlocked = sqlx::query("SELECT pg_advisory_unlock(hashtext('cloudphone.migrate'))")
        .execute(&mut *conn)
        .await;
    result?;
    unlocked?;
    drop(conn);
    ensure_partitions(pool, Utc::now(), DEFAULT_PARTITIONS_AHEAD).await?;
    Ok(())
}

/// The versions `_sqlx_migrations` records as applied (the log's and the projections'), or
/// `None` when the database has no such table: nobody migrated it. Reads only, so verbs that
/// must not change a schema can tell an unmigrated or outdated database from a current one.
pub async fn applied_versions(conn: &mut PgConnection) -> Result<Option<BTreeSet<i64>>, sqlx::Error> {
    let recorded: bool = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
        .fetch_one(&mut *conn)
        .await?;
    if !recorded {
        return Ok(None);
    }
    let versions: Vec<i64> = sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
        .fetch_all(&mut *conn)
        .await?;
    Ok(Some(versions.into_iter().collect()))
}

/// Creates the database named in `options` if it does not exist, connecting to the
/// `postgres` maintenance database of the same server. Returns true when it created it.
pub async fn create_database_if_missing(options: &PgConnectOptions) -> Result<bool, sqlx::Error> {
    let Some(name) = options.get_database().map(str::to_owned) else {
        return Ok(false);
    };
    let mut admin = options.clone().database("postgres").connect().await?;
    let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
        .bind(&name)
        .fetch_one(&mut admin)
        .await?;
    if exists {
        admin.close().await?;
        return Ok(false);
    }
    // Identifiers cannot be bound parameters; quote it as PostgreSQL's quote_ident would.
    let statement = format!("CREATE DATABASE \"{}\"", name.replace('"', "\"\""));
    let created = sqlx::raw_sql(AssertSqlSafe(statement)).execute(&mut admin).await;
    admin.close().await?;
    match created {
        Ok(_) => Ok(true),
        // Another process created it between our check and our CREATE.
        Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("42P04") => Ok(false),
        Err(error) => Err(error),
    }
}

/// A connection idle for longer than this is pinged before it is handed out.
pub const PING_IDLE_AFTER: std::time::Duration = std::time::Duration::from_millis(500);

/// A pool with settings suited to the platform: short acquire timeout so an outage surfaces
/// as a quick error (503) rather than a hung request.
///
/// sqlx pings a connection when it takes it back (always) and, by default, again when it
/// hands it out: two round trips around every statement run on a pooled connection. Only a
/// connection idle for more than [`PING_IDLE_AFTER`] is pinged on the way out here: one that
/// came back sooner was answering that recently (its return ping), and under load, where the
/// pings cost, connections come back within milliseconds. A connection that died in between
/// fails its statement, as it would have if it died just after a ping.
pub fn pool_options(max_connections: u32) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(std::time::Duration::from_secs(3))
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for > PING_IDLE_AFTER {
                    sqlx::Connection::ping(conn).await?;
                }
                Ok(true)
            })
        })
}
