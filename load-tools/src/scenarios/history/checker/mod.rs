//! The history checker: pure code that holds a history of client operations against the log
//! they left, and names every broken promise.
//!
//! Properties, each a [`ViolationKind`]:
//!
//! - Every event was asked for: it carries the Idempotency-Key of an operation in the history,
//!   and lies on the streams that operation is about.
//! - Every acknowledged command is in the log exactly once (one event of its own type, such
//!   as `DeviceStarted` for a start, among the events with its key), at the stream version and
//!   position it was answered with. An acknowledgement with no events is a no-op, which must
//!   be what the domain decides on a state the stream had while the request ran, at the
//!   version answered.
//! - A refused command wrote nothing; an indeterminate one (given up) is in the log at most
//!   once.
//! - Effects follow real time: a command acknowledged before another was sent is before it
//!   in the log.
//! - The events of each application are what `decide` makes of the state right before them.
//! - Every refusal is justified by a state the streams it reads had while it ran. The
//!   candidate states are cuts of the log at a position `p`, the device and its owner each
//!   folded with the domain's own `evolve` up to `p`: `p` must be at or after every event of
//!   operations acknowledged before the refused one was sent, and before every event of
//!   operations sent after it was answered; events of operations in between (indeterminate,
//!   or still running) may be either side. The refusal is justified if `decide` on one of
//!   those states fails with the same code (or the route refuses the request before reading
//!   any state).
//!
//! The log is read whole after the run, so an operation given up whose append committed
//! late is in it; the checker never needs to know when an event committed, only where.
//!
//! The code is in three parts: this module's report types and entry point, the states of the
//! streams and the bounds real time puts on them ([`states`]), and the rules themselves
//! ([`rules`]).

mod rules;
mod states;
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests;

use std::collections::{BTreeMap, HashSet};

use chrono::{DateTime, Utc};
use event_schema::StreamType;
use serde::Serialize;
use uuid::Uuid;

use self::rules::Checker;
use super::record::{LoggedEvent, Operation};

/// What the checker found wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ViolationKind {
    /// Positions with gaps, stream versions out of order, a payload that does not decode, or
    /// two operations sharing a key (a bug of the client).
    MalformedLog,
    /// An event no operation asked for: no key, a key nobody sent, or on a stream its
    /// operation is not about.
    Unrequested,
    /// Acknowledged, but its events are not in the log (and no state explains a no-op).
    AcknowledgedMissing,
    /// Acknowledged, and in the log at another stream version or position than answered.
    AcknowledgedElsewhere,
    /// Its events are in the log more than once.
    AppliedTwice,
    /// Refused, yet its events are in the log.
    RefusedWithEffect,
    /// Refused with a code no state of its streams during the request gives.
    UnjustifiedRefusal,
    /// Its events are not what the domain decides on the state before them.
    UndecidedEffect,
    /// Before, in the log, a command that was acknowledged before it was sent.
    RealTimeOrder,
    /// Answered 5xx other than 503 (or a malformed 2xx) on some attempt.
    ServerError,
}

#[derive(Debug, Clone, Serialize)]
pub struct Violation {
    pub kind: ViolationKind,
    /// The operation's index in the history, when one is concerned.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub operation: Option<usize>,
    /// The log position concerned, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub position: Option<i64>,
    pub detail: String,
}

/// Figures of a check, besides the violations.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Tally {
    pub events: usize,
    pub operations: usize,
    /// Refusals justified by a state of the streams (as opposed to the route's validation).
    pub refusals_justified_by_state: usize,
    pub refusals_justified_by_route: usize,
    /// Acknowledged commands that changed nothing (the state already was what they asked).
    pub acknowledged_no_ops: usize,
    /// Operations given up whose command is in the log, and those whose command is not.
    pub indeterminate_applied: usize,
    pub indeterminate_not_applied: usize,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Checked {
    pub violations: Vec<Violation>,
    pub tally: Tally,
}

/// Checks `history` against `log` (every event of the log, in position order). `now` is the
/// time decisions are re-run at (after every event; only the contents of billing events
/// depend on it, never whether a command is refused).
pub fn check(history: &[Operation], log: &[LoggedEvent], now: DateTime<Utc>) -> Checked {
    let mut checker = Checker::new(history, log, now);
    checker.run();
    Checked {
        violations: checker.violations,
        tally: checker.tally,
    }
}

/// The streams a command's decision reads: its device and the owner, or the user.
fn read_streams(operation: &Operation) -> Vec<Uuid> {
    let mut streams = vec![operation.user];
    if let Some(device) = operation.device {
        streams.push(device);
    }
    streams
}

fn per_stream_types<'e>(events: impl Iterator<Item = (StreamType, &'e str)>) -> BTreeMap<StreamType, Vec<&'e str>> {
    let mut types: BTreeMap<StreamType, Vec<&str>> = BTreeMap::new();
    for (stream_type, event_type) in events {
        types.entry(stream_type).or_default().push(event_type);
    }
    types
}

fn describe(operation: &Operation) -> String {
    let target = operation.device.unwrap_or(operation.user);
    format!(
        "operation {} ({} of {target}, key {}, client {}, sent at {:.3} s, answered at {:.3} s after {} attempts)",
        operation.id,
        operation.request.name(),
        operation.key,
        operation.client,
        operation.invoked_us as f64 / 1e6,
        operation.completed_us as f64 / 1e6,
        operation.attempts
    )
}

/// Violations by kind.
pub fn by_kind(violations: &[Violation]) -> BTreeMap<ViolationKind, usize> {
    let mut counts = BTreeMap::new();
    for violation in violations {
        *counts.entry(violation.kind).or_insert(0) += 1;
    }
    counts
}

/// The keys of operations a violation names, for dumping their histories.
pub fn operations_named(violations: &[Violation]) -> HashSet<usize> {
    violations.iter().filter_map(|v| v.operation).collect()
}
