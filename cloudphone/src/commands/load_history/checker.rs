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

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, Utc};
use domain::PricingTable;
use domain::device::{self, DeviceContext, DeviceState};
use domain::user::{self, UserState};
use event_schema::{Event, StreamType};
use serde::Serialize;
use uuid::Uuid;

use super::history::{Command, LoggedEvent, Operation, Outcome};

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

/// The positions one operation's events take on one stream.
#[derive(Debug, Clone, Copy)]
struct Touch {
    op: usize,
    first: i64,
    last: i64,
}

/// For one stream, what real time allows: the last position of operations acknowledged by a
/// given time, and the first position of operations sent after a given time.
#[derive(Debug, Default)]
struct Bounds {
    /// (completed, running max of last positions) over acknowledged operations, by completion.
    acknowledged: Vec<(u64, i64)>,
    /// (invoked, min of first positions from here on) over all operations, by invocation.
    invoked: Vec<(u64, i64)>,
}

impl Bounds {
    fn new(touches: &[Touch], history: &[Operation]) -> Self {
        let mut acknowledged: Vec<(u64, i64)> = touches
            .iter()
            .filter(|t| matches!(history[t.op].outcome, Outcome::Acknowledged { .. }))
            .map(|t| (history[t.op].completed_us, t.last))
            .collect();
        acknowledged.sort_unstable();
        let mut running = 0;
        for entry in &mut acknowledged {
            running = running.max(entry.1);
            entry.1 = running;
        }
        let mut invoked: Vec<(u64, i64)> = touches.iter().map(|t| (history[t.op].invoked_us, t.first)).collect();
        invoked.sort_unstable();
        let mut least = i64::MAX;
        for entry in invoked.iter_mut().rev() {
            least = least.min(entry.1);
            entry.1 = least;
        }
        Bounds { acknowledged, invoked }
    }

    /// The last position of operations acknowledged strictly before `at` (0: none).
    fn acknowledged_before(&self, at: u64) -> i64 {
        let n = self.acknowledged.partition_point(|(completed, _)| *completed < at);
        if n == 0 { 0 } else { self.acknowledged[n - 1].1 }
    }

    /// The first position of operations invoked strictly after `at` (`i64::MAX`: none).
    fn invoked_after(&self, at: u64) -> i64 {
        let n = self.invoked.partition_point(|(invoked, _)| *invoked <= at);
        self.invoked.get(n).map_or(i64::MAX, |(_, first)| *first)
    }
}

/// An aggregate the checker folds with the domain's own `evolve`.
trait Fold: Default + Clone {
    fn apply(self, event: &Event) -> Self;
}

impl Fold for DeviceState {
    fn apply(self, event: &Event) -> Self {
        match event {
            Event::Device(event) => device::evolve(self, event),
            Event::User(_) => self,
        }
    }
}

impl Fold for UserState {
    fn apply(self, event: &Event) -> Self {
        match event {
            Event::User(event) => user::evolve(self, event),
            Event::Device(_) => self,
        }
    }
}

/// Every state of one stream, rebuilt on demand from snapshots taken every [`Self::EVERY`]
/// events.
struct States<S> {
    /// Indices into the log, in version order.
    events: Vec<usize>,
    /// The state after `i * EVERY` events.
    snapshots: Vec<S>,
}

/// A stream's state at a cut of the log.
struct At<S> {
    state: S,
    version: i64,
    last_position: i64,
}

impl<S: Fold> States<S> {
    const EVERY: usize = 32;

    fn new(events: Vec<usize>, log: &[LoggedEvent]) -> Self {
        let mut snapshots = vec![S::default()];
        let mut state = S::default();
        for (n, index) in events.iter().enumerate() {
            if let Some(event) = &log[*index].event {
                state = state.apply(event);
            }
            if (n + 1) % Self::EVERY == 0 {
                snapshots.push(state.clone());
            }
        }
        States { events, snapshots }
    }

    /// The state after every event at or before position `cut`.
    fn at(&self, cut: i64, log: &[LoggedEvent]) -> At<S> {
        let count = self.events.partition_point(|index| log[*index].position <= cut);
        let base = count / Self::EVERY;
        let mut state = self.snapshots[base].clone();
        for index in &self.events[base * Self::EVERY..count] {
            if let Some(event) = &log[*index].event {
                state = state.apply(event);
            }
        }
        let (version, last_position) = match count {
            0 => (0, 0),
            n => {
                let last = &log[self.events[n - 1]];
                (last.stream_version, last.position)
            }
        };
        At {
            state,
            version,
            last_position,
        }
    }
}

