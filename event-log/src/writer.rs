//! Group commit: one writer task turns many concurrent appends into few transactions.
//!
//! Callers check their batch in their own task (decoding and serialising is the costly CPU
//! part, so it runs in parallel), then queue it. The writer locks the log head as soon as one
//! append is queued, takes everything queued by the time it holds the lock, up to
//! `max_group_events`, and commits it in one transaction: read the streams' versions, decide
//! each batch in queue order (a conflicting batch gets its own error and is left out; the
//! others go on), insert every event with one statement
//! (UNNEST, or COPY for large groups), update streams, idempotency keys and the head, commit.
//! While one group commits the next one queues, so the group size grows with load and the
//! cost of a commit (round trips, WAL flush) is shared by everyone in it. Durability is not
//! traded: a caller is answered only after its commit returned, `synchronous_commit` is left
//! as the server has it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, Utc};
use event_schema::canonical::CanonicalEvent;
use event_schema::{ChainHash, StreamType};
use sqlx::pool::PoolConnection;
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection, PgPool, Postgres, Row};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use crate::append::{
    AppendBatch, AppendError, AppendLimits, AppendOutcome, CheckedBatch, ExpectedVersion, StreamRevision,
};
use crate::chain::chain_hash;
use crate::clock::{Clock, SystemClock, truncate_to_micros};
use crate::migrate::PING_IDLE_AFTER;
use crate::partitions::PartitionCache;
use crate::{db_error, m};

/// How the store groups and writes.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub limits: AppendLimits,
    /// Most events the writer puts in one transaction (a larger single batch still goes alone).
    pub max_group_events: usize,
    /// From this many events in a group the rows are sent with COPY instead of UNNEST.
    pub copy_threshold: usize,
    /// Months of partitions kept ready ahead of the current one.
    pub partitions_ahead: u32,
    /// Appends that may wait for the writer before `append` itself waits (back-pressure).
    pub queue_depth: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            limits: AppendLimits::default(),
            max_group_events: 20_000,
            copy_threshold: 2_000,
            partitions_ahead: 3,
            queue_depth: 8_192,
        }
    }
}

/// The write side of the event log. Cheap to share behind an `Arc`; `shutdown` drains it.
#[derive(Debug)]
pub struct EventStore {
    inner: Arc<Inner>,
    sender: mpsc::Sender<Job>,
    /// Answered (or dropped) when the writer has stopped.
    writer_stopped: oneshot::Receiver<()>,
}

#[derive(Debug)]
struct Inner {
    pool: PgPool,
    clock: Arc<dyn Clock>,
    config: StoreConfig,
    partitions: PartitionCache,
}

#[derive(Debug)]
struct Job {
    batch: CheckedBatch,
    reply: oneshot::Sender<Result<AppendOutcome, AppendError>>,
}

impl EventStore {
    /// Opens the store on a migrated database: makes sure partitions exist for now and the
    /// months ahead, and starts the writer on a thread of its own.
    ///
    /// The writer is the one path every append goes through, one group at a time, and each
    /// group waits on four round trips to PostgreSQL (the head lock, the streams, the write,
    /// COMMIT). On the runtime that serves HTTP, each
    /// answer from PostgreSQL would wake the writer behind every request task queued there:
    /// under load that wait was as long as PostgreSQL's own work on the group. On its own
    /// thread, with its own connection (one more than the pool's), it runs as soon as the
    /// answer comes.
    pub async fn open(pool: PgPool, config: StoreConfig) -> Result<Self, sqlx::Error> {
        Self::open_with_clock(pool, config, Arc::new(SystemClock)).await
    }

    pub async fn open_with_clock(
        pool: PgPool,
        config: StoreConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, sqlx::Error> {
        let partitions = PartitionCache::new(config.partitions_ahead);
        partitions.ensure_covering(&pool, clock.now()).await?;
        let (sender, receiver) = mpsc::channel(config.queue_depth.max(1));
        let connection = WriterConnection::own((*pool.connect_options()).clone());
        let inner = Arc::new(Inner {
            pool,
            clock,
            config,
            partitions,
        });
        let (stopped, writer_stopped) = oneshot::channel();
        let writer_inner = Arc::clone(&inner);
        std::thread::Builder::new()
            .name("event-log-writer".into())
            .spawn(move || {
                match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(runtime) => runtime.block_on(run_writer(writer_inner, receiver, connection)),
                    // Appends then fail with `WriterStopped`: the receiver is gone.
                    Err(error) => tracing::error!(%error, "cannot start the event log writer's runtime"),
                }
                let _ = stopped.send(());
            })
            .map_err(sqlx::Error::Io)?;
        Ok(EventStore {
            inner,
            sender,
            writer_stopped,
        })
    }

    /// Appends a batch through group commit. Returns after the batch's transaction committed
    /// (or failed); every stream of the batch is written or none is.
    pub async fn append(&self, batch: AppendBatch) -> Result<AppendOutcome, AppendError> {
        let batch = batch.check(&self.inner.config.limits)?;
        let (reply, answer) = oneshot::channel();
        self.sender
            .send(Job { batch, reply })
            .await
            .map_err(|_| AppendError::WriterStopped)?;
        answer.await.map_err(|_| AppendError::WriterStopped)?
    }

