//! The audit export file format of the event log: a fast encoder (NDJSON and CSV) and a
//! streaming verifier of export files. No database code: the caller streams rows (as
//! [`ExportRow`]) from PostgreSQL into an [`ExportEncoder`] and writes the bytes out.
//!
//! # NDJSON (`application/x-ndjson`, `.ndjson`)
//!
//! One line per event, `\n`-terminated, holding exactly the JSON form of
//! [`EventEnvelope`] in its field order:
//!
//! ```text
//! {"position":7,"event_id":"…","stream_id":"…","stream_type":"device","stream_version":3,
//!  "event_type":"DeviceStarted","schema_version":1,"owner_id":"…",
//!  "occurred_at":"2026-11-26T23:07:51.123456Z","recorded_at":"2026-11-26T23:07:51.123456Z",
//!  "payload":{…},"metadata":{…},"prev_hash":"<64 hex>","hash":"<64 hex>"}
//! ```
//!
//! (one line in the file). Timestamps are RFC 3339 in UTC with exactly six fractional digits;
//! hashes are 64 lower-case hex digits; `payload` and `metadata` are PostgreSQL's text of the
//! stored `jsonb`, embedded verbatim (CR and LF, which valid JSON can only hold as
//! insignificant whitespace, become spaces so that an event stays on one line). An event with
//! personal fields carries one more member after `hash`: `"personal":{"status":"decrypted",
//! "values":{…}}` or `"personal":{"status":"erased"}`. It is shown beside the stored payload,
//! which keeps the ciphertext tokens the hash chain covers, and it is not covered by the chain.
//!
//! The last line is the trailer:
//!
//! ```text
//! {"trailer":{"format":"cloudphone.export.v1","count":N,"first_position":P|null,
//!  "last_position":P|null,"last_hash":"<64 hex>"|null,"contiguous":true|false}}
//! ```
//!
//! `contiguous` is the exporter's claim that every position in `first_position..=last_position`
//! is in the file (an export with no filter but a position or time range).
//!
//! # CSV (`text/csv; charset=utf-8`, `.csv`)
//!
//! RFC 4180 with `\r\n` record terminators (the RFC's; the verifier also accepts `\n`), UTF-8
//! without a byte order mark. A field is quoted when it contains a comma, a double quote, CR
//! or LF, with inner double quotes doubled; `payload`, `metadata`, `personal` and the trailer
//! object are always quoted. Columns ([`CSV_COLUMNS`]):
//!
//! ```text
//! record,position,event_id,stream_id,stream_type,stream_version,event_type,schema_version,
//! owner_id,occurred_at,recorded_at,payload,metadata,personal,prev_hash,hash
//! ```
//!
//! Event records have `record` = `event`, the values written as in NDJSON, `payload` and
//! `metadata` as their JSON text and `personal` as the object above or empty. The last record
//! has `record` = `trailer`, the trailer object (the inner object of the NDJSON trailer) in the
//! `payload` column and every other column empty. Every free-text cell but `event_type` and
//! `stream_type` starts with `{`, so a spreadsheet never reads a cell as a formula.
//!
//! # What verifying a file proves
//!
//! [`verify_export`] recomputes every event's hash from its fields and its `prev_hash`, checks
//! each `prev_hash` against the hash of the event before it wherever that event is in the file
//! (position exactly one less, or the genesis hash for position 1), that positions increase,
//! that a `contiguous` file has no gap, and that the trailer is there, last, and agrees with
//! the events. A file that verifies was not edited, truncated or reordered after export
//! *relative to its own chain*. It does not prove the chain is the log's: anyone can compute a
//! fresh chain. Anchor it by comparing [`ExportVerification::last_hash`] (and
//! [`ExportVerification::anchor`], the `prev_hash` the file starts from) with the log's hashes
//! at those positions. In a non-contiguous export (one owner's events), events whose
//! predecessor is not in the file are only checked against their own `prev_hash`, so each such
//! hash needs that comparison to be trusted.

use std::fmt;
use std::io;
use std::path::Path;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use event_schema::{ChainHash, EventEnvelope};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

mod encode;
mod read;
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod test_support;
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests;
mod verify;

pub use encode::{ExportEncoder, ExportRowError};
pub use read::{ExportLine, ExportReader, ExportRecord};
pub use verify::{ExportVerification, verify_export};

/// The `format` the trailer names.
pub const EXPORT_FORMAT_V1: &str = "cloudphone.export.v1";

