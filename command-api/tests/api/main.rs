//! The command API over HTTP against a real PostgreSQL: every endpoint, every error status,
//! auth scoping, idempotency, quota under concurrency, fuzzed input and outages.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests panic on purpose

mod availability;
mod endpoints;
mod errors;
mod fuzz;
mod idempotency;
mod ids;
mod log_reads;
mod quota;
mod scoping;
mod support;
mod tokens;
