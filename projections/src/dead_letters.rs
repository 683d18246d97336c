//! Resolving dead letters: retrying a parked event once its cause is fixed, or skipping it
//! with a reason. Listing them is the read models' (`read_models::dead_letters`).
//!
//! **Exactly once.** A retry runs in one transaction that locks the letter (`FOR UPDATE`),
//! checks it is still `pending`, applies the event with the projector's own code and marks the
//! letter `retried`: the read-model write and the mark commit together or not at all. A second
//! retry of the same letter (sequential or concurrent: it waits for the first one's lock, then
//! reads the state the first one committed) finds it resolved and does nothing. The retry also
//! holds the projection's batch lock exclusively ([`crate::apply::lock_for_batch`]), so no
//! projector batch reads or writes the same rows meanwhile.
//!
//! **Which letters can be retried** (anything else stays pending, with a message saying to
//! replay or skip):
//! - The event is read again from the log (the source of truth; the stored envelope is only a
//!   copy) and must be the one the letter names. A message that was not an envelope names no
//!   event and cannot be retried.
//! - The letter was parked against the live tables: by the live projector (not by a replay's
//!   tail writing its shadow tables, where the live projector may have applied the event), and
//!   after the replay that built the live tables swapped them in (that replay folded the whole
//!   log, the event included if it could).
//! - `daily_usage` only adds usage to sums, so an old event can be added at any time. `fleet`
//!   folds each device's and user's state in log order (status, sizes, the status history by
//!   hour): an event is applied only if no later event of its stream has been applied to its
//!   row yet (`updated_position` below the event's position). Otherwise applying it now would
//!   put the row in a state the log never had; a replay rebuilds the projection in order.
//!   `retry --all` takes letters in log order, so a stream's parked events (a creation and the
//!   events after it that failed for want of it) are applied in the order they were appended.
//!
//! A retry that fails again leaves the letter pending with the new error and one more attempt.

use std::fmt;

use chrono::{DateTime, Utc};
use event_log::LogReader;
use event_schema::StreamType;
use sqlx::{PgConnection, PgPool, Row};
use uuid::Uuid;

use read_models::Projection;
use read_models::changes::{self, ChangeNotice};
use read_models::dead_letters::{DeadLetterState, UnknownState};

use crate::apply::{apply_unparked, lock_for_retry};

/// Longest skip reason, in characters: a note for the record, not a document.
pub const MAX_REASON_CHARS: usize = 1_000;

/// Longest name of who resolved a letter, in characters.
pub const MAX_ACTOR_CHARS: usize = 200;

#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    #[error("no dead letter has id {0}")]
    NotFound(i64),
    #[error("dead letter {id} belongs to projection `{actual}`, not `{expected}`")]
    WrongProjection {
        id: i64,
        actual: String,
        expected: &'static str,
    },
    #[error("dead letter {id} belongs to projection `{name}`, which this code does not know")]
    UnknownProjection { id: i64, name: String },
    #[error(
        "projection `{projection}` is live at version {version}, which this code does not know: \
         run the binary that built it"
    )]
    UnknownVersion { projection: &'static str, version: i32 },
    #[error("a skip needs a reason: not blank, at most {max} characters, no control characters", max = MAX_REASON_CHARS)]
    BadReason,
    #[error(
        "who resolves a letter must be named: not blank, at most {max} characters, no control characters",
        max = MAX_ACTOR_CHARS
    )]
    BadActor,
    #[error("dead-letter database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("{0}")]
    Read(#[from] event_log::ReadError),
}

/// Why a pending letter was not retried (it stays pending, its attempts unchanged).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The parked message was not an envelope: it names no event of the log.
    NotAnEvent,
    /// The log holds no event at the letter's position with the letter's event id.
    NotInLog,
    /// Parked by a replay's tail into its shadow tables (or before this was recorded).
    ParkedElsewhere { parked_in: Option<String> },
    /// Parked before the replay that built the live tables swapped them in.
    SupersededByReplay { swapped_at: DateTime<Utc> },
    /// A later event of the same stream is already in the row the event would change.
    LaterEventApplied { stream_id: Uuid, applied_position: i64 },
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::NotAnEvent => write!(
                f,
                "the parked message was not an event envelope, so there is nothing of the log to apply; \
                 skip it, or replay the projection if an event is missing"
            ),
            Refusal::NotInLog => write!(
                f,
                "the log holds no event with this letter's position and event id; skip it"
            ),
            Refusal::ParkedElsewhere {
                parked_in: Some(schema),
            } => write!(
                f,
                "parked by a replay writing its shadow tables (schema {schema}), not by the live projector: \
                 the live tables may hold the event; replay the projection, or skip it"
            ),
            Refusal::ParkedElsewhere { parked_in: None } => write!(
                f,
                "parked while a replay of the projection was running, so not surely by the live projector; \
                 replay the projection, or skip it"
            ),
            Refusal::SupersededByReplay { swapped_at } => write!(
                f,
                "parked before the replay that built the live tables swapped them in ({swapped_at}); that \
                 replay folded the event from the log: skip the letter, or replay again"
            ),
            Refusal::LaterEventApplied {
                stream_id,
                applied_position,
            } => write!(
                f,
                "stream {stream_id} already has a later event applied (position {applied_position}); applying \
                 this one now would fold it out of order: replay the projection (`cloudphone replay <projection> \
                 --version <live version>`), then skip the letter"
            ),
        }
    }
}

