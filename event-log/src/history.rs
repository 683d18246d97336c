//! Streaming the log's history out for auditors: keyset pages over `user_events_all`
//! (archived months included, months outside the time range pruned), personal fields shown
//! decrypted or erased, encoded as an export file (see [`crate::export`]) in chunks.
//!
//! Memory stays constant whatever the range: one page being read, one being encoded, and a
//! chunk of bytes on its way to the client. The export stops at the head the log had when it
//! started, so it ends even while appends go on; `after` resumes an interrupted one.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use futures::Stream;
use sqlx::PgPool;
use sqlx::postgres::PgArguments;
use sqlx::query::QueryAs;
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::export::{ExportEncoder, ExportFormat, ExportRow, ExportRowError, ExportTrailer};
use crate::personal::{DataKey, PersonalDataError, PersonalDataKeys};
use crate::read::ReadError;

/// Which events an export holds. Every filter is optional; positions are `(after, until]`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HistoryFilter {
    /// Events owned by this user (the user's own and their devices').
    pub owner_id: Option<Uuid>,
    pub stream_id: Option<Uuid>,
    pub event_type: Option<String>,
    /// `recorded_at >= from`.
    pub from: Option<DateTime<Utc>>,
    /// `recorded_at < to`.
    pub to: Option<DateTime<Utc>>,
    /// Resume after this position (0: from the start).
    pub after: i64,
    /// Stop at this position [default: the head when the export starts].
    pub until: Option<i64>,
}

impl HistoryFilter {
    /// True when every position in the exported range is included (no filter by owner,
    /// stream or type), so the file's chain must have no gap.
    pub fn is_contiguous(&self) -> bool {
        self.owner_id.is_none() && self.stream_id.is_none() && self.event_type.is_none()
    }
}

/// Why an export stopped.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error(transparent)]
    Row(#[from] ExportRowError),
    #[error(transparent)]
    Keys(#[from] PersonalDataError),
}

impl ExportError {
    /// True when the database was unreachable, rather than the data being wrong.
    pub fn is_unavailable(&self) -> bool {
        match self {
            ExportError::Read(error) => error.is_unavailable(),
            ExportError::Keys(PersonalDataError::Database(error)) => crate::db_error::is_connection_error(error),
            _ => false,
        }
    }
}

impl From<sqlx::Error> for ExportError {
    fn from(error: sqlx::Error) -> Self {
        ExportError::Read(ReadError::Database(error))
    }
}

/// How an export is produced.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    pub format: ExportFormat,
    /// Events read per query.
    pub page_size: i64,
    /// Bytes gathered before a chunk is handed on.
    pub chunk_bytes: usize,
    /// Decrypt personal fields with these keys; `None` leaves them out of the export (the
    /// stored ciphertext is always there, the chain covers it).
    pub personal: Option<PersonalDataKeys>,
}

impl ExportOptions {
    pub fn new(format: ExportFormat) -> Self {
        ExportOptions {
            format,
            page_size: 10_000,
            chunk_bytes: 256 * 1024,
            personal: None,
        }
    }
}

/// Where the next page starts: after `position`, at or after `recorded_at` (which never
/// decreases along positions, so earlier months are pruned).
#[derive(Debug, Clone, Copy)]
struct Cursor {
    position: i64,
    recorded_at: DateTime<Utc>,
}

const SELECT_ROWS: &str = "SELECT position, event_id, stream_id, stream_type, stream_version, event_type, \
     schema_version, owner_id, occurred_at, recorded_at, payload::text AS payload, metadata::text AS metadata, \
     prev_hash, hash FROM user_events_all WHERE position > $1 AND position <= $2 AND recorded_at >= $3";

