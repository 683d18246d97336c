//! What an append is made of, how it is checked before it reaches the writer, and how it can
//! fail.

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use event_schema::canonical::canonical_json;
use event_schema::{Event, EventMetadata, SchemaError, StreamType, kind_of};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::clock::truncate_to_micros;

/// What the caller believes the stream's version is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExpectedVersion {
    /// No check: append whatever the version is (creating the stream if needed).
    Any,
    /// The stream must not exist yet.
    NoStream,
    /// The stream must be at exactly this version (`Exact(0)` means it must not exist).
    Exact(i64),
}

/// One event to append, not yet positioned.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    pub event_id: Uuid,
    pub event_type: String,
    pub schema_version: u16,
    pub payload: Value,
    pub metadata: EventMetadata,
    pub occurred_at: DateTime<Utc>,
}

impl NewEvent {
    /// Encodes a typed event at its current version with a fresh time-ordered id.
    pub fn from_event(event: &Event, metadata: EventMetadata, occurred_at: DateTime<Utc>) -> Result<Self, SchemaError> {
        let encoded = event.encode()?;
        Ok(NewEvent {
            event_id: Uuid::now_v7(),
            event_type: encoded.event_type.to_owned(),
            schema_version: encoded.schema_version,
            payload: encoded.payload,
            metadata,
            occurred_at,
        })
    }
}

/// The events for one stream within a batch.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamAppend {
    pub stream_id: Uuid,
    pub stream_type: StreamType,
    /// The user the stream belongs to; recorded on every event for reads by owner.
    pub owner_id: Uuid,
    pub expected: ExpectedVersion,
    pub events: Vec<NewEvent>,
}

/// An idempotency key and the hash of the request it was sent with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey {
    pub key: String,
    /// Hash of the caller's request; the same key with another hash is refused.
    pub request_hash: Vec<u8>,
}

/// One or more streams appended atomically: all commit or none do.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AppendBatch {
    pub streams: Vec<StreamAppend>,
    pub idempotency: Option<IdempotencyKey>,
}

impl AppendBatch {
    pub fn single(stream: StreamAppend) -> Self {
        AppendBatch {
            streams: vec![stream],
            idempotency: None,
        }
    }

    pub fn with_idempotency_key(mut self, key: impl Into<String>, request_hash: Vec<u8>) -> Self {
        self.idempotency = Some(IdempotencyKey {
            key: key.into(),
            request_hash,
        });
        self
    }

    pub fn event_count(&self) -> usize {
        self.streams.iter().map(|s| s.events.len()).sum()
    }
}

/// A stream's version after an append.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamRevision {
    pub stream_id: Uuid,
    pub version: i64,
}

/// Where a committed append landed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppendOutcome {
    /// Position of the batch's first event.
    pub first_position: i64,
    /// Position of the batch's last event: pass it as `minPosition` to read your writes.
    pub last_position: i64,
    pub recorded_at: DateTime<Utc>,
    /// Each stream's version after the append, in the order of the batch.
    pub streams: Vec<StreamRevision>,
    /// True when this is the stored outcome of an earlier append with the same idempotency
    /// key, and nothing was written now.
    #[serde(skip)]
    pub replayed: bool,
}

/// Limits an append is checked against before it reaches the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendLimits {
    /// Most events in one batch.
    pub max_batch_events: usize,
    /// Largest payload, as canonical JSON bytes.
    pub max_payload_bytes: usize,
    /// Longest idempotency key, in bytes.
    pub max_idempotency_key_bytes: usize,
}

impl Default for AppendLimits {
    fn default() -> Self {
        AppendLimits {
            max_batch_events: 50_000,
            max_payload_bytes: 256 * 1024,
            max_idempotency_key_bytes: 256,
        }
    }
}

