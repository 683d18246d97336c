//! Projectors against a real PostgreSQL: read models follow the log, equal a rebuild from
//! scratch, survive bad events, competing instances and connection loss.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests panic on purpose

mod concurrent;
mod dead_letters;
mod device_stats;
mod embedded;
mod fleet_v2;
mod replay;
mod replay_history;
mod support;
