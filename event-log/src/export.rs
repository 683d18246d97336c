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
use std::io::{self, BufRead};
use std::path::Path;
use std::str::FromStr;

use chrono::{DateTime, Datelike, SecondsFormat, Timelike, Utc};
use event_schema::canonical::envelope_bytes;
use event_schema::{ChainHash, EventEnvelope, EventMetadata, StreamType};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::chain::chain_hash;

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

/// A row the encoder refuses: it could not be read back as an [`EventEnvelope`], or it came
/// out of position order. Nothing is written for it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExportRowError {
    /// A stored row that does not form a valid envelope (tampering, or a bug).
    #[error("event at position {position} is corrupt: {reason}")]
    Corrupt { position: i64, reason: String },
    #[error("position {position} comes after position {previous}: rows must be in increasing position order")]
    OutOfOrder { position: i64, previous: i64 },
}

/// Encodes rows into an export file, one row at a time, into a caller's reused buffer.
///
/// ```text
/// encoder.header(&mut buf);                       // then, for every row in position order:
/// encoder.encode(&row, personal.as_ref(), &mut buf)?;   // flush buf when it is large enough
/// encoder.trailer(contiguous, &mut buf);
/// ```
#[derive(Debug, Clone)]
pub struct ExportEncoder {
    format: ExportFormat,
    count: u64,
    first_position: Option<i64>,
    last_position: Option<i64>,
    last_hash: Option<ChainHash>,
    gaps: u64,
    /// Personal JSON for CSV before quoting; reused.
    scratch: Vec<u8>,
}

impl ExportEncoder {
    pub fn new(format: ExportFormat) -> Self {
        ExportEncoder {
            format,
            count: 0,
            first_position: None,
            last_position: None,
            last_hash: None,
            gaps: 0,
            scratch: Vec::new(),
        }
    }

    pub fn format(&self) -> ExportFormat {
        self.format
    }

    /// Writes what precedes the first event: the header record for CSV, nothing for NDJSON.
    pub fn header(&self, out: &mut Vec<u8>) {
        if self.format == ExportFormat::Csv {
            for (i, column) in CSV_COLUMNS.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(column.as_bytes());
            }
            out.extend_from_slice(b"\r\n");
        }
    }

    /// Appends one event to `out`. Rows must come in increasing position order. `personal` is
    /// `None` for an event without personal fields.
    pub fn encode(
        &mut self,
        row: &ExportRow,
        personal: Option<&Personal>,
        out: &mut Vec<u8>,
    ) -> Result<(), ExportRowError> {
        let corrupt = |reason: &str| ExportRowError::Corrupt {
            position: row.position,
            reason: reason.to_owned(),
        };
        let prev_hash = ChainHash::from_slice(&row.prev_hash).ok_or_else(|| corrupt("prev_hash is not 32 bytes"))?;
        let hash = ChainHash::from_slice(&row.hash).ok_or_else(|| corrupt("hash is not 32 bytes"))?;
        if row.schema_version < 0 {
            return Err(corrupt("negative schema_version"));
        }
        if row.stream_type.parse::<StreamType>().is_err() {
            return Err(corrupt("unknown stream_type"));
        }
        if let Some(previous) = self.last_position {
            if row.position <= previous {
                return Err(ExportRowError::OutOfOrder {
                    position: row.position,
                    previous,
                });
            }
            if row.position != previous + 1 {
                self.gaps += 1;
            }
        }
        out.reserve(400 + row.payload.len() + row.metadata.len());
        match self.format {
            ExportFormat::Ndjson => write_ndjson_event(row, &prev_hash, &hash, personal, out),
            ExportFormat::Csv => write_csv_event(row, &prev_hash, &hash, personal, &mut self.scratch, out),
        }
        self.count += 1;
        self.first_position.get_or_insert(row.position);
        self.last_position = Some(row.position);
        self.last_hash = Some(hash);
        Ok(())
    }

    /// The trailer of what was encoded so far; `contiguous` as [`ExportTrailer::contiguous`].
    pub fn summary(&self, contiguous: bool) -> ExportTrailer {
        ExportTrailer {
            format: EXPORT_FORMAT_V1.to_owned(),
            count: self.count,
            first_position: self.first_position,
            last_position: self.last_position,
            last_hash: self.last_hash,
            contiguous,
        }
    }

    /// Writes the trailer, the last record of the file. `contiguous`: the export had no
    /// filter but a position or time range, so every position in first..=last must be in the
    /// file (see [`ExportEncoder::gaps`] for what was actually seen).
    pub fn trailer(&self, contiguous: bool, out: &mut Vec<u8>) {
        let mut object = Vec::with_capacity(192);
        // Serialising this struct into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut object, &self.summary(contiguous));
        match self.format {
            ExportFormat::Ndjson => {
                out.extend_from_slice(b"{\"trailer\":");
                out.extend_from_slice(&object);
                out.extend_from_slice(b"}\n");
            }
            ExportFormat::Csv => {
                out.extend_from_slice(b"trailer");
                out.extend_from_slice(&[b','; CSV_PAYLOAD_COLUMN]);
                write_csv_quoted(out, &object);
                out.extend_from_slice(&[b','; CSV_COLUMNS.len() - 1 - CSV_PAYLOAD_COLUMN]);
                out.extend_from_slice(b"\r\n");
            }
        }
    }

    /// Events encoded so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn first_position(&self) -> Option<i64> {
        self.first_position
    }

    pub fn last_position(&self) -> Option<i64> {
        self.last_position
    }

    pub fn last_hash(&self) -> Option<ChainHash> {
        self.last_hash
    }

    /// How many times a row's position was not the previous one + 1. A trailer claiming
    /// `contiguous` over a gap makes a file the verifier rejects.
    pub fn gaps(&self) -> u64 {
        self.gaps
    }
}

fn write_ndjson_event(
    row: &ExportRow,
    prev_hash: &ChainHash,
    hash: &ChainHash,
    personal: Option<&Personal>,
    out: &mut Vec<u8>,
) {
    out.extend_from_slice(b"{\"position\":");
    write_i64(out, row.position);
    out.extend_from_slice(b",\"event_id\":\"");
    write_uuid(out, &row.event_id);
    out.extend_from_slice(b"\",\"stream_id\":\"");
    write_uuid(out, &row.stream_id);
    out.extend_from_slice(b"\",\"stream_type\":");
    write_json_str(out, &row.stream_type);
    out.extend_from_slice(b",\"stream_version\":");
    write_i64(out, row.stream_version);
    out.extend_from_slice(b",\"event_type\":");
    write_json_str(out, &row.event_type);
    out.extend_from_slice(b",\"schema_version\":");
    write_i64(out, i64::from(row.schema_version));
    out.extend_from_slice(b",\"owner_id\":\"");
    write_uuid(out, &row.owner_id);
    out.extend_from_slice(b"\",\"occurred_at\":\"");
    write_timestamp(out, &row.occurred_at);
    out.extend_from_slice(b"\",\"recorded_at\":\"");
    write_timestamp(out, &row.recorded_at);
    out.extend_from_slice(b"\",\"payload\":");
    write_json_on_one_line(out, &row.payload);
    out.extend_from_slice(b",\"metadata\":");
    write_json_on_one_line(out, &row.metadata);
    out.extend_from_slice(b",\"prev_hash\":\"");
    write_hex(out, prev_hash);
    out.extend_from_slice(b"\",\"hash\":\"");
    write_hex(out, hash);
    out.push(b'"');
    if let Some(personal) = personal {
        out.extend_from_slice(b",\"personal\":");
        write_personal(out, personal);
    }
    out.extend_from_slice(b"}\n");
}

fn write_csv_event(
    row: &ExportRow,
    prev_hash: &ChainHash,
    hash: &ChainHash,
    personal: Option<&Personal>,
    scratch: &mut Vec<u8>,
    out: &mut Vec<u8>,
) {
    out.extend_from_slice(b"event,");
    write_i64(out, row.position);
    out.push(b',');
    write_uuid(out, &row.event_id);
    out.push(b',');
    write_uuid(out, &row.stream_id);
    out.push(b',');
    write_csv_field(out, row.stream_type.as_bytes());
    out.push(b',');
    write_i64(out, row.stream_version);
    out.push(b',');
    write_csv_field(out, row.event_type.as_bytes());
    out.push(b',');
    write_i64(out, i64::from(row.schema_version));
    out.push(b',');
    write_uuid(out, &row.owner_id);
    out.push(b',');
    write_timestamp(out, &row.occurred_at);
    out.push(b',');
    write_timestamp(out, &row.recorded_at);
    out.push(b',');
    write_csv_quoted(out, row.payload.as_bytes());
    out.push(b',');
    write_csv_quoted(out, row.metadata.as_bytes());
    out.push(b',');
    if let Some(personal) = personal {
        scratch.clear();
        write_personal(scratch, personal);
        write_csv_quoted(out, scratch);
    }
    out.push(b',');
    write_hex(out, prev_hash);
    out.push(b',');
    write_hex(out, hash);
    out.extend_from_slice(b"\r\n");
}

fn write_personal(out: &mut Vec<u8>, personal: &Personal) {
    match personal {
        Personal::Decrypted(values) => {
            out.extend_from_slice(b"{\"status\":\"decrypted\",\"values\":");
            // Serialising a map of JSON values into a Vec cannot fail.
            let _ = serde_json::to_writer(&mut *out, values);
            out.push(b'}');
        }
        Personal::Erased => out.extend_from_slice(b"{\"status\":\"erased\"}"),
    }
}

