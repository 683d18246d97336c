//! The encoder: writes [`ExportRow`]s as the NDJSON or CSV bytes of the file format
//! [`super`] specifies, one row at a time into a caller's buffer.

use chrono::{DateTime, Datelike, SecondsFormat, Timelike, Utc};
use event_schema::{ChainHash, StreamType};
use uuid::Uuid;

use super::{CSV_COLUMNS, CSV_PAYLOAD_COLUMN, EXPORT_FORMAT_V1, ExportFormat, ExportRow, ExportTrailer, Personal};

/// A row the encoder refuses: it could not be read back as an
/// [`EventEnvelope`](event_schema::EventEnvelope), or it came out of position order. Nothing
/// is written for it.
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
pub(super) fn write_csv_field(out: &mut Vec<u8>, field: &[u8]) {
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests;
