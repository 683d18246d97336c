//! One connection per request: taken from the source's pool at the request's first
//! statement and kept until the request ends; its statements run on it one after another.
//!
//! Why: sqlx's pool pings a connection when it hands it out and again, always, when it takes
//! it back, so a connection per statement cost three round trips per statement, two of them
//! pings, and the profile of uncached queries was mostly loopback sends and wake-ups
//! (BENCHMARKS.md, "Query API"). A request's statements are few (one to three for a
//! dashboard) and short, so running them in turn costs little of what running them side by
//! side on several connections saved.

use sqlx::PgPool;
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnection, Postgres};
use tokio::sync::{MappedMutexGuard, Mutex, MutexGuard};

/// A request's connection to its source, taken on first use.
#[derive(Debug)]
pub struct RequestConnection {
    pool: PgPool,
    held: Mutex<Option<PoolConnection<Postgres>>>,
}

impl RequestConnection {
    pub fn new(pool: PgPool) -> Self {
        RequestConnection {
            pool,
            held: Mutex::new(None),
        }
    }

    /// The connection, for one statement: other statements of the request wait until the
    /// guard is dropped, so hold it for no more than a statement.
    pub async fn get(&self) -> Result<MappedMutexGuard<'_, PgConnection>, sqlx::Error> {
        let mut held = self.held.lock().await;
        if held.is_none() {
            *held = Some(self.pool.acquire().await?);
        }
        MutexGuard::try_map(held, |held| held.as_deref_mut()).map_err(|_| sqlx::Error::PoolClosed)
    }
}