/// An operation's events, as found by its key.
#[derive(Debug, Default)]
struct Effects {
    events: Vec<usize>,
    /// Events of the command's own type on its own stream: how many times it was applied.
    applications: usize,
}

struct Checker<'a> {
    history: &'a [Operation],
    log: &'a [LoggedEvent],
    now: DateTime<Utc>,
    pricing: PricingTable,
    devices: HashMap<Uuid, States<DeviceState>>,
    users: HashMap<Uuid, States<UserState>>,
    /// Per stream, the events of each operation on it.
    touches: HashMap<Uuid, Vec<Touch>>,
    bounds: HashMap<Uuid, Bounds>,
    effects: Vec<Effects>,
    violations: Vec<Violation>,
    tally: Tally,
}

impl<'a> Checker<'a> {
    fn new(history: &'a [Operation], log: &'a [LoggedEvent], now: DateTime<Utc>) -> Self {
        Checker {
            history,
            log,
            now,
            pricing: PricingTable::standard(),
            devices: HashMap::new(),
            users: HashMap::new(),
            touches: HashMap::new(),
            bounds: HashMap::new(),
            effects: Vec::new(),
            violations: Vec::new(),
            tally: Tally {
                events: log.len(),
                operations: history.len(),
                ..Tally::default()
            },
        }
    }

    fn violation(&mut self, kind: ViolationKind, operation: Option<usize>, position: Option<i64>, detail: String) {
        self.violations.push(Violation {
            kind,
            operation,
            position,
            detail,
        });
    }

    fn run(&mut self) {
        self.index_log();
        self.attribute_events();
        for op in 0..self.history.len() {
            self.check_effects(op);
        }
        self.check_real_time();
        for op in 0..self.history.len() {
            self.check_decisions(op);
        }
        for (op, operation) in self.history.iter().enumerate() {
            if !operation.server_errors.is_empty() {
                let detail = format!(
                    "{} {}: {}",
                    operation.request.name(),
                    operation.key,
                    operation.server_errors.join("; ")
                );
                self.violation(ViolationKind::ServerError, Some(op), None, detail);
            }
        }
    }

    /// Positions dense from 1, versions dense per stream, payloads that decode; and the states
    /// of every stream.
    fn index_log(&mut self) {
        let mut streams: BTreeMap<Uuid, (StreamType, Vec<usize>)> = BTreeMap::new();
        let mut malformed = Vec::new();
        for (index, event) in self.log.iter().enumerate() {
            let expected = index as i64 + 1;
            if event.position != expected {
                malformed.push((
                    event.position,
                    format!("position {} where {expected} was due", event.position),
                ));
            }
            if event.event.is_none() {
                malformed.push((event.position, format!("{} does not decode", event.event_type)));
            }
            let (stream_type, events) = streams
                .entry(event.stream_id)
                .or_insert_with(|| (event.stream_type, Vec::new()));
            let version = events.len() as i64 + 1;
            if event.stream_version != version || event.stream_type != *stream_type {
                malformed.push((
                    event.position,
                    format!(
                        "{} stream {} at version {} where {version} was due",
                        event.stream_type, event.stream_id, event.stream_version
                    ),
                ));
            }
            events.push(index);
        }
        for (position, detail) in malformed {
            self.violation(ViolationKind::MalformedLog, None, Some(position), detail);
        }
        for (stream, (stream_type, events)) in streams {
            match stream_type {
                StreamType::Device => {
                    self.devices.insert(stream, States::new(events, self.log));
                }
                StreamType::User => {
                    self.users.insert(stream, States::new(events, self.log));
                }
            }
        }
    }