    /// Appends a batch in a transaction of its own, bypassing the writer task: the naive
    /// one-transaction-per-command path, kept as the baseline benchmarks compare against.
    /// Same guarantees, same checks; only the grouping differs.
    pub async fn append_unbatched(&self, batch: AppendBatch) -> Result<AppendOutcome, AppendError> {
        let batch = batch.check(&self.inner.config.limits)?;
        let mut connection = WriterConnection::pooled();
        let mut results = self
            .inner
            .commit_group(&mut connection, &[&batch], None, Instant::now())
            .await;
        results.pop().unwrap_or(Err(AppendError::WriterStopped))
    }

    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// Appends waiting for the writer right now (the group commit queue depth).
    pub fn queued(&self) -> usize {
        self.sender.max_capacity() - self.sender.capacity()
    }

    pub fn config(&self) -> &StoreConfig {
        &self.inner.config
    }

    /// Stops accepting appends, lets the writer finish everything queued, and waits for it.
    pub async fn shutdown(self) {
        drop(self.sender);
        let _ = self.writer_stopped.await;
    }
}

async fn run_writer(inner: Arc<Inner>, mut receiver: mpsc::Receiver<Job>, mut connection: WriterConnection) {
    let mut carried: Option<Job> = None;
    loop {
        let first = match carried.take() {
            Some(job) => job,
            None => match receiver.recv().await {
                Some(job) => job,
                None => break,
            },
        };
        // The head first, then the group: while another store's group holds the head, this
        // store's appends keep queueing, and all of them join this group instead of waiting
        // for the next one. With several stores (command API instances) sharing one log, a
        // group gathered before the wait held the one or two appends that had arrived.
        let started = Instant::now();
        let locked = inner.lock_head_early(&mut connection).await;
        let mut events = first.batch.events;
        let mut group = vec![first];
        while events < inner.config.max_group_events {
            match receiver.try_recv() {
                Ok(job) if events + job.batch.events > inner.config.max_group_events => {
                    carried = Some(job);
                    break;
                }
                Ok(job) => {
                    events += job.batch.events;
                    group.push(job);
                }
                Err(_) => break,
            }
        }
        let batches: Vec<&CheckedBatch> = group.iter().map(|job| &job.batch).collect();
        let results = inner
            .commit_group(&mut connection, &batches, Some(locked), started)
            .await;
        for (job, result) in group.into_iter().zip(results) {
            // A caller that gave up waiting still had its append committed; nothing to undo.
            let _ = job.reply.send(result);
        }
    }
    tracing::debug!("event log writer stopped");
}

/// Where a group's transaction runs.
///
/// The writer's own connection, kept from one group to the next. Like the pools' connections
/// (`pool_options`) it is pinged only when it sat idle for more than [`PING_IDLE_AFTER`]:
/// under load a group follows the last within milliseconds, and a ping per group was a round
/// trip on the one serial path every append waits on. A kept connection whose backend ended
/// since its last group (a restart, an operator's `pg_terminate_backend`) fails the head lock,
/// which changes nothing, so the lock is taken again on a new connection
/// ([`Inner::lock_head_early`]): no append sees that failure. The unbatched baseline takes a
/// pooled connection for each transaction.
enum WriterConnection {
    Own {
        options: Box<PgConnectOptions>,
        held: Option<PgConnection>,
        /// When a group last took the connection.
        last_taken: Instant,
        /// The last `get` handed out a kept connection without pinging it.
        unchecked: bool,
    },
    Pooled(Option<PoolConnection<Postgres>>),
}

impl WriterConnection {
    fn own(options: PgConnectOptions) -> Self {
        WriterConnection::Own {
            options: Box::new(options),
            held: None,
            last_taken: Instant::now(),
            unchecked: false,
        }
    }

    fn pooled() -> Self {
        WriterConnection::Pooled(None)
    }

    /// The connection the writer's transaction is open on: not pinged (it has just answered),
    /// and never replaced (a new one would not be in that transaction).
    fn in_transaction(&mut self) -> Option<&mut PgConnection> {
        match self {
            WriterConnection::Own { held, .. } => held.as_mut(),
            WriterConnection::Pooled(held) => held.as_mut().map(|conn| &mut **conn),
        }
    }

    async fn get(&mut self, pool: &PgPool) -> Result<&mut PgConnection, sqlx::Error> {
        match self {
            WriterConnection::Own {
                options,
                held,
                last_taken,
                unchecked,
            } => {
                let idle = last_taken.elapsed();
                *last_taken = Instant::now();
                *unchecked = false;
                if let Some(conn) = held {
                    if idle <= PING_IDLE_AFTER {
                        *unchecked = true;
                    } else if conn.ping().await.is_err() {
                        *held = None;
                    }
                }
                let conn = match held {
                    Some(conn) => conn,
                    None => {
                        // Bounded by the pool's acquire timeout: an unreachable server is as
                        // quick a 503 as an exhausted pool.
                        let bound = pool.options().get_acquire_timeout();
                        let conn = tokio::time::timeout(bound, PgConnection::connect_with(options))
                            .await
                            .map_err(|_| sqlx::Error::PoolTimedOut)??;
                        held.insert(conn)
                    }
                };
                Ok(conn)
            }
            WriterConnection::Pooled(held) => {
                let conn = match held {
                    Some(conn) => conn,
                    None => held.insert(pool.acquire().await?),
                };
                Ok(&mut **conn)
            }
        }
    }

