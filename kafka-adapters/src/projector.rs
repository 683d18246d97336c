//! The scale-out projector: consumes the topic the relay publishes to, in a consumer group,
//! and applies each batch with its per-partition offsets in one PostgreSQL transaction.
//!
//! Offsets that count live in PostgreSQL (`projection_offsets`), not in the broker: after an
//! assignment, the first message of each partition is checked against the stored next
//! offset and the consumer seeks there if the broker started elsewhere; a message below it is
//! a redelivery and is skipped. Offsets are also committed to the broker (every few seconds,
//! after the database commits), only so Kafka tooling can show consumer lag. Within a partition global positions
//! only grow, so an event at or below the last position applied from its partition (a
//! re-publication after a relay takeover) is skipped too.
//!
//! The projection's checkpoint (what read-your-writes waits for) is the minimum over all
//! partitions of what each has surely applied. The relay records, with its checkpoint R, the
//! last offset it published to each partition; a partition whose stored next offset is past
//! that offset has applied every event up to R that went to it, and any other partition has
//! applied everything up to its last applied position (positions grow within a partition).
//! So no event at or below the minimum is unapplied, and no broker is asked.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use event_schema::EventEnvelope;
use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::statistics::Statistics;
use rdkafka::{Offset, TopicPartitionList};
use sqlx::{PgConnection, PgPool};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use projections::apply::{apply_events, lock_for_batch, park_unreadable, plan_tailing_batch};
use projections::runner::ProjectorError;
use read_models::Projection;
use read_models::changes::ChangeNotice;
use read_models::versions::TableLayout;

use crate::metrics_names as k;
use projections::metrics_names as m;

#[derive(Debug, Clone)]
pub struct KafkaProjectorConfig {
    pub brokers: String,
    pub topic: String,
    /// Consumer group; every projector process of one projection shares it.
    pub group_id: String,
    /// Most messages applied in one transaction.
    pub batch_size: usize,
    /// How long to keep filling a batch once its first message arrived.
    pub batch_wait: Duration,
    /// Static group membership (`group.instance.id`): a consumer restarted with the same id
    /// gets its partitions back without the whole group rebalancing.
    pub instance_id: Option<String>,
    /// Longest a fetch waits at the broker when there is nothing new (`fetch.wait.max.ms`).
    /// Apache Kafka answers as soon as a message arrives, so this only bounds idle polling;
    /// a broker that answers only when it expires (tansu 0.6, the earlier development broker,
    /// measured: see BENCHMARKS.md) adds up to this much to every event's latency. Short by
    /// default for that reason.
    pub fetch_wait: Duration,
    /// How long the group waits for a worker that stopped heartbeating (crashed, cut off, or
    /// a static member stopped) before its partitions go to the others
    /// (`session.timeout.ms`): their events wait that long. Shorter hands over sooner but
    /// evicts a worker stalled by a long pause; Kafka's brokers accept 6 s to 5 min by default.
    pub session_timeout: Duration,
    /// How a rebalance moves partitions between workers.
    pub assignment: AssignmentStrategy,
}

/// How the group's partitions move when a worker joins or leaves
/// (`partition.assignment.strategy`). Eager and cooperative members cannot share a group, so
/// a running group is switched by stopping all of its workers (ops/deploy/README.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AssignmentStrategy {
    /// librdkafka's default (`range,roundrobin`): every worker of the group stops for each
    /// change, for one short round (a worker's revocation costs nothing here: offsets live
    /// in PostgreSQL). Measured the cheaper of the two (`load kafka --faults`, BENCHMARKS.md).
    #[default]
    Eager,
    /// Incremental (KIP-429, `cooperative-sticky`): only the partitions that change owner
    /// stop, but for two rounds; it pays off in large groups whose rebalances are slow.
    Cooperative,
}

impl AssignmentStrategy {
    fn librdkafka(self) -> &'static str {
        match self {
            AssignmentStrategy::Cooperative => "cooperative-sticky",
            AssignmentStrategy::Eager => "range,roundrobin",
        }
    }
}

impl KafkaProjectorConfig {
    pub fn new(brokers: impl Into<String>, projection: Projection) -> Self {
        KafkaProjectorConfig {
            brokers: brokers.into(),
            topic: crate::relay::DEFAULT_TOPIC.to_owned(),
            group_id: format!("cloudphone-projector-{}", projection.name()),
            batch_size: 2_000,
            batch_wait: Duration::from_millis(5),
            instance_id: None,
            fetch_wait: Duration::from_millis(10),
            session_timeout: Duration::from_secs(30),
            assignment: AssignmentStrategy::default(),
        }
    }

