//! Canonical bytes of an event: the one definition the hash chain is computed over.
//!
//! ```text
//! canonical(event) =
//!     "cloudphone.event.v1" 0x00          domain tag, so the bytes cannot mean anything else
//!     i64 BE   position
//!     16 B     event_id                    (UUID bytes, big-endian as written)
//!     16 B     stream_id
//!     str      stream_type                 str = u32 BE byte length, then UTF-8
//!     i64 BE   stream_version
//!     str      event_type
//!     u16 BE   schema_version
//!     16 B     owner_id
//!     i64 BE   occurred_at                 microseconds since 1970-01-01T00:00:00Z
//!     i64 BE   recorded_at                 microseconds since 1970-01-01T00:00:00Z
//!     str      payload                     canonical JSON (below)
//!     str      metadata                    canonical JSON
//!
//! hash = SHA-256(prev_hash (32 bytes) || canonical(event))
//! ```
//!
//! Canonical JSON has no insignificant whitespace, object keys sorted by their UTF-8 bytes,
//! strings escaped as `serde_json` escapes them (`"`, `\` and control characters only) and
//! numbers as `serde_json` prints them. PostgreSQL's `jsonb` reorders keys and drops
//! whitespace, so the bytes are recomputed the same way from what it returns. Timestamps are
//! microseconds because that is what PostgreSQL stores; writers truncate before hashing.
//!
//! The hash covers ciphertext where personal data is encrypted, so erasing a user (destroying
//! the key) leaves the chain verifiable.

use std::io::Write as _;

use chrono::{DateTime, Utc};
use serde_json::Value;
use uuid::Uuid;

use crate::EventEnvelope;

/// The fields of an event that the hash chain covers, borrowed.
#[derive(Debug, Clone, Copy)]
pub struct CanonicalEvent<'a> {
    pub position: i64,
    pub event_id: Uuid,
    pub stream_id: Uuid,
    pub stream_type: &'a str,
    pub stream_version: i64,
    pub event_type: &'a str,
    pub schema_version: u16,
    pub owner_id: Uuid,
    pub occurred_at: DateTime<Utc>,
    pub recorded_at: DateTime<Utc>,
    /// The payload as canonical JSON (see [`canonical_json`]).
    pub payload: &'a str,
    /// The metadata as canonical JSON.
    pub metadata: &'a str,
}

const DOMAIN_TAG: &[u8] = b"cloudphone.event.v1\0";

impl CanonicalEvent<'_> {
    /// Appends the canonical bytes to `out` (reused across events to avoid allocations).
    pub fn write_to(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(DOMAIN_TAG);
        out.extend_from_slice(&self.position.to_be_bytes());
        out.extend_from_slice(self.event_id.as_bytes());
        out.extend_from_slice(self.stream_id.as_bytes());
        write_str(out, self.stream_type.as_bytes());
        out.extend_from_slice(&self.stream_version.to_be_bytes());
        write_str(out, self.event_type.as_bytes());
        out.extend_from_slice(&self.schema_version.to_be_bytes());
        out.extend_from_slice(self.owner_id.as_bytes());
        out.extend_from_slice(&self.occurred_at.timestamp_micros().to_be_bytes());
        out.extend_from_slice(&self.recorded_at.timestamp_micros().to_be_bytes());
        write_str(out, self.payload.as_bytes());
        write_str(out, self.metadata.as_bytes());
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        self.write_to(&mut out);
        out
    }
}

/// Canonical bytes of a stored envelope (its `hash` and `prev_hash` are not covered).
pub fn envelope_bytes(envelope: &EventEnvelope) -> Vec<u8> {
    // Metadata is a closed struct with no maps keyed by non-strings, so this cannot fail;
    // `Null` would still give a deterministic (and then non-verifying) result.
    let metadata = serde_json::to_value(&envelope.metadata).unwrap_or(Value::Null);
    let payload = canonical_json(&envelope.payload);
    let metadata = canonical_json(&metadata);
    CanonicalEvent {
        position: envelope.position,
        event_id: envelope.event_id,
        stream_id: envelope.stream_id,
        stream_type: envelope.stream_type.as_str(),
        stream_version: envelope.stream_version,
        event_type: &envelope.event_type,
        schema_version: envelope.schema_version,
        owner_id: envelope.owner_id,
        occurred_at: envelope.occurred_at,
        recorded_at: envelope.recorded_at,
        payload: &payload,
        metadata: &metadata,
    }
    .to_bytes()
}

