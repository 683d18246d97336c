//! JSON Schema documents for every event version, generated from the Rust types.
//!
//! The generated files are checked in under `event-schema/schemas/` so that consumers in
//! other languages (BI, auditors) can validate what they read. A test regenerates them and
//! fails when a checked-in file is stale; run it with `UPDATE_SCHEMAS=1` to rewrite them.

use schemars::generate::SchemaSettings;
use serde_json::Value;

use crate::{
    DeviceCreated, DeviceCreatedV1, DeviceDeleted, DeviceFailed, DeviceResized, DeviceStarted, DeviceStopped,
    EventEnvelope, EventPayload, QuotaChanged, QuotaReleased, QuotaReserved, TierChanged, UsageRecorded, UserErased,
    UserRegistered,
};

/// One generated schema document and the file it belongs in.
#[derive(Debug, Clone, PartialEq)]
pub struct SchemaDocument {
    /// File name under `event-schema/schemas/`, e.g. `DeviceCreated.v2.json`.
    pub file_name: String,
    /// `Some((event_type, version))` for event payloads, `None` for the envelope.
    pub event: Option<(&'static str, u16)>,
    pub schema: Value,
}

fn generate<T: schemars::JsonSchema>(id: &str) -> Value {
    let generator = SchemaSettings::draft2020_12().into_generator();
    let mut schema = generator.into_root_schema_for::<T>();
    schema.insert(
        "$id".to_owned(),
        Value::String(format!("https://schemas.cloudphone.dev/events/{id}")),
    );
    schema.to_value()
}

fn payload_document<E: EventPayload>() -> SchemaDocument {
    let file_name = format!("{}.v{}.json", E::EVENT_TYPE, E::SCHEMA_VERSION);
    SchemaDocument {
        schema: generate::<E>(&file_name),
        file_name,
        event: Some((E::EVENT_TYPE, E::SCHEMA_VERSION)),
    }
}

/// Every schema document: each event type at every version it ever had, and the envelope.
pub fn all_documents() -> Vec<SchemaDocument> {
    vec![
        payload_document::<UserRegistered>(),
        payload_document::<QuotaChanged>(),
        payload_document::<TierChanged>(),
        payload_document::<QuotaReserved>(),
        payload_document::<QuotaReleased>(),
        payload_document::<UserErased>(),
        payload_document::<DeviceCreatedV1>(),
        payload_document::<DeviceCreated>(),
        payload_document::<DeviceStarted>(),
        payload_document::<DeviceStopped>(),
        payload_document::<DeviceResized>(),
        payload_document::<DeviceDeleted>(),
        payload_document::<DeviceFailed>(),
        payload_document::<UsageRecorded>(),
        SchemaDocument {
            file_name: "EventEnvelope.json".to_owned(),
            event: None,
            schema: generate::<EventEnvelope>("EventEnvelope.json"),
        },
    ]
}
