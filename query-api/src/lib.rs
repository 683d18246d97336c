//! Cloudphone query side: the GraphQL API dashboards query, served from read replicas.
//!
//! - [`graphql`]: the schema (device statistics, daily usage, device connections, users,
//!   projection status), scoped to the caller before any SQL is built; nested loads batched.
//! - [`reads`]: every SQL statement over the read models.
//! - [`sources`]: the primary and its replicas, health-checked rotation, fallback, and
//!   read-your-writes (a source whose projections reached the caller's position).
//! - [`cache`]: answers kept in memory, keyed by what was asked, by whom, and the checkpoints
//!   they were read at; [`persisted`]: automatic persisted queries; [`safelist`]: only
//!   registered documents, when an operator asks for that.
//! - [`graphql::document`]: a document measured (tokens, nesting, fragments expanded without
//!   expanding them, depth, introspection) before anything expensive sees it; [`executor`]:
//!   the threads validation and execution run on, apart from every other role's.
//! - [`startup`]: the axum service (`/graphql`, health, readiness, metrics).
//!
//! This crate must never write: not the log, not the read models.

pub mod audit;
pub mod cache;
pub mod config;
pub mod executor;
pub mod graphql;
pub mod persisted;
pub mod reads;
pub mod safelist;
pub mod sources;
pub mod startup;

pub use config::QueryApiConfig;
pub use sources::{ReadError, ReadSources, Route, Source, SourcesConfig};
pub use startup::QueryApi;
