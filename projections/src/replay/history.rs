//! Where the bulk phase reads the log: the primary, or a streaming replica of it.
//!
//! A replica takes the bulk phase's scan of the whole log off the primary. It is used only
//! when it is a standby of this very database (same system identifier and database oid, in
//! recovery), and only once it has replayed the rebuild's target and holds there the same
//! event as the primary: the same chain hash, which covers every event before it, so the
//! history it serves up to the target is the primary's, byte for byte. The tail and the swap
//! always read the primary: the swap happens at a position the primary knows.

use std::time::{Duration, Instant};

use sqlx::{ConnectOptions, Connection, PgConnection, PgPool};

use super::{ReplayError, ReplayObserver, ReplayPhase};

/// How often the wait for a replica asks how far it has replayed.
const CATCH_UP_POLL: Duration = Duration::from_millis(200);
/// How often the wait logs where the replica is.
const CATCH_UP_LOG_EVERY: Duration = Duration::from_secs(5);

/// The pool the bulk phase reads the history from.
#[derive(Debug, Clone)]
pub struct History {
    pool: Option<PgPool>,
    /// The replica, for messages (host, port and database; never a password).
    at: String,
    /// How long to wait for the replica to reach the target.
    catch_up: Duration,
}

impl History {
    /// The history comes from the primary itself.
    pub fn primary() -> History {
        History {
            pool: None,
            at: String::new(),
            catch_up: Duration::ZERO,
        }
    }

    /// The history comes from `replica` (a pool that may be lazy: nothing is asked of it until
    /// the replay checks it), which gets at most `catch_up` to replay the target.
    pub fn replica(replica: PgPool, catch_up: Duration) -> History {
        let options = replica.connect_options();
        let at = format!(
            "{}:{}/{}",
            options.get_host(),
            options.get_port(),
            options.get_database().unwrap_or("postgres")
        );
        History {
            pool: Some(replica),
            at,
            catch_up,
        }
    }

    /// True when the history comes from a replica.
    pub fn is_replica(&self) -> bool {
        self.pool.is_some()
    }

    /// The pool to read the history from.
    pub(super) fn pool<'p>(&'p self, primary: &'p PgPool) -> &'p PgPool {
        self.pool.as_ref().unwrap_or(primary)
    }

    /// Refuses a replica that cannot be reached or is not a standby of `primary`'s database.
    /// Changes nothing anywhere.
    pub(super) async fn check_standby(&self, primary: &PgPool) -> Result<(), ReplayError> {
        let Some(replica) = &self.pool else {
            return Ok(());
        };
        let mut conn = self.connect(replica).await?;
        let theirs = identity(&mut conn).await.map_err(|source| self.unusable(source))?;
        let _ = conn.close().await;
        let ours = identity(&mut *primary.acquire().await?).await?;
        let not_a_standby = |reason: String| ReplayError::NotAStandby {
            at: self.at.clone(),
            reason,
        };
        if !theirs.in_recovery {
            return Err(not_a_standby(
                "it is not in recovery (a primary, or a promoted copy)".into(),
            ));
        }
        if theirs.system != ours.system {
            return Err(not_a_standby(format!(
                "its system identifier is {}, the primary's {}",
                theirs.system, ours.system
            )));
        }
        if theirs.database != ours.database {
            return Err(not_a_standby(format!(
                "it is another database of the primary's cluster (oid {}, the primary's {})",
                theirs.database, ours.database
            )));
        }
        Ok(())
    }

    /// Waits until the replica has replayed the log up to `target` (at most the catch-up
    /// time, reporting progress), then checks it holds the primary's event there.
    pub(super) async fn wait_for(
        &self,
        primary: &PgPool,
        target: i64,
        observer: &dyn ReplayObserver,
    ) -> Result<(), ReplayError> {
        let Some(replica) = &self.pool else {
            return Ok(());
        };
        let started = Instant::now();
        let mut conn = self.connect(replica).await?;
        let mut logged = started;
        let mut replayed = replayed_position(&mut conn).await.map_err(|e| self.unusable(e))?;
        if replayed < target {
            observer.phase(ReplayPhase::WaitingForHistory { replayed, target });
            tracing::info!(at = %self.at, replayed, target, "waiting for the history replica to replay the target");
        }
        while replayed < target {
            if started.elapsed() >= self.catch_up {
                return Err(ReplayError::HistoryBehind {
                    at: self.at.clone(),
                    replayed,
                    target,
                    waited_seconds: started.elapsed().as_secs(),
                });
            }
            tokio::time::sleep(CATCH_UP_POLL).await;
            replayed = replayed_position(&mut conn).await.map_err(|e| self.unusable(e))?;
            observer.progress(replayed.min(target), target);
            if logged.elapsed() >= CATCH_UP_LOG_EVERY {
                logged = Instant::now();
                tracing::info!(at = %self.at, replayed, target, "history replica catching up");
            }
        }
        if target > 0 {
            let theirs = hash_at(&mut conn, target).await.map_err(|e| self.unusable(e))?;
            let ours = hash_at(&mut *primary.acquire().await?, target).await?;
            if theirs != ours {
                return Err(ReplayError::HistoryDiverged {
                    at: self.at.clone(),
                    position: target,
                });
            }
        }
        let _ = conn.close().await;
        tracing::info!(
            at = %self.at,
            target,
            waited_seconds = started.elapsed().as_secs_f64(),
            "reading the history from the replica"
        );
        Ok(())
    }

    /// One connection of its own, so that a refused one says why (a pool would retry it
    /// until its acquire timeout).
    async fn connect(&self, replica: &PgPool) -> Result<PgConnection, ReplayError> {
        replica
            .connect_options()
            .connect()
            .await
            .map_err(|source| self.unusable(source))
    }

    fn unusable(&self, source: sqlx::Error) -> ReplayError {
        ReplayError::HistoryUnreachable {
            at: self.at.clone(),
            source,
        }
    }
}

struct Identity {
    system: i64,
    database: i64,
    in_recovery: bool,
}

async fn identity(conn: &mut PgConnection) -> Result<Identity, sqlx::Error> {
    let (system, database, in_recovery): (i64, i64, bool) = sqlx::query_as(
        "SELECT (SELECT system_identifier FROM pg_control_system()),
                (SELECT oid::int8 FROM pg_database WHERE datname = current_database()),
                pg_is_in_recovery()",
    )
    .fetch_one(conn)
    .await?;
    Ok(Identity {
        system,
        database,
        in_recovery,
    })
}

/// How far the log is on this server: `log_head` moves in the transaction of every append,
/// and a standby applies commits in order, so every event up to it is visible there.
async fn replayed_position(conn: &mut PgConnection) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT position FROM log_head")
        .fetch_one(conn)
        .await
}

async fn hash_at(conn: &mut PgConnection, position: i64) -> Result<Option<Vec<u8>>, sqlx::Error> {
    sqlx::query_scalar("SELECT hash FROM user_events_all WHERE position = $1")
        .bind(position)
        .fetch_optional(conn)
        .await
}