    /// Finds each operation's events by key; events no operation explains are unrequested.
    fn attribute_events(&mut self) {
        let mut by_key: HashMap<&str, usize> = HashMap::new();
        for (op, operation) in self.history.iter().enumerate() {
            if let Some(other) = by_key.insert(operation.key.as_str(), op) {
                let detail = format!("operations {other} and {op} share the key {}", operation.key);
                self.violation(ViolationKind::MalformedLog, Some(op), None, detail);
            }
        }
        self.effects = (0..self.history.len()).map(|_| Effects::default()).collect();
        let mut unrequested = Vec::new();
        for (index, event) in self.log.iter().enumerate() {
            let Some(op) = event.key.as_deref().and_then(|key| by_key.get(key).copied()) else {
                unrequested.push((
                    event.position,
                    format!(
                        "{} on {} {} v{} with key {:?}: no operation sent that key",
                        event.event_type, event.stream_type, event.stream_id, event.stream_version, event.key
                    ),
                ));
                continue;
            };
            let operation = &self.history[op];
            let main = operation.device.unwrap_or(operation.user);
            if event.stream_id != main && event.stream_id != operation.user {
                unrequested.push((
                    event.position,
                    format!(
                        "{} on {} {} v{} carries the key of operation {op} ({} of {main})",
                        event.event_type,
                        event.stream_type,
                        event.stream_id,
                        event.stream_version,
                        operation.request.name()
                    ),
                ));
            }
            let effects = &mut self.effects[op];
            effects.events.push(index);
            if event.stream_id == main && event.event_type == operation.request.primary_event() {
                effects.applications += 1;
            }
        }
        for (position, detail) in unrequested {
            self.violation(ViolationKind::Unrequested, None, Some(position), detail);
        }
        for (op, effects) in self.effects.iter().enumerate() {
            let mut per_stream: BTreeMap<Uuid, Touch> = BTreeMap::new();
            for index in &effects.events {
                let event = &self.log[*index];
                let touch = per_stream.entry(event.stream_id).or_insert(Touch {
                    op,
                    first: event.position,
                    last: event.position,
                });
                touch.first = touch.first.min(event.position);
                touch.last = touch.last.max(event.position);
            }
            for (stream, touch) in per_stream {
                self.touches.entry(stream).or_default().push(touch);
            }
        }
        self.bounds = self
            .touches
            .iter()
            .map(|(stream, touches)| (*stream, Bounds::new(touches, self.history)))
            .collect();
    }

    /// Exactly once if acknowledged, never if refused, at most once if given up; where it was
    /// answered.
    fn check_effects(&mut self, op: usize) {
        let (history, log) = (self.history, self.log);
        let operation = &history[op];
        let effects = Effects {
            events: self.effects[op].events.clone(),
            applications: self.effects[op].applications,
        };
        let what = describe(operation);
        let applications = effects.applications;
        let first = effects.events.first().map(|i| log[*i].position);
        if applications > 1 {
            let positions: Vec<i64> = effects.events.iter().map(|i| log[*i].position).collect();
            let detail = format!("{what} applied {applications} times: positions {positions:?}");
            self.violation(ViolationKind::AppliedTwice, Some(op), first, detail);
        }
        if applications == 0 && !effects.events.is_empty() {
            let detail = format!("{what}: events with its key but none of its own type");
            self.violation(ViolationKind::UndecidedEffect, Some(op), first, detail);
        }
        match &operation.outcome {
            Outcome::Refused { status, code } => {
                if !effects.events.is_empty() {
                    let detail = format!(
                        "{what} refused {status} {code}, yet {} of its events are in the log",
                        effects.events.len()
                    );
                    self.violation(ViolationKind::RefusedWithEffect, Some(op), first, detail);
                }
                self.check_refusal(op, code);
            }
            Outcome::Indeterminate { .. } => {
                if applications == 0 {
                    self.tally.indeterminate_not_applied += 1;
                } else {
                    self.tally.indeterminate_applied += 1;
                }
            }
            Outcome::Acknowledged {
                id,
                stream_version,
                position,
            } => {
                let main = operation.device.unwrap_or(operation.user);
                if *id != main {
                    let detail = format!("{what} answered with id {id}");
                    self.violation(ViolationKind::AcknowledgedElsewhere, Some(op), None, detail);
                }
                if effects.events.is_empty() {
                    self.check_no_op(op, *stream_version, *position);
                } else if applications == 1 {
                    let last_position = effects.events.iter().map(|i| self.log[*i].position).max();
                    let last_version = effects
                        .events
                        .iter()
                        .map(|i| &self.log[*i])
                        .filter(|e| e.stream_id == main)
                        .map(|e| e.stream_version)
                        .max();
                    if last_position != Some(*position) || last_version != Some(*stream_version) {
                        let detail = format!(
                            "{what} answered version {stream_version} at position {position}; the log has it \
                             at version {last_version:?}, last position {last_position:?}"
                        );
                        self.violation(ViolationKind::AcknowledgedElsewhere, Some(op), first, detail);
                    }
                }
            }
        }
    }

    /// The cuts of the log the operation's decision may have read: from the last event of
    /// operations acknowledged before it was sent, to before the first event of operations
    /// sent after it was answered. An error when real time leaves no cut at all.
    fn cuts(&self, op: usize) -> Result<Vec<i64>, String> {
        let operation = &self.history[op];
        let streams = read_streams(operation);
        let mut lo = 0;
        let mut hi = i64::MAX;
        for stream in &streams {
            if let Some(bounds) = self.bounds.get(stream) {
                lo = lo.max(bounds.acknowledged_before(operation.invoked_us));
                hi = hi.min(bounds.invoked_after(operation.completed_us));
            }
        }
        if lo >= hi {
            return Err(format!(
                "no state fits: operations acknowledged before it was sent end at position {lo}, \
                 operations sent after it was answered begin at {hi}"
            ));
        }
        let mut cuts = vec![lo];
        for stream in &streams {
            let events = match (self.devices.get(stream), self.users.get(stream)) {
                (Some(states), _) => &states.events,
                (None, Some(states)) => &states.events,
                (None, None) => continue,
            };
            let from = events.partition_point(|i| self.log[*i].position <= lo);
            cuts.extend(
                events[from..]
                    .iter()
                    .map(|i| self.log[*i].position)
                    .take_while(|position| *position < hi),
            );
        }
        cuts.sort_unstable();
        cuts.dedup();
        Ok(cuts)
    }