    /// The librdkafka consumer settings of a worker (each one's reason beside it).
    pub fn consumer_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        if let Some(instance_id) = &self.instance_id {
            config.set("group.instance.id", instance_id);
        }
        config
            .set("bootstrap.servers", &self.brokers)
            .set("group.id", &self.group_id)
            // Offsets that count are stored in PostgreSQL with the batch (module documentation).
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            // A rebalance reaches the other workers with their next heartbeat: a worker that
            // leaves stops its partitions until then (measured: a SIGTERM's p99 850 -> 340 ms
            // against 1 s, `load kafka --faults`, BENCHMARKS.md). Four small requests a second
            // per consumer cost the broker nothing measurable.
            .set("heartbeat.interval.ms", "250")
            .set("fetch.wait.max.ms", self.fetch_wait.as_millis().to_string())
            // Modest fetches: a broker answers small ones quickly, and heartbeats are not
            // stuck behind a huge read (the consumer still pipelines fetches).
            .set("max.partition.fetch.bytes", "262144")
            .set("fetch.max.bytes", "1048576")
            .set("session.timeout.ms", self.session_timeout.as_millis().to_string())
            .set("partition.assignment.strategy", self.assignment.librdkafka())
            // A topic created after the subscription (the relay creates it) is noticed within
            // seconds, not librdkafka's default five minutes.
            .set("topic.metadata.refresh.interval.ms", "5000")
            .set("broker.address.family", "v4")
            // Consumer lag per partition, for cloudphone_kafka_consumer_lag_messages.
            .set("statistics.interval.ms", STATISTICS_INTERVAL.as_millis().to_string());
        config
    }
}

/// Tells the consumer loop about assignments, from librdkafka's rebalance callback.
#[derive(Debug)]
enum Assignment {
    Assigned(Vec<i32>),
    Revoked(Vec<i32>),
}

#[derive(Debug)]
struct ProjectorContext {
    projection: Projection,
    topic: String,
    notices: mpsc::UnboundedSender<Assignment>,
    /// Partitions whose lag gauge this consumer has set, to zero once it loses them.
    lag_reported: std::sync::Mutex<std::collections::BTreeSet<i32>>,
}

