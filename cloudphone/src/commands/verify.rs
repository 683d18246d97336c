//! `cloudphone verify`: recompute the hash chain over the log.

use anyhow::bail;
use event_log::LogReader;

use crate::cli::VerifyArgs;
use crate::commands::database;
use crate::progress::Progress;

pub async fn run(args: &VerifyArgs) -> anyhow::Result<()> {
    let pool = database::connect(&args.database).await?;
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
