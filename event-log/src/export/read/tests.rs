//! Tests of the reader: records that span lines, line endings, reads that split records, and
//! the line reported for a record that does not parse.

use super::*;
use crate::export::encode::write_csv_field;
use crate::export::test_support::*;
use crate::export::verify_export;
use proptest::prelude::*;
use serde_json::json;

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

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

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
