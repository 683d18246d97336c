//! The device aggregate: create, start, stop, resize, delete, failure, and the usage sessions
//! they bill. Decisions that touch the owner's quota also return events for the owner's
//! stream; the command layer appends both streams in one atomic append.

use chrono::{DateTime, Utc};
use event_schema::{
    DeviceCreated, DeviceDeleted, DeviceEvent, DeviceFailed, DeviceResized, DeviceStarted, DeviceStatus, DeviceStopped,
    Event, Provider, StopReason, UsageRecorded,
};
use uuid::Uuid;

use crate::pricing::{self, PricingTable};
use crate::user::{self, Reservation, UserState};
use crate::{DomainError, limits};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    pub id: Uuid,
    pub owner_id: Uuid,
    pub provider: Provider,
    pub cpu_cores: u32,
    pub memory_mb: u32,
    pub android_version: u8,
    /// `Stopped`, `Running` or `Failed`; a deleted device is [`DeviceState::Deleted`].
    pub status: DeviceStatus,
    /// Start of the current usage session while running.
    pub running_since: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    /// Billed minutes over the device's life.
    pub minutes_used: u64,
}

impl Device {
    fn reservation(&self) -> Reservation {
        Reservation {
            cpu_cores: self.cpu_cores,
            memory_mb: self.memory_mb,
        }
    }
}

/// A device as rebuilt from its stream.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum DeviceState {
    #[default]
    Absent,
    Present(Device),
    /// Terminal: every command on it is refused with `device_deleted`.
    Deleted(Device),
}

impl DeviceState {
    pub fn device(&self) -> Option<&Device> {
        match self {
            DeviceState::Absent => None,
            DeviceState::Present(device) | DeviceState::Deleted(device) => Some(device),
        }
    }

    fn present(&self) -> Result<&Device, DomainError> {
        match self {
            DeviceState::Absent => Err(DomainError::DeviceNotFound),
            DeviceState::Present(device) => Ok(device),
            DeviceState::Deleted(_) => Err(DomainError::DeviceDeleted),
        }
    }
}

/// What a portal (or a provider's webhook) can ask of a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceCommand {
    Create {
        device_id: Uuid,
        owner_id: Uuid,
        /// As the client sent it; an unknown provider is a domain error.
        provider: String,
        cpu_cores: u32,
        memory_mb: u32,
        android_version: u8,
    },
    Start,
    Stop {
        reason: StopReason,
    },
    Resize {
        cpu_cores: u32,
        memory_mb: u32,
    },
    Delete,
    ReportFailure {
        reason: String,
    },
}

/// Everything a device decision reads: the device, its owner, and the price list.
#[derive(Debug, Clone, Copy)]
pub struct DeviceContext<'a> {
    pub device: &'a DeviceState,
    /// The owner's state (for `Create`, the owner named in the command).
    pub owner: &'a UserState,
    pub pricing: &'a PricingTable,
}

