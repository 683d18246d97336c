//! One module per verb.

pub mod database;
pub mod migrate;
pub mod partitions;
pub mod verify;