    /// What the command API decides for the operation at a cut: the events, or a refusal's
    /// code; and the version and last position of the command's own stream there.
    fn decide_at(
        &self,
        operation: &Operation,
        command: &Command,
        cut: i64,
    ) -> (Result<Vec<Event>, &'static str>, i64, i64) {
        match command {
            Command::User(command) => {
                let at = self.user_at(operation.user, cut);
                let decided = user::decide(command, &at.state, self.now)
                    .map(|events| events.into_iter().map(Event::User).collect())
                    .map_err(|e| e.code());
                (decided, at.version, at.last_position)
            }
            Command::Device(command) => {
                let Some(device_id) = operation.device else {
                    return (Err("no_device"), 0, 0);
                };
                let device = self.device_at(device_id, cut);
                let owner = self.user_at(operation.user, cut);
                let decided = match (command, device.state.device()) {
                    (device::DeviceCommand::Create { .. }, _) => Ok(()),
                    (_, Some(d)) if d.owner_id == operation.user => Ok(()),
                    // The command API answers another owner's device as a missing one.
                    _ => Err("device_not_found"),
                }
                .and_then(|()| {
                    let ctx = DeviceContext {
                        device: &device.state,
                        owner: &owner.state,
                        pricing: &self.pricing,
                    };
                    device::decide(command, ctx, self.now).map_err(|e| e.code())
                });
                (decided, device.version, device.last_position)
            }
        }
    }

    fn device_at(&self, stream: Uuid, cut: i64) -> At<DeviceState> {
        match self.devices.get(&stream) {
            Some(states) => states.at(cut, self.log),
            None => At {
                state: DeviceState::default(),
                version: 0,
                last_position: 0,
            },
        }
    }

    fn user_at(&self, stream: Uuid, cut: i64) -> At<UserState> {
        match self.users.get(&stream) {
            Some(states) => states.at(cut, self.log),
            None => At {
                state: UserState::default(),
                version: 0,
                last_position: 0,
            },
        }
    }

    fn check_refusal(&mut self, op: usize, code: &str) {
        let operation = &self.history[op];
        if operation.request.refused_by_route() == Some(code) {
            self.tally.refusals_justified_by_route += 1;
            return;
        }
        let what = describe(operation);
        let Some(command) = operation.request.command(operation.user, operation.device) else {
            let detail = format!("{what} refused {code}, which its request does not explain");
            self.violation(ViolationKind::UnjustifiedRefusal, Some(op), None, detail);
            return;
        };
        let cuts = match self.cuts(op) {
            Ok(cuts) => cuts,
            Err(why) => {
                let detail = format!("{what} refused {code}: {why}");
                self.violation(ViolationKind::UnjustifiedRefusal, Some(op), None, detail);
                return;
            }
        };
        let mut seen = Vec::new();
        for cut in &cuts {
            let (decided, version, _) = self.decide_at(operation, &command, *cut);
            if decided.as_ref().err() == Some(&code) {
                self.tally.refusals_justified_by_state += 1;
                return;
            }
            seen.push(format!(
                "at position {cut} (v{version}): {}",
                match &decided {
                    Ok(events) if events.is_empty() => "no-op".to_owned(),
                    Ok(events) => format!("{} events", events.len()),
                    Err(other) => (*other).to_owned(),
                }
            ));
        }
        let detail = format!(
            "{what} refused {code}, but every state it may have read decides otherwise: {}",
            seen.join(", ")
        );
        self.violation(
            ViolationKind::UnjustifiedRefusal,
            Some(op),
            cuts.first().copied(),
            detail,
        );
    }

