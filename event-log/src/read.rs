//! Reading the log: by stream, by global position, by owner and time range. Works on any
//! pool, the primary's or a replica's; every read goes through `user_events_all`, so archived
//! months are included.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use event_schema::{ChainHash, EventEnvelope, EventMetadata, StreamType};
use futures::Stream;
use serde_json::Value;
use sqlx::pool::PoolConnection;
use sqlx::{PgPool, Postgres};
use uuid::Uuid;

use crate::append::AppendOutcome;
use crate::chain::{ChainBreak, ChainVerifier};
use crate::db_error;

/// Why a read failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// No connection could be had (server down, refusing connections, pool exhausted).
    #[error("event log unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    #[error("event log read failed: {0}")]
    Database(#[from] sqlx::Error),
    /// A stored row that does not form a valid envelope (tampering, or a bug).
    #[error("event at position {position} is corrupt: {reason}")]
    Corrupt { position: i64, reason: String },
}

impl ReadError {
    /// True when the database was unreachable, rather than the data being wrong.
    pub fn is_unavailable(&self) -> bool {
        match self {
            ReadError::Unavailable(_) => true,
            ReadError::Database(e) => db_error::is_connection_error(e),
            ReadError::Corrupt { .. } => false,
        }
    }
}

/// The log's last committed event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogHead {
    /// 0 for an empty log.
    pub position: i64,
    pub hash: ChainHash,
    pub recorded_at: DateTime<Utc>,
}

/// A stream's row in `streams`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamInfo {
    pub stream_id: Uuid,
    pub stream_type: StreamType,
    pub owner_id: Uuid,
    pub version: i64,
    pub last_position: i64,
}

#[derive(sqlx::FromRow)]
struct EventRow {
    position: i64,
    event_id: Uuid,
    stream_id: Uuid,
    stream_type: String,
    stream_version: i64,
    event_type: String,
    schema_version: i16,
    owner_id: Uuid,
    occurred_at: DateTime<Utc>,
    recorded_at: DateTime<Utc>,
    payload: Value,
    metadata: Value,
    prev_hash: Vec<u8>,
    hash: Vec<u8>,
}

impl TryFrom<EventRow> for EventEnvelope {
    type Error = ReadError;

    fn try_from(row: EventRow) -> Result<Self, Self::Error> {
        let corrupt = |reason: String| ReadError::Corrupt {
            position: row.position,
            reason,
        };
        let stream_type = row
            .stream_type
            .parse::<StreamType>()
            .map_err(|e| corrupt(e.to_string()))?;
        let schema_version = u16::try_from(row.schema_version).map_err(|e| corrupt(e.to_string()))?;
        let metadata: EventMetadata =
            serde_json::from_value(row.metadata).map_err(|e| corrupt(format!("metadata: {e}")))?;
        let prev_hash =
            ChainHash::from_slice(&row.prev_hash).ok_or_else(|| corrupt("prev_hash is not 32 bytes".into()))?;
        let hash = ChainHash::from_slice(&row.hash).ok_or_else(|| corrupt("hash is not 32 bytes".into()))?;
        Ok(EventEnvelope {
            position: row.position,
            event_id: row.event_id,
            stream_id: row.stream_id,
            stream_type,
            stream_version: row.stream_version,
            event_type: row.event_type,
            schema_version,
            owner_id: row.owner_id,
            occurred_at: row.occurred_at,
            recorded_at: row.recorded_at,
            payload: row.payload,
            metadata,
            prev_hash,
            hash,
        })
    }
}

macro_rules! select_events {
    ($($rest:literal),+) => {
        concat!(
            "SELECT position, event_id, stream_id, stream_type, stream_version, event_type, \
             schema_version, owner_id, occurred_at, recorded_at, payload, metadata, prev_hash, hash \
             FROM user_events_all ",
            $($rest),+
        )
    };
}

fn envelopes(rows: Vec<EventRow>) -> Result<Vec<EventEnvelope>, ReadError> {
    rows.into_iter().map(EventEnvelope::try_from).collect()
}

