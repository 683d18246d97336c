//! The Cloudphone command API: the axum HTTP service portals POST commands to.
//!
//! A request is authenticated (`http-edge`'s tokens, through [`extract::Caller`]), its body
//! parsed into a domain command ([`routes`]), and run by [`commands`]: the aggregate comes
//! from an in-memory slot ([`aggregates`]), `domain` decides, and the events go to the event log with the expected
//! versions of every stream they touch, in one atomic append that the log's writer groups with
//! others (group commit). A concurrent change makes the command decide again on fresh state, a
//! bounded number of times. Every failure is mapped once, in [`problem`], to an RFC 9457
//! problem document; no input a client can send produces a 500.
//!
//! This crate must never hold business rules (they are `domain`'s) or write anywhere but the
//! event log.

pub mod aggregates;
pub mod commands;
pub mod config;
pub mod extract;
pub mod openapi;
pub mod problem;
pub mod routes;
pub mod startup;
pub mod state;
pub mod telemetry;

pub use config::{ApiConfig, AppendMode};
pub use startup::{Application, StartupError, router};
