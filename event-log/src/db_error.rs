//! Telling database failures apart: the server being unreachable (retry later, answer 503)
//! versus the server refusing a statement.

/// True when `error` means the database could not be reached or dropped the session: the
/// statement did not take effect (unless it was a COMMIT whose answer was lost).
pub fn is_connection_error(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| is_transient_code(&code)),
        _ => false,
    }
}

/// SQLSTATEs that say "try again later", not "your statement is wrong".
fn is_transient_code(code: &str) -> bool {
    code.starts_with("08") // connection exception
        || matches!(
            code,
            "57P01" // admin_shutdown
                | "57P02" // crash_shutdown
                | "57P03" // cannot_connect_now
                | "53300" // too_many_connections
                | "55P03" // lock_not_available (lock_timeout)
                | "57014" // query_canceled (statement_timeout)
                | "40001" // serialization_failure
                | "40P01" // deadlock_detected
                | "25006" // read_only_sql_transaction (a replica, or a failover in progress)
        )
}

/// True for PostgreSQL's "no partition of relation ... found for row".
pub fn is_missing_partition(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(db) => {
            db.code().as_deref() == Some("23514") && db.message().contains("no partition of relation")
        }
        _ => false,
    }
}