/// One page of the filter's events after `cursor`, in position order. The SQL names only the
/// filters that are set, so each shape gets a plan of its own (an `$n IS NULL OR` predicate
/// would defeat partition pruning and index choice in a generic plan).
async fn read_page(
    pool: &PgPool,
    filter: &HistoryFilter,
    until: i64,
    cursor: Cursor,
    limit: i64,
) -> Result<Vec<ExportRow>, ReadError> {
    let mut sql = String::from(SELECT_ROWS);
    let mut next = 4;
    let mut clause = |sql: &mut String, column: &str, op: &str| {
        sql.push_str(&format!(" AND {column} {op} ${next}"));
        next += 1;
    };
    if filter.owner_id.is_some() {
        clause(&mut sql, "owner_id", "=");
    }
    if filter.stream_id.is_some() {
        clause(&mut sql, "stream_id", "=");
    }
    if filter.event_type.is_some() {
        clause(&mut sql, "event_type", "=");
    }
    if filter.to.is_some() {
        clause(&mut sql, "recorded_at", "<");
    }
    sql.push_str(&format!(" ORDER BY position LIMIT ${next}"));
    let mut query: QueryAs<'_, _, ExportRow, PgArguments> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(cursor.position)
        .bind(until)
        .bind(cursor.recorded_at);
    if let Some(owner) = filter.owner_id {
        query = query.bind(owner);
    }
    if let Some(stream) = filter.stream_id {
        query = query.bind(stream);
    }
    if let Some(event_type) = &filter.event_type {
        query = query.bind(event_type.clone());
    }
    if let Some(to) = filter.to {
        query = query.bind(to);
    }
    let rows = query.bind(limit).fetch_all(pool).await?;
    Ok(rows)
}

/// Reads pages ahead of the encoder (two in flight), so the database and the encoding work
/// at the same time.
fn spawn_page_reader(
    pool: PgPool,
    filter: HistoryFilter,
    until: i64,
    page_size: i64,
) -> mpsc::Receiver<Result<Vec<ExportRow>, ReadError>> {
    let (pages, received) = mpsc::channel(2);
    tokio::spawn(async move {
        let mut cursor = Cursor {
            position: filter.after.max(0),
            recorded_at: filter.from.unwrap_or(DateTime::<Utc>::UNIX_EPOCH),
        };
        loop {
            let page = read_page(&pool, &filter, until, cursor, page_size).await;
            let last = match &page {
                Ok(rows) => rows.last().map(|row| Cursor {
                    position: row.position,
                    recorded_at: row.recorded_at,
                }),
                Err(_) => None,
            };
            let full = matches!(&page, Ok(rows) if rows.len() as i64 == page_size);
            let failed = page.is_err();
            if (page.as_ref().is_ok_and(|rows| !rows.is_empty()) || failed) && pages.send(page).await.is_err() {
                return; // the consumer went away
            }
            match last {
                Some(last) if full => cursor = last,
                _ => return,
            }
        }
    });
    received
}

/// Data keys looked up during one export: read a page's worth at a time in one query, each
/// owner's key once while it stays cached. Bounded (keys are secrets and memory must not grow
/// with the number of users): when full it starts over.
#[derive(Debug)]
struct KeyCache {
    keys: PersonalDataKeys,
    cached: HashMap<Uuid, Option<Arc<DataKey>>>,
}

const KEY_CACHE_ENTRIES: usize = 1_024;
/// Rows whose owners' keys one query reads (at most this many keys, below the cache's bound).
const KEY_PREFETCH_ROWS: usize = 512;

impl KeyCache {
    /// Reads the keys of the owners of `rows` whose events hold personal data and that are
    /// not cached yet.
    async fn prefetch(&mut self, rows: &[ExportRow]) -> Result<(), PersonalDataError> {
        let mut wanted: Vec<Uuid> = rows
            .iter()
            .filter(|row| has_personal_fields(&row.event_type) && !self.cached.contains_key(&row.owner_id))
            .map(|row| row.owner_id)
            .collect();
        if wanted.is_empty() {
            return Ok(());
        }
        wanted.sort_unstable();
        wanted.dedup();
        if self.cached.len() + wanted.len() > KEY_CACHE_ENTRIES {
            self.cached.clear();
        }
        let mut found = self.keys.keys_for_reading(&wanted).await?;
        for owner_id in wanted {
            let key = found.remove(&owner_id).map(Arc::new);
            self.cached.insert(owner_id, key);
        }
        Ok(())
    }

    async fn get(&mut self, owner_id: Uuid) -> Result<Option<Arc<DataKey>>, PersonalDataError> {
        if let Some(key) = self.cached.get(&owner_id) {
            return Ok(key.clone());
        }
        let key = self.keys.key_for_reading(owner_id).await?.map(Arc::new);
        self.cached.insert(owner_id, key.clone());
        Ok(key)
    }
}

fn has_personal_fields(event_type: &str) -> bool {
    event_schema::kind_of(event_type).is_ok_and(|kind| !kind.personal_fields.is_empty())
}

/// The head position an export of `filter` stops at.
pub async fn export_until(pool: &PgPool, filter: &HistoryFilter) -> Result<i64, ReadError> {
    let head: i64 = sqlx::query_scalar("SELECT position FROM log_head")
        .fetch_one(pool)
        .await?;
    Ok(filter.until.map_or(head, |until| until.min(head)))
}

