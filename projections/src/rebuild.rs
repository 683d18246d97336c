//! Read models computed from the whole log in memory: the reference a maintained projection
//! must equal, row for row.

use std::collections::BTreeMap;

use event_log::{LogReader, ReadError};
use event_schema::{DeviceEvent, Event, EventEnvelope, StreamType};

use read_models::ReadModels;
use read_models::stored::UsersAndHistory;

use read_models::fleet::stats_of;

use crate::fleet::FleetFold;
use crate::usage::{fold_hourly_usage, fold_usage, fold_usage_by_provider};
use crate::users::UserFold;

/// Folds the log from the start up to `to` (inclusive) into read models, reading `page`
/// events at a time. Events that cannot be applied are left out, as the projectors park them.
pub async fn fold_log(reader: &LogReader, to: i64, page: i64) -> Result<ReadModels, ReadError> {
    let mut fleet = FleetFold::default();
    let mut usage = BTreeMap::new();
    let mut by_provider = BTreeMap::new();
    let mut hourly = BTreeMap::new();
    for_each_event(reader, to, page, |envelope, event| {
        let Event::Device(event) = event else {
            return;
        };
        if envelope.stream_type != StreamType::Device {
            return;
        }
        if let DeviceEvent::UsageRecorded(recorded) = &event {
            fold_usage(&mut usage, recorded);
            fold_usage_by_provider(&mut by_provider, recorded);
            fold_hourly_usage(&mut hourly, recorded);
        }
        let _ = fleet.apply(envelope.position, envelope.stream_id, &event);
    })
    .await?;
    let devices: BTreeMap<_, _> = fleet.rows().map(|row| (row.device_id, row.clone())).collect();
    Ok(ReadModels {
        device_stats: stats_of(devices.values()),
        devices,
        daily_usage: usage,
        usage_by_provider: by_provider,
        hourly_usage: hourly,
    })
}

/// Folds the log from the start up to `to` (inclusive) into the tables version 2 of `fleet`
/// adds: `users` and the fleet's history. The reference its maintained tables must equal.
pub async fn fold_users_and_history(reader: &LogReader, to: i64, page: i64) -> Result<UsersAndHistory, ReadError> {
    let mut fleet = FleetFold::default();
    let mut users = UserFold::default();
    for_each_event(reader, to, page, |envelope, event| match event {
        Event::Device(event) if envelope.stream_type == StreamType::Device => {
            let _ = fleet.apply(envelope.position, envelope.stream_id, &event);
        }
        Event::User(event) if envelope.stream_type == StreamType::User => {
            let _ = users.apply(envelope.position, envelope.stream_id, &event);
        }
        _ => {}
    })
    .await?;
    let status_changes = fleet.take_status_changes();
    Ok(UsersAndHistory {
        users: users.rows().map(|row| (row.user_id, row.clone())).collect(),
        status_changes_all: UsersAndHistory::sum_over_users(&status_changes),
        status_changes,
    })
}

/// Calls `apply` with every event of the log from the start up to `to` (inclusive) that
/// decodes, reading `page` events at a time (one that does not decode is left out, as the
/// projectors park it).
async fn for_each_event(
    reader: &LogReader,
    to: i64,
    page: i64,
    mut apply: impl FnMut(&EventEnvelope, Event),
) -> Result<(), ReadError> {
    let mut after = 0;
    while after < to {
        let events = reader.read_all(after, page.min(to - after)).await?;
        let Some(last) = events.last() else {
            break;
        };
        after = last.position;
        for envelope in &events {
            if let Ok(event) = envelope.decode() {
                apply(envelope, event);
            }
        }
    }
    Ok(())
}
