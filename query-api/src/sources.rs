//! Where reads go: healthy read replicas in turn, the primary when none is usable, and for
//! read-your-writes a source whose projections have reached the caller's position.
//!
//! A background round ([`ReadSources::check_health`]) probes every replica: it must answer,
//! be in recovery, and have replayed to within `max_lag_bytes` of the primary's WAL. A
//! replica that fails is out of rotation until a later round finds it well again; a query
//! that fails on a replica is retried on the primary ([`ReadSources::read`]), so one replica
//! dying between two rounds fails no query.

use std::future::Future;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use read_models::Projection;
use sqlx::PgPool;
use sqlx::postgres::PgConnectOptions;
use tokio_util::sync::CancellationToken;

use crate::read_pool::{ReadPool, ReadPoolOptions};
use crate::watermark::Watermark;

/// Names of the metrics the router records.
pub mod metrics_names {
    /// Gauge: 1 while a replica is in rotation, per replica.
    pub const REPLICA_HEALTHY: &str = "cloudphone_replica_healthy";
    /// Gauge: bytes of WAL a replica has not replayed yet, per replica.
    pub const REPLICA_LAG_BYTES: &str = "cloudphone_replica_lag_bytes";
    /// Counter: reads answered by the primary because no replica could, by reason.
    pub const READ_FALLBACKS_TOTAL: &str = "cloudphone_read_fallbacks_total";
}
use metrics_names as m;

#[derive(Debug, Clone)]
pub struct SourcesConfig {
    /// A replica further behind the primary's WAL than this is taken out of rotation.
    pub max_lag_bytes: i64,
    /// How long a probe may take before the replica counts as down.
    pub probe_timeout: Duration,
    /// How long a read-your-writes query waits for a source to reach its position.
    pub position_wait: Duration,
    /// A source's checkpoints read longer ago than this count as unknown.
    pub watermark_max_age: Duration,
    /// Longest a statement may run on a replica (PostgreSQL `statement_timeout`).
    pub statement_timeout: Option<Duration>,
    /// Most connections opened to each replica.
    pub max_connections: u32,
}

impl Default for SourcesConfig {
    fn default() -> Self {
        SourcesConfig {
            max_lag_bytes: 16 * 1024 * 1024,
            probe_timeout: Duration::from_secs(1),
            position_wait: Duration::from_secs(2),
            watermark_max_age: Duration::from_secs(1),
            statement_timeout: None,
            max_connections: 16,
        }
    }
}

#[derive(Debug)]
struct Replica {
    name: String,
    pool: PgPool,
    reads: ReadPool,
    healthy: AtomicBool,
    lag_bytes: AtomicI64,
    watermark: Watermark,
}

/// Where one query runs, and how far that source's read models are known to be.
#[derive(Debug, Clone)]
pub struct Route {
    /// The source's pool for everything but the dashboards' reads (operator views, exports).
    pub pool: PgPool,
    /// The source's pool for the dashboards' reads ([`crate::reads`]).
    pub reads: ReadPool,
    pub source: Source,
    /// Each projection's checkpoint (in the order of [`Projection::ALL`]) the source had
    /// reached at least; `None` when not known recently (answers are then not cached).
    pub checkpoints: Option<Checkpoints>,
}

/// A source's projection checkpoints, each in the order of [`Projection::ALL`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoints {
    /// The log position each projection has applied.
    pub positions: Vec<i64>,
    /// The version of each projection's live tables. A replay's swap changes it without
    /// moving a position, and an answer read before the swap must not be served after it.
    pub versions: Vec<i32>,
}

impl Checkpoints {
    /// The position every projection has applied.
    pub fn least(&self) -> i64 {
        self.positions.iter().copied().min().unwrap_or(0)
    }
}

/// Which database answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Primary,
    Replica(String),
}