    /// An acknowledgement with no events: the state already was what the command asked, at
    /// the version answered (and the position answered is at or after that version's event).
    fn check_no_op(&mut self, op: usize, stream_version: i64, position: i64) {
        let operation = &self.history[op];
        let what = describe(operation);
        let command = operation.request.command(operation.user, operation.device);
        let cuts = match (&command, self.cuts(op)) {
            (Some(_), Ok(cuts)) => cuts,
            (None, _) => Vec::new(),
            (_, Err(why)) => {
                let detail = format!("{what} acknowledged with no events: {why}");
                self.violation(ViolationKind::AcknowledgedMissing, Some(op), None, detail);
                return;
            }
        };
        if let Some(command) = &command {
            for cut in &cuts {
                let (decided, version, last_position) = self.decide_at(operation, command, *cut);
                if decided.as_ref().is_ok_and(Vec::is_empty) && version == stream_version && position >= last_position {
                    self.tally.acknowledged_no_ops += 1;
                    return;
                }
            }
        }
        let detail = format!(
            "{what} acknowledged at version {stream_version}, position {position}, but none of its events \
             is in the log, and no state it may have read makes it a no-op"
        );
        self.violation(ViolationKind::AcknowledgedMissing, Some(op), None, detail);
    }

    /// A command acknowledged before another was sent is before it in the log, on every
    /// stream both touch.
    fn check_real_time(&mut self) {
        let mut late = Vec::new();
        for (stream, touches) in &self.touches {
            let Some(bounds) = self.bounds.get(stream) else {
                continue;
            };
            for touch in touches {
                let operation = &self.history[touch.op];
                let before = bounds.acknowledged_before(operation.invoked_us);
                if before >= touch.first {
                    late.push((
                        touch.op,
                        touch.first,
                        format!(
                            "{} is at position {} on {stream}, not after position {before} of a command \
                             acknowledged before it was sent",
                            describe(operation),
                            touch.first
                        ),
                    ));
                }
            }
        }
        late.sort_by_key(|(op, _, _)| *op);
        for (op, position, detail) in late {
            self.violation(ViolationKind::RealTimeOrder, Some(op), Some(position), detail);
        }
    }

