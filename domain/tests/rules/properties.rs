//! Model-based property tests: random command sequences over a few users and devices, run
//! the way the command layer will run them (decide on the state rebuilt from the stored
//! streams, append, repeat), with the invariants checked after every step.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Duration, TimeZone, Utc};
use domain::device::{self, DeviceCommand, DeviceContext, DeviceState};
use domain::pricing::{self, PricingTable};
use domain::user::{self, UserCommand, UserState};
use event_schema::*;
use proptest::prelude::*;
use uuid::Uuid;

const USERS: [Uuid; 2] = [Uuid::from_u128(0x100), Uuid::from_u128(0x200)];
const DEVICES: [Uuid; 4] = [
    Uuid::from_u128(0x1),
    Uuid::from_u128(0x2),
    Uuid::from_u128(0x3),
    Uuid::from_u128(0x4),
];

#[derive(Debug, Clone)]
enum Step {
    User(usize, UserCommand),
    Device {
        device: usize,
        owner: usize,
        command: DeviceCommand,
    },
}

fn tier() -> impl Strategy<Value = Tier> {
    proptest::sample::select(Tier::ALL)
}

fn user_command() -> impl Strategy<Value = UserCommand> {
    prop_oneof![
        tier().prop_map(|tier| UserCommand::Register {
            user_id: Uuid::nil(), // replaced by the target user's id
            tier,
            email: Personal::new("user@example.com".into()),
            phone: Personal::new("+4915112345678".into()),
        }),
        (0u32..6, 0u32..40, prop_oneof![Just(0u32), 1024u32..40_000]).prop_map(|(d, c, m)| UserCommand::SetQuota {
            quota: Quota {
                max_devices: d,
                max_cpu_cores: c,
                max_memory_mb: m
            },
        }),
        tier().prop_map(|tier| UserCommand::ChangeTier { tier }),
        Just(UserCommand::Erase),
    ]
}

fn size() -> impl Strategy<Value = (u32, u32)> {
    // Mostly valid sizes, sometimes out of range.
    (
        prop_oneof![4 => 1u32..=16, 1 => Just(0u32), 1 => 17u32..64],
        prop_oneof![4 => (2u32..=128).prop_map(|n| n * 512), 1 => Just(1000u32)],
    )
}

fn device_command() -> impl Strategy<Value = DeviceCommand> {
    prop_oneof![
        2 => (prop_oneof![4 => Just("aws"), 2 => Just("gcp"), 1 => Just("moonbase")], size(), 8u8..=16).prop_map(
            |(provider, (cpu_cores, memory_mb), android_version)| DeviceCommand::Create {
                device_id: Uuid::nil(), // replaced by the target device's id
                owner_id: Uuid::nil(),  // replaced by the chosen owner's id
                provider: provider.into(),
                cpu_cores,
                memory_mb,
                android_version,
            }
        ),
        3 => Just(DeviceCommand::Start),
        3 => proptest::sample::select(StopReason::ALL).prop_map(|reason| DeviceCommand::Stop { reason }),
        1 => size().prop_map(|(cpu_cores, memory_mb)| DeviceCommand::Resize { cpu_cores, memory_mb }),
        1 => Just(DeviceCommand::Delete),
        1 => Just(DeviceCommand::ReportFailure { reason: "host lost".into() }),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        1 => (0..USERS.len(), user_command()).prop_map(|(u, c)| Step::User(u, c)),
        3 => (0..DEVICES.len(), 0..USERS.len(), device_command())
            .prop_map(|(device, owner, command)| Step::Device { device, owner, command }),
    ]
}

/// The streams as the log would hold them: stored JSON, decoded on every load.
#[derive(Default)]
struct Log {
    streams: HashMap<Uuid, Vec<(&'static str, u16, serde_json::Value)>>,
    /// Which user owns each device, as the `streams` table records it.
    owners: HashMap<Uuid, Uuid>,
}

impl Log {
    fn append(&mut self, stream: Uuid, event: &Event) -> Result<(), TestCaseError> {
        let encoded = event.encode().map_err(|e| TestCaseError::fail(e.to_string()))?;
        self.streams
            .entry(stream)
            .or_default()
            .push((encoded.event_type, encoded.schema_version, encoded.payload));
        Ok(())
    }

