//! `users` (version 2 of the `fleet` projection): one row per registered user, folded from the
//! user stream's events. Personal fields (`UserRegistered`'s email and phone) are never read:
//! the row keeps nothing that erasure shreds.

use std::collections::{BTreeSet, HashMap};

use chrono::{DateTime, Utc};
use event_schema::UserEvent;
use read_models::users::UserRow;
use uuid::Uuid;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UserFoldError {
    #[error("{event} for user {user_id}, who never registered")]
    UnknownUser { user_id: Uuid, event: &'static str },
    #[error("UserRegistered for user {user_id}, who is already registered")]
    RegisteredTwice { user_id: Uuid },
}

/// Timestamps as PostgreSQL keeps them (microseconds), so a row folded in memory equals the
/// row read back.
fn micros(at: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(at.timestamp_micros()).unwrap_or(at)
}

/// User rows being changed by a batch (or a whole rebuild).
#[derive(Debug, Default, Clone)]
pub struct UserFold {
    users: HashMap<Uuid, UserRow>,
    changed: BTreeSet<Uuid>,
}

impl UserFold {
    /// Starts from the stored rows of the users the batch touches.
    pub fn with_rows(rows: impl IntoIterator<Item = UserRow>) -> Self {
        UserFold {
            users: rows.into_iter().map(|row| (row.user_id, row)).collect(),
            changed: BTreeSet::new(),
        }
    }

    /// Applies one event of the stream of `user_id` at `position`. Quota reservations change
    /// no row (the read model shows limits, not their use). An event that does not fit is
    /// refused and changes nothing.
    pub fn apply(&mut self, position: i64, user_id: Uuid, event: &UserEvent) -> Result<(), UserFoldError> {
        if let UserEvent::UserRegistered(e) = event {
            if self.users.contains_key(&user_id) {
                return Err(UserFoldError::RegisteredTwice { user_id });
            }
            self.users.insert(
                user_id,
                UserRow {
                    user_id,
                    tier: e.tier,
                    quota: None,
                    registered_at: micros(e.registered_at),
                    erased: false,
                    erased_at: None,
                    updated_position: position,
                },
            );
            self.changed.insert(user_id);
            return Ok(());
        }
        if matches!(event, UserEvent::QuotaReserved(_) | UserEvent::QuotaReleased(_)) {
            return Ok(());
        }
        let row = self.users.get_mut(&user_id).ok_or(UserFoldError::UnknownUser {
            user_id,
            event: event.event_type(),
        })?;
        match event {
            UserEvent::QuotaChanged(e) => row.quota = Some(e.quota),
            UserEvent::TierChanged(e) => row.tier = e.to,
            UserEvent::UserErased(e) => {
                row.erased = true;
                row.erased_at = Some(micros(e.erased_at));
            }
            UserEvent::UserRegistered(_) | UserEvent::QuotaReserved(_) | UserEvent::QuotaReleased(_) => {}
        }
        row.updated_position = position;
        self.changed.insert(user_id);
        Ok(())
    }

    /// The rows this fold changed, in user id order.
    pub fn changed_rows(&self) -> impl Iterator<Item = &UserRow> {
        self.changed.iter().filter_map(|id| self.users.get(id))
    }

    /// How many rows changed since the fold started or [`UserFold::clear_changed`].
    pub fn changed_count(&self) -> usize {
        self.changed.len()
    }

    /// Forgets which rows changed (a replay wrote them to its checkpoint).
    pub fn clear_changed(&mut self) {
        self.changed.clear();
    }

    /// Every row the fold holds (a rebuild holds every user).
    pub fn rows(&self) -> impl Iterator<Item = &UserRow> {
        self.users.values()
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use event_schema::*;

    use super::*;

    fn registered(user: Uuid) -> UserEvent {
        UserRegistered {
            user_id: user,
            tier: Tier::Free,
            email: Personal::new("someone@example.com".into()),
            phone: Personal::new("+4915112345678".into()),
            registered_at: Utc.with_ymd_and_hms(2026, 1, 1, 9, 0, 0).single().unwrap_or_default(),
        }
        .into()
    }

    #[test]
    fn a_user_row_follows_tier_quota_and_erasure_and_keeps_no_personal_data() {
        let user = Uuid::from_u128(7);
        let mut fold = UserFold::default();
        let quota = Quota {
            max_devices: 5,
            max_cpu_cores: 20,
            max_memory_mb: 40_960,
        };
        let erased_at = Utc.with_ymd_and_hms(2026, 2, 1, 0, 0, 0).single().unwrap_or_default();
        let events: Vec<UserEvent> = vec![
            registered(user),
            QuotaChanged { user_id: user, quota }.into(),
            TierChanged {
                user_id: user,
                from: Tier::Free,
                to: Tier::Pro,
            }
            .into(),
            QuotaReserved {
                user_id: user,
                device_id: Uuid::from_u128(9),
                cpu_cores: 2,
                memory_mb: 2048,
            }
            .into(),
            UserErased {
                user_id: user,
                erased_at,
            }
            .into(),
        ];
        for (i, event) in events.iter().enumerate() {
            assert!(fold.apply(i as i64 + 1, user, event).is_ok());
        }
        let rows: Vec<&UserRow> = fold.changed_rows().collect();
        assert_eq!(
            rows,
            [&UserRow {
                user_id: user,
                tier: Tier::Pro,
                quota: Some(quota),
                registered_at: Utc.with_ymd_and_hms(2026, 1, 1, 9, 0, 0).single().unwrap_or_default(),
                erased: true,
                erased_at: Some(erased_at),
                // The reservation changed no row.
                updated_position: 5,
            }]
        );
        let debug = format!("{:?}", fold.rows().collect::<Vec<_>>());
        assert!(!debug.contains("example.com") && !debug.contains("+49"), "{debug}");
    }

    #[test]
    fn events_of_unregistered_or_twice_registered_users_are_refused() {
        let user = Uuid::from_u128(7);
        let mut fold = UserFold::default();
        let erased = UserErased {
            user_id: user,
            erased_at: Utc::now(),
        };
        assert!(matches!(
            fold.apply(1, user, &erased.into()),
            Err(UserFoldError::UnknownUser { .. })
        ));
        assert!(fold.apply(2, user, &registered(user)).is_ok());
        assert!(matches!(
            fold.apply(3, user, &registered(user)),
            Err(UserFoldError::RegisteredTwice { .. })
        ));
        assert_eq!(fold.changed_count(), 1);
    }
}
