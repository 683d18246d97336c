//! The broker alone: what a Kafka-protocol broker carries with the relay's producer settings
//! and the projector workers' consumer settings, with no PostgreSQL on either side. Load runs
//! measure the Kafka path against it, on the same machine in the same run: the path's
//! ceiling, so a figure of the path is a fraction of what the broker could do.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::join_all;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::Serialize;
use uuid::Uuid;

use crate::projector::KafkaProjectorConfig;
use crate::relay::{RelayConfig, RelayError, ensure_topic};

#[derive(Debug, thiserror::Error)]
pub enum BrokerAloneError {
    #[error("Kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error(transparent)]
    Relay(#[from] RelayError),
    #[error("nothing to send: no payloads")]
    NoPayloads,
    #[error("the consumer group read {read} of {sent} messages within {limit:?}")]
    Incomplete { read: u64, sent: u64, limit: Duration },
}

/// What the broker carried.
#[derive(Debug, Clone, Serialize)]
pub struct BrokerAloneReport {
    pub messages: u64,
    pub mean_message_bytes: f64,
    pub partitions: i32,
    /// From the first send to the last delivery report (`acks=all`, idempotent).
    pub produce_seconds: f64,
    pub produced_per_second: f64,
    pub consumers: usize,
    /// From subscribing to the first message delivered to any consumer of the new group.
    pub group_join_seconds: f64,
    /// From the first message to the last, over every consumer of the group.
    pub consume_seconds: f64,
    pub consumed_per_second: f64,
    /// One message at a time at a steady rate, from the send to the delivery report
    /// (`acks=all`) and to the consumer of a formed group: the broker's own latency.
    pub latency: BrokerLatency,
}

/// Milliseconds at the 50th and 99th percentiles of messages sent one at a time.
#[derive(Debug, Clone, Serialize)]
pub struct BrokerLatency {
    pub messages: usize,
    pub acknowledged_p50_ms: f64,
    pub acknowledged_p99_ms: f64,
    pub delivered_p50_ms: f64,
    pub delivered_p99_ms: f64,
}

/// Produces `messages` messages (the `payloads` in turn, each with a new key as the relay's
/// stream ids are) to a new topic of `partitions`, then reads them all back with a new
/// group of `consumers` consumers. `limit` bounds the reading.
pub async fn measure(
    brokers: &str,
    topic: &str,
    partitions: i32,
    payloads: &[Vec<u8>],
    messages: u64,
    consumers: usize,
    limit: Duration,
) -> Result<BrokerAloneReport, BrokerAloneError> {
    if payloads.is_empty() {
        return Err(BrokerAloneError::NoPayloads);
    }
    let producer = topic_with_producer(brokers, topic, partitions).await?;
    let started = Instant::now();
    let mut bytes = 0u64;
    let mut deliveries = Vec::with_capacity(usize::try_from(messages).unwrap_or(0));
    for (sent, payload) in (0..messages).zip(payloads.iter().cycle()) {
        let key = Uuid::now_v7().to_string();
        let position = sent.to_string();
        let headers = rdkafka::message::OwnedHeaders::new().insert(rdkafka::message::Header {
            key: crate::relay::headers::POSITION,
            value: Some(position.as_str()),
        });
        let mut record = FutureRecord::to(topic).key(&key).payload(payload).headers(headers);
        let delivery = loop {
            match producer.send_result(record) {
                Ok(delivery) => break delivery,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Err((error, _)) => return Err(error.into()),
            }
        };
        bytes += payload.len() as u64;
        deliveries.push(delivery);
    }
    for delivery in join_all(deliveries).await {
        match delivery {
            Ok(Ok(_)) => {}
            Ok(Err((error, _))) => return Err(error.into()),
            Err(_) => return Err(KafkaError::Canceled.into()),
        }
    }
    let produce_seconds = started.elapsed().as_secs_f64();
    let _ = tokio::task::spawn_blocking(move || drop(producer)).await;

    let group = format!("{topic}-alone");
    // Per partition, the highest offset read plus one: a fresh topic's offsets start at 0, so
    // their sum counts distinct messages however often a rebalance redelivers some.
    let read: Arc<Mutex<HashMap<i32, i64>>> = Arc::default();
    let first_last: Arc<Mutex<(Option<Instant>, Option<Instant>)>> = Arc::default();
    let subscribed = Instant::now();
    let mut group_consumers = Vec::with_capacity(consumers);
    for _ in 0..consumers.max(1) {
        group_consumers.push(Arc::new(group_member(brokers, topic, &group)?));
    }
    let deadline = tokio::time::Instant::now() + limit;
    let distinct = |read: &Mutex<HashMap<i32, i64>>| -> u64 {
        read.lock()
            .map(|r| r.values().map(|&next| u64::try_from(next).unwrap_or(0)).sum())
            .unwrap_or(0)
    };
    let mut readers = tokio::task::JoinSet::new();
    for consumer in &group_consumers {
        let (consumer, read, first_last) = (Arc::clone(consumer), Arc::clone(&read), Arc::clone(&first_last));
        readers.spawn(async move {
            loop {
                let Ok(message) = tokio::time::timeout_at(deadline, consumer.recv()).await else {
                    return;
                };
                let Ok(message) = message else {
                    continue;
                };
                let now = Instant::now();
                let total = {
                    let Ok(mut read) = read.lock() else { return };
                    let next = read.entry(message.partition()).or_insert(0);
                    *next = (*next).max(message.offset() + 1);
                    read.values().map(|&next| u64::try_from(next).unwrap_or(0)).sum::<u64>()
                };
                if let Ok(mut first_last) = first_last.lock() {
                    first_last.0.get_or_insert(now);
                    first_last.1 = Some(now);
                }
                if total >= messages {
                    return;
                }
            }
        });
    }
    // One reader finishing means every message was read; the others are stopped.
    while let Some(_done) = readers.join_next().await {
        if distinct(&read) >= messages {
            readers.abort_all();
        }
    }
    let (first, last) = first_last.lock().map(|f| *f).unwrap_or((None, None));
    for consumer in group_consumers {
        let _ = tokio::task::spawn_blocking(move || drop(consumer)).await;
    }
    let total = distinct(&read);
    if total < messages {
        return Err(BrokerAloneError::Incomplete {
            read: total,
            sent: messages,
            limit,
        });
    }
    let (Some(first), Some(last)) = (first, last) else {
        return Err(BrokerAloneError::Incomplete {
            read: 0,
            sent: messages,
            limit,
        });
    };
    let consume_seconds = last.duration_since(first).as_secs_f64().max(1e-6);
    let latency = one_at_a_time(brokers, &format!("{topic}.latency"), partitions, &payloads[0], limit).await?;
    Ok(BrokerAloneReport {
        messages,
        mean_message_bytes: bytes as f64 / messages.max(1) as f64,
        partitions,
        produce_seconds,
        produced_per_second: messages as f64 / produce_seconds.max(1e-6),
        consumers: consumers.max(1),
        group_join_seconds: first.duration_since(subscribed).as_secs_f64(),
        consume_seconds,
        consumed_per_second: messages as f64 / consume_seconds,
        latency,
    })
}

/// Creates `topic` with `partitions` and a producer with the relay's settings.
async fn topic_with_producer(brokers: &str, topic: &str, partitions: i32) -> Result<FutureProducer, BrokerAloneError> {
    let relay = RelayConfig {
        topic: topic.to_owned(),
        name: topic.to_owned(),
        partitions,
        ..RelayConfig::new(brokers)
    };
    ensure_topic(&relay).await?;
    Ok(relay.producer_config().create()?)
}

/// A consumer with the workers' settings, subscribed to `topic` as a member of `group`.
fn group_member(brokers: &str, topic: &str, group: &str) -> Result<StreamConsumer, BrokerAloneError> {
    let config = KafkaProjectorConfig {
        topic: topic.to_owned(),
        group_id: group.to_owned(),
        ..KafkaProjectorConfig::new(brokers, read_models::Projection::Fleet)
    };
    let consumer: StreamConsumer = config.consumer_config().create()?;
    consumer.subscribe(&[topic])?;
    Ok(consumer)
}

/// Messages sent one at a time, 5 ms apart.
const LATENCY_MESSAGES: usize = 400;

/// Sends [`LATENCY_MESSAGES`] one at a time to a topic a formed consumer group reads, each
/// stamped with its send time, and measures the delivery report's and the consumer's delay.
async fn one_at_a_time(
    brokers: &str,
    topic: &str,
    partitions: i32,
    payload: &[u8],
    limit: Duration,
) -> Result<BrokerLatency, BrokerAloneError> {
    let producer = topic_with_producer(brokers, topic, partitions).await?;
    let consumer = Arc::new(group_member(brokers, topic, &format!("{topic}-group"))?);
    let base = Instant::now();
    let stamp = move |sent: &str| -> Option<f64> {
        let sent: u64 = sent.parse().ok()?;
        Some((base.elapsed().as_micros() as f64 - sent as f64) / 1000.0)
    };
    let delivered: Arc<Mutex<Vec<f64>>> = Arc::default();
    let reading = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (consumer, delivered, reading) = (Arc::clone(&consumer), Arc::clone(&delivered), Arc::clone(&reading));
        tokio::spawn(async move {
            while let Ok(message) = consumer.recv().await {
                reading.store(true, std::sync::atomic::Ordering::Relaxed);
                let sent = message
                    .key()
                    .and_then(|key| std::str::from_utf8(key).ok())
                    .and_then(|key| key.split_once(':'))
                    .and_then(|(kind, sent)| (kind == "timed").then(|| stamp(sent)).flatten());
                if let (Some(ms), Ok(mut delivered)) = (sent, delivered.lock()) {
                    delivered.push(ms);
                }
            }
        })
    };
    let send = |key: String| {
        let producer = &producer;
        async move {
            let record = FutureRecord::to(topic).key(&key).payload(payload);
            producer.send(record, Duration::from_secs(10)).await
        }
    };
    // Until the group has formed and reads: untimed messages, one every 50 ms.
    let deadline = Instant::now() + limit;
    let mut warm_up = 0u64;
    loop {
        send(format!("warm-up:{warm_up}"))
            .await
            .map_err(|(error, _)| BrokerAloneError::Kafka(error))?;
        warm_up += 1;
        if reading.load(std::sync::atomic::Ordering::Relaxed) {
            break;
        }
        if Instant::now() > deadline || reader.is_finished() {
            reader.abort();
            return Err(BrokerAloneError::Incomplete {
                read: 0,
                sent: warm_up,
                limit,
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut acknowledged = Vec::with_capacity(LATENCY_MESSAGES);
    for _ in 0..LATENCY_MESSAGES {
        let sent = Instant::now();
        send(format!("timed:{}", base.elapsed().as_micros()))
            .await
            .map_err(|(error, _)| BrokerAloneError::Kafka(error))?;
        acknowledged.push(sent.elapsed().as_secs_f64() * 1000.0);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    while delivered.lock().map(|d| d.len()).unwrap_or(0) < LATENCY_MESSAGES && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    reader.abort();
    let _ = tokio::task::spawn_blocking(move || {
        drop(consumer);
        drop(producer);
    })
    .await;
    let mut delivered = delivered.lock().map(|d| d.clone()).unwrap_or_default();
    if delivered.len() < LATENCY_MESSAGES {
        return Err(BrokerAloneError::Incomplete {
            read: delivered.len() as u64,
            sent: LATENCY_MESSAGES as u64,
            limit,
        });
    }
    let quantile = |values: &mut Vec<f64>, q: f64| -> f64 {
        values.sort_by(f64::total_cmp);
        let index = ((values.len() as f64 - 1.0) * q).round() as usize;
        values.get(index).copied().unwrap_or(0.0)
    };
    Ok(BrokerLatency {
        messages: LATENCY_MESSAGES,
        acknowledged_p50_ms: quantile(&mut acknowledged, 0.5),
        acknowledged_p99_ms: quantile(&mut acknowledged, 0.99),
        delivered_p50_ms: quantile(&mut delivered, 0.5),
        delivered_p99_ms: quantile(&mut delivered, 0.99),
    })
}
