//! Every event type, its schema version, and decoding of stored payloads into current types.

pub mod device;
pub mod user;

use schemars::JsonSchema;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::{SchemaError, StreamType, upcast};

pub use device::*;
pub use user::*;

/// What every event payload type declares about itself.
pub trait EventPayload: Serialize + DeserializeOwned + JsonSchema {
    /// The name stored in `user_events.event_type`; stable forever.
    const EVENT_TYPE: &'static str;
    /// The version of the payload's shape; bumped on every incompatible change.
    const SCHEMA_VERSION: u16;
    /// The kind of stream this event is appended to.
    const STREAM_TYPE: StreamType;
    /// Top-level payload fields holding personal data (see [`crate::Personal`]).
    const PERSONAL_FIELDS: &'static [&'static str] = &[];
}

/// A payload ready to store: its type, version and JSON.
#[derive(Debug, Clone, PartialEq)]
pub struct EncodedEvent {
    pub event_type: &'static str,
    pub schema_version: u16,
    pub payload: Value,
}

/// What the registry knows of one event type at its current version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventKind {
    pub event_type: &'static str,
    pub stream_type: StreamType,
    pub current_version: u16,
    pub personal_fields: &'static [&'static str],
}

impl EventKind {
    const fn of<E: EventPayload>() -> Self {
        EventKind {
            event_type: E::EVENT_TYPE,
            stream_type: E::STREAM_TYPE,
            current_version: E::SCHEMA_VERSION,
            personal_fields: E::PERSONAL_FIELDS,
        }
    }
}

macro_rules! stream_events {
    ($(#[$meta:meta])* $enum:ident for $stream:ident { $($variant:ident),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub enum $enum {
            $($variant($variant)),+
        }

        impl $enum {
            /// The event types of this stream, at their current versions.
            pub const KINDS: &'static [EventKind] = &[$(EventKind::of::<$variant>()),+];

            pub fn event_type(&self) -> &'static str {
                match self {
                    $($enum::$variant(_) => <$variant as EventPayload>::EVENT_TYPE),+
                }
            }

            pub fn schema_version(&self) -> u16 {
                match self {
                    $($enum::$variant(_) => <$variant as EventPayload>::SCHEMA_VERSION),+
                }
            }

            /// Serialises the payload at its current version.
            pub fn encode(&self) -> Result<EncodedEvent, SchemaError> {
                let payload = match self {
                    $($enum::$variant(event) => serde_json::to_value(event)),+
                }
                .map_err(|source| SchemaError::Encode {
                    event_type: self.event_type(),
                    source,
                })?;
                Ok(EncodedEvent {
                    event_type: self.event_type(),
                    schema_version: self.schema_version(),
                    payload,
                })
            }

            /// Decodes a payload that is already at the current version of `event_type`.
            /// `None` when the type does not belong to this stream.
            fn decode_current(event_type: &str, payload: Value) -> Option<Result<Self, SchemaError>> {
                match event_type {
                    $(<$variant as EventPayload>::EVENT_TYPE => Some(
                        serde_json::from_value::<$variant>(payload)
                            .map($enum::$variant)
                            .map_err(|source| SchemaError::MalformedPayload {
                                event_type: <$variant as EventPayload>::EVENT_TYPE.to_owned(),
                                schema_version: <$variant as EventPayload>::SCHEMA_VERSION,
                                source,
                            }),
                    ),)+
                    _ => None,
                }
            }

            /// Like `decode_current`, straight from JSON text (no intermediate `Value`).
            fn decode_current_text(event_type: &str, payload: &str) -> Option<Result<Self, SchemaError>> {
                match event_type {
                    $(<$variant as EventPayload>::EVENT_TYPE => Some(
                        serde_json::from_str::<$variant>(payload)
                            .map($enum::$variant)
                            .map_err(|source| SchemaError::MalformedPayload {
                                event_type: <$variant as EventPayload>::EVENT_TYPE.to_owned(),
                                schema_version: <$variant as EventPayload>::SCHEMA_VERSION,
                                source,
                            }),
                    ),)+
                    _ => None,
                }
            }
        }

        $(
            impl From<$variant> for $enum {
                fn from(event: $variant) -> Self {
                    $enum::$variant(event)
                }
            }

            impl From<$variant> for Event {
                fn from(event: $variant) -> Self {
                    Event::$stream($enum::$variant(event))
                }
            }
        )+
    };
}