fn write_str(out: &mut Vec<u8>, bytes: &[u8]) {
    // An event field over 4 GiB cannot reach here: PostgreSQL's jsonb is limited to 255 MiB.
    let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(bytes);
}

/// `value` as canonical JSON text (see the module documentation). The text is also valid
/// input for PostgreSQL's `jsonb`, so writers serialise once and use it for both.
pub fn canonical_json(value: &Value) -> String {
    let mut out = Vec::with_capacity(128);
    write_canonical_json(&mut out, value);
    // Only valid UTF-8 was written: serde_json output and ASCII punctuation.
    String::from_utf8(out).unwrap_or_default()
}

/// Writes `value` as canonical JSON (see the module documentation).
pub fn write_canonical_json(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push(b'{');
            for (i, (key, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_json_string(out, key);
                out.push(b':');
                write_canonical_json(out, item);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical_json(out, item);
            }
            out.push(b']');
        }
        Value::String(text) => write_json_string(out, text),
        Value::Number(number) => {
            let _ = write!(out, "{number}");
        }
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Null => out.extend_from_slice(b"null"),
    }
}

fn write_json_string(out: &mut Vec<u8>, text: &str) {
    // serde_json's string escaping is the definition; writing into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, text);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn canonical(value: &Value) -> String {
        canonical_json(value)
    }

    #[test]
    fn keys_are_sorted_and_whitespace_dropped() {
        let value = json!({"b": 1, "a": {"z": [1, 2, {"y": null, "x": true}], "aa": "é\n"}});
        assert_eq!(
            canonical(&value),
            r#"{"a":{"aa":"é\n","z":[1,2,{"x":true,"y":null}]},"b":1}"#
        );
    }

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            "[a-zA-Z0-9 éß\"\\\\]{0,8}".prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 32, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map("[a-z]{1,4}", inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn canonical_json_parses_back_to_the_same_value(value in arb_json()) {
            let text = canonical(&value);
            let parsed: Value = serde_json::from_str(&text).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(parsed, value);
        }

        #[test]
        fn canonical_json_ignores_key_order_and_spacing(value in arb_json()) {
            // Re-parse a pretty-printed copy: a different text of the same value.
            let pretty = serde_json::to_string_pretty(&value).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let reparsed: Value = serde_json::from_str(&pretty).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(canonical(&reparsed), canonical(&value));
        }
    }

    #[test]
    fn every_covered_field_changes_the_bytes() {
        let payload = canonical_json(&json!({"a": 1}));
        let metadata = canonical_json(&json!({}));
        let at = DateTime::<Utc>::from_timestamp_micros(1_700_000_000_000_000).unwrap_or_default();
        let base = CanonicalEvent {
            position: 7,
            event_id: Uuid::from_u128(1),
            stream_id: Uuid::from_u128(2),
            stream_type: "device",
            stream_version: 3,
            event_type: "DeviceStarted",
            schema_version: 1,
            owner_id: Uuid::from_u128(4),
            occurred_at: at,
            recorded_at: at,
            payload: &payload,
            metadata: &metadata,
        };
        let other_payload = canonical_json(&json!({"a": 2}));
        let other_metadata = canonical_json(&json!({"trace_id": "t"}));
        let later = at + chrono::Duration::microseconds(1);
        let variants = [
            CanonicalEvent { position: 8, ..base },
            CanonicalEvent {
                event_id: Uuid::from_u128(9),
                ..base
            },
            CanonicalEvent {
                stream_id: Uuid::from_u128(9),
                ..base
            },
            CanonicalEvent {
                stream_type: "user",
                ..base
            },
            CanonicalEvent {
                stream_version: 4,
                ..base
            },
            CanonicalEvent {
                event_type: "DeviceStopped",
                ..base
            },
            CanonicalEvent {
                schema_version: 2,
                ..base
            },
            CanonicalEvent {
                owner_id: Uuid::from_u128(9),
                ..base
            },
            CanonicalEvent {
                occurred_at: later,
                ..base
            },
            CanonicalEvent {
                recorded_at: later,
                ..base
            },
            CanonicalEvent {
                payload: &other_payload,
                ..base
            },
            CanonicalEvent {
                metadata: &other_metadata,
                ..base
            },
        ];
        let base_bytes = base.to_bytes();
        for variant in variants {
            assert_ne!(variant.to_bytes(), base_bytes, "{variant:?}");
        }
    }
}
