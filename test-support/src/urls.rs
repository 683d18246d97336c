//! Where the tests' databases are.

use sqlx::PgPool;

/// The server `#[sqlx::test]` creates its throwaway databases on: `DATABASE_URL` (set in
/// `.cargo/config.toml`), or the local default.
pub fn server() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// The name of the database `pool` is connected to (a test's own, under `#[sqlx::test]`).
async fn database_name(pool: &PgPool) -> String {
    sqlx::query_scalar("SELECT current_database()")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// A URL for the test's own database on the server of `DATABASE_URL`: what a role started as
/// a process is given.
pub async fn database(pool: &PgPool) -> String {
    let name = database_name(pool).await;
    let server = server();
    let base = server
        .rsplit_once('/')
        .map(|(base, _)| base.to_owned())
        .unwrap_or(server);
    format!("{base}/{name}")
}

/// The test's own database on the streaming replica (ops/dev/replica.sh; port
/// `CLOUDPHONE_REPLICA_PORT`, 5433 by default): databases replicate like everything else.
pub async fn replica_database(pool: &PgPool) -> String {
    let name = database_name(pool).await;
    let port = std::env::var("CLOUDPHONE_REPLICA_PORT").unwrap_or_else(|_| "5433".into());
    format!("postgres://postgres@127.0.0.1:{port}/{name}")
}

/// The test's own database through the development PgBouncer in transaction mode
/// (ops/dev/pgbouncer.sh; port `CLOUDPHONE_PGBOUNCER_PORT`, 6432 by default), which reaches
/// every database of the server by name.
pub async fn pooled_database(pool: &PgPool) -> String {
    let name = database_name(pool).await;
    let port = std::env::var("CLOUDPHONE_PGBOUNCER_PORT").unwrap_or_else(|_| "6432".into());
    format!("postgres://postgres@127.0.0.1:{port}/{name}")
}
