//! The user aggregate: registration, tier, quota, the quota reservations of their devices,
//! and erasure.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use event_schema::{
    Personal, Quota, QuotaChanged, QuotaReleased, QuotaReserved, Tier, TierChanged, UserErased, UserEvent,
    UserRegistered,
};
use uuid::Uuid;

use crate::{DomainError, QuotaResource, limits};

/// The quota a new user gets with each tier, until an admin sets another.
pub const fn default_quota(tier: Tier) -> Quota {
    let (max_devices, max_cpu_cores, max_memory_mb) = match tier {
        Tier::Free => (1, 2, 4_096),
        Tier::Basic => (3, 8, 16_384),
        Tier::Pro => (10, 40, 81_920),
        Tier::Enterprise => (100, 800, 1_638_400),
    };
    Quota {
        max_devices,
        max_cpu_cores,
        max_memory_mb,
    }
}

/// The share of the quota one device holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reservation {
    pub cpu_cores: u32,
    pub memory_mb: u32,
}

/// What the quota currently holds, summed over reservations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QuotaUsage {
    pub devices: u64,
    pub cpu_cores: u64,
    pub memory_mb: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub id: Uuid,
    pub tier: Tier,
    pub quota: Quota,
    /// Device id -> its reservation; one entry per device that is not deleted.
    pub reservations: BTreeMap<Uuid, Reservation>,
    pub registered_at: DateTime<Utc>,
}

impl User {
    pub fn usage(&self) -> QuotaUsage {
        self.reservations
            .values()
            .fold(QuotaUsage::default(), |usage, r| QuotaUsage {
                devices: usage.devices + 1,
                cpu_cores: usage.cpu_cores + u64::from(r.cpu_cores),
                memory_mb: usage.memory_mb + u64::from(r.memory_mb),
            })
    }

    /// Refuses a reservation of `wanted` for `device_id` (replacing any it holds) that would
    /// take usage over the quota.
    pub fn check_reservation(&self, device_id: Uuid, wanted: Reservation) -> Result<(), DomainError> {
        let held = self.reservations.get(&device_id);
        let usage = self.usage();
        let after = QuotaUsage {
            devices: usage.devices + u64::from(held.is_none()),
            cpu_cores: usage.cpu_cores - held.map_or(0, |r| u64::from(r.cpu_cores)) + u64::from(wanted.cpu_cores),
            memory_mb: usage.memory_mb - held.map_or(0, |r| u64::from(r.memory_mb)) + u64::from(wanted.memory_mb),
        };
        // Only a resource that grows is checked: shrinking a device is never refused, even
        // when an admin has lowered the quota below current usage.
        let checks = [
            (
                QuotaResource::Devices,
                self.quota.max_devices,
                after.devices,
                held.is_none(),
            ),
            (
                QuotaResource::CpuCores,
                self.quota.max_cpu_cores,
                after.cpu_cores,
                held.is_none_or(|r| wanted.cpu_cores > r.cpu_cores),
            ),
            (
                QuotaResource::MemoryMb,
                self.quota.max_memory_mb,
                after.memory_mb,
                held.is_none_or(|r| wanted.memory_mb > r.memory_mb),
            ),
        ];
        for (resource, limit, requested, grows) in checks {
            let limit = u64::from(limit);
            if grows && requested > limit {
                return Err(DomainError::QuotaExceeded {
                    resource,
                    limit,
                    requested,
                });
            }
        }
        Ok(())
    }
}

/// A user as rebuilt from their stream.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum UserState {
    #[default]
    Unregistered,
    Active(User),
    /// Personal data shredded; devices may still exist and release their quota.
    Erased(User),
}

impl UserState {
    pub fn user(&self) -> Option<&User> {
        match self {
            UserState::Unregistered => None,
            UserState::Active(user) | UserState::Erased(user) => Some(user),
        }
    }

    /// The user, if they may start new work (create or start devices).
    pub fn active(&self) -> Result<&User, DomainError> {
        match self {
            UserState::Unregistered => Err(DomainError::UserNotFound),
            UserState::Active(user) => Ok(user),
            UserState::Erased(_) => Err(DomainError::UserErased),
        }
    }
}

/// What a portal can ask of a user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserCommand {
    Register {
        user_id: Uuid,
        tier: Tier,
        email: Personal<String>,
        phone: Personal<String>,
    },
    SetQuota {
        quota: Quota,
    },
    ChangeTier {
        tier: Tier,
    },
    Erase,
}

/// Decides which events `command` causes on `state` at `now`. An empty list means the
/// state already is what the command asks for.
pub fn decide(command: &UserCommand, state: &UserState, now: DateTime<Utc>) -> Result<Vec<UserEvent>, DomainError> {
    match command {
        UserCommand::Register {
            user_id,
            tier,
            email,
            phone,
        } => {
            if !matches!(state, UserState::Unregistered) {
                return Err(DomainError::UserAlreadyRegistered);
            }
            limits::check_email(email)?;
            limits::check_phone(phone)?;
            Ok(vec![
                UserRegistered {
                    user_id: *user_id,
                    tier: *tier,
                    email: email.clone(),
                    phone: phone.clone(),
                    registered_at: now,
                }
                .into(),
                QuotaChanged {
                    user_id: *user_id,
                    quota: default_quota(*tier),
                }
                .into(),
            ])
        }
        UserCommand::SetQuota { quota } => {
            let user = state.active()?;
            let quota = limits::check_quota(quota)?;
            if user.quota == quota {
                return Ok(vec![]);
            }
            Ok(vec![
                QuotaChanged {
                    user_id: user.id,
                    quota,
                }
                .into(),
            ])
        }
        UserCommand::ChangeTier { tier } => {
            let user = state.active()?;
            if user.tier == *tier {
                return Ok(vec![]);
            }
            Ok(vec![
                TierChanged {
                    user_id: user.id,
                    from: user.tier,
                    to: *tier,
                }
                .into(),
            ])
        }
        UserCommand::Erase => match state {
            UserState::Unregistered => Err(DomainError::UserNotFound),
            UserState::Erased(_) => Ok(vec![]),
            UserState::Active(user) => Ok(vec![
                UserErased {
                    user_id: user.id,
                    erased_at: now,
                }
                .into(),
            ]),
        },
    }
}