/// Valid JSON holds CR and LF only as whitespace between tokens (inside strings they must be
/// escaped), so turning them into spaces keeps the value and keeps an NDJSON event on one line.
fn write_json_on_one_line(out: &mut Vec<u8>, json: &str) {
    let start = out.len();
    out.extend_from_slice(json.as_bytes());
    if contains_line_break(json.as_bytes()) {
        for byte in &mut out[start..] {
            if *byte == b'\n' || *byte == b'\r' {
                *byte = b' ';
            }
        }
    }
}

/// Whether `bytes` holds CR or LF; fixed-size chunks without an early exit inside, so that the
/// compiler vectorises the scan (a byte-by-byte `any` was half of the NDJSON encoding time).
fn contains_line_break(bytes: &[u8]) -> bool {
    let mut chunks = bytes.chunks_exact(32);
    for chunk in &mut chunks {
        let mut found = 0u8;
        for &byte in chunk {
            found |= u8::from(byte == b'\n') | u8::from(byte == b'\r');
        }
        if found != 0 {
            return true;
        }
    }
    chunks.remainder().iter().any(|&b| b == b'\n' || b == b'\r')
}

const HEX_DIGITS: &[u8; 16] = b"0123456789abcdef";

fn write_hex(out: &mut Vec<u8>, hash: &ChainHash) {
    let mut text = [0u8; 64];
    for (pair, byte) in text.chunks_exact_mut(2).zip(hash.0) {
        pair[0] = HEX_DIGITS[usize::from(byte >> 4)];
        pair[1] = HEX_DIGITS[usize::from(byte & 0xf)];
    }
    out.extend_from_slice(&text);
}

fn write_uuid(out: &mut Vec<u8>, id: &Uuid) {
    let mut text = [0u8; uuid::fmt::Hyphenated::LENGTH];
    out.extend_from_slice(id.hyphenated().encode_lower(&mut text).as_bytes());
}

fn write_i64(out: &mut Vec<u8>, value: i64) {
    let mut digits = [0u8; 20];
    let mut start = digits.len();
    let mut rest = value.unsigned_abs();
    loop {
        start -= 1;
        digits[start] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    if value < 0 {
        out.push(b'-');
    }
    out.extend_from_slice(&digits[start..]);
}

/// `YYYY-MM-DDTHH:MM:SS.ffffffZ`: microseconds, as PostgreSQL stores them and the hash covers
/// (the same truncation as `timestamp_micros`, which the canonical bytes use).
fn write_timestamp(out: &mut Vec<u8>, at: &DateTime<Utc>) {
    let naive = at.naive_utc();
    let nanos = naive.nanosecond();
    let Ok(year) = u32::try_from(naive.year()) else {
        return write_timestamp_by_chrono(out, at);
    };
    if year > 9999 || nanos >= 1_000_000_000 {
        return write_timestamp_by_chrono(out, at);
    }
    let seconds = naive.num_seconds_from_midnight();
    let micros = nanos / 1000;
    let mut text = *b"0000-00-00T00:00:00.000000Z";
    put_pair(&mut text[0..2], year / 100);
    put_pair(&mut text[2..4], year % 100);
    put_pair(&mut text[5..7], naive.month());
    put_pair(&mut text[8..10], naive.day());
    put_pair(&mut text[11..13], seconds / 3600);
    put_pair(&mut text[14..16], seconds / 60 % 60);
    put_pair(&mut text[17..19], seconds % 60);
    put_pair(&mut text[20..22], micros / 10_000);
    put_pair(&mut text[22..24], micros / 100 % 100);
    put_pair(&mut text[24..26], micros % 100);
    out.extend_from_slice(&text);
}

/// Years RFC 3339 cannot write with four digits, and leap seconds: chrono knows how.
fn write_timestamp_by_chrono(out: &mut Vec<u8>, at: &DateTime<Utc>) {
    out.extend_from_slice(at.to_rfc3339_opts(SecondsFormat::Micros, true).as_bytes());
}

/// "00" "01" ... "99".
const DIGIT_PAIRS: [u8; 200] = {
    let mut pairs = [0u8; 200];
    let mut i = 0;
    while i < 100 {
        pairs[2 * i] = b'0' + (i / 10) as u8;
        pairs[2 * i + 1] = b'0' + (i % 10) as u8;
        i += 1;
    }
    pairs
};

/// Writes `value` (< 100) as two digits into the two-byte `slot`.
fn put_pair(slot: &mut [u8], value: u32) {
    let i = value as usize * 2;
    slot.copy_from_slice(&DIGIT_PAIRS[i..i + 2]);
}

/// A JSON string literal, escaped exactly as `serde_json` escapes it.
fn write_json_str(out: &mut Vec<u8>, text: &str) {
    out.push(b'"');
    let bytes = text.as_bytes();
    let mut start = 0;
    for (i, &byte) in bytes.iter().enumerate() {
        let escaped: &[u8] = match byte {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0x00..=0x1f => &[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX_DIGITS[usize::from(byte >> 4)],
                HEX_DIGITS[usize::from(byte & 0xf)],
            ],
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        out.extend_from_slice(escaped);
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// A CSV field, quoted only when it has to be.
fn write_csv_field(out: &mut Vec<u8>, field: &[u8]) {
    if field.iter().any(|&b| matches!(b, b',' | b'"' | b'\r' | b'\n')) {
        write_csv_quoted(out, field);
    } else {
        out.extend_from_slice(field);
    }
}

fn write_csv_quoted(out: &mut Vec<u8>, field: &[u8]) {
    // Copying the runs between quotes measured faster than a byte loop (payloads have a quote
    // every few bytes, and the byte loop's output index is a dependency chain).
    out.push(b'"');
    for (i, run) in field.split(|&b| b == b'"').enumerate() {
        if i > 0 {
            out.extend_from_slice(b"\"\"");
        }
        out.extend_from_slice(run);
    }
    out.push(b'"');
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

/// What a verified export file holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportVerification {
    pub count: u64,
    pub first_position: Option<i64>,
    pub last_position: Option<i64>,
    /// Hash of the last event: compare it with the log's hash at `last_position`.
    pub last_hash: Option<ChainHash>,
    /// `prev_hash` of the first event: the hash of the position before the file, which the
    /// file cannot check (the genesis hash when the file starts at position 1).
    pub anchor: Option<ChainHash>,
    /// What the trailer claims, verified when true.
    pub contiguous: bool,
    /// How many times a position was not the previous one + 1 (0 when contiguous).
    pub gaps: u64,
}

/// One record of an export file.
#[derive(Debug, Clone, PartialEq)]
#[allow(clippy::large_enum_variant)] // one trailer per file; boxing every event costs more
pub enum ExportRecord {
    /// An event (its `personal` member or column is not read).
    Event(EventEnvelope),
    Trailer(ExportTrailer),
}

/// A record and the line it starts on.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportLine {
    pub line: u64,
    pub record: ExportRecord,
}

/// Reads the records of an export file one by one, in constant memory (one record at a time,
/// at most [`MAX_RECORD_BYTES`]). Yields [`ExportFileError::Unparsable`] for a record that
/// does not parse and carries on with the next; stops after an I/O error.
#[derive(Debug)]
pub struct ExportReader<R> {
    reader: R,
    format: ExportFormat,
    /// The raw bytes of the current record.
    raw: Vec<u8>,
    /// CSV: the unquoted fields of the current record, back to back, and their bounds.
    fields: Vec<u8>,
    bounds: Vec<(usize, usize)>,
    lines: u64,
    started: bool,
    failed: bool,
}

/// The outer object of the NDJSON trailer line.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TrailerLine {
    trailer: ExportTrailer,
}

/// Tells a malformed trailer line from a malformed event line.
#[derive(Deserialize)]
struct TrailerProbe {
    trailer: Option<serde::de::IgnoredAny>,
}

impl<R: BufRead> ExportReader<R> {
    pub fn new(reader: R, format: ExportFormat) -> Self {
        ExportReader {
            reader,
            format,
            raw: Vec::new(),
            fields: Vec::new(),
            bounds: Vec::new(),
            lines: 0,
            started: false,
            failed: false,
        }
    }

    /// Lines read so far.
    pub fn lines_read(&self) -> u64 {
        self.lines
    }

    /// Reads the next record's raw bytes into `self.raw` without its terminator. Returns the
    /// line it starts on, or None at the end of the input.
    fn next_raw(&mut self) -> Result<Option<u64>, ExportFileError> {
        self.raw.clear();
        let first_line = self.lines + 1;
        let mut quotes = 0usize;
        let mut too_long = false;
        loop {
            let read = read_line_limited(&mut self.reader, &mut self.raw, self.format == ExportFormat::Csv)?;
            if read.consumed == 0 {
                break;
            }
            self.lines += 1;
            quotes += read.quotes;
            too_long |= read.dropped;
            // A CSV record goes on while a quoted field is open (an odd number of quotes).
            if self.format == ExportFormat::Ndjson || quotes.is_multiple_of(2) || !read.newline {
                break;
            }
        }
        if self.lines < first_line {
            return Ok(None);
        }
        if too_long {
            return Err(ExportFileError::Unparsable {
                line: first_line,
                reason: format!("record longer than {MAX_RECORD_BYTES} bytes"),
            });
        }
        if self.raw.last() == Some(&b'\n') {
            self.raw.pop();
            if self.raw.last() == Some(&b'\r') {
                self.raw.pop();
            }
        }
        if first_line == 1 && self.raw.starts_with(UTF8_BOM) {
            self.raw.drain(..UTF8_BOM.len());
        }
        Ok(Some(first_line))
    }

    fn parse_ndjson(&self) -> Result<ExportRecord, String> {
        if self.raw.iter().all(u8::is_ascii_whitespace) {
            return Err("empty line".to_owned());
        }
        match serde_json::from_slice::<EventEnvelope>(&self.raw) {
            Ok(event) => Ok(ExportRecord::Event(event)),
            Err(event_error) => match serde_json::from_slice::<TrailerLine>(&self.raw) {
                Ok(line) => Ok(ExportRecord::Trailer(line.trailer)),
                Err(trailer_error) => {
                    let is_trailer =
                        serde_json::from_slice::<TrailerProbe>(&self.raw).is_ok_and(|probe| probe.trailer.is_some());
                    Err(if is_trailer {
                        format!("trailer: {trailer_error}")
                    } else {
                        format!("event: {event_error}")
                    })
                }
            },
        }
    }

    fn csv_field<'a>(&self, text: &'a str, index: usize) -> &'a str {
        let (start, end) = self.bounds[index];
        &text[start..end]
    }

    /// Splits the CSV record in `self.raw` and checks it has the 16 columns.
    fn split_csv(&mut self) -> Result<(), String> {
        split_csv_record(&self.raw, &mut self.fields, &mut self.bounds)?;
        if self.bounds.len() != CSV_COLUMNS.len() {
            return Err(format!("{} fields, expected {}", self.bounds.len(), CSV_COLUMNS.len()));
        }
        Ok(())
    }

    fn parse_csv_header(&mut self) -> Result<(), String> {
        self.split_csv()?;
        let text = std::str::from_utf8(&self.fields).map_err(|e| e.to_string())?;
        for (i, column) in CSV_COLUMNS.iter().enumerate() {
            if self.csv_field(text, i) != *column {
                return Err(format!("header column {} is not `{column}`", i + 1));
            }
        }
        Ok(())
    }

    fn parse_csv(&mut self) -> Result<ExportRecord, String> {
        self.split_csv()?;
        let text = std::str::from_utf8(&self.fields).map_err(|e| e.to_string())?;
        let field = |i: usize| self.csv_field(text, i);
        match field(0) {
            "event" => parse_csv_event(&field).map(ExportRecord::Event),
            "trailer" => {
                if let Some(i) = (1..CSV_COLUMNS.len()).find(|&i| i != CSV_PAYLOAD_COLUMN && !field(i).is_empty()) {
                    return Err(format!("trailer: column `{}` is not empty", CSV_COLUMNS[i]));
                }
                serde_json::from_str(field(CSV_PAYLOAD_COLUMN))
                    .map(ExportRecord::Trailer)
                    .map_err(|e| format!("trailer: {e}"))
            }
            other => Err(format!("record type `{other}`, expected `event` or `trailer`")),
        }
    }
}