impl ClientContext for ProjectorContext {
    /// librdkafka's statistics, every `statistics.interval.ms`: the lag of each partition
    /// this consumer is assigned (high watermark minus the offset committed to the broker,
    /// which follows PostgreSQL's offsets by at most [`BROKER_COMMIT_INTERVAL`]).
    fn stats(&self, statistics: Statistics) {
        let lags: HashMap<i32, i64> = statistics
            .topics
            .get(&self.topic)
            .map(|topic| {
                topic
                    .partitions
                    .values()
                    // -1 is librdkafka's internal "unassigned" partition; a lag of -1 is unknown
                    // (not assigned here, or nothing committed or fetched yet).
                    .filter(|p| p.partition >= 0)
                    .inspect(|p| {
                        tracing::trace!(
                            partition = p.partition,
                            consumer_lag = p.consumer_lag,
                            hi_offset = p.hi_offset,
                            ls_offset = p.ls_offset,
                            app_offset = p.app_offset,
                            committed_offset = p.committed_offset,
                            "consumer statistics"
                        );
                    })
                    .filter_map(|p| {
                        // Brokers that leave the committed offset unknown to librdkafka's
                        // statistics (-1) still report the high watermark: lag behind what this
                        // worker has applied.
                        let lag = if p.consumer_lag >= 0 {
                            p.consumer_lag
                        } else if p.hi_offset >= 0 && p.app_offset >= 0 {
                            (p.hi_offset - p.app_offset).max(0)
                        } else if p.hi_offset >= 0 && p.committed_offset < 0 {
                            // Nothing read or committed here yet: all of it is still to come.
                            (p.hi_offset - p.lo_offset.max(0)).max(0)
                        } else {
                            return None;
                        };
                        Some((p.partition, lag))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let mut reported = self
            .lag_reported
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let projection = self.projection.name();
        for (partition, lag) in &lags {
            metrics::gauge!(k::KAFKA_CONSUMER_LAG_MESSAGES, "projection" => projection, "partition" => partition.to_string())
                .set(*lag as f64);
            reported.insert(*partition);
        }
        // A partition that moved to another worker is that worker's to report: a stale lag
        // here would keep an alert firing.
        reported.retain(|partition| {
            let kept = lags.contains_key(partition);
            if !kept {
                metrics::gauge!(k::KAFKA_CONSUMER_LAG_MESSAGES, "projection" => projection, "partition" => partition.to_string())
                    .set(0.0);
            }
            kept
        });
    }
}

impl ConsumerContext for ProjectorContext {
    /// Under cooperative rebalancing an assignment or a revocation names only the partitions
    /// that move, so the loop is told just those, and the gauge counts what is held after it.
    fn post_rebalance(&self, consumer: &rdkafka::consumer::BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let partitions = |tpl: &TopicPartitionList| {
            tpl.elements_for_topic(&self.topic)
                .iter()
                .map(|e| e.partition())
                .collect::<Vec<_>>()
        };
        let notice = match rebalance {
            Rebalance::Assign(tpl) => Assignment::Assigned(partitions(tpl)),
            Rebalance::Revoke(tpl) => Assignment::Revoked(partitions(tpl)),
            Rebalance::Error(error) => {
                tracing::warn!(%error, "rebalance error");
                return;
            }
        };
        let held = consumer
            .assignment()
            .map(|assignment| assignment.elements_for_topic(&self.topic).len())
            .unwrap_or(0);
        metrics::gauge!(k::KAFKA_ASSIGNED_PARTITIONS, "projection" => self.projection.name()).set(held as f64);
        let _ = self.notices.send(notice);
    }
}

/// What this process knows of a partition it consumes.
#[derive(Debug, Clone, Copy)]
struct PartitionState {
    next_offset: i64,
    last_position: i64,
    /// Whether the consumer was checked (or sought) to `next_offset` since the assignment.
    positioned: bool,
}

/// Broker errors seen by `recv` are transient (librdkafka reconnects by itself): report them,
/// wait a little, go on with the same consumer.
async fn received<'c>(
    projection: Projection,
    message: Result<BorrowedMessage<'c>, rdkafka::error::KafkaError>,
) -> Option<BorrowedMessage<'c>> {
    match message {
        Ok(message) => Some(message),
        Err(error) => {
            metrics::counter!(k::PROJECTION_CONSUMER_ERRORS_TOTAL, "projection" => projection.name()).increment(1);
            tracing::debug!(projection = projection.name(), %error, "consumer error; librdkafka retries");
            tokio::time::sleep(Duration::from_millis(100)).await;
            None
        }
    }
}

/// Runs one projection from Kafka until `stop` is cancelled, reconnecting after errors.
pub async fn run_kafka_projector(
    pool: PgPool,
    projection: Projection,
    config: KafkaProjectorConfig,
    stop: CancellationToken,
) {
    let mut backoff = Duration::from_millis(200);
    while !stop.is_cancelled() {
        match consume(&pool, projection, &config, &stop).await {
            Ok(()) => break,
            Err(error) => {
                tracing::warn!(projection = projection.name(), %error, ?backoff, "kafka projector restarting from its stored offsets");
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
    tracing::info!(projection = projection.name(), "kafka projector stopped");
}

async fn consume(
    pool: &PgPool,
    projection: Projection,
    config: &KafkaProjectorConfig,
    stop: &CancellationToken,
) -> Result<(), ProjectorError> {
    let (consumer, mut assignments) = connect(projection, config)?;
    let mut backoff = Duration::from_millis(200);
    let result = loop {
        let started = Instant::now();
        let consumed = consume_with(pool, projection, config, stop, &consumer, &mut assignments).await;
        if started.elapsed() > Duration::from_secs(30) {
            backoff = Duration::from_millis(200);
        }
        match consumed {
            // A database outage is no reason to leave the group: a new consumer rejoins it,
            // which rebalances the group (dynamic members) on every worker's every outage.
            // The same consumer goes on: each partition's offset is read again from
            // PostgreSQL at its next message, and the consumer seeks back there if it had
            // read ahead.
            // A replay swapped a new version in: go on at once with it, from the offsets the
            // swap handed over.
            Err(error @ ProjectorError::Swapped { .. }) => {
                tracing::info!(projection = projection.name(), %error, "kafka projector resuming at the new version");
            }
            Err(error @ (ProjectorError::Database(_) | ProjectorError::Read(_))) if !stop.is_cancelled() => {
                tracing::warn!(projection = projection.name(), %error, ?backoff, "kafka projector resuming from its stored offsets");
                tokio::select! {
                    () = stop.cancelled() => break Ok(()),
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            other => break other,
        }
    };
    // Closing a consumer leaves the group and may block on the broker: not on async workers.
    let _ = tokio::task::spawn_blocking(move || drop(consumer)).await;
    result
}

type ProjectorConsumer = Arc<StreamConsumer<ProjectorContext>>;

fn connect(
    projection: Projection,
    config: &KafkaProjectorConfig,
) -> Result<(ProjectorConsumer, mpsc::UnboundedReceiver<Assignment>), ProjectorError> {
    let (notices, assignments) = mpsc::unbounded_channel();
    let context = ProjectorContext {
        projection,
        topic: config.topic.clone(),
        notices,
        lag_reported: std::sync::Mutex::default(),
    };
    let consumer: Arc<StreamConsumer<ProjectorContext>> =
        Arc::new(config.consumer_config().create_with_context(context).map_err(kafka)?);
    consumer.subscribe(&[&config.topic]).map_err(kafka)?;
    Ok((consumer, assignments))
}

async fn consume_with(
    pool: &PgPool,
    projection: Projection,
    config: &KafkaProjectorConfig,
    stop: &CancellationToken,
    consumer: &ProjectorConsumer,
    assignments: &mut mpsc::UnboundedReceiver<Assignment>,
) -> Result<(), ProjectorError> {
    let consumer = Arc::clone(consumer);
    let mut conn = pool.acquire().await?;
    projections::checkpoint::load(&mut conn, projection).await?;
    // The tables this worker folds into, as of the last swap (each batch checks both).
    let (version, swaps): (i32, i64) =
        sqlx::query_as("SELECT version, swaps FROM projection_checkpoints WHERE projection = $1")
            .bind(projection.name())
            .fetch_one(&mut *conn)
            .await?;
    drop(conn);
    let layout = projection.layout(version).ok_or(ProjectorError::UnknownVersion {
        projection: projection.name(),
        version,
    })?;
    let mut partitions: HashMap<i32, PartitionState> = HashMap::new();
    let mut last_watermark = Instant::now();
    // The checkpoint last published to change listeners.
    let mut published_checkpoint = i64::MIN;
    // The last position this worker committed, when, and the checkpoint last computed: while
    // the checkpoint does not cover that position, it is recomputed soon, not at the idle pace.
    let (mut applied_up_to, mut last_commit, mut checkpoint_seen) = (i64::MIN, Instant::now(), i64::MIN);
    let mut last_broker_commit = Instant::now();
    tracing::info!(projection = projection.name(), topic = %config.topic, group = %config.group_id, "kafka projector consuming");
    loop {
        while let Ok(notice) = assignments.try_recv() {
            match notice {
                Assignment::Assigned(list) => {
                    tracing::info!(projection = projection.name(), partitions = ?list, "partitions assigned");
                    for partition in list {
                        // Loaded when its first message arrives, so a quick re-assignment
                        // never acts on stale state.
                        partitions.remove(&partition);
                    }
                }
                Assignment::Revoked(list) => {
                    tracing::info!(projection = projection.name(), partitions = ?list, "partitions revoked");
                    for partition in list {
                        partitions.remove(&partition);
                    }
                }
            }
        }

        let recheck = recheck_interval(applied_up_to, checkpoint_seen, last_commit.elapsed());
        // The first message waits; the rest of the batch is whatever arrives shortly after.
        let first = tokio::select! {
            () = stop.cancelled() => return Ok(()),
            message = consumer.recv() => received(projection, message).await,
            () = tokio::time::sleep(recheck) => None,
        };
        let mut batch = Batch::default();
        if let Some(message) = first {
            admit(
                pool,
                projection,
                config,
                &consumer,
                &mut partitions,
                &mut batch,
                &message,
            )
            .await?;
            let deadline = tokio::time::Instant::now() + config.batch_wait;
            while batch.messages < config.batch_size {
                match tokio::time::timeout_at(deadline, consumer.recv()).await {
                    Ok(message) => match received(projection, message).await {
                        Some(message) => {
                            admit(
                                pool,
                                projection,
                                config,
                                &consumer,
                                &mut partitions,
                                &mut batch,
                                &message,
                            )
                            .await?
                        }
                        None => break,
                    },
                    Err(_) => break,
                }
            }
        }
        let committed = !batch.touched.is_empty();
        if committed {
            if let Some(last) = batch.events.iter().map(|e| e.position).max() {
                applied_up_to = applied_up_to.max(last);
                last_commit = Instant::now();
            }
            commit_batch(pool, layout, swaps, config, &mut partitions, batch).await?;
        }
        // Other partitions' progress (and the relay's) moves the checkpoint too, so it is
        // also recomputed while idle: soon while what this worker applied is not covered yet
        // (the relay records a round's offsets only after the broker acknowledged it, which
        // may be after this worker applied it, and other workers' partitions count too).
        if committed || last_watermark.elapsed() >= recheck {
            last_watermark = Instant::now();
            let advanced = advance_checkpoint(pool, projection, &config.topic).await?;
            if let Some(position) = advanced {
                checkpoint_seen = checkpoint_seen.max(position);
            }
            if let Some(position) = advanced
                && position > published_checkpoint
            {
                // Live projection status: the checkpoint moves here, apart from the batches.
                published_checkpoint = position;
                let notice = ChangeNotice::of_batch(projection, position, &Default::default());
                read_models::changes::publish(&mut *pool.acquire().await?, &notice).await?;
            }
        }
        if last_broker_commit.elapsed() >= BROKER_COMMIT_INTERVAL {
            last_broker_commit = Instant::now();
            commit_to_broker(&consumer, &config.topic, &partitions);
        }
    }
}

/// How often the checkpoint is recomputed while nothing arrives.
const IDLE_RECHECK: Duration = Duration::from_millis(250);

/// How often it is recomputed while it does not cover what this worker applied, for at most
/// [`UNCOVERED_RECHECK_FOR`] after the worker's last batch (a partition stalled elsewhere,
/// say on a dead member, must not keep every worker querying at this pace).
const UNCOVERED_RECHECK: Duration = Duration::from_millis(10);
const UNCOVERED_RECHECK_FOR: Duration = Duration::from_secs(2);

/// How soon to recompute the checkpoint: soon while it does not cover the last position this
/// worker applied (for a while after that batch), else at the idle pace.
fn recheck_interval(applied_up_to: i64, checkpoint: i64, since_last_commit: Duration) -> Duration {
    if applied_up_to > checkpoint && since_last_commit < UNCOVERED_RECHECK_FOR {
        UNCOVERED_RECHECK
    } else {
        IDLE_RECHECK
    }
}

/// How often librdkafka reports statistics (the consumer lag gauge's resolution).
const STATISTICS_INTERVAL: Duration = Duration::from_secs(5);

/// How often offsets are also committed to the broker. They only feed Kafka tooling's view
/// of consumer lag (PostgreSQL holds the offsets that count), so they need not be fresh, and
/// every commit is a write on the broker.
const BROKER_COMMIT_INTERVAL: Duration = Duration::from_secs(5);

fn commit_to_broker(
    consumer: &StreamConsumer<ProjectorContext>,
    topic: &str,
    partitions: &HashMap<i32, PartitionState>,
) {
    let mut tpl = TopicPartitionList::new();
    for (partition, state) in partitions {
        if state.next_offset > 0 {
            let _ = tpl.add_partition_offset(topic, *partition, Offset::Offset(state.next_offset));
        }
    }
    if tpl.count() > 0 {
        let _ = consumer.commit(&tpl, CommitMode::Async);
    }
}

fn kafka(error: rdkafka::error::KafkaError) -> ProjectorError {
    ProjectorError::Kafka(error.to_string())
}

/// Messages admitted to one transaction.
#[derive(Debug, Default)]
struct Batch {
    messages: usize,
    events: Vec<EventEnvelope>,
    /// Partition -> (next offset, last position) once this batch commits.
    touched: HashMap<i32, (i64, i64)>,
    /// Messages that are not envelopes: (position from the header, error, raw payload).
    unreadable: Vec<(i64, String, Vec<u8>)>,
}

async fn partition_state(
    pool: &PgPool,
    projection: Projection,
    topic: &str,
    partition: i32,
) -> Result<PartitionState, sqlx::Error> {
    // A partition never consumed before skips what the projection's checkpoint already
    // covers: a projection that ran in embedded mode switches to Kafka without re-applying.
    let row: Option<(i64, i64)> = sqlx::query_as(
        "SELECT coalesce(o.next_offset, 0), coalesce(o.last_position, c.position)
         FROM projection_checkpoints c
         LEFT JOIN projection_offsets o
                ON o.projection = c.projection AND o.topic = $2 AND o.partition = $3
         WHERE c.projection = $1",
    )
    .bind(projection.name())
    .bind(topic)
    .bind(partition)
    .fetch_optional(pool)
    .await?;
    let (next_offset, last_position) = row.unwrap_or((0, 0));
    Ok(PartitionState {
        next_offset,
        last_position,
        positioned: false,
    })
}

/// Decides what to do with one message: apply it in this batch, skip it (redelivered or a
/// duplicate publication), or re-position the partition at the stored offset.
async fn admit(
    pool: &PgPool,
    projection: Projection,
    config: &KafkaProjectorConfig,
    consumer: &Arc<StreamConsumer<ProjectorContext>>,
    partitions: &mut HashMap<i32, PartitionState>,
    batch: &mut Batch,
    message: &BorrowedMessage<'_>,
) -> Result<(), ProjectorError> {
    batch.messages += 1;
    let partition = message.partition();
    let offset = message.offset();
    let state = match partitions.get(&partition) {
        Some(state) => *state,
        None => {
            let state = partition_state(pool, projection, &config.topic, partition).await?;
            partitions.insert(partition, state);
            state
        }
    };
    let (mut next_offset, mut last_position) = batch
        .touched
        .get(&partition)
        .copied()
        .unwrap_or((state.next_offset, state.last_position));
    if !state.positioned || offset > next_offset {
        if offset != next_offset {
            // The broker started this partition elsewhere than PostgreSQL says: go there.
            tracing::info!(
                projection = projection.name(),
                partition,
                from = offset,
                to = next_offset,
                "seeking to the stored offset"
            );
            let (seeker, topic) = (Arc::clone(consumer), config.topic.clone());
            tokio::task::spawn_blocking(move || {
                seeker.seek(&topic, partition, Offset::Offset(next_offset), Duration::from_secs(5))
            })
            .await
            .map_err(|e| ProjectorError::Kafka(e.to_string()))?
            .map_err(kafka)?;
            if let Some(state) = partitions.get_mut(&partition) {
                state.positioned = true;
            }
            return Ok(());
        }
        if let Some(state) = partitions.get_mut(&partition) {
            state.positioned = true;
        }
    }
    if offset < next_offset {
        return Ok(()); // redelivered: already applied
    }
    next_offset = offset + 1;
    let header_position = message
        .headers()
        .and_then(|h| h.iter().find(|h| h.key == crate::relay::headers::POSITION))
        .and_then(|h| h.value)
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| v.parse::<i64>().ok())
        .unwrap_or(-1);
    match serde_json::from_slice::<EventEnvelope>(message.payload().unwrap_or_default()) {
        Ok(envelope) if envelope.position <= last_position => {
            metrics::counter!(m::PROJECTION_SKIPPED_TOTAL, "event_type" => "duplicate").increment(1);
        }
        Ok(envelope) => {
            last_position = envelope.position;
            batch.events.push(envelope);
        }
        Err(error) => {
            batch.unreadable.push((
                header_position,
                error.to_string(),
                message.payload().unwrap_or_default().to_vec(),
            ));
        }
    }
    batch.touched.insert(partition, (next_offset, last_position));
    Ok(())
}

/// Applies a batch to the tables of `layout`, live since the projection's `swaps`-th swap.
async fn commit_batch(
    pool: &PgPool,
    layout: TableLayout,
    swaps: i64,
    config: &KafkaProjectorConfig,
    partitions: &mut HashMap<i32, PartitionState>,
    batch: Batch,
) -> Result<(), ProjectorError> {
    let projection = layout.projection;
    let started = Instant::now();
    // A durable commit (unlike the embedded projector's): the offsets are upserted without
    // checking what PostgreSQL holds, so a commit lost in a server crash would go unnoticed
    // by this process's in-memory offsets.
    let mut tx = pool.begin().await?;
    plan_tailing_batch(&mut tx, batch.events.len()).await?;
    lock_for_batch(&mut tx, projection).await?;
    let applied = apply_events(&mut tx, layout, &batch.events).await?;
    for (position, error, raw) in &batch.unreadable {
        park_unreadable(&mut tx, projection, *position, error, raw).await?;
    }
    let last = batch.events.iter().max_by_key(|e| e.position);
    // The checkpoint row before the offsets, the order a replay's swap takes them in. Its
    // swap count fences a replay: a batch folded before a swap (into tables it may even have
    // reached through their names after the swap) is rolled back, whatever the versions.
    let live: (i32, i64) = sqlx::query_as(
        "UPDATE projection_checkpoints SET last_recorded_at = greatest(last_recorded_at, $2), updated_at = now()
         WHERE projection = $1 RETURNING version, swaps",
    )
    .bind(projection.name())
    .bind(last.map(|e| e.recorded_at))
    .fetch_one(&mut *tx)
    .await?;
    if live != (layout.version, swaps) {
        return Err(ProjectorError::Swapped {
            projection: projection.name(),
            from: layout.version,
            to: live.0,
        });
    }
    let expected: HashMap<i32, i64> = partitions
        .iter()
        .map(|(partition, state)| (*partition, state.next_offset))
        .collect();
    if !store_offsets(&mut tx, projection, &config.topic, &batch.touched, &expected).await? {
        // Rolled back on drop; the worker rejoins and starts from what PostgreSQL holds.
        return Err(ProjectorError::OffsetsMoved {
            projection: projection.name(),
        });
    }
    if let Some(last) = last
        && !applied.touched.is_empty()
    {
        let notice = ChangeNotice::of_batch(projection, last.position, &applied.touched);
        read_models::changes::publish(&mut tx, &notice).await?;
    }
    tx.commit().await?;
    for (partition, (next_offset, last_position)) in &batch.touched {
        if let Some(state) = partitions.get_mut(partition) {
            state.next_offset = *next_offset;
            state.last_position = *last_position;
        }
    }
    let name = projection.name();
    metrics::counter!(m::PROJECTION_EVENTS_TOTAL, "projection" => name).increment(batch.events.len() as u64);
    metrics::histogram!(m::PROJECTION_BATCH_EVENTS, "projection" => name).record(batch.events.len() as f64);
    metrics::histogram!(m::PROJECTION_BATCH_SECONDS, "projection" => name).record(started.elapsed().as_secs_f64());
    tracing::debug!(
        projection = name,
        events = batch.events.len(),
        applied = applied.applied,
        "kafka batch applied"
    );
    Ok(())
}

/// Stores each touched partition's next offset and last position, provided each still holds
/// what this process read (`expected`, 0 for a partition with no row yet). Returns false when
/// one does not: another worker owns the partition now (this one is a zombie of a rebalance
/// it missed) and the batch must be rolled back, not counted a second time.
async fn store_offsets(
    conn: &mut PgConnection,
    projection: Projection,
    topic: &str,
    touched: &HashMap<i32, (i64, i64)>,
    expected: &HashMap<i32, i64>,
) -> Result<bool, sqlx::Error> {
    let partitions: Vec<i32> = touched.keys().copied().collect();
    let next: Vec<i64> = partitions.iter().map(|p| touched[p].0).collect();
    let last: Vec<i64> = partitions.iter().map(|p| touched[p].1).collect();
    let before: Vec<i64> = partitions
        .iter()
        .map(|p| expected.get(p).copied().unwrap_or(0))
        .collect();
    let stored = sqlx::query(
        "INSERT INTO projection_offsets (projection, topic, partition, next_offset, last_position)
         SELECT $1, $2, p, n, l FROM UNNEST($3::int[], $4::bigint[], $5::bigint[]) AS t(p, n, l)
         ON CONFLICT (projection, topic, partition) DO UPDATE SET
             next_offset = EXCLUDED.next_offset, last_position = EXCLUDED.last_position
         WHERE projection_offsets.next_offset =
             (SELECT e FROM UNNEST($3::int[], $6::bigint[]) AS x(p, e) WHERE x.p = EXCLUDED.partition)",
    )
    .bind(projection.name())
    .bind(topic)
    .bind(&partitions)
    .bind(&next)
    .bind(&last)
    .bind(&before)
    .execute(conn)
    .await?;
    Ok(stored.rows_affected() == partitions.len() as u64)
}

/// Moves the projection's checkpoint to what every partition has surely applied (see the
/// module documentation), in one statement so the relay's rows are read in one snapshot.
/// Returns the checkpoint, when there is one to compute.
async fn advance_checkpoint(pool: &PgPool, projection: Projection, topic: &str) -> Result<Option<i64>, sqlx::Error> {
    let watermark: Option<(i64, i64, Option<chrono::DateTime<chrono::Utc>>)> = sqlx::query_as(
        "UPDATE projection_checkpoints c SET position = greatest(c.position, w.position), updated_at = now()
         FROM (
             SELECT min(CASE WHEN coalesce(o.next_offset, 0) > coalesce(r.last_offset, -1)
                             THEN relay.position ELSE coalesce(o.last_position, 0) END) AS position
             FROM relay_checkpoints relay
             CROSS JOIN LATERAL generate_series(0, relay.partitions - 1) AS p(partition)
             LEFT JOIN projection_offsets o
                    ON o.projection = $1 AND o.topic = relay.relay AND o.partition = p.partition
             LEFT JOIN relay_partitions r ON r.relay = relay.relay AND r.partition = p.partition
             WHERE relay.relay = $2 AND relay.partitions > 0
         ) w
         WHERE c.projection = $1 AND w.position IS NOT NULL
         RETURNING c.position, (SELECT position FROM log_head), c.last_recorded_at",
    )
    .bind(projection.name())
    .bind(topic)
    .fetch_optional(pool)
    .await?;
    if let Some((position, head, last_recorded_at)) = watermark {
        let name = projection.name();
        metrics::gauge!(m::PROJECTION_POSITION, "projection" => name).set(position as f64);
        metrics::gauge!(m::PROJECTION_LAG_EVENTS, "projection" => name).set((head - position).max(0) as f64);
        // Caught up is no lag, however long ago the last event was.
        let lag = match last_recorded_at {
            Some(recorded_at) if position < head => {
                (chrono::Utc::now() - recorded_at).num_milliseconds().max(0) as f64 / 1000.0
            }
            _ => 0.0,
        };
        metrics::gauge!(m::PROJECTION_LAG_SECONDS, "projection" => name).set(lag);
    }
    Ok(watermark.map(|(position, _, _)| position))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::time::Duration;

    use sqlx::PgPool;

    use super::{
        Batch, IDLE_RECHECK, KafkaProjectorConfig, PartitionState, ProjectorError, UNCOVERED_RECHECK,
        UNCOVERED_RECHECK_FOR, commit_batch, recheck_interval, store_offsets,
    };
    use read_models::Projection;

    /// A worker whose last batch the checkpoint does not cover yet (the relay recorded that
    /// round after the worker applied it, or another worker's partitions lag) recomputes it
    /// soon: waiting the idle 250 ms added up to that to every event's latency. Covered, or
    /// long after its last batch (a partition stalled elsewhere), it goes back to the idle pace.
    #[test]
    fn an_uncovered_batch_is_rechecked_soon_and_only_for_a_while() {
        let just = Duration::from_millis(1);
        assert_eq!(recheck_interval(120, 100, just), UNCOVERED_RECHECK);
        assert!(UNCOVERED_RECHECK * 10 <= IDLE_RECHECK);
        assert_eq!(recheck_interval(120, 120, just), IDLE_RECHECK);
        assert_eq!(recheck_interval(120, 130, just), IDLE_RECHECK);
        assert_eq!(recheck_interval(120, 100, UNCOVERED_RECHECK_FOR), IDLE_RECHECK);
        // Nothing applied yet: nothing to cover.
        assert_eq!(recheck_interval(i64::MIN, i64::MIN, just), IDLE_RECHECK);
    }

    /// A worker that lost a partition in a rebalance it has not seen yet (a zombie) cannot
    /// store offsets over the new owner's: the store reports it, and the caller rolls back.
    #[sqlx::test(migrations = false)]
    async fn offsets_move_only_from_what_the_worker_read(pool: PgPool) {
        read_models::migrate(&pool).await.unwrap();
        let mut conn = pool.acquire().await.unwrap();
        let topic = "cloudphone.test";
        let fleet = Projection::Fleet;
        let batch = |entries: &[(i32, i64, i64)]| -> HashMap<i32, (i64, i64)> {
            entries.iter().map(|(p, n, l)| (*p, (*n, *l))).collect()
        };
        let read = |entries: &[(i32, i64)]| -> HashMap<i32, i64> { entries.iter().copied().collect() };

        // First batches of two partitions (no rows yet: expected 0).
        let first = batch(&[(0, 10, 100), (1, 4, 40)]);
        assert!(
            store_offsets(&mut conn, fleet, topic, &first, &read(&[]))
                .await
                .unwrap()
        );
        // The new owner of partition 0 moves it on from what it read.
        let owner = batch(&[(0, 15, 150)]);
        assert!(
            store_offsets(&mut conn, fleet, topic, &owner, &read(&[(0, 10)]))
                .await
                .unwrap()
        );
        // The zombie, which read 10 too, is refused, even though partition 1 alone would pass.
        let zombie = batch(&[(0, 12, 120), (1, 6, 60)]);
        assert!(
            !store_offsets(&mut conn, fleet, topic, &zombie, &read(&[(0, 10), (1, 4)]))
                .await
                .unwrap()
        );
        // A worker that thinks a partition is new while someone stored it is refused as well.
        let late = batch(&[(1, 5, 50)]);
        assert!(!store_offsets(&mut conn, fleet, topic, &late, &read(&[])).await.unwrap());
    }

    /// A batch folded before a replay's swap is rolled back, even when the swap kept the
    /// version (a rebuild of the same version): the swap count moved. Its offsets stay as the
    /// swap left them; a worker that read the count after the swap commits.
    #[sqlx::test(migrations = false)]
    async fn a_batch_folded_before_a_swap_is_rolled_back(pool: PgPool) {
        read_models::migrate(&pool).await.unwrap();
        let fleet = Projection::Fleet;
        projections::checkpoint::load(&mut pool.acquire().await.unwrap(), fleet)
            .await
            .unwrap();
        let (layout, config) = (
            fleet.layout(1).unwrap(),
            KafkaProjectorConfig::new("127.0.0.1:1", fleet),
        );
        let batch = |next_offset: i64, last_position: i64| Batch {
            messages: 1,
            touched: [(0, (next_offset, last_position))].into(),
            ..Batch::default()
        };
        let stored = || async {
            sqlx::query_as::<_, (i64, i64)>(
                "SELECT next_offset, last_position FROM projection_offsets WHERE partition = 0",
            )
            .fetch_one(&pool)
            .await
            .unwrap()
        };
        let mut partitions: HashMap<i32, PartitionState> = [(
            0,
            PartitionState {
                next_offset: 0,
                last_position: 0,
                positioned: true,
            },
        )]
        .into();
        commit_batch(&pool, layout, 0, &config, &mut partitions, batch(5, 50))
            .await
            .unwrap();
        assert_eq!(stored().await, (5, 50));

        sqlx::query("UPDATE projection_checkpoints SET swaps = swaps + 1 WHERE projection = 'fleet'")
            .execute(&pool)
            .await
            .unwrap();
        let fenced = commit_batch(&pool, layout, 0, &config, &mut partitions, batch(8, 80)).await;
        assert!(
            matches!(fenced, Err(ProjectorError::Swapped { from: 1, to: 1, .. })),
            "{fenced:?}"
        );
        assert_eq!(stored().await, (5, 50), "the fenced batch stored nothing");

        commit_batch(&pool, layout, 1, &config, &mut partitions, batch(8, 80))
            .await
            .unwrap();
        assert_eq!(stored().await, (8, 80));
    }
}