    /// Whether the last `get` handed out a kept connection without checking it.
    fn taken_unchecked(&self) -> bool {
        matches!(self, WriterConnection::Own { unchecked: true, .. })
    }

    /// After a connection error: never used again.
    fn discard(&mut self) {
        match self {
            // Dropping it closes the socket.
            WriterConnection::Own { held, .. } => *held = None,
            WriterConnection::Pooled(held) => {
                if let Some(mut conn) = held.take() {
                    conn.close_on_drop();
                }
            }
        }
    }
}

/// Why a group transaction did not commit.
enum GroupFailure {
    /// No partition for the row's month (something dropped it behind our back).
    MissingPartition(DateTime<Utc>),
    /// The connection or server failed before COMMIT: nothing was written.
    Unavailable(sqlx::Error),
    /// The database refused a statement: one batch may be at fault.
    Rejected(sqlx::Error),
    /// The connection failed during COMMIT: the group may or may not have committed.
    CommitUnknown {
        error: sqlx::Error,
        probe: CommitProbe,
        results: Vec<Result<AppendOutcome, AppendError>>,
    },
}

/// Enough to find out after a broken COMMIT whether it happened.
struct CommitProbe {
    position: i64,
    event_id: Uuid,
    recorded_at: DateTime<Utc>,
}

impl Inner {
    /// Opens the writer's next transaction and takes the head lock, before the group is
    /// known. A failure is the group's first attempt failing; the connection is left with no
    /// transaction open.
    async fn lock_head_early(&self, connection: &mut WriterConnection) -> Result<Head, GroupFailure> {
        match self.try_lock_head_early(connection).await {
            // A kept connection handed out without a ping, whose backend ended since the last
            // group: BEGIN and a row lock changed nothing, so take them on a new connection.
            Err(GroupFailure::Unavailable(error)) if connection.taken_unchecked() => {
                tracing::info!(%error, "the writer's connection closed since its last group; opening another");
                self.try_lock_head_early(connection).await
            }
            locked => locked,
        }
    }

    async fn try_lock_head_early(&self, connection: &mut WriterConnection) -> Result<Head, GroupFailure> {
        let now = truncate_to_micros(self.clock.now());
        let conn = self.ready_connection(connection, now).await?;
        let locked = lock_head(conn).await;
        match &locked {
            Ok(_) => {}
            Err(GroupFailure::Unavailable(_)) => connection.discard(),
            Err(_) => {
                if sqlx::query("ROLLBACK").execute(&mut *conn).await.is_err() {
                    connection.discard();
                }
            }
        }
        locked
    }

