//! Tests of the encoder: the bytes it writes, the rows it refuses, and its number, string and
//! timestamp writers against `serde_json` and chrono.

use super::*;
use crate::export::CSV_PERSONAL_COLUMN;
use crate::export::read::split_csv_record;
use crate::export::test_support::*;
use chrono::TimeZone;
use event_schema::{EventEnvelope, EventMetadata};
use proptest::prelude::*;
use serde_json::{Map, Value, json};

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
        occurred_at: Utc.with_ymd_and_hms(2026, 11, 26, 23, 7, 51).unwrap() + chrono::Duration::microseconds(123_456),
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

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

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
}
