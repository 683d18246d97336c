//! Cloudphone's Kafka adapters: the only crate that links a Kafka client (rdkafka).
//!
//! - [`relay`]: the transactional outbox relay, publishing what the log committed to a topic
//!   in global order, one active instance at a time.
//! - [`projector`]: the scale-out projector workers, consuming that topic in a consumer group
//!   and applying batches with `projections`' own apply step, offsets stored beside the read
//!   models in one transaction.
//! - [`broker_alone`]: the broker with those settings and no PostgreSQL, the ceiling load
//!   runs measure the Kafka path against.
//!
//! This crate must never append to the log or decide business rules: it moves committed
//! events between PostgreSQL and the broker, and nothing else.

pub mod broker_alone;
pub mod projector;
pub mod relay;

/// Names of the metrics only the Kafka projector records (the rest are `projections`').
pub mod metrics_names {
    /// Counter: errors the Kafka consumer reported (broker unreachable, ...), retried.
    pub const PROJECTION_CONSUMER_ERRORS_TOTAL: &str = "cloudphone_projection_consumer_errors_total";
    /// Gauge: messages of a topic partition not yet committed by a Kafka projector, per
    /// projection and partition (librdkafka's `consumer_lag`, every 5 s).
    pub const KAFKA_CONSUMER_LAG_MESSAGES: &str = "cloudphone_kafka_consumer_lag_messages";
    /// Gauge: topic partitions this worker holds, per projection (0 from a revocation until
    /// the next assignment: the eager protocol revokes everything first).
    pub const KAFKA_ASSIGNED_PARTITIONS: &str = "cloudphone_kafka_assigned_partitions";
}
