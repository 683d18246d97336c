//! What the PostgreSQL server itself reports, for the roles' readiness and metrics: whether it
//! answers, and how many of its connection slots clients hold.

use sqlx::PgPool;

/// Client connections open on the server, and how many it accepts from ordinary roles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerConnections {
    pub open: i64,
    pub max: i32,
}

/// Succeeds when the server runs a statement for `pool`.
pub async fn answers(pool: &PgPool) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT 1").execute(pool).await.map(|_| ())
}

/// The server's client connections against its limit for non-superusers.
pub async fn client_connections(pool: &PgPool) -> Result<ServerConnections, sqlx::Error> {
    // `reserved_connections` exists from PostgreSQL 16 on (NULL before).
    let (open, max): (i64, i32) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'),
                current_setting('max_connections')::int
                - current_setting('superuser_reserved_connections')::int
                - coalesce(current_setting('reserved_connections', true)::int, 0)",
    )
    .fetch_one(pool)
    .await?;
    Ok(ServerConnections { open, max })
}