impl<R: BufRead> Iterator for ExportReader<R> {
    type Item = Result<ExportLine, ExportFileError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        loop {
            let line = match self.next_raw() {
                Ok(Some(line)) => line,
                Ok(None) => return None,
                Err(error) => {
                    self.failed = matches!(error, ExportFileError::Io(_));
                    return Some(Err(error));
                }
            };
            let parsed = match self.format {
                ExportFormat::Ndjson => self.parse_ndjson(),
                ExportFormat::Csv if !self.started => {
                    self.started = true;
                    match self.parse_csv_header() {
                        Ok(()) => continue,
                        Err(reason) => Err(format!("not the export's CSV header: {reason}")),
                    }
                }
                ExportFormat::Csv => self.parse_csv(),
            };
            self.started = true;
            return Some(
                parsed
                    .map(|record| ExportLine { line, record })
                    .map_err(|reason| ExportFileError::Unparsable { line, reason }),
            );
        }
    }
}

struct LineRead {
    /// Bytes taken from the reader, terminator included.
    consumed: usize,
    /// Double quotes among them (counted only when asked).
    quotes: usize,
    /// Bytes beyond [`MAX_RECORD_BYTES`] were consumed but not kept.
    dropped: bool,
    /// The line ended with `\n` (rather than at the end of the input).
    newline: bool,
}

/// Appends the next line, `\n` included, to `buf` while `buf` stays within
/// [`MAX_RECORD_BYTES`]; the rest of a longer line is consumed and dropped.
fn read_line_limited(reader: &mut impl BufRead, buf: &mut Vec<u8>, count_quotes: bool) -> io::Result<LineRead> {
    let mut read = LineRead {
        consumed: 0,
        quotes: 0,
        dropped: false,
        newline: false,
    };
    loop {
        let available = match reader.fill_buf() {
            Ok(available) => available,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if available.is_empty() {
            return Ok(read);
        }
        let (chunk, done) = match available.iter().position(|&b| b == b'\n') {
            Some(i) => (&available[..=i], true),
            None => (available, false),
        };
        if count_quotes {
            read.quotes += chunk.iter().filter(|&&b| b == b'"').count();
        }
        let room = MAX_RECORD_BYTES.saturating_sub(buf.len());
        if chunk.len() > room {
            read.dropped = true;
        }
        buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
        let length = chunk.len();
        reader.consume(length);
        read.consumed += length;
        if done {
            read.newline = true;
            return Ok(read);
        }
    }
}

/// Splits one RFC 4180 record (without its terminator) into unquoted fields written back to
/// back into `fields`, with their byte ranges in `bounds`.
fn split_csv_record(record: &[u8], fields: &mut Vec<u8>, bounds: &mut Vec<(usize, usize)>) -> Result<(), String> {
    fields.clear();
    bounds.clear();
    let mut i = 0;
    loop {
        let start = fields.len();
        if record.get(i) == Some(&b'"') {
            i += 1;
            loop {
                let Some(offset) = record[i..].iter().position(|&b| b == b'"') else {
                    return Err(format!("field {} has no closing quote", bounds.len() + 1));
                };
                fields.extend_from_slice(&record[i..i + offset]);
                i += offset + 1;
                if record.get(i) == Some(&b'"') {
                    fields.push(b'"');
                    i += 1;
                } else {
                    break;
                }
            }
            bounds.push((start, fields.len()));
            match record.get(i) {
                None => return Ok(()),
                Some(b',') => i += 1,
                Some(_) => return Err(format!("field {} goes on after its closing quote", bounds.len())),
            }
        } else {
            let end = record[i..]
                .iter()
                .position(|&b| b == b',')
                .map_or(record.len(), |o| i + o);
            let field = &record[i..end];
            if field.iter().any(|&b| matches!(b, b'"' | b'\r' | b'\n')) {
                return Err(format!(
                    "field {} holds a quote or line break but is not quoted",
                    bounds.len() + 1
                ));
            }
            fields.extend_from_slice(field);
            bounds.push((start, fields.len()));
            if end == record.len() {
                return Ok(());
            }
            i = end + 1;
        }
    }
}

fn parse_csv_event<'a>(field: &impl Fn(usize) -> &'a str) -> Result<EventEnvelope, String> {
    fn parse<T: FromStr>(text: &str, column: usize) -> Result<T, String>
    where
        T::Err: fmt::Display,
    {
        text.parse::<T>().map_err(|e| format!("{}: {e}", CSV_COLUMNS[column]))
    }
    fn timestamp(text: &str, column: usize) -> Result<DateTime<Utc>, String> {
        DateTime::parse_from_rfc3339(text)
            .map(|at| at.with_timezone(&Utc))
            .map_err(|e| format!("{}: {e}", CSV_COLUMNS[column]))
    }
    fn hash(text: &str, column: usize) -> Result<ChainHash, String> {
        ChainHash::from_hex(text).ok_or_else(|| format!("{}: expected 64 hex digits", CSV_COLUMNS[column]))
    }
    let personal = field(CSV_PERSONAL_COLUMN);
    if !personal.is_empty() && !personal.starts_with('{') {
        return Err("personal: not a JSON object".to_owned());
    }
    Ok(EventEnvelope {
        position: parse(field(1), 1)?,
        event_id: parse(field(2), 2)?,
        stream_id: parse(field(3), 3)?,
        stream_type: parse(field(4), 4)?,
        stream_version: parse(field(5), 5)?,
        event_type: field(6).to_owned(),
        schema_version: parse(field(7), 7)?,
        owner_id: parse(field(8), 8)?,
        occurred_at: timestamp(field(9), 9)?,
        recorded_at: timestamp(field(10), 10)?,
        payload: serde_json::from_str::<Value>(field(11)).map_err(|e| format!("payload: {e}"))?,
        metadata: serde_json::from_str::<EventMetadata>(field(12)).map_err(|e| format!("metadata: {e}"))?,
        prev_hash: hash(field(14), 14)?,
        hash: hash(field(15), 15)?,
    })
}

/// Verifies an export file, streaming it in constant memory, and reports the first problem
/// (see the module documentation for what is checked and what that proves).
pub fn verify_export(reader: impl BufRead, format: ExportFormat) -> Result<ExportVerification, ExportFileError> {
    let mut records = ExportReader::new(reader, format);
    let mut chain = FileChain::default();
    loop {
        let problem = match records.next() {
            None => {
                return Err(ExportFileError::MissingTrailer {
                    last_position: chain.last.map(|last| last.position),
                    lines: records.lines_read(),
                });
            }
            Some(Err(problem)) => problem,
            Some(Ok(ExportLine {
                line,
                record: ExportRecord::Event(event),
            })) => match chain.check(line, &event) {
                Ok(()) => continue,
                Err(problem) => problem,
            },
            Some(Ok(ExportLine {
                line,
                record: ExportRecord::Trailer(trailer),
            })) => {
                let verification = chain.finish(line, &trailer)?;
                return match records.next() {
                    None => Ok(verification),
                    Some(Err(ExportFileError::Io(error))) => Err(ExportFileError::Io(error)),
                    Some(Ok(ExportLine { line, .. }) | Err(ExportFileError::Unparsable { line, .. })) => {
                        Err(ExportFileError::TrailingData { line })
                    }
                    Some(Err(_)) => Err(ExportFileError::TrailingData {
                        line: records.lines_read(),
                    }),
                };
            }
        };
        return Err(chain.first_problem(problem, &mut records));
    }
}

