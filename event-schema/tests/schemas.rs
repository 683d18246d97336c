//! The checked-in JSON Schema files are current, and every event type round-trips through
//! JSON and validates against the schema of its version.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests panic on purpose

use std::collections::BTreeSet;
use std::path::PathBuf;

use chrono::{DateTime, Utc};
use event_schema::schema::{SchemaDocument, all_documents};
use event_schema::*;
use proptest::prelude::*;
use serde_json::Value;
use uuid::Uuid;

fn schemas_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("schemas")
}

fn render(document: &SchemaDocument) -> String {
    let mut text = serde_json::to_string_pretty(&document.schema).unwrap_or_default();
    text.push('\n');
    text
}

#[test]
fn checked_in_schema_files_match_the_types() {
    let dir = schemas_dir();
    let documents = all_documents();
    if std::env::var_os("UPDATE_SCHEMAS").is_some() {
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {dir:?}: {e}"));
        for document in &documents {
            let path = dir.join(&document.file_name);
            std::fs::write(&path, render(document)).unwrap_or_else(|e| panic!("write {path:?}: {e}"));
        }
    }
    let mut stale = Vec::new();
    for document in &documents {
        let path = dir.join(&document.file_name);
        let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
        if on_disk != render(document) {
            stale.push(document.file_name.clone());
        }
    }
    let expected: BTreeSet<String> = documents.iter().map(|d| d.file_name.clone()).collect();
    let present: BTreeSet<String> = std::fs::read_dir(&dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    let unexpected: Vec<_> = present.difference(&expected).collect();
    assert!(
        stale.is_empty() && unexpected.is_empty(),
        "stale schema files {stale:?}, unexpected files {unexpected:?}; \
         regenerate with `UPDATE_SCHEMAS=1 cargo test -p event-schema --test schemas`"
    );
}

#[test]
fn every_event_type_and_version_has_a_schema_document() {
    let documented: BTreeSet<(&str, u16)> = all_documents().iter().filter_map(|d| d.event).collect();
    for kind in all_kinds() {
        for version in 1..=kind.current_version {
            assert!(
                documented.contains(&(kind.event_type, version)),
                "no schema for {} v{version}",
                kind.event_type
            );
        }
    }
}

#[test]
fn personal_fields_are_marked_in_the_schema() {
    let documents = all_documents();
    for kind in all_kinds() {
        let Some(document) = documents
            .iter()
            .find(|d| d.event == Some((kind.event_type, kind.current_version)))
        else {
            panic!("no schema for {}", kind.event_type);
        };
        let properties = document.schema["properties"].as_object().cloned().unwrap_or_default();
        for (field, schema) in properties {
            let marked = schema.get(PERSONAL_DATA_KEYWORD) == Some(&Value::Bool(true));
            let listed = kind.personal_fields.contains(&field.as_str());
            assert_eq!(marked, listed, "{}.{field}", kind.event_type);
        }
    }
}

fn validator_for(event_type: &str, version: u16) -> jsonschema::Validator {
    let path = schemas_dir().join(format!("{event_type}.v{version}.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {path:?}: {e}"));
    let schema: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("parse {path:?}: {e}"));
    jsonschema::options()
        .should_validate_formats(true)
        .build(&schema)
        .unwrap_or_else(|e| panic!("compile {path:?}: {e}"))
}

// ---- strategies -------------------------------------------------------------------------

fn uuid() -> impl Strategy<Value = Uuid> {
    any::<u128>().prop_map(Uuid::from_u128)
}

fn instant() -> impl Strategy<Value = DateTime<Utc>> {
    // 2000-01-01 .. 2100-01-01, microsecond precision like PostgreSQL.
    (946_684_800_000_000i64..4_102_444_800_000_000)
        .prop_map(|micros| DateTime::from_timestamp_micros(micros).unwrap_or_default())
}

fn pick<T: Copy + std::fmt::Debug + 'static>(all: &'static [T]) -> impl Strategy<Value = T> {
    proptest::sample::select(all)
}

fn quota() -> impl Strategy<Value = Quota> {
    (any::<u32>(), any::<u32>(), any::<u32>()).prop_map(|(d, c, m)| Quota {
        max_devices: d,
        max_cpu_cores: c,
        max_memory_mb: m,
    })
}

fn text() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9 @+._\\-é\"\\\\]{0,24}"
}

fn user_event() -> impl Strategy<Value = UserEvent> {
    prop_oneof![
        (uuid(), pick(Tier::ALL), text(), text(), instant()).prop_map(|(user_id, tier, email, phone, at)| {
            UserEvent::from(UserRegistered {
                user_id,
                tier,
                email: Personal::new(email),
                phone: Personal::new(phone),
                registered_at: at,
            })
        }),
        (uuid(), quota()).prop_map(|(user_id, quota)| QuotaChanged { user_id, quota }.into()),
        (uuid(), pick(Tier::ALL), pick(Tier::ALL))
            .prop_map(|(user_id, from, to)| TierChanged { user_id, from, to }.into()),
        (uuid(), uuid(), any::<u32>(), any::<u32>()).prop_map(|(user_id, device_id, cpu_cores, memory_mb)| {
            QuotaReserved {
                user_id,
                device_id,
                cpu_cores,
                memory_mb,
            }
            .into()
        }),
        (uuid(), uuid(), any::<u32>(), any::<u32>()).prop_map(|(user_id, device_id, cpu_cores, memory_mb)| {
            QuotaReleased {
                user_id,
                device_id,
                cpu_cores,
                memory_mb,
            }
            .into()
        }),
        (uuid(), instant()).prop_map(|(user_id, erased_at)| UserErased { user_id, erased_at }.into()),
    ]
}

