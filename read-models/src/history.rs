//! The fleet's size by status over time (version 2 of the `fleet` projection):
//! `fleet_status_changes` holds, per user, UTC hour and status, the net change of that user's
//! device count in that hour (`delta`); `fleet_status_changes_all` the same summed over users.
//! The count at the end of any hour is the running sum of the deltas up to it.
//!
//! Why deltas rather than snapshots of the counts: a device's transition writes one row per
//! status it leaves or enters (at most two, in the hour it happened), however long the fleet
//! then stays unchanged, and events may be applied in any order across devices (sums
//! commute: Kafka partitions stay independent). A snapshot per hour would need a row for
//! every user and hour whether or not anything changed (an unbounded fan-out as time passes),
//! or a rewrite of every later snapshot when an event lands in an earlier hour. A range is
//! read as the sum of the deltas before it (the base) plus a running sum within it.
//!
//! The all-users table is what keeps an admin's chart cheap: its rows grow with hours and
//! statuses only (at most 3 × 8 760 a year), not with users, so the base sum over every earlier
//! hour stays a small index scan however many users there are.

use chrono::{DateTime, Utc};
use event_schema::DeviceStatus;
use uuid::Uuid;

/// The key of a `fleet_status_changes` row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StatusChangeKey {
    pub user_id: Uuid,
    /// The start of the UTC hour.
    pub hour: DateTime<Utc>,
    pub status: DeviceStatus,
}

/// The statuses the history counts: deleted devices are not part of the fleet (as
/// `device_stats` does not count them).
pub const COUNTED_STATUSES: [DeviceStatus; 3] = [DeviceStatus::Stopped, DeviceStatus::Running, DeviceStatus::Failed];

/// True when devices in `status` are counted in the fleet's size.
pub fn is_counted(status: DeviceStatus) -> bool {
    status != DeviceStatus::Deleted
}

/// The start of the UTC hour `at` falls in.
pub fn hour_of(at: DateTime<Utc>) -> DateTime<Utc> {
    let seconds = at.timestamp();
    DateTime::from_timestamp(seconds - seconds.rem_euclid(3_600), 0).unwrap_or(at)
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    #[test]
    fn an_instant_belongs_to_the_hour_it_starts_in() {
        let at = |h, m, s| Utc.with_ymd_and_hms(2026, 3, 1, h, m, s).single().unwrap_or_default();
        assert_eq!(hour_of(at(13, 59, 59)), at(13, 0, 0));
        assert_eq!(hour_of(at(13, 0, 0)), at(13, 0, 0));
        let before_1970 = Utc
            .with_ymd_and_hms(1969, 12, 31, 23, 30, 0)
            .single()
            .unwrap_or_default();
        assert_eq!(
            hour_of(before_1970),
            Utc.with_ymd_and_hms(1969, 12, 31, 23, 0, 0)
                .single()
                .unwrap_or_default()
        );
        assert!(COUNTED_STATUSES.iter().all(|s| is_counted(*s)));
        assert!(!is_counted(DeviceStatus::Deleted));
    }
}
