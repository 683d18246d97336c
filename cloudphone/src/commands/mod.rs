//! One module per verb.

pub mod database;
pub mod load;
pub mod migrate;
pub mod partitions;
pub mod serve;
pub mod token;
pub mod verify;
