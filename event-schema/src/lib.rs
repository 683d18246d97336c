//! The language of the Cloudphone event log: the envelope every event travels in, every event
//! type with its explicit schema version, upcasters that lift old versions to current types,
//! the canonical bytes the hash chain covers, and JSON Schema documents generated from the
//! types (checked in under `schemas/`).
//!
//! Layout: [`vocabulary`] holds the shared words (tiers, providers, money); [`events`] the
//! payload types of the user and device streams and the [`Event`] enum; [`upcast`] the
//! registry of version upcasters; [`envelope`] the stored envelope; [`canonical`] the hashed
//! byte form; [`schema`] the JSON Schema generation.
//!
//! This crate is pure data: it must never do I/O, read a clock, or depend on sqlx, tokio or
//! anything else that talks to the outside world. Time and ids come in as values.

pub mod canonical;
pub mod envelope;
pub mod events;
pub mod personal;
pub mod schema;
pub mod upcast;
pub mod vocabulary;

pub use envelope::{Actor, ActorRole, ChainHash, EventEnvelope, EventMetadata};
pub use events::*;
pub use personal::{PERSONAL_DATA_KEYWORD, Personal};
pub use vocabulary::{Currency, DeviceStatus, Money, Provider, StopReason, StreamType, Tier, UnknownWord};

/// Why a stored event could not be turned into a current event type, or a type into JSON.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("unknown event type `{event_type}`")]
    UnknownEventType { event_type: String },
    #[error(
        "`{event_type}` schema version {schema_version} is not supported \
         (this code knows versions 1 to {current_version})"
    )]
    UnsupportedVersion {
        event_type: String,
        schema_version: u16,
        current_version: u16,
    },
    #[error("no upcaster lifts `{event_type}` from version {from_version}")]
    MissingUpcaster { event_type: String, from_version: u16 },
    #[error("upcasting `{event_type}` from version {from_version} failed: {reason}")]
    Upcast {
        event_type: String,
        from_version: u16,
        reason: String,
    },
    #[error("payload does not match `{event_type}` v{schema_version}: {source}")]
    MalformedPayload {
        event_type: String,
        schema_version: u16,
        #[source]
        source: serde_json::Error,
    },
    #[error("could not encode `{event_type}`: {source}")]
    Encode {
        event_type: &'static str,
        #[source]
        source: serde_json::Error,
    },
}