/// The CSV columns, in order (the header record).
pub const CSV_COLUMNS: [&str; 16] = [
    "record",
    "position",
    "event_id",
    "stream_id",
    "stream_type",
    "stream_version",
    "event_type",
    "schema_version",
    "owner_id",
    "occurred_at",
    "recorded_at",
    "payload",
    "metadata",
    "personal",
    "prev_hash",
    "hash",
];

/// The longest line (NDJSON) or record (CSV) the verifier reads; beyond it a file is reported
/// unparsable, which bounds its memory whatever the input. PostgreSQL caps one `jsonb` value
/// at 255 MiB, and a record holds at most three of them.
pub const MAX_RECORD_BYTES: usize = 1 << 30;

const CSV_PAYLOAD_COLUMN: usize = 11;
const CSV_PERSONAL_COLUMN: usize = 13;

/// One stored event as the exporter reads it from PostgreSQL.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct ExportRow {
    pub position: i64,
    pub event_id: Uuid,
    pub stream_id: Uuid,
    pub stream_type: String,
    pub stream_version: i64,
    pub event_type: String,
    pub schema_version: i16,
    pub owner_id: Uuid,
    pub occurred_at: DateTime<Utc>,
    pub recorded_at: DateTime<Utc>,
    /// PostgreSQL's text form of the jsonb payload (`payload::text`), valid JSON as is.
    pub payload: String,
    /// Same for metadata.
    pub metadata: String,
    pub prev_hash: Vec<u8>,
    pub hash: Vec<u8>,
}

impl ExportRow {
    /// The row of an envelope already in memory, with compact JSON texts.
    pub fn from_envelope(envelope: &EventEnvelope) -> Self {
        // Serialising a `Value` or `EventMetadata` into a String cannot fail.
        let payload = serde_json::to_string(&envelope.payload).unwrap_or_else(|_| "null".to_owned());
        let metadata = serde_json::to_string(&envelope.metadata).unwrap_or_else(|_| "{}".to_owned());
        ExportRow {
            position: envelope.position,
            event_id: envelope.event_id,
            stream_id: envelope.stream_id,
            stream_type: envelope.stream_type.as_str().to_owned(),
            stream_version: envelope.stream_version,
            event_type: envelope.event_type.clone(),
            schema_version: i16::try_from(envelope.schema_version).unwrap_or(i16::MAX),
            owner_id: envelope.owner_id,
            occurred_at: envelope.occurred_at,
            recorded_at: envelope.recorded_at,
            payload,
            metadata,
            prev_hash: envelope.prev_hash.0.to_vec(),
            hash: envelope.hash.0.to_vec(),
        }
    }
}

/// The personal data of an event as the export shows it beside the stored payload.
#[derive(Clone, PartialEq)]
pub enum Personal {
    /// The personal fields, decrypted with the owner's key.
    Decrypted(Map<String, Value>),
    /// The owner was erased: the fields cannot be decrypted any more.
    Erased,
}

impl fmt::Debug for Personal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Field names only: the values are personal data and must not reach logs.
        match self {
            Personal::Decrypted(values) => f
                .debug_tuple("Decrypted")
                .field(&values.keys().map(|k| format!("{k}: <redacted>")).collect::<Vec<_>>())
                .finish(),
            Personal::Erased => f.write_str("Erased"),
        }
    }
}

/// The file format of an export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExportFormat {
    Ndjson,
    Csv,
}

/// A format name that is neither `ndjson` nor `csv`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown export format `{0}`; expected ndjson or csv")]
pub struct UnknownExportFormat(pub String);

impl ExportFormat {
    pub const ALL: [ExportFormat; 2] = [ExportFormat::Ndjson, ExportFormat::Csv];

    pub const fn as_str(self) -> &'static str {
        match self {
            ExportFormat::Ndjson => "ndjson",
            ExportFormat::Csv => "csv",
        }
    }

    /// The HTTP `Content-Type` of a file in this format.
    pub const fn content_type(self) -> &'static str {
        match self {
            ExportFormat::Ndjson => "application/x-ndjson",
            ExportFormat::Csv => "text/csv; charset=utf-8",
        }
    }

    /// The file name extension, without the dot.
    pub const fn file_extension(self) -> &'static str {
        self.as_str()
    }

    /// The format of a file name extension (`ndjson`, `jsonl` or `csv`, any case, with or
    /// without the leading dot).
    pub fn from_extension(extension: &str) -> Option<Self> {
        let extension = extension.strip_prefix('.').unwrap_or(extension);
        if extension.eq_ignore_ascii_case("ndjson") || extension.eq_ignore_ascii_case("jsonl") {
            Some(ExportFormat::Ndjson)
        } else if extension.eq_ignore_ascii_case("csv") {
            Some(ExportFormat::Csv)
        } else {
            None
        }
    }

    /// The format a file's name says, by its extension.
    pub fn from_path(path: &Path) -> Option<Self> {
        Self::from_extension(path.extension()?.to_str()?)
    }

    /// The format of a file from its first bytes (`BufRead::fill_buf` gives them without
    /// consuming): NDJSON starts with `{`, CSV with its header. `None` when neither.
    pub fn detect(first_bytes: &[u8]) -> Option<Self> {
        let bytes = first_bytes.strip_prefix(UTF8_BOM).unwrap_or(first_bytes);
        let start = bytes.iter().position(|b| !b.is_ascii_whitespace())?;
        let bytes = &bytes[start..];
        if bytes.starts_with(b"{") {
            Some(ExportFormat::Ndjson)
        } else if bytes.starts_with(b"record,") {
            Some(ExportFormat::Csv)
        } else {
            None
        }
    }
}