/// A running export: yields the file in chunks; after the last chunk (the trailer),
/// [`HistoryExport::summary`] tells what was written.
#[derive(Debug)]
pub struct HistoryExport {
    pages: mpsc::Receiver<Result<Vec<ExportRow>, ReadError>>,
    encoder: ExportEncoder,
    contiguous: bool,
    keys: Option<KeyCache>,
    chunk_bytes: usize,
    buffer: Vec<u8>,
    started: bool,
    finished: bool,
}

impl HistoryExport {
    /// Starts exporting `filter` up to the current head (or `filter.until`).
    pub async fn start(pool: PgPool, filter: HistoryFilter, options: ExportOptions) -> Result<Self, ExportError> {
        let until = export_until(&pool, &filter).await?;
        let contiguous = filter.is_contiguous();
        let pages = spawn_page_reader(pool, filter, until, options.page_size.max(1));
        Ok(HistoryExport {
            pages,
            encoder: ExportEncoder::new(options.format),
            contiguous,
            keys: options.personal.map(|keys| KeyCache {
                keys,
                cached: HashMap::new(),
            }),
            chunk_bytes: options.chunk_bytes.max(4096),
            buffer: Vec::new(),
            started: false,
            finished: false,
        })
    }

    /// The next chunk of the file; `None` after the trailer. A chunk holds whole records.
    pub async fn next_chunk(&mut self) -> Option<Result<Vec<u8>, ExportError>> {
        if self.finished {
            return None;
        }
        if !self.started {
            self.started = true;
            self.encoder.header(&mut self.buffer);
        }
        while self.buffer.len() < self.chunk_bytes {
            match self.pages.recv().await {
                Some(Ok(rows)) => {
                    if let Err(error) = self.encode_page(&rows).await {
                        self.finished = true;
                        return Some(Err(error));
                    }
                }
                Some(Err(error)) => {
                    self.finished = true;
                    return Some(Err(error.into()));
                }
                None => {
                    self.encoder.trailer(self.contiguous, &mut self.buffer);
                    self.finished = true;
                    break;
                }
            }
        }
        Some(Ok(std::mem::take(&mut self.buffer)))
    }

    async fn encode_page(&mut self, rows: &[ExportRow]) -> Result<(), ExportError> {
        // Keys are fetched for a slice of the page at a time, so no more than a slice's
        // worth of owners' keys is ever held at once, whatever the page size.
        for slice in rows.chunks(KEY_PREFETCH_ROWS) {
            if let Some(keys) = &mut self.keys {
                keys.prefetch(slice).await?;
            }
            for row in slice {
                let personal = match &mut self.keys {
                    Some(keys) => reveal(keys, row).await?,
                    None => None,
                };
                self.encoder.encode(row, personal.as_ref(), &mut self.buffer)?;
            }
        }
        metrics::counter!(crate::metrics_names::EXPORT_EVENTS_TOTAL).increment(rows.len() as u64);
        Ok(())
    }

    /// Events written so far.
    pub fn count(&self) -> u64 {
        self.encoder.count()
    }

    pub fn last_position(&self) -> Option<i64> {
        self.encoder.last_position()
    }

    /// What the trailer says (or will say).
    pub fn summary(&self) -> ExportTrailer {
        self.encoder.summary(self.contiguous)
    }

    /// The export as a stream of chunks (for an HTTP body).
    pub fn into_stream(self) -> impl Stream<Item = Result<Vec<u8>, ExportError>> + Send + 'static {
        futures::stream::unfold(self, |mut export| async move {
            let chunk = export.next_chunk().await?;
            Some((chunk, export))
        })
    }
}

/// The personal fields of a row as the export shows them; `None` when its type has none.
async fn reveal(keys: &mut KeyCache, row: &ExportRow) -> Result<Option<crate::export::Personal>, ExportError> {
    let fields = match event_schema::kind_of(&row.event_type) {
        Ok(kind) if !kind.personal_fields.is_empty() => kind.personal_fields,
        _ => return Ok(None),
    };
    let payload: serde_json::Value = serde_json::from_str(&row.payload).map_err(|e| ExportRowError::Corrupt {
        position: row.position,
        reason: format!("payload: {e}"),
    })?;
    let key = keys.get(row.owner_id).await?;
    Ok(crate::personal::reveal_fields(
        key.as_deref(),
        row.owner_id,
        fields,
        &payload,
    ))
}
