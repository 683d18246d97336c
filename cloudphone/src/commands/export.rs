//! `cloudphone export`: stream the event history to a file or stdout, with progress and a
//! summary (events, rate, peak memory, last hash).

use std::io::Write as _;
use std::time::Instant;

use anyhow::Context;
use event_log::export::ExportFormat;
use event_log::history::{ExportOptions, HistoryExport, HistoryFilter, export_until};
use event_log::personal::PersonalDataKeys;
use operator_console::Progress;
use serde::Serialize;
use tokio::io::AsyncWriteExt as _;

use crate::cli::{ExportArgs, ExportFormatArg, PersonalArg};
use crate::commands::database::{self, Schema};

/// What an export wrote, as printed at the end.
#[derive(Debug, Serialize)]
pub struct ExportSummary {
    pub format: ExportFormat,
    pub events: u64,
    pub first_position: Option<i64>,
    pub last_position: Option<i64>,
    pub last_hash: Option<String>,
    pub bytes: u64,
    pub seconds: f64,
    pub events_per_second: f64,
    /// Peak resident memory of this process (VmHWM), when the platform reports it.
    pub peak_rss_mib: Option<f64>,
}

fn format_of(args: &ExportArgs) -> ExportFormat {
    match args.format {
        Some(ExportFormatArg::Ndjson) => ExportFormat::Ndjson,
        Some(ExportFormatArg::Csv) => ExportFormat::Csv,
        None => ExportFormat::from_path(&args.output).unwrap_or(ExportFormat::Ndjson),
    }
}

pub async fn run(args: &ExportArgs) -> anyhow::Result<()> {
    let format = format_of(args);
    if let Some(event_type) = &args.event_type {
        event_schema::kind_of(event_type).with_context(|| format!("--event-type {event_type}"))?;
    }
    if let (Some(from), Some(to)) = (args.from, args.to) {
        anyhow::ensure!(from < to, "--from must be before --to");
    }
    let pool = database::connect_existing(&args.database, Schema::Log).await?;
    let filter = HistoryFilter {
        owner_id: args.user_id,
        stream_id: args.stream_id,
        event_type: args.event_type.clone(),
        from: args.from,
        to: args.to,
        after: args.after.max(0),
        until: args.until,
    };
    let mut options = ExportOptions::new(format);
    options.page_size = args.page_events.max(1);
    if args.personal == PersonalArg::Decrypt {
        options.personal = Some(PersonalDataKeys::new(pool.clone(), args.master_keys.keyring()?));
    }
    let until = export_until(&pool, &filter).await?;
    let to_stdout = args.output.as_os_str() == "-";
    let mut out: Box<dyn tokio::io::AsyncWrite + Unpin + Send> = if to_stdout {
        Box::new(tokio::io::stdout())
    } else {
        Box::new(
            tokio::fs::File::create(&args.output)
                .await
                .with_context(|| format!("cannot create {}", args.output.display()))?,
        )
    };
    let mut export = HistoryExport::start(
        pool.clone(),
        HistoryFilter {
            until: Some(until),
            ..filter
        },
        options,
    )
    .await?;
    let span = (until - args.after.max(0)).max(0) as u64;
    let mut progress = Progress::new("export", span);
    let started = Instant::now();
    let mut bytes = 0u64;
    while let Some(chunk) = export.next_chunk().await {
        let chunk = chunk.context("export stopped (the output has no trailer; resume with --after)")?;
        out.write_all(&chunk).await.context("cannot write the export")?;
        bytes += chunk.len() as u64;
        if let Some(last) = export.last_position() {
            progress.set((last - args.after.max(0)).max(0) as u64);
        }
    }
    out.flush().await?;
    progress.finish();
    let seconds = started.elapsed().as_secs_f64();
    let trailer = export.summary();
    let summary = ExportSummary {
        format,
        events: trailer.count,
        first_position: trailer.first_position,
        last_position: trailer.last_position,
        last_hash: trailer.last_hash.map(|h| h.to_hex()),
        bytes,
        seconds,
        events_per_second: trailer.count as f64 / seconds.max(1e-9),
        peak_rss_mib: peak_rss_mib(),
    };
    // The data may be on stdout: the summary always goes to stderr then.
    let mut report: Box<dyn std::io::Write> = if to_stdout {
        Box::new(std::io::stderr())
    } else {
        Box::new(std::io::stdout())
    };
    if args.json {
        writeln!(report, "{}", serde_json::to_string(&summary)?)?;
    } else {
        writeln!(
            report,
            "exported {} events ({}..={}) as {} to {} in {:.1}s ({:.0} events/s, {:.1} MiB){}; last hash {}",
            summary.events,
            summary.first_position.unwrap_or(0),
            summary.last_position.unwrap_or(0),
            format,
            if to_stdout {
                "stdout".to_owned()
            } else {
                args.output.display().to_string()
            },
            seconds,
            summary.events_per_second,
            bytes as f64 / (1024.0 * 1024.0),
            summary
                .peak_rss_mib
                .map(|mib| format!(", peak RSS {mib:.1} MiB"))
                .unwrap_or_default(),
            summary.last_hash.as_deref().unwrap_or("-"),
        )?;
    }
    Ok(())
}

/// Peak resident set size of this process from `/proc/self/status` (Linux).
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}
