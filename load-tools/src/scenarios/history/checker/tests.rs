//! Histories made by a model of a correct platform (the domain decides, the log records),
//! then broken in each way the checker must name.

use chrono::TimeZone;
use event_schema::{Event, Quota, Tier};

use super::*;
use crate::scenarios::history::record::{Outcome, Request};

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