/// What a retry of one letter did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RetryOutcome {
    /// Applied to the read model now; the letter is `retried`.
    Applied,
    /// Failed again: still pending, with this error and attempt count.
    Failed { error: String, attempts: i32 },
    /// Not tried: still pending (see [`Refusal`]).
    Refused(Refusal),
    /// Resolved before (by another retry or a skip): nothing done.
    AlreadyResolved {
        state: DeadLetterState,
        resolved_at: Option<DateTime<Utc>>,
        resolved_by: Option<String>,
    },
}

impl RetryOutcome {
    /// The outcome's word, as printed.
    pub fn as_str(&self) -> &'static str {
        match self {
            RetryOutcome::Applied => "applied",
            RetryOutcome::Failed { .. } => "failed",
            RetryOutcome::Refused(_) => "refused",
            RetryOutcome::AlreadyResolved { .. } => "already_resolved",
        }
    }
}

/// One letter's retry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryReport {
    pub id: i64,
    pub projection: String,
    pub position: i64,
    pub outcome: RetryOutcome,
}

/// What a skip did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SkipOutcome {
    /// The letter is `skipped` now, with the reason.
    Skipped,
    /// Resolved before: nothing done.
    AlreadyResolved {
        state: DeadLetterState,
        resolved_at: Option<DateTime<Utc>>,
        resolved_by: Option<String>,
    },
}

/// The parts of a letter a resolution reads, locked for the transaction.
struct LockedLetter {
    projection: String,
    position: i64,
    event_id: Option<Uuid>,
    state: DeadLetterState,
    parked_in: Option<String>,
    created_at: DateTime<Utc>,
    resolved_at: Option<DateTime<Utc>>,
    resolved_by: Option<String>,
}

/// Locks letter `id` for the transaction, checking it belongs to `expected` when given.
async fn lock_letter(
    conn: &mut PgConnection,
    id: i64,
    expected: Option<Projection>,
) -> Result<LockedLetter, DeadLetterError> {
    let row = sqlx::query(
        "SELECT projection, position, event_id, state, parked_in, created_at, resolved_at, resolved_by
         FROM projection_dead_letters WHERE id = $1 FOR UPDATE",
    )
    .bind(id)
    .fetch_optional(conn)
    .await?
    .ok_or(DeadLetterError::NotFound(id))?;
    let letter = LockedLetter {
        projection: row.try_get("projection")?,
        position: row.try_get("position")?,
        event_id: row.try_get("event_id")?,
        state: row
            .try_get::<String, _>("state")?
            .parse()
            .map_err(|e: UnknownState| sqlx::Error::Decode(Box::new(e)))?,
        parked_in: row.try_get("parked_in")?,
        created_at: row.try_get("created_at")?,
        resolved_at: row.try_get("resolved_at")?,
        resolved_by: row.try_get("resolved_by")?,
    };
    if let Some(expected) = expected
        && letter.projection != expected.name()
    {
        return Err(DeadLetterError::WrongProjection {
            id,
            actual: letter.projection,
            expected: expected.name(),
        });
    }
    Ok(letter)
}

/// `text` if it is fit to store as a note: not blank, at most `max` characters, no control
/// characters (a note is printed on terminals and in logs).
fn valid_note(text: &str, max: usize) -> Option<&str> {
    let text = text.trim();
    (!text.is_empty() && text.chars().count() <= max && !text.chars().any(char::is_control)).then_some(text)
}