impl Source {
    /// `primary` or `replica`, as the `x-read-source` response header says.
    pub fn kind(&self) -> &'static str {
        match self {
            Source::Primary => "primary",
            Source::Replica(_) => "replica",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// Reading the primary's checkpoints failed: this request's read, or the one it shared.
    #[error("cannot read the primary's projection checkpoints: {0}")]
    Checkpoints(Arc<sqlx::Error>),
    /// Even the primary's projections have not reached the position after the wait.
    #[error("the read models have not reached position {wanted} within {waited:?} (they stand at {reached})")]
    NotYetVisible {
        wanted: i64,
        reached: i64,
        waited: Duration,
    },
}

/// The primary and the replicas, with their health.
#[derive(Debug, Clone)]
pub struct ReadSources {
    primary: PgPool,
    primary_reads: ReadPool,
    primary_watermark: Arc<Watermark>,
    replicas: Arc<Vec<Replica>>,
    next: Arc<AtomicUsize>,
    config: SourcesConfig,
}

impl ReadSources {
    /// Replica pools connect lazily: a replica that is down at start-up joins when it answers.
    pub fn new(primary: PgPool, replica_urls: &[String], config: SourcesConfig) -> Result<Self, sqlx::Error> {
        let replicas = replica_urls
            .iter()
            .map(|url| {
                let mut options = PgConnectOptions::from_str(url)?;
                if let Some(timeout) = config.statement_timeout {
                    options = options.options([("statement_timeout", timeout.as_millis().to_string())]);
                }
                let reads = ReadPool::new(
                    options.clone(),
                    ReadPoolOptions::new(config.max_connections, config.probe_timeout),
                );
                let pool = event_log::pool_options(config.max_connections)
                    .acquire_timeout(config.probe_timeout)
                    .connect_lazy_with(options);
                Ok(Replica {
                    name: replica_name(url),
                    pool,
                    reads,
                    healthy: AtomicBool::new(false),
                    lag_bytes: AtomicI64::new(0),
                    watermark: Watermark::default(),
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()?;
        let primary_reads = ReadPool::new(
            (*primary.connect_options()).clone(),
            ReadPoolOptions::new(
                primary.options().get_max_connections(),
                primary.options().get_acquire_timeout(),
            ),
        );
        Ok(ReadSources {
            primary,
            primary_reads,
            primary_watermark: Arc::new(Watermark::default()),
            replicas: Arc::new(replicas),
            next: Arc::new(AtomicUsize::new(0)),
            config,
        })
    }

    pub fn primary(&self) -> &PgPool {
        &self.primary
    }

    /// The dashboards' read pools, by source (`primary`, or the replica's name).
    pub fn read_pools(&self) -> Vec<(String, ReadPool)> {
        std::iter::once(("primary".to_owned(), self.primary_reads.clone()))
            .chain(self.replicas.iter().map(|r| (r.name.clone(), r.reads.clone())))
            .collect()
    }

    /// Probes every replica once and updates the rotation.
    pub async fn check_health(&self) {
        let primary_lsn: Option<String> = sqlx::query_scalar("SELECT pg_current_wal_lsn()::text")
            .fetch_one(&self.primary)
            .await
            .ok();
        for replica in self.replicas.iter() {
            let probe = async {
                sqlx::query_as::<_, (bool, Option<i64>)>(
                    "SELECT pg_is_in_recovery(),
                            pg_wal_lsn_diff($1::pg_lsn, pg_last_wal_replay_lsn())::bigint",
                )
                .bind(primary_lsn.as_deref())
                .fetch_one(&replica.pool)
                .await
            };
            let (healthy, lag) = match tokio::time::timeout(self.config.probe_timeout, probe).await {
                Ok(Ok((true, lag))) => {
                    let lag = lag.unwrap_or(0).max(0);
                    (lag <= self.config.max_lag_bytes, lag)
                }
                // Promoted (no longer a replica of this primary), down, or too slow to answer.
                Ok(Ok((false, _))) | Ok(Err(_)) | Err(_) => (false, i64::MAX),
            };
            let was = replica.healthy.swap(healthy, Ordering::Relaxed);
            replica.lag_bytes.store(lag, Ordering::Relaxed);
            if was != healthy {
                tracing::warn!(replica = %replica.name, healthy, lag_bytes = lag, "replica rotation changed");
            }
            metrics::gauge!(m::REPLICA_HEALTHY, "replica" => replica.name.clone()).set(f64::from(u8::from(healthy)));
            if lag != i64::MAX {
                metrics::gauge!(m::REPLICA_LAG_BYTES, "replica" => replica.name.clone()).set(lag as f64);
            }
        }
    }

    /// Probes the replicas every `interval` until `stop`, the first time an interval from now
    /// (start-up probed them already).
    pub fn spawn_health_checks(&self, interval: Duration, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
        let sources = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(interval) => {}
                }
                sources.check_health().await;
            }
        })
    }

