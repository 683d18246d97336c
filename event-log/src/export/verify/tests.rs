//! Tests of the verifier: what it accepts, and the first problem it reports for each way a
//! file can be edited, truncated, reordered or padded.

use super::*;
use crate::export::test_support::*;
use crate::export::{CSV_COLUMNS, Personal};
use event_schema::{EventMetadata, StreamType};
use proptest::prelude::*;
use serde_json::{Value, json};
use uuid::Uuid;

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
        let edited = utf8(&without_record(&file, ExportFormat::Ndjson, 1)).replace("\"minutes\":40", "\"minutes\":41");
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
}
