//! The `fleet` projection: `devices` (one row per device, its current state) and
//! `device_stats` (per user, status and provider: live devices and their sizes).
//!
//! Device rows are folded from device events; `device_stats` rows of every owner a batch
//! touched are then recomputed from `devices` in the same transaction. Recomputing (rather
//! than adding deltas) makes the result independent of where batches happen to end, so a
//! rebuild from the whole history equals what was maintained incrementally, row for row.

use std::collections::{BTreeSet, HashMap};

use chrono::{DateTime, Utc};
use event_schema::{DeviceEvent, DeviceStatus};
use read_models::fleet::DeviceRow;
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

/// Device rows being changed by a batch (or a whole rebuild).
#[derive(Debug, Default, Clone)]
pub struct FleetFold {
    devices: HashMap<Uuid, DeviceRow>,
    changed: BTreeSet<Uuid>,
}

impl FleetFold {
    /// Starts from the stored rows of the devices the batch touches.
    pub fn with_rows(rows: impl IntoIterator<Item = DeviceRow>) -> Self {
        FleetFold {
            devices: rows.into_iter().map(|row| (row.device_id, row)).collect(),
            changed: BTreeSet::new(),
        }
    }

    /// Applies one device event at `position`. An event that does not fit is refused and
    /// changes nothing.
    pub fn apply(&mut self, position: i64, device_id: Uuid, event: &DeviceEvent) -> Result<(), FleetError> {
        if let DeviceEvent::DeviceCreated(e) = event {
            if self.devices.contains_key(&device_id) {
                return Err(FleetError::CreatedTwice { device_id });
            }
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

    /// Owners whose devices changed: their `device_stats` rows must be recomputed.
    pub fn touched_owners(&self) -> BTreeSet<Uuid> {
        self.changed_rows().map(|row| row.owner_id).collect()
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use event_schema::*;
    use read_models::fleet::{StatsKey, stats_of};

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
}