    /// Reads every source's projection checkpoints once (the primary and the replicas in
    /// rotation), so [`ReadSources::route`] knows how far each is without a round trip.
    pub async fn refresh_watermarks(&self) {
        let now = Instant::now();
        self.primary_watermark
            .read_after(&self.primary, now, self.config.position_wait)
            .await;
        for replica in self.replicas.iter().filter(|r| r.healthy.load(Ordering::Relaxed)) {
            replica
                .watermark
                .read_after(&replica.pool, now, self.config.probe_timeout)
                .await;
        }
    }

    /// Refreshes the watermarks every `interval` until `stop`, the first time an interval from
    /// now (start-up refreshed them already).
    pub fn spawn_watermarks(&self, interval: Duration, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
        let sources = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(interval) => {}
                }
                sources.refresh_watermarks().await;
            }
        })
    }

    /// Where to run a query: a replica in rotation (round robin), else the primary; with
    /// `min_position`, a source whose projections have applied it ([`ReadSources::source_at`]).
    /// The route carries the checkpoints the source had reached at least (from the last
    /// watermark refresh, or read just now), or none when they are not known recently.
    pub async fn route(&self, min_position: Option<i64>) -> Result<Route, ReadError> {
        let fresh = self.config.watermark_max_age;
        let rotation = self.rotation();
        let Some(wanted) = min_position else {
            return Ok(match rotation.first() {
                Some(replica) => Route {
                    pool: replica.pool.clone(),
                    reads: replica.reads.clone(),
                    source: Source::Replica(replica.name.clone()),
                    checkpoints: replica.watermark.get(fresh),
                },
                None => {
                    if !self.replicas.is_empty() {
                        metrics::counter!(m::READ_FALLBACKS_TOTAL, "reason" => "no_replica").increment(1);
                    }
                    self.primary_route()
                }
            });
        };
        // A watermark that already covers the position needs no round trip.
        for replica in &rotation {
            if let Some(at) = replica.watermark.get(fresh)
                && at.least() >= wanted
            {
                return Ok(Route {
                    pool: replica.pool.clone(),
                    reads: replica.reads.clone(),
                    source: Source::Replica(replica.name.clone()),
                    checkpoints: Some(at),
                });
            }
        }
        if self.replicas.is_empty()
            && let Some(at) = self.primary_watermark.get(fresh)
            && at.least() >= wanted
        {
            return Ok(Route {
                pool: self.primary.clone(),
                reads: self.primary_reads.clone(),
                source: Source::Primary,
                checkpoints: Some(at),
            });
        }
        self.source_at(wanted).await
    }

    /// Where to read the log so that it holds `position`: a replica in rotation whose recent
    /// watermark covers it (its projections applied the position, so its WAL replay has
    /// passed the event's commit), else the primary, which holds every acknowledged event.
    /// Unlike [`ReadSources::route`] it never waits and never fails: the log, not the read
    /// models, has to be there.
    pub fn route_holding(&self, position: i64) -> Route {
        let fresh = self.config.watermark_max_age;
        for replica in self.rotation() {
            if let Some(at) = replica.watermark.get(fresh)
                && at.least() >= position
            {
                return Route {
                    pool: replica.pool.clone(),
                    reads: replica.reads.clone(),
                    source: Source::Replica(replica.name.clone()),
                    checkpoints: Some(at),
                };
            }
        }
        if !self.replicas.is_empty() {
            metrics::counter!(m::READ_FALLBACKS_TOTAL, "reason" => "replica_behind").increment(1);
        }
        self.primary_route()
    }

    /// A source that holds every transaction the primary had committed when this was called:
    /// a replica in rotation once its WAL replay has passed the primary's WAL position (waited
    /// for up to `position_wait`), else the primary. Unlike [`ReadSources::source_at`] it
    /// asks the WAL, not the checkpoints, so it holds for batches that do not move a
    /// checkpoint (Kafka-mode projectors move it later, by partition watermark).
    pub async fn source_with_all_committed(&self) -> Route {
        let rotation = self.rotation();
        if rotation.is_empty() {
            return self.primary_route();
        }
        let committed: Result<String, sqlx::Error> = sqlx::query_scalar("SELECT pg_current_wal_lsn()::text")
            .fetch_one(&self.primary)
            .await;
        let Ok(committed) = committed else {
            return self.primary_route();
        };
        let started = Instant::now();
        let mut pause = Duration::from_millis(1);
        loop {
            for replica in &rotation {
                let replayed =
                    sqlx::query_scalar::<_, bool>("SELECT coalesce(pg_last_wal_replay_lsn() >= $1::pg_lsn, false)")
                        .bind(&committed)
                        .fetch_one(&replica.pool);
                if let Ok(Ok(true)) = tokio::time::timeout(self.config.probe_timeout, replayed).await {
                    return Route {
                        pool: replica.pool.clone(),
                        reads: replica.reads.clone(),
                        source: Source::Replica(replica.name.clone()),
                        checkpoints: None,
                    };
                }
            }
            if started.elapsed() >= self.config.position_wait {
                metrics::counter!(m::READ_FALLBACKS_TOTAL, "reason" => "replica_behind").increment(1);
                return self.primary_route();
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }

    /// The primary, with its last known checkpoints.
    pub fn primary_route(&self) -> Route {
        Route {
            pool: self.primary.clone(),
            reads: self.primary_reads.clone(),
            source: Source::Primary,
            checkpoints: self.primary_watermark.get(self.config.watermark_max_age),
        }
    }

    /// Takes a replica out of rotation after a read on it failed; the next healthy probe
    /// brings it back.
    pub fn report_failure(&self, source: &Source) {
        if let Source::Replica(name) = source
            && let Some(replica) = self.replicas.iter().find(|r| &r.name == name)
        {
            tracing::warn!(replica = %name, "read failed on a replica; out of rotation until it probes healthy");
            replica.healthy.store(false, Ordering::Relaxed);
            metrics::gauge!(m::REPLICA_HEALTHY, "replica" => name.clone()).set(0.0);
            metrics::counter!(m::READ_FALLBACKS_TOTAL, "reason" => "replica_failed").increment(1);
        }
    }

    /// The replicas in rotation now, in round-robin order from the next turn.
    fn rotation(&self) -> Vec<&Replica> {
        let healthy: Vec<&Replica> = self
            .replicas
            .iter()
            .filter(|r| r.healthy.load(Ordering::Relaxed))
            .collect();
        if healthy.is_empty() {
            return healthy;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed) % healthy.len();
        healthy[start..].iter().chain(&healthy[..start]).copied().collect()
    }

    /// Runs `query` on a replica in rotation, or on the primary when there is none or the
    /// replica fails (it is then taken out of rotation until the next healthy probe).
    pub async fn read<T, F, Fut>(&self, query: F) -> Result<(T, Source), ReadError>
    where
        F: Fn(PgPool) -> Fut,
        Fut: Future<Output = Result<T, sqlx::Error>>,
    {
        if let Some(replica) = self.rotation().first() {
            match query(replica.pool.clone()).await {
                Ok(value) => return Ok((value, Source::Replica(replica.name.clone()))),
                Err(error) if !is_source_failure(&error) => return Err(error.into()),
                Err(error) => {
                    tracing::warn!(replica = %replica.name, %error, "read failed on a replica; retrying on the primary");
                    replica.healthy.store(false, Ordering::Relaxed);
                    metrics::counter!(m::READ_FALLBACKS_TOTAL, "reason" => "replica_failed").increment(1);
                }
            }
        } else if !self.replicas.is_empty() {
            metrics::counter!(m::READ_FALLBACKS_TOTAL, "reason" => "no_replica").increment(1);
        }
        Ok((query(self.primary.clone()).await?, Source::Primary))
    }

    /// A source whose projections (all of them) have applied the log up to `position`:
    /// a replica in rotation if one has, else the first to reach it within the configured
    /// wait, else the primary if it has, else [`ReadError::NotYetVisible`].
    pub async fn source_at(&self, position: i64) -> Result<Route, ReadError> {
        let started = Instant::now();
        let mut pause = Duration::from_millis(2);
        // The start of the newest reading looked at, per source: one no newer is known to
        // fall short, and the next may come from another request.
        let mut seen_primary = started;
        let mut seen_replicas: Vec<(String, Instant)> = Vec::new();
        loop {
            let rotation = self.rotation();
            for replica in &rotation {
                let seen = seen_replicas
                    .iter()
                    .find(|(name, _)| *name == replica.name)
                    .map_or(started, |(_, at)| *at);
                let reading = replica
                    .watermark
                    .read_after(&replica.pool, seen, self.config.probe_timeout)
                    .await;
                match seen_replicas.iter_mut().find(|(name, _)| *name == replica.name) {
                    Some((_, at)) => *at = reading.started,
                    None => seen_replicas.push((replica.name.clone(), reading.started)),
                }
                if let Ok(at) = reading.result
                    && at.least() >= position
                {
                    return Ok(Route {
                        pool: replica.pool.clone(),
                        reads: replica.reads.clone(),
                        source: Source::Replica(replica.name.clone()),
                        checkpoints: Some(at),
                    });
                }
            }
            let reading = self
                .primary_watermark
                .read_after(&self.primary, seen_primary, self.config.position_wait)
                .await;
            seen_primary = reading.started;
            let at = reading.result.map_err(ReadError::Checkpoints)?;
            let reached = at.least();
            // Waiting only helps when a replica in rotation may still catch up.
            if reached >= position && (rotation.is_empty() || started.elapsed() >= self.config.position_wait) {
                if !self.replicas.is_empty() {
                    metrics::counter!(m::READ_FALLBACKS_TOTAL, "reason" => "replica_behind").increment(1);
                }
                return Ok(Route {
                    pool: self.primary.clone(),
                    reads: self.primary_reads.clone(),
                    source: Source::Primary,
                    checkpoints: Some(at),
                });
            }
            if started.elapsed() >= self.config.position_wait {
                return Err(ReadError::NotYetVisible {
                    wanted: position,
                    reached,
                    waited: started.elapsed(),
                });
            }
            // Another request's reading of the primary wakes this one early (the replicas'
            // newest readings are looked at on the way round).
            self.primary_watermark.next_reading_or(pause).await;
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }

    /// Replicas by name with whether they are in rotation and their lag in bytes.
    pub fn replica_states(&self) -> Vec<(String, bool, i64)> {
        self.replicas
            .iter()
            .map(|r| {
                (
                    r.name.clone(),
                    r.healthy.load(Ordering::Relaxed),
                    r.lag_bytes.load(Ordering::Relaxed),
                )
            })
            .collect()
    }
}

/// Every projection's checkpoint and live version, in the order of [`Projection::ALL`]
/// (position 0 and version 1 for one that has not run yet).
pub(crate) async fn checkpoints(pool: &PgPool) -> Result<Checkpoints, sqlx::Error> {
    let names: Vec<&str> = Projection::ALL.iter().map(|p| p.name()).collect();
    let rows: Vec<(String, i64, i32)> =
        sqlx::query_as("SELECT projection, position, version FROM projection_checkpoints WHERE projection = ANY($1)")
            .bind(&names)
            .fetch_all(pool)
            .await?;
    let row = |name: &&str| rows.iter().find(|(p, _, _)| p == name);
    Ok(Checkpoints {
        positions: names.iter().map(|name| row(name).map_or(0, |r| r.1)).collect(),
        versions: names.iter().map(|name| row(name).map_or(1, |r| r.2)).collect(),
    })
}

/// Whether an error says the source failed (unreachable, shutting down, a recovery
/// conflict), rather than the query: only then is another source worth trying.
pub fn is_source_failure(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            // 08: connection exception; 57: operator intervention (shutdown, recovery
            // conflict cancels); 53: insufficient resources; 40001: recovery conflict. But
            // 57014 is a statement cancelled by its own statement_timeout: the query's fault,
            // and running it again elsewhere would only double the load.
            (code.starts_with("08") || code.starts_with("57") || code.starts_with("53") || code == "40001")
                && code != "57014"
        }),
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => true,
        _ => false,
    }
}

/// host:port/database of a URL, without credentials (for logs and metric labels).
fn replica_name(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, rest)| rest);
    rest.split('?').next().unwrap_or(rest).to_owned()
}

#[cfg(test)]
mod tests {
    use super::replica_name;

    #[test]
    fn replica_names_never_carry_credentials() {
        assert_eq!(
            replica_name("postgres://reader:s3cret@10.0.0.7:5433/cloudphone?sslmode=require"),
            "10.0.0.7:5433/cloudphone"
        );
        assert_eq!(replica_name("postgres://127.0.0.1:5433/x"), "127.0.0.1:5433/x");
    }
}