    /// The events of an operation applied once are what `decide` makes of the state right
    /// before them: the same event types on each stream, in order.
    fn check_decisions(&mut self, op: usize) {
        let operation = &self.history[op];
        let effects = &self.effects[op];
        if effects.applications != 1 {
            return;
        }
        let Some(command) = operation.request.command(operation.user, operation.device) else {
            return;
        };
        let Some(first) = effects.events.iter().map(|i| self.log[*i].position).min() else {
            return;
        };
        let (decided, _, _) = self.decide_at(operation, &command, first - 1);
        let logged = per_stream_types(effects.events.iter().map(|i| {
            let event = &self.log[*i];
            (event.stream_type, event.event_type.as_str())
        }));
        let matches = match &decided {
            Ok(events) => per_stream_types(events.iter().map(|e| (e.stream_type(), e.event_type()))) == logged,
            Err(_) => false,
        };
        if !matches {
            let detail = format!(
                "{} wrote {logged:?} at position {first}; on the state before it the domain decides {}",
                describe(operation),
                match &decided {
                    Ok(events) => format!(
                        "{:?}",
                        per_stream_types(events.iter().map(|e| (e.stream_type(), e.event_type())))
                    ),
                    Err(code) => format!("a refusal ({code})"),
                }
            );
            self.violation(ViolationKind::UndecidedEffect, Some(op), Some(first), detail);
        }
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    //! Histories made by a model of a correct platform (the domain decides, the log records),
    //! then broken in each way the checker must name.

    use chrono::TimeZone;
    use event_schema::{Quota, Tier};

    use super::super::history::Request;
    use super::*;

    /// A correct platform in memory: a log, and operations timed on a clock that moves one
    /// tick per step.
    struct World {
        log: Vec<LoggedEvent>,
        history: Vec<Operation>,
        clock: u64,
        user: Uuid,
    }

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2030, 1, 1, 0, 0, 0).unwrap()
    }

    impl World {
        /// A registered user with a big quota.
        fn new() -> Self {
            let mut world = World {
                log: Vec::new(),
                history: Vec::new(),
                clock: 0,
                user: Uuid::from_u128(0x0005e7),
            };
            world.run(
                None,
                Request::Register {
                    tier: Tier::Enterprise,
                    email: "ada@example.com".into(),
                    phone: "+4915112345678".into(),
                },
            );
            world.run(
                None,
                Request::SetQuota {
                    quota: Quota {
                        max_devices: 1000,
                        max_cpu_cores: 1000,
                        max_memory_mb: 1_000_000,
                    },
                },
            );
            world
        }

        fn tick(&mut self) -> u64 {
            self.clock += 10;
            self.clock
        }

        /// Sends an operation without deciding it yet; returns its index.
        fn invoke(&mut self, device: Option<Uuid>, request: Request) -> usize {
            let id = self.history.len();
            let invoked_us = self.tick();
            self.history.push(Operation {
                id,
                client: 0,
                user: self.user,
                device,
                request,
                key: format!("key-{id}"),
                invoked_us,
                completed_us: invoked_us,
                attempts: 1,
                server_errors: Vec::new(),
                retried_after: BTreeMap::new(),
                outcome: Outcome::Indeterminate {
                    reason: "in flight".into(),
                },
            });
            id
        }

        /// Decides the operation on the log's current state and appends its events; returns
        /// the answer a correct API gives.
        fn apply(&mut self, op: usize) -> Outcome {
            let operation = self.history[op].clone();
            let command = operation.request.command(operation.user, operation.device).unwrap();
            let (decided, version, last_position) = {
                let mut checker = Checker::new(&[], &self.log, now());
                checker.index_log();
                checker.decide_at(&operation, &command, self.log.len() as i64)
            };
            let main = operation.device.unwrap_or(operation.user);
            let events = match decided {
                Err(code) => {
                    return Outcome::Refused {
                        status: 409,
                        code: code.to_owned(),
                    };
                }
                Ok(events) if events.is_empty() => {
                    return Outcome::Acknowledged {
                        id: main,
                        stream_version: version,
                        position: last_position,
                    };
                }
                Ok(events) => events,
            };
            // Device events first, then the owner's, as the command API appends them.
            let (own, owner): (Vec<Event>, Vec<Event>) = events
                .into_iter()
                .partition(|e| e.stream_type() == StreamType::Device || operation.device.is_none());
            let mut stream_version = 0;
            for (stream, events) in [(main, own), (operation.user, owner)] {
                let mut version = self.log.iter().filter(|e| e.stream_id == stream).count() as i64;
                for event in events {
                    version += 1;
                    if stream == main {
                        stream_version = version;
                    }
                    self.log.push(LoggedEvent {
                        position: self.log.len() as i64 + 1,
                        stream_id: stream,
                        stream_type: event.stream_type(),
                        stream_version: version,
                        event_type: event.event_type().to_owned(),
                        key: Some(operation.key.clone()),
                        event: Some(event),
                    });
                }
            }
            Outcome::Acknowledged {
                id: main,
                stream_version,
                position: self.log.len() as i64,
            }
        }

        /// Records the answer the client got.
        fn answer(&mut self, op: usize, outcome: Outcome) {
            let completed_us = self.tick();
            self.history[op].completed_us = completed_us;
            self.history[op].outcome = outcome;
        }

        /// One operation, decided and answered at once.
        fn run(&mut self, device: Option<Uuid>, request: Request) -> Outcome {
            let op = self.invoke(device, request);
            let outcome = self.apply(op);
            self.answer(op, outcome.clone());
            outcome
        }

        fn create(&mut self, reference: &str) -> Uuid {
            let device = domain::ids::device_id_for_reference(self.user, reference);
            let created = self.run(
                Some(device),
                Request::Create {
                    reference: reference.into(),
                    provider: "aws".into(),
                    cpu_cores: 2,
                    memory_mb: 2048,
                    android_version: 14,
                },
            );
            assert!(matches!(created, Outcome::Acknowledged { .. }), "{created:?}");
            device
        }

        fn check(&self) -> Checked {
            check(&self.history, &self.log, now())
        }
    }

    fn kinds(checked: &Checked) -> Vec<ViolationKind> {
        checked.violations.iter().map(|v| v.kind).collect()
    }

    #[test]
    fn a_correct_history_passes() {
        let mut world = World::new();
        let phone = world.create("phone-1");
        let tablet = world.create("tablet-1");
        world.run(Some(phone), Request::Start);
        world.run(
            Some(tablet),
            Request::Resize {
                cpu_cores: 4,
                memory_mb: 4096,
            },
        );
        // A no-op: already that size.
        let same = world.run(
            Some(tablet),
            Request::Resize {
                cpu_cores: 4,
                memory_mb: 4096,
            },
        );
        assert!(
            matches!(same, Outcome::Acknowledged { stream_version: 2, .. }),
            "{same:?}"
        );
        // Justified refusals: the state says so.
        let refused = world.run(Some(phone), Request::Start);
        assert_eq!(
            refused,
            Outcome::Refused {
                status: 409,
                code: "device_already_running".into()
            }
        );
        world.run(Some(phone), Request::Stop);
        world.run(Some(tablet), Request::Delete);
        world.run(Some(tablet), Request::Start);
        world.run(Some(Uuid::from_u128(7)), Request::Stop);
        // The route refuses a malformed reference before reading anything.
        let malformed = world.invoke(
            None,
            Request::Create {
                reference: "two words".into(),
                provider: "aws".into(),
                cpu_cores: 2,
                memory_mb: 2048,
                android_version: 14,
            },
        );
        world.answer(
            malformed,
            Outcome::Refused {
                status: 422,
                code: "invalid_device_reference".into(),
            },
        );
        // Given up twice: once applied (late), once never.
        let lost = world.invoke(Some(phone), Request::Start);
        world.answer(lost, Outcome::Indeterminate { reason: "503".into() });
        world.apply(lost);
        let never = world.invoke(
            Some(phone),
            Request::Resize {
                cpu_cores: 8,
                memory_mb: 8192,
            },
        );
        world.answer(
            never,
            Outcome::Indeterminate {
                reason: "transport".into(),
            },
        );
        // Justified by the late start of the operation given up, which the client cannot know.
        let after = world.run(Some(phone), Request::Start);
        assert!(matches!(after, Outcome::Refused { .. }));

        let checked = world.check();
        assert!(checked.violations.is_empty(), "{:#?}", checked.violations);
        assert_eq!(checked.tally.acknowledged_no_ops, 1);
        assert_eq!(checked.tally.refusals_justified_by_state, 4);
        assert_eq!(checked.tally.refusals_justified_by_route, 1);
        assert_eq!(checked.tally.indeterminate_applied, 1);
        assert_eq!(checked.tally.indeterminate_not_applied, 1);
    }

    #[test]
    fn a_refusal_may_rest_on_an_operation_still_running() {
        let mut world = World::new();
        let phone = world.create("phone-1");
        // A stop sent, then a start sent while the stop is still running (a retry storm): the
        // start's refusal may have read the state before the stop or after it.
        world.run(Some(phone), Request::Start);
        let stop = world.invoke(Some(phone), Request::Stop);
        let start = world.invoke(Some(phone), Request::Start);
        let refused = world.apply(start);
        world.answer(start, refused);
        let stopped = world.apply(stop);
        world.answer(stop, stopped);
        let checked = world.check();
        assert!(checked.violations.is_empty(), "{:#?}", checked.violations);
        assert_eq!(checked.tally.refusals_justified_by_state, 1);
    }

    #[test]
    fn an_acknowledged_command_missing_from_the_log_is_flagged() {
        let mut world = World::new();
        let phone = world.create("phone-1");
        world.run(Some(phone), Request::Start);
        // Acknowledged, then lost: the start's event is gone from the log.
        world.log.pop();
        let checked = world.check();
        assert_eq!(
            kinds(&checked),
            vec![ViolationKind::AcknowledgedMissing],
            "{checked:#?}"
        );
        assert_eq!(checked.violations[0].operation, Some(3));
    }

    #[test]
    fn a_command_applied_twice_is_flagged() {
        let mut world = World::new();
        let phone = world.create("phone-1");
        world.run(Some(phone), Request::Start);
        world.run(Some(phone), Request::Stop);
        // The start applied again under the same key, as a retry that missed the stored
        // outcome would (which also puts it after the stop acknowledged meanwhile).
        let start = 3;
        world.apply(start);
        let checked = world.check();
        assert!(
            checked
                .violations
                .iter()
                .any(|v| v.kind == ViolationKind::AppliedTwice && v.operation == Some(start)),
            "{checked:#?}"
        );
    }

    #[test]
    fn an_acknowledgement_naming_another_version_is_flagged() {
        let mut world = World::new();
        let phone = world.create("phone-1");
        let op = world.invoke(Some(phone), Request::Start);
        let Outcome::Acknowledged { id, position, .. } = world.apply(op) else {
            panic!("not acknowledged");
        };
        world.answer(
            op,
            Outcome::Acknowledged {
                id,
                stream_version: 3,
                position,
            },
        );
        let checked = world.check();
        assert_eq!(
            kinds(&checked),
            vec![ViolationKind::AcknowledgedElsewhere],
            "{checked:#?}"
        );
    }

    #[test]
    fn a_refused_command_with_an_effect_is_flagged() {
        let mut world = World::new();
        let phone = world.create("phone-1");
        let op = world.invoke(Some(phone), Request::Start);
        world.apply(op);
        world.answer(
            op,
            Outcome::Refused {
                status: 409,
                code: "device_already_running".into(),
            },
        );
        let checked = world.check();
        assert!(
            kinds(&checked).contains(&ViolationKind::RefusedWithEffect),
            "{checked:#?}"
        );
    }

    /// Issue #20's bug: a stop timed out (503) while its append waited in the writer's queue;
    /// the append committed later, and the retry with the same key was answered from it. The
    /// API's cached aggregate still held the device running, so the next start was refused
    /// `device_already_running` although every state the log had since the stop says stopped.
    #[test]
    fn a_refusal_decided_on_a_stale_cache_is_flagged() {
        let mut world = World::new();
        let phone = world.create("phone-1");
        world.run(Some(phone), Request::Start);
        let stop = world.invoke(Some(phone), Request::Stop);
        let stopped = world.apply(stop);
        world.answer(stop, stopped);
        let start = world.invoke(Some(phone), Request::Start);
        world.answer(
            start,
            Outcome::Refused {
                status: 409,
                code: "device_already_running".into(),
            },
        );
        let checked = world.check();
        assert_eq!(kinds(&checked), vec![ViolationKind::UnjustifiedRefusal], "{checked:#?}");
        assert_eq!(checked.violations[0].operation, Some(start));
        assert!(
            checked.violations[0].detail.contains("no-op") || checked.violations[0].detail.contains("events"),
            "{}",
            checked.violations[0].detail
        );
    }

    #[test]
    fn a_refusal_of_the_route_for_a_valid_request_is_flagged() {
        let mut world = World::new();
        let phone = world.create("phone-1");
        let op = world.invoke(Some(phone), Request::Stop);
        world.answer(
            op,
            Outcome::Refused {
                status: 422,
                code: "invalid_device_reference".into(),
            },
        );
        let checked = world.check();
        assert_eq!(kinds(&checked), vec![ViolationKind::UnjustifiedRefusal], "{checked:#?}");
    }

    #[test]
    fn an_event_nobody_asked_for_is_flagged() {
        let mut world = World::new();
        let phone = world.create("phone-1");
        // A start nobody sent: with no key, then with a key no operation used.
        let op = world.invoke(Some(phone), Request::Start);
        world.apply(op);
        world.history.pop();
        world.log.last_mut().unwrap().key = None;
        let checked = world.check();
        assert_eq!(kinds(&checked), vec![ViolationKind::Unrequested], "{checked:#?}");
        world.log.last_mut().unwrap().key = Some("made-up".into());
        let checked = world.check();
        assert_eq!(kinds(&checked), vec![ViolationKind::Unrequested], "{checked:#?}");
    }

    #[test]
    fn a_command_acknowledged_before_another_was_sent_comes_first() {
        let mut world = World::new();
        let create = |reference: &str| Request::Create {
            reference: reference.into(),
            provider: "aws".into(),
            cpu_cores: 2,
            memory_mb: 2048,
            android_version: 14,
        };
        // Both creates reserve quota on the owner's stream.
        let a = domain::ids::device_id_for_reference(world.user, "a");
        let b = domain::ids::device_id_for_reference(world.user, "b");
        let first = world.invoke(Some(a), create("a"));
        let second = world.invoke(Some(b), create("b"));
        // `first` was answered before `second` was sent, yet the log has `second` first.
        let answer_b = world.apply(second);
        let answer_a = world.apply(first);
        world.history[first].completed_us = world.history[second].invoked_us - 1;
        world.history[first].outcome = answer_a;
        world.answer(second, answer_b);
        let checked = world.check();
        assert_eq!(kinds(&checked), vec![ViolationKind::RealTimeOrder], "{checked:#?}");
        assert_eq!(checked.violations[0].operation, Some(second));
    }

    #[test]
    fn events_the_domain_would_not_decide_are_flagged() {
        let mut world = World::new();
        let phone = world.create("phone-1");
        world.run(Some(phone), Request::Start);
        // The start's event relabelled as a stop of a device that was not running.
        let op = world.invoke(Some(phone), Request::Stop);
        world.answer(op, Outcome::Indeterminate { reason: "503".into() });
        let start = world.log.last_mut().unwrap();
        start.key = Some(world.history[op].key.clone());
        start.event_type = "DeviceStopped".into();
        world.history[op - 1].outcome = Outcome::Indeterminate { reason: "503".into() };
        let checked = world.check();
        assert!(
            kinds(&checked).contains(&ViolationKind::UndecidedEffect),
            "{checked:#?}"
        );
    }

    #[test]
    fn a_5xx_is_flagged_even_when_a_retry_succeeded() {
        let mut world = World::new();
        let phone = world.create("phone-1");
        world.run(Some(phone), Request::Start);
        world.history[3].server_errors.push("500 internal".into());
        let checked = world.check();
        assert_eq!(kinds(&checked), vec![ViolationKind::ServerError], "{checked:#?}");
    }

    #[test]
    fn a_gap_in_the_log_is_flagged() {
        let mut world = World::new();
        let phone = world.create("phone-1");
        world.run(Some(phone), Request::Start);
        world.log[4].position = 9;
        let checked = world.check();
        assert!(kinds(&checked).contains(&ViolationKind::MalformedLog), "{checked:#?}");
    }
}
