//! The transactional outbox relay: publishes committed events to Kafka in global order and
//! records how far the broker has acknowledged, in PostgreSQL.
//!
//! - Exactly one relay publishes at a time: it holds a session advisory lock on a dedicated
//!   connection; a second instance waits for it and takes over when the first dies (its
//!   session ends, the lock is released).
//! - The checkpoint moves only after every event up to it has a successful delivery report,
//!   so a crash or a takeover re-publishes at most what was in flight. Consumers drop such
//!   duplicates: within a partition positions only grow, so an event at or below the last
//!   position applied from its partition has been applied.
//! - The producer is idempotent (`enable.idempotence=true`, `acks=all`,
//!   `enable.gapless.guarantee=true`): retries inside librdkafka neither duplicate, reorder
//!   nor leave gaps in a partition; a final failure restarts the relay from its checkpoint.
//! - Key = stream id, so a stream's events stay in one partition, in order. The partitioner is
//!   set to `murmur2_random`, the Java client's, so every producer and tool (Kafka Connect,
//!   kcat, Java services) maps a stream id to the same partition; librdkafka's default
//!   (`consistent_random`, CRC32) would split a stream across partitions as soon as a second
//!   kind of producer wrote to the topic.
//! - A broker outage never touches commands (appends never wait on Kafka): the relay backs
//!   off, its lag grows, and it catches up from its checkpoint.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use event_schema::EventEnvelope;
use futures::future::join_all;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use sqlx::pool::PoolConnection;
use sqlx::{PgPool, Postgres};
use tokio_util::sync::CancellationToken;

use event_log::{LogReader, LogTail, TailConfig};

/// Default topic the log is published to.
pub const DEFAULT_TOPIC: &str = "cloudphone.user-events";

/// Kafka message headers the relay sets.
pub mod headers {
    pub const EVENT_TYPE: &str = "event_type";
    pub const SCHEMA_VERSION: &str = "schema_version";
    pub const POSITION: &str = "position";
    pub const TRACE_ID: &str = "trace_id";
}

#[derive(Debug, Clone)]
pub struct RelayConfig {
    pub brokers: String,
    pub topic: String,
    /// Partitions and replication factor when the relay has to create the topic.
    pub partitions: i32,
    pub replication: i32,
    /// Events published per round (all their delivery reports are awaited together).
    pub batch_size: i64,
    /// Name of this relay's checkpoint (one per topic).
    pub name: String,
}

impl RelayConfig {
    pub fn new(brokers: impl Into<String>) -> Self {
        RelayConfig {
            brokers: brokers.into(),
            topic: DEFAULT_TOPIC.to_owned(),
            partitions: 6,
            replication: 1,
            batch_size: 2_000,
            name: DEFAULT_TOPIC.to_owned(),
        }
    }

