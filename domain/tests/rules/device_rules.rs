//! The device rules, one story each.

use chrono::{DateTime, Duration, TimeZone, Utc};
use domain::device::{self, DeviceCommand, DeviceContext, DeviceState};
use domain::user::{self, UserCommand, UserState};
use domain::{DomainError, PricingTable, QuotaResource};
use event_schema::*;
use uuid::Uuid;

const OWNER: Uuid = Uuid::from_u128(0xA);
const DEVICE: Uuid = Uuid::from_u128(0xD);

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 1, 8, 0, 0).single().unwrap_or_default()
}

/// A small world: one owner and one device, advanced only through decide + evolve.
struct World {
    owner: UserState,
    device: DeviceState,
    pricing: PricingTable,
    log: Vec<Event>,
}

impl World {
    fn with_owner(tier: Tier) -> Self {
        let mut world = World {
            owner: UserState::Unregistered,
            device: DeviceState::Absent,
            pricing: PricingTable::standard(),
            log: vec![],
        };
        let register = UserCommand::Register {
            user_id: OWNER,
            tier,
            email: Personal::new("owner@example.com".into()),
            phone: Personal::new("+4915112345678".into()),
        };
        let events = user::decide(&register, &world.owner, t0()).unwrap_or_default();
        world.apply(events.into_iter().map(Event::User).collect());
        world
    }

    fn apply(&mut self, events: Vec<Event>) {
        for event in &events {
            match event {
                Event::User(e) => self.owner = user::evolve(std::mem::take(&mut self.owner), e),
                Event::Device(e) => self.device = device::evolve(std::mem::take(&mut self.device), e),
            }
        }
        self.log.extend(events);
    }

    fn decide(&self, command: &DeviceCommand, now: DateTime<Utc>) -> Result<Vec<Event>, DomainError> {
        let ctx = DeviceContext {
            device: &self.device,
            owner: &self.owner,
            pricing: &self.pricing,
        };
        device::decide(command, ctx, now)
    }

    fn run(&mut self, command: DeviceCommand, now: DateTime<Utc>) -> Result<Vec<Event>, DomainError> {
        let events = self.decide(&command, now)?;
        self.apply(events.clone());
        Ok(events)
    }

    /// Points the world at a new, absent device stream (the owner's state is kept).
    fn next_device(&mut self) -> &mut Self {
        self.device = DeviceState::Absent;
        self
    }

    fn set_quota(&mut self, max_devices: u32, max_cpu_cores: u32, max_memory_mb: u32) {
        let command = UserCommand::SetQuota {
            quota: Quota {
                max_devices,
                max_cpu_cores,
                max_memory_mb,
            },
        };
        let events = user::decide(&command, &self.owner, t0()).unwrap_or_default();
        self.apply(events.into_iter().map(Event::User).collect());
    }
}

fn create(provider: &str, cpu_cores: u32, memory_mb: u32) -> DeviceCommand {
    create_id(DEVICE, provider, cpu_cores, memory_mb)
}

fn create_id(device_id: Uuid, provider: &str, cpu_cores: u32, memory_mb: u32) -> DeviceCommand {
    DeviceCommand::Create {
        device_id,
        owner_id: OWNER,
        provider: provider.into(),
        cpu_cores,
        memory_mb,
        android_version: 14,
    }
}

fn code<T>(result: Result<T, DomainError>) -> &'static str {
    result.err().map_or("ok", |e| e.code())
}

#[test]
fn creating_a_device_reserves_quota_on_the_owners_stream() {
    let mut world = World::with_owner(Tier::Pro);
    let events = world.run(create("aws", 4, 8192), t0()).unwrap_or_default();
    assert!(
        matches!(&events[..], [Event::Device(DeviceEvent::DeviceCreated(_)), Event::User(UserEvent::QuotaReserved(r))]
        if r.device_id == DEVICE && r.cpu_cores == 4 && r.memory_mb == 8192 && r.user_id == OWNER)
    );
    let usage = world.owner.user().map(|u| u.usage()).unwrap_or_default();
    assert_eq!((usage.devices, usage.cpu_cores, usage.memory_mb), (1, 4, 8192));
}