/// Retries letter `id` (of `expected`'s projection, when given): see the module's rules.
/// `actor` names who asked, for the record.
pub async fn retry(
    pool: &PgPool,
    id: i64,
    expected: Option<Projection>,
    actor: &str,
) -> Result<RetryReport, DeadLetterError> {
    let actor = valid_note(actor, MAX_ACTOR_CHARS).ok_or(DeadLetterError::BadActor)?;
    // The event, read from the log before the transaction starts: the log is immutable, and
    // a read on a second connection while holding the transaction's could exhaust the pool
    // when retries run concurrently (each holding one connection, waiting for another).
    let envelope = match read_models::dead_letters::get(pool, id).await? {
        Some(known) if known.event_id.is_some() && known.position > 0 => LogReader::new(pool.clone())
            .read_all(known.position - 1, 1)
            .await?
            .into_iter()
            .next()
            .filter(|e| e.position == known.position && Some(e.event_id) == known.event_id),
        Some(_) => None,
        None => return Err(DeadLetterError::NotFound(id)),
    };
    let mut tx = pool.begin().await?;
    let letter = lock_letter(&mut tx, id, expected).await?;
    let report = |outcome| RetryReport {
        id,
        projection: letter.projection.clone(),
        position: letter.position,
        outcome,
    };
    if letter.state != DeadLetterState::Pending {
        return Ok(report(RetryOutcome::AlreadyResolved {
            state: letter.state,
            resolved_at: letter.resolved_at,
            resolved_by: letter.resolved_by.clone(),
        }));
    }
    let projection = Projection::named(&letter.projection).ok_or_else(|| DeadLetterError::UnknownProjection {
        id,
        name: letter.projection.clone(),
    })?;
    lock_for_retry(&mut tx, projection).await?;
    // Locked too: a replay's swap moves the checkpoint (and the version) in the transaction
    // that replaces the tables, so the version read here stays the live one until commit.
    let (checkpoint, version): (i64, i32) =
        sqlx::query_as("SELECT position, version FROM projection_checkpoints WHERE projection = $1 FOR UPDATE")
            .bind(projection.name())
            .fetch_optional(&mut *tx)
            .await?
            .unwrap_or((0, 1));
    let layout = projection.layout(version).ok_or(DeadLetterError::UnknownVersion {
        projection: projection.name(),
        version,
    })?;
    if let Some(refusal) = refusal(&mut tx, projection, &letter).await? {
        return Ok(report(RetryOutcome::Refused(refusal)));
    }
    let Some(envelope) = envelope else {
        return Ok(report(RetryOutcome::Refused(Refusal::NotInLog)));
    };
    if projection == Projection::Fleet
        && let Some(applied_position) =
            stream_row_position(&mut tx, layout, envelope.stream_type, envelope.stream_id).await?
        && applied_position >= envelope.position
    {
        return Ok(report(RetryOutcome::Refused(Refusal::LaterEventApplied {
            stream_id: envelope.stream_id,
            applied_position,
        })));
    }
    let (applied, dead) = apply_unparked(&mut tx, layout, std::slice::from_ref(&envelope)).await?;
    let outcome = if let Some(failed) = dead.first() {
        // The fold refused the event and changed nothing: only the letter is updated.
        let attempts: i32 = sqlx::query_scalar(
            "UPDATE projection_dead_letters SET attempts = attempts + 1, error = $2, last_attempt_at = now()
             WHERE id = $1 RETURNING attempts",
        )
        .bind(id)
        .bind(&failed.error)
        .fetch_one(&mut *tx)
        .await?;
        tracing::warn!(id, projection = projection.name(), position = letter.position, error = %failed.error, "dead letter retried and failed again");
        RetryOutcome::Failed {
            error: failed.error.clone(),
            attempts,
        }
    } else {
        // Listeners (subscriptions, caches) learn of the rows the event changed; the
        // checkpoint does not move.
        changes::publish(
            &mut tx,
            &ChangeNotice::of_batch(projection, checkpoint, &applied.touched),
        )
        .await?;
        sqlx::query(
            "UPDATE projection_dead_letters
             SET state = 'retried', attempts = attempts + 1, last_attempt_at = now(), resolved_at = now(), resolved_by = $2
             WHERE id = $1",
        )
        .bind(id)
        .bind(actor)
        .execute(&mut *tx)
        .await?;
        tracing::info!(id, projection = projection.name(), position = letter.position, %actor, "dead letter retried and applied");
        RetryOutcome::Applied
    };
    tx.commit().await?;
    Ok(report(outcome))
}

/// Why `letter` must not be applied to the live tables, if it must not.
async fn refusal(
    conn: &mut PgConnection,
    projection: Projection,
    letter: &LockedLetter,
) -> Result<Option<Refusal>, sqlx::Error> {
    if letter.event_id.is_none() {
        return Ok(Some(Refusal::NotAnEvent));
    }
    let live_schema: String = sqlx::query_scalar("SELECT current_schema()::text")
        .fetch_one(&mut *conn)
        .await?;
    if letter.parked_in.as_deref() != Some(live_schema.as_str()) {
        return Ok(Some(Refusal::ParkedElsewhere {
            parked_in: letter.parked_in.clone(),
        }));
    }
    let swapped_at: Option<DateTime<Utc>> =
        sqlx::query_scalar("SELECT max(swapped_at) FROM projection_rebuilds WHERE projection = $1 AND state = 'live'")
            .bind(projection.name())
            .fetch_one(&mut *conn)
            .await?;
    Ok(match swapped_at {
        Some(swapped_at) if letter.created_at <= swapped_at => Some(Refusal::SupersededByReplay { swapped_at }),
        _ => None,
    })
}

