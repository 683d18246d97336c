//! What every report is made of: latency histograms (1 µs to 60 s, three significant digits)
//! summed up as percentiles in milliseconds, and the JSON file a run may write.

use std::path::Path;

use anyhow::Context;
use hdrhistogram::Histogram;
use serde::Serialize;

/// The percentiles of a histogram of microseconds, in milliseconds.
#[derive(Debug, Serialize)]
pub struct Latency {
    pub count: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
}

impl Latency {
    pub fn of(histogram: &Histogram<u64>) -> Self {
        let ms = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
        Latency {
            count: histogram.len(),
            p50_ms: ms(0.5),
            p99_ms: ms(0.99),
            p999_ms: ms(0.999),
        }
    }
}

/// An empty histogram of microseconds.
#[allow(clippy::expect_used)] // constant bounds, checked by every run
pub fn histogram() -> Histogram<u64> {
    // 1 µs .. 60 s, 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

/// Writes `report` as pretty JSON to `path` (`--json`).
pub fn write_json(path: &Path, report: &impl Serialize) -> anyhow::Result<()> {
    std::fs::write(path, serde_json::to_vec_pretty(report)?).with_context(|| format!("write {}", path.display()))
}