/// Reservation events for a device, decided by the device aggregate but stored on the owner's
/// stream.
pub(crate) fn reserve(user_id: Uuid, device_id: Uuid, r: Reservation) -> UserEvent {
    QuotaReserved {
        user_id,
        device_id,
        cpu_cores: r.cpu_cores,
        memory_mb: r.memory_mb,
    }
    .into()
}

pub(crate) fn release(user_id: Uuid, device_id: Uuid, r: Reservation) -> UserEvent {
    QuotaReleased {
        user_id,
        device_id,
        cpu_cores: r.cpu_cores,
        memory_mb: r.memory_mb,
    }
    .into()
}

/// Applies one event of the user's stream. Total: an event that makes no sense for the state
/// (which `decide` never produces) leaves the state as it was.
pub fn evolve(state: UserState, event: &UserEvent) -> UserState {
    match (state, event) {
        (UserState::Unregistered, UserEvent::UserRegistered(e)) => UserState::Active(User {
            id: e.user_id,
            tier: e.tier,
            quota: default_quota(e.tier),
            reservations: BTreeMap::new(),
            registered_at: e.registered_at,
        }),
        (UserState::Active(user), UserEvent::UserErased(_)) => UserState::Erased(user),
        (UserState::Active(user), event) => UserState::Active(apply(user, event)),
        (UserState::Erased(user), event) => UserState::Erased(apply(user, event)),
        (state, _) => state,
    }
}

fn apply(mut user: User, event: &UserEvent) -> User {
    match event {
        UserEvent::QuotaChanged(e) => user.quota = e.quota,
        UserEvent::TierChanged(e) => user.tier = e.to,
        UserEvent::QuotaReserved(e) => {
            user.reservations.insert(
                e.device_id,
                Reservation {
                    cpu_cores: e.cpu_cores,
                    memory_mb: e.memory_mb,
                },
            );
        }
        UserEvent::QuotaReleased(e) => {
            user.reservations.remove(&e.device_id);
        }
        UserEvent::UserRegistered(_) | UserEvent::UserErased(_) => {}
    }
    user
}

/// Folds a whole stream into a state.
pub fn replay<'a>(events: impl IntoIterator<Item = &'a UserEvent>) -> UserState {
    events.into_iter().fold(UserState::default(), evolve)
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 22, 12, 0, 0)
            .single()
            .unwrap_or_default()
    }

    fn register(user_id: Uuid) -> UserCommand {
        UserCommand::Register {
            user_id,
            tier: Tier::Basic,
            email: Personal::new("ada@example.com".into()),
            phone: Personal::new("+4915112345678".into()),
        }
    }

    fn registered(user_id: Uuid) -> UserState {
        let events = decide(&register(user_id), &UserState::Unregistered, now()).unwrap_or_default();
        replay(&events)
    }

    #[test]
    fn registering_gives_the_tier_default_quota() {
        let id = Uuid::from_u128(1);
        let events = decide(&register(id), &UserState::Unregistered, now()).unwrap_or_default();
        assert_eq!(events.len(), 2);
        let state = replay(&events);
        assert_eq!(state.user().map(|u| u.quota), Some(default_quota(Tier::Basic)));
    }

    #[test]
    fn registering_twice_is_refused() {
        let id = Uuid::from_u128(1);
        let err = decide(&register(id), &registered(id), now()).unwrap_err();
        assert_eq!(err.code(), "user_already_registered");
    }

    #[test]
    fn a_bad_email_or_phone_is_refused() {
        let command = UserCommand::Register {
            user_id: Uuid::from_u128(1),
            tier: Tier::Free,
            email: Personal::new("not-an-email".into()),
            phone: Personal::new("+4915112345678".into()),
        };
        assert_eq!(
            decide(&command, &UserState::Unregistered, now()).map_err(|e| e.code()),
            Err("invalid_email")
        );
    }

    #[test]
    fn commands_on_an_unknown_user_are_not_found() {
        for command in [UserCommand::ChangeTier { tier: Tier::Pro }, UserCommand::Erase] {
            assert_eq!(
                decide(&command, &UserState::Unregistered, now()).map_err(|e| e.code()),
                Err("user_not_found")
            );
        }
    }

    #[test]
    fn an_erased_user_cannot_change_but_erasing_again_is_a_no_op() {
        let id = Uuid::from_u128(1);
        let erased = evolve(
            registered(id),
            &UserErased {
                user_id: id,
                erased_at: now(),
            }
            .into(),
        );
        assert_eq!(
            decide(&UserCommand::ChangeTier { tier: Tier::Pro }, &erased, now()).map_err(|e| e.code()),
            Err("user_erased")
        );
        assert_eq!(decide(&UserCommand::Erase, &erased, now()), Ok(vec![]));
    }

    #[test]
    fn setting_the_same_tier_or_quota_is_a_no_op() {
        let id = Uuid::from_u128(1);
        let state = registered(id);
        assert_eq!(
            decide(&UserCommand::ChangeTier { tier: Tier::Basic }, &state, now()),
            Ok(vec![])
        );
        let quota = default_quota(Tier::Basic);
        assert_eq!(decide(&UserCommand::SetQuota { quota }, &state, now()), Ok(vec![]));
    }
}