    /// The librdkafka producer settings (see the module documentation for why).
    pub fn producer_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            // A message that finally fails must not leave a gap before later ones that
            // succeed: the relay restarts from its checkpoint instead (consumers rely on
            // positions arriving in order within a partition).
            .set("enable.gapless.guarantee", "true")
            .set("partitioner", "murmur2_random")
            .set("linger.ms", "5")
            .set("compression.type", "none")
            // Retried inside librdkafka for this long before a delivery report says failed;
            // a slow broker is waited for rather than re-published to.
            .set("message.timeout.ms", "120000")
            // The relay looks the topic up before it creates it with its partitions; a lookup
            // that let the broker create it would get the broker's default partitions
            // (Kafka's auto.create.topics.enable is on by default, with num.partitions 1).
            .set("allow.auto.create.topics", "false")
            .set("broker.address.family", "v4");
        config
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("relay database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("log read failed: {0}")]
    Read(#[from] event_log::ReadError),
    #[error("Kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("the relay lost its leadership connection")]
    LostLeadership,
}

/// Names of the relay's metrics.
pub mod metrics_names {
    /// Gauge: last position the broker acknowledged.
    pub const RELAY_POSITION: &str = "cloudphone_relay_position";
    /// Gauge: events committed to the log and not yet acknowledged by the broker.
    pub const RELAY_LAG_EVENTS: &str = "cloudphone_relay_lag_events";
    /// Counter: events published (acknowledged).
    pub const RELAY_PUBLISHED_TOTAL: &str = "cloudphone_relay_published_total";
    /// Counter: publish rounds that failed (broker unreachable, timeouts).
    pub const RELAY_ERRORS_TOTAL: &str = "cloudphone_relay_errors_total";
    /// Gauge: 1 while this process is the active relay.
    pub const RELAY_LEADER: &str = "cloudphone_relay_leader";
    /// Histogram: seconds of each part of a publish round, by `phase`: `publish` (sent until
    /// the broker acknowledged all of it), `record` (the checkpoint and offsets committed
    /// in PostgreSQL).
    pub const RELAY_ROUND_SECONDS: &str = "cloudphone_relay_round_seconds";
    /// Histogram: events published per round.
    pub const RELAY_BATCH_EVENTS: &str = "cloudphone_relay_batch_events";
}
use metrics_names as m;

/// Runs the relay until `stop` is cancelled: waits for leadership, then publishes. Errors
/// are logged and retried with backoff; nothing is ever skipped.
pub async fn run_relay(pool: PgPool, config: RelayConfig, stop: CancellationToken) {
    let mut backoff = Duration::from_millis(200);
    while !stop.is_cancelled() {
        match lead(&pool, &config, &stop).await {
            Ok(()) => break,
            Err(error) => {
                metrics::counter!(m::RELAY_ERRORS_TOTAL).increment(1);
                metrics::gauge!(m::RELAY_LEADER).set(0.0);
                tracing::warn!(%error, ?backoff, "relay restarting from its checkpoint");
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
    metrics::gauge!(m::RELAY_LEADER).set(0.0);
    tracing::info!("relay stopped");
}

/// Waits until this process holds the relay lock (on `conn`, for as long as it lives).
async fn acquire_leadership(
    conn: &mut PoolConnection<Postgres>,
    name: &str,
    stop: &CancellationToken,
) -> Result<bool, RelayError> {
    let mut announced = false;
    loop {
        let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtext('cloudphone.relay:' || $1))")
            .bind(name)
            .fetch_one(&mut **conn)
            .await?;
        if got {
            return Ok(true);
        }
        if !announced {
            tracing::info!(relay = name, "another relay is active; standing by");
            announced = true;
        }
        tokio::select! {
            () = stop.cancelled() => return Ok(false),
            () = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

async fn lead(pool: &PgPool, config: &RelayConfig, stop: &CancellationToken) -> Result<(), RelayError> {
    // The lock lives as long as this connection; it never goes back to the pool while held.
    let mut leader_conn = pool.acquire().await?;
    if !acquire_leadership(&mut leader_conn, &config.name, stop).await? {
        return Ok(());
    }
    let result = publish(pool, &mut leader_conn, config, stop).await;

    // Release explicitly on a clean stop; on a broken connection the session is gone anyway.
    let _ = sqlx::query("SELECT pg_advisory_unlock(hashtext('cloudphone.relay:' || $1))")
        .bind(&config.name)
        .execute(&mut *leader_conn)
        .await;
    result
}

async fn publish(
    pool: &PgPool,
    leader_conn: &mut PoolConnection<Postgres>,
    config: &RelayConfig,
    stop: &CancellationToken,
) -> Result<(), RelayError> {
    metrics::gauge!(m::RELAY_LEADER).set(1.0);
    let producer: FutureProducer = config.producer_config().create()?;
    let result = publish_with(pool, leader_conn, config, stop, &producer).await;
    // Dropping a producer flushes, which may block on the broker: not on async workers.
    let _ = tokio::task::spawn_blocking(move || drop(producer)).await;
    result
}

async fn publish_with(
    pool: &PgPool,
    leader_conn: &mut PoolConnection<Postgres>,
    config: &RelayConfig,
    stop: &CancellationToken,
    producer: &FutureProducer,
) -> Result<(), RelayError> {
    // Look before creating: an existing topic needs no admin call (and some brokers answer
    // CreateTopics for an existing topic slowly after a restart).
    let mut partition_count = topic_partitions(producer, &config.topic).await?;
    if partition_count == 0 {
        ensure_topic(config).await?;
        partition_count = topic_partitions(producer, &config.topic).await?;
    }
    if partition_count != config.partitions {
        // Someone else created it (an operator, or a broker's auto-creation): the relay
        // publishes to what exists; the workers' parallelism is bounded by it.
        tracing::warn!(topic = %config.topic, partitions = partition_count, configured = config.partitions, "the topic exists with another partition count");
    }
    sqlx::query(
        "INSERT INTO relay_checkpoints (relay, partitions) VALUES ($1, $2)
         ON CONFLICT (relay) DO UPDATE SET partitions = EXCLUDED.partitions",
    )
    .bind(&config.name)
    .bind(partition_count)
    .execute(pool)
    .await?;
    let mut position: i64 = sqlx::query_scalar("SELECT position FROM relay_checkpoints WHERE relay = $1")
        .bind(&config.name)
        .fetch_one(pool)
        .await?;
    tracing::info!(relay = %config.name, position, topic = %config.topic, "relay publishing");
    let reader = LogReader::new(pool.clone());
    let tail_config = TailConfig {
        batch_size: config.batch_size,
        ..TailConfig::default()
    };
    let mut tail = LogTail::start(reader.clone(), position, tail_config).await;
    let mut last_liveness = Instant::now();
    loop {
        let events = tokio::select! {
            () = stop.cancelled() => return Ok(()),
            events = tail.next_batch() => events?,
        };
        // Still the leader? (A broken lock connection means another relay may take over.)
        if last_liveness.elapsed() > Duration::from_secs(1) {
            sqlx::query("SELECT 1")
                .execute(&mut **leader_conn)
                .await
                .map_err(|_| RelayError::LostLeadership)?;
            last_liveness = Instant::now();
        }
        let Some(last) = events.last() else {
            continue;
        };
        let round = Instant::now();
        let partitions = send_all(producer, &config.topic, &events).await?;
        metrics::histogram!(m::RELAY_ROUND_SECONDS, "phase" => "publish").record(round.elapsed().as_secs_f64());
        metrics::histogram!(m::RELAY_BATCH_EVENTS).record(events.len() as f64);
        let recording = Instant::now();
        let mut tx = pool.begin().await?;
        // greatest(): a relay that lost its lock unknowingly must not move it back.
        sqlx::query(
            "UPDATE relay_checkpoints SET position = greatest(position, $2), updated_at = now() WHERE relay = $1",
        )
        .bind(&config.name)
        .bind(last.position)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO relay_partitions (relay, partition, last_offset, last_position)
             SELECT $1, p, o, l FROM UNNEST($2::int[], $3::bigint[], $4::bigint[]) AS t(p, o, l)
             ON CONFLICT (relay, partition) DO UPDATE SET
                 last_offset = greatest(relay_partitions.last_offset, EXCLUDED.last_offset),
                 last_position = greatest(relay_partitions.last_position, EXCLUDED.last_position)",
        )
        .bind(&config.name)
        .bind(partitions.keys().copied().collect::<Vec<_>>())
        .bind(partitions.values().map(|v| v.0).collect::<Vec<_>>())
        .bind(partitions.values().map(|v| v.1).collect::<Vec<_>>())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        metrics::histogram!(m::RELAY_ROUND_SECONDS, "phase" => "record").record(recording.elapsed().as_secs_f64());
        position = last.position;
        metrics::counter!(m::RELAY_PUBLISHED_TOTAL).increment(events.len() as u64);
        // The lag before the position: a scrape that sees the new position sees its lag too.
        if let Ok(head) = reader.head().await {
            metrics::gauge!(m::RELAY_LAG_EVENTS).set((head.position - position).max(0) as f64);
        }
        metrics::gauge!(m::RELAY_POSITION).set(position as f64);
    }
}

/// Publishes events and waits for every delivery report; any failure fails the round.
/// Returns, per partition, the last offset and position acknowledged.
async fn send_all(
    producer: &FutureProducer,
    topic: &str,
    events: &[EventEnvelope],
) -> Result<BTreeMap<i32, (i64, i64)>, RelayError> {
    let mut deliveries = Vec::with_capacity(events.len());
    for event in events {
        let key = event.stream_id.to_string();
        // Envelopes are plain data; serialising one cannot fail.
        let payload = serde_json::to_vec(event).unwrap_or_default();
        let position = event.position.to_string();
        let schema_version = event.schema_version.to_string();
        let mut headers = OwnedHeaders::new()
            .insert(Header {
                key: headers::EVENT_TYPE,
                value: Some(event.event_type.as_str()),
            })
            .insert(Header {
                key: headers::SCHEMA_VERSION,
                value: Some(schema_version.as_str()),
            })
            .insert(Header {
                key: headers::POSITION,
                value: Some(position.as_str()),
            });
        if let Some(trace_id) = &event.metadata.trace_id {
            headers = headers.insert(Header {
                key: headers::TRACE_ID,
                value: Some(trace_id.as_str()),
            });
        }
        let mut record = FutureRecord::to(topic).key(&key).payload(&payload).headers(headers);
        // librdkafka copies the message on enqueue; only a full local queue makes us wait.
        let delivery = loop {
            match producer.send_result(record) {
                Ok(delivery) => break delivery,
                Err((rdkafka::error::KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((error, _)) => return Err(RelayError::Kafka(error)),
            }
        };
        deliveries.push(delivery);
    }
    let mut partitions = BTreeMap::new();
    for (delivery, event) in join_all(deliveries).await.into_iter().zip(events) {
        match delivery {
            Ok(Ok(delivery)) => {
                let entry = partitions
                    .entry(delivery.partition)
                    .or_insert((delivery.offset, event.position));
                *entry = (entry.0.max(delivery.offset), entry.1.max(event.position));
                tracing::debug!(
                    position = event.position,
                    event_id = %event.event_id,
                    event_type = %event.event_type,
                    partition = delivery.partition,
                    offset = delivery.offset,
                    trace_id = event.metadata.trace_id.as_deref().unwrap_or_default(),
                    "event published"
                );
            }
            Ok(Err((error, _))) => return Err(RelayError::Kafka(error)),
            // The producer was dropped before reporting: treat as a failed round.
            Err(_) => return Err(RelayError::Kafka(rdkafka::error::KafkaError::Canceled)),
        }
    }
    Ok(partitions)
}

/// How many partitions the topic has (a blocking metadata call, kept off the async workers).
async fn topic_partitions(producer: &FutureProducer, topic: &str) -> Result<i32, RelayError> {
    let (client, topic) = (producer.clone(), topic.to_owned());
    let count = tokio::task::spawn_blocking(move || {
        let metadata = client.client().fetch_metadata(Some(&topic), Duration::from_secs(10))?;
        Ok::<_, rdkafka::error::KafkaError>(metadata.topics().first().map_or(0, |t| t.partitions().len()))
    })
    .await
    .map_err(|_| RelayError::Kafka(rdkafka::error::KafkaError::Canceled))??;
    Ok(i32::try_from(count).unwrap_or(i32::MAX))
}

/// A client kept for readiness probes of the Kafka roles: asks the brokers for the topic's
/// metadata. Made once (a librdkafka client starts threads); each probe is one request.
#[derive(Clone)]
pub struct BrokerProbe {
    client: std::sync::Arc<rdkafka::producer::BaseProducer>,
    topic: String,
}

impl std::fmt::Debug for BrokerProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerProbe")
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

impl BrokerProbe {
    pub fn new(brokers: &str, topic: &str) -> Result<Self, RelayError> {
        let client: rdkafka::producer::BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("broker.address.family", "v4")
            // A probe must not create the topic (with the broker's default partitions) before
            // the relay creates it with its own.
            .set("allow.auto.create.topics", "false")
            .create()?;
        Ok(BrokerProbe {
            client: std::sync::Arc::new(client),
            topic: topic.to_owned(),
        })
    }

    /// Ok when a broker answers with the topic's metadata within `timeout`.
    pub async fn check(&self, timeout: Duration) -> Result<(), RelayError> {
        let (client, topic) = (self.client.clone(), self.topic.clone());
        tokio::task::spawn_blocking(move || {
            client.client().fetch_metadata(Some(&topic), timeout)?;
            Ok::<_, RelayError>(())
        })
        .await
        .map_err(|_| RelayError::Kafka(rdkafka::error::KafkaError::Canceled))?
    }
}

/// Creates the topic if it does not exist (a topic that exists is left as it is).
pub async fn ensure_topic(config: &RelayConfig) -> Result<(), RelayError> {
    let admin: AdminClient<DefaultClientContext> = config.producer_config().create()?;
    let topic = NewTopic::new(
        &config.topic,
        config.partitions,
        TopicReplication::Fixed(config.replication),
    );
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for result in admin.create_topics([&topic], &options).await? {
        match result {
            Ok(_) => tracing::info!(topic = %config.topic, partitions = config.partitions, "created topic"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(RelayError::Kafka(rdkafka::error::KafkaError::AdminOp(code))).inspect_err(|_| {
                    tracing::error!(%topic, ?code, "cannot create topic");
                });
            }
        }
    }
    Ok(())
}
