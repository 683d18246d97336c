//! Whether a connection to the primary keeps a session of its own, or goes through a
//! transaction-pooling proxy (PgBouncer in transaction mode), which hands each transaction to
//! whichever server connection is free. Session advisory locks (migrations, the relay's
//! leadership, a replay), `LISTEN` and session settings (`SET`, the `statement_timeout`
//! startup option) only work on the former: behind the pooler a lock and its unlock, or a
//! `LISTEN` and the notifications, land on different server connections.
//!
//! The probe is a connection whose startup packet sets a placeholder setting of ours.
//! PostgreSQL keeps it for the session; PgBouncer refuses an unknown startup parameter
//! ("unsupported startup parameter"), or drops it when configured to ignore `options`, so
//! either way the setting does not reach the session.

use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection};

/// The placeholder setting the probe sends at connect.
const PROBE_SETTING: &str = "cloudphone.session_probe";

/// How a connection URL reaches PostgreSQL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectionPath {
    /// Sessions are kept: locks, `LISTEN` and settings work.
    Direct,
    /// Through a proxy that does not keep sessions; `evidence` says how that showed.
    TransactionPooler { evidence: String },
}

impl ConnectionPath {
    pub fn is_pooled(&self) -> bool {
        matches!(self, ConnectionPath::TransactionPooler { .. })
    }
}

/// Finds out how `options` reaches PostgreSQL, with one connection.
pub async fn probe_connection_path(options: &PgConnectOptions) -> Result<ConnectionPath, sqlx::Error> {
    let probe = options.clone().options([(PROBE_SETTING, "on")]);
    let mut conn = match probe.connect().await {
        Ok(conn) => conn,
        Err(sqlx::Error::Database(error)) if error.message().contains("unsupported startup parameter") => {
            return Ok(ConnectionPath::TransactionPooler {
                evidence: "it refused a setting sent at connect".to_owned(),
            });
        }
        Err(error) => return Err(error),
    };
    let kept: Option<String> = sqlx::query_scalar("SELECT current_setting($1, true)")
        .bind(PROBE_SETTING)
        .fetch_one(&mut conn)
        .await?;
    // Closing politely only saves the server a log line.
    let _ = conn.close().await;
    Ok(if kept.as_deref() == Some("on") {
        ConnectionPath::Direct
    } else {
        ConnectionPath::TransactionPooler {
            evidence: "a setting sent at connect did not reach the session".to_owned(),
        }
    })
}

/// The `statement_timeout` the server applies to `pool`'s connections (from the user's,
/// the database's or the server's settings); `None` when there is none (0).
pub async fn server_statement_timeout(pool: &sqlx::PgPool) -> Result<Option<std::time::Duration>, sqlx::Error> {
    let millis: i64 = sqlx::query_scalar("SELECT setting::bigint FROM pg_settings WHERE name = 'statement_timeout'")
        .fetch_one(pool)
        .await?;
    Ok(u64::try_from(millis)
        .ok()
        .filter(|m| *m > 0)
        .map(std::time::Duration::from_millis))
}