/// [`LogReader::read_all_since`] on a connection the caller holds: a tail reads on its own
/// session, where it plans this statement once (see [`crate::tail`]).
pub(crate) async fn read_all_since_on<'c>(
    executor: impl sqlx::Executor<'c, Database = Postgres>,
    after: i64,
    recorded_floor: DateTime<Utc>,
    limit: i64,
) -> Result<Vec<EventEnvelope>, ReadError> {
    let rows: Vec<EventRow> = sqlx::query_as(select_events!(
        "WHERE position > $1 AND recorded_at >= $2 ORDER BY position LIMIT $3"
    ))
    .bind(after)
    .bind(recorded_floor)
    .bind(limit)
    .fetch_all(executor)
    .await?;
    envelopes(rows)
}

/// One stored event as a fold reads it (see [`LogReader::read_payloads`]).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct LoggedPayload {
    pub position: i64,
    pub stream_id: Uuid,
    pub event_type: String,
    pub schema_version: i16,
    pub recorded_at: DateTime<Utc>,
    /// The payload's JSON text, at the version it was stored with.
    pub payload: String,
}

/// The earliest `recorded_at` a read needs to consider when it knows nothing better.
pub(crate) fn epoch() -> DateTime<Utc> {
    DateTime::<Utc>::UNIX_EPOCH
}

/// Reads the log through any pool (primary or replica). Cheap to clone.
#[derive(Debug, Clone)]
pub struct LogReader {
    pool: PgPool,
}

