//! Cloudphone query side: serves dashboards from the read models, routed to read replicas.
//!
//! - [`sources`]: the primary and its replicas, health-checked rotation, fallback, and
//!   read-your-writes (a source whose projections reached the caller's position).
//!
//! The GraphQL API, its cache and the audit export are issues #6 and #8. This crate must
//! never write: not the log, not the read models.

pub mod sources;

pub use sources::{ReadError, ReadSources, Source, SourcesConfig};
