//! Read models computed from the whole log in memory: the reference a maintained projection
//! must equal, row for row.

use std::collections::BTreeMap;

use event_log::{LogReader, ReadError};
use event_schema::{DeviceEvent, Event, StreamType};

use crate::fleet::{DeviceRow, FleetFold, StatsKey, StatsRow, stats_of};
use crate::usage::{ProviderDayKey, ProviderUsage, UsageDelta, UsageKey, fold_usage, fold_usage_by_provider};

/// Every read model, as the full history defines it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReadModels {
    pub devices: BTreeMap<uuid::Uuid, DeviceRow>,
    pub device_stats: BTreeMap<StatsKey, StatsRow>,
    pub daily_usage: BTreeMap<(UsageKey, String), UsageDelta>,
    /// `daily_usage_by_provider` (version 2 of `daily_usage`; empty when the version live
    /// has no such table).
    pub usage_by_provider: BTreeMap<ProviderDayKey, ProviderUsage>,
}

impl ReadModels {
    /// These models as version 1 of `daily_usage` holds them (no per-provider breakdown).
    pub fn without_provider_breakdown(mut self) -> Self {
        self.usage_by_provider.clear();
        self
    }
}

/// Folds the log from the start up to `to` (inclusive) into read models, reading `page`
/// events at a time. Events that cannot be applied are left out, as the projectors park them.
pub async fn fold_log(reader: &LogReader, to: i64, page: i64) -> Result<ReadModels, ReadError> {
    let mut fleet = FleetFold::default();
    let mut usage = BTreeMap::new();
    let mut by_provider = BTreeMap::new();
    let mut after = 0;
    while after < to {
        let events = reader.read_all(after, page.min(to - after)).await?;
        let Some(last) = events.last() else {
            break;
        };
        after = last.position;
        for envelope in &events {
            let Ok(Event::Device(event)) = envelope.decode() else {
                continue;
            };
            if envelope.stream_type != StreamType::Device {
                continue;
            }
            if let DeviceEvent::UsageRecorded(recorded) = &event {
                fold_usage(&mut usage, recorded);
                fold_usage_by_provider(&mut by_provider, recorded);
            }
            let _ = fleet.apply(envelope.position, envelope.stream_id, &event);
        }
    }
    let devices: BTreeMap<_, _> = fleet.rows().map(|row| (row.device_id, row.clone())).collect();
    Ok(ReadModels {
        device_stats: stats_of(devices.values()),
        devices,
        daily_usage: usage,
        usage_by_provider: by_provider,
    })
}
