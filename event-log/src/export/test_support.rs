//! Fixtures shared by the export tests: chained events, their rows spelled as PostgreSQL
//! spells them, and whole export files written by the encoder and read back.

use chrono::{DateTime, Utc};
use event_schema::canonical::envelope_bytes;
use event_schema::{Actor, ActorRole, ChainHash, EventEnvelope, EventMetadata, StreamType};
use serde_json::{Value, json};
use uuid::Uuid;

use super::{
    ExportEncoder, ExportFileError, ExportFormat, ExportLine, ExportReader, ExportRecord, ExportRow,
    ExportVerification, Personal, verify_export,
};
use crate::chain::chain_hash;

/// How the JSON texts of a row are spelled.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Style {
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

pub(super) fn row(envelope: &EventEnvelope, style: Style) -> ExportRow {
    ExportRow {
        payload: text(style, &envelope.payload),
        metadata: text(style, &serde_json::to_value(&envelope.metadata).unwrap()),
        ..ExportRow::from_envelope(envelope)
    }
}

pub(super) fn at(micros: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(micros).unwrap()
}

/// An envelope whose hash is right for `prev_hash`.
pub(super) fn sealed(mut envelope: EventEnvelope) -> EventEnvelope {
    envelope.hash = chain_hash(&envelope.prev_hash, &envelope_bytes(&envelope));
    envelope
}

pub(super) fn event(position: i64, prev_hash: ChainHash) -> EventEnvelope {
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
pub(super) fn chain_at(positions: &[i64]) -> Vec<EventEnvelope> {
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

pub(super) fn chain(count: i64) -> Vec<EventEnvelope> {
    chain_at(&(1..=count).collect::<Vec<_>>())
}

pub(super) fn export_with(
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

pub(super) fn export(events: &[EventEnvelope], format: ExportFormat, contiguous: bool) -> Vec<u8> {
    export_with(events, &[], format, Style::Compact, contiguous)
}

pub(super) fn verify(file: &[u8], format: ExportFormat) -> Result<ExportVerification, ExportFileError> {
    verify_export(file, format)
}

pub(super) fn read_all(file: &[u8], format: ExportFormat) -> Vec<ExportLine> {
    ExportReader::new(file, format).collect::<Result<Vec<_>, _>>().unwrap()
}

pub(super) fn events_of(file: &[u8], format: ExportFormat) -> Vec<EventEnvelope> {
    read_all(file, format)
        .into_iter()
        .filter_map(|line| match line.record {
            ExportRecord::Event(event) => Some(event),
            ExportRecord::Trailer(_) => None,
        })
        .collect()
}

pub(super) fn utf8(file: &[u8]) -> &str {
    std::str::from_utf8(file).unwrap()
}

pub(super) fn expected_summary(events: &[EventEnvelope], contiguous: bool, gaps: u64) -> ExportVerification {
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
