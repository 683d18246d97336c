//! Upcasters: lift a payload stored at an old schema version to the current one.
//!
//! Stored events are immutable, so a changed event shape is handled on read: each upcaster
//! turns version `n` of one event type into version `n + 1`, and [`lift`] chains them. Adding
//! a version means: bump `SCHEMA_VERSION`, keep the old struct (its JSON Schema stays
//! published), and register one upcaster from the old version here.

use serde_json::Value;

use crate::{DeviceCreated, DeviceCreatedV1, EventKind, EventPayload, SchemaError};

/// Lifts one event type's payload from `from_version` to `from_version + 1`.
#[derive(Debug, Clone, Copy)]
pub struct Upcaster {
    pub event_type: &'static str,
    pub from_version: u16,
    pub upcast: fn(Value) -> Result<Value, String>,
}

/// Every upcaster this code knows.
pub const UPCASTERS: &[Upcaster] = &[Upcaster {
    event_type: DeviceCreated::EVENT_TYPE,
    from_version: 1,
    upcast: device_created_v1_to_v2,
}];

/// The Android version every device ran before `DeviceCreated` recorded it.
pub const ANDROID_VERSION_BEFORE_V2: u8 = 11;

fn device_created_v1_to_v2(payload: Value) -> Result<Value, String> {
    let v1: DeviceCreatedV1 = serde_json::from_value(payload).map_err(|e| e.to_string())?;
    let v2 = DeviceCreated {
        device_id: v1.device_id,
        owner_id: v1.owner_id,
        provider: v1.provider,
        cpu_cores: v1.cpu_cores,
        memory_mb: v1.memory_mb,
        android_version: ANDROID_VERSION_BEFORE_V2,
        created_at: v1.created_at,
    };
    serde_json::to_value(v2).map_err(|e| e.to_string())
}

/// Lifts `payload`, stored as `kind.event_type` at `version`, to `kind.current_version`.
pub fn lift(kind: &EventKind, version: u16, payload: Value) -> Result<Value, SchemaError> {
    if version == 0 || version > kind.current_version {
        return Err(SchemaError::UnsupportedVersion {
            event_type: kind.event_type.to_owned(),
            schema_version: version,
            current_version: kind.current_version,
        });
    }
    let mut payload = payload;
    for from_version in version..kind.current_version {
        let upcaster = UPCASTERS
            .iter()
            .find(|u| u.event_type == kind.event_type && u.from_version == from_version)
            .ok_or_else(|| SchemaError::MissingUpcaster {
                event_type: kind.event_type.to_owned(),
                from_version,
            })?;
        payload = (upcaster.upcast)(payload).map_err(|reason| SchemaError::Upcast {
            event_type: kind.event_type.to_owned(),
            from_version,
            reason,
        })?;
    }
    Ok(payload)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use crate::{DeviceEvent, Event, Provider, SchemaError, all_kinds};

    use super::*;

    fn v1_payload() -> Value {
        json!({
            "device_id": "0196a5d4-7f7e-7a1c-9a40-2b7c9e1d0001",
            "owner_id": "0196a5d4-7f7e-7a1c-9a40-2b7c9e1d0002",
            "provider": "gcp",
            "cpu_cores": 4,
            "memory_mb": 8192,
            "created_at": "2025-03-01T10:00:00Z"
        })
    }

    #[test]
    fn a_v1_device_created_is_lifted_to_v2_with_the_default_android_version() {
        let event = Event::decode("DeviceCreated", 1, v1_payload());
        let Ok(Event::Device(DeviceEvent::DeviceCreated(created))) = event else {
            panic!("expected DeviceCreated, got {event:?}");
        };
        assert_eq!(created.android_version, ANDROID_VERSION_BEFORE_V2);
        assert_eq!(created.provider, Provider::Gcp);
        assert_eq!(created.cpu_cores, 4);
    }

    #[test]
    fn a_v1_payload_that_is_malformed_is_an_upcast_error() {
        let mut payload = v1_payload();
        payload["cpu_cores"] = json!("four");
        let err = Event::decode("DeviceCreated", 1, payload).unwrap_err();
        assert!(matches!(err, SchemaError::Upcast { from_version: 1, .. }), "{err:?}");
    }

    #[test]
    fn a_version_newer_than_the_code_is_a_typed_error() {
        let err = Event::decode("DeviceCreated", 3, v1_payload()).unwrap_err();
        assert!(
            matches!(
                err,
                SchemaError::UnsupportedVersion {
                    schema_version: 3,
                    current_version: 2,
                    ..
                }
            ),
            "{err:?}"
        );
        let err = Event::decode("DeviceStarted", 0, json!({})).unwrap_err();
        assert!(matches!(err, SchemaError::UnsupportedVersion { .. }), "{err:?}");
    }

    #[test]
    fn decoding_from_text_gives_the_same_event_as_from_a_value() {
        // v1 goes through the upcaster, v2 (current) straight into the type.
        let v1 = v1_payload();
        let from_text = Event::decode_text("DeviceCreated", 1, &v1.to_string());
        assert_eq!(from_text.ok(), Event::decode("DeviceCreated", 1, v1.clone()).ok());
        let Ok(current) = Event::decode("DeviceCreated", 1, v1) else {
            panic!("v1 payload did not decode");
        };
        let Ok(encoded) = (match &current {
            Event::Device(event) => event.encode(),
            Event::User(event) => event.encode(),
        }) else {
            panic!("could not encode {current:?}");
        };
        let text = encoded.payload.to_string();
        assert_eq!(Event::decode_text("DeviceCreated", 2, &text).ok(), Some(current));
        let err = Event::decode_text("DeviceCreated", 2, "{\"device_id\": 1}").unwrap_err();
        assert!(matches!(err, SchemaError::MalformedPayload { .. }), "{err:?}");
        let err = Event::decode_text("DeviceCreated", 1, "not json").unwrap_err();
        assert!(matches!(err, SchemaError::MalformedPayload { .. }), "{err:?}");
        let err = Event::decode_text("DeviceCreated", 3, &text).unwrap_err();
        assert!(matches!(err, SchemaError::UnsupportedVersion { .. }), "{err:?}");
        let err = Event::decode_text("DeviceTeleported", 1, "{}").unwrap_err();
        assert!(matches!(err, SchemaError::UnknownEventType { .. }), "{err:?}");
    }

    #[test]
    fn an_unknown_event_type_is_a_typed_error() {
        let err = Event::decode("DeviceTeleported", 1, json!({})).unwrap_err();
        assert!(matches!(err, SchemaError::UnknownEventType { .. }), "{err:?}");
    }

    #[test]
    fn every_old_version_has_a_path_to_the_current_one() {
        for kind in all_kinds() {
            for version in 1..kind.current_version {
                assert!(
                    UPCASTERS
                        .iter()
                        .any(|u| u.event_type == kind.event_type && u.from_version == version),
                    "{} v{version} has no upcaster",
                    kind.event_type
                );
            }
        }
    }
}
