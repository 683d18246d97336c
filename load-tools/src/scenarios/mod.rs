//! One module per `cloudphone load` verb, each a whole benchmark: it builds its world, starts
//! what it measures, drives its workload, and prints (and with `--json` writes) its report.
//! A scenario depends only on [`crate::harness`], [`crate::world`] and [`crate::workloads`],
//! never on another scenario: what two share belongs in one of those.

pub mod commands;
pub mod export;
pub mod history;
pub mod hostile;
pub mod kafka;
pub mod platform;
pub mod projections;
pub mod queries;
pub mod replay;
pub mod subscriptions;