    /// The connection for a new transaction, once the partitions for `now` exist: a new
    /// month's are created before the head is locked, not while it is held.
    async fn ready_connection<'c>(
        &self,
        connection: &'c mut WriterConnection,
        now: DateTime<Utc>,
    ) -> Result<&'c mut PgConnection, GroupFailure> {
        self.partitions
            .ensure_covering(&self.pool, now)
            .await
            .map_err(GroupFailure::Unavailable)?;
        connection.get(&self.pool).await.map_err(GroupFailure::Unavailable)
    }

    /// Commits one group. `locked` is the head the writer already holds for it (or the
    /// failure to take it), used by the first attempt only: a retry begins again.
    async fn commit_group(
        &self,
        connection: &mut WriterConnection,
        batches: &[&CheckedBatch],
        mut locked: Option<Result<Head, GroupFailure>>,
        started: Instant,
    ) -> Vec<Result<AppendOutcome, AppendError>> {
        let mut retried_partition = false;
        let results = loop {
            let attempt = match locked.take() {
                Some(Err(failure)) => Err(failure),
                Some(Ok(head)) => self.try_commit(connection, batches, Some(head)).await,
                None => self.try_commit(connection, batches, None).await,
            };
            match attempt {
                Ok(results) => break results,
                Err(GroupFailure::MissingPartition(at)) if !retried_partition => {
                    retried_partition = true;
                    tracing::warn!(%at, "no partition for an append; creating it and retrying");
                    self.partitions.forget();
                    if let Err(error) = self.partitions.ensure_covering(&self.pool, at).await {
                        break unavailable_for_all(batches.len(), error);
                    }
                }
                Err(GroupFailure::MissingPartition(at)) => {
                    tracing::error!(%at, "partition still missing after creating it");
                    break batches
                        .iter()
                        .map(|_| Err(AppendError::Database(missing_partition_error(at))))
                        .collect();
                }
                Err(GroupFailure::Unavailable(error)) => break unavailable_for_all(batches.len(), error),
                Err(GroupFailure::Rejected(error)) if batches.len() > 1 => {
                    // One batch may be poisoning the group: give each its own transaction so
                    // only the guilty one fails.
                    tracing::warn!(%error, batches = batches.len(), "group rejected; committing its batches one by one");
                    let mut results = Vec::with_capacity(batches.len());
                    for batch in batches {
                        results.push(match self.try_commit(connection, &[batch], None).await {
                            Ok(mut single) => single.pop().unwrap_or(Err(AppendError::WriterStopped)),
                            Err(failure) => Err(self.settle_single(failure).await),
                        });
                    }
                    break results;
                }
                Err(failure @ (GroupFailure::Rejected(_) | GroupFailure::CommitUnknown { .. })) => {
                    break match failure {
                        GroupFailure::CommitUnknown { error, probe, results } => {
                            self.resolve_unknown_commit(error, probe, results).await
                        }
                        GroupFailure::Rejected(error) => vec![Err(AppendError::Database(error))],
                        _ => unreachable!("matched above"),
                    };
                }
            }
        };
        metrics::histogram!(m::APPEND_GROUP_SECONDS).record(started.elapsed().as_secs_f64());
        metrics::histogram!(m::APPEND_GROUP_BATCHES).record(batches.len() as f64);
        results
    }

    /// Turns the failure of a single-batch transaction into that batch's error.
    async fn settle_single(&self, failure: GroupFailure) -> AppendError {
        match failure {
            GroupFailure::Unavailable(error) => AppendError::Unavailable(error),
            GroupFailure::Rejected(error) => AppendError::Database(error),
            GroupFailure::MissingPartition(at) => AppendError::Database(missing_partition_error(at)),
            GroupFailure::CommitUnknown { error, probe, results } => {
                match self.resolve_unknown_commit(error, probe, results).await.pop() {
                    Some(Err(error)) => error,
                    // Committed after all: the caller still gets an error it can retry with
                    // its idempotency key, which returns the stored outcome.
                    Some(Ok(_)) | None => AppendError::OutcomeUnknown(sqlx::Error::WorkerCrashed),
                }
            }
        }
    }

    /// A COMMIT whose answer was lost: look for the group's first event to learn whether it
    /// committed.
    async fn resolve_unknown_commit(
        &self,
        error: sqlx::Error,
        probe: CommitProbe,
        results: Vec<Result<AppendOutcome, AppendError>>,
    ) -> Vec<Result<AppendOutcome, AppendError>> {
        let found: Result<Option<Uuid>, sqlx::Error> =
            sqlx::query_scalar("SELECT event_id FROM user_events WHERE position = $1 AND recorded_at = $2")
                .bind(probe.position)
                .bind(probe.recorded_at)
                .fetch_optional(&self.pool)
                .await;
        match found {
            Ok(Some(event_id)) if event_id == probe.event_id => {
                tracing::warn!(%error, "commit answer lost, but the group committed");
                results
            }
            Ok(_) => {
                tracing::warn!(%error, "commit answer lost; the group did not commit");
                unavailable_for_all(results.len(), error)
            }
            Err(check_error) => {
                tracing::error!(%error, %check_error, "commit answer lost and could not be checked");
                let message = error.to_string();
                results
                    .iter()
                    .map(|_| Err(AppendError::OutcomeUnknown(sqlx::Error::Protocol(message.clone()))))
                    .collect()
            }
        }
    }

    async fn try_commit(
        &self,
        connection: &mut WriterConnection,
        batches: &[&CheckedBatch],
        locked: Option<Head>,
    ) -> Result<Vec<Result<AppendOutcome, AppendError>>, GroupFailure> {
        let result = self.try_commit_on(connection, batches, locked).await;
        if matches!(
            result,
            Err(GroupFailure::Unavailable(_) | GroupFailure::CommitUnknown { .. })
        ) {
            connection.discard();
        }
        result
    }

    async fn try_commit_on(
        &self,
        connection: &mut WriterConnection,
        batches: &[&CheckedBatch],
        locked: Option<Head>,
    ) -> Result<Vec<Result<AppendOutcome, AppendError>>, GroupFailure> {
        let now = truncate_to_micros(self.clock.now());
        let conn = match locked {
            Some(_) => connection
                .in_transaction()
                .ok_or(GroupFailure::Unavailable(sqlx::Error::PoolClosed))?,
            None => self.ready_connection(connection, now).await?,
        };
        match self.write_group(conn, batches, now, locked).await {
            Ok(GroupWrite::Written { plan, probe }) => match sqlx::query("COMMIT").execute(&mut *conn).await {
                Ok(_) => {
                    metrics::counter!(m::APPEND_EVENTS_TOTAL).increment(plan.event_count as u64);
                    Ok(plan.results)
                }
                Err(error) if db_error::is_connection_error(&error) => Err(GroupFailure::CommitUnknown {
                    error,
                    probe,
                    results: plan.results,
                }),
                Err(error) => Err(classify(error)),
            },
            Ok(GroupWrite::Nothing(results)) => {
                // Every batch conflicted or was an idempotent replay: release the head lock.
                sqlx::query("ROLLBACK").execute(&mut *conn).await.map_err(classify)?;
                Ok(results)
            }
            Err(failure) => {
                // A connection that cannot even roll back is not given to the next group.
                if sqlx::query("ROLLBACK").execute(&mut *conn).await.is_err() {
                    connection.discard();
                }
                Err(failure)
            }
        }
    }

    /// Everything between BEGIN and COMMIT (`locked`: BEGIN and the head lock are done).
    async fn write_group<'a>(
        &self,
        conn: &mut PgConnection,
        batches: &[&'a CheckedBatch],
        now: DateTime<Utc>,
        locked: Option<Head>,
    ) -> Result<GroupWrite<'a>, GroupFailure> {
        // 1. The head row lock: from here until COMMIT no other writer can assign positions.
        let head = match locked {
            Some(head) => head,
            None => lock_head(conn).await?,
        };
        // Commit time never goes backwards along positions, whatever the writers' clocks say.
        let recorded_at = now.max(head.recorded_at);

        // 2. Current versions, read after taking the lock so they are the committed ones, and
        // the idempotency keys seen before: one round trip for both.
        let mut stream_ids: Vec<Uuid> = batches
            .iter()
            .flat_map(|b| b.streams.iter().map(|s| s.stream_id))
            .collect();
        stream_ids.sort_unstable();
        stream_ids.dedup();
        let keys: Vec<&str> = batches
            .iter()
            .filter_map(|b| b.idempotency.as_ref().map(|k| k.key.as_str()))
            .collect();
        let rows = if keys.is_empty() {
            sqlx::query(READ_STREAMS).bind(&stream_ids).fetch_all(&mut *conn).await
        } else {
            // Not a prepared statement: a connection's cached generic plan is costed once, and
            // one made while append_idempotency was nearly empty (a new deployment, the first
            // minute before autovacuum's ANALYZE) is a sequential scan that the connection
            // would keep while the table grows. Planned with its keys each time, the probe is
            // always an index probe (measured in a 45 s `load platform` run: 66.8M rows read
            // by seq scans before, 9,289 after). Unnamed statements must stay inside a
            // transaction: behind a transaction pooler their Parse and Bind could otherwise
            // reach different server connections.
            sqlx::query(READ_STREAMS_AND_KEYS)
                .bind(&stream_ids)
                .bind(&keys)
                .persistent(false)
                .fetch_all(&mut *conn)
                .await
        }
        .map_err(classify)?;
        let mut streams = HashMap::with_capacity(rows.len());
        let mut known_keys = HashMap::new();
        for row in rows {
            if let Some(key) = row.try_get::<Option<String>, _>("key").map_err(classify)? {
                let outcome: serde_json::Value = row.try_get("outcome").map_err(classify)?;
                let outcome: AppendOutcome = serde_json::from_value(outcome)
                    .map_err(|e| GroupFailure::Rejected(sqlx::Error::Decode(Box::new(e))))?;
                known_keys.insert(
                    key,
                    (row.try_get::<Vec<u8>, _>("request_hash").map_err(classify)?, outcome),
                );
                continue;
            }
            let stream_type: String = row.try_get("stream_type").map_err(classify)?;
            let stream_type = stream_type
                .parse::<StreamType>()
                .map_err(|e| GroupFailure::Rejected(sqlx::Error::Decode(Box::new(e))))?;
            streams.insert(
                row.try_get::<Uuid, _>("stream_id").map_err(classify)?,
                KnownStream {
                    stream_type,
                    owner_id: row.try_get("owner_id").map_err(classify)?,
                    version: row.try_get("version").map_err(classify)?,
                },
            );
        }

        // 3. Decide every batch in queue order, assign positions, chain hashes.
        let plan = plan_group(head, recorded_at, streams, known_keys, batches);
        let (Some(&position), Some(&event_id)) = (plan.rows.position.first(), plan.rows.event_id.first()) else {
            return Ok(GroupWrite::Nothing(plan.results));
        };
        let probe = CommitProbe {
            position,
            event_id,
            recorded_at,
        };

        // 4. Write rows, stream versions, keys and the head; notify tailing readers. Large
        // groups send their rows with COPY first and the statement gets no rows to insert.
        let no_rows = EventRows::default();
        let rows = if plan.event_count >= self.config.copy_threshold {
            self.copy_events(conn, &plan, recorded_at)
                .await
                .map_err(|e| classify_insert(e, recorded_at))?;
            &no_rows
        } else {
            &plan.rows
        };
        let (streams, keys) = (&plan.stream_rows, &plan.key_rows);
        sqlx::query(WRITE_GROUP)
            .bind(&rows.position)
            .bind(&rows.event_id)
            .bind(&rows.stream_id)
            .bind(&rows.stream_type)
            .bind(&rows.stream_version)
            .bind(&rows.event_type)
            .bind(&rows.schema_version)
            .bind(&rows.owner_id)
            .bind(&rows.occurred_at)
            .bind(&rows.payload)
            .bind(&rows.metadata)
            .bind(&rows.prev_hash)
            .bind(&rows.hash)
            .bind(recorded_at)
            .bind(&streams.stream_id)
            .bind(&streams.stream_type)
            .bind(&streams.owner_id)
            .bind(&streams.version)
            .bind(&streams.last_position)
            .bind(&keys.key)
            .bind(&keys.request_hash)
            .bind(&keys.outcome)
            .bind(plan.head.position)
            .bind(plan.head.hash.0.to_vec())
            .execute(&mut *conn)
            .await
            .map_err(|e| classify_insert(e, recorded_at))?;
        Ok(GroupWrite::Written {
            plan: Box::new(plan),
            probe,
        })
    }

    async fn copy_events(
        &self,
        conn: &mut PgConnection,
        plan: &Plan<'_>,
        recorded_at: DateTime<Utc>,
    ) -> Result<(), sqlx::Error> {
        let mut copy = conn.copy_in_raw(COPY_EVENTS).await?;
        let recorded_at = copy_timestamp(recorded_at);
        let mut buffer = Vec::with_capacity(1 << 20);
        let r = &plan.rows;
        for i in 0..r.position.len() {
            encode_copy_row(&mut buffer, r, i, &recorded_at);
            if buffer.len() >= (1 << 20) {
                copy.send(std::mem::take(&mut buffer)).await?;
                buffer.reserve(1 << 20);
            }
        }
        if !buffer.is_empty() {
            copy.send(buffer).await?;
        }
        copy.finish().await?;
        Ok(())
    }
}

