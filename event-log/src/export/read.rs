//! The reader: splits an export file into records (NDJSON lines, RFC 4180 CSV records) and
//! parses each back into an [`ExportRecord`], one record at a time in bounded memory.

use std::fmt;
use std::io::{self, BufRead};
use std::str::FromStr;

use chrono::{DateTime, Utc};
use event_schema::{ChainHash, EventEnvelope, EventMetadata};
use serde::Deserialize;
use serde_json::Value;

use super::{
    CSV_COLUMNS, CSV_PAYLOAD_COLUMN, CSV_PERSONAL_COLUMN, ExportFileError, ExportFormat, ExportTrailer,
    MAX_RECORD_BYTES, UTF8_BOM,
};

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
pub(super) fn split_csv_record(
    record: &[u8],
    fields: &mut Vec<u8>,
    bounds: &mut Vec<(usize, usize)>,
) -> Result<(), String> {
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests;
