//! Events of the user stream (stream id = user id).

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{EventPayload, Personal, StreamType, Tier};

/// Device limits of a user. A create or resize that would exceed them is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Quota {
    pub max_devices: u32,
    pub max_cpu_cores: u32,
    pub max_memory_mb: u32,
}

/// A customer signed up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UserRegistered {
    pub user_id: Uuid,
    pub tier: Tier,
    pub email: Personal<String>,
    pub phone: Personal<String>,
    pub registered_at: DateTime<Utc>,
}

impl EventPayload for UserRegistered {
    const EVENT_TYPE: &'static str = "UserRegistered";
    const SCHEMA_VERSION: u16 = 1;
    const STREAM_TYPE: StreamType = StreamType::User;
    const PERSONAL_FIELDS: &'static [&'static str] = &["email", "phone"];
}

/// The user's device limits were set (at registration from the tier, or by an admin).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct QuotaChanged {
    pub user_id: Uuid,
    pub quota: Quota,
}

impl EventPayload for QuotaChanged {
    const EVENT_TYPE: &'static str = "QuotaChanged";
    const SCHEMA_VERSION: u16 = 1;
    const STREAM_TYPE: StreamType = StreamType::User;
}

/// The user moved to another tier. Quotas are unchanged; prices follow the new tier.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TierChanged {
    pub user_id: Uuid,
    pub from: Tier,
    pub to: Tier,
}

impl EventPayload for TierChanged {
    const EVENT_TYPE: &'static str = "TierChanged";
    const SCHEMA_VERSION: u16 = 1;
    const STREAM_TYPE: StreamType = StreamType::User;
}

/// Part of the user's quota was taken by a device (on create, or the new size on resize).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct QuotaReserved {
    pub user_id: Uuid,
    pub device_id: Uuid,
    pub cpu_cores: u32,
    pub memory_mb: u32,
}

impl EventPayload for QuotaReserved {
    const EVENT_TYPE: &'static str = "QuotaReserved";
    const SCHEMA_VERSION: u16 = 1;
    const STREAM_TYPE: StreamType = StreamType::User;
}

/// A device gave back its part of the quota (on delete, or the old size on resize).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct QuotaReleased {
    pub user_id: Uuid,
    pub device_id: Uuid,
    pub cpu_cores: u32,
    pub memory_mb: u32,
}

impl EventPayload for QuotaReleased {
    const EVENT_TYPE: &'static str = "QuotaReleased";
    const SCHEMA_VERSION: u16 = 1;
    const STREAM_TYPE: StreamType = StreamType::User;
}

/// The user asked to be forgotten. Their personal data key is destroyed (crypto-shredding).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UserErased {
    pub user_id: Uuid,
    pub erased_at: DateTime<Utc>,
}

impl EventPayload for UserErased {
    const EVENT_TYPE: &'static str = "UserErased";
    const SCHEMA_VERSION: u16 = 1;
    const STREAM_TYPE: StreamType = StreamType::User;
}