/// BEGIN and the head row lock, in one message (simple protocol: one round trip, not two).
async fn lock_head(conn: &mut PgConnection) -> Result<Head, GroupFailure> {
    let row = sqlx::raw_sql("BEGIN; SELECT position, hash, recorded_at FROM log_head FOR UPDATE")
        .fetch_optional(&mut *conn)
        .await
        .map_err(classify)?
        .ok_or_else(|| GroupFailure::Rejected(sqlx::Error::RowNotFound))?;
    let head_hash: Vec<u8> = row.try_get("hash").map_err(classify)?;
    Ok(Head {
        position: row.try_get("position").map_err(classify)?,
        hash: ChainHash::from_slice(&head_hash).unwrap_or_default(),
        recorded_at: row.try_get("recorded_at").map_err(classify)?,
    })
}

fn unavailable_for_all(count: usize, error: sqlx::Error) -> Vec<Result<AppendOutcome, AppendError>> {
    // sqlx errors are not Clone; every caller gets the same message.
    let message = error.to_string();
    let mut results = Vec::with_capacity(count);
    results.push(Err(AppendError::Unavailable(error)));
    while results.len() < count {
        results.push(Err(AppendError::Unavailable(sqlx::Error::Protocol(message.clone()))));
    }
    results
}

fn missing_partition_error(at: DateTime<Utc>) -> sqlx::Error {
    sqlx::Error::Protocol(format!("no user_events partition for {at}"))
}

