//! The checker's rules, applied in turn over a history and its log: the log well formed, every
//! event asked for, each operation's effects where and as often as its outcome says, real
//! time respected, every decision and every refusal what the domain makes of a state the
//! streams had.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use domain::PricingTable;
use domain::device::{self, DeviceContext, DeviceState};
use domain::user::{self, UserState};
use event_schema::{Event, StreamType};
use uuid::Uuid;

use super::states::{At, Bounds, States, Touch};
use super::{Tally, Violation, ViolationKind, describe, per_stream_types, read_streams};
use crate::scenarios::history::record::{Command, LoggedEvent, Operation, Outcome};

/// An operation's events, as found by its key.
#[derive(Debug, Default)]
struct Effects {
    events: Vec<usize>,
    /// Events of the command's own type on its own stream: how many times it was applied.
    applications: usize,
}

pub(super) struct Checker<'a> {
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
    pub(super) violations: Vec<Violation>,
    pub(super) tally: Tally,
}

impl<'a> Checker<'a> {
    pub(super) fn new(history: &'a [Operation], log: &'a [LoggedEvent], now: DateTime<Utc>) -> Self {
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

    pub(super) fn run(&mut self) {
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
    pub(super) fn index_log(&mut self) {
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
    pub(super) fn decide_at(
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