#[derive(Debug, Clone, Copy)]
struct Last {
    position: i64,
    hash: ChainHash,
}

/// The verifier's state: what it must remember of the events seen (constant size).
#[derive(Debug, Default)]
struct FileChain {
    count: u64,
    first: Option<(i64, ChainHash)>,
    last: Option<Last>,
    gaps: u64,
    /// The first gap, an error only if the trailer claims the file is contiguous.
    first_gap: Option<(u64, i64, i64)>,
}

impl FileChain {
    fn check(&mut self, line: u64, event: &EventEnvelope) -> Result<(), ExportFileError> {
        let position = event.position;
        let expected_prev = match self.last {
            Some(last) if position <= last.position => {
                return Err(ExportFileError::OutOfOrder {
                    line,
                    position,
                    previous: last.position,
                });
            }
            Some(last) if position == last.position + 1 => Some(last.hash),
            Some(last) => {
                self.gaps += 1;
                self.first_gap.get_or_insert((line, last.position, position));
                None
            }
            None if position < 1 => {
                return Err(ExportFileError::OutOfOrder {
                    line,
                    position,
                    previous: 0,
                });
            }
            None if position == 1 => Some(ChainHash::GENESIS),
            None => None,
        };
        if let Some(expected) = expected_prev
            && event.prev_hash != expected
        {
            return Err(ExportFileError::PrevHashMismatch {
                line,
                position,
                expected,
                found: event.prev_hash,
            });
        }
        let computed = chain_hash(&event.prev_hash, &envelope_bytes(event));
        if computed != event.hash {
            return Err(ExportFileError::HashMismatch {
                line,
                position,
                stored: event.hash,
                computed,
            });
        }
        self.count += 1;
        self.first.get_or_insert((position, event.prev_hash));
        self.last = Some(Last {
            position,
            hash: event.hash,
        });
        Ok(())
    }

    fn gap_error(&self) -> Option<ExportFileError> {
        self.first_gap
            .map(|(line, after, next)| ExportFileError::Gap { line, after, next })
    }

