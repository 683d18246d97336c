//! Connecting to the primary the way every verb does.
//!
//! Only `migrate`, `serve` and the roles that migrate on start may create the database or
//! change its schema: they use [`connect`]. Every other verb uses [`connect_existing`],
//! which creates nothing and refuses, in one line, a database that is missing, was never
//! migrated, or is older than this binary.

use std::collections::BTreeSet;
use std::str::FromStr;

use anyhow::Context;
use event_log::pooler::ConnectionPath;
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection, PgPool};

use crate::cli::DatabaseArgs;

/// The schema a verb reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schema {
    /// The event log's tables (verify, export, keys, partitions).
    Log,
    /// The log and the read models (replay, the roles).
    LogAndReadModels,
}

/// Connects to the primary, creating its database first if it does not exist. Only for the
/// verbs that migrate, which must reach PostgreSQL directly: migrations run under a session
/// advisory lock. A transaction pooler is refused before anything is created.
pub async fn connect(args: &DatabaseArgs) -> anyhow::Result<PgPool> {
    let options = parse(args)?;
    let probed = event_log::pooler::probe_connection_path(&options).await;
    let missing =
        matches!(&probed, Err(sqlx::Error::Database(error)) if error.code().as_deref() == Some(INVALID_CATALOG_NAME));
    if !missing {
        // PostgreSQL itself said the database is missing, so the path is direct; otherwise
        // the probe's answer (or its failure) stands.
        refuse_pooler(
            args,
            probed.map_err(|error| unreachable(args, &options, error))?,
            MIGRATIONS_NEED_A_SESSION,
        )?;
    }
    match event_log::create_database_if_missing(&options).await {
        Ok(true) => tracing::info!(
            database = options.get_database().unwrap_or_default(),
            "created database"
        ),
        Ok(false) => {}
        Err(error) => return Err(unreachable(args, &options, error)),
    }
    event_log::pool_options(args.database_max_connections)
        .connect_with(options)
        .await
        .with_context(|| format!("cannot connect to {}", redact(&args.database_url)))
}

const MIGRATIONS_NEED_A_SESSION: &str = "migrations run under a session advisory lock; run `cloudphone migrate` against PostgreSQL directly, and start the roles behind the pooler with --migrate-on-start=false";

/// Connects to a primary that must already hold this binary's `schema`: creates no
/// database and applies no migration.
pub async fn connect_existing(args: &DatabaseArgs, schema: Schema) -> anyhow::Result<PgPool> {
    let options = parse(args)?;
    let name = options.get_database().unwrap_or("postgres").to_owned();
    let at = address(&options);
    // One connection first: a pool would retry a refused connection until it timed out,
    // hiding why.
    let mut conn = match options.connect().await {
        Ok(conn) => conn,
        Err(sqlx::Error::Database(error)) if error.code().as_deref() == Some(INVALID_CATALOG_NAME) => {
            anyhow::bail!(
                "database {name} does not exist at {at}; check the URL, or run `cloudphone migrate` to create it"
            )
        }
        Err(error) => return Err(unreachable(args, &options, error)),
    };
    let applied = event_log::applied_versions(&mut conn)
        .await
        .with_context(|| format!("cannot read the schema version of database {name} at {at}"))?;
    // Closing politely only saves the server a log line; the answer is already in.
    let _ = conn.close().await;
    let mut wanted: BTreeSet<i64> = versions(&event_log::migrator());
    if schema == Schema::LogAndReadModels {
        wanted.extend(versions(&read_models::migrator()));
    }
    let applied = applied.unwrap_or_default();
    if applied.is_disjoint(&wanted) {
        anyhow::bail!("database {name} at {at} has no Cloudphone schema; run `cloudphone migrate`");
    }
    let pending: Vec<String> = wanted.difference(&applied).map(i64::to_string).collect();
    if !pending.is_empty() {
        anyhow::bail!(
            "database {name} at {at} has a schema older than this binary (migrations {} not applied); run `cloudphone migrate`",
            pending.join(", ")
        );
    }
    event_log::pool_options(args.database_max_connections)
        .connect_with(options)
        .await
        .with_context(|| format!("cannot connect to {}", redact(&args.database_url)))
}

/// How `--database-url` reaches PostgreSQL: directly, or through a transaction pooler.
pub async fn connection_path(args: &DatabaseArgs) -> anyhow::Result<ConnectionPath> {
    let options = parse(args)?;
    event_log::pooler::probe_connection_path(&options)
        .await
        .map_err(|error| unreachable(args, &options, error))
}

/// Refuses, in one line, a `--database-url` that goes through a transaction pooler, for work
/// that needs a session of its own (`needs` says which and what to do instead).
pub async fn require_session(args: &DatabaseArgs, needs: &str) -> anyhow::Result<()> {
    refuse_pooler(args, connection_path(args).await?, needs)
}

