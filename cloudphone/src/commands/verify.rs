//! `cloudphone verify`: recompute the hash chain over the log, or over an export file.

use std::io::BufRead;
use std::path::Path;

use anyhow::{Context, bail};
use event_log::LogReader;
use event_log::export::{ExportFormat, ExportReader, ExportRecord, ExportVerification, verify_export};
use event_schema::ChainHash;
use operator_console::Progress;

use crate::cli::{ExportFormatArg, VerifyArgs};
use crate::commands::database::{self, Schema};

pub async fn run(args: &VerifyArgs) -> anyhow::Result<()> {
    match &args.file {
        Some(path) => verify_file(args, path).await,
        None => verify_log(args).await,
    }
}

async fn verify_log(args: &VerifyArgs) -> anyhow::Result<()> {
    let pool = database::connect_existing(&args.database, Schema::Log).await?;
    let reader = LogReader::new(pool);
    let head = reader.head().await?;
    let to = args.to.unwrap_or(head.position).min(head.position);
    let from = args.from.max(1);
    let mut progress = Progress::new("verify", (to - from + 1).max(0) as u64);
    let report = reader
        .verify_chain(from, Some(to), 10_000, |position| {
            progress.set((position - from + 1) as u64)
        })
        .await?;
    let elapsed = progress.finish();
    let rate = report.checked as f64 / elapsed.as_secs_f64().max(1e-9);
    match report.broken {
        None => {
            println!(
                "verified {} events ({}..={}) in {:.1}s ({:.0} events/s); last hash {}",
                report.checked,
                report.from,
                report.last_position,
                elapsed.as_secs_f64(),
                rate,
                report.last_hash
            );
            Ok(())
        }
        Some(broken) => {
            println!(
                "chain broken at position {}: {broken} ({} events before it verified)",
                broken.position(),
                report.checked
            );
            bail!("hash chain broken at position {}", broken.position())
        }
    }
}

fn open(path: &Path) -> anyhow::Result<Box<dyn BufRead + Send>> {
    if path.as_os_str() == "-" {
        return Ok(Box::new(std::io::BufReader::with_capacity(1 << 20, std::io::stdin())));
    }
    let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    Ok(Box::new(std::io::BufReader::with_capacity(1 << 20, file)))
}

async fn verify_file(args: &VerifyArgs, path: &Path) -> anyhow::Result<()> {
    let path = path.to_owned();
    let format = args.format.map(|format| match format {
        ExportFormatArg::Ndjson => ExportFormat::Ndjson,
        ExportFormatArg::Csv => ExportFormat::Csv,
    });
    let started = std::time::Instant::now();
    // Reading and hashing are blocking work: off the async threads.
    let (format, result) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let mut reader = open(&path)?;
        let format = match format.or_else(|| ExportFormat::from_path(&path)) {
            Some(format) => format,
            None => ExportFormat::detect(reader.fill_buf()?)
                .context("cannot tell the file's format (NDJSON or CSV); pass --format")?,
        };
        Ok((format, verify_export(reader, format)))
    })
    .await??;
    let elapsed = started.elapsed().as_secs_f64();
    let verified = match result {
        Ok(verified) => verified,
        Err(problem) => {
            let at = problem
                .position()
                .map(|position| format!("position {position}"))
                .or_else(|| problem.line().map(|line| format!("line {line}")))
                .unwrap_or_else(|| "the file".to_owned());
            println!("export file broken at {at}: {problem}");
            bail!("export file does not verify ({at})")
        }
    };
    println!(
        "verified {} events ({}..={}) of a {} export in {:.1}s ({:.0} events/s); {}; last hash {}",
        verified.count,
        verified.first_position.unwrap_or(0),
        verified.last_position.unwrap_or(0),
        format,
        elapsed,
        verified.count as f64 / elapsed.max(1e-9),
        if verified.contiguous {
            "contiguous".to_owned()
        } else {
            format!("filtered ({} gaps)", verified.gaps)
        },
        verified.last_hash.map_or_else(|| "-".to_owned(), |h| h.to_hex()),
    );
    if args.against_log {
        compare_with_log(args, &verified).await?;
        if !verified.contiguous {
            compare_every_hash(args, path_of(args), format).await?;
        }
    }
    Ok(())
}

fn path_of(args: &VerifyArgs) -> std::path::PathBuf {
    args.file.clone().unwrap_or_default()
}

/// For a filtered export, whose events need not link to each other: every event's hash must
/// be the log's at its position (read again from the file, compared 10 000 at a time).
async fn compare_every_hash(args: &VerifyArgs, path: std::path::PathBuf, format: ExportFormat) -> anyhow::Result<()> {
    anyhow::ensure!(
        path.as_os_str() != "-",
        "--against-log of a filtered export needs a file, not stdin"
    );
    let (batches, mut received) = tokio::sync::mpsc::channel::<Vec<(i64, ChainHash)>>(2);
    let reading = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let mut batch = Vec::with_capacity(10_000);
        for record in ExportReader::new(open(&path)?, format) {
            if let ExportRecord::Event(event) = record?.record {
                batch.push((event.position, event.hash));
                if batch.len() == 10_000 && batches.blocking_send(std::mem::take(&mut batch)).is_err() {
                    return Ok(());
                }
            }
        }
        if !batch.is_empty() {
            let _ = batches.blocking_send(batch);
        }
        Ok(())
    });
    let reader = LogReader::new(database::connect_existing(&args.database, Schema::Log).await?);
    let mut compared = 0u64;
    while let Some(batch) = received.recv().await {
        let wanted: Vec<i64> = batch.iter().map(|(position, _)| *position).collect();
        let stored = reader.hashes_at(&wanted).await?;
        for (position, hash) in batch {
            if stored.get(&position).map(Vec::as_slice) != Some(&hash.0[..]) {
                println!("the file's event at position {position} differs from the log's");
                bail!("export file is not the log's history (hash at position {position} differs)");
            }
            compared += 1;
        }
    }
    reading.await??;
    println!("every one of the file's {compared} events matches the log");
    Ok(())
}

/// The file's anchor (the hash before its first event) and last hash must be the log's.
async fn compare_with_log(args: &VerifyArgs, verified: &ExportVerification) -> anyhow::Result<()> {
    let (Some(first), Some(last), Some(last_hash), Some(anchor)) = (
        verified.first_position,
        verified.last_position,
        verified.last_hash,
        verified.anchor,
    ) else {
        println!("the file holds no events: nothing to compare with the log");
        return Ok(());
    };
    let reader = LogReader::new(database::connect_existing(&args.database, Schema::Log).await?);
    let stored_hash = |position: i64| {
        let reader = reader.clone();
        async move {
            if position == 0 {
                return Ok::<_, anyhow::Error>(Some(ChainHash::GENESIS));
            }
            let events = reader.read_all(position - 1, 1).await?;
            Ok(events.first().filter(|e| e.position == position).map(|e| e.hash))
        }
    };
    if stored_hash(first - 1).await? != Some(anchor) {
        println!(
            "the file's first event (position {first}) does not follow the log's event {}",
            first - 1
        );
        bail!("export file is not the log's history (anchor at position {first} differs)");
    }
    if stored_hash(last).await? != Some(last_hash) {
        println!("the file's hash at position {last} differs from the log's");
        bail!("export file is not the log's history (hash at position {last} differs)");
    }
    println!("the file's chain matches the log at positions {first}..={last}");
    Ok(())
}