    fn finish(&self, line: u64, trailer: &ExportTrailer) -> Result<ExportVerification, ExportFileError> {
        fn shown<T: fmt::Display>(value: Option<T>) -> String {
            value.map_or_else(|| "null".to_owned(), |v| v.to_string())
        }
        let mismatch = |field: &'static str, claimed: String, found: String| ExportFileError::TrailerMismatch {
            line,
            field,
            claimed,
            found,
        };
        if trailer.format != EXPORT_FORMAT_V1 {
            return Err(mismatch("format", trailer.format.clone(), EXPORT_FORMAT_V1.to_owned()));
        }
        if trailer.contiguous
            && let Some(gap) = self.gap_error()
        {
            return Err(gap);
        }
        let first_position = self.first.map(|(position, _)| position);
        let last_position = self.last.map(|last| last.position);
        let last_hash = self.last.map(|last| last.hash);
        if trailer.count != self.count {
            return Err(mismatch("count", trailer.count.to_string(), self.count.to_string()));
        }
        if trailer.first_position != first_position {
            return Err(mismatch(
                "first_position",
                shown(trailer.first_position),
                shown(first_position),
            ));
        }
        if trailer.last_position != last_position {
            return Err(mismatch(
                "last_position",
                shown(trailer.last_position),
                shown(last_position),
            ));
        }
        if trailer.last_hash != last_hash {
            return Err(mismatch("last_hash", shown(trailer.last_hash), shown(last_hash)));
        }
        Ok(ExportVerification {
            count: self.count,
            first_position,
            last_position,
            last_hash,
            anchor: self.first.map(|(_, anchor)| anchor),
            contiguous: trailer.contiguous,
            gaps: self.gaps,
        })
    }

    /// `problem` was found after the file's first gap; the gap came first, and is the first
    /// problem if the trailer claims the file contiguous. Reads on to the trailer to know.
    fn first_problem<R: BufRead>(&self, problem: ExportFileError, records: &mut ExportReader<R>) -> ExportFileError {
        let Some(gap) = self.gap_error() else {
            return problem;
        };
        if matches!(problem, ExportFileError::Io(_)) {
            return problem;
        }
        for record in records {
            match record {
                Ok(ExportLine {
                    record: ExportRecord::Trailer(trailer),
                    ..
                }) => return if trailer.contiguous { gap } else { problem },
                Err(ExportFileError::Io(_)) => return problem,
                _ => {}
            }
        }
        problem
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use event_schema::{Actor, ActorRole};
    use proptest::prelude::*;
    use serde_json::json;

    /// How the JSON texts of a row are spelled.
    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Style {
        /// `serde_json::to_string`.
        Compact,
        /// What PostgreSQL's `jsonb::text` prints: keys by length then bytes, `", "` and `": "`.
        Postgres,
    }

    fn pg_text(value: &Value) -> String {
        match value {
            Value::Object(map) => {
                let mut entries: Vec<_> = map.iter().collect();
                entries.sort_by(|a, b| a.0.len().cmp(&b.0.len()).then(a.0.as_bytes().cmp(b.0.as_bytes())));
                let inner: Vec<String> = entries
                    .into_iter()
                    .map(|(k, v)| format!("{}: {}", serde_json::to_string(k).unwrap(), pg_text(v)))
                    .collect();
                format!("{{{}}}", inner.join(", "))
            }
            Value::Array(items) => format!("[{}]", items.iter().map(pg_text).collect::<Vec<_>>().join(", ")),
            other => serde_json::to_string(other).unwrap(),
        }
    }

    fn text(style: Style, value: &Value) -> String {
        match style {
            Style::Compact => serde_json::to_string(value).unwrap(),
            Style::Postgres => pg_text(value),
        }
    }

    fn row(envelope: &EventEnvelope, style: Style) -> ExportRow {
        ExportRow {
            payload: text(style, &envelope.payload),
            metadata: text(style, &serde_json::to_value(&envelope.metadata).unwrap()),
            ..ExportRow::from_envelope(envelope)
        }
    }

    fn at(micros: i64) -> DateTime<Utc> {
        DateTime::from_timestamp_micros(micros).unwrap()
    }

    /// An envelope whose hash is right for `prev_hash`.
    fn sealed(mut envelope: EventEnvelope) -> EventEnvelope {
        envelope.hash = chain_hash(&envelope.prev_hash, &envelope_bytes(&envelope));
        envelope
    }

    fn event(position: i64, prev_hash: ChainHash) -> EventEnvelope {
        sealed(EventEnvelope {
            position,
            event_id: Uuid::from_u128(0x1000 + position as u128),
            stream_id: Uuid::from_u128(0xd0 + (position % 2) as u128),
            stream_type: StreamType::Device,
            stream_version: (position + 1) / 2,
            event_type: "DeviceUsageRecorded".to_owned(),
            schema_version: 1,
            owner_id: Uuid::from_u128(0xaa),
            occurred_at: at(1_795_000_000_123_456 + position * 1_000_001),
            recorded_at: at(1_795_000_000_223_456 + position * 1_000_001),
            payload: json!({"minutes": position * 10, "amount": {"amount_minor": 7 * position, "currency": "EUR"}, "note": "a, \"b\"\nc"}),
            metadata: EventMetadata {
                correlation_id: Some(Uuid::from_u128(0xc0)),
                actor: Some(Actor {
                    role: ActorRole::User,
                    subject: "aa".to_owned(),
                }),
                trace_id: Some(format!("trace-{position}")),
                ..EventMetadata::default()
            },
            prev_hash,
            hash: ChainHash::GENESIS,
        })
    }

    /// Events at `positions`, chained where they are adjacent.
    fn chain_at(positions: &[i64]) -> Vec<EventEnvelope> {
        let mut events: Vec<EventEnvelope> = Vec::new();
        for &position in positions {
            let prev = match events.last() {
                Some(last) if last.position + 1 == position => last.hash,
                _ if position == 1 => ChainHash::GENESIS,
                _ => ChainHash([position as u8; 32]),
            };
            events.push(event(position, prev));
        }
        events
    }

    fn chain(count: i64) -> Vec<EventEnvelope> {
        chain_at(&(1..=count).collect::<Vec<_>>())
    }

    fn export_with(
        events: &[EventEnvelope],
        personal: &[Option<Personal>],
        format: ExportFormat,
        style: Style,
        contiguous: bool,
    ) -> Vec<u8> {
        let mut encoder = ExportEncoder::new(format);
        let mut out = Vec::new();
        encoder.header(&mut out);
        for (i, envelope) in events.iter().enumerate() {
            let personal = personal.get(i).and_then(Option::as_ref);
            encoder.encode(&row(envelope, style), personal, &mut out).unwrap();
        }
        encoder.trailer(contiguous, &mut out);
        out
    }

    fn export(events: &[EventEnvelope], format: ExportFormat, contiguous: bool) -> Vec<u8> {
        export_with(events, &[], format, Style::Compact, contiguous)
    }

    fn verify(file: &[u8], format: ExportFormat) -> Result<ExportVerification, ExportFileError> {
        verify_export(file, format)
    }

    fn read_all(file: &[u8], format: ExportFormat) -> Vec<ExportLine> {
        ExportReader::new(file, format).collect::<Result<Vec<_>, _>>().unwrap()
    }

    fn events_of(file: &[u8], format: ExportFormat) -> Vec<EventEnvelope> {
        read_all(file, format)
            .into_iter()
            .filter_map(|line| match line.record {
                ExportRecord::Event(event) => Some(event),
                ExportRecord::Trailer(_) => None,
            })
            .collect()
    }

    fn utf8(file: &[u8]) -> &str {
        std::str::from_utf8(file).unwrap()
    }

    fn expected_summary(events: &[EventEnvelope], contiguous: bool, gaps: u64) -> ExportVerification {
        ExportVerification {
            count: events.len() as u64,
            first_position: events.first().map(|e| e.position),
            last_position: events.last().map(|e| e.position),
            last_hash: events.last().map(|e| e.hash),
            anchor: events.first().map(|e| e.prev_hash),
            contiguous,
            gaps,
        }
    }

    #[test]
    fn an_ndjson_line_is_the_envelope_in_its_field_order() {
        let envelope = sealed(EventEnvelope {
            position: 42,
            event_id: Uuid::from_u128(1),
            stream_id: Uuid::from_u128(2),
            stream_type: StreamType::User,
            stream_version: 3,
            event_type: "UserRegistered".to_owned(),
            schema_version: 2,
            owner_id: Uuid::from_u128(4),
            occurred_at: Utc.with_ymd_and_hms(2026, 11, 26, 23, 7, 51).unwrap()
                + chrono::Duration::microseconds(123_456),
            recorded_at: Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap(),
            payload: json!({"b": "x", "a": 1}),
            metadata: EventMetadata::default(),
            prev_hash: ChainHash([0xab; 32]),
            hash: ChainHash::GENESIS,
        });
        let mut row = row(&envelope, Style::Postgres);
        assert_eq!(row.payload, r#"{"a": 1, "b": "x"}"#);
        row.stream_type = "user".to_owned();
        let mut out = Vec::new();
        ExportEncoder::new(ExportFormat::Ndjson)
            .encode(&row, Some(&Personal::Erased), &mut out)
            .unwrap();
        let expected = format!(
            concat!(
                r#"{{"position":42,"event_id":"00000000-0000-0000-0000-000000000001","#,
                r#""stream_id":"00000000-0000-0000-0000-000000000002","stream_type":"user","stream_version":3,"#,
                r#""event_type":"UserRegistered","schema_version":2,"owner_id":"00000000-0000-0000-0000-000000000004","#,
                r#""occurred_at":"2026-11-26T23:07:51.123456Z","recorded_at":"2026-01-02T03:04:05.000000Z","#,
                r#""payload":{{"a": 1, "b": "x"}},"metadata":{{}},"prev_hash":"{}","hash":"{}","#,
                r#""personal":{{"status":"erased"}}}}"#,
                "\n"
            ),
            "ab".repeat(32),
            envelope.hash.to_hex()
        );
        assert_eq!(utf8(&out), expected);
        let parsed: EventEnvelope = serde_json::from_slice(&out).unwrap();
        assert_eq!(parsed, envelope);
        // Same field order as serde's own serialisation of the envelope.
        let ours: Vec<String> = serde_json::from_slice::<Map<String, Value>>(&out)
            .unwrap()
            .keys()
            .cloned()
            .collect();
        let serde_order = [
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
            "prev_hash",
            "hash",
        ];
        let mut sorted_ours = ours.clone();
        sorted_ours.sort();
        let mut expected_keys: Vec<String> = serde_order.iter().map(|k| (*k).to_owned()).collect();
        expected_keys.push("personal".to_owned());
        expected_keys.sort();
        assert_eq!(sorted_ours, expected_keys);
        let envelope_json = serde_json::to_string(&envelope).unwrap();
        let mut last = 0;
        for key in serde_order {
            let at = envelope_json.find(&format!("\"{key}\":")).unwrap();
            assert!(at >= last, "{key} out of order in serde's output");
            last = at;
        }
    }

    #[test]
    fn a_csv_file_has_header_events_and_trailer() {
        let events = chain(2);
        let file = export(&events, ExportFormat::Csv, true);
        let text = utf8(&file);
        let records: Vec<&str> = text.split_terminator("\r\n").collect();
        assert_eq!(records[0], CSV_COLUMNS.join(","));
        assert!(
            records[1].starts_with("event,1,00000000-0000-0000-0000-000000001001,"),
            "{}",
            records[1]
        );
        assert!(
            records[1].contains(r#","{""amount"":{""amount_minor"":7,""currency"":""EUR""},"#),
            "{}",
            records[1]
        );
        assert!(
            records[1].ends_with(&format!(
                ",,{},{}",
                ChainHash::GENESIS.to_hex(),
                events[0].hash.to_hex()
            )),
            "{}",
            records[1]
        );
        let trailer = records.last().unwrap();
        assert_eq!(
            *trailer,
            format!(
                r#"trailer,,,,,,,,,,,"{{""format"":""cloudphone.export.v1"",""count"":2,""first_position"":1,""last_position"":2,""last_hash"":""{}"",""contiguous"":true}}",,,,"#,
                events[1].hash.to_hex()
            )
        );
        assert!(text.ends_with("\r\n"));
    }

    #[test]
    fn both_formats_verify_and_read_back_the_envelopes() {
        let events = chain(6);
        for format in ExportFormat::ALL {
            for style in [Style::Compact, Style::Postgres] {
                let file = export_with(&events, &[], format, style, true);
                assert_eq!(
                    verify(&file, format).unwrap(),
                    expected_summary(&events, true, 0),
                    "{format} {style:?}"
                );
                assert_eq!(events_of(&file, format), events, "{format} {style:?}");
            }
        }
    }

    #[test]
    fn ndjson_lines_parse_as_envelopes_equal_to_the_originals() {
        let events = chain(4);
        let file = export_with(&events, &[], ExportFormat::Ndjson, Style::Postgres, true);
        let lines: Vec<&str> = utf8(&file).lines().collect();
        assert_eq!(lines.len(), events.len() + 1);
        for (line, original) in lines.iter().zip(&events) {
            let parsed: EventEnvelope = serde_json::from_str(line).unwrap();
            assert_eq!(&parsed, original);
        }
        let trailer: Value = serde_json::from_str(lines[4]).unwrap();
        assert_eq!(
            trailer,
            json!({"trailer": {"format": "cloudphone.export.v1", "count": 4, "first_position": 1,
                "last_position": 4, "last_hash": events[3].hash.to_hex(), "contiguous": true}})
        );
    }

    #[test]
    fn an_empty_export_verifies() {
        for format in ExportFormat::ALL {
            let file = export(&[], format, true);
            assert_eq!(verify(&file, format).unwrap(), expected_summary(&[], true, 0));
        }
        assert_eq!(
            utf8(&export(&[], ExportFormat::Ndjson, false)),
            "{\"trailer\":{\"format\":\"cloudphone.export.v1\",\"count\":0,\"first_position\":null,\
             \"last_position\":null,\"last_hash\":null,\"contiguous\":false}}\n"
        );
    }

    #[test]
    fn personal_data_is_shown_beside_the_payload_and_not_verified() {
        let events = chain(3);
        let mut values = Map::new();
        values.insert("email".to_owned(), json!("ada@example.com, \"x\"\n"));
        let personal = [Some(Personal::Decrypted(values)), None, Some(Personal::Erased)];
        for format in ExportFormat::ALL {
            let file = export_with(&events, &personal, format, Style::Compact, true);
            assert_eq!(verify(&file, format).unwrap(), expected_summary(&events, true, 0));
            assert_eq!(events_of(&file, format), events);
        }
        let file = export_with(&events, &personal, ExportFormat::Ndjson, Style::Compact, true);
        let lines: Vec<Value> = utf8(&file).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(
            lines[0]["personal"],
            json!({"status": "decrypted", "values": {"email": "ada@example.com, \"x\"\n"}})
        );
        assert!(lines[1].get("personal").is_none());
        assert_eq!(lines[2]["personal"], json!({"status": "erased"}));

        let file = export_with(&events, &personal, ExportFormat::Csv, Style::Compact, true);
        let mut fields = Vec::new();
        let mut bounds = Vec::new();
        let records: Vec<&str> = utf8(&file).split_terminator("\r\n").collect();
        // No record holds a raw line break here (the JSON texts escape theirs), so records
        // split on CRLF stay whole.
        split_csv_record(records[1].as_bytes(), &mut fields, &mut bounds).unwrap();
        let (start, end) = bounds[CSV_PERSONAL_COLUMN];
        let shown: Value = serde_json::from_slice(&fields[start..end]).unwrap();
        assert_eq!(shown["values"]["email"], json!("ada@example.com, \"x\"\n"));
        split_csv_record(records[2].as_bytes(), &mut fields, &mut bounds).unwrap();
        assert_eq!(bounds[CSV_PERSONAL_COLUMN].0, bounds[CSV_PERSONAL_COLUMN].1);
    }

    #[test]
    fn personal_debug_does_not_show_values() {
        let mut values = Map::new();
        values.insert("email".to_owned(), json!("ada@example.com"));
        let shown = format!("{:?}", Personal::Decrypted(values));
        assert!(shown.contains("email") && !shown.contains("ada"), "{shown}");
    }

    #[test]
    fn csv_fields_with_commas_quotes_and_line_breaks_round_trip() {
        let mut events = chain(3);
        let tricky = "Odd, \"quoted\"\r\nand\nlines,\ttab \\ é";
        events[1].event_type = tricky.to_owned();
        events[1].payload = json!({"text": tricky, "list": [",", "\"", "\r\n"]});
        events[1] = sealed(events[1].clone());
        events[2].prev_hash = events[1].hash;
        events[2] = sealed(events[2].clone());
        for format in ExportFormat::ALL {
            let file = export(&events, format, true);
            assert_eq!(
                verify(&file, format).unwrap(),
                expected_summary(&events, true, 0),
                "{format}"
            );
            assert_eq!(events_of(&file, format), events, "{format}");
            let lines = read_all(&file, format);
            // The CSV header is line 1; the tricky event type spans lines 3 to 5.
            let expected_lines: &[u64] = match format {
                ExportFormat::Ndjson => &[1, 2, 3, 4],
                ExportFormat::Csv => &[2, 3, 6, 7],
            };
            assert_eq!(
                lines.iter().map(|l| l.line).collect::<Vec<_>>(),
                expected_lines,
                "{format}"
            );
        }
        // NDJSON keeps one event per line.
        assert_eq!(utf8(&export(&events, ExportFormat::Ndjson, true)).lines().count(), 4);
    }

    #[test]
    fn a_multi_line_payload_text_stays_on_one_ndjson_line() {
        let events = chain(2);
        let mut rows: Vec<ExportRow> = events.iter().map(|e| row(e, Style::Compact)).collect();
        rows[0].payload = serde_json::to_string_pretty(&events[0].payload)
            .unwrap()
            .replace('\n', "\r\n");
        assert!(rows[0].payload.contains('\n'));
        let mut encoder = ExportEncoder::new(ExportFormat::Ndjson);
        let mut file = Vec::new();
        for row in &rows {
            encoder.encode(row, None, &mut file).unwrap();
        }
        encoder.trailer(true, &mut file);
        assert_eq!(utf8(&file).lines().count(), 3);
        assert_eq!(
            verify(&file, ExportFormat::Ndjson).unwrap(),
            expected_summary(&events, true, 0)
        );
    }

    #[test]
    fn an_edited_payload_value_is_found_at_its_position() {
        let events = chain(5);
        for format in ExportFormat::ALL {
            for style in [Style::Compact, Style::Postgres] {
                let file = utf8(&export_with(&events, &[], format, style, true)).to_owned();
                let (from, to) = match (format, style) {
                    (ExportFormat::Ndjson, Style::Compact) => ("\"amount_minor\":21", "\"amount_minor\":22"),
                    (ExportFormat::Ndjson, Style::Postgres) => ("\"amount_minor\": 21", "\"amount_minor\": 22"),
                    (ExportFormat::Csv, Style::Compact) => ("\"\"amount_minor\"\":21", "\"\"amount_minor\"\":22"),
                    (ExportFormat::Csv, Style::Postgres) => ("\"\"amount_minor\"\": 21", "\"\"amount_minor\"\": 22"),
                };
                assert_eq!(file.matches(from).count(), 1, "{format} {style:?}");
                let edited = file.replace(from, to);
                let error = verify(edited.as_bytes(), format).unwrap_err();
                let line = match format {
                    ExportFormat::Ndjson => 3,
                    ExportFormat::Csv => 4,
                };
                assert!(
                    matches!(error, ExportFileError::HashMismatch { position: 3, line: l, stored, .. } if l == line && stored == events[2].hash),
                    "{format} {style:?}: {error}"
                );
                assert_eq!(error.position(), Some(3));
            }
        }
    }

    #[test]
    fn an_edited_event_with_a_recomputed_hash_breaks_the_next_link() {
        let mut events = chain(4);
        events[1].payload["minutes"] = json!(999);
        events[1] = sealed(events[1].clone());
        for format in ExportFormat::ALL {
            let file = export(&events, format, true);
            let error = verify(&file, format).unwrap_err();
            assert!(
                matches!(error, ExportFileError::PrevHashMismatch { position: 3, expected, found, .. }
                    if expected == events[1].hash && found == events[2].prev_hash),
                "{format}: {error}"
            );
        }
    }

    #[test]
    fn the_first_event_of_the_log_must_hang_from_genesis() {
        let events = vec![event(1, ChainHash([1; 32]))];
        let error = verify(&export(&events, ExportFormat::Ndjson, true), ExportFormat::Ndjson).unwrap_err();
        assert!(
            matches!(error, ExportFileError::PrevHashMismatch { position: 1, line: 1, expected, .. } if expected == ChainHash::GENESIS),
            "{error}"
        );
        // A range starting later hangs from whatever the file says: that is its anchor.
        let events = chain_at(&[5, 6]);
        let summary = verify(&export(&events, ExportFormat::Ndjson, true), ExportFormat::Ndjson).unwrap();
        assert_eq!(summary.anchor, Some(ChainHash([5; 32])));
    }

    fn without_record(file: &[u8], format: ExportFormat, index: usize) -> Vec<u8> {
        let terminator = match format {
            ExportFormat::Ndjson => "\n",
            ExportFormat::Csv => "\r\n",
        };
        let mut records: Vec<&str> = utf8(file).split_inclusive(terminator).collect();
        records.remove(index);
        records.concat().into_bytes()
    }

    #[test]
    fn a_deleted_event_in_a_contiguous_export_is_a_gap() {
        let events = chain(5);
        for format in ExportFormat::ALL {
            let header = usize::from(format == ExportFormat::Csv);
            let file = export(&events, format, true);
            // Delete position 3.
            let edited = without_record(&file, format, header + 2);
            let error = verify(&edited, format).unwrap_err();
            assert!(
                matches!(error, ExportFileError::Gap { after: 2, next: 4, line } if line == 3 + header as u64),
                "{format}: {error}"
            );
            assert_eq!(error.position(), Some(3));
        }
    }

    #[test]
    fn a_gap_is_reported_before_a_later_problem_when_the_export_is_contiguous() {
        let events = chain(5);
        for contiguous in [true, false] {
            let file = export(&events, ExportFormat::Ndjson, contiguous);
            let edited =
                utf8(&without_record(&file, ExportFormat::Ndjson, 1)).replace("\"minutes\":40", "\"minutes\":41");
            let error = verify(edited.as_bytes(), ExportFormat::Ndjson).unwrap_err();
            if contiguous {
                assert!(
                    matches!(
                        error,
                        ExportFileError::Gap {
                            after: 1,
                            next: 3,
                            line: 2
                        }
                    ),
                    "{error}"
                );
            } else {
                assert!(
                    matches!(
                        error,
                        ExportFileError::HashMismatch {
                            position: 4,
                            line: 3,
                            ..
                        }
                    ),
                    "{error}"
                );
            }
        }
    }

    #[test]
    fn a_deleted_event_in_a_filtered_export_breaks_the_trailer_count() {
        let events = chain_at(&[2, 5, 6, 9]);
        for format in ExportFormat::ALL {
            let file = export(&events, format, false);
            assert_eq!(
                verify(&file, format).unwrap(),
                expected_summary(&events, false, 2),
                "{format}"
            );
            let header = usize::from(format == ExportFormat::Csv);
            let edited = without_record(&file, format, header + 1);
            let error = verify(&edited, format).unwrap_err();
            assert!(
                matches!(&error, ExportFileError::TrailerMismatch { field: "count", claimed, found, .. } if claimed == "4" && found == "3"),
                "{format}: {error}"
            );
            // Claiming contiguity over gaps is refused.
            let error = verify(&export(&events, format, true), format).unwrap_err();
            assert!(
                matches!(error, ExportFileError::Gap { after: 2, next: 5, .. }),
                "{format}: {error}"
            );
        }
    }

    #[test]
    fn a_truncated_file_has_no_trailer() {
        let events = chain(4);
        for format in ExportFormat::ALL {
            let file = export(&events, format, true);
            let records = utf8(&file).split_inclusive('\n').count();
            let truncated = without_record(&file, format, records - 1);
            let error = verify(&truncated, format).unwrap_err();
            assert!(
                matches!(
                    error,
                    ExportFileError::MissingTrailer {
                        last_position: Some(4),
                        ..
                    }
                ),
                "{format}: {error}"
            );
            assert_eq!(error.position(), Some(5));
            // Cut inside the last event: that line does not parse.
            let cut = &truncated[..truncated.len() - 10];
            let error = verify(cut, format).unwrap_err();
            assert!(matches!(error, ExportFileError::Unparsable { .. }), "{format}: {error}");
        }
        let error = verify(b"", ExportFormat::Ndjson).unwrap_err();
        assert!(
            matches!(
                error,
                ExportFileError::MissingTrailer {
                    last_position: None,
                    lines: 0
                }
            ),
            "{error}"
        );
        let error = verify(CSV_COLUMNS.join(",").as_bytes(), ExportFormat::Csv).unwrap_err();
        assert!(
            matches!(
                error,
                ExportFileError::MissingTrailer {
                    last_position: None,
                    lines: 1
                }
            ),
            "{error}"
        );
    }

    #[test]
    fn nothing_may_follow_the_trailer() {
        let events = chain(2);
        for format in ExportFormat::ALL {
            let mut file = export(&events, format, true);
            let copy = file.clone();
            file.extend_from_slice(&copy[copy.len() - 20..]);
            let error = verify(&file, format).unwrap_err();
            let line = 3 + u64::from(format == ExportFormat::Csv) + 1;
            assert!(
                matches!(error, ExportFileError::TrailingData { line: l } if l == line),
                "{format}: {error}"
            );
        }
        let mut file = export(&events, ExportFormat::Ndjson, true);
        file.push(b'\n');
        assert!(matches!(
            verify(&file, ExportFormat::Ndjson).unwrap_err(),
            ExportFileError::TrailingData { line: 4 }
        ));
    }

    #[test]
    fn swapped_events_are_out_of_order() {
        let events = chain(4);
        let file = export(&events, ExportFormat::Ndjson, true);
        let mut lines: Vec<&str> = utf8(&file).split_inclusive('\n').collect();
        lines.swap(1, 2);
        let error = verify(lines.concat().as_bytes(), ExportFormat::Ndjson).unwrap_err();
        // Position 3 right after 1 is a gap (pending), then 2 after 3 is out of order; the
        // trailer claims contiguity, so the gap is the first problem.
        assert!(
            matches!(
                error,
                ExportFileError::Gap {
                    after: 1,
                    next: 3,
                    line: 2
                }
            ),
            "{error}"
        );
        let file = export(&events, ExportFormat::Ndjson, false);
        let mut lines: Vec<&str> = utf8(&file).split_inclusive('\n').collect();
        lines.swap(1, 2);
        let error = verify(lines.concat().as_bytes(), ExportFormat::Ndjson).unwrap_err();
        assert!(
            matches!(
                error,
                ExportFileError::OutOfOrder {
                    position: 2,
                    previous: 3,
                    line: 3
                }
            ),
            "{error}"
        );
    }

    #[test]
    fn a_trailer_that_disagrees_with_the_events_is_refused() {
        let events = chain(3);
        let file = utf8(&export(&events, ExportFormat::Ndjson, true)).to_owned();
        let cases = [
            ("\"count\":3", "\"count\":4", "count"),
            ("\"first_position\":1", "\"first_position\":0", "first_position"),
            ("\"last_position\":3", "\"last_position\":null", "last_position"),
            ("cloudphone.export.v1", "cloudphone.export.v2", "format"),
        ];
        for (from, to, expected_field) in cases {
            let edited = file.replace(from, to);
            assert_ne!(edited, file);
            let error = verify(edited.as_bytes(), ExportFormat::Ndjson).unwrap_err();
            assert!(
                matches!(error, ExportFileError::TrailerMismatch { field, line: 4, .. } if field == expected_field),
                "{expected_field}: {error}"
            );
        }
        let last_hash = events[2].hash.to_hex();
        let (head, tail) = file.rsplit_once(&last_hash).unwrap();
        let edited = format!("{head}{}{tail}", events[1].hash.to_hex());
        let error = verify(edited.as_bytes(), ExportFormat::Ndjson).unwrap_err();
        assert!(
            matches!(error, ExportFileError::TrailerMismatch { field: "last_hash", .. }),
            "{error}"
        );
    }

    #[test]
    fn unparsable_lines_are_reported_with_their_line() {
        let events = chain(3);
        let file = utf8(&export(&events, ExportFormat::Ndjson, true)).to_owned();
        let edited = file.replacen("\"stream_type\":\"device\"", "\"stream_type\":\"robot\"", 2);
        let error = verify(edited.as_bytes(), ExportFormat::Ndjson).unwrap_err();
        assert!(
            matches!(&error, ExportFileError::Unparsable { line: 1, reason } if reason.contains("robot")),
            "{error}"
        );
        let edited = file.replace("\"contiguous\":true", "\"contiguous\":1");
        let error = verify(edited.as_bytes(), ExportFormat::Ndjson).unwrap_err();
        assert!(
            matches!(&error, ExportFileError::Unparsable { line: 4, reason } if reason.starts_with("trailer")),
            "{error}"
        );
        let csv = utf8(&export(&events, ExportFormat::Csv, true)).to_owned();
        let error = verify(csv.replacen("record,", "kind,", 1).as_bytes(), ExportFormat::Csv).unwrap_err();
        assert!(matches!(error, ExportFileError::Unparsable { line: 1, .. }), "{error}");
        let error = verify(
            csv.replacen("\r\nevent,2,", "\r\nevent,x,", 1).as_bytes(),
            ExportFormat::Csv,
        )
        .unwrap_err();
        assert!(
            matches!(&error, ExportFileError::Unparsable { line: 3, reason } if reason.starts_with("position")),
            "{error}"
        );
    }

    #[test]
    fn other_line_endings_are_accepted() {
        let events = chain(3);
        let ndjson = utf8(&export(&events, ExportFormat::Ndjson, true)).replace('\n', "\r\n");
        assert_eq!(
            verify(ndjson.as_bytes(), ExportFormat::Ndjson).unwrap(),
            expected_summary(&events, true, 0)
        );
        let csv = utf8(&export(&events, ExportFormat::Csv, true)).replace("\r\n", "\n");
        assert_eq!(
            verify(csv.as_bytes(), ExportFormat::Csv).unwrap(),
            expected_summary(&events, true, 0)
        );
        let no_final_newline = &ndjson.as_bytes()[..ndjson.len() - 2];
        assert_eq!(
            verify(no_final_newline, ExportFormat::Ndjson).unwrap(),
            expected_summary(&events, true, 0)
        );
    }

    #[test]
    fn the_encoder_refuses_rows_that_are_not_envelopes() {
        let events = chain(2);
        let good = row(&events[1], Style::Compact);
        let cases = [
            ExportRow {
                hash: vec![0; 31],
                ..good.clone()
            },
            ExportRow {
                prev_hash: vec![],
                ..good.clone()
            },
            ExportRow {
                schema_version: -1,
                ..good.clone()
            },
            ExportRow {
                stream_type: "robot".to_owned(),
                ..good.clone()
            },
        ];
        for format in ExportFormat::ALL {
            for bad in &cases {
                let mut encoder = ExportEncoder::new(format);
                let mut out = Vec::new();
                let error = encoder.encode(bad, None, &mut out).unwrap_err();
                assert!(matches!(error, ExportRowError::Corrupt { position: 2, .. }), "{error}");
                assert!(out.is_empty());
                assert_eq!(encoder.count(), 0);
            }
            let mut encoder = ExportEncoder::new(format);
            let mut out = Vec::new();
            encoder.encode(&good, None, &mut out).unwrap();
            let written = out.len();
            let earlier = row(&events[0], Style::Compact);
            assert_eq!(
                encoder.encode(&earlier, None, &mut out),
                Err(ExportRowError::OutOfOrder {
                    position: 1,
                    previous: 2
                })
            );
            assert_eq!(
                encoder.encode(&good, None, &mut out),
                Err(ExportRowError::OutOfOrder {
                    position: 2,
                    previous: 2
                })
            );
            assert_eq!(out.len(), written);
            assert_eq!((encoder.count(), encoder.last_position()), (1, Some(2)));
        }
    }

    #[test]
    fn the_encoder_counts_gaps() {
        let events = chain_at(&[1, 2, 4, 5, 9]);
        let mut encoder = ExportEncoder::new(ExportFormat::Csv);
        let mut out = Vec::new();
        for event in &events {
            encoder.encode(&row(event, Style::Compact), None, &mut out).unwrap();
        }
        assert_eq!(encoder.gaps(), 2);
        assert_eq!(encoder.first_position(), Some(1));
        assert_eq!(encoder.last_hash(), Some(events[4].hash));
    }

    #[test]
    fn formats_have_names_content_types_and_are_detected() {
        for format in ExportFormat::ALL {
            assert_eq!(format.to_string().parse::<ExportFormat>(), Ok(format));
            assert_eq!(ExportFormat::from_extension(format.file_extension()), Some(format));
            let file = export(&chain(1), format, true);
            assert_eq!(ExportFormat::detect(&file[..8]), Some(format));
        }
        assert_eq!("CSV".parse::<ExportFormat>(), Ok(ExportFormat::Csv));
        assert!("xml".parse::<ExportFormat>().is_err());
        assert_eq!(ExportFormat::Ndjson.content_type(), "application/x-ndjson");
        assert_eq!(ExportFormat::Csv.content_type(), "text/csv; charset=utf-8");
        assert_eq!(
            ExportFormat::from_path(Path::new("/tmp/audit.JSONL")),
            Some(ExportFormat::Ndjson)
        );
        assert_eq!(ExportFormat::from_path(Path::new("audit.csv")), Some(ExportFormat::Csv));
        assert_eq!(ExportFormat::from_path(Path::new("audit")), None);
        assert_eq!(
            ExportFormat::detect(b"\xEF\xBB\xBF  {\"x\""),
            Some(ExportFormat::Ndjson)
        );
        assert_eq!(ExportFormat::detect(b"hello"), None);
        assert_eq!(ExportFormat::detect(b""), None);
        assert_eq!(serde_json::to_string(&ExportFormat::Ndjson).unwrap(), "\"ndjson\"");
    }

    #[test]
    fn the_verifier_reads_one_record_at_a_time() {
        // A reader whose every fill_buf gives 7 bytes: records straddle reads everywhere.
        struct Trickle<'a>(&'a [u8]);
        impl io::Read for Trickle<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                let n = buf.len().min(7).min(self.0.len());
                buf[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let events = chain(5);
        for format in ExportFormat::ALL {
            let file = export(&events, format, true);
            let reader = io::BufReader::with_capacity(7, Trickle(&file));
            assert_eq!(
                verify_export(reader, format).unwrap(),
                expected_summary(&events, true, 0)
            );
        }
    }

    #[test]
    fn timestamps_are_written_with_microseconds() {
        let mut out = Vec::new();
        for (at, expected) in [
            (at(0), "1970-01-01T00:00:00.000000Z"),
            (at(-1), "1969-12-31T23:59:59.999999Z"),
            (at(951_782_400_000_001), "2000-02-29T00:00:00.000001Z"),
            (
                Utc.with_ymd_and_hms(2026, 11, 26, 23, 7, 51).unwrap() + chrono::Duration::nanoseconds(123_456_789),
                "2026-11-26T23:07:51.123456Z",
            ),
            (
                Utc.with_ymd_and_hms(9, 3, 4, 5, 6, 7).unwrap(),
                "0009-03-04T05:06:07.000000Z",
            ),
        ] {
            out.clear();
            write_timestamp(&mut out, &at);
            assert_eq!(utf8(&out), expected);
        }
        out.clear();
        write_timestamp(&mut out, &Utc.with_ymd_and_hms(12_345, 1, 1, 0, 0, 0).unwrap());
        assert_eq!(utf8(&out), "+12345-01-01T00:00:00.000000Z");
    }

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            // serde_json without its `float_roundtrip` feature misreads some long floats
            // (-7.060753563675808e-265 comes back as ...807e-265), which changes the canonical
            // bytes: a limitation of the log's JSON reading, not of the export, so only floats
            // that survive a round trip are generated here.
            any::<f64>()
                .prop_filter("finite and read back exactly", |f| {
                    f.is_finite() && serde_json::from_str::<f64>(&serde_json::to_string(f).unwrap()).ok() == Some(*f)
                })
                .prop_map(Value::from),
            any::<String>().prop_map(Value::String),
            "[a-z ,\"\\r\\n\\\\é]{0,8}".prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 24, 5, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
                prop::collection::btree_map("[a-z,\" ]{1,5}", inner, 0..5)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn arb_event() -> impl Strategy<Value = EventEnvelope> {
        (
            (
                any::<u128>(),
                any::<u128>(),
                any::<bool>(),
                1..1000i64,
                any::<String>(),
                any::<u16>(),
            ),
            (
                any::<u128>(),
                -2_000_000_000_000_000..5_000_000_000_000_000i64,
                0..1_000_000_000i64,
            ),
            (
                prop::collection::btree_map("[a-z_]{1,8}", arb_json(), 0..4),
                prop::option::of(any::<String>()),
                prop::collection::btree_map("x_[a-z]{1,4}", arb_json(), 0..2),
            ),
        )
            .prop_map(|(identity, time, data)| {
                let (event_id, stream_id, user, stream_version, event_type, schema_version) = identity;
                let (owner_id, occurred, delay) = time;
                let (payload, trace_id, extra) = data;
                EventEnvelope {
                    position: 0,
                    event_id: Uuid::from_u128(event_id),
                    stream_id: Uuid::from_u128(stream_id),
                    stream_type: if user { StreamType::User } else { StreamType::Device },
                    stream_version,
                    event_type,
                    schema_version: schema_version % 0x8000,
                    owner_id: Uuid::from_u128(owner_id),
                    occurred_at: at(occurred),
                    recorded_at: at(occurred + delay),
                    payload: Value::Object(payload.into_iter().collect()),
                    metadata: EventMetadata {
                        trace_id,
                        extra: extra.into_iter().collect(),
                        ..EventMetadata::default()
                    },
                    prev_hash: ChainHash::GENESIS,
                    hash: ChainHash::GENESIS,
                }
            })
    }

    fn arb_personal() -> impl Strategy<Value = Option<Personal>> {
        prop_oneof![
            Just(None),
            Just(Some(Personal::Erased)),
            prop::collection::btree_map("[a-z]{1,6}", arb_json(), 0..3)
                .prop_map(|m| Some(Personal::Decrypted(m.into_iter().collect()))),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn exports_round_trip_and_verify(
            drafts in prop::collection::vec((arb_event(), 0..3i64, arb_personal()), 0..8),
            start in 1..5i64,
            anchor in proptest::array::uniform32(any::<u8>()),
            postgres in any::<bool>(),
        ) {
            let style = if postgres { Style::Postgres } else { Style::Compact };
            let mut events: Vec<EventEnvelope> = Vec::new();
            let mut personal = Vec::new();
            let mut position = start - 1;
            for (mut draft, skip, shown) in drafts {
                position += 1 + skip;
                let adjacent = events.last().filter(|last| last.position + 1 == position).map(|last| last.hash);
                draft.position = position;
                draft.prev_hash = match adjacent {
                    Some(hash) => hash,
                    None if position == 1 => ChainHash::GENESIS,
                    None => ChainHash(anchor),
                };
                events.push(sealed(draft));
                personal.push(shown);
            }
            let gaps = events.windows(2).filter(|w| w[1].position != w[0].position + 1).count() as u64;
            let contiguous = gaps == 0;
            for format in ExportFormat::ALL {
                let file = export_with(&events, &personal, format, style, contiguous);
                prop_assert_eq!(verify(&file, format).map_err(|e| TestCaseError::fail(e.to_string()))?,
                    expected_summary(&events, contiguous, gaps));
                prop_assert_eq!(events_of(&file, format), events.clone());
                if gaps > 0 {
                    let claimed = export_with(&events, &personal, format, style, true);
                    let is_gap = matches!(verify(&claimed, format), Err(ExportFileError::Gap { .. }));
                    prop_assert!(is_gap);
                }
                if let Some(last) = events.last() {
                    // Any change to the last event's stored hash is caught.
                    let text = utf8(&file);
                    let hex = last.hash.to_hex();
                    let cut = text.rfind(&hex).unwrap();
                    let hash_at = text[..cut].rfind(&hex).unwrap();
                    let mut edited = text.as_bytes().to_vec();
                    edited[hash_at] = if edited[hash_at] == b'0' { b'1' } else { b'0' };
                    let is_mismatch = matches!(verify(&edited, format),
                        Err(ExportFileError::HashMismatch { position, .. }) if position == last.position);
                    prop_assert!(is_mismatch);
                }
            }
        }

        #[test]
        fn strings_are_escaped_like_serde_json(text in any::<String>(), controls in "[\\x00-\\x1f\"\\\\]{0,8}") {
            for text in [text, controls] {
                let mut out = Vec::new();
                write_json_str(&mut out, &text);
                prop_assert_eq!(utf8(&out), serde_json::to_string(&text).unwrap());
            }
        }

        #[test]
        fn timestamps_match_chrono(micros in -62_000_000_000_000_000..253_000_000_000_000_000i64) {
            let at = at(micros);
            let mut out = Vec::new();
            write_timestamp(&mut out, &at);
            prop_assert_eq!(utf8(&out), at.to_rfc3339_opts(SecondsFormat::Micros, true));
        }

        #[test]
        fn integers_match_display(value in any::<i64>()) {
            let mut out = Vec::new();
            write_i64(&mut out, value);
            prop_assert_eq!(utf8(&out), value.to_string());
        }

        #[test]
        fn csv_fields_split_back(fields in prop::collection::vec(any::<String>(), 1..6)) {
            let mut record = Vec::new();
            for (i, field) in fields.iter().enumerate() {
                if i > 0 {
                    record.push(b',');
                }
                write_csv_field(&mut record, field.as_bytes());
            }
            let mut unquoted = Vec::new();
            let mut bounds = Vec::new();
            split_csv_record(&record, &mut unquoted, &mut bounds).map_err(TestCaseError::fail)?;
            let back: Vec<&str> = bounds.iter().map(|&(s, e)| std::str::from_utf8(&unquoted[s..e]).unwrap()).collect();
            prop_assert_eq!(back, fields.iter().map(String::as_str).collect::<Vec<_>>());
        }
    }

    /// Encoder and verifier throughput on realistic rows:
    /// `cargo test --release -p event-log --lib export::tests::throughput -- --ignored --nocapture`
    #[test]
    #[ignore = "a benchmark; run it in release mode"]
    fn throughput() {
        use std::time::Instant;
        let events = chain(1000);
        let rows: Vec<ExportRow> = events.iter().map(|e| row(e, Style::Postgres)).collect();
        for format in ExportFormat::ALL {
            let rounds = 1000;
            let mut out = Vec::with_capacity(1 << 20);
            let mut bytes = 0;
            let started = Instant::now();
            for _ in 0..rounds {
                let mut encoder = ExportEncoder::new(format);
                for row in &rows {
                    encoder.encode(row, None, &mut out).unwrap();
                    if out.len() > 1 << 19 {
                        bytes += out.len();
                        out.clear();
                    }
                }
            }
            let elapsed = started.elapsed();
            std::hint::black_box(bytes);
            let n = (rounds * rows.len()) as f64;
            println!(
                "{format}: encode {:.0} ns/event, {:.0} k events/s, {:.0} bytes/event",
                elapsed.as_nanos() as f64 / n,
                n / elapsed.as_secs_f64() / 1000.0,
                (bytes + out.len()) as f64 / n
            );
            let file = export_with(&events, &[], format, Style::Postgres, true);
            let started = Instant::now();
            for _ in 0..20 {
                verify(&file, format).unwrap();
            }
            println!(
                "{format}: verify {:.0} ns/event",
                started.elapsed().as_nanos() as f64 / (20.0 * events.len() as f64)
            );
        }
    }
}