fn classify(error: sqlx::Error) -> GroupFailure {
    if db_error::is_connection_error(&error) {
        GroupFailure::Unavailable(error)
    } else {
        GroupFailure::Rejected(error)
    }
}

fn classify_insert(error: sqlx::Error, recorded_at: DateTime<Utc>) -> GroupFailure {
    if db_error::is_missing_partition(&error) {
        GroupFailure::MissingPartition(recorded_at)
    } else {
        classify(error)
    }
}

enum GroupWrite<'a> {
    /// Nothing to insert: each batch's result (a conflict or a replayed outcome).
    Nothing(Vec<Result<AppendOutcome, AppendError>>),
    Written {
        plan: Box<Plan<'a>>,
        probe: CommitProbe,
    },
}

#[derive(Debug, Clone, Copy)]
struct Head {
    position: i64,
    hash: ChainHash,
    recorded_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Copy)]
struct KnownStream {
    stream_type: StreamType,
    owner_id: Uuid,
    /// 0 for a stream this group creates.
    version: i64,
}

/// The rows of one group, column by column (the shape UNNEST wants).
#[derive(Debug, Default)]
struct EventRows<'a> {
    position: Vec<i64>,
    event_id: Vec<Uuid>,
    stream_id: Vec<Uuid>,
    stream_type: Vec<&'static str>,
    stream_version: Vec<i64>,
    event_type: Vec<&'a str>,
    schema_version: Vec<i16>,
    owner_id: Vec<Uuid>,
    occurred_at: Vec<DateTime<Utc>>,
    payload: Vec<&'a str>,
    metadata: Vec<&'a str>,
    prev_hash: Vec<Vec<u8>>,
    hash: Vec<Vec<u8>>,
}

#[derive(Debug, Default)]
struct StreamRows {
    stream_id: Vec<Uuid>,
    stream_type: Vec<&'static str>,
    owner_id: Vec<Uuid>,
    version: Vec<i64>,
    last_position: Vec<i64>,
}

#[derive(Debug, Default)]
struct KeyRows {
    key: Vec<String>,
    request_hash: Vec<Vec<u8>>,
    outcome: Vec<String>,
}

/// What one group will write, and each batch's answer if it commits.
struct Plan<'a> {
    rows: EventRows<'a>,
    stream_rows: StreamRows,
    key_rows: KeyRows,
    head: Head,
    event_count: usize,
    results: Vec<Result<AppendOutcome, AppendError>>,
}

