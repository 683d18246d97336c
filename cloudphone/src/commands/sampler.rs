//! Gauges nothing else updates: the process (CPU, memory, file descriptors, threads, from
//! `metrics-process`) and the database connections (each pool's, and the server's), sampled
//! every few seconds by every long-running role.

use std::time::Duration;

use query_api::read_pool::ReadPool;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// Names of the metrics sampled here (the `process_*` ones are metrics-process's).
pub mod metrics_names {
    /// Gauge: connections of a pool, by `pool` (`primary`, `query`, and the query API's
    /// dashboard reads, `query_reads:<source>`) and `state` (`idle`, `in_use`).
    pub const DB_POOL_CONNECTIONS: &str = "cloudphone_db_pool_connections";
    /// Gauge: most connections a pool opens, by `pool`.
    pub const DB_POOL_MAX_CONNECTIONS: &str = "cloudphone_db_pool_max_connections";
    /// Gauge: client connections the PostgreSQL server has (every client, not only this
    /// process).
    pub const DB_SERVER_CONNECTIONS: &str = "cloudphone_db_server_connections";
    /// Gauge: client connections the server accepts from non-superusers
    /// (`max_connections` minus the reserved ones).
    pub const DB_SERVER_MAX_CONNECTIONS: &str = "cloudphone_db_server_max_connections";
}
use metrics_names as m;

/// How often the gauges are sampled: often enough for a 15 s scrape interval.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(5);

/// Samples at once and then every [`SAMPLE_INTERVAL`] until `stop` is cancelled. `pools`
/// names each pool of this process; the server's numbers are read through the first.
/// `read_pools` are the query API's dashboard read pools, by source.
pub fn spawn(
    pools: Vec<(&'static str, PgPool)>,
    read_pools: Vec<(String, ReadPool)>,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let process = metrics_process::Collector::default();
        process.describe();
        describe();
        let mut server_failing = false;
        loop {
            process.collect();
            for (name, pool) in &pools {
                let open = pool.size();
                let idle = u32::try_from(pool.num_idle()).unwrap_or(u32::MAX);
                sample_pool((*name).to_owned(), open, idle, pool.options().get_max_connections());
            }
            for (source, pool) in &read_pools {
                let idle = u32::try_from(pool.num_idle()).unwrap_or(u32::MAX);
                sample_pool(
                    format!("query_reads:{source}"),
                    pool.size(),
                    idle,
                    pool.max_connections(),
                );
            }
            if let Some((_, pool)) = pools.first() {
                match sample_server(pool).await {
                    Ok(()) => server_failing = false,
                    // Once per outage, not every five seconds: /readyz reports the database.
                    Err(error) if !server_failing => {
                        server_failing = true;
                        tracing::warn!(%error, "cannot sample the database server's connections");
                    }
                    Err(_) => {}
                }
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(SAMPLE_INTERVAL) => {}
            }
        }
    })
}

fn sample_pool(name: String, open: u32, idle: u32, max: u32) {
    let idle = idle.min(open);
    metrics::gauge!(m::DB_POOL_CONNECTIONS, "pool" => name.clone(), "state" => "idle").set(f64::from(idle));
    metrics::gauge!(m::DB_POOL_CONNECTIONS, "pool" => name.clone(), "state" => "in_use").set(f64::from(open - idle));
    metrics::gauge!(m::DB_POOL_MAX_CONNECTIONS, "pool" => name).set(f64::from(max));
}

async fn sample_server(pool: &PgPool) -> anyhow::Result<()> {
    let server = tokio::time::timeout(Duration::from_secs(2), event_log::server::client_connections(pool))
        .await
        .map_err(|_| anyhow::anyhow!("no answer within 2 s"))??;
    metrics::gauge!(m::DB_SERVER_CONNECTIONS).set(server.open as f64);
    metrics::gauge!(m::DB_SERVER_MAX_CONNECTIONS).set(f64::from(server.max));
    Ok(())
}

fn describe() {
    metrics::describe_gauge!(m::DB_POOL_CONNECTIONS, "Connections of a pool, by state (idle, in_use)");
    metrics::describe_gauge!(m::DB_POOL_MAX_CONNECTIONS, "Most connections a pool opens");
    metrics::describe_gauge!(
        m::DB_SERVER_CONNECTIONS,
        "Client connections of the PostgreSQL server (all clients)"
    );
    metrics::describe_gauge!(
        m::DB_SERVER_MAX_CONNECTIONS,
        "Client connections the PostgreSQL server accepts from non-superusers"
    );
}
