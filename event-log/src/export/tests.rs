//! Tests of the format types shared by the encoder and the reader, and the throughput
//! benchmark of both.

use super::test_support::*;
use super::*;
use serde_json::json;

#[test]
fn personal_debug_does_not_show_values() {
    let mut values = Map::new();
    values.insert("email".to_owned(), json!("ada@example.com"));
    let shown = format!("{:?}", Personal::Decrypted(values));
    assert!(shown.contains("email") && !shown.contains("ada"), "{shown}");
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