/// Decides which events `command` causes at `now`: device events for the device's stream and
/// user events (quota reservations) for the owner's stream, in the order they happen. An empty
/// list means the device already is what the command asks for.
pub fn decide(command: &DeviceCommand, ctx: DeviceContext<'_>, now: DateTime<Utc>) -> Result<Vec<Event>, DomainError> {
    match command {
        DeviceCommand::Create {
            device_id,
            owner_id,
            provider,
            cpu_cores,
            memory_mb,
            android_version,
        } => {
            match ctx.device {
                DeviceState::Absent => {}
                DeviceState::Present(_) => return Err(DomainError::DeviceAlreadyExists),
                DeviceState::Deleted(_) => return Err(DomainError::DeviceDeleted),
            }
            let owner = ctx.owner.active()?;
            if owner.id != *owner_id {
                return Err(DomainError::UserNotFound);
            }
            let provider: Provider = provider.parse().map_err(DomainError::UnknownProvider)?;
            let reservation = Reservation {
                cpu_cores: limits::check_cpu_cores(*cpu_cores)?,
                memory_mb: limits::check_memory_mb(*memory_mb)?,
            };
            let android_version = limits::check_android_version(*android_version)?;
            owner.check_reservation(*device_id, reservation)?;
            Ok(vec![
                DeviceCreated {
                    device_id: *device_id,
                    owner_id: *owner_id,
                    provider,
                    cpu_cores: reservation.cpu_cores,
                    memory_mb: reservation.memory_mb,
                    android_version,
                    created_at: now,
                }
                .into(),
                Event::User(user::reserve(*owner_id, *device_id, reservation)),
            ])
        }
        DeviceCommand::Start => {
            let device = ctx.device.present()?;
            if device.status == DeviceStatus::Running {
                return Err(DomainError::DeviceAlreadyRunning);
            }
            ctx.owner.active()?;
            Ok(vec![
                DeviceStarted {
                    device_id: device.id,
                    started_at: now,
                }
                .into(),
            ])
        }
        DeviceCommand::Stop { reason } => {
            let device = ctx.device.present()?;
            if device.status != DeviceStatus::Running {
                return Err(DomainError::DeviceNotRunning);
            }
            let mut events = vec![
                DeviceStopped {
                    device_id: device.id,
                    reason: *reason,
                    stopped_at: now,
                }
                .into(),
            ];
            events.extend(end_session(device, ctx, now));
            Ok(events)
        }
        DeviceCommand::Resize { cpu_cores, memory_mb } => {
            let device = ctx.device.present()?;
            if device.status == DeviceStatus::Running {
                return Err(DomainError::DeviceRunning);
            }
            let wanted = Reservation {
                cpu_cores: limits::check_cpu_cores(*cpu_cores)?,
                memory_mb: limits::check_memory_mb(*memory_mb)?,
            };
            if wanted == device.reservation() {
                return Ok(vec![]);
            }
            let owner = ctx.owner.user().ok_or(DomainError::UserNotFound)?;
            owner.check_reservation(device.id, wanted)?;
            Ok(vec![
                DeviceResized {
                    device_id: device.id,
                    from_cpu_cores: device.cpu_cores,
                    from_memory_mb: device.memory_mb,
                    cpu_cores: wanted.cpu_cores,
                    memory_mb: wanted.memory_mb,
                }
                .into(),
                Event::User(user::release(device.owner_id, device.id, device.reservation())),
                Event::User(user::reserve(device.owner_id, device.id, wanted)),
            ])
        }
        DeviceCommand::Delete => {
            let device = ctx.device.present()?;
            let mut events = Vec::with_capacity(4);
            if device.status == DeviceStatus::Running {
                events.push(
                    DeviceStopped {
                        device_id: device.id,
                        reason: StopReason::Deleted,
                        stopped_at: now,
                    }
                    .into(),
                );
                events.extend(end_session(device, ctx, now));
            }
            events.push(
                DeviceDeleted {
                    device_id: device.id,
                    deleted_at: now,
                }
                .into(),
            );
            events.push(Event::User(user::release(
                device.owner_id,
                device.id,
                device.reservation(),
            )));
            Ok(events)
        }
        DeviceCommand::ReportFailure { reason } => {
            let device = ctx.device.present()?;
            limits::check_failure_reason(reason)?;
            if device.status == DeviceStatus::Failed {
                return Ok(vec![]);
            }
            let mut events = vec![
                DeviceFailed {
                    device_id: device.id,
                    reason: reason.clone(),
                    failed_at: now,
                }
                .into(),
            ];
            if device.status == DeviceStatus::Running {
                events.extend(end_session(device, ctx, now));
            }
            Ok(events)
        }
    }
}

/// The `UsageRecorded` that closes a running device's session at `now`, billed at the
/// owner's tier at that moment.
fn end_session(device: &Device, ctx: DeviceContext<'_>, now: DateTime<Utc>) -> Option<Event> {
    let started_at = device.running_since?;
    // A session is billed even if the owner was erased meanwhile; the tier is what they had.
    let tier = ctx.owner.user().map(|u| u.tier)?;
    let rate = ctx.pricing.rate(device.provider, tier);
    let minutes = pricing::billed_minutes(started_at, now);
    Some(
        UsageRecorded {
            owner_id: device.owner_id,
            device_id: device.id,
            provider: device.provider,
            started_at,
            ended_at: now,
            minutes,
            cost: pricing::cost(minutes, &rate),
            pricing_plan_id: rate.plan_id,
        }
        .into(),
    )
}

/// Applies one event of the device's stream. Total: an event that makes no sense for the
/// state (which `decide` never produces) leaves the state as it was.
pub fn evolve(state: DeviceState, event: &DeviceEvent) -> DeviceState {
    match (state, event) {
        (DeviceState::Absent, DeviceEvent::DeviceCreated(e)) => DeviceState::Present(Device {
            id: e.device_id,
            owner_id: e.owner_id,
            provider: e.provider,
            cpu_cores: e.cpu_cores,
            memory_mb: e.memory_mb,
            android_version: e.android_version,
            status: DeviceStatus::Stopped,
            running_since: None,
            created_at: e.created_at,
            minutes_used: 0,
        }),
        (DeviceState::Present(device), DeviceEvent::DeviceDeleted(_)) => DeviceState::Deleted(device),
        (DeviceState::Present(mut device), event) => {
            match event {
                DeviceEvent::DeviceStarted(e) => {
                    device.status = DeviceStatus::Running;
                    device.running_since = Some(e.started_at);
                }
                DeviceEvent::DeviceStopped(_) => {
                    device.status = DeviceStatus::Stopped;
                    device.running_since = None;
                }
                DeviceEvent::DeviceFailed(_) => {
                    device.status = DeviceStatus::Failed;
                    device.running_since = None;
                }
                DeviceEvent::DeviceResized(e) => {
                    device.cpu_cores = e.cpu_cores;
                    device.memory_mb = e.memory_mb;
                }
                DeviceEvent::UsageRecorded(e) => {
                    device.minutes_used += u64::from(e.minutes);
                }
                DeviceEvent::DeviceCreated(_) | DeviceEvent::DeviceDeleted(_) => {}
            }
            DeviceState::Present(device)
        }
        (state, _) => state,
    }
}

/// Folds a whole stream into a state.
pub fn replay<'a>(events: impl IntoIterator<Item = &'a DeviceEvent>) -> DeviceState {
    events.into_iter().fold(DeviceState::default(), evolve)
}
