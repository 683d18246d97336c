//! What the integration tests of several Cloudphone crates share. Each crate has one test
//! binary (`tests/<name>/main.rs`, one module per feature); helpers that only one crate's
//! tests use stay in that binary's `support` module, and what more than one crate needs is
//! here:
//!
//! - [`urls`]: the PostgreSQL server of `DATABASE_URL`, and a test's own database on it, on
//!   the streaming replica and through PgBouncer.
//! - `tokens` (feature `tokens`): bearer tokens for a role, signed with a test's secret or
//!   the development one.
//! - [`roles`]: `cloudphone` roles as child processes with JSON logs, killed however a test
//!   ends; test logs of in-process roles.
//! - [`contracts`]: the checked-in contracts' drift check (`CLOUDPHONE_BLESS_CONTRACTS`).
//! - `older_projector` (feature `projector`): a projector that parks events it does not know,
//!   for the dead-letter tests.
//! - [`db`]: migrations, and changing stored events past the append-only triggers.
//! - [`fixtures`]: events to append.
//! - [`services`]: the shared broker and replica the test command starts (`ops/dev/`).
//! - [`scratch`]: a PostgreSQL cluster of a test's own, to stop and start at will.
//! - `query` (feature `query-api`): a query API on the test's database with a client, and
//!   read sources and query APIs on the streaming replica; `live` (same feature): a
//!   subscription client over WebSocket.
//!
//! This crate is dev-only: it must never be a normal dependency of any crate, only a
//! `[dev-dependencies]` entry. It panics on every failure, knows the development secret, and
//! starts, stops and kills processes and database clusters; none of that belongs in a
//! binary. The features keep the crates low in the flow from building the ones above them
//! for their tests.

// Test support: a broken expectation is a failed test, so panicking is the point.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod contracts;
pub mod db;
pub mod fixtures;
#[cfg(feature = "query-api")]
pub mod live;
#[cfg(feature = "projector")]
pub mod older_projector;
#[cfg(feature = "query-api")]
pub mod query;
pub mod roles;
pub mod scratch;
pub mod services;
#[cfg(feature = "tokens")]
pub mod tokens;
pub mod urls;
