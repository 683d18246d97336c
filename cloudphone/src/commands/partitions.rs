//! `cloudphone partitions ensure|list|detach`.

use anyhow::{Context, bail};
use chrono::{NaiveDate, Utc};
use event_log::partitions;

use crate::cli::{DatabaseArgs, PartitionsAction};
use crate::commands::database::{self, Schema};

pub async fn run(args: &DatabaseArgs, action: &PartitionsAction) -> anyhow::Result<()> {
    let pool = database::connect_existing(args, Schema::Log).await?;
    match action {
        PartitionsAction::Ensure { months_ahead } => {
            let created = partitions::ensure_partitions(&pool, Utc::now(), *months_ahead)
                .await
                .context("ensuring partitions failed")?;
            println!("created {created} partitions");
        }
        PartitionsAction::List => {
            let list = partitions::list_partitions(&pool).await?;
            println!(
                "{:<24} {:<8} {:>8} {:>14} {:>12}",
                "partition", "month", "state", "rows (est.)", "size"
            );
            for p in &list {
                println!(
                    "{:<24} {:<8} {:>8} {:>14} {:>12}",
                    p.name,
                    p.month.format("%Y-%m"),
                    if p.archived { "archived" } else { "live" },
                    p.estimated_rows.max(0),
                    human_bytes(p.total_bytes)
                );
            }
            println!(
                "{} months provisioned ahead of the current one",
                partitions::months_provisioned_ahead(&list, Utc::now())
            );
        }
        PartitionsAction::Detach { month } => {
            let Ok(first_day) = NaiveDate::parse_from_str(&format!("{month}-01"), "%Y-%m-%d") else {
                bail!("month must look like 2026-01, got `{month}`");
            };
            let name = partitions::archive_partition(&pool, first_day).await?;
            println!("{name} moved to user_events_archive; reads and exports still reach it");
        }
    }
    Ok(())
}

fn human_bytes(bytes: i64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes.max(0) as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}