#[test]
fn an_unknown_provider_is_refused() {
    let world = World::with_owner(Tier::Pro);
    let err = world.decide(&create("digitalocean", 4, 8192), t0());
    assert_eq!(code(err), "unknown_provider");
}

#[test]
fn sizes_out_of_range_are_refused() {
    let world = World::with_owner(Tier::Pro);
    assert_eq!(
        code(world.decide(&create("aws", 0, 8192), t0())),
        "cpu_cores_out_of_range"
    );
    assert_eq!(
        code(world.decide(&create("aws", 32, 8192), t0())),
        "cpu_cores_out_of_range"
    );
    assert_eq!(code(world.decide(&create("aws", 4, 1000), t0())), "memory_out_of_range");
    let old_android = DeviceCommand::Create {
        device_id: DEVICE,
        owner_id: OWNER,
        provider: "aws".into(),
        cpu_cores: 4,
        memory_mb: 8192,
        android_version: 7,
    };
    assert_eq!(code(world.decide(&old_android, t0())), "unsupported_android_version");
}

#[test]
fn creating_a_device_for_an_unknown_or_erased_owner_is_refused() {
    let mut world = World::with_owner(Tier::Pro);
    world.owner = UserState::Unregistered;
    assert_eq!(code(world.decide(&create("aws", 4, 8192), t0())), "user_not_found");
    let mut world = World::with_owner(Tier::Pro);
    let erase = user::decide(&UserCommand::Erase, &world.owner, t0()).unwrap_or_default();
    world.apply(erase.into_iter().map(Event::User).collect());
    assert_eq!(code(world.decide(&create("aws", 4, 8192), t0())), "user_erased");
}

#[test]
fn creating_beyond_the_quota_is_refused_for_each_resource() {
    let mut world = World::with_owner(Tier::Pro);
    world.set_quota(1, 100, 1_000_000);
    assert_eq!(
        code(
            world
                .next_device()
                .run(create_id(Uuid::from_u128(1), "aws", 1, 1024), t0())
        ),
        "ok"
    );
    let err = world
        .next_device()
        .decide(&create_id(Uuid::from_u128(2), "aws", 1, 1024), t0());
    assert!(
        matches!(
            err,
            Err(DomainError::QuotaExceeded {
                resource: QuotaResource::Devices,
                limit: 1,
                requested: 2
            })
        ),
        "{err:?}"
    );

    let mut world = World::with_owner(Tier::Pro);
    world.set_quota(10, 6, 1_000_000);
    assert_eq!(
        code(
            world
                .next_device()
                .run(create_id(Uuid::from_u128(1), "aws", 4, 1024), t0())
        ),
        "ok"
    );
    let err = world
        .next_device()
        .decide(&create_id(Uuid::from_u128(2), "aws", 4, 1024), t0());
    assert!(
        matches!(
            err,
            Err(DomainError::QuotaExceeded {
                resource: QuotaResource::CpuCores,
                limit: 6,
                requested: 8
            })
        ),
        "{err:?}"
    );

    let mut world = World::with_owner(Tier::Pro);
    world.set_quota(10, 100, 4096);
    assert_eq!(
        code(
            world
                .next_device()
                .run(create_id(Uuid::from_u128(1), "aws", 1, 3072), t0())
        ),
        "ok"
    );
    let err = world
        .next_device()
        .decide(&create_id(Uuid::from_u128(2), "aws", 1, 1024), t0());
    assert_eq!(code(err.clone()), "ok", "exactly at the limit is allowed: {err:?}");
    world.apply(err.unwrap_or_default());
    let err = world
        .next_device()
        .decide(&create_id(Uuid::from_u128(3), "aws", 1, 1024), t0());
    assert!(
        matches!(
            err,
            Err(DomainError::QuotaExceeded {
                resource: QuotaResource::MemoryMb,
                ..
            })
        ),
        "{err:?}"
    );
}