stream_events! {
    /// An event of a user stream.
    UserEvent for User {
        UserRegistered,
        QuotaChanged,
        TierChanged,
        QuotaReserved,
        QuotaReleased,
        UserErased,
    }
}

stream_events! {
    /// An event of a device stream.
    DeviceEvent for Device {
        DeviceCreated,
        DeviceStarted,
        DeviceStopped,
        DeviceResized,
        DeviceDeleted,
        DeviceFailed,
        UsageRecorded,
    }
}

/// Any event, at its current schema version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    User(UserEvent),
    Device(DeviceEvent),
}

impl From<UserEvent> for Event {
    fn from(event: UserEvent) -> Self {
        Event::User(event)
    }
}

impl From<DeviceEvent> for Event {
    fn from(event: DeviceEvent) -> Self {
        Event::Device(event)
    }
}

impl Event {
    pub fn stream_type(&self) -> StreamType {
        match self {
            Event::User(_) => StreamType::User,
            Event::Device(_) => StreamType::Device,
        }
    }

    pub fn event_type(&self) -> &'static str {
        match self {
            Event::User(event) => event.event_type(),
            Event::Device(event) => event.event_type(),
        }
    }

    pub fn schema_version(&self) -> u16 {
        match self {
            Event::User(event) => event.schema_version(),
            Event::Device(event) => event.schema_version(),
        }
    }

    pub fn encode(&self) -> Result<EncodedEvent, SchemaError> {
        match self {
            Event::User(event) => event.encode(),
            Event::Device(event) => event.encode(),
        }
    }

    /// Decodes a stored payload of any known version into the current type, lifting old
    /// versions through the upcasters. Unknown types and versions newer than this code are
    /// errors, never panics and never silently dropped.
    pub fn decode(event_type: &str, schema_version: u16, payload: Value) -> Result<Self, SchemaError> {
        let kind = kind_of(event_type)?;
        let payload = upcast::lift(kind, schema_version, payload)?;
        let decoded = match kind.stream_type {
            StreamType::User => UserEvent::decode_current(event_type, payload).map(|r| r.map(Event::User)),
            StreamType::Device => DeviceEvent::decode_current(event_type, payload).map(|r| r.map(Event::Device)),
        };
        decoded.unwrap_or_else(|| {
            Err(SchemaError::UnknownEventType {
                event_type: event_type.to_owned(),
            })
        })
    }
}

impl Event {
    /// [`Event::decode`] from the payload's JSON text. A payload at the current version is
    /// deserialised directly into its type (the replay fast path); an older one goes through
    /// the upcasters, so both give the same event.
    pub fn decode_text(event_type: &str, schema_version: u16, payload: &str) -> Result<Self, SchemaError> {
        let kind = kind_of(event_type)?;
        if schema_version != kind.current_version {
            let value: Value = serde_json::from_str(payload).map_err(|source| SchemaError::MalformedPayload {
                event_type: event_type.to_owned(),
                schema_version,
                source,
            })?;
            return Event::decode(event_type, schema_version, value);
        }
        let decoded = match kind.stream_type {
            StreamType::User => UserEvent::decode_current_text(event_type, payload).map(|r| r.map(Event::User)),
            StreamType::Device => DeviceEvent::decode_current_text(event_type, payload).map(|r| r.map(Event::Device)),
        };
        decoded.unwrap_or_else(|| {
            Err(SchemaError::UnknownEventType {
                event_type: event_type.to_owned(),
            })
        })
    }
}

/// Every event type at its current version.
pub fn all_kinds() -> impl Iterator<Item = &'static EventKind> {
    UserEvent::KINDS.iter().chain(DeviceEvent::KINDS)
}

/// The registry entry of `event_type`, or [`SchemaError::UnknownEventType`].
pub fn kind_of(event_type: &str) -> Result<&'static EventKind, SchemaError> {
    all_kinds()
        .find(|kind| kind.event_type == event_type)
        .ok_or_else(|| SchemaError::UnknownEventType {
            event_type: event_type.to_owned(),
        })
}