/// Why an append was not written. Every variant but the last four is the caller's input; the
/// caller can rely on nothing having been written in every case except `OutcomeUnknown`.
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    #[error("an append needs at least one stream")]
    EmptyBatch,
    #[error("stream {stream_id} has no events to append")]
    EmptyStream { stream_id: Uuid },
    #[error("stream {stream_id} appears twice in one batch")]
    DuplicateStream { stream_id: Uuid },
    #[error("batch of {events} events is over the limit of {limit}")]
    BatchTooLarge { events: usize, limit: usize },
    #[error("expected version {expected} of stream {stream_id} is negative")]
    NegativeExpectedVersion { stream_id: Uuid, expected: i64 },
    #[error("event {index} of stream {stream_id} is invalid: {reason}")]
    InvalidEvent {
        stream_id: Uuid,
        index: usize,
        reason: InvalidEvent,
    },
    #[error("stream {stream_id} is a {existing} stream, not a {requested} stream")]
    StreamTypeMismatch {
        stream_id: Uuid,
        existing: StreamType,
        requested: StreamType,
    },
    #[error("stream {stream_id} belongs to owner {existing}, not {requested}")]
    OwnerMismatch {
        stream_id: Uuid,
        existing: Uuid,
        requested: Uuid,
    },
    #[error("stream {stream_id} is at version {actual:?}, expected {expected:?}")]
    WrongExpectedVersion {
        stream_id: Uuid,
        expected: ExpectedVersion,
        /// `None` when the stream does not exist.
        actual: Option<i64>,
    },
    #[error("idempotency key `{key}` was already used for a different request")]
    IdempotencyKeyReused { key: String },
    #[error("idempotency key is empty or longer than {limit} bytes")]
    InvalidIdempotencyKey { limit: usize },
    /// The database could not be reached or failed before commit; nothing was written.
    #[error("event log unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    /// The connection broke while committing and the outcome could not be checked; retry
    /// with the same idempotency key to find out.
    #[error("commit outcome unknown: {0}")]
    OutcomeUnknown(#[source] sqlx::Error),
    /// The database refused the write for a reason that is not the caller's input.
    #[error("event log write failed: {0}")]
    Database(#[source] sqlx::Error),
    #[error("the event log writer has shut down")]
    WriterStopped,
}

impl AppendError {
    /// True for failures of the log rather than of the caller's input (map to 503).
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            AppendError::Unavailable(_) | AppendError::OutcomeUnknown(_) | AppendError::WriterStopped
        )
    }
}