#[test]
fn starting_a_running_device_and_stopping_a_stopped_one_are_refused() {
    let mut world = World::with_owner(Tier::Pro);
    world.run(create("aws", 4, 8192), t0()).unwrap_or_default();
    assert_eq!(
        code(world.decide(
            &DeviceCommand::Stop {
                reason: StopReason::Requested
            },
            t0()
        )),
        "device_not_running"
    );
    assert_eq!(code(world.run(DeviceCommand::Start, t0())), "ok");
    assert_eq!(
        code(world.decide(&DeviceCommand::Start, t0())),
        "device_already_running"
    );
}

#[test]
fn stopping_records_the_session_with_minutes_and_cost() {
    let mut world = World::with_owner(Tier::Pro);
    world.run(create("gcp", 4, 8192), t0()).unwrap_or_default();
    world.run(DeviceCommand::Start, t0()).unwrap_or_default();
    let stop_at = t0() + Duration::minutes(90) + Duration::seconds(1);
    let events = world
        .run(
            DeviceCommand::Stop {
                reason: StopReason::Requested,
            },
            stop_at,
        )
        .unwrap_or_default();
    let [
        Event::Device(DeviceEvent::DeviceStopped(stopped)),
        Event::Device(DeviceEvent::UsageRecorded(usage)),
    ] = &events[..]
    else {
        panic!("unexpected events {events:?}");
    };
    assert_eq!(stopped.stopped_at, stop_at);
    assert_eq!(usage.started_at, t0());
    assert_eq!(usage.ended_at, stop_at);
    assert_eq!(usage.minutes, 91, "a started minute is billed");
    // gcp / pro = 13 cents an hour: ceil(91 * 13 / 60) = ceil(19.71) = 20.
    assert_eq!(usage.cost, Money::new(20, Currency::USD));
    assert_eq!(usage.pricing_plan_id, "2026-01/gcp/pro");
    assert_eq!(world.device.device().map(|d| d.minutes_used), Some(91));
}

#[test]
fn a_running_device_cannot_be_resized() {
    let mut world = World::with_owner(Tier::Pro);
    world.run(create("aws", 4, 8192), t0()).unwrap_or_default();
    world.run(DeviceCommand::Start, t0()).unwrap_or_default();
    let resize = DeviceCommand::Resize {
        cpu_cores: 8,
        memory_mb: 16_384,
    };
    assert_eq!(code(world.decide(&resize, t0())), "device_running");
}

#[test]
fn resizing_moves_the_reservation_and_checks_only_growth() {
    let mut world = World::with_owner(Tier::Pro);
    world.run(create("aws", 4, 8192), t0()).unwrap_or_default();
    let events = world
        .run(
            DeviceCommand::Resize {
                cpu_cores: 8,
                memory_mb: 16_384,
            },
            t0(),
        )
        .unwrap_or_default();
    assert_eq!(events.len(), 3);
    let reserved = world.owner.user().and_then(|u| u.reservations.get(&DEVICE).copied());
    assert_eq!(reserved.map(|r| (r.cpu_cores, r.memory_mb)), Some((8, 16_384)));

    // An admin lowers the quota below usage: shrinking is still allowed, growing is not.
    world.set_quota(1, 2, 2048);
    assert_eq!(
        code(world.run(
            DeviceCommand::Resize {
                cpu_cores: 4,
                memory_mb: 8192
            },
            t0()
        )),
        "ok"
    );
    assert_eq!(
        code(world.decide(
            &DeviceCommand::Resize {
                cpu_cores: 8,
                memory_mb: 8192
            },
            t0()
        )),
        "quota_exceeded"
    );
}

