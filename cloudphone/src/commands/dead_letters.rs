//! `cloudphone dead-letters list|retry|skip`: the events projections parked, and what an
//! operator does about them once the cause is known. The rules (what a retry refuses, why it
//! applies each event exactly once) are `projections::dead_letters`'.

use anyhow::Context;
use projections::dead_letters::{self, RetryOutcome, RetryReport, SkipOutcome};
use read_models::Projection;
use read_models::dead_letters::{DeadLetter, DeadLetterFilter, MAX_PAGE};

use crate::cli::{DatabaseArgs, DeadLettersAction};
use crate::commands::database::{self, Schema};

pub async fn run(args: &DatabaseArgs, action: &DeadLettersAction) -> anyhow::Result<()> {
    // Reads and resolves letters in the schema `cloudphone migrate` made; changes no schema.
    let pool = database::connect_existing(args, Schema::LogAndReadModels).await?;
    match action {
        DeadLettersAction::List {
            projection,
            state,
            after,
            limit,
            json,
        } => {
            let filter = DeadLetterFilter {
                projection: projection.map(Projection::from),
                state: state.state(),
                after_id: *after,
            };
            let limit = i64::try_from(*limit).unwrap_or(MAX_PAGE).min(MAX_PAGE);
            let letters = read_models::dead_letters::list(&pool, filter, limit)
                .await
                .context("cannot list dead letters")?;
            let total = read_models::dead_letters::count(&pool, filter)
                .await
                .context("cannot count dead letters")?;
            if *json {
                println!("{}", as_json(&letters, total, limit));
            } else {
                print_table(&letters, total);
            }
            Ok(())
        }
        DeadLettersAction::Retry {
            id,
            all,
            projection,
            actor,
        } => {
            let projection = projection.map(Projection::from);
            let actor = actor.name();
            let reports = match (id, all) {
                (Some(id), false) => vec![dead_letters::retry(&pool, *id, projection, &actor).await?],
                _ => dead_letters::retry_pending(&pool, projection, &actor).await?,
            };
            if reports.is_empty() {
                println!("no pending dead letters");
                return Ok(());
            }
            for report in &reports {
                println!("{}", describe(report));
            }
            let unresolved = reports
                .iter()
                .filter(|r| matches!(r.outcome, RetryOutcome::Failed { .. } | RetryOutcome::Refused(_)))
                .count();
            if unresolved > 0 {
                anyhow::bail!("{unresolved} of {} dead letter(s) still pending", reports.len());
            }
            Ok(())
        }
        DeadLettersAction::Skip {
            id,
            reason,
            projection,
            actor,
        } => {
            let projection = projection.map(Projection::from);
            match dead_letters::skip(&pool, *id, projection, reason, &actor.name()).await? {
                SkipOutcome::Skipped => println!("dead letter {id}: skipped"),
                SkipOutcome::AlreadyResolved {
                    state,
                    resolved_at,
                    resolved_by,
                } => println!(
                    "dead letter {id}: already {state}{}; nothing done",
                    resolution(resolved_at, resolved_by.as_deref())
                ),
            }
            Ok(())
        }
    }
}

fn resolution(at: Option<chrono::DateTime<chrono::Utc>>, by: Option<&str>) -> String {
    let mut text = String::new();
    if let Some(at) = at {
        text.push_str(&format!(
            " at {}",
            at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        ));
    }
    if let Some(by) = by {
        text.push_str(&format!(" by {by}"));
    }
    text
}

/// One line per retried letter: what happened, and what to do when it is still pending.
fn describe(report: &RetryReport) -> String {
    let head = format!(
        "dead letter {} ({} at position {})",
        report.id, report.projection, report.position
    );
    match &report.outcome {
        RetryOutcome::Applied => format!("{head}: applied"),
        RetryOutcome::Failed { error, attempts } => {
            format!("{head}: failed again (attempt {attempts}), still pending: {error}")
        }
        RetryOutcome::Refused(refusal) => format!("{head}: not retried, still pending: {refusal}"),
        RetryOutcome::AlreadyResolved {
            state,
            resolved_at,
            resolved_by,
        } => format!(
            "{head}: already {state}{}; nothing done",
            resolution(*resolved_at, resolved_by.as_deref())
        ),
    }
}

fn print_table(letters: &[DeadLetter], total: i64) {
    println!(
        "{:>8} {:<12} {:>10} {:<20} {:>3} {:<8} {:>3} {:<20} error / note",
        "id", "projection", "position", "event type", "v", "state", "try", "parked at"
    );
    for l in letters {
        let note = match &l.resolution_note {
            Some(note) => format!("{} [{note}]", one_line(&l.error)),
            None => one_line(&l.error),
        };
        println!(
            "{:>8} {:<12} {:>10} {:<20} {:>3} {:<8} {:>3} {:<20} {note}",
            l.id,
            l.projection,
            l.position,
            l.event_type,
            l.schema_version,
            l.state,
            l.attempts,
            l.created_at.format("%Y-%m-%d %H:%M:%S"),
        );
    }
    let next = match letters.last() {
        Some(last) if (letters.len() as i64) < total => format!(" (next page: --after {})", last.id),
        _ => String::new(),
    };
    println!("{} of {total} shown{next}", letters.len());
}

/// An error on one line, cut to what a terminal shows.
fn one_line(text: &str) -> String {
    let line: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(120)
        .collect();
    if text.chars().count() > 120 {
        format!("{line}…")
    } else {
        line
    }
}

fn as_json(letters: &[DeadLetter], total: i64, limit: i64) -> serde_json::Value {
    let rows: Vec<serde_json::Value> = letters
        .iter()
        .map(|l| {
            serde_json::json!({
                "id": l.id,
                "projection": l.projection,
                "position": l.position,
                "event_id": l.event_id,
                "event_type": l.event_type,
                "schema_version": l.schema_version,
                "error": l.error,
                "state": l.state.as_str(),
                "attempts": l.attempts,
                "created_at": l.created_at,
                "last_attempt_at": l.last_attempt_at,
                "resolved_at": l.resolved_at,
                "resolved_by": l.resolved_by,
                "resolution_note": l.resolution_note,
            })
        })
        .collect();
    let next_after = letters.last().filter(|_| letters.len() as i64 == limit).map(|l| l.id);
    serde_json::json!({ "total": total, "letters": rows, "next_after": next_after })
}