    fn load(&self, stream: Uuid) -> Result<Vec<Event>, TestCaseError> {
        self.streams
            .get(&stream)
            .into_iter()
            .flatten()
            .map(|(t, v, p)| Event::decode(t, *v, p.clone()).map_err(|e| TestCaseError::fail(e.to_string())))
            .collect()
    }

    fn user(&self, id: Uuid) -> Result<UserState, TestCaseError> {
        let events = self.load(id)?;
        Ok(user::replay(events.iter().filter_map(|e| match e {
            Event::User(e) => Some(e),
            Event::Device(_) => None,
        })))
    }

    fn device(&self, id: Uuid) -> Result<DeviceState, TestCaseError> {
        let events = self.load(id)?;
        Ok(device::replay(events.iter().filter_map(|e| match e {
            Event::Device(e) => Some(e),
            Event::User(_) => None,
        })))
    }
}

fn check_invariants(log: &Log, states: &Incremental) -> Result<(), TestCaseError> {
    // The state rebuilt from stored (encoded, decoded) streams equals the state every
    // decision assumed, built incrementally from the events decide returned.
    for id in USERS {
        prop_assert_eq!(
            &log.user(id)?,
            states.users.get(&id).unwrap_or(&UserState::Unregistered)
        );
    }
    for id in DEVICES {
        prop_assert_eq!(
            &log.device(id)?,
            states.devices.get(&id).unwrap_or(&DeviceState::Absent)
        );
    }
    // Reservations balance: each user holds exactly one reservation per live device they
    // own, of that device's current size.
    for id in USERS {
        let held: BTreeMap<Uuid, (u32, u32)> = states
            .users
            .get(&id)
            .and_then(UserState::user)
            .map(|u| {
                u.reservations
                    .iter()
                    .map(|(d, r)| (*d, (r.cpu_cores, r.memory_mb)))
                    .collect()
            })
            .unwrap_or_default();
        let live: BTreeMap<Uuid, (u32, u32)> = states
            .devices
            .values()
            .filter_map(|s| match s {
                DeviceState::Present(d) if d.owner_id == id => Some((d.id, (d.cpu_cores, d.memory_mb))),
                _ => None,
            })
            .collect();
        prop_assert_eq!(held, live, "reservations of {}", id);
    }
    Ok(())
}

#[derive(Default)]
struct Incremental {
    users: HashMap<Uuid, UserState>,
    devices: HashMap<Uuid, DeviceState>,
}

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).single().unwrap_or_default()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn any_command_sequence_keeps_every_invariant(
        steps in prop::collection::vec((step(), 0i64..200_000), 1..80)
    ) {
        let pricing = PricingTable::standard();
        let mut log = Log::default();
        let mut states = Incremental::default();
        let mut now = t0();

        for (step, advance_seconds) in steps {
            now += Duration::seconds(advance_seconds);
            match step {
                Step::User(u, mut command) => {
                    let id = USERS[u];
                    if let UserCommand::Register { user_id, .. } = &mut command {
                        *user_id = id;
                    }
                    let state = log.user(id)?;
                    let Ok(events) = user::decide(&command, &state, now) else { continue };
                    let mut next = state;
                    for event in &events {
                        log.append(id, &Event::User(event.clone()))?;
                        next = user::evolve(next, event);
                    }
                    // Postconditions: the new state is what the command asked for.
                    match (&command, next.user()) {
                        (UserCommand::Register { tier, .. }, Some(u)) => {
                            prop_assert_eq!(u.tier, *tier);
                            prop_assert_eq!(u.quota, user::default_quota(*tier));
                        }
                        (UserCommand::SetQuota { quota }, Some(u)) => prop_assert_eq!(u.quota, *quota),
                        (UserCommand::ChangeTier { tier }, Some(u)) => prop_assert_eq!(u.tier, *tier),
                        (UserCommand::Erase, _) => prop_assert!(matches!(next, UserState::Erased(_))),
                        (command, None) => prop_assert!(false, "{:?} left no user", command),
                    }
                    // Deciding the same command again changes nothing.
                    if !matches!(command, UserCommand::Register { .. }) {
                        prop_assert_eq!(user::decide(&command, &next, now), Ok(vec![]));
                    }
                    states.users.insert(id, next);
                }
                Step::Device { device, owner, mut command } => {
                    let device_id = DEVICES[device];
                    if let DeviceCommand::Create { device_id: d, owner_id, .. } = &mut command {
                        *d = device_id;
                        *owner_id = USERS[owner];
                    }
                    // The owner is the one named in a create, otherwise the recorded owner.
                    let owner_id = match &command {
                        DeviceCommand::Create { owner_id, .. } => *owner_id,
                        _ => log.owners.get(&device_id).copied().unwrap_or(USERS[owner]),
                    };
                    let device_state = log.device(device_id)?;
                    let owner_state = log.user(owner_id)?;
                    let ctx = DeviceContext { device: &device_state, owner: &owner_state, pricing: &pricing };
                    let Ok(events) = device::decide(&command, ctx, now) else { continue };

                    let mut next_device = device_state.clone();
                    let mut next_owner = owner_state.clone();
                    for event in &events {
                        match event {
                            Event::Device(e) => {
                                log.append(device_id, event)?;
                                next_device = device::evolve(next_device, e);
                            }
                            Event::User(e) => {
                                log.append(owner_id, event)?;
                                next_owner = user::evolve(next_owner, e);
                            }
                        }
                        if let Event::Device(DeviceEvent::UsageRecorded(usage)) = event {
                            prop_assert!(usage.cost.amount_minor >= 0, "negative cost {:?}", usage);
                            prop_assert_eq!(usage.minutes, pricing::billed_minutes(usage.started_at, usage.ended_at));
                            prop_assert!(usage.ended_at >= usage.started_at);
                        }
                    }
                    if matches!(command, DeviceCommand::Create { .. }) {
                        log.owners.insert(device_id, owner_id);
                    }
                    // Postconditions.
                    let status = next_device.device().map(|d| d.status);
                    match &command {
                        DeviceCommand::Create { cpu_cores, memory_mb, .. } => {
                            prop_assert_eq!(status, Some(DeviceStatus::Stopped));
                            let u = next_owner.user().map(|u| (u.usage(), u.quota));
                            if let Some((usage, quota)) = u {
                                prop_assert!(usage.devices <= u64::from(quota.max_devices));
                                prop_assert!(usage.cpu_cores <= u64::from(quota.max_cpu_cores));
                                prop_assert!(usage.memory_mb <= u64::from(quota.max_memory_mb));
                            }
                            let d = next_device.device();
                            prop_assert_eq!(d.map(|d| (d.cpu_cores, d.memory_mb)), Some((*cpu_cores, *memory_mb)));
                        }
                        DeviceCommand::Start => {
                            prop_assert_eq!(status, Some(DeviceStatus::Running));
                            prop_assert_eq!(next_device.device().and_then(|d| d.running_since), Some(now));
                        }
                        DeviceCommand::Stop { .. } => prop_assert_eq!(status, Some(DeviceStatus::Stopped)),
                        DeviceCommand::ReportFailure { .. } => prop_assert_eq!(status, Some(DeviceStatus::Failed)),
                        DeviceCommand::Resize { cpu_cores, memory_mb } => {
                            let d = next_device.device();
                            prop_assert_eq!(d.map(|d| (d.cpu_cores, d.memory_mb)), Some((*cpu_cores, *memory_mb)));
                        }
                        DeviceCommand::Delete => {
                            prop_assert!(matches!(next_device, DeviceState::Deleted(_)));
                            prop_assert!(next_device.device().and_then(|d| d.running_since).is_none(), "a running device was deleted without its session ending");
                        }
                    }
                    states.devices.insert(device_id, next_device);
                    states.users.insert(owner_id, next_owner);
                }
            }
            check_invariants(&log, &states)?;
        }
    }
}

proptest! {
    #[test]
    fn cost_is_never_negative_and_grows_with_minutes(
        started in 0i64..10_000_000,
        length in -100_000i64..10_000_000,
        provider in proptest::sample::select(Provider::ALL),
        tier in tier(),
    ) {
        let start = t0() + Duration::seconds(started);
        let end = start + Duration::milliseconds(length);
        let rate = PricingTable::standard().rate(provider, tier);
        let minutes = pricing::billed_minutes(start, end);
        let cost = pricing::cost(minutes, &rate);
        prop_assert!(cost.amount_minor >= 0);
        prop_assert!(pricing::cost(minutes.saturating_add(1), &rate).amount_minor >= cost.amount_minor);
        if length > 0 {
            prop_assert!(minutes >= 1);
            prop_assert!(i64::from(minutes) * 60_000 >= length && i64::from(minutes - 1) * 60_000 < length);
        }
    }
}