/// Decides every batch of a group in order against the committed stream versions (and the
/// versions earlier batches of the same group produce), assigns positions and versions, and
/// chains the hashes. Pure: no I/O, so the rules are unit-tested directly.
fn plan_group<'a>(
    head: Head,
    recorded_at: DateTime<Utc>,
    mut streams: HashMap<Uuid, KnownStream>,
    mut known_keys: HashMap<String, (Vec<u8>, AppendOutcome)>,
    batches: &[&'a CheckedBatch],
) -> Plan<'a> {
    let capacity: usize = batches.iter().map(|b| b.events).sum();
    let mut rows = EventRows {
        position: Vec::with_capacity(capacity),
        event_id: Vec::with_capacity(capacity),
        stream_id: Vec::with_capacity(capacity),
        stream_type: Vec::with_capacity(capacity),
        stream_version: Vec::with_capacity(capacity),
        event_type: Vec::with_capacity(capacity),
        schema_version: Vec::with_capacity(capacity),
        owner_id: Vec::with_capacity(capacity),
        occurred_at: Vec::with_capacity(capacity),
        payload: Vec::with_capacity(capacity),
        metadata: Vec::with_capacity(capacity),
        prev_hash: Vec::with_capacity(capacity),
        hash: Vec::with_capacity(capacity),
    };
    let mut key_rows = KeyRows::default();
    let mut results = Vec::with_capacity(batches.len());
    // Stream id -> index in `touched`, so stream rows keep first-touch order and each stream
    // gets one row (ON CONFLICT cannot update a row twice in one statement).
    let mut touched_index: HashMap<Uuid, usize> = HashMap::new();
    let mut touched: Vec<(Uuid, KnownStream, i64)> = Vec::new();
    let mut position = head.position;
    let mut prev = head.hash;
    let mut canonical = Vec::with_capacity(1024);

    for batch in batches {
        if let Some(key) = &batch.idempotency
            && let Some((request_hash, outcome)) = known_keys.get(&key.key)
        {
            results.push(if *request_hash == key.request_hash {
                metrics::counter!(m::APPEND_IDEMPOTENT_REPLAYS_TOTAL).increment(1);
                Ok(AppendOutcome {
                    replayed: true,
                    ..outcome.clone()
                })
            } else {
                Err(AppendError::IdempotencyKeyReused { key: key.key.clone() })
            });
            continue;
        }
        if let Err(error) = check_streams(batch, &streams) {
            metrics::counter!(m::APPEND_CONFLICTS_TOTAL).increment(1);
            results.push(Err(error));
            continue;
        }

        let first_position = position + 1;
        let mut revisions = Vec::with_capacity(batch.streams.len());
        for stream in &batch.streams {
            let known = streams.entry(stream.stream_id).or_insert(KnownStream {
                stream_type: stream.stream_type,
                owner_id: stream.owner_id,
                version: 0,
            });
            let stream_type = stream.stream_type.as_str();
            for event in &stream.events {
                position += 1;
                known.version += 1;
                canonical.clear();
                CanonicalEvent {
                    position,
                    event_id: event.event_id,
                    stream_id: stream.stream_id,
                    stream_type,
                    stream_version: known.version,
                    event_type: &event.event_type,
                    schema_version: event.schema_version,
                    owner_id: stream.owner_id,
                    occurred_at: event.occurred_at,
                    recorded_at,
                    payload: &event.payload_json,
                    metadata: &event.metadata_json,
                }
                .write_to(&mut canonical);
                let hash = chain_hash(&prev, &canonical);
                rows.position.push(position);
                rows.event_id.push(event.event_id);
                rows.stream_id.push(stream.stream_id);
                rows.stream_type.push(stream_type);
                rows.stream_version.push(known.version);
                rows.event_type.push(&event.event_type);
                // Checked against the registry: a current version, far below i16::MAX.
                rows.schema_version
                    .push(i16::try_from(event.schema_version).unwrap_or(i16::MAX));
                rows.owner_id.push(stream.owner_id);
                rows.occurred_at.push(event.occurred_at);
                rows.payload.push(&event.payload_json);
                rows.metadata.push(&event.metadata_json);
                rows.prev_hash.push(prev.0.to_vec());
                rows.hash.push(hash.0.to_vec());
                prev = hash;
            }
            revisions.push(StreamRevision {
                stream_id: stream.stream_id,
                version: known.version,
            });
            let entry = (stream.stream_id, *known, position);
            match touched_index.get(&stream.stream_id) {
                Some(&i) => touched[i] = entry,
                None => {
                    touched_index.insert(stream.stream_id, touched.len());
                    touched.push(entry);
                }
            }
        }
        let outcome = AppendOutcome {
            first_position,
            last_position: position,
            recorded_at,
            streams: revisions,
            replayed: false,
        };
        if let Some(key) = &batch.idempotency {
            key_rows.key.push(key.key.clone());
            key_rows.request_hash.push(key.request_hash.clone());
            // An outcome is plain data; serialising it cannot fail.
            key_rows
                .outcome
                .push(serde_json::to_string(&outcome).unwrap_or_default());
            known_keys.insert(key.key.clone(), (key.request_hash.clone(), outcome.clone()));
        }
        results.push(Ok(outcome));
    }

    let mut stream_rows = StreamRows::default();
    for (stream_id, known, last_position) in touched {
        stream_rows.stream_id.push(stream_id);
        stream_rows.stream_type.push(known.stream_type.as_str());
        stream_rows.owner_id.push(known.owner_id);
        stream_rows.version.push(known.version);
        stream_rows.last_position.push(last_position);
    }
    Plan {
        event_count: rows.position.len(),
        rows,
        stream_rows,
        key_rows,
        head: Head {
            position,
            hash: prev,
            recorded_at,
        },
        results,
    }
}

/// Checks one batch's streams against the versions known so far (committed, or planned by
/// earlier batches of the group).
fn check_streams(batch: &CheckedBatch, streams: &HashMap<Uuid, KnownStream>) -> Result<(), AppendError> {
    for stream in &batch.streams {
        let known = streams.get(&stream.stream_id);
        if let Some(known) = known {
            if known.stream_type != stream.stream_type {
                return Err(AppendError::StreamTypeMismatch {
                    stream_id: stream.stream_id,
                    existing: known.stream_type,
                    requested: stream.stream_type,
                });
            }
            if known.owner_id != stream.owner_id {
                return Err(AppendError::OwnerMismatch {
                    stream_id: stream.stream_id,
                    existing: known.owner_id,
                    requested: stream.owner_id,
                });
            }
        }
        let actual = known.map(|k| k.version).filter(|v| *v > 0);
        let matches = match (stream.expected, actual) {
            (ExpectedVersion::Any, _) | (ExpectedVersion::NoStream, None) => true,
            (ExpectedVersion::Exact(expected), Some(actual)) => expected == actual,
            _ => false,
        };
        if !matches {
            return Err(AppendError::WrongExpectedVersion {
                stream_id: stream.stream_id,
                expected: stream.expected,
                actual,
            });
        }
    }
    Ok(())
}