impl fmt::Display for ExportFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ExportFormat {
    type Err = UnknownExportFormat;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        ExportFormat::ALL
            .into_iter()
            .find(|format| format.as_str().eq_ignore_ascii_case(text))
            .ok_or_else(|| UnknownExportFormat(text.to_owned()))
    }
}

/// The last record of an export: what the file must hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportTrailer {
    /// [`EXPORT_FORMAT_V1`].
    pub format: String,
    pub count: u64,
    pub first_position: Option<i64>,
    pub last_position: Option<i64>,
    /// Hash of the last event.
    pub last_hash: Option<ChainHash>,
    /// Every position in `first_position..=last_position` is in the file.
    pub contiguous: bool,
}

// ---------------------------------------------------------------------------------------------
// Reading and verifying
// ---------------------------------------------------------------------------------------------

const UTF8_BOM: &[u8] = b"\xEF\xBB\xBF";

/// The first problem found in an export file. `line` is the 1-based line where the offending
/// record starts (a CSV record spans several lines when a quoted field holds line breaks).
#[derive(Debug, thiserror::Error)]
pub enum ExportFileError {
    #[error("line {line}: not a valid export record: {reason}")]
    Unparsable { line: u64, reason: String },
    #[error("line {line}: position {position} comes after position {previous}; positions must increase")]
    OutOfOrder { line: u64, position: i64, previous: i64 },
    #[error("line {line}: positions {} to {} are missing in an export that claims to be contiguous", after + 1, next - 1)]
    Gap { line: u64, after: i64, next: i64 },
    #[error("line {line}: position {position}: prev_hash {found} is not the previous event's hash {expected}")]
    PrevHashMismatch {
        line: u64,
        position: i64,
        expected: ChainHash,
        found: ChainHash,
    },
    #[error("line {line}: position {position}: hash {stored} does not match the recomputed {computed}")]
    HashMismatch {
        line: u64,
        position: i64,
        stored: ChainHash,
        computed: ChainHash,
    },
    #[error(
        "the file has no trailer: it was truncated after {} ({lines} lines read)",
        last_position.map_or_else(|| "its start".to_owned(), |p| format!("position {p}"))
    )]
    MissingTrailer { last_position: Option<i64>, lines: u64 },
    #[error("line {line}: the trailer says {field} is {claimed}, the file has {found}")]
    TrailerMismatch {
        line: u64,
        field: &'static str,
        claimed: String,
        found: String,
    },
    #[error("line {line}: data after the trailer")]
    TrailingData { line: u64 },
    #[error("reading the export failed: {0}")]
    Io(#[from] io::Error),
}

impl ExportFileError {
    /// The first position the file cannot vouch for, when the problem is tied to one.
    pub fn position(&self) -> Option<i64> {
        match self {
            ExportFileError::OutOfOrder { position, .. }
            | ExportFileError::PrevHashMismatch { position, .. }
            | ExportFileError::HashMismatch { position, .. } => Some(*position),
            ExportFileError::Gap { after, .. } => Some(after + 1),
            ExportFileError::MissingTrailer { last_position, .. } => Some(last_position.map_or(1, |p| p + 1)),
            _ => None,
        }
    }

    /// The line of the problem, when it has one.
    pub fn line(&self) -> Option<u64> {
        match self {
            ExportFileError::Unparsable { line, .. }
            | ExportFileError::OutOfOrder { line, .. }
            | ExportFileError::Gap { line, .. }
            | ExportFileError::PrevHashMismatch { line, .. }
            | ExportFileError::HashMismatch { line, .. }
            | ExportFileError::TrailerMismatch { line, .. }
            | ExportFileError::TrailingData { line } => Some(*line),
            ExportFileError::MissingTrailer { .. } | ExportFileError::Io(_) => None,
        }
    }
}
