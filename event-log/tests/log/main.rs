//! Integration tests of the event log against a real PostgreSQL (one throwaway database per
//! test, created by `#[sqlx::test]` through `DATABASE_URL`).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests panic on purpose

mod append;
mod append_only;
mod bad_input;
mod chain;
mod export;
mod maintenance;
mod ordering;
mod partitions;
mod support;
mod tail;
mod under_load;