/// What is wrong with one event of a batch.
#[derive(Debug, thiserror::Error)]
pub enum InvalidEvent {
    #[error(transparent)]
    Schema(#[from] SchemaError),
    #[error("`{event_type}` belongs to {belongs_to} streams, not {stream_type} streams")]
    WrongStream {
        event_type: String,
        belongs_to: StreamType,
        stream_type: StreamType,
    },
    #[error("`{event_type}` must be appended at its current schema version {current}, not {given}")]
    NotCurrentVersion {
        event_type: String,
        given: u16,
        current: u16,
    },
    #[error("payload is {bytes} bytes, over the limit of {limit}")]
    PayloadTooLarge { bytes: usize, limit: usize },
    #[error("text contains a NUL character, which PostgreSQL's jsonb cannot store")]
    ContainsNul,
    #[error("metadata cannot be encoded: {0}")]
    Metadata(#[source] serde_json::Error),
}

/// A batch that passed every check that needs no database, with its JSON serialised once
/// (the canonical text is both hashed and stored).
#[derive(Debug, Clone)]
pub(crate) struct CheckedBatch {
    pub streams: Vec<CheckedStream>,
    pub idempotency: Option<IdempotencyKey>,
    pub events: usize,
}

#[derive(Debug, Clone)]
pub(crate) struct CheckedStream {
    pub stream_id: Uuid,
    pub stream_type: StreamType,
    pub owner_id: Uuid,
    pub expected: ExpectedVersion,
    pub events: Vec<CheckedEvent>,
}

#[derive(Debug, Clone)]
pub(crate) struct CheckedEvent {
    pub event_id: Uuid,
    pub event_type: String,
    pub schema_version: u16,
    pub occurred_at: DateTime<Utc>,
    pub payload_json: String,
    pub metadata_json: String,
}

impl AppendBatch {
    /// Checks everything that needs no database: shape, sizes, versions, and that every
    /// payload decodes into its event type and belongs to its stream type.
    pub(crate) fn check(self, limits: &AppendLimits) -> Result<CheckedBatch, AppendError> {
        if self.streams.is_empty() {
            return Err(AppendError::EmptyBatch);
        }
        let events = self.event_count();
        if events > limits.max_batch_events {
            return Err(AppendError::BatchTooLarge {
                events,
                limit: limits.max_batch_events,
            });
        }
        if let Some(key) = &self.idempotency
            && (key.key.is_empty() || key.key.len() > limits.max_idempotency_key_bytes || key.key.contains('\0'))
        {
            return Err(AppendError::InvalidIdempotencyKey {
                limit: limits.max_idempotency_key_bytes,
            });
        }
        let mut seen = HashSet::with_capacity(self.streams.len());
        let mut streams = Vec::with_capacity(self.streams.len());
        for stream in self.streams {
            if !seen.insert(stream.stream_id) {
                return Err(AppendError::DuplicateStream {
                    stream_id: stream.stream_id,
                });
            }
            if stream.events.is_empty() {
                return Err(AppendError::EmptyStream {
                    stream_id: stream.stream_id,
                });
            }
            let expected = match stream.expected {
                ExpectedVersion::Exact(n) if n < 0 => {
                    return Err(AppendError::NegativeExpectedVersion {
                        stream_id: stream.stream_id,
                        expected: n,
                    });
                }
                ExpectedVersion::Exact(0) => ExpectedVersion::NoStream,
                other => other,
            };
            let mut checked = Vec::with_capacity(stream.events.len());
            for (index, event) in stream.events.into_iter().enumerate() {
                let event =
                    check_event(event, stream.stream_type, limits).map_err(|reason| AppendError::InvalidEvent {
                        stream_id: stream.stream_id,
                        index,
                        reason,
                    })?;
                checked.push(event);
            }
            streams.push(CheckedStream {
                stream_id: stream.stream_id,
                stream_type: stream.stream_type,
                owner_id: stream.owner_id,
                expected,
                events: checked,
            });
        }
        Ok(CheckedBatch {
            streams,
            idempotency: self.idempotency,
            events,
        })
    }
}

fn check_event(event: NewEvent, stream_type: StreamType, limits: &AppendLimits) -> Result<CheckedEvent, InvalidEvent> {
    let kind = kind_of(&event.event_type)?;
    if kind.stream_type != stream_type {
        return Err(InvalidEvent::WrongStream {
            event_type: event.event_type,
            belongs_to: kind.stream_type,
            stream_type,
        });
    }
    if event.schema_version != kind.current_version {
        return Err(InvalidEvent::NotCurrentVersion {
            event_type: event.event_type,
            given: event.schema_version,
            current: kind.current_version,
        });
    }
    if contains_nul(&event.payload) {
        return Err(InvalidEvent::ContainsNul);
    }
    let payload_json = canonical_json(&event.payload);
    if payload_json.len() > limits.max_payload_bytes {
        return Err(InvalidEvent::PayloadTooLarge {
            bytes: payload_json.len(),
            limit: limits.max_payload_bytes,
        });
    }
    // The payload must be exactly an event of its type: decoding rejects missing, extra
    // and mistyped fields.
    Event::decode(&event.event_type, event.schema_version, event.payload)?;
    let metadata = serde_json::to_value(&event.metadata).map_err(InvalidEvent::Metadata)?;
    if contains_nul(&metadata) {
        return Err(InvalidEvent::ContainsNul);
    }
    Ok(CheckedEvent {
        event_id: event.event_id,
        schema_version: event.schema_version,
        event_type: event.event_type,
        occurred_at: truncate_to_micros(event.occurred_at),
        payload_json,
        metadata_json: canonical_json(&metadata),
    })
}

fn contains_nul(value: &Value) -> bool {
    match value {
        Value::String(text) => text.contains('\0'),
        Value::Array(items) => items.iter().any(contains_nul),
        Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || contains_nul(v)),
        Value::Null | Value::Bool(_) | Value::Number(_) => false,
    }
}
