//! Events of the device stream (stream id = device id).

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{EventPayload, Money, Provider, StopReason, StreamType};

/// A virtual device was created for its owner. Version 2 added `android_version`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DeviceCreated {
    pub device_id: Uuid,
    pub owner_id: Uuid,
    pub provider: Provider,
    pub cpu_cores: u32,
    pub memory_mb: u32,
    /// Android major version the image runs (e.g. 14).
    pub android_version: u8,
    pub created_at: DateTime<Utc>,
}

impl EventPayload for DeviceCreated {
    const EVENT_TYPE: &'static str = "DeviceCreated";
    const SCHEMA_VERSION: u16 = 2;
    const STREAM_TYPE: StreamType = StreamType::Device;
}

/// `DeviceCreated` as written before devices had a choice of Android version.
///
/// Kept so its JSON Schema stays published and so the upcaster has a typed source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "DeviceCreated")]
pub struct DeviceCreatedV1 {
    pub device_id: Uuid,
    pub owner_id: Uuid,
    pub provider: Provider,
    pub cpu_cores: u32,
    pub memory_mb: u32,
    pub created_at: DateTime<Utc>,
}

impl EventPayload for DeviceCreatedV1 {
    const EVENT_TYPE: &'static str = "DeviceCreated";
    const SCHEMA_VERSION: u16 = 1;
    const STREAM_TYPE: StreamType = StreamType::Device;
}

/// The device was switched on; a usage session begins at `started_at`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DeviceStarted {
    pub device_id: Uuid,
    pub started_at: DateTime<Utc>,
}

impl EventPayload for DeviceStarted {
    const EVENT_TYPE: &'static str = "DeviceStarted";
    const SCHEMA_VERSION: u16 = 1;
    const STREAM_TYPE: StreamType = StreamType::Device;
}

/// The device was switched off; always followed by the session's `UsageRecorded`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DeviceStopped {
    pub device_id: Uuid,
    pub reason: StopReason,
    pub stopped_at: DateTime<Utc>,
}

impl EventPayload for DeviceStopped {
    const EVENT_TYPE: &'static str = "DeviceStopped";
    const SCHEMA_VERSION: u16 = 1;
    const STREAM_TYPE: StreamType = StreamType::Device;
}

/// A stopped device got another size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DeviceResized {
    pub device_id: Uuid,
    pub from_cpu_cores: u32,
    pub from_memory_mb: u32,
    pub cpu_cores: u32,
    pub memory_mb: u32,
}

impl EventPayload for DeviceResized {
    const EVENT_TYPE: &'static str = "DeviceResized";
    const SCHEMA_VERSION: u16 = 1;
    const STREAM_TYPE: StreamType = StreamType::Device;
}

/// The device was deleted. Terminal: nothing else happens to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DeviceDeleted {
    pub device_id: Uuid,
    pub deleted_at: DateTime<Utc>,
}

impl EventPayload for DeviceDeleted {
    const EVENT_TYPE: &'static str = "DeviceDeleted";
    const SCHEMA_VERSION: u16 = 1;
    const STREAM_TYPE: StreamType = StreamType::Device;
}

/// The provider reported the device broken. A running session ends with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DeviceFailed {
    pub device_id: Uuid,
    pub reason: String,
    pub failed_at: DateTime<Utc>,
}

impl EventPayload for DeviceFailed {
    const EVENT_TYPE: &'static str = "DeviceFailed";
    const SCHEMA_VERSION: u16 = 1;
    const STREAM_TYPE: StreamType = StreamType::Device;
}

/// One billed usage session of a device, from start to stop (or failure).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UsageRecorded {
    pub owner_id: Uuid,
    pub device_id: Uuid,
    pub provider: Provider,
    pub started_at: DateTime<Utc>,
    pub ended_at: DateTime<Utc>,
    /// Billed minutes: the session's length rounded up to a whole minute.
    pub minutes: u32,
    pub cost: Money,
    /// The pricing plan the cost was computed with (provider, tier and price list).
    pub pricing_plan_id: String,
}

impl EventPayload for UsageRecorded {
    const EVENT_TYPE: &'static str = "UsageRecorded";
    const SCHEMA_VERSION: u16 = 1;
    const STREAM_TYPE: StreamType = StreamType::Device;
}