impl LogReader {
    pub fn new(pool: PgPool) -> Self {
        LogReader { pool }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// A connection, or `Unavailable`: whatever stops us getting one (a refused login, a
    /// server that is down) is an outage, never the caller's fault.
    async fn conn(&self) -> Result<PoolConnection<Postgres>, ReadError> {
        self.pool.acquire().await.map_err(ReadError::Unavailable)
    }

    pub async fn head(&self) -> Result<LogHead, ReadError> {
        let (position, hash, recorded_at): (i64, Vec<u8>, DateTime<Utc>) =
            sqlx::query_as("SELECT position, hash, recorded_at FROM log_head")
                .fetch_one(&mut *self.conn().await?)
                .await?;
        Ok(LogHead {
            position,
            hash: ChainHash::from_slice(&hash).ok_or(ReadError::Corrupt {
                position,
                reason: "log_head.hash is not 32 bytes".into(),
            })?,
            recorded_at,
        })
    }

    pub async fn stream_info(&self, stream_id: Uuid) -> Result<Option<StreamInfo>, ReadError> {
        let row: Option<(String, Uuid, i64, i64)> =
            sqlx::query_as("SELECT stream_type, owner_id, version, last_position FROM streams WHERE stream_id = $1")
                .bind(stream_id)
                .fetch_optional(&mut *self.conn().await?)
                .await?;
        row.map(|(stream_type, owner_id, version, last_position)| {
            Ok(StreamInfo {
                stream_id,
                stream_type: stream_type
                    .parse()
                    .map_err(|e: event_schema::UnknownWord| ReadError::Corrupt {
                        position: last_position,
                        reason: e.to_string(),
                    })?,
                owner_id,
                version,
                last_position,
            })
        })
        .transpose()
    }

    /// The current version of each of `stream_ids` that exists (one index probe each): what
    /// a cached aggregate is checked against before a decision that writes nothing is
    /// answered.
    pub async fn stream_versions(&self, stream_ids: &[Uuid]) -> Result<Vec<(Uuid, i64)>, ReadError> {
        Ok(
            sqlx::query_as("SELECT stream_id, version FROM streams WHERE stream_id = ANY($1)")
                .bind(stream_ids)
                .fetch_all(&mut *self.conn().await?)
                .await?,
        )
    }

    /// The stored hash of each of `positions` that exists, archived months included: what an
    /// export file is compared against (`cloudphone verify --file F --against-log`).
    pub async fn hashes_at(&self, positions: &[i64]) -> Result<HashMap<i64, Vec<u8>>, ReadError> {
        let rows: Vec<(i64, Vec<u8>)> =
            sqlx::query_as("SELECT position, hash FROM user_events_all WHERE position = ANY($1)")
                .bind(positions)
                .fetch_all(&mut *self.conn().await?)
                .await?;
        Ok(rows.into_iter().collect())
    }

    /// The stored outcome and request hash of an append made with idempotency `key`.
    pub async fn idempotent_outcome(&self, key: &str) -> Result<Option<(Vec<u8>, AppendOutcome)>, ReadError> {
        let row: Option<(Vec<u8>, Value)> =
            sqlx::query_as("SELECT request_hash, outcome FROM append_idempotency WHERE key = $1")
                .bind(key)
                // A named statement, unlike the writer's probe: outside a transaction, an
                // unnamed one's Parse and Bind can reach different server connections behind a
                // transaction pooler (PgBouncer), and bind to another client's statement. The
                // writer's reason for planning each time does not apply to a primary-key
                // equality, whose generic plan is an index scan however empty the table was.
                .fetch_optional(&mut *self.conn().await?)
                .await?;
        row.map(|(hash, outcome)| {
            serde_json::from_value(outcome)
                .map(|outcome| (hash, outcome))
                .map_err(|e| ReadError::Corrupt {
                    position: 0,
                    reason: format!("idempotency outcome of `{key}`: {e}"),
                })
        })
        .transpose()
    }

    /// Up to `limit` events of a stream with versions above `after_version` (0 = from the
    /// start), in version order.
    ///
    /// Partition pruning: the stream's `created_at` bounds `recorded_at` from below, so months
    /// before the stream existed are skipped at execution time (`EXPLAIN ANALYZE` shows them
    /// as "never executed"; see the `partition pruning` test).
    pub async fn read_stream(
        &self,
        stream_id: Uuid,
        after_version: i64,
        limit: i64,
    ) -> Result<Vec<EventEnvelope>, ReadError> {
        let rows: Vec<EventRow> = sqlx::query_as(select_events!(
            "WHERE stream_id = $1 AND stream_version > $2 ",
            "AND recorded_at >= (SELECT created_at FROM streams WHERE stream_id = $1) ",
            "ORDER BY stream_version LIMIT $3"
        ))
        .bind(stream_id)
        .bind(after_version)
        .bind(limit)
        .fetch_all(&mut *self.conn().await?)
        .await?;
        envelopes(rows)
    }

    /// Up to `limit` events of the `stream_types` in positions `(after, to]`, in position order,
    /// with only what a fold needs and the payload as JSON text: the replay fast path, which
    /// reads the whole history (`user_events_all`: archived months too) and decodes each
    /// payload straight into its type.
    pub async fn read_payloads(
        &self,
        stream_types: &[StreamType],
        after: i64,
        to: i64,
        limit: i64,
    ) -> Result<Vec<LoggedPayload>, ReadError> {
        let stream_types: Vec<&str> = stream_types.iter().map(|t| t.as_str()).collect();
        let rows: Vec<LoggedPayload> = sqlx::query_as(
            "SELECT position, stream_id, event_type, schema_version, recorded_at, payload::text AS payload
             FROM user_events_all
             WHERE position > $1 AND position <= $2 AND stream_type = ANY($3)
             ORDER BY position LIMIT $4",
        )
        .bind(after)
        .bind(to)
        .bind(stream_types)
        .bind(limit)
        .fetch_all(&mut *self.conn().await?)
        .await?;
        Ok(rows)
    }

    /// Up to `limit` events after global position `after`, in position order.
    pub async fn read_all(&self, after: i64, limit: i64) -> Result<Vec<EventEnvelope>, ReadError> {
        self.read_all_since(after, epoch(), limit).await
    }

    /// Like [`read_all`](Self::read_all), for a caller that knows the `recorded_at` of the
    /// event at `after`: since `recorded_at` never decreases along positions, every later event
    /// is at or after it, and months before it are pruned.
    pub async fn read_all_since(
        &self,
        after: i64,
        recorded_floor: DateTime<Utc>,
        limit: i64,
    ) -> Result<Vec<EventEnvelope>, ReadError> {
        read_all_since_on(&mut *self.conn().await?, after, recorded_floor, limit).await
    }

    /// One page of an owner's events in `[from, to)`, after the keyset cursor
    /// `(recorded_at, position)`, in position order.
    ///
    /// Partition pruning: `recorded_at` bounds the range, so only the months overlapping
    /// `[from, to)` are scanned (see the `partition pruning` test).
    pub async fn read_owner_page(
        &self,
        owner_id: Uuid,
        to: DateTime<Utc>,
        cursor: (DateTime<Utc>, i64),
        limit: i64,
    ) -> Result<Vec<EventEnvelope>, ReadError> {
        let rows: Vec<EventRow> = sqlx::query_as(select_events!(
            "WHERE owner_id = $1 AND recorded_at >= $2 AND recorded_at < $3 ",
            "AND (recorded_at, position) > ($2, $4) ",
            "ORDER BY recorded_at, position LIMIT $5"
        ))
        .bind(owner_id)
        .bind(cursor.0)
        .bind(to)
        .bind(cursor.1)
        .bind(limit)
        .fetch_all(&mut *self.conn().await?)
        .await?;
        envelopes(rows)
    }

    /// Every event of an owner recorded in `[from, to)`, in position order, streamed in pages
    /// of `page_size`: memory stays constant however long the range, and no snapshot or
    /// connection is held between pages.
    pub fn read_owner(
        &self,
        owner_id: Uuid,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        page_size: i64,
    ) -> impl Stream<Item = Result<EventEnvelope, ReadError>> + Send + 'static {
        let reader = self.clone();
        let pages = futures::stream::try_unfold(Some((from, 0i64)), move |cursor| {
            let reader = reader.clone();
            async move {
                let Some(cursor) = cursor else {
                    return Ok::<_, ReadError>(None);
                };
                let page = reader.read_owner_page(owner_id, to, cursor, page_size).await?;
                let next = match page.last() {
                    Some(last) if page.len() as i64 == page_size => Some((last.recorded_at, last.position)),
                    _ => None,
                };
                if page.is_empty() {
                    Ok(None)
                } else {
                    Ok(Some((futures::stream::iter(page.into_iter().map(Ok)), next)))
                }
            }
        });
        futures::TryStreamExt::try_flatten(pages)
    }

