//! The `fleet` projection: `devices` (one row per device, its current state) and
//! `device_stats` (per user, status and provider: live devices and their sizes).
//!
//! Device rows are folded from device events; each batch then adds to `device_stats` what
//! its devices' moves between buckets changed (`read_models::fleet::stats_changes`), in the
//! same transaction. A bucket's sums are additive and its newest creation time is reread
//! when the device that held it leaves, so whatever the batches, the buckets equal a rebuild
//! from the whole history row for row (the property test below, and the projector's tests
//! against PostgreSQL).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use chrono::{DateTime, Utc};
use event_schema::{DeviceEvent, DeviceStatus};
use read_models::fleet::DeviceRow;
use read_models::history::{StatusChangeKey, hour_of, is_counted};
use uuid::Uuid;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FleetError {
    #[error("{event} for device {device_id}, which was never created")]
    UnknownDevice { device_id: Uuid, event: &'static str },
    #[error("DeviceCreated for device {device_id}, which already exists")]
    CreatedTwice { device_id: Uuid },
}

/// Timestamps as PostgreSQL keeps them (microseconds), so a row folded in memory equals the
/// row read back.
fn micros(at: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(at.timestamp_micros()).unwrap_or(at)
}

/// Device rows being changed by a batch (or a whole rebuild), and the changes of the fleet's
/// size by status they made (version 2's history).
#[derive(Debug, Default, Clone)]
pub struct FleetFold {
    devices: HashMap<Uuid, DeviceRow>,
    changed: BTreeSet<Uuid>,
    /// Net change of the count per owner, UTC hour and status since the fold started or
    /// [`FleetFold::take_status_changes`]. A key stays when its changes cancel out, so every
    /// way of cutting the log into batches touches the same rows.
    status_changes: BTreeMap<StatusChangeKey, i64>,
}

/// The status a device event moves its device to, and when, if it moves it at all.
fn transition(event: &DeviceEvent) -> Option<(DeviceStatus, DateTime<Utc>)> {
    match event {
        DeviceEvent::DeviceCreated(e) => Some((DeviceStatus::Stopped, e.created_at)),
        DeviceEvent::DeviceStarted(e) => Some((DeviceStatus::Running, e.started_at)),
        DeviceEvent::DeviceStopped(e) => Some((DeviceStatus::Stopped, e.stopped_at)),
        DeviceEvent::DeviceFailed(e) => Some((DeviceStatus::Failed, e.failed_at)),
        DeviceEvent::DeviceDeleted(e) => Some((DeviceStatus::Deleted, e.deleted_at)),
        DeviceEvent::DeviceResized(_) | DeviceEvent::UsageRecorded(_) => None,
    }
}

/// Adds a device's move from `before` (`None`: it did not exist) to `after` at `at` to the
/// net changes: one fewer in the status it left, one more in the one it entered, in the
/// hour it happened. Deleted devices are not counted, and a move to the same status is none.
pub fn add_transition(
    changes: &mut BTreeMap<StatusChangeKey, i64>,
    owner: Uuid,
    before: Option<DeviceStatus>,
    after: DeviceStatus,
    at: DateTime<Utc>,
) {
    if before == Some(after) {
        return;
    }
    let hour = hour_of(at);
    let mut add = |status: DeviceStatus, delta: i64| {
        if is_counted(status) {
            *changes
                .entry(StatusChangeKey {
                    user_id: owner,
                    hour,
                    status,
                })
                .or_insert(0) += delta;
        }
    };
    if let Some(before) = before {
        add(before, -1);
    }
    add(after, 1);
}

impl FleetFold {
    /// Starts from the stored rows of the devices the batch touches.
    pub fn with_rows(rows: impl IntoIterator<Item = DeviceRow>) -> Self {
        FleetFold {
            devices: rows.into_iter().map(|row| (row.device_id, row)).collect(),
            changed: BTreeSet::new(),
            status_changes: BTreeMap::new(),
        }
    }

    /// Applies one device event at `position`. An event that does not fit is refused and
    /// changes nothing.
    pub fn apply(&mut self, position: i64, device_id: Uuid, event: &DeviceEvent) -> Result<(), FleetError> {
        if let DeviceEvent::DeviceCreated(e) = event {
            if self.devices.contains_key(&device_id) {
                return Err(FleetError::CreatedTwice { device_id });
            }
            add_transition(
                &mut self.status_changes,
                e.owner_id,
                None,
                DeviceStatus::Stopped,
                e.created_at,
            );
            self.devices.insert(
                device_id,
                DeviceRow {
                    device_id,
                    owner_id: e.owner_id,
                    provider: e.provider,
                    status: DeviceStatus::Stopped,
                    cpu_cores: i32::try_from(e.cpu_cores).unwrap_or(i32::MAX),
                    memory_mb: i32::try_from(e.memory_mb).unwrap_or(i32::MAX),
                    android_version: i16::from(e.android_version),
                    created_at: micros(e.created_at),
                    last_started_at: None,
                    minutes_used: 0,
                    updated_position: position,
                },
            );
            self.changed.insert(device_id);
            return Ok(());
        }
        let row = self.devices.get_mut(&device_id).ok_or(FleetError::UnknownDevice {
            device_id,
            event: event.event_type(),
        })?;
        if let Some((after, at)) = transition(event) {
            add_transition(&mut self.status_changes, row.owner_id, Some(row.status), after, at);
        }
        match event {
            DeviceEvent::DeviceCreated(_) => {}
            DeviceEvent::DeviceStarted(e) => {
                row.status = DeviceStatus::Running;
                row.last_started_at = Some(micros(e.started_at));
            }
            DeviceEvent::DeviceStopped(_) => row.status = DeviceStatus::Stopped,
            DeviceEvent::DeviceFailed(_) => row.status = DeviceStatus::Failed,
            DeviceEvent::DeviceDeleted(_) => row.status = DeviceStatus::Deleted,
            DeviceEvent::DeviceResized(e) => {
                row.cpu_cores = i32::try_from(e.cpu_cores).unwrap_or(i32::MAX);
                row.memory_mb = i32::try_from(e.memory_mb).unwrap_or(i32::MAX);
            }
            DeviceEvent::UsageRecorded(e) => row.minutes_used += i64::from(e.minutes),
        }
        row.updated_position = position;
        self.changed.insert(device_id);
        Ok(())
    }

    /// The rows this fold changed, in device id order.
    pub fn changed_rows(&self) -> impl Iterator<Item = &DeviceRow> {
        self.changed.iter().filter_map(|id| self.devices.get(id))
    }

    /// How many rows changed since the fold started or [`FleetFold::clear_changed`].
    pub fn changed_count(&self) -> usize {
        self.changed.len()
    }

    /// Forgets which rows changed (a replay wrote them to its checkpoint).
    pub fn clear_changed(&mut self) {
        self.changed.clear();
    }

    /// Every row the fold holds (a rebuild holds the whole fleet).
    pub fn rows(&self) -> impl Iterator<Item = &DeviceRow> {
        self.devices.values()
    }

    /// The net changes of the fleet's size by owner, hour and status folded so far, leaving
    /// none (a batch writes them; a replay checkpoints them).
    pub fn take_status_changes(&mut self) -> BTreeMap<StatusChangeKey, i64> {
        std::mem::take(&mut self.status_changes)
    }

    /// How many (owner, hour, status) changes the fold holds.
    pub fn status_change_count(&self) -> usize {
        self.status_changes.len()
    }

    /// Owners whose devices changed (their dashboards' answers may have).
    pub fn touched_owners(&self) -> BTreeSet<Uuid> {
        self.changed_rows().map(|row| row.owner_id).collect()
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use event_schema::*;
    use read_models::fleet::{StatsChange, StatsKey, StatsRow, stats_changes, stats_of};

    use super::*;

    fn created(device: Uuid, owner: Uuid, cores: u32) -> DeviceEvent {
        DeviceCreated {
            device_id: device,
            owner_id: owner,
            provider: Provider::Gcp,
            cpu_cores: cores,
            memory_mb: 2048,
            android_version: 14,
            created_at: Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).single().unwrap_or_default(),
        }
        .into()
    }

    #[test]
    fn stats_count_live_devices_by_status_and_provider() {
        let (owner, a, b, c) = (
            Uuid::from_u128(1),
            Uuid::from_u128(2),
            Uuid::from_u128(3),
            Uuid::from_u128(4),
        );
        let mut fold = FleetFold::default();
        for (i, device) in [a, b, c].into_iter().enumerate() {
            fold.apply(i as i64 + 1, device, &created(device, owner, 2))
                .unwrap_or_default();
        }
        let started = DeviceStarted {
            device_id: a,
            started_at: Utc::now(),
        };
        fold.apply(4, a, &started.into()).unwrap_or_default();
        let deleted = DeviceDeleted {
            device_id: c,
            deleted_at: Utc::now(),
        };
        fold.apply(5, c, &deleted.into()).unwrap_or_default();
        let stats = stats_of(fold.rows());
        let running = StatsKey {
            user_id: owner,
            status: DeviceStatus::Running,
            provider: Provider::Gcp,
        };
        let stopped = StatsKey {
            status: DeviceStatus::Stopped,
            ..running
        };
        assert_eq!(stats.len(), 2, "deleted devices are not counted: {stats:?}");
        assert_eq!(stats[&running].device_count, 1);
        assert_eq!((stats[&stopped].device_count, stats[&stopped].total_cpu_cores), (1, 2));
    }

    #[test]
    fn events_for_unknown_or_recreated_devices_are_refused() {
        let (owner, device) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let mut fold = FleetFold::default();
        let started = DeviceStarted {
            device_id: device,
            started_at: Utc::now(),
        };
        assert!(matches!(
            fold.apply(1, device, &started.into()),
            Err(FleetError::UnknownDevice { .. })
        ));
        fold.apply(2, device, &created(device, owner, 2)).unwrap_or_default();
        assert!(matches!(
            fold.apply(3, device, &created(device, owner, 2)),
            Err(FleetError::CreatedTwice { .. })
        ));
        assert_eq!(fold.changed_rows().count(), 1);
    }

    fn at_hour(hour: u32, minute: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 1, 1, hour, minute, 0)
            .single()
            .unwrap_or_default()
    }

    #[test]
    fn each_transition_moves_one_device_between_statuses_in_the_hour_it_happened() {
        let (owner, device) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let mut fold = FleetFold::default();
        let create = DeviceCreated {
            device_id: device,
            owner_id: owner,
            provider: Provider::Aws,
            cpu_cores: 2,
            memory_mb: 2048,
            android_version: 14,
            created_at: at_hour(10, 5),
        };
        let events: Vec<DeviceEvent> = vec![
            create.into(),
            DeviceStarted {
                device_id: device,
                started_at: at_hour(10, 30),
            }
            .into(),
            DeviceStopped {
                device_id: device,
                reason: StopReason::Requested,
                stopped_at: at_hour(12, 10),
            }
            .into(),
            DeviceResized {
                device_id: device,
                from_cpu_cores: 2,
                from_memory_mb: 2048,
                cpu_cores: 4,
                memory_mb: 4096,
            }
            .into(),
            DeviceDeleted {
                device_id: device,
                deleted_at: at_hour(13, 0),
            }
            .into(),
        ];
        for (i, event) in events.iter().enumerate() {
            assert!(fold.apply(i as i64 + 1, device, event).is_ok());
        }
        let key = |hour, status| StatusChangeKey {
            user_id: owner,
            hour: at_hour(hour, 0),
            status,
        };
        let expected: BTreeMap<_, _> = [
            // Created and started in the same hour: stopped +1 -1 (kept at 0), running +1.
            (key(10, DeviceStatus::Stopped), 0),
            (key(10, DeviceStatus::Running), 1),
            (key(12, DeviceStatus::Running), -1),
            (key(12, DeviceStatus::Stopped), 1),
            // Deleted: leaves the count, enters nothing counted.
            (key(13, DeviceStatus::Stopped), -1),
        ]
        .into_iter()
        .collect();
        assert_eq!(fold.take_status_changes(), expected);
        assert_eq!(fold.status_change_count(), 0, "taken");
    }

    /// The device event the property tests make of `action` (0 to 5): created with 1 + `size`
    /// cores, started, stopped, failed, deleted, or resized to 2 + `size` cores.
    fn generated_event(
        action: u8,
        id: Uuid,
        owner: Uuid,
        provider: Provider,
        size: u32,
        at: DateTime<Utc>,
    ) -> DeviceEvent {
        match action {
            0 => DeviceCreated {
                device_id: id,
                owner_id: owner,
                provider,
                cpu_cores: 1 + size,
                memory_mb: 1024,
                android_version: 14,
                created_at: at,
            }
            .into(),
            1 => DeviceStarted {
                device_id: id,
                started_at: at,
            }
            .into(),
            2 => DeviceStopped {
                device_id: id,
                reason: StopReason::Idle,
                stopped_at: at,
            }
            .into(),
            3 => DeviceFailed {
                device_id: id,
                reason: "lost".into(),
                failed_at: at,
            }
            .into(),
            4 => DeviceDeleted {
                device_id: id,
                deleted_at: at,
            }
            .into(),
            _ => DeviceResized {
                device_id: id,
                from_cpu_cores: 1,
                from_memory_mb: 1024,
                cpu_cores: 2 + size,
                memory_mb: 1024 * (2 + size),
            }
            .into(),
        }
    }

    /// Adds `changes` to `stored` as `apply_stats_changes` does in SQL, rereading a bucket's
    /// newest creation time from `fleet` when a device that left it may have held it.
    fn add_stats_changes(
        stored: &mut BTreeMap<StatsKey, StatsRow>,
        changes: &BTreeMap<StatsKey, StatsChange>,
        fleet: &BTreeMap<StatsKey, StatsRow>,
    ) {
        for (key, change) in changes {
            let mut row = match stored.get(key) {
                Some(old) => StatsRow {
                    device_count: old.device_count + change.device_count,
                    total_cpu_cores: old.total_cpu_cores + change.total_cpu_cores,
                    total_memory_mb: old.total_memory_mb + change.total_memory_mb,
                    last_created_at: old
                        .last_created_at
                        .max(change.newest_entered.unwrap_or(old.last_created_at)),
                },
                None => StatsRow {
                    device_count: change.device_count,
                    total_cpu_cores: change.total_cpu_cores,
                    total_memory_mb: change.total_memory_mb,
                    last_created_at: change.newest_entered.unwrap_or(DateTime::<Utc>::MIN_UTC),
                },
            };
            if row.device_count == 0 {
                stored.remove(key);
                continue;
            }
            if change.newest_left.is_some_and(|left| left >= row.last_created_at) {
                row.last_created_at = fleet.get(key).map_or(DateTime::<Utc>::MIN_UTC, |r| r.last_created_at);
            }
            stored.insert(*key, row);
        }
    }

    proptest::proptest! {
        /// Whatever the events and however they are cut into batches, adding each batch's
        /// changes to the buckets gives what the whole fleet defines, bucket for bucket: a
        /// device entering, leaving, resized in its bucket, the newest leaving (creation
        /// times tie), the last leaving.
        #[test]
        fn each_batchs_stats_changes_add_up_to_the_fleets_stats(
            steps in proptest::collection::vec((0usize..8, 0u8..6, 0u32..3), 1..150),
            cut in 1usize..12,
        ) {
            let owners = [Uuid::from_u128(1), Uuid::from_u128(2)];
            let providers = [Provider::Gcp, Provider::Aws];
            let devices: Vec<Uuid> = (0..8).map(|i| Uuid::from_u128(100 + i)).collect();
            let mut fold = FleetFold::default();
            let mut stored: BTreeMap<StatsKey, StatsRow> = BTreeMap::new();
            let mut before: HashMap<Uuid, DeviceRow> = HashMap::new();
            for (i, (device, action, size)) in steps.into_iter().enumerate() {
                let id = devices[device];
                let at = at_hour(0, 0) + chrono::Duration::minutes(i64::from(size) * 10);
                let event = generated_event(action, id, owners[device % 2], providers[device / 2 % 2], size, at);
                let _ = fold.apply(i as i64 + 1, id, &event);
                if i % cut == 0 {
                    let fleet = stats_of(fold.rows());
                    add_stats_changes(&mut stored, &stats_changes(&before, fold.changed_rows()), &fleet);
                    proptest::prop_assert_eq!(&stored, &fleet);
                    fold.clear_changed();
                    before = fold.rows().map(|row| (row.device_id, row.clone())).collect();
                }
            }
            let fleet = stats_of(fold.rows());
            add_stats_changes(&mut stored, &stats_changes(&before, fold.changed_rows()), &fleet);
            proptest::prop_assert_eq!(&stored, &fleet);
        }

        /// Whatever the events and however they are cut into batches, the net changes summed
        /// over every hour are the live counts `device_stats` holds.
        #[test]
        fn the_changes_add_up_to_the_live_counts(
            steps in proptest::collection::vec((0usize..6, 0u8..6, 0u32..72), 1..120),
            cut in 1usize..20,
        ) {
            let owners = [Uuid::from_u128(1), Uuid::from_u128(2)];
            let devices: Vec<Uuid> = (0..6).map(|i| Uuid::from_u128(100 + i)).collect();
            let mut fold = FleetFold::default();
            let mut changes: BTreeMap<StatusChangeKey, i64> = BTreeMap::new();
            for (i, (device, action, hour)) in steps.into_iter().enumerate() {
                let id = devices[device];
                let at = at_hour(0, 0) + chrono::Duration::minutes(i64::from(hour) * 37);
                let event = generated_event(action, id, owners[device % 2], Provider::Gcp, 0, at);
                let _ = fold.apply(i as i64 + 1, id, &event);
                if i % cut == 0 {
                    for (key, delta) in fold.take_status_changes() {
                        *changes.entry(key).or_insert(0) += delta;
                    }
                }
            }
            for (key, delta) in fold.take_status_changes() {
                *changes.entry(key).or_insert(0) += delta;
            }
            let mut counted: BTreeMap<(Uuid, DeviceStatus), i64> = BTreeMap::new();
            for (key, delta) in &changes {
                *counted.entry((key.user_id, key.status)).or_insert(0) += delta;
            }
            counted.retain(|_, n| *n != 0);
            let mut live: BTreeMap<(Uuid, DeviceStatus), i64> = BTreeMap::new();
            for (key, row) in stats_of(fold.rows()) {
                *live.entry((key.user_id, key.status)).or_insert(0) += row.device_count;
            }
            proptest::prop_assert_eq!(counted, live);
        }
    }
}
