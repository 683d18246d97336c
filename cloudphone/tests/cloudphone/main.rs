//! The `cloudphone` binary as operators and clients meet it, against a real PostgreSQL: its
//! verbs and roles as processes, the roles together (the command API, the projectors, the
//! relay and the query API), the web console in a real browser, faults, hostile clients and
//! the load tools. One module per
//! feature; `support` and `portal` (clients under load) hold what several of them share.
//!
//! Some modules stop shared services or load both cores: .config/nextest.toml puts them in
//! test groups by module (`kafka::`, `ops::`, `faults::`, `replicas::`, `fuzz::`, `history::`,
//! `hostile::`).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests panic on purpose

mod audit;
mod backup;
mod cli;
mod console;
mod crash;
mod dead_letters;
mod faults;
mod fuzz;
// These drive `cloudphone load ...` through the binary: nothing to run without the verb.
#[cfg(feature = "load")]
mod history;
mod hostile;
mod kafka;
#[cfg(feature = "load")]
mod load;
mod metrics;
mod ops;
mod pgbouncer;
mod portal;
mod readonly;
mod replay;
mod replicas;
mod support;
