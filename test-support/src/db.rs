//! The test's database: its schema, and what only a superuser could do to it.

use sqlx::{Acquire, PgPool, Postgres};

/// The event log's and the read models' migrations, applied to the test's database.
pub async fn migrated(pool: &PgPool) {
    event_log::migrate(pool).await.expect("log migrations");
    read_models::migrate(pool).await.expect("read model migrations");
}

/// Runs `statement` (an UPDATE, DELETE or TRUNCATE of stored events) past the log's
/// append-only triggers, as an operator with superuser rights deliberately could: in its own
/// transaction with `SET LOCAL session_replication_role = replica` (see
/// event-log/migrations/0005_append_only_log.sql). Tests connect as a superuser. Returns the
/// rows affected; the setting ends with the transaction.
pub async fn tamper<'c>(conn: impl Acquire<'c, Database = Postgres>, statement: &'static str) -> u64 {
    let mut tx = conn.begin().await.unwrap_or_else(|e| panic!("begin: {e}"));
    sqlx::query("SET LOCAL session_replication_role = replica")
        .execute(&mut *tx)
        .await
        .unwrap_or_else(|e| panic!("bypass the triggers: {e}"));
    let done = sqlx::query(statement)
        .execute(&mut *tx)
        .await
        .unwrap_or_else(|e| panic!("{statement}: {e}"));
    tx.commit().await.unwrap_or_else(|e| panic!("commit: {e}"));
    done.rows_affected()
}
