//! `cloudphone erasures reapply|check`: the erasure ledger against the database, after a
//! restore (event_log::erasure_ledger has the guarantees).

use anyhow::{Context, bail};
use event_log::erasure_ledger::{self, LedgerContents, ReapplyReport};

use crate::cli::{ErasuresAction, ErasuresArgs};
use crate::commands::database::{self, Schema};

pub async fn run(action: &ErasuresAction) -> anyhow::Result<()> {
    match action {
        ErasuresAction::Reapply(args) => {
            let contents = read_ledgers(args).await?;
            let pool = database::connect_existing(&args.database, Schema::Log).await?;
            let report = erasure_ledger::reapply(&pool, &contents.users())
                .await
                .context("cannot reapply the erasures")?;
            println!(
                "erasures in the ledger: {} users; data keys shredded again: {}; tombstones for users the database did not know: {}; already erased: {}",
                report.users, report.reshredded, report.tombstoned, report.already_erased
            );
            refuse_unreadable(&contents)
        }
        ErasuresAction::Check(args) => {
            let contents = read_ledgers(args).await?;
            let pool = database::connect_existing(&args.database, Schema::Log).await?;
            let report = erasure_ledger::pending(&pool, &contents.users())
                .await
                .context("cannot compare the ledger with the database")?;
            print_check(&report);
            refuse_unreadable(&contents)?;
            if report.changed() {
                bail!(
                    "the database lacks {} erasures of the ledger; run `cloudphone erasures reapply` before serving",
                    report.reshredded + report.tombstoned
                );
            }
            Ok(())
        }
    }
}

async fn read_ledgers(args: &ErasuresArgs) -> anyhow::Result<LedgerContents> {
    let paths = args.ledgers.clone();
    tokio::task::spawn_blocking(move || -> anyhow::Result<LedgerContents> {
        let mut all = LedgerContents::default();
        for path in &paths {
            let contents = erasure_ledger::read(path)?;
            if contents.torn_tail {
                eprintln!(
                    "note: {} ends in a torn line (a write a crash interrupted, never acknowledged); ignored",
                    path.display()
                );
            }
            if !contents.unreadable_lines.is_empty() {
                eprintln!(
                    "error: {}: lines {:?} do not parse",
                    path.display(),
                    contents.unreadable_lines
                );
            }
            all.extend(contents);
        }
        Ok(all)
    })
    .await?
}

fn refuse_unreadable(contents: &LedgerContents) -> anyhow::Result<()> {
    if !contents.unreadable_lines.is_empty() {
        bail!(
            "{} ledger lines do not parse: their erasures may be missing; repair the ledger from its backup",
            contents.unreadable_lines.len()
        );
    }
    Ok(())
}

fn print_check(report: &ReapplyReport) {
    println!(
        "erasures in the ledger: {} users; data keys the database holds again: {}; users it does not know: {}; already erased: {}",
        report.users, report.reshredded, report.tombstoned, report.already_erased
    );
}