/// The position of the last event applied to the `fleet` row of stream `stream_id`, if it
/// has a row.
async fn stream_row_position(
    conn: &mut PgConnection,
    layout: read_models::versions::TableLayout,
    stream_type: StreamType,
    stream_id: Uuid,
) -> Result<Option<i64>, sqlx::Error> {
    let statement = match stream_type {
        StreamType::Device => "SELECT updated_position FROM devices WHERE device_id = $1",
        StreamType::User if layout.has_users_and_history() => "SELECT updated_position FROM users WHERE user_id = $1",
        _ => return Ok(None),
    };
    sqlx::query_scalar(statement).bind(stream_id).fetch_optional(conn).await
}

/// Retries every pending letter (of `projection`, when given) in log order, each in its own
/// transaction: one that fails or is refused stays pending and the next is tried.
pub async fn retry_pending(
    pool: &PgPool,
    projection: Option<Projection>,
    actor: &str,
) -> Result<Vec<RetryReport>, DeadLetterError> {
    valid_note(actor, MAX_ACTOR_CHARS).ok_or(DeadLetterError::BadActor)?;
    let ids: Vec<i64> = sqlx::query_scalar(
        "SELECT id FROM projection_dead_letters
         WHERE state = 'pending' AND ($1::text IS NULL OR projection = $1)
         ORDER BY position, id",
    )
    .bind(projection.map(Projection::name))
    .fetch_all(pool)
    .await?;
    let mut reports = Vec::with_capacity(ids.len());
    for id in ids {
        reports.push(retry(pool, id, projection, actor).await?);
    }
    Ok(reports)
}

/// Marks letter `id` (of `expected`'s projection, when given) `skipped` with `reason`,
/// keeping the row. Nothing is applied.
pub async fn skip(
    pool: &PgPool,
    id: i64,
    expected: Option<Projection>,
    reason: &str,
    actor: &str,
) -> Result<SkipOutcome, DeadLetterError> {
    let reason = valid_note(reason, MAX_REASON_CHARS).ok_or(DeadLetterError::BadReason)?;
    let actor = valid_note(actor, MAX_ACTOR_CHARS).ok_or(DeadLetterError::BadActor)?;
    let mut tx = pool.begin().await?;
    let letter = lock_letter(&mut tx, id, expected).await?;
    if letter.state != DeadLetterState::Pending {
        return Ok(SkipOutcome::AlreadyResolved {
            state: letter.state,
            resolved_at: letter.resolved_at,
            resolved_by: letter.resolved_by,
        });
    }
    sqlx::query(
        "UPDATE projection_dead_letters
         SET state = 'skipped', resolved_at = now(), resolved_by = $2, resolution_note = $3
         WHERE id = $1",
    )
    .bind(id)
    .bind(actor)
    .bind(reason)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    tracing::info!(id, projection = %letter.projection, position = letter.position, %actor, %reason, "dead letter skipped");
    Ok(SkipOutcome::Skipped)
}

/// How often [`watch_pending`] counts the pending letters.
pub const PENDING_CHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Keeps the gauge of pending dead letters of every projection current until `stop` is
/// cancelled. Counted from the table (through the partial index of pending letters) rather
/// than by the projector: an operator retries or skips from another process. A failed count
/// leaves the last value.
pub async fn watch_pending(pool: PgPool, stop: tokio_util::sync::CancellationToken) {
    let mut ticks = tokio::time::interval(PENDING_CHECK_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        for projection in Projection::ALL {
            match read_models::dead_letters::pending(&pool, projection).await {
                Ok(pending) => metrics::gauge!(
                    crate::metrics_names::PROJECTION_DEAD_LETTERS_PENDING, "projection" => projection.name()
                )
                .set(pending as f64),
                Err(error) => {
                    tracing::debug!(projection = projection.name(), %error, "cannot count pending dead letters")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_note_is_trimmed_and_refused_when_blank_huge_or_full_of_control_characters() {
        assert_eq!(valid_note("  fixed upstream  ", 100), Some("fixed upstream"));
        assert_eq!(valid_note("", 100), None);
        assert_eq!(valid_note(" \t ", 100), None);
        assert_eq!(valid_note(&"x".repeat(101), 100), None);
        assert_eq!(valid_note(&"é".repeat(100), 100).map(str::len), Some(200));
        assert_eq!(valid_note("two\nlines", 100), None);
        assert_eq!(valid_note("bell\u{7}", 100), None);
    }
}