    /// Recomputes the hash chain over positions `from..=to` (to the head when `to` is None),
    /// reading `batch` events at a time. `on_progress` sees each verified position.
    pub async fn verify_chain(
        &self,
        from: i64,
        to: Option<i64>,
        batch: i64,
        mut on_progress: impl FnMut(i64),
    ) -> Result<ChainReport, ReadError> {
        let from = from.max(1);
        let anchor = if from == 1 {
            ChainHash::GENESIS
        } else {
            let rows = self.read_all(from - 2, 1).await?;
            match rows.first() {
                Some(previous) if previous.position == from - 1 => previous.hash,
                _ => {
                    return Ok(ChainReport {
                        from,
                        checked: 0,
                        last_position: from - 1,
                        last_hash: ChainHash::GENESIS,
                        broken: Some(ChainBreak::MissingPosition {
                            expected: from - 1,
                            found: rows.first().map_or(0, |e| e.position),
                        }),
                    });
                }
            }
        };
        let head = self.head().await?;
        let to = to.unwrap_or(head.position).min(head.position);
        let mut verifier = ChainVerifier::starting_at(from, anchor);
        let mut after = from - 1;
        let mut floor = epoch();
        let mut broken = None;
        'pages: while after < to {
            let events = self.read_all_since(after, floor, batch.min(to - after)).await?;
            if events.is_empty() {
                broken = Some(ChainBreak::MissingPosition {
                    expected: after + 1,
                    found: 0,
                });
                break;
            }
            for event in &events {
                if let Err(chain_break) = verifier.check(event) {
                    broken = Some(chain_break);
                    break 'pages;
                }
                after = event.position;
                floor = event.recorded_at;
            }
            on_progress(after);
        }
        Ok(ChainReport {
            from,
            checked: verifier.checked(),
            last_position: verifier.next_position() - 1,
            last_hash: verifier.last_hash(),
            broken,
        })
    }
}

/// What a chain verification found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainReport {
    pub from: i64,
    pub checked: u64,
    /// Last position that verified.
    pub last_position: i64,
    pub last_hash: ChainHash,
    /// The first break, if any.
    pub broken: Option<ChainBreak>,
}