#[test]
fn deleting_a_running_device_stops_it_first_and_releases_its_quota() {
    let mut world = World::with_owner(Tier::Basic);
    world.run(create("huawei", 2, 4096), t0()).unwrap_or_default();
    world.run(DeviceCommand::Start, t0()).unwrap_or_default();
    let events = world
        .run(DeviceCommand::Delete, t0() + Duration::hours(2))
        .unwrap_or_default();
    let types: Vec<_> = events.iter().map(Event::event_type).collect();
    assert_eq!(
        types,
        ["DeviceStopped", "UsageRecorded", "DeviceDeleted", "QuotaReleased"]
    );
    let Event::Device(DeviceEvent::DeviceStopped(stopped)) = &events[0] else {
        unreachable!()
    };
    assert_eq!(stopped.reason, StopReason::Deleted);
    let Event::Device(DeviceEvent::UsageRecorded(usage)) = &events[1] else {
        unreachable!()
    };
    assert_eq!(usage.minutes, 120);
    assert_eq!(usage.cost.amount_minor, 24, "huawei / basic = 12 cents an hour");
    assert_eq!(world.owner.user().map(|u| u.usage().devices), Some(0));
    assert!(matches!(world.device, DeviceState::Deleted(_)));
}

#[test]
fn nothing_can_be_done_to_a_deleted_device() {
    let mut world = World::with_owner(Tier::Pro);
    world.run(create("aws", 4, 8192), t0()).unwrap_or_default();
    world.run(DeviceCommand::Delete, t0()).unwrap_or_default();
    for command in [
        DeviceCommand::Start,
        DeviceCommand::Stop {
            reason: StopReason::Requested,
        },
        DeviceCommand::Resize {
            cpu_cores: 2,
            memory_mb: 2048,
        },
        DeviceCommand::Delete,
        DeviceCommand::ReportFailure { reason: "disk".into() },
        create("aws", 4, 8192),
    ] {
        assert_eq!(code(world.decide(&command, t0())), "device_deleted", "{command:?}");
    }
}

#[test]
fn commands_on_an_unknown_device_are_not_found() {
    let world = World::with_owner(Tier::Pro);
    for command in [
        DeviceCommand::Start,
        DeviceCommand::Delete,
        DeviceCommand::Resize {
            cpu_cores: 2,
            memory_mb: 2048,
        },
    ] {
        assert_eq!(code(world.decide(&command, t0())), "device_not_found", "{command:?}");
    }
}

#[test]
fn a_failure_ends_a_running_session_and_a_failed_device_can_restart() {
    let mut world = World::with_owner(Tier::Pro);
    world.run(create("azure", 4, 8192), t0()).unwrap_or_default();
    world.run(DeviceCommand::Start, t0()).unwrap_or_default();
    let events = world
        .run(
            DeviceCommand::ReportFailure {
                reason: "host lost".into(),
            },
            t0() + Duration::minutes(10),
        )
        .unwrap_or_default();
    let types: Vec<_> = events.iter().map(Event::event_type).collect();
    assert_eq!(types, ["DeviceFailed", "UsageRecorded"]);
    assert_eq!(world.device.device().map(|d| d.status), Some(DeviceStatus::Failed));
    assert_eq!(
        code(world.decide(&DeviceCommand::ReportFailure { reason: "again".into() }, t0())),
        "ok"
    );
    assert_eq!(code(world.run(DeviceCommand::Start, t0())), "ok");
    assert_eq!(
        code(world.decide(&DeviceCommand::ReportFailure { reason: String::new() }, t0())),
        "invalid_failure_reason"
    );
}

#[test]
fn every_error_code_maps_to_one_kind() {
    use domain::ErrorKind;
    let world = World::with_owner(Tier::Pro);
    let not_found = world.decide(&DeviceCommand::Start, t0()).err();
    assert_eq!(not_found.map(|e| e.kind()), Some(ErrorKind::NotFound));
    let invalid = world.decide(&create("nope", 4, 8192), t0()).err();
    assert_eq!(invalid.map(|e| e.kind()), Some(ErrorKind::Invalid));
}