/// The group's streams as committed (read under the head lock). Rows in the shape of
/// [`READ_STREAMS_AND_KEYS`], whose `key` is NULL on a stream's row.
const READ_STREAMS: &str = "\
SELECT stream_id, stream_type, owner_id, version, NULL::text AS key, NULL::bytea AS request_hash, NULL::jsonb AS outcome
FROM streams WHERE stream_id = ANY($1)";

/// The group's streams and the stored outcomes of its idempotency keys, in one statement.
const READ_STREAMS_AND_KEYS: &str = "\
SELECT stream_id, stream_type, owner_id, version, NULL::text AS key, NULL::bytea AS request_hash, NULL::jsonb AS outcome
FROM streams WHERE stream_id = ANY($1)
UNION ALL
SELECT NULL, NULL, NULL, NULL, key, request_hash, outcome
FROM append_idempotency WHERE key = ANY($2)";

const WRITE_GROUP: &str = "\
WITH new_events AS (
    INSERT INTO user_events (position, event_id, stream_id, stream_type, stream_version, event_type,
                             schema_version, owner_id, occurred_at, recorded_at, payload, metadata,
                             prev_hash, hash)
    SELECT e.position, e.event_id, e.stream_id, e.stream_type, e.stream_version, e.event_type,
           e.schema_version, e.owner_id, e.occurred_at, $14, e.payload::jsonb, e.metadata::jsonb,
           e.prev_hash, e.hash
    FROM UNNEST($1::bigint[], $2::uuid[], $3::uuid[], $4::text[], $5::bigint[], $6::text[],
                $7::smallint[], $8::uuid[], $9::timestamptz[], $10::text[], $11::text[],
                $12::bytea[], $13::bytea[])
         AS e(position, event_id, stream_id, stream_type, stream_version, event_type,
              schema_version, owner_id, occurred_at, payload, metadata, prev_hash, hash)
),
stream_versions AS (
    INSERT INTO streams (stream_id, stream_type, owner_id, version, created_at, updated_at, last_position)
    SELECT s.stream_id, s.stream_type, s.owner_id, s.version, $14, $14, s.last_position
    FROM UNNEST($15::uuid[], $16::text[], $17::uuid[], $18::bigint[], $19::bigint[])
         AS s(stream_id, stream_type, owner_id, version, last_position)
    ON CONFLICT (stream_id) DO UPDATE
        SET version = EXCLUDED.version, updated_at = EXCLUDED.updated_at,
            last_position = EXCLUDED.last_position
),
idempotency AS (
    INSERT INTO append_idempotency (key, request_hash, outcome, recorded_at)
    SELECT k.key, k.request_hash, k.outcome::jsonb, $14
    FROM UNNEST($20::text[], $21::bytea[], $22::text[]) AS k(key, request_hash, outcome)
),
head AS (
    UPDATE log_head SET position = $23, hash = $24, recorded_at = $14 RETURNING position
)
SELECT pg_notify('cloudphone_events', position::text) FROM head";

const COPY_EVENTS: &str = "COPY user_events (position, event_id, stream_id, stream_type, stream_version, \
    event_type, schema_version, owner_id, occurred_at, recorded_at, payload, metadata, prev_hash, hash) \
    FROM STDIN";

/// A timestamp in a form PostgreSQL's text input reads back exactly (microseconds, UTC).
fn copy_timestamp(at: DateTime<Utc>) -> String {
    at.format("%Y-%m-%d %H:%M:%S%.6f+00").to_string()
}

/// One row of COPY's text format: tab-separated, `\N`-free (no column is NULL), with
/// backslash, tab, newline and carriage return escaped.
fn encode_copy_row(out: &mut Vec<u8>, r: &EventRows<'_>, i: usize, recorded_at: &str) {
    use std::io::Write as _;
    let _ = write!(
        out,
        "{}\t{}\t{}\t{}\t{}\t",
        r.position[i], r.event_id[i], r.stream_id[i], r.stream_type[i], r.stream_version[i]
    );
    copy_escape(out, r.event_type[i]);
    let _ = write!(
        out,
        "\t{}\t{}\t{}\t{}\t",
        r.schema_version[i],
        r.owner_id[i],
        copy_timestamp(r.occurred_at[i]),
        recorded_at
    );
    copy_escape(out, r.payload[i]);
    out.push(b'\t');
    copy_escape(out, r.metadata[i]);
    out.extend_from_slice(b"\t\\\\x");
    out.extend_from_slice(
        ChainHash::from_slice(&r.prev_hash[i])
            .unwrap_or_default()
            .to_hex()
            .as_bytes(),
    );
    out.extend_from_slice(b"\t\\\\x");
    out.extend_from_slice(
        ChainHash::from_slice(&r.hash[i])
            .unwrap_or_default()
            .to_hex()
            .as_bytes(),
    );
    out.push(b'\n');
}

fn copy_escape(out: &mut Vec<u8>, text: &str) {
    for byte in text.bytes() {
        match byte {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\t' => out.extend_from_slice(b"\\t"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            other => out.push(other),
        }
    }
}
