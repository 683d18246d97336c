//! The Cloudphone domain: the user and device aggregates as pure functions.
//!
//! Each aggregate has a command type, a state rebuilt from its stream, `decide(command,
//! state, now) -> Result<events, DomainError>` and `evolve(state, event) -> state`. Device
//! decisions also read the owner's state (quota, tier) and may return events for the owner's
//! stream; the command layer appends both streams atomically with expected versions, so a
//! decision made on a stale state is retried, never applied.
//!
//! [`limits`] documents every allowed range, [`pricing`] the price list and its rounding.
//!
//! This crate must never do I/O or read a clock: time comes in as `now`, ids come in the
//! commands, so every rule is a fast, deterministic unit test.

pub mod device;
mod error;
pub mod ids;
pub mod limits;
pub mod pricing;
pub mod user;

pub use device::{DeviceCommand, DeviceContext, DeviceState};
pub use error::{DomainError, ErrorKind, QuotaResource};
pub use pricing::PricingTable;
pub use user::{UserCommand, UserState};
