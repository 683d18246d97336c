//! The envelope every stored event travels in: identity, position, stream, owner, time,
//! metadata, payload and its place in the hash chain.

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::{Event, SchemaError, StreamType};

/// Who caused an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ActorRole {
    /// A customer acting on their own account.
    User,
    /// An operator of the platform.
    Admin,
    /// Another machine (billing, provider webhooks), scoped by its token.
    Service,
    /// The platform itself (e.g. an idle-stop timer).
    System,
}

/// The principal on whose behalf an event was written.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub struct Actor {
    pub role: ActorRole,
    /// The user id for users and admins, the service name for services.
    pub subject: String,
}

/// Context that travels with an event but is not part of the business fact.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct EventMetadata {
    /// Groups every event caused by one original request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<Uuid>,
    /// The event or command that directly caused this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causation_id: Option<Uuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<Actor>,
    /// W3C trace id of the request that wrote the event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    /// The client's idempotency key of the request, if it sent one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// Fields written by newer code; kept so the hash of a stored event stays verifiable.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

/// A SHA-256 link of the hash chain, shown as 64 lower-case hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ChainHash(pub [u8; 32]);

impl ChainHash {
    /// The `prev_hash` of the first event of the log.
    pub const GENESIS: ChainHash = ChainHash([0; 32]);

    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        <[u8; 32]>::try_from(bytes).ok().map(ChainHash)
    }

    pub fn to_hex(&self) -> String {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut out = String::with_capacity(64);
        for byte in self.0 {
            out.push(DIGITS[usize::from(byte >> 4)] as char);
            out.push(DIGITS[usize::from(byte & 0xf)] as char);
        }
        out
    }

    pub fn from_hex(text: &str) -> Option<Self> {
        fn nibble(c: u8) -> Option<u8> {
            match c {
                b'0'..=b'9' => Some(c - b'0'),
                b'a'..=b'f' => Some(c - b'a' + 10),
                b'A'..=b'F' => Some(c - b'A' + 10),
                _ => None,
            }
        }
        let bytes = text.as_bytes();
        if bytes.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, pair) in bytes.chunks_exact(2).enumerate() {
            out[i] = nibble(pair[0])? << 4 | nibble(pair[1])?;
        }
        Some(ChainHash(out))
    }
}

impl fmt::Debug for ChainHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChainHash({})", self.to_hex())
    }
}

impl fmt::Display for ChainHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl Serialize for ChainHash {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for ChainHash {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        ChainHash::from_hex(&text).ok_or_else(|| serde::de::Error::custom("expected 64 hex digits"))
    }
}

impl JsonSchema for ChainHash {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "ChainHash".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "pattern": "^[0-9a-f]{64}$",
            "description": "SHA-256 as lower-case hex"
        })
    }
}

/// A committed event as the log stores it and every consumer (Kafka, exports) sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct EventEnvelope {
    /// Global position in the log: dense, strictly increasing, starting at 1.
    pub position: i64,
    pub event_id: Uuid,
    pub stream_id: Uuid,
    pub stream_type: StreamType,
    /// Version of the stream after this event: 1 for its first event.
    pub stream_version: i64,
    pub event_type: String,
    pub schema_version: u16,
    /// The user the event belongs to (the user itself, or a device's owner).
    pub owner_id: Uuid,
    /// When the fact happened, as the writer's clock saw it.
    pub occurred_at: DateTime<Utc>,
    /// When the log committed it; never decreases along positions.
    pub recorded_at: DateTime<Utc>,
    pub payload: Value,
    pub metadata: EventMetadata,
    /// Hash of the event at `position - 1` ([`ChainHash::GENESIS`] for the first).
    pub prev_hash: ChainHash,
    /// `SHA-256(prev_hash || canonical bytes of this event)`; see [`crate::canonical`].
    pub hash: ChainHash,
}

impl EventEnvelope {
    /// Decodes the payload into the current event type, upcasting old versions.
    pub fn decode(&self) -> Result<Event, SchemaError> {
        Event::decode(&self.event_type, self.schema_version, self.payload.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn chain_hash_hex_round_trips(bytes in proptest::array::uniform32(any::<u8>())) {
            let hash = ChainHash(bytes);
            prop_assert_eq!(ChainHash::from_hex(&hash.to_hex()), Some(hash));
        }
    }

    #[test]
    fn chain_hash_rejects_what_is_not_64_hex_digits() {
        assert_eq!(ChainHash::from_hex("00"), None);
        assert_eq!(ChainHash::from_hex(&"g".repeat(64)), None);
    }

    #[test]
    fn metadata_keeps_fields_it_does_not_know() {
        let stored = serde_json::json!({"trace_id": "abc", "tenant": "eu-1"});
        let metadata: EventMetadata = serde_json::from_value(stored.clone()).unwrap_or_default();
        assert_eq!(metadata.trace_id.as_deref(), Some("abc"));
        assert_eq!(serde_json::to_value(&metadata).ok(), Some(stored));
    }
}