fn refuse_pooler(args: &DatabaseArgs, path: ConnectionPath, needs: &str) -> anyhow::Result<()> {
    match path {
        ConnectionPath::Direct => Ok(()),
        ConnectionPath::TransactionPooler { evidence } => anyhow::bail!(
            "{} goes through a transaction pooler such as PgBouncer ({evidence}); {needs}",
            redact(&args.database_url)
        ),
    }
}

/// SQLSTATE 3D000: the database named in the connection does not exist.
const INVALID_CATALOG_NAME: &str = "3D000";

fn parse(args: &DatabaseArgs) -> anyhow::Result<PgConnectOptions> {
    PgConnectOptions::from_str(&args.database_url)
        .context("CLOUDPHONE_DATABASE_URL / --database-url is not a valid PostgreSQL URL")
}

fn versions(migrator: &sqlx::migrate::Migrator) -> BTreeSet<i64> {
    migrator
        .iter()
        .filter(|m| m.migration_type.is_up_migration())
        .map(|m| m.version)
        .collect()
}

/// `host:port`, or the socket directory.
fn address(options: &PgConnectOptions) -> String {
    match options.get_socket() {
        Some(socket) => socket.display().to_string(),
        None => format!("{}:{}", options.get_host(), options.get_port()),
    }
}

/// The error of a server that could not be reached; when nothing listens on this machine,
/// how to get a PostgreSQL here (the project's own script) is part of the message.
fn unreachable(args: &DatabaseArgs, options: &PgConnectOptions, error: sqlx::Error) -> anyhow::Error {
    let refused_here = matches!(&error, sqlx::Error::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused)
        && options.get_socket().is_none()
        && matches!(options.get_host(), "127.0.0.1" | "localhost" | "::1" | "[::1]");
    let context = format!("cannot reach PostgreSQL at {}", redact(&args.database_url));
    if refused_here {
        anyhow::anyhow!(
            "{context}: nothing answers at {}; `ops/dev/postgres.sh ensure` (in the repository) installs and starts one on 127.0.0.1:5432, or set --database-url / CLOUDPHONE_DATABASE_URL",
            address(options)
        )
    } else {
        anyhow::Error::new(error).context(context)
    }
}

/// Connects to the primary (which must exist) with a `statement_timeout` on every connection:
/// for roles that only read. Directly, each connection sets it at connect. A transaction
/// pooler refuses settings at connect, so there the server must set one for the user or
/// database (`ALTER ROLE ... SET statement_timeout`); a primary without any is refused, since a
/// runaway query would then hold a server connection of the pool for good.
pub async fn connect_with_statement_timeout(
    args: &DatabaseArgs,
    timeout: std::time::Duration,
    path: &ConnectionPath,
) -> anyhow::Result<PgPool> {
    let mut options = parse(args)?;
    if !path.is_pooled() {
        options = options.options([("statement_timeout", timeout.as_millis().to_string())]);
    }
    let pool = event_log::pool_options(args.database_max_connections)
        .connect_with(options)
        .await
        .with_context(|| format!("cannot connect to {}", redact(&args.database_url)))?;
    if path.is_pooled() {
        let set = event_log::pooler::server_statement_timeout(&pool)
            .await
            .context("cannot read the server's statement_timeout")?;
        match set {
            None => anyhow::bail!(
                "{} goes through a transaction pooler, which cannot carry the query API's statement_timeout; set one on the server for the user the pooler logs in as (e.g. ALTER ROLE <user> SET statement_timeout = '{}ms'), or connect to PostgreSQL directly",
                redact(&args.database_url),
                timeout.as_millis()
            ),
            Some(set) if set > timeout => tracing::warn!(
                server_ms = set.as_millis() as u64,
                wanted_ms = timeout.as_millis() as u64,
                "the server's statement_timeout is longer than the query timeout asks for"
            ),
            Some(_) => {}
        }
    }
    Ok(pool)
}

/// A pool on another server (a replica) that connects when first used: its checks then say
/// in one line what is wrong with it. Only the URL's form is checked here.
pub fn connect_lazy(url: &str, max_connections: u32) -> anyhow::Result<PgPool> {
    let options =
        PgConnectOptions::from_str(url).with_context(|| format!("{} is not a valid PostgreSQL URL", redact(url)))?;
    Ok(event_log::pool_options(max_connections.max(1)).connect_lazy_with(options))
}

/// The URL without its password, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let credentials = &url[scheme_end + 3..at];
            match credentials.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme_end + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn passwords_never_reach_messages() {
        assert_eq!(redact("postgres://u:secret@h:5432/db"), "postgres://u:***@h:5432/db");
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
    }
}