fn device_event() -> impl Strategy<Value = DeviceEvent> {
    prop_oneof![
        (
            uuid(),
            uuid(),
            pick(Provider::ALL),
            any::<u32>(),
            any::<u32>(),
            any::<u8>(),
            instant()
        )
            .prop_map(
                |(device_id, owner_id, provider, cpu_cores, memory_mb, android_version, created_at)| {
                    DeviceCreated {
                        device_id,
                        owner_id,
                        provider,
                        cpu_cores,
                        memory_mb,
                        android_version,
                        created_at,
                    }
                    .into()
                }
            ),
        (uuid(), instant()).prop_map(|(device_id, started_at)| DeviceStarted { device_id, started_at }.into()),
        (uuid(), pick(StopReason::ALL), instant()).prop_map(|(device_id, reason, stopped_at)| DeviceStopped {
            device_id,
            reason,
            stopped_at
        }
        .into()),
        (uuid(), any::<(u32, u32, u32, u32)>()).prop_map(|(device_id, (a, b, c, d))| {
            DeviceResized {
                device_id,
                from_cpu_cores: a,
                from_memory_mb: b,
                cpu_cores: c,
                memory_mb: d,
            }
            .into()
        }),
        (uuid(), instant()).prop_map(|(device_id, deleted_at)| DeviceDeleted { device_id, deleted_at }.into()),
        (uuid(), text(), instant()).prop_map(|(device_id, reason, failed_at)| DeviceFailed {
            device_id,
            reason,
            failed_at
        }
        .into()),
        (
            uuid(),
            uuid(),
            pick(Provider::ALL),
            instant(),
            instant(),
            any::<u32>(),
            any::<i64>(),
            text()
        )
            .prop_map(
                |(owner_id, device_id, provider, started_at, ended_at, minutes, cost, pricing_plan_id)| {
                    UsageRecorded {
                        owner_id,
                        device_id,
                        provider,
                        started_at,
                        ended_at,
                        minutes,
                        cost: Money::new(cost, Currency::USD),
                        pricing_plan_id,
                    }
                    .into()
                }
            ),
    ]
}

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        user_event().prop_map(Event::User),
        device_event().prop_map(Event::Device)
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn every_event_round_trips_through_json_and_validates_against_its_schema(event in event()) {
        let encoded = event.encode().map_err(|e| TestCaseError::fail(e.to_string()))?;
        let validator = validator_for(encoded.event_type, encoded.schema_version);
        let errors: Vec<String> = validator.iter_errors(&encoded.payload).map(|e| e.to_string()).collect();
        prop_assert!(errors.is_empty(), "{} does not validate: {:?}", encoded.event_type, errors);

        // Through text, as it travels to PostgreSQL and Kafka.
        let text = serde_json::to_string(&encoded.payload).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let payload: Value = serde_json::from_str(&text).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let decoded = Event::decode(encoded.event_type, encoded.schema_version, payload)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(decoded.stream_type(), event.stream_type());
        prop_assert_eq!(decoded, event);
    }

    #[test]
    fn a_v1_device_created_validates_against_the_v1_schema_and_lifts(
        (device_id, owner_id, provider, cpu_cores, memory_mb, created_at) in
            (uuid(), uuid(), pick(Provider::ALL), any::<u32>(), any::<u32>(), instant())
    ) {
        let v1 = DeviceCreatedV1 { device_id, owner_id, provider, cpu_cores, memory_mb, created_at };
        let payload = serde_json::to_value(&v1).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert!(validator_for("DeviceCreated", 1).is_valid(&payload));
        prop_assert!(!validator_for("DeviceCreated", 2).is_valid(&payload), "v2 requires android_version");
        let lifted = Event::decode("DeviceCreated", 1, payload).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let Event::Device(DeviceEvent::DeviceCreated(created)) = lifted else {
            return Err(TestCaseError::fail("not a DeviceCreated"));
        };
        prop_assert_eq!(created.device_id, device_id);
        prop_assert_eq!(created.android_version, upcast::ANDROID_VERSION_BEFORE_V2);
    }
}

#[test]
fn a_payload_of_the_wrong_shape_is_rejected_by_schema_and_decoder_alike() {
    let payload = serde_json::json!({"device_id": Uuid::nil(), "started_at": "yesterday"});
    assert!(!validator_for("DeviceStarted", 1).is_valid(&payload));
    let err = Event::decode("DeviceStarted", 1, payload);
    assert!(matches!(err, Err(SchemaError::MalformedPayload { .. })), "{err:?}");

    let extra = serde_json::json!({"device_id": Uuid::nil(), "started_at": "2026-01-01T00:00:00Z", "colour": "red"});
    assert!(!validator_for("DeviceStarted", 1).is_valid(&extra));
    assert!(Event::decode("DeviceStarted", 1, extra).is_err());
}
